"""Issue 7 round 3: how the planner renders REGEXP and bare UTC_* functions, and which
HAVING and GROUP BY shapes the scatter refuses (the MariaDB answers are in
tests/integration/test_issue7_r3_merge_mariadb.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql.planner import Plan, Planner, Target

CONFIG = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(Topology.load(CONFIG))


def one(plan: Plan) -> str:
    return plan.render(Target("s0", 0), scatter=False)


def test_regexp_reaches_the_shards_as_regexp(planner: Planner) -> None:
    sql = one(
        planner.plan(
            "SELECT order_id FROM orders WHERE user_id = :u AND status REGEXP '^p'"
            " AND NOT status RLIKE 'x$'"
        )
    )
    assert "REGEXP_LIKE" not in sql
    assert "(status REGEXP '^p')" in sql and "NOT (status REGEXP 'x$')" in sql


def test_regexp_like_with_flags_is_refused(planner: Planner) -> None:
    with pytest.raises(UnsupportedQueryError, match="REGEXP_LIKE"):
        planner.plan("SELECT REGEXP_LIKE(status, 'a', 'i') FROM orders WHERE user_id = :u")


@pytest.mark.parametrize("name", ["UTC_DATE", "UTC_TIME", "UTC_TIMESTAMP"])
def test_bare_utc_functions_are_the_functions(planner: Planner, name: str) -> None:
    plan = planner.plan(f"SELECT {name} AS d FROM users WHERE user_id = :u")
    assert f"{name}() AS d" in one(plan)
    # like its parenthesised form: one target only (each shard reads its own clock)
    assert plan.scatter_refusal is not None and "clock" in plan.scatter_refusal


def test_a_quoted_utc_date_is_a_column(planner: Planner) -> None:
    assert "`UTC_DATE`" in one(planner.plan("SELECT `UTC_DATE` FROM users WHERE user_id = :u"))


def test_json_extract_path_and_str_to_date_with_a_time_render_as_written(
    planner: Planner,
) -> None:
    sql = one(
        planner.plan(
            "SELECT JSON_EXTRACT(email, '$.a[1]', '$.\"b c\"[*]') AS j,"
            " STR_TO_DATE(email, '%d/%m/%Y %l:%i %p') AS t FROM users WHERE user_id = :u"
        )
    )
    assert "JSON_EXTRACT(email, '$.a[1]', '$.\"b c\"[*]')" in sql
    assert "STR_TO_DATE(email, '%d/%m/%Y %l:%i %p')" in sql


def fanned(plan: Plan) -> str:
    return plan.render(Target("s0", 0), scatter=True)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id, created_at FROM orders ORDER BY order_id DESC LIMIT 20",
        "SELECT o.user_id, COUNT(*) FROM orders o GROUP BY o.user_id ORDER BY o.user_id",
        "SELECT YEAR(created_at) AS y, COUNT(*) FROM orders GROUP BY 1 ORDER BY y",
        "SELECT DISTINCT DATE(created_at), LENGTH(status), ABS(amount_cents) FROM orders",
        "SELECT MIN(order_id), MAX(user_id) FROM orders",
        "SELECT order_id FROM orders ORDER BY DATEDIFF(created_at, '2026-01-01'), order_id",
    ],
)
def test_keys_that_are_never_strings_get_no_weight(planner: Planner, sql: str) -> None:
    """Issue 7 item 6: the collation weight column costs a shard expression and a merge
    comparison per row; integer sharding keys, date parts and numeric functions need none."""
    assert "WEIGHT_STRING" not in fanned(planner.plan(sql))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id, status FROM orders ORDER BY status LIMIT 20",
        "SELECT MAX(created_at) FROM orders",  # not a key: its type is unknown
        # a join: an unqualified name could be either table's column
        "SELECT o.order_id FROM orders o JOIN order_items i ON i.order_id = o.order_id"
        " AND i.user_id = o.user_id ORDER BY sku",
    ],
)
def test_keys_that_may_be_strings_keep_their_weight(planner: Planner, sql: str) -> None:
    assert "WEIGHT_STRING" in fanned(planner.plan(sql))
