"""Layer-wise relevance propagation (Bach et al. 2015; rules as in Montavon et al. 2019, "Layer-wise
relevance propagation: an overview").

The class logit f_c(x) is the relevance at the output; each layer hands its relevance R_j down
to its inputs in proportion to their contributions z_ij:

* ε:   R_i = Σ_j a_i w_ij / (z_j + ε·sign z_j) · R_j (LRP-0 for ε → 0); conserves relevance up to
  what the biases and ε absorb;
* z⁺:  only positive contributions, R_i = Σ_j (a_i w_ij)⁺ / Σ_i (a_i w_ij)⁺ · R_j (with the
  positive bias in the denominator, as zennit's ``ZPlus``);
* αβ:  α·(positive share) − β·(negative share), α − β = 1 (zennit's ``AlphaBeta``);
* flat (first layer of the composite): R spread uniformly over each output's receptive field.

``rule="composite"`` (default) is zennit's ``EpsilonPlusFlat``: flat for the first layer, z⁺ for
the other convolutions, ε for the fully connected ones. Everywhere: ReLU and any unfolded
BatchNorm pass relevance unchanged; a BatchNorm directly after a convolution or linear layer is
folded into it before the rule (what zennit's canonizers do by editing the weights, here on the
fly, so the model is never modified); residual sums and average pooling split relevance in
proportion to their inputs (zennit's ``Norm``); max pooling gives it to each window's maximum;
concatenations and reshapes route it. Each rule's denominator is stabilised by ``epsilon`` with
the sign of the entry (sign 0 = +1), zennit's stabiliser.

The rules' fractions are forward values, so the map is differentiable w.r.t. the input through
:class:`~.twin.TwinTrace` (inside the ADV² surrogate, each ReLU value's own derivative is the
chosen ReLU surrogate's). The relevance is taken at the model's input (after normalisation) and
shown on the pixel grid: the normalisation passes relevance unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

import torch

from ..errors import InputError
from ..models.classifier import Classifier
from ..smoothing import ReluSurrogate
from .attribution import Attribution, ReluScale, check_positive
from .twin import LinearLayer, TwinRules, check_traceable, stabilize, trace_logits

LrpRule = Literal["composite", "epsilon", "zplus", "alphabeta"]
LRP_RULES: tuple[str, ...] = ("composite", "epsilon", "zplus", "alphabeta")


class LrpRules(TwinRules):
    """The relevance rules of one LRP configuration (twins carry relevance, not gradients)."""

    def __init__(self, rule: str, epsilon: float, alpha: float) -> None:
        self.rule = rule
        self.epsilon = epsilon
        self.alpha = alpha

    def layer(self, layer: LinearLayer, twin: torch.Tensor) -> torch.Tensor:
        rule = self.rule
        if rule == "composite":
            dense = layer.weight.dim() == 2
            rule = "flat" if layer.first else ("epsilon" if dense else "zplus")
        if rule == "flat":
            ones = torch.ones_like(layer.weight)
            count = layer.apply(torch.ones_like(layer.inputs), ones)
            return layer.apply(twin, ones) / stabilize(count, self.epsilon)
        if rule == "epsilon":
            return layer.apply(twin * layer.inputs, layer.weight) / stabilize(layer.output, self.epsilon)
        a = layer.inputs
        positive, negative = a.clamp(min=0), a.clamp(max=0)
        w_plus, w_minus = layer.weight.clamp(min=0), layer.weight.clamp(max=0)
        bias = layer.bias
        b_plus = None if bias is None else bias.clamp(min=0)
        # z⁺ = (a⁺ w⁺ + b⁺) + a⁻ w⁻: every positive contribution; its relevance share is the twin's.
        signed = bool((a < 0).any())
        z_up = layer.apply(positive, w_plus, b_plus)
        share_up = layer.apply(twin * positive, w_plus)
        if signed:
            z_up = z_up + layer.apply(negative, w_minus)
            share_up = share_up + layer.apply(twin * negative, w_minus)
        up = share_up / stabilize(z_up, self.epsilon)
        if rule == "zplus":
            return up
        beta = self.alpha - 1.0
        b_minus = None if bias is None else bias.clamp(max=0)
        z_down = layer.apply(positive, w_minus, b_minus)
        share_down = layer.apply(twin * positive, w_minus)
        if signed:
            z_down = z_down + layer.apply(negative, w_plus)
            share_down = share_down + layer.apply(twin * negative, w_plus)
        return self.alpha * up - beta * share_down / stabilize(z_down, self.epsilon)

    def relu(self, pre: torch.Tensor, out: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
        return twin

    def sum(self, a: torch.Tensor, b: torch.Tensor, twin_a: torch.Tensor, twin_b: torch.Tensor) -> torch.Tensor:
        return (twin_a * a + twin_b * b) / stabilize(a + b, self.epsilon)

    def average(
        self, pool: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, twin: torch.Tensor
    ) -> torch.Tensor:
        return pool(twin * a) / stabilize(pool(a), self.epsilon)

    def affine(self, apply: Callable[[torch.Tensor], torch.Tensor], twin: torch.Tensor) -> torch.Tensor:
        return twin


class Lrp(Attribution):
    """LRP (Bach et al. 2015) of the class logit, with a composite of rules (zennit's EpsilonPlusFlat
    by default).

    Args:
        rule: ``"composite"`` (flat first layer, z⁺ convolutions, ε dense layers), or one rule for
            every layer: ``"epsilon"``, ``"zplus"``, ``"alphabeta"``.
        epsilon: ε of the ε rule and every denominator's stabiliser (zennit's default 1e-6).
        alpha: α of the αβ rule (β = α − 1; Montavon et al. use α = 2, β = 1).
        pool, relu, relu_scale, softplus_beta: as for :class:`~.gradient.Grad`.
    """

    name: ClassVar[str] = "lrp"
    description: ClassVar[str] = "layer-wise relevance propagation, EpsilonPlusFlat composite (Bach et al. 2015)"

    def __init__(
        self,
        classifier: Classifier,
        *,
        rule: LrpRule = "composite",
        epsilon: float = 1e-6,
        alpha: float = 2.0,
        pool: int = 1,
        relu: ReluSurrogate | str = "h",
        relu_scale: ReluScale = "absolute",
        softplus_beta: float | None = None,
    ) -> None:
        super().__init__(classifier, pool=pool, relu=relu, relu_scale=relu_scale, softplus_beta=softplus_beta)
        check_traceable(classifier, self.name)
        if rule not in LRP_RULES:
            raise InputError(f"unknown LRP rule {rule!r}; choose one of {', '.join(LRP_RULES)}")
        self.rule = rule
        self.epsilon = check_positive("epsilon", epsilon)
        self.alpha = check_positive("alpha", alpha, above=1.0)

    def _attribution(self, x: torch.Tensor, classes: torch.Tensor, state: Any, create_graph: bool) -> torch.Tensor:
        rules = LrpRules(self.rule, self.epsilon, self.alpha)
        logits, twin, seed = trace_logits(self.classifier, x, rules, self.name)
        index = classes.view(-1, 1)
        # The output relevance is the logit itself (Bach et al.), so relevances sum to f_c(x).
        score = (twin.gather(1, index) * logits.gather(1, index)).sum()
        (relevance,) = torch.autograd.grad(score, seed, create_graph=create_graph)
        return relevance
