"""Review findings: statements the routers run wrongly (or should refuse), each checked against
one unsharded MariaDB (the oracle) holding the same rows. Every test is a known bug, marked
``xfail(strict=True)``: when a fix lands the test passes, xfail turns it red, remove the mark.

Contract used throughout (DESIGN.md invariant 2 and "refused, never run on a guess"): a
statement either returns what the oracle returns, or the router refuses it with an error
naming the construct (UnsupportedQueryError / RoutingError / KeyValueError).
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import (
    CrossShardTransactionError,
    ExecutionError,
    KeyValueError,
    RoutingError,
    UnsupportedQueryError,
)

pytestmark = pytest.mark.mariadb

REFUSED = (UnsupportedQueryError, RoutingError, KeyValueError)

DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'new',"
    " amount_cents BIGINT NULL, KEY (user_id))",
    "order_items": "CREATE TABLE {t} (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, PRIMARY KEY (order_id, line))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
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


class World:
    def __init__(self, router: Router, oracle: Engine) -> None:
        self.router = router
        self.oracle = oracle
        self.topology = router.topology
        self.ids = router.topology.id_generator("orders")

    def users_on_distinct_shards(self, n: int = 2, start: int = 1000) -> list[int]:
        """n user ids whose orders live on n different shards."""
        found: dict[str, int] = {}
        u = start
        while len(found) < n:
            found.setdefault(self.topology.shard_for("orders", u), u)
            u += 1
        return list(found.values())

    def add_order(
        self, user: int, merchant: int, status: str = "new", amount: int | None = 100
    ) -> int:
        order_id = self.ids.next_id(user_id=user)
        row = {"o": order_id, "u": user, "m": merchant, "s": status, "a": amount}
        sql = (
            "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
            " VALUES (:o, :u, :m, :s, :a)"
        )
        self.router.execute(sql, row)
        with self.oracle.begin() as conn:
            conn.execute(text(sql), row)
            conn.execute(
                text("INSERT INTO merchant_orders VALUES (:m, :o, :u)"),
                row,
            )
        return order_id

    def oracle_rows(self, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self.oracle.connect() as conn:
            return [tuple(r) for r in conn.execute(text(sql), params or {})]

    def agree(
        self,
        sql: str,
        params: dict[str, Any] | None = None,
        ordered: bool = True,
        collated: bool = False,
    ) -> None:
        """The router refuses ``sql`` or returns exactly the oracle's rows (with ``collated``:
        equal under the column's case-insensitive collation, where SQL may return either of
        two equal strings, 'a' or 'A')."""
        try:
            got = self.router.execute(sql, params or {}).rows
        except REFUSED:
            return
        want = self.oracle_rows(sql, params)
        if collated:
            got, want = _lower(got), _lower(want)
        if ordered:
            assert _norm(got) == _norm(want), sql
        else:
            assert Counter(_norm(got)) == Counter(_norm(want)), sql


def _lower(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(v.lower() if isinstance(v, str) else v for v in r) for r in rows]


def _norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows]


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
        conn.execute(text("DROP DATABASE IF EXISTS review_oracle"))
        conn.execute(text("CREATE DATABASE review_oracle"))
    admin.dispose()
    oracle_engine = create_engine(server.set(database="review_oracle"))
    _create(oracle_engine, {t: (t,) for t in DDL})
    try:
        yield router, oracle_engine, names
    finally:
        router.close()
        with oracle_engine.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS review_oracle"))
        oracle_engine.dispose()


@pytest.fixture
def world(_env: tuple[Router, Engine, dict[str, Any]]) -> World:
    router, oracle_engine, names = _env
    for engine in router.engines.primaries.values():
        _truncate(engine, names)
    _truncate(oracle_engine, {t: (t,) for t in DDL})
    return World(router, oracle_engine)


def _spread(world: World, n_users: int = 4) -> list[int]:
    """Orders of users on every shard, with a repeated amount across shards."""
    users = world.users_on_distinct_shards(n_users)
    for i, u in enumerate(users):
        world.add_order(u, merchant=7, status="new", amount=100)
        world.add_order(u, merchant=8, status="paid", amount=200 + i)
    return users


# -- 1. aggregates the merge does not know are passed through as plain columns ----------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders",
        "SELECT STDDEV_POP(amount_cents) FROM orders",
        "SELECT BIT_OR(amount_cents) FROM orders",
    ],
)
def test_unknown_aggregate_is_refused_or_merged(world: World, sql: str) -> None:
    _spread(world)
    world.agree(sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT SUM(DISTINCT amount_cents) FROM orders",
        "SELECT AVG(DISTINCT amount_cents) FROM orders",
    ],
)
def test_sum_distinct_across_shards(world: World, sql: str) -> None:
    _spread(world)  # amount 100 is on every shard: counted once by the oracle
    world.agree(sql)


def test_window_function_across_shards(world: World) -> None:
    _spread(world)
    world.agree(
        "SELECT order_id, ROW_NUMBER() OVER (ORDER BY order_id) AS rn FROM orders ORDER BY order_id"
    )


def test_having_aggregate_without_group(world: World) -> None:
    _spread(world)
    sql = "SELECT status FROM orders HAVING MAX(amount_cents) > 5"
    try:
        got = world.router.execute(sql).rows
    except REFUSED:
        return
    assert len(got) == len(world.oracle_rows(sql)) == 1  # implicit grouping: one row


# -- 2. joins the bound-group check lets through -----------------------------------------------


def test_self_join_on_non_key_column(world: World) -> None:
    users = _spread(world)
    world.agree(
        "SELECT a.order_id, b.order_id FROM orders a JOIN orders b"
        " ON a.merchant_id = b.merchant_id AND a.order_id <> b.order_id"
        " WHERE a.user_id = :u",
        {"u": users[0]},
        ordered=False,
    )


def test_broadcast_left_join_sharded(world: World) -> None:
    _spread(world)
    rows = {"c": "DE", "n": "Germany"}
    world.router.execute("INSERT INTO countries (code, name) VALUES (:c, :n)", rows)
    with world.oracle.begin() as conn:
        conn.execute(text("INSERT INTO countries (code, name) VALUES (:c, :n)"), rows)
    world.agree(
        "SELECT c.code, o.order_id FROM countries c LEFT JOIN orders o ON o.status = c.code",
        ordered=False,
    )


# -- 3. ORDER BY / MIN / MAX / GROUP BY on strings: Python order, not the collation ------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT MIN(status), MAX(status) FROM orders",
        "SELECT status FROM orders ORDER BY status, order_id",
        "SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY COUNT(*), status",
    ],
)
def test_string_order_follows_collation(world: World, sql: str) -> None:
    a, b = world.users_on_distinct_shards(2)
    world.add_order(a, 1, status="a")
    world.add_order(b, 1, status="B")
    world.add_order(b, 1, status="A")
    world.agree(sql, collated=True)
    if "ORDER BY status, order_id" in sql:  # a total order: the exact values must agree too
        world.agree(sql)


def test_email_lookup_is_case_insensitive_like_the_column(world: World) -> None:
    world.router.execute(
        "INSERT INTO users (user_id, email) VALUES (:u, :e)", {"u": 5, "e": "Ada@Example.com"}
    )
    with world.oracle.begin() as conn:
        conn.execute(text("INSERT INTO users VALUES (5, 'Ada@Example.com')"))
    world.agree("SELECT user_id FROM users WHERE email = :e", {"e": "ada@example.com"})
    # ... and the same address in another case is taken, not a second owner.
    with pytest.raises(ExecutionError, match="already belongs"):
        world.router.execute(
            "INSERT INTO users (user_id, email) VALUES (:u, :e)", {"u": 6, "e": "ADA@example.com "}
        )


def test_order_by_alias_shadowing_a_column(world: World) -> None:
    _spread(world)
    world.agree(
        "SELECT user_id AS amount_cents, amount_cents AS user_id FROM orders"
        " ORDER BY user_id, amount_cents"  # both aliases: a total order on (col 1, col 0)
    )


# -- 4. writes: too many rows, lost lookups, half-applied, wrong shard -------------------------


def test_delete_limit_over_in_list_deletes_at_most_limit(world: World) -> None:
    a, b = world.users_on_distinct_shards(2)
    world.add_order(a, 1)
    world.add_order(b, 1)
    try:
        res = world.router.execute(
            "DELETE FROM orders WHERE user_id IN (:a, :b) LIMIT 1", {"a": a, "b": b}
        )
    except REFUSED:
        return
    assert res.rowcount == 1


def test_delete_limit_keeps_lookup_rows_of_surviving_orders(world: World) -> None:
    (u,) = world.users_on_distinct_shards(1)
    world.add_order(u, merchant=42)
    world.add_order(u, merchant=42)
    try:
        res = world.router.execute("DELETE FROM orders WHERE user_id = :u LIMIT 1", {"u": u})
    except REFUSED:
        return
    assert res.rowcount == 1
    survivors = world.router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": u})
    via_lookup = world.router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 42}
    )
    assert via_lookup.scalars() == survivors.scalars()  # the survivor is still found by merchant


def test_update_of_sharding_column_in_upper_case_is_refused(world: World) -> None:
    (u,) = world.users_on_distinct_shards(1)
    order_id = world.add_order(u, 1)
    other = next(
        x
        for x in range(1, 10_000)
        if world.topology.shard_for("orders", x) != world.topology.shard_for("orders", u)
    )
    with pytest.raises(UnsupportedQueryError):
        world.router.execute(
            "UPDATE orders SET USER_ID = :v WHERE order_id = :o", {"v": other, "o": order_id}
        )


def test_insert_with_upper_case_lookup_column_writes_lookup_row(world: World) -> None:
    (u,) = world.users_on_distinct_shards(1)
    order_id = world.ids.next_id(user_id=u)
    world.router.execute(
        "INSERT INTO orders (order_id, user_id, MERCHANT_ID) VALUES (:o, :u, :m)",
        {"o": order_id, "u": u, "m": 77},
    )
    found = world.router.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 77})
    assert found.scalars() == [order_id]


def test_multi_row_insert_is_all_or_nothing(world: World) -> None:
    a, b = world.users_on_distinct_shards(2)
    taken = world.add_order(b, 1)
    fresh = world.ids.next_id(user_id=a)
    with pytest.raises(Exception):  # noqa: B017 - duplicate key on b's shard
        world.router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o1, :a, 1), (:o2, :b, 1)",
            {"o1": fresh, "a": a, "o2": taken, "b": b},
        )
    left = world.router.execute("SELECT COUNT(*) FROM orders WHERE user_id = :a", {"a": a})
    assert left.scalar() == 0  # a single database inserts neither row


# -- 5. transactions and lookup maintenance -----------------------------------------------------


def test_broadcast_read_inside_a_transaction_does_not_bind_it(world: World) -> None:
    users = world.users_on_distinct_shards(4)
    first = next(iter(world.topology.shards))
    user = next(u for u in users if world.topology.shard_for("orders", u) != first)
    with world.router.transaction() as txn:
        txn.execute("SELECT name FROM countries WHERE code = 'DE'")
        try:
            txn.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, 1)",
                {"o": world.ids.next_id(user_id=user), "u": user},
            )
        except CrossShardTransactionError:
            pytest.fail("broadcast read pinned the transaction to the first shard")


def test_check_lookups_fix_spares_inserts_in_open_transactions(world: World) -> None:
    from shardrouter.ops.lookups import check_lookups

    (u,) = world.users_on_distinct_shards(1)
    order_id = world.ids.next_id(user_id=u)
    with world.router.transaction() as txn:
        txn.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id) VALUES (:o, :u, :m)",
            {"o": order_id, "u": u, "m": 91},
        )
        check_lookups(world.router, fix=True, grace_s=0.05)  # the transaction runs longer
    found = world.router.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 91})
    assert found.scalars() == [order_id]


# -- 6. lookups of writes (and uniqueness checks) are read from replicas ------------------------


@pytest.fixture
def lagging_router(world: World, shard_databases: Path) -> Iterator[Router]:
    """A router whose every shard has a replica that lags: an empty copy of the schema."""
    raw = yaml.safe_load(shard_databases.read_text())
    names = {t: world.topology.table(t).physical_names for t in DDL}
    created = []
    for shard in raw["shards"].values():
        url = make_url(shard["primary"])
        lag_db = f"{url.database}_lag"
        server = create_engine(url.set(database=""))
        with server.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{lag_db}`"))
            conn.execute(text(f"CREATE DATABASE `{lag_db}`"))
        server.dispose()
        lag = url.set(database=lag_db)
        engine = create_engine(lag)
        _create(engine, names)
        engine.dispose()
        created.append(lag)
        shard["replicas"] = [lag.render_as_string(hide_password=False)]
    path = shard_databases.with_name(shard_databases.stem + "-lag.yaml")
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))
    router = Router(Topology.load(path), max_fanout=None)
    try:
        yield router
    finally:
        router.close()
        for lag in created:
            server = create_engine(lag.set(database=""))
            with server.begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{lag.database}`"))
            server.dispose()


def test_write_routed_by_lookup_reads_the_primary(world: World, lagging_router: Router) -> None:
    (u,) = world.users_on_distinct_shards(1)
    world.add_order(u, merchant=55)
    res = lagging_router.execute("DELETE FROM orders WHERE merchant_id = :m", {"m": 55})
    assert res.rowcount == 1


def test_unique_lookup_check_reads_the_primary(world: World, lagging_router: Router) -> None:
    sql = "INSERT INTO users (user_id, email) VALUES (:u, :e)"
    lagging_router.execute(sql, {"u": 1, "e": "grace@example.com"})
    with pytest.raises(Exception, match="already belongs"):
        lagging_router.execute(sql, {"u": 2, "e": "grace@example.com"})


# -- 7. XA: an error after the commit decision is reported as a failed transaction -------------


def test_xa_error_after_decision_does_not_report_a_committed_transaction(
    world: World, shard_databases: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sqlalchemy.exc import OperationalError

    from shardrouter.engine import xa
    from shardrouter.errors import ExecutionError

    def lost_coordinator(coordinator: Any, gtrid: str) -> None:
        raise OperationalError("DELETE FROM shardrouter_xa_decisions", {}, Exception(2013, "lost"))

    a, b = world.users_on_distinct_shards(2)
    router = Router(Topology.load(shard_databases), xa=True)
    monkeypatch.setattr(xa, "forget_decision", lost_coordinator)
    sql = "INSERT INTO order_items (order_id, line, user_id, sku) VALUES (:o, 1, :u, 'x')"
    try:
        with router.transaction() as txn:
            for u in (a, b):
                txn.execute(sql, {"o": world.ids.next_id(user_id=u), "u": u})
    except ExecutionError:
        # An error must mean "not committed": the caller will retry and write twice otherwise.
        n = world.router.execute(
            "SELECT COUNT(*) FROM order_items WHERE user_id IN (:a, :b)", {"a": a, "b": b}
        ).scalar()
        assert n == 0, "the transaction raised, yet both branches are committed"
    else:
        n = world.router.execute(
            "SELECT COUNT(*) FROM order_items WHERE user_id IN (:a, :b)", {"a": a, "b": b}
        ).scalar()
        assert n == 2, "reported committed, so both branches must be"
    finally:
        monkeypatch.undo()
        router.recover_xa()
        router.close()
