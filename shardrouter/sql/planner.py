"""SQL -> plan: parse once with sqlglot, find the sharding-key predicates, rewrite per target.

A plan is built once per statement text and cached; executing it only evaluates the key
predicates against the parameters, picks targets and fetches the SQL rendered for each kind of
target (also cached). The planner refuses, with UnsupportedQueryError naming the construct,
anything it cannot run correctly on shards: it never runs a guess.

Parameters are named, SQLAlchemy ``text()`` style (``:user_id``); values are never written into
SQL: rendered statements keep the placeholders and the caller's parameters are bound.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, cast

import sqlglot
from sqlglot import Token, TokenType, exp
from sqlglot.dialects.mysql import MySQL
from sqlglot.errors import SqlglotError

from ..core.strategies import LookupStrategy
from ..core.topology import KeyRule, TableRule, Topology
from ..errors import UnsupportedQueryError
from ..types import KeyType
from . import shapes
from .late import LateParams
from .merge import MergePlan
from .refs import ValueRef, value_ref
from .scatter import mysql_label, scatter, union_order_by, without_weights

Kind = Literal["select", "insert", "update", "delete"]


_MYSQL_GENERATOR: Any = MySQL.Generator  # its module moved between sqlglot versions


class ShardSQL(MySQL):
    """MySQL as the shards must read it back: sqlglot writes a hex literal ``0x8`` as
    ``x'8'``, which MariaDB rejects for an odd number of digits (1064); ``0x`` digits mean the
    same as ``X'..'`` in every context (a binary string, a number in numeric context)."""

    class Generator(_MYSQL_GENERATOR):  # type: ignore[misc]
        def hexstring_sql(
            self, expression: exp.HexString, binary_function_repr: str | None = None
        ) -> str:
            digits = expression.name
            return f"0x{digits}" if digits else "X''"  # 0x alone is not a literal

        def regexplike_sql(self, expression: exp.RegexpLike) -> str:
            # sqlglot writes REGEXP_LIKE(x, y), which MariaDB lacks (shapes refuses a flag).
            return f"({self.sql(expression, 'this')} REGEXP {self.sql(expression, 'expression')})"

        TRANSFORMS = {  # noqa: RUF012 (sqlglot's own class attribute)
            **_MYSQL_GENERATOR.TRANSFORMS,
            # not sqlglot's CURRENT_DATE AT TIME ZONE 'UTC', which MariaDB lacks
            exp.UtcDate: lambda self, e: "UTC_DATE()",
        }


SHARD_DIALECT = ShardSQL()
"""How every statement sent to a shard is rendered."""


@dataclass(frozen=True, slots=True)
class KeyCondition:
    """``column = ref`` or ``column IN (refs)`` on a sharding column, a top-level conjunct."""

    rule: KeyRule
    refs: tuple[ValueRef, ...]
    in_node_path: tuple[int, ...] | None
    """For IN: which conjunct it is, so each target gets only its own values."""


@dataclass(frozen=True, slots=True)
class Target:
    """One place a statement runs: a shard and, for split tables, one physical split."""

    shard: str
    split: int
    keep: tuple[int, ...] | None = None
    """For IN lists and multi-row INSERTs: the positions this target keeps."""
    conjunct: int | None = None
    """For IN lists: which top-level WHERE conjunct ``keep`` applies to."""
    only: tuple[str, tuple[Any, ...]] | None = None
    """(column, keys): the statement also requires the sharded table's ``column`` IN
    ``keys`` (none: matches nothing). A lookup route's statement on a shard that holds a
    migration's copies of rows it does not own (Topology.mirrored): only the owners the
    lookup found there, not their copies. The keys are bound (only_params)."""
    exclude: Exclusion | None = None
    """A read across shards on a shard holding a migration's copies: skip them (by slot,
    from the ids: Exclusion)."""


@dataclass(frozen=True, slots=True)
class Exclusion:
    """Rows a read across shards must skip on one shard: those whose slot, read from the id
    in a gene column (``(column >> shift) & mask``), lies in ``ranges`` (a migration's
    copies there, Topology.mirrored). ``columns``: (logical table, gene column) of each
    sharded table the statement names."""

    columns: tuple[tuple[str, str], ...]
    shift: int
    mask: int
    ranges: tuple[tuple[int, int], ...]


def only_params(target: Target) -> dict[str, Any]:
    """The bound values of ``target.only`` (names unique per split: one job may run several)."""
    if target.only is None:
        return {}
    return {f"__sr_only_{target.split}_{i}": v for i, v in enumerate(target.only[1])}


@dataclass(eq=False)
class Plan:
    """A parsed, analysed statement; immutable once built except for its render cache."""

    sql: str
    kind: Kind
    tables: tuple[TableRule, ...]
    """Every logical table named (sharded ones first)."""
    sharded: TableRule | None
    """The driving sharded table (the bound group's member named first)."""
    conditions: tuple[KeyCondition, ...]
    """Usable routing conditions, cheapest first."""
    ast: exp.Expression
    scatter_ast: exp.Expression | None = None
    merge: MergePlan | None = None
    insert_rule: KeyRule | None = None
    """INSERT: the key that routes each VALUES row."""
    insert_columns: tuple[str, ...] = ()
    insert_rows: tuple[tuple[ValueRef, ...], ...] = ()
    """INSERT: per VALUES row, where each column's value comes from."""
    has_limit: bool = False
    offset_depth: int = 0
    late: LateParams | None = None
    """SELECT: the parameters of its top-level LIMIT/OFFSET and HAVING. A fan-out needs their
    values (each shard returns offset + limit rows, the merge evaluates HAVING), which come
    with the execution: ``bind_late`` gives the plan of the statement with them written in."""
    bind_late: Callable[[Mapping[str, Any]], Plan] | None = None
    union: tuple[Plan, ...] = ()
    """A UNION [ALL]: the plan of each SELECT (``ast`` is the whole UNION, which one target
    runs as it is when every SELECT routes to that target)."""
    union_distinct: bool = False
    union_order: tuple[tuple[int, bool], ...] = ()
    """The UNION's own ORDER BY: (column position, descending) per term."""
    union_limit: int | str | None = None
    union_offset: int | str = 0
    """The UNION's own LIMIT and OFFSET: numbers, or the names of the parameters holding them
    (``LIMIT :n``, read when it runs: execution._union)."""
    scatter_refusal: str | None = None
    """Why this statement cannot run on more than one target (raised only if it would)."""
    strings_compared: bool = False
    """The merge compares a column that came back from a render_union as a string, which may
    be an ENUM or SET the UNION typed VARCHAR (losing the flag the ENUM refusal reads): every
    shard's UNION goes with a render_probe of its flags. Set by execution.run the first time
    it sees such a string, never reset (the probe is always right, only one round trip more)."""
    fanout: Any = None
    """execution.run's jobs for this SELECT when it reads every shard whatever its parameters
    (no key condition): computed once per topology (execution._FanOut)."""
    _rendered: dict[tuple[Any, ...], str] = field(default_factory=dict)
    """Rendered SQL per kind of target; bounded (IN subsets could vary without end)."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @cached_property
    def routing_condition(self) -> KeyCondition | None:
        """The cheapest condition on a functional key (no lookup needed), if any."""
        return next((c for c in self.conditions if c.rule.lookup_table is None), None)

    def render(self, target: Target, *, scatter: bool, backend: str = "mysql") -> str:
        """The SQL for ``target`` (physical names, IN subset); cached per kind of target.
        ``backend`` "sqlite": the scatter SQL without collation weights (SQLite has none)."""
        only = None if target.only is None else (target.only[0], len(target.only[1]))
        key = (target.split, target.keep, target.conjunct, only, target.exclude, scatter, backend)
        sql = self._rendered.get(key)
        if sql is None:
            sql = self._render(target, scatter, backend)
            with self._lock:
                if len(self._rendered) > 512:  # bounded: IN subsets could vary without end
                    self._rendered.clear()
                self._rendered[key] = sql
        return sql

    def render_union(self, targets: Sequence[Target]) -> str:
        """One statement for several splits of one shard (MySQL): their scatter queries in a
        UNION ALL, ordered and limited again, so a shard is one round trip and one sorted
        stream for the merge. Positions in the outer ORDER BY avoid name clashes.

        MariaDB types a UNION's ENUM and SET columns VARCHAR, without their flags (ENUM_FLAG
        on a plain SELECT, none through the UNION): when the merge compares a string column,
        execution.run sends a render_probe with the UNION (see strings_compared)."""
        key = ("union", tuple(t.split for t in targets))
        sql = self._rendered.get(key)
        if sql is not None:
            return sql
        merge_plan = self.merge
        distinct = merge_plan is not None and merge_plan.distinct and not merge_plan.grouped
        glue = " UNION " if distinct else " UNION ALL "  # duplicates would eat the LIMIT
        sql = glue.join(f"({self.render(t, scatter=True)})" for t in targets)
        if merge_plan is not None and not merge_plan.grouped:
            sql += union_order_by(merge_plan)
            if merge_plan.shard_limit is not None:
                sql += f" LIMIT {merge_plan.shard_limit}"
        with self._lock:
            self._rendered[key] = sql
        return sql

    def _cached(self, key: tuple[Any, ...], make: Callable[[], str]) -> str:
        sql = self._rendered.get(key)
        if sql is None:
            sql = make()
            with self._lock:
                self._rendered[key] = sql
        return sql

    def render_empty(self, target: Target) -> str:
        """The statement as written for ``target`` (physical names), over no rows (``AND
        FALSE``): what one database answers for an aggregate without GROUP BY when no row
        matches (one row: COUNT 0, constants, parameters, HAVING applied). A merge from
        distinct values (MergePlan.first) has no row from any shard to take those from."""
        return self._cached(
            ("empty", target.split), lambda: self._render(target, False, empty=True)
        )

    def render_union_types(self, target: Target, zeros: tuple[str, ...]) -> str:
        """A UNION whose members run on different targets, as one statement reading no rows
        (each member LIMIT 0) plus a row of ``zeros`` (one per column: ``ZERO``,
        ``FLOAT_PROBE``, ``DATE_PROBE`` or ``NULL_PROBE``): MySQL types that row as it types the
        UNION's columns, from every member's declared types, rows or not (``0.0000`` for a
        DECIMAL(., 4) member, a datetime for a DATETIME one, a string for a VARCHAR one), which
        the members' values alone cannot tell (a member without rows, or with only NULLs)."""
        return self._cached(
            ("union-types", zeros), lambda: self._render(target, False, union_types=zeros)
        )

    def render_probe(self, target: Target) -> str:
        """``target``'s scatter query with LIMIT 0 and no lock (MySQL): no rows, and the result
        metadata of its columns, ENUM/SET flags included, which a render_union loses. The
        server answers it without reading a row ("Zero limit")."""
        return self._cached(("probe", target.split), lambda: self._render(target, True, probe=True))

    def _render(
        self,
        target: Target,
        scatter: bool,
        backend: str = "mysql",
        probe: bool = False,
        empty: bool = False,
        union_types: tuple[str, ...] = (),
    ) -> str:
        tree = (self.scatter_ast if scatter and self.scatter_ast is not None else self.ast).copy()
        if empty and isinstance(tree, exp.Select):
            tree = tree.where(exp.false())
        if union_types and isinstance(tree, exp.Union):
            tree = _typed_zeros(tree, union_types)
        if probe and isinstance(tree, exp.Select):
            tree.set("offset", None)
            tree.set("locks", None)
            tree = tree.limit(0)
        if scatter and backend == "sqlite":
            tree = without_weights(tree)
        if target.only is not None:
            tree = self._restrict(tree, target)
        if target.exclude is not None:
            tree = self._exclude(tree, target.exclude, target.shard)
        names = {t.name: t.physical(target.split) for t in self.tables}
        renamed: dict[str, str] = {}
        for table in list(tree.find_all(exp.Table)):
            physical = names.get(table.name)
            if physical is not None and physical != table.name:
                if not table.alias:
                    renamed[table.name] = physical
                table.set("this", exp.to_identifier(physical))
        if renamed:
            # Unaliased qualifiers (orders.user_id) follow the table to its physical name; an
            # alias would do it too, but MySQL refuses one on INSERT.
            for col in tree.find_all(exp.Column):
                physical = renamed.get(col.table)
                if physical is not None:
                    col.set("table", exp.to_identifier(physical))
        if target.keep is not None:
            if self.kind == "insert":
                values = tree.args["expression"]
                kept = [values.expressions[i] for i in target.keep]
                values.set("expressions", kept)
            elif target.conjunct is not None:
                node = _conjuncts(tree.args.get("where"))[target.conjunct]
                if isinstance(node, exp.In):
                    node.set("expressions", [node.expressions[i] for i in target.keep])
        locks = tree.args.get("locks")
        if not locks:
            return tree.sql(dialect=SHARD_DIALECT)
        # sqlglot writes a shared lock as FOR SHARE (MySQL 8), which MariaDB refuses; LOCK IN
        # SHARE MODE is what both accept. Locks come last in a MySQL SELECT.
        tree.set("locks", None)
        return " ".join([tree.sql(dialect=SHARD_DIALECT), *(_lock_sql(lock) for lock in locks)])

    def _restrict(self, tree: exp.Expression, target: Target) -> exp.Expression:
        """``tree`` with ``AND <sharded>.<column> IN (:__sr_only_...)`` (Target.only)."""
        assert target.only is not None and self.sharded is not None
        column, keys = target.only
        named = [t for t in tree.find_all(exp.Table) if t.name == self.sharded.name]
        if len(named) != 1 or not isinstance(tree, (exp.Select, exp.Update, exp.Delete)):
            raise UnsupportedQueryError(
                f"{self.sharded.name} is named {len(named)} times here, and shard"
                f" {target.shard} holds a migration's copies of rows it does not own: this"
                " statement cannot be kept to the rows the shard owns; run it after the"
                " migration's finalize (or rollback), or name the table once"
            )
        if not keys:
            return tree.where(exp.false())
        qualifier = named[0].alias_or_name
        names = only_params(target)
        return tree.where(
            exp.In(
                this=exp.column(column, table=qualifier),
                expressions=[exp.Placeholder(this=name) for name in names],
            )
        )

    def _exclude(self, tree: exp.Expression, exclusion: Exclusion, shard: str) -> exp.Expression:
        """``tree`` reading no row of ``exclusion.ranges`` (Target.exclude): the condition on
        each sharded table's gene column goes into the WHERE for the FROM table and inner
        joins, into the ON of an outer join (a WHERE would drop its NULL-extended rows).
        Refused where a sharded table is named elsewhere (a subquery, a CTE, a UNION) or
        joined without ON."""
        genes = dict(exclusion.columns)
        places = 0
        if isinstance(tree, exp.Select):  # (a copy already: Plan._render)
            where: list[exp.Expression] = []
            source = tree.args.get("from_")
            first = source.this if source is not None else None
            if isinstance(first, exp.Table) and first.name in genes:
                where.append(self._outside(first, genes[first.name], exclusion))
                places += 1
            for join in tree.args.get("joins") or ():
                table = join.this
                if not (isinstance(table, exp.Table) and table.name in genes):
                    continue
                condition = self._outside(table, genes[table.name], exclusion)
                if not join.side and not join.args.get("using"):
                    where.append(condition)
                elif join.args.get("on") is not None:
                    join.set("on", exp.and_(join.args["on"], condition))
                else:
                    continue  # not counted: refused below
                places += 1
            named = sum(1 for t in tree.find_all(exp.Table) if t.name in genes)
            if places == named and places:
                return tree.where(exp.and_(*where)) if where else tree
        raise UnsupportedQueryError(
            f"a read across shards is refused while shard {shard} holds a migration's copies"
            " of slots it does not own (between the migration's start and its finalize):"
            " this statement names a sharded table where its copies cannot be skipped (a"
            " subquery, a CTE, a UNION, a join without ON, or a table whose rows carry no"
            " shardrouter id). Read by a sharding key, or finish the migration (`shardctl"
            " reshard finalize`, or `rollback` then `cancel`)"
        )

    @staticmethod
    def _outside(table: exp.Table, column: str, exclusion: Exclusion) -> exp.Expression:
        """``NOT (slot BETWEEN a AND b - 1) AND ...`` for the table's gene column."""
        qualifier = table.alias_or_name
        slot = exp.BitwiseAnd(
            this=exp.Paren(
                this=exp.BitwiseRightShift(
                    this=exp.column(column, table=qualifier),
                    expression=exp.Literal.number(exclusion.shift),
                )
            ),
            expression=exp.Literal.number(exclusion.mask),
        )
        condition = exp.and_(
            *(
                exp.Not(
                    this=exp.Between(
                        this=slot.copy(),
                        low=exp.Literal.number(a),
                        high=exp.Literal.number(b - 1),
                    )
                )
                for a, b in exclusion.ranges
            )
        )
        return cast(exp.Expression, condition)


class Planner:
    """Builds and caches plans for one topology."""

    def __init__(self, topology: Topology, *, cache_size: int = 2048) -> None:
        self.topology = topology
        self._cache: OrderedDict[str, Plan] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def plan(self, sql: str) -> Plan:
        """The plan of ``sql``, built on first use and cached by the statement text."""
        plan = self._cache.get(sql)
        if plan is not None:
            return plan
        plan = self._build(sql)
        with self._lock:
            self._cache[sql] = plan
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return plan

    # -- building -------------------------------------------------------------------------

    def _build(self, sql: str) -> Plan:
        # Before parsing: sqlglot drops what executable comments would make the shards run.
        shapes.refuse_hidden_syntax(sql)
        if _REPLACE.match(sql):  # (sqlglot would parse it as an opaque command, and warn)
            raise UnsupportedQueryError(REPLACE_REFUSAL)
        try:
            statements = sqlglot.parse(sql, read="mysql")
        except SqlglotError as exc:
            raise UnsupportedQueryError(
                f"cannot parse SQL: {_first_line(exc)}{_parse_hint(sql)}"
            ) from None
        statements = [s for s in statements if s is not None]
        if len(statements) != 1:
            raise UnsupportedQueryError(
                f"{len(statements)} statements in one call; send one statement per execute()"
            )
        tree = _bare_time_functions(cast(exp.Expression, statements[0]))
        if type(tree) is exp.Union:
            return self._union(sql, tree)
        if isinstance(tree, exp.Select):
            return self._select(sql, tree, shapes.check(tree, "select"))
        if isinstance(tree, exp.Insert):
            return self._insert(sql, tree, shapes.check(tree, "insert"))
        if isinstance(tree, exp.Update):
            return self._write(sql, tree, "update", shapes.check(tree, "update"))
        if isinstance(tree, exp.Delete):
            return self._write(sql, tree, "delete", shapes.check(tree, "delete"))
        raise UnsupportedQueryError(_not_routed(tree, sql))

    def _union(self, sql: str, tree: exp.Union) -> Plan:
        """UNION [ALL] of SELECTs each routable: see execution._union for how it runs."""
        unknown = set(tree.args) - {"this", "expression", "distinct", "order", "limit", "offset"}
        if any(tree.args.get(a) for a in unknown):
            raise UnsupportedQueryError(f"UNION with {', '.join(sorted(unknown))} is not routed")
        branches: list[exp.Expression] = []
        node: exp.Expression = tree
        while type(node) is exp.Union:
            if node is not tree and any(node.args.get(a) for a in ("order", "limit", "offset")):
                raise UnsupportedQueryError("a UNION inside a UNION with its own ORDER BY/LIMIT")
            if bool(node.args.get("distinct")) != bool(tree.args.get("distinct")):
                raise UnsupportedQueryError(
                    "UNION mixed with UNION ALL is not routed; write one kind (or run them apart)"
                )
            branches.append(node.expression)
            node = node.this
        branches.append(node)
        branches.reverse()
        plans = []
        for i, branch in enumerate(branches):
            if not isinstance(branch, exp.Select) or any(
                branch.args.get(a) for a in ("order", "limit", "offset", "locks")
            ):
                raise UnsupportedQueryError(
                    f"UNION member {_show(branch)}: each must be a plain SELECT (no parentheses,"
                    " ORDER BY, LIMIT or locking of its own); order and limit the whole UNION"
                )
            if i == 0:  # the first labels the columns: by its text as written in the UNION
                label_as_written(sql, branch)
            # Its own text (a late binder re-plans it: the UNION's text would be planned whole).
            text = branch.sql(dialect="mysql")
            plans.append(self._select(text, branch, shapes.check(branch, "select")))
        width = len(branches[0].expressions)
        stars = any(isinstance(e, exp.Star) or e.is_star for b in branches for e in b.expressions)
        if not stars and any(len(b.expressions) != width for b in branches):
            raise UnsupportedQueryError(
                "the SELECTs of a UNION have different numbers of columns (MySQL error 1222)"
            )
        tables = tuple(dict.fromkeys(t for p in plans for t in p.tables))
        driving = next((p.sharded for p in plans if p.sharded is not None), None)
        plan = Plan(sql, "select", tables, driving, (), tree)
        plan.union = tuple(plans)
        plan.union_distinct = bool(tree.args.get("distinct"))
        plan.union_order = _union_order(tree, cast(exp.Select, branches[0]), width)
        limit, offset = tree.args.get("limit"), tree.args.get("offset")
        plan.union_limit = _count_of(limit.expression) if limit is not None else None
        plan.union_offset = _count_of(offset.expression) if offset is not None else 0
        return plan

    def _late_binder(self, sql: str, late: LateParams) -> Callable[[Mapping[str, Any]], Plan]:
        """``params`` -> the plan of ``sql`` with its LIMIT/OFFSET and HAVING parameters
        written in as the values they hold (see shardrouter.sql.late); planned once per
        distinct values, the last 64 kept."""
        bound: OrderedDict[tuple[str, ...], Plan] = OrderedDict()

        def bind(params: Mapping[str, Any]) -> Plan:
            # Keyed by the literals written in: values Python holds equal may be written
            # differently (Decimal('1') and Decimal('1.0'), datetimes in other time zones).
            literals = late.literals(late.values(params))
            plan = bound.get(literals)
            if plan is None:
                # Not through self.plan: paging through offsets would evict the other plans.
                plan = self._build(late.write(sql, literals))
                if plan.late is not None:  # (cannot happen: the same clauses named them)
                    raise UnsupportedQueryError(f"parameters not written in: {sql}")
                with self._lock:
                    bound[literals] = plan
                    if len(bound) > 64:
                        bound.popitem(last=False)
            return plan

        return bind

    def _refuse_nested(self, tree: exp.Expression) -> None:
        _refuse_nested_in(tree, self.topology)

    def _tables(
        self, tree: exp.Expression, *, reading: bool = False
    ) -> tuple[tuple[TableRule, ...], TableRule | None]:
        """The statement's tables, sharded first, and the driving one. Sharded tables must be
        one bound group, or (``reading``: a SELECT) groups co-located by construction: equal
        placements, and splits that each divide the largest, whose table drives (its splits
        are the targets; a table of fewer splits is found in split ``target % its split``).
        Their joins are checked apart (_refuse_unsafe_joins)."""
        topology = self.topology
        rules: list[TableRule] = []
        targets = _delete_targets(tree)
        for node in tree.find_all(exp.Table):
            if any(node is t for t in targets):
                continue  # DELETE o FROM orders o ...: names a table of the FROM, checked apart
            if node.args.get("db"):
                raise UnsupportedQueryError(
                    f"table {node.sql(dialect='mysql')} names a database; use logical names only"
                )
            rule = topology.table(node.name)
            if rule not in rules:
                rules.append(rule)
        sharded = [r for r in rules if r.kind == "sharded"]
        if not sharded:
            return tuple(rules), None
        groups = {r.bound_to or r.name for r in sharded}
        driving = sharded[0]
        if len(groups) > 1:
            # The widest of the statement's own tables drives (a subquery's table is read in
            # the driving split: it may not have more splits, or its rows outside that split
            # would be missing, and the outer rows would repeat once per split).
            own = [
                topology.table(s.this.name)
                for s in [tree.args.get("from_"), *(tree.args.get("joins") or ())]
                if s is not None and isinstance(s.this, exp.Table)
            ]
            own_sharded = [r for r in own if r.kind == "sharded"] or sharded
            widest = max(own_sharded, key=lambda r: r.split)
            colocated = reading and len({r.placement for r in sharded}) == 1
            wider = [r for r in sharded if widest.split % r.split]
            if colocated and wider:
                raise UnsupportedQueryError(
                    f"a subquery over {', '.join(r.name for r in wider)} ({wider[0].split} split"
                    f" tables a shard) inside a statement over {widest.name} ({widest.split}):"
                    " it would read one of those split tables only; write it as a JOIN (the"
                    " statement then reads every split table), or query them separately"
                )
            if not colocated:
                names = ", ".join(r.name for r in sharded)
                raise UnsupportedQueryError(
                    f"statement joins sharded tables that are not bound together ({names}):"
                    " their rows live on different shards. A SELECT may join tables sharded"
                    " the same way (same strategy and parameters, splits that divide each"
                    " other) on their sharding column; otherwise bind one to the other"
                    " (bound_to), or query them separately"
                )
            driving = widest
            sharded = [driving, *(r for r in sharded if r is not driving)]
        return tuple(sharded + [r for r in rules if r.kind != "sharded"]), driving

    def _conditions(
        self, tree: exp.Expression, tables: Sequence[TableRule]
    ) -> tuple[KeyCondition, ...]:
        where = tree.args.get("where")
        found: list[KeyCondition] = []
        sharded = [t for t in tables if t.kind == "sharded"]
        for index, node in enumerate(_conjuncts(where)):
            column: exp.Column | None = None
            refs: tuple[ValueRef, ...] = ()
            in_path: tuple[int, ...] | None = None
            if isinstance(node, exp.EQ):
                left, right = node.this, node.expression
                if isinstance(right, exp.Column) and not isinstance(left, exp.Column):
                    left, right = right, left
                ref = value_ref(right)
                if isinstance(left, exp.Column) and ref is not None:
                    column, refs = left, (ref,)
            elif isinstance(node, exp.In) and not node.args.get("query"):
                values = [value_ref(v) for v in node.expressions]
                if isinstance(node.this, exp.Column) and values and None not in values:
                    column = node.this
                    refs = tuple(v for v in values if v is not None)
                    in_path = (index,)
            if column is None:
                continue
            for table in sharded:
                if column.table and column.table not in (table.name, _alias_of(tree, table)):
                    continue
                rule = _key_of(table, column.name)
                if rule is not None:
                    found.append(KeyCondition(rule, refs, in_path))
                    break
        # Cheapest first: a functional key over a lookup, the primary key over a secondary.
        found.sort(key=lambda c: (c.rule.strategy.cost, not c.rule.primary, len(c.refs)))
        return tuple(found)

    def _select(self, sql: str, tree: exp.Select, verdict: shapes.Verdict) -> Plan:
        confined_by: list[set[tuple[tuple[str, str], ValueRef]]] = []
        nested = _confined_subqueries(tree, self.topology, confined_by)
        label_as_written(sql, tree)
        tables, driving = self._tables(tree, reading=True)
        conditions = self._conditions(tree, tables)
        plan = Plan(sql, "select", tables, driving, conditions, tree)
        if confined_by:
            # The statement runs where its routing condition sends it: each subquery confined
            # by value must be confined to that very key and value.
            route = plan.routing_condition
            used = (
                ((route.rule.column.lower(), route.rule.strategy.name), route.refs[0])
                if route is not None and len(route.refs) == 1
                else None
            )
            if any(used not in pairs for pairs in confined_by):
                raise UnsupportedQueryError(
                    "a subquery confined to a key value the statement is not routed by (it"
                    " routes by its cheapest key condition: an order_id before a user_id);"
                    " give the subquery the outer query's routing key and value"
                )
        plan.has_limit = tree.args.get("limit") is not None
        if driving is not None:
            first = tree.args.get("from_")
            _refuse_unsafe_joins(
                tree, first.this if first is not None else None, tree.args.get("joins"), tables
            )
            if verdict.fanout_refusal is not None or nested is not None:
                plan.scatter_refusal = verdict.fanout_refusal or nested
                return plan
            if tree.args.get("locks"):
                # Each shard would lock its rows on its own connection outside any one
                # transaction (a transaction stays on one shard), so the locks would not be
                # the caller's; on one target they are.
                plan.scatter_refusal = (
                    "locking read (FOR UPDATE / LOCK IN SHARE MODE) across shards: the locks"
                    " would be taken outside your transaction, which stays on one shard; route"
                    " it by a key"
                )
                return plan
            late = LateParams.of(tree)
            if late is not None:
                # Planned again with the values written in, when it fans out (run()).
                plan.late = late
                plan.bind_late = self._late_binder(sql, late)
                return plan
            try:
                # What cannot be merged is refused only when the statement fans out: routed
                # to one target, COUNT(DISTINCT ...) or windows are fine.
                plan.scatter_ast, plan.merge = scatter(
                    tree,
                    _int_columns(tree, self.topology),
                    frozenset(c for t in tables for c in t.keys),
                    _int_columns(tree, self.topology, partitioned=True),
                )
                plan.offset_depth = plan.merge.offset
            except UnsupportedQueryError as exc:
                plan.scatter_refusal = str(exc)
        return plan

    def _insert(self, sql: str, tree: exp.Insert, verdict: shapes.Verdict) -> Plan:
        tables, driving = self._tables(tree)
        if tree.args.get("expression") is None or not isinstance(
            tree.args["expression"], exp.Values
        ):
            raise UnsupportedQueryError(
                "INSERT ... SELECT is not routed: read the rows, then insert them by key"
            )
        for node in tree.find_all(exp.Select, exp.Union):
            # Each shard would evaluate it over its own rows (or a table it does not hold).
            raise UnsupportedQueryError(
                f"subquery {node.sql(dialect='mysql')!r} in an INSERT is not routed: each shard"
                " would evaluate it over its own rows only; read the value first and pass it as"
                " a parameter"
            )
        if driving is None:
            if verdict.fanout_refusal is not None and len(self.topology.shards) > 1:
                # A broadcast row is written once per shard: each copy would differ.
                raise UnsupportedQueryError(
                    f"INSERT into broadcast table {tables[0].name if tables else '?'}:"
                    f" {verdict.fanout_refusal}, and every shard holds a copy of the row that"
                    " must be identical; compute the value in the application and pass it"
                )
            return Plan(sql, "insert", tables, None, (), tree)
        if tree.args.get("ignore") and _lookup_columns(driving):
            raise UnsupportedQueryError(
                f"INSERT IGNORE into {driving.name}, which owns lookup rows, is not routed: a"
                " row the shard ignores would still get its lookup rows; insert without IGNORE"
                " and handle the duplicate-key error"
            )
        rows_node = tree.args["expression"].expressions
        if verdict.strict_refusal is not None and len(rows_node) > 1:
            raise UnsupportedQueryError(
                f"multi-row INSERT into {driving.name}: {verdict.strict_refusal}"
                " (the rows may go to different shards); insert one row per statement"
            )
        schema = tree.this
        if not isinstance(schema, exp.Schema):
            raise UnsupportedQueryError(
                f"INSERT INTO {driving.name} needs an explicit column list"
                " (INSERT INTO t (a, b) VALUES ...) so the sharding key can be found"
            )
        # MySQL column names ignore case; topology column names are lowercase (config checks).
        columns = tuple(c.name.lower() for c in schema.expressions)
        rule = next(
            (
                driving.keys[c]
                for c in columns
                if c in driving.keys
                and driving.keys[c].lookup_table is None
                and driving.keys[c].primary
            ),
            None,
        )
        if rule is None:
            rule = next(
                (
                    driving.keys[c]
                    for c in columns
                    if c in driving.keys and driving.keys[c].lookup_table is None
                ),
                None,
            )
        if rule is None:
            keys = ", ".join(k for k, r in driving.keys.items() if r.lookup_table is None)
            raise UnsupportedQueryError(
                f"INSERT INTO {driving.name} has no sharding key column (give one of: {keys})"
            )
        _refuse_omitted_lookup_columns(driving, columns)
        # Key columns (the routing key and every lookup's columns) must be parameters or
        # literals: their values decide where rows go. Other columns may be any expression
        # (NOW(3), COALESCE(...)): they are sent to the shard as written.
        needed = {rule.column} | _lookup_columns(driving)
        rows: list[tuple[ValueRef, ...]] = []
        for row in tree.args["expression"].expressions:
            if len(row.expressions) != len(columns):
                raise UnsupportedQueryError(
                    f"INSERT INTO {driving.name}: a VALUES row has {len(row.expressions)}"
                    f" values for {len(columns)} columns"
                )
            refs: list[ValueRef] = []
            for column, value in zip(columns, row.expressions, strict=True):
                ref = value_ref(value)
                if ref is None and column in needed:
                    raise UnsupportedQueryError(
                        f"INSERT INTO {driving.name}: {column} decides where the row goes, so"
                        f" its value must be a parameter or a literal, not"
                        f" {value.sql(dialect='mysql')!r}"
                    )
                refs.append(ref if ref is not None else _UNRESOLVED)
            rows.append(tuple(refs))
        _refuse_key_change(tree.args.get("conflict"), driving, "ON DUPLICATE KEY UPDATE")
        plan = Plan(sql, "insert", tables, driving, (), tree)
        plan.insert_rule = rule
        plan.insert_columns = columns
        plan.insert_rows = tuple(rows)
        return plan

    def _write(self, sql: str, tree: exp.Expression, kind: Kind, verdict: shapes.Verdict) -> Plan:
        self._refuse_nested(tree)
        tables, driving = self._tables(tree)
        first = tree.this if isinstance(tree.this, exp.Table) else None
        joins = first.args.get("joins") if first is not None else None
        if kind == "delete":
            _refuse_owner_multi_table_delete(tree, first, tables)
        if driving is not None and joins:
            _refuse_unsafe_joins(tree, first, joins, tables)
            _refuse_broadcast_write_by_join(tree, kind, tables)
        if kind == "update" and driving is not None:
            for assignment in tree.expressions:
                target = assignment.this
                name = target.name if isinstance(target, exp.Column) else ""
                for table in tables:
                    rule = _key_of(table, name)
                    if rule is not None and rule.lookup_table is not None:
                        raise UnsupportedQueryError(
                            f"UPDATE changes lookup column {table.name}.{name}: its row in"
                            f" {rule.lookup_table} would go stale. Delete the row and insert"
                            " it again instead (lookup updates are not supported yet)"
                        )
                    if rule is not None:
                        raise UnsupportedQueryError(
                            f"UPDATE changes sharding column {table.name}.{name}: the row would"
                            " have to move shards. Delete it and insert it again instead"
                        )
        conditions = self._conditions(tree, tables)
        plan = Plan(sql, kind, tables, driving, conditions, tree)
        plan.scatter_refusal = verdict.fanout_refusal
        plan.has_limit = tree.args.get("limit") is not None or tree.args.get("order") is not None
        # DELETE ... ORDER BY ... LIMIT of a lookup owner is routed: its lookup cleanup takes
        # exactly the rows the DELETE removed (`... LIMIT n RETURNING`, MariaDB 10.0+), and the
        # execution refuses ORDER BY/LIMIT over more than one target.
        return plan


# -- labels ---------------------------------------------------------------------------------

# Where the select list ends (at paren depth 0).
_LIST_END = frozenset(
    {
        TokenType.FROM,
        TokenType.WHERE,
        TokenType.GROUP_BY,
        TokenType.HAVING,
        TokenType.ORDER_BY,
        TokenType.LIMIT,
        TokenType.INTO,
        TokenType.UNION,
        TokenType.FOR,
        TokenType.LOCK,
        TokenType.WINDOW,
        TokenType.SEMICOLON,
    }
)
_SELECT_MODIFIERS = frozenset({TokenType.DISTINCT, TokenType.ALL})
# An item whose label is not its text (a column's is its name, a string's its value) or
# whose text holds a parameter (the label is the bound value): left as it is.
_NOT_RELABELLED = (
    exp.Column,
    exp.Star,
    exp.Literal,
    exp.Null,
    exp.Boolean,
    exp.Placeholder,
)
# SQLAlchemy text() reads :name as a bind parameter, even inside a backtick-quoted alias.
_BIND = re.compile(r"(?<![:\w\\]):\w")


_REPLACE = re.compile(
    r"(?:\s|/\*(?:[^*]|\*(?!/))*\*/|(?:--|#)[^\n]*(?:\n|$))*REPLACE\b", re.IGNORECASE
)
"""A statement that begins with REPLACE (after blanks and comments)."""

REPLACE_REFUSAL = (
    "REPLACE is not routed: it deletes whichever rows conflict with the new one on any unique"
    " key, but only on the shard the new row routes to, and the lookup rows of the rows it"
    " deletes would go stale. Write INSERT ... ON DUPLICATE KEY UPDATE (routed, lookup rows"
    " kept right), or DELETE then INSERT in one transaction"
)


_DDL = (exp.Create, exp.Drop, exp.Alter, exp.TruncateTable)
_SET_OPERATIONS = (exp.Union, exp.Intersect, exp.Except)


def _not_routed(tree: exp.Expression, sql: str) -> str:
    """Why a statement of this kind is refused, and what to do instead."""
    if isinstance(tree, exp.Subquery):
        return "a SELECT in parentheses is not routed: send it without the parentheses"
    if isinstance(tree, exp.Command):
        kind = str(tree.this).upper()
    elif isinstance(tree, exp.Alias | exp.Anonymous | exp.Values):
        # What sqlglot makes of a statement it does not know (SAVEPOINT, FLUSH, VALUES):
        # named by its first word.
        first = next(iter(MySQL().tokenize(sql)), None)
        kind = first.text.upper() if first is not None else type(tree).__name__.upper()
    else:
        kind = type(tree).__name__.upper()
    kind = {"TRUNCATETABLE": "TRUNCATE", "TRANSACTION": "BEGIN"}.get(kind, kind)
    if isinstance(tree, _DDL) or kind == "RENAME":
        return (
            f"{kind} is DDL, which the router does not run: apply schema changes to every"
            " shard with `shardctl schema apply`"
        )
    if isinstance(tree, _SET_OPERATIONS):
        return (
            f"{kind} statements are not routed; run each SELECT through the router and"
            " combine the rows"
        )
    if isinstance(tree, exp.Transaction | exp.Commit | exp.Rollback):
        return (
            f"{kind} is not routed: use router.transaction() (a transaction bound to one"
            " shard, or XA), not transaction statements"
        )
    return (
        f"{kind} statements are not routed: run them on one shard's connection"
        " (router.connection(user_id=...))"
    )


def _int_columns(
    tree: exp.Select, topology: Topology, *, partitioned: bool = False
) -> dict[str, frozenset[str]]:
    """Sharding-key columns whose strategy takes ints, by the qualifier naming their table
    (and ``""`` when the statement reads one table): their values are never strings.
    ``partitioned``: only functional keys (not lookups): a value of one lives in one slot, so
    on one shard and in one split, and distinct values counted per target add up."""
    # The statement's own FROM and JOINs (a subquery's alias of the same name is another
    # table, and its columns are not the merge's).
    sources = [tree.args.get("from_"), *(tree.args.get("joins") or ())]
    tables = [s.this for s in sources if s is not None and isinstance(s.this, exp.Table)]
    found: dict[str, frozenset[str]] = {}
    for table in tables:
        rule = topology.tables.get(table.name)
        if rule is None:
            continue
        names = frozenset(
            column.lower()
            for column, key in rule.keys.items()
            if key.key_type is KeyType.INT and not (partitioned and key.lookup_table is not None)
        )
        found[(table.alias or table.name).lower()] = names
        if len(tables) == 1:
            found[""] = names
    return found


_BARE_FUNCTIONS: dict[str, Callable[[], exp.Expression]] = {
    "UTC_DATE": exp.UtcDate,
    "UTC_TIME": exp.UtcTime,
    "UTC_TIMESTAMP": exp.UtcTimestamp,
}
"""MySQL functions callable without parentheses that sqlglot reads as columns (CURRENT_DATE,
LOCALTIME and the like it parses as functions)."""


def _bare_time_functions(tree: exp.Expression) -> exp.Expression:
    """``tree`` with unquoted, unqualified ``UTC_DATE``/``UTC_TIME``/``UTC_TIMESTAMP`` as the
    functions MySQL reads them as (reserved words: never a column unless quoted)."""
    for column in list(tree.find_all(exp.Column)):
        ident = column.this
        make = _BARE_FUNCTIONS.get(column.name.upper())
        if (
            make is not None
            and not column.table
            and isinstance(ident, exp.Identifier)
            and not ident.quoted
        ):
            node = make()
            if column is tree:
                return node
            column.replace(node)
    return tree


def quotient_items(tree: exp.Expression) -> frozenset[int]:
    """Positions of a SELECT's items holding a division or an AVG (up to a ``*``, after which
    positions are the tables'): a DECIMAL quotient, which its SELECT sends rounded at its own
    scale, while a UNION column of a larger scale holds it rounded at that scale."""
    if not isinstance(tree, exp.Select):
        return frozenset()
    found = set()
    for i, item in enumerate(tree.expressions):
        inner = item.unalias()
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if isinstance(inner, exp.Star):
            break
        if isinstance(inner, exp.Round) and isinstance(inner.args.get("decimals"), exp.Literal):
            continue  # exact at its places: padded to the column's scale as one database does
        if item.find(exp.Avg) is not None or any(
            not _exact_division(d) for d in item.find_all(exp.Div)
        ):
            found.add(i)
    return frozenset(found)


def _exact_division(div: exp.Div) -> bool:
    """A division by an integer of only the factors 2 and 5, each at most 4 times (``x / 100``,
    ``x / 2``, ``x / 16``): exact within div_precision_increment's 4 more digits (its default),
    so the scale its SELECT sends holds it, unlike other quotients."""
    divisor = div.expression
    if not (isinstance(divisor, exp.Literal) and not divisor.is_string and divisor.this.isdigit()):
        return False
    n = int(divisor.this)
    if n == 0:
        return False
    for factor in (2, 5):
        count = 0
        while n % factor == 0:
            n //= factor
            count += 1
        if count > 4:
            return False
    return n == 1


def label_as_written(sql: str, tree: exp.Select) -> None:
    """Alias each unaliased expression of the select list with its text as written.

    MySQL labels an unaliased select item by its text (``count( * )``, ``a +  1``, leading and
    trailing comments and spaces left out; MariaDB cuts a label to 255 bytes, an alias too),
    while every statement the router sends is sqlglot's rendering of the tree (physical table
    names, split tables, the scatter rewrite): ``COUNT(*)``, ``INTERVAL '1' DAY``,
    ``SEPARATOR ','``. The alias makes the shards answer with the label one database gives.
    Columns (labelled by their name), literals (a string by its value) and items with
    parameters (labelled by the bound value) keep sqlglot's rendering, which labels them alike.
    """
    texts = _item_texts(sql, len(tree.expressions))
    if texts is None:
        return
    items = list(tree.expressions)
    for i, (item, text) in enumerate(zip(items, texts, strict=True)):
        inner: exp.Expression = item
        while isinstance(inner, exp.Paren):
            inner = inner.this
        if isinstance(item, exp.Alias):
            name = item.alias
            if mysql_label(name) != name and not text.rstrip().endswith("`"):
                # An alias written as a string ('x😀'): MariaDB labels it as it labels text,
                # while the identifier the rendering makes of it would be refused (1300); an
                # identifier alias (`x😀`) is refused by one database too, and stays.
                item.set("alias", exp.to_identifier(mysql_label(name), quoted=True))
            continue
        label = _literal_label(inner, text)
        if label is not None:
            if label != item.sql(dialect="mysql"):
                items[i] = exp.alias_(item, mysql_label(label), quoted=True)
            continue
        if (
            isinstance(item, exp.Alias)
            or isinstance(inner, _NOT_RELABELLED)
            or any(True for _ in item.find_all(exp.Placeholder))
            or _BIND.search(text)
        ):
            continue
        items[i] = exp.alias_(item, mysql_label(text), quoted=True)
    tree.set("expressions", items)


def _literal_label(item: exp.Expression, text: str) -> str | None:
    """The label MySQL gives a literal select item (``item``: its parentheses taken off)
    written as ``text``, where sqlglot's rendering says otherwise: a number by its text
    without parentheses and a leading ``+`` (``.5``, ``(.5)`` and ``+.5`` are all ``.5``, which
    sqlglot writes 0.5), adjacent strings by their joined value (``'a' 'b'`` is ``ab``, which
    sqlglot writes as CONCAT). None for any other item."""
    number = isinstance(item, exp.Literal) and not item.is_string
    while True:  # ((.5)), +(.5), (+.5): MySQL drops both
        if number:
            text = text.lstrip("+ \t\r\n")
        if not (text.startswith("(") and text.endswith(")")):
            break
        text = text[1:-1].strip()
    if number:
        return text
    if (
        isinstance(item, exp.Concat)
        and text[:1] in ("'", '"')
        and all(isinstance(e, exp.Literal) and e.is_string for e in item.expressions)
    ):
        return "".join(e.this for e in item.expressions)
    return None


def _item_texts(sql: str, count: int) -> list[str] | None:
    """The text of each item of the top-level select list, or None when the list cannot be
    found in the tokens (the items are then left as they are)."""
    try:
        tokens: list[Token] = SHARD_DIALECT.tokenize(sql)
    except SqlglotError:
        return None
    if not tokens or tokens[0].token_type != TokenType.SELECT:
        return None
    i = 1
    while i < len(tokens) and tokens[i].token_type in _SELECT_MODIFIERS:
        i += 1
    items: list[list[Token]] = [[]]
    depth = 0
    for token in tokens[i:]:
        kind = token.token_type
        if depth == 0 and kind in _LIST_END:
            break
        if kind == TokenType.L_PAREN:
            depth += 1
        elif kind == TokenType.R_PAREN:
            depth -= 1
        elif kind == TokenType.COMMA and depth == 0:
            items.append([])
            continue
        items[-1].append(token)
    if len(items) != count or any(not item for item in items):
        return None
    return [sql[item[0].start : item[-1].end + 1] for item in items]


# -- helpers --------------------------------------------------------------------------------


_UNRESOLVED = ValueRef(param=None, literal=None)
"""Stands for a VALUES expression the router does not evaluate (it never decides routing)."""


def _lookup_columns(table: TableRule) -> set[str]:
    """Columns whose values an INSERT needs to write the table's lookup rows."""
    needed: set[str] = set()
    for rule in table.keys.values():
        if isinstance(rule.strategy, LookupStrategy):
            needed |= {rule.column, *rule.strategy.row_columns[1:]}
    return needed


def _refuse_omitted_lookup_columns(table: TableRule, columns: Sequence[str]) -> None:
    """An INSERT into a lookup owner must name every column its lookup rows are made of: the
    router writes lookup rows from the statement's values, and a column left out gets its
    DEFAULT on the shard (or an AUTO_INCREMENT value), which no lookup row would point to."""
    for name, rule in table.keys.items():
        strategy = rule.strategy
        if not isinstance(strategy, LookupStrategy):
            continue
        omitted = [c for c in (name, *strategy.row_columns[1:]) if c not in columns]
        if omitted:
            raise UnsupportedQueryError(
                f"INSERT INTO {table.name} leaves out {', '.join(omitted)}: the shard would"
                f" store the column's default with no row in lookup table {strategy.table},"
                f" and reads by {name} would miss the row; write {', '.join(omitted)}"
                " explicitly in the INSERT's column list"
            )


ZERO = "0"
FLOAT_PROBE = "CAST(0.1 AS FLOAT)"
"""0.1 through a FLOAT column (its 6 digits), 0.10000000149011612 through a DOUBLE one."""
DATE_PROBE = "CAST('2000-01-01' AS DATE)"
NULL_PROBE = "NULL"
_ZEROS = {
    z: sqlglot.parse_one(z, read="mysql") for z in (ZERO, FLOAT_PROBE, DATE_PROBE, NULL_PROBE)
}


def _typed_zeros(union: exp.Union, zeros: tuple[str, ...]) -> exp.Expression:
    """``union`` with each member reading no rows (LIMIT 0), without the UNION's ORDER BY or
    LIMIT, and a last member of ``zeros`` (see Plan.render_union_types)."""
    union.set("order", None)
    union.set("limit", None)
    union.set("offset", None)
    stack: list[exp.Expression] = [union]
    while stack:  # (members are plain SELECTs: Planner._union refuses others)
        node = stack.pop()
        if isinstance(node, exp.Union):
            stack += [node.this, node.expression]
        elif isinstance(node, exp.Select):
            node.replace(exp.Subquery(this=node.limit(0)))
    row = exp.select(*(_ZEROS[z].copy() for z in zeros))
    return exp.union(union, row, distinct=False)


def _lock_sql(lock: exp.Expression) -> str:
    text = "FOR UPDATE" if lock.args.get("update") else "LOCK IN SHARE MODE"
    wait = lock.args.get("wait")
    if wait is True:
        text += " NOWAIT"
    elif wait is False:
        text += " SKIP LOCKED"
    elif isinstance(wait, exp.Expression):
        text += f" WAIT {wait.sql(dialect='mysql')}"
    return text


def _parse_hint(sql: str) -> str:
    """The way out of a parse error the parser's message does not name: MariaDB's ``GROUP BY
    x DESC`` (ordered groups), which sqlglot does not read."""
    try:
        tokens = SHARD_DIALECT.tokenize(sql)
    except SqlglotError:
        return ""
    grouping = False
    for token in tokens:
        kind = token.token_type
        if kind == TokenType.GROUP_BY:
            grouping = True
        elif kind in (TokenType.ORDER_BY, TokenType.HAVING, TokenType.LIMIT):
            grouping = False
        elif grouping and kind in (TokenType.ASC, TokenType.DESC):
            return (
                " (GROUP BY ... ASC/DESC, MariaDB's ordering of the groups, is not read; write"
                " GROUP BY ... ORDER BY ... DESC)"
            )
    return ""


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _conjuncts(where: exp.Expression | None) -> list[exp.Expression]:
    if where is None:
        return []
    node = where.this if isinstance(where, exp.Where) else where
    out: list[exp.Expression] = []
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, exp.Paren):
            stack.append(current.this)
        elif isinstance(current, exp.And):
            stack.append(current.expression)
            stack.append(current.this)
        else:
            out.append(current)
    return out


def _alias_of(tree: exp.Expression, table: TableRule) -> str | None:
    for node in tree.find_all(exp.Table):
        if node.name == table.name and node.alias:
            return str(node.alias)
    return None


def _refuse_nested_in(tree: exp.Expression, topology: Topology) -> None:
    sharded = any(
        topology.tables.get(t.name) is not None and topology.tables[t.name].kind == "sharded"
        for t in tree.find_all(exp.Table)
    )
    for node in tree.find_all(exp.Select, exp.Union):
        if node is tree:  # type: ignore[comparison-overlap]
            continue
        if sharded:
            raise UnsupportedQueryError(
                "subqueries and UNIONs over sharded tables are not routed (a subquery may need"
                " rows from other shards); run the inner query first and pass its result"
            )


def _union_order(tree: exp.Union, first: exp.Select, width: int) -> tuple[tuple[int, bool], ...]:
    """The UNION's ORDER BY as (position, descending): a position, or a label of the first
    SELECT (its alias, or a column's name)."""
    order = tree.args.get("order")
    if order is None:
        return ()
    labels = [
        (item.alias if isinstance(item, exp.Alias) else item.name).lower()
        if isinstance(item, exp.Alias | exp.Column)
        else None
        for item in first.expressions
    ]
    out = []
    for term in order.expressions:
        key = term.this
        if isinstance(key, exp.Literal) and not key.is_string and key.this.isdigit():
            pos = int(key.this) - 1
        elif isinstance(key, exp.Column) and not key.table and key.name.lower() in labels:
            pos = labels.index(key.name.lower())
        else:
            raise UnsupportedQueryError(
                f"ORDER BY {key.sql(dialect='mysql')} of a UNION: order by a position or a"
                " column name of the first SELECT"
            )
        if not 0 <= pos < width:
            raise UnsupportedQueryError(f"ORDER BY position {pos + 1} of a UNION is out of range")
        out.append((pos, bool(term.args.get("desc"))))
    return tuple(out)


def _count_of(node: exp.Expression) -> int | str:
    """A UNION's LIMIT or OFFSET: its number, or its parameter's name."""
    if isinstance(node, exp.Literal) and not node.is_string and node.this.isdigit():
        return int(node.this)
    if isinstance(node, exp.Placeholder) and node.this:
        return str(node.this)
    raise UnsupportedQueryError(
        "LIMIT/OFFSET of a UNION must be integers or named parameters (LIMIT :n); write one"
    )


def _confined_subqueries(
    tree: exp.Select, topology: Topology, confined_by: list[set[tuple[tuple[str, str], ValueRef]]]
) -> str | None:
    """Check the subqueries of a SELECT over sharded tables; return why the statement may
    run on one target only (None: anywhere), or raise UnsupportedQueryError.

    A subquery is answered inside one shard (and split), so it must need no other shard's
    rows: over broadcast tables only (every shard holds the same copy), or correlated to the
    outer rows by an equality of the same functional sharding key (``i.order_id =
    o.order_id``: the rows it reads sit with the outer row), or restricted to the outer query's
    own key value (``user_id = :u`` in both: one target). One level deep, no UNION. Outside
    the WHERE (select list, HAVING, ORDER BY) or when confined by value, on one target only:
    the scatter rewrite and the merge do not look inside subqueries. ``confined_by`` gets, per
    subquery confined by value, the (key, value) pairs it shares with the outer query."""
    outer_refs = _direct_tables(tree, topology)
    outer_values = _key_values(tree, outer_refs)
    where = tree.args.get("where")
    refusal: str | None = None
    for found in tree.find_all(exp.Select, exp.Union):
        node = cast(exp.Expression, found)
        if node is tree:
            continue
        inner_tables = [topology.tables.get(t.name) for t in node.find_all(exp.Table)]
        if not any(t is not None and t.kind == "sharded" for t in inner_tables):
            if not _within(node, where):
                refusal = refusal or _ONE_TARGET_SUBQUERY
            continue  # over broadcast (or no) tables: the same on every shard
        if isinstance(node, exp.Union) or _nested_in_subquery(node, tree):
            raise UnsupportedQueryError(
                f"subquery {_show(node)} over sharded tables: only one level of SELECT"
                " subqueries (no UNION) is routed; run the inner query first"
            )
        assert isinstance(node, exp.Select)
        inner_refs = _direct_tables(node, topology)
        first = node.args.get("from_")
        _refuse_unsafe_joins(
            node,
            first.this if first is not None else None,
            node.args.get("joins"),
            list(dict.fromkeys(inner_refs.values())),
        )
        if _correlated_by_key(node, inner_refs, outer_refs):
            if not _within(node, where):
                refusal = refusal or _ONE_TARGET_SUBQUERY
            continue
        inner_values = _key_values(node, inner_refs)
        shared = {
            (key, ref)
            for key, refs in inner_values.items()
            for ref in refs & outer_values.get(key, set())
        }
        if shared:
            # One target only: the one the outer query routes to, which must be this key's
            # (checked against the plan's routing condition by _select).
            confined_by.append(shared)
            refusal = refusal or (
                f"subquery {_show(node)} is confined to the outer query's key value, so the"
                " statement runs on that key's target only; route it by that key"
            )
            continue
        raise UnsupportedQueryError(
            f"subquery {_show(node)} over sharded tables is not confined to one shard: it needs"
            " an equality of the same sharding key with the outer query's table (i.order_id ="
            " o.order_id) or the outer query's key value (user_id = :u in both); run the inner"
            " query first and pass its result"
        )
    return refusal


_ONE_TARGET_SUBQUERY = (
    "a subquery outside the WHERE (in the select list, HAVING or ORDER BY) is answered on one"
    " target only: the merge does not look inside it; route the statement by a key"
)


def _direct_tables(select: exp.Select, topology: Topology) -> dict[str, TableRule]:
    """{reference: rule} of the tables in ``select``'s own FROM and JOINs."""
    out: dict[str, TableRule] = {}
    sources = [select.args.get("from_"), *(select.args.get("joins") or ())]
    for source in sources:
        table = source.this if source is not None else None
        if isinstance(table, exp.Table):
            out[str(table.alias_or_name)] = topology.table(table.name)
    return out


def _key_values(
    select: exp.Select, refs: Mapping[str, TableRule]
) -> dict[tuple[str, str], set[ValueRef]]:
    """{(key column, strategy): values} of the top-level WHERE equalities ``t.k = v`` of
    ``select`` on a functional key of one of its own tables (``refs``)."""
    found: dict[tuple[str, str], set[ValueRef]] = defaultdict(set)
    for node in _conjuncts(select.args.get("where")):
        if not isinstance(node, exp.EQ):
            continue
        for column, other in ((node.this, node.expression), (node.expression, node.this)):
            ref = value_ref(other)
            rule = _column_rule(column, refs)
            if ref is not None and rule is not None:
                found[(rule.column.lower(), rule.strategy.name)].add(ref)
    return found


def _column_rule(column: exp.Expression, refs: Mapping[str, TableRule]) -> KeyRule | None:
    """The functional key rule of ``column`` when it names one of ``refs``' tables (by its
    qualifier, or unqualified when there is one table)."""
    if not isinstance(column, exp.Column):
        return None
    if column.table:
        table = refs.get(column.table)
    else:
        table = next(iter(refs.values())) if len(refs) == 1 else None
    if table is None or table.kind != "sharded":
        return None
    rule = _key_of(table, column.name)
    return rule if rule is not None and rule.lookup_table is None else None


def _correlated_by_key(
    select: exp.Select, inner: Mapping[str, TableRule], outer: Mapping[str, TableRule]
) -> bool:
    """Whether a top-level WHERE conjunct of the subquery equates a functional key of one of
    its tables with the same key of an outer table (qualified, not shadowed by an inner one)."""
    outer_only = {name: rule for name, rule in outer.items() if name not in inner}
    for node in _conjuncts(select.args.get("where")):
        if not isinstance(node, exp.EQ):
            continue
        a, b = node.this, node.expression
        for mine, theirs in ((a, b), (b, a)):
            if not (isinstance(mine, exp.Column) and isinstance(theirs, exp.Column)):
                continue
            if not mine.table or not theirs.table or theirs.table not in outer_only:
                continue
            key_in, key_out = _column_rule(mine, inner), _column_rule(theirs, outer_only)
            if (
                key_in is not None
                and key_out is not None
                and key_in.column.lower() == key_out.column.lower()
                and key_in.strategy.name == key_out.strategy.name
            ):
                return True
    return False


def _within(node: exp.Expression, scope: exp.Expression | None) -> bool:
    parent = node.parent
    while parent is not None:
        if parent is scope:
            return True
        parent = parent.parent
    return False


def _nested_in_subquery(node: exp.Expression, top: exp.Expression) -> bool:
    parent = node.parent
    while parent is not None and parent is not top:
        if isinstance(parent, exp.Select | exp.Union):
            return True
        parent = parent.parent
    return False


def _refuse_unsafe_joins(
    tree: exp.Expression,
    first: exp.Expression | None,
    joins: Sequence[exp.Expression] | None,
    tables: Sequence[TableRule],
) -> None:
    """Joins run inside each shard (and split): only co-located rows can meet.

    Joins are read in order. A sharded table joined when sharded tables are already in the
    FROM must be joined to one of them by an equality, a top-level conjunct of its ON, between
    the same functional sharding column of both (two different table references: user_id =
    user_id, or order_id = order_id whose gene carries the user's slot). An equality under OR
    or NOT, against a constant, or of a reference with itself proves nothing. A broadcast table
    must not be the preserved side of an outer join with a sharded one, or each shard would add
    its own unmatched copy. A comma join (or a JOIN without ON) is an inner join whose condition
    is the WHERE: a WHERE conjunct proves it; a CROSS JOIN of sharded tables is refused.
    """
    rules = {t.name: t for t in tables}
    aliases: dict[str, TableRule] = {}
    # This statement's own references (FROM and JOINs), not a subquery's: an inner alias of
    # the same name would stand for another table.
    for source in [first, *(j.this for j in joins or [])]:
        if isinstance(source, exp.Table) and source.name in rules:
            aliases[str(source.alias_or_name)] = rules[source.name]
        elif source is not None and any(
            t.name in rules and rules[t.name].kind == "sharded" for t in source.find_all(exp.Table)
        ):
            raise UnsupportedQueryError(
                f"{_show(source)}: a parenthesized join or a derived table over sharded"
                " tables is not routed (its co-location is not checked); write the joins"
                " flat, JOIN ... ON ... JOIN ... ON ..."
            )
    present: list[str] = []  # references in the FROM so far
    if isinstance(first, exp.Table) and str(first.alias_or_name) in aliases:
        present.append(str(first.alias_or_name))
    for join in joins or []:
        table = join.this
        if not isinstance(table, exp.Table) or str(table.alias_or_name) not in aliases:
            continue
        ref = str(table.alias_or_name)
        rule = aliases[ref]
        left_kinds = {aliases[r].kind for r in present}
        side = (join.args.get("side") or "").upper()
        if rule.kind == "sharded" and "sharded" in left_kinds:
            if join.args.get("using"):
                raise UnsupportedQueryError(
                    f"JOIN {rule.name} USING (...) with another sharded table is not routed:"
                    " write the join as ON a.user_id = b.user_id (or order_id) so the planner"
                    " can see which tables it equates"
                )
            earlier = [r for r in present if aliases[r].kind == "sharded"]
            on = join.args.get("on")
            if on is None and not join.args.get("kind") and not side:
                # FROM a, b WHERE a.user_id = b.user_id (or JOIN without ON): an inner join
                # whose condition is the WHERE, so a WHERE conjunct may prove co-location.
                on = tree.args.get("where")
            if side and len({aliases[r].split for r in [*earlier, ref]}) > 1:
                # Each split of the wider table is joined with the whole narrower one: an
                # outer join would add the narrower table's unmatched rows once per split.
                raise UnsupportedQueryError(
                    f"{side} JOIN of {rule.name} with a sharded table of another split count:"
                    " each split would add the unmatched rows again; use an inner join, or"
                    " query the tables separately"
                )
            if not _colocated(on, ref, earlier, aliases):
                raise UnsupportedQueryError(
                    f"join of {rule.name} on {_show(join.args.get('on'))}: rows of sharded"
                    " tables meet only inside one shard, so the ON must have, as a top-level"
                    " AND term (not under OR or NOT), an equality of the same sharding column"
                    f" of {ref} and of a sharded table joined before it (e.g. ON o.order_id ="
                    " i.order_id or ON a.user_id = b.user_id)"
                )
        if side in ("LEFT", "RIGHT", "FULL") and {rule.kind} | left_kinds == {
            "sharded",
            "broadcast",
        }:
            preserved = left_kinds if side == "LEFT" else {rule.kind}
            if "broadcast" in preserved or side == "FULL":
                raise UnsupportedQueryError(
                    f"{side} JOIN keeping the rows of a broadcast table with a sharded one:"
                    " every shard would add its own unmatched copies; join the other way or"
                    " query the broadcast table separately"
                )
        present.append(ref)


def _colocated(
    on: exp.Expression | None,
    joined: str,
    earlier: Sequence[str],
    aliases: Mapping[str, TableRule],
) -> bool:
    """Whether a top-level conjunct of ``on`` equates a functional sharding column of the
    reference ``joined`` with the same column of one of the ``earlier`` references."""
    for node in _conjuncts(on):
        if not isinstance(node, exp.EQ):
            continue
        a, b = node.this, node.expression
        if not (isinstance(a, exp.Column) and isinstance(b, exp.Column)):
            continue
        if str(b.table) == joined:
            a, b = b, a
        if str(a.table) != joined or str(b.table) not in earlier or str(b.table) == joined:
            continue
        key_a = _key_of(aliases[joined], a.name)
        key_b = _key_of(aliases[str(b.table)], b.name)
        if (
            key_a is not None
            and key_b is not None
            and key_a.lookup_table is None
            and key_b.lookup_table is None
            and key_a.column.lower() == key_b.column.lower()
            and key_a.strategy.name == key_b.strategy.name
        ):
            return True
    return False


def _refuse_broadcast_write_by_join(
    tree: exp.Expression, kind: Kind, tables: Sequence[TableRule]
) -> None:
    """A multi-table UPDATE/DELETE that writes a broadcast table joined with a sharded one:
    each shard would change its copy by its own rows, and the copies would differ."""
    targets = _delete_targets(tree)
    refs: dict[str, TableRule] = {}
    for node in tree.find_all(exp.Table):
        rule = next((t for t in tables if t.name == node.name), None)
        if rule is not None and not any(node is t for t in targets):
            refs[str(node.alias_or_name)] = rule
    if kind == "update":
        written = [a.this.table if isinstance(a.this, exp.Column) else "" for a in tree.expressions]
    else:
        written = [str(t.name) for t in targets]
    broadcast = {ref for ref, rule in refs.items() if rule.kind == "broadcast"}
    for ref in written:
        # An unqualified SET column could belong to the broadcast table: refuse that too.
        if ref in broadcast or (not ref and broadcast):
            raise UnsupportedQueryError(
                f"multi-table {kind.upper()} writing broadcast table"
                f" {refs[ref or sorted(broadcast)[0]].name} joined with a sharded"
                " table: every shard would change its own copy by its own rows, and the copies"
                " would differ; qualify the columns you SET, and write broadcast tables by"
                " their own key"
            )


def _delete_targets(tree: exp.Expression) -> list[exp.Expression]:
    """The tables a multi-table DELETE deletes from (``DELETE o, i FROM ...``), else []."""
    if not isinstance(tree, exp.Delete):
        return []
    return list(tree.args.get("tables") or [])


def _refuse_owner_multi_table_delete(
    tree: exp.Expression, first: exp.Table | None, tables: Sequence[TableRule]
) -> None:
    """A multi-table DELETE of a table that owns lookup rows: the lookup cleanup reads the doomed
    rows with a single-table WHERE, which a join changes, so it would remove lookup rows of
    rows that survive (issue 7, defect 2)."""
    targets = _delete_targets(tree)
    joins = first.args.get("joins") if first is not None else None
    if not targets and not joins:
        return
    named: dict[str, TableRule] = {}
    for node in tree.find_all(exp.Table):
        if any(node is t for t in targets):
            continue
        rule = next((t for t in tables if t.name == node.name), None)
        if rule is not None:
            named[str(node.alias_or_name)] = rule
    deleted: list[TableRule] = []
    for target in targets or ([first] if first is not None else []):
        rule = named.get(str(target.name)) if isinstance(target, exp.Table) else None
        if rule is None:
            raise UnsupportedQueryError(
                f"DELETE target {_show(target)} names no table of the FROM clause"
            )
        deleted.append(rule)
    for rule in deleted:
        owned = sorted(r.lookup_table for r in rule.keys.values() if r.lookup_table is not None)
        if owned:
            raise UnsupportedQueryError(
                f"multi-table DELETE of {rule.name}, which owns lookup rows"
                f" ({', '.join(owned)}), is not routed: the lookup cleanup could not tell which"
                f" rows the join removed; delete by key from the owner table (DELETE FROM"
                f" {rule.name} WHERE <key> = :k)"
            )


def _key_of(table: TableRule, column: str) -> KeyRule | None:
    """The sharding key rule of ``column`` (MySQL column names ignore case)."""
    rule = table.keys.get(column)
    if rule is None:
        lowered = column.lower()
        rule = next((r for c, r in table.keys.items() if c.lower() == lowered), None)
    return rule


def _show(node: exp.Expression | None) -> str:
    return repr(node.sql(dialect="mysql")) if node is not None else "(no condition)"


def _refuse_key_change(node: exp.Expression | None, table: TableRule, where: str) -> None:
    if node is None:
        return
    for column in node.find_all(exp.Column):
        parent = column.parent
        if isinstance(parent, exp.EQ) and parent.this is column and _key_of(table, column.name):
            raise UnsupportedQueryError(
                f"{where} changes sharding column {table.name}.{column.name}; delete the row"
                " and insert it again instead"
            )


__all__ = ["Exclusion", "KeyCondition", "Plan", "Planner", "Target", "ValueRef", "only_params"]
