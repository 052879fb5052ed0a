"""The control plane's fence, second round, on a MariaDB meta store (InnoDB's consistent reads
are where a registration could miss a push) and with the AsyncRouter:

- a router registering after a newer version was acknowledged catches up before it serves;
- an AsyncRouter acknowledges a version only once its transactions on older ones are over,
  and fences the commit of writes checked before its lease expired;
- a following AsyncRouter inherited through fork() refuses in the child (RouterForkedError).
"""

from __future__ import annotations

import asyncio
import copy
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.control.follow import Follower
from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
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
    shard_databases: Path, sandbox: sb.Sandbox
) -> Iterator[tuple[dict[str, Any], MetaStore, Path]]:
    server = sandbox.shards[0].url
    meta_url = _database(server, "r2_fence_meta")
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["notes"] = {"column": "user_id", "strategy": "hash"}
    raw["meta"] = {"url": meta_url, **META}
    for shard in raw["shards"].values():
        engine = create_engine(shard["primary"])
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body VARCHAR(64))"))
        engine.dispose()
    path = shard_databases.parent / "topology-r2-fence.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = MetaStore(meta_url)
    store.init()
    store.push(raw, expected=None, comment="v1")
    try:
        yield raw, store, path
    finally:
        store.close()
        _database(server, "r2_fence_meta", drop=True)


def moving_document(raw: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    doc = copy.deepcopy(raw)
    doc["moving"] = [{"slots": [start, end], "source": "s0", "target": "s1"}]
    return doc


def user_in_slots(router: Any, start: int, end: int) -> int:
    return next(u for u in range(1, 100_000) if start <= router.route_key(user_id=u)[1] < end)


def test_router_registering_after_a_newer_version_was_acked_catches_up_first(
    cluster: tuple[dict[str, Any], MetaStore, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    raw, store, _ = cluster
    with Router.from_config(config_from_dict(raw)) as a:
        original = Follower.initial_topology

        def load_then_race(self: Follower) -> Any:
            topology = original(self)
            store.push(moving_document(raw, 0, 10), expected=1, comment="slots 0-10 moving")
            assert wait_for_acks(store, 2, timeout=10).complete
            return topology

        monkeypatch.setattr(Follower, "initial_topology", load_then_race)
        b = Router.from_config(config_from_dict(raw))
        monkeypatch.setattr(Follower, "initial_topology", original)
        try:
            assert b.version == 2
            assert a.version == 2
            rows = {r.instance_id: r for r in store.routers()}
            mine = rows[b._follower.instance_id]
            assert (mine.serving_version, mine.acked_version) == (2, 2)
        finally:
            b.close()


def test_async_transaction_on_an_older_version_holds_the_ack(
    cluster: tuple[dict[str, Any], MetaStore, Path],
) -> None:
    raw, store, _ = cluster

    async def scenario() -> None:
        router = AsyncRouter.from_config(config_from_dict(raw))
        try:
            user = user_in_slots(router, 0, 10)
            async with router.transaction() as txn:
                await txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})
                store.push(moving_document(raw, 0, 10), expected=1, comment="moving")
                for _ in range(200):
                    if router.version == 2:
                        break
                    await asyncio.sleep(0.02)
                assert router.version == 2
                report = await asyncio.to_thread(wait_for_acks, store, 2, 0.5)
                assert not report.complete, report.describe()
                await txn.execute(
                    "INSERT INTO notes (user_id, body) VALUES (:u, 'v1 txn')", {"u": user}
                )
            report = await asyncio.to_thread(wait_for_acks, store, 2, 10)
            assert report.complete, report.describe()
        finally:
            await router.close()

    asyncio.run(scenario())


def test_async_commit_after_the_lease_expired_is_refused(
    cluster: tuple[dict[str, Any], MetaStore, Path],
) -> None:
    raw, _store, _ = cluster

    async def scenario() -> None:
        router = AsyncRouter.from_config(config_from_dict(raw))
        fence = router.resolver.fence
        try:
            with pytest.raises(FencedError, match="commit of"):
                async with router.transaction() as txn:
                    await txn.execute(
                        "INSERT INTO notes (user_id, body) VALUES (:u, 'late')", {"u": 31}
                    )
                    router._follower.pause()
                    while not fence.expired():
                        await asyncio.sleep(0.05)
            router._follower.resume()
            while fence.expired():
                await asyncio.sleep(0.05)
            with pytest.raises(FencedError, match="commit of"):
                async with router.connection(user_id=32) as conn:
                    await conn.execute(text("INSERT INTO notes VALUES (32, 'late')"))
                    router._follower.pause()
                    while not fence.expired():
                        await asyncio.sleep(0.05)
            with pytest.raises(FencedError, match="write to"):
                await router.execute("INSERT INTO notes (user_id, body) VALUES (33, 'x')")
            rows = await router.execute("SELECT COUNT(*) FROM notes WHERE user_id IN (31, 32)")
            assert rows.rows[0][0] == 0
        finally:
            router._follower.resume()
            await router.close()

    asyncio.run(scenario())


def _forked_async_child(router: AsyncRouter, conn: Any) -> None:
    try:

        async def use() -> list[Any]:
            outcome: list[Any] = []
            for sql in (
                "SELECT * FROM notes WHERE user_id = 1",
                "DELETE FROM notes WHERE user_id = 1",
            ):
                try:
                    await router.execute(sql)
                    outcome.append("ran")
                except BaseException as exc:
                    outcome.append((type(exc).__name__, str(exc)))
            return outcome

        conn.send(asyncio.run(use()))
    except BaseException as exc:
        conn.send([("error", f"{type(exc).__name__}: {exc}")])
    finally:
        os._exit(0)


def test_async_router_inherited_through_fork_refuses_in_the_child(
    cluster: tuple[dict[str, Any], MetaStore, Path],
) -> None:
    raw, store, _ = cluster
    ctx = multiprocessing.get_context("fork")

    async def parent_router() -> AsyncRouter:
        return AsyncRouter.from_config(config_from_dict(raw))

    router = asyncio.run(parent_router())
    try:
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_forked_async_child, args=(router, child))
        process.start()
        try:
            child.close()
            assert parent.poll(60), "the child did not answer"
            outcome = parent.recv()
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        assert [o[0] for o in outcome] == ["RouterForkedError", "RouterForkedError"], outcome
        assert "after forking" in outcome[0][1]
        assert router._follower.instance_id in {r.instance_id for r in store.routers()}
    finally:
        asyncio.run(router.close())
