"""Issue 11 item 9, GROUP_CONCAT across shards, on 4 real MariaDB shards against the
one-database oracle: each shard sends, per group and GROUP_CONCAT ORDER BY values (and DISTINCT
argument), its piece of the list with its length in bytes; the merge deduplicates (DISTINCT, by
collation weight), orders, joins with the SEPARATOR and cuts at the shards'
group_concat_max_len as MariaDB does."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import check, refused, world  # noqa: F401  (the module's 4 shards + oracle)

from shardrouter.engine.router import Router
from shardrouter.errors import FanoutLimitError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

# Every list has one order: ORDER BY ends with a unique key, or the values are distinct.
ACCEPTED = [
    "SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders WHERE status = 'paid'",
    "SELECT status, GROUP_CONCAT(DISTINCT merchant_id ORDER BY merchant_id) AS m, COUNT(*)"
    " FROM orders GROUP BY status ORDER BY status",
    "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status DESC SEPARATOR ' | ')"
    " FROM orders GROUP BY merchant_id ORDER BY merchant_id",
    "SELECT merchant_id, GROUP_CONCAT(amount_cents ORDER BY created_at DESC, order_id"
    " SEPARATOR ';') AS a, SUM(amount_cents), MAX(created_at) FROM orders"
    " GROUP BY merchant_id ORDER BY merchant_id LIMIT 5",
    "SELECT GROUP_CONCAT(DISTINCT sku ORDER BY sku SEPARATOR '') FROM order_items",
    "SELECT GROUP_CONCAT(DISTINCT status) FROM orders",
    "SELECT GROUP_CONCAT(order_id, ':', status ORDER BY order_id) FROM orders"
    " WHERE merchant_id = 3 OR amount_cents < 2000",
    "SELECT status, GROUP_CONCAT(created_at ORDER BY created_at, order_id) FROM orders"
    " WHERE amount_cents < 3000 GROUP BY status ORDER BY status",
    "SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders WHERE 1 = 0",
    "SELECT status, GROUP_CONCAT(order_id ORDER BY order_id) FROM orders WHERE 1 = 0"
    " GROUP BY status",
    "SELECT GROUP_CONCAT(CASE WHEN amount_cents IS NULL THEN NULL ELSE order_id END"
    " ORDER BY order_id) FROM orders WHERE merchant_id < 4",
    "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status) FROM orders"
    " GROUP BY merchant_id HAVING COUNT(*) > 5 ORDER BY COUNT(*) DESC, merchant_id",
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_group_concat_across_shards(world: dict[str, Any], sql: str) -> None:  # noqa: F811
    rows = check(world, sql)
    got = world["router"].execute(sql)
    assert len(got.shards) > 1, sql
    assert got.rows == rows


def test_an_unordered_list_holds_every_value(world: dict[str, Any]) -> None:  # noqa: F811
    """Without ORDER BY the list's order is not defined (one database's is its scan order):
    the same values, each as often, beside a per-target DISTINCT count of the user key."""
    sql = (
        "SELECT merchant_id, COUNT(DISTINCT user_id), GROUP_CONCAT(order_id), COUNT(*)"
        " FROM orders GROUP BY merchant_id ORDER BY merchant_id"
    )
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(text(sql))]
    got = world["router"].execute(sql)
    assert len(got.shards) > 1 and len(got.rows) == len(expected) > 1
    for mine, theirs in zip(got.rows, expected, strict=True):
        assert mine[:2] == theirs[:2] and mine[3] == theirs[3]
        assert sorted(mine[2].split(",")) == sorted(theirs[2].split(","))
        assert len(mine[2].split(",")) == mine[3]


@pytest.fixture
def short_lists(world: dict[str, Any]) -> Iterator[Router]:  # noqa: F811
    """group_concat_max_len = 50 on every shard and the oracle (new connections), restored
    after; a router whose connections start after the change."""
    engines = [*world["router"].engines.primaries.values(), world["oracle"]]
    before = []
    for engine in engines:
        with engine.begin() as conn:
            before.append(conn.execute(text("SELECT @@GLOBAL.group_concat_max_len")).scalar_one())
            conn.execute(text("SET GLOBAL group_concat_max_len = 50"))
    world["oracle"].dispose()
    router = Router(world["topology"])
    try:
        yield router
    finally:
        router.close()
        for engine, value in zip(engines, before, strict=True):
            with engine.begin() as conn:
                conn.execute(text(f"SET GLOBAL group_concat_max_len = {int(value)}"))
        world["oracle"].dispose()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders",
        "SELECT status, GROUP_CONCAT(order_id ORDER BY order_id DESC SEPARATOR ', ')"
        " FROM orders GROUP BY status ORDER BY status",
        "SELECT GROUP_CONCAT(DISTINCT sku ORDER BY sku) FROM order_items",
        # 'é' is two bytes in UTF-8: the cut never splits it
        "SELECT GROUP_CONCAT(CONCAT(status, 'é') ORDER BY order_id SEPARATOR '') FROM orders",
        "SELECT GROUP_CONCAT(order_id ORDER BY order_id SEPARATOR '--------') FROM orders",
    ],
)
def test_lists_are_cut_at_group_concat_max_len(
    world: dict[str, Any],  # noqa: F811
    short_lists: Router,
    sql: str,
) -> None:
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(text(sql))]
    assert all(len(str(v).encode()) <= 50 for r in expected for v in r if isinstance(v, str))
    assert short_lists.execute(sql).rows == expected


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("SELECT GROUP_CONCAT(DISTINCT status, merchant_id) FROM orders", "several arguments"),
        ("SELECT GROUP_CONCAT(DISTINCT status ORDER BY merchant_id) FROM orders", "only its"),
        ("SELECT GROUP_CONCAT(order_id ORDER BY :p) FROM orders", "parameters"),
        ("SELECT GROUP_CONCAT(order_id SEPARATOR 'é') FROM orders", "ASCII"),
        ("SELECT LENGTH(GROUP_CONCAT(order_id)) FROM orders", "GROUP_CONCAT"),
        (
            "SELECT status, GROUP_CONCAT(DISTINCT merchant_id) AS g FROM orders"
            " GROUP BY status ORDER BY g",
            "ORDER BY",
        ),
        ("SELECT DISTINCT GROUP_CONCAT(status) FROM orders GROUP BY merchant_id", "DISTINCT"),
        (
            "SELECT COUNT(DISTINCT merchant_id), GROUP_CONCAT(status) FROM orders",
            "separate queries",
        ),
        (
            "SELECT COUNT(DISTINCT user_id), GROUP_CONCAT(status ORDER BY status) FROM orders",
            "separate queries",
        ),
        (
            "SELECT merchant_id FROM orders GROUP BY merchant_id"
            " HAVING GROUP_CONCAT(status) LIKE '%paid%'",
            "GROUP_CONCAT",
        ),
    ],
)
def test_group_concat_the_merge_cannot_join_is_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    names: str,
) -> None:
    refused(world, sql, {"p": 1}, match=names)


def test_the_pieces_are_capped(world: dict[str, Any]) -> None:  # noqa: F811
    """max_distinct_rows bounds the pieces one shard sends for a list (one per ORDER BY value
    here: every order)."""
    router = Router(world["topology"], max_distinct_rows=10)
    try:
        with pytest.raises(FanoutLimitError, match="max_distinct_rows=10"):
            router.execute("SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders")
        # Within the cap: 2 statuses, 2 pieces per split table of a shard.
        assert 2 * len(world["topology"].table("orders").physical_names) <= 10
        sql = (
            "SELECT GROUP_CONCAT(DISTINCT status ORDER BY status) FROM orders"
            " WHERE status IN ('new', 'paid')"
        )
        assert router.execute(sql).rows == check(world, sql)
    finally:
        router.close()


def test_a_changed_cap_is_not_served_from_the_fan_out_cache(world: dict[str, Any]) -> None:  # noqa: F811
    """The statements a fan-out keeps (Plan.fanout) carry LIMIT max_distinct_rows + 1: a
    router whose limits change gets statements with the new cap."""
    router = Router(world["topology"])
    sql = "SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders"
    try:
        first = router.execute(sql).rows
        assert first == check(world, sql)
        assert router.planner.plan(sql).fanout is not None  # kept
        router.limits = dataclasses.replace(router.limits, max_distinct_rows=10)
        with pytest.raises(FanoutLimitError, match="max_distinct_rows=10"):
            router.execute(sql)
        router.limits = dataclasses.replace(router.limits, max_distinct_rows=100_000)
        assert router.execute(sql).rows == first
    finally:
        router.close()
