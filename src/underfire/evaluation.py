"""Classifier accuracy on a labelled dataset (``underfire evaluate``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .models.classifier import Classifier


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
    for images, labels in tqdm(loader, desc=f"evaluate {classifier.name}", disable=not progress, unit="batch"):
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
