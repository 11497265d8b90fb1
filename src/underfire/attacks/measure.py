"""The measures of one attacked batch, computed on what an attacker's file holds.

The adversarial maps come from the *full* interpreter run afresh on the adversarial images for
the target class (MASK from its neutral start, never from the attack's own mask).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..interpreters.base import Interpreter
from ..metrics import DEFAULT_K, iou_top_k, l1_distance, l2_distance, spearman, top_k_intersection


@dataclass(frozen=True)
class AttackMeasures:
    """Per-sample measures; ``iou_by_k`` has one column per top-k fraction in ``ks``."""

    predicted: torch.Tensor
    success: torch.Tensor
    confidence: torch.Tensor
    l1: torch.Tensor
    l2: torch.Tensor
    iou: torch.Tensor
    iou_by_k: torch.Tensor
    top_k_intersection: torch.Tensor
    spearman: torch.Tensor
    maps: torch.Tensor
    ks: tuple[float, ...]


def measure_attack(
    interpreter: Interpreter,
    adversarial: torch.Tensor,
    targets: torch.Tensor,
    reference_maps: torch.Tensor,
    *,
    seed: int = 0,
    ks: Sequence[float] = DEFAULT_K,
) -> AttackMeasures:
    """Classify and explain ``adversarial`` for ``targets``; compare with ``reference_maps``."""
    classifier = interpreter.classifier
    probabilities = classifier.predict(adversarial).softmax(1)
    targets = targets.to(probabilities.device)
    maps = interpreter(adversarial, targets, seed=seed)
    reference = reference_maps.to(maps.device)
    by_k = iou_top_k(maps, reference, ks)
    return AttackMeasures(
        predicted=probabilities.argmax(1).cpu(),
        success=(probabilities.argmax(1) == targets).cpu(),
        confidence=probabilities.gather(1, targets[:, None]).squeeze(1).cpu(),
        l1=l1_distance(maps, reference).cpu(),
        l2=l2_distance(maps, reference).cpu(),
        iou=by_k.mean(1).cpu(),
        iou_by_k=by_k.cpu(),
        top_k_intersection=top_k_intersection(maps, reference).cpu(),
        spearman=spearman(maps, reference).cpu(),
        maps=maps.cpu(),
        ks=tuple(ks),
    )
