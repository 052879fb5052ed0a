"""The journal of a migration: triggers that record every row change of the moving tables on a
shard, and the drain that brings the mirror up to date from it (docs/RESHARDING.md).

While a migration runs, each physical table of the moving rows carries three ``AFTER INSERT /
UPDATE / DELETE`` triggers (``install``) that insert ``(table, primary key, sharding value)``
into ``shardrouter_journal`` of the same shard. A trigger runs inside the statement's own
transaction: the journal holds an entry for every committed change and none for one that
rolled back, whatever wrote the row (router, ORM, a client bypassing the router).

``drain`` reads entries in id order, locks the rows they name on the authority, writes their
current images (or their absence) into the mirror, commits the mirror, and only then deletes the
entries and commits the authority: a crash anywhere leaves the entries (re-drained, the copy is
an idempotent upsert of the current image) and never an entry deleted before its copy landed.

Every statement here runs through ``exec_driver_sql`` with ``%s`` placeholders: values are
bound, identifiers come from information_schema and the topology and go through
``spec.driver_quote``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError

from shardrouter.errors import ReshardDataError, ReshardError, RoutingError

from .spec import Belongs, TableSpec, UnroutableValue, driver_quote, statements, typed

JOURNAL = "shardrouter_journal"
"""The journal table, one per shard that takes part in a migration."""

MIRROR_VARIABLE = "@shardrouter_mirror"
"""The session variable the triggers test: the movers' own writes set it, so copying a row
never journals it (on a mirror that carries triggers of its own)."""

T = TypeVar("T")

Key = tuple[Any, ...]
"""A primary key's values, in ``TableSpec.key`` order."""

LOCKING = "READ COMMITTED"
"""The isolation of a connection that reads the authority for ``copy_keys``. Not REPEATABLE
READ: its gap locks on absent keys (the rows a drain deletes from the mirror) made the
routers' NOWAIT owner checks of a DELETE's lookup cleanup fail on exactly those keys, leaving
lookup rows of deleted orders behind (found by the resharding load test). Under READ
COMMITTED an insert of an absent key can commit while the batch runs; it journals an entry of
its own, which a later batch copies. The one thing the gap lock bought, a drain and verify's
repair of one key side by side, does not happen: the workflow runs them one after the other."""
WALKING = "READ COMMITTED"
"""The isolation of every other mover connection (see ``mover_session``)."""

_MIRROR_SQL_MODE = "NO_AUTO_VALUE_ON_ZERO"
_TRIGGER_PREFIX = "shardrouter_j_"
_MAX_IDENTIFIER = 64
_KEYS_PER_STATEMENT = 500  # bound parameters per SELECT/DELETE by key stay well under limits
_LOCK_ERRNOS = frozenset({1205, 1213})  # lock wait timeout, deadlock: the batch is retried
_RETRIES = 5
# Column types whose values do not survive JSON (binary strings, bit fields, geometry) or
# compare inexactly once printed (floating point), or whose text depends on the writer's
# session (TIMESTAMP prints in the session's time zone, and the drain reads in UTC: review 9
# found an update from a +05:00 session never copied): a journal entry could not name the row.
_UNJOURNALABLE = frozenset(
    {
        "timestamp",
        "binary",
        "varbinary",
        "tinyblob",
        "blob",
        "mediumblob",
        "longblob",
        "bit",
        "float",
        "double",
        "geometry",
        "point",
        "linestring",
        "polygon",
        "multipoint",
        "multilinestring",
        "multipolygon",
        "geometrycollection",
    }
)


# --------------------------------------------------------------------------- install / remove


def trigger_names(spec: TableSpec) -> tuple[str, str, str]:
    """The (insert, update, delete) trigger names of ``spec``: ``shardrouter_j_<table>_<i|u|d>``,
    or, when that exceeds MySQL's 64 characters, the table's name cut short and followed by 10
    hex digits of its SHA-1 (distinct tables keep distinct names)."""
    base = _TRIGGER_PREFIX + spec.physical
    if len(base) + 2 > _MAX_IDENTIFIER:
        digest = hashlib.sha1(spec.physical.encode()).hexdigest()[:10]
        base = base[: _MAX_IDENTIFIER - 2 - 11] + "_" + digest
    return (base + "_i", base + "_u", base + "_d")


def install(
    engine: Engine,
    specs: Sequence[TableSpec],
    *,
    lock_wait_s: int = 5,
    attempts: int = 12,
) -> None:
    """Create the journal table and the triggers of every spec on the shard of ``engine``.

    Idempotent: an existing trigger with the same body is kept, one with another body replaced
    atomically (``CREATE OR REPLACE``), never dropped and re-created (writes in between would
    go unjournaled).

    ``CREATE TRIGGER`` takes the table's exclusive metadata lock, so it waits until every open
    transaction that touched the table has ended: once it returns, every write still to commit
    on the table runs the trigger. That is what makes "every write after install journals"
    true. While it waits, new statements on the table queue behind it; so the wait is cut at
    ``lock_wait_s`` and retried (``attempts`` times, with pauses in between that let the
    queue drain), and ReshardError names the table when a transaction outlives them all.
    """
    _refuse_unjournalable(engine, specs)
    with engine.connect() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE IF NOT EXISTS {driver_quote(JOURNAL)} ("
            " id BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,"
            " tbl VARCHAR(64) NOT NULL,"
            " pk LONGTEXT NOT NULL,"
            " k LONGTEXT NULL,"
            " at TIMESTAMP(6) NOT NULL DEFAULT CURRENT_TIMESTAMP(6)"
            ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_bin"
        )
        conn.commit()
        existing = _existing_triggers(conn)
        with _ddl_lock_wait(conn, lock_wait_s):
            for spec in specs:
                for name, timing, body in _trigger_bodies(spec):
                    have = existing.get(name)
                    if (
                        have is not None
                        and have[0] == spec.physical
                        and have[1] == timing
                        and (_same_body(have[2], body))
                    ):
                        continue
                    verb = "CREATE TRIGGER" if have is None else "CREATE OR REPLACE TRIGGER"
                    ddl = (
                        f"{verb} {driver_quote(name)} AFTER {timing}"
                        f" ON {driver_quote(spec.physical)} FOR EACH ROW {body}"
                    )
                    _run_ddl(conn, ddl, spec, lock_wait_s, attempts)


def remove(
    engine: Engine,
    specs: Sequence[TableSpec],
    drop_table: bool = True,
    *,
    lock_wait_s: int = 5,
    attempts: int = 12,
) -> None:
    """Drop the triggers of every spec (and, with ``drop_table``, the journal table) on the
    shard of ``engine``. Idempotent. ``DROP TRIGGER`` waits for the table's metadata lock like
    ``CREATE TRIGGER`` (see ``install``), with the same bounded, retried waits."""
    with engine.connect() as conn:
        existing = _existing_triggers(conn)
        with _ddl_lock_wait(conn, lock_wait_s):
            for spec in specs:
                for name in trigger_names(spec):
                    if name in existing:
                        ddl = f"DROP TRIGGER IF EXISTS {driver_quote(name)}"
                        _run_ddl(conn, ddl, spec, lock_wait_s, attempts)
            if drop_table:
                conn.exec_driver_sql(f"DROP TABLE IF EXISTS {driver_quote(JOURNAL)}")
        conn.commit()


def installed_triggers(engine: Engine) -> list[str]:
    """The names of the journal triggers on the shard of ``engine`` (any table)."""
    with engine.connect() as conn:
        return sorted(_existing_triggers(conn))


def backlog(engine: Engine) -> int:
    """The number of entries in the journal of ``engine``'s shard (0 when it has none)."""
    with engine.connect() as conn:
        if not _journal_exists(conn):
            return 0
        return int(
            conn.exec_driver_sql(f"SELECT COUNT(*) FROM {driver_quote(JOURNAL)}").scalar_one()
        )


def _journal_exists(conn: Connection) -> bool:
    found = conn.exec_driver_sql(
        "SELECT COUNT(*) FROM information_schema.tables"
        " WHERE table_schema = DATABASE() AND table_name = %s",
        (JOURNAL,),
    ).scalar_one()
    return bool(found)


def _existing_triggers(conn: Connection) -> dict[str, tuple[str, str, str]]:
    rows = conn.exec_driver_sql(
        "SELECT trigger_name, event_object_table, event_manipulation, action_statement"
        " FROM information_schema.triggers"
        " WHERE trigger_schema = DATABASE() AND trigger_name LIKE %s",
        (_TRIGGER_PREFIX.replace("_", "\\_") + "%",),
    )
    return {str(r[0]): (str(r[1]), str(r[2]), str(r[3])) for r in rows}


def _same_body(stored: str, wanted: str) -> bool:
    # information_schema keeps the body as written; the wanted one still has its %s escapes
    # doubled for the driver.
    return stored.strip() == wanted.replace("%%", "%").strip()


def _refuse_unjournalable(engine: Engine, specs: Sequence[TableSpec]) -> None:
    problems: list[str] = []
    with engine.connect() as conn:
        for spec in specs:
            named = set(spec.key) | ({spec.shard_column} if spec.shard_column else set())
            rows = conn.exec_driver_sql(
                "SELECT column_name, data_type FROM information_schema.columns"
                " WHERE table_schema = DATABASE() AND table_name = %s",
                (spec.physical,),
            )
            for column, data_type in rows:
                if column in named and str(data_type).lower() in _UNJOURNALABLE:
                    problems.append(
                        f"{spec.physical}.{column} is {data_type}: a journal entry (JSON) cannot"
                        " name its rows exactly; key and sharding columns must be integers,"
                        " decimals, strings, DATE or DATETIME (a TIMESTAMP prints in each"
                        " writer's time zone)"
                    )
    if problems:
        raise ReshardDataError("; ".join(problems))


def _trigger_bodies(spec: TableSpec) -> list[tuple[str, str, str]]:
    """(name, event, body) of the three triggers; bodies ready for exec_driver_sql."""
    insert_name, update_name, delete_name = trigger_names(spec)
    table = _sql_string(spec.physical)
    journal = driver_quote(JOURNAL)

    def entry(row: str) -> str:
        pk = ", ".join(f"{row}.{driver_quote(c)}" for c in spec.key)
        k = (
            f"JSON_ARRAY({row}.{driver_quote(spec.shard_column)})"
            if spec.shard_column is not None
            else "NULL"
        )
        return f"INSERT INTO {journal} (tbl, pk, k) VALUES ({table}, JSON_ARRAY({pk}), {k});"

    watched = (*spec.key, *([spec.shard_column] if spec.shard_column is not None else []))
    # NULL-safe: a sharding column changing from or to NULL is a change too.
    same = " AND ".join(
        f"OLD.{driver_quote(c)} <=> NEW.{driver_quote(c)}" for c in dict.fromkeys(watched)
    )
    guard = f"IF {MIRROR_VARIABLE} IS NULL THEN"
    return [
        (insert_name, "INSERT", f"BEGIN {guard} {entry('NEW')} END IF; END"),
        (
            update_name,
            "UPDATE",
            # The new image always; the old key too when the row left it (its key or its
            # slot changed): the copy of the old key must be deleted from the mirror.
            f"BEGIN {guard} {entry('NEW')} IF NOT ({same}) THEN {entry('OLD')} END IF; END IF; END",
        ),
        (delete_name, "DELETE", f"BEGIN {guard} {entry('OLD')} END IF; END"),
    ]


def _sql_string(value: str) -> str:
    """A MySQL string literal (for the table name inside a trigger body, where nothing can be
    bound), escaped for the driver's paramstyle too."""
    escaped = value.replace("\\", "\\\\").replace("'", "''").replace("%", "%%")
    return f"'{escaped}'"


@contextmanager
def _ddl_lock_wait(conn: Connection, seconds: int) -> Iterator[None]:
    """Bound the session's metadata lock wait to ``seconds`` (restored after)."""
    saved = conn.exec_driver_sql("SELECT @@session.lock_wait_timeout").scalar_one()
    conn.exec_driver_sql("SET SESSION lock_wait_timeout = %s", (int(seconds),))
    try:
        yield
    finally:
        conn.exec_driver_sql("SET SESSION lock_wait_timeout = %s", (int(saved),))


def _run_ddl(conn: Connection, ddl: str, spec: TableSpec, lock_wait_s: int, attempts: int) -> None:
    for attempt in range(1, attempts + 1):
        try:
            conn.exec_driver_sql(ddl)
            return
        except DBAPIError as exc:
            if _errno(exc) not in _LOCK_ERRNOS or attempt == attempts:
                if _errno(exc) in _LOCK_ERRNOS:
                    raise ReshardError(
                        f"table {spec.physical}: a transaction kept it open for more than"
                        f" {attempts} waits of {lock_wait_s} s, so its journal triggers could"
                        " not be changed; end the long transactions on it (SHOW PROCESSLIST)"
                        " and run the step again"
                    ) from exc
                raise
        time.sleep(min(1.0, 0.1 * attempt))


def _errno(exc: BaseException) -> int | None:
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args = getattr(orig, "args", ())
    return args[0] if args and isinstance(args[0], int) else None


# --------------------------------------------------------------------------- sessions


@contextmanager
def mover_session(
    conn: Connection, *, mirror: bool, isolation: str, lock_wait_s: int | None = None
) -> Iterator[None]:
    """Prepare a connection of the movers, and put it back as it was afterwards (it returns to
    a pool other code may share).

    ``time_zone`` is UTC so TIMESTAMP columns are read and written as the stored instants
    (the two shards' servers may have different zones). With ``mirror``,
    ``@shardrouter_mirror`` is set so the connection's writes do not journal themselves, and
    ``sql_mode`` is the one mysqldump restores under: NO_AUTO_VALUE_ON_ZERO (a 0 in an
    AUTO_INCREMENT column stays 0) and no strict checks (a value the source holds, a zero
    date say, is written as it is). ``isolation``: the transaction isolation level, set
    explicitly whatever the server's default (SQLAlchemy restores the pool's when the
    connection goes back): READ COMMITTED for every mover connection (no gap locks, no locks
    on the authority's rows at all: see copy_keys). ``lock_wait_s``: this session's
    innodb_lock_wait_timeout (the switch bounds a mirror write held by a lock by its budget).
    """
    conn.execution_options(isolation_level=isolation)
    zone, mode, wait = conn.exec_driver_sql(
        "SELECT @@session.time_zone, @@session.sql_mode, @@session.innodb_lock_wait_timeout"
    ).one()
    conn.exec_driver_sql(
        f"SET time_zone = '+00:00', sql_mode = %s, {MIRROR_VARIABLE} = %s,"
        " innodb_lock_wait_timeout = %s",
        (_MIRROR_SQL_MODE if mirror else mode, 1 if mirror else None, lock_wait_s or wait),
    )
    conn.commit()
    try:
        yield
    finally:
        try:
            if conn.in_transaction():
                conn.rollback()
            conn.exec_driver_sql(
                f"SET time_zone = %s, sql_mode = %s, {MIRROR_VARIABLE} = NULL,"
                " innodb_lock_wait_timeout = %s",
                (zone, mode, wait),
            )
            conn.commit()
        except DBAPIError:
            # The connection broke: never hand it back to the pool with the variable set.
            conn.invalidate()


# --------------------------------------------------------------------------- copying rows


@dataclass(frozen=True, slots=True)
class Copied:
    """What one locked copy did on the mirror."""

    copied: int
    """Rows upserted (their current image on the authority)."""
    deleted: int
    """Rows deleted (gone from the authority, or no longer in the moving slots)."""


class BelongsCache:
    """``belongs`` memoized per table and sharding value for one pass: many rows share a
    sharding value, and the hot loops (verify) look values up in ``memo`` directly. The
    values of one sharding column share one type, so the memo is keyed by value alone (the
    driver's and the journal's forms of one value may differ, 123 and Decimal('123') say:
    both are routed as the same value, ``spec.routed_value``).

    A value without a slot (NULL, the zero date) belongs to no slot. A value no router routes
    (``spec.UnroutableValue``: a fraction in an integer key, say): with ``strict``, the
    refusal is raised, naming the row's ``key`` when the caller gives it (the walks of the
    source before the switch: the backfill, verify); without, the row is treated as not
    moving (the drain, whose entry records a value the row may no longer hold; the mirror's
    side; the deletes, which must never delete a row they cannot place)."""

    _LIMIT = 200_000  # values memoized per table before the memo starts over

    def __init__(self, belongs: Belongs, *, strict: bool = False) -> None:
        self.belongs = belongs
        self.strict = strict
        self._memos: dict[str, dict[Any, bool]] = {}

    def memo(self, spec: TableSpec) -> dict[Any, bool]:
        """The memo of ``spec``'s logical table: {sharding value: belongs}."""
        memo = self._memos.get(spec.logical)
        if memo is None:
            memo = self._memos[spec.logical] = {}
        return memo

    def __call__(self, spec: TableSpec, value: Any, key: Sequence[Any] | None = None) -> bool:
        if spec.shard_column is None:
            return True
        memo = self.memo(spec)
        try:
            answer = memo.get(value)
        except TypeError:  # an unhashable value: no memo
            return self._check(spec, value, key)
        if answer is None:
            answer = self._check(spec, value, key)
            if len(memo) >= self._LIMIT:
                memo.clear()
            memo[value] = answer
        return answer

    def _check(self, spec: TableSpec, value: Any, key: Sequence[Any] | None) -> bool:
        try:
            return self.belongs(spec, value)
        except UnroutableValue as exc:
            if self.strict:
                raise UnroutableValue(spec, value, exc.reason, key) from None
            return False
        except RoutingError as exc:  # a Belongs of another make
            if self.strict:
                raise UnroutableValue(spec, value, str(exc), key) from None
            return False


def copy_keys(
    authority_conn: Connection,
    mirror_conn: Connection,
    keys: Mapping[TableSpec, Collection[Key]],
    belongs: Belongs | BelongsCache,
    *,
    journal_ids: Collection[int] = (),
    after_mirror_commit: Callable[[], None] | None = None,
) -> Copied:
    """Copy the rows named by ``keys`` from the authority to the mirror: the drain's batch,
    also used by verify's repair.

    The current rows are read on the authority (READ COMMITTED, without locks); then, in one
    mirror transaction, the keys that are absent on the authority or whose row left the
    moving slots are deleted from the mirror (only mirror rows that belong: a row of the
    mirror's own slots is never touched), and the present rows that belong are upserted; the
    mirror commits; then ``journal_ids`` are deleted from the authority's journal and the
    authority commits.

    Why no row locks on the authority (DESIGN.md locks them): there, routers wrote the
    mirror too, and a copy had to lock out their writes. Here only the migration's one runner
    (Workflow holds a lock per migration) writes a mirror, in journal order, one batch after
    the other; a change committed after this read journals an entry of its own (same
    transaction), drained after this batch, so an image read here is at worst replaced by a
    newer one, never left stale. Locks would only contend with the routers: they blocked the
    NOWAIT owner checks of a DELETE's lookup cleanup (locking reads lock a deleted row's
    record until purge, exactly the keys a drain reads after a delete), leaving lookup rows of
    deleted orders behind (found by the resharding load test).

    ``mirror_conn`` must be in a ``mover_session(mirror=True)``; both must be outside a
    transaction.
    """
    check = belongs if isinstance(belongs, BelongsCache) else BelongsCache(belongs)
    images: list[tuple[TableSpec, list[Sequence[Any]]]] = []
    gone: list[tuple[TableSpec, list[Key]]] = []
    try:
        for spec in sorted(keys, key=lambda s: s.physical):
            wanted = list(dict.fromkeys(tuple(k) for k in keys[spec]))
            if not wanted:
                continue
            st = statements(spec)
            at = st.shard_position
            present: list[Sequence[Any]] = []
            found: set[Key] = set()
            for part in _parts(wanted):
                rows = authority_conn.exec_driver_sql(  # no lock: see the docstring
                    f"SELECT {st.select_list} FROM {st.table} WHERE {st.key_in(len(part))}",
                    st.key_params(part),
                ).all()
                for row in rows:
                    if at is not None and not check(spec, row[at]):
                        continue  # left the moving slots: deleted from the mirror below
                    found.add(tuple(row[i] for i in st.key_positions))
                    present.append(row)
            # Keys not matched exactly (absent, or spelled otherwise by the journal: a date
            # as text, another letter case) are deleted before the upserts, which put back
            # the present ones: the mirror ends equal either way.
            absent = [k for k in wanted if k not in found]
            if present:
                images.append((spec, present))
            if absent:
                gone.append((spec, absent))
        deleted = 0
        copied = 0
        if images or gone:
            for spec, absent in gone:
                deleted += _delete_belonging(mirror_conn, spec, absent, check)
            for spec, present in images:
                st = statements(spec)
                copies = [tuple(r[i] for i in st.key_positions) for r in present]
                guard_own_rows(mirror_conn, spec, copies, check)
                values = [tuple(row[i] for i in st.write_positions) for row in present]
                mirror_conn.exec_driver_sql(st.upsert, values)
                copied += len(present)
            mirror_conn.commit()
        if after_mirror_commit is not None:
            after_mirror_commit()
        if journal_ids:
            ids = sorted(journal_ids)
            for start in range(0, len(ids), _KEYS_PER_STATEMENT):
                some = ids[start : start + _KEYS_PER_STATEMENT]
                authority_conn.exec_driver_sql(
                    f"DELETE FROM {driver_quote(JOURNAL)}"
                    f" WHERE id IN ({', '.join('%s' for _ in some)})",
                    tuple(some),
                )
        authority_conn.commit()
    except BaseException:
        _rollback(mirror_conn)
        _rollback(authority_conn)
        raise
    return Copied(copied, deleted)


def _delete_belonging(
    conn: Connection, spec: TableSpec, keys: list[Key], check: BelongsCache
) -> int:
    """Delete from the mirror the rows of ``keys`` that belong to the moving slots."""
    st = statements(spec)
    deleted = 0
    for part in _parts(keys):
        rows = conn.exec_driver_sql(
            f"SELECT {st.keys_and_shard} FROM {st.table} WHERE {st.key_in(len(part))} FOR UPDATE",
            st.key_params(part),
        ).all()
        width = len(spec.key)
        doomed = [
            tuple(r[:width]) for r in rows if spec.shard_column is None or check(spec, r[width])
        ]
        if doomed:
            conn.exec_driver_sql(
                f"DELETE FROM {st.table} WHERE {st.key_in(len(doomed))}", st.key_params(doomed)
            )
            deleted += len(doomed)
    return deleted


_TEXT_TYPES = frozenset(
    {"char", "varchar", "tinytext", "text", "mediumtext", "longtext", "enum", "set"}
)


def guard_own_rows(
    conn: Connection, spec: TableSpec, keys: Sequence[Key], check: BelongsCache
) -> None:
    """Refuse to upsert copies over a mirror's OWN rows (ReshardDataError, before anything
    is written). A text key under a case-insensitive or PAD SPACE collation compares
    'abc' = 'ABC' = 'abc ', while a hash without fold_case sends them to different slots:
    two shards may each hold one of them, and a copy's ``ON DUPLICATE KEY UPDATE`` onto the
    shard that holds the other would overwrite a row of a slot that never moves (review 10).
    So for tables with a text key column the mirror's rows with the copies' keys are read
    (locked: they are about to be written) and any that does not belong to the moving slots
    stops the copy. The same for a key that does not route the row (an AUTO_INCREMENT id
    per shard: each shard has its own id 1; review 11). A key that holds the sharding column
    or a gene column (TableSpec.key_routes) and no text cannot meet a row of another slot."""
    if spec.shard_column is None:
        return
    if spec.key_routes and not any(spec.type_of(c) in _TEXT_TYPES for c in spec.key):
        return
    st = statements(spec)
    width = len(spec.key)
    for part in _parts(list(keys)):
        rows = conn.exec_driver_sql(
            f"SELECT {st.keys_and_shard} FROM {st.table} WHERE {st.key_in(len(part))} FOR UPDATE",
            st.key_params(part),
        ).all()
        own = [r for r in rows if not check(spec, r[width])]
        if own:
            theirs = tuple(own[0][:width])
            raise ReshardDataError(
                f"table {spec.physical}: a moving row has the key {theirs!r} of a row the"
                f" mirror owns ({spec.shard_column} {own[0][width]!r} is not in the moving"
                " slots): the key does not route its row (an id counted per shard), or it"
                " compares equal under the column's collation (letter case, trailing spaces)"
                " while the hash sends the two to different slots. Copying would overwrite"
                " that row, so nothing was written. Make the keys unique across shards (ids"
                " from the generator; or hash a text column with fold_case), then run the"
                " step again"
            )


def _parts(keys: list[Key]) -> Iterator[list[Key]]:
    for start in range(0, len(keys), _KEYS_PER_STATEMENT):
        yield keys[start : start + _KEYS_PER_STATEMENT]


def _rollback(conn: Connection) -> None:
    try:
        if conn.in_transaction():
            conn.rollback()
    except DBAPIError:
        conn.invalidate()


def is_lock_conflict(exc: BaseException) -> bool:
    """A deadlock or lock wait timeout: the server rolled the statement (or the transaction)
    back, and the batch can run again."""
    return isinstance(exc, DBAPIError) and _errno(exc) in _LOCK_ERRNOS


# --------------------------------------------------------------------------- drain


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What a drain did."""

    copied: int
    """Rows upserted into the mirror."""
    deleted: int
    """Rows deleted from the mirror."""
    discarded: int
    """Entries of tables not moving or rows outside the moving slots, deleted unread."""
    batches: int
    """Batches of entries handled."""
    left: int
    """Entries still in the journal when the drain returned (0: drained to empty)."""
    entries: int = 0
    """Entries drained (copied or discarded)."""


def drain(
    authority: Engine,
    mirror: Engine,
    specs: Sequence[TableSpec],
    belongs: Belongs,
    *,
    batch: int = 500,
    max_batches: int | None = None,
    stop: Callable[[], bool] | None = None,
    after_mirror_commit: Callable[[], None] | None = None,
    keep: Belongs | None = None,
    upto: int | None = None,
    lock_wait_s: int | None = None,
    attempts: int | None = None,
) -> DrainReport:
    """Copy the rows named by the authority's journal into the mirror until the journal has
    no entry left past the ones this call passed over (or ``max_batches`` batches ran, or
    ``stop()`` returned True between batches).

    Each batch: up to ``batch`` entries in id order after the last one seen (read without
    locks); entries of a table not in ``specs`` or of a row outside the moving slots are
    deleted ("discarded"), except those ``keep`` accepts (rows moving to another mirror from
    the same authority: its own drain copies them), which are passed over; the rest are
    copied by ``copy_keys`` (authority rows locked, mirror committed, then the entries deleted
    and the authority committed). Idempotent and safe to interrupt anywhere: entries leave
    the journal only after the mirror committed their rows. A batch that loses a deadlock or
    a lock wait is rolled back and run again (up to 5 times).

    ``upto``: only entries with ``id <= upto`` (the switch drains to the last entry written
    before the freeze; later ones are other slots' writes). ``left`` is then the number of
    such entries not done (0 when the call ran to its end); without it, the backlog.

    ``after_mirror_commit`` runs between the mirror's commit and the journal's delete (a test
    hook: an exception there is a crash at the worst moment).
    """
    if batch < 1:
        raise ReshardError(f"drain batch must be at least 1, not {batch}")
    check = BelongsCache(belongs)
    kept = BelongsCache(keep) if keep is not None else None
    copied = deleted = discarded = batches = entries = 0
    cursor = 0
    bound = "" if upto is None else " AND id <= %s"
    with (
        authority.connect() as a,
        mirror.connect() as m,
        mover_session(a, mirror=False, isolation=LOCKING),
        mover_session(m, mirror=True, isolation=WALKING, lock_wait_s=lock_wait_s),
    ):
        by_table = {spec.physical: typed(a, spec) for spec in specs}
        a.rollback()
        while True:
            if max_batches is not None and batches >= max_batches:
                break
            if stop is not None and stop():
                break
            args: tuple[int, ...] = (cursor, batch) if upto is None else (cursor, upto, batch)
            rows = a.exec_driver_sql(
                f"SELECT id, tbl, pk, k FROM {driver_quote(JOURNAL)}"
                f" WHERE id > %s{bound} ORDER BY id LIMIT %s",
                args,
            ).all()
            a.rollback()  # end the read's snapshot: the locked reads below see the latest rows
            if not rows:
                return DrainReport(copied, deleted, discarded, batches, 0, entries)
            cursor = int(rows[-1][0])
            work: dict[TableSpec, list[Key]] = {}
            ids: list[int] = []
            dropped = 0
            for entry_id, table, pk, k in rows:
                spec = by_table.get(str(table))
                value = _shard_value(spec, k) if spec is not None else None
                if (
                    spec is not None
                    and kept is not None
                    and not check(spec, value)
                    and kept(spec, value)
                ):
                    continue  # another mirror's row: its own drain copies it
                ids.append(int(entry_id))
                if spec is None or not check(spec, value):
                    dropped += 1
                    continue
                work.setdefault(spec, []).append(tuple(json.loads(pk, parse_float=Decimal)))
            run = functools.partial(
                copy_keys,
                a,
                m,
                work,
                check,
                journal_ids=ids,
                after_mirror_commit=after_mirror_commit,
            )
            done = retrying(run, a, m, attempts=attempts or _RETRIES)
            copied += done.copied
            deleted += done.deleted
            discarded += dropped
            entries += len(ids)
            batches += 1
    if upto is not None:
        return DrainReport(
            copied, deleted, discarded, batches, pending(authority, cursor, upto), entries
        )
    return DrainReport(copied, deleted, discarded, batches, backlog(authority), entries)


def pending(engine: Engine, after: int, upto: int) -> int:
    """Journal entries with ``after < id <= upto``."""
    with engine.connect() as conn:
        if not _journal_exists(conn):
            return 0
        found = conn.exec_driver_sql(
            f"SELECT COUNT(*) FROM {driver_quote(JOURNAL)} WHERE id > %s AND id <= %s",
            (after, upto),
        ).scalar()
        return int(found or 0)


def last_id(engine: Engine) -> int:
    """The journal's highest entry id (0 when empty or missing)."""
    with engine.connect() as conn:
        if not _journal_exists(conn):
            return 0
        found = conn.exec_driver_sql(f"SELECT MAX(id) FROM {driver_quote(JOURNAL)}").scalar()
        return int(found or 0)


def retrying(run: Callable[[], T], *conns: Connection, attempts: int = _RETRIES) -> T:
    """``run()``, run again (up to ``attempts`` times in all, briefly paused) when it loses a
    deadlock or a lock wait; ``conns`` are rolled back before each new try. Other errors
    propagate."""
    for attempt in range(1, attempts + 1):
        try:
            return run()
        except DBAPIError as exc:
            for conn in conns:
                _rollback(conn)
            if not is_lock_conflict(exc) or attempt == attempts:
                raise
            time.sleep(0.02 * attempt)
    raise AssertionError("unreachable")  # pragma: no cover


def _shard_value(spec: TableSpec, raw: str | None) -> Any:
    """The sharding value a journal entry recorded, as its JSON gives it (a DATE or DATETIME
    as text, a DECIMAL as a number): ``Belongs`` routes it as the routers route the row
    (``spec.routed_value``). A value without a slot (NULL, the zero date) or that no router
    routes is a row that did not move when it was written: the drain discards the entry
    (never stops on it). Its other entries carry the rest: a change of the sharding value
    journals the old value and the new, and the one that moves has the row's current image
    copied, or its copy deleted, by ``copy_keys``. Verify refuses a moving source's
    unroutable rows (``BelongsCache(strict=True)``)."""
    if spec.shard_column is None or raw is None:
        return None
    try:
        found = json.loads(raw, parse_float=Decimal)
    except ValueError:
        return raw  # not JSON (never written so by the triggers): unroutable, discarded
    return found[0] if isinstance(found, list) and found else None


__all__ = [
    "JOURNAL",
    "MIRROR_VARIABLE",
    "BelongsCache",
    "Copied",
    "DrainReport",
    "backlog",
    "copy_keys",
    "drain",
    "guard_own_rows",
    "install",
    "installed_triggers",
    "is_lock_conflict",
    "last_id",
    "mover_session",
    "pending",
    "remove",
    "retrying",
    "trigger_names",
]
