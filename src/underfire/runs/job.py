"""``underfire attack``: one model, one interpreter, one attack, one target map — an experiment of
its own, run by the same driver as ``underfire run`` (so the two cannot drift: same image
selection, same budgets, same files, same measures), plus ``report.json`` from the run's store.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..attacks.targets import TARGET_MAP_KINDS
from ..errors import InputError
from ..store import open_reader
from ..store.files import write_atomic
from .config import ExperimentConfig
from .execute import RunOutcome, run_experiment


def attack_experiment(
    *,
    model: str,
    interpreter: str,
    attack: str = "adv2",
    target: str = "random",
    target_map: str = "benign",
    preset: str = "quick",
    eps: float = 8 / 255,
    seed: int = 0,
    batch_size: int = 50,
    files: Sequence[str | Path] = (),
    data: str | None = None,
    limit: int = 100,
    overrides: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    model_options: Mapping[str, Any] | None = None,
) -> ExperimentConfig:
    """The experiment ``underfire attack`` runs: ``files`` (labelled by the model's predictions)
    or the first ``limit`` correctly classified images of ``data``; ``overrides`` are attack
    settings (``AttackConfig`` fields), ``options`` the interpreter's options, ``model_options``
    the model's metadata (a ``[models.NAME]`` table)."""
    if bool(files) == bool(data):
        raise InputError("give image files or --data, not both or neither")
    if target_map not in TARGET_MAP_KINDS and not target_map.endswith(".npy"):
        raise InputError(f"target map must be one of {', '.join(TARGET_MAP_KINDS)} or a .npy file, got {target_map!r}")
    if target_map.endswith(".npy") and not Path(target_map).is_file():
        raise InputError(f"target map file {target_map!r} does not exist")
    return ExperimentConfig(
        name="attack",
        seed=seed,
        preset=preset,
        eps=eps,
        images=limit if data else max(1, len(files)),
        data=data or "shapes:test",
        files=tuple(str(path) for path in files),
        batch_size=batch_size,
        target=target,
        target_maps=(target_map,),
        models=(model,),
        interpreters=(interpreter,),
        attacks=(attack,),
        transfer=False,
        overrides=dict(overrides or {}),
        interpreter_options={interpreter: dict(options)} if options else {},
        model_options={model: dict(model_options)} if model_options else {},
    )


def run_attack(
    config: ExperimentConfig,
    out: str | Path,
    *,
    progress: bool = False,
    announce: Callable[[str], None] | None = None,
    device: str = "cpu",
    max_memory: int | None = None,
) -> dict[str, Any]:
    """Run the one-attack experiment into ``out`` (resumable like any run) and return its JSON
    report, also written to ``out/report.json``: per image the classes, the measures and the
    files; the means over the images; the attack's resolved configuration."""
    out = Path(out)
    if (out / "report.json").is_dir():
        raise InputError(f"cannot write {str(out / 'report.json')!r}: it is a directory")
    outcome: RunOutcome = run_experiment(
        config, out, progress=progress, announce=announce, device=device, max_memory=max_memory
    )
    report = attack_report(outcome.run_dir)
    write_atomic(out / "report.json", lambda stream: stream.write((json.dumps(report, indent=2) + "\n").encode()))
    return report


#: The per-image fields of ``report.json`` (rounded: 6 decimals for L∞, 5 for the rest).
_ROW_FIELDS = (
    "predicted_class",
    "success",
    "confidence",
    "l1",
    "l2",
    "iou",
    "iou_by_k",
    "top_k_intersection",
    "spearman",
    "linf",
)
_MEANS = {
    "success_rate": "success",
    "mean_confidence": "confidence",
    "mean_l1": "l1",
    "mean_l2": "l2",
    "mean_iou": "iou",
    "mean_top_k_intersection": "top_k_intersection",
    "mean_spearman": "spearman",
}


def attack_report(run_dir: str | Path) -> dict[str, Any]:
    """``report.json`` of a one-attack run, read from its store."""
    run_dir = Path(run_dir)
    with open_reader(run_dir) as reader:
        rows = reader.results()
        means = reader.means(tuple(_MEANS.values()))
        meta = reader.meta()
    if len(means) != 1:
        raise InputError(
            f"{str(run_dir)!r} is not a one-attack run (it has {len(means)} model × interpreter × attack cells)"
        )
    first = rows[0]
    images = [
        {
            "image": row["image"],
            "adversarial": str(run_dir / row["adversarial_path"]),
            "map": str(run_dir / row["map_path"]),
            "benign_map": str(run_dir / row["benign_map_path"]),
            "true_class": row["true_class"],
            "target_class": row["target_class"],
            **{key: _rounded(key, row[key]) for key in _ROW_FIELDS},
        }
        for row in rows
    ]
    images = [{**row, "success": bool(row["success"])} for row in images]
    cell = means[0]
    return {
        "model": first["model"],
        "interpreter": first["interpreter"],
        "attack": first["attack"],
        "target_map": first["target_map"],
        "config": json.loads(first["config"]),
        "interpreter_options": json.loads(first.get("interpreter_options", "{}")),
        "versions": meta.get("versions"),
        "images": images,
        "summary": {"images": cell["n"], **{key: round(float(cell[column]), 5) for key, column in _MEANS.items()}},
    }


def _rounded(key: str, value: Any) -> Any:
    if isinstance(value, dict):
        return {k: round(v, 5) for k, v in value.items()}
    if isinstance(value, float):
        return round(value, 6 if key == "linf" else 5)
    return value
