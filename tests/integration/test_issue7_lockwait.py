"""Lock waits end before the read timeout (issue 7, the known gap "lock order covers write
against write only"): every shard session gets ``innodb_lock_wait_timeout`` below
``query_timeout_s``, so a row held by a writer on another shard ends as LockConflictError
(retry) and not as ShardUnavailableError (a healthy shard reported down).

Real MariaDB shards from the session sandbox; each test builds its own routers."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from shard_tables import create_tables
from sqlalchemy import text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.readpool import AsyncReadPool, ReadPool
from shardrouter.engine.router import Router
from shardrouter.errors import ConfigError, LockConflictError, ShardRouterError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

DDL = {
    # users.email is a lookup column of the topology: an INSERT must give it (user_emails).
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL,"
    " score INT NOT NULL)",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
}


def _topology(path: Any, **pool: Any) -> Topology:
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        shard["pool"] = {"connect_timeout_s": 2, "timeout_s": 3, **pool}
    return Topology(config_from_dict(raw))


@pytest.fixture(scope="module")
def world(shard_databases: Any) -> Iterator[dict[str, Any]]:
    topology = _topology(shard_databases, query_timeout_s=4, lock_wait_timeout_s=1)
    router = Router(topology, max_fanout=None)
    create_tables(router, DDL)
    shard_of = topology.shard_for
    low = 1
    high = next(u for u in range(2, 10_000) if shard_of("users", u) != shard_of("users", low))
    if shard_of("users", low) > shard_of("users", high):
        low, high = high, low  # low: the shard a multi-shard write takes first
    for user in (low, high):
        router.execute(
            "INSERT INTO users (user_id, email, score) VALUES (:u, :e, 0)",
            {"u": user, "e": f"lockwait{user}@example.com"},
        )
    yield {"router": router, "topology": topology, "low": low, "high": high}
    router.close()


def test_every_kind_of_shard_session_gets_the_lock_wait(world: dict[str, Any]) -> None:
    """Pooled sync and async connections and the lean read pools all start with the setting."""
    router: Router = world["router"]
    topology: Topology = world["topology"]
    shard = next(iter(topology.shards))
    sql = "SELECT @@SESSION.innodb_lock_wait_timeout"
    with router.engines.primary(shard).connect() as conn:
        assert conn.execute(text(sql)).scalar() == 1
    lean = ReadPool(router.engines.primary(shard), shard, topology.shards[shard].pool)
    try:
        assert lean.run(sql, {}).rows[0][0] == 1
    finally:
        lean.close()

    async def from_async() -> tuple[Any, Any]:
        aio = AsyncRouter(topology)
        try:
            engine = aio._engine(shard)
            async with engine.connect() as conn:
                pooled = (await conn.execute(text(sql))).scalar()
            pool = AsyncReadPool(engine, shard, topology.shards[shard].pool)
            try:
                lean_rows = (await pool.run(sql, {})).rows
            finally:
                pool.close()
            return pooled, lean_rows[0][0]
        finally:
            await aio.close()

    assert asyncio.run(from_async()) == (1, 1)


def test_default_lock_wait_is_half_the_query_timeout(shard_databases: Any) -> None:
    topology = _topology(shard_databases, query_timeout_s=9)
    with Router(topology) as router:
        shard = next(iter(topology.shards))
        with router.engines.primary(shard).connect() as conn:
            value = conn.execute(text("SELECT @@SESSION.innodb_lock_wait_timeout")).scalar()
    assert value == 4


def test_xa_transaction_and_a_multi_shard_write_end_in_a_lock_conflict(
    world: dict[str, Any],
) -> None:
    """An xa=True transaction takes its shards in statement order (high, then low); the
    multi-shard write takes them sorted (low, then high). Neither server sees the cycle. The
    write's lock wait on `high` ends after lock_wait_timeout_s (1 s) as LockConflictError,
    before query_timeout_s (4 s); its part on `low` is rolled back and the transaction commits.
    Before: both waited innodb_lock_wait_timeout (50 s), the write's read timed out at 4 s and
    it was reported as ShardUnavailableError, a healthy shard called down."""
    topology: Topology = world["topology"]
    low, high = world["low"], world["high"]
    outcome: dict[str, tuple[str, float]] = {}
    t_locked = threading.Event()
    w_started = threading.Event()

    def transaction() -> None:
        with Router(topology, xa=True) as router:
            start = time.monotonic()
            try:
                with router.transaction() as txn:
                    txn.execute(
                        "UPDATE users SET score = score + 1 WHERE user_id = :u", {"u": high}
                    )
                    t_locked.set()
                    w_started.wait(10)
                    time.sleep(0.3)  # the write holds `low` and waits for `high`
                    txn.execute("UPDATE users SET score = score + 1 WHERE user_id = :u", {"u": low})
                outcome["T"] = ("committed", time.monotonic() - start)
            except ShardRouterError as exc:
                outcome["T"] = (type(exc).__name__, time.monotonic() - start)

    def write() -> None:
        t_locked.wait(10)
        w_started.set()
        start = time.monotonic()
        try:
            world["router"].execute(
                "UPDATE users SET score = score + 10 WHERE user_id IN (:a, :b)",
                {"a": low, "b": high},
            )
            outcome["W"] = ("committed", time.monotonic() - start)
        except ShardRouterError as exc:
            outcome["W"] = (type(exc).__name__, time.monotonic() - start)

    threads = [threading.Thread(target=transaction), threading.Thread(target=write)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcome["W"][0] == LockConflictError.__name__, outcome
    assert outcome["W"][1] < 4, outcome
    assert outcome["T"][0] == "committed", outcome
    scores = world["router"].execute(
        "SELECT user_id, score FROM users WHERE user_id IN (:a, :b) ORDER BY user_id",
        {"a": low, "b": high},
    )
    assert [r[1] for r in scores.rows] == [1, 1]  # the write left nothing behind


@pytest.mark.parametrize("lock_wait", [4, 5])
def test_a_lock_wait_not_below_the_query_timeout_is_refused(lock_wait: int) -> None:
    raw = yaml.safe_load((Path(__file__).parents[2] / "config" / "orders.yaml").read_text())
    raw["shards"]["s0"]["primary"] = "mysql+pymysql://root:secret@127.0.0.1:3401/orders_s0"
    raw["shards"]["s0"]["pool"] = {"query_timeout_s": 4, "lock_wait_timeout_s": lock_wait}
    with pytest.raises(ConfigError) as refused:
        config_from_dict(raw)
    message = str(refused.value)
    assert "lock_wait_timeout_s" in message and "query_timeout_s" in message
    assert "secret" not in message
