"""AsyncRouter: the async twin of Router over aiomysql; same planner, same core, other waiting."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Collection,
    Generator,
    Mapping,
    Sequence,
)
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar, cast

from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from ..core.config import TopologyConfig, load_config
from ..core.topology import Topology
from ..errors import (
    CrossShardTransactionError,
    LockConflictError,
    ShardUnavailableError,
)
from ..sql.execution import (
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
from . import readpool
from .engines import AsyncShardEngines, classify
from .readpool import AsyncReadPool
from .router import (
    ROLLBACK_TO_SAVEPOINT,
    SAVEPOINT,
    _explicit_key_rules,
    _sql_and_params,
    aborted,
    ended,
    ends_transaction,
    multi_part,
    route_key,
)
from .shadow import AsyncShadowReader, shadow_read
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

AsyncSnapshot = RoutingSnapshot[AsyncShardEngines, AsyncReadPool]

T = TypeVar("T")


class AsyncShardConnection:
    """An AsyncConnection on the shard that owns a key, inside a transaction."""

    def __init__(
        self, connection: AsyncConnection, topology: Topology, shard: ShardId, slot: Slot
    ) -> None:
        self.connection = connection
        self.shard = shard
        self.slot = slot
        self._topology = topology

    def physical(self, table: str) -> str:
        return self._topology.table(table).physical(self.slot)

    async def execute(self, statement: Executable, params: Any = None) -> Any:
        return await self.connection.execute(statement, params)


class AsyncTransaction:
    """A single-shard async transaction, bound to the shard of its first statement."""

    def __init__(self, router: AsyncRouter) -> None:
        self._router = router
        self._snap = router._pin()
        """The routing snapshot this transaction runs under, from its start to its end."""
        self.shard: ShardId | None = None
        self._conn: AsyncConnection | None = None
        self._ledger = LookupLedger()
        self._broken: BaseException | None = None
        """A statement timed out (cancelled mid-answer: the connection's state is unknown) or
        was a deadlock victim (the server rolled the transaction back)."""
        self._wrote = False
        """A write ran in it: a commit that cannot happen then loses it, and says so."""
        self._ended = False
        """Its block is over (committed or rolled back): it runs nothing more (see ended)."""

    async def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
        """See Transaction.execute: a first statement that writes slots being switched waits
        for the switch and the transaction starts over on the new version."""
        try:
            return await self._router._execute(statement, params, self)
        except Frozen as exc:
            if self.shard is not None or self._wrote or self._broken is not None or self._ended:
                raise
            return await self._router._hold(exc, lambda: self._restart(statement, params))

    async def _restart(
        self, statement: str | Executable, params: Mapping[str, Any] | None
    ) -> ResultSet:
        """Nothing ran in this transaction: pin the router's current version instead."""
        old, self._snap = self._snap, self._router._pin()
        old.release()
        return await self._router._execute(statement, params, self)

    def bind(self, shards: Collection[ShardId]) -> None:
        """Refuse a statement that needs another shard before any of its jobs runs (see
        Transaction.bind): a multi-shard first statement is refused and binds nothing."""
        others = sorted(s for s in shards if s != self.shard)
        if others and (self.shard is not None or len(others) > 1):
            where = f"is bound to shard {self.shard}" if self.shard else "runs on one shard"
            raise CrossShardTransactionError(
                f"this transaction {where} and the statement needs shard(s)"
                f" {', '.join(others)}; nothing ran. Keep a transaction on one key's rows, run"
                " multi-shard reads outside it, or use the sync Router(xa=True)",
                shard=others[0],
            )

    async def _run(
        self, jobs: Sequence[Job], recorder: SlotRecorder | None = None
    ) -> list[JobResult]:
        out: list[JobResult] = []
        resolver = self._router.resolver
        for job in jobs:  # every write of a statement passes the one resolver
            if job.kind == "write":
                slots = recorder.on(job.shard) if recorder is not None else None
                resolver.write_shard(self._snap, job.shard, "async_transaction", job.role, slots)
        # A statement over several split tables is undone whole if a part fails (see
        # Transaction._undo): a savepoint before its first part.
        marks: list[ShardId] | None = [] if multi_part(jobs) else None
        try:
            for job in jobs:
                if job.role == "lookup":  # (a transaction's lookup deletes: its ledger)
                    out.append(await self._router._run_job(job, self._snap))
                else:
                    out.append(await self._run_bound(job, marks))
        except BaseException as exc:
            if marks:
                await self._undo(exc)
            raise
        return out

    async def _undo(self, exc: BaseException) -> None:
        """Undo the parts of a failed multi-part statement (see Transaction._undo)."""
        if self._broken is None and not isinstance(exc, Exception):
            self._broken = exc  # cancelled mid-statement: the connection's state is unknown
        if self._broken is not None or self._conn is None or self.shard is None:
            return
        try:
            await self._router._bounded(
                self.shard, _on(self._conn, self.shard, ROLLBACK_TO_SAVEPOINT)
            )
        except Exception as error:
            log.error("shard %s: a failed statement could not be undone: %s", self.shard, error)
            self._broken = error
        except BaseException as cancelled:  # cancelled mid-undo: the connection's state is unknown
            self._broken = cancelled
            raise

    async def _run_bound(self, job: Job, marks: list[ShardId] | None = None) -> JobResult:
        if job.anywhere and self.shard is None:
            return await self._router._run_job(job, self._snap)  # a broadcast read binds nothing
        if job.anywhere and self.shard is not None and job.shard != self.shard:
            job = replace(job, shard=self.shard)  # a broadcast read: any shard will do
        if self.shard is None:
            self._conn = await self._router._begin(job.shard, self._snap)
            self.shard = job.shard
        elif job.shard != self.shard:
            raise CrossShardTransactionError(
                f"this transaction is bound to shard {self.shard} and the statement needs"
                f" shard {job.shard}; keep a transaction on one key's rows, or configure XA",
                shard=job.shard,
            )
        assert self._conn is not None
        if self._broken is not None:
            raise aborted(job.shard, self._broken)
        self._wrote = self._wrote or job.kind == "write"
        try:
            if marks is not None and not marks:
                await self._router._bounded(
                    job.shard, _on(self._conn, job.shard, SAVEPOINT), self._snap
                )
                marks.append(job.shard)
            return await self._router._bounded(
                job.shard, self._router._stoppable(self._conn, job), self._snap
            )
        except ShardUnavailableError as exc:
            # Cancelled mid-statement: its answer may still arrive on this connection, and the
            # next statement would read it as its own. The transaction cannot go on.
            self._broken = exc
            raise
        except LockConflictError as exc:
            # A deadlock rolled back the whole transaction on the server (see Transaction._run).
            if ends_transaction(exc):
                self._broken = exc
            raise
        except asyncio.CancelledError as exc:
            self._broken = exc  # as a timeout: the answer may still arrive on the connection
            raise

    async def _finish(self, commit: bool) -> None:
        """End the transaction: its commit or rollback, its lookup cleanups, its ledger's
        settling. Run to their end even if the caller is cancelled meanwhile (each within its
        shard's timeouts): a commit then has a known outcome, and the lookup rows follow it.
        Such a cancellation is re-raised after, never swallowed."""
        self._ended = True
        done, late = await to_the_end(self._close(commit))
        try:
            done.result()
        finally:
            if late is not None:
                raise late

    async def _close(self, commit: bool) -> None:
        committed = False
        try:
            conn = self._conn
            if conn is not None:
                assert self.shard is not None
                if isinstance(self._broken, LockConflictError):
                    await self._router._end(self.shard, conn, False, self._snap)  # sound
                    if commit and self._wrote:
                        raise aborted(self.shard, self._broken)
                elif self._broken is not None:
                    await self._router._discard(conn)  # the server rolls it back
                    if commit and self._wrote:  # a read-only one loses nothing
                        raise aborted(self.shard, self._broken)
                else:
                    if commit and self._wrote:
                        try:  # the lease may have expired since its writes were checked
                            self._router.resolver.before_commit(self._snap, self.shard)
                            # Rows found already there are checked again (LookupLedger.verify).
                            verify = self._ledger.verify(self._snap.topology)
                            await self._router._drive(verify, self, self._snap)
                        except BaseException:
                            await self._router._end(self.shard, conn, False, self._snap)
                            raise
                    await self._router._end(self.shard, conn, commit, self._snap)
            committed = commit
        finally:
            # Lookup rows written for owners this transaction did not commit are removed
            # (see Transaction._finish).
            snap = await self._settle_snapshot()
            settle = self._ledger.settle(snap.topology, committed)
            try:
                await self._router._drive(settle, None, snap)
            except Exception as exc:  # best effort: the crash case, which check lookups fixes
                log.error("transaction end: lookup rows not settled: %s", exc)
            finally:
                if snap is not self._snap:
                    snap.release()
                self._snap.release()

    async def _settle_snapshot(self) -> AsyncSnapshot:
        """See Transaction._settle_snapshot: under a frozen range, wait (bounded) for the
        router's next version and settle under it."""
        frozen = next((m for m in self._snap.moving if m.frozen), None)
        if frozen is None or not self._ledger.pending:
            return self._snap
        deadline = time.monotonic() + frozen.hold_s
        slots = (frozen.start, frozen.end)
        while frozen_now(self._router._snap, slots) and time.monotonic() < deadline:
            await asyncio.sleep(HOLD_POLL_S)
        return self._router._pin()


class StatementCancelled(Exception):
    """Thrown into a statement's step when the caller cancels it (AsyncRouter._drive): an
    Exception, so the step cleans up as after a failure; the caller gets the cancellation."""


class _CancelledAfter(BaseException):
    """A write committed on every shard while its caller was cancelled: its results (the step
    still needs them, e.g. for a delete's lookup cleanup), and the cancellation, re-raised by
    AsyncRouter._drive once the step is done."""

    def __init__(self, results: list[JobResult], cancelled: BaseException) -> None:
        super().__init__("committed, then cancelled")
        self.results = results
        self.cancelled = cancelled


async def to_the_end(aw: Awaitable[T]) -> tuple[asyncio.Future[T], BaseException | None]:
    """Run ``aw`` to its end whatever cancellations its caller receives meanwhile (``aw``
    bounds its own waits by the shards' timeouts); returns its finished future (its result or
    error) and the first cancellation received, for the caller to re-raise after."""
    task = asyncio.ensure_future(aw)
    cancelled: BaseException | None = None
    while not task.done():
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as exc:
            if not task.done():
                cancelled = cancelled or exc
        except BaseException:  # the task's own outcome, read from it below
            pass
    return task, cancelled


def _settles_lookups(jobs: Sequence[Job]) -> bool:
    """A batch that writes, checks or removes lookup rows (never an owner's statement)."""
    return any(j.role != "statement" and j.kind == "write" for j in jobs)


async def _on(conn: AsyncConnection, shard: ShardId, sql: str) -> None:
    """A statement of the transaction's own (a savepoint), its error classified."""
    log_statement(shard, sql, None)
    try:
        await conn.exec_driver_sql(sql)
    except (DBAPIError, PoolTimeoutError) as exc:
        raise classify(exc, shard, sql) from exc
    except PendingRollbackError as exc:
        raise aborted(shard, exc) from exc


class AsyncRouter(SnapshotHolder[AsyncShardEngines, AsyncReadPool]):
    """Routes statements to shards over asyncio; fan-out runs concurrently, bounded per query.

    The planner, routing, lookups and merge are the same code as Router's (execution.run):
    only the waiting differs.
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
        max_held_writes: int = 1000,
    ) -> None:
        self.holds = HoldQueue(max_held_writes)
        """Writes held while a resharding switch runs (docs/RESHARDING.md), with counts."""
        self._snap: AsyncSnapshot = RoutingSnapshot(
            topology, AsyncShardEngines(topology), _explicit_key_rules(topology)
        )
        """Everything routing reads, swapped whole between statements (see _install)."""
        self._swap_lock = threading.Lock()
        self._live: LiveSnapshots[AsyncShardEngines, AsyncReadPool] = LiveSnapshots(self._snap)
        """Snapshots not yet disposed: what a retired one may dispose is what none holds."""
        self.resolver = WriteResolver(lambda: self._snap)
        """The one door of every write (slot -> shard) and the fencing check."""
        self.limits = Limits(allow_scatter_write, max_fanout, max_offset, max_distinct_rows)
        self.max_concurrency = max_concurrency or 4 * max(1, len(topology.shards))
        self._texts: dict[str, TextClause] = {}
        self._doomed: list[AsyncEngine | AsyncReadPool] = []
        """Engines and lean pools of retired snapshots, disposed on the loop (_dispose_doomed)."""
        self._doomed_lock = threading.Lock()
        self._disposing: set[asyncio.Task[None]] = set()
        self._follower: Any = None
        self._shadow = AsyncShadowReader(self._shadow_rows)
        """SHADOW reads during a migration (engine.shadow); idle without them."""

    @property
    def shadow_stats(self) -> dict[str, dict[str, int]]:
        """See Router.shadow_stats."""
        return self._shadow.stats.snapshot()

    async def _shadow_rows(
        self, shard: ShardId, statement: str, params: Mapping[str, Any]
    ) -> Sequence[tuple[Any, ...]]:
        snap = self._pin()
        try:
            async with snap.engines.primary(shard).connect() as conn:
                return JobResult.of(await conn.execute(text(statement), params)).rows
        finally:
            snap.release()

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> AsyncRouter:
        """See Router.load: with ``meta:``, the meta store's current version, followed."""
        return cls.from_config(load_config(path), **options)

    @classmethod
    def from_config(
        cls, config: TopologyConfig, *, env: Mapping[str, str] | None = None, **options: Any
    ) -> AsyncRouter:
        """See Router.from_config (the follower is a thread here too: it never waits on the
        event loop, and the loop never waits on the meta store)."""
        if config.meta is None:
            return cls(Topology(config), **options)
        from ..control.follow import Follower

        follower = Follower(config.meta, kind="async", env=env)
        try:
            router = cls(follower.initial_topology(), **options)
            follower.start(router)
        except BaseException:
            follower.close()
            raise
        return router

    # -- the routing snapshot ---------------------------------------------------------------

    def _install(self, topology: Topology) -> None:
        """Swap to ``topology`` (see Router._install). Called from the follower's thread: the
        engines left behind are disposed on the event loop, by the next statement or close()."""
        with self._swap_lock:
            old = self._snap
            engines = AsyncShardEngines(topology, reuse=old.engines)
            kept = {id(e) for e in engines.all}
            # The loop may be adding a lean pool to old.lean right now (without a lock: one
            # item assignment). dict.copy() is one C call that runs no Python code (the hashes
            # are stored), so no insertion interleaves with it; iterating old.lean directly
            # could fail with "dictionary changed size" and the version would be rejected.
            lean = {e: p for e, p in old.lean.copy().items() if id(e) in kept}
            new: AsyncSnapshot = RoutingSnapshot(
                topology, engines, _explicit_key_rules(topology), lean
            )
            self._live.add(new)
            self._snap = new

        def dispose() -> None:  # in whichever thread releases the snapshot last
            pools, dropped = self._live.leave(old)
            with self._doomed_lock:
                self._doomed.extend([*pools, *dropped])

        old.retire(dispose)

    def _dispose_doomed(self) -> None:
        """Dispose what retired snapshots left (on the running loop, in the background)."""
        with self._doomed_lock:  # the follower's thread may be adding to it right now
            doomed, self._doomed = self._doomed, []
        for item in doomed:
            if isinstance(item, AsyncReadPool):
                item.close()
            else:
                task = asyncio.get_running_loop().create_task(item.dispose())
                self._disposing.add(task)
                task.add_done_callback(self._disposing.discard)

    async def __aenter__(self) -> AsyncRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._follower is not None:
            # Stopping the poller and deregistering wait on the meta store (each bounded by
            # its timeouts): off the loop, so its other tasks go on meanwhile, even when the
            # store hangs.
            await asyncio.to_thread(self._follower.close)
        await self._shadow.aclose()
        self._dispose_doomed()
        if self._disposing:
            await asyncio.gather(*self._disposing, return_exceptions=True)
        for lean in self._snap.lean.values():
            if lean is not False:
                lean.close()
        for engine in self._snap.engines.all:
            await engine.dispose()

    def _engine(self, shard: ShardId, snap: AsyncSnapshot | None = None) -> AsyncEngine:
        return (snap or self._snap).engines.primary(shard)

    # -- explicit path ----------------------------------------------------------------------

    def route_key(self, **key: Any) -> tuple[ShardId, Slot]:
        """(shard, slot) of one sharding key, e.g. ``route_key(user_id=42)``."""
        snap = self._snap
        return route_key(snap.topology, snap.key_rules, key)

    def _explicit(self, key: dict[str, Any]) -> tuple[AsyncSnapshot, ShardId, Slot]:
        """Pin the current snapshot and resolve ``key``'s write shard (released on error)."""
        snap = self._pin()
        try:
            _, slot = route_key(snap.topology, snap.key_rules, key)
            return snap, self.resolver.write_slot(snap, slot, "async_explicit", "explicit"), slot
        except BaseException:
            snap.release()
            raise

    async def _hold(self, exc: Frozen, again: Callable[[], Awaitable[T]]) -> T:
        """Router._hold on the event loop: wait (asyncio.sleep) until the router's version
        releases the frozen slots, then ``again()``; at most ``exc.hold_s`` in all."""
        started = time.monotonic()
        deadline = started + exc.hold_s
        self.holds.enter(exc)
        try:
            while True:
                while exc.slots is not None and frozen_now(self._snap, exc.slots):
                    if time.monotonic() >= deadline:
                        raise held_too_long(exc, time.monotonic() - started) from exc
                    await asyncio.sleep(HOLD_POLL_S)
                try:
                    return await again()
                except Frozen as frozen:
                    exc = frozen
        finally:
            self.holds.leave(time.monotonic() - started)

    @asynccontextmanager
    async def connection(self, **key: Any) -> AsyncIterator[AsyncShardConnection]:
        """An AsyncConnection on the key's shard inside a transaction (committed on success).
        While a switch of the key's slot runs, opening it waits (see _hold)."""
        try:
            snap, shard, slot = self._explicit(key)
        except Frozen as exc:

            async def again() -> tuple[AsyncSnapshot, ShardId, Slot]:
                return self._explicit(key)

            snap, shard, slot = await self._hold(exc, again)
        try:
            try:
                async with snap.engines.primary(shard).begin() as conn:
                    yield AsyncShardConnection(conn, snap.topology, shard, slot)
                    self.resolver.before_commit(snap, shard, slot)  # refused: rolled back
            except (DBAPIError, PoolTimeoutError) as exc:
                raise classify(exc, shard) from exc
        finally:
            snap.release()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncTransaction]:
        txn = AsyncTransaction(self)
        try:
            yield txn
        except BaseException:
            await txn._finish(commit=False)
            raise
        await txn._finish(commit=True)

    # -- transparent SQL ----------------------------------------------------------------------

    async def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
        """Run one statement (see Router.execute); a write to slots a resharding switch is
        moving right now waits for it (bounded)."""
        try:
            return await self._execute(statement, params, None)
        except Frozen as exc:
            return await self._hold(exc, lambda: self._execute(statement, params, None))

    async def page(
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
        """Keyset pagination; see Router.page."""
        sql, params, positions = keyset_query(
            table, columns, order_by, where or {}, after, limit, descending
        )
        result = await self.execute(sql, params)
        return page_of(result, positions, limit, len(columns))

    async def _execute(
        self,
        statement: str | Executable,
        params: Mapping[str, Any] | None,
        txn: AsyncTransaction | None,
    ) -> ResultSet:
        if txn is not None and txn._ended:
            raise ended()  # before anything runs (its snapshot is released, its branch gone)
        sql, bound = _sql_and_params(statement, params)
        if self._doomed:
            self._dispose_doomed()
        snap = txn._snap if txn is not None else self._pin()
        try:
            plan = snap.planner.plan(sql)
            if snap.moving and (blind := steps_blind(snap, plan)) is not None:
                raise blind  # before its first step (held, or refused in a used transaction)
            bind = txn.bind if txn is not None else None
            ledger = txn._ledger if txn is not None else None
            topology = snap.topology
            recorder = None
            if snap.moving or self._snap.moving:  # the resolver checks each write's slots
                recorder = SlotRecorder(topology)
                topology = cast(Topology, recorder)
            step = run(topology, plan, bound, self.limits, bind, ledger)
            return await self._drive(step, txn, snap, recorder)
        finally:
            if txn is None:
                snap.release()

    async def _drive(
        self,
        step: Generator[list[Job], list[JobResult], T],
        txn: AsyncTransaction | None,
        snap: AsyncSnapshot,
        recorder: SlotRecorder | None = None,
    ) -> T:
        """Run ``step``'s batches. A failed batch's error is thrown into the step, which may
        clean up what it wrote first (execution._insert). A cancellation (a caller's timeout,
        a task cancelled) gets the same cleanup: the step is told by a StatementCancelled
        thrown in, every batch from then on runs to its end (each job within its shard's
        timeouts) whatever further cancellations arrive, and the cancellation is re-raised
        once the step is done, never swallowed. Batches that write, check or remove lookup
        rows run to their end too, a cancellation taking effect at the step's next owner
        statement (or its end): their results are what the cleanup needs (which rows were
        created), and a committed delete's lookup rows go with it."""
        cancelled: BaseException | None = None
        """The caller's cancellation, re-raised once the step has cleaned up."""
        told = False
        """Something was thrown into the step: it is cleaning up already."""
        try:
            jobs = next(step)
            while True:
                if cancelled is not None and not told and not _settles_lookups(jobs):
                    told = True  # before the next owner statement: nothing more of it runs
                    jobs = step.throw(StatementCancelled())
                    continue
                batch = (
                    txn._run(jobs, recorder)
                    if txn is not None
                    else self._gather(jobs, snap, True, recorder)
                )
                late: BaseException | None = None
                try:
                    if cancelled is None and not _settles_lookups(jobs):
                        results = await batch
                    else:
                        done, late = await to_the_end(batch)
                        results = done.result()
                except _CancelledAfter as after:  # committed, then cancelled: results stand
                    cancelled = cancelled or after.cancelled
                    jobs = step.send(after.results)
                except Exception as exc:
                    cancelled = cancelled or late
                    told = True
                    jobs = step.throw(exc)  # the step may clean up what it wrote first
                except asyncio.CancelledError as exc:
                    cancelled = cancelled or exc
                    told = True
                    jobs = step.throw(StatementCancelled())
                else:
                    cancelled = cancelled or late
                    jobs = step.send(results)
        except StopIteration as stop:
            if cancelled is not None:
                raise cancelled from None
            result: T = stop.value
            return result
        except Exception:
            if cancelled is not None:
                raise cancelled from None
            raise

    async def _gather(
        self,
        jobs: Sequence[Job],
        snap: AsyncSnapshot,
        resolve: bool = False,
        recorder: SlotRecorder | None = None,
    ) -> list[JobResult]:
        if resolve:
            for job in jobs:  # every write of a statement passes the one resolver
                if job.kind == "write":
                    slots = recorder.on(job.shard) if recorder is not None else None
                    self.resolver.write_shard(snap, job.shard, "async", job.role, slots)
        if guarded(jobs) or all(j.kind == "write" and j.role == "statement" for j in jobs):
            # One shard's write too: its commit runs to its end if the caller is cancelled
            # meanwhile, and a committed write's results reach the step (a DELETE's lookup
            # rows go with it), as for several shards'.
            return await self._write_together(jobs, snap)
        if len(jobs) == 1:
            result = await self._run_job(jobs[0], snap)
            if snap.shadowed and recorder is not None:
                read = shadow_read(snap.shadowed, recorder, jobs[0], result)
                if read is not None:
                    self._shadow.submit(read)
            return [result]
        limit = asyncio.Semaphore(self.max_concurrency)

        async def bounded(job: Job) -> JobResult:
            async with limit:
                return await self._run_job(job, snap)

        # Wait for every job (no task left running behind the caller); first error wins.
        results = await asyncio.gather(*(bounded(j) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, JobResult)]

    async def _write_together(self, jobs: Sequence[Job], snap: AsyncSnapshot) -> list[JobResult]:
        """Every shard's part in its own open transaction, one after the other in sorted
        shard order (a global lock order: see Router._write_together); all commit or all roll
        back."""
        conns: list[tuple[ShardId, AsyncConnection]] = []
        by_shard: dict[ShardId, AsyncConnection] = {}  # one connection per shard
        results: dict[int, JobResult] = {}
        error: BaseException | None = None
        try:
            for index in together_order(jobs):
                job = jobs[index]
                conn = by_shard.get(job.shard)
                if conn is None:
                    conn = by_shard[job.shard] = await self._begin(job.shard, snap)
                    conns.append((job.shard, conn))
                results[index] = await self._bounded(job.shard, self._stoppable(conn, job), snap)
                check_guard(job, results[index])
            self.resolver.before_commit(snap, None)  # the lease may have expired meanwhile
        except BaseException as exc:  # cancelled too: every begun part is still ended
            error = exc
        # Every part committed or every part rolled back, even if the caller is cancelled
        # meanwhile: the end runs to its end (each commit within its shard's timeouts), and
        # such a cancellation comes after it (with the results of a committed write).
        gathered = asyncio.gather(
            *(self._end(shard, conn, error is None, snap) for shard, conn in conns),
            return_exceptions=True,
        )
        done, late = await to_the_end(gathered)
        ends = done.result()
        error = error or next((r for r in ends if isinstance(r, BaseException)), None)
        if error is not None:
            if late is not None:
                raise late  # every part rolled back; the caller's cancellation first
            raise error
        out = [results[i] for i in range(len(jobs))]
        if late is not None:
            raise _CancelledAfter(out, late)
        return out

    async def _bounded(
        self, shard: ShardId, step: Awaitable[T], snap: AsyncSnapshot | None = None
    ) -> T:
        """``step`` within the shard's query_timeout_s: the async drivers have no read timeout,
        so a shard that stops answering (SIGSTOP, a dead host) fails here as it does for the
        sync router, instead of hanging the caller forever."""
        timeout = (snap or self._snap).topology.shards[shard].pool.query_timeout_s
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await step
        except TimeoutError:
            raise ShardUnavailableError(
                f"shard {shard} is unavailable (no answer within query_timeout_s="
                f"{timeout:g}); other shards keep serving",
                shard=shard,
            ) from None

    async def _begin(self, shard: ShardId, snap: AsyncSnapshot) -> AsyncConnection:
        """A primary connection of ``shard`` with a transaction begun, within the timeout."""
        conn: AsyncConnection | None = None

        async def begin() -> AsyncConnection:
            nonlocal conn
            conn = await snap.engines.primary(shard).connect()
            await conn.begin()
            return conn

        try:
            return await self._bounded(shard, begin(), snap)
        except (DBAPIError, PoolTimeoutError, OSError) as exc:
            if conn is not None:
                await self._discard(conn)
            raise classify(exc, shard) from exc
        except ShardUnavailableError:
            if conn is not None:
                await self._discard(conn)
            raise

    async def _end(
        self, shard: ShardId, conn: AsyncConnection, commit: bool, snap: AsyncSnapshot
    ) -> None:
        """Commit or roll back, then return the connection, each within the timeout. A
        connection that did not finish is invalidated (its state is unknown), never pooled;
        only a failed commit raises: a failed rollback or close loses nothing, the server
        rolls back what a dropped connection leaves open."""
        done = False
        try:
            await self._bounded(shard, conn.commit() if commit else conn.rollback(), snap)
            done = True
            await self._bounded(shard, conn.close(), snap)
        except Exception as exc:
            await self._discard(conn)
            if commit and not done:
                if isinstance(exc, (DBAPIError, PoolTimeoutError, OSError)):
                    raise classify(exc, shard) from exc
                if isinstance(exc, PendingRollbackError):
                    raise aborted(shard, exc) from exc
                raise
        except BaseException:  # cancelled: drop the connection, let the cancellation through
            await self._discard(conn)
            raise

    async def _discard(self, conn: AsyncConnection) -> None:
        """Drop a connection without waiting on its server (which may not answer)."""
        with contextlib.suppress(Exception):  # best effort: the connection is gone either way
            await conn.invalidate()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1):
                await conn.close()

    def _text(self, sql: str) -> TextClause:
        clause = self._texts.get(sql)
        if clause is None:
            if len(self._texts) > 4096:
                self._texts.clear()
            clause = self._texts[sql] = text(sql)
        return clause

    async def _execute_on(self, conn: AsyncConnection, job: Job) -> JobResult:
        if isinstance(job.statement, tuple):
            parts = []
            for sql in job.statement:
                parts.append(await self._execute_on(conn, replace(job, statement=sql)))
            return JobResult((), [], sum(p.rowcount for p in parts), tuple(parts))
        stmt = self._text(job.statement) if isinstance(job.statement, str) else job.statement
        log_statement(job.shard, stmt, job.params)
        if job.returning:
            require_returning(conn.dialect, job.shard)
        try:
            return JobResult.of(await conn.execute(stmt, job.params))
        except (DBAPIError, PoolTimeoutError) as exc:
            raise classify(exc, job.shard, str(stmt)) from exc
        except PendingRollbackError as exc:
            raise aborted(job.shard, exc) from exc

    async def _run_job(self, job: Job, snap: AsyncSnapshot) -> JobResult:
        return await self._bounded(job.shard, self._run_job_unbounded(job, snap), snap)

    async def _run_job_unbounded(self, job: Job, snap: AsyncSnapshot) -> JobResult:
        engine = snap.engines.primary(job.shard)
        if job.kind == "read" and not isinstance(job.statement, Executable):
            lean = snap.lean.get(engine)
            if lean is None:
                lean = snap.lean[engine] = (
                    AsyncReadPool(engine, job.shard, snap.topology.shards[job.shard].pool)
                    if readpool.supported(engine)
                    else False
                )
            if lean is not False:
                return await lean.run(job.statement, job.params, job.lazy)  # type: ignore[arg-type]
        try:
            if job.kind == "read":
                async with engine.connect() as conn:
                    return await self._stoppable(conn, job)
            async with engine.begin() as conn:
                result = await self._stoppable(conn, job)
                self.resolver.before_commit(snap, job.shard)  # refused: rolled back
                return result
        except (DBAPIError, PoolTimeoutError, OSError) as exc:
            raise classify(exc, job.shard) from exc

    async def _stoppable(self, conn: AsyncConnection, job: Job) -> JobResult:
        """``job`` on ``conn``; cancelled while it runs (a task cancelled, a wait_for or
        query_timeout_s timeout), the connection is dropped, never pooled mid-answer, and the
        statement is stopped on its server (readpool.stop_statement)."""
        thread_id = None  # known before: a cancelled connection is invalidated at once
        with contextlib.suppress(Exception):
            thread_id = conn.sync_connection.connection.driver_connection.thread_id()  # type: ignore[union-attr]
        try:
            return await self._execute_on(conn, job)
        except BaseException as exc:
            if isinstance(exc, Exception):
                raise
            await self._discard(conn)
            pool = self.topology.shards[job.shard].pool
            await readpool.stop_statement(self._engine(job.shard), job.shard, pool, thread_id)
            raise


__all__ = ["AsyncRouter", "AsyncShardConnection", "AsyncTransaction"]
