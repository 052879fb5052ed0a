"""Review findings in the planner alone (no database): each a known bug, xfail(strict=True)."""

from __future__ import annotations

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql.planner import Planner


@pytest.fixture
def planner(orders_topology: Topology) -> Planner:
    return Planner(orders_topology)


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE orders SET USER_ID = 5 WHERE user_id = 1",
        "UPDATE orders SET Merchant_Id = 5 WHERE user_id = 1",
        "UPDATE orders SET ORDER_ID = 5 WHERE user_id = 1",
        "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, :m)"
        " ON DUPLICATE KEY UPDATE USER_ID = VALUES(USER_ID)",
    ],
)
def test_changing_a_key_column_in_another_case_is_refused(planner: Planner, sql: str) -> None:
    with pytest.raises(UnsupportedQueryError):
        planner.plan(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT LENGTH(GROUP_CONCAT(order_id)) FROM orders",
        "SELECT status, STDDEV(amount_cents) FROM orders GROUP BY status",
        "SELECT COUNT(DISTINCT status), SUM(DISTINCT amount_cents) FROM orders",
        "SELECT AVG(DISTINCT amount_cents), COUNT(DISTINCT user_id) FROM orders",
        "SELECT order_id, ROW_NUMBER() OVER (ORDER BY order_id) FROM orders",
        "SELECT a.order_id FROM orders a JOIN orders b ON a.merchant_id = b.merchant_id",
        "SELECT o.order_id FROM orders o JOIN order_items i ON i.sku = o.status",
        "SELECT c.code, o.order_id FROM countries c LEFT JOIN orders o ON o.status = c.code",
    ],
)
def test_unmergeable_select_is_refused(planner: Planner, sql: str) -> None:
    # Refused when planned (joins that cannot meet in one shard) or, for what only a fan-out
    # cannot merge, marked so execution refuses it on more than one target.
    try:
        plan = planner.plan(sql)
    except UnsupportedQueryError:
        return
    assert plan.scatter_refusal is not None and plan.merge is None


def test_order_by_prefers_the_select_alias(planner: Planner) -> None:
    plan = planner.plan(
        "SELECT user_id AS amount_cents, amount_cents AS user_id FROM orders ORDER BY user_id"
    )
    assert plan.merge is not None
    assert [k.index for k in plan.merge.order_by] == [1]  # MariaDB sorts by the alias


def test_parameter_limit_on_a_point_query_is_planned(planner: Planner) -> None:
    plan = planner.plan("SELECT order_id FROM orders WHERE user_id = :u ORDER BY order_id LIMIT :n")
    assert plan.routing_condition is not None and plan.scatter_refusal is None
    # Fanned out, it is planned again with the value written in (shardrouter.sql.late).
    assert plan.late is not None and plan.late.limit == ("n",) and plan.bind_late is not None
    bound = plan.bind_late({"u": 1, "n": 20})
    assert bound.merge is not None and bound.merge.limit == 20 and bound.late is None
