"""Issue 7 round 4: lookup rows of a transaction's own owner rows (review 3, findings 1, 2
and 4), on real MariaDB shards.

1. A transaction that inserts an owner row and deletes it again must not keep its lookup row
   (sync, async, XA), also when it inserts the row again with another value; a value it
   deletes and inserts again keeps its row; a rolled-back transaction keeps the lookup rows of
   the rows it deleted.
2. The same in the ORM session (add, flush, delete, commit).
4. An INSERT into a lookup owner that omits a lookup column (the column's DEFAULT would be
   stored with no lookup row) is refused before anything runs; given, it still works.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import BigInteger, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import KeyValueError, UnsupportedQueryError
from shardrouter.ops.lookups import check_lookups
from shardrouter.orm import routed_sessionmaker
from tests.integration import test_issue7_review as _review

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

INSERT_ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
    " VALUES (:o, :u, :m, 1, 'new')"
)
INSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, 'r3', 'mid', 'a', 1)"
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    tier: Mapped[str] = mapped_column(String(8))
    tag: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[int | None] = mapped_column(Integer)


class Order(Base):
    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    merchant_id: Mapped[int | None] = mapped_column(BigInteger)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))


class Base2(DeclarativeBase):
    pass


class OrderWithoutMerchant(Base2):
    """A class that does not map the lookup column orders.merchant_id."""

    __tablename__ = "orders"
    order_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    amount_cents: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16))


def _orphans(router: Router) -> dict[str, list[Any]]:
    return {
        r.lookup_table: [list(o) for o in r.orphans] for r in check_lookups(router) if r.orphans
    }


def _missing(router: Router) -> dict[str, list[Any]]:
    return {
        r.lookup_table: [list(o) for o in r.missing] for r in check_lookups(router) if r.missing
    }


def _merchant_rows(router: Router, merchant: int) -> list[tuple[Any, ...]]:
    """merchant_orders rows of ``merchant`` (read on every shard: where they are is the
    lookup's business)."""
    table = router.topology.table("merchant_orders")
    out: list[tuple[Any, ...]] = []
    for engine in router.engines.primaries.values():
        with engine.connect() as conn:
            for name in table.physical_names:
                out.extend(
                    tuple(r)
                    for r in conn.execute(
                        text(
                            f"SELECT merchant_id, user_id, order_id FROM {name} WHERE"
                            " merchant_id = :m"
                        ),
                        {"m": merchant},
                    )
                )
    return out


# -- finding 1: a transaction's own inserted-then-deleted owner rows -------------------------


def test_insert_then_delete_in_one_transaction_leaves_no_lookup_row(
    world: dict[str, Any],
) -> None:
    """A transaction inserts an order and deletes it again, then commits: one database holds
    no such order, and merchant_orders must hold no row for it."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=25)
    order_id = ids.next_id(user_id=930_001)
    with router.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": order_id, "u": 930_001, "m": 61})
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
    assert router.execute("SELECT order_id FROM orders WHERE user_id = 930001").rows == []
    orphans = _orphans(router).get("merchant_orders", [])
    assert [61, 930_001, order_id] not in orphans, orphans
    assert _merchant_rows(router, 61) == []


def test_async_insert_then_delete_in_one_transaction_leaves_no_lookup_row(
    world: dict[str, Any],
) -> None:
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    ids = router.topology.id_generator("orders", worker_id=26)
    order_id = ids.next_id(user_id=930_002)

    async def run() -> None:
        async with aio.transaction() as txn:
            await txn.execute(INSERT_ORDER, {"o": order_id, "u": 930_002, "m": 62})
            await txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})

    world["loop"].run_until_complete(run())
    orphans = _orphans(router).get("merchant_orders", [])
    assert [62, 930_002, order_id] not in orphans, orphans
    assert _merchant_rows(router, 62) == []


def test_xa_insert_then_delete_in_one_transaction_leaves_no_lookup_row(
    world: dict[str, Any],
) -> None:
    """The same in an XA transaction that also keeps an order on another user's shard."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=28)
    gone, kept = ids.next_id(user_id=930_004), ids.next_id(user_id=930_005)
    with Router(router.topology, xa=True) as xa, xa.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": gone, "u": 930_004, "m": 65})
        txn.execute(INSERT_ORDER, {"o": kept, "u": 930_005, "m": 65})
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": gone})
    assert _merchant_rows(router, 65) == [(65, 930_005, kept)]
    got = router.execute("SELECT order_id FROM orders WHERE merchant_id = 65").rows
    assert got == [(kept,)]


def test_lookup_row_of_a_value_the_transaction_replaced_is_removed(world: dict[str, Any]) -> None:
    """Insert an order for merchant 63, delete it, insert it again for merchant 64, commit:
    only (64, ...) may remain in merchant_orders."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=27)
    order_id = ids.next_id(user_id=930_003)
    with router.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": order_id, "u": 930_003, "m": 63})
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
        txn.execute(INSERT_ORDER, {"o": order_id, "u": 930_003, "m": 64})
    got = router.execute("SELECT order_id FROM orders WHERE merchant_id = 64").rows
    assert got == [(order_id,)]
    orphans = _orphans(router).get("merchant_orders", [])
    assert [63, 930_003, order_id] not in orphans, orphans
    assert _merchant_rows(router, 63) == []


def test_value_deleted_and_inserted_again_keeps_its_lookup_row(world: dict[str, Any]) -> None:
    """Insert, delete, insert again with the same value: the row exists, so does its lookup
    row (and an existing row deleted and inserted again in one transaction keeps its own)."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=29)
    fresh, old = ids.next_id(user_id=930_006), ids.next_id(user_id=930_006)
    router.execute(INSERT_ORDER, {"o": old, "u": 930_006, "m": 66})
    with router.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": fresh, "u": 930_006, "m": 66})
        txn.execute("DELETE FROM orders WHERE user_id = 930006")
        txn.execute(INSERT_ORDER, {"o": fresh, "u": 930_006, "m": 66})
        txn.execute(INSERT_ORDER, {"o": old, "u": 930_006, "m": 66})
    got = router.execute("SELECT order_id FROM orders WHERE merchant_id = 66").rows
    assert sorted(got) == sorted([(fresh,), (old,)])
    assert sorted(_merchant_rows(router, 66)) == sorted([(66, 930_006, fresh), (66, 930_006, old)])


def test_delete_of_an_existing_row_in_a_transaction_removes_its_lookup_row(
    world: dict[str, Any],
) -> None:
    """The cleanup of a committed delete still runs; a rolled-back delete keeps the row."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=30)
    order_id = ids.next_id(user_id=930_007)
    router.execute(INSERT_ORDER, {"o": order_id, "u": 930_007, "m": 67})
    with pytest.raises(RuntimeError), router.transaction() as txn:
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
        raise RuntimeError("roll back")
    assert _merchant_rows(router, 67) == [(67, 930_007, order_id)]
    with router.transaction() as txn:
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
    assert _merchant_rows(router, 67) == []


def test_rolled_back_insert_then_delete_leaves_no_lookup_row(world: dict[str, Any]) -> None:
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=31)
    order_id = ids.next_id(user_id=930_008)
    with pytest.raises(RuntimeError), router.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": order_id, "u": 930_008, "m": 68})
        txn.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
        raise RuntimeError("roll back")
    assert _merchant_rows(router, 68) == []


def test_email_of_a_user_created_and_deleted_in_one_transaction_is_free_again(
    world: dict[str, Any],
) -> None:
    """A sign-up inserted and deleted in one committed transaction must not keep its
    user_emails row, which would refuse the address to everybody else."""
    router: Router = world["router"]
    with router.transaction() as txn:
        txn.execute(INSERT_USER, {"u": 930_010, "e": "r3-orphan@example.com"})
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": 930_010})
    router.execute(INSERT_USER, {"u": 930_011, "e": "r3-orphan@example.com"})
    got = router.execute(
        "SELECT user_id FROM users WHERE email = :e", {"e": "r3-orphan@example.com"}
    ).rows
    assert got == [(930_011,)]


# -- finding 2: the same in the ORM session ---------------------------------------------------


def test_orm_user_added_flushed_and_deleted_in_one_session_frees_its_email(
    world: dict[str, Any],
) -> None:
    """Add a user, flush, delete it, commit: its user_emails row must go, and the next
    sign-up with that address must be accepted."""
    router: Router = world["router"]
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        user = User(user_id=930_020, email="r3-orm@example.com", tier="mid", tag="a")
        session.add(user)
        session.flush()
        session.delete(user)
        session.commit()
    orphans = _orphans(router).get("user_emails", [])
    assert ["r3-orm@example.com", 930_020] not in orphans, orphans
    with sessions() as session:
        session.add(User(user_id=930_021, email="r3-orm@example.com", tier="mid", tag="a"))
        session.commit()


def test_orm_user_deleted_and_added_again_keeps_its_email(world: dict[str, Any]) -> None:
    """Delete a user and add it again (same key, same address) in one session: the row is
    there, and so is its user_emails row (reads by e-mail find it)."""
    router: Router = world["router"]
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.add(User(user_id=930_022, email="r4-again@example.com", tier="mid", tag="a"))
        session.commit()
    with sessions() as session:
        user = session.get(User, 930_022)
        assert user is not None
        session.delete(user)
        session.flush()
        session.add(User(user_id=930_022, email="r4-again@example.com", tier="mid", tag="b"))
        session.commit()
    got = router.execute(
        "SELECT user_id, tag FROM users WHERE email = :e", {"e": "r4-again@example.com"}
    ).rows
    assert got == [(930_022, "b")]
    assert ["r4-again@example.com", 930_022] not in _missing(router).get("user_emails", [])
    with sessions() as session:  # in one flush: SQLAlchemy writes one UPDATE (row switch)
        session.delete(session.get(User, 930_022))
        session.add(User(user_id=930_022, email="r4-again@example.com", tier="mid", tag="c"))
        session.commit()
    got = router.execute(
        "SELECT user_id, tag FROM users WHERE email = :e", {"e": "r4-again@example.com"}
    ).rows
    assert got == [(930_022, "c")]
    assert ["r4-again@example.com", 930_022] not in _missing(router).get("user_emails", [])


def test_orm_deleted_user_frees_its_email_and_rollback_keeps_it(world: dict[str, Any]) -> None:
    """A committed session.delete removes the user's lookup row; a rolled-back one keeps it."""
    router: Router = world["router"]
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.add(User(user_id=930_023, email="r4-del@example.com", tier="mid", tag="a"))
        session.commit()
    with sessions() as session:
        user = session.get(User, 930_023)
        session.delete(user)
        session.flush()
        session.rollback()
    got = router.execute(
        "SELECT user_id FROM users WHERE email = :e", {"e": "r4-del@example.com"}
    ).rows
    assert got == [(930_023,)]
    with sessions() as session:
        session.delete(session.get(User, 930_023))
        session.commit()
    assert (
        router.execute(
            "SELECT user_id FROM users WHERE email = :e", {"e": "r4-del@example.com"}
        ).rows
        == []
    )
    assert ["r4-del@example.com", 930_023] not in _orphans(router).get("user_emails", [])


# -- finding 4: an INSERT that leaves a lookup column to its DEFAULT ---------------------------


@pytest.fixture()
def merchant_default(world: dict[str, Any]) -> Iterator[Router]:
    """orders.merchant_id DEFAULT 7 on every shard for the test (`merchant_id BIGINT NOT NULL
    DEFAULT 0` is an ordinary schema)."""
    router: Router = world["router"]
    orders = router.topology.table("orders").physical_names

    def alter(clause: str) -> None:
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                for name in orders:
                    conn.execute(text(f"ALTER TABLE {name} ALTER merchant_id {clause}"))

    alter("SET DEFAULT 7")
    try:
        yield router
    finally:
        alter("DROP DEFAULT")


def test_insert_without_the_lookup_column_is_refused(merchant_default: Router) -> None:
    """The shard would store the DEFAULT with no merchant_orders row (reads by merchant_id =
    7 would miss it): refused typed at plan time, nothing runs; given, the value works."""
    router = merchant_default
    ids = router.topology.id_generator("orders", worker_id=24)
    order_id = ids.next_id(user_id=976_001)
    sql = (
        "INSERT INTO orders (order_id, user_id, amount_cents, status) VALUES (:o, 976001, 1, 'new')"
    )
    with pytest.raises(UnsupportedQueryError, match="merchant_id") as refused:
        router.planner.plan(sql)
    assert "explicit" in str(refused.value)
    with pytest.raises(UnsupportedQueryError, match="merchant_id"):
        router.execute(sql, {"o": order_id})
    assert router.execute("SELECT order_id FROM orders WHERE user_id = 976001").rows == []
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
        " VALUES (:o, 976001, 7, 1, 'new')",
        {"o": order_id},
    )
    got = router.execute("SELECT order_id FROM orders WHERE merchant_id = 7").rows
    assert (order_id,) in got


def test_async_insert_without_the_lookup_column_is_refused(
    world: dict[str, Any], merchant_default: Router
) -> None:
    aio: AsyncRouter = world["aio"]
    order_id = merchant_default.topology.id_generator("orders", worker_id=23).next_id(
        user_id=976_002
    )
    sql = "INSERT INTO orders (order_id, user_id, status) VALUES (:o, 976002, 'new')"
    with pytest.raises(UnsupportedQueryError, match="merchant_id"):
        world["loop"].run_until_complete(aio.execute(sql, {"o": order_id}))
    rows = merchant_default.execute("SELECT order_id FROM orders WHERE user_id = 976002").rows
    assert rows == []


def test_orm_insert_without_the_lookup_column_is_refused(
    world: dict[str, Any], merchant_default: Router
) -> None:
    """The ORM flush of a class that does not map merchant_id would insert without it:
    refused before anything is written; a class that maps it inserts and is found by it."""
    router = merchant_default
    ids = router.topology.id_generator("orders", worker_id=22)
    first, second = ids.next_id(user_id=976_003), ids.next_id(user_id=976_003)
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.add(
            OrderWithoutMerchant(order_id=first, user_id=976_003, amount_cents=1, status="new")
        )
        with pytest.raises(UnsupportedQueryError, match="merchant_id"):
            session.flush()
    with sessions() as session:  # mapped but not set: NULL cannot be routed (typed, too)
        session.add(Order(order_id=first, user_id=976_003, amount_cents=1, status="new"))
        with pytest.raises(KeyValueError, match="merchant_id"):
            session.flush()
    assert router.execute("SELECT order_id FROM orders WHERE user_id = 976003").rows == []
    with sessions() as session:
        session.add(
            Order(order_id=second, user_id=976_003, merchant_id=7, amount_cents=1, status="new")
        )
        session.commit()
    got = router.execute("SELECT order_id FROM orders WHERE merchant_id = 7").rows
    assert (second,) in got
    assert (first,) not in got
