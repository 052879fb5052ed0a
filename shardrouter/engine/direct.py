"""Statements on an SQLAlchemy connection's own DBAPI connection: the write hot path.

A transaction's statements and a single write run on SQLAlchemy connections (the pool, its
pre-ping, ``begin``/``commit``, XA and savepoints all stay SQLAlchemy's). What they do not
need is SQLAlchemy's execution layer for a plain SQL text: the router has parsed, routed and
cached the statement already, and SQLAlchemy then looks the text up in its compiled cache
again, builds an execution context, processes parameters that carry no types, and wraps the
cursor in a Result that the router copies into a JobResult at once. Measured with
``tools/bench_writes.py`` (gevent, 16 greenlets, the 4-shard sandbox): about 25 us of client
CPU per statement, a sixth of a single-row write's whole client cost.

So a ``str`` statement runs as SQLAlchemy would run it, minus that layer:

- compiled once per SQL text by the engine's dialect (``readpool._Statements``: paramstyle,
  ``%`` escaping), so the driver gets exactly the text and arguments SQLAlchemy would give it;
- executed on a cursor of the connection's DBAPI connection, rows fetched, the cursor closed;
- a driver error goes through SQLAlchemy's own handler (``Connection._handle_dbapi_exception``):
  the same DBAPIError, the same invalidation of a disconnected connection (and of its pool's
  older connections), the same invalidation when an interrupt (GreenletExit, KeyboardInterrupt)
  leaves the protocol state unknown. A private method, used on purpose: copying its rules would
  let them drift from SQLAlchemy's; ``tests/integration/test_direct_writes.py`` pins them.

Only for the sync pure-Python and C MySQL drivers (``readpool.SYNC_DRIVERS``), and only while
nobody listens to the engine's execution events: tracing (OpenTelemetry's SQLAlchemy
instrumentation), a test's ``before_cursor_execute`` hook, a ``handle_error`` listener. Those
see every statement as before, on SQLAlchemy's path (``direct_for`` checks per statement, so a
listener added later takes effect at once).
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator, Mapping
from typing import Any

import pymysql.connections as _pymysql_connections
from pymysql.constants import COMMAND
from sqlalchemy import Connection, Engine, text

from ..sql.execution import JobResult, column_flags, float_columns
from ..types import ShardId
from .readpool import SYNC_DRIVERS, _finish, _missing, _Statements

_STATEMENTS: weakref.WeakKeyDictionary[Engine, _Statements | None] = weakref.WeakKeyDictionary()
"""Per engine: its compiled statements, or None when its driver takes SQLAlchemy's path."""


def _statements_of(engine: Engine) -> _Statements | None:
    try:
        return _STATEMENTS[engine]
    except KeyError:
        url = engine.url
        lean = url.get_backend_name() in ("mysql", "mariadb") and url.get_driver_name() in (
            SYNC_DRIVERS
        )
        found = _STATEMENTS[engine] = _Statements(engine.dialect) if lean else None
        return found


def direct_for(conn: Connection) -> _Statements | None:
    """The compiled statements to run ``conn``'s str statements with, or None: SQLAlchemy's
    path (an unsupported driver, or execution events listened to)."""
    # SQLAlchemy checks the connection's, the engine's and (handle_error) the dialect's flag
    # at each event point; a listener on any of them means SQLAlchemy's path.
    if conn._has_events or conn.engine._has_events or conn.dialect._has_events:
        return None
    return _statements_of(conn.engine)


def execute(
    conn: Connection, statements: _Statements, sql: str, params: Mapping[str, Any], shard: ShardId
) -> JobResult:
    """Run ``sql`` with ``params`` on ``conn``'s DBAPI connection (see the module docstring).
    A parameter the statement names and ``params`` lacks: ExecutionError, nothing sent."""
    driver_sql, args = statements.bind(sql, params, shard)
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None  # a Connection in use holds its DBAPI connection
    cursor = None
    try:
        if isinstance(dbapi, _pymysql_connections.Connection):
            # PyMySQL's own cursor.execute() and query(), minus the cursor: its escaping
            # (conn.literal, which readpool's hex literals for bytes are not: a bytes value
            # selected back would come back as bytes), its packet, its result.
            try:
                query = driver_sql % _Literals(dbapi, args)
            except KeyError as missing:  # the driver's % found no value for a name
                raise _missing(missing, params, shard) from None
            # encoded as query() encodes it (bytes literals carry surrogate escapes)
            dbapi._execute_command(
                COMMAND.COM_QUERY, query.encode(dbapi.encoding, "surrogateescape")
            )
            result = _pymysql_connections.MySQLResult(dbapi)
            result.read()
            dbapi._affected_rows = result.affected_rows
            return _finish(dbapi, result)
        cursor = dbapi.cursor()
        try:
            cursor.execute(driver_sql, args)
        except KeyError as missing:  # pyformat: the driver's % found no value for a name
            raise _missing(missing, params, shard) from None
        description = cursor.description
        if description is None:
            return JobResult((), [], cursor.rowcount)
        enums, unsigned = column_flags(cursor)
        rows = [tuple(row) for row in cursor.fetchall()]
        floats, rounded = float_columns(description)
        names = tuple(d[0] for d in description)
        return JobResult(names, rows, len(rows), (), enums, floats, unsigned, rounded)
    except BaseException as exc:
        if isinstance(exc, Exception) and not isinstance(exc, conn.dialect.loaded_dbapi.Error):
            # Ours (a missing parameter, before anything was sent) or the driver's own
            # (TypeError: a value it cannot escape; a decode error): raised as they are, as
            # SQLAlchemy's execute raises them.
            raise
        # The driver's errors and interrupts as SQLAlchemy's execute handles them (wrapping,
        # invalidation). The parameters shown are the statement's own, as SQLAlchemy shows
        # them, not the rest of the caller's mapping.
        conn._handle_dbapi_exception(exc, driver_sql, _named(conn, sql, args), cursor, None)
        raise  # pragma: no cover (for the type checker: the handler always raises)
    finally:
        if cursor is not None:
            with contextlib.suppress(Exception):  # a buffered cursor's close does no I/O
                cursor.close()


class _Literals(Mapping[str, str]):
    """The SQL literal of each parameter a pyformat statement names, made by the PyMySQL
    connection as its cursor makes them (``conn.literal``), on lookup: a caller's mapping may
    hold more than the statement uses."""

    __slots__ = ("_args", "_conn")

    def __init__(self, conn: Any, args: tuple[Any, ...] | Mapping[str, Any]) -> None:
        self._conn = conn
        self._args = args

    def __getitem__(self, key: str) -> str:
        return str(self._conn.literal(self._args[key]))  # type: ignore[call-overload]

    def __iter__(self) -> Iterator[str]:
        return iter(self._args)

    def __len__(self) -> int:
        return len(self._args)


def _named(
    conn: Connection, sql: str, args: tuple[Any, ...] | Mapping[str, Any]
) -> tuple[Any, ...] | dict[str, Any]:
    """The arguments the statement names (positional ones are those already)."""
    if not isinstance(args, Mapping):
        return args
    names = text(sql).compile(dialect=conn.dialect).params  # an error path: not cached
    return {name: args[name] for name in names if name in args}


__all__ = ["direct_for", "execute"]
