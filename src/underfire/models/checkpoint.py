"""Checkpoint I/O: safetensors weights plus a JSON metadata file, and safe loading of foreign weights.

A checkpoint is two files side by side: ``NAME.safetensors`` (tensors only, nothing executable) and
``NAME.json`` (architecture, classes, input size, normalisation, accuracy, seed, versions). Foreign
``.pt``/``.pth`` files are read with ``torch.load(weights_only=True)``; a file that needs arbitrary
unpickling (it could run code) is refused rather than trusted.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CheckpointError


def metadata_path(weights_path: str | os.PathLike[str]) -> Path:
    """The JSON file that belongs to a weights file."""
    return Path(weights_path).with_suffix(".json")


def save_checkpoint(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike[str], metadata: Mapping[str, Any]
) -> Path:
    """Write ``path`` (.safetensors) and its ``.json`` metadata, each atomically."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint path must end in .safetensors, got {path.name!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in state_dict.items()}
    with _atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "underfire"})
    with _atomic_path(metadata_path(path)) as tmp:
        tmp.write_text(json.dumps(dict(metadata), indent=2, sort_keys=True) + "\n")
    return path


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an underfire checkpoint: (state dict, metadata)."""
    path = Path(path)
    meta_file = metadata_path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    if not meta_file.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} has no metadata file {meta_file.name!r} beside it")
    try:
        metadata = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"cannot read checkpoint metadata {str(meta_file)!r}: {error}") from None
    return load_weights(path), metadata


def load_weights(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors or a pickle-free ``torch.save`` file, never running code.

    Accepts the usual wrappings (``{"state_dict": ...}``, ``{"model": ...}``) and strips the
    ``module.`` prefix that ``DataParallel`` adds.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read weights {str(path)!r}: {error}") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            lines = [line.strip() for line in str(error).splitlines()]
            reason = next((line for line in lines if "GLOBAL" in line), "an unsupported object")
            raise CheckpointError(
                f"refusing to load {str(path)!r}: it needs arbitrary unpickling, which can run code "
                f"({reason}); save a plain state_dict (or safetensors) instead"
            ) from None
        except (RuntimeError, OSError, EOFError, ValueError) as error:
            raise CheckpointError(f"cannot read weights {str(path)!r}: {error}") from None
    return _unwrap_state_dict(state, path)


def _unwrap_state_dict(state: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            if key in state and isinstance(state[key], Mapping):
                state = state[key]
                break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{str(path)!r} does not hold a state dict of tensors")
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return dict(state)


class _atomic_path:
    """Context manager yielding a temporary path that replaces ``target`` only on success."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __enter__(self) -> Path:
        fd, name = tempfile.mkstemp(dir=self.target.parent, prefix=f".{self.target.name}.", suffix=".tmp")
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is None:
            os.chmod(self.tmp, 0o644)  # mkstemp creates 0600; checkpoints are meant to be shared
            os.replace(self.tmp, self.target)
        else:
            self.tmp.unlink(missing_ok=True)
