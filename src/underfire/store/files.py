"""Files of a run, written atomically: a reader (or a restarted run) never sees half a file.

Each file is written to a temporary name in its own folder and moved over the final name with
``os.replace`` (atomic on POSIX and Windows within one file system). A process killed mid-write
leaves only a temporary file, which ``remove_temporary_files`` deletes on the next start.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

#: Marks temporary files; nothing else under a run's ``files/`` folder contains it.
TEMP_MARK = ".partial-"


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}{TEMP_MARK}", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_atomic(path: str | Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Call ``write(stream)`` on a temporary file, then move it over ``path`` in one step."""
    path = Path(path)
    with _atomic(path) as stream:
        write(stream)
    return path


def png_bytes(array: np.ndarray, scale: int = 1) -> bytes:
    """An (H, W, 3) or grey (H, W) uint8 array as PNG file contents, optionally enlarged
    ``scale``× (nearest)."""
    picture = Image.fromarray(array)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    """An array as ``.npy`` file contents (no pickling)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """File contents computed elsewhere (a worker's), written atomically."""
    return write_atomic(path, lambda stream: stream.write(data))


def save_png_atomic(array: np.ndarray, path: str | Path, scale: int = 1) -> Path:
    """An (H, W, 3) uint8 array as PNG, optionally enlarged ``scale``× (nearest neighbour)."""
    return write_bytes_atomic(path, png_bytes(array, scale))


def save_npy_atomic(array: np.ndarray, path: str | Path) -> Path:
    """An array as ``.npy`` (no pickling)."""
    return write_bytes_atomic(path, npy_bytes(array))


def remove_temporary_files(folder: str | Path) -> int:
    """Delete the temporary files a killed process left under ``folder``; returns how many."""
    removed = 0
    for path in Path(folder).rglob(f"*{TEMP_MARK}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            removed += 1
    return removed
