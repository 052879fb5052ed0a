"""Issue 7 round 3, merge and planner defects (fuzz findings and review reproductions) on 4
MariaDB shards against one MariaDB holding every row: HAVING evaluated after the merge by an
allow-list evaluator with MariaDB's name resolution and comparison rules, GROUP BY names."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from test_issue7_review import _norm, oracle_rows, world  # noqa: F401  (the module fixture)

from shardrouter.errors import UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


def answers(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    params: dict[str, Any] | None = None,
    ordered: bool = True,
) -> None:
    """The sync and the async router answer ``sql`` as the oracle does (no refusal)."""
    labels, expected = oracle_rows(world, sql, params)
    sync = world["router"].execute(sql, params or {})
    aio = world["loop"].run_until_complete(world["aio"].execute(sql, params or {}))
    for name, answer in (("sync", sync), ("async", aio)):
        got = _norm(answer.rows)
        if ordered:
            assert got == expected, f"{name}: {sql}"
        else:
            assert Counter(got) == Counter(expected), f"{name}: {sql}"
        assert tuple(answer.columns) == labels, f"{name}: {sql}"


def refused(world: dict[str, Any], sql: str) -> None:  # noqa: F811
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql)
    with pytest.raises(UnsupportedQueryError):
        world["loop"].run_until_complete(world["aio"].execute(sql))


def test_having_with_nullif_over_aliases_is_evaluated_after_the_merge(
    world: dict[str, Any],  # noqa: F811
) -> None:
    """Fuzz finding: HAVING a0 / NULLIF(a1, 0) > 0 was sent to the shards, which do not know
    the aliases (error 1054)."""
    amount = next(o["amount_cents"] for o in world["data"]["orders"] if o["amount_cents"])
    for p0 in ("0", str(amount)):
        answers(
            world,
            "SELECT o.order_id AS order_id, COUNT(*) AS a0, COUNT(*) AS a1 FROM orders AS o"
            " WHERE o.amount_cents = :p0 GROUP BY o.order_id"
            " HAVING a0 / NULLIF(a1, 0) > 0 ORDER BY order_id DESC",
            {"p0": p0},
        )


@pytest.mark.parametrize(
    "having",
    [
        "NULLIF(n, 2) IS NULL OR NULLIF(n, 2) > 0",
        "NULLIF(COUNT(*), 1) > 1",
        "IFNULL(s, 0) > 900",
        "COALESCE(s, m, 0) >= 500",
        "IFNULL(s, -1) < 0",
        "IF(n > 1, s, 0) > 1000",
        "IF(n - 1, 1, 0) = 1",
        "ABS(m - 500) < 200",
        "ABS(-n) = 1",
        "s / NULLIF(n - 1, 0) > 300",
    ],
)
def test_having_functions_compute_what_one_database_computes(
    world: dict[str, Any],  # noqa: F811
    having: str,
) -> None:
    if "(COUNT(" in having:  # (MariaDB answers NULLIF over an aggregate in HAVING wrongly)
        refused(
            world,
            "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id HAVING " + having,
        )
        return
    answers(
        world,
        "SELECT user_id, COUNT(*) AS n, SUM(amount_cents) AS s, MAX(amount_cents) AS m"
        f" FROM orders GROUP BY user_id HAVING {having} ORDER BY user_id",
    )


def test_having_names_resolve_as_mariadb_resolves_them(world: dict[str, Any]) -> None:  # noqa: F811
    """A select alias shadowing a column (fuzz finding) is the alias in HAVING, unless the
    column is a GROUP BY column of that name: then it is the column."""
    answers(
        world,
        "SELECT o.order_id AS merchant_id, COUNT(*) AS a0 FROM orders AS o"
        " GROUP BY o.order_id HAVING merchant_id > 3 ORDER BY merchant_id",
    )
    answers(
        world,
        "SELECT merchant_id AS user_id, COUNT(*) AS n FROM orders GROUP BY orders.user_id"
        " HAVING user_id > 100000 ORDER BY n, user_id",
        ordered=False,
    )


def test_having_refuses_what_it_does_not_evaluate(world: dict[str, Any]) -> None:  # noqa: F811
    """A function the evaluator does not implement is refused typed (before: sent to the
    shards, which do not know the alias or see only partial groups)."""
    refused(
        world,
        "SELECT user_id, MAX(status) AS st FROM orders GROUP BY user_id HAVING LENGTH(st) > 3",
    )
    refused(
        world,
        "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id HAVING SQRT(n) > 1",
    )


def test_group_by_a_name_that_is_a_column_and_an_alias_groups_by_the_column(
    world: dict[str, Any],  # noqa: F811
) -> None:
    """MariaDB groups `merchant_id AS user_id ... GROUP BY user_id` by the column user_id (a
    column of that name first, then the alias); the merge grouped by the alias. Known columns:
    the sharding keys and names used as columns in the select items, WHERE and ON."""
    answers(
        world,
        "SELECT merchant_id AS user_id, COUNT(*) AS n FROM orders GROUP BY user_id",
        ordered=False,
    )
    answers(
        world,
        "SELECT MAX(merchant_id) AS status, COUNT(*) AS n FROM orders WHERE status <> 'x'"
        " GROUP BY status HAVING status <> 'VOID' ORDER BY n, status",
        ordered=False,
    )
    answers(
        world,
        "SELECT UPPER(status) AS k, COUNT(*) AS n FROM orders GROUP BY 1 ORDER BY k",
    )
    answers(
        world,
        "SELECT user_id AS user_id, COUNT(*) AS n FROM orders GROUP BY user_id ORDER BY user_id",
    )


def test_having_compares_numbers_with_string_constants_as_mariadb(
    world: dict[str, Any],  # noqa: F811
) -> None:
    """An integer or a DECIMAL against a string constant compares as DECIMAL (exactly); a
    DOUBLE as a double."""
    order = world["data"]["orders"][0]["order_id"]
    for op in ("=", ">=", "<", "<>"):
        answers(
            world,
            "SELECT user_id, MAX(order_id) AS m FROM orders GROUP BY user_id"
            f" HAVING m {op} '{order + 1}' ORDER BY user_id",
        )
    answers(
        world,
        "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id"
        " HAVING n / 3 = '0.3333' ORDER BY user_id",
    )
    answers(
        world,
        "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id"
        " HAVING n = ' 1.0abc' ORDER BY user_id",
    )


def test_delete_order_by_limit_of_a_lookup_owner_cleans_only_the_deleted_rows(
    world: dict[str, Any],  # noqa: F811
) -> None:
    """One target: DELETE ... ORDER BY ... LIMIT of orders (which owns merchant_orders rows) is
    routed, and only the deleted row's lookup row goes (RETURNING after the LIMIT). Across
    shards it stays refused (each shard would apply its own LIMIT)."""
    router = world["router"]
    user = world["data"]["orders"][1]["user_id"]
    ids = router.topology.id_generator("orders", worker_id=23)
    first, second = ids.next_ids(2, user_id=user)
    for order_id, merchant in ((first, 971), (second, 972)):
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
            " VALUES (:o, :u, :m, 5, 'r3')",
            {"o": order_id, "u": user, "m": merchant},
        )
    result = router.execute(
        "DELETE FROM orders WHERE user_id = :u AND status = 'r3' ORDER BY order_id LIMIT 1",
        {"u": user},
    )
    assert result.rowcount == 1
    lookups = router.execute(
        "SELECT merchant_id, order_id FROM merchant_orders WHERE merchant_id IN (971, 972)"
        " ORDER BY merchant_id"
    ).rows
    assert [tuple(r) for r in lookups] == [(972, second)]
    left = router.execute("SELECT order_id FROM orders WHERE merchant_id = 972").rows
    assert [r[0] for r in left] == [second]
    # every user's id: the IN list reaches every shard
    users = sorted({o["user_id"] for o in world["data"]["orders"]})
    marks = ", ".join(f":u{i}" for i in range(len(users)))
    with pytest.raises(UnsupportedQueryError, match="LIMIT"):
        router.execute(
            f"DELETE FROM orders WHERE user_id IN ({marks}) AND status = 'r3'"
            " ORDER BY order_id LIMIT 1",
            {f"u{i}": u for i, u in enumerate(users)},
        )
    router.execute("DELETE FROM orders WHERE order_id = :o", {"o": second})
