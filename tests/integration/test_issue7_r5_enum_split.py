"""Issue 7, round 5 (review 4, finding 7): an ENUM column of a split table is ordered as one
database, or refused by name, on real MariaDB shards (the module ``world`` of
test_issue7_review: users and orders on four shards, orders split in four tables per shard).

The router sends one statement per shard: its splits' queries in a UNION ALL. MariaDB types a
UNION's ENUM column VARCHAR, without the ENUM flag (flags 256 on a plain SELECT, 0 through the
UNION), so the merge's ENUM refusal (execution._refuse_index_ordered) never fired and ORDER BY,
GROUP BY and DISTINCT on an ENUM answered in text order ('alpha' < 'mid' < 'zeta') where one
database answers in index order (zeta, alpha, mid). A keyset page by an ENUM column bound its
cursor as text (``prio > 'zeta'``) while the shards order by index: pages skipped rows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import text

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError
from shardrouter.sql.execution import sql_log
from tests.integration import test_issue7_review as _review

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

PRIOS = ("zeta", "alpha", "mid")  # index order; text order is alpha, mid, zeta
MERCHANT = 900  # its orders are on one shard, in two splits (found through merchant_orders)

ENUM_QUERIES = [
    "SELECT order_id, prio FROM orders ORDER BY prio, order_id LIMIT 30",
    "SELECT prio, COUNT(*) FROM orders GROUP BY prio ORDER BY prio",
    "SELECT DISTINCT prio FROM orders",
    "SELECT order_id, prio FROM orders ORDER BY prio DESC, order_id DESC",
]
ENUM_IDS = ["order_by", "group_by", "distinct", "order_by_desc"]


@pytest.fixture(scope="module")
def orders_with_enum(world: dict[str, Any]) -> Iterator[None]:
    """orders gets an ENUM column ``prio`` (declared zeta, alpha, mid: index order differs from
    text order) on every shard's splits and on the oracle, with the same values."""
    router: Router = world["router"]
    add = "ALTER TABLE {t} ADD COLUMN IF NOT EXISTS prio ENUM('zeta', 'alpha', 'mid') NULL"
    fill = "UPDATE {t} SET prio = ELT(1 + order_id % 3, 'zeta', 'alpha', 'mid')"
    names = router.topology.table("orders").physical_names
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for name in names:
                conn.execute(text(add.format(t=name)))
                conn.execute(text(fill.format(t=name)))
    with world["oracle"].begin() as conn:
        conn.execute(text(add.format(t="orders")))
        conn.execute(text(fill.format(t="orders")))
    # merchant MERCHANT's orders: two users on one shard, in two of its splits, every prio
    ids = router.topology.id_generator("orders", worker_id=18)
    insert = text(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status, prio)"
        " VALUES (:o, :u, :m, 100, 'new', :p)"
    )
    for user in _same_shard_other_split(router):
        for prio, order in zip(PRIOS, ids.next_ids(3, user_id=user), strict=True):
            row = {"o": order, "u": user, "m": MERCHANT, "p": prio}
            router.execute(str(insert), row)
            with world["oracle"].begin() as conn:
                conn.execute(insert, row)
    yield


def _oracle(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    with world["oracle"].connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params or {})]


def _same_shard_other_split(router: Router) -> tuple[int, int]:
    """Two users whose orders live on one shard but in different split tables."""
    topology = router.topology
    users = [u["user_id"] for u in _review._rows(topology)["users"]]
    rule = topology.table("orders")
    seen: dict[str, tuple[int, str]] = {}
    for user in users:
        slot = topology.slot_for("orders", user)
        shard, physical = topology.shard_of_slot(slot), rule.physical(slot)
        if shard in seen and seen[shard][1] != physical:
            return seen[shard][0], user
        seen.setdefault(shard, (user, physical))
    raise AssertionError("no two users on one shard in different splits")


@pytest.mark.parametrize("sql", ENUM_QUERIES, ids=ENUM_IDS)
def test_enum_of_a_split_table_is_ordered_as_one_database(
    world: dict[str, Any], orders_with_enum: None, sql: str
) -> None:
    """Across shards, each running its splits: the oracle's order or UnsupportedQueryError
    (before: text order, from the UNION ALL that lost the ENUM flag)."""
    router: Router = world["router"]
    want = _oracle(world, sql)
    for _ in range(2):  # the first run finds a string compared, the next probes from the start
        try:
            got = [tuple(r) for r in router.execute(sql).rows]
        except UnsupportedQueryError as exc:
            assert "ENUM or SET" in str(exc) and "prio" in str(exc)
            continue
        assert got == want


@pytest.mark.parametrize("sql", ENUM_QUERIES, ids=ENUM_IDS)
def test_enum_of_a_split_table_is_ordered_as_one_database_async(
    world: dict[str, Any], orders_with_enum: None, sql: str
) -> None:
    aio: AsyncRouter = world["aio"]
    want = _oracle(world, sql)
    for _ in range(2):
        try:
            got = [tuple(r) for r in world["loop"].run_until_complete(aio.execute(sql)).rows]
        except UnsupportedQueryError as exc:
            assert "ENUM or SET" in str(exc) and "prio" in str(exc)
            continue
        assert got == want


ONE_SHARD = [
    "SELECT order_id, prio FROM orders WHERE {w} ORDER BY prio, order_id",
    "SELECT prio, COUNT(*) FROM orders WHERE {w} GROUP BY prio",
    "SELECT DISTINCT prio FROM orders WHERE {w} ORDER BY prio",
]
ROUTES = {
    "lookup": "merchant_id = :m",  # through merchant_orders: the splits in one UNION ALL
    "in_list": "user_id IN (:a, :b) AND merchant_id = :m",  # each split its IN values
}


@pytest.mark.parametrize("route", list(ROUTES))
@pytest.mark.parametrize("sql", ONE_SHARD, ids=["order_by", "group_by", "distinct"])
def test_enum_of_one_shards_splits_is_ordered_as_one_database(
    world: dict[str, Any], orders_with_enum: None, sql: str, route: str
) -> None:
    """A statement routed to one shard but two of its splits is merged like a scatter: the
    same answer, outside a transaction, inside one, and async."""
    router: Router = world["router"]
    a, b = _same_shard_other_split(router)
    params = {"a": a, "b": b, "m": MERCHANT}
    sql = sql.format(w=ROUTES[route])
    probe = router.execute(f"SELECT user_id FROM orders WHERE {ROUTES[route]}", params)
    assert len(probe.shards) == 1 and set(probe.scalars()) == {a, b}  # one shard, two splits
    want = _oracle(world, sql, params)
    assert len({r[1] if "order_id" in sql else r[0] for r in want}) > 1  # several prios
    outcomes: list[Any] = []

    def attempt(run: Any) -> None:
        try:
            outcomes.append([tuple(r) for r in run().rows])
        except UnsupportedQueryError as exc:
            assert "ENUM or SET" in str(exc)
            outcomes.append("refused")

    attempt(lambda: router.execute(sql, params))
    with router.transaction() as txn:
        attempt(lambda: txn.execute(sql, params))
    loop = world["loop"]
    attempt(lambda: loop.run_until_complete(world["aio"].execute(sql, params)))
    for outcome in outcomes:
        assert outcome in ("refused", want)


def _pages(page: Any, **kwargs: Any) -> list[Any] | str:
    """Every row of a keyset listing, page after page, or "refused"."""
    rows: list[Any] = []
    after = None
    for _ in range(200):
        try:
            got = page(after=after, **kwargs)
        except UnsupportedQueryError as exc:
            assert "prio" in str(exc) and "ENUM" in str(exc)
            return "refused"
        rows += [tuple(r) for r in got.rows]
        if got.after is None:
            return rows
        after = got.after
    raise AssertionError("the listing never ended")


@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
def test_keyset_pages_by_an_enum_column_on_one_target(
    world: dict[str, Any], orders_with_enum: None, descending: bool
) -> None:
    """One user's orders (one target): the shard orders by the ENUM's index, but a cursor
    ``prio > 'zeta'`` compares text, so the next page skipped the rows after 'zeta'. Either the
    oracle's rows or a typed refusal naming the column."""
    router: Router = world["router"]
    orders = _oracle(world, "SELECT user_id, COUNT(DISTINCT prio) FROM orders GROUP BY user_id")
    user = next(u for u, n in orders if n >= 3)
    direction = " DESC" if descending else ""
    want = _oracle(
        world,
        "SELECT order_id, prio FROM orders WHERE user_id = :u"
        f" ORDER BY prio{direction}, order_id{direction}",
        {"u": user},
    )
    kwargs = {
        "columns": ("order_id", "prio"),
        "order_by": ("prio", "order_id"),
        "where": {"user_id": user},
        "limit": 1,
        "descending": descending,
    }
    got = _pages(lambda **kw: router.page("orders", **kw), **kwargs)
    assert got in ("refused", want)
    loop = world["loop"]
    got = _pages(lambda **kw: loop.run_until_complete(world["aio"].page("orders", **kw)), **kwargs)
    assert got in ("refused", want)


def test_keyset_pages_by_an_enum_column_across_shards(
    world: dict[str, Any], orders_with_enum: None
) -> None:
    router: Router = world["router"]
    want = _oracle(world, "SELECT order_id, prio FROM orders ORDER BY prio, order_id")
    got = _pages(
        lambda **kw: router.page("orders", **kw),
        columns=("order_id", "prio"),
        order_by=("prio", "order_id"),
        limit=7,
        descending=False,
    )
    assert got in ("refused", want)


def test_a_cursor_of_an_enum_column_passed_in_is_refused(
    world: dict[str, Any], orders_with_enum: None
) -> None:
    """A cursor the caller kept (say, from before the column became an ENUM) is compared as
    text too: refused with the page it would have given."""
    router: Router = world["router"]
    user = _review._rows(router.topology)["users"][0]["user_id"]
    with pytest.raises(UnsupportedQueryError, match="ENUM"):
        router.page(
            "orders",
            columns=("order_id", "prio"),
            order_by=("prio", "order_id"),
            where={"user_id": user},
            after=("zeta", 0),
            limit=5,
            descending=False,
        )


# -- what stays: other columns of split tables merge as before ----------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id, status FROM orders ORDER BY status, order_id LIMIT 25",
        "SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY status",
        "SELECT DISTINCT status FROM orders ORDER BY status",
        "SELECT order_id, prio + 0 FROM orders ORDER BY prio + 0, order_id LIMIT 25",
        "SELECT order_id, user_id FROM orders ORDER BY user_id DESC, order_id LIMIT 25",
    ],
    ids=["varchar_order_by", "varchar_group_by", "varchar_distinct", "enum_index", "numbers"],
)
def test_other_columns_of_split_tables_merge_as_one_database(
    world: dict[str, Any], orders_with_enum: None, sql: str
) -> None:
    router: Router = world["router"]
    want = _oracle(world, sql)
    for _ in range(2):  # the second run sends a flag probe with each UNION (Plan.strings_compared)
        assert [tuple(r) for r in router.execute(sql).rows] == want
        got = world["loop"].run_until_complete(world["aio"].execute(sql)).rows
        assert [tuple(r) for r in got] == want


class _Statements(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.seen.append(str(getattr(record, "statement", "")))


def test_a_scatter_ordered_by_a_string_sends_a_flag_probe_with_each_union(
    world: dict[str, Any], orders_with_enum: None
) -> None:
    """ORDER BY a VARCHAR over split tables: the first run finds a string compared and asks
    each shard for its flags (a LIMIT 0 probe); later runs send the probe with the UNION, one
    round trip more per shard, never one statement per split."""
    router: Router = world["router"]
    sql = "SELECT order_id, status FROM orders ORDER BY status DESC, order_id LIMIT 7"
    handler = _Statements()
    level = sql_log.level
    sql_log.setLevel(logging.DEBUG)
    sql_log.addHandler(handler)
    try:
        first = router.execute(sql).rows
        runs = [len(handler.seen)]
        second = router.execute(sql).rows
        runs.append(len(handler.seen) - runs[0])
    finally:
        sql_log.removeHandler(handler)
        sql_log.setLevel(level)
    shards = len(router.topology.shards)
    assert runs == [2 * shards, 2 * shards]  # UNION then probe; then probe and UNION
    assert sum("UNION ALL" in s for s in handler.seen) == 2 * shards
    assert sum(s.endswith("LIMIT 0") for s in handler.seen) == 2 * shards
    want = _oracle(world, sql)
    assert [tuple(r) for r in first] == want == [tuple(r) for r in second]


def test_a_scatter_ordered_by_numbers_keeps_one_union_per_shard(
    world: dict[str, Any], orders_with_enum: None
) -> None:
    """No string is compared, so no ENUM can be: every shard still runs its splits in one UNION
    ALL, one statement per shard (the cheaper path, see docs/ARCHITECTURE.md)."""
    router: Router = world["router"]
    handler = _Statements()
    level = sql_log.level
    sql_log.setLevel(logging.DEBUG)
    sql_log.addHandler(handler)
    try:
        for _ in range(2):
            router.execute("SELECT order_id, prio FROM orders ORDER BY order_id DESC LIMIT 10")
    finally:
        sql_log.removeHandler(handler)
        sql_log.setLevel(level)
    shards = len(router.topology.shards)
    assert len(handler.seen) == 2 * shards
    assert all("UNION ALL" in s for s in handler.seen)
    # and the answer is the oracle's
    want = _oracle(world, "SELECT order_id, prio FROM orders ORDER BY order_id DESC LIMIT 10")
    got = router.execute("SELECT order_id, prio FROM orders ORDER BY order_id DESC LIMIT 10")
    assert [tuple(r) for r in got.rows] == want
