"""Targeted L∞ PGD and ADV², sharing one projected sign-gradient loop.

ADV² (Zhang et al., "Interpretable Deep Learning under Fire", USENIX Security 2020) minimises
    ℓ_prd(f(x), c_t) + λ · ℓ_int(g(x; f), m_t)   s.t. ‖x − x°‖∞ ≤ ε, x ∈ [0, 1]
with projected sign-gradient steps (Madry et al. 2018), in two stages: targeted PGD as a warm
start, then the joint objective. ℓ_int is the per-pixel mean squared distance between the
interpreter's differentiable map and the target map (maps min-max normalised to [0, 1]); the
interpreter may add terms of its own to either stage through ``Interpreter.attack_terms``
(RTS: its encoder's cross-entropy; MASK: deletion evidence inside ℓ_int).

Every iterate is scored; PGD keeps the iterate with the lowest ℓ_prd, ADV² the iterate that is
classified as c_t with probability ≥ ``confidence`` and has the smallest map distance (the
official GRAD code's rule, applied to every interpreter). Results are projected onto the 8-bit
grid inside the ε-ball, so what is returned is what a PNG file holds. With ``restarts`` > 1 the
whole attack runs again from seeded random starts and each sample keeps its best run.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import AttackError
from ..interpreters.base import Interpreter
from ..metrics import soft_iou_top_k
from ..models.classifier import Classifier
from .base import Attack, Iterates, project
from .config import AttackConfig

#: Added to the selection score of ADV² iterates that do not qualify (not c_t with p ≥ confidence),
#: so any qualifying iterate (score = map distance ≤ 1) ranks before them.
_UNQUALIFIED = 1000.0

#: objective(x, step, index) → (loss per sample, selection score per sample (lower is better),
#: eligible); ``index`` holds the batch positions of the samples in ``x`` (None: all of them, in
#: order), which shrinks as samples stop early (``AttackConfig.stop_patience``)
Objective = Callable[[torch.Tensor, int, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def _descend(
    origin: torch.Tensor,
    start: torch.Tensor,
    steps: int,
    config: AttackConfig,
    objective: Objective,
    best: torch.Tensor,
    best_score: torch.Tensor,
    best_step: torch.Tensor,
    step_offset: int = 0,
    step_size: Callable[[int], float] | None = None,
    done_below: float = -float("inf"),
) -> torch.Tensor:
    """``steps`` projected sign-gradient steps from ``start``; updates best/best_score in place.

    Every iterate, including the final one, is scored; returns the final iterate. ``step_size``
    maps the step index to α (default: the constant ``config.alpha``). With
    ``config.stop_patience`` > 0 a sample whose best score is at most ``done_below`` (it meets the
    attack's goal) and has not improved by more than ``config.stop_tolerance`` for that many
    steps leaves the batch: later steps run on the others only, and its final iterate is where
    it stopped. With ``config.momentum`` μ > 0 the step follows the sign of the accumulated
    direction g ← μ·g + ∇/‖∇‖₁ (per sample) instead of the gradient's (MI-FGSM, Dong et al. 2018).
    """
    x = start.detach().clone()
    patience = config.stop_patience
    active: torch.Tensor | None = None  # None: every sample, in order
    velocity = torch.zeros_like(x) if config.momentum else None
    if patience:
        stale = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        reference = torch.full_like(best_score, float("inf"))
    for step in range(steps + 1):
        current = x if active is None else x[active]
        current.requires_grad_(True)
        loss, score, eligible = objective(current, step, active)
        if step < steps:
            (gradient,) = torch.autograd.grad(loss.sum(), current)
        with torch.no_grad():
            score = score.detach()
            at = slice(None) if active is None else active
            improved = eligible & (score < best_score[at])
            chosen = torch.arange(x.shape[0], device=x.device)[at][improved]
            best[chosen] = current.detach()[improved]
            best_score[chosen] = score[improved]
            best_step[chosen] = step + step_offset
            if step < steps:
                alpha = config.alpha if step_size is None else step_size(step)
                direction = gradient
                if velocity is not None:
                    norm = gradient.abs().flatten(1).sum(1).clamp_min(1e-12).view(-1, *([1] * (gradient.dim() - 1)))
                    velocity[at] = config.momentum * velocity[at] + gradient / norm
                    direction = velocity[at]
                moved = project(current.detach() - alpha * direction.sign(), origin[at], config.eps)
                if active is None:
                    x = moved
                else:
                    x[active] = moved
            if patience and step < steps:
                better = best_score[at] < reference[at] - config.stop_tolerance
                reference[at] = torch.where(better, best_score[at], reference[at])
                stale[at] = torch.where(better, 0, stale[at] + 1)
                leaving = (best_score[at] <= done_below) & (stale[at] >= patience)
                if bool(leaving.any()):
                    every = torch.arange(x.shape[0], device=x.device) if active is None else active
                    active = every[~leaving]
                    if active.numel() == 0:
                        break
    return x.detach()


def _batch_part(values: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """The rows of a per-sample tensor that the samples still in the loop own (``Objective``)."""
    return values if index is None else values[index]


#: the floor under a powered map: keeps d(m^p)/dm finite at m = 0
_POWER_FLOOR = 1e-4


def map_distance(
    maps: torch.Tensor, target_maps: torch.Tensor, power: float = 1.0, soft_iou_weight: float = 0.0
) -> torch.Tensor:
    """ℓ_int per sample: the mean squared difference of two maps in [0, 1] (Zhang et al. 2020,
    §3.2), after raising both to ``power`` (``AttackConfig.map_power``; 1 leaves them as they are),
    plus ``soft_iou_weight`` × (1 − their soft top-k IoU) (``AttackConfig.soft_iou_weight``)."""
    if power != 1.0:
        maps, target_maps = (
            (_POWER_FLOOR + (1 - _POWER_FLOOR) * m.clamp(0, 1)).pow(power) for m in (maps, target_maps)
        )
    distance = (maps - target_maps).pow(2).flatten(1).mean(1)
    if soft_iou_weight:
        distance = distance + soft_iou_weight * (1 - soft_iou_top_k(maps, target_maps).mean(1))
    return distance


def _targeted_ce(logits: torch.Tensor, targets: torch.Tensor, smoothing: float = 0.0) -> torch.Tensor:
    return F.cross_entropy(logits, targets, reduction="none", label_smoothing=smoothing)


class PGD(Attack):
    """Targeted L∞ projected gradient descent on the cross-entropy towards c_t (Madry et al. 2018).

    ``config.pgd_steps`` steps of size ``alpha`` inside the ``eps`` ball; the iterate with the
    lowest loss is kept per sample.
    """

    name = "pgd"
    label = "PGD"
    description = "targeted L∞ projected gradient descent, the baseline that ignores the map (Madry et al. 2018)"
    uses_interpreter = False

    @classmethod
    def configure(cls, base: Sequence[AttackConfig], settings: Mapping[str, Any]) -> AttackConfig:
        """PGD spends the largest total step budget (``pgd_steps + adv_steps``) of the
        interpreters it is compared with, all of it in stage 1, and the most ``restarts`` of any,
        so it never gets fewer steps or runs than the ADV² it is compared with; ε, α and the other
        settings are the largest budget's interpreter's (the first one, on ties); ``settings``
        (``[attacks.pgd]``) apply last."""
        chosen = max(base, key=lambda c: c.pgd_steps + c.adv_steps)  # max keeps the first on ties
        runs = max(c.restarts for c in base)
        budget = replace(
            chosen, pgd_steps=chosen.pgd_steps + chosen.adv_steps, adv_steps=0, restarts=runs, surrogate_options={}
        )
        return budget.with_settings(f"attacks.{cls.name}", settings)

    def run(
        self, images: torch.Tensor, targets: torch.Tensor, target_maps: torch.Tensor | None, config: AttackConfig
    ) -> Iterates:
        """Stage 1 alone; PGD does not look at maps."""
        best, _, best_step, last = self._stage_one(images, targets, config)
        return Iterates(best, best_step, last)

    def _stage_one(
        self,
        images: torch.Tensor,
        targets: torch.Tensor,
        config: AttackConfig,
        extra: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Targeted PGD; ``extra`` (per-sample loss of x and the batch positions of its samples, or
        None) is added to the descent direction but not to the score, so the kept iterate is still
        the one the classifier finds closest to c_t."""
        clf = self.classifier
        start = images
        if config.random_start:
            generator = torch.Generator(images.device).manual_seed(config.seed)
            noise = torch.rand(images.shape, generator=generator, device=images.device) * 2 - 1
            start = project(images + config.eps * noise, images, config.eps)

        def objective(
            x: torch.Tensor, _step: int, index: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            loss = _targeted_ce(clf(x), _batch_part(targets, index))
            added = None if extra is None else extra(x, index)
            descent = loss if added is None else loss + added
            return descent, loss, torch.ones_like(loss, dtype=torch.bool)

        best = start.detach().clone()
        best_score = torch.full((images.shape[0],), float("inf"), device=images.device)
        best_step = torch.full((images.shape[0],), -1, dtype=torch.long, device=images.device)
        # done: classified as c_t with p ≥ confidence, i.e. a cross-entropy of at most −log(confidence)
        done = -math.log(config.confidence) if config.confidence > 0 else float("inf")
        last = _descend(
            images, start, config.pgd_steps, config, objective, best, best_score, best_step, done_below=done
        )
        return best, best_score, best_step, last


class ADV2(PGD):
    """The ADV² attack against one interpreter (Zhang et al. 2020), sharing PGD's loop.

    Args:
        classifier: the model under attack.
        config: budgets and schedules (``underfire.presets.preset`` gives a preset's).
        interpreter: the interpreter whose map must keep looking benign (the judged one: its maps
            are the default targets). The attack differentiates its copy built with
            ``config.surrogate_options`` (the interpreter itself when there are none): that
            copy's ``surrogate`` supplies the differentiable map (GRAD: smoothed second order;
            CAM: itself; RTS: itself; MASK: the unrolled inner optimisation) and its
            ``attack_terms`` any terms of its own.
    """

    name = "adv2"
    label = "ADV²"
    description = "PGD warm start, then prediction loss + λ·map distance (Zhang et al. 2020)"
    uses_interpreter = True

    def __init__(
        self, classifier: Classifier, config: AttackConfig | None = None, *, interpreter: Interpreter | None = None
    ) -> None:
        super().__init__(classifier, config, interpreter=interpreter)
        assert self.interpreter is not None
        options = self.config.surrogate_options
        #: the copy of the interpreter the attack differentiates (``AttackConfig.surrogate_options``);
        #: the interpreter itself (the judged one) gives the default target maps
        self.surrogate: Interpreter = self.interpreter.with_options(**options) if options else self.interpreter

    #: ADV² is configured per interpreter (the base rule), not with PGD's shared budget
    configure = classmethod(Attack.configure.__func__)  # type: ignore[attr-defined]

    @staticmethod
    def second_order() -> AbstractContextManager[Any]:
        """Where stage 2 differentiates a map that is itself a gradient: attention through the
        plain (math) kernel of ``F.scaled_dot_product_attention``, since the fused kernels (flash,
        memory-efficient) have no double backward. Models without attention are unaffected."""
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError:  # torch before 2.3: no kernel choice, the math kernel is the default on CPU
            return nullcontext()
        return sdpa_kernel(SDPBackend.MATH)

    def prepare(self) -> None:
        """Refuse, in one line, a surrogate that cannot give the attack a map gradient."""
        if self.config.adv_steps > 0:
            self.surrogate.check_attackable()

    def run(
        self, images: torch.Tensor, targets: torch.Tensor, target_maps: torch.Tensor | None, config: AttackConfig
    ) -> Iterates:
        """The two stages: PGD as the warm start, then the joint objective on the surrogate's map."""
        assert target_maps is not None
        interpreter = self.surrogate

        def warm_start_extra(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor | None:
            terms = interpreter.attack_terms(
                "warm_start", x, _batch_part(targets, index), _batch_part(target_maps, index)
            )
            return None if terms is None else terms.extra

        best, stage_one_loss, best_step, last = self._stage_one(images, targets, config, warm_start_extra)
        state: Any = interpreter.initial_state(config.seed, images.device)
        lam = config.lam
        # Stage 2 selects lexicographically: an iterate classified as c_t with p ≥ confidence
        # beats every other one and among those the smallest map distance wins; a sample that
        # never qualifies keeps its lowest-cross-entropy iterate of either stage.
        best_score = torch.full((images.shape[0],), float("inf"), device=images.device)
        distances = torch.full((images.shape[0],), float("nan"), device=images.device)
        # per-sample λ multiplier (config.lam_adaptation)
        multiplier = torch.ones(images.shape[0], device=images.device)
        low, high = config.lam_range
        held: torch.Tensor | None = None  # the batch positions the surrogate's state holds (None: all)

        def objective(
            x: torch.Tensor, step: int, index: torch.Tensor | None
        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            nonlocal state, multiplier, held
            if index is not None and (held is None or held.numel() != index.numel()):
                # samples stopped early: the state keeps the others' rows only
                kept = torch.isin(torch.arange(images.shape[0], device=index.device) if held is None else held, index)
                state, held = interpreter.keep_samples(state, kept), index
            classes, wanted = _batch_part(targets, index), _batch_part(target_maps, index)
            # one forward for the map and the logits where the interpreter allows it
            maps, logits, state = interpreter.surrogate_and_logits(x, classes, state)
            terms = interpreter.attack_terms("joint", x, classes, wanted, state)
            distance = map_distance(maps, wanted, config.map_power, config.soft_iou_weight)
            interpretation = distance
            if terms is not None and terms.interpretation is not None:
                interpretation = distance + terms.interpretation
            if step == 0:
                _check_interpretation_gradient(interpretation, x, interpreter)
            loss = _targeted_ce(logits, classes, config.label_smoothing)
            weight = lam.at(min(step, config.adv_steps - 1), config.adv_steps) * _batch_part(multiplier, index)
            loss = loss + weight * interpretation
            if terms is not None and terms.extra is not None:
                loss = loss + terms.extra
            with torch.no_grad():
                probability = logits.softmax(1).gather(1, classes[:, None]).squeeze(1)
                eligible = (logits.argmax(1) == classes) & (probability >= config.confidence)
                fallback = _UNQUALIFIED + _targeted_ce(logits, classes)
                score = torch.where(eligible, distance.detach(), fallback)
                factor = torch.where(eligible, config.lam_adaptation, 1 / config.lam_adaptation)
                # stays 1 when adaptation is off
                updated = (_batch_part(multiplier, index) * factor).clamp(low, high)
                if index is None:
                    multiplier = updated
                else:
                    multiplier[index] = updated
            return loss, score, torch.ones_like(eligible)

        if config.adv_steps > 0:
            stage_two_best, stage_two_step = best.clone(), best_step.clone()
            with self.second_order():
                last = _descend(
                    images,
                    best,
                    config.adv_steps,
                    config,
                    objective,
                    stage_two_best,
                    best_score,
                    stage_two_step,
                    step_offset=config.pgd_steps,
                    step_size=config.stage_two_alpha,
                    done_below=_UNQUALIFIED - 1,  # qualified: a map distance, never the fallback's 1000 + CE
                )
            qualified = best_score < _UNQUALIFIED
            closer = ~qualified & (best_score - _UNQUALIFIED < stage_one_loss)
            use = qualified | closer
            best = torch.where(use[:, None, None, None], stage_two_best, best)
            best_step = torch.where(use, stage_two_step, best_step)
            distances = torch.where(qualified, best_score, distances)
        return Iterates(best, best_step, last, distances)


def _check_interpretation_gradient(interpretation: torch.Tensor, x: torch.Tensor, interpreter: Interpreter) -> None:
    """Stop when ℓ_int has no input gradient: the joint objective would then be ℓ_prd alone, an
    ADV² that is PGD in disguise. Costs one backward, once."""
    if interpretation.requires_grad:
        (gradient,) = torch.autograd.grad(interpretation.sum(), x, retain_graph=True, allow_unused=True)
        if gradient is not None and bool((gradient != 0).any()) and bool(torch.isfinite(gradient).all()):
            return
        if gradient is not None and not bool(torch.isfinite(gradient).all()):
            raise AttackError(f"ADV² against {interpreter.name}: the map distance has a non-finite input gradient")
    raise AttackError(
        f"ADV² against {interpreter.name}: the map distance has no input gradient on {interpreter.classifier.name} "
        "(the interpreter's surrogate does not reach the model), so the attack would be plain PGD; "
        "underfire models --describe SPEC says what each interpreter can do"
    )
