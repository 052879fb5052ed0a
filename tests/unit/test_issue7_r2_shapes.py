"""Issue 7 round 2, the planner's side of fuzz findings A2 (ORDER BY constants), A4 (labels as
written), A7 (environment functions), A11 (literals round-trip through the render) and A12
(SUM/AVG of quotients), without a database; tests/integration/test_issue7_r2_shapes_mariadb.py
checks the answers against MariaDB."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql import shapes
from shardrouter.sql.planner import Plan, Planner, Target

CONFIG = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"
DOC = Path(__file__).resolve().parents[2] / "docs" / "SQL.md"


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(Topology.load(CONFIG))


def one(plan: Plan) -> str:
    return plan.render(Target("s0", 0), scatter=False)


def fanned(plan: Plan) -> str:
    return plan.render(Target("s0", 0), scatter=True)


# -- A2 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT DISTINCT 2.50 AS ka0, user_id FROM orders ORDER BY user_id DESC, 2.50 DESC LIMIT 3",
        "SELECT user_id FROM orders ORDER BY 2.5",
        "SELECT user_id FROM orders ORDER BY '1', 1e0, 0x2, NULL, TRUE",
        "SELECT COUNT(*) FROM orders GROUP BY 2.5",
        "SELECT COUNT(*) FROM orders GROUP BY '1'",
    ],
)
def test_constants_in_order_by_are_not_positions(planner: Planner, sql: str) -> None:
    plan = planner.plan(sql)  # was: ValueError: invalid literal for int()
    assert plan.scatter_refusal is None and plan.merge is not None
    if "ORDER BY" in sql and "GROUP BY" not in sql:
        # Only user_id DESC remains a sort key; the constants order nothing.
        assert [k.index for k in plan.merge.order_by] == ([1] if "DISTINCT" in sql else [])


def test_parenthesised_integers_are_positions(planner: Planner) -> None:
    plan = planner.plan("SELECT status, user_id FROM orders ORDER BY (2) DESC, 01")
    assert plan.merge is not None
    assert [(k.index, k.descending) for k in plan.merge.order_by] == [(1, True), (0, False)]


@pytest.mark.parametrize("term", ["-1", "(-1)", "0", "3"])
@pytest.mark.parametrize("clause", ["ORDER BY", "GROUP BY"])
def test_zero_negative_or_missing_positions_are_refused(
    planner: Planner, clause: str, term: str
) -> None:
    plan = planner.plan(f"SELECT status, user_id FROM orders {clause} {term}")
    assert plan.scatter_refusal is not None and "position" in plan.scatter_refusal


# -- A4 ----------------------------------------------------------------------------------------


def test_unaliased_items_are_aliased_with_their_text(planner: Planner) -> None:
    plan = planner.plan(
        "SELECT /* c */ count( * ) , u.created_at + INTERVAL 1 DAY /* t */, email,"
        " `x``y`+1, -1, 'it''s', 1.50, NULL, (email), :p + 1, CONCAT(email, ' :b') -- end\n"
        " FROM users u WHERE user_id = 1"
    )
    sql = one(plan)
    assert "COUNT(*) AS `count( * )`" in sql
    assert "u.created_at + INTERVAL '1' DAY AS `u.created_at + INTERVAL 1 DAY`" in sql
    assert "+ 1 AS ```x````y``+1`" in sql  # backticks doubled inside the alias
    assert "-1 AS `-1`" in sql
    # Columns, literals and items with parameters keep sqlglot's text (same label).
    for kept in (", email,", "'it''s',", "1.50,", "NULL,", "(email),", ":p + 1,"):
        assert kept in sql, kept
    # ':b' in the alias would be a bind parameter to SQLAlchemy's text(): not aliased.
    assert "CONCAT(email, ' :b') /* end */ FROM" in sql


def test_scatter_renders_keep_the_labels(planner: Planner) -> None:
    plan = planner.plan(
        "SELECT status, count(*), AVG( amount_cents ), AVG(amount_cents) AS `my avg`,"
        " MAX(status) FROM orders GROUP BY status"
    )
    assert plan.scatter_refusal is None
    sql = fanned(plan)
    assert "COUNT(*) AS `count(*)`" in sql
    assert "SUM(amount_cents) AS `AVG( amount_cents )`" in sql
    assert "SUM(amount_cents) AS `my avg`" in sql  # was: AS my avg (a syntax error)


def test_select_modifiers_and_nested_commas(planner: Planner) -> None:
    plan = planner.plan(
        "SELECT DISTINCT CONCAT(status, ','), IF(a, (1), 2), EXTRACT(YEAR FROM created_at)"
        " FROM orders WHERE user_id = 1"
    )
    sql = one(plan)
    assert "AS `CONCAT(status, ',')`" in sql
    assert "AS `IF(a, (1), 2)`" in sql
    assert "AS `EXTRACT(YEAR FROM created_at)`" in sql


# -- A7: environment functions -----------------------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "DATABASE()",
        "SCHEMA()",
        "USER()",
        "CURRENT_USER()",
        "CURRENT_USER",
        "SESSION_USER()",
        "SYSTEM_USER()",
        "@@hostname",
        "@@global.port",
        "@@SESSION.server_id",
    ],
)
def test_identity_functions_are_refused_on_one_target(planner: Planner, expr: str) -> None:
    with pytest.raises(UnsupportedQueryError, match="shard's own identity"):
        planner.plan(f"SELECT {expr} AS d FROM orders WHERE user_id = 8")


def test_other_session_values_stay_one_target(planner: Planner) -> None:
    # CONNECTION_ID() is the id of the pooled connection that ran the statement: its session's.
    plan = planner.plan(
        "SELECT @@sql_mode, VERSION(), CONNECTION_ID() FROM orders WHERE user_id = 8"
    )
    assert plan.scatter_refusal is not None


def test_doc_lists_the_identity_variables() -> None:
    doc = DOC.read_text()
    listed = set(re.findall(r"`@@(\w+)`", doc.split("## Time, random and session")[1]))
    assert listed >= shapes.IDENTITY_VARIABLES


# -- A11: literals round-trip ------------------------------------------------------------------

# Every literal kind the allow-list accepts, and the text the shards receive: the same value
# in every context (x'8' with an odd digit count is a syntax error, which is what sqlglot wrote
# before; X'..' hex strings are refused: tests/unit/test_issue7_hexstring.py).
ROUND_TRIP = [
    ("0", "0"),
    ("02", "02"),
    ("-7", "-7"),
    ("1.50", "1.50"),
    (".5", "0.5"),
    ("1e3", "1e3"),
    ("1.5E-3", "1.5E-3"),
    ("18446744073709551615", "18446744073709551615"),
    ("123456789012345678901234567890.123", "123456789012345678901234567890.123"),
    ("'plain'", "'plain'"),
    ("'it''s'", "'it''s'"),
    ("'a\\'b'", "'a''b'"),
    ("'tab\\there'", "'tab\\there'"),
    ("'back\\\\slash'", "'back\\\\slash'"),
    ("'percent\\%'", "'percent\\\\%'"),  # \% outside LIKE is backslash, percent: so is \\%
    ('"double"', "'double'"),
    ("''", "''"),
    ("0x8", "0x8"),
    ("0x41", "0x41"),
    ("NULL", "NULL"),
    ("TRUE", "TRUE"),
    ("FALSE", "FALSE"),
    ("DATE '2026-01-02'", "CAST('2026-01-02' AS DATE)"),
    ("TIMESTAMP '2026-01-02 03:04:05'", "TIMESTAMP('2026-01-02 03:04:05')"),
]


@pytest.mark.parametrize(("literal", "rendered"), ROUND_TRIP)
def test_every_accepted_literal_kind_renders_with_its_meaning(
    planner: Planner, literal: str, rendered: str
) -> None:
    for sql in (
        f"SELECT {literal} AS v FROM countries",
        f"SELECT order_id FROM orders WHERE status = {literal}",
    ):
        plan = planner.plan(sql)
        text = one(plan)
        if plan.merge is not None:
            assert f"= {rendered}" in fanned(plan)
        assert (f"{rendered} AS v" if "AS v" in sql else f"= {rendered}") in text, text


@pytest.mark.parametrize("literal", ["b'101'", "0b101", "N'x'", "_utf8mb4'a'", "_binary'a'"])
def test_literal_kinds_outside_the_allow_list_are_refused(planner: Planner, literal: str) -> None:
    with pytest.raises(UnsupportedQueryError):
        planner.plan(f"SELECT order_id FROM orders WHERE status = {literal}")


def test_a_hex_key_value_does_not_route(planner: Planner) -> None:
    # 0x8 compares as 8 with a number and as b'\x08' with a string: the router does not guess;
    # the statement fans out and every shard compares it as one database does.
    plan = planner.plan("SELECT order_id FROM orders WHERE user_id = 0x8")
    assert plan.routing_condition is None
    assert "WHERE user_id = 0x8" in fanned(plan)
    with pytest.raises(UnsupportedQueryError, match="user_id"):
        planner.plan("INSERT INTO orders (order_id, user_id, merchant_id) VALUES (1, 0x8, 1)")


# -- A12 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "named"),
    [
        ("SELECT AVG(price_cents / 3), SUM(price_cents / 3) FROM order_items", "/ 3"),
        ("SELECT SUM(qty / 2) FROM order_items GROUP BY sku", "/ 2"),
        ("SELECT SUM(qty * 1e0) FROM order_items", "DOUBLE"),
        ("SELECT AVG(SQRT(qty)) FROM order_items", "DOUBLE"),
        ("SELECT SUM(POWER(qty, 2)) FROM order_items", "DOUBLE"),
        ("SELECT SUM(CAST(qty AS DOUBLE)) FROM order_items", "DOUBLE"),
    ],
)
def test_inexact_sums_are_one_target_only(planner: Planner, sql: str, named: str) -> None:
    plan = planner.plan(sql)
    assert plan.scatter_refusal is not None
    assert named in plan.scatter_refusal and "SUM the numerator" in plan.scatter_refusal


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(qty * 1.5), AVG(qty + 2) FROM order_items",
        "SELECT SUM(qty DIV 2), AVG(qty % 3), SUM(ROUND(qty, 1)) FROM order_items",
        "SELECT SUM(qty), COUNT(qty) FROM order_items",
    ],
)
def test_exact_sums_still_merge(planner: Planner, sql: str) -> None:
    assert planner.plan(sql).scatter_refusal is None


@pytest.mark.parametrize("clause", ["ORDER BY", "GROUP BY"])
def test_a_parameter_as_order_or_group_term_is_one_target_only(
    planner: Planner, clause: str
) -> None:
    # Bound client-side, ORDER BY :p with p = 2 is ORDER BY 2 (a position) on the shards, while
    # the merge took it for a constant and interleaved rows the shards sorted by column 2.
    plan = planner.plan(f"SELECT status, order_id FROM orders {clause} :p")
    assert plan.scatter_refusal is not None and "parameter" in plan.scatter_refusal
    assert planner.plan(f"SELECT status FROM orders WHERE user_id = 1 {clause} :p") is not None
