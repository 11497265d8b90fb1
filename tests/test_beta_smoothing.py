"""β-smoothed explanations (Dombrowski et al., NeurIPS 2019): the ``softplus_beta`` option of the
back-propagation interpreters explains the network whose ReLUs are softplus(βz)/β, while the
prediction stays the model's. Hand-computed gradients on a one-hidden-layer net, convergence to
the unsmoothed map as β grows, an exact attack gradient, and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import underfire as uf
from underfire.errors import InputError, ModelStructureError
from underfire.interpreters import Grad, build_interpreter, normalize_maps
from underfire.presets import surrogate_options
from underfire.smoothing import relu_surrogate, softplus_relus

BACKPROP = ("grad", "smoothgrad", "inputxgrad", "ig", "deeplift", "lrp")


class OneHidden(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(12, 6), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def one_hidden() -> uf.Classifier:
    torch.manual_seed(0)
    net = OneHidden().double().eval()
    return uf.Classifier(net, mean=(0.0,), std=(1.0,), num_classes=3, in_channels=1, channels_last=False).double()


def images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 1, 3, 4, generator=torch.Generator().manual_seed(1), dtype=torch.double)


def test_the_smoothed_gradient_is_the_softplus_networks_by_hand() -> None:
    """∂/∂x w2_c·softplus_β(W1 x + b1) = W1ᵀ (w2_c ⊙ σ(β z)), written out."""
    model, x, classes = one_hidden(), images(), torch.tensor([0, 2, 1])
    net = model.model
    for beta in (0.5, 3.0):
        got = Grad(model, softplus_beta=beta).attribute(x, classes)
        z = x.flatten(1) @ net.fc1.weight.T + net.fc1.bias
        expected = (torch.sigmoid(beta * z) * net.fc2.weight[classes]) @ net.fc1.weight
        assert torch.allclose(got.flatten(1), expected, atol=1e-12)
    plain = Grad(model).attribute(x, classes)
    assert not torch.allclose(plain, Grad(model, softplus_beta=0.5).attribute(x, classes))


@pytest.mark.parametrize("name", BACKPROP)
def test_a_large_beta_gives_the_unsmoothed_map_and_a_small_one_moves_it(name: str) -> None:
    model, x, classes = one_hidden(), images(), torch.tensor([0, 2, 1])
    # (LRP's default composite spreads a dense first layer's relevance flat: a constant map here)
    options = {"smoothgrad": {"samples": 4, "noise": 0.0}, "lrp": {"rule": "epsilon"}}.get(name, {})
    plain = build_interpreter(name, model, **options)(x, classes, seed=0)
    sharp = build_interpreter(name, model, softplus_beta=1e6, **options)(x, classes, seed=0)
    soft = build_interpreter(name, model, softplus_beta=0.3, **options)(x, classes, seed=0)
    assert (sharp - plain).abs().max() < 1e-4
    assert (soft - plain).abs().max() > 1e-2
    assert not _get_current_function_mode_stack()


def test_the_prediction_stays_the_models_and_the_attack_differentiates_the_smoothed_net() -> None:
    model, classes = one_hidden(), torch.tensor([0, 2, 1])
    x = images().requires_grad_(True)
    grad = Grad(model, softplus_beta=2.0)
    net = model.model

    def by_hand(inputs: torch.Tensor) -> torch.Tensor:
        z = inputs.flatten(1) @ net.fc1.weight.T + net.fc1.bias
        g = (torch.sigmoid(2.0 * z) * net.fc2.weight[classes]) @ net.fc1.weight
        return normalize_maps(g.abs().view(-1, 1, 3, 4))

    with model.frozen(), relu_surrogate("h"):  # an attack's enclosing surrogate does not leak in
        maps, logits, _ = grad.surrogate_and_logits(x, classes)
        assert torch.equal(logits, model(x.detach()))  # exact ReLU network
        (ours,) = torch.autograd.grad((maps * torch.arange(12.0, dtype=x.dtype).view(1, 1, 3, 4)).sum(), x)
    (expected,) = torch.autograd.grad((by_hand(x) * torch.arange(12.0, dtype=x.dtype).view(1, 1, 3, 4)).sum(), x)
    assert ours.abs().sum() > 0
    assert torch.allclose(ours, expected, atol=1e-10)


def test_softplus_relus_replaces_in_place_relus_and_nests() -> None:
    z = torch.randn(6, dtype=torch.double)
    with softplus_relus(4.0):
        out = torch.relu(z)
        w = z.clone()
        nn.ReLU(inplace=True)(w)
        with softplus_relus(1.0):
            inner = F.relu(z)
    assert torch.allclose(out, F.softplus(z, beta=4.0)) and torch.allclose(w, out)
    assert torch.allclose(inner, F.softplus(z, beta=1.0))
    assert torch.equal(torch.relu(z), z.clamp_min(0))


def test_bad_settings_are_one_line() -> None:
    model = one_hidden()
    for beta in (0.0, -1.0, float("inf"), "big"):
        with pytest.raises(InputError, match="softplus_beta"):
            Grad(model, softplus_beta=beta)  # type: ignore[arg-type]
    with pytest.raises(InputError, match="share_forward"):
        Grad(model, share_forward=True, softplus_beta=2.0)
    for surrogate in ({"relu": "sigmoid"}, {"relu": "none"}, {"relu_scale": "relative"}):
        with pytest.raises(InputError, match="would not apply") as error:
            Grad(model, softplus_beta=2.0, **surrogate)
        assert "\n" not in str(error.value)
    assert Grad(model, softplus_beta=2.0, relu="h").softplus_beta == 2.0  # the default, said out loud
    scripted = uf.Classifier(
        torch.jit.script(OneHidden().eval()), mean=(0.0,), std=(1.0,), num_classes=3, in_channels=1, channels_last=False
    )
    with pytest.raises(ModelStructureError, match="TorchScript") as error:
        Grad(scripted, softplus_beta=2.0)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", BACKPROP)
def test_a_presets_relu_surrogate_yields_to_a_chosen_beta(name: str) -> None:
    """``quick`` sets a ReLU surrogate for the attacked copy (GRAD's relative ``h``, LRP's exact
    derivative) that ``softplus_beta`` would refuse next to it: the preset's yields, in
    ``surrogate_options`` and in a run config alike; a surrogate the user chose himself is still
    refused."""
    from underfire.runs import ExperimentConfig

    model = one_hidden()
    surrogate = surrogate_options("quick", name, {"softplus_beta": 3.0})
    assert "relu" not in surrogate and "relu_scale" not in surrogate
    config = ExperimentConfig.from_mapping(
        {"experiment": {"preset": "quick", "interpreters": [name]}, "interpreters": {name: {"softplus_beta": 3}}}
    )
    assert config.options_for(name) == {"softplus_beta": 3.0}
    assert config.config_for("adv2", name).surrogate_options == surrogate
    smoothed = build_interpreter(name, model, **config.options_for(name))
    assert smoothed.softplus_beta == 3.0 and smoothed.with_options(**surrogate).softplus_beta == 3.0
    unsmoothed = build_interpreter(name, model).with_options(**surrogate_options("quick", name))
    assert (unsmoothed.relu.kind, unsmoothed.relu.relative) != ("h", False)  # the preset did set one
    with pytest.raises(InputError, match="would not apply"):
        build_interpreter(name, model, softplus_beta=3, relu="sigmoid")
