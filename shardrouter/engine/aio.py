"""AsyncRouter: the async twin of Router over aiomysql; same planner, same core, other waiting."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Collection, Generator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import TextClause, text
from sqlalchemy.exc import DBAPIError, PendingRollbackError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from ..core.topology import Topology
from ..errors import (
    CrossShardTransactionError,
    LockConflictError,
    RoutingError,
    ShardUnavailableError,
)
from ..sql.execution import (
    Job,
    JobResult,
    Limits,
    LookupLedger,
    Page,
    ResultSet,
    keyset_query,
    log,
    log_statement,
    page_of,
    require_returning,
    run,
)
from ..sql.planner import Planner
from ..types import ShardId, Slot
from . import readpool
from .engines import classify, make_async_engine
from .readpool import AsyncReadPool
from .router import (
    ROLLBACK_TO_SAVEPOINT,
    SAVEPOINT,
    _explicit_key_rules,
    _sql_and_params,
    aborted,
    ends_transaction,
    multi_part,
    route_key,
)

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
        self.shard: ShardId | None = None
        self._conn: AsyncConnection | None = None
        self._deferred: list[Job] = []
        self._ledger = LookupLedger()
        self._broken: BaseException | None = None
        """A statement timed out (cancelled mid-answer: the connection's state is unknown) or
        was a deadlock victim (the server rolled the transaction back)."""
        self._wrote = False
        """A write ran in it: a commit that cannot happen then loses it, and says so."""

    async def execute(
        self, statement: str | Executable, params: Mapping[str, Any] | None = None
    ) -> ResultSet:
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

    async def _run(self, jobs: Sequence[Job]) -> list[JobResult]:
        out: list[JobResult] = []
        # A statement over several split tables is undone whole if a part fails (see
        # Transaction._undo): a savepoint before its first part.
        marks: list[ShardId] | None = [] if multi_part(jobs) else None
        try:
            for job in jobs:
                if job.role == "lookup_cleanup":
                    self._deferred.append(job)
                    out.append(JobResult((), [], 0))
                elif job.role == "lookup":
                    out.append(await self._router._run_job(job))
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

    async def _run_bound(self, job: Job, marks: list[ShardId] | None = None) -> JobResult:
        if job.anywhere and self.shard is None:
            return await self._router._run_job(job)  # do not bind to a shard for a broadcast read
        if job.anywhere and self.shard is not None and job.shard != self.shard:
            job = replace(job, shard=self.shard)  # a broadcast read: any shard will do
        if self.shard is None:
            self._conn = await self._router._begin(job.shard)
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
                await self._router._bounded(job.shard, _on(self._conn, job.shard, SAVEPOINT))
                marks.append(job.shard)
            return await self._router._bounded(job.shard, self._router._stoppable(self._conn, job))
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
        committed = False
        try:
            conn = self._conn
            if conn is not None:
                assert self.shard is not None
                if isinstance(self._broken, LockConflictError):
                    await self._router._end(self.shard, conn, False)  # the connection is sound
                    if commit and self._wrote:
                        raise aborted(self.shard, self._broken)
                elif self._broken is not None:
                    await self._router._discard(conn)  # the server rolls it back
                    if commit and self._wrote:  # a read-only one loses nothing
                        raise aborted(self.shard, self._broken)
                else:
                    await self._router._end(self.shard, conn, commit)
            committed = commit
            if commit and self._deferred:
                await self._router._gather(self._deferred)
        finally:
            # Lookup rows written for owners this transaction did not commit are removed
            # (see Transaction._finish).
            settle = self._ledger.settle(self._router.topology, committed)
            try:
                await self._router._drive(settle, None)
            except Exception as exc:  # best effort: the crash case, which check lookups fixes
                log.error("transaction end: lookup rows not settled: %s", exc)


async def _on(conn: AsyncConnection, shard: ShardId, sql: str) -> None:
    """A statement of the transaction's own (a savepoint), its error classified."""
    log_statement(shard, sql, None)
    try:
        await conn.exec_driver_sql(sql)
    except (DBAPIError, PoolTimeoutError) as exc:
        raise classify(exc, shard, sql) from exc
    except PendingRollbackError as exc:
        raise aborted(shard, exc) from exc


class AsyncRouter:
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
        max_concurrency: int | None = None,
    ) -> None:
        self.topology = topology
        self.planner = Planner(topology)
        self.limits = Limits(allow_scatter_write, max_fanout, max_offset)
        self.max_concurrency = max_concurrency or 4 * max(1, len(topology.shards))
        self._engines: dict[ShardId, AsyncEngine] = {
            sid: make_async_engine(spec.primary, spec.pool) for sid, spec in topology.shards.items()
        }
        self._texts: dict[str, TextClause] = {}
        self._key_rules = _explicit_key_rules(topology)
        self._lean: dict[ShardId, AsyncReadPool | Literal[False]] = {}

    @classmethod
    def load(cls, path: str | Path, **options: Any) -> AsyncRouter:
        return cls(Topology.load(path), **options)

    async def __aenter__(self) -> AsyncRouter:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for lean in self._lean.values():
            if lean is not False:
                lean.close()
        for engine in self._engines.values():
            await engine.dispose()

    def _engine(self, shard: ShardId) -> AsyncEngine:
        try:
            return self._engines[shard]
        except KeyError:
            raise RoutingError(f"shard {shard!r} is not in the topology") from None

    # -- explicit path ----------------------------------------------------------------------

    def route_key(self, **key: Any) -> tuple[ShardId, Slot]:
        """(shard, slot) of one sharding key, e.g. ``route_key(user_id=42)``."""
        return route_key(self.topology, self._key_rules, key)

    @asynccontextmanager
    async def connection(self, **key: Any) -> AsyncIterator[AsyncShardConnection]:
        """An AsyncConnection on the key's shard inside a transaction (committed on success)."""
        shard, slot = self.route_key(**key)
        try:
            async with self._engine(shard).begin() as conn:
                yield AsyncShardConnection(conn, self.topology, shard, slot)
        except (DBAPIError, PoolTimeoutError) as exc:
            raise classify(exc, shard) from exc

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
        return await self._execute(statement, params, None)

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
        sql, bound = _sql_and_params(statement, params)
        plan = self.planner.plan(sql)
        bind = txn.bind if txn is not None else None
        ledger = txn._ledger if txn is not None else None
        return await self._drive(run(self.topology, plan, bound, self.limits, bind, ledger), txn)

    async def _drive(
        self, step: Generator[list[Job], list[JobResult], T], txn: AsyncTransaction | None
    ) -> T:
        try:
            jobs = next(step)
            while True:
                try:
                    results = await (txn._run(jobs) if txn is not None else self._gather(jobs))
                except Exception as exc:
                    jobs = step.throw(exc)  # the step may clean up what it wrote first
                else:
                    jobs = step.send(results)
        except StopIteration as stop:
            result: T = stop.value
            return result

    async def _gather(self, jobs: Sequence[Job]) -> list[JobResult]:
        if len(jobs) == 1:
            return [await self._run_job(jobs[0])]
        if all(j.kind == "write" and j.role == "statement" for j in jobs):
            return await self._write_together(jobs)
        limit = asyncio.Semaphore(self.max_concurrency)

        async def bounded(job: Job) -> JobResult:
            async with limit:
                return await self._run_job(job)

        # Wait for every job (no task left running behind the caller); first error wins.
        results = await asyncio.gather(*(bounded(j) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return [r for r in results if isinstance(r, JobResult)]

    async def _write_together(self, jobs: Sequence[Job]) -> list[JobResult]:
        """Every shard's part in its own open transaction, one after the other in sorted
        shard order (a global lock order: see Router._write_together); all commit or all roll
        back."""
        conns: list[tuple[ShardId, AsyncConnection]] = []
        results: dict[int, JobResult] = {}
        error: BaseException | None = None
        try:
            for index in sorted(range(len(jobs)), key=lambda i: jobs[i].shard):
                job = jobs[index]
                conn = await self._begin(job.shard)
                conns.append((job.shard, conn))
                results[index] = await self._bounded(job.shard, self._stoppable(conn, job))
        except BaseException as exc:  # cancelled too: every begun part is still ended
            error = exc
        ends = await asyncio.gather(
            *(self._end(shard, conn, error is None) for shard, conn in conns),
            return_exceptions=True,
        )
        error = error or next((r for r in ends if isinstance(r, BaseException)), None)
        if error is not None:
            raise error
        return [results[i] for i in range(len(jobs))]

    async def _bounded(self, shard: ShardId, step: Awaitable[T]) -> T:
        """``step`` within the shard's query_timeout_s: the async drivers have no read timeout,
        so a shard that stops answering (SIGSTOP, a dead host) fails here as it does for the
        sync router, instead of hanging the caller forever."""
        timeout = self.topology.shards[shard].pool.query_timeout_s
        try:
            async with asyncio.timeout(timeout):  # no extra task, unlike wait_for
                return await step
        except TimeoutError:
            raise ShardUnavailableError(
                f"shard {shard} is unavailable (no answer within query_timeout_s="
                f"{timeout:g}); other shards keep serving",
                shard=shard,
            ) from None

    async def _begin(self, shard: ShardId) -> AsyncConnection:
        """A primary connection of ``shard`` with a transaction begun, within the timeout."""
        conn: AsyncConnection | None = None

        async def begin() -> AsyncConnection:
            nonlocal conn
            conn = await self._engine(shard).connect()
            await conn.begin()
            return conn

        try:
            return await self._bounded(shard, begin())
        except (DBAPIError, PoolTimeoutError, OSError) as exc:
            if conn is not None:
                await self._discard(conn)
            raise classify(exc, shard) from exc
        except ShardUnavailableError:
            if conn is not None:
                await self._discard(conn)
            raise

    async def _end(self, shard: ShardId, conn: AsyncConnection, commit: bool) -> None:
        """Commit or roll back, then return the connection, each within the timeout. A
        connection that did not finish is invalidated (its state is unknown), never pooled;
        only a failed commit raises: a failed rollback or close loses nothing, the server
        rolls back what a dropped connection leaves open."""
        done = False
        try:
            await self._bounded(shard, conn.commit() if commit else conn.rollback())
            done = True
            await self._bounded(shard, conn.close())
        except Exception as exc:
            await self._discard(conn)
            if commit and not done:
                if isinstance(exc, (DBAPIError, PoolTimeoutError, OSError)):
                    raise classify(exc, shard) from exc
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

    async def _run_job(self, job: Job) -> JobResult:
        return await self._bounded(job.shard, self._run_job_unbounded(job))

    async def _run_job_unbounded(self, job: Job) -> JobResult:
        engine = self._engine(job.shard)
        if job.kind == "read" and not isinstance(job.statement, Executable):
            lean = self._lean.get(job.shard)
            if lean is None:
                lean = self._lean[job.shard] = (
                    AsyncReadPool(engine, job.shard, self.topology.shards[job.shard].pool)
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
                return await self._stoppable(conn, job)
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
