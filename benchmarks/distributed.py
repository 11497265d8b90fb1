"""The Ray executor against the serial run: images/s of one fixed experiment, and the executor's
overhead per unit.

    python -m benchmarks.distributed --out benchmarks/results     # writes distributed.json / .md

The experiment: shapes-resnet, CAM and GRAD, PGD and ADV² with transfer, ``--images`` images in
batches of 2, the quick preset cut to ``--steps`` stage-1 and stage-2 steps. It runs three ways,
each into a fresh folder, one torch thread per worker: serially in this process, on a local Ray
with 1 worker, and with 2 workers. Wall time includes everything a user waits for (Ray's start,
each worker building its models). Overhead per unit = (1-worker Ray − serial) / units: what Ray
adds when it cannot run anything in parallel. The rows of the three runs are checked equal.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from underfire import run_experiment  # noqa: E402
from underfire.runs import load_experiment_config  # noqa: E402
from underfire.runs.ray_executor import RayExecutor  # noqa: E402

CONFIG = """
[experiment]
name = "scaling"
images = {images}
batch_size = 2
models = ["shapes-resnet"]
interpreters = ["cam", "grad"]
attacks = ["pgd", "adv2"]
transfer = true
[overrides]
pgd_steps = {steps}
adv_steps = {steps}
"""


def measure(images: int, steps: int) -> dict[str, object]:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as folder:
        config_path = Path(folder) / "experiment.toml"
        config_path.write_text(CONFIG.format(images=images, steps=steps))
        config = load_experiment_config(config_path)
        rows: dict[str, list[tuple]] = {}
        times: dict[str, float] = {}
        units = 0
        for label, executor in (
            ("serial", None),
            ("ray, 1 worker", RayExecutor(num_cpus=1)),
            ("ray, 2 workers", RayExecutor(num_cpus=2)),
        ):
            run_dir = Path(folder) / label.replace(" ", "").replace(",", "-")
            started = time.perf_counter()
            outcome = run_experiment(config, run_dir, executor=executor)
            times[label] = time.perf_counter() - started
            units = outcome.units
            with sqlite3.connect(run_dir / "results.sqlite") as connection:
                rows[label] = sorted(
                    connection.execute("SELECT model, interpreter, attack, image, iou, l1, confidence FROM results")
                )
        same = all(value == rows["serial"] for value in rows.values())
    return {
        "images": images,
        "steps": steps,
        "units": units,
        "cpus": os.cpu_count(),
        "rows_equal": same,
        "seconds": {label: round(seconds, 2) for label, seconds in times.items()},
        "images_per_s": {label: round(images / seconds, 3) for label, seconds in times.items()},
        "speedup_vs_serial": {label: round(times["serial"] / seconds, 2) for label, seconds in times.items()},
        "overhead_per_unit_s": round((times["ray, 1 worker"] - times["serial"]) / units, 2),
    }


def as_markdown(result: dict[str, object]) -> str:
    lines = [
        f"Experiment: shapes-resnet, CAM + GRAD, PGD + ADV² with transfer, {result['images']} images in batches of 2, "
        f"{result['steps']} + {result['steps']} steps: {result['units']} units; rows of all three runs equal: {result['rows_equal']}.",
        "",
        "| executor | wall s | images/s | × serial |",
        "| --- | --- | --- | --- |",
    ]
    for label, seconds in result["seconds"].items():  # type: ignore[union-attr]
        lines.append(
            f"| {label} | {seconds} | {result['images_per_s'][label]} | {result['speedup_vs_serial'][label]} |"
        )  # type: ignore[index]
    lines.append("")
    lines.append(f"Overhead per unit (1-worker Ray − serial, per unit): {result['overhead_per_unit_s']} s.")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    result = measure(args.images, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "distributed.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "distributed.md").write_text(as_markdown(result))
    print(as_markdown(result))


if __name__ == "__main__":
    main()
