"""Review 14: HAVING across shards (items 4+5) against the one-database oracle on 4 shards.

Failing tests show wrong answers; the ``test_safe_*`` tests record behaviour checked correct."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from test_router_oracle import check, world  # noqa: F401

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

GROUPS = "SELECT status, COUNT(*) AS c FROM orders GROUP BY status HAVING "


# -- BETWEEN with mixed types -----------------------------------------------------------------
# MariaDB aggregates ONE comparison type over all three arguments of BETWEEN (string, int,
# string -> numeric): 'paid' BETWEEN 0 AND 'p' is 0 BETWEEN 0 AND 0 = 1. scatter._Having
# splits it into x >= a AND x <= b, each compared by its own pair of types: 'paid' >= 0
# (numeric, true) AND 'paid' <= 'p' (string, false) = false.
# Oracle: all 4 statuses; router: only ('done', 'new').


def test_between_mixed_types_literals(world: dict[str, Any]) -> None:  # noqa: F811
    check(world, GROUPS + "status BETWEEN 0 AND 'p' ORDER BY status")


def test_between_mixed_types_parameters(world: dict[str, Any]) -> None:  # noqa: F811
    check(world, GROUPS + "MAX(status) BETWEEN :a AND :b ORDER BY status", {"a": 0, "b": "p"})


# -- the per-values plan cache of Planner._late_binder --------------------------------------
# The key is (type name, value): values that Python finds equal but PyMySQL writes differently
# share a plan, so the second execution is answered with the first one's literal.


def test_late_cache_tz_aware_datetimes_equal_instant(world: dict[str, Any]) -> None:  # noqa: F811
    # 23:00 UTC == 01:00+02:00 in Python (same instant, same hash), but PyMySQL writes the
    # wall time: '2026-03-31 23:00:00' vs '2026-04-01 01:00:00'.
    sql = GROUPS + "MAX(created_at) > :v ORDER BY status"
    utc = dt.datetime(2026, 3, 31, 23, 0, tzinfo=dt.UTC)
    plus2 = dt.datetime(2026, 4, 1, 1, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    assert utc == plus2 and hash(utc) == hash(plus2)
    first = check(world, sql, {"v": utc})
    second = check(world, sql, {"v": plus2})  # router: the rows of `first` (stale plan)
    assert first != second


def test_late_cache_decimal_scale(world: dict[str, Any]) -> None:  # noqa: F811
    # Decimal('1') == Decimal('1.0') (same hash) but they are written '1' and '1.0', and MySQL
    # gives c * 1 / 7 four decimals and c * 1.0 / 7 five: 137 / 7 -> 19.5714 vs 19.57143.
    sql = GROUPS + "c * :v / 7 = :w ORDER BY status"
    new = next(c for s, c in check(world, GROUPS + "1 = 1 ORDER BY status") if s == "new")
    w = (Decimal(new) / 7).quantize(Decimal("0.0001"))
    assert check(world, sql, {"v": Decimal("1"), "w": w})  # one group matches
    check(world, sql, {"v": Decimal("1.0"), "w": w})  # oracle: none; router: the same group


# -- confirmed correct (kept as guards) ------------------------------------------------------


@pytest.mark.parametrize(
    ("having", "params"),
    [
        ("c IN (:a, NULL)", {"a": 1}),
        ("c NOT IN (:a, :b)", {"a": 1, "b": None}),
        ("c NOT BETWEEN NULL AND 5", {}),
        ("MIN(amount_cents) IS NOT NULL", {}),
        ("status IN (:a, :b)", {"a": "0.0x", "b": 5}),  # IN is pairwise in MariaDB (not BETWEEN)
        ("status = :v", {"v": b"NEW"}),
        ("status <> :v", {"v": "n'e\\w"}),
        ("c > :offset LIMIT :limit", {"limit": 2, "offset": 1}),
    ],
)
def test_safe_having_shapes(world: dict[str, Any], having: str, params: dict[str, Any]) -> None:  # noqa: F811
    check(
        world,
        GROUPS + having if "LIMIT" in having else GROUPS + having + " ORDER BY status",
        params,
    )


@pytest.mark.parametrize("value", ["x:u", "50%", "\\:v", "a' OR 'a'='a"])
def test_safe_row_having_literal_sent_to_shards(world: dict[str, Any], value: str) -> None:  # noqa: F811
    # HAVING without grouping stays on the shards with the value written in as a literal.
    sql = (
        "SELECT order_id, status FROM orders WHERE user_id > :u HAVING status <> :v"
        " ORDER BY order_id LIMIT 3"
    )
    check(world, sql, {"u": 1, "v": value})


@pytest.mark.parametrize(
    ("tail", "params"),
    [
        ("LIMIT :n", {"n": 3}),
        ("LIMIT :m, :n", {"n": 3, "m": 2}),
        ("LIMIT :n OFFSET :m", {"n": 3, "m": 2}),
        ("LIMIT :n OFFSET :n", {"n": 3}),
        ("LIMIT 2, :n", {"n": 3}),
        ("LIMIT :n", {"n": 0}),
    ],
)
def test_safe_limit_forms(world: dict[str, Any], tail: str, params: dict[str, Any]) -> None:  # noqa: F811
    # :n is also bound in WHERE (stays a parameter there).
    check(
        world,
        f"SELECT order_id, user_id FROM orders WHERE user_id > :n ORDER BY order_id {tail}",
        params,
    )
