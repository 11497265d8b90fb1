"""Users' images and folders, PNG export round trips and data spec strings (real files only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from underfire.data import (
    SHAPE_CLASSES,
    ImageFolderDataset,
    ShapesDataset,
    export_dataset,
    load_images,
    open_dataset,
    read_class_names,
    read_image,
)
from underfire.errors import ImageReadError, InputError, SpecError


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, **kwargs)
    return path


# ------------------------------------------------------------------------------- read_image


def test_rgb_png_exact(tmp_path: Path) -> None:
    arr = _rgb(12, 20)
    x = read_image(_save(tmp_path / "a.png", arr))
    assert x.dtype == torch.float32 and x.shape == (3, 12, 20)
    assert torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0)


def test_grayscale_modes(tmp_path: Path) -> None:
    grey = np.arange(0, 240, 2, dtype=np.uint8).reshape(10, 12)
    x = read_image(_save(tmp_path / "l.png", grey))
    assert x.shape == (3, 10, 12)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
    assert torch.allclose(x[0], torch.from_numpy(grey).float() / 255.0)

    bits = Image.fromarray(grey > 100).convert("1")
    bits.save(tmp_path / "bits.png")
    y = read_image(tmp_path / "bits.png")
    assert y.shape == (3, 10, 12) and set(y.unique().tolist()) <= {0.0, 1.0}

    deep = (np.linspace(0, 65535, 10 * 12).reshape(10, 12)).astype(np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")  # 16-bit greyscale PNG
    z = read_image(tmp_path / "deep.png")
    assert z.shape == (3, 10, 12)
    assert torch.allclose(z[0], torch.from_numpy(deep.astype(np.float32) / 65535.0), atol=1e-6)
    assert z.max() == 1.0 and z.min() == 0.0


def test_rgba_composited_on_white(tmp_path: Path) -> None:
    arr = np.zeros((4, 4, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red
    arr[:2, :, 3] = 255  # top half opaque
    arr[2:, :, 3] = 0  # bottom half transparent
    x = read_image(_save(tmp_path / "rgba.png", arr))
    assert x.shape == (3, 4, 4)
    assert torch.equal(x[:, :2], torch.tensor([1.0, 0.0, 0.0])[:, None, None].expand(3, 2, 4))
    assert torch.equal(x[:, 2:], torch.ones(3, 2, 4))
    la = Image.fromarray(arr[..., [1, 3]], mode="LA")  # black where opaque
    la.save(tmp_path / "la.png")
    y = read_image(tmp_path / "la.png")
    assert torch.equal(y[:, :2], torch.zeros(3, 2, 4)) and torch.equal(y[:, 2:], torch.ones(3, 2, 4))


def test_palette_png(tmp_path: Path) -> None:
    img = Image.new("P", (6, 5))
    img.putpalette([255, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (0, 0, 3, 5))  # left half: index 1 = blue
    img.save(tmp_path / "p.png")
    x = read_image(tmp_path / "p.png")
    assert x.shape == (3, 5, 6)
    assert x[:, 0, 0].tolist() == [0.0, 0.0, 1.0] and x[:, 0, 5].tolist() == [1.0, 0.0, 0.0]


def test_jpeg(tmp_path: Path) -> None:
    arr = np.zeros((16, 16, 3), dtype=np.uint8)
    arr[..., 1] = 200
    x = read_image(_save(tmp_path / "a.jpg", arr, quality=95))
    assert x.shape == (3, 16, 16) and 0.0 <= x.min() and x.max() <= 1.0
    assert torch.allclose(x.mean(dim=(1, 2)), torch.tensor([0.0, 200 / 255, 0.0]), atol=0.03)


def test_resize_and_centre_crop(tmp_path: Path) -> None:
    arr = np.zeros((40, 120, 3), dtype=np.uint8)  # wide: red | green (middle half) | blue
    arr[:, :30, 0] = 255
    arr[:, 30:90, 1] = 255
    arr[:, 90:, 2] = 255
    x = read_image(_save(tmp_path / "wide.png", arr), size=20)
    assert x.shape == (3, 20, 20)
    # Shorter side 40 -> 20 gives 60 x 20; the central 20 columns lie inside the green half.
    assert torch.allclose(x, torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 20, 20))
    tall = read_image(_save(tmp_path / "tall.png", arr.transpose(1, 0, 2).copy()), size=16)
    assert tall.shape == (3, 16, 16)
    assert torch.allclose(tall[:, 8, 8], torch.tensor([0.0, 1.0, 0.0]))
    up = read_image(tmp_path / "wide.png", size=100)
    assert up.shape == (3, 100, 100) and 0.0 <= up.min() and up.max() <= 1.0


def test_size_equal_to_image_is_exact(tmp_path: Path) -> None:
    arr = _rgb(32, 32, seed=5)
    p = _save(tmp_path / "sq.png", arr)
    assert torch.equal(read_image(p, size=32), read_image(p))
    crop = read_image(_save(tmp_path / "r.png", _rgb(32, 40, seed=6)), size=32)
    assert torch.equal(crop, torch.from_numpy(_rgb(32, 40, seed=6)[:, 4:36]).permute(2, 0, 1) / 255.0)


def test_unreadable_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.png"
    junk.write_bytes(np.random.default_rng(0).bytes(500))
    with pytest.raises(ImageReadError, match=r"cannot read image '.*junk\.png': cannot identify"):
        read_image(junk)

    good = _save(tmp_path / "full.png", _rgb(64, 64, seed=1))
    data = good.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"cut\.png") as info:
        read_image(cut)
    assert "\n" not in str(info.value)

    with pytest.raises(ImageReadError, match=r"cannot read image '.*missing\.png': no such file"):
        read_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    with pytest.raises(ImageReadError, match=r"empty\.jpg"):
        read_image(empty)


def test_bad_size_argument(tmp_path: Path) -> None:
    p = _save(tmp_path / "a.png", _rgb(8, 8))
    for bad in (0, -3, 2.5, True):
        with pytest.raises(InputError, match="size"):
            read_image(p, size=bad)  # type: ignore[arg-type]


def test_load_images(tmp_path: Path) -> None:
    paths = [_save(tmp_path / f"{k}.png", _rgb(10 + k, 14, seed=k)) for k in range(3)]
    batch = load_images(paths, 8)
    assert batch.shape == (3, 3, 8, 8) and batch.dtype == torch.float32
    assert torch.equal(batch[1], read_image(paths[1], 8))
    with pytest.raises(InputError, match="no image paths"):
        load_images([], 8)
    with pytest.raises(ImageReadError, match="nope.png"):
        load_images([paths[0], tmp_path / "nope.png"], 8)


def test_read_class_names(tmp_path: Path) -> None:
    f = tmp_path / "classes.txt"
    f.write_text("cat\n\n  dog  \nbird\n", encoding="utf-8")
    assert read_class_names(f) == ["cat", "dog", "bird"]
    f.write_text("cat\ndog\ncat\n", encoding="utf-8")
    with pytest.raises(InputError, match="'cat' twice"):
        read_class_names(f)
    f.write_text("\n \n", encoding="utf-8")
    with pytest.raises(InputError, match="no class names"):
        read_class_names(f)
    with pytest.raises(InputError, match="does not exist"):
        read_class_names(tmp_path / "none.txt")


# ------------------------------------------------------------------------ ImageFolderDataset


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "set"
    _save(root / "zebra" / "z1.png", _rgb(20, 30, 1))
    _save(root / "zebra" / "z2.jpg", _rgb(30, 20, 2))
    _save(root / "ant" / "a1.png", _rgb(16, 16, 3))
    _save(root / "ant" / "deeper" / "a2.bmp", _rgb(16, 16, 4))
    _save(root / "ant" / ".hidden.png", _rgb(16, 16, 5))
    (root / "ant" / "notes.txt").write_text("not an image")
    (root / ".cache").mkdir()
    return root


def test_folder_sorted_class_names(folder: Path) -> None:
    ds = ImageFolderDataset(folder, size=12)
    assert ds.class_names == ["ant", "zebra"]
    assert [(p.name, y) for p, y in ds.samples] == [("a1.png", 0), ("a2.bmp", 0), ("z1.png", 1), ("z2.jpg", 1)]
    assert len(ds) == 4 and not ds.has_masks
    image, label = ds[3]
    assert image.shape == (3, 12, 12) and label == 1
    images, labels, masks = ds.tensors([0, 2])
    assert images.shape == (2, 3, 12, 12) and labels.tolist() == [0, 1] and masks is None
    with pytest.raises(InputError, match="has no masks"):
        ds.mask(0)
    with pytest.raises(IndexError):
        ds[4]


def test_folder_classes_file_and_explicit_names(folder: Path) -> None:
    (folder / "classes.txt").write_text("zebra\nbee\nant\n", encoding="utf-8")
    ds = ImageFolderDataset(folder, size=8)
    assert ds.class_names == ["zebra", "bee", "ant"]
    assert sorted({y for _, y in ds.samples}) == [0, 2]
    assert {p.parent.name if p.parent.name != "deeper" else "ant": y for p, y in ds.samples} == {"ant": 2, "zebra": 0}

    explicit = ImageFolderDataset(folder, size=8, class_names=["x", "ant", "y", "zebra"])
    assert explicit.class_names == ["x", "ant", "y", "zebra"]
    assert [y for _, y in explicit.samples] == [1, 1, 3, 3]
    with pytest.raises(InputError, match="class folder 'zebra'"):
        ImageFolderDataset(folder, size=8, class_names=["ant", "bee"])
    (folder / "classes.txt").write_text("ant\n", encoding="utf-8")
    with pytest.raises(InputError, match="class folder 'zebra'.*classes.txt"):
        ImageFolderDataset(folder, size=8)


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        ImageFolderDataset(tmp_path / "nothing", size=8)
    flat = tmp_path / "flat"
    _save(flat / "a.png", _rgb(8, 8))
    with pytest.raises(InputError, match="no class subfolders"):
        ImageFolderDataset(flat, size=8)
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    (empty / "cls" / "readme.md").write_text("x")
    with pytest.raises(InputError, match="no images found"):
        ImageFolderDataset(empty, size=8)
    with pytest.raises(InputError, match="not a folder"):
        ImageFolderDataset(flat / "a.png", size=8)


def test_folder_with_a_corrupt_image(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _save(root / "a" / "ok.png", _rgb(8, 8))
    (root / "a" / "bad.png").write_bytes(b"\x89PNG not really")
    ds = ImageFolderDataset(root, size=8)
    with pytest.raises(ImageReadError, match="bad.png"):
        ds[0]  # sorted: bad.png first
    assert ds[1][0].shape == (3, 8, 8)


# ----------------------------------------------------------------------------------- export


def test_export_round_trip(tmp_path: Path) -> None:
    shapes = ShapesDataset("val", length=12)
    out = export_dataset(shapes, tmp_path / "exp", progress=False)
    assert out == tmp_path / "exp"
    assert read_class_names(out / "classes.txt") == list(SHAPE_CLASSES)
    assert not list(out.rglob(".*")), "temporary files left behind"
    png = out / "images" / "star" / "val-00003.png"
    sample = shapes.render(3)
    assert np.array_equal(np.asarray(Image.open(png)), sample.image)
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "star" / "val-00003.png")) == 255, sample.mask)

    back = ImageFolderDataset(out, size=64)
    assert back.has_masks and back.class_names == list(SHAPE_CLASSES)
    assert len(back) == 12
    by_name = {p.name: k for k, (p, _) in enumerate(back.samples)}
    for i in range(12):
        k = by_name[f"val-{i:05d}.png"]
        image, label = back[k]
        ref_image, ref_label = shapes[i]
        assert label == ref_label and torch.equal(image, ref_image)
        assert torch.equal(back.mask(k), shapes.mask(i))
    images, labels, masks = back.tensors([by_name["val-00000.png"], by_name["val-00007.png"]])
    ref = shapes.tensors([0, 7])
    assert torch.equal(images, ref[0]) and torch.equal(labels, ref[1]) and torch.equal(masks, ref[2])
    # open_dataset recognises the exported layout too.
    assert open_dataset(str(out)).has_masks


def test_export_limit_resize_and_conflicts(tmp_path: Path) -> None:
    shapes = ShapesDataset("test", length=30)
    out = export_dataset(shapes, tmp_path / "exp", limit=5, progress=False)
    assert len(list((out / "images").rglob("*.png"))) == 5
    assert len(list((out / "masks").rglob("*.png"))) == 5
    export_dataset(shapes, out, limit=5, progress=False)  # same classes: overwrite in place
    assert len(list((out / "images").rglob("*.png"))) == 5

    small = ImageFolderDataset(out, size=32)  # masks follow the image's resize
    image, _ = small[0]
    mask = small.mask(0)
    assert image.shape == (3, 32, 32) and mask.shape == (1, 32, 32) and mask.dtype == torch.bool
    assert 0.03 <= mask.float().mean() <= 0.6

    folder = tmp_path / "mine"
    _save(folder / "cat" / "c.png", _rgb(10, 10))
    with pytest.raises(InputError, match="other classes"):
        export_dataset(ImageFolderDataset(folder, size=10), out, progress=False)
    with pytest.raises(InputError, match="limit"):
        export_dataset(shapes, tmp_path / "x", limit=-1, progress=False)


def test_export_of_a_folder_without_masks(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    arr = _rgb(10, 10, seed=9)
    _save(folder / "cat" / "c.png", arr)
    out = export_dataset(ImageFolderDataset(folder, size=10), tmp_path / "exp", progress=False)
    assert np.array_equal(np.asarray(Image.open(out / "images" / "cat" / "image-00000.png")), arr)
    assert not (out / "masks").exists()
    assert ImageFolderDataset(out, size=10).class_names == ["cat"]


def test_exported_folder_with_missing_or_mismatched_masks(tmp_path: Path) -> None:
    out = export_dataset(ShapesDataset("test", length=3), tmp_path / "exp", progress=False)
    mask = out / "masks" / "square" / "test-00001.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(mask)
    with pytest.raises(InputError, match="is 10x10 but its image"):
        ImageFolderDataset(out, size=64).mask(1)
    mask.unlink()
    with pytest.raises(InputError, match="lacks the masks of 1 image"):
        ImageFolderDataset(out, size=64)


# ------------------------------------------------------------------------------ open_dataset


def test_open_dataset_specs(tmp_path: Path, folder: Path) -> None:
    ds = open_dataset("shapes")
    assert isinstance(ds, ShapesDataset) and ds.split == "test" and len(ds) == 2000
    train = open_dataset("shapes:train", size=48, seed=4)
    assert isinstance(train, ShapesDataset) and (train.split, train.size, train.seed) == ("train", 48, 4)
    assert open_dataset("shapes:val", class_names=list(SHAPE_CLASSES)).split == "val"
    imgs = open_dataset(str(folder), size=16)
    assert isinstance(imgs, ImageFolderDataset) and imgs.size == 16
    mapped = open_dataset(str(folder), size=16, class_names=["zebra", "ant"])
    assert mapped.class_names == ["zebra", "ant"]


@pytest.mark.parametrize("spec", ["shapes:bogus", "imagenet", "", "shapes:"])
def test_open_dataset_bad_specs(spec: str, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="shapes:train"):
        open_dataset(spec if spec != "imagenet" else str(tmp_path / "imagenet"))


def test_open_dataset_file_and_class_mismatch(tmp_path: Path) -> None:
    f = tmp_path / "a.png"
    _save(f, _rgb(8, 8))
    with pytest.raises(SpecError, match="is a file"):
        open_dataset(str(f))
    with pytest.raises(SpecError, match="own classes"):
        open_dataset("shapes", class_names=["cat", "dog"])
    with pytest.raises(InputError, match="size"):
        open_dataset("shapes", size=16)
