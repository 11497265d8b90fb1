"""The interpreter contract, checked uniformly for every registered interpreter.

Each method module has its own exactness tests; this file holds the invariants every interpreter
must keep: shape and range, batched == per-sample, determinism given a seed, no
hook left and no module flag or parameter changed (after success and after an exception), and a
surrogate whose interpretation loss has a non-zero gradient with respect to the input.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from torch import nn

from underfire import Classifier, InputError
from underfire.interpreters import INTERPRETERS, Interpreter, Mask, MaskConfig, Rts, SaliencyNetwork, build_interpreter
from underfire.models import IMAGENET_MEAN, IMAGENET_STD, ShapesDenseNet, ShapesResNet

SIZE = 32


def small_mask(clf: Classifier) -> Mask:
    return Mask(clf, MaskConfig(iterations=6, init_steps=3))


def small_rts(clf: Classifier) -> Rts:
    torch.manual_seed(0)
    return Rts(clf, SaliencyNetwork(clf.num_classes).eval())


FACTORIES: dict[str, Callable[[Classifier], Interpreter]] = {
    "grad": lambda clf: build_interpreter("grad", clf),
    "smoothgrad": lambda clf: build_interpreter("smoothgrad", clf, samples=4),
    "inputxgrad": lambda clf: build_interpreter("inputxgrad", clf),
    "ig": lambda clf: build_interpreter("ig", clf, steps=4, chunk=2),
    "deeplift": lambda clf: build_interpreter("deeplift", clf),
    "lrp": lambda clf: build_interpreter("lrp", clf),
    "cam": lambda clf: build_interpreter("cam", clf),
    "gradcam": lambda clf: build_interpreter("gradcam", clf),
    "rts": small_rts,
    "mask": small_mask,
    "ensemble": lambda clf: build_interpreter("ensemble", clf, members=("grad", "cam")),
}


#: Interpreters for transformers only: their contract is checked on a vision transformer
#: (tests/test_transformers.py), since these CNNs have no attention to read.
TRANSFORMER_ONLY = {"rollout", "transformer_attribution"}


def test_every_registered_interpreter_is_covered() -> None:
    assert set(FACTORIES) | TRANSFORMER_ONLY == set(INTERPRETERS)


class Tripwire(nn.Module):
    """Wraps a network; raises on the forward call number ``fail_at`` (counting from 1)."""

    def __init__(self, net: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.fail_at = fail_at
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("tripwire")
        return self.net(x)


def make_classifier(arch: type[nn.Module] = ShapesResNet, fail_at: int | None = None) -> Classifier:
    torch.manual_seed(0)
    net = arch()
    # Non-trivial BatchNorm statistics, so eval vs train mode matters.
    with torch.no_grad():
        net.train()
        net(torch.rand(16, 3, SIZE, SIZE))
    net.eval()
    return Classifier(Tripwire(net, fail_at), IMAGENET_MEAN, IMAGENET_STD, input_size=SIZE, num_classes=10).eval()


def images(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(FACTORIES), name="name")
def interpreter_name(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.mark.parametrize("arch", [ShapesResNet, ShapesDenseNet], ids=["resnet", "densenet"])
def test_maps_have_the_contract_shape_and_range(name: str, arch: type[nn.Module]) -> None:
    clf = make_classifier(arch)
    maps = FACTORIES[name](clf)(images(), [1, 2, 3], seed=0)
    assert maps.dim() == 4 and maps.shape[:2] == (3, 1)
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    assert not maps.requires_grad
    peaks = maps.flatten(1).max(1).values  # min-max normalised: peak 1, or a constant map → 0
    assert all(peak == pytest.approx(1.0) or (row == 0).all() for peak, row in zip(peaks, maps.flatten(1)))


def test_batched_equals_per_sample(name: str) -> None:
    clf = make_classifier()
    interpreter = FACTORIES[name](clf)
    x, classes = images(), torch.tensor([4, 0, 9])
    if name == "smoothgrad":
        # noise is drawn per batch; per-sample equality holds for the noise-free limit
        interpreter = build_interpreter("smoothgrad", clf, samples=2, noise=0.0)
    batched = interpreter(x, classes, seed=0)
    single = torch.cat([interpreter(x[i : i + 1], classes[i : i + 1], seed=0) for i in range(3)])
    # MASK's optimisation amplifies the float rounding differences of batched convolutions
    tolerance = 1e-3 if name == "mask" else 1e-5
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=tolerance)


def test_deterministic_given_a_seed(name: str) -> None:
    clf = make_classifier()
    interpreter = FACTORIES[name](clf)
    first = interpreter(images(), [1, 2, 3], seed=5)
    second = interpreter(images(), [1, 2, 3], seed=5)
    assert torch.equal(first, second)


def test_default_classes_are_the_predictions(name: str) -> None:
    clf = make_classifier()
    interpreter = FACTORIES[name](clf)
    x = images()
    predicted = clf.predict(x).argmax(1)
    torch.testing.assert_close(interpreter(x, seed=0), interpreter(x, predicted, seed=0))


def test_no_state_change_and_no_hooks_after_success(name: str) -> None:
    clf = make_classifier()
    clf.network.net.train()  # a user's model left in training mode
    clf.network.net.layer2.eval()
    before = snapshot(clf)
    with pytest.warns(UserWarning, match="training mode"):
        FACTORIES[name](clf)(images(), [0, 1, 2], seed=0)
    assert_unchanged(clf, before)


@pytest.mark.parametrize("when", ["first", "last"])
def test_no_state_change_and_no_hooks_after_an_exception(name: str, when: str) -> None:
    """A forward pass that raises part-way (first or last model call) leaves nothing behind."""
    clf = make_classifier()
    interpreter = FACTORIES[name](clf)
    if name in ("cam", "gradcam"):
        assert interpreter.layers is not None  # found when built: the tripwire is for the explanation itself
    clf.prepare_images(images())  # so is the one-time memory-layout probe
    interpreter.map_shape(images())  # and a composite's one-time probe of its members' map sizes
    clf.network.calls = 0
    interpreter(images(), [0, 1, 2], seed=0)  # a dry run counts the model calls
    calls = clf.network.calls
    watched: list[nn.Module] = [clf]
    if calls == 0:  # RTS never calls the classifier: trip its saliency network instead
        network = interpreter.network
        network.encoder.layer4 = Tripwire(network.encoder.layer4, fail_at=1)
        watched.append(network)
    else:
        clf.network.calls, clf.network.fail_at = 0, (1 if when == "first" else calls)
    before = [snapshot(module) for module in watched]
    with pytest.raises(RuntimeError, match="tripwire"):
        interpreter(images(), [0, 1, 2], seed=0)
    for module, state in zip(watched, before):
        assert_unchanged(module, state)
    assert torch._C._len_torch_function_stack() == 0  # no torch-function mode left active


def test_invalid_class_is_refused_without_side_effects(name: str) -> None:
    clf = make_classifier()
    before = snapshot(clf)
    with pytest.raises(InputError, match="unknown class 10"):
        FACTORIES[name](clf)(images(), [0, 10, 2])
    assert_unchanged(clf, before)


def test_surrogate_interpretation_loss_has_input_gradient(name: str) -> None:
    """The silently-detached bug (a map computed on a detached input gives ADV² no gradient) cannot happen."""
    clf = make_classifier()
    interpreter = FACTORIES[name](clf)
    x = images().requires_grad_(True)
    classes = torch.tensor([3, 1, 7])
    with clf.frozen():
        maps, _ = interpreter.surrogate(x, classes)
        target = torch.rand(maps.shape, generator=torch.Generator().manual_seed(2))
        loss = F.mse_loss(maps, target)
        (gradient,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gradient).all()
    assert gradient.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters()), "parameter gradients were built"


def test_unknown_interpreter_name() -> None:
    with pytest.raises(InputError, match="unknown interpreter 'lime'"):
        build_interpreter("lime", make_classifier())
