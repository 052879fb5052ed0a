"""The lean read path (shardrouter.engine.readpool) on real MariaDB shards: reads outside transactions
run on autocommit DBAPI connections of ReadPool / AsyncReadPool, with lazily decoded rows for
merged scatters on PyMySQL and aiomysql. Every answer is checked against eager decoding and
against one unsharded MariaDB (the oracle); the pool's life cycle (ping, cap, cancellation,
close) is checked on the server side through separate plain connections."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import pymysql
import pytest
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import URL, make_url

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine import readpool
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.engines import make_async_engine
from shardrouter.engine.readpool import AsyncReadPool, LazyRows, ReadPool
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, ShardUnavailableError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(60)]

ORACLE_DB = "readpool_oracle"
COLUMNS = "id, user_id, big, amount, at, name, bin, status"
VALS_DDL = (
    "CREATE TABLE {name} (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL, big BIGINT NULL,"
    " amount DECIMAL(20,6) NULL, at DATETIME(3) NULL,"
    " name VARCHAR(64) CHARACTER SET utf8mb4 NULL, bin VARBINARY(32) NULL,"
    " status VARCHAR(16) NOT NULL, KEY (user_id)) DEFAULT CHARSET=utf8mb4"
)
MARKS_DDL = "CREATE TABLE {name} (user_id BIGINT PRIMARY KEY, v INT NOT NULL)"
NAMES = ["plain", "Grüße", "日本語", "emoji 😀🚀", "", "trail ", "Ünïcødé ✓", "🦄"]
STATUSES = ["paid", "pending", "pa%", "PA-x", "shipped", "50%s", "new", "%pa"]
ROWS = 160
FIRST_USER = 10_000  # row i belongs to user FIRST_USER + i: every user key has exactly one row

SYNC_DRIVERS = ["pymysql", "mysqldb"]
ASYNC_DRIVERS = ["aiomysql", "asyncmy"]
ALL_DRIVERS = SYNC_DRIVERS + ASYNC_DRIVERS


@dataclass
class World:
    raw: dict[str, Any]
    """The topology config (vals, svals, marks added) as a plain mapping."""
    topology: Topology
    rows: list[dict[str, Any]]
    oracle: Engine
    databases: dict[str, str]
    """shard -> its private database name."""

    def topology_with(self, driver: str = "pymysql", **pool: Any) -> Topology:
        """The world's topology on ``driver`` with ``pool`` settings on every shard."""
        raw = copy.deepcopy(self.raw)
        for shard in raw["shards"].values():
            url = make_url(shard["primary"]).set(drivername=f"mysql+{driver}")
            shard["primary"] = url.render_as_string(hide_password=False)
            shard.setdefault("pool", {}).update(pool)
        return Topology(config_from_dict(raw))

    def url(self, shard: str) -> URL:
        return self.topology.shards[shard].primary

    def user_on(self, shard: str, skip: int = 0) -> int:
        """A user (one row in vals) whose rows live on ``shard``."""
        found = [
            r["user_id"]
            for r in self.rows
            if self.topology.shard_for("vals", r["user_id"]) == shard
        ]
        return found[skip]

    def row_of(self, user: int) -> dict[str, Any]:
        return self.rows[user - FIRST_USER]


def _generate() -> list[dict[str, Any]]:
    rng = random.Random(20260501)
    base = dt.datetime(2025, 6, 1, 12, 0, 0)
    extremes = [-(2**63), 2**63 - 1, 0, -1, 1]
    rows = []
    for i in range(ROWS):

        def maybe(value: Any) -> Any:
            return None if rng.random() < 0.12 else value

        big = extremes[i] if i < len(extremes) else maybe(rng.randrange(-(10**15), 10**15))
        amount = maybe(Decimal(rng.randrange(-(10**13), 10**13)).scaleb(-6))
        at = maybe(base + dt.timedelta(milliseconds=rng.randrange(10**10)))
        rows.append(
            {
                "id": i + 1,
                "user_id": FIRST_USER + i,
                "big": big,
                "amount": amount,
                "at": at,
                "name": maybe(rng.choice(NAMES) + ("" if rng.random() < 0.5 else f" {i}")),
                "bin": maybe(
                    bytes([0, 255, 39, 92]) + rng.randbytes(rng.randrange(0, 12))
                    if rng.random() < 0.5
                    else rng.randbytes(rng.randrange(0, 8))
                ),
                "status": STATUSES[i % len(STATUSES)],
            }
        )
    return rows


def _admin(url: URL, database: str | None = None) -> pymysql.connections.Connection:
    """A plain PyMySQL connection to the server of ``url`` (not through the router)."""
    return pymysql.connect(
        host=url.host,
        port=url.port or 3306,
        user=url.username,
        password=url.password or "",
        database=database,
        autocommit=True,
        charset="utf8mb4",
    )


@pytest.fixture(scope="module")
def world(shard_databases, oracle) -> Iterator[World]:  # type: ignore[no-untyped-def]
    base = Topology.load(shard_databases)
    raw = base.config.model_dump(by_alias=True, mode="json")
    raw["tables"]["vals"] = {"column": "user_id", "strategy": "hash"}
    raw["tables"]["svals"] = {"column": "user_id", "strategy": "hash", "split": 2}
    raw["tables"]["marks"] = {"column": "user_id", "strategy": "hash"}
    topology = Topology(config_from_dict(raw))
    rows = _generate()
    columns = COLUMNS.split(", ")
    with Router(topology) as router:
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                for table, ddl in (("vals", VALS_DDL), ("svals", VALS_DDL), ("marks", MARKS_DDL)):
                    for name in topology.table(table).physical_names:
                        conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                        conn.execute(text(ddl.format(name=name)))
        for table in ("vals", "svals"):
            for start in range(0, ROWS, 40):
                chunk = rows[start : start + 40]
                values = ", ".join(
                    "(" + ", ".join(f":{c}_{i}" for c in columns) + ")" for i in range(len(chunk))
                )
                params = {f"{c}_{i}": row[c] for i, row in enumerate(chunk) for c in columns}
                router.execute(f"INSERT INTO {table} ({COLUMNS}) VALUES {values}", params)
    server = make_url(oracle.shards[0].url)
    admin = _admin(server)
    with admin.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS {ORACLE_DB}")
        cur.execute(f"CREATE DATABASE {ORACLE_DB} DEFAULT CHARSET utf8mb4")
    oracle_engine = create_engine(server.set(database=ORACLE_DB, drivername="mysql+pymysql"))
    with oracle_engine.begin() as conn:
        for table in ("vals", "svals"):
            conn.execute(text(VALS_DDL.format(name=table)))
            conn.execute(
                text(
                    f"INSERT INTO {table} ({COLUMNS}) VALUES ("
                    + ", ".join(f":{c}" for c in columns)
                    + ")"
                ),
                rows,
            )
    databases = {sid: spec.primary.database or "" for sid, spec in topology.shards.items()}
    try:
        yield World(raw, topology, rows, oracle_engine, databases)
    finally:
        oracle_engine.dispose()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS {ORACLE_DB}")
        admin.close()


@pytest.fixture(autouse=True)
def _no_sleepers_left(request: pytest.FixtureRequest) -> Iterator[None]:
    """Kill this module's statements still sleeping on a shard after a test (a cancelled or
    timed-out SLEEP keeps running server-side), so they hold no metadata lock at teardown."""
    yield
    if "world" not in request.fixturenames:
        return
    world: World = request.getfixturevalue("world")
    _statements(world, "%SLEEP(%", kill=True)


def _statements(world: World, like: str, kill: bool = False) -> int:
    """How many of this module's statements whose text is LIKE ``like`` run on the shards
    now; ``kill``: stop them (KILL QUERY)."""
    count = 0
    for sid, database in world.databases.items():
        conn = _admin(world.url(sid))
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s"
                    " AND INFO LIKE %s AND ID <> CONNECTION_ID()",
                    (database, like),
                )
                found = cur.fetchall()
                count += len(found)
                for (pid,) in found if kill else ():
                    with contextlib.suppress(pymysql.err.OperationalError):  # finished since
                        cur.execute(f"KILL QUERY {int(pid)}")
        finally:
            conn.close()
    return count


# -- helpers ------------------------------------------------------------------------------------


def _rows(result: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in result.rows]


def _oracle(world: World, sql: str, params: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    with world.oracle.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params or {})]


def _through(
    topology: Topology, driver: str, queries: list[tuple[str, dict[str, Any]]]
) -> list[list[tuple[Any, ...]]]:
    """The rows of each query through a fresh Router (sync driver) or AsyncRouter."""
    if driver in SYNC_DRIVERS:
        with Router(topology) as router:
            return [_rows(router.execute(sql, params)) for sql, params in queries]

    async def run() -> list[list[tuple[Any, ...]]]:
        async with AsyncRouter(topology) as aio:
            return [_rows(await aio.execute(sql, params)) for sql, params in queries]

    return asyncio.run(run())


def _spy_lazy(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Record every result of the lazy read functions (they still run for real)."""
    seen: list[Any] = []
    # sync: the reader of every answer, one statement at a time (_query_lazy) or pipelined
    # (ReadPool.send/receive)
    sync_real, async_real = readpool._read_lazy, readpool._query_lazy_async

    def spy(conn: Any) -> Any:
        result = sync_real(conn)
        seen.append(result)
        return result

    async def async_spy(conn: Any, sql: str, args: Any) -> Any:
        result = await async_real(conn, sql, args)
        seen.append(result)
        return result

    monkeypatch.setattr(readpool, "_read_lazy", spy)
    monkeypatch.setattr(readpool, "_query_lazy_async", async_spy)
    return seen


def _process_ids(url: URL, database: str) -> set[int]:
    """Connection ids on the server of ``url`` whose current database is ``database``."""
    conn = _admin(url)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST WHERE DB = %s"
                " AND ID <> CONNECTION_ID()",
                (database,),
            )
            return {int(r[0]) for r in cur.fetchall()}
    finally:
        conn.close()


def _wait_for(condition: Callable[[], bool], within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def _kill(world: World, shard: str, connection_id: int) -> None:
    """KILL a connection on ``shard``'s server and wait until the server has let it go."""
    conn = _admin(world.url(shard))
    try:
        with conn.cursor() as cur:
            cur.execute(f"KILL {int(connection_id)}")
    finally:
        conn.close()
    assert _wait_for(
        lambda: connection_id not in _process_ids(world.url(shard), world.databases[shard])
    ), f"connection {connection_id} still listed after KILL"


CID = "SELECT CONNECTION_ID() AS cid, id FROM vals WHERE user_id = :u"
POINT = "SELECT id, status FROM vals WHERE user_id = :u"


def _scatter_queries(world: World, table: str, driver: str) -> list[tuple[str, dict[str, Any]]]:
    some = world.rows[7]
    at = next(r["at"] for r in world.rows[20:] if r["at"] is not None)
    amount = next(r["amount"] for r in world.rows[30:] if r["amount"] is not None)
    binary = next(r["bin"] for r in world.rows if r["bin"] and r["bin"][:2] == b"\x00\xff")
    # aiomysql cannot bind bytes under this PyMySQL (test_async_drivers_bind_bytes): a literal
    # there, written 0x.. (a binary string against a binary column; X'..' is refused).
    bin_term = f"0x{binary.hex()}" if driver == "aiomysql" else ":b"
    return [
        (f"SELECT {COLUMNS} FROM {table} ORDER BY big, id LIMIT 17 OFFSET 5", {}),
        (f"SELECT {COLUMNS} FROM {table} ORDER BY at DESC, id DESC LIMIT 30", {}),
        (f"SELECT {COLUMNS} FROM {table} ORDER BY amount, id LIMIT 25 OFFSET 10", {}),
        (f"SELECT {COLUMNS} FROM {table} ORDER BY id DESC LIMIT 200", {}),
        (
            f"SELECT {COLUMNS} FROM {table} WHERE amount > :a AND at < :t"
            " ORDER BY amount DESC, id LIMIT 12 OFFSET 2",
            {"a": amount, "t": at},
        ),
        (
            f"SELECT {COLUMNS} FROM {table} WHERE name = :n OR bin = {bin_term} OR big = :g"
            " ORDER BY id LIMIT 10",
            {"n": "emoji 😀🚀", "b": binary, "g": some["big"]},
        ),
        (f"SELECT {COLUMNS} FROM {table} WHERE id < 0 ORDER BY id LIMIT 5", {}),
    ]


# -- 1. lazy and eager decoding give the oracle's answer ---------------------------------------


def test_both_pure_python_drivers_decode_lazily() -> None:
    assert "pymysql" in readpool.LAZY_DRIVERS
    assert "aiomysql" in readpool.LAZY_DRIVERS


@pytest.mark.parametrize("table", ["vals", "svals"])
@pytest.mark.parametrize("driver", ["pymysql", "aiomysql"])
def test_lazy_and_eager_scatters_equal_the_oracle(
    world: World, monkeypatch: pytest.MonkeyPatch, driver: str, table: str
) -> None:
    queries = _scatter_queries(world, table, driver)
    expected = [_oracle(world, sql, params) for sql, params in queries]
    assert [len(e) for e in expected] == [17, 30, 25, ROWS, 12, len(expected[5]), 0]
    assert len(expected[5]) >= 3
    assert any(None in row for row in expected[0])  # NULLs do reach the results

    seen = _spy_lazy(monkeypatch)
    lazy = _through(world.topology_with(driver), driver, queries)
    # Every query fans out to the 4 shards, each answered through the lazy reader.
    assert len(seen) == 4 * len(queries)
    assert sum(isinstance(r.rows, LazyRows) for r in seen) == len(seen)

    monkeypatch.setattr(readpool, "LAZY_DRIVERS", frozenset())
    seen.clear()
    eager = _through(world.topology_with(driver), driver, queries)
    assert seen == []  # lazy decoding off: never taken

    for sql_params, want, got_lazy, got_eager in zip(queries, expected, lazy, eager, strict=True):
        assert got_lazy == want, sql_params[0]
        assert got_eager == want, sql_params[0]


@pytest.mark.parametrize("driver", ["mysqldb", "asyncmy"])
def test_eager_only_drivers_equal_the_oracle(
    world: World, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    queries = _scatter_queries(world, "svals", driver)
    seen = _spy_lazy(monkeypatch)
    got = _through(world.topology_with(driver), driver, queries)
    assert seen == []  # the C drivers decode eagerly
    for (sql, params), rows in zip(queries, got, strict=True):
        assert rows == _oracle(world, sql, params), sql


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_async_drivers_bind_bytes(world: World, driver: str) -> None:
    # aiomysql's own escaping of bytes fails beside PyMySQL 1.2 (escape_bytes_prefixed became
    # a string there); the lean path writes bytes as a hex literal itself.
    row = next(r for r in world.rows if r["bin"] and r["bin"][:2] == b"\x00\xff")
    sql = "SELECT id, bin FROM vals WHERE user_id = :u AND bin = :b"
    (got,) = _through(
        world.topology_with(driver), driver, [(sql, {"u": row["user_id"], "b": row["bin"]})]
    )
    assert got == [(row["id"], row["bin"])]


@pytest.mark.parametrize("driver", ["aiomysql", "asyncmy"])
def test_async_writes_bind_bytes(world: World, driver: str) -> None:
    """Writes go through SQLAlchemy on the async driver: bytes must bind there too (setup.cfg
    keeps PyMySQL below 1.2, whose change breaks aiomysql's escaping of bytes)."""
    value = b"\x00\xff'\\" + driver.encode()
    row_id = 900_000 + len(driver)
    user = FIRST_USER + ROWS + 50 + len(driver)  # a user no other test has rows for

    async def run() -> list[tuple[Any, ...]]:
        async with AsyncRouter(world.topology_with(driver)) as aio:
            await aio.execute(
                "INSERT INTO vals (id, user_id, bin, status) VALUES (:i, :u, :b, 'new')",
                {"i": row_id, "u": user, "b": value},
            )
            try:
                found = await aio.execute(
                    "SELECT bin FROM vals WHERE user_id = :u AND bin = :b", {"u": user, "b": value}
                )
                return _rows(found)
            finally:
                await aio.execute("DELETE FROM vals WHERE user_id = :u", {"u": user})

    assert asyncio.run(run()) == [(value,)]


# -- 2. LazyRows on a real result ---------------------------------------------------------------


def _check_lazy_rows(lazy: Any, eager: list[tuple[Any, ...]]) -> None:
    assert isinstance(lazy, LazyRows) and isinstance(eager, list)
    n = len(eager)
    assert len(lazy) == n > 10
    assert lazy[0] == eager[0] and lazy[5] == eager[5]
    assert lazy[-1] == eager[-1] and lazy[-n] == eager[0]
    assert lazy[2:6] == eager[2:6] and lazy[::7] == eager[::7] and lazy[-3:] == eager[-3:]
    assert lazy[n:] == []
    assert lazy[3] == lazy[3] == eager[3]  # one row read twice
    first, second = list(lazy), list(lazy)
    assert first == second == eager
    assert all(isinstance(r, tuple) for r in first)
    with pytest.raises(IndexError):
        lazy[n]


LAZY_SQL = f"SELECT {COLUMNS} FROM vals ORDER BY id"


def test_lazy_rows_of_a_real_pymysql_result(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    shard = "s1"
    topology = world.topology_with("pymysql")
    with Router(topology) as router:
        pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
        try:
            lazy = pool.run(LAZY_SQL, {}, lazy=True)
            eager = pool.run(LAZY_SQL, {}, lazy=False)
            assert lazy.columns == eager.columns == tuple(COLUMNS.split(", "))
            assert lazy.rowcount == eager.rowcount == len(eager.rows)
            # The connection served other statements since: the packets decode all the same.
            assert pool.run("SELECT 1 AS one", {}, lazy=True).rows[0] == (1,)
            _check_lazy_rows(lazy.rows, eager.rows)
            expected = [r for r in world.rows if topology.shard_for("vals", r["user_id"]) == shard]
            assert [r[0] for r in lazy.rows] == [r["id"] for r in expected]
            assert [r[5] for r in lazy.rows] == [r["name"] for r in expected]
            assert [r[6] for r in lazy.rows] == [r["bin"] for r in expected]
        finally:
            pool.close()


def test_lazy_rows_of_a_real_aiomysql_result(world: World) -> None:
    shard = "s2"
    topology = world.topology_with("aiomysql")
    spec = topology.shards[shard]

    async def run() -> tuple[Any, Any]:
        engine = make_async_engine(spec.primary, spec.pool)
        pool = AsyncReadPool(engine, shard, spec.pool)
        try:
            lazy = await pool.run(LAZY_SQL, {}, lazy=True)
            eager = await pool.run(LAZY_SQL, {}, lazy=False)
            assert (await pool.run("SELECT 2 AS two", {}, lazy=True)).rows[0] == (2,)
            return lazy, eager
        finally:
            pool.close()
            await engine.dispose()

    lazy, eager = asyncio.run(run())
    _check_lazy_rows(lazy.rows, eager.rows)
    expected = [r for r in world.rows if topology.shard_for("vals", r["user_id"]) == shard]
    assert [r[0] for r in lazy.rows] == [r["id"] for r in expected]
    assert [r[3] for r in lazy.rows] == [r["amount"] for r in expected]


# -- 3. a connection killed server-side ---------------------------------------------------------


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_ping_replaces_a_killed_connection(
    world: World, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    shard = "s0"
    user = world.user_on(shard)
    with Router(world.topology_with(driver)) as router:
        first = router.execute(CID, {"u": user}).one()
        assert first[1] == world.row_of(user)["id"]
        assert router.execute(CID, {"u": user}).one()[0] == first[0]  # kept and reused
        _kill(world, shard, first[0])
        monkeypatch.setattr(readpool, "IDLE_CHECK_S", 0.0)
        again = router.execute(CID, {"u": user}).one()
        assert again[1] == first[1]
        assert again[0] != first[0]  # the ping found it dead and a new one was made


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_ping_replaces_a_killed_connection_async(
    world: World, monkeypatch: pytest.MonkeyPatch, driver: str
) -> None:
    shard = "s3"
    user = world.user_on(shard)

    async def run() -> None:
        async with AsyncRouter(world.topology_with(driver)) as aio:
            first = (await aio.execute(CID, {"u": user})).one()
            assert first[1] == world.row_of(user)["id"]
            await asyncio.to_thread(_kill, world, shard, first[0])
            monkeypatch.setattr(readpool, "IDLE_CHECK_S", 0.0)
            again = (await aio.execute(CID, {"u": user})).one()
            assert again[1] == first[1] and again[0] != first[0]

    asyncio.run(run())


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_without_pre_ping_a_killed_connection_fails_once(world: World, driver: str) -> None:
    shard = "s1"
    user = world.user_on(shard)
    with Router(world.topology_with(driver, pre_ping=False)) as router:
        cid = router.execute(CID, {"u": user}).one()[0]
        _kill(world, shard, cid)
        time.sleep(0.05)
        with pytest.raises(ShardUnavailableError) as failed:
            router.execute(CID, {"u": user})
        assert type(failed.value) is ShardUnavailableError and failed.value.shard == shard
        again = router.execute(CID, {"u": user}).one()
        assert again[1] == world.row_of(user)["id"] and again[0] != cid


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_without_pre_ping_a_killed_connection_fails_once_async(world: World, driver: str) -> None:
    shard = "s2"
    user = world.user_on(shard)

    async def run() -> None:
        async with AsyncRouter(world.topology_with(driver, pre_ping=False)) as aio:
            cid = (await aio.execute(CID, {"u": user})).one()[0]
            await asyncio.to_thread(_kill, world, shard, cid)
            with pytest.raises(ShardUnavailableError) as failed:
                await aio.execute(CID, {"u": user})
            assert type(failed.value) is ShardUnavailableError and failed.value.shard == shard
            again = (await aio.execute(CID, {"u": user})).one()
            assert again[1] == world.row_of(user)["id"] and again[0] != cid

    asyncio.run(run())


def test_recycle_replaces_old_connections(world: World) -> None:
    shard = "s0"
    user = world.user_on(shard)
    with Router(world.topology_with("pymysql", recycle_s=0)) as router:
        ids = [router.execute(CID, {"u": user}).one()[0] for _ in range(2)]
        time.sleep(0.01)
        ids.append(router.execute(CID, {"u": user}).one()[0])
    assert len(set(ids)) == 3


# -- 4. the size + max_overflow cap -------------------------------------------------------------

SLEEPY = "SELECT SLEEP(1.2) AS z, id FROM vals WHERE user_id = :u"
TIGHT = {"size": 1, "max_overflow": 0, "timeout_s": 0.5}


def _check_exhausted(error: BaseException, elapsed: float, shard: str) -> None:
    assert type(error) is ShardUnavailableError
    assert error.shard == shard  # type: ignore[attr-defined]
    message = str(error)
    assert "timeout_s=0.5" in message and "1 open" in message, message
    assert "size + max_overflow" in message, message
    assert 0.45 <= elapsed < 1.1, elapsed


@pytest.mark.parametrize("driver", SYNC_DRIVERS)
def test_exhausted_pool_fails_after_timeout(world: World, driver: str) -> None:
    shard = "s2"
    holder_user, other_user = world.user_on(shard, 0), world.user_on(shard, 1)
    with Router(world.topology_with(driver, **TIGHT)) as router:
        held: list[Any] = []
        holder = threading.Thread(
            target=lambda: held.append(_rows(router.execute(SLEEPY, {"u": holder_user})))
        )
        holder.start()
        try:
            time.sleep(0.2)
            start = time.monotonic()
            with pytest.raises(ShardUnavailableError) as exhausted:
                router.execute(POINT, {"u": other_user})
            _check_exhausted(exhausted.value, time.monotonic() - start, shard)
        finally:
            holder.join(5)
        assert held == [[(0, world.row_of(holder_user)["id"])]]
        # The cap only bounds concurrency: free again, the next read goes through.
        row = world.row_of(other_user)
        assert router.execute(POINT, {"u": other_user}).one() == (row["id"], row["status"])
        # Another shard was never capped by this one.
        far = world.user_on("s0")
        assert router.execute(POINT, {"u": far}).one()[0] == world.row_of(far)["id"]


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_exhausted_pool_fails_after_timeout_async(world: World, driver: str) -> None:
    shard = "s3"
    holder_user, other_user = world.user_on(shard, 0), world.user_on(shard, 1)

    async def run() -> None:
        async with AsyncRouter(world.topology_with(driver, **TIGHT)) as aio:
            holder = asyncio.create_task(aio.execute(SLEEPY, {"u": holder_user}))
            await asyncio.sleep(0.2)
            start = time.monotonic()
            with pytest.raises(ShardUnavailableError) as exhausted:
                await aio.execute(POINT, {"u": other_user})
            _check_exhausted(exhausted.value, time.monotonic() - start, shard)
            assert _rows(await holder) == [(0, world.row_of(holder_user)["id"])]
            row = world.row_of(other_user)
            assert (await aio.execute(POINT, {"u": other_user})).one() == (
                row["id"],
                row["status"],
            )

    asyncio.run(run())


# -- 5. cancellation drops the connection -------------------------------------------------------


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_async_timeout_drops_the_connection(world: World, driver: str) -> None:
    shard = "s1"
    user = world.user_on(shard)
    topology = world.topology_with(
        driver, size=1, max_overflow=0, query_timeout_s=0.5, lock_wait_timeout_s=0
    )

    async def run() -> None:
        async with AsyncRouter(topology) as aio:
            cid = (await aio.execute(CID, {"u": user})).one()[0]
            start = time.monotonic()
            with pytest.raises(ShardUnavailableError) as timed_out:
                await aio.execute(
                    "SELECT SLEEP(3) AS z, id FROM vals WHERE user_id = :u", {"u": user}
                )
            elapsed = time.monotonic() - start
            assert type(timed_out.value) is ShardUnavailableError
            assert "query_timeout_s=0.5" in str(timed_out.value)
            assert 0.45 <= elapsed < 1.2, elapsed
            start = time.monotonic()
            again = (await aio.execute(CID, {"u": user})).one()
            assert time.monotonic() - start < 0.4
            # The right row on a new connection: the cancelled one, mid-answer, was not reused.
            assert again[1] == world.row_of(user)["id"] and again[0] != cid
            # and its slot was given back: a second read still finds one.
            assert (await aio.execute(POINT, {"u": user})).one()[0] == again[1]

    asyncio.run(run())


# -- 6. % in SQL literals on every driver -------------------------------------------------------


@pytest.mark.parametrize("driver", ALL_DRIVERS)
def test_percent_in_literals(world: World, driver: str) -> None:
    def ids(keep: Callable[[dict[str, Any]], bool]) -> list[tuple[Any, ...]]:
        return [(r["id"], r["status"]) for r in world.rows if keep(r)]

    pa_user = next(r["user_id"] for r in world.rows if r["status"] == "pa%")
    like_pa = ids(lambda r: r["status"].lower().startswith("pa"))
    assert {s for _, s in like_pa} == {"paid", "pa%", "PA-x"}  # LIKE ignores case
    queries = [
        ("SELECT id, status FROM vals WHERE status LIKE 'pa%' ORDER BY id", {}),
        (
            "SELECT id, status FROM vals WHERE status LIKE 'pa%' AND id >= :lo ORDER BY id",
            {"lo": 50},
        ),
        ("SELECT id, status FROM vals WHERE status IN ('50%s', :s) ORDER BY id", {"s": "new"}),
        ("SELECT id, status FROM vals WHERE status LIKE '%pa' ORDER BY id", {}),
        ("SELECT id, status FROM vals WHERE user_id = :u AND status LIKE 'pa%'", {"u": pa_user}),
        (f"SELECT id, status FROM vals WHERE user_id = {pa_user} AND status LIKE '%\\%'", {}),
        ("SELECT id, status FROM vals WHERE status = '50%s' OR status = 'pa%' ORDER BY id", {}),
        (f"SELECT id, status FROM vals WHERE user_id = {pa_user} AND status = 'pa%'", {}),
    ]
    expected = [
        like_pa,
        [r for r in like_pa if r[0] >= 50],
        ids(lambda r: r["status"] in ("50%s", "new")),
        ids(lambda r: r["status"].lower().endswith("pa")),
        [(world.row_of(pa_user)["id"], "pa%")],
        [(world.row_of(pa_user)["id"], "pa%")],
        ids(lambda r: r["status"] in ("50%s", "pa%")),
        [(world.row_of(pa_user)["id"], "pa%")],
    ]
    assert all(expected) and len(expected[2]) == 2 * ROWS // len(STATUSES)
    got = _through(world.topology_with(driver), driver, queries)
    for (sql, params), want, rows in zip(queries, expected, got, strict=True):
        assert rows == want, sql
        assert _oracle(world, sql, params) == want, sql


# -- 7. a missing parameter ---------------------------------------------------------------------


@pytest.mark.parametrize("driver", ALL_DRIVERS)
def test_missing_parameter_is_named(world: World, driver: str) -> None:
    user = world.user_on("s0")
    point = ("SELECT id FROM vals WHERE user_id = :u AND big > :bmin", {"u": user})
    scatter = ("SELECT id FROM vals WHERE big > :floor_big ORDER BY id LIMIT 3", {"other": 1})
    errors: list[BaseException] = []
    topology = world.topology_with(driver)
    if driver in SYNC_DRIVERS:
        with Router(topology) as router:
            for sql, params in (point, scatter):
                with pytest.raises(ExecutionError) as caught:
                    router.execute(sql, params)
                errors.append(caught.value)
            assert router.execute(POINT, {"u": user}).one()[0] == world.row_of(user)["id"]
    else:

        async def run() -> None:
            async with AsyncRouter(topology) as aio:
                for sql, params in (point, scatter):
                    with pytest.raises(ExecutionError) as caught:
                        await aio.execute(sql, params)
                    errors.append(caught.value)
                assert (await aio.execute(POINT, {"u": user})).one()[0] == world.row_of(user)["id"]

        asyncio.run(run())
    point_error, scatter_error = errors
    assert type(point_error) is ExecutionError and ":bmin" in str(point_error), point_error
    assert "u" in str(point_error)  # and names what was given
    assert type(scatter_error) is ExecutionError and ":floor_big" in str(scatter_error)
    assert "other" in str(scatter_error)


# -- 7b. a statement error drops the connection -------------------------------------------------


@pytest.mark.parametrize("driver", ALL_DRIVERS)
def test_statement_error_drops_the_connection(world: World, driver: str) -> None:
    shard = "s3"
    user = world.user_on(shard, 2)
    bad_point = ("SELECT nope FROM vals WHERE user_id = :u", {"u": user})
    bad_scatter = ("SELECT nope FROM vals ORDER BY id LIMIT 3", {})  # a lazy job, if lazy
    topology = world.topology_with(driver)
    cids: list[int] = []
    errors: list[BaseException] = []
    if driver in SYNC_DRIVERS:
        with Router(topology) as router:
            for sql, params in (bad_point, bad_scatter):
                cids.append(router.execute(CID, {"u": user}).one()[0])
                with pytest.raises(ExecutionError) as caught:
                    router.execute(sql, params)
                errors.append(caught.value)
            cids.append(router.execute(CID, {"u": user}).one()[0])
    else:

        async def run() -> None:
            async with AsyncRouter(topology) as aio:
                for sql, params in (bad_point, bad_scatter):
                    cids.append((await aio.execute(CID, {"u": user})).one()[0])
                    with pytest.raises(ExecutionError) as caught:
                        await aio.execute(sql, params)
                    errors.append(caught.value)
                cids.append((await aio.execute(CID, {"u": user})).one()[0])

        asyncio.run(run())
    for error in errors:
        assert type(error) is ExecutionError and "1054" in str(error), error
    assert errors[0].shard == shard  # type: ignore[attr-defined]
    assert len(set(cids)) == 3, cids  # a new connection after each failed statement


# -- 8. no snapshot kept between reads ----------------------------------------------------------


def _set_marks(world: World, values: dict[int, int]) -> None:
    """Write marks rows through plain connections to their shards, committed, one per shard."""
    by_shard: dict[str, list[tuple[int, int]]] = {}
    for user, v in values.items():
        by_shard.setdefault(world.topology.shard_for("marks", user), []).append((user, v))
    for shard, pairs in by_shard.items():
        conn = _admin(world.url(shard), world.databases[shard])
        try:
            conn.autocommit(False)
            with conn.cursor() as cur:
                cur.executemany(
                    "INSERT INTO marks (user_id, v) VALUES (%s, %s)"
                    " ON DUPLICATE KEY UPDATE v = VALUES(v)",
                    pairs,
                )
            conn.commit()
        finally:
            conn.close()


MARK = "SELECT CONNECTION_ID() AS cid, v FROM marks WHERE user_id = :u"
MARKS = "SELECT user_id, v FROM marks WHERE user_id BETWEEN :lo AND :hi ORDER BY user_id"


def test_reads_see_commits_made_elsewhere(world: World) -> None:
    users = list(range(500, 520))
    _set_marks(world, dict.fromkeys(users, 1))
    with Router(world.topology_with("pymysql")) as router:
        cid, v = router.execute(MARK, {"u": users[0]}).one()
        assert v == 1
        assert _rows(router.execute(MARKS, {"lo": 500, "hi": 519})) == [(u, 1) for u in users]
        _set_marks(world, dict.fromkeys(users, 2))
        again = router.execute(MARK, {"u": users[0]}).one()
        assert again == (cid, 2)  # the same connection, no snapshot of the first read
        assert _rows(router.execute(MARKS, {"lo": 500, "hi": 519})) == [(u, 2) for u in users]


def test_reads_see_commits_made_elsewhere_async(world: World) -> None:
    users = list(range(600, 620))
    _set_marks(world, dict.fromkeys(users, 1))

    async def run() -> None:
        async with AsyncRouter(world.topology_with("aiomysql")) as aio:
            cid, v = (await aio.execute(MARK, {"u": users[0]})).one()
            assert v == 1
            assert _rows(await aio.execute(MARKS, {"lo": 600, "hi": 619})) == [
                (u, 1) for u in users
            ]
            await asyncio.to_thread(_set_marks, world, dict.fromkeys(users, 2))
            assert (await aio.execute(MARK, {"u": users[0]})).one() == (cid, 2)
            assert _rows(await aio.execute(MARKS, {"lo": 600, "hi": 619})) == [
                (u, 2) for u in users
            ]

    asyncio.run(run())


# -- 9. the statement log -----------------------------------------------------------------------

SCATTER_LOGGED = "SELECT id, big FROM {table} WHERE id > :floor ORDER BY big, id LIMIT 4"


def _sql_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "shardrouter.sql"]


def _check_scatter_log(records: list[logging.LogRecord], table: str) -> None:
    assert sorted(r.shard for r in records) == ["s0", "s1", "s2", "s3"]  # type: ignore[attr-defined]
    for record in records:
        assert record.levelno == logging.DEBUG
        assert f"FROM {table}" in record.statement  # type: ignore[attr-defined]
        assert record.params["floor"] == 3  # type: ignore[attr-defined]


@pytest.mark.parametrize("table", ["vals", "svals"])
def test_statement_log_one_record_per_shard(
    world: World, caplog: pytest.LogCaptureFixture, table: str
) -> None:
    user = world.user_on("s2")
    with Router(world.topology_with("pymysql")) as router:
        caplog.set_level(logging.DEBUG, logger="shardrouter.sql")
        rows = _rows(router.execute(SCATTER_LOGGED.format(table=table), {"floor": 3}))
        assert len(rows) == 4
        _check_scatter_log(_sql_records(caplog), table)
        caplog.clear()
        router.execute(POINT, {"u": user})
        (point,) = _sql_records(caplog)
        assert point.shard == "s2" and point.params == {"u": user}  # type: ignore[attr-defined]
        assert "user_id" in point.statement  # type: ignore[attr-defined]
        caplog.clear()
        with router.transaction() as txn:  # the SQLAlchemy path logs the same way
            txn.execute(POINT, {"u": user})
        (in_txn,) = _sql_records(caplog)
        assert in_txn.shard == "s2" and in_txn.params == {"u": user}  # type: ignore[attr-defined]


def test_statement_log_one_record_per_shard_async(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    async def run() -> None:
        async with AsyncRouter(world.topology_with("aiomysql")) as aio:
            caplog.set_level(logging.DEBUG, logger="shardrouter.sql")
            rows = _rows(await aio.execute(SCATTER_LOGGED.format(table="svals"), {"floor": 3}))
            assert len(rows) == 4

    asyncio.run(run())
    _check_scatter_log(_sql_records(caplog), "svals")


# -- 10. close() closes the lean connections ----------------------------------------------------

SCATTER_ALL = "SELECT id FROM vals ORDER BY id LIMIT 3"


def _all_ids(world: World) -> dict[str, set[int]]:
    return {sid: _process_ids(world.url(sid), db) for sid, db in world.databases.items()}


def _new_since(world: World, before: dict[str, set[int]]) -> dict[str, set[int]]:
    return {sid: ids - before[sid] for sid, ids in _all_ids(world).items()}


def test_close_closes_lean_connections(world: World) -> None:
    before = _all_ids(world)
    router = Router(world.topology_with("pymysql"))
    try:
        assert _rows(router.execute(SCATTER_ALL)) == [(1,), (2,), (3,)]
        opened = _new_since(world, before)
        assert all(len(ids) == 1 for ids in opened.values()), opened  # one per shard
    finally:
        router.close()
    assert _wait_for(lambda: all(not ids for ids in _new_since(world, before).values()))


@pytest.mark.parametrize("driver", ASYNC_DRIVERS)
def test_close_closes_lean_connections_async(world: World, driver: str) -> None:
    before = _all_ids(world)

    def all_gone() -> bool:
        return all(not ids for ids in _new_since(world, before).values())

    async def run() -> tuple[dict[str, set[int]], bool]:
        aio = AsyncRouter(world.topology_with(driver))
        try:
            assert _rows(await aio.execute(SCATTER_ALL)) == [(1,), (2,), (3,)]
            opened = await asyncio.to_thread(_new_since, world, before)
        finally:
            await aio.close()
        # Checked while the router (and so every connection object) is still referenced and
        # the loop still runs: closed by close(), not by garbage collection after the loop.
        gone = await asyncio.to_thread(_wait_for, all_gone)
        assert aio._lean  # the lean pools were made (and are still held here)
        return opened, gone

    opened, gone = asyncio.run(run())
    assert all(len(ids) == 1 for ids in opened.values()), opened
    assert gone, _new_since(world, before)


# -- 10. the sync scatter pipelines (PyMySQL): sent to every shard before any answer is read ----


def _waiting_reads(world: World) -> int:
    """This module's reads of vals running (waiting) on the shards now."""
    return _statements(world, "SELECT%FROM vals%")


@contextlib.contextmanager
def _tables_locked(world: World) -> Iterator[None]:
    """Every shard's vals tables locked for writing by a plain connection: reads of them wait
    until the block ends."""
    held = []
    try:
        for sid, database in world.databases.items():
            conn = _admin(world.url(sid), database)
            held.append(conn)
            names = world.topology.table("vals").physical_names
            with conn.cursor() as cur:
                cur.execute("LOCK TABLES " + ", ".join(f"{n} WRITE" for n in names))
        yield
    finally:
        for conn in held:
            with contextlib.suppress(Exception):
                conn.cursor().execute("UNLOCK TABLES")
            conn.close()


SCATTER_IDS = "SELECT id, user_id FROM vals ORDER BY id LIMIT 7"


def test_scatter_pipelines_without_threads(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every shard is sent its statement before any answer is read: with the shards' tables
    locked, all four reads wait on their servers at once; no thread is used."""
    expected = _oracle(world, SCATTER_IDS)

    def refuse(*args: Any) -> Any:
        raise AssertionError("the scatter went to the thread pool")

    with Router(world.topology_with("pymysql")) as router:
        router.execute(SCATTER_IDS)  # connections made
        monkeypatch.setattr(Router, "_threaded", refuse)
        found: dict[str, Any] = {}
        with _tables_locked(world):
            reader = threading.Thread(
                target=lambda: found.update(rows=_rows(router.execute(SCATTER_IDS)))
            )
            reader.start()
            deadline = time.monotonic() + 3
            while _waiting_reads(world) < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
            waiting = _waiting_reads(world)
        reader.join(5)
    assert waiting == 4  # one caller thread, four statements in flight
    assert found["rows"] == expected


def test_mysqlclient_scatters_on_threads(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    """mysqlclient's statements are sent by its C code, so it cannot pipeline: threads."""
    used = []
    real = Router._threaded

    def spy(self: Router, *args: Any) -> Any:
        used.append(1)
        return real(self, *args)

    monkeypatch.setattr(Router, "_threaded", spy)
    with Router(world.topology_with("mysqldb")) as router:
        assert _rows(router.execute("SELECT COUNT(*) FROM vals")) == [(ROWS,)]
    assert used


def test_pipelined_scatter_never_waits_holding_connections(world: World) -> None:
    """One connection per shard. A scatter finds shard s2's taken (a slow read): it reads the
    other shards' answers, returns their connections, then waits for s2. Meanwhile a read on
    s0 gets s0's only connection at once: the waiting scatter holds none."""
    shard = "s2"
    holder_user = world.user_on(shard, 0)
    tight = {"size": 1, "max_overflow": 0, "timeout_s": 3.0}
    with Router(world.topology_with("pymysql", **tight)) as router:
        router.execute("SELECT COUNT(*) FROM vals")  # one idle connection per shard
        results: dict[str, Any] = {}

        def hold() -> None:
            results["held"] = _rows(router.execute(SLEEPY, {"u": holder_user}))

        def scatter() -> None:
            results["scatter"] = _rows(router.execute("SELECT COUNT(*), SUM(id) FROM vals"))

        holder = threading.Thread(target=hold)
        holder.start()
        time.sleep(0.3)  # the holder has s2's connection, sleeping 1.2 s
        waiting = threading.Thread(target=scatter)
        waiting.start()
        time.sleep(0.3)  # the scatter has read s0, s1, s3 and waits for s2
        far = world.user_on("s0")
        started = time.monotonic()
        point = router.execute(POINT, {"u": far}).one()
        took = time.monotonic() - started
        holder.join(5)
        waiting.join(5)
    assert point[0] == world.row_of(far)["id"]
    assert took < 0.3, took  # s0's connection was free, not held by the waiting scatter
    assert results["held"] == [(0, world.row_of(holder_user)["id"])]
    assert results["scatter"] == [(ROWS, sum(r["id"] for r in world.rows))]


class _Interrupt(BaseException):
    """What a signal handler or a killed greenlet raises mid-read."""


def test_interrupted_pipelined_scatter_stops_every_statement(world: World) -> None:
    """Interrupted while waiting for the answers: the unread connections are dropped and
    their statements stopped on their servers (KILL QUERY), not left waiting there."""
    import signal

    def interrupt(signum: int, frame: Any) -> None:
        raise _Interrupt()

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with Router(world.topology_with("pymysql")) as router:
            with _tables_locked(world):
                signal.setitimer(signal.ITIMER_REAL, 0.4)
                with pytest.raises(_Interrupt):
                    router.execute(SCATTER_IDS)
                signal.setitimer(signal.ITIMER_REAL, 0)
                deadline = time.monotonic() + 2
                while _waiting_reads(world) and time.monotonic() < deadline:
                    time.sleep(0.05)
                left = _waiting_reads(world)  # the locks are still held
            assert left == 0
            # the pool's count of connections in use is back: reads go on
            assert _rows(router.execute("SELECT COUNT(*) FROM vals")) == [(ROWS,)]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# -- 11. PyMySQL's rows read straight from the socket file: every protocol case ------------------


@pytest.mark.timeout(120)
def test_a_row_over_16_mb_through_the_row_reader(world: World) -> None:
    """A row packet of 16 MB or more comes in two protocol packets: joined, as PyMySQL joins
    them; the connection stays in step for the next statement."""
    shard = "s1"
    admin = _admin(world.url(shard))
    with admin.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.max_allowed_packet")
        before = int(cur.fetchone()[0])
        cur.execute("SET GLOBAL max_allowed_packet = 67108864")  # new connections: 64 MB
    try:
        topology = world.topology_with("pymysql")
        with Router(topology) as router:
            pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
            try:
                sql = "SELECT id, REPEAT('ab', 8500000) AS big, name FROM vals ORDER BY id LIMIT 3"
                rows = list(pool.run(sql, {}, lazy=True).rows)
                ids = sorted(
                    r["id"] for r in world.rows if topology.shard_for("vals", r["user_id"]) == shard
                )[:3]
                assert [r[0] for r in rows] == ids
                assert all(r[1] == "ab" * 8_500_000 for r in rows)
                assert [r[2] for r in rows] == [world.rows[i - 1]["name"] for i in ids]
                assert pool.run("SELECT 1 AS one", {}).rows == [(1,)]
            finally:
                pool.close()
    finally:
        with admin.cursor() as cur:
            cur.execute(f"SET GLOBAL max_allowed_packet = {before}")
        admin.close()


def test_an_error_after_the_first_rows_is_raised(world: World) -> None:
    """A statement that fails after sending rows (a subquery that returns two rows for the
    second row): the server's error, classified; the pool goes on with a fresh connection."""
    shard = "s2"
    topology = world.topology_with("pymysql")
    sql = (
        "SELECT v.id, (SELECT v2.id FROM vals v2 WHERE v2.id <= v.id) AS s"
        " FROM vals v ORDER BY v.id"
    )
    with Router(topology) as router:
        pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
        try:
            with pytest.raises(ExecutionError, match="1242"):
                pool.run(sql, {}, lazy=True)
            assert pool.run("SELECT 2 AS two", {}).rows == [(2,)]
        finally:
            pool.close()


def test_column_definitions_parsed_once_per_connection(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lean PyMySQL connection parses a result's column definitions the first time it sees
    those exact bytes, then reuses them; other columns (another alias, another type) are
    parsed for themselves, and every answer is the one a fresh parse gives."""
    parsed: list[int] = []
    real = pymysql.connections.MySQLResult._get_descriptions

    def spy(self: Any) -> None:
        parsed.append(1)
        real(self)

    monkeypatch.setattr(pymysql.connections.MySQLResult, "_get_descriptions", spy)
    shard = "s3"
    topology = world.topology_with("pymysql", size=1, max_overflow=0)
    user = world.user_on(shard)
    row = world.row_of(user)
    with Router(topology) as router:
        first = router.execute(f"SELECT {COLUMNS} FROM vals WHERE user_id = :u", {"u": user})
        again = router.execute(f"SELECT {COLUMNS} FROM vals WHERE user_id = :u", {"u": user})
        assert len(parsed) == 1  # the second answer reused the first's columns
        assert first.columns == again.columns == tuple(COLUMNS.split(", "))
        assert _rows(first) == _rows(again) and _rows(first)[0][0] == row["id"]
        renamed = router.execute("SELECT id AS other, at FROM vals WHERE user_id = :u", {"u": user})
        assert renamed.columns == ("other", "at") and len(parsed) == 2
        assert _rows(renamed) == [(row["id"], row["at"])]
        retyped = router.execute(
            "SELECT name AS other, id FROM vals WHERE user_id = :u", {"u": user}
        )
        assert retyped.columns == ("other", "id") and len(parsed) == 3
        assert _rows(retyped) == [(row["name"], row["id"])]
