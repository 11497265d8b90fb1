"""Shared test helpers: snapshot a model's mutable state and assert nothing changed or leaked."""

from __future__ import annotations

import torch
from torch import nn

State = tuple[list[bool], list[bool], dict[str, torch.Tensor]]


def snapshot(model: nn.Module) -> State:
    """Every module's training flag, every parameter's requires_grad, and the state dict."""
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def hooks_left(model: nn.Module) -> int:
    """Module hooks of any kind still registered anywhere in ``model``."""
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


def assert_unchanged(model: nn.Module, before: State, *, no_grads: bool = False) -> None:
    """Flags, requires_grad and state dict (BatchNorm statistics) as before, and no hook left."""
    training, requires_grad, state = before
    assert [m.training for m in model.modules()] == training
    assert [p.requires_grad for p in model.parameters()] == requires_grad
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), f"{key} changed"
    assert hooks_left(model) == 0
    if no_grads:
        assert all(p.grad is None for p in model.parameters()), "parameter gradients were built"
