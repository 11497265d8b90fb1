"""DeepLIFT with the Rescale rule (Shrikumar, Greenside & Kundaje, ICML 2017).

Attribution of input i: (x_i − x̄_i)·m_i, where x̄ is the baseline and m the *multiplier*: the
chain rule with each ReLU's derivative replaced by its secant Δa/Δz between the input's and the
baseline's pre-activations (the derivative itself where |Δz| < 1e-7, as captum does). Linear
layers, BatchNorm, residual sums, concatenations and average pooling keep their gradient, so on a
ReLU network without max pooling the attributions sum to f_c(x) − f_c(x̄) exactly
(summation-to-delta). Max pooling passes the multiplier to each window's maximum: the gradient
rule (our recollection is that the authors' ``deeplift`` package defaults to it; not checked
against its source here).
captum's ``DeepLift`` instead rescales max pooling by Δout/Δin, so the two differ on the built-in
DenseNet's stem and on torchvision's ResNets; the tests say where.

The baseline runs first, as a plain forward pass that records each ReLU's pre-activation and
activation (:class:`~.twin.ReluRecorder`; without a graph unless the baseline depends on the
input, as the blurred one does). The input then runs through :class:`~.twin.TwinTrace` alone,
pairing its ReLUs with the baseline's in call order, so twins are built for the N input rows
only (captum's hooks carry the baseline half through the backward pass as well). The secants are
forward values, so the map is differentiable w.r.t. the input (the secant of ReLU varies with z
wherever z and z̄ have opposite signs; inside the ADV² surrogate the ReLU values' own derivative is
the chosen ReLU surrogate's).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch

from ..models.classifier import Classifier
from ..smoothing import ReluSurrogate
from .attribution import Attribution, BaselineKind, BaselineMixin, ReluScale
from .twin import LinearLayer, ReluRecorder, TwinRules, check_traceable, trace_logits

#: Below this |Δz| the secant is replaced by the derivative (captum's threshold is 1e-10 on Δx).
SECANT_EPS = 1e-7


class RescaleRules(TwinRules):
    """DeepLIFT's Rescale rule against the baseline's ReLUs, given in the order the input's run."""

    needs_preactivation = True

    def __init__(self, reference: ReluRecorder, method: str, softplus_beta: float | None = None) -> None:
        self.reference = reference
        self.method = method
        self.softplus_beta = softplus_beta
        self.used = 0

    def layer(self, layer: LinearLayer, twin: torch.Tensor) -> torch.Tensor:
        return layer.apply(twin, layer.weight)

    def relu(self, pre: torch.Tensor, out: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
        z_ref, a_ref = self.reference.pair(self.used, pre, self.method)
        self.used += 1
        delta = pre - z_ref
        close = delta.abs() < SECANT_EPS
        secant = (out - a_ref) / torch.where(close, torch.ones_like(delta), delta)
        # the derivative where the secant is undefined: ReLU's step, or softplus's sigmoid
        slope = (pre > 0).to(pre.dtype) if self.softplus_beta is None else torch.sigmoid(self.softplus_beta * pre)
        return twin * torch.where(close, slope, secant)

    def sum(self, a: torch.Tensor, b: torch.Tensor, twin_a: torch.Tensor, twin_b: torch.Tensor) -> torch.Tensor:
        return twin_a + twin_b

    def average(
        self, pool: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, twin: torch.Tensor
    ) -> torch.Tensor:
        return pool(twin)

    def affine(self, apply: Callable[[torch.Tensor], torch.Tensor], twin: torch.Tensor) -> torch.Tensor:
        return apply(twin)


class DeepLift(BaselineMixin, Attribution):
    """DeepLIFT-Rescale (Shrikumar et al. 2017) of the class logit, against a baseline.

    Args:
        baseline: ``"black"`` (zeros, default), ``"blur"`` (the image blurred with σ =
            ``baseline_sigma`` px) or a tensor (C, H, W) / (N, C, H, W) in [0, 1] (Python only).
        baseline_sigma: σ of the blurred baseline, in pixels.
        pool, relu, relu_scale, softplus_beta: as for :class:`~.gradient.Grad`.
    """

    name: ClassVar[str] = "deeplift"
    description: ClassVar[str] = "DeepLIFT, Rescale rule, against a baseline (Shrikumar et al. 2017)"

    def __init__(
        self,
        classifier: Classifier,
        *,
        baseline: BaselineKind | torch.Tensor = "black",
        baseline_sigma: float = 5.0,
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
    ) -> None:
        super().__init__(classifier, pool=pool, relu=relu, relu_scale=relu_scale, softplus_beta=softplus_beta)
        check_traceable(classifier, self.name)
        self._set_baseline(baseline, baseline_sigma)

    def _attribution(self, x: torch.Tensor, classes: torch.Tensor, state: Any, create_graph: bool) -> torch.Tensor:
        return self._rescale(x, classes, create_graph)[0]

    def attribute_with_delta(
        self, x: torch.Tensor, classes: torch.Tensor, create_graph: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attribution, Σ attribution − (f_c(x) − f_c(x̄))) per image: the summation-to-delta
        error captum reports as the convergence delta. Call inside ``classifier.frozen()``."""
        attribution, logits = self._rescale(x, classes, create_graph)
        chosen = logits.gather(1, torch.cat([classes, classes]).view(-1, 1)).squeeze(1)
        n = x.shape[0]
        delta = attribution.flatten(1).sum(1) - (chosen[:n] - chosen[n:])
        return attribution, delta.detach()

    def _rescale(self, x: torch.Tensor, classes: torch.Tensor, create_graph: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The attribution and the logits of the input and of the baseline (2N rows)."""
        reference = self.baselines(x)
        keep_graph = create_graph and reference.requires_grad
        if not keep_graph:
            reference = reference.detach()
        with torch.set_grad_enabled(keep_graph), ReluRecorder() as recorder:
            recorder.bind(reference)
            reference_logits = self.classifier(reference)
        rules = RescaleRules(recorder, self.name, self.softplus_beta)
        logits, twin, seed = trace_logits(self.classifier, x, rules, self.name)
        recorder.check_all_used(rules.used, self.name)
        score = twin.gather(1, classes.view(-1, 1)).sum()
        (multiplier,) = torch.autograd.grad(score, seed, create_graph=create_graph)
        return (x - reference) * multiplier, torch.cat([logits, reference_logits])
