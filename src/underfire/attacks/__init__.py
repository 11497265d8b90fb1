"""Attacks: targeted PGD and ADV² sharing one loop, behind one contract (``base.Attack``).

``ATTACKS`` is the registry (entry-point group ``underfire.attacks``: the built-ins and any
installed plugin); ``build_attack`` makes one for a classifier.
"""

from __future__ import annotations

from typing import Any

from ..interpreters.base import Interpreter
from ..models.classifier import Classifier
from ..registry import Registry
from .base import Attack, AttackResult, Iterates, best_of_restarts, check_batch, finish, project, quantize
from .config import AttackConfig, LambdaSchedule, parse_fraction
from .core import ADV2, PGD, map_distance

#: Interpreter-free attacks (the baselines) first.
ATTACKS: Registry[Attack] = Registry(
    "underfire.attacks", Attack, "attack", order=lambda cls: (cls.uses_interpreter, cls.name)
)


def attack_label(name: str) -> str:
    """How reports name an attack: its declared label ("ADV²"), or its name for one that is not
    registered here (a run made with a plugin that is not installed)."""
    return (ATTACKS.get(name).label or name) if name in ATTACKS else name


def build_attack(
    name: str, classifier: Classifier, config: Any = None, interpreter: Interpreter | None = None
) -> Attack:
    """The attack registered as ``name`` for ``classifier`` (and ``interpreter``, if it uses one)."""
    return ATTACKS.get(name)(classifier, config=config, interpreter=interpreter)


__all__ = [
    "ADV2",
    "ATTACKS",
    "PGD",
    "Attack",
    "attack_label",
    "AttackConfig",
    "AttackResult",
    "Iterates",
    "LambdaSchedule",
    "best_of_restarts",
    "build_attack",
    "check_batch",
    "finish",
    "map_distance",
    "parse_fraction",
    "project",
    "quantize",
]
