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
    files = []                       # or image files to attack instead of `data` (labels = predictions)
    [overrides]                      # any AttackConfig field, for every interpreter
    adv_steps = 60
    [overrides.mask]                 # per interpreter (wins over [overrides])
    adv_steps = 30
    [overrides.ig]                   # surrogate_options: the copy the attack differentiates (merged
    surrogate_options = {steps = 16} # onto the preset's); the judged interpreter keeps its options
    [interpreters.mask]              # an interpreter's options (its constructor's keyword arguments):
    iterations = 100                 # the interpreter explained, attacked and judged
    [attacks.pgd]                    # an attack's own settings, applied last
    pgd_steps = 100
    [models."torchscript:cnn.pt"]    # what a model file does not say (models.metadata.CARD_KEYS)
    input_size = 32
    mean = [0.0, 0.0, 0.0]
    classes = "classes.txt"
    [resources.mask]                 # what one unit needs on a Ray cluster (not part of the run's identity)
    num_cpus = 2
    num_gpus = 0.5

Relative paths (a data folder, a ``.npy`` target map) are relative to the working directory, as
everywhere else on the command line.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tomllib

from ..attacks import ATTACKS
from ..attacks.config import AttackConfig
from ..attacks.targets import TARGET_MAP_KINDS, load_user_map
from ..errors import InputError
from ..interpreters import INTERPRETERS
from ..models.metadata import ModelOptions
from ..options import check_seed, coerce_value, parse_fraction
from ..presets import PRESET_NAMES, preset
from .resources import UnitResources


@dataclass(frozen=True)
class AttackPlan:
    """What one attack of a run does: its configuration, resolved once from the preset, the run's
    ε and seed, ``[overrides]``, ``[overrides.NAME]`` and ``[attacks.NAME]`` (in that order of
    precedence, lowest first), and the options of the interpreter it keeps the map of (judged:
    the same ones ``underfire explain`` would be given). ``interpreter`` is None for an
    interpreter-free attack (PGD), whose plan serves every interpreter of the run."""

    attack: str
    interpreter: str | None
    config: Any


@dataclass(frozen=True)
class ExperimentConfig:
    """What one run attacks and measures (the ``[experiment]`` table), plus attack overrides.

    ``overrides`` apply to every interpreter's ``AttackConfig``; ``interpreter_overrides[name]``
    to one interpreter, after them. ``interpreter_options[name]`` are options of one interpreter
    (a preset never changes them: ``underfire.presets``), ``attack_settings[name]`` settings of
    one attack (applied last). Every plan is resolved once, on construction (``plans``).
    All are read-only mappings of TOML values. ``files``, when given, are the images attacked
    (each labelled with the model's prediction) instead of ``images`` correct ones of ``data``.
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
    attacks: tuple[str, ...] = ("pgd", "adv2")
    transfer: bool = True
    files: tuple[str, ...] = ()
    overrides: Mapping[str, Any] = field(default_factory=dict)
    interpreter_overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    interpreter_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    attack_settings: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    model_options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: where units run, not what they compute: not part of the run's identity (``as_dict``)
    resources: Mapping[str, UnitResources] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = functools.partial(object.__setattr__, self)  # normalising a frozen instance
        _text("name", self.name)
        check_seed("experiment.seed", self.seed)
        if self.preset not in PRESET_NAMES:
            raise InputError(f"experiment.preset must be one of {', '.join(PRESET_NAMES)}, got {self.preset!r}")
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
            if name not in INTERPRETERS:
                raise InputError(
                    f"experiment.interpreters: unknown interpreter {name!r}; choose from {', '.join(INTERPRETERS)}"
                )
        set_("attacks", _names("attacks", self.attacks))
        for name in self.attacks:
            if name not in ATTACKS:
                raise InputError(f"experiment.attacks: unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
        if not isinstance(self.transfer, bool):
            raise InputError(f"experiment.transfer must be true or false, got {self.transfer!r}")
        set_("files", _names("files", self.files) if self.files else ())
        if not isinstance(self.overrides, Mapping):
            raise InputError("overrides must be a table of AttackConfig fields")
        set_("overrides", MappingProxyType(dict(self.overrides)))
        if not isinstance(self.interpreter_overrides, Mapping):
            raise InputError("interpreter overrides must be a table per interpreter")
        per = {}
        for name, table in self.interpreter_overrides.items():
            if name not in self.interpreters:
                raise InputError(
                    f"overrides.{name}: {name!r} is not one of the configured interpreters ({', '.join(self.interpreters)})"
                )
            if not isinstance(table, Mapping):
                raise InputError(f"overrides.{name} must be a table of AttackConfig fields")
            per[name] = MappingProxyType(dict(table))
        set_("interpreter_overrides", MappingProxyType(per))
        set_("interpreter_options", _tables("interpreters", self.interpreter_options, self.interpreters, "interpreter"))
        set_("attack_settings", _tables("attacks", self.attack_settings, self.attacks, "attack"))
        set_("model_options", _tables("models", self.model_options, self.models, "model"))
        for name in self.model_options:
            self.model_options_for(name)
        if not isinstance(self.resources, Mapping):
            raise InputError("[resources] must hold one table per interpreter, attack or 'default' ([resources.NAME])")
        demands = {}
        for name, table in self.resources.items():
            if name not in (*self.interpreters, *self.attacks, "default"):
                raise InputError(f"resources.{name}: {name!r} is not a configured interpreter or attack, nor 'default'")
            demands[name] = (
                table if isinstance(table, UnitResources) else UnitResources.from_mapping(f"resources.{name}", table)
            )
        set_("resources", MappingProxyType(demands))
        self._resolve()  # every option and attack config is built (and validated) now, once

    def _resolve(self) -> None:
        """Resolve every interpreter's options and every attack's plan (``plans``)."""
        options = {
            name: INTERPRETERS.get(name).check_options(self.interpreter_options.get(name, {}), f"interpreters.{name}")
            for name in self.interpreters
        }
        object.__setattr__(self, "_options", MappingProxyType(options))
        bases = {name: self._preset_config(name) for name in self.interpreters}
        plans: dict[tuple[str, str | None], AttackPlan] = {}
        for attack in self.attacks:
            cls = ATTACKS.get(attack)
            settings = self.attack_settings.get(attack, {})
            if cls.uses_interpreter:
                for name in self.interpreters:
                    plans[attack, name] = AttackPlan(attack, name, cls.configure([bases[name]], settings))
            else:
                plans[attack, None] = AttackPlan(attack, None, cls.configure(list(bases.values()), settings))
        object.__setattr__(self, "_plans", MappingProxyType(plans))

    # ---------------------------------------------------------------------------- reading
    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ExperimentConfig:
        """From the parsed TOML document (tables ``experiment`` and optional ``overrides``)."""
        tables = ("experiment", "overrides", "interpreters", "attacks", "models", "resources")
        unknown = sorted(set(data) - set(tables))
        if unknown:
            raise InputError(
                f"unknown table or key {unknown[0]!r} (expected [experiment], [overrides], [interpreters.NAME], "
                "[attacks.NAME], [models.NAME], [resources.NAME])"
            )
        experiment = data.get("experiment")
        if not isinstance(experiment, Mapping):
            raise InputError("the config needs an [experiment] table")
        names = {f.name for f in fields(cls)} - _TABLE_FIELDS
        unknown = sorted(set(experiment) - names)
        if unknown:
            raise InputError(f"unknown key experiment.{unknown[0]} (known: {', '.join(sorted(names))})")
        values = dict(experiment)
        for key in ("target_maps", "models", "interpreters", "attacks", "files"):
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
                raise InputError(
                    f"unknown key overrides.{key} (not an AttackConfig field: {', '.join(sorted(attack_fields))})"
                )
            bad = sorted(set(value) - attack_fields)
            if bad:
                raise InputError(f"unknown key overrides.{key}.{bad[0]} (not an AttackConfig field)")
        for table in ("interpreters", "attacks", "models"):
            if not isinstance(data.get(table, {}), Mapping):
                raise InputError(f"[{table}] must hold one table per name ([{table}.NAME])")
        return cls(
            **values,
            overrides=shared,
            interpreter_overrides=per,
            interpreter_options=data.get("interpreters", {}),
            attack_settings=data.get("attacks", {}),
            model_options=data.get("models", {}),
            resources=data.get("resources", {}),
        )

    def as_dict(self) -> dict[str, Any]:
        """The config as the TOML document it came from (JSON-able; stored in the run's meta),
        without ``[resources]``: where units run is not part of what a run is."""
        experiment = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _TABLE_FIELDS}
        for key in ("target_maps", "models", "interpreters", "attacks", "files"):
            experiment[key] = list(experiment[key])
        if not experiment["files"]:  # absent unless used: a run made before it existed stays the same
            del experiment["files"]
        overrides: dict[str, Any] = {k: _plain(v) for k, v in self.overrides.items()}
        for name, table in self.interpreter_overrides.items():
            overrides[name] = {k: _plain(v) for k, v in table.items()}
        document: dict[str, Any] = {"experiment": experiment, "overrides": overrides}
        for key, tables in (
            ("interpreters", self.interpreter_options),
            ("attacks", self.attack_settings),
            ("models", self.model_options),
        ):
            if tables:
                document[key] = {name: _plain(table) for name, table in tables.items()}
        return json.loads(json.dumps(document, default=str))

    # ---------------------------------------------------------------------------- attacks
    @property
    def plans(self) -> Mapping[tuple[str, str | None], AttackPlan]:
        """Every attack's plan, keyed by (attack, interpreter) (interpreter None: an
        interpreter-free attack's one plan)."""
        return self._plans  # type: ignore[attr-defined]

    def _preset_config(self, interpreter: str) -> AttackConfig:
        """The preset for ``interpreter`` with ε, the seed and the overrides applied: the base every
        attack's configuration starts from. ``surrogate_options`` in an overrides table merge
        onto the preset's, key by key; every other key replaces."""
        cls = INTERPRETERS.get(interpreter)
        try:
            config = preset(self.preset, cls, self.options_for(interpreter), eps=self.eps, seed=self.seed)
            for where, table in (
                ("overrides", self.overrides),
                (f"overrides.{interpreter}", self.interpreter_overrides.get(interpreter, {})),
            ):
                table = dict(table)
                if "surrogate_options" in table:
                    given = coerce_value(f"{where}.surrogate_options", table["surrogate_options"], dict)
                    checked = cls.check_options(given, f"{where}.surrogate_options")
                    table["surrogate_options"] = {**config.surrogate_options, **checked}
                config = config.with_settings(where, table)
            return config
        except (InputError, TypeError) as error:
            raise InputError(f"overrides for {interpreter}: {error}") from None

    def config_for(self, attack: str, interpreter: str | None = None) -> Any:
        """Attack ``attack``'s configuration: for ``interpreter`` when the attack uses one, else
        shared by every interpreter of the run (``Attack.configure`` decides how)."""
        if ATTACKS.get(attack).uses_interpreter:
            if interpreter is None:
                raise InputError(f"the {attack} attack is configured per interpreter")
            return self.plans[attack, interpreter].config
        return self.plans[attack, None].config

    def input_files(self) -> list[str]:
        """The files the config itself names (target maps, image files); the models' and data
        folders' files come from the prepared models (``plan.PreparedModel.input_files``)."""
        return [kind for kind in self.target_maps if kind.endswith(".npy")] + list(self.files)

    def model_options_for(self, model: str) -> ModelOptions:
        """The metadata ``model`` is loaded with (its ``[models.NAME]`` table; a model card beside
        the model file fills what it leaves out)."""
        options = ModelOptions.from_mapping(f"models.{model}", self.model_options.get(model, {}))
        return replace(options, seed=self.seed)  # random weights (``@random``) follow the run's seed

    def options_for(self, interpreter: str) -> dict[str, Any]:
        """The options ``interpreter`` is built with (``[interpreters.NAME]``, each converted to the
        type the interpreter declares): the interpreter explained, attacked and judged."""
        return dict(self._options[interpreter])  # type: ignore[attr-defined]


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment TOML file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise InputError(f"cannot read config {str(path)!r}: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        line = path.read_bytes()[: error.start].count(b"\n") + 1
        raise InputError(
            f"config {str(path)!r} is not UTF-8 text (byte {error.object[error.start]:#04x} on line {line}); save it as UTF-8"
        ) from None
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
        raise InputError(f'experiment.eps must be a number such as "8/255", got {value!r}')
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


#: Fields of ``ExperimentConfig`` that are tables of their own, not keys of ``[experiment]``.
_TABLE_FIELDS = {
    "overrides",
    "interpreter_overrides",
    "interpreter_options",
    "attack_settings",
    "model_options",
    "resources",
}


def _tables(where: str, tables: Any, names: tuple[str, ...], kind: str) -> Mapping[str, Mapping[str, Any]]:
    """``[where.NAME]`` tables: each NAME one of ``names`` (the configured ones), each a table."""
    if not isinstance(tables, Mapping):
        raise InputError(f"[{where}] must hold one table per {kind} ([{where}.NAME])")
    out = {}
    for name, table in tables.items():
        if name not in names:
            raise InputError(f"{where}.{name}: {name!r} is not one of the configured {kind}s ({', '.join(names)})")
        if not isinstance(table, Mapping):
            raise InputError(f"{where}.{name} must be a table of settings")
        out[name] = MappingProxyType(dict(table))
    return MappingProxyType(out)


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    return value
