"""MASK: the perturbation-guided interpreter ("meaningful perturbation", Fong & Vedaldi, ICCV 2017).

The map is the solution of an optimisation rather than a formula: find the smallest, smoothest
region whose deletion destroys the prediction,

    min_m  f_c(φ(x; m)) + λ1·‖1 − m‖₁ + λ2·TV_β(m),   0 ≤ m ≤ 1,
    φ(x; m) = x·M + blur(x)·(1 − M),   M = blur(upsample(m)),

where ``m`` is a low-resolution mask (m = 1 keeps a pixel, m = 0 replaces it by the blurred image)
and ``f_c`` is the softmax probability of class ``c``. The saliency is where the mask deletes,
``1 − m`` ("high = important" like every other interpreter), min-max normalised per image and
returned at mask resolution (N, 1, h, w) — 16×16 at 64 px, 28×28 at 224 (``MaskConfig``): small,
exact (no interpolation artefacts), and the resolution the ADV² attack compares maps at;
upsample them (bilinear) to overlay them on the image.

For the attack (Zhang et al., USENIX Security 2020, Eq. 10) the map is ``m*(x) = argmin_m ℓ_map``:
a bilevel problem. ``Mask.surrogate`` implements the paper's alternating approximation: a few
plain optimiser steps on ``ℓ_map(m; x.detach())`` carried in a ``MaskState`` from call to call,
then the map after ``unrolled_steps`` *virtual* gradient steps ``m' = m − ξ·∇_m ℓ_map(m; x)``
(by default preconditioned by the inner Adam's scale) differentiated through (``create_graph``),
so ∂map/∂x exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..imaging import gaussian_blur, translate, upsample_blurred
from ..models.classifier import Classifier
from ..options import OptionSpec, dataclass_options
from .base import AttackStage, AttackTerms, Interpreter, normalize_maps

#: Reference input side and mask side of Fong & Vedaldi (224 px images, 28×28 masks).
REFERENCE_SIZE = 224
REFERENCE_MASK_PIXELS = 28 * 28
#: Reference blur of the replacement image (σ = 10 px at 224 px).
REFERENCE_BLUR_SIGMA = 10.0
#: Reference jitter (a few pixels at 224 px).
REFERENCE_JITTER = 4
#: Inputs smaller than this use the small-image defaults (mask stride 4, blur σ = 5 px at 64).
SMALL_INPUT = 128
SMALL_BLUR_SIGMA = 5.0
#: Keeps the TV_β term twice differentiable where the mask is flat (β/2 < 1 derivative at 0).
TV_EPS = 1e-8
_ADAM_BETAS = (0.9, 0.999)
#: Weight of the keep-only-the-region term in ``Mask.evidence_loss`` relative to the deletion term.
PRESERVE_WEIGHT = 0.1
_ADAM_EPS = 1e-8


@dataclass(frozen=True)
class MaskConfig:
    """Settings of MASK: Fong & Vedaldi's, scaled to the input size, tuned where noted.

    Reference (ICCV 2017 and the official ADV² code): 28×28 mask at 224 px (8×8 at 32 px),
    replacement blur σ = 10 px at 224, λ1 = 1e-4 (L1, a sum over mask cells), λ2 = 1e-2
    (TV_β, a sum), β = 3, Adam lr 0.1, 300-400 iterations from m = 0.5, jitter. The
    measurements behind each departure from it are in docs/tuning.md.

    * ``mask_stride`` (None = by input size): the mask has ``round(H/stride) × round(W/stride)``
      cells, stride 8 for inputs of at least 128 px (28×28 at 224: the reference), 4 below (8×8 at
      32 px: the official ADV² CIFAR setting; 16×16 at 64). The mask is upsampled bilinearly to
      the input and blurred with σ = ``mask_blur_sigma`` (None = H/40 px; 1.6 at 64).
    * ``blur_sigma`` (None = by input size): σ of the blur that makes the replacement image:
      10·H/224 at ≥ 128 px (the reference), 5·H/64 below (5 px at 64). Tuned: at 64 px the scaled
      reference σ = 2.9 blurs too little for the replacement to delete the object
      (docs/tuning.md).
    * ``l1_weight`` (λ1 = 1e-3) and ``tv_weight`` (λ2 = 1e-2), ``tv_beta`` (β = 3).
      Normalisation: both terms are sums over mask cells, as in the reference, multiplied by
      ``784 / cells`` so that λ means what it means for the reference 28×28 mask at any
      resolution (the same price for deleting the same fraction of the image; equivalently
      λ·784·mean). λ1 is 10× the reference: with the reference λ1 the masks of the (very
      confident) built-in models delete far more than the object (docs/tuning.md).
    * ``learning_rate`` 0.1 (Adam), ``iterations`` 300, from ``init_value`` = 0 (everything
      deleted; tuned, the reference starts at 0.5): starting deleted keeps p low and its
      gradient alive, so L1 restores every cell the class does not need, whereas from 0.5 the
      saturated softmax of the built-in models gives no gradient and the mask can end empty
      (docs/tuning.md). m is clamped to [0, 1] after every step.
    * ``jitter`` (None = ``round(4·H/224)``, at least 1): each step the perturbed image is shifted
      by a random (dy, dx), |dy|, |dx| ≤ jitter px, reflected at the border. One shift per step
      for the whole batch, drawn from the call's generator, so a batch gives the same maps as
      single-image calls with the same seed. 0 disables it.
    * ``seed``: seeds the jitter when ``explain``/``solve`` get no generator (deterministic maps
      by default).
    * Attack surrogate (``Mask.surrogate``): without a state, ``init_steps`` Adam steps from
      ``init_value`` (None = ``iterations``: the full benign solve, without jitter); then per
      call ``inner_steps`` Adam steps on the detached image, then ``unrolled_steps``
      differentiable virtual steps of size ``xi``. ``precondition`` (default True) divides the
      virtual step by the inner Adam's √v̂ (detached): the step the follower actually takes, so
      it moves cells by about ``xi`` whatever the gradient's scale (softmax probabilities give
      gradients of 1e-3 and less); False is the paper's plain ``m − ξ·∇_m ℓ_map``.
      ``resolve_every`` > 0 restarts the mask from ``init_value`` (``init_steps`` steps) every
      that many calls (the official code: 50). ``surrogate_jitter`` (default True): the unrolled
      steps and ``evidence_loss`` see the perturbed image shifted by a random jitter drawn like
      the solver's, one per attack step (expectation over transformation, Athalye et al., ICML
      2018). Why: the solver jitters, and an adversarial image tuned on the unshifted image
      alone loses c_t under a 1-px shift, so the solver would explain another class
      (docs/tuning.md). The inner steps of the follower stay unshifted.
    * ``evidence_weight`` (default 0.5; the ``paper`` preset sets 0, the paper's attack): weight,
      inside ℓ_int (so also scaled by λ), of ``evidence_loss`` in ADV²'s joint stage
      (``Mask.attack_terms``; underfire's addition to the paper's bilevel surrogate).
    * ``gap_weight`` (default 5): weight of the follower's optimality gap inside
      ``evidence_loss`` (a value-function penalty for the bilevel problem; see there). 0 turns it
      off. Only the attack uses it, and only where ``evidence_weight`` > 0.
    """

    iterations: int = 300
    learning_rate: float = 0.1
    l1_weight: float = 1e-3
    tv_weight: float = 1e-2
    tv_beta: float = 3.0
    mask_stride: int | None = None
    blur_sigma: float | None = None
    mask_blur_sigma: float | None = None
    init_value: float = 0.0
    jitter: int | None = None
    seed: int = 0
    inner_steps: int = 1
    unrolled_steps: int = 1
    xi: float = 0.1
    precondition: bool = True
    init_steps: int | None = None
    resolve_every: int = 0
    surrogate_jitter: bool = True
    evidence_weight: float = 0.5
    gap_weight: float = 5.0

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None and f.name in _OPTIONAL:
                continue
            if f.name in _BOOLEANS:
                if not isinstance(value, bool):
                    raise InputError(f"MaskConfig.{f.name} must be True or False, got {value!r}")
            elif f.name in _INTEGERS:
                if isinstance(value, bool) or not isinstance(value, int):
                    raise InputError(f"MaskConfig.{f.name} must be an integer, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise InputError(f"MaskConfig.{f.name} must be a finite number, got {value!r}")
        positive = ("iterations", "learning_rate", "mask_stride", "tv_beta", "unrolled_steps", "xi")
        for name in positive:
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise InputError(f"MaskConfig.{name} must be positive, got {value!r}")
        non_negative = (
            "l1_weight",
            "tv_weight",
            "blur_sigma",
            "mask_blur_sigma",
            "jitter",
            "seed",
            "inner_steps",
            "init_steps",
            "resolve_every",
            "evidence_weight",
            "gap_weight",
        )
        for name in non_negative:
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InputError(f"MaskConfig.{name} must be >= 0, got {value!r}")
        if not 0.0 <= self.init_value <= 1.0:
            raise InputError(f"MaskConfig.init_value must be in [0, 1], got {self.init_value!r}")

    # ---------------------------------------------------------------- sizes derived from the input
    def stride(self, height: int, width: int) -> int:
        """Input pixels per mask cell (8 from 128 px up, 4 below, unless set)."""
        if self.mask_stride is not None:
            return self.mask_stride
        return 8 if min(height, width) >= SMALL_INPUT else 4

    def mask_shape(self, height: int, width: int) -> tuple[int, int]:
        """Mask cells for an input of ``height × width`` (at least 1×1)."""
        stride = self.stride(height, width)
        return max(1, round(height / stride)), max(1, round(width / stride))

    def image_sigma(self, height: int, width: int) -> float:
        """σ (px) of the replacement blur at this input size."""
        if self.blur_sigma is not None:
            return self.blur_sigma
        side = min(height, width)
        if side >= SMALL_INPUT:
            return REFERENCE_BLUR_SIGMA * side / REFERENCE_SIZE
        return SMALL_BLUR_SIGMA * side / 64.0

    def mask_sigma(self, height: int, width: int) -> float:
        """σ (px) of the blur applied to the upsampled mask."""
        return self.mask_blur_sigma if self.mask_blur_sigma is not None else min(height, width) / 40.0

    def jitter_pixels(self, height: int, width: int) -> int:
        """Largest jitter shift (px) at this input size (never more than the image allows)."""
        jitter = self.jitter
        if jitter is None:
            jitter = max(1, round(REFERENCE_JITTER * min(height, width) / REFERENCE_SIZE))
        return min(jitter, height - 1, width - 1)


_BOOLEANS = {"precondition", "surrogate_jitter"}
_INTEGERS = {
    "iterations",
    "mask_stride",
    "jitter",
    "seed",
    "inner_steps",
    "unrolled_steps",
    "init_steps",
    "resolve_every",
}
_OPTIONAL = {"mask_stride", "blur_sigma", "mask_blur_sigma", "jitter", "init_steps"}


@dataclass(frozen=True)
class MaskSolution:
    """Result of ``Mask.solve``: the mask m (N, 1, h, w) in [0, 1] (1 = keep, detached) and the
    objective of every sample at every iteration, ``history`` (iterations, N), measured before
    each step's update."""

    mask: torch.Tensor
    history: torch.Tensor


@dataclass(frozen=True)
class MaskState:
    """What the attack surrogate carries between calls: the current mask m (detached), its Adam
    moments, the Adam step count, the number of surrogate calls so far (``step``), the generator
    of the surrogate's jitter and the shift (dy, dx) the last call used (None: no jitter), which
    ``evidence_loss`` reuses in the same attack step."""

    mask: torch.Tensor
    exp_avg: torch.Tensor
    exp_avg_sq: torch.Tensor
    adam_steps: int
    step: int
    generator: torch.Generator | None = None
    shift: tuple[int, int] | None = None


class Mask(Interpreter):
    """Fong & Vedaldi's meaningful-perturbation mask, batched, with the ADV² bilevel surrogate.

    ``Mask(classifier, config)`` or ``Mask(classifier, iterations=100, ...)``: keyword arguments
    replace fields of ``config`` (default ``MaskConfig()``); they are MASK's options.
    """

    name: ClassVar[str] = "mask"
    description: ClassVar[str] = "meaningful perturbation mask (Fong & Vedaldi 2017)"
    paper_class: ClassVar[str] = "perturbation"
    #: an empty map is an answer here, not a sign that nothing reaches the class score
    refuses_constant_maps = False

    def __init__(self, classifier: Classifier, config: MaskConfig | None = None, **fields: object) -> None:
        super().__init__(classifier)
        if config is None:
            config = MaskConfig()
        if not isinstance(config, MaskConfig):
            raise InputError(f"config must be a MaskConfig, got {type(config).__name__}")
        unknown = sorted(set(fields) - set(MaskConfig.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"unknown MASK option {unknown[0]!r} (known: {', '.join(MaskConfig.__dataclass_fields__)})"
            )
        self.config = replace(config, **fields) if fields else config

    @classmethod
    def option_specs(cls) -> dict[str, OptionSpec]:
        """MASK's options are the fields of ``MaskConfig``."""
        return dataclass_options(MaskConfig)

    def pilot_options(self, scale: float) -> dict[str, Any]:
        """MASK's solves cut to ``scale`` of their iterations (the benign and the measured maps, the
        attack's start and re-solves); re-solves come ``scale`` times as often, so that their total
        cost, like every other part, is proportional to ``scale``."""
        config = self.config
        cut = {"iterations": max(1, round(config.iterations * scale))}
        if config.init_steps is not None:
            cut["init_steps"] = max(1, round(config.init_steps * scale))
        if config.resolve_every:
            cut["resolve_every"] = max(1, round(config.resolve_every * scale))
        return cut

    def map_shape(self, images: torch.Tensor) -> tuple[int, int]:
        """The mask's cells for this input size (arithmetic: no optimisation is run)."""
        return self.config.mask_shape(*images.shape[-2:])

    # ------------------------------------------------------------------ benign maps
    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Saliency ``1 − m`` (N, 1, h, w) of the solved masks (mask resolution), min-max normalised."""
        solution = self.solve(images, classes, generator=generator)
        return normalize_maps(1.0 - solution.mask)

    def solve(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> MaskSolution:
        """Optimise all N masks together (losses summed: each mask gets its own gradient, and Adam
        is per element, so samples do not interact), with seeded jitter; return masks and history.

        Run inside ``classifier.frozen()`` (``Interpreter.__call__`` does) so no parameter
        gradient is built; only ``torch.autograd.grad`` with respect to the mask is used.
        """
        cfg = self.config
        images = images.detach().contiguous()  # NCHW once: ``perturb`` works in it every step
        classes = torch.as_tensor(classes, device=images.device).long().view(-1)
        if generator is None:
            generator = torch.Generator(images.device).manual_seed(cfg.seed)
        jitter = cfg.jitter_pixels(*images.shape[-2:])
        blurred = self._blur_images(images)
        mask = self._initial_mask(images)
        exp_avg, exp_avg_sq = torch.zeros_like(mask), torch.zeros_like(mask)
        history = []
        with torch.enable_grad():
            for step in range(1, cfg.iterations + 1):
                shift = _draw_shift(generator, jitter) if jitter > 0 else None
                variable = mask.requires_grad_(True)
                objective = self.objective(variable, images, classes, blurred=blurred, shift=shift)
                (grad,) = torch.autograd.grad(objective.sum(), variable)
                history.append(objective.detach())
                mask, exp_avg, exp_avg_sq = _adam_step(
                    variable.detach(), grad, exp_avg, exp_avg_sq, step, cfg.learning_rate
                )
        return MaskSolution(mask.detach(), torch.stack(history))

    # ------------------------------------------------------------------ the objective
    def objective(
        self,
        mask: torch.Tensor,
        images: torch.Tensor,
        classes: torch.Tensor,
        *,
        blurred: torch.Tensor | None = None,
        shift: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        """ℓ_map(m; x) per sample (N,): f_c(φ(x; m)) + (784/cells)·(λ1·Σ|1−m| + λ2·TV_β(m)).

        Differentiable in ``mask`` and in ``images`` (and ``blurred``, computed from ``images``
        when not given). ``shift`` = (dy, dx) jitters the perturbed image.
        """
        if blurred is None:
            blurred = self._blur_images(images)
        perturbed = self.perturb(images, blurred, mask)
        if shift is not None and shift != (0, 0):
            perturbed = translate(perturbed, *shift)
        logits = self.classifier(self.classifier.to_model_layout(perturbed))
        return _class_probability(logits, classes) + self.mask_cost(mask)

    def mask_cost(self, mask: torch.Tensor) -> torch.Tensor:
        """The mask part of ℓ_map per sample (N,): (784/cells)·(λ1·Σ|1−m| + λ2·TV_β(m))."""
        cfg = self.config
        scale = REFERENCE_MASK_PIXELS / (mask.shape[-2] * mask.shape[-1])
        l1 = (1.0 - mask).abs().flatten(1).sum(1)
        return scale * (cfg.l1_weight * l1 + cfg.tv_weight * total_variation(mask, cfg.tv_beta))

    def perturb(self, images: torch.Tensor, blurred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """φ(x; m) = x·M + blur(x)·(1 − M) with M the upsampled, blurred mask (m = 1 keeps).

        Computed in NCHW (a no-op for NCHW inputs): M has one channel, and broadcasting it over
        the innermost dimension of a channels-last image is a slow elementwise path.
        """
        height, width = images.shape[-2:]
        upsampled = upsample_blurred(mask, (height, width), self.config.mask_sigma(height, width))
        return images.contiguous() * upsampled + blurred.contiguous() * (1.0 - upsampled)

    def _blur_images(self, images: torch.Tensor) -> torch.Tensor:
        return gaussian_blur(images, self.config.image_sigma(*images.shape[-2:]))

    def _initial_mask(self, images: torch.Tensor) -> torch.Tensor:
        rows, cols = self.config.mask_shape(*images.shape[-2:])
        return torch.full(
            (images.shape[0], 1, rows, cols), self.config.init_value, dtype=images.dtype, device=images.device
        )

    # ------------------------------------------------------------------ the attack surrogate
    def surrogate(
        self, images: torch.Tensor, classes: torch.Tensor, state: MaskState | None = None
    ) -> tuple[torch.Tensor, MaskState]:
        """Differentiable MASK maps for ADV² (seed Eq. 10) and the advanced inner state.

        (a) no state: solve from ``init_value`` for ``init_steps`` Adam steps (no jitter);
        (b) ``inner_steps`` Adam steps on ℓ_map(m; x.detach()) — the follower's move;
        (c) m' = m − ξ·P·∇_m ℓ_map(m; x), ``unrolled_steps`` times with ``create_graph`` and x
            *not* detached, so the returned ``normalize_maps(1 − m')`` carries ∂/∂x; P = 1/(√v̂+ε)
            of the inner Adam (``precondition``, detached) or 1. m' is not clamped: clamping
            would cut the gradient exactly at the deleted (salient) cells. With
            ``surrogate_jitter`` the perturbed image of (c) is shifted by this call's jitter.
        The returned state holds m after (b), detached, and the shift of (c).
        """
        cfg = self.config
        classes = torch.as_tensor(classes, device=images.device).long().view(-1)
        # NCHW once (differentiable): ``perturb`` works in it on every inner and unrolled step
        images = images.contiguous()
        detached = images.detach()
        with torch.enable_grad():
            # one blur: the inner steps use its value, the unrolled steps its graph to ``images``
            blurred_live = self._blur_images(images)
            blurred = blurred_live.detach()
            if state is not None:
                self._check_state(state, images)
            resolve = cfg.resolve_every > 0 and state is not None and state.step > 0
            if state is None or (resolve and state.step % cfg.resolve_every == 0):
                state = self._start_state(detached, state)
                init_steps = cfg.iterations if cfg.init_steps is None else cfg.init_steps
                state = self._advance(state, detached, classes, blurred, init_steps)
            state = self._advance(state, detached, classes, blurred, cfg.inner_steps)
            jitter = cfg.jitter_pixels(*images.shape[-2:]) if cfg.surrogate_jitter else 0
            shift = _draw_shift(state.generator, jitter) if jitter > 0 and state.generator is not None else None

            unrolled = state.mask.clone().requires_grad_(True)
            for _ in range(cfg.unrolled_steps):
                loss = self.objective(unrolled, images, classes, blurred=blurred_live, shift=shift).sum()
                (grad,) = torch.autograd.grad(loss, unrolled, create_graph=True)
                step = grad
                if cfg.precondition:
                    step = grad / self._adam_scale(state, grad)
                unrolled = unrolled - cfg.xi * step
            maps = normalize_maps(1.0 - unrolled)
        next_state = replace(state, step=state.step + 1, shift=shift)
        return maps, next_state

    def evidence_loss(
        self,
        images: torch.Tensor,
        classes: torch.Tensor,
        target_maps: torch.Tensor,
        state: MaskState | None = None,
    ) -> torch.Tensor:
        """Deletion evidence for ADV² (underfire's addition; not in Zhang et al.), per sample (N,).

        The solver returns the target map's region R (mask ``m_t = 1 − target``) for class c only
        if deleting R destroys c and R alone keeps it: ``p_c(φ(x; m_t)) + 0.1·CE(f(φ(x; 1 − m_t)), c)``.
        Unlike the unrolled surrogate this needs no second-order graph and does not depend on the
        follower mask having reached R. With a jitter shift in ``state`` (``surrogate_jitter``)
        every perturbed image is shifted by it and ``CE(f(shift(x)), c)`` is added: c must
        survive the solver's jitter, or the solver explains another class.

        With a ``state`` and ``gap_weight`` w > 0 it also adds the follower's optimality gap
        ``w·max(0, ℓ_map(m_t; x) − ℓ_map(m_f; x))``, m_f the follower mask of ``state``: a
        value-function penalty for the bilevel problem (Outrata 1988; Ye & Zhu 1995) — m_t can
        only be the solver's answer if no mask the solver finds is cheaper. Its input gradient is
        ∇p_c(φ(x; m_t)) − ∇p_c(φ(x; m_f)) (the mask costs do not depend on x), so it makes the
        class survive the follower's deletion wherever that deletion undercuts m_t, instead of
        everywhere (a plain CE on the follower's deletion conflicts with deleting R). Why:
        adversarial evidence dies under much smaller deletions than the benign class, so on ADV²
        images the full solver finds masks far cheaper than m_t unless the gap is priced in
        (docs/tuning.md).

        The perturbed images go through the classifier as one batch.
        """
        images = images.contiguous()  # NCHW once for every ``perturb`` call (see ``perturb``)
        n = images.shape[0]
        keep = 1.0 - target_maps.to(images.dtype).expand(n, -1, -1, -1)
        blurred = self._blur_images(images)
        batch = [self.perturb(images, blurred, keep), self.perturb(images, blurred, 1.0 - keep)]
        follower = state.mask if state is not None and self.config.gap_weight > 0 else None
        if follower is not None:
            batch.append(self.perturb(images, blurred, follower))
        shift = None if state is None else state.shift
        if shift is not None:
            batch = [translate(x, *shift) for x in (*batch, images)]
        logits = self.classifier(self.classifier.to_model_layout(torch.cat(batch)))
        parts = logits.split(n)
        deleted = _class_probability(parts[0], classes)
        loss = deleted + PRESERVE_WEIGHT * F.cross_entropy(parts[1], classes, reduction="none")
        if follower is not None:
            undercut = deleted - _class_probability(parts[2], classes) + self.mask_cost(keep) - self.mask_cost(follower)
            loss = loss + self.config.gap_weight * F.relu(undercut)
        if shift is not None:
            loss = loss + F.cross_entropy(parts[-1], classes, reduction="none")
        return loss

    def attack_terms(
        self,
        stage: AttackStage,
        images: torch.Tensor,
        classes: torch.Tensor,
        target_maps: torch.Tensor,
        state: MaskState | None = None,
    ) -> AttackTerms | None:
        """``evidence_weight · evidence_loss`` inside ℓ_int in the joint stage; nothing in the warm start."""
        weight = self.config.evidence_weight
        if stage != "joint" or weight <= 0:
            return None
        return AttackTerms(interpretation=weight * self.evidence_loss(images, classes, target_maps, state))

    @staticmethod
    def _adam_scale(state: MaskState, grad: torch.Tensor) -> torch.Tensor:
        """√v̂ + ε of the inner Adam (detached); the current |g| if Adam has not stepped yet."""
        if state.adam_steps == 0:
            return grad.detach().abs() + _ADAM_EPS
        beta2 = _ADAM_BETAS[1]
        return (state.exp_avg_sq / (1 - beta2**state.adam_steps)).sqrt() + _ADAM_EPS

    def _start_state(self, images: torch.Tensor, previous: MaskState | None) -> MaskState:
        """A fresh mask; a re-solve keeps the call count and the jitter generator of ``previous``."""
        mask = self._initial_mask(images)
        if previous is None:
            step, generator = 0, torch.Generator(images.device).manual_seed(self.config.seed)
        else:
            step, generator = previous.step, previous.generator
        return MaskState(mask, torch.zeros_like(mask), torch.zeros_like(mask), 0, step, generator)

    def _check_state(self, state: MaskState, images: torch.Tensor) -> None:
        if not isinstance(state, MaskState):
            raise InputError(f"MASK surrogate state must be a MaskState or None, got {type(state).__name__}")
        rows, cols = self.config.mask_shape(*images.shape[-2:])
        expected = (images.shape[0], 1, rows, cols)
        if tuple(state.mask.shape) != expected:
            raise InputError(
                f"MASK surrogate state holds masks of shape {tuple(state.mask.shape)}, the images need "
                f"{expected}; pass state=None for a new batch"
            )

    def _advance(
        self, state: MaskState, images: torch.Tensor, classes: torch.Tensor, blurred: torch.Tensor, steps: int
    ) -> MaskState:
        mask, exp_avg, exp_avg_sq, count = state.mask, state.exp_avg, state.exp_avg_sq, state.adam_steps
        for _ in range(steps):
            variable = mask.detach().requires_grad_(True)
            objective = self.objective(variable, images, classes, blurred=blurred)
            (grad,) = torch.autograd.grad(objective.sum(), variable)
            count += 1
            mask, exp_avg, exp_avg_sq = _adam_step(
                variable.detach(), grad, exp_avg, exp_avg_sq, count, self.config.learning_rate
            )
        return replace(state, mask=mask.detach(), exp_avg=exp_avg, exp_avg_sq=exp_avg_sq, adam_steps=count)


# ---------------------------------------------------------------------- building blocks
def total_variation(mask: torch.Tensor, beta: float) -> torch.Tensor:
    """TV_β(m) per sample: Σ_u ((m[u+e_y] − m[u])² + (m[u+e_x] − m[u])²)^{β/2} (Fong & Vedaldi).

    A tiny ε inside the power keeps the second derivative finite on flat masks (the unrolled
    step differentiates the gradient of this term).
    """
    padded = F.pad(mask, (0, 1, 0, 1), mode="replicate")  # zero difference past the last row/column
    dy = padded[..., 1:, :-1] - mask
    dx = padded[..., :-1, 1:] - mask
    flat = (dy.square() + dx.square() + TV_EPS).pow(beta / 2.0).flatten(1)
    return flat.sum(1) - flat.shape[1] * TV_EPS ** (beta / 2.0)


def _class_probability(logits: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Softmax probability of each sample's class (N,): ℓ_map's class term."""
    return logits.softmax(1).gather(1, classes.view(-1, 1)).squeeze(1)


def _draw_shift(generator: torch.Generator, jitter: int) -> tuple[int, int]:
    """A jitter shift (dy, dx), each uniform in [−jitter, jitter] px, from ``generator``."""
    drawn = torch.randint(-jitter, jitter + 1, (2,), generator=generator, device=generator.device)
    return int(drawn[0]), int(drawn[1])


def _adam_step(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    step: int,
    lr: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One element-wise Adam step (Kingma & Ba) followed by clamping to [0, 1]; returns new tensors."""
    beta1, beta2 = _ADAM_BETAS
    exp_avg = beta1 * exp_avg + (1 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad.square()
    corrected_avg = exp_avg / (1 - beta1**step)
    corrected_sq = exp_avg_sq / (1 - beta2**step)
    param = param - lr * corrected_avg / (corrected_sq.sqrt() + _ADAM_EPS)
    return param.clamp(0.0, 1.0), exp_avg, exp_avg_sq
