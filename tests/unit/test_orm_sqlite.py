"""The routed ORM session on the SQLite demo topology: placement, routing, merged fan-out."""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    event,
    func,
    inspect,
    select,
    text,
    update,
)
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
from shardrouter.errors import (
    ExecutionError,
    KeyValueError,
    ScatterWriteError,
    UnsupportedQueryError,
)
from shardrouter.orm.session import RoutedSession, routed_sessionmaker

REPO = Path(__file__).resolve().parents[2]
SQLITE_YAML = REPO / "config" / "orders-sqlite.yaml"
USERS = list(range(1001, 1025))


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    # Not bound in the topology: a user's orders are found by the user_id key, not by placement.
    orders: Mapped[list[Order]] = relationship(
        primaryjoin=lambda: User.user_id == foreign(Order.user_id),
        order_by=lambda: Order.amount_cents,
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
    qty: Mapped[int] = mapped_column(Integer)


class Country(Base):
    __tablename__ = "countries"  # a broadcast table
    code: Mapped[str] = mapped_column(String(2), primary_key=True)
    name: Mapped[str] = mapped_column(String(64))


# The lookup tables the router maintains: merchant_id -> orders, email -> user.
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


def create_physical(router: Router) -> None:
    """Every table under its physical names on every shard (split tables expanded)."""
    topology = router.topology
    md = MetaData()
    for logical in [*Base.metadata.tables.values(), *LOOKUPS.tables.values()]:
        for physical in topology.table(logical.name).physical_names:
            logical.to_metadata(md, name=physical)
    for engine in router.engines.primaries.values():
        md.create_all(engine)


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

    def clear(self) -> None:
        self.seen.clear()

    def shards(self) -> list[str]:
        return [s for s, _ in self.seen]

    def close(self) -> None:
        for engine, fn in self._listeners:
            event.remove(engine, "after_cursor_execute", fn)


@pytest.fixture
def router(tmp_path: Path) -> Iterator[Router]:
    topology = Topology.load(SQLITE_YAML, env={"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    r = Router(topology)
    create_physical(r)
    yield r
    r.close()


@pytest.fixture
def world(router: Router) -> dict[str, Any]:
    """Users, three orders each with random amounts and two items, committed through the ORM."""
    rng = random.Random(7)
    ids = router.topology.id_generator("orders")
    users, orders, rows = [], [], []
    for u in USERS:
        users.append(User(user_id=u, email=f"u{u}@example.com"))
        for oid in ids.next_ids(3, user_id=u):
            order = Order(
                order_id=oid, user_id=u, merchant_id=u % 5, amount_cents=rng.randrange(10**6)
            )
            order.items = [
                OrderItem(line=i, user_id=u, sku=f"sku-{i}", qty=i + 1) for i in range(2)
            ]
            orders.append(order)
            rows.append((oid, u, order.merchant_id, order.amount_cents))
    make = routed_sessionmaker(router)
    with make() as session:
        session.add_all(users + orders)
        session.commit()
    return {
        "make": make,
        "orders": rows,
    }


def where_is(router: Router, logical: str, key: str, value: Any) -> list[tuple[str, str]]:
    """Every (shard, physical table) holding a row of ``logical`` with ``key == value``."""
    found = []
    for shard, engine in router.engines.primaries.items():
        with engine.connect() as conn:
            for physical in router.topology.table(logical).physical_names:
                n = conn.execute(
                    text(f"SELECT COUNT(*) FROM {physical} WHERE {key} = :v"), {"v": value}
                ).scalar()
                found += [(shard, physical)] * int(n or 0)
    return found


def test_flush_puts_each_row_in_its_shard_and_physical_table(
    router: Router, world: dict[str, Any]
) -> None:
    topology = router.topology
    splits_used = set()
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
        splits_used.add(route.physical_table)
    for user_id in USERS:
        route = topology.route("users", "user_id", user_id)
        assert where_is(router, "users", "user_id", user_id) == [(route.shard, "users")]
    assert len(splits_used) == 4  # the data exercises every split


def test_lookup_rows_are_written_so_the_router_finds_orm_orders(
    router: Router, world: dict[str, Any]
) -> None:
    by_merchant = router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = :m ORDER BY order_id", {"m": 3}
    )
    assert by_merchant.scalars() == sorted(o for o, _, m, _ in world["orders"] if m == 3)
    assert by_merchant.lookups  # routed through merchant_orders, not scattered
    by_email = router.execute(
        "SELECT user_id FROM users WHERE email = :e", {"e": "u1007@example.com"}
    )
    assert by_email.scalars() == [1007]


def test_get_by_order_id_runs_one_statement_on_the_owning_shard(
    router: Router, world: dict[str, Any]
) -> None:
    order_id, user_id, _, amount = world["orders"][17]
    route = router.topology.route("orders", "user_id", user_id)
    recorder = Recorder(router)
    try:
        with world["make"]() as session:
            order = session.get(Order, order_id)
            assert order is not None and order.amount_cents == amount
            assert recorder.shards() == [route.shard]
            assert route.physical_table in recorder.seen[0][1]
            assert inspect_token(order) == f"{route.shard}/{route.slot % 4}"
            # The identity map answers the second time, and a lazy load stays on the placement.
            assert session.get(Order, order_id) is order
            recorder.clear()
            assert [i.line for i in order.items] == [0, 1]
            assert recorder.shards() == [route.shard]
            assert f"order_items_{route.slot % 4:04d}" in recorder.seen[0][1]
    finally:
        recorder.close()


def inspect_token(obj: object) -> Any:
    return inspect(obj).identity_token


def test_query_by_user_id_and_in_list_hits_only_their_shards(
    router: Router, world: dict[str, Any]
) -> None:
    topology = router.topology
    recorder = Recorder(router)
    try:
        with world["make"]() as session:
            mine = session.scalars(
                select(Order).where(Order.user_id == 1003).order_by(Order.order_id)
            ).all()
            assert [o.order_id for o in mine] == sorted(
                o for o, u, _, _ in world["orders"] if u == 1003
            )
            assert recorder.shards() == [topology.shard_for("orders", 1003)]
            recorder.clear()
            few = [1001, 1002, 1010]
            rows = session.execute(
                select(Order.order_id, Order.amount_cents)
                .where(Order.user_id.in_(few))
                .order_by(Order.amount_cents.desc())
                .limit(4)
            ).all()
            expected = sorted(
                ((o, a) for o, u, _, a in world["orders"] if u in few), key=lambda r: -r[1]
            )[:4]
            assert [tuple(r) for r in rows] == expected
            placements = {
                (topology.shard_for("orders", u), topology.slot_for("orders", u) % 4) for u in few
            }
            assert len(recorder.seen) == len(placements)
    finally:
        recorder.close()


def test_fan_out_order_by_limit_is_merged_not_concatenated(
    router: Router, world: dict[str, Any]
) -> None:
    everything = sorted(world["orders"], key=lambda o: (-o[3], o[0]))
    stmt = select(Order).order_by(Order.amount_cents.desc(), Order.order_id).limit(5)
    recorder = Recorder(router)
    with world["make"]() as session:
        top = session.scalars(stmt).all()
        assert [o.order_id for o in top] == [o[0] for o in everything[:5]]
        # Every shard, every split table once.
        assert len(set(recorder.shards())) == 4 and len(recorder.seen) == 16
        assert len({sql.split("FROM ")[1].split()[0] for _, sql in recorder.seen}) == 4
        # The identity map is exact: get() finds the merged objects without a statement.
        recorder.clear()
        assert session.get(Order, top[0].order_id) is top[0]
        assert recorder.seen == []
        # What plain horizontal_shard returns: each placement's answer, concatenated.
        concatenated = [
            o.order_id
            for token in all_tokens(session)
            for o in session.scalars(stmt.options(set_shard_id(token))).all()
        ]
        assert len(concatenated) > 5
        assert concatenated[:5] != [o[0] for o in everything[:5]]
        page = session.scalars(stmt.offset(7)).all()
        assert [o.order_id for o in page] == [o[0] for o in everything[7:12]]
        cheapest = session.execute(
            select(Order.order_id, Order.amount_cents).order_by("amount_cents").limit(3)
        ).all()
        assert [r.order_id for r in cheapest] == [
            o[0] for o in sorted(world["orders"], key=lambda o: (o[3], o[0]))[:3]
        ]
    recorder.close()


def all_tokens(session: RoutedSession) -> list[str]:
    return [f"{s}/{r}" for s in session.router.topology.shards for r in range(4)]


def test_fan_out_aggregates_and_group_by_merge_partials(
    router: Router, world: dict[str, Any]
) -> None:
    orders = world["orders"]
    with world["make"]() as session:
        count, total = session.execute(
            select(func.count(), func.sum(Order.amount_cents)).select_from(Order)
        ).one()
        assert (count, total) == (len(orders), sum(o[3] for o in orders))
        per_merchant = session.execute(
            select(Order.merchant_id, func.count())
            .group_by(Order.merchant_id)
            .order_by(Order.merchant_id)
        ).all()
        expected: dict[int, int] = {}
        for _, _, m, _ in orders:
            expected[m] = expected.get(m, 0) + 1
        assert [tuple(r) for r in per_merchant] == sorted(expected.items())
        merchants = session.scalars(
            select(Order.merchant_id).distinct().order_by(Order.merchant_id.desc()).limit(3)
        ).all()
        assert merchants == sorted(expected, reverse=True)[:3]
        with pytest.raises(UnsupportedQueryError, match="mapped entities"):
            session.execute(select(Order).distinct())


def test_session_sees_its_own_uncommitted_writes_and_updates_route(
    router: Router, world: dict[str, Any]
) -> None:
    order_id, user_id, _, _ = world["orders"][5]
    with world["make"]() as session:
        order = session.get(Order, order_id)
        assert order is not None
        order.amount_cents = 10**7
        top = session.scalars(select(Order).order_by(Order.amount_cents.desc()).limit(1)).one()
        assert top is order  # autoflushed on its placement, read back through the merge
        session.commit()
    route = router.topology.route("orders", "user_id", user_id)
    with router.engines.primary(route.shard).connect() as conn:
        amount = conn.execute(
            text(f"SELECT amount_cents FROM {route.physical_table} WHERE order_id = :o"),
            {"o": order_id},
        ).scalar()
    assert amount == 10**7
    with world["make"]() as session:
        result = session.execute(
            update(Order).where(Order.user_id == user_id).values(amount_cents=1)
        )
        assert result.rowcount == 3
        several = session.execute(
            update(Order).where(Order.user_id.in_([1011, 1012, 1013])).values(amount_cents=2)
        )
        assert several.rowcount == 9
        with pytest.raises(ScatterWriteError):
            session.execute(update(Order).values(amount_cents=2))
        with pytest.raises(UnsupportedQueryError, match="sharding column"):
            session.execute(update(Order).where(Order.user_id == user_id).values(user_id=5))


def test_delete_removes_rows_and_lookup_rows_after_commit(
    router: Router, world: dict[str, Any]
) -> None:
    order_id, _, merchant, _ = world["orders"][0]
    with world["make"]() as session:
        order = session.get(Order, order_id)
        session.delete(order)
        session.commit()
    assert where_is(router, "orders", "order_id", order_id) == []
    assert where_is(router, "order_items", "order_id", order_id) == []
    assert where_is(router, "merchant_orders", "order_id", order_id) == []
    remaining = router.execute(
        "SELECT order_id FROM orders WHERE merchant_id = :m", {"m": merchant}
    ).scalars()
    assert order_id not in remaining and remaining


def test_refusals_name_the_problem(router: Router, world: dict[str, Any]) -> None:
    ids = router.topology.id_generator("orders")
    with world["make"]() as session:
        session.add(Order(order_id=ids.next_id(user_id=1), user_id=None, merchant_id=1))
        with pytest.raises(KeyValueError, match=r"orders\.user_id"):
            session.flush()
        session.rollback()
        session.add(Order(order_id=ids.next_id(user_id=1), user_id=2, merchant_id=1))
        with pytest.raises(KeyValueError, match="order_id"):
            session.flush()
        session.rollback()
        order = session.get(Order, world["orders"][3][0])
        assert order is not None
        order.user_id = 999
        with pytest.raises(UnsupportedQueryError, match="move the row"):
            session.flush()
        session.rollback()
        with pytest.raises(UnsupportedQueryError, match="text SQL"):
            session.execute(text("SELECT 1"))
        with pytest.raises(UnsupportedQueryError, match="subquer"):
            session.execute(select(Order).where(Order.user_id.in_(select(User.user_id))))
        # Sharded alike (hash on user_id), users and orders join on their key (issue 11).
        pairs = session.execute(
            select(Order.user_id, User.user_id).join(User, User.user_id == Order.user_id)
        ).all()
        assert pairs and all(a == b for a, b in pairs)
        with pytest.raises(UnsupportedQueryError, match="meet only inside one shard"):
            session.execute(select(Order, User).join(User, User.user_id == Order.merchant_id))
        with pytest.raises(UnsupportedQueryError, match="NULLS"):
            session.execute(select(Order).order_by(Order.amount_cents.nulls_first()).limit(2))
        session.add(Country(code="DE", name="Germany"))
        with pytest.raises(UnsupportedQueryError, match="broadcast"):
            session.flush()
        session.rollback()
        # A unique lookup already owned by another user: refused before the owner row is written.
        session.add(User(user_id=777_001, email="u1001@example.com"))
        with pytest.raises(ExecutionError, match="already belongs"):
            session.flush()
        session.rollback()
    assert where_is(router, "users", "user_id", 777_001) == []


def test_selectinload_stays_on_the_parents_placements(
    router: Router, world: dict[str, Any]
) -> None:
    topology = router.topology
    recorder = Recorder(router)
    try:
        with world["make"]() as session:
            orders = session.scalars(
                select(Order)
                .where(Order.user_id.in_([1004, 1005]))
                .options(selectinload(Order.items))
                .order_by(Order.order_id)
            ).all()
            assert [o.order_id for o in orders] == sorted(
                o for o, u, _, _ in world["orders"] if u in (1004, 1005)
            )
            assert all([i.line for i in o.items] == [0, 1] for o in orders)
            placements = {
                (r.shard, r.physical_table)
                for r in (topology.route("orders", "user_id", u) for u in (1004, 1005))
            }
            # One statement per parent placement for the orders, one for their items.
            assert len(recorder.seen) == 2 * len(placements)
            for order in orders:
                assert inspect_token(order.items[0]) == inspect_token(order)
            # An unbound relationship: the children's key criteria route them, in each
            # collection's own order.
            users = session.scalars(
                select(User)
                .where(User.user_id.in_([1006, 1007]))
                .options(selectinload(User.orders))
            ).all()
            for user in users:
                amounts = [o.amount_cents for o in user.orders]
                assert amounts == sorted(a for _, u, _, a in world["orders"] if u == user.user_id)
    finally:
        recorder.close()


def test_broadcast_reads_go_to_one_shard(router: Router) -> None:
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO countries VALUES ('DE', 'Germany')"))
    recorder = Recorder(router)
    try:
        with routed_sessionmaker(router)() as session:
            assert [c.name for c in session.scalars(select(Country))] == ["Germany"]
        assert len(recorder.seen) == 1
    finally:
        recorder.close()


def test_distinct_aggregates_and_group_concat_on_sqlite_shards(
    router: Router, world: dict[str, Any]
) -> None:
    """COUNT/SUM(DISTINCT) of a lookup column merge from distinct values on the demo backend
    too (SQLite strings and numbers compare as Python's); GROUP_CONCAT, which SQLite spells
    otherwise, is refused across its shards with a typed error before anything runs."""
    merchants = sorted({u % 5 for u in USERS})
    sql = "SELECT COUNT(DISTINCT merchant_id), SUM(DISTINCT merchant_id), COUNT(*) FROM orders"
    result = router.execute(sql)
    assert len(result.shards) > 1
    assert result.rows == [(len(merchants), sum(merchants), 3 * len(USERS))]
    with pytest.raises(UnsupportedQueryError, match="SQLite"):
        router.execute("SELECT GROUP_CONCAT(order_id ORDER BY order_id) FROM orders")
