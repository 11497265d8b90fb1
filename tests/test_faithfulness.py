"""Faithfulness and robustness metrics on hand-built cases with values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from underfire import Classifier, InputError
from underfire.faithfulness import deletion_auc, deletion_curve, insertion_auc, sensitivity
from underfire.interpreters import build_interpreter

#: the per-pixel weights of class 0's logit (class 1's logit is 0); every channel weighs a third
WEIGHTS = torch.tensor([[4.0, 1.0], [3.0, 2.0]])


def linear_classifier() -> Classifier:
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 2, bias=False))
    with torch.no_grad():
        net[1].weight.zero_()
        net[1].weight[0] = (WEIGHTS / 3).flatten().repeat(3)  # channel-major flattening of (3, 2, 2)
    return Classifier(net.eval(), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=2, num_classes=2)


def sigmoid(values: list[float]) -> torch.Tensor:
    return torch.tensor([1 / (1 + math.exp(-v)) for v in values])


def test_deletion_and_insertion_by_hand() -> None:
    """A white 2×2 image, logit₀ = Σ W·pixel = 10: removing the pixels in the map's order (4, 3,
    2, 1) to black leaves logits 10, 6, 3, 1, 0; inserting them into black gives 0, 4, 7, 9, 10."""
    clf = linear_classifier()
    image = torch.ones(1, 3, 2, 2)
    truthful = WEIGHTS.view(1, 1, 2, 2) / 4
    curve = deletion_curve(clf, image, truthful, [0], steps=4, baseline="black")
    torch.testing.assert_close(curve[0], sigmoid([10, 6, 3, 1, 0]))
    expected = torch.trapezoid(sigmoid([10, 6, 3, 1, 0]), dx=0.25)
    torch.testing.assert_close(deletion_auc(clf, image, truthful, [0], steps=4, baseline="black")[0], expected)
    inserted = torch.trapezoid(sigmoid([0, 4, 7, 9, 10]), dx=0.25)
    torch.testing.assert_close(insertion_auc(clf, image, truthful, [0], steps=4, baseline="black")[0], inserted)
    # the reversed map deletes the least important first: a higher deletion AUC, a lower insertion one
    reversed_map = 1 - truthful
    assert deletion_auc(clf, image, reversed_map, [0], steps=4, baseline="black") > expected
    assert insertion_auc(clf, image, reversed_map, [0], steps=4, baseline="black") < inserted


def test_a_coarse_map_orders_the_pixels_of_its_cells_and_batches_equal_singles() -> None:
    clf = linear_classifier()
    images = torch.rand(3, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    maps = torch.rand(3, 1, 2, 2, generator=torch.Generator().manual_seed(1))
    together = deletion_auc(clf, images, maps, [0, 1, 0], steps=4, baseline="black")
    alone = torch.cat(
        [
            deletion_auc(clf, images[i : i + 1], maps[i : i + 1], [c], steps=4, baseline="black")
            for i, c in enumerate([0, 1, 0])
        ]
    )
    torch.testing.assert_close(together, alone)
    with pytest.raises(InputError, match="maps must be"):
        deletion_auc(clf, images, maps[:, 0], [0, 1, 0])
    with pytest.raises(InputError, match="steps"):
        deletion_auc(clf, images, maps, [0, 1, 0], steps=0)


def test_sensitivity_is_zero_where_the_map_cannot_move_and_not_where_it_can() -> None:
    """GRAD of a linear model is its weights whatever the input: sensitivity 0. Through a ReLU
    layer whose units switch under the noise, it moves."""
    clf = linear_classifier()
    images = torch.rand(2, 3, 2, 2, generator=torch.Generator().manual_seed(2))
    grad = build_interpreter("grad", clf)
    assert torch.equal(sensitivity(grad, images, [0, 0], radius=0.1, samples=4), torch.zeros(2))
    torch.manual_seed(0)
    bent = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 2)).eval()
    curved = Classifier(bent, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), input_size=2, num_classes=2)
    grad = build_interpreter("grad", curved)
    worst = sensitivity(grad, images, [0, 1], radius=0.5, samples=6)
    mean = sensitivity(grad, images, [0, 1], radius=0.5, samples=6, kind="avg")
    assert bool((worst >= mean).all()) and bool((worst > 0).any())
