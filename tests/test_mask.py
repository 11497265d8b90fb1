"""MASK (Fong & Vedaldi 2017) and its ADV² bilevel surrogate (Zhang et al. 2020, Eq. 10).

Exactness: the objective at its extremes, TV_β and the blur against closed forms, the unrolled
map against a plain re-computation, its input gradient against finite differences (float64).
Behaviour: the objective decreases on the built-in model, maps are seeded, batched == per-sample,
the model is left untouched (also after an exception), bad configurations are refused. The
deletion check on 100 built-in test images is ``slow`` (``pytest -m slow``).
"""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from model_state import assert_unchanged, snapshot
from torch import nn

from underfire import Classifier, InputError
from underfire.data import ShapesDataset
from underfire.imaging import translate
from underfire.interpreters.base import normalize_maps
from underfire.interpreters.mask import (
    Mask,
    MaskConfig,
    MaskSolution,
    MaskState,
    gaussian_blur,
    total_variation,
)
from underfire.models import IMAGENET_MEAN, IMAGENET_STD, ShapesResNet, load_model
from underfire.models.specs import builtin_weights_path

SIZE = 32
SMALL = MaskConfig(iterations=8, init_steps=4)


class Tripwire(nn.Module):
    """Wraps a network; raises on forward call number ``fail_at``."""

    def __init__(self, net: nn.Module, fail_at: int | None = None) -> None:
        super().__init__()
        self.net, self.fail_at, self.calls = net, fail_at, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.fail_at is not None and self.calls >= self.fail_at:
            raise RuntimeError("tripwire")
        return self.net(x)


def tiny_classifier(fail_at: int | None = None) -> Classifier:
    torch.manual_seed(0)
    net = ShapesResNet(widths=(8, 8, 8, 16, 16))
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.train()
        net(torch.rand(8, 3, SIZE, SIZE))
    net.eval()
    clf = Classifier(Tripwire(net, fail_at), IMAGENET_MEAN, IMAGENET_STD, input_size=SIZE, num_classes=10)
    return clf.eval()


def images(n: int = 3, seed: int = 1, size: int = SIZE) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def builtin(name: str = "shapes-resnet") -> Classifier:
    if not builtin_weights_path(name).exists():
        pytest.skip(f"{name} weights not built yet")
    return load_model(name)


# ---------------------------------------------------------------------- building blocks
def test_total_variation_closed_forms() -> None:
    assert total_variation(torch.full((2, 1, 5, 5), 0.3), 3.0).abs().max() < 1e-9
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 1.0  # a vertical step: |dx| = 1 on 4 rows, nothing else
    assert total_variation(edge, 3.0).item() == pytest.approx(4.0, abs=1e-6)
    hole = torch.ones(1, 1, 5, 5)
    hole[0, 0, 2, 2] = 0.0  # (1 + 1)^{3/2} at the hole, 1 from its upper and left neighbours
    assert total_variation(hole, 3.0).item() == pytest.approx(2 * math.sqrt(2) + 2, abs=1e-6)
    assert total_variation(hole, 2.0).item() == pytest.approx(4.0, abs=1e-6)


def test_gaussian_blur_closed_forms() -> None:
    constant = torch.full((1, 3, 16, 16), 0.7)
    torch.testing.assert_close(gaussian_blur(constant, 2.0), constant)
    x = images(1, size=16)
    assert torch.equal(gaussian_blur(x, 0.0), x)
    delta = torch.zeros(1, 1, 31, 31)
    delta[0, 0, 15, 15] = 1.0
    response = gaussian_blur(delta, 1.5)[0, 0]
    assert response.sum().item() == pytest.approx(1.0, abs=1e-6)
    # separable Gaussian: neighbour / centre = exp(-1 / 2σ²), diagonal = its square
    ratio = math.exp(-1 / (2 * 1.5**2))
    assert (response[15, 16] / response[15, 15]).item() == pytest.approx(ratio, rel=1e-5)
    assert (response[16, 16] / response[15, 15]).item() == pytest.approx(ratio**2, rel=1e-5)


def test_sizes_scale_with_the_input() -> None:
    config = MaskConfig()
    assert config.mask_shape(224, 224) == (28, 28)  # the reference 28×28 at 224
    assert config.mask_shape(64, 64) == (16, 16)
    assert config.mask_shape(32, 32) == (8, 8)  # the official ADV² 8×8 at 32
    assert config.image_sigma(224, 224) == pytest.approx(10.0)
    assert config.image_sigma(64, 64) == pytest.approx(5.0)
    assert config.jitter_pixels(224, 224) == 4 and config.jitter_pixels(64, 64) == 1
    assert MaskConfig(mask_stride=8).mask_shape(64, 48) == (8, 6)


def test_objective_at_the_extremes_is_the_class_probability_plus_penalties() -> None:
    """m = 1 keeps x (no penalty); m = 0 shows blur(x) and pays λ1·784 (TV = 0)."""
    clf = tiny_classifier()
    interpreter = Mask(clf, MaskConfig(l1_weight=2e-3, tv_weight=0.5))
    x, classes = images(), torch.tensor([1, 4, 7])
    with clf.frozen(), torch.no_grad():
        keep = interpreter.objective(torch.ones(3, 1, 8, 8), x, classes)
        delete = interpreter.objective(torch.zeros(3, 1, 8, 8), x, classes)
        p_x = torch.softmax(clf(x), 1)[torch.arange(3), classes]
        blurred = gaussian_blur(x, interpreter.config.image_sigma(SIZE, SIZE))
        p_blur = torch.softmax(clf(blurred), 1)[torch.arange(3), classes]
    torch.testing.assert_close(keep, p_x)
    torch.testing.assert_close(delete, p_blur + 2e-3 * 784)


# ---------------------------------------------------------------------- the benign maps
def test_objective_decreases_on_the_builtin_model() -> None:
    clf = builtin()
    x, labels, _ = ShapesDataset("test").tensors([0, 1])
    interpreter = Mask(clf, MaskConfig(iterations=40))
    with clf.frozen():
        solution = interpreter.solve(x, labels, generator=torch.Generator().manual_seed(0))
    assert isinstance(solution, MaskSolution)
    history = solution.history
    assert history.shape == (40, 2)
    assert (history[-10:].mean(0) < history[:10].mean(0)).all()
    assert (history[-1] < history[0]).all()
    assert solution.mask.shape == (2, 1, 16, 16)
    assert solution.mask.min() >= 0 and solution.mask.max() <= 1


def test_maps_shape_range_and_seeding() -> None:
    clf = tiny_classifier()
    interpreter = Mask(clf, SMALL)
    x, classes = images(), [1, 2, 3]
    maps = interpreter(x, classes, seed=3)
    assert maps.shape == (3, 1, 8, 8)  # mask resolution: 32 px / stride 4
    assert maps.min() >= 0 and maps.max() <= 1 and not maps.requires_grad
    assert torch.equal(maps, interpreter(x, classes, seed=3))
    assert not torch.equal(maps, interpreter(x, classes, seed=4)), "the jitter ignores the seed"
    assert torch.equal(interpreter(x, classes), interpreter(x, classes, seed=SMALL.seed))
    still = Mask(clf, MaskConfig(iterations=8, jitter=0))
    assert torch.equal(still(x, classes, seed=3), still(x, classes, seed=4))


def test_batched_maps_equal_per_sample_maps() -> None:
    clf = tiny_classifier()
    interpreter = Mask(clf, SMALL)  # jitter on: one shift per step, shared by the batch
    x, classes = images(), torch.tensor([4, 0, 9])
    batched = interpreter(x, classes, seed=0)
    single = torch.cat([interpreter(x[i : i + 1], classes[i : i + 1], seed=0) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------- the attack surrogate
def test_surrogate_has_input_gradient_and_advances_its_state() -> None:
    clf = tiny_classifier()
    interpreter = Mask(clf, MaskConfig(init_steps=5, inner_steps=2))
    x = images().requires_grad_(True)
    classes = torch.tensor([3, 1, 7])
    target = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with clf.frozen():
        maps, state = interpreter.surrogate(x, classes)
        (gradient,) = torch.autograd.grad(F.mse_loss(maps, target), x)
        maps2, state2 = interpreter.surrogate(x, classes, state)
    assert maps.shape == (3, 1, 8, 8) and maps.min() >= 0 and maps.max() <= 1
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0
    assert all(p.grad is None for p in clf.parameters()), "parameter gradients were built"
    assert isinstance(state, MaskState) and not state.mask.requires_grad
    assert (state.step, state.adam_steps) == (1, 7) and (state2.step, state2.adam_steps) == (2, 9)
    assert not torch.equal(state.mask, state2.mask)
    with pytest.raises(InputError, match="state holds masks of shape"):
        interpreter.surrogate(x[:2], classes[:2], state)


@pytest.mark.parametrize("precondition,jitter", [(True, True), (False, True), (True, False)])
def test_unrolled_map_is_one_virtual_step_from_the_state(precondition: bool, jitter: bool) -> None:
    """maps = normalize(1 − (m − ξ·P·∇_m ℓ_map(m; x))), m the returned state's mask, ℓ_map taken on
    the perturbed image shifted by the state's jitter (none without ``surrogate_jitter``)."""
    clf = tiny_classifier()
    config = MaskConfig(init_steps=3, xi=0.3, precondition=precondition, surrogate_jitter=jitter)
    interpreter = Mask(clf, config)
    x, classes = images(), torch.tensor([0, 5, 8])
    with clf.frozen():
        maps, state = interpreter.surrogate(x, classes)
        assert (state.shift is not None) == jitter
        m = state.mask.clone().requires_grad_(True)
        objective = interpreter.objective(m, x, classes, shift=state.shift)
        (grad,) = torch.autograd.grad(objective.sum(), m)
    step = grad
    if precondition:
        step = grad / ((state.exp_avg_sq / (1 - 0.999**state.adam_steps)).sqrt() + 1e-8)
    expected = normalize_maps(1 - (state.mask - 0.3 * step))
    torch.testing.assert_close(maps.detach(), expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(expected, normalize_maps(1 - state.mask), atol=1e-3), "ξ had no effect"


def test_surrogate_input_gradient_matches_finite_differences() -> None:
    """With a fixed state and no inner step the map is a function of x alone: check ∂ℓ/∂x."""
    clf = tiny_classifier().double()
    # no jitter: each call would draw the next shift, and the two sides of the difference must agree
    interpreter = Mask(clf, MaskConfig(init_steps=4, inner_steps=0, xi=0.2, unrolled_steps=2, surrogate_jitter=False))
    x = images(2).double()
    classes = torch.tensor([2, 6])
    target = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(3)).double()
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(4)).double()
    with clf.frozen():
        _, state = interpreter.surrogate(x, classes)

        def loss(point: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(interpreter.surrogate(point, classes, state)[0], target)

        point = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(loss(point), point)
        h = 1e-6
        with torch.no_grad():
            numeric = (loss(x + h * direction) - loss(x - h * direction)) / (2 * h)
    analytic = (gradient * direction).sum()
    assert analytic.abs() > 1e-8
    assert analytic.item() == pytest.approx(numeric.item(), rel=1e-4)


def test_resolve_every_restarts_the_inner_solve() -> None:
    clf = tiny_classifier()
    interpreter = Mask(clf, MaskConfig(init_steps=3, inner_steps=1, resolve_every=2))
    x, classes = images(2), torch.tensor([1, 2])
    state = None
    counts = []
    with clf.frozen():
        for _ in range(4):
            _, state = interpreter.surrogate(x, classes, state)
            counts.append(state.adam_steps)
    assert counts == [4, 5, 4, 5] and state.step == 4


# ---------------------------------------------------------------------- the model is left alone
@pytest.mark.parametrize("fail_at", [None, 1, 5])
def test_model_flags_and_state_restored_after_success_and_exception(fail_at: int | None) -> None:
    clf = tiny_classifier(fail_at)
    clf.network.net.train()
    clf.network.net.layer2.eval()
    clf.network.net.fc.weight.requires_grad_(False)
    before = snapshot(clf)
    interpreter = Mask(clf, SMALL)
    with pytest.warns(UserWarning, match="training mode"):
        if fail_at is None:
            interpreter(images(), [0, 1, 2], seed=0)
        else:
            with pytest.raises(RuntimeError, match="tripwire"):
                interpreter(images(), [0, 1, 2], seed=0)
    assert_unchanged(clf, before, no_grads=True)


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("iterations", 0),
        ("iterations", 2.5),
        ("iterations", True),
        ("learning_rate", -0.1),
        ("l1_weight", -1e-4),
        ("tv_weight", float("nan")),
        ("tv_beta", 0.0),
        ("mask_stride", 0),
        ("blur_sigma", -1.0),
        ("mask_blur_sigma", float("inf")),
        ("init_value", 1.5),
        ("jitter", -1),
        ("seed", -3),
        ("inner_steps", -1),
        ("unrolled_steps", 0),
        ("xi", 0.0),
        ("precondition", 1),
        ("init_steps", -2),
        ("resolve_every", "50"),
    ],
)
def test_config_validation(field: str, value: object) -> None:
    with pytest.raises(InputError, match=f"MaskConfig.{field}"):
        MaskConfig(**{field: value})


def test_config_must_be_a_mask_config() -> None:
    with pytest.raises(InputError, match="config must be a MaskConfig"):
        Mask(tiny_classifier(), {"iterations": 3})  # type: ignore[arg-type]


# ---------------------------------------------------------------------- the deletion check
def deletion_wins(clf: Classifier, count: int = 100, fraction: float = 0.10, draws: int = 10) -> float:
    """Fraction of correctly classified test images on which deleting (blurring) the top
    ``fraction`` of MASK's saliency lowers p(class) more than deleting a random region of the
    same area (the top pixels of an upsampled random mask-resolution field), averaged over
    ``draws`` regions."""
    dataset = ShapesDataset("test")
    x, labels, _ = dataset.tensors(range(int(count * 1.2) + 10))
    correct = (clf.predict(x).argmax(1) == labels).nonzero().flatten()[:count]
    x, labels = x[correct], labels[correct]
    assert len(labels) == count
    interpreter = Mask(clf)
    maps = torch.cat([interpreter(x[i : i + 50], labels[i : i + 50], seed=0) for i in range(0, count, 50)])
    size = x.shape[-1]
    blurred = gaussian_blur(x, interpreter.config.image_sigma(size, size))
    k = round(fraction * size * size)
    rows = torch.arange(count)[:, None]

    def drop(scores: torch.Tensor) -> torch.Tensor:
        up = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False).flatten(1)
        keep = torch.ones_like(up)
        keep[rows, up.topk(k, dim=1).indices] = 0.0
        keep = keep.view(-1, 1, size, size)
        probs = clf.predict(x * keep + blurred * (1 - keep)).softmax(1)
        return 1.0 - probs[torch.arange(count), labels]  # p(x) ≈ 1 for these images

    generator = torch.Generator().manual_seed(0)
    random = torch.stack([drop(torch.rand(maps.shape, generator=generator)) for _ in range(draws)]).mean(0)
    return (drop(maps) > random).float().mean().item()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["shapes-resnet", "shapes-densenet"])
def test_deleting_the_mask_region_beats_random_regions(name: str) -> None:
    assert deletion_wins(builtin(name)) >= 0.9


# ---------------------------------------------------------------------- ADV²'s evidence term
def test_evidence_loss_at_the_extremes_and_its_input_gradient() -> None:
    """Target map 0 (nothing deleted): φ(x; 1) = x and φ(x; 0) = blur(x), so the term is
    p_c(x) + 0.1·CE(f(blur(x)), c); target map 1 swaps the two images. It is differentiable in x."""
    clf = tiny_classifier()
    interpreter = Mask(clf)
    x, classes = images(), torch.tensor([1, 4, 7])
    rows, cols = interpreter.map_shape(x)
    with clf.frozen():
        blurred = gaussian_blur(x, interpreter.config.image_sigma(SIZE, SIZE))
        with torch.no_grad():
            p = lambda v: torch.softmax(clf(v), 1)[torch.arange(3), classes]  # noqa: E731
            ce = lambda v: F.cross_entropy(clf(v), classes, reduction="none")  # noqa: E731
            nothing = interpreter.evidence_loss(x, classes, torch.zeros(3, 1, rows, cols))
            everything = interpreter.evidence_loss(x, classes, torch.ones(3, 1, rows, cols))
            torch.testing.assert_close(nothing, p(x) + 0.1 * ce(blurred))
            torch.testing.assert_close(everything, p(blurred) + 0.1 * ce(x))
        half = torch.zeros(3, 1, rows, cols)
        half[..., : rows // 2, :] = 1.0
        live = x.clone().requires_grad_(True)
        (gradient,) = torch.autograd.grad(interpreter.evidence_loss(live, classes, half).sum(), live)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_evidence_loss_under_the_surrogate_jitter() -> None:
    """With the state's shift s both perturbed images are shifted by s, and CE(f(s(x)), c) is added:
    the class must survive the solver's jitter. Without a shift the term is unchanged (the
    follower's optimality gap is off here; see the next test)."""
    clf = tiny_classifier()
    interpreter = Mask(clf, MaskConfig(gap_weight=0.0))
    x, classes = images(), torch.tensor([2, 3, 9])
    rows, cols = interpreter.map_shape(x)
    target = torch.zeros(3, 1, rows, cols)
    target[..., rows // 2 :, : cols // 2] = 1.0
    with clf.frozen(), torch.no_grad():
        _, state = interpreter.surrogate(x, classes)
        state = replace(state, shift=(1, -1))
        blurred = gaussian_blur(x, interpreter.config.image_sigma(SIZE, SIZE))
        deleted = interpreter.perturb(x, blurred, 1 - target)
        kept = interpreter.perturb(x, blurred, target)
        p = torch.softmax(clf(translate(deleted, 1, -1)), 1)[torch.arange(3), classes]
        ce = lambda v: F.cross_entropy(clf(translate(v, 1, -1)), classes, reduction="none")  # noqa: E731
        expected = p + 0.1 * ce(kept) + ce(x)
        torch.testing.assert_close(interpreter.evidence_loss(x, classes, target, state), expected)
        unshifted = interpreter.evidence_loss(x, classes, target)
        torch.testing.assert_close(interpreter.evidence_loss(x, classes, target, replace(state, shift=None)), unshifted)
        assert not torch.allclose(unshifted, expected)


def test_evidence_loss_adds_the_followers_optimality_gap() -> None:
    """With a state, the term adds w·max(0, ℓ_map(m_t; x) − ℓ_map(m_f; x)) for the follower mask
    m_f, on the shifted images like the rest of the term; it is zero when the follower is m_t
    itself, absent without a state or with w = 0, and its input gradient is non-zero."""
    clf = tiny_classifier()
    weight = 3.0
    interpreter, plain = Mask(clf, MaskConfig(gap_weight=weight)), Mask(clf, MaskConfig(gap_weight=0.0))
    x, classes = images(), torch.tensor([2, 3, 9])
    rows, cols = interpreter.map_shape(x)
    target = torch.zeros(3, 1, rows, cols)
    target[..., rows // 2 :, : cols // 2] = 1.0
    # one follower that deletes nothing (cheaper than m_t), one rough random mask (dearer), one half of m_t
    rough = torch.rand(1, 1, rows, cols, generator=torch.Generator().manual_seed(5))
    follower = torch.cat([torch.ones(1, 1, rows, cols), rough, 1 - 0.5 * target[:1]])
    with clf.frozen():
        _, state = interpreter.surrogate(x, classes)
        state = replace(state, mask=follower, shift=(-1, 1))
        with torch.no_grad():
            # ℓ_map by the solver's own objective, under the same shift
            gap = interpreter.objective(1 - target, x, classes, shift=(-1, 1)) - interpreter.objective(
                follower, x, classes, shift=(-1, 1)
            )
            assert gap[0] > 0 and gap[1] < 0  # the hinge is active on one sample and clips another
            expected = plain.evidence_loss(x, classes, target, state) + weight * gap.clamp_min(0)
            torch.testing.assert_close(interpreter.evidence_loss(x, classes, target, state), expected)
            for same_value in (replace(state, mask=1 - target), None):  # follower = m_t; no state
                torch.testing.assert_close(
                    interpreter.evidence_loss(x, classes, target, same_value),
                    plain.evidence_loss(x, classes, target, same_value),
                )
        live = x.clone().requires_grad_(True)
        undercut = replace(state, mask=torch.ones_like(follower))  # deletes nothing: cheaper than m_t
        difference = interpreter.evidence_loss(live, classes, target, undercut) - plain.evidence_loss(
            live, classes, target, undercut
        )
        (gradient,) = torch.autograd.grad(difference.sum(), live)
    assert (difference > 0).all()
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_surrogate_jitter_is_seeded_and_spans_the_solver_shifts() -> None:
    """Each call draws one shift per attack step from a generator seeded by ``MaskConfig.seed``; the
    sequence repeats for the same seed, survives a re-solve, and covers the solver's ±jitter px."""
    clf = tiny_classifier()
    x, classes = images(2), torch.tensor([1, 2])

    def shifts(config: MaskConfig, calls: int = 24) -> list[tuple[int, int]]:
        interpreter, state, drawn = Mask(clf, config), None, []
        with clf.frozen():
            for _ in range(calls):
                _, state = interpreter.surrogate(x, classes, state)
                drawn.append(state.shift)
        return drawn

    first = shifts(MaskConfig(init_steps=2, resolve_every=5))
    assert first == shifts(MaskConfig(init_steps=2, resolve_every=5))
    assert first != shifts(MaskConfig(init_steps=2, resolve_every=5, seed=1))
    jitter = MaskConfig().jitter_pixels(SIZE, SIZE)
    assert {dy for dy, _ in first} == set(range(-jitter, jitter + 1))
    assert len(set(first)) > 3
