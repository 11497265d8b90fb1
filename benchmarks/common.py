"""Shared benchmark machinery: interleaved timing, paired ratios, models, inputs, result rows.

Every comparison runs its contenders in one process, on the same model, batch and inputs, after
warm-up, alternating them round by round (A B, B A, A B, ...) so that a slow spell of the machine
hits both. A round's ratio is ours / theirs measured back to back; the reported ratio is the median
over rounds (with the 25-75 % range of the rounds), which is far steadier than a ratio of two
separately taken medians when other processes share the CPU.

Per-step costs of iterative methods (PGD, ADV², MASK) are *marginal*: the time of a run with
``short + extra`` steps minus that of a run with ``short`` steps, divided by ``extra``. Set-up,
validation, final scoring and the like cancel, so what is compared is the cost of one more step.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

import underfire as uf
from underfire import Classifier

ROOT = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


#: Rounds are added (up to MAX_ROUNDS) until a comparison has run for at least this many seconds:
#: cheap comparisons get many rounds, which is what keeps their medians steady on a busy machine.
#: ``benchmarks.run --min-time`` sets it.
MIN_TIME = 0.0
MAX_ROUNDS = 101


def interleaved(
    contenders: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds per call of each contender, at least ``repeats`` rounds after ``warmup`` rounds.

    Each round runs every contender once; the order alternates between rounds (forward, then
    reversed) so neither side always runs right after the other's allocations. More rounds are run
    when ``repeats`` rounds would take less than ``MIN_TIME`` seconds (estimated from the last
    warm-up round).
    """
    names = list(contenders)
    round_time = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        for name in names:
            contenders[name]()
        round_time = time.perf_counter() - start
    rounds = repeats
    if MIN_TIME > 0 and round_time > 0:
        rounds = min(max(repeats, math.ceil(MIN_TIME / round_time)), max(repeats, MAX_ROUNDS))
    samples: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    for round_ in range(rounds):
        for name in names if round_ % 2 == 0 else names[::-1]:
            synchronize(device)
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)
            samples[name].append(time.perf_counter() - start)
    return samples


def marginal(long: list[float], short: list[float], extra: int) -> list[float]:
    """Per-round cost of one more step: (long − short) / extra."""
    return [(a - b) / extra for a, b in zip(long, short)]


@dataclass(frozen=True)
class Stat:
    """Median and 25/75 % quantiles of a list of samples."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, samples: list[float]) -> Stat:
        ordered = sorted(samples)
        if not ordered:
            return cls(math.nan, math.nan, math.nan)
        if len(ordered) == 1:
            return cls(ordered[0], ordered[0], ordered[0])
        q = statistics.quantiles(ordered, n=4, method="inclusive")
        return cls(statistics.median(ordered), q[0], q[2])


def paired_ratio(ours: list[float], theirs: list[float]) -> Stat:
    """Ratio ours/theirs of each round, summarised (median, quartiles). Rounds where either side
    is not positive (a marginal cost drowned in noise) are left out; none left gives NaN."""
    return Stat.of([a / b for a, b in zip(ours, theirs) if a > 0 and b > 0])


# ------------------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One comparison in the results table."""

    section: str
    name: str
    ours: str
    theirs: str
    ours_ms: float
    theirs_ms: float
    ratio: float
    ratio_low: float
    ratio_high: float
    #: "ratio <= X" or "ratio >= X" (a speed-up), or "" when the row is informative only
    target: str = ""
    met: bool | None = None
    agreement: str = ""
    note: str = ""
    setting: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def make_row(
    section: str,
    name: str,
    ours: str,
    theirs: str,
    ours_samples: list[float],
    theirs_samples: list[float],
    *,
    target: str = "",
    agreement: str = "",
    note: str = "",
    setting: dict[str, Any] | None = None,
    speedup: bool = False,
) -> Row:
    """Summarise paired samples; ``speedup`` reports theirs/ours (higher = we are faster)."""
    ratio = paired_ratio(theirs_samples, ours_samples) if speedup else paired_ratio(ours_samples, theirs_samples)
    met = None
    if target and math.isfinite(ratio.median):
        op, bound = target.split()[-2:]
        met = ratio.median <= float(bound) if op == "<=" else ratio.median >= float(bound)
    return Row(
        section,
        name,
        ours,
        theirs,
        1000 * statistics.median(ours_samples) if ours_samples else math.nan,
        1000 * statistics.median(theirs_samples) if theirs_samples else math.nan,
        ratio.median,
        ratio.low,
        ratio.high,
        target,
        met,
        agreement,
        note,
        dict(setting or {}),
    )


# ------------------------------------------------------------------------------------------ agreement
def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().float().cpu() - b.detach().float().cpu()).abs().max())


def minmax(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-sample min-max normalisation (underfire's convention), any shape (N, ...)."""
    flat = maps.flatten(1)
    low = flat.min(1, keepdim=True).values
    high = flat.max(1, keepdim=True).values
    return ((flat - low) / (high - low + eps)).view_as(maps)


def agreement(ours: torch.Tensor, theirs: torch.Tensor, atol: float) -> tuple[str, bool]:
    """'max abs diff …' (and the mean where they differ) and whether the max is within ``atol``
    (raises nothing: the table shows it)."""
    delta = (ours.detach().float().cpu() - theirs.detach().float().cpu().reshape(ours.shape)).abs()
    diff = float(delta.max())
    text = f"max abs diff {diff:.1e}"
    if diff > 0:
        text += f" (mean {float(delta.mean()):.1e})"
    return text + ("" if diff <= atol else f" > {atol:g}"), diff <= atol


# ------------------------------------------------------------------------------------------ models
#: Benchmark model names → underfire model specs (resnet50: random weights, nothing downloaded).
MODEL_SPECS = {
    "shapes-resnet": "shapes-resnet",
    "shapes-densenet": "shapes-densenet",
    "resnet50": "torchvision:resnet50@random",
    "densenet169": "torchvision:densenet169@random",
}


def load_classifier(name: str, device: torch.device | str = "cpu") -> Classifier:
    """A benchmark model by name (``shapes-resnet``, ``shapes-densenet``, ``resnet50``), eval mode."""
    spec = MODEL_SPECS.get(name, name)
    torch.manual_seed(0)  # resnet50's random weights: the same in every run
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's build-mismatch notice
        return uf.load_model(spec, device=str(device))


def inputs(
    clf: Classifier, batch: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images, labels, targets): shapes test images for the built-in models, seeded random
    images (labels = predictions) otherwise; targets = (label + 1) mod classes."""
    size = clf.input_size or 224
    if clf.name in ("shapes-resnet", "shapes-densenet"):
        images, labels, _ = uf.ShapesDataset("test").tensors(range(batch))
    else:
        images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
        labels = clf.predict(images.to(clf.device)).argmax(1).cpu()
    images, labels = images.to(device), labels.to(device)
    return images, labels, (labels + 1) % clf.num_classes


def untrained_rts(clf: Classifier, **options: Any) -> Any:
    """An RTS interpreter with a fresh (untrained) saliency network whose encoder predicts the
    model's classes (its cost does not depend on the weights); for models without a shipped one.
    ``options`` are RTS options (e.g. its encoder weights)."""
    from underfire.interpreters import Rts, SaliencyNetwork
    from underfire.models import ShapesResNet

    torch.manual_seed(0)
    network = SaliencyNetwork(clf.num_classes, ShapesResNet(num_classes=clf.num_classes)).eval()
    return Rts(clf, network, **options)


def import_torchvision_quietly() -> Any:
    """torchvision through underfire's compatibility shim (needed before pytorch-grad-cam)."""
    from underfire.models.torchvision_compat import import_torchvision

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return import_torchvision()


# ------------------------------------------------------------------------------------------ environment
def environment(threads: int, device: str) -> dict[str, Any]:
    """What the numbers were measured on."""
    info: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "device": device,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "git_commit": _git_commit(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    from importlib import metadata

    for package in ("captum", "torchcam", "grad-cam", "torchattacks", "torchray", "torchvision", "pyinstrument"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            info[package] = None
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=5
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
