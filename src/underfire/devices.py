"""Which torch device a command computes on: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

``auto`` is a CUDA GPU when torch sees one, else the CPU. A device that is not there is a one-line
error before any work (a CPU build of torch, an index past the GPUs there are), not a CUDA error
in the middle of an attack.
"""

from __future__ import annotations

import torch

from .errors import InputError

#: What ``--device`` accepts (``cuda:N`` for a GPU by index).
DEVICE_CHOICES = ("auto", "cpu", "cuda", "cuda:N")


def resolve_device(text: str | torch.device) -> str:
    """The device ``text`` names, checked to exist, as torch spells it (``cpu``, ``cuda:0``)."""
    name = str(text).strip().lower()
    if name == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if name == "cpu":
        return "cpu"
    kind, _, index = name.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise InputError(f"device must be one of {', '.join(DEVICE_CHOICES)}, got {text!r}")
    if not torch.cuda.is_available():
        raise InputError(
            f"device {text!r}: torch sees no CUDA GPU here (torch {torch.__version__}); use --device cpu or auto"
        )
    number = int(index or 0)
    if number >= torch.cuda.device_count():
        raise InputError(
            f"device {text!r}: there are {torch.cuda.device_count()} CUDA GPUs (cuda:0..cuda:{torch.cuda.device_count() - 1})"
        )
    return f"cuda:{number}"
