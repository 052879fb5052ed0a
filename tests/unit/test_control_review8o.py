"""Review 8o of the fourth control-plane round (commit 777b988): the ORM session's pins,
binds and refresh checks after a version switch, and the follower's meta-store check.

Every test runs on the SQLite cluster of control_cluster (no MariaDB). The findings, each
fixed (the tests failed before the fix):

- pins outside a transaction: a statement refused after _on_execute pinned (ScatterWriteError,
  an unknown set_shard_id token, a refused REFRESH, autobegin=False), get_bind(mapper, clause=)
  (the session transaction now begins before a statement is routed);
- get_bind outside a transaction returned the binds of the session's last pin, not those of
  the router's current version;
- stale reads of old-version objects: a refresh of an object keyed by its own id (its slot is
  now remembered at load), session.merge() of a detached one (an identity load on a stale
  token is refused), a lazy load inheriting set_shard_id (refused when it names another
  placement than the rows');
- the follower rejected a relative SQLite meta URL naming its own store.

The other tests are guards of attacks that held.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from control_cluster import user_in_slots, wait_until
from control_orm import Base, Note, Order, moved, sql
from sqlalchemy import select, text, update
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    Mapped,
    defer,
    joinedload,
    mapped_column,
    scoped_session,
    selectinload,
)

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import (
    FencedError,
    RoutingError,
    ScatterWriteError,
)
from shardrouter.orm.session import RoutedSession, routed_sessionmaker

pytestmark = pytest.mark.timeout(60)


class _Diary(Base):
    """A sharded table whose primary key is not a sharding column (an id of its own)."""

    __tablename__ = "diary"
    entry_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column()
    body: Mapped[str | None] = mapped_column()


def _push(store: MetaStore, doc: dict[str, Any], version: int, timeout: float = 5) -> None:
    store.push(doc, expected=version - 1, comment=f"v{version}")
    report = wait_for_acks(store, version, timeout=timeout)
    assert report.complete, report.describe()


def _acked(store: MetaStore, doc: dict[str, Any], version: int) -> bool:
    """Push ``doc`` as ``version``; whether every router acknowledged it within 2 s."""
    store.push(doc, expected=version - 1, comment=f"v{version}")
    return wait_for_acks(store, version, timeout=2).complete


def _with_table(raw: dict[str, Any], name: str, ddl: str) -> None:
    raw["tables"][name] = {"column": "user_id", "strategy": "hash"}
    for shard in raw["shards"].values():
        sql(Path(shard["primary"].removeprefix("sqlite:///")), ddl)


# -- pins ----------------------------------------------------------------------------------------


def test_a_refused_statement_outside_a_transaction_pins_nothing(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """A statement the session refuses before anything runs (ScatterWriteError, an unknown
    set_shard_id token) is routed (and so pinned) before any transaction begins: nothing
    would ever release the pin, not even session.rollback()."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        session = RoutedSession(router)
        try:
            with pytest.raises(ScatterWriteError):
                session.execute(update(Note).values(body="x"))
            with pytest.raises(RoutingError):
                session.execute(select(Note).options(set_shard_id("nope")))
            session.rollback()  # what an application does after an error
            assert not session.in_transaction()
            assert router._snap.users == 0, "the refused statement left the version pinned"
            assert _acked(store, moved(raw), 2), "the router cannot acknowledge version 2"
        finally:
            session.close()


def test_a_refused_refresh_outside_a_transaction_pins_nothing(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """The FencedError of a refresh (the object's slot moved) is raised before the load
    begins a transaction, with the session's version pinned by the check itself."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": user})
        session = RoutedSession(router)
        try:
            note = session.get(Note, user)
            assert note is not None
            session.commit()  # expires note, releases the pin
            sql(tmp_path / "s1.db", "INSERT INTO notes VALUES (:u, 'on s1')", {"u": user})
            _push(store, moved(raw), 2)
            with pytest.raises(FencedError):
                _ = note.body
            session.rollback()
            assert not session.in_transaction()
            assert router._snap.users == 0, "the refused refresh left version 2 pinned"
            doc = moved(raw)
            doc["tables"]["extra3"] = {"column": "user_id", "strategy": "hash"}
            assert _acked(store, doc, 3), "the router cannot acknowledge version 3"
        finally:
            session.close()


def test_autobegin_false_statement_outside_begin_pins_nothing(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """autobegin=False: a query outside session.begin() is refused by SQLAlchemy
    (InvalidRequestError) after the routed session pinned the version for it."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        session = RoutedSession(router, autobegin=False)
        try:
            with pytest.raises(Exception, match=r"[Aa]utobegin"):
                session.execute(select(Note).where(Note.user_id == 5))
            assert not session.in_transaction()
            assert router._snap.users == 0, "the refused query left the version pinned"
            with session.begin():
                session.add(Note(user_id=5, body="x"))
            assert router._snap.users == 0
            assert _acked(store, moved(raw), 2)
        finally:
            session.close()


def test_get_bind_with_a_clause_and_no_instance_pins_nothing(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """get_bind(mapper, clause=stmt) passes the new guard (a clause is given) and reaches the
    shard chooser, whose refusal message reads self._routing: a pin outside a transaction."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        session = RoutedSession(router)
        try:
            with pytest.raises(RoutingError):
                session.get_bind(Note.__mapper__, clause=select(Note))
            assert not session.in_transaction()
            assert router._snap.users == 0, "get_bind(mapper, clause=...) left a pin"
        finally:
            session.close()


# -- binds after a version switch ----------------------------------------------------------------


def _with_s4(raw: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    """A version adding shard s4 (its own file, with notes), slots [0, 10) moved there."""
    sql(tmp_path / "s4.db", "CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)")
    doc = copy.deepcopy(raw)
    doc["shards"]["s0"]["slots"] = [[10, 256]]
    doc["shards"]["s4"] = {"primary": f"sqlite:///{tmp_path}/s4.db", "slots": [[0, 10]]}
    return doc


def test_get_bind_outside_a_transaction_after_a_version_adds_a_shard(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """Outside a transaction get_bind chooses the token by the router's current routing
    (_look) but returns horizontal_shard's bind for it, which is still the routing of the
    session's last pin: a token of a new shard is a bare KeyError."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        session = RoutedSession(router)
        try:
            session.get(Note, user)  # a transaction under version 1 ...
            session.commit()  # ... ended: the binds stay version 1's
            _push(store, _with_s4(raw, tmp_path), 2)
            assert session.placement("s4").shard == "s4"  # the question sees version 2
            engine = session.get_bind(Note.__mapper__, instance=Note(user_id=user, body="x"))
            assert engine is router.engines.primary("s4")
            assert session.get_bind(shard_id="s4") is router.engines.primary("s4")
        finally:
            session.close()


def test_get_bind_outside_a_transaction_after_a_primary_is_re_pointed(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """Same cause: s1's primary re-pointed by version 2; get_bind(instance=obj) outside a
    transaction returns version 1's engine of s1 (the old database)."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 256, 512)
        sql(tmp_path / "s1b.db", "CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)")
        session = RoutedSession(router)
        try:
            session.get(Note, user)
            session.commit()
            doc = copy.deepcopy(raw)
            doc["shards"]["s1"]["primary"] = f"sqlite:///{tmp_path}/s1b.db"
            _push(store, doc, 2)
            engine = session.get_bind(Note.__mapper__, instance=Note(user_id=user, body="x"))
            assert str(engine.url).endswith("s1b.db"), f"the old primary: {engine.url}"
        finally:
            session.close()


# -- refreshes of objects of an older version ----------------------------------------------------


_DIARY_DDL = "CREATE TABLE diary (entry_id BIGINT PRIMARY KEY, user_id BIGINT, body TEXT)"


def test_a_refresh_of_a_moved_object_keyed_by_its_own_id_is_not_read_from_the_old_shard(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """_check_loaded finds the slot from the identity key, else from the sharding attribute
    in state.dict; an object whose primary key is an id of its own (not a sharding column)
    and whose attributes were expired by the commit has neither, so the check passes and
    the refresh reads the old placement: s0's stale row, after the slot moved to s1."""
    raw, store = cluster
    doc = copy.deepcopy(raw)
    _with_table(doc, "diary", _DIARY_DDL)
    _push(store, doc, 2)
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        router.execute(
            "INSERT INTO diary (entry_id, user_id, body) VALUES (1, :u, 'v1')", {"u": user}
        )
        session = RoutedSession(router)  # expire_on_commit
        try:
            entry = session.get(_Diary, 1)
            assert entry is not None and entry.body == "v1"
            session.commit()
            sql(tmp_path / "s1.db", "INSERT INTO diary VALUES (1, :u, 'on s1')", {"u": user})
            _push(store, moved(doc), 3)
            try:
                body = entry.body
            except FencedError:
                return  # refused: as for an object keyed by its sharding column
            assert body == "on s1", "the refresh read the old placement (s0's stale row)"
        finally:
            session.close()


def test_merge_of_a_detached_object_of_an_older_version_does_not_read_the_old_shard(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """session.merge(obj) of an object detached under version 1 loads by its identity key,
    token included (session.get(..., identity_token='s0')): the old placement is read and
    the merged object carries s0's stale values under version 2."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": user})
        with RoutedSession(router, expire_on_commit=False) as first:
            note = first.get(Note, user, options=[defer(Note.body)])
            assert note is not None and "body" not in note.__dict__
            first.expunge(note)  # detached with its key (token s0), body not loaded
        sql(tmp_path / "s1.db", "INSERT INTO notes VALUES (:u, 'on s1')", {"u": user})
        _push(store, moved(raw), 2)
        with RoutedSession(router) as session:
            try:
                merged = session.merge(note)
                body = merged.body
            except FencedError:
                return
            assert body == "on s1", "merge read the old placement (s0's stale row)"


# -- guards: attacks that held -------------------------------------------------------------------


def test_refresh_and_relationship_loads_of_unmoved_objects_are_not_refused(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """After a version that moves other slots, objects loaded under version 1 (expired by the
    commit) refresh, refresh explicitly, and load their relationships lazily, by selectinload
    and joinedload, with no false refusal; an explicit refresh of a moved one is refused."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 10, 256)  # stays on s0
        mover = user_in_slots(router, 0, 10)
        gen = router.topology.id_generator("orders", worker_id=1)
        order_id = gen.next_id(user_id=user)
        split = router.route_key(user_id=user)[1] % 4
        for stmt in (
            f"CREATE TABLE orders_000{split} (order_id BIGINT PRIMARY KEY, user_id BIGINT)",
            f"CREATE TABLE order_items_000{split} (order_id BIGINT, line INT, user_id BIGINT,"
            " PRIMARY KEY (order_id, line))",
        ):
            sql(tmp_path / "s0.db", stmt)
        sql(tmp_path / "s0.db", f"INSERT INTO orders_000{split} VALUES ({order_id}, {user})")
        sql(
            tmp_path / "s0.db",
            f"INSERT INTO order_items_000{split} VALUES ({order_id}, 1, {user})",
        )
        for u in (user, mover):
            router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'v1')", {"u": u})
        session = RoutedSession(router)
        try:
            note, gone = session.get(Note, user), session.get(Note, mover)
            order = session.get(Order, order_id)
            assert note is not None and gone is not None and order is not None
            session.commit()
            _push(store, moved(raw), 2)
            assert note.body == "v1"
            session.refresh(note)
            assert [i.line for i in order.items] == [1]
            session.commit()
            third = moved(raw)
            third["tables"]["x3"] = {"column": "user_id", "strategy": "hash"}
            _push(store, third, 3)
            again = session.scalars(
                select(Order).where(Order.user_id == user).options(selectinload(Order.items))
            ).one()
            assert again is order and [i.line for i in again.items] == [1]
            with pytest.raises(FencedError):
                session.refresh(gone)
            session.rollback()
        finally:
            session.close()
        assert router._snap.users == 0


def test_a_transaction_keeps_its_version_through_a_switch_and_releases_it_at_the_end(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """A transaction begun under version 1 reads a mover user's row from s0 after version 2
    is installed (one version per transaction); its end lets the router acknowledge."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'on s0')", {"u": user})
        sql(tmp_path / "s1.db", "INSERT INTO notes VALUES (:u, 'on s1')", {"u": user})
        session = RoutedSession(router)
        try:
            assert session.scalars(select(Note.body).where(Note.user_id == 7)).all() is not None
            store.push(moved(raw), expected=1, comment="v2")
            wait_until(lambda: router.version == 2)
            assert session.scalars(select(Note.body).where(Note.user_id == user)).one() == ("on s0")
            assert session.get(Note, user).body == "on s0"  # type: ignore[union-attr]
            assert session.placement("s0").shard == "s0"
            assert session._snap.version == 1
            assert not wait_for_acks(store, 2, timeout=0.3).complete
            session.commit()
            assert wait_for_acks(store, 2, timeout=5).complete
            session.expunge_all()
            assert session.get(Note, user).body == "on s1"  # type: ignore[union-attr]
        finally:
            session.close()


def test_scoped_session_remove_and_legitimate_connections_release_the_pin(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        scoped = scoped_session(routed_sessionmaker(router))
        scoped.add(Note(user_id=3, body="x"))
        scoped.commit()
        assert scoped.get(Note, 3) is not None
        assert router._snap.users == 1
        scoped.remove()
        assert router._snap.users == 0
        with RoutedSession(router) as session:
            engine = router.engines.primary("s2")
            conn = session.connection(bind_arguments={"bind": engine})
            assert conn.execute(text("SELECT 1")).scalar() == 1
            obj = Note(user_id=3, body="y")
            conn = session.connection(bind_arguments={"mapper": Note.__mapper__, "instance": obj})
            assert conn.engine is session.get_bind(Note.__mapper__, instance=obj)
            session.rollback()
            assert router._snap.users == 0
        assert _acked(store, moved(raw), 2)


def test_a_meta_url_spelled_relative_to_the_routers_directory_is_its_store(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router (working directory tmp_path) follows sqlite:///<tmp_path>/meta.db; a version
    naming sqlite:///meta.db names the same file in this process, yet database_identity does
    not resolve relative paths, so the follower rejects it as another store."""
    raw, store = cluster
    monkeypatch.chdir(tmp_path)
    with Router.from_config(config_from_dict(raw)) as router:
        doc = copy.deepcopy(raw)
        doc["meta"]["url"] = "sqlite:///meta.db"
        doc["tables"]["x2"] = {"column": "user_id", "strategy": "hash"}
        store.push(doc, expected=1, comment="relative meta url")
        wait_until(lambda: router.version == 2 or 2 in router._follower.rejected)
        assert router.version == 2, router._follower.rejected.get(2)


def test_meta_urls_of_one_server_in_other_spellings_are_accepted(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """sqlite+pysqlite:// and a non-normalised path name the router's store: accepted."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        for version, url in (
            (2, f"sqlite+pysqlite:///{tmp_path}/meta.db"),
            (3, f"sqlite:///{tmp_path}/./x/../meta.db?timeout=30"),
        ):
            doc = copy.deepcopy(raw)
            doc["meta"]["url"] = url
            doc["tables"][f"x{version}"] = {"column": "user_id", "strategy": "hash"}
            _push(store, doc, version)
        assert router.version == 3 and not router._follower.rejected


# -- relationship loads --------------------------------------------------------------------------


def _order_on_s0_and_s1(router: Router, tmp_path: Path, user: int) -> int:
    """An order of ``user`` with item 1 on s0 and s1 (copied), item 2 on s1 only."""
    slot = router.route_key(user_id=user)[1]
    order_id = router.topology.id_generator("orders", worker_id=1).next_id(user_id=user)
    split = slot % 4
    for shard in ("s0", "s1"):
        path = tmp_path / f"{shard}.db"
        sql(path, f"CREATE TABLE orders_000{split} (order_id BIGINT PRIMARY KEY, user_id BIGINT)")
        sql(
            path,
            f"CREATE TABLE order_items_000{split} (order_id BIGINT, line INT, user_id BIGINT,"
            " PRIMARY KEY (order_id, line))",
        )
        sql(path, f"INSERT INTO orders_000{split} VALUES ({order_id}, {user})")
        sql(path, f"INSERT INTO order_items_000{split} VALUES ({order_id}, 1, {user})")
    sql(tmp_path / "s1.db", f"INSERT INTO order_items_000{split} VALUES ({order_id}, 2, {user})")
    return order_id


def test_a_lazy_load_from_a_parent_loaded_with_set_shard_id_reads_the_new_placement(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """set_shard_id(token) propagates to the loaded objects' lazy loads (SQLAlchemy's
    default, propagate_to_loaders=True): after the parent's slot moved, order.items is an
    explicit-token load of the OLD placement, which skips both the key routing and the
    _check_loaded of _parent_tokens: s0's stale list."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        order_id = _order_on_s0_and_s1(router, tmp_path, user)
        session = RoutedSession(router, expire_on_commit=False)
        try:
            token = session.placement(f"s0/{router.route_key(user_id=user)[1] % 4}").token
            order = session.scalars(
                select(Order).where(Order.order_id == order_id).options(set_shard_id(token))
            ).one()
            session.commit()
            _push(store, moved(raw), 2)
            try:
                lines = sorted(i.line for i in order.items)
            except FencedError:
                return
            assert lines == [1, 2], "the lazy load read the old placement (s0's stale items)"
        finally:
            session.close()


def test_selectin_and_joined_loads_after_a_move_read_the_new_placement(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        user = user_in_slots(router, 0, 10)
        order_id = _order_on_s0_and_s1(router, tmp_path, user)
        session = RoutedSession(router, expire_on_commit=False)
        try:
            old = session.get(Order, order_id)
            assert old is not None
            session.commit()
            _push(store, moved(raw), 2)
            for option in (selectinload(Order.items), joinedload(Order.items)):
                fresh = (
                    session.scalars(select(Order).where(Order.user_id == user).options(option))
                    .unique()
                    .one()
                )
                assert fresh is not old and sorted(i.line for i in fresh.items) == [1, 2]
                session.rollback()
        finally:
            session.close()
