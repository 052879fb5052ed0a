"""Oracle tests over data that hypothesis generates: for each example the same rows go into the
4 shards (through the router) and into one unsharded MariaDB, and every query shape must give
the same answer through the sync and async routers as the single database."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, create_engine, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.schema import apply

pytestmark = pytest.mark.mariadb

QUERIES = [
    (
        "SELECT user_id, amount_cents, order_id FROM orders"
        " ORDER BY amount_cents DESC, order_id LIMIT 7 OFFSET 2",
        True,
    ),
    (
        "SELECT status, COUNT(*), SUM(amount_cents), MIN(amount_cents), MAX(amount_cents),"
        " AVG(amount_cents) FROM orders GROUP BY status ORDER BY status",
        True,
    ),
    ("SELECT COUNT(*), SUM(amount_cents), AVG(amount_cents) FROM orders", True),
    (
        "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " HAVING COUNT(*) >= 2 ORDER BY n DESC, merchant_id LIMIT 3",
        True,
    ),
    ("SELECT DISTINCT status FROM orders ORDER BY status", True),
    ("SELECT user_id, order_id FROM orders WHERE merchant_id = 3 ORDER BY order_id", True),
    ("SELECT order_id FROM orders WHERE status = 'paid'", False),
]

rows_strategy = st.lists(
    st.tuples(
        st.integers(1, 60),  # user id: few users, so users have several orders
        st.integers(0, 5),  # merchant
        st.sampled_from(["new", "paid", "done"]),
        st.one_of(st.none(), st.integers(0, 10_000)),  # amount, sometimes NULL
    ),
    min_size=0,
    max_size=40,
)


@pytest.fixture(scope="module")
def world(shard_databases, oracle) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    raw: dict[str, Any] = copy.deepcopy(topology.config.model_dump(by_alias=True, mode="json"))
    url = oracle.shards[0].url.replace("/orders_s0", "/generated_oracle")
    server = create_engine(oracle.shards[0].url)
    with server.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS generated_oracle"))
        conn.execute(text("CREATE DATABASE generated_oracle"))
    server.dispose()
    raw["shards"] = {"oracle": {"primary": url, "slots": [[0, raw["slots"]]]}}
    for table in raw["tables"].values():
        table["split"] = 1
    oracle_topology = Topology(config_from_dict(raw))
    oracle_engines = ShardEngines(oracle_topology)
    apply(oracle_topology, oracle_engines).raise_for_errors()
    router = Router(topology, engines=engines)
    aio = AsyncRouter(topology)
    loop = asyncio.new_event_loop()
    yield {
        "router": router,
        "aio": aio,
        "loop": loop,
        "topology": topology,
        "oracle": oracle_engines.primary(next(iter(oracle_topology.shards))),
    }
    loop.run_until_complete(aio.close())
    loop.close()
    router.close()
    oracle_engines.dispose()


def _load(world: dict[str, Any], rows: list[tuple[int, int, str, int | None]]) -> None:
    router: Router = world["router"]
    oracle: Engine = world["oracle"]
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for table in ("merchant_orders", *world["topology"].table("orders").physical_names):
                conn.execute(text(f"DELETE FROM {table}"))
    with oracle.begin() as conn:
        conn.execute(text("DELETE FROM orders"))
        conn.execute(text("DELETE FROM merchant_orders"))
    if not rows:
        return
    ids = world["topology"].id_generator("orders")
    records = []
    for user, merchant, status, amount in rows:
        order_id = ids.next_id(user_id=user)
        records.append(
            {
                "o": order_id,
                "u": user,
                "m": merchant,
                "s": status,
                "a": amount,
                "t": dt.datetime(2026, 1, 1) + dt.timedelta(seconds=order_id % 99991),
            }
        )
    insert = (
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
        " created_at) VALUES (:o, :u, :m, :s, COALESCE(:a, 0), :t)"
    )
    for record in records:
        router.execute(insert, record)
    with oracle.begin() as conn:
        conn.execute(text(insert), records)
        # The schema makes amount NOT NULL: NULLs are written as 0 on both sides alike.


def _norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows]


@settings(
    max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(rows=rows_strategy)
def test_generated_data_matches_one_database(world: dict[str, Any], rows: list[Any]) -> None:
    _load(world, rows)
    for sql, ordered in QUERIES:
        with world["oracle"].connect() as conn:
            expected = [tuple(r) for r in conn.execute(text(sql))]
        got_sync = world["router"].execute(sql).rows
        got_async = world["loop"].run_until_complete(world["aio"].execute(sql)).rows
        for got in (got_sync, got_async):
            if ordered:
                assert _norm(got) == _norm(expected), sql
            else:
                assert Counter(_norm(got)) == Counter(_norm(expected)), sql
