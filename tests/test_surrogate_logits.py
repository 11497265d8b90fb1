"""``Interpreter.surrogate_and_logits``: the ADV² step's maps and logits from one call.

GRAD and Gradient × Input (with ``share_forward``), CAM and Grad-CAM return the logits of the forward pass their map
came from instead of running the classifier again; RTS gives its maps and its encoder's logits from
one encoder pass. The logits must be the classifier's, the maps the surrogate's, and the attack's
results exactly those of the plain path (``surrogate`` + a separate ``clf(x)`` + ``encoder_logits``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from underfire import Classifier
from underfire.attacks import ADV2, AttackConfig
from underfire.interpreters import (
    Grad,
    Interpreter,
    Mask,
    MaskConfig,
    Rts,
    SaliencyNetwork,
    build_interpreter,
    normalize_maps,
)

SIZE = 32


def tiny_classifier() -> Classifier:
    """A small conv net with a GAP→linear head (every interpreter applies) and in-place ReLUs."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 4),
    ).eval()
    with torch.no_grad():
        net[-1].weight.mul_(30)
    return Classifier(net, input_size=SIZE, num_classes=4)


def make(name: str, clf: Classifier) -> Interpreter:
    if name in ("grad-shared", "inputxgrad-shared"):
        return build_interpreter(name.removesuffix("-shared"), clf, share_forward=True)
    if name == "smoothgrad":
        return build_interpreter(name, clf, samples=2)
    if name == "rts":
        torch.manual_seed(1)
        return Rts(clf, SaliencyNetwork(4).eval())
    if name == "mask":
        return Mask(clf, MaskConfig(iterations=4, init_steps=2))
    return build_interpreter(name, clf)


def batch(n: int = 4) -> torch.Tensor:
    return torch.rand(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))


NAMES = ["grad", "grad-shared", "inputxgrad", "inputxgrad-shared", "smoothgrad", "cam", "gradcam", "rts", "mask"]


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_the_classifiers_and_maps_the_surrogates(name: str) -> None:
    clf = tiny_classifier()
    interpreter = make(name, clf)
    x = batch().requires_grad_(True)
    classes = torch.tensor([0, 1, 2, 3])
    with clf.frozen():
        expected_logits = clf(x)
        expected_maps, _ = interpreter.surrogate(x, classes, interpreter.initial_state(0, x.device))
        maps, logits, _ = interpreter.surrogate_and_logits(x, classes, interpreter.initial_state(0, x.device))
        assert torch.equal(logits, expected_logits)
        assert torch.equal(maps, expected_maps)
        # both carry a graph to the images
        loss = F.cross_entropy(logits, classes) + maps.square().mean()
        (gradient,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(gradient).all() and gradient.abs().sum() > 0


def test_rts_maps_and_encoder_logits_from_one_pass() -> None:
    clf = tiny_classifier()
    rts = make("rts", clf)
    x = batch()
    classes = torch.tensor([0, 1, 2, 3])
    with clf.frozen():
        maps, state = rts.surrogate(x, classes)
        assert torch.equal(maps, normalize_maps(rts.masks(x, classes)))
        assert torch.equal(state.encoder_logits, rts.encoder_logits(x))
        # the attack's encoder term reuses those logits instead of a second encoder pass
        terms = rts.attack_terms("joint", x, classes, maps, state)
        expected = rts.encoder_weight * F.cross_entropy(rts.encoder_logits(x), classes, reduction="none")
        assert torch.equal(terms.extra, expected)


def _plain_path(monkeypatch: pytest.MonkeyPatch, interpreter: Interpreter) -> None:
    """Make ADV² use ``surrogate`` + ``clf(x)`` (+ a separate ``encoder_logits`` pass for RTS's
    encoder term), as before the shortcuts."""
    monkeypatch.setattr(type(interpreter), "surrogate_and_logits", Interpreter.surrogate_and_logits)
    if isinstance(interpreter, Rts):
        separate = Rts.attack_terms
        monkeypatch.setattr(
            Rts, "attack_terms", lambda self, stage, x, c, m, state=None: separate(self, stage, x, c, m, None)
        )


@pytest.mark.parametrize("name", ["grad", "smoothgrad", "cam", "gradcam", "rts", "mask"])
def test_adv2_results_are_unchanged(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same adversarial images, iterates, chosen steps and distances as the plain path (seeded)."""
    clf = tiny_classifier()
    images = batch()
    targets = clf.predict(images).topk(2, dim=1).indices[:, 1]  # the runner-up: reachable
    # a budget large enough that stage-2 iterates qualify, so selection is exercised too
    config = AttackConfig(eps=0.25, alpha=0.02, pgd_steps=4, adv_steps=6, confidence=0.0)
    fast = ADV2(clf, config, interpreter=make(name, clf))(images, targets)
    plain_interpreter = make(name, clf)
    _plain_path(monkeypatch, plain_interpreter)
    plain = ADV2(clf, config, interpreter=plain_interpreter)(images, targets)
    assert torch.equal(fast.adversarial, plain.adversarial)
    assert torch.equal(fast.last, plain.last)
    assert torch.equal(fast.chosen_step, plain.chosen_step)
    torch.testing.assert_close(fast.map_distance, plain.map_distance, rtol=0, atol=0, equal_nan=True)
    assert torch.isfinite(fast.map_distance).any(), "no stage-2 iterate qualified: selection untested"


def test_share_forward_is_off_by_default_and_validated() -> None:
    clf = tiny_classifier()
    assert Grad(clf).share_forward is False
    with pytest.raises(Exception, match="share_forward"):
        Grad(clf, share_forward="yes")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "interpreter", [lambda clf: Grad(clf), lambda clf: Grad(clf, pool=4), lambda clf: make("mask", clf)]
)
def test_map_shape_arithmetic_matches_an_explanation(interpreter) -> None:
    clf = tiny_classifier()
    explainer = interpreter(clf)
    images = batch(2)
    assert explainer.map_shape(images) == Interpreter.map_shape(explainer, images)
