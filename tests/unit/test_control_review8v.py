"""Review 8v of commit 01478c7 (the refusal cache keeps (class, args) and raises anew;
registry.configure(cascade=True)) and a broad smoke of ordinary ORM use with no version
change on the SQLite cluster of control_cluster (no MariaDB)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from control_cluster import document
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    select,
    update,
)
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    foreign,
    joinedload,
    mapped_column,
    relationship,
    selectinload,
)

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import (
    RoutingError,
    UnknownTableError,
    UnsupportedQueryError,
)
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(120)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    orders: Mapped[list[Order]] = relationship(
        primaryjoin=lambda: User.user_id == foreign(Order.user_id),
        order_by=lambda: Order.order_id,
        viewonly=True,
    )


class Order(Base):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    merchant_id: Mapped[int] = mapped_column(BigInteger)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
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
    sku: Mapped[str] = mapped_column(String(32))


class Country(Base):
    __tablename__ = "countries"
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


LOOKUPS = MetaData()
Table(
    "merchant_orders",
    LOOKUPS,
    Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
    Column("order_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger, nullable=False),
)
Table(
    "user_emails",
    LOOKUPS,
    Column("email", String(255), primary_key=True),
    Column("user_id", BigInteger, nullable=False),
)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    raw = document(tmp_path)
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    r = Router.from_config(config_from_dict(raw))
    md = MetaData()
    for logical in [*Base.metadata.tables.values(), *LOOKUPS.tables.values()]:
        for physical in r.topology.table(logical.name).physical_names:
            logical.to_metadata(md, name=physical)
    for engine in r.engines.primaries.values():
        md.create_all(engine)
    try:
        yield r
    finally:
        r.close()
        store.close()


def _seed(router: Router, users: range = range(1, 9)) -> list[int]:
    ids = router.topology.id_generator("orders", worker_id=1)
    oids = []
    with RoutedSession(router) as s:
        for u in users:
            s.add(User(user_id=u, email=f"u{u}@x.org"))
            for oid in ids.next_ids(2, user_id=u):
                o = Order(order_id=oid, user_id=u, merchant_id=u % 3, amount_cents=u)
                o.items = [OrderItem(line=i, user_id=u, sku=f"k{i}") for i in range(2)]
                s.add(o)
                oids.append(oid)
        s.commit()
    router.execute(Country.__table__.insert().values(code="fr", name="France"))
    return oids


# -- guards (held) ---------------------------------------------------------------------------


class _Person(DeclarativeBase):
    pass


class Person(_Person):
    __tablename__ = "people"  # not in the topology: UnknownTableError
    person_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)


class Parent(_Person):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(8))
    __mapper_args__: ClassVar[dict[str, Any]] = {
        "polymorphic_on": "kind",
        "polymorphic_identity": "p",
    }


class Child(Parent):
    __tablename__ = "user_emails"  # joined inheritance: mapped to a join, UnsupportedQueryError
    user_id: Mapped[int] = mapped_column(ForeignKey("users.user_id"), primary_key=True)
    __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "c"}


@pytest.mark.parametrize(
    ("cls", "kind"), [(Person, UnknownTableError), (Child, UnsupportedQueryError)]
)
def test_cached_refusal_is_the_same_class_and_message_and_a_new_object(
    router: Router, cls: type, kind: type[RoutingError]
) -> None:
    caught: list[BaseException] = []
    for _ in range(3):
        with RoutedSession(router) as s:
            with pytest.raises(RoutingError) as info:
                s.get(cls, 1)
            caught.append(info.value)
    assert [type(e) for e in caught] == [kind] * 3
    assert len({str(e) for e in caught}) == 1 and str(caught[0])
    assert len({id(e) for e in caught}) == 3
    assert all(e.__context__ is None for e in caught[1:])


def test_ordinary_orm_use_raises_no_untyped_error_nor_fence(router: Router) -> None:
    oids = _seed(router)
    with RoutedSession(router) as s:
        u = s.get(User, 3)
        assert u is not None and len(u.orders) == 2
        o = s.get(Order, oids[0])
        assert o is not None and len(o.items) == 2
        o.amount_cents = 5
        o.items.pop(0)
        o.items.append(OrderItem(line=7, user_id=o.user_id, sku="z"))
        s.commit()
        s.refresh(o)
        assert o.amount_cents == 5 and [i.line for i in o.items] == [1, 7]
        m = s.merge(Order(order_id=oids[2], user_id=2, merchant_id=2, amount_cents=9))
        s.commit()
        assert m.amount_cents == 9
        assert len(s.scalars(select(Order).where(Order.merchant_id == 2)).all()) >= 1
        assert s.scalars(select(User).where(User.email == "u4@x.org")).one().user_id == 4
        assert s.scalar(select(func.count()).select_from(Order)) == 16
        n = s.execute(update(Order).where(Order.user_id == 5).values(amount_cents=1)).rowcount
        d = s.execute(delete(OrderItem).where(OrderItem.user_id == 6)).rowcount
        s.commit()
        assert (n, d) == (2, 4)
        got = s.scalars(select(Order).options(selectinload(Order.items))).all()
        assert sum(len(x.items) for x in got) == 32 - 1 + 1 - 4
        j = s.scalars(select(Order).options(joinedload(Order.items)).where(Order.user_id == 3))
        assert len(j.unique().all()) == 2
        s.delete(s.get(Order, oids[6]))
        s.delete(s.get(User, 8))
        s.commit()
        assert s.get(Order, oids[6]) is None and s.get(User, 8) is None
        assert s.get(Country, "fr").name == "France"
