"""Issue 7 review: reproductions of defects found in the session's change (30e93b3..HEAD), each
on real MariaDB shards compared with one MariaDB holding every row (the oracle).

These tests document defects: a failing test here is a finding, not a broken test.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

DDL = {
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL,"
    " name VARCHAR(64) NULL, tier ENUM('zeta', 'alpha', 'mid') NOT NULL,"
    " tag VARCHAR(32) COLLATE utf8mb4_nopad_bin NOT NULL, score INT NULL)",
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, amount_cents BIGINT NULL, status VARCHAR(16) NOT NULL,"
    " KEY (user_id))",
    "order_items": "CREATE TABLE {t} (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, PRIMARY KEY (order_id, line))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
    "countries": "CREATE TABLE {t} (code CHAR(2) PRIMARY KEY, name VARCHAR(64) NOT NULL)",
}

TIERS = ("zeta", "alpha", "mid")
TAGS = ("a", "a ", "b", "b  ", "A")


def _rows(topology: Topology) -> dict[str, list[dict[str, Any]]]:
    rng = random.Random(20261130)
    ids = topology.id_generator("orders", worker_id=17)
    users, orders = [], []
    for n in range(60):
        user_id = 1000 + n * 7919
        users.append(
            {
                "user_id": user_id,
                "email": f"u{n}@example.com",
                "name": None if n % 4 == 0 else f"name{n % 9}",
                "tier": TIERS[n % 3],
                "tag": TAGS[n % len(TAGS)],
                "score": None if n % 5 == 0 else n % 7,
            }
        )
        for order_id in ids.next_ids(rng.randint(1, 3), user_id=user_id):
            orders.append(
                {
                    "order_id": order_id,
                    "user_id": user_id,
                    "merchant_id": rng.randrange(4),
                    "amount_cents": None if rng.random() < 0.1 else rng.randrange(100, 900),
                    "status": rng.choice(("new", "paid", "void")),
                }
            )
    return {"users": users, "orders": orders}


@pytest.fixture(scope="module")
def world(shard_databases: Any, oracle: Any) -> Iterator[dict[str, Any]]:
    topology = Topology.load(shard_databases)
    server = make_url(oracle.shards[0].url)
    admin = create_engine(server.set(database="").render_as_string(hide_password=False))
    with admin.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS issue7_review"))
        conn.execute(text("CREATE DATABASE issue7_review"))
    oracle_engine = create_engine(
        server.set(database="issue7_review").render_as_string(hide_password=False)
    )
    router = Router(topology, max_fanout=None)
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical, ddl in DDL.items():
                for name in topology.table(logical).physical_names:
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    conn.execute(text(ddl.format(t=name)))
    with oracle_engine.begin() as conn:
        for logical, ddl in DDL.items():
            conn.execute(text(ddl.format(t=logical)))
    data = _rows(topology)
    cols = {t: list(rows[0]) for t, rows in data.items()}

    def insert_sql(table: str) -> str:
        c = cols[table]
        return f"INSERT INTO {table} ({', '.join(c)}) VALUES ({', '.join(':' + x for x in c)})"

    with oracle_engine.begin() as conn:
        for table, rows in data.items():
            conn.execute(text(insert_sql(table)), rows)
        conn.execute(
            text(
                "INSERT INTO merchant_orders (merchant_id, order_id, user_id)"
                " SELECT merchant_id, order_id, user_id FROM orders"
            )
        )
        conn.execute(
            text("INSERT INTO user_emails (email, user_id) SELECT email, user_id FROM users")
        )
    for table in ("users", "orders"):
        for row in data[table]:
            router.execute(insert_sql(table), row)
    aio = AsyncRouter(topology, max_fanout=None)
    loop = asyncio.new_event_loop()
    try:
        yield {"router": router, "aio": aio, "loop": loop, "oracle": oracle_engine, "data": data}
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        router.close()
        oracle_engine.dispose()
        with admin.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS issue7_review"))
        admin.dispose()


def _norm(rows: Any) -> list[tuple[Any, ...]]:
    return [tuple(float(v) if isinstance(v, Decimal) else v for v in r) for r in rows]


def oracle_rows(world: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> Any:
    engine: Engine = world["oracle"]
    with engine.connect() as conn:
        result = conn.execute(text(sql), params or {})
        return tuple(result.keys()), _norm(result)


def check(
    world: dict[str, Any], sql: str, params: dict[str, Any] | None = None, ordered: bool = True
) -> None:
    """The router (sync and async) answers ``sql`` as the oracle does, or refuses it typed."""
    labels, expected = oracle_rows(world, sql, params)
    for name, call in (
        ("sync", lambda: world["router"].execute(sql, params or {})),
        (
            "async",
            lambda: world["loop"].run_until_complete(world["aio"].execute(sql, params or {})),
        ),
    ):
        try:
            answer = call()
        except ShardRouterError:
            continue  # a typed refusal is allowed by the bar
        got = _norm(answer.rows)
        if ordered:
            assert got == expected, f"{name}: {sql}"
        else:
            assert Counter(got) == Counter(expected), f"{name}: {sql}"
        assert tuple(answer.columns) == labels, f"{name}: {sql}"


# -- merges that disagree with one database ----------------------------------------------------


def test_group_by_name_that_is_also_a_select_alias(world: dict[str, Any]) -> None:
    """MySQL/MariaDB resolve a GROUP BY name against the FROM tables' columns before the select
    aliases; the merge resolves it to the alias and regroups by the other column."""
    check(
        world,
        "SELECT merchant_id AS user_id, COUNT(*) AS n FROM orders GROUP BY user_id",
        ordered=False,
    )


def test_having_name_that_is_also_a_select_alias(world: dict[str, Any]) -> None:
    """The same name resolution question for HAVING (probe; MariaDB decides)."""
    check(
        world,
        "SELECT merchant_id AS user_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " HAVING user_id > 1 ORDER BY n",
        ordered=False,
    )
    check(
        world,
        "SELECT merchant_id AS amount_cents, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " ORDER BY amount_cents",
    )


def test_order_by_enum_column_is_refused_not_misordered(world: dict[str, Any]) -> None:
    """ENUM sorts by its index ('zeta' < 'alpha' < 'mid' here); the merge would sort by the
    text. The shards' result metadata flags ENUM/SET columns, so such a merge is refused (sync
    and async), and ordering by the index (`tier + 0`) answers as one database does."""
    from shardrouter.errors import UnsupportedQueryError

    for sql in (
        "SELECT user_id, tier FROM users ORDER BY tier, user_id",
        "SELECT user_id, tier FROM users ORDER BY tier DESC, user_id LIMIT 10",
        "SELECT tier, COUNT(*) FROM users GROUP BY tier",
        "SELECT DISTINCT tier FROM users",
    ):
        with pytest.raises(UnsupportedQueryError, match="ENUM or SET"):
            world["router"].execute(sql)
        with pytest.raises(UnsupportedQueryError, match="ENUM or SET"):
            world["loop"].run_until_complete(world["aio"].execute(sql))
    for sql in (
        "SELECT user_id, tier FROM users ORDER BY tier + 0, user_id",
        "SELECT user_id, tier FROM users ORDER BY tier + 0 DESC, user_id LIMIT 10",
    ):
        _labels, expected = oracle_rows(world, sql, None)
        assert _norm(world["router"].execute(sql).rows) == expected, sql
        got = world["loop"].run_until_complete(world["aio"].execute(sql))
        assert _norm(got.rows) == expected, sql


def test_group_by_nopad_collation_keeps_trailing_spaces_apart(world: dict[str, Any]) -> None:
    """utf8mb4_nopad_bin: 'a' and 'a ' are different values; WEIGHT_STRING(x AS CHAR(255))
    pads both to the same weight, so the merge folds the groups together."""
    check(
        world,
        "SELECT CONCAT('[', tag, ']') AS t, COUNT(*) AS n FROM users GROUP BY tag ORDER BY t",
    )
    check(world, "SELECT DISTINCT HEX(tag) AS h FROM users ORDER BY h")
    check(world, "SELECT COUNT(*) FROM (SELECT DISTINCT tag FROM users) AS d")


def test_distinct_nopad_collation(world: dict[str, Any]) -> None:
    _labels, expected = oracle_rows(world, "SELECT DISTINCT tag FROM users")
    got = world["router"].execute("SELECT DISTINCT tag FROM users").rows
    assert sorted(r[0] for r in got) == sorted(r[0] for r in expected)


def test_keyset_page_with_nulls_in_a_sort_column(world: dict[str, Any]) -> None:
    """Paging users by (name, user_id), ascending: NULL names sort first, so a page can end on a
    NULL; `name > NULL` is never true and every later row is lost."""
    router: Router = world["router"]
    seen: list[int] = []
    after = None
    for _ in range(100):
        page = router.page(
            "users",
            columns=("user_id", "name"),
            order_by=("name", "user_id"),
            after=after,
            limit=4,
            descending=False,
        )
        seen += [r[0] for r in page.rows]
        after = page.after
        if after is None:
            break
    assert sorted(seen) == sorted(u["user_id"] for u in world["data"]["users"])


def test_having_compares_a_big_integer_with_a_numeric_string_as_mysql(
    world: dict[str, Any],
) -> None:
    """MySQL compares an integer with a string as two doubles: MAX(order_id) = '<the id>' holds
    for a 60-bit id (both round to one double). The merge compares the exact int with the
    float, which differ, and drops the group."""
    order = world["data"]["orders"][0]
    for op in ("=", ">=", "<"):
        check(
            world,
            "SELECT user_id, MAX(order_id) AS m FROM orders GROUP BY user_id"
            f" HAVING MAX(order_id) {op} '{order['order_id'] + 1}' ORDER BY user_id",
        )


def test_having_compares_a_decimal_with_a_numeric_string_as_mysql(world: dict[str, Any]) -> None:
    """COUNT(*) / 10 is 0.1000 for a user with one order; the merge compares Decimal('0.1000')
    with float('0.1'), which Python finds unequal."""
    check(
        world,
        "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id"
        " HAVING n / 10 = '0.1' ORDER BY user_id",
    )


def test_select_star_over_split_tables_ordered_by_strings(world: dict[str, Any]) -> None:
    check(world, "SELECT * FROM orders ORDER BY status DESC, order_id LIMIT 7")
    check(world, "SELECT *, UPPER(status) AS u FROM orders ORDER BY u, order_id DESC LIMIT 9")
    check(world, "SELECT o.*, o.status AS s FROM orders AS o ORDER BY s, 1 LIMIT 5")
    check(world, "SELECT * FROM users ORDER BY name, user_id LIMIT 11")
    check(world, "SELECT * FROM users ORDER BY tag DESC, user_id LIMIT 11")


def test_having_with_nulls_and_mixed_types(world: dict[str, Any]) -> None:
    for having in (
        "SUM(amount_cents) > '1000'",
        "SUM(amount_cents) = NULL",
        "NOT (SUM(amount_cents) > 500)",
        "MIN(amount_cents) < 300 OR MAX(amount_cents) > 800",
        "MAX(status) = 'PAID'",
        "MAX(status) > 5",
        "COUNT(*) > 1.5e0",
        "SUM(amount_cents) / COUNT(*) > 400",
        "COUNT(amount_cents) <> COUNT(*)",
    ):
        check(
            world,
            f"SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id HAVING {having}"
            " ORDER BY user_id",
        )


# -- secrets and imports -------------------------------------------------------------------------


def test_unparsable_url_with_a_space_in_the_password_is_masked(tmp_path: Any) -> None:
    """A URL that does not parse is shown masked; _mask_text splits on spaces, so a password
    holding a space is shown in full."""
    import yaml

    from shardrouter.core.config import load_config
    from shardrouter.errors import ConfigError

    doc = yaml.safe_load(Path("config/orders.yaml").read_text())
    for i, shard in enumerate(doc["shards"].values()):
        shard["primary"] = f"mysql+pymysql://root:my Sekr3tPW@127.0.0.1:39x{i}/orders_s{i}"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert "Sekr3tPW" not in str(caught.value)


def test_submodules_are_attributes_after_import_as_before() -> None:
    """30e93b3: `import shardrouter; shardrouter.errors.ShardRouterError` worked (the eager
    imports loaded the submodules); the lazy __init__ makes it an AttributeError."""
    import subprocess
    import sys

    code = (
        "import shardrouter; shardrouter.errors.ShardRouterError; shardrouter.types.ShardId;"
        " shardrouter.engine.__path__"  # the layers are attributes too (their modules: import)
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-300:]


def test_min_max_of_an_enum_column(world: dict[str, Any]) -> None:
    check(world, "SELECT MIN(tier), MAX(tier) FROM users")
    check(world, "SELECT DISTINCT tier FROM users ORDER BY tier")


# -- races on unique lookups ---------------------------------------------------------------------


def _fresh_users(router: Router, base: int) -> None:
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical in ("users", "user_emails"):
                for name in router.topology.table(logical).physical_names:
                    conn.execute(text(f"DELETE FROM {name} WHERE 1 = 1"))


def _race(router: Router, calls: list[Any]) -> list[BaseException | None]:
    import threading

    barrier = threading.Barrier(len(calls))
    out: list[BaseException | None] = [None] * len(calls)

    def go(i: int) -> None:
        barrier.wait()
        try:
            calls[i]()
        except BaseException as exc:  # recorded, asserted by the caller
            out[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return out


INSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, NULL, 'mid', 'x', NULL)"
)


@pytest.mark.timeout(240)
def test_two_concurrent_signups_cannot_both_own_one_email(world: dict[str, Any]) -> None:
    """Two users registering one new e-mail at the same moment: at most one may succeed.
    30e93b3 refused the second (the lookup row named the first owner); the orphan takeover
    (defect 12) treats an owner whose INSERT has not reached its shard yet as absent, so both
    take the row over in turn and both INSERTs succeed: two users own one address."""
    router: Router = world["router"]
    shard_of = router.topology.shard_for
    doubles = []
    try:
        for round_ in range(80):
            a = 5_000_000 + round_ * 1000
            b = next(
                u for u in range(a + 1, a + 10_000) if shard_of("users", u) != shard_of("users", a)
            )
            email = f"race{round_}@example.com"
            results = _race(
                router,
                [
                    lambda a=a, email=email: router.execute(INSERT_USER, {"u": a, "e": email}),
                    lambda b=b, email=email: router.execute(INSERT_USER, {"u": b, "e": email}),
                ],
            )
            owners = router.execute(
                "SELECT user_id FROM users WHERE user_id IN (:a, :b) AND email = :e",
                {"a": a, "b": b, "e": email},
            ).rows
            if len(owners) == 2:
                doubles.append((round_, results))
    finally:
        _fresh_users(router, 0)
        for row in world["data"]["users"]:
            router.execute(
                "INSERT INTO users (user_id, email, name, tier, tag, score)"
                " VALUES (:user_id, :email, :name, :tier, :tag, :score)",
                row,
            )
    assert doubles == [], f"{len(doubles)} of 80 rounds: both users own one e-mail"


# -- transactions --------------------------------------------------------------------------------


def test_transaction_reads_by_lookup_then_writes_the_owner_shard(world: dict[str, Any]) -> None:
    """A read through the merchant lookup finds one user's orders: the transaction must be on
    that user's shard (where the rows are), whichever shard holds the lookup row."""
    router: Router = world["router"]
    topology = router.topology
    orders = world["data"]["orders"]
    by_merchant: dict[int, set[int]] = {}
    for o in orders:
        by_merchant.setdefault(o["merchant_id"], set()).add(o["user_id"])
    # A merchant with exactly one user, whose lookup row lives on another shard than the user.
    merchant = 900
    user = next(
        u["user_id"]
        for u in world["data"]["users"]
        if topology.shard_for("orders", u["user_id"])
        != topology.shard_for("merchant_orders", merchant)
    )
    ids = topology.id_generator("orders", worker_id=18)
    order_id = ids.next_id(user_id=user)
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
        " VALUES (:o, :u, :m, 5, 'new')",
        {"o": order_id, "u": user, "m": merchant},
    )
    try:
        with router.transaction() as txn:
            found = txn.execute(
                "SELECT order_id FROM orders WHERE merchant_id = :m FOR UPDATE", {"m": merchant}
            )
            assert found.rows == [(order_id,)]
            txn.execute(
                "UPDATE orders SET amount_cents = amount_cents + 1 WHERE order_id = :o",
                {"o": order_id},
            )
        assert (
            router.execute(
                "SELECT amount_cents FROM orders WHERE order_id = :o", {"o": order_id}
            ).scalar()
            == 6
        )
    finally:
        router.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})


def test_email_lookup_finds_an_accent_variant_as_the_column_does(world: dict[str, Any]) -> None:
    """users.email is utf8mb4_general_ci: 'u7@exámple.com' = 'u7@example.com'. The unique lookup
    hashes with fold() (lowercase, trailing spaces) only, so the accent variant routes to
    another lookup shard: the router finds no user where one database finds one, and a second
    user can register the accent variant (two owners of one address)."""
    check(world, "SELECT user_id FROM users WHERE email = :e", {"e": "u7@exámple.com"})
    check(world, "SELECT user_id FROM users WHERE email = :e", {"e": "U7@EXAMPLE.COM  "})


# -- async timeouts ------------------------------------------------------------------------------


def _short_timeout_topology(path: Any, query_timeout_s: float = 1, lock_wait: int = 0) -> Topology:
    import yaml

    from shardrouter.core.config import config_from_dict

    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        # No whole second of lock wait fits below 1 s (PoolConfig): a held row fails at once.
        shard["pool"] = {
            "connect_timeout_s": 2,
            "timeout_s": 3,
            "query_timeout_s": query_timeout_s,
            "lock_wait_timeout_s": lock_wait,
        }
    return Topology(config_from_dict(raw))


@pytest.mark.timeout(120)
def test_async_transaction_after_a_timed_out_statement_reads_its_own_answer(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """A statement cancelled by query_timeout_s leaves its answer on the wire; the transaction
    keeps the connection, so the next statement must not read the cancelled one's rows (or the
    transaction must refuse to go on)."""
    import time

    topology = _short_timeout_topology(shard_databases)
    user = world["data"]["users"][7]

    async def run() -> Any:
        async with AsyncRouter(topology) as aio, aio.transaction() as txn:
            with contextlib.suppress(ShardRouterError):
                await txn.execute(
                    "SELECT SLEEP(2) AS slept, 'stale' AS email FROM users WHERE user_id = :u",
                    {"u": user["user_id"]},
                )
            time.sleep(2.5)  # the shard sends the cancelled statement's answer meanwhile
            try:
                got = await txn.execute(
                    "SELECT email FROM users WHERE user_id = :u", {"u": user["user_id"]}
                )
            except ShardRouterError:
                return None  # a typed refusal is fine
            return got.rows

    rows = asyncio.run(asyncio.wait_for(run(), 60))
    assert rows is None or rows == [(user["email"],)], rows


@pytest.mark.timeout(120)
def test_async_read_after_a_timed_out_read_gets_its_own_answer(
    world: dict[str, Any], shard_databases: Any
) -> None:
    import time

    topology = _short_timeout_topology(shard_databases)
    user = world["data"]["users"][7]

    async def run() -> Any:
        async with AsyncRouter(topology) as aio:
            out = []
            for _ in range(3):
                with contextlib.suppress(ShardRouterError):
                    await aio.execute(
                        "SELECT SLEEP(2) AS slept, 'stale' AS email FROM users WHERE user_id = :u",
                        {"u": user["user_id"]},
                    )
                time.sleep(2.5)
                try:
                    got = await aio.execute(
                        "SELECT email FROM users WHERE user_id = :u", {"u": user["user_id"]}
                    )
                    out.append(got.rows)
                except ShardRouterError as exc:
                    out.append(type(exc).__name__)
            return out

    answers = asyncio.run(asyncio.wait_for(run(), 60))
    assert all(a == [(user["email"],)] or isinstance(a, str) for a in answers), answers


@pytest.mark.timeout(120)
def test_sync_transaction_after_a_timed_out_statement_fails_typed(
    world: dict[str, Any], shard_databases: Any
) -> None:
    import time

    topology = _short_timeout_topology(shard_databases)
    user = world["data"]["users"][7]
    with Router(topology) as router, router.transaction() as txn:
        with contextlib.suppress(ShardRouterError):
            txn.execute(
                "SELECT SLEEP(2) AS slept FROM users WHERE user_id = :u", {"u": user["user_id"]}
            )
        time.sleep(2.5)
        try:
            rows = txn.execute(
                "SELECT email FROM users WHERE user_id = :u", {"u": user["user_id"]}
            ).rows
        except ShardRouterError:
            rows = None
        assert rows is None or rows == [(user["email"],)], rows


# -- a sweep of ordinary statements against the oracle -------------------------------------------

SWEEP = [
    ("SELECT AVG(amount_cents * 1.5) FROM orders", True),
    ("SELECT AVG(score) FROM users", True),
    ("SELECT SUM(status), AVG(status) FROM orders", True),
    ("SELECT MAX(CAST(amount_cents AS CHAR)) AS m FROM orders", True),
    ("SELECT MIN(name), MAX(name) FROM users", True),
    ("SELECT name, COUNT(*) FROM users GROUP BY name ORDER BY name", True),
    ("SELECT DISTINCT name FROM users ORDER BY name LIMIT 3", True),
    ("SELECT user_id FROM users ORDER BY name DESC, user_id LIMIT 5", True),
    ("SELECT user_id, name FROM users ORDER BY name IS NULL, name, user_id", True),
    ("SELECT user_id FROM users ORDER BY COALESCE(name, 'zzz'), user_id", True),
    ("SELECT user_id FROM users ORDER BY score, user_id", True),
    ("SELECT user_id FROM users ORDER BY score DESC, user_id LIMIT 10", True),
    ("SELECT score, COUNT(*) FROM users GROUP BY score ORDER BY score", True),
    (
        "SELECT score, COUNT(*) AS c FROM users GROUP BY score HAVING c > 1 ORDER BY c DESC, score",
        True,
    ),
    ("SELECT LEFT(email, 2) AS p, COUNT(*) FROM users GROUP BY p ORDER BY p", True),
    ("SELECT email FROM users ORDER BY email LIMIT 5 OFFSET 3", True),
    ("SELECT user_id, tag FROM users ORDER BY tag, user_id", True),
    ("SELECT MIN(tag), MAX(tag) FROM users", True),
    ("SELECT HEX(tag) AS h, COUNT(*) FROM users GROUP BY tag ORDER BY h", True),
    (
        "SELECT user_id, SUM(amount_cents) s FROM orders GROUP BY user_id ORDER BY s DESC, user_id LIMIT 5",
        True,
    ),
    ("SELECT merchant_id, AVG(amount_cents) FROM orders GROUP BY merchant_id ORDER BY 2", True),
    (
        "SELECT COUNT(*), MIN(order_id), SUM(amount_cents), AVG(amount_cents) FROM orders WHERE 1 = 0",
        True,
    ),
    ("SELECT user_id FROM users WHERE name LIKE 'NAME1%' ORDER BY user_id", True),
    ("SELECT user_id, name FROM users ORDER BY name COLLATE utf8mb4_bin, user_id", True),
    ("SELECT name COLLATE utf8mb4_bin AS n, COUNT(*) FROM users GROUP BY n ORDER BY n", True),
    ("SELECT COUNT(*) AS n FROM orders HAVING n > 0", True),
    (
        "SELECT user_id FROM orders GROUP BY user_id HAVING COUNT(*) > 2 ORDER BY user_id LIMIT 3",
        True,
    ),
    ("SELECT DISTINCT merchant_id FROM orders ORDER BY merchant_id DESC", True),
    (
        "SELECT order_id FROM orders ORDER BY amount_cents IS NULL, amount_cents, order_id LIMIT 5",
        True,
    ),
    ("SELECT SUM(amount_cents > 500), MAX(amount_cents > 500) FROM orders", True),
    ("SELECT score + 0.5 AS x FROM users ORDER BY x, user_id LIMIT 4", True),
    ("SELECT user_id, IF(score > 3, 'hi', NULL) AS b FROM users ORDER BY b, user_id", True),
    ("SELECT MAX(IF(score > 3, 'hi', 'HI')) AS m FROM users", False),
    ("SELECT MIN(BINARY name) AS m FROM users", True),
    (
        "SELECT user_id, amount_cents FROM orders ORDER BY amount_cents DESC, order_id LIMIT 2, 3",
        True,
    ),
    ("SELECT status, COUNT(*) FROM orders GROUP BY status ORDER BY COUNT(*) DESC, status", True),
    (
        "SELECT status, MAX(amount_cents) - MIN(amount_cents) AS spread FROM orders GROUP BY status",
        False,
    ),
    ("SELECT COUNT(*) FROM orders WHERE amount_cents IS NULL", True),
    ("SELECT user_id, COUNT(*) FROM orders GROUP BY user_id ORDER BY user_id DESC LIMIT 4", True),
    ("SELECT COUNT(*) FROM orders o JOIN users u ON u.user_id = o.user_id", True),
    (
        "SELECT u.name, COUNT(*) FROM orders o JOIN users u ON u.user_id = o.user_id GROUP BY u.name ORDER BY u.name",
        True,
    ),
    (
        "SELECT user_id, MAX(status) AS s FROM orders GROUP BY user_id HAVING s = 'VOID' ORDER BY user_id",
        True,
    ),
    (
        "SELECT user_id, MIN(amount_cents) AS m FROM orders GROUP BY user_id HAVING m IS NULL ORDER BY user_id",
        True,
    ),
    (
        "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id HAVING n = 1 AND MIN(status) <> 'new' ORDER BY user_id",
        True,
    ),
    ("SELECT status FROM orders GROUP BY status HAVING status > 'N' ORDER BY status", True),
    (
        "SELECT user_id FROM orders WHERE status IN ('NEW', 'Paid') GROUP BY user_id ORDER BY user_id",
        True,
    ),
    (
        "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id HAVING SUM(amount_cents) > AVG(amount_cents) * 10 ORDER BY 1",
        True,
    ),
    (
        "SELECT merchant_id, SUM(amount_cents) / COUNT(*) AS a FROM orders GROUP BY merchant_id ORDER BY a",
        False,
    ),
    (
        "SELECT user_id, score FROM users WHERE score BETWEEN 2 AND 4 ORDER BY score DESC, user_id",
        True,
    ),
    ("SELECT 'x' AS k, COUNT(*) FROM orders GROUP BY k", True),
    ("SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id ORDER BY NULL", False),
    ("SELECT user_id FROM users ORDER BY RIGHT(email, 5), user_id LIMIT 6", True),
    ("SELECT name COLLATE utf8mb4_bin AS n FROM users ORDER BY name, user_id", False),
    ("SELECT name AS n, user_id FROM users ORDER BY n COLLATE utf8mb4_bin, user_id", True),
    (
        "SELECT UPPER(name) COLLATE utf8mb4_bin AS n, COUNT(*) FROM users GROUP BY n ORDER BY n",
        True,
    ),
    ("SELECT DISTINCT name COLLATE utf8mb4_bin AS n FROM users ORDER BY n", True),
    ("SELECT MIN(name COLLATE utf8mb4_bin), MAX(name COLLATE utf8mb4_bin) FROM users", True),
    ("SELECT * FROM orders ORDER BY status COLLATE utf8mb4_bin DESC, order_id LIMIT 9", True),
    ("SELECT o.*, 1 AS x FROM orders o ORDER BY o.status, o.order_id DESC LIMIT 3, 6", True),
    (
        "SELECT user_id, email FROM users ORDER BY CONCAT(email, REPEAT(' ', 300)), user_id LIMIT 5",
        True,
    ),
]


@pytest.mark.timeout(300)
def test_sweep_of_ordinary_statements(world: dict[str, Any]) -> None:
    wrong = []
    for sql, ordered in SWEEP:
        try:
            check(world, sql, ordered=ordered)
        except AssertionError as exc:
            wrong.append(f"{sql}: {str(exc).splitlines()[0][:160]}")
        except Exception as exc:  # an untyped exception is a finding too
            wrong.append(f"{sql}: {type(exc).__module__}.{type(exc).__name__}: {str(exc)[:160]}")
    assert wrong == [], "\n".join(wrong)


# -- DELETE ... RETURNING racing an INSERT of the same e-mail ------------------------------------


@pytest.mark.timeout(240)
def test_delete_racing_a_signup_of_the_same_email_leaves_a_findable_owner(
    world: dict[str, Any],
) -> None:
    router: Router = world["router"]
    shard_of = router.topology.shard_for
    bad = []
    try:
        for round_ in range(80):
            a = 7_000_000 + round_ * 1000
            b = next(
                u for u in range(a + 1, a + 10_000) if shard_of("users", u) != shard_of("users", a)
            )
            email = f"swap{round_}@example.com"
            router.execute(INSERT_USER, {"u": a, "e": email})
            results = _race(
                router,
                [
                    lambda a=a: router.execute("DELETE FROM users WHERE user_id = :u", {"u": a}),
                    lambda b=b, email=email: router.execute(INSERT_USER, {"u": b, "e": email}),
                ],
            )
            live = [
                u
                for u in (a, b)
                if router.execute("SELECT 1 FROM users WHERE user_id = :u", {"u": u}).rows
            ]
            found = [
                r[0]
                for r in router.execute(
                    "SELECT user_id FROM users WHERE email = :e", {"e": email}
                ).rows
            ]
            lookup = [
                r[0]
                for r in router.execute(
                    "SELECT user_id FROM user_emails WHERE email = :e", {"e": email}
                ).rows
            ]
            if sorted(found) != sorted(live) or any(u not in live for u in lookup):
                bad.append((round_, live, found, lookup, [type(r).__name__ for r in results]))
    finally:
        _fresh_users(router, 0)
        for row in world["data"]["users"]:
            router.execute(
                "INSERT INTO users (user_id, email, name, tier, tag, score)"
                " VALUES (:user_id, :email, :name, :tier, :tag, :score)",
                row,
            )
    assert bad == []


def test_delete_with_limit_by_key_on_a_lookup_owner_is_routable(world: dict[str, Any]) -> None:
    """Now that the cleanup reads exactly the deleted rows (RETURNING), a one-target
    DELETE ... ORDER BY ... LIMIT of an owner needs no refusal (MariaDB returns the rows it
    deleted). Refused today: a refusal that costs users a rewrite, not a wrong answer."""
    router: Router = world["router"]
    user = world["data"]["orders"][0]["user_id"]
    ids = router.topology.id_generator("orders", worker_id=19)
    order_id = ids.next_id(user_id=user)
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
        " VALUES (:o, :u, 901, 5, 'zz')",
        {"o": order_id, "u": user},
    )
    result = router.execute(
        "DELETE FROM orders WHERE user_id = :u AND status = 'zz' ORDER BY order_id LIMIT 1",
        {"u": user},
    )
    assert result.rowcount == 1


def test_labels_are_the_statement_text_as_one_database_gives_them(world: dict[str, Any]) -> None:
    """One database labels an unaliased item with its text as written; the router renders the
    statement through sqlglot, so `count(*)` comes back as `COUNT(*)`, `amount_cents+1` as
    `amount_cents + 1` (point queries too): mappings() keys differ from one database's."""
    user = world["data"]["orders"][0]["user_id"]
    check(
        world,
        "SELECT amount_cents+1, count(*) FROM orders WHERE user_id = :u GROUP BY 1",
        {"u": user},
        ordered=False,
    )
    check(world, "SELECT avg(amount_cents), sum( amount_cents ) FROM orders")
    check(world, "SELECT ifnull(name, 'x') FROM users WHERE user_id = :u", {"u": user})


# -- XA with two shards on one server ------------------------------------------------------------


class _Crash(BaseException):
    """The coordinator process dies mid-commit."""


@pytest.mark.timeout(120)
def test_xa_recovery_with_two_shards_on_one_server(
    shard_databases: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two shards may be two databases of one MariaDB server (a small deployment). XA RECOVER
    lists the prepared branches of the whole server, so each of the two shards' scans finds
    both branches and recovery commits each twice: the second COMMIT fails (XAER_NOTA) and the
    committed transaction is reported in doubt, its decision row kept."""
    import yaml

    from shardrouter.core.config import config_from_dict
    from shardrouter.engine import xa

    raw = yaml.safe_load(Path(shard_databases).read_text())
    first = make_url(next(iter(raw["shards"].values()))["primary"])
    server = create_engine(first.set(database="").render_as_string(hide_password=False))
    with server.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS review_twin"))
        conn.execute(text("CREATE DATABASE review_twin"))
    twin = first.set(database="review_twin").render_as_string(hide_password=False)
    config = {
        "slots": 1024,
        "shards": {
            "a": {"primary": first.render_as_string(hide_password=False), "slots": [[0, 512]]},
            "b": {"primary": twin, "slots": [[512, 1024]]},
        },
        "tables": {"xa_rows": {"column": "user_id", "strategy": "hash"}},
    }
    topology = Topology(config_from_dict(config, env={}))
    ua = next(u for u in range(1, 999) if topology.shard_for("xa_rows", u) == "a")
    ub = next(u for u in range(1, 999) if topology.shard_for("xa_rows", u) == "b")
    try:
        with Router(topology, xa=True) as router:
            for engine in router.engines.primaries.values():
                with engine.begin() as conn:
                    conn.execute(text("DROP TABLE IF EXISTS xa_rows"))
                    conn.execute(
                        text("CREATE TABLE xa_rows (id BIGINT PRIMARY KEY, user_id BIGINT)")
                    )

            def commit_then_die(branches: Any, gtrid: str, decider: Any) -> None:
                lead = next(iter(branches))
                for shard, conn in branches.items():
                    conn.exec_driver_sql(f"XA END '{xa.xid(gtrid, shard, lead)}'")
                    conn.exec_driver_sql(f"XA PREPARE '{xa.xid(gtrid, shard, lead)}'")
                xa.record_decision(decider, gtrid)
                for conn in branches.values():
                    conn.invalidate()
                raise _Crash

            monkeypatch.setattr(xa, "commit", commit_then_die)
            with pytest.raises(_Crash), router.transaction() as tx:
                tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (1, :u)", {"u": ua})
                tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (2, :u)", {"u": ub})
            monkeypatch.undo()
            report = router.recover_xa(min_age_s=0)
            assert sorted(report.committed) and not report.in_doubt, report
            assert not report.rolled_back, report
    finally:
        with server.begin() as conn:
            for (xid,) in [r[3:4] for r in conn.execute(text("XA RECOVER"))]:
                if str(xid).startswith("sr-"):
                    conn.execute(text(f"XA ROLLBACK '{xid}'"))
            conn.execute(text("DROP DATABASE IF EXISTS review_twin"))
        server.dispose()


# -- multi-shard writes racing each other ----------------------------------------------------------


@pytest.mark.timeout(200)
def test_two_multi_shard_updates_of_the_same_rows_do_not_deadlock(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """One database runs two `UPDATE ... WHERE user_id IN (:a, :b)` one after the other. The
    router runs each shard's part in parallel, each in its own transaction, and commits only
    when every part is done: if each statement wins the row lock on a different shard, each
    waits for the other's commit, which no database can see (two servers), until the query
    timeout; both fail (reported as 'shard unavailable'). The writers wait for each other's
    locks (1 s at most, below the 1.5 s answer timeout)."""
    topology = _short_timeout_topology(shard_databases, 1.5, lock_wait=1)
    orders = world["data"]["orders"]
    a = orders[0]["user_id"]
    b = next(
        o["user_id"]
        for o in orders
        if topology.shard_for("orders", o["user_id"]) != topology.shard_for("orders", a)
    )
    sql = "UPDATE orders SET amount_cents = amount_cents WHERE user_id IN (:a, :b)"
    failures = []
    with Router(topology) as router:
        for _ in range(10):
            results = _race(
                router,
                [
                    lambda: router.execute(sql, {"a": a, "b": b}),
                    lambda: router.execute(sql, {"a": a, "b": b}),
                ],
            )
            failures += [type(r).__name__ for r in results if r is not None]
    assert failures == []


# -- a real password with special characters, end to end ---------------------------------------


@pytest.mark.timeout(120)
def test_routers_connect_with_a_password_holding_special_characters(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """Shard URLs are SQLAlchemy URL objects now (masked in every dump): the routers must still
    connect with the real password (sync, async, the lean read pool), percent-encoded in YAML."""
    from urllib.parse import quote

    import yaml

    from shardrouter.core.config import config_from_dict

    password = "p@ss:w/rd%#? 'x\""
    raw = yaml.safe_load(Path(shard_databases).read_text())
    for shard in raw["shards"].values():
        url = make_url(shard["primary"])
        admin = create_engine(url.render_as_string(hide_password=False))
        with admin.begin() as conn:
            conn.execute(text("DROP USER IF EXISTS 'rv'@'%'"))
            conn.execute(text("CREATE USER 'rv'@'%' IDENTIFIED BY :p"), {"p": password})
            conn.execute(text(f"GRANT ALL ON `{url.database}`.* TO 'rv'@'%'"))
        admin.dispose()
        shard["primary"] = (
            f"mysql+pymysql://rv:{quote(password, safe='')}@{url.host}:{url.port}/{url.database}"
        )
    topology = Topology(config_from_dict(raw, env={}))
    user = world["data"]["users"][3]
    point = "SELECT email FROM users WHERE user_id = :u"
    with Router(topology) as router:
        assert router.execute(point, {"u": user["user_id"]}).rows == [(user["email"],)]
        assert router.execute("SELECT COUNT(*) FROM users").scalar() == len(world["data"]["users"])
        shown = repr(topology.config) + str(topology.config.model_dump_json())
        assert "w/rd" not in shown and "p%40ss" not in shown

    async def run() -> Any:
        async with AsyncRouter(topology) as aio:
            return (await aio.execute(point, {"u": user["user_id"]})).rows

    assert asyncio.run(run()) == [(user["email"],)]


def test_utc_date_without_parentheses_is_not_sent_as_a_column(world: dict[str, Any]) -> None:
    """`UTC_DATE` (no parentheses) is MySQL's function; sqlglot reads it as a column and the
    router sends `UTC_DATE` in backticks: the shard answers "unknown column" (and as a time
    function it should not fan out either)."""
    user = world["data"]["users"][2]["user_id"]
    sql = "SELECT UTC_DATE AS d FROM users WHERE user_id = :u"
    _labels, expected = oracle_rows(world, sql, {"u": user})
    assert world["router"].execute(sql, {"u": user}).rows == expected


# -- the rendering: every accepted function computes what one database computes ------------------

EXPRESSIONS = [
    "CHAR_LENGTH('é€x')",
    "LENGTH('é€x')",
    "OCTET_LENGTH('é€x')",
    "BIT_LENGTH('é')",
    "'a\\_b' LIKE 'a\\_b'",
    "'axb' LIKE 'a\\_b'",
    "'a%b' LIKE 'a\\%b'",
    "'axb' LIKE 'a\\%b'",
    "'a|_b' LIKE 'a||_b' ESCAPE '|'",
    "'ab' REGEXP '^a'",
    "'ab' RLIKE 'b$'",
    "'ab' NOT REGEXP 'z'",
    "LOCATE('b', 'abcb')",
    "LOCATE('b', 'abcb', 3)",
    "SUBSTRING('abcdef', -3)",
    "SUBSTRING('abcdef' FROM 2 FOR 3)",
    "SUBSTRING('abcdef', 2)",
    "MID('abcdef', 2, 3)",
    "TRIM(LEADING 'x' FROM 'xxaxx')",
    "TRIM(BOTH 'x' FROM 'xxaxx')",
    "LPAD('7', 3, '0')",
    "TRUNCATE(12.345, 2)",
    "TRUNCATE(-12.345, 0)",
    "ROUND(2.5)",
    "ROUND(-2.5)",
    "ROUND(1.2345, 2)",
    "POWER(2, 10)",
    "LN(10)",
    "EXP(1)",
    "DATEDIFF('2026-03-01', '2026-01-01')",
    "TIMESTAMPDIFF(DAY, '2026-01-01', '2026-03-01')",
    "TIMESTAMPDIFF(MONTH, '2026-01-31', '2026-03-01')",
    "DATE_ADD('2026-01-31', INTERVAL 1 MONTH)",
    "DATE_SUB('2026-03-31', INTERVAL 1 MONTH)",
    "'2026-01-31' + INTERVAL 1 DAY",
    "TIMESTAMPADD(MINUTE, 90, '2026-01-01 00:00:00')",
    "WEEK('2026-01-04')",
    "WEEK('2026-01-04', 3)",
    "WEEKDAY('2026-01-04')",
    "DAYOFWEEK('2026-01-04')",
    "EXTRACT(YEAR_MONTH FROM '2026-05-04')",
    "EXTRACT(WEEK FROM '2026-01-04')",
    "DATE_FORMAT('2026-01-04 13:05:09.123456', '%D %x %v %X %V %U %u %a %b %c %e %j')",
    "DATE_FORMAT('2026-01-04 13:05:09.123456', '%k %l %p %r %T %S %s %f %h %I %i %W %w %M %m')",
    "STR_TO_DATE('04/01/2026 1:05 PM', '%d/%m/%Y %l:%i %p')",
    "FROM_UNIXTIME(86400, '%Y-%m-%d')",
    "UNIX_TIMESTAMP('2026-01-01 00:00:00')",
    "DATE('2026-01-04 13:05:09')",
    "TIME('2026-01-04 13:05:09')",
    "TIMESTAMP('2026-01-04')",
    "LAST_DAY('2026-02-10')",
    "QUARTER('2026-05-01')",
    "DAYOFYEAR('2026-02-01')",
    "DAYNAME('2026-01-04')",
    "YEAR('2026-01-04')",
    "DAY('2026-01-04')",
    "HOUR('13:05:09')",
    "FORMAT(1234567.891, 2)",
    "JSON_EXTRACT('{\"a\": [1, 2]}', '$.a[1]')",
    "JSON_UNQUOTE(JSON_EXTRACT('{\"a\": \"x\"}', '$.a'))",
    "JSON_OBJECT('k', 1)",
    "JSON_LENGTH('[1, 2, 3]')",
    "JSON_CONTAINS('[1, 2]', '2')",
    "SHA2('x', 256)",
    "SHA1('x')",
    "MD5('x')",
    "CRC32('x')",
    "TO_BASE64('x')",
    "HEX('x')",
    "UNHEX('41')",
    "CHAR(65, 66)",
    "ASCII('a')",
    "FIELD('b', 'a', 'b')",
    "STRCMP('a', 'B')",
    "CONCAT_WS('-', 'a', NULL, 'b')",
    "REPEAT('ab', 2)",
    "REVERSE('abc')",
    "REPLACE('aXa', 'X', 'y')",
    "LEFT('abc', 2)",
    "RIGHT('abc', 2)",
    "GREATEST(1, NULL, 3)",
    "LEAST('b', 'A', 'c')",
    "NULLIF(1, 1)",
    "IFNULL(NULL, 'x')",
    "COALESCE(NULL, NULL, 2)",
    "IF(1 > 2, 'a', 'b')",
    "CASE 2 WHEN 1 THEN 'one' WHEN 2 THEN 'two' END",
    "5 DIV 2",
    "-5 DIV 2",
    "5 MOD 3",
    "-5 % 3",
    "7 / 2",
    "1 / 3",
    "~0",
    "1 << 3",
    "6 & 3",
    "6 | 3",
    "6 ^ 3",
    "1 XOR 1",
    "NOT 0 BETWEEN 1 AND 2",
    "2 BETWEEN 1 AND 3 = 1",
    "1 = 1 = 1",
    "NULL <=> NULL",
    "1 IS TRUE",
    "NULL IS NOT FALSE",
    "CAST('12abc' AS SIGNED)",
    "CAST(-1 AS UNSIGNED)",
    "CAST(1.567 AS DECIMAL(5, 1))",
    "CAST('abcdef' AS CHAR(3))",
    "CONVERT('abc', CHAR(2))",
    "CAST('2026-01-04' AS DATE)",
    "CAST('2026-01-04 10:00' AS DATETIME)",
    "BINARY 'a' = 'A'",
    "'a' = 'A'",
    "'a' = 'a '",
    "'a' COLLATE utf8mb4_bin = 'A'",
    "'ß' = 'ss'",
    "CONVERT('é' USING latin1) = 'e'",
    "WEIGHT_STRING('ab')",
    "SQRT(2)",
    "SIGN(-3)",
    "ABS(-3)",
    "CEIL(1.2)",
    "FLOOR(-1.2)",
    "1e3",
    ".5 + 5.",
    "0x41",
    "X'41'",
    "'it''s'",
    "'back\\\\slash'",
    "'tab\\tx'",
    '"dq"',
    "'a' 'b'",
    "DATE_FORMAT('2026-01-04', '%Y%m%d') + 0",
    "CONVERT_TZ('2026-01-01 00:00:00', '+00:00', '+02:00')",
]


@pytest.mark.timeout(300)
def test_accepted_expressions_compute_what_one_database_computes(world: dict[str, Any]) -> None:
    user = world["data"]["users"][2]["user_id"]
    wrong = []
    for expr in EXPRESSIONS:
        sql = f"SELECT {expr} AS v FROM users WHERE user_id = :u"
        try:
            _labels, expected = oracle_rows(world, sql, {"u": user})
        except Exception as exc:
            wrong.append(f"ORACLE {expr}: {type(exc).__name__}")
            continue
        try:
            got = _norm(world["router"].execute(sql, {"u": user}).rows)
        except ShardRouterError as exc:
            if "not routed" in str(exc) or "not supported" in str(exc):
                continue  # a refusal by the planner: allowed
            wrong.append(f"{expr}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        except Exception as exc:
            wrong.append(f"{expr}: UNTYPED {type(exc).__name__}: {str(exc)[:120]}")
            continue
        if got != expected:
            wrong.append(f"{expr}: got {got!r}, one database {expected!r}")
    assert wrong == [], "\n".join(wrong)


def test_functions_docs_list_as_accepted_are_accepted(world: dict[str, Any]) -> None:
    """docs/SQL.md lists JSON_EXTRACT and STR_TO_DATE as accepted everywhere; with a real path
    or a format holding a time, the planner refuses them (JSONPath / StrToTime nodes are not in
    its tables). Refusals one database does not make: they cost a rewrite, not data."""
    user = world["data"]["users"][2]["user_id"]
    for expr in (
        "JSON_EXTRACT('{\"a\": [1, 2]}', '$.a[1]')",
        "STR_TO_DATE('04/01/2026 1:05 PM', '%d/%m/%Y %l:%i %p')",
    ):
        sql = f"SELECT {expr} AS v FROM users WHERE user_id = :u"
        _labels, expected = oracle_rows(world, sql, {"u": user})
        assert _norm(world["router"].execute(sql, {"u": user}).rows) == expected, expr


def test_cli_json_errors_are_json(tmp_path: Any) -> None:
    """With --json, `check lookups` and `schema apply` answer an error with JSON on stdout;
    `route`, `ids new` and `schema status` print nothing there (text on stderr only), so a
    script reading stdout gets an empty document."""
    import json
    import subprocess
    import sys

    import yaml

    doc = yaml.safe_load(Path("config/orders.yaml").read_text())
    for i, shard in enumerate(doc["shards"].values()):
        shard["primary"] = f"mysql+pymysql://root:pw@127.0.0.1:{3990 + i}/orders_s{i}"
    dead = tmp_path / "dead.yaml"
    dead.write_text(yaml.safe_dump(doc, sort_keys=False))
    bad = []
    for args in (
        ["check", "lookups", "--json", "--config", str(dead)],
        ["schema", "status", "--json", "--config", str(dead)],
        ["route", "--json", "--config", str(dead), "--table", "nope", "--key", "user_id=5"],
        ["ids", "new", "--json", "--config", str(dead), "--table", "countries", "--key", "c=1"],
        ["config", "validate", "--json", str(tmp_path / "missing.yaml")],
    ):
        done = subprocess.run(
            [sys.executable, "-c", "from shardrouter.cli import main; main()", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        try:
            json.loads(done.stdout)
        except ValueError:
            bad.append((" ".join(args[:2]), done.returncode, done.stdout[:80]))
    assert bad == []
