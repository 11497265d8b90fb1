"""What the back-propagation interpreters share: a signed attribution (N, C, H, W) per image, shown
as GRAD's map (|·|, max over colour channels, optional average pooling, min-max), and one
differentiable path for ADV² through the ReLU-gradient surrogates.

Subclasses implement ``_attribution(x, classes, state, create_graph)``. ``attribute`` returns the
signed attribution itself (captum's convention: same shape as the input, in pixel space), so the
sign, which the map drops, stays available. Benign maps use the exact ReLU derivative; the
surrogate computes the same attribution inside :func:`underfire.smoothing.relu_surrogate`, so its
input gradient (a second derivative for gradient-based rules) is not zero almost everywhere.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import replace
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..errors import InputError, ModelStructureError
from ..imaging import gaussian_blur
from ..models.classifier import Classifier
from ..smoothing import (
    ReluSurrogate,
    _ReluSurrogateMode,
    as_relu_surrogate,
    relu_surrogate,
    softplus_relus,
)
from .base import Interpreter, normalize_maps

ReluScale = Literal["absolute", "relative"]
RELU_SCALES: tuple[str, ...] = ("absolute", "relative")
BaselineKind = Literal["black", "blur"]
BASELINES: tuple[str, ...] = ("black", "blur")


class Attribution(Interpreter):
    """Base class: a signed attribution turned into GRAD's map.

    Args:
        pool: average-pooling factor applied to the map (1 = full resolution).
        relu: the ReLU-gradient surrogate ``surrogate`` uses (default: the paper's ``h``).
        relu_scale: ``"absolute"`` (the paper's) or ``"relative"`` (``ReluSurrogate.relative``).
        softplus_beta: explain the β-smoothed network instead (every ReLU softplus(βz)/β, in value
            and derivative; Dombrowski et al. 2019), a defence against manipulated maps. The
            prediction stays the model's; the attack then differentiates the smoothed network
            itself, so ``relu`` does not apply (a ``relu`` other than the default is refused).
            ``None`` (default): the model as it is.
    """

    paper_class: ClassVar[str] = "back-propagation"

    def __init__(
        self,
        classifier: Classifier,
        *,
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
    ) -> None:
        super().__init__(classifier)
        self.pool = check_count("pool", pool)
        self.relu = surrogate_spec(relu, relu_scale)
        self.softplus_beta = None if softplus_beta is None else check_positive("softplus_beta", softplus_beta)
        if self.softplus_beta is not None and self.relu != ReluSurrogate():
            raise InputError(
                f"{self.name}: softplus_beta replaces every ReLU, in the map and in the attack, so the ReLU "
                f"surrogate {self.relu.kind!r}{' (relative)' if self.relu.relative else ''} would not apply; drop relu/relu_scale or softplus_beta"
            )
        if self.softplus_beta is not None and classifier.is_scripted:
            raise ModelStructureError(
                f"{self.name}: softplus_beta cannot reach the ReLUs inside the TorchScript graph of "
                f"{classifier.name}, so the map would not be smoothed; load the model as a Python module "
                "(module:function) or as export:PATH.pt2"
            )

    @classmethod
    def preset_surrogate(cls, table: Mapping[str, Any], chosen: Mapping[str, Any]) -> Mapping[str, Any]:
        """A preset's ReLU surrogate (``relu``, ``relu_scale``) yields to a chosen ``softplus_beta``,
        which replaces every ReLU and would otherwise be refused next to it."""
        if chosen.get("softplus_beta") is None:
            return table
        return {key: value for key, value in table.items() if key not in ("relu", "relu_scale")}

    def relu_mode(self, attack: bool) -> AbstractContextManager[Any]:
        """The ReLUs an attribution runs with: the β-smoothed network when ``softplus_beta`` is
        set; else, for an attack (``attack``), ``relu``'s surrogate derivative, and the exact ReLU
        for a benign map."""
        if self.softplus_beta is not None:
            return softplus_relus(self.softplus_beta)
        return relu_surrogate(self.relu) if attack else exact_relu()

    def check_attackable(self) -> None:
        """The ReLU surrogate is a Python torch function mode: a TorchScript graph runs its ReLUs
        in C++, out of its reach, so the map's input gradient would be zero (ADV² = PGD)."""
        if (self.relu.kind != "none" or self.softplus_beta is not None) and self.classifier.is_scripted:
            raise ModelStructureError(
                f"{self.name}: the ReLU surrogate cannot reach inside the TorchScript graph of "
                f"{self.classifier.name}, so ADV² would silently be PGD; save the model with "
                "torch.export.save and load it as export:PATH.pt2, or load it as a Python module (module:function)"
            )

    def map_shape(self, images: torch.Tensor) -> tuple[int, int]:
        """(H // pool, W // pool): the input's size, average-pooled (no model call)."""
        height, width = images.shape[-2:]
        if self.pool > min(height, width):
            raise InputError(f"pool={self.pool} is larger than the {height}x{width} attribution map")
        return height // self.pool, width // self.pool

    def attribute(self, images: torch.Tensor, classes: Any = None, *, seed: int | None = None) -> torch.Tensor:
        """The signed attribution (N, C, H, W) in pixel space, exact (no surrogate), detached."""

        def signed(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            generator = None if seed is None else torch.Generator(x.device).manual_seed(seed)
            with torch.enable_grad(), self.relu_mode(attack=False):
                return self._attribution(x.detach(), c, generator, False)

        return self.run_frozen(images, classes, signed)

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Exact maps (true ReLU derivative, no graph kept)."""
        with torch.enable_grad(), self.relu_mode(attack=False):
            attribution = self._attribution(images.detach(), classes, generator, False)
        return attribution_maps(attribution.detach(), self.pool)

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Maps differentiable w.r.t. ``images`` through the smoothed ReLU derivative; ``state``
        (a noise generator for subclasses that draw noise, else ``None``) is passed through."""
        x = differentiable(images)
        with torch.enable_grad(), self.relu_mode(attack=True):
            attribution = self._attribution(x, classes, state, True)
        return attribution_maps(attribution, self.pool), state

    @abstractmethod
    def _attribution(self, x: torch.Tensor, classes: torch.Tensor, state: Any, create_graph: bool) -> torch.Tensor:
        """The signed attribution (N, C, H, W) of ``x`` for ``classes``; with ``create_graph`` it
        must stay differentiable w.r.t. ``x``."""


class BaselineMixin:
    """The reference input of IG and DeepLIFT: black (zeros), the image blurred, or a tensor.

    A blurred baseline (Sundararajan et al. 2017 mention it; Sturmfels et al. 2020, "Visualizing
    the impact of feature attribution baselines") is a function of the image, so it is recomputed,
    differentiably, for every attack iterate.
    """

    baseline: BaselineKind | torch.Tensor
    baseline_sigma: float
    classifier: Classifier

    def _set_baseline(self, baseline: BaselineKind | torch.Tensor, sigma: float) -> None:
        if isinstance(baseline, torch.Tensor):
            if not torch.isfinite(baseline).all():
                raise InputError("the baseline tensor holds NaN or infinite values")
            self.baseline = baseline.detach()
        elif baseline in BASELINES:
            self.baseline = baseline
        else:
            raise InputError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINES)} or pass a tensor")
        self.baseline_sigma = check_positive("baseline_sigma", sigma)

    def baselines(self, x: torch.Tensor) -> torch.Tensor:
        """The baseline of each image of ``x`` (same shape, dtype and device)."""
        if isinstance(self.baseline, torch.Tensor):
            base = self.baseline.to(device=x.device, dtype=x.dtype)
            if base.dim() == 3:
                base = base.unsqueeze(0)
            if base.dim() != 4 or base.shape[1:] != x.shape[1:] or base.shape[0] not in (1, x.shape[0]):
                raise InputError(
                    f"the baseline has shape {tuple(self.baseline.shape)}; give (C, H, W) or (N, C, H, W) "
                    f"matching the images {tuple(x.shape)}"
                )
            return base.expand_as(x)
        if self.baseline == "black":
            return torch.zeros_like(x)
        # the blur returns NCHW; back in the layout the model is handed (channels-last on CPU)
        return self.classifier.to_model_layout(gaussian_blur(x, self.baseline_sigma))


def check_count(what: str, value: int) -> int:
    """``value`` if it is an integer >= 1 (a pooling factor, a number of steps), else one line."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def check_positive(what: str, value: float, above: float = 0.0) -> float:
    """``value`` as a float if it is a finite number > ``above``, else one line."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= above:
        raise InputError(f"{what} must be a finite number > {above:g}, got {value!r}")
    return float(value)


def surrogate_spec(relu: ReluSurrogate | str, scale: str) -> ReluSurrogate:
    """The ReLU surrogate ``relu`` with ``relu_scale`` applied."""
    if scale not in RELU_SCALES:
        raise InputError(f"unknown relu_scale {scale!r}; choose one of {', '.join(RELU_SCALES)}")
    surrogate = as_relu_surrogate(relu)
    return replace(surrogate, relative=True) if scale == "relative" else surrogate


def exact_relu() -> AbstractContextManager[Any]:
    """The true ReLU derivative: ``relu_surrogate("none")`` where a surrogate context is active
    (benign maps stay exact inside an attack), nothing otherwise. A torch function mode sees every
    torch call of the model in Python: skipping it saves about 15 % of a forward pass at batch 1."""
    try:
        from torch.overrides import _get_current_function_mode_stack
    except ImportError:  # pragma: no cover - older torch: always hide enclosing modes
        return relu_surrogate("none")
    if any(isinstance(mode, _ReluSurrogateMode) for mode in _get_current_function_mode_stack()):
        return relu_surrogate("none")
    return nullcontext()


def differentiable(images: torch.Tensor) -> torch.Tensor:
    """The images themselves when they carry a graph (never detach them: a detached map gives the attack no map gradient)."""
    return images if images.requires_grad else images.detach().requires_grad_(True)


def attribution_maps(attribution: torch.Tensor, pool: int) -> torch.Tensor:
    """|attribution| max over channels (Simonyan et al.), average-pooled ×``pool``, min-max normalised."""
    maps = attribution.abs().amax(1, keepdim=True)
    if pool > 1:
        if pool > min(maps.shape[-2:]):
            raise InputError(f"pool={pool} is larger than the {maps.shape[-2]}x{maps.shape[-1]} attribution map")
        maps = F.avg_pool2d(maps, pool)
    return normalize_maps(maps)
