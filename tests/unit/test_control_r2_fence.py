"""The control plane's fence, second round (review findings 1, 2, 3 and 5, and the routed
session's snapshot released by close()), on a SQLite meta store:

- a router whose lease expired refuses every write (it cannot know which slots are moving),
  and every commit of writes checked before the expiry;
- a router registering after a newer version was acknowledged catches up before it serves;
- a router acknowledges a version only once no user of an older snapshot can still write;
- a following router inherited through fork() refuses in the child (RouterForkedError);
- RoutedSession.close() releases its snapshot (not only garbage collection).
"""

from __future__ import annotations

import copy
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from control_cluster import document, moving_document, user_in_slots, wait_until
from control_orm import Note
from sqlalchemy import create_engine, text

from shardrouter.control.follow import Follower
from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.engine.snapshot import Resolution
from shardrouter.errors import ConfigError, FencedError, RouterForkedError, ShardRouterError
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(60)


def insert(router: Router, user: int, body: str) -> None:
    with router.connection(user_id=user) as conn:
        conn.execute(
            text("INSERT INTO notes VALUES (:u, :b) ON CONFLICT DO NOTHING"),
            {"u": user, "b": body},
        )


# -- finding 1: an expired lease refuses every write ------------------------------------------


def test_cut_off_router_fences_slots_that_started_moving_after_it_lost_the_store(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """Router b stops renewing (its poller paused: the store is out of its reach); a version
    moving slots [0, 10) is pushed and acknowledged by every LIVE router (b's lease expired,
    so wait_for_acks no longer waits for it). b still serves version 1, which has no moving
    ranges: it may not write slot < 10 with it (nor any other slot: it cannot know)."""
    raw, store = cluster
    with (
        Router.from_config(config_from_dict(raw)) as a,
        Router.from_config(config_from_dict(raw)) as b,
    ):
        moving_user = user_in_slots(a, 0, 10)
        b._follower.pause()  # b cannot reach the meta store any more
        store.push(moving_document(raw, 0, 10), expected=1, comment="slots 0-10 moving")
        report = wait_for_acks(store, 2, timeout=10)
        assert report.complete, report.describe()
        assert [r.instance_id for r in report.expired] == [b._follower.instance_id]
        assert a.version == 2
        assert b.version == 1
        wait_until(lambda: b.resolver.fence.expired(), timeout=3)
        with pytest.raises(FencedError), b.connection(user_id=moving_user) as conn:
            conn.execute(
                text("INSERT INTO notes VALUES (:u, 'stale') ON CONFLICT DO NOTHING"),
                {"u": moving_user},
            )
        b._follower.resume()


def test_an_expired_lease_refuses_every_write_reads_go_on_and_it_recovers(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 600, 1024)  # not moving in any version here
        insert(router, user, "before")
        router._follower.pause()
        # before the lease ends nothing changes
        assert not router.resolver.fence.expired()
        insert(router, user + 100_000, "still live")
        wait_until(lambda: router.resolver.fence.expired(), timeout=3)
        with pytest.raises(FencedError) as info, router.connection(user_id=user):
            pass
        message = str(info.value)
        assert info.value.slot == router.route_key(user_id=user)[1]
        assert "lease with the meta store expired at" in message
        assert "cannot know which slots are moving" in message
        assert "meta store must answer again" in message and "by itself" in message
        with pytest.raises(FencedError):  # the statement path (a job: the shard is named)
            router.execute("UPDATE notes SET body = 'x' WHERE user_id = :u", {"u": user})
        with pytest.raises(FencedError), router.transaction() as txn:
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 't')", {"u": user + 1})
        session = RoutedSession(router)
        try:
            session.add(Note(user_id=user + 2, body="orm"))
            with pytest.raises(FencedError):
                session.flush()
        finally:
            session.close()
        # reads keep working
        rows = router.execute("SELECT body FROM notes WHERE user_id = :u", {"u": user}).rows
        assert [tuple(r) for r in rows] == [("before",)]
        router._follower.resume()
        wait_until(lambda: not router.resolver.fence.expired())
        router.execute("UPDATE notes SET body = 'after' WHERE user_id = :u", {"u": user})


def test_a_commit_after_the_lease_expired_is_refused_and_rolled_back(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """Writes checked while the lease was live but committed after it expired would land
    after the cluster stopped waiting for this router: the commit is fenced too."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        fence = router.resolver.fence

        def count(user: int) -> int:
            sql = "SELECT COUNT(*) FROM notes WHERE user_id = :u"
            return int(router.execute(sql, {"u": user}).rows[0][0])

        with pytest.raises(FencedError, match="commit of"), router.transaction() as txn:
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'txn')", {"u": 21})
            router._follower.pause()
            wait_until(fence.expired, timeout=3)
        assert count(21) == 0
        router._follower.resume()
        wait_until(lambda: not fence.expired())

        with pytest.raises(FencedError, match="commit of"), router.connection(user_id=22) as c:
            c.execute(text("INSERT INTO notes VALUES (22, 'explicit')"))
            router._follower.pause()
            wait_until(fence.expired, timeout=3)
        assert count(22) == 0
        router._follower.resume()
        wait_until(lambda: not fence.expired())

        session = RoutedSession(router)
        try:
            session.add(Note(user_id=23, body="orm"))
            session.flush()
            router._follower.pause()
            wait_until(fence.expired, timeout=3)
            with pytest.raises(FencedError, match="commit of"):
                session.commit()
            session.rollback()
        finally:
            session.close()
        assert count(23) == 0
        router._follower.resume()
        wait_until(lambda: not fence.expired())
        with router.transaction() as txn:  # recovered: commits again
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'ok')", {"u": 21})
        assert count(21) == 1


def test_a_router_without_meta_is_never_fenced(tmp_path: Path) -> None:
    raw = document(tmp_path)
    del raw["meta"]
    for name in raw["shards"]:
        engine = create_engine(f"sqlite:///{tmp_path}/{name}.db")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)"))
        engine.dispose()
    with Router.from_config(config_from_dict(raw)) as router:
        assert router.resolver.fence.lease_end == float("inf")
        insert(router, 5, "no meta")
        assert not router.resolver.fence.expired()


# -- finding 2: registering after a newer version was acknowledged -----------------------------


def test_router_registering_after_a_newer_version_was_acked_does_not_write_with_the_old_one(
    cluster: tuple[dict[str, Any], MetaStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Router b reads the current version (1), then, before it registers, version 2 (slots
    [0, 10) moving) is pushed and acknowledged by every live router (a). b must catch up
    before it serves: its first write to slot < 10 runs on version 2 (or is refused)."""
    raw, store = cluster
    slow = dict(raw)
    slow["meta"] = {**raw["meta"], "poll_interval_s": 1.0, "fast_poll_interval_s": 1.0}
    slow["meta"]["lease_s"] = 5.0
    with Router.from_config(config_from_dict(raw)) as a:
        moving_user = user_in_slots(a, 0, 10)
        original = Follower.initial_topology

        def load_then_race(self: Follower) -> Any:
            topology = original(self)
            store.push(moving_document(raw, 0, 10), expected=1, comment="slots 0-10 moving")
            assert wait_for_acks(store, 2, timeout=10).complete
            return topology

        monkeypatch.setattr(Follower, "initial_topology", load_then_race)
        b = Router.from_config(config_from_dict(slow))
        monkeypatch.setattr(Follower, "initial_topology", original)
        try:
            assert b.version == 2  # caught up before from_config returned
            (row,) = [r for r in store.routers() if r.instance_id == b._follower.instance_id]
            assert (row.serving_version, row.acked_version) == (2, 2)
            seen: list[Resolution] = []
            b.resolver.hook = seen.append
            try:
                insert(b, moving_user, "x")
            except FencedError:
                pass  # refused: correct
            else:
                assert [r.version for r in seen] == [2], (
                    f"a write to moving slot {seen[0].slot} ran on topology version"
                    f" {seen[0].version} after every live router acknowledged version 2"
                )
        finally:
            b.close()


def test_a_start_whose_newer_version_does_not_validate_fails_and_deregisters(
    cluster: tuple[dict[str, Any], MetaStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The version pushed between loading and registering cannot be used here: the router
    does not start (rather than serve the older one), and leaves no registry row behind."""
    raw, store = cluster
    original = Follower.initial_topology

    def load_then_race(self: Follower) -> Any:
        topology = original(self)
        bad = copy.deepcopy(raw)
        bad["shards"]["s1"]["primary"] = "sqlite:///${SHARDROUTER_TEST_UNSET_VAR}/x.db"
        store.push(bad, expected=1, comment="needs an env var this process lacks")
        return topology

    monkeypatch.setattr(Follower, "initial_topology", load_then_race)
    with pytest.raises(ConfigError, match="version 2") as info:
        Router.from_config(config_from_dict(raw)).close()
    assert "SHARDROUTER_TEST_UNSET_VAR" in str(info.value)
    assert store.routers() == []


# -- finding 3: no acknowledgement while an older snapshot can still write ---------------------


def test_no_write_on_an_older_version_after_every_router_acked_a_newer_one(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """An explicit connection opened on version 2 (slots [0, 10) moving, lease live) stays
    open while version 3 is pushed: the router swaps, but acknowledges version 3 only once
    the connection is done, so wait_for_acks(3) waits for it (and names it lagging)."""
    raw, store = cluster
    v2 = moving_document(raw, 0, 10)
    with Router.from_config(config_from_dict(raw)) as router:
        store.push(v2, expected=1, comment="slots 0-10 moving")
        assert wait_for_acks(store, 2, timeout=5).complete
        moving_user = user_in_slots(router, 0, 10)
        with router.connection(user_id=moving_user) as conn:
            v3 = copy.deepcopy(v2)
            v3["shards"]["s2"]["replicas"] = [f"sqlite:///{tmp_path}/s2.db"]
            store.push(v3, expected=2, comment="a replica on s2")
            wait_until(lambda: router.version == 3)  # swapped: new statements run on 3
            report = wait_for_acks(store, 3, timeout=1.0)
            if report.complete:  # then this version-2 connection may not write slot < 10
                with pytest.raises(FencedError):
                    conn.execute(
                        text("INSERT INTO notes (user_id, body) VALUES (:u, 'late')"),
                        {"u": moving_user},
                    )
            else:
                assert [r.instance_id for r in report.lagging] == [router._follower.instance_id]
                assert report.lagging[0].acked_version == 2
                assert report.lagging[0].serving_version == 3
                conn.execute(  # no router has moved past version 2: still safe
                    text("INSERT INTO notes (user_id, body) VALUES (:u, 'late')"),
                    {"u": moving_user},
                )
        assert wait_for_acks(store, 3, timeout=5).complete  # acknowledged once it closed


def test_a_transaction_on_an_older_version_holds_the_ack_until_it_ends(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        moving_user = user_in_slots(router, 0, 10)
        with router.transaction() as txn:
            txn.execute("SELECT * FROM notes WHERE user_id = :u", {"u": moving_user})
            store.push(moving_document(raw, 0, 10), expected=1)
            wait_until(lambda: router.version == 2)
            assert not wait_for_acks(store, 2, timeout=0.5).complete
            assert router.resolver.fence.acked == 1
            txn.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'txn')", {"u": moving_user})
        assert wait_for_acks(store, 2, timeout=5).complete
        assert router.resolver.fence.acked == 2


def test_a_routed_session_holds_the_ack_until_close_and_then_follows(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        session = RoutedSession(router)
        try:
            session.add(Note(user_id=11, body="v1"))
            session.flush()  # its transaction holds the version (a commit releases it too)
            store.push(moving_document(raw, 0, 10), expected=1)
            wait_until(lambda: router.version == 2)
            assert not wait_for_acks(store, 2, timeout=0.5).complete
            assert session._snap.version == 1
            session.close()  # rolls the flush back and lets go
            assert wait_for_acks(store, 2, timeout=5).complete
            # the same session, used again after close(), routes by the current version
            session.add(Note(user_id=11, body="v2"))
            session.commit()
            assert session.get(Note, 11) is not None
            assert session._snap.version == 2
            assert router._snap.users == 1
        finally:
            session.close()
        assert router._snap.users == 0


# -- the routed session releases its snapshot on close(), not only when collected -------------


def test_routed_session_close_releases_its_snapshot(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        snap = router._snap
        with RoutedSession(router) as session:
            session.add(Note(user_id=12, body="x"))
            session.flush()
            assert snap.users == 1
        assert snap.users == 0  # released although `session` is still referenced
        session.close()  # idempotent: nothing released twice
        assert snap.users == 0
        other = RoutedSession(router)
        other.reset()
        assert snap.users == 0
        other.add(Note(user_id=13, body="y"))  # usable after reset: pins again
        other.flush()
        assert snap.users == 1
        other.invalidate()
        assert snap.users == 0


# -- finding 5: a following router inherited through fork() ------------------------------------


def _forked_writer(router: Router, user: int, conn: Any) -> None:
    """In a fork of the router's process: wait for the go, then write ``user``'s row, then
    read; report both outcomes."""
    try:
        if not conn.poll(30):
            conn.send(("no go", 0))
            return
        conn.recv()
        outcome: list[Any] = []
        try:
            insert(router, user, "child")
            outcome.append(("wrote", router.version))
        except BaseException as exc:
            outcome.append(("refused", type(exc).__name__, str(exc)))
        try:
            router.execute("SELECT * FROM notes WHERE user_id = :u", {"u": user})
            outcome.append(("read", router.version))
        except BaseException as exc:
            outcome.append(("refused", type(exc).__name__, str(exc)))
        router.close()  # in the child: must not deregister the parent's row
        conn.send(outcome)
    except BaseException as exc:
        conn.send([("error", type(exc).__name__, str(exc))])
    finally:
        os._exit(0)


def test_router_inherited_through_fork_does_not_write_with_a_stale_version(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """The child inherits the router but not its poller thread, so it never follows the
    meta store, while the registry shows the parent's row acknowledging every new version.
    It refuses (RouterForkedError, naming the fix) instead of writing on version 1."""
    raw, store = cluster
    ctx = multiprocessing.get_context("fork")
    with Router.from_config(config_from_dict(raw)) as router:
        moving_user = user_in_slots(router, 0, 10)
        parent, child = ctx.Pipe()
        process = ctx.Process(target=_forked_writer, args=(router, moving_user, child))
        process.start()
        try:
            child.close()
            store.push(moving_document(raw, 0, 10), expected=1, comment="slots 0-10 moving")
            assert wait_for_acks(store, 2, timeout=10).complete
            parent.send("go")
            assert parent.poll(30), "the child did not answer"
            outcome = parent.recv()
        finally:
            process.join(10)
            if process.is_alive():
                process.kill()
                process.join(5)
        write, read = outcome
        assert write[:2] == ("refused", "RouterForkedError"), outcome
        assert "after forking" in write[2] and "fork()" in write[2]
        assert read[:2] == ("refused", "RouterForkedError"), outcome
        # the parent is untouched: still registered, following, writing
        assert router._follower.instance_id in {r.instance_id for r in store.routers()}
        insert(router, moving_user, "parent")
        store.push(raw, expected=2, comment="moves done")
        assert wait_for_acks(store, 3, timeout=10).complete
        assert router.version == 3
    assert issubclass(RouterForkedError, ShardRouterError)
