"""The data movers of online resharding (shardrouter.reshard.journal / copy) on real MariaDB.

Two shards of a module-private orders topology: s0 is the authority (the source), s1 the
mirror (the target). Slots [0, 128) of s0 move to s1; s0 keeps [128, 256) and s1 owns its own
rows of [256, 512), which no mover may touch. Writes go straight to the physical tables
(triggers see every write path alike), from several threads while the movers run.
"""

from __future__ import annotations

import datetime as dt
import json
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.exc import DBAPIError, IntegrityError

from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.errors import ReshardDataError, ReshardError
from shardrouter.ops.schema import apply
from shardrouter.reshard import journal
from shardrouter.reshard.copy import (
    ChunkDone,
    Throttle,
    backfill,
    count,
    delete_moved,
    verify,
)
from shardrouter.reshard.journal import JOURNAL, backlog, drain, install, remove, trigger_names
from shardrouter.reshard.spec import (
    Belongs,
    TableSpec,
    describe,
    describe_table,
    logical_tables,
    statements,
)
from shardrouter.types import ShardId

pytestmark = pytest.mark.mariadb

MOVING = ((0, 128),)
Row = tuple[Any, ...]


# --------------------------------------------------------------------------- the world


@dataclass
class World:
    topology: Topology
    a: Engine  # s0: authority / source
    b: Engine  # s1: mirror / target
    specs: list[TableSpec]
    belongs: Belongs
    moving_users: list[int]
    staying_users: list[int]
    own_users: list[int]  # s1's own slots
    groups: dict[int, list[int]]  # slot % 4 -> users of s0 (moving and staying)
    emails: list[str]  # emails whose slot is on s0
    own_emails: list[str]
    merchants: list[int]  # merchant ids whose slot is on s0
    own_merchants: list[int]
    by_physical: dict[str, TableSpec] = field(default_factory=dict)

    def spec(self, physical: str) -> TableSpec:
        return self.by_physical[physical]

    def slot(self, logical: str, value: Any) -> int:
        return int(self.topology.slot_for(logical, value))

    def physical(self, logical: str, value: Any) -> str:
        return self.topology.table(logical).physical(self.slot(logical, value))


def _pick(topology: Topology, logical: str, values: Any, lo: int, hi: int, n: int) -> list[Any]:
    out = []
    for v in values:
        if lo <= topology.slot_for(logical, v) < hi:
            out.append(v)
            if len(out) == n:
                break
    return out


@pytest.fixture(scope="module")
def world(shard_databases: Path) -> Iterator[World]:
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    a = create_engine(topology.shards[ShardId("s0")].primary, pool_size=8)
    b = create_engine(topology.shards[ShardId("s1")].primary, pool_size=8)
    sharded, broadcast = logical_tables(topology)
    with a.connect() as conn:
        specs = describe(conn, topology, [*sharded, *broadcast])
    users = range(1, 20_000)
    moving = _pick(topology, "users", users, 0, 128, 120)
    staying = _pick(topology, "users", users, 128, 256, 120)
    own = _pick(topology, "users", users, 256, 512, 60)
    groups: dict[int, list[int]] = {}
    for u in moving + staying:
        groups.setdefault(topology.slot_for("users", u) % 4, []).append(u)
    mails = (f"user{i}@example.com" for i in range(1, 20_000))
    emails = _pick(topology, "user_emails", mails, 0, 256, 80)
    own_emails = _pick(
        topology, "user_emails", (f"own{i}@example.com" for i in range(20_000)), 256, 512, 20
    )
    merchants = _pick(topology, "merchant_orders", range(1, 20_000), 0, 256, 40)
    own_merchants = _pick(topology, "merchant_orders", range(1, 20_000), 256, 512, 10)
    w = World(
        topology,
        a,
        b,
        specs,
        Belongs(topology, MOVING),
        moving,
        staying,
        own,
        groups,
        emails,
        own_emails,
        merchants,
        own_merchants,
    )
    w.by_physical = {s.physical: s for s in specs}
    try:
        yield w
    finally:
        for engine in (a, b):
            remove(engine, specs)
            engine.dispose()


@pytest.fixture
def w(world: World) -> World:
    """The world with both shards emptied: no rows, no triggers, no journal."""
    for engine in (world.a, world.b):
        remove(engine, world.specs)
        with engine.begin() as conn:
            for spec in world.specs:
                conn.exec_driver_sql(f"DELETE FROM {statements(spec).table}")
    return world


# --------------------------------------------------------------------------- rows


T0 = dt.datetime(2025, 3, 1, 12, 0, 0, 123000)


def _orders_of(w: World, oid: int) -> tuple[str, int]:
    """Order ``oid``'s physical table and its first user (the group is fixed by the id, so an
    order keeps its physical table whatever user it is moved to)."""
    group = w.groups[oid % 4]
    user = group[oid % len(group)]
    return w.physical("orders", user), user


def seed_source(w: World, conn: Connection, n_orders: int = 160) -> None:
    """Rows on s0: users, orders with items, lookups, countries (moving and staying)."""
    rows = [(u, f"u{u}@x.test", None if u % 7 == 0 else f"name {u}", T0) for u in w.moving_users]
    rows += [(u, f"u{u}@x.test", f"name {u}", T0) for u in w.staying_users]
    conn.exec_driver_sql("INSERT INTO users VALUES (%s, %s, %s, %s)", rows)
    for oid in range(1, n_orders + 1):
        table, user = _orders_of(w, oid)
        conn.exec_driver_sql(
            f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)",
            (oid, user, w.merchants[oid % len(w.merchants)], "new", oid * 100, T0),
        )
        items = table.replace("orders", "order_items")
        conn.exec_driver_sql(
            f"INSERT INTO {items} VALUES (%s, %s, %s, %s, %s, %s)",
            [(oid, line, user, f"sku-{line}", line + 1, 250) for line in range(1, 2 + oid % 3)],
        )
    conn.exec_driver_sql(
        "INSERT INTO merchant_orders VALUES (%s, %s, %s, %s)",
        [(m, i, w.moving_users[0], T0) for i, m in enumerate(w.merchants)],
    )
    conn.exec_driver_sql(
        "INSERT INTO user_emails VALUES (%s, %s)",
        [(e, i) for i, e in enumerate(w.emails)],
    )
    conn.exec_driver_sql(
        "INSERT INTO countries VALUES (%s, %s)", [("FR", "France"), ("DE", "Germany")]
    )


def seed_target(w: World, conn: Connection) -> None:
    """s1's own rows (its own slots): no mover may change them."""
    conn.exec_driver_sql(
        "INSERT INTO users VALUES (%s, %s, %s, %s)",
        [(u, f"own{u}@x.test", "own", T0) for u in w.own_users],
    )
    for i, u in enumerate(w.own_users[:20]):
        table = w.physical("orders", u)
        conn.exec_driver_sql(
            f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)",
            (900_000 + i, u, w.own_merchants[0], "own", 1, T0),
        )
    conn.exec_driver_sql("INSERT INTO user_emails VALUES (%s, %s)", [(e, 1) for e in w.own_emails])
    conn.exec_driver_sql(
        "INSERT INTO merchant_orders VALUES (%s, %s, %s, %s)",
        [(m, 900_000, w.own_users[0], T0) for m in w.own_merchants],
    )


def image(w: World, engine: Engine, *, moving: bool) -> dict[str, dict[Row, Row]]:
    """Every row of every table of ``engine``, by key: the moving ones or the others."""
    out: dict[str, dict[Row, Row]] = {}
    with engine.connect() as conn:
        for spec in w.specs:
            st = statements(spec)
            rows = conn.exec_driver_sql(f"SELECT {st.select_list} FROM {st.table}").all()
            keep: dict[Row, Row] = {}
            for r in rows:
                belongs = st.shard_position is None or _belongs(w, spec, r[st.shard_position])
                if belongs == moving:
                    keep[tuple(r[i] for i in st.key_positions)] = tuple(r)
            out[spec.physical] = keep
    return out


def _belongs(w: World, spec: TableSpec, value: Any) -> bool:
    return w.belongs(spec, value)


def assert_converged(w: World, own_before: dict[str, dict[Row, Row]]) -> None:
    ours = image(w, w.a, moving=True)
    theirs = image(w, w.b, moving=True)
    for table in ours:
        missing = set(ours[table]) - set(theirs[table])
        extra = set(theirs[table]) - set(ours[table])
        changed = {
            k for k in ours[table] if k in theirs[table] and ours[table][k] != theirs[table][k]
        }
        assert not (missing or extra or changed), (table, missing, extra, changed)
    assert image(w, w.b, moving=False) == own_before
    assert sum(len(t) for t in ours.values()) > 0


# --------------------------------------------------------------------------- writers


class Writers:
    """Random single-row writes to s0 from several threads: inserts, updates (of values, of
    keys, of sharding values, of a key's letter case), deletes, upserts, some inside
    transactions that roll back. Keys are drawn from small spaces so threads collide."""

    def __init__(self, w: World, threads: int = 3, seed: int = 7) -> None:
        self.w = w
        self.engine = create_engine(w.a.url, pool_size=threads + 1)
        self.stop = threading.Event()
        self.ops = 0
        self.conflicts = 0
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(seed + i,), daemon=True)
            for i in range(threads)
        ]

    def __enter__(self) -> Writers:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(60)
        self.engine.dispose()
        assert not self.errors, self.errors

    def wait_ops(self, n: int, timeout: float = 60) -> None:
        end = time.monotonic() + timeout
        while self.ops < n and time.monotonic() < end and not self.errors:
            time.sleep(0.02)

    def _run(self, seed: int) -> None:
        rng = random.Random(seed)
        try:
            with self.engine.connect() as conn:
                while not self.stop.is_set():
                    try:
                        n = rng.choice((1, 1, 1, 2, 3))
                        for _ in range(n):
                            self._one(conn, rng)
                        if n > 1 and rng.random() < 0.3:
                            conn.rollback()
                        else:
                            conn.commit()
                        with self._lock:
                            self.ops += n
                    except IntegrityError:
                        conn.rollback()
                    except DBAPIError as exc:
                        if not journal.is_lock_conflict(exc):
                            raise
                        conn.rollback()
                        with self._lock:
                            self.conflicts += 1
        except BaseException as exc:  # reported by __exit__
            self.errors.append(exc)

    def _one(self, conn: Connection, rng: random.Random) -> None:
        w = self.w
        x = conn.exec_driver_sql
        kind = rng.choice(("users", "orders", "items", "emails", "merchant", "countries"))
        op = rng.random()
        if kind == "users":
            u = rng.choice(w.moving_users + w.staying_users)
            if op < 0.35:
                x(
                    "INSERT INTO users VALUES (%s, %s, %s, %s)"
                    " ON DUPLICATE KEY UPDATE name = VALUES(name)",
                    (u, f"u{u}@x.test", rng.choice((None, "NULL", f"n{rng.random()}")), T0),
                )
            elif op < 0.75:
                x("UPDATE users SET name = %s WHERE user_id = %s", (f"v{rng.random()}", u))
            else:
                x("DELETE FROM users WHERE user_id = %s", (u,))
        elif kind in ("orders", "items"):
            oid = rng.randint(1, 220)
            table, user = _orders_of(w, oid)
            items = table.replace("orders", "order_items")
            group = w.groups[oid % 4]
            if kind == "orders":
                if op < 0.3:
                    x(
                        f"INSERT INTO {table} VALUES (%s, %s, %s, %s, %s, %s)",
                        (oid, user, rng.choice(w.merchants), "new", rng.randint(1, 99), T0),
                    )
                elif op < 0.55:
                    x(f"UPDATE {table} SET status = %s WHERE order_id = %s", ("paid", oid))
                elif op < 0.8:
                    # The sharding value changes (into or out of the moving slots).
                    x(
                        f"UPDATE {table} SET user_id = %s WHERE order_id = %s",
                        (rng.choice(group), oid),
                    )
                else:
                    x(f"DELETE FROM {table} WHERE order_id = %s", (oid,))
            else:
                line = rng.randint(1, 4)
                if op < 0.35:
                    x(
                        f"INSERT INTO {items} VALUES (%s, %s, %s, %s, %s, %s)",
                        (oid, line, rng.choice(group), "sku", 1, 10),
                    )
                elif op < 0.55:
                    x(
                        f"UPDATE {items} SET qty = qty + 1 WHERE order_id = %s AND line = %s",
                        (oid, line),
                    )
                elif op < 0.75:
                    # The primary key changes: the old key's copy must go.
                    x(
                        f"UPDATE {items} SET line = line + 4 WHERE order_id = %s AND line = %s",
                        (oid, line),
                    )
                else:
                    x(f"DELETE FROM {items} WHERE order_id = %s AND line = %s", (oid, line))
        elif kind == "emails":
            e = rng.choice(w.emails)
            if op < 0.35:
                x("INSERT IGNORE INTO user_emails VALUES (%s, %s)", (e, rng.randint(1, 9)))
            elif op < 0.55:
                x("UPDATE user_emails SET user_id = user_id + 1 WHERE email = %s", (e,))
            elif op < 0.75:
                # Only the letter case of the key changes (equal under the collation).
                fn = rng.choice(("UPPER", "LOWER"))
                x(f"UPDATE user_emails SET email = {fn}(email) WHERE email = %s", (e,))
            else:
                x("DELETE FROM user_emails WHERE email = %s", (e,))
        elif kind == "merchant":
            m = rng.choice(w.merchants)
            oid = rng.randint(1, 5)
            if op < 0.5:
                x(
                    "INSERT INTO merchant_orders (merchant_id, order_id, user_id) VALUES"
                    " (%s, %s, %s) ON DUPLICATE KEY UPDATE user_id = user_id + 1",
                    (m, oid, 1),
                )
            else:
                x("DELETE FROM merchant_orders WHERE merchant_id = %s AND order_id = %s", (m, oid))
        else:
            code = rng.choice(("FR", "DE", "IT", "ES", "PT"))
            if op < 0.4:
                x("REPLACE INTO countries VALUES (%s, %s)", (code, f"c{rng.random()}"))
            elif op < 0.7:
                x("UPDATE countries SET name = %s WHERE code = %s", (f"d{rng.random()}", code))
            else:
                x("DELETE FROM countries WHERE code = %s", (code,))


class Drainer:
    """Drains s0's journal into s1 in a loop on a thread, until stopped."""

    def __init__(self, w: World, batch: int = 40) -> None:
        self.w = w
        self.batch = batch
        self.stop = threading.Event()
        self.rounds = 0
        self.entries = 0
        self.errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Drainer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self._thread.join(60)
        assert not self.errors, self.errors

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                report = drain(
                    self.w.a,
                    self.w.b,
                    self.w.specs,
                    self.w.belongs,
                    batch=self.batch,
                    max_batches=4,  # a round ends even while writers outpace it
                    stop=self.stop.is_set,
                )
                self.rounds += 1
                self.entries += report.entries
                time.sleep(0.005)
        except BaseException as exc:
            self.errors.append(exc)


def entries(engine: Engine) -> list[tuple[str, Any, Any]]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(f"SELECT tbl, pk, k FROM {JOURNAL} ORDER BY id").all()
    return [(t, json.loads(pk), None if k is None else json.loads(k)) for t, pk, k in rows]


def triggers(engine: Engine) -> set[str]:
    with engine.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT trigger_name FROM information_schema.triggers WHERE trigger_schema = DATABASE()"
        ).all()
    return {str(r[0]) for r in rows}


# --------------------------------------------------------------------------- triggers


@pytest.mark.timeout(120)
def test_triggers_journal_committed_changes_only(w: World) -> None:
    install(w.a, w.specs)
    install(w.a, w.specs)  # idempotent: same triggers, none duplicated
    expected = {n for spec in w.specs for n in trigger_names(spec)}
    assert triggers(w.a) == expected
    assert len(expected) == 3 * len(w.specs)
    u, u2 = w.moving_users[0], w.moving_users[1]
    oid = 5
    orders, owner = _orders_of(w, oid)
    items = orders.replace("orders", "order_items")
    other = next(x for x in w.groups[oid % 4] if x != owner)
    with w.a.begin() as conn:
        x = conn.exec_driver_sql
        x("INSERT INTO users VALUES (%s, 'a@x', NULL, %s)", (u, T0))
        x("UPDATE users SET name = 'n' WHERE user_id = %s", (u,))
        x("UPDATE users SET user_id = %s WHERE user_id = %s", (u2, u))  # key change
        x(f"INSERT INTO {orders} VALUES (%s, %s, 1, 'new', 1, %s)", (oid, owner, T0))
        x(f"UPDATE {orders} SET user_id = %s WHERE order_id = %s", (other, oid))  # slot change
        x(f"INSERT INTO {items} VALUES (%s, 1, %s, 's', 1, 1)", (oid, other))
        x(f"UPDATE {items} SET line = 2 WHERE order_id = %s", (oid,))  # composite key change
        x("DELETE FROM users WHERE user_id = %s", (u2,))
        x("INSERT INTO countries VALUES ('NL', 'Netherlands')")
        x("UPDATE countries SET name = 'Holland' WHERE code = 'NL'")
    assert entries(w.a) == [
        ("users", [u], [u]),
        ("users", [u], [u]),
        ("users", [u2], [u2]),
        ("users", [u], [u]),
        (orders, [oid], [owner]),
        (orders, [oid], [other]),
        (orders, [oid], [owner]),
        (items, [oid, 1], [other]),
        (items, [oid, 2], [other]),
        (items, [oid, 1], [other]),
        ("users", [u2], [u2]),
        ("countries", ["NL"], None),
        ("countries", ["NL"], None),
    ]
    n = backlog(w.a)
    assert n == 13
    # A rolled-back write leaves no entry; the movers' own writes (@shardrouter_mirror) none.
    with w.a.connect() as conn:
        conn.exec_driver_sql("INSERT INTO users VALUES (%s, 'b@x', NULL, %s)", (u, T0))
        conn.exec_driver_sql("DELETE FROM countries")
        conn.rollback()
        conn.exec_driver_sql("SET @shardrouter_mirror = 1")
        conn.exec_driver_sql("INSERT INTO users VALUES (%s, 'c@x', NULL, %s)", (u, T0))
        conn.exec_driver_sql("UPDATE users SET user_id = %s WHERE user_id = %s", (u2, u))
        conn.exec_driver_sql("DELETE FROM users WHERE user_id = %s", (u2,))
        conn.commit()
        conn.exec_driver_sql("SET @shardrouter_mirror = NULL")
        conn.exec_driver_sql("INSERT INTO users VALUES (%s, 'd@x', NULL, %s)", (u, T0))
        conn.commit()
    assert backlog(w.a) == n + 1
    assert entries(w.a)[-1] == ("users", [u], [u])
    remove(w.a, w.specs)
    assert triggers(w.a) == set()
    assert backlog(w.a) == 0
    with w.a.connect() as conn:
        gone = conn.exec_driver_sql(
            "SELECT COUNT(*) FROM information_schema.tables"
            " WHERE table_schema = DATABASE() AND table_name = %s",
            (JOURNAL,),
        ).scalar_one()
    assert gone == 0
    remove(w.a, w.specs)  # idempotent


def test_trigger_names_fit_and_stay_distinct() -> None:
    long_a = "t" * 60 + "_0001"
    long_b = "t" * 60 + "_0002"
    a = trigger_names(TableSpec("x", long_a, ("id",), ("id",), None))
    b = trigger_names(TableSpec("x", long_b, ("id",), ("id",), None))
    assert all(len(n) <= 64 for n in a + b)
    assert len(set(a + b)) == 6
    assert trigger_names(TableSpec("x", "orders_0001", ("id",), ("id",), None)) == (
        "shardrouter_j_orders_0001_i",
        "shardrouter_j_orders_0001_u",
        "shardrouter_j_orders_0001_d",
    )


@pytest.mark.timeout(120)
def test_install_waits_for_open_transactions_and_gives_up_typed(w: World) -> None:
    users = [w.spec("users")]
    holder = w.a.connect()
    try:
        holder.exec_driver_sql(
            "INSERT INTO users VALUES (%s, 'early@x', NULL, %s)", (w.moving_users[0], T0)
        )
        done = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            try:
                install(w.a, users, lock_wait_s=1, attempts=30)
            except BaseException as exc:
                failure.append(exc)
            done.set()

        t = threading.Thread(target=run, daemon=True)
        t.start()
        # The transaction that wrote before the triggers existed is still open: install
        # waits for it (the metadata lock), so no write of it can commit unjournaled after.
        assert not done.wait(1.5)
        holder.commit()
        assert done.wait(30) and not failure, failure
        assert triggers(w.a) == set(trigger_names(users[0]))
        # A transaction that outlives every wait: a typed error naming the table.
        remove(w.a, users)
        holder.exec_driver_sql(
            "UPDATE users SET name = 'x' WHERE user_id = %s", (w.moving_users[0],)
        )
        with pytest.raises(ReshardError, match=r"users.*long transactions"):
            install(w.a, users, lock_wait_s=1, attempts=2)
        holder.rollback()
    finally:
        holder.close()


@pytest.mark.timeout(60)
def test_install_refuses_a_key_a_journal_cannot_name(w: World) -> None:
    with w.a.begin() as conn:
        conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_blobkey")
        conn.exec_driver_sql("CREATE TABLE reshard_blobkey (id VARBINARY(16) PRIMARY KEY, v INT)")
    try:
        spec = TableSpec("blobkey", "reshard_blobkey", ("id", "v"), ("id",), None)
        with pytest.raises(ReshardDataError, match=r"reshard_blobkey\.id is varbinary"):
            install(w.a, [spec])
        assert not any("blobkey" in t for t in triggers(w.a))
    finally:
        with w.a.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_blobkey")


# --------------------------------------------------------------------------- drain


@pytest.mark.timeout(300)
def test_drain_converges_under_concurrent_writes(w: World) -> None:
    with w.b.begin() as conn:
        seed_target(w, conn)
    own = image(w, w.b, moving=False)
    install(w.a, w.specs)
    install(w.b, w.specs)  # the mirror carries triggers too: the drain's writes skip them
    with w.a.begin() as conn:
        seed_source(w, conn)
    with Writers(w, threads=3) as writers, Drainer(w) as drainer:
        writers.wait_ops(1500)
        assert drainer.rounds > 1 and drainer.entries > 0
    report = drain(w.a, w.b, w.specs, w.belongs)
    assert report.left == 0 and backlog(w.a) == 0
    assert writers.ops >= 1500
    assert_converged(w, own)
    assert backlog(w.b) == 0  # nothing the drain wrote journaled itself
    # Draining an empty journal changes nothing.
    again = drain(w.a, w.b, w.specs, w.belongs)
    assert (again.copied, again.deleted, again.batches, again.left) == (0, 0, 0, 0)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("crash", ["exception", "killed connection"])
def test_drain_interrupted_after_mirror_commit_redrains_to_the_same_result(
    w: World, crash: str
) -> None:
    with w.b.begin() as conn:
        seed_target(w, conn)
    own = image(w, w.b, moving=False)
    install(w.a, w.specs)
    with w.a.begin() as conn:
        seed_source(w, conn, n_orders=60)
    with Writers(w, threads=2) as writers:
        writers.wait_ops(300)
    before = backlog(w.a)
    assert before > 100

    def crash_now() -> None:
        if crash == "exception":
            raise RuntimeError("crash between the mirror's commit and the journal's delete")
        with w.a.connect() as killer:  # the drain's open transaction holds the row locks
            threads = (
                killer.exec_driver_sql(
                    "SELECT trx_mysql_thread_id FROM information_schema.innodb_trx"
                )
                .scalars()
                .all()
            )
            assert len(threads) == 1, threads
            killer.exec_driver_sql(f"KILL CONNECTION {int(threads[0])}")

    expected: type[BaseException] = RuntimeError if crash == "exception" else DBAPIError
    with pytest.raises(expected):
        drain(w.a, w.b, w.specs, w.belongs, batch=10_000, after_mirror_commit=crash_now)
    assert backlog(w.a) == before  # nothing left the journal
    copied = sum(len(t) for t in image(w, w.b, moving=True).values())
    assert copied > 0  # the mirror did commit its part
    # Writes go on after the crash; the re-drain lands on the authority's state.
    with Writers(w, threads=2, seed=99) as writers:
        writers.wait_ops(200)
    report = drain(w.a, w.b, w.specs, w.belongs, batch=64)
    assert report.left == 0 and report.entries >= before
    assert_converged(w, own)


@pytest.mark.timeout(120)
def test_drain_neither_waits_for_nor_blocks_the_routers_writers(w: World) -> None:
    """The drain reads the authority without row locks (journal.copy_keys): a writer's
    uncommitted change does not hold it up (it copies the committed image; the change
    journals and is copied by a later drain), and a router's NOWAIT locking read of a key
    the drain handles is never refused. Locking them made the lookup cleanup of a DELETE
    fail on exactly the deleted key (the resharding load test found it)."""
    install(w.a, w.specs)
    u, d = w.moving_users[0], w.moving_users[1]
    with w.a.begin() as conn:
        conn.exec_driver_sql("INSERT INTO users VALUES (%s, 'a@x', 'v1', %s)", (u, T0))
        conn.exec_driver_sql("INSERT INTO users VALUES (%s, 'd@x', 'd', %s)", (d, T0))
    drain(w.a, w.b, w.specs, w.belongs)
    with w.a.begin() as conn:
        conn.exec_driver_sql("DELETE FROM users WHERE user_id = %s", (d,))
    probes: list[Any] = []

    def router_checks_the_deleted_owner() -> None:
        with w.a.connect() as router:  # what a DELETE's lookup cleanup does meanwhile
            probes.append(
                router.exec_driver_sql(
                    "SELECT user_id FROM users WHERE user_id = %s FOR UPDATE NOWAIT", (d,)
                ).all()
            )
            router.rollback()

    holder = w.a.connect()
    try:
        holder.exec_driver_sql("UPDATE users SET name = 'v2' WHERE user_id = %s", (u,))
        t0 = time.monotonic()
        report = drain(
            w.a, w.b, w.specs, w.belongs, after_mirror_commit=router_checks_the_deleted_owner
        )
        assert time.monotonic() - t0 < 5  # it did not wait for the writer's lock
        assert probes == [[]]  # the NOWAIT read ran (and found the owner gone)
        assert report.left == 0
        with w.b.connect() as conn:
            name = conn.exec_driver_sql("SELECT name FROM users WHERE user_id = %s", (u,))
            assert name.scalar_one() == "v1"  # the committed image
            gone = conn.exec_driver_sql("SELECT COUNT(*) FROM users WHERE user_id = %s", (d,))
            assert gone.scalar_one() == 0
        holder.commit()
    finally:
        holder.close()
    drain(w.a, w.b, w.specs, w.belongs)  # the writer's change journaled: copied now
    with w.b.connect() as conn:
        name = conn.exec_driver_sql("SELECT name FROM users WHERE user_id = %s", (u,))
        assert name.scalar_one() == "v2"


@pytest.mark.timeout(120)
def test_drain_reads_date_sharding_values_from_the_journal(w: World) -> None:
    from shardrouter.core.config import config_from_dict

    days = Topology(
        config_from_dict(
            {
                "shards": {"s0": {"primary": "sqlite:///unused.db", "slots": [[0, 1024]]}},
                "tables": {"days": {"column": "day", "type": "date", "strategy": "hash"}},
            },
            env={},
        )
    )
    belongs = Belongs(days, ((0, 512),))
    for engine in (w.a, w.b):
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_days")
            conn.exec_driver_sql(
                "CREATE TABLE reshard_days (id INT PRIMARY KEY, day DATE NOT NULL, v INT)"
            )
    try:
        with w.a.connect() as conn:
            spec = describe_table(conn, "reshard_days", logical="days", shard_column="day")
        install(w.a, [spec])
        dates = [dt.date(2025, 1, 1) + dt.timedelta(days=i) for i in range(40)]
        with w.a.begin() as conn:
            conn.exec_driver_sql(
                "INSERT INTO reshard_days VALUES (%s, %s, %s)",
                [(i, d, i) for i, d in enumerate(dates)],
            )
        report = drain(w.a, w.b, [spec], belongs)
        moving = {i for i, d in enumerate(dates) if days.slot_for("days", d) < 512}
        assert 0 < len(moving) < len(dates)
        assert report.copied == len(moving)
        assert report.discarded == len(dates) - len(moving)
        with w.b.connect() as conn:
            got = {r[0] for r in conn.exec_driver_sql("SELECT id FROM reshard_days")}
        assert got == moving
    finally:
        remove(w.a, [spec], drop_table=False)
        for engine in (w.a, w.b):
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_days")


# --------------------------------------------------------------------------- backfill


@pytest.mark.timeout(300)
def test_backfill_under_concurrent_writes_and_drain_copies_exactly(w: World) -> None:
    with w.a.begin() as conn:
        seed_source(w, conn)
    with w.b.begin() as conn:
        seed_target(w, conn)
    own = image(w, w.b, moving=False)
    install(w.a, w.specs)
    install(w.b, w.specs)
    copied = 0
    with Writers(w, threads=3) as writers, Drainer(w, batch=25):
        writers.wait_ops(50)
        started = writers.ops
        for spec in w.specs:
            report = backfill(w.a, w.b, spec, w.belongs, chunk=17)
            assert report.done
            copied += report.rows_copied
        assert writers.ops > started  # the writes overlapped the copy
        # verify's repairs run beside the drain and the writers: whatever they find
        # meanwhile, they must not undo the drain's work.
        for spec in w.specs:
            verify(w.a, w.b, spec, w.belongs, chunk=31)
        writers.wait_ops(writers.ops + 200)
    assert copied > 0
    final = drain(w.a, w.b, w.specs, w.belongs)
    assert final.left == 0
    assert_converged(w, own)
    for spec in w.specs:
        r = verify(w.a, w.b, spec, w.belongs, chunk=23, repair=False)
        assert r.equal and r.differing == 0, (spec.physical, r)
        assert r.rows_source == r.rows_target == count(w.a, spec, w.belongs, chunk=11)
    assert backlog(w.b) == 0


@pytest.mark.timeout(180)
def test_backfill_neither_resurrects_deletes_nor_overwrites_newer_images(w: World) -> None:
    spec = w.spec("users")
    with w.a.begin() as conn:
        seed_source(w, conn)
    with w.b.begin() as conn:
        seed_target(w, conn)
    own = image(w, w.b, moving=False)
    install(w.a, w.specs)
    keys = sorted(w.moving_users)
    early, late_deleted, late_updated = keys[0], keys[-1], keys[-2]
    chunks: list[ChunkDone] = []

    def on_chunk(done: ChunkDone) -> None:
        chunks.append(done)
        if len(chunks) == 1:
            assert done.last_key >= (early,)
            with w.a.begin() as conn:
                # Already copied, then deleted: the journal entry takes it out again.
                conn.exec_driver_sql("DELETE FROM users WHERE user_id = %s", (early,))
                # Not yet read: deleted before its chunk, so never read, never copied.
                conn.exec_driver_sql("DELETE FROM users WHERE user_id = %s", (late_deleted,))
                conn.exec_driver_sql(
                    "UPDATE users SET name = 'v2' WHERE user_id = %s", (late_updated,)
                )
            drain(w.a, w.b, w.specs, w.belongs)  # copies v2 ahead of the backfill

    report = backfill(w.a, w.b, spec, w.belongs, chunk=20, on_chunk=on_chunk)
    assert report.done and len(chunks) > 2
    with w.b.connect() as conn:
        rows = conn.exec_driver_sql(
            "SELECT user_id, name FROM users WHERE user_id IN (%s, %s, %s)",
            (early, late_deleted, late_updated),
        ).all()
    names = {r[0]: r[1] for r in rows}
    assert names == {late_updated: "v2"}

    # A writer holding a row does not hold the chunk up: the copy is the committed image,
    # and the writer's change, journaled at its commit, is copied by the next drain.
    target = keys[len(keys) // 2]
    holder = w.a.connect()
    try:
        holder.exec_driver_sql("UPDATE users SET name = 'v3' WHERE user_id = %s", (target,))
        t0 = time.monotonic()
        assert backfill(w.a, w.b, spec, w.belongs, chunk=1000).done
        assert time.monotonic() - t0 < 10
        holder.commit()
    finally:
        holder.close()
    with w.b.connect() as conn:
        name = conn.exec_driver_sql(
            "SELECT name FROM users WHERE user_id = %s", (target,)
        ).scalar_one()
    assert name != "v3"  # not yet: the backfill read the committed image
    drain(w.a, w.b, w.specs, w.belongs)
    with w.b.connect() as conn:
        name = conn.exec_driver_sql(
            "SELECT name FROM users WHERE user_id = %s", (target,)
        ).scalar_one()
    assert name == "v3"
    for other in w.specs:
        backfill(w.a, w.b, other, w.belongs)
    drain(w.a, w.b, w.specs, w.belongs)
    assert_converged(w, own)


@pytest.mark.timeout(180)
def test_backfill_resumes_from_its_checkpoint(w: World) -> None:
    with w.a.begin() as conn:
        seed_source(w, conn)
    spec = w.spec("users")
    checkpoints: list[ChunkDone] = []
    first = backfill(
        w.a,
        w.b,
        spec,
        w.belongs,
        chunk=25,
        on_chunk=checkpoints.append,
        stop=lambda: len(checkpoints) >= 2,
    )
    assert not first.done and first.chunks == 2
    assert first.last_key == checkpoints[-1].last_key
    assert first.rows_read == 50
    with w.b.connect() as conn:
        assert conn.exec_driver_sql("SELECT COUNT(*) FROM users").scalar_one() == first.rows_copied
    rest = backfill(w.a, w.b, spec, w.belongs, chunk=25, after=checkpoints[-1].last_key)
    assert rest.done
    assert first.rows_read + rest.rows_read == len(w.moving_users) + len(w.staying_users)
    total = count(w.a, spec, w.belongs)
    assert first.rows_copied + rest.rows_copied == total == len(w.moving_users)
    assert verify(w.a, w.b, spec, w.belongs, repair=False).equal
    # A composite key resumes the same way.
    items = w.spec(_orders_of(w, 1)[0].replace("orders", "order_items"))
    seen: list[ChunkDone] = []
    part = backfill(
        w.a, w.b, items, w.belongs, chunk=3, on_chunk=seen.append, stop=lambda: len(seen) >= 3
    )
    assert not part.done and len(part.last_key or ()) == 2
    rest = backfill(w.a, w.b, items, w.belongs, chunk=3, after=part.last_key)
    assert rest.done
    assert part.rows_copied + rest.rows_copied == count(w.a, items, w.belongs)
    assert verify(w.a, w.b, items, w.belongs, repair=False).equal


# --------------------------------------------------------------------------- verify


@pytest.mark.timeout(180)
def test_verify_finds_changed_missing_and_stale_rows_and_repairs_them(w: World) -> None:
    with w.a.begin() as conn:
        seed_source(w, conn)
    with w.b.begin() as conn:
        seed_target(w, conn)
    for spec in w.specs:
        backfill(w.a, w.b, spec, w.belongs)
    users = w.spec("users")
    named = [u for u in w.moving_users if u % 7 != 0]
    changed, missing, nulled = named[0], named[1], named[2]
    stale = next(u for u in range(50_000, 90_000) if w.slot("users", u) < 128)
    own = w.own_users[0]
    with w.b.begin() as conn:
        x = conn.exec_driver_sql
        x("UPDATE users SET name = 'tampered' WHERE user_id = %s", (changed,))
        x("DELETE FROM users WHERE user_id = %s", (missing,))
        x("INSERT INTO users VALUES (%s, 'stale@x', NULL, %s)", (stale, T0))
        x("UPDATE users SET name = 'mine' WHERE user_id = %s", (own,))  # not moving: ignored
    with w.a.begin() as conn:  # NULL on the source, the text 'NULL' on the target
        conn.exec_driver_sql("UPDATE users SET name = NULL WHERE user_id = %s", (nulled,))
    with w.b.begin() as conn:
        conn.exec_driver_sql("UPDATE users SET name = 'NULL' WHERE user_id = %s", (nulled,))
    found = verify(w.a, w.b, users, w.belongs, chunk=9, repair=False)
    assert not found.equal
    assert found.differing == 4
    assert set(found.sample) == {(changed,), (missing,), (stale,), (nulled,)}
    assert found.rows_source == len(w.moving_users)
    assert found.rows_target == len(w.moving_users)  # one missing, one stale
    fixed = verify(w.a, w.b, users, w.belongs, chunk=9)
    assert fixed.equal and fixed.repaired == 4 and fixed.differing == 4
    after = verify(w.a, w.b, users, w.belongs, chunk=9, repair=False)
    assert after.equal and after.differing == 0
    assert after.rows_source == after.rows_target == len(w.moving_users)
    with w.b.connect() as conn:
        assert (
            conn.exec_driver_sql("SELECT name FROM users WHERE user_id = %s", (own,)).scalar_one()
            == "mine"
        )
    # A composite key, over chunks of 2 rows.
    table, _ = _orders_of(w, 4)
    items = w.spec(table.replace("orders", "order_items"))
    with w.b.connect() as conn:
        key = conn.exec_driver_sql(
            f"SELECT order_id, line FROM {statements(items).table} LIMIT 1"
        ).one()
        conn.exec_driver_sql(
            f"UPDATE {statements(items).table} SET qty = qty + 1 WHERE order_id = %s AND line = %s",
            tuple(key),
        )
        conn.commit()
    found = verify(w.a, w.b, items, w.belongs, chunk=2, repair=False)
    assert found.sample == (tuple(key),)
    assert verify(w.a, w.b, items, w.belongs, chunk=2).equal
    assert verify(w.a, w.b, items, w.belongs, chunk=2, repair=False).differing == 0


@pytest.mark.timeout(180)
@pytest.mark.parametrize("driver", ["pymysql", "mysqldb"])
def test_every_column_type_copies_drains_and_verifies_exactly(w: World, driver: str) -> None:
    ddl = (
        "CREATE TABLE reshard_types (id INT PRIMARY KEY, b BLOB, vb VARBINARY(8),"
        " d DECIMAL(20,6), dd DATE, dt DATETIME(6), ts TIMESTAMP(6) NULL, t TIME(3),"
        " f DOUBLE, j JSON, e ENUM('a','b'), s VARCHAR(20), u BIGINT UNSIGNED,"
        " fl FLOAT, bt BIT(3), y YEAR, st SET('x','y'), lt VARCHAR(20) CHARACTER SET latin1,"
        " em VARCHAR(20), pt POINT NULL, g BIGINT AS (id * 2) VIRTUAL)"
    )
    for engine in (w.a, w.b):
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_types")
            conn.exec_driver_sql(ddl)
    columns = (
        *("id", "b", "vb", "d", "dd", "dt", "ts", "t", "f", "j", "e", "s", "u"),
        *("fl", "bt", "y", "st", "lt", "em", "pt"),
    )
    with w.a.connect() as conn:
        spec = describe_table(conn, "reshard_types", shard_column=None)
    assert spec.columns == (*columns, "g")
    assert spec.generated == ("g",) and spec.type_of("t") == "time"
    rows = [
        (
            1,
            b"\x00\xff'\\\x1a",
            b"\x00",
            Decimal("12345678901234.000001"),
            dt.date(2024, 2, 29),
            dt.datetime(2024, 1, 1, 0, 0, 0, 1),
            dt.datetime(2024, 6, 1, 12, 0, 0, 500000),
            "-00:59:59.5",  # as text: PyMySQL writes a negative timedelta wrong
            0.1,
            '{"a": [1, 2.5]}',
            "b",
            "NULL",
            2**64 - 1,
            1 / 3,  # a FLOAT the text protocol would print as 0.333333
            b"\x05",
            2024,
            "x,y",
            "café",
            "😀 100% 'q' \\ %s",  # a literal's quotes, backslash and paramstyle marks
            None,
        ),
        (2, *(None for _ in columns[1:])),
        (
            3,
            b"",
            b"",
            Decimal("0"),
            dt.date(1000, 1, 1),
            dt.datetime(9999, 12, 31),
            None,
            dt.timedelta(0),
            -1e300,
            "null",
            "a",
            "",
            0,
            16777217.0,
            b"\x00",
            1901,
            "",
            "",
            "%%",
            None,
        ),
    ]
    # Checked apart from verify's hashes: the values that travel lossily by default.
    exact = (
        "SELECT id, UNIX_TIMESTAMP(ts), CAST(t AS CHAR), HEX(CAST(fl AS DOUBLE)),"
        " CAST(f AS CHAR), bt + 0, HEX(b), g, HEX(lt), HEX(em), ST_AsText(pt), j, d, u"
        " FROM reshard_types ORDER BY id"
    )

    def same_on_both() -> list[Row]:
        with w.a.connect() as conn:
            ours = [tuple(r) for r in conn.exec_driver_sql(exact).all()]
        with w.b.connect() as conn:
            assert [tuple(r) for r in conn.exec_driver_sql(exact).all()] == ours
        return ours

    a = create_engine(w.a.url.set(drivername=f"mysql+{driver}"))
    b = create_engine(w.b.url.set(drivername=f"mysql+{driver}"))
    with w.b.connect() as conn:
        mode = conn.exec_driver_sql("SELECT @@GLOBAL.sql_mode").scalar_one()
    try:
        with w.a.begin() as conn:
            conn.exec_driver_sql(
                f"INSERT INTO reshard_types ({', '.join(columns)})"
                f" VALUES ({', '.join('%s' for _ in columns)})",
                rows,
            )
            conn.exec_driver_sql("UPDATE reshard_types SET pt = POINT(1.5, -2) WHERE id = 1")
        # The target's server runs in another zone (TIMESTAMPs still copy as the same
        # instant) and parses backslashes as plain characters (the copy's literals still
        # read as written).
        with w.b.connect() as conn:
            conn.exec_driver_sql("SET GLOBAL time_zone = '+05:00'")
            conn.exec_driver_sql("SET GLOBAL sql_mode = %s", (f"{mode},NO_BACKSLASH_ESCAPES",))
        report = backfill(a, b, spec, w.belongs)
        assert report.rows_copied == 3
        assert verify(a, b, spec, w.belongs, repair=False).equal
        ours = same_on_both()
        assert ours[0][2] == "-00:59:59.500"
        # The drain carries the same values.
        install(a, [spec])
        with w.a.begin() as conn:
            x = conn.exec_driver_sql
            x(
                "INSERT INTO reshard_types (id, b, vb, d, dd, dt, ts, t, f, j, e, s, u, fl, bt,"
                " y, st, lt, em, pt) SELECT 4, b, vb, d, dd, dt, ts, t, f, j, e, s, u, fl, bt,"
                " y, st, lt, em, pt FROM reshard_types WHERE id = 1"
            )
            x(
                "UPDATE reshard_types SET em = CONCAT(em, '%%!'), b = REVERSE(b),"
                " fl = fl * 3, t = '-838:59:59', ts = '2038-01-19 03:14:07' WHERE id IN (1, 3)"
            )
            x("DELETE FROM reshard_types WHERE id = 2")
        drained = drain(a, b, [spec], w.belongs)
        assert drained.left == 0 and drained.copied == 3 and drained.deleted == 1
        assert [r[0] for r in same_on_both()] == [1, 3, 4]
        remove(a, [spec])
        with b.connect() as conn:
            # One byte of a blob, the NULL-ness of a value: both are differences.
            conn.exec_driver_sql("UPDATE reshard_types SET b = 0x00ff275c1b WHERE id = 1")
            conn.exec_driver_sql("UPDATE reshard_types SET s = NULL WHERE id = 4")
            # Another FLOAT that QUOTE would print alike (16777200 both).
            conn.exec_driver_sql("UPDATE reshard_types SET fl = 16777218 WHERE id = 3")
            conn.commit()
        found = verify(a, b, spec, w.belongs, repair=False)
        assert set(found.sample) == {(1,), (3,), (4,)}
        assert verify(a, b, spec, w.belongs).equal
        same_on_both()
    finally:
        with w.b.connect() as conn:
            conn.exec_driver_sql("SET GLOBAL time_zone = SYSTEM")
            conn.exec_driver_sql("SET GLOBAL sql_mode = %s", (mode,))
        remove(w.a, [spec], drop_table=False)
        a.dispose()
        b.dispose()
        for engine in (w.a, w.b):
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS reshard_types")


# --------------------------------------------------------------------------- cleanup


@pytest.mark.timeout(180)
def test_delete_moved_removes_exactly_the_moving_rows(w: World) -> None:
    with w.a.begin() as conn:
        seed_source(w, conn)
    with w.b.begin() as conn:
        seed_target(w, conn)
    for spec in w.specs:
        backfill(w.a, w.b, spec, w.belongs)
    staying = image(w, w.a, moving=False)
    own = image(w, w.b, moving=False)
    moving = {s.physical: count(w.a, s, w.belongs) for s in w.specs}
    assert sum(moving.values()) > 0
    install(w.a, w.specs)  # still in place at finalize: the cleanup must not journal
    done: list[ChunkDone] = []
    for spec in w.specs:
        deleted = delete_moved(w.a, spec, w.belongs, chunk=13, on_chunk=done.append)
        assert deleted == moving[spec.physical], spec.physical
        assert count(w.a, spec, w.belongs) == 0
    assert done and done[-1].rows_copied > 0
    assert image(w, w.a, moving=False) == staying
    assert backlog(w.a) == 0
    # cancel: the target's copy goes, its own rows stay.
    for spec in w.specs:
        delete_moved(w.b, spec, w.belongs, chunk=1000)
    assert all(not rows for rows in image(w, w.b, moving=True).values())
    assert image(w, w.b, moving=False) == own


# --------------------------------------------------------------------------- throttle


def _fill_users(w: World, n: int) -> None:
    with w.a.begin() as conn:
        conn.exec_driver_sql(
            "INSERT INTO users VALUES (%s, 'x', NULL, %s)",
            [(100_000 + i, T0) for i in range(n)],
        )


@pytest.mark.timeout(120)
def test_throttle_bounds_the_row_rate(w: World) -> None:
    _fill_users(w, 2000)
    throttle = Throttle(max_rows_per_s=1000, max_threads_running=None)
    started = time.monotonic()
    report = backfill(w.a, w.b, w.spec("users"), w.belongs, chunk=100, throttle=throttle)
    elapsed = time.monotonic() - started
    assert report.done and report.rows_read == 2000
    # 2000 rows at 1000 rows/s, less the bucket's burst (0.25 s worth), less slack.
    assert elapsed >= (2000 - 250) / 1000 - 0.2, elapsed
    assert throttle.slept_s > 1.0


@pytest.mark.timeout(120)
def test_throttle_backs_off_under_load_boundedly_and_honours_stop(w: World) -> None:
    _fill_users(w, 500)
    spec = w.spec("users")
    # Threads_running is at least 1 (the check itself): always "busy" above 0.
    busy = Throttle(max_threads_running=0, check_every=1, max_wait_s=0.3, backoff_s=0.05)
    started = time.monotonic()
    report = backfill(w.a, w.b, spec, w.belongs, chunk=100, throttle=busy)
    elapsed = time.monotonic() - started
    assert report.done
    assert busy.load_waits == 5  # every full chunk checked, found busy, waited its cap
    assert 1.4 <= elapsed < 20, elapsed
    # A long back-off still ends at stop().
    stuck = Throttle(max_threads_running=0, check_every=1, max_wait_s=600, max_backoff_s=600)
    deadline = time.monotonic() + 0.5
    started = time.monotonic()
    report = backfill(
        w.a,
        w.b,
        spec,
        w.belongs,
        chunk=100,
        throttle=stuck,
        stop=lambda: time.monotonic() > deadline,
    )
    assert not report.done and report.chunks == 1
    assert time.monotonic() - started < 5


def test_throttle_refuses_nonsense() -> None:
    with pytest.raises(ReshardError, match="max_rows_per_s"):
        Throttle(max_rows_per_s=0)
    with pytest.raises(ReshardError, match="check_every"):
        Throttle(check_every=0)
