"""ENUM and SET columns across shards on every driver and in transactions (issue 7, the known gap
"ENUM and SET columns across shards"): MySQL orders, groups and deduplicates them by index, the
merge by text, so a multi-shard merge comparing one is refused by name. Before, only the lean
read path (PyMySQL, aiomysql outside a transaction) read the column flags; mysqlclient and
asyncmy URLs and every transaction merged by text and answered in the wrong order.

Real MariaDB shards from the session sandbox."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from shard_tables import create_tables, with_driver

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

TIERS = ("zeta", "alpha", "mid")  # index order: zeta < alpha < mid; text order differs
DDL = {
    # users.email is a lookup column of the topology: an INSERT must give it (user_emails).
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL,"
    " tier ENUM('zeta', 'alpha', 'mid') NOT NULL, perks SET('z', 'a') NOT NULL DEFAULT '')",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
}
REFUSED = (
    "SELECT user_id, tier FROM users ORDER BY tier, user_id",
    "SELECT tier, COUNT(*) FROM users GROUP BY tier",
    "SELECT DISTINCT tier FROM users",
    "SELECT user_id, perks FROM users ORDER BY perks, user_id",
)
BY_INDEX = "SELECT user_id, tier FROM users ORDER BY tier + 0, user_id"


@pytest.fixture(scope="module")
def world(shard_databases: Any) -> Iterator[dict[str, Any]]:
    topology = Topology.load(shard_databases)
    with Router(topology) as router:
        create_tables(router, DDL)
        users = list(range(1, 41))
        for user in users:
            router.execute(
                "INSERT INTO users (user_id, email, tier, perks) VALUES (:u, :e, :t, :p)",
                {
                    "u": user,
                    "e": f"enum{user}@example.com",
                    "t": TIERS[user % 3],
                    "p": ("z", "a", "z,a")[user % 3],
                },
            )
        shards = {topology.shard_for("users", u) for u in users}
        assert len(shards) > 1  # the statements below are multi-shard
    expected = sorted(((u, TIERS[u % 3]) for u in users), key=lambda r: (TIERS.index(r[1]), r[0]))
    yield {"topology": topology, "users": users, "expected": expected}


@pytest.mark.parametrize("driver", ["pymysql", "mysqldb"])
def test_sync_router_refuses_an_enum_merge(world: dict[str, Any], driver: str) -> None:
    topology = with_driver(world["topology"], driver)
    with Router(topology) as router:
        for sql in REFUSED:
            with pytest.raises(UnsupportedQueryError, match="ENUM or SET"):
                router.execute(sql)
        assert [tuple(r) for r in router.execute(BY_INDEX).rows] == world["expected"]


@pytest.mark.parametrize("driver", ["pymysql", "mysqldb"])
def test_sync_xa_transaction_refuses_an_enum_merge(world: dict[str, Any], driver: str) -> None:
    topology = with_driver(world["topology"], driver)
    with Router(topology, xa=True) as router:
        for sql in REFUSED:
            refused = pytest.raises(UnsupportedQueryError, match="ENUM or SET")
            with refused, router.transaction() as txn:
                txn.execute(sql)
        with router.transaction() as txn:
            assert [tuple(r) for r in txn.execute(BY_INDEX).rows] == world["expected"]


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_async_router_refuses_an_enum_merge(world: dict[str, Any], driver: str) -> None:
    """(Async transactions are single-shard: no merge across shards to refuse there.)"""
    topology = with_driver(world["topology"], driver)

    async def run() -> list[Any]:
        async with AsyncRouter(topology) as aio:
            for sql in REFUSED:
                with pytest.raises(UnsupportedQueryError, match="ENUM or SET"):
                    await aio.execute(sql)
            return [tuple(r) for r in (await aio.execute(BY_INDEX)).rows]

    assert asyncio.run(run()) == world["expected"]
