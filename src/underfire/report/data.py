"""Read a run's SQLite database and aggregate it into the numbers every report format shows.

Every mean is computed once, here, by SQL ``AVG`` and rounded once by :func:`rounded`: the HTML
table, the JSON and the CSV all print these same rounded values, so they can never disagree with
one another (and a test recomputes them from the database to show they agree with it too).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError

DATABASE = "results.sqlite"
ATTACKS = ("pgd", "adv2")
ATTACK_LABELS = {"pgd": "PGD", "adv2": "ADV²"}
INTERPRETER_ORDER = ("grad", "smoothgrad", "cam", "gradcam", "rts", "mask")
REQUIRED_TABLES = ("images", "results")


@dataclass(frozen=True)
class Measure:
    """One averaged column of the summary: the SQL column, its label and how it is rounded."""

    column: str
    label: str
    kind: str  # "percent" (a 0/1 rate shown as %), "number" (3 decimals) or "seconds" (2 decimals)


MEASURES: tuple[Measure, ...] = (
    Measure("success", "success", "percent"),
    Measure("confidence", "p(target)", "number"),
    Measure("l1", "map L1", "number"),
    Measure("iou", "map IoU", "number"),
    Measure("seconds", "seconds / image", "seconds"),
)
DECIMALS = {"percent": 1, "number": 3, "seconds": 2}


def rounded(value: float | None, kind: str) -> float | None:
    """The single rounding rule of the report (None stays None: an empty cell)."""
    if value is None:
        return None
    if kind == "percent":
        return round(100.0 * value, DECIMALS[kind])
    return round(float(value), DECIMALS[kind])


def formatted(value: float | int | None, kind: str) -> str:
    """How a rounded value is printed in the HTML page: fixed decimals, '%' for rates, '—' for none."""
    if value is None:
        return "—"
    if kind == "count":
        return str(int(value))
    text = f"{value:.{DECIMALS[kind]}f}"
    return f"{text}%" if kind == "percent" else text


def summary_key(measure: str, attack: str) -> str:
    """Field name of one measure for one attack in a summary row, e.g. ``adv2_iou``."""
    suffix = "success_pct" if measure == "success" else measure
    return f"{attack}_{suffix}"


def summary_fields() -> list[tuple[str, str]]:
    """Every field of a summary row with its kind, in CSV/JSON column order."""
    fields = [("model", "text"), ("interpreter", "text"), ("target_map", "text"), ("images", "count")]
    fields += [(f"{attack}_n", "count") for attack in ATTACKS]
    for measure in MEASURES:
        fields += [(summary_key(measure.column, attack), measure.kind) for attack in ATTACKS]
    fields.append(("iou_gain", "number"))
    return fields


def interpreter_sort_key(name: str) -> tuple[int, str]:
    """The paper's order (GRAD, CAM, RTS, MASK) first, anything else alphabetically after."""
    return (INTERPRETER_ORDER.index(name) if name in INTERPRETER_ORDER else len(INTERPRETER_ORDER), name)


@dataclass
class RunData:
    """Everything a report needs from one run, read once from its database."""

    run_dir: Path
    name: str
    created: str | None
    config: Any
    versions: Any
    counts: dict[str, Any]
    summary: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    images: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    results: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({row["model"] for row in self.summary})

    def interpreters(self, model: str) -> list[str]:
        return sorted({row["interpreter"] for row in self.summary if row["model"] == model}, key=interpreter_sort_key)

    def target_maps(self, model: str, interpreter: str) -> list[str]:
        """The target maps of one model × interpreter, 'benign' (the paper's default) first."""
        names = {row["target_map"] for row in self.summary if (row["model"], row["interpreter"]) == (model, interpreter)}
        return sorted(names, key=lambda name: (name != "benign", name))


@contextmanager
def open_run(run_dir: Path) -> Iterator[sqlite3.Connection]:
    """Open a run's database read-only (a run still writing is not disturbed), or say in one line why not."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise InputError(f"run directory {str(run_dir)!r} does not exist")
    if not run_dir.is_dir():
        raise InputError(f"{str(run_dir)!r} is not a directory (give the run directory that holds {DATABASE})")
    database = run_dir / DATABASE
    if not database.is_file():
        raise InputError(f"{str(run_dir)!r} is not a run directory: it has no {DATABASE}")
    try:
        connection = sqlite3.connect(f"{database.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as error:
        raise InputError(f"cannot open {database}: {error}") from None
    connection.row_factory = sqlite3.Row
    try:
        try:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as error:
            raise InputError(f"{database} is not a readable SQLite database: {error}") from None
        missing = [table for table in REQUIRED_TABLES if table not in tables]
        if missing:
            raise InputError(f"{database} is empty or not an underfire run database (no table {', '.join(missing)})")
        if connection.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 0:
            raise InputError(f"{database} has no results yet: nothing to report")
        yield connection
    finally:
        connection.close()


def _meta(connection: sqlite3.Connection) -> dict[str, Any]:
    """The meta table as parsed JSON where it parses (a partial run may lack it altogether)."""
    try:
        rows = connection.execute("SELECT key, value FROM meta").fetchall()
    except sqlite3.OperationalError:
        return {}
    meta: dict[str, Any] = {}
    for row in rows:
        try:
            meta[row["key"]] = json.loads(row["value"])
        except (TypeError, ValueError):
            meta[row["key"]] = row["value"]
    return meta


def _has_table(connection: sqlite3.Connection, name: str) -> bool:
    return connection.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (name,)).fetchone() is not None


def _summary(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Per model × interpreter × target map: rows per attack and the rounded SQL means."""
    averages = ", ".join(f"AVG({measure.column}) AS {measure.column}" for measure in MEASURES)
    query = (
        f"SELECT model, interpreter, target_map, attack, COUNT(*) AS n, {averages} "
        "FROM results GROUP BY model, interpreter, target_map, attack"
    )
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    raw_iou: dict[tuple[str, str, str], dict[str, float | None]] = {}
    for row in connection.execute(query):
        key = (row["model"], row["interpreter"], row["target_map"])
        entry = groups.setdefault(key, _empty_summary(*key))
        attack = row["attack"]
        if attack not in ATTACKS:
            continue
        entry[f"{attack}_n"] = row["n"]
        for measure in MEASURES:
            entry[summary_key(measure.column, attack)] = rounded(row[measure.column], measure.kind)
        raw_iou.setdefault(key, {})[attack] = row["iou"]
    images = "SELECT model, interpreter, target_map, COUNT(DISTINCT image) FROM results GROUP BY model, interpreter, target_map"
    for model, interpreter, target_map, count in connection.execute(images):
        if (model, interpreter, target_map) in groups:
            groups[(model, interpreter, target_map)]["images"] = count
    for key, entry in groups.items():
        pgd, adv2 = raw_iou.get(key, {}).get("pgd"), raw_iou.get(key, {}).get("adv2")
        entry["iou_gain"] = rounded(adv2 - pgd, "number") if pgd is not None and adv2 is not None else None
    order = sorted(groups, key=lambda key: (key[0], interpreter_sort_key(key[1]), key[2] != "benign", key[2]))
    return [groups[key] for key in order]


def _empty_summary(model: str, interpreter: str, target_map: str) -> dict[str, Any]:
    entry: dict[str, Any] = {name: None for name, _ in summary_fields()}
    entry.update(model=model, interpreter=interpreter, target_map=target_map, images=0, pgd_n=0, adv2_n=0)
    return entry


def _curves(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Mean IoU per top-k fraction, per model × interpreter × target map × attack (rows without it skipped)."""
    sums: dict[tuple[str, str, str, str], dict[float, list[float]]] = {}
    query = "SELECT model, interpreter, target_map, attack, iou_by_k FROM results WHERE iou_by_k IS NOT NULL"
    for row in connection.execute(query):
        try:
            by_k = json.loads(row["iou_by_k"])
            values = {float(k): float(v) for k, v in by_k.items() if v is not None}
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
                "iou": [rounded(sum(by_k[k]) / len(by_k[k]), "number") for k in ks],
            }
        )
    curves.sort(key=lambda c: (c["model"], interpreter_sort_key(c["interpreter"]), c["target_map"], c["attack"]))
    return curves


def _transfer(connection: sqlite3.Connection) -> list[dict[str, Any]]:
    """Mean map distances of ADV² examples crafted against one interpreter and explained by another.

    The diagonal is the ADV² row itself; where the transfer table lacks it (a partial run), it is
    taken from the results table so the matrix still shows the attacked interpreter.
    """
    cells: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    if _has_table(connection, "transfer"):
        query = (
            "SELECT model, target_map, source_interpreter, target_interpreter, COUNT(*) AS n, "
            "AVG(iou) AS iou, AVG(l1) AS l1, AVG(l2) AS l2 FROM transfer "
            "GROUP BY model, target_map, source_interpreter, target_interpreter"
        )
        for row in connection.execute(query):
            key = (row["model"], row["target_map"], row["source_interpreter"], row["target_interpreter"])
            cells[key] = {"n": row["n"], "iou": row["iou"], "l1": row["l1"], "l2": row["l2"], "from": "transfer"}
    if cells:
        diagonal = (
            "SELECT model, target_map, interpreter, COUNT(*) AS n, AVG(iou) AS iou, AVG(l1) AS l1, AVG(l2) AS l2 "
            "FROM results WHERE attack = 'adv2' GROUP BY model, target_map, interpreter"
        )
        groups = {(key[0], key[1]) for key in cells}
        for row in connection.execute(diagonal):
            key = (row["model"], row["target_map"], row["interpreter"], row["interpreter"])
            if (key[0], key[1]) in groups and key not in cells:
                cells[key] = {"n": row["n"], "iou": row["iou"], "l1": row["l1"], "l2": row["l2"], "from": "results"}
    rows = []
    for (model, target_map, source, target), cell in cells.items():
        rows.append(
            {
                "model": model,
                "target_map": target_map,
                "source_interpreter": source,
                "target_interpreter": target,
                "n": cell["n"],
                "iou": rounded(cell["iou"], "number"),
                "l1": rounded(cell["l1"], "number"),
                "l2": rounded(cell["l2"], "number"),
                "from": cell["from"],
            }
        )
    rows.sort(key=lambda r: (r["model"], r["target_map"], interpreter_sort_key(r["source_interpreter"]), interpreter_sort_key(r["target_interpreter"])))
    return rows


def _run_name(config: Any) -> str | None:
    """The experiment's name from its config (``name`` or ``experiment.name``), if it has one."""
    if not isinstance(config, dict):
        return None
    for table in (config, config.get("experiment")):
        if isinstance(table, dict) and isinstance(table.get("name"), str) and table["name"]:
            return table["name"]
    return None


def load_run(run_dir: Path) -> RunData:
    """Read a run directory's database into a :class:`RunData` (one-line ``InputError`` if unusable)."""
    run_dir = Path(run_dir)
    with open_run(run_dir) as connection:
        meta = _meta(connection)
        config = meta.get("config")
        name = _run_name(config)
        counts: dict[str, Any] = {
            "images": connection.execute("SELECT COUNT(*) FROM images").fetchone()[0],
            "results": {attack: 0 for attack in ATTACKS},
            "transfer": connection.execute("SELECT COUNT(*) FROM transfer").fetchone()[0] if _has_table(connection, "transfer") else 0,
        }
        for attack, count in connection.execute("SELECT attack, COUNT(*) FROM results GROUP BY attack"):
            counts["results"][attack] = count
        images = {(row["model"], row["image"]): dict(row) for row in connection.execute("SELECT * FROM images")}
        results = {
            (row["model"], row["interpreter"], row["attack"], row["target_map"], row["image"]): dict(row)
            for row in connection.execute("SELECT * FROM results")
        }
        return RunData(
            run_dir=run_dir,
            name=name or run_dir.resolve().name,
            created=meta.get("created") if isinstance(meta.get("created"), str) else None,
            config=config,
            versions=meta.get("versions"),
            counts=counts,
            summary=_summary(connection),
            curves=_curves(connection),
            transfer=_transfer(connection),
            images=images,
            results=results,
        )


def summary_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per model × interpreter × target map: rows per attack, PGD and ADV² success rate (%), mean
    confidence, L1, IoU and seconds — the rounded numbers the HTML table, JSON and CSV all show."""
    with open_run(Path(run_dir)) as connection:
        return _summary(connection)
