"""``--executor local``: a run's batches in worker processes side by side, with the same rows as
a serial run, and the driver alone writing."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from underfire.runs import ExperimentConfig, run_experiment
from underfire.runs.local_executor import LocalExecutor, batch_groups
from underfire.runs.plan import plan_units, prepare_models

CONFIG = {
    "experiment": {
        "name": "side-by-side",
        "images": 4,
        "batch_size": 2,
        "models": ["shapes-resnet"],
        "interpreters": ["cam", "grad"],
        "attacks": ["pgd", "adv2"],
        "transfer": True,
    },
    "overrides": {"pgd_steps": 2, "adv_steps": 2},
}


def rows(run_dir: Path) -> list[tuple]:
    with sqlite3.connect(run_dir / "results.sqlite") as connection:
        results = connection.execute(
            "SELECT model, interpreter, attack, image, success, confidence, l1, iou, config FROM results "
            "ORDER BY model, interpreter, attack, image"
        ).fetchall()
        transfer = connection.execute("SELECT * FROM transfer ORDER BY 1, 2, 3, 4, 5, 9").fetchall()
    return results + transfer


def test_batches_go_to_processes_whole_and_the_rows_equal_a_serial_run(tmp_path: Path) -> None:
    config = ExperimentConfig.from_mapping(CONFIG)
    (model,) = prepare_models(config)
    groups = batch_groups(plan_units(config, model))
    assert [len(group) for group in groups] == [3, 3]  # per batch: PGD, ADV² vs cam, ADV² vs grad
    assert all(len({unit.batch for unit in group}) == 1 for group in groups)
    said: list[str] = []
    parallel = run_experiment(config, tmp_path / "local", executor=LocalExecutor(2, announce=said.append))
    serial = run_experiment(config, tmp_path / "serial")
    assert parallel.completed == serial.completed == 6 and parallel.failed == 0
    assert said and "2 worker processes side by side" in said[0]
    assert rows(tmp_path / "local") == rows(tmp_path / "serial")
    local_files = sorted(p.relative_to(tmp_path / "local") for p in (tmp_path / "local" / "files").rglob("*.npy"))
    serial_files = sorted(p.relative_to(tmp_path / "serial") for p in (tmp_path / "serial" / "files").rglob("*.npy"))
    assert local_files == serial_files and local_files


def test_one_batch_runs_in_this_process() -> None:
    config = ExperimentConfig.from_mapping({**CONFIG, "experiment": {**CONFIG["experiment"], "images": 2}})
    (model,) = prepare_models(config)
    assert len(batch_groups(plan_units(config, model))) == 1
    said: list[str] = []
    executor = LocalExecutor(2, announce=said.append)
    from underfire.runs.worker import UnitWorker

    worker = UnitWorker(config, {model.spec: model})
    outputs = list(executor.run(worker, plan_units(config, model)))
    assert len(outputs) == 3 and not said  # no worker process was started
    steps = {output.unit.attack: json.loads(output.results[0].config)["pgd_steps"] for output in outputs}
    assert steps == {"pgd": 4, "adv2": 2}  # PGD takes stage 1 + stage 2 of the ADV² it is compared with
