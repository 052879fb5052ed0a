"""The routed ORM session on the four-shard MariaDB sandbox: placement, routing, merged fan-out.

The shared orders_sN databases are used by other modules too: tables are created if missing
(with the columns of migrations/0001_orders.sql), and only this module's rows (user ids
5_000_000 .. 5_000_999) are inserted and deleted; nothing assumes the tables are empty.
"""

from __future__ import annotations

import datetime as dt
import random
import re
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, DateTime, Engine, Integer, String, event, func, select, text
from sqlalchemy.ext.horizontal_shard import set_shard_id
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    foreign,
    mapped_column,
    relationship,
    selectinload,
)

from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import KeyValueError, UnsupportedQueryError
from shardrouter.ops.schema import apply
from shardrouter.orm.session import RoutedSession, routed_sessionmaker

pytestmark = pytest.mark.mariadb

FIRST_USER, LAST_USER = 5_000_000, 5_000_999
USERS = list(range(FIRST_USER, FIRST_USER + 24))
MINE = f"user_id BETWEEN {FIRST_USER} AND {LAST_USER}"

DDL = {
    "users": "CREATE TABLE IF NOT EXISTS {name} (user_id BIGINT NOT NULL,"
    " email VARCHAR(255) NOT NULL, name VARCHAR(255) NULL,"
    " created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3), PRIMARY KEY (user_id))",
    "orders": "CREATE TABLE IF NOT EXISTS {name} (order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL,"
    " amount_cents BIGINT NOT NULL, created_at DATETIME(3) NOT NULL, PRIMARY KEY (order_id),"
    " INDEX idx_user_created (user_id, created_at))",
    "order_items": "CREATE TABLE IF NOT EXISTS {name} (order_id BIGINT NOT NULL,"
    " line INT NOT NULL, user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, qty INT NOT NULL,"
    " price_cents BIGINT NOT NULL, PRIMARY KEY (order_id, line), INDEX idx_user (user_id))",
    "merchant_orders": "CREATE TABLE IF NOT EXISTS {name} (merchant_id BIGINT NOT NULL,"
    " order_id BIGINT NOT NULL, user_id BIGINT NOT NULL,"
    " created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),"
    " PRIMARY KEY (merchant_id, order_id))",
    "user_emails": "CREATE TABLE IF NOT EXISTS {name} (email VARCHAR(255) NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (email))",
}


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
    status: Mapped[str] = mapped_column(String(16))
    amount_cents: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime)
    items: Mapped[list[OrderItem]] = relationship(
        primaryjoin=lambda: Order.order_id == foreign(OrderItem.order_id),
        order_by=lambda: OrderItem.line,
        cascade="all, delete-orphan",
    )


class OrderItem(Base):
    __tablename__ = "order_items"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    line: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    sku: Mapped[str] = mapped_column(String(64))
    qty: Mapped[int] = mapped_column(Integer)
    price_cents: Mapped[int] = mapped_column(BigInteger)


def _physical(router: Router) -> list[tuple[Engine, str, str]]:
    """(engine, logical, physical) of every table this module touches, on every shard."""
    return [
        (engine, logical, physical)
        for engine in router.engines.primaries.values()
        for logical in DDL
        for physical in router.topology.table(logical).physical_names
    ]


def _delete_mine(router: Router) -> None:
    for engine, _, physical in _physical(router):
        with engine.begin() as conn:
            conn.execute(text(f"DELETE FROM {physical} WHERE {MINE}"))


@pytest.fixture(scope="module")
def router(shard_databases) -> Iterator[Router]:  # type: ignore[no-untyped-def]
    r = Router(Topology.load(shard_databases))
    apply(r.topology, r.engines).raise_for_errors()  # the real migrations, private databases
    _delete_mine(r)
    yield r
    _delete_mine(r)
    r.close()


@pytest.fixture
def world(router: Router) -> Iterator[dict[str, Any]]:
    """Users with three orders of two items each, committed through the ORM; removed after."""
    _delete_mine(router)
    rng = random.Random(11)
    ids = router.topology.id_generator("orders")
    objects: list[Base] = []
    rows = []
    for u in USERS:
        objects.append(User(user_id=u, email=f"orm-{u}@example.com"))
        for oid in ids.next_ids(3, user_id=u):
            order = Order(
                order_id=oid,
                user_id=u,
                merchant_id=FIRST_USER + u % 5,
                status="new",
                amount_cents=rng.randrange(10**6),
                created_at=dt.datetime(2026, 1, 1),
            )
            order.items = [
                OrderItem(line=i, user_id=u, sku=f"sku-{i}", qty=1, price_cents=100)
                for i in range(2)
            ]
            objects.append(order)
            rows.append((oid, u, order.merchant_id, order.amount_cents))
    make = routed_sessionmaker(router)
    with make() as session:
        session.add_all(objects)
        session.commit()
    yield {"make": make, "orders": rows}
    _delete_mine(router)


class Recorder:
    """(shard, statement) of every statement the shard engines run, after rewriting."""

    def __init__(self, router: Router) -> None:
        self.seen: list[tuple[str, str]] = []
        self._listeners: list[tuple[Engine, Any]] = []
        for shard, engine in router.engines.primaries.items():

            def listen(conn: Any, cursor: Any, statement: str, *args: Any, _s: str = shard) -> None:
                self.seen.append((_s, statement))

            event.listen(engine, "after_cursor_execute", listen)
            self._listeners.append((engine, listen))

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc: object) -> None:
        for engine, fn in self._listeners:
            event.remove(engine, "after_cursor_execute", fn)


def where_is(router: Router, logical: str, key: str, value: Any) -> list[tuple[str, str]]:
    found = []
    for shard, engine in router.engines.primaries.items():
        with engine.connect() as conn:
            for physical in router.topology.table(logical).physical_names:
                n = conn.execute(
                    text(f"SELECT COUNT(*) FROM {physical} WHERE {key} = :v"), {"v": value}
                ).scalar()
                found += [(shard, physical)] * int(n or 0)
    return found


def test_flush_places_rows_and_lookups_where_routing_says(
    router: Router, world: dict[str, Any]
) -> None:
    topology = router.topology
    tables = set()
    for order_id, user_id, _, _ in world["orders"]:
        route = topology.route("orders", "user_id", user_id)
        assert where_is(router, "orders", "order_id", order_id) == [
            (route.shard, route.physical_table)
        ]
        items = topology.route("order_items", "user_id", user_id)
        assert (
            where_is(router, "order_items", "order_id", order_id)
            == [(items.shard, items.physical_table)] * 2
        )
        tables.add((route.shard, route.physical_table))
    assert len({s for s, _ in tables}) == 4 and len({t for _, t in tables}) == 4
    merchant = FIRST_USER + 2
    found = router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = :m ORDER BY order_id", {"m": merchant}
    )
    assert found.scalars() == sorted(o for o, _, m, _ in world["orders"] if m == merchant)
    assert found.lookups


def test_get_and_key_queries_hit_one_shard(router: Router, world: dict[str, Any]) -> None:
    topology = router.topology
    order_id, user_id, _, amount = world["orders"][40]
    route = topology.route("orders", "user_id", user_id)
    with Recorder(router) as recorder, world["make"]() as session:
        order = session.get(Order, order_id)
        assert order is not None and order.amount_cents == amount
        assert [s for s, _ in recorder.seen] == [route.shard]
        assert route.physical_table in recorder.seen[0][1]
        recorder.seen.clear()
        mine = session.scalars(select(Order).where(Order.user_id == user_id)).all()
        assert sorted(o.order_id for o in mine) == sorted(
            o for o, u, _, _ in world["orders"] if u == user_id
        )
        assert order in mine  # one identity map entry per row
        assert [s for s, _ in recorder.seen] == [route.shard]
        recorder.seen.clear()
        assert [i.line for i in order.items] == [0, 1]
        assert [s for s, _ in recorder.seen] == [route.shard]


def _orders_queried(recorder: Recorder) -> set[tuple[str, str]]:
    """(shard, physical orders table) of every statement on an orders table it recorded."""
    return {
        (shard, name)
        for shard, statement in recorder.seen
        for name in re.findall(r"\borders_\d+\b", statement)
    }


def test_lookup_key_queries_read_the_lookup_table_first(
    router: Router, world: dict[str, Any]
) -> None:
    """merchant_id = / IN: the merchant_orders rows name the owners; only their placements are
    queried (not all 16), and the answer is the whole one, as router.execute's."""
    topology = router.topology

    def placements(merchants: set[int]) -> set[tuple[str, str]]:
        out = set()
        for _, user, merchant, _ in world["orders"]:
            if merchant in merchants:
                route = topology.route("orders", "user_id", user)
                out.add((route.shard, route.physical_table))
        return out

    one, two = FIRST_USER + 3, FIRST_USER + 4
    with Recorder(router) as recorder, world["make"]() as session:
        found = session.scalars(
            select(Order).where(Order.merchant_id == one).order_by(Order.order_id)
        ).all()
        assert [o.order_id for o in found] == sorted(
            o for o, _, m, _ in world["orders"] if m == one
        )
        assert _orders_queried(recorder) == placements({one})
        assert 1 < len(placements({one})) < 16
    # each query in a transaction of its own: a transaction also reads every placement of the
    # shards it has begun (its snapshot; test_review19_orm's repeatable read)
    with Recorder(router) as recorder, world["make"]() as session:
        rows = session.execute(
            select(Order.merchant_id, func.count(), func.sum(Order.amount_cents))
            .where(Order.merchant_id.in_([one, two]))
            .group_by(Order.merchant_id)
            .order_by(Order.merchant_id)
        ).all()
        expected = [
            (
                m,
                sum(1 for o in world["orders"] if o[2] == m),
                sum(o[3] for o in world["orders"] if o[2] == m),
            )
            for m in (one, two)
        ]
        assert [(m, c, int(t)) for m, c, t in rows] == expected
        assert _orders_queried(recorder) == placements({one, two})
    with Recorder(router) as recorder, world["make"]() as session:
        nobody = FIRST_USER + 999
        count = session.scalar(
            select(func.count()).select_from(Order).where(Order.merchant_id == nobody)
        )
        assert count == 0 and len(_orders_queried(recorder)) == 1  # still one row: 0


def test_lookup_key_query_finds_the_sessions_own_rows(
    router: Router, world: dict[str, Any]
) -> None:
    """An order flushed (not committed) in the session is found by its merchant: its lookup
    row was written before the flush; after a rollback it is gone, lookup row included."""
    merchant = FIRST_USER + 777
    user = USERS[5]
    oid = router.topology.id_generator("orders").next_id(user_id=user)
    with world["make"]() as session:
        session.add(
            Order(
                order_id=oid,
                user_id=user,
                merchant_id=merchant,
                status="new",
                amount_cents=5,
                created_at=dt.datetime(2026, 1, 2),
            )
        )
        found = session.scalars(select(Order.order_id).where(Order.merchant_id == merchant))
        assert found.all() == [oid]  # autoflushed, found through its lookup row
        session.rollback()
        assert session.scalars(select(Order).where(Order.merchant_id == merchant)).all() == []
    assert where_is(router, "merchant_orders", "merchant_id", merchant) == []


def test_fan_out_order_by_limit_equals_the_single_database_answer(
    router: Router, world: dict[str, Any]
) -> None:
    everything = sorted(world["orders"], key=lambda o: (-o[3], o[0]))
    stmt = (
        select(Order)
        .where(Order.user_id.between(FIRST_USER, LAST_USER))
        .order_by(Order.amount_cents.desc(), Order.order_id)
        .limit(5)
    )
    with Recorder(router) as recorder, world["make"]() as session:
        top = session.scalars(stmt).all()
        assert [o.order_id for o in top] == [o[0] for o in everything[:5]]
        assert len({s for s, _ in recorder.seen}) == 4
        page = session.scalars(stmt.offset(10)).all()
        assert [o.order_id for o in page] == [o[0] for o in everything[10:15]]
        # Plain horizontal_shard's answer: the placements' answers one after the other.
        tokens = [f"{s}/{r}" for s in router.topology.shards for r in range(4)]
        concatenated = [
            o.order_id for t in tokens for o in session.scalars(stmt.options(set_shard_id(t)))
        ]
        assert concatenated[:5] != [o[0] for o in everything[:5]]
        count, total = session.execute(
            select(func.count(), func.sum(Order.amount_cents)).where(
                Order.user_id.between(FIRST_USER, LAST_USER)
            )
        ).one()
        assert (count, int(total)) == (len(everything), sum(o[3] for o in everything))
        orders = session.scalars(
            select(Order)
            .where(Order.user_id.in_(USERS[:6]))
            .options(selectinload(Order.items))
            .order_by(Order.amount_cents)
        ).all()
        assert [o.amount_cents for o in orders] == sorted(
            a for _, u, _, a in world["orders"] if u in USERS[:6]
        )
        assert all([i.line for i in o.items] == [0, 1] for o in orders)


def test_updates_deletes_and_refusals(router: Router, world: dict[str, Any]) -> None:
    order_id, user_id, merchant, _ = world["orders"][7]
    with world["make"]() as session:
        order = session.get(Order, order_id)
        assert order is not None
        order.amount_cents = 10**8
        top = session.scalars(
            select(Order)
            .where(Order.user_id.between(FIRST_USER, LAST_USER))
            .order_by(Order.amount_cents.desc())
            .limit(1)
        ).one()
        assert top is order  # flushed on its placement before the merged read
        session.commit()
    route = router.topology.route("orders", "user_id", user_id)
    with router.engines.primary(route.shard).connect() as conn:
        assert (
            conn.execute(
                text(f"SELECT amount_cents FROM {route.physical_table} WHERE order_id = :o"),
                {"o": order_id},
            ).scalar()
            == 10**8
        )
    with world["make"]() as session:
        session.delete(session.get(Order, order_id))
        session.commit()
    assert where_is(router, "orders", "order_id", order_id) == []
    assert where_is(router, "order_items", "order_id", order_id) == []
    assert where_is(router, "merchant_orders", "order_id", order_id) == []
    by_merchant = router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = :m", {"m": merchant}
    ).scalars()
    assert by_merchant and order_id not in by_merchant
    ids = router.topology.id_generator("orders")
    with world["make"]() as session:
        session.add(
            Order(
                order_id=ids.next_id(user_id=FIRST_USER + 900),
                user_id=FIRST_USER + 901,
                merchant_id=FIRST_USER,
                status="new",
                amount_cents=1,
                created_at=dt.datetime(2026, 1, 1),
            )
        )
        with pytest.raises(KeyValueError, match="order_id"):
            session.flush()
        session.rollback()
        with pytest.raises(UnsupportedQueryError, match="subquer"):
            session.execute(select(Order).where(Order.user_id.in_(select(User.user_id))))


def test_routed_session_is_a_sharded_session(router: Router) -> None:
    with routed_sessionmaker(router)() as session:
        assert isinstance(session, RoutedSession)
        assert session.placement("s2/3").shard == "s2"
