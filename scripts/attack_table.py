"""The attack table of issue 4: PGD and ADV² on the built-in models, one JSON line per row.

    python scripts/attack_table.py shapes-resnet --out table.jsonl
    python scripts/attack_table.py shapes-resnet --out ablation.jsonl --interpreters grad --relus h,sigmoid,none
    python scripts/attack_table.py shapes-resnet --out family.jsonl --interpreters inputxgrad,deeplift,lrp
    python scripts/attack_table.py shapes-resnet --out budget.jsonl --interpreters mask --eps 16/255
    python scripts/attack_table.py shapes-resnet --out smoothing.jsonl --interpreters grad --sweep softplus_beta=1,3,10
    python scripts/attack_table.py shapes-densenet --out parts.jsonl --interpreters ig --no-pgd --part 1/2   # and 2/2 beside it
    python scripts/attack_table.py shapes-densenet --out table.jsonl --join parts.jsonl
    python scripts/attack_table.py shapes-resnet --out strong.jsonl --interpreters rts --sweep variant=adversarial --set adv_steps=900 --set 'lam=[40, 160]'

Setting: the ``quick`` preset (``--set KEY=JSON`` overrides one of its ADV² settings, and ``restarts`` PGD's too; rows then carry ``settings``) (its attack settings and interpreter options; ADV² rows whose ℓ_int is not the paper's carry ``map_power`` / ``soft_iou_weight``), the first ``--images`` correctly classified shapes test images,
random targets (seed 0), ε = 8/255 unless ``--eps`` says otherwise (rows then carry ``eps``).
Every measure is taken on the returned 8-bit images with the full interpreter run afresh for c_t,
against the benign map. PGD runs once per model with as many steps as the largest ADV² budget of
the interpreters asked for (and as many ``restarts`` as the most of theirs), on the same images and targets, and is measured against each
interpreter's map. Single-threaded by default (``--threads``) so
several models can run side by side on a small machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from underfire.attacks.config import parse_fraction, preset
from underfire.attacks.core import ADV2, PGD
from underfire.attacks.measure import AttackMeasures, measure_attack
from underfire.attacks.targets import random_targets
from underfire.data import ShapesDataset
from underfire.interpreters import build_interpreter
from underfire.metrics import iou_top_k
from underfire.models import load_model
from underfire.runs.inputs import images_from_dataset

MEASURES = ("success", "iou", "l1", "confidence")
IMAGES = 100  # rows of the table's standard size carry no ``images`` field


def summary(measures: list[AttackMeasures], part: str | None = None) -> dict:
    """The row's means; a ``--part`` row also carries the exact sums and its image count, so
    ``--join`` can rebuild the whole table's means without rounding error."""
    joined = {name: torch.cat([getattr(m, name) for m in measures]).float() for name in MEASURES}
    means = {name: round(values.mean().item(), 3) for name, values in joined.items()}
    if part is None:
        return means
    count = next(iter(joined.values())).numel()
    return {
        **means,
        "part": part,
        "images": count,
        "sums": {name: values.sum().item() for name, values in joined.items()},
    }


def join_parts(path: Path) -> list[dict]:
    """One row per set of ``--part`` rows in ``path`` that differ only in their part: means from
    the summed sums over the summed image counts, seconds added up (core-seconds)."""
    groups: dict[str, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "part" not in row:
            continue
        key = {k: v for k, v in row.items() if k not in ("part", "images", "sums", "seconds", *MEASURES)}
        groups.setdefault(json.dumps(key, sort_keys=True), []).append(row)
    joined = []
    for key, rows in groups.items():
        parts = sorted(row["part"] for row in rows)
        total = int(parts[0].split("/")[1])
        if parts != [f"{i}/{total}" for i in range(1, total + 1)]:
            raise SystemExit(f"parts {parts} of {key} do not make a whole")
        count = sum(row["images"] for row in rows)
        means = {name: round(sum(row["sums"][name] for row in rows) / count, 3) for name in MEASURES}
        whole = {k: v for k, v in rows[0].items() if k not in ("part", "images", "sums")}
        whole.update(seconds=sum(part["seconds"] for part in rows), **means)
        joined.append(whole if count == IMAGES else {**whole, "images": count})
    return joined


def parse_part(text: str | None, sweep: str | None) -> tuple[int, int] | None:
    """``--part I/N`` as (I, N), refused before any work when malformed or next to ``--sweep``."""
    if text is None:
        return None
    index, _, total = text.partition("/")
    if not (index.isdigit() and total.isdigit() and 1 <= int(index) <= int(total)):
        raise SystemExit(f"--part takes I/N with 1 <= I <= N, got {text!r}")
    if sweep:
        raise SystemExit("--part is for plain and --relus rows, not --sweep")
    return int(index), int(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--out", type=Path, required=True, help="JSON lines are appended here")
    parser.add_argument("--images", type=int, default=IMAGES)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--interpreters", default="cam,rts,grad,mask")
    parser.add_argument(
        "--relus",
        default=None,
        help="ReLU-surrogate ablation: ADV² on each of --interpreters with each surrogate (no PGD)",
    )
    parser.add_argument(
        "--sweep",
        default=None,
        help="KEY=V1,V2,...: per value of the interpreter option KEY, ADV² against the interpreter with it "
        "(targets: its own benign maps), and PGD and the default interpreter's ADV² measured on it (no transfer), e.g. softplus_beta=1,3,10",
    )
    parser.add_argument("--no-pgd", action="store_true", help="ADV² rows only")
    parser.add_argument("--pgd-only", action="store_true", help="PGD rows only")
    parser.add_argument(
        "--pgd-steps",
        type=int,
        default=None,
        help="PGD's steps (default: the largest ADV² budget of the interpreters asked for)",
    )
    parser.add_argument("--eps", default=None, help="L∞ budget, e.g. 16/255 (default: the preset's 8/255)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override an ADV² setting of the preset, e.g. adv_steps=900 or 'lam=[40, 160]' (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--part",
        default=None,
        metavar="I/N",
        help="only batches I, I+N, I+2N, ... (1-based), e.g. 1/2 and 2/2 on two cores; join the rows with --join",
    )
    parser.add_argument(
        "--join",
        type=Path,
        default=None,
        metavar="PARTS",
        help="append to --out the rows rebuilt from the --part rows in PARTS, and stop",
    )
    args = parser.parse_args()
    if args.join is not None:
        rows = join_parts(args.join)
        with args.out.open("a") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in rows)
        for row in rows:
            print(row)
        return
    part = parse_part(args.part, args.sweep)
    torch.set_num_threads(args.threads)
    overrides = {key: json.loads(value) for key, _, value in (item.partition("=") for item in args.set)}
    budget = {} if args.eps is None else {"eps": parse_fraction(args.eps)}
    tag = {} if args.eps is None else {"eps": args.eps}
    if overrides:
        tag["settings"] = overrides
    names = args.interpreters.split(",")
    # PGD gets as many runs as the ADV² it is compared with (PGD.configure's rule)
    runs = {"restarts": max(preset("quick", name, **overrides).restarts for name in names)}

    clf = load_model(args.model)
    images, labels, _, _ = images_from_dataset(clf, ShapesDataset("test", 64), args.images)
    targets = random_targets(labels, clf.num_classes, 0)
    chunks = [slice(s, s + args.batch) for s in range(0, images.shape[0], args.batch)]
    if part is not None:
        chunks = chunks[part[0] - 1 :: part[1]]
    interpreters = {name: build_interpreter(name, clf) for name in names}
    benign = {name: [interpreters[name](images[c], labels[c], seed=0) for c in chunks] for name in names}

    def departures(name: str) -> dict:
        """The ADV² row's settings that differ from the paper's attack: ``map_power`` and
        ``soft_iou_weight`` (ℓ_int other than the squared difference), ``restarts`` (the steps
        column counts one run)."""
        config = preset("quick", name, **budget, **overrides)
        pairs = (
            ("map_power", config.map_power, 1.0),
            ("soft_iou_weight", config.soft_iou_weight, 0.0),
            ("restarts", config.restarts, 1),
        )
        return {key: value for key, value, paper in pairs if value != paper}

    def log(row: dict) -> None:
        with args.out.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        print(row, flush=True)

    def adv2(
        name: str,
        interpreter_options: dict,
        reference: list[torch.Tensor] | None = None,
        keep: list[torch.Tensor] | None = None,
    ) -> tuple[list[AttackMeasures], int, int]:
        """ADV² against ``name`` with ``interpreter_options``, toward ``reference`` maps (default:
        the plain interpreter's benign maps); the adversarial images are appended to ``keep``."""
        interpreter = build_interpreter(name, clf, preset="quick", **interpreter_options)
        reference = benign[name] if reference is None else reference
        config, start = preset("quick", name, **budget, **overrides), time.time()
        measures = []
        for k, c in enumerate(chunks):
            result = ADV2(clf, config, interpreter=interpreter)(images[c], targets[c], reference[k], labels=labels[c])
            measures.append(measure_attack(interpreter, result.adversarial, targets[c], reference[k], seed=0))
            if keep is not None:
                keep.append(result.adversarial)
        return measures, config.pgd_steps + config.adv_steps, round(time.time() - start)

    if args.sweep:
        key, _, values = args.sweep.partition("=")
        steps = args.pgd_steps or max(preset("quick", n).pgd_steps + preset("quick", n).adv_steps for n in names)
        config = preset("quick", "cam", pgd_steps=steps, adv_steps=0, **budget, **runs)
        pgd = [PGD(clf, config)(images[c], targets[c], labels=labels[c]).adversarial for c in chunks]
        for name in names:
            plain: list[torch.Tensor] = []
            measures, total, seconds = adv2(name, {}, keep=plain)
            log(
                dict(
                    model=args.model,
                    interpreter=name,
                    attack="adv2",
                    sweep=key,
                    value=None,
                    **tag,
                    **departures(name),
                    steps=total,
                    seconds=seconds,
                    **summary(measures),
                )
            )
            for value in values.split(","):
                swept = build_interpreter(name, clf, preset="quick", **{key: value})
                reference = [swept(images[c], labels[c], seed=0) for c in chunks]
                moved = torch.cat([iou_top_k(r, b).mean(1) for r, b in zip(reference, benign[name])]).mean().item()
                on_swept = {
                    attack: summary(
                        [
                            measure_attack(swept, x, targets[c], reference[k], seed=0)
                            for k, (x, c) in enumerate(zip(examples, chunks))
                        ]
                    )
                    for attack, examples in (("pgd", pgd), ("adv2_plain", plain))
                }
                measures, total, seconds = adv2(name, {key: value}, reference)
                log(
                    dict(
                        model=args.model,
                        interpreter=name,
                        attack="adv2",
                        sweep=key,
                        value=value,
                        **tag,
                        **departures(name),
                        steps=total,
                        seconds=seconds,
                        benign_iou_to_plain=round(moved, 3),
                        pgd_iou=on_swept["pgd"]["iou"],
                        plain_adv2_iou=on_swept["adv2_plain"]["iou"],
                        plain_adv2_success=on_swept["adv2_plain"]["success"],
                        **summary(measures),
                    )
                )
        return

    if args.relus:
        for name in names:
            for relu in args.relus.split(","):
                measures, steps, seconds = adv2(name, {"relu": relu})
                log(
                    dict(
                        model=args.model,
                        interpreter=name,
                        relu=relu,
                        attack="adv2",
                        **departures(name),
                        steps=steps,
                        seconds=seconds,
                        **summary(measures, args.part),
                    )
                )
        return

    if not args.no_pgd:
        steps = args.pgd_steps or max(preset("quick", n).pgd_steps + preset("quick", n).adv_steps for n in names)
        config, start = preset("quick", "cam", pgd_steps=steps, adv_steps=0, **budget, **runs), time.time()
        pgd = [PGD(clf, config)(images[c], targets[c], labels=labels[c]).adversarial for c in chunks]
        seconds = round(time.time() - start)
        for name in names:
            measures = [
                measure_attack(interpreters[name], pgd[k], targets[c], benign[name][k], seed=0)
                for k, c in enumerate(chunks)
            ]
            log(
                dict(
                    model=args.model,
                    interpreter=name,
                    attack="pgd",
                    **tag,
                    **({"restarts": runs["restarts"]} if runs["restarts"] > 1 else {}),
                    steps=steps,
                    seconds=seconds,
                    **summary(measures, args.part),
                )
            )
    if args.pgd_only:
        return
    for name in names:
        measures, total, seconds = adv2(name, {})
        log(
            dict(
                model=args.model,
                interpreter=name,
                attack="adv2",
                **tag,
                **departures(name),
                steps=total,
                seconds=seconds,
                **summary(measures, args.part),
            )
        )


if __name__ == "__main__":
    main()
