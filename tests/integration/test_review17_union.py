"""Review 17 (issue 11 item 6, UNION / UNION ALL, ef1eb9f): failing tests for silent wrong
answers against the one-database oracle (types compared by repr)."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import users, world  # noqa: F401

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _oracle(world: dict[str, Any], sql: str, params: dict[str, Any]) -> Any:  # noqa: F811
    with world["oracle"].connect() as conn:
        result = conn.execute(text(sql), params)
        return tuple(result.keys()), [tuple(r) for r in result]


def _exact(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> None:  # noqa: F811
    params = params or {}
    expected = _oracle(world, sql, params)
    sync = world["router"].execute(sql, params)
    aio = world["loop"].run_until_complete(world["aio"].execute(sql, params))
    for got in (sync, aio):
        assert repr((tuple(got.columns), list(got.rows))) == repr(expected), sql


def test_having_param_in_the_first_member_fanned_out(world: dict[str, Any]) -> None:  # noqa: F811
    # The first member is planned with the whole UNION's text, and its late binder
    # (HAVING :n across shards) re-plans that text: each shard then runs the whole UNION
    # and the per-shard rows are concatenated, unmerged (router: 16 rows (0, partial MAX)...).
    _exact(
        world,
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id HAVING COUNT(*) > :n"
        " UNION ALL SELECT merchant_id, MAX(amount_cents) FROM orders GROUP BY merchant_id"
        " ORDER BY 1, 2",
        {"n": 30},
    )
    _exact(
        world,
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id HAVING COUNT(*) > :n"
        " UNION ALL SELECT 99, 1 FROM countries ORDER BY 1, 2",
        {"n": 30},
    )


def test_decimal_member_without_rows_still_types_the_column(
    world: dict[str, Any],  # noqa: F811
) -> None:
    # MySQL types a UNION column from every SELECT's column type, rows or not: DECIMAL(.,4)
    # here (oracle Decimal('49917.0000')); the router looks only at the values it got (49917).
    _exact(
        world,
        "SELECT amount_cents FROM orders WHERE merchant_id = 1 UNION ALL"
        " SELECT amount_cents/100 FROM orders WHERE order_id < 0 ORDER BY 1 DESC LIMIT 3",
    )


def test_decimal_scale_of_a_member_without_rows(world: dict[str, Any]) -> None:  # noqa: F811
    # Oracle Decimal('499.17000') (scale 5 from the empty SELECT); router Decimal('499.1700').
    _exact(
        world,
        "SELECT amount_cents/100 FROM orders WHERE merchant_id = 1 UNION ALL"
        " SELECT amount_cents*1.00000 FROM orders WHERE merchant_id = 2 AND order_id < 0"
        " ORDER BY 1 DESC LIMIT 3",
    )


def test_double_member_of_only_nulls_makes_the_column_double(
    world: dict[str, Any],  # noqa: F811
) -> None:
    # Oracle 49917.0 (DOUBLE); router 49917 (int): the DOUBLE SELECT returned only NULLs.
    _exact(
        world,
        "SELECT amount_cents FROM orders WHERE merchant_id = 1 UNION ALL"
        " SELECT amount_cents*1e0 FROM orders WHERE merchant_id = 2 AND amount_cents IS NULL"
        " ORDER BY 1 DESC LIMIT 3",
    )


def test_decimal_scale_beyond_python_precision(world: dict[str, Any]) -> None:  # noqa: F811
    # An 18-digit BIGINT brought to scale 12: 30 digits, beyond the default decimal context
    # (28): _at_scale's quantize raises decimal.InvalidOperation instead of answering.
    _exact(
        world,
        "SELECT order_id FROM orders WHERE merchant_id = 1 UNION ALL"
        " SELECT amount_cents * 1.000000000000 FROM orders WHERE merchant_id = 2"
        " ORDER BY 1 DESC LIMIT 2",
    )


def test_broadcast_only_union_in_a_transaction_uses_the_bound_shard(
    world: dict[str, Any],  # noqa: F811
) -> None:
    # A broadcast SELECT in a transaction runs on its bound shard; a UNION of broadcast
    # SELECTs is sent (not marked anywhere) to the first read shard and binds there:
    # CrossShardTransactionError after a statement on another shard, and as the first
    # statement it binds the transaction to that shard.
    sql = "SELECT code FROM countries UNION SELECT name FROM countries ORDER BY 1"
    expected = _oracle(world, sql, {})[1]
    for user in users(world)[:8]:
        with world["router"].transaction() as tx:
            tx.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": user})
            assert tx.execute(sql).rows == expected
        with world["router"].transaction() as tx:
            assert tx.execute(sql).rows == expected
            tx.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": user})
