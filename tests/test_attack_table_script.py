"""``scripts/attack_table.py --join``: part rows rebuilt into the whole table row."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "attack_table.py"


def load_script():  # noqa: ANN201 - a module object
    spec = importlib.util.spec_from_file_location("attack_table_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def part_row(part: str, images: int, sums: dict[str, float], seconds: int) -> dict:
    means = {k: round(v / images, 3) for k, v in sums.items()}
    return {
        "model": "m",
        "interpreter": "ig",
        "attack": "adv2",
        "map_power": 0.5,
        "steps": 560,
        "seconds": seconds,
        **means,
        "part": part,
        "images": images,
        "sums": sums,
    }


def test_parts_join_into_the_means_of_all_their_images(tmp_path: Path) -> None:
    script = load_script()
    first = part_row("1/2", 50, {"success": 50.0, "iou": 32.15, "l1": 0.70, "confidence": 40.9}, 4898)
    second = part_row("2/2", 50, {"success": 49.0, "iou": 33.25, "l1": 0.70, "confidence": 40.1}, 4965)
    other = {
        **part_row("1/1", 20, {"success": 20.0, "iou": 13.0, "l1": 0.4, "confidence": 16.0}, 7),
        "interpreter": "lrp",
    }
    parts = tmp_path / "parts.jsonl"
    parts.write_text(
        "".join(json.dumps(row) + "\n" for row in (second, other, first)) + json.dumps({"model": "m", "iou": 1}) + "\n"
    )
    joined = {row["interpreter"]: row for row in script.join_parts(parts)}
    assert joined["ig"] == {
        "model": "m",
        "interpreter": "ig",
        "attack": "adv2",
        "map_power": 0.5,
        "steps": 560,
        "seconds": 4898 + 4965,
        "success": 0.99,
        "iou": 0.654,
        "l1": 0.014,
        "confidence": 0.81,
    }
    assert joined["lrp"]["images"] == 20 and joined["lrp"]["iou"] == 0.65  # not the table's 100 images: said
    parts.write_text(json.dumps(first) + "\n")
    with pytest.raises(SystemExit, match="do not make a whole"):
        script.join_parts(parts)


def test_a_malformed_part_is_refused_before_any_work() -> None:
    script = load_script()
    assert script.parse_part("2/3", None) == (2, 3) and script.parse_part(None, None) is None
    for bad in ("3/2", "0/2", "1", "a/b"):
        with pytest.raises(SystemExit, match="--part takes I/N"):
            script.parse_part(bad, None)
    with pytest.raises(SystemExit, match="not --sweep"):
        script.parse_part("1/2", "softplus_beta=3")
