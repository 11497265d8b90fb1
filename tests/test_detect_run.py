"""``underfire detect`` on a real (tiny) run: one row per model × attack × attacked interpreter,
scores stored once in the run's SQLite and reused, summaries that follow from the stored scores,
and one-line refusals."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from underfire.cli import app
from underfire.detection import summarize

CONFIG = """
[experiment]
name = "detect"
seed = 0
preset = "quick"
images = 4
data = "shapes:test"
batch_size = 4
target = "random"
target_maps = ["benign"]
models = ["shapes-resnet"]
interpreters = ["cam", "grad"]
attacks = ["pgd", "adv2"]
transfer = false
[overrides]
pgd_steps = 20
adv_steps = 4
"""


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("detect")
    (folder / "e.toml").write_text(CONFIG)
    code, _, err = invoke("run", str(folder / "e.toml"), "--out", str(folder / "run"), "--device", "cpu")
    assert code == 0, err
    return folder / "run"


def stored(run_dir: Path, query: str) -> list[tuple]:
    with sqlite3.connect(run_dir / "results.sqlite") as connection:
        return connection.execute(query).fetchall()


def test_detect_reports_every_attack_and_interpreter_and_stores_the_scores(run_dir: Path) -> None:
    code, out, err = invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--fpr", "0.25", "--json", "--device", "cpu")
    assert code == 0, err
    rows = json.loads(out)
    assert sorted((r["attack"], r["interpreter"]) for r in rows) == [("adv2", "cam"), ("adv2", "grad"), ("pgd", "cam"), ("pgd", "grad")]
    successes = dict(stored(run_dir, "SELECT attack || interpreter, SUM(success) FROM results GROUP BY attack, interpreter"))
    for row in rows:
        assert row["model"] == "shapes-resnet" and row["target_map"] == "benign"
        assert row["examples"] == successes[row["attack"] + row["interpreter"]]
        assert row["benign"]["n"] == 4 and row["fpr"] <= 0.25
        assert row["tpr"] is None or 0 <= row["tpr"] <= 1
    # the summaries follow from the stored scores
    scores = dict(stored(run_dir, "SELECT path, score FROM detector_scores"))
    benign = [scores[path] for (path,) in stored(run_dir, "SELECT image_path FROM images ORDER BY position")]
    for row in rows:
        attacked = [scores[path] for (path,) in stored(
            run_dir, f"SELECT adversarial_path FROM results WHERE attack = '{row['attack']}' "
                     f"AND interpreter = '{row['interpreter']}' AND success = 1")]
        if attacked:
            expected = summarize(benign, attacked, 0.25)
            assert row["tpr"] == pytest.approx(expected["tpr"]) and row["auc"] == pytest.approx(expected["auc"])
            assert row["threshold"] == pytest.approx(expected["threshold"])
    summaries = stored(run_dir, "SELECT attack, interpreter, target_fpr, tpr FROM detections")
    assert len(summaries) == 4 and {s[2] for s in summaries} == {0.25}


def test_a_second_detect_reuses_the_scores_and_adds_its_rate(run_dir: Path) -> None:
    invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--json", "--device", "cpu")
    before = stored(run_dir, "SELECT path, score FROM detector_scores ORDER BY path")
    code, out, err = invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--fpr", "0.5", "--device", "cpu")
    assert code == 0, err
    assert "benign iou scores of 4 images" in out and "vs grad" in out
    assert stored(run_dir, "SELECT path, score FROM detector_scores ORDER BY path") == before
    assert {r[0] for r in stored(run_dir, "SELECT DISTINCT target_fpr FROM detections")} >= {0.05, 0.5}
    # another score is another detector: its own rows
    code, _, err = invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--score", "l1", "--json", "--device", "cpu")
    assert code == 0, err
    assert len(stored(run_dir, "SELECT DISTINCT detector FROM detector_scores")) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fpr", "1.5"], "--fpr must be in (0, 1)"),
        (["--ensemble", "grad"], "two or more"),
        (["--ensemble", "grad,lime"], "lime"),
        (["--score", "cosine"], "unknown detector score"),
    ],
)
def test_bad_detector_options_are_one_line(run_dir: Path, args: list[str], message: str) -> None:
    code, _, err = invoke("detect", str(run_dir), *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_folder_without_a_run_is_one_line(tmp_path: Path) -> None:
    code, _, err = invoke("detect", str(tmp_path))
    assert code == 2 and len(err.strip().splitlines()) == 1


def test_the_report_shows_the_detector_rates_and_roc_curves(run_dir: Path) -> None:
    invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--device", "cpu")
    code, _, err = invoke("report", str(run_dir), "--out", str(run_dir / "page.html"))
    assert code == 0, err
    page = (run_dir / "page.html").read_text()
    section = page[page.index("<h2>Ensemble detector</h2>"):page.index("<h2>Examples</h2>")]
    assert 'id="detection"' in section and 'alt="ROC curves of the ensemble detector"' in section
    rows = stored(run_dir, "SELECT COUNT(*) FROM detections")[0][0]
    assert section.count("<tr>") == rows + 1  # the head and one row per summary
