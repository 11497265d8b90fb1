"""Attack presets as plain data: what an interpreter declares next to its code.

A preset is, per interpreter, the attack settings (``AttackConfig`` fields, written the way a run
config's ``[overrides]`` table writes them: λ as a list or a ``{values, mode, fractions}`` table)
and the interpreter options (its constructor's keyword arguments) that go with them. An
interpreter that declares no preset of its own gets ``DEFAULT_PRESETS``; one that declares only
some keys gets the defaults for the rest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

#: Preset names, in the order the CLI lists them.
PRESET_NAMES: tuple[str, ...] = ("quick", "paper")


@dataclass(frozen=True)
class Preset:
    """One interpreter's settings under one preset name."""

    attack: Mapping[str, Any] = field(default_factory=dict)
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "attack", MappingProxyType(dict(self.attack)))
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))


#: The short schedule every ``quick`` preset shares: 60 PGD steps, then stage 2 whose step starts at
#: 2/255 and decays (cosine) to 0.1/255 so the map settles within the few steps there are, with
#: λ set per sample around the interpreter's schedule (``lam_adaptation`` 1.05 within ×0.1..×10:
#: up while the sample stays c_t with the required confidence, down when it does not), so the
#: balance follows the model instead of the models the schedule was tuned on (docs/tuning.md).
QUICK_SCHEDULE: Mapping[str, Any] = MappingProxyType(
    {"pgd_steps": 60, "adv_alpha": 2 / 255, "adv_alpha_final": 0.1 / 255, "lam_adaptation": 1.05}
)

#: What an interpreter without presets of its own gets: the paper's CAM/RTS/MASK schedule (300 +
#: 1000 steps, λ from 5 to 10) and, for ``quick``, the shared short schedule with 200 stage-2 steps.
DEFAULT_PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        "quick": Preset(attack={**QUICK_SCHEDULE, "adv_steps": 200, "lam": (5.0, 10.0)}),
        "paper": Preset(attack={"pgd_steps": 300, "adv_steps": 1000, "lam": (5.0, 10.0)}),
    }
)
