"""Issue 7 defects 6-9, 13, 21 and the allow-list on real MariaDB: every statement either returns
(or leaves) what one unsharded MariaDB (the oracle) returns (or leaves), or is refused with
UnsupportedQueryError before anything runs."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError

pytestmark = pytest.mark.mariadb

DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'new',"
    " amount_cents BIGINT NULL, KEY (user_id))",
    "order_items": "CREATE TABLE {t} (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, qty INT NOT NULL DEFAULT 1,"
    " PRIMARY KEY (order_id, line))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "countries": "CREATE TABLE {t} (code CHAR(2) PRIMARY KEY, name VARCHAR(64) NOT NULL)",
}


def _create(engine: Engine, names: dict[str, tuple[str, ...]]) -> None:
    with engine.begin() as conn:
        for logical, physicals in names.items():
            for name in physicals:
                conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                conn.execute(text(DDL[logical].format(t=name)))


def _truncate(engine: Engine, names: dict[str, tuple[str, ...]]) -> None:
    with engine.begin() as conn:
        for physicals in names.values():
            for name in physicals:
                conn.execute(text(f"DELETE FROM {name}"))


def _norm(rows: list[tuple[Any, ...]]) -> Counter[tuple[Any, ...]]:
    return Counter(tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows)


class World:
    """The router over four shards and the oracle, filled with the same rows."""

    def __init__(self, router: Router, oracle: Engine) -> None:
        self.router = router
        self.oracle = oracle
        self.topology = router.topology
        self.ids = router.topology.id_generator("orders")

    def users_on_distinct_shards(self, n: int) -> list[int]:
        found: dict[str, int] = {}
        u = 5000
        while len(found) < n:
            found.setdefault(self.topology.shard_for("orders", u), u)
            u += 1
        return list(found.values())

    def both(self, sql: str, params: dict[str, Any]) -> None:
        """Run a write through the router and on the oracle."""
        self.router.execute(sql, params)
        with self.oracle.begin() as conn:
            conn.execute(text(sql), params)

    def add_order(self, user: int, merchant: int, status: str, amount: int, items: int) -> int:
        order_id = self.ids.next_id(user_id=user)
        row = {"o": order_id, "u": user, "m": merchant, "s": status, "a": amount}
        self.both(
            "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
            " VALUES (:o, :u, :m, :s, :a)",
            row,
        )
        with self.oracle.begin() as conn:
            conn.execute(text("INSERT INTO merchant_orders VALUES (:m, :o, :u)"), row)
        for line in range(items):
            self.both(
                "INSERT INTO order_items (order_id, line, user_id, sku) VALUES (:o, :l, :u, :s)",
                {"o": order_id, "l": line, "u": user, "s": status if line == 0 else f"sku{line}"},
            )
        return order_id

    def oracle_rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.oracle.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params or {})]

    def router_table(self, table: str, columns: str) -> Counter[tuple[Any, ...]]:
        sql = f"SELECT {columns} FROM {table}"
        return _norm(self.router.execute(sql).rows)

    def oracle_table(self, table: str, columns: str) -> Counter[tuple[Any, ...]]:
        return _norm(self.oracle_rows(f"SELECT {columns} FROM {table}"))

    def same_tables(self) -> None:
        for table, columns in (
            ("orders", "order_id, user_id, merchant_id, status, amount_cents"),
            ("order_items", "order_id, line, user_id, sku, qty"),
        ):
            assert self.router_table(table, columns) == self.oracle_table(table, columns), table


@pytest.fixture(scope="module")
def _env(shard_databases: Path, oracle: Any) -> Iterator[tuple[Router, Engine, dict[str, Any]]]:
    topology = Topology.load(shard_databases)
    router = Router(topology, max_fanout=None)
    names = {t: topology.table(t).physical_names for t in DDL}
    for engine in router.engines.primaries.values():
        _create(engine, names)
    server = make_url(oracle.shards[0].url).set(database="")
    admin = create_engine(server)
    with admin.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS shapes_oracle"))
        conn.execute(text("CREATE DATABASE shapes_oracle"))
    admin.dispose()
    oracle_engine = create_engine(server.set(database="shapes_oracle"))
    _create(oracle_engine, {t: (t,) for t in DDL})
    try:
        yield router, oracle_engine, names
    finally:
        router.close()
        with oracle_engine.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS shapes_oracle"))
        oracle_engine.dispose()


@pytest.fixture
def world(_env: tuple[Router, Engine, dict[str, Any]]) -> World:
    router, oracle_engine, names = _env
    for engine in router.engines.primaries.values():
        _truncate(engine, names)
    _truncate(oracle_engine, {t: (t,) for t in DDL})
    return World(router, oracle_engine)


def _spread(world: World) -> tuple[list[int], list[int]]:
    users = world.users_on_distinct_shards(4)
    orders = []
    for i, u in enumerate(users):
        orders.append(world.add_order(u, 7, "new", 100 + i, items=2))
        orders.append(world.add_order(u, 8, "paid", 200 + i, items=1))
    return users, orders


# -- defect 21: locking reads on MariaDB 10.11 ------------------------------------------------


@pytest.mark.parametrize(
    "clause",
    [
        "LOCK IN SHARE MODE",
        "FOR SHARE",
        "FOR UPDATE",
        "FOR UPDATE NOWAIT",
        "FOR UPDATE SKIP LOCKED",
        "LOCK IN SHARE MODE NOWAIT",
        "FOR UPDATE WAIT 1",
    ],
)
def test_locking_reads_run_on_mariadb(world: World, clause: str) -> None:
    users, _ = _spread(world)
    sql = f"SELECT order_id, status FROM orders WHERE user_id = :u ORDER BY order_id {clause}"
    with world.router.transaction() as tx:
        got = tx.execute(sql, {"u": users[1]}).rows
    # FOR SHARE is MySQL 8's spelling, which MariaDB refuses: the router renders it as LOCK IN
    # SHARE MODE, so the oracle gets that spelling.
    oracle_sql = sql.replace("FOR SHARE", "LOCK IN SHARE MODE")
    assert _norm(got) == _norm(world.oracle_rows(oracle_sql, {"u": users[1]}))
    assert len(got) == 2


def test_locking_read_across_shards_is_refused(world: World) -> None:
    _spread(world)
    with pytest.raises(UnsupportedQueryError, match="locking read"):
        world.router.execute("SELECT order_id FROM orders WHERE status = 'new' FOR UPDATE")


# -- defect 13: order_items by order_id ------------------------------------------------------


def test_order_items_by_order_id_goes_to_one_shard(world: World) -> None:
    _, orders = _spread(world)
    sql = "SELECT order_id, line, sku FROM order_items WHERE order_id = :o"
    for order_id in orders:
        result = world.router.execute(sql, {"o": order_id})
        assert len(result.shards) == 1 and not result.scatter
        assert _norm(result.rows) == _norm(world.oracle_rows(sql, {"o": order_id}))


def test_readme_transaction_example_writes_items_by_order_id(world: World) -> None:
    _, orders = _spread(world)
    order_id = orders[2]
    params = {"o": order_id}
    with world.router.transaction() as tx:
        tx.execute("UPDATE orders SET status = 'paid' WHERE order_id = :o", params)
        tx.execute("UPDATE order_items SET qty = 2 WHERE order_id = :o AND line = 0", params)
    with world.oracle.begin() as conn:
        conn.execute(text("UPDATE orders SET status = 'paid' WHERE order_id = :o"), params)
        conn.execute(
            text("UPDATE order_items SET qty = 2 WHERE order_id = :o AND line = 0"), params
        )
    world.same_tables()
    world.both("DELETE FROM order_items WHERE order_id = :o", {"o": orders[3]})
    world.same_tables()


# -- defect 7: UPDATE / DELETE with joins --------------------------------------------------


def test_colocated_update_join_equals_the_oracle(world: World) -> None:
    users, _ = _spread(world)
    sql = (
        "UPDATE orders o JOIN order_items i ON o.order_id = i.order_id"
        " SET o.amount_cents = o.amount_cents + 1, i.qty = i.qty + 5"
        " WHERE o.user_id = :u AND i.line = 0"
    )
    world.both(sql, {"u": users[0]})
    world.same_tables()
    sql = (
        "DELETE i FROM order_items i JOIN orders o ON o.order_id = i.order_id"
        " WHERE o.user_id = :u AND o.status = 'paid'"
    )
    world.both(sql, {"u": users[2]})
    world.same_tables()


@pytest.mark.parametrize(
    "sql",
    [
        # matches items of other users' orders (status = sku): rows on other shards
        "UPDATE orders o JOIN order_items i ON o.status = i.sku SET o.amount_cents = 0"
        " WHERE o.user_id = :u",
        "DELETE i FROM order_items i JOIN orders o ON o.status = i.sku WHERE i.user_id = :u",
        "UPDATE orders o JOIN order_items i ON o.user_id = i.user_id OR o.status = i.sku"
        " SET o.amount_cents = 0 WHERE o.user_id = :u",
        "DELETE orders FROM order_items JOIN orders ON orders.order_id = order_items.order_id"
        " WHERE orders.user_id = :u",
    ],
)
def test_cross_shard_write_joins_are_refused_and_change_nothing(world: World, sql: str) -> None:
    users, _ = _spread(world)
    with pytest.raises(UnsupportedQueryError):
        world.router.execute(sql, {"u": users[0]})
    world.same_tables()


# -- defect 8: joins under OR / NOT / self-equality --------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT o.order_id, i.line FROM orders o JOIN order_items i"
        " ON o.order_id = i.order_id OR i.sku = o.status",
        "SELECT o.order_id, i.line FROM orders o JOIN order_items i"
        " ON NOT (o.order_id <> i.order_id AND i.sku <> o.status)",
        "SELECT o.order_id, i.line FROM orders o JOIN order_items i"
        " ON o.user_id = o.user_id AND i.sku = o.status",
    ],
)
def test_joins_that_meet_across_shards_are_refused(world: World, sql: str) -> None:
    _spread(world)
    # The oracle's answer includes pairs from different shards: a shard-local join loses them.
    want = world.oracle_rows(sql)
    shards = {
        (
            world.topology.shard_for("orders", o, "order_id"),
            world.topology.shard_for("orders", i, "order_id"),
        )
        for o, i in world.oracle_rows(
            sql.replace("SELECT o.order_id, i.line", "SELECT o.order_id, i.order_id")
        )
    }
    assert want and any(a != b for a, b in shards)
    with pytest.raises(UnsupportedQueryError, match="join"):
        world.router.execute(sql)


def test_colocated_join_equals_the_oracle(world: World) -> None:
    _spread(world)
    sql = (
        "SELECT o.order_id, i.line, i.sku FROM orders o JOIN order_items i"
        " ON i.order_id = o.order_id AND (i.line > 0 OR i.sku = 'new')"
    )
    assert _norm(world.router.execute(sql).rows) == _norm(world.oracle_rows(sql))


# -- defect 6: subqueries in INSERT --------------------------------------------------------


def test_insert_with_a_subquery_is_refused_and_writes_nothing(world: World) -> None:
    users, orders = _spread(world)
    # One database counts every order's items; a shard would count only its own.
    sql = (
        "INSERT INTO order_items (order_id, line, user_id, sku) VALUES"
        " (:o, (SELECT COUNT(*) FROM order_items), :u, 'extra')"
    )
    with pytest.raises(UnsupportedQueryError, match="subquery"):
        world.router.execute(sql, {"o": orders[0], "u": users[0]})
    world.same_tables()


# -- defect 9: executable comments ---------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id FROM orders WHERE user_id = :u /*! AND status = 'paid' */",
        "SELECT order_id FROM orders WHERE user_id = :u /*M! AND status = 'paid' */",
        "SELECT order_id FROM orders WHERE user_id = :u /*!50100 AND status = 'paid' */",
    ],
)
def test_executable_comments_are_refused(world: World, sql: str) -> None:
    users, _ = _spread(world)
    # MariaDB runs the comment's contents: the oracle sees the filter.
    assert len(world.oracle_rows(sql, {"u": users[0]})) == 1
    with pytest.raises(UnsupportedQueryError, match="executable comment"):
        world.router.execute(sql, {"u": users[0]})


# -- section 2: what runs on one target only ------------------------------------------------


def test_session_functions_run_on_one_target_and_are_refused_across(world: World) -> None:
    users, _ = _spread(world)
    one = world.router.execute(
        "SELECT order_id, VERSION() FROM orders WHERE user_id = :u", {"u": users[0]}
    )
    assert len(one.rows) == 2 and all(r[1] for r in one.rows)
    for sql in (
        "SELECT order_id, VERSION() FROM orders",
        "SELECT order_id FROM orders ORDER BY RAND() LIMIT 2",
    ):
        with pytest.raises(UnsupportedQueryError, match="across shards"):
            world.router.execute(sql)


def test_nondeterministic_broadcast_insert_is_refused(world: World) -> None:
    with pytest.raises(UnsupportedQueryError, match="broadcast"):
        world.router.execute("INSERT INTO countries (code, name) VALUES ('zz', UUID())")
    for engine in world.router.engines.primaries.values():
        with engine.connect() as conn:
            assert conn.execute(text("SELECT COUNT(*) FROM countries")).scalar() == 0
