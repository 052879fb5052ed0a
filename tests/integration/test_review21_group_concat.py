# ruff: noqa: F811
"""Review 21 of commits 4f235a8 and 056ae85 (GROUP_CONCAT across shards as a select item; the
DISTINCT-values merge after review 20): reproductions on 4 real MariaDB shards against the
one-database oracle (and one on the SQLite demo backend). Each test fails on the reviewed code;
the docstrings say what one database answers and what the router answers instead."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import distinct, false, func, literal, select, text
from test_review20_distinct import _Order
from test_router_oracle import check, refused, world  # noqa: F401  (4 shards + oracle)

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, UnsupportedQueryError
from shardrouter.orm import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


def _rows(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with world["oracle"].connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params or {})]


@contextmanager
def _max_len(world: dict[str, Any], value: int) -> Iterator[tuple[Router, AsyncRouter]]:
    """group_concat_max_len = ``value`` on every shard and the oracle (new connections), and a
    sync and an async router whose connections start after the change; restored after."""
    engines = [*world["router"].engines.primaries.values(), world["oracle"]]
    before = []
    for engine in engines:
        with engine.begin() as conn:
            before.append(conn.execute(text("SELECT @@GLOBAL.group_concat_max_len")).scalar_one())
            conn.execute(text(f"SET GLOBAL group_concat_max_len = {int(value)}"))
    world["oracle"].dispose()
    router = Router(world["topology"])
    aio = AsyncRouter(world["topology"])
    try:
        yield router, aio
    finally:
        router.close()
        world["loop"].run_until_complete(aio.close())
        for engine, old in zip(engines, before, strict=True):
            with engine.begin() as conn:
                conn.execute(text(f"SET GLOBAL group_concat_max_len = {int(old)}"))
        world["oracle"].dispose()


def _check_short(world: dict[str, Any], value: int, sql: str) -> None:
    with _max_len(world, value) as (router, aio):
        expected = _rows(world, sql)
        assert router.execute(sql).rows == expected, sql
        assert world["loop"].run_until_complete(aio.execute(sql)).rows == expected, sql


# -- 1. a global GROUP_CONCAT (ORDER BY / DISTINCT) over no rows loses its constant items --------


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT GROUP_CONCAT(order_id ORDER BY order_id), 'x' FROM orders WHERE 1 = 0", {}),
        (
            "SELECT GROUP_CONCAT(order_id ORDER BY order_id), :p FROM orders WHERE 1 = 0",
            {"p": "hi"},
        ),
        ("SELECT COUNT(*), GROUP_CONCAT(DISTINCT status), 1 + 1 FROM orders WHERE 1 = 0", {}),
        (
            "SELECT COALESCE(SUM(amount_cents), 0), GROUP_CONCAT(order_id ORDER BY order_id)"
            " FROM orders WHERE 1 = 0",
            {},
        ),
        (
            "SELECT 'x', GROUP_CONCAT(DISTINCT status) FROM orders WHERE 1 = 0 HAVING COUNT(*) = 0",
            {},
        ),
        (
            "SELECT GROUP_CONCAT(DISTINCT status ORDER BY status), 'k' FROM orders"
            " WHERE merchant_id > 100",
            {},
        ),
    ],
    ids=["literal", "param", "expression", "coalesce-sum", "having-count", "no-match"],
)
def test_empty_global_group_concat_keeps_its_constant_items(
    world: dict[str, Any], sql: str, params: dict[str, Any]
) -> None:
    """Without GROUP BY an aggregate over no rows is one row with its constants computed: one
    database answers (None, 'x'), (None, 'hi'), (0, None, 2), (0, None), ('x', None) and
    (None, 'k'); the router answers (None, None), (None, None), (0, None, None), (None, None),
    (None, None) and (None, None).

    Cause: the GROUP_CONCAT block in scatter() extends the shards' GROUP BY with the list's
    ORDER BY expressions / DISTINCT argument, so a shard without matching rows sends no row, and
    merge._grouped makes the one row up as ``[None] * need``. Review 20's fix (execution.run:
    ``render_empty`` on one shard) is only taken when ``plan.merge.first`` is set (DISTINCT
    aggregates), not for ``plan.merge.concats`` with keys."""
    check(world, sql, params)


def test_orm_empty_global_group_concat_keeps_its_constant_items(world: dict[str, Any]) -> None:
    """The same through the ORM: select(func.group_concat(distinct(status)), literal('x'))
    .where(false()) is [(None, 'x')] on one database and [(None, None)] through
    routed_sessionmaker (RoutedSession._scatter_text only asks render_empty for
    ``merge_plan.first``)."""
    stmt = select(func.group_concat(distinct(_Order.status)), literal("x")).where(false())
    with world["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(stmt).all()]
    with routed_sessionmaker(world["router"])() as session:
        got = [tuple(r) for r in session.execute(stmt).all()]
    assert expected == [(None, "x")]
    assert got == expected


# -- 2. HAVING on a GROUP_CONCAT's alias compares one shard piece's weight -----------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status) AS g FROM orders"
        " GROUP BY merchant_id HAVING g = 'done' ORDER BY merchant_id",
        "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status) AS g FROM orders"
        " GROUP BY merchant_id HAVING g IN ('new', 'paid') ORDER BY merchant_id",
        "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status) AS g FROM orders"
        " GROUP BY merchant_id HAVING g = 'DONE,NEW,PAID,SHIPPED' ORDER BY merchant_id",
        "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status SEPARATOR ' ') AS g"
        " FROM orders GROUP BY merchant_id HAVING g = 'done new paid shipped   '"
        " ORDER BY merchant_id",
        "SELECT merchant_id, GROUP_CONCAT(DISTINCT status ORDER BY status) AS g FROM orders"
        " GROUP BY merchant_id HAVING g < 'DONE,X' ORDER BY merchant_id",
    ],
    ids=["piece-equal", "piece-in", "case", "pad-space", "less-than"],
)
def test_having_on_a_group_concat_alias_compares_the_whole_list(
    world: dict[str, Any], sql: str
) -> None:
    """Every merchant's list is 'done,new,paid,shipped'. One database: HAVING g = 'done' and
    g IN ('new', 'paid') keep no group; g = 'DONE,NEW,PAID,SHIPPED', g = 'done new paid
    shipped   ' (utf8mb4_general_ci, PAD SPACE) and g < 'DONE,X' keep all 12. The router keeps
    merchants 1, 2, 3, 5, 7, 8, 10 for g = 'done' (their lists are 'done,new,paid,shipped'),
    0, 4, 6, 11 for the IN, none for the two equalities and an arbitrary subset for '<'.

    Cause: scatter() refuses GROUP_CONCAT in HAVING only when written out, not by its alias;
    the HAVING evaluator then compares the alias by the shards' WEIGHT_STRING(GROUP_CONCAT(...))
    hidden column, i.e. the weight of one shard's *piece* (the first row of the group, one
    status here), against the literal's weight, never the joined list.

    Fixed by refusing a GROUP_CONCAT named in HAVING, ORDER BY or GROUP BY (typed)."""
    refused(world, sql, match="GROUP_CONCAT")


# -- 3. GROUP_CONCAT over FLOAT values: 6 digits reach the merge --------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT GROUP_CONCAT(DISTINCT CAST(1000000 + order_id % 3 AS FLOAT)) FROM orders",
        "SELECT GROUP_CONCAT(DISTINCT CAST(1000000 + order_id % 3 AS FLOAT)"
        " ORDER BY CAST(1000000 + order_id % 3 AS FLOAT)) FROM orders",
        "SELECT GROUP_CONCAT(order_id % 3 ORDER BY CAST(1000000 + order_id % 3 AS FLOAT) DESC,"
        " order_id) FROM orders WHERE merchant_id = 3",
    ],
    ids=["distinct", "distinct-ordered", "order-by-float"],
)
def test_group_concat_of_float_values_keeps_them_apart(world: dict[str, Any], sql: str) -> None:
    """FLOATs 1000000, 1000001, 1000002 are three values to MariaDB but print as '1000000'.
    GROUP_CONCAT(DISTINCT ...) lists three on one database ('1000000,1000000,1000000'), the
    router one ('1000000'); ordered by the FLOAT descending, one database lists the 2s, then the
    1s, then the 0s; the router interleaves them by order_id.

    Cause: the DISTINCT argument / ORDER BY key reaches the merge as the text of a FLOAT
    (6 significant digits), so values the shards tell apart compare equal in _joined.
    4f235a8/056ae85 refuse exactly this for COUNT(DISTINCT float) (MergePlan.exact: "a FLOAT
    reaches the router in 6 digits") but not for GROUP_CONCAT's Concat.distinct / order_by.
    (The statement-level ORDER BY a FLOAT has the same gap already.)

    Fixed by refusing a float GROUP_CONCAT key (MergePlan.exact), typed; since review 24 the
    FLOAT flag of the result metadata refuses it first (execution._refuse_floats)."""
    refused(world, sql, match="(?i)float")


# -- 4. the cut at group_concat_max_len ---------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT GROUP_CONCAT(CONCAT(REPEAT('x', 49), 'é') ORDER BY order_id) FROM orders"
        " WHERE merchant_id = 3",
        "SELECT GROUP_CONCAT(CONCAT(REPEAT('x', 47), 'éé') ORDER BY order_id SEPARATOR '')"
        " FROM orders WHERE merchant_id = 3",
    ],
    ids=["separator-after-cut", "next-value-after-cut"],
)
def test_the_list_ends_at_a_value_its_shard_cut(world: dict[str, Any], sql: str) -> None:
    """group_concat_max_len = 50: the first value is 51 bytes ('x' * 49 + 'é'), so MariaDB
    cuts it to the 49 x's (not inside 'é') and the list ends there: 'xxx...x' (49). The router
    answers 'xxx...x,' (49 x's and the separator); with 'x' * 47 + 'éé' and no separator,
    one database answers 47 x's + 'é' (49 bytes), the router appends the first byte-sized
    character of the next value ('x'), 50 bytes.

    Cause: each shard sends its piece already cut at its own group_concat_max_len on a
    character boundary, so LENGTH(piece) is below the limit; _joined takes the piece as whole
    and keeps filling the remaining byte(s) with the separator / the next piece, where MariaDB
    stops at the first value that did not fit.

    Fixed by refusing a list that reaches the limit inside a piece a shard may have cut."""
    with _max_len(world, 50) as (router, aio):
        with pytest.raises(UnsupportedQueryError, match="group_concat_max_len"):
            router.execute(sql)
        with pytest.raises(UnsupportedQueryError, match="group_concat_max_len"):
            world["loop"].run_until_complete(aio.execute(sql))


def test_a_utf16_list_counts_its_separators_in_utf16(world: dict[str, Any]) -> None:
    """GROUP_CONCAT(CONVERT(LEFT(status, 1) USING utf16) ORDER BY order_id) over n rows is, in
    utf16, 2n bytes of values plus 2(n - 1) bytes of separators (MariaDB converts the SEPARATOR
    to the result's character set). With group_concat_max_len = 3n - 1 one database cuts the
    list to (3n - 1) // 2 characters; the router returns all 2n - 1 characters, uncut.

    Cause: _joined counts the ASCII separator as len(separator) bytes (one a character), while
    the piece sizes come from the shard's LENGTH() in utf16: 2n + (n - 1) = 3n - 1 fits the
    limit by its count, so there is no cut (and so no refusal from _cut_piece either).

    Fixed by refusing a list in a character set that is neither single-byte nor UTF-8."""
    sql = (
        "SELECT GROUP_CONCAT(CONVERT(LEFT(status, 1) USING utf16) ORDER BY order_id)"
        " FROM orders WHERE merchant_id = 3"
    )
    (n,) = _rows(world, "SELECT COUNT(*) FROM orders WHERE merchant_id = 3")[0]
    assert n > 2
    with _max_len(world, 3 * n - 1) as (router, aio):
        assert _rows(world, sql)[0][0] is not None  # one database answers (cut)
        with pytest.raises(UnsupportedQueryError, match="character set"):
            router.execute(sql)
        with pytest.raises(UnsupportedQueryError, match="character set"):
            world["loop"].run_until_complete(aio.execute(sql))


# -- 5. the SQLite demo backend: GROUP_CONCAT on one target --------------------------------------


def test_sqlite_group_concat_on_one_target(tmp_path: Path) -> None:
    """docs/SQL.md (056ae85): "On SQLite shards (the demo backend) GROUP_CONCAT runs on one
    target only". SELECT GROUP_CONCAT(order_id) FROM orders WHERE user_id = :u (one target)
    answers on one SQLite database the user's order ids; the router raises ExecutionError
    'near "SEPARATOR": syntax error'.

    Cause: the statement is rendered with MySQL's GROUP_CONCAT(x SEPARATOR ',') (sqlglot adds
    the default separator) for a SQLite shard, which spells it GROUP_CONCAT(x, ',').
    (Older than this change, which only documents it as working.)

    Kept as documented instead (docs/SQL.md): GROUP_CONCAT is not available on SQLite shards;
    the shard's refusal reaches the caller as the typed ExecutionError, across shards a typed
    UnsupportedQueryError before anything runs."""
    from shardrouter.engine.engines import ShardEngines
    from shardrouter.ops.schema import apply as apply_schema

    config = Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml"
    topology = Topology.load(config, {"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    engines = ShardEngines(topology)
    apply_schema(topology, engines).raise_for_errors()
    router = Router(topology, engines=engines)
    oracle = sqlite3.connect(":memory:")
    try:
        oracle.execute("CREATE TABLE orders (order_id INTEGER PRIMARY KEY, user_id INTEGER)")
        ids = topology.id_generator("orders")
        for user in (3, 3, 3, 4):
            order = ids.next_id(user_id=user)
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (:o, :u, 1, 'paid', 100, '2026-01-01 00:00:00.000')",
                {"o": order, "u": user},
            )
            oracle.execute("INSERT INTO orders VALUES (?, ?)", (order, user))
        sql = "SELECT GROUP_CONCAT(order_id) FROM orders WHERE user_id = :u"
        (expected,) = oracle.execute(sql.replace(":u", "?"), (3,)).fetchone()
        assert len(expected.split(",")) == 3
        with pytest.raises(ExecutionError, match="SEPARATOR"):
            router.execute(sql, {"u": 3})
        with pytest.raises(UnsupportedQueryError, match="SQLite"):
            router.execute("SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders")
    finally:
        oracle.close()
        router.close()
