"""SQLAlchemy ORM integration: a Session that routes mapped objects and ORM queries to shards.

Usage::

    Session = routed_sessionmaker(router)          # a sessionmaker of RoutedSession
    with Session() as session:
        session.add_all([User(user_id=42, ...), Order(order_id=ids.next_id(user_id=42), ...)])
        session.commit()                           # each row on its user's shard and split
        order = session.get(Order, order_id)       # one shard: the id's gene names it
        mine = session.scalars(select(Order).where(Order.user_id == 42)).all()   # one shard
        top = session.scalars(select(Order).order_by(Order.amount_cents.desc()).limit(5)).all()
        # ^ every shard, merged: the same five rows one database would return

``RoutedSession(router, **session_kwargs)`` is a ``sqlalchemy.ext.horizontal_shard.ShardedSession``
whose shards are the router's primary engines; ``routed_sessionmaker(router, **kw)`` is
``sessionmaker(class_=RoutedSession, router=router, **kw)``. A mapped class is routed by its
table: ``router.topology.table(mapper.persist_selectable.name)`` gives the rule, the primary
sharding column's value places a new object, functional secondary keys (``orders.order_id`` by
its gene) route ``get()`` and queries. The ORM reads and writes primaries only.

Placements and identity tokens
------------------------------
A row lives in a *placement*: a shard and, for split tables, one physical table of it. Every
placement has a string token, the shard id for unsplit tables (``"s0"``) and ``"<shard>/<r>"``
for split ones (``"s0/2"`` holds ``orders_0002`` and ``order_items_0002``, the rows whose slot is
2 modulo the split). The token is the horizontal_shard shard id and the identity token of every
object loaded or flushed there, so the identity map stays exact: one row, one token, whichever
query loaded it. All placements of a shard share the session's one connection (one transaction)
to that shard. ``set_shard_id(token)`` and ``bind_arguments={"shard_id": token}`` take tokens;
``session.placement(inspect(obj).identity_token)`` tells where an object lives.

Split tables: statement rewriting
---------------------------------
SQLAlchemy maps a class to one table name and ``schema_translate_map`` only renames schemas, so
the physical name is put in at the last moment: a ``before_cursor_execute`` hook on each shard
engine rewrites, in statements that run for a split placement, the logical names of split tables
to the placement's physical names (one precompiled regex over whole words, e.g. ``\\borders\\b``
-> ``orders_0002``; qualified columns ``orders.user_id`` follow). This is safe here and only here
because the ORM generated the SQL: values travel as bound parameters, never in the text, and
``orders_count`` or ``:orders_user_id`` are other words (a string literal spelling a split
table's name in SQL text, e.g. ``literal_column("'orders'")``, would be renamed too). A statement
names its placement in the ``shardrouter_placement`` execution option, which the session sets on
every ORM statement it routes; for the flush, each placement gets its own thin proxy of the
shard's connection that adds the option, so the unit of work, which batches rows per connection
object, never puts rows of two physical tables into one executemany. Statements without the
option (everything else on these engines, ``router.execute`` included) pass untouched. The
alternative, refusing split tables, would have excluded ``orders``, the table this exists for.
Not rewritten: SQL the user wrote (``text()``, ``from_statement``), which is refused (use
``router.execute``, which parses it properly, or
``session.connection(bind_arguments={"shard_id": token})`` with physical names).

Queries
-------
Each ORM statement is compiled once more to MySQL and planned by the router's planner, so the
ORM routes and refuses exactly as ``router.execute`` does:

- key criteria (``=`` or ``IN`` on the primary or a functional secondary key, a top-level
  ``AND`` term; ``session.get`` on an id with a gene) run on their placements only; a lazy or
  selectin load of a bound table (``order.items``) runs on the parent's placement; a lookup
  key (``merchant_id = 7``, ``IN``) reads its lookup table first, as ``router.execute`` does,
  and runs on the placements of the owners found there (none found: one placement, so an
  aggregate still returns its row); everything else fans out to every placement of the table
  (correct, not cheap: one statement per placement, in turn, on the session's connections);
- across placements, ORDER BY, LIMIT and OFFSET are merged correctly (each placement returns its
  first ``offset + limit`` rows in order, with the sort keys as extra columns; a k-way merge of
  ``shardrouter.sql.merge`` keeps the global first ``limit`` after ``offset``); entity and column
  queries alike; NULLs sort as MySQL sorts them; strings by the shards' collation weights
  (the router's ``WEIGHT_STRING(x AS CHAR(255))``);
- column-only aggregates, GROUP BY, HAVING and DISTINCT across placements run the planner's
  scatter SQL on the session's connections and merge the partials (``router.execute``'s merge);
  the values come back as the driver returns them, without the ORM's type processing;
- refused with UnsupportedQueryError (nothing runs): text SQL and ``from_statement``; subqueries,
  EXISTS and UNION over sharded tables (including ``joinedload`` of a collection combined with
  LIMIT, which SQLAlchemy renders as a subquery: use ``selectinload``); joins of sharded tables
  that are not bound together; across placements, aggregates, DISTINCT or GROUP BY together with
  mapped entities, ORDER BY terms that are not column expressions (positions, text, NULLS
  FIRST/LAST), ENUM or SET columns ordered, grouped or deduplicated (MySQL orders them by index),
  and whatever the router refuses across shards (``Plan.scatter_refusal``: COUNT(DISTINCT),
  GROUP_CONCAT, NOW(), a bound parameter in HAVING, ...); ORM bulk INSERT; bulk DELETE of a table
  that owns lookup rows; bulk UPDATE of a sharding column. The router's limits apply:
  ScatterWriteError for a bulk UPDATE/DELETE without key criteria (unless
  ``allow_scatter_write``), FanoutLimitError for ``max_fanout`` and ``max_offset``. Results merged
  across placements are fetched whole (no streaming).

Writes
------
A new object goes to the placement of its primary sharding column (its value must be set: None
raises KeyValueError); its functional secondary keys must route to the same slot (an order id
must carry its user's gene) or the flush is refused. Changing a sharding column of a persistent
object is refused (the row would have to move shards: delete it and add a new one), and so is
writing a broadcast table (use ``router.execute``, which writes every shard). As the router does,
lookup rows (``merchant_orders`` for ``orders.merchant_id``, ``user_emails`` for
``users.email``) are written before the owner rows, each committed on its own (never an owner
its lookup cannot find), and those created for owners the session did not commit (a rollback,
a failed flush) are removed when its transaction ends; a
unique lookup already taken by another owner fails the flush (compared the way the lookup
table's hash folds it: ``fold_case`` e-mail addresses in any case are one value), one held by an
orphan lookup row whose owner does not exist is taken over; the lookup rows of deleted objects
are deleted once the session's transaction has committed (an object added, flushed and deleted
in it leaves none, one deleted and added again keeps its row). A new object of a class that does
not map a lookup column is refused (the row would get the column's default and no lookup row).
All of it is the router's own code
(``execution.lookup_rows``/``write_lookups``/``LookupLedger``/``remove_lookups``), not a
second implementation.
Versions: each transaction of the session routes by the router's topology version of its
first routed use, pinned until the transaction ends (commit, rollback, close()), so a session
kept between units of work does not hold back the router's acknowledgement of a new version.
An object loaded under an older version keeps that version's placement token; its UPDATE or
DELETE is refused (FencedError: reload it in this session) when that token is not its slot's
placement under the session's version.
Resharding switch: a flush (``flush()``, the flush of ``commit()``, an autoflush) that writes
slots a switch is moving right now (a range frozen in the session's version), or writes or
removes lookup rows while any range is frozen (as the router's statements do: their rows live
in steps of their own on other shards), is checked before anything of it runs. When nothing of
the session's transaction ran on any shard yet (no read, no earlier flush, no
``session.connection()``; typically a unit of work's first flush), it is held like a
transaction's first statement (``Router._hold``: at most the range's ``hold_s`` and the
router's ``max_held_writes``, else SwitchHoldError, nothing written) and runs again from its
start on the router's new version, which the transaction then routes by. Otherwise it is
refused with SwitchHoldError: nothing of that flush ran (its objects stay pending), the
transaction is as it was; roll it back and retry the unit of work.
On SQLite shard files, where a writer locks the whole file, a lookup row cannot be written while
this session's own transaction holds a write lock on the lookup row's shard: commit before adding
more such objects (MariaDB has no such limit). Atomicity is per shard, as with horizontal_shard:
the session commits its shard connections one by one.
"""

from __future__ import annotations

import contextlib
import re
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    LargeBinary,
    Table,
    case,
    event,
    func,
    inspect,
    literal,
    null,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Dialect, IteratorResult, Result
from sqlalchemy.engine.interfaces import DBAPICursor, ExecutionContext
from sqlalchemy.engine.result import SimpleResultMetaData
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.ext.horizontal_shard import ShardedSession, set_shard_id
from sqlalchemy.orm import Mapper, ORMExecuteState, Session, UOWTransaction, sessionmaker
from sqlalchemy.orm import exc as orm_exc
from sqlalchemy.orm.exc import UnmappedColumnError
from sqlalchemy.orm.state import InstanceState
from sqlalchemy.sql import CompoundSelect, Delete, Select, Update, operators
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.elements import (
    ColumnClause,
    ColumnElement,
    TextClause,
    UnaryExpression,
    _label_reference,
    _textual_label_reference,
)
from sqlalchemy.sql.functions import FunctionElement

from ..core.strategies import LookupStrategy
from ..core.topology import TableRule, Topology
from ..engine.router import Router, Snapshot, _Runner, _sql_and_params
from ..engine.snapshot import Frozen, lookups_frozen
from ..errors import (
    ExecutionError,
    FanoutLimitError,
    FencedError,
    KeyValueError,
    RouterForkedError,
    RoutingError,
    ScatterWriteError,
    SwitchHoldError,
    UnknownTableError,
    UnsupportedQueryError,
)
from ..sql.execution import (
    JobResult,
    LookupLedger,
    LookupRow,
    Written,
    _refuse_floats,
    _refuse_index_ordered,
    at_most,
    float_columns,
    index_ordered_columns,
    log,
    lookup_rows,
    lookup_targets,
    merged_rows,
    read_shards,
    write_lookups,
)
from ..sql.merge import WEIGHT_CHARS, MergePlan, SortKey, merge
from ..sql.planner import Plan, Target
from ..types import ShardId, Slot

__all__ = ["Placement", "RoutedSession", "routed_sessionmaker"]

_TOKEN_OPTION = "shardrouter_placement"
"""The execution option carrying the Placement a statement runs for (set on every routed ORM
statement and by the flush proxies); the engine hook renames split tables by it. Not
``identity_token``: the ORM lets a relationship load inherit its parent query's. The Placement
object itself, not its token: engines outlive topology versions (reused by every snapshot
that keeps the shard), so their one hook must not depend on any version's routing."""
_REWRITE_CACHE_SIZE = 1024


@dataclass(frozen=True, eq=False)
class Placement:
    """A shard and, for split tables, the residue ``r`` naming their physical tables there.

    ``rewrite(sql)`` turns the logical names of split tables in ORM-generated SQL into this
    placement's physical names (``orders`` -> ``orders_0002`` for ``r == 2``).
    """

    token: str
    shard: ShardId
    residue: int | None
    names: Mapping[str, str]
    pattern: re.Pattern[str] | None
    _cache: dict[str, str] = field(default_factory=dict, repr=False)

    def rewrite(self, sql: str) -> str:
        if self.pattern is None:
            return sql
        done = self._cache.get(sql)
        if done is None:
            names = self.names
            done = self.pattern.sub(lambda m: names[m.group(0)], sql)
            if len(self._cache) >= _REWRITE_CACHE_SIZE:
                self._cache.clear()
            self._cache[sql] = done
        return done


@dataclass(frozen=True)
class _MappedTable:
    """A mapped class's table rule and the attribute that holds each sharding column."""

    mapper: Mapper[Any]
    rule: TableRule
    attrs: Mapping[str, str]
    """Mapped sharding columns only: {column name: attribute key}."""
    key_routes: bool = False
    """A primary-key column routes by function (the slot is in the identity key)."""

    def value(self, state: InstanceState[Any], column_name: str) -> Any:
        key = self.attrs[column_name]
        if key in state.dict:
            return state.dict[key]
        return getattr(state.obj(), key) if state.has_identity else None


class _Routing:
    """What every session of one router shares: placements, binds, mapped tables, the hook."""

    def __init__(self, snap: Snapshot) -> None:
        # No reference to the snapshot itself: this is the value of a WeakKeyDictionary keyed
        # by the router's routing snapshot, so holding it would keep every version alive.
        topology = snap.topology
        self.topology: Topology = topology
        split_tables = [t for t in topology.tables.values() if t.split > 1]
        widest = max((t.split for t in split_tables), default=1)
        pattern = (
            re.compile(
                r"\b(?:"
                + "|".join(
                    re.escape(t.name) for t in sorted(split_tables, key=lambda t: -len(t.name))
                )
                + r")\b"
            )
            if split_tables
            else None
        )
        self.placements: dict[str, Placement] = {}
        self._base: dict[ShardId, str] = {}
        self._split: dict[ShardId, tuple[str, ...]] = {}
        for shard in topology.shards:
            self._base[shard] = shard
            self.placements[shard] = Placement(shard, shard, None, {}, None)
            tokens = []
            for r in range(widest if widest > 1 else 0):
                token = f"{shard}/{r}"
                names = {t.name: t.physical(r) for t in split_tables}
                self.placements[token] = Placement(token, shard, r, names, pattern)
                tokens.append(token)
            self._split[shard] = tuple(tokens)
        self.binds: dict[str, Engine] = {
            token: snap.engines.primary(p.shard) for token, p in self.placements.items()
        }
        self._mapped: dict[Mapper[Any], _MappedTable] = {}
        self._refused: dict[Mapper[Any], tuple[type[RoutingError], tuple[Any, ...]]] = {}
        self._lock = threading.Lock()
        for engine in {id(e): e for e in self.binds.values()}.values():
            with _hooks_lock:  # one hook per engine, whichever version made it
                if not event.contains(engine, "before_cursor_execute", _rewrite_hook):
                    event.listen(engine, "before_cursor_execute", _rewrite_hook, retval=True)

    # -- tokens -----------------------------------------------------------------------------

    def token(self, rule: TableRule, slot: Slot) -> str:
        """The token of the placement holding ``slot``'s rows of ``rule``'s table."""
        shard = self.topology.shard_of_slot(slot)
        if rule.split == 1:
            return self._base[shard]
        return self._split[shard][slot % rule.split]

    def token_at(self, rule: TableRule, shard: str, split: int) -> str:
        """The token of the placement of ``rule``'s table on ``shard``, split ``split``."""
        if rule.split == 1:
            return self._base[ShardId(shard)]
        return self._split[ShardId(shard)][split]

    def fanout(self, rule: TableRule, *, reading: bool = True) -> list[str]:
        """Every placement of ``rule``'s table, each physical table once: for a read, of
        the shards that own slots (execution.read_shards); for a write, of every shard."""
        if rule.kind == "broadcast" and reading:
            return [self._base[self.topology.serving[0]]]  # the same rows on every shard
        shards = (
            list(read_shards(self.topology, rule.name)) if reading else list(self.topology.shards)
        )
        if rule.kind == "broadcast":
            return [self._base[s] for s in shards]
        if rule.split == 1:
            return [self._base[s] for s in shards]
        return [self._split[s][r] for s in shards for r in range(rule.split)]

    def check_token(self, token: Any) -> str:
        if not isinstance(token, str) or token not in self.placements:
            raise RoutingError(
                f"shard id {token!r} is not a placement of topology {self.topology.name!r}"
                f" (known: {', '.join(self.placements)})"
            )
        return token

    # -- mapped tables ----------------------------------------------------------------------

    def mapped(self, mapper: Mapper[Any], *, listen: bool = True) -> _MappedTable:
        """The routing facts of a mapped class (cached per mapper). ``listen``: register the
        load listener (_remember_slot) of a class whose key does not route; False from that
        listener itself (SQLAlchemy is iterating the mapper's listeners then, and the one
        running covers the class already: registered with propagate)."""
        found = self._mapped.get(mapper)
        if found is not None:
            return found
        refused = self._refused.get(mapper)
        if refused is not None:  # (not routable: decided once per version, not per row)
            # A new exception each time: one shared object would carry one caller's traceback
            # (its frames, its session) and context to every other caller and thread.
            raise refused[0](*refused[1]) from None
        try:
            found = self._build(mapper)
        except (UnknownTableError, UnsupportedQueryError) as exc:
            # Fixed for this version (its table is not in the topology, or not one table);
            # a class missing its sharding column may still get it (mapped_column added).
            with self._lock:
                self._refused[mapper] = (type(exc), exc.args)
            raise
        if listen:  # before the class is published: no session loads it without the listener
            self._listen(mapper, found)
        with self._lock:
            self._mapped[mapper] = found
        return found

    def _build(self, mapper: Mapper[Any]) -> _MappedTable:
        """The routing facts of a mapped class (RoutingError when it cannot be routed)."""
        selectable = mapper.persist_selectable
        if not isinstance(selectable, Table):
            raise UnsupportedQueryError(
                f"{mapper.class_.__name__} is mapped to {selectable!r}, not one table; the"
                " routed session supports classes mapped to one table (single-table"
                " inheritance included)"
            )
        rule = self.topology.table(selectable.name)
        attrs: dict[str, str] = {}
        for name in rule.keys:
            col = selectable.c.get(name)
            if col is None:
                continue
            try:
                attrs[name] = mapper.get_property_by_column(col).key
            except UnmappedColumnError:  # in the table, not in the class: nothing to route by
                continue
        if rule.primary is not None and rule.primary.column not in attrs:
            raise RoutingError(
                f"{mapper.class_.__name__} maps table {rule.name} but not its sharding column"
                f" {rule.primary.column}; map it so rows can be routed"
            )
        key_routes = any(
            (k := rule.keys.get(col.name)) is not None and k.lookup_table is None
            for col in mapper.primary_key
        )
        return _MappedTable(mapper, rule, attrs, key_routes)

    def _listen(self, mapper: Mapper[Any], info: _MappedTable) -> None:
        """Register _remember_slot on every class of ``mapper``'s registry whose primary key
        does not route under this routing: a class may first be loaded as another's eagerly
        loaded child (joinedload), before anything maps it. Runs when a routing first maps a
        class (once per class and version: a scan of the registry's classes)."""
        try:
            mappers = list(mapper.registry.mappers)
        except orm_exc.UnmappedClassError:  # a base SQLAlchemy sets up at its first query
            mapper.registry.configure(cascade=True)  # (as a query's configuration does)
            mappers = list(mapper.registry.mappers)
        for other in mappers:
            try:
                found = info if other is mapper else self._mapped.get(other) or self._build(other)
            except RoutingError:  # not a routed class (or not routable): nothing to remember
                continue
            if not found.key_routes and found.rule.primary is not None:
                # On the root of its hierarchy (one table: single-table inheritance), once,
                # propagated: every subclass has it, those defined later too, and none twice.
                root = other.base_mapper
                with _hooks_lock:
                    if not any(fn is _remember_slot for fn in root.class_manager.dispatch.load):
                        for name in ("load", "refresh"):
                            event.listen(root, name, _remember_slot, raw=True, propagate=True)
            if other is not mapper:
                with self._lock:
                    self._mapped.setdefault(other, found)


def _rewrite_hook(
    conn: Connection,
    cursor: DBAPICursor,
    statement: str,
    parameters: Any,
    context: ExecutionContext | None,
    executemany: bool,
) -> tuple[str, Any]:
    """The engine hook: a statement run for a split placement gets its physical names."""
    if context is None:
        return statement, parameters
    placement = context.execution_options.get(_TOKEN_OPTION)
    if not isinstance(placement, Placement):
        return statement, parameters
    return placement.rewrite(statement), parameters


_hooks_lock = threading.Lock()
_routings: weakref.WeakKeyDictionary[Snapshot, _Routing] = weakref.WeakKeyDictionary()
_routings_lock = threading.Lock()


def _routing_for(snap: Snapshot) -> _Routing:
    """The routing of one snapshot of a router (one per topology version), shared by every
    session made under it."""
    with _routings_lock:
        routing = _routings.get(snap)
        if routing is None:
            routing = _routings[snap] = _Routing(snap)
        return routing


class _PlacementConnection:
    """The shard's session Connection as the flush sees it for one placement.

    Every statement it runs carries the placement's token (so the hook renames split tables),
    and it is a distinct object per placement, so the unit of work, which batches rows per
    connection object, never puts rows of two physical tables into one statement.
    """

    __slots__ = ("_connection", "_placement")

    def __init__(self, connection: Connection, placement: Placement) -> None:
        self._connection = connection
        self._placement = placement

    @property
    def dialect(self) -> Dialect:
        return self._connection.dialect

    def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
    ) -> Any:
        options = dict(execution_options or {})
        options[_TOKEN_OPTION] = self._placement
        return self._connection.execute(statement, parameters, execution_options=options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


_LEADING_COMMENTS = re.compile(r"\A(?:\s+|/\*(?!!).*?\*/|(?:--\s|#)[^\n]*(?:\n|\Z)|\()*", re.S)
_READ_WORDS = frozenset(
    {"SELECT", "SHOW", "EXPLAIN", "DESCRIBE", "DESC", "HELP", "TABLE", "VALUES"}
)
_WRITE_WORD = re.compile(r"\b(?:INSERT|UPDATE|DELETE|REPLACE)\b", re.I)


def _writes(statement: Any) -> bool:
    """Whether a statement run on a placement connection may write: conservative (anything
    not recognisably a read counts as a write)."""
    if isinstance(statement, Select | CompoundSelect):
        return False
    if isinstance(statement, TextClause):
        sql = statement.text
    elif isinstance(statement, str):
        sql = statement
    else:
        return True  # insert()/update()/delete(), DDL, anything else
    body = sql[_LEADING_COMMENTS.match(sql).end() :]  # type: ignore[union-attr]
    word = body.split(None, 1)[0].upper() if body.strip() else ""
    if word == "WITH":
        return bool(_WRITE_WORD.search(body))
    return word not in _READ_WORDS


class _RawPlacementConnection:
    """What ``session.connection(bind_arguments={"shard_id": token})`` returns: the session's
    Connection to the placement's shard, whose statements that may write pass the router's
    write resolver first (path ``orm``, role ``placement``), as the flush's writes do. The
    slots of raw SQL are unknown, so while slots move a write there is checked against every
    moving range with the shard as source or target (refused when fenced). Reads pass
    untouched. Not covered: SQL sent on the DBAPI connection itself (``.connection``)."""

    __slots__ = ("_connection", "_session", "_shard")

    def __init__(self, connection: Connection, session: RoutedSession, shard: ShardId) -> None:
        self._connection = connection
        self._session = session
        self._shard = shard

    def _check(self, statement: Any) -> None:
        if _writes(statement):
            session = self._session
            session.router.resolver.write_shard(session._snap, self._shard, "orm", "placement")
            session._wrote = True  # its commit is fenced too (RoutedSession._before_commit)

    def execute(
        self,
        statement: Any,
        parameters: Any = None,
        *,
        execution_options: Mapping[str, Any] | None = None,
    ) -> Any:
        self._check(statement)
        return self._connection.execute(statement, parameters, execution_options=execution_options)

    def exec_driver_sql(
        self,
        statement: str,
        parameters: Any = None,
        execution_options: Mapping[str, Any] | None = None,
    ) -> Any:
        self._check(statement)
        return self._connection.exec_driver_sql(statement, parameters, execution_options)

    def scalar(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        self._check(statement)
        return self._connection.scalar(statement, parameters, **kw)

    def scalars(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        self._check(statement)
        return self._connection.scalars(statement, parameters, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._connection, name)


class _SessionPin:
    """The routing snapshot a session routes by: pinned at the first use in a transaction,
    released when the session's outermost transaction ends (commit, rollback, close(),
    reset(), invalidate()), else when the session is garbage-collected. Holds no reference to
    the session, so the session's finalizer can own it."""

    __slots__ = ("routing", "snap")

    def __init__(self) -> None:
        self.snap: Snapshot | None = None
        self.routing: _Routing | None = None

    def pin(self, router: Router) -> None:
        snap = router._pin()
        try:
            routing = _routing_for(snap)
        except BaseException:
            snap.release()
            raise
        self.snap, self.routing = snap, routing

    def release(self) -> None:
        snap, self.snap, self.routing = self.snap, None, None
        if snap is not None:
            snap.release()


def _weakly(method: Any) -> Any:
    """``method`` of a session, called through a weak reference: the session's own event
    listeners and choosers must not keep it alive (a session dropped without close() is
    then freed at once, and its finalizer releases the snapshot, without waiting for the
    cyclic garbage collector)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any, **kw: Any) -> Any:
        bound = ref()
        if bound is None:  # pragma: no cover - only a dying session's own machinery calls it
            raise RoutingError("the routed session was garbage-collected")
        return bound(*args, **kw)

    return call


class RoutedSession(ShardedSession):
    """A horizontal_shard Session over a Router's shards (see the module docstring).

    ``RoutedSession(router, **kw)`` takes the keyword arguments of ``Session`` (not ``bind`` or
    ``binds``: the router's primaries are the binds).
    """

    def __init__(self, router: Router, **kw: Any) -> None:
        # The session routes each transaction by the router's snapshot of the moment the
        # transaction first routes something, until it ends (commit, rollback, close()); while
        # it holds an older snapshot, the router does not acknowledge a newer version. Objects
        # loaded under an older version carry its placement tokens: the flush refuses to
        # write one whose placement is not its slot's under the session's version (_resolve).
        current = router._snap
        if current.forked:
            raise RouterForkedError(current.forked)
        pin = self._snapshot_pin = _SessionPin()
        weakref.finalize(self, pin.release)
        routing = self._bound = _routing_for(current)
        """The routing whose engines are the session's binds (the pinned one once pinned)."""
        super().__init__(
            shard_chooser=_weakly(self._choose_shard),
            identity_chooser=_weakly(self._choose_identity),
            execute_chooser=_weakly(self._choose_execute),
            shards=dict(routing.binds),
            **kw,
        )
        self.router = router
        self._proxies: dict[tuple[int, str], _PlacementConnection] = {}
        self._ledger = LookupLedger()
        self._committed = False
        self._wrote = False
        """A write of this transaction passed the resolver: its commit is fenced too."""
        self._ran = False
        """Something of this transaction ran on a shard (a connection of it began, or lookup
        rows were written for it): a flush that meets a switch is refused, not held (flush)."""
        self._begun: set[Engine] = set()
        """The engines (shards) whose connection this transaction has begun: their rows are
        read in its snapshot (see _lookup_tokens)."""
        # Ahead of horizontal_shard's own handler, which then runs each routed piece.
        event.listen(self, "do_orm_execute", _weakly(self._on_execute), retval=True, insert=True)
        event.listen(self, "before_flush", _weakly(self._before_flush))
        event.listen(self, "before_commit", _weakly(self._before_commit))
        event.listen(self, "after_commit", _weakly(self._after_commit))
        event.listen(self, "after_begin", _weakly(self._began))
        event.listen(self, "after_transaction_end", _weakly(self._after_transaction_end))
        event.listen(self, "pending_to_persistent", _weakly(self._persisted))

    def connection(
        self,
        bind_arguments: Mapping[str, Any] | None = None,
        execution_options: Any = None,
    ) -> Connection:
        """The session's connection to one placement (``bind_arguments={"shard_id": token}``),
        for SQL the ORM does not route (physical table names): its writes pass the router's
        write resolver, like the flush's (see _RawPlacementConnection)."""
        arguments = dict(bind_arguments or {})
        token = arguments.get("shard_id")
        if token is None and arguments.get("bind") is None and arguments.get("mapper") is None:
            raise RoutingError(
                "session.connection() needs a placement: pass"
                " bind_arguments={'shard_id': token} (tokens: "
                + ", ".join(self._look.placements)
                + ")"
            )
        if token is not None:
            self._look.check_token(token)  # before anything is pinned or begun
        opened = self.in_transaction()
        routing = self._pinned_routing()  # pinned (and the binds its engines) before a connection
        try:
            conn = super().connection(arguments, execution_options)
        except BaseException:
            if not opened and not self.in_transaction():
                self._snapshot_pin.release()  # nothing began: nothing may hold the version
            raise
        if token is not None:
            shard = routing.placements[routing.check_token(token)].shard
        else:  # an explicit bind: the shard whose engine it is, if any
            shards = {id(e): routing.placements[t].shard for t, e in routing.binds.items()}
            found = shards.get(id(conn.engine))
            if found is None:
                return conn
            shard = found
        return cast(Connection, _RawPlacementConnection(conn, self, shard))

    @property
    def _snap(self) -> Snapshot:
        """The routing snapshot of the session's transaction (pinned, the router's current
        one, at the first use in a transaction; released when the transaction ends)."""
        snap = self._snapshot_pin.snap
        if snap is None:
            snap = self._repin().snap
            assert snap is not None
        return snap

    @property
    def _routing(self) -> _Routing:
        """The routing of the session's transaction, pinned at its first use (by a statement
        or a flush, which begin the transaction whose end releases it)."""
        return self._pinned_routing()

    @property
    def _look(self) -> _Routing:
        """The routing for a question that runs nothing (``placement()``, ``get_bind()``): the
        transaction's when one is open, else the router's current one, unpinned (nothing
        begins, so nothing would release a pin and the router could not acknowledge newer
        versions)."""
        routing = self._snapshot_pin.routing
        if routing is not None:
            return routing
        if not self.in_transaction():
            return _routing_for(self.router._snap)
        return self._pinned_routing()

    def _pinned_routing(self) -> _Routing:
        routing = self._snapshot_pin.routing
        if routing is None:
            routing = self._repin().routing
            assert routing is not None
        return routing

    def _repin(self) -> _SessionPin:
        pin = self._snapshot_pin
        pin.pin(self.router)
        routing = pin.routing
        assert routing is not None
        if routing is not self._bound:  # another snapshot: its engines become the binds
            for token, bind in routing.binds.items():
                self.bind_shard(token, bind)
            self._bound = routing
            self._proxies.clear()
        return pin

    def close(self) -> None:
        """Close the session (SQLAlchemy's close) and release its routing snapshot (as every
        end of its transaction does): a new topology version can then be acknowledged, and
        the next use of this session routes by the router's version of that moment."""
        try:
            super().close()
        finally:
            self._snapshot_pin.release()

    def reset(self) -> None:
        try:
            super().reset()
        finally:
            self._snapshot_pin.release()

    def invalidate(self) -> None:
        try:
            super().invalidate()
        finally:
            self._snapshot_pin.release()

    def begin_nested(self) -> Any:
        """Refused: horizontal_shard flushes through the root transaction's connections (no
        SAVEPOINT is issued), so rolling a savepoint back would not undo its rows."""
        raise UnsupportedQueryError(
            "savepoints (Session.begin_nested) are not supported by the routed session: its"
            " flushes run in the root transaction, so a savepoint rollback would keep the rows;"
            " use a separate session (a separate transaction) for work that may be undone"
        )

    def bulk_save_objects(self, *args: Any, **kw: Any) -> None:
        """Refused (SQLAlchemy's bulk methods bypass the per-row shard choice); add_all()."""
        self._refuse_bulk("bulk_save_objects")

    def bulk_insert_mappings(self, *args: Any, **kw: Any) -> None:
        """Refused (see bulk_save_objects)."""
        self._refuse_bulk("bulk_insert_mappings")

    def bulk_update_mappings(self, *args: Any, **kw: Any) -> None:
        """Refused (see bulk_save_objects)."""
        self._refuse_bulk("bulk_update_mappings")

    def _refuse_bulk(self, name: str) -> None:
        # Refused before SQLAlchemy starts its flush: its NotImplementedError would leave
        # the session needing a rollback.
        raise UnsupportedQueryError(
            f"session.{name}() is not routed (SQLAlchemy's bulk methods skip the per-row shard"
            " choice); use session.add_all(objects) (changes: load the objects and set their"
            " attributes, or session.execute(update(...)) by key), or router.execute for"
            " plain rows"
        )

    def placement(self, token: str) -> Placement:
        """The placement behind an identity token (``inspect(obj).identity_token``), under
        the session's version (the router's current one outside a transaction)."""
        routing = self._look
        return routing.placements[routing.check_token(token)]

    def get_bind(
        self,
        mapper: Any = None,
        *,
        shard_id: Any = None,
        instance: Any = None,
        clause: Any = None,
        **kw: Any,
    ) -> Any:
        """The engine of a placement: ``shard_id=token``, or the placement of ``instance``
        (its identity token, or its sharding key for a new object). A mapped class alone
        names no placement."""
        if shard_id is None:
            if mapper is not None and not isinstance(mapper, Mapper):
                found = inspect(mapper, raiseerr=False)
                mapper = found if isinstance(found, Mapper) else None
            if instance is None and mapper is None:
                raise RoutingError(
                    "get_bind() needs a placement: pass instance=obj (a mapped object) or"
                    " shard_id=token (tokens: " + ", ".join(self._look.placements) + ")"
                )
            if instance is None and clause is None:
                raise RoutingError(
                    f"get_bind({mapper.class_.__name__}) names no placement: a class has rows"
                    " on every shard; pass instance=obj or shard_id=token"
                )
        if self.in_transaction() or self._snapshot_pin.routing is not None:
            return super().get_bind(
                mapper, shard_id=shard_id, instance=instance, clause=clause, **kw
            )
        # Outside a transaction: the engine of the router's current version (the session's
        # shard map holds those of the version it last ran a transaction on).
        if shard_id is None:
            shard_id = self._choose_shard_and_assign(mapper, instance, clause=clause)
        routing = self._look
        return routing.binds[routing.check_token(shard_id)]

    # -- horizontal_shard's choosers --------------------------------------------------------

    def _choose_shard_and_assign(self, mapper: Any, instance: Any, **kw: Any) -> Any:
        # A persistent object whose identity has no placement (merge(load=False) of an object
        # a plain Session loaded, make_transient_to_detached): its key's placement under the
        # session's version, as for a new object (horizontal_shard asserts a token).
        if instance is not None:
            state = inspect(instance)
            if state.key is not None and state.key[2] is None:
                routing = self._look  # (outside a transaction: nothing pinned)
                return self._token_of_new(routing.mapped(state.mapper), state, routing)
        return super()._choose_shard_and_assign(mapper, instance, **kw)

    def _choose_shard(
        self, mapper: Mapper[Any] | None, instance: Any, clause: Any = None, **kw: Any
    ) -> str:
        if mapper is None or instance is None:
            raise RoutingError(
                "the routed session needs an object to route by; for a statement, pass"
                " bind_arguments={'shard_id': <token>} (tokens: "
                + ", ".join(self._look.placements)
                + ")"
            )
        routing = self._look
        info = routing.mapped(inspect(instance).mapper)
        return self._token_of_new(info, inspect(instance), routing)

    def _choose_identity(
        self,
        mapper: Mapper[Any],
        primary_key: Any,
        *,
        lazy_loaded_from: InstanceState[Any] | None,
        execution_options: Any,
        bind_arguments: Any,
        **kw: Any,
    ) -> list[str]:
        # The load this chooses for runs in the session's transaction: begun (and pinned)
        # here, so that the identity and the load are of one version. An identity-map hit
        # then holds the version until the transaction ends, as any read would.
        if not self.in_transaction() and self.autobegin:
            self._autobegin_t()
        routing = self._routing if self.in_transaction() else self._look
        info = routing.mapped(mapper)
        identity = primary_key if isinstance(primary_key, tuple | list) else (primary_key,)
        for col, value in zip(mapper.primary_key, identity, strict=False):
            rule = info.rule.keys.get(col.name)
            if rule is not None and rule.lookup_table is None and value is not None:
                return [routing.token(info.rule, rule.slot(value))]
        return routing.fanout(info.rule)

    def _choose_execute(self, orm_context: ORMExecuteState) -> list[str]:
        # _on_execute routes every statement before horizontal_shard sees it; reaching this
        # means a statement came without a routing decision.
        raise RoutingError(f"statement was not routed: {orm_context.statement}")

    def _token_of_new(
        self, info: _MappedTable, state: InstanceState[Any], routing: _Routing | None = None
    ) -> str:
        rule = info.rule
        if rule.primary is None:
            raise UnsupportedQueryError(
                f"{info.mapper.class_.__name__}: {rule.name} is a broadcast table, copied to"
                " every shard; write it with router.execute, which writes every shard"
            )
        slot = rule.primary.slot(info.value(state, rule.primary.column))
        return (routing or self._routing).token(rule, slot)

    # -- the flush --------------------------------------------------------------------------

    def flush(self, objects: Sequence[Any] | None = None) -> None:
        """SQLAlchemy's flush (also run by commit() and autoflush), held through a resharding
        switch like a transaction's first statement: when it meets a range frozen in the
        session's version (Frozen: raised before anything of the flush ran) and nothing of
        the session's transaction ran on any shard yet (no connection of it began, no lookup
        rows were written for it), it waits for the router's next version (Router._hold:
        bounded by ``hold_s`` and ``max_held_writes``, else SwitchHoldError) and runs again
        from the start on that version. Otherwise the Frozen (a SwitchHoldError) reaches the
        caller: nothing of that flush ran, the transaction is as it was; roll it back and
        retry it. The flush begins the session's transaction first (as a statement does), so
        the version it pins is released by that transaction's end whatever it raises."""
        if self._flushing or self._is_clean():
            super().flush(objects)
            return
        self._autobegin_t()  # (refused with autobegin=False and no transaction: before anything)
        try:
            super().flush(objects)
        except Frozen as exc:
            if self._ran or self.in_nested_transaction():
                raise
            self.router._hold(exc, lambda: self._flush_again(objects))

    def _flush_again(self, objects: Sequence[Any] | None) -> None:
        """The held flush, from its start, on the router's current version: nothing of the
        session's transaction ran, so the transaction routes by that version instead."""
        self._snapshot_pin.release()
        self._wrote = False
        self._repin()
        try:
            super().flush(objects)
        except Frozen as exc:
            if self._ran:  # not held again: something of this attempt ran (never expected)
                raise SwitchHoldError(str(exc), slots=exc.slots) from exc
            raise  # another switch: held again (Router._hold's loop)

    def _began(self, session: Session, transaction: Any, connection: Connection) -> None:
        self._ran = True  # a connection of the session's transaction: it may run anything now
        self._begun.add(connection.engine)

    def connection_callable(
        self,
        mapper: Mapper[Any] | None = None,
        instance: Any | None = None,
        shard_id: str | None = None,
        **kw: Any,
    ) -> Connection:
        """The connection the unit of work uses for ``instance``: its placement's proxy."""
        if shard_id is None:
            shard_id = self._choose_shard_and_assign(mapper, instance)
        connection = super().connection_callable(mapper, instance, shard_id=shard_id, **kw)
        key = (id(connection), shard_id)
        proxy = self._proxies.get(key)
        if proxy is None or proxy._connection is not connection:
            placement = self._routing.placements[shard_id]
            proxy = self._proxies[key] = _PlacementConnection(connection, placement)
        return cast(Connection, proxy)

    def _before_flush(
        self, session: Session, flush_context: UOWTransaction, instances: Any
    ) -> None:
        self._proxies.clear()
        routing = self._routing
        lookups: list[LookupRow] = []
        for obj in self.new:
            state = inspect(obj)
            info = routing.mapped(state.mapper)
            # Broadcast tables and missing keys fail here, before anything is written; and a
            # token left from an earlier failed flush is replaced (the key may have changed).
            state.identity_token = self._token_of_new(info, state)
            self._resolve(info, state)
            self._check_secondaries(info, state)
            lookups.extend(self._lookup_rows(info, state))
        for obj in self.dirty:
            state = inspect(obj)
            info = routing.mapped(state.mapper)
            if info.rule.primary is None:
                self._token_of_new(info, state)  # refuses broadcast writes
            for column_name, key in info.attrs.items():
                if state.attrs[key].history.has_changes():
                    raise UnsupportedQueryError(
                        f"{info.mapper.class_.__name__}: changing sharding column"
                        f" {info.rule.name}.{column_name} would move the row to another shard;"
                        " delete the object and add a new one instead"
                    )
            self._resolve(info, state, "UPDATE")
        cleanups: list[LookupRow] = []
        for obj in self.deleted:
            state = inspect(obj)
            info = routing.mapped(state.mapper)
            if info.rule.primary is None:
                self._token_of_new(info, state)
            self._resolve(info, state, "DELETE")
            cleanups.extend(self._lookup_rows(info, state, deleting=True))
        if (lookups or cleanups) and (frozen := lookups_frozen(self._snap)) is not None:
            # As the router's steps_blind: lookup rows live on other shards and are written
            # (or removed, after the commit) in steps of their own, checked by shard; while a
            # switch runs the whole flush waits for it (or is refused) before its first step.
            raise frozen
        written = self._write_lookups(lookups) if lookups else Written()
        # A flush's deletes count before its writes: the only lookup row both name is that of
        # an object deleted and one added with its key and value, which the flush writes as
        # one UPDATE (SQLAlchemy's row switch): the row keeps it.
        self._ledger.remove(cleanups)
        self._ledger.add(written, doubtful=False)

    def _resolve(self, info: _MappedTable, state: InstanceState[Any], kind: str = "") -> None:
        """The flush's write of ``state`` passes the router's write resolver (fencing). A
        persistent object's UPDATE or DELETE goes to its identity token's placement (as
        horizontal_shard does), so that token must be its slot's placement under the
        session's snapshot: an object loaded under an older topology version whose slot has
        moved since (or into another physical table) is refused, not written where the row
        no longer lives. ``kind``: UPDATE or DELETE for a persistent object, else empty."""
        rule = info.rule.primary
        assert rule is not None
        # A persistent object's slot from its identity (or its load) first: reading an
        # expired sharding attribute would refresh it from the placement being checked.
        found = self._loaded_slot(info, state, kind) if kind else None
        slot = found if found is not None else rule.slot(self._sharding_value(info, state))
        self._wrote = True
        snap = self._snap
        if kind:
            key = state.key
            token = key[2] if key is not None else state.identity_token
            if token is not None:  # None: no placement chosen (merge(load=False) and the like)
                self._check_placement(info, state, token, slot, kind)
        self.router.resolver.write_slot(snap, slot, "orm", "orm")

    def _check_placement(
        self, info: _MappedTable, state: InstanceState[Any], token: Any, slot: Slot, kind: str
    ) -> None:
        """Refuse to read or write ``state`` at ``token``, its identity token, when that is
        not its slot's placement under the session's version: the object was loaded under an
        older version, before its slot moved (its row is no longer there, or no longer
        current there)."""
        resolved = self._routing.token(info.rule, slot)
        if token != resolved:
            raise FencedError(
                f"{kind} of {info.mapper.class_.__name__} {state.identity!r} refused: the"
                f" object was loaded from placement {token!r}, but under topology version"
                f" {self._snap.version}, which this session runs on, slot {slot} lives in"
                f" {resolved!r} (loaded under an older version, before its slot moved). The"
                " way out: reload the object in this session (session.expunge(obj), then"
                " session.get() or a query) and use the fresh object",
                slot=slot,
            )

    def _check_identity_load(self, ctx: ORMExecuteState, stmt: Select[Any], token: str) -> None:
        """A load by identity on the placement of an identity key (session.get() with
        identity_token, session.merge() of a detached object) must be that key's placement
        under the session's version: a key of an older version names the placement its slot
        had then (refused, as for a refresh)."""
        if getattr(ctx.load_options, "_identity_token", None) != token:
            return
        plan, values = self._plan(stmt, ctx)
        if plan.sharded is None:
            return
        tokens = self._key_tokens(plan, values)
        if tokens is not None and token not in tokens:
            raise FencedError(
                f"load of {plan.sharded.name} on placement {token!r} refused: under topology"
                f" version {self._snap.version}, which this session runs on, its key lives in"
                f" {', '.join(repr(t) for t in tokens)} (an identity of an older version,"
                " before its slot moved). The way out: load it without the old identity"
                " (session.get(cls, key) without identity_token; for merge(), reload the"
                " object and apply its changes)"
            )

    def _check_loaded(self, state: Any, kind: str) -> None:
        """A load for an object already in the session (the refresh of its expired
        attributes, or a lazy load of a relationship bound to it) runs on the object's
        placement: it must be the object's slot's placement under the session's version."""
        if not isinstance(state, InstanceState) or state.key is None:
            return
        info = self._routing.mapped(state.mapper)
        primary = info.rule.primary
        if primary is None:
            return  # a broadcast table: every placement has its rows
        if state.key[2] is None:
            return  # no placement chosen: routed by its key, as a new object
        slot = self._loaded_slot(info, state, kind)
        if slot is None and primary.column in info.attrs:
            value = state.dict.get(info.attrs[primary.column])
            slot = primary.slot(value) if value is not None else None
        if slot is not None:
            self._check_placement(info, state, state.key[2], slot, kind)

    def _sharding_value(self, info: _MappedTable, state: InstanceState[Any]) -> Any:
        """The object's sharding value; a persistent object's not loaded (deferred, even with
        raiseload) is refreshed alone, from its own placement (which still holds its slots:
        _loaded_slot refused otherwise)."""
        primary = info.rule.primary
        assert primary is not None
        key = info.attrs[primary.column]
        if key not in state.dict and state.has_identity:
            obj = state.obj()
            if obj is not None:
                try:
                    self.refresh(obj, [key])
                except sa_exc.InvalidRequestError as exc:  # its row is not where it was loaded
                    if _remembered(state) is not None:
                        raise  # its placement holds what it held: the row is gone, not moved
                    raise FencedError(
                        f"{info.mapper.class_.__name__} {state.identity!r}: its sharding column"
                        f" {primary.column} was not loaded and cannot be read from placement"
                        f" {state.key[2] if state.key else None!r} (its row is not there:"
                        " loaded under an older topology version, before its slot moved?)."
                        " The way out: reload the object with its sharding column"
                        " (session.expunge(obj), then session.get())"
                    ) from exc
        return info.value(state, primary.column)

    def _loaded_slot(self, info: _MappedTable, state: InstanceState[Any], kind: str) -> Slot | None:
        """The slot of a persistent object without reading its attributes: from its identity
        key, else from the sharding value remembered at its load (_SLOT_INFO). An object
        loaded without its sharding value (load_only, defer) under another version than the
        session's cannot be placed: refused (its slot may have moved since)."""
        slot = _identity_slot(info, state)
        if slot is not None:
            return slot
        found = _remembered(state)
        if found is None or state.key is None or state.key[2] is None:
            return None  # (no placement in its key: routed by its key, as a new object)
        value, marker = found
        primary = info.rule.primary
        assert primary is not None
        if value is not None:
            return primary.slot(value)
        snap = self._snap
        token = state.key[2] if state.key is not None else None
        placement = self._routing.placements.get(token) if isinstance(token, str) else None
        if placement is None or marker != _holding(snap, placement.shard):
            raise FencedError(
                f"{kind} of {info.mapper.class_.__name__} {state.identity!r} refused: it was"
                f" loaded without its sharding column {primary.column} (load_only, defer)"
                f" from placement {token!r}, whose slots have changed since (topology version"
                f" {snap.version}, which this session runs on), so where its row lives now is"
                " unknown. The way out: reload the object with its sharding column"
                " (session.expunge(obj), then session.get())"
            )
        return None

    def _check_secondaries(self, info: _MappedTable, state: InstanceState[Any]) -> None:
        """Functional secondary keys must route to the row's slot, or reads by them miss it."""
        primary = info.rule.primary
        assert primary is not None
        owner_value = info.value(state, primary.column)
        slot = primary.slot(owner_value)
        for column_name, rule in info.rule.keys.items():
            if rule.primary or rule.lookup_table is not None or column_name not in info.attrs:
                continue
            value = info.value(state, column_name)
            if value is None:
                # Not set yet (a relationship fills the foreign key during the flush, e.g.
                # order_items.order_id inherited from orders): nothing to check, as in execution.
                continue
            other = rule.slot(value)
            if other != slot:
                raise KeyValueError(
                    f"{info.rule.name}.{column_name}: value {value!r} routes to slot {other} but"
                    f" the row's {primary.column} {owner_value!r} routes to slot {slot}, so"
                    f" reads by {column_name} would miss the row; make it with the id"
                    f" generator of {info.rule.name!r}: generator.next_id("
                    f"{primary.column}={owner_value!r}) (with meta:, lease.generator(topology,"
                    f" {info.rule.name!r}) of a WorkerLease.for_topology(topology); else"
                    f" topology.id_generator({info.rule.name!r}))"
                )

    def _lookup_rows(
        self, info: _MappedTable, state: InstanceState[Any], *, deleting: bool = False
    ) -> list[LookupRow]:
        """The lookup rows of an owner row (to write for a new one, to delete for a deleted
        one), made by the router's own code (execution.lookup_rows) from the mapped values."""
        owner: dict[str, Any] = {}
        for column_name, rule in info.rule.keys.items():
            strategy = rule.strategy
            if not isinstance(strategy, LookupStrategy):
                continue
            if column_name not in info.attrs:
                if deleting:
                    continue  # its lookup row, if any, stays: an orphan (reads ignore it)
                raise UnsupportedQueryError(
                    f"{info.mapper.class_.__name__} does not map lookup column"
                    f" {info.rule.name}.{column_name}: its INSERT would leave the column to its"
                    f" default and write no row in {strategy.table}, so reads by {column_name}"
                    f" would miss the row; map {column_name} and set it explicitly"
                )
            missing = [c for c in strategy.row_columns[1:] if c not in info.mapper.columns]
            if missing:
                raise RoutingError(
                    f"{info.mapper.class_.__name__} maps lookup column {column_name} but not"
                    f" {', '.join(missing)}, which its lookup row in {strategy.table} needs"
                )
            for c in (column_name, *strategy.row_columns[1:]):
                prop = info.mapper.get_property_by_column(info.mapper.columns[c])
                owner[c] = (
                    state.dict[prop.key]
                    if prop.key in state.dict
                    else getattr(state.obj(), prop.key)
                )
        if not owner:
            return []
        return lookup_rows(self._routing.topology, info.rule, [owner], deleting=deleting)

    def _write_lookups(self, rows: Sequence[LookupRow]) -> Written:
        """Write lookup rows and prove unique ones are this owner's: the router's own code
        (execution.write_lookups: upserts committed per place, the case-folding uniqueness
        check, orphans taken over), driven on the router's threads. Returns what it wrote
        (the caller adds it to the ledger); the rows of a failed write are settled as
        doubtful."""
        written = Written()
        self._ran = True  # committed on their own: a flush meeting a switch is refused now
        try:
            _Runner(self.router).drive(
                write_lookups(self._snap.topology, rows, written, self._ledger), self._snap
            )
        except Exception:
            self._ledger.add(Written(written.created), doubtful=True)
            raise
        return written

    def _persisted(self, session: Session, instance: Any) -> None:
        # An inserted object whose primary key does not route: its slot, as a load records it.
        _remember_slot(inspect(instance))

    def _before_commit(self, session: Session) -> None:
        # The commit's own flush comes after this hook: run it first, so that the checks
        # below see every write. Writes were checked by their flush; the lease may have
        # expired since.
        if not self.in_nested_transaction():
            # Until clean, as SQLAlchemy's own loop does: a flush's listeners may add objects
            # (after_flush_postexec), which must be checked below too.
            for _ in range(100):
                if not (self.new or self.dirty or self.deleted):
                    break
                self.flush()
            else:
                if self.new or self.dirty or self.deleted:
                    raise ExecutionError(
                        "commit refused: the session is still changing after 100 flushes (a"
                        " flush listener keeps adding or changing objects); nothing was"
                        " committed: roll back and fix the listener"
                    )
        if self._wrote and not self.in_nested_transaction():
            self.router.resolver.before_commit(self._snap, None)
            # Lookup rows the flushes found already there are checked again, the owner rows
            # written and locked (execution.LookupLedger.verify); a value taken meanwhile
            # refuses the commit.
            _Runner(self.router).drive(self._ledger.verify(self._snap.topology), self._snap)

    def _after_commit(self, session: Session) -> None:
        if self.in_nested_transaction():
            return  # a savepoint released: the outer transaction may still roll back
        self._committed = True

    def _after_transaction_end(self, session: Session, transaction: Any) -> None:
        if transaction.parent is None:
            # The lookup rows of the session's transaction are settled by what it did last to
            # each owner row (the router's own settling, see execution.LookupLedger): those of
            # deleted owners go, those of owners it did not commit too; best effort. A
            # rollback forgets the deletes (running one for a row the rollback brought back
            # would hide it from reads by the lookup key).
            # Then its snapshot is released: the next transaction routes by the router's
            # version of its own start (objects of an older one are checked by _resolve).
            committed, self._committed = self._committed, False
            self._wrote = False
            self._ran = False
            self._begun.clear()
            snap = self._snapshot_pin.snap  # None: nothing routed, so nothing to settle
            try:
                if snap is not None:
                    _Runner(self.router).drive(self._ledger.settle(snap.topology, committed), snap)
            except Exception as exc:
                log.error("session end: lookup rows not settled: %s", exc)
            finally:
                self._snapshot_pin.release()

    # -- statements -------------------------------------------------------------------------

    def _on_execute(self, ctx: ORMExecuteState) -> Result[Any] | None:
        # The statement runs in the session's transaction: begun (or refused, autobegin=False)
        # before anything is pinned, so that whatever this raises, the pin belongs to a
        # transaction whose end (rollback, close) releases it.
        self._autobegin_t()
        if not self._ran and self._autoflushes(ctx):
            # The autoflush SQLAlchemy would run later, inside this statement, after its
            # placement was chosen here: a flush held through a switch moves the session to
            # the next version, and the statement must then be routed by that version too
            # (review 12: a query read the old owner; get() missed the object just added).
            self.flush()
        stmt = ctx.statement
        if isinstance(stmt, TextClause) or ctx.is_from_statement:
            raise UnsupportedQueryError(
                "text SQL is not routed by the ORM session (its table names cannot be rewritten"
                " safely); run it with router.execute(), or on one placement with"
                " session.connection(bind_arguments={'shard_id': token}) and physical names"
            )
        if ctx.is_select:
            self._check_loaded(getattr(ctx.load_options, "_refresh_state", None), "REFRESH")
            for top in ctx.all_mappers:  # their load listeners, before rows are loaded
                for mapper in top.self_and_descendants:  # (rows of subclasses defined late)
                    # (not routable as an owner, a read-only class: loads as before)
                    with contextlib.suppress(RoutingError):
                        self._routing.mapped(mapper)
        # A relationship load inherits its parent query's set_shard_id (horizontal_shard's
        # default): a placement chosen for the parents, not for these rows, which route by
        # their own key or their parent's placement (_select).
        explicit = None if ctx.is_relationship_load else _explicit_token(ctx)
        if explicit is not None:
            token = self._routing.check_token(explicit)
            if ctx.is_select and isinstance(stmt, Select):
                self._check_identity_load(ctx, stmt, token)
            if not ctx.is_select:  # a write on a placement the caller chose: fenced too
                shard = self._routing.placements[token].shard
                self._wrote = True
                self.router.resolver.write_shard(self._snap, shard, "orm", "statement")
            return self._invoke(ctx, token)
        if ctx.is_select:
            if isinstance(stmt, CompoundSelect):
                raise UnsupportedQueryError(
                    "a UNION (CompoundSelect) through the ORM session is not routed; run it"
                    " with router.execute(union_all(...)), which routes and merges its SELECTs,"
                    " or run the SELECTs one by one"
                )
            if not isinstance(stmt, Select):
                raise UnsupportedQueryError(
                    f"{type(stmt).__name__} statements are not routed; use select()"
                )
            return self._select(ctx, stmt)
        if (ctx.is_update or ctx.is_delete) and isinstance(stmt, Update | Delete):
            return self._write(ctx, stmt)
        if ctx.is_insert:
            raise UnsupportedQueryError(
                "ORM bulk INSERT is not routed row by row; use session.add_all() (or"
                " router.execute for plain rows)"
            )
        raise UnsupportedQueryError(f"{type(stmt).__name__} statements are not routed")

    def _invoke(self, ctx: ORMExecuteState, token: str, statement: Any = None) -> Result[Any]:
        # identity_token becomes the load's identity token (and horizontal_shard's choice,
        # over one a relationship load inherits from its parent query); _TOKEN_OPTION tells
        # the engine hook which physical tables to use.
        if any(
            isinstance(o, set_shard_id) and o.shard_id != token
            for o in ctx._non_compile_orm_options
        ):
            # horizontal_shard runs a statement carrying set_shard_id on that placement,
            # whatever it is given: one a relationship load inherited from its parents' query
            # names the parents' placement (another table's, or one its rows left since).
            statement = _without_set_shard_id(statement if statement is not None else ctx.statement)
        return ctx.invoke_statement(
            statement=statement,
            execution_options={
                "identity_token": token,
                _TOKEN_OPTION: self._routing.placements[token],
            },
            bind_arguments={"shard_id": token},
        )

    def _plan(
        self, stmt: Select[Any] | Update | Delete, ctx: ORMExecuteState
    ) -> tuple[Plan, dict[str, Any]]:
        """Plan ``stmt`` with the router's planner: compiled to MySQL, values bound."""
        params = ctx.parameters if isinstance(ctx.parameters, Mapping) else None
        sql, values = _sql_and_params(stmt, params)
        return self._snap.planner.plan(sql), dict(values)

    def _key_tokens(self, plan: Plan, values: Mapping[str, Any]) -> list[str] | None:
        """The placements named by the cheapest functional key condition, if there is one."""
        table = plan.sharded
        assert table is not None
        condition = next((c for c in plan.conditions if c.rule.lookup_table is None), None)
        if condition is None:
            return None
        tokens = (
            self._routing.token(table, condition.rule.slot(ref.resolve(values)))
            for ref in condition.refs
        )
        return list(dict.fromkeys(tokens))

    def _lookup_tokens(self, plan: Plan, values: Mapping[str, Any]) -> list[str] | None:
        """The placements of the owners a lookup key condition names (``merchant_id = 7``:
        the ``merchant_orders`` rows of 7 say which users' placements hold its orders), read
        first as the router reads them (execution.lookup_targets, on the router's threads,
        outside the session's transaction, from the primaries like every read of the session:
        lookup rows are committed before their owners, so the session's own flushed rows are
        found too; the session's ledger gives the values it handed to other owners). Plus every
        placement of the table on a shard the session's transaction has begun: its rows are
        read in that transaction's snapshot, where an owner whose lookup rows another client
        has removed since is still there, as one database at REPEATABLE READ would return it.
        None: no lookup condition, or a migration's copies are on a target (the router then
        also restricts the statement to the owner keys, which a placement cannot), and the
        query fans out instead."""
        table = plan.sharded
        assert table is not None
        condition = next((c for c in plan.conditions if c.rule.lookup_table is not None), None)
        if condition is None:
            return None
        found = _Runner(self.router, primary=True).drive(
            lookup_targets(self._snap.topology, table, condition, values, True, self._ledger),
            self._snap,
        )
        if any(t.only is not None or t.exclude is not None for t in found.targets):
            return None
        tokens = [self._routing.token_at(table, t.shard, t.split) for t in found.targets]
        routing = self._routing
        begun = {p.shard for k, p in routing.placements.items() if routing.binds[k] in self._begun}
        tokens += [t for t in routing.fanout(table) if routing.placements[t].shard in begun]
        return list(dict.fromkeys(tokens))

    def _check_limits(self, tokens: Sequence[str], offset: int) -> None:
        limits = self.router.limits
        shards = {self._routing.placements[t].shard for t in tokens}
        if limits.max_fanout and len(shards) > limits.max_fanout:
            raise FanoutLimitError(
                f"query would reach {len(shards)} shards, more than"
                f" max_fanout={limits.max_fanout}; add a sharding-key criterion or raise"
                " max_fanout"
            )
        if limits.max_offset is not None and len(tokens) > 1 and offset > limits.max_offset:
            raise FanoutLimitError(
                f"OFFSET {offset} across shards makes every shard return {offset}+ rows"
                f" (max_offset={limits.max_offset}); page by key instead, or raise max_offset"
            )

    def _autoflushes(self, ctx: ORMExecuteState) -> bool:
        """Whether SQLAlchemy would autoflush for this statement (pending changes, autoflush
        on for the session and the statement)."""
        if not self.autoflush or self._flushing or self._is_clean():
            return False
        if ctx.execution_options.get("autoflush") is False:
            return False
        return bool(getattr(ctx.load_options, "_autoflush", True)) if ctx.is_select else True

    def _select(self, ctx: ORMExecuteState, stmt: Select[Any]) -> Result[Any]:
        plan, values = self._plan(stmt, ctx)
        table = plan.sharded
        if table is None:  # broadcast tables only (or none): every shard gives the answer
            if not plan.tables:
                return self._invoke(ctx, next(iter(self._routing.placements)))
            return self._invoke(ctx, self._routing.fanout(plan.tables[0])[0])
        tokens = self._key_tokens(plan, values)
        if tokens is None:
            tokens = (
                self._parent_tokens(ctx, table)
                or self._lookup_tokens(plan, values)
                or self._routing.fanout(table)
            )
        self._check_limits(tokens, plan.offset_depth)
        if len(tokens) == 1:
            return self._invoke(ctx, tokens[0])
        if plan.bind_late is not None:
            # HAVING values and select-item values over aggregates (SQLAlchemy binds every
            # Python number: func.sum(x) / 100, having(func.count() > 5)) written in, as
            # the router's fan-out does (execution.run).
            plan = plan.bind_late(values)
        if plan.scatter_refusal is not None:  # as the router refuses it (execution._check_limits)
            raise UnsupportedQueryError(plan.scatter_refusal)
        merge_plan = plan.merge
        if merge_plan is None:  # the planner makes one for every select it does not refuse
            raise UnsupportedQueryError(
                f"this query on {table.name} cannot be merged across shards; add a sharding-key"
                " criterion"
            )
        if merge_plan.grouped or merge_plan.distinct:
            return self._scatter_text(ctx, stmt, plan, values, tokens)
        # An eager relationship load (selectinload) reads its rows by position, so it takes no
        # extra sort columns; each parent's collection keeps its placement's order.
        eager = ctx.is_relationship_load and ctx.lazy_loaded_from is None
        unordered = not merge_plan.order_by and merge_plan.limit is None and not merge_plan.offset
        if unordered or (eager and merge_plan.limit is None and not merge_plan.offset):
            parts = [self._invoke(ctx, t) for t in tokens]
            return parts[0].merge(*parts[1:])
        return self._scatter_rows(ctx, stmt, merge_plan, tokens)

    def _parent_tokens(self, ctx: ORMExecuteState, table: TableRule) -> list[str] | None:
        """A relationship load of a table bound with its parent's runs on the parent's
        placement: a lazy load on the parent object's, an eager load (selectinload) on the
        placement the parents were loaded from."""
        if not ctx.is_relationship_load:
            return None
        parent_mapper: Any = None
        lazy_parent = ctx.lazy_loaded_from
        if lazy_parent is not None:
            key = lazy_parent.key
            token = key[2] if key is not None else lazy_parent.identity_token
            parent_mapper = lazy_parent.mapper
        else:
            top = ctx.execution_options.get("sa_top_level_orm_context")
            token = getattr(top, "identity_token", None)
            path = ctx.loader_strategy_path
            prop = path.path[-1] if path is not None and path.path else None
            parent_mapper = getattr(prop, "parent", None)
        if not isinstance(token, str) or token not in self._routing.placements:
            return None
        if not isinstance(parent_mapper, Mapper):
            return None
        try:
            parent = self._routing.mapped(parent_mapper).rule
        except RoutingError:
            return None
        if (parent.bound_to or parent.name) != (table.bound_to or table.name):
            return None
        if lazy_parent is not None:
            self._check_loaded(lazy_parent, "LAZY LOAD from")
        return [token]

    def _scatter_rows(
        self, ctx: ORMExecuteState, stmt: Select[Any], plan: MergePlan, tokens: Sequence[str]
    ) -> Result[Any]:
        """ORDER BY/LIMIT/OFFSET across placements: each returns its first rows in order, with
        the sort keys as extra columns, and a k-way merge keeps the global first ones."""
        terms = _sort_terms(stmt)
        # Labelled, so their columns can be found in each placement's result metadata.
        extra: list[ColumnElement[Any]] = [
            expr.label(f"{_SORT_LABEL}{i}") for i, (expr, _) in enumerate(terms)
        ]
        # MySQL/MariaDB: each sort key's collation weight too, as the router's scatter does
        # (SQLite's BINARY strings order as Python's do).
        backend = self.connection(bind_arguments={"shard_id": tokens[0]}).dialect.name
        weighed = backend in ("mysql", "mariadb")
        if weighed:
            extra += [_weight(expr) for expr, _ in terms]
        shard_stmt = stmt.add_columns(*extra).offset(None)
        if plan.shard_limit is not None:
            shard_stmt = shard_stmt.limit(plan.shard_limit)
        parts = [self._invoke(ctx, t, shard_stmt) for t in tokens]
        for part in parts:
            _refuse_index_ordered_sort_keys(plan, part)
        keys = list(parts[0].keys())
        width = len(keys) - len(extra)
        count = len(terms)
        rows = [_fetch(part) for part in parts]
        merged = merge(
            replace(
                plan,
                width=width,
                order_by=tuple(SortKey(width + i, desc) for i, (_, desc) in enumerate(terms)),
                weights=tuple(
                    (width + i, width + count + i) for i in range(count if weighed else 0)
                ),
                hidden=len(extra),
            ),
            rows,
        )
        return IteratorResult(SimpleResultMetaData(keys[:width]), iter(list(merged)))

    def _scatter_text(
        self,
        ctx: ORMExecuteState,
        stmt: Select[Any],
        plan: Plan,
        values: Mapping[str, Any],
        tokens: Sequence[str],
    ) -> Result[Any]:
        """Aggregates, GROUP BY, DISTINCT across placements: the planner's scatter SQL on each
        placement (on the session's connections), then the router's merge of the partials."""
        for described in stmt.column_descriptions:
            entity = described.get("expr")
            insp = inspect(entity, raiseerr=False) if entity is not None else None
            if getattr(insp, "is_mapper", False) or getattr(insp, "is_aliased_class", False):
                raise UnsupportedQueryError(
                    "aggregates, GROUP BY or DISTINCT with mapped entities across shards cannot"
                    " be merged; select columns, or add a sharding-key criterion"
                )
        merge_plan = plan.merge
        assert merge_plan is not None  # _select checked it
        results: list[JobResult] = []
        for token in tokens:
            placement = self._routing.placements[token]
            conn = self.connection(bind_arguments={"shard_id": token})
            sql = plan.render(
                Target(placement.shard, placement.residue or 0),
                scatter=True,
                backend=conn.dialect.name,
            )
            if merge_plan.expanded:
                sql = at_most(sql, self.router.limits.max_distinct_rows)
            # JobResult.of reads the ENUM/SET flags too, as the router's execution does
            results.append(JobResult.of(conn.execute(text(sql), dict(values))))
        if merge_plan.regrouped and not any(r.rows for r in results):
            # One row over no rows all the same (execution.run does the same).
            placement = self._routing.placements[tokens[0]]
            conn = self.connection(bind_arguments={"shard_id": tokens[0]})
            sql = plan.render_empty(Target(placement.shard, placement.residue or 0))
            empty = JobResult.of(conn.execute(text(sql), dict(values)))
            return IteratorResult(SimpleResultMetaData(empty.columns), iter(empty.rows))
        columns = results[0].columns
        merged = merged_rows(merge_plan, results, self.router.limits)
        visible = columns[: merge_plan.visible_width(len(columns))]
        return IteratorResult(SimpleResultMetaData(visible), iter(merged))

    def _write(self, ctx: ORMExecuteState, stmt: Update | Delete) -> Result[Any]:
        if ctx.is_executemany:
            raise UnsupportedQueryError(
                "ORM bulk UPDATE by primary key (a list of parameter sets) is not routed;"
                " load the objects and change them, or use router.execute"
            )
        plan, values = self._plan(stmt, ctx)
        table = plan.sharded
        kind = "UPDATE" if ctx.is_update else "DELETE"
        if table is None:
            raise UnsupportedQueryError(
                f"{kind} of broadcast table {plan.tables[0].name}: use router.execute, which"
                " writes every shard"
            )
        if ctx.is_delete and any(r.lookup_table is not None for r in table.keys.values()):
            raise UnsupportedQueryError(
                f"bulk DELETE of {table.name} would leave its lookup rows behind; delete the"
                " objects with session.delete(), or use router.execute (which cleans them up)"
            )
        tokens = self._key_tokens(plan, values)
        if tokens is None:
            if not self.router.limits.allow_scatter_write:
                raise ScatterWriteError(
                    f"{kind} on {table.name} has no sharding-key criterion"
                    f" ({', '.join(table.keys)}), so it would run on every shard; add the key,"
                    " or create the Router with allow_scatter_write=True if you mean it"
                )
            tokens = self._routing.fanout(table, reading=False)
        self._check_limits(tokens, 0)
        self._wrote = True
        for shard in dict.fromkeys(self._routing.placements[t].shard for t in tokens):
            self.router.resolver.write_shard(self._snap, shard, "orm", "statement")
        if len(tokens) > 1 and plan.has_limit:
            raise RoutingError(
                f"{kind} with ORDER BY/LIMIT across shards has no single order; add the"
                " sharding key"
            )
        parts = [self._invoke(ctx, t) for t in tokens]
        return parts[0].merge(*parts[1:]) if len(parts) > 1 else parts[0]


def routed_sessionmaker(router: Router, **kw: Any) -> sessionmaker[RoutedSession]:
    """A ``sessionmaker`` of RoutedSession over ``router`` (``kw``: Session arguments)."""
    return sessionmaker(class_=RoutedSession, router=router, **kw)


# -- helpers --------------------------------------------------------------------------------


_SLOT_INFO = "shardrouter_slot"
"""``InstanceState.info`` key: (identity key, sharding value or None, (topology name,
version)) of an object whose primary key does not route, remembered when it is loaded,
refreshed or inserted (its sharding column cannot change under one identity), for the
placement checks of its refreshes and writes after its attributes expired. The value, not
its slot: a slot means something only under one topology (two routers may map one class).
Kept with its identity key: ``make_transient`` keeps ``info``."""


def _remembered(state: InstanceState[Any]) -> tuple[Any, Any] | None:
    """(sharding value or None, marker) remembered for ``state`` under its current identity,
    or None (nothing remembered, or for another identity: make_transient keeps ``info``)."""
    found = state.info.get(_SLOT_INFO)
    if found is None or state.key is None or found[0] != state.key:
        return None
    return found[1], found[2]


def _remembered_value(state: InstanceState[Any]) -> Any:
    """The sharding value remembered for ``state`` under its current identity, or None."""
    found = _remembered(state)
    return found[0] if found is not None else None


def _remember_slot(state: InstanceState[Any], *_: Any) -> None:
    """The mapper "load"/"refresh" listener (raw: the state) of classes whose primary key
    does not route (registered by _Routing.mapped, for subclasses too): their sharding value
    (see _SLOT_INFO)."""
    session = state.session
    if not isinstance(session, RoutedSession) or state.key is None:
        return
    snap = session._snapshot_pin.snap
    routing = session._snapshot_pin.routing
    if snap is None or routing is None:
        return
    try:
        info = routing.mapped(state.mapper, listen=False)
    except RoutingError:  # not routable (a read-only class without its sharding column)
        return
    primary = info.rule.primary
    if info.key_routes or primary is None:
        return
    key = info.attrs.get(primary.column)
    value = state.dict.get(key) if key is not None else None
    if value is None and _remembered_value(state) is not None:
        return  # a partial refresh: the value cannot change under one identity
    token = state.key[2]
    placement = routing.placements.get(token) if isinstance(token, str) else None
    where = _holding(snap, placement.shard) if placement is not None else None
    state.info[_SLOT_INFO] = (state.key, value, where)


def _holding(snap: Snapshot, shard: ShardId) -> tuple[Any, ...]:
    """What ``shard`` holds under ``snap``: its topology, its slot ranges and the moves that
    touch it. An object loaded without its sharding value from that shard is still there
    while this is unchanged (see RoutedSession._loaded_slot)."""
    topology = snap.topology
    moves = tuple(
        (m.slots, m.source, m.target)
        for m in topology.config.moving
        if shard in (m.source, m.target)
    )
    merged: list[list[int]] = []
    for r in sorted(topology.slots_of(shard), key=lambda r: r.start):
        if merged and merged[-1][1] >= r.start:  # adjacent or overlapping: one range
            merged[-1][1] = max(merged[-1][1], r.end)
        else:
            merged.append([r.start, r.end])
    return (topology.name, shard, tuple(map(tuple, merged)), moves)


def _without_set_shard_id(statement: Any) -> Any:
    """``statement`` without its set_shard_id options (a copy: generative, as its own
    ``.options()`` makes one)."""
    copy = statement._generate()
    copy._with_options = tuple(
        o for o in statement._with_options if not isinstance(o, set_shard_id)
    )
    return copy


def _identity_slot(info: _MappedTable, state: InstanceState[Any]) -> Slot | None:
    """The slot of a persistent object from its identity key alone (a primary-key column
    that routes by function: the sharding column, or a key carrying its gene), else None."""
    key = state.key
    if key is None:
        return None
    for col, value in zip(info.mapper.primary_key, key[1], strict=False):
        rule = info.rule.keys.get(col.name)
        if rule is not None and rule.lookup_table is None and value is not None:
            return rule.slot(value)
    return None


def _explicit_token(ctx: ORMExecuteState) -> Any:
    """A placement the caller or the ORM already chose, as horizontal_shard looks for it."""
    for option in ctx._non_compile_orm_options:
        if isinstance(option, set_shard_id):
            return option.shard_id
    options: Any = None
    if ctx.is_select:
        options = ctx.load_options
    elif ctx.is_update or ctx.is_delete:
        options = ctx.update_delete_options
    token = getattr(options, "_identity_token", None)
    if token is not None:
        return token
    if "_sa_shard_id" in ctx.execution_options:
        return ctx.execution_options["_sa_shard_id"]
    return ctx.bind_arguments.get("shard_id")


_SORT_LABEL = "shardrouter_sort_"
"""The label of the sort-key columns _scatter_rows adds (found by it in result metadata)."""


def _refuse_index_ordered_sort_keys(plan: MergePlan, part: Result[Any]) -> None:
    """execution._refuse_index_ordered for one placement's ORM result: refused if a sort key
    is an ENUM or SET column, which MySQL orders by index and the merge would order by text.
    The flags are read from the driver's result metadata (index_ordered_columns), found
    through the ORM result's CursorResult (``raw``) before its rows are fetched."""
    cursor = getattr(getattr(part, "raw", None), "cursor", None)
    description = getattr(cursor, "description", None)
    if not description:
        return  # no metadata (a driver without flags): the router's known gap as well
    names = [d[0] for d in description]
    sort_keys = tuple(
        SortKey(i, False) for i, name in enumerate(names) if name.startswith(_SORT_LABEL)
    )
    floats, rounded = float_columns(description)
    found = JobResult(
        tuple(names), [], 0, (), index_ordered_columns(cursor), floats, rounded=rounded
    )
    keys_only = replace(plan, order_by=sort_keys, group_by=(), distinct=False)
    _refuse_index_ordered(keys_only, [found])
    _refuse_floats(replace(keys_only, having=None, computed=()), [found])


class _WeightString(FunctionElement[bytes]):
    """``WEIGHT_STRING(x AS CHAR(n))``, which SQLAlchemy has no construct for."""

    name = "weight_string"
    type = LargeBinary()
    inherit_cache = True


@compiles(_WeightString)
def _compile_weight_string(element: _WeightString, compiler: SQLCompiler, **kw: Any) -> str:
    return f"WEIGHT_STRING({compiler.process(element.clauses, **kw)} AS CHAR({WEIGHT_CHARS}))"


def _weight(expr: ColumnElement[Any]) -> ColumnElement[Any]:
    """The collation sort key of ``expr``, spelled as scatter.weight spells it for the router:
    NULL for binary values (the merge compares them), an empty weight (refused by the merge)
    for strings the padding would cut, else ``WEIGHT_STRING(x AS CHAR(255))`` (the padding
    gives PAD SPACE collations' ``'a' = 'a '``, and NO PAD ones keep them apart)."""
    return case(
        (func.collation(expr) == "binary", null()),
        (func.char_length(func.rtrim(expr)) > WEIGHT_CHARS, literal(b"", LargeBinary)),
        else_=_WeightString(expr),
    )


def _sort_terms(stmt: Select[Any]) -> list[tuple[ColumnElement[Any], bool]]:
    """ORDER BY as (expression, descending) pairs the merge can sort on."""
    terms: list[tuple[ColumnElement[Any], bool]] = []
    for clause in stmt._order_by_clauses:
        element: Any = clause
        descending = False
        if isinstance(element, UnaryExpression):
            if element.modifier is operators.desc_op:
                descending = True
            elif element.modifier is not operators.asc_op:
                raise UnsupportedQueryError(
                    f"ORDER BY {clause} across shards: NULLS FIRST/LAST is not MySQL syntax"
                )
            element = element.element
        if isinstance(element, _textual_label_reference):
            name = element.element
            element = stmt.selected_columns.get(name)
            if element is None:
                raise UnsupportedQueryError(
                    f"ORDER BY {name!r} across shards: name a column expression instead"
                )
        elif isinstance(element, _label_reference):
            element = element.element
        if isinstance(element, UnaryExpression | TextClause) or (
            isinstance(element, ColumnClause) and element.is_literal
        ):
            raise UnsupportedQueryError(
                f"ORDER BY {clause} across shards: order by column expressions (positions and"
                " text cannot be merged)"
            )
        terms.append((element, descending))
    return terms


def _fetch(result: Result[Any]) -> list[Any]:
    """Every row of one placement's result (collections of joined eager loads made unique)."""
    attributes: Mapping[str, Any] = getattr(result, "_attributes", {})
    if attributes.get("filtered"):
        return list(result.unique().all())
    return list(result.all())
