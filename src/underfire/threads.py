"""How many CPU threads torch's intra-op pool gets for a command.

Why: torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each
other. On a machine that other jobs keep busy, a thread that is descheduled stalls all the others
at every parallel region, so more threads than idle cores can be many times slower than one
(docs/tuning.md has the measurements). So, unless the user
says (``OMP_NUM_THREADS`` or ``UNDERFIRE_THREADS``), a command uses the cores that are idle now.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def idle_cores(cores: int, load: float) -> int:
    """Cores left idle by a 1-minute load average of ``load`` (at least one)."""
    return max(1, min(cores, cores - int(round(load))))


def choose_threads(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; returns (threads, why) for the start line."""
    environ = os.environ if environ is None else environ
    for variable in ("UNDERFIRE_THREADS", "OMP_NUM_THREADS"):
        value = environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
            return int(value), f"{variable}={value}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = min(cores, torch.get_num_threads())  # torch's default: the physical cores
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = idle_cores(cores, load)
    torch.set_num_threads(threads)
    return threads, f"{threads} of {cores} cores idle (load {load:.1f}); set OMP_NUM_THREADS to choose"
