"""Review 16: attacks on issue 11 items 1, 2 and 9 (joins of tables sharded alike across split
counts, confined subqueries, DISTINCT of a partitioned key) on 4 MariaDB shards against the
one-database oracle. Each test is a minimal reproduction of a silent wrong answer: the router
must either answer as the oracle does or refuse with UnsupportedQueryError."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import _norm, world  # noqa: F401  (the module's 4 shards + oracle)
from test_sql_coverage import people  # noqa: F401  (users split 1, orders split 4)

from shardrouter.errors import UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _oracle(world: dict[str, Any], sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:  # noqa: F811
    with world["oracle"].connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def same_or_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    params: dict[str, Any] | None = None,
) -> None:
    """The router (sync and async) answers as the oracle, or refuses the statement."""
    params = params or {}
    expected = _oracle(world, sql, params)
    for run in (
        lambda: world["router"].execute(sql, params).rows,
        lambda: world["loop"].run_until_complete(world["aio"].execute(sql, params)).rows,
    ):
        try:
            got = run()
        except UnsupportedQueryError:
            continue
        assert Counter(_norm(got)) == Counter(_norm(expected)), (sql, params, got, expected)


# -- 1. a split-1 table read whole in every split of a split-4 table met only in a subquery --
# users (split 1) in the FROM, orders (split 4) only inside a correlated subquery: orders
# drives (4 targets per shard), each target reads all of the shard's users, and the subquery
# sees one split's orders. EXISTS happens to be right (true in one split only); anything true
# where the user has no orders in that split (NOT EXISTS, NOT IN, OR, a scalar compared) keeps
# the user once per split.

WIDER_ONLY_IN_SUBQUERY = [
    "SELECT u.user_id FROM users u WHERE NOT EXISTS (SELECT 1 FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'paid')",
    "SELECT COUNT(*) FROM users u WHERE NOT EXISTS (SELECT 1 FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'paid')",
    "SELECT u.user_id FROM users u WHERE u.user_id NOT IN (SELECT o.user_id FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'paid')",
    "SELECT COUNT(*) FROM users u WHERE u.name = 'name-1' OR EXISTS (SELECT 1 FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'paid')",
    "SELECT COUNT(*) FROM users u WHERE (SELECT COUNT(*) FROM orders o"
    " WHERE o.user_id = u.user_id) >= 0",
    "SELECT COUNT(DISTINCT u.user_id) FROM users u WHERE NOT EXISTS (SELECT 1 FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'paid')",
    "SELECT u.name, COUNT(*) FROM users u WHERE u.user_id NOT IN (SELECT o.user_id FROM orders o"
    " WHERE o.user_id = u.user_id AND o.status = 'new') GROUP BY u.name",
    # a co-located EXISTS over users itself does not narrow the splits
    "SELECT COUNT(*) FROM users u WHERE EXISTS (SELECT 1 FROM users v WHERE v.user_id ="
    " u.user_id) AND NOT EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.user_id)",
]


@pytest.mark.parametrize("sql", WIDER_ONLY_IN_SUBQUERY)
def test_review16_split1_outer_rows_repeat_per_split_of_subquery_table(
    world: dict[str, Any],  # noqa: F811
    people: list[int],  # noqa: F811
    sql: str,
) -> None:
    same_or_refused(world, sql)


# -- 2. a subquery confined to a key value runs where another condition routed ---------------
# _key_values accepts the inner `user_id = :u` because the outer WHERE has `o.user_id = :u`,
# but the statement is routed by the cheapest condition, the gene key order_id (cost 0 < hash
# 1), or by the first of two equalities: the subquery runs on another shard than its rows.


def test_review16_value_confined_subquery_runs_on_the_gene_keys_target(
    world: dict[str, Any],  # noqa: F811
) -> None:
    orders = world["data"]["orders"]
    topology = world["topology"]
    rule = topology.table("orders")
    user = orders[0]["user_id"]
    slot_u = rule.keys["user_id"].slot(user)
    other = next(
        o
        for o in orders
        if (slot := rule.keys["order_id"].slot(o["order_id"])) % 4 != slot_u % 4
        or topology.shard_of_slot(slot) != topology.shard_of_slot(slot_u)
    )
    sql = (
        "SELECT COUNT(*) AS n, (SELECT COUNT(*) FROM orders p WHERE p.user_id = :u) AS m"
        " FROM orders o WHERE o.order_id = :oid AND o.user_id = :u"
    )
    same_or_refused(world, sql, {"u": user, "oid": other["order_id"]})


def test_review16_value_confined_subquery_on_the_second_of_two_equalities(
    world: dict[str, Any],  # noqa: F811
) -> None:
    orders = world["data"]["orders"]
    a, b = orders[0]["user_id"], orders[40]["user_id"]
    sql = (
        "SELECT COUNT(*) AS n, (SELECT COUNT(*) FROM orders p WHERE p.user_id = :b) AS m"
        " FROM orders o WHERE o.user_id = :a AND o.user_id = :b"
    )
    same_or_refused(world, sql, {"a": a, "b": b})


# -- 3. a subquery alias equal to an outer alias hides the outer join from the co-location
# check: _refuse_unsafe_joins maps every table reference of the whole tree, subqueries too,
# by alias, so `x` (orders in the FROM) becomes the broadcast countries of the subquery.


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM users u JOIN orders x ON u.name <> x.status"
        " WHERE EXISTS (SELECT 1 FROM countries x)",
        "SELECT COUNT(*) FROM orders o JOIN order_items x ON x.sku <> o.status"
        " WHERE EXISTS (SELECT 1 FROM countries x)",
    ],
)
def test_review16_subquery_alias_shadows_a_non_co_located_join(
    world: dict[str, Any],  # noqa: F811
    people: list[int],  # noqa: F811
    sql: str,
) -> None:
    same_or_refused(world, sql)


# -- 4. a parenthesized join is not a Table: _refuse_unsafe_joins skips it (co-location and the
# split-count check for outer joins). Older for one bound group; now users joins it too.


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) FROM users u JOIN (orders o JOIN order_items i"
        " ON i.order_id = o.order_id) ON u.name <> o.status",
        "SELECT COUNT(*) FROM users u LEFT JOIN (orders o JOIN order_items i"
        " ON i.order_id = o.order_id) ON o.user_id = u.user_id",
        "SELECT COUNT(*) FROM orders o JOIN (order_items i, orders p) ON i.order_id = o.order_id",
    ],
)
def test_review16_parenthesized_join_escapes_the_co_location_check(
    world: dict[str, Any],  # noqa: F811
    people: list[int],  # noqa: F811
    sql: str,
) -> None:
    same_or_refused(world, sql)
