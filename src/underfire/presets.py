"""The presets: what ``quick`` and ``paper`` do to the attack, for every interpreter, in one table.

A preset never changes the interpreter whose maps are judged (the benign map, every measure, the
report): that one is built from the user's options alone, exactly as ``underfire explain`` builds
it. A preset sets the attack's settings (``AttackConfig`` fields) and, through
``AttackConfig.surrogate_options``, the options of the copy of the interpreter the attack
differentiates: a ReLU surrogate's width, fewer integration nodes, an extra term. When that copy
computes a different map (IG with 8 nodes for the judged 32), the transfer from the surrogate to
the judged interpreter is part of the measured result.

An interpreter without an entry here gets ``DEFAULT``; a plugin may declare its own table as its
class attribute ``presets`` (a mapping of preset name to ``Preset``), which wins over this one.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from .attacks.config import AttackConfig
from .errors import InputError
from .options import coerce_options, dataclass_options

if TYPE_CHECKING:
    from .interpreters.base import Interpreter

__all__ = ["DEFAULT", "PRESETS", "PRESET_NAMES", "Preset", "preset", "preset_for", "surrogate_options"]

#: Preset names, in the order the CLI lists them.
PRESET_NAMES: tuple[str, ...] = ("quick", "paper")

_ATTACK_SPECS = dataclass_options(AttackConfig)


@dataclass(frozen=True)
class Preset:
    """One interpreter's settings under one preset name.

    ``attack``: ``AttackConfig`` fields, checked and converted to their types on construction (a
    typo in this table fails at import, not in a run). ``surrogate``: options of the attacked copy
    of the interpreter (``AttackConfig.surrogate_options``); never the judged interpreter's.
    """

    attack: Mapping[str, Any] = field(default_factory=dict)
    surrogate: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if "surrogate_options" in self.attack:
            raise InputError("a preset names its surrogate's options in Preset.surrogate, not in its attack table")
        attack = coerce_options("preset attack table", self.attack, _ATTACK_SPECS)
        object.__setattr__(self, "attack", MappingProxyType(attack))
        object.__setattr__(self, "surrogate", MappingProxyType(dict(self.surrogate)))

    def over(self, base: Preset) -> Preset:
        """This preset's keys on top of ``base``'s."""
        return Preset({**base.attack, **self.attack}, {**base.surrogate, **self.surrogate})


#: The short schedule every ``quick`` preset shares: 60 PGD steps, then a stage 2 whose step
#: starts at 2/255 and decays (cosine) to 0.1/255 so the map settles within the few steps there
#: are, with λ set per sample around the interpreter's schedule (``lam_adaptation``: up while the
#: sample stays c_t with the required confidence, down when it does not).
_QUICK = {"pgd_steps": 60, "adv_alpha": 2 / 255, "adv_alpha_final": 0.1 / 255, "lam_adaptation": 1.05}

#: The official code's staged λ for GRAD: 0.001 → 0.004 → 0.01 → 0.05 over 301/201/101/101 steps.
#: Its ℓ_int is a per-pixel *sum* over a 56×56 map, ours a mean, so λ is multiplied by 3136.
_GRAD_LAMBDA = (0.001, 0.004, 0.01, 0.05)
_GRAD_FRACTIONS = (301, 201, 101, 101)


def _grad_lambda(factor: float) -> dict[str, Any]:
    return {"values": [v * factor for v in _GRAD_LAMBDA], "mode": "staged", "fractions": list(_GRAD_FRACTIONS)}


#: What an interpreter without an entry gets: the paper's CAM/RTS/MASK schedule (300 + 1000 steps,
#: λ from 5 to 10) and, for ``quick``, the shared short schedule with 200 stage-2 steps.
DEFAULT: Mapping[str, Preset] = MappingProxyType(
    {
        "quick": Preset(attack={**_QUICK, "adv_steps": 200, "lam": (5.0, 10.0)}),
        "paper": Preset(attack={"pgd_steps": 300, "adv_steps": 1000, "lam": (5.0, 10.0)}),
    }
)

#: GRAD, ``paper``: the official 300 + 704 steps with the paper's absolute ``h``. ``quick``: 500
#: stage-2 steps at 7.5× the paper's λ (the map is still converging when the shorter stage 2
#: ends), and the ReLU surrogate's width relative to each layer's pre-activation scale, which
#: carries over to models whose ReLUs see large values. Both smooth the labels of ℓ_prd (0.1), as
#: the official GRAD code does.
_GRAD = {
    "paper": Preset(attack={"pgd_steps": 300, "adv_steps": 704, "lam": _grad_lambda(3136), "label_smoothing": 0.1}),
    "quick": Preset(
        attack={**_QUICK, "adv_steps": 500, "lam": _grad_lambda(7.5 * 3136), "label_smoothing": 0.1},
        surrogate={"relu_scale": "relative"},
    ),
}

#: Gradient × Input, IG and DeepLIFT, ``quick``: GRAD's, with ℓ_int on the maps' square roots
#: (``map_power`` 0.5): their maps are peaked, so under the squared difference a few bright pixels
#: decide ℓ_int while the top-k IoU ranks the faint ones too.
_ROOT_MAP = Preset(attack={"map_power": 0.5}).over(_GRAD["quick"])

#: The one table: per interpreter, per preset name. Read it to see what a preset does.
PRESETS: Mapping[str, Mapping[str, Preset]] = MappingProxyType(
    {
        "grad": _GRAD,
        "smoothgrad": _GRAD,
        "inputxgrad": {"paper": _GRAD["paper"], "quick": _ROOT_MAP},
        # the attack differentiates 8-node IG (every step evaluates the whole path); the map
        # judged is the interpreter's own (32 nodes unless the user says otherwise)
        "ig": {"paper": _GRAD["paper"], "quick": Preset(surrogate={"steps": 8}).over(_ROOT_MAP)},
        # twice the stage 2 of the other root-map interpreters
        "deeplift": {"paper": _GRAD["paper"], "quick": Preset(attack={"adv_steps": 1000}).over(_ROOT_MAP)},
        # the exact ReLU derivative (the rules are ratios of activations, whose input derivative
        # is not zero, so a surrogate only blurs it), 1000 stage-2 steps, ℓ_int plus 0.2 × (1 − the
        # soft top-k IoU) for maps too peaked for the squared difference to hold their top-k sets,
        # and two runs, each image keeping its better one
        "lrp": {
            "paper": _GRAD["paper"],
            "quick": Preset(
                attack={**_ROOT_MAP.attack, "adv_steps": 1000, "soft_iou_weight": 0.2, "restarts": 2},
                surrogate={"relu": "none"},
            ),
        },
        # ``quick``: 300 stage-2 steps at 4× the paper's λ for the shorter stage 2; ``paper``: no
        # encoder term in the warm start
        "rts": {
            "quick": Preset(attack={**_QUICK, "adv_steps": 300, "lam": (20.0, 40.0)}),
            "paper": Preset(surrogate={"warm_start_encoder_weight": 0.0}),
        },
        # ``paper``: the paper's ℓ_int, without the deletion-evidence term
        "mask": {"paper": Preset(surrogate={"evidence_weight": 0.0})},
        # ``quick``: 500 stage-2 steps at λ 10 → 40; the members' surrogates follow the same preset
        "ensemble": {
            "quick": Preset(attack={"adv_steps": 500, "lam": (10.0, 40.0)}, surrogate={"member_preset": "quick"}),
            "paper": Preset(surrogate={"member_preset": "paper"}),
        },
    }
)


def _interpreter_class(interpreter: str | type[Interpreter]) -> type[Interpreter]:
    from .interpreters import INTERPRETERS  # the registry imports every interpreter module

    return INTERPRETERS.get(interpreter) if isinstance(interpreter, str) else interpreter


def preset_for(interpreter: str | type[Interpreter], name: str) -> Preset:
    """Interpreter ``interpreter``'s settings under preset ``name``, on top of ``DEFAULT``."""
    if name not in DEFAULT:
        raise InputError(f"unknown preset {name!r}; choose one of {', '.join(DEFAULT)}")
    cls = _interpreter_class(interpreter)
    own = cls.presets.get(name) or PRESETS.get(cls.name, {}).get(name) or Preset()
    return own.over(DEFAULT[name])


def surrogate_options(
    name: str, interpreter: str | type[Interpreter], chosen: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The surrogate options preset ``name`` gives ``interpreter`` when the user chose the
    (typed) options ``chosen``: the interpreter drops those a choice makes moot
    (``Interpreter.preset_surrogate``), so a preset never turns a valid choice into a conflict."""
    cls = _interpreter_class(interpreter)
    table = cls.preset_surrogate(preset_for(cls, name).surrogate, dict(chosen or {}))
    return coerce_options(f"preset {name!r} of {cls.name}", table, cls.option_specs())


def preset(
    name: str, interpreter: str | type[Interpreter], chosen: Mapping[str, Any] | None = None, **overrides: Any
) -> AttackConfig:
    """The attack configuration preset ``name`` declares for ``interpreter`` (a registered name or
    an ``Interpreter`` subclass) whose judged options are ``chosen``, with ``overrides`` applied."""
    cls = _interpreter_class(interpreter)
    table = {**preset_for(cls, name).attack, "surrogate_options": surrogate_options(name, cls, chosen)}
    return AttackConfig().with_settings(f"preset {name!r} of {cls.name}", table).with_overrides(**overrides)
