"""Review 14: planner regressions of items 4+5 (late parameters), 7 (string keys) and 8
(REPLACE and refusal by kind). Pure: no database."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.errors import KeyValueError, UnsupportedQueryError
from shardrouter.sql.planner import Planner

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(120)


def _planner(cache_size: int = 2048) -> Planner:
    return Planner(Topology.load(REPO / "config" / "orders.yaml"), cache_size=cache_size)


def test_replace_check_is_not_exponential_in_leading_comments() -> None:
    # planner._REPLACE: (?:\s|/\*.*?\*/|...)*REPLACE\b -- the lazy .*? can also run over a
    # later '*/', so n block comments give 2**(n-1) ways to split them, all tried when the
    # statement is not a REPLACE: 20 comments 0.7 s, 22 2.3 s, 24 ~9 s, 30 ~10 min (the
    # planner's thread is held meanwhile). Before the change this statement planned at once.
    sql = "/**/ " * 24 + "SELECT order_id FROM orders WHERE user_id = 1"
    started = time.monotonic()
    _planner().plan(sql)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("sql", "kind"),
    [("SAVEPOINT s", "SAVEPOINT"), ("FLUSH TABLES", "FLUSH"), ("VALUES (1)", "VALUES")],
)
def test_refusal_names_the_statement_kind(sql: str, kind: str) -> None:
    # _not_routed names sqlglot's class: "ALIAS statements are not routed" for SAVEPOINT and
    # FLUSH, "ANONYMOUS statements" for VALUES.
    with pytest.raises(UnsupportedQueryError) as info:
        _planner().plan(sql)
    assert str(info.value).startswith(kind), str(info.value)


def test_parenthesized_select_is_not_called_a_subquery_statement() -> None:
    # "(SELECT ...)" -> "SUBQUERY statements are not routed: run them on one shard's
    # connection": a plain SELECT, sent away to a shard connection.
    with pytest.raises(UnsupportedQueryError) as info:
        _planner().plan("(SELECT order_id FROM orders WHERE user_id = 1)")
    assert "SUBQUERY" not in str(info.value), str(info.value)


def test_zero_padded_key_string_longer_than_4300_digits() -> None:
    # _DECIMAL_INT accepts it, int() refuses it (sys.int_info.str_digits_check_threshold):
    # a bare ValueError, not KeyValueError. MariaDB compares it equal: 42 = '000...042' is 1.
    topology = Topology.load(REPO / "config" / "orders.yaml")
    key = "0" * 5000 + "42"
    try:
        slot = topology.slot_for("orders", key, "user_id")
    except KeyValueError:
        return  # refused with the router's own error: acceptable
    assert slot == topology.slot_for("orders", 42, "user_id")


def test_late_values_do_not_evict_other_plans() -> None:
    # Every distinct LIMIT/OFFSET value plans the written-in text through Planner.plan, whose
    # cache (2048, FIFO) is shared: paging through 2100 offsets evicts every other plan (and
    # each page pays a full sqlglot parse + plan).
    planner = _planner()
    hot = "SELECT order_id FROM orders WHERE user_id = :u"
    planner.plan(hot)
    paged = planner.plan("SELECT order_id FROM orders ORDER BY order_id LIMIT :n OFFSET :m")
    assert paged.bind_late is not None
    for m in range(2100):
        paged.bind_late({"n": 10, "m": m})
    assert hot in planner._cache
