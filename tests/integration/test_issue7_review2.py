"""Issue 7 second review: reproductions of defects in the last round of fixes (0f68e7f..HEAD),
each on real MariaDB shards compared with one MariaDB holding every row (the oracle).

These tests document defects: a failing test here is a finding, not a broken test.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.test_issue7_review import check, oracle_rows, world  # noqa: F401  (fixture)

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


def test_group_by_alias_shadowing_an_unmentioned_column(world: dict[str, Any]) -> None:
    """`users.name` exists but the statement names it nowhere else: MariaDB's GROUP BY name takes
    the column users.name (column before alias, 10 groups); the router groups by the alias
    UPPER(tier) (3 groups, counts not even those of tier)."""
    sql = "SELECT COUNT(*) AS n, UPPER(tier) AS name FROM users GROUP BY name"
    _, expected = oracle_rows(world, sql)
    for answer in (
        world["router"].execute(sql),
        world["loop"].run_until_complete(world["aio"].execute(sql)),
    ):
        assert sorted(r[0] for r in answer.rows) == sorted(r[0] for r in expected), sql


def test_derived_table_string_column_named_like_the_int_key(world: dict[str, Any]) -> None:
    """A derived table's string column named user_id is classified an int sharding key (the
    single table found is inside the subquery): no weight, so case variants split."""
    check(
        world,
        "SELECT d.user_id, COUNT(*) AS n FROM (SELECT IF(user_id % 2 = 0, 'a', 'A') AS user_id"
        " FROM orders) AS d GROUP BY d.user_id",
        ordered=False,
    )
    check(
        world,
        "SELECT user_id, COUNT(*) AS n FROM (SELECT IF(user_id % 2 = 0, 'a', 'A') AS user_id"
        " FROM orders) AS d GROUP BY user_id",
        ordered=False,
    )


def test_dayname_group_merges_case_variants(world: dict[str, Any]) -> None:
    check(
        world,
        "SELECT IF(merchant_id % 2 = 0, 'x', 'X') AS k, COUNT(*) AS n FROM orders GROUP BY k",
        ordered=False,
    )
