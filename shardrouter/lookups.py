"""Lookup-table consistency: find orphan lookup rows (and remove them) and missing entries.

Lookup rows are written before their owner and deleted after it, so a crash leaves at worst
an orphan: a lookup row whose owner row does not exist. Reads ignore orphans (the owner's shard
is asked anyway), so they only cost a wasted query; this check finds and removes them. A
missing entry (an owner row with no lookup row) would hide the row from lookups: that is a bug
or a manual write, and is reported, never guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import and_, delete, select
from sqlalchemy.exc import DBAPIError

from .execution import table_clause
from .router import Router
from .strategies import LookupStrategy
from .topology import KeyRule, TableRule

CHUNK = 5000


@dataclass
class LookupReport:
    """What one lookup (owner table + column) looked like, and what was fixed."""

    owner: str
    column: str
    lookup_table: str
    lookup_rows: int = 0
    owner_rows: int = 0
    orphans: list[tuple[Any, ...]] = field(default_factory=list)
    missing: list[tuple[Any, ...]] = field(default_factory=list)
    removed: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "owner": self.owner,
            "column": self.column,
            "lookup_table": self.lookup_table,
            "lookup_rows": self.lookup_rows,
            "owner_rows": self.owner_rows,
            "orphans": [list(o) for o in self.orphans],
            "missing": [list(m) for m in self.missing],
            "removed": self.removed,
        }


def _lookups(router: Router) -> Iterator[tuple[TableRule, KeyRule, LookupStrategy]]:
    for table in router.topology.tables.values():
        for rule in table.keys.values():
            if isinstance(rule.strategy, LookupStrategy):
                yield table, rule, rule.strategy


def _scan(router: Router, table: TableRule, columns: tuple[str, ...]) -> set[tuple[Any, ...]]:
    """Every row's ``columns`` of a logical table, from every shard and physical split."""
    found: set[tuple[Any, ...]] = set()
    for shard in router.topology.shards:
        engine = router.engines.primary(shard)
        with engine.connect() as conn:
            for physical in table.physical_names:
                target = table_clause(physical, columns)
                result = conn.execution_options(stream_results=True, yield_per=CHUNK).execute(
                    select(*target.c)
                )
                found.update(tuple(r) for r in result)
    return found


def check_lookups(router: Router, *, fix: bool = False, grace_s: float = 2.0) -> list[LookupReport]:
    """Compare every lookup table with its owner rows; with ``fix``, delete the orphans.

    An insert in flight has written its lookup row and not yet its owner: it looks like an
    orphan for a moment. So ``fix`` deletes only orphans that are still orphans ``grace_s``
    seconds after they were found (a crash leftover stays one; an insert completes).
    """
    reports: list[LookupReport] = []
    topology = router.topology
    for owner, rule, strategy in _lookups(router):
        lookup = topology.table(strategy.table)
        row_columns = strategy.row_columns  # from, to[, key]
        owner_columns = (rule.column, *row_columns[1:])
        lookup_rows = _scan(router, lookup, row_columns)
        owner_rows = {r for r in _scan(router, owner, owner_columns) if r[0] is not None}
        report = LookupReport(owner.name, rule.column, lookup.name)
        report.lookup_rows = len(lookup_rows)
        report.owner_rows = len(owner_rows)
        report.orphans = sorted(lookup_rows - owner_rows, key=repr)
        report.missing = sorted(owner_rows - lookup_rows, key=repr)
        if fix and report.orphans:
            time.sleep(grace_s)
            still = set(report.orphans) - _scan(router, owner, owner_columns)
            report.removed = _remove(router, owner, lookup, strategy, sorted(still, key=repr))
        reports.append(report)
    return reports


def _remove(
    router: Router,
    owner: TableRule,
    lookup: TableRule,
    strategy: LookupStrategy,
    orphans: list[tuple[Any, ...]],
) -> int:
    """Delete orphan rows where they live, matching every column (bound parameters).

    Each orphan's owner is read once more with a locking read first: an insert of the owner
    that is still uncommitted holds that row's lock, so the read waits for it (up to a second)
    instead of missing it. A lookup row whose owner exists, or is locked, is kept.
    """
    topology = router.topology
    assert owner.primary is not None
    removed = 0
    for orphan in orphans:
        if _owner_present(router, owner, strategy, orphan):
            continue
        slot = topology.slot_for(lookup.name, orphan[0])
        target = table_clause(lookup.physical(slot), strategy.row_columns)
        conditions = [target.c[c] == v for c, v in zip(strategy.row_columns, orphan, strict=True)]
        with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
            removed += conn.execute(delete(target).where(and_(*conditions))).rowcount
    return removed


def _owner_present(
    router: Router, owner: TableRule, strategy: LookupStrategy, orphan: tuple[Any, ...]
) -> bool:
    assert owner.primary is not None
    slot = owner.primary.slot(orphan[1])  # the lookup row's `to` is the owner's primary key
    column, value = (
        (strategy.key_column, orphan[2]) if strategy.key_column else (strategy.to_column, orphan[1])
    )
    target = table_clause(owner.physical(slot), (column,))
    query = select(target.c[column]).where(target.c[column] == value)
    engine = router.engines.primary(router.topology.shard_of_slot(slot))
    if engine.dialect.name == "sqlite":
        with engine.connect() as conn:
            return conn.execute(query).first() is not None
    # Wait at most a second for a lock, for this one statement only: the setting must not
    # outlive it on a pooled connection (SET STATEMENT on MariaDB; MySQL has none, so the
    # session value is put back before the connection returns to the pool).
    locking = query.with_for_update().compile(engine)
    params = locking.params
    with engine.begin() as conn:
        try:
            if getattr(conn.dialect, "is_mariadb", False):  # known once connected
                sql = f"SET STATEMENT innodb_lock_wait_timeout = 1 FOR {locking}"
                return conn.exec_driver_sql(sql, _positional(locking, params)).first() is not None
            conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
            try:
                return conn.execute(query.with_for_update()).first() is not None
            finally:
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = DEFAULT")
        except DBAPIError as exc:
            if getattr(exc.orig, "args", (None,))[0] == 1205:  # lock wait timeout: in flight
                return True
            raise


def _positional(compiled: Any, params: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
    """The compiled statement's parameters in the form its driver's paramstyle wants."""
    if compiled.positiontup is not None:
        return tuple(params[name] for name in compiled.positiontup)
    return params


__all__ = ["LookupReport", "check_lookups"]
