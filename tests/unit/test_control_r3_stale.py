"""The control plane, third round (second review's findings 1, 3 and 6), on a SQLite meta store:

- after the lease has lapsed, every snapshot pinned before the lapse stays write-dead, even
  once the router has recovered (transactions, connection() blocks, ORM sessions, commits);
  new statements after the recovery write again;
- an ORM object loaded under an older topology version is not written by a session of a
  newer one to the placement of its old identity token (refused: reload it);
- a routed session releases its snapshot when its transaction ends (commit, rollback), and a
  session dropped without close() is freed without the cycle collector: neither holds the
  router's acknowledgement of a new version.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from control_cluster import user_in_slots, wait_until
from control_orm import Note
from sqlalchemy import create_engine, select, text, update
from sqlalchemy.orm import scoped_session

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError, ShardRouterError
from shardrouter.orm.session import RoutedSession, routed_sessionmaker

pytestmark = pytest.mark.timeout(60)


def rows_of(path: Path, user: int) -> list[Any]:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as conn:
            return list(
                conn.execute(text("SELECT body FROM notes WHERE user_id = :u"), {"u": user})
            )
    finally:
        engine.dispose()


def moved(raw: dict[str, Any]) -> dict[str, Any]:
    """The version after a move of slots [0, 10) from s0 to s1."""
    doc = copy.deepcopy(raw)
    doc["shards"]["s0"]["slots"] = [[10, 256]]
    doc["shards"]["s1"]["slots"] = [[0, 10], [256, 512]]
    return doc


def moving(raw: dict[str, Any]) -> dict[str, Any]:
    doc = copy.deepcopy(raw)
    doc["moving"] = [{"slots": [0, 10], "source": "s0", "target": "s1"}]
    return doc


def cut_off_while_the_move_completes(router: Router, store: MetaStore) -> None:
    """The router loses the store (its poller paused); meanwhile version 2 (slots [0, 10)
    moving s0 -> s1) and version 3 (s1 owns them) are pushed and acknowledged by every live
    router (this one's lease expired); then the store answers again and the router swaps to
    version 3 and renews its lease."""
    raw = store.current()
    assert raw is not None
    follower = router._follower
    follower.pause()
    store.push(moving(dict(raw.document)), expected=1, comment="slots 0-10 moving")
    assert wait_for_acks(store, 2, timeout=10).complete
    store.push(moved(dict(raw.document)), expected=2, comment="slots 0-10 now on s1")
    report = wait_for_acks(store, 3, timeout=10)
    assert report.complete, report.describe()
    assert [r.instance_id for r in report.expired] == [follower.instance_id]
    follower.resume()
    wait_until(lambda: router.version == 3 and not router.resolver.fence.expired())


# -- finding 1: nothing pinned before a lapse writes after the recovery ------------------------


def test_recovered_router_does_not_write_with_a_version_the_cluster_moved_past_while_it_was_cut_off(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """(The review's reproduction.) A transaction is open on version 1 when the router loses
    the store; versions 2 (slots [0, 10) moving) and 3 (s1 owns them) are pushed and
    acknowledged without it. Recovered, the router swaps to 3 and renews; the version-1
    transaction's INSERT of a slot < 10 row would land on s0, where no reader looks."""
    raw, store = cluster
    v2 = moving(raw)
    v3 = moved(raw)
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        with pytest.raises(FencedError), router.transaction() as txn:
            txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})  # bound to s0
            router._follower.pause()  # cut off from the store
            store.push(v2, expected=1, comment="slots 0-10 moving")
            assert wait_for_acks(store, 2, timeout=10).complete
            store.push(v3, expected=2, comment="slots 0-10 now on s1")
            report = wait_for_acks(store, 3, timeout=10)
            assert report.complete, report.describe()
            assert [r.instance_id for r in report.expired] == [router._follower.instance_id]
            router._follower.resume()  # the store answers again
            # swapped, and the heartbeat that saw version 3 was processed (fenced or not)
            wait_until(lambda: router.version == 3 and router.resolver.fence.current == 3)
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'stale')", {"u": user})
        assert rows_of(tmp_path / "s0.db", user) == []  # nothing written where it is lost


def test_after_the_recovery_pins_from_before_the_lapse_refuse_and_new_ones_write(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """Once the lease is renewed, a transaction, a connection() block and an ORM session
    pinned before the lapse refuse every write (the message says why and how to get out);
    a new statement, transaction and session write on version 3 (slot < 10 on s1); and the
    router acknowledges version 3 once the old users have ended."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        txn_cm = router.transaction()
        txn = txn_cm.__enter__()
        txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})
        conn_cm = router.connection(user_id=user)
        conn = conn_cm.__enter__()
        session = RoutedSession(router)
        assert session.get(Note, user) is None  # its transaction pins version 1
        try:
            cut_off_while_the_move_completes(router, store)
            assert not router.resolver.fence.expired()  # recovered

            with pytest.raises(FencedError) as info:
                txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'txn')", {"u": user})
            message = str(info.value)
            assert "topology version 1" in message and "lapsed" in message
            assert "start a new one" in message and "current version" in message
            with pytest.raises(FencedError, match="lapsed"):
                conn.execute(text("INSERT INTO notes VALUES (:u, 'conn')"), {"u": user})
                conn_cm.__exit__(None, None, None)  # its commit is refused
            session.add(Note(user_id=user, body="orm"))
            with pytest.raises(FencedError, match="lapsed"):
                session.flush()
            session.rollback()  # ends its transaction: the next one pins version 3
        finally:
            txn_cm.__exit__(FencedError, FencedError("end"), None)
            with contextlib.suppress(FencedError):
                conn_cm.__exit__(FencedError, FencedError("end"), None)

        # new users write, on version 3
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'new')", {"u": user})
        assert rows_of(tmp_path / "s1.db", user) == [("new",)]
        with router.transaction() as fresh:
            fresh.execute("UPDATE notes SET body = 'txn' WHERE user_id = :u", {"u": user})
        session.add(Note(user_id=user + 100_000, body="orm"))
        session.commit()
        assert session.get(Note, user).body == "txn"  # type: ignore[union-attr]
        session.close()
        assert rows_of(tmp_path / "s0.db", user) == []
        assert wait_for_acks(store, 3, timeout=5).complete  # the old users are gone


def test_a_write_checked_before_the_lapse_is_not_committed_after_the_recovery(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """A transaction wrote (checked while the lease was live), then the router was cut off,
    the cluster moved on and the router recovered: its commit must be refused (rolled back),
    not land after the cluster stopped waiting for it. Same for an ORM session's flush."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        with pytest.raises(FencedError, match=r"commit of.*lapsed"), router.transaction() as txn:
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'txn')", {"u": user})
            session = RoutedSession(router)
            session.add(Note(user_id=user + 100_000, body="orm"))
            session.flush()
            cut_off_while_the_move_completes(router, store)
        with pytest.raises(FencedError, match=r"commit of.*lapsed"):
            session.commit()
        session.close()
        assert rows_of(tmp_path / "s0.db", user) == []
        assert rows_of(tmp_path / "s0.db", user + 100_000) == []


def test_a_lapse_without_a_new_version_still_kills_the_pins_from_before_it(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """The simple exact rule: whatever the store shows after the recovery, a snapshot pinned
    before a lapse never writes again; new statements do."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        fence = router.resolver.fence
        with pytest.raises(FencedError, match="lapsed"), router.transaction() as txn:
            txn.execute("SELECT * FROM notes WHERE user_id = 5")
            router._follower.pause()
            wait_until(fence.expired, timeout=3)
            router._follower.resume()
            wait_until(lambda: not fence.expired())
            assert router.version == 1
            txn.execute("INSERT INTO notes (user_id, body) VALUES (5, 'stale')")
        router.execute("INSERT INTO notes (user_id, body) VALUES (5, 'new')")
        shard = router.route_key(user_id=5)[0]
        assert rows_of(tmp_path / f"{shard}.db", 5) == [("new",)]


# -- finding 3: an object of an older version is not written to its old placement --------------


def test_orm_update_of_an_object_loaded_under_an_older_version_goes_where_the_resolver_says(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """(The review's reproduction.) An object loaded under version 1 (slot < 10 on s0),
    detached, then added to a session of version 2 where s1 owns the slot: its UPDATE must
    not go to s0 (its identity token) while the resolver says s1."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": user})
        with RoutedSession(router, expire_on_commit=False) as first:
            note = first.get(Note, user)
            assert note is not None
        # the move (resharding's copy), then the version where s1 owns the slots
        engine = create_engine(f"sqlite:///{tmp_path}/s1.db")
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO notes VALUES (:u, 'v1')"), {"u": user})
        engine.dispose()
        store.push(moved(raw), expected=1, comment="slots 0-10 now on s1")
        assert wait_for_acks(store, 2, timeout=10).complete
        assert router.route_key(user_id=user)[0] == "s1"
        seen: list[Any] = []
        router.resolver.hook = seen.append
        with RoutedSession(router) as second:
            second.add(note)
            note.body = "changed"
            try:
                second.commit()
            except ShardRouterError:
                pass  # refused: acceptable
            else:
                assert [r.shard for r in seen if r.path == "orm"] == ["s1"]
                assert rows_of(tmp_path / "s1.db", user) == [("changed",)], (
                    "the update went to s0, the shard of the object's old placement"
                )
        assert rows_of(tmp_path / "s0.db", user) == [("v1",)]


def test_an_object_of_an_older_version_in_the_same_session_is_refused_then_reloaded(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """The session's next transaction routes by the router's version of that moment; an
    object its identity map kept from an older version whose slot moved is refused (UPDATE
    and DELETE, FencedError naming the fix), nothing is written on s0; reloaded, it is
    written on s1. An object whose slot did not move is written as usual."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        other = user_in_slots(router, 10, 256)  # stays on s0
        for u in (user, other):
            router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": u})
        session = RoutedSession(router, expire_on_commit=False)
        try:
            note = session.get(Note, user)
            kept = session.get(Note, other)
            assert note is not None and kept is not None
            session.commit()
            engine = create_engine(f"sqlite:///{tmp_path}/s1.db")
            with engine.begin() as conn:
                conn.execute(text("INSERT INTO notes VALUES (:u, 'v1')"), {"u": user})
            engine.dispose()
            store.push(moved(raw), expected=1, comment="slots 0-10 now on s1")
            # the session's commit released its snapshot: it does not hold the ack
            assert wait_for_acks(store, 2, timeout=5).complete

            note.body = "changed"
            with pytest.raises(FencedError) as info:
                session.commit()
            message = str(info.value)
            assert "UPDATE of Note" in message and "'s0'" in message and "'s1'" in message
            assert "topology version 2" in message and "reload the object" in message
            session.rollback()
            session.delete(note)
            with pytest.raises(FencedError, match="DELETE of Note"):
                session.flush()
            session.rollback()

            kept.body = "kept"  # its slot stayed on s0: written as before
            session.commit()

            session.expunge(note)
            fresh = session.get(Note, user)
            assert fresh is not None and fresh is not note
            fresh.body = "reloaded"
            session.commit()
        finally:
            session.close()
        assert rows_of(tmp_path / "s0.db", user) == [("v1",)]
        assert rows_of(tmp_path / "s1.db", user) == [("reloaded",)]
        assert rows_of(tmp_path / "s0.db", other) == [("kept",)]


def test_a_write_on_a_placement_the_caller_names_passes_the_resolver(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """An ORM UPDATE run on an identity token the caller chose (execution option) bypassed
    the resolver: it must be fenced like every other write."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        seen: list[Any] = []
        router.resolver.hook = seen.append
        with RoutedSession(router) as session:
            session.execute(
                update(Note).where(Note.user_id == 3).values(body="x"),
                execution_options={"identity_token": "s1"},
            )
            session.commit()
        assert [(r.path, r.shard) for r in seen] == [("orm", "s1")]
        router._follower.pause()
        try:
            wait_until(router.resolver.fence.expired, timeout=3)
            with RoutedSession(router) as session, pytest.raises(FencedError):
                session.execute(
                    update(Note).where(Note.user_id == 3).values(body="y"),
                    execution_options={"identity_token": "s1"},
                )
        finally:
            router._follower.resume()


# -- finding 6: the session's pin does not outlive its transaction ------------------------------


def test_a_routed_session_dropped_without_close_does_not_hold_the_ack_until_a_full_gc(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """(The review's reproduction.) A session used, committed and dropped without close()
    must not hold the router's acknowledgement until the cyclic garbage collector runs."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:

        def handler() -> None:
            session = RoutedSession(router)
            session.add(Note(user_id=7, body="x"))
            session.commit()  # the work is done; the session goes out of scope

        gc.disable()
        try:
            handler()
            store.push(moving(raw), expected=1, comment="slots 0-10 moving")
            report = wait_for_acks(store, 2, timeout=3)
            assert report.complete, report.describe()
        finally:
            gc.enable()
            gc.collect()


def test_a_session_dropped_with_its_transaction_open_is_freed_without_the_cycle_collector(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """Its own listeners and choosers do not keep it alive: dropped unused (or after a
    rollback), the session is freed by reference counting and releases its snapshot."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        snap = router._snap
        gc.disable()
        try:
            session = RoutedSession(router)
            assert session._snap is snap and snap.users == 1  # pinned outside a transaction
            ref = weakref.ref(session)
            del session
            assert ref() is None
            assert snap.users == 0
        finally:
            gc.enable()


def test_a_scoped_session_never_removed_does_not_hold_the_ack_after_its_commit(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """A scoped_session registry keeps its session for the thread: the snapshot is released
    when the session's transaction ends, pinned again (the current version) at the next use."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        registry = scoped_session(routed_sessionmaker(router))
        try:
            registry.add(Note(user_id=8, body="x"))
            registry.commit()
            assert router._snap.users == 0
            store.push(moving(raw), expected=1, comment="slots 0-10 moving")
            report = wait_for_acks(store, 2, timeout=3)
            assert report.complete, report.describe()
            # the next use routes by version 2 (and pins it until its transaction ends)
            assert registry.scalars(select(Note).where(Note.user_id == 8)).one().body == "x"
            assert registry()._snap.version == 2 and router._snap.users == 1
            registry.rollback()
            assert router._snap.users == 0
        finally:
            registry.remove()


def test_a_session_transaction_holds_the_ack_until_it_ends(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """While its transaction is open (a flush, not yet committed) the session keeps its
    version, and the router does not acknowledge a newer one; the commit lets go."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router, RoutedSession(router) as session:
        session.add(Note(user_id=9, body="x"))
        session.flush()
        store.push(moving(raw), expected=1, comment="slots 0-10 moving")
        wait_until(lambda: router.version == 2)
        assert not wait_for_acks(store, 2, timeout=0.5).complete
        assert session._snap.version == 1
        session.commit()
        assert wait_for_acks(store, 2, timeout=5).complete
        assert session.get(Note, 9) is not None
        assert session._snap.version == 2
