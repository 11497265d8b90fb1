"""The read side of a run's results: one read-only API for the attack JSON, the run summary and the
report, so a mean is computed in one place (SQL ``AVG`` here) and the database is opened one way.

The connection is read-only (``mode=ro``): a run still writing is not disturbed, and a report can
never change a result. A run may be partial (killed): every query reports whatever rows exist.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import InputError
from .database import DATABASE_NAME, SCHEMA_VERSION, schema_columns

REQUIRED_TABLES = ("images", "results")
#: Columns a version-1 database lacks; the report reads such a run without them.
_ADDED_IN_VERSION_2 = ("interpreter_options",)
#: Columns of ``results`` that may be averaged.
MEASURE_COLUMNS = ("success", "confidence", "l1", "l2", "iou", "top_k_intersection", "spearman", "linf", "seconds")
#: Means over a subset of rows: ``iou_success`` is the IoU over the attacks that reached the target
#: class (NULL when none did), the number to read beside the mean over all rows.
DERIVED_MEASURES = {"iou_success": "AVG(CASE WHEN success = 1 THEN iou END)"}


class RunReader:
    """A run folder's database, read-only. Use as a context manager, or ``open_reader``."""

    def __init__(self, run_dir: str | Path) -> None:
        run_dir = Path(run_dir)
        if not run_dir.exists():
            raise InputError(f"run directory {str(run_dir)!r} does not exist")
        if not run_dir.is_dir():
            raise InputError(f"{str(run_dir)!r} is not a directory (give the run directory that holds {DATABASE_NAME})")
        database = run_dir / DATABASE_NAME
        if not database.is_file():
            raise InputError(f"{str(run_dir)!r} is not a run directory: it has no {DATABASE_NAME}")
        self.run_dir = run_dir
        self.path = database
        try:
            self.connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
        except sqlite3.Error as error:
            raise InputError(f"cannot open {database}: {error}") from None
        self.connection.row_factory = sqlite3.Row
        try:
            self._check(database)
        except BaseException:
            self.connection.close()
            raise

    def _check(self, database: Path) -> None:
        try:
            tables = {row[0] for row in self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            version = int(self.connection.execute("PRAGMA user_version").fetchone()[0])
        except sqlite3.DatabaseError as error:
            raise InputError(f"{database} is not a readable SQLite database: {error}") from None
        if version > SCHEMA_VERSION:
            raise InputError(
                f"{database} has results schema version {version}; this underfire reads up to {SCHEMA_VERSION}"
            )
        missing = [table for table in REQUIRED_TABLES if table not in tables]
        if missing:
            raise InputError(f"{database} is empty or not an underfire run database (no table {', '.join(missing)})")
        present = {row[1] for row in self.connection.execute("PRAGMA table_info(results)")}
        lacking = [
            name for name in schema_columns()["results"] if name not in present and name not in _ADDED_IN_VERSION_2
        ]
        if lacking:
            raise InputError(f"{database} is not an underfire run database (table results has no column {lacking[0]})")
        self.tables = tables
        self.transfer_has_attack = "transfer" in tables and any(
            row[1] == "attack" for row in self.connection.execute("PRAGMA table_info(transfer)")
        )
        if self.connection.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0:
            raise InputError(f"{database} has no results yet: nothing to report")

    def __enter__(self) -> RunReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self.connection.close()

    # ------------------------------------------------------------------ what the run is
    def meta(self) -> dict[str, Any]:
        """The meta table, values parsed as JSON where they parse (a partial run may lack it)."""
        try:
            rows = self.connection.execute("SELECT key, value FROM meta").fetchall()
        except sqlite3.OperationalError:
            return {}
        meta: dict[str, Any] = {}
        for row in rows:
            try:
                meta[row["key"]] = json.loads(row["value"])
            except (TypeError, ValueError):
                meta[row["key"]] = row["value"]
        return meta

    def attacks(self) -> list[str]:
        """The attacks of the run: those its config names (in that order), then any other that
        has rows (alphabetically)."""
        config = self.meta().get("config")
        named: list[str] = []
        if isinstance(config, dict) and isinstance(config.get("experiment"), dict):
            listed = config["experiment"].get("attacks")
            if isinstance(listed, list):
                named = [a for a in listed if isinstance(a, str)]
        present = [row[0] for row in self.connection.execute("SELECT DISTINCT attack FROM results ORDER BY attack")]
        return named + [a for a in present if a not in named]

    def count(self, table: str, by: str | None = None) -> Any:
        """Rows of ``table`` (0 if it does not exist), or a dict of counts per value of column ``by``."""
        if table not in ("images", "results", "transfer"):
            raise InputError(f"no table {table!r} in the results database")
        if table not in self.tables:
            return {} if by else 0
        if by is None:
            return int(self.connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        if by != "attack":
            raise InputError(f"cannot count {table} by {by!r}")
        return dict(self.connection.execute(f"SELECT attack, COUNT(*) FROM {table} GROUP BY attack").fetchall())

    # ------------------------------------------------------------------ aggregates
    def means(self, measures: Sequence[str] = MEASURE_COLUMNS) -> list[dict[str, Any]]:
        """Per model × interpreter × target map × attack: ``n`` and the unrounded mean of each
        measure (a column, or one of ``DERIVED_MEASURES``), in the order the run stored them."""
        bad = [m for m in measures if m not in MEASURE_COLUMNS and m not in DERIVED_MEASURES]
        if bad:
            raise InputError(f"{bad[0]!r} is not a measure of the results table")
        averages = "".join(f", {DERIVED_MEASURES.get(m, f'AVG({m})')} AS {m}" for m in measures)
        query = (
            f"SELECT model, interpreter, target_map, attack, COUNT(*) AS n{averages} FROM results "
            "GROUP BY model, interpreter, target_map, attack ORDER BY MIN(rowid)"
        )
        return [dict(row) for row in self.connection.execute(query)]

    def image_counts(self) -> dict[tuple[str, str, str], int]:
        """Distinct images per model × interpreter × target map (over all attacks)."""
        query = "SELECT model, interpreter, target_map, COUNT(DISTINCT image) FROM results GROUP BY model, interpreter, target_map"
        return {(m, i, t): n for m, i, t, n in self.connection.execute(query)}

    def iou_curves(self) -> list[dict[str, Any]]:
        """Mean IoU per top-k fraction, per model × interpreter × target map × attack (unrounded;
        rows without a readable ``iou_by_k`` are skipped)."""
        sums: dict[tuple[str, str, str, str], dict[float, list[float]]] = {}
        query = "SELECT model, interpreter, target_map, attack, iou_by_k FROM results WHERE iou_by_k IS NOT NULL"
        for row in self.connection.execute(query):
            try:
                values = {float(k): float(v) for k, v in json.loads(row["iou_by_k"]).items() if v is not None}
            except (TypeError, ValueError, AttributeError):
                continue
            entry = sums.setdefault((row["model"], row["interpreter"], row["target_map"], row["attack"]), {})
            for k, value in values.items():
                entry.setdefault(k, []).append(value)
        curves = []
        for (model, interpreter, target_map, attack), by_k in sums.items():
            ks = sorted(by_k)
            curves.append(
                {
                    "model": model,
                    "interpreter": interpreter,
                    "target_map": target_map,
                    "attack": attack,
                    "n": max(len(by_k[k]) for k in ks),
                    "k": ks,
                    "iou": [sum(by_k[k]) / len(by_k[k]) for k in ks],
                }
            )
        return curves

    def transfer_means(self) -> list[dict[str, Any]]:
        """Mean map distances of examples crafted against one interpreter and explained by
        another, per model × attack × target map × (source, target) interpreter (unrounded).

        The diagonal is the attack's own row; where the transfer table lacks it (a partial run),
        it is taken from the results table so the matrix still shows the attacked interpreter.
        """
        cells: dict[tuple[str, str, str, str, str], dict[str, Any]] = {}
        if "transfer" in self.tables:
            attack = "attack" if self.transfer_has_attack else "'adv2'"
            query = (
                f"SELECT model, {attack} AS attack, target_map, source_interpreter, target_interpreter, COUNT(*) AS n, "
                "AVG(iou) AS iou, AVG(l1) AS l1, AVG(l2) AS l2 FROM transfer "
                f"GROUP BY model, {attack}, target_map, source_interpreter, target_interpreter"
            )
            for row in self.connection.execute(query):
                key = (
                    row["model"],
                    row["attack"],
                    row["target_map"],
                    row["source_interpreter"],
                    row["target_interpreter"],
                )
                cells[key] = {"n": row["n"], "iou": row["iou"], "l1": row["l1"], "l2": row["l2"], "from": "transfer"}
        if cells:
            groups = {key[:3] for key in cells}
            diagonal = (
                "SELECT model, attack, target_map, interpreter, COUNT(*) AS n, AVG(iou) AS iou, AVG(l1) AS l1, "
                "AVG(l2) AS l2 FROM results GROUP BY model, attack, target_map, interpreter"
            )
            for row in self.connection.execute(diagonal):
                key = (row["model"], row["attack"], row["target_map"], row["interpreter"], row["interpreter"])
                if key[:3] in groups and key not in cells:
                    cells[key] = {"n": row["n"], "iou": row["iou"], "l1": row["l1"], "l2": row["l2"], "from": "results"}
        return [
            {"model": m, "attack": a, "target_map": t, "source_interpreter": s, "target_interpreter": d, **cell}
            for (m, a, t, s, d), cell in cells.items()
        ]

    def detections(self) -> list[dict[str, Any]]:
        """Rows of ``detections`` (``underfire detect``'s summaries); none before version 4."""
        if "detections" not in self.tables:
            return []
        query = "SELECT * FROM detections ORDER BY model, detector, target_fpr, attack, interpreter, target_map"
        return [dict(row) for row in self.connection.execute(query)]

    def detector_score_sets(self) -> list[dict[str, Any]]:
        """Per model × detector: the benign images' scores and the successful adversarial
        examples' rows (attack, interpreter, target map, image, path, score): what ROC curves are
        drawn from."""
        if "detector_scores" not in self.tables:
            return []
        sets: dict[tuple[str, str], dict[str, Any]] = {}
        benign = (
            "SELECT s.model, s.detector, s.score FROM detector_scores s "
            "JOIN images i ON i.model = s.model AND i.image_path = s.path ORDER BY s.model, s.detector, i.position"
        )
        for row in self.connection.execute(benign):
            entry = sets.setdefault((row["model"], row["detector"]), {"benign": [], "examples": []})
            entry["benign"].append(row["score"])
        attacked = (
            "SELECT s.model, s.detector, r.attack, r.interpreter, r.target_map, r.image, r.adversarial_path, r.success, s.score "
            "FROM detector_scores s JOIN results r ON r.model = s.model AND r.adversarial_path = s.path AND r.success = 1 ORDER BY r.rowid"
        )
        for row in self.connection.execute(attacked):
            entry = sets.setdefault((row["model"], row["detector"]), {"benign": [], "examples": []})
            entry["examples"].append(
                {
                    key: row[key]
                    for key in ("attack", "interpreter", "target_map", "image", "adversarial_path", "success", "score")
                }
            )
        return [{"model": m, "detector": d, **entry} for (m, d), entry in sorted(sets.items())]

    # ------------------------------------------------------------------ rows
    def results(self, **where: str) -> list[dict[str, Any]]:
        """Rows of ``results`` as dicts (``iou_by_k`` decoded), optionally filtered by column
        values (``model=``, ``interpreter=``, ``attack=``, ``target_map=``), in insertion order."""
        allowed = {"model", "interpreter", "attack", "target_map", "image"}
        if set(where) - allowed:
            raise InputError(f"cannot filter results by {sorted(set(where) - allowed)[0]!r}")
        clause = " AND ".join(f"{column} = ?" for column in where)
        query = "SELECT * FROM results" + (f" WHERE {clause}" if clause else "") + " ORDER BY rowid"
        rows = []
        for row in self.connection.execute(query, tuple(where.values())):
            entry = dict(row)
            try:
                entry["iou_by_k"] = json.loads(entry["iou_by_k"])
            except (TypeError, ValueError):
                pass
            rows.append(entry)
        return rows

    def images(self) -> list[dict[str, Any]]:
        """Rows of ``images`` (the benign images per model) as dicts."""
        return [dict(row) for row in self.connection.execute("SELECT * FROM images ORDER BY model, position")]


@contextmanager
def open_reader(run_dir: str | Path) -> Iterator[RunReader]:
    """``with open_reader(run_dir) as reader: ...``, or one line saying why the folder is unusable."""
    reader = RunReader(run_dir)
    try:
        yield reader
    finally:
        reader.close()
