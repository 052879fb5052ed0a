"""Rows land on the shard the routing names, and are read back from that shard alone.

Deliberately without the router: plain engines and the topology's answers, so a routing bug
cannot hide behind the code that executes statements.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, MetaData, func, insert, select

from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import apply
from shardrouter.types import ShardId

pytestmark = pytest.mark.mariadb

USERS = 400


@pytest.fixture(scope="module")
def topology(shard_databases) -> Topology:  # type: ignore[no-untyped-def]
    return Topology.load(shard_databases)


@pytest.fixture(scope="module")
def engines(topology: Topology) -> Iterator[dict[ShardId, Engine]]:
    made = ShardEngines(topology)
    apply(topology, made).raise_for_errors()
    yield dict(made.primaries)
    made.dispose()


@pytest.fixture(scope="module")
def md(engines: dict[ShardId, Engine]) -> MetaData:
    reflected = MetaData()
    reflected.reflect(next(iter(engines.values())))  # every shard has the same tables
    return reflected


@pytest.fixture(scope="module")
def placed(
    topology: Topology, engines: dict[ShardId, Engine], md: MetaData
) -> dict[int, list[int]]:
    """Insert USERS users with 1-3 orders each, every row on the shard routing names."""
    ids = topology.id_generator("orders")
    rng = random.Random(2)
    placed: dict[int, list[int]] = {}
    for user_id in rng.sample(range(1, 2**40), USERS):
        slot = topology.slot_for("users", user_id)
        shard = topology.shard_of_slot(slot)
        order_ids = ids.next_ids(rng.randint(1, 3), user_id=user_id)
        with engines[shard].begin() as conn:
            conn.execute(
                insert(md.tables[topology.table("users").physical(slot)]),
                {"user_id": user_id, "email": f"u{user_id}@example.com"},
            )
            conn.execute(
                insert(md.tables[topology.table("orders").physical(slot)]),
                [
                    {
                        "order_id": o,
                        "user_id": user_id,
                        "merchant_id": 1,
                        "status": "new",
                        "amount_cents": 100,
                        "created_at": ids.decode(o).time.replace(tzinfo=None),
                    }
                    for o in order_ids
                ],
            )
        placed[user_id] = order_ids
    return placed


def test_every_shard_gets_rows(
    engines: dict[ShardId, Engine], md: MetaData, placed: dict[int, list[int]]
) -> None:
    per_shard = {}
    for sid, engine in engines.items():
        with engine.connect() as conn:
            per_shard[sid] = conn.execute(
                select(func.count()).select_from(md.tables["users"])
            ).scalar_one()
    assert sum(per_shard.values()) == USERS
    # 400 users over 4 equal shards: each gets some (a wrong slot map would starve one).
    assert all(count > USERS // 8 for count in per_shard.values()), per_shard


def test_rows_read_back_from_routed_shard_only(
    topology: Topology, engines: dict[ShardId, Engine], md: MetaData, placed: dict[int, list[int]]
) -> None:
    users = md.tables["users"]
    for user_id, order_ids in list(placed.items())[:100]:
        home = topology.shard_for("users", user_id)
        for sid, engine in engines.items():
            with engine.connect() as conn:
                found = conn.execute(
                    select(users.c.user_id).where(users.c.user_id == user_id)
                ).all()
            assert len(found) == (1 if sid == home else 0), (user_id, sid, home)
        for order_id in order_ids:
            route = topology.route("orders", "order_id", order_id)
            assert route.shard == home  # the gene routes where the user routes
            assert route.physical_table is not None
            orders = md.tables[route.physical_table]
            with engines[home].connect() as conn:
                row = conn.execute(select(orders).where(orders.c.order_id == order_id)).one()
            assert row.user_id == user_id


def test_all_orders_present_exactly_once(
    topology: Topology, engines: dict[ShardId, Engine], md: MetaData, placed: dict[int, list[int]]
) -> None:
    seen: list[int] = []
    for engine in engines.values():
        with engine.connect() as conn:
            for name in topology.table("orders").physical_names:
                seen += conn.execute(select(md.tables[name].c.order_id)).scalars().all()
    expected = sorted(o for orders in placed.values() for o in orders)
    assert sorted(seen) == expected
