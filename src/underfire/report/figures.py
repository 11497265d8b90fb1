"""The report's figures, drawn with matplotlib's Agg canvas and returned as PNG bytes.

Figures are built as ``matplotlib.figure.Figure`` objects, never through ``pyplot``: no global
figure registry, no backend switch, nothing left open after a report.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .data import attack_label, baseline_attack, interpreter_sort_key

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")
MARKERS = ("o", "s", "^", "D", "v", "P")
# line styles of the attacks other than the baseline, in run order (the baseline is dashed)
ATTACK_LINES: tuple[tuple[Any, str], ...] = (
    ("-", "solid"),
    (":", "dotted"),
    ("-.", "dash-dotted"),
    ((0, (5, 1, 1, 1, 1, 1)), "dash-dot-dotted"),
    ((0, (1, 3)), "loosely dotted"),
)


@dataclass(frozen=True)
class AttackLine:
    """How one attack's curves are drawn: matplotlib line style, width, and the style in words."""

    linestyle: Any
    linewidth: float
    words: str


def attack_lines(attacks: Sequence[str]) -> dict[str, AttackLine]:
    """One line style per attack, legend order: the attacks compared with the baseline first (the
    first one solid, then dotted, dash-dotted, …), the baseline (PGD) dashed last."""
    names = list(dict.fromkeys(attacks))
    base = baseline_attack(names)
    others = [name for name in names if name != base]
    lines = {}
    for i, name in enumerate(others):
        linestyle, words = ATTACK_LINES[i % len(ATTACK_LINES)]
        lines[name] = AttackLine(linestyle, 2.0 if i == 0 else 1.6, words)
    if base is not None:
        lines[base] = AttackLine("--", 1.4, "dashed")
    return lines


@dataclass(frozen=True)
class FigureStyle:
    """Sizes of the report's figures (inches at ``dpi``)."""

    panel_width: float = 4.2
    panel_height: float = 3.2
    cell_size: float = 0.85
    transfer_columns: int = 2  # heat maps side by side
    dpi: int = 100


def _png(figure: Figure, dpi: int) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi)  # constrained layout: one draw, no bbox pass
    return buffer.getvalue()


def interpreter_colours(names: Sequence[str]) -> dict[str, str]:
    """One stable colour per interpreter, shared by every panel and figure of a report."""
    ordered = sorted(set(names), key=interpreter_sort_key)
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(ordered)}


def iou_curves_figure(
    curves: list[dict[str, Any]], style: FigureStyle = FigureStyle(), attacks: Sequence[str] | None = None
) -> bytes:
    """IoU against the top-k fraction: one panel per model, one colour per interpreter, one line
    style per attack (``attack_lines``: PGD dashed, ADV² solid, others dotted, dash-dotted, …; a
    marker per target map when a run has several). ``attacks``: the run's attacks in order
    (default: those of the curves, as they come)."""
    names = list(dict.fromkeys([*(attacks or []), *(curve["attack"] for curve in curves)]))
    lines = attack_lines(names)
    models = sorted({curve["model"] for curve in curves})
    colours = interpreter_colours([curve["interpreter"] for curve in curves])
    target_maps = sorted({curve["target_map"] for curve in curves}, key=lambda name: (name != "benign", name))
    figure = Figure(figsize=(style.panel_width * len(models) + 1.4, style.panel_height), layout="constrained")
    axes = figure.subplots(1, len(models), squeeze=False)[0]
    for axis, model in zip(axes, models):
        for curve in (c for c in curves if c["model"] == model):
            axis.plot(
                [100 * k for k in curve["k"]],
                curve["iou"],
                color=colours[curve["interpreter"]],
                linestyle=lines[curve["attack"]].linestyle,
                linewidth=lines[curve["attack"]].linewidth,
                marker=MARKERS[target_maps.index(curve["target_map"]) % len(MARKERS)],
                markersize=3.5,
            )
        axis.set_title(model, fontsize=11)
        axis.set_xlabel("top-k pixels kept (%)")
        axis.set_ylabel("IoU with the target map")
        axis.set_ylim(0, 1.02)
        axis.grid(True, alpha=0.3)
    # one legend for all panels, by encoding: colour = interpreter, line = attack, marker = target map
    handles = [Line2D([], [], color=colour, linewidth=2.5, label=name) for name, colour in colours.items()]
    handles += [
        Line2D([], [], color="#333333", linestyle=line.linestyle, label=attack_label(name))
        for name, line in lines.items()
    ]
    if len(target_maps) > 1:
        handles += [
            Line2D([], [], color="#333333", linestyle="", marker=MARKERS[i % len(MARKERS)], label=f"target map {name}")
            for i, name in enumerate(target_maps)
        ]
    figure.legend(handles=handles, fontsize=8, loc="outside right upper", frameon=False)
    return _png(figure, style.dpi)


def transfer_figure(panels: dict[str, list[dict[str, Any]]], style: FigureStyle = FigureStyle()) -> bytes:
    """Heat maps of mean IoU, one panel per title (model, and attack or target map where a run has
    several): rows = the interpreter the example of the cells' attack (ADV²) was crafted against,
    columns = the interpreter that explains it; each cell annotated with its mean and row count.
    One figure: drawing is the report's main cost."""
    titles = list(panels)
    columns = min(len(titles), style.transfer_columns)
    lines = -(-len(titles) // columns)
    sizes = [len({c["target_interpreter"] for c in cells}) for cells in panels.values()]
    width = columns * (style.cell_size * max(sizes) + 1.4) + 1.0
    height = lines * (style.cell_size * max(sizes) + 1.3)
    figure = Figure(figsize=(max(width, 3.6), max(height, 2.8)), layout="constrained")
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    image = None
    for axis, title in zip(axes, titles):
        image = _heat_map(axis, panels[title], title)
    for axis in axes[len(titles) :]:
        axis.set_visible(False)
    if image is not None:
        figure.colorbar(image, ax=list(axes[: len(titles)]), shrink=0.8, label="mean IoU")
    return _png(figure, style.dpi)


def _heat_map(axis: Any, cells: list[dict[str, Any]], title: str) -> Any:
    sources = sorted({cell["source_interpreter"] for cell in cells}, key=interpreter_sort_key)
    targets = sorted({cell["target_interpreter"] for cell in cells}, key=interpreter_sort_key)
    values = np.full((len(sources), len(targets)), np.nan)
    counts = np.zeros((len(sources), len(targets)), dtype=int)
    for cell in cells:
        i, j = sources.index(cell["source_interpreter"]), targets.index(cell["target_interpreter"])
        values[i, j] = np.nan if cell["iou"] is None else cell["iou"]
        counts[i, j] = cell["n"]
    image = axis.imshow(np.ma.masked_invalid(values), cmap="viridis", vmin=0.0, vmax=1.0)
    axis.set_xticks(range(len(targets)), targets)
    axis.set_yticks(range(len(sources)), sources)
    axis.set_xlabel("explained by")
    attacks = {str(cell["attack"]) for cell in cells if cell.get("attack")}
    crafted = attack_label(attacks.pop()) if len(attacks) == 1 else ("ADV²" if not attacks else "")
    axis.set_ylabel(f"{crafted} crafted against".strip())
    axis.set_title(title, fontsize=10)
    for i in range(len(sources)):
        for j in range(len(targets)):
            if np.isnan(values[i, j]):
                axis.text(j, i, "—", ha="center", va="center", fontsize=9, color="#555555")
                continue
            colour = "black" if values[i, j] > 0.6 else "white"
            axis.text(
                j, i, f"{values[i, j]:.3f}\nn={counts[i, j]}", ha="center", va="center", fontsize=8.5, color=colour
            )
    return image


def roc_figure(curves: list[dict[str, Any]], style: FigureStyle = FigureStyle()) -> bytes:
    """ROC curves of the ensemble detector: one panel per model × detector, one colour per
    attacked interpreter, one line style per attack (as in the IoU figure), the chance diagonal."""
    panels = list(dict.fromkeys((curve["model"], curve["detector"]) for curve in curves))
    lines = attack_lines(list(dict.fromkeys(curve["attack"] for curve in curves)))
    colours = interpreter_colours([curve["interpreter"] for curve in curves])
    figure = Figure(
        figsize=(style.panel_height * 1.1 * len(panels) + 1.6, style.panel_height * 1.1), layout="constrained"
    )
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (model, detector) in zip(axes, panels):
        axis.plot([0, 1], [0, 1], color="#999999", linewidth=0.8, linestyle=":")
        for curve in (c for c in curves if (c["model"], c["detector"]) == (model, detector)):
            line = lines[curve["attack"]]
            axis.plot(
                curve["fpr"],
                curve["tpr"],
                color=colours[curve["interpreter"]],
                linestyle=line.linestyle,
                linewidth=line.linewidth,
            )
        axis.set_title(f"{model}\n{detector}", fontsize=9)
        axis.set_xlabel("false-positive rate (benign images)")
        axis.set_ylabel("detection rate")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1.02)
        axis.set_aspect("equal")
        axis.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colour, linewidth=2.5, label=f"against {name}") for name, colour in colours.items()]
    handles += [
        Line2D([], [], color="#333333", linestyle=line.linestyle, label=attack_label(name))
        for name, line in lines.items()
    ]
    figure.legend(handles=handles, fontsize=8, loc="outside right upper", frameon=False)
    return _png(figure, style.dpi)
