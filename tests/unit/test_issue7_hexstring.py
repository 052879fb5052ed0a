"""X'..' hex strings are refused: sqlglot parses X'07' and 0x07 into one node and renders 0x07,
but MariaDB compares them differently (`7 = X'07'` is 0, `7 = 0x07` is 1), so the shards would
answer another statement (found by tools/fuzz: `merchant_id = 0x1 OR merchant_id = X'07'`)."""

from __future__ import annotations

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql.planner import Planner


@pytest.fixture(scope="module")
def planner(orders_topology: Topology) -> Planner:
    return Planner(orders_topology)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id FROM orders WHERE merchant_id = X'07'",
        "SELECT order_id FROM orders WHERE merchant_id = 0x1 OR merchant_id = x'07'",
        "UPDATE orders SET status = X'41' WHERE user_id = 1",
        "SELECT order_id FROM orders WHERE user_id = 1 AND status IN (X'41', 'b')",
    ],
)
def test_hex_strings_are_refused(planner: Planner, sql: str) -> None:
    with pytest.raises(UnsupportedQueryError, match=r"hex string X'\.\.\.'"):
        planner.plan(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id FROM orders WHERE merchant_id = 0x07",
        "SELECT order_id FROM orders WHERE status = 'x' AND user_id = 1",
        "SELECT order_id FROM orders WHERE status = 'ax''b' AND user_id = 1",
        "SELECT order_id FROM orders WHERE status = 'tax' AND user_id = 1",
        "SELECT order_id AS max FROM orders WHERE `x` = 'a' AND user_id = 1",
    ],
)
def test_hex_numbers_and_strings_ending_in_x_are_accepted(planner: Planner, sql: str) -> None:
    planner.plan(sql)
