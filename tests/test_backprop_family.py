"""Gradient × Input, Integrated Gradients, DeepLIFT and LRP: hand-computed values on tiny nets,
completeness and conservation, the exactness of their ADV² gradients (finite differences), state
hygiene, and captum / zennit as oracles on the built-in models and on torchvision's at 224 px."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import underfire as uf
from underfire.errors import InputError, ModelStructureError
from underfire.interpreters import DeepLift, InputXGrad, IntegratedGradients, Lrp, build_interpreter, normalize_maps
from underfire.models.torchvision_compat import import_torchvision

NEW = ("inputxgrad", "ig", "deeplift", "lrp")


def maps_of(attribution: torch.Tensor) -> torch.Tensor:
    """GRAD's convention, written out: |a| max over channels, per-image min-max."""
    return normalize_maps(attribution.abs().amax(1, keepdim=True))


class TinyResidual(nn.Module):
    """x (2 pixels) → h = relu(W1 x + b1) → r = h + relu(W2 h + b2) → W3 r + b3 (2 classes)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
        with torch.no_grad():
            self.fc1.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 1.0]]))
            self.fc1.bias.copy_(torch.tensor([0.1, -0.2]))
            self.fc2.weight.copy_(torch.tensor([[-1.0, 1.5], [2.0, 0.5]]))
            self.fc2.bias.copy_(torch.tensor([0.3, -0.1]))
            self.fc3.weight.copy_(torch.tensor([[1.0, 2.0], [-1.0, 0.5]]))
            self.fc3.bias.copy_(torch.tensor([0.05, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x.flatten(1)))
        r = h + torch.relu(self.fc2(h))
        return self.fc3(r)


def tiny() -> uf.Classifier:
    net = TinyResidual().double().eval()
    return uf.Classifier(net, mean=(0.0,), std=(1.0,), num_classes=2, in_channels=1, channels_last=False).double()


def tiny_weights() -> list[np.ndarray]:
    net = TinyResidual()
    return [
        p.detach().double().numpy()
        for p in (net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias, net.fc3.weight, net.fc3.bias)
    ]


X = torch.tensor([[[[0.9, 0.2]]], [[[0.3, 0.8]]]], dtype=torch.double)


# --- hand-computed values -----------------------------------------------------------------------


def test_deeplift_rescale_matches_the_hand_computed_multipliers() -> None:
    """Multipliers of the Rescale rule by plain NumPy: secants Δa/Δz of both ReLUs, chain rule."""
    w1, b1, w2, b2, w3, _ = tiny_weights()
    deeplift = DeepLift(tiny(), baseline=torch.full((1, 1, 2), 0.5, dtype=torch.double))
    got = deeplift.attribute(X, torch.tensor([0, 1]))
    for i, c in enumerate((0, 1)):
        x, ref = X[i].flatten().numpy(), np.full(2, 0.5)
        z1, z1r = w1 @ x + b1, w1 @ ref + b1
        h, hr = np.maximum(z1, 0), np.maximum(z1r, 0)
        m1 = np.where(np.abs(z1 - z1r) > 1e-7, (h - hr) / np.where(z1 == z1r, 1, z1 - z1r), z1 > 0)
        z2, z2r = w2 @ h + b2, w2 @ hr + b2
        m2 = np.where(
            np.abs(z2 - z2r) > 1e-7, (np.maximum(z2, 0) - np.maximum(z2r, 0)) / np.where(z2 == z2r, 1, z2 - z2r), z2 > 0
        )
        # d out_c / d h through the residual: identity + W2ᵀ diag(m2); then W1ᵀ diag(m1)
        through_h = w3[c] @ (np.eye(2) + np.diag(m2) @ w2)
        multiplier = w1.T @ (m1 * through_h)
        expected = (x - ref) * multiplier
        np.testing.assert_allclose(got[i].flatten().numpy(), expected, rtol=1e-10, atol=1e-12)
        # summation-to-delta: Σ attribution = f_c(x) − f_c(x̄)
        out = w3 @ (h + np.maximum(z2, 0)) - w3 @ (hr + np.maximum(z2r, 0))
        assert abs(expected.sum() - out[c]) < 1e-10


def test_lrp_epsilon_matches_hand_computed_relevances() -> None:
    """LRP-ε by plain NumPy on the residual net: ε rule at each linear layer, the residual sum
    split in proportion to its two inputs, relevance at the output = the logit."""
    w1, b1, w2, b2, w3, b3 = tiny_weights()
    eps = 1e-3
    stab = lambda z: z + eps * np.where(z >= 0, 1.0, -1.0)  # noqa: E731
    got = Lrp(tiny(), rule="epsilon", epsilon=eps).attribute(X, torch.tensor([0, 1]))
    for i, c in enumerate((0, 1)):
        x = X[i].flatten().numpy()
        h = np.maximum(w1 @ x + b1, 0)
        u = np.maximum(w2 @ h + b2, 0)
        r = h + u
        out = w3 @ r + b3
        relevance_out = np.zeros(2)
        relevance_out[c] = out[c]
        rel_r = r * (w3.T @ (relevance_out / stab(out)))
        rel_h_direct = h * rel_r / stab(h + u)
        rel_u = u * rel_r / stab(h + u)
        rel_h = rel_h_direct + h * (w2.T @ (rel_u / stab(w2 @ h + b2)))
        expected = x * (w1.T @ (rel_h / stab(w1 @ x + b1)))
        np.testing.assert_allclose(got[i].flatten().numpy(), expected, rtol=1e-9, atol=1e-12)


def test_lrp_zplus_and_alphabeta_match_hand_computed_relevances() -> None:
    """One layer, signed inputs: z⁺ takes (a w)⁺ shares (positive bias in the denominator); αβ
    subtracts β times the negative shares."""
    torch.manual_seed(0)
    layer = nn.Linear(3, 2).double()
    net = nn.Sequential(nn.Flatten(), layer).eval()
    clf = uf.Classifier(net, mean=(0.5,), std=(0.5,), num_classes=2, in_channels=1, channels_last=False).double()
    image = torch.rand(1, 1, 1, 3, dtype=torch.double)
    a = ((image - 0.5) / 0.5).flatten().numpy()
    w, b = layer.weight.detach().numpy(), layer.bias.detach().numpy()
    out = w @ a + b
    for rule, alpha in (("zplus", 2.0), ("alphabeta", 2.0), ("alphabeta", 1.5)):
        got = Lrp(clf, rule=rule, alpha=alpha, epsilon=1e-9).attribute(image, torch.tensor([1]))
        contributions = a * w[1]
        up = contributions.clip(min=0)
        expected = up / (up.sum() + max(b[1], 0)) * out[1]
        if rule == "alphabeta":
            down = contributions.clip(max=0)
            expected = alpha * expected - (alpha - 1) * down / (down.sum() + min(b[1], 0)) * out[1]
        np.testing.assert_allclose(got.flatten().numpy(), expected, rtol=1e-7)


def test_inputxgrad_and_ig_are_exact_on_a_linear_model() -> None:
    """f(x) = w·x: x ⊙ w for Gradient × Input, (x − x̄) ⊙ w for IG at any number of steps."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3)).double().eval()
    clf = uf.Classifier(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=3, channels_last=False).double()
    images = torch.rand(2, 3, 2, 2, dtype=torch.double)
    w = net[1].weight.detach().view(3, 3, 2, 2)
    classes = torch.tensor([2, 0])
    np.testing.assert_allclose(InputXGrad(clf).attribute(images, classes), images * w[classes], rtol=1e-12)
    for method in ("gausslegendre", "trapezoid"):
        ig = IntegratedGradients(clf, steps=3, method=method, chunk=2)
        np.testing.assert_allclose(ig.attribute(images, classes), images * w[classes], rtol=1e-12)


# --- completeness, conservation, summation-to-delta on the built-in models -----------------------


@pytest.fixture(scope="module")
def shapes() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels, _ = uf.ShapesDataset("test").tensors(range(4))
    return images, labels


def test_deeplift_sums_to_delta_on_the_builtin_resnet(shapes) -> None:
    """The built-in ResNet has no max pooling: Rescale's summation-to-delta holds exactly."""
    model = uf.load_model("shapes-resnet")
    images, labels = shapes
    with model.frozen():
        _, delta = DeepLift(model).attribute_with_delta(model.prepare_images(images), labels)
    logits = model.predict(images).gather(1, labels.view(-1, 1))
    assert (delta.abs() < 1e-4 * logits.abs().squeeze(1)).all(), delta


def test_ig_completeness_error_shrinks_with_steps(shapes) -> None:
    model = uf.load_model("shapes-resnet")
    images, labels = shapes
    errors = []
    with model.frozen():
        for steps in (4, 64):
            _, delta = IntegratedGradients(model, steps=steps, chunk=16).attribute_with_delta(
                model.prepare_images(images), labels
            )
            errors.append(delta.abs().mean().item())
    scale = model.predict(images).gather(1, labels.view(-1, 1)).abs().mean().item()
    assert errors[1] < errors[0] and errors[1] < 0.02 * scale, (errors, scale)


def test_lrp_conserves_relevance_without_biases() -> None:
    """LRP-ε with zero biases and a tiny ε: Σ R = f_c(x) through convolutions, a residual sum and
    average pooling."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.Conv2d(4, 4, 3, padding=1, bias=False)
            self.fc = nn.Linear(4, 3, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c1(x))
            h = h + torch.relu(self.c2(h))
            return self.fc(nn.functional.adaptive_avg_pool2d(h, 1).flatten(1))

    torch.manual_seed(0)
    clf = uf.Classifier(Net().double().eval(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=3).double()
    images = torch.rand(3, 3, 8, 8, dtype=torch.double)
    classes = torch.tensor([0, 1, 2])
    relevance = Lrp(clf, rule="epsilon", epsilon=1e-9).attribute(images, classes)
    logits = clf.predict(images).gather(1, classes.view(-1, 1)).squeeze(1)
    np.testing.assert_allclose(relevance.flatten(1).sum(1), logits, rtol=1e-6)


# --- the ADV² surrogate: exact forward, exact derivative ----------------------------------------


class SmallNet(nn.Module):
    """conv → BN → ReLU, a residual block with BN, max pooling, average pooling, linear."""

    def __init__(self, activation: type[nn.Module] = nn.ReLU) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.b2 = nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)
        self.act = activation()
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(4, 3)
        for bn in (self.b1, self.b2):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
            bn.bias.data.uniform_(-0.3, 0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.b1(self.c1(x)))
        out = self.b2(self.c2(h))
        out += h
        out = self.pool(self.act(out))
        return self.fc(out.mean((2, 3)))


def small(activation: type[nn.Module] = nn.ReLU) -> uf.Classifier:
    torch.manual_seed(0)
    return uf.Classifier(
        SmallNet(activation).double().eval(), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), num_classes=3
    ).double()


@pytest.mark.parametrize(
    "make",
    [
        lambda m: DeepLift(m, relu="none"),
        lambda m: DeepLift(m, relu="none", baseline="blur", baseline_sigma=1.0),
        lambda m: Lrp(m, relu="none"),
        lambda m: Lrp(m, rule="alphabeta", relu="none"),
        lambda m: InputXGrad(m, relu="none"),
    ],
    ids=["deeplift", "deeplift-blur", "lrp", "lrp-alphabeta", "inputxgrad"],
)
def test_the_differentiable_attribution_has_the_exact_derivative(make) -> None:
    """With the true ReLU derivative, autograd's derivative of the rule-based attribution equals
    finite differences: the twin rules do not leak into the second-order pass."""
    model = small()
    interpreter = make(model)
    images = torch.rand(2, 3, 6, 6, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    classes = torch.tensor([0, 2])
    with model.frozen(), torch.enable_grad():
        assert torch.autograd.gradcheck(
            lambda x: interpreter._attribution(x, classes, None, True),
            (images.requires_grad_(True),),
            eps=1e-6,
            atol=1e-5,
        )


@pytest.mark.parametrize("chunk", [2, 5], ids=["recomputed", "one-chunk"])
def test_ig_backward_equals_finite_differences(chunk: int) -> None:
    """A smooth model (softplus), so IG's attribution has a true second derivative: the
    chunk-by-chunk recomputed backward (5 nodes, 2 per chunk) and the one-chunk graph must both
    equal finite differences."""
    model = small(nn.Softplus)
    ig = IntegratedGradients(model, steps=5, chunk=chunk, baseline="blur", baseline_sigma=1.0)
    images = torch.rand(2, 3, 6, 6, dtype=torch.double, generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([1, 0])
    with model.frozen(), torch.enable_grad():
        assert torch.autograd.gradcheck(
            lambda x: ig._attribution(x, classes, None, True), (images.requires_grad_(True),), eps=1e-6, atol=1e-5
        )


@pytest.mark.parametrize("name", NEW)
def test_surrogate_keeps_the_benign_map_and_has_an_input_gradient(name: str, shapes) -> None:
    model = uf.load_model("shapes-densenet")
    images, labels = shapes
    interpreter = build_interpreter(name, model, **({"steps": 4} if name == "ig" else {}))
    benign = interpreter(images, labels)
    with model.frozen():
        x = model.prepare_images(images).requires_grad_(True)
        maps, _ = interpreter.surrogate(x, labels)
        (gradient,) = torch.autograd.grad(((maps - torch.rand_like(maps)) ** 2).mean(), x)
    if name in ("deeplift", "lrp"):  # the rules run on twins: the first-order pass stays exact
        assert torch.allclose(maps.detach(), benign, atol=1e-5)
    else:  # a gradient through the smoothed ReLU derivative: close to the exact one, not equal
        assert (maps.detach() - benign).abs().mean() < 0.05
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


@pytest.mark.parametrize("name", NEW)
def test_batched_equals_per_sample_and_the_model_is_left_as_it_was(name: str, shapes) -> None:
    model = uf.load_model("shapes-resnet")
    model.model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    images, labels = shapes
    interpreter = build_interpreter(name, model, **({"steps": 4} if name == "ig" else {}))
    with pytest.warns(UserWarning, match="training mode"):
        batched = interpreter.attribute(images, labels)
    with pytest.warns(UserWarning, match="training mode"):
        single = torch.cat([interpreter.attribute(images[i : i + 1], labels[i : i + 1]) for i in range(len(images))])
    assert torch.allclose(batched, single, atol=1e-5, rtol=1e-4)
    assert model.model.training and all(m.training for m in model.model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert [p.requires_grad for p in model.parameters()] == flags


def test_an_operation_without_a_rule_is_a_one_line_error_and_leaves_no_mode() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GELU(), nn.Flatten(), nn.LazyLinear(2))
    net(torch.rand(1, 3, 8, 8))
    model = uf.Classifier(net.eval(), num_classes=2)
    for interpreter in (DeepLift(model), Lrp(model)):
        with pytest.raises(ModelStructureError, match="no rule for gelu") as error:
            interpreter(torch.rand(2, 3, 8, 8), torch.tensor([0, 1]))
        assert "\n" not in str(error.value)
        assert not _get_current_function_mode_stack()
    assert InputXGrad(model)(torch.rand(2, 3, 8, 8), torch.tensor([0, 1])).shape == (2, 1, 8, 8)


def test_options_are_checked() -> None:
    model = small()
    for make, message in (
        (lambda: Lrp(model, rule="gamma"), "unknown LRP rule"),
        (lambda: Lrp(model, alpha=0.5), "alpha must be"),
        (lambda: Lrp(model, epsilon=0.0), "epsilon must be"),
        (lambda: IntegratedGradients(model, steps=0), "steps must be"),
        (lambda: IntegratedGradients(model, method="simpson"), "unknown quadrature"),
        (lambda: DeepLift(model, baseline="white"), "unknown baseline"),
        (lambda: DeepLift(model, baseline_sigma=-1.0), "baseline_sigma"),
        (lambda: DeepLift(model, baseline=torch.full((3, 4, 4), float("nan"))), "NaN"),
    ):
        with pytest.raises(InputError, match=message):
            make()
    with pytest.raises(InputError, match="baseline has shape"):
        DeepLift(model, baseline=torch.zeros(3, 5, 5))(torch.rand(1, 3, 6, 6), torch.tensor([0]))
    assert build_interpreter("ig", model, steps="4", baseline="blur").steps == 4


# --- oracles --------------------------------------------------------------------------------------


def _zennit_lrp(model: uf.Classifier, network: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    from zennit.attribution import Gradient
    from zennit.composites import EpsilonPlusFlat
    from zennit.rules import Norm

    from benchmarks.peer_models import zennit_canonizers

    # zennit's AvgPool rule covers AvgPool modules; the copies' global pooling is adaptive.
    composite = EpsilonPlusFlat(canonizers=zennit_canonizers(network), layer_map=[(nn.AdaptiveAvgPool2d, Norm())])
    inputs = model.normalize(images).clone().requires_grad_(True)
    with Gradient(model=network, composite=composite) as attributor:
        logits = network(inputs)
        _, relevance = attributor(inputs, torch.eye(logits.shape[1], dtype=logits.dtype)[classes] * logits.detach())
    return relevance


def _peer_copy(model: uf.Classifier) -> uf.Classifier:
    from benchmarks.peer_models import captum_ready

    peer = uf.Classifier(
        captum_ready(model.model), mean=model.mean.flatten().tolist(), std=model.std.flatten().tolist()
    )
    return peer.to(model.mean.dtype).eval()


@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-densenet"])
def test_agreement_with_captum_and_zennit_on_the_builtin_models(name: str, shapes) -> None:
    """captum's InputXGradient, IntegratedGradients (Gauss–Legendre, 32 steps) and DeepLift, and
    zennit's EpsilonPlusFlat with BatchNorm merged and the residual sum as a module.

    DenseNet's LRP is compared in float64: its transitions average signed convolution outputs,
    whose near-zero denominators make float32 LRP (ours and zennit's alike) differ from the
    float64 value by up to 2 % of the map; in float64 both agree (1e-10 measured once; 1e-7 asserted).
    """
    from captum.attr import DeepLift as CaptumDeepLift
    from captum.attr import InputXGradient
    from captum.attr import IntegratedGradients as CaptumIG

    images, labels = shapes
    model = uf.load_model(name)
    peer = _peer_copy(model)
    assert torch.allclose(peer(images), model(images), atol=1e-5)
    ours = {n: build_interpreter(n, model).attribute(images, labels) for n in ("inputxgrad", "ig", "deeplift")}
    theirs = {
        "inputxgrad": InputXGradient(peer).attribute(images.clone().requires_grad_(True), target=labels),
        "ig": CaptumIG(peer).attribute(images.clone(), target=labels, n_steps=32, internal_batch_size=64),
        "deeplift": CaptumDeepLift(peer).attribute(images.clone().requires_grad_(True), target=labels),
    }
    for method in ours:
        assert (maps_of(ours[method]) - maps_of(theirs[method])).abs().max() < 5e-4, method
    dtype = torch.float64 if name == "shapes-densenet" else torch.float32
    model, peer = model.to(dtype), peer.to(dtype)
    x = images.to(dtype)
    lrp = build_interpreter("lrp", model).attribute(x, labels)
    difference = (maps_of(lrp) - maps_of(_zennit_lrp(peer, peer.model, x, labels))).abs().max()
    assert difference < (1e-7 if dtype == torch.float64 else 1e-4), difference


def test_lrp_epsilon_agrees_with_captum_lrp_on_a_plain_stack() -> None:
    """captum's LRP (ε everywhere) on conv-ReLU-maxpool-conv-ReLU-avgpool-linear. (On the built-in
    models it applies ε to every BatchNorm instead of merging it, so zennit is the oracle there.)"""
    from captum.attr import LRP

    class Stack(nn.Module):  # captum's LRP hooks modules; the reshape is functional, as in its tests
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.r1, self.p1 = nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)
            self.c2, self.r2, self.p2 = nn.Conv2d(6, 6, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(6, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.p2(self.r2(self.c2(self.p1(self.r1(self.c1(x)))))).view(x.shape[0], -1))

    torch.manual_seed(0)
    net = Stack().double().eval()
    model = uf.Classifier(net, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), num_classes=4).double()
    images = torch.rand(3, 3, 8, 8, dtype=torch.double)
    classes = torch.tensor([0, 3, 1])
    ours = Lrp(model, rule="epsilon", epsilon=1e-9).attribute(images, classes)
    theirs = LRP(net).attribute(images.clone().requires_grad_(True), target=classes)
    np.testing.assert_allclose(ours, theirs.detach(), rtol=1e-6, atol=1e-8)  # ε = 1e-9 on both sides


def test_deeplift_max_pooling_follows_the_gradient_rule_not_captums() -> None:
    """max(x₁, x₂) with x = (0.9, 0.3), x̄ = (0, 0.6): the gradient rule gives the multiplier to
    the input's maximum: attributions (0.9, 0). captum rescales by Δout/Δin and spreads Δout = 0.3
    over both inputs; we pin the gradient rule."""
    from captum.attr import DeepLift as CaptumDeepLift

    net = nn.Sequential(nn.MaxPool2d((1, 2)), nn.Flatten(), nn.Linear(1, 2, bias=False)).double().eval()
    with torch.no_grad():
        net[2].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    model = uf.Classifier(net, mean=(0.0,), std=(1.0,), num_classes=2, in_channels=1, channels_last=False).double()
    image = torch.tensor([[[[0.9, 0.3]]]], dtype=torch.double)
    reference = torch.tensor([[[[0.0, 0.6]]]], dtype=torch.double)
    ours = DeepLift(model, baseline=reference[0]).attribute(image, torch.tensor([0]))
    assert ours.flatten().tolist() == [0.9, 0.0]
    theirs = CaptumDeepLift(net).attribute(image.clone().requires_grad_(True), baselines=reference, target=0)
    assert not torch.allclose(theirs, ours)
    assert abs(theirs.sum().item() - 0.3) < 1e-9  # captum's rule conserves Δout = 0.9 − 0.6 here


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_agreement_with_captum_and_zennit_on_torchvision_at_224(arch: str) -> None:
    """Randomly initialised torchvision models (no download): DeepLift against captum's (black
    baseline), LRP against zennit's EpsilonPlusFlat with its ResNet canonizer / the DenseNet's
    true BatchNorm pairs; maps agree to 1e-4 (float32)."""
    from captum.attr import DeepLift as CaptumDeepLift

    tv = import_torchvision()
    torch.manual_seed(0)
    net = getattr(tv.models, arch)(num_classes=10).eval()
    model = uf.Classifier(net, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=10)
    peer = _peer_copy(model)
    images = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([1, 7])
    deeplift = build_interpreter("deeplift", model).attribute(images, classes)
    theirs = CaptumDeepLift(peer).attribute(images.clone().requires_grad_(True), target=classes)
    assert (maps_of(deeplift) - maps_of(theirs)).abs().max() < 1e-4
    # LRP in float64: at 224 px through 20 random layers, float32 rounding alone moves both
    # libraries' maps by up to 7e-4 on some CPUs (measured), more than the rules could differ by
    model, peer, x = model.to(torch.float64), peer.to(torch.float64), images.to(torch.float64)
    lrp = build_interpreter("lrp", model).attribute(x, classes)
    assert (maps_of(lrp) - maps_of(_zennit_lrp(peer, peer.model, x, classes))).abs().max() < 1e-7


# --- everything else follows: the CLI and runs -----------------------------------------------------


def test_a_run_attacks_the_family_and_measures_transfer(tmp_path) -> None:
    """One run config with all four (tiny budgets): rows for PGD and ADV² per interpreter, the
    transfer table, and the report reading it."""
    from typer.testing import CliRunner

    from underfire.cli import app

    config = tmp_path / "family.toml"
    config.write_text(
        '[experiment]\nname = "family"\nseed = 0\npreset = "quick"\nimages = 2\nbatch_size = 2\n'
        'models = ["shapes-resnet"]\ninterpreters = ["inputxgrad", "ig", "deeplift", "lrp"]\n'
        'attacks = ["pgd", "adv2"]\ntransfer = true\n'
        "[overrides]\npgd_steps = 2\nadv_steps = 2\n[interpreters.ig]\nsteps = 2\n"
    )
    runner = CliRunner()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["report", str(tmp_path / "run"), "--format", "json"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert {row["interpreter"] for row in report["summary"]} == set(NEW)
    cells = {
        (cell["source_interpreter"], cell["target_interpreter"])
        for cell in report["transfer"]
        if cell["attack"] == "adv2"
    }
    assert cells == {(a, b) for a in NEW for b in NEW}
    assert all(0 <= cell["iou"] <= 1 for cell in report["transfer"])


def test_an_in_place_change_the_rules_cannot_follow_is_refused() -> None:
    class Scales(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.fc = nn.Conv2d(3, 2, 3), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.conv(x))
            h *= 2.0
            return self.fc(h.mean((2, 3)))

    model = uf.Classifier(Scales().eval(), num_classes=2)
    with pytest.raises(ModelStructureError, match="in place"):
        Lrp(model)(torch.rand(1, 3, 8, 8), torch.tensor([0]))


def test_deeplift_refuses_a_model_that_runs_other_relus_on_its_baseline() -> None:
    """The baseline's ReLUs are recorded in a pass of their own and paired with the input's in
    call order: data-dependent control flow that changes them is one line, never a silent map."""

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.fc1(x.flatten(1)))
            if float(x.detach().sum()) > 0:  # the black baseline takes the other branch
                h = torch.relu(h - 0.1)
            return self.fc2(h)

    model = uf.Classifier(Branchy().eval(), mean=(0.0,), std=(1.0,), num_classes=2, in_channels=1, channels_last=False)
    with pytest.raises(ModelStructureError, match="different ReLUs to the baseline") as error:
        DeepLift(model)(torch.rand(1, 1, 2, 2) * 0.5 + 0.1, torch.tensor([0]))
    assert "\n" not in str(error.value)
    assert not _get_current_function_mode_stack()
    with pytest.raises(ModelStructureError, match="2 ReLUs to the baseline but 1"):
        DeepLift(model, baseline=torch.ones(1, 2, 2))(torch.zeros(1, 1, 2, 2), torch.tensor([0]))


def test_deeplift_records_the_baseline_before_a_later_in_place_change() -> None:
    """``h = relu(z); h += skip``: the baseline's recorded activation is a copy, so the secant
    uses relu(z̄), and summation-to-delta (exact without max pooling) holds."""

    class LateAdd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.skip, self.fc2 = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            flat = x.flatten(1)
            h = torch.relu(self.fc1(flat))
            h += self.skip(flat)
            return self.fc2(torch.relu(h))

    torch.manual_seed(0)
    net = LateAdd().double().eval()
    model = uf.Classifier(net, mean=(0.0,), std=(1.0,), num_classes=2, in_channels=1, channels_last=False).double()
    x = torch.rand(3, 1, 2, 2, dtype=torch.double)
    classes = torch.tensor([0, 1, 0])
    for baseline in (torch.full((1, 2, 2), 0.5, dtype=torch.double), "black"):
        with model.frozen():
            _, delta = DeepLift(model, baseline=baseline).attribute_with_delta(x, classes)
        assert delta.abs().max() < 1e-10
