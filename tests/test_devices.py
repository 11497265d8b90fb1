"""``--device``: resolution and one-line errors everywhere; on a machine with a CUDA GPU, the same
maps, attacks and run rows as on the CPU up to float tolerance (those tests skip without one)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from underfire import load_model, run_experiment
from underfire.cli import app
from underfire.data import ShapesDataset
from underfire.devices import resolve_device
from underfire.errors import InputError
from underfire.interpreters import build_interpreter
from underfire.runs import load_experiment_config

runner = CliRunner()
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the device machine)")
#: A run small enough to do on both devices.
SMALL_RUN = (
    '[experiment]\nimages = 4\nbatch_size = 2\nmodels = ["shapes-resnet"]\ninterpreters = ["cam", "grad"]\n'
    'attacks = ["pgd", "adv2"]\n[overrides]\npgd_steps = 5\nadv_steps = 5\n'
)


def test_devices_resolve_or_say_why_not(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu" and resolve_device("CPU") == "cpu"
    with pytest.raises(InputError, match="torch sees no CUDA GPU here"):
        resolve_device("cuda")
    for bad in ("gpu", "cuda:x", "cuda:-1"):
        with pytest.raises(InputError, match="device must be one of auto, cpu, cuda, cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert (
        resolve_device("auto") == "cuda:0"
        and resolve_device("cuda") == "cuda:0"
        and resolve_device("cuda:1") == "cuda:1"
    )
    with pytest.raises(InputError, match=r"there are 2 CUDA GPUs \(cuda:0..cuda:1\)"):
        resolve_device("cuda:2")


def test_every_computing_command_refuses_a_missing_gpu_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    picture = tmp_path / "picture.png"
    Image.fromarray(ShapesDataset("test").render(0).image).save(picture)
    config = tmp_path / "run.toml"
    config.write_text(
        '[experiment]\nimages = 2\nmodels = ["shapes-resnet"]\ninterpreters = ["cam"]\nattacks = ["pgd"]\n'
    )
    for args in (
        ["explain", str(picture), "--out", str(tmp_path / "maps")],
        ["attack", str(picture), "--out", str(tmp_path / "attack")],
        ["evaluate", "--limit", "4"],
        ["run", str(config), "--out", str(tmp_path / "run")],
        ["demo", "--images", "1", "--out", str(tmp_path / "demo")],
        ["train", "rts", "--out", str(tmp_path / "rts.safetensors")],
    ):
        result = runner.invoke(app, [*args, "--device", "cuda:0"])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and "torch sees no CUDA GPU here" in lines[0], (
            args,
            result.stderr,
        )
    assert not any((tmp_path / name).exists() for name in ("maps", "attack", "run", "demo"))


def test_auto_is_the_cpu_here_and_gives_the_cpu_numbers(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("auto is a GPU on this machine (test_cuda_matches_cpu covers it)")
    model = load_model("shapes-resnet", device="auto")
    assert model.device == torch.device("cpu")


@needs_cuda
@pytest.mark.parametrize("name", ["grad", "smoothgrad", "cam", "gradcam", "rts", "mask"])
def test_cuda_maps_match_cpu(name: str) -> None:
    images, labels, _ = ShapesDataset("test").tensors(range(4))
    maps = {}
    for device in ("cpu", "cuda"):
        model = load_model("shapes-resnet", device=device)
        interpreter = build_interpreter(name, model)
        maps[device] = interpreter(images.to(device), labels.to(device), seed=0).cpu()
    tolerance = 0.05 if name in ("mask", "smoothgrad") else 1e-3  # MASK optimises, SmoothGrad draws noise per device
    assert (maps["cpu"] - maps["cuda"]).abs().mean() < tolerance


@needs_cuda
def test_a_cuda_run_matches_the_cpu_run(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(SMALL_RUN)
    rows = {}
    for device in ("cpu", "cuda"):
        run_experiment(load_experiment_config(config), tmp_path / device, device=device)
        with sqlite3.connect(tmp_path / device / "results.sqlite") as connection:
            rows[device] = sorted(connection.execute("SELECT interpreter, attack, image, success, l1 FROM results"))
    assert [row[:3] for row in rows["cpu"]] == [row[:3] for row in rows["cuda"]]
    agree = sum(a[3] == b[3] and abs(a[4] - b[4]) < 0.02 for a, b in zip(rows["cpu"], rows["cuda"]))
    assert agree >= 0.9 * len(rows["cpu"])  # sign steps can flip on float ties; most rows must agree


@needs_cuda
def test_the_estimate_on_cuda_gives_each_pilot_units_peak_gpu_memory(tmp_path: Path) -> None:
    from underfire.runs.estimate import estimate_experiment

    config = tmp_path / "run.toml"
    config.write_text(SMALL_RUN)
    estimate = estimate_experiment(load_experiment_config(config), tmp_path / "fresh", device="cuda")
    assert estimate.memory_kind == "gpu" and set(estimate.peak_per_unit) == set(estimate.per_unit)
    assert estimate.peak_bytes == max(estimate.peak_per_unit.values()) > 0
    assert "allocated on the GPU" in estimate.line()


@needs_cuda
def test_a_memory_budget_on_cuda_fits_the_bytes_allocated_on_the_gpu(tmp_path: Path) -> None:
    from underfire.runs import prepare_models
    from underfire.runs.memory import choose_batch

    config = tmp_path / "run.toml"
    config.write_text(SMALL_RUN)
    experiment = load_experiment_config(config)
    models = prepare_models(experiment, "cuda:0")
    ample = choose_batch(experiment, models, 2**40)
    assert ample.memory_kind == "gpu" and ample.batch_size == 2 and "allocated on the GPU" in ample.line()
    assert all(per_image > 0 for _, per_image in ample.fitted.values())  # every image adds activations on the device
    one = max(fixed + per_image for fixed, per_image in ample.fitted.values())  # the peak of one image
    assert choose_batch(experiment, models, one).batch_size == 1  # allocations repeat exactly: two exceed it
