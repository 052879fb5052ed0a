"""The sans-I/O core of statement execution, shared by the sync and async routers.

``run(...)`` is a generator: it yields batches of Jobs (statements to run on shards) and is sent
back their results; it returns the final ResultSet. The sync router drives it with a thread
pool, the async router with asyncio tasks: the two differ only in how they wait. Routing,
lookups, the order of lookup writes and the merge all live here, once.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Generator, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import and_, column, delete, literal_column, table, text
from sqlalchemy.dialects import mysql, sqlite
from sqlalchemy.sql import Executable

from .errors import (
    ExecutionError,
    FanoutLimitError,
    KeyValueError,
    RoutingError,
    ScatterWriteError,
    UnsupportedQueryError,
)
from .merge import merge
from .planner import KeyCondition, Plan, Target
from .strategies import LookupStrategy
from .strategies.hash import fold
from .topology import KeyRule, TableRule, Topology
from .types import ShardId, Slot

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
    """Lookup reads and writes run outside the caller's transaction (a lookup row may live on
    another shard; it is written first, so an aborted transaction leaves an orphan at worst);
    lookup cleanups run only after the owner's delete committed."""


@dataclass(frozen=True, slots=True)
class JobResult:
    columns: tuple[str, ...]
    rows: Sequence[tuple[Any, ...]]
    """A list, or for a ``lazy`` job possibly a sequence that decodes rows as they are read."""
    rowcount: int
    parts: tuple[JobResult, ...] = ()
    """For a job of several statements: one result each, in order."""

    @classmethod
    def of(cls, result: Any) -> JobResult:
        """From an executed (buffered) SQLAlchemy result; sync and async results alike."""
        if result.returns_rows:
            # all() fetches in one call; iterating the Result row by row costs ~60 us more.
            rows = [tuple(r) for r in result.all()]
            return cls(tuple(result.keys()), rows, len(rows))
        return cls((), [], result.rowcount)

    def flat(self) -> tuple[JobResult, ...]:
        return self.parts or (self,)


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


Step = Generator[list[Job], list[JobResult], ResultSet]


@dataclass
class _Targets:
    targets: list[Target]
    scatter: bool
    lookups: list[ShardId] = field(default_factory=list)
    anywhere: bool = False
    """Every shard gives the same answer (a broadcast read): a transaction may use its own."""


def run(topology: Topology, plan: Plan, params: Mapping[str, Any], limits: Limits) -> Step:
    """Execute ``plan``: yields job batches, receives their results, returns the ResultSet."""
    if plan.kind == "insert":
        return (yield from _insert(topology, plan, params))
    found = _direct_targets(topology, plan, params)
    if found is None:
        found = yield from _indirect_targets(topology, plan, params)
    _check_limits(plan, found, limits, topology)
    kind: JobKind = "read" if plan.kind == "select" else "write"
    if len(found.targets) == 1 and plan.kind == "select" and not found.lookups:
        # The point query: one target, one job, rows as they come (no merge, no grouping).
        target = found.targets[0]
        shard = ShardId(target.shard)
        job = Job(shard, plan.render(target, scatter=False), params, kind, anywhere=found.anywhere)
        (result,) = yield [job]
        rows = result.rows if isinstance(result.rows, list) else list(result.rows)
        return ResultSet(result.columns, rows, len(rows), (shard,))
    scatter_sql = len(found.targets) > 1 and plan.kind == "select"
    pending_lookup_deletes: list[Job] = []
    if plan.kind == "delete" and plan.sharded is not None and _owned_lookups(plan.sharded):
        pending_lookup_deletes = yield from _delete_lookups_prepare(topology, plan, params, found)
    by_shard: dict[ShardId, list[Target]] = defaultdict(list)
    for t in found.targets:
        by_shard[ShardId(t.shard)].append(t)
    jobs = []
    lazy = scatter_sql and plan.merge is not None  # the merge may read only some rows
    for shard, targets in by_shard.items():
        backend = _backend(topology, shard) if scatter_sql else "mysql"
        if len(targets) == 1:
            statement: str | tuple[str, ...] = plan.render(
                targets[0], scatter=scatter_sql, backend=backend
            )
        elif scatter_sql and backend != "sqlite" and all(t.keep is None for t in targets):
            statement = plan.render_union(targets)
        else:
            statement = tuple(plan.render(t, scatter=scatter_sql, backend=backend) for t in targets)
        jobs.append(Job(shard, statement, params, kind, lazy=lazy))
    results = [part for r in (yield jobs) for part in r.flat()]
    shards = tuple(by_shard)
    if plan.kind != "select":
        rowcount = sum(r.rowcount for r in results)
        if pending_lookup_deletes:
            yield pending_lookup_deletes
        return ResultSet((), [], rowcount, shards, tuple(found.lookups), found.scatter)
    columns = results[0].columns if results else ()
    if not scatter_sql or plan.merge is None:
        rows = [row for r in results for row in r.rows]
        return ResultSet(columns, rows, len(rows), shards, tuple(found.lookups), found.scatter)
    merged = list(merge(plan.merge, [r.rows for r in results]))
    visible = columns[: plan.merge.visible_width(len(columns))]
    return ResultSet(visible, merged, len(merged), shards, tuple(found.lookups), found.scatter)


def _backend(topology: Topology, shard: ShardId) -> str:
    """The shard's database ("mysql", "sqlite"): the scatter SQL differs (collation weights),
    and only MySQL/MariaDB take parenthesised UNION members."""
    return str(topology.shards[shard].primary.get_backend_name())


# -- targets --------------------------------------------------------------------------------


def _all_targets(topology: Topology, table: TableRule) -> list[Target]:
    return [Target(sid, i) for sid in topology.shards for i in range(table.split)]


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
        shards = list(topology.shards)
        if plan.kind == "select":  # a broadcast table has the same rows everywhere
            return _Targets([Target(shards[0], 0)], False, anywhere=True)
        return _Targets([Target(s, 0) for s in shards], True)
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
    topology: Topology, plan: Plan, params: Mapping[str, Any]
) -> Generator[list[Job], list[JobResult], _Targets]:
    """Targets through a lookup table (I/O), or every shard."""
    table = plan.sharded
    assert table is not None
    lookup = next((c for c in plan.conditions if c.rule.lookup_table is not None), None)
    if lookup is not None:
        reading = plan.kind == "select"
        return (yield from _lookup_targets(topology, table, lookup, params, reading))
    return _Targets(_all_targets(topology, table), True)


def _lookup_targets(
    topology: Topology,
    table: TableRule,
    cond: KeyCondition,
    params: Mapping[str, Any],
    reading: bool = True,
) -> Generator[list[Job], list[JobResult], _Targets]:
    """Read the lookup table, then target the owners' shards (orphans cost a wasted query)."""
    rule = cond.rule
    strategy = rule.strategy
    assert isinstance(strategy, LookupStrategy) and rule.lookup_table is not None
    lookup_table = topology.table(rule.lookup_table)
    values = [ref.resolve(params) for ref in cond.refs]
    for v in values:
        rule.check(v)
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
    owner = topology.table(table.bound_to or table.name)
    assert owner.primary is not None
    slots = {i: owner.primary.slot(k) for i, k in enumerate(sorted(owner_keys, key=repr))}
    targets = _slot_targets(topology, table, slots, in_list=False)
    if not targets:
        # No owner: run on one shard anyway so aggregates still return their one row.
        targets = [Target(next(iter(topology.shards)), 0)]
    return _Targets(targets, False, [j.shard for j in jobs])


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


def _owned_lookups(table: TableRule) -> list[KeyRule]:
    return [r for r in table.keys.values() if isinstance(r.strategy, LookupStrategy)]


def lookup_upsert(strategy: LookupStrategy, physical: str, backend: str) -> Any:
    """The idempotent insert of lookup rows (executemany with one dict per row).

    A row left by an earlier crash is identical, so keeping it is the idempotent write; a
    unique lookup's value taken by another owner is detected by reading it back afterwards.
    """
    target = table_clause(physical, strategy.row_columns)
    if backend == "sqlite":
        return sqlite.insert(target).on_conflict_do_nothing()
    return mysql.insert(target).on_duplicate_key_update(
        {strategy.from_column: literal_column(strategy.from_column)}
    )


def _insert(topology: Topology, plan: Plan, params: Mapping[str, Any]) -> Step:
    table = plan.sharded
    if table is None:  # broadcast: every shard gets the rows
        shards = tuple(topology.shards)
        results = yield [
            Job(s, plan.render(Target(s, 0), scatter=False), params, "write") for s in shards
        ]
        return ResultSet((), [], results[0].rowcount if results else 0, shards, (), True)
    rule = plan.insert_rule
    assert rule is not None
    rows = [
        {c: ref.resolve(params) for c, ref in zip(plan.insert_columns, row, strict=True)}
        for row in plan.insert_rows
    ]
    slots = {i: rule.slot(row[rule.column]) for i, row in enumerate(rows)}
    _check_secondary_keys(table, rule, rows, slots)
    # Owned lookup rows first: a crash between the two writes leaves an orphan lookup row
    # (harmless: reads ignore it), never an owner row its lookup cannot find.
    lookup_shards: list[ShardId] = []
    lookup_jobs = _lookup_inserts(topology, table, rows)
    if lookup_jobs:
        lookup_shards = [j.shard for j in lookup_jobs]
        yield lookup_jobs
        check_jobs = _unique_lookup_checks(topology, table, rows)
        if check_jobs:
            results = yield [job for job, _ in check_jobs]
            for (_, expected), result in zip(check_jobs, results, strict=True):
                # The column may compare without case: match what it returned loosely too.
                loose = {_loose(k): v for k, v in expected.items()}
                for from_value, owner in result.rows:
                    want = expected.get(from_value, loose.get(_loose(from_value), owner))
                    if want != owner:
                        raise ExecutionError(
                            f"{table.name}: {from_value!r} already belongs to another owner"
                            f" ({owner!r}) in its lookup table; nothing was inserted"
                        )
    targets = _slot_targets(topology, table, slots, in_list=True)
    jobs = [Job(ShardId(t.shard), plan.render(t, scatter=False), params, "write") for t in targets]
    results = yield jobs
    shards = tuple(dict.fromkeys(j.shard for j in jobs))
    return ResultSet((), [], sum(r.rowcount for r in results), shards, tuple(lookup_shards))


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
                    f" {name} with the id generator for this {rule.column}"
                    f" (topology.id_generator('{table.bound_to or table.name}'))"
                )


def _lookup_inserts(
    topology: Topology, table: TableRule, rows: Sequence[Mapping[str, Any]]
) -> list[Job]:
    jobs: list[Job] = []
    for rule in _owned_lookups(table):
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        if rule.column not in rows[0]:
            continue
        missing = [c for c in strategy.row_columns[1:] if c not in rows[0]]
        if missing:
            raise RoutingError(
                f"INSERT INTO {table.name} sets lookup column {rule.column} but not"
                f" {', '.join(missing)}, which its lookup row needs"
            )
        lookup_table = topology.table(strategy.table)
        grouped: dict[tuple[ShardId, str], list[dict[str, Any]]] = defaultdict(list)
        for row in rows:
            value = row[rule.column]
            rule.check(value)
            slot = topology.slot_for(lookup_table.name, value)
            lookup_row = {c: row[c] for c in (rule.column, *strategy.row_columns[1:])}
            lookup_row[strategy.from_column] = lookup_row.pop(rule.column)
            grouped[(topology.shard_of_slot(slot), lookup_table.physical(slot))].append(lookup_row)
        for (shard, physical), lookup_rows in grouped.items():
            backend = topology.shards[shard].primary.get_backend_name()
            stmt = lookup_upsert(strategy, physical, backend)
            jobs.append(Job(shard, stmt, lookup_rows, "write", "lookup"))
    return jobs


def _unique_lookup_checks(
    topology: Topology, table: TableRule, rows: Sequence[Mapping[str, Any]]
) -> list[tuple[Job, dict[Any, Any]]]:
    """For unique lookups (no key column), the reads that prove no value was taken already."""
    checks: list[tuple[Job, dict[Any, Any]]] = []
    for rule in _owned_lookups(table):
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        if strategy.key_column is not None or rule.column not in rows[0]:
            continue
        lookup_table = topology.table(strategy.table)
        expected: dict[tuple[ShardId, str], dict[Any, Any]] = defaultdict(dict)
        for row in rows:
            slot = topology.slot_for(lookup_table.name, row[rule.column])
            place = (topology.shard_of_slot(slot), lookup_table.physical(slot))
            expected[place][row[rule.column]] = row[strategy.to_column]
        for (shard, physical), want in expected.items():
            query = strategy.query(list(want), physical)
            # "write": the uniqueness check must read the primary, not a lagging replica.
            checks.append((Job(shard, query.statement, {}, "write", "lookup"), want))
    return checks


def _loose(value: Any) -> Any:
    return fold(value) if isinstance(value, str) else value


def table_clause(name: str, columns: Sequence[str]) -> Any:
    return table(name, *(column(c) for c in columns))


# Deleting owner rows: read the lookup columns of the doomed rows first (same WHERE), delete the
# owners, then delete their lookup rows. A crash in between leaves orphans, never a dangling
# owner.


def _delete_lookups_prepare(
    topology: Topology, plan: Plan, params: Mapping[str, Any], found: _Targets
) -> Generator[list[Job], list[JobResult], list[Job]]:
    """Read the doomed rows' lookup columns; return the lookup deletes to run afterwards."""
    table = plan.sharded
    assert table is not None
    rules = _owned_lookups(table)
    wanted: list[str] = []
    for rule in rules:
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        for c in (rule.column, *strategy.row_columns[1:]):
            if c not in wanted:
                wanted.append(c)
    where = plan.ast.args.get("where")
    where_sql = f" {where.sql(dialect='mysql')}" if where is not None else ""
    reads = []
    for t in found.targets:
        physical = table.physical(t.split)
        reads.append(
            Job(
                ShardId(t.shard),
                text(f"SELECT {', '.join(wanted)} FROM {physical} AS {table.name}{where_sql}"),
                params,
                "read",
            )
        )
    results = yield reads
    deletes: list[Job] = []
    for rule in rules:
        strategy = rule.strategy
        assert isinstance(strategy, LookupStrategy)
        lookup_table = topology.table(strategy.table)
        idx = {c: wanted.index(c) for c in (rule.column, *strategy.row_columns[1:])}
        for r in results:
            for row in r.rows:
                value = row[idx[rule.column]]
                if value is None:
                    continue
                slot = topology.slot_for(lookup_table.name, value)
                physical = lookup_table.physical(slot)
                target = table_clause(physical, strategy.row_columns)
                conds = [target.c[strategy.from_column] == value]
                for c in strategy.row_columns[1:]:
                    conds.append(target.c[c] == row[idx[c]])
                deletes.append(
                    Job(
                        topology.shard_of_slot(slot),
                        delete(target).where(and_(*conds)),
                        {},
                        "write",
                        "lookup_cleanup",
                    )
                )
    return deletes


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
    """
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
        params[f"w{i}"] = value
        clauses.append(f"{column_name} = :w{i}")
    if after is not None:
        if len(after) != len(order_by):
            raise RoutingError(
                f"page: after has {len(after)} values for {len(order_by)} sort columns"
            )
        op = "<" if descending else ">"
        # (a, b) > (x, y) spelled out so every MySQL version uses the index on (a, b).
        ors = []
        for i in range(len(order_by)):
            eqs = [f"{order_by[j]} = :a{j}" for j in range(i)]
            ors.append("(" + " AND ".join([*eqs, f"{order_by[i]} {op} :a{i}"]) + ")")
        params.update({f"a{i}": v for i, v in enumerate(after)})
        clauses.append("(" + " OR ".join(ors) + ")")
    direction = " DESC" if descending else ""
    sql = (
        f"SELECT {', '.join(selected)} FROM {table}"
        + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
        + f" ORDER BY {', '.join(c + direction for c in order_by)} LIMIT {int(limit)}"
    )
    return sql, params, tuple(selected.index(c) for c in order_by)


def page_of(result: ResultSet, positions: Sequence[int], limit: int, width: int) -> Page:
    rows = result.rows
    after = tuple(rows[-1][p] for p in positions) if len(rows) == limit else None
    return Page([r[:width] for r in rows], result.columns[:width], after)


__all__ = [
    "Job",
    "JobResult",
    "Limits",
    "Page",
    "ResultSet",
    "Step",
    "keyset_query",
    "log_statement",
    "lookup_upsert",
    "page_of",
    "run",
    "sql_log",
]
