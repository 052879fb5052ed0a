"""Issue 11 item 9, second part, on 4 real MariaDB shards against the one-database oracle:
COUNT/SUM/AVG(DISTINCT x) across shards when x is not a partitioned key (a lookup column, a
string, an expression). Each shard groups by the statement's groups and x; the merge keeps one
row per (group, x), so a value on two shards counts once, then adds up per group. Strings are
deduplicated by their collation weight ('PAID' = 'paid ' under a case-insensitive PAD SPACE
collation), as one database does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import check, refused, world  # noqa: F401  (the module's 4 shards + oracle)

from shardrouter.engine.router import Router
from shardrouter.errors import FanoutLimitError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _exact(world: dict[str, Any], sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:  # noqa: F811
    """check(), and the sync answer's reprs equal to the oracle's (DECIMAL scale included);
    the statement must fan out."""
    rows = check(world, sql, params)
    got = world["router"].execute(sql, params)
    assert len(got.shards) > 1, sql
    assert [tuple(map(repr, r)) for r in got.rows] == [tuple(map(repr, r)) for r in rows], sql
    return rows


ACCEPTED = [
    "SELECT COUNT(DISTINCT merchant_id) FROM orders",
    "SELECT COUNT(DISTINCT status) FROM orders",
    "SELECT SUM(DISTINCT amount_cents), AVG(DISTINCT amount_cents),"
    " COUNT(DISTINCT amount_cents) FROM orders",
    "SELECT COUNT(DISTINCT user_id, status) FROM orders",
    "SELECT COUNT(DISTINCT user_id + 1), COUNT(*) FROM orders",
    "SELECT status, COUNT(DISTINCT merchant_id) AS m, COUNT(*), SUM(amount_cents),"
    " MIN(created_at), MAX(user_id), AVG(amount_cents) FROM orders GROUP BY status"
    " ORDER BY m DESC, status",
    "SELECT merchant_id, COUNT(DISTINCT status) FROM orders GROUP BY merchant_id"
    " HAVING COUNT(DISTINCT status) = 4 ORDER BY merchant_id",
    "SELECT merchant_id, AVG(amount_cents), AVG(DISTINCT amount_cents) FROM orders"
    " WHERE status = :s GROUP BY merchant_id ORDER BY 1 LIMIT :n",
    "SELECT COUNT(DISTINCT sku) FROM order_items WHERE qty > 2",
    "SELECT COUNT(DISTINCT merchant_id), SUM(DISTINCT merchant_id), COUNT(*) FROM orders"
    " WHERE 1 = 0",
    "SELECT status, COUNT(DISTINCT merchant_id) FROM orders WHERE 1 = 0 GROUP BY status",
    "SELECT COUNT(DISTINCT merchant_id) / COUNT(*), SUM(DISTINCT merchant_id) * 2 FROM orders",
    "SELECT COUNT(DISTINCT i.sku), COUNT(*) FROM orders o JOIN order_items i"
    " ON i.order_id = o.order_id WHERE o.status = 'paid'",
    "SELECT o.status FROM orders o GROUP BY o.status ORDER BY COUNT(DISTINCT o.merchant_id), 1",
    "SELECT merchant_id, COUNT(DISTINCT status) AS n, MIN(status), MAX(status) FROM orders"
    " GROUP BY merchant_id ORDER BY n DESC, merchant_id LIMIT 3 OFFSET 1",
    "SELECT DATE(created_at) AS d, COUNT(DISTINCT merchant_id) FROM orders"
    " GROUP BY 1 ORDER BY d LIMIT 5",
    "SELECT COUNT(DISTINCT merchant_id) FROM orders WHERE user_id IN (:u1, :u2)",
]


@pytest.mark.parametrize("sql", ACCEPTED)
def test_distinct_aggregates_of_any_column_across_shards(
    world: dict[str, Any],  # noqa: F811
    sql: str,
) -> None:
    users = sorted({o["user_id"] for o in world["data"]["orders"]})
    _exact(world, sql, {"s": "paid", "n": 6, "u1": users[0], "u2": users[-1]})


def test_a_value_on_every_shard_counts_once(world: dict[str, Any]) -> None:  # noqa: F811
    """The data puts every merchant on every shard: per-shard counts would add up to 4x."""
    merchants = {o["merchant_id"] for o in world["data"]["orders"]}
    per_shard = []
    for engine in world["router"].engines.primaries.values():
        with engine.connect() as conn:
            tables = world["topology"].table("orders").physical_names
            union = " UNION ".join(f"SELECT merchant_id FROM {t}" for t in tables)
            per_shard.append(
                conn.execute(text(f"SELECT COUNT(*) FROM ({union}) AS m")).scalar_one()
            )
    assert sum(per_shard) > len(merchants), per_shard  # the naive sum would be wrong
    assert _exact(world, "SELECT COUNT(DISTINCT merchant_id) FROM orders", {}) == [
        (len(merchants),)
    ]


@pytest.fixture
def spelled(world: dict[str, Any]) -> Iterator[list[int]]:  # noqa: F811
    """Orders of users on different shards whose status is 'PAID', 'paid ' and 'Paid' (one
    value under the case-insensitive PAD SPACE collation), on both sides; removed after."""
    topology, router = world["topology"], world["router"]
    users: list[int] = []
    shards: set[str] = set()
    for user in range(2_000_000_001, 2_000_010_000):
        shard = topology.shard_of_slot(topology.slot_for("orders", user))
        if shard not in shards:
            shards.add(shard)
            users.append(user)
        if len(users) == 3:
            break
    ids = topology.id_generator("orders")
    orders = []
    for user, status in zip(users, ["PAID", "paid ", "Paid"], strict=True):
        orders.append(
            {
                "o": ids.next_id(user_id=user),
                "u": user,
                "s": status,
                "m": 9_999,
                "t": "2026-02-01 10:00:00",
            }
        )
    insert = (
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
        " VALUES (:o, :u, :m, :s, 700, :t)"
    )
    for params in orders:
        router.execute(insert, params)
    with world["oracle"].begin() as conn:
        conn.execute(text(insert), orders)
        conn.execute(
            text(
                "INSERT INTO merchant_orders (merchant_id, order_id, user_id) VALUES (:m, :o, :u)"
            ),
            orders,
        )
    try:
        yield users
    finally:
        for params in orders:
            router.execute("DELETE FROM orders WHERE order_id = :o", params)
        with world["oracle"].begin() as conn:
            conn.execute(text("DELETE FROM orders WHERE merchant_id = 9999"))
            conn.execute(text("DELETE FROM merchant_orders WHERE merchant_id = 9999"))


def test_strings_are_deduplicated_by_their_collation(
    world: dict[str, Any],  # noqa: F811
    spelled: list[int],
) -> None:
    rows = _exact(
        world,
        "SELECT merchant_id, COUNT(DISTINCT status), COUNT(*) FROM orders"
        " WHERE merchant_id = 9999 OR user_id IN (:a, :b, :c) GROUP BY merchant_id",
        dict(zip("abc", spelled, strict=True)),
    )
    assert rows == [(9999, 1, 3)]
    _exact(world, "SELECT COUNT(DISTINCT status) FROM orders", {})
    _exact(
        world,
        "SELECT COUNT(DISTINCT status, amount_cents) FROM orders WHERE user_id IN (:a, :b, :c)",
        dict(zip("abc", spelled, strict=True)),
    )


@pytest.mark.parametrize(
    ("sql", "names"),
    [
        ("SELECT COUNT(DISTINCT merchant_id), COUNT(DISTINCT status) FROM orders", "differ"),
        ("SELECT COUNT(DISTINCT user_id), COUNT(DISTINCT status) FROM orders", "differ"),
        (
            "SELECT merchant_id FROM orders GROUP BY merchant_id"
            " HAVING COUNT(DISTINCT status) > 1 ORDER BY SUM(DISTINCT amount_cents)",
            "differ",
        ),
        ("SELECT COUNT(DISTINCT :p) FROM orders", "parameters"),
        ("SELECT COUNT(DISTINCT 1) FROM orders", "column"),
        (
            "SELECT COUNT(DISTINCT (SELECT MAX(code) FROM countries)) FROM orders",
            "subquery",
        ),
        ("SELECT SUM(DISTINCT status) FROM orders", "string"),
        ("SELECT line, AVG(DISTINCT sku) FROM order_items GROUP BY 1", "string"),
    ],
)
def test_distinct_aggregates_the_merge_cannot_fetch_are_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    names: str,
) -> None:
    refused(world, sql, {"p": 3}, match=names)


def test_the_distinct_values_are_capped(world: dict[str, Any]) -> None:  # noqa: F811
    """max_distinct_rows bounds the rows one shard sends for such a merge."""
    router = Router(world["topology"], max_distinct_rows=10)
    try:
        with pytest.raises(FanoutLimitError, match="max_distinct_rows=10"):
            router.execute("SELECT COUNT(DISTINCT merchant_id, status) FROM orders")
        # Within the cap: 2 statuses, 2 rows per split table of a shard.
        splits = len(world["topology"].table("orders").physical_names)
        assert 2 * splits <= 10
        sql = "SELECT COUNT(DISTINCT status) FROM orders WHERE status IN ('new', 'paid')"
        assert router.execute(sql).rows == [(2,)]
    finally:
        router.close()
