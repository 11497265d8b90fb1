"""The measures on hand-built maps with known answers, and against slow plain-Python references."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from underfire import InputError
from underfire.metrics import (
    DEFAULT_K,
    iou_top_k,
    l1_distance,
    l2_distance,
    object_iou,
    pointing_game,
    soft_iou_top_k,
    spearman,
    top_k_intersection,
    top_k_mask,
)


def maps_from(*rows: list[float], side: int) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 1, side, side)


def test_distances_analytic() -> None:
    a = maps_from([0, 0, 0, 0], [1, 1, 1, 1], side=2)
    b = maps_from([1, 0, 0, 0], [1, 1, 1, 1], side=2)
    assert l1_distance(a, b).tolist() == [0.25, 0.0]
    assert l2_distance(a, b).tolist() == [0.5, 0.0]  # sqrt(1/4)


def test_distances_resize_to_the_finer_map() -> None:
    coarse = torch.ones(1, 1, 2, 2)
    fine = torch.ones(1, 1, 8, 8)
    assert l1_distance(coarse, fine).item() == 0.0


def test_top_k_mask_keeps_exactly_k() -> None:
    flat = torch.tensor([[0.1, 0.9, 0.5, 0.7, 0.3, 0.2, 0.8, 0.4, 0.6, 0.0]])
    assert top_k_mask(flat, 0.3).nonzero()[:, 1].tolist() == [1, 3, 6]
    assert top_k_mask(torch.zeros(1, 20), 0.25).sum() == 5  # ties still give k pixels
    with pytest.raises(InputError, match="fraction"):
        top_k_mask(flat, 0.0)


def test_iou_top_k_analytic() -> None:
    a = maps_from([4, 3, 2, 1], side=2)
    b = maps_from([4, 1, 2, 3], side=2)
    iou = iou_top_k(a, b, fractions=(0.25, 0.5, 1.0))
    # top-1: {0} vs {0} → 1; top-2: {0,1} vs {0,3} → 1/3; all: 1
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1 / 3, 1.0]]))
    assert iou_top_k(a, a).shape == (1, len(DEFAULT_K))
    assert (iou_top_k(a, a) == 1).all()


def test_top_k_intersection_analytic() -> None:
    a = maps_from([4, 3, 2, 1], side=2)
    b = maps_from([1, 3, 2, 4], side=2)
    assert top_k_intersection(a, b, 0.5).item() == 0.5


def test_spearman_matches_scipy_and_handles_constants() -> None:
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(3, 1, 5, 5, generator=generator)
    b = a + 0.3 * torch.rand(3, 1, 5, 5, generator=generator)
    ours = spearman(a, b)
    for i in range(3):
        expected = spearmanr(a[i].flatten().numpy(), b[i].flatten().numpy()).statistic
        assert ours[i].item() == pytest.approx(expected, abs=1e-6)
    assert spearman(torch.zeros(1, 1, 3, 3), a[:1, :, :3, :3]).item() == 0.0
    assert spearman(a, a).tolist() == pytest.approx([1.0, 1.0, 1.0])


def test_pointing_game_and_object_iou() -> None:
    objects = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    objects[:, :, :2, :2] = True  # the object is the top-left quarter
    maps = torch.zeros(2, 1, 4, 4)
    maps[0, 0, 0, 1] = 1.0  # peak inside
    maps[1, 0, 3, 3] = 1.0  # peak outside
    assert pointing_game(maps, objects).tolist() == [True, False]
    perfect = objects.float()
    assert object_iou(perfect, objects).tolist() == [1.0, 1.0]
    inverse = 1 - objects.float()
    assert object_iou(inverse, objects).tolist() == [0.0, 0.0]


def test_pointing_game_resizes_coarse_maps() -> None:
    objects = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    objects[..., 40:60, 40:60] = True
    coarse = torch.zeros(1, 1, 8, 8)
    coarse[..., 6, 6] = 1.0
    assert pointing_game(coarse, objects).item()


def test_metric_input_errors() -> None:
    with pytest.raises(InputError, match=r"\(N, 1, h, w\)"):
        l1_distance(torch.zeros(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(InputError, match="2 maps with 3 maps"):
        l1_distance(torch.zeros(2, 1, 4, 4), torch.zeros(3, 1, 4, 4))
    with pytest.raises(InputError, match="NaN"):
        iou_top_k(torch.full((1, 1, 2, 2), float("nan")), torch.zeros(1, 1, 2, 2))


def test_iou_reference_on_random_maps() -> None:
    """Against a plain-numpy reference (argsort-based top-k)."""
    rng = np.random.default_rng(0)
    a, b = rng.random((4, 1, 7, 7)), rng.random((4, 1, 7, 7))
    ours = iou_top_k(torch.tensor(a), torch.tensor(b), fractions=(0.1, 0.3))
    for i in range(4):
        for j, fraction in enumerate((0.1, 0.3)):
            k = round(fraction * 49)
            top_a = set(np.argsort(-a[i].ravel())[:k])
            top_b = set(np.argsort(-b[i].ravel())[:k])
            assert ours[i, j].item() == pytest.approx(len(top_a & top_b) / len(top_a | top_b))


def test_pointing_game_tolerance() -> None:
    """15 px at 224 (Zhang et al. 2016), scaled: 4.3 px at 64; Euclidean distance."""
    objects = torch.zeros(1, 1, 64, 64, dtype=torch.bool)
    objects[..., 20:40, 20:40] = True
    near = torch.zeros(1, 1, 64, 64)
    near[..., 29, 43] = 1.0  # 4 px right of the object
    diagonal = torch.zeros(1, 1, 64, 64)
    diagonal[..., 43, 43] = 1.0  # 4 px right and 4 px down: 5.66 px away
    assert pointing_game(near, objects).item()
    assert not pointing_game(near, objects, tolerance=0).item()
    assert not pointing_game(diagonal, objects).item()
    assert pointing_game(diagonal, objects, tolerance=6).item()
    with pytest.raises(InputError, match="tolerance"):
        pointing_game(near, objects, tolerance=-1)


def test_the_soft_iou_test_tends_to_the_hard_one_and_has_an_input_gradient() -> None:
    generator = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 8, 8, generator=generator), torch.rand(3, 1, 8, 8, generator=generator)
    hard = iou_top_k(a, b)
    assert torch.allclose(soft_iou_top_k(a, b, temperature=1e-4), hard, atol=1e-4)  # random maps: no ties
    assert torch.allclose(soft_iou_top_k(a, a), torch.ones(3, len(DEFAULT_K)))
    assert (soft_iou_top_k(a, b) - hard).abs().max() < 0.1  # the default temperature: near, not equal
    x = a.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(soft_iou_top_k(x, b).sum(), x)
    assert gradient.abs().sum() > 0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(InputError, match="temperature must be a finite number > 0"):
            soft_iou_top_k(a, b, temperature=bad)


def test_the_soft_iou_test_equals_its_plain_per_k_definition_value_and_gradient() -> None:
    """One sort per map serves every k; the result is the definition computed k by k (a top-k and
    a standard deviation per k), bit for bit, so attacks using it are unchanged."""

    def by_definition(a: torch.Tensor, b: torch.Tensor, fractions: tuple[float, ...]) -> torch.Tensor:
        a, b = a.flatten(1), b.flatten(1)
        columns = []
        for fraction in fractions:
            k = max(1, round(fraction * a.shape[1]))
            sets = []
            for m in (a, b):
                if k >= m.shape[1]:
                    sets.append(torch.ones_like(m))
                    continue
                values = m.detach().topk(k + 1, dim=1).values
                threshold = (values[:, k - 1 : k] + values[:, k : k + 1]) / 2
                sets.append(torch.sigmoid((m - threshold) / (0.05 * m.detach().std(1, keepdim=True))))
            columns.append(torch.minimum(*sets).sum(1) / torch.maximum(*sets).sum(1))
        return torch.stack(columns, 1)

    generator = torch.Generator().manual_seed(1)
    for shape, fractions in (((4, 1, 16, 12), DEFAULT_K), ((2, 1, 3, 3), (0.05, 0.5, 1.0))):
        a = torch.rand(shape, generator=generator).requires_grad_(True)
        b = torch.rand(shape, generator=generator)
        ours, reference = soft_iou_top_k(a, b, fractions), by_definition(a, b, fractions)
        assert torch.equal(ours, reference)
        assert torch.equal(*(torch.autograd.grad(value.sum(), a)[0] for value in (ours, reference)))
