"""Moving the rows themselves: the backfill (chunks, checkpoints, throttle), the
verification (row hashes computed by each shard, repair), the cleanup of the side that no
longer owns them, and real row counts for progress (docs/RESHARDING.md, phases 3, 4 and 6).

Every walk goes through a table in primary-key chunks (``WHERE key > last ORDER BY key LIMIT
n``; the predicates are built by ``spec.statements`` so they are ranges on the primary key).
Which rows move is decided in Python (``Belongs``: the slot is a hash MariaDB cannot compute),
memoized per sharding value.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Engine

from shardrouter.errors import ReshardError

from .journal import (
    LOCKING,
    WALKING,
    BelongsCache,
    Key,
    copy_keys,
    guard_own_rows,
    mover_session,
    retrying,
)
from .spec import Belongs, Statements, TableSpec, statements, typed

_REPAIR_ROUNDS = 3  # repair, compare again; a row still differing after this many is reported
_REPAIR_BATCH = 500
_SAMPLE = 20


@dataclass(frozen=True, slots=True)
class ChunkDone:
    """One chunk committed: the caller may checkpoint ``last_key`` (resume with
    ``after=last_key``). ``rows_read`` / ``rows_copied`` count from the start of this call
    (rows_copied: for ``delete_moved``, rows deleted)."""

    table: str
    last_key: Key
    rows_read: int
    rows_copied: int


@dataclass(frozen=True, slots=True)
class BackfillReport:
    rows_read: int
    """Rows of the source read (moving or not)."""
    rows_copied: int
    """Rows of the moving slots upserted into the target."""
    chunks: int
    last_key: Key | None
    """The last primary key read: the checkpoint (None if nothing was read)."""
    done: bool
    """True when the table was walked to its end; False when ``stop()`` ended it early."""


@dataclass(frozen=True, slots=True)
class VerifyReport:
    rows_source: int
    """Rows of the moving slots on the source."""
    rows_target: int
    """Rows of the moving slots on the target."""
    differing: int
    """Keys that differed in the first comparison (missing, stale or another image)."""
    sample: tuple[Key, ...]
    """The first differing keys (at most 20)."""
    repaired: int
    """Keys re-copied under the source's lock."""
    equal: bool
    """Nothing differs (after the repair, with ``repair=True``)."""


class Throttle:
    """Pace for the walks of a migration: a row rate and the source's load.

    ``max_rows_per_s``: a token bucket over rows read (refilled at that rate, holding at most
    ``burst_s`` worth), so over a long walk the rate stays under it. Load: every
    ``check_every`` chunks, ``SHOW GLOBAL STATUS LIKE 'Threads_running'`` on the source;
    while it is above ``max_threads_running`` the walk backs off (``backoff_s`` doubling up to
    ``max_backoff_s`` per pause), for at most ``max_wait_s`` per check, then takes one more
    chunk: a server that stays busy slows the migration down but never stalls it forever.
    Every sleep is cut into short slices that check ``stop()``, so pausing or cancelling is
    honoured within ~0.1 s.

    One Throttle may pace several walks one after another (not at the same time).
    """

    def __init__(
        self,
        max_rows_per_s: float | None = None,
        *,
        max_threads_running: int | None = 32,
        check_every: int = 5,
        backoff_s: float = 0.05,
        max_backoff_s: float = 1.0,
        max_wait_s: float = 30.0,
        burst_s: float = 0.25,
    ) -> None:
        if max_rows_per_s is not None and max_rows_per_s <= 0:
            raise ReshardError(f"max_rows_per_s must be positive, not {max_rows_per_s}")
        if check_every < 1:
            raise ReshardError(f"check_every must be at least 1, not {check_every}")
        self.max_rows_per_s = max_rows_per_s
        self.max_threads_running = max_threads_running
        self.check_every = check_every
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.max_wait_s = max_wait_s
        self.burst_s = burst_s
        self.slept_s = 0.0
        """Seconds spent sleeping so far (rate and load)."""
        self.load_waits = 0
        """Checks that found the source above ``max_threads_running``."""
        self._tokens = 0.0
        self._last: float | None = None
        self._chunks = 0

    def pace(
        self, rows: int, conn: Connection | None = None, stop: Callable[[], bool] | None = None
    ) -> None:
        """Account ``rows`` just read and sleep as needed; ``conn``: the source (outside a
        transaction), for the load check."""
        self._rate(rows, stop)
        self._chunks += 1
        if (
            conn is not None
            and self.max_threads_running is not None
            and self._chunks % self.check_every == 0
        ):
            self._load(conn, stop)

    def _rate(self, rows: int, stop: Callable[[], bool] | None) -> None:
        rate = self.max_rows_per_s
        if rate is None:
            return
        now = time.monotonic()
        capacity = rate * self.burst_s
        if self._last is None:
            self._tokens = capacity
        else:
            self._tokens = min(capacity, self._tokens + (now - self._last) * rate)
        self._last = now
        self._tokens -= rows
        if self._tokens < 0:
            # The debt is at most one chunk's rows: a bounded sleep.
            self._sleep(-self._tokens / rate, stop)

    def _load(self, conn: Connection, stop: Callable[[], bool] | None) -> None:
        limit = self.max_threads_running
        assert limit is not None
        waited = 0.0
        backoff = self.backoff_s
        first = True
        while True:
            row = conn.exec_driver_sql("SHOW GLOBAL STATUS LIKE 'Threads_running'").first()
            conn.rollback()
            running = int(row[1]) if row is not None else 0
            if running <= limit:
                return
            if first:
                self.load_waits += 1
                first = False
            if waited >= self.max_wait_s or (stop is not None and stop()):
                return
            pause = max(0.0, min(backoff, self.max_backoff_s, self.max_wait_s - waited))
            self._sleep(pause, stop)
            waited += pause
            backoff *= 2

    def _sleep(self, seconds: float, stop: Callable[[], bool] | None) -> None:
        end = time.monotonic() + seconds
        while True:
            left = end - time.monotonic()
            if left <= 0 or (stop is not None and stop()):
                return
            step = min(left, 0.1)
            time.sleep(step)
            self.slept_s += step


# --------------------------------------------------------------------------- walks


def _chunk_sql(st: Statements, select: str, *, after: bool, upto: bool, lock: bool) -> str:
    where = [p for p, on in ((st.after, after), (st.upto, upto)) if on]
    clause = f" WHERE {' AND '.join(where)}" if where else ""
    locking = " FOR UPDATE" if lock else ""
    return f"SELECT {select} FROM {st.table}{clause} {st.order_by} LIMIT %s{locking}"


def _read_chunk(
    conn: Connection,
    st: Statements,
    select: str,
    after: Key | None,
    limit: int,
    *,
    upto: Key | None = None,
    lock: bool = False,
) -> Sequence[Any]:
    params: tuple[Any, ...] = ()
    if after is not None:
        params += st.range_params(after)
    if upto is not None:
        params += st.range_params(upto)
    sql = _chunk_sql(st, select, after=after is not None, upto=upto is not None, lock=lock)
    return conn.exec_driver_sql(sql, (*params, limit)).all()


def _typed(engine: Engine, spec: TableSpec) -> TableSpec:
    """``spec`` with its column types (read from ``engine``'s shard when it lacks them)."""
    if len(spec.types) == len(spec.columns):
        return spec
    with engine.connect() as conn:
        return typed(conn, spec)


def _check_chunk(chunk: int) -> None:
    if chunk < 1:
        raise ReshardError(f"chunk must be at least 1 row, not {chunk}")


def count(engine: Engine, spec: TableSpec, belongs: Belongs, *, chunk: int = 10_000) -> int:
    """The rows of ``spec`` on ``engine``'s shard that belong to the moving slots (read in
    primary-key chunks, the slot of each computed here: an exact count, for progress)."""
    _check_chunk(chunk)
    st = statements(_typed(engine, spec))
    with engine.connect() as conn:
        if spec.shard_column is None:
            return int(conn.exec_driver_sql(f"SELECT COUNT(*) FROM {st.table}").scalar_one())
        check = BelongsCache(belongs)
        width = len(spec.key)
        total = 0
        after: Key | None = None
        while True:
            rows = _read_chunk(conn, st, st.keys_and_shard, after, chunk)
            conn.rollback()  # no snapshot held across chunks
            total += sum(1 for r in rows if check(spec, r[width]))
            if len(rows) < chunk:
                return total
            after = tuple(rows[-1][:width])


def backfill(
    source: Engine,
    target: Engine,
    spec: TableSpec,
    belongs: Belongs,
    *,
    after: Sequence[Any] | None = None,
    chunk: int = 2000,
    throttle: Throttle | None = None,
    on_chunk: Callable[[ChunkDone], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> BackfillReport:
    """Copy the rows of ``spec`` that belong to the moving slots from ``source`` to
    ``target``, in primary-key chunks after the checkpoint ``after``.

    Each chunk is read on the source (READ COMMITTED, no locks: see journal.copy_keys), its
    moving rows upserted into the target, committed. The journal (triggers, on since start)
    holds an entry for every change committed after the read, and the runner drains it
    after the chunk: a row changed meanwhile gets its newer image, a row deleted meanwhile is
    deleted again, so nothing stale or resurrected stays.

    ``on_chunk`` is called after each committed chunk (checkpoint ``last_key`` there);
    ``stop()`` is checked between chunks (and during the throttle's sleeps): it ends the walk
    with ``done=False``.
    """
    _check_chunk(chunk)
    spec = _typed(source, spec)
    check = BelongsCache(belongs, strict=True)  # an unroutable row refuses the copy
    key_positions = statements(spec).key_positions
    last: Key | None = tuple(after) if after is not None else None
    read = copied = chunks = 0
    done = False
    st = statements(spec)

    def read_chunk(after: Key | None) -> Sequence[Any]:
        rows = _read_chunk(src, st, st.select_list, after, chunk)  # no lock: journal.copy_keys
        src.commit()
        return rows

    with (
        source.connect() as src,
        target.connect() as dst,
        mover_session(src, mirror=False, isolation=WALKING),
        mover_session(dst, mirror=True, isolation=WALKING),
        ThreadPoolExecutor(1, thread_name_prefix="backfill-source") as ahead,
    ):
        rows = read_chunk(last) if not (stop is not None and stop()) else None
        while rows is not None:
            if not rows:
                done = True
                break
            following = tuple(rows[-1][i] for i in key_positions)
            # The source's next chunk is read (on a thread) while this one is written: the
            # two servers and the client work at the same time.
            pending = ahead.submit(read_chunk, following) if len(rows) == chunk else None
            write = functools.partial(_write_chunk, dst, spec, check, rows)
            try:
                kept = retrying(write, dst)
            finally:
                upcoming = pending.result() if pending is not None else None
            chunks += 1
            read += len(rows)
            copied += kept
            last = following
            if on_chunk is not None:
                on_chunk(ChunkDone(spec.physical, last, read, copied))
            if upcoming is None:
                done = True
                break
            if throttle is not None:
                throttle.pace(len(rows), src, stop)  # (the reader is idle: src is free)
            rows = upcoming if not (stop is not None and stop()) else None
    return BackfillReport(read, copied, chunks, last, done)


def verify(
    source: Engine,
    target: Engine,
    spec: TableSpec,
    belongs: Belongs,
    *,
    chunk: int = 10_000,
    repair: bool = True,
) -> VerifyReport:
    """Compare the moving rows of ``spec`` on the source and the target, row by row.

    Each side computes a hash of every row (``Statements.row_hash``) in primary-key chunks: a
    chunk of the source fixes a key range, and the target's rows of that range are read to
    match it, so only keys, sharding values and 16-byte hashes cross the network. A key that
    differs: its images differ, it is missing on the target, or the target holds a copy the
    source no longer has (stale). Rows of the target outside the moving slots are its own and
    ignored.

    With ``repair``, every differing key is re-copied under the source's lock exactly like a
    drain entry (``copy_keys``) and compared again (up to 3 rounds: a row written meanwhile
    may need another). ``equal``: nothing differs at the end.
    """
    _check_chunk(chunk)
    spec = _typed(source, spec)
    st = statements(spec)
    check = BelongsCache(belongs)
    width = len(spec.key)
    select = f"{st.keys_and_shard}, {st.row_hash}"
    differing: list[Key] = []
    rows_source = rows_target = 0

    with (
        source.connect() as src,
        target.connect() as dst,
        mover_session(src, mirror=False, isolation=LOCKING),  # repairs use copy_keys
        mover_session(dst, mirror=True, isolation=WALKING),
    ):
        # The reader thread's own memo; strict: a source row no router routes refuses verify
        # (the target's side and the repairs treat such a row as not moving).
        ahead_check = BelongsCache(belongs, strict=True)

        def read_source(after: Key | None) -> tuple[int, Key | None, dict[Any, bytes]]:
            rows = _read_chunk(src, st, select, after, chunk)
            src.rollback()  # no snapshot held across chunks
            last = tuple(rows[-1][:width]) if rows else None
            return len(rows), last, _hash_map(spec, rows, ahead_check)

        # The source's next chunk is read and hashed (on a thread) while the target's rows of
        # the current one are: the two servers hash at the same time.
        with ThreadPoolExecutor(1, thread_name_prefix="verify-source") as ahead:
            pending = ahead.submit(read_source, None)
            after: Key | None = None
            while True:
                n, last, ours = pending.result()
                upto = last if n == chunk else None
                if upto is not None:
                    pending = ahead.submit(read_source, upto)
                theirs: dict[Any, bytes] = {}
                cursor = after
                while True:  # the target's rows of (after, upto], in chunks of its own
                    part = _read_chunk(dst, st, select, cursor, chunk, upto=upto)
                    dst.rollback()
                    theirs.update(_hash_map(spec, part, check))
                    if len(part) < chunk:
                        break
                    cursor = tuple(part[-1][:width])
                rows_source += len(ours)
                rows_target += len(theirs)
                get = theirs.get
                differing.extend(_keys([k for k, h in ours.items() if get(k) != h], width))
                differing.extend(_keys([k for k in theirs if k not in ours], width))
                if upto is None:
                    break
                after = upto
        sample = tuple(differing[:_SAMPLE])
        if not differing:
            return VerifyReport(rows_source, rows_target, 0, (), 0, True)
        if not repair:
            return VerifyReport(rows_source, rows_target, len(differing), sample, 0, False)
        repaired: set[Key] = set()
        left = differing
        for _ in range(_REPAIR_ROUNDS):
            for start in range(0, len(left), _REPAIR_BATCH):
                batch = {spec: left[start : start + _REPAIR_BATCH]}
                retrying(functools.partial(copy_keys, src, dst, batch, check), src, dst)
            repaired.update(left)
            left = _still_differing(src, dst, spec, st, left, check)
            if not left:
                break
    return VerifyReport(rows_source, rows_target, len(differing), sample, len(repaired), not left)


def _write_chunk(dst: Connection, spec: TableSpec, check: BelongsCache, rows: Sequence[Any]) -> int:
    """One backfill chunk's write: upsert the moving rows among ``rows``, commit. Returns
    the rows copied."""
    st = statements(spec)
    at = st.shard_position
    keys = st.key_positions
    moving = [r for r in rows if at is None or check(spec, r[at], tuple(r[i] for i in keys))]
    keep = [tuple(r[i] for i in st.write_positions) for r in moving]
    if keep:
        guard_own_rows(dst, spec, [tuple(r[i] for i in st.key_positions) for r in moving], check)
        dst.exec_driver_sql(st.upsert, keep)
        dst.commit()
    return len(keep)


def _delete_chunk(
    conn: Connection, spec: TableSpec, check: BelongsCache, after: Key | None, chunk: int
) -> tuple[Sequence[Any], int]:
    """One cleanup chunk: keys read under lock, the moving ones deleted, committed. Returns
    (rows read, rows deleted)."""
    st = statements(spec)
    width = len(spec.key)
    rows = _read_chunk(conn, st, st.keys_and_shard, after, chunk, lock=True)
    doomed = [tuple(r[:width]) for r in rows if spec.shard_column is None or check(spec, r[width])]
    if doomed:
        conn.exec_driver_sql(
            f"DELETE FROM {st.table} WHERE {st.key_in(len(doomed))}", st.key_params(doomed)
        )
    conn.commit()
    return rows, len(doomed)


def _still_differing(
    src: Connection,
    dst: Connection,
    spec: TableSpec,
    st: Statements,
    keys: list[Key],
    check: BelongsCache,
) -> list[Key]:
    select = f"{st.keys_and_shard}, {st.row_hash}"
    width = len(spec.key)
    left: list[Key] = []
    for start in range(0, len(keys), _REPAIR_BATCH):
        part = keys[start : start + _REPAIR_BATCH]
        sql = f"SELECT {select} FROM {st.table} WHERE {st.key_in(len(part))}"
        ours = _hash_map(spec, src.exec_driver_sql(sql, st.key_params(part)).all(), check)
        src.rollback()
        theirs = _hash_map(spec, dst.exec_driver_sql(sql, st.key_params(part)).all(), check)
        dst.rollback()
        both = dict.fromkeys([*ours, *theirs])
        left.extend(_keys([k for k in both if ours.get(k) != theirs.get(k)], width))
    return left


def _hash_map(spec: TableSpec, rows: Sequence[Any], check: BelongsCache) -> dict[Any, bytes]:
    """{key: row hash} of the moving rows among ``rows`` (key columns, the sharding column,
    the hash): the hot loop of verify, so a one-column key is kept bare (see ``_keys``) and
    the slot test is memoized per sharding value."""
    width = len(spec.key)
    if spec.shard_column is None:
        if width == 1:
            return {r[0]: r[1] for r in rows}
        return {tuple(r[:width]): r[width] for r in rows}
    memo = check.memo(spec)
    out: dict[Any, bytes] = {}
    for r in rows:
        value = r[width]
        ok = memo.get(value)
        if ok is None:
            ok = check(spec, value, r[:width])
        if ok:
            out[r[0] if width == 1 else tuple(r[:width])] = r[width + 1]
    return out


def _keys(found: list[Any], width: int) -> list[Key]:
    """Keys of ``_hash_map`` as Key tuples."""
    return [(k,) for k in found] if width == 1 else found


def delete_moved(
    engine: Engine,
    spec: TableSpec,
    belongs: Belongs,
    *,
    chunk: int = 1000,
    throttle: Throttle | None = None,
    on_chunk: Callable[[ChunkDone], None] | None = None,
    stop: Callable[[], bool] | None = None,
) -> int:
    """Delete the rows of ``spec`` that belong to the moving slots from ``engine``'s shard
    (finalize: from the source; cancel: from the target); returns the rows deleted.

    In primary-key chunks, each its own transaction: the chunk's keys and sharding values are
    read ``FOR UPDATE`` (so a row cannot change its slot between the check and the delete),
    the belonging ones deleted by key, committed. The session sets ``@shardrouter_mirror``:
    triggers still in place do not journal the cleanup. ``stop()`` is checked between chunks.
    """
    _check_chunk(chunk)
    spec = _typed(engine, spec)
    check = BelongsCache(belongs)
    width = len(spec.key)
    last: Key | None = None
    read = deleted = 0
    with engine.connect() as conn, mover_session(conn, mirror=True, isolation=WALKING):
        while not (stop is not None and stop()):
            one = functools.partial(_delete_chunk, conn, spec, check, last, chunk)
            rows, gone = retrying(one, conn)
            if not rows:
                break
            read += len(rows)
            deleted += gone
            last = tuple(rows[-1][:width])
            if on_chunk is not None:
                on_chunk(ChunkDone(spec.physical, last, read, deleted))
            if len(rows) < chunk:
                break
            if throttle is not None:
                throttle.pace(len(rows), conn, stop)
    return deleted


__all__ = [
    "BackfillReport",
    "ChunkDone",
    "Throttle",
    "VerifyReport",
    "backfill",
    "count",
    "delete_moved",
    "verify",
]
