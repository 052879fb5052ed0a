"""Issue 7 round 2, planner and merge defects the differential fuzzer found (fuzz findings A2,
A4, A5, A7's environment functions, A8, A11, A12), on 4 MariaDB shards against one MariaDB
holding every row (the oracle): each statement gives the oracle's labels and rows through the
sync and the async router, or is refused with a typed error before anything runs."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    text,
)
from sqlalchemy.engine import make_url

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError, UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(600)]

USER_8 = 8  # a user id the hex literal 0x8 names


def schema(names: dict[str, tuple[str, ...]]) -> MetaData:
    md = MetaData()
    for name in names["users"]:
        Table(
            name,
            md,
            Column("user_id", BigInteger, primary_key=True, autoincrement=False),
            Column("email", String(255), nullable=False),
            Column("created_at", DateTime, nullable=False),
        )
    for name in names["orders"]:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
            Column("merchant_id", BigInteger, nullable=False),
            Column("status", String(16), nullable=False),
            Column("amount_cents", BigInteger, nullable=True),
        )
    for name in names["order_items"]:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("line", Integer, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
            Column("sku", String(64), nullable=False),
            Column("price_cents", BigInteger, nullable=False),
        )
    for name in names["user_emails"]:
        Table(
            name,
            md,
            Column("email", String(255), primary_key=True),
            Column("user_id", BigInteger, nullable=False),
        )
    for name in names["countries"]:
        Table(name, md, Column("code", String(2), primary_key=True), Column("name", String(64)))
    return md


def generate(topology: Topology) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(2026_11_30)
    ids = topology.id_generator("orders")
    users, orders, items, emails = [], [], [], []
    for user_id in [USER_8, 1, 2, 3, *rng.sample(range(10, 10**9), 40)]:
        email = f"u{user_id}_{rng.choice('aAbB_[')}@example.com"
        created = dt.datetime(2026, 1, 1) + dt.timedelta(days=rng.randrange(30))
        users.append({"user_id": user_id, "email": email, "created_at": created})
        emails.append({"email": email, "user_id": user_id})
        for order_id in ids.next_ids(rng.randint(1, 3), user_id=user_id):
            orders.append(
                {
                    "order_id": order_id,
                    "user_id": user_id,
                    "merchant_id": rng.randrange(4),
                    "status": rng.choice(["new", "paid", "shipped"]),
                    "amount_cents": None if rng.random() < 0.1 else rng.randrange(1, 10**6),
                }
            )
            for line in range(rng.randint(1, 3)):
                items.append(
                    {
                        "order_id": order_id,
                        "line": line,
                        "user_id": user_id,
                        "sku": f"sku{rng.randrange(9)}",
                        # Prices whose thirds round: SUM(price / 3) partials rounded per shard
                        # differ from one database's sum.
                        "price_cents": rng.randrange(1, 10**7),
                    }
                )
    countries = [{"code": "US", "name": "United States"}, {"code": "FR", "name": "France"}]
    return {
        "users": users,
        "orders": orders,
        "order_items": items,
        "user_emails": emails,
        "countries": countries,
    }


def _place(topology: Topology, table: str, key: Any) -> tuple[str, str]:
    slot = topology.slot_for(table, key)
    return topology.shard_of_slot(slot), topology.table(table).physical(slot)


@pytest.fixture(scope="module")
def world(shard_databases, oracle) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    topology = Topology.load(shard_databases)
    names = {
        t: topology.table(t).physical_names
        for t in ("users", "orders", "order_items", "user_emails", "countries")
    }
    server = make_url(oracle.shards[0].url)
    admin = create_engine(server.set(database="").render_as_string(hide_password=False))
    with admin.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS issue7_r2"))
        conn.execute(text("CREATE DATABASE issue7_r2"))
    oracle_engine = create_engine(
        server.set(database="issue7_r2").render_as_string(hide_password=False)
    )
    router = Router(topology, max_offset=5000)
    md = schema(names)
    for engine in router.engines.primaries.values():
        md.drop_all(engine)
        md.create_all(engine)
    omd = schema({t: (t,) for t in names})
    omd.create_all(oracle_engine)
    data = generate(topology)
    with oracle_engine.begin() as conn:
        for table, rows in data.items():
            conn.execute(omd.tables[table].insert(), rows)
    # Straight into the physical tables: the statements under test are reads.
    placed: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for table, rows in data.items():
        for row in rows:
            if table == "countries":
                for shard in topology.shards:
                    placed.setdefault((shard, names[table][0]), []).append(row)
                continue
            key = row["email"] if table == "user_emails" else row["user_id"]
            owner = "orders" if table == "order_items" else table
            shard, physical = _place(topology, owner, key)
            if table == "order_items":
                physical = topology.table("order_items").physical(topology.slot_for("orders", key))
            placed.setdefault((shard, physical), []).append(row)
    for (shard, physical), rows in placed.items():
        with router.engines.primaries[shard].begin() as conn:
            conn.execute(md.tables[physical].insert(), rows)
    aio = AsyncRouter(topology, max_offset=5000)
    loop = asyncio.new_event_loop()
    try:
        yield {
            "router": router,
            "aio": aio,
            "loop": loop,
            "oracle": oracle_engine,
            "data": data,
            "names": names,
        }
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        for engine in router.engines.primaries.values():
            md.drop_all(engine)
        router.close()
        oracle_engine.dispose()
        with admin.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS issue7_r2"))
        admin.dispose()


def _norm(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return [tuple(float(v) if isinstance(v, float) else v for v in r) for r in rows]


def _oracle(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> Any:
    with world["oracle"].connect() as conn:
        result = conn.execute(text(sql), params or {})
        return tuple(result.keys()), [tuple(r) for r in result]


def check(
    world: dict[str, Any], sql: str, params: dict[str, Any] | None = None, *, ordered: bool = True
) -> list[tuple[Any, ...]]:
    """``sql`` through both routers equals the oracle: the same labels (the cursor
    description's names) and the same rows (in order when ``ordered``)."""
    params = params or {}
    labels, expected = _oracle(world, sql, params)
    answers = [
        world["router"].execute(sql, params),
        world["loop"].run_until_complete(world["aio"].execute(sql, params)),
    ]
    for answer in answers:
        assert answer.columns == labels, sql
        if ordered:
            assert _norm(answer.rows) == _norm(expected), sql
        else:
            assert Counter(_norm(answer.rows)) == Counter(_norm(expected)), sql
    return expected


def refused(world: dict[str, Any], sql: str, *named: str, params: Any = None) -> None:
    for run in (
        lambda: world["router"].execute(sql, params or {}),
        lambda: world["loop"].run_until_complete(world["aio"].execute(sql, params or {})),
    ):
        with pytest.raises(UnsupportedQueryError) as info:
            run()
        for name in named:
            assert name.lower() in str(info.value).lower(), (sql, str(info.value))


def _user_with_orders(world: dict[str, Any]) -> int:
    counts = Counter(o["user_id"] for o in world["data"]["orders"])
    return max(counts, key=lambda u: (counts[u], u))


# -- A2: ORDER BY / GROUP BY a constant that is not a position ----------------------------------


def test_order_by_a_decimal_constant_answers(world: dict[str, Any]) -> None:
    check(
        world,
        "SELECT DISTINCT 2.50 AS ka0, user_id FROM orders ORDER BY user_id DESC, 2.50 DESC LIMIT 3",
    )
    for constant in ("2.50", "'1'", "0x2", "1e0", "NULL"):
        check(world, f"SELECT order_id, status FROM orders ORDER BY {constant}, order_id LIMIT 7")
        check(world, f"SELECT COUNT(*) AS n FROM orders GROUP BY {constant}")
    # (2) and 02 are positions, like 2.
    check(world, "SELECT status, order_id FROM orders ORDER BY (2) DESC LIMIT 5")
    check(world, "SELECT status, order_id FROM orders ORDER BY 02 LIMIT 5")
    check(world, "SELECT status, COUNT(*) FROM orders GROUP BY (1) ORDER BY 2, 1", ordered=False)


def test_order_by_zero_or_negative_is_refused(world: dict[str, Any]) -> None:
    for term in ("-1", "0", "(-1)"):
        for clause in ("ORDER BY", "GROUP BY"):
            # One database refuses it (1054 Unknown column '-1'); so does the router, typed.
            with pytest.raises(Exception) as oracle_error:
                _oracle(world, f"SELECT status FROM orders {clause} {term}")
            assert "1054" in str(oracle_error.value)
            with pytest.raises(ShardRouterError):
                world["router"].execute(f"SELECT status FROM orders {clause} {term}")
            with pytest.raises(ShardRouterError):
                world["router"].execute(
                    f"SELECT status FROM orders WHERE user_id = :u {clause} {term}", {"u": 1}
                )


# -- A4: labels of unaliased items are their text as written -----------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count( * ) FROM orders",
        "SELECT  count(*)  , MAX(amount_cents)+1, amount_cents  +  1 FROM orders WHERE"
        " user_id = :u GROUP BY amount_cents ORDER BY 3",
        "SELECT u.created_at + INTERVAL 1 DAY, u.created_at, COUNT(u.created_at) FROM users AS u"
        " GROUP BY u.created_at + INTERVAL 1 DAY, u.created_at ORDER BY 2",
        "SELECT GROUP_CONCAT(DISTINCT sku ORDER BY sku) FROM order_items WHERE user_id = :u",
        "SELECT /* lead */ amount_cents  +  1 /* trail */ , amount_cents /* mid */ - 1 -- end\n"
        " FROM orders WHERE user_id = :u ORDER BY 1",
        "SELECT `amount_cents`+1, -1, - 1, (amount_cents), ((status)), 0x41, 'it''s',"
        " 1.50, NULL, TRUE, UPPER(status), LOWER( status ) FROM orders ORDER BY order_id",
        "SELECT AVG( amount_cents ), SUM(amount_cents) FROM orders",
        "SELECT AVG(amount_cents) AS `my avg`, AVG(amount_cents) `x``y` FROM orders",
        "SELECT status, AVG(amount_cents), MIN(amount_cents)  FROM orders GROUP BY status"
        " ORDER BY status, 2",
        "SELECT DISTINCT UPPER(status) FROM orders ORDER BY 1",
        "SELECT CONCAT(email, 'x' ), DATE_FORMAT(created_at, '%H:%i') FROM users u"
        " ORDER BY u.user_id",
        # Characters beyond the BMP: MariaDB labels them '?' and refuses them in an alias.
        "SELECT CONCAT(status, '😀'), COUNT(*) FROM orders GROUP BY 1 ORDER BY 1",
        "SELECT CONCAT(status, '🦄x') FROM orders WHERE user_id = :u ORDER BY order_id",
        "SELECT '😀', COUNT(*), SUM(amount_cents) + 1 FROM orders",
        "SELECT CONCAT('😀', status) AS `ok é` FROM orders ORDER BY order_id",
    ],
)
def test_labels_are_the_items_as_written(world: dict[str, Any], sql: str) -> None:
    check(world, sql, {"u": _user_with_orders(world)} if ":u" in sql else None)


def test_long_labels_are_cut_as_mariadb_cuts_them(world: dict[str, Any]) -> None:
    # 300+ characters, 2 bytes each for é: MariaDB cuts a label (and an alias) to 255 bytes.
    long = "CONCAT(" + ", ".join(["'é'"] * 80) + ", status)"
    check(world, f"SELECT {long} FROM orders ORDER BY order_id")
    check(world, f"SELECT {long} FROM orders WHERE user_id = :u", {"u": 1})


# -- A11: hex literals keep their meaning --------------------------------------------------------


def test_hex_literals_reach_the_shards_as_written(world: dict[str, Any]) -> None:
    check(world, "SELECT order_id FROM orders WHERE user_id = 0x8 ORDER BY order_id")
    check(world, "SELECT order_id FROM orders WHERE user_id = 0x08 AND merchant_id >= 0x0")
    check(
        world,
        "SELECT order_id, 0x41 AS h, 0x8 + 0 AS n FROM orders WHERE user_id = :u ORDER BY order_id",
        {"u": USER_8},
    )
    check(world, "SELECT user_id FROM users WHERE email LIKE CONCAT(0x75, '%') ORDER BY user_id")
    # A hex key value in an INSERT does not route: refused, typed.
    refused(
        world,
        "INSERT INTO orders (order_id, user_id, merchant_id, status) VALUES (1, 0x8, 1, 'x')",
        "user_id",
    )


@pytest.mark.parametrize(
    "literal",
    [
        "0",
        "02",
        "-7",
        "1.50",
        "-0.000",
        ".5",
        "1e3",
        "1.5E-3",
        "9223372036854775807",
        "18446744073709551615",
        "123456789012345678901234567890.123",
        "'plain'",
        "'it''s'",
        "'a\\'b'",
        "'tab\\there'",
        "'back\\\\slash'",
        "'percent\\%'",
        "'under\\_'",
        "'nl\\n'",
        '"double"',
        "'émile'",
        "''",
        "0x8",
        "0x41",
        "NULL",
        "TRUE",
        "FALSE",
        "DATE '2026-01-02'",
        "TIMESTAMP '2026-01-02 03:04:05'",
        "INTERVAL 1 DAY + DATE '2026-01-02'",
    ],
)
def test_every_accepted_literal_kind_round_trips(world: dict[str, Any], literal: str) -> None:
    # Through the planner's render (countries is broadcast: one shard answers) and the oracle:
    # the same value and type; CONCAT('', x) also compares its string form.
    check(
        world, f"SELECT {literal} AS v, CONCAT('', {literal}) AS s FROM countries WHERE code = 'US'"
    )
    check(world, f"SELECT {literal} AS v FROM orders WHERE user_id = :u LIMIT 1", {"u": USER_8})


# -- A12: SUM/AVG of a quotient across shards ---------------------------------------------------


def test_sum_and_avg_of_a_quotient_are_refused_across_shards(world: dict[str, Any]) -> None:
    sql = "SELECT AVG(price_cents / 3), SUM(price_cents / 3) FROM order_items"
    refused(world, sql, "price_cents / 3", "SUM the numerator")
    refused(world, "SELECT sku, SUM(1e0 * price_cents) FROM order_items GROUP BY sku", "DOUBLE")
    refused(world, "SELECT SUM(SQRT(price_cents)) FROM order_items", "DOUBLE")
    # On one target one database's arithmetic runs: the oracle's answer.
    user = _user_with_orders(world)
    check(world, sql + " WHERE user_id = :u", {"u": user})
    # Exact shapes still merge: DECIMAL scales add up, DIV is an integer.
    check(world, "SELECT SUM(price_cents * 1.5), AVG(price_cents * 1.5) FROM order_items")
    check(
        world,
        "SELECT sku, SUM(price_cents DIV 3), AVG(price_cents) FROM order_items"
        " GROUP BY sku ORDER BY sku",
    )
    # The way out the message names: SUM the numerator, divide after.
    _, [(total, count)] = _oracle(
        world, "SELECT SUM(price_cents), COUNT(price_cents) FROM order_items"
    )
    got = world["router"].execute("SELECT SUM(price_cents), COUNT(price_cents) FROM order_items")
    assert got.rows == [(total, count)]


# -- A7: environment functions name the shard -----------------------------------------------------


@pytest.mark.parametrize(
    "expr",
    [
        "DATABASE()",
        "SCHEMA()",
        "USER()",
        "CURRENT_USER()",
        "CURRENT_USER",
        "SESSION_USER()",
        "SYSTEM_USER()",
        "@@hostname",
        "@@port",
        "@@global.server_id",
    ],
)
def test_environment_functions_are_refused_even_on_one_target(
    world: dict[str, Any], expr: str
) -> None:
    refused(world, f"SELECT {expr} AS d FROM orders WHERE user_id = 8", "shard's own identity")
    refused(world, f"SELECT order_id FROM orders WHERE user_id = 8 AND {expr} IS NOT NULL")


# -- A8: broadcast writes with non-deterministic functions ------------------------------------------


def _copies(world: dict[str, Any]) -> list[list[tuple[Any, ...]]]:
    physical = world["names"]["countries"][0]
    out = []
    for engine in world["router"].engines.primaries.values():
        with engine.connect() as conn:
            out.append(
                [tuple(r) for r in conn.execute(text(f"SELECT * FROM {physical} ORDER BY code"))]
            )
    return out


@pytest.mark.parametrize(
    "sql",
    [
        "UPDATE countries SET name = UUID() WHERE code = 'US'",
        "UPDATE countries SET name = CONCAT('x', RAND()) WHERE code = 'US'",
        "UPDATE countries SET name = NOW(6) WHERE code = 'US'",
        "UPDATE countries SET name = CURRENT_TIMESTAMP WHERE code = 'US'",
        "UPDATE countries SET name = 'x' WHERE RAND() < 0.5",
        "UPDATE countries SET name = SYSDATE() WHERE code = 'US'",
        "DELETE FROM countries WHERE RAND() < 0.5",
        "DELETE FROM countries WHERE name < NOW(6)",
        "INSERT INTO countries (code, name) VALUES ('zz', UUID())",
        "INSERT INTO countries (code, name) VALUES ('zz', NOW(6))",
        "UPDATE countries SET name = 'x' LIMIT 1",
        "UPDATE countries SET name = @@hostname WHERE code = 'US'",
        "UPDATE countries SET name = CONNECTION_ID() WHERE code = 'US'",
    ],
)
def test_broadcast_writes_with_per_shard_values_change_no_copy(
    world: dict[str, Any], sql: str
) -> None:
    before = _copies(world)
    assert all(copy == before[0] for copy in before) and before[0]
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql)
    with pytest.raises(UnsupportedQueryError):
        world["loop"].run_until_complete(world["aio"].execute(sql))
    with pytest.raises(UnsupportedQueryError), world["router"].transaction() as tx:
        tx.execute(sql)
    assert _copies(world) == before


# -- A5: LIMIT m, 2**64-1 -------------------------------------------------------------------------


def test_limit_to_the_end_from_zero_and_from_an_offset(world: dict[str, Any]) -> None:
    _, everything = _oracle(world, "SELECT e.email FROM user_emails e")
    check(world, "SELECT e.email FROM user_emails e LIMIT 0, 18446744073709551615", ordered=False)
    for sql in (
        "SELECT e.email FROM user_emails e LIMIT 3, 18446744073709551615",
        "SELECT e.email FROM user_emails e LIMIT 18446744073709551615 OFFSET 3",
    ):
        labels, expected = _oracle(world, sql)
        for answer in (
            world["router"].execute(sql),
            world["loop"].run_until_complete(world["aio"].execute(sql)),
        ):
            # Without ORDER BY which rows are skipped is the server's choice: the count and the
            # membership are what one database guarantees.
            assert answer.columns == labels
            assert len(answer.rows) == len(expected) == len(everything) - 3
            assert not Counter(answer.rows) - Counter(everything)
    check(
        world,
        "SELECT e.user_id FROM user_emails e ORDER BY e.user_id LIMIT 0, 18446744073709551615",
    )
    check(
        world,
        "SELECT e.user_id FROM user_emails e ORDER BY e.user_id LIMIT 5, 18446744073709551615",
    )


def test_decimal_columns_stay_decimal(world: dict[str, Any]) -> None:
    # Sanity for _norm: the router returns Decimals where the oracle does.
    (row,) = world["router"].execute("SELECT SUM(price_cents * 1.5) FROM order_items").rows
    assert isinstance(row[0], Decimal)


def test_a_parameter_in_order_by_is_refused_across_shards(world: dict[str, Any]) -> None:
    # Bound as ORDER BY 2 on every shard, the merge took it for a constant and interleaved the
    # shards' runs in shard order: a different order from one database's.
    refused(
        world,
        "SELECT status, order_id FROM orders ORDER BY :p LIMIT 20",
        "parameter",
        params={"p": 2},
    )
    refused(world, "SELECT status, COUNT(*) FROM orders GROUP BY :p", "parameter", params={"p": 1})
    user = _user_with_orders(world)
    check(
        world,
        "SELECT status, order_id FROM orders WHERE user_id = :u ORDER BY :p",
        {"u": user, "p": 2},
    )
