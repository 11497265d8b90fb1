"""Joining the run folders of one experiment's shards (``underfire run --shard I/N``) into one run.

Why shards: a scheduler without Ray (a Slurm job array) runs N copies of a command; each must
write its own SQLite file, since SQLite must never have several writers on a network file system.
``merge_runs`` checks the folders are parts of one experiment — the same config, attack settings,
inputs (content digests) and underfire version, the same images, no unit in two of them — and then
copies their rows and files into a new run folder that the report (and a resume) read like any run.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..store import DATABASE_NAME, ResultStore, run_lock
from ..store.database import SCHEMA_VERSION, check_database
from ..store.files import TEMP_MARK, check_output_folder

#: Meta keys that must be equal in every part (``versions`` is compared on the underfire version).
_SAME_META = ("config", "attack_configs", "inputs")
_TABLES = ("results", "transfer", "failures")


@dataclass(frozen=True)
class MergeOutcome:
    """What ``merge_runs`` wrote."""

    run_dir: Path
    parts: int
    results: int
    transfer: int
    failures: int


def merge_runs(parts: Sequence[str | Path], out: str | Path) -> MergeOutcome:
    """Merge the run folders ``parts`` of one experiment into the new run folder ``out``."""
    if len(parts) < 2:
        raise InputError("merge needs at least two run folders")
    folders = [Path(part) for part in parts]
    out = Path(out)
    if (out / DATABASE_NAME).exists():
        raise InputError(f"{str(out)!r} already holds a run; merge into a new folder")
    check_output_folder(out, "merged run folder")
    contents = [_read_part(folder) for folder in folders]
    first = contents[0]
    for folder, part in zip(folders[1:], contents[1:]):
        for key in _SAME_META:
            if part["meta"].get(key) != first["meta"].get(key):
                raise InputError(
                    f"{str(folder)!r} is not a part of the same experiment as {str(folders[0])!r} (its {key} differs); "
                    "merge only the shards of one config"
                )
        if part["version"] != first["version"]:
            raise InputError(
                f"{str(folder)!r} was made by underfire {part['version']}, {str(folders[0])!r} by {first['version']}"
            )
        if part["images"] != first["images"]:
            raise InputError(
                f"{str(folder)!r} attacked other images than {str(folders[0])!r}; merge only the shards of one config"
            )
    seen: dict[tuple[Any, ...], Path] = {}
    for folder, part in zip(folders, contents):
        for key in part["keys"]:
            if key in seen:
                raise InputError(
                    f"{str(folder)!r} and {str(seen[key])!r} both hold results of {key[0]} {key[2]} vs {key[1]} on image {key[4]}: "
                    "they overlap (the same shard twice?)"
                )
            seen[key] = folder
    out.mkdir(parents=True, exist_ok=True)
    with run_lock(out):
        for folder in folders:  # files first, rows last: rows present means their files are
            _copy_files(folder, out)
        with ResultStore(out) as store:
            counts = _write_store(store, first, contents)
    return MergeOutcome(out, len(folders), counts["results"], counts["transfer"], counts["failures"])


def _write_store(store: ResultStore, first: dict[str, Any], contents: list[dict[str, Any]]) -> dict[str, int]:
    meta = first["meta"]
    store.claim(
        json.loads(meta["config"]),
        json.loads(meta["versions"]),
        meta.get("created", ""),
        json.loads(meta["attack_configs"]) if "attack_configs" in meta else None,
    )
    if "inputs" in meta:
        store.claim_value("inputs", meta["inputs"], "other inputs")
    store.claim_value("shard", "all", "a shard")
    tables = {"images": first["images_rows"]}
    for table in _TABLES:
        tables[table] = [row for part in contents for row in part["rows"][table]]
    store.insert_rows(tables)
    return {table: store.count(table) for table in _TABLES}


def _read_part(folder: Path) -> dict[str, Any]:
    """One part's meta, images and rows, read-only; one line if it is not a usable run folder."""
    database = folder / DATABASE_NAME
    if not database.is_file():
        raise InputError(f"{str(folder)!r} is not a run folder: it has no {DATABASE_NAME}")
    check_database(database)
    connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    try:
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        if version != SCHEMA_VERSION:
            raise InputError(
                f"{str(database)!r} has schema version {version}; resume it once with this underfire (underfire run) to migrate it, then merge"
            )
        meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
        if "config" not in meta:
            raise InputError(f"{str(folder)!r} holds no run (its database has no config)")
        rows = {table: _rows(connection, table) for table in ("images", *_TABLES)}
    finally:
        connection.close()
    versions = json.loads(meta.get("versions", "{}"))
    keys = [(r["model"], r["interpreter"], r["attack"], r["target_map"], r["image"]) for r in rows["results"]]
    images = sorted((r["model"], r["image"], r["position"], r["true_class"], r["target_class"]) for r in rows["images"])
    return {
        "meta": meta,
        "version": versions.get("underfire"),
        "images": images,
        "images_rows": rows["images"],
        "rows": rows,
        "keys": keys,
    }


def _rows(connection: sqlite3.Connection, table: str) -> list[dict[str, Any]]:
    cursor = connection.execute(f"SELECT * FROM {table} ORDER BY rowid")
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, row)) for row in cursor]


def _copy_files(folder: Path, out: Path) -> None:
    """A part's ``files/`` tree into the merged run (files several parts share are identical: the
    benign images and maps)."""
    source = folder / "files"
    if not source.is_dir():
        return
    for path in source.rglob("*"):
        if path.is_file() and TEMP_MARK not in path.name:
            target = out / path.relative_to(folder)
            if not target.exists():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
