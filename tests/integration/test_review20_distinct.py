# ruff: noqa: F811
"""Review 20 of commit 4f235a8 (COUNT/SUM/AVG(DISTINCT x) across shards for any column x):
reproductions on 4 real MariaDB shards against the one-database oracle (and one on the SQLite
demo backend). Each test fails on the reviewed code; the docstrings say what one database
answers and what the router answers instead."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import BigInteger, String, distinct, false, func, literal, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from test_router_oracle import check, refused, world  # noqa: F401  (the module's 4 shards + oracle)

from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError
from shardrouter.orm import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


def _reprs(rows: Any) -> list[tuple[str, ...]]:
    return [tuple(map(repr, r)) for r in rows]


def _both(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> None:
    """The sync and async routers' rows, exactly (reprs) equal to the oracle's."""
    params = params or {}
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(text(sql), params)]
    got_sync = world["router"].execute(sql, params).rows
    got_async = world["loop"].run_until_complete(world["aio"].execute(sql, params)).rows
    assert _reprs(got_sync) == _reprs(expected), sql
    assert _reprs(got_async) == _reprs(expected), sql


# -- 1. a global DISTINCT aggregate over no rows loses its constant items ------------------------


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT COUNT(DISTINCT merchant_id), 'x' FROM orders WHERE 1 = 0", {}),
        ("SELECT COUNT(DISTINCT merchant_id), :p FROM orders WHERE 1 = 0", {"p": "hi"}),
        ("SELECT COUNT(DISTINCT merchant_id), MAX(user_id), 1 + 1 FROM orders WHERE 1 = 0", {}),
        (
            "SELECT COUNT(DISTINCT merchant_id), COALESCE(SUM(amount_cents), 0) FROM orders"
            " WHERE 1 = 0",
            {},
        ),
        ("SELECT 'x' FROM orders WHERE 1 = 0 HAVING COUNT(DISTINCT merchant_id) = 0", {}),
        (
            "SELECT COUNT(DISTINCT merchant_id) AS n, 'x' AS k FROM orders WHERE 1 = 0"
            " HAVING k = 'x'",
            {},
        ),
    ],
    ids=["literal", "param", "expression", "coalesce-sum", "having-count", "having-alias"],
)
def test_empty_global_distinct_aggregate_keeps_its_constant_items(
    world: dict[str, Any], sql: str, params: dict[str, Any]
) -> None:
    """Without GROUP BY, an aggregate over no rows is one row, and its constant items are
    still computed: one database answers (0, 'x'), (0, 'hi'), (0, None, 2), (0, 0), ('x',) and
    (0, 'x'). The router answers (0, None), (0, None), (0, None, None), (0, None), (None,) and
    no row at all (HAVING k = 'x' sees k NULL).

    Cause: the shards now GROUP BY the DISTINCT argument, so a shard without matching rows
    sends no row (before, an ungrouped aggregate always sent one row, with the constants);
    merge._grouped then makes the one row up as ``[None] * need``, so every non-aggregate
    item (literals, bound parameters, expressions over literals, COALESCE(SUM(x), 0)
    partials) is NULL."""
    check(world, sql, params)


class _Base(DeclarativeBase):
    pass


class _Order(_Base):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    merchant_id: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))


def test_orm_empty_global_distinct_aggregate_keeps_its_constant_items(
    world: dict[str, Any],
) -> None:
    """The same through the ORM (RoutedSession._scatter_text -> merged_rows):
    select(count(distinct(merchant_id)), literal('x')).where(false()) is [(0, 'x')] on one
    database and [(0, None)] through routed_sessionmaker."""
    stmt = select(func.count(distinct(_Order.merchant_id)), literal("x")).where(false())
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(stmt).all()]
    with routed_sessionmaker(world["router"])() as session:
        got = [tuple(r) for r in session.execute(stmt).all()]
    assert expected == [(0, "x")]
    assert got == expected


# -- 2. a DISTINCT aggregate inside a WHERE subquery rewrites the outer query --------------------


@pytest.mark.parametrize(
    "sql",
    [
        # lost rows: the outer (non-aggregate) query is grouped by the subquery's argument
        "SELECT o.order_id FROM orders o WHERE 0 < (SELECT COUNT(DISTINCT user_id + 0)"
        " FROM order_items i WHERE i.order_id = o.order_id) ORDER BY o.order_id",
        "SELECT o.order_id, c.code FROM orders o"
        " JOIN countries c ON c.code = IF(o.merchant_id % 2 = 0, 'CN', 'DE')"
        " WHERE o.merchant_id < (SELECT COUNT(DISTINCT code) FROM countries) ORDER BY 1",
        # answered before 4f235a8, now a shard error (1054 Unknown column in GROUP BY)
        "SELECT COUNT(*) FROM orders WHERE merchant_id < (SELECT COUNT(DISTINCT code)"
        " FROM countries)",
        "SELECT o.status, COUNT(*) FROM orders o WHERE 2 <= (SELECT COUNT(DISTINCT sku)"
        " FROM order_items i WHERE i.order_id = o.order_id) GROUP BY o.status ORDER BY 1",
        "SELECT o.order_id FROM orders o WHERE 1 < (SELECT COUNT(DISTINCT i.qty)"
        " FROM order_items i WHERE i.order_id = o.order_id) ORDER BY o.order_id LIMIT 5",
    ],
    ids=["correlated-lost-rows", "broadcast-lost-rows", "broadcast", "correlated-grouped", "qty"],
)
def test_distinct_aggregate_of_a_subquery_does_not_group_the_outer_query(
    world: dict[str, Any], sql: str
) -> None:
    """COUNT(DISTINCT ...) inside a WHERE subquery (over the broadcast countries, or a
    correlated one confined to the outer row's order) belongs to the subquery. One database
    answers every matching order (588 rows for the first, 154 for the second); the router
    answers 240 rows, one per distinct user_id + 0 (first), and 2 rows, one per country code
    (second); the other three, which the parent commit 9f23177 answered correctly, fail with
    ExecutionError 1054 "Unknown column 'code'/'sku'/'i.qty'".

    Cause: scatter._spread_arguments (and _summed_distinct) walk tree.find_all(exp.AggFunc),
    which descends into subqueries, so the subquery's argument becomes the outer statement's
    spread: the shards get GROUP BY <that argument> appended to the outer query and the merge a
    `first` plan deduplicating rows by it."""
    check(world, sql)


# -- 3. values the driver cannot tell apart, or that MariaDB sums as other numbers ---------------

_DDL = (
    "CREATE TABLE users (user_id BIGINT PRIMARY KEY, g INT NOT NULL, f FLOAT NULL,"
    " t DATETIME(6) NULL) DEFAULT CHARSET=utf8mb4"
)
_ROWS = [  # (g, f, t): each row on another shard
    (1, 1.0000001, "2026-01-01 00:00:00.000001"),
    (1, 1.0000002, "2026-01-01 00:00:00.000002"),
    (1, 1.0000003, "2026-01-02 00:00:00.000000"),
]


@pytest.fixture(scope="module")
def typed(world: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """A `users` table (the topology's, sharded by user_id; not used by the world fixture)
    with a FLOAT and a DATETIME(6) column, one row per shard, and the same rows in the oracle;
    dropped afterwards."""
    topology: Topology = world["topology"]
    engines = world["router"].engines.primaries
    shards = sorted(engines)
    insert = "INSERT INTO users (user_id, g, f, t) VALUES (:u, :g, :f, :t)"
    rows: list[tuple[str, dict[str, Any]]] = []
    user = 7_000_000
    for n, (g, f, t) in enumerate(_ROWS):
        want = shards[n % len(shards)]
        while topology.shard_of_slot(topology.slot_for("users", user)) != want:
            user += 1
        rows.append((want, {"u": user, "g": g, "f": f, "t": t}))
        user += 1
    for name, engine in engines.items():
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS users"))
            conn.execute(text(_DDL))
            for shard, row in rows:
                if shard == name:
                    conn.execute(text(insert), row)
    with world["oracle"].begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS users"))
        conn.execute(text(_DDL))
        conn.execute(text(insert), [row for _, row in rows])
    try:
        yield world
    finally:
        for engine in engines.values():
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE IF EXISTS users"))
        with world["oracle"].begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS users"))


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(DISTINCT f) FROM users",
        "SELECT SUM(DISTINCT f) FROM users",
        "SELECT g, COUNT(DISTINCT f), AVG(DISTINCT f) FROM users GROUP BY g",
    ],
)
def test_distinct_float_values_count_apart(typed: dict[str, Any], sql: str) -> None:
    """Three different FLOAT values (1.0000001, 1.0000002, 1.0000003 as float32): one
    database counts 3 and sums 3.0000007152557373; the router counts 1 and sums
    1.0000003576278687 (AVG likewise wrong).

    Cause: MariaDB sends a FLOAT in text with 6 significant digits, so the driver decodes all
    three as 1.0; the first merge (MergePlan.first, grouping by the DISTINCT argument) compares
    those decoded values and keeps one row where the shards had three distinct groups.

    Fixed by refusing a float DISTINCT argument (MergePlan.exact), typed."""
    refused(typed, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(DISTINCT t) FROM users",
        "SELECT COUNT(DISTINCT t), SUM(DISTINCT t), AVG(DISTINCT t) FROM users",
    ],
)
def test_sum_distinct_of_fractional_datetimes(typed: dict[str, Any], sql: str) -> None:
    """SUM/AVG(DISTINCT t) of a DATETIME(6): MariaDB adds the values' numbers, and
    '2026-01-01 00:00:00.000001' and '...000002' are one number there (20260101000000), so one
    database answers SUM 40520203000000.000000 (AVG 20260101500000.0000000000) while
    COUNT(DISTINCT t) is 3. The router answers SUM 60780304000000.000000 (AVG
    20260101333333.3333333333): it added 20260101000000 twice.

    Cause: the merge deduplicates by the fetched DISTINCT argument (two datetimes), while
    MariaDB's SUM/AVG(DISTINCT) deduplicate the converted numbers; MergePlan.numbers refuses
    only str/bytes arguments, not temporal ones whose numeric value is lossy.

    Fixed by refusing a temporal SUM/AVG(DISTINCT) argument (MergePlan.numbers), typed."""
    refused(typed, sql)


def test_sum_distinct_of_doubles_adds_in_one_databases_order(world: dict[str, Any]) -> None:
    """SUM(DISTINCT amount_cents * '0.1') is a DOUBLE (the string makes it one), summed in an
    order-dependent way: one database answers 1369179.0999999968, the router
    1369179.1000000003 (AVG(DISTINCT) likewise differs in the last digits).

    Cause: scatter._inexact_term refuses DOUBLE literals, CAST AS DOUBLE and SQRT & co., but
    not a string operand in arithmetic (nor a DOUBLE/FLOAT column); the merge then adds the
    distinct values in shard order, MariaDB in its own. (Plain SUM(amount_cents * '0.1') ...
    GROUP BY status already differed before 4f235a8; the DISTINCT form is new.)

    Fixed by refusing a float SUM/AVG(DISTINCT) argument (MergePlan.numbers), typed."""
    refused(
        world,
        "SELECT SUM(DISTINCT amount_cents * '0.1'), AVG(DISTINCT amount_cents * '0.1') FROM orders",
    )


# -- 4. the SQLite demo backend: an explicit collation --------------------------------------------


def test_sqlite_count_distinct_with_an_explicit_collation(tmp_path: Path) -> None:
    """On the SQLite demo backend, COUNT(DISTINCT status COLLATE NOCASE) over 'paid', 'Paid',
    'PAID', 'new' spread over the shards: one SQLite database answers 2, the router 4.

    Cause: without_weights() drops every weight column on SQLite on the premise that SQLite
    strings compare as BINARY, so the first merge groups the DISTINCT argument by its Python
    value; an explicit COLLATE NOCASE (which each shard's GROUP BY honours) is ignored. (GROUP
    BY x COLLATE NOCASE has the same gap already; the DISTINCT aggregate newly reaches it.)"""
    from shardrouter.engine.engines import ShardEngines
    from shardrouter.ops.schema import apply as apply_schema

    config = Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml"
    topology = Topology.load(config, {"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    engines = ShardEngines(topology)
    apply_schema(topology, engines).raise_for_errors()
    router = Router(topology, engines=engines)
    oracle = sqlite3.connect(":memory:")
    try:
        oracle.execute("CREATE TABLE orders (order_id INTEGER PRIMARY KEY, status TEXT)")
        ids = topology.id_generator("orders")
        statuses = ["paid", "Paid", "PAID", "new"]
        for user in range(1, 41):
            order = ids.next_id(user_id=user)
            status = statuses[user % len(statuses)]
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (:o, :u, 1, :s, 100, '2026-01-01 00:00:00.000')",
                {"o": order, "u": user, "s": status},
            )
            oracle.execute("INSERT INTO orders VALUES (?, ?)", (order, status))
        sql = "SELECT COUNT(DISTINCT status COLLATE NOCASE) FROM orders"
        expected = [tuple(r) for r in oracle.execute(sql)]
        assert expected == [(2,)]
        # Fixed by refusing: the merge compares SQLite strings as BINARY.
        with pytest.raises(UnsupportedQueryError, match="COLLATE"):
            router.execute(sql)
        plain = "SELECT COUNT(DISTINCT status), COUNT(DISTINCT status) FROM orders"
        assert router.execute(plain).rows == [tuple(r) for r in oracle.execute(plain)] == [(4, 4)]
    finally:
        oracle.close()
        router.close()
