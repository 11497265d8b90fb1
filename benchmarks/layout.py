"""Channels-last against NCHW at ImageNet size, the two layouts timed interleaved in one process.

    python -m benchmarks.layout                       # ResNet-50 (random weights), 224 px, batch 1

Why interleaved: two benchmark runs made one after the other see different load on a shared
machine, and compared across runs the layouts differed by 1.7× for MASK; alternated round by
round they differ by far less. Rows: a PGD step (forward, cross-entropy, input gradient) and one
ADV² step against MASK (T(3 steps) − T(1 step)) / 2, medians over the rounds. This is the
measurement behind ``underfire.models.classifier.CHANNELS_LAST_MAX_PIXELS``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from underfire.attacks import ADV2, AttackConfig  # noqa: E402
from underfire.interpreters import build_interpreter  # noqa: E402

from .common import load_classifier  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    clf = load_classifier(args.model)
    size = clf.input_size or 224
    x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    target = (clf.predict(x).argmax(1) + 1) % clf.num_classes

    def pgd_step(channels_last: bool) -> float:
        image = x.contiguous(
            memory_format=torch.channels_last if channels_last else torch.contiguous_format
        ).requires_grad_(True)
        started = time.perf_counter()
        with clf.frozen():
            torch.autograd.grad(F.cross_entropy(clf(image), target), image)
        return time.perf_counter() - started

    def mask_step(channels_last: bool) -> float:
        clf._channels_last = channels_last  # what Classifier(..., channels_last=...) sets
        mask = build_interpreter("mask", clf, iterations=3)
        maps = torch.rand(1, 1, *mask.map_shape(x))
        seconds = []
        for steps in (1, 3):
            started = time.perf_counter()
            ADV2(clf, AttackConfig(pgd_steps=0, adv_steps=steps), interpreter=mask)(x, target, maps)
            seconds.append(time.perf_counter() - started)
        return (seconds[1] - seconds[0]) / 2

    times: dict[str, list[float]] = {
        f"{step} {layout}": [] for step in ("PGD step", "ADV² mask step") for layout in ("channels-last", "NCHW")
    }
    pgd_step(True), pgd_step(False)  # warm-up
    for round_ in range(args.rounds):
        order = (True, False) if round_ % 2 == 0 else (False, True)
        for step, measure in (("PGD step", pgd_step), ("ADV² mask step", mask_step)):
            for channels_last in order:
                times[f"{step} {'channels-last' if channels_last else 'NCHW'}"].append(measure(channels_last))
    print(f"{args.model} at {size} px, batch 1, one thread, medians of {args.rounds} interleaved rounds (s):")
    for name, values in times.items():
        print(f"  {name:<30} {statistics.median(values):.3f}")


if __name__ == "__main__":
    main()
