"""TextProgress: one redrawn line per task (name, bar, counts, rate, ETA) on a terminal;
silent when the stream is not one (a pipe, a log file) and under ``--json``."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from ..core.progress import NullProgress, Task, line


class _TextTask:
    def __init__(self, out: TextIO, name: str, total: int | None, unit: str, every: float):
        self._out = out
        self._name = name
        self._total = total
        self._unit = unit
        self._every = every
        self._started = time.monotonic()
        self._drawn = 0.0
        self.count = 0

    def advance(self, n: int) -> None:
        self.count += n
        now = time.monotonic()
        if now - self._drawn >= self._every:
            self._drawn = now
            self._draw(now, end="\r")

    def done(self) -> None:
        self._draw(time.monotonic(), end="\n")

    def _draw(self, now: float, end: str) -> None:
        text = line(self._name, self.count, self._total, self._unit, now - self._started)
        self._out.write("\x1b[2K" + text + end)
        self._out.flush()


class TextProgress:
    """Redrawn lines on a terminal (``out`` a TTY); silent when ``out`` is not one."""

    def __init__(self, out: TextIO | None = None, every_s: float = 0.2) -> None:
        self._out = out if out is not None else sys.stderr
        self._every = every_s
        self.enabled = self._out.isatty()

    def task(self, name: str, total: int | None, unit: str = "rows") -> Task:
        if not self.enabled:
            return NullProgress().task(name, total, unit)
        return _TextTask(self._out, name, total, unit, self._every)


__all__ = ["TextProgress"]
