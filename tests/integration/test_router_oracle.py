"""Oracle tests: every query shape the planner accepts returns, through the sync and the async
router over 4 real MariaDB shards, exactly what one unsharded MariaDB holding the same rows
returns for the same SQL (DESIGN.md invariant 2)."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import random
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    text,
)

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError

pytestmark = pytest.mark.mariadb

USERS = 240
MERCHANTS = 12
STATUSES = ("new", "paid", "shipped", "done")
SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def schema(topology: Topology) -> MetaData:
    """The order schema under the topology's physical names (split tables expanded)."""
    md = MetaData()
    for name in topology.table("orders").physical_names:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False, index=True),
            Column("merchant_id", BigInteger, nullable=False),
            Column("status", String(16), nullable=False),
            Column("amount_cents", BigInteger, nullable=True),
            Column("created_at", DateTime, nullable=False),
        )
    for name in topology.table("order_items").physical_names:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("line", Integer, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
            Column("sku", String(32), nullable=False),
            Column("qty", Integer, nullable=False),
        )
    for name in topology.table("merchant_orders").physical_names:
        Table(
            name,
            md,
            Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
        )
    Table(
        "countries",
        md,
        Column("code", String(2), primary_key=True),
        Column("name", String(64), nullable=False),
    )
    return md


def oracle_topology(sharded: Topology, url: str) -> Topology:
    """The same tables on one database, unsplit: the single-database answer."""
    raw: dict[str, Any] = copy.deepcopy(sharded.config.model_dump(by_alias=True, mode="json"))
    raw["shards"] = {"oracle": {"primary": url, "slots": [[0, raw["slots"]]]}}
    for table in raw["tables"].values():
        table["split"] = 1
    return Topology(config_from_dict(raw))


def generate(topology: Topology) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(20261124)
    ids = topology.id_generator("orders")
    base = dt.datetime(2026, 1, 1)
    orders, items = [], []
    for user_id in rng.sample(range(1, 10**9), USERS):
        for order_id in ids.next_ids(rng.randint(1, 4), user_id=user_id):
            orders.append(
                {
                    "order_id": order_id,
                    "user_id": user_id,
                    "merchant_id": rng.randrange(MERCHANTS),
                    "status": rng.choice(STATUSES),
                    "amount_cents": None if rng.random() < 0.05 else rng.randrange(100, 50_000),
                    "created_at": base + dt.timedelta(minutes=rng.randrange(60 * 24 * 90)),
                }
            )
            for line in range(rng.randint(1, 3)):
                items.append(
                    {
                        "order_id": order_id,
                        "line": line,
                        "user_id": user_id,
                        "sku": f"sku-{rng.randrange(40):02d}",
                        "qty": rng.randint(1, 5),
                    }
                )
    countries = [
        {"code": c, "name": n}
        for c, n in [("CN", "China"), ("DE", "Germany"), ("US", "United States")]
    ]
    return {"orders": orders, "order_items": items, "countries": countries}


@pytest.fixture(scope="module")
def world(shard_databases, oracle) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """4 shards and an oracle loaded with the same rows: the shards through the router."""
    topology = Topology.load(shard_databases)
    oracle_url = oracle.shards[0].url
    otop = oracle_topology(topology, oracle_url)
    md, omd = schema(topology), schema(otop)
    engines: list[Engine] = []
    router = Router(topology, max_offset=500)
    for engine in router.engines.primaries.values():
        md.drop_all(engine)
        md.create_all(engine)
    oracle_engine = create_engine(oracle_url)
    engines.append(oracle_engine)
    omd.drop_all(oracle_engine)
    omd.create_all(oracle_engine)
    data = generate(topology)
    for table, rows in data.items():
        columns = list(rows[0])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES "
            f"({', '.join(':' + c for c in columns)})"
        )
        for start in range(0, len(rows), 50):
            chunk = rows[start : start + 50]
            # Multi-row INSERTs through the router: split per shard and physical table.
            values = ", ".join(
                "(" + ", ".join(f":{c}_{i}" for c in columns) + ")" for i in range(len(chunk))
            )
            params = {f"{c}_{i}": row[c] for i, row in enumerate(chunk) for c in columns}
            router.execute(f"INSERT INTO {table} ({', '.join(columns)}) VALUES {values}", params)
        with oracle_engine.begin() as conn:
            conn.execute(text(sql), rows)
            if table == "orders":
                conn.execute(
                    text(
                        "INSERT INTO merchant_orders (merchant_id, order_id, user_id)"
                        " VALUES (:merchant_id, :order_id, :user_id)"
                    ),
                    rows,
                )
    aio = AsyncRouter(topology, max_offset=500)
    loop = asyncio.new_event_loop()
    try:
        yield {
            "router": router,
            "aio": aio,
            "loop": loop,
            "oracle": oracle_engine,
            "data": data,
            "topology": topology,
        }
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        for engine in router.engines.primaries.values():
            md.drop_all(engine)
        router.close()
        for engine in engines:
            engine.dispose()


def _norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows]


def check(
    world: dict[str, Any], sql: str, params: dict[str, Any] | None = None, ordered: bool = True
) -> list[tuple[Any, ...]]:
    """Run ``sql`` through both routers and the oracle; assert the three answers are equal."""
    params = params or {}
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(text(sql), params)]
    got_sync = world["router"].execute(sql, params).rows
    got_async = world["loop"].run_until_complete(world["aio"].execute(sql, params)).rows
    for got in (got_sync, got_async):
        if ordered:
            assert _norm(got) == _norm(expected), sql
        else:
            assert Counter(_norm(got)) == Counter(_norm(expected)), sql
    return expected


def refused(
    world: dict[str, Any], sql: str, params: dict[str, Any] | None = None, match: str | None = None
) -> None:
    """Both routers refuse ``sql`` with UnsupportedQueryError, its message matching ``match``."""
    params = params or {}
    with pytest.raises(UnsupportedQueryError, match=match):
        world["router"].execute(sql, params)
    with pytest.raises(UnsupportedQueryError, match=match):
        world["loop"].run_until_complete(world["aio"].execute(sql, params))


def users(world: dict[str, Any]) -> list[int]:
    return sorted({o["user_id"] for o in world["data"]["orders"]})


def test_the_data_is_spread_and_complete(world: dict[str, Any]) -> None:
    rows = check(world, "SELECT COUNT(*), COUNT(amount_cents), SUM(amount_cents) FROM orders")
    assert rows[0][0] == len(world["data"]["orders"]) > 300
    per_shard = []
    for engine in world["router"].engines.primaries.values():
        with engine.connect() as conn:
            per_shard.append(
                sum(
                    conn.execute(text(f"SELECT COUNT(*) FROM {t}")).scalar_one()
                    for t in world["topology"].table("orders").physical_names
                )
            )
    assert sum(per_shard) == rows[0][0] and min(per_shard) > 0


@SETTINGS
@given(data=st.data())
def test_point_query_by_user(world: dict[str, Any], data: st.DataObject) -> None:
    user = data.draw(st.sampled_from(users(world)))
    sql = "SELECT order_id, status, amount_cents FROM orders WHERE user_id = :u ORDER BY order_id"
    check(world, sql, {"u": user})
    res = world["router"].execute(sql, {"u": user})
    assert len(res.shards) == 1 and not res.scatter


@SETTINGS
@given(data=st.data())
def test_point_query_by_order_id_gene(world: dict[str, Any], data: st.DataObject) -> None:
    order = data.draw(st.sampled_from(world["data"]["orders"]))
    sql = "SELECT order_id, user_id, merchant_id FROM orders WHERE order_id = :o"
    assert check(world, sql, {"o": order["order_id"]})
    assert len(world["router"].execute(sql, {"o": order["order_id"]}).shards) == 1


@SETTINGS
@given(data=st.data())
def test_in_list_each_shard_gets_its_own_values(world: dict[str, Any], data: st.DataObject) -> None:
    chosen = data.draw(st.lists(st.sampled_from(users(world)), min_size=1, max_size=8, unique=True))
    marks = ", ".join(f":u{i}" for i in range(len(chosen)))
    params = {f"u{i}": u for i, u in enumerate(chosen)}
    sql = (
        f"SELECT user_id, order_id, amount_cents FROM orders WHERE user_id IN ({marks})"
        " ORDER BY amount_cents DESC, order_id"
    )
    check(world, sql, params)


@SETTINGS
@given(merchant=st.integers(0, MERCHANTS))
def test_lookup_by_merchant(world: dict[str, Any], merchant: int) -> None:
    sql = (
        "SELECT order_id, user_id, status FROM orders WHERE merchant_id = :m"
        " ORDER BY created_at DESC, order_id LIMIT 20"
    )
    check(world, sql, {"m": merchant})
    res = world["router"].execute(sql, {"m": merchant})
    assert res.lookups and not res.scatter


@SETTINGS
@given(
    limit=st.integers(0, 40),
    offset=st.integers(0, 60),
    desc=st.booleans(),
    key=st.sampled_from(["created_at", "amount_cents", "status"]),
)
def test_scatter_order_by_limit_offset(
    world: dict[str, Any], limit: int, offset: int, desc: bool, key: str
) -> None:
    direction = "DESC" if desc else "ASC"
    sql = (
        f"SELECT order_id, {key} FROM orders ORDER BY {key} {direction}, order_id"
        f" LIMIT {limit} OFFSET {offset}"
    )
    check(world, sql)


@pytest.mark.parametrize(
    "sql",
    [
        pytest.param(
            "SELECT COUNT(*), SUM(amount_cents), MIN(amount_cents), MAX(amount_cents),"
            " AVG(amount_cents) FROM orders",
            id="global-aggregates",
        ),
        pytest.param(
            "SELECT COUNT(*), SUM(amount_cents) FROM orders WHERE status = 'nope'",
            id="aggregates-over-nothing",
        ),
        pytest.param(
            "SELECT merchant_id, COUNT(*), SUM(amount_cents), AVG(amount_cents)"
            " FROM orders GROUP BY merchant_id ORDER BY merchant_id",
            id="group-by",
        ),
        pytest.param(
            "SELECT status, COUNT(*) AS n FROM orders GROUP BY status"
            " HAVING COUNT(*) > 30 ORDER BY n DESC, status",
            id="group-having",
        ),
        pytest.param(
            "SELECT merchant_id, MAX(amount_cents) FROM orders GROUP BY merchant_id"
            " HAVING SUM(amount_cents) > 100000 ORDER BY merchant_id",
            id="having-hidden-aggregate",
        ),
        pytest.param(
            "SELECT merchant_id FROM orders GROUP BY merchant_id"
            " ORDER BY COUNT(*) DESC, merchant_id LIMIT 5",
            id="order-by-hidden-count",
        ),
        pytest.param("SELECT DISTINCT status FROM orders ORDER BY status", id="distinct"),
        pytest.param(
            "SELECT DISTINCT merchant_id, status FROM orders"
            " ORDER BY merchant_id DESC, status LIMIT 7",
            id="distinct-limit",
        ),
        pytest.param(
            "SELECT o.order_id, i.line, i.sku FROM orders o JOIN order_items i"
            " ON o.order_id = i.order_id ORDER BY o.order_id, i.line LIMIT 25",
            id="bound-join-scatter",
        ),
        pytest.param(
            "SELECT i.sku, SUM(i.qty) FROM orders o JOIN order_items i"
            " ON o.order_id = i.order_id WHERE o.status = 'paid' GROUP BY i.sku"
            " ORDER BY i.sku",
            id="bound-join-group",
        ),
        pytest.param("SELECT c.name FROM countries c ORDER BY c.name", id="broadcast"),
    ],
)
def test_merge_shapes(world: dict[str, Any], sql: str) -> None:
    check(world, sql)


@SETTINGS
@given(data=st.data())
def test_bound_join_one_user(world: dict[str, Any], data: st.DataObject) -> None:
    user = data.draw(st.sampled_from(users(world)))
    sql = (
        "SELECT o.order_id, i.line, i.qty FROM orders o JOIN order_items i"
        " ON o.order_id = i.order_id WHERE o.user_id = :u ORDER BY o.order_id, i.line"
    )
    check(world, sql, {"u": user})
