"""Review 18: engine.direct (commit b2c4b8d), the write hot path on the SQLAlchemy connection's
DBAPI connection, attacked against SQLAlchemy's own ``conn.execute(text(sql), params)``.

Tests marked FAILS-ON-b2c4b8d reproduce a behaviour the direct path changed; the others pin
what it must keep (they pass). Real MariaDB (the session sandbox), both sync drivers where it
matters. Each comparison runs the same router statement twice: once on the direct path, once
with ``direct.direct_for`` answering None (SQLAlchemy's path, as before the change).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from shard_tables import create_tables, with_driver
from sqlalchemy import Connection, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine import direct
from shardrouter.engine.router import Router
from shardrouter.errors import (
    ExecutionError,
    LockConflictError,
    ShardUnavailableError,
    TransactionAbortedError,
)

pytestmark = [pytest.mark.mariadb]

DRIVERS = ("pymysql", "mysqldb")
DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, amount_cents BIGINT, KEY (user_id))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT, order_id BIGINT,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    # bound to orders (same shard by user_id), no lookup columns: no ledger traffic
    "order_items": "CREATE TABLE {t} (item_id BIGINT PRIMARY KEY, order_id BIGINT NULL,"
    " user_id BIGINT NOT NULL, qty INT NULL, note VARCHAR(50) NULL) DEFAULT CHARSET utf8mb4",
}
ITEM = "INSERT INTO order_items (item_id, order_id, user_id, qty, note) VALUES (:i, :o, :u, :q, :n)"


def _topology(path: Any, driver: str = "pymysql", **pool: Any) -> Topology:
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        shard["pool"] = {"connect_timeout_s": 2, "timeout_s": 3, **pool}
    return with_driver(Topology(config_from_dict(raw)), driver)


@pytest.fixture(scope="module")
def tables(shard_databases: Any) -> Path:
    router = Router(Topology.load(shard_databases))
    try:
        create_tables(router, DDL)
    finally:
        router.close()
    return Path(shard_databases)


@pytest.fixture(params=DRIVERS)
def router(request: pytest.FixtureRequest, tables: Path) -> Iterator[Router]:
    made = Router(_topology(tables, request.param, query_timeout_s=3, lock_wait_timeout_s=1))
    for engine in made.engines.primaries.values():
        with engine.begin() as conn:
            for name in made.topology.table("order_items").physical_names:
                conn.execute(text(f"DELETE FROM {name}"))
    try:
        yield made
    finally:
        made.close()


def _sqlalchemys_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(direct, "direct_for", lambda conn: None)


def _both_ways(monkeypatch: pytest.MonkeyPatch, run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()``'s answer (or its exception's type) on the direct path, then on SQLAlchemy's."""

    def one() -> Any:
        try:
            return run()
        except BaseException as exc:
            return ("raised", type(exc))

    got = one()
    with monkeypatch.context() as patch:
        _sqlalchemys_path(patch)
        expected = one()
    return got, expected


def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


# -- differences from SQLAlchemy's path --------------------------------------------------------


@pytest.mark.timeout(60)
def test_bytes_parameter_read_back_as_sqlalchemy_gives(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS-ON-b2c4b8d (PyMySQL only). readpool._escape writes bytes as a hex literal X'..'
    (a binary string); PyMySQL's cursor, SQLAlchemy's path, writes them as a quoted string in
    the connection's charset. A statement that returns the parameter (a SELECT of it in a
    transaction, RETURNING an expression of it) gives bytes instead of str."""
    router.execute(ITEM, {"i": 1, "o": None, "u": 42, "q": 1, "n": "x"})

    def run() -> Any:
        with router.transaction() as txn:
            return txn.execute(
                "SELECT :v AS v, CONCAT(:v, note) AS c FROM order_items WHERE user_id = :u",
                {"v": b"tag-", "u": 42},
            ).rows

    got, expected = _both_ways(monkeypatch, run)
    assert expected == [("tag-", "tag-x")]
    assert got == expected


@pytest.mark.timeout(60)
def test_unusable_parameter_raises_what_it_raised(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS-ON-b2c4b8d. A value the driver cannot escape (a dict) raised the driver's
    TypeError on SQLAlchemy's path (its handler does not wrap a non-DBAPI error when it has an
    execution context). The direct path calls the handler with context=None, so SQLAlchemy
    wraps it in sqlalchemy.exc.StatementError: a new exception type that is neither the old
    TypeError nor the router's ExecutionError (a caller's ``except TypeError`` stops matching).
    The same for every non-DBAPI error of the driver (mysqlclient's UnicodeEncodeError, ...)."""

    # a value the driver refuses before sending: PyMySQL a dict, mysqlclient a set of ints
    bad: Any = {"a": 1} if router.engines.primary("s0").url.get_driver_name() == "pymysql" else {1}
    ids = iter(range(100, 200))

    def single() -> Any:
        return router.execute(ITEM, {"i": next(ids), "o": None, "u": 42, "q": 1, "n": bad})

    def in_transaction() -> Any:
        with router.transaction() as txn:
            return txn.execute(ITEM, {"i": next(ids), "o": None, "u": 42, "q": 1, "n": bad})

    for run in (single, in_transaction):
        got, expected = _both_ways(monkeypatch, run)
        assert expected == ("raised", TypeError), run.__name__
        assert got == expected, run.__name__


@pytest.mark.timeout(60)
def test_driver_error_names_only_the_statements_parameters(
    router: Router, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FAILS-ON-b2c4b8d (PyMySQL only). SQLAlchemy's DBAPIError message lists the parameters
    it sent: on its path only those the statement names (compiled.construct_params). The
    direct path hands the handler the caller's whole mapping (pyformat: ``args`` is
    ``params``), so a duplicate-key error's cause chain now shows values the statement never
    used: a caller's password-like field ends up in logged tracebacks."""
    params = {"i": 4, "o": None, "u": 42, "q": 1, "n": "x", "password": "hunter2-secret"}
    router.execute(ITEM, params)

    def run() -> str:
        try:
            router.execute(ITEM, params)
        except ExecutionError as exc:
            return " | ".join(str(e) for e in _chain(exc))
        raise AssertionError("the duplicate insert succeeded")

    got, expected = _both_ways(monkeypatch, run)
    assert "1062" in expected and "hunter2-secret" not in expected
    assert "hunter2-secret" not in got


# -- what the direct path keeps (pins; these pass) ---------------------------------------------


@pytest.mark.timeout(60)
def test_duplicate_key_is_an_execution_error_with_1062_in_its_chain(router: Router) -> None:
    from loadtest.order_service import _is_duplicate_key

    router.execute(ITEM, {"i": 5, "o": None, "u": 42, "q": 1, "n": "x"})
    with pytest.raises(ExecutionError) as single:
        router.execute(ITEM, {"i": 5, "o": None, "u": 42, "q": 1, "n": "x"})
    assert not isinstance(single.value, LockConflictError | ShardUnavailableError)
    assert _is_duplicate_key(single.value)
    with router.transaction() as txn:  # a server error keeps the transaction
        txn.execute(ITEM, {"i": 6, "o": None, "u": 42, "q": 1, "n": "x"})
        with pytest.raises(ExecutionError) as inside:
            txn.execute(ITEM, {"i": 5, "o": None, "u": 42, "q": 1, "n": "x"})
        assert _is_duplicate_key(inside.value)
    found = router.execute("SELECT item_id FROM order_items WHERE user_id = 42 ORDER BY item_id")
    assert found.rows == [(5,), (6,)]


def _hold_row(router: Router, user: int, item: int) -> tuple[Connection, Callable[[], None]]:
    """A plain connection holding the row lock of order_items ``item`` (of ``user``)."""
    shard = router.topology.shard_for("order_items", user)
    conn = router.engines.primary(shard).connect()
    conn.begin()
    name = next(
        n
        for n in router.topology.table("order_items").physical_names
        if conn.execute(text(f"SELECT 1 FROM {n} WHERE item_id = :i"), {"i": item}).first()
    )
    conn.execute(text(f"SELECT qty FROM {name} WHERE item_id = :i FOR UPDATE"), {"i": item})

    def release() -> None:
        conn.rollback()
        conn.close()

    return conn, release


@pytest.mark.timeout(60)
def test_lock_wait_timeout_keeps_the_transaction(router: Router) -> None:
    """1205 (innodb_lock_wait_timeout=1 s, below the 3 s read timeout): LockConflictError, the
    statement alone undone, the transaction usable and its earlier write committed."""
    router.execute(ITEM, {"i": 10, "o": None, "u": 42, "q": 1, "n": "held"})
    _, release = _hold_row(router, 42, 10)
    try:
        with router.transaction() as txn:
            txn.execute(ITEM, {"i": 11, "o": None, "u": 42, "q": 1, "n": "mine"})
            with pytest.raises(LockConflictError) as caught:
                txn.execute("UPDATE order_items SET qty = 9 WHERE user_id = 42 AND item_id = 10")
            assert caught.value.orig.args[0] == 1205
            assert txn._broken is None
            txn.execute("UPDATE order_items SET qty = 2 WHERE user_id = 42 AND item_id = 11")
    finally:
        release()
    found = router.execute("SELECT item_id, qty FROM order_items WHERE user_id = 42 ORDER BY 1")
    assert found.rows == [(10, 1), (11, 2)]


@pytest.mark.timeout(90)
def test_deadlock_breaks_the_transaction_and_refuses_its_commit(router: Router) -> None:
    """1213: LockConflictError; the server rolled the transaction back, so the next statement
    is refused (TransactionAbortedError) and so is the commit; nothing of it is committed."""
    for item in (20, 21):
        router.execute(ITEM, {"i": item, "o": None, "u": 42, "q": 0, "n": "x"})
    shard = router.topology.shard_for("order_items", 42)
    engine = router.engines.primary(shard)
    names = router.topology.table("order_items").physical_names
    # the other writer: heavier (it modifies more rows), so InnoDB picks the router's victim
    other = engine.connect()
    other.begin()
    for n in names:
        other.execute(text(f"UPDATE {n} SET qty = qty + 1 WHERE item_id = 21"))
    for k in range(200, 260):
        other.execute(
            text(f"INSERT INTO {names[0]} (item_id, order_id, user_id) VALUES ({k}, NULL, 7)")
        )
    errors: list[BaseException] = []
    try:
        with (
            pytest.raises((LockConflictError, TransactionAbortedError)),
            router.transaction() as txn,
        ):
            txn.execute(ITEM, {"i": 22, "o": None, "u": 42, "q": 0, "n": "mine"})
            txn.execute("UPDATE order_items SET qty = 5 WHERE user_id = 42 AND item_id = 20")

            def blocked() -> None:
                try:
                    for n in names:
                        other.execute(text(f"UPDATE {n} SET qty = 7 WHERE item_id = 20"))
                except BaseException as exc:
                    errors.append(exc)

            thread = threading.Thread(target=blocked)
            thread.start()
            time.sleep(0.5)  # the other writer waits for item 20's lock
            try:
                with pytest.raises(LockConflictError) as caught:
                    txn.execute(
                        "UPDATE order_items SET qty = 6 WHERE user_id = 42 AND item_id = 21"
                    )
                assert caught.value.orig.args[0] == 1213
                assert txn._broken is caught.value
                with pytest.raises(TransactionAbortedError):
                    txn.execute(
                        "UPDATE order_items SET qty = 8 WHERE user_id = 42 AND item_id = 22"
                    )
            finally:
                thread.join(10)
    finally:
        other.rollback()
        other.close()
    assert not errors
    found = router.execute("SELECT item_id, qty FROM order_items WHERE user_id = 42 ORDER BY 1")
    assert found.rows == [(20, 0), (21, 0)]  # item 22 not committed, item 20's update undone


@pytest.mark.timeout(90)
def test_read_timeout_in_a_transaction_stops_the_statement_and_aborts(router: Router) -> None:
    """A statement longer than the read timeout (3 s): ShardUnavailableError, its connection
    invalidated (never pooled again), the statement stopped on its server (KILL QUERY by the
    thread id taken before it ran), and the transaction's commit refused."""
    shard = router.topology.shard_for("order_items", 42)
    engine = router.engines.primary(shard)
    with pytest.raises(ShardUnavailableError), router.transaction() as txn:
        txn.execute(ITEM, {"i": 30, "o": None, "u": 42, "q": 0, "n": "mine"})
        (branch,) = txn._branches.values()
        victim = int(branch.connection.dbapi_connection.thread_id())  # type: ignore[union-attr]
        with pytest.raises(ShardUnavailableError):
            txn.execute("SELECT SLEEP(20) FROM order_items WHERE user_id = 42 AND item_id = 30")
        assert branch.invalidated
        with pytest.raises(TransactionAbortedError):
            txn.execute("UPDATE order_items SET qty = 1 WHERE user_id = 42 AND item_id = 30")
        raise ShardUnavailableError("leave the block as a caller would", shard=shard)
    deadline = time.monotonic() + 5
    with engine.connect() as conn:
        while True:
            running = conn.execute(
                text(
                    "SELECT COUNT(*) FROM information_schema.PROCESSLIST"
                    " WHERE ID = :v AND INFO LIKE '%SLEEP(20)%'"
                ),
                {"v": victim},
            ).scalar()
            if not running or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert not running, "the timed-out statement still runs on its server"
    found = router.execute("SELECT item_id FROM order_items WHERE user_id = 42")
    assert found.rows == []
    with router.transaction() as txn:
        txn.execute(ITEM, {"i": 31, "o": None, "u": 42, "q": 0, "n": "next"})
        (branch,) = txn._branches.values()
        assert int(branch.connection.dbapi_connection.thread_id()) != victim  # type: ignore[union-attr]


@pytest.mark.timeout(60)
def test_commit_after_a_timeout_is_refused(router: Router) -> None:
    """The same timeout, the caller catching it and committing anyway: refused
    (ShardUnavailableError or TransactionAbortedError), the first write not committed."""
    refused = (ShardUnavailableError, TransactionAbortedError)
    with pytest.raises(refused), router.transaction() as txn:
        txn.execute(ITEM, {"i": 40, "o": None, "u": 42, "q": 0, "n": "mine"})
        with contextlib.suppress(ShardUnavailableError):
            txn.execute("SELECT SLEEP(20) FROM order_items WHERE user_id = 42")
    assert router.execute("SELECT item_id FROM order_items WHERE user_id = 42").rows == []


@pytest.mark.timeout(90)
def test_xa_transaction_takes_the_direct_path_and_keeps_its_errors(
    tables: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Router(xa=True): branches on two shards, statements on the direct path, a duplicate
    key in one branch keeps the transaction; both branches commit."""
    calls: list[str] = []
    real = direct.execute

    def counted(conn: Connection, statements: Any, sql: str, *args: Any) -> Any:
        calls.append(sql.split()[0])
        return real(conn, statements, sql, *args)

    monkeypatch.setattr(direct, "execute", counted)
    router = Router(_topology(tables, "pymysql"), xa=True)
    try:
        shard_of = router.topology.shard_for
        other = next(
            u
            for u in range(43, 10_000)
            if shard_of("order_items", u) != shard_of("order_items", 42)
        )
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                for name in router.topology.table("order_items").physical_names:
                    conn.execute(text(f"DELETE FROM {name}"))
        with router.transaction() as txn:
            txn.execute(ITEM, {"i": 50, "o": None, "u": 42, "q": 0, "n": "a"})
            txn.execute(ITEM, {"i": 51, "o": None, "u": other, "q": 0, "n": "b"})
            with pytest.raises(ExecutionError) as dup:
                txn.execute(ITEM, {"i": 50, "o": None, "u": 42, "q": 0, "n": "a"})
            assert dup.value.orig.args[0] == 1062
            assert len(txn.shards) == 2
        assert calls.count("INSERT") == 3
        rows = router.execute(
            "SELECT item_id FROM order_items WHERE user_id IN (:a, :b) ORDER BY item_id",
            {"a": 42, "b": other},
        ).rows
        assert rows == [(50,), (51,)]
    finally:
        router.close()


ORDER = "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, :m, :a)"


@pytest.mark.timeout(60)
def test_settle_still_runs_when_lookup_rows_were_written(router: Router) -> None:
    """Transaction._finish now settles only when LookupLedger.pending: a rolled-back order
    insert (it wrote its merchant_orders lookup row outside the transaction) still has that
    row removed; a committed one keeps it; a transaction without lookups releases its
    snapshot (the router closes cleanly afterwards)."""
    ids = router.topology.id_generator("orders")
    kept, dropped = ids.next_id(user_id=42), ids.next_id(user_id=42)
    merchant = 9_000_001
    with pytest.raises(RuntimeError), router.transaction() as txn:
        txn.execute(ORDER, {"o": dropped, "u": 42, "m": merchant, "a": 1})
        assert txn._ledger.pending
        raise RuntimeError("roll it back")
    with router.transaction() as txn:
        txn.execute(ORDER, {"o": kept, "u": 42, "m": merchant, "a": 1})
    with router.transaction() as txn:  # no lookup rows: nothing pending, nothing settled
        txn.execute(ITEM, {"i": 60, "o": None, "u": 42, "q": 0, "n": "x"})
        assert not txn._ledger.pending
    rows = router.execute(
        "SELECT order_id FROM merchant_orders WHERE merchant_id = :m", {"m": merchant}
    ).rows
    assert rows == [(kept,)]
    router.execute("DELETE FROM orders WHERE order_id = :o", {"o": kept})
