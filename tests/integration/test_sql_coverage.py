"""Issue 11 (SQL coverage), on 4 real MariaDB shards against the one-database oracle: each shape
an order service writes is answered exactly as one database answers it (sync and async), or
refused with a typed error that names the problem.

Item 7: a decimal string for an integer key (``user_id = '42'``, a ``'42'`` parameter) routes
as the integer, since MySQL compares it with the column numerically; a string that is not
decimal digits with an optional sign stays a KeyValueError naming the value."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import text
from test_router_oracle import check, world  # noqa: F401  (the module's 4 shards + oracle)

from shardrouter.errors import FanoutLimitError, KeyValueError, RoutingError, UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _orders(world: dict[str, Any]) -> list[dict[str, Any]]:  # noqa: F811
    return world["data"]["orders"]


def _one_shard(world: dict[str, Any], sql: str, params: dict[str, Any]) -> None:  # noqa: F811
    result = world["router"].execute(sql, params)
    assert len(result.shards) == 1 and not result.scatter, (sql, params, result.shards)


@pytest.mark.parametrize("form", ["{}", "+{}", "00{}"], ids=["digits", "plus", "zeros"])
def test_user_id_as_decimal_string_routes_as_the_integer(
    world: dict[str, Any],  # noqa: F811
    form: str,
) -> None:
    for order in _orders(world)[:12]:
        key = form.format(order["user_id"])
        sql = "SELECT order_id, status FROM orders WHERE user_id = :u ORDER BY order_id"
        assert check(world, sql, {"u": key})  # the user's orders, not none
        _one_shard(world, sql, {"u": key})
        literal = f"SELECT COUNT(*) FROM orders WHERE user_id = '{key}'"
        assert check(world, literal)[0][0] > 0
        _one_shard(world, literal, {})


def test_order_id_as_string_routes_by_its_gene(world: dict[str, Any]) -> None:  # noqa: F811
    for order in _orders(world)[:12]:
        key = str(order["order_id"])  # 19 digits: beyond a double's 53 bits, compared exactly
        sql = "SELECT order_id, user_id, merchant_id FROM orders WHERE order_id = :o"
        assert check(world, sql, {"o": key}) == [
            (order["order_id"], order["user_id"], order["merchant_id"])
        ]
        _one_shard(world, sql, {"o": key})
        items = "SELECT line, sku FROM order_items WHERE order_id = :o ORDER BY line"
        assert check(world, items, {"o": key})


def test_in_list_of_strings_and_ints(world: dict[str, Any]) -> None:  # noqa: F811
    users = sorted({o["user_id"] for o in _orders(world)})[:8]
    params = {f"u{i}": (str(u) if i % 2 else u) for i, u in enumerate(users)}
    marks = ", ".join(f":u{i}" for i in range(len(users)))
    sql = f"SELECT user_id, order_id FROM orders WHERE user_id IN ({marks}) ORDER BY order_id"
    rows = check(world, sql, params)
    assert {r[0] for r in rows} == set(users)
    literals = ", ".join(f"'{u}'" for u in users)
    check(world, f"SELECT COUNT(*) FROM orders WHERE user_id IN ({literals})")


def test_merchant_id_as_string_goes_through_the_lookup(world: dict[str, Any]) -> None:  # noqa: F811
    for merchant in range(4):
        sql = "SELECT order_id, user_id FROM orders WHERE merchant_id = :m ORDER BY order_id"
        assert check(world, sql, {"m": str(merchant)})
        result = world["router"].execute(sql, {"m": str(merchant)})
        assert result.lookups, "read through the lookup table, not a fan-out"


@pytest.mark.parametrize("bad", [" 42", "42 ", "42.0", "4e1", "42abc", "", "4_2", "٤٢"], ids=repr)
def test_a_string_that_is_not_an_exact_integer_is_refused(
    world: dict[str, Any],  # noqa: F811
    bad: str,
) -> None:
    for sql, params in [
        ("SELECT order_id FROM orders WHERE user_id = :u", {"u": bad}),
        ("SELECT order_id FROM orders WHERE order_id = :u", {"u": bad}),
        ("SELECT order_id FROM orders WHERE merchant_id = :u", {"u": bad}),
    ]:
        with pytest.raises(KeyValueError) as info:
            world["router"].execute(sql, params)
        assert repr(bad) in str(info.value) and "decimal digits" in str(info.value)


@pytest.fixture
def writer(world: dict[str, Any]) -> Iterator[dict[str, Any]]:  # noqa: F811
    """A fresh user whose order the test writes with string keys; removed from both sides."""
    user = 987_654_321
    order_id = world["topology"].id_generator("orders").next_id(user_id=user)
    yield {"user": user, "order": order_id}
    for target in (world["router"], None):
        for sql in (
            "DELETE FROM order_items WHERE order_id = :o",
            "DELETE FROM orders WHERE order_id = :o",
        ):
            if target is None:
                with world["oracle"].begin() as conn:
                    conn.execute(text(sql), {"o": order_id})
                    conn.execute(
                        text("DELETE FROM merchant_orders WHERE order_id = :o"), {"o": order_id}
                    )
            else:
                target.execute(sql, {"o": order_id})


def test_writes_with_string_keys_land_where_the_integers_route(
    world: dict[str, Any],  # noqa: F811
    writer: dict[str, Any],
) -> None:
    router, topology = world["router"], world["topology"]
    user, order = writer["user"], writer["order"]
    params = {"o": str(order), "u": str(user), "m": "7", "t": dt.datetime(2026, 3, 1, 12)}
    insert = (
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
        " VALUES (:o, :u, :m, 'new', 500, :t)"
    )
    router.execute(insert, params)
    router.execute(
        "INSERT INTO order_items (order_id, line, user_id, sku, qty) VALUES (:o, 0, :u, 'x', 1)",
        params,
    )
    with world["oracle"].begin() as conn:
        conn.execute(text(insert), params)
        conn.execute(
            text(
                "INSERT INTO order_items (order_id, line, user_id, sku, qty)"
                " VALUES (:o, 0, :u, 'x', 1)"
            ),
            params,
        )
        conn.execute(
            text("INSERT INTO merchant_orders (merchant_id, order_id, user_id) VALUES (7, :o, :u)"),
            params,
        )
    # On the shard and physical table the integer routes to, and nowhere else.
    slot = topology.slot_for("orders", user)
    shard, physical = topology.shard_of_slot(slot), topology.table("orders").physical(slot)
    found = []
    for name, engine in router.engines.primaries.items():
        with engine.connect() as conn:
            for table in topology.table("orders").physical_names:
                n = conn.execute(
                    text(f"SELECT COUNT(*) FROM {table} WHERE order_id = :o"), {"o": order}
                ).scalar_one()
                found += [(name, table)] * n
    assert found == [(shard, physical)]
    # Its merchant lookup row holds integers, and the merchant's page finds the order.
    merchant_page = "SELECT order_id FROM orders WHERE merchant_id = :m ORDER BY order_id"
    assert (order,) in check(world, merchant_page, {"m": 7})
    # A guarded status change and a read by string keys, then the oracle agrees on all.
    update = "UPDATE orders SET status = 'paid' WHERE order_id = :o AND status = 'new'"
    assert router.execute(update, {"o": str(order)}).rowcount == 1
    with world["oracle"].begin() as conn:
        conn.execute(text(update), {"o": order})
    check(world, "SELECT order_id, status FROM orders WHERE user_id = :u", {"u": str(user)})
    check(
        world,
        "SELECT merchant_id, order_id, user_id FROM merchant_orders WHERE merchant_id = 7"
        " ORDER BY order_id",
    )


# -- item 5: LIMIT :n / OFFSET :m, bound at execution ---------------------------------------


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        ("SELECT order_id FROM orders ORDER BY order_id LIMIT :n", {"n": 7}),
        ("SELECT order_id FROM orders ORDER BY order_id DESC LIMIT :m, :n", {"m": 5, "n": 9}),
        (
            "SELECT order_id, created_at FROM orders ORDER BY created_at DESC, order_id"
            " LIMIT :n OFFSET :m",
            {"n": 4, "m": 11},
        ),
        ("SELECT order_id FROM orders ORDER BY order_id LIMIT 3 OFFSET :m", {"m": 2}),
        (
            "SELECT status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY n DESC, status"
            " LIMIT :limit",
            {"limit": 2},
        ),
        ("SELECT DISTINCT merchant_id FROM orders ORDER BY merchant_id LIMIT :n", {"n": 5}),
        ("SELECT order_id FROM orders ORDER BY order_id LIMIT :n", {"n": 0}),
        (
            "SELECT order_id FROM orders WHERE status = :s ORDER BY order_id LIMIT :n",
            {"s": "paid", "n": 6},
        ),
    ],
)
def test_limit_and_offset_parameters_across_shards(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    params: dict[str, Any],
) -> None:
    rows = check(world, sql, params)
    assert (len(rows) > 0) == (params.get("n", 1) > 0)  # (the answers were compared)
    result = world["router"].execute(sql, params)
    assert len(result.shards) > 1  # a fan-out, merged with the values bound
    # Another value reuses the statement's plan and gets its own answer.
    again = {k: (v + 1 if isinstance(v, int) else v) for k, v in params.items()}
    check(world, sql, again)


def test_limit_parameter_on_one_shard(world: dict[str, Any]) -> None:  # noqa: F811
    user = _orders(world)[0]["user_id"]
    sql = "SELECT order_id FROM orders WHERE user_id = :u ORDER BY order_id LIMIT :n"
    for n in (0, 1, 3):
        check(world, sql, {"u": user, "n": n})
        _one_shard(world, sql, {"u": user, "n": n})


@pytest.mark.parametrize("bad", ["5", -1, True, 2.0, None], ids=repr)
def test_a_limit_that_is_not_a_count_is_refused_on_one_shard_and_many(
    world: dict[str, Any],  # noqa: F811
    bad: Any,
) -> None:
    user = _orders(world)[0]["user_id"]
    for sql, params in [
        ("SELECT order_id FROM orders ORDER BY order_id LIMIT :n", {"n": bad}),
        ("SELECT order_id FROM orders WHERE user_id = :u LIMIT :n", {"u": user, "n": bad}),
        ("SELECT order_id FROM orders ORDER BY order_id LIMIT 5 OFFSET :n", {"n": bad}),
    ]:
        with pytest.raises(RoutingError) as info:
            world["router"].execute(sql, params)
        assert ":n" in str(info.value) and repr(bad) in str(info.value)
        with pytest.raises(RoutingError):
            world["loop"].run_until_complete(world["aio"].execute(sql, params))


def test_a_bound_offset_is_held_to_max_offset(world: dict[str, Any]) -> None:  # noqa: F811
    sql = "SELECT order_id FROM orders ORDER BY order_id LIMIT :n OFFSET :m"
    check(world, sql, {"n": 5, "m": 495})  # the router's max_offset is 500
    with pytest.raises(FanoutLimitError) as info:
        world["router"].execute(sql, {"n": 5, "m": 501})
    assert "OFFSET 506" in str(info.value) or "OFFSET 501" in str(info.value)


# -- item 4: HAVING with parameters, IN, BETWEEN, IS NULL ----------------------------------


@pytest.mark.parametrize(
    ("having", "params"),
    [
        ("COUNT(*) > :n", {"n": 5}),
        ("COUNT(*) > :n", {"n": "5"}),  # a string compared with a count: as a number
        ("SUM(amount_cents) >= :low AND status <> :s", {"low": 100_000, "s": "paid"}),
        ("COUNT(*) BETWEEN :a AND :b", {"a": 3, "b": 40}),
        ("COUNT(*) NOT BETWEEN 3 AND 40", {}),
        ("status IN (:s1, :s2)", {"s1": "paid", "s2": "DONE"}),  # the collation folds case
        ("status NOT IN ('paid', 'new')", {}),
        ("COUNT(*) IN (1, 2, 3, :n)", {"n": 4}),
        ("MAX(amount_cents) IS NULL OR COUNT(*) > :n", {"n": 1000}),
        ("MIN(amount_cents) IS NOT NULL AND MAX(created_at) > :t", {"t": dt.datetime(2026, 3, 1)}),
        ("SUM(amount_cents) > :d", {"d": Decimal("12345.5")}),
        ("COUNT(*) > :n OR :n IS NULL", {"n": None}),
        ("status IN (NULL, 'paid')", {}),
    ],
)
def test_having_with_parameters_and_predicates_across_shards(
    world: dict[str, Any],  # noqa: F811
    having: str,
    params: dict[str, Any],
) -> None:
    for group in ("status", "merchant_id"):
        if "status" in having and group != "status":
            continue
        sql = (
            f"SELECT {group}, COUNT(*), SUM(amount_cents) FROM orders GROUP BY {group}"
            f" HAVING {having} ORDER BY {group}"
        )
        check(world, sql, params)
        assert len(world["router"].execute(sql, params).shards) > 1


def test_having_parameter_with_the_same_name_in_where(world: dict[str, Any]) -> None:  # noqa: F811
    # :n in WHERE stays a bound parameter; in HAVING the merge needs its value.
    sql = (
        "SELECT merchant_id, COUNT(*) FROM orders WHERE merchant_id > :n GROUP BY merchant_id"
        " HAVING COUNT(*) > :n ORDER BY merchant_id LIMIT :k"
    )
    for n, k in ((2, 3), (5, 10), (0, 1)):
        check(world, sql, {"n": n, "k": k})


def test_having_parameter_of_no_scalar_type_is_refused(world: dict[str, Any]) -> None:  # noqa: F811
    sql = "SELECT status, COUNT(*) FROM orders GROUP BY status HAVING COUNT(*) > :n"
    with pytest.raises(RoutingError) as info:
        world["router"].execute(sql, {"n": [1, 2]})
    assert ":n" in str(info.value)


# -- item 3: expressions over aggregates, computed after the merge --------------------------

OVER_AGGREGATES = [
    "SELECT SUM(amount_cents)/100 FROM orders",
    "SELECT SUM(amount_cents) / 100 AS eur FROM orders WHERE status = :s",
    "SELECT status, SUM(amount_cents)/COUNT(*) FROM orders GROUP BY status ORDER BY status",
    "SELECT ROUND(AVG(amount_cents)/100, 2) FROM orders",
    "SELECT ROUND(AVG(amount_cents), 2), ROUND(AVG(amount_cents)), ROUND(SUM(amount_cents), -3)"
    " FROM orders",
    "SELECT COALESCE(SUM(amount_cents), 0) FROM orders WHERE status = 'nope'",
    "SELECT COALESCE(SUM(amount_cents), 0), IFNULL(SUM(amount_cents), 0) FROM orders",
    "SELECT status, COALESCE(SUM(amount_cents), 0) FROM orders WHERE amount_cents IS NULL"
    " GROUP BY status ORDER BY status",
    "SELECT merchant_id, IF(COUNT(*) > 50, 1.5, 2.25), IF(COUNT(*) > 50, 1, 2.5e0)"
    " FROM orders GROUP BY merchant_id ORDER BY merchant_id",
    "SELECT COUNT(*)/7/7*49, AVG(amount_cents)/AVG(merchant_id), ROUND(COUNT(*), -1) FROM orders",
    "SELECT status, CASE WHEN COUNT(*) > 150 THEN 'many' ELSE 'few' END AS size FROM orders"
    " GROUP BY status ORDER BY status",
    "SELECT merchant_id, CASE COUNT(*) % 3 WHEN 0 THEN 'a' WHEN 1 THEN 'b' END FROM orders"
    " GROUP BY merchant_id ORDER BY merchant_id",
    "SELECT merchant_id, SUM(amount_cents) DIV 100, SUM(amount_cents) % 7 FROM orders"
    " GROUP BY merchant_id ORDER BY merchant_id",
    "SELECT MAX(amount_cents) - MIN(amount_cents), COUNT(*) * 2 + 1 FROM orders",
    "SELECT SUM(amount_cents) / SUM(1), COUNT(amount_cents) / COUNT(*) FROM orders",
    "SELECT status, 100 * COUNT(*) / 7 FROM orders GROUP BY status ORDER BY status",
    "SELECT ROUND(SUM(amount_cents) / COUNT(amount_cents), 1) FROM orders",
    "SELECT IF(COUNT(*) > 100, 'big', 'small'), COUNT(*) > 100, COUNT(*) BETWEEN 1 AND 5"
    " FROM orders",
    "SELECT merchant_id, AVG(amount_cents) * 2, -AVG(amount_cents), ABS(-SUM(amount_cents) / 3)"
    " FROM orders GROUP BY merchant_id ORDER BY merchant_id",
    "SELECT status, SUM(amount_cents) / 100 AS eur FROM orders GROUP BY status ORDER BY eur DESC",
    "SELECT merchant_id, SUM(amount_cents) / 3 AS third FROM orders GROUP BY merchant_id"
    " HAVING SUM(amount_cents) / 3 > 10000 ORDER BY third, merchant_id LIMIT 5",
    "SELECT merchant_id, SUM(amount_cents) / 3 FROM orders GROUP BY merchant_id"
    " ORDER BY SUM(amount_cents) / 3 DESC, merchant_id LIMIT :n",
    "SELECT NULLIF(COUNT(*), 0), COUNT(*) / 0, 1 / 3 * 3, SUM(amount_cents) / 3 * 3 FROM orders",
    # Parameters over aggregates: written in when the statement fans out (sql/late.py).
    "SELECT ROUND(SUM(amount_cents) / 7, :n), SUM(amount_cents) / :n FROM orders",
]


@pytest.mark.parametrize("sql", OVER_AGGREGATES)
def test_expressions_over_aggregates_across_shards(world: dict[str, Any], sql: str) -> None:  # noqa: F811
    params = {"s": "paid", "n": 4}
    rows = check(world, sql, params)
    # Exactly as one database answers: values, types and DECIMAL scales (repr).
    got = world["router"].execute(sql, params)
    assert len(got.shards) > 1
    assert [tuple(map(repr, r)) for r in got.rows] == [tuple(map(repr, r)) for r in rows], sql
    with world["oracle"].connect() as conn:
        labels = list(conn.execute(text(sql), params).keys())
    assert list(got.columns) == labels


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT CAST(SUM(amount_cents) AS CHAR) FROM orders",
        "SELECT FLOOR(SUM(amount_cents) / 1000) FROM orders",
        "SELECT GREATEST(MAX(amount_cents), 1000) FROM orders",
        "SELECT DISTINCT COUNT(*) % 2 FROM orders GROUP BY merchant_id",
        # the type of the branches depends on the column's declared type
        "SELECT IFNULL(MAX(amount_cents), -1) FROM orders",
        # a computed alias in HAVING (write the expression), a string the merge made ordered
        "SELECT merchant_id, SUM(amount_cents) / 3 AS t FROM orders GROUP BY merchant_id"
        " HAVING t > 1",
        "SELECT merchant_id, IF(COUNT(*) > 1, 'a', 'B') AS k FROM orders GROUP BY merchant_id"
        " ORDER BY k, merchant_id",
    ],
)
def test_expressions_the_merge_cannot_compute_are_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
) -> None:
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql, {"d": 2})
    user = _orders(world)[0]["user_id"]  # on one shard the shard computes it
    one = sql.replace("FROM orders", "FROM orders WHERE user_id = :u")
    check(world, one, {"d": 2, "u": user})


# -- item 9: COUNT/SUM/AVG(DISTINCT) of a sharding key ---------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(DISTINCT user_id) FROM orders",
        "SELECT COUNT(DISTINCT user_id), COUNT(*), SUM(DISTINCT user_id) FROM orders",
        "SELECT status, COUNT(DISTINCT user_id) AS buyers FROM orders GROUP BY status"
        " ORDER BY buyers DESC, status",
        "SELECT AVG(DISTINCT user_id), COUNT(DISTINCT order_id) FROM orders WHERE status = :s",
        "SELECT COUNT(DISTINCT o.order_id), COUNT(*) FROM orders o JOIN order_items i"
        " ON i.order_id = o.order_id WHERE i.qty > 1",
        "SELECT COUNT(DISTINCT user_id) / COUNT(*) FROM orders",
        "SELECT merchant_id, COUNT(DISTINCT user_id) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id LIMIT :n",
    ],
)
def test_distinct_aggregates_of_a_sharding_key_across_shards(
    world: dict[str, Any],  # noqa: F811
    sql: str,
) -> None:
    params = {"s": "paid", "n": 5}
    rows = check(world, sql, params)
    got = world["router"].execute(sql, params)
    assert len(got.shards) > 1
    assert [tuple(map(repr, r)) for r in got.rows] == [tuple(map(repr, r)) for r in rows]


# (COUNT/SUM/AVG(DISTINCT) of other columns: tests/integration/test_distinct_values.py)


def test_distinct_key_aggregates_in_having_and_order_by(world: dict[str, Any]) -> None:  # noqa: F811
    check(
        world,
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id"
        " HAVING COUNT(DISTINCT user_id) > :n ORDER BY COUNT(DISTINCT user_id), merchant_id",
        {"n": 15},
    )


# -- item 1: joins co-located by construction, comma joins ----------------------------------


@pytest.fixture(scope="module")
def people(world: dict[str, Any]) -> Iterator[list[int]]:  # noqa: F811
    """users (hash on user_id like orders, split 1 where orders has 4) and their email lookup
    table on the shards, users on the oracle: the buyers of the first orders."""
    router = world["router"]
    ddl = [
        "CREATE TABLE users (user_id BIGINT PRIMARY KEY, name VARCHAR(32) NOT NULL,"
        " email VARCHAR(64) NOT NULL)",
        "CREATE TABLE user_emails (email VARCHAR(64) PRIMARY KEY, user_id BIGINT NOT NULL)",
    ]
    engines = list(router.engines.primaries.values())
    for engine in engines:
        with engine.begin() as conn:
            for statement in ddl:
                conn.execute(text(statement))
    with world["oracle"].begin() as conn:
        conn.execute(text(ddl[0]))
    buyers = sorted({o["user_id"] for o in _orders(world)})[::3]
    rows = [{"u": u, "n": f"name-{i % 7}", "e": f"u{u}@example.com"} for i, u in enumerate(buyers)]
    insert = "INSERT INTO users (user_id, name, email) VALUES (:u, :n, :e)"
    for row in rows:
        router.execute(insert, row)
    with world["oracle"].begin() as conn:
        conn.execute(text(insert), rows)
    try:
        yield buyers
    finally:
        for engine in engines:
            with engine.begin() as conn:
                conn.execute(text("DROP TABLE users"))
                conn.execute(text("DROP TABLE user_emails"))
        with world["oracle"].begin() as conn:
            conn.execute(text("DROP TABLE users"))


def test_tables_sharded_alike_join_on_one_shard(
    world: dict[str, Any],  # noqa: F811
    people: list[int],
) -> None:
    for user in people[:6]:
        for sql in (
            "SELECT u.name, o.order_id, o.status FROM users u JOIN orders o"
            " ON u.user_id = o.user_id WHERE u.user_id = :u ORDER BY o.order_id",
            "SELECT u.name, o.order_id FROM orders o JOIN users u ON o.user_id = u.user_id"
            " WHERE o.user_id = :u ORDER BY o.order_id",
            "SELECT u.name, o.order_id FROM users u, orders o"
            " WHERE u.user_id = o.user_id AND o.user_id = :u ORDER BY o.order_id",
            "SELECT o.order_id, i.line, i.sku FROM orders o, order_items i"
            " WHERE o.order_id = i.order_id AND o.user_id = :u ORDER BY o.order_id, i.line",
        ):
            assert check(world, sql, {"u": user})
            _one_shard(world, sql, {"u": user})


@pytest.mark.parametrize(
    "sql",
    [
        # users (split 1) named first: the targets are still every split of orders
        "SELECT u.name, COUNT(*), SUM(o.amount_cents) FROM users u JOIN orders o"
        " ON o.user_id = u.user_id GROUP BY u.name ORDER BY u.name",
        "SELECT u.user_id, o.order_id FROM users u JOIN orders o ON o.user_id = u.user_id"
        " WHERE o.status = 'paid' ORDER BY o.order_id LIMIT 15",
        "SELECT o.order_id, u.name, i.line FROM orders o LEFT JOIN order_items i"
        " ON i.order_id = o.order_id AND i.qty > 4 JOIN users u ON u.user_id = o.user_id"
        " ORDER BY o.order_id, i.line",
        "SELECT COUNT(*) FROM users u, orders o, order_items i"
        " WHERE u.user_id = o.user_id AND i.order_id = o.order_id AND i.qty > 2",
        "SELECT u.name, COUNT(DISTINCT o.user_id) FROM orders o JOIN users u"
        " ON u.user_id = o.user_id GROUP BY u.name ORDER BY u.name",
    ],
)
def test_tables_sharded_alike_join_across_shards(
    world: dict[str, Any],  # noqa: F811
    people: list[int],
    sql: str,
) -> None:
    assert check(world, sql)
    assert len(world["router"].execute(sql).shards) > 1


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 1 FROM users u JOIN orders o ON u.user_id = o.merchant_id",
        "SELECT 1 FROM users u JOIN merchant_orders m ON u.user_id = m.merchant_id",
        "SELECT 1 FROM users u CROSS JOIN orders o WHERE u.user_id = o.user_id",
        "SELECT 1 FROM users u, orders o WHERE u.user_id = o.user_id OR o.user_id = 1",
        "SELECT 1 FROM users u, orders o WHERE u.name = o.status",
        "UPDATE users u JOIN orders o ON u.user_id = o.user_id SET u.name = 'x'",
        # each split of orders would add the users without orders again
        "SELECT u.name, o.order_id FROM users u LEFT JOIN orders o ON o.user_id = u.user_id",
        "SELECT u.name FROM orders o RIGHT JOIN users u ON o.user_id = u.user_id",
    ],
)
def test_joins_that_are_not_co_located_are_refused(
    world: dict[str, Any],  # noqa: F811
    people: list[int],
    sql: str,
) -> None:
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql)


# -- item 2: subqueries confined to one shard, subqueries over broadcast tables -------------


def test_subqueries_on_the_outer_key(world: dict[str, Any]) -> None:  # noqa: F811
    for user in sorted({o["user_id"] for o in _orders(world)})[:6]:
        for sql in (
            # EXISTS on the user's items (correlated by the gene key)
            "SELECT o.order_id FROM orders o WHERE o.user_id = :u AND EXISTS"
            " (SELECT 1 FROM order_items i WHERE i.order_id = o.order_id AND i.qty > 2)"
            " ORDER BY o.order_id",
            # a scalar AVG over the same user's orders (the same key value)
            "SELECT order_id, amount_cents FROM orders WHERE user_id = :u AND amount_cents >"
            " (SELECT AVG(amount_cents) FROM orders WHERE user_id = :u) ORDER BY order_id",
            # in the select list, correlated
            "SELECT o.order_id, (SELECT COUNT(*) FROM order_items i WHERE i.order_id ="
            " o.order_id) AS n_lines FROM orders o WHERE o.user_id = :u ORDER BY o.order_id",
            "SELECT o.order_id FROM orders o WHERE o.user_id = :u AND o.order_id IN"
            " (SELECT i.order_id FROM order_items i WHERE i.user_id = :u AND i.sku LIKE 'sku-0%')"
            " ORDER BY o.order_id",
        ):
            check(world, sql, {"u": user})
            _one_shard(world, sql, {"u": user})


@pytest.mark.parametrize(
    "sql",
    [
        # correlated by the key in the WHERE: answered across shards
        "SELECT o.order_id FROM orders o WHERE EXISTS (SELECT 1 FROM order_items i"
        " WHERE i.order_id = o.order_id AND i.qty = 5) ORDER BY o.order_id",
        "SELECT COUNT(*) FROM orders o WHERE NOT EXISTS (SELECT 1 FROM order_items i"
        " WHERE i.order_id = o.order_id AND i.line > 0)",
        "SELECT o.status, COUNT(*) FROM orders o WHERE o.amount_cents > (SELECT AVG(p.amount_cents)"
        " FROM orders p WHERE p.user_id = o.user_id) GROUP BY o.status ORDER BY o.status",
        # over a broadcast table
        "SELECT order_id FROM orders WHERE status IN (SELECT LOWER(code) FROM countries)"
        " ORDER BY order_id LIMIT 5",
        "SELECT COUNT(*) FROM orders WHERE merchant_id < (SELECT COUNT(*) FROM countries)",
    ],
)
def test_confined_subqueries_across_shards(world: dict[str, Any], sql: str) -> None:  # noqa: F811
    check(world, sql)
    assert len(world["router"].execute(sql).shards) > 1


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        (
            "SELECT order_id FROM orders WHERE amount_cents > (SELECT AVG(amount_cents) FROM orders)",
            {},
        ),
        (
            "SELECT order_id FROM orders WHERE user_id = :u AND amount_cents >"
            " (SELECT AVG(amount_cents) FROM orders WHERE user_id = :v)",
            {"u": 1, "v": 2},
        ),
        (  # correlated on a lookup column, which does not place rows
            "SELECT o.order_id FROM orders o WHERE EXISTS (SELECT 1 FROM orders p"
            " WHERE p.merchant_id = o.merchant_id AND p.order_id <> o.order_id)",
            {},
        ),
        (
            "SELECT o.order_id FROM orders o WHERE EXISTS (SELECT 1 FROM order_items i"
            " WHERE i.order_id = o.order_id OR i.qty > 1)",
            {},
        ),
        (
            "SELECT order_id FROM orders WHERE user_id IN (SELECT user_id FROM orders"
            " WHERE status = 'paid' UNION SELECT 1)",
            {},
        ),
    ],
)
def test_unconfined_subqueries_are_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
    params: dict[str, Any],
) -> None:
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql, params)


def test_a_subquery_over_more_split_tables_names_the_splits(world: dict[str, Any]) -> None:  # noqa: F811
    # users and orders are co-located (a JOIN of them is answered, test_review16_joins), but
    # orders has more split tables a shard: the subquery would read one of them only (review 24: the refusal said
    # "not bound together").
    sql = (
        "SELECT u.user_id FROM users u WHERE u.user_id = :u AND EXISTS (SELECT 1 FROM orders o"
        " WHERE o.user_id = u.user_id)"
    )
    with pytest.raises(UnsupportedQueryError, match=r"split tables.*write it as a JOIN"):
        world["router"].execute(sql, {"u": 1})


def test_a_subquery_in_the_select_list_runs_on_one_target_only(
    world: dict[str, Any],  # noqa: F811
) -> None:
    sql = (
        "SELECT o.order_id, (SELECT COUNT(*) FROM order_items i WHERE i.order_id ="
        " o.order_id) FROM orders o ORDER BY o.order_id"
    )
    with pytest.raises(UnsupportedQueryError, match="one target"):
        world["router"].execute(sql)


# -- item 6: UNION / UNION ALL ----------------------------------------------------------------


def test_union_on_one_target_runs_as_written(world: dict[str, Any]) -> None:  # noqa: F811
    user = _orders(world)[0]["user_id"]
    sql = (
        "SELECT order_id, status FROM orders WHERE user_id = :u AND status = 'new'"
        " UNION SELECT order_id, status FROM orders WHERE user_id = :u AND amount_cents > 100"
        " ORDER BY order_id DESC LIMIT 3"
    )
    check(world, sql, {"u": user})
    _one_shard(world, sql, {"u": user})
    # strings deduplicated by the shard's collation: that target runs it whole
    check(
        world,
        "SELECT status FROM orders WHERE user_id = :u UNION SELECT UPPER(status)"
        " FROM orders WHERE user_id = :u ORDER BY 1",
        {"u": user},
        ordered=False,
    )


@pytest.mark.parametrize(
    ("sql", "ordered"),
    [
        (
            "SELECT order_id FROM orders WHERE status = 'new' UNION ALL"
            " SELECT order_id FROM orders WHERE amount_cents > 40000",
            False,
        ),
        (
            "SELECT order_id, amount_cents FROM orders WHERE status = 'new' UNION"
            " SELECT order_id, amount_cents FROM orders WHERE amount_cents > 40000"
            " ORDER BY amount_cents DESC, order_id LIMIT 10 OFFSET 2",
            True,
        ),
        (
            "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id UNION ALL"
            " SELECT merchant_id, SUM(amount_cents) FROM orders GROUP BY merchant_id"
            " ORDER BY 1, 2",
            True,
        ),
        (
            "SELECT user_id FROM orders WHERE merchant_id = 3 UNION"
            " SELECT user_id FROM order_items WHERE qty = 5 ORDER BY user_id",
            True,
        ),
        (
            "SELECT created_at FROM orders WHERE status = 'paid' UNION"
            " SELECT created_at FROM orders WHERE status = 'done' ORDER BY 1 DESC LIMIT 7",
            True,
        ),
        (
            "SELECT order_id, NULL FROM orders WHERE merchant_id = 1 UNION ALL"
            " SELECT order_id, amount_cents FROM orders WHERE merchant_id = 2 ORDER BY 2, 1",
            True,
        ),
    ],
)
def test_union_across_shards(world: dict[str, Any], sql: str, ordered: bool) -> None:  # noqa: F811
    rows = check(world, sql, ordered=ordered)
    assert rows
    assert len(world["router"].execute(sql).shards) > 1


@pytest.mark.parametrize(
    "sql",
    [
        # strings deduplicated or ordered across shards: the collation is the shards'
        "SELECT status FROM orders WHERE merchant_id = 1 UNION SELECT status FROM orders"
        " WHERE merchant_id = 2",
        "SELECT status FROM orders UNION ALL SELECT sku FROM order_items ORDER BY 1",
        # a column of numbers in one SELECT and strings in another: MySQL makes them strings
        "SELECT order_id FROM orders UNION ALL SELECT status FROM orders",
        "SELECT order_id FROM orders UNION SELECT order_id FROM orders UNION ALL"
        " SELECT order_id FROM orders",
        "SELECT order_id FROM orders UNION SELECT order_id, user_id FROM orders",
        "(SELECT order_id FROM orders ORDER BY order_id LIMIT 1) UNION SELECT 1",
        "SELECT order_id FROM orders UNION SELECT order_id FROM orders ORDER BY user_id",
        "SELECT order_id FROM orders INTERSECT SELECT order_id FROM order_items",
    ],
)
def test_unions_the_router_cannot_combine_are_refused(
    world: dict[str, Any],  # noqa: F811
    sql: str,
) -> None:
    with pytest.raises(UnsupportedQueryError):
        world["router"].execute(sql)
