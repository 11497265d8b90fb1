"""Settings from outside Python — TOML tables and ``--option KEY=VALUE`` — turned into the values a
constructor or a frozen dataclass declares, with one-line errors.

Why one module: interpreter options, attack configurations and run configs all read the same kinds
of values (numbers written as fractions such as ``1/255``, booleans, names, λ schedules), and a
typo must be refused the same way everywhere, before any work starts.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from .errors import InputError

_MISSING = inspect.Parameter.empty

#: The largest seed accepted anywhere (NumPy's and most peers' range): seeds get offsets added
#: (per batch, per image), which must stay far inside torch's 64-bit generator seeds.
MAX_SEED = 2**32 - 1


def check_seed(where: str, value: Any) -> int:
    """``value`` if it is a whole number in 0..``MAX_SEED``, else a one-line ``InputError``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise InputError(f"{where} must be a whole number in 0..{MAX_SEED}, got {value!r}")
    return value


@dataclass(frozen=True)
class OptionSpec:
    """One setting a component accepts: its name, its type hint and its default (``_MISSING``: none)."""

    name: str
    hint: Any
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        """No default: the setting must be given."""
        return self.default is _MISSING

    def describe(self) -> str:
        """``name: type = default`` for help texts."""
        shown = f"{self.name}: {type_name(self.hint)}"
        return shown if self.default is _MISSING else f"{shown} = {self.default!r}"


def parse_fraction(text: str | float) -> float:
    """Parse ε-style numbers: ``"8/255"``, ``"0.031"`` or a float."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return float(text)
    try:
        return float(Fraction(str(text).strip()))
    except (ValueError, ZeroDivisionError):
        raise InputError(f"cannot read {text!r} as a number (write e.g. 8/255 or 0.031)") from None


def constructor_options(cls: type, skip: int = 1) -> dict[str, OptionSpec]:
    """The keyword-only parameters of ``cls.__init__`` (after ``skip`` positional ones) as options.

    Keyword-only parameters are a component's settings; positional ones are what it is built on
    (the classifier, a network object) and never come from a config file.
    """
    signature = inspect.signature(cls.__init__)
    hints = _hints(cls.__init__)
    return {
        name: OptionSpec(name, hints.get(name, Any), parameter.default)
        for name, parameter in signature.parameters.items()
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY
    }


def dataclass_options(cls: type) -> dict[str, OptionSpec]:
    """The fields of a dataclass as options (for configuration types)."""
    hints = _hints(cls)
    specs = {}
    for field in dataclasses.fields(cls):
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = _MISSING
        specs[field.name] = OptionSpec(field.name, hints.get(field.name, Any), default)
    return specs


def coerce_options(where: str, values: Mapping[str, Any], specs: Mapping[str, OptionSpec]) -> dict[str, Any]:
    """Check every key against ``specs`` and convert each value to its declared type.

    ``where`` names the source in errors (``"interpreters.mask"``, ``"--option"``).
    """
    if not isinstance(values, Mapping):
        raise InputError(f"{where} must be a table of settings, got {values!r}")
    out = {}
    for key, value in values.items():
        if key not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise InputError(f"{where}: unknown option {key!r} (known: {known})")
        out[key] = coerce_value(f"{where}.{key}", value, specs[key].hint)
    return out


def parse_assignments(pairs: Sequence[str], flag: str = "--option") -> dict[str, str]:
    """``["k=v", ...]`` (the CLI's ``--option`` or ``--set``) → ``{"k": "v"}``; values stay text
    until coerced."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise InputError(f"{flag} expects KEY=VALUE, got {pair!r}")
        if key.strip() in out:
            raise InputError(f"{flag} {key.strip()!r} is given twice")
        out[key.strip()] = value.strip()
    return out


def coerce_value(where: str, value: Any, hint: Any) -> Any:
    """``value`` (Python, TOML or command-line text) as the type ``hint`` declares.

    Types with a ``from_value`` classmethod (e.g. the λ schedule) convert themselves.
    """
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(hint)
        if value is None or (isinstance(value, str) and value.lower() == "none" and type(None) in members):
            if type(None) in members:
                return None
        errors = []
        for member in (m for m in members if m is not type(None)):
            try:
                return coerce_value(where, value, member)
            except InputError as error:
                errors.append(str(error))
        raise InputError(errors[0] if len(errors) == 1 else f"{where} must be {type_name(hint)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if value in choices:
            return value
        raise InputError(f"{where} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        items = _items(where, value)
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        member = args[0] if args else Any
        converted = [coerce_value(f"{where}[{i}]", item, member) for i, item in enumerate(items)]
        return tuple(converted) if origin is not list and hint is not list else converted
    if origin in (Mapping, dict) or hint is dict:
        return _table(where, value)
    if isinstance(hint, type) and hasattr(hint, "from_value"):
        return hint.from_value(where, value)
    if hint is bool:
        return _boolean(where, value)
    if hint is int:
        return _integer(where, value)
    if hint is float:
        return _number(where, value)
    if hint in (str, Path):
        if isinstance(value, (str, Path)):
            return hint(value)
        raise InputError(f"{where} must be text, got {value!r}")
    if isinstance(hint, type):
        if isinstance(value, hint):
            return value
        raise InputError(f"{where} must be a {hint.__name__}, got {value!r}")
    return value


def type_name(hint: Any) -> str:
    """A readable name for a type hint (``float | None``, ``'logit' | 'ce'``)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(hint))
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


# ------------------------------------------------------------------------------- helpers
def _hints(target: Callable[..., Any] | type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target, include_extras=False)
    except Exception:  # an annotation that names something not importable: treat as untyped
        return {}


def _table(where: str, value: Any) -> dict[str, Any]:
    """A table of settings: a mapping, or its JSON text (the command line's ``--set``)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise InputError(f'{where} must be a JSON table such as {{"steps": 8}}, got {value!r}') from None
    if not isinstance(value, Mapping):
        raise InputError(f"{where} must be a table of settings, got {value!r}")
    return dict(value)


def _items(where: str, value: Any) -> list[Any]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, (list, tuple)):
        return list(value)
    raise InputError(f"{where} must be a list, got {value!r}")


def _boolean(where: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
        return value.lower() in ("true", "yes", "1")
    raise InputError(f"{where} must be true or false, got {value!r}")


def _integer(where: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"{where} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{where} must be an integer, got {value!r}")
    return value


def _number(where: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = parse_fraction(value)
        except InputError as error:
            raise InputError(f"{where}: {error}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{where} must be finite, got {value!r}")
    return float(value)
