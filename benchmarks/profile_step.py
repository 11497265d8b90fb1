"""Profile ADV² (or one interpreter call) with pyinstrument: where a step's time goes.

    python -m benchmarks.profile_step --interpreter cam --batch 32 --steps 6
    python -m benchmarks.profile_step --interpreter mask --explain      # the benign map instead
    python -m benchmarks.profile_step --interpreter grad --html prof.html

The attack runs once untimed (warm-up), then once under the profiler; the text tree goes to stdout.
``hotspots.py`` measures the fixes of what this found, before and after.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--interpreter", default="cam")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5, help="ADV² stage-2 steps (stage 1 is skipped)")
    parser.add_argument("--explain", action="store_true", help="profile the benign map instead of ADV²")
    parser.add_argument("--interval", type=float, default=0.001, help="sampling interval (s)")
    parser.add_argument("--html", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    from pyinstrument import Profiler

    from underfire.attacks import ADV2, AttackConfig

    from .common import inputs, load_classifier
    from .scaling import interpreter_for

    clf = load_classifier(args.model)
    images, labels, targets = inputs(clf, args.batch)
    interpreter = interpreter_for(args.interpreter, clf)
    if args.explain:

        def work() -> None:
            interpreter(images, labels)

    else:
        maps = torch.rand((args.batch, 1, *interpreter.map_shape(images)), generator=torch.Generator().manual_seed(1))
        attack = ADV2(clf, AttackConfig(pgd_steps=0, adv_steps=args.steps), interpreter=interpreter)

        def work() -> None:
            attack(images, targets, maps)

    work()
    profiler = Profiler(interval=args.interval)
    profiler.start()
    work()
    profiler.stop()
    print(profiler.output_text(unicode=True, color=False))
    if args.html:
        args.html.write_text(profiler.output_html())


if __name__ == "__main__":
    main()
