"""Routers follow a MariaDB meta store: three routers in separate processes pick up a pushed
version, acknowledge it, and finish in-flight work on the version it started with; a paused
router holds wait_for_acks for one lease and is then reported; a router cut off from its meta
store (the store's server killed) fences its writes and recovers when it returns."""

from __future__ import annotations

import contextlib
import copy
import multiprocessing
import os
import signal
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError
from shardrouter.ops import sandbox as sb

sys.path.insert(0, str(Path(__file__).parent))

import follow_child

pytestmark = pytest.mark.timeout(120)

META = {
    "poll_interval_s": 0.1,
    "fast_poll_interval_s": 0.05,
    "lease_s": 2.0,
    "fence_margin_s": 0.5,
    "connect_timeout_s": 1.0,
    "query_timeout_s": 1.0,
}
NOTES = "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, body VARCHAR(64))"


def fresh_database(server_url: str, name: str) -> str:
    """``name`` dropped and created on the server of ``server_url``; its URL."""
    url = make_url(server_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    u = make_url(url)
    engine = create_engine(u.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{u.database}`"))
    engine.dispose()


def cluster_document(shard_databases: Path, meta_url: str) -> dict[str, Any]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["notes"] = {"column": "user_id", "strategy": "hash"}
    raw["meta"] = {"url": meta_url, **META}
    return raw


def create_notes(raw: dict[str, Any]) -> None:
    for shard in raw["shards"].values():
        engine = create_engine(shard["primary"])
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
            conn.execute(text(NOTES.format(t="notes")))
        engine.dispose()


class Child:
    def __init__(self, process: Any, conn: Connection) -> None:
        self.process = process
        self.conn = conn

    def ask(self, *command: Any, timeout: float = 30) -> Any:
        self.conn.send(command)
        assert self.conn.poll(timeout), f"no answer to {command}"
        answer = self.conn.recv()
        if answer[0] != "ok":
            raise AssertionError(f"{command}: {answer[1]}: {answer[2]}")
        return answer[1]

    def ask_error(self, *command: Any) -> tuple[str, str]:
        self.conn.send(command)
        assert self.conn.poll(30)
        answer = self.conn.recv()
        assert answer[0] == "error", answer
        return answer[1], answer[2]


def start_children(config_path: Path, kinds: list[str]) -> list[Child]:
    ctx = multiprocessing.get_context("spawn")
    children = []
    for kind in kinds:
        parent, child = ctx.Pipe()
        process = ctx.Process(
            target=follow_child.serve, args=(child, str(config_path), kind), daemon=True
        )
        process.start()
        child.close()
        children.append(Child(process, parent))
    return children


def stop_children(children: list[Child]) -> None:
    for c in children:
        with contextlib.suppress(ProcessLookupError, TypeError):
            os.kill(c.process.pid, signal.SIGCONT)  # a paused one must be able to exit
        with contextlib.suppress(OSError, BrokenPipeError):
            c.conn.send(("close",))
    for c in children:
        c.process.join(10)
        if c.process.is_alive():
            c.process.kill()
            c.process.join(5)


@pytest.fixture(scope="module")
def meta_cluster(
    shard_databases: Path, sandbox: sb.Sandbox
) -> Iterator[tuple[dict[str, Any], MetaStore, Path]]:
    server = sandbox.shards[0].url
    meta_url = fresh_database(server, "follow_meta")
    raw = cluster_document(shard_databases, meta_url)
    create_notes(raw)
    path = shard_databases.parent / "topology-follow-meta.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    store = MetaStore(meta_url)
    store.init()
    store.push(raw, expected=None, comment="v1")
    try:
        yield raw, store, path
    finally:
        store.close()
        drop_database(meta_url)


@pytest.fixture
def routers(meta_cluster: tuple[dict[str, Any], MetaStore, Path]) -> Iterator[list[Child]]:
    _, _, path = meta_cluster
    children = start_children(path, ["sync", "sync", "async"])
    try:
        yield children
    finally:
        stop_children(children)


def test_three_routers_follow_a_pushed_version(
    meta_cluster: tuple[dict[str, Any], MetaStore, Path],
    routers: list[Child],
    sandbox: sb.Sandbox,
) -> None:
    raw, store, _ = meta_cluster
    current = store.current_version()
    assert current is not None
    ids = {c.ask("info")[0] for c in routers}
    assert {c.ask("version") for c in routers} == {current}
    live = {r.instance_id for r in store.routers() if r.live}
    assert ids <= live
    a, b, c = routers
    a.ask("execute", "INSERT INTO notes (user_id, body) VALUES (:u, 'x')", {"u": 2})
    # a transaction and a statement in flight across the swap
    assert a.ask("begin", "UPDATE notes SET body = 'txn' WHERE user_id = :u", {"u": 2}) == current
    b.ask("execute", "INSERT INTO notes (user_id, body) VALUES (:u, 'y')", {"u": 3})
    assert (
        b.ask("slow_write", "UPDATE notes SET body = SLEEP(1.5) WHERE user_id = :u", {"u": 3})
        == current
    )

    new = copy.deepcopy(raw)
    s0 = new["shards"]["s0"]
    s0["replicas"] = [s0["primary"]]  # a replica added
    s4_url = fresh_database(sandbox.shards[3].url, "follow_new_shard")
    try:
        new["shards"]["s4"] = {"primary": s4_url, "slots": []}  # a new empty shard
        version = store.push(new, expected=current, comment="replica and a new shard")
        for ch in routers:  # every router swaps at once
            assert ch.ask("wait_version", version, 10) == version
        # but a acknowledges only once its transaction on the older version is over
        early = wait_for_acks(store, version, timeout=0.3)
        assert not early.complete, early.describe()
        assert a.ask("info")[0] in {r.instance_id for r in early.lagging}
        # in-flight work finished on the version it started with
        assert a.ask("commit", "UPDATE notes SET body = 'txn2' WHERE user_id = :u", {"u": 2}) == (
            current,
            version,
        )
        slow_version, slow_error, now = b.ask("slow_done")
        assert (slow_version, slow_error, now) == (current, None, version)
        report = wait_for_acks(store, version, timeout=10)
        assert report.complete, report.describe()
        assert ids <= {r.instance_id for r in report.acked}
        assert a.ask("execute", "SELECT body FROM notes WHERE user_id = :u", {"u": 2}) == [
            ("txn2",)
        ]
        # every door of the async router reaches the resolver too
        c.ask("execute", "UPDATE notes SET body = 'z' WHERE user_id = :u", {"u": 3})
        c.ask("explicit_write", 3)
        c.ask("begin", "UPDATE notes SET body = 'u' WHERE user_id = :u", {"u": 3})
        c.ask("commit", "UPDATE notes SET body = 'v' WHERE user_id = :u", {"u": 3})
        assert c.ask("doors") == [
            "async",
            "async_explicit",
            "async_transaction",
            "async_transaction",
        ]
        assert a.ask("doors") == ["execute", "transaction", "transaction"]
    finally:
        drop_database(s4_url)


def test_paused_router_holds_acks_for_one_lease_then_is_reported(
    meta_cluster: tuple[dict[str, Any], MetaStore, Path], routers: list[Child]
) -> None:
    raw, store, _ = meta_cluster
    current = store.current_version()
    _a, b, _c = routers
    paused_id = b.ask("info")[0]
    for ch in routers:
        assert ch.ask("version") == current
    os.kill(b.process.pid, signal.SIGSTOP)
    try:
        version = store.push(raw, expected=current, comment="while one router is paused")
        early = wait_for_acks(store, version, timeout=0.5)
        assert not early.complete  # its lease (2 s) has not expired yet
        assert [r.instance_id for r in early.lagging] == [paused_id]
        report = wait_for_acks(store, version, timeout=10)
        assert report.complete, report.describe()
        assert paused_id in {r.instance_id for r in report.expired}
        assert "lease expired" in report.describe()
    finally:
        os.kill(b.process.pid, signal.SIGCONT)
    assert b.ask("wait_version", version, 10) == version  # it catches up by itself
    assert wait_for_acks(store, version, timeout=10).complete


def test_fenced_router_refuses_moving_slot_writes_until_the_store_returns(
    shard_databases: Path, scratch_dir: Path, scratch_port: int
) -> None:
    box = sb.up(scratch_dir, shards=1, base_port=scratch_port)
    meta_url = fresh_database(box.shards[0].url, "meta")
    raw = cluster_document(shard_databases, meta_url)
    create_notes(raw)
    path = scratch_dir / "topology.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with MetaStore(meta_url) as store:
        store.init()
        store.push(raw, expected=None)
        with Router.load(path) as router:
            moving_user = 1
            shard, slot = router.route_key(user_id=moving_user)
            other_user = next(u for u in range(2, 1000) if router.route_key(user_id=u)[0] != shard)
            same_shard_user = next(
                u
                for u in range(2, 1000)
                if router.route_key(user_id=u)[0] == shard
                and router.route_key(user_id=u)[1] != slot
            )
            target = next(s for s in raw["shards"] if s != shard)
            moving = copy.deepcopy(raw)
            moving["moving"] = [{"slots": [slot, slot + 1], "source": shard, "target": target}]
            version = store.push(moving, expected=1, comment="one slot moving")
            assert wait_for_acks(store, version, timeout=10).complete
            router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'a')", {"u": moving_user})

            sb.kill_shard(box, "s0")  # the meta store's server
            deadline = time.monotonic() + 10
            while not router.resolver.fence.expired():
                assert time.monotonic() < deadline, "the router never fenced itself"
                time.sleep(0.05)
            with pytest.raises(FencedError) as info:
                router.execute("UPDATE notes SET body = 'b' WHERE user_id = :u", {"u": moving_user})
            assert info.value.slot == slot
            assert "lease" in str(info.value) and f"slot {slot}" in str(info.value)
            with pytest.raises(FencedError), router.connection(user_id=moving_user):
                pass
            # reads keep working; writes to other slots are refused too: the router cannot
            # know which slots are moving now (docs/ARCHITECTURE.md, the control plane)
            assert router.execute(
                "SELECT body FROM notes WHERE user_id = :u", {"u": moving_user}
            ).rows == [("a",)]
            for user in (other_user, same_shard_user):
                with pytest.raises(FencedError) as other:
                    router.execute(
                        "INSERT INTO notes (user_id, body) VALUES (:u, 'o')", {"u": user}
                    )
                assert "cannot know which slots are moving" in str(other.value)

            sb.start_shard(box, "s0")
            deadline = time.monotonic() + 20
            while router.resolver.fence.expired():
                assert time.monotonic() < deadline, "the router never recovered"
                time.sleep(0.05)
            router.execute("UPDATE notes SET body = 'c' WHERE user_id = :u", {"u": moving_user})
            assert router.execute(
                "SELECT body FROM notes WHERE user_id = :u", {"u": moving_user}
            ).rows == [("c",)]
