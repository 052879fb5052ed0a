"""Issue 7 round 4: a statement that runs as several parts inside a transaction is atomic
(finding 3), and a cancelled async scatter read stops on the shards (finding 8); on real
MariaDB shards (reproductions from the third review, tests/integration/test_issue7_review3.py
of branch wip/review3, imports fixed for the package layout)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError, ShardUnavailableError, TransactionAbortedError
from shardrouter.ops.lookups import check_lookups
from tests.integration import test_issue7_review as _review
from tests.integration.shard_tables import with_driver

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

INSERT_ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
    " VALUES (:o, :u, :m, 1, 'new')"
)


def _orphans(router: Router) -> dict[str, list[Any]]:
    return {
        r.lookup_table: [list(o) for o in r.orphans] for r in check_lookups(router) if r.orphans
    }


# -- a cancelled scatter read keeps running on every shard ---------------------------------------


def test_cancelled_scatter_read_does_not_keep_running_on_the_shards(
    world: dict[str, Any],
) -> None:
    """asyncio.wait_for cancels a slow scatter read after 0.3 s: the router drops its
    connections (readpool: "dropped ... when a wait for them is cancelled") but never stops
    the statements, so every shard keeps computing the abandoned read for seconds (until it
    tries to send the rows). A caller that times out and retries piles such reads up on every
    shard. One database's client can KILL QUERY its statement; the router should, for every
    shard it cancelled."""
    router: Router = world["router"]
    codes = [chr(97 + i // 26) + chr(97 + i % 26) for i in range(100)]
    for code in codes:
        router.execute("INSERT INTO countries (code, name) VALUES (:c, 'r3')", {"c": code})
    slow = (
        "SELECT COUNT(*) AS r3_slow FROM orders o JOIN countries a JOIN countries b"
        " JOIN countries c"
    )

    async def cancelled() -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(world["aio"].execute(slow), 0.3)

    try:
        world["loop"].run_until_complete(cancelled())
        time.sleep(0.5)
        running = {}
        for shard, engine in router.engines.primaries.items():
            with engine.connect() as conn:
                running[shard] = conn.exec_driver_sql(
                    "SELECT COUNT(*) FROM information_schema.processlist"
                    " WHERE info LIKE '%%r3_slow%%' AND id <> CONNECTION_ID()"
                ).scalar()
        assert not any(running.values()), running
    finally:
        time.sleep(4)  # let the abandoned reads end before the rows they read go
        router.execute("DELETE FROM countries WHERE name = 'r3'")


def _running(router: Router, marker: str) -> dict[str, int]:
    """Statements containing ``marker`` running on each shard (other than the asking one)."""
    running = {}
    for shard, engine in router.engines.primaries.items():
        with engine.connect() as conn:
            running[shard] = conn.exec_driver_sql(
                "SELECT COUNT(*) FROM information_schema.processlist"
                f" WHERE info LIKE '%%{marker}%%' AND id <> CONNECTION_ID()"
            ).scalar()
    return running


def _two_shards_users(world: dict[str, Any]) -> dict[str, int]:
    """Two existing users on two different shards."""
    router: Router = world["router"]
    users = [u["user_id"] for u in world["data"]["users"]]
    first = users[0]
    home = router.route_key(user_id=first)[0]
    other = next(u for u in users if router.route_key(user_id=u)[0] != home)
    return {"a": first, "b": other}


def _short_timeout_topology(path: Any, query_timeout_s: float) -> Topology:
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        shard["pool"] = {
            "connect_timeout_s": 2,
            "timeout_s": 3,
            "query_timeout_s": query_timeout_s,
            "lock_wait_timeout_s": 0,  # no whole second fits below 1 s (PoolConfig)
        }
    return Topology(config_from_dict(raw))


SLOW = (
    "SELECT COUNT(*) AS {marker} FROM orders o JOIN countries a JOIN countries b JOIN countries c"
)


@pytest.fixture()
def slow_join(world: dict[str, Any]) -> Iterator[None]:
    """100 countries: SLOW runs for seconds on every shard."""
    router: Router = world["router"]
    for n in range(100):
        router.execute("INSERT INTO countries (code, name) VALUES (:c, 'r4')", {"c": f"{n:02d}"})
    try:
        yield
    finally:
        router.execute("DELETE FROM countries WHERE name = 'r4'")


@pytest.mark.timeout(60)
def test_a_scatter_read_past_query_timeout_is_stopped_on_the_shards(
    world: dict[str, Any], shard_databases: Any, slow_join: None
) -> None:
    """query_timeout_s cancels the read (ShardUnavailableError); the shards stop it too."""
    topology = _short_timeout_topology(shard_databases, 1)

    async def timed_out() -> None:
        async with AsyncRouter(topology, max_fanout=None) as aio:
            with pytest.raises(ShardUnavailableError):
                await aio.execute(SLOW.format(marker="r4_timed_out"))

    world["loop"].run_until_complete(timed_out())
    time.sleep(0.3)
    assert not any(_running(world["router"], "r4_timed_out").values())


@pytest.mark.timeout(60)
def test_a_cancelled_read_on_the_sqlalchemy_path_is_stopped_and_its_connection_dropped(
    world: dict[str, Any], shard_databases: Any, slow_join: None
) -> None:
    """Reads the lean pool does not take (and every write) run on the engine's pooled
    connections: cancelled, the statement is stopped and the connection is not pooled
    mid-answer (the next statement on the pool gets its own answer)."""
    topology = Topology.load(shard_databases)
    users = _two_shards_users(world)

    async def cancelled() -> Any:
        async with AsyncRouter(topology, max_fanout=None) as aio:
            for shard in topology.shards:  # the SQLAlchemy path only
                aio._lean[aio._engine(shard)] = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(aio.execute(SLOW.format(marker="r4_pooled")), 0.3)
            await asyncio.sleep(0.3)
            running = _running(world["router"], "r4_pooled")
            got = await aio.execute(
                "SELECT user_id FROM users WHERE user_id IN (:a, :b) ORDER BY user_id", users
            )
            return running, got.rows

    running, rows = world["loop"].run_until_complete(cancelled())
    assert not any(running.values()), running
    assert rows == sorted([(users["a"],), (users["b"],)])


@pytest.mark.timeout(60)
def test_a_sync_statement_past_query_timeout_is_stopped_on_the_shards(
    world: dict[str, Any], shard_databases: Any, slow_join: None
) -> None:
    """The sync twin: the driver's read timeout (query_timeout_s) gives up on the statement,
    the shard does not; the router stops it there, for a scatter read on the lean pool and
    for a statement of a transaction (SQLAlchemy's connections)."""
    topology = _short_timeout_topology(shard_databases, 1)
    user = world["data"]["users"][5]["user_id"]
    with Router(topology, max_fanout=None) as router:
        with pytest.raises(ShardUnavailableError):
            router.execute(SLOW.format(marker="r4_sync_scatter"))
        with pytest.raises(ShardUnavailableError), router.transaction() as txn:
            txn.execute("SELECT SLEEP(4) AS r4_sync_txn FROM users WHERE user_id = :u", {"u": user})
        time.sleep(0.5)
        assert not any(_running(world["router"], "r4_sync_scatter").values())
        assert not any(_running(world["router"], "r4_sync_txn").values())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy", "pymysql", "mysqldb"])
def test_an_abandoned_scatter_read_is_stopped_on_every_driver(
    world: dict[str, Any], shard_databases: Any, slow_join: None, driver: str
) -> None:
    """Async drivers: cancelled by wait_for; sync drivers: given up by the read timeout."""
    marker = f"r4_{driver}"
    if driver in ("aiomysql", "asyncmy"):
        topology = with_driver(Topology.load(shard_databases), driver)

        async def cancelled() -> None:
            async with AsyncRouter(topology, max_fanout=None) as aio:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(aio.execute(SLOW.format(marker=marker)), 0.3)

        world["loop"].run_until_complete(cancelled())
    else:
        topology = with_driver(_short_timeout_topology(shard_databases, 1), driver)
        with Router(topology, max_fanout=None) as router, pytest.raises(ShardUnavailableError):
            router.execute(SLOW.format(marker=marker))
    time.sleep(0.5)
    assert not any(_running(world["router"], marker).values())


@pytest.mark.timeout(60)
def test_a_cancelled_statement_ends_its_async_transaction(world: dict[str, Any]) -> None:
    """A transaction statement cancelled mid-answer (wait_for): the transaction cannot go on
    (the answer may still arrive on its connection); the next statement is refused, with a
    typed error (it was SQLAlchemy's PendingRollbackError), and the statement is stopped."""
    user = world["data"]["users"][3]["user_id"]

    async def run() -> None:
        async with world["aio"].transaction() as txn:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    txn.execute(
                        "SELECT SLEEP(2) AS r4_txn FROM users WHERE user_id = :u", {"u": user}
                    ),
                    0.3,
                )
            with pytest.raises(TransactionAbortedError):
                await txn.execute("SELECT email FROM users WHERE user_id = :u", {"u": user})
            await asyncio.sleep(0.3)
            assert not any(_running(world["router"], "r4_txn").values())  # stopped there too

    world["loop"].run_until_complete(run())


# -- a failed multi-target statement inside a transaction keeps the parts that ran --------------


def _users_placed(router: Router, same_shard: bool, start: int) -> tuple[int, int]:
    """Two user ids whose orders live on the same shard in different splits (same_shard), or
    on two different shards."""
    topology = router.topology
    table = topology.table("orders")

    def place(user_id: int) -> tuple[str, str]:
        slot = topology.slot_for("orders", user_id)
        return topology.shard_of_slot(slot), table.physical(slot)

    first = place(start)
    for other in range(start + 1, start + 10_000):
        shard, physical = place(other)
        if same_shard and shard == first[0] and physical != first[1]:
            return start, other
        if not same_shard and shard != first[0]:
            return start, other
    raise AssertionError("no such pair")


def _one_row_each(router: Router, users: tuple[int, int], worker: int) -> tuple[int, int]:
    ids = router.topology.id_generator("orders", worker_id=worker)
    order_ids = (ids.next_id(user_id=users[0]), ids.next_id(user_id=users[1]))
    return order_ids


def test_xa_transaction_failed_multi_shard_insert_is_not_half_committed(
    world: dict[str, Any],
) -> None:
    """Router(xa=True): in a transaction, a two-row INSERT whose rows go to two shards fails
    on one shard (duplicate key); the caller catches the error and commits the rest of the
    transaction. One database rolls back the failed statement (statement atomicity) and
    commits the rest; the router commits the other shard's row of the failed INSERT."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=False, start=970_000)
    new_order, taken = _one_row_each(router, (first, second), worker=30)
    router.execute(INSERT_ORDER, {"o": taken, "u": second, "m": 91})
    xa_router = Router(router.topology, max_fanout=None, xa=True)
    try:
        with xa_router.transaction() as txn:
            with pytest.raises(ShardRouterError):
                txn.execute(
                    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
                    " VALUES (:a, :u1, 92, 1, 'new'), (:b, :u2, 92, 1, 'new')",
                    {"a": new_order, "u1": first, "b": taken, "u2": second},
                )
            txn.execute("UPDATE orders SET status = 'after' WHERE user_id = :u", {"u": second})
    finally:
        xa_router.close()
    got = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": first}).rows
    assert got == [], "half of the failed INSERT was committed"
    # The rest of the transaction committed, and the failed INSERT's lookup row went with it.
    after = router.execute("SELECT status FROM orders WHERE order_id = :o", {"o": taken}).rows
    assert after == [("after",)]
    assert _orphans(router) == {}


def test_transaction_failed_insert_over_two_splits_is_not_half_committed(
    world: dict[str, Any],
) -> None:
    """The same on one shard without XA: two users on one shard but in different split
    tables (orders_000N), so the INSERT runs as one statement per split on the transaction's
    connection; the second fails (duplicate key), the first stays in the transaction and the
    caller's commit commits half of the failed statement."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=True, start=971_000)
    a, b = _one_row_each(router, (first, second), worker=31)
    router.execute(INSERT_ORDER, {"o": a, "u": first, "m": 93})
    router.execute(INSERT_ORDER, {"o": b, "u": second, "m": 93})
    ids = router.topology.id_generator("orders", worker_id=31)
    fresh = (ids.next_id(user_id=first), ids.next_id(user_id=second))
    outcomes = []
    for rows in ((fresh[0], first, b, second), (a, first, fresh[1], second)):
        with router.transaction() as txn:
            with pytest.raises(ShardRouterError):
                txn.execute(
                    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
                    " VALUES (:a, :u1, 94, 1, 'new'), (:b, :u2, 94, 1, 'new')",
                    {"a": rows[0], "u1": rows[1], "b": rows[2], "u2": rows[3]},
                )
            txn.execute("UPDATE orders SET status = 'after' WHERE user_id = :u", {"u": first})
        outcomes.append(
            router.execute(
                "SELECT order_id FROM orders WHERE merchant_id = 94 AND user_id IN (:u1, :u2)",
                {"u1": first, "u2": second},
            ).rows
        )
    assert outcomes == [[], []], "half of a failed INSERT was committed"
    statuses = router.execute("SELECT status FROM orders WHERE order_id = :o", {"o": a}).rows
    assert statuses == [("after",)]  # the transaction went on and committed the rest
    assert _orphans(router) == {}  # the failed INSERT's lookup rows are gone with it


def test_transaction_failed_update_over_two_splits_is_not_half_applied(
    world: dict[str, Any],
) -> None:
    """An UPDATE over two users of one shard in different splits: one split's rows update,
    the other's overflow BIGINT (error 1690). One database rolls the whole statement back;
    in a router transaction the first split's UPDATE stays and commits."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=True, start=972_000)
    a, b = _one_row_each(router, (first, second), worker=21)
    router.execute(INSERT_ORDER, {"o": a, "u": first, "m": 95})
    router.execute(INSERT_ORDER, {"o": b, "u": second, "m": 95})
    # One row can be multiplied by 2**62 (amount 1), the other overflows (amount 4).
    router.execute("UPDATE orders SET amount_cents = 1 WHERE user_id = :u", {"u": first})
    router.execute("UPDATE orders SET amount_cents = 4 WHERE user_id = :u", {"u": second})
    for _ in range(2):  # each order of the splits
        with router.transaction() as txn, pytest.raises(ShardRouterError):
            txn.execute(
                "UPDATE orders SET amount_cents = amount_cents * 4611686018427387904"
                " WHERE user_id IN (:u1, :u2)",
                {"u1": first, "u2": second},
            )
        got = router.execute(
            "SELECT user_id, amount_cents FROM orders WHERE user_id IN (:u1, :u2) ORDER BY user_id",
            {"u1": first, "u2": second},
        ).rows
        assert sorted(got) == sorted([(first, 1), (second, 4)]), got
        first, second = second, first
        router.execute("UPDATE orders SET amount_cents = 1 WHERE user_id = :u", {"u": first})
        router.execute("UPDATE orders SET amount_cents = 4 WHERE user_id = :u", {"u": second})


def test_async_transaction_failed_update_over_two_splits_is_not_half_applied(
    world: dict[str, Any],
) -> None:
    """AsyncTransaction has the same defect as the sync one (both split orders tried)."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=True, start=975_000)
    a, b = _one_row_each(router, (first, second), worker=22)
    router.execute(INSERT_ORDER, {"o": a, "u": first, "m": 98})
    router.execute(INSERT_ORDER, {"o": b, "u": second, "m": 98})
    router.execute("UPDATE orders SET amount_cents = 1 WHERE user_id = :u", {"u": first})
    router.execute("UPDATE orders SET amount_cents = 4 WHERE user_id = :u", {"u": second})

    async def run() -> None:
        for users in ((first, second), (second, first)):
            async with world["aio"].transaction() as txn:
                with pytest.raises(ShardRouterError):
                    await txn.execute(
                        "UPDATE orders SET amount_cents = amount_cents * 4611686018427387904"
                        " WHERE user_id IN (:u1, :u2)",
                        {"u1": users[0], "u2": users[1]},
                    )

    world["loop"].run_until_complete(run())
    got = router.execute(
        "SELECT user_id, amount_cents FROM orders WHERE user_id IN (:u1, :u2)",
        {"u1": first, "u2": second},
    ).rows
    assert sorted(got) == sorted([(first, 1), (second, 4)]), got


# -- an INSERT that leaves the lookup column to its DEFAULT --------------------------------------


def test_async_transaction_failed_insert_over_two_splits_is_not_half_committed(
    world: dict[str, Any],
) -> None:
    """The async twin of the INSERT over two splits: undone whole, the rest commits, and the
    failed INSERT's lookup rows go."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=True, start=976_000)
    a, b = _one_row_each(router, (first, second), worker=23)
    router.execute(INSERT_ORDER, {"o": a, "u": first, "m": 96})
    router.execute(INSERT_ORDER, {"o": b, "u": second, "m": 96})
    ids = router.topology.id_generator("orders", worker_id=23)
    fresh = (ids.next_id(user_id=first), ids.next_id(user_id=second))

    async def run() -> None:
        for rows in ((fresh[0], first, b, second), (a, first, fresh[1], second)):
            async with world["aio"].transaction() as txn:
                with pytest.raises(ShardRouterError):
                    await txn.execute(
                        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
                        " VALUES (:a, :u1, 97, 1, 'new'), (:b, :u2, 97, 1, 'new')",
                        {"a": rows[0], "u1": rows[1], "b": rows[2], "u2": rows[3]},
                    )
                await txn.execute(
                    "UPDATE orders SET status = 'after' WHERE user_id = :u", {"u": first}
                )

    world["loop"].run_until_complete(run())
    got = router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = 97 AND user_id IN (:u1, :u2)",
        {"u1": first, "u2": second},
    ).rows
    assert got == [], "half of a failed INSERT was committed"
    statuses = router.execute("SELECT status FROM orders WHERE order_id = :o", {"o": a}).rows
    assert statuses == [("after",)]
    assert _orphans(router) == {}


def test_only_multi_part_statements_of_a_transaction_set_a_savepoint(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The hot path pays nothing: a one-part statement sends no SAVEPOINT (its server undoes
    it); a statement over two splits sets one before its first part, once per branch."""
    router: Router = world["router"]
    first, second = _users_placed(router, same_shard=True, start=977_000)
    a, b = _one_row_each(router, (first, second), worker=24)
    router.execute(INSERT_ORDER, {"o": a, "u": first, "m": 99})
    router.execute(INSERT_ORDER, {"o": b, "u": second, "m": 99})
    sent: dict[str, list[str]] = {}
    for name, sql, params in (
        ("one", "UPDATE orders SET status = 'one' WHERE user_id = :u", {"u": first}),
        (
            "two",
            "UPDATE orders SET status = 'two' WHERE user_id IN (:u1, :u2)",
            {"u1": first, "u2": second},
        ),
    ):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"), router.transaction() as txn:
            txn.execute(sql, params)
        sent[name] = [r.statement for r in caplog.records if "SAVEPOINT" in r.statement]
    assert sent == {"one": [], "two": ["SAVEPOINT shardrouter_statement"]}
