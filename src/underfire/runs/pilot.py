"""Experiment configs whose step budgets are cut, for the pilot runs that ``--estimate`` and the
memory budget time and measure before a run starts."""

from __future__ import annotations

import dataclasses
from typing import Any

from .config import ExperimentConfig
from .plan import Unit

#: The two fractions of each step budget (and of MASK's solves) the pilots run at (the lower one
#: twice: its first pass also pays one-time costs, warm-up and allocation, and the faster of the
#: two is kept). Small, so the pilots cost a few percent of the run.
SCALES = (0.02, 0.05)


class ScaledConfig:
    """An experiment config whose attack configurations have their step budgets scaled (scale 0:
    one step per stage, what a memory pilot needs)."""

    def __init__(self, config: ExperimentConfig, scale: float) -> None:
        self._config, self._scale = config, scale

    def __getattr__(self, name: str) -> Any:
        return getattr(self._config, name)

    def config_for(self, attack: str, interpreter: str | None = None) -> Any:
        config = self._config.config_for(attack, interpreter)
        if not all(hasattr(config, field) for field in ("pgd_steps", "adv_steps")):
            return config
        return dataclasses.replace(
            config, **{field: _scaled(getattr(config, field), self._scale) for field in ("pgd_steps", "adv_steps")}
        )

    def fraction(self, unit: Unit) -> float:
        """The share of the full step budget a unit runs at here (1 for attacks without steps)."""
        full = self._config.config_for(unit.attack, unit.interpreter)
        if not all(hasattr(full, field) for field in ("pgd_steps", "adv_steps")):
            return 1.0
        used = self.config_for(unit.attack, unit.interpreter)
        return (used.pgd_steps + used.adv_steps) / max(1, full.pgd_steps + full.adv_steps)


def _scaled(steps: int, scale: float) -> int:
    """``scale`` of a step budget, at least one step (two for the larger pilot, so the two differ)."""
    if steps == 0:
        return 0
    return min(steps, max(1 if scale <= SCALES[0] else 2, round(steps * scale)))


def format_bytes(size: int) -> str:
    """A size as MiB, or GiB from 1 GiB on."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"
