"""Classifier accuracy on a labelled dataset (``underfire evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from .models.classifier import Classifier
from .progress import track


@dataclass(frozen=True)
class EvaluationResult:
    """Accuracy overall and per class; ``per_class`` maps class name → accuracy (None if absent)."""

    model: str
    data: str
    images: int
    accuracy: float
    per_class: dict[str, float | None] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "data": self.data,
            "images": self.images,
            "accuracy": self.accuracy,
            "per_class": self.per_class,
            "counts": self.counts,
        }


def evaluate(
    classifier: Classifier,
    dataset: Dataset,
    *,
    data_name: str = "dataset",
    batch_size: int = 256,
    progress: bool = True,
) -> EvaluationResult:
    """Top-1 accuracy of ``classifier`` over every (image, label) of ``dataset``."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    num_classes = classifier.num_classes
    correct = torch.zeros(num_classes, dtype=torch.long)
    total = torch.zeros(num_classes, dtype=torch.long)
    for images, labels in track(loader, desc=f"evaluate {classifier.name}", enabled=progress, unit="batch"):
        predictions = classifier.predict(images.to(classifier.device), batch_size).argmax(1).cpu()
        labels = torch.as_tensor(labels)
        total += torch.bincount(labels, minlength=num_classes)
        correct += torch.bincount(labels[predictions == labels], minlength=num_classes)
    names = classifier.class_names or [str(i) for i in range(num_classes)]
    per_class = {
        name: (round(float(c) / float(t), 5) if t else None)
        for name, c, t in zip(names, correct.tolist(), total.tolist())
    }
    n = int(total.sum())
    return EvaluationResult(
        model=classifier.name,
        data=data_name,
        images=n,
        accuracy=round(float(correct.sum()) / n, 5) if n else 0.0,
        per_class=per_class,
        counts=dict(zip(names, total.tolist())),
    )


@dataclass(frozen=True)
class LocalisationResult:
    """How well benign maps of the true class point at the object (needs ground-truth masks)."""

    model: str
    interpreter: str
    images: int
    pointing_game: float
    object_iou: float

    def as_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "interpreter": self.interpreter,
            "images": self.images,
            "pointing_game": self.pointing_game,
            "object_iou": self.object_iou,
        }


def localisation(
    interpreter: Any,
    dataset: Any,
    *,
    limit: int | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> LocalisationResult:
    """Pointing game and object IoU of ``interpreter``'s maps for the true class.

    The dataset must provide ``tensors(indices)`` → (images, labels, masks) with object masks,
    as the shapes benchmark and exported folders do.
    """
    from .errors import InputError
    from .metrics import object_iou, pointing_game

    count = len(dataset) if limit is None else min(limit, len(dataset))
    hits: list[torch.Tensor] = []
    ious: list[torch.Tensor] = []
    for start in track(
        range(0, count, batch_size), desc=f"localise {interpreter.name}", enabled=progress, unit="batch"
    ):
        images, labels, masks = dataset.tensors(range(start, min(start + batch_size, count)))
        if masks is None:
            raise InputError("this dataset has no object masks; localisation needs them")
        maps = interpreter(images, labels, seed=seed + start)
        hits.append(pointing_game(maps, masks))
        ious.append(object_iou(maps, masks))
    return LocalisationResult(
        model=interpreter.classifier.name,
        interpreter=interpreter.name,
        images=count,
        pointing_game=round(float(torch.cat(hits).float().mean()), 5),
        object_iou=round(float(torch.cat(ious).mean()), 5),
    )
