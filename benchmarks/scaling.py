"""Scaling: images per second against batch size, and peak memory per image, per attack step.

One step is what the attacks do per iteration: for PGD, forward + cross-entropy + input gradient +
projection; for ADV² against an interpreter, the interpreter's ``surrogate_and_logits`` and
``attack_terms`` + the ADV² loss + input gradient + projection, carrying the interpreter's state from step to step as ``ADV2`` does (the "limit"
section shows ADV2's own step costs the same as this, within noise). Target maps are random (the
cost does not depend on them). Steps are timed after a warm-up step (which also lets MASK make its
initial state), median of the repeats; images/s = batch / median step time.

Peak memory is measured in a separate process (``python -m benchmarks.memory``), because on the
CPU it is read from the kernel's resident-set high-water mark, reset before the step, with glibc
told to return every large block to the kernel when it is freed (MALLOC_MMAP_THRESHOLD_); that
setting would slow down the timed runs. On CUDA it is ``torch.cuda.max_memory_allocated``. It is
the peak above what was resident before the step (model, inputs), per image.

Built-in models at 64×64 and torchvision's ResNet-50 (random weights) at 224. RTS on ResNet-50
uses an untrained saliency network (no trained one ships for it; the cost does not depend on
the weights). Larger batches of a method are skipped once one step takes longer than
``--max-step-s`` (SmoothGrad's 16 noisy copies with second-order backward at 224 px, on a CPU).
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from underfire import Classifier
from underfire.attacks import project
from underfire.attacks.core import map_distance
from underfire.interpreters import MaskConfig, Rts, build_interpreter
from underfire.runs.memory import cpu_peaks_measurable, measure_peak

from .common import ROOT, inputs, load_classifier, synchronize, untrained_rts

METHODS = ("pgd", "grad", "smoothgrad", "cam", "gradcam", "rts", "mask")
EPS, ALPHA, LAMBDA = 8 / 255, 1 / 255, 5.0
#: MASK as the ``quick`` preset runs it: the paper's surrogate step plus ``Mask.evidence_loss``
#: (with the follower's optimality gap) inside ℓ_int.
MASK_WITH_EVIDENCE = "mask+evidence"


def interpreter_for(method: str, clf: Classifier) -> Any:
    """The interpreter of a step-cost row: MASK with a short initial solve, the paper's surrogate
    alone (``mask``) or with the quick preset's evidence term (``mask+evidence``)."""
    if method == "rts":
        try:
            return Rts(clf)
        except Exception:  # noqa: BLE001 - no shipped network for this model: an untrained one
            return untrained_rts(clf)
    if method == MASK_WITH_EVIDENCE:
        return build_interpreter("mask", clf, config=MaskConfig(init_steps=5))
    if method == "mask":
        return build_interpreter("mask", clf, config=MaskConfig(init_steps=5), evidence_weight=0.0)
    return build_interpreter(method, clf)


def make_step(
    method: str, clf: Classifier, images: torch.Tensor, targets: torch.Tensor, interpreter: Any = None
) -> Callable[[], torch.Tensor]:
    """A callable doing one attack step and returning the new iterate (state carried between calls,
    as in the attack); ``interpreter`` replaces ``interpreter_for(method)``'s."""
    current = {"x": images.clone()}
    if method == "pgd":

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(clf(x), targets, reduction="none")

    else:
        interpreter = interpreter_for(method, clf) if interpreter is None else interpreter
        generator = torch.Generator().manual_seed(1)
        target_maps = torch.rand((images.shape[0], 1, *interpreter.map_shape(images)), generator=generator)
        target_maps = target_maps.to(images.device)
        state = {"value": interpreter.initial_state(0, images.device)}

        def loss_of(x: torch.Tensor) -> torch.Tensor:
            maps, logits, state["value"] = interpreter.surrogate_and_logits(x, targets, state["value"])
            # the interpreter's own terms (RTS's encoder, MASK's evidence), as ADV² adds them
            terms = interpreter.attack_terms("joint", x, targets, target_maps, state["value"])
            interpretation = map_distance(maps, target_maps)
            if terms is not None and terms.interpretation is not None:
                interpretation = interpretation + terms.interpretation
            loss = F.cross_entropy(logits, targets, reduction="none") + LAMBDA * interpretation
            return loss if terms is None or terms.extra is None else loss + terms.extra

    def step() -> torch.Tensor:
        with clf.frozen():
            x = current["x"].requires_grad_(True)
            (gradient,) = torch.autograd.grad(loss_of(x).sum(), x)
            current["x"] = project(x.detach() - ALPHA * gradient.sign(), images, EPS)
        return current["x"]

    return step


def run_scaling(
    model: str,
    methods: tuple[str, ...],
    batches: tuple[int, ...],
    *,
    repeats: int,
    max_step_s: float,
    device: str,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Images/s for every (method, batch) within budget: {"model", "size", "points": [...]}."""
    clf = load_classifier(model, device)
    size = clf.input_size or 224
    points = []
    for method in methods:
        skip = False
        for batch in batches:
            if skip:
                points.append({"method": method, "batch": batch, "images_per_s": None, "skipped": "over budget"})
                continue
            images, _, targets = inputs(clf, batch, device)
            step = make_step(method, clf, images, targets)
            step()  # warm-up (and MASK's initial state)
            times = []
            for _ in range(repeats):
                synchronize(device)
                start = time.perf_counter()
                step()
                synchronize(device)
                times.append(time.perf_counter() - start)
                if times[-1] > max_step_s:
                    break
            median = statistics.median(times)
            points.append({"method": method, "batch": batch, "step_ms": 1000 * median, "images_per_s": batch / median})
            log(f"  scaling {model} {method} batch {batch}: {batch / median:.3g} images/s")
            # the next batch is twice as large: stop before a step would exceed the budget
            skip = 2 * median > max_step_s
    return {"model": model, "size": size, "points": points}


def measure_memory(model: str, plan: dict[str, list[Any]], device: str, timeout: float) -> dict[str, dict[int, float]]:
    """Peak MiB per image for each (method, batch) in ``plan`` ({method: [[batch, step_ms], ...]}),
    from a separate process; {} if it fails or runs out of time."""
    env = dict(os.environ)
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    command = [
        sys.executable,
        "-m",
        "benchmarks.memory",
        "--model",
        model,
        "--device",
        device,
        "--plan",
        json.dumps(plan),
    ]
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"  memory: {model} timed out after {timeout:.0f} s", file=sys.stderr)
        return {}
    if done.returncode != 0:
        print(done.stderr[-2000:], file=sys.stderr)
        return {}
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    return {method: {int(b): v for b, v in values.items()} for method, values in raw.items()}


def peak_step_memory(step: Callable[[], None], device: str) -> float:
    """Peak bytes above the resident level during one call of ``step`` (``runs.memory.measure_peak``)."""
    before, peak = measure_peak(step, torch.device(device) if device.startswith("cuda") else None)
    return float(max(0, peak - before))


def memory_supported(device: str) -> bool:
    if device.startswith("cuda"):
        return torch.cuda.is_available()
    return cpu_peaks_measurable()


def format_table(result: dict[str, Any], memory: dict[str, dict[int, float]], batches: tuple[int, ...]) -> list[str]:
    """Markdown: one row per method, one column per batch: images/s (MiB per image)."""
    lines = [
        f"**{result['model']}** at {result['size']}×{result['size']}: images/s (peak MiB per image)",
        "",
        "| step | " + " | ".join(f"batch {b}" for b in batches) + " |",
        "| --- |" + " --- |" * len(batches),
    ]
    by_key = {(p["method"], p["batch"]): p for p in result["points"]}
    methods = list(dict.fromkeys(p["method"] for p in result["points"]))
    for method in methods:
        cells = []
        for batch in batches:
            point = by_key.get((method, batch))
            if point is None or point.get("images_per_s") is None:
                cells.append("–")
                continue
            per_batch = memory.get(method, {})
            mib = per_batch.get(batch, per_batch.get(str(batch)))  # str keys after a JSON round trip
            cell = f"{point['images_per_s']:.3g}"
            if mib is not None and math.isfinite(mib):
                cell += f" ({mib:.1f})"
            cells.append(cell)
        label = "PGD" if method == "pgd" else f"ADV² {method}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines
