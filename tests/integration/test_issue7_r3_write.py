"""Issue 7, round 3 of the write path on real MariaDB shards: multi-shard writes of the same
rows in both routers (one lock order, no cross-shard deadlock), lock conflicts typed by error
number, a broken transaction that wrote refuses its commit, and servers without
INSERT/DELETE ... RETURNING (MySQL, MariaDB < 10.5) refused by name before anything runs."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import yaml
from shard_tables import create_tables
from sqlalchemy import text
from sqlalchemy.dialects.mysql import pymysql as mysql_pymysql
from sqlalchemy.exc import OperationalError

from shardrouter.core.config import config_from_dict
from shardrouter.core.strategies import LookupStrategy
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.engines import classify
from shardrouter.engine.router import Router
from shardrouter.errors import (
    LockConflictError,
    ShardRouterError,
    TransactionAbortedError,
    UnsupportedQueryError,
)
from shardrouter.sql.execution import lookup_insert, require_returning
from shardrouter.types import ShardId

pytestmark = pytest.mark.mariadb

DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'new',"
    " amount_cents BIGINT NOT NULL, KEY (user_id))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
}
INSERT_ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, :m, :a)"
)
UPDATE_BOTH = "UPDATE orders SET amount_cents = amount_cents + 1 WHERE user_id IN (:a, :b)"


def _short_timeouts(path: Any) -> Topology:
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        # Concurrent writers wait for each other's locks (1 s) below the answer timeout (async
        # 1.5 s, sync reads 2 s): a lock wait needs a whole second below it (PoolConfig).
        shard["pool"] = {
            "connect_timeout_s": 2,
            "timeout_s": 3,
            "query_timeout_s": 1.5,
            "lock_wait_timeout_s": 1,
        }
    return Topology(config_from_dict(raw))


@pytest.fixture(scope="module")
def world(shard_databases: Any) -> Iterator[dict[str, Any]]:
    topology = _short_timeouts(shard_databases)
    router = Router(topology, max_fanout=None)
    create_tables(router, DDL)
    shard_of = topology.shard_for
    a = 4242
    b = next(u for u in range(a + 1, a + 10_000) if shard_of("orders", u) != shard_of("orders", a))
    ids = topology.id_generator("orders", worker_id=23)
    for user in (a, b):
        for _ in range(3):
            router.execute(
                INSERT_ORDER, {"o": ids.next_id(user_id=user), "u": user, "m": 3, "a": 100}
            )
    yield {"router": router, "topology": topology, "a": a, "b": b}
    router.close()


def _total(router: Router, a: int, b: int) -> int:
    sql = "SELECT SUM(amount_cents) FROM orders WHERE user_id IN (:a, :b)"
    return int(router.execute(sql, {"a": a, "b": b}).scalar())


@pytest.mark.timeout(200)
def test_sync_multi_shard_updates_of_the_same_rows_all_apply(world: dict[str, Any]) -> None:
    """Two threads, each 10 x the same two-shard UPDATE: every one succeeds, every one counts
    (before: parts in parallel, each statement won one shard's lock and waited for the
    other's commit until the query timeout: ShardUnavailableError on both)."""
    router: Router = world["router"]
    a, b = world["a"], world["b"]
    before = _total(router, a, b)
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def go() -> None:
        barrier.wait()
        for _ in range(10):
            try:
                router.execute(UPDATE_BOTH, {"a": a, "b": b})
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=go) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    assert _total(router, a, b) == before + 2 * 10 * 6


@pytest.mark.timeout(200)
def test_async_multi_shard_updates_of_the_same_rows_all_apply(
    world: dict[str, Any], shard_databases: Any
) -> None:
    router: Router = world["router"]
    a, b = world["a"], world["b"]
    before = _total(router, a, b)

    async def run() -> list[Any]:
        async with AsyncRouter(_short_timeouts(shard_databases)) as aio:

            async def writer() -> list[Any]:
                out = []
                for _ in range(10):
                    try:
                        await aio.execute(UPDATE_BOTH, {"a": a, "b": b})
                    except ShardRouterError as exc:
                        out.append(exc)
                return out

            first, second = await asyncio.gather(writer(), writer())
            return first + second

    errors = asyncio.run(asyncio.wait_for(run(), 150))
    assert errors == []
    assert _total(router, a, b) == before + 2 * 10 * 6


def _driver_error(errno: int) -> OperationalError:
    orig = pymysql.err.OperationalError(errno, "held by another transaction")
    return OperationalError("UPDATE orders ...", {}, orig)


@pytest.mark.parametrize("errno", [1205, 1213])
def test_lock_wait_timeout_and_deadlock_are_typed_retryable(errno: int) -> None:
    error = classify(_driver_error(errno), ShardId("s1"))
    assert isinstance(error, LockConflictError) and error.shard == "s1"
    assert str(errno) in str(error) and "retry" in str(error)


@pytest.mark.timeout(60)
def test_a_real_lock_wait_timeout_is_a_lock_conflict(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """A row held by another transaction past innodb_lock_wait_timeout: LockConflictError
    (classified by the server's 1205), not ShardUnavailableError. (Default timeouts here: the
    world's 1 s read timeout would race the 1 s lock wait.)"""
    router = Router(Topology.load(shard_databases))
    a = world["a"]
    shard = router.topology.shard_for("orders", a)
    physical = router.topology.table("orders").physical(router.topology.slot_for("orders", a))
    engine = router.engines.primary(shard)
    with engine.connect() as holder, engine.connect() as waiter:
        holder.begin()
        holder.execute(text(f"SELECT * FROM {physical} WHERE user_id = :u FOR UPDATE"), {"u": a})
        waiter.begin()
        waiter.execute(text("SET SESSION innodb_lock_wait_timeout = 1"))
        with pytest.raises(LockConflictError):
            try:
                waiter.execute(
                    text(f"UPDATE {physical} SET amount_cents = 1 WHERE user_id = :u"), {"u": a}
                )
            except OperationalError as exc:
                raise classify(exc, shard) from exc
        waiter.rollback()
        holder.rollback()
    router.close()


@pytest.mark.timeout(60)
def test_broken_transaction_that_wrote_refuses_its_commit(world: dict[str, Any]) -> None:
    """A write, then a statement that times out: the connection is gone and the server rolled
    the write back. Going on is refused typed, and so is the commit (it would report a write
    that did not happen); a read-only transaction ends quietly (see the review tests)."""
    router: Router = world["router"]
    a = world["a"]
    before = _total(router, a, world["b"])
    with pytest.raises(TransactionAbortedError), router.transaction() as txn:
        txn.execute(
            "UPDATE orders SET amount_cents = amount_cents + 1 WHERE user_id = :u", {"u": a}
        )
        with contextlib.suppress(ShardRouterError):
            txn.execute("SELECT SLEEP(3) FROM orders WHERE user_id = :u LIMIT 1", {"u": a})
        with pytest.raises(TransactionAbortedError):
            txn.execute("SELECT amount_cents FROM orders WHERE user_id = :u", {"u": a})
    assert _total(router, a, world["b"]) == before


@pytest.mark.timeout(60)
def test_async_broken_transaction_that_wrote_refuses_its_commit(
    world: dict[str, Any], shard_databases: Any
) -> None:
    router: Router = world["router"]
    a = world["a"]
    before = _total(router, a, world["b"])

    async def run() -> None:
        async with AsyncRouter(_short_timeouts(shard_databases)) as aio:
            with pytest.raises(TransactionAbortedError):
                async with aio.transaction() as txn:
                    await txn.execute(
                        "UPDATE orders SET amount_cents = amount_cents + 1 WHERE user_id = :u",
                        {"u": a},
                    )
                    with contextlib.suppress(ShardRouterError):
                        await txn.execute(
                            "SELECT SLEEP(3) FROM orders WHERE user_id = :u LIMIT 1", {"u": a}
                        )
                    with pytest.raises(TransactionAbortedError):
                        await txn.execute(
                            "SELECT amount_cents FROM orders WHERE user_id = :u", {"u": a}
                        )

    asyncio.run(asyncio.wait_for(run(), 40))
    assert _total(router, a, world["b"]) == before


# -- servers without RETURNING ---------------------------------------------------------------


def _dialect(mariadb: bool, version: tuple[int, ...]) -> Any:
    dialect = mysql_pymysql.dialect()
    dialect.is_mariadb = mariadb
    dialect.server_version_info = version
    return dialect


def test_mysql_and_old_mariadb_are_refused_by_name_before_compiling(shard_databases: Any) -> None:
    """The check the runners make on a RETURNING job's connection (the dialect knows its
    server once connected): MySQL and MariaDB < 10.5 refused, naming the requirement."""
    mysql8 = _dialect(False, (8, 0, 36))
    strategy = Topology.load(shard_databases).table("users").keys["email"].strategy
    assert isinstance(strategy, LookupStrategy)
    stmt = lookup_insert(strategy, "user_emails", "mysql", [{"email": "a@x", "user_id": 1}])
    assert stmt._returning  # the statement the lookup write path sends uses RETURNING
    with pytest.raises(UnsupportedQueryError, match=r"MariaDB >= 10\.5") as info:
        require_returning(mysql8, ShardId("s1"))
    assert "MySQL 8.0.36" in str(info.value)
    with pytest.raises(UnsupportedQueryError, match=r"MariaDB >= 10\.5"):
        require_returning(_dialect(True, (10, 4, 32)), ShardId("s1"))
    require_returning(_dialect(True, (10, 11, 6)), ShardId("s1"))  # has it: no error


@pytest.mark.timeout(60)
def test_a_mysql_shard_refuses_the_first_lookup_write_typed(shard_databases: Any) -> None:
    """A router whose shard servers identify as MySQL: the first INSERT of a lookup owner and
    the first DELETE of one are refused by name, before anything is written."""
    with Router(Topology.load(shard_databases)) as router:
        for engine in router.engines.primaries.values():
            with engine.connect():
                pass  # connected once: the dialect knows its server
            engine.dialect.is_mariadb = False  # type: ignore[attr-defined]
        user = 90_001
        with pytest.raises(UnsupportedQueryError, match=r"MariaDB >= 10\.5"):
            router.execute("INSERT INTO users (user_id, email) VALUES (:u, 'm@x')", {"u": user})
        with pytest.raises(UnsupportedQueryError, match=r"MariaDB >= 10\.5"):
            router.execute("DELETE FROM users WHERE user_id = :u", {"u": user})
        shard = router.topology.shard_for("users", user)
        physical = router.topology.table("users").physical(router.topology.slot_for("users", user))
        with router.engines.primary(shard).connect() as conn:
            count = conn.execute(
                text(f"SELECT COUNT(*) FROM {physical} WHERE user_id = :u"), {"u": user}
            )
            assert count.scalar() == 0
