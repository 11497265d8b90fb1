"""The results database of a run: ``RUN_DIR/results.sqlite`` (stdlib ``sqlite3``, WAL mode).

Why SQLite: one file, transactions, and concurrent readers (the report) while a run writes. A
unit of work inserts all its rows in one transaction, so after a crash a unit is either wholly
present or wholly absent; plain ``INSERT`` (never ``OR REPLACE``) makes a duplicate row an error
instead of a silent overwrite.

Tables (paths are relative to the run folder; the schema is a contract with the report):

- ``meta(key, value)``: ``config`` (JSON of the experiment config), ``versions`` (JSON),
  ``created`` (ISO time) and ``attack_configs`` (JSON: the resolved AttackConfig per interpreter
  and for ``pgd``).
- ``images``: the benign images attacked per model (stable id, position, classes, PNG path).
- ``results``: one row per (model, interpreter, attack, target_map, image), with the
  interpreter's options (JSON) and the attack's configuration (JSON).
- ``transfer``: examples of an interpreter-bound attack (ADV²) crafted against one interpreter,
  explained by another.
- ``failures``: units that failed for good in a distributed run (their error), until a later
  resume computes them.
- ``detector_scores``: an ensemble detector's disagreement score of a stored image (benign or
  adversarial, by path), per model and detector (``underfire detect``: computed once).
- ``detections``: its summary per model × attack × attacked interpreter × target map at a
  false-positive rate (threshold, realised FPR, TPR, AUC, NULL without a successful example;
  derived, replaced on a re-run).

The schema is versioned (``PRAGMA user_version`` = ``SCHEMA_VERSION``): a database of version 0–3
(before interpreter options, the transfer table's attack column, the failures table, the
detector tables) is migrated
in place when a run opens it; a newer version is refused with one line, before any work.
"""

from __future__ import annotations

import functools
import json
import sqlite3
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import InputError

DATABASE_NAME = "results.sqlite"
#: Version 2: ``results.interpreter_options`` and ``transfer.attack``; version 3: ``failures``;
#: version 4: ``detector_scores`` and ``detections``.
SCHEMA_VERSION = 4

#: A unit's key in ``failures``: (model, attack, interpreter, target map, batch); "" where a unit
#: has no interpreter or target map (an interpreter-free attack's).
FailureKey = tuple[str, str, str, str, int]

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
  model TEXT NOT NULL, image TEXT NOT NULL,
  position INTEGER NOT NULL, true_class INTEGER NOT NULL, target_class INTEGER NOT NULL,
  image_path TEXT NOT NULL,
  PRIMARY KEY (model, image));
CREATE TABLE IF NOT EXISTS results (
  model TEXT NOT NULL, interpreter TEXT NOT NULL, attack TEXT NOT NULL,
  target_map TEXT NOT NULL, image TEXT NOT NULL,
  true_class INTEGER NOT NULL, target_class INTEGER NOT NULL, predicted_class INTEGER NOT NULL,
  success INTEGER NOT NULL, confidence REAL NOT NULL, l1 REAL NOT NULL, l2 REAL NOT NULL,
  iou REAL NOT NULL, iou_by_k TEXT NOT NULL,
  top_k_intersection REAL NOT NULL, spearman REAL NOT NULL, linf REAL NOT NULL,
  adversarial_path TEXT NOT NULL,
  map_path TEXT NOT NULL, overlay_path TEXT NOT NULL,
  benign_map_path TEXT NOT NULL, benign_overlay_path TEXT NOT NULL,
  seconds REAL NOT NULL,
  seed INTEGER NOT NULL, config TEXT NOT NULL,
  interpreter_options TEXT NOT NULL DEFAULT '{}',
  PRIMARY KEY (model, interpreter, attack, target_map, image));
CREATE TABLE IF NOT EXISTS transfer (
  model TEXT NOT NULL, source_interpreter TEXT NOT NULL, target_interpreter TEXT NOT NULL,
  target_map TEXT NOT NULL, image TEXT NOT NULL,
  l1 REAL NOT NULL, l2 REAL NOT NULL, iou REAL NOT NULL,
  attack TEXT NOT NULL DEFAULT 'adv2',
  PRIMARY KEY (model, attack, source_interpreter, target_interpreter, target_map, image));
CREATE TABLE IF NOT EXISTS failures (
  model TEXT NOT NULL, attack TEXT NOT NULL, interpreter TEXT NOT NULL, target_map TEXT NOT NULL,
  batch INTEGER NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL, failed_at TEXT NOT NULL,
  PRIMARY KEY (model, attack, interpreter, target_map, batch));
CREATE TABLE IF NOT EXISTS detector_scores (
  model TEXT NOT NULL, detector TEXT NOT NULL, path TEXT NOT NULL, score REAL NOT NULL,
  PRIMARY KEY (model, detector, path));
CREATE TABLE IF NOT EXISTS detections (
  model TEXT NOT NULL, detector TEXT NOT NULL, attack TEXT NOT NULL, interpreter TEXT NOT NULL,
  target_map TEXT NOT NULL, target_fpr REAL NOT NULL, examples INTEGER NOT NULL,
  threshold REAL NOT NULL, fpr REAL NOT NULL, tpr REAL, auc REAL,
  PRIMARY KEY (model, detector, attack, interpreter, target_map, target_fpr));
"""

#: Version 1 → 2: the columns version 2 added (old rows get the defaults: no options, ADV²).
_MIGRATIONS = (
    "ALTER TABLE results ADD COLUMN interpreter_options TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE transfer ADD COLUMN attack TEXT NOT NULL DEFAULT 'adv2'",
)


@functools.cache
def schema_columns() -> dict[str, tuple[str, ...]]:
    """Each table of ``SCHEMA`` and its columns, in order (read from an in-memory database)."""
    connection = sqlite3.connect(":memory:")
    try:
        connection.executescript(SCHEMA)
        tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {table: tuple(row[1] for row in connection.execute(f"PRAGMA table_info({table})")) for table in tables}
    finally:
        connection.close()


#: The primary keys of ``results`` and ``transfer``, in the order ``runs.plan.Unit`` keys use.
RESULT_KEYS_SQL = "SELECT model, interpreter, attack, target_map, image FROM results"
TRANSFER_KEYS_SQL = "SELECT model, source_interpreter, target_interpreter, target_map, image, attack FROM transfer"


def present_keys(connection: sqlite3.Connection) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
    """The primary keys in ``results`` and in ``transfer`` (a resume's "what is done")."""
    return set(connection.execute(RESULT_KEYS_SQL)), set(connection.execute(TRANSFER_KEYS_SQL))


def check_database(path: Path) -> None:
    """Refuse, read-only and before any work, a results file this underfire cannot resume into
    (not SQLite, truncated, a newer schema, missing columns); an absent file is fine."""
    if not path.exists():
        return
    if not path.is_file():
        raise InputError(f"{str(path)!r} is not a file; use another output folder")
    try:
        connection = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise InputError(f"cannot open {str(path)!r}: {error}") from None
    try:
        version = int(connection.execute("PRAGMA user_version").fetchone()[0])
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        columns = {table: {row[1] for row in connection.execute(f"PRAGMA table_info({table})")} for table in tables}
        health = connection.execute("PRAGMA quick_check").fetchone()[0]  # a truncated file may still open
        if health != "ok":
            raise sqlite3.DatabaseError(health)
    except sqlite3.DatabaseError as error:
        raise InputError(
            f"{str(path)!r} is not a readable results database ({error}); move it away or use another output folder"
        ) from None
    finally:
        connection.close()
    if version > SCHEMA_VERSION:
        raise InputError(
            f"{str(path)!r} has results schema version {version}; this underfire reads up to "
            f"{SCHEMA_VERSION}: use a newer underfire or another output folder"
        )
    if version == SCHEMA_VERSION:
        for table, expected in schema_columns().items():
            missing = [name for name in expected if table in columns and name not in columns[table]]
            if missing:
                raise InputError(
                    f"{str(path)!r} is not an underfire results database of schema version {SCHEMA_VERSION}: "
                    f"table {table} has no column {missing[0]}; use another output folder"
                )


@dataclass(frozen=True)
class ImageRecord:
    """A row of ``images``: one benign image attacked on one model."""

    model: str
    image: str
    position: int
    true_class: int
    target_class: int
    image_path: str


@dataclass(frozen=True)
class ResultRecord:
    """A row of ``results``; ``iou_by_k`` maps "0.05" … "0.50" to the IoU at that top-k share,
    ``config`` is the JSON of the attack's configuration, ``interpreter_options`` the JSON of the
    options the row's interpreter was built with."""

    model: str
    interpreter: str
    attack: str
    target_map: str
    image: str
    true_class: int
    target_class: int
    predicted_class: int
    success: bool
    confidence: float
    l1: float
    l2: float
    iou: float
    iou_by_k: dict[str, float]
    top_k_intersection: float
    spearman: float
    linf: float
    adversarial_path: str
    map_path: str
    overlay_path: str
    benign_map_path: str
    benign_overlay_path: str
    seconds: float
    seed: int
    config: str
    interpreter_options: str = "{}"

    @property
    def key(self) -> tuple[str, str, str, str, str]:
        return (self.model, self.interpreter, self.attack, self.target_map, self.image)


@dataclass(frozen=True)
class TransferRecord:
    """A row of ``transfer``: the image ``attack`` (ADV²) crafted against ``source_interpreter``,
    explained by ``target_interpreter`` and compared with that interpreter's reference map of it."""

    model: str
    source_interpreter: str
    target_interpreter: str
    target_map: str
    image: str
    l1: float
    l2: float
    iou: float
    attack: str = "adv2"

    @property
    def key(self) -> tuple[str, str, str, str, str, str]:
        return (self.model, self.source_interpreter, self.target_interpreter, self.target_map, self.image, self.attack)


def _columns(record_type: type) -> list[str]:
    return [f.name for f in fields(record_type)]


def _values(record: Any) -> tuple[Any, ...]:
    row = asdict(record)
    for name, value in row.items():
        if isinstance(value, dict):
            row[name] = json.dumps(value, sort_keys=True)
        elif isinstance(value, bool):
            row[name] = int(value)
    return tuple(row.values())


class ResultStore:
    """The database of one run folder. Use as a context manager (closes the connection)."""

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / DATABASE_NAME
        # autocommit mode: transactions are explicit (BEGIN IMMEDIATE … COMMIT) in ``_transaction``
        check_database(self.path)
        self.connection = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
        try:
            self.connection.execute("PRAGMA journal_mode=WAL")
            self.connection.execute("PRAGMA synchronous=NORMAL")  # durable against process crashes
            self._upgrade()
        except sqlite3.DatabaseError as error:
            self.close()
            raise InputError(
                f"{str(self.path)!r} is not a readable results database ({error}); move it away or use another output folder"
            ) from None
        except BaseException:
            self.close()
            raise

    def _upgrade(self) -> None:
        """Create the schema or migrate an older version in place (``check_database`` has refused
        a newer one)."""
        version = int(self.connection.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        with self._transaction() as cursor:
            if "results" in tables:  # version 0/1: the columns version 2 added
                columns = {row[1] for row in cursor.execute("PRAGMA table_info(results)")}
                transfer = {row[1] for row in cursor.execute("PRAGMA table_info(transfer)")}
                if "interpreter_options" not in columns:
                    cursor.execute(_MIGRATIONS[0])
                if "transfer" in tables and "attack" not in transfer:
                    cursor.execute(_MIGRATIONS[1])
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    cursor.execute(statement)
            cursor.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        check_database(self.path)  # what the migration did not add is missing for good

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    # ------------------------------------------------------------------------------- meta
    def meta(self) -> dict[str, str]:
        return dict(self.connection.execute("SELECT key, value FROM meta").fetchall())

    def claim(
        self,
        config: dict[str, Any],
        versions: dict[str, str],
        created: str,
        settings: dict[str, Any] | None = None,
        settings_defaults: dict[str, Any] | None = None,
    ) -> bool:
        """Record the run's config on first use; later, refuse a different one.

        ``settings`` (meta key ``attack_configs``: the resolved attack configuration per
        interpreter) is checked too, so a preset that changed between underfire versions cannot
        mix two schedules in one run. ``settings_defaults`` (the same tree, each setting at its
        default) lets a setting that a later version added pass while it is at its default: the
        run then does what it did when it was recorded. Returns True when the meta was written now.
        """
        meta = self.meta()
        if "config" in meta:
            _refuse_change(self.run_dir, "a different config", json.loads(meta["config"]), config)
            if settings is not None and "attack_configs" in meta:
                _refuse_change(
                    self.run_dir,
                    "other attack settings (did the preset change?)",
                    json.loads(meta["attack_configs"]),
                    settings,
                    settings_defaults,
                )
            return False
        rows = {
            "config": json.dumps(config, sort_keys=True),
            "versions": json.dumps(versions, sort_keys=True),
            "created": created,
        }
        if settings is not None:
            rows["attack_configs"] = json.dumps(settings, sort_keys=True)
        with self._transaction() as cursor:
            cursor.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", rows.items())
        return True

    def claim_value(self, key: str, value: str, what: str) -> None:
        """Record a meta ``key`` on first use; later, refuse another value (one line naming ``what``)."""
        stored = self.meta().get(key)
        if stored is None:
            with self._transaction() as cursor:
                cursor.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (key, value))
        elif stored != value:
            raise InputError(
                f"{str(self.run_dir)!r} holds {what} of this run ({key} {stored}, not {value}); use another output folder"
            )

    # ----------------------------------------------------------------------------- images
    def images(self, model: str) -> list[ImageRecord]:
        """The images recorded for ``model``, in position order."""
        names = _columns(ImageRecord)
        rows = self.connection.execute(
            f"SELECT {', '.join(names)} FROM images WHERE model = ? ORDER BY position", (model,)
        ).fetchall()
        return [ImageRecord(*row) for row in rows]

    def insert_images(self, records: Sequence[ImageRecord]) -> None:
        """A model's images, all in one transaction."""
        with self._transaction() as cursor:
            _insert(cursor, "images", records)

    # ---------------------------------------------------------------------------- results
    def result_keys(self) -> set[tuple[str, ...]]:
        """Primary keys present in ``results``."""
        return set(self.connection.execute(RESULT_KEYS_SQL))

    def transfer_keys(self) -> set[tuple[str, ...]]:
        """Primary keys present in ``transfer``."""
        return set(self.connection.execute(TRANSFER_KEYS_SQL))

    def insert_unit(
        self, results: Sequence[ResultRecord], transfer: Sequence[TransferRecord] = (), unit: FailureKey | None = None
    ) -> None:
        """All rows of one unit of work in one transaction: all of them land, or none; the unit's
        failure record (``unit``), if an earlier attempt left one, goes in the same transaction."""
        with self._transaction() as cursor:
            _insert(cursor, "results", results)
            _insert(cursor, "transfer", transfer)
            if unit is not None:
                cursor.execute(
                    "DELETE FROM failures WHERE model = ? AND attack = ? AND interpreter = ? AND target_map = ? AND batch = ?",
                    unit,
                )

    def insert_rows(self, tables: dict[str, list[dict[str, Any]]]) -> None:
        """Rows of several tables, as column → value dicts, in one transaction (merging runs)."""
        with self._transaction() as cursor:
            for table, rows in tables.items():
                if table not in ("images", "results", "transfer", "failures"):
                    raise InputError(f"no table {table!r} in the results database")
                if rows:
                    names = list(rows[0])
                    cursor.executemany(
                        f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [tuple(row[name] for name in names) for row in rows],
                    )

    def detector_scores(self, model: str, detector: str) -> dict[str, float]:
        """The stored scores of ``detector`` on ``model``'s images, by path."""
        query = "SELECT path, score FROM detector_scores WHERE model = ? AND detector = ?"
        return {path: score for path, score in self.connection.execute(query, (model, detector))}

    def insert_detector_scores(self, model: str, detector: str, scores: dict[str, float]) -> None:
        """New scores of one batch of images, in one transaction."""
        with self._transaction() as cursor:
            cursor.executemany(
                "INSERT INTO detector_scores (model, detector, path, score) VALUES (?, ?, ?, ?)",
                [(model, detector, path, float(score)) for path, score in scores.items()],
            )

    def replace_detections(self, rows: Sequence[dict[str, Any]]) -> None:
        """Summaries of a detector (derived from its scores): a re-run with the same key replaces them."""
        columns = (
            "model",
            "detector",
            "attack",
            "interpreter",
            "target_map",
            "target_fpr",
            "examples",
            "threshold",
            "fpr",
            "tpr",
            "auc",
        )
        with self._transaction() as cursor:
            cursor.executemany(
                f"INSERT OR REPLACE INTO detections ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                [tuple(row[c] for c in columns) for row in rows],
            )

    def record_failure(self, unit: FailureKey, error: str, attempts: int, when: str) -> None:
        """A unit that failed for good: kept (replacing an older attempt's) until it succeeds."""
        with self._transaction() as cursor:
            cursor.execute(
                "INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?, ?, ?)", (*unit, error, attempts, when)
            )

    def failures(self) -> list[dict[str, Any]]:
        """The failed units, as dicts of the ``failures`` columns."""
        cursor = self.connection.execute(
            "SELECT * FROM failures ORDER BY model, batch, attack, interpreter, target_map"
        )
        names = [column[0] for column in cursor.description]
        return [dict(zip(names, row)) for row in cursor]

    def count(self, table: str) -> int:
        if table not in ("meta", "images", "results", "transfer", "failures"):
            raise InputError(f"no table {table!r} in the results database")
        return int(self.connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of a table as dicts (``iou_by_k`` decoded), for summaries and tests."""
        if table not in ("images", "results", "transfer"):
            raise InputError(f"no table {table!r} in the results database")
        cursor = self.connection.execute(f"SELECT * FROM {table}")
        names = [column[0] for column in cursor.description]
        out = []
        for values in cursor:
            row = dict(zip(names, values))
            if "iou_by_k" in row:
                row["iou_by_k"] = json.loads(row["iou_by_k"])
            out.append(row)
        return out

    # ---------------------------------------------------------------------------- helpers
    def _transaction(self) -> _Transaction:
        return _Transaction(self.connection)


def _refuse_change(run_dir: Path, what: str, before: Any, now: Any, defaults: Any = None) -> None:
    """Refuse ``now`` unless it equals ``before``, up to keys ``before`` lacks whose value now is
    their value in ``defaults`` (settings added since, left at what they were before they existed)."""
    if before == now:
        return
    old, new, default = _flatten(before), _flatten(now), _flatten(defaults or {})
    added_at_default = {k for k in set(new) - set(old) if k in default and default[k] == new[k]}
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k not in added_at_default)
    if not changed:
        return
    shown = ", ".join(f"{k}: {json.dumps(old.get(k))} → {json.dumps(new.get(k))}" for k in changed[:4])
    raise InputError(
        f"{str(run_dir)!r} holds a run with {what} ({shown}); use another output folder or the same config"
    )


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} → {"a.b": 1}: config differences named by their TOML key."""
    if not isinstance(tree, dict) or not tree:
        return {prefix: tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return out


def _insert(cursor: sqlite3.Cursor, table: str, records: Sequence[Any]) -> None:
    if records:
        names = _columns(type(records[0]))
        cursor.executemany(
            f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
            [_values(record) for record in records],
        )


class _Transaction:
    """``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on any exception."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection

    def __enter__(self) -> sqlite3.Cursor:
        self.connection.execute("BEGIN IMMEDIATE")
        return self.connection.cursor()

    def __exit__(self, kind: object, *_: object) -> None:
        self.connection.execute("ROLLBACK" if kind is not None else "COMMIT")
