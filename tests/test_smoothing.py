"""ReLU-gradient surrogates (Zhang et al. 2020 §3.2; Dombrowski et al. 2019): exact ReLU values,
the surrogate's first and second derivatives, and reach into every ReLU of real networks."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from underfire.errors import InputError
from underfire.models.torchvision_compat import import_torchvision
from underfire.smoothing import ReluSurrogate, as_relu_surrogate, relu_surrogate

TAU = 1e-4
BETA = 10.0
KINDS = ("h", "sigmoid", "softplus", "none")

# A grid with negative, zero and positive values, dense around the kink.
GRID = torch.tensor(
    [-5.0, -1.0, -0.3, -0.05, -0.01, -3e-3, -1e-3, -1e-5, 0.0, 1e-5, 1e-3, 3e-3, 0.01, 0.05, 0.3, 1.0, 5.0],
    dtype=torch.float64,
)


def closed_forms(kind: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """g'(z) and g''(z) written out by hand."""
    if kind == "h":
        root = torch.sqrt(z * z + TAU)
        first = torch.where(z < 0, 1 + z / root, z / root)
        return first, TAU / root**3
    if kind == "sigmoid":
        s = 1 / (1 + torch.exp(-z))
        return s, s * (1 - s)
    if kind == "softplus":
        s = 1 / (1 + torch.exp(-BETA * z))
        return s, BETA * s * (1 - s)
    return (z > 0).to(z.dtype), torch.zeros_like(z)


def derivatives(z: torch.Tensor, relu: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """First and second derivative of an elementwise ``relu`` by double autograd."""
    z = z.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(relu(z).sum(), z, create_graph=True)
    if first.requires_grad:
        (second,) = torch.autograd.grad(first.sum(), z)
    else:  # a true ReLU's derivative does not depend on z at all
        second = torch.zeros_like(z)
    return first.detach(), second


def mode_depth() -> int:
    return torch._C._len_torch_function_stack()


# ---------------------------------------------------------------- the surrogate object


def test_surrogate_arguments_are_validated() -> None:
    assert as_relu_surrogate("sigmoid") == ReluSurrogate("sigmoid")
    spec = ReluSurrogate("softplus", beta=3.0)
    assert as_relu_surrogate(spec) is spec
    for bad in (
        lambda: ReluSurrogate("relu6"),  # type: ignore[arg-type]
        lambda: ReluSurrogate("h", tau=0.0),
        lambda: ReluSurrogate("h", tau=-1e-4),
        lambda: ReluSurrogate("h", tau=math.nan),
        lambda: ReluSurrogate("softplus", beta=0.0),
        lambda: ReluSurrogate("softplus", beta=-2.0),
        lambda: ReluSurrogate("softplus", beta=math.inf),
        lambda: as_relu_surrogate(3),  # type: ignore[arg-type]
    ):
        with pytest.raises(InputError):
            bad()
    with pytest.raises(InputError):
        with relu_surrogate("bogus"):
            pass
    assert mode_depth() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_forward_value_is_exactly_relu(kind: str) -> None:
    z = torch.cat([GRID.float(), torch.randn(2000, generator=torch.Generator().manual_seed(0)) * 3])
    z = z.requires_grad_(True)
    expected = torch.relu(z.detach())
    with relu_surrogate(kind):
        for out in (F.relu(z), torch.relu(z), z.relu(), nn.ReLU()(z), F.relu(z * 1, inplace=True)):
            assert torch.equal(out, expected)
    assert torch.equal(ReluSurrogate(kind)(z), expected)


@pytest.mark.parametrize("kind", KINDS)
def test_first_and_second_derivatives_match_closed_forms(kind: str) -> None:
    first_expected, second_expected = closed_forms(kind, GRID)
    spec = ReluSurrogate(kind, tau=TAU, beta=BETA)
    with relu_surrogate(spec):
        first, second = derivatives(GRID, torch.relu)
    torch.testing.assert_close(first, first_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, second_expected, rtol=1e-9, atol=1e-12)
    # the same function, used directly, without the context
    first, second = derivatives(GRID, spec)
    torch.testing.assert_close(first, first_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, second_expected, rtol=1e-9, atol=1e-12)


def test_h_matches_the_paper_at_zero_and_far_away() -> None:
    first, second = closed_forms("h", torch.tensor([0.0, -1e-12, 1e3, -1e3], dtype=torch.float64))
    assert first[0] == 0.0 and first[1] == pytest.approx(1.0)  # the z ≥ 0 branch at 0
    assert second[0] == pytest.approx(1 / math.sqrt(TAU))  # τ / τ^{3/2}
    with relu_surrogate("h"):
        got, _ = derivatives(torch.tensor([0.0, 1e3, -1e3], dtype=torch.float64), torch.relu)
    assert got[0] == 0.0 and got[1] == pytest.approx(1.0) and got[2] == pytest.approx(0.0, abs=1e-10)


# ---------------------------------------------------------------- every ReLU call form

CALL_FORMS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    # name: (call, modifies its argument in place)
    "nn.ReLU": (nn.ReLU(), False),
    "nn.ReLU(inplace)": (nn.ReLU(inplace=True), True),
    "F.relu": (F.relu, False),
    "F.relu(inplace)": (lambda t: F.relu(t, inplace=True), True),
    "F.relu_": (F.relu_, True),
    "torch.relu": (torch.relu, False),
    "torch.relu_": (torch.relu_, True),
    "Tensor.relu": (torch.Tensor.relu, False),
    "Tensor.relu_": (torch.Tensor.relu_, True),
}


@pytest.mark.parametrize("form", list(CALL_FORMS))
def test_every_relu_call_form_is_reached(form: str) -> None:
    call, inplace = CALL_FORMS[form]
    z = GRID.clone().requires_grad_(True)
    first_expected, second_expected = closed_forms("h", GRID)
    with relu_surrogate("h"):
        y = z * 1.0  # a non-leaf, as activations are
        out = call(y)
        assert torch.equal(out, torch.relu(GRID))
        if inplace:
            assert out is y and torch.equal(y, torch.relu(GRID)), "the argument was not updated"
        else:
            assert torch.equal(y, GRID), "an out-of-place call modified its argument"
        (first,) = torch.autograd.grad(out.sum(), z, create_graph=True)
        (second,) = torch.autograd.grad(first.sum(), z)
    torch.testing.assert_close(first.detach(), first_expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(second, second_expected, rtol=1e-9, atol=1e-12)


def test_inplace_on_a_leaf_fails_like_torch() -> None:
    leaf = torch.randn(4, requires_grad=True)
    with pytest.raises(RuntimeError, match="leaf"):
        torch.relu_(leaf)
    with relu_surrogate("h"), pytest.raises(RuntimeError, match="leaf"):
        torch.relu_(leaf)
    assert mode_depth() == 0


def test_without_gradient_relu_is_untouched_and_inplace_still_works() -> None:
    z = torch.randn(50, dtype=torch.float64)
    with relu_surrogate("h"):
        y = z.clone()
        assert torch.Tensor.relu_(y) is y and torch.equal(y, torch.relu(z))
        with torch.no_grad():
            w = z.clone().requires_grad_(True) * 1
            F.relu(w, inplace=True)
            assert torch.equal(w, torch.relu(z)) and w.grad_fn is None


def test_one_inplace_module_reused_twice_gets_the_surrogate_everywhere() -> None:
    """torchvision's BasicBlock calls one ``nn.ReLU(inplace=True)`` twice."""
    gen = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((6, 4), (3, 6), (3, 4)))
    x0 = torch.randn(4, generator=gen, dtype=torch.float64)
    relu = nn.ReLU(inplace=True)
    spec = ReluSurrogate("h")

    def f(x: torch.Tensor, act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        hidden = act(w1 @ x)
        out = w2 @ hidden
        out += w3 @ x  # an in-place add, as ``out += identity``
        return act(out).sum()

    def grad_and_hvp(act: Callable[[torch.Tensor], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x = x0.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(f(x, act), x, create_graph=True)
        (hvp,) = torch.autograd.grad(g.pow(2).sum(), x)
        return g.detach(), hvp

    with relu_surrogate(spec):
        g, hvp = grad_and_hvp(relu)
    g_ref, hvp_ref = grad_and_hvp(spec)  # the explicit straight-through function
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(hvp, hvp_ref, rtol=1e-10, atol=1e-12)
    assert hvp.abs().sum() > 0
    _, hvp_true = grad_and_hvp(relu)
    assert torch.equal(hvp_true, torch.zeros_like(hvp_true))


# ---------------------------------------------------------------- scoping


def first_derivative_at(z: float) -> float:
    t = torch.tensor([z], dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(t).sum(), t)
    return float(g)


def test_contexts_nest_innermost_wins_and_reentry_is_safe() -> None:
    z = -0.5
    h_value = 1 + z / math.sqrt(z * z + TAU)
    sigmoid_value = 1 / (1 + math.exp(-z))
    spec = ReluSurrogate("h")
    base = mode_depth()
    with relu_surrogate(spec):
        assert first_derivative_at(z) == pytest.approx(h_value, rel=1e-12)
        with relu_surrogate("none"):
            assert first_derivative_at(z) == 0.0
        with relu_surrogate("sigmoid"):
            assert first_derivative_at(z) == pytest.approx(sigmoid_value, rel=1e-12)
        with relu_surrogate(spec):  # the same object re-entered
            assert first_derivative_at(z) == pytest.approx(h_value, rel=1e-12)
        assert first_derivative_at(z) == pytest.approx(h_value, rel=1e-12)
        assert mode_depth() == base + 1
    assert mode_depth() == base
    assert first_derivative_at(z) == 0.0 and first_derivative_at(0.5) == 1.0


def test_no_mode_survives_an_exception() -> None:
    base = mode_depth()
    with pytest.raises(ZeroDivisionError):
        with relu_surrogate("h"):
            with relu_surrogate("sigmoid"):
                assert first_derivative_at(-0.5) > 0
                raise ZeroDivisionError
    assert mode_depth() == base
    assert first_derivative_at(-0.5) == 0.0 and first_derivative_at(0.5) == 1.0
    _, second = derivatives(GRID, torch.relu)
    assert torch.equal(second, torch.zeros_like(second))  # a true ReLU again: no curvature


# ---------------------------------------------------------------- real networks


class SmallNet(nn.Module):
    """Conv net mixing every construct: a reused in-place ReLU module, a functional in-place ReLU,
    ``torch.relu``, ``Tensor.relu_``, max pooling and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1)
        self.conv3 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv1(x))
        out = self.conv2(x)
        out += x
        x = F.max_pool2d(self.relu(out), 2)
        x = F.relu(self.conv3(x), inplace=True)
        x = (torch.relu(x * 1.5) - 0.1).relu_()
        return self.fc(x.mean((2, 3)))


def grad_map_loss_gradient(model: nn.Module, x0: torch.Tensor, kind: str | None) -> torch.Tensor:
    """∇_x of an MSE between a GRAD map (|∂z_c/∂x|, max over channels, min-max) and a fixed map."""
    x = x0.clone().requires_grad_(True)

    def run() -> torch.Tensor:
        (g,) = torch.autograd.grad(model(x)[:, 1].sum(), x, create_graph=True)
        maps = g.abs().amax(1).flatten(1)
        low, high = maps.min(1, keepdim=True).values, maps.max(1, keepdim=True).values
        maps = (maps - low) / (high - low + 1e-12)
        return (maps - 0.5).pow(2).sum()

    if kind is None:
        loss = run()
    else:
        with relu_surrogate(kind):
            loss = run()
    (grad,) = torch.autograd.grad(loss, x)
    return grad


def frozen(model: nn.Module) -> nn.Module:
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def torchvision_models() -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = import_torchvision()
    torch.manual_seed(0)
    return {
        "resnet18": frozen(tv.models.resnet18(num_classes=5)),
        "densenet121": frozen(tv.models.densenet121(num_classes=5)),
    }


def test_second_order_signal_exists_only_with_the_surrogate_small_net() -> None:
    torch.manual_seed(0)
    model = frozen(SmallNet())
    x = torch.rand(2, 3, 16, 16)
    for kind in (None, "none"):
        grad = grad_map_loss_gradient(model, x, kind)
        assert torch.equal(grad, torch.zeros_like(grad)), "a ReLU network is piecewise linear"
    for kind in ("h", "sigmoid", "softplus"):
        grad = grad_map_loss_gradient(model, x, kind)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_second_order_signal_on_torchvision_models(torchvision_models: dict[str, nn.Module], arch: str) -> None:
    model = torchvision_models[arch]
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    grad = grad_map_loss_gradient(model, x, "none")
    assert torch.equal(grad, torch.zeros_like(grad))
    grad = grad_map_loss_gradient(model, x, "h")
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


class Explicit(nn.Module):
    """Test reference: a module applying the straight-through surrogate explicitly."""

    def __init__(self, spec: ReluSurrogate) -> None:
        super().__init__()
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec(x)


def explicit_reference(model: nn.Module, spec: ReluSurrogate) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of ``model`` whose every ReLU (modules and DenseNet's final functional one) is the
    explicit surrogate — no torch function mode involved."""
    ref = copy.deepcopy(model)
    for name, module in list(ref.named_modules()):
        if isinstance(module, nn.ReLU):
            parent = ref.get_submodule(name.rpartition(".")[0]) if "." in name else ref
            setattr(parent, name.rpartition(".")[2], Explicit(spec))
    if hasattr(ref, "features"):  # torchvision DenseNet.forward: F.relu(features, inplace=True)

        def forward(x: torch.Tensor) -> torch.Tensor:
            out = F.adaptive_avg_pool2d(spec(ref.features(x)), (1, 1))
            return ref.classifier(torch.flatten(out, 1))

        return forward
    return ref


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_every_relu_of_torchvision_models_is_reached(torchvision_models: dict[str, nn.Module], arch: str) -> None:
    """Under the sigmoid surrogate the input gradient must equal that of a copy whose ReLUs were
    all replaced by hand: a single missed ReLU (module, reused module or functional) differs."""
    model = torchvision_models[arch]
    spec = ReluSurrogate("sigmoid")
    x0 = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))

    def input_gradient(f: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        x = x0.clone().requires_grad_(True)
        logits = f(x)
        (g,) = torch.autograd.grad(logits[:, 0].sum(), x)
        return logits.detach(), g

    with relu_surrogate(spec):
        logits, grad = input_gradient(model)
    logits_ref, grad_ref = input_gradient(explicit_reference(model, spec))
    logits_true, grad_true = input_gradient(model)
    assert torch.equal(logits, logits_true), "the forward pass must stay exactly the model's"
    torch.testing.assert_close(logits_ref, logits_true, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-4, atol=1e-6 * float(grad_ref.abs().max()))
    assert (grad - grad_true).abs().max() > 0.05 * grad_true.abs().max()


@pytest.mark.parametrize("mode", ["h", "softplus_beta"])
def test_an_inplace_relu_after_batchnorm_sends_the_channels_last_gradient_back_unchanged(mode: str) -> None:
    """The in-place result is written into the argument without copy_'s zero gradient to the old
    value (summed with the real one it came back contiguous, and BatchNorm's backward then took
    its slow path): the gradient reaching BatchNorm keeps the channels-last layout, and the first
    and second derivatives equal the out-of-place network's exactly."""
    from underfire.smoothing import softplus_relus

    torch.manual_seed(0)

    def net(inplace: bool) -> nn.Module:
        return (
            nn.Sequential(
                nn.Conv2d(3, 8, 3, padding=1),
                nn.BatchNorm2d(8),
                nn.ReLU(inplace=inplace),
                nn.Conv2d(8, 4, 3, padding=1),
                nn.ReLU(inplace=inplace),
                nn.AdaptiveAvgPool2d(1),
                nn.Flatten(),
            )
            .double()
            .eval()
            .to(memory_format=torch.channels_last)
        )

    inplace, plain = net(True), net(False)
    plain.load_state_dict(inplace.state_dict())
    with torch.no_grad():
        inplace[1].running_mean.uniform_(-0.5, 0.5)
        plain[1].running_mean.copy_(inplace[1].running_mean)
    layouts: list[bool] = []

    def watch(
        _module: nn.Module, _args: tuple, out: torch.Tensor
    ) -> None:  # BatchNorm's output, before the ReLU overwrites it
        out.register_hook(lambda g: layouts.append(g.is_contiguous(memory_format=torch.channels_last)))

    inplace[1].register_forward_hook(watch)
    context = (lambda: relu_surrogate("h")) if mode == "h" else (lambda: softplus_relus(3.0))
    x0 = torch.rand(2, 3, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    results = []
    for model in (inplace, plain):
        x = x0.clone().contiguous(memory_format=torch.channels_last).requires_grad_(True)
        with context():
            (g,) = torch.autograd.grad(model(x)[:, 1].sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.abs().sum(), x)
        results.append((g.detach(), gg))
    assert layouts and all(layouts)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=0)
    assert results[0][1].abs().sum() > 0
