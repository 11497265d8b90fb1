"""One attack job end to end (``underfire attack``): pick images and targets, attack in batches,
save 8-bit PNGs, re-load them and measure — what a real attacker's file would do.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import ShapesDataset, read_image
from ..data.shapes import SHAPE_CLASSES
from ..errors import InputError
from ..interpreters import Interpreter, build_interpreter
from ..metrics import resize_maps
from ..models.classifier import Classifier
from ..store.files import save_npy_atomic, save_png_atomic
from ..visualize import overlay, to_uint8
from .config import AttackConfig
from .core import ADV2, PGD, AttackResult
from .measure import AttackMeasures, measure_attack
from .targets import check_targets, load_user_map, other_image_maps, random_targets, shape_maps


@dataclass(frozen=True)
class AttackJob:
    """What ``underfire attack`` was asked to do."""

    interpreter: str = "cam"
    attack: str = "adv2"
    target: str = "random"  # a class id or name, or "random"
    target_map: str = "benign"  # benign | other | shape | circle | rectangle | PATH.npy
    config: AttackConfig = field(default_factory=AttackConfig)
    interpreter_options: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attack not in ("adv2", "pgd"):
            raise InputError(f"attack must be 'adv2' or 'pgd', got {self.attack!r}")
        if self.batch_size <= 0:
            raise InputError(f"batch size must be positive, got {self.batch_size}")
        kinds = ("benign", "other", "shape", "circle", "rectangle")
        if self.target_map not in kinds and not self.target_map.endswith(".npy"):
            raise InputError(f"target map must be one of {', '.join(kinds)} or a .npy file, got {self.target_map!r}")
        if self.target_map.endswith(".npy") and not Path(self.target_map).is_file():
            raise InputError(f"target map file {self.target_map!r} does not exist")


def images_from_files(classifier: Classifier, paths: list[Path]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read every file first (a bad file fails before any work); labels = the benign predictions."""
    size = classifier.input_size or 224
    images = torch.stack([read_image(path, size) for path in paths])
    labels = classifier.predict(images).argmax(1).cpu()
    return images, labels, [str(path) for path in paths]


def images_from_dataset(
    classifier: Classifier, dataset: Any, limit: int, exclude: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first ``limit`` correctly classified images of a labelled dataset (none of class
    ``exclude``: a fixed target class would be vacuous for them)."""
    chosen: list[int] = []
    step = max(64, limit)
    for start in range(0, len(dataset), step):
        indices = list(range(start, min(start + step, len(dataset))))
        images, labels, _ = dataset.tensors(indices)
        keep = classifier.predict(images).argmax(1).cpu() == labels
        if exclude is not None:
            keep &= labels != exclude
        correct = keep.nonzero().flatten().tolist()
        chosen += [indices[i] for i in correct]
        if len(chosen) >= limit:
            break
    chosen = chosen[:limit]
    if not chosen:
        raise InputError("no correctly classified image in the dataset")
    images, labels, _ = dataset.tensors(chosen)
    return images, labels, [f"{getattr(dataset, 'split', 'image')}-{i:05d}" for i in chosen]


def run_attack(
    classifier: Classifier,
    job: AttackJob,
    images: torch.Tensor,
    labels: torch.Tensor,
    names: list[str],
    out: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Attack, save and measure; returns the JSON report (also written to ``out/report.json``)."""
    interpreter = build_interpreter(job.interpreter, classifier, **job.interpreter_options)
    targets = _targets(classifier, job, labels)
    check_targets(labels, targets)
    out.mkdir(parents=True, exist_ok=True)
    for folder in ("adversarial", "maps"):
        (out / folder).mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(images), desc=f"{job.attack} vs {job.interpreter}", disable=not progress, unit="img")
    for start in range(0, len(images), job.batch_size):
        chunk = slice(start, start + job.batch_size)
        x, y, t = images[chunk], labels[chunk], targets[chunk]
        benign = interpreter(x, y, seed=job.seed)
        wanted = make_target_maps(interpreter, job.target_map, benign, t, job.seed + start)
        stems = [_stem(start + i, name) for i, name in enumerate(names[chunk])]
        crafted = craft_and_reload(
            classifier, interpreter if job.attack == "adv2" else None, job.config, x, y, t, wanted,
            [out / "adversarial" / f"{stem}.png" for stem in stems],
        )
        # compared with what the attacker wanted: the benign maps by default, else the target maps
        measures = measure_attack(interpreter, crafted.reloaded, t, wanted, seed=job.seed)
        for i, stem in enumerate(stems):
            for kind, maps, picture in (("benign", benign, x), ("adversarial", measures.maps, crafted.reloaded)):
                save_map_files(maps[i], picture[i], out / "maps" / f"{stem}.{kind}.npy", out / "maps" / f"{stem}.{kind}.png")
            fields = measure_fields(measures, i, x[i], crafted.reloaded[i])
            rows.append(
                {
                    "image": names[start + i],
                    "adversarial": str(crafted.paths[i]),
                    "true_class": int(y[i]),
                    "target_class": int(t[i]),
                    **_rounded(fields),
                }
            )
        bar.update(len(stems))
    bar.close()
    report = {
        "model": classifier.name,
        "interpreter": job.interpreter,
        "attack": job.attack,
        "target_map": job.target_map,
        "config": _jsonable(job.config),
        "images": rows,
        "summary": summarise(rows),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over the images (success rate and means over all images, successful or not)."""
    def mean(key: str) -> float:
        return round(float(np.mean([row[key] for row in rows])), 5)

    return {
        "images": len(rows),
        "success_rate": mean("success"),
        "mean_confidence": mean("confidence"),
        "mean_l1": mean("l1"),
        "mean_l2": mean("l2"),
        "mean_iou": mean("iou"),
        "mean_top_k_intersection": mean("top_k_intersection"),
        "mean_spearman": mean("spearman"),
    }


@dataclass(frozen=True)
class CraftedBatch:
    """One attacked batch as saved: the attack's result, the PNG files, the images read back from
    them (what every measure uses) and the attack's wall time for the whole batch."""

    result: AttackResult
    paths: list[Path]
    reloaded: torch.Tensor
    seconds: float


def craft_and_reload(
    classifier: Classifier,
    interpreter: Interpreter | None,
    config: AttackConfig,
    images: torch.Tensor,
    labels: torch.Tensor,
    targets: torch.Tensor,
    target_maps: torch.Tensor | None,
    paths: Sequence[Path],
) -> CraftedBatch:
    """Attack one batch (ADV² against ``interpreter``, or PGD when it is None), write each
    adversarial image as an 8-bit PNG (atomically) and read the files back, so the measures see
    exactly what an attacker's file holds — the one code path ``attack`` and ``run`` share."""
    started = time.perf_counter()
    if interpreter is not None:
        result = ADV2(classifier, interpreter, config)(images, targets, target_maps, labels=labels)
    else:
        result = PGD(classifier, config)(images, targets, labels=labels)
    seconds = time.perf_counter() - started
    saved = [save_png_atomic(to_uint8(result.adversarial[i]), path) for i, path in enumerate(paths)]
    reloaded = torch.stack([read_image(path) for path in saved])
    return CraftedBatch(result, saved, reloaded, seconds)


def save_map_files(saliency: torch.Tensor, picture: torch.Tensor, npy_path: Path, png_path: Path) -> None:
    """A (1, h, w) map as float32 ``.npy`` and as a jet overlay on ``picture`` (3, H, W), enlarged
    to about 256 px so small maps stay readable; both written atomically."""
    save_npy_atomic(saliency[0].detach().cpu().numpy().astype(np.float32), npy_path)
    save_png_atomic(overlay(picture, saliency), png_path, max(1, 256 // picture.shape[-1]))


def measure_fields(measures: AttackMeasures, i: int, benign: torch.Tensor, reloaded: torch.Tensor) -> dict[str, Any]:
    """Sample ``i``'s measures as plain Python values (unrounded); ``linf`` is taken between the
    benign image and the re-loaded PNG."""
    return {
        "predicted_class": int(measures.predicted[i]),
        "success": bool(measures.success[i]),
        "confidence": float(measures.confidence[i]),
        "l1": float(measures.l1[i]),
        "l2": float(measures.l2[i]),
        "iou": float(measures.iou[i]),
        "iou_by_k": {f"{k:.2f}": float(v) for k, v in zip(measures.ks, measures.iou_by_k[i])},
        "top_k_intersection": float(measures.top_k_intersection[i]),
        "spearman": float(measures.spearman[i]),
        "linf": float((reloaded - benign).abs().max()),
    }


def _rounded(fields: dict[str, Any]) -> dict[str, Any]:
    def rounded(key: str, value: Any) -> Any:
        if isinstance(value, dict):
            return {k: round(v, 5) for k, v in value.items()}
        if isinstance(value, float):
            return round(value, 6 if key == "linf" else 5)
        return value

    return {key: rounded(key, value) for key, value in fields.items()}


def make_target_maps(
    interpreter: Interpreter,
    kind: str,
    benign: torch.Tensor,
    targets: torch.Tensor,
    seed: int,
    *,
    pool: tuple[torch.Tensor, torch.Tensor] | None = None,
    resize: bool = False,
) -> torch.Tensor:
    """The maps the attacker wants for a batch: ``benign`` (its own benign maps), ``other`` (the
    map of another image of the target class, drawn from ``pool`` or the shapes val split),
    ``shape``/``circle``/``rectangle`` (seeded random shapes) or a ``.npy`` file (resized to the
    interpreter's map size when ``resize``, else it must match)."""
    if kind == "benign":
        return benign
    size = tuple(benign.shape[-2:])
    if kind in ("shape", "circle", "rectangle"):
        return shape_maps("circle" if kind == "shape" else kind, len(targets), size, seed)
    if kind == "other":
        pool_images, pool_labels = pool if pool is not None else other_pool(interpreter.classifier)
        return other_image_maps(interpreter, pool_images, pool_labels, targets, seed)
    user = load_user_map(kind)
    if tuple(user.shape[-2:]) != size:
        if not resize:
            raise InputError(f"target map {kind!r} is {tuple(user.shape[-2:])}, the {interpreter.name} maps are {size}")
        user = resize_maps(user, size).clamp(0, 1)  # type: ignore[arg-type]
    return user.expand(len(targets), -1, -1, -1)


def other_pool(classifier: Classifier) -> tuple[torch.Tensor, torch.Tensor]:
    """Where ``other`` target maps come from: 500 images of the shapes benchmark's val split."""
    if classifier.class_names != list(SHAPE_CLASSES):
        raise InputError("target map 'other' draws its maps from the shapes benchmark; use a shapes model")
    images, labels, _ = ShapesDataset("val", classifier.input_size or 64).tensors(range(500))
    return images, labels


def _targets(classifier: Classifier, job: AttackJob, labels: torch.Tensor) -> torch.Tensor:
    if job.target == "random":
        return random_targets(labels, classifier.num_classes, job.seed)
    return classifier.check_classes(classifier.class_index(job.target), len(labels)).cpu()


def _stem(index: int, name: str) -> str:
    return f"{index:04d}-{Path(name).stem}"


def _jsonable(config: AttackConfig) -> dict[str, Any]:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))
