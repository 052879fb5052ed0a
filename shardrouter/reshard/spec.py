"""What moves: the physical tables of one shard that take part in a migration, and the filter
that says which of their rows belong to the moving slots.

Shared by the journal (``journal.py``), the copy (``copy.py``) and the workflow: a
``TableSpec`` is read once from the shard's ``information_schema`` (``describe``) so every
statement they build uses the table's real columns and primary key, quoted, with values bound.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal, InvalidOperation
from typing import Any

from sqlalchemy import Connection, text

from shardrouter.core.strategies import GeneStrategy
from shardrouter.core.topology import Topology
from shardrouter.errors import ReshardDataError, RoutingError
from shardrouter.types import KeyType


@dataclass(frozen=True, slots=True)
class TableSpec:
    """One physical table on one shard, as a migration sees it."""

    logical: str
    """The logical table (``orders``)."""
    physical: str
    """Its physical name on the shard (``orders_0002``; the logical name when not split)."""
    columns: tuple[str, ...]
    """Every column, in the table's order."""
    key: tuple[str, ...]
    """The primary key's columns, in the key's order (chunks and journal entries use it)."""
    shard_column: str | None
    """The column whose value gives a row's slot (the table's primary sharding column, the
    owner's for a bound table); None for a broadcast table, whose rows all move."""
    generated: tuple[str, ...] = ()
    """Generated (virtual or stored) columns: read and compared, never written (the server
    computes them; an INSERT naming one fails)."""
    types: tuple[str, ...] = ()
    """The data type of each column (information_schema's ``data_type``, lower case), in
    ``columns`` order; empty when unknown. The movers read a few types through an exact
    expression (``read_expression``)."""
    key_routes: bool = False
    """The primary key holds a column that routes the row (the sharding column, or a gene
    column such as orders.order_id): two rows with one key then have one slot, so a copy
    can never meet a row of another slot under its key (journal.guard_own_rows). False
    when unknown: the guard then checks."""

    def type_of(self, column: str) -> str | None:
        if not self.types:
            return None
        return self.types[self.columns.index(column)]

    @property
    def writable(self) -> tuple[str, ...]:
        """The columns a copy writes: every column but the generated ones, in table order."""
        if not self.generated:
            return self.columns
        return tuple(c for c in self.columns if c not in self.generated)


class UnroutableValue(ReshardDataError):
    """A row's sharding value, as stored, is one no router routes (``Belongs.slot``): a
    migration cannot tell whether the row moves. ``value``: the stored value; ``reason``:
    why it cannot be routed; ``key``: the row's primary key, when known."""

    def __init__(
        self, spec: TableSpec, value: Any, reason: str, key: Sequence[Any] | None = None
    ) -> None:
        self.spec = spec
        self.value = value
        self.reason = reason
        self.key = tuple(key) if key is not None else None
        row = f"the row with key {_shown_key(spec, key)}" if key is not None else "a row"
        super().__init__(
            f"table {spec.physical} (of {spec.logical}): {row} holds {value!r} in its"
            f" sharding column {spec.shard_column}, which no router routes ({reason}): the"
            " migration cannot tell whether the row moves, so it stops rather than leave it"
            " behind. Correct the row (UPDATE its sharding column to the value the service"
            " routes it by) or delete it, then run the step again (`shardctl reshard resume`);"
            " or cancel the migration"
        )


def _shown_key(spec: TableSpec, key: Sequence[Any]) -> str:
    return "(" + ", ".join(f"{c}={v!r}" for c, v in zip(spec.key, key, strict=False)) + ")"


_INTEGER_TEXT = re.compile(r" *[+-]?[0-9]+ *")
_DATE_TEXT = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})(?:[ T][0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]+)?)?"
)
_ZERO_DATE = re.compile(r"0000-00-00(?:[ T]00:00:00(?:\.0+)?)?")


def routed_value(key_type: KeyType, value: Any) -> Any:
    """The value the routers route a row by whose sharding column holds ``value`` as the
    movers read it (from the driver, or from a journal entry's JSON), in the type of the
    column's key (``key_type``); None when the row has no slot; ``ValueError`` (the reason)
    when no router routes it.

    The routers take the service's values (an ``int`` for an ``int`` key, a ``str``, a
    ``date``) and the column stores them in its own type, which reads back as another:

    - ``int`` keys: a DECIMAL/NUMERIC column reads back as ``Decimal('123')``, a VARCHAR as
      ``'123'`` (and the journal's JSON of either as ``123`` or ``'123'``): an integral value
      is the ``int`` it stores. A fraction or other text is no integer a router takes.
    - ``str`` keys: an integer column's value is routed as its decimal text, a DATE's as its
      ISO text; other types have no one text the service could have written them as.
    - ``date`` keys: a DATETIME is routed as its date (the hash strategy's own rule); text
      (a VARCHAR column, the journal's JSON) as the date it spells.

    No slot: NULL, and MariaDB's zero date ``'0000-00-00'`` (the driver and JSON give it as
    text), the placeholder a lenient sql_mode stores and MariaDB itself matches with
    ``IS NULL``. No key a router routes reaches such a row; it stays where it is, as NULL
    does. A date with a zero month or day only (``'2025-00-10'``) has no such standing: it
    cannot be routed (ValueError).
    """
    if value is None:
        return None
    if key_type is KeyType.INT:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, Decimal):
            if value.is_finite() and value == value.to_integral_value():
                return int(value)
            raise ValueError("not an integer")
        if isinstance(value, str) and _INTEGER_TEXT.fullmatch(value):
            return int(value)
        raise ValueError("not an integer")
    if key_type is KeyType.STR:
        if isinstance(value, str):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if isinstance(value, Decimal) and value.is_finite() and value.as_tuple().exponent == 0:
            return str(value)
        if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
            return value.isoformat()
        raise ValueError(
            f"a {type(value).__name__} has no one text the service could have routed it by"
        )
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    if isinstance(value, str):
        if _ZERO_DATE.fullmatch(value):
            return None
        found = _DATE_TEXT.fullmatch(value)
        if found is not None:
            try:
                return dt.date(*(int(part) for part in found.groups()))
            except ValueError:
                raise ValueError("not a valid date (a zero month or day?)") from None
    raise ValueError("not a date")


@dataclass(frozen=True, slots=True)
class Belongs:
    """Which rows of a table move: those whose slot (from the sharding column's value, by the
    table's own rule in ``topology``) lies in one of ``ranges`` ([start, end) pairs)."""

    topology: Topology
    ranges: tuple[tuple[int, int], ...]

    def slot(self, spec: TableSpec, value: Any) -> int | None:
        """The slot the routers give a row of ``spec`` whose sharding column holds ``value``
        as stored (``routed_value``); None when it has none (NULL, the zero date: no key
        reaches the row, which stays where it is). UnroutableValue when no router routes
        it."""
        if spec.shard_column is None:
            raise ReshardDataError(f"{spec.logical} is a broadcast table: its rows carry no slot")
        rule = self.topology.table(spec.logical).primary
        if rule is None:
            raise ReshardDataError(f"{spec.logical} has no sharding column")
        try:
            routed = routed_value(rule.key_type, value)
        except ValueError as exc:
            reason = f"{exc}; the column's key is {rule.key_type.label}"
            raise UnroutableValue(spec, value, reason) from None
        if routed is None:
            return None
        try:
            return int(rule.slot(routed))
        except RoutingError as exc:
            raise UnroutableValue(spec, value, str(exc)) from None

    def __call__(self, spec: TableSpec, value: Any) -> bool:
        """True if a row of ``spec`` with sharding value ``value`` moves (every broadcast row
        does; a row without a slot does not). UnroutableValue when the value cannot be
        routed: the caller decides (``journal.BelongsCache``)."""
        if spec.shard_column is None:
            return True
        slot = self.slot(spec, value)
        return slot is not None and any(start <= slot < end for start, end in self.ranges)


def quote(name: str) -> str:
    """A MySQL identifier, backquoted (names come from information_schema and the topology,
    never from a statement's user; quoting keeps reserved words and odd names working)."""
    return "`" + name.replace("`", "``") + "`"


def driver_quote(name: str) -> str:
    """``quote(name)`` for statements run with ``exec_driver_sql``: the MySQL drivers' format
    paramstyle reads every ``%`` of the text as a placeholder, so a literal one is doubled."""
    return quote(name).replace("%", "%%")


@dataclass(frozen=True, slots=True)
class Statements:
    """The SQL of one TableSpec, built once per spec (``statements``) and reused by every
    chunk and batch: identifiers quoted, values always ``%s`` placeholders (the drivers'
    format paramstyle, through ``exec_driver_sql``).

    Key ranges are written as expanded ORs (``a > %s OR (a = %s AND b > %s)``), not as row
    constructors: MariaDB 10.11 plans ``(a, b) > (%s, %s) ORDER BY a, b LIMIT n`` as a scan of
    the whole index from its start (EXPLAIN: type ``index``), which makes a chunked walk
    quadratic, while the expanded form is a range on the primary key (type ``range``).
    ``(a, b) IN ((%s, %s), ...)`` is a range on the primary key as it is.
    """

    table: str
    """The quoted physical name."""
    key_columns: tuple[str, ...]
    """The quoted key columns."""
    select_list: str
    """Every column (``spec.columns``) in order, each read exactly (``read_expression``):
    positions below index into these rows."""
    keys_and_shard: str
    """The key columns, then the sharding column when there is one."""
    order_by: str
    """``ORDER BY`` the primary key."""
    key_positions: tuple[int, ...]
    """Where the key columns are in a row of ``select_list``."""
    shard_position: int | None
    """Where the sharding column is in a row of ``select_list`` (None: broadcast)."""
    write_positions: tuple[int, ...]
    """Where the writable columns (``spec.writable``) are in a row of ``select_list``."""
    upsert: str
    """One row's INSERT of the writable columns, values as placeholders, updating every one
    of them on a duplicate key (key columns too: under a case-insensitive collation the
    copy's key takes the source's exact spelling). Run with executemany, which both drivers
    send as multi-row statements."""
    after: str
    """The predicate ``key > %s...``; its parameters from ``range_params``."""
    upto: str
    """The predicate ``key <= %s...``; its parameters from ``range_params``."""
    row_hash: str
    """A 16-byte hash of the whole row, computed by the server: MD5 over every column through
    QUOTE (NULL stays distinct from the text 'NULL'; bytes, dates and decimals are hashed as
    the server prints them, the same on both sides of a copy with the same schema; a FLOAT
    through the DOUBLE it widens to, since QUOTE prints a FLOAT with 6 digits only)."""

    def key_in(self, n: int) -> str:
        """The predicate ``key IN (n keys)``; its parameters from ``key_params``."""
        return _key_in(self.key_columns, n)

    @staticmethod
    def range_params(key: Sequence[Any]) -> tuple[Any, ...]:
        """The parameters of ``after`` / ``upto`` for the bound ``key``: the expanded OR
        repeats the leading columns (``a``; ``a, b``; ``a, b, c`` ...)."""
        return tuple(v for i in range(len(key)) for v in key[: i + 1])

    @staticmethod
    def key_params(keys: Iterable[Sequence[Any]]) -> tuple[Any, ...]:
        """The parameters of ``key_in`` for ``keys``, flattened."""
        return tuple(v for key in keys for v in key)


@functools.lru_cache(maxsize=1024)
def statements(spec: TableSpec) -> Statements:
    """The statements of ``spec`` (cached: a spec is immutable, and a migration builds each
    table's statements once). The spec must know its column types (``describe``,
    ``describe_table``, ``typed``)."""
    if len(spec.types) != len(spec.columns):
        raise ReshardDataError(
            f"table {spec.physical}: its column types are unknown; build its TableSpec with"
            " describe() or describe_table(), or pass it through typed()"
        )
    q = driver_quote
    table = q(spec.physical)
    keys = tuple(q(c) for c in spec.key)
    position = {c: i for i, c in enumerate(spec.columns)}
    writable = spec.writable
    shard = (q(spec.shard_column),) if spec.shard_column is not None else ()
    updates = ", ".join(f"{q(c)} = VALUES({q(c)})" for c in writable)
    placeholders = ", ".join("%s" for _ in writable)
    quoted_all = ", ".join(
        f"QUOTE(CAST({q(c)} AS DOUBLE))" if spec.type_of(c) == "float" else f"QUOTE({q(c)})"
        for c in spec.columns
    )
    return Statements(
        table=table,
        key_columns=keys,
        select_list=", ".join(read_expression(spec, c) for c in spec.columns),
        keys_and_shard=", ".join(keys + shard),
        order_by="ORDER BY " + ", ".join(keys),
        key_positions=tuple(position[c] for c in spec.key),
        shard_position=position[spec.shard_column] if spec.shard_column is not None else None,
        write_positions=tuple(position[c] for c in writable),
        upsert=(
            f"INSERT INTO {table} ({', '.join(q(c) for c in writable)})"
            f" VALUES ({placeholders}) ON DUPLICATE KEY UPDATE {updates}"
        ),
        after=_expanded(keys, ">", ">"),
        upto=_expanded(keys, "<", "<="),
        row_hash=f"UNHEX(MD5(CONCAT_WS(0x1f, {quoted_all})))",
    )


def typed(conn: Connection, spec: TableSpec) -> TableSpec:
    """``spec`` with its column types (read from the shard of ``conn`` if it lacks them)."""
    if len(spec.types) == len(spec.columns):
        return spec
    found = describe_table(
        conn, spec.physical, logical=spec.logical, shard_column=spec.shard_column
    )
    if found.columns != spec.columns or found.key != spec.key:
        raise ReshardDataError(
            f"table {spec.physical}: its columns or primary key differ from the TableSpec"
            " given; describe it again"
        )
    return replace(found, key_routes=spec.key_routes)


def _expanded(keys: Sequence[str], strict: str, last: str) -> str:
    """``(k1, .., kn) <op> (v1, .., vn)`` as an OR of prefixes: for ``i`` in 1..n, the first
    ``i - 1`` columns equal and the ``i``-th compared (strictly, but for the last column of
    ``<=``)."""
    terms = []
    for i, column in enumerate(keys):
        op = last if i == len(keys) - 1 else strict
        equal = [f"{k} = %s" for k in keys[:i]]
        terms.append("(" + " AND ".join([*equal, f"{column} {op} %s"]) + ")")
    return "(" + " OR ".join(terms) + ")"


@functools.lru_cache(maxsize=4096)
def _key_in(keys: tuple[str, ...], n: int) -> str:
    if len(keys) == 1:
        return f"{keys[0]} IN ({', '.join('%s' for _ in range(n))})"
    one = "(" + ", ".join("%s" for _ in keys) + ")"
    return f"({', '.join(keys)}) IN ({', '.join(one for _ in range(n))})"


def describe(conn: Connection, topology: Topology, logical: Iterable[str]) -> list[TableSpec]:
    """The TableSpec of every physical table of the ``logical`` tables on the shard of
    ``conn`` (its current database). ReshardDataError when a table is missing or has no
    primary key (a migration copies and journals rows by their primary key)."""
    out: list[TableSpec] = []
    problems: list[str] = []
    for name in logical:
        rule = topology.table(name)
        shard_column = rule.primary.column if rule.primary is not None else None
        routing = {
            k.column
            for k in rule.keys.values()
            if k.column == shard_column or isinstance(k.strategy, GeneStrategy)
        }
        for physical in rule.physical_names:
            try:
                found = describe_table(conn, physical, logical=name, shard_column=shard_column)
            except ReshardDataError as exc:
                problems.append(str(exc))
            else:
                out.append(replace(found, key_routes=bool(routing & set(found.key))))
                if _char_key_ambiguous(rule, found):
                    problems.append(
                        f"table {physical} (of {name}): its sharding column {shard_column} is"
                        " CHAR, which the server gives back without trailing spaces, while the"
                        " routers hash the value as the service gave it ('K7 ' and 'K7' route"
                        " apart): a row cannot be placed where its readers look for it. Make"
                        " the column VARCHAR, or hash it with fold_case (which ignores"
                        " trailing spaces), then plan again"
                    )
    if problems:
        raise ReshardDataError("; ".join(problems))
    return out


def _char_key_ambiguous(rule: Any, spec: TableSpec) -> bool:
    """A str sharding key in a CHAR column, not hashed with fold_case (review 12)."""
    primary = rule.primary
    if primary is None or spec.shard_column is None:
        return False
    if spec.type_of(spec.shard_column) != "char" or primary.key_type is not KeyType.STR:
        return False
    return not bool(getattr(primary.strategy, "fold_case", False))


def describe_table(
    conn: Connection, physical: str, *, logical: str | None = None, shard_column: str | None
) -> TableSpec:
    """The TableSpec of one physical table of the shard of ``conn`` (``logical`` defaults to
    ``physical``; ``shard_column`` None: every row moves, as a broadcast table's)."""
    name = logical if logical is not None else physical
    columns = _columns(conn, physical)
    if not columns:
        raise ReshardDataError(
            f"table {physical} (of {name}) is missing; apply the schema first"
            " (shardctl schema apply)"
        )
    key = _primary_key(conn, physical)
    if not key:
        raise ReshardDataError(
            f"table {physical} (of {name}) has no primary key: a migration copies"
            " and journals rows by their primary key; add one"
        )
    names = tuple(c for c, _, _ in columns)
    if shard_column is not None and shard_column not in names:
        raise ReshardDataError(
            f"table {physical} (of {name}) has no column {shard_column}, its sharding"
            " column: the rows' slots cannot be told"
        )
    generated = tuple(c for c, _, is_generated in columns if is_generated)
    types = tuple(data_type for _, data_type, _ in columns)
    return TableSpec(name, physical, names, key, shard_column, generated, types)


def read_expression(spec: TableSpec, column: str) -> str:
    """How the movers read ``column`` so that writing the value back stores the same value.

    The text protocol and the drivers lose two types: a FLOAT is sent with 6 significant
    digits (0.33333334 arrives as 0.333333: a different float once written back), so it is
    read as the DOUBLE it widens to exactly; a negative TIME is written wrong by PyMySQL
    (-00:59:59 arrives as a timedelta sent back as -02:59:59), so it is read and written as
    the server's own text."""
    quoted = driver_quote(column)
    kind = spec.type_of(column)
    if kind == "float":
        return f"CAST({quoted} AS DOUBLE)"
    if kind == "time":
        return f"CAST({quoted} AS CHAR)"
    return quoted


def _columns(conn: Connection, table: str) -> tuple[tuple[str, str, bool], ...]:
    """(name, data type, generated) of every column of ``table``, in order."""
    rows = conn.execute(
        text(
            "SELECT column_name, data_type, is_generated FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    )
    return tuple((str(r[0]), str(r[1]).lower(), str(r[2]).upper() == "ALWAYS") for r in rows)


def _primary_key(conn: Connection, table: str) -> tuple[str, ...]:
    rows = conn.execute(
        text(
            "SELECT column_name FROM information_schema.key_column_usage"
            " WHERE table_schema = DATABASE() AND table_name = :t"
            " AND constraint_name = 'PRIMARY' ORDER BY ordinal_position"
        ),
        {"t": table},
    )
    return tuple(str(r[0]) for r in rows)


def key_to_json(key: Sequence[Any]) -> list[Any]:
    """A primary key's values (as the driver returned them) in a JSON form that
    ``key_from_json`` turns back into exactly the same values: the copy's checkpoint, from
    which a resumed walk continues (``WHERE key > checkpoint``). Integers, strings, NULL and
    floats are JSON's own; a Decimal (its digits and scale), a datetime, a date, a time, a
    timedelta and bytes are tagged objects (``{"decimal": "12.50"}``). ReshardDataError for
    any other type (nothing written)."""
    return [_value_to_json(v) for v in key]


def key_from_json(data: Sequence[Any]) -> tuple[Any, ...]:
    """The key ``key_to_json`` wrote (a checkpoint written before the tags, a plain list of
    integers and strings, reads as it is)."""
    return tuple(_value_from_json(v) for v in data)


def _value_to_json(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value  # JSON keeps a float's shortest repr, which reads back as the same float
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, dt.datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, dt.date):
        return {"date": value.isoformat()}
    if isinstance(value, dt.time):
        return {"time": value.isoformat()}
    if isinstance(value, dt.timedelta):
        return {"timedelta": [value.days, value.seconds, value.microseconds]}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"bytes": base64.b64encode(bytes(value)).decode("ascii")}
    raise ReshardDataError(
        f"a primary key value {value!r} of type {type(value).__name__} cannot be kept as a"
        " checkpoint (no exact JSON form)"
    )


_FROM_JSON: dict[str, Any] = {
    "decimal": Decimal,
    "datetime": dt.datetime.fromisoformat,
    "date": dt.date.fromisoformat,
    "time": dt.time.fromisoformat,
    "timedelta": lambda parts: dt.timedelta(days=parts[0], seconds=parts[1], microseconds=parts[2]),
    "bytes": base64.b64decode,
}


def _value_from_json(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        ((tag, text),) = value.items()
        parse = _FROM_JSON.get(tag)
        if parse is not None:
            try:
                return parse(text)
            except (ValueError, TypeError, IndexError, InvalidOperation):
                pass
    raise ReshardDataError(f"checkpoint key value {value!r} is not one key_to_json writes")


def logical_tables(topology: Topology) -> tuple[Sequence[str], Sequence[str]]:
    """(sharded tables, broadcast tables) of ``topology``, in a stable order."""
    sharded: list[str] = []
    broadcast: list[str] = []
    for name in sorted(topology.config.tables):
        rule = topology.table(name)
        (broadcast if rule.kind == "broadcast" else sharded).append(name)
    return sharded, broadcast


__all__ = [
    "Belongs",
    "Statements",
    "TableSpec",
    "UnroutableValue",
    "describe",
    "describe_table",
    "driver_quote",
    "key_from_json",
    "key_to_json",
    "logical_tables",
    "quote",
    "read_expression",
    "routed_value",
    "statements",
    "typed",
]
