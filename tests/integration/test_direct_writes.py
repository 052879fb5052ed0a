"""engine.direct: str statements on an SQLAlchemy connection's DBAPI connection (the write hot
path) give what SQLAlchemy's execution gives, and fail as it fails: same rows, columns,
rowcounts and ENUM flags; a killed or interrupted connection invalidated, never back in the
pool; a missing parameter or a server error leaves the connection and its transaction usable.
Both sync MySQL drivers, real MariaDB."""

from __future__ import annotations

import datetime as dt
import decimal
import signal
from collections.abc import Iterator
from typing import Any

import pytest
from shard_tables import create_tables, with_driver
from sqlalchemy import Connection, Engine, create_engine, event, text
from sqlalchemy.exc import DBAPIError

from shardrouter.core.topology import Topology
from shardrouter.engine import direct
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, ShardUnavailableError, TransactionAbortedError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

DRIVERS = ("pymysql", "mysqldb")
TABLE = (
    "CREATE TABLE IF NOT EXISTS dw_t (id BIGINT PRIMARY KEY, e ENUM('b','a') NULL,"
    " d DECIMAL(10,3) NULL, t DATETIME(3) NULL, s VARCHAR(20) NULL, b VARBINARY(8) NULL,"
    " n INT NULL)"
)
ROW = {
    "id": 1,
    "e": "a",
    "d": decimal.Decimal("12.345"),
    "t": dt.datetime(2026, 12, 1, 8, 30, 1, 123000),
    "s": "50% off 'quoted'",
    "b": b"\x00\xff%s",
    "n": None,
}
STATEMENTS = [
    (
        "INSERT INTO dw_t (id, e, d, t, s, b, n) VALUES (:id, :e, :d, :t, :s, :b, :n)",
        ROW,
    ),
    ("UPDATE dw_t SET n = 7 WHERE id = :id", {"id": 1}),
    ("UPDATE dw_t SET n = 7 WHERE id = :id", {"id": 1}),  # matched, unchanged: FOUND_ROWS
    ("UPDATE dw_t SET n = 8 WHERE id = :id", {"id": 99}),  # nothing matched
    ("SELECT id, e, d, t, s, b, n FROM dw_t WHERE s LIKE '50%' ORDER BY id", {}),
    ("SELECT e, COUNT(*) AS c, SUM(d) FROM dw_t WHERE id >= :lo GROUP BY e", {"lo": 0}),
    ("SELECT id, id FROM dw_t WHERE id = :id", {"id": 1}),  # duplicate column names kept
    ("DELETE FROM dw_t WHERE id = :id", {"id": 1}),
]


@pytest.fixture(scope="module", params=DRIVERS)
def engine(request: pytest.FixtureRequest, shard_databases: Any) -> Iterator[Engine]:
    topology = with_driver(Topology.load(shard_databases), request.param)
    url = next(iter(topology.shards.values())).primary
    made = create_engine(url.render_as_string(hide_password=False))
    with made.begin() as conn:
        conn.execute(text(TABLE))
    try:
        yield made
    finally:
        with made.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS dw_t"))
        made.dispose()


def _sqlalchemy(conn: Connection, sql: str, params: dict[str, Any]) -> Any:
    from shardrouter.sql.execution import JobResult

    return JobResult.of(conn.execute(text(sql), params))


def test_direct_gives_sqlalchemys_answer(engine: Engine) -> None:
    """Every statement twice in one transaction, once each way (undone in between by a
    savepoint), and the JobResults equal: columns, rows (typed values), rowcount, ENUM flags."""
    with engine.connect() as conn:
        statements = direct.direct_for(conn)
        assert statements is not None, "a sync MySQL driver takes the direct path"
        conn.begin()
        for sql, params in STATEMENTS:
            point = conn.begin_nested()
            expected = _sqlalchemy(conn, sql, params)
            point.rollback()
            got = direct.execute(conn, statements, sql, params, "s0")
            assert got == expected, sql
        conn.rollback()
    # what the answers were (so equal-but-empty cannot pass): the SELECTs saw the row
    with engine.connect() as conn:
        statements = direct.direct_for(conn)
        assert statements is not None
        conn.begin()
        direct.execute(conn, statements, STATEMENTS[0][0], ROW, "s0")
        found = direct.execute(conn, statements, STATEMENTS[4][0], {}, "s0")
        assert found.rows == [tuple(ROW.values())]
        assert found.index_ordered == frozenset({1})  # the ENUM column
        conn.rollback()


def test_a_listener_means_sqlalchemys_path(engine: Engine) -> None:
    """Tracing and tests listen to execution events: a listened-to engine keeps SQLAlchemy's
    path, so they see every statement."""
    seen: list[str] = []

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    listened = create_engine(engine.url)  # the module's engine stays unlistened
    try:
        with listened.connect() as conn:
            assert direct.direct_for(conn) is not None
            event.listen(listened, "before_cursor_execute", hook)
            try:
                assert direct.direct_for(conn) is None  # checked per statement
                conn.execute(text("SELECT 1"))
                assert seen == ["SELECT 1"]
            finally:
                event.remove(listened, "before_cursor_execute", hook)
    finally:
        listened.dispose()


def test_other_drivers_take_sqlalchemys_path() -> None:
    sqlite = create_engine("sqlite://")
    try:
        with sqlite.connect() as conn:
            assert direct.direct_for(conn) is None
    finally:
        sqlite.dispose()


def test_missing_parameter_names_it_and_keeps_the_transaction(engine: Engine) -> None:
    with engine.connect() as conn:
        statements = direct.direct_for(conn)
        assert statements is not None
        conn.begin()
        direct.execute(conn, statements, STATEMENTS[0][0], ROW, "s0")
        with pytest.raises(ExecutionError, match=r":id .*given: lo"):
            direct.execute(conn, statements, "SELECT n FROM dw_t WHERE id = :id", {"lo": 1}, "s0")
        assert not conn.invalidated
        rows = direct.execute(conn, statements, "SELECT id FROM dw_t", {}, "s0").rows
        assert rows == [(1,)]  # the transaction's own row: still in it
        conn.rollback()


def test_server_error_keeps_the_connection_and_transaction(engine: Engine) -> None:
    with engine.connect() as conn:
        statements = direct.direct_for(conn)
        assert statements is not None
        conn.begin()
        direct.execute(conn, statements, STATEMENTS[0][0], ROW, "s0")
        with pytest.raises(DBAPIError) as caught:
            direct.execute(conn, statements, STATEMENTS[0][0], ROW, "s0")
        assert caught.value.orig is not None and caught.value.orig.args[0] == 1062
        assert not caught.value.connection_invalidated and not conn.invalidated
        assert direct.execute(conn, statements, "SELECT id FROM dw_t", {}, "s0").rows == [(1,)]
        conn.rollback()
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM dw_t")).scalar() == 0


def _thread(conn: Connection) -> int:
    """The server's id of the connection's session (the handshake's: no statement run)."""
    dbapi = conn.connection.dbapi_connection
    assert dbapi is not None
    return int(dbapi.thread_id())


def test_killed_connection_is_invalidated_not_pooled(engine: Engine) -> None:
    with engine.connect() as conn:
        statements = direct.direct_for(conn)
        assert statements is not None
        victim = _thread(conn)
        conn.begin()
        direct.execute(conn, statements, STATEMENTS[0][0], ROW, "s0")
        with engine.connect() as killer:
            killer.exec_driver_sql(f"KILL {victim}")
        with pytest.raises(DBAPIError) as caught:
            direct.execute(conn, statements, "SELECT id FROM dw_t", {}, "s0")
        assert caught.value.connection_invalidated and conn.invalidated
    with engine.connect() as conn:  # the pool hands out a live, other connection
        assert _thread(conn) != victim
        assert conn.execute(text("SELECT COUNT(*) FROM dw_t")).scalar() == 0  # rolled back


class _Interrupt(BaseException):
    """What a signal handler, GreenletExit or KeyboardInterrupt raise mid-statement."""


def test_interrupted_statement_invalidates_the_connection(engine: Engine) -> None:
    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupt()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with engine.connect() as conn:
            statements = direct.direct_for(conn)
            assert statements is not None
            victim = _thread(conn)
            signal.setitimer(signal.ITIMER_REAL, 0.3)
            with pytest.raises(_Interrupt):
                direct.execute(conn, statements, "SELECT SLEEP(3)", {}, "s0")
            signal.setitimer(signal.ITIMER_REAL, 0)
            assert conn.invalidated  # its protocol state is unknown: never reused
        with engine.connect() as conn:
            assert _thread(conn) != victim
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


ORDERS = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, amount_cents BIGINT, KEY (user_id))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT, order_id BIGINT,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
}
INSERT = "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, :m, :a)"


@pytest.mark.parametrize("driver", DRIVERS)
def test_router_writes_take_it_and_a_killed_branch_aborts(
    shard_databases: Any, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    """The router's transaction statements and single writes run on the direct path (counted),
    and a transaction whose connection is killed between two statements is aborted: its first
    write is not committed, and the next transaction gets a live connection."""
    calls: list[str] = []
    real = direct.execute

    def counted(conn: Connection, statements: Any, sql: str, *args: Any) -> Any:
        calls.append(sql.split()[0])
        return real(conn, statements, sql, *args)

    monkeypatch.setattr(direct, "execute", counted)
    router = Router(with_driver(Topology.load(shard_databases), driver))
    try:
        create_tables(router, ORDERS)
        ids = router.topology.id_generator("orders")
        first, second = ids.next_id(user_id=42), ids.next_id(user_id=42)
        with router.transaction() as txn:
            txn.execute(INSERT, {"o": first, "u": 42, "m": 7, "a": 100})
            txn.execute("UPDATE orders SET amount_cents = 5 WHERE order_id = :o", {"o": first})
        assert calls == ["INSERT", "UPDATE"]
        done = router.execute("DELETE FROM orders WHERE order_id = :o", {"o": first})
        assert done.rowcount == 1 and calls[-1] == "DELETE"

        aborted = (ShardUnavailableError, TransactionAbortedError)
        with pytest.raises(aborted), router.transaction() as txn:
            txn.execute(INSERT, {"o": second, "u": 42, "m": 7, "a": 100})
            (branch,) = txn._branches.values()
            victim = _thread(branch)
            engine = router.engines.primary(txn.shards[0])
            with engine.connect() as killer:
                killer.exec_driver_sql(f"KILL {victim}")
            txn.execute("UPDATE orders SET amount_cents = 6 WHERE order_id = :o", {"o": second})
        found = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": 42})
        assert found.rows == []  # the killed transaction's insert was not committed
        with router.transaction() as txn:  # a live connection, not the killed one
            txn.execute(INSERT, {"o": second, "u": 42, "m": 7, "a": 100})
            (branch,) = txn._branches.values()
            assert _thread(branch) != victim
        found = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": 42})
        assert found.rows == [(second,)]
    finally:
        router.close()
