"""Write a dataset to disk as PNG files, so other tools (or people) can use the exact images.

Layout (read back by :class:`underfire.data.ImageFolderDataset`)::

    out_dir/classes.txt                          one class name per line, line order = label
    out_dir/images/<class>/<split>-<index:05d>.png
    out_dir/masks/<class>/<split>-<index:05d>.png  8-bit, 0 = background, 255 = object

Each file is written under a hidden temporary name in its final folder and renamed into place
(``os.replace``), and a mask is written before its image: an interrupted export never leaves a
half-written PNG, nor an image without its mask.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..progress import track
from .images import CLASSES_FILE, read_class_names
from .shapes import ShapesDataset


def _write_atomic(path: Path, data: bytes | Image.Image) -> None:
    """Write ``data`` (bytes or a PNG image) to ``path`` via a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, Image.Image):
                data.save(f, format="PNG")
            else:
                f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def _to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """(3, H, W) float tensor in [0, 1] -> (H, W, 3) uint8, rounded to nearest."""
    arr = image.detach().cpu().float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8)
    return arr.permute(1, 2, 0).numpy()


def export_dataset(
    dataset: Any,
    out_dir: str | os.PathLike[str],
    limit: int | None = None,
    progress: bool = True,
) -> Path:
    """Export the first ``limit`` images (all by default) of ``dataset`` with masks, if it has any.

    ``dataset`` is a :class:`ShapesDataset` (exact uint8 pixels from ``render``: re-reading the
    PNGs gives identical tensors), an :class:`ImageFolderDataset`, or any dataset with
    ``class_names`` and ``(image, label)`` items. Exporting again into the same folder overwrites
    files of the same names; a folder whose ``classes.txt`` lists other classes is refused.
    Returns ``out_dir``.
    """
    class_names = [str(n) for n in getattr(dataset, "class_names", [])]
    if not class_names:
        raise InputError("the dataset to export has no class_names")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise InputError(f"export limit must be a positive integer, got {limit!r}")
    n = len(dataset) if limit is None else min(int(limit), len(dataset))
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InputError(f"export target '{out}' exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)

    classes_path = out / CLASSES_FILE
    if classes_path.exists():
        existing = read_class_names(classes_path)
        if existing != class_names:
            raise InputError(
                f"'{out}' already holds an export with other classes ({', '.join(existing[:5])}"
                f"{', ...' if len(existing) > 5 else ''}): choose an empty folder"
            )
    else:
        _write_atomic(classes_path, ("\n".join(class_names) + "\n").encode("utf-8"))

    is_shapes = isinstance(dataset, ShapesDataset)
    has_masks = is_shapes or bool(getattr(dataset, "has_masks", False))
    prefix = str(getattr(dataset, "split", "image"))
    made: set[str] = set()
    for i in track(range(n), desc=f"export {out.name or out}", unit="img", enabled=progress):
        if is_shapes:
            sample = dataset.render(i)
            pixels, mask, label = sample.image, sample.mask, sample.label
        else:
            image, label = dataset[i]
            pixels = _to_uint8_hwc(image)
            mask = dataset.mask(i)[0].numpy() if has_masks else None
        label = int(label)
        if not 0 <= label < len(class_names):
            raise InputError(f"image {i} has label {label}, outside the {len(class_names)} classes")
        cls = class_names[label]
        name = f"{prefix}-{i:05d}.png"
        if cls not in made:
            (out / "images" / cls).mkdir(parents=True, exist_ok=True)
            if has_masks:
                (out / "masks" / cls).mkdir(parents=True, exist_ok=True)
            made.add(cls)
        if mask is not None:
            mask_png = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L")
            _write_atomic(out / "masks" / cls / name, mask_png)
        _write_atomic(out / "images" / cls / name, Image.fromarray(np.asarray(pixels), mode="RGB"))
    return out
