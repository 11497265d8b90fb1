"""The adaptive ADV² against the ensemble with the detector's own score in ℓ_int: one JSON line per term.

    python scripts/detector_term.py shapes-resnet --out pilot.jsonl --images 10 --terms none,l1:0.2,soft_iou:0.2,soft_iou:1

Setting: the adaptive attack of ``examples/defences/ensemble.toml`` (members grad, cam, rts, mask,
weights 8, 1, 1, 1, the ``quick`` preset, ε = 8/255) on the first ``--images`` correctly
classified shapes test images, random targets (seed 0); ``SCORE:W`` sets the ensemble's
``detector_score`` and ``detector_weight`` (``none``: no detector term). Measured on the 8-bit
adversarial images: success, each member's IoU to its benign map (its map of c_t against its map
of the true class, the transfer table's measure), and the detector's ``iou``, ``soft_iou`` and
``l1`` scores (the four members, their predicted class, CAM's grid). The benign ``iou`` scores of
the first ``--benign`` images calibrate the detector's threshold at 5 % FPR (``underfire detect``'s
rule); each row has the TPR of the successful examples at it and their ROC AUC against the benign
scores (and, for rows comparable with an earlier pilot, the share above the benign 95th
percentile). One torch thread (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from underfire.attacks.core import ADV2
from underfire.attacks.targets import random_targets
from underfire.data import ShapesDataset
from underfire.detection import DetectorConfig, EnsembleDetector, detection_rate, roc_auc, threshold_at_fpr
from underfire.interpreters import build_interpreter
from underfire.metrics import disagreement, iou_top_k
from underfire.models import load_model
from underfire.presets import preset
from underfire.runs.inputs import images_from_dataset

MEMBERS = ("grad", "cam", "rts", "mask")
WEIGHTS = (8.0, 1.0, 1.0, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines are appended here")
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument(
        "--benign", type=int, default=100, help="benign images whose iou scores set the 95th percentile"
    )
    parser.add_argument("--terms", default="none,soft_iou:0.2", help="comma-separated SCORE:WEIGHT (or none)")
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument(
        "--adv-steps", type=int, default=None, help="stage 2's steps (default: the preset's 500; rows then carry them)"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    clf = load_model(args.model)
    pool, pool_labels, _, _ = images_from_dataset(clf, ShapesDataset("test", 64), max(args.images, args.benign))
    images, labels = pool[: args.images], pool_labels[: args.images]
    targets = random_targets(labels, clf.num_classes, 0)
    chunks = [slice(s, s + args.batch) for s in range(0, args.images, args.batch)]
    detector = EnsembleDetector(clf, DetectorConfig(members=MEMBERS, score="iou"))
    benign_scores = torch.cat([detector.scores(pool[s : s + args.batch]) for s in range(0, args.benign, args.batch)])
    p95 = float(np.percentile(benign_scores.numpy(), 95))
    threshold = threshold_at_fpr(benign_scores.numpy(), 0.05)
    members = dict(zip(MEMBERS, detector.members))  # the detector's own: the judged interpreters
    benign_maps = {name: [members[name](images[c], labels[c], seed=0) for c in chunks] for name in MEMBERS}

    for term in args.terms.split(","):
        score, _, weight = term.partition(":")
        options = {} if score == "none" else {"detector_score": score, "detector_weight": float(weight)}
        ensemble = build_interpreter("ensemble", clf, members=MEMBERS, weights=WEIGHTS, **options)
        config = preset("quick", "ensemble", **({} if args.adv_steps is None else {"adv_steps": args.adv_steps}))
        started = time.time()
        adversarial = []
        for c in chunks:
            result = ADV2(clf, config, interpreter=ensemble)(
                images[c], targets[c], ensemble(images[c], labels[c], seed=0), labels=labels[c]
            )
            adversarial.append((result.adversarial * 255).round() / 255)  # what an 8-bit file holds
        seconds = round(time.time() - started)
        x = torch.cat(adversarial)
        success = clf.predict(x).argmax(1) == targets
        member_iou = {
            name: round(
                torch.cat(
                    [
                        iou_top_k(members[name](adversarial[k], targets[c], seed=0), benign_maps[name][k]).mean(1)
                        for k, c in enumerate(chunks)
                    ]
                )
                .mean()
                .item(),
                3,
            )
            for name in MEMBERS
        }
        grid_maps = detector.maps(x)
        scores = {kind: disagreement(grid_maps, kind) for kind in ("iou", "soft_iou", "l1")}
        row = dict(
            kind="detector_term",
            model=args.model,
            images=args.images,
            weights=list(WEIGHTS),
            term=term,
            steps=config.pgd_steps + config.adv_steps,
            seconds=seconds,
            success=round(success.float().mean().item(), 3),
            member_iou=member_iou,
            **{f"detector_{kind}_score": round(value.mean().item(), 3) for kind, value in scores.items()},
            benign_iou_p95=round(p95, 3),
            benign_images=args.benign,
            threshold=round(threshold, 3),
            tpr_at_5pct_fpr=round(detection_rate(scores["iou"][success].numpy(), threshold), 3),
            auc=round(roc_auc(benign_scores.numpy(), scores["iou"][success].numpy()), 3),
            above_benign_p95=round(
                ((scores["iou"] > p95) & success).float().sum().item() / max(1, int(success.sum())), 3
            ),
        )
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(row, flush=True)


if __name__ == "__main__":
    main()
