"""Worker-id leases: each id generator's worker id, leased from the meta store.

A lease is a row of ``shardrouter_worker_leases`` (times: the store server's clock, ms)::

    worker_id | holder | acquired_at_ms | lease_expires_at_ms | reusable_at_ms

**Acquire** takes, in one transaction serialised on the meta row (``FOR UPDATE``; SQLite's
``BEGIN IMMEDIATE`` holds the whole file), the lowest worker id in ``[0, 2**worker_bits)`` that
has no row or whose row is reusable (``reusable_at_ms <= now``), and claims it with an insert
or an update guarded by that same condition (a primary-key conflict or a zero row count means
another process won: try again). So two processes never hold one worker id at once.

**Renew** (a daemon thread every ``lease_s / 3``, or :meth:`WorkerLease.renew` from outside,
e.g. a router's heartbeat) moves ``lease_expires_at_ms`` to ``now + lease_s`` and
``reusable_at_ms`` to that plus ``max_backward_ms``, only while ``holder`` is still this lease
(row count 1); otherwise the lease is lost and its generators stop for good.

**Why no id can repeat across a reuse.** The generators of a lease get, on every renewal,
:meth:`IdGenerator.grant`: a monotonic deadline (``lease_s - fence_margin_s`` after the
renewal was *sent*, so the round trip is on the safe side) and a timestamp ceiling, the expiry
on the store's clock. Every id of a holder is stamped below its lease's ``lease_expires_at_ms``
(by the holder's clock); the next holder of the id stamps its ids at or after that value (its
generator starts from it), and takes the id only once ``reusable_at_ms`` = expiry +
``max_backward_ms`` has passed on the store's clock, so a dead holder's id comes back after the
lease plus the largest clock step a generator tolerates, and a live successor on a host whose
clock is a little behind the store's waits instead of repeating ids. A clean release writes the
holder's last issued millisecond + 1 as the expiry (or the floor it inherited, if later: never
less), so a released id is reusable at once.

Release on :meth:`WorkerLease.close`, at interpreter exit (atexit), never from a forked child
(the child's copy refuses, like an IdGenerator inherited through fork()).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import socket
import threading
import time
import uuid
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, insert, select, update
from sqlalchemy.exc import IntegrityError

from ..core.ids import IdGenerator
from ..errors import (
    IdGeneratorForkedError,
    MetaStoreError,
    MetaStoreUnavailableError,
    WorkerLeaseError,
)
from .store import MetaStore, worker_leases_table

if TYPE_CHECKING:
    from ..core.topology import Topology

_T = worker_leases_table
_CLAIM_ATTEMPTS = 5


@dataclass(frozen=True, slots=True)
class LeaseRecord:
    """One row of the lease table, as the store saw it (times: the store's clock, ms)."""

    worker_id: int
    holder: str | None
    acquired_at_ms: int
    lease_expires_at_ms: int
    reusable_at_ms: int
    now_ms: int

    @property
    def held(self) -> bool:
        """A holder whose lease has not expired (it may be issuing ids)."""
        return self.holder is not None and self.lease_expires_at_ms > self.now_ms

    @property
    def reusable(self) -> bool:
        return self.reusable_at_ms <= self.now_ms


def worker_leases(store: MetaStore) -> list[LeaseRecord]:
    """Every row of the lease table, by worker id (held, expired and released alike)."""
    with store.begin() as conn:
        store.check(conn)
        now = store.server_now_ms(conn)
        rows = conn.execute(select(_T).order_by(_T.c.worker_id)).all()
    return [_record(row, now) for row in rows]


def _record(row: Any, now: int) -> LeaseRecord:
    return LeaseRecord(
        worker_id=int(row.worker_id),
        holder=row.holder,
        acquired_at_ms=int(row.acquired_at_ms),
        lease_expires_at_ms=int(row.lease_expires_at_ms),
        reusable_at_ms=int(row.reusable_at_ms),
        now_ms=now,
    )


def _holder_token() -> str:
    """Unique per lease (the uuid), readable for an operator (pid@host)."""
    return f"{uuid.uuid4().hex[:20]} {os.getpid()}@{socket.gethostname()}"[:64]


_LIVE: weakref.WeakSet[WorkerLease] = weakref.WeakSet()


def _forget_after_fork() -> None:
    for lease in list(_LIVE):
        lease._forked = True
    _LIVE.clear()


def _release_all_at_exit() -> None:
    for lease in list(_LIVE):
        # Exit must go on whatever happens: an unreleased lease expires by itself.
        with contextlib.suppress(Exception):
            lease.close()


os.register_at_fork(after_in_child=_forget_after_fork)
atexit.register(_release_all_at_exit)


class WorkerLease:
    """A worker id leased from the meta store for this process's id generators.

    Make one with :meth:`acquire` (or :meth:`for_topology`), then generators with
    :meth:`generator` (or hand existing ones to :meth:`attach`); close it when the process stops
    issuing ids (it is also released at interpreter exit). Thread-safe; not fork-safe by design:
    a copy inherited through fork() refuses, so make the lease in the child.
    """

    def __init__(
        self,
        store: MetaStore,
        *,
        worker_id: int,
        holder: str,
        expires_at_ms: int,
        valid_until: float,
        issue_from_ms: int | None,
        lease_s: float,
        fence_margin_s: float,
        max_backward_ms: int,
        renew_every_s: float,
        owns_store: bool,
    ) -> None:
        """Use :meth:`acquire`: this only wraps a row the caller has claimed."""
        self.store = store
        self.worker_id = worker_id
        self.holder = holder
        self.lease_s = lease_s
        self.fence_margin_s = fence_margin_s
        self.max_backward_ms = max_backward_ms
        self.renew_every_s = renew_every_s
        self._expires_at_ms = expires_at_ms
        self._valid_until = valid_until
        self._issue_from_ms = issue_from_ms
        self._owns_store = owns_store
        self._generators: list[IdGenerator] = []
        self._lock = threading.Lock()  # renewals and release, one at a time
        self._pid = os.getpid()
        self._forked = False
        self._lost: str | None = None
        self._closed = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        _LIVE.add(self)

    # -- acquisition --------------------------------------------------------------------------

    @classmethod
    def acquire(
        cls,
        store: MetaStore,
        *,
        worker_bits: int,
        max_backward_ms: int = 100,
        lease_s: float | None = None,
        fence_margin_s: float | None = None,
        renew_every_s: float | None = None,
        auto_renew: bool = True,
        owns_store: bool = False,
    ) -> WorkerLease:
        """Lease the lowest free worker id in ``[0, 2**worker_bits)``.

        ``lease_s`` and ``fence_margin_s`` default to the store's MetaConfig (10 s and 1 s);
        renewals run every ``renew_every_s`` (default ``lease_s / 3``) in a daemon thread
        unless ``auto_renew`` is False (then call :meth:`renew` yourself, e.g. from a
        heartbeat). WorkerLeaseError when every id is taken or the store did not answer."""
        config = store.config
        lease_s = lease_s if lease_s is not None else (config.lease_s if config else 10.0)
        margin = (
            fence_margin_s
            if fence_margin_s is not None
            else (config.fence_margin_s if config else 1.0)
        )
        every = renew_every_s if renew_every_s is not None else lease_s / 3
        if not 0 <= worker_bits <= 20:
            raise WorkerLeaseError(f"worker_bits {worker_bits} is outside [0, 20]")
        if lease_s <= 0 or every <= 0 or margin < 0 or margin + 2 * every >= lease_s:
            raise WorkerLeaseError(
                f"lease_s ({lease_s:g}) must exceed fence_margin_s + 2 x renew_every_s"
                f" ({margin:g} + 2 x {every:g}): a lease must get two chances to renew before"
                " its generators stop; raise lease_s or renew more often"
            )
        holder = _holder_token()
        lease_ms = int(lease_s * 1000)
        last: Exception | None = None
        for _ in range(_CLAIM_ATTEMPTS):
            sent = time.monotonic()
            try:
                with store.begin() as conn:
                    claimed = _claim(
                        conn, store, holder, 1 << worker_bits, lease_ms, max_backward_ms
                    )
            except MetaStoreError as exc:
                if isinstance(exc.__cause__, IntegrityError):  # another process inserted it
                    last = exc
                    continue
                retry = (
                    "; retry when the meta store answers"
                    if isinstance(exc, MetaStoreUnavailableError)
                    else ""
                )
                raise WorkerLeaseError(f"no worker id could be leased: {exc}{retry}") from exc
            if claimed is None:  # the guarded update lost a race: read again
                continue
            worker_id, now, floor = claimed
            lease = cls(
                store,
                worker_id=worker_id,
                holder=holder,
                expires_at_ms=now + lease_ms,
                valid_until=sent + lease_ms / 1000 - margin,
                issue_from_ms=floor,
                lease_s=lease_s,
                fence_margin_s=margin,
                max_backward_ms=max_backward_ms,
                renew_every_s=every,
                owns_store=owns_store,
            )
            lease._check_clock_behind(floor)
            if auto_renew:
                lease._start_renewing()
            return lease
        raise WorkerLeaseError(
            f"no worker id could be leased: {_CLAIM_ATTEMPTS} attempts lost races with other"
            f" processes ({last}); retry"
        )

    @classmethod
    def for_topology(
        cls, topology: Topology, *, store: MetaStore | None = None, auto_renew: bool = True
    ) -> WorkerLease:
        """A lease sized by the topology's id layout and timed by its ``meta:`` settings
        (its store is opened here and closed with the lease, unless ``store`` is given)."""
        config = topology.config
        if config.meta is None and store is None:
            raise WorkerLeaseError(
                "this topology has no meta: section, so there is no meta store to lease a worker"
                " id from; add meta: {url: ...} (shardctl meta init), or use ids.worker_id"
            )
        owns = store is None
        if store is None:
            assert config.meta is not None
            store = MetaStore.from_config(config.meta)
        try:
            return cls.acquire(
                store,
                worker_bits=config.ids.worker_bits,
                max_backward_ms=config.ids.max_backward_ms,
                auto_renew=auto_renew,
                owns_store=owns,
            )
        except BaseException:
            if owns:
                store.close()
            raise

    # -- generators ---------------------------------------------------------------------------

    def generator(self, topology: Topology, table: str) -> IdGenerator:
        """``topology.id_generator(table)`` issuing under this lease's worker id."""
        return self.attach(topology.id_generator(table, worker_id=self.worker_id))

    def attach(self, generator: IdGenerator) -> IdGenerator:
        """Make ``generator`` (of this lease's worker id) issue only while the lease holds."""
        if generator.worker_id != self.worker_id:
            raise WorkerLeaseError(
                f"attach: the generator has worker id {generator.worker_id}, this lease holds"
                f" {self.worker_id}; make it with worker_id=lease.worker_id (or lease.generator)"
            )
        with self._lock:
            self._check_usable()
            generator.grant(self._valid_until, self._expires_at_ms, self._issue_from_ms)
            self._generators.append(generator)
        return generator

    # -- renewal ------------------------------------------------------------------------------

    @property
    def expires_at_ms(self) -> int:
        """The lease's expiry on the store's clock (Unix ms), as of the last renewal."""
        return self._expires_at_ms

    @property
    def valid_until(self) -> float:
        """The deadline on this process's monotonic clock after which generators stop."""
        return self._valid_until

    @property
    def valid(self) -> bool:
        return self._lost is None and not self._closed and time.monotonic() < self._valid_until

    def renew(self) -> None:
        """Extend the lease by ``lease_s`` from now (store clock) and push the new deadline
        into the generators. WorkerLeaseError when the lease is lost (another process holds
        the id: the generators stop for good); MetaStoreError when the store did not answer
        (the generators go on until the current deadline)."""
        with self._lock:
            self._check_usable()
            lease_ms = int(self.lease_s * 1000)
            sent = time.monotonic()
            try:
                with self.store.begin() as conn:
                    now = self.store.server_now_ms(conn)
                    expires = now + lease_ms
                    moved = conn.execute(
                        update(_T)
                        .where(_T.c.worker_id == self.worker_id, _T.c.holder == self.holder)
                        .values(
                            lease_expires_at_ms=expires,
                            reusable_at_ms=expires + self.max_backward_ms,
                        )
                    ).rowcount
            except MetaStoreError as exc:
                for generator in self._generators:
                    generator.lease_trouble(f"last renewal failed: {exc}")
                raise
            if moved != 1:
                self._lose(
                    f"the lease of worker id {self.worker_id} was lost: the meta store no longer"
                    f" has it held by this process ({self.holder}); it expired without renewal"
                    " and was taken or released. No more ids from its generators: make a new"
                    " lease (WorkerLease.acquire)"
                )
                raise WorkerLeaseError(self._lost or "")
            self._expires_at_ms = expires
            self._valid_until = sent + lease_ms / 1000 - self.fence_margin_s
            for generator in self._generators:
                generator.grant(self._valid_until, expires)

    def _start_renewing(self) -> None:
        thread = threading.Thread(
            target=self._renew_loop, name=f"shardrouter-lease-{self.worker_id}", daemon=True
        )
        self._thread = thread
        thread.start()

    def _renew_loop(self) -> None:
        wait = self.renew_every_s
        while not self._stop.wait(wait):
            try:
                self.renew()
            except WorkerLeaseError:
                return  # lost, closed or forked: nothing left to renew
            except MetaStoreError:
                # Try again soon: the generators keep going until their deadline meanwhile.
                wait = min(self.renew_every_s, max(0.05, self.lease_s / 10))
                continue
            except Exception as exc:  # a renewal thread must never die silently
                for generator in self._generators:
                    generator.lease_trouble(f"last renewal failed: {exc!r}")
                wait = min(self.renew_every_s, max(0.05, self.lease_s / 10))
                continue
            wait = self.renew_every_s

    # -- release ------------------------------------------------------------------------------

    def close(self) -> bool:
        """Stop the generators and give the worker id back; True when the store recorded it
        (False: the store did not answer, and the id comes back when the lease expires).
        Idempotent; a no-op in a forked child."""
        if self._forked or os.getpid() != self._pid:
            return False
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            config = self.store.config
            thread.join(timeout=(config.query_timeout_s if config else 5.0) + 1.0)
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            message = (
                f"the lease of worker id {self.worker_id} was released (WorkerLease.close);"
                " make a new lease for more ids"
            )
            highs = []
            for generator in self._generators:
                generator.revoke(message)  # waits for an id being issued right now
                high = generator.high_water_ms
                if high is not None:
                    highs.append(high)
            released = False
            if self._lost is None:
                released = self._write_release(max(highs) + 1 if highs else None)
        _LIVE.discard(self)
        if self._owns_store:
            self.store.close()
        return released

    release = close

    def _write_release(self, floor: int | None) -> bool:
        try:
            with self.store.begin() as conn:
                now = self.store.server_now_ms(conn)
                # Every id of this holder is stamped below `floor` (its last issued ms + 1, by
                # its own clock) and every id of the previous holders below the floor this
                # lease inherited, so the next holder may start at the larger of the two. Never
                # lowered to the expiry: that could hand out stamps already used. No id issued
                # and nothing inherited: now (within the lease, nothing below it is ours).
                end = max(
                    floor if floor is not None else min(self._expires_at_ms, now),
                    self._issue_from_ms if self._issue_from_ms is not None else 0,
                )
                conn.execute(
                    update(_T)
                    .where(_T.c.worker_id == self.worker_id, _T.c.holder == self.holder)
                    .values(holder=None, lease_expires_at_ms=end, reusable_at_ms=end)
                )
            return True
        except MetaStoreError:
            return False

    def __enter__(self) -> WorkerLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "lost" if self._lost else "closed" if self._closed else "held"
        return f"WorkerLease(worker_id={self.worker_id}, {state}, store={self.store!r})"

    # -- internals ----------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._forked or os.getpid() != self._pid:
            raise IdGeneratorForkedError(
                f"this WorkerLease (worker id {self.worker_id}) was made in process {self._pid}"
                f" and inherited through fork() by process {os.getpid()}: parent and child would"
                " share the worker id. Acquire a new lease in the child, after the fork"
            )
        if self._closed:
            raise WorkerLeaseError(
                f"the lease of worker id {self.worker_id} is closed; make a new lease"
            )
        if self._lost is not None:
            raise WorkerLeaseError(self._lost)

    def _lose(self, message: str) -> None:
        self._lost = message
        self._stop.set()
        for generator in self._generators:
            generator.revoke(message)

    def _check_clock_behind(self, floor: int | None) -> None:
        """A reused id whose previous holder's ids lie ahead of this host's clock by more than
        a generator would wait: refuse now, clearly, rather than at the first id."""
        if floor is None:
            return
        behind = floor - time.time_ns() // 1_000_000
        if behind > self.max_backward_ms:
            self.close()
            raise WorkerLeaseError(
                f"worker id {self.worker_id} was last used up to {behind} ms ahead of this"
                f" host's clock (more than max_backward_ms={self.max_backward_ms}): ids issued"
                " now could repeat the previous holder's. Check this host's clock (NTP) against"
                " the meta store's, or raise ids.max_backward_ms"
            )


def _claim(
    conn: Connection,
    store: MetaStore,
    holder: str,
    workers: int,
    lease_ms: int,
    max_backward_ms: int,
) -> tuple[int, int, int | None] | None:
    """Claim the lowest free worker id: (worker id, store now, first ms the new holder may stamp
    or None for a never-used id). None when a guarded update lost a race."""
    store.check(conn, lock=True)  # acquisitions queue on the meta row, one at a time
    now = store.server_now_ms(conn)
    rows = {
        int(row.worker_id): row
        for row in conn.execute(
            select(_T.c.worker_id, _T.c.holder, _T.c.lease_expires_at_ms, _T.c.reusable_at_ms)
            .where(_T.c.worker_id < workers)
            .order_by(_T.c.worker_id)
        )
    }
    chosen = next(
        (w for w in range(workers) if w not in rows or int(rows[w].reusable_at_ms) <= now), None
    )
    if chosen is None:
        raise WorkerLeaseError(_all_taken(rows.values(), workers, now, lease_ms, max_backward_ms))
    expires = now + lease_ms
    values = {
        "holder": holder,
        "acquired_at_ms": now,
        "lease_expires_at_ms": expires,
        "reusable_at_ms": expires + max_backward_ms,
    }
    previous = rows.get(chosen)
    if previous is None:
        conn.execute(insert(_T).values(worker_id=chosen, **values))
        return chosen, now, None
    moved = conn.execute(
        update(_T).where(_T.c.worker_id == chosen, _T.c.reusable_at_ms <= now).values(**values)
    ).rowcount
    if moved != 1:
        return None
    return chosen, now, int(previous.lease_expires_at_ms)


def _all_taken(rows: Any, workers: int, now: int, lease_ms: int, max_backward_ms: int) -> str:
    rows = list(rows)
    held = sum(1 for r in rows if r.holder is not None and int(r.lease_expires_at_ms) > now)
    waiting = len(rows) - held
    soonest = min((int(r.reusable_at_ms) for r in rows), default=now) - now
    bits = workers.bit_length() - 1
    detail = f"{held} held by live generators"
    if waiting:
        detail += (
            f", {waiting} expired or released but not reusable yet (the first in {soonest} ms)"
        )
    return (
        f"no worker id is free: all {workers} ids of {bits} worker bits are taken ({detail});"
        f" widen ids.worker_bits (a new layout: only before the cluster's first id), run fewer"
        f" id-generating processes, or wait for expired leases (a dead holder's id is reusable"
        f" {lease_ms} ms lease + {max_backward_ms} ms max_backward_ms after its last renewal)"
    )


__all__ = ["LeaseRecord", "WorkerLease", "worker_leases"]
