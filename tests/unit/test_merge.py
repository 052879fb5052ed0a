"""Unit tests of the merge engine: golden tables of plan + shard rows -> merged rows."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import Iterator, Sequence
from decimal import Decimal
from typing import Any

import pytest

from shardrouter.sql.merge import (
    Aggregate,
    Average,
    MergePlan,
    SortKey,
    average,
    merge,
    ordering,
    sort_key,
)

ASC = SortKey
Rows = list[tuple[Any, ...]]


def desc(index: int) -> SortKey:
    return SortKey(index, descending=True)


def run(plan: MergePlan, *shards: Sequence[Sequence[Any]]) -> Rows:
    return list(merge(plan, list(shards)))


# -- ORDER BY, OFFSET, LIMIT (streaming) ----------------------------------------------------

ORDERED = [
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),)),
        [[(None,), (1,), (4,)], [(None,), (2,), (3,)]],
        [(None,), (None,), (1,), (2,), (3,), (4,)],
        id="asc-nulls-first",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(desc(0),)),
        [[(4,), (1,), (None,)], [(3,), (2,), (None,)]],
        [(4,), (3,), (2,), (1,), (None,), (None,)],
        id="desc-nulls-last",
    ),
    pytest.param(
        MergePlan(width=2, order_by=(desc(0), ASC(1))),
        [[(2, "b"), (2, "c"), (1, "a"), (None, "a")], [(2, "a"), (1, None), (1, "b")]],
        [(2, "a"), (2, "b"), (2, "c"), (1, None), (1, "a"), (1, "b"), (None, "a")],
        id="mixed-directions-str",
    ),
    pytest.param(
        MergePlan(width=2, order_by=(ASC(0), desc(1))),
        [[("a", b"z"), ("a", b"a"), ("b", None)], [("a", None), ("b", b"q")]],
        [("a", b"z"), ("a", b"a"), ("a", None), ("b", b"q"), ("b", None)],
        id="asc-then-desc-bytes-null-last",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(desc(0),)),
        [[(Decimal("2.50"),), (Decimal("-1"),)], [(Decimal("10"),), (Decimal("2.5"),)]],
        [(Decimal("10"),), (Decimal("2.50"),), (Decimal("2.5"),), (Decimal("-1"),)],
        id="desc-decimal-stable-ties",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(desc(0),)),
        [[(dt.date(2024, 5, 1),), (dt.date(2023, 1, 1),)], [(dt.date(2024, 1, 1),)]],
        [(dt.date(2024, 5, 1),), (dt.date(2024, 1, 1),), (dt.date(2023, 1, 1),)],
        id="desc-dates",
    ),
    pytest.param(
        MergePlan(width=3, order_by=(ASC(0), desc(1), ASC(2))),
        [[(1, 2, 1), (1, 1, 0)], [(1, 2, 0), (1, 1, 1)], [(0, 0, 0)]],
        [(0, 0, 0), (1, 2, 0), (1, 2, 1), (1, 1, 0), (1, 1, 1)],
        id="three-keys",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(1), desc(2))),
        [[("x", 1, 5), ("y", 2, 1)], [("w", None, 0), ("z", 1, 9)]],
        [("w",), ("z",), ("x",), ("y",)],
        id="hidden-sort-keys-dropped",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), limit=3, offset=2),
        [[(1,), (3,), (5,)], [(2,), (4,), (6,)]],
        [(3,), (4,), (5,)],
        id="offset-limit",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), limit=3, offset=10),
        [[(1,), (3,)], [(2,)]],
        [],
        id="offset-past-end",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), limit=10),
        [[(1,), (3,)], [(2,)]],
        [(1,), (2,), (3,)],
        id="limit-past-end",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), limit=0),
        [[(1,)], [(2,)]],
        [],
        id="limit-0",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),)),
        [[], [(2,)], []],
        [(2,)],
        id="empty-shards",
    ),
    pytest.param(MergePlan(width=1, order_by=(ASC(0),)), [], [], id="no-shards"),
    pytest.param(
        MergePlan(width=2, order_by=(ASC(0),)),
        [[[1, "a"], [3, "c"]], [[2, "b"]]],
        [(1, "a"), (2, "b"), (3, "c")],
        id="list-rows-become-tuples",
    ),
    pytest.param(
        MergePlan(width=2, order_by=(desc(0),), distinct=True, limit=3),
        [[(3, "x"), (2, "y"), (2, "y"), (1, "z")], [(3, "x"), (2, "y"), (0, "w")]],
        [(3, "x"), (2, "y"), (1, "z")],
        id="distinct-ordered",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), distinct=True),
        [[(None,), (1,)], [(None,), (1,), (2,)]],
        [(None,), (1,), (2,)],
        id="distinct-null-is-one-value",
    ),
    pytest.param(
        MergePlan(width=1, order_by=(ASC(0),), having=lambda row: row[0] % 2 == 1),
        [[(1,), (2,), (3,)], [(4,), (5,)]],
        [(1,), (3,), (5,)],
        id="having-without-grouping-filters-rows",
    ),
]


@pytest.mark.parametrize(("plan", "shards", "expected"), ORDERED)
def test_ordered_merge(plan: MergePlan, shards: list[Rows], expected: Rows) -> None:
    assert run(plan, *shards) == expected


UNORDERED = [
    pytest.param(
        MergePlan(width=2),
        [[(1, "a"), (2, "b")], [(3, "c")]],
        [(1, "a"), (2, "b"), (3, "c")],
        id="concatenate",
    ),
    pytest.param(
        MergePlan(width=1, limit=2, offset=1),
        [[(1,), (2,)], [(3,)]],
        [(2,), (3,)],
        id="concatenate-offset-limit-in-shard-order",
    ),
    pytest.param(
        MergePlan(width=1, distinct=True),
        [[("a",), (None,), ("b",)], [("b",), (None,), ("c",)]],
        [("a",), (None,), ("b",), ("c",)],
        id="distinct-unordered",
    ),
    pytest.param(
        MergePlan(width=1, distinct=True),
        [[("a", 1), ("a", 2)], [("b", 3)]],
        [("a",), ("b",)],
        id="distinct-on-visible-columns-only",
    ),
    pytest.param(
        MergePlan(width=2),
        [[(1, 2, "hidden")]],
        [(1, 2)],
        id="hidden-column-dropped",
    ),
    pytest.param(MergePlan(width=0), [[(1,), (2,)]], [(), ()], id="width-0"),
]


@pytest.mark.parametrize(("plan", "shards", "expected"), UNORDERED)
def test_unordered_merge(plan: MergePlan, shards: list[Rows], expected: Rows) -> None:
    rows = run(plan, *shards)
    assert rows == expected  # shard order is kept, though SQL promises none
    assert Counter(rows) == Counter(expected)


# -- early stop: shards are streaming cursors --------------------------------------------------


def cursor(rows: Sequence[tuple[Any, ...]], allowed: int) -> Iterator[tuple[Any, ...]]:
    """Yield rows, failing the test if more than ``allowed`` are read."""
    for n, row in enumerate(rows):
        if n >= allowed:
            raise AssertionError(f"row {n} read, only {allowed} may be")
        yield row


def endless(start: int, step: int) -> Iterator[tuple[int]]:
    value = start
    while True:
        yield (value,)
        value += step


def test_limit_stops_reading_endless_shards() -> None:
    plan = MergePlan(width=1, order_by=(ASC(0),), limit=4, offset=2)
    rows = run(plan, endless(0, 3), endless(1, 3), endless(2, 3))
    assert rows == [(2,), (3,), (4,), (5,)]


def test_limit_reads_at_most_one_row_ahead_per_shard() -> None:
    # Output 0..4 takes 3 rows of shard a (0, 2, 4) and 2 of b (1, 3); a merge may look one
    # row ahead per shard to know the next smallest, but no further.
    plan = MergePlan(width=1, order_by=(ASC(0),), limit=5)
    a = cursor([(0,), (2,), (4,), (6,), (8,)], allowed=4)
    b = cursor([(1,), (3,), (5,), (7,), (9,)], allowed=3)
    c = cursor([(100,), (101,)], allowed=1)
    assert run(plan, a, b, c) == [(0,), (1,), (2,), (3,), (4,)]


def test_limit_without_order_reads_only_needed_rows() -> None:
    plan = MergePlan(width=1, limit=3)
    a = cursor([(1,), (2,)], allowed=2)
    b = cursor([(3,), (4,)], allowed=1)
    c = cursor([(5,)], allowed=0)
    assert run(plan, a, b, c) == [(1,), (2,), (3,)]


def test_distinct_streams() -> None:
    plan = MergePlan(width=1, order_by=(ASC(0),), distinct=True, limit=2)
    a = cursor([(1,), (1,), (2,), (3,)], allowed=4)
    b = cursor([(1,), (5,)], allowed=2)
    assert run(plan, a, b) == [(1,), (2,)]


def test_limit_0_reads_nothing() -> None:
    plan = MergePlan(width=1, order_by=(ASC(0),), limit=0)
    assert run(plan, cursor([(1,)], allowed=0), cursor([(2,)], allowed=0)) == []


def test_merge_is_lazy() -> None:
    plan = MergePlan(width=1, order_by=(ASC(0),))
    rows = merge(plan, [endless(0, 2), endless(1, 2)])
    assert [next(rows) for _ in range(5)] == [(0,), (1,), (2,), (3,), (4,)]


# -- GROUP BY and aggregates -----------------------------------------------------------------

COUNT, SUM, MIN, MAX = "count", "sum", "min", "max"

GROUPED = [
    pytest.param(
        MergePlan(width=2, group_by=(0,), aggregates=(Aggregate(1, COUNT),)),
        [[("a", 2), (None, 1), ("b", 1)], [("b", 4), (None, 3)], [("c", 1)]],
        [("a", 2), (None, 4), ("b", 5), ("c", 1)],
        id="count-per-group-null-key-is-a-group",
    ),
    pytest.param(
        MergePlan(
            width=5,
            group_by=(0,),
            aggregates=(
                Aggregate(1, SUM),
                Aggregate(2, MIN),
                Aggregate(3, MAX),
                Aggregate(4, COUNT),
            ),
        ),
        [
            [(1, 10, "m", 5, 2), (2, None, None, None, 1)],
            [(1, -3, "b", None, 1), (2, None, "q", 7, 3)],
            [(1, None, None, 9, 0)],
        ],
        [(1, 7, "b", 9, 3), (2, None, "q", 7, 4)],
        id="sum-min-max-count-null-aware",
    ),
    pytest.param(
        MergePlan(width=2, group_by=(0,), aggregates=(Aggregate(1, SUM),)),
        [[("k", None)], [("k", None)]],
        [("k", None)],
        id="all-null-sum-is-null",
    ),
    pytest.param(
        MergePlan(width=2, group_by=(0,), aggregates=(Aggregate(1, SUM),)),
        [[("k", Decimal("1.10"))], [("k", Decimal("2.205"))]],
        [("k", Decimal("3.305"))],
        id="sum-decimal",
    ),
    pytest.param(
        MergePlan(width=3, group_by=(0, 1), aggregates=(Aggregate(2, COUNT),)),
        [[(1, None, 1), (1, "x", 2)], [(1, None, 3), (None, None, 4)]],
        [(1, None, 4), (1, "x", 2), (None, None, 4)],
        id="two-keys-with-nulls",
    ),
    pytest.param(
        MergePlan(width=1, group_by=(0,)),
        [[(1,), (2,)], [(2,), (3,)]],
        [(1,), (2,), (3,)],
        id="group-without-aggregates",
    ),
    pytest.param(
        MergePlan(width=3, group_by=(0,), aggregates=(Aggregate(2, COUNT),)),
        [[(1, None, 1)], [(1, "x", 1)], [(1, "y", 1)]],
        [(1, "x", 3)],
        id="plain-column-first-non-null",
    ),
    pytest.param(
        MergePlan(width=2, group_by=(0,), aggregates=(Aggregate(1, COUNT),)),
        [[(1, 1)], [(1.0, 2)], [(Decimal(1), 3)]],
        [(1, 6)],
        id="keys-compare-by-equality",
    ),
    pytest.param(
        MergePlan(
            width=2,
            group_by=(0,),
            aggregates=(Aggregate(1, COUNT),),
            having=lambda row: row[1] > 1,
        ),
        [[("a", 1), ("b", 1)], [("a", 1), ("c", 5)]],
        [("a", 2), ("c", 5)],
        id="having-drops-groups-after-combining",
    ),
    pytest.param(
        MergePlan(
            width=1,
            group_by=(0,),
            aggregates=(Aggregate(1, SUM),),
            having=lambda row: row[1] is not None and row[1] > 0,
        ),
        [[("a", 5), ("b", -1)], [("a", -7), ("b", 2), ("c", None)]],
        [("b",)],
        id="having-on-hidden-aggregate",
    ),
    pytest.param(
        MergePlan(
            width=2,
            group_by=(0,),
            aggregates=(Aggregate(1, SUM),),
            order_by=(desc(1), ASC(0)),
            limit=2,
            offset=1,
        ),
        [[("a", 5), ("b", None), ("c", 1)], [("a", -1), ("d", 4), ("e", 9)]],
        [("a", 4), ("d", 4)],
        id="order-by-aggregate-desc-limit-offset",
    ),
    pytest.param(
        MergePlan(width=2, group_by=(0,), aggregates=(Aggregate(1, SUM),), order_by=(desc(1),)),
        [[("a", 5), ("b", None)], [("c", -1), ("d", None)]],
        [("a", 5), ("c", -1), ("b", None), ("d", None)],
        id="order-by-aggregate-desc-null-last",
    ),
    pytest.param(
        MergePlan(
            width=1,
            group_by=(0,),
            aggregates=(Aggregate(1, COUNT),),
            order_by=(ASC(1), desc(0)),
        ),
        [[("a", 1), ("b", 3)], [("c", 2), ("a", 1)], [("d", 2)]],
        [("d",), ("c",), ("a",), ("b",)],
        id="order-by-hidden-count",
    ),
    pytest.param(
        MergePlan(
            width=1,
            group_by=(0, 1),
            aggregates=(Aggregate(2, COUNT),),
            distinct=True,
            order_by=(ASC(0),),
        ),
        [[("x", 1, 1), ("y", 1, 1)], [("x", 2, 1)]],
        [("x",), ("y",)],
        id="distinct-after-grouping",
    ),
    pytest.param(
        MergePlan(
            width=2,
            group_by=(0,),
            averages=(Average(index=1, sum_index=1, count_index=2),),
            order_by=(ASC(0),),
        ),
        [[("a", 1, 1), ("b", None, 0)], [("a", 2, 1), ("c", 7, 3)]],
        [("a", Decimal("1.5000")), ("b", None), ("c", Decimal("2.3333"))],
        id="avg-int-decimal-scale-4-null-on-zero-count",
    ),
    pytest.param(
        MergePlan(
            width=2,
            group_by=(0,),
            averages=(Average(index=1, sum_index=2, count_index=3),),
        ),
        [[("a", "?", Decimal("1.25"), 2)], [("a", "?", Decimal("0.50"), 1)]],
        [("a", Decimal("0.583333"))],
        id="avg-decimal-scale-plus-4-separate-partials",
    ),
    pytest.param(
        MergePlan(
            width=2,
            group_by=(0,),
            averages=(Average(index=1, sum_index=1, count_index=2),),
        ),
        [[("a", 1.0, 2)], [("a", 2.0, 2)]],
        [("a", 0.75)],
        id="avg-float",
    ),
    pytest.param(
        MergePlan(
            width=3,
            group_by=(0,),
            averages=(
                Average(index=1, sum_index=1, count_index=3),
                Average(index=2, sum_index=2, count_index=3),
            ),
            aggregates=(Aggregate(3, COUNT),),
            having=lambda row: row[1] is not None and row[1] > 1,
        ),
        [[("a", 1, 10, 1), ("b", 1, 1, 1)], [("a", 4, 20, 1)]],
        [("a", Decimal("2.5000"), Decimal("15.0000"))],
        id="two-avgs-share-count-having-sees-avg",
    ),
]


@pytest.mark.parametrize(("plan", "shards", "expected"), GROUPED)
def test_grouped_merge(plan: MergePlan, shards: list[Rows], expected: Rows) -> None:
    rows = run(plan, *shards)
    if plan.order_by:
        assert rows == expected
    else:
        assert Counter(rows) == Counter(expected)
    assert all(len(row) == plan.width for row in rows)


GLOBAL = [
    pytest.param(
        MergePlan(
            width=4,
            aggregates=(
                Aggregate(0, COUNT),
                Aggregate(1, SUM),
                Aggregate(2, MIN),
                Aggregate(3, MAX),
            ),
        ),
        [[(0, None, None, None)], [(0, None, None, None)]],
        [(0, None, None, None)],
        id="over-empty-shards-count-0-sum-null",
    ),
    pytest.param(
        MergePlan(width=2, aggregates=(Aggregate(0, COUNT), Aggregate(1, SUM))),
        [[], []],
        [(0, None)],
        id="no-rows-at-all-still-one-row",
    ),
    pytest.param(
        MergePlan(width=1, aggregates=(Aggregate(0, COUNT),)),
        [],
        [(0,)],
        id="no-shards-still-one-row",
    ),
    pytest.param(
        MergePlan(
            width=4,
            aggregates=(
                Aggregate(0, COUNT),
                Aggregate(1, SUM),
                Aggregate(2, MIN),
                Aggregate(3, MAX),
            ),
        ),
        [[(2, 5, "k", 9)], [(0, None, None, None)], [(3, -1, "c", 4)]],
        [(5, 4, "c", 9)],
        id="combine",
    ),
    pytest.param(
        MergePlan(
            width=2,
            aggregates=(Aggregate(0, COUNT),),
            averages=(Average(index=1, sum_index=1, count_index=2),),
        ),
        [[(0, None, 0)], [(0, None, 0)]],
        [(0, None)],
        id="avg-over-no-rows-is-null",
    ),
    pytest.param(
        MergePlan(width=1, averages=(Average(index=0, sum_index=0, count_index=1),)),
        [[(1, 1)], [(2, 1)]],
        [(Decimal("1.5000"),)],
        id="avg-of-ints-1-2",
    ),
    pytest.param(
        MergePlan(width=2, aggregates=(Aggregate(1, COUNT),)),
        [[(None, 0)], [("x", 2)]],
        [("x", 2)],
        id="plain-column-from-a-shard-with-rows",
    ),
    pytest.param(
        MergePlan(width=1, aggregates=(Aggregate(0, COUNT),), having=lambda row: row[0] > 5),
        [[(2,)], [(3,)]],
        [],
        id="having-drops-the-row",
    ),
    pytest.param(
        MergePlan(width=1, aggregates=(Aggregate(0, COUNT),), having=lambda row: row[0] > 4),
        [[(2,)], [(3,)]],
        [(5,)],
        id="having-keeps-the-row",
    ),
    pytest.param(
        MergePlan(width=1, aggregates=(Aggregate(0, COUNT),), offset=1),
        [[(2,)], [(3,)]],
        [],
        id="offset-1-skips-the-row",
    ),
]


@pytest.mark.parametrize(("plan", "shards", "expected"), GLOBAL)
def test_global_aggregate(plan: MergePlan, shards: list[Rows], expected: Rows) -> None:
    assert run(plan, *shards) == expected


# -- AVG arithmetic ----------------------------------------------------------------------------

AVERAGES = [
    pytest.param(3, 2, Decimal("1.5000"), id="ints-1-2"),
    pytest.param(5, 3, Decimal("1.6667"), id="rounds-up"),
    pytest.param(-5, 3, Decimal("-1.6667"), id="negative-rounds-away-from-zero"),
    pytest.param(1, 8, Decimal("0.1250"), id="exact"),
    pytest.param(1, 20000, Decimal("0.0001"), id="half-rounds-up"),
    pytest.param(-1, 20000, Decimal("-0.0001"), id="negative-half-rounds-away"),
    pytest.param(1, 30000, Decimal("0.0000"), id="rounds-to-zero"),
    pytest.param(Decimal("10.5"), 4, Decimal("2.62500"), id="decimal-scale-1-plus-4"),
    pytest.param(Decimal("1.10"), 3, Decimal("0.366667"), id="decimal-scale-2-plus-4"),
    pytest.param(Decimal("7"), 2, Decimal("3.5000"), id="decimal-scale-0"),
    pytest.param(Decimal("1E+2"), 3, Decimal("33.3333"), id="decimal-positive-exponent"),
    pytest.param(
        10**40 + 1,
        2,
        Decimal("5000000000000000000000000000000000000000.5000"),
        id="beyond-default-context-precision",
    ),
    pytest.param(2.0, 4, 0.5, id="float"),
    pytest.param(None, 3, None, id="null-sum"),
    pytest.param(None, 0, None, id="no-rows"),
    pytest.param(0, 0, None, id="zero-count"),
]


@pytest.mark.parametrize(("total", "count", "expected"), AVERAGES)
def test_average(total: Any, count: Any, expected: Any) -> None:
    result = average(total, count)
    assert result == expected
    assert type(result) is type(expected)
    if isinstance(expected, Decimal):
        assert result.as_tuple().exponent == expected.as_tuple().exponent


# -- sort key ------------------------------------------------------------------------------------


def test_sort_key_never_compares_null_with_a_value() -> None:
    rows = [("b",), (None,), ("a",), (None,)]
    assert sorted(rows, key=sort_key([ASC(0)])) == [(None,), (None,), ("a",), ("b",)]
    assert sorted(rows, key=sort_key([desc(0)])) == [("b",), ("a",), (None,), (None,)]


def test_sort_key_strings_by_code_point() -> None:
    # The documented limitation: binary-collation order, not MySQL's default _ci collations.
    assert sorted([("b",), ("B",), ("a",)], key=sort_key([ASC(0)])) == [("B",), ("a",), ("b",)]


# -- plan validation -----------------------------------------------------------------------------

BAD_PLANS = [
    pytest.param(dict(width=1, offset=-1), "offset -1 is negative", id="negative-offset"),
    pytest.param(dict(width=1, limit=-2), "limit -2 is negative", id="negative-limit"),
    pytest.param(dict(width=-1), "width -1 is negative", id="negative-width"),
    pytest.param(dict(width=1, order_by=(ASC(-1),)), "order_by index -1", id="negative-index"),
    pytest.param(
        dict(width=1, aggregates=(Aggregate(0, "avg"),)),  # type: ignore[arg-type]
        "func 'avg'",
        id="unknown-func",
    ),
    pytest.param(
        dict(width=1, aggregates=(Aggregate(0, "sum"), Aggregate(0, "max"))),
        "combines both as 'sum' and as 'max'",
        id="conflicting-partials",
    ),
    pytest.param(
        dict(width=2, group_by=(0,), aggregates=(Aggregate(0, "count"),)),
        "column 0 is both a group key and a 'count'",
        id="key-is-aggregate",
    ),
]


@pytest.mark.parametrize(("kwargs", "message"), BAD_PLANS)
def test_invalid_plan_is_refused_at_construction(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="invalid MergePlan") as info:
        MergePlan(**kwargs)
    assert message in str(info.value)


def test_shared_count_partial_is_allowed() -> None:
    plan = MergePlan(
        width=2,
        averages=(Average(0, 0, 2), Average(1, 1, 2)),
        aggregates=(Aggregate(2, "count"),),
    )
    assert plan.columns_needed == 3


def test_short_row_is_reported_on_first_row() -> None:
    plan = MergePlan(width=1, order_by=(ASC(2),))
    rows = merge(plan, [[(1, 2, 3)], [(1, 2)]])
    expected = "shard 1 returned a row of 2 columns but the plan reads 3"
    with pytest.raises(ValueError, match=expected):
        list(rows)


def test_short_row_is_reported_in_grouped_merge() -> None:
    plan = MergePlan(width=1, group_by=(0,), aggregates=(Aggregate(1, "count"),))
    with pytest.raises(ValueError, match="shard 0 returned a row of 1 columns"):
        list(merge(plan, [[(1,)]]))


@pytest.mark.parametrize(
    ("order_by", "expected_reverse"),
    [([desc(0)], True), ([desc(0), desc(1)], True), ([ASC(0)], False), ([desc(0), ASC(1)], False)],
)
def test_ordering_reverses_only_uniform_descending_orders(
    order_by: list[SortKey], expected_reverse: bool
) -> None:
    rows = [(None, "b"), (2, "a"), (1, None), (2, "b"), (None, None), (1, "a")]
    key, reverse = ordering(order_by, {})
    assert reverse is expected_reverse
    # Whatever the path, the order equals the general (wrapper-based) key's order.
    assert sorted(rows, key=key, reverse=reverse) == sorted(rows, key=sort_key(order_by))


def test_all_descending_merge_puts_nulls_last_and_keeps_shard_order_on_ties() -> None:
    plan = MergePlan(width=2, order_by=(desc(0),))
    shard_a = [(3, "a1"), (1, "a2"), (None, "a3")]
    shard_b = [(3, "b1"), (2, "b2"), (None, "b3")]
    assert list(merge(plan, [shard_a, shard_b])) == [
        (3, "a1"),
        (3, "b1"),  # a tie: the earlier shard first, as with any other order
        (2, "b2"),
        (1, "a2"),
        (None, "a3"),
        (None, "b3"),
    ]
