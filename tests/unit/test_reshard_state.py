"""shardrouter.reshard.state: migrations, checkpoints and events in the meta store, on a SQLite
file and on a MariaDB database of the session sandbox (its row locks and rowcounts differ):
create and the overlap refusal, get/active/all, advance through the phase table, the race of
two processes (two MetaStore objects on one store), checkpoints and the event log."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from shardrouter.control.store import MetaStore, migrations_table
from shardrouter.errors import ConcurrentChangeError, MetaStoreError, ReshardStateError
from shardrouter.reshard import state
from shardrouter.reshard.plan import ReshardPlan, plan_move

pytestmark = pytest.mark.timeout(120)

ENV: dict[str, str] = {}


@pytest.fixture(params=["sqlite", pytest.param("mariadb", marks=pytest.mark.mariadb)])
def meta_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty meta store: a SQLite file, or a fresh database on the sandbox's s0."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    sandbox = request.getfixturevalue("sandbox")
    server = make_url(sandbox.shards[0].url).set(database="")
    database = f"shardmeta_reshard_{uuid.uuid4().hex[:10]}"
    engine = create_engine(server)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{database}`"))
    try:
        yield server.set(database=database).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
        engine.dispose()


@pytest.fixture
def store(meta_url: str) -> Iterator[MetaStore]:
    with MetaStore(meta_url) as s:
        s.init()
        yield s


def plan(orders_raw: dict[str, Any], start: int, end: int, to: str, mid: str) -> ReshardPlan:
    return plan_move(
        copy.deepcopy(orders_raw), (start, end), to, {}, base_version=1, migration_id=mid, env=ENV
    )


def test_create_get_active_all(store: MetaStore, orders_raw: dict[str, Any]) -> None:
    first = plan(orders_raw, 0, 100, "s1", "m1-a")
    created = state.create(store, first)
    assert created.phase == "planned" and created.active
    assert created.plan == first  # stored and read back whole
    assert created.created_at_ms == created.updated_at_ms > 0
    assert state.get(store, "m1-a") == created
    second = state.create(store, plan(orders_raw, 512, 612, "s3", "m1-b"))  # s2 -> s3
    assert [m.migration_id for m in state.all(store)] == ["m1-a", "m1-b"]
    state.advance(store, "m1-b", "cancel")
    assert [m.migration_id for m in state.active(store)] == ["m1-a"]
    assert [m.phase for m in state.all(store)] == ["planned", "cancelled"]
    assert second.as_dict()["legal"] == ["start", "cancel", "advance"]


def test_two_migrations_over_one_slot_are_refused(
    store: MetaStore, orders_raw: dict[str, Any]
) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    with pytest.raises(ReshardStateError) as exc:
        state.create(store, plan(orders_raw, 99, 300, "s2", "m1-b"))
    message = str(exc.value)
    assert "two migrations at once over one slot" in message
    assert "slots [99, 256) (157) s0 -> s2 overlaps slots [0, 100) (100) s0 -> s1" in message
    assert "migration m1-a (planned)" in message
    assert [m.migration_id for m in state.all(store)] == ["m1-a"]  # nothing written
    # adjacent slots, but a shared shard (s0): one journal per shard, so refused too
    with pytest.raises(ReshardStateError, match=r"shard\(s\) s0 take part in migration m1-a"):
        state.create(store, plan(orders_raw, 100, 200, "s2", "m1-x"))
    state.create(store, plan(orders_raw, 512, 600, "s3", "m1-c"))  # other slots, other shards
    with pytest.raises(ReshardStateError, match="migration m1-c exists already"):
        state.create(store, plan(orders_raw, 900, 901, "s2", "m1-c"))
    # once the first one is over, its slots are free again
    state.advance(store, "m1-a", "cancel")
    state.create(store, plan(orders_raw, 0, 50, "s1", "m1-d"))
    # a rolled-back migration still holds its slots (its targets are not cleaned yet)
    for action in ("start", "rollback"):
        state.advance(store, "m1-d", action)
    with pytest.raises(ReshardStateError, match=r"migration m1-d \(rolled_back\)"):
        state.create(store, plan(orders_raw, 10, 20, "s2", "m1-e"))


def test_get_unknown_lists_the_known_ids(store: MetaStore, orders_raw: dict[str, Any]) -> None:
    with pytest.raises(ReshardStateError, match="known: none; plan one"):
        state.get(store, "m9-zzz")
    state.create(store, plan(orders_raw, 0, 10, "s1", "m1-a"))
    state.create(store, plan(orders_raw, 512, 520, "s3", "m1-b"))
    with pytest.raises(ReshardStateError) as exc:
        state.get(store, "m9-zzz")
    assert "no migration 'm9-zzz'" in str(exc.value)
    assert "m1-a" in str(exc.value) and "m1-b" in str(exc.value)
    with pytest.raises(ReshardStateError, match="no migration 'm9-zzz'"):
        state.advance(store, "m9-zzz", "start")


def test_advance_follows_the_phase_table(store: MetaStore, orders_raw: dict[str, Any]) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    assert state.advance(store, "m1-a", "advance").phase == "prepared"
    running = state.mark_running(store, "m1-a", "copy", expected="prepared")
    assert running.phase == "copying"
    assert state.mark_running(store, "m1-a", "copy").phase == "copying"  # resumed
    assert state.advance(store, "m1-a", "copy", expected="copying").phase == "copied"
    with pytest.raises(ReshardStateError) as exc:
        state.advance(store, "m1-a", "switch")
    assert "incomplete copy" in str(exc.value)
    assert exc.value.legal == ("verify", "rollback", "cancel", "shadow", "drain", "advance")
    assert state.get(store, "m1-a").phase == "copied"  # a refusal changes nothing
    assert state.advance(store, "m1-a", "verify").phase == "verified"
    assert state.mark_running(store, "m1-a", "switch").phase == "verified"  # no in-progress
    assert state.advance(store, "m1-a", "advance").phase == "switched"
    assert state.advance(store, "m1-a", "rollback").phase == "verified"  # switched back
    assert state.advance(store, "m1-a", "switch").phase == "switched"
    with pytest.raises(ReshardStateError, match="finalize is never automatic"):
        state.advance(store, "m1-a", "advance")
    done = state.advance(store, "m1-a", "finalize")
    assert done.phase == "finalized" and not done.active
    assert done.updated_at_ms >= done.created_at_ms
    with pytest.raises(ReshardStateError, match="the migration is over") as exc:
        state.advance(store, "m1-a", "cancel")
    assert exc.value.legal == ()


def test_advance_on_a_phase_read_earlier_loses_the_race(
    meta_url: str, store: MetaStore, orders_raw: dict[str, Any]
) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    state.advance(store, "m1-a", "start")
    with MetaStore(meta_url) as other:  # another process on the same store
        seen_here = state.get(store, "m1-a").phase
        seen_there = state.get(other, "m1-a").phase
        assert seen_here == seen_there == "prepared"
        state.advance(other, "m1-a", "copy", expected=seen_there)
        with pytest.raises(ConcurrentChangeError) as exc:
            state.advance(store, "m1-a", "copy", expected=seen_here)
        assert "was prepared when copy was decided" in str(exc.value)
        assert "moved it to copied" in str(exc.value)
        assert state.get(store, "m1-a").phase == "copied"


def test_concurrent_advances_have_one_winner(
    meta_url: str, store: MetaStore, orders_raw: dict[str, Any]
) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    for action in ("start", "copy"):
        state.advance(store, "m1-a", action)
    stores = [MetaStore(meta_url), MetaStore(meta_url)]
    barrier = threading.Barrier(2)
    outcomes: list[str] = []

    def run(s: MetaStore) -> None:
        barrier.wait()
        try:
            state.advance(s, "m1-a", "verify", expected="copied")
            outcomes.append("won")
        except ConcurrentChangeError:
            outcomes.append("lost")

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for s in stores:
        s.close()
    assert sorted(outcomes) == ["lost", "won"]
    assert state.get(store, "m1-a").phase == "verified"
    verifies = [e for e in state.events(store, "m1-a") if e["message"].startswith("verify")]
    assert len(verifies) == 1


def test_the_guarded_update_catches_a_change_behind_the_read(
    store: MetaStore, orders_raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A phase changed between the read and the UPDATE (which the row lock prevents; the
    # UPDATE ... WHERE state = <read> is the second guard): simulated by changing the row in
    # the same transaction right after the read. Nothing is written: the transaction rolls back.
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    state.advance(store, "m1-a", "start")
    real_row = state._row

    def racing(conn: Any, s: MetaStore, mid: str, *, lock: bool = False) -> Any:
        row = real_row(conn, s, mid, lock=lock)
        if lock:
            conn.execute(update(migrations_table).values(state="rolled_back"))
        return row

    monkeypatch.setattr(state, "_row", racing)
    with pytest.raises(ConcurrentChangeError, match="was prepared when copy was decided"):
        state.advance(store, "m1-a", "copy")
    monkeypatch.undo()
    assert state.get(store, "m1-a").phase == "prepared"


def test_checkpoints(store: MetaStore, orders_raw: dict[str, Any]) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    state.create(store, plan(orders_raw, 512, 520, "s3", "m1-b"))
    assert state.get_checkpoint(store, "m1-a", "copy:orders_0001") is None
    assert state.get_checkpoint(store, "m1-a", "copy:orders_0001", default=0) == 0
    state.set_checkpoint(store, "m1-a", "copy:orders_0001", {"last": [17, "x"], "rows": 3})
    state.set_checkpoint(store, "m1-a", "copy:orders_0001", {"last": [42, "y"], "rows": 9})
    state.set_checkpoint(store, "m1-a", "switch:version", 12)
    state.set_checkpoint(store, "m1-b", "switch:version", 99)
    assert state.get_checkpoint(store, "m1-a", "copy:orders_0001") == {
        "last": [42, "y"],
        "rows": 9,
    }
    assert state.checkpoints(store, "m1-a") == {
        "copy:orders_0001": {"last": [42, "y"], "rows": 9},
        "switch:version": 12,
    }
    assert state.checkpoints(store, "m1-b") == {"switch:version": 99}
    with pytest.raises(ReshardStateError, match="are the event log's"):
        state.set_checkpoint(store, "m1-a", "event:000000001", 1)
    with pytest.raises(ReshardStateError, match="not JSON-able"):
        state.set_checkpoint(store, "m1-a", "bad", {1, 2})
    with pytest.raises(ReshardStateError, match="not JSON-able"):
        state.set_checkpoint(store, "m1-a", "nan", float("nan"))
    with pytest.raises(ReshardStateError, match="use 1-191 characters"):
        state.set_checkpoint(store, "m1-a", "x" * 192, 1)
    with pytest.raises(ReshardStateError, match="no migration 'm1-zz'"):
        state.set_checkpoint(store, "m1-zz", "copy", 1)


def test_events(store: MetaStore, orders_raw: dict[str, Any]) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    state.advance(store, "m1-a", "start")
    added = state.add_event(store, "m1-a", "copied chunk", table="orders_0001", rows=500)
    assert added["seq"] == 3 and added["rows"] == 500 and added["at_ms"] > 0
    state.mark_running(store, "m1-a", "copy")
    log = state.events(store, "m1-a")
    assert [e["message"] for e in log] == [
        "planned",
        "start done: planned -> prepared",
        "copied chunk",
        "copy running: prepared -> copying",
    ]
    assert [e["seq"] for e in log] == [1, 2, 3, 4]
    assert log[0]["base_version"] == 1
    assert [e["at_ms"] for e in log] == sorted(e["at_ms"] for e in log)
    assert [e["seq"] for e in state.events(store, "m1-a", limit=2)] == [3, 4]
    assert "event:000000001" not in state.checkpoints(store, "m1-a")
    for i in range(8):  # past nine events the names still sort by sequence
        state.add_event(store, "m1-a", f"e{i}")
    assert [e["seq"] for e in state.events(store, "m1-a")] == list(range(1, 13))
    with pytest.raises(ReshardStateError, match="not JSON-able"):
        state.add_event(store, "m1-a", "bad", value=object())
    with pytest.raises(ReshardStateError, match="no migration"):
        state.add_event(store, "m1-zz", "x")


def test_a_store_not_initialised_is_refused(tmp_path: Path, orders_raw: dict[str, Any]) -> None:
    with MetaStore(f"sqlite:///{tmp_path / 'empty.db'}") as empty:
        with pytest.raises(MetaStoreError, match="shardctl meta init"):
            state.create(empty, plan(orders_raw, 0, 100, "s1", "m1-a"))
        with pytest.raises(MetaStoreError, match="shardctl meta init"):
            state.all(empty)


def test_a_stored_plan_changed_outside_shardctl(
    store: MetaStore, orders_raw: dict[str, Any]
) -> None:
    state.create(store, plan(orders_raw, 0, 100, "s1", "m1-a"))
    with store.begin() as conn:
        conn.execute(update(migrations_table).values(plan="[1, 2]"))
    with pytest.raises(ReshardStateError, match="stored plan is not a JSON object"):
        state.get(store, "m1-a")
