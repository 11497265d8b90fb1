"""Integrated Gradients (Sundararajan, Taly & Yan, ICML 2017).

Attribution = (x − x̄) ⊙ ∫₀¹ ∂score_c/∂x (x̄ + α(x − x̄)) dα, the integral by Gauss–Legendre
quadrature on ``steps`` nodes (captum's default method) or the trapezoid rule. Completeness says
the attributions sum to score(x) − score(x̄); ``attribute_with_delta`` reports the quadrature's
error against it, as captum's ``return_convergence_delta`` does.

Memory: the path runs ``chunk`` points at a time (N × chunk images per pass). When the path has
more than one chunk, the ADV² surrogate must not keep the second-order graph of every point until
the attack's backward pass, so it is an autograd function that keeps only the inputs and, when the
attack back-propagates, recomputes each chunk with ``create_graph`` inside the same ReLU surrogate
and adds its vector-Jacobian product: at most one chunk's graph is alive at any time, for one more
forward and backward per chunk. A path of one chunk keeps its graph directly.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import numpy as np
import torch

from ..errors import InputError
from ..models.classifier import Classifier
from ..smoothing import ReluSurrogate
from .attribution import (
    Attribution,
    BaselineKind,
    BaselineMixin,
    ReluScale,
    check_count,
)
from .gradient import Score, check_score, score_gradient

Quadrature = Literal["gausslegendre", "trapezoid"]
QUADRATURES: tuple[str, ...] = ("gausslegendre", "trapezoid")


def quadrature(method: str, steps: int) -> tuple[list[float], list[float]]:
    """Nodes α in [0, 1] and weights summing to 1."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return list((nodes + 1) / 2), list(weights / 2)
    if steps == 1:
        return [1.0], [1.0]
    nodes = np.linspace(0.0, 1.0, steps)
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2
    return list(nodes), list(weights)


class IntegratedGradients(BaselineMixin, Attribution):
    """Integrated Gradients (Sundararajan et al. 2017) of the class score, against a baseline.

    Args:
        steps: quadrature nodes on the path.
        method: ``"gausslegendre"`` (default, captum's) or ``"trapezoid"``.
        chunk: path points per forward pass (memory: N × chunk images at a time).
        baseline: ``"black"`` (zeros, default), ``"blur"`` (σ = ``baseline_sigma`` px) or a
            tensor (C, H, W) / (N, C, H, W) in [0, 1] (Python only).
        baseline_sigma: σ of the blurred baseline, in pixels.
        score, pool, relu, relu_scale, softplus_beta: as for :class:`~.gradient.Grad`.
    """

    name: ClassVar[str] = "ig"
    description: ClassVar[str] = "integrated gradients along a path from a baseline (Sundararajan et al. 2017)"

    def __init__(
        self,
        classifier: Classifier,
        *,
        steps: int = 32,
        method: Quadrature = "gausslegendre",
        chunk: int = 8,
        baseline: BaselineKind | torch.Tensor = "black",
        baseline_sigma: float = 5.0,
        score: Score = "logit",
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
    ) -> None:
        super().__init__(classifier, pool=pool, relu=relu, relu_scale=relu_scale, softplus_beta=softplus_beta)
        if method not in QUADRATURES:
            raise InputError(f"unknown quadrature {method!r}; choose one of {', '.join(QUADRATURES)}")
        self.steps, self.chunk = check_count("steps", steps), check_count("chunk", chunk)
        self.method = method
        self.score = check_score(score)
        self._set_baseline(baseline, baseline_sigma)

    def _attribution(self, x: torch.Tensor, classes: torch.Tensor, state: Any, create_graph: bool) -> torch.Tensor:
        reference = self.baselines(x)
        if create_graph and self.steps > self.chunk:
            average = _PathGradient.apply(x, reference, classes, self)
        elif create_graph:  # one chunk: its graph is all there is to keep
            average = self.path_gradient(x, reference, classes, create_graph=True)
        else:
            average = self.path_gradient(x.detach(), reference.detach(), classes, create_graph=False)
        return (x - reference) * average

    def attribute_with_delta(self, x: torch.Tensor, classes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(attribution, Σ attribution − (score(x) − score(x̄))) per image, exact ReLU; call inside
        ``classifier.frozen()``."""
        if self.score == "ce":
            raise InputError("the completeness delta is defined for score='logit'")
        x = x.detach()
        reference = self.baselines(x)
        with torch.enable_grad():
            attribution = (x - reference) * self.path_gradient(x, reference, classes, create_graph=False)
        with torch.no_grad():
            scores = self.classifier(torch.cat([x, reference])).gather(1, torch.cat([classes, classes]).view(-1, 1))
        n = x.shape[0]
        return attribution, attribution.flatten(1).sum(1) - (scores[:n, 0] - scores[n:, 0])

    def path_gradient(
        self,
        x: torch.Tensor,
        reference: torch.Tensor,
        classes: torch.Tensor,
        create_graph: bool,
        nodes: slice = slice(None),
    ) -> torch.Tensor:
        """Σ_k w_k ∂score/∂x at x̄ + α_k(x − x̄), over the quadrature nodes ``nodes``, ``chunk`` at a time."""
        alphas, weights = quadrature(self.method, self.steps)
        alphas, weights = alphas[nodes], weights[nodes]
        n = x.shape[0]
        total = torch.zeros_like(x)
        for start in range(0, len(alphas), self.chunk):
            chunk_alphas = alphas[start : start + self.chunk]
            points = torch.cat([reference + alpha * (x - reference) for alpha in chunk_alphas])
            if not points.requires_grad:
                points.requires_grad_(True)
            logits = self.classifier(points)
            grad = score_gradient(logits, points, classes.repeat(len(chunk_alphas)), self.score, create_graph)
            for index, weight in enumerate(weights[start : start + self.chunk]):
                total = total + weight * grad[index * n : (index + 1) * n]
        return total


class _PathGradient(torch.autograd.Function):
    """IG's averaged path gradient with a recomputing backward (one chunk's graph at a time)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, reference: torch.Tensor, classes: torch.Tensor, ig: IntegratedGradients
    ) -> torch.Tensor:
        ctx.save_for_backward(x, reference, classes)
        ctx.ig = ig
        with torch.enable_grad():
            return ig.path_gradient(x.detach(), reference.detach(), classes, create_graph=False)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, reference, classes = ctx.saved_tensors
        ig: IntegratedGradients = ctx.ig
        grad_x, grad_reference = torch.zeros_like(x), torch.zeros_like(reference)
        with torch.enable_grad(), ig.relu_mode(attack=True):
            for start in range(0, ig.steps, ig.chunk):
                leaf_x = x.detach().requires_grad_(True)
                leaf_reference = reference.detach().requires_grad_(True)
                part = ig.path_gradient(leaf_x, leaf_reference, classes, True, slice(start, start + ig.chunk))
                dx, dr = torch.autograd.grad(part, (leaf_x, leaf_reference), grad_output, allow_unused=True)
                grad_x = grad_x + (0 if dx is None else dx)
                grad_reference = grad_reference + (0 if dr is None else dr)
        return grad_x, grad_reference, None, None
