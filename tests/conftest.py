"""Suite-wide settings."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

# the commands the tests run (in-process and as subprocesses) take one thread and, so, the serial
# executor; the local executor's own test asks for it by name
os.environ.setdefault("UNDERFIRE_THREADS", "1")


@pytest.fixture(autouse=True, scope="session")
def single_thread() -> Iterator[None]:
    """The suite's tensors are tiny: one intra-op thread is faster, and far faster (10–100×)
    when other processes share the 2 cores, where spinning OpenMP threads wait on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
