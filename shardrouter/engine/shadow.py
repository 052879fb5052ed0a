"""SHADOW reads during a migration (docs/RESHARDING.md, "Shadow reads").

While a moving range's ``shadow_percent`` is set (``shardctl reshard switch-reads --shadow``,
before the switch), a router answers every read as always, from the range's authority (the
source), and afterwards runs the same physical statement on the target and compares the two
answers as multisets of rows. The comparison never delays or changes an answer: it runs on a
worker (a thread for Router, tasks for AsyncRouter), bounded, and a read that finds the
worker busy is counted ``dropped``, not queued without limit.

The target is a copy that lags its source by the drain (the runner drains continuously while
shadow reads run), so a difference is first taken for lag: both sides are read again after a
pause (RECHECK_S), and a difference that disappears is counted ``lagged``; one that stays
after every recheck is counted ``differed`` and logged (the statement, never its
parameters). Counters are per migration and per router; a router that follows a meta store
publishes them there (the migration's checkpoint ``shadow:<instance id>``), where the runner
sums them.

Which reads: a read outside a transaction whose one job runs on one shard and whose routed
slots are all shadowed to one target (reads by user id, order id, and by merchant id once
the lookup resolved it to one shard). Reads across shards, reads in transactions and on the
explicit path are not compared (verify compares every row of the range anyway).

The bucket of a read is its slot (``slot % 100 < shadow_percent``): the same key is always
compared or never, so a percentage samples keys, not requests.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..core.topology import Topology
from ..types import ShardId

log = logging.getLogger("shardrouter.shadow")

BUCKETS = 100
RECHECK_S: tuple[float, ...] = (0.3, 1.0)
"""Pauses before reading both sides again after a difference: the runner drains about every
0.1 s during shadow reads, so a lagging copy has caught up by the first or second."""
QUEUE = 256
"""Comparisons waiting or running per router at most; more are counted ``dropped``."""
PUBLISH_EVERY_S = 1.0
OUTCOMES: tuple[str, ...] = ("compared", "equal", "lagged", "differed", "errors", "dropped")
CHECKPOINT_PREFIX = "shadow:"


@dataclass(frozen=True, slots=True)
class ShadowSide:
    """Where a shadowed slot's reads are compared: the target, and the migration."""

    mirror: ShardId
    migration: str


def shadow_slots(topology: Topology) -> Mapping[int, ShadowSide]:
    """Every shadowed slot of ``topology`` and its side (empty without shadow reads: the
    routers' check is then one falsy test)."""
    out: dict[int, ShadowSide] = {}
    for m in topology.config.moving:
        if m.shadow_percent and m.write_mode == "dual_old_primary":
            side = ShadowSide(ShardId(m.target), m.migration or "")
            for slot in range(m.slots[0], m.slots[1]):
                if slot % BUCKETS < m.shadow_percent:
                    out[slot] = side
    return MappingProxyType(out)


def side_of(shadowed: Mapping[int, ShadowSide], slots: Sequence[int] | None) -> ShadowSide | None:
    """The one side every slot in ``slots`` is shadowed to, else None (no slot known, one
    not shadowed, or two targets)."""
    if not slots:
        return None
    first = shadowed.get(slots[0])
    if first is None or any(shadowed.get(s) != first for s in slots[1:]):
        return None
    return first


@dataclass(frozen=True, slots=True)
class ShadowRead:
    """One answered read to compare: where it ran and what it answered."""

    authority: ShardId
    side: ShadowSide
    statement: str
    params: Mapping[str, Any]
    rows: Sequence[tuple[Any, ...]]


def shadow_read(
    shadowed: Mapping[int, ShadowSide], recorder: Any, job: Any, result: Any
) -> ShadowRead | None:
    """The ShadowRead of a statement's one job (a plain read on one shard whose routed
    slots, ``recorder.on(job.shard)``, are all shadowed to one target), else None."""
    if job.kind != "read" or job.role != "statement" or not isinstance(job.statement, str):
        return None
    if not isinstance(job.params, Mapping):
        return None
    side = side_of(shadowed, recorder.on(job.shard))
    if side is None:
        return None
    # Copies: the caller owns its parameters and the answer's rows, and may change them
    # (reuse a dict, clear a list) before the worker compares (review 11).
    return ShadowRead(job.shard, side, job.statement, dict(job.params), tuple(result.rows))


@dataclass(frozen=True, slots=True)
class Read:
    """A request of :func:`compare`: the statement's rows on ``shard`` (a primary)."""

    shard: ShardId


@dataclass(frozen=True, slots=True)
class Pause:
    """A request of :func:`compare`: wait ``seconds``."""

    seconds: float


def same(a: Sequence[tuple[Any, ...]], b: Sequence[tuple[Any, ...]]) -> bool:
    """Equal as multisets of rows (a read without ORDER BY may come back in either order)."""
    if len(a) != len(b):
        return False
    try:
        return Counter(a) == Counter(b)
    except TypeError:  # an unhashable value (a driver's own type): compare their texts
        return sorted(map(repr, a)) == sorted(map(repr, b))


def compare(read: ShadowRead) -> Generator[Read | Pause, Any, str]:
    """The outcome of one shadow read (equal, lagged or differed), sans I/O: it yields Read
    and Pause requests and is sent the rows of each Read."""
    mirrored = yield Read(read.side.mirror)
    if same(read.rows, mirrored):
        return "equal"
    for pause in RECHECK_S:
        yield Pause(pause)
        again = yield Read(read.authority)
        mirrored = yield Read(read.side.mirror)
        if same(again, mirrored):
            return "lagged"
    return "differed"


class ShadowStats:
    """Counters per migration (thread-safe), and what was last published."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, Counter[str]] = {}
        self._published: dict[str, dict[str, int]] = {}
        self._published_at = 0.0

    def add(self, migration: str, outcome: str) -> None:
        with self._lock:
            counts = self._counts.setdefault(migration, Counter())
            counts[outcome] += 1
            if outcome != "dropped":
                counts["compared"] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        """``{migration: {outcome: count}}`` with every outcome present."""
        with self._lock:
            return {m: {o: c[o] for o in OUTCOMES} for m, c in self._counts.items()}

    def publish(self, store: Any, instance_id: str) -> None:
        """Write the counters that changed into the meta store (at most every
        PUBLISH_EVERY_S): the migration's checkpoint ``shadow:<instance_id>``. Best effort:
        a failure is logged and retried at the next call."""
        now = time.monotonic()
        if now - self._published_at < PUBLISH_EVERY_S:
            return
        changed = {
            m: c for m, c in self.snapshot().items() if m and self._published.get(m) != c
        }  # ("": a hand-written moving entry without a migration: nowhere to publish)
        if not changed:
            return
        self._published_at = now
        from ..reshard import state  # only once shadow reads ran: routers need no reshard code

        for migration, counts in changed.items():
            try:
                state.set_checkpoint(store, migration, CHECKPOINT_PREFIX + instance_id, counts)
            except Exception as exc:
                log.warning("shadow read counters of %s not published: %s", migration, exc)
            else:
                self._published[migration] = counts


def _outcome(read: ShadowRead, outcome: str) -> str:
    if outcome == "differed":
        log.warning(
            "shadow read differs (migration %s): shard %s and its copy on %s answered"
            " differently after %d rechecks: %s",
            read.side.migration,
            read.authority,
            read.side.mirror,
            len(RECHECK_S),
            read.statement,
        )
    return outcome


class ShadowReader:
    """Router's shell: one daemon worker thread (started on the first shadow read) drives
    :func:`compare` with ``rows(shard, statement, params)``. A comparison waiting for its
    recheck is parked (a heap by due time), so the worker goes on with other reads
    meanwhile: a burst of lagging reads does not hold up the rest."""

    def __init__(
        self, rows: Callable[[ShardId, str, Mapping[str, Any]], Sequence[tuple[Any, ...]]]
    ) -> None:
        self.stats = ShadowStats()
        self._rows = rows
        self._queue: queue.Queue[ShadowRead] = queue.Queue(maxsize=QUEUE)
        self._parked: list[tuple[float, int, ShadowRead, Generator[Read | Pause, Any, str]]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._seq = 0

    def submit(self, read: ShadowRead) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None and not self._stop.is_set():
                    self._thread = threading.Thread(
                        target=self._work, name="shardrouter-shadow", daemon=True
                    )
                    self._thread.start()
        if self._queue.qsize() + len(self._parked) >= QUEUE:
            self.stats.add(read.side.migration, "dropped")
            return
        try:
            self._queue.put_nowait(read)
        except queue.Full:
            self.stats.add(read.side.migration, "dropped")

    def _work(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic()
            if self._parked and self._parked[0][0] <= now:
                _, _, read, step = heapq.heappop(self._parked)
                self._advance(read, step, None)
                continue
            wait = min(0.2, self._parked[0][0] - now) if self._parked else 0.2
            try:
                read = self._queue.get(timeout=max(wait, 0.001))
            except queue.Empty:
                continue
            step = compare(read)
            self._advance(read, step, None, first=True)

    def _advance(
        self,
        read: ShadowRead,
        step: Generator[Read | Pause, Any, str],
        sent: Any,
        first: bool = False,
    ) -> None:
        """Run ``step`` until it pauses (parked) or ends (counted)."""
        try:
            request = next(step) if first else step.send(sent)
            while isinstance(request, Read):
                request = step.send(self._rows(request.shard, read.statement, read.params))
        except StopIteration as done:
            self.stats.add(read.side.migration, _outcome(read, str(done.value)))
            return
        except Exception as exc:  # a shard that does not answer: counted, never raised
            log.warning("shadow read not compared (migration %s): %s", read.side.migration, exc)
            self.stats.add(read.side.migration, "errors")
            return
        self._seq += 1
        heapq.heappush(self._parked, (time.monotonic() + request.seconds, self._seq, read, step))

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None:
            thread.join(timeout=5)


ASYNC_READS = 2
"""Shadow reads an AsyncRouter runs at once (each holds a connection of the shard's pool,
which its writes use too: 256 tasks reading at once took the whole pool, review 11)."""


class AsyncShadowReader:
    """AsyncRouter's shell: one task per comparison, QUEUE at most at a time, ASYNC_READS of
    them reading at once (the others wait without a connection)."""

    def __init__(
        self,
        rows: Callable[
            [ShardId, str, Mapping[str, Any]], Coroutine[Any, Any, Sequence[tuple[Any, ...]]]
        ],
    ) -> None:
        self.stats = ShadowStats()
        self._rows = rows
        self._tasks: set[asyncio.Task[None]] = set()
        self._reading: asyncio.Semaphore | None = None  # made on the loop, at first use

    def submit(self, read: ShadowRead) -> None:
        if len(self._tasks) >= QUEUE:
            self.stats.add(read.side.migration, "dropped")
            return
        task = asyncio.get_running_loop().create_task(self._drive(read))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drive(self, read: ShadowRead) -> None:
        step = compare(read)
        try:
            request = next(step)
            while True:
                if isinstance(request, Pause):
                    await asyncio.sleep(request.seconds)
                    request = step.send(None)
                else:
                    if self._reading is None:
                        self._reading = asyncio.Semaphore(ASYNC_READS)
                    async with self._reading:
                        rows = await self._rows(request.shard, read.statement, read.params)
                    request = step.send(rows)
        except StopIteration as done:
            self.stats.add(read.side.migration, _outcome(read, str(done.value)))
        except Exception as exc:
            log.warning("shadow read not compared (migration %s): %s", read.side.migration, exc)
            self.stats.add(read.side.migration, "errors")

    async def aclose(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


__all__ = [
    "AsyncShadowReader",
    "ShadowRead",
    "ShadowReader",
    "ShadowSide",
    "ShadowStats",
    "compare",
    "same",
    "shadow_read",
    "shadow_slots",
    "side_of",
]
