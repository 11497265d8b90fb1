"""Build a run directory by hand (real SQLite database, real PNG and .npy files) in the schema
``underfire run`` writes, so the report can be tested on runs of any shape: several models,
target maps, partial runs, missing files — without spending minutes attacking.
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from underfire.visualize import colorize

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE images (model TEXT, image TEXT, position INTEGER, true_class INTEGER, target_class INTEGER,
  image_path TEXT, PRIMARY KEY (model, image));
CREATE TABLE results (
  model TEXT, interpreter TEXT, attack TEXT, target_map TEXT, image TEXT,
  true_class INTEGER, target_class INTEGER, predicted_class INTEGER,
  success INTEGER, confidence REAL, l1 REAL, l2 REAL, iou REAL,
  iou_by_k TEXT, top_k_intersection REAL, spearman REAL, linf REAL,
  adversarial_path TEXT, map_path TEXT, overlay_path TEXT,
  benign_map_path TEXT, benign_overlay_path TEXT, seconds REAL, seed INTEGER, config TEXT,
  PRIMARY KEY (model, interpreter, attack, target_map, image));
CREATE TABLE transfer (model TEXT, source_interpreter TEXT, target_interpreter TEXT, target_map TEXT, image TEXT,
  l1 REAL, l2 REAL, iou REAL, PRIMARY KEY (model, source_interpreter, target_interpreter, target_map, image));
"""
KS = ("0.05", "0.10", "0.15", "0.20", "0.25", "0.30", "0.35", "0.40", "0.45", "0.50")


@dataclass(frozen=True)
class FakeRun:
    """The shape of a hand-built run."""

    models: tuple[str, ...] = ("shapes-resnet",)
    interpreters: tuple[str, ...] = ("cam", "grad")
    target_maps: tuple[str, ...] = ("benign",)
    images: int = 4
    size: int = 64
    partial: bool = False  # drop the last ADV² rows of the last interpreter and their transfer rows
    seed: int = 0


def _picture(rng: np.random.Generator, size: int, kind: int) -> np.ndarray:
    background = tuple(int(v) for v in rng.integers(20, 90, 3))
    colour = tuple(int(v) for v in rng.integers(150, 255, 3))
    picture = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(picture)
    a, b = size // 4, 3 * size // 4
    if kind % 3 == 0:
        draw.ellipse((a, a, b, b), fill=colour)
    elif kind % 3 == 1:
        draw.rectangle((a, a, b, b), fill=colour)
    else:
        draw.polygon([(size // 2, a), (b, b), (a, b)], fill=colour)
    return np.asarray(picture)


def _blob(size: int, centre: tuple[float, float], width: float) -> np.ndarray:
    ys, xs = np.mgrid[0:size, 0:size] / size
    saliency = np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * width**2))
    return (saliency / saliency.max()).astype(np.float32)


def _save_overlay(image: np.ndarray, saliency: np.ndarray, path: Path) -> None:
    heat = colorize(np.asarray(Image.fromarray(saliency).resize(image.shape[1::-1], Image.BILINEAR))).astype(np.float32)
    blended = (0.5 * image + 0.5 * heat).round().clip(0, 255).astype(np.uint8)
    Image.fromarray(blended).resize((image.shape[1] * 4, image.shape[0] * 4), Image.NEAREST).save(path)


def build_run(run_dir: Path, spec: FakeRun = FakeRun()) -> Path:
    """Create ``run_dir`` with results.sqlite and every file its rows name; return ``run_dir``."""
    rng = np.random.default_rng(spec.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(run_dir / "results.sqlite")
    connection.execute("PRAGMA journal_mode=WAL")  # as the run's store writes it
    connection.executescript(SCHEMA)
    experiment = {
        "name": "fixture-run",
        "models": list(spec.models),
        "interpreters": list(spec.interpreters),
        "images": spec.images,
    }
    config = {"experiment": experiment, "overrides": {"pgd_steps": 2, "adv_steps": 2}}
    meta = {
        "config": json.dumps(config),
        "versions": json.dumps({"underfire": "0.1.0", "torch": "test"}),
        "created": "2024-01-01T00:00:00",
    }
    connection.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
    size = spec.size
    for model in spec.models:
        for index in range(spec.images):
            name = f"test-{index:05d}"
            true_class = index % 10
            target_class = (index + 3) % 10
            picture = _picture(rng, size, index)
            folder = run_dir / model / name
            folder.mkdir(parents=True, exist_ok=True)
            image_path = folder / "benign.png"
            Image.fromarray(picture).save(image_path)
            connection.execute(
                "INSERT INTO images VALUES (?, ?, ?, ?, ?, ?)",
                (model, name, index, true_class, target_class, str(image_path.relative_to(run_dir))),
            )
            for position, interpreter in enumerate(spec.interpreters):
                benign_map = _blob(16, (0.5, 0.5), 0.12 + 0.03 * position)
                benign_map_path = folder / f"{interpreter}.benign.npy"
                np.save(benign_map_path, benign_map)
                benign_overlay_path = folder / f"{interpreter}.benign.png"
                _save_overlay(picture, benign_map, benign_overlay_path)
                for target_map in spec.target_maps:
                    for attack in ("pgd", "adv2"):
                        last = index == spec.images - 1 and position == len(spec.interpreters) - 1
                        if spec.partial and attack == "adv2" and last:
                            continue
                        noise = rng.integers(-6, 7, picture.shape)
                        adversarial = (picture.astype(int) + noise).clip(0, 255).astype(np.uint8)
                        stem = f"{interpreter}.{attack}.{target_map}"
                        adversarial_path = folder / f"{stem}.png"
                        Image.fromarray(adversarial).save(adversarial_path)
                        if attack == "adv2":
                            saliency = _blob(16, (0.5 + rng.uniform(-0.04, 0.04), 0.5), 0.13 + 0.03 * position)
                            by_k = {k: float(np.clip(rng.normal(0.7, 0.1), 0, 1)) for k in KS}
                        else:
                            saliency = _blob(16, tuple(rng.uniform(0.1, 0.9, 2)), 0.08)
                            by_k = {k: float(np.clip(rng.normal(0.25, 0.1), 0, 1)) for k in KS}
                        map_path = folder / f"{stem}.npy"
                        np.save(map_path, saliency)
                        overlay_path = folder / f"{stem}.overlay.png"
                        _save_overlay(adversarial, saliency, overlay_path)
                        success = int(rng.random() < (0.9 if attack == "pgd" else 0.8))
                        difference = np.abs(saliency - benign_map)
                        connection.execute(
                            "INSERT INTO results VALUES (" + ", ".join("?" * 25) + ")",
                            (
                                model,
                                interpreter,
                                attack,
                                target_map,
                                name,
                                true_class,
                                target_class,
                                target_class if success else true_class,
                                success,
                                float(rng.uniform(0.3, 1.0)),
                                float(difference.mean()),
                                float(np.sqrt((difference**2).mean())),
                                float(np.mean(list(by_k.values()))),
                                json.dumps(by_k),
                                float(rng.uniform(0, 1)),
                                float(rng.uniform(-1, 1)),
                                8 / 255,
                                str(adversarial_path.relative_to(run_dir)),
                                str(map_path.relative_to(run_dir)),
                                str(overlay_path.relative_to(run_dir)),
                                str(benign_map_path.relative_to(run_dir)),
                                str(benign_overlay_path.relative_to(run_dir)),
                                float(rng.uniform(0.1, 3.0)),
                                spec.seed,
                                json.dumps({"eps": 8 / 255}),
                            ),
                        )
                        if attack == "adv2":
                            for target in spec.interpreters:
                                same = target == interpreter
                                iou = float(np.mean(list(by_k.values()))) if same else float(rng.uniform(0.2, 0.6))
                                connection.execute(
                                    "INSERT INTO transfer VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                                    (
                                        model,
                                        interpreter,
                                        target,
                                        target_map,
                                        name,
                                        float(rng.uniform(0, 0.2)),
                                        float(rng.uniform(0, 0.3)),
                                        iou,
                                    ),
                                )
    connection.commit()
    connection.close()
    return run_dir
