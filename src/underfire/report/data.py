"""The numbers every report format shows, from the run's read side (``store.RunReader``).

Every mean is computed once, by the reader's SQL ``AVG``, and rounded once here by :func:`rounded`: the HTML
table, the JSON and the CSV all print these same rounded values, so they can never disagree with
one another (and a test recomputes them from the database to show they agree with it too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..attacks import attack_label  # noqa: F401 - the report modules name attacks through it
from ..store.reader import RunReader, open_reader


@dataclass(frozen=True)
class Measure:
    """One averaged column of the summary: the SQL column, its label and how it is rounded."""

    column: str
    label: str
    kind: str  # "percent" (a 0/1 rate shown as %), "number" (3 decimals) or "seconds" (2 decimals)


MEASURES: tuple[Measure, ...] = (
    Measure("success", "success", "percent"),
    Measure("confidence", "p(target)", "number"),
    Measure("l1", "map L1", "number"),
    Measure("iou", "map IoU", "number"),
    Measure("iou_success", "IoU, successful", "number"),
    Measure("seconds", "wall s / image", "seconds"),
)
DECIMALS = {"percent": 1, "number": 3, "seconds": 2}


def rounded(value: float | None, kind: str) -> float | None:
    """The single rounding rule of the report (None stays None: an empty cell)."""
    if value is None:
        return None
    if kind == "percent":
        return round(100.0 * value, DECIMALS[kind])
    return round(float(value), DECIMALS[kind])


def formatted(value: float | int | None, kind: str) -> str:
    """How a rounded value is printed in the HTML page: fixed decimals, '%' for rates, '—' for none."""
    if value is None:
        return "—"
    if kind == "count":
        return str(int(value))
    text = f"{value:.{DECIMALS[kind]}f}"
    return f"{text}%" if kind == "percent" else text


def summary_key(measure: str, attack: str) -> str:
    """Field name of one measure for one attack in a summary row, e.g. ``adv2_iou``."""
    suffix = "success_pct" if measure == "success" else measure
    return f"{attack}_{suffix}"


def baseline_attack(attacks: list[str]) -> str | None:
    """The attack gains are measured against: the first interpreter-free attack (PGD)."""
    from ..attacks import ATTACKS

    free = [a for a in attacks if a in ATTACKS and not ATTACKS.get(a).uses_interpreter]
    return free[0] if free else None


def gain_key(attack: str, attacks: list[str]) -> str:
    """``iou_gain`` for the first attack compared with the baseline, ``ATTACK_iou_gain`` for others."""
    base = baseline_attack(attacks)
    compared = [a for a in attacks if a != base]
    return "iou_gain" if compared and attack == compared[0] else f"{attack}_iou_gain"


def gained(attacks: list[str]) -> list[str]:
    """The attacks that get an IoU-gain column: every one but the baseline (none without one)."""
    base = baseline_attack(attacks)
    return [] if base is None else [a for a in attacks if a != base]


def summary_fields(attacks: list[str]) -> list[tuple[str, str]]:
    """Every field of a summary row with its kind, in CSV/JSON column order."""
    fields = [("model", "text"), ("interpreter", "text"), ("target_map", "text"), ("images", "count")]
    fields += [(f"{attack}_n", "count") for attack in attacks]
    for measure in MEASURES:
        fields += [(summary_key(measure.column, attack), measure.kind) for attack in attacks]
    fields += [(gain_key(attack, attacks), "number") for attack in gained(attacks)]
    return fields


def interpreter_sort_key(name: str) -> tuple[int, str]:
    """The registry's order (built-ins in the paper's order: GRAD, CAM, RTS, MASK), anything
    else alphabetically after."""
    from ..interpreters import INTERPRETERS

    order = INTERPRETERS.names()
    return (order.index(name) if name in order else len(order), name)


@dataclass
class RunData:
    """Everything a report needs from one run, read once from its database."""

    run_dir: Path
    name: str
    created: str | None
    config: Any
    versions: Any
    counts: dict[str, Any]
    summary: list[dict[str, Any]]
    curves: list[dict[str, Any]]
    transfer: list[dict[str, Any]]
    attacks: list[str] = field(default_factory=list)
    images: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    results: dict[tuple[str, str, str, str, str], dict[str, Any]] = field(default_factory=dict)
    #: ``underfire detect``'s summaries, and ROC curves (model, detector, attack, interpreter,
    #: target_map, fpr, tpr) drawn from its stored scores
    detections: list[dict[str, Any]] = field(default_factory=list)
    roc: list[dict[str, Any]] = field(default_factory=list)
    #: (attack, interpreter) → the options of the copy the attack differentiated, where they
    #: differ from the judged interpreter's (``AttackConfig.surrogate_options``; from the meta)
    surrogates: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    @property
    def models(self) -> list[str]:
        return sorted({row["model"] for row in self.summary})

    def interpreters(self, model: str) -> list[str]:
        return sorted({row["interpreter"] for row in self.summary if row["model"] == model}, key=interpreter_sort_key)

    def target_maps(self, model: str, interpreter: str) -> list[str]:
        """The target maps of one model × interpreter, 'benign' (the paper's default) first."""
        names = {
            row["target_map"] for row in self.summary if (row["model"], row["interpreter"]) == (model, interpreter)
        }
        return sorted(names, key=lambda name: (name != "benign", name))


def _summary(reader: RunReader, attacks: list[str]) -> list[dict[str, Any]]:
    """Per model × interpreter × target map: rows per attack and the rounded SQL means."""
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    raw_iou: dict[tuple[str, str, str], dict[str, float | None]] = {}
    for row in reader.means([measure.column for measure in MEASURES]):
        key = (row["model"], row["interpreter"], row["target_map"])
        entry = groups.setdefault(key, _empty_summary(*key, attacks))
        attack = row["attack"]
        if attack not in attacks:
            continue
        entry[f"{attack}_n"] = row["n"]
        for measure in MEASURES:
            entry[summary_key(measure.column, attack)] = rounded(row[measure.column], measure.kind)
        raw_iou.setdefault(key, {})[attack] = row["iou"]
    for key, count in reader.image_counts().items():
        if key in groups:
            groups[key]["images"] = count
    base = baseline_attack(attacks)
    for key, entry in groups.items():
        ious = raw_iou.get(key, {})
        for attack in gained(attacks):
            other, reference = ious.get(attack), ious.get(base)  # type: ignore[arg-type]
            entry[gain_key(attack, attacks)] = (
                rounded(other - reference, "number") if other is not None and reference is not None else None
            )
    order = sorted(groups, key=lambda key: (key[0], interpreter_sort_key(key[1]), key[2] != "benign", key[2]))
    return [groups[key] for key in order]


def _empty_summary(model: str, interpreter: str, target_map: str, attacks: list[str]) -> dict[str, Any]:
    entry: dict[str, Any] = {name: None for name, _ in summary_fields(attacks)}
    entry.update(model=model, interpreter=interpreter, target_map=target_map, images=0)
    entry.update({f"{attack}_n": 0 for attack in attacks})
    return entry


def _curves(reader: RunReader) -> list[dict[str, Any]]:
    curves = [{**curve, "iou": [rounded(v, "number") for v in curve["iou"]]} for curve in reader.iou_curves()]
    curves.sort(key=lambda c: (c["model"], interpreter_sort_key(c["interpreter"]), c["target_map"], c["attack"]))
    return curves


def _transfer(reader: RunReader) -> list[dict[str, Any]]:
    rows = [
        {**cell, **{measure: rounded(cell[measure], "number") for measure in ("iou", "l1", "l2")}}
        for cell in reader.transfer_means()
    ]
    rows.sort(
        key=lambda r: (
            r["model"],
            r["attack"],
            r["target_map"],
            interpreter_sort_key(r["source_interpreter"]),
            interpreter_sort_key(r["target_interpreter"]),
        )
    )
    return rows


def _roc(reader: RunReader) -> list[dict[str, Any]]:
    from ..detection import roc_curve
    from ..runs.detect import example_groups

    curves = []
    for entry in reader.detector_score_sets():
        if not entry["benign"]:
            continue
        score = {row["adversarial_path"]: row["score"] for row in entry["examples"]}
        for (attack, interpreter, target_map), examples in example_groups(entry["examples"]).items():
            fpr, tpr = roc_curve(entry["benign"], [score[path] for _, path in examples])
            curves.append(
                {
                    "model": entry["model"],
                    "detector": entry["detector"],
                    "attack": attack,
                    "interpreter": interpreter,
                    "target_map": target_map,
                    "fpr": [round(float(v), 4) for v in fpr],
                    "tpr": [round(float(v), 4) for v in tpr],
                }
            )
    return curves


def _run_name(config: Any) -> str | None:
    """The experiment's name from its config (``name`` or ``experiment.name``), if it has one."""
    if not isinstance(config, dict):
        return None
    for table in (config, config.get("experiment")):
        if isinstance(table, dict) and isinstance(table.get("name"), str) and table["name"]:
            return table["name"]
    return None


def load_run(run_dir: Path) -> RunData:
    """Read a run directory's database into a :class:`RunData` (one-line ``InputError`` if unusable)."""
    run_dir = Path(run_dir)
    with open_reader(run_dir) as reader:
        meta = reader.meta()
        config = meta.get("config")
        attacks = reader.attacks()
        by_attack = reader.count("results", by="attack")
        counts: dict[str, Any] = {
            "images": reader.count("images"),
            "results": {attack: by_attack.get(attack, 0) for attack in attacks},
            "transfer": reader.count("transfer"),
        }
        images = {(row["model"], row["image"]): row for row in reader.images()}
        results = {
            (row["model"], row["interpreter"], row["attack"], row["target_map"], row["image"]): row
            for row in reader.results()
        }
        return RunData(
            run_dir=run_dir,
            name=_run_name(config) or run_dir.resolve().name,
            created=meta.get("created") if isinstance(meta.get("created"), str) else None,
            config=config,
            versions=meta.get("versions"),
            counts=counts,
            summary=_summary(reader, attacks),
            curves=_curves(reader),
            transfer=_transfer(reader),
            attacks=attacks,
            images=images,
            results=results,
            detections=reader.detections(),
            roc=_roc(reader),
            surrogates=_surrogates(meta.get("attack_configs")),
        )


def _surrogates(settings: Any) -> dict[tuple[str, str], dict[str, Any]]:
    """The attacked surrogates' options per (attack, interpreter), from a run's stored attack
    settings (``{attack: {interpreter: config}}`` for an interpreter-bound attack)."""
    found: dict[tuple[str, str], dict[str, Any]] = {}
    if not isinstance(settings, dict):
        return found
    for attack, per in settings.items():
        if not isinstance(per, dict) or "eps" in per:  # an interpreter-free attack's one config
            continue
        for interpreter, config in per.items():
            options = config.get("surrogate_options") if isinstance(config, dict) else None
            if options:
                found[attack, interpreter] = dict(options)
    return found


def summary_rows(run_dir: Path) -> list[dict[str, Any]]:
    """Per model × interpreter × target map: rows per attack, each attack's success rate (%),
    mean confidence, L1, IoU and seconds — the rounded numbers the HTML table, JSON and CSV show."""
    with open_reader(Path(run_dir)) as reader:
        return _summary(reader, reader.attacks())
