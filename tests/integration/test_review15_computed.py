"""Review 15: expressions over aggregates computed after the merge (3d153ed), attacked on 4 real
MariaDB shards against the one-database oracle. Each test is a minimal reproduction of a wrong
answer (values, Python types, DECIMAL scales by repr, labels) or of a statement MariaDB refuses
and the router answers. ``orders`` gets extra columns here: price DECIMAL(10,2), small INT and
dbl DOUBLE, the same values on the shards and on the oracle."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import world  # noqa: F401  (the module's 4 shards + oracle)

from shardrouter.errors import UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

_DDL = "ADD COLUMN price DECIMAL(10,2) NULL, ADD COLUMN small INT NULL, ADD COLUMN dbl DOUBLE NULL"
_FILL = (
    "SET price = ((amount_cents % 997) - 300) / 100, small = (amount_cents % 11) - 5,"
    " dbl = amount_cents / 7e0"
)


@pytest.fixture(scope="module")
def w(world: dict[str, Any]) -> dict[str, Any]:  # noqa: F811
    for engine in world["router"].engines.primaries.values():
        with engine.begin() as conn:
            for name in world["topology"].table("orders").physical_names:
                conn.execute(text(f"ALTER TABLE {name} {_DDL}"))
                conn.execute(text(f"UPDATE {name} {_FILL}"))
    with world["oracle"].begin() as conn:
        conn.execute(text(f"ALTER TABLE orders {_DDL}"))
        conn.execute(text(f"UPDATE orders {_FILL}"))
    return world


def _exact(rows: Any) -> list[tuple[str, ...]]:
    return [tuple(map(repr, r)) for r in rows]


def same(w: dict[str, Any], sql: str) -> list[tuple[Any, ...]]:
    """The router (sync and async) answers exactly as the oracle: reprs and labels; if the
    oracle refuses the statement, the router must refuse it too (not answer)."""
    try:
        with w["oracle"].connect() as conn:
            result = conn.execute(text(sql))
            labels, expected = list(result.keys()), [tuple(r) for r in result]
    except Exception as error:  # MariaDB refuses it: so must the router
        with pytest.raises(Exception):  # noqa: B017
            w["router"].execute(sql, {})
        return [("oracle error", str(error))]
    got = w["router"].execute(sql, {})
    assert list(got.columns) == labels, sql
    assert _exact(got.rows) == _exact(expected), sql
    aio = w["loop"].run_until_complete(w["aio"].execute(sql, {}))
    assert _exact(aio.rows) == _exact(expected), sql
    return expected


def same_or_refused(w: dict[str, Any], sql: str) -> None:
    try:
        w["router"].execute(sql, {})
    except UnsupportedQueryError:
        return
    same(w, sql)


# -- 1. strings from CASE/IF/COALESCE compared and ordered in binary, not the collation ----------


@pytest.mark.parametrize(
    "sql",
    [
        # MariaDB (utf8mb4 ci collation): 'x' = 'X'; the router returns no row
        "SELECT merchant_id, IF(COUNT(*) > 50, 'x', 'y') AS k FROM orders GROUP BY merchant_id"
        " HAVING k = 'X' ORDER BY merchant_id",
        "SELECT merchant_id, COALESCE(MAX(status), 'q') AS c FROM orders GROUP BY merchant_id"
        " HAVING c = 'SHIPPED' ORDER BY merchant_id",
        # inside the select list: 0 for every group instead of 1
        "SELECT merchant_id, IF(COUNT(*) > 50, 'x', 'y') = 'X' AS k FROM orders"
        " GROUP BY merchant_id ORDER BY merchant_id",
        # PAD SPACE: 'a ' = 'a'
        "SELECT merchant_id, IF(COUNT(*) > 50, 'a ', 'a') AS k FROM orders GROUP BY merchant_id"
        " HAVING k = 'a' ORDER BY merchant_id",
        # ORDER BY: 'a' < 'B' under the collation, 'B' < 'a' in binary
        "SELECT merchant_id, IF(COUNT(*) > 50, 'a', 'B') AS k FROM orders GROUP BY merchant_id"
        " ORDER BY k, merchant_id",
    ],
)
def test_computed_strings_compare_under_the_collation(w: dict[str, Any], sql: str) -> None:
    same_or_refused(w, sql)


# -- 2. SELECT * next to an expression over aggregates: the item comes back NULL -----------------


def test_star_next_to_an_expression_over_aggregates(w: dict[str, Any]) -> None:
    sql = "SELECT *, COUNT(*) + 1 FROM orders"
    try:
        got = w["router"].execute(sql, {})
    except UnsupportedQueryError:
        return  # refusing it (as SELECT *, COUNT(*) is refused) is fine
    with w["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(text(sql))]
    # the row's other columns are any row's (MariaDB picks one); the count is not
    assert [r[-1] for r in got.rows] == [r[-1] for r in expected]  # router: [None], oracle: [589]


# -- 3. HAVING reads a quotient alias (computed or AVG) rounded; MariaDB keeps its digits --------


@pytest.mark.parametrize(
    "sql",
    [
        # q = 7.714285714 in MariaDB, q * 7 = 54.0000 = 54; the router: 7.7143 * 7 = 54.0001
        "SELECT merchant_id, COUNT(*)/7 AS q FROM orders GROUP BY merchant_id"
        " HAVING q*7 = COUNT(*) ORDER BY merchant_id",
        "SELECT merchant_id, AVG(small) a FROM orders GROUP BY merchant_id"
        " HAVING a * COUNT(small) = SUM(small) ORDER BY merchant_id",
    ],
)
def test_having_arithmetic_on_a_quotient_alias(w: dict[str, Any], sql: str) -> None:
    same_or_refused(w, sql)


# -- 4. BETWEEN, IN and comparisons with a DOUBLE see the quotient unrounded in MariaDB ----------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id"
        " HAVING COUNT(*)/7 BETWEEN 7.7143 AND 7.7143",
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id"
        " HAVING COUNT(*)/7 IN (7.7143, 8) ORDER BY merchant_id",
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id HAVING COUNT(*)/7 = 7.7143e0",
        "SELECT merchant_id, COUNT(*)/7 AS q FROM orders GROUP BY merchant_id"
        " HAVING q IN (7.7143, 8) ORDER BY merchant_id",
        "SELECT merchant_id, COUNT(*)/7 BETWEEN 7.7143 AND 7.7143 AS b, COUNT(*)/7 IN (7.7143, 8)"
        " AS i, COUNT(*)/7 = 7.7143e0 AS d FROM orders GROUP BY merchant_id ORDER BY merchant_id",
    ],
)
def test_between_in_and_double_comparisons_of_a_quotient(w: dict[str, Any], sql: str) -> None:
    same_or_refused(w, sql)


# -- 5. HAVING on the alias of NULLIF over an aggregate: MariaDB's (odd) answer is not mimicked ---


@pytest.mark.parametrize("having", ["n IS NULL", "n > 50", "n IS NOT NULL"])
def test_having_on_alias_of_nullif_over_an_aggregate(w: dict[str, Any], having: str) -> None:
    same_or_refused(
        w,
        "SELECT merchant_id, NULLIF(COUNT(*), 50) AS n FROM orders GROUP BY merchant_id"
        f" HAVING {having} ORDER BY merchant_id",
    )


# -- 6. COALESCE/IF/CASE: one result type and scale for all branches -----------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # DECIMAL branches: the largest scale (1.50, not 1.5)
        "SELECT merchant_id, IF(COUNT(*) > 50, 1.5, 2.25) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
        # an integer branch beside a DECIMAL(10,2) SUM/MAX: 1.00 (router: Decimal('1') / int 1)
        "SELECT merchant_id, IF(COUNT(*) > 50, SUM(price), 1) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
        "SELECT merchant_id, IF(COUNT(*) > 50, MAX(price), 1) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
        "SELECT merchant_id, IF(COUNT(*) > 50, SUM(amount_cents)/7, 1) FROM orders"
        " GROUP BY merchant_id ORDER BY merchant_id",
        "SELECT COALESCE(SUM(price), 0), COALESCE(MAX(price), 0), COALESCE(AVG(price), 0)"
        " FROM orders WHERE 1 = 0",
        # a DOUBLE branch makes the result a DOUBLE (router: Decimal('0'), int 54)
        "SELECT COALESCE(SUM(dbl), 0) FROM orders WHERE 1 = 0",
        "SELECT merchant_id, IF(COUNT(*) > 50, COUNT(*), 1e0) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
        "SELECT merchant_id, IF(COUNT(*) > 50, 1.5, MAX(dbl)) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
    ],
)
def test_branches_take_one_type_and_scale(w: dict[str, Any], sql: str) -> None:
    same_or_refused(w, sql)


# -- 7. negative zero: MariaDB never returns DECIMAL -0 ------------------------------------------


@pytest.mark.parametrize(
    "item",
    ["SUM(small) % 3", "ROUND(SUM(small)*5, -2)", "ROUND(AVG(small))", "-SUM(small)*0"],
)
def test_no_negative_zero(w: dict[str, Any], item: str) -> None:
    same_or_refused(
        w, f"SELECT merchant_id, {item} FROM orders GROUP BY merchant_id ORDER BY merchant_id"
    )


# -- 8. ROUND: BIGINT with negative places is a DECIMAL; the scale is at most 38 -----------------


@pytest.mark.parametrize(
    "item",
    ["ROUND(COUNT(*), -1)", "ROUND(MIN(amount_cents), -2)", "ROUND(COUNT(*), -1) + 1"],
)
def test_round_of_a_bigint_to_negative_places_is_decimal(w: dict[str, Any], item: str) -> None:
    same_or_refused(
        w, f"SELECT merchant_id, {item} FROM orders GROUP BY merchant_id ORDER BY merchant_id"
    )


def test_round_scale_is_capped_at_38(w: dict[str, Any]) -> None:
    same_or_refused(w, "SELECT ROUND(SUM(price), 40) FROM orders")


# -- 9. nested quotients: MariaDB keeps a quotient to 9 more digits (a whole word), not exactly ---


@pytest.mark.parametrize(
    "item",
    [
        "COUNT(*)/7/7*49",  # MariaDB: 43.99999999 for 44 rows; the router 44.00000000
        "SUM(price)/3/7",
        "(SUM(amount_cents)/7) * (SUM(amount_cents)/7)",
    ],
)
def test_nested_quotients_keep_mariadb_digits(w: dict[str, Any], item: str) -> None:
    same_or_refused(
        w, f"SELECT merchant_id, {item} FROM orders GROUP BY merchant_id ORDER BY merchant_id"
    )


def test_quotient_of_averages_keeps_mariadb_digits(w: dict[str, Any]) -> None:
    # MariaDB: 4705.08662675 (AVG(merchant_id) kept to 9 digits); the router: 4705.08662643
    same_or_refused(w, "SELECT AVG(amount_cents)/AVG(merchant_id) FROM orders")


# -- 10. statements MariaDB refuses are answered -------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        # 1056 Can't group on 'p'
        "SELECT COUNT(*) % 2 AS p, COUNT(*) FROM orders GROUP BY 1",
        # 1054 Unknown column 'm' in 'SELECT' (a select alias inside another item)
        "SELECT merchant_id m, COUNT(*) - m FROM orders GROUP BY merchant_id ORDER BY m",
    ],
)
def test_statements_mariadb_refuses_are_refused(w: dict[str, Any], sql: str) -> None:
    same(w, sql)
