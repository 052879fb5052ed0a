"""The router registry: routers register, heartbeat (renewing a lease), acknowledge versions.

Each router that follows a meta store has one row in ``shardrouter_routers`` (instance id: a
uuid4 hex; host, pid, process start, kind sync/async; the version it serves and the version it
has acknowledged; heartbeat and lease expiry on the store's clock). ``Registration`` writes that
row; ``wait_for_acks`` reads the rows to tell a version change when every live router serves it.

A router's lease is ``store now + lease_s`` at each heartbeat. A router whose lease expired is
no longer live: it does not block ``wait_for_acks`` (a dead router holds a version change for
at most one lease) and it fences itself (shardrouter.control.follow) before the store lets go.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from sqlalchemy import Connection, delete, func, select, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..errors import MetaStoreError, TopologyChangeError
from .store import (
    SCHEMA_VERSION,
    MetaStore,
    RouterRecord,
    _missing_table,
    _newer,
    _not_initialised,
    meta_table,
    routers_table,
)

RouterKind = Literal["sync", "async"]

PRUNE_AFTER_MS = 3_600_000
"""Rows of routers whose lease expired more than this long ago are removed at registration
(a crashed process never deregisters; its row stays visible, expired, for an hour)."""


def process_start_ms() -> int:
    """When this process started (wall clock, ms), from /proc where there is one."""
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rpartition(")")[2].split()
        ticks = int(fields[19])  # starttime: field 22 of stat, the 20th after the name
        with open("/proc/stat", encoding="ascii") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        return int((boot + ticks / os.sysconf("SC_CLK_TCK")) * 1000)
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED_MS


_IMPORTED_MS = int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """What one heartbeat learned (in the same transaction that renewed the lease)."""

    current_version: int | None
    all_acked_version: int | None
    """The lowest version acknowledged by the live routers (this one included)."""
    now_ms: int
    lease_expires_at_ms: int


class Registration:
    """This router's row in the registry: ``register``, ``heartbeat``, ``deregister``."""

    def __init__(self, store: MetaStore, *, kind: RouterKind, lease_s: float) -> None:
        self.store = store
        self.kind = kind
        self.lease_ms = int(lease_s * 1000)
        self.instance_id = uuid.uuid4().hex
        self.host = socket.gethostname()[:255]
        self.pid = os.getpid()
        self.process_start_ms = process_start_ms()
        self.registered = False
        self._reader: Connection | None = None

    def register(self, serving_version: int, acked_version: int | None = None) -> Heartbeat:
        """Insert this router's row (and prune long-expired rows of others)."""
        store = self.store
        with store.begin() as conn:
            store.check(conn)
            now = store.server_now_ms(conn)
            conn.execute(
                delete(routers_table).where(
                    routers_table.c.lease_expires_at_ms < now - PRUNE_AFTER_MS
                )
            )
            conn.execute(
                routers_table.insert().values(
                    instance_id=self.instance_id,
                    host=self.host,
                    pid=self.pid,
                    process_start_ms=self.process_start_ms,
                    kind=self.kind,
                    serving_version=serving_version,
                    acked_version=serving_version if acked_version is None else acked_version,
                    registered_at_ms=now,
                    heartbeat_at_ms=now,
                    lease_expires_at_ms=now + self.lease_ms,
                )
            )
            self.registered = True
            return self._read(conn)

    def heartbeat(self, serving_version: int, acked_version: int) -> Heartbeat:
        """Renew the lease, record the served and acknowledged versions, and read the current
        version and the cluster's lowest acknowledgement: one transaction. A row that
        vanished (pruned, or deleted by hand) is inserted again."""
        store = self.store
        lease = store.now + self.lease_ms
        with store.begin() as conn:
            moved = conn.execute(
                update(routers_table)
                .where(routers_table.c.instance_id == self.instance_id)
                .values(
                    serving_version=serving_version,
                    acked_version=acked_version,
                    heartbeat_at_ms=store.now,
                    lease_expires_at_ms=lease,
                )
            )
            if moved.rowcount == 0:
                now = store.server_now_ms(conn)
                conn.execute(
                    routers_table.insert().values(
                        instance_id=self.instance_id,
                        host=self.host,
                        pid=self.pid,
                        process_start_ms=self.process_start_ms,
                        kind=self.kind,
                        serving_version=serving_version,
                        acked_version=acked_version,
                        registered_at_ms=now,
                        heartbeat_at_ms=now,
                        lease_expires_at_ms=now + self.lease_ms,
                    )
                )
            return self._read(conn)

    def read(self) -> Heartbeat:
        """The current version, the lowest live acknowledgement and the store's clock, without
        renewing anything: the poll between two heartbeats. One SELECT in autocommit on a
        connection kept for it (no pool checkout, ping, COMMIT or reset per poll; a SQLite
        store reads in a transaction as every other operation). Only the poller calls it."""
        store = self.store
        if store.dialect == "sqlite":
            with store.begin() as conn:
                return self._read(conn)
        try:
            if self._reader is None:
                self._reader = store.engine.connect().execution_options(
                    isolation_level="AUTOCOMMIT"
                )
            return self._read(self._reader)
        except (DBAPIError, PoolTimeoutError) as exc:
            self.close_reader()
            raise store._classify(exc) from exc

    def close_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            with contextlib.suppress(Exception):  # a dead connection: dropped either way
                reader.invalidate()
                reader.close()

    def _read(self, conn: Connection) -> Heartbeat:
        """The current version, the lowest live acknowledgement and the store's clock: one
        SELECT (the meta row's checks as MetaStore.check makes them)."""
        store = self.store
        lowest = (
            select(func.min(routers_table.c.acked_version))
            .where(routers_table.c.lease_expires_at_ms > store.now)
            .scalar_subquery()
        )
        query = select(
            meta_table.c.schema_version,
            meta_table.c.current_version,
            lowest.label("lowest"),
            store.now.label("now"),
        )
        try:
            row = conn.execute(query).first()
        except DBAPIError as exc:
            if _missing_table(exc):
                raise MetaStoreError(_not_initialised(store.url)) from None
            raise
        if row is None:
            raise MetaStoreError(_not_initialised(store.url))
        if row.schema_version > SCHEMA_VERSION:
            raise MetaStoreError(_newer(store.url, row.schema_version))
        now = int(row.now)
        current = None if row.current_version is None else int(row.current_version)
        lowest_acked = None if row.lowest is None else int(row.lowest)
        return Heartbeat(current, lowest_acked, now, now + self.lease_ms)

    def deregister(self) -> None:
        """Remove this router's row (close(), interpreter exit); best effort by the caller."""
        self.close_reader()
        if not self.registered:
            return
        with self.store.begin() as conn:
            conn.execute(
                delete(routers_table).where(routers_table.c.instance_id == self.instance_id)
            )
        self.registered = False


@dataclass(frozen=True, slots=True)
class AckReport:
    """The outcome of ``wait_for_acks``.

    ``complete``: every live router acknowledged ``version`` (True also when routers lag only
    because their leases expired: those are in ``expired``, no longer blocking). At a timeout
    ``complete`` is False and ``lagging`` names the live routers that had not acknowledged.
    """

    version: int
    complete: bool
    waited_s: float
    acked: tuple[RouterRecord, ...] = ()
    """Live routers that acknowledged ``version`` (or newer)."""
    lagging: tuple[RouterRecord, ...] = ()
    """Live routers (lease not expired) still below ``version``: they block."""
    expired: tuple[RouterRecord, ...] = field(default=())
    """Routers below ``version`` whose lease expired: dead or cut off, no longer blocking
    (they fence themselves before their lease ends, see shardrouter.control.follow)."""

    def describe(self) -> str:
        def names(records: tuple[RouterRecord, ...]) -> str:
            return ", ".join(
                f"{r.instance_id[:12]} ({r.kind} pid {r.pid} on {r.host}, acked"
                f" {r.acked_version}, heartbeat {r.heartbeat_age_ms} ms ago)"
                for r in records
            )

        if self.complete:
            text = f"version {self.version}: acknowledged by {len(self.acked)} live router(s)"
        else:
            text = (
                f"version {self.version}: {len(self.lagging)} live router(s) had not"
                f" acknowledged after {self.waited_s:.1f} s: {names(self.lagging)}"
            )
        if self.expired:
            text += f"; lease expired (not waited for): {names(self.expired)}"
        return text

    def raise_if_incomplete(self) -> AckReport:
        """TopologyChangeError naming the lagging routers unless ``complete``; else self."""
        if not self.complete:
            raise TopologyChangeError(
                [
                    self.describe()
                    + "; wait longer, or stop those routers (their leases then expire)"
                ]
            )
        return self


def wait_for_acks(
    store: MetaStore, version: int, timeout: float, *, poll_s: float = 0.02
) -> AckReport:
    """Wait until every live router has acknowledged ``version`` (or newer); a router whose
    lease expires meanwhile stops blocking and is reported in ``expired``.

    Never raises on timeout: returns an AckReport with ``complete=False`` naming the laggards
    (``report.raise_if_incomplete()`` turns that into TopologyChangeError). A meta store that
    does not answer is retried until the timeout, then its MetaStoreUnavailableError raised.
    """
    start = time.monotonic()
    deadline = start + timeout
    while True:
        try:
            records = store.routers()
        except MetaStoreError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(poll_s)
            continue
        live = [r for r in records if r.live]
        acked = tuple(r for r in live if r.acked_version >= version)
        lagging = tuple(r for r in live if r.acked_version < version)
        expired = tuple(r for r in records if not r.live and r.acked_version < version)
        now = time.monotonic()
        if not lagging or now >= deadline:
            return AckReport(version, not lagging, now - start, acked, lagging, expired)
        time.sleep(min(poll_s, max(0.0, deadline - now)))


__all__ = [
    "AckReport",
    "Heartbeat",
    "Registration",
    "RouterKind",
    "process_start_ms",
    "wait_for_acks",
]
