"""GRAD and SmoothGrad: back-propagation-guided interpreters.

* GRAD, the vanilla gradient saliency of Simonyan, Vedaldi & Zisserman (ICLR workshop 2014):
  map = max over colour channels of |∂score_c/∂x|. The score is the class logit z_c by default
  (Simonyan's definition and captum's ``Saliency``); ``score="ce"`` differentiates the class's
  cross-entropy instead, as the official ADV² code does. Optionally average-pooled (the official
  code pools ×4, 224 → 56), then min-max normalised per image.
* SmoothGrad (Smilkov et al., 2017): the same map from the gradient averaged over noisy copies
  x + N(0, σ²), σ = noise × (pixel range = 1).

Benign maps (``explain``) use the exact gradient. The ADV² attack needs ∂map/∂x, a second
derivative, which is zero almost everywhere in a ReLU network; ``surrogate`` therefore computes the
map inside :func:`underfire.smoothing.relu_surrogate` (Zhang et al. 2020, §3.2: ReLU's value, a
smooth function's derivative) with ``torch.autograd.grad(..., create_graph=True)``.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F

from ..errors import InputError
from ..models.classifier import Classifier
from ..smoothing import ReluSurrogate
from .attribution import Attribution, ReluScale, attribution_maps, check_count, differentiable
from .base import Interpreter

Score = Literal["logit", "ce"]
SCORES: tuple[str, ...] = ("logit", "ce")


class Grad(Attribution):
    """Vanilla gradient saliency (Simonyan et al. 2014) with a smoothed second-order surrogate.

    Args:
        classifier: the model to explain.
        score: ``"logit"`` (z_c, default) or ``"ce"`` (cross-entropy of class c, ADV² official).
        pool: average-pooling factor applied to the map (1 = full resolution).
        relu: the ReLU-gradient surrogate used by ``surrogate`` (default: the paper's ``h``).
        relu_scale: ``"absolute"`` (the paper's: the smoothing width √τ is in the units of the
            pre-activations) or ``"relative"`` (in units of each sample's pre-activation scale at
            each ReLU, ``ReluSurrogate.relative``), which carries over to models whose ReLUs see
            much larger values; the ``quick`` preset uses it (docs/tuning.md).
        share_forward: let ``surrogate_and_logits`` (the ADV² attack's per-step call) return the
            logits of the surrogate's own forward pass instead of running the classifier again.
            One forward and one backward less per attack step (about 20 % of a GRAD step), but
            the prediction loss then back-propagates the smoothed ReLU derivative rather than the
            exact one: its input gradient is close to the exact one but not equal, so the attack's
            trajectory changes (docs/tuning.md). Off by default (exact, as the official ADV²
            code, which runs an exact-ReLU copy of the model for the prediction loss).
        softplus_beta: explain the β-smoothed network (``Attribution``); not with ``share_forward``,
            whose logits would then be the smoothed network's.
    """

    name: ClassVar[str] = "grad"
    description: ClassVar[str] = "vanilla gradient saliency (Simonyan et al. 2014)"
    paper_class: ClassVar[str] = "back-propagation"

    def __init__(
        self,
        classifier: Classifier,
        *,
        score: Score = "logit",
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
        share_forward: bool = False,
    ) -> None:
        super().__init__(classifier, pool=pool, relu=relu, relu_scale=relu_scale, softplus_beta=softplus_beta)
        self.score = check_score(score)
        if not isinstance(share_forward, bool):
            raise InputError(f"share_forward must be True or False, got {share_forward!r}")
        if share_forward and softplus_beta is not None:
            raise InputError(
                "share_forward reuses the explanation's forward pass, which softplus_beta smooths, so the "
                "prediction would be the smoothed network's; use one or the other"
            )
        self.share_forward = share_forward

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """``surrogate``'s maps and the classifier's logits of ``images``.

        By default (``share_forward=False``) the base contract's: ``surrogate``, then a separate
        exact forward pass, so a loss on the logits back-propagates the true ReLU derivative.
        With ``share_forward=True``: the logits of the forward pass the maps were differentiated
        from. Their values are exactly ``classifier(images)``'s (the ReLU surrogate keeps ReLU's
        forward value bit for bit), but a loss on them back-propagates the smoothed derivative
        (``relu``); it saves one forward and one backward pass per call.
        """
        if not self.share_forward:
            return super().surrogate_and_logits(images, classes, state)
        x = differentiable(images)
        with torch.enable_grad(), self.relu_mode(attack=True):
            logits = self.classifier(x)
            grad = score_gradient(logits, x, classes, self.score, create_graph=True)
        return attribution_maps(self._from_gradient(x, grad), self.pool), logits, state

    def _attribution(self, x: torch.Tensor, classes: torch.Tensor, state: Any, create_graph: bool) -> torch.Tensor:
        """The signed attribution ``attribute`` returns: the gradient, as ``_from_gradient`` maps it."""
        x = differentiable(x)
        return self._from_gradient(x, self._gradient(x, classes, state, create_graph))

    def _from_gradient(self, x: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """The attribution made of the input gradient (GRAD: the gradient itself); the one place
        both the plain and the ``share_forward`` path go through."""
        return gradient

    def _gradient(
        self, x: torch.Tensor, classes: torch.Tensor, generator: torch.Generator | None, create_graph: bool
    ) -> torch.Tensor:
        """∂score/∂x (N, C, H, W); ``generator`` is for subclasses that draw noise."""
        return input_gradient(self.classifier, x, x, classes, self.score, create_graph)


class SmoothGrad(Grad):
    """SmoothGrad (Smilkov et al. 2017) on top of GRAD's score, pooling and ReLU surrogate.

    The map is |mean over samples of ∂score_c/∂x(x + noise)|, max over colour channels: the raw
    gradients are averaged *before* the absolute value, as in Smilkov et al.'s reference code
    (PAIR ``saliency``: ``GetSmoothedMask`` averages raw masks, visualisation takes |·|), so noise
    cancels where the gradient's sign is unstable. (captum's ``NoiseTunnel`` over
    ``Saliency(abs=True)`` averages |grad| instead.) Noisy copies are not clipped to [0, 1], as in
    the original. All N × samples copies go through the model in one batch.

    Args:
        samples: noisy copies per image.
        noise: σ as a fraction of the pixel range [0, 1] (Smilkov et al. recommend 10–20 %).
        score, pool, relu, relu_scale, softplus_beta: as for :class:`Grad`.
    """

    name: ClassVar[str] = "smoothgrad"
    description: ClassVar[str] = "gradient averaged over noisy copies (Smilkov et al. 2017)"

    def __init__(
        self,
        classifier: Classifier,
        *,
        samples: int = 16,
        noise: float = 0.15,
        score: Score = "logit",
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
    ) -> None:
        if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
            raise InputError(f"noise must be a finite number >= 0, got {noise!r}")
        super().__init__(
            classifier, score=score, pool=pool, relu=relu, relu_scale=relu_scale, softplus_beta=softplus_beta
        )
        self.samples = check_count("samples", samples)
        self.noise = float(noise)

    def initial_state(self, seed: int, device: torch.device) -> torch.Generator:
        """A seeded noise generator: an attack feeding it back draws fresh, reproducible noise."""
        return torch.Generator(device).manual_seed(seed)

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        """Differentiable SmoothGrad maps. ``state`` may be a ``torch.Generator`` for the noise
        (returned unchanged, so an attack loop that feeds the state back draws a seeded,
        fresh noise sample every step); ``None`` uses torch's global generator."""
        if state is not None and not isinstance(state, torch.Generator):
            raise InputError(f"SmoothGrad's state must be None or a torch.Generator, got {type(state).__name__}")
        return super().surrogate(images, classes, state)

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The base contract's default: ``surrogate`` and then a separate clean forward pass.

        SmoothGrad's own forward passes see the noisy copies, whose logits are not those of the
        images, so GRAD's ``share_forward`` shortcut does not apply.
        """
        return Interpreter.surrogate_and_logits(self, images, classes, state)

    def _gradient(
        self, x: torch.Tensor, classes: torch.Tensor, generator: torch.Generator | None, create_graph: bool
    ) -> torch.Tensor:
        """Mean gradient over the noisy copies; the noise comes from ``generator``."""
        # d/dx Σ_s score(x + n_s) = Σ_s ∇score(x + n_s): one backward gives the sum of gradients.
        noisy = x.repeat_interleave(self.samples, 0)
        if self.noise > 0:
            noise = torch.randn(noisy.shape, generator=generator, device=noisy.device, dtype=noisy.dtype)
            noisy = noisy + self.noise * noise
        repeated = classes.repeat_interleave(self.samples, 0)
        grad = input_gradient(self.classifier, noisy, x, repeated, self.score, create_graph)
        return grad / self.samples


def check_score(score: str) -> str:
    if score not in SCORES:
        raise InputError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    return score


def input_gradient(
    classifier: Classifier,
    inputs: torch.Tensor,
    wrt: torch.Tensor,
    classes: torch.Tensor,
    score: str,
    create_graph: bool,
) -> torch.Tensor:
    """∂ Σ_i score_{c_i}(inputs_i) / ∂ wrt: samples do not interact (eval mode), so each row is
    that sample's own gradient."""
    return score_gradient(classifier(inputs), wrt, classes, score, create_graph)


def score_gradient(
    logits: torch.Tensor, wrt: torch.Tensor, classes: torch.Tensor, score: str, create_graph: bool
) -> torch.Tensor:
    """∂ Σ_i score_{c_i}(logits_i) / ∂ wrt."""
    if score == "logit":
        total = logits.gather(1, classes.view(-1, 1)).sum()
    else:
        total = F.cross_entropy(logits, classes, reduction="sum")
    (grad,) = torch.autograd.grad(total, wrt, create_graph=create_graph)
    return grad
