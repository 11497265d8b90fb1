"""The reference table's rows, read from run folders made by ``underfire run`` (it runs nothing).

    underfire run docs/reference/ig.toml --out runs/reference-ig
    python scripts/reference_table.py runs/reference-ig >> docs/attack_table.jsonl

One JSON line per model × interpreter × attack × target map of each run: the means of the
success, IoU test, L1 and p(c_t) columns over its images, the steps of one run of the attack, the
attack's wall time (seconds, summed over its batches), the settings that depart from the paper's
attack (``map_power``, ``soft_iou_weight``, ``restarts``, ``eps`` and the attacked surrogate's
options, ``surrogate``), the judged interpreter's options where any were set (``options``), the
run's name, and the commit of the code that made it (as the run recorded it).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from underfire.attacks import ATTACKS
from underfire.store.reader import open_reader

#: The table's standard size: rows over another number of images say how many.
IMAGES = 100
MEASURES = ("success", "iou", "l1", "confidence")
#: (setting, its paper value): a row names a setting whose value differs.
PAPER = (("map_power", 1.0), ("soft_iou_weight", 0.0), ("restarts", 1), ("eps", 8 / 255))
#: Settings of the map term: an attack that does not look at maps (PGD) carries them unused.
MAP_SETTINGS = ("map_power", "soft_iou_weight", "surrogate_options")


def rows_of(run_dir: Path) -> list[dict[str, Any]]:
    """The reference rows of one run folder, in the order the run stored them."""
    with open_reader(run_dir) as reader:
        meta, results = reader.meta(), reader.results()
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for row in results:
        groups[row["model"], row["interpreter"], row["attack"], row["target_map"]].append(row)
    name = meta.get("config", {}).get("experiment", {}).get("name", run_dir.name)
    commit = meta.get("versions", {}).get("commit")
    table = []
    for (model, interpreter, attack, target_map), members in groups.items():
        config = json.loads(members[0]["config"])
        if attack in ATTACKS and not ATTACKS.get(attack).uses_interpreter:
            config = {key: value for key, value in config.items() if key not in MAP_SETTINGS}
        options = json.loads(members[0].get("interpreter_options") or "{}")
        row: dict[str, Any] = {"model": model, "interpreter": interpreter, "attack": attack}
        if target_map != "benign":
            row["target_map"] = target_map
        for key, paper in PAPER:
            if key in config and config[key] != paper:
                row[key] = config[key]
        if config.get("surrogate_options"):
            row["surrogate"] = config["surrogate_options"]
        if options:
            row["options"] = options
        if len(members) != IMAGES:
            row["images"] = len(members)
        row["steps"] = config.get("pgd_steps", 0) + config.get("adv_steps", 0)
        row["seconds"] = round(sum(member["seconds"] for member in members))
        row.update({key: round(sum(float(m[key]) for m in members) / len(members), 3) for key in MEASURES})
        row.update(run=name, commit=commit)
        table.append(row)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (underfire run --out)")
    args = parser.parse_args()
    for run_dir in args.runs:
        for row in rows_of(run_dir):
            sys.stdout.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
