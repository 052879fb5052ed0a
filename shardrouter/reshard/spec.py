"""What moves: the physical tables of one shard that take part in a migration, and the filter
that says which of their rows belong to the moving slots.

Shared by the journal (``journal.py``), the copy (``copy.py``) and the workflow: a
``TableSpec`` is read once from the shard's ``information_schema`` (``describe``) so every
statement they build uses the table's real columns and primary key, quoted, with values bound.
"""

from __future__ import annotations

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
            columns = _columns(conn, physical)
            if not columns:
                problems.append(
                    f"table {physical} (of {name}) is missing; apply the schema first"
                    " (shardctl schema apply)"
                )
                continue
            key = _primary_key(conn, physical)
            if not key:
                problems.append(
                    f"table {physical} (of {name}) has no primary key: a migration copies"
                    " and journals rows by their primary key; add one"
                )
                continue
            if shard_column is not None and shard_column not in columns:
                problems.append(
                    f"table {physical} (of {name}) has no column {shard_column}, its sharding"
                    " column: the rows' slots cannot be told"
                )
                continue
            out.append(TableSpec(name, physical, columns, key, shard_column))
    if problems:
        raise ReshardDataError("; ".join(problems))
    return out


def _columns(conn: Connection, table: str) -> tuple[str, ...]:
    rows = conn.execute(
        text(
            "SELECT column_name FROM information_schema.columns"
            " WHERE table_schema = DATABASE() AND table_name = :t ORDER BY ordinal_position"
        ),
        {"t": table},
    )
    return tuple(str(r[0]) for r in rows)


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


__all__ = ["Belongs", "TableSpec", "describe", "logical_tables", "quote"]
