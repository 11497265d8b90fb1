"""What a run read, by content: recorded when the run starts, checked when it resumes.

Why: a config names its inputs by path (a ``.npy`` target map, image files or a folder, model and
weights files, an interpreter's own network). If a file's contents change between a kill and a
resume, the resumed units would silently come from another experiment than the finished ones. So
the run stores a SHA-256 of every file it read, and of every image it attacks as the model sees
it (which also covers a data folder, and a procedural dataset whose generator changed), and a
resume that reads anything different is refused naming the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError

#: Read in chunks of this many bytes: weights files of ImageNet models are hundreds of MB.
_CHUNK = 1 << 20


def file_digest(path: str | Path) -> str:
    """SHA-256 of a file's contents (hex)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as stream:
            while chunk := stream.read(_CHUNK):
                digest.update(chunk)
    except OSError as error:
        raise InputError(f"cannot read {str(path)!r}: {error.strerror or error}") from None
    return digest.hexdigest()


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's values (float32, dense NCHW order), independent of its memory layout."""
    values = tensor.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(values.numpy().tobytes()).hexdigest()


def run_inputs(files: Iterable[str | Path], images: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, Any]:
    """The fingerprint stored with a run: ``{"files": {path: sha256}, "images": {model: {image: sha256}}}``."""
    return {
        "files": {str(path): file_digest(path) for path in dict.fromkeys(str(p) for p in files)},
        "images": {
            model: {name: tensor_digest(image) for name, image in named.items()} for model, named in images.items()
        },
    }


def check_inputs(
    run_dir: Path,
    stored: Mapping[str, Any],
    now: Mapping[str, Any],
    sources: Mapping[str, Sequence[str | None]] | None = None,
) -> None:
    """Refuse a resume whose inputs differ from those the run started with (one line naming the
    first file that changed). Entries only one side has are not compared: a run made by an older
    underfire recorded fewer of them."""
    before, after = stored.get("files", {}), now.get("files", {})
    for path in sorted(set(before) & set(after)):
        if before[path] != after[path]:
            raise InputError(
                f"{path!r} changed since the run in {str(run_dir)!r} started (its contents are not those the "
                "run read); restore it, or use another output folder for the new contents"
            )
    for model, names in sorted(now.get("images", {}).items()):
        recorded = stored.get("images", {}).get(model, {})
        for position, (name, digest) in enumerate(names.items()):
            if name in recorded and recorded[name] != digest:
                source = (sources or {}).get(model, ())
                where = source[position] if position < len(source) and source[position] else None
                shown = f"{where!r} (image {name} of {model})" if where else f"image {name} of {model}"
                raise InputError(
                    f"{shown} changed since the run in {str(run_dir)!r} started (the model now sees other "
                    "pixels); restore it, or use another output folder for the new contents"
                )
