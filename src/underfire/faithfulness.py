"""Faithfulness and robustness metrics of maps: what an auditor runs on an explanation.

* **Deletion / insertion** (Petsiuk, Das & Saenko, "RISE", BMVC 2018): pixels are removed (or
  inserted) in the map's order of importance, a fixed share per step, and the probability of the
  class is recorded after each step; the score is the area under that curve (trapezoid rule over
  the share removed, 0 to 1). A faithful map makes deletion fall fast (low AUC) and insertion
  rise fast (high AUC). Removed pixels take the value of a baseline: the image blurred (σ in
  pixels), black, or a tensor.
* **Max- and average-sensitivity** (Yeh et al., "On the (in)fidelity and sensitivity of
  explanations", NeurIPS 2019): the largest (average) change of the map under input noise drawn
  uniformly from the L∞ ball of radius ``radius``, ‖g(x + δ) − g(x)‖ / ‖g(x)‖ (Frobenius norms,
  as Quantus's defaults), over ``samples`` seeded draws.

Maps are (N, 1, h, w) in [0, 1] at any resolution; they are brought to the image's size
(bilinear) to order its pixels, ties broken by position. Everything is batched: one forward pass
of the N images per step.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F

from .errors import InputError
from .imaging import gaussian_blur
from .interpreters.base import Interpreter
from .models.classifier import Classifier

__all__ = ["deletion_curve", "deletion_auc", "insertion_auc", "sensitivity"]

Baseline = Literal["blur", "black"]


def _baseline(images: torch.Tensor, baseline: Baseline | torch.Tensor, sigma: float) -> torch.Tensor:
    if isinstance(baseline, torch.Tensor):
        value = baseline.to(images.device, images.dtype)
        if value.dim() == 3:
            value = value[None]
        if value.shape[1:] != images.shape[1:]:
            raise InputError(f"the baseline has shape {tuple(value.shape)}, the images {tuple(images.shape)}")
        return value.expand_as(images)
    if baseline == "black":
        return torch.zeros_like(images)
    if baseline == "blur":
        return gaussian_blur(images, sigma)
    raise InputError(f"the baseline must be 'blur', 'black' or a tensor, got {baseline!r}")


def _order(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, H·W) pixel indices, most important first (ties: the earlier position first)."""
    if maps.dim() != 4 or maps.shape[1] != 1:
        raise InputError(f"maps must be (N, 1, h, w), got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise InputError("maps must be finite")
    full = (
        maps if tuple(maps.shape[-2:]) == size else F.interpolate(maps, size=size, mode="bilinear", align_corners=False)
    )
    flat = full.flatten(1)
    return torch.argsort(-flat, dim=1, stable=True)


def deletion_curve(
    classifier: Classifier,
    images: torch.Tensor,
    maps: torch.Tensor,
    classes: Any,
    *,
    steps: int = 20,
    baseline: Baseline | torch.Tensor = "blur",
    sigma: float = 5.0,
    insertion: bool = False,
) -> torch.Tensor:
    """(N, steps + 1) probabilities of ``classes`` as the map's most important pixels are removed
    (``insertion``: inserted into the baseline) in ``steps`` equal shares."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be an integer >= 1, got {steps!r}")
    images = classifier.prepare_images(images)
    classes = classifier.check_classes(classes, images.shape[0])
    if maps.shape[0] != images.shape[0]:
        raise InputError(f"got {maps.shape[0]} maps for {images.shape[0]} images")
    n, channels, height, width = images.shape
    order = _order(maps.to(images.device, torch.float32), (height, width))
    replacement = _baseline(images, baseline, sigma)
    start, end = (replacement, images) if insertion else (images, replacement)
    pixels = height * width
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(pixels, device=order.device).expand(n, -1))
    probabilities = []
    with classifier.frozen(), torch.no_grad():
        for step in range(steps + 1):
            changed = (rank < round(pixels * step / steps)).view(n, 1, height, width)
            mixed = torch.where(changed, end, start)
            probabilities.append(classifier(mixed).softmax(1).gather(1, classes[:, None]).squeeze(1))
    return torch.stack(probabilities, dim=1)


def _area(curve: torch.Tensor) -> torch.Tensor:
    """Trapezoid area of each row of ``curve`` over equally spaced points of [0, 1]."""
    return torch.trapezoid(curve, dx=1.0 / (curve.shape[1] - 1), dim=1)


def deletion_auc(
    classifier: Classifier, images: torch.Tensor, maps: torch.Tensor, classes: Any, **options: Any
) -> torch.Tensor:
    """(N,) area under the deletion curve (low: the map found what the prediction needs)."""
    return _area(deletion_curve(classifier, images, maps, classes, **options))


def insertion_auc(
    classifier: Classifier, images: torch.Tensor, maps: torch.Tensor, classes: Any, **options: Any
) -> torch.Tensor:
    """(N,) area under the insertion curve (high: the map found what the prediction needs)."""
    return _area(deletion_curve(classifier, images, maps, classes, insertion=True, **options))


def sensitivity(
    interpreter: Interpreter,
    images: torch.Tensor,
    classes: Any,
    *,
    radius: float = 0.02,
    samples: int = 10,
    kind: Literal["max", "avg"] = "max",
    seed: int = 0,
) -> torch.Tensor:
    """(N,) max- or average-sensitivity of ``interpreter``'s maps: ‖g(x + δ) − g(x)‖ / ‖g(x)‖ over
    ``samples`` draws of δ uniform in the L∞ ball of ``radius`` (the noisy images clamped to
    [0, 1]), the largest or the mean."""
    if kind not in ("max", "avg"):
        raise InputError(f"sensitivity kind must be 'max' or 'avg', got {kind!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InputError(f"samples must be an integer >= 1, got {samples!r}")
    if not (0 < radius <= 1):
        raise InputError(f"radius must be in (0, 1], got {radius!r}")
    classifier = interpreter.classifier
    images = classifier.prepare_images(images)
    classes = classifier.check_classes(classes, images.shape[0])
    benign = interpreter(images, classes, seed=seed)
    norm = benign.flatten(1).norm(dim=1).clamp_min(1e-12)
    generator = torch.Generator(images.device).manual_seed(seed)
    changes = []
    for _ in range(samples):
        noise = (torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1) * radius
        moved = interpreter((images + noise).clamp(0, 1), classes, seed=seed)
        changes.append((moved - benign).flatten(1).norm(dim=1) / norm)
    stacked = torch.stack(changes, dim=1)
    return stacked.max(1).values if kind == "max" else stacked.mean(1)
