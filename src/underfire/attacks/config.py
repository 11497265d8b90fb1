"""Attack configuration: budgets, step schedules and λ schedules (the presets: ``underfire.presets``).

Configuration objects are frozen dataclasses validated on construction, so a bad ε or a negative
step count fails before any work starts (with a one-line ``InputError``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from ..errors import InputError, UnderfireError
from ..options import check_seed, coerce_options, dataclass_options, parse_fraction

__all__ = ["AttackConfig", "LambdaSchedule", "parse_fraction"]


@dataclass(frozen=True)
class LambdaSchedule:
    """λ over the steps of stage 2.

    ``linear``: from ``values[0]`` to ``values[-1]`` (CAM, RTS, MASK: c → 2c).
    ``staged``: ``values[i]`` for the share ``fractions[i]`` of the steps (GRAD's 0.001 → 0.004 →
    0.01 → 0.05 over 301/201/101/101 steps in the official code).
    """

    values: tuple[float, ...] = (5.0, 10.0)
    mode: Literal["linear", "staged"] = "linear"
    fractions: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if not self.values or any(not math.isfinite(v) or v < 0 for v in self.values):
            raise InputError(f"λ values must be finite and >= 0, got {self.values}")
        if self.mode not in ("linear", "staged"):
            raise InputError(f"λ schedule mode must be 'linear' or 'staged', got {self.mode!r}")
        if self.mode == "staged":
            if self.fractions is None or len(self.fractions) != len(self.values):
                raise InputError("a staged λ schedule needs one step fraction per value")
            if any(f <= 0 for f in self.fractions):
                raise InputError(f"λ stage fractions must be positive, got {self.fractions}")

    def at(self, step: int, total: int) -> float:
        """λ at ``step`` (0-based) of ``total`` stage-2 steps."""
        if self.mode == "linear":
            if total <= 1 or len(self.values) == 1:
                return self.values[0]
            share = step / (total - 1)
            return self.values[0] + (self.values[-1] - self.values[0]) * share
        assert self.fractions is not None
        bound, position = 0.0, step / max(total, 1) * sum(self.fractions)
        for value, fraction in zip(self.values, self.fractions):
            bound += fraction
            if position < bound:
                return value
        return self.values[-1]

    def scaled(self, factor: float) -> LambdaSchedule:
        return replace(self, values=tuple(v * factor for v in self.values))

    @classmethod
    def from_value(cls, where: str, value: Any) -> LambdaSchedule:
        """A schedule from a config value: a schedule, a list of λ values, or a table
        ``{values, mode, fractions}`` (how presets and run configs write it)."""
        if isinstance(value, LambdaSchedule):
            return value
        if isinstance(value, str):
            value = [part for part in value.split(",") if part.strip()]
        if isinstance(value, (list, tuple)):
            value = {"values": value}
        if not isinstance(value, Mapping) or set(value) - {"values", "mode", "fractions"}:
            raise InputError(f"{where} must be a list of λ values or a table {{values, mode, fractions}}")
        try:
            return cls(
                values=tuple(parse_fraction(v) for v in value.get("values", ())),
                mode=value.get("mode", "linear"),
                fractions=None if value.get("fractions") is None else tuple(float(v) for v in value["fractions"]),
            )
        except UnderfireError as error:
            raise InputError(f"{where}: {error}") from None
        except (TypeError, ValueError):
            raise InputError(f"{where}: λ values must be numbers") from None


@dataclass(frozen=True)
class AttackConfig:
    """Everything that determines a PGD or ADV² run.

    Attributes:
        eps: L∞ budget in [0, 1] pixel units (default 8/255).
        alpha: step size of the sign-gradient steps (default 1/255).
        adv_alpha: stage-2 step size at its first step (default: ``alpha``).
        adv_alpha_final: stage-2 step size at its last step, reached by cosine decay (default:
            no decay). Small late steps let the map settle instead of jittering by ±α per pixel,
            which matters most for short schedules.
        pgd_steps: stage 1 (plain targeted PGD, the warm start) — also the whole PGD attack.
        adv_steps: stage 2 (the joint objective); 0 makes ADV² equal to PGD.
        lam: λ schedule for stage 2.
        lam_adaptation: per-sample λ control (1 = off, the schedule alone). After every stage-2
            step a sample's λ multiplier is multiplied by this factor when its iterate qualifies
            (classified as c_t with p ≥ ``confidence``) and divided by it otherwise, within
            ``lam_range``: each sample spends its own slack in the prediction constraint on the
            map, as C&W's search over its constant does between restarts (Carlini & Wagner 2017),
            instead of relying on a λ tuned for another model.
        lam_range: (lowest, highest) λ multiplier under ``lam_adaptation``.
        confidence: an ADV² iterate is eligible as the result when it is classified as the
            target with at least this probability; among eligible iterates the one with the
            smallest map distance wins (the official GRAD code uses 0.8).
        label_smoothing: for ℓ_prd's cross-entropy (the official GRAD code smooths labels).
        map_power: ℓ_int compares the maps raised to this power (1: the paper's squared
            difference of the maps themselves). Below 1 it stretches the many faint pixels that
            the squared difference all but ignores and that the top-k IoU still ranks: gradient
            maps of a model with peaked saliency (the built-in DenseNet) hold most of their ranks
            there (docs/tuning.md).
        soft_iou_weight: ℓ_int adds this weight × (1 − the soft top-k IoU of the two maps),
            ``metrics.soft_iou_top_k`` on the (powered) maps: the IoU test the maps are judged by,
            made differentiable, as Ghorbani et al. (AAAI 2019) made top-k intersection a loss.
            0 (default): the squared difference alone. It serves maps whose top-k sets a squared
            difference cannot hold: the built-in DenseNet's LRP maps (docs/tuning.md).
        random_start: begin stage 1 from a uniform random point of the ε-ball.
        seed: seeds the random start and stochastic interpreters.
        restarts: run the whole attack this many times and keep, per sample, the best result
            (successful first; then, for ADV², the smallest map distance; then the highest
            p(c_t)). The first run is the configured one; restart r starts from a random point
            of the ε-ball seeded with ``seed + r``. Restarts are how PGD evaluations avoid one
            unlucky trajectory (Madry et al. 2018; Croce & Hein's AutoAttack, 2020); the cost is
            ``restarts`` times the steps. PGD compared with an ADV² (``PGD.configure``) gets the
            same number.
        surrogate_options: options of the copy of the interpreter that ADV² differentiates,
            on top of the interpreter's own (e.g. ``{"steps": 8}`` for an 8-node IG attacking the
            32-node one). The interpreter given to the attack stays the one whose maps are judged
            (target maps and every measure); only the attack's gradient comes from the copy.
            Empty (default): the attack differentiates the judged interpreter itself.
        stop_patience: per-sample early stopping (0, default: off). A sample whose kept iterate
            meets the goal (PGD: classified as c_t with p ≥ ``confidence``; ADV²'s stage 2: that,
            and a map distance) and whose score (PGD: its cross-entropy; ADV²: the map
            distance) has not improved by more than ``stop_tolerance`` for this many steps
            leaves the batch, so later steps run on the others only. The kept iterate is chosen
            as without it; what changes is that a finished sample stops paying for steps (and, for
            an interpreter whose surrogate draws noise per batch, the noise the others see).
        stop_tolerance: the improvement of the score that resets a sample's patience.
        momentum: μ of MI-FGSM's accumulated direction (Dong et al. 2018): each step follows the
            sign of g ← μ·g + ∇/‖∇‖₁ instead of the sign of the gradient (0, default: plain
            sign-gradient steps, the paper's).
    """

    eps: float = 8 / 255
    alpha: float = 1 / 255
    adv_alpha: float | None = None
    adv_alpha_final: float | None = None
    pgd_steps: int = 300
    adv_steps: int = 1000
    lam: LambdaSchedule = field(default_factory=LambdaSchedule)
    lam_adaptation: float = 1.0
    lam_range: tuple[float, float] = (0.1, 10.0)
    confidence: float = 0.8
    label_smoothing: float = 0.0
    map_power: float = 1.0
    soft_iou_weight: float = 0.0
    random_start: bool = False
    seed: int = 0
    restarts: int = 1
    surrogate_options: Mapping[str, Any] = field(default_factory=dict)
    stop_patience: int = 0
    stop_tolerance: float = 1e-4
    momentum: float = 0.0

    def __post_init__(self) -> None:
        if not (0 < self.eps <= 1):
            raise InputError(f"eps must be in (0, 1] (pixel units; 8/255 ≈ 0.031), got {self.eps}")
        for name in ("alpha", "adv_alpha", "adv_alpha_final"):
            value = getattr(self, name)
            if value is not None and not (0 < value <= 1):
                raise InputError(f"{name} must be in (0, 1], got {value}")
        for name in ("pgd_steps", "adv_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"{name} must be an integer >= 0, got {value!r}")
        check_seed("seed", self.seed)
        if isinstance(self.restarts, bool) or not isinstance(self.restarts, int) or self.restarts < 1:
            raise InputError(f"restarts must be an integer >= 1 (1 = one run), got {self.restarts!r}")
        if self.pgd_steps + self.adv_steps == 0:
            raise InputError("the attack needs at least one step")
        if (
            isinstance(self.lam_adaptation, bool)
            or not isinstance(self.lam_adaptation, (int, float))
            or not (math.isfinite(self.lam_adaptation) and self.lam_adaptation >= 1)
        ):
            raise InputError(f"lam_adaptation must be a number >= 1 (1 = off), got {self.lam_adaptation!r}")
        # a list of λ values or a {values, mode, fractions} table, as run configs write it
        object.__setattr__(self, "lam", LambdaSchedule.from_value("lam", self.lam))
        low, high = _pair("lam_range", self.lam_range)
        if not 0 < low <= 1 <= high:
            raise InputError(f"lam_range must satisfy 0 < low <= 1 <= high, got {self.lam_range!r}")
        object.__setattr__(self, "lam_range", (low, high))
        if not 0 <= self.confidence < 1:
            raise InputError(f"confidence must be in [0, 1), got {self.confidence}")
        if not 0 <= self.label_smoothing < 1:
            raise InputError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if (
            isinstance(self.map_power, bool)
            or not isinstance(self.map_power, (int, float))
            or not (math.isfinite(self.map_power) and 0 < self.map_power <= 1)
        ):
            raise InputError(f"map_power must be a number in (0, 1] (1 = the paper's distance), got {self.map_power!r}")
        if (
            isinstance(self.soft_iou_weight, bool)
            or not isinstance(self.soft_iou_weight, (int, float))
            or not (math.isfinite(self.soft_iou_weight) and self.soft_iou_weight >= 0)
        ):
            raise InputError(f"soft_iou_weight must be a finite number >= 0 (0 = off), got {self.soft_iou_weight!r}")
        if not isinstance(self.surrogate_options, Mapping) or not all(
            isinstance(key, str) for key in self.surrogate_options
        ):
            raise InputError(
                f"surrogate_options must be a table of interpreter options, got {self.surrogate_options!r}"
            )
        object.__setattr__(self, "surrogate_options", dict(sorted(self.surrogate_options.items())))
        if isinstance(self.stop_patience, bool) or not isinstance(self.stop_patience, int) or self.stop_patience < 0:
            raise InputError(f"stop_patience must be an integer >= 0 (0 = off), got {self.stop_patience!r}")
        if (
            isinstance(self.stop_tolerance, bool)
            or not isinstance(self.stop_tolerance, (int, float))
            or not (math.isfinite(self.stop_tolerance) and self.stop_tolerance >= 0)
        ):
            raise InputError(f"stop_tolerance must be a finite number >= 0, got {self.stop_tolerance!r}")
        if (
            isinstance(self.momentum, bool)
            or not isinstance(self.momentum, (int, float))
            or not (math.isfinite(self.momentum) and 0 <= self.momentum < 1)
        ):
            raise InputError(f"momentum must be a number in [0, 1) (0 = off), got {self.momentum!r}")

    def stage_two_alpha(self, step: int) -> float:
        """Step size at ``step`` (0-based) of stage 2: ``adv_alpha`` cosine-decayed to ``adv_alpha_final``."""
        start = self.alpha if self.adv_alpha is None else self.adv_alpha
        if self.adv_alpha_final is None or self.adv_steps <= 1:
            return start
        share = min(step, self.adv_steps - 1) / (self.adv_steps - 1)
        return self.adv_alpha_final + (start - self.adv_alpha_final) * 0.5 * (1 + math.cos(math.pi * share))

    def with_overrides(self, **overrides: Any) -> AttackConfig:
        """A copy with some fields replaced (unknown names are an error)."""
        unknown = set(overrides) - set(self.__dataclass_fields__)
        if unknown:
            raise InputError(f"unknown attack option(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)

    def with_settings(self, where: str, settings: Mapping[str, Any]) -> AttackConfig:
        """``with_overrides`` from config-file values (``"1/255"``, λ lists): each converted to its
        field's type first; errors name ``where`` and the key."""
        return self.with_overrides(**coerce_options(where, settings, dataclass_options(type(self))))


def _pair(what: str, value: Any) -> tuple[float, float]:
    if isinstance(value, str):
        value = [part for part in value.split(",") if part.strip()]
    try:
        low, high = (parse_fraction(v) for v in value)
    except (TypeError, ValueError, UnderfireError):
        raise InputError(f"{what} must be two numbers (low, high), got {value!r}") from None
    return float(low), float(high)
