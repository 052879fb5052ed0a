"""Review 8q of commit af2b04a (on 777b988, bbcecc0): the routed ORM session's slot listener,
the stripping of an inherited set_shard_id, the commit's flush-until-clean loop and the
pending_to_persistent record, attacked on the SQLite cluster of control_cluster (no MariaDB).

Findings (these tests failed on af2b04a; all fixed: the listener maps the class itself and
propagates to subclasses, every select maps its entities first, the sharding value (not its
slot) is remembered with the identity key and version, an object loaded without it under
another version is refused; a commit still changing after 100 flushes is refused typed; an
identity key without a token is routed by its key):

- objects whose key does not route get no remembered slot when loaded by a query in a routing
  whose _mapped does not hold their mapper yet (the listener only reads routing._mapped), when
  loaded with load_only()/defer() of the sharding column, or as a single-table-inheritance
  subclass loaded through its base (listener and _mapped entry on the base mapper only): after
  their slot moves, the refresh of their expired attributes reads the old placement;
- the commit's flush loop stops at 100 flushes and fences anyway: flushes 101.. (a hook that
  keeps dirtying) run after the fence and the lookup verify, or the fence runs on a dirty
  session before SQLAlchemy's FlushError;
- a detached object whose identity key has no token (merge(load=False) of a plain Session's
  object, make_transient_to_detached) is refused at UPDATE with a false FencedError
  ("loaded from placement None"), no version change (predates af2b04a);
- the remembered slot is a number of the loading router's topology: added to a session of a
  router with another topology (same mapper, same shard names), it is used as that router's
  slot (a false FencedError here; a wrong slot fenced where the numbers happen to fit).

The other tests are guards of attacks that held.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from control_cluster import document, user_in_slots
from control_orm import moved, sql
from sqlalchemy import (
    BigInteger,
    Column,
    Integer,
    MetaData,
    String,
    Table,
    event,
    inspect,
    literal,
    select,
)
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    foreign,
    mapped_column,
    relationship,
)

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, FencedError
from shardrouter.orm.session import RoutedSession, _remembered_value

pytestmark = pytest.mark.timeout(120)


class Base(DeclarativeBase):
    pass


class Entry(Base):
    """Sharded by user_id, keyed by an id of its own (its key does not route)."""

    __tablename__ = "diary"
    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str | None] = mapped_column(String(64))
    kind: Mapped[str | None] = mapped_column(String(16))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "plain",
    }
    orders: Mapped[list[Order]] = relationship(
        primaryjoin=lambda: Entry.user_id == foreign(Order.user_id),
        viewonly=True,
        order_by=lambda: Order.order_id,
    )
    by_merchant: Mapped[list[Order]] = relationship(
        primaryjoin=lambda: Entry.entry_id == foreign(Order.merchant_id),
        viewonly=True,
        order_by=lambda: Order.order_id.desc(),
    )


class Special(Entry):
    """Single-table inheritance on diary."""

    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "special"}


class Order(Base):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    merchant_id: Mapped[int] = mapped_column(BigInteger)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
    items: Mapped[list[Item]] = relationship(
        primaryjoin=lambda: Order.order_id == foreign(Item.order_id),
        back_populates="order",
        cascade="all, delete-orphan",
        order_by=lambda: Item.line,
    )


class Item(Base):
    __tablename__ = "order_items"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    sku: Mapped[str] = mapped_column(String(32))
    order: Mapped[Order] = relationship(
        primaryjoin=lambda: Order.order_id == foreign(Item.order_id), back_populates="items"
    )


_LOOKUPS = MetaData()
Table(
    "merchant_orders",
    _LOOKUPS,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
)


def _tables(router: Router) -> None:
    md = MetaData()
    for logical in [*Base.metadata.tables.values(), *_LOOKUPS.tables.values()]:
        for physical in router.topology.table(logical.name).physical_names:
            logical.to_metadata(md, name=physical)
    for engine in router.engines.primaries.values():
        md.create_all(engine)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Router, MetaStore, dict[str, Any]]]:
    """The SQLite cluster with a ``diary`` table, a router following it."""
    raw = document(tmp_path)
    raw["tables"]["diary"] = {"column": "user_id", "strategy": "hash"}
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    router = Router.from_config(config_from_dict(raw))
    _tables(router)
    try:
        yield router, store, raw
    finally:
        router.close()
        store.close()


def _acked(store: MetaStore, doc: dict[str, Any], version: int) -> bool:
    store.push(doc, expected=version - 1, comment=f"v{version}")
    return wait_for_acks(store, version, timeout=3).complete


def _stale_refresh(
    router: Router, store: MetaStore, raw: dict[str, Any], tmp_path: Path, load: Any
) -> str:
    """Load entry 1 (user in slots [0, 10), on s0) with ``load(session, user)``, commit
    (expiring it), copy its row to s1 with another body, move slots [0, 10) to s1 and read
    the expired body: 'on s1', 'refused', or 'v1' (the old placement's stale row)."""
    user = user_in_slots(router, 0, 10)
    kind = "special" if load.__name__.endswith("special") else "plain"
    router.execute(
        "INSERT INTO diary (entry_id, user_id, body, kind) VALUES (1, :u, 'v1', :k)",
        {"u": user, "k": kind},
    )
    session = RoutedSession(router)  # expire_on_commit
    try:
        entry = load(session, user)
        assert entry is not None and entry.body == "v1"
        session.commit()
        sql(
            tmp_path / "s1.db",
            "INSERT INTO diary (entry_id, user_id, body, kind) VALUES (1, :u, 'on s1', :k)",
            {"u": user, "k": kind},
        )
        assert _acked(store, moved(raw), 2)
        try:
            body = str(entry.body)
        except FencedError:
            body = "refused"
        session.rollback()
        return body
    finally:
        session.close()


def by_query(session: RoutedSession, user: int) -> Any:
    return session.scalars(select(Entry).where(Entry.user_id == user)).one()


def by_get(session: RoutedSession, user: int) -> Any:
    return session.get(Entry, 1)


def by_get_load_only(session: RoutedSession, user: int) -> Any:
    from sqlalchemy.orm import load_only

    return session.get(Entry, 1, options=[load_only(Entry.body)])


def by_get_special(session: RoutedSession, user: int) -> Any:
    found = session.get(Entry, 1)
    assert type(found) is Special
    return found


def by_query_special(session: RoutedSession, user: int) -> Any:
    session.get(Entry, 999)  # mapped(Entry) is now cached in this routing
    found = session.scalars(select(Entry).where(Entry.user_id == user)).one()
    assert type(found) is Special
    return found


@pytest.mark.parametrize(
    "load", [by_get, by_query, by_get_load_only, by_get_special, by_query_special]
)
def test_objects_loaded_by_query_or_as_a_subclass_remember_their_slot(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path, load: Any
) -> None:
    """The load listener records a slot only when routing._mapped already holds the loaded
    object's own mapper and the sharding column was loaded. A query routes by the planner (it
    never calls _Routing.mapped), so the objects a query loads in a routing no get/flush has
    mapped their class in (a new router, each new topology version) get no slot; nor do
    objects loaded with load_only()/defer() of the sharding column; a polymorphic subclass (single-table inheritance) loaded through its base
    (session.get(Entry) or select(Entry)) has neither the listener (registered on the base
    mapper only, propagate=False) nor an entry in _mapped. After their slot moves, the
    refresh of their expired attributes passes _check_loaded (no slot known) and reads the
    old placement's stale row (the 8o finding, back for these load paths)."""
    router, store, raw = app
    body = _stale_refresh(router, store, raw, tmp_path, load)
    assert body in ("on s1", "refused"), f"the refresh read the old placement: {body!r}"


# -- the commit's flush-until-clean loop ---------------------------------------------------------


@pytest.mark.parametrize("rounds", [30, 150, None])
def test_the_commit_fence_runs_only_on_a_clean_session(
    app: tuple[Router, MetaStore, dict[str, Any]], rounds: int | None
) -> None:
    """_before_commit flushed at most 100 times, then fenced the commit and verified the
    lookup rows whether or not the session was clean; SQLAlchemy's commit then flushed up to
    100 more times. A hook that dirties an object for 150 flushes had its last 50 flushed
    AFTER the fence and the verify (the 8p finding, past the cap); one that never stops got
    the fence on a dirty session, then SQLAlchemy's FlushError ("Over 100 subsequent flushes",
    after 200). Now the fence sees a clean session or does not run: a typed refusal past the
    cap (ExecutionError), nothing committed; a hook that stops in time commits."""
    router, _store, _raw = app
    seen: list[bool] = []
    fence = router.resolver.before_commit
    session = RoutedSession(router)

    def recording_fence(*args: Any, **kw: Any) -> None:
        seen.append(not (session.new or session.dirty or session.deleted))
        fence(*args, **kw)

    router.resolver.before_commit = recording_fence  # type: ignore[method-assign]
    flushes = [0]

    @event.listens_for(session, "after_flush_postexec")
    def dirty(sess: Session, _ctx: Any) -> None:
        if rounds is None or flushes[0] < rounds:
            flushes[0] += 1
            found = sess.get(Entry, 1)
            assert found is not None
            found.body = f"b{flushes[0]}"

    try:
        session.add(Entry(entry_id=1, user_id=5, body="x", kind="plain"))
        try:
            session.commit()
        except ExecutionError as exc:  # the typed refusal past the cap: nothing committed
            assert "still changing after 100 flushes" in str(exc)
            session.rollback()
        else:
            assert rounds is not None and rounds < 100
        assert router._snap.users == 0
        assert all(seen), f"the commit fence ran with {flushes[0]} flushes, the session dirty"
    finally:
        session.close()


# -- objects that come from elsewhere ------------------------------------------------------------


@pytest.mark.parametrize(
    "how", ["merge(load=False) from a plain Session", "make_transient_to_detached"]
)
def test_a_detached_object_without_an_identity_token_can_be_updated(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path, how: str
) -> None:
    """An object whose identity key has no token (loaded by a plain Session of one shard's
    database, or built and made detached with make_transient_to_detached, the documented
    idioms for caches) is added to a routed session with merge(load=False) or add(). No version
    changed, yet its UPDATE is refused: _resolve compares the key's token None with its slot's
    placement ("loaded from placement None ... loaded under an older version"). Predates
    af2b04a (the check came with 4dcec70); horizontal_shard itself writes such an object to
    its chooser's placement."""
    from sqlalchemy import create_engine
    from sqlalchemy.orm import make_transient_to_detached

    router, _store, _raw = app
    user = user_in_slots(router, 0, 256)
    router.execute(
        "INSERT INTO diary (entry_id, user_id, body, kind) VALUES (1, :u, 'v1', 'plain')",
        {"u": user},
    )
    if how.startswith("merge"):
        engine = create_engine(f"sqlite:///{tmp_path}/s0.db")
        with Session(engine, expire_on_commit=False) as plain:
            cached = plain.get(Entry, 1)
            assert cached is not None and inspect(cached).key[2] is None  # type: ignore[index]
        engine.dispose()
    else:
        cached = Entry(entry_id=1, user_id=user, body="v1", kind="plain")
        make_transient_to_detached(cached)
    with RoutedSession(router) as session:
        obj = session.merge(cached, load=False) if how.startswith("merge") else cached
        if obj is cached:
            session.add(obj)
        obj.body = "changed"
        session.commit()
    assert router.execute("SELECT body FROM diary WHERE entry_id = 1").rows == [("changed",)]
    assert router._snap.users == 0


def test_a_slot_remembered_under_another_routers_topology_is_not_used(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """InstanceState.info keeps (identity key, slot); the slot is the LOADING router's, but
    the key's token means the same to any topology with a shard of that name. An object
    loaded by router A's session (1024 slots) and added to router B's (512 slots, another
    cluster in the same process; the mapper is shared) is checked and fenced by A's slot
    number under B's topology: a false FencedError (or, where the numbers happen to match
    the token, the write fences another slot than its own). Without the remembered slot, B
    would compute its own slot from user_id and accept it."""
    router, _store, _raw = app
    (tmp_path / "b").mkdir()
    other = document(tmp_path / "b")
    other["tables"]["diary"] = {"column": "user_id", "strategy": "hash"}
    other["slots"] = 512
    other["ids"]["gene_bits"] = 9
    other["ids"]["worker_bits"] = 9
    for i, shard in enumerate(other["shards"].values()):
        shard["slots"] = [[128 * i, 128 * (i + 1)]]
    store_b = MetaStore(other["meta"]["url"])
    store_b.init()
    store_b.push(other, expected=None, comment="v1")
    router_b = Router.from_config(config_from_dict(other))
    try:
        _tables(router_b)
        user = next(
            u
            for u in range(1, 100_000)
            if router.route_key(user_id=u)[0] == "s0"
            and router_b.route_key(user_id=u)[0] == "s0"
            and router_b.topology.shard_of_slot(router.route_key(user_id=u)[1] % 512) != "s0"
        )
        for r in (router, router_b):
            r.execute(
                "INSERT INTO diary (entry_id, user_id, body, kind) VALUES (1, :u, 'v1', 'plain')",
                {"u": user},
            )
        with RoutedSession(router, expire_on_commit=False) as first:
            entry = first.get(Entry, 1)
            assert entry is not None
            first.expunge(entry)
        with RoutedSession(router_b) as session:
            session.add(entry)
            entry.body = "b"
            session.commit()
        assert router_b.execute("SELECT body FROM diary WHERE entry_id = 1").rows == [("b",)]
    finally:
        router_b.close()
        store_b.close()


# -- guards: attacks that held -------------------------------------------------------------------


def _world(router: Router) -> dict[int, list[int]]:
    """Users 1..5: a diary entry (100 + user) each, three orders of three items each."""
    gen = router.topology.id_generator("orders", worker_id=1)
    oids: dict[int, list[int]] = {}
    with RoutedSession(router) as s:
        for u in range(1, 6):
            s.add(Entry(entry_id=100 + u, user_id=u, body="b", kind="plain"))
            for k in range(3):
                oid = gen.next_id(user_id=u)
                oids.setdefault(u, []).append(oid)
                order = Order(order_id=oid, user_id=u, merchant_id=1, amount_cents=k)
                order.items = [Item(line=i, user_id=u, sku=f"k{i}") for i in range(3)]
                s.add(order)
        s.commit()
    return oids


def test_set_shard_id_with_other_options_is_stripped_only_where_it_must_be(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """Inherited set_shard_id dropped from relationship loads with loader criteria, eager
    loads of bound children on the same placement, joined loads; a top-level set_shard_id on
    a wrong placement still honoured (nothing found there); the stripped statement shares the
    original's cache key (the compiled cache does not grow per load, other criteria are not
    served from it)."""
    from sqlalchemy.orm import joinedload, selectinload, with_loader_criteria

    router, _store, _raw = app
    oids = _world(router)
    shard, slot = router.route_key(user_id=3)
    token = f"{shard}/{slot % 4}"
    engine = router.engines.primaries[shard]
    with RoutedSession(router) as s:
        sizes = []
        for _ in range(4):
            entry = s.scalars(
                select(Entry)
                .where(Entry.user_id == 3)
                .options(set_shard_id(shard), with_loader_criteria(Order, Order.amount_cents > 1))
                .execution_options(populate_existing=True)
            ).one()
            assert [(o.amount_cents, [i.line for i in o.items]) for o in entry.orders] == [
                (2, [0, 1, 2])
            ]
            s.expunge_all()
            sizes.append(len(engine._compiled_cache or {}))
        assert sizes[1:] == sizes[:1] * 3, sizes
        entry = s.scalars(select(Entry).where(Entry.user_id == 3)).one()
        assert [o.amount_cents for o in entry.orders] == [0, 1, 2]
        s.expunge_all()
        orders = s.scalars(
            select(Order)
            .where(Order.user_id == 3)
            .options(
                set_shard_id(token),
                selectinload(Order.items),
                with_loader_criteria(Item, Item.line < 2),
            )
        ).all()
        assert sorted(o.order_id for o in orders) == sorted(oids[3])
        assert all([i.line for i in o.items] == [0, 1] for o in orders)
        assert {inspect(i).identity_token for o in orders for i in o.items} == {token}
        s.expunge_all()
        orders = (
            s.scalars(
                select(Order)
                .where(Order.user_id == 3)
                .options(set_shard_id(token), joinedload(Order.items))
            )
            .unique()
            .all()
        )
        assert all(len(o.items) == 3 and o.items[0].order is o for o in orders)
        s.expunge_all()
        wrong = f"{shard}/{(slot + 1) % 4}"
        assert (
            s.scalars(
                select(Order)
                .where(Order.user_id == 3)
                .options(set_shard_id(wrong), selectinload(Order.items))
            ).all()
            == []
        )
        other = "s1" if shard != "s1" else "s2"
        assert (
            s.scalars(select(Entry).where(Entry.user_id == 3).options(set_shard_id(other))).all()
            == []
        )
        assert s.scalar(select(literal(7))) == 7
    assert router._snap.users == 0


def test_merged_rolled_back_and_repopulated_objects_keep_a_true_slot(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """merge(load=True) of a plain Session's object records the slot; an insert rolled back
    (the key removed) then re-added for another user on the same and on another shard keeps
    no stale slot; populate_existing after the row's user_id changed (same shard) records the
    new one."""
    from sqlalchemy import create_engine

    router, _store, _raw = app
    a = user_in_slots(router, 0, 128)
    b = user_in_slots(router, 128, 256)  # same shard s0, another slot
    c = user_in_slots(router, 256, 512)  # s1
    router.execute(
        "INSERT INTO diary (entry_id, user_id, body, kind) VALUES (1, :u, 'v1', 'plain')",
        {"u": a},
    )
    engine = create_engine(f"sqlite:///{tmp_path}/s0.db")
    with Session(engine, expire_on_commit=False) as plain:
        cached = plain.get(Entry, 1)
    engine.dispose()
    with RoutedSession(router) as session:
        merged = session.merge(cached)
        assert _remembered_value(inspect(merged)) == a
        merged.body = "m"
        session.commit()
    for target in (b, c):
        with RoutedSession(router) as session:
            entry = Entry(entry_id=2, user_id=a, body="x", kind="plain")
            session.add(entry)
            session.flush()
            assert _remembered_value(inspect(entry)) == a
            session.rollback()
            assert _remembered_value(inspect(entry)) is None
            entry.user_id = target
            session.add(entry)
            session.commit()
            assert _remembered_value(inspect(entry)) == target
            entry.body = "y"
            session.commit()
            assert entry.body == "y"
            session.delete(entry)
            session.commit()
    with RoutedSession(router) as session:
        entry = session.get(Entry, 1)
        assert entry is not None and _remembered_value(inspect(entry)) == a
        session.commit()
        sql(tmp_path / "s0.db", "UPDATE diary SET user_id = :b WHERE entry_id = 1", {"b": b})
        session.scalars(
            select(Entry).where(Entry.entry_id == 1).execution_options(populate_existing=True)
        ).one()
        assert entry.user_id == b and _remembered_value(inspect(entry)) == b
        entry.body = "z"
        session.commit()
    assert router._snap.users == 0
