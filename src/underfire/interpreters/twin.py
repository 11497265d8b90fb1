"""Rule-based back-propagation (DeepLIFT, LRP) through any PyTorch model, differentiably.

DeepLIFT and LRP replace each layer's backward pass by a rule. ADV² needs the resulting map as a
function of the input with a true gradient, so the rule backward must be the rule in the first
pass and yet every forward value it uses (activations, pre-activations, denominators) must keep its
ordinary derivative in the second. One autograd graph cannot be both, and module hooks (captum,
zennit) rewrite ``grad_input`` with detached tensors. :class:`TwinTrace` runs the model once under
a :class:`~torch.overrides.TorchFunctionMode` and builds, beside each forward value, a *twin*: a
tensor that is a linear function of a leaf (``seed``) whose backward is exactly the rule. The
rules' coefficients (DeepLIFT's multipliers, LRP's 1/z) are forward values, so they carry the
forward graph. The attribution is ``autograd.grad(twin score, seed, create_graph=...)``; its graph
leads to the image through those coefficients. Twin *values* are never read (each twin is linear
in the seed, so its gradient does not depend on them).

Which rule a call gets is decided by the call, not by module names: convolutions and linear
layers, ``batch_norm`` (folded into the convolution or linear layer whose output it normalises, as
zennit's canonizers do, but on the fly and without touching the weights), ReLU, the sum of two
traced tensors (residual additions, in place or not), average pooling and means, max pooling
(relevance goes to the maximum, the gradient's routing), elementwise arithmetic with constants
(the input normalisation), and shape operations. Anything else on a traced tensor stops the map
with a one-line ``ModelStructureError`` naming the operation: a rule the model needs is missing,
and a silently different map would be worse.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ..errors import ModelStructureError
from ..smoothing import _RELU_FUNCS, is_in_place_relu

_CONV = {torch.conv1d, torch.conv2d, torch.conv3d}
_LINEAR = {F.linear}
_BATCH_NORM = {F.batch_norm}
_ADD = {torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__}
_ADD_IN_PLACE = {torch.Tensor.add_, torch.Tensor.__iadd__}
_SUB = {torch.sub, torch.Tensor.sub, torch.Tensor.__sub__}
_ARITHMETIC = {
    torch.mul,
    torch.Tensor.mul,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.div,
    torch.Tensor.div,
    torch.Tensor.__truediv__,
    torch.Tensor.__rsub__,
}
_AVERAGE = {
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.avg_pool2d,
    F.avg_pool1d,
    torch.mean,
    torch.Tensor.mean,
}
_MAX_POOL = {F._max_pool2d, F.max_pool2d, torch.max_pool2d, F._max_pool1d, F.max_pool1d, torch.max_pool1d}
_SHAPE = {
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.reshape,
    torch.Tensor.flatten,
    torch.flatten,
    torch.Tensor.permute,
    torch.permute,
    torch.Tensor.transpose,
    torch.transpose,
    torch.Tensor.contiguous,
    torch.Tensor.clone,
    torch.clone,
    torch.Tensor.squeeze,
    torch.squeeze,
    torch.Tensor.unsqueeze,
    torch.unsqueeze,
    torch.Tensor.__getitem__,
    torch.cat,
    torch.concat,
    torch.stack,
    torch.Tensor.to,
    torch.Tensor.narrow,
    torch.narrow,
    torch.Tensor.split,
    torch.split,
    torch.Tensor.chunk,
    torch.chunk,
    torch.Tensor.float,
    torch.Tensor.type_as,
    F.dropout,
    F.dropout2d,
    F.pad,
    torch.Tensor.view_as,
    torch.Tensor.reshape_as,
}
_IN_PLACE_DUNDERS = {"__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__ipow__", "__setitem__"}
_CONSTANT = {
    torch.Tensor.detach,
    torch.detach,
    torch.zeros_like,
    torch.ones_like,
    torch.empty_like,
    torch.full_like,
    torch.rand_like,
    torch.randn_like,
    torch.Tensor.new_zeros,
    torch.Tensor.new_ones,
    torch.Tensor.new_empty,
    torch.Tensor.new_full,
    torch.Tensor.new_tensor,
    torch.sign,
    torch.Tensor.sign,
}


@dataclass(frozen=True)
class LinearLayer:
    """One affine layer as the forward pass called it: ``func(inputs, weight, bias, *args, **kwargs)``."""

    func: Callable[..., torch.Tensor]
    inputs: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: torch.Tensor
    first: bool

    def apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's operation on ``x`` with other parameters (a rule's modified weights)."""
        return self.func(x, weight, bias, *self.args, **self.kwargs)

    def fold(self, scale: torch.Tensor, shift: torch.Tensor, output: torch.Tensor) -> LinearLayer:
        """This layer followed by the per-channel affine map ``y·scale + shift`` (a BatchNorm)."""
        view = (-1,) + (1,) * (self.weight.dim() - 1)
        bias = shift if self.bias is None else self.bias * scale + shift
        return replace(self, weight=self.weight * scale.view(view), bias=bias, output=output)


class TwinRules(ABC):
    """The backward rules of one method; each returns the twin of an operation's output."""

    #: Whether ``relu`` needs the pre-activation (an in-place ReLU then works on a copy).
    needs_preactivation: bool = False

    @abstractmethod
    def layer(self, layer: LinearLayer, twin: torch.Tensor) -> torch.Tensor:
        """A convolution or linear layer (with a BatchNorm folded in)."""

    @abstractmethod
    def relu(self, pre: torch.Tensor, out: torch.Tensor, twin: torch.Tensor) -> torch.Tensor:
        """ReLU: ``pre`` the pre-activation, ``out`` the activation."""

    @abstractmethod
    def sum(self, a: torch.Tensor, b: torch.Tensor, twin_a: torch.Tensor, twin_b: torch.Tensor) -> torch.Tensor:
        """The sum of two traced tensors (a residual addition)."""

    @abstractmethod
    def average(
        self, pool: Callable[[torch.Tensor], torch.Tensor], a: torch.Tensor, twin: torch.Tensor
    ) -> torch.Tensor:
        """A linear pooling ``pool`` of ``a`` (average pooling, a mean)."""

    @abstractmethod
    def affine(self, apply: Callable[[torch.Tensor], torch.Tensor], twin: torch.Tensor) -> torch.Tensor:
        """An elementwise affine map by constants (the input normalisation, an unfolded BatchNorm);
        ``apply`` is its linear part."""


@dataclass
class _Pending:
    """A layer output whose twin is built on first use, so a BatchNorm right after can fold it."""

    layer: LinearLayer
    twin_in: torch.Tensor
    twin: torch.Tensor | None = None


class TwinTrace(TorchFunctionMode):
    """Inside this context, the forward pass of any model builds the twins of ``rules``;
    ``method`` names the interpreter in errors."""

    def __init__(self, rules: TwinRules, method: str) -> None:
        super().__init__()
        self.rules = rules
        self.method = method
        # id → (the value, its twin): the value is kept so a recycled id cannot alias it.
        self._twins: dict[int, tuple[torch.Tensor, torch.Tensor | _Pending]] = {}
        self._layers_seen = 0

    def bind(self, value: torch.Tensor) -> torch.Tensor:
        """A seed leaf for ``value`` (the input): the attribution is the gradient w.r.t. it."""
        seed = torch.zeros_like(value).requires_grad_(True)
        self._twins[id(value)] = (value, seed)
        return seed

    def twin(self, value: torch.Tensor) -> torch.Tensor:
        """The twin of a traced ``value`` (the logits after the forward pass); call it after the
        context has closed, so the rules' own operations are not traced."""
        found = self._lookup(value)
        if found is None:
            raise ModelStructureError(
                f"{self.method}: the model's output does not depend on its input through operations "
                "the rules follow; it cannot be explained this way"
            )
        return found

    def _lookup(self, value: Any) -> torch.Tensor | None:
        if not isinstance(value, torch.Tensor):
            return None
        entry = self._twins.get(id(value))
        if entry is None or entry[0] is not value:
            return None
        twin = entry[1]
        if isinstance(twin, _Pending):
            if twin.twin is None:
                twin.twin = self.rules.layer(twin.layer, twin.twin_in)
            return twin.twin
        return twin

    def _set(self, value: torch.Tensor, twin: torch.Tensor | _Pending) -> torch.Tensor:
        self._twins[id(value)] = (value, twin)
        return value

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        flat, _ = tree_flatten((args, kwargs))
        if not any(isinstance(t, torch.Tensor) and id(t) in self._twins for t in flat):
            return func(*args, **kwargs)
        if func in _CONV or func in _LINEAR:
            return self._layer(func, args, kwargs)
        if func in _BATCH_NORM:
            return self._batch_norm(func, args, kwargs)
        if func in _RELU_FUNCS:
            return self._relu(func, args, kwargs)
        if func in _ADD or func in _ADD_IN_PLACE or func in _SUB:
            handled = self._sum(func, args, kwargs)
            if handled is not None:
                return handled
            return self._affine(func, args, kwargs)
        if func in _ARITHMETIC:
            return self._affine(func, args, kwargs)
        if func in _AVERAGE:
            return self._average(func, args, kwargs)
        if func in _MAX_POOL:
            return self._max_pool(func, args, kwargs)
        name = getattr(func, "__name__", "")
        if (name.endswith("_") and not name.endswith("__")) or name in _IN_PLACE_DUNDERS:
            raise ModelStructureError(
                f"{self.method}: the model changes an activation in place ({name}), which the rules cannot "
                "follow; write it out of place (x = x * c instead of x *= c)"
            )
        out = func(*args, **kwargs)
        if func in _SHAPE:
            return self._shape(func, args, kwargs, out)
        if func in _CONSTANT or not any(
            isinstance(t, torch.Tensor) and t.is_floating_point() for t in tree_flatten(out)[0]
        ):
            return out  # sizes, indices, masks, detached copies: no relevance flows through them
        name = getattr(func, "__qualname__", None) or name or repr(func)
        raise ModelStructureError(
            f"{self.method} has no rule for {name}, which this model applies to its activations; "
            "explain it with grad, inputxgrad or ig, which need none"
        )

    # --- operations ---------------------------------------------------------------------------

    def _layer(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        out = func(*args, **kwargs)
        inputs, weight = args[0], args[1] if len(args) > 1 else kwargs["weight"]
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        twin_in = self._lookup(inputs)
        if twin_in is None or self._lookup(weight) is not None:
            raise ModelStructureError(f"{self.method}: a layer's weights depend on the input; no rule applies")
        rest = {k: v for k, v in kwargs.items() if k not in ("input", "weight", "bias")}
        layer = LinearLayer(func, inputs, weight, bias, tuple(args[3:]), rest, out, self._layers_seen == 0)
        self._layers_seen += 1
        return self._set(out, _Pending(layer, twin_in))

    def _batch_norm(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        names = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
        bound = {**dict(zip(names, args)), **kwargs}
        x = bound["input"]
        if bound.get("training", False):
            raise ModelStructureError(
                f"{self.method}: a BatchNorm runs in training mode; explain the model in eval mode"
            )
        entry = self._twins.get(id(x))
        out = func(*args, **kwargs)
        eps = bound.get("eps", 1e-5)
        scale = (bound["running_var"] + eps).rsqrt()
        if bound.get("weight") is not None:
            scale = scale * bound["weight"]
        shift = -bound["running_mean"] * scale
        if bound.get("bias") is not None:
            shift = shift + bound["bias"]
        pending = entry[1] if entry is not None and entry[0] is x else None
        if isinstance(pending, _Pending) and pending.twin is None:
            # BatchNorm right after a convolution: one affine layer (the canonizers' fold, on the fly).
            folded = pending.layer.fold(scale, shift, out)
            return self._set(out, _Pending(folded, pending.twin_in))
        twin = self._lookup(x)
        view = (1, -1) + (1,) * (x.dim() - 2)
        return self._set(out, self.rules.affine(lambda t: t * scale.view(view), twin))

    def _relu(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        z = args[0] if args else kwargs["input"]
        twin = self._lookup(z)
        pre = z.clone() if is_in_place_relu(func, args, kwargs) and self.rules.needs_preactivation else z
        out = func(*args, **kwargs)
        return self._set(out, self.rules.relu(pre, out, twin))

    def _sum(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor | None:
        if len(args) < 2 or kwargs.get("alpha", 1) != 1:
            return None
        a, b = args[0], args[1]
        twin_a, twin_b = self._lookup(a), self._lookup(b)
        if twin_a is None or twin_b is None or a.shape != b.shape:
            return None
        if func in _SUB:
            raise ModelStructureError(f"{self.method}: the model subtracts two activations; no rule applies")
        pre_a = a.clone() if func in _ADD_IN_PLACE else a
        out = func(*args, **kwargs)
        return self._set(out, self.rules.sum(pre_a, b, twin_a, twin_b))

    def _affine(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        traced = [i for i, t in enumerate(args) if self._lookup(t) is not None]
        divisor = func in (torch.div, torch.Tensor.div, torch.Tensor.__truediv__) and traced != [0]
        if len(traced) != 1 or divisor:
            raise ModelStructureError(
                f"{self.method}: the model multiplies or divides activations by each other "
                f"({getattr(func, '__name__', func)}); no rule applies"
            )
        index = traced[0]
        twin = self._lookup(args[index])
        out = func(*args, **kwargs)
        additive = func in _ADD or func in _ADD_IN_PLACE or func in _SUB or func is torch.Tensor.__rsub__

        def apply(t: torch.Tensor) -> torch.Tensor:
            if additive:  # twin ± constant has the twin's backward; the constant adds no relevance
                return -t if func is torch.Tensor.__rsub__ or (func in _SUB and index == 1) else t
            others = list(args)
            others[index] = t
            return func(*others, **kwargs)

        return self._set(out, self.rules.affine(apply, twin))

    def _average(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        a = args[0] if args else kwargs["input"]
        twin = self._lookup(a)
        out = func(*args, **kwargs)

        def pool(t: torch.Tensor) -> torch.Tensor:
            return func(t, *args[1:], **kwargs)

        return self._set(out, self.rules.average(pool, a, twin))

    def _max_pool(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
        """Relevance (or the multiplier) goes to each window's maximum, as the gradient routes it."""
        a = args[0] if args else kwargs["input"]
        twin = self._lookup(a)
        names = ("kernel_size", "stride", "padding", "dilation", "ceil_mode")
        bound = {**dict(zip(names, args[1:])), **{k: v for k, v in kwargs.items() if k != "return_indices"}}
        pool = F.max_pool1d if func in (F._max_pool1d, F.max_pool1d, torch.max_pool1d) else F.max_pool2d
        out, indices = pool(a, **{k: v for k, v in bound.items() if k != "input"}, return_indices=True)
        self._set(out, twin.flatten(2).gather(2, indices.flatten(2)).view(out.shape))
        return (out, indices) if kwargs.get("return_indices") else out

    def _shape(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        """Shape operations act on the twins as on the values (constants become zero twins)."""

        def substitute(t: Any) -> Any:
            if not isinstance(t, torch.Tensor):
                return t
            twin = self._lookup(t)
            return twin if twin is not None else torch.zeros_like(t)

        twin_args = tree_map(substitute, args)
        twin_kwargs = tree_map(substitute, kwargs)
        if func is torch.Tensor.__getitem__:
            twin_args = (twin_args[0], args[1])  # the index stays the index
        twin_out = func(*twin_args, **twin_kwargs)
        values, _ = tree_flatten(out)
        twins, _ = tree_flatten(twin_out)
        for value, twin in zip(values, twins):
            if isinstance(value, torch.Tensor) and isinstance(twin, torch.Tensor):
                self._set(value, twin)
        return out


class ReluRecorder(TorchFunctionMode):
    """Inside this context, records ``(pre-activation, activation)`` of every ReLU the model
    applies to values derived from its input, in call order: the reference pass DeepLIFT pairs
    with the traced input pass. Values count as derived as :class:`TwinTrace` counts them (the
    outputs of calls on derived floating-point tensors, except constants such as ``detach``), so
    both passes see the same ReLUs."""

    def __init__(self) -> None:
        super().__init__()
        self.activations: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._derived: dict[int, torch.Tensor] = {}

    def bind(self, value: torch.Tensor) -> None:
        """Mark ``value`` (the reference input) as the pass's input."""
        self._derived[id(value)] = value

    def __exit__(self, *exc: Any) -> None:
        self._derived = {}  # the recorded pairs stay; nothing else is kept alive
        super().__exit__(*exc)

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        derived = self._derived
        flat, _ = tree_flatten((args, kwargs))
        if not any(isinstance(t, torch.Tensor) and derived.get(id(t)) is t for t in flat):
            return func(*args, **kwargs)
        if func in _RELU_FUNCS:
            z = args[0] if args else kwargs["input"]
            # copies: an activation changed in place later (h = relu(z); h += skip) must not
            # change the recorded one (an in-place ReLU's pre-activation is copied before the call)
            in_place = is_in_place_relu(func, args, kwargs)
            pre = z.clone() if in_place else z
            out = func(*args, **kwargs)
            self.activations.append((pre if in_place else pre.clone(), out.clone()))
        else:
            out = func(*args, **kwargs)
        if func not in _CONSTANT:
            for value in tree_flatten(out)[0]:
                if isinstance(value, torch.Tensor) and value.is_floating_point():
                    derived[id(value)] = value
        return out

    def pair(self, index: int, pre: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The reference's ``index``-th ReLU (pre-activation, activation), checked against the
        input pass's ``pre``."""
        if index >= len(self.activations) or self.activations[index][0].shape != pre.shape:
            raise ModelStructureError(
                f"{method}: the model applies different ReLUs to the baseline than to the input "
                f"(ReLU {index + 1} of {len(self.activations)}); it needs the same operations on both"
            )
        return self.activations[index]

    def check_all_used(self, used: int, method: str) -> None:
        """One line if the input pass applied fewer ReLUs than the reference pass."""
        if used != len(self.activations):
            raise ModelStructureError(
                f"{method}: the model applies {len(self.activations)} ReLUs to the baseline but {used} "
                "to the input; it needs the same operations on both"
            )


def check_traceable(classifier: Any, method: str) -> None:
    """A one-line ``ModelStructureError`` for models whose operations the tracer cannot follow: a
    TorchScript graph runs in C++ (the mode never sees it) and a ``torch.export`` program calls
    aten operators, which have no rules here."""
    network = getattr(classifier, "network", None)
    if getattr(classifier, "is_scripted", False):
        raise ModelStructureError(
            f"{method} follows the model's torch calls in Python and cannot see inside the TorchScript "
            f"graph of {getattr(classifier, 'name', 'the model')}; load it as a Python module (module:function)"
        )
    if isinstance(network, nn.Module) and any(
        type(module).__module__.startswith("torch.export") for module in network.modules()
    ):
        raise ModelStructureError(
            f"{method} has no rules for the aten operators of a torch.export program; load the model "
            "as a Python module (module:function), or explain it with grad, inputxgrad or ig"
        )


def trace_logits(
    classifier: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, rules: TwinRules, method: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``classifier`` on ``x`` under a :class:`TwinTrace`: (logits, their twin, the seed)."""
    with TwinTrace(rules, method) as trace:
        seed = trace.bind(x)
        logits = classifier(x)
    return logits, trace.twin(logits), seed  # a pending last layer resolves outside the mode


def stabilize(z: torch.Tensor, epsilon: float) -> torch.Tensor:
    """z + ε·sign(z), with sign(0) = +1 (zennit's stabiliser): a denominator that is never zero."""
    return torch.where(z >= 0, z + epsilon, z - epsilon)
