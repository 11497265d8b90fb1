"""How many CPU threads torch's intra-op pool gets for a command.

Why: torch starts one OpenMP thread per core, and OpenMP threads spin while they wait for each
other. On a machine that other jobs keep busy, a thread that is descheduled stalls all the others
at every parallel region, so more threads than idle cores can be many times slower than one
(docs/tuning.md has the measurements). So, unless the user says (``OMP_NUM_THREADS`` or
``UNDERFIRE_THREADS``), a command uses the cores that are idle now: measured from the kernel's
per-CPU counters (``/proc/stat``) over a fraction of a second, not from the 1-minute load average,
which still counts a command that ended a minute ago. Where there is no ``/proc/stat`` the load
average is the fallback.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path

import torch


def idle_cores(cores: int, load: float) -> int:
    """Cores left idle by a 1-minute load average of ``load`` (at least one)."""
    return max(1, min(cores, cores - int(round(load))))


#: How long the per-CPU counters are watched before choosing (seconds).
SAMPLE_SECONDS = 0.25


def idle_cpus(before: str, after: str, cpus: set[int]) -> float:
    """How many of ``cpus`` were idle between two readings of ``/proc/stat`` (their text): per
    CPU, the share of its time spent idle or waiting for I/O, summed."""

    def counters(text: str) -> dict[int, list[int]]:
        out = {}
        for line in text.splitlines():
            name, *values = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                out[int(name[3:])] = [int(v) for v in values]
        return out

    first, second = counters(before), counters(after)
    idle = 0.0
    for cpu in cpus:
        if cpu not in first or cpu not in second:
            continue
        delta = [b - a for a, b in zip(first[cpu], second[cpu])]
        total = sum(delta[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
        idle += (delta[3] + delta[4]) / total if total > 0 else 1.0
    return idle


def idle_now(cpus: set[int], seconds: float = SAMPLE_SECONDS) -> float | None:
    """Idle CPUs among ``cpus`` over the next ``seconds`` (``idle_cpus``); None without ``/proc/stat``."""
    try:
        before = Path("/proc/stat").read_text()
        time.sleep(seconds)
        after = Path("/proc/stat").read_text()
    except OSError:
        return None
    return idle_cpus(before, after, cpus)


def choose_threads(environ: Mapping[str, str] | None = None) -> tuple[int, str]:
    """Set torch's intra-op threads for this process; returns (threads, why) for the start line."""
    environ = os.environ if environ is None else environ
    for variable in ("UNDERFIRE_THREADS", "OMP_NUM_THREADS"):
        value = environ.get(variable, "").strip()
        if value.isdigit() and int(value) > 0:
            torch.set_num_threads(int(value))
            return int(value), f"{variable}={value}"
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(os.cpu_count() or 1))
    cores = min(len(cpus), torch.get_num_threads())  # torch's default: the physical cores
    idle = idle_now(set(cpus))
    if idle is not None:
        threads = max(1, min(cores, int(round(idle))))
        why = f"{threads} of {cores} cores idle now ({idle:.1f} CPUs idle over {SAMPLE_SECONDS:g} s)"
    else:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        threads = idle_cores(cores, load)
        why = f"{threads} of {cores} cores idle (1-minute load {load:.1f})"
    torch.set_num_threads(threads)
    return threads, f"{why}; set OMP_NUM_THREADS to choose"
