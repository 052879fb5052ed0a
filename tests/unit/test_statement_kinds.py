"""Statements the router does not route are refused by kind, each with its own reason and way
out (issue 11 item 8: REPLACE names REPLACE and INSERT ... ON DUPLICATE KEY UPDATE, never DDL)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql.planner import Planner

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(Topology.load(REPO / "config" / "orders.yaml"))


@pytest.mark.parametrize(
    "sql",
    [
        "REPLACE INTO orders (order_id, user_id, merchant_id, status) VALUES (1, 2, 3, 'new')",
        "replace orders SET order_id = 1, user_id = 2",
        "REPLACE INTO order_items (order_id, line, user_id, sku, qty) SELECT 1, 0, 2, 'x', 1",
        "REPLACE INTO countries (code, name) VALUES ('CN', 'China')",
        "/* a comment */ REPLACE INTO countries VALUES ('CN', 'China')",
        "-- why\nREPLACE INTO countries VALUES ('CN', 'China')",
        "# why\n  REPLACE INTO countries VALUES ('CN', 'China')",
    ],
)
def test_replace_is_refused_naming_replace_and_the_alternative(
    planner: Planner, sql: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(UnsupportedQueryError) as info:
        planner.plan(sql)
    message = str(info.value)
    assert message.startswith("REPLACE is not routed")
    assert "INSERT ... ON DUPLICATE KEY UPDATE" in message and "DDL" not in message
    assert capsys.readouterr().err == ""  # refused before sqlglot warns of an opaque command


def test_the_replace_function_is_not_the_statement(planner: Planner) -> None:
    plan = planner.plan("SELECT REPLACE(status, 'a', 'b') FROM orders WHERE user_id = 1")
    assert plan.sharded is not None and plan.sharded.name == "orders"


@pytest.mark.parametrize(
    ("sql", "start", "way_out"),
    [
        ("CREATE TABLE a (x INT)", "CREATE is DDL", "shardctl schema apply"),
        ("DROP TABLE orders", "DROP is DDL", "shardctl schema apply"),
        ("ALTER TABLE orders ADD COLUMN y INT", "ALTER is DDL", "shardctl schema apply"),
        ("TRUNCATE TABLE orders", "TRUNCATE is DDL", "shardctl schema apply"),
        ("RENAME TABLE orders TO o2", "RENAME is DDL", "shardctl schema apply"),
        ("BEGIN", "BEGIN is not routed", "router.transaction()"),
        ("COMMIT", "COMMIT is not routed", "router.transaction()"),
        ("SHOW TABLES", "SHOW statements are not routed", "router.connection("),
        ("CALL p()", "CALL statements are not routed", "router.connection("),
        ("SET @a = 1", "SET statements are not routed", "router.connection("),
    ],
)
def test_other_kinds_say_what_to_do(planner: Planner, sql: str, start: str, way_out: str) -> None:
    with pytest.raises(UnsupportedQueryError) as info:
        planner.plan(sql)
    assert str(info.value).startswith(start) and way_out in str(info.value)
    if not start.endswith("is DDL"):
        assert "DDL" not in str(info.value)
