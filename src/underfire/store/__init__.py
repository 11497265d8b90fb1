"""Results of runs: a SQLite database (``results.sqlite``) plus image and map files, written so a
killed run can be restarted and finish with every row exactly once and every file whole.

``ResultStore`` is the write side (the run's driver only); ``RunReader`` the read-only side
(summaries, the report, the attack JSON)."""

from .database import DATABASE_NAME, SCHEMA, SCHEMA_VERSION, ImageRecord, ResultRecord, ResultStore, TransferRecord
from .files import remove_temporary_files, save_npy_atomic, save_png_atomic, write_atomic
from .lock import run_lock
from .reader import RunReader, open_reader

__all__ = [
    "DATABASE_NAME",
    "SCHEMA",
    "ImageRecord",
    "ResultRecord",
    "ResultStore",
    "RunReader",
    "SCHEMA_VERSION",
    "TransferRecord",
    "open_reader",
    "remove_temporary_files",
    "run_lock",
    "save_npy_atomic",
    "save_png_atomic",
    "write_atomic",
]
