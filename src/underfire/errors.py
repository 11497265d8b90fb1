"""Error types: every user-facing failure is an ``UnderfireError`` with a one-line message.

Subclassing ``ValueError`` keeps them catchable by generic code, while the CLI can print the
message alone (no traceback) for anything in this hierarchy.
"""

from __future__ import annotations


class UnderfireError(ValueError):
    """Base class for errors caused by the user's input, files or configuration."""


class InputError(UnderfireError):
    """Images, classes or arguments that do not meet the documented contract."""


class ImageReadError(UnderfireError):
    """An image file that cannot be opened or decoded."""


class SpecError(UnderfireError):
    """A model or data specification string that cannot be parsed or resolved."""


class CheckpointError(UnderfireError):
    """A weights file that is missing, unsafe to load or does not fit the architecture."""


class ModelStructureError(UnderfireError):
    """A model lacks the structure an operation needs (e.g. a GAP→linear head for CAM)."""


class AttackError(UnderfireError):
    """An attack that cannot do what it claims on this model (e.g. a map term without gradient)."""


class ResizeNotice(UserWarning):
    """Images were resized and centre-cropped to the model's input size: not an error, but a
    change to the user's pictures they should know of (the CLI prints it once per command)."""
