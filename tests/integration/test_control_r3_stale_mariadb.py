"""The control plane, third round, with the AsyncRouter on a MariaDB meta store: after the
lease has lapsed, an async transaction pinned before the lapse stays write-dead (its writes
and its commit) even once the router has recovered; new statements write again."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.aio import AsyncRouter
from shardrouter.errors import FencedError
from shardrouter.ops import sandbox as sb

pytestmark = pytest.mark.timeout(120)

META = {
    "poll_interval_s": 0.1,
    "fast_poll_interval_s": 0.05,
    "lease_s": 2.0,
    "fence_margin_s": 0.5,
    "connect_timeout_s": 1.0,
    "query_timeout_s": 1.0,
}
DATABASE = "r3_stale_meta"


def _database(server_url: str, name: str, drop: bool = False) -> str:
    url = make_url(server_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        if not drop:
            conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


@pytest.fixture
def cluster(
    shard_databases: Any, sandbox: sb.Sandbox
) -> Iterator[tuple[dict[str, Any], MetaStore]]:
    server = sandbox.shards[0].url
    meta_url = _database(server, DATABASE)
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["notes"] = {"column": "user_id", "strategy": "hash"}
    raw["meta"] = {"url": meta_url, **META}
    for shard in raw["shards"].values():
        engine = create_engine(shard["primary"])
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body VARCHAR(64))"))
        engine.dispose()
    store = MetaStore(meta_url)
    store.init()
    store.push(raw, expected=None, comment="v1")
    try:
        yield raw, store
    finally:
        store.close()
        _database(server, DATABASE, drop=True)


def _rows(raw: dict[str, Any], shard: str, user: int) -> list[Any]:
    engine = create_engine(raw["shards"][shard]["primary"])
    try:
        with engine.connect() as conn:
            sql = text("SELECT body FROM notes WHERE user_id = :u ORDER BY body")
            return [tuple(r) for r in conn.execute(sql, {"u": user})]
    finally:
        engine.dispose()


def _moving(raw: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(raw)
    doc["moving"] = [{"slots": [0, 10], "source": "s0", "target": "s1"}]
    return doc


def _moved(raw: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(raw)
    s0 = [list(r) for r in doc["shards"]["s0"]["slots"]]
    assert s0[0][0] == 0, s0
    s0[0][0] = 10
    doc["shards"]["s0"]["slots"] = s0
    doc["shards"]["s1"]["slots"] = [[0, 10], *doc["shards"]["s1"]["slots"]]
    return doc


def test_async_transaction_pinned_before_the_lapse_is_refused_after_the_recovery(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster

    def cut_off_while_the_move_completes(router: AsyncRouter) -> None:
        follower = router._follower
        follower.pause()
        store.push(_moving(raw), expected=1, comment="slots 0-10 moving")
        assert wait_for_acks(store, 2, timeout=20).complete
        store.push(_moved(raw), expected=2, comment="slots 0-10 now on s1")
        report = wait_for_acks(store, 3, timeout=20)
        assert report.complete, report.describe()
        assert [r.instance_id for r in report.expired] == [follower.instance_id]
        follower.resume()

    async def scenario() -> int:
        router = AsyncRouter.from_config(config_from_dict(raw))
        fence = router.resolver.fence
        try:
            user = next(u for u in range(1, 100_000) if router.route_key(user_id=u)[1] < 10)
            assert router.route_key(user_id=user)[0] == "s0"
            # a write checked before the lapse: its commit after the recovery is refused
            with pytest.raises(FencedError, match=r"commit of.*lapsed"):
                async with router.transaction() as txn:
                    await txn.execute(
                        "INSERT INTO notes (user_id, body) VALUES (:u, 'a')", {"u": user}
                    )
                    await asyncio.to_thread(cut_off_while_the_move_completes, router)
                    while router.version != 3 or fence.expired():
                        await asyncio.sleep(0.05)
            # a transaction pinned before a lapse writes nothing after the recovery
            with pytest.raises(FencedError, match="lapsed"):
                async with router.transaction() as txn:
                    await txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})
                    router._follower.pause()
                    while not fence.expired():
                        await asyncio.sleep(0.05)
                    router._follower.resume()
                    while fence.expired():
                        await asyncio.sleep(0.05)
                    await txn.execute(
                        "INSERT INTO notes (user_id, body) VALUES (:u, 'b')", {"u": user}
                    )
            # new statements write, on version 3
            await router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'c')", {"u": user})
            return user
        finally:
            router._follower.resume()
            await router.close()

    user = asyncio.run(scenario())
    assert _rows(raw, "s0", user) == []
    assert _rows(raw, "s1", user) == [("c",)]
