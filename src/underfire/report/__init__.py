"""Reports of a run (``underfire report RUN_DIR``): a self-contained HTML page, or the summary as
JSON or CSV — all from the run's ``results.sqlite``, all with the same rounded numbers.

A run may be partial (killed): the report shows whatever rows exist and how many each cell has.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from ..errors import InputError
from .data import RunData, load_run, summary_fields, summary_rows
from .html import PageOptions, render_html

FORMATS = ("html", "json", "csv")

__all__ = ["FORMATS", "PageOptions", "RunData", "load_run", "render_json", "render_csv", "summary_rows", "write_report"]


def render_json(run: RunData) -> str:
    """The report's numbers as JSON: run metadata, the attacks, the summary table, IoU-vs-k curves, transfer cells."""
    document: dict[str, Any] = {
        "run": run.name,
        "run_dir": str(run.run_dir),
        "created": run.created,
        "config": run.config,
        "versions": run.versions,
        "attacks": run.attacks,
        "counts": run.counts,
        "summary": run.summary,
        "iou_by_k": run.curves,
        "transfer": run.transfer,
    }
    return json.dumps(document, indent=2, default=str) + "\n"


def render_csv(run: RunData) -> str:
    """The summary table as CSV, one row per model × interpreter × target map (empty = no rows)."""
    names = [name for name, _ in summary_fields(run.attacks)]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for row in run.summary:
        writer.writerow({name: "" if row.get(name) is None else row[name] for name in names})
    return buffer.getvalue()


def write_report(run_dir: Path, fmt: str = "html", out: Path | None = None, options: PageOptions | None = None) -> Path:
    """Write the report of ``run_dir`` in ``fmt`` (html, json or csv) to ``out`` (default
    ``RUN_DIR/report.FMT``) and return its path; ``InputError`` with one line if the run is unusable."""
    if fmt not in FORMATS:
        raise InputError(f"report format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run = load_run(Path(run_dir))
    if fmt == "html":
        text = render_html(run, options or PageOptions())
    elif fmt == "json":
        text = render_json(run)
    else:
        text = render_csv(run)
    path = Path(out) if out is not None else Path(run_dir) / f"report.{fmt}"
    if path.is_dir():
        path = path / f"report.{fmt}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot write the report to {str(path)!r}: {error.strerror or error}") from None
    return path
