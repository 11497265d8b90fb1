"""The ensemble-interpretation detector: interpreters of different classes disagree on an ADV² input.

Zhang et al. (2020, §7) find that ADV² crafted against one interpreter transfers poorly to
interpreters of other classes, and propose explaining an input with several of them: on a benign
input their maps agree, on an adversarial one the attacked interpreter's map looks benign while
the others' do not. The detector explains the predicted class with each member, brings the maps
to one grid (area-averaged down, bilinear up) and scores their disagreement:

* ``"iou"``: 1 − the mean over member pairs of the IoU test (top-k IoU averaged over k = 5 %…50 %,
  the attack table's measure);
* ``"l1"``: the mean over pairs of the mean absolute difference;
* ``"rank"``: 1 − the mean over pairs of Spearman's rank correlation (Ghorbani et al. 2019);
* ``"soft_iou"``: ``"iou"`` with sigmoid-softened top-k sets (``metrics.soft_iou_top_k``): the
  differentiable score an adaptive attacker can add to ℓ_int (the ensemble's ``detector_score``).

A threshold is calibrated on benign scores for a chosen false-positive rate; the statistics
(threshold, TPR at it, ROC AUC as the Mann–Whitney probability) are plain functions of score
arrays, so a run's stored images can be scored once and summarised many ways.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy.stats import mannwhitneyu

from .errors import InputError
from .interpreters import Interpreter, build_interpreter
from .metrics import SCORES, Score, disagreement, to_grid
from .models.classifier import Classifier


@dataclass(frozen=True)
class DetectorConfig:
    """Which interpreters explain, on which grid, scored how.

    Args:
        members: two or more registered interpreter names (of different classes, to be useful).
        score: the disagreement score (module docstring).
        grid: the common grid's side; ``None``: the coarsest member map's size.
        member_options: options of members (name → options), as ``build_interpreter`` takes them;
            a run's detector gives every member the run has the run's options, so it explains
            with the interpreters the run judged.
    """

    members: tuple[str, ...] = ("grad", "cam", "rts", "mask")
    score: Score = "iou"
    grid: int | None = None
    member_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        members = tuple(self.members)
        if len(members) < 2 or len(set(members)) != len(members):
            raise InputError(f"the detector needs two or more distinct interpreters, got {list(members)}")
        object.__setattr__(self, "members", members)
        if "ensemble" in members:
            raise InputError("the detector's members are single interpreters (the ensemble is the detector itself)")
        if self.score not in SCORES:
            raise InputError(f"unknown detector score {self.score!r}; choose one of {', '.join(SCORES)}")
        if self.grid is not None and (isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 2):
            raise InputError(f"the detector's grid must be an integer >= 2, got {self.grid!r}")
        if not isinstance(self.member_options, Mapping) or set(self.member_options) - set(members):
            raise InputError("the detector's member_options must be a table per member (name → options)")
        object.__setattr__(
            self, "member_options", {name: dict(self.member_options[name]) for name in sorted(self.member_options)}
        )


class EnsembleDetector:
    """Scores how much ``config.members`` disagree on each input's predicted class."""

    def __init__(self, classifier: Classifier, config: DetectorConfig | None = None) -> None:
        self.classifier = classifier
        self.config = config or DetectorConfig()
        self.members: list[Interpreter] = [
            build_interpreter(name, classifier, **self.config.member_options.get(name, {}))
            for name in self.config.members
        ]

    def maps(self, images: torch.Tensor, classes: Any = None) -> list[torch.Tensor]:
        """Each member's maps of ``classes`` (default: the predictions) on the common grid."""
        images = self.classifier.prepare_images(images)
        if classes is None:
            with torch.no_grad():
                classes = self.classifier.predict(images).argmax(1)
        raw = [member(images, classes, seed=0) for member in self.members]
        if self.config.grid is None:
            size = min((tuple(m.shape[-2:]) for m in raw), key=lambda s: s[0] * s[1])
        else:
            size = (self.config.grid, self.config.grid)
        return [to_grid(m, size) for m in raw]

    def scores(self, images: torch.Tensor, classes: Any = None) -> torch.Tensor:
        """(N,) disagreement: high = the members disagree."""
        return disagreement(self.maps(images, classes), self.config.score)


# --- statistics on score arrays ----------------------------------------------------------------


def _scores(values: Any, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=float).ravel()
    if array.size == 0:
        raise InputError(f"no {what} scores")
    if not np.isfinite(array).all():
        raise InputError(f"the {what} scores hold NaN or infinite values")
    return array


def threshold_at_fpr(benign: Any, fpr: float) -> float:
    """The lowest threshold t with at most ``fpr`` of the benign scores above it (flag: score > t)."""
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 <= fpr < 1:
        raise InputError(f"the false-positive rate must be in [0, 1), got {fpr!r}")
    ordered = np.sort(_scores(benign, "benign"))
    allowed = int(math.floor(fpr * ordered.size + 1e-9))
    return float(ordered[ordered.size - 1 - allowed])


def detection_rate(scores: Any, threshold: float) -> float:
    """Share of ``scores`` above ``threshold`` (flagged)."""
    return float((_scores(scores, "attacked") > threshold).mean())


def roc_auc(benign: Any, attacked: Any) -> float:
    """P(attacked score > benign score), ties half: the area under the ROC curve."""
    benign, attacked = _scores(benign, "benign"), _scores(attacked, "attacked")
    statistic = mannwhitneyu(attacked, benign, alternative="greater").statistic
    return float(statistic / (attacked.size * benign.size))


def roc_curve(benign: Any, attacked: Any) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) over every threshold, from (0, 0) to (1, 1)."""
    benign, attacked = _scores(benign, "benign"), _scores(attacked, "attacked")
    thresholds = np.unique(np.concatenate([benign, attacked]))[::-1]
    fpr = [0.0] + [float((benign >= t).mean()) for t in thresholds]
    tpr = [0.0] + [float((attacked >= t).mean()) for t in thresholds]
    return np.asarray(fpr), np.asarray(tpr)


def summarize(benign: Any, attacked: Any, fpr: float) -> dict[str, float]:
    """Threshold at ``fpr`` (on ``benign``), the realised FPR, the TPR and the AUC."""
    threshold = threshold_at_fpr(benign, fpr)
    return {
        "threshold": threshold,
        "fpr": detection_rate(benign, threshold),
        "tpr": detection_rate(attacked, threshold),
        "auc": roc_auc(benign, attacked),
    }
