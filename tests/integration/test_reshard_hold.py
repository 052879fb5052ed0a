"""The switch of a resharding migration holds writes, it does not fail them (issue 9, section
3): while a version freezes a moving range (write_mode frozen), a write to it outside a
transaction, and the opening of a connection() block on its key, waits until the router's
version releases the range, then runs on the new owner; the hold is bounded (hold_s, a queue
limit) and ends in SwitchHoldError with nothing written. In a transaction, its first statement
is held the same way (the transaction starts over on the new version); a later one is refused
at once (nothing of it ran). Real MariaDB shards; versions installed by hand (the follower
installs them the same way)."""

from __future__ import annotations

import asyncio
import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import SwitchHoldError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

INSERT = "INSERT INTO notes (user_id, body) VALUES (:u, :b)"


@pytest.fixture(scope="module")
def base(shard_databases: Path) -> Iterator[dict[str, Any]]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"] = {"notes": {"column": "user_id", "strategy": "hash"}}
    for shard in raw["shards"].values():
        engine = create_engine(shard["primary"])
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body VARCHAR(64))"))
        engine.dispose()
    yield raw


def _rows(raw: dict[str, Any], shard: str) -> set[tuple[int, str]]:
    engine = create_engine(raw["shards"][shard]["primary"])
    try:
        with engine.connect() as conn:
            return {(int(r[0]), str(r[1])) for r in conn.execute(text("SELECT * FROM notes"))}
    finally:
        engine.dispose()


def _user_on(topology: Topology, shard: str, start: int = 1) -> tuple[int, int]:
    """A user id from ``start`` whose slot the shard owns, and that slot."""
    user = start
    while topology.shard_for("notes", user) != shard:
        user += 1
    return user, int(topology.slot_for("notes", user))


def _versions(raw: dict[str, Any], slot: int, hold_s: float) -> tuple[Topology, Topology, Topology]:
    """(frozen, switched, back to dual_old_primary) for slot moving s0 -> s1."""
    frozen = copy.deepcopy(raw)
    frozen["moving"] = [
        {
            "slots": [slot, slot + 1],
            "source": "s0",
            "target": "s1",
            "write_mode": "frozen",
            "hold_s": hold_s,
        }
    ]
    switched = copy.deepcopy(frozen)
    s0 = [list(r) for r in switched["shards"]["s0"]["slots"]]
    assert len(s0) == 1 and s0[0][0] <= slot < s0[0][1]
    start, end = s0[0]
    switched["shards"]["s0"]["slots"] = [r for r in ([start, slot], [slot + 1, end]) if r[0] < r[1]]
    switched["shards"]["s1"]["slots"] = [[slot, slot + 1], *switched["shards"]["s1"]["slots"]]
    switched["moving"][0]["write_mode"] = "dual_new_primary"
    back = copy.deepcopy(frozen)
    back["moving"][0]["write_mode"] = "dual_old_primary"
    return tuple(Topology(config_from_dict(d)) for d in (frozen, switched, back))  # type: ignore[return-value]


def _later(seconds: float, fn: Any) -> threading.Thread:
    def run() -> None:
        time.sleep(seconds)
        fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_held_write_runs_on_the_new_owner_once_switched(base: dict[str, Any]) -> None:
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 100)
        other, _ = _user_on(router.topology, "s2", 100)
        frozen, switched, _ = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        t0 = time.monotonic()
        router.execute(INSERT, {"u": other, "b": "elsewhere"})  # not frozen: no wait
        assert time.monotonic() - t0 < 0.5
        assert router.execute("SELECT COUNT(*) FROM notes WHERE user_id = :u", {"u": user}).rows
        switcher = _later(0.3, lambda: router._install(switched))
        t0 = time.monotonic()
        router.execute(INSERT, {"u": user, "b": "held"})
        waited = time.monotonic() - t0
        switcher.join()
        assert waited >= 0.25, waited  # it waited for the switch ...
        assert (user, "held") in _rows(base, "s1")  # ... and ran on the new owner
        assert all(u != user for u, _ in _rows(base, "s0"))
        assert router.holds.held == 1 and router.holds.holding == 0
    finally:
        router.close()


def test_a_switch_abandoned_releases_held_writes_onto_the_source(base: dict[str, Any]) -> None:
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 200)
        frozen, _, back = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        switcher = _later(0.2, lambda: router._install(back))
        router.execute(INSERT, {"u": user, "b": "abandoned"})
        switcher.join()
        assert (user, "abandoned") in _rows(base, "s0")
        assert all(u != user for u, _ in _rows(base, "s1"))
    finally:
        router.close()


def test_a_hold_that_outlasts_hold_s_fails_with_nothing_written(base: dict[str, Any]) -> None:
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 300)
        frozen, _, _ = _versions(base, slot, hold_s=0.3)
        router._install(frozen)
        t0 = time.monotonic()
        with pytest.raises(SwitchHoldError, match=r"held 0\.\d+ s .* retry it") as held:
            router.execute(INSERT, {"u": user, "b": "never"})
        assert 0.25 <= time.monotonic() - t0 < 2.0
        assert held.value.slots == (slot, slot + 1)
        assert all(u != user for u, _ in _rows(base, "s0") | _rows(base, "s1"))
        assert router.holds.holding == 0
    finally:
        router.close()


def test_a_transaction_whose_first_statement_is_held_starts_over_on_the_new_version(
    base: dict[str, Any],
) -> None:
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 400)
        frozen, switched, _ = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        switcher = _later(0.2, lambda: router._install(switched))
        with router.transaction() as txn:
            txn.execute(INSERT, {"u": user, "b": "txn"})
            txn.execute("UPDATE notes SET body = 'txn2' WHERE user_id = :u", {"u": user})
            assert txn.shard == "s1"
        switcher.join()
        assert (user, "txn2") in _rows(base, "s1")
        assert all(u != user for u, _ in _rows(base, "s0"))
    finally:
        router.close()


def test_a_transaction_that_already_ran_something_is_refused_at_once(
    base: dict[str, Any],
) -> None:
    """It read under the old version (its snapshot, its shard): starting it over would
    silently drop that; the caller retries it (nothing of the write ran)."""
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 450)
        frozen, _, _ = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        t0 = time.monotonic()
        with pytest.raises(SwitchHoldError, match="being switched"), router.transaction() as txn:
            txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})
            txn.execute(INSERT, {"u": user, "b": "txn"})
        assert time.monotonic() - t0 < 1.0
        assert all(u != user for u, _ in _rows(base, "s0") | _rows(base, "s1"))
    finally:
        router.close()


def test_async_transaction_first_statement_is_held(base: dict[str, Any]) -> None:
    async def scenario() -> None:
        router = AsyncRouter(Topology(config_from_dict(base)))
        try:
            user, slot = _user_on(router._snap.topology, "s0", 480)
            frozen, switched, _ = _versions(base, slot, hold_s=5.0)
            router._install(frozen)
            asyncio.get_running_loop().call_later(0.2, router._install, switched)
            async with router.transaction() as txn:
                await txn.execute(INSERT, {"u": user, "b": "atxn"})
                assert txn.shard == "s1"
        finally:
            await router.close()

    asyncio.run(scenario())
    assert any(body == "atxn" for _, body in _rows(base, "s1"))


def test_connection_block_waits_then_opens_on_the_new_owner(base: dict[str, Any]) -> None:
    router = Router(Topology(config_from_dict(base)))
    try:
        user, slot = _user_on(router.topology, "s0", 500)
        frozen, switched, _ = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        switcher = _later(0.2, lambda: router._install(switched))
        with router.connection(user_id=user) as conn:
            assert conn.shard == "s1"
            conn.execute(text("INSERT INTO notes VALUES (:u, 'explicit')"), {"u": user})
        switcher.join()
        assert (user, "explicit") in _rows(base, "s1")
    finally:
        router.close()


def test_a_full_hold_queue_fails_at_once(base: dict[str, Any]) -> None:
    router = Router(Topology(config_from_dict(base)), max_held_writes=1)
    try:
        user, slot = _user_on(router.topology, "s0", 600)
        second = next(
            u
            for u in range(user + 1, user + 1_000_000)
            if router.topology.slot_for("notes", u) == slot
        )
        frozen, switched, _ = _versions(base, slot, hold_s=5.0)
        router._install(frozen)
        errors: list[BaseException] = []

        def first() -> None:
            try:
                router.execute(INSERT, {"u": user, "b": "first"})
            except BaseException as exc:  # reported below
                errors.append(exc)

        holder = threading.Thread(target=first)
        holder.start()
        deadline = time.monotonic() + 5
        while router.holds.holding == 0 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert router.holds.holding == 1
        with pytest.raises(SwitchHoldError, match="max_held_writes"):
            router.execute(INSERT, {"u": second, "b": "second"})
        router._install(switched)
        holder.join(timeout=10)
        assert errors == []
        assert (user, "first") in _rows(base, "s1")
    finally:
        router.close()


def test_async_execute_and_connection_are_held_too(base: dict[str, Any]) -> None:
    async def scenario() -> float:
        router = AsyncRouter(Topology(config_from_dict(base)))
        try:
            user, slot = _user_on(router._snap.topology, "s0", 700)
            frozen, switched, _ = _versions(base, slot, hold_s=5.0)
            router._install(frozen)
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, router._install, switched)
            t0 = time.monotonic()
            await router.execute(INSERT, {"u": user, "b": "async"})
            waited = time.monotonic() - t0
            assert (user, "async") in _rows(base, "s1")
            router._install(frozen)  # again: the explicit path
            loop.call_later(0.2, router._install, switched)
            async with router.connection(user_id=user) as conn:
                assert conn.shard == "s1"
                await conn.execute(
                    text("UPDATE notes SET body = 'async2' WHERE user_id = :u"), {"u": user}
                )
            assert (user, "async2") in _rows(base, "s1")
            return waited
        finally:
            await router.close()

    waited = asyncio.run(scenario())
    assert waited >= 0.25, waited
