"""What produced a result: the library versions, recorded in every checkpoint and run, and the
commit of the code when it runs from a git checkout (so a reference row can name its code)."""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import numpy as np
import torch

__all__ = ["__version__", "source_commit", "software_versions"]

#: The package's version (``underfire.__version__``), moved with behaviour changes.
__version__ = "0.1.0"


def source_commit() -> str | None:
    """The git commit of this package's source, with ``-dirty`` when tracked files differ from it;
    None outside a git checkout (an installed wheel) or without git."""
    here = Path(__file__).resolve().parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(here), "diff", "--quiet", "HEAD", "--", "."], capture_output=True, timeout=10
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty == 1 else commit or None


def software_versions(run: bool = False) -> dict[str, str]:
    """underfire's, torch's, numpy's and Python's versions; for a run (``run``) also the platform
    and, from a git checkout, the source commit."""
    versions = {
        "underfire": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    if run:
        versions["platform"] = platform.platform()
        commit = source_commit()
        if commit:
            versions["commit"] = commit
    return versions
