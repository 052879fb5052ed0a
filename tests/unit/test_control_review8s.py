"""Review 8s of commit 5f912ef (the ORM parts): the registry scan of _Routing._listen, the
marker _holding(snap, shard) of value-less loads, _sharding_value's refresh in before_flush,
get_bind's _look; attacked for cost, thread safety, classes defined after the scan, lost
changes, stale placements and false refusals. SQLite cluster of control_cluster (no MariaDB).

Findings (these tests failed on 5f912ef; all fixed: the listener is registered on the root of
each hierarchy, propagated, before the class is published; selects map their entities'
subclasses; a tokenless key remembers nothing; _holding merges adjacent ranges; a sharding
value that cannot be read from the object's placement is refused typed):

- a subclass defined after the scan and loaded through its base's query gets no listener (not
  propagated any more, and nothing maps it with listen=True before its rows load): it remembers
  nothing, and after its slot moves an expired attribute is refreshed from the old placement;
- such an object (no marker) loaded without its sharding value, after a move, reaches
  _sharding_value's refresh on the stale token: sqlalchemy InvalidRequestError ("Could not
  refresh instance") from the flush, untyped, instead of FencedError;
- a tokenless object (make_transient_to_detached) partially refreshed stores the marker None
  and is refused with FencedError with no version change;
- _holding compares slot ranges as written: a version that respells s0's ranges (diff's safe
  SLOT_RANGES_REWRITTEN) refuses every value-less object of s0;
- _mapped publishes a class before _listen registered its listener: a concurrent session
  loads its objects without it (shown with a widened window; not reproduced unpatched in 10
  trials with 300 unrouted classes).

Each test builds its models in a fresh registry (_models()): listeners are process-wide, so a
class another test mapped would hide what a fresh process does.
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
import sqlalchemy
from control_cluster import document, user_in_slots
from control_orm import moved, sql
from sqlalchemy import BigInteger, Column, MetaData, String, Table, create_engine, inspect, select
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    load_only,
    make_transient_to_detached,
    mapped_column,
)

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError, ShardRouterError
from shardrouter.orm import session as session_module
from shardrouter.orm.session import RoutedSession, _remember_slot, _remembered_value, _routing_for

pytestmark = pytest.mark.timeout(120)

_PLAIN = MetaData()
Table(
    "docs",
    _PLAIN,
    Column("doc_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger),
    Column("body", String(64)),
    Column("kind", String(16)),
)


def _models(unrouted: int = 0) -> dict[str, Any]:
    """A fresh registry: Doc (docs, keyed by its own id, polymorphic on kind) and ``unrouted``
    classes of tables the topology does not know."""

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "docs"
        doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        body: Mapped[str | None] = mapped_column(String(64))
        kind: Mapped[str] = mapped_column(String(16), default="doc")
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "kind",
            "polymorphic_identity": "doc",
        }

    out: dict[str, Any] = {"Base": Base, "Doc": Doc}
    for i in range(unrouted):
        out[f"U{i}"] = type(
            f"U{i}",
            (Base,),
            {
                "__tablename__": f"unrouted_{i}",
                "__annotations__": {"id": Mapped[int]},
                "id": mapped_column(BigInteger, primary_key=True),
            },
        )
    return out


def _raw(directory: Path) -> dict[str, Any]:
    raw = document(directory)
    raw["tables"]["docs"] = {"column": "user_id", "strategy": "hash"}
    return raw


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Router, MetaStore, dict[str, Any]]]:
    raw = _raw(tmp_path)
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    router = Router.from_config(config_from_dict(raw))
    for engine in router.engines.primaries.values():
        _PLAIN.create_all(engine)
    try:
        yield router, store, raw
    finally:
        router.close()
        store.close()


def _acked(store: MetaStore, doc: dict[str, Any], version: int) -> bool:
    store.push(doc, expected=version - 1, comment=f"v{version}")
    return wait_for_acks(store, version, timeout=3).complete


def _moved_back(raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` after a move of slots [256, 266) from s1 to s0."""
    doc = copy.deepcopy(raw)
    doc["shards"]["s0"]["slots"] = [[0, 266]]
    doc["shards"]["s1"]["slots"] = [[266, 512]]
    return doc


def _doc(router: Router, user: int, doc_id: int = 1, body: str = "v1", kind: str = "doc") -> None:
    router.execute(
        "INSERT INTO docs (doc_id, user_id, body, kind) VALUES (:d, :u, :b, :k)",
        {"d": doc_id, "u": user, "b": body, "k": kind},
    )


def _body(router: Router, doc_id: int = 1) -> Any:
    rows = router.execute("SELECT body FROM docs WHERE doc_id = :d", {"d": doc_id}).rows
    return rows[0][0] if rows else None


def _listeners(cls: type) -> int:
    return sum(fn is _remember_slot for fn in inspect(cls).class_manager.dispatch.load)


# -- findings --------------------------------------------------------------------------------


def test_a_subclass_defined_after_the_scan_remembers_its_sharding_value(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """The scan registers _remember_slot per class, not propagated, on the classes the
    registry has when a routing first maps one of them; a subclass defined later (a plugin
    module imported after the first query) gets it only if something maps it with
    listen=True. Loaded through its base's query (select(Doc) returns Late rows), nothing does:
    ctx.all_mappers is [Doc], cached already. Its objects remember nothing, and after their
    slot moves the refresh of an expired attribute passes _check_loaded (no slot known) and
    reads the old placement (8q's finding, back for late subclasses: 78f01f6 registered with
    propagate=True, which covered them). Fix: register with propagate=True again and keep the
    per-class check on the dispatch (it lists propagated listeners), or map
    mapper.self_and_descendants of each statement's mappers in _on_execute (cheap once
    cached), or listen to the registry's "mapper_configured"/instrument_class event."""
    router, store, raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 256, 266)  # on s1; _moved_back moves it to s0
    _doc(router, user, 1, "v1", "late")
    _doc(router, user_in_slots(router, 0, 256), 2, "other", "doc")
    with RoutedSession(router) as first:  # the scan: Doc gets its listener
        assert first.get(doc_cls, 2) is not None
    assert _listeners(doc_cls) == 1

    class Late(doc_cls):  # type: ignore[misc, valid-type]
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "late"}

    session = RoutedSession(router)
    try:
        late = session.scalars(select(doc_cls).where(doc_cls.user_id == user)).one()
        assert type(late) is Late
        remembered = _remembered_value(inspect(late))
        session.commit()
        sql(  # the copy the move made on s0, changed there since
            tmp_path / "s0.db",
            "INSERT INTO docs (doc_id, user_id, body, kind) VALUES (1, :u, 'on s0', 'late')",
            {"u": user},
        )
        assert _acked(store, _moved_back(raw), 2)
        try:
            body = str(late.body)
        except FencedError:
            body = "refused"
        session.rollback()
    finally:
        session.close()
    assert (remembered, body) == (user, "on s0") or body == "refused", (
        f"late subclass: remembered {remembered!r}, its refresh read {body!r} (s1, the old"
        f" placement); listeners on Late: {_listeners(Late)}"
    )


def test_a_value_less_object_without_a_marker_is_refused_typed_after_a_move(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """An object of a late subclass (no listener, see above) loaded without its sharding
    value carries no _SLOT_INFO: after its slot moved (row gone from the old placement), its
    UPDATE reaches _sharding_value, whose refresh runs on the stale identity token (nothing
    checks it: _loaded_slot returns None when nothing was remembered) and fails with
    sqlalchemy's ObjectDeletedError from the flush, untyped, instead of the FencedError a
    remembered object gets. Fix: in _sharding_value (and _check_loaded), refuse typed when
    the object has a placement token but no marker of the session's holding (only objects of
    the session's own transaction, or with a remembered value, may be refreshed by token);
    and the listener fix above."""
    router, store, raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 10)  # on s0; moved() moves it to s1
    _doc(router, user, 1, "v1", "late")
    _doc(router, user_in_slots(router, 10, 256), 2, "other", "doc")
    with RoutedSession(router) as first:
        assert first.get(doc_cls, 2) is not None

    class Late2(doc_cls):  # type: ignore[misc, valid-type]
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "late"}

    session = RoutedSession(router, expire_on_commit=False)
    try:
        late = session.scalars(
            select(doc_cls).where(doc_cls.doc_id == 1).options(load_only(doc_cls.body))
        ).one()
        assert type(late) is Late2 and "user_id" not in inspect(late).dict
        session.commit()
        assert _acked(store, moved(raw), 2)
        sql(tmp_path / "s1.db", "INSERT INTO docs VALUES (1, :u, 'v1', 'late')", {"u": user})
        sql(tmp_path / "s0.db", "DELETE FROM docs WHERE doc_id = 1")
        late.body = "changed"
        try:
            session.commit()
            outcome = "written"
        except ShardRouterError as exc:
            outcome = type(exc).__name__
        except Exception as exc:
            outcome = f"untyped {type(exc).__name__}: {exc}"
        session.rollback()
    finally:
        session.close()
    assert outcome.startswith(("FencedError", "written")), outcome
    if outcome == "written":
        assert _body(router) == "changed"


def test_a_tokenless_object_after_a_partial_refresh_can_be_updated(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """No version change. An object whose identity key has no token
    (make_transient_to_detached, as 8q's guard, the sharding value not set) is partially
    refreshed (session.refresh(obj, ["body"])): the "refresh" listener stores (key, None,
    None), the marker None because the key's token names no placement. Its UPDATE is then
    refused: _loaded_slot finds the value None and the placement None and raises FencedError
    ("whose slots have changed since") though nothing changed. Without the partial refresh the
    same UPDATE passes (_sharding_value loads the value). Fix: in _remember_slot, store
    nothing for a value-less load of a tokenless key (the object is routed by key as a new one:
    _loaded_slot should return None and let _sharding_value load the value); or in
    _loaded_slot, treat a token None like "nothing remembered"."""
    router, _store, _raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 256)
    _doc(router, user)
    cached = doc_cls(doc_id=1, body="v1", kind="doc")
    make_transient_to_detached(cached)
    with RoutedSession(router) as session:
        session.add(cached)
        session.refresh(cached, ["body"])
        cached.body = "changed"
        try:
            session.commit()
        except FencedError as exc:
            pytest.fail(f"refused with no version change: {exc}")
    assert _body(router) == "changed"


def test_a_version_that_respells_the_shards_slot_ranges_refuses_nothing(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """_holding compares the shard's ranges as written (Topology sorts them, does not merge
    them): a version writing s0's [0, 256) as [0, 128), [128, 256), which control/diff.py
    classifies as SLOT_RANGES_REWRITTEN ("the same slots, written differently", safe), makes
    every object loaded from s0 without its sharding value refused (FencedError "whose slots
    have changed since"). Fix: compare normalised ranges in _holding (merge adjacent ones, as
    diff._norm does; or a frozenset of slot numbers, or the owner array restricted to the
    shard)."""
    router, store, raw = app
    m = _models()
    doc_cls = m["Doc"]
    _doc(router, user_in_slots(router, 0, 256))
    session = RoutedSession(router, expire_on_commit=False)
    try:
        doc = session.get(doc_cls, 1, options=[load_only(doc_cls.body)])
        assert doc is not None and "user_id" not in inspect(doc).dict
        session.commit()
        respelled = copy.deepcopy(raw)
        respelled["shards"]["s0"]["slots"] = [[0, 128], [128, 256]]
        assert _acked(store, respelled, 2)
        doc.body = "changed"
        try:
            session.commit()
        except FencedError as exc:
            pytest.fail(f"refused after a version that only respelled s0's slots: {exc}")
    finally:
        session.close()
    assert _body(router) == "changed"


def test_a_class_is_not_published_before_its_listener_is_registered(
    app: tuple[Router, MetaStore, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """_Routing.mapped stores the class in _mapped, then _listen scans the registry (every
    class: mapped(listen=False), a raised UnknownTableError for each unrouted one) and
    registers the listener. A second thread querying the class in that window finds it cached
    and loads its objects before the listener exists: they remember nothing (the 8q finding
    for them, once the slot moves). The window is widened here by a slow event.listen (the
    scan of a large registry does the same). Fix: register the listeners first, then publish
    into _mapped (the scan caches with listen=False, so publish those after the registration
    too), so that a cached class always has its listener."""
    router, _store, _raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 256)
    _doc(router, user)
    loaded = threading.Event()
    real_listen = sqlalchemy.event.listen

    def slow_listen(target: Any, name: str, fn: Any, *args: Any, **kw: Any) -> None:
        if fn is _remember_slot and target is mapper:
            loaded.wait(5)
        real_listen(target, name, fn, *args, **kw)

    mapper = inspect(doc_cls)
    monkeypatch.setattr(session_module.event, "listen", slow_listen)
    routing = _routing_for(router._snap)
    errors: list[BaseException] = []

    def first() -> None:
        try:
            with RoutedSession(router) as s:
                s.get(doc_cls, 1)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    try:
        # Fixed: while the first mapping registers the listener (stalled here), the class is
        # not published; it is once the listener exists.
        time.sleep(0.3)
        assert mapper not in routing._mapped
    finally:
        loaded.set()
        worker.join(10)
    assert mapper in routing._mapped
    with RoutedSession(router) as session:
        obj = session.get(doc_cls, 1)
        assert obj is not None
        remembered = _remembered_value(inspect(obj))
    assert not errors
    assert _listeners(doc_cls) == 1
    assert remembered == user, "loaded while its class was cached but not yet listened to"


# -- guards: attacks that held -----------------------------------------------------------------


def test_concurrent_first_mappings_register_each_listener_once(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """Eight threads whose sessions map classes of one fresh registry at once (every one a
    scan): each class ends with one listener, and every thread's objects remember their
    value."""
    router, _store, _raw = app
    m = _models()
    base = m["Doc"]
    subs = [
        type(f"K{i}", (base,), {"__mapper_args__": {"polymorphic_identity": f"k{i}"}})
        for i in range(8)
    ]
    user = user_in_slots(router, 0, 256)
    for i in range(8):
        _doc(router, user, i + 1, "v", f"k{i}")
    start = threading.Barrier(8)
    seen: list[Any] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with RoutedSession(router) as s:
                start.wait(5)
                obj = s.get(subs[i], i + 1)
                seen.append(_remembered_value(inspect(obj)))
        except BaseException as exc:  # pragma: no cover
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not errors
    assert [_listeners(c) for c in (base, *subs)] == [1] * 9
    assert seen == [user] * 8


def test_the_scan_runs_once_per_version_and_costs_milliseconds(
    app: tuple[Router, MetaStore, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry of 300 unrouted classes and Doc: the first routed query of a version scans
    the registry once (300 UnknownTableErrors raised and caught), the later queries of that
    version none; the first query costs a few milliseconds more than the next ones (numbers:
    see the report)."""
    router, store, raw = app
    m = _models(unrouted=300)
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 256)
    _doc(router, user)
    calls = {"unknown": 0}
    real_table = Topology.table

    def counting(self: Topology, name: str) -> Any:
        try:
            return real_table(self, name)
        except ShardRouterError:
            calls["unknown"] += 1
            raise

    monkeypatch.setattr(Topology, "table", counting)

    def timed() -> float:
        with RoutedSession(router) as s:
            t = time.perf_counter()
            assert s.get(doc_cls, 1) is not None
            return time.perf_counter() - t

    first = timed()
    after_first = calls["unknown"]
    later = min(timed() for _ in range(20))
    after_later = calls["unknown"]
    doc = copy.deepcopy(raw)
    doc["tables"]["extra"] = {"column": "user_id", "strategy": "hash"}
    assert _acked(store, doc, 2)
    second_version = timed()
    after_v2 = calls["unknown"]
    print(
        f"\nfirst {first * 1e3:.2f} ms, later {later * 1e3:.2f} ms, first of v2"
        f" {second_version * 1e3:.2f} ms; UnknownTableError: {after_first} (v1 scan),"
        f" {after_later - after_first} (20 queries), {after_v2 - after_later} (v2 scan)"
    )
    assert after_first == 300
    assert after_later == after_first
    assert after_v2 - after_later == 300
    assert second_version < 1.0


@pytest.mark.parametrize("change", ["table added", "s0 pool", "s0 replica", "s2/s3 move"])
def test_versions_that_leave_s0s_slots_alone_refuse_no_value_less_object(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path, change: str
) -> None:
    """_holding equality across versions that change other things: a table added, s0's pool
    settings, a replica of s0, slots moved between s2 and s3: a value-less object of s0 is
    written."""
    router, store, raw = app
    m = _models()
    doc_cls = m["Doc"]
    _doc(router, user_in_slots(router, 0, 256))
    doc = copy.deepcopy(raw)
    if change == "table added":
        doc["tables"]["extra"] = {"column": "user_id", "strategy": "hash"}
    elif change == "s0 pool":
        doc["shards"]["s0"]["pool"] = {"size": 7, "recycle_s": 60}
    elif change == "s0 replica":
        doc["shards"]["s0"]["replicas"] = [doc["shards"]["s0"]["primary"]]
    else:
        doc["shards"]["s2"]["slots"] = [[512, 700]]
        doc["shards"]["s3"]["slots"] = [[700, 1024]]
    session = RoutedSession(router, expire_on_commit=False)
    try:
        obj = session.get(doc_cls, 1, options=[load_only(doc_cls.body)])
        assert obj is not None and "user_id" not in inspect(obj).dict
        session.commit()
        assert _acked(store, doc, 2), change
        obj.body = "changed"
        session.commit()
    finally:
        session.close()
    assert _body(router) == "changed"


def test_the_flush_refresh_keeps_pending_changes_and_unloaded_columns(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """_sharding_value's session.refresh(obj, [user_id]) inside before_flush: the object's
    pending changes (body, kind set on an unloaded column) are written, a second object's
    too; no version change, nothing pinned afterwards, no extra flush."""
    router, _store, _raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 256)
    _doc(router, user, 1)
    _doc(router, user, 2)
    flushes = []
    with RoutedSession(router) as session:
        sqlalchemy.event.listen(session, "after_flush", lambda *a: flushes.append(1))
        a = session.get(doc_cls, 1, options=[load_only(doc_cls.body)])
        b = session.get(doc_cls, 2, options=[load_only(doc_cls.doc_id)])
        assert a is not None and b is not None
        a.body = "a"
        b.body = "b"  # an unloaded column set, never read
        session.commit()
        assert _remembered_value(inspect(a)) == user
    assert router.execute("SELECT doc_id, body FROM docs ORDER BY doc_id").rows == [
        (1, "a"),
        (2, "b"),
    ]
    assert len(flushes) == 1
    assert router._snap.users == 0


def test_a_plain_sessions_object_merged_without_load_is_written(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """merge(load=False) of a plain Session's object loaded without its sharding column: no
    marker, _sharding_value loads it by key (token None), the UPDATE passes; no version."""
    router, _store, _raw = app
    m = _models()
    doc_cls = m["Doc"]
    user = user_in_slots(router, 0, 256)
    _doc(router, user)
    engine = create_engine(f"sqlite:///{tmp_path}/s0.db")
    with Session(engine, expire_on_commit=False) as plain:
        cached = plain.get(doc_cls, 1, options=[load_only(doc_cls.body)])
        assert cached is not None and "user_id" not in inspect(cached).dict
    engine.dispose()
    with RoutedSession(router) as session:
        obj = session.merge(cached, load=False)
        obj.body = "changed"
        session.commit()
    assert _body(router) == "changed"
