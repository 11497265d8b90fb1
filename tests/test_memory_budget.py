"""``--max-memory``: the batch a memory budget chooses, measured once and kept by a resume."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from underfire.cli import app
from underfire.errors import InputError
from underfire.runs import ExperimentConfig, prepare_models, run_experiment
from underfire.runs.memory import META_KEY, choose_batch, fit_batch, parse_memory, recorded_batch

runner = CliRunner()
linux_only = pytest.mark.skipif(
    not (sys.platform.startswith("linux") and Path("/proc/self/clear_refs").exists()),
    reason="CPU peaks are measured through /proc/self/clear_refs",
)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("8GiB", 8 * 2**30),
        ("8G", 8 * 2**30),
        ("8g", 8 * 2**30),
        ("8GB", 8 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5TiB", int(1.5 * 2**40)),
        ("64 KiB", 64 * 2**10),
        ("1000", 1000),
        ("1000B", 1000),
    ],
)
def test_sizes_parse_with_binary_and_decimal_units(text: str, size: int) -> None:
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["", "8x", "0", "0GiB", "iB", "-1G", "8 GiBs", "G"])
def test_a_size_that_is_not_one_is_a_one_line_error(text: str) -> None:
    with pytest.raises(InputError, match="--max-memory must be") as caught:
        parse_memory(text)
    assert "\n" not in str(caught.value)


def test_the_batch_is_the_largest_at_which_every_kind_of_unit_fits() -> None:
    # a: 0 fixed + 100 per image; b: 240 fixed + 10 per image
    peaks = {"a": {1: 100, 4: 400}, "b": {1: 250, 4: 280}}
    choice = fit_batch(peaks, 360, 16, 16, "gpu")
    assert (choice.batch_size, choice.predicted_peak, choice.binding) == (3, 300, "a")
    assert choice.fitted == {"a": (0, 100), "b": (240, 10)}
    assert "batch 16 → 3" in choice.line() and "allocated on the GPU" in choice.line()
    assert fit_batch(peaks, 10**9, 16, 16, "cpu").batch_size == 16  # never beyond the configured batch
    fewer = fit_batch(peaks, 10**9, 5, 16, "cpu")  # five images: a batch of 16 holds five, and fits
    assert fewer.batch_size == 5 and "batch 16 fits" in fewer.line() and "2 kinds of unit" in fewer.line()
    assert fit_batch(peaks, 255, 16, 16, "cpu").batch_size == 1  # b binds at one image: 250
    # a peak that fell between the pilots (measurement noise) is no reason to refuse any batch
    assert fit_batch({"a": {1: 300, 4: 290}}, 301, 8, 8, "cpu").batch_size == 8
    # one image measured only: nothing is known about more
    assert fit_batch({"a": {1: 100}}, 10**9, 8, 8, "cpu").batch_size == 1


def test_a_budget_below_one_image_names_the_unit_that_needs_more() -> None:
    with pytest.raises(InputError, match=r"less than one image needs: b peaked at 250 MiB") as caught:
        fit_batch(
            {"a": {1: 100 * 2**20, 2: 150 * 2**20}, "b": {1: 250 * 2**20, 2: 260 * 2**20}}, 200 * 2**20, 4, 4, "cpu"
        )
    assert "\n" not in str(caught.value)


def test_a_recorded_batch_applies_to_the_config_it_was_chosen_for() -> None:
    config = ExperimentConfig(batch_size=16)
    record = json.dumps(
        {"batch_size": 5, "configured_batch_size": 16, "budget": 1, "predicted_peak": 1, "memory_kind": "cpu"}
    )
    assert recorded_batch(config, record).batch_size == 5
    assert recorded_batch(config, json.loads(record)).batch_size == 5
    assert (
        recorded_batch(dataclasses.replace(config, batch_size=8), record).batch_size == 8
    )  # the user changed it: theirs
    assert recorded_batch(config, None) is config


@pytest.fixture(scope="module")
def large_config(tmp_path_factory: pytest.TempPathFactory) -> ExperimentConfig:
    """GRAD's ADV² on ResNet-18 at 224 px (random weights): about 165 MiB per image over about
    500 MiB, so a budget between two batches is far from the measurement noise (tens of MiB)."""
    folder = tmp_path_factory.mktemp("images")
    generator = np.random.default_rng(0)
    files = []
    for number in range(4):
        path = folder / f"image{number}.png"
        Image.fromarray(generator.integers(0, 256, (224, 224, 3), dtype=np.uint8)).save(path)
        files.append(str(path))
    return ExperimentConfig(
        name="budget",
        models=("torchvision:resnet18@random",),
        interpreters=("grad",),
        attacks=("adv2",),
        transfer=False,
        files=tuple(files),
        batch_size=4,
        overrides={"pgd_steps": 1, "adv_steps": 1},
    )


@linux_only
def test_a_budget_lowers_the_batch_once_and_a_resume_keeps_it(large_config: ExperimentConfig, tmp_path: Path) -> None:
    fitted = choose_batch(large_config, prepare_models(large_config), 2**40).fitted
    ((fixed, per_image),) = fitted.values()
    assert per_image > 50 * 2**20  # the second-order graph of a 224-px image
    budget = int(fixed + 2.5 * per_image)  # one and a half images below batch 4, as much above batch 1
    said: list[str] = []
    outcome = run_experiment(large_config, tmp_path / "run", announce=said.append, max_memory=budget)
    connection = sqlite3.connect(tmp_path / "run" / "results.sqlite")
    meta = dict(connection.execute("SELECT key, value FROM meta").fetchall())
    connection.close()
    record, stored = json.loads(meta[META_KEY]), json.loads(meta["config"])["experiment"]
    batch = record["batch_size"]
    assert 1 <= batch < 4 and stored["batch_size"] == batch and record["configured_batch_size"] == 4
    assert record["budget"] == budget and record["predicted_peak"] <= budget and record["memory_kind"] == "cpu"
    assert outcome.units == math.ceil(4 / batch) and outcome.results == 4
    assert any(f"batch 4 → {batch}" in line for line in said)
    # a resume, with or without a budget, keeps the recorded batch and measures nothing again
    for budget_again in (None, 2**40):
        said.clear()
        again = run_experiment(large_config, tmp_path / "run", announce=said.append, max_memory=budget_again)
        assert again.was_complete and again.units == outcome.units
        assert not any("predicted peak" in line for line in said)
        assert any(f"batch {batch}, chosen by the run's memory budget" in line for line in said)


@linux_only
def test_the_cli_estimates_with_the_batch_a_budget_chooses_and_refuses_a_budget_too_small(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(
        '[experiment]\nname = "small"\nmodels = ["shapes-resnet"]\ninterpreters = ["cam"]\nimages = 4\nbatch_size = 4\n'
        "[overrides]\npgd_steps = 1\nadv_steps = 1\n"
    )
    result = runner.invoke(
        app, ["run", str(config), "--out", str(tmp_path / "fresh"), "--estimate", "--max-memory", "64GiB"]
    )
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert (
        lines[-2].startswith("memory budget 64.00 GiB")
        and "batch 4 fits" in lines[-2]
        and lines[-1].startswith("estimate: ")
    )
    assert not (tmp_path / "fresh").exists()
    result = runner.invoke(app, ["run", str(config), "--out", str(tmp_path / "small"), "--max-memory", "1MiB"])
    errors = [line for line in result.stderr.splitlines() if not line.startswith("measuring memory: ")]  # its progress
    assert result.exit_code != 0 and len(errors) == 1 and "less than one image needs" in errors[0], result.output
    result = runner.invoke(
        app, ["run", str(config), "--out", str(tmp_path / "part"), "--shard", "1/2", "--max-memory", "8GiB"]
    )
    errors = result.stderr.strip().splitlines()
    assert result.exit_code != 0 and len(errors) == 1 and "parts of a sharded run must share one" in errors[0], (
        result.output
    )


@linux_only
def test_a_pilot_the_machine_cannot_hold_is_retried_on_fewer_images(monkeypatch: pytest.MonkeyPatch) -> None:
    from underfire.runs import memory

    config = ExperimentConfig(
        name="retry",
        models=("shapes-resnet",),
        interpreters=("cam",),
        attacks=("adv2",),
        transfer=False,
        images=4,
        batch_size=4,
        overrides={"pgd_steps": 1, "adv_steps": 1},
    )
    real_pilot, sizes, seen = memory._pilot, [], {}

    def pilot(config, models, size, gpu, peaks, bar):  # noqa: ANN001 - the real one, but 4 images do not fit
        sizes.append(size)
        seen["peaks"] = peaks
        if size == 4:
            peaks.setdefault("partial", {})[4] = 1  # a pilot cut short leaves nothing behind
            raise MemoryError
        real_pilot(config, models, size, gpu, peaks, bar)

    monkeypatch.setattr(memory, "_pilot", pilot)
    choice = choose_batch(config, prepare_models(config), 2**40)
    assert sizes == [1, 4, 2] and choice.batch_size == 4  # the line through the 1- and 2-image pilots
    assert {label: set(points) for label, points in seen["peaks"].items()} == {"shapes-resnet adv2 vs cam": {1, 2}}


def test_the_batch_a_run_folder_computes_with() -> None:
    from underfire.runs.memory import sized_config

    config = ExperimentConfig(batch_size=16)
    record = json.dumps(
        {"batch_size": 5, "configured_batch_size": 16, "budget": 1, "predicted_peak": 1, "memory_kind": "cpu"}
    )
    # a first start killed after recording its budget and before its config: the recorded batch
    assert sized_config(config, [], {META_KEY: record}, None)[0].batch_size == 5
    assert sized_config(config, [], {META_KEY: record, "config": "{}"}, 2**40)[0].batch_size == 5  # no new measurement
    # a run begun without a budget keeps its batch; so does a new run without one
    assert sized_config(config, [], {"config": "{}"}, 2**40) == (config, None)
    assert sized_config(config, [], {}, None) == (config, None)


@linux_only
def test_a_budget_on_a_run_begun_without_one_is_ignored_by_the_run_and_its_estimate(tmp_path: Path) -> None:
    from underfire.runs.estimate import estimate_experiment

    config = ExperimentConfig(
        name="late",
        models=("shapes-resnet",),
        interpreters=("cam",),
        attacks=("adv2",),
        transfer=False,
        images=4,
        batch_size=4,
        overrides={"pgd_steps": 1, "adv_steps": 1},
    )
    run_experiment(config, tmp_path / "run")
    said: list[str] = []
    again = run_experiment(config, tmp_path / "run", announce=said.append, max_memory=2**40)
    assert again.was_complete and any(
        "--max-memory ignored: this run started without a budget" in line for line in said
    )
    said.clear()
    assert estimate_experiment(config, tmp_path / "run", max_memory=2**40, announce=said.append).units == 0
    assert not said  # nothing measured: the estimate keeps the run's batch too


@linux_only
def test_attack_takes_a_budget(tmp_path: Path) -> None:
    result = runner.invoke(
        app,
        [
            "attack",
            "--model",
            "shapes-resnet",
            "--data",
            "shapes:test",
            "--limit",
            "4",
            "--interpreter",
            "cam",
            "--pgd-steps",
            "1",
            "--adv-steps",
            "1",
            "--max-memory",
            "64GiB",
            "--out",
            str(tmp_path / "adv"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (
        "memory budget 64.00 GiB" in result.output and "batch 50 fits" in result.output
    )  # 4 images: a batch of 50 holds them
    record = (
        sqlite3.connect(tmp_path / "adv" / "results.sqlite")
        .execute("SELECT value FROM meta WHERE key = ?", (META_KEY,))
        .fetchone()
    )
    assert json.loads(record[0])["batch_size"] == 4
