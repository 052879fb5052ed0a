"""Snowflake-style 63-bit ids that carry their owner's slot: layout, generator, decoding.

Bit layout, high to low (the sign bit stays 0 so ids fit a signed BIGINT)::

    | timestamp (ms since epoch) | slot gene | worker | sequence |

The sequence is kept per slot: every slot has its own per-millisecond ceiling of
``2**sequence_bits`` ids per worker, and uniqueness only needs (timestamp, slot, worker,
sequence) to differ, so slots never contend with each other for sequence numbers.

**One worker_id per live process.** Uniqueness rests on no two processes issuing ids with the
same worker_id at the same time. With a meta store, ``control.leases.WorkerLease`` leases the
worker id and keeps the generator inside its lease through :meth:`IdGenerator.grant`: the
generator refuses (WorkerLeaseError) once the lease is past by its own monotonic clock, never
stamps an id at or after the lease's expiry on the store's clock, and, on a reused worker id,
never stamps one before the previous holder's expiry; so the ids of two holders of one worker id
are separated in time whatever the clocks of their hosts read. This module does no I/O: the lease
pushes its renewals in. Without a meta store the worker_id comes from the config, and two
processes given the same worker_id issue the same ids. What can be detected is refused: a
generator inherited through ``fork()`` (multiprocessing, gunicorn/uwsgi pre-fork workers, Celery
prefork) raises IdGeneratorForkedError in the child instead of issuing its parent's ids; make the
generator after the fork, with the worker's own worker_id (or lease).
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import (
    ClockMovedBackwardsError,
    IdDecodeError,
    IdError,
    IdGeneratorForkedError,
    WorkerLeaseError,
)
from ..types import Slot

ID_BITS = 63


def _wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class DecodedId:
    """The fields of an id."""

    id: int
    timestamp_ms: int
    """Milliseconds since the Unix epoch (not the layout's epoch)."""
    slot: Slot
    worker: int
    sequence: int

    @property
    def time(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.timestamp_ms / 1000, tz=dt.UTC)


@dataclass(frozen=True, slots=True)
class IdLayout:
    """Bit widths and epoch of an id; validated by config (widths add up to 63)."""

    epoch_ms: int
    timestamp_bits: int = 41
    gene_bits: int = 10
    worker_bits: int = 8
    sequence_bits: int = 4
    sequence_shift: int = field(init=False)
    worker_shift: int = field(init=False)
    gene_shift: int = field(init=False)
    timestamp_shift: int = field(init=False)

    def __post_init__(self) -> None:
        total = self.timestamp_bits + self.gene_bits + self.worker_bits + self.sequence_bits
        if total != ID_BITS:
            raise ValueError(f"id bits add up to {total}, not {ID_BITS}")
        # Shifts are derived once so the hot path only shifts and ors.
        object.__setattr__(self, "sequence_shift", 0)
        object.__setattr__(self, "worker_shift", self.sequence_bits)
        object.__setattr__(self, "gene_shift", self.sequence_bits + self.worker_bits)
        object.__setattr__(
            self, "timestamp_shift", self.sequence_bits + self.worker_bits + self.gene_bits
        )

    @property
    def max_sequence(self) -> int:
        return (1 << self.sequence_bits) - 1

    @property
    def workers(self) -> int:
        return 1 << self.worker_bits

    @property
    def lifetime(self) -> dt.timedelta:
        """How long after the epoch ids can be issued."""
        return dt.timedelta(milliseconds=1 << self.timestamp_bits)

    @property
    def end(self) -> dt.datetime:
        """The first instant at which no id can be issued any more."""
        epoch = dt.datetime.fromtimestamp(self.epoch_ms / 1000, tz=dt.UTC)
        return epoch + self.lifetime

    def per_slot_ceiling_per_second(self) -> int:
        """Ids one worker can issue per second for one slot (one user's orders)."""
        return (1 << self.sequence_bits) * 1000

    def ceiling_per_second(self) -> int:
        """Ids the whole cluster can issue per second: every slot of every worker."""
        return self.per_slot_ceiling_per_second() * (1 << self.gene_bits) * self.workers

    def compose(self, timestamp: int, slot: int, worker: int, sequence: int) -> int:
        """An id from its fields; ``timestamp`` is milliseconds since the layout's epoch."""
        return (
            (timestamp << self.timestamp_shift)
            | (slot << self.gene_shift)
            | (worker << self.worker_shift)
            | sequence
        )

    def slot_of(self, id_: int) -> Slot:
        return Slot((id_ >> self.gene_shift) & ((1 << self.gene_bits) - 1))

    def decode(self, id_: int) -> DecodedId:
        """The fields of ``id_``; IdDecodeError when it cannot be an id of this layout."""
        if type(id_) is not int or not 0 <= id_ < (1 << ID_BITS):
            raise IdDecodeError(
                f"decode: {id_!r} is not a shardrouter id (ids are integers in [0, 2**63))"
            )
        return DecodedId(
            id=id_,
            timestamp_ms=(id_ >> self.timestamp_shift) + self.epoch_ms,
            slot=self.slot_of(id_),
            worker=(id_ >> self.worker_shift) & ((1 << self.worker_bits) - 1),
            sequence=id_ & self.max_sequence,
        )


class _ForkedLock:
    """Stands in for a generator's lock in a forked child: entering it refuses.

    Swapping the lock costs the hot path nothing (``with self._lock`` is there anyway, no pid
    check per id), and the child can never block on a lock another parent thread held at the
    fork."""

    def __init__(self, worker_id: int, parent_pid: int) -> None:
        self._message = (
            f"this IdGenerator (worker_id {worker_id}) was made in process {parent_pid} and"
            f" inherited through fork() by process {os.getpid()}: parent and child would issue"
            " the same ids. Make a new generator in the child, after the fork, with a worker_id"
            " no other live process uses (Topology.id_generator(table, worker_id=N)), or a"
            " worker id leased in the child (control.leases.WorkerLease)"
        )

    def __enter__(self) -> None:
        raise IdGeneratorForkedError(self._message)

    def __exit__(self, *exc: object) -> None:
        return None


_LIVE: weakref.WeakSet[IdGenerator] = weakref.WeakSet()
"""Every generator of this process, so a fork can poison the child's copies."""


def _poison_after_fork() -> None:
    for generator in list(_LIVE):
        generator._lock = _ForkedLock(generator.worker_id, generator._pid)


os.register_at_fork(after_in_child=_poison_after_fork)


class IdGenerator:
    """Thread-safe id generator for one worker.

    **Each process needs its own worker_id**: two processes with the same worker_id issue the
    same ids, and without a lease nothing can detect that. Lease it from the meta store
    (``control.leases.WorkerLease``), which calls :meth:`grant` on every renewal; a generator
    that was granted a lease refuses with WorkerLeaseError once the lease ran out. A generator
    inherited through ``fork()`` is detected: in the child it raises IdGeneratorForkedError
    instead of issuing ids; make a new one after the fork, with that process's own worker_id.

    ``slot_of(column, value)`` maps a sharding key to its slot (the topology supplies it), so
    ``next_id(user_id=42)`` embeds user 42's slot. Ids are strictly increasing per slot.

    When a slot's sequence is exhausted within a millisecond the generator waits for the next
    millisecond. When the clock steps back (NTP) it waits until the clock catches up with the
    last millisecond it issued ids for, up to ``max_backward_ms``; beyond that it raises
    ClockMovedBackwardsError. It never issues an id twice.
    """

    def __init__(
        self,
        layout: IdLayout,
        worker_id: int,
        *,
        slot_of: Callable[[str, Any], Slot] | None = None,
        max_backward_ms: int = 100,
        clock_ms: Callable[[], int] = _wall_clock_ms,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= worker_id < layout.workers:
            raise IdError(
                f"worker_id {worker_id} is outside [0, {layout.workers}) for {layout.worker_bits}"
                " worker bits (pick a free worker id or widen worker_bits)"
            )
        self.layout = layout
        self.worker_id = worker_id
        self._slot_of = slot_of
        self._max_backward_ms = max_backward_ms
        self._clock_ms = clock_ms
        self._sleep = sleep
        self._lock: threading.Lock | _ForkedLock = threading.Lock()
        self._pid = os.getpid()
        _LIVE.add(self)
        slots = 1 << layout.gene_bits
        self._slots = slots
        # Per slot: the last millisecond (since epoch) issued and the next free sequence.
        self._last_ms = [-1] * slots
        self._next_seq = [0] * slots
        # Highest millisecond issued on any slot: the reference for detecting a clock step back.
        self._high_ms = -1
        self._worker_bits = worker_id << layout.worker_shift
        # Issuing stops at the first of: the layout's lifetime, the lease's expiry (grant).
        self._lifetime_ms = 1 << layout.timestamp_bits
        self._limit_ms = self._lifetime_ms
        # The lease, when there is one: issue only while monotonic() < _valid_until. The check
        # runs once per millisecond of the clock (_checked_ms), not once per id.
        self._monotonic = monotonic
        self._valid_until = float("inf")
        self._checked_ms = -1
        self._leased = False
        self._revoked: str | None = None
        self._lease_trouble = ""

    # -- public API -------------------------------------------------------------------------

    def next_id(self, **key: Any) -> int:
        """A new id for the row whose sharding key is given, e.g. ``next_id(user_id=42)``.

        ``next_id(slot=7)`` names the slot directly.
        """
        return self._reserve(self._key_slot(key), 1)[0]

    def next_ids(self, count: int, **key: Any) -> list[int]:
        """``count`` new ids for one key, reserved under one lock acquisition."""
        if type(count) is not int or count < 1:
            raise IdError(f"next_ids: count {count!r} must be a positive integer")
        return self._reserve(self._key_slot(key), count)

    def next_for_slot(self, slot: int) -> int:
        """A new id in ``slot``: the fastest path, for callers that already routed."""
        if not 0 <= slot < self._slots:
            raise IdError(f"next_for_slot: slot {slot} is outside [0, {self._slots})")
        return self._reserve(slot, 1)[0]

    def decode(self, id_: int) -> DecodedId:
        return self.layout.decode(id_)

    # -- the worker-id lease (pushed in by control.leases; no I/O here) -----------------------

    def grant(
        self, valid_until: float, issue_before_ms: int, issue_from_ms: int | None = None
    ) -> None:
        """Let this generator issue ids while ``monotonic() < valid_until`` and only with
        timestamps (Unix ms) below ``issue_before_ms``; with ``issue_from_ms``, only at or
        after it (a reused worker id: the previous holder's ids all lie before it).

        Called by the lease on acquisition and on every renewal. A revoked generator stays
        revoked."""
        with self._lock:
            if issue_from_ms is not None:
                floor = issue_from_ms - self.layout.epoch_ms
                if floor > self._high_ms:
                    self._high_ms = floor
            self._limit_ms = min(self._lifetime_ms, issue_before_ms - self.layout.epoch_ms)
            self._valid_until = valid_until
            self._leased = True
            self._lease_trouble = ""
            self._checked_ms = -1  # the next id checks the new deadline
            if self._revoked is not None:
                self._limit_ms = -1

    def lease_trouble(self, why: str) -> None:
        """Record why the lease is not being renewed, for the error once it runs out."""
        self._lease_trouble = why

    def revoke(self, message: str) -> None:
        """Stop issuing for good: every later call raises WorkerLeaseError(``message``)."""
        self._revoked = message
        with self._lock:
            self._leased = True
            self._limit_ms = -1
            self._valid_until = float("-inf")
            self._checked_ms = -1

    @property
    def high_water_ms(self) -> int | None:
        """The latest timestamp (Unix ms) this generator issued an id for, or None."""
        return None if self._high_ms < 0 else self._high_ms + self.layout.epoch_ms

    @property
    def lease_valid(self) -> bool:
        """Whether this generator may issue ids now (always, without a lease)."""
        if not self._leased:
            return True
        return self._revoked is None and self._monotonic() < self._valid_until

    # -- internals ----------------------------------------------------------------------------

    def _key_slot(self, key: dict[str, Any]) -> int:
        if len(key) != 1:
            raise IdError(
                f"next_id takes exactly one sharding key (e.g. user_id=42), got {sorted(key)}"
            )
        ((column, value),) = key.items()
        if column == "slot":
            if type(value) is not int or not 0 <= value < self._slots:
                raise IdError(f"next_id: slot {value!r} is outside [0, {self._slots})")
            return value
        if self._slot_of is None:
            raise IdError(
                f"next_id({column}=...): this generator has no topology to route keys;"
                " pass slot=N or create it with Topology.id_generator()"
            )
        return self._slot_of(column, value)

    def _now(self) -> int:
        now = self._clock_ms() - self.layout.epoch_ms
        if now < 0:
            raise IdError(
                "the clock reads before the id epoch; check the system time or the ids.epoch"
            )
        if now >= self._limit_ms:
            if now >= self._lifetime_ms:
                raise IdError(
                    f"the id layout's lifetime ended at {self.layout.end.isoformat()}"
                    " (timestamp_bits exhausted); plan a new epoch"
                )
            raise self._lease_error(now)
        return now

    def _lease_error(self, now: int | None = None) -> WorkerLeaseError:
        if self._revoked is not None:
            return WorkerLeaseError(self._revoked)
        w = self.worker_id
        if now is not None and now >= self._limit_ms and self._monotonic() < self._valid_until:
            what = (
                f"this host's clock reached the expiry of worker id {w}'s lease on the meta"
                " store's clock before the lease ran out by this process's clock: this clock"
                " runs ahead of the store's (check NTP)"
            )
        else:
            what = f"worker id {w}'s lease ran out by this process's clock without a renewal"
        why = f" ({self._lease_trouble})" if self._lease_trouble else ""
        return WorkerLeaseError(
            f"{what}{why}; no id issued: another process may hold worker id {w} by now. Ids"
            " resume if the lease is renewed while no one else took the id; otherwise make a"
            " new lease (WorkerLease.acquire) once the meta store answers"
        )

    def _reserve(self, slot: int, count: int) -> list[int]:
        layout = self.layout
        max_seq = layout.max_sequence
        base = (slot << layout.gene_shift) | self._worker_bits
        ts_shift = layout.timestamp_shift
        out: list[int] = []
        with self._lock:
            while len(out) < count:
                now = self._wait_for_clock(self._now())
                if now != self._checked_ms:
                    # Once per clock millisecond: the lease's deadline by the monotonic clock.
                    if self._leased and self._monotonic() >= self._valid_until:
                        raise self._lease_error()
                    self._checked_ms = now
                last = self._last_ms[slot]
                if now > last:
                    seq = 0
                elif self._next_seq[slot] <= max_seq:
                    seq = self._next_seq[slot]
                else:
                    # This slot's sequence is used up for this millisecond: take the next one.
                    self._sleep_until_after(last)
                    continue
                take = min(count - len(out), max_seq - seq + 1)
                stamp = (now << ts_shift) | base
                if take == 1:  # the common single-id call skips building a generator
                    out.append(stamp | seq)
                else:
                    out.extend(range(stamp | seq, (stamp | seq) + take))
                self._last_ms[slot] = now
                self._next_seq[slot] = seq + take
                if now > self._high_ms:
                    self._high_ms = now
        return out

    def _wait_for_clock(self, now: int) -> int:
        """``now``, or a later reading once the clock has caught up with the highest issued ms."""
        high = self._high_ms
        if now >= high:
            return now
        behind = high - now
        if behind > self._max_backward_ms:
            raise ClockMovedBackwardsError(
                f"the clock moved back {behind} ms (more than max_backward_ms="
                f"{self._max_backward_ms}); no id issued. Check NTP, or raise ids.max_backward_ms"
            )
        self._sleep_until_after(high - 1)
        now = self._now()
        if now < high:
            raise ClockMovedBackwardsError(
                f"the clock is still {high - now} ms behind after waiting {behind} ms; no id issued"
            )
        return now

    def _sleep_until_after(self, ms: int) -> None:
        """Sleep (briefly, repeatedly) until the clock reads later than ``ms``."""
        deadline_checks = 0
        while self._now() <= ms:
            remaining = ms + 1 - self._now()
            self._sleep(max(remaining, 0) / 1000 if remaining > 1 else 0.0001)
            deadline_checks += 1
            if deadline_checks > 100_000:  # a frozen clock must not hang the caller forever
                raise ClockMovedBackwardsError(
                    "the clock did not advance while waiting for the next millisecond"
                )


__all__ = ["ID_BITS", "DecodedId", "IdGenerator", "IdLayout"]
