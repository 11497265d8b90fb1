"""Beyond one process: Ray tasks on a real local 2-worker Ray, sharded runs and their merge.

Each Ray test starts its own local cluster (``ray.init`` inside the run) on CI's 2 cores; the kill
tests run the CLI as a subprocess and SIGKILL the driver, or one Ray worker process (found by the
process title Ray gives a running task, ``ray::_compute_unit``), mid-run.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from underfire import run_experiment
from underfire.cli import app
from underfire.errors import InputError
from underfire.runs import load_experiment_config
from underfire.runs.merge import merge_runs
from underfire.runs.ray_executor import RayExecutor
from underfire.store import DATABASE_NAME

runner = CliRunner()

CONFIG = """
[experiment]
name = "spread"
images = {images}
batch_size = 2
models = ["shapes-resnet"]
interpreters = {interpreters}
attacks = {attacks}
transfer = {transfer}
[overrides]
pgd_steps = 2
adv_steps = {adv_steps}
{extra}
"""

#: What must agree between two runs of one config: every stored measure, class and path.
COLUMNS = (
    "model, interpreter, attack, target_map, image, true_class, target_class, predicted_class, success, confidence, "
    "l1, l2, iou, iou_by_k, top_k_intersection, spearman, linf, adversarial_path, map_path, seed, config"
)


def write_config(
    folder: Path,
    *,
    images: int = 4,
    interpreters: str = '["cam", "grad"]',
    attacks: str = '["pgd", "adv2"]',
    transfer: str = "true",
    adv_steps: int = 2,
    extra: str = "",
    name: str = "experiment.toml",
) -> Path:
    path = folder / name
    path.write_text(
        CONFIG.format(
            images=images,
            interpreters=interpreters,
            attacks=attacks,
            transfer=transfer,
            adv_steps=adv_steps,
            extra=extra,
        )
    )
    return path


def rows(run_dir: Path) -> tuple[list[tuple], list[tuple]]:
    with sqlite3.connect(run_dir / DATABASE_NAME) as connection:
        results = sorted(connection.execute(f"SELECT {COLUMNS} FROM results").fetchall())
        transfer = sorted(connection.execute("SELECT * FROM transfer").fetchall())
    return results, transfer


def count(run_dir: Path, table: str = "results") -> int:
    try:
        with sqlite3.connect(f"{(run_dir / DATABASE_NAME).resolve().as_uri()}?mode=ro", uri=True) as connection:
            return int(connection.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.fixture(scope="module")
def serial(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("serial")
    config = write_config(folder)
    run_experiment(load_experiment_config(config), folder / "run")
    return config, folder / "run"


def test_a_ray_run_gives_the_serial_rows(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, serial_dir = serial
    outcome = run_experiment(load_experiment_config(config), tmp_path / "ray", executor=RayExecutor(num_cpus=2))
    assert outcome.completed == outcome.units and outcome.failed == 0
    assert rows(tmp_path / "ray") == rows(serial_dir)
    again = run_experiment(load_experiment_config(config), tmp_path / "ray", executor=RayExecutor(num_cpus=2))
    assert again.was_complete


def launch(config: Path, run_dir: Path, log: Path) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "underfire.cli",
        "run",
        str(config),
        "--out",
        str(run_dir),
        "--executor",
        "ray",
        "--workers",
        "2",
    ]
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def wait_for(condition, timeout: float = 120.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def running_tasks() -> list[int]:
    """Processes whose title says they are computing a unit (Ray retitles its workers per task)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::_compute_unit"):
                found.append(int(entry.name))
    return found


def test_killing_the_driver_mid_run_resumes_to_the_same_rows(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, serial_dir = serial
    run_dir = tmp_path / "run"
    driver = launch(config, run_dir, tmp_path / "first.log")
    try:
        assert wait_for(lambda: count(run_dir) > 0), (tmp_path / "first.log").read_text()
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray it started
    finally:
        driver.wait()
    assert 0 < count(run_dir) < len(rows(serial_dir)[0])
    second = launch(config, run_dir, tmp_path / "second.log")
    assert second.wait(timeout=300) == 0, (tmp_path / "second.log").read_text()
    assert rows(run_dir) == rows(serial_dir)  # complete, nothing duplicated (the primary keys), same numbers


def test_a_killed_worker_is_retried(tmp_path: Path) -> None:
    config = write_config(
        tmp_path, images=4, interpreters='["cam"]', attacks='["adv2"]', transfer="false", adv_steps=60
    )
    run_dir = tmp_path / "run"
    driver = launch(config, run_dir, tmp_path / "run.log")
    try:
        assert wait_for(lambda: bool(running_tasks())), (tmp_path / "run.log").read_text()
        os.kill(running_tasks()[0], signal.SIGKILL)  # one worker process, mid-unit
        assert driver.wait(timeout=300) == 0, (tmp_path / "run.log").read_text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    assert count(run_dir) == 4 and count(run_dir, "failures") == 0
    assert "will be retried" in (tmp_path / "run.log").read_text()


def test_a_unit_that_fails_for_good_is_recorded_then_retried(tmp_path: Path) -> None:
    broken = write_config(
        tmp_path,
        interpreters='["grad"]',
        attacks='["adv2"]',
        transfer="false",
        extra='[interpreters.grad]\nrelu = "none"',
        name="broken.toml",
    )
    result = runner.invoke(
        app, ["run", str(broken), "--out", str(tmp_path / "run"), "--executor", "ray", "--workers", "2"]
    )
    assert result.exit_code == 1
    assert "2 units failed" in result.stderr and "the map distance has no input gradient" in result.stderr
    with sqlite3.connect(tmp_path / "run" / DATABASE_NAME) as connection:
        failures = connection.execute(
            "SELECT model, attack, interpreter, batch, error FROM failures ORDER BY batch"
        ).fetchall()
    assert [row[:4] for row in failures] == [("shapes-resnet", "adv2", "grad", 0), ("shapes-resnet", "adv2", "grad", 1)]
    assert all("\n" not in row[4] and row[4] for row in failures)
    assert count(tmp_path / "run") == 0


def test_shards_merge_into_the_unsharded_run(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, serial_dir = serial
    for index in (1, 2):
        result = runner.invoke(
            app, ["run", str(config), "--out", str(tmp_path / f"part{index}"), "--shard", f"{index}/2"]
        )
        assert result.exit_code == 0, result.stderr
    parts = [count(tmp_path / f"part{index}") for index in (1, 2)]
    assert all(parts) and sum(parts) == len(rows(serial_dir)[0])
    result = runner.invoke(
        app, ["merge", str(tmp_path / "part1"), str(tmp_path / "part2"), "--out", str(tmp_path / "merged")]
    )
    assert result.exit_code == 0, result.stderr
    assert rows(tmp_path / "merged") == rows(serial_dir)
    served = sorted(
        str(p.relative_to(tmp_path / "merged")) for p in (tmp_path / "merged" / "files").rglob("*") if p.is_file()
    )
    assert served == sorted(str(p.relative_to(serial_dir)) for p in (serial_dir / "files").rglob("*") if p.is_file())
    report = runner.invoke(app, ["report", str(tmp_path / "merged")])
    assert report.exit_code == 0, report.stderr
    # a merged run is a run: resuming it with the config finds nothing to do
    assert run_experiment(load_experiment_config(config), tmp_path / "merged").was_complete


def test_merging_parts_of_different_runs_is_refused(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, serial_dir = serial
    other = write_config(tmp_path, adv_steps=3, name="other.toml")
    for source, out in ((config, "mine"), (other, "theirs")):
        assert runner.invoke(app, ["run", str(source), "--out", str(tmp_path / out), "--shard", "1/2"]).exit_code == 0
    result = runner.invoke(
        app, ["merge", str(tmp_path / "mine"), str(tmp_path / "theirs"), "--out", str(tmp_path / "merged")]
    )
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2 and len(lines) == 1 and "not a part of the same experiment" in lines[0]
    with pytest.raises(InputError, match="overlap"):
        merge_runs([tmp_path / "mine", serial_dir], tmp_path / "merged")
    assert not (tmp_path / "merged" / DATABASE_NAME).exists()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "mine"), "--shard", "2/3"])
    assert result.exit_code == 2 and "another shard of this run (shard 1/2, not 2/3)" in result.stderr


@pytest.mark.parametrize(
    "table, needle",
    [
        ("[resources.mask]\nnum_cpus = 1", "resources.mask: 'mask' is not a configured interpreter"),
        ("[resources.cam]\nnum_gpu = 1", "unknown key 'num_gpu'"),
        ("[resources.cam]\nnum_cpus = -1", "num_cpus must be a number >= 0"),
        ("[resources.cam]\nnum_cpus = 0", "needs at least some CPU or GPU"),
    ],
)
def test_resources_are_validated(tmp_path: Path, table: str, needle: str) -> None:
    config = write_config(tmp_path, extra=table)
    with pytest.raises(InputError, match=needle):
        load_experiment_config(config)


def test_resources_are_not_part_of_a_runs_identity(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, serial_dir = serial
    placed = write_config(
        tmp_path,
        extra="[resources.grad]\nnum_cpus = 2\nmemory_gb = 1.5\n[resources.default]\nnum_cpus = 1",
        name="placed.toml",
    )
    experiment = load_experiment_config(placed)
    executor = RayExecutor(resources=experiment.resources)
    assert executor.resources["grad"].ray_options() == {"num_cpus": 2, "num_gpus": 0.0, "memory": int(1.5 * 2**30)}
    assert experiment.as_dict() == load_experiment_config(config).as_dict()
    copy = tmp_path / "copy"
    import shutil

    shutil.copytree(serial_dir, copy)
    assert run_experiment(experiment, copy).was_complete  # the finished run, other placement: nothing to redo


def test_bad_executor_flags_are_one_line(serial: tuple[Path, Path], tmp_path: Path) -> None:
    config, _ = serial
    for args, needle in (
        (["--executor", "dask"], "--executor must be auto, serial, local or ray"),
        (["--address", "auto"], "goes with --executor ray"),
        (["--workers", "2"], "--workers goes with --executor local or ray"),
        (["--executor", "local", "--workers", "0"], "--workers must be a positive whole number"),
        (["--shard", "3/2"], "--shard must be I/N"),
        (["--shard", "x"], "--shard must be I/N"),
        (["--executor", "ray", "--workers", "2", "--address", "auto"], "--workers sizes a local cluster"),
    ):
        result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "run"), *args])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and needle in lines[0], result.stderr


def test_the_estimate_writes_nothing_and_predicts_every_unit_left(serial: tuple[Path, Path], tmp_path: Path) -> None:
    from underfire.runs.estimate import estimate_experiment

    config, serial_dir = serial
    estimate = estimate_experiment(load_experiment_config(config), tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()
    assert estimate.units == 6 and estimate.seconds > 0 and estimate.pilot_seconds > 0
    # on a CPU the peak is the process's resident size: at least the loaded model and torch
    assert estimate.memory_kind == "cpu" and estimate.peak_bytes > 100 * 2**20 and not estimate.peak_per_unit
    assert set(estimate.per_unit) == {
        "shapes-resnet pgd batch 1",
        "shapes-resnet adv2 vs cam batch 1",
        "shapes-resnet adv2 vs grad batch 1",
    }
    assert estimate_experiment(load_experiment_config(config), serial_dir).units == 0  # a finished run: nothing left
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "fresh"), "--estimate"])
    assert result.exit_code == 0 and result.stdout.startswith("estimate: about ") and not (tmp_path / "fresh").exists()
    assert "peak memory " in result.stdout and "resident in this process" in result.stdout


def test_shards_get_their_share_of_every_interpreter() -> None:
    """Dealing the plan in turn sent the same interpreters to every second shard (six units per
    batch: PGD, then ADV² against five interpreters); shards now deal each group's batches."""
    from underfire.runs.execute import shard_units
    from underfire.runs.plan import Unit

    plan = [
        Unit(model, attack, interpreter, None if interpreter is None else "benign", batch, frozenset(), frozenset())
        for model in ("a", "b")
        for batch in range(10)
        for attack, interpreter in [("pgd", None)]
        + [("adv2", name) for name in ("grad", "cam", "rts", "mask", "ensemble")]
    ]
    for count_ in (2, 3, 4):
        parts = [shard_units(plan, (index, count_)) for index in range(1, count_ + 1)]
        assert sorted((u.model, u.attack, str(u.interpreter), u.batch) for part in parts for u in part) == sorted(
            (u.model, u.attack, str(u.interpreter), u.batch) for u in plan
        )
        for model in ("a", "b"):
            for interpreter in (None, "grad", "cam", "rts", "mask", "ensemble"):
                shares = [sum(u.model == model and u.interpreter == interpreter for u in part) for part in parts]
                assert max(shares) - min(shares) <= 1, (count_, model, interpreter, shares)
