"""Attacks: targeted PGD and ADV² sharing one loop; configurations and presets."""

from .config import AttackConfig, LambdaSchedule, parse_fraction, preset
from .core import ADV2, PGD, AttackResult, project, quantize

__all__ = ["ADV2", "PGD", "AttackConfig", "AttackResult", "LambdaSchedule", "parse_fraction", "preset", "project", "quantize"]
