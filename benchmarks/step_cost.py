"""Cost of one ADV² step relative to one PGD step, per interpreter, side by side in one process.

One PGD step = forward + backward of the cross-entropy w.r.t. the input + projection. One ADV²
step = the interpreter's ``surrogate_and_logits`` (its differentiable map and the logits, from one
forward pass where the interpreter allows it: GRAD with ``share_forward``, CAM, Grad-CAM), the MSE
to a target map, the backward and the projection (GRAD: second-order backward through the smoothed
ReLUs; MASK: one inner and one unrolled step, and in the ``mask+evidence`` row also the ``quick``
preset's deletion-evidence term with the follower's optimality gap; RTS: its network, whose
encoder also gives the encoder-logit term). The steps are ``benchmarks.scaling.make_step``'s; rounds alternate PGD and
ADV² after warm-up and the ratio is the median of the per-round ratios.

    python benchmarks/step_cost.py [--model shapes-resnet] [--batch 32] [--repeats 7] [--out FILE.md]

``python -m benchmarks.run`` runs the fuller suite (peers, limit, scaling).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

if __package__ in (None, ""):  # run as a script: make the benchmarks package importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from benchmarks.common import inputs, interleaved, load_classifier, paired_ratio  # noqa: E402
from benchmarks.scaling import MASK_WITH_EVIDENCE, make_step  # noqa: E402

INTERPRETERS = ("grad", "smoothgrad", "cam", "gradcam", "rts", "mask", MASK_WITH_EVIDENCE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes-resnet")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=int(os.environ["OMP_NUM_THREADS"]))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clf = load_classifier(args.model)
    images, _, targets = inputs(clf, args.batch)
    pgd = make_step("pgd", clf, images, targets)
    rows = []
    for name in INTERPRETERS:
        samples = interleaved({"pgd": pgd, "adv2": make_step(name, clf, images, targets)}, args.repeats, warmup=2)
        ratio = paired_ratio(samples["adv2"], samples["pgd"])
        pgd_ms, adv2_ms = (1000 * sorted(samples[k])[len(samples[k]) // 2] for k in ("pgd", "adv2"))
        rows.append({"interpreter": name, "pgd_ms": pgd_ms, "adv2_ms": adv2_ms, "ratio": ratio.median})
        print(f"{name}: {ratio.median:.2f}x", file=sys.stderr)

    lines = [
        f"One step on {args.model}, batch {args.batch}, {torch.get_num_threads()} thread(s) (median of {args.repeats})",
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
