"""GRAD (Simonyan et al. 2014) and SmoothGrad (Smilkov et al. 2017): plain-autograd references,
the differentiable surrogate the ADV² attack needs, state hygiene and captum as an oracle."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from underfire.errors import InputError
from underfire.interpreters.gradient import Grad, SmoothGrad
from underfire.models import IMAGENET_MEAN, IMAGENET_STD, Classifier, ShapesResNet
from underfire.models.torchvision_compat import import_torchvision
from underfire.smoothing import ReluSurrogate, relu_surrogate

SIZE = 32
CLASSES = 5


def make_classifier(seed: int = 0) -> Classifier:
    """A small ResNet (reused in-place ReLU, ``out += identity``, BatchNorm) at 32×32."""
    torch.manual_seed(seed)
    net = ShapesResNet(num_classes=CLASSES, widths=(8, 8, 8, 8, 16)).eval()
    # non-trivial BatchNorm statistics, so eval-mode BN is not the identity
    for module in net.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 1.5)
    return Classifier(net, IMAGENET_MEAN, IMAGENET_STD, input_size=SIZE, num_classes=CLASSES)


@pytest.fixture(scope="module")
def clf() -> Classifier:
    return make_classifier()


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.rand(3, 3, SIZE, SIZE, generator=gen), torch.tensor([0, 3, 1])


def minmax(maps: torch.Tensor) -> torch.Tensor:
    """Per-image min-max of (N, 1, h, w) maps, written out."""
    out = torch.empty_like(maps)
    for i, m in enumerate(maps):
        out[i] = (m - m.min()) / (m.max() - m.min())
    return out


def reference_gradients(clf: Classifier, images: torch.Tensor, classes: torch.Tensor, score: str) -> torch.Tensor:
    """The slow way: one plain ``backward`` per image, parameters frozen by hand."""
    grads = []
    with clf.frozen():
        for image, c in zip(images, classes.tolist()):
            x = image[None].clone().requires_grad_(True)
            logits = clf(x)
            value = logits[0, c] if score == "logit" else F.cross_entropy(logits, torch.tensor([c]))
            value.backward()
            grads.append(x.grad[0])
    return torch.stack(grads)


def reference_map(grads: torch.Tensor, pool: int = 1) -> torch.Tensor:
    maps = grads.abs().max(1, keepdim=True).values
    if pool > 1:
        maps = F.avg_pool2d(maps, pool)
    return minmax(maps)


# ---------------------------------------------------------------- GRAD against references


@pytest.mark.parametrize("score", ["logit", "ce"])
def test_grad_equals_plain_autograd_reference(clf: Classifier, batch, score: str) -> None:
    images, classes = batch
    maps = Grad(clf, score=score)(images, classes)
    expected = reference_map(reference_gradients(clf, images, classes, score))
    assert maps.shape == (3, 1, SIZE, SIZE)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)
    flat = maps.flatten(1)
    assert torch.all(flat.min(1).values == 0) and torch.allclose(flat.max(1).values, torch.ones(3))


def test_logit_and_ce_maps_differ(clf: Classifier, batch) -> None:
    images, classes = batch
    logit = Grad(clf, score="logit")(images, classes)
    ce = Grad(clf, score="ce")(images, classes)
    assert (logit - ce).abs().max() > 1e-3  # CE mixes in every class's gradient


def test_pooling(clf: Classifier, batch) -> None:
    images, classes = batch
    maps = Grad(clf, pool=4)(images, classes)
    assert maps.shape == (3, 1, SIZE // 4, SIZE // 4)
    expected = reference_map(reference_gradients(clf, images, classes, "logit"), pool=4)
    torch.testing.assert_close(maps, expected, rtol=1e-5, atol=1e-6)


def test_batched_maps_equal_per_sample_maps(clf: Classifier, batch) -> None:
    images, classes = batch
    for interpreter in (Grad(clf, score="ce", pool=2), SmoothGrad(clf, samples=3, noise=0.0)):
        batched = interpreter(images, classes)
        singles = torch.cat([interpreter(images[i : i + 1], int(classes[i])) for i in range(3)])
        torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-6)


def test_default_classes_are_the_predicted_ones(clf: Classifier, batch) -> None:
    images, _ = batch
    predicted = clf.predict(images).argmax(1)
    torch.testing.assert_close(Grad(clf)(images), Grad(clf)(images, predicted))


def test_explain_is_exact_even_inside_a_surrogate_context(clf: Classifier, batch) -> None:
    images, classes = batch
    plain = Grad(clf)(images, classes)
    with relu_surrogate("sigmoid"):
        inside = Grad(clf)(images, classes)
    torch.testing.assert_close(inside, plain, rtol=0, atol=0)


# ---------------------------------------------------------------- the differentiable surrogate


@pytest.mark.parametrize("make", [lambda c: Grad(c), lambda c: SmoothGrad(c, samples=4, noise=0.1)])
def test_surrogate_interpretation_loss_has_input_gradient(clf: Classifier, batch, make) -> None:
    """A zero second derivative or a detached map would make ADV² plain PGD: the map loss must reach the input, through the attack's iterate."""
    images, classes = batch
    interpreter = make(clf)
    target = torch.rand(3, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(5))
    with clf.frozen():
        delta = torch.zeros_like(images, requires_grad=True)
        torch.manual_seed(0)
        maps, state = interpreter.surrogate(images + delta, classes)
        assert state is None and maps.shape == (3, 1, SIZE, SIZE)
        assert maps.requires_grad and float(maps.detach().min()) >= 0 and float(maps.detach().max()) <= 1 + 1e-6
        (grad,) = torch.autograd.grad(F.mse_loss(maps, target), delta)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0
        # the same with the true ReLU derivative: a piecewise-linear net has no second-order signal
        interpreter.relu = ReluSurrogate("none")
        torch.manual_seed(0)
        maps, _ = interpreter.surrogate(images + delta, classes)
        (flat,) = torch.autograd.grad(F.mse_loss(maps, target), delta)
        assert torch.equal(flat, torch.zeros_like(flat))
    assert all(p.grad is None for p in clf.parameters())


def test_surrogate_maps_approximate_the_benign_maps(clf: Classifier, batch) -> None:
    """With the true ReLU the surrogate is the benign map; h (Zhang et al.) is closer to it than
    the sigmoid, and closer still with a smaller τ (h' differs from ReLU' only for |z| ≲ √τ)."""
    images, classes = batch
    benign = Grad(clf)(images, classes)

    def distance(relu: ReluSurrogate | str) -> float:
        with clf.frozen():
            maps, _ = Grad(clf, relu=relu).surrogate(images, classes)
        return float((maps.detach() - benign).abs().mean())

    assert distance("none") < 1e-6
    h, sharper, sigmoid = distance("h"), distance(ReluSurrogate("h", tau=1e-6)), distance("sigmoid")
    assert 0 < sharper < h < 0.05  # measured: 0.007 and 0.025
    assert sigmoid > 2 * h  # measured: 0.10


# ---------------------------------------------------------------- SmoothGrad


def test_smoothgrad_equals_reference_with_explicit_noise(clf: Classifier, batch) -> None:
    """Raw gradients averaged over the noisy copies, then |·|, max over channels (Smilkov et al.)."""
    images, classes = batch
    samples, noise = 4, 0.2
    maps = SmoothGrad(clf, samples=samples, noise=noise)(images, classes, seed=7)
    draws = torch.randn((3 * samples, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(7))
    noisy = images.repeat_interleave(samples, 0) + noise * draws
    grads = reference_gradients(clf, noisy, classes.repeat_interleave(samples), "logit")
    expected = reference_map(grads.view(3, samples, 3, SIZE, SIZE).mean(1))
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-5)


def test_smoothgrad_seeding_and_zero_noise(clf: Classifier, batch) -> None:
    images, classes = batch
    sg = SmoothGrad(clf, samples=3, noise=0.15, pool=2)
    first, again, other = sg(images, classes, seed=1), sg(images, classes, seed=1), sg(images, classes, seed=2)
    assert torch.equal(first, again)
    assert (first - other).abs().max() > 1e-3
    zero = SmoothGrad(clf, samples=3, noise=0.0, score="ce", pool=2)(images, classes, seed=1)
    torch.testing.assert_close(zero, Grad(clf, score="ce", pool=2)(images, classes), rtol=1e-5, atol=1e-6)


def test_smoothgrad_surrogate_takes_a_generator_as_state(clf: Classifier, batch) -> None:
    images, classes = batch
    sg = SmoothGrad(clf, samples=2, noise=0.1)
    with clf.frozen():
        gen = torch.Generator().manual_seed(3)
        maps_a, state = sg.surrogate(images, classes, gen)
        assert state is gen
        maps_b, _ = sg.surrogate(images, classes, torch.Generator().manual_seed(3))
        maps_c, _ = sg.surrogate(images, classes, state)  # fed back: fresh noise
    assert torch.equal(maps_a, maps_b)
    assert not torch.equal(maps_a, maps_c)
    with pytest.raises(InputError, match="Generator"):
        sg.surrogate(images, classes, "seed")


# ---------------------------------------------------------------- hygiene and arguments


def hooks_of(model: nn.Module) -> int:
    """Module hooks of ``model`` plus torch's global module hooks."""
    from torch.nn.modules import module as module_mod

    global_hooks = (
        module_mod._global_forward_hooks,
        module_mod._global_forward_pre_hooks,
        module_mod._global_backward_hooks,
        module_mod._global_backward_pre_hooks,
    )
    return sum(len(hooks) for hooks in global_hooks) + sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.filterwarnings("ignore:.*training mode")
def test_no_hooks_and_state_restored_after_success_and_exception(batch) -> None:
    images, classes = batch
    clf = make_classifier(seed=1)
    clf.model.train()
    clf.model.layer2.eval()
    clf.model.conv1.weight.requires_grad_(False)
    before = (
        [m.training for m in clf.modules()],
        [p.requires_grad for p in clf.parameters()],
        {k: v.clone() for k, v in clf.state_dict().items()},
    )
    depth = torch._C._len_torch_function_stack()

    def check() -> None:
        assert hooks_of(clf) == 0
        assert [m.training for m in clf.modules()] == before[0]
        assert [p.requires_grad for p in clf.parameters()] == before[1]
        for key, value in clf.state_dict().items():
            assert torch.equal(value, before[2][key]), f"{key} changed"
        assert torch._C._len_torch_function_stack() == depth
        assert all(p.grad is None for p in clf.parameters())

    for interpreter in (Grad(clf), SmoothGrad(clf, samples=2)):
        interpreter(images, classes, seed=0)
        check()
        with pytest.raises(InputError, match="unknown class"):
            interpreter(images, [0, 1, CLASSES])
        check()
        with clf.frozen(), pytest.raises((RuntimeError, IndexError)):
            interpreter.surrogate(images, torch.tensor([0, 1, 99]))  # fails mid-way, in the context
        check()
    # the ReLU is the true one again
    x = torch.tensor([-0.5], requires_grad=True)
    (g,) = torch.autograd.grad(F.relu(x).sum(), x)
    assert float(g) == 0.0


def test_invalid_arguments(clf: Classifier, batch) -> None:
    for bad in (
        lambda: Grad(clf, score="prob"),  # type: ignore[arg-type]
        lambda: Grad(clf, pool=0),
        lambda: Grad(clf, pool=1.5),  # type: ignore[arg-type]
        lambda: Grad(clf, pool=True),
        lambda: Grad(clf, relu="relu6"),
        lambda: Grad(clf, relu=ReluSurrogate("h", tau=-1.0)),
        lambda: SmoothGrad(clf, samples=0),
        lambda: SmoothGrad(clf, samples=2.0),  # type: ignore[arg-type]
        lambda: SmoothGrad(clf, noise=-0.1),
        lambda: SmoothGrad(clf, noise=float("nan")),
        lambda: SmoothGrad(clf, pool=-1),
    ):
        with pytest.raises(InputError):
            bad()
    images, classes = batch
    with pytest.raises(InputError, match="pool=64"):
        Grad(clf, pool=64)(images, classes)
    assert Grad.name == "grad" and SmoothGrad.name == "smoothgrad"
    assert Grad(clf, relu="sigmoid").relu == ReluSurrogate("sigmoid")


# ---------------------------------------------------------------- captum as an oracle


@pytest.mark.parametrize("arch", ["resnet18", "densenet121"])
def test_grad_matches_captum_saliency(arch: str) -> None:
    captum_attr = pytest.importorskip("captum.attr")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tv = import_torchvision()
    torch.manual_seed(0)
    net = getattr(tv.models, arch)(num_classes=CLASSES).eval()
    clf = Classifier(net, IMAGENET_MEAN, IMAGENET_STD, input_size=64, num_classes=CLASSES)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    classes = torch.tensor([2, 4])
    ours = Grad(clf)(images, classes)
    with clf.frozen():
        inputs = images.clone().requires_grad_(True)
        attribution = captum_attr.Saliency(clf).attribute(inputs, target=classes, abs=True)
    expected = minmax(attribution.max(1, keepdim=True).values)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
