"""``underfire run --estimate`` against the run itself: predicted and measured wall time.

    python -m benchmarks.estimate                       # two small configs on shapes-resnet
    python -m benchmarks.estimate --memory              # the memory estimate, GRAD + CAM + MASK
    python -m benchmarks.estimate --budget 3GiB         # the batch --max-memory chooses at 224 px, and that run's peak

For each config: the estimate (pilot runs of the first batch, ``runs.estimate``), then every unit
computed for real by one ``UnitWorker`` in the same process, one torch thread, nothing written.
The target is a prediction within 30 % of the measured time. With ``--memory``, the estimate and
the real run each go in a process of their own (a CPU process's peak resident size only grows,
so one process cannot measure both), and their peaks are compared. With ``--budget``, one process
chooses the batch of a 224-px ADV² experiment (``runs.memory``: every unit kind's peak fitted as
fixed + per image) and another runs every unit at that batch; the fitted lines, the chosen batch,
its predicted peak and the run's measured peak are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from underfire.runs import load_experiment_config  # noqa: E402
from underfire.runs.config import ExperimentConfig  # noqa: E402
from underfire.runs.estimate import estimate_run, peak_resident_bytes  # noqa: E402
from underfire.runs.plan import PreparedModel, Unit, plan_units, prepare_models  # noqa: E402
from underfire.runs.worker import UnitWorker  # noqa: E402

CONFIG = """
[experiment]
name = "estimate"
images = 8
batch_size = 4
models = ["shapes-resnet"]
interpreters = {interpreters}
attacks = ["pgd", "adv2"]
transfer = true
"""


def _planned(path: Path) -> tuple[ExperimentConfig, list[PreparedModel], list[Unit]]:
    """The config at ``path``, its prepared models and every unit of its plan."""
    config = load_experiment_config(path)
    models = prepare_models(config)
    return config, models, [unit for model in models for unit in plan_units(config, model)]


def _run_units(config: ExperimentConfig, models: list[PreparedModel], units: list[Unit]) -> float:
    """Every unit computed for real in this process, nothing written; the seconds it took."""
    worker = UnitWorker(config, {model.spec: model for model in models})
    started = time.perf_counter()
    for unit in units:
        worker(unit)
    return time.perf_counter() - started


def main() -> None:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        for interpreters in ('["grad", "cam", "mask"]', '["grad", "cam"]'):
            path = Path(folder) / "experiment.toml"
            path.write_text(CONFIG.format(interpreters=interpreters))
            config, models, units = _planned(path)
            estimate = estimate_run(config, models, units)
            actual = _run_units(config, models, units)
            print(
                f"{interpreters}: estimate {estimate.seconds:.1f} s (pilots {estimate.pilot_seconds:.1f} s), "
                f"measured {actual:.1f} s, ratio {estimate.seconds / actual:.2f}"
            )


def child(mode: str, path: str) -> None:
    """One side of ``--memory`` in this process: the estimate alone, or every unit for real."""
    torch.set_num_threads(1)
    config, models, units = _planned(Path(path))
    if mode == "estimate":
        peak = estimate_run(config, models, units).peak_bytes
    else:
        _run_units(config, models, units)
        peak = peak_resident_bytes()
    print(json.dumps({"mode": mode, "peak_bytes": peak}))


#: The 224-px case of ``--memory``: activations, not torch itself, dominate its resident size.
LARGE = """
[experiment]
name = "estimate-224"
files = ["{folder}/a.png", "{folder}/b.png", "{folder}/c.png", "{folder}/d.png"]
batch_size = 4
models = ["torchvision:resnet18@random"]
interpreters = ["grad", "cam"]
attacks = ["adv2"]
[overrides]
pgd_steps = 10
adv_steps = 10
"""


def memory() -> None:
    from PIL import Image

    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        for name in ("a", "b", "c", "d"):
            pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=generator)
            Image.fromarray(pixels.numpy()).save(Path(folder) / f"{name}.png")
        cases = {
            "shapes-resnet, grad + cam + mask, 8 images": CONFIG.format(interpreters='["grad", "cam", "mask"]'),
            "resnet18 @ 224 px, grad + cam ADV2, batch 4": LARGE.replace("{folder}", folder),
        }
        for label, text in cases.items():
            path = Path(folder) / "experiment.toml"
            path.write_text(text)
            peaks = {}
            for mode in ("estimate", "run"):
                done = subprocess.run(
                    [sys.executable, "-m", "benchmarks.estimate", "--child", mode, str(path)],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                peaks[mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]
            print(
                f"{label}: estimated peak {peaks['estimate'] / 2**20:.0f} MiB, "
                f"measured {peaks['run'] / 2**20:.0f} MiB, ratio {peaks['estimate'] / peaks['run']:.2f}",
                flush=True,
            )


#: The ``--budget`` experiment: ADV² at 224 px on random weights, one PGD and one ADV² step and
#: 20 MASK iterations (a unit's peak grows with neither count, only its time), the images
#: written by ``budget``.
BUDGET = """
[experiment]
name = "budget-224"
files = {files}
batch_size = {batch}
models = ["{model}"]
interpreters = {interpreters}
attacks = ["adv2"]
transfer = false
[overrides]
pgd_steps = 1
adv_steps = 1
"""
#: appended when MASK is among the interpreters
BUDGET_MASK = "[interpreters.mask]\niterations = 20\n"


def budget_child(mode: str, path: str, argument: str) -> None:
    """One side of ``--budget``: ``choose`` (the batch for ``argument`` bytes) or ``run`` (every unit)."""
    from underfire.runs.memory import choose_batch

    torch.set_num_threads(1)
    config, models, units = _planned(Path(path))
    if mode == "choose":
        choice = choose_batch(config, models, int(argument))
        print(
            json.dumps(
                {
                    "batch": choice.batch_size,
                    "predicted": choice.predicted_peak,
                    "fitted": choice.fitted,
                    "line": choice.line(),
                }
            )
        )
    else:
        _run_units(config, models, units)
        print(json.dumps({"peak_bytes": peak_resident_bytes()}))


def budget(size: str, model: str, interpreters: str, images: int, fit_only: bool = False) -> None:
    from PIL import Image

    from underfire.runs.memory import parse_memory

    limit = parse_memory(size)
    names = json.dumps(interpreters.split(","))
    with tempfile.TemporaryDirectory() as folder:
        generator = torch.Generator().manual_seed(0)
        files = []
        for number in range(images):
            pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8, generator=generator)
            files.append(str(Path(folder) / f"image{number}.png"))
            Image.fromarray(pixels.numpy()).save(files[-1])
        path = Path(folder) / "experiment.toml"

        def child(mode: str, batch: int) -> dict:
            text = BUDGET.format(files=json.dumps(files), batch=batch, model=model, interpreters=names)
            path.write_text(text + (BUDGET_MASK if "mask" in interpreters.split(",") else ""))
            done = subprocess.run(
                [sys.executable, "-m", "benchmarks.estimate", "--budget-child", mode, str(path), str(limit)],
                capture_output=True,
                text=True,
            )
            if done.returncode != 0:  # the child's own last line says why (an interpreter that cannot run here...)
                raise SystemExit(
                    f"the {mode} process failed: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"
                )
            return json.loads(done.stdout.strip().splitlines()[-1])

        chosen = child("choose", images)
        print(chosen["line"])
        for label, (fixed, per_image) in chosen["fitted"].items():
            print(f"  {label}: {fixed / 2**20:.0f} MiB fixed + {per_image / 2**20:.1f} MiB per image")
        if fit_only:
            return
        measured = child("run", chosen["batch"])["peak_bytes"]
        print(
            f"batch {chosen['batch']} of {images}: predicted peak {chosen['predicted'] / 2**20:.0f} MiB, "
            f"measured {measured / 2**20:.0f} MiB (ratio {chosen['predicted'] / measured:.2f}), budget {limit / 2**20:.0f} MiB",
            flush=True,
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--memory", action="store_true", help="compare the memory estimate with a real run instead of the time"
    )
    parser.add_argument("--child", nargs=2, metavar=("MODE", "CONFIG"), help=argparse.SUPPRESS)  # one side of --memory
    parser.add_argument(
        "--budget",
        default=None,
        help="a memory budget (e.g. 3GiB): the batch --max-memory picks at 224 px, and that run's peak",
    )
    parser.add_argument("--model", default="torchvision:resnet50@random", help="with --budget")
    parser.add_argument("--interpreters", default="grad,cam,mask", help="with --budget (comma-separated)")
    parser.add_argument("--images", type=int, default=8, help="with --budget: images, and the configured batch")
    parser.add_argument(
        "--fit-only", action="store_true", help="with --budget: print the fitted lines, do not run the chosen batch"
    )
    parser.add_argument("--budget-child", nargs=3, metavar=("MODE", "CONFIG", "BYTES"), help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.budget_child:
        budget_child(*arguments.budget_child)
    elif arguments.budget:
        budget(arguments.budget, arguments.model, arguments.interpreters, arguments.images, arguments.fit_only)
    elif arguments.child:
        child(*arguments.child)
    elif arguments.memory:
        memory()
    else:
        main()
