# ruff: noqa: F811  (the `world` fixture is imported from test_router_oracle)
"""Review 23: the sync scatter perf change set (Router._pipelined/_drain/_abandon, the PyMySQL
row reader and lazy decoder, the column-definition cache, Plan.fanout, merge output) attacked
on 4 real MariaDB shards against the one-database oracle.

Found (fails on the current code):
- test_point_reads_on_a_hot_shard_starve_a_scatter: a freed lean connection goes to whoever
  asks next, not to the thread that waits for it; a scatter's job waiting for the busy shard
  fails after pool.timeout_s while that shard's pool serves thousands of reads a second.

Held up (passing, kept as regression tests): many threads on 1- and 2-connection pools mixing
scatters (LIMIT, GROUP BY, DISTINCT aggregates, changing parameters through the fan-out cache),
point reads and failing statements, every answer equal to the oracle's and every slot back;
an interrupt (KeyboardInterrupt) while reading one shard's answer; column types changed by
ALTER TABLE between runs of one statement on pooled connections (the column-definition
cache); merge shapes (LIMIT 0, OFFSET, LIMIT 2**64-1, DISTINCT, HAVING without GROUP BY,
empty aggregates). Also tried, nothing found: bytes parameters in numeric context (X'..' is a
string in MariaDB, as PyMySQL's '..'), _fast_datetime/_fast_date against PyMySQL's converters
on valid, invalid, zero and fractional values.
"""

from __future__ import annotations

import copy
import random
import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from test_review17_union import _oracle
from test_router_oracle import world  # noqa: F401  (4 shards + oracle)

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine import readpool
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _topology(world: dict[str, Any], **pool: Any) -> Topology:
    """The world's topology with ``pool`` settings on every shard."""
    raw = copy.deepcopy(world["topology"].config.model_dump(by_alias=True, mode="json"))
    for shard in raw["shards"].values():
        shard.setdefault("pool", {}).update(pool)
    return Topology(config_from_dict(raw))


# -- finding ------------------------------------------------------------------------------------


def test_point_reads_on_a_hot_shard_starve_a_scatter(world: dict[str, Any]) -> None:
    """Three threads read one user's orders in a loop (a hot key: every read on the same
    shard, one lean connection each: pool size 3, max_overflow 0); four threads run a
    GROUP BY scatter. One database answers every scatter (each point read holds its connection
    for about 100 us). The router answers the point reads (some 30,000 in 5 s) and fails every
    scatter with ShardUnavailableError "shard sN: no read connection free within
    pool.timeout_s=2 (3 open ...)": not one scatter completes.

    Likely cause: readpool._Slots (readpool.py, class _Slots: acquire/try_acquire/release) is
    not fair. release() notifies a waiter, but the releasing thread keeps the GIL and takes the
    slot again (ReadPool.run -> _Slots.acquire finds _free > 0 without waiting) before the
    woken waiter runs; wait_for re-checks, finds none, waits again until its timeout. The
    pipelined scatter (Router._pipelined) exposes it: the job of the shard whose pool is busy
    at send time runs afterwards on the thread pool (Router._threaded -> ReadPool.run), where
    it competes with the point reads and loses every time. (Same with threading.BoundedSemaphore
    in place of _Slots, and with the threaded scatter: older than the pipelined path.) Expected:
    a freed connection goes to the longest waiter (FIFO hand-off), so a waiting scatter gets a
    connection within a few point reads."""
    router = Router(_topology(world, size=3, max_overflow=0, timeout_s=2.0), max_offset=500)
    user = world["data"]["orders"][0]["user_id"]
    point = "SELECT order_id FROM orders WHERE user_id = :u ORDER BY order_id"
    point_want = _oracle(world, point, {"u": user})[1]
    scatter = "SELECT merchant_id, COUNT(*) FROM orders GROUP BY merchant_id ORDER BY merchant_id"
    scatter_want = _oracle(world, scatter, {})[1]
    stop = threading.Event()
    errors: list[str] = []
    done = {"scatter": 0, "point": 0}

    def scatters() -> None:
        try:
            while not stop.is_set():
                assert router.execute(scatter).rows == scatter_want
                done["scatter"] += 1
        except BaseException as exc:
            errors.append(repr(exc))

    def points() -> None:
        try:
            start = time.monotonic()
            while time.monotonic() - start < 5:
                assert router.execute(point, {"u": user}).rows == point_want
                done["point"] += 1
        except BaseException as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=scatters) for _ in range(4)]
    readers = [threading.Thread(target=points) for _ in range(3)]
    try:
        for t in threads + readers:
            t.start()
        for t in readers:
            t.join(60)
        stop.set()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads + readers)
    finally:
        stop.set()
        router.close()
    assert errors == [], (done, errors[:2])


# -- held up (regression tests) -----------------------------------------------------------------

QUERIES = [
    (
        "SELECT order_id, created_at FROM orders ORDER BY created_at DESC, order_id DESC LIMIT 20",
        "",
    ),
    (
        "SELECT merchant_id, COUNT(*), SUM(amount_cents) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id",
        "",
    ),
    (
        "SELECT order_id, amount_cents FROM orders WHERE amount_cents > :a"
        " ORDER BY amount_cents, order_id LIMIT 7",
        "amount",
    ),
    ("SELECT sku, SUM(qty) FROM order_items GROUP BY sku ORDER BY 2 DESC, 1 LIMIT 5", ""),
    (
        "SELECT COUNT(*), MIN(created_at), MAX(created_at) FROM orders WHERE amount_cents < :a",
        "amount",
    ),
    ("SELECT status, COUNT(DISTINCT merchant_id) FROM orders GROUP BY status ORDER BY status", ""),
    (
        "SELECT order_id, line, qty FROM order_items WHERE qty >= :a"
        " ORDER BY order_id DESC, line LIMIT 9",
        "qty",
    ),
    (
        "SELECT DISTINCT merchant_id FROM orders WHERE amount_cents > :a ORDER BY merchant_id",
        "amount",
    ),
]


def _params(kind: str, rng: random.Random) -> dict[str, Any]:
    if kind == "amount":
        return {"a": rng.randrange(100, 50_000)}
    if kind == "qty":
        return {"a": rng.randint(1, 5)}
    return {}


@pytest.mark.parametrize("pool", [(1, 0), (1, 1)], ids=["1+0", "1+1"])
def test_threads_on_tight_pools_equal_the_oracle(
    world: dict[str, Any], pool: tuple[int, int]
) -> None:
    """PASSES. 12 threads x 40 statements on tiny pools: scatters with parameters that change
    per run (the fan-out cache must bind each run's), point reads and failing statements; every
    answer equals the oracle's, every slot is back."""
    rng = random.Random(23)
    cases: list[tuple[str, dict[str, Any], list[Any]]] = []
    for _ in range(60):
        sql, kind = rng.choice(QUERIES)
        params = _params(kind, rng)
        cases.append((sql, params, _oracle(world, sql, params)[1]))
    point = "SELECT order_id, amount_cents, created_at FROM orders WHERE user_id = :u ORDER BY 1"
    for order in world["data"]["orders"][:30]:
        params = {"u": order["user_id"]}
        cases.append((point, params, _oracle(world, point, params)[1]))
    size, overflow = pool
    router = Router(
        _topology(world, size=size, max_overflow=overflow, timeout_s=60.0), max_offset=500
    )
    wrong: list[Any] = []

    def work(seed: int) -> None:
        mine = random.Random(seed)
        try:
            for _ in range(40):
                if mine.random() < 0.1:
                    with pytest.raises(ExecutionError):
                        router.execute("SELECT nope FROM orders ORDER BY order_id LIMIT 3")
                    continue
                sql, params, want = mine.choice(cases)
                got = router.execute(sql, params).rows
                if got != want:
                    wrong.append((sql, params, want[:3], got[:3]))
        except BaseException as exc:
            wrong.append(repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(90)
        assert not any(t.is_alive() for t in threads)
        assert wrong == [], wrong[:3]
        for lean in router._snap.lean.values():
            assert lean and lean._slots._free == size + overflow
    finally:
        router.close()


def test_interrupt_while_reading_one_answer(
    world: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """PASSES. A KeyboardInterrupt while the second shard's answer is read: raised, every slot
    back, and the next scatters on the same router answer as the oracle."""
    router = Router(_topology(world, size=2, max_overflow=0, timeout_s=5.0), max_offset=500)
    sql = (
        "SELECT merchant_id, COUNT(*), SUM(amount_cents) FROM orders GROUP BY merchant_id"
        " ORDER BY merchant_id"
    )
    want = _oracle(world, sql, {})[1]
    try:
        assert router.execute(sql).rows == want
        real = readpool._read_lazy
        calls = [0]

        def interrupted(conn: Any) -> Any:
            calls[0] += 1
            if calls[0] == 2:
                raise KeyboardInterrupt
            return real(conn)

        monkeypatch.setattr(readpool, "_read_lazy", interrupted)
        with pytest.raises(KeyboardInterrupt):
            router.execute(sql)
        monkeypatch.setattr(readpool, "_read_lazy", real)
        for _ in range(5):
            assert router.execute(sql).rows == want
        for lean in router._snap.lean.values():
            assert lean and lean._slots._free == 2
    finally:
        router.close()


def test_column_type_changed_between_runs(world: dict[str, Any]) -> None:
    """PASSES. One statement, its column's type changed by ALTER TABLE between runs
    (BIGINT -> DECIMAL -> VARCHAR -> DOUBLE): the pooled connections' column-definition cache
    decodes each run by its own columns, as the oracle."""
    router = world["router"]
    names = world["topology"].table("orders").physical_names
    sql = (
        "SELECT order_id, amount_cents FROM orders WHERE amount_cents IS NOT NULL"
        " ORDER BY amount_cents DESC, order_id LIMIT 5"
    )

    def alter(ddl: str) -> None:
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                for name in names:
                    conn.execute(text(ddl.format(t=name)))
        with world["oracle"].begin() as conn:
            conn.execute(text(ddl.format(t="orders")))

    try:
        for column in ("DECIMAL(14,2)", "VARCHAR(20)", "DOUBLE"):
            router.execute(sql)  # the old columns, on the same pooled connections
            alter(f"ALTER TABLE {{t}} MODIFY amount_cents {column} NULL")
            got = router.execute(sql)
            assert repr((tuple(got.columns), got.rows)) == repr(_oracle(world, sql, {})), column
    finally:
        alter("ALTER TABLE {t} MODIFY amount_cents BIGINT NULL")


SHAPES = [
    "SELECT order_id FROM orders ORDER BY order_id LIMIT 0",
    "SELECT order_id FROM orders ORDER BY order_id LIMIT 18446744073709551615 OFFSET 400",
    "SELECT order_id FROM orders ORDER BY order_id LIMIT 5 OFFSET 400",
    "SELECT DISTINCT status FROM orders ORDER BY status DESC",
    "SELECT merchant_id, amount_cents FROM orders HAVING amount_cents > 49000"
    " ORDER BY amount_cents, order_id LIMIT 4",
    "SELECT COUNT(*) FROM orders WHERE order_id < 0",
    "SELECT MAX(created_at), MIN(amount_cents) FROM orders WHERE order_id < 0",
    "SELECT merchant_id, COUNT(*) c FROM orders GROUP BY merchant_id HAVING c > 45"
    " ORDER BY c DESC, merchant_id LIMIT 3",
    "SELECT amount_cents FROM orders ORDER BY amount_cents LIMIT 3",
    "SELECT status, merchant_id FROM orders ORDER BY status, merchant_id DESC, order_id LIMIT 6",
]


@pytest.mark.parametrize("sql", SHAPES)
def test_merge_shapes_equal_the_oracle(world: dict[str, Any], sql: str) -> None:
    """PASSES. Merge output shapes (islice bounds, hidden columns cut, empty answers), each run
    three times (the fan-out cache's later runs)."""
    want = repr(_oracle(world, sql, {}))
    for _ in range(3):
        got = world["router"].execute(sql)
        assert repr((tuple(got.columns), list(got.rows))) == want
