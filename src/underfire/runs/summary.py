"""The short answer of a run: per model × interpreter (× target map), each attack side by side.

Read from the database through the store's read side, so it is the same after a resume as after
one uninterrupted run.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

from ..attacks import attack_label
from ..store import open_reader


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
    """One row per model × interpreter × target map, in the order the run stored them; each
    row's attacks in the run's order."""
    with open_reader(run_dir) as reader:
        order = reader.attacks()
        grouped: dict[tuple[str, str, str], dict[str, AttackSummary]] = {}
        for row in reader.means(("success", "iou", "l1")):
            key = (row["model"], row["interpreter"], row["target_map"])
            grouped.setdefault(key, {})[row["attack"]] = AttackSummary(row["n"], row["success"], row["iou"], row["l1"])
    return [SummaryRow(*key, {a: attacks[a] for a in order if a in attacks}) for key, attacks in grouped.items()]


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
    attacks = list(dict.fromkeys(a for row in rows for a in row.attacks))
    for attack in attacks:
        for measure in ("success", "IoU", "L1"):
            table.add_column(f"{attack_label(attack)} {measure}", justify="right")
    for row in rows:
        cells = [row.model, row.interpreter] + ([row.target_map] if show_map else [])
        for attack in attacks:
            s = row.attacks.get(attack)
            cells += ["—"] * 3 if s is None else [f"{s.success_rate:.0%}", f"{s.iou:.3f}", f"{s.l1:.3f}"]
        table.add_row(*cells)
    buffer = io.StringIO()
    Console(file=buffer, width=160, no_color=True, highlight=False).print(table)
    return buffer.getvalue().rstrip("\n")
