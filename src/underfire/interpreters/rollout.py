"""Attention rollout (Abnar & Zuidema, ACL 2020): how much each input patch flows into the class
token through a vision transformer's attention layers.

Per layer, the attention A (averaged over heads) is mixed with the identity for the residual
connection, Â = 0.5·A + 0.5·I, and renormalised per row; the layers' Â multiply,
R = Â_L ··· Â_1, and the map is the class token's row of R over the patch tokens, on their grid.
The attention weights are recorded as the model computes them, as part of its graph (not
detached), so the map is differentiable with respect to the input and ADV² can attack it:
``nn.MultiheadAttention`` (torchvision's ViT) is asked for its per-head weights, and
``F.scaled_dot_product_attention`` (timm's ViT and DeiT) is computed in its plain form, softmax
explicit, whose double backward exists. The map does not depend on the class asked: rollout
explains the class token, whatever the head does with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import InputError, ModelStructureError
from ..models.classifier import Classifier
from .base import Interpreter, normalize_maps

__all__ = ["AttentionRecorder", "AttentionRollout", "TransformerAttribution", "gradient_rollout", "rollout"]


class AttentionRecorder(TorchFunctionMode):
    """While active, every attention a model computes is recorded as (N, heads, queries, keys),
    in its graph and as the tensor its output is computed from (so its gradient exists):
    ``nn.MultiheadAttention``'s forward and ``F.scaled_dot_product_attention`` are computed
    written out, softmax explicit. The outputs are the model's own up to float rounding."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions: list[torch.Tensor] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.multi_head_attention_forward:
            call = dict(zip(_MHA_PARAMETERS, args)) | kwargs
            if _plain_mha_applies(call):
                return self._plain_mha(call)
            raise ModelStructureError(
                "this nn.MultiheadAttention uses key/value biases, zero attention, static keys, separate "
                "projections or masks, which the attention interpreters do not read"
            )
        if func is F.scaled_dot_product_attention:
            return self._plain_attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _plain_mha(self, call: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``F.multi_head_attention_forward`` written out for the common case (packed input
        projection, no masks): the attention it records is the one its output is computed from,
        so gradients with respect to it exist."""
        query, key, value = call["query"], call["key"], call["value"]
        if call.get("training", True) and call.get("dropout_p", 0.0):
            raise InputError("attention dropout is on (the model is in training mode?): explain a model in eval mode")
        heads = call["num_heads"]
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[:, None], key[:, None], value[:, None]
        length, batch, embed = query.shape
        weight, bias = call["in_proj_weight"], call["in_proj_bias"]
        w_q, w_k, w_v = weight.chunk(3)
        b_q, b_k, b_v = (None, None, None) if bias is None else bias.chunk(3)
        q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

        def split(t: torch.Tensor) -> torch.Tensor:  # (L, N, E) → (N, heads, L, E / heads)
            return t.reshape(t.shape[0], batch, heads, embed // heads).permute(1, 2, 0, 3)

        q, k, v = split(q), split(k), split(v)
        weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(-1)
        self.attentions.append(weights)
        attended = (weights @ v).permute(2, 0, 1, 3).reshape(length, batch, embed)
        output = F.linear(attended, call["out_proj_weight"], call["out_proj_bias"])
        if not batched:
            output, weights = output[:, 0], weights[0]
        if not call.get("need_weights", True):
            return output, None
        return output, weights.mean(-3) if call.get("average_attn_weights", True) else weights

    def _plain_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        if dropout_p:
            raise InputError("attention dropout is on (the model is in training mode?): explain a model in eval mode")
        if enable_gqa and key.shape[-3] != query.shape[-3]:
            repeat = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
        scores = query @ key.transpose(-2, -1) * (scale if scale is not None else 1 / math.sqrt(query.shape[-1]))
        if is_causal:
            causal = torch.ones(scores.shape[-2:], dtype=torch.bool, device=scores.device).tril()
            scores = scores.masked_fill(~causal, float("-inf"))
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        weights = scores.softmax(-1)
        self.attentions.append(weights if weights.dim() == 4 else weights[None])
        return weights @ value


#: ``F.multi_head_attention_forward``'s parameters in order (how nn.MultiheadAttention passes them).
_MHA_PARAMETERS = (
    "query",
    "key",
    "value",
    "embed_dim_to_check",
    "num_heads",
    "in_proj_weight",
    "in_proj_bias",
    "bias_k",
    "bias_v",
    "add_zero_attn",
    "dropout_p",
    "out_proj_weight",
    "out_proj_bias",
    "training",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "use_separate_proj_weight",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "static_k",
    "static_v",
    "average_attn_weights",
    "is_causal",
)


def _plain_mha_applies(call: dict[str, Any]) -> bool:
    """Whether a multi-head attention call is the common case ``AttentionRecorder`` writes out."""
    unused = ("bias_k", "bias_v", "key_padding_mask", "attn_mask", "static_k", "static_v")
    return (
        all(call.get(name) is None for name in unused)
        and not call.get("add_zero_attn", False)
        and not call.get("use_separate_proj_weight", False)
        and not call.get("is_causal", False)
        and call.get("in_proj_weight") is not None
    )


def rollout(attentions: list[torch.Tensor], residual: float = 0.5) -> torch.Tensor:
    """Abnar & Zuidema's rollout of per-layer attentions (N, heads, T, T): (N, T, T)."""
    result = None
    for attention in attentions:
        mixed = (1 - residual) * attention.mean(1) + residual * torch.eye(
            attention.shape[-1], device=attention.device, dtype=attention.dtype
        )
        mixed = mixed / mixed.sum(-1, keepdim=True)
        result = mixed if result is None else mixed @ result
    assert result is not None
    return result


def gradient_rollout(attentions: list[torch.Tensor], gradients: list[torch.Tensor]) -> torch.Tensor:
    """Chefer, Gur & Wolf's accumulation of gradient-weighted attention: per layer
    Ā = mean over heads of (∇A ⊙ A)⁺, and R ← R + Ā·R from R = I; returns R (N, T, T)."""
    result = None
    for attention, gradient in zip(attentions, gradients):
        weighted = (gradient * attention).clamp_min(0).mean(1)
        if result is None:
            result = torch.eye(attention.shape[-1], device=attention.device, dtype=attention.dtype).expand_as(weighted)
        result = result + weighted @ result
    assert result is not None
    return result


class _TokenMap(Interpreter):
    """What both attention interpreters share: the recorded attentions of one forward pass and
    the first token's row of a token-to-token flow, on the patch grid."""

    paper_class: ClassVar[str] = "other"

    def __init__(self, classifier: Classifier, *, prefix_tokens: int = 1) -> None:
        super().__init__(classifier)
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 1:
            raise InputError(f"{self.name}'s prefix_tokens must be an integer >= 1, got {prefix_tokens!r}")
        self.prefix_tokens = prefix_tokens

    def check_attackable(self) -> None:
        """One probe image: refuse, in one line, a model without attention layers to read."""
        size = self.classifier.input_size or 224
        probe = torch.full((1, self.classifier.in_channels, size, size), 0.5, device=self.classifier.device)
        probe.requires_grad_(True)
        with self.classifier.frozen():
            self.surrogate_and_logits(probe, torch.zeros(1, dtype=torch.long, device=probe.device))

    def _attend(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The self-attentions (N, heads, T, T) of one forward pass, and its logits."""
        recorder = AttentionRecorder()
        with torch.enable_grad(), recorder:
            logits = self.classifier(images)
        if not recorder.attentions:
            raise ModelStructureError(
                f"{self.name}: {self.classifier.name} computed no attention (nn.MultiheadAttention or "
                f"F.scaled_dot_product_attention): it is not a transformer {self.name} can read"
            )
        tokens = recorder.attentions[0].shape[-1]
        return [a for a in recorder.attentions if a.shape[-1] == tokens and a.shape[-2] == tokens], logits

    def _grid(self, flow: torch.Tensor) -> torch.Tensor:
        """The first token's row of ``flow`` (N, T, T) over the patch tokens, on their square grid."""
        tokens = flow.shape[-1]
        patches = tokens - self.prefix_tokens
        side = math.isqrt(patches) if patches > 0 else 0
        if side * side != patches:
            raise ModelStructureError(
                f"{self.name}: {tokens} tokens less {self.prefix_tokens} prefix token(s) are not a square patch "
                "grid; set prefix_tokens= to the number of tokens before the patches"
            )
        return normalize_maps(flow[:, 0, self.prefix_tokens :].reshape(-1, 1, side, side))

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        maps, _, state = self.surrogate_and_logits(images, classes, state)
        return maps, state


class TransformerAttribution(_TokenMap):
    """Gradient-weighted attention flow (Chefer, Gur & Wolf, "Generic attention-model
    explainability", ICCV 2021; the class-specific successor of their CVPR 2021 relevance
    propagation): each layer's heads are averaged after weighting the attention by the positive
    part of its gradient for the class asked, and the layers accumulate as R ← R + Ā·R. The
    gradients keep their graph (``create_graph``), so ADV² differentiates the map itself.

    Args:
        classifier: a transformer (as for ``rollout``).
        prefix_tokens: tokens before the patch tokens (1: the class token).
    """

    name: ClassVar[str] = "transformer_attribution"
    description: ClassVar[str] = "gradient-weighted attention flow for a class (Chefer, Gur & Wolf 2021)"

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The map and the logits of one forward pass; the map stays differentiable."""
        maps, logits = self._maps(images, classes, create_graph=True)
        return maps, logits, state

    def explain(
        self, images: torch.Tensor, classes: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """The benign map: the attention's gradients taken without a graph to keep."""
        return self._maps(images.detach().requires_grad_(True), classes, create_graph=False)[0].detach()

    def _maps(
        self, images: torch.Tensor, classes: torch.Tensor, create_graph: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attentions, logits = self._attend(images)
        with torch.enable_grad():
            score = logits.gather(1, classes.view(-1, 1)).sum()  # samples are independent
            gradients = torch.autograd.grad(score, attentions, create_graph=create_graph)
        return self._grid(gradient_rollout(attentions, list(gradients))), logits


class AttentionRollout(_TokenMap):
    """Attention rollout (Abnar & Zuidema 2020) of a vision transformer, on its patch grid.

    Args:
        classifier: a transformer whose attention runs through ``nn.MultiheadAttention`` or
            ``F.scaled_dot_product_attention`` (torchvision's ViT, timm's ViT and DeiT).
        residual: the identity's share in each layer's mix (the paper's 0.5).
        prefix_tokens: tokens before the patch tokens (1: the class token; DeiT's distilled
            models have 2); the map is the first token's row over the patch tokens.
    """

    name: ClassVar[str] = "rollout"
    description: ClassVar[str] = "attention rollout through a transformer's layers (Abnar & Zuidema 2020)"

    def __init__(self, classifier: Classifier, *, residual: float = 0.5, prefix_tokens: int = 1) -> None:
        super().__init__(classifier, prefix_tokens=prefix_tokens)
        if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0 <= residual < 1:
            raise InputError(f"rollout's residual must be a number in [0, 1), got {residual!r}")
        self.residual = float(residual)

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The rollout map and the logits of the same forward pass, both differentiable."""
        attentions, logits = self._attend(images)
        return self._grid(rollout(attentions, self.residual)), logits, state
