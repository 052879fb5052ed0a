"""The control plane, fourth round (the third review's findings), on a SQLite meta store:

1. questions that run nothing (``session.placement()``, ``session.get_bind(instance=obj)``)
   outside a transaction do not pin the session's version (the router could never
   acknowledge a newer one);
2. ``session.connection()`` with an unknown token, or with none, and ``get_bind(Class)`` are
   refused typed, naming the way out, and pin nothing;
3. reads of an object loaded under an older version (the refresh of its expired attributes,
   a lazy load of its children) are not served from its old placement: a refresh is refused
   where its slot moved, a lazy load routes by the children's key; ``session.delete`` of it
   is refused as a fenced DELETE;
4. the ORM's engine hook is registered once per engine, whatever the number of versions, and
   an old version's routing is not kept alive by it;
5. a version whose ``meta:`` names another store is rejected by followers; one with other
   ``meta:`` settings is served with the router's own settings.
"""

from __future__ import annotations

import copy
import gc
import weakref
from pathlib import Path
from typing import Any

import pytest
from control_cluster import user_in_slots, wait_until
from control_orm import Note, Order, moved, sql
from sqlalchemy import event, text

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError, RoutingError
from shardrouter.orm import session as orm_session
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(60)


def _pushmoved(store: MetaStore, raw: dict[str, Any]) -> None:
    store.push(moved(raw), expected=1, comment="slots 0-10 now on s1")
    report = wait_for_acks(store, 2, timeout=5)
    assert report.complete, report.describe()


# -- finding 1 ---------------------------------------------------------------------------------


def test_questions_outside_a_transaction_do_not_hold_the_ack(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        session = RoutedSession(router)
        try:
            assert session.placement("s1").shard == "s1"
            engine = session.get_bind(Note.__mapper__, instance=Note(user_id=5, body="x"))
            assert engine is router.engines.primary(router.route_key(user_id=5)[0])
            assert not session.in_transaction()
            assert router._snap.users == 0
            _pushmoved(store, raw)
            assert session.placement("s1").shard == "s1"  # the new version's, unpinned
        finally:
            session.close()


# -- finding 2 ---------------------------------------------------------------------------------


def test_connection_with_an_unknown_token_is_refused_typed_and_pins_nothing(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router, RoutedSession(router) as session:
        with pytest.raises(RoutingError, match=r"'nope' is not a placement.*known: s0"):
            session.connection(bind_arguments={"shard_id": "nope"})
        with pytest.raises(RoutingError, match=r"bind_arguments=\{'shard_id': token\}"):
            session.connection()
        with pytest.raises(RoutingError, match=r"get_bind\(Note\) names no placement"):
            session.get_bind(Note)
        with pytest.raises(RoutingError, match="instance=obj"):
            session.get_bind()
        assert not session.in_transaction()
        assert router._snap.users == 0
        _pushmoved(store, raw)
        conn = session.connection(bind_arguments={"shard_id": "s1"})
        assert conn.execute(text("SELECT 1")).scalar() == 1
        assert session._snap.version == 2


# -- finding 3 ---------------------------------------------------------------------------------


def test_a_refresh_of_an_object_whose_slot_moved_is_refused_not_read_from_the_old_shard(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """Loaded under version 1 (slot < 10 on s0), expired by the commit; the slot moves to s1,
    where the row has changed since the copy. Reading an expired attribute must not return
    s0's stale value: refused, FencedError naming the reload. An object whose slot did not
    move refreshes as usual; the reloaded object reads s1's row."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        other = user_in_slots(router, 10, 256)
        for u in (user, other):
            router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": u})
        session = RoutedSession(router)  # expire_on_commit
        try:
            note, kept = session.get(Note, user), session.get(Note, other)
            assert note is not None and kept is not None
            session.commit()
            sql(tmp_path / "s1.db", "INSERT INTO notes VALUES (:u, 'on s1')", {"u": user})
            _pushmoved(store, raw)
            with pytest.raises(FencedError, match=r"REFRESH of Note.*reload the object"):
                _ = note.body
            session.rollback()
            assert kept.body == "v1"
            session.rollback()
            with pytest.raises(FencedError, match="DELETE of Note"):
                session.delete(note)
                session.flush()
            session.rollback()
            session.expunge(note)
            fresh = session.get(Note, user)
            assert fresh is not None and fresh.body == "on s1"
        finally:
            session.close()
        assert sql(tmp_path / "s0.db", "SELECT body FROM notes WHERE user_id = :u", {"u": user})


def test_a_lazy_load_of_bound_children_of_a_moved_parent_reads_the_new_placement(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """An order loaded under version 1; its slot moves to s1, where its items are (copied)
    and another was added. ``order.items`` must not load s0's old list."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        slot = router.route_key(user_id=user)[1]
        order_id = router.topology.id_generator("orders", worker_id=1).next_id(user_id=user)
        split = slot % 4
        for shard in ("s0", "s1"):
            sql(
                tmp_path / f"{shard}.db",
                f"CREATE TABLE orders_000{split} (order_id BIGINT PRIMARY KEY, user_id BIGINT)",
            )
            sql(
                tmp_path / f"{shard}.db",
                f"CREATE TABLE order_items_000{split} (order_id BIGINT, line INT,"
                " user_id BIGINT, PRIMARY KEY (order_id, line))",
            )
            sql(
                tmp_path / f"{shard}.db",
                f"INSERT INTO orders_000{split} VALUES (:o, :u)",
                {"o": order_id, "u": user},
            )
            sql(
                tmp_path / f"{shard}.db",
                f"INSERT INTO order_items_000{split} VALUES (:o, 1, :u)",
                {"o": order_id, "u": user},
            )
        sql(
            tmp_path / "s1.db",
            f"INSERT INTO order_items_000{split} VALUES (:o, 2, :u)",
            {"o": order_id, "u": user},
        )
        session = RoutedSession(router, expire_on_commit=False)  # not refreshed first
        try:
            order = session.get(Order, order_id)
            assert order is not None
            session.commit()
            _pushmoved(store, raw)
            # The lazy load routes by the children's key (order_id carries the slot): the
            # new placement, not the parent's old one.
            assert sorted(i.line for i in order.items) == [1, 2]
            session.rollback()
            session.expunge(order)
            fresh = session.get(Order, order_id)
            assert fresh is not None and sorted(i.line for i in fresh.items) == [1, 2]
        finally:
            session.close()


# -- finding 4 ---------------------------------------------------------------------------------


def test_the_engine_hook_is_registered_once_and_keeps_no_old_routing(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        with RoutedSession(router) as session:
            session.add(Note(user_id=1, body="v1"))
            session.commit()
        first = weakref.ref(orm_session._routing_for(router._snap))
        engine = router.engines.primary("s2")  # s2 is in every version: its engine is reused
        for version in range(2, 6):
            doc = copy.deepcopy(raw)
            doc["tables"][f"extra{version}"] = {"column": "user_id", "strategy": "hash"}
            store.push(doc, expected=version - 1, comment=f"v{version}")
            assert wait_for_acks(store, version, timeout=5).complete
            with RoutedSession(router) as session:
                assert session.get(Note, 1) is not None
        assert router.engines.primary("s2") is engine
        hooks = [
            fn for fn in engine.dispatch.before_cursor_execute if fn is orm_session._rewrite_hook
        ]
        assert len(hooks) == 1
        assert event.contains(engine, "before_cursor_execute", orm_session._rewrite_hook)
        gc.collect()
        assert first() is None, "the version 1 routing is still referenced"


# -- finding 5 ---------------------------------------------------------------------------------


def test_a_version_naming_another_meta_store_is_rejected_by_followers(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        doc = copy.deepcopy(raw)
        doc["meta"]["url"] = f"sqlite:///{tmp_path}/elsewhere.db"
        store.push(doc, expected=1, comment="names another store")
        wait_until(lambda: 2 in router._follower.rejected)
        assert "meta.url" in router._follower.rejected[2]
        assert "elsewhere.db" in router._follower.rejected[2]
        assert router.version == 1


def test_a_version_with_other_meta_settings_is_served_with_the_routers_own(
    cluster: tuple[dict[str, Any], MetaStore], caplog: pytest.LogCaptureFixture
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        before = router._follower.meta
        doc = copy.deepcopy(raw)
        doc["meta"]["lease_s"] = 30.0
        with caplog.at_level("WARNING", logger="shardrouter"):
            store.push(doc, expected=1, comment="longer lease")
            assert wait_for_acks(store, 2, timeout=5).complete
        assert router.version == 2
        assert router._follower.meta is before
        assert router.topology.config.meta is not None
        assert router.topology.config.meta.lease_s == before.lease_s == 1.0
        assert any("other meta: settings" in r.getMessage() for r in caplog.records)
