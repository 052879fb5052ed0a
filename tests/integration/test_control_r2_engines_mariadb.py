"""Control plane review, round 2, on MariaDB: AsyncRouter.close with a hung meta store (its own
scratch sandbox server, SIGSTOPped) and the AsyncRouter's engine disposal across versions (the
shards on the session sandbox, the meta store on SQLite). Each test failed before its fix."""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.aio import AsyncRouter
from shardrouter.ops import sandbox as sb

pytestmark = pytest.mark.timeout(120)

META = {
    "poll_interval_s": 0.1,
    "fast_poll_interval_s": 0.05,
    "lease_s": 2.0,
    "fence_margin_s": 0.5,
    "connect_timeout_s": 2.0,
    "query_timeout_s": 2.0,
}


def fresh_database(server_url: str, name: str) -> str:
    url = make_url(server_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def cluster_document(shard_databases: Path, meta_url: str) -> dict[str, Any]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["notes"] = {"column": "user_id", "strategy": "hash"}
    raw["meta"] = {"url": meta_url, **META}
    return raw


def test_async_router_close_does_not_block_the_event_loop_on_a_hung_meta_store(
    shard_databases: Path, scratch_dir: Path, scratch_port: int
) -> None:
    """AsyncRouter.close() with the meta store's server hung (SIGSTOP): stopping the poller
    (stuck on the store) and deregistering run off the loop, so the loop's other tasks are not
    stalled (before: Follower.close() ran on the loop, 3.7 s with 2 s timeouts)."""
    box = sb.up(scratch_dir, shards=1, base_port=scratch_port)
    try:
        meta_url = fresh_database(box.shards[0].url, "meta")
        raw = cluster_document(shard_databases, meta_url)
        with MetaStore(meta_url) as store:
            store.init()
            store.push(raw, expected=None)

        async def scenario() -> tuple[float, float]:
            router = AsyncRouter.from_config(config_from_dict(raw))
            assert router._follower is not None
            gaps: list[float] = []
            stop = asyncio.Event()

            async def ticker() -> None:
                last = time.monotonic()
                while not stop.is_set():
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            task = asyncio.create_task(ticker())
            await asyncio.sleep(0.2)
            sb.pause_shard(box, "s0")  # the meta store hangs (a partition looks the same)
            try:
                await asyncio.sleep(0.3)  # the poller now waits on the hung store
                started = time.monotonic()
                await router.close()
                took = time.monotonic() - started
            finally:
                sb.resume_shard(box, "s0")
                stop.set()
                await task
            return max(gaps), took

        worst, took = asyncio.run(scenario())
        assert worst < 1.0, f"AsyncRouter.close() blocked the event loop for {worst:.2f} s"
        assert took < 15, f"close() took {took:.1f} s: its wait on the store is not bounded"
    finally:
        sb.resume_shard(box, "s0")


async def swapped_to(router: AsyncRouter, version: int, timeout: float = 10.0) -> None:
    """Until ``router`` serves ``version`` (its follower swapped it in)."""
    deadline = time.monotonic() + timeout
    while router.version != version:
        assert time.monotonic() < deadline, f"never swapped to version {version}"
        await asyncio.sleep(0.01)


def test_async_engine_kept_by_an_intermediate_version_is_not_disposed_under_an_older_user(
    shard_databases: Path, tmp_path: Path
) -> None:
    """The AsyncRouter's twin of the sync test (tests/unit/test_control_r2_engines.py): a
    statement pinned to version 1 uses s1's engine E; version 2 (a replica on s0) keeps E,
    version 3 (s1's pool changed) drops it. E is disposed once version 1 is released, not when
    version 2 retires."""
    raw = cluster_document(shard_databases, f"sqlite:///{tmp_path}/meta.db")
    raw["meta"].update(poll_interval_s=0.05, fast_poll_interval_s=0.02)
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        store.push(raw, expected=None)

        async def scenario() -> None:
            router = AsyncRouter.from_config(config_from_dict(raw))
            try:
                engine = router._snap.engines.primary("s1")
                pool = engine.sync_engine.pool
                first = router._pin()
                v2 = copy.deepcopy(raw)
                v2["shards"]["s0"]["replicas"] = [raw["shards"]["s0"]["primary"]]
                store.push(v2, expected=1, comment="replica on s0")
                await swapped_to(router, 2)  # (its ack waits for version 1's pin)
                assert router._snap.engines.primary("s1") is engine  # taken over by version 2
                v3 = copy.deepcopy(v2)
                v3["shards"]["s1"]["pool"] = {**v3["shards"]["s1"].get("pool", {}), "size": 3}
                store.push(v3, expected=2, comment="s1 pool")
                await swapped_to(router, 3)
                assert router._snap.engines.primary("s1") is not engine
                router._dispose_doomed()  # what the next statement does
                await asyncio.gather(*router._disposing)
                assert engine.sync_engine.pool is pool, "disposed while version 1 still uses it"
                first.release()
                router._dispose_doomed()
                await asyncio.gather(*router._disposing)
                assert engine.sync_engine.pool is not pool, "never disposed"
            finally:
                await router.close()

        asyncio.run(scenario())
