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

__all__ = ["AttentionRecorder", "AttentionRollout", "rollout"]


class AttentionRecorder(TorchFunctionMode):
    """While active, every attention a model computes is recorded as (N, heads, queries, keys),
    in its graph: ``nn.MultiheadAttention`` is asked for per-head weights (it then runs its plain
    kernel), ``F.scaled_dot_product_attention`` is computed with an explicit softmax. The outputs
    are the model's own (up to float rounding of the plain kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.attentions: list[torch.Tensor] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = dict(kwargs or {})
        if func is F.multi_head_attention_forward:
            wanted = kwargs.get("need_weights", True)
            average = kwargs.get("average_attn_weights", True)
            kwargs.update(need_weights=True, average_attn_weights=False)
            output, weights = func(*args, **kwargs)
            self.attentions.append(weights if weights.dim() == 4 else weights[None])
            if not wanted:
                return output, None
            return output, weights.mean(-3) if average else weights
        if func is F.scaled_dot_product_attention:
            return self._plain_attention(*args, **kwargs)
        return func(*args, **kwargs)

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


class AttentionRollout(Interpreter):
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
    paper_class: ClassVar[str] = "other"

    def __init__(self, classifier: Classifier, *, residual: float = 0.5, prefix_tokens: int = 1) -> None:
        super().__init__(classifier)
        if isinstance(residual, bool) or not isinstance(residual, (int, float)) or not 0 <= residual < 1:
            raise InputError(f"rollout's residual must be a number in [0, 1), got {residual!r}")
        if isinstance(prefix_tokens, bool) or not isinstance(prefix_tokens, int) or prefix_tokens < 1:
            raise InputError(f"rollout's prefix_tokens must be an integer >= 1, got {prefix_tokens!r}")
        self.residual = float(residual)
        self.prefix_tokens = prefix_tokens

    def check_attackable(self) -> None:
        """One probe image: refuse, in one line, a model without attention layers rollout reads."""
        size = self.classifier.input_size or 224
        probe = torch.full((1, self.classifier.in_channels, size, size), 0.5, device=self.classifier.device)
        with self.classifier.frozen():
            self.surrogate_and_logits(probe, torch.zeros(1, dtype=torch.long, device=probe.device))

    def surrogate_and_logits(
        self, images: torch.Tensor, classes: torch.Tensor, state: Any = None
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """The rollout map and the logits of the same forward pass, both differentiable."""
        recorder = AttentionRecorder()
        with torch.enable_grad(), recorder:
            logits = self.classifier(images)
        if not recorder.attentions:
            raise ModelStructureError(
                f"rollout: {self.classifier.name} computed no attention (nn.MultiheadAttention or "
                "F.scaled_dot_product_attention): it is not a transformer rollout can read"
            )
        tokens = recorder.attentions[0].shape[-1]
        layers = [a for a in recorder.attentions if a.shape[-1] == tokens and a.shape[-2] == tokens]
        patches = tokens - self.prefix_tokens
        side = math.isqrt(patches) if patches > 0 else 0
        if side * side != patches:
            raise ModelStructureError(
                f"rollout: {tokens} tokens less {self.prefix_tokens} prefix token(s) are not a square patch grid; "
                "set prefix_tokens= to the number of tokens before the patches"
            )
        flow = rollout(layers, self.residual)[:, 0, self.prefix_tokens :]
        maps = normalize_maps(flow.reshape(-1, 1, side, side))
        return maps, logits, state

    def surrogate(self, images: torch.Tensor, classes: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, Any]:
        maps, _, state = self.surrogate_and_logits(images, classes, state)
        return maps, state
