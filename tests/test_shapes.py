"""The procedural "shapes" benchmark: determinism, exact masks, balance, types and errors."""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from underfire.data import SHAPE_CLASSES, ShapeSample, ShapesDataset
from underfire.data.shapes import SPLITS
from underfire.errors import InputError


@pytest.fixture(scope="module")
def test_split() -> ShapesDataset:
    return ShapesDataset("test", size=64, seed=0)


def test_classes_and_default_lengths() -> None:
    assert SHAPE_CLASSES == (
        "circle",
        "square",
        "triangle",
        "star",
        "cross",
        "ring",
        "crescent",
        "heart",
        "arrow",
        "ell",
    )
    assert SPLITS == {"train": 20000, "val": 2000, "test": 2000}
    for split, n in SPLITS.items():
        ds = ShapesDataset(split)
        assert len(ds) == n and ds.split == split and ds.size == 64 and ds.seed == 0
        assert ds.class_names == list(SHAPE_CLASSES)
    assert len(ShapesDataset("train", length=7)) == 7


def test_item_type_shape_and_range(test_split: ShapesDataset) -> None:
    image, label = test_split[13]
    assert isinstance(image, torch.Tensor) and image.dtype == torch.float32
    assert image.shape == (3, 64, 64)
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert isinstance(label, int) and label == 13 % 10
    # The tensor is exactly the rendered uint8 image / 255 (so a PNG export re-reads identically).
    sample = test_split.render(13)
    assert torch.equal(image, torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255.0)


def test_sample_fields(test_split: ShapesDataset) -> None:
    s = test_split.render(4)
    assert isinstance(s, ShapeSample)
    assert s.image.dtype == np.uint8 and s.image.shape == (64, 64, 3)
    assert s.mask.dtype == bool and s.mask.shape == (64, 64)
    assert s.label == 4 and s.class_name == "cross" and s.index == 4
    assert 0 <= s.centre[0] <= 64 and 0 <= s.centre[1] <= 64
    assert 0.2 * 64 <= s.scale <= 0.38 * 64
    assert 0.0 <= s.angle < 360.0
    assert all(0.0 <= c <= 1.0 for c in s.colour)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.label = 3  # type: ignore[misc]


def test_deterministic_across_access_orders_and_instances() -> None:
    a = ShapesDataset("val", seed=3)
    b = ShapesDataset("val", seed=3)
    order_a = [5, 17, 2, 5]
    order_b = [2, 17, 5]
    first = {i: a.render(i).image.copy() for i in order_a}
    second = {i: b.render(i).image.copy() for i in order_b}
    for i in order_b:
        assert np.array_equal(first[i], second[i])
    assert np.array_equal(a.render(17).mask, b.render(17).mask)
    x1, _ = a[2]
    x2, _ = b[2]
    assert torch.equal(x1, x2)


def test_seeds_and_splits_give_different_images() -> None:
    ref = ShapesDataset("test", seed=0).render(0).image
    assert not np.array_equal(ref, ShapesDataset("test", seed=1).render(0).image)
    assert not np.array_equal(ref, ShapesDataset("train", seed=0).render(0).image)
    assert not np.array_equal(ref, ShapesDataset("val", seed=0).render(0).image)
    # No image is shared between the splits (checked on the first few of each).
    seen: set[bytes] = set()
    for split in SPLITS:
        ds = ShapesDataset(split)
        for i in range(20):
            seen.add(ds.render(i).image.tobytes())
    assert len(seen) == 60


def test_mask_covers_exactly_the_object(test_split: ShapesDataset) -> None:
    for i in range(30):  # three of every class
        full = test_split.render(i)
        bare = test_split.render(i, with_object=False)
        assert np.array_equal(full.mask, bare.mask)
        assert (full.centre, full.scale, full.angle, full.colour) == (
            bare.centre,
            bare.scale,
            bare.angle,
            bare.colour,
        )
        changed = (full.image != bare.image).any(axis=2)
        # Outside the mask nothing was painted by the object...
        assert not (changed & ~full.mask).any(), f"image {i}: object pixels outside its mask"
        # ...and inside it the object replaced (almost) every pixel.
        assert changed[full.mask].mean() > 0.98, f"image {i}: mask pixels not painted"
        area = full.mask.mean()
        assert 0.03 <= area <= 0.60, f"image {i} ({full.class_name}): mask area {area:.3f}"


def test_object_contrasts_with_its_surroundings(test_split: ShapesDataset) -> None:
    for i in range(20):
        full = test_split.render(i)
        bare = test_split.render(i, with_object=False)
        obj = full.image[full.mask].astype(float).mean(axis=0) / 255
        under = bare.image[full.mask].astype(float).mean(axis=0) / 255
        assert np.linalg.norm(obj - under) > 0.2, f"image {i}: object blends into background"


def test_mask_and_tensors(test_split: ShapesDataset) -> None:
    m = test_split.mask(6)
    assert m.dtype == torch.bool and m.shape == (1, 64, 64)
    assert torch.equal(m[0], torch.from_numpy(test_split.render(6).mask))
    images, labels, masks = test_split.tensors([6, 1, 6])
    assert images.shape == (3, 3, 64, 64) and images.dtype == torch.float32
    assert labels.dtype == torch.long and labels.tolist() == [6, 1, 6]
    assert masks.shape == (3, 1, 64, 64) and masks.dtype == torch.bool
    assert torch.equal(images[0], test_split[6][0]) and torch.equal(images[0], images[2])
    assert torch.equal(masks[0], m)
    small = ShapesDataset("test", length=4)
    images, labels, masks = small.tensors()
    assert images.shape[0] == labels.shape[0] == masks.shape[0] == 4
    empty = small.tensors([])
    assert empty[0].shape == (0, 3, 64, 64) and empty[2].shape == (0, 1, 64, 64)


def test_labels_balanced_and_every_class_drawn() -> None:
    ds = ShapesDataset("val")
    counts = np.bincount([ds.label(i) for i in range(len(ds))], minlength=10)
    assert counts.tolist() == [200] * 10
    seen = {ds.render(i).class_name for i in range(10)}
    assert seen == set(SHAPE_CLASSES)
    assert all(ds.render(i).label == ds.label(i) for i in range(10, 15))


def test_other_sizes() -> None:
    for size in (32, 96):
        ds = ShapesDataset("test", size=size, length=10)
        image, _ = ds[3]
        assert image.shape == (3, size, size)
        for i in range(10):
            assert 0.03 <= ds.render(i).mask.mean() <= 0.60


def test_dataloader_batches() -> None:
    loader = DataLoader(ShapesDataset("test", length=10), batch_size=4)
    images, labels = next(iter(loader))
    assert images.shape == (4, 3, 64, 64) and labels.tolist() == [0, 1, 2, 3]


def test_negative_and_out_of_range_indices() -> None:
    ds = ShapesDataset("test", length=5)
    assert np.array_equal(ds.render(-1).image, ds.render(4).image)
    with pytest.raises(IndexError):
        ds[5]
    with pytest.raises(IndexError):
        ds.render(-6)
    with pytest.raises(IndexError):
        ds.mask(100)
    with pytest.raises(IndexError):
        ds.tensors([0, 5])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"split": "training"}, "unknown shapes split"),
        ({"size": 31}, "size"),
        ({"size": 0}, "size"),
        ({"size": 64.0}, "size"),
        ({"seed": -1}, "seed"),
        ({"length": -2}, "length"),
    ],
)
def test_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(InputError, match=fragment):
        ShapesDataset(**kwargs)


def test_generation_is_fast() -> None:
    ds = ShapesDataset("train")
    start = time.perf_counter()
    for i in range(300):
        ds.render(i)
    # About 1 ms an image on one core; generous bound for a loaded machine.
    assert time.perf_counter() - start < 6.0
