"""Any SQLAlchemy MySQL URL works: the same statements through PyMySQL, mysqlclient (MySQLdb),
aiomysql and asyncmy give the same rows on the real shards."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from shard_tables import with_driver
from sqlalchemy import text

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router

pytestmark = pytest.mark.mariadb

USERS = list(range(9700, 9740))
POINT = "SELECT order_id, amount_cents FROM orders WHERE user_id = :u ORDER BY order_id"
SCATTER = (
    "SELECT user_id, COUNT(*), SUM(amount_cents) FROM orders WHERE user_id >= 9700"
    " AND user_id < 9740 GROUP BY user_id ORDER BY user_id"
)


@pytest.fixture(scope="module")
def loaded(shard_databases) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    topology = Topology.load(shard_databases)
    router = Router(topology)
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for name in topology.table("orders").physical_names:
                conn.execute(
                    text(
                        f"CREATE TABLE IF NOT EXISTS {name} (order_id BIGINT PRIMARY KEY,"
                        " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL,"
                        " amount_cents BIGINT, KEY (user_id))"
                    )
                )
                conn.execute(text(f"DELETE FROM {name} WHERE user_id BETWEEN 9700 AND 9739"))
            conn.execute(
                text(
                    "CREATE TABLE IF NOT EXISTS merchant_orders (merchant_id BIGINT, order_id BIGINT,"
                    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))"
                )
            )
    ids = topology.id_generator("orders")
    for u in USERS:
        for i, o in enumerate(ids.next_ids(2, user_id=u)):
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
                " VALUES (:o, :u, 70, :a)",
                {"o": o, "u": u, "a": u + i},
            )
    expected = {u: router.execute(POINT, {"u": u}).rows for u in USERS[:5]}
    yield {"topology": topology, "expected": expected, "scatter": router.execute(SCATTER).rows}
    router.close()


@pytest.mark.parametrize("driver", ["pymysql", "mysqldb"])
def test_sync_drivers(loaded: dict[str, Any], driver: str) -> None:
    topology = with_driver(loaded["topology"], driver)
    with Router(topology) as router:
        assert router.engines.primary(next(iter(topology.shards))).dialect.driver == driver
        for user, rows in loaded["expected"].items():
            assert router.execute(POINT, {"u": user}).rows == rows
        assert router.execute(SCATTER).rows == loaded["scatter"]
        assert len(loaded["scatter"]) == len(USERS)


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_async_drivers(loaded: dict[str, Any], driver: str) -> None:
    topology = with_driver(loaded["topology"], driver)

    async def run() -> tuple[dict[int, Any], list[Any], str]:
        async with AsyncRouter(topology) as aio:
            point = {u: (await aio.execute(POINT, {"u": u})).rows for u in loaded["expected"]}
            scatter = (await aio.execute(SCATTER)).rows
            return point, scatter, aio._engine(next(iter(topology.shards))).dialect.driver

    point, scatter, used = asyncio.run(run())
    assert used == driver
    assert point == loaded["expected"] and scatter == loaded["scatter"]
    # The sync router still works from an async topology (pymysql underneath).
    with Router(topology) as router:
        assert router.execute(SCATTER).rows == loaded["scatter"]
