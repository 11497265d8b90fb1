"""Progress of long work: a tqdm bar on a terminal, plain lines at intervals in a log.

Why both: tqdm redraws one line with carriage returns, which a batch job's log file (stderr
redirected) shows as nothing readable, or nothing at all when tqdm is disabled off a terminal. A
user who runs ``underfire demo > log 2>&1`` needs a trail of lines instead: done / total, the
rate and the time left, every ``interval`` seconds and at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import IO, Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

#: Seconds between two progress lines in a log (a terminal's bar redraws continuously).
LOG_INTERVAL = 30.0


def progress_bar(
    total: int,
    *,
    desc: str,
    unit: str = "it",
    initial: int = 0,
    enabled: bool = True,
    stream: IO[str] | None = None,
    interval: float = LOG_INTERVAL,
) -> Any:
    """A progress reporter with tqdm's ``update`` / ``set_postfix_str`` / ``close`` (and ``with``):
    a bar when ``stream`` (default stderr) is a terminal, ``LogProgress`` lines otherwise, nothing
    when not ``enabled``."""
    stream = sys.stderr if stream is None else stream
    if enabled and not _is_terminal(stream):
        return LogProgress(total, desc=desc, unit=unit, initial=initial, stream=stream, interval=interval)
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, file=stream)


def track(
    iterable: Iterable[T], *, total: int | None = None, desc: str, unit: str = "it", enabled: bool = True
) -> Iterator[T]:
    """``iterable``'s items, with ``progress_bar`` advancing one per item."""
    total = len(iterable) if total is None else total  # type: ignore[arg-type]
    with progress_bar(total, desc=desc, unit=unit, enabled=enabled) as bar:
        for item in iterable:
            yield item
            bar.update(1)


class LogProgress:
    """Progress as whole lines: one when work starts, then at most one per ``interval`` seconds,
    and one at the end, each ``desc: done/total unit (percent), elapsed, ETA``."""

    def __init__(self, total: int, *, desc: str, unit: str, initial: int, stream: IO[str], interval: float) -> None:
        self.total, self.desc, self.unit, self.stream, self.interval = total, desc, unit, stream, interval
        self.n = self.start_n = initial
        self.postfix = ""
        self.started = time.monotonic()
        self.last_line = -float("inf")
        self._write()

    def update(self, count: int = 1) -> None:
        self.n += count
        if time.monotonic() - self.last_line >= self.interval or self.n >= self.total:
            self._write()

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        self.postfix = text

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{key}={value}" for key, value in values.items())

    def close(self) -> None:
        if self.n < self.total:  # stopped early: say where
            self._write()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def line(self) -> str:
        """The current progress line."""
        elapsed = time.monotonic() - self.started
        done_now = self.n - self.start_n
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        text = f"{self.desc}: {self.n}/{self.total} {self.unit}{'' if self.total == 1 else 's'}{share}, {_clock(elapsed)} elapsed"
        if 0 < done_now and self.n < self.total:
            text += f", about {_clock(elapsed / done_now * (self.total - self.n))} left"
        return text + (f" [{self.postfix}]" if self.postfix else "")

    def _write(self) -> None:
        self.last_line = time.monotonic()
        print(self.line(), file=self.stream, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or file-less stream
        return False
