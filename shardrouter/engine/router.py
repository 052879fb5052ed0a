"""Router: the public facade of sharded execution (sync); runs the shared core on threads."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import Connection, Engine, Select, TextClause, literal_column, text
from sqlalchemy.dialects import mysql
from sqlalchemy.exc import CompileError, DBAPIError, PendingRollbackError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session
from sqlalchemy.sql import Executable

from ..core.config import TopologyConfig, load_config
from ..core.topology import KeyRule, Topology
from ..errors import (
    CrossShardTransactionError,
    ExecutionError,
    LockConflictError,
    RoutingError,
    ShardUnavailableError,
    TransactionAbortedError,
    UnsupportedQueryError,
)
from ..sql.execution import (
    Bind,
    Job,
    JobResult,
    Limits,
    LookupLedger,
    Page,
    ResultSet,
    check_guard,
    guarded,
    keyset_query,
    log,
    log_statement,
    page_of,
    require_returning,
    run,
    together_order,
)
from ..types import ShardId, Slot
from . import direct, readpool, xa
from .engines import DEADLOCK_ERRNO, ShardEngines, classify
from .readpool import Pending, ReadPool
from .shadow import ShadowReader, shadow_read
from .snapshot import (
    HOLD_POLL_S,
    Frozen,
    HoldQueue,
    LiveSnapshots,
    RoutingSnapshot,
    SlotRecorder,
    SnapshotHolder,
    WriteResolver,
    frozen_now,
    held_too_long,
    steps_blind,
)

Snapshot = RoutingSnapshot[ShardEngines, ReadPool]

_NAMED_MYSQL = mysql.dialect(paramstyle="named")
T = TypeVar("T")


class ShardConnection:
    """A Connection on the shard that owns a key, inside a transaction (the explicit path).

    ``physical("orders")`` gives the physical table that holds the key's rows (table splits);
    everything else is the plain SQLAlchemy Connection (``.execute``, ``.connection``).
    """

    def __init__(self, connection: Connection, topology: Topology, shard: ShardId, slot: Slot):
        self.connection = connection
        self.shard = shard
        self.slot = slot
        self._topology = topology

    def physical(self, table: str) -> str:
        return self._topology.table(table).physical(self.slot)

    def execute(self, statement: Executable, params: Any = None) -> Any:
        return self.connection.execute(statement, params)


class _Runner:
    """Runs jobs (one inline, several on the pool), optionally inside one bound transaction."""

    def __init__(
        self,
        router: Router,
        transaction: Transaction | None = None,
        *,
        sticky: bool = False,
        primary: bool = False,
    ) -> None:
        self.router = router
        self.transaction = transaction
        self.primary = primary
        """Reads on primaries only (the ORM session's: every other read of it is)."""
        self.sticky = sticky
        """Once this runner wrote, its reads stay on primaries (read-your-writes)."""
        self.wrote = False
        self.recorder: SlotRecorder | None = None
        """The slots the current statement routed, while moving ranges exist (resolver)."""

    def drive(
        self, step: Generator[list[Job], list[JobResult], T], snap: Snapshot | None = None
    ) -> T:
        """Run ``step``'s jobs under ``snap`` (None: the router's current snapshot, pinned
        for the whole step; a transaction's runner uses the transaction's)."""
        if snap is None:
            snap = self._own_snapshot()
            if snap is None:
                pinned = self.router._pin()
                try:
                    return self.drive(step, pinned)
                finally:
                    pinned.release()
        try:
            jobs = next(step)
            while True:
                try:
                    results = self.run(jobs, snap)
                except Exception as exc:
                    # The step learns of the failure (and may clean up what it wrote first).
                    jobs = step.throw(exc)
                else:
                    jobs = step.send(results)
        except StopIteration as stop:
            result: T = stop.value
            return result

    def _own_snapshot(self) -> Snapshot | None:
        return self.transaction._snap if self.transaction is not None else None

    @property
    def bind(self) -> Bind | None:
        return self.transaction.bind if self.transaction is not None else None

    @property
    def ledger(self) -> LookupLedger | None:
        return self.transaction._ledger if self.transaction is not None else None

    def run(self, jobs: Sequence[Job], snap: Snapshot | None = None) -> list[JobResult]:
        if snap is None:
            snap = self._own_snapshot()
            if snap is None:
                pinned = self.router._pin()
                try:
                    return self.run(jobs, pinned)
                finally:
                    pinned.release()
        txn = self.transaction
        resolver = self.router.resolver
        recorder = self.recorder
        for job in jobs:  # every write of a statement passes the one resolver
            if job.kind == "write":
                slots = recorder.on(job.shard) if recorder is not None else None
                path = "transaction" if txn else "execute"
                resolver.write_shard(snap, job.shard, path, job.role, slots)
        if guarded(jobs):  # lookup guards: one write of their own, outside any transaction
            return self.router._write_together(jobs, snap)
        if txn is not None:
            out: list[JobResult] = []
            marks: list[ShardId] | None = [] if multi_part(jobs) else None
            try:
                for job in jobs:
                    if job.role == "lookup":  # (a transaction's lookup deletes: its ledger)
                        out.append(self.router._run_job(job, False, snap))
                    else:
                        out.append(txn._run(job, marks))
            except BaseException as exc:
                if marks:
                    txn._undo(marks, exc)
                raise
            return out
        replica = (
            self.router.replica_reads and not self.primary and not (self.sticky and self.wrote)
        )
        if any(job.kind == "write" for job in jobs):
            self.wrote = True
        if len(jobs) == 1:
            result = self.router._run_job(jobs[0], replica, snap)
            if snap.shadowed and recorder is not None:
                read = shadow_read(snap.shadowed, recorder, jobs[0], result)
                if read is not None:
                    self.router._shadow.submit(read)
            return [result]
        if all(j.kind == "write" and j.role == "statement" for j in jobs):
            return self.router._write_together(jobs, snap)
        return self.router._fan_out(jobs, replica, snap)


class Transaction:
    """A transaction bound to the shard of its first statement.

    Without XA, a statement that needs another shard raises CrossShardTransactionError: keep a
    transaction on one key's rows (an order and its items share the user's shard). With
    ``Router(xa=True)`` every transaction is an XA transaction and may span shards (two-phase
    commit, see shardrouter.engine.xa). Lookup rows are written outside it, before it, and settled
    when it ends: those created for owners it did not commit are removed
    (execution.LookupLedger); lookup cleanups run after it commits (see execution.Job.role).

    Every target of a statement is checked before any of its jobs runs (``bind``): a statement
    that needs another shard runs nowhere, and a multi-shard read (a scatter) is refused rather
    than run outside the transaction's snapshot; it binds nothing, so the next statement still
    chooses the shard. A broadcast read runs on the bound shard, or outside before binding.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self._snap = router._pin()
        """The routing snapshot this transaction runs under, from its start to its end."""
        self._xa = router.xa
        self._gtrid = xa.new_gtrid() if router.xa else ""
        self._branches: dict[ShardId, Connection] = {}
        self._runner = _Runner(router, self)
        self._ledger = LookupLedger()
        self._wrote = False
        """A write ran in it: a commit that cannot happen then loses it, and says so."""
        self._broken: BaseException | None = None
        """A statement ended it on the server (a deadlock) or took its connection (a timeout):
        nothing more runs in it, and a commit is refused."""
        self._ended = False
        """Its block is over (committed or rolled back): it runs nothing more (see ended)."""

    @property
    def shards(self) -> tuple[ShardId, ...]:
        """The shards this transaction has touched, in order."""
        return tuple(self._branches)

    @property
    def shard(self) -> ShardId | None:
        return next(iter(self._branches), None)

    def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
        """Run a statement in this transaction. Its first statement, when it writes slots a
        resharding switch is moving right now, waits for the switch (bounded, Router._hold)
        and the transaction starts over on the new version; later ones are refused with
        SwitchHoldError (the transaction read or wrote under the old version: retry it)."""
        try:
            return self._router._execute(statement, params, self._runner)
        except Frozen as exc:
            if self._branches or self._wrote or self._broken is not None or self._ended:
                raise
            return self._router._hold(exc, lambda: self._restart(statement, params))

    def _restart(self, statement: str | Executable, params: Mapping[str, Any] | None) -> ResultSet:
        """Nothing ran in this transaction: pin the router's current version instead."""
        old, self._snap = self._snap, self._router._pin()
        old.release()
        return self._router._execute(statement, params, self._runner)

    def bind(self, shards: Collection[ShardId]) -> None:
        """Refuse a statement that needs a shard this transaction cannot join, before any of
        its jobs runs: without XA, one shard (the bound one, or the only one needed). A
        multi-shard read as the first statement is refused too and binds nothing: run it
        outside the transaction (its answer would not be this transaction's snapshot anyway),
        or use Router(xa=True)."""
        if self._xa:
            return
        bound = self.shard
        others = sorted(s for s in shards if s != bound)
        if others and (bound is not None or len(others) > 1):
            where = f"is bound to shard {bound}" if bound is not None else "runs on one shard"
            raise CrossShardTransactionError(
                f"this transaction {where} and the statement needs shard(s)"
                f" {', '.join(others)}; nothing ran. Keep a transaction on one key's rows (an"
                " order and its items share the user's shard), run multi-shard reads outside"
                " it, or configure Router(xa=True)",
                shard=others[0],
            )

    def _run(self, job: Job, marks: list[ShardId] | None = None) -> JobResult:
        """Run ``job`` on its shard's branch. ``marks``: the branches a multi-part statement
        has set its savepoint on so far (see multi_part); this job's branch gets one first."""
        bound = self.shard
        if job.anywhere and bound is None:
            # A broadcast read before anything else: answering it must not bind the
            # transaction to a shard its writes may not need.
            return self._router._run_job(job, False, self._snap)
        if job.anywhere and bound is not None and job.shard not in self._branches:
            job = replace(job, shard=bound)  # a broadcast read: any shard will do
        conn = self._branches.get(job.shard)
        if conn is None:
            if self._branches and not self._xa:
                raise CrossShardTransactionError(
                    f"this transaction is bound to shard {self.shard} and the statement needs"
                    f" shard {job.shard}; keep a transaction on one key's rows (an order and"
                    " its items share the user's shard), or configure Router(xa=True)",
                    shard=job.shard,
                )
            engine = self._snap.engines.primary(job.shard)
            # The first branch decides (see shardrouter.engine.xa); the xid names it, checked here,
            # before a connection is taken.
            decider = self.shard or job.shard
            if self._xa:
                xa.xid(self._gtrid, job.shard, decider)
            try:
                conn = engine.connect()
                if self._xa:
                    xa.start(conn, self._gtrid, job.shard, decider)
                else:
                    conn.begin()
            except (DBAPIError, PoolTimeoutError) as exc:
                raise classify(exc, job.shard) from exc
            self._branches[job.shard] = conn
        if self._broken is not None:
            raise aborted(job.shard, self._broken)
        self._wrote = self._wrote or job.kind == "write"
        try:
            if marks is not None and job.shard not in marks:
                _on(conn, job.shard, SAVEPOINT)
                marks.append(job.shard)
            return self._router._execute_on(conn, job)
        except (ShardUnavailableError, TransactionAbortedError) as exc:
            self._broken = exc  # the connection is gone: its transaction with it
            raise
        except LockConflictError as exc:
            # After a deadlock the server has rolled back the whole transaction; a later
            # statement would run in a fresh one and a commit would commit half of it.
            if ends_transaction(exc):
                self._broken = exc
            raise

    def _undo(self, marks: Sequence[ShardId], exc: BaseException) -> None:
        """A multi-part statement failed: undo its parts that ran (ROLLBACK TO SAVEPOINT on
        each branch it touched), as one database rolls back a failed statement and keeps the
        transaction. Not when the failure ended the transaction (a deadlock, a lost
        connection: already marked broken) or interrupted a part mid-answer; a branch whose
        undo fails breaks the transaction, so its commit is refused."""
        if self._broken is None and not isinstance(exc, Exception):
            self._broken = exc  # interrupted mid-statement: the connection's state is unknown
        if self._broken is not None:
            return
        for shard in marks:
            try:
                _on(self._branches[shard], shard, ROLLBACK_TO_SAVEPOINT)
            except Exception as error:
                log.error("shard %s: a failed statement could not be undone: %s", shard, error)
                self._broken = error
                return

    def _finish(self, commit: bool) -> None:
        self._ended = True
        committed = False
        try:
            if commit and self._wrote:
                try:  # the lease may have expired since its writes were checked
                    self._router.resolver.before_commit(self._snap, self.shard)
                    # Rows found already there are checked again (LookupLedger.verify; its
                    # reads of the transaction's own owner rows run in it).
                    self._runner.drive(self._ledger.verify(self._snap.topology), self._snap)
                except BaseException:
                    self._end(False)
                    raise
            self._end(commit)
            committed = commit
        finally:
            if self._ledger.pending:
                self._settle(committed)
            else:  # no lookup row written or removed: nothing to settle
                self._snap.release()

    def _settle(self, committed: bool) -> None:
        """Lookup rows written for owners this transaction did not commit are removed (and
        the rest of LookupLedger.settle); then the transaction's snapshot is released."""
        snap = self._settle_snapshot()
        try:
            _Runner(self._router).drive(self._ledger.settle(snap.topology, committed), snap)
        except Exception as exc:  # best effort: the crash case, which check lookups fixes
            log.error("transaction end: lookup rows not settled: %s", exc)
        finally:
            if snap is not self._snap:
                snap.release()
            self._snap.release()

    def _settle_snapshot(self) -> Snapshot:
        """The snapshot the ledger settles under: the transaction's, unless it freezes a range
        (a switch is running): the lookup rows may live in it, so the settle waits for the
        router's next version (bounded by hold_s) and runs under it, where they are routed
        to their current owner. Waiting under an unfrozen snapshot instead would hold back the
        very acknowledgement the switch waits for."""
        frozen = next((m for m in self._snap.moving if m.frozen), None)
        if frozen is None or not self._ledger.pending:
            return self._snap
        deadline = time.monotonic() + frozen.hold_s
        slots = (frozen.start, frozen.end)
        while frozen_now(self._router._snap, slots) and time.monotonic() < deadline:
            time.sleep(HOLD_POLL_S)
        return self._router._pin()

    def _end(self, commit: bool) -> None:
        branches = self._branches
        stuck: list[ShardId] = []  # XA branches not rolled back: never back to the pool
        try:
            if self._xa and branches:
                # The decision goes to the first branch's shard, which every xid names.
                decider = self._snap.engines.primary(next(iter(branches)))
                if commit and self._broken is not None:
                    # A branch is gone or was rolled back by its server: refused before any
                    # XA PREPARE (a prepared branch would hold its locks until recover_xa()).
                    stuck = xa.rollback(branches, self._gtrid)
                    if self._wrote:
                        shard = getattr(self._broken, "shard", None) or self.shards[0]
                        raise aborted(shard, self._broken)
                elif commit:
                    try:
                        xa.commit(branches, self._gtrid, decider)
                    except (DBAPIError, PoolTimeoutError, PendingRollbackError) as exc:
                        # Raised only before the decision row: nothing is committed, so roll
                        # back what we can (xa.commit never raises after the decision).
                        stuck = xa.rollback(branches, self._gtrid)
                        if isinstance(exc, PendingRollbackError):
                            raise aborted(next(iter(branches)), exc) from exc
                        raise classify(exc, next(iter(branches))) from exc
                else:
                    stuck = xa.rollback(branches, self._gtrid)
            else:
                for shard, conn in branches.items():
                    if commit and self._broken is None:
                        try:
                            conn.commit()
                        except PendingRollbackError as exc:
                            # An earlier statement broke the connection (its error was
                            # raised then): the server rolled everything back. Only a
                            # transaction that wrote loses something by that.
                            conn.rollback()
                            if self._wrote:
                                raise aborted(shard, exc) from exc
                    else:
                        conn.rollback()
                if commit and self._broken is not None and self._wrote:
                    shard = getattr(self._broken, "shard", None) or self.shards[0]
                    raise aborted(shard, self._broken)
        finally:
            for shard, conn in branches.items():
                if shard in stuck:
                    conn.invalidate()  # its XA state is unknown: the server ends it
                conn.close()


class Scope:
    """Statements that read their own writes: see Router.scope."""

    def __init__(self, router: Router) -> None:
        self._router = router
        self._runner = _Runner(router, sticky=True)

    def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
        return self._router._execute(statement, params, self._runner)


class Router(SnapshotHolder[ShardEngines, ReadPool]):
    """Routes statements to shards and merges multi-shard results.

    ``execute(sql, params)`` parses once (cached), routes by the key predicates, fans out on a
    thread pool when needed and merges. ``connection(user_id=42)`` is the fast path: no parsing.
    """

    def __init__(
        self,
        topology: Topology,
        *,
        allow_scatter_write: bool = False,
        max_fanout: int | None = None,
        max_offset: int | None = 10_000,
        max_distinct_rows: int | None = 100_000,
        max_concurrency: int | None = None,
        engines: ShardEngines | None = None,
        xa: bool = False,
        replica_reads: bool = True,
        max_held_writes: int = 1000,
    ) -> None:
        self.xa = xa
        self.replica_reads = replica_reads
        self.holds = HoldQueue(max_held_writes)
        """Writes held while a resharding switch runs (docs/RESHARDING.md), with counts."""
        self._snap: Snapshot = RoutingSnapshot(
            topology, engines or ShardEngines(topology), _explicit_key_rules(topology)
        )
        """Everything routing reads, swapped whole between statements (see _install)."""
        self._swap_lock = threading.Lock()
        self._live: LiveSnapshots[ShardEngines, ReadPool] = LiveSnapshots(self._snap)
        """Snapshots not yet disposed: what a retired one may dispose is what none holds."""
        self.resolver = WriteResolver(lambda: self._snap)
        """The one door of every write (slot -> shard) and the fencing check."""
        self.limits = Limits(allow_scatter_write, max_fanout, max_offset, max_distinct_rows)
        workers = max_concurrency or min(32, 4 * max(1, len(topology.shards)))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="shardrouter")
        self._texts: OrderedDict[str, TextClause] = OrderedDict()
        self._cache_lock = threading.Lock()  # guards _texts and the lean pools
        self._follower: Any = None
        self._shadow = ShadowReader(self._shadow_rows)
        """SHADOW reads during a migration (engine.shadow); idle without them."""

    @property
    def shadow_stats(self) -> dict[str, dict[str, int]]:
        """SHADOW read counters per migration (compared, equal, lagged, differed, errors,
        dropped): see shardrouter.engine.shadow."""
        return self._shadow.stats.snapshot()

    def _shadow_rows(
        self, shard: ShardId, statement: str, params: Mapping[str, Any]
    ) -> Sequence[tuple[Any, ...]]:
        """A shadow read's statement on ``shard``'s primary, under the current snapshot."""
        snap = self._pin()
        try:
            with snap.engines.primary(shard).connect() as conn:
                return JobResult.of(conn.execute(self._text(statement), params)).rows
        finally:
            snap.release()

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> Router:
        """A router over the topology file ``path``; with a ``meta:`` section, over the meta
        store's current version, following it (see from_config)."""
        return cls.from_config(load_config(path), **options)

    @classmethod
    def from_config(
        cls, config: TopologyConfig, *, env: Mapping[str, str] | None = None, **options: Any
    ) -> Router:
        """A router over ``config``. Without ``meta:``, exactly Router(Topology(config)).
        With ``meta:`` the file only says where the meta store is: the router serves the
        store's current version, registers in it, and follows new versions on a background
        thread (shardrouter.control.follow); ``env`` expands the stored ``${VAR}``s."""
        if config.meta is None:
            return cls(Topology(config), **options)
        from ..control.follow import Follower

        follower = Follower(config.meta, kind="sync", env=env)
        try:
            topology = follower.initial_topology()
        except BaseException:
            follower.close()
            raise
        router = cls(topology, **options)
        try:
            follower.start(router)
        except BaseException:
            router.close()  # and the follower with it
            raise
        return router

    # -- the routing snapshot ---------------------------------------------------------------

    @property
    def engines(self) -> ShardEngines:
        return self._snap.engines

    def _install(self, topology: Topology) -> None:
        """Swap to ``topology`` between statements: one attribute assignment. Engines (and
        their lean pools) of shards whose URLs and pool settings did not change are taken
        over; the old snapshot is disposed once no statement holds it, and with it what no
        other live snapshot holds (snapshot.LiveSnapshots)."""
        with self._swap_lock:
            old = self._snap
            engines = ShardEngines(topology, reuse=old.engines)
            kept = {id(e) for e in engines.all}
            with self._cache_lock:
                lean = {e: p for e, p in old.lean.items() if id(e) in kept}
            new: Snapshot = RoutingSnapshot(topology, engines, _explicit_key_rules(topology), lean)
            self._live.add(new)
            self._snap = new

        def dispose() -> None:
            pools, dropped = self._live.leave(old)
            for pool in pools:
                pool.close()
            for engine in dropped:
                engine.dispose()

        old.retire(dispose)

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._follower is not None:
            self._follower.close()  # stops polling, deregisters
        self._shadow.close()
        self._pool.shutdown(wait=True)
        for lean in self._lean.values():
            if lean is not False:
                lean.close()
        self.engines.dispose()

    # -- the explicit path ----------------------------------------------------------------------

    def route_key(self, **key: Any) -> tuple[ShardId, Slot]:
        """(shard, slot) of one sharding key, e.g. ``route_key(user_id=42)``."""
        if len(key) != 1:
            raise RoutingError(
                f"give exactly one sharding key (e.g. user_id=42), got {sorted(key)}"
            )
        snap = self._snap
        return route_key(snap.topology, snap.key_rules, key)

    def _explicit(self, key: dict[str, Any]) -> tuple[Snapshot, ShardId, Slot]:
        """Pin the current snapshot and resolve ``key``'s write shard (released on error)."""
        snap = self._pin()
        try:
            _, slot = route_key(snap.topology, snap.key_rules, key)
            return snap, self.resolver.write_slot(snap, slot, "explicit", "explicit"), slot
        except BaseException:
            snap.release()
            raise

    def _hold(self, exc: Frozen, again: Callable[[], T]) -> T:
        """Hold a write the resolver found frozen (a switch is running) until the router's
        version releases its slots, then run ``again`` (which pins the new version); at most
        ``exc.hold_s`` in all, else SwitchHoldError. Nothing of the write ran before."""
        started = time.monotonic()
        deadline = started + exc.hold_s
        self.holds.enter(exc)
        try:
            while True:
                while exc.slots is not None and frozen_now(self._snap, exc.slots):
                    if time.monotonic() >= deadline:
                        raise held_too_long(exc, time.monotonic() - started) from exc
                    time.sleep(HOLD_POLL_S)
                try:
                    return again()
                except Frozen as frozen:
                    exc = frozen
        finally:
            self.holds.leave(time.monotonic() - started)

    @contextmanager
    def connection(self, **key: Any) -> Iterator[ShardConnection]:
        """A Connection on the key's shard inside a transaction (committed on success).
        While a switch of the key's slot runs, opening it waits (see _hold)."""
        try:
            snap, shard, slot = self._explicit(key)
        except Frozen as exc:
            snap, shard, slot = self._hold(exc, lambda: self._explicit(key))
        try:
            engine = snap.engines.primary(shard)
            try:
                with engine.begin() as conn:
                    yield ShardConnection(conn, snap.topology, shard, slot)
                    self.resolver.before_commit(snap, shard, slot)  # refused: rolled back
            except (DBAPIError, PoolTimeoutError) as exc:
                raise classify(exc, shard) from exc
        finally:
            snap.release()

    @contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A transaction bound to the shard of its first statement; commits on success."""
        txn = Transaction(self)
        try:
            yield txn
        except BaseException:
            txn._finish(commit=False)
            raise
        txn._finish(commit=True)

    @contextmanager
    def session(self, **key: Any) -> Iterator[Session]:
        """An ORM Session on the key's shard, in a transaction committed on success.

        The explicit path for mapped classes: no parsing, one shard. For routing by mapped
        keys across shards, see shardrouter.orm.session.
        """
        with self.connection(**key) as conn, Session(bind=conn.connection) as session:
            yield session
            session.flush()

    @contextmanager
    def scope(self) -> Iterator[Scope]:
        """A unit of work with read-your-writes: its reads may use replicas until it writes,
        then stay on primaries (a replica may lag behind the write)."""
        yield Scope(self)

    def recover_xa(self, min_age_s: float = xa.MIN_AGE_S) -> xa.RecoveryReport:
        """Finish XA branches left prepared by a crash: commit the decided, roll back the rest.

        Branches younger than ``min_age_s`` are left to their coordinator (``in_doubt`` in the
        report), so this is safe to run while routers commit; see shardrouter.engine.xa."""
        return xa.recover(self.engines.primaries, min_age_s)

    # -- transparent SQL ------------------------------------------------------------------------

    def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
        """Run one statement on the shards it needs and return the merged rows. A write to
        slots a resharding switch is moving right now waits for it (bounded: see _hold)."""
        try:
            return self._execute(statement, params, _Runner(self))
        except Frozen as exc:
            return self._hold(exc, lambda: self._execute(statement, params, _Runner(self)))

    def _execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None, runner: _Runner
    ) -> ResultSet:
        txn = runner.transaction
        if txn is not None and txn._ended:
            raise ended()  # before anything runs (its snapshot is released, its branches gone)
        sql, bound = _sql_and_params(statement, params)
        snap = txn._snap if txn is not None else self._pin()
        try:
            plan = snap.planner.plan(sql)
            if snap.moving and (blind := steps_blind(snap, plan)) is not None:
                raise blind  # before its first step (held, or refused in a used transaction)
            topology = snap.topology
            runner.recorder = None
            if snap.moving or self._snap.moving:  # the resolver checks each write's slots
                runner.recorder = SlotRecorder(topology)
                topology = cast(Topology, runner.recorder)
            return runner.drive(
                run(topology, plan, bound, self.limits, runner.bind, runner.ledger), snap
            )
        finally:
            if txn is None:
                snap.release()

    def page(
        self,
        table: str,
        *,
        columns: Sequence[str],
        order_by: Sequence[str],
        where: Mapping[str, Any] | None = None,
        after: Sequence[Any] | None = None,
        limit: int = 20,
        descending: bool = True,
    ) -> Page:
        """Keyset pagination: the next page of ``table`` after the ``after`` cursor.

        ``order_by`` must end with a unique column (e.g. ``("created_at", "order_id")``).
        Unlike OFFSET, every page costs the same however deep it is: each shard returns at most
        ``limit`` rows past the cursor and the merge keeps the first ``limit``. E.g. a merchant's
        orders: ``page("orders", where={"merchant_id": 7}, ...)`` routes through the lookup.
        """
        sql, params, positions = keyset_query(
            table, columns, order_by, where or {}, after, limit, descending
        )
        result = self.execute(sql, params)
        return page_of(result, positions, limit, len(columns))

    # -- job execution --------------------------------------------------------------------------

    def _text(self, sql: str) -> TextClause:
        clause = self._texts.get(sql)
        if clause is None:
            clause = text(sql)
            with self._cache_lock:
                self._texts[sql] = clause
                if len(self._texts) > 4096:
                    self._texts.popitem(last=False)
        return clause

    def _execute_on(self, conn: Connection, job: Job) -> JobResult:
        if isinstance(job.statement, tuple):
            parts = tuple(
                self._execute_on(conn, replace(job, statement=sql)) for sql in job.statement
            )
            return JobResult((), [], sum(p.rowcount for p in parts), parts)
        sql = job.statement
        log_statement(job.shard, sql, job.params)
        if job.returning:
            require_returning(conn.dialect, job.shard)
        thread_id = _thread_id(conn)  # known before: a connection whose link failed is dropped
        try:
            if isinstance(sql, str):
                params = job.params
                if isinstance(params, Mapping):  # (a list of them: executemany, SQLAlchemy's)
                    statements = direct.direct_for(conn)
                    if statements is not None:  # no SQLAlchemy execution layer: engine.direct
                        return direct.execute(conn, statements, sql, params, job.shard)
                return JobResult.of(conn.execute(self._text(sql), params))
            return JobResult.of(conn.execute(sql, job.params))
        except (DBAPIError, PoolTimeoutError) as exc:
            error = classify(exc, job.shard, str(sql))
            if isinstance(error, ShardUnavailableError):  # the read timeout gave up, not the server
                pool = self.topology.shards[job.shard].pool
                readpool.stop_statement_in_thread(conn.engine, job.shard, pool, thread_id)
            raise error from exc
        except PendingRollbackError as exc:
            raise aborted(job.shard, exc) from exc

    def _run_job(self, job: Job, replica: bool = False, snap: Snapshot | None = None) -> JobResult:
        snap = snap or self._snap
        if replica and job.kind == "read":
            engine = snap.engines.reader(job.shard)
        else:
            engine = snap.engines.primary(job.shard)
        if job.kind == "read" and not isinstance(job.statement, Executable):
            lean = snap.lean.get(engine)
            if lean is None:
                lean = self._lean_pool(engine, job.shard, snap)
            if lean is not False:
                return lean.run(job.statement, job.params, job.lazy)  # type: ignore[arg-type]
        try:
            if job.kind == "read":
                # No BEGIN/COMMIT round trips for a read; the pool resets the connection.
                with engine.connect() as conn:
                    return self._execute_on(conn, job)
            with engine.begin() as conn:
                result = self._execute_on(conn, job)
                self.resolver.before_commit(snap, job.shard)  # refused: rolled back
                return result
        except (DBAPIError, PoolTimeoutError) as exc:
            raise classify(exc, job.shard) from exc

    def _lean_pool(
        self, engine: Engine, shard: ShardId, snap: Snapshot
    ) -> ReadPool | Literal[False]:
        """The lean read pool of an engine (see shardrouter.engine.readpool), made on first use;
        False for engines whose driver it does not support (SQLite, other drivers)."""
        with self._cache_lock:
            lean = snap.lean.get(engine)
            if lean is None:
                ok = readpool.supported(engine)
                depth = len(snap.topology.shards)  # a scatter sends at most one per shard
                lean = snap.lean[engine] = (
                    ReadPool(engine, shard, snap.topology.shards[shard].pool, depth)
                    if ok
                    else False
                )
            return lean

    def _write_together(self, jobs: Sequence[Job], snap: Snapshot) -> list[JobResult]:
        """One write on several shards: every shard's part runs in its own open transaction,
        and all commit only if every part succeeded, else all roll back. An error on one shard
        (a duplicate key, a dead shard) leaves no part applied; only a crash between the
        commits could, which Router(xa=True) transactions close.

        The parts run one after the other in sorted shard order, not in parallel: each holds
        its row locks until every part is done, so two such writes of the same rows taking
        their locks in different orders would each wait for the other's commit, which no
        server can see as a deadlock (two servers) - until the query timeout failed both. In
        one global order, the second writer waits on the first shard for the first writer's
        commit and then proceeds."""
        conns: list[Connection] = []
        by_shard: dict[ShardId, Connection] = {}  # one connection (and transaction) per shard
        results: dict[int, JobResult] = {}
        error: BaseException | None = None
        try:
            for index in together_order(jobs):
                job = jobs[index]
                conn = by_shard.get(job.shard)
                if conn is None:
                    try:
                        conn = snap.engines.primary(job.shard).connect()
                    except (DBAPIError, PoolTimeoutError) as exc:
                        raise classify(exc, job.shard) from exc
                    conns.append(conn)
                    by_shard[job.shard] = conn
                    conn.begin()
                results[index] = self._execute_on(conn, job)
                check_guard(job, results[index])
            self.resolver.before_commit(snap, None)  # the lease may have expired meanwhile
        except BaseException as exc:
            error = exc
        try:
            for conn in conns:
                if error is None:
                    conn.commit()
                else:
                    conn.rollback()
        finally:
            for conn in conns:
                conn.close()
        if error is not None:
            raise error
        return [results[i] for i in range(len(jobs))]

    def _fan_out(
        self, jobs: Sequence[Job], replica: bool = False, snap: Snapshot | None = None
    ) -> list[JobResult]:
        snap = snap or self._snap
        pools = self._pipelines(jobs, replica, snap)
        if pools is not None:
            return self._pipelined(jobs, pools, replica, snap)
        return self._threaded(jobs, replica, snap)

    def _pipelines(
        self, jobs: Sequence[Job], replica: bool, snap: Snapshot
    ) -> list[ReadPool] | None:
        """The lean pools to pipeline ``jobs`` on, or None (not all reads of one SQL text on
        a PyMySQL lean pool): see _pipelined."""
        pools: list[ReadPool] = []
        for job in jobs:
            if not (
                job.kind == "read"
                and isinstance(job.statement, str)
                and isinstance(job.params, Mapping)
            ):
                return None
            engines = snap.engines
            engine = engines.reader(job.shard) if replica else engines.primary(job.shard)
            lean = snap.lean.get(engine)
            if lean is None:
                lean = self._lean_pool(engine, job.shard, snap)
            if lean is False or not lean.pipelines:
                return None
            pools.append(lean)
        return pools

    def _pipelined(
        self, jobs: Sequence[Job], pools: Sequence[ReadPool], replica: bool, snap: Snapshot
    ) -> list[JobResult]:
        """A scatter read without threads: every shard is sent its statement before any
        answer is read, so the shards work at once while this thread reads the answers in
        turn (they wait in the sockets). A job whose pool has no connection free now is not
        sent (no waiting while holding the others' connections); it runs after the others
        are answered and their connections returned, on the thread pool. On an error the
        other answers are still read (each bounded by its read timeout), then the first error
        is raised; on an interrupt (KeyboardInterrupt, a cancelled greenlet) the unread ones
        are dropped and their statements stopped on their servers."""
        sent: list[Pending | None] = []
        try:
            for job, pool in zip(jobs, pools, strict=True):
                statement, params = job.statement, job.params
                assert isinstance(statement, str) and isinstance(params, Mapping)  # _pipelines
                sent.append(pool.send(statement, params))
        except Exception:
            # A shard that cannot be sent to (down, a missing parameter): the answers already
            # sent are read, so their connections stay pooled (dropping them would make every
            # scatter during an outage reconnect to the healthy shards), then the error.
            self._drain(jobs, pools, sent)
            raise
        except BaseException:
            self._abandon(pools, sent)
            raise
        results: list[JobResult | None] = [None] * len(jobs)
        first_error: Exception | None = None
        for i, (job, pool, pending) in enumerate(zip(jobs, pools, sent, strict=True)):
            if pending is None:
                continue
            try:
                results[i] = pool.receive(pending, job.lazy)
            except Exception as exc:
                first_error = first_error or exc
            except BaseException:
                self._abandon(pools[i + 1 :], sent[i + 1 :])
                raise
        if first_error is not None:
            raise first_error
        waiting = [i for i, pending in enumerate(sent) if pending is None]
        if waiting:
            rest = self._threaded([jobs[i] for i in waiting], replica, snap)
            for i, result in zip(waiting, rest, strict=True):
                results[i] = result
        return cast(list[JobResult], results)

    @staticmethod
    def _drain(
        jobs: Sequence[Job], pools: Sequence[ReadPool], sent: Sequence[Pending | None]
    ) -> None:
        """Read and discard the answers of ``sent`` (errors ignored: the caller raises its
        own); on an interrupt the rest are abandoned."""
        for i, (job, pool, pending) in enumerate(zip(jobs, pools, sent, strict=False)):
            if pending is None:
                continue
            try:
                pool.receive(pending, job.lazy)
            except Exception:  # the caller's error is the one raised
                continue
            except BaseException:
                Router._abandon(pools[i + 1 :], sent[i + 1 :])
                raise

    @staticmethod
    def _abandon(pools: Sequence[ReadPool], sent: Sequence[Pending | None]) -> None:
        """Drop the unread answers of ``sent`` (an interrupt): their statements are stopped on
        their servers and their connections not pooled again (ReadPool.abandon)."""
        for pool, pending in zip(pools, sent, strict=False):
            if pending is not None:
                pool.abandon(pending)

    def _threaded(self, jobs: Sequence[Job], replica: bool, snap: Snapshot) -> list[JobResult]:
        """Jobs on the thread pool, the caller's thread taking the first."""
        if len(jobs) == 1:
            return [self._run_job(jobs[0], replica, snap)]
        futures: list[Future[JobResult]] = [
            self._pool.submit(self._run_job, j, replica, snap) for j in jobs[1:]
        ]
        results: list[JobResult] = []
        first_error: BaseException | None = None
        try:  # the caller's thread takes the first job instead of idling on a future
            results.append(self._run_job(jobs[0], replica, snap))
        except BaseException as exc:  # re-raised below, once the others are done
            first_error = exc
        for future in futures:  # wait for all: no job is left running behind the caller
            try:
                results.append(future.result())
            except BaseException as exc:
                first_error = first_error or exc
        if first_error is not None:
            raise first_error
        return results


SAVEPOINT = "SAVEPOINT shardrouter_statement"
ROLLBACK_TO_SAVEPOINT = "ROLLBACK TO SAVEPOINT shardrouter_statement"
"""A transaction's multi-part statement is undone to this savepoint when a part fails. It is
not released on success: the next SAVEPOINT of the name replaces it, the transaction's end
deletes it (one round trip less per branch)."""


def multi_part(jobs: Sequence[Job]) -> bool:
    """Whether a transaction's batch is one write that runs as several parts (on several
    shards, or on several split tables of one shard). One database applies a statement whole
    or not at all, keeping the transaction; such a statement gets a savepoint on each branch
    before its first part there, so a failed part undoes the others (Transaction._undo). A
    one-part statement (the usual case) needs none: its server undoes it."""
    parts = 0
    for job in jobs:
        if job.role == "statement" and job.kind == "write":
            parts += len(job.statement) if isinstance(job.statement, tuple) else 1
    return parts > 1


def _thread_id(conn: Connection) -> int | None:
    """The server's id of a MySQL connection's session (None for other drivers)."""
    try:
        return int(conn.connection.driver_connection.thread_id())  # type: ignore[union-attr]
    except Exception:
        return None


def _on(conn: Connection, shard: ShardId, sql: str) -> None:
    """A statement of the transaction's own (a savepoint), its error classified."""
    log_statement(shard, sql, None)
    try:
        conn.exec_driver_sql(sql)
    except (DBAPIError, PoolTimeoutError) as exc:
        raise classify(exc, shard, sql) from exc
    except PendingRollbackError as exc:
        raise aborted(shard, exc) from exc


def ends_transaction(exc: ExecutionError) -> bool:
    """The server rolled back the whole transaction, not just the statement: a deadlock
    (1213). A lock wait timeout (1205) rolls back only the statement. By the driver's
    error number, never the message."""
    args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
    return bool(args) and args[0] == DEADLOCK_ERRNO


def aborted(shard: ShardId, exc: BaseException) -> TransactionAbortedError:
    """The typed error for a statement (or commit) in a transaction whose earlier statement
    broke its connection (SQLAlchemy's PendingRollbackError): both routers raise it."""
    return TransactionAbortedError(
        f"shard {shard}: an earlier statement of this transaction failed and ended it (a"
        " timeout or a deadlock, say); nothing more runs in it: roll it back and"
        " retry the transaction from its start",
        shard=shard,
        orig=exc,
    )


def ended() -> TransactionAbortedError:
    """The typed refusal of a statement in a transaction whose block is over (committed or
    rolled back), e.g. a transaction object kept past its ``with``: nothing runs."""
    return TransactionAbortedError(
        "this transaction has ended (its `with` block is over: committed or rolled back);"
        " nothing ran. Open a new one: `with router.transaction() as txn:` (async:"
        " `async with router.transaction() as txn:`)"
    )


def route_key(
    topology: Topology, rules: Mapping[str, KeyRule], key: Mapping[str, Any]
) -> tuple[ShardId, Slot]:
    """(shard, slot) of ``{column: value}``, for the explicit path of both routers."""
    if len(key) != 1:
        raise RoutingError(f"give exactly one sharding key (e.g. user_id=42), got {sorted(key)}")
    ((column, value),) = key.items()
    rule = rules.get(column)
    if rule is None:
        raise RoutingError(
            f"{column} is not a sharding column of any table (known: {', '.join(sorted(rules))})"
        )
    slot = rule.slot(value)
    return topology.shard_of_slot(slot), slot


def _explicit_key_rules(topology: Topology) -> dict[str, KeyRule]:
    """column -> the first functional key rule on it (user_id -> users' hash, order_id -> gene)."""
    rules: dict[str, KeyRule] = {}
    for table in topology.tables.values():
        for column, rule in table.keys.items():
            if rule.lookup_table is None and column not in rules:
                rules[column] = rule
    return rules


def _sql_and_params(
    statement: str | Executable, params: Mapping[str, Any] | None
) -> tuple[str, Mapping[str, Any]]:
    """SQL text with named parameters for the planner, and the values to bind.

    Core statements are compiled for MySQL with ``:name`` parameters (expanding IN lists
    rendered); LIMIT/OFFSET become literal integers, which the merge needs to know.
    """
    if isinstance(statement, str):
        return statement, params or {}
    if isinstance(statement, Select):
        limit, offset = limit_offset(statement)
        statement = statement.limit(None if limit is None else literal_column(str(limit)))
        statement = statement.offset(literal_column(str(offset)) if offset else None)
    expanded = statement.compile(dialect=_NAMED_MYSQL).construct_expanded_state(  # type: ignore[attr-defined]
        dict(params) if params else None
    )
    bound: dict[str, Any] = dict(expanded.parameters)
    if params:
        bound.update(params)
    return str(expanded.statement), bound


def limit_offset(stmt: Select[Any]) -> tuple[int | None, int]:
    """The integer LIMIT and OFFSET of a Core select (UnsupportedQueryError if not integers)."""
    try:
        limit = stmt._limit if stmt._limit_clause is not None else None
        offset = stmt._offset if stmt._offset_clause is not None else None
    except CompileError:
        raise UnsupportedQueryError(
            "LIMIT/OFFSET must be integers for routed queries (the merge needs them)"
        ) from None
    return limit, offset or 0


__all__ = ["Router", "Scope", "ShardConnection", "Transaction", "route_key"]
