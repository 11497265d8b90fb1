"""Peak memory of one attack step, in a process of its own (see ``scaling``'s docstring).

    MALLOC_MMAP_THRESHOLD_=65536 python -m benchmarks.memory --model shapes-resnet \\
        --plan '{"pgd": [1, 16], "cam": [16]}'

Prints one JSON line: {method: {batch: peak MiB per image}}. Run by ``benchmarks.run``.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

#: steps shorter than this get an untimed warm-up call first (longer ones: their one-time
#: allocations are negligible next to their peak, and a second call would double the run)
WARMUP_BELOW_MS = 2000.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--plan", required=True, help="JSON {method: [batch, ...]} or {method: [[batch, step_ms], ...]}"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from .common import inputs, load_classifier
    from .scaling import make_step, memory_supported, peak_step_memory

    if not memory_supported(args.device):
        print(json.dumps({}))
        return
    clf = load_classifier(args.model, args.device)
    result: dict[str, dict[int, float]] = {}
    for method, batches in json.loads(args.plan).items():
        result[method] = {}
        for entry in batches:
            batch, step_ms = (entry, 0.0) if isinstance(entry, int) else (int(entry[0]), float(entry[1]))
            images, _, targets = inputs(clf, batch, args.device)
            step = make_step(method, clf, images, targets)
            if method == "mask" or step_ms < WARMUP_BELOW_MS:
                # one-time allocations for this shape (a few MiB: they matter for small steps);
                # MASK's initial state (its first call is a longer solve)
                step()
            peak = peak_step_memory(step, args.device)
            result[method][batch] = peak / batch / 2**20
            del step, images, targets
    print(json.dumps(result))


if __name__ == "__main__":
    main()
