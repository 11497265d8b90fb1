"""Files of a run, written atomically: a reader (or a restarted run) never sees half a file.

Each file is written to a temporary name in its own folder and moved over the final name with
``os.replace`` (atomic on POSIX and Windows within one file system). A process killed mid-write
leaves only a temporary file, which ``remove_temporary_files`` deletes on the next start.
"""

from __future__ import annotations

import io
import os
import secrets
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image

from ..errors import InputError

#: Marks temporary files; nothing else under a run's ``files/`` folder contains it.
TEMP_MARK = ".partial-"


@contextmanager
def _atomic(path: Path) -> Iterator[IO[bytes]]:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = _create_temporary(path)
    try:
        with os.fdopen(handle, "wb") as stream:
            yield stream
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new temporary file beside ``path``, created with mode 0666 so the kernel applies the
    umask as for any file (``mkstemp`` makes 0600: run outputs would be private)."""
    while True:
        temporary = path.parent / f".{path.name}{TEMP_MARK}{secrets.token_hex(6)}"
        try:
            return os.open(
                temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666
            ), temporary
        except FileExistsError:
            continue


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


def check_output_folder(path: str | Path, what: str = "output folder") -> Path:
    """Prove, before any work, that ``path`` can be created (or is) and written: a folder that is
    a file, under ``/proc``, on a read-only disk or without permission is one line, not an error
    after hours of computing. Nothing is created: a probe file in the nearest existing folder is
    written and removed."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a file, not a folder")
    existing = path.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise InputError(f"cannot create {what} {str(path)!r}: {str(existing)!r} is a file")
    try:
        handle, probe = tempfile.mkstemp(prefix=f".write-check{TEMP_MARK}", dir=existing)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        raise InputError(f"cannot write to {what} {str(path)!r}: {error.strerror or error}") from None
    return path


def check_output_file(path: str | Path, what: str = "output file") -> Path:
    """``check_output_folder`` for the folder of a file about to be written; refuses a folder."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder; give a file name")
    check_output_folder(path.parent, f"the folder of {what}")
    return path
