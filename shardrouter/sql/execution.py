"""The sans-I/O core of statement execution, shared by the sync and async routers.

``run(...)`` is a generator: it yields batches of Jobs (statements to run on shards) and is sent
back their results; it returns the final ResultSet. The sync router drives it with a thread
pool, the async router with asyncio tasks: the two differ only in how they wait. Routing,
lookups, the order of lookup writes and the merge all live here, once.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import re
from collections import defaultdict
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from decimal import Decimal, localcontext
from typing import Any, Literal

from sqlalchemy import and_, column, delete, or_, select, table, update
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql import Executable, Select

from ..core.strategies import GeneStrategy, HashStrategy, LookupStrategy
from ..core.strategies.hash import fold
from ..core.topology import KeyRule, TableRule, Topology
from ..errors import (
    ExecutionError,
    FanoutLimitError,
    KeyValueError,
    LockConflictError,
    RoutingError,
    ScatterWriteError,
    ShardUnavailableError,
    UnsupportedQueryError,
)
from ..types import ShardId, Slot
from .late import LateParams
from .merge import MergePlan, merge, with_unsigned
from .planner import (
    DATE_PROBE,
    FLOAT_PROBE,
    NULL_PROBE,
    ZERO,
    Exclusion,
    KeyCondition,
    Plan,
    Target,
    only_params,
    quotient_items,
)

log = logging.getLogger("shardrouter")

_RECHECKS = 3
"""How often a unique lookup row found missing at its check is written again (see
write_lookups) before the write gives up with a typed error."""
sql_log = logging.getLogger("shardrouter.sql")
"""Every statement the routers send, at DEBUG: ``shard``, ``statement`` (as rendered, with
``:name`` parameters) and ``params`` are also record attributes. SQLAlchemy's engine events do
not see reads outside transactions (they bypass its Connection, see readpool); this does."""


def log_statement(shard: ShardId, statement: object, params: object) -> None:
    if sql_log.isEnabledFor(logging.DEBUG):
        sql_log.debug(
            "shard %s: %s %r",
            shard,
            statement,
            params,
            extra={"shard": shard, "statement": str(statement), "params": params},
        )


JobKind = Literal["read", "write"]
JobRole = Literal["statement", "lookup", "lookup_cleanup"]


@dataclass(frozen=True, slots=True)
class Job:
    """One statement to run on one shard, in its own transaction unless the caller holds one."""

    shard: ShardId
    statement: str | Executable | tuple[str, ...]
    """One statement, or several run in order on one connection (a shard's split tables):
    one pool checkout and one transaction per shard instead of one per physical table."""
    params: Mapping[str, Any] | Sequence[Mapping[str, Any]]
    kind: JobKind
    role: JobRole = "statement"
    anywhere: bool = False
    """The same statement gives the same answer on every shard (broadcast reads)."""
    lazy: bool = False
    """The rows feed a merge, which may read only some of them (ORDER BY ... LIMIT): a runner
    may hand them over undecoded and decode each row when it is read (readpool.LazyRows)."""
    returning: bool = False
    """The statement uses INSERT/DELETE ... RETURNING (lookup writes, an owner's DELETE): the
    runner checks the shard's server has it first (require_returning)."""
    expect: int | None = None
    """A guard: the number of rows this job must return. A batch with a guard runs as one
    write (Router._write_together: every part in its own open transaction, all committed or
    all rolled back), and a guard that returns another number rolls every part back and
    raises GuardFailed (see discard_lookups and _insert)."""
    in_order: bool = False
    """Run the batch's parts in the order given, not in shard order: a discard deletes its
    lookup rows before it checks their owners (its checks never wait for a row lock,
    OwnerCheck, so leaving the global lock order cannot deadlock)."""
    """Lookup reads and writes run outside the caller's transaction (a lookup row may live on
    another shard; it is written first, and the rows a statement created are removed if its
    owner rows are not written, see LookupLedger); lookup cleanups run only after the owner's
    delete committed."""


class GuardFailed(ExecutionError):
    """A guard of a write run together returned another number of rows than it expects;
    every part was rolled back (see Job.expect). Caught by the step that set the guard."""


def guarded(jobs: Sequence[Job]) -> bool:
    """Whether a batch must run as one write because it carries a guard (Job.expect)."""
    return any(j.expect is not None for j in jobs)


def check_guard(job: Job, result: JobResult) -> None:
    """Raise GuardFailed when ``job`` is a guard and ``result`` is not what it expects."""
    if job.expect is not None and len(result.rows) != job.expect:
        raise GuardFailed(
            f"guard on shard {job.shard} found {len(result.rows)} rows, expected {job.expect}",
            shard=job.shard,
        )


def together_order(jobs: Sequence[Job]) -> list[int]:
    """The order the parts of a write run together: as given for a batch that asks for it
    (Job.in_order), else sorted by shard (one global lock order, see
    Router._write_together), guards last: a guard checks rows once the write's own rows are
    written and locked (see _insert), and takes only shared locks, which it waits for only
    behind writers that never wait themselves (a discard's check waits for no row lock,
    lookup writes commit at once). Parts on one shard run on one connection (see
    Router._write_together)."""
    if any(j.in_order for j in jobs):
        return list(range(len(jobs)))
    return sorted(range(len(jobs)), key=lambda i: (jobs[i].expect is not None, jobs[i].shard))


@dataclass(frozen=True, slots=True)
class JobResult:
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    """A list, or for a ``lazy`` job possibly a sequence that decodes rows as they are read."""
    rowcount: int
    parts: tuple[JobResult, ...] = ()
    """For a job of several statements: one result each, in order."""
    index_ordered: frozenset[int] = frozenset()
    """Positions of ENUM/SET columns (ordered by index, not text), from the driver's result
    metadata (see index_ordered_columns)."""
    floats: frozenset[int] = frozenset()
    """Positions of FLOAT columns, whose values reach the client in 6 digits (float_columns)."""
    unsigned: frozenset[int] = frozenset()
    """Positions of UNSIGNED columns (column_flags): MySQL's arithmetic on them is unsigned."""
    rounded: frozenset[int] = frozenset()
    """Positions of FLOAT/DOUBLE columns with fixed decimals (FLOAT(7,2), SUM of one), whose
    values reach the client rounded to them (float_columns)."""

    @classmethod
    def of(cls, result: Any) -> JobResult:
        """From an executed (buffered) SQLAlchemy result; sync and async results alike."""
        if result.returns_rows:
            cursor = result.cursor
            enums, unsigned = column_flags(cursor)  # before all() closes the cursor
            floats, rounded = float_columns(cursor.description)
            # all() fetches in one call; iterating the Result row by row costs ~60 us more.
            rows = [tuple(r) for r in result.all()]
            return cls(tuple(result.keys()), rows, len(rows), (), enums, floats, unsigned, rounded)
        return cls((), [], result.rowcount)

    def flagged(self, cursor: Any) -> JobResult:
        """This result with the ENUM/SET and UNSIGNED positions of ``cursor``'s metadata."""
        enums, unsigned = column_flags(cursor)
        if enums or unsigned:
            return replace(self, index_ordered=enums, unsigned=unsigned)
        return self

    def flat(self) -> tuple[JobResult, ...]:
        return self.parts or (self,)


_INDEX_ORDERED_FLAGS = 256 | 2048  # the protocol's ENUM_FLAG and SET_FLAG
_NONE: frozenset[int] = frozenset()


_UNSIGNED_FLAG = 32  # the protocol's UNSIGNED_FLAG


def index_ordered_columns(cursor: Any) -> frozenset[int]:
    """Positions of the ENUM and SET columns of a DBAPI cursor's last result (column_flags)."""
    return column_flags(cursor)[0]


def column_flags(cursor: Any) -> tuple[frozenset[int], frozenset[int]]:
    """Positions of the ENUM and SET columns, and of the UNSIGNED ones, of a DBAPI cursor's
    last result.

    DBAPI descriptions carry no column flags, so each driver's own field metadata is read:
    mysqlclient's ``description_flags``, PyMySQL's, aiomysql's and asyncmy's ``_result.fields``
    (SQLAlchemy's async adapters hold the driver's cursor as ``_cursor``). Other drivers give
    none: a known gap (docs/ARCHITECTURE.md).
    """
    raw = getattr(cursor, "_cursor", cursor)
    flags = getattr(raw, "description_flags", None)
    if flags is None:
        fields = getattr(getattr(raw, "_result", None), "fields", None)
        if not fields:
            return _NONE, _NONE
        flags = [field.flags for field in fields]
    enums = [i for i, flag in enumerate(flags) if flag & _INDEX_ORDERED_FLAGS]
    unsigned = [i for i, flag in enumerate(flags) if flag & _UNSIGNED_FLAG]
    return (frozenset(enums) if enums else _NONE, frozenset(unsigned) if unsigned else _NONE)


_FLOAT, _DOUBLE = 4, 5  # the protocol's types (DBAPI type_code of PyMySQL, mysqlclient...)


def float_columns(description: Any) -> tuple[frozenset[int], frozenset[int]]:
    """Positions of the FLOAT columns of a DBAPI description, and of its FLOAT/DOUBLE columns
    with fixed decimals. MariaDB and MySQL send a FLOAT as text of 6 significant digits
    (16777217 as 1.67772e7), a FLOAT(7,2) or a SUM of one with its 2 decimals (the stored 0.1
    is 0.1000000015), and compare, group and compute with the stored value: a merge on that
    text is not one database's answer (execution._refuse_floats)."""
    if not description:
        return _NONE, _NONE
    # Decimals 31 (NOT_FIXED_DEC) mean "as many as it takes": 6 significant digits for a FLOAT,
    # 17 for a DOUBLE (exact).
    floats = [i for i, d in enumerate(description) if d[1] == _FLOAT]
    rounded = [i for i, d in enumerate(description) if d[1] in (_FLOAT, _DOUBLE) and _fixed(d[5])]
    return (frozenset(floats) if floats else _NONE, frozenset(rounded) if rounded else _NONE)


def _fixed(decimals: Any) -> bool:
    return isinstance(decimals, int) and decimals < 31


@dataclass(slots=True)
class ResultSet:
    """Rows of a routed statement and the route it took."""

    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]
    rowcount: int
    shards: tuple[ShardId, ...]
    """The shards the statement ran on (lookup queries not included)."""
    lookups: tuple[ShardId, ...] = ()
    """The shards lookup tables were read or written on."""
    scatter: bool = False
    """Whether the statement fanned out to every shard."""
    index_ordered: frozenset[int] = frozenset()
    """Positions of the ENUM/SET columns any shard reported (JobResult.index_ordered)."""
    floats: frozenset[int] = frozenset()
    """Positions of the FLOAT columns any shard reported (JobResult.floats)."""
    rounded: frozenset[int] = frozenset()
    """Positions of the fixed-decimal FLOAT/DOUBLE columns any shard reported."""

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def all(self) -> list[tuple[Any, ...]]:
        return list(self.rows)

    def one(self) -> tuple[Any, ...]:
        if len(self.rows) != 1:
            raise ExecutionError(f"expected exactly one row, got {len(self.rows)}")
        return self.rows[0]

    def scalar(self) -> Any:
        return self.rows[0][0] if self.rows else None

    def scalars(self) -> list[Any]:
        return [r[0] for r in self.rows]

    def mappings(self) -> list[dict[str, Any]]:
        return [dict(zip(self.columns, r, strict=False)) for r in self.rows]


@dataclass(frozen=True, slots=True)
class Limits:
    """Caps that keep one query from hurting the cluster; 0 or None means no cap."""

    allow_scatter_write: bool = False
    max_fanout: int | None = None
    max_offset: int | None = 10_000
    max_distinct_rows: int | None = 100_000
    """Rows one shard may send for a DISTINCT aggregate or GROUP_CONCAT merged from distinct
    values (COUNT(DISTINCT merchant_id) across shards: one row per group and value)."""


Step = Generator[list[Job], list[JobResult], ResultSet]


@dataclass
class _Targets:
    targets: list[Target]
    scatter: bool
    lookups: list[ShardId] = field(default_factory=list)
    anywhere: bool = False
    """Every shard gives the same answer (a broadcast read): a transaction may use its own."""


Bind = Callable[[Collection[ShardId]], None]
"""Called with a statement's target shards before any of its jobs is yielded (lookup writes
included): a transaction bound to one shard refuses a statement that needs others here, before
anything ran, instead of after the part on its own shard did."""


def run(
    topology: Topology,
    plan: Plan,
    params: Mapping[str, Any],
    limits: Limits,
    bind: Bind | None = None,
    ledger: LookupLedger | None = None,
) -> Step:
    """Execute ``plan``: yields job batches, receives their results, returns the ResultSet.

    A driver that fails to run a batch throws the error into the generator (``throw``) rather
    than abandoning it: an INSERT then removes the lookup rows it created for owner rows that
    were not written. ``ledger``: the caller's transaction, which settles lookup rows when it
    ends instead (see LookupLedger)."""
    if plan.kind == "insert":
        return (yield from _insert(topology, plan, params, bind, ledger))
    if plan.union:
        return (yield from _union(topology, plan, params, limits, bind, ledger))
    fanout: _FanOut | None = plan.fanout
    if (
        fanout is not None
        and fanout.topology is topology
        and fanout.strings_compared == plan.strings_compared
        and fanout.cap == limits.max_distinct_rows
    ):
        # A SELECT of every shard seen before on this topology: its jobs as they were.
        _check_limits(plan, fanout.sent.found, limits, topology)
        if bind is not None:
            bind(set(fanout.sent.shards))
        answers = yield [
            Job(j.shard, j.statement, params, "read", lazy=j.lazy) for j in fanout.sent.jobs
        ]
        context = (topology, plan, params, limits, ledger)
        return (yield from _merged(context, fanout.sent, answers))
    found = _direct_targets(topology, plan, params)
    if found is None:
        found = yield from _indirect_targets(topology, plan, params, ledger)
    if plan.bind_late is not None:
        if len(found.targets) > 1:  # the merge needs LIMIT :n and HAVING's :x as values
            plan = plan.bind_late(params)
        else:  # one target binds them itself; the same values are refused either way
            assert plan.late is not None
            plan.late.values(params)
    _check_limits(plan, found, limits, topology)
    if bind is not None and not found.anywhere:
        bind({ShardId(t.shard) for t in found.targets})
    kind: JobKind = "read" if plan.kind == "select" else "write"
    if len(found.targets) == 1 and plan.kind == "select" and not found.lookups:
        # The point query: one target, one job, rows as they come (no merge, no grouping).
        target = found.targets[0]
        shard = ShardId(target.shard)
        job = Job(shard, plan.render(target, scatter=False), params, kind, anywhere=found.anywhere)
        (result,) = yield [job]
        rows = result.rows if isinstance(result.rows, list) else list(result.rows)
        return ResultSet(
            result.columns,
            rows,
            len(rows),
            (shard,),
            index_ordered=result.index_ordered,
            floats=result.floats,
            rounded=result.rounded,
        )
    scatter_sql = len(found.targets) > 1 and plan.kind == "select"
    owner = _deleted_owner(plan) if plan.kind == "delete" else None
    returning = _returning(plan, owner) if owner is not None else None
    by_shard: dict[ShardId, list[Target]] = defaultdict(list)
    for t in found.targets:
        by_shard[ShardId(t.shard)].append(t)
    jobs: list[Job] = []
    unions: list[int] = []  # the jobs that run a shard's splits in one UNION
    lazy = scatter_sql and plan.merge is not None  # the merge may read only some rows
    spread = scatter_sql and plan.merge is not None and plan.merge.expanded
    cap = limits.max_distinct_rows if spread else None  # (rows a shard sends: _at_most)
    for shard, targets in by_shard.items():
        backend = _backend(topology, shard) if scatter_sql else "mysql"
        bound = params
        if any(t.only is not None for t in targets):  # (only during a migration)
            bound = {**params, **{k: v for t in targets for k, v in only_params(t).items()}}
        if returning is not None:
            statement: str | tuple[str, ...] = tuple(
                plan.render(t, scatter=False, backend=backend) + returning for t in targets
            )
        elif len(targets) == 1:
            statement = at_most(plan.render(targets[0], scatter=scatter_sql, backend=backend), cap)
        elif (
            scatter_sql
            and backend != "sqlite"
            and all(t.keep is None and t.only is None and t.exclude is None for t in targets)
        ):
            statement = at_most(plan.render_union(targets), cap)
            if plan.strings_compared and _compares(plan.merge):
                statement = (plan.render_probe(targets[0]), statement)
            else:
                unions.append(len(jobs))
        else:
            statement = tuple(
                at_most(plan.render(t, scatter=scatter_sql, backend=backend), cap) for t in targets
            )
        jobs.append(
            Job(
                shard,
                statement,
                bound,
                kind,
                anywhere=found.anywhere,
                lazy=lazy,
                returning=returning is not None,
            )
        )
    sent = _Sent(found, tuple(jobs), tuple(unions), tuple(by_shard), returning)
    if (
        scatter_sql
        and found.scatter
        and not found.lookups
        and not found.anywhere
        and not plan.conditions
        and plan.bind_late is None
        and type(topology) is Topology  # (not a migration's SlotRecorder)
        and not topology.mirrored
        and all(t.only is None and t.keep is None and t.exclude is None for t in found.targets)
    ):
        plan.fanout = _FanOut(topology, plan.strings_compared, limits.max_distinct_rows, sent)
    answers = yield jobs
    return (yield from _merged((topology, plan, params, limits, ledger), sent, answers, owner))


@dataclass(frozen=True, slots=True)
class _Sent:
    """A statement's jobs as run sent them, and what they were made of."""

    found: _Targets
    jobs: tuple[Job, ...]
    unions: tuple[int, ...]
    """The jobs that run a shard's splits in one UNION."""
    shards: tuple[ShardId, ...]
    returning: str | None = None


@dataclass(frozen=True, slots=True)
class _FanOut:
    """The jobs of a SELECT that reads every shard (Plan.fanout), for one topology."""

    topology: Topology
    strings_compared: bool
    cap: int | None
    """Limits.max_distinct_rows, written into the statements (at_most)."""
    sent: _Sent


def _merged(
    context: tuple[Topology, Plan, Mapping[str, Any], Limits, LookupLedger | None],
    sent: _Sent,
    answers: list[JobResult],
    owner: TableRule | None = None,
) -> Step:
    """The statement's ResultSet from its jobs' answers (the rest of run)."""
    topology, plan, params, limits, ledger = context
    found, jobs, unions, shards, returning = (
        sent.found,
        sent.jobs,
        sent.unions,
        sent.shards,
        sent.returning,
    )
    scatter_sql = len(found.targets) > 1 and plan.kind == "select"
    if (
        unions
        and plan.merge is not None
        and _may_be_index_ordered(plan.merge, [answers[i] for i in unions])
    ):
        # The merge compares a string column a UNION gave: it may be an ENUM or SET that lost
        # its flag there. Ask those shards for the flags (no rows: render_probe), and send
        # every later run's UNIONs with their probe (Plan.strings_compared).
        plan.strings_compared = True
        first = {t.shard: t for t in reversed(found.targets)}  # each shard's first target
        probes = yield [
            replace(jobs[i], statement=plan.render_probe(first[jobs[i].shard])) for i in unions
        ]
        answers = [*answers, *probes]  # no rows: only their flags count
    results = [part for r in answers for part in r.flat()]
    if plan.kind != "select":
        if plan.sharded is None:
            rowcount = _broadcast_rowcount(plan, shards, results)
        else:
            rowcount = sum(r.rowcount for r in results)
        if owner is not None and returning is not None:
            # Exactly the rows this DELETE removed (RETURNING), never a separate read of them.
            doomed = [dict(zip(r.columns, row, strict=True)) for r in results for row in r.rows]
            gone = lookup_rows(topology, owner, doomed, deleting=True)
            if ledger is not None:
                ledger.remove(gone)  # removed when the transaction commits (LookupLedger)
            elif gone:
                # The owner rows' delete has committed: the statement did what it says, and an
                # error would invite a retry that deletes nothing. Lookup rows the cleanup
                # cannot remove (logged) are orphans, as after a crash (reads ignore them,
                # `shardctl check lookups --fix` removes them), as LookupLedger.settle.
                removed = yield from remove_lookups(topology, gone)
                if removed < len(gone):
                    log.warning(
                        "%s committed (%d rows); %d of their %d lookup rows removed (the rest"
                        " belong to owners written again since, or are left as orphans:"
                        " `shardctl check lookups --fix` removes those)",
                        plan.kind.upper(),
                        rowcount,
                        removed,
                        len(gone),
                    )
        return ResultSet((), [], rowcount, shards, tuple(found.lookups), found.scatter)
    columns = results[0].columns if results else ()
    # Column kinds any shard reported, of the columns the caller sees.
    merging = scatter_sql and plan.merge is not None
    width = plan.merge.visible_width(len(columns)) if merging and plan.merge else len(columns)
    kinds = [
        frozenset(p for r in results for p in getattr(r, kind) if p < width)
        for kind in ("index_ordered", "floats", "rounded")
    ]
    lookups = tuple(found.lookups)
    if not merging or plan.merge is None:
        rows = [row for r in results for row in r.rows]
        return ResultSet(columns, rows, len(rows), shards, lookups, found.scatter, *kinds)
    if plan.merge.regrouped and not any(r.rows for r in results):
        # An aggregate without GROUP BY over no rows is one row all the same, with its
        # constants and parameters: no shard sent a row to take them from.
        target = found.targets[0]
        shard = ShardId(target.shard)
        (empty,) = yield [Job(shard, plan.render_empty(target), params, "read")]
        rows = list(empty.rows)
        return ResultSet(empty.columns, rows, len(rows), shards, lookups, True)
    merged = merged_rows(plan.merge, results, limits)
    return ResultSet(columns[:width], merged, len(merged), shards, lookups, found.scatter, *kinds)


def at_most(statement: str, cap: int | None) -> str:
    """A grouped scatter statement (no LIMIT of its own) sending at most ``cap + 1`` rows: one
    past the cap tells the merge (_capped) the cap was reached (router and ORM fan-outs)."""
    return f"{statement} LIMIT {cap + 1}" if cap else statement


def merged_rows(
    merge_plan: MergePlan, results: Sequence[JobResult], limits: Limits
) -> list[tuple[Any, ...]]:
    """The shards' answers to a scatter SELECT merged into one database's answer (the router's
    and the ORM's fan-outs alike), within ``limits``."""
    _refuse_index_ordered(merge_plan, results)
    _refuse_floats(merge_plan, results)
    shard_rows: list[Iterable[Sequence[Any]]] = [r.rows for r in results]
    if merge_plan.expanded and limits.max_distinct_rows:
        shard_rows = [_capped(rows, limits.max_distinct_rows) for rows in shard_rows]
    unsigned = frozenset().union(*(r.unsigned for r in results))
    return list(merge(with_unsigned(merge_plan, unsigned), shard_rows))


def _capped(rows: Iterable[Sequence[Any]], cap: int) -> Iterator[Sequence[Any]]:
    """A shard's rows for a merge from distinct values, refused past ``cap`` of them."""
    for n, row in enumerate(rows, 1):
        if n > cap:
            raise FanoutLimitError(
                f"a DISTINCT aggregate or GROUP_CONCAT across shards is merged from each"
                f" group's distinct values, and one shard has more than {cap}"
                f" (max_distinct_rows={cap}); route by a key, fetch fewer values, or raise"
                " max_distinct_rows"
            )
        yield row


def _compares(merge_plan: MergePlan | None) -> bool:
    """Whether the merge orders, groups or deduplicates rows (compares their values)."""
    return merge_plan is not None and bool(
        merge_plan.order_by or merge_plan.group_by or merge_plan.distinct or merge_plan.concats
    )


def _compared(merge_plan: MergePlan, width: int) -> set[int]:
    """Positions (counted from 0) of the columns of a ``width``-column row the merge orders,
    groups or deduplicates by."""
    if merge_plan.distinct:
        return set(range(merge_plan.visible_width(width)))
    return {p % width for p in _ordered_positions(merge_plan) if -width <= p < width}


def _ordered_positions(merge_plan: MergePlan) -> set[int]:
    """Positions the merge orders or groups by (ORDER BY, GROUP BY, GROUP_CONCAT's own ORDER
    BY and DISTINCT argument)."""
    positions = {k.index for k in merge_plan.order_by} | set(merge_plan.group_by)
    for concat in merge_plan.concats:
        positions |= {k.index for k in concat.order_by} | set(concat.distinct)
    return positions


def _may_be_index_ordered(merge_plan: MergePlan, results: Sequence[JobResult]) -> bool:
    """Whether a column the merge compares holds strings in these UNION results: an ENUM or
    SET column comes back as a string, and through a UNION without its flag. Numbers, dates
    and NULLs cannot be one. One value per column tells (a column has one type): the first
    that is not NULL."""
    for result in results:
        rows = result.rows
        if not rows:
            continue
        first = rows[0]
        compared = _compared(merge_plan, len(first))
        if any(isinstance(first[p], _TEXT) for p in compared):
            return True
        unknown = [p for p in compared if first[p] is None]
        for row in itertools.islice(rows, 1, None) if unknown else ():
            for p in list(unknown):
                value = row[p]
                if value is None:
                    continue
                if isinstance(value, _TEXT):
                    return True
                unknown.remove(p)
            if not unknown:
                break
    return False


_TEXT = (str, bytes, bytearray)


def _refuse_index_ordered(merge_plan: MergePlan, results: Sequence[JobResult]) -> None:
    """MySQL orders, groups and deduplicates ENUM and SET columns by their index, the merge by
    their text: refuse rather than answer in another order. No SQL expression tells an ENUM
    from a VARCHAR, so this reads the result metadata (index_ordered_columns); drivers
    without it remain a known gap (docs/ARCHITECTURE.md)."""
    flagged = frozenset().union(*(r.index_ordered for r in results))
    if not flagged:
        return
    compared = _ordered_positions(merge_plan)
    if merge_plan.distinct or flagged & compared:
        columns = next((r.columns for r in results if r.columns), ())
        names = ", ".join(columns[p] for p in sorted(flagged) if p < len(columns))
        raise UnsupportedQueryError(
            f"ORDER BY, GROUP BY or DISTINCT on an ENUM or SET column ({names}) across shards"
            " or split tables: MySQL orders those by their index, the merge would order them by"
            " text; order by `col + 0` (the index) or route the statement by a key"
        )


def _refuse_floats(merge_plan: MergePlan, results: Sequence[JobResult]) -> None:
    """A FLOAT column reaches the merge in 6 digits, a fixed-decimal FLOAT/DOUBLE one rounded
    to its decimals (float_columns), while one database uses the stored value: refused where
    the merge computes with them (HAVING, expressions over aggregates, adding SUM partials for
    SUM and AVG) or compares them (ORDER BY, GROUP BY, DISTINCT, GROUP_CONCAT keys). MIN and
    MAX merge right (the rounding keeps the order); a SUM of a plain FLOAT or DOUBLE is a full
    DOUBLE."""
    floats = frozenset().union(*(r.floats for r in results))
    rounded = frozenset().union(*(r.rounded for r in results))
    if not floats and not rounded:
        return
    columns = next((r.columns for r in results if r.columns), ())
    width = len(columns)
    within = range(-width, width)
    computed = {p % width for p in merge_plan.evaluated if p in within}
    computed |= {
        a.index % width for a in merge_plan.aggregates if a.func == "sum" and a.index in within
    }
    computed |= {a.sum_index % width for a in merge_plan.averages if a.sum_index in within}
    # Fixed decimals keep a column's stored values apart, not an expression's (f2 * 0.01 sent
    # as 0.00 for 0.001 and 0.0011), and the metadata does not tell them apart: both refused.
    compared = _compared(merge_plan, width)
    _refuse_float_at((floats | rounded) & (compared | computed), columns)


_HIDDEN = re.compile(r"shardrouter_")
"""The planner's hidden columns (hidden_name) and the ORM's sort keys: internal names."""


def _refuse_float_at(positions: Iterable[int], columns: Sequence[str]) -> None:
    """Refuse a merge that compares or computes with these FLOAT columns (_refuse_floats)."""
    hit = sorted(positions)
    if hit:
        # The planner's hidden columns (shardrouter_h0...) mean nothing to the caller.
        shown = [columns[p] for p in hit if p < len(columns) and not _HIDDEN.match(columns[p])]
        names = ", ".join(shown) if shown else "an ORDER BY, GROUP BY or HAVING value"
        raise UnsupportedQueryError(
            f"a FLOAT value ({names}) is ordered, grouped, deduplicated or computed with"
            " across shards: MySQL sends a FLOAT in 6 digits (16777217 as 1.67772e7), and a"
            " FLOAT(M,D) or DOUBLE(M,D) rounded to D decimals, but compares and computes with"
            " the stored value, so the merge would not give one database's answer; use"
            " CAST(x AS DOUBLE) there (exact), or route the statement by a key"
        )


def _backend(topology: Topology, shard: ShardId) -> str:
    """The shard's database ("mysql", "sqlite"): the scatter SQL differs (collation weights),
    and only MySQL/MariaDB take parenthesised UNION members."""
    return str(topology.shards[shard].primary.get_backend_name())


def _broadcast_rowcount(plan: Plan, shards: Sequence[ShardId], results: Sequence[JobResult]) -> int:
    """A broadcast write changes the same rows on every shard: report one shard's count, as one
    database would. Different counts mean the copies diverged: say so loudly (the write itself
    made no divergence worse: every copy got the same statement, all or nothing)."""
    counts = [r.rowcount for r in results]
    if len(set(counts)) > 1:
        log.warning(
            "broadcast %s on %s changed different row counts per shard (%s): the copies of"
            " this table differ; re-sync them (see docs/ARCHITECTURE.md, broadcast tables)",
            plan.kind.upper(),
            ", ".join(t.name for t in plan.tables),
            ", ".join(f"{s}={c}" for s, c in zip(shards, counts, strict=False)),
        )
    return counts[0] if counts else 0


def _deleted_owner(plan: Plan) -> TableRule | None:
    """The table of a DELETE whose lookup rows must go with its rows, if it has any.

    Only a single-table DELETE returns its rows (``RETURNING``: MariaDB 10.0+, SQLite 3.35+). A
    multi-table DELETE of a lookup owner could not say which rows it removed: the planner
    refuses it (``_refuse_owner_multi_table_delete``), so a multi-table DELETE that reaches here
    deletes only tables without lookups (``DELETE i FROM order_items i JOIN orders o ...``)."""
    ast = plan.ast
    this = ast.args.get("this")
    if (
        ast.args.get("tables")
        or ast.args.get("using")
        or (this is not None and this.args.get("joins"))
    ):
        return None
    table = plan.sharded
    return table if table is not None and _owned_lookups(table) else None


RETURNING_NEEDED = (
    "tables with lookups need MariaDB >= 10.5 (MySQL has no INSERT/DELETE ... RETURNING, which"
    " the lookup write path uses to know exactly the rows it created and deleted)"
)


def require_returning(dialect: Dialect, shard: ShardId) -> None:
    """Refuse a RETURNING statement on a server without it, before it runs: MySQL (any
    version) and MariaDB before 10.5 would fail it as an untyped CompileError (SQLAlchemy
    compiles RETURNING only for servers it knows have it) or a syntax error. The dialect
    knows the server once a connection has been made, which running a job has done."""
    if dialect.name != "mysql":
        return  # SQLite >= 3.35 has it (SQLAlchemy refuses older ones itself)
    version = dialect.server_version_info or ()
    if getattr(dialect, "is_mariadb", False) and tuple(version) >= (10, 5):
        return
    kind = "MariaDB " if getattr(dialect, "is_mariadb", False) else "MySQL "
    found = kind + ".".join(str(v) for v in version) if version else kind.strip()
    raise UnsupportedQueryError(f"shard {shard} runs {found}: {RETURNING_NEEDED}")


def _returning(plan: Plan, owner: TableRule) -> str:
    """`` RETURNING <the lookup columns>`` for a single-table DELETE of ``owner``: the rows it
    removed, exactly, for their lookup cleanup (the caller gets a rowcount, as before)."""
    if plan.ast.args.get("returning"):
        raise UnsupportedQueryError(
            f"DELETE ... RETURNING on {owner.name}, which owns lookup rows, is not routed;"
            " select the rows first, then delete them by key"
        )
    return " RETURNING " + ", ".join(_lookup_columns(owner))


# -- targets --------------------------------------------------------------------------------


def _union(
    topology: Topology,
    plan: Plan,
    params: Mapping[str, Any],
    limits: Limits,
    bind: Bind | None,
    ledger: LookupLedger | None,
) -> Step:
    """A UNION [ALL]. When every SELECT routes to one and the same target, that target runs
    the UNION as written (MySQL's own types, collation and order). Otherwise each SELECT runs
    as it would alone and the router combines them: UNION ALL concatenates; UNION removes
    duplicates, ORDER BY sorts and LIMIT cuts, exactly, on values that compare the same
    everywhere (numbers, dates, NULL). Refused (UnsupportedQueryError) when a column's values
    are of different kinds in different SELECTs (MySQL would convert them to one type), or
    when strings are deduplicated or ordered (the collation is the shards'; route by a key or
    use UNION ALL)."""
    founds = []
    for member in plan.union:
        found = _direct_targets(topology, member, params)
        if found is None:
            found = yield from _indirect_targets(topology, member, params, ledger)
        founds.append(found)
    places = {(t.shard, t.split) for f in founds if not f.anywhere for t in f.targets}
    plain = all(t.only is None and t.exclude is None for f in founds for t in f.targets)
    if all(len(f.targets) == 1 for f in founds) and len(places) <= 1 and plain:
        shard, split = next(iter(places)) if places else (founds[0].targets[0].shard, 0)
        anywhere = not places  # broadcast tables only: any shard (a transaction's own) answers
        if bind is not None and not anywhere:
            bind({ShardId(shard)})
        target = Target(shard, split)
        job = Job(
            ShardId(shard), plan.render(target, scatter=False), params, "read", anywhere=anywhere
        )
        (result,) = yield [job]
        rows = result.rows if isinstance(result.rows, list) else list(result.rows)
        return ResultSet(result.columns, rows, len(rows), (ShardId(shard),))
    results = []
    for member in plan.union:
        results.append((yield from run(topology, member, params, limits, bind, ledger)))
    typed: Sequence[Any] = ()
    kinds = _union_kinds([r.rows for r in results])
    shard = next((s for r in results for s in r.shards), ShardId(next(iter(topology.shards))))
    if kinds and _backend(topology, shard) != "sqlite":
        # The columns' types as one database gives them (a member without rows counts too).
        zeros = tuple(_probe_for(k) for k in kinds)
        (answer,) = yield [
            Job(shard, plan.render_union_types(Target(shard, 0), zeros), params, "read")
        ]
        typed = answer.rows[0] if answer.rows else ()
    floats = frozenset().union(*(r.floats for r in results))
    rounded = frozenset().union(*(r.rounded for r in results))
    window = _union_window(plan, params)
    rows = _union_rows(
        plan, [r.rows for r in results], kinds, typed, (floats, rounded), results[0].columns, window
    )
    shards = tuple(dict.fromkeys(s for r in results for s in r.shards))
    lookups = tuple(dict.fromkeys(s for r in results for s in r.lookups))
    return ResultSet(results[0].columns, rows, len(rows), shards, lookups, True)


def _union_rows(
    plan: Plan,
    members: Sequence[Sequence[tuple[Any, ...]]],
    kinds: list[set[str]],
    typed: Sequence[Any] = (),
    floats: tuple[frozenset[int], frozenset[int]] = (frozenset(), frozenset()),
    columns: Sequence[str] = (),
    window: tuple[int, int | None] = (0, None),
) -> list[tuple[Any, ...]]:
    """The members' rows as one database's UNION: values brought to the column's type
    (``kinds``: _union_kinds of the members; ``typed``: a value of each column's type, from
    render_union_types), deduplicated, ordered and cut. ``floats``: the FLOAT and the
    fixed-decimal FLOAT/DOUBLE columns of any member (ResultSet.floats, .rounded)."""
    every_float, rounded = floats
    scales = [0] * len(kinds)
    for rows in members:
        for row in rows:
            for i, value in enumerate(row):
                if isinstance(value, Decimal):
                    scales[i] = max(scales[i], _scale(value))
    convert: dict[int, Callable[[Any], Any]] = {}
    for i, zero in enumerate(typed):
        found = kinds[i] if i < len(kinds) else set()
        if not found or zero is None:
            continue
        if isinstance(zero, _TEXT) and not found <= {"str", "bytes"}:
            raise UnsupportedQueryError(
                f"UNION column {i + 1}: one database types it as a string (a SELECT of strings,"
                f" with rows or not), so its {', '.join(sorted(found))} values become strings"
                " there; CAST the SELECTs to one type, or route the UNION by a key"
            )
        if "float" in found:
            # The probe's 0.1 comes back 0.1 only through a FLOAT column (render_union_types);
            # a DOUBLE column shows a FLOAT SELECT's values in full, which reach the router
            # in 6 digits. DOUBLE SELECTs only (no FLOAT in the metadata) are exact.
            if zero != 0.1 and i in every_float | rounded:
                raise UnsupportedQueryError(
                    f"UNION column {i + 1} across targets holds a FLOAT SELECT's values and one"
                    " database types it DOUBLE: they reach the router in 6 digits, which that"
                    " column shows in full; CAST(x AS DOUBLE) in every SELECT, or route the"
                    " UNION by a key"
                )
        elif isinstance(zero, float):
            found.add("float")
        elif isinstance(zero, Decimal):
            # A DECIMAL column, DECIMAL(20, 0) included (BIGINT UNSIGNED beside BIGINT): one
            # database's integers there are Decimals.
            found.add("decimal")
            scales[i] = _scale(zero)
        elif isinstance(zero, dt.datetime) and "date" in found:
            found.discard("date")  # a DATETIME column: one database's dates are midnights
            found.add("datetime")
            convert[i] = _midnight
    for k, rows in enumerate(members):
        quotients = quotient_items(plan.union[k].ast) if k < len(plan.union) else frozenset()
        for row in rows if quotients else ():
            for i in quotients:
                value = row[i]
                if isinstance(value, Decimal) and _scale(value) < scales[i]:
                    raise UnsupportedQueryError(
                        f"UNION column {i + 1} across targets: SELECT {k + 1} sends a quotient"
                        f" (a division or AVG) rounded to {_scale(value)} decimals, and one"
                        f" database's column holds {scales[i]}, rounded from the exact"
                        " quotient; ROUND or CAST it to one scale in every SELECT, or route"
                        " the UNION by a key"
                    )
    for i, found in enumerate(kinds):
        if i in convert:
            continue
        if len(found) > 1 and found <= {"integer", "decimal", "float"}:
            # Numbers of several types: MySQL's column is a DOUBLE with one, else a DECIMAL.
            convert[i] = float if "float" in found else Decimal
            continue
        if len(found) > 1:
            raise UnsupportedQueryError(
                f"UNION column {i + 1} has values of different types in its SELECTs"
                f" ({', '.join(sorted(found))}), which MySQL converts to one type; give the"
                " SELECTs columns of one type (CAST), or route the UNION by a key"
            )
    combined: list[tuple[Any, ...]] = []
    for rows in members:
        for row in rows:
            values = [
                convert[i](v) if i in convert and v is not None else v for i, v in enumerate(row)
            ]
            combined.append(
                tuple(
                    _at_scale(v, scales[i]) if isinstance(v, Decimal) else v
                    for i, v in enumerate(values)
                )
            )
    compared = set(range(len(kinds))) if plan.union_distinct else set()
    compared |= {pos for pos, _ in plan.union_order}
    _refuse_float_at((every_float | rounded) & compared, columns)
    for pos in compared:
        if kinds and kinds[pos] & {"str", "bytes"}:
            raise UnsupportedQueryError(
                f"UNION across shards compares strings in column {pos + 1} (to remove duplicates"
                " or to order), which one database does by its collation ('a' = 'A'); use"
                " UNION ALL without ordering by it, or route the UNION by a key"
            )
    if plan.union_distinct:
        combined = list(dict.fromkeys(combined))
    for pos, descending in reversed(plan.union_order):
        # NULL first ascending, last descending (MySQL's NULL is the smallest value).
        combined.sort(key=_null_first(pos), reverse=descending)
    offset, limit = window
    return combined[offset : None if limit is None else offset + limit]


def _union_window(plan: Plan, params: Mapping[str, Any]) -> tuple[int, int | None]:
    """The UNION's (OFFSET, LIMIT) as numbers, a parameter's value checked as LIMIT :n's."""
    names = tuple(n for n in (plan.union_limit, plan.union_offset) if isinstance(n, str))
    values = LateParams(names, ()).values(params) if names else {}
    limit, offset = (
        values[n] if isinstance(n, str) else n for n in (plan.union_limit, plan.union_offset)
    )
    assert isinstance(offset, int)
    return offset, limit


def _union_kinds(members: Sequence[Sequence[tuple[Any, ...]]]) -> list[set[str]]:
    """Per column, the kinds of value the members' rows hold (empty lists: no row at all)."""
    kinds: list[set[str]] = []
    for rows in members:
        for row in rows:
            if not kinds:
                kinds = [set() for _ in row]
            for i, value in enumerate(row):
                if value is not None:
                    kinds[i].add(_value_kind(value))
    return kinds


def _probe_for(kinds: set[str]) -> str:
    """The value render_union_types asks one database to type for a column of these kinds."""
    if "float" in kinds:
        return FLOAT_PROBE
    if kinds and kinds <= {"integer", "decimal"}:
        return ZERO
    if kinds & {"date", "datetime"}:
        return DATE_PROBE
    return NULL_PROBE  # strings, or only NULLs: nothing to convert


def _midnight(value: Any) -> Any:
    """A DATE as a DATETIME column holds it (other values as they are)."""
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return dt.datetime(value.year, value.month, value.day)
    return value


def _scale(value: Decimal) -> int:
    exponent = value.as_tuple().exponent
    return -exponent if isinstance(exponent, int) and exponent < 0 else 0


def _null_first(pos: int) -> Callable[[tuple[Any, ...]], tuple[bool, Any]]:
    def key(row: tuple[Any, ...]) -> tuple[bool, Any]:
        value = row[pos]
        return (False, 0) if value is None else (True, value)

    return key


def _value_kind(value: Any) -> str:
    if isinstance(value, bool | int):
        return "integer"
    if isinstance(value, Decimal):
        return "decimal"
    if isinstance(value, dt.datetime):
        return "datetime"
    return type(value).__name__


def _at_scale(value: Decimal, scale: int) -> Decimal:
    """A DECIMAL at the column's scale (MySQL gives a UNION column the largest of its
    SELECTs'), with MariaDB's 65 digits of precision (Python's default context has 28)."""
    if not value.is_finite():
        return value
    with localcontext() as context:
        context.prec = 65
        return value.quantize(Decimal(1).scaleb(-scale))


def _all_targets(topology: Topology, plan: Plan, table: TableRule, reading: bool) -> list[Target]:
    """Every shard for a write; for a read, the serving shards (read_shards), those holding
    a migration's copies told to skip them where the statement's tables carry ids
    (_exclusions)."""
    if not reading:
        return [Target(sid, i) for sid in topology.shards for i in range(table.split)]
    excluded = _exclusions(topology, plan) if topology.mirrored else {}
    shards = topology.serving if excluded else read_shards(topology, table.name)
    return [Target(sid, i, exclude=excluded.get(sid)) for sid in shards for i in range(table.split)]


def _exclusions(topology: Topology, plan: Plan) -> dict[ShardId, Exclusion]:
    """Per shard holding a migration's copies (Topology.mirrored), what a read across shards
    skips there: rows whose id (a gene column: orders.order_id, order_items.order_id) names a
    copied slot. Empty when a sharded table of the statement has no gene column (users:
    hashed keys are not computable in SQL), and read_shards refuses the read."""
    columns = []
    for rule in plan.tables:
        if rule.kind == "broadcast":
            continue
        gene = next(
            (k.column for k in rule.keys.values() if isinstance(k.strategy, GeneStrategy)), None
        )
        if gene is None:
            return {}
        columns.append((rule.name, gene))
    layout = topology.id_layout
    return {
        ShardId(shard): Exclusion(
            tuple(columns), layout.gene_shift, (1 << layout.gene_bits) - 1, tuple(ranges)
        )
        for shard, ranges in topology.mirrored.items()
    }


def read_shards(topology: Topology, table: str) -> tuple[ShardId, ...]:
    """The shards a read of ``table`` across shards runs on: every shard that owns slots
    (Topology.serving); refused while a serving shard holds copies of rows it does not own
    (a migration's mirror: the answer would count them twice). The ORM's fan-out too."""
    if topology.mirrored:
        holder, ranges = next(iter(topology.mirrored.items()))
        where = ", ".join(f"[{a}, {b})" for a, b in ranges)
        raise UnsupportedQueryError(
            f"a read of {table} across shards is refused while slots {where} are being"
            f" moved: shard {holder} holds copies of their rows besides its own (a"
            " migration between its start and its finalize), so the answer would count"
            " them twice. Read by a sharding key (each key reads its one owner), or finish"
            " the migration (`shardctl reshard finalize`, or `rollback` then `cancel`)"
        )
    return topology.serving


def _slot_targets(
    topology: Topology,
    table: TableRule,
    slots_by_pos: Mapping[int, Slot],
    in_list: bool,
    conjunct: int | None = None,
) -> list[Target]:
    """Group value positions by (shard, split): each target keeps only its own values."""
    grouped: dict[tuple[ShardId, int], list[int]] = defaultdict(list)
    for pos, slot in slots_by_pos.items():
        grouped[(topology.shard_of_slot(slot), slot % table.split)].append(pos)
    return [
        Target(shard, split, tuple(sorted(positions)) if in_list else None, conjunct)
        for (shard, split), positions in grouped.items()
    ]


def _direct_targets(topology: Topology, plan: Plan, params: Mapping[str, Any]) -> _Targets | None:
    """Targets found without I/O (broadcast, or a functional key); None if a lookup or a
    scatter decides. A plain function: the point-query path allocates no generator here."""
    table = plan.sharded
    if table is None:
        if plan.kind == "select":  # a broadcast table has the same rows on every serving shard
            return _Targets([Target(topology.serving[0], 0)], False, anywhere=True)
        return _Targets([Target(s, 0) for s in topology.shards], True)
    condition = plan.routing_condition
    if condition is None:
        return None
    rule, refs = condition.rule, condition.refs
    if len(refs) == 1:
        slot = rule.slot(refs[0].resolve(params))
        return _Targets([Target(topology.shard_of_slot(slot), slot % table.split)], False)
    slots = {i: rule.slot(ref.resolve(params)) for i, ref in enumerate(refs)}
    path = condition.in_node_path
    conjunct = path[0] if path is not None else None
    return _Targets(_slot_targets(topology, table, slots, path is not None, conjunct), False)


def _indirect_targets(
    topology: Topology, plan: Plan, params: Mapping[str, Any], ledger: LookupLedger | None
) -> Generator[list[Job], list[JobResult], _Targets]:
    """Targets through a lookup table (I/O), or every shard."""
    table = plan.sharded
    assert table is not None
    lookup = next((c for c in plan.conditions if c.rule.lookup_table is not None), None)
    if lookup is not None:
        reading = plan.kind == "select"
        return (yield from lookup_targets(topology, table, lookup, params, reading, ledger))
    return _Targets(_all_targets(topology, plan, table, plan.kind == "select"), True)


def lookup_targets(
    topology: Topology,
    table: TableRule,
    cond: KeyCondition,
    params: Mapping[str, Any],
    reading: bool = True,
    ledger: LookupLedger | None = None,
) -> Generator[list[Job], list[JobResult], _Targets]:
    """Read the lookup table, then target the owners' shards (orphans cost a wasted query).
    The router's reads and writes by a lookup key, and the ORM session's reads."""
    rule = cond.rule
    strategy = rule.strategy
    assert isinstance(strategy, LookupStrategy) and rule.lookup_table is not None
    lookup_table = topology.table(rule.lookup_table)
    values = [rule.value(ref.resolve(params)) for ref in cond.refs]
    jobs: list[Job] = []
    by_place: dict[tuple[ShardId, str], list[Any]] = defaultdict(list)
    for v in values:
        slot = topology.slot_for(lookup_table.name, v)
        by_place[(topology.shard_of_slot(slot), lookup_table.physical(slot))].append(v)
    for (shard, physical), vals in by_place.items():
        query = strategy.query(vals, physical)
        # A write must see every committed lookup row: read the primary, never a replica.
        jobs.append(Job(shard, query.statement, {}, "read" if reading else "write", "lookup"))
    results = yield jobs
    owner_keys = {row[1] for r in results for row in r.rows}
    if ledger is not None and ledger.claims and strategy.key_column is None:
        # A value the transaction gave to another owner: its lookup row names the old one
        # until the commit (LookupLedger.holder); the transaction reads its own writes.
        for (shard, physical), vals in by_place.items():
            for v in vals:
                held = ledger.holder_of(topology, strategy, shard, physical, v)
                if held is not None and held[0]:
                    owner_keys.add(held[1])
    owner = topology.table(table.bound_to or table.name)
    assert owner.primary is not None
    keys = sorted(owner_keys, key=repr)
    slots = {i: owner.primary.slot(k) for i, k in enumerate(keys)}
    targets = _slot_targets(topology, table, slots, in_list=False)
    anywhere = False
    if not targets:
        # No owner: run on one shard anyway so aggregates still return their one row; for a
        # read any shard gives that answer (a transaction need not bind to it).
        targets = [Target(topology.serving[0], 0)]
        anywhere = reading
    if topology.mirrored:
        targets = _owners_only(topology, owner, targets, keys, slots)
    return _Targets(targets, False, [j.shard for j in jobs], anywhere)


def _owners_only(
    topology: Topology,
    owner: TableRule,
    targets: list[Target],
    keys: Sequence[Any],
    slots: Mapping[int, Slot],
) -> list[Target]:
    """Targets on shards that hold a migration's copies of rows they do not own
    (Topology.mirrored: a source after the switch, a target that serves slots of its own
    before it) restricted to the owner keys the lookup routed there (Target.only): the
    statement's condition (merchant_id = ?) matches the copies too, and a read would return
    a moved order twice (once stale), a write would change a copy."""
    assert owner.primary is not None
    column = owner.primary.column
    out = []
    for t in targets:
        if t.shard in topology.mirrored:
            mine = tuple(
                keys[i]
                for i, slot in slots.items()
                if topology.shard_of_slot(slot) == t.shard and slot % owner.split == t.split
            )
            t = replace(t, only=(column, mine))
        out.append(t)
    return out


def _check_limits(plan: Plan, found: _Targets, limits: Limits, topology: Topology) -> None:
    if (
        plan.kind in ("update", "delete")
        and found.scatter
        and plan.sharded is not None
        and not limits.allow_scatter_write
    ):
        raise ScatterWriteError(
            f"{plan.kind.upper()} on {plan.sharded.name} has no sharding-key predicate"
            f" ({', '.join(plan.sharded.keys)}), so it would run on every shard;"
            " add the key, or pass allow_scatter_write=True if you mean it"
        )
    if len(found.targets) > 1:
        if plan.kind in ("update", "delete") and plan.has_limit:
            # Each target would apply its own LIMIT: n rows per shard, not n in all.
            raise UnsupportedQueryError(
                f"{plan.kind.upper()} with ORDER BY/LIMIT over {len(found.targets)} targets has"
                " no single order and would apply the LIMIT on each; route it to one key"
            )
        if plan.scatter_refusal is not None:
            raise UnsupportedQueryError(plan.scatter_refusal)
    shards = {t.shard for t in found.targets}
    if limits.max_fanout and len(shards) > limits.max_fanout:
        raise FanoutLimitError(
            f"query would reach {len(shards)} shards, more than max_fanout={limits.max_fanout};"
            " add a sharding-key predicate or raise max_fanout"
        )
    if (
        limits.max_offset is not None
        and len(found.targets) > 1
        and plan.offset_depth > limits.max_offset
    ):
        raise FanoutLimitError(
            f"OFFSET {plan.offset_depth} across shards makes every shard return"
            f" {plan.offset_depth}+ rows (max_offset={limits.max_offset}); page by key instead"
            " (Router.page), or raise max_offset"
        )


# -- inserts and owned lookups ----------------------------------------------------------------
#
# One implementation of lookup rows for the router and the ORM (shardrouter.orm.session drives these
# same generators): which lookup rows an owner row has, how they are written and checked, how
# they are deleted. Lookup rows are written before their owner and deleted after it, so a crash
# leaves an orphan lookup row (reads ignore it), never an owner its lookup cannot find; the
# rows a failed or rolled-back write created are removed again (discard_lookups).


@dataclass(frozen=True, slots=True)
class LookupRow:
    """One lookup row an owner row has (or had), and where it lives."""

    strategy: LookupStrategy
    shard: ShardId
    physical: str
    row: Mapping[str, Any]
    """The lookup table's columns: from, to[, key]."""
    owner: TableRule
    """The table whose rows own this lookup (users for user_emails)."""
    column: str
    """The owner's column the lookup is of (users.email)."""


def _owned_lookups(table: TableRule) -> list[KeyRule]:
    return [r for r in table.keys.values() if isinstance(r.strategy, LookupStrategy)]


def _lookup_columns(table: TableRule) -> list[str]:
    """The owner columns its lookup rows are made of (merchant_id, user_id, order_id)."""
    wanted: list[str] = []
    for rule in _owned_lookups(table):
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        for c in (rule.column, *strategy.row_columns[1:]):
            if c not in wanted:
                wanted.append(c)
    return wanted


def lookup_rows(
    topology: Topology,
    table: TableRule,
    owners: Sequence[Mapping[str, Any]],
    *,
    deleting: bool = False,
) -> list[LookupRow]:
    """The lookup rows of ``owners`` (rows of ``table`` as {column: value}).

    A lookup whose column the rows do not have is skipped; one whose column they have without
    the other columns its lookup row needs is refused. A NULL lookup value cannot be routed
    (KeyValueError), except when ``deleting``: a row with one never had a lookup row.
    """
    out: list[LookupRow] = []
    for rule in _owned_lookups(table):
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        lookup_table = topology.table(strategy.table)
        for owner in owners:
            if rule.column not in owner:
                continue
            missing = [c for c in strategy.row_columns[1:] if c not in owner]
            if missing:
                raise RoutingError(
                    f"a row of {table.name} with lookup column {rule.column} needs"
                    f" {', '.join(missing)} too (its lookup row in {strategy.table} holds them)"
                )
            value = owner[rule.column]
            if value is None and deleting:
                continue
            value = rule.value(value)  # '42' as 42: the lookup row is compared with others
            slot = topology.slot_for(lookup_table.name, value)
            row = {strategy.from_column: value}
            for c in strategy.row_columns[1:]:
                key = table.keys.get(c)
                row[c] = owner[c] if key is None or owner[c] is None else key.value(owner[c])
            shard, physical = topology.shard_of_slot(slot), lookup_table.physical(slot)
            out.append(LookupRow(strategy, shard, physical, row, table, rule.column))
    return out


def lookup_insert(
    strategy: LookupStrategy, physical: str, backend: str, rows: Sequence[Mapping[str, Any]]
) -> Any:
    """The idempotent insert of lookup rows that says which rows it created.

    An existing row is kept (a row left by an earlier crash is identical; a unique lookup's
    value taken by another owner is detected by reading it back afterwards); RETURNING gives
    exactly the rows this statement inserted (MariaDB >= 10.5, SQLite >= 3.35): only those
    are this statement's to remove if its owner rows are not written. The values are bound."""
    target = table_clause(physical, strategy.row_columns)
    # One row (an order's lookup row: the common case) as a dict, not a list of one: SQLAlchemy
    # caches the compiled form of a single-row INSERT, never that of a multi-VALUES one, which
    # it compiled again for every write (the CPU saved was within this machine's noise).
    values: Any = dict(rows[0]) if len(rows) == 1 else [dict(r) for r in rows]
    stmt: Any
    if backend == "sqlite":
        stmt = sqlite.insert(target).values(values).on_conflict_do_nothing()
    else:
        # IGNORE here skips only duplicates in practice: every value was checked by its key
        # rule and is the owner row's own value, which the owner's strict insert also takes.
        stmt = mysql.insert(target).prefix_with("IGNORE").values(values)
    return stmt.returning(*(target.c[c] for c in strategy.row_columns))


@dataclass(slots=True)
class Written:
    """What a lookup write did, row by row."""

    created: list[LookupRow] = field(default_factory=list)
    """Rows it inserted: its own to remove if the owner rows
    are not written."""
    adopted: list[LookupRow] = field(default_factory=list)
    """Rows that were already there: written again once the owner row is (a concurrent
    discard of them, which checked the owner before it existed, is undone)."""


def write_lookups(
    topology: Topology,
    rows: Sequence[LookupRow],
    written: Written | None = None,
    ledger: LookupLedger | None = None,
) -> Generator[list[Job], list[JobResult], list[ShardId]]:
    """Write lookup rows (one committed write per lookup table place), then prove each unique
    lookup's value is this owner's: a row naming another owner raises ExecutionError (whether
    that owner exists or not, see _refuse_taken); a row gone at the check is written again.
    Returns the shards written.

    ``ledger``: the caller's transaction, whose own statements count as one database's would
    (see _own_claims): a value it freed may be taken, one it gave to another owner may not.

    ``written`` is filled as the rows are written, also when this raises: the caller removes
    the created rows if the owner write does not happen (discard_lookups)."""
    written = written if written is not None else Written()
    grouped: dict[tuple[ShardId, str, LookupStrategy], list[LookupRow]] = defaultdict(list)
    for r in rows:
        grouped[(r.shard, r.physical, r.strategy)].append(r)
    if not grouped:
        return []
    for (_, _, strategy), group in grouped.items():
        if strategy.key_column is None:
            _one_owner_per_value(topology, group)
    jobs = []
    for (shard, physical, strategy), group in grouped.items():
        backend = topology.shards[shard].primary.get_backend_name()
        stmt = lookup_insert(strategy, physical, backend, [r.row for r in group])
        jobs.append(Job(shard, stmt, {}, "write", "lookup", returning=True))
    inserted = yield jobs
    for group, result in zip(grouped.values(), inserted, strict=True):
        _sort_written(group, result.rows, written)
    unique = [(place, g) for place, g in grouped.items() if place[2].key_column is None]
    conflicts: list[tuple[LookupRow, Any, Any]] = []
    for attempt in range(_RECHECKS + 1):
        if not unique:
            break
        checks = []
        for (shard, physical, strategy), group in unique:
            query = strategy.query([r.row[strategy.from_column] for r in group], physical)
            # "write": the uniqueness check must read the primary, not a lagging replica.
            checks.append(Job(shard, query.statement, {}, "write", "lookup"))
        results = yield checks
        gone: list[tuple[tuple[ShardId, str, LookupStrategy], list[LookupRow]]] = []
        for (place, group), result in zip(unique, results, strict=True):
            conflicts.extend(_conflicts(group, result.rows))
            missing = _missing(group, result.rows)
            if missing:
                gone.append((place, missing))
        if not gone:
            break
        if attempt == _RECHECKS:
            first = gone[0][1][0]
            raise ExecutionError(
                f"{first.owner.name}: the lookup row of {first.row[first.strategy.from_column]!r}"
                f" was removed {_RECHECKS + 1} times between its write and its check (its"
                " former owner being deleted meanwhile); nothing was written, retry",
                shard=first.shard,
            )
        # No row for a value we just upserted: the row our upsert found (another owner's) was
        # removed by that owner's DELETE meanwhile. "No row" is not "ours": write it again and
        # check again, until the row names us or a live other owner.
        again = []
        for (shard, physical, strategy), group in gone:
            backend = topology.shards[shard].primary.get_backend_name()
            stmt = lookup_insert(strategy, physical, backend, [r.row for r in group])
            again.append(Job(shard, stmt, {}, "write", "lookup", returning=True))
        inserted = yield again
        for (_, group), result in zip(gone, inserted, strict=True):
            _sort_written(group, result.rows, written)
        unique = gone
    if ledger is not None and ledger.claims:
        conflicts = yield from _own_claims(topology, ledger, rows, conflicts)
    if conflicts:
        yield from _refuse_taken(topology, conflicts)
    return [j.shard for j in jobs]


def _own_claims(
    topology: Topology,
    ledger: LookupLedger,
    rows: Sequence[LookupRow],
    conflicts: Sequence[tuple[LookupRow, Any, Any]],
) -> Generator[list[Job], list[JobResult], list[tuple[LookupRow, Any, Any]]]:
    """The conflicts left once the transaction's own statements are counted, as one database
    with a UNIQUE key counts them (LookupLedger.holder); refuses a value an owner row the
    transaction wrote holds.

    A value whose owner the transaction deleted is free in it: its lookup row stays (naming
    that owner) until the transaction ends, outside readers still find the owner there (the
    delete is not visible to them), and no other writer can take the value (its row names an
    owner that exists for them; the owner's key is locked by the delete); committed, the row
    is handed to the new owner in one UPDATE, rolled back, it stays (LookupLedger.settle). A
    value whose insert the transaction undid is free once its owner is seen absent outside
    too (another writer may have inserted that owner with the value since, adopting the
    row): the owner check of discard_lookups, a locking read (a lock held counts as present)."""
    to = {id(ours) for ours, _, _ in conflicts}
    for r in rows:
        if r.strategy.key_column is None and id(r) not in to:
            held = ledger.holder(topology, r)
            if held is not None and held[0] and held[1] != r.row[r.strategy.to_column]:
                _refuse_held(r, r.row[r.strategy.from_column], held[1])
    left: list[tuple[LookupRow, Any, Any]] = []
    undone: list[tuple[LookupRow, Any, Any]] = []
    for conflict in conflicts:
        ours, stored, other = conflict
        held = ledger.holder(topology, ours)
        if held is None:
            left.append(conflict)
        elif held[0]:
            if held[1] != ours.row[ours.strategy.to_column]:
                _refuse_held(ours, stored, held[1])
        elif held[1] != other:
            left.append(conflict)
        elif held[2]:
            undone.append(conflict)
    if undone:
        checks = [
            _owner_check(
                topology,
                [
                    replace(
                        ours,
                        row={ours.strategy.from_column: stored, ours.strategy.to_column: other},
                    )
                ],
            )
            for ours, stored, other in undone
        ]
        try:
            found = yield checks
        except Exception:  # unknown (a lock held, say): not free
            left.extend(undone)
        else:
            left.extend(c for c, f in zip(undone, found, strict=True) if f.rows)
    return left


def _refuse_held(ours: LookupRow, stored: Any, holder: Any) -> None:
    raise ExecutionError(
        f"{ours.owner.name}: {stored!r} already belongs to another owner ({holder!r}), written"
        " by this transaction; nothing was written",
        shard=ours.shard,
    )


def _one_owner_per_value(topology: Topology, group: Sequence[LookupRow]) -> None:
    """Refuse values written together for two owners that a ``fold_case`` lookup holds as one
    ('zoë@…' and 'ZOE@…'): the upsert keeps the first, and the read-back cannot see the second
    was never this owner's. Checked before anything is written."""
    strategy = group[0].strategy
    rule = topology.table(strategy.table).primary
    if rule is None or not (isinstance(rule.strategy, HashStrategy) and rule.strategy.fold_case):
        return
    first: dict[Any, LookupRow] = {}
    for r in group:
        other = first.setdefault(_loose(r.row[strategy.from_column]), r)
        if other.row[strategy.to_column] != r.row[strategy.to_column]:
            raise ExecutionError(
                f"{r.owner.name}: {other.row[strategy.from_column]!r} and"
                f" {r.row[strategy.from_column]!r} are one value of {strategy.table} for two"
                f" owners ({other.row[strategy.to_column]!r}, {r.row[strategy.to_column]!r});"
                " nothing was written",
                shard=r.shard,
            )


def _sort_written(
    group: Sequence[LookupRow], returned: Sequence[tuple[Any, ...]], written: Written
) -> None:
    """Split ``group`` into the rows its insert created (RETURNING) and those it found."""
    first = group[0]
    columns = first.strategy.row_columns
    made = {tuple(_loose(v) for v in row) for row in returned}
    for row in returned:
        written.created.append(replace(first, row=dict(zip(columns, row, strict=True))))
    for r in group:
        if tuple(_loose(r.row[c]) for c in columns) not in made:
            written.adopted.append(r)


def _conflicts(
    group: Sequence[LookupRow], found: Sequence[tuple[Any, ...]]
) -> list[tuple[LookupRow, Any, Any]]:
    """(our row, the stored value, its owner) for each value the lookup gives another owner.

    The lookup column may compare without case or trailing spaces (user_emails.email): the
    stored value is matched to ours the way its table's hash folds it (``fold_case``), so
    'ADA@example.com ' finds the row of 'Ada@Example.com'."""
    strategy = group[0].strategy
    exact = {r.row[strategy.from_column]: r for r in group}
    loose = {_loose(k): r for k, r in exact.items()}
    out = []
    for stored, owner in found:
        ours = exact.get(stored) or loose.get(_loose(stored))
        if ours is None and len(group) == 1:
            ours = group[0]  # the database found it equal to our one value (accents, say)
        if ours is None:
            # Equal to one of ours under the column's collation, but which one is unknown.
            if any(r.row[strategy.to_column] != owner for r in group):
                raise ExecutionError(
                    f"{group[0].owner.name}: {stored!r} already belongs to an owner ({owner!r})"
                    " and matches one of several values written together; nothing was written",
                    shard=group[0].shard,
                )
        elif ours.row[strategy.to_column] != owner:
            out.append((ours, stored, owner))
    return out


def _missing(group: Sequence[LookupRow], found: Sequence[tuple[Any, ...]]) -> list[LookupRow]:
    """The rows of ``group`` whose value has no lookup row at all in ``found`` (the check's
    (stored value, owner) rows), matched as _conflicts matches them. A stored value that
    matches none of ours by folding (an accent variant the column's collation equates) is
    counted for one of several values only when one value was written."""
    strategy = group[0].strategy
    if len(group) == 1:
        return [] if found else list(group)
    seen = {_loose(stored) for stored, _ in found}
    missing = [r for r in group if _loose(r.row[strategy.from_column]) not in seen]
    unmatched = len(seen - {_loose(r.row[strategy.from_column]) for r in group})
    # An unmatched stored value stands for one of ours we cannot name: treat as many missing
    # ones as found (written again: idempotent) rather than guess which one it is.
    return missing if len(missing) > unmatched else []


def _refuse_taken(
    topology: Topology, conflicts: Sequence[tuple[LookupRow, Any, Any]]
) -> Generator[list[Job], list[JobResult], None]:
    """Refuse values the lookup gives another owner, saying whether that owner exists.

    A row naming an owner that is absent is never taken over here: the owner's insert may be
    in flight (its lookup row is written before its owner row, on another shard, and no lock
    spans the two), and taking its row would let two owners hold one value. Such a row is
    either that (retry in a moment) or an orphan left by a crash, which ``shardctl check
    lookups --fix`` removes once it is still an orphan after its grace period (defect 12).
    """
    reads = []
    for ours, stored, other in conflicts:
        owner = ours.owner
        rule = topology.table(owner.bound_to or owner.name).primary
        assert rule is not None
        slot = rule.slot(other)
        strategy = ours.strategy
        target = table_clause(owner.physical(slot), (strategy.to_column, ours.column))
        query = select(target.c[strategy.to_column]).where(
            target.c[strategy.to_column] == other, target.c[ours.column] == stored
        )
        reads.append(Job(topology.shard_of_slot(slot), query, {}, "write", "lookup"))
    results = yield reads
    for (ours, stored, other), result in zip(conflicts, results, strict=True):
        if result.rows:
            raise ExecutionError(
                f"{ours.owner.name}: {stored!r} already belongs to another owner ({other!r});"
                " nothing was written",
                shard=ours.shard,
            )
    ours, stored, other = conflicts[0]
    raise ExecutionError(
        f"{ours.owner.name}: {stored!r} already belongs to owner {other!r} in"
        f" {ours.strategy.table}, which has no such row: an insert still in flight (retry"
        " in a moment) or an orphan left by a crash (`shardctl check lookups --fix` removes"
        " it); nothing was written",
        shard=ours.shard,
    )


def _owner_place(topology: Topology, r: LookupRow) -> tuple[ShardId, str]:
    """The shard and physical table of the owner row ``r`` names."""
    rule = topology.table(r.owner.bound_to or r.owner.name).primary
    assert rule is not None
    slot = rule.slot(r.row[r.strategy.to_column])
    return topology.shard_of_slot(slot), r.owner.physical(slot)


def _owner_check(topology: Topology, rows: Sequence[LookupRow]) -> Job:
    """A locking read (shared, NOWAIT) of the owner rows of ``rows`` (one owner place)
    carrying their lookup values, on the owner's shard primary: an owner whose insert is
    uncommitted holds the lock, so the read fails (counted as present) instead of missing it.
    Shared: the checks of one owner's rows run together and must not fail on each other's
    locks."""
    shard, query = _owner_select(topology, rows, OwnerCheck)
    query = query.with_for_update(read=True)  # OwnerCheck's compile makes it not wait
    return Job(shard, query, {}, "write", "lookup")


class OwnerCheck(Select[Any]):
    """A SELECT ... LOCK IN SHARE MODE that never waits for a ROW lock but does wait for the
    table's metadata lock. MariaDB's NOWAIT gives up on both: while a DDL waits for the table
    (the journal triggers' CREATE/DROP TRIGGER during a migration), every NOWAIT check failed
    at once, counted as "an owner in flight", and a DELETE's cleanup kept an orphan lookup
    row. On MariaDB it runs as ``SET STATEMENT innodb_lock_wait_timeout=0 FOR ...`` (row
    locks: fail at once; metadata lock: wait, bounded by the DDL's own lock wait, as every
    other statement on the table does); MySQL's NOWAIT is row locks only already."""

    inherit_cache = True


@compiles(OwnerCheck, "mysql")
@compiles(OwnerCheck, "mariadb")  # (mariadb+driver:// URLs: a dialect name of its own)
def _compile_owner_check(element: OwnerCheck, compiler: Any, **kw: Any) -> str:
    sql = str(compiler.visit_select(element, **kw))
    if getattr(compiler.dialect, "is_mariadb", False):
        return "SET STATEMENT innodb_lock_wait_timeout=0 FOR " + sql
    return sql + " NOWAIT"


def _owner_select(
    topology: Topology, rows: Sequence[LookupRow], kind: type[Select[Any]] = Select
) -> tuple[ShardId, Any]:
    """The shard and the SELECT (a ``kind``) of the owner rows of ``rows`` (one owner place)
    carrying their lookup values."""
    first = rows[0]
    s = first.strategy
    shard, physical = _owner_place(topology, first)
    matched = [s.to_column, first.column] + ([s.key_column] if s.key_column else [])
    target = table_clause(physical, matched)
    key = s.from_column
    query = kind(target.c[s.to_column]).where(
        or_(
            *(
                and_(*(target.c[c] == r.row[key if c == r.column else c] for c in matched))
                for r in rows
            )
        )
    )
    return shard, query


def _owner_read(topology: Topology, r: LookupRow) -> Job:
    """A plain read of the owner row of ``r`` carrying its lookup value, as a statement of
    the caller's transaction (which wrote that row)."""
    shard, query = _owner_select(topology, [r])
    return Job(shard, query, {}, "read", "statement")


def discard_lookups(
    topology: Topology, rows: Sequence[LookupRow]
) -> Generator[list[Job], list[JobResult], int]:
    """Remove the lookup rows in ``rows`` whose owner row (with that lookup value) is absent;
    best effort: an error is logged and the rows stay (orphans, as after a crash: reads ignore
    them, ``shardctl check lookups --fix`` removes them). Returns the number removed.

    The owners are read first (no lock taken on the lookup rows: most owners of a settle's
    rows are there). The rows whose owner was absent are then removed in one write per
    lookup place and owner place (Job.expect): the DELETE, then a locking read of the owners
    (NOWAIT: an owner whose insert is in flight holds its lock, and counts as present), both
    in open transactions, committed only when no owner is there, else rolled back. No lock
    spans two shards, but the deleted rows stay locked (uncommitted) until the owners were
    seen absent: a writer that adopts such a row (Written.adopted) waits for the decision,
    and another owner cannot take a unique value whose row a discard removes and then puts
    back (the old way: delete, read the owner again, write the row back, let another writer
    take the value in between). A writer that adopted a row before the discard checks its
    row again under lock once its own owner row is written and locked (_insert's guard, the
    transaction's LookupLedger.verify): one of the two sees the other."""
    if not rows:
        return 0
    checked = yield from _owners_absent(topology, rows)
    doomed = [r for r, absent in zip(rows, checked, strict=True) if absent]
    return (yield from remove_lookups(topology, doomed, "lookup"))


def remove_lookups(
    topology: Topology, rows: Sequence[LookupRow], role: JobRole = "lookup_cleanup"
) -> Generator[list[Job], list[JobResult], int]:
    """Remove lookup rows whose owner rows (with those values) are gone: the cleanup after
    an owner's DELETE committed, and the second half of discard_lookups. Each lookup place
    and owner place in one write: the DELETE, then the owner check, committed only when no
    owner is there (_discard_together), row by row when one is. A cleanup cannot remove the
    row of an owner inserted again since its delete (that writer adopted the row): the check
    sees the owner (locked while in flight, then committed) and keeps it. Best effort: an
    error is logged and the rows stay (orphans, removed by ``check lookups --fix``). Returns
    the number removed."""
    groups: dict[tuple[Any, ...], list[LookupRow]] = defaultdict(list)
    for r in rows:
        groups[(r.shard, r.physical, r.strategy, *_owner_place(topology, r))].append(r)
    removed = 0
    down: set[str] = set()
    for (lookup_shard, _, _, owner_shard, _), group in groups.items():
        if {lookup_shard, owner_shard} & down:  # one timeout per shard that does not answer
            log.warning("%d lookup rows kept: shard %s does not answer", len(group), down)
            continue
        removed += yield from _remove_group(topology, group, role, down)
    return removed


def _remove_group(
    topology: Topology,
    rows: Sequence[LookupRow],
    role: JobRole,
    down: set[str],
) -> Generator[list[Job], list[JobResult], int]:
    """_discard_together on ``rows``; when an owner is there (or locked), row by row: at most
    twice the statements of one write per row, however many owners stay (a bulk re-insert in
    flight), where splitting in halves cost n log n."""
    count = yield from _discard_together(topology, rows, role, down)
    if count is not None:
        return count
    removed = 0
    if len(rows) > 1:
        for r in rows:
            if {r.shard, _owner_place(topology, r)[0]} & down:
                continue
            removed += (yield from _discard_together(topology, [r], role, down)) or 0
    return removed


def _discard_together(
    topology: Topology, rows: Sequence[LookupRow], role: JobRole, down: set[str]
) -> Generator[list[Job], list[JobResult], int | None]:
    """Delete ``rows`` (one lookup place, one owner place) and read their owners in one
    write, committed only if no owner is there (see discard_lookups). One statement per row,
    all of a shard's on one connection: an equality on each row's key locks that row only
    (an OR of rows may be read with a full scan on a small table, locking every row there,
    so that any unrelated writer would fail the check). Returns the number of rows removed;
    None when an owner is there or locked (nothing removed: the caller tries halves); 0 on
    another error (logged: the rows stay, orphans at worst)."""
    deletes = []
    for r in rows:
        target = table_clause(r.physical, r.strategy.row_columns)
        stmt = delete(target).where(and_(*(target.c[c] == v for c, v in r.row.items())))
        deletes.append(Job(r.shard, stmt, {}, "write", role, in_order=True))
    checks = [replace(_owner_check(topology, [r]), expect=0, in_order=True) for r in rows]
    try:
        results = yield deletes + checks
    except (GuardFailed, LockConflictError):
        return None  # an owner is there, or locked (in flight): every row kept
    except Exception as exc:  # a shard down: kept (orphans at worst, logged)
        if isinstance(exc, ShardUnavailableError) and exc.shard is not None:
            down.add(exc.shard)  # (the rest of this removal skips it: one timeout, not many)
        log.warning("lookup rows kept (not removed with their owners absent): %s", exc)
        return 0
    return sum(r.rowcount for r in results[: len(deletes)])


def _owners_absent(
    topology: Topology, rows: Sequence[LookupRow]
) -> Generator[list[Job], list[JobResult], list[bool]]:
    """For each row, whether its owner row is absent (a check that fails, e.g. on another
    transaction's lock, counts as present). The checks run together; if one fails they are
    run again one by one, so that one owner locked by an unrelated writer does not keep the
    rows of every other owner checked with it."""
    jobs = [_owner_check(topology, [r]) for r in rows]
    try:
        checked = yield jobs
        return [not found.rows for found in checked]
    except Exception as exc:
        if len(jobs) == 1:
            log.warning("lookup row kept (its owner could not be checked): %s", exc)
            return [False]
    absent = []
    for job in jobs:
        try:
            (found,) = yield [job]
        except Exception as exc:
            log.warning("lookup row kept (its owner could not be checked): %s", exc)
            absent.append(False)
        else:
            absent.append(not found.rows)
    return absent


def restore_lookups(
    topology: Topology, rows: Sequence[LookupRow]
) -> Generator[list[Job], list[JobResult], list[LookupRow]]:
    """Write lookup rows again (idempotent), after their owners were written; best effort:
    an error is logged (the rows are then missing: ``check lookups`` reports them).

    Returns the rows of every insert that wrote something (the whole group of a lookup table
    place, as RETURNING values come back in the server's types): a row that was missing may
    have been removed because its owner was deleted meanwhile, so the caller checks those
    owners again (see LookupLedger.settle)."""
    grouped: dict[tuple[ShardId, str, LookupStrategy], list[LookupRow]] = defaultdict(list)
    for r in rows:
        grouped[(r.shard, r.physical, r.strategy)].append(r)
    groups = list(grouped.values())
    jobs = []
    for group in groups:
        first = group[0]
        backend = topology.shards[first.shard].primary.get_backend_name()
        stmt = lookup_insert(first.strategy, first.physical, backend, [r.row for r in group])
        jobs.append(Job(first.shard, stmt, {}, "write", "lookup", returning=True))
    if not jobs:
        return []
    try:
        results = yield jobs
    except Exception as exc:
        log.error("lookup rows not written again (check lookups reports them): %s", exc)
        return []
    return [r for group, res in zip(groups, results, strict=True) if res.rows for r in group]


@dataclass(slots=True)
class LookupLedger:
    """The lookup rows a transaction's statements wrote and deleted, settled when it ends.

    Lookup rows are written outside the transaction, before it (their table lives on another
    shard). Rolled back, its created rows are discarded (those whose owner is absent), and the
    rows of owner rows it deleted stay (the rollback brought their owners back). Committed:

    - the rows of statements that failed or upserted (ON DUPLICATE KEY UPDATE keeps a row's
      old lookup value) are discarded the same way;
    - every other row is settled by what the transaction did last to its owner row with that
      value (``changes``, in statement order): written, the row is written again (one
      idempotent insert per lookup table place: a transaction may stay open long enough for
      ``check lookups --fix`` to take its lookup rows for orphans and remove them before its
      owner rows commit, see discard_lookups); deleted, the row is removed. A row the
      transaction inserted and then deleted leaves nothing, one it deleted and inserted again
      keeps its lookup row;
    - a unique value the transaction freed and gave to another owner (see ``holder``) keeps
      its one lookup row, whose owner is changed in place (one UPDATE: the value is never
      without a row another writer could take meanwhile, see _takeovers).

    Only the transaction's own statements can remove an owner row it wrote before it commits
    (others wait for its locks), and every one that does is recorded here: a DELETE of an
    owner says which rows it removed (RETURNING, see ``run``), the ORM its deleted objects;
    statements that would remove or change owner rows unseen (UPDATE of a lookup column,
    multi-table DELETE of an owner, INSERT IGNORE, REPLACE) are refused by the planner."""

    created: list[LookupRow] = field(default_factory=list)
    """Every row the transaction's statements inserted (a rollback discards them)."""
    adopted: list[LookupRow] = field(default_factory=list)
    """Rows its statements found already there for owner rows they wrote: checked again
    before the commit (verify)."""
    upserted: list[LookupRow] = field(default_factory=list)
    """Rows an upsert found already there: checked again like ``adopted`` when the owner row
    has that value at the commit (the upsert inserted it or already held it)."""
    doubtful: list[LookupRow] = field(default_factory=list)
    """Created by a statement that failed or upserted: discarded at commit unless owned."""
    changes: list[tuple[bool, LookupRow]] = field(default_factory=list)
    """(True, row) for a row written for an owner row the transaction wrote, (False, row) for
    one of an owner row it deleted; in statement order."""
    claims: list[tuple[bool, bool, LookupRow]] = field(default_factory=list)
    """What the transaction's statements did to each lookup value, in statement order, for
    ``holder``: (True, _, row) its owner took the value; (False, undone, row) its owner gave
    it up: deleted (undone False) or its insert failed and was undone (undone True)."""
    _view: dict[tuple[Any, ...], tuple[bool, Any, bool]] = field(
        default_factory=dict, repr=False, compare=False
    )
    """``claims`` folded up to ``_seen``: value -> holder (see holder_of)."""
    _seen: int = field(default=0, repr=False, compare=False)

    @property
    def pending(self) -> bool:
        """Whether settle() has anything to do."""
        return bool(self.created or self.doubtful or self.changes or self.claims)

    def add(self, written: Written, *, doubtful: bool, undone: bool = False) -> None:
        """``undone``: the rows of a statement that failed (its owner rows were not written,
        or were undone with it); implies doubtful."""
        self.created.extend(written.created)
        if not (doubtful or undone):
            self.adopted.extend(written.adopted)
        elif not undone:  # an upsert's: whether its owner took them is known at the commit
            self.upserted.extend(written.adopted)
        if doubtful or undone:
            self.doubtful.extend(written.created)
        else:
            self.changes.extend((True, r) for r in written.created)
        self.changes.extend((True, r) for r in written.adopted)
        if undone:
            self.claims.extend((False, True, r) for r in written.created)
        elif not doubtful:  # an upsert's created rows: whether its owner took them is unknown
            self.claims.extend((True, False, r) for r in written.created)
        self.claims.extend((True, False, r) for r in written.adopted)

    def remove(self, rows: Sequence[LookupRow]) -> None:
        """The lookup rows of owner rows a statement of the transaction deleted: removed once
        it commits, unless a later statement writes the same row again."""
        self.changes.extend((False, r) for r in rows)
        self.claims.extend((False, False, r) for r in rows)

    def holder(self, topology: Topology, r: LookupRow) -> tuple[bool, Any, bool] | None:
        """Who holds the unique lookup value of ``r`` as this transaction sees it, None when
        its statements did not touch the value: (True, owner, False), an owner row it wrote
        has the value; (False, owner, undone), ``owner`` gave the value up in it (deleted, or
        its insert undone) and no later statement took it: the value is free here, though
        its lookup row (naming ``owner``) stays until the transaction ends, as the delete or
        the owner's absence is not yet visible outside it."""
        return self.holder_of(
            topology, r.strategy, r.shard, r.physical, r.row[r.strategy.from_column]
        )

    def holder_of(
        self,
        topology: Topology,
        strategy: LookupStrategy,
        shard: ShardId,
        physical: str,
        value: Any,
    ) -> tuple[bool, Any, bool] | None:
        """``holder`` of ``value`` at its place (shard, physical table) of ``strategy``."""
        view = self._view
        for kept, undone, row in self.claims[self._seen :]:
            key = _value_key(topology, row)
            owner = row.row[row.strategy.to_column]
            if kept:
                view[key] = (True, owner, False)
            else:
                held = view.get(key)
                if held is None or held[1] == owner:  # a deleted non-holder frees nothing
                    view[key] = (False, owner, undone)
        self._seen = len(self.claims)
        return view.get((shard, physical, _value(topology, strategy, value)))

    def verify(self, topology: Topology) -> Generator[list[Job], list[JobResult], None]:
        """Before the commit: every lookup row a statement found already there (adopted) for
        an owner row the transaction still writes is read again; one a discard removed
        meanwhile (it saw the owner absent before the statement wrote it) is written again,
        and a value another owner took since is refused (ExecutionError: the commit does not
        happen). The owner rows are written and locked by now, so a discard from here on sees
        them and keeps the rows (see discard_lookups)."""
        if not self.adopted and not self.upserted:
            return
        adopted = list(self.adopted)
        if self.upserted:
            # An upsert's: only those whose owner row has the value, read in the transaction
            # (its own row: the caller drives this step with the transaction's runner).
            owners = yield [_owner_read(topology, r) for r in self.upserted]
            adopted.extend(r for r, o in zip(self.upserted, owners, strict=True) if o.rows)
        last: dict[tuple[Any, ...], bool] = {}
        for kept, r in self.changes:
            last[_ledger_key(topology, r)] = kept
        # A value the transaction freed from another owner and gave to this one is still in
        # the row of that other owner (handed over at the settle, see _takeovers): not
        # checked. One the same owner freed (an insert of it undone, a delete of it) is.
        freed: dict[tuple[Any, ...], set[Any]] = defaultdict(set)
        for kept, r in self.changes:
            if not kept:
                freed[_value_key(topology, r)].add(r.row[r.strategy.to_column])
        for kept, _, r in self.claims:
            if not kept:
                freed[_value_key(topology, r)].add(r.row[r.strategy.to_column])

        def handed_over(r: LookupRow) -> bool:
            owners = freed.get(_value_key(topology, r), set())
            return r.strategy.key_column is None and bool(owners - {r.row[r.strategy.to_column]})

        rows = {
            _ledger_key(topology, r): r
            for r in adopted
            if last.get(_ledger_key(topology, r), False) and not handed_over(r)
        }
        if not rows:
            return
        # One read per row (an equality on its key reads that row only; see _adopted_guards).
        reads = [read for r in rows.values() for read in _row_reads(topology, [r])]
        results = yield [job for _, job in reads]
        there = set()
        for (group, _), result in zip(reads, results, strict=True):
            first = group[0]
            columns = first.strategy.row_columns
            for found in result.rows:
                row = dict(zip(columns, found, strict=True))
                there.add(_ledger_key(topology, replace(first, row=row)))
        missing = [r for key, r in rows.items() if key not in there]
        if not missing:
            return
        written = Written()
        try:  # judged as any writer's: the value is not one this transaction freed
            yield from write_lookups(topology, missing, written)
        except BaseException:
            self.add(Written(written.created), doubtful=True, undone=True)
            raise
        self.add(written, doubtful=False)

    def settle(
        self, topology: Topology, committed: bool
    ) -> Generator[list[Job], list[JobResult], None]:
        created, doubtful, changes = self.created, self.doubtful, self.changes
        undone = [r for kept, was_undone, r in self.claims if not kept and was_undone]
        self.created, self.doubtful, self.changes, self.claims = [], [], [], []
        self.adopted, self.upserted = [], []
        self._view, self._seen = {}, 0
        if not committed:
            yield from discard_lookups(topology, created)
            return
        last: dict[tuple[Any, ...], tuple[bool, LookupRow]] = {}
        for change in changes:
            last[_ledger_key(topology, change[1])] = change
        gone = [r for kept, r in last.values() if not kept]
        kept_rows = [r for kept, r in last.values() if kept]
        swaps = _takeovers(topology, kept_rows, gone, undone)
        taken = {id(old) for old, _ in swaps}
        moved = {id(new) for _, new in swaps}
        yield from discard_lookups(topology, [r for r in doubtful if id(r) not in taken])
        gone = [r for r in gone if id(r) not in taken]
        if gone:  # (those whose owner was written again since stay: see remove_lookups)
            yield from remove_lookups(topology, gone, "lookup")
        restore = [r for r in kept_rows if id(r) not in moved]
        handed: list[LookupRow] = []
        if swaps:
            try:
                results = yield [_takeover_job(old, new) for old, new in swaps]
            except Exception as exc:  # written again below: the owner gets its row if it can
                log.warning("lookup rows not handed to their new owners: %s", exc)
                restore.extend(new for _, new in swaps)
            else:
                # No row to hand over (removed meanwhile, e.g. as an orphan): written again.
                for (_, new), r in zip(swaps, results, strict=True):
                    (handed if r.rowcount else restore).append(new)
        rewritten = yield from restore_lookups(topology, restore)
        # The owner rows committed before this settle ran: another writer may have deleted
        # one since, and its cleanup, finding no lookup row naming it (not yet handed over or
        # written again), removed nothing. The rows this settle wrote are therefore checked
        # like orphans: one whose owner is gone is removed (discard_lookups; an owner whose
        # delete is still in flight holds its lock, so its row stays for that delete's own
        # cleanup). Rows that were there already need no check: a later delete's cleanup
        # finds them.
        yield from discard_lookups(topology, [*handed, *rewritten])


def _value_key(topology: Topology, r: LookupRow) -> tuple[Any, ...]:
    """One value of a lookup table, whichever owner a row of it names: its place and its
    value, folded when the lookup table's key folds strings (see _ledger_key)."""
    return (r.shard, r.physical, _value(topology, r.strategy, r.row[r.strategy.from_column]))


def _value(topology: Topology, strategy: LookupStrategy, value: Any) -> Any:
    rule = topology.table(strategy.table).primary
    folds = rule is not None and isinstance(rule.strategy, HashStrategy) and rule.strategy.fold_case
    return _loose(value) if folds else value


def _takeovers(
    topology: Topology,
    kept: Sequence[LookupRow],
    gone: Sequence[LookupRow],
    undone: Sequence[LookupRow],
) -> list[tuple[LookupRow, LookupRow]]:
    """(old row, new row) for each unique value a committed transaction gave to another owner
    (write_lookups let it take a value the transaction had freed): the old row, that of an
    owner it deleted or of an insert it undid, is handed over rather than deleted and written
    again, so that no other writer can take the value in between."""
    freed: dict[tuple[Any, ...], LookupRow] = {}
    for r in (*gone, *undone):
        if r.strategy.key_column is None:
            freed.setdefault(_value_key(topology, r), r)
    out = []
    for new in kept:
        if new.strategy.key_column is not None:
            continue
        old = freed.pop(_value_key(topology, new), None)
        if old is not None:
            to = new.strategy.to_column
            if old.row[to] != new.row[to]:
                out.append((old, new))
    return out


def _takeover_job(old: LookupRow, new: LookupRow) -> Job:
    """Hand the lookup row ``old`` to ``new``'s owner: an UPDATE of exactly that row (its
    rowcount 0 when the row is gone)."""
    target = table_clause(old.physical, old.strategy.row_columns)
    stmt = (
        update(target)
        .where(and_(*(target.c[c] == v for c, v in old.row.items())))
        .values({c: new.row[c] for c in old.strategy.row_columns})
    )
    return Job(old.shard, stmt, {}, "write", "lookup")


def _ledger_key(topology: Topology, r: LookupRow) -> tuple[Any, ...]:
    """One lookup row, whichever statement named it: its place and its values, strings folded
    when the lookup table's key folds them (then 'Ada@x' and 'ADA@x ' are one row of it)."""
    rule = topology.table(r.strategy.table).primary
    folds = rule is not None and isinstance(rule.strategy, HashStrategy) and rule.strategy.fold_case
    values = (r.row[c] for c in r.strategy.row_columns)
    return (r.shard, r.physical, *(_loose(v) if folds else v for v in values))


def _insert(
    topology: Topology,
    plan: Plan,
    params: Mapping[str, Any],
    bind: Bind | None,
    ledger: LookupLedger | None,
) -> Step:
    table = plan.sharded
    if table is None:  # broadcast: every shard gets the rows
        shards = tuple(topology.shards)
        if bind is not None:
            bind(shards)
        results = yield [
            Job(s, plan.render(Target(s, 0), scatter=False), params, "write") for s in shards
        ]
        rowcount = _broadcast_rowcount(plan, shards, results)
        return ResultSet((), [], rowcount, shards, (), True)
    rule = plan.insert_rule
    assert rule is not None
    rows = [
        {c: ref.resolve(params) for c, ref in zip(plan.insert_columns, row, strict=True)}
        for row in plan.insert_rows
    ]
    slots = {i: rule.slot(row[rule.column]) for i, row in enumerate(rows)}
    _check_secondary_keys(table, rule, rows, slots)
    targets = _slot_targets(topology, table, slots, in_list=True)
    if bind is not None:
        bind({ShardId(t.shard) for t in targets})  # before any lookup row is written
    jobs = [Job(ShardId(t.shard), plan.render(t, scatter=False), params, "write") for t in targets]
    written = Written()
    owned = lookup_rows(topology, table, rows)
    try:
        for attempt in range(_RECHECKS + 1):
            written.adopted.clear()  # (created rows stay listed: removed if this fails)
            lookup_shards = yield from write_lookups(topology, owned, written, ledger)
            # Outside a transaction, rows found already there (adopted) are checked again in
            # the owner rows' own write, under lock, once those rows are written and locked: a
            # discard that removed one meanwhile is seen (and the rows written again), and one
            # still deciding is waited for (see discard_lookups). A transaction checks them
            # before its commit (LookupLedger.verify).
            guards = _adopted_guards(topology, written.adopted) if ledger is None else []
            try:
                results = yield jobs + guards
            except GuardFailed:
                if attempt == _RECHECKS:
                    raise ExecutionError(
                        f"{table.name}: a lookup row this insert found was removed"
                        f" {_RECHECKS + 1} times before its owner row was written (a discard of"
                        " an orphan); nothing was written, retry",
                    ) from None
                continue
            results = results[: len(jobs)]
            break
    except Exception:
        # The owner rows were not written (a multi-shard insert rolls back every part): the
        # lookup rows this statement created are nobody's. A transaction settles them at its
        # end (its own locks on the owners would block the check now).
        if ledger is not None:  # (rows found there are not this statement's: not rewritten)
            ledger.add(Written(written.created), doubtful=True, undone=True)
        else:
            yield from discard_lookups(topology, written.created)
        raise
    # ON DUPLICATE KEY UPDATE keeps an existing row's lookup values (changing them is refused
    # by the planner): a lookup row created for a value the row did not take is nobody's.
    upsert = plan.ast.args.get("conflict") is not None
    if ledger is not None:
        ledger.add(written, doubtful=upsert)
    elif upsert:
        yield from discard_lookups(topology, written.created)
    shards = tuple(dict.fromkeys(j.shard for j in jobs))
    return ResultSet((), [], sum(r.rowcount for r in results), shards, tuple(lookup_shards))


def _adopted_guards(topology: Topology, rows: Sequence[LookupRow]) -> list[Job]:
    """Guards (Job.expect) that the lookup rows ``rows`` are all there: one locking read per
    row (an equality on its key locks that row only; an OR of rows may be read by a full
    scan, locking every row of the table until the owner rows commit)."""
    distinct = {_ledger_key(topology, r): r for r in rows}
    return [
        replace(job, expect=1) for r in distinct.values() for _, job in _row_reads(topology, [r])
    ]


def _row_reads(topology: Topology, rows: Sequence[LookupRow]) -> list[tuple[list[LookupRow], Job]]:
    """Locking reads (shared, waiting: a discard deciding on a row holds its lock) of the
    lookup rows ``rows``, one per lookup place, each with its distinct rows."""
    grouped: dict[tuple[ShardId, str, LookupStrategy], dict[tuple[Any, ...], LookupRow]] = (
        defaultdict(dict)
    )
    for r in rows:
        grouped[(r.shard, r.physical, r.strategy)][_ledger_key(topology, r)] = r
    out = []
    for (shard, physical, strategy), found in grouped.items():
        target = table_clause(physical, strategy.row_columns)
        query = (
            select(*(target.c[c] for c in strategy.row_columns))
            .where(
                or_(*(and_(*(target.c[c] == v for c, v in r.row.items())) for r in found.values()))
            )
            .with_for_update(read=True)
        )
        out.append((list(found.values()), Job(shard, query, {}, "write", "lookup")))
    return out


def _check_secondary_keys(
    table: TableRule,
    rule: KeyRule,
    rows: Sequence[Mapping[str, Any]],
    slots: Mapping[int, Slot],
) -> None:
    """A row's functional secondary keys must route where its primary key does: an order id
    whose gene names another slot would be written where reads by that id never look."""
    for name, other in table.keys.items():
        if other is rule or other.lookup_table is not None:
            continue
        for i, row in enumerate(rows):
            value = row.get(name)
            if value is not None and other.slot(value) != slots[i]:
                raise KeyValueError(
                    f"{table.name}: {name} {value!r} routes to slot {other.slot(value)} but"
                    f" {rule.column} {row[rule.column]!r} routes to slot {slots[i]}; generate"
                    f" {name} with the id generator for this {rule.column} (with meta:,"
                    f" lease.generator(topology, '{table.bound_to or table.name}') of a"
                    " WorkerLease.for_topology(topology); else"
                    f" topology.id_generator('{table.bound_to or table.name}'))"
                )


def _loose(value: Any) -> Any:
    return fold(value) if isinstance(value, str) else value


def table_clause(name: str, columns: Sequence[str]) -> Any:
    return table(name, *(column(c) for c in columns))


# -- keyset pagination --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a keyset-paginated listing; pass ``after`` back to get the next one."""

    rows: list[tuple[Any, ...]]
    columns: tuple[str, ...]
    after: tuple[Any, ...] | None
    """The sort-key values of the last row, or None when this was the last page."""


def keyset_query(
    table: str,
    columns: Sequence[str],
    order_by: Sequence[str],
    where: Mapping[str, Any],
    after: Sequence[Any] | None,
    limit: int,
    descending: bool,
) -> tuple[str, dict[str, Any], tuple[int, ...]]:
    """SQL for "the next ``limit`` rows after ``after``" ordered by ``order_by`` (unique).

    Every value is a bound parameter; names are checked to be plain identifiers. Returns the
    SQL, its parameters and the positions of the sort columns in the selected columns.

    Sort columns may hold NULL: MySQL (and SQLite, and the merge) put NULLs first ascending and
    last descending, and ``col > NULL`` is never true, so the cursor's NULLs are spelled out
    (``IS NULL`` / ``IS NOT NULL``) instead of compared; a ``where`` value of None is
    ``IS NULL`` as in SQLAlchemy's ``filter_by``.
    """

    def past_cursor(name: str, param: str, value: Any) -> str | None:
        """``name`` sorts strictly after the cursor value, NULLs placed as MySQL places them."""
        if not descending:  # NULLs first: past a NULL is any value, past a value a greater one
            return f"{name} IS NOT NULL" if value is None else f"{name} > {param}"
        # NULLs last: nothing is past a NULL; past a value is a smaller one, or NULL
        return None if value is None else f"({name} < {param} OR {name} IS NULL)"

    names = [*columns, *where, *order_by, table]
    bad = [n for n in names if not n.isidentifier()]
    if bad:
        raise RoutingError(f"page: {bad[0]!r} is not a plain column or table name")
    if not 1 <= limit <= 10_000:
        raise RoutingError(f"page: limit {limit} must be in [1, 10000]")
    selected = list(dict.fromkeys([*columns, *order_by]))
    params: dict[str, Any] = {}
    clauses = []
    for i, (column_name, value) in enumerate(where.items()):
        if value is None:
            clauses.append(f"{column_name} IS NULL")
        else:
            params[f"w{i}"] = value
            clauses.append(f"{column_name} = :w{i}")
    if after is not None:
        if len(after) != len(order_by):
            raise RoutingError(
                f"page: after has {len(after)} values for {len(order_by)} sort columns"
            )
        # (a, b) > (x, y) spelled out so every MySQL version uses the index on (a, b): rows
        # equal on the first i columns and past the cursor on column i, for each i.
        ors = []
        for i, name in enumerate(order_by):
            past = past_cursor(name, f":a{i}", after[i])
            if past is None:  # nothing sorts past a NULL descending: no row on this branch
                continue
            eqs = [
                f"{order_by[j]} IS NULL" if after[j] is None else f"{order_by[j]} = :a{j}"
                for j in range(i)
            ]
            ors.append("(" + " AND ".join([*eqs, past]) + ")")
        params.update(
            {f"a{i}": _cursor_value(order_by[i], v) for i, v in enumerate(after) if v is not None}
        )
        # No branch left (every cursor value NULL, descending): the listing is over.
        clauses.append("(" + " OR ".join(ors) + ")" if ors else "1 = 0")
    direction = " DESC" if descending else ""
    sql = (
        f"SELECT {', '.join(selected)} FROM {table}"
        + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        + f" ORDER BY {', '.join(c + direction for c in order_by)} LIMIT {int(limit)}"
    )
    return sql, params, tuple(selected.index(c) for c in order_by)


_EXACT_CURSOR_TYPES = (int, Decimal, str, dt.date)
"""Cursor values the shards compare with their column exactly as ORDER BY orders it, bound as
the driver returned them: integers (bool is one), DECIMAL, strings (under the column's own
collation, as ORDER BY), DATE and DATETIME (a datetime is a date). Not: floats (a FLOAT
column's value comes back rounded: ``f = 0.1`` is false for the row that returned 0.1, so
its page would repeat) and bytes (BIT columns come back as bytes, which the shards compare
with the BIT column as a number read from a string, not as its value; BINARY/VARBINARY bytes
cannot be told apart from them by value). TIME (a timedelta) is bound as its exact text."""

_TIME_LIMIT = dt.timedelta(hours=838, minutes=59, seconds=59, microseconds=999_999)


def _cursor_value(column_name: str, value: Any) -> Any:
    """``value``, a page cursor's value of ``column_name``, as bound for the keyset comparison
    (see _EXACT_CURSOR_TYPES); refused with UnsupportedQueryError when no bound value of its
    type compares exactly.

    A timedelta (TIME) becomes ``[-]HH:MM:SS.ffffff``, which MariaDB/MySQL compare with a TIME
    column as a time (drivers escape a negative timedelta wrongly: PyMySQL renders -30 minutes
    as ``-1:30:00``)."""
    if isinstance(value, dt.timedelta):
        if abs(value) > _TIME_LIMIT:
            raise UnsupportedQueryError(
                f"page: cursor value {value!r} of {column_name} is outside MySQL's TIME range"
                " (-838:59:59.999999 .. 838:59:59.999999)"
            )
        sign = "-" if value < dt.timedelta(0) else ""
        value = abs(value)
        seconds = value.days * 86_400 + value.seconds
        return (
            f"{sign}{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
            f".{value.microseconds:06d}"
        )
    if isinstance(value, _EXACT_CURSOR_TYPES):
        return value
    if isinstance(value, float):
        why = (
            "a FLOAT comes back rounded (the shards would not find the row it came from: rows"
            " would repeat)"
        )
    elif isinstance(value, bytes | bytearray):
        why = (
            "a BIT column comes back as bytes, which the shards compare with it as a string"
            " read as a number, not as its value (rows would be skipped or repeated); binary"
            " strings cannot be told apart from it"
        )
    else:
        why = "the keyset comparison is exact only for numbers, strings, dates and times"
    raise UnsupportedQueryError(
        f"page: cannot page by {column_name}: its value {value!r} ({type(value).__name__}) is"
        f" not a cursor the shards compare exactly: {why}. Page by another column (e.g. the"
        " table's key), or list with router.execute and an ORDER BY ... LIMIT of your own"
        f" (for a BIT column, compare {column_name} + 0 with an integer)"
    )


def page_of(result: ResultSet, positions: Sequence[int], limit: int, width: int) -> Page:
    for p in positions:
        if p in result.index_ordered:
            # A single target orders an ENUM/SET by index, but the cursor (a string) compares
            # with it as text: ``prio > 'zeta'`` skips the rows after 'zeta' in index order.
            name = result.columns[p]
            raise UnsupportedQueryError(
                f"page: cannot page by {name}: it is an ENUM or SET column, which the shards"
                " order by its index while the cursor (its text) compares as text: rows would"
                " be skipped or repeated. Page by another column (e.g. the table's key), or"
                f" list with router.execute and ORDER BY {name} + 0 (the index) ... LIMIT"
            )
    rows = result.rows
    after = tuple(rows[-1][p] for p in positions) if len(rows) == limit else None
    if after is not None:  # refused now rather than with the next page
        for p, value in zip(positions, after, strict=True):
            if value is not None:
                _cursor_value(result.columns[p], value)
    return Page([r[:width] for r in rows], result.columns[:width], after)


__all__ = [
    "Bind",
    "Job",
    "JobResult",
    "Limits",
    "LookupLedger",
    "LookupRow",
    "Page",
    "ResultSet",
    "Step",
    "Written",
    "discard_lookups",
    "keyset_query",
    "log_statement",
    "lookup_insert",
    "lookup_rows",
    "page_of",
    "restore_lookups",
    "run",
    "sql_log",
    "write_lookups",
]
