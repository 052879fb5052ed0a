"""MySQL XA for the rare transaction that must span shards: two-phase commit, presumed abort.

Commit: every branch is ended and prepared; then the decision is recorded durably on the
coordinator shard (the first shard of the topology) in ``shardrouter_xa_decisions``; then every
branch commits; then the decision row is deleted. Recovery (``XA RECOVER`` on every shard)
commits the prepared branches whose transaction has a decision row and rolls back the rest:
a crash before the decision leaves nothing committed, a crash after it leaves everything
committed once recovery runs. A transaction on one shard commits with ``XA COMMIT ... ONE
PHASE`` and writes no decision.

Xids are generated here (``sr-<hex>-<shard>``), never taken from input, so formatting them
into the XA statements (which take no bound parameters) is safe.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text

from .types import ShardId

log = logging.getLogger("shardrouter.xa")

DECISIONS = "shardrouter_xa_decisions"
_XID = re.compile(r"^sr-([0-9a-f]{32})-([A-Za-z0-9_-]{1,64})$")
_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {DECISIONS} (gtrid CHAR(32) PRIMARY KEY,"
    " decided_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))"
)


def new_gtrid() -> str:
    return uuid.uuid4().hex


def xid(gtrid: str, shard: ShardId) -> str:
    return f"sr-{gtrid}-{shard}"


def parse_xid(value: str) -> tuple[str, ShardId] | None:
    """(gtrid, shard) of an xid made here; None for xids of other software (left alone)."""
    m = _XID.match(value)
    return (m.group(1), ShardId(m.group(2))) if m else None


def start(conn: Connection, gtrid: str, shard: ShardId) -> None:
    conn.exec_driver_sql(f"XA START '{xid(gtrid, shard)}'")


def commit(branches: Mapping[ShardId, Connection], gtrid: str, coordinator: Engine) -> None:
    """Two-phase commit of ``branches`` (one phase when there is only one)."""
    if len(branches) == 1:
        ((shard, conn),) = branches.items()
        conn.exec_driver_sql(f"XA END '{xid(gtrid, shard)}'")
        conn.exec_driver_sql(f"XA COMMIT '{xid(gtrid, shard)}' ONE PHASE")
        return
    for shard, conn in branches.items():
        conn.exec_driver_sql(f"XA END '{xid(gtrid, shard)}'")
        conn.exec_driver_sql(f"XA PREPARE '{xid(gtrid, shard)}'")
    record_decision(coordinator, gtrid)
    # From here on the transaction IS committed: the decision row is durable. A branch or the
    # coordinator failing now must not be reported as a failed commit (the caller would retry
    # and write twice); recover() finishes what is left.
    pending = False
    for shard, conn in branches.items():
        try:
            conn.exec_driver_sql(f"XA COMMIT '{xid(gtrid, shard)}'")
        except Exception as exc:
            pending = True
            log.warning(
                "xa %s: branch %s not committed yet (%s); run recover_xa()",
                gtrid,
                shard,
                type(exc).__name__,
            )
    if pending:
        return
    try:
        forget_decision(coordinator, gtrid)
    except Exception as exc:
        log.warning("xa %s: committed; decision row not removed (%s)", gtrid, type(exc).__name__)


def rollback(branches: Mapping[ShardId, Connection], gtrid: str) -> None:
    """Roll back every branch, whatever state it reached; errors of one do not stop others."""
    for shard, conn in branches.items():
        for statement in (f"XA END '{xid(gtrid, shard)}'", f"XA ROLLBACK '{xid(gtrid, shard)}'"):
            try:
                conn.exec_driver_sql(statement)
            except Exception:
                continue


def record_decision(coordinator: Engine, gtrid: str) -> None:
    with coordinator.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        conn.execute(text(f"INSERT INTO {DECISIONS} (gtrid) VALUES (:g)"), {"g": gtrid})


def forget_decision(coordinator: Engine, gtrid: str) -> None:
    with coordinator.begin() as conn:
        conn.execute(text(f"DELETE FROM {DECISIONS} WHERE gtrid = :g"), {"g": gtrid})


@dataclass
class RecoveryReport:
    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)


def recover(engines: Mapping[ShardId, Engine], coordinator: Engine) -> RecoveryReport:
    """Finish every prepared shardrouter branch: commit if decided, else roll back."""
    with coordinator.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        decided = {r[0] for r in conn.execute(text(f"SELECT gtrid FROM {DECISIONS}"))}
    report = RecoveryReport()
    finished: set[str] = set()
    for engine in engines.values():
        # XA COMMIT/ROLLBACK of a recovered xid must run outside any local transaction.
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            for value in _prepared(conn):
                parsed = parse_xid(value)
                if parsed is None:
                    continue
                gtrid, _ = parsed
                if gtrid in decided:
                    conn.exec_driver_sql(f"XA COMMIT '{value}'")
                    report.committed.append(value)
                    finished.add(gtrid)
                else:
                    conn.exec_driver_sql(f"XA ROLLBACK '{value}'")
                    report.rolled_back.append(value)
    for gtrid in decided:
        forget_decision(coordinator, gtrid)
    return report


def _prepared(conn: Connection) -> Iterable[str]:
    # XA RECOVER rows: formatID, gtrid_length, bqual_length, data (gtrid + bqual).
    for row in conn.exec_driver_sql("XA RECOVER"):
        data = row[3]
        yield data.decode() if isinstance(data, bytes | bytearray) else str(data)


__all__ = ["RecoveryReport", "commit", "new_gtrid", "parse_xid", "recover", "rollback", "start"]
