"""What moves: the physical tables of one shard that take part in a migration, and the filter
that says which of their rows belong to the moving slots.

Shared by the journal (``journal.py``), the copy (``copy.py``) and the workflow: a
``TableSpec`` is read once from the shard's ``information_schema`` (``describe``) so every
statement they build uses the table's real columns and primary key, quoted, with values bound.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, text

from shardrouter.core.topology import Topology
from shardrouter.errors import ReshardDataError


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


@dataclass(frozen=True, slots=True)
class Belongs:
    """Which rows of a table move: those whose slot (from the sharding column's value, by the
    table's own rule in ``topology``) lies in one of ``ranges`` ([start, end) pairs)."""

    topology: Topology
    ranges: tuple[tuple[int, int], ...]

    def slot(self, spec: TableSpec, value: Any) -> int:
        if spec.shard_column is None:
            raise ReshardDataError(f"{spec.logical} is a broadcast table: its rows carry no slot")
        return int(self.topology.slot_for(spec.logical, value))

    def __call__(self, spec: TableSpec, value: Any) -> bool:
        """True if a row of ``spec`` with sharding value ``value`` moves (every broadcast row
        does)."""
        if spec.shard_column is None:
            return True
        slot = self.slot(spec, value)
        return any(start <= slot < end for start, end in self.ranges)


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
    return found


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
        for physical in rule.physical_names:
            try:
                out.append(describe_table(conn, physical, logical=name, shard_column=shard_column))
            except ReshardDataError as exc:
                problems.append(str(exc))
    if problems:
        raise ReshardDataError("; ".join(problems))
    return out


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
    "describe",
    "describe_table",
    "driver_quote",
    "logical_tables",
    "quote",
    "read_expression",
    "statements",
    "typed",
]
