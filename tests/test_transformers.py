"""Vision transformers: ADV² differentiates through their attention (the fused kernels have no
double backward), on a small torchvision ``VisionTransformer`` with seeded random weights."""

from __future__ import annotations

import pytest
import torch

from underfire import Classifier
from underfire.attacks import ADV2, AttackConfig
from underfire.interpreters import build_interpreter


def tiny_vit() -> Classifier:
    from underfire.models.torchvision_compat import import_torchvision

    import_torchvision()
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    net = VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32, num_classes=4
    ).eval()
    # torchvision starts the head at zero (so a random ViT's logits are constant): give it weights
    torch.nn.init.normal_(net.heads.head.weight, std=0.5)
    return Classifier(net, input_size=32, num_classes=4)


@pytest.mark.parametrize("name", ["grad", "inputxgrad", "smoothgrad"])
def test_adv2_attacks_a_vision_transformer_through_its_attention(name: str) -> None:
    """Before, the first stage-2 step ended in 'derivative for
    aten::_scaled_dot_product_flash_attention_for_cpu_backward is not implemented'."""
    clf = tiny_vit()
    interpreter = build_interpreter(name, clf, **({"samples": 2} if name == "smoothgrad" else {}))
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    config = AttackConfig(pgd_steps=1, adv_steps=2)
    result = ADV2(clf, config, interpreter=interpreter)(images, torch.tensor([1, 2]))
    assert result.adversarial.shape == images.shape and torch.isfinite(result.map_distance.nan_to_num(0)).all()
    # the map term reaches the input through the attention layers
    x = images.clone().requires_grad_(True)
    with clf.frozen(), ADV2.second_order():
        maps, _ = interpreter.surrogate(x, torch.tensor([1, 2]))
        (gradient,) = torch.autograd.grad(maps.pow(2).sum(), x)
    assert bool((gradient != 0).any())


def test_a_map_that_says_nothing_is_refused_never_a_silent_zero_map() -> None:
    """torchvision starts a ViT's head at zero: every class score is a constant, so GRAD's map and
    Grad-CAM's are 0 everywhere. Both are refused in one line that says why; with a head that
    reads the tokens the same interpreters explain."""
    from underfire.errors import ModelStructureError

    clf = tiny_vit()
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    assert bool((build_interpreter("grad", clf)(images) > 0).any())
    assert bool((build_interpreter("gradcam", clf)(images) > 0).any())
    torch.nn.init.zeros_(clf.network.heads.head.weight)
    for name, needle in (("grad", "is constant"), ("gradcam", "has no gradient at the feature layer")):
        with pytest.raises(ModelStructureError, match=needle) as error:
            build_interpreter(name, clf)(images)
        assert "\n" not in str(error.value)
