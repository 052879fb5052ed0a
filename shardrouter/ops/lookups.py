"""Lookup-table consistency: find orphan lookup rows (and remove them) and missing entries.

Lookup rows are written before their owner and deleted after it, so a crash leaves at worst
an orphan: a lookup row whose owner row does not exist (or no longer carries its value).
Ordinary failures leave none (a failed statement or a rolled-back transaction removes the
lookup rows it created, see execution.discard_lookups). Reads ignore orphans (the owner's shard
is asked anyway), so they only cost a wasted query; this check finds and removes them. A
missing entry (an owner row with no lookup row) would hide the row from lookups: that is a bug
or a manual write, and is reported, never guessed at.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select

from ..core.strategies import LookupStrategy
from ..core.topology import KeyRule, TableRule
from ..engine.router import Router, _Runner
from ..sql.execution import LookupRow, discard_lookups, table_clause

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
            report.removed = _remove(router, owner, rule, lookup, strategy, sorted(still, key=repr))
        reports.append(report)
    return reports


def _remove(
    router: Router,
    owner: TableRule,
    rule: KeyRule,
    lookup: TableRule,
    strategy: LookupStrategy,
    orphans: list[tuple[Any, ...]],
) -> int:
    """Delete orphan rows where they live, matching every column (bound parameters).

    The router's own discard (execution.discard_lookups), one orphan at a time: the owner row
    carrying the lookup value is read first, then the row is deleted and its owner read again
    with a locking read (NOWAIT: an owner insert still uncommitted holds the lock) in one
    write, committed only if the owner is absent: a lookup row whose owner exists or is in
    flight is kept, and a writer that adopted the row waits for the decision."""
    topology = router.topology
    removed = 0
    for orphan in orphans:
        slot = topology.slot_for(lookup.name, orphan[0])
        row = LookupRow(
            strategy,
            topology.shard_of_slot(slot),
            lookup.physical(slot),
            dict(zip(strategy.row_columns, orphan, strict=True)),
            owner,
            rule.column,
        )
        removed += _Runner(router).drive(discard_lookups(topology, [row]))
    return removed


__all__ = ["LookupReport", "check_lookups"]
