"""Review 19: the pipelined sync scatter (e287cfa) and the PyMySQL row reader (09fedb3), on the
real MariaDB sandbox. Reuses test_readpool's world (vals/svals/marks on four shards).

Found (each failed; fixed since, each passes):
- test_row_of_exactly_16mb_minus_one_bytes                  (reader: IndexError)
- test_row_whose_continuation_starts_with_0xff              (reader: a row byte read as an error)
- test_big_results_behind_a_slow_shard_are_not_cut_off[pipelined]      (net_write_timeout)
- test_a_dead_shard_does_not_churn_the_healthy_shards_connections[pipelined]
  ([threaded] variants pass: the pipeline is what changed)

PASSING (behaviour pinned):
- test_lazy_rows_equal_pymysql_cursor_over_many_types
- test_send_failing_on_a_later_shard_reads_the_sent_ones (was: stops them; changed with the
  fix of the dead-shard finding: the sent answers are read, the connections kept)
- test_many_threads_scatter_on_tight_pools_no_slot_leak
- test_same_shard_twice_on_a_one_connection_pool
- test_error_packet_mid_result_in_a_pipelined_scatter
- test_timeout_mid_rows_in_a_pipelined_scatter
"""

# ruff: noqa: F811  (the `world` fixture is imported from test_readpool and taken as a parameter)
from __future__ import annotations

import contextlib
import copy
import threading
import time
from collections.abc import Iterator
from typing import Any

import pymysql
import pytest
from sqlalchemy.engine import make_url
from test_readpool import (  # noqa: F401  (fixtures)
    POINT,
    ROWS,
    World,
    _admin,
    _no_sleepers_left,
    _rows,
    _statements,
    world,
)

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.readpool import ReadPool
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, ShardUnavailableError
from shardrouter.sql.execution import Job

pytestmark = [pytest.mark.mariadb]


@contextlib.contextmanager
def _max_packet(world: World, shard: str) -> Iterator[None]:
    admin = _admin(world.url(shard))
    with admin.cursor() as cur:
        cur.execute("SELECT @@GLOBAL.max_allowed_packet")
        before = int(cur.fetchone()[0])
        cur.execute("SET GLOBAL max_allowed_packet = 67108864")  # new connections: 64 MB
    try:
        yield
    finally:
        with admin.cursor() as cur:
            cur.execute(f"SET GLOBAL max_allowed_packet = {before}")
        admin.close()


def _plain(world: World, shard: str, sql: str) -> list[tuple[Any, ...]]:
    """PyMySQL's own eager answer (a plain cursor on the shard's database)."""
    url = world.url(shard)
    conn = _admin(url, world.databases[shard])
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return [tuple(r) for r in cur.fetchall()]
    finally:
        conn.close()


# -- the 16 MB boundary -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_row_of_exactly_16mb_minus_one_bytes(world: World) -> None:
    """FAILS. A row packet of exactly 2**24-1 bytes is followed by an EMPTY continuation
    packet. _slow_rest reads that continuation with conn._read_packet(), which calls
    MysqlPacket(b'').is_error_packet() -> self._data[0] -> IndexError (raised as it is,
    not even classified). PyMySQL's own reader joins the parts in one _read_packet call."""
    shard = "s1"
    # payload = 0xFD + 3 length bytes + N bytes of the one column = 2**24 - 1
    n = 2**24 - 1 - 4
    sql = f"SELECT REPEAT('a', {n}) AS big"
    with _max_packet(world, shard):
        topology = world.topology_with("pymysql")
        with Router(topology) as router:
            pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
            try:
                rows = list(pool.run(sql, {}, lazy=True).rows)
                assert len(rows) == 1 and len(rows[0][0]) == n
                assert pool.run("SELECT 1 AS one", {}).rows == [(1,)]
            finally:
                pool.close()


@pytest.mark.timeout(120)
def test_row_whose_continuation_starts_with_0xff(world: World) -> None:
    """FAILS. A row over 16 MB whose byte at payload offset 2**24-1 is 0xFF: the continuation
    packet starts with 0xFF and _slow_rest's separate conn._read_packet() takes it for an error
    packet (raise_for_error on row data): a bogus error for a valid row. PyMySQL's own
    cursor reads it fine."""
    shard = "s1"
    n = 2**24 - 1 - 9  # 0xFE + 8 length bytes, then the column's bytes before the boundary
    sql = f"SELECT CONCAT(REPEAT(X'61', {n}), X'FF', REPEAT(X'62', 1000)) AS big"
    with _max_packet(world, shard):
        expected = _plain(world, shard, sql)
        assert len(expected[0][0]) == n + 1001
        topology = world.topology_with("pymysql")
        with Router(topology) as router:
            pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
            try:
                rows = list(pool.run(sql, {}, lazy=True).rows)
                assert rows == expected
            finally:
                pool.close()


# -- lazy decoding == PyMySQL's eager decoding --------------------------------------------------

TYPES_DDL = (
    "CREATE TABLE IF NOT EXISTS r19_types (id INT PRIMARY KEY, d DECIMAL(30,10) NULL,"
    " dt6 DATETIME(6) NULL, t TIME(6) NULL, b BIT(10) NULL, j JSON NULL, bl BLOB NULL,"
    " s VARCHAR(32) CHARACTER SET utf8mb4 NULL, e ENUM('a','b','') NULL, st SET('x','y') NULL,"
    " f DOUBLE NULL, fl FLOAT NULL, y YEAR NULL, da DATE NULL, ts TIMESTAMP(3) NULL,"
    " u BIGINT UNSIGNED NULL, c CHAR(3) NULL, tx TEXT NULL) DEFAULT CHARSET=utf8mb4"
)
TYPES_ROWS = [
    "(1, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,"
    " NULL, NULL, NULL)",
    "(2, -12345678901234567890.0123456789, '2026-01-02 03:04:05.123456', '-838:59:59',"
    " b'1010101010', '{\"a\": [1, 2.5, null]}', X'00FFFEFB', '😀 Grüße', '', 'x,y', 1e300,"
    " 1.5, 2155, '1000-01-01', '2038-01-19 03:14:07.999', 18446744073709551615, 'ab', '')",
    "(3, 0, '0000-00-00 00:00:00', '00:00:00.000001', b'0', '[]', '', '', 'b', '', -0.0, NULL,"
    " 1901, '9999-12-31', NULL, 0, '', REPEAT('z', 70000))",
]


def test_lazy_rows_equal_pymysql_cursor_over_many_types(world: World) -> None:
    """PASSES. LazyRows (read twice: cached) equal a plain PyMySQL cursor, row by row."""
    shard = "s0"
    conn = _admin(world.url(shard), world.databases[shard])
    try:
        with conn.cursor() as cur:
            cur.execute("SET SESSION sql_mode = ''")
            cur.execute("DROP TABLE IF EXISTS r19_types")
            cur.execute(TYPES_DDL)
            cur.execute("INSERT INTO r19_types VALUES " + ", ".join(TYPES_ROWS))
    finally:
        conn.close()
    sql = "SELECT * FROM r19_types ORDER BY id"
    expected = _plain(world, shard, sql)
    topology = world.topology_with("pymysql")
    with Router(topology) as router:
        pool = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
        try:
            lazy = pool.run(sql, {}, lazy=True).rows
            assert [lazy[i] for i in range(len(lazy))] == expected
            assert list(lazy) == expected  # cached rows, same values
            assert list(pool.run(sql, {}).rows) == expected
        finally:
            pool.close()


# -- the pipeline -------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(world: World, shard: str) -> Iterator[pymysql.connections.Connection]:
    conn = _admin(world.url(shard), world.databases[shard])
    names = world.topology.table("vals").physical_names
    with conn.cursor() as cur:
        cur.execute("LOCK TABLES " + ", ".join(f"{n} WRITE" for n in names))
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):
            conn.cursor().execute("UNLOCK TABLES")
        conn.close()


def _global(world: World, shard: str, name: str, value: Any) -> Any:
    admin = _admin(world.url(shard))
    try:
        with admin.cursor() as cur:
            cur.execute(f"SELECT @@GLOBAL.{name}")
            before = cur.fetchone()[0]
            cur.execute(f"SET GLOBAL {name} = {value}")
        return before
    finally:
        admin.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["pipelined", "threaded"])
def test_big_results_behind_a_slow_shard_are_not_cut_off(
    world: World, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """FAILS. The pipeline reads the answers in job order; a shard whose big answer waits in
    its socket behind a slower shard is blocked in its write. MariaDB gives up on a blocked
    write after net_write_timeout and drops the connection: the scatter fails ("Lost
    connection", ShardUnavailableError), where the threaded scatter read every answer at once
    and succeeded. Here net_write_timeout = 2 s on s1..s3 and s0 answers after 4 s (a table
    lock); the same happens with the defaults (60 s) when query_timeout_s is above 60 s.
    [threaded] (the pipeline turned off) passes: the regression is the pipeline's."""
    if path == "threaded":
        monkeypatch.setattr(Router, "_pipelines", lambda self, *a: None)
    sql = "SELECT id, REPEAT('x', 1000000) AS pad FROM vals"
    others = ["s1", "s2", "s3"]
    before = {s: _global(world, s, "net_write_timeout", 2) for s in others}
    try:
        topology = world.topology_with("pymysql", query_timeout_s=30)
        with Router(topology) as router:
            with _locked(world, "s0"):
                out: dict[str, Any] = {}

                def scatter() -> None:
                    try:
                        out["n"] = len(router.execute(sql).rows)
                    except BaseException as exc:
                        out["error"] = exc

                reader = threading.Thread(target=scatter)
                reader.start()
                time.sleep(4.5)
            reader.join(30)
        assert "error" not in out, repr(out.get("error"))
        assert out["n"] == ROWS
    finally:
        for s, v in before.items():
            _global(world, s, "net_write_timeout", v)


@pytest.mark.timeout(60)
def test_send_failing_on_a_later_shard_reads_the_sent_ones(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PASSES (changed after finding 4). The send to s2 fails (its connection refused): the
    statements already sent to s0 and s1 (waiting on their locks, released after 0.5 s) are
    read to their end, as the threaded scatter waits for all its jobs, then the error is
    raised; nothing is left running, every slot is back, and their connections stay pooled
    (no reconnect)."""
    topology = world.topology_with("pymysql")
    with Router(topology) as router:
        router.execute("SELECT COUNT(*) FROM vals")
        real = ReadPool.send

        def send(self: ReadPool, statement: str, params: Any) -> Any:
            if self.shard == "s2":
                raise ShardUnavailableError("s2 refused", shard="s2")
            return real(self, statement, params)

        def idle(shard: str) -> set[int]:
            (pool,) = [p for p in router._snap.lean.values() if p and p.shard == shard]
            return {id(held.conn) for held in pool._idle.free}

        before = {s: idle(s) for s in ("s0", "s1")}
        assert all(before.values())
        monkeypatch.setattr(ReadPool, "send", send)
        with _locked(world, "s0") as lock0, _locked(world, "s1") as lock1:
            unlock = threading.Timer(
                0.5, lambda: [c.cursor().execute("UNLOCK TABLES") for c in (lock0, lock1)]
            )
            unlock.start()
            started = time.monotonic()
            with pytest.raises(ShardUnavailableError):
                router.execute("SELECT id FROM vals ORDER BY id LIMIT 3")
            took = time.monotonic() - started
            unlock.join()
            left = _statements(world, "SELECT%FROM vals%")
        assert left == 0 and 0.4 < took < 5, took
        monkeypatch.setattr(ReadPool, "send", real)
        pools = {p.shard: p for p in router._snap.lean.values() if p}
        size = topology.shards["s0"].pool.size + topology.shards["s0"].pool.max_overflow
        assert all(p._slots._free == size for p in pools.values())
        assert {s: idle(s) for s in ("s0", "s1")} == before  # the same connections, pooled
        assert _rows(router.execute("SELECT COUNT(*) FROM vals")) == [(ROWS,)]


@pytest.mark.timeout(120)
def test_many_threads_scatter_on_tight_pools_no_slot_leak(world: World) -> None:
    """PASSES. 12 threads scatter on one-connection pools (plus point reads and errors): no
    hang, every answer right, every slot back."""
    tight = {"size": 1, "max_overflow": 1, "timeout_s": 20.0}
    topology = world.topology_with("pymysql", **tight)
    errors: list[BaseException] = []
    want = [(ROWS, sum(r["id"] for r in world.rows))]
    with Router(topology) as router:

        def work(i: int) -> None:
            try:
                for k in range(15):
                    if (i + k) % 7 == 0:
                        with pytest.raises(ExecutionError):
                            router.execute("SELECT nope FROM vals")
                    elif (i + k) % 5 == 0:
                        u = world.rows[(i * 7 + k) % ROWS]["user_id"]
                        router.execute("SELECT id FROM vals WHERE user_id = :u", {"u": u})
                    else:
                        got = _rows(router.execute("SELECT COUNT(*), SUM(id) FROM vals"))
                        assert [(int(a), int(b)) for a, b in got] == want
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        for pool in router._snap.lean.values():
            assert pool and pool._slots._free == 2


@pytest.mark.timeout(60)
def test_same_shard_twice_on_a_one_connection_pool(world: World) -> None:
    """PASSES. Two jobs on one shard (svals: two split tables) with one connection: the second
    runs after the first is back."""
    topology = world.topology_with("pymysql", size=1, max_overflow=0, timeout_s=3.0)
    with Router(topology) as router:
        snap = router._snap
        jobs = [
            Job("s1", "SELECT COUNT(*) FROM vals", {}, "read"),
            Job("s1", "SELECT COUNT(*) FROM vals", {}, "read"),
            Job("s2", "SELECT COUNT(*) FROM vals", {}, "read"),
        ]
        got = router._fan_out(jobs, False, snap)
        assert got[0].rows == got[1].rows
        pools = {p.shard: p for p in snap.lean.values() if p}
        assert pools["s1"]._slots._free == 1


@pytest.mark.timeout(60)
def test_error_packet_mid_result_in_a_pipelined_scatter(world: World) -> None:
    """PASSES. One shard fails after its first rows; the others are still read, the error is
    raised, every connection is usable or dropped (the next scatter works)."""
    bad = (
        "SELECT v.id, (SELECT v2.id FROM vals v2 WHERE v2.id <= v.id) AS s"
        " FROM vals v ORDER BY v.id"
    )
    good = "SELECT id, 0 AS s FROM vals ORDER BY id"
    with Router(world.topology_with("pymysql")) as router:
        snap = router._snap
        jobs = [
            Job(s, bad if s == "s1" else good, {}, "read", lazy=True)
            for s in ("s0", "s1", "s2", "s3")
        ]
        with pytest.raises(ExecutionError, match="1242"):
            router._fan_out(jobs, False, snap)
        assert _rows(router.execute("SELECT COUNT(*) FROM vals")) == [(ROWS,)]
        for pool in router._snap.lean.values():
            assert pool and pool._slots._free == pool._pool.size + pool._pool.max_overflow


@pytest.mark.timeout(60)
def test_timeout_mid_rows_in_a_pipelined_scatter(world: World) -> None:
    """PASSES. A shard's read times out (a sleep longer than query_timeout_s): the scatter
    raises ShardUnavailableError, the statement is stopped on its server, the other shards'
    connections go back; slots come back."""
    slow = "SELECT id, SLEEP(IF(id = (SELECT MIN(id) FROM vals), 5, 0)) AS z FROM vals ORDER BY id"
    good = "SELECT id, 0 AS z FROM vals ORDER BY id"
    topology = world.topology_with("pymysql", query_timeout_s=2, lock_wait_timeout_s=0)
    with Router(topology) as router:
        snap = router._snap
        jobs = [Job(s, slow if s == "s2" else good, {}, "read") for s in ("s0", "s1", "s2", "s3")]
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError):
            router._fan_out(jobs, False, snap)
        assert time.monotonic() - started < 4.5
        deadline = time.monotonic() + 3
        while _statements(world, "%SLEEP(IF%") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _statements(world, "%SLEEP(IF%") == 0
        assert _rows(router.execute("SELECT COUNT(*) FROM vals")) == [(ROWS,)]
        for pool in router._snap.lean.values():
            assert pool and pool._slots._free == pool._pool.size + pool._pool.max_overflow


def _connections(world: World, shard: str) -> int:
    admin = _admin(world.url(shard))
    try:
        with admin.cursor() as cur:
            cur.execute("SHOW GLOBAL STATUS LIKE 'Connections'")
            return int(cur.fetchone()[1])
    finally:
        admin.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("path", ["pipelined", "threaded"])
def test_a_dead_shard_does_not_churn_the_healthy_shards_connections(
    world: World, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """FAILS [pipelined]. s1 refuses connections (an outage). Every scatter fails on s1, as
    before; but the pipeline's send to s1 fails after s0's statement was sent, and s0's
    (healthy, finished) read is abandoned: its pooled connection closed and a KILL QUERY sent
    from one more new connection. So each failing scatter opens two connections on every
    healthy shard sent before the dead one: an outage multiplies connection churn on the
    others. [threaded] reuses s0's one pooled connection. (Fix: on an Exception from a send,
    receive the ones sent, as after a receive error; abandon only on an interrupt.)"""
    if path == "threaded":
        monkeypatch.setattr(Router, "_pipelines", lambda self, *a: None)
    raw = copy.deepcopy(world.raw)
    dead = make_url(raw["shards"]["s1"]["primary"]).set(port=1)  # nothing listens there
    raw["shards"]["s1"]["primary"] = dead.render_as_string(hide_password=False)
    topology = Topology(config_from_dict(raw))
    with Router(topology) as router:
        router.execute(POINT, {"u": world.user_on("s0")})  # s0's pooled connection
        time.sleep(0.2)
        before = _connections(world, "s0")
        for _ in range(5):
            with pytest.raises(ShardUnavailableError):
                router.execute("SELECT COUNT(*) FROM vals")
        time.sleep(0.5)  # the kills' threads
        opened = _connections(world, "s0") - before - 1  # - 1: this check's own connection
    assert opened == 0, f"{opened} new connections on healthy s0 for 5 scatters"
