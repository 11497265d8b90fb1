"""The ReLU family beyond ReLU (ReLU6, Hardtanh, LeakyReLU, PReLU, Hardswish, Hardsigmoid): under
the attack's surrogate each keeps its exact value, its derivative is the true one away from the
kinks, and its second derivative is not zero near them (the true one is, almost everywhere)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from underfire import Classifier
from underfire.attacks import ADV2, AttackConfig
from underfire.interpreters import build_interpreter
from underfire.smoothing import relu_surrogate

ACTIVATIONS = {
    "relu6": lambda: nn.ReLU6(),
    "relu6 in place": lambda: nn.ReLU6(inplace=True),
    "F.relu6": lambda: lambda z: F.relu6(z),
    "hardtanh": lambda: nn.Hardtanh(-1.0, 2.0),
    "F.hardtanh_": lambda: lambda z: F.hardtanh_(z, -0.5, 0.5),
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
    "leaky_relu in place": lambda: nn.LeakyReLU(0.2, inplace=True),
    "prelu": lambda: nn.PReLU(3, 0.25),
    "hardswish": lambda: nn.Hardswish(),
    "hardsigmoid": lambda: nn.Hardsigmoid(),
}
#: the kinks (and Hardswish's quadratic piece) each activation has
KINKS = {
    "relu6": (0.0, 6.0),
    "F.relu6": (0.0, 6.0),
    "hardtanh": (-1.0, 2.0),
    "F.hardtanh_": (-0.5, 0.5),
    "leaky_relu": (0.0,),
    "prelu": (0.0,),
    "hardswish": (-3.0, 3.0),
    "hardsigmoid": (-3.0, 3.0),
}


def derivatives(act, z0: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z0.clone().requires_grad_(True)
    with relu_surrogate(kind):
        y = act(z * 1.0)  # an in-place activation must not overwrite a leaf
        (first,) = torch.autograd.grad(y.sum(), z, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), z)
    return y.detach(), first.detach(), second


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_the_surrogate_keeps_the_value_and_smooths_every_kink(name: str) -> None:
    act = ACTIVATIONS[name]()
    base = name.split(" ")[0]
    kinks = KINKS[base]
    # points at and around every kink, per channel of a (1, 3, 2, 4) tensor
    points = torch.tensor([k + d for k in kinks for d in (-0.3, -0.01, 0.0, 0.01)] + [-7.0, 9.0])
    z0 = points.repeat(24 // points.numel() + 1)[:24].view(1, 3, 2, 4)
    exact = act(z0.clone())
    value, smoothed, curvature = derivatives(act, z0, "h")
    assert torch.equal(value, exact)  # the forward is the activation's, bit for bit
    _, true, true_curvature = derivatives(act, z0, "none")
    far = torch.stack([(z0 - k).abs() > 0.2 for k in kinks]).all(0)
    torch.testing.assert_close(smoothed[far], true[far], atol=2e-3, rtol=0)
    near = torch.stack([(z0 - k).abs() <= 0.011 for k in kinks]).any(0)
    assert bool((curvature[near] != 0).all())  # the surrogate's second derivative at every kink
    if base != "hardswish":  # piecewise linear: the true second derivative is zero
        assert bool((true_curvature == 0).all())


def test_an_attack_on_grad_reaches_a_relu6_network() -> None:
    """ADV² on GRAD through ReLU6 (as in MobileNet and EfficientNet-Lite): the map term has a
    gradient under the surrogate, and none without it (the attack then refuses in one line)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU6(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.Hardswish(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    ).eval()
    clf = Classifier(net, input_size=16, num_classes=4)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grad = build_interpreter("grad", clf)
    x = images.clone().requires_grad_(True)
    with clf.frozen():
        maps, _ = grad.surrogate(x, torch.tensor([1, 2]))
        (gradient,) = torch.autograd.grad(maps.pow(2).sum(), x)
    assert bool((gradient != 0).any())
    result = ADV2(clf, AttackConfig(pgd_steps=1, adv_steps=2), interpreter=grad)(images, torch.tensor([1, 2]))
    assert result.adversarial.shape == images.shape


def test_describe_lists_each_activation_and_what_the_attack_does_with_it() -> None:
    from underfire.describe import activation_handling

    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU6(), nn.Conv2d(4, 4, 3), nn.SiLU(), nn.Hardswish(), nn.GELU())
    found = activation_handling(net)
    assert set(found) == {"relu6", "silu", "hardswish", "gelu"}
    assert found["relu6"].startswith("surrogate") and found["hardswish"].startswith("surrogate")
    assert found["silu"].startswith("smooth") and found["gelu"].startswith("smooth")
