"""ReLU-gradient surrogates: ReLU's forward value, a smooth function's derivative.

A ReLU network is piecewise linear, so the gradient of a gradient map (what the ADV² attack on
GRAD needs) is zero almost everywhere. Zhang et al. (USENIX Security 2020, §3.2) fix
this by back-propagating, during the attack, the derivative of a smooth approximation of ReLU
while the forward pass stays the exact ReLU. This module offers their ``h`` (τ = 1e-4), the sigmoid
they compare it with, softplus(β) (Dombrowski et al., NeurIPS 2019, "Explanations can be
manipulated and geometry is to blame") and ``none`` (the true ReLU), and one context manager,
:func:`relu_surrogate`, that applies a surrogate to every ReLU of any model.

How: a :class:`torch.overrides.TorchFunctionMode` scoped by the context sees every call of
``F.relu`` (hence every ``nn.ReLU`` module, in-place or reused), ``F.relu_``, ``torch.relu``,
``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_`` and replaces it by the straight-through form

    relu(z).detach() + (g(z) − g(z).detach())

where ``g`` is an antiderivative of the surrogate derivative. The bracket is exactly zero, so the
value is bit-for-bit ReLU's; its first derivative is ``g'`` and its second ``g''`` — no custom
``autograd.Function`` and no hooks. (The form ``g + (relu − g).detach()`` would round.)

The rest of the ReLU family is reached the same way, each written with ReLUs so the surrogate
smooths every kink: ReLU6 and Hardtanh (``F.relu6``, ``F.hardtanh``, ``nn.ReLU6``), LeakyReLU,
PReLU, Hardsigmoid and Hardswish (``PIECEWISE_ACTIVATIONS``), their in-place forms included.
Smooth activations (SiLU, GELU, Softplus, Tanh, Sigmoid, ...: ``SMOOTH_ACTIVATIONS``) keep their
exact derivatives. ``torch.export`` programs are reached too: their graphs call ``torch.ops.aten.relu.default`` and
``relu_.default``, which pass the mode as well. Limits: TorchScript models run their graph in C++,
bypassing Python-level torch functions, and are not reached (the attack's zero-gradient guard
stops an ADV² whose interpretation term has no gradient); the mode is thread-local (like every torch function mode); a non-finite
pre-activation (±inf) gives NaN instead of ReLU's value under a smooth surrogate.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .errors import InputError

SurrogateKind = Literal["h", "sigmoid", "softplus", "none"]
SURROGATE_KINDS: tuple[str, ...] = ("h", "sigmoid", "softplus", "none")


@dataclass(frozen=True)
class ReluSurrogate:
    """Which derivative ReLU back-propagates inside :func:`relu_surrogate`.

    ``kind``:
      * ``"h"`` — Zhang et al. 2020: g(z) = z + √(z²+τ) (z < 0), √(z²+τ) (z ≥ 0);
        g'(z) = 1 + z/√(z²+τ) (z < 0), z/√(z²+τ) (z ≥ 0); g''(z) = τ/(z²+τ)^{3/2}.
        (As in the paper, g' jumps from 1 to 0 at z = 0; it dips only for |z| ≲ √τ.)
      * ``"sigmoid"`` — g = softplus, g' = σ(z) (the paper's comparison).
      * ``"softplus"`` — Dombrowski et al. 2019: g = softplus(βz)/β, g' = σ(βz).
      * ``"none"`` — the true ReLU derivative (second derivative zero).

    ``relative``: measure z in units of its own scale, per sample — g_s(z) = s·g(z/s) with s the
    root mean square of the sample's pre-activations at that ReLU (detached) — so the smoothing
    width (√τ, 1/β) means the same on a model whose ReLUs see values in the hundreds as on one
    with batch-normalised inputs. (With s = 1 it is the absolute surrogate.)
    """

    kind: SurrogateKind = "h"
    tau: float = 1e-4
    beta: float = 10.0
    relative: bool = False

    def __post_init__(self) -> None:
        if self.kind not in SURROGATE_KINDS:
            raise InputError(f"unknown ReLU surrogate {self.kind!r}; choose one of {', '.join(SURROGATE_KINDS)}")
        for field, value in (("tau", self.tau), ("beta", self.beta)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise InputError(f"{field} must be a number, got {type(value).__name__}")
            if not math.isfinite(value) or value <= 0:
                raise InputError(f"{field} must be a positive finite number, got {value}")
        if not isinstance(self.relative, bool):
            raise InputError(f"relative must be True or False, got {self.relative!r}")

    def antiderivative(self, z: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
        """g(z − shift): a function whose derivative is the surrogate derivative (``none``: ReLU
        itself); ``relative`` measures the width in units of ``z``'s own scale (not of z − shift),
        so a ReLU6's two kinks are smoothed alike."""
        if self.relative and self.kind != "none":
            flat = z.detach().flatten(1) if z.dim() > 1 else z.detach().flatten()[None]
            scale = flat.pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *([1] * (z.dim() - 1)))
            return scale * self._absolute((z - shift) / scale)
        return self._absolute(z - shift if shift else z)

    def _absolute(self, z: torch.Tensor) -> torch.Tensor:
        if self.kind == "h":
            # hypot(z, √τ) = √(z²+τ) without overflow for large |z|; the where() adds z on z < 0
            # only, so g'(0) = 0 exactly as the paper's z ≥ 0 branch says.
            root = torch.hypot(z, z.new_tensor(math.sqrt(self.tau)))
            return root + torch.where(z < 0, z, 0.0)
        if self.kind == "sigmoid":
            return F.softplus(z)
        if self.kind == "softplus":
            return F.softplus(z, beta=self.beta)
        return torch.relu(z)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        """ReLU of ``z`` (exact value) whose gradient is this surrogate's derivative; out of place."""
        if self.kind == "none":
            return torch.relu(z)
        with torch.no_grad():
            value = torch.relu(z)
        g = self.antiderivative(z)
        return value + (g - g.detach())


def as_relu_surrogate(surrogate: ReluSurrogate | str) -> ReluSurrogate:
    """Accept a :class:`ReluSurrogate` or a kind name (``"h"``, ``"sigmoid"``, ...)."""
    if isinstance(surrogate, ReluSurrogate):
        return surrogate
    if isinstance(surrogate, str):
        return ReluSurrogate(kind=surrogate)  # type: ignore[arg-type]
    raise InputError(
        f"relu surrogate must be a ReluSurrogate or one of {', '.join(SURROGATE_KINDS)}, got {type(surrogate).__name__}"
    )


class _WriteInto(torch.autograd.Function):
    """``z ← out`` in place, the gradient flowing to ``out`` only.

    ``z.copy_(out)`` means the same, but its backward also sends a zero gradient to the old ``z``;
    summed with the real one it reaches the layer before (BatchNorm, in the built-in ResNet) in
    the contiguous layout, and BatchNorm's backward on a channels-last input then takes its slow
    path, many times slower (docs/tuning.md has the timing).
    The backward is the identity, so double back-propagation passes through it unchanged."""

    @staticmethod
    def forward(ctx: Any, z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(z)
        return z.copy_(out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor]:
        return None, grad


def write_into(z: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """An in-place ReLU's result written into its argument (``_WriteInto``; a view keeps ``copy_``,
    which autograd rebases onto the view's base)."""
    if z._base is not None:
        return z.copy_(out)
    return _WriteInto.apply(z, out)


# The aten overloads are what a torch.export program's graph calls (it passes torch function
# modes the OpOverload itself); F.relu_ is torch.relu_; nn.ReLU calls F.relu(input, inplace=...).
_OUT_OF_PLACE: frozenset[Callable[..., Any]] = frozenset({torch.relu, torch.Tensor.relu, torch.ops.aten.relu.default})
_IN_PLACE: frozenset[Callable[..., Any]] = frozenset({torch.relu_, torch.Tensor.relu_, torch.ops.aten.relu_.default})
_RELU_FUNCS = _OUT_OF_PLACE | _IN_PLACE | {F.relu}

#: The rest of the ReLU family: piecewise-linear activations (and Hardswish, piecewise quadratic)
#: whose second derivative is zero almost everywhere, each written with ReLUs (``_family_g``), so
#: the surrogate smooths every kink. Their in-place forms and the aten overloads an export graph
#: calls are included.
_FAMILY: dict[Callable[..., Any], tuple[str, bool]] = {
    F.relu6: ("relu6", False),
    F.hardtanh: ("hardtanh", False),
    F.hardtanh_: ("hardtanh", True),
    F.leaky_relu: ("leaky_relu", False),
    F.leaky_relu_: ("leaky_relu", True),
    F.prelu: ("prelu", False),
    F.hardswish: ("hardswish", False),
    F.hardsigmoid: ("hardsigmoid", False),
    torch.ops.aten.relu6.default: ("relu6", False),
    torch.ops.aten.hardtanh.default: ("hardtanh", False),
    torch.ops.aten.hardtanh_.default: ("hardtanh", True),
    torch.ops.aten.leaky_relu.default: ("leaky_relu", False),
    torch.ops.aten.leaky_relu_.default: ("leaky_relu", True),
    torch.ops.aten.prelu.default: ("prelu", False),
    torch.ops.aten.hardswish.default: ("hardswish", False),
    torch.ops.aten.hardswish_.default: ("hardswish", True),
    torch.ops.aten.hardsigmoid.default: ("hardsigmoid", False),
    torch.ops.aten.hardsigmoid_.default: ("hardsigmoid", True),
}
#: Activations that are smooth already: an attack differentiates them exactly (no surrogate).
SMOOTH_ACTIVATIONS: tuple[str, ...] = ("silu", "gelu", "softplus", "tanh", "sigmoid", "elu", "selu", "mish")
#: The ReLU-family activations the surrogate reaches (``relu`` and ``_FAMILY``).
PIECEWISE_ACTIVATIONS: tuple[str, ...] = (
    "relu",
    "relu6",
    "hardtanh",
    "leaky_relu",
    "prelu",
    "hardswish",
    "hardsigmoid",
)


#: Where each family function takes ``inplace`` positionally (``nn.ReLU6``, ``nn.LeakyReLU`` pass it so).
_INPLACE_POSITION = {"relu6": 1, "hardtanh": 3, "leaky_relu": 2, "hardswish": 1, "hardsigmoid": 1}


def _argument(args: tuple[Any, ...], kwargs: dict[str, Any], position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _family_call(kind: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, bool, tuple[Any, ...]]:
    """(input, in place?, parameters) of a family call, however its arguments were passed."""
    z = args[0] if args else kwargs.get("input", kwargs.get("self"))
    inplace = (
        bool(_argument(args, kwargs, _INPLACE_POSITION[kind], "inplace", False)) if kind in _INPLACE_POSITION else False
    )
    if kind == "hardtanh":
        return (
            z,
            inplace,
            (float(_argument(args, kwargs, 1, "min_val", -1.0)), float(_argument(args, kwargs, 2, "max_val", 1.0))),
        )
    if kind == "leaky_relu":
        return z, inplace, (float(_argument(args, kwargs, 1, "negative_slope", 0.01)),)
    if kind == "prelu":
        return z, inplace, (_argument(args, kwargs, 1, "weight", None),)
    return z, inplace, ()


def _family_value(kind: str, z: torch.Tensor, parameters: tuple[Any, ...]) -> torch.Tensor:
    """The activation's exact value, out of place (without any torch function mode)."""
    if kind == "relu6":
        return F.hardtanh(z, 0.0, 6.0)
    if kind == "hardtanh":
        return F.hardtanh(z, *parameters)
    if kind == "leaky_relu":
        return F.leaky_relu(z, *parameters)
    if kind == "prelu":
        return F.prelu(z, *parameters)
    return F.hardswish(z) if kind == "hardswish" else F.hardsigmoid(z)


def _family_g(kind: str, z: torch.Tensor, parameters: tuple[Any, ...], g: ReluSurrogate) -> torch.Tensor:
    """The activation ``kind`` with every ReLU in it replaced by the surrogate's g:
    hardtanh(z; a, b) = a + relu(z − a) − relu(z − b) (ReLU6: a, b = 0, 6); leaky_relu(z; s) =
    s·z + (1 − s)·relu(z) (PReLU: s per channel); hardsigmoid(z) = relu6(z + 3)/6; hardswish(z) =
    z·hardsigmoid(z)."""
    if kind in ("relu6", "hardtanh"):
        low, high = (0.0, 6.0) if kind == "relu6" else parameters
        return low + g.antiderivative(z, low) - g.antiderivative(z, high)
    if kind in ("leaky_relu", "prelu"):
        slope = parameters[0]
        if kind == "prelu" and z.dim() > 1 and slope.numel() > 1:
            slope = slope.view(1, -1, *([1] * (z.dim() - 2)))
        return slope * z + (1 - slope) * g.antiderivative(z)
    ramp = (g.antiderivative(z, -3.0) - g.antiderivative(z, 3.0)) / 6  # hardsigmoid
    return ramp if kind == "hardsigmoid" else z * ramp


def is_in_place_relu(func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ReLU call overwrites its argument (``relu_``, or ``F.relu(x, inplace=True)``,
    also given positionally): the one test every mode that replaces ReLUs uses."""
    return func in _IN_PLACE or (func is F.relu and bool(kwargs.get("inplace", len(args) > 1 and args[1])))


class _ReluSurrogateMode(TorchFunctionMode):
    """Replaces every ReLU call while active; all other torch functions pass through."""

    def __init__(self, surrogate: ReluSurrogate) -> None:
        super().__init__()
        self.surrogate = surrogate

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func in _FAMILY:
            return self._family(func, args, kwargs)
        if func not in _RELU_FUNCS:
            return func(*args, **kwargs)
        z = args[0] if args else kwargs.get("input")
        if (
            self.surrogate.kind == "none"
            or not isinstance(z, torch.Tensor)
            or not (z.requires_grad and torch.is_grad_enabled())
        ):
            # The true ReLU, hidden from any enclosing surrogate mode: the innermost context wins.
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        inplace = is_in_place_relu(func, args, kwargs)
        # An in-place call overwrites z, which g's backward must not have saved: work on a copy,
        # then write the result into z.
        source = z.clone() if inplace else z
        with torch.no_grad(), torch._C.DisableTorchFunction():
            value = torch.relu(source)
        g = self.surrogate.antiderivative(source)
        out = value + (g - g.detach())
        return write_into(z, out) if inplace else out

    def _family(self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """A ReLU-family activation: its exact value, the surrogate's derivatives."""
        kind, inplace = _FAMILY[func]
        z, positional_inplace, parameters = _family_call(kind, args, kwargs)
        inplace = inplace or positional_inplace
        # ``none`` goes through the ReLU decomposition too: its exact derivatives, twice
        # differentiable (torch has no double backward for hardsigmoid itself)
        if not isinstance(z, torch.Tensor) or not (z.requires_grad and torch.is_grad_enabled()):
            with torch._C.DisableTorchFunction():
                return func(*args, **kwargs)
        source = z.clone() if inplace else z
        with torch.no_grad(), torch._C.DisableTorchFunction():
            value = _family_value(kind, source, parameters)
        g = _family_g(kind, source, parameters, self.surrogate)
        out = value + (g - g.detach())
        return write_into(z, out) if inplace else out


@contextmanager
def relu_surrogate(surrogate: ReluSurrogate | str = "h") -> Iterator[ReluSurrogate]:
    """Inside this context every ReLU keeps its value but back-propagates ``surrogate``'s derivative.

    Reaches ``nn.ReLU`` modules (in-place and reused ones), ``F.relu`` (also ``inplace=True``),
    ``F.relu_``, ``torch.relu``, ``torch.relu_``, ``Tensor.relu`` and ``Tensor.relu_``. In-place
    calls still modify their argument. The graph is twice differentiable, so
    ``torch.autograd.grad(..., create_graph=True)`` inside the context yields the smoothed second
    derivative (Zhang et al. 2020, §3.2). Contexts nest (the innermost surrogate applies, so
    ``relu_surrogate("none")`` restores exact gradients locally) and are removed on exit, also
    after an exception. Yields the resolved :class:`ReluSurrogate`.
    """
    spec = as_relu_surrogate(surrogate)
    with _ReluSurrogateMode(spec):
        yield spec


class _SoftplusMode(TorchFunctionMode):
    """Replaces every ReLU call, value and derivative, by softplus(βz)/β while active."""

    def __init__(self, beta: float) -> None:
        super().__init__()
        self.beta = beta

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if func not in _RELU_FUNCS:
            return func(*args, **kwargs)
        z = args[0] if args else kwargs.get("input")
        inplace = is_in_place_relu(func, args, kwargs)
        with torch._C.DisableTorchFunction():  # no enclosing ReLU surrogate sees it: softplus is not a ReLU
            out = F.softplus(z.clone() if inplace else z, beta=self.beta)
            return write_into(z, out) if inplace else out


@contextmanager
def softplus_relus(beta: float) -> Iterator[None]:
    """Inside this context every ReLU *is* softplus(βz)/β, in value and derivative: the β-smoothed
    network Dombrowski et al. (NeurIPS 2019) explain to make maps robust to manipulation. Unlike
    :func:`relu_surrogate` the forward values change (by at most log 2 / β per ReLU), so only an
    explanation runs inside it, never the prediction. Reaches the same calls as
    :func:`relu_surrogate`; innermost context wins."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta <= 0:
        raise InputError(f"softplus β must be a positive finite number, got {beta!r}")
    with _SoftplusMode(float(beta)):
        yield
