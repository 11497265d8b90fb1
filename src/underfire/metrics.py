"""The measures of the paper and its peers, per sample, on maps in [0, 1].

All functions take batches of maps (N, 1, h, w) and return one value per sample, so results can be
stored row by row. Maps of different resolutions are compared after bilinear resizing to the
larger of the two (object masks: to the mask's resolution).

* L1 = mean |Δ| over map pixels, L2 = ‖Δ‖₂ / √n (Zhang et al. 2020).
* IoU test: binarise both maps by keeping their top-k % pixels, IoU per k (Zhang et al. 2020;
  the official code has none, this is the reference implementation here).
* Top-k intersection and Spearman rank correlation (Ghorbani et al., "Interpretation of Neural
  Networks is Fragile", AAAI 2019).
* Pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016) and
  top-k IoU with ground-truth object masks, for benign maps.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.stats import spearmanr

from .errors import InputError

#: The IoU test's default grid: keep the top 5 %, 10 %, …, 50 % pixels.
DEFAULT_K: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 11))


def _check_maps(maps: torch.Tensor, what: str = "maps", *, differentiable: bool = False) -> torch.Tensor:
    if not isinstance(maps, torch.Tensor) or maps.dim() != 4 or maps.shape[1] != 1:
        shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
        raise InputError(f"{what} must be a tensor of shape (N, 1, h, w), got {shape}")
    if not torch.isfinite(maps).all():
        raise InputError(f"{what} contain NaN or Inf values")
    return maps.float() if differentiable else maps.detach().float()


def resize_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize (no-op when already at ``size``)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps, size=size, mode="bilinear", align_corners=False)


def _pair(a: torch.Tensor, b: torch.Tensor, *, differentiable: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    a = _check_maps(a, "first maps", differentiable=differentiable)
    b = _check_maps(b, "second maps", differentiable=differentiable)
    if a.shape[0] != b.shape[0]:
        raise InputError(f"cannot compare {a.shape[0]} maps with {b.shape[0]} maps")
    size = max(a.shape[-2:], b.shape[-2:], key=lambda s: s[0] * s[1])
    return resize_maps(a, size).flatten(1), resize_maps(b, size).flatten(1)


def l1_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference per sample."""
    a, b = _pair(a, b)
    return (a - b).abs().mean(1)


def l2_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Root-mean-square difference per sample (‖Δ‖₂ / √n)."""
    a, b = _pair(a, b)
    return (a - b).pow(2).mean(1).sqrt()


def top_k_mask(flat: torch.Tensor, fraction: float) -> torch.Tensor:
    """Boolean mask of the ``fraction`` highest pixels of each row (exactly k pixels; ties by index)."""
    k = _top_k_count(flat.shape[1], fraction)
    index = flat.topk(k, dim=1, sorted=False).indices
    return torch.zeros_like(flat, dtype=torch.bool).scatter_(1, index, True)


def _top_k_count(pixels: int, fraction: float) -> int:
    """How many of ``pixels`` the top ``fraction`` keeps (at least one)."""
    if not 0 < fraction <= 1:
        raise InputError(f"top-k fraction must be in (0, 1], got {fraction}")
    return max(1, int(round(fraction * pixels)))


def iou_top_k(a: torch.Tensor, b: torch.Tensor, fractions: Sequence[float] = DEFAULT_K) -> torch.Tensor:
    """IoU of the top-k% pixel sets of two maps: (N, len(fractions))."""
    a, b = _pair(a, b)
    columns = []
    for fraction in fractions:
        ma, mb = top_k_mask(a, fraction), top_k_mask(b, fraction)
        columns.append((ma & mb).sum(1).float() / (ma | mb).sum(1).float())
    return torch.stack(columns, 1)


def soft_iou_top_k(
    a: torch.Tensor, b: torch.Tensor, fractions: Sequence[float] = DEFAULT_K, temperature: float = 0.05
) -> torch.Tensor:
    """A differentiable stand-in for ``iou_top_k``: (N, len(fractions)).

    Each top-k set becomes a soft one, sigmoid((m − τ) / T), with τ halfway between the k-th and
    (k+1)-th highest value and T = ``temperature`` × the row's standard deviation; the IoU of two
    soft sets is Σ min / Σ max. τ carries no gradient (moving it does not change which pixels are
    in), so the gradient moves pixels across the threshold, which is what changes the hard score.
    As ``temperature`` → 0 it tends to ``iou_top_k`` on maps without ties. Written for the
    adaptive attack on the ensemble detector (its ``iou`` score has no gradient)."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise InputError(f"the soft top-k temperature must be a finite number > 0, got {temperature!r}")
    a, b = _pair(a, b, differentiable=True)
    counts = [_top_k_count(a.shape[1], fraction) for fraction in fractions]
    # one sort of each map serves every k (the per-k top-k was most of this function's cost)
    sorted_a, sorted_b = (_SortedMap(m, max(counts), temperature) for m in (a, b))
    columns = []
    for k in counts:
        sa, sb = sorted_a.soft_top(k), sorted_b.soft_top(k)
        columns.append(torch.minimum(sa, sb).sum(1) / torch.maximum(sa, sb).sum(1).clamp_min(1e-12))
    return torch.stack(columns, 1)


class _SortedMap:
    """A map's highest values (no gradient) and its softening scale, for ``soft_iou_top_k``."""

    def __init__(self, flat: torch.Tensor, largest_k: int, temperature: float) -> None:
        self.flat = flat
        detached = flat.detach()
        self.top = detached.topk(min(largest_k + 1, flat.shape[1]), dim=1).values
        self.spread = temperature * detached.std(1, keepdim=True).clamp_min(1e-12)

    def soft_top(self, k: int) -> torch.Tensor:
        if k >= self.flat.shape[1]:
            return torch.ones_like(self.flat)
        threshold = (self.top[:, k - 1 : k] + self.top[:, k : k + 1]) / 2
        return torch.sigmoid((self.flat - threshold) / self.spread)


def top_k_intersection(a: torch.Tensor, b: torch.Tensor, fraction: float = 0.1) -> torch.Tensor:
    """Fraction of the top-k% pixels of ``a`` that are also top-k% in ``b``."""
    a, b = _pair(a, b)
    ma, mb = top_k_mask(a, fraction), top_k_mask(b, fraction)
    return (ma & mb).sum(1).float() / ma.sum(1).float()


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation per sample (NaN-free: a constant map correlates 0)."""
    a, b = _pair(a, b)
    values = []
    for row_a, row_b in zip(a.cpu().numpy(), b.cpu().numpy()):
        if np.ptp(row_a) == 0 or np.ptp(row_b) == 0:
            values.append(0.0)
        else:
            values.append(float(spearmanr(row_a, row_b).statistic))
    return torch.tensor(values)


def _against_objects(maps: torch.Tensor, objects: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    maps = _check_maps(maps)
    if objects.dim() != 4 or objects.shape[1] != 1 or objects.shape[0] != maps.shape[0]:
        raise InputError(f"object masks must have shape ({maps.shape[0]}, 1, H, W), got {tuple(objects.shape)}")
    return resize_maps(maps, tuple(objects.shape[-2:])).flatten(1), objects.flatten(1).bool().to(maps.device)


#: The pointing game's tolerance: 15 px at 224 px (Zhang et al. 2016), scaled to the mask size.
POINTING_TOLERANCE_AT_224 = 15


def pointing_game(maps: torch.Tensor, objects: torch.Tensor, tolerance: float | None = None) -> torch.Tensor:
    """Whether each map's maximum (after resizing to the mask) hits the object: bool (N,).

    A hit is a maximum within ``tolerance`` pixels (Euclidean) of an object pixel. The protocol of
    Zhang et al. (2016) uses 15 px at 224 px; ``None`` scales that to the mask's side (4.3 px at
    64), ``0`` demands the maximum lie inside the object itself.
    """
    if tolerance is None:
        tolerance = POINTING_TOLERANCE_AT_224 * objects.shape[-1] / 224
    if tolerance < 0:
        raise InputError(f"pointing-game tolerance must be >= 0, got {tolerance}")
    radius = int(tolerance)
    if radius > 0:
        offsets = torch.arange(-radius, radius + 1, dtype=torch.float32)
        disc = ((offsets[:, None] ** 2 + offsets[None, :] ** 2) <= tolerance**2).float()
        objects = F.conv2d(objects.float(), disc[None, None], padding=radius) > 0
    flat, inside = _against_objects(maps, objects)
    return inside.gather(1, flat.argmax(1, keepdim=True)).squeeze(1)


def object_iou(maps: torch.Tensor, objects: torch.Tensor, fraction: float | None = None) -> torch.Tensor:
    """IoU between a map's top pixels and the object mask.

    ``fraction=None`` keeps as many pixels as the object covers (a parameter-free score).
    """
    flat, inside = _against_objects(maps, objects)
    scores = []
    for row, obj in zip(flat, inside):
        share = fraction if fraction is not None else max(float(obj.float().mean()), 1 / obj.numel())
        top = top_k_mask(row[None], share)[0]
        scores.append((top & obj).sum().float() / (top | obj).sum().float())
    return torch.stack(scores)


#: The ensemble detector's disagreement scores (``underfire.detection``).
Score = Literal["iou", "l1", "rank", "soft_iou"]
SCORES: tuple[str, ...] = ("iou", "l1", "rank", "soft_iou")


def to_grid(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Area average to a coarser grid, bilinear to a finer one."""
    height, width = maps.shape[-2:]
    if height >= size[0] and width >= size[1]:
        return F.adaptive_avg_pool2d(maps, size)
    return resize_maps(maps, size)


def disagreement(maps: Sequence[torch.Tensor], score: Score = "iou") -> torch.Tensor:
    """(N,) disagreement of several interpreters' maps (each (N, 1, h, w), one grid)."""
    if len(maps) < 2:
        raise InputError("disagreement needs the maps of two or more interpreters")
    if score not in SCORES:
        raise InputError(f"unknown detector score {score!r}; choose one of {', '.join(SCORES)}")
    pairs = []
    for a, b in itertools.combinations(maps, 2):
        if score == "iou":
            pairs.append(1.0 - iou_top_k(a, b).mean(1))
        elif score == "l1":
            pairs.append((a - b).abs().flatten(1).mean(1))
        elif score == "soft_iou":
            pairs.append(1.0 - soft_iou_top_k(a, b).mean(1))
        else:
            pairs.append(1.0 - spearman(a, b))
    return torch.stack(pairs).mean(0)
