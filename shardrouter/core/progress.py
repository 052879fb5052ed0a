"""Progress of long work (backfill, verify, drain, deletes): the protocol the library reports
through, and the arithmetic of a progress line (rate, ETA). Pure: drawing belongs to the CLI
(``shardrouter.cli._progress.TextProgress``), so library code never writes to a terminal.

The library opens a task per table or step with its total from real counts and calls
``advance(n)`` as rows are done; ``NullProgress`` drops everything.
"""

from __future__ import annotations

from typing import Protocol


class Task(Protocol):
    def advance(self, n: int) -> None: ...

    def done(self) -> None: ...


class Progress(Protocol):
    def task(self, name: str, total: int | None, unit: str = "rows") -> Task: ...


class _NullTask:
    def advance(self, n: int) -> None:
        pass

    def done(self) -> None:
        pass


class NullProgress:
    """Reports nothing (tests, ``--json``)."""

    def task(self, name: str, total: int | None, unit: str = "rows") -> Task:
        return _NullTask()


def eta(done: int, total: int | None, rate: float) -> str:
    """``m:ss`` left at ``rate`` per second, or ``?`` when it cannot be told."""
    if total is None or rate <= 0 or done >= total:
        return "0:00" if total is not None and done >= total else "?"
    left = int((total - done) / rate)
    hours, rest = divmod(left, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def line(
    name: str, done: int, total: int | None, unit: str, seconds: float, width: int = 24
) -> str:
    """One progress line: name, bar, counts, rate, ETA."""
    rate = done / seconds if seconds > 0 else 0.0
    if total:
        filled = min(width, int(width * done / total))
        bar = "[" + "#" * filled + "." * (width - filled) + "]"
        count = f"{done:,}/{total:,} {unit}"
    else:
        bar = ""
        count = f"{done:,} {unit}"
    return f"{name} {bar} {count} {rate:,.0f} {unit}/s ETA {eta(done, total, rate)}".replace(
        "  ", " "
    )


__all__ = ["NullProgress", "Progress", "Task", "eta", "line"]
