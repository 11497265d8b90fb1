"""Cost of one ADV² step relative to one PGD step, per interpreter, side by side in one process.

One PGD step = forward + backward of the cross-entropy w.r.t. the input. One ADV² step = the same
plus the interpreter's differentiable surrogate map and its MSE to a target map (GRAD: second-order
backward through the smoothed ReLUs; MASK: one inner and one unrolled step; RTS: its network and
encoder). Medians of repeated runs after warm-up; the ratio is what matters (wall times depend on
the machine and on whatever else runs on it).

    python benchmarks/step_cost.py [--model shapes-resnet] [--batch 32] [--repeats 7] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import underfire as uf
from underfire.interpreters import MaskConfig, build_interpreter


def median_seconds(step, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    clf = uf.load_model(args.model)
    images, labels, _ = uf.ShapesDataset("test").tensors(range(args.batch))
    targets = (labels + 1) % clf.num_classes
    rows = []
    with clf.frozen():

        def pgd_step() -> None:
            x = images.clone().requires_grad_(True)
            loss = F.cross_entropy(clf(x), targets)
            torch.autograd.grad(loss, x)

        pgd = median_seconds(pgd_step, args.repeats)
        for name in ("grad", "smoothgrad", "cam", "gradcam", "rts", "mask"):
            options = {"config": MaskConfig(init_steps=5)} if name == "mask" else {}
            interpreter = build_interpreter(name, clf, **options)
            target_maps = interpreter(images, labels)
            state = {"value": None}

            def adv2_step() -> None:
                x = images.clone().requires_grad_(True)
                maps, state["value"] = interpreter.surrogate(x, targets, state["value"])
                loss = F.cross_entropy(clf(x), targets) + 5.0 * F.mse_loss(maps, target_maps)
                torch.autograd.grad(loss, x)

            adv2 = median_seconds(adv2_step, args.repeats)
            rows.append({"interpreter": name, "pgd_ms": 1000 * pgd, "adv2_ms": 1000 * adv2, "ratio": adv2 / pgd})

    lines = [
        f"One step on {args.model}, batch {args.batch}, {torch.get_num_threads()} threads (median of {args.repeats})",
        "",
        "| interpreter | PGD step (ms) | ADV² step (ms) | ADV² / PGD |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['interpreter']} | {r['pgd_ms']:.1f} | {r['adv2_ms']:.1f} | {r['ratio']:.2f}× |" for r in rows]
    table = "\n".join(lines)
    print(table)
    if args.out:
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
