"""What a run attacks: the images (files, or correctly classified images of a dataset), the target
classes and the target maps of each batch."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..attacks.targets import load_user_map, other_image_maps, shape_maps
from ..data import ShapesDataset, read_image
from ..data.shapes import SHAPE_CLASSES
from ..errors import InputError
from ..interpreters import Interpreter
from ..metrics import resize_maps
from ..models.classifier import Classifier


def images_from_files(classifier: Classifier, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read every file first (a bad file fails before any work); labels = the benign predictions;
    names ``NNNN-STEM`` (position and a file-name-safe stem: names become file names in a run)."""
    size = classifier.input_size or 224
    images = torch.stack([read_image(path, size, classifier.in_channels) for path in paths])
    labels = classifier.predict(images).argmax(1).cpu()
    names = [
        f"{i:04d}-{re.sub(r'[^A-Za-z0-9_.-]+', '-', Path(path).stem).strip('-.')[:60] or 'image'}"
        for i, path in enumerate(paths)
    ]
    return images, labels, names


def images_from_dataset(
    classifier: Classifier, dataset: Any, limit: int, exclude: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str], list[int]]:
    """The first ``limit`` correctly classified images of a labelled dataset (none of class
    ``exclude``: a fixed target class would be vacuous for them): images, labels, names and their
    indices in the dataset."""
    chosen: list[int] = []
    step = max(64, limit)
    for start in range(0, len(dataset), step):
        indices = list(range(start, min(start + step, len(dataset))))
        images, labels, _ = dataset.tensors(indices)
        keep = classifier.predict(images).argmax(1).cpu() == labels
        if exclude is not None:
            keep &= labels != exclude
        correct = keep.nonzero().flatten().tolist()
        chosen += [indices[i] for i in correct]
        if len(chosen) >= limit:
            break
    chosen = chosen[:limit]
    if not chosen:
        raise InputError("no correctly classified image in the dataset")
    images, labels, _ = dataset.tensors(chosen)
    return images, labels, [f"{getattr(dataset, 'split', 'image')}-{i:05d}" for i in chosen], chosen


def make_target_maps(
    interpreter: Interpreter,
    kind: str,
    benign: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    *,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    resize: bool = False,
) -> torch.Tensor:
    """The maps the attacker wants for a batch: ``benign`` (its own benign maps), ``other`` (the
    map of another image of the target class, drawn from ``pool`` or the shapes val split),
    ``shape``/``circle``/``rectangle`` (seeded random shapes) or a ``.npy`` file (resized to the
    interpreter's map size when ``resize``, else it must match)."""
    if kind == "benign":
        return benign
    if kind != "other" and not interpreter.accepts_drawn_targets:
        raise InputError(drawn_target_refusal(interpreter.name, kind))
    size = tuple(benign.shape[-2:])
    if kind in ("shape", "circle", "rectangle"):
        return shape_maps("circle" if kind == "shape" else kind, len(targets), size, seed)
    if kind == "other":
        pool_images, pool_labels = pool if pool is not None else other_pool(interpreter.classifier)
        return other_image_maps(interpreter, pool_images, pool_labels, targets, seed)
    user = load_user_map(kind)
    if tuple(user.shape[-2:]) != size:
        if not resize:
            raise InputError(f"target map {kind!r} is {tuple(user.shape[-2:])}, the {interpreter.name} maps are {size}")
        user = resize_maps(user, size).clamp(0, 1)  # type: ignore[arg-type]
    return user.expand(len(targets), -1, -1, -1)


def drawn_target_refusal(interpreter: str, kind: str) -> str:
    return (
        f"target map {kind!r} is drawn at the map's size, which for {interpreter} (several maps side by side) "
        "is not one target per member; use benign or other"
    )


def other_pool(classifier: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``other`` target maps come from: 500 images of the shapes benchmark's val split."""
    if classifier.class_names != list(SHAPE_CLASSES):
        raise InputError("target map 'other' draws its maps from the shapes benchmark; use a shapes model")
    images, labels, _ = ShapesDataset("val", classifier.input_size or 64).tensors(range(500))
    return images, labels
