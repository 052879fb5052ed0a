"""Migrations in the meta store: one row per migration (its phase and plan) in
``shardrouter_migrations``, its checkpoints and event log in ``shardrouter_checkpoints``.

Every change is one transaction of the store (``MetaStore.begin``) that first locks what it
reads: the meta row for :func:`create` (so two plans over the same slots cannot both pass the
overlap check: creates queue like pushes do), the migration's row for the others (``SELECT
... FOR UPDATE`` on MariaDB; SQLite's ``BEGIN IMMEDIATE`` holds the whole file). A phase
change is checked by the phase table (``phases.check``) against the phase read under that
lock; a caller that acted on a phase it read earlier passes it as ``expected`` and gets
ConcurrentChangeError when another process moved the migration since.

Checkpoints are named JSON values (``copy:orders_0001`` -> the last key copied, say). The
event log shares their table: events are checkpoints named ``event:<sequence>`` (zero-padded,
so they sort), each ``{"at_ms", "message", ...}``; :func:`checkpoints` leaves them out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Row, select, update

from ..control.store import MetaStore, checkpoints_table, migrations_table
from ..errors import ConcurrentChangeError, ReshardStateError
from . import phases
from .plan import ReshardPlan

EVENT_PREFIX = "event:"
_EVENT_DIGITS = 9
_KNOWN_SHOWN = 20
_NAME_MAX = 191  # checkpoints_table.c.name: String(191)


@dataclass(frozen=True)
class Migration:
    """A migration as the meta store holds it (times: the store's clock, ms)."""

    migration_id: str
    phase: str
    plan: ReshardPlan
    created_at_ms: int
    updated_at_ms: int

    @property
    def active(self) -> bool:
        """Not finalized or cancelled: it still holds its slots."""
        return self.phase in phases.ACTIVE

    def as_dict(self) -> dict[str, Any]:
        return {
            "migration_id": self.migration_id,
            "phase": self.phase,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
            "moves": [m.as_dict() for m in self.plan.moves],
            "new_shards": list(self.plan.new_shards),
            "base_version": self.plan.base_version,
            "legal": list(phases.legal(self.phase)) if self.phase in phases.PHASES else [],
        }


# -- migrations -----------------------------------------------------------------------------------


def create(store: MetaStore, plan: ReshardPlan) -> Migration:
    """Store ``plan`` as a new migration in phase ``planned``. ReshardStateError when an
    active migration moves one of its slots (two migrations over one slot would each copy
    and switch it) or has one of its shards as a source or target (a shard has one journal
    and one set of triggers: one migration's drain, rollback or cleanup would take them from
    the other), naming it, or when its id is taken."""
    with store.begin() as conn:
        store.check(conn, lock=True)  # creates queue on the meta row: one overlap check at once
        existing = _rows(conn)
        if any(r.migration_id == plan.migration_id for r in existing):
            raise ReshardStateError(
                f"migration {plan.migration_id} exists already; plan again (a new plan gets a"
                " new id) or resume it"
            )
        problems: list[str] = []
        for row in existing:
            if row.state not in phases.ACTIVE:
                continue
            other = _plan(row)
            for mine, theirs in plan.overlaps(other):
                problems.append(
                    f"{mine} overlaps {theirs} of migration {row.migration_id} ({row.state})"
                )
            shared = sorted({*plan.sources, *plan.targets} & {*other.sources, *other.targets})
            if shared and not problems:
                problems.append(
                    f"shard(s) {', '.join(shared)} take part in migration {row.migration_id}"
                    f" ({row.state}) too: a shard has one journal, which one migration's"
                    " drain and cleanup would take from the other"
                )
        if problems:
            raise ReshardStateError(
                "two migrations at once over one slot or one shard: "
                + "; ".join(problems)
                + "; finish or cancel that migration first, or plan other slots and shards",
                legal=(),
            )
        conn.execute(
            migrations_table.insert().values(
                migration_id=plan.migration_id,
                state="planned",
                plan=plan.to_json(),
                created_at_ms=store.now,
                updated_at_ms=store.now,
            )
        )
        _event(conn, store, plan.migration_id, "planned", {"base_version": plan.base_version})
        return _migration(_row(conn, store, plan.migration_id))


def get(store: MetaStore, migration_id: str) -> Migration:
    """The migration ``migration_id``; ReshardStateError listing the known ids if unknown."""
    with store.begin() as conn:
        store.check(conn)
        return _migration(_row(conn, store, migration_id))


def active(store: MetaStore) -> list[Migration]:
    """The migrations not finalized or cancelled, oldest first."""
    return [m for m in all(store) if m.active]


# ``state.all`` shadows the builtin inside this module, which therefore never calls it.
def all(store: MetaStore) -> list[Migration]:
    """Every migration, oldest first."""
    with store.begin() as conn:
        store.check(conn)
        return [_migration(r) for r in _rows(conn)]


def advance(
    store: MetaStore, migration_id: str, action: str, *, expected: str | None = None
) -> Migration:
    """Record that ``action`` completed: the phase moves as ``phases.check`` says (``advance``
    resolves to the forward path's next action). ``expected``: the phase the caller acted on;
    ConcurrentChangeError when the stored phase is another one (another process moved it)."""
    return _transition(store, migration_id, action, expected=expected, running=False)


def mark_running(
    store: MetaStore, migration_id: str, action: str, *, expected: str | None = None
) -> Migration:
    """Record that ``action`` is starting: its in-progress phase (``copying`` for a copy),
    if it has one; nothing changes otherwise. Checked and refused like :func:`advance`."""
    return _transition(store, migration_id, action, expected=expected, running=True)


def _transition(
    store: MetaStore, migration_id: str, action: str, *, expected: str | None, running: bool
) -> Migration:
    with store.begin() as conn:
        store.check(conn)
        row = _row(conn, store, migration_id, lock=True)
        phase = str(row.state)
        if expected is not None and phase != expected:
            raise ConcurrentChangeError(_moved(migration_id, expected, phase, action))
        new = phases.running(phase, action) if running else phases.check(phase, action)
        if new == phase and running:
            return _migration(row)
        moved = conn.execute(
            update(migrations_table)
            .where(migrations_table.c.migration_id == migration_id)
            .where(migrations_table.c.state == phase)
            .values(state=new, updated_at_ms=store.now)
        )
        if moved.rowcount != 1:  # the row changed between the locked read and here
            raise ConcurrentChangeError(_moved(migration_id, phase, "another phase", action))
        verb = "running" if running else "done"
        _event(conn, store, migration_id, f"{action} {verb}: {phase} -> {new}", {})
        return _migration(_row(conn, store, migration_id))


def _moved(migration_id: str, expected: str, now: str, action: str) -> str:
    return (
        f"migration {migration_id} was {expected} when {action} was decided, and another"
        f" process moved it to {now} since; re-read its status (shardctl reshard status) and"
        " decide again"
    )


# -- checkpoints and events -----------------------------------------------------------------------


def set_checkpoint(store: MetaStore, migration_id: str, name: str, value: Any) -> None:
    """Store ``value`` (JSON-able) as checkpoint ``name`` of the migration (replacing it)."""
    if name.startswith(EVENT_PREFIX):
        raise ReshardStateError(
            f"checkpoint name {name!r}: names starting with {EVENT_PREFIX!r} are the event log's"
            " (use add_event)"
        )
    _check_name(name)
    text = _json(value, name)
    with store.begin() as conn:
        store.check(conn)
        _row(conn, store, migration_id, lock=True)
        _put(conn, store, migration_id, name, text)


RUNNER = "runner"
"""The checkpoint holding the runner lease: ``{"holder": ..., "expires_at_ms": ...}``."""


def claim_runner(store: MetaStore, migration_id: str, holder: str, lease_ms: int) -> bool:
    """Take or renew the migration's runner lease for ``holder`` until the store's clock
    reaches now + ``lease_ms``: True when it is ``holder``'s now, False when another holder's
    lease is live (the store's clock decides, one transaction with the migration's row
    locked, so two claimers cannot both win)."""
    with store.begin() as conn:
        store.check(conn)
        _row(conn, store, migration_id, lock=True)
        now = store.server_now_ms(conn)
        found = conn.execute(
            select(checkpoints_table.c.value).where(
                checkpoints_table.c.migration_id == migration_id,
                checkpoints_table.c.name == RUNNER,
            )
        ).scalar()
        if found is not None:
            lease = json.loads(found)
            if lease.get("holder") != holder and int(lease.get("expires_at_ms", 0)) > now:
                return False
        text = _json({"holder": holder, "expires_at_ms": now + lease_ms}, RUNNER)
        _put(conn, store, migration_id, RUNNER, text)
        return True


def release_runner(store: MetaStore, migration_id: str, holder: str) -> None:
    """End ``holder``'s runner lease (if it still holds it)."""
    with store.begin() as conn:
        store.check(conn)
        _row(conn, store, migration_id, lock=True)
        found = conn.execute(
            select(checkpoints_table.c.value).where(
                checkpoints_table.c.migration_id == migration_id,
                checkpoints_table.c.name == RUNNER,
            )
        ).scalar()
        if found is not None and json.loads(found).get("holder") == holder:
            conn.execute(
                checkpoints_table.delete().where(
                    checkpoints_table.c.migration_id == migration_id,
                    checkpoints_table.c.name == RUNNER,
                )
            )


def get_checkpoint(store: MetaStore, migration_id: str, name: str, default: Any = None) -> Any:
    """Checkpoint ``name`` of the migration, ``default`` when it was never set."""
    with store.begin() as conn:
        store.check(conn)
        value = conn.execute(
            select(checkpoints_table.c.value).where(
                checkpoints_table.c.migration_id == migration_id,
                checkpoints_table.c.name == name,
            )
        ).scalar()
    return default if value is None else json.loads(value)


def checkpoints(store: MetaStore, migration_id: str) -> dict[str, Any]:
    """Every checkpoint of the migration by name (events left out)."""
    with store.begin() as conn:
        store.check(conn)
        rows = conn.execute(
            select(checkpoints_table.c.name, checkpoints_table.c.value)
            .where(checkpoints_table.c.migration_id == migration_id)
            .where(checkpoints_table.c.name.not_like(f"{EVENT_PREFIX}%"))
            .order_by(checkpoints_table.c.name)
        )
        return {r.name: json.loads(r.value) for r in rows}


def add_event(store: MetaStore, migration_id: str, message: str, **fields: Any) -> dict[str, Any]:
    """Append an event (``message`` and JSON-able ``fields``) to the migration's log; returns
    it as stored (``seq``, ``at_ms``, ``message``, fields)."""
    _json(fields, "event fields")
    with store.begin() as conn:
        store.check(conn)
        _row(conn, store, migration_id, lock=True)  # appends queue here: sequences stay unique
        return _event(conn, store, migration_id, message, fields)


def events(store: MetaStore, migration_id: str, limit: int | None = None) -> list[dict[str, Any]]:
    """The migration's events, oldest first (the last ``limit`` when given)."""
    with store.begin() as conn:
        store.check(conn)
        query = (
            select(checkpoints_table.c.value)
            .where(checkpoints_table.c.migration_id == migration_id)
            .where(checkpoints_table.c.name.like(f"{EVENT_PREFIX}%"))
            .order_by(checkpoints_table.c.name.desc())
        )
        if limit is not None:
            query = query.limit(limit)
        found = [json.loads(v) for v in conn.execute(query).scalars()]
    return found[::-1]


def _event(
    conn: Connection, store: MetaStore, migration_id: str, message: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """Append an event in ``conn``'s transaction (the caller holds the migration's row)."""
    last = conn.execute(
        select(checkpoints_table.c.name)
        .where(checkpoints_table.c.migration_id == migration_id)
        .where(checkpoints_table.c.name.like(f"{EVENT_PREFIX}%"))
        .order_by(checkpoints_table.c.name.desc())
        .limit(1)
    ).scalar()
    seq = 1 if last is None else int(str(last)[len(EVENT_PREFIX) :]) + 1
    event = {**fields, "seq": seq, "at_ms": store.server_now_ms(conn), "message": message}
    name = f"{EVENT_PREFIX}{seq:0{_EVENT_DIGITS}d}"
    _put(conn, store, migration_id, name, _json(event, name))
    return event


def _put(conn: Connection, store: MetaStore, migration_id: str, name: str, text: str) -> None:
    """Insert or replace a checkpoint row (portable: an UPDATE, an INSERT when it found none;
    the caller holds the migration's row, so no other writer inserts the same name)."""
    changed = conn.execute(
        update(checkpoints_table)
        .where(checkpoints_table.c.migration_id == migration_id)
        .where(checkpoints_table.c.name == name)
        .values(value=text, updated_at_ms=store.now)
    )
    if changed.rowcount == 0:
        conn.execute(
            checkpoints_table.insert().values(
                migration_id=migration_id, name=name, value=text, updated_at_ms=store.now
            )
        )


def _check_name(name: str) -> None:
    if not 1 <= len(name) <= _NAME_MAX:
        raise ReshardStateError(
            f"checkpoint name {name[:40]!r}: use 1-{_NAME_MAX} characters (the column's width)"
        )


def _json(value: Any, what: str) -> str:
    try:
        return json.dumps(value, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ReshardStateError(
            f"{what}: the value is not JSON-able ({exc}); store numbers, strings, lists or mappings"
        ) from None


# -- rows -----------------------------------------------------------------------------------------


def _rows(conn: Connection) -> list[Row[Any]]:
    return list(
        conn.execute(
            select(migrations_table).order_by(
                migrations_table.c.created_at_ms, migrations_table.c.migration_id
            )
        )
    )


def _row(conn: Connection, store: MetaStore, migration_id: str, *, lock: bool = False) -> Row[Any]:
    query = select(migrations_table).where(migrations_table.c.migration_id == migration_id)
    row = conn.execute(query.with_for_update() if lock else query).first()
    if row is None:
        known = list(
            conn.execute(
                select(migrations_table.c.migration_id)
                .order_by(migrations_table.c.created_at_ms.desc())
                .limit(_KNOWN_SHOWN)
            ).scalars()
        )
        listed = ", ".join(known) if known else "none; plan one with `shardctl reshard plan`"
        raise ReshardStateError(f"no migration {migration_id!r} in {store!r} (known: {listed})")
    return row


def _plan(row: Row[Any]) -> ReshardPlan:
    try:
        data = json.loads(row.plan)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise ReshardStateError(
            f"migration {row.migration_id}: its stored plan is not a JSON object (changed"
            " outside shardctl); restore it from a backup or delete the row"
        )
    return ReshardPlan.from_dict(data)


def _migration(row: Row[Any]) -> Migration:
    return Migration(
        migration_id=str(row.migration_id),
        phase=str(row.state),
        plan=_plan(row),
        created_at_ms=int(row.created_at_ms),
        updated_at_ms=int(row.updated_at_ms),
    )


__all__ = [
    "EVENT_PREFIX",
    "Migration",
    "active",
    "add_event",
    "advance",
    "all",
    "checkpoints",
    "create",
    "events",
    "get",
    "get_checkpoint",
    "mark_running",
    "set_checkpoint",
]
