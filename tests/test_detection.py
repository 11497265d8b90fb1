"""The ensemble-interpretation detector: its disagreement scores on maps that agree and disagree,
its statistics against hand counts and a plain double loop, and the detector on the built-in model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import underfire as uf
from underfire.detection import (
    DetectorConfig,
    EnsembleDetector,
    detection_rate,
    disagreement,
    roc_auc,
    roc_curve,
    summarize,
    threshold_at_fpr,
)
from underfire.errors import InputError


def blobs(n: int = 5, seed: int = 0) -> torch.Tensor:
    """Maps with one bright square each, at random places."""
    generator = torch.Generator().manual_seed(seed)
    maps = torch.rand(n, 1, 16, 16, generator=generator) * 0.1
    for i in range(n):
        r, c = torch.randint(0, 12, (2,), generator=generator).tolist()
        maps[i, 0, r : r + 4, c : c + 4] += 1.0
    return maps / maps.flatten(1).amax(1).view(-1, 1, 1, 1)


@pytest.mark.parametrize("score", ["iou", "l1", "rank", "soft_iou"])
def test_maps_that_agree_score_low_and_maps_that_disagree_score_high(score: str) -> None:
    a = blobs()
    same = disagreement([a, a.clone(), a.clone()], score)
    assert torch.allclose(same, torch.zeros(5), atol=1e-6)
    opposite = disagreement([a, 1.0 - a], score)
    unrelated = disagreement([a, blobs(seed=7)], score)
    assert (opposite > unrelated.mean()).all() or score == "l1"
    assert (unrelated > 0.2).all() if score != "l1" else (unrelated > 0.05).all()
    # two members agree, the third does not: between the two
    mixed = disagreement([a, a.clone(), 1.0 - a], score)
    assert (mixed > same).all() and (mixed < opposite + 1e-6).all()


def test_iou_score_is_one_minus_the_mean_pairwise_iou_test_by_hand() -> None:
    # the other 15 pixels: the same small, distinct values in both maps (no ties)
    rest = torch.linspace(0.02, 0.01, 20).view(1, 1, 4, 5)
    a, b = rest.clone(), rest.clone()
    a[0, 0, 0, :] = torch.tensor([5.0, 4, 3, 2, 1])
    b[0, 0, 0, :] = torch.tensor([1.0, 2, 3, 4, 5])
    # top 5 % of 20 pixels = 1 pixel: {0} vs {4}: IoU 0; top 10 % = 2: {0,1} vs {3,4}: 0;
    # top 15 % = 3: {0,1,2} vs {2,3,4}: 1/5; top 20 % = 4 pixels: {0..3} vs {1..4}: 3/5; from 25 %
    # on both keep the first row plus the same next pixels: IoU 1
    expected = 1.0 - np.mean([0, 0, 0.2, 0.6, 1, 1, 1, 1, 1, 1])
    assert disagreement([a, b], "iou").item() == pytest.approx(expected, abs=1e-6)


def test_threshold_and_rates_by_hand() -> None:
    benign = np.arange(1, 11) / 10  # 0.1 … 1.0
    assert threshold_at_fpr(benign, 0.2) == pytest.approx(0.8)
    assert detection_rate(benign, threshold_at_fpr(benign, 0.2)) == pytest.approx(0.2)
    assert threshold_at_fpr(benign, 0.0) == pytest.approx(1.0)
    assert threshold_at_fpr(benign, 0.05) == pytest.approx(1.0)  # half a false positive: none allowed
    tied = np.array([0.5] * 8 + [0.9, 1.0])
    assert detection_rate(tied, threshold_at_fpr(tied, 0.3)) <= 0.3
    attacked = np.array([0.75, 0.85, 0.95, 1.5])
    result = summarize(benign, attacked, 0.2)
    assert result["tpr"] == pytest.approx(0.75) and result["fpr"] == pytest.approx(0.2)


def test_auc_matches_a_plain_double_loop_and_the_roc_curves_area() -> None:
    rng = np.random.default_rng(0)
    benign = np.round(rng.normal(0.3, 0.1, 60), 2)  # rounded: ties on purpose
    attacked = np.round(rng.normal(0.45, 0.1, 40), 2)
    slow = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a in attacked for b in benign])
    assert roc_auc(benign, attacked) == pytest.approx(slow, abs=1e-12)
    fpr, tpr = roc_curve(benign, attacked)
    assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1
    assert (np.diff(fpr) >= 0).all() and (np.diff(tpr) >= 0).all()
    assert np.trapezoid(tpr, fpr) == pytest.approx(slow, abs=1e-12)
    assert roc_auc([0.1, 0.2], [0.3, 0.4]) == 1.0 and roc_auc([0.2, 0.2], [0.2]) == 0.5


def test_bad_detector_settings_are_one_line() -> None:
    for kwargs, message in (
        ({"members": ("grad",)}, "two or more"),
        ({"members": ("grad", "grad")}, "two or more"),
        ({"score": "cosine"}, "unknown detector score"),
        ({"grid": 1}, "grid"),
        ({"members": ("grad", "ensemble")}, "single interpreters"),
    ):
        with pytest.raises(InputError, match=message):
            DetectorConfig(**kwargs)
    for call in (
        lambda: threshold_at_fpr([0.1], 1.0),
        lambda: roc_auc([], [0.1]),
        lambda: summarize([np.nan], [0.1], 0.05),
    ):
        with pytest.raises(InputError):
            call()


def test_the_detector_on_the_builtin_model_is_deterministic_and_batch_independent() -> None:
    model = uf.load_model("shapes-resnet")
    images, labels, _ = uf.ShapesDataset("test").tensors(range(6))
    detector = EnsembleDetector(model, DetectorConfig(members=("grad", "cam")))
    maps = detector.maps(images)
    assert [tuple(m.shape) for m in maps] == [(6, 1, 8, 8)] * 2  # CAM's grid, the coarsest
    scores = detector.scores(images)
    assert scores.shape == (6,) and (0 <= scores).all() and (scores <= 1).all()
    single = torch.cat([detector.scores(images[i : i + 1]) for i in range(6)])
    assert torch.allclose(scores, single, atol=1e-6)
    assert torch.equal(scores, detector.scores(images))
    assert torch.equal(scores, detector.scores(images, labels))  # the model is right on these
