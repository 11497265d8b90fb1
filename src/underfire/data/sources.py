"""Data specification strings, as the command line takes them.

Accepted forms:
- ``shapes`` — the built-in benchmark's test split;
- ``shapes:train``, ``shapes:val``, ``shapes:test`` — a given split;
- a path to an existing folder — an :class:`ImageFolderDataset` (``<folder>/<class>/<images>``,
  or a folder written by ``export_dataset``).

The word ``shapes`` always means the benchmark; write ``./shapes`` for a folder of that name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..errors import SpecError
from .images import ImageFolderDataset
from .shapes import SHAPE_CLASSES, SPLITS, ShapesDataset

ACCEPTED_FORMS = "'shapes', " + ", ".join(f"'shapes:{s}'" for s in SPLITS) + " or a path to an image folder"


def open_dataset(
    spec: str,
    size: int = 64,
    class_names: Sequence[str] | None = None,
    seed: int = 0,
    channels: int = 3,
    outputs: int | None = None,
) -> ShapesDataset | ImageFolderDataset:
    """Resolve a data spec to a dataset; ``seed`` applies to the benchmark only.

    ``class_names`` maps an image folder's subfolders to class indices (for example a model's
    classes); for the benchmark it must be omitted or equal to its own classes. ``outputs`` (the
    model's number of classes) refuses a folder whose classes cannot be its outputs.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError(f"empty data spec: expected {ACCEPTED_FORMS}")
    spec = spec.strip()
    if spec == "shapes" or spec.startswith("shapes:"):
        split = "test" if spec == "shapes" else spec.partition(":")[2]
        if split not in SPLITS:
            raise SpecError(f"unknown shapes split in data spec {spec!r}: expected {ACCEPTED_FORMS}")
        if class_names is not None and list(class_names) != list(SHAPE_CLASSES):
            raise SpecError(
                "the shapes benchmark has its own classes "
                f"({', '.join(SHAPE_CLASSES)}); they differ from the class names given"
            )
        if channels != 3:
            raise SpecError(f"the shapes benchmark is RGB; the model expects {channels}-channel images")
        return ShapesDataset(split=split, size=size, seed=seed)
    path = Path(spec).expanduser()
    if path.is_dir():
        return ImageFolderDataset(path, size=size, class_names=class_names, channels=channels, outputs=outputs)
    if path.exists():
        raise SpecError(f"data spec {spec!r} is a file, not a folder: expected {ACCEPTED_FORMS}")
    raise SpecError(f"data spec {spec!r} is neither a benchmark nor an existing folder: expected {ACCEPTED_FORMS}")
