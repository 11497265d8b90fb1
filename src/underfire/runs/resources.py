"""What one unit of work needs from a cluster: CPUs, GPUs (fractions allowed) and memory.

Why per interpreter: MASK and GRAD units hold many more activations than CAM's, so a Ray cluster
should not pack them as densely. A run config's ``[resources.NAME]`` tables set them, NAME an
interpreter, an attack (for interpreter-free attacks such as PGD) or ``default``. They change
where units run, never what they compute, so they are not part of a run's identity.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError

#: Keys of a ``[resources.NAME]`` table.
RESOURCE_KEYS = ("num_cpus", "num_gpus", "memory_gb")


@dataclass(frozen=True)
class UnitResources:
    """A unit's demand: ``num_cpus`` (also its torch threads), ``num_gpus`` (0..1 shares a GPU),
    ``memory_gb`` (Ray's memory resource; ``None``: not declared)."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_gb: float | None = None

    def __post_init__(self) -> None:
        for name in RESOURCE_KEYS:
            value = getattr(self, name)
            if value is None and name == "memory_gb":
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise InputError(f"{name} must be a number >= 0, got {value!r}")
        if self.num_cpus <= 0 and self.num_gpus <= 0:
            raise InputError("a unit needs at least some CPU or GPU (num_cpus or num_gpus > 0)")

    @classmethod
    def from_mapping(cls, where: str, table: Any) -> UnitResources:
        if not isinstance(table, Mapping):
            raise InputError(f"{where} must be a table of {', '.join(RESOURCE_KEYS)}")
        unknown = sorted(set(table) - set(RESOURCE_KEYS))
        if unknown:
            raise InputError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(RESOURCE_KEYS)})")
        try:
            return cls(**dict(table))
        except InputError as error:
            raise InputError(f"{where}: {error}") from None

    def ray_options(self) -> dict[str, Any]:
        """The ``.options(...)`` of a Ray task with this demand."""
        options: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_gb is not None:
            options["memory"] = int(self.memory_gb * 2**30)
        return options

    @property
    def threads(self) -> int:
        """Torch intra-op threads for a unit with this demand (at least one)."""
        return max(1, int(self.num_cpus))
