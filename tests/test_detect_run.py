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
    code, out, err = invoke(
        "detect",
        str(run_dir),
        "--ensemble",
        "grad,cam",
        "--fpr",
        "0.25",
        "--json",
        "--device",
        "cpu",
        "--model",
        "shapes-resnet",
    )
    assert code == 0, err
    rows = json.loads(out)  # stdout is the JSON alone; the scoring's progress went to stderr
    assert "detect shapes-resnet:" in err
    # PGD's examples are the same images whichever interpreter measured them: one row, ``any``
    assert sorted((r["attack"], r["interpreter"]) for r in rows) == [("adv2", "cam"), ("adv2", "grad"), ("pgd", "any")]
    successes = dict(
        stored(run_dir, "SELECT attack || interpreter, SUM(success) FROM results GROUP BY attack, interpreter")
    )
    assert successes["pgdcam"] == successes["pgdgrad"]
    for row in rows:
        assert row["model"] == "shapes-resnet" and row["target_map"] == "benign"
        assert row["examples"] == successes[row["attack"] + row["interpreter"].replace("any", "grad")]
        assert row["benign"]["n"] == 4 and row["fpr"] <= 0.25
        assert row["calibration"] == row["evaluation"] == 4  # in-sample
        assert row["tpr"] is None or 0 <= row["tpr"] <= 1
    # the summaries follow from the stored scores
    scores = dict(stored(run_dir, "SELECT path, score FROM detector_scores"))
    benign = [scores[path] for (path,) in stored(run_dir, "SELECT image_path FROM images ORDER BY position")]
    for row in rows:
        attacked = [
            scores[path]
            for (path,) in stored(
                run_dir,
                f"SELECT adversarial_path FROM results WHERE attack = '{row['attack']}' "
                f"AND interpreter = '{row['interpreter'].replace('any', 'grad')}' AND success = 1",
            )
        ]
        if attacked:
            expected = summarize(benign, attacked, 0.25)
            assert row["tpr"] == pytest.approx(expected["tpr"]) and row["auc"] == pytest.approx(expected["auc"])
            assert row["threshold"] == pytest.approx(expected["threshold"])
    summaries = stored(run_dir, "SELECT attack, interpreter, target_fpr, tpr FROM detections")
    assert len(summaries) == 3 and {s[2] for s in summaries} == {0.25}


def test_a_held_out_split_calibrates_on_some_images_and_measures_on_the_others(run_dir: Path) -> None:
    from underfire.runs.detect import split_images

    code, out, err = invoke(
        "detect",
        str(run_dir),
        "--ensemble",
        "grad,cam",
        "--fpr",
        "0.25",
        "--holdout",
        "0.5",
        "--json",
        "--device",
        "cpu",
    )
    assert code == 0, err
    rows = json.loads(out)
    names = [name for (name,) in stored(run_dir, "SELECT image FROM images ORDER BY image")]
    calibration, evaluation = split_images(names, 0.5, 0)
    assert len(calibration) == len(evaluation) == 2 and not set(calibration) & set(evaluation)
    assert split_images(names, 0.5, 0) == (calibration, evaluation) and split_images(names, 0.5, 1) != (
        calibration,
        evaluation,
    )
    score = dict(stored(run_dir, "SELECT path, score FROM detector_scores WHERE detector LIKE 'iou:grad,cam:%'"))
    path = dict(stored(run_dir, "SELECT image, image_path FROM images"))
    held_benign = [score[path[name]] for name in evaluation]
    threshold = max(score[path[name]] for name in calibration)  # 25 % of 2 images: none may be above it
    for row in rows:
        assert (row["calibration"], row["evaluation"]) == (2, 2)
        assert row["threshold"] == pytest.approx(threshold)
        assert row["fpr"] == pytest.approx(sum(s > threshold for s in held_benign) / 2)
        interpreter = row["interpreter"].replace("any", "grad")
        attacked = [
            score[p]
            for image, p in stored(
                run_dir,
                f"SELECT image, adversarial_path FROM results WHERE attack = '{row['attack']}' "
                f"AND interpreter = '{interpreter}' AND success = 1",
            )
            if image in evaluation
        ]
        assert row["examples"] == len(attacked)
        if attacked:
            assert row["tpr"] == pytest.approx(sum(s > threshold for s in attacked) / len(attacked))
            assert row["auc"] == pytest.approx(summarize(held_benign, attacked, 0.25)["auc"])
    # the held-out summaries are their own rows, beside the in-sample ones
    keys = {k for (k,) in stored(run_dir, "SELECT DISTINCT detector FROM detections")}
    assert any(k.endswith(":holdout=0.5:seed=0") for k in keys)
    code, _, err = invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--holdout", "0.1", "--device", "cpu")
    assert code == 2 and "leaves no image to evaluate on" in err and len(err.strip().splitlines()) == 1


def test_a_second_detect_reuses_the_scores_and_adds_its_rate(run_dir: Path) -> None:
    invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--json", "--device", "cpu")
    before = stored(run_dir, "SELECT path, score FROM detector_scores ORDER BY path")
    code, out, err = invoke("detect", str(run_dir), "--ensemble", "grad,cam", "--fpr", "0.5", "--device", "cpu")
    assert code == 0, err
    assert "benign iou scores of 4 images" in out and "vs grad" in out
    assert stored(run_dir, "SELECT path, score FROM detector_scores ORDER BY path") == before
    assert {r[0] for r in stored(run_dir, "SELECT DISTINCT target_fpr FROM detections")} >= {0.05, 0.5}
    # another score is another detector: its own rows
    code, _, err = invoke(
        "detect", str(run_dir), "--ensemble", "grad,cam", "--score", "l1", "--json", "--device", "cpu"
    )
    assert code == 0, err
    assert len(stored(run_dir, "SELECT DISTINCT detector FROM detector_scores")) == 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["--fpr", "1.5"], "--fpr must be in (0, 1)"),
        (["--ensemble", "grad"], "two or more"),
        (["--ensemble", "grad,lime"], "lime"),
        (["--score", "cosine"], "unknown detector score"),
        (["--holdout", "1"], "held-out share"),
        (["--model", "shapes-densenet"], "the run has no model 'shapes-densenet'"),
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
    section = page[page.index("<h2>Ensemble detector</h2>") : page.index("<h2>Examples</h2>")]
    assert 'id="detection"' in section and 'alt="ROC curves of the ensemble detector"' in section
    rows = stored(run_dir, "SELECT COUNT(*) FROM detections")[0][0]
    assert section.count("<tr>") == rows + 1  # the head and one row per summary
