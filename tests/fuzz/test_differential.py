"""Differential fuzzing against one database: generated statements over the order schema
(tests/fuzz/fuzz_grammar.py) must, through Router and AsyncRouter alike, either give what one
unsharded MariaDB gives or be refused with a typed shardrouter error (tests/fuzz/fuzz_harness.py
says exactly how answers are compared).

Bounded for CI: SHARDROUTER_FUZZ_EXAMPLES statements (default 1500: about a minute of
statements on two cores, plus the sandbox start), with a fixed seed so a CI run is reproducible. Failing examples are kept in
tests/fuzz/examples/ (a hypothesis DirectoryBasedExampleDatabase, committed) and replayed first
on every run, so a found bug stays found. The long run is ``tools/fuzz --statements 100000``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fuzz_grammar import Case, statements
from fuzz_harness import REPORTS, World, coverage
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.database import DirectoryBasedExampleDatabase

from shardrouter.errors import ExecutionError

pytestmark = pytest.mark.mariadb

EXAMPLES = int(os.environ.get("SHARDROUTER_FUZZ_EXAMPLES", "1500"))


class _KeptExamples(DirectoryBasedExampleDatabase):
    """The committed example database, never pruned.

    Hypothesis deletes a saved example once it stops failing, so a fixed bug would leave the
    committed set on its first green run (and CI's clone would differ from the repo). Here an
    example is only ever added: every statement that once found a defect is replayed first on
    every run, for good. New failures land in tests/fuzz/examples/; commit them with the fix.
    """

    def delete(self, key: bytes, value: bytes) -> None:
        pass

    def move(self, src: bytes, dest: bytes, value: bytes) -> None:
        self.save(dest, value)


EXAMPLE_DB = _KeptExamples(str(Path(__file__).parent / "examples"))


@pytest.fixture(scope="module")
def world(shard_databases: Path, oracle) -> Iterator[World]:  # type: ignore[no-untyped-def]
    w = World(shard_databases, oracle.shards[0].url, "fuzz_oracle")
    try:
        yield w
    finally:
        REPORTS.append(coverage(w))
        w.close()


def test_loaded_data_is_exact(world: World) -> None:
    """The rows loaded through the router are where one database has them, lookups included."""
    assert world.load_findings == []


# The finding of the 100,000-statement run of 2026-11-30 (seed 20261205): one database answers
# no rows (it joins countries first; no country is named 'de'), while a shard with few orders
# sorts orders_0000 first and evaluates ``merchant_id * 2`` on a BIGINT_MAX merchant before the
# join rejects the row. The user's own statement does the same on that shard.
PLAN_DEPENDENT = Case(
    sql="SELECT DATE(o.created_at) AS a0 FROM orders o LEFT JOIN countries c"
    " ON c.code = LEFT(o.status, 2) WHERE c.name = :p0"
    " ORDER BY o.merchant_id * 2 DESC, LEFT(o.status, 2), o.order_id, c.code"
    " LIMIT 0, 18446744073709551615",
    params={"p0": "de"},
    kind="select",
    features=frozenset({"regression:plan-dependent-overflow"}),
)


def test_plan_dependent_overflow_is_judged_as_the_database_own(world: World) -> None:
    """The harness accepts the shard's out-of-range error only because the plain statement
    raises it on that shard too (counted, so this test fails if the case stops reaching it)."""
    before = world.counts["outcome:shard-plan-dependent"]
    world.check(PLAN_DEPENDENT)
    assert world.counts["outcome:shard-plan-dependent"] == before + 2  # sync and async


def test_overflow_the_plain_statement_does_not_raise_stays_a_finding(world: World) -> None:
    """The other side: an out-of-range error the user's statement does not raise on that shard
    (the router's rewrite would be to blame) is not excused."""
    case = Case(
        sql="SELECT o.order_id FROM orders o WHERE o.amount_cents = :p0",
        params={"p0": 1},
        kind="select",
        features=frozenset(),
    )
    blamed = ExecutionError(
        "shard s0: 1690", shard="s0", orig=RuntimeError("(1690, 'BIGINT value is out of range')")
    )
    assert world._plan_dependent(case, blamed) is False
    assert world._plan_dependent(PLAN_DEPENDENT, blamed) is True


@pytest.mark.timeout(600)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=EXAMPLE_DB,
    print_blob=True,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
@seed(20261130)  # a fixed seed: CI runs the same statements every time
@given(draw=st.data())
def test_statements_match_one_database(world: World, draw: st.DataObject) -> None:
    case = draw.draw(statements(world.data), label="statement")
    world.check(case)
