"""ORDER BY an aggregate that is not selected: COUNT/SUM/MIN/MAX partials merge, an AVG or an
expression over aggregates does not (each shard's value would be taken as the group's). Found
by tools/fuzz: `... GROUP BY m.user_id ORDER BY AVG(m.merchant_id) DESC` ordered groups by one
shard's average."""

from __future__ import annotations

import pytest

from shardrouter.core.topology import Topology
from shardrouter.sql.planner import Planner


@pytest.fixture(scope="module")
def planner(orders_topology: Topology) -> Planner:
    return Planner(orders_topology)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT m.user_id, COUNT(*) AS a0 FROM merchant_orders m GROUP BY m.user_id"
        " ORDER BY AVG(m.merchant_id) DESC, m.user_id",
        "SELECT user_id, COUNT(*) FROM orders GROUP BY user_id ORDER BY SUM(amount_cents) / COUNT(*)",
        "SELECT user_id FROM orders GROUP BY user_id ORDER BY MAX(amount_cents) - MIN(amount_cents)",
    ],
)
def test_unselected_avg_or_aggregate_expression_in_order_by_is_refused_across_shards(
    planner: Planner, sql: str
) -> None:
    plan = planner.plan(sql)
    assert plan.scatter_refusal is not None and "select it with an alias" in plan.scatter_refusal


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT user_id, AVG(amount_cents) AS a FROM orders GROUP BY user_id ORDER BY a",
        "SELECT user_id, AVG(amount_cents) FROM orders GROUP BY user_id ORDER BY AVG(amount_cents)",
        "SELECT user_id, COUNT(*) FROM orders GROUP BY user_id ORDER BY MAX(amount_cents), user_id",
        "SELECT user_id FROM orders GROUP BY user_id ORDER BY SUM(amount_cents) DESC, user_id",
    ],
)
def test_selected_or_partial_aggregates_in_order_by_still_merge(planner: Planner, sql: str) -> None:
    plan = planner.plan(sql)
    assert plan.scatter_refusal is None and plan.merge is not None
