"""Choosing what the attacker wants: target classes and target maps.

Target maps, four settings: the benign map of x° (the paper's headline setting: the prediction
changes, the explanation does not), the map of another correctly classified image of the target
class, an arbitrary shape (circle or rectangle), or a user's map (``.npy``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..interpreters.base import Interpreter

#: The target-map settings besides a user's `.npy` file ("shape" is a circle).
TARGET_MAP_KINDS = ("benign", "other", "shape", "circle", "rectangle")


def random_targets(labels: torch.Tensor, num_classes: int, seed: int) -> torch.Tensor:
    """A target class per sample, uniform over the classes other than its label, seeded."""
    if num_classes < 2:
        raise InputError("a targeted attack needs a model with at least 2 classes")
    generator = torch.Generator().manual_seed(seed)
    shift = torch.randint(1, num_classes, (labels.shape[0],), generator=generator)
    return (labels.cpu() + shift) % num_classes


def check_targets(labels: torch.Tensor, targets: torch.Tensor) -> None:
    """Refuse targets equal to the true class (the attack would be vacuous)."""
    same = (labels.cpu() == targets.cpu()).nonzero().flatten().tolist()
    if same:
        raise InputError(f"target class equals the true class for image(s) {same[:10]}; pick another target")


def shape_maps(kind: str, count: int, size: tuple[int, int], seed: int) -> torch.Tensor:
    """``count`` maps (N, 1, h, w) holding one random circle or rectangle each (1 inside, 0 out)."""
    if kind not in ("circle", "rectangle"):
        raise InputError(f"shape must be 'circle' or 'rectangle', got {kind!r}")
    h, w = size
    generator = torch.Generator().manual_seed(seed)
    ys = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
    xs = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
    maps = torch.zeros(count, 1, h, w)
    for i in range(count):
        extent = 0.2 + 0.2 * torch.rand(2, generator=generator)  # half-size: 20-40 % of the side
        centre = extent + (1 - 2 * extent) * torch.rand(2, generator=generator)
        cy, cx = centre[0] * h, centre[1] * w
        ry, rx = extent[0] * h, extent[1] * w
        if kind == "circle":
            radius = min(ry, rx)
            inside = (ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2
        else:
            inside = ((ys - cy).abs() <= ry) & ((xs - cx).abs() <= rx)
        maps[i, 0] = inside.float()
    return maps


def load_user_map(path: str | Path) -> torch.Tensor:
    """A user's target map from ``.npy`` (h × w, or 1 × h × w), min-max normalised to [0, 1]; an
    empty or constant map is refused (it has no top-k region to compare with)."""
    path = Path(path)
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise InputError(f"cannot read target map {str(path)!r}: {error}") from None
    array = np.squeeze(np.asarray(array, dtype=np.float32))
    if array.ndim != 2:
        raise InputError(f"target map {str(path)!r} must be 2-D (h × w), got shape {array.shape}")
    if array.size == 0:
        raise InputError(f"target map {str(path)!r} is empty (shape {array.shape})")
    if not np.isfinite(array).all():
        raise InputError(f"target map {str(path)!r} contains NaN or Inf")
    low, high = float(array.min()), float(array.max())
    if high == low:
        # every measure compares the top-k pixels of two maps; a constant map has none
        raise InputError(
            f"target map {str(path)!r} is constant ({low:g} everywhere): it marks no region, so IoU and L1 to it mean nothing"
        )
    return torch.from_numpy((array - low) / (high - low))[None, None]


def other_image_maps(
    interpreter: Interpreter,
    pool_images: torch.Tensor,
    pool_labels: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
) -> torch.Tensor:
    """For each target class, the map of a random correctly classified pool image of that class."""
    classifier = interpreter.classifier
    predicted = classifier.predict(pool_images).argmax(1).cpu()
    correct = predicted == pool_labels.cpu()
    generator = torch.Generator().manual_seed(seed)
    chosen = []
    for target in targets.cpu().tolist():
        candidates = (correct & (pool_labels.cpu() == target)).nonzero().flatten()
        if candidates.numel() == 0:
            raise InputError(f"no correctly classified image of class {target} to take a target map from")
        chosen.append(int(candidates[torch.randint(len(candidates), (1,), generator=generator)]))
    index = torch.tensor(chosen)
    return interpreter(pool_images[index], targets, seed=seed)
