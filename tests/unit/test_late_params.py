"""shardrouter.sql.late: which parameters a fan-out needs at planning time, their checks, and
the statement text with them written in (and nothing else changed)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import pytest
from sqlglot import exp, parse_one

from shardrouter.errors import RoutingError
from shardrouter.sql.late import LateParams


def late(sql: str) -> LateParams:
    tree = parse_one(sql, read="mysql")
    assert isinstance(tree, exp.Select)
    found = LateParams.of(tree)
    assert found is not None
    return found


def test_no_late_parameters() -> None:
    tree = parse_one("SELECT a FROM t WHERE b = :b GROUP BY a HAVING COUNT(*) > 1 LIMIT 5")
    assert isinstance(tree, exp.Select) and LateParams.of(tree) is None


@pytest.mark.parametrize(
    ("sql", "values", "written"),
    [
        ("SELECT a FROM t LIMIT :n", {"n": 5}, "SELECT a FROM t LIMIT 5"),
        ("SELECT a FROM t LIMIT :m, :n", {"m": 2, "n": 5}, "SELECT a FROM t LIMIT 2, 5"),
        (
            "SELECT a FROM t LIMIT :limit OFFSET :offset",
            {"limit": 1, "offset": 0},
            "SELECT a FROM t LIMIT 1 OFFSET 0",
        ),
        (  # a subquery's LIMIT and a WHERE parameter of the same name stay bound
            "SELECT a FROM t WHERE b = :n AND c IN (SELECT c FROM u LIMIT :n) LIMIT :n",
            {"n": 3},
            "SELECT a FROM t WHERE b = :n AND c IN (SELECT c FROM u LIMIT :n) LIMIT 3",
        ),
        (
            "SELECT a, COUNT(*) FROM t WHERE a > :x GROUP BY a HAVING COUNT(*) > :x"
            " AND a <> ':x' ORDER BY a LIMIT :n FOR UPDATE",
            {"x": "it's", "n": 2},
            "SELECT a, COUNT(*) FROM t WHERE a > :x GROUP BY a HAVING COUNT(*) > 'it\\'s'"
            " AND a <> ':x' ORDER BY a LIMIT 2 FOR UPDATE",
        ),
        (
            "select a from t group by a having max(d) between :lo and :hi /* :lo */",
            {"lo": dt.date(2026, 1, 2), "hi": dt.datetime(2026, 1, 3, 4, 5, 6)},
            "select a from t group by a having max(d) between '2026-01-02' and"
            " '2026-01-03 04:05:06' /* :lo */",
        ),
        (
            "SELECT a FROM t GROUP BY a HAVING SUM(b) > :d OR :z IS NULL",
            {"d": Decimal("1.50"), "z": None},
            "SELECT a FROM t GROUP BY a HAVING SUM(b) > 1.50 OR NULL IS NULL",
        ),
    ],
)
def test_written_as_the_driver_writes_them(sql: str, values: dict[str, Any], written: str) -> None:
    found = late(sql)
    assert found.write(sql, found.literals(found.values(values))) == written


@pytest.mark.parametrize("bad", [-1, "5", 2.0, True, None, 2**64], ids=repr)
def test_a_limit_must_be_a_count(bad: Any) -> None:
    found = late("SELECT a FROM t LIMIT :n")
    with pytest.raises(RoutingError) as info:
        found.values({"n": bad})
    assert ":n" in str(info.value) and repr(bad) in str(info.value)


def test_a_missing_parameter_is_named() -> None:
    with pytest.raises(RoutingError, match=r":k has no value"):
        late("SELECT a FROM t GROUP BY a HAVING COUNT(*) > :k").values({})


def test_a_having_value_must_be_a_scalar() -> None:
    with pytest.raises(RoutingError, match=r"HAVING parameter :k is list"):
        late("SELECT a FROM t GROUP BY a HAVING COUNT(*) > :k").values({"k": [1]})
