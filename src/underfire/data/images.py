"""Users' own images: single files, lists of files and class-per-folder image sets.

Why one reader: every image that enters the library goes through :func:`read_image`, so every
command sees the same conversion (any Pillow mode to RGB in [0, 1]), the same geometry (shorter
side resized, then centre-cropped) and the same one-line :class:`ImageReadError` for any file
that cannot be decoded, truncated files included.

Conventions:
- Transparency (RGBA, LA, PA, palette or RGB with a transparent colour) is composited onto
  white, as a viewer on a white page shows it; the colour stored under fully transparent
  pixels is often arbitrary (frequently black), so dropping alpha would invent dark regions.
- 16- and 32-bit integer grey images ("I;16", "I") are scaled by 1/65535; float images ("F") are
  taken as already in [0, 1] and clipped.
- The EXIF orientation tag of photos is applied, so a picture reads upright as viewers show it.
- Animated or multi-page files (GIF, TIFF) give their first frame.
"""

from __future__ import annotations

import io
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ImageReadError, InputError, ResizeNotice

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
"""File name endings (case-insensitive) taken as images when scanning folders."""

CLASSES_FILE = "classes.txt"

#: The largest image read (width × height): 100 megapixels, e.g. 10000×10000. Larger files are
#: refused from their header (decoding one would take gigabytes); Pillow's own bomb check is at 179.
MAX_IMAGE_PIXELS = 100_000_000
#: Pillow modes a box-filter resize accepts (palette images are converted later, at full size).
_REDUCIBLE_MODES = ("L", "LA", "RGB", "RGBA", "RGBa", "La", "I", "F", "CMYK")


def _reason(exc: BaseException, path: Path) -> str:
    """A short one-line reason from a Pillow/OS exception, without repeating the path."""
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, UnidentifiedImageError):
        return "cannot identify image file (not an image, or an unsupported format)"
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for form in (repr(str(path)), str(path)):
        text = text.replace(form, "").strip()
    text = text.rstrip(" :")
    return text or type(exc).__name__


def _check_size(size: int | None) -> None:
    if size is None:
        return
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise InputError(f"image size must be a positive integer, got {size!r}")


def _to_rgb_array(img: Image.Image) -> np.ndarray:
    """Float32 (H, W, 3) array in [0, 1] from any Pillow mode (see the module notes)."""
    mode = img.mode
    if mode.startswith("I") or mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        if mode != "F":
            arr = arr / 65535.0
        arr = np.clip(arr, 0.0, 1.0)
        return np.repeat(arr[..., None], 3, axis=2)
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info
    if has_alpha:
        rgba = np.asarray(img.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + (1.0 - alpha)
    if mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.float32) / 255.0


def _resize_crop_plan(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """New (w, h) with the shorter side equal to ``size``, and the centred size x size box."""
    scale = size / min(width, height)
    new_w = max(size, round(width * scale))
    new_h = max(size, round(height * scale))
    left = (new_w - size) // 2
    top = (new_h - size) // 2
    return (new_w, new_h), (left, top, left + size, top + size)


def _resize_crop_float(arr: np.ndarray, size: int) -> np.ndarray:
    """Resize shorter side to ``size`` (antialiased bilinear, per channel) and centre-crop."""
    height, width = arr.shape[:2]
    (new_w, new_h), (left, top, right, bottom) = _resize_crop_plan(width, height, size)
    if (new_w, new_h) != (width, height):
        channels = [
            np.asarray(
                Image.fromarray(np.ascontiguousarray(arr[..., c]), mode="F").resize(
                    (new_w, new_h), Image.Resampling.BILINEAR
                )
            )
            for c in range(arr.shape[2])
        ]
        arr = np.stack(channels, axis=2)
    return np.clip(arr[top:bottom, left:right], 0.0, 1.0)


def _open(path: Path | io.BytesIO, name: str | None = None, size: int | None = None) -> Image.Image:
    """Open and fully decode ``path`` (or in-memory contents called ``name``); any failure
    becomes a one-line ImageReadError.

    With ``size`` (the side the image will be resized to), a large image is decoded small: JPEGs
    by Pillow's DCT-domain ``draft`` to at least 4× ``size``, then any image area-averaged (a box
    filter) to twice the size the resize-and-crop plan of the full image asks for, so the plan,
    and the crop, are the same as from the full-size pixels (measured on near-Nyquist noise at
    1600×1200 → 64: mean difference 0.01–0.014 to decoding everything, max 0.05–0.07). Images above ``MAX_IMAGE_PIXELS`` are refused from their
    header, before decoding.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageReadError(
                    f"image '{name or path}' is {width}×{height} ({width * height / 1e6:.0f} megapixels); underfire "
                    f"reads images up to {MAX_IMAGE_PIXELS / 1e6:.0f} megapixels: downscale it first"
                )
            if size is not None and (width, height) != (size, size):  # square: the EXIF rotation cannot change it
                warnings.warn(
                    ResizeNotice(
                        f"images that are not {size}×{size} are resized (shorter side to {size}, antialiased) "
                        "and centre-cropped to the model's input size"
                    ),
                    stacklevel=4,
                )
            if size is not None and img.format == "JPEG":
                img.draft(img.mode, (4 * size, 4 * size))
            img.load()  # decode now: detects truncated and corrupt data inside the try
            if size is not None:
                img = _shrink(img, (width, height), size)
            try:
                img = ImageOps.exif_transpose(img)
            except Exception:  # noqa: BLE001 - a broken EXIF block must not hide the pixels
                pass
            img.load()
            return img
    except ImageReadError:
        raise
    except Exception as exc:  # noqa: BLE001 - decoders raise OSError, SyntaxError, ValueError...
        raise ImageReadError(f"cannot read image '{name or path}': {_reason(exc, path)}") from exc


def _shrink(img: Image.Image, full: tuple[int, int], size: int) -> Image.Image:
    """A decoded image of ``full`` pixels (maybe drafted smaller) area-averaged to twice the
    resize-and-crop plan's size: the plan from it is then the full image's, pixel for pixel. A
    draft covers ``full / scale`` of its pixels exactly (its last row and column only partly),
    which the box of the resize says. The plan is symmetric under transposition, so this runs
    before the EXIF rotation."""
    (new_w, new_h), _ = _resize_crop_plan(full[0], full[1], size)
    drafted = img.size != full
    if not (drafted or min(img.size) >= 4 * size) or img.mode not in _REDUCIBLE_MODES:
        return img
    scale = 2 ** round(math.log2(full[0] / img.width)) if drafted else 1
    return img.resize((2 * new_w, 2 * new_h), Image.Resampling.BOX, box=(0, 0, full[0] / scale, full[1] / scale))


def _header_size(path: Path) -> tuple[int, int]:
    """(width, height) as read_image sees it (EXIF rotation included), from the header only."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            if img.getexif().get(0x0112) in (5, 6, 7, 8):  # orientation tags that swap axes
                width, height = height, width
            return width, height
    except Exception as exc:  # noqa: BLE001
        raise ImageReadError(f"cannot read image '{path}': {_reason(exc, path)}") from exc


def _check_channels(channels: int) -> None:
    if channels not in (1, 3):
        raise InputError(f"images are read with 1 (grey) or 3 (RGB) channels, got {channels!r}")


def _to_tensor(arr: np.ndarray, channels: int) -> torch.Tensor:
    """(H, W, 3) RGB array → (channels, H, W) tensor. Grey is ITU-R 601 luma (Pillow's ``L``),
    taken as is where the three channels are equal, so a grey file reads back bit for bit."""
    if channels == 1:
        equal = np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
        arr = arr[..., :1] if equal else (arr @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[..., None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1), dtype=np.float32))


def read_image(path: str | os.PathLike[str], size: int | None = None, channels: int = 3) -> torch.Tensor:
    """Read one image as a float32 (channels, H, W) tensor in [0, 1] (RGB or grey, see the
    module notes).

    With ``size``, the shorter side is resized to ``size`` (bilinear, antialiased) and the
    centre size x size square is kept; an image already of that size is returned untouched.
    """
    _check_size(size)
    _check_channels(channels)
    path = Path(path)
    img = _open(path, size=None if size is None else int(size))
    arr = _to_rgb_array(img)
    if size is not None:
        arr = _resize_crop_float(arr, int(size))
    return _to_tensor(arr, channels)


def decode_image(data: bytes, name: str = "image", channels: int = 3) -> torch.Tensor:
    """File contents (PNG, JPEG, ...) as ``read_image`` would read the file: float32 (channels, H, W)."""
    _check_channels(channels)
    img = _open(io.BytesIO(data), name)
    return _to_tensor(_to_rgb_array(img), channels)


def read_mask(path: str | os.PathLike[str], size: int | None = None) -> torch.Tensor:
    """Read a mask image as bool (1, H, W): True where its grey level is >= 128.

    With ``size`` the same geometry as :func:`read_image` is applied, with nearest-neighbour
    resampling so the mask stays binary and aligned with the image.
    """
    _check_size(size)
    path = Path(path)
    img = _open(path)
    grey = _to_rgb_array(img).mean(axis=2) >= 0.5
    if size is not None:
        height, width = grey.shape
        (new_w, new_h), (left, top, right, bottom) = _resize_crop_plan(width, height, int(size))
        if (new_w, new_h) != (width, height):
            pil = Image.fromarray(grey.astype(np.uint8) * 255, mode="L")
            grey = np.asarray(pil.resize((new_w, new_h), Image.Resampling.NEAREST)) >= 128
        grey = grey[top:bottom, left:right]
    return torch.from_numpy(np.ascontiguousarray(grey))[None]


def load_images(paths: Iterable[str | os.PathLike[str]], size: int, channels: int = 3) -> torch.Tensor:
    """Read several images into one (N, channels, size, size) batch (same geometry as read_image)."""
    _check_size(size)
    paths = list(paths)
    if not paths:
        raise InputError("no image paths given")
    return torch.stack([read_image(p, size, channels) for p in paths])


def read_class_names(path: str | os.PathLike[str]) -> list[str]:
    """Class names from a text file: one name per line, line order = class index.

    Surrounding whitespace and blank lines are ignored; duplicates are an error because they
    would make the name-to-index mapping ambiguous.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"class names file '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read class names file '{path}': {_reason(exc, path)}") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"class names file '{path}' holds no class names")
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise InputError(f"class names file '{path}' lists {name!r} twice")
        seen.add(name)
    return names


def _is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _subfolders(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_under(folder: Path) -> list[Path]:
    """Image files below ``folder`` (recursively, hidden files and folders skipped), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            p = Path(dirpath) / name
            if _is_image_file(p):
                found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


class ImageFolderDataset(Dataset):
    """Images in ``root/<class>/...`` (one subfolder per class), read at ``size`` x ``size``.

    Class names, and so label indices, come from ``class_names`` when given (folders are matched
    by name; a folder not in the list is an error), else from ``root/classes.txt`` (one name per
    line), else from the sorted subfolder names — refused when ``outputs`` (the model's number of
    classes) differs from their count, since positions would then not be the model's classes. The layout written by
    :func:`underfire.data.export_dataset` (``images/``, ``masks/``, ``classes.txt``) is also
    recognised; then :meth:`mask` returns each image's object mask.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        size: int,
        class_names: Sequence[str] | None = None,
        channels: int = 3,
        outputs: int | None = None,
    ):
        _check_size(size)
        _check_channels(channels)
        self.channels = channels
        if size is None:
            raise InputError("ImageFolderDataset needs an image size")
        root = Path(root).expanduser()
        if not root.exists():
            raise InputError(f"image folder '{root}' does not exist")
        if not root.is_dir():
            raise InputError(f"'{root}' is not a folder (expected <folder>/<class>/<images>)")
        self.root = root
        self.size = int(size)

        top = {p.name for p in _subfolders(root)}
        exported = (
            "images" in top and top <= {"images", "masks"} and ("masks" in top or (root / CLASSES_FILE).is_file())
        )
        image_root = root / "images" if exported else root
        mask_root = root / "masks" if exported and "masks" in top else None
        self.image_root = image_root
        self.mask_root = mask_root

        folders = _subfolders(image_root)
        if not folders:
            raise InputError(f"no class subfolders in '{image_root}' (expected <folder>/<class>/<image files>)")
        classes_file = root / CLASSES_FILE
        if class_names is not None:
            names = [str(n) for n in class_names]
            if not names:
                raise InputError("class_names is empty")
            if len(set(names)) != len(names):
                raise InputError("class_names contains duplicate names")
            source = "the given class names"
        elif classes_file.is_file():
            names = read_class_names(classes_file)
            source = f"'{classes_file}'"
        else:
            names = [f.name for f in folders]
            source = ""
            if outputs is not None and len(names) != outputs:
                # sorted folder names would be labels 0..k-1, silently not the model's classes
                raise InputError(
                    f"'{image_root}' has {len(names)} class folders and the model {outputs} outputs, so "
                    "folders cannot be matched to classes by position; give the model's class names "
                    "(--classes FILE, one per line) to match them by name"
                )
        if outputs is not None and len(names) != outputs:
            raise InputError(f"{source or 'the folder'} names {len(names)} classes, the model has {outputs} outputs")
        index = {name: k for k, name in enumerate(names)}
        for folder in folders:
            if folder.name not in index:
                raise InputError(
                    f"class folder '{folder.name}' in '{image_root}' is not among the classes of "
                    f"{source} ({', '.join(names[:10])}{', ...' if len(names) > 10 else ''})"
                )
        self.class_names: list[str] = names

        self.samples: list[tuple[Path, int]] = []
        for folder in folders:
            label = index[folder.name]
            self.samples.extend((p, label) for p in _images_under(folder))
        if not self.samples:
            raise InputError(f"no images found in '{image_root}' (looked for {', '.join(IMAGE_EXTENSIONS)})")

        self._masks: list[Path] | None = None
        if mask_root is not None:
            masks = [self._mask_path(p) for p, _ in self.samples]
            missing = [m for m in masks if not m.is_file()]
            if missing:
                raise InputError(
                    f"mask folder '{mask_root}' lacks the masks of {len(missing)} image(s), e.g. '{missing[0]}'"
                )
            self._masks = masks
        self.has_masks: bool = self._masks is not None

    def _mask_path(self, image_path: Path) -> Path:
        assert self.mask_root is not None
        return (self.mask_root / image_path.relative_to(self.image_root)).with_suffix(".png")

    def __repr__(self) -> str:
        return (
            f"ImageFolderDataset(root='{self.root}', size={self.size}, images={len(self)}, "
            f"classes={len(self.class_names)}, masks={self.has_masks})"
        )

    def __len__(self) -> int:
        return len(self.samples)

    def _index(self, i: int) -> int:
        i = int(i)
        n = len(self.samples)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"image index {i} out of range for a folder of {n} images")
        return i

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[self._index(i)]
        return read_image(path, self.size, self.channels), label

    def label(self, i: int) -> int:
        """Class index of image ``i`` without reading the file."""
        return self.samples[self._index(i)][1]

    def mask(self, i: int) -> torch.Tensor:
        """Object mask of image ``i`` as bool (1, size, size), aligned with ``self[i][0]``."""
        i = self._index(i)
        if self._masks is None:
            raise InputError(f"image folder '{self.root}' has no masks (expected '{self.root}/masks')")
        mask_path, image_path = self._masks[i], self.samples[i][0]
        image_size, mask_size = _header_size(image_path), _header_size(mask_path)
        if image_size != mask_size:
            raise InputError(
                f"mask '{mask_path}' is {mask_size[0]}x{mask_size[1]} but its image "
                f"'{image_path}' is {image_size[0]}x{image_size[1]}"
            )
        return read_mask(mask_path, self.size)

    def tensors(self, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Images (N,C,s,s) float32, labels (N,) long and masks (N,1,s,s) bool, or None without masks."""
        idx = range(len(self)) if indices is None else [self._index(i) for i in indices]
        s = self.size
        images = torch.empty((len(idx), self.channels, s, s), dtype=torch.float32)
        labels = torch.empty(len(idx), dtype=torch.long)
        masks = torch.empty((len(idx), 1, s, s), dtype=torch.bool) if self.has_masks else None
        for k, i in enumerate(idx):
            images[k], labels[k] = self[i]
            if masks is not None:
                masks[k] = self.mask(i)
        return images, labels, masks
