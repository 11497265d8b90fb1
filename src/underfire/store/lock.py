"""One process per run folder: two runs writing the same database and files would race.

An advisory ``flock`` on ``RUN_DIR/.lock``; the kernel drops it when the process dies (even by
SIGKILL), so a crashed run never leaves a stale lock behind. Where ``fcntl`` does not exist
(Windows) the lock is a no-op.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


@contextmanager
def run_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold the run folder's lock, or fail at once if another process holds it."""
    path = Path(run_dir) / ".lock"
    handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise InputError(f"run folder {str(run_dir)!r} is in use by another underfire process") from None
        yield
    finally:
        os.close(handle)
