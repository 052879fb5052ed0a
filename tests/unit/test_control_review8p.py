"""Review 8p of commits 777b988 and bbcecc0: the routed ORM session's fixes (transaction-bound
pins, the global Mapper load listener that remembers slots, identity-load checks, the flush in
before_commit) attacked for regressions in ordinary use with no version change, and for pins
left behind.

Every test runs on the SQLite cluster of control_cluster (no MariaDB). Findings (these tests
failed on bbcecc0; all fixed: the slot is kept with its identity key and recorded at load,
refresh and insert by a per-mapper listener of the classes a routed session maps; an
inherited set_shard_id is dropped from relationship loads, which route by their own key; the
commit flushes until clean before its checks):

- a row copied with make_transient() to another user keeps the slot the load listener stored
  in InstanceState.info: its next UPDATE is refused with a false FencedError (no version change);
- a read-only class mapping a sharded table without its sharding column loaded by a query
  worked before bbcecc0; the load listener now raises RoutingError for every row;
- a query with set_shard_id(token) whose objects lazy- or selectin-load a relationship to a
  table not bound with theirs (order -> user, user -> orders) is refused with a FencedError
  that blames an older version (no version change; order -> user worked before bbcecc0);
- the global load listener runs shardrouter code for every object a plain, non-routed Session
  loads (and a wrap + inspect() per object on the routed read path);
- an object the session inserted (not loaded) whose key does not route has no remembered slot:
  after its slot moves, its refresh reads the old placement (the 8o fix covers loads only);
- before_commit flushes once: writes an after_flush hook adds are flushed by SQLAlchemy's own
  commit loop after the commit fence and the lookup verify ran.

The other tests are guards of attacks that held.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
    create_engine,
    delete,
    event,
    func,
    inspect,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    foreign,
    joinedload,
    make_transient,
    mapped_column,
    relationship,
    selectinload,
)

from shardrouter.control.registry import wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError, UnsupportedQueryError
from shardrouter.orm.session import RoutedSession, _remembered_value

pytestmark = pytest.mark.timeout(120)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))


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


class Country(Base):
    __tablename__ = "countries"  # broadcast
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


class Diary(Base):
    """Sharded by user_id, keyed by an id of its own (its key does not route)."""

    __tablename__ = "diary"
    entry_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    body: Mapped[str | None] = mapped_column(String(64))


class _Views(DeclarativeBase):
    pass


class OrderView(_Views):
    """A read-only projection of orders without its sharding column (user_id)."""

    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)


class _Views2(DeclarativeBase):
    pass


class UserV(_Views2):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    orders: Mapped[list[OrderV]] = relationship(
        primaryjoin=lambda: UserV.user_id == foreign(OrderV.user_id), viewonly=True
    )


class OrderV(_Views2):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    merchant_id: Mapped[int] = mapped_column(BigInteger)
    user: Mapped[UserV] = relationship(
        primaryjoin=lambda: UserV.user_id == foreign(OrderV.user_id), viewonly=True
    )


_LOOKUPS = MetaData()
Table(
    "merchant_orders",
    _LOOKUPS,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
)
Table(
    "user_emails",
    _LOOKUPS,
    Column("email", String(255), primary_key=True),
    Column("user_id", BigInteger, nullable=False),
)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Router, MetaStore, dict[str, Any]]]:
    """The SQLite cluster with a ``diary`` table and every model's physical tables, a router
    following it."""
    raw = document(tmp_path)
    raw["tables"]["diary"] = {"column": "user_id", "strategy": "hash"}
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    router = Router.from_config(config_from_dict(raw))
    md = MetaData()
    for logical in [*Base.metadata.tables.values(), *_LOOKUPS.tables.values()]:
        for physical in router.topology.table(logical.name).physical_names:
            logical.to_metadata(md, name=physical)
    for engine in router.engines.primaries.values():
        md.create_all(engine)
    try:
        yield router, store, raw
    finally:
        router.close()
        store.close()


def _acked(store: MetaStore, doc: dict[str, Any], version: int) -> bool:
    store.push(doc, expected=version - 1, comment=f"v{version}")
    return wait_for_acks(store, version, timeout=3).complete


def _world(router: Router) -> dict[int, int]:
    """Users 1..8, an order of each with two items, a diary entry (100 + user) each."""
    gen = router.topology.id_generator("orders", worker_id=1)
    oids: dict[int, int] = {}
    with RoutedSession(router) as s:
        for u in range(1, 9):
            s.add(User(user_id=u, email=f"u{u}@example.com"))
            oid = oids[u] = gen.next_id(user_id=u)
            order = Order(order_id=oid, user_id=u, merchant_id=u % 3, amount_cents=u * 10)
            order.items = [Item(line=i, user_id=u, sku=f"k{i}") for i in range(2)]
            s.add(order)
            s.add(Diary(entry_id=100 + u, user_id=u, body="b"))
        s.commit()
    assert router._snap.users == 0
    return oids


# -- guards: a plain application, no version change ----------------------------------------------


@pytest.mark.parametrize(
    ("expire", "autobegin"), [(True, True), (False, True), (True, False), (False, False)]
)
def test_ordinary_orm_use_is_not_refused_and_leaves_no_pin(
    app: tuple[Router, MetaStore, dict[str, Any]], expire: bool, autobegin: bool
) -> None:
    """add/commit/get/refresh/merge/delete, lazy, selectin and joined loads both ways, column
    selects, scalars, populate_existing, bulk UPDATE by key, split tables, broadcast reads;
    expire_on_commit both ways, autobegin=False with explicit begin(): no refusal, no pin."""
    router, store, raw = app
    oids = _world(router)
    session = RoutedSession(router, expire_on_commit=expire, autobegin=autobegin)
    try:
        with session.begin() if not autobegin else _Null():
            order = session.get(Order, oids[1])
            assert order is not None and [i.line for i in order.items] == [0, 1]
            item = session.get(Item, (oids[2], 1))
            assert item is not None and item.order.user_id == 2
            user = session.get(User, 3)
            assert user is not None and user.email == "u3@example.com"
            entry = session.get(Diary, 104)
            assert entry is not None and entry.body == "b"
            assert session.get(Country, "fr") is None
            session.refresh(order)
            session.refresh(entry)
            order.amount_cents = 999
            entry.body = "c"
            session.flush()
            top = session.execute(
                select(Order.order_id, Order.amount_cents)
                .order_by(Order.amount_cents.desc())
                .limit(3)
            ).all()
            assert [r.amount_cents for r in top] == [999, 80, 70]
            got = session.scalars(
                select(Order).where(Order.user_id == 4).options(selectinload(Order.items))
            ).one()
            assert len(got.items) == 2
            got = (
                session.scalars(
                    select(Order).where(Order.user_id == 5).options(joinedload(Order.items))
                )
                .unique()
                .one()
            )
            assert len(got.items) == 2
            items = session.scalars(
                select(Item).where(Item.user_id == 6).options(selectinload(Item.order))
            ).all()
            assert {i.order.order_id for i in items} == {oids[6]}
            items = session.scalars(
                select(Item).where(Item.order_id == oids[6]).options(joinedload(Item.order))
            ).all()
            assert len(items) == 2
            assert session.scalar(select(func.count()).select_from(Order)) == 8
            assert len(session.scalars(select(Diary)).all()) == 8
            session.scalars(
                select(Diary).where(Diary.user_id == 7).execution_options(populate_existing=True)
            ).one()
            merged = session.merge(Diary(entry_id=105, user_id=5, body="merged"))
            session.merge(Order(order_id=oids[8], user_id=8, merchant_id=2, amount_cents=5))
            with pytest.raises(UnsupportedQueryError):
                session.bulk_save_objects([Diary(entry_id=1, user_id=1)])
            if autobegin:
                session.commit()
        with session.begin() if not autobegin else _Null():
            assert order.amount_cents == 999 and entry.body == "c" and merged.body == "merged"
            assert [i.line for i in order.items] == [0, 1]
            assert item.order is order or item.order.order_id == oids[2]
            session.execute(update(Order).where(Order.order_id == oids[1]).values(amount_cents=1))
            session.execute(update(Diary).where(Diary.user_id == 1).values(body="u"))
            session.refresh(order)
            assert order.amount_cents == 1
            session.delete(session.get(Diary, 103))
            session.delete(session.get(Order, oids[3]))
            if autobegin:
                session.commit()
        with session.begin() if not autobegin else _Null():
            assert session.get(Diary, 103) is None and session.get(Order, oids[3]) is None
            session.execute(delete(Diary).where(Diary.user_id == 2))
            if autobegin:
                session.commit()
    finally:
        session.close()
    assert router._snap.users == 0
    doc = dict(raw, tables={**raw["tables"], "x2": {"column": "user_id", "strategy": "hash"}})
    assert _acked(store, doc, 2)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def test_state_info_slot_is_set_by_every_load_path_and_survives_expunge_and_merge(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    router, _store, _raw = app
    _world(router)
    with RoutedSession(router, expire_on_commit=False) as session:
        by_get = session.get(Diary, 104)
        assert by_get is not None and _remembered_value(inspect(by_get)) == 4
        session.expunge(by_get)
        again = session.scalars(
            select(Diary).where(Diary.entry_id == 104).execution_options(populate_existing=True)
        ).one()
        assert again is not by_get and _remembered_value(inspect(again)) == 4
        assert _remembered_value(inspect(by_get)) == 4  # detached, kept
        session.expunge(again)
    with RoutedSession(router) as other:
        merged = other.merge(by_get)
        assert _remembered_value(inspect(merged)) == 4
        merged.body = "m"
        other.commit()
        assert merged.body == "m"
    assert router._snap.users == 0


def test_commit_whose_flush_fails_leaves_the_session_usable_and_unpinned(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """The flush in before_commit: an IntegrityError at commit() (a duplicate key) leaves the
    session as SQLAlchemy's own commit flush does: rollback(), then usable; no pin."""
    router, store, raw = app
    _world(router)
    session = RoutedSession(router)
    try:
        session.add(Diary(entry_id=101, user_id=1, body="dup"))
        with pytest.raises(IntegrityError):
            session.commit()
        session.rollback()
        assert router._snap.users == 0
        assert session.get(Diary, 101).body == "b"  # type: ignore[union-attr]
        session.add(Diary(entry_id=201, user_id=1, body="new"))
        session.commit()
        assert session.get(Diary, 201) is not None
    finally:
        session.close()
    assert router._snap.users == 0
    assert _acked(store, moved(raw), 2)


def test_identity_loads_of_composite_lookup_and_broadcast_keys_are_not_refused(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    router, _store, _raw = app
    oids = _world(router)
    with RoutedSession(router) as session:
        for u in range(1, 9):
            assert session.get(Item, (oids[u], 1)) is not None
            assert session.get(Item, {"order_id": oids[u], "line": 0}) is not None
            assert session.get(User, u) is not None
            assert session.get(Order, oids[u]) is not None
            assert session.get(Diary, 100 + u) is not None
        assert session.get(Country, "zz") is None
        session.expunge_all()
        session.commit()
        for u in range(1, 9):  # identity_token given: the current placement, accepted
            token = inspect(session.get(Order, oids[u])).identity_token
            session.expunge_all()
            assert session.get(Order, oids[u], identity_token=token) is not None
    assert router._snap.users == 0


# -- findings ------------------------------------------------------------------------------------


def test_a_row_copied_with_make_transient_to_another_user_can_be_updated(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """The copy idiom (load, make_transient, new key and owner, add): the state keeps the
    load listener's InstanceState.info slot of the ORIGINAL owner, so the copy's UPDATE is
    checked against the old user's placement: a false FencedError, no version change."""
    router, _store, _raw = app
    a = user_in_slots(router, 0, 256)
    b = user_in_slots(router, 256, 512)
    with RoutedSession(router) as session:
        session.add(Diary(entry_id=1, user_id=a, body="x"))
        session.commit()
        session.expunge_all()
        entry = session.get(Diary, 1)
        assert entry is not None
        session.expunge(entry)
        make_transient(entry)
        entry.entry_id, entry.user_id = 2, b
        session.add(entry)
        session.commit()
        entry.body = "y"
        session.commit()  # FencedError: "loaded from placement 's1' ... slot lives in 's0'"
        assert entry.body == "y"
    assert router._snap.users == 0


def test_a_read_only_class_without_the_sharding_column_loads_by_query(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """OrderView maps orders without user_id; queried by order_id (its gene routes) it loaded
    before bbcecc0. The Mapper load listener calls _Routing.mapped() for every loaded object,
    which refuses a class not mapping its table's sharding column: RoutingError per row."""
    router, _store, _raw = app
    oids = _world(router)
    with RoutedSession(router) as session:
        view = session.scalars(select(OrderView).where(OrderView.order_id == oids[2])).one()
        assert view.amount_cents == 20
        assert len(session.scalars(select(OrderView)).all()) == 8
    assert router._snap.users == 0


@pytest.mark.parametrize("path", ["order->user lazy", "user->orders lazy", "user->orders selectin"])
def test_set_shard_id_parents_load_relationships_to_unbound_tables(
    app: tuple[Router, MetaStore, dict[str, Any]], path: str
) -> None:
    """set_shard_id(token) propagates to relationship loads; a relationship to a table not
    bound with the parents' routes by its own key (correct) to another placement, and
    _invoke then refuses the inherited option with a FencedError blaming an older version,
    though none changed. (order -> user worked before bbcecc0.)"""
    router, _store, _raw = app
    oids = _world(router)
    shard, slot = router.route_key(user_id=3)
    with RoutedSession(router) as session:
        if path == "order->user lazy":
            order = session.scalars(
                select(OrderV)
                .where(OrderV.order_id == oids[3])
                .options(set_shard_id(f"{shard}/{slot % 4}"))
            ).one()
            assert order.user.email == "u3@example.com"
        else:
            options: list[Any] = [set_shard_id(shard)]
            if path.endswith("selectin"):
                options.append(selectinload(UserV.orders))
            user = session.scalars(select(UserV).where(UserV.user_id == 3).options(*options)).one()
            assert [o.order_id for o in user.orders] == [oids[3]]
    assert router._snap.users == 0


def test_a_plain_session_runs_no_shardrouter_code_per_loaded_object(tmp_path: Path) -> None:
    """Importing shardrouter.orm registered a listener on every Mapper's load event: a plain
    Session of an unrelated application (same process) called it for every object it loads
    (SQLAlchemy's wrap, then _remember_slot's isinstance): 5 extra calls per object. Now the
    listener is registered per mapper, for classes a routed session maps: a class no routed
    session uses runs none."""

    class PlainBase(DeclarativeBase):
        pass

    class PlainDiary(PlainBase):
        __tablename__ = "diary"
        entry_id: Mapped[int] = mapped_column(primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column()
        body: Mapped[str | None] = mapped_column()

    engine = create_engine(f"sqlite:///{tmp_path}/plain.db")
    PlainBase.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(
            PlainDiary.__table__.insert(),
            [{"entry_id": i, "user_id": i, "body": "b"} for i in range(500)],
        )
    profile = cProfile.Profile()
    with Session(engine) as session:
        profile.enable()
        loaded = session.scalars(select(PlainDiary)).all()
        profile.disable()
        assert len(loaded) == 500
    engine.dispose()
    stats = pstats.Stats(profile).stats  # type: ignore[attr-defined]
    ours = {
        f"{name}:{line}": calls
        for (path, line, name), (calls, *_rest) in stats.items()
        if "shardrouter" in path
    }
    assert not ours, f"shardrouter code ran in a plain Session's load: {ours}"


def test_an_object_the_session_inserted_is_not_refreshed_from_its_old_placement(
    app: tuple[Router, MetaStore, dict[str, Any]], tmp_path: Path
) -> None:
    """The 8o fix remembers the slot of objects whose key does not route at LOAD; one the
    session inserted never loads: after the commit expired it and its slot moved, its refresh
    passes _check_loaded (no slot known) and reads the old placement's stale row."""
    router, store, raw = app
    user = user_in_slots(router, 0, 10)
    session = RoutedSession(router)  # expire_on_commit
    try:
        entry = Diary(entry_id=7, user_id=user, body="v1")
        session.add(entry)
        session.commit()
        sql(tmp_path / "s1.db", "INSERT INTO diary VALUES (7, :u, 'on s1')", {"u": user})
        assert _acked(store, moved(raw), 2)
        try:
            body = entry.body
        except FencedError:
            body = "refused"
        assert body in ("on s1", "refused"), f"the refresh read the old placement: {body!r}"
        session.rollback()
    finally:
        session.close()
    assert router._snap.users == 0


def test_writes_added_by_an_after_flush_hook_pass_before_the_commit_fence(
    app: tuple[Router, MetaStore, dict[str, Any]],
) -> None:
    """before_commit flushes once, then fences the commit (resolver.before_commit) and
    verifies the lookup rows. An after_flush_postexec hook that adds an object (an audit row;
    SQLAlchemy's commit loops flushes for exactly this) gets it flushed by SQLAlchemy's commit
    loop AFTER the fence and the verify: a write the commit's checks never saw."""
    router, _store, _raw = app
    events: list[str] = []
    router.resolver.hook = lambda resolution: events.append(f"write {resolution.role}")
    fence = router.resolver.before_commit

    def recording_fence(*args: Any, **kw: Any) -> None:
        events.append("commit fence")
        fence(*args, **kw)

    router.resolver.before_commit = recording_fence  # type: ignore[method-assign]
    session = RoutedSession(router)
    audited: list[int] = []

    @event.listens_for(session, "after_flush_postexec")
    def audit(sess: Session, _ctx: Any) -> None:
        if not audited:
            audited.append(1)
            sess.add(Diary(entry_id=900, user_id=9, body="audit"))

    try:
        session.add(Diary(entry_id=1, user_id=1, body="x"))
        session.commit()
        assert session.get(Diary, 900) is not None
    finally:
        session.close()
    assert events[-1] == "commit fence", events
