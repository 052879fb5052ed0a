"""Lean autocommit DBAPI connections for reads outside transactions: the fan-out hot path.

A read the router runs outside a transaction needs no transaction: in autocommit a SELECT sees
committed rows and leaves nothing to roll back. SQLAlchemy's pool cannot know that, so each
checkout pings the server (``pre_ping``) and each return rolls back: two round trips around the
one that matters, and under asyncio every call also hops through a greenlet. A scatter query
pays that once per shard. Measured on the 4-shard sandbox (aiomysql, 20 rows): SQLAlchemy Core
``engine.connect()`` + execute costs about 740 us of client CPU per query; the same statement
on a DBAPI connection held in autocommit about 265 us.

So the routers run such reads on connections from this pool instead:

- made by the engine's own dialect from the engine's URL and connect arguments, so any URL
  SQLAlchemy accepts for a supported driver behaves the same (``supported()``);
- put in autocommit once, when made;
- checked for life only after they sat idle ``IDLE_CHECK_S`` (HikariCP's "alive bypass
  window"), and only when the shard's ``pre_ping`` is on; recycled after ``recycle_s``;
- dropped after any error, or when a wait for them is cancelled (their protocol state is then
  unknown); a statement cancelled while it ran is also stopped on its server (``KILL QUERY``
  from a short-lived connection, see ``stop_statement``): dropping the connection alone leaves
  the server computing the whole answer, and callers that time out and retry pile such reads
  up on every shard;
- at most ``size + max_overflow`` open per engine, ``size`` kept idle; a caller that finds none
  free waits up to ``timeout_s``, then gets ShardUnavailableError.

Statements are compiled once per SQL text by the engine's dialect (paramstyle, ``%`` escaping)
and cached.

Rows that feed a merge (``Job.lazy``) are kept as the server sent them and decoded when read
(``LazyRows``), on PyMySQL and aiomysql: a merge under ``ORDER BY ... LIMIT n`` over k shards
reads about n of the k*n rows they send, and decoding (type conversion in pure Python) is most
of a row's client cost. This reads the result through the drivers' own ``MySQLResult`` with one
method replaced; where a driver version lacks what that needs (``LAZY_DRIVERS`` is then
smaller), rows are decoded eagerly as usual.

The bookkeeping (``_Idle``) is shared; ``ReadPool`` and ``AsyncReadPool`` are the thin sync and
async shells that do the I/O.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NoReturn, overload

import aiomysql.connection as _aiomysql_connection
import pymysql.connections as _pymysql_connections
from pymysql import converters as _pymysql_converters
from pymysql import err as _pymysql_err
from pymysql.constants import COMMAND, CR
from pymysql.protocol import MysqlPacket
from sqlalchemy import Engine, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.util import greenlet_spawn

from ..core.config import PoolConfig
from ..errors import ExecutionError, ShardUnavailableError
from ..sql.execution import JobResult, float_columns, log_statement
from ..types import ShardId
from .engines import classify, engine_options

log = logging.getLogger("shardrouter")

SYNC_DRIVERS = frozenset({"pymysql", "mysqldb"})
ASYNC_DRIVERS = frozenset({"aiomysql", "asyncmy"})
IDLE_CHECK_S = 1.0
"""A connection used within this many seconds is trusted without a ping."""
_CACHE_SIZE = 4096
KILL_WAIT_S = 0.5
"""How long a cancelled statement's task waits for the KILL QUERY that stops it on its server
before it lets the cancellation through; the kill then goes on in the background, within the
shard's connect_timeout_s + query_timeout_s (see stop_statement)."""
_NO_SUCH_THREAD = 1094
_MAX_PACKET_LEN = 2**24 - 1
"""A packet of this length is continued in the next (the protocol's 16 MB split)."""
_stopping: set[asyncio.Task[None]] = set()
"""The kills in flight (the event loop keeps only weak references to tasks)."""


# -- lazily decoded rows ------------------------------------------------------------------------


class LazyRows(Sequence[tuple[Any, ...]]):
    """Result rows kept as the server's packets; a row is decoded when first read, and kept.

    Decoding needs only the packet and the result's converters, not the connection, so the
    connection goes back to its pool before the merge reads anything. A row read twice (the
    merge's type check reads each result's first row, then the merge itself) is decoded once.
    """

    __slots__ = ("_decode", "_packets", "_rows")

    def __init__(self, packets: list[Any], decode: Callable[[Any], tuple[Any, ...]]) -> None:
        self._packets = packets
        self._decode = decode
        self._rows: list[tuple[Any, ...] | None] = [None] * len(packets)

    def __len__(self) -> int:
        return len(self._packets)

    def _row(self, index: int) -> tuple[Any, ...]:
        row = self._rows[index]
        if row is None:
            row = self._rows[index] = self._decode(self._packets[index])
        return row

    @overload
    def __getitem__(self, index: int) -> tuple[Any, ...]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[Any, ...]]: ...

    def __getitem__(self, index: int | slice) -> tuple[Any, ...] | list[tuple[Any, ...]]:
        if isinstance(index, slice):
            return [self._row(i) for i in range(*index.indices(len(self._packets)))]
        if index < 0:
            index += len(self._packets)
        if not 0 <= index < len(self._packets):
            raise IndexError("LazyRows index out of range")
        return self._row(index)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return map(self._row, range(len(self._packets)))


def _lazy_capable(result_class: type) -> bool:
    return all(
        hasattr(result_class, name)
        for name in (
            "read",
            "_read_rowdata_packet",
            "_read_row_from_packet",
            "_check_packet_is_eof",
        )
    )


class _PyMySQLLazyResult(_pymysql_connections.MySQLResult):  # type: ignore[misc]
    def _get_descriptions(self) -> None:
        # The column definitions, read raw; parsed by PyMySQL's own _get_descriptions only the
        # first time a connection sees these exact bytes (a scatter's statement comes back with
        # the same columns every time: parsing them was a tenth of its client time). Kept per
        # connection, whose encoding and decoders are fixed; fields and converters read-only.
        me: Any = self  # PyMySQL's attributes are untyped
        conn = me.connection
        payloads = _read_rows(conn)  # the field packets, then the EOF packet
        cache: dict[tuple[bytes, ...], tuple[list[Any], list[Any], Any]] | None = getattr(
            conn, "_shardrouter_columns", None
        )
        if cache is None:
            cache = {}
            conn._shardrouter_columns = cache
        key = tuple(payloads)
        hit = cache.get(key)
        if hit is None:
            me.connection = _Replay(conn, payloads)
            try:
                super()._get_descriptions()
            finally:
                me.connection = conn
            fast = [(enc, _FAST.get(c, c)) for enc, c in me.converters]
            if len(cache) >= _COLUMNS_KEPT:
                cache.clear()
            hit = cache[key] = (me.fields, fast, me.description)
        me.fields, me.converters, me.description = list(hit[0]), list(hit[1]), hit[2]

    def _read_rowdata_packet(self) -> None:
        # PyMySQL's own loop (_read_packet per row), minus the decoding, and minus most of its
        # cost per packet: the rows are read straight from the connection's buffered socket
        # file, each kept as its payload bytes (a MysqlPacket is made only for a row that is
        # read). A scatter reads k x LIMIT row packets to use about LIMIT of them: PyMySQL's
        # per-packet path (two _read_bytes calls, a settimeout each, a MysqlPacket) was the
        # largest part of a sync scatter's client time. Errors as PyMySQL raises them.
        conn = self.connection  # type: ignore[has-type]
        payloads = _read_rows(conn)
        self._check_packet_is_eof(MysqlPacket(payloads.pop(), conn.encoding))
        self.connection = None
        self.affected_rows = len(payloads)
        converters = tuple(self.converters)

        def decode(payload: bytes) -> tuple[Any, ...]:
            return _decode_row(payload, converters)

        self.rows = LazyRows(payloads, decode)


def _decode_row(payload: bytes, converters: Sequence[tuple[str | None, Any]]) -> tuple[Any, ...]:
    """A text-protocol row as PyMySQL's MySQLResult._read_row_from_packet decodes it: per
    column a length-coded string (0xFB: NULL), decoded by the column's encoding, then its
    converter; a row shorter than its columns ends there. Without a MysqlPacket per row."""
    row: list[Any] = []
    pos = 0
    end = len(payload)
    for encoding, converter in converters:
        if pos >= end:
            break  # no more columns in this row (PyMySQL: the IndexError it catches)
        first = payload[pos]
        if first < 251:
            length = first
            pos += 1
        elif first == 251:
            row.append(None)
            pos += 1
            continue
        elif first == 252:
            length = payload[pos + 1] | payload[pos + 2] << 8
            pos += 3
        elif first == 253:
            length = payload[pos + 1] | payload[pos + 2] << 8 | payload[pos + 3] << 16
            pos += 4
        elif first == 254:
            length = int.from_bytes(payload[pos + 1 : pos + 9], "little")
            pos += 9
        else:  # 255 is no length: PyMySQL reads it as NULL
            row.append(None)
            pos += 1
            continue
        data: Any = payload[pos : pos + length]
        if len(data) != length:  # as PyMySQL's MysqlPacket.read refuses it
            raise AssertionError(f"Result length not requested length: expected={length}")
        pos += length
        if encoding is not None:
            data = data.decode(encoding)
        if converter is not None:
            data = converter(data)
        row.append(data)
    return tuple(row)


class _Replay:
    """What PyMySQL's _get_descriptions reads of its connection, with the packets it reads
    replayed from payloads already read."""

    def __init__(self, conn: Any, payloads: Sequence[bytes]) -> None:
        self.use_unicode = conn.use_unicode
        self.encoding = conn.encoding
        self.decoders = conn.decoders
        self._payloads = iter(payloads)

    def _read_packet(self, packet_type: Any = MysqlPacket) -> Any:
        return packet_type(next(self._payloads), self.encoding)


_COLUMNS_KEPT = 64
"""Column sets a lean connection keeps parsed (statements it runs again and again)."""


def _fast_datetime(value: str | bytes) -> Any:
    """PyMySQL's convert_datetime, by datetime.fromisoformat for the server's own shape
    ('YYYY-MM-DD HH:MM:SS[.ffffff]'): the same value, several times faster. Anything else
    (a zero date, an invalid one, another shape) goes to PyMySQL's, which decides. (No
    contextlib.suppress: a context manager per value cost a third of the call.)"""
    text = value.decode("ascii") if isinstance(value, _BINARY) else value
    n = len(text)
    if (
        (n == 19 or (21 <= n <= 26 and text[19] == "." and text[20:].isdigit()))
        and text[4] == "-"
        and text[7] == "-"
        and text[10] == " "
        and text[13] == ":"
        and text[16] == ":"
    ):
        try:
            return datetime.datetime.fromisoformat(text)
        except ValueError:
            pass
    return _pymysql_converters.convert_datetime(text)


def _fast_date(value: str | bytes) -> Any:
    """PyMySQL's convert_date, by date.fromisoformat for 'YYYY-MM-DD' (see _fast_datetime)."""
    text = value.decode("ascii") if isinstance(value, _BINARY) else value
    if len(text) == 10 and text[4] == "-" and text[7] == "-":
        try:
            return datetime.date.fromisoformat(text)
        except ValueError:
            pass
    return _pymysql_converters.convert_date(text)


_BINARY = (bytes, bytearray)


_FAST: dict[Any, Any] = {
    _pymysql_converters.convert_datetime: _fast_datetime,
    _pymysql_converters.convert_date: _fast_date,
}
"""PyMySQL's decoders -> the same decoding, faster, for rows the lazy reader reads."""


def _read_rows(conn: Any) -> list[bytes]:
    """The payloads of a result's row packets up to and including its EOF packet (last), read
    from a PyMySQL connection as its _read_packet reads them: sequence numbers checked, a
    payload of 16 MB or more joined with its continuation parts (the last one shorter, maybe
    empty), an error packet raised, a lost or timed-out socket closed and raised as
    OperationalError 2013."""
    rfile = conn._rfile
    conn._sock.settimeout(conn._read_timeout)
    payloads: list[bytes] = []
    seq = conn._next_seq_id
    try:
        while True:
            parts: list[bytes] = []
            while True:  # one logical packet: parts of 2**24 - 1 bytes, then a shorter one
                header = rfile.read(4)
                if len(header) < 4:
                    raise _short()
                if header[3] != seq:
                    _wrong_sequence(conn, header[3], seq)
                seq = (seq + 1) % 256
                length = header[0] | header[1] << 8 | header[2] << 16
                part = rfile.read(length)
                if len(part) < length:
                    raise _short()
                parts.append(part)
                if length < _MAX_PACKET_LEN:
                    break
            payload = parts[0] if len(parts) == 1 else b"".join(parts)
            conn._next_seq_id = seq
            first = payload[0] if payload else None
            if first == 0xFF:  # an error packet (the statement failed mid-result)
                MysqlPacket(payload, conn.encoding).raise_for_error()
            payloads.append(payload)
            if first == 0xFE and len(payload) < 9:  # EOF
                return payloads
    except OSError as exc:
        conn._force_close()
        raise _pymysql_err.OperationalError(
            CR.CR_SERVER_LOST, f"Lost connection to MySQL server during query ({exc})"
        ) from exc
    except _pymysql_err.MySQLError:
        raise
    except BaseException:
        conn._force_close()  # the protocol's state is unknown: as PyMySQL's _read_bytes
        raise


def _short() -> BaseException:
    return OSError("the server closed the connection mid-packet")


def _wrong_sequence(conn: Any, got: int, expected: int) -> None:
    """Raise as PyMySQL's _read_packet does for a packet out of sequence."""
    conn._force_close()
    if got == 0:  # MariaDB's error packet with sequence 0 at shutdown
        raise _pymysql_err.OperationalError(
            CR.CR_SERVER_LOST, "Lost connection to MySQL server during query"
        )
    raise _pymysql_err.InternalError(
        f"Packet sequence number wrong - got {got} expected {expected}"
    )


class _AiomysqlLazyResult(_aiomysql_connection.MySQLResult):  # type: ignore[misc]
    async def _read_rowdata_packet(self) -> None:
        # aiomysql's own loop, minus the decoding.
        packets = []
        read = self.connection._read_packet  # type: ignore[has-type]
        while True:
            packet = await read()
            if self._check_packet_is_eof(packet):
                self.connection = None
                break
            packets.append(packet)
        self.affected_rows = len(packets)
        read_row = self._read_row_from_packet

        def decode(packet: Any) -> tuple[Any, ...]:
            packet.rewind()  # a packet keeps a read position; read twice, a row starts over
            return read_row(packet)  # type: ignore[no-any-return]

        self.rows = LazyRows(packets, decode)


LAZY_DRIVERS = frozenset(
    name
    for name, result_class, connection_class in (
        ("pymysql", _pymysql_connections.MySQLResult, _pymysql_connections.Connection),
        ("aiomysql", _aiomysql_connection.MySQLResult, _aiomysql_connection.Connection),
    )
    # ``encoding`` is set per connection, so it is not looked for on the class.
    if _lazy_capable(result_class)
    and all(hasattr(connection_class, n) for n in ("_execute_command", "escape"))
)
"""Drivers whose statements this module sends and whose rows it reads itself, lazily when asked
(pure-Python protocol code; the C drivers decode fast anyway and keep their cursors)."""


def _escape(conn: Any, value: Any) -> str:
    """``value`` as the driver's own cursor writes it (bytes too: PyMySQL as a string,
    aiomysql as a _binary string; one database answers each differently), so a lean read
    answers as the driver's SQLAlchemy path would."""
    return str(conn.escape(value))


def _bind(conn: Any, sql: str, args: tuple[Any, ...] | Mapping[str, Any]) -> bytes:
    """The statement with its arguments escaped by the connection, as the driver's cursor
    does; always %-formatted, so the compiler's %% becomes %."""
    if isinstance(args, tuple):
        sql = sql % tuple([_escape(conn, a) for a in args])
    else:
        sql = sql % _EscapedMapping(conn, args)
    return sql.encode(conn.encoding, "surrogateescape")


class _EscapedMapping(Mapping[str, str]):
    """The escaped value of each parameter a pyformat statement names, escaped on lookup (a
    caller's mapping may hold more than the statement uses)."""

    __slots__ = ("_args", "_conn")

    def __init__(self, conn: Any, args: Mapping[str, Any]) -> None:
        self._conn = conn
        self._args = args

    def __getitem__(self, key: str) -> str:
        return _escape(self._conn, self._args[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._args)

    def __len__(self) -> int:
        return len(self._args)


def _finish(conn: Any, result: Any) -> JobResult:
    conn._result = result  # as the driver's query() leaves it
    if result.server_status is not None:
        conn.server_status = result.server_status
    rows = result.rows if result.rows is not None else []  # an empty LazyRows stays one
    found = _result(result.description, rows, result.affected_rows)
    return found.flagged(conn)  # conn._result is this result


def _query_lazy(conn: Any, sql: str, args: tuple[Any, ...] | Mapping[str, Any]) -> JobResult:
    _send(conn, sql, args)
    return _read_lazy(conn)


def _send(conn: Any, sql: str, args: tuple[Any, ...] | Mapping[str, Any]) -> None:
    """Send a statement on a PyMySQL connection (its answer: _read_lazy)."""
    conn._execute_command(COMMAND.COM_QUERY, _bind(conn, sql, args))


def _read_lazy(conn: Any) -> JobResult:
    """Read the answer to the statement last sent on a PyMySQL connection, rows lazily."""
    result = _PyMySQLLazyResult(conn)
    result.read()
    return _finish(conn, result)


async def _query_lazy_async(
    conn: Any, sql: str, args: tuple[Any, ...] | Mapping[str, Any]
) -> JobResult:
    await conn._execute_command(COMMAND.COM_QUERY, _bind(conn, sql, args))
    result = _AiomysqlLazyResult(conn)
    await result.read()
    conn._affected_rows = result.affected_rows
    return _finish(conn, result)


def supported(engine: Engine | AsyncEngine) -> bool:
    """Whether reads on this engine can take the lean path (MySQL/MariaDB, known driver)."""
    url = engine.url
    drivers = ASYNC_DRIVERS if isinstance(engine, AsyncEngine) else SYNC_DRIVERS
    return url.get_backend_name() in ("mysql", "mariadb") and url.get_driver_name() in drivers


@dataclass(slots=True)
class _Held:
    conn: Any
    """The driver's own connection (pymysql/MySQLdb/aiomysql/asyncmy)."""
    born: float
    used: float


@dataclass(slots=True)
class _Idle:
    """Idle connections of one engine, newest last (LIFO keeps a hot few in use)."""

    keep: int
    recycle_s: float
    free: list[_Held] = field(default_factory=list)
    closed: bool = False

    def take(self, now: float) -> tuple[_Held | None, list[_Held]]:
        """The newest usable idle connection (or None), and expired ones to close."""
        expired: list[_Held] = []
        while self.free:
            held = self.free.pop()
            if self.recycle_s >= 0 and now - held.born > self.recycle_s:
                expired.append(held)
                continue
            return held, expired
        return None, expired

    def give(self, held: _Held, now: float) -> bool:
        """Keep ``held`` for reuse; False when it should be closed instead."""
        if self.closed or len(self.free) >= self.keep:
            return False
        held.used = now
        self.free.append(held)
        return True

    def drain(self) -> list[_Held]:
        self.closed = True
        out, self.free = self.free, []
        return out


class _Statements:
    """SQL text with ``:name`` parameters -> the driver's SQL and argument order, cached."""

    def __init__(self, dialect: Any) -> None:
        self._dialect = dialect
        self._cache: OrderedDict[str, tuple[str, tuple[str, ...] | None]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, sql: str) -> tuple[str, tuple[str, ...] | None]:
        hit = self._cache.get(sql)
        if hit is not None:
            return hit
        compiled = text(sql).compile(dialect=self._dialect)
        names = tuple(compiled.positiontup or ()) if compiled.positional else None
        entry = (compiled.string, names)
        with self._lock:
            self._cache[sql] = entry
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return entry

    def bind(
        self, sql: str, params: Mapping[str, Any], shard: ShardId
    ) -> tuple[str, tuple[Any, ...] | Mapping[str, Any]]:
        """The driver's SQL and its arguments: a tuple (positional paramstyles) or the mapping
        (pyformat); never None, so the driver always applies % formatting, which turns the
        compiler's escaped %% back into %."""
        driver_sql, names = self.get(sql)
        if names is None:
            return driver_sql, params
        try:
            return driver_sql, tuple([params[n] for n in names])
        except KeyError as exc:
            raise _missing(exc, params, shard) from None


def _connect_arguments(
    engine: Engine | AsyncEngine, pool: PoolConfig
) -> tuple[list[Any], dict[str, Any]]:
    """What the engine's own pool would pass to the DBAPI's connect()."""
    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    connect_args = dict(engine_options(engine.url, pool).get("connect_args", {}))
    if isinstance(engine, AsyncEngine):  # the async drivers take no read/write timeouts
        connect_args.pop("read_timeout", None)
        connect_args.pop("write_timeout", None)
    return list(cargs), {**cparams, **connect_args}


def _exhausted(shard: ShardId, pool: PoolConfig) -> ShardUnavailableError:
    return ShardUnavailableError(
        f"shard {shard}: no read connection free within pool.timeout_s={pool.timeout_s:g}"
        f" ({pool.size + pool.max_overflow} open, the size + max_overflow cap)",
        shard=shard,
    )


class _Shell:
    """What both shells know of their engine: how to connect, compile, and which errors are
    the driver's."""

    def __init__(self, engine: Engine | AsyncEngine, shard: ShardId, pool: PoolConfig) -> None:
        self.shard = shard
        self._pool = pool
        self._dialect = engine.dialect
        self._errors: tuple[type[BaseException], ...] = (engine.dialect.loaded_dbapi.Error, OSError)
        self._cargs, self._cparams = _connect_arguments(engine, pool)
        self._statements = _Statements(engine.dialect)
        self._idle = _Idle(pool.size, pool.recycle_s)
        self._ping = pool.pre_ping
        self._native = engine.url.get_driver_name() in LAZY_DRIVERS


class _Slots:
    """A bounded count of connections in use, waited on only when none is free, handed out in
    the order callers started waiting.

    Fair: a released slot goes straight to the longest waiter, never back to the pool while
    someone waits. Otherwise a thread that releases and at once acquires again (a hot key's
    point reads) takes the slot before the woken waiter runs, every time, and a scatter
    waiting for that shard fails at pool.timeout_s (review 23). Not threading.BoundedSemaphore
    (unfair the same way; and its release() notifies a Condition over a plain Lock, whose
    ownership check tries a non-blocking acquire of the held lock: under gevent (Locust) that
    failed acquire yields to the hub, one greenlet switch per read for nothing). An RLock
    checks ownership directly; a waiter's Condition is made only when it must wait."""

    __slots__ = ("_free", "_lock", "_queue")

    def __init__(self, size: int) -> None:
        self._lock = threading.RLock()
        self._free = size
        self._queue: deque[_Waiter] = deque()
        """Waiters, oldest first; never empty while ``_free`` > 0 (release hands to them)."""

    def acquire(self, timeout: float) -> bool:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return True
            waiter = _Waiter(threading.Condition(self._lock))
            self._queue.append(waiter)
            deadline = time.monotonic() + timeout
            try:
                while not waiter.granted:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    waiter.wake.wait(left)
            except BaseException:
                # Interrupted (a signal, gevent.Timeout, a killed greenlet): the slot must not
                # stay with a waiter that is gone.
                self._leave(waiter)
                raise
            if waiter.granted:
                return True
            self._queue.remove(waiter)
            return False

    def _leave(self, waiter: _Waiter) -> None:
        """``waiter`` gives up: out of the queue, or its slot, if handed over, passed on."""
        if waiter.granted:
            self.release()
        else:
            self._queue.remove(waiter)

    def try_acquire(self) -> bool:
        """One slot if one is free now (then nobody waits for one); never waits."""
        with self._lock:
            if self._free <= 0:
                return False
            self._free -= 1
            return True

    def release(self) -> None:
        with self._lock:
            if self._queue:
                waiter = self._queue.popleft()
                waiter.granted = True  # the slot is the waiter's: _free stays as it is
                waiter.wake.notify()
            else:
                self._free += 1


@dataclass(slots=True)
class _Waiter:
    """A caller of _Slots.acquire waiting for a slot."""

    wake: threading.Condition
    granted: bool = False


@dataclass(slots=True)
class Pending:
    """A statement ReadPool.send sent, its answer not read yet."""

    held: _Held
    statement: str


class _Abandoned(BaseException):
    """Why a sent statement's connection is dropped unread (see in_flight: its statement
    may still run, so it is stopped on its server)."""


def _write_wait(pool: PoolConfig, depth: int) -> str:
    """The session setting of a pipelining connection: a pipelined answer waits in its
    socket while the answers sent before it are read, each up to the read timeout; a large
    one fills the socket and the server waits in its write, which it abandons after
    net_write_timeout (60 s by default, less on some servers) by dropping the connection. So
    the server waits at least as long as the reads ahead of it may take (only while the client
    is alive: a closed connection ends the write at once)."""
    seconds = depth * max(1, pool.read_timeout_s) + 10
    return f"SET SESSION net_write_timeout = GREATEST(@@SESSION.net_write_timeout, {seconds})"


class ReadPool(_Shell):
    """Lean reads on one sync engine (PyMySQL or mysqlclient)."""

    def __init__(
        self, engine: Engine, shard: ShardId, pool: PoolConfig, pipeline_depth: int = 1
    ) -> None:
        """``pipeline_depth``: how many statements a caller may send before it reads this
        one's answer (the router's: its shard count; see _write_wait)."""
        super().__init__(engine, shard, pool)
        self._engine = engine
        self._lock = threading.Lock()
        self._slots = _Slots(pool.size + pool.max_overflow)
        self._mysqldb = engine.url.get_driver_name() == "mysqldb"
        self._write_wait = _write_wait(pool, pipeline_depth) if self._native else None

    def run(
        self, statement: str | tuple[str, ...], params: Mapping[str, Any], lazy: bool = False
    ) -> JobResult:
        """Rows of ``statement`` (several run in order for a tuple); ``lazy`` as Job.lazy."""
        if not self._slots.acquire(timeout=self._pool.timeout_s):
            raise _exhausted(self.shard, self._pool)
        try:
            held = self._checkout()
            try:
                result = self._run(held.conn, statement, params, lazy)
            except BaseException as exc:
                thread_id = _thread_id(held.conn)
                _close(held.conn)
                if in_flight(exc):  # the link gave up on the statement, the server did not
                    stop_statement_in_thread(self._engine, self.shard, self._pool, thread_id)
                raise
            now = time.monotonic()
            with self._lock:
                kept = self._idle.give(held, now)
            if not kept:
                _close(held.conn)
            return result
        finally:
            self._slots.release()

    @property
    def pipelines(self) -> bool:
        """Whether ``send``/``receive`` work here (PyMySQL: the statement is sent by this
        module, so its answer can be read later)."""
        return self._native

    def send(self, statement: str, params: Mapping[str, Any]) -> Pending | None:
        """Send ``statement`` on a free connection and return at once; None (nothing
        sent, nothing held) when no connection is free now: the caller runs it with run()
        instead, so a caller holding connections of other pools never also waits for one
        (two fan-outs waiting for each other's connections). Answer with ``receive``, or
        give it up with ``abandon``. PyMySQL only (``pipelines``)."""
        if not self._slots.try_acquire():
            return None
        try:
            held = self._checkout()
        except BaseException:
            self._slots.release()
            raise
        try:
            log_statement(self.shard, statement, params)
            sql, args = self._statements.bind(statement, params, self.shard)
            try:
                _send(held.conn, sql, args)
            except KeyError as exc:  # a pyformat statement names a parameter params lack
                raise _missing(exc, params, self.shard) from None
        except BaseException as exc:
            self._fail(held, exc, statement)
        return Pending(held, statement)

    def receive(self, pending: Pending, lazy: bool = False) -> JobResult:
        """The answer to a ``send``; the connection goes back to the pool (or is dropped
        after an error, its statement stopped on its server if it may still run)."""
        held = pending.held
        try:
            found = _eager(_read_lazy(held.conn), lazy)
        except BaseException as exc:
            self._fail(held, exc, pending.statement)
        now = time.monotonic()
        with self._lock:
            kept = self._idle.give(held, now)
        if not kept:
            _close(held.conn)
        self._slots.release()
        return found

    def abandon(self, pending: Pending) -> None:
        """Give up a ``send`` whose answer will not be read: the connection is dropped and
        its statement stopped on its server (it may still be computing)."""
        self._drop(pending.held, _Abandoned())

    def _fail(self, held: _Held, exc: BaseException, statement: str) -> NoReturn:
        error = classify(exc, self.shard, statement) if isinstance(exc, self._errors) else exc
        self._drop(held, error)
        if error is exc:
            raise exc
        raise error from exc

    def _drop(self, held: _Held, exc: BaseException) -> None:
        thread_id = _thread_id(held.conn)
        _close(held.conn)
        self._slots.release()
        if in_flight(exc):
            stop_statement_in_thread(self._engine, self.shard, self._pool, thread_id)

    def _checkout(self) -> _Held:
        now = time.monotonic()
        with self._lock:
            held, expired = self._idle.take(now)
        for old in expired:
            _close(old.conn)
        if held is not None and self._ping and now - held.used > IDLE_CHECK_S:
            try:
                held.conn.ping() if self._mysqldb else held.conn.ping(False)
            except self._errors:
                _close(held.conn)
                held = None
        if held is None:
            try:
                conn = self._dialect.connect(*self._cargs, **self._cparams)
                conn.autocommit(True)
                if self._write_wait is not None:
                    conn.query(self._write_wait)
            except self._errors as exc:
                raise classify(exc, self.shard) from exc
            held = _Held(conn, now, now)
        return held

    def _run(
        self, conn: Any, statement: str | tuple[str, ...], params: Mapping[str, Any], lazy: bool
    ) -> JobResult:
        if isinstance(statement, tuple):
            parts = tuple(self._run(conn, sql, params, lazy) for sql in statement)
            return JobResult((), [], sum(p.rowcount for p in parts), parts)
        log_statement(self.shard, statement, params)
        sql, args = self._statements.bind(statement, params, self.shard)
        try:
            if self._native:
                return _eager(_query_lazy(conn, sql, args), lazy)
            cursor = conn.cursor()
            try:
                cursor.execute(sql, args)
                found = _result(cursor.description, cursor.fetchall(), cursor.rowcount)
                return found.flagged(cursor)
            finally:
                cursor.close()
        except self._errors as exc:
            raise classify(exc, self.shard, statement) from exc
        except KeyError as exc:  # a pyformat statement names a parameter params lack
            raise _missing(exc, params, self.shard) from None

    def close(self) -> None:
        with self._lock:
            idle = self._idle.drain()
        for held in idle:
            _close(held.conn)


class AsyncReadPool(_Shell):
    """Lean reads on one async engine (aiomysql or asyncmy), bound to the running loop."""

    def __init__(self, engine: AsyncEngine, shard: ShardId, pool: PoolConfig) -> None:
        super().__init__(engine, shard, pool)
        self._engine = engine
        self._slots = asyncio.Semaphore(pool.size + pool.max_overflow)

    async def run(
        self, statement: str | tuple[str, ...], params: Mapping[str, Any], lazy: bool = False
    ) -> JobResult:
        """Rows of ``statement`` (several run in order for a tuple); ``lazy`` as Job.lazy."""
        slots = self._slots
        if slots.locked():
            try:
                async with asyncio.timeout(self._pool.timeout_s):
                    await slots.acquire()
            except TimeoutError:
                raise _exhausted(self.shard, self._pool) from None
        else:
            await slots.acquire()  # returns at once: a free slot is taken without a wait
        try:
            held = await self._checkout()
            try:
                result = await self._run(held.conn, statement, params, lazy)
            except BaseException as exc:  # also cancellation: the protocol state is unknown now
                thread_id = _thread_id(held.conn)
                _close(held.conn)
                if not isinstance(exc, Exception):  # cancelled mid-statement: stop it there too
                    await stop_statement(self._engine, self.shard, self._pool, thread_id)
                raise
            if not self._idle.give(held, time.monotonic()):
                _close(held.conn)
            return result
        finally:
            slots.release()

    async def _checkout(self) -> _Held:
        now = time.monotonic()
        held, expired = self._idle.take(now)
        for old in expired:
            _close(old.conn)
        if held is not None and self._ping and now - held.used > IDLE_CHECK_S:
            try:
                await held.conn.ping(False)
            except self._errors:
                _close(held.conn)
                held = None
            except BaseException:
                _close(held.conn)
                raise
        if held is None:
            try:
                # The dialect's connect() is SQLAlchemy's adapter: it awaits inside a greenlet.
                adapted = await greenlet_spawn(self._dialect.connect, *self._cargs, **self._cparams)
                conn = adapted.driver_connection
                await conn.autocommit(True)
            except self._errors as exc:
                raise classify(exc, self.shard) from exc
            held = _Held(conn, now, now)
        return held

    async def _run(
        self, conn: Any, statement: str | tuple[str, ...], params: Mapping[str, Any], lazy: bool
    ) -> JobResult:
        if isinstance(statement, tuple):
            parts = [await self._run(conn, sql, params, lazy) for sql in statement]
            return JobResult((), [], sum(p.rowcount for p in parts), tuple(parts))
        log_statement(self.shard, statement, params)
        sql, args = self._statements.bind(statement, params, self.shard)
        try:
            if self._native:
                return _eager(await _query_lazy_async(conn, sql, args), lazy)
            cursor = conn.cursor()
            if not hasattr(cursor, "execute"):  # aiomysql hands out an awaitable for it
                cursor = await cursor
            try:
                await cursor.execute(sql, args)
                rows = await cursor.fetchall()
                found = _result(cursor.description, rows, cursor.rowcount)
                return found.flagged(cursor)
            finally:
                await cursor.close()
        except self._errors as exc:
            raise classify(exc, self.shard, statement) from exc
        except KeyError as exc:  # a pyformat statement names a parameter params lack
            raise _missing(exc, params, self.shard) from None

    def close(self) -> None:
        for held in self._idle.drain():
            _close(held.conn)


async def stop_statement(
    engine: AsyncEngine, shard: ShardId, pool: PoolConfig, thread_id: int | None
) -> None:
    """Stop the statement a cancelled task left running on connection ``thread_id``: a
    ``KILL QUERY`` from a short-lived connection of its own (made as ``engine``'s, bypassing
    its pool). A dropped connection does not stop its statement: the server notices only when
    it sends the answer, after computing all of it.

    Never raises (a failed kill is logged: the statement then ends by itself) and waits at most
    KILL_WAIT_S: the cancellation goes through then, the kill finishes in the background within
    the shard's connect_timeout_s + query_timeout_s. Killing a statement that has ended is
    harmless (a thread id is not reused soon; a thread gone answers "unknown thread")."""
    if thread_id is None:
        return

    async def killed() -> None:
        log_statement(shard, f"KILL QUERY {thread_id}", None)
        try:
            async with asyncio.timeout(pool.connect_timeout_s + pool.query_timeout_s):
                # In a greenlet: the dialect's adapter awaits the async driver inside.
                await greenlet_spawn(_kill, engine, pool, thread_id)
        except Exception as exc:  # best effort: the statement ends by itself, later
            log.warning("shard %s: a cancelled statement was not stopped: %r", shard, exc)

    task = asyncio.get_running_loop().create_task(killed())
    _stopping.add(task)
    task.add_done_callback(_stopping.discard)
    await asyncio.wait((task,), timeout=KILL_WAIT_S)


def stop_statement_in_thread(
    engine: Engine, shard: ShardId, pool: PoolConfig, thread_id: int | None
) -> None:
    """The sync twin of stop_statement, for a statement whose answer did not come within
    query_timeout_s (the driver's read timeout gave up on it, the server did not): the kill
    runs on a daemon thread, bounded by the driver's connect and read timeouts; the caller,
    who already waited query_timeout_s, does not wait for it. Never raises."""
    if thread_id is None:
        return

    def killed() -> None:
        log_statement(shard, f"KILL QUERY {thread_id}", None)
        try:
            _kill(engine, pool, thread_id)
        except Exception as exc:  # best effort: the statement ends by itself, later
            log.warning("shard %s: a timed-out statement was not stopped: %r", shard, exc)

    with contextlib.suppress(Exception):  # no thread to be had: the statement ends by itself
        threading.Thread(target=killed, name="shardrouter-kill", daemon=True).start()


def _kill(engine: Engine | AsyncEngine, pool: PoolConfig, thread_id: int) -> None:
    """KILL QUERY ``thread_id`` on a connection of its own, made as ``engine``'s (its URL, its
    connect arguments and timeouts), bypassing its pool; closed after."""
    cargs, cparams = _connect_arguments(engine, pool)
    conn = engine.dialect.connect(*cargs, **cparams)
    try:
        cursor = conn.cursor()
        cursor.execute(f"KILL QUERY {int(thread_id)}")
        cursor.close()
    except engine.dialect.loaded_dbapi.Error as exc:
        if getattr(exc, "args", (None,))[:1] != (_NO_SUCH_THREAD,):
            raise  # else: the session is gone already, and its statement with it
    finally:
        conn.close()


def in_flight(exc: BaseException) -> bool:
    """Whether a statement that raised ``exc`` may still run on its server: the link to it
    failed (a read timeout, a lost connection: ShardUnavailableError) or the caller was
    interrupted, rather than the server answering with an error."""
    return isinstance(exc, ShardUnavailableError) or not isinstance(exc, Exception)


def _thread_id(conn: Any) -> int | None:
    """The server's id of a driver connection's session (the handshake's), or None."""
    with contextlib.suppress(Exception):
        return int(conn.thread_id())
    return None


def _missing(exc: KeyError, params: Mapping[str, Any], shard: ShardId) -> ExecutionError:
    return ExecutionError(
        f"shard {shard}: the statement has a parameter :{exc.args[0]} and params give"
        f" no value for it (given: {', '.join(sorted(params)) or 'none'})",
        shard=shard,
    )


def _eager(result: JobResult, lazy: bool) -> JobResult:
    """Decode every row now unless the caller takes LazyRows."""
    if lazy or isinstance(result.rows, list):
        return result
    return replace(result, rows=list(result.rows))  # the ENUM/SET flags kept


def _result(description: Any, rows: Sequence[Any], rowcount: int) -> JobResult:
    """A JobResult from a DBAPI description and rows (LazyRows kept as they are)."""
    if description is None:
        return JobResult((), [], rowcount)
    kept = rows if isinstance(rows, LazyRows) else list(rows)
    floats, rounded = float_columns(description)
    names = tuple(d[0] for d in description)
    return JobResult(names, kept, len(kept), floats=floats, rounded=rounded)


def _close(conn: Any) -> None:
    """Close a driver connection without a round trip and without raising."""
    with contextlib.suppress(Exception):  # a connection being dropped may already be broken
        conn.close()


__all__ = [
    "ASYNC_DRIVERS",
    "IDLE_CHECK_S",
    "SYNC_DRIVERS",
    "AsyncReadPool",
    "ReadPool",
    "stop_statement",
    "stop_statement_in_thread",
    "supported",
]
