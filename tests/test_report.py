"""``underfire report``: the page, JSON and CSV show exactly the database's numbers, on complete
and partial runs; bad inputs are one-line errors; the page renders in a real browser.

Runs are real: a tiny experiment made by ``underfire run``, and for shapes a real run of seconds
cannot take (several models and target maps, partial, odd names), a SQLite database with real PNG
and .npy files written by ``report_fixtures.build_run`` in the same schema.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import shutil
import sqlite3
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from report_fixtures import SCHEMA, FakeRun, build_run
from typer.testing import CliRunner

from underfire import InputError, summary_rows, write_report
from underfire.cli import app
from underfire.data import SHAPE_CLASSES

runner = CliRunner()


# --------------------------------------------------------------------------------------------
# runs


TINY_EXPERIMENT = """
[experiment]
name = "tiny"
seed = 0
images = 3
data = "shapes:test"
batch_size = 4
models = ["shapes-resnet"]
interpreters = ["cam", "grad"]
attacks = ["pgd", "adv2"]
target_maps = ["benign"]
transfer = true
[overrides]
pgd_steps = 2
adv_steps = 2
"""


@pytest.fixture(scope="session")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run (``underfire run``): one model, CAM and GRAD, three images, two steps per stage."""
    folder = tmp_path_factory.mktemp("report")
    config = folder / "tiny.toml"
    config.write_text(TINY_EXPERIMENT)
    result = runner.invoke(app, ["run", str(config), "--out", str(folder / "tiny")])
    assert result.exit_code == 0, result.output
    return folder / "tiny"


@pytest.fixture(scope="session")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Hand-built: two models, four interpreters, two target maps, killed before the last ADV² rows."""
    spec = FakeRun(
        models=("shapes-resnet", "shapes-densenet"),
        interpreters=("grad", "cam", "rts", "mask"),
        target_maps=("benign", "other"),
        images=3,
        partial=True,
        seed=1,
    )
    return build_run(tmp_path_factory.mktemp("report") / "big", spec)


@pytest.fixture(scope="session")
def reports(small_run: Path) -> dict[str, Path]:
    return {fmt: write_report(small_run, fmt) for fmt in ("html", "json", "csv")}


# --------------------------------------------------------------------------------------------
# reading the outputs back


class PageParser(HTMLParser):
    """The summary table's cells (by row key and ``data-key``), every <img> source, every tag."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.rows: dict[tuple[str, str, str], dict[str, str]] = {}
        self.images: list[str] = []
        self.tags: set[str] = set()
        self.links: list[str] = []
        self.grid_captions: list[str] = []
        self._row: dict[str, str] | None = None
        self._key: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "tr" and "data-model" in a:
            self._row = self.rows.setdefault((a["data-model"], a["data-interpreter"], a["data-target-map"]), {})
        elif tag in ("td", "div") and "data-key" in a:
            self._key, self._text = a["data-key"], []
        if tag == "img":
            self.images.append(a.get("src", ""))
        elif "src" in a or "href" in a:
            self.links.append(a.get("src") or a.get("href", ""))

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "div") and self._key is not None:
            text = "".join(self._text).strip()
            if tag == "td" and self._row is not None:
                self._row[self._key] = text
            elif tag == "div":
                self.grid_captions.append(text)
            self._key = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        if self._key is not None:
            self._text.append(data)


def parse_page(path: Path) -> PageParser:
    parser = PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


def number(text: str) -> float | None:
    """A table cell back to the number it shows ('—' = none, '75.0%' = 75.0, '+0.447' = 0.447)."""
    return None if text in ("—", "") else float(text.rstrip("%"))


MEASURES = {
    "success": ("success_pct", 100.0, 1),
    "confidence": ("confidence", 1.0, 3),
    "l1": ("l1", 1.0, 3),
    "iou": ("iou", 1.0, 3),
    "seconds": ("seconds", 1.0, 2),
}


def expected_from_sql(run_dir: Path) -> dict[tuple[str, str, str], dict[str, float | int | None]]:
    """The summary recomputed with plain SQL AVG per group, rounded as documented."""
    connection = sqlite3.connect(run_dir / "results.sqlite")
    expected: dict[tuple[str, str, str], dict[str, Any]] = {}
    columns = ", ".join(f"AVG({column})" for column in MEASURES)
    query = f"SELECT model, interpreter, target_map, attack, COUNT(*), {columns} FROM results GROUP BY 1, 2, 3, 4"
    for model, interpreter, target_map, attack, count, *means in connection.execute(query):
        cell = expected.setdefault((model, interpreter, target_map), {"pgd_n": 0, "adv2_n": 0})
        cell[f"{attack}_n"] = count
        for (suffix, scale, digits), mean in zip(MEASURES.values(), means):
            cell[f"{attack}_{suffix}"] = round(scale * mean, digits)
        cell[f"_{attack}_iou"] = means[3]
    for model, interpreter, target_map, images in connection.execute(
        "SELECT model, interpreter, target_map, COUNT(DISTINCT image) FROM results GROUP BY 1, 2, 3"
    ):
        expected[(model, interpreter, target_map)]["images"] = images
    connection.close()
    for cell in expected.values():
        pgd, adv2 = cell.pop("_pgd_iou", None), cell.pop("_adv2_iou", None)
        cell["iou_gain"] = round(adv2 - pgd, 3) if pgd is not None and adv2 is not None else None
        for attack in ("pgd", "adv2"):
            for suffix, _, _ in MEASURES.values():
                cell.setdefault(f"{attack}_{suffix}", None)
    return expected


# --------------------------------------------------------------------------------------------
# the numbers


@pytest.mark.parametrize("which", ["small_run", "big_run"])
def test_html_json_and_csv_show_the_database_means(which: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    run_dir: Path = request.getfixturevalue(which)
    expected = expected_from_sql(run_dir)
    html = parse_page(write_report(run_dir, "html", tmp_path / "r.html"))
    document = json.loads(write_report(run_dir, "json", tmp_path / "r.json").read_text())
    with open(write_report(run_dir, "csv", tmp_path / "r.csv"), newline="") as handle:
        table = list(csv.DictReader(handle))
    rows = summary_rows(run_dir)
    assert set(html.rows) == set(expected)
    assert len(rows) == len(document["summary"]) == len(table) == len(expected)
    for row, from_json, from_csv in zip(rows, document["summary"], table):
        key = (row["model"], row["interpreter"], row["target_map"])
        assert from_json == row
        assert (from_csv["model"], from_csv["interpreter"], from_csv["target_map"]) == key
        cells = html.rows[key]
        for name, value in expected[key].items():
            assert row[name] == value, (key, name)
            assert number(cells[name]) == value, (key, name, cells[name])
            assert (float(from_csv[name]) if from_csv[name] else None) == value, (key, name)


def test_curves_and_transfer_match_the_rows(big_run: Path) -> None:
    document = json.loads(write_report(big_run, "json", big_run / "check.json").read_text())
    connection = sqlite3.connect(big_run / "results.sqlite")
    for curve in document["iou_by_k"]:
        key = (curve["model"], curve["interpreter"], curve["attack"], curve["target_map"])
        maps = [
            json.loads(text)
            for (text,) in connection.execute(
                "SELECT iou_by_k FROM results WHERE model = ? AND interpreter = ? AND attack = ? AND target_map = ?",
                key,
            )
        ]
        assert curve["n"] == len(maps)
        assert curve["iou"] == [round(float(np.mean([m[f"{k:.2f}"] for m in maps])), 3) for k in curve["k"]]
    assert document["transfer"]
    for cell in document["transfer"]:
        key = (cell["model"], cell["source_interpreter"], cell["target_interpreter"], cell["target_map"])
        count, iou = connection.execute(
            "SELECT COUNT(*), AVG(iou) FROM transfer WHERE model = ? AND source_interpreter = ? "
            "AND target_interpreter = ? AND target_map = ?",
            key,
        ).fetchone()
        assert (cell["n"], cell["iou"]) == (count, round(iou, 3))
    counts = document["counts"]
    total = connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    assert counts["results"]["pgd"] + counts["results"]["adv2"] == total
    connection.close()


# --------------------------------------------------------------------------------------------
# the page


def test_page_is_self_contained_with_grids_and_class_names(reports: dict[str, Path], small_run: Path) -> None:
    text = reports["html"].read_text(encoding="utf-8")
    page = parse_page(reports["html"])
    assert "script" not in page.tags and "link" not in page.tags and "<script" not in text.lower()
    assert not page.links and "http://" not in text and "https://" not in text
    assert page.images and all(src.startswith("data:image/png;base64,") for src in page.images)
    for src in page.images:
        with Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))) as picture:
            assert picture.size[0] > 16
    # 2 interpreters × 3 images × 6 pictures, the IoU-vs-k figure, one transfer matrix, the colour scale
    assert len(page.images) == 2 * 3 * 6 + 3
    connection = sqlite3.connect(small_run / "results.sqlite")
    target = connection.execute("SELECT target_class FROM images ORDER BY position LIMIT 1").fetchone()[0]
    ious = [f"IoU {iou:.3f}" for (iou,) in connection.execute("SELECT iou FROM results WHERE attack = 'adv2'")]
    connection.close()
    assert f"target: <b>{SHAPE_CLASSES[target]}</b>" in text
    assert set(page.grid_captions) & set(ious)
    assert "underfire report — tiny" in text and "ADV² keeps the map closer" in text


def test_partial_run_and_missing_files_still_report(big_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "partial"
    shutil.copytree(big_run, run_dir)
    connection = sqlite3.connect(run_dir / "results.sqlite")
    overlay, adversarial = connection.execute(
        "SELECT overlay_path, adversarial_path FROM results WHERE model = 'shapes-resnet' AND interpreter = 'grad' "
        "AND attack = 'adv2' AND target_map = 'benign' ORDER BY image LIMIT 1"
    ).fetchone()
    connection.close()
    (run_dir / overlay).unlink()  # redrawn from the .npy map
    (run_dir / adversarial).unlink()  # shown as a placeholder
    text = write_report(run_dir).read_text(encoding="utf-8")
    page = parse_page(run_dir / "report.html")
    partial = page.rows[("shapes-resnet", "mask", "benign")]
    assert (partial["pgd_n"], partial["adv2_n"], partial["images"]) == ("3", "2", "3")
    assert "partial" in text and "not run" in text and text.count("missing file") == 1
    assert (
        len(page.images) == 2 * 4 * 3 * 6 - 2 * 2 - 1 + 3
    )  # grids (2 ADV² rows not run, 1 file gone) + 2 figures + colour scale


def test_real_run_without_its_adv2_units_reports_what_exists(small_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "killed"
    shutil.copytree(small_run, run_dir)
    connection = sqlite3.connect(run_dir / "results.sqlite")
    with connection:
        connection.execute("DELETE FROM results WHERE attack = 'adv2' AND interpreter = 'grad'")
        connection.execute("DELETE FROM transfer WHERE source_interpreter = 'grad'")
    connection.close()
    page = parse_page(write_report(run_dir))
    cell = page.rows[("shapes-resnet", "grad", "benign")]
    assert (cell["pgd_n"], cell["adv2_n"], cell["adv2_iou"], cell["iou_gain"]) == ("3", "0", "—", "—")
    assert number(page.rows[("shapes-resnet", "cam", "benign")]["adv2_iou"]) is not None
    assert "ADV² not run" in (run_dir / "report.html").read_text(encoding="utf-8")
    rows = {row["interpreter"]: row for row in summary_rows(run_dir)}
    assert rows["grad"]["adv2_n"] == 0 and rows["grad"]["adv2_iou"] is None


def test_strings_from_the_database_are_escaped(tmp_path: Path) -> None:
    run_dir = build_run(tmp_path / "odd", FakeRun(models=('my<i>model</i>&"x',), interpreters=("cam",), images=1))
    text = write_report(run_dir).read_text(encoding="utf-8")
    assert "<i>model" not in text and "my&lt;i&gt;model&lt;/i&gt;&amp;&quot;x" in text
    assert "true: 0" in text and "target: <b>3</b>" in text  # no class list known: ids


# --------------------------------------------------------------------------------------------
# bad inputs and the command line


def test_bad_run_directories_are_one_line_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    no_rows = tmp_path / "no-rows"
    no_rows.mkdir()
    sqlite3.connect(no_rows / "results.sqlite").executescript(SCHEMA)
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "results.sqlite").touch()
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    (garbage / "results.sqlite").write_text("not a database")
    cases = {
        tmp_path / "missing": "does not exist",
        empty: "not a run directory",
        no_rows: "no results yet",
        zero: "empty or not an underfire run database",
        garbage: "not a readable SQLite database",
    }
    for run_dir, message in cases.items():
        with pytest.raises(InputError, match=message) as error:
            write_report(run_dir)
        assert "\n" not in str(error.value)
        with pytest.raises(InputError):
            summary_rows(run_dir)
    assert not (empty / "report.html").exists()


def test_cli_report_writes_each_format(small_run: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["report", str(small_run)])
    assert result.exit_code == 0 and (small_run / "report.html").is_file()
    out = tmp_path / "sub" / "summary.csv"
    result = runner.invoke(app, ["report", str(small_run), "--format", "csv", "--out", str(out)])
    assert result.exit_code == 0 and str(out) in result.stdout
    assert out.read_text().splitlines()[0].startswith("model,interpreter,target_map,images,pgd_n,adv2_n")
    for args, message in (
        ([str(tmp_path / "nope")], "does not exist"),
        ([str(small_run), "--format", "pdf"], "format"),
    ):
        result = runner.invoke(app, ["report", *args])
        assert result.exit_code == 2
        assert result.stderr.startswith("error:") and message in result.stderr and result.stderr.count("\n") == 1


# --------------------------------------------------------------------------------------------
# a real browser


def test_page_renders_in_headless_chromium(reports: dict[str, Path], tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium): the browser check needs it")
    screenshot = tmp_path / "report.png"
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={profile}", "--window-size=1400,3000", f"--screenshot={screenshot}",
                reports["html"].resolve().as_uri(),
            ],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
    assert screenshot.is_file()
    with Image.open(screenshot) as picture:
        assert picture.size == (1400, 3000)
        pixels = np.asarray(picture.convert("RGB")).astype(int)
    assert pixels.std() > 20  # not a blank page
    dark = pixels.max(axis=2) < 100  # text
    saturated = pixels.max(axis=2) - pixels.min(axis=2) > 120  # jet overlays, figure lines
    table, grid = slice(380, 720), slice(1150, 2900)
    assert dark[table].mean() > 0.005  # the summary table's numbers
    assert saturated[grid].mean() > 0.02  # the image grids' overlays
