"""MySQL XA for the rare transaction that must span shards: two-phase commit, presumed abort.

Commit: every branch is ended and prepared; then the outcome ``commit`` is recorded durably on
the coordinator shard (the first shard of the topology) in ``shardrouter_xa_outcomes``; then
every branch commits; then the outcome row is deleted. A transaction on one shard commits with
``XA COMMIT ... ONE PHASE`` and records nothing.

Recovery (``recover``, ``Router.recover_xa``) finishes prepared branches left by a coordinator
that died: it commits those whose transaction has the outcome ``commit`` and rolls back the
others, but only once they are older than ``min_age_s`` (the gtrid carries its start time), so
a coordinator still between PREPARE and its decision is not overtaken. Before rolling back, it
records the outcome ``abort`` under the same key: a coordinator that was only slow then fails
to record ``commit`` (duplicate key), rolls its branches back and raises — it can never commit
what recovery rolled back. Outcome rows are read before the shards are scanned, so a
``commit`` whose branches none of the shards still holds is finished and may be deleted;
``abort`` rows are kept ``ABORT_RETENTION_S`` to keep fencing a coordinator that stalled.

Xids are generated here (``sr-<gtrid>-<shard>``), never taken from input, so formatting them
into the XA statements (which take no bound parameters) is safe.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from .errors import ExecutionError
from .types import ShardId

log = logging.getLogger("shardrouter.xa")

OUTCOMES = "shardrouter_xa_outcomes"
_XID = re.compile(r"^sr-([0-9a-f]{32})-([A-Za-z0-9_-]{1,64})$")
_CREATE = (
    f"CREATE TABLE IF NOT EXISTS {OUTCOMES} (gtrid CHAR(32) PRIMARY KEY,"
    " outcome VARCHAR(6) NOT NULL,"
    " decided_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3))"
)
MIN_AGE_S = 60.0
"""Recovery leaves undecided branches younger than this alone: their coordinator may still be
committing. Must exceed the longest commit plus the clock skew between application hosts."""
ABORT_RETENTION_S = 86_400.0
"""How long an ``abort`` outcome is kept to fence a stalled coordinator."""


def new_gtrid(now_ms: int | None = None) -> str:
    """32 hex digits: the start time in milliseconds (12), then 80 random bits (20)."""
    ms = int(time.time() * 1000) if now_ms is None else now_ms
    return f"{ms & 0xFFFF_FFFF_FFFF:012x}{secrets.token_hex(10)}"


def gtrid_age_s(gtrid: str, now: float | None = None) -> float:
    """Seconds since the transaction started, from its gtrid."""
    started = int(gtrid[:12], 16) / 1000
    return (time.time() if now is None else now) - started


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
    try:
        record_decision(coordinator, gtrid)
    except IntegrityError:
        # recover() got here first and recorded "abort" (we were slower than MIN_AGE_S):
        # its rollback stands, ours makes sure of every branch.
        rollback(branches, gtrid)
        raise ExecutionError(
            f"XA transaction {gtrid} was rolled back by recover_xa() while it committed (it"
            f" took longer than recovery's min_age_s); nothing is committed, retry it"
        ) from None
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


def record_decision(coordinator: Engine, gtrid: str, outcome: str = "commit") -> None:
    """Record the outcome durably; IntegrityError if one is already recorded."""
    with coordinator.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        conn.execute(
            text(f"INSERT INTO {OUTCOMES} (gtrid, outcome) VALUES (:g, :o)"),
            {"g": gtrid, "o": outcome},
        )


def forget_decision(coordinator: Engine, gtrid: str) -> None:
    with coordinator.begin() as conn:
        conn.execute(text(f"DELETE FROM {OUTCOMES} WHERE gtrid = :g"), {"g": gtrid})


@dataclass
class RecoveryReport:
    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    in_doubt: list[str] = field(default_factory=list)
    """Undecided branches younger than min_age_s, left to their coordinator."""
    unreachable: list[ShardId] = field(default_factory=list)
    """Shards that could not be scanned; run recovery again once they answer."""


def recover(
    engines: Mapping[ShardId, Engine],
    coordinator: Engine,
    min_age_s: float = MIN_AGE_S,
) -> RecoveryReport:
    """Finish every prepared shardrouter branch older than ``min_age_s``: commit it if its
    transaction's outcome is ``commit``, else fence with ``abort`` and roll it back."""
    report = RecoveryReport()
    # Outcomes first, then the scan: a "commit" read here was recorded after all its branches
    # were prepared, so the scan sees every branch of it that is not committed yet.
    outcomes = _outcomes(coordinator)
    prepared: dict[str, list[tuple[ShardId, str]]] = defaultdict(list)
    for shard, engine in engines.items():
        try:
            with _autocommit(engine) as conn:
                for value in _prepared(conn):
                    parsed = parse_xid(value)
                    if parsed is not None:
                        prepared[parsed[0]].append((shard, value))
        except DBAPIError as exc:
            log.warning("xa recovery: shard %s not scanned (%s)", shard, type(exc).__name__)
            report.unreachable.append(shard)
    unfinished: set[str] = set()
    for gtrid, branches in prepared.items():
        if gtrid_age_s(gtrid) < min_age_s:
            # Its coordinator may be alive and mid-commit (decided or not): leave it be.
            report.in_doubt += [value for _, value in branches]
            unfinished.add(gtrid)
            continue
        known = outcomes.get(gtrid)
        outcome = known[0] if known is not None else _fence(coordinator, gtrid)
        verb = "COMMIT" if outcome == "commit" else "ROLLBACK"
        for shard, value in branches:
            try:
                with _autocommit(engines[shard]) as conn:
                    conn.exec_driver_sql(f"XA {verb} '{value}'")
            except DBAPIError as exc:  # e.g. still attached to a live session: next time
                log.warning("xa recovery: %s not finished (%s)", value, type(exc).__name__)
                report.in_doubt.append(value)
                unfinished.add(gtrid)
                continue
            (report.committed if outcome == "commit" else report.rolled_back).append(value)
    if not report.unreachable:
        # Each of these was recorded after all its branches were prepared, i.e. before the
        # scan: the scan saw every branch not yet committed, so unless one is unfinished, the
        # transaction is done. Abort outcomes stay a while longer to fence a stalled coordinator.
        for gtrid, (outcome, age) in outcomes.items():
            if gtrid in unfinished:
                continue
            if (outcome == "commit" and age >= min_age_s) or age > ABORT_RETENTION_S:
                forget_decision(coordinator, gtrid)
    return report


def _fence(coordinator: Engine, gtrid: str) -> str:
    """Record "abort" for an undecided transaction; the outcome that stands."""
    try:
        record_decision(coordinator, gtrid, "abort")
        return "abort"
    except IntegrityError:  # its coordinator decided in the meantime
        return _outcomes(coordinator).get(gtrid, ("abort", 0.0))[0]


def _outcomes(coordinator: Engine) -> dict[str, tuple[str, float]]:
    """gtrid -> (outcome, age in seconds by the coordinator's clock)."""
    with coordinator.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        rows = conn.execute(
            text(
                f"SELECT gtrid, outcome, TIMESTAMPDIFF(MICROSECOND, decided_at,"
                f" CURRENT_TIMESTAMP(3)) / 1e6 FROM {OUTCOMES}"
            )
        )
        return {r[0]: (r[1], float(r[2])) for r in rows}


def _autocommit(engine: Engine) -> Connection:
    # XA COMMIT/ROLLBACK of a recovered xid must run outside any local transaction.
    return engine.connect().execution_options(isolation_level="AUTOCOMMIT")


def _prepared(conn: Connection) -> Iterable[str]:
    # XA RECOVER rows: formatID, gtrid_length, bqual_length, data (gtrid + bqual).
    for row in conn.exec_driver_sql("XA RECOVER"):
        data = row[3]
        yield data.decode() if isinstance(data, bytes | bytearray) else str(data)


__all__ = [
    "ABORT_RETENTION_S",
    "MIN_AGE_S",
    "RecoveryReport",
    "commit",
    "gtrid_age_s",
    "new_gtrid",
    "parse_xid",
    "recover",
    "rollback",
    "start",
]
