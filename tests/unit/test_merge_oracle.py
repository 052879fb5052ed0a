"""Property tests of invariant 2 for the merge engine, with SQLite as the single-database oracle.

Random rows are spread over four shard tables; each query shape runs the per-shard SQL the
planner would send (written out here by hand), merges the shards' cursors, and must equal the
original SQL run on one table holding every row. SQLite orders NULL first ascending and last
descending, returns NULL for SUM over no non-NULL value, and compares TEXT by code point, all
like MySQL with a binary collation; the one difference is AVG, a float in SQLite and a DECIMAL
of scale 4 (for an integer column) in MySQL, so AVG columns are compared to within rounding.
"""

from __future__ import annotations

import sqlite3
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrouter.sql.merge import Aggregate, Average, MergePlan, SortKey, merge

SHARDS = 4

# (a, b, c, shard): a small nullable int, b short lowercase text or NULL, c an int. Small
# domains make ties, repeated groups and duplicate DISTINCT values common.
ROW = st.tuples(
    st.none() | st.integers(-3, 3),
    st.none() | st.text("abc", max_size=2),
    st.integers(-20, 20),
    st.integers(0, SHARDS - 1),
)


@dataclass(frozen=True)
class Params:
    limit: int
    offset: int
    threshold: int


PARAMS = st.builds(
    Params, limit=st.integers(0, 8), offset=st.integers(0, 6), threshold=st.integers(-25, 25)
)


class Cluster:
    """One SQLite database: table ``t`` holds every row (the oracle), ``t0``..``t3`` the shards."""

    def __init__(self, rows: Sequence[tuple[int | None, str | None, int, int]]) -> None:
        self.db = sqlite3.connect(":memory:")
        for name in ["t", *(f"t{n}" for n in range(SHARDS))]:
            self.db.execute(
                f"CREATE TABLE {name} (id INTEGER PRIMARY KEY, a INTEGER, b TEXT, c INTEGER)"
            )
        for id_, (a, b, c, shard) in enumerate(rows):
            for name in ("t", f"t{shard}"):
                self.db.execute(f"INSERT INTO {name} VALUES (?, ?, ?, ?)", (id_, a, b, c))

    def shards(self, sql: str) -> list[sqlite3.Cursor]:
        # Cursors, not lists: the merge reads them lazily, as it would a streaming driver.
        return [self.db.execute(sql.format(t=f"t{n}")) for n in range(SHARDS)]

    def oracle(self, sql: str) -> list[tuple[Any, ...]]:
        return self.db.execute(sql.format(t="t")).fetchall()


def desc(index: int) -> SortKey:
    return SortKey(index, descending=True)


@dataclass(frozen=True)
class Shape:
    """A query, its per-shard rewrite and merge plan, and how to compare the answers."""

    oracle: str  # the original SQL on table {t}; {limit}, {offset}, {threshold} from Params
    shard: str  # what the planner sends each shard; {n} is limit + offset
    plan: Callable[[Params], MergePlan]
    ordered: bool = True  # False: SQL promises no order, compare as multisets
    avg_columns: tuple[int, ...] = field(default=())  # compared to within AVG's rounding

    def sql(self, template: str, p: Params) -> str:
        return template.format(
            t="{t}", limit=p.limit, offset=p.offset, threshold=p.threshold, n=p.limit + p.offset
        )


SHAPES = [
    pytest.param(
        Shape(
            "SELECT a, c FROM {t} ORDER BY a DESC, c LIMIT {limit} OFFSET {offset}",
            "SELECT a, c, id FROM {t} ORDER BY a DESC, c, id LIMIT {n}",
            lambda p: MergePlan(
                width=2,
                order_by=(desc(0), SortKey(1), SortKey(2)),
                limit=p.limit,
                offset=p.offset,
            ),
        ),
        id="order-mixed-limit-offset",
    ),
    pytest.param(
        Shape(
            "SELECT id, c FROM {t} ORDER BY b DESC, a, id LIMIT {limit} OFFSET {offset}",
            "SELECT id, c, b, a FROM {t} ORDER BY b DESC, a, id LIMIT {n}",
            lambda p: MergePlan(
                width=2,
                order_by=(desc(2), SortKey(3), SortKey(0)),
                limit=p.limit,
                offset=p.offset,
            ),
        ),
        id="order-by-hidden-text-and-nullable-int",
    ),
    pytest.param(
        Shape(
            "SELECT b, a FROM {t} WHERE c > {threshold} ORDER BY b, a DESC",
            "SELECT b, a, id FROM {t} WHERE c > {threshold} ORDER BY b, a DESC, id",
            lambda p: MergePlan(width=2, order_by=(SortKey(0), desc(1), SortKey(2))),
        ),
        id="order-without-limit",
    ),
    pytest.param(
        Shape(
            "SELECT a, b FROM {t} WHERE c > {threshold}",
            "SELECT a, b FROM {t} WHERE c > {threshold}",
            lambda p: MergePlan(width=2),
            ordered=False,
        ),
        id="no-order",
    ),
    pytest.param(
        Shape(
            "SELECT COUNT(*), SUM(a), MIN(b), MAX(c), AVG(a), MAX(b), MIN(a) FROM {t}"
            " WHERE c > {threshold}",
            "SELECT COUNT(*), SUM(a), MIN(b), MAX(c), SUM(a), MAX(b), MIN(a), COUNT(a) FROM {t}"
            " WHERE c > {threshold}",
            lambda p: MergePlan(
                width=7,
                aggregates=(
                    Aggregate(0, "count"),
                    Aggregate(1, "sum"),
                    Aggregate(2, "min"),
                    Aggregate(3, "max"),
                    Aggregate(5, "max"),
                    Aggregate(6, "min"),
                ),
                averages=(Average(index=4, sum_index=4, count_index=7),),
            ),
            avg_columns=(4,),
        ),
        id="global-aggregates",
    ),
    pytest.param(
        Shape(
            "SELECT a, COUNT(*), SUM(c), MIN(b), MAX(c), AVG(c) FROM {t} GROUP BY a",
            "SELECT a, COUNT(*), SUM(c), MIN(b), MAX(c), SUM(c), COUNT(c) FROM {t} GROUP BY a",
            lambda p: MergePlan(
                width=6,
                group_by=(0,),
                aggregates=(
                    Aggregate(1, "count"),
                    Aggregate(2, "sum"),
                    Aggregate(3, "min"),
                    Aggregate(4, "max"),
                ),
                averages=(Average(index=5, sum_index=5, count_index=6),),
            ),
            ordered=False,
            avg_columns=(5,),
        ),
        id="group-by-a-aggregates",
    ),
    pytest.param(
        Shape(
            "SELECT b, AVG(a), SUM(a), COUNT(a) FROM {t} WHERE c > {threshold} GROUP BY b",
            "SELECT b, SUM(a), SUM(a), COUNT(a) FROM {t} WHERE c > {threshold} GROUP BY b",
            lambda p: MergePlan(
                width=4,
                group_by=(0,),
                aggregates=(Aggregate(2, "sum"), Aggregate(3, "count")),
                averages=(Average(index=1, sum_index=1, count_index=3),),
            ),
            ordered=False,
            avg_columns=(1,),
        ),
        id="group-by-text-avg-of-nullable",
    ),
    pytest.param(
        Shape(
            "SELECT a, COUNT(*) FROM {t} GROUP BY a HAVING COUNT(*) > 1",
            "SELECT a, COUNT(*) FROM {t} GROUP BY a",
            lambda p: MergePlan(
                width=2,
                group_by=(0,),
                aggregates=(Aggregate(1, "count"),),
                having=lambda row: row[1] > 1,
            ),
            ordered=False,
        ),
        id="group-having-count",
    ),
    pytest.param(
        Shape(
            "SELECT b FROM {t} GROUP BY b HAVING SUM(a) > {threshold} ORDER BY b",
            "SELECT b, SUM(a) FROM {t} GROUP BY b",
            lambda p: MergePlan(
                width=1,
                group_by=(0,),
                aggregates=(Aggregate(1, "sum"),),
                having=lambda row: row[1] is not None and row[1] > p.threshold,
                order_by=(SortKey(0),),
            ),
        ),
        id="group-having-hidden-sum-ordered",
    ),
    pytest.param(
        Shape(
            "SELECT b, SUM(a) AS s, COUNT(*) FROM {t} GROUP BY b ORDER BY s DESC, b"
            " LIMIT {limit} OFFSET {offset}",
            "SELECT b, SUM(a), COUNT(*) FROM {t} GROUP BY b",
            lambda p: MergePlan(
                width=3,
                group_by=(0,),
                aggregates=(Aggregate(1, "sum"), Aggregate(2, "count")),
                order_by=(desc(1), SortKey(0)),
                limit=p.limit,
                offset=p.offset,
            ),
        ),
        id="group-order-by-aggregate-desc-limit",
    ),
    pytest.param(
        Shape(
            "SELECT a FROM {t} GROUP BY a ORDER BY COUNT(*) DESC, MAX(b), a"
            " LIMIT {limit} OFFSET {offset}",
            "SELECT a, COUNT(*), MAX(b) FROM {t} GROUP BY a",
            lambda p: MergePlan(
                width=1,
                group_by=(0,),
                aggregates=(Aggregate(1, "count"), Aggregate(2, "max")),
                order_by=(desc(1), SortKey(2), SortKey(0)),
                limit=p.limit,
                offset=p.offset,
            ),
        ),
        id="group-order-by-hidden-aggregates-limit",
    ),
    pytest.param(
        Shape(
            "SELECT DISTINCT b FROM {t} WHERE c > {threshold}",
            "SELECT DISTINCT b FROM {t} WHERE c > {threshold}",
            lambda p: MergePlan(width=1, distinct=True),
            ordered=False,
        ),
        id="distinct",
    ),
    pytest.param(
        Shape(
            "SELECT DISTINCT b, a FROM {t} ORDER BY b DESC, a LIMIT {limit} OFFSET {offset}",
            "SELECT DISTINCT b, a FROM {t} ORDER BY b DESC, a LIMIT {n}",
            lambda p: MergePlan(
                width=2,
                order_by=(desc(0), SortKey(1)),
                distinct=True,
                limit=p.limit,
                offset=p.offset,
            ),
        ),
        id="distinct-order-limit",
    ),
    pytest.param(
        Shape(
            "SELECT DISTINCT a FROM {t} WHERE c > {threshold} ORDER BY a DESC",
            "SELECT DISTINCT a FROM {t} WHERE c > {threshold} ORDER BY a DESC",
            lambda p: MergePlan(width=1, order_by=(desc(0),), distinct=True),
        ),
        id="distinct-order",
    ),
]


def assert_avg_close(ours: Any, theirs: Any) -> None:
    if theirs is None:
        assert ours is None
        return
    # AVG of integers: DECIMAL with 4 digits of scale, rounded, so within half a unit of 1e-4.
    assert isinstance(ours, Decimal)
    assert ours.as_tuple().exponent == -4
    assert abs(float(ours) - theirs) <= 0.5e-4 + 1e-9 * abs(theirs)


def assert_same(shape: Shape, ours: list[tuple[Any, ...]], theirs: list[tuple[Any, ...]]) -> None:
    if not shape.ordered:
        if not shape.avg_columns:
            assert Counter(ours) == Counter(theirs)
            return

        # Grouped without ORDER BY: column 0 is the group key, unique per row.
        def by_key(row: tuple[Any, ...]) -> tuple[bool, Any]:
            return (row[0] is not None, row[0])

        ours, theirs = sorted(ours, key=by_key), sorted(theirs, key=by_key)
    assert len(ours) == len(theirs), (ours, theirs)
    for mine, expected in zip(ours, theirs, strict=True):
        assert len(mine) == len(expected)
        for column, (value, oracle_value) in enumerate(zip(mine, expected, strict=True)):
            if column in shape.avg_columns:
                assert_avg_close(value, oracle_value)
            else:
                assert value == oracle_value, (ours, theirs)


@pytest.mark.parametrize("shape", SHAPES)
@settings(max_examples=150, deadline=None, database=None)
@given(rows=st.lists(ROW, max_size=40), params=PARAMS)
def test_merge_equals_single_database(
    shape: Shape, rows: list[tuple[int | None, str | None, int, int]], params: Params
) -> None:
    cluster = Cluster(rows)
    merged = list(merge(shape.plan(params), cluster.shards(shape.sql(shape.shard, params))))
    assert_same(shape, merged, cluster.oracle(shape.sql(shape.oracle, params)))
