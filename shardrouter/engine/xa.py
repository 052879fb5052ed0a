"""MySQL XA for the rare transaction that must span shards: two-phase commit, presumed abort.

Commit: every branch is ended and prepared; then the outcome ``commit`` is recorded durably in
``shardrouter_xa_outcomes`` on the transaction's *decider*, the shard of its first branch; then
every branch commits; then the outcome row is deleted. A transaction on one shard commits with
``XA COMMIT ... ONE PHASE`` and records nothing.

Where the decision lives must not depend on how the topology is written: it used to be the
first shard listed in the YAML, so listing the shards in another order made recovery look in
the wrong place, find nothing and roll back a committed transaction. Every branch's xid names
the decider (``sr-<gtrid>-<shard>.<decider>``), so recovery reads the decision exactly where it
was written, whatever the shard order or the slot ranges are later. The decision must be one
row in one place: fencing (below) relies on one INSERT conflicting with another. It is written
in its own local transaction on the decider's server, outside the prepared branch, so it is
durable before the first XA COMMIT and is not undone with the branch.

Recovery (``recover``, ``Router.recover_xa``) finishes prepared branches left by a coordinator
that died: it commits those whose transaction has the outcome ``commit`` and rolls back the
others, but only once they are older than ``min_age_s`` (the gtrid carries its start time), so
a coordinator still between PREPARE and its decision is not overtaken. Before rolling back, it
records the outcome ``abort`` on the decider under the same key: a coordinator that was only
slow then fails to record ``commit`` (duplicate key), rolls its branches back and raises — it
can never commit what recovery rolled back. A branch whose decider is not in the topology any
more, or does not answer, is left prepared and reported in doubt: guessing could undo a commit.
Outcome rows of every shard are read before the shards are scanned, so a ``commit`` whose
branches none of the shards still holds is finished and may be deleted; ``abort`` rows are
kept ``ABORT_RETENTION_S`` to keep fencing a coordinator that stalled.

Xids are generated here, never taken from input, so formatting them into the XA statements
(which take no bound parameters) is safe. MariaDB allows 64 bytes, so the two shard names of an
xid may have 27 characters together; a longer pair is refused before anything runs. Xids of the
older form ``sr-<gtrid>-<shard>`` (no decider) are still recovered: their outcome is looked up
on every shard and fenced on the first one listed, as that version did.
"""

from __future__ import annotations

import contextlib
import logging
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import DBAPIError, IntegrityError

from ..errors import ExecutionError
from ..types import ShardId

log = logging.getLogger("shardrouter.engine.xa")

OUTCOMES = "shardrouter_xa_outcomes"
_XID = re.compile(r"^sr-([0-9a-f]{32})-([A-Za-z0-9_-]{1,64})(?:\.([A-Za-z0-9_-]{1,64}))?$")
_XID_MAX = 64  # MariaDB's limit for an xid given as one string
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


def xid(gtrid: str, shard: ShardId, decider: ShardId | None = None) -> str:
    """The xid of ``shard``'s branch; ``decider`` is the shard holding the decision."""
    value = f"sr-{gtrid}-{shard}" if decider is None else f"sr-{gtrid}-{shard}.{decider}"
    if len(value) > _XID_MAX:
        raise ExecutionError(
            f"XA: shard names {shard!r} and {decider!r} are too long for an xid (MariaDB allows"
            f" {_XID_MAX} bytes, 27 of them for the two names); use shorter shard names",
            shard=shard,
        )
    return value


def parse_xid(value: str) -> tuple[str, ShardId, ShardId | None] | None:
    """(gtrid, shard, decider) of an xid made here (decider None for the older form); None for
    xids of other software (left alone)."""
    m = _XID.match(value)
    if m is None:
        return None
    return m.group(1), ShardId(m.group(2)), (ShardId(m.group(3)) if m.group(3) else None)


def start(conn: Connection, gtrid: str, shard: ShardId, decider: ShardId | None) -> None:
    """XA START ``shard``'s branch. ``decider``: the shard of the transaction's first branch
    (``shard`` itself for the first branch), where commit() records the decision; None makes
    an xid of the older form, without a decider (kept for tools that still write them)."""
    conn.exec_driver_sql(f"XA START '{xid(gtrid, shard, decider)}'")


def commit(branches: Mapping[ShardId, Connection], gtrid: str, decider: Engine) -> None:
    """Two-phase commit of ``branches`` (one phase when there is only one).

    ``branches`` is in the order the branches were started: the first is the decider that every
    xid names, and ``decider`` must be its shard's primary engine."""
    first = next(iter(branches))
    if len(branches) == 1:
        ((shard, conn),) = branches.items()
        conn.exec_driver_sql(f"XA END '{xid(gtrid, shard, first)}'")
        conn.exec_driver_sql(f"XA COMMIT '{xid(gtrid, shard, first)}' ONE PHASE")
        return
    for shard, conn in branches.items():
        conn.exec_driver_sql(f"XA END '{xid(gtrid, shard, first)}'")
        conn.exec_driver_sql(f"XA PREPARE '{xid(gtrid, shard, first)}'")
    try:
        record_decision(decider, gtrid)
    except IntegrityError:
        # recover() got here first and recorded "abort" (we were slower than MIN_AGE_S):
        # its rollback stands, ours makes sure of every branch.
        rollback(branches, gtrid)
        raise ExecutionError(
            f"XA transaction {gtrid} was rolled back by recover_xa() while it committed (it"
            f" took longer than recovery's min_age_s); nothing is committed, retry it"
        ) from None
    # From here on the transaction IS committed: the decision row is durable. A branch or the
    # decider failing now must not be reported as a failed commit (the caller would retry
    # and write twice); recover() finishes what is left.
    pending = False
    for shard, conn in branches.items():
        try:
            conn.exec_driver_sql(f"XA COMMIT '{xid(gtrid, shard, first)}'")
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
        forget_decision(decider, gtrid)
    except Exception as exc:
        log.warning("xa %s: committed; decision row not removed (%s)", gtrid, type(exc).__name__)


def rollback(branches: Mapping[ShardId, Connection], gtrid: str) -> list[ShardId]:
    """Roll back every branch, whatever state it reached; errors of one do not stop others.

    Returns the shards whose XA ROLLBACK failed: their connections may still be in an XA
    state and must not go back to the pool (invalidate them)."""
    first = next(iter(branches), None)
    stuck: list[ShardId] = []
    for shard, conn in branches.items():
        name = xid(gtrid, shard, first)
        with contextlib.suppress(Exception):  # already ended (idle or prepared): roll back
            conn.exec_driver_sql(f"XA END '{name}'")
        try:
            conn.exec_driver_sql(f"XA ROLLBACK '{name}'")
        except Exception:
            stuck.append(shard)
    return stuck


def record_decision(decider: Engine, gtrid: str, outcome: str = "commit") -> None:
    """Record the outcome durably on the decider; IntegrityError if one is already recorded."""
    with decider.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        conn.execute(
            text(f"INSERT INTO {OUTCOMES} (gtrid, outcome) VALUES (:g, :o)"),
            {"g": gtrid, "o": outcome},
        )


def forget_decision(decider: Engine, gtrid: str) -> None:
    with decider.begin() as conn:
        conn.execute(text(f"DELETE FROM {OUTCOMES} WHERE gtrid = :g"), {"g": gtrid})


@dataclass
class RecoveryReport:
    committed: list[str] = field(default_factory=list)
    rolled_back: list[str] = field(default_factory=list)
    in_doubt: list[str] = field(default_factory=list)
    """Undecided branches younger than min_age_s, left to their coordinator."""
    unreachable: list[ShardId] = field(default_factory=list)
    """Shards that could not be scanned; run recovery again once they answer."""


def recover(engines: Mapping[ShardId, Engine], min_age_s: float = MIN_AGE_S) -> RecoveryReport:
    """Finish every prepared shardrouter branch older than ``min_age_s``: commit it if its
    transaction's outcome (on the decider its xid names) is ``commit``, else fence with
    ``abort`` and roll it back."""
    report = RecoveryReport()
    # Outcomes first, then the scan: a "commit" read here was recorded after all its branches
    # were prepared, so the scan sees every branch of it that is not committed yet.
    outcomes: dict[ShardId, dict[str, tuple[str, float]]] = {}
    prepared: dict[str, list[tuple[ShardId, str, ShardId | None]]] = defaultdict(list)
    for shard, engine in engines.items():
        try:
            outcomes[shard] = _outcomes(engine)
        except DBAPIError as exc:
            log.warning("xa recovery: shard %s not read (%s)", shard, type(exc).__name__)
            report.unreachable.append(shard)
    # XA RECOVER lists the prepared branches of the whole server: two shards that are two
    # databases of one server each see both branches. Each branch is acted on once, through
    # the shard its xid names (a branch of a shard no longer in the topology: through the
    # first shard that lists it).
    seen: set[str] = set()
    for shard in outcomes:
        try:
            with _autocommit(engines[shard]) as conn:
                for value in _prepared(conn):
                    parsed = parse_xid(value)
                    if parsed is None or value in seen:
                        continue
                    if parsed[1] != shard and parsed[1] in engines:
                        continue  # its own shard's scan lists it too (or it is unreachable)
                    seen.add(value)
                    prepared[parsed[0]].append((shard, value, parsed[2]))
        except DBAPIError as exc:
            log.warning("xa recovery: shard %s not scanned (%s)", shard, type(exc).__name__)
            report.unreachable.append(shard)
    unfinished: set[str] = set()
    for gtrid, branches in prepared.items():
        values = [value for _, value, _ in branches]
        if gtrid_age_s(gtrid) < min_age_s:
            # Its coordinator may be alive and mid-commit (decided or not): leave it be.
            report.in_doubt += values
            unfinished.add(gtrid)
            continue
        outcome = _decided(engines, outcomes, gtrid, branches[0][2])
        if outcome is None:
            report.in_doubt += values
            unfinished.add(gtrid)
            continue
        verb = "COMMIT" if outcome == "commit" else "ROLLBACK"
        for shard, value, _ in branches:
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
        for shard, rows in outcomes.items():
            for gtrid, (outcome, age) in rows.items():
                if gtrid in unfinished:
                    continue
                if (outcome == "commit" and age >= min_age_s) or age > ABORT_RETENTION_S:
                    forget_decision(engines[shard], gtrid)
    return report


def _decided(
    engines: Mapping[ShardId, Engine],
    outcomes: Mapping[ShardId, Mapping[str, tuple[str, float]]],
    gtrid: str,
    decider: ShardId | None,
) -> str | None:
    """The outcome that stands for ``gtrid`` (fencing it with "abort" if there is none yet);
    None when its decider cannot be asked: then nobody may decide."""
    if decider is None:  # an xid of the older form: the decision may be on any shard
        for rows in outcomes.values():
            if gtrid in rows:
                return rows[gtrid][0]
        if not engines:
            return None
        decider = next(iter(engines))
    if decider not in outcomes:
        where = "not in the topology" if decider not in engines else "not answering"
        log.warning("xa recovery: %s left prepared: its decider %s is %s", gtrid, decider, where)
        return None
    known = outcomes[decider].get(gtrid)
    if known is not None:
        return known[0]
    try:
        return _fence(engines[decider], gtrid)
    except DBAPIError as exc:
        log.warning("xa recovery: %s not fenced on %s (%s)", gtrid, decider, type(exc).__name__)
        return None


def _fence(decider: Engine, gtrid: str) -> str:
    """Record "abort" for an undecided transaction; the outcome that stands."""
    try:
        record_decision(decider, gtrid, "abort")
        return "abort"
    except IntegrityError:  # its coordinator decided in the meantime
        return _outcomes(decider).get(gtrid, ("abort", 0.0))[0]


def _outcomes(engine: Engine) -> dict[str, tuple[str, float]]:
    """gtrid -> (outcome, age in seconds by that shard's clock)."""
    with engine.begin() as conn:
        conn.exec_driver_sql(_CREATE)
        rows = conn.execute(
            text(
                f"SELECT gtrid, outcome, TIMESTAMPDIFF(MICROSECOND, decided_at,"
                f" CURRENT_TIMESTAMP(3)) / 1e6 FROM {OUTCOMES}"
            )
        )
        return {r[0]: (r[1], float(r[2])) for r in rows}


def prepared_branches(engine: Engine, shard: ShardId) -> list[str]:
    """The xids of ``shard``'s branches prepared and not yet committed or rolled back on its
    server (a two-phase commit in flight, or left for recovery). The resharding switch waits
    for none: such a branch's rows would commit after the journal was drained."""
    with _autocommit(engine) as conn:
        return [
            value
            for value in _prepared(conn)
            if (parsed := parse_xid(value)) is not None and parsed[1] == shard
        ]


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
    "prepared_branches",
    "recover",
    "rollback",
    "start",
]
