"""The experiment config of ``underfire run``: a TOML file → a frozen, validated dataclass.

Why validate everything first: an experiment runs for minutes to hours; a typo found after the
first model would waste all of that. Every error is one ``InputError`` line naming the key.

    [experiment]
    name = "demo"
    seed = 0
    preset = "quick"                 # quick | paper
    eps = "8/255"
    images = 16                      # correctly classified images per model
    data = "shapes:test"             # or a folder (open_dataset spec)
    batch_size = 16
    target = "random"                # or a class name / id
    target_maps = ["benign"]         # benign | other | shape | circle | rectangle | PATH.npy
    models = ["shapes-resnet", "shapes-densenet"]
    interpreters = ["grad", "cam", "rts", "mask"]
    attacks = ["pgd", "adv2"]
    transfer = true                  # ADV² examples of each interpreter explained by every other
    [overrides]                      # any AttackConfig field, for every interpreter
    adv_steps = 60
    [overrides.mask]                 # per interpreter (wins over [overrides])
    adv_steps = 30

Relative paths (a data folder, a ``.npy`` target map) are relative to the working directory, as
everywhere else on the command line.
"""

from __future__ import annotations

import functools
import json
import math
import tomllib
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..attacks.config import PRESETS, AttackConfig, LambdaSchedule, parse_fraction, preset
from ..attacks.targets import load_user_map
from ..errors import InputError, UnderfireError
from ..interpreters import INTERPRETERS

ATTACKS = ("pgd", "adv2")
TARGET_MAP_KINDS = ("benign", "other", "shape", "circle", "rectangle")


@dataclass(frozen=True)
class ExperimentConfig:
    """What one run attacks and measures (the ``[experiment]`` table), plus attack overrides.

    ``overrides`` apply to every interpreter's ``AttackConfig``; ``interpreter_overrides[name]``
    to one interpreter, after them. Both are read-only mappings of TOML values.
    """

    name: str = "experiment"
    seed: int = 0
    preset: str = "quick"
    eps: float = 8 / 255
    images: int = 16
    data: str = "shapes:test"
    batch_size: int = 16
    target: str = "random"
    target_maps: tuple[str, ...] = ("benign",)
    models: tuple[str, ...] = ("shapes-resnet", "shapes-densenet")
    interpreters: tuple[str, ...] = ("grad", "cam", "rts", "mask")
    attacks: tuple[str, ...] = ATTACKS
    transfer: bool = True
    overrides: Mapping[str, Any] = field(default_factory=dict)
    interpreter_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # normalising a frozen instance
        _text("name", self.name)
        _integer("seed", self.seed, minimum=0)
        if self.preset not in PRESETS:
            raise InputError(f"experiment.preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        set_("eps", _eps(self.eps))
        _integer("images", self.images, minimum=1)
        _text("data", self.data)
        _integer("batch_size", self.batch_size, minimum=1)
        if isinstance(self.target, bool) or not isinstance(self.target, (str, int)) or str(self.target).strip() == "":
            raise InputError(f"experiment.target must be 'random', a class name or a class id, got {self.target!r}")
        set_("target", str(self.target).strip())
        set_("target_maps", _names("target_maps", self.target_maps))
        for kind in self.target_maps:
            if kind not in TARGET_MAP_KINDS and not kind.endswith(".npy"):
                raise InputError(
                    f"experiment.target_maps: {kind!r} is not one of {', '.join(TARGET_MAP_KINDS)} or a .npy file"
                )
            if kind.endswith(".npy"):
                try:
                    load_user_map(kind)
                except InputError as error:
                    raise InputError(f"experiment.target_maps: {error}") from None
        set_("models", _names("models", self.models))
        set_("interpreters", _names("interpreters", self.interpreters))
        for name in self.interpreters:
            if name not in INTERPRETERS or name not in PRESETS[self.preset]:
                known = [n for n in INTERPRETERS if n in PRESETS[self.preset]]
                raise InputError(f"experiment.interpreters: unknown interpreter {name!r}; choose from {', '.join(known)}")
        set_("attacks", _names("attacks", self.attacks))
        for name in self.attacks:
            if name not in ATTACKS:
                raise InputError(f"experiment.attacks: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
        if not isinstance(self.transfer, bool):
            raise InputError(f"experiment.transfer must be true or false, got {self.transfer!r}")
        if not isinstance(self.overrides, Mapping):
            raise InputError("overrides must be a table of AttackConfig fields")
        set_("overrides", MappingProxyType(dict(self.overrides)))
        if not isinstance(self.interpreter_overrides, Mapping):
            raise InputError("interpreter overrides must be a table per interpreter")
        per = {}
        for name, table in self.interpreter_overrides.items():
            if name not in self.interpreters:
                raise InputError(f"overrides.{name}: {name!r} is not one of the configured interpreters ({', '.join(self.interpreters)})")
            if not isinstance(table, Mapping):
                raise InputError(f"overrides.{name} must be a table of AttackConfig fields")
            per[name] = MappingProxyType(dict(table))
        set_("interpreter_overrides", MappingProxyType(per))
        for name in self.interpreters:  # every attack config is built (and validated) now
            self.attack_config(name)

    # ---------------------------------------------------------------------------- reading
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """From the parsed TOML document (tables ``experiment`` and optional ``overrides``)."""
        unknown = sorted(set(data) - {"experiment", "overrides"})
        if unknown:
            raise InputError(f"unknown table or key {unknown[0]!r} (expected [experiment] and [overrides])")
        experiment = data.get("experiment")
        if not isinstance(experiment, Mapping):
            raise InputError("the config needs an [experiment] table")
        names = {f.name for f in fields(cls)} - {"overrides", "interpreter_overrides"}
        unknown = sorted(set(experiment) - names)
        if unknown:
            raise InputError(f"unknown key experiment.{unknown[0]} (known: {', '.join(sorted(names))})")
        values = dict(experiment)
        for key in ("target_maps", "models", "interpreters", "attacks"):
            if key in values:
                if not isinstance(values[key], list):
                    raise InputError(f"experiment.{key} must be a list, got {values[key]!r}")
                values[key] = tuple(values[key])
        overrides = data.get("overrides", {})
        if not isinstance(overrides, Mapping):
            raise InputError("[overrides] must be a table")
        attack_fields = set(AttackConfig.__dataclass_fields__)
        shared = {k: v for k, v in overrides.items() if k in attack_fields}
        per = {k: v for k, v in overrides.items() if k not in attack_fields}
        for key, value in per.items():
            if not isinstance(value, Mapping):
                raise InputError(f"unknown key overrides.{key} (not an AttackConfig field: {', '.join(sorted(attack_fields))})")
            bad = sorted(set(value) - attack_fields)
            if bad:
                raise InputError(f"unknown key overrides.{key}.{bad[0]} (not an AttackConfig field)")
        return cls(**values, overrides=shared, interpreter_overrides=per)

    def as_dict(self) -> dict[str, Any]:
        """The config as the TOML document it came from (JSON-able; stored in the run's meta)."""
        experiment = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("overrides", "interpreter_overrides")}
        for key in ("target_maps", "models", "interpreters", "attacks"):
            experiment[key] = list(experiment[key])
        overrides: dict[str, Any] = {k: _plain(v) for k, v in self.overrides.items()}
        for name, table in self.interpreter_overrides.items():
            overrides[name] = {k: _plain(v) for k, v in table.items()}
        return json.loads(json.dumps({"experiment": experiment, "overrides": overrides}))

    # ---------------------------------------------------------------------------- attacks
    def attack_config(self, interpreter: str) -> AttackConfig:
        """The preset for ``interpreter`` with ε, the seed and the overrides applied."""
        values: dict[str, Any] = {"eps": self.eps, "seed": self.seed}
        for where, table in (("overrides", self.overrides), (f"overrides.{interpreter}", self.interpreter_overrides.get(interpreter, {}))):
            for key, value in table.items():
                values[key] = _coerce(f"{where}.{key}", key, value)
        try:
            return preset(self.preset, interpreter, **values)
        except (InputError, TypeError) as error:
            raise InputError(f"overrides for {interpreter}: {error}") from None

    def pgd_config(self) -> AttackConfig:
        """PGD's config: PGD runs once per model and batch for all interpreters, with the largest
        total step budget (pgd_steps + adv_steps) of the configured interpreters, all of it in
        stage 1, so it never spends fewer steps than the ADV² it is compared with; ε, α and the
        other settings are that interpreter's (the first one, on ties)."""
        configs = [self.attack_config(name) for name in self.interpreters]
        chosen = max(configs, key=lambda c: c.pgd_steps + c.adv_steps)  # max keeps the first on ties
        return replace(chosen, pgd_steps=chosen.pgd_steps + chosen.adv_steps, adv_steps=0)


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read config {str(path)!r}: {error.strerror or error}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise InputError(f"config {str(path)!r} is not valid TOML: {error}") from None
    return ExperimentConfig.from_mapping(data)


# ------------------------------------------------------------------------------- checks
def _text(key: str, value: Any) -> None:
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"experiment.{key} must be a non-empty string, got {value!r}")


def _integer(key: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"experiment.{key} must be an integer >= {minimum}, got {value!r}")


def _eps(value: Any) -> float:
    if isinstance(value, bool):
        raise InputError(f"experiment.eps must be a number such as \"8/255\", got {value!r}")
    try:
        eps = parse_fraction(value)
    except InputError as error:
        raise InputError(f"experiment.eps: {error}") from None
    if not math.isfinite(eps) or not 0 < eps <= 1:
        raise InputError(f"experiment.eps must be in (0, 1] (pixel units; 8/255 ≈ 0.031), got {value!r}")
    return eps


def _names(key: str, values: Any) -> tuple[str, ...]:
    if isinstance(values, str) or not isinstance(values, (list, tuple)):
        raise InputError(f"experiment.{key} must be a list of strings, got {values!r}")
    if not values:
        raise InputError(f"experiment.{key} must not be empty")
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"experiment.{key} must hold non-empty strings, got {value!r}")
    if len(set(values)) != len(values):
        duplicate = next(v for v in values if list(values).count(v) > 1)
        raise InputError(f"experiment.{key} lists {duplicate!r} twice")
    return tuple(values)


#: AttackConfig field → its type as text ("float", "int", "bool", "float | None", ...).
_FIELD_TYPES = {
    name: str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")
    for name, hint in typing.get_type_hints(AttackConfig).items()
}


def _coerce(where: str, key: str, value: Any) -> Any:
    """TOML value → AttackConfig field value: fractions for floats ("1/255"), λ schedules from a
    list of values or a table {values, mode, fractions}."""
    if key == "lam":
        if isinstance(value, list):
            value = {"values": value}
        if not isinstance(value, Mapping) or set(value) - {"values", "mode", "fractions"}:
            raise InputError(f"{where} must be a list of λ values or a table {{values, mode, fractions}}")
        try:
            return LambdaSchedule(
                values=tuple(float(v) for v in value.get("values", ())),
                mode=value.get("mode", "linear"),
                fractions=None if value.get("fractions") is None else tuple(float(v) for v in value["fractions"]),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, UnderfireError):
                raise InputError(f"{where}: {error}") from None
            raise InputError(f"{where}: λ values must be numbers") from None
    kind = _FIELD_TYPES.get(key, "")
    if "float" in kind:
        if isinstance(value, str):
            try:
                return parse_fraction(value)
            except InputError as error:
                raise InputError(f"{where}: {error}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where} must be a number, got {value!r}")
        return float(value)
    if kind == "bool" and not isinstance(value, bool):
        raise InputError(f"{where} must be true or false, got {value!r}")
    if kind == "int" and (isinstance(value, bool) or not isinstance(value, int)):
        raise InputError(f"{where} must be an integer, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
