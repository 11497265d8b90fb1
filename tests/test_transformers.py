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
    assert build_interpreter("gradcam", clf)(images).shape == (2, 1, 4, 4)  # zeros may be its answer
    torch.nn.init.zeros_(clf.network.heads.head.weight)
    for name, needle in (("grad", "is constant"), ("gradcam", "has no gradient at the feature layer")):
        with pytest.raises(ModelStructureError, match=needle) as error:
            build_interpreter(name, clf)(images)
        assert "\n" not in str(error.value)


def class_token_grid(flow: torch.Tensor) -> torch.Tensor:
    """The class token's row of a (N, T, T) token flow over the patches, on their grid, min-max scaled."""
    row = flow[:, 0, 1:]
    side = int(row.shape[1] ** 0.5)
    grid = row.reshape(-1, 1, side, side)
    low, high = grid.amin((2, 3), keepdim=True), grid.amax((2, 3), keepdim=True)
    return (grid - low) / (high - low)


def reference_rollout(clf: Classifier, images: torch.Tensor) -> torch.Tensor:
    """Rollout written out plainly: each torchvision encoder block run by hand with its attention
    asked for explicitly, heads averaged, 0.5·A + 0.5·I, rows renormalised, multiplied in order."""
    net = clf.network
    with torch.no_grad():
        x = net._process_input(clf.normalize(images))
        x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1) + net.encoder.pos_embedding
        result = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
        for block in net.encoder.layers:
            y = block.ln_1(x)
            attended, weights = block.self_attention(y, y, y, need_weights=True, average_attn_weights=False)
            x = x + attended
            x = x + block.mlp(block.ln_2(x))
            mixed = 0.5 * weights.mean(1) + 0.5 * torch.eye(x.shape[1])
            mixed = mixed / mixed.sum(-1, keepdim=True)
            result = mixed @ result
    return class_token_grid(result)


def test_rollout_equals_the_plain_reference_and_can_be_attacked() -> None:
    from underfire.interpreters import AttentionRollout

    clf = tiny_vit()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    explainer = build_interpreter("rollout", clf)
    assert isinstance(explainer, AttentionRollout)
    maps = explainer(images)
    assert maps.shape == (3, 1, 4, 4)
    torch.testing.assert_close(maps, reference_rollout(clf, images), atol=1e-5, rtol=0)
    # batched == per sample; no torch function mode left behind; the model's mode unchanged
    torch.testing.assert_close(torch.cat([explainer(images[i : i + 1]) for i in range(3)]), maps, atol=1e-6, rtol=0)
    from torch.overrides import _get_current_function_mode_stack

    assert not _get_current_function_mode_stack() and not clf.network.training
    # the attention stays in the graph: the map has an input gradient, and ADV² runs on it
    x = images.clone().requires_grad_(True)
    with clf.frozen():
        surrogate, _ = explainer.surrogate(x, torch.zeros(3, dtype=torch.long))
        (gradient,) = torch.autograd.grad((surrogate - maps).pow(2).sum() + surrogate[:, :, 0, 0].sum(), x)
    assert bool((gradient != 0).any())
    result = ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=2), interpreter=explainer)(images, torch.tensor([1, 2, 3]))
    assert result.adversarial.shape == images.shape


def test_rollout_refuses_a_model_without_attention_in_one_line() -> None:
    from underfire.errors import ModelStructureError
    from underfire.models import load_model

    rollout = build_interpreter("rollout", load_model("shapes-resnet"))
    with pytest.raises(ModelStructureError, match="computed no attention") as error:
        rollout.check_attackable()
    assert "\n" not in str(error.value)


def reference_transformer_attribution(clf: Classifier, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Chefer et al.'s gradient-weighted flow written out: the blocks run by hand, each attention a
    leaf of the class score's graph, Ā = mean over heads of (∇A ⊙ A)⁺, R ← R + Ā·R from I."""
    net = clf.network
    x = net._process_input(clf.normalize(images))
    x = torch.cat([net.class_token.expand(x.shape[0], -1, -1), x], dim=1) + net.encoder.pos_embedding
    weights = []
    for block in net.encoder.layers:
        y = block.ln_1(x)
        mha = block.self_attention
        heads, (n, length, embed) = mha.num_heads, y.shape
        q, k, v = (
            (y @ w.T + b).reshape(n, length, heads, embed // heads).transpose(1, 2)
            for w, b in zip(mha.in_proj_weight.chunk(3), mha.in_proj_bias.chunk(3))
        )
        w = (q @ k.transpose(-2, -1) / (embed // heads) ** 0.5).softmax(-1)
        weights.append(w)
        attended = (w @ v).transpose(1, 2).reshape(n, length, embed) @ mha.out_proj.weight.T + mha.out_proj.bias
        x = x + attended
        x = x + block.mlp(block.ln_2(x))
    logits = net.heads(net.encoder.ln(x)[:, 0])
    torch.testing.assert_close(logits, clf.network(clf.normalize(images)), atol=1e-5, rtol=0)  # the model's own
    grads = torch.autograd.grad(logits.gather(1, classes.view(-1, 1)).sum(), weights)
    result = torch.eye(x.shape[1]).expand(x.shape[0], -1, -1)
    for w, g in zip(weights, grads):
        result = result + (g * w).clamp_min(0).mean(1) @ result
    return class_token_grid(result.detach())


def test_transformer_attribution_equals_the_plain_reference_and_can_be_attacked() -> None:
    clf = tiny_vit()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([0, 2, 3])
    explainer = build_interpreter("transformer_attribution", clf)
    maps = explainer(images, classes)
    with clf.frozen():
        expected = reference_transformer_attribution(clf, images.clone().requires_grad_(True), classes)
    torch.testing.assert_close(maps, expected, atol=1e-5, rtol=0)
    assert not torch.allclose(maps, explainer(images, (classes + 1) % 4))  # it depends on the class
    x = images.clone().requires_grad_(True)
    with clf.frozen():
        surrogate, _ = explainer.surrogate(x, classes)
        (gradient,) = torch.autograd.grad((surrogate - maps.flip(-1)).pow(2).sum(), x)
    assert bool((gradient != 0).any())
    result = ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=2), interpreter=explainer)(images, (classes + 1) % 4)
    assert result.adversarial.shape == images.shape


def test_gradcam_reads_the_patch_tokens_where_the_class_score_reaches_them() -> None:
    """Grad-CAM on a ViT: the layer found is the last block's first LayerNorm (after the last
    block only the class token reaches the head), its patch tokens on their 4×4 grid, the class
    token dropped; equal to pytorch-grad-cam with its ViT reshape transform at the same layer; and
    attackable (its map keeps the graph of ∂z_c/∂a through the attention)."""
    pytest.importorskip("pytorch_grad_cam")
    from pytorch_grad_cam import GradCAM as PeerGradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    clf = tiny_vit()
    explainer = build_interpreter("gradcam", clf)
    assert explainer.layers.feature_name == "encoder.layers.encoder_layer_1.ln_1"
    assert explainer.layers.prefix_tokens == 1
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    classes = [1, 3]
    maps = explainer(images, torch.tensor(classes))
    assert maps.shape == (2, 1, 4, 4)

    def reshape(tokens: torch.Tensor) -> torch.Tensor:
        return tokens[:, 1:, :].reshape(tokens.size(0), 4, 4, tokens.size(2)).permute(0, 3, 1, 2)

    peer = PeerGradCAM(model=clf, target_layers=[clf.network.encoder.layers[-1].ln_1], reshape_transform=reshape)
    peer.get_target_width_height = lambda _: (4, 4)  # compare on the token grid, before upsampling
    expected = peer(input_tensor=images.clone(), targets=[ClassifierOutputTarget(c) for c in classes])
    assert bool((maps > 0).any())  # a real map to compare, not two blank ones
    torch.testing.assert_close(maps[:, 0], torch.from_numpy(expected), atol=1e-5, rtol=0)
    result = ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=2), interpreter=explainer)(images, torch.tensor([2, 0]))
    assert result.adversarial.shape == images.shape
