"""Review 11 of online resharding: reproductions on real MariaDB (the session sandbox) of what
the code added after review 10 gets wrong: the lookup cleanup's owner check (OwnerCheck), the
lookup route kept to the owners on a shard holding copies (Target.only), the copies' guard of a
mirror's own rows (journal.guard_own_rows), SHADOW reads, and drain.

Clusters come from reshard_cluster.review_clusters (databases rv11_<tag>_...): fresh databases
per test on the sandbox's servers, a meta store, the orders schema (plus a test's own tables),
a 2-shard "before" version (s0 owns [0, 512), s1 [512, 1024)); s2 and s3 are defined for plans
that add them.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import (
    SCHEMA,
    MakeReviewCluster,
    ReviewCluster,
    drop_database,
    fresh_database,
    review_clusters,
    users_in,
    values_in,
)
from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


# --------------------------------------------------------------------------- the cluster


@pytest.fixture
def make_cluster(shard_databases: Path, sandbox: Any) -> Iterator[MakeReviewCluster]:
    with review_clusters(shard_databases, sandbox, "rv11") as make:
        yield make


@pytest.fixture
def oracle_db(sandbox: Any) -> Iterator[Engine]:
    """One unsharded database with the orders schema (logical names): what the statements
    answer without shards and without a migration."""
    url = fresh_database(sandbox.shards[0].url, "rv11_oracle")
    engine = create_engine(url)
    with engine.begin() as conn:
        for statement in SCHEMA.read_text().split(";"):
            lines = [ln for ln in statement.splitlines() if not ln.strip().startswith("--")]
            if "".join(lines).strip():
                conn.exec_driver_sql("\n".join(lines))
    try:
        yield engine
    finally:
        engine.dispose()
        drop_database(url)


# --------------------------------------------------------------------------- Target.only

M1, M2, M3 = 101, 202, 303
ITEM = (
    "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents)"
    " VALUES (:o, :l, :u, :s, :q, :p)"
)
ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
    " VALUES (:o, :u, :m, :st, :a, :c)"
)
USER = "INSERT INTO users (user_id, email, name) VALUES (:u, :e, :n)"


@dataclass
class Shop:
    movers: list[int]
    stayers: list[int]
    others: list[int]
    orders: dict[int, list[int]]

    @property
    def users(self) -> list[int]:
        return self.movers + self.stayers + self.others


def _both(router: Any, oracle: Engine, sql: str, params: dict[str, Any]) -> None:
    router.execute(sql, params)
    with oracle.begin() as conn:
        conn.exec_driver_sql(_pyformat(sql), params)


def _pyformat(sql: str) -> str:
    return re.sub(r"(?<![:\w]):(\w+)", r"%(\1)s", sql)


def _shop(c: ReviewCluster, oracle: Engine, target_range: tuple[int, int]) -> Shop:
    """Users moving (slots [0, 128)), staying on s0, and on s1 (``target_range``: their
    slots), two orders each (merchants M1 and M2 by turns), two items per order."""
    topology = c.topology()
    movers = users_in(topology, 0, 128, 4)
    stayers = users_in(topology, 128, 512, 4)
    others = users_in(topology, *target_range, 4)
    shop = Shop(movers, stayers, others, {})
    router = c.router()
    try:
        n = 0
        for u in shop.users:
            _both(router, oracle, USER, {"u": u, "e": f"U{u}@Example.com", "n": f"name{u}"})
            slot = topology.slot_for("orders", u)
            for _k in range(2):
                n += 1
                order = int(topology.id_layout.compose(n, slot, 1, 0))
                shop.orders.setdefault(u, []).append(order)
                created = dt.datetime(2026, 1, 1) + dt.timedelta(minutes=n)
                params = {"o": order, "u": u, "m": (M1, M2)[n % 2], "st": "new"}
                _both(router, oracle, ORDER, {**params, "a": 100 * n, "c": created})
                for line in (1, 2):
                    item = {"o": order, "l": line, "u": u, "s": f"sku{n}-{line}", "q": line}
                    _both(router, oracle, ITEM, {**item, "p": 10 * n})
    finally:
        router.close()
    return shop


def _norm(rows: Any) -> list[tuple[Any, ...]]:
    from decimal import Decimal

    def one(v: Any) -> Any:
        if isinstance(v, Decimal) and v == v.to_integral_value():
            return int(v)
        if isinstance(v, float) and v.is_integer():
            return int(v)
        return v

    return [tuple(one(v) for v in r) for r in rows]


SHAPES: list[tuple[str, str, dict[str, Any]]] = [
    ("plain", "SELECT order_id, status FROM orders WHERE merchant_id = :m", {"m": M1}),
    ("alias", "SELECT o.order_id, o.status FROM orders o WHERE o.merchant_id = :m", {"m": M1}),
    ("alias-as", "SELECT o.order_id FROM orders AS o WHERE merchant_id = :m", {"m": M1}),
    ("star", "SELECT * FROM orders WHERE merchant_id = :m", {"m": M2}),
    (
        "qualified",
        "SELECT orders.order_id, orders.status FROM orders WHERE orders.merchant_id = :m",
        {"m": M1},
    ),
    (
        "join-items",
        "SELECT o.order_id, i.sku, o.status FROM orders o JOIN order_items i"
        " ON i.order_id = o.order_id WHERE o.merchant_id = :m",
        {"m": M1},
    ),
    (
        "join-items-first",
        "SELECT o.order_id, i.sku, o.status FROM order_items i JOIN orders o"
        " ON i.order_id = o.order_id WHERE o.merchant_id = :m",
        {"m": M1},
    ),
    (
        "join-unaliased",
        "SELECT orders.order_id, order_items.sku FROM orders JOIN order_items"
        " ON order_items.order_id = orders.order_id WHERE orders.merchant_id = :m",
        {"m": M2},
    ),
    (
        "left-join-users",
        "SELECT o.order_id, u.name FROM orders o LEFT JOIN users u ON u.user_id = o.user_id"
        " WHERE o.merchant_id = :m",
        {"m": M1},
    ),
    (
        "group-by",
        "SELECT status, COUNT(*), SUM(amount_cents) FROM orders WHERE merchant_id = :m"
        " GROUP BY status",
        {"m": M1},
    ),
    ("count", "SELECT COUNT(*) FROM orders WHERE merchant_id = :m", {"m": M1}),
    ("count-none", "SELECT COUNT(*) FROM orders WHERE merchant_id = :m", {"m": M3}),
    ("max", "SELECT MAX(amount_cents), MIN(status) FROM orders WHERE merchant_id = :m", {"m": M1}),
    ("avg", "SELECT AVG(amount_cents) FROM orders WHERE merchant_id = :m", {"m": M1}),
    (
        "order-limit",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m ORDER BY order_id DESC LIMIT 3",
        {"m": M1},
    ),
    (
        "order-offset",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m"
        " ORDER BY amount_cents LIMIT 3 OFFSET 2",
        {"m": M2},
    ),
    (
        "order-created",
        "SELECT order_id FROM orders WHERE merchant_id = :m ORDER BY created_at, order_id",
        {"m": M2},
    ),
    (
        "in-merchants",
        "SELECT order_id, status FROM orders WHERE merchant_id IN (:m, :m2)",
        {"m": M1, "m2": M2},
    ),
    (
        "in-merchants-count",
        "SELECT merchant_id, COUNT(*) FROM orders WHERE merchant_id IN (:m, :m2, :m3)"
        " GROUP BY merchant_id",
        {"m": M1, "m2": M2, "m3": M3},
    ),
    ("distinct-users", "SELECT DISTINCT user_id FROM orders WHERE merchant_id = :m", {"m": M1}),
    (
        "and-status",
        "SELECT order_id FROM orders WHERE merchant_id = :m AND status = 'paid'",
        {"m": M1},
    ),
    (
        "or-status",
        "SELECT order_id FROM orders WHERE merchant_id = :m AND (status = 'paid' OR amount_cents"
        " > 500)",
        {"m": M1},
    ),
    (
        "having",
        "SELECT user_id, COUNT(*) FROM orders WHERE merchant_id = :m GROUP BY user_id"
        " HAVING COUNT(*) >= 1",
        {"m": M2},
    ),
    (
        "derived",
        "SELECT COUNT(*) FROM (SELECT order_id FROM orders WHERE merchant_id = :m) t",
        {"m": M1},
    ),
    (
        "derived-rows",
        "SELECT t.order_id, t.status FROM (SELECT order_id, status FROM orders"
        " WHERE merchant_id = :m) AS t",
        {"m": M1},
    ),
    (
        "in-subquery",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m AND order_id IN"
        " (SELECT order_id FROM order_items WHERE qty > 1)",
        {"m": M1},
    ),
    (
        "exists",
        "SELECT o.order_id, o.status FROM orders o WHERE o.merchant_id = :m AND EXISTS"
        " (SELECT 1 FROM order_items i WHERE i.order_id = o.order_id AND i.line = 2)",
        {"m": M1},
    ),
    (
        "scalar-subquery",
        "SELECT order_id, (SELECT COUNT(*) FROM order_items i WHERE i.order_id = orders.order_id)"
        " FROM orders WHERE merchant_id = :m",
        {"m": M1},
    ),
    (
        "union",
        "SELECT order_id FROM orders WHERE merchant_id = :m UNION SELECT order_id FROM orders"
        " WHERE merchant_id = :m2",
        {"m": M1, "m2": M2},
    ),
    (
        "union-users",
        "SELECT order_id FROM orders WHERE merchant_id = :m UNION ALL SELECT user_id FROM users"
        " WHERE user_id = :u",
        {"m": M1, "u": 1},
    ),
    (
        "email",
        "SELECT user_id, name FROM users WHERE email = :e",
        {"e": "mover"},
    ),
    (
        "email-alias",
        "SELECT u.user_id, u.name FROM users u WHERE u.email = :e",
        {"e": "mover"},
    ),
    (
        "email-in",
        "SELECT user_id, name FROM users WHERE email IN (:e, :e2)",
        {"e": "mover", "e2": "stayer"},
    ),
    (
        "email-case",
        "SELECT user_id, name FROM users WHERE email = :e",
        {"e": "MOVER"},
    ),
    (
        "email-join-orders",
        "SELECT u.user_id, o.order_id FROM users u JOIN orders o ON o.user_id = u.user_id"
        " WHERE u.email = :e",
        {"e": "mover"},
    ),
    (
        "for-update",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m FOR UPDATE",
        {"m": M1},
    ),
    (
        "lock-in-share",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m LOCK IN SHARE MODE",
        {"m": M2},
    ),
]


def _resolve(shop: Shop, params: dict[str, Any]) -> dict[str, Any]:
    names = {
        "mover": f"U{shop.movers[0]}@Example.com",
        "MOVER": f"u{shop.movers[0]}@example.COM",
        "stayer": f"U{shop.stayers[0]}@Example.com",
    }
    return {k: names.get(v, v) if isinstance(v, str) else v for k, v in params.items()}


def _answers(run: Callable[[str, dict[str, Any]], Any], shop: Shop) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, sql, params in SHAPES:
        try:
            rows = _norm(run(sql, _resolve(shop, params)))
            out[name] = rows if "ORDER BY" in sql else sorted(rows, key=repr)
        except ShardRouterError as exc:
            out[name] = f"refused {type(exc).__name__}"
        except Exception as exc:
            out[name] = f"ERROR {type(exc).__name__}: {str(exc)[:160]}"
    return out


def _oracle_rows(oracle: Engine) -> Callable[[str, dict[str, Any]], Any]:
    def run(sql: str, params: dict[str, Any]) -> Any:
        with oracle.begin() as conn:
            return conn.exec_driver_sql(_pyformat(sql), params).all()

    return run


def _stale_writes(router: Router, oracle: Engine, shop: Shop) -> None:
    """Change the moving users' orders where they are owned now: their copies go stale."""
    for u in shop.movers:
        for o in shop.orders[u]:
            _both(
                router,
                oracle,
                "UPDATE orders SET status = 'paid', amount_cents = amount_cents + 1"
                " WHERE order_id = :o",
                {"o": o},
            )


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", ["after-switch", "before-switch"])
def test_rv11_held_lookup_route_shapes_on_a_mirrored_shard_answer_as_one_database(
    make_cluster: MakeReviewCluster, oracle_db: Engine, stage: str
) -> None:
    """Held (Target.only): every statement shape of SHAPES by merchant_id / email, run while
    a shard holds stale copies (after the switch: the source; before it: a target serving
    slots of its own), answers as one unsharded database with the same writes (the oracle),
    or is refused typed exactly as it is without a migration; never an untyped error."""
    c = make_cluster("only" + stage[0])
    to = "s2" if stage == "after-switch" else "s1"
    shop = _shop(c, oracle_db, (512, 1024))
    router = c.router()
    try:
        base = _answers(lambda s, p: router.execute(s, p).rows, shop)
    finally:
        router.close()
    c.move((0, 128), to, "m-only")
    actions = (
        ("start", "copy", "verify", "switch") if stage == "after-switch" else ("start", "copy")
    )
    c.run("m-only", *actions)
    router = c.router()
    try:
        _stale_writes(router, oracle_db, shop)
        during = _answers(lambda s, p: router.execute(s, p).rows, shop)
    finally:
        router.close()
    oracle = _answers(_oracle_rows(oracle_db), shop)
    wrong = {
        name: (during[name], oracle[name])
        for name, _, _ in SHAPES
        if during[name] != oracle[name]
        and not (isinstance(during[name], str) and during[name] == base[name])
    }
    untyped = {n: a for n, a in during.items() if isinstance(a, str) and a.startswith("ERROR")}
    assert not wrong and not untyped, (wrong, untyped)


WRITES: list[tuple[str, str, dict[str, Any]]] = [
    ("upd", "UPDATE orders SET status = 'w1' WHERE merchant_id = :m", {"m": M1}),
    ("upd-alias", "UPDATE orders o SET o.status = 'w2' WHERE o.merchant_id = :m", {"m": M2}),
    (
        "upd-in",
        "UPDATE orders SET amount_cents = amount_cents + 1 WHERE merchant_id IN (:m, :m2)",
        {"m": M1, "m2": M2},
    ),
    (
        "upd-order-limit",
        "UPDATE orders SET status = 'w3' WHERE merchant_id = :m ORDER BY order_id LIMIT 100",
        {"m": M1},
    ),
    (
        "upd-join",
        "UPDATE orders o JOIN order_items i ON i.order_id = o.order_id SET i.qty = i.qty + 10"
        " WHERE o.merchant_id = :m",
        {"m": M1},
    ),
    (
        "upd-join-items-first",
        "UPDATE order_items i JOIN orders o ON i.order_id = o.order_id SET i.qty = i.qty + 100"
        " WHERE o.merchant_id = :m",
        {"m": M2},
    ),
    (
        "upd-subquery",
        "UPDATE orders SET status = 'w4' WHERE merchant_id = :m AND order_id IN"
        " (SELECT order_id FROM order_items WHERE line = 2)",
        {"m": M2},
    ),
    ("upd-email", "UPDATE users SET name = 'w5' WHERE email = :e", {"e": "stayer"}),
    (
        "del-order-limit",
        "DELETE FROM orders WHERE merchant_id = :m ORDER BY amount_cents DESC LIMIT 100",
        {"m": M3},
    ),
    (
        "del-multi",
        "DELETE o FROM orders o WHERE o.merchant_id = :m AND o.amount_cents > 2000",
        {"m": M2},
    ),
    (
        "del-items-join",
        "DELETE i FROM order_items i JOIN orders o ON o.order_id = i.order_id"
        " WHERE o.merchant_id = :m AND i.line = 2",
        {"m": M1},
    ),
    ("del", "DELETE FROM orders WHERE merchant_id = :m AND amount_cents < 400", {"m": M1}),
]


def _owner_view(run: Callable[[str, dict[str, Any]], Any], shop: Shop) -> dict[str, Any]:
    view: dict[str, Any] = {}
    for u in shop.users:
        for table, cols in (
            ("orders", "*"),
            ("order_items", "*"),
            ("users", "user_id, email, name"),
        ):
            rows = run(f"SELECT {cols} FROM {table} WHERE user_id = :u", {"u": u})
            view[f"{table}:{u}"] = sorted(_norm(rows), key=repr)
    return view


def _copies(c: ReviewCluster, mirror: str, shop: Shop) -> list[tuple[Any, ...]]:
    users = ", ".join(str(u) for u in shop.movers)
    found: list[tuple[Any, ...]] = []
    for table in [f"orders_{i:04d}" for i in range(4)] + [f"order_items_{i:04d}" for i in range(4)]:
        found += [
            (table, *r) for r in c.rows(mirror, f"SELECT * FROM {table} WHERE user_id IN ({users})")
        ]
    found += [
        ("users", *r) for r in c.rows(mirror, f"SELECT * FROM users WHERE user_id IN ({users})")
    ]
    return sorted(found, key=repr)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("stage", ["after-switch", "before-switch"])
def test_rv11_held_lookup_route_writes_on_a_mirrored_shard_leave_the_copies_alone(
    make_cluster: MakeReviewCluster, oracle_db: Engine, stage: str
) -> None:
    """Held (Target.only): every write of WRITES by merchant_id / email (aliases, IN lists,
    multi-table UPDATE and DELETE joined to the bound order_items, ORDER BY ... LIMIT) run
    while a shard holds copies changes what one database changes (rowcount, every owner's
    rows) and never a copy, or is refused typed."""
    c = make_cluster("onlyw" + stage[0])
    to = "s2" if stage == "after-switch" else "s1"
    mirror = "s0" if stage == "after-switch" else "s1"
    shop = _shop(c, oracle_db, (512, 1024))
    c.move((0, 128), to, "m-onlyw")
    actions = (
        ("start", "copy", "verify", "switch") if stage == "after-switch" else ("start", "copy")
    )
    c.run("m-onlyw", *actions)
    problems = []
    router = c.router()
    oracle = _oracle_rows(oracle_db)
    try:
        _stale_writes(router, oracle_db, shop)
        copies = _copies(c, mirror, shop)
        for name, sql, params in WRITES:
            p = _resolve(shop, params)
            try:
                got: Any = router.execute(sql, p).rowcount
            except ShardRouterError:
                continue  # refused typed, nothing ran
            except Exception as exc:
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            with oracle_db.begin() as conn:
                want = conn.exec_driver_sql(_pyformat(sql), p).rowcount
            mine = _owner_view(lambda s, q: router.execute(s, q).rows, shop)
            theirs = _owner_view(oracle, shop)
            diff = [k for k in mine if mine[k] != theirs[k]]
            now = _copies(c, mirror, shop)
            if got != want or diff or now != copies:
                problems.append(
                    f"{name}: rowcount {got}/{want}, differs {diff}, copies changed {now != copies}"
                )
            copies = now
    finally:
        router.close()
    assert not problems, problems


# --------------------------------------------------------------------------- OwnerCheck


def _with_driver(doc: dict[str, Any], drivername: str) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    for shard in out["shards"].values():
        url = make_url(shard["primary"]).set(drivername=drivername)
        shard["primary"] = url.render_as_string(hide_password=False)
    return out


def _processlist(engine: Engine, like: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.exec_driver_sql(
                "SELECT COUNT(*) FROM information_schema.processlist WHERE info LIKE %s", (like,)
            ).scalar_one()
        )


def _until(condition: Callable[[], bool], what: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    "drivername", ["mysql+pymysql", "mariadb+pymysql", "mysql+mysqldb", "mariadb+mysqldb"]
)
def test_rv11_the_owner_check_waits_for_an_owner_in_flight_on_a_mariadb_url(
    make_cluster: MakeReviewCluster, drivername: str
) -> None:
    """The lookup cleanup's owner check must never wait for a ROW lock (execution.OwnerCheck,
    together_order: "a discard's check waits for no row lock", which is what keeps the global
    lock order deadlock-free while a discard holds its deleted lookup rows): an owner whose
    insert is in flight holds its row, and the check counts it as present at once. OwnerCheck
    gets that from a compile hook registered for the dialect NAME "mysql"
    (``@compiles(OwnerCheck, "mysql")``), but SQLAlchemy dispatches ext.compiler hooks on
    ``dialect.name`` exactly, and a ``mariadb+pymysql://`` / ``mariadb+mysqldb://`` URL (which
    the config accepts: "use a mysql+<driver>:// or mariadb+<driver>:// URL") has the dialect
    name "mariadb": the check compiles as a plain ``LOCK IN SHARE MODE`` (no SET STATEMENT
    innodb_lock_wait_timeout=0, no NOWAIT) and waits for the row lock, up to the session's
    innodb_lock_wait_timeout, with the cleanup's lookup rows locked meanwhile. Here a user's
    DELETE returns only when an unrelated transaction holding the owner row ends (6 s later)
    instead of at once. Expected: the same as on a mysql+ URL (the check fails at once)."""
    c = make_cluster("own" + drivername.replace("+", "")[:9])
    doc = _with_driver(c.current(), drivername)
    router = Router(Topology(config_from_dict(doc)))
    topology = router.topology
    user, email = 4242, "inflight@example.com"
    owner = c.engine(topology.shard_for("users", user))
    lookup = c.engine(topology.shard_for("user_emails", email))
    lookup_table = topology.table("user_emails").physical(topology.slot_for("user_emails", email))
    router.execute(USER, {"u": user, "e": email, "n": "one"})
    locker = lookup.connect()  # holds the lookup row: the cleanup's DELETE waits there
    holder = owner.connect()  # then an owner insert in flight holds the owner's row
    outcome: dict[str, Any] = {}

    def delete() -> None:
        try:
            outcome["rowcount"] = router.execute(
                "DELETE FROM users WHERE user_id = :u", {"u": user}
            ).rowcount
        except Exception as exc:
            outcome["error"] = exc
        outcome["done"] = time.monotonic()

    deleting = threading.Thread(target=delete)
    try:
        locker.exec_driver_sql(
            f"SELECT * FROM {lookup_table} WHERE email = %s FOR UPDATE", (email,)
        )
        deleting.start()
        _until(
            lambda: _processlist(lookup, f"DELETE FROM {lookup_table}%") > 0,
            "the cleanup waits for the lookup row",
        )
        holder.exec_driver_sql(
            "INSERT INTO users (user_id, email, name) VALUES (%s, %s, 'again')", (user, email)
        )
        released = time.monotonic()
        locker.rollback()  # the cleanup goes on: its owner check meets the row in flight
        deleting.join(6)
        waited = outcome.get("done", time.monotonic()) - released
        holder.rollback()
        deleting.join(30)
    finally:
        locker.close()
        holder.close()
        deleting.join(30)
        router.close()
    assert outcome.get("rowcount") == 1, outcome
    assert waited < 3, (
        f"{drivername}: the DELETE's lookup cleanup waited {waited:.1f} s for a row lock held"
        " by an owner insert in flight (its owner check must not wait for row locks)"
    )


# --------------------------------------------------------------------------- guard_own_rows


def test_rv11_a_move_onto_a_serving_shard_overwrites_its_row_with_an_equal_integer_key(
    make_cluster: MakeReviewCluster,
) -> None:
    """journal.guard_own_rows refuses a copy over a mirror's OWN row only for text keys
    ("Other key types cannot compare equal with different slots"). That holds only when the
    key contains the sharding column. A table sharded by account_id whose primary key is its
    own id (per-shard AUTO_INCREMENT, or any id not derived from the account) holds id 1 on
    s0 (an account of the moving slots) and id 1 on s1 (an account s1 owns, not moving):
    nothing in the router or the plan forbids it. A move onto s1 upserts the moving row
    (INSERT ... ON DUPLICATE KEY UPDATE) over s1's own row, verify compares the moving slots
    only (equal), and after the switch s1's own account has lost its row for good. Expected:
    the collision refused typed before anything is overwritten (as for a text key), or both
    rows kept."""
    ddl = (
        "CREATE TABLE rv11_notes (id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,"
        " account_id BIGINT NOT NULL, v VARCHAR(16) NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    tables = {"rv11_notes": {"column": "account_id", "strategy": "hash"}}
    c = make_cluster("intkey", tables, ddl)
    topology = c.topology()
    moving = values_in(topology, "rv11_notes", 0, 128, 1, range(1, 10**6))[0]
    own = values_in(topology, "rv11_notes", 512, 1024, 1, range(1, 10**6))[0]
    router = c.router()
    try:  # each shard numbers its own rows: both get id 1
        router.execute(
            "INSERT INTO rv11_notes (account_id, v) VALUES (:a, 'moving')", {"a": moving}
        )
        router.execute("INSERT INTO rv11_notes (account_id, v) VALUES (:a, 'own')", {"a": own})
    finally:
        router.close()
    assert c.rows("s0", "SELECT id FROM rv11_notes") == c.rows("s1", "SELECT id FROM rv11_notes")
    c.move((0, 128), "s1", "m-int")
    refused: Exception | None = None
    try:
        c.run("m-int", "start", "copy", "verify", "switch")
    except ShardRouterError as exc:
        refused = exc
    held = c.rows("s1", "SELECT account_id, v FROM rv11_notes ORDER BY account_id")
    assert (own, "own") in held, f"refused: {refused}; s1 holds {held}: its own row is gone"


# --------------------------------------------------------------------------- SHADOW reads


def _shadow_topology(c: ReviewCluster, percent: int = 100) -> Topology:
    doc = c.current()
    assert doc["moving"], "the migration's copy stage is current"
    for entry in doc["moving"]:
        entry["shadow_percent"] = percent
    return Topology(config_from_dict(doc))


def _settled(stats: Callable[[], dict[str, dict[str, int]]], mid: str) -> dict[str, int]:
    deadline = time.monotonic() + 15
    last = stats().get(mid, {})
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = stats().get(mid, {})
        if now == last:
            return now
        last = now
    raise AssertionError(f"shadow counters never settled: {last}")


@pytest.mark.parametrize("reuse", ["params", "rows"])
def test_rv11_a_shadow_read_compares_what_the_caller_changed_after_the_answer(
    make_cluster: MakeReviewCluster, reuse: str
) -> None:
    """A shadow read keeps references, not copies: ShadowRead.params is the caller's own
    params dict (Router.execute passes a str statement's mapping through as it is) and
    ShadowRead.rows is the very list the caller gets as ResultSet.rows (the point query hands
    result.rows on). The comparison runs later on the worker thread, so a caller that reuses
    its params dict for the next read (``p["u"] = next_user``: the common loop) or works on
    the rows it got (``rows.sort()``, ``rows.clear()``, ``pop()``) changes what is compared:
    the target is read for another key, or against rows that are no longer the answer. Every
    such read, equal on both sides, is counted as not equal (lagged here; differed when the
    dict changes between a recheck's two reads). Expected: each read compared as it was
    answered: every read equal (the target is fully drained, nothing is written)."""
    c = make_cluster("shparams")
    topology = c.topology()
    users = users_in(topology, 0, 128, 8)
    router = c.router()
    try:
        for u in users:
            router.execute(USER, {"u": u, "e": f"sh{u}@example.com", "n": f"n{u}"})
    finally:
        router.close()
    c.move((0, 128), "s2", "m-sh")
    c.run("m-sh", "start", "copy", "verify")
    router = Router(_shadow_topology(c))
    try:
        params: dict[str, Any] = {}
        for u in users:
            params["u"] = u  # one dict, reused read after read
            got = router.execute("SELECT user_id, name FROM users WHERE user_id = :u", params)
            assert got.rows == [(u, f"n{u}")]
            if reuse == "rows":
                params = {}
                got.rows.clear()  # the caller is done with its rows
        if reuse == "params":
            params["u"] = 0  # the caller moves on: a user that does not exist
        counts = _settled(lambda: router.shadow_stats, "m-sh")
    finally:
        router.close()
    assert counts["compared"] == len(users), counts
    assert counts["equal"] == len(users), counts


@pytest.mark.timeout(120)
@pytest.mark.parametrize("percent", [0, 100], ids=["control-no-shadow", "shadow"])
def test_rv11_async_shadow_reads_take_the_targets_pool_from_its_own_requests(
    make_cluster: MakeReviewCluster, percent: int
) -> None:
    """engine.shadow promises the comparison "never delays or changes an answer: it runs on a
    worker ..., bounded". Router's worker is one thread (one connection at a time); the
    AsyncRouter's is one task per read, up to QUEUE (256) at once, each taking a connection
    of the shard's ordinary pool (AsyncRouter._shadow_rows: snap.engines.primary(shard)),
    which holds size + max_overflow (15 by default). When the target is slow to answer a
    table (here: a DDL waiting for its metadata lock behind a long transaction, which queues
    every read of that table on it), the shadow tasks hold every connection of the target's
    pool, and a move onto a serving shard makes that pool the one the target's OWN requests
    use for writes (reads go through the lean read pool): a write to another table there,
    which nothing blocks, waits for a pooled connection until the pool timeout and fails.
    Expected: the service's write done at once (shadow reads bounded to a few connections,
    or given their own)."""
    c = make_cluster(f"shpool{percent}")
    topology = c.topology()
    movers = users_in(topology, 0, 128, 30)
    own = users_in(topology, 512, 1024, 1)[0]
    router = c.router()
    try:
        for u in [*movers, own]:
            router.execute(USER, {"u": u, "e": f"p{u}@example.com", "n": f"n{u}"})
        order = int(topology.id_layout.compose(1, topology.slot_for("orders", own), 1, 0))
        router.execute(
            ORDER, {"o": order, "u": own, "m": 9, "st": "new", "a": 1, "c": dt.datetime(2026, 1, 1)}
        )
    finally:
        router.close()
    c.move((0, 128), "s1", "m-pool")
    c.run("m-pool", "start", "copy", "verify")
    doc = _shadow_topology(c, percent).config.model_dump(mode="json")
    doc["shards"]["s1"]["pool"] = {"timeout_s": 3.0}
    shadowed = Topology(config_from_dict(doc))
    blocker = c.engine("s1").connect()
    ddl_engine = create_engine(c.four["shards"]["s1"]["primary"])
    ddl_error: list[BaseException] = []

    def alter() -> None:
        try:
            with ddl_engine.connect() as conn:
                conn.exec_driver_sql("SET SESSION lock_wait_timeout = 20")
                conn.exec_driver_sql("ALTER TABLE users COMMENT = 'rv11'")
        except Exception as exc:
            ddl_error.append(exc)

    ddl = threading.Thread(target=alter)

    async def main() -> tuple[float, str]:
        from shardrouter.engine.aio import AsyncRouter

        router = AsyncRouter(shadowed)
        try:
            for u in movers:  # answered from s0 at once; each also queues a shadow read on s1
                assert len((await router.execute(READ_USER, {"u": u})).rows) == 1
            await asyncio.sleep(0.5)
            started = time.monotonic()
            try:  # s1's own order: orders is not locked, only users is
                changed = (await router.execute(PAY_ORDERS, {"u": own})).rowcount
                outcome = f"rowcount {changed}"
            except Exception as exc:
                outcome = f"{type(exc).__name__}: {exc}"[:200]
            took = time.monotonic() - started
            blocker.rollback()  # the DDL goes on, the shadow reads end
            return took, outcome
        finally:
            await router.close()

    try:
        blocker.exec_driver_sql("SELECT COUNT(*) FROM users").all()  # holds users' MDL
        ddl.start()
        _until(lambda: _processlist(c.engine("s1"), "ALTER TABLE users%") > 0, "the DDL waits", 10)
        time.sleep(0.3)
        took, outcome = asyncio.run(main())
    finally:
        blocker.rollback()
        blocker.close()
        ddl.join(30)
        ddl_engine.dispose()
    assert took < 1.0 and outcome == "rowcount 1", f"s1's own write took {took:.1f} s: {outcome}"


READ_USER = "SELECT user_id, name FROM users WHERE user_id = :u"
PAY_ORDERS = "UPDATE orders SET status = 'paid' WHERE user_id = :u"
