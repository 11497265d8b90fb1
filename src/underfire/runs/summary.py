"""The short answer of a run: per model × interpreter (× target map), PGD next to ADV².

Read from the database, so it is the same after a resume as after one uninterrupted run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from ..store import ResultStore


@dataclass(frozen=True)
class AttackSummary:
    """Means over the images of one model × interpreter × target map × attack."""

    images: int
    success_rate: float
    iou: float
    l1: float


@dataclass(frozen=True)
class SummaryRow:
    model: str
    interpreter: str
    target_map: str
    attacks: dict[str, AttackSummary]


def summarise_run(run_dir: str | Path) -> list[SummaryRow]:
    """One row per model × interpreter × target map, in the order the run stored them."""
    with ResultStore(run_dir) as store:
        query = """
            SELECT model, interpreter, target_map, attack, COUNT(*), AVG(success), AVG(iou), AVG(l1), MIN(rowid)
            FROM results GROUP BY model, interpreter, target_map, attack ORDER BY MIN(rowid)
        """
        grouped: dict[tuple[str, str, str], dict[str, AttackSummary]] = {}
        for model, interpreter, target_map, attack, count, success, iou, l1, _ in store.connection.execute(query):
            grouped.setdefault((model, interpreter, target_map), {})[attack] = AttackSummary(count, success, iou, l1)
    return [SummaryRow(*key, attacks) for key, attacks in grouped.items()]


def format_summary(rows: list[SummaryRow], title: str = "") -> str:
    """The summary as a text table (rich's box drawing; plain columns for a pipe)."""
    from rich.console import Console
    from rich.table import Table

    show_map = len({row.target_map for row in rows}) > 1
    table = Table(title=title or None, title_justify="left")
    table.add_column("model")
    table.add_column("interpreter")
    if show_map:
        table.add_column("target map")
    for attack, label in (("pgd", "PGD"), ("adv2", "ADV²")):
        if any(attack in row.attacks for row in rows):
            for measure in ("success", "IoU", "L1"):
                table.add_column(f"{label} {measure}", justify="right")
    attacks = [a for a in ("pgd", "adv2") if any(a in row.attacks for row in rows)]
    for row in rows:
        cells = [row.model, row.interpreter] + ([row.target_map] if show_map else [])
        for attack in attacks:
            s = row.attacks.get(attack)
            cells += ["—"] * 3 if s is None else [f"{s.success_rate:.0%}", f"{s.iou:.3f}", f"{s.l1:.3f}"]
        table.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=160, no_color=True, highlight=False).print(table)
    return buffer.getvalue().rstrip("\n")
