"""``underfire run``: config validation, the results it stores, resuming after SIGKILL, the CLI.

Real components throughout: the shipped shapes-resnet, real SQLite, real PNG and .npy files; tiny
step budgets keep it fast.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from underfire import ExperimentConfig, load_experiment_config, run_experiment
from underfire.cli import app
from underfire.errors import InputError
from underfire.runs import attack_experiment, run_attack
from underfire.store import ResultStore
from underfire.store.files import TEMP_MARK

BASE = """
[experiment]
name = "tiny"
seed = 0
preset = "quick"
eps = "8/255"
images = {images}
data = "shapes:test"
batch_size = {batch_size}
target = "random"
target_maps = ["benign"]
models = ["shapes-resnet"]
interpreters = ["cam", "grad"]
attacks = ["pgd", "adv2"]
transfer = true
[overrides]
pgd_steps = {steps}
adv_steps = {steps}
"""


def write_config(
    folder: Path, text: str | None = None, *, images: int = 4, batch_size: int = 2, steps: int = 2
) -> Path:
    path = folder / "experiment.toml"
    path.write_text(text if text is not None else BASE.format(images=images, batch_size=batch_size, steps=steps))
    return path


def expected_keys(config: ExperimentConfig, names: list[str]) -> tuple[set[tuple[str, ...]], set[tuple[str, ...]]]:
    results = {
        (m, i, a, t, n)
        for m in config.models
        for i in config.interpreters
        for a in config.attacks
        for t in config.target_maps
        for n in names
    }
    transfer = {
        (m, s, d, t, n, "adv2")
        for m in config.models
        for s in config.interpreters
        for d in config.interpreters
        for t in config.target_maps
        for n in names
    }
    return results, transfer


def assert_run_is_whole(run_dir: Path, config: ExperimentConfig) -> None:
    """Every expected row exactly once, every referenced file present and readable, no temp files."""
    with ResultStore(run_dir) as store:
        names = [record.image for record in store.images("shapes-resnet")]
        assert len(names) == config.images
        results, transfer = expected_keys(config, names)
        assert store.count("results") == len(results) and store.result_keys() == results
        assert store.count("transfer") == len(transfer) and store.transfer_keys() == transfer
        rows = store.rows("results")
        images = store.rows("images")
    referenced = {row["image_path"] for row in images}
    for row in rows:
        referenced |= {
            row[k] for k in ("adversarial_path", "map_path", "overlay_path", "benign_map_path", "benign_overlay_path")
        }
    for relative in referenced:
        assert (run_dir / relative).is_file(), relative
    assert not list(run_dir.rglob(f"*{TEMP_MARK}*"))
    for path in (run_dir / "files").rglob("*"):
        if path.suffix == ".png":
            with Image.open(path) as picture:
                picture.load()
        elif path.suffix == ".npy":
            assert np.isfinite(np.load(path, allow_pickle=False)).all()


# ------------------------------------------------------------------------------ validation
BAD_CONFIGS = [
    ('[experiment]\nimages = 4\ncolour = "red"\n', "experiment.colour"),
    ("[experiment]\nimages = 4\n[extra]\nx = 1\n", "'extra'"),
    ('[experiment]\neps = "2"\n', "experiment.eps"),
    ('[experiment]\neps = "abc"\n', "experiment.eps"),
    ("[experiment]\nimages = 0\n", "experiment.images"),
    ("[experiment]\nbatch_size = -1\n", "experiment.batch_size"),
    ('[experiment]\npreset = "slow"\n', "experiment.preset"),
    ('[experiment]\ninterpreters = ["cam", "lime"]\n', "experiment.interpreters"),
    ('[experiment]\ninterpreters = ["cam", "cam"]\n', "experiment.interpreters"),
    ('[experiment]\nattacks = ["fgsm"]\n', "experiment.attacks"),
    ('[experiment]\nmodels = "shapes-resnet"\n', "experiment.models"),
    ('[experiment]\ntarget_maps = ["nowhere.npy"]\n', "experiment.target_maps"),
    ('[experiment]\ntarget_maps = ["blob"]\n', "experiment.target_maps"),
    ('[experiment]\ntransfer = "yes"\n', "experiment.transfer"),
    ("[experiment]\n[overrides]\nadv_steps = -1\n", "adv_steps"),
    ("[experiment]\n[overrides]\nsteps = 3\n", "overrides.steps"),
    ('[experiment]\ninterpreters = ["cam"]\n[overrides.cam]\nalpha = "x"\n', "overrides.cam.alpha"),
    ('[experiment]\ninterpreters = ["cam"]\n[overrides.mask]\nadv_steps = 3\n', "overrides.mask"),
    ("[experiment\n", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key"), BAD_CONFIGS)
def test_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(InputError) as error:
        load_experiment_config(write_config(tmp_path, text))
    assert key in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ('models = ["no-such-model"]', "experiment.models"),
        ('target = "zebra"', "experiment.target"),
        ('data = "/no/such/folder"', "experiment.data"),
    ],
)
def test_errors_found_by_loading_come_before_any_work(tmp_path: Path, setting: str, key: str) -> None:
    name = setting.split(" = ")[0]
    text = "\n".join(
        setting if line.startswith(f"{name} =") else line
        for line in BASE.format(images=4, batch_size=2, steps=2).splitlines()
    )
    config = load_experiment_config(write_config(tmp_path, text))
    with pytest.raises(InputError) as error:
        run_experiment(config, tmp_path / "run")
    assert key in str(error.value) and "\n" not in str(error.value)
    assert not (tmp_path / "run").exists()


def test_cli_bad_config_prints_one_error_line_and_exits_2(tmp_path: Path) -> None:
    config = write_config(tmp_path, '[experiment]\neps = "2"\n')
    result = CliRunner().invoke(app, ["run", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert result.stderr.startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------- a run
@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ExperimentConfig]:
    folder = tmp_path_factory.mktemp("run")
    config = load_experiment_config(write_config(folder))
    outcome = run_experiment(config, folder / "run")
    assert outcome.completed == outcome.units == 6 and outcome.skipped == 0  # 2 batches × (pgd + cam + grad)
    return folder / "run", config


def test_a_run_stores_every_row_and_file(finished: tuple[Path, ExperimentConfig]) -> None:
    run_dir, config = finished
    assert_run_is_whole(run_dir, config)
    with ResultStore(run_dir) as store:
        meta = store.meta()
        assert json.loads(meta["config"]) == config.as_dict()
        versions = json.loads(meta["versions"])
        # and the source commit, when the package runs from a git checkout (as the suite does)
        assert set(versions) - {"commit"} == {"underfire", "torch", "numpy", "python", "platform"}
        from underfire.versions import source_commit

        assert versions.get("commit") == source_commit()
        rows = store.rows("results")
    for row in rows:
        assert 0 <= row["iou"] <= 1 and 0 <= row["confidence"] <= 1 and row["success"] in (0, 1)
        assert row["linf"] <= 8 / 255 + 1e-6 and row["target_class"] != row["true_class"]
        assert list(row["iou_by_k"]) == [f"{0.05 * k:.2f}" for k in range(1, 11)]
        assert json.loads(row["config"])["eps"] == pytest.approx(8 / 255) and row["seconds"] > 0
    # PGD runs once per batch for every interpreter, with the whole step budget in stage 1
    pgd = [row for row in rows if row["attack"] == "pgd"]
    assert {json.loads(row["config"])["pgd_steps"] for row in pgd} == {4}
    by_image: dict[str, set[str]] = {}
    for row in pgd:
        by_image.setdefault(row["image"], set()).add(row["adversarial_path"])
    assert all(len(paths) == 1 for paths in by_image.values())


def test_transfer_diagonal_is_the_interpreters_own_row(finished: tuple[Path, ExperimentConfig]) -> None:
    run_dir, _ = finished
    with ResultStore(run_dir) as store:
        own = {(r["interpreter"], r["image"]): r for r in store.rows("results") if r["attack"] == "adv2"}
        moved = store.rows("transfer")
    diagonal = [r for r in moved if r["source_interpreter"] == r["target_interpreter"]]
    assert len(diagonal) == len(own)
    for row in diagonal:
        mine = own[(row["source_interpreter"], row["image"])]
        assert (row["l1"], row["l2"], row["iou"]) == (mine["l1"], mine["l2"], mine["iou"])
    assert all(0 <= r["iou"] <= 1 and r["l1"] >= 0 for r in moved)


def test_numbers_equal_the_attack_command(finished: tuple[Path, ExperimentConfig], tmp_path: Path) -> None:
    """``underfire attack`` is a one-attack experiment through the same driver: the same images,
    the same budgets (PGD's too: the attack command no longer has a rule of its own) and the same
    numbers as the run that holds all interpreters."""
    run_dir, config = finished
    with ResultStore(run_dir) as store:
        stored = {(r["interpreter"], r["attack"], r["image"]): r for r in store.rows("results")}
    for attack in ("adv2", "pgd"):
        job = attack_experiment(
            model="shapes-resnet",
            interpreter="cam",
            attack=attack,
            data="shapes:test",
            limit=config.images,
            batch_size=config.batch_size,
            seed=config.seed,
            overrides=dict(config.overrides),
        )
        if attack == "adv2":
            assert job.config_for("adv2", "cam") == config.config_for("adv2", "cam")
        report = run_attack(job, tmp_path / attack, progress=False)
        for row in report["images"]:
            mine = stored[("cam", attack, row["image"])]
            assert mine["target_class"] == row["target_class"] and mine["predicted_class"] == row["predicted_class"]
            for key in ("confidence", "l1", "l2", "iou", "spearman"):
                assert mine[key] == pytest.approx(row[key], abs=1e-5), key
            saved = np.asarray(Image.open(run_dir / mine["adversarial_path"]))
            assert np.array_equal(saved, np.asarray(Image.open(row["adversarial"])))


def test_rerunning_a_finished_run_does_nothing(finished: tuple[Path, ExperimentConfig]) -> None:
    run_dir, config = finished
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "files").rglob("*") if p.is_file()}
    outcome = run_experiment(config, run_dir)
    assert outcome.was_complete and outcome.completed == 0 and outcome.results == 16 and outcome.transfer == 16
    assert {p: p.stat().st_mtime_ns for p in (run_dir / "files").rglob("*") if p.is_file()} == before
    result = CliRunner().invoke(app, ["run", str(run_dir.parent / "experiment.toml"), "--out", str(run_dir)])
    assert result.exit_code == 0 and "nothing to do" in result.stdout


def test_a_different_config_in_the_same_folder_is_refused(
    finished: tuple[Path, ExperimentConfig], tmp_path: Path
) -> None:
    run_dir, _ = finished
    other = load_experiment_config(write_config(tmp_path, steps=3))
    with pytest.raises(InputError, match=r"overrides\.adv_steps: 2 → 3"):
        run_experiment(other, run_dir)
    result = CliRunner().invoke(app, ["run", str(tmp_path / "experiment.toml"), "--out", str(run_dir)])
    assert result.exit_code == 2 and "different config" in result.stderr


def test_a_run_recorded_before_newer_attack_settings_resumes(
    finished: tuple[Path, ExperimentConfig], tmp_path: Path
) -> None:
    """A run folder written before ``restarts`` and ``soft_iou_weight`` existed (its stored attack
    settings lack them) resumes under a version that has them at their defaults."""
    run_dir, config = finished
    old = tmp_path / "old"
    shutil.copytree(run_dir, old)

    def drop(tree: object) -> object:
        if not isinstance(tree, dict):
            return tree
        return {k: drop(v) for k, v in tree.items() if k not in ("restarts", "soft_iou_weight")}

    with sqlite3.connect(old / "results.sqlite") as connection:
        (stored,) = connection.execute("SELECT value FROM meta WHERE key = 'attack_configs'").fetchone()
        older = drop(json.loads(stored))
        assert older != json.loads(stored) and '"restarts"' not in json.dumps(older)
        connection.execute(
            "UPDATE meta SET value = ? WHERE key = 'attack_configs'", (json.dumps(older, sort_keys=True),)
        )
    connection.close()
    outcome = run_experiment(config, old)
    assert outcome.was_complete and outcome.completed == 0 and outcome.results == 16


# --------------------------------------------------------------------------------- SIGKILL
def count_rows(database: Path) -> int:
    try:
        with sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5) as connection:
            return int(connection.execute("SELECT COUNT(*) FROM results").fetchone()[0])
    except sqlite3.OperationalError:  # not created yet
        return 0


def test_sigkill_then_rerun_finishes_with_every_row_once(tmp_path: Path) -> None:
    # 8 batches of one image: 24 units, slow enough to be killed mid-way
    config_path = write_config(tmp_path, images=8, batch_size=1, steps=6)
    config = load_experiment_config(config_path)
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "underfire.cli", "run", str(config_path), "--out", str(run_dir)]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    expected = len(config.interpreters) * len(config.attacks) * config.images
    deadline = time.monotonic() + 120
    try:
        while True:
            rows = count_rows(run_dir / "results.sqlite")
            if 0 < rows < expected:
                break
            assert process.poll() is None, f"the run ended before it could be killed: {process.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the run stored no row in time"
            time.sleep(0.02)
        time.sleep(0.05)  # land somewhere inside the next unit
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL
    assert count_rows(run_dir / "results.sqlite") < expected
    result = CliRunner().invoke(app, ["run", str(config_path), "--out", str(run_dir)])
    assert result.exit_code == 0, result.stderr
    assert "already done" in result.stdout
    assert_run_is_whole(run_dir, config)
    again = CliRunner().invoke(app, ["run", str(config_path), "--out", str(run_dir)])
    assert again.exit_code == 0 and "nothing to do" in again.stdout


def test_public_entry_points_are_exported() -> None:
    import underfire

    assert underfire.run_experiment is run_experiment and underfire.ExperimentConfig is ExperimentConfig
    assert {"load_experiment_config", "ResultStore", "demo_config"} <= set(underfire.__all__)
