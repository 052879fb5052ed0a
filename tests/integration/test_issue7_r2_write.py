"""Issue 7, round 2 of the write path on real MariaDB shards (fuzz findings A1 and A13): no
statement that fails and no transaction or ORM session that rolls back leaves a lookup row for
an owner row that does not exist; rows that were there before are kept; ON DUPLICATE KEY UPDATE
keeps no lookup row for a value the row did not take; a discard whose owner appears meanwhile
puts the row back; ``check lookups --fix`` matches the owner's lookup value."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from shard_tables import create_tables, empty_tables
from sqlalchemy import BigInteger, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router, _Runner
from shardrouter.errors import (
    CrossShardTransactionError,
    ExecutionError,
    UnsupportedQueryError,
)
from shardrouter.ops.lookups import check_lookups
from shardrouter.orm.session import routed_sessionmaker
from shardrouter.sql.execution import GuardFailed

pytestmark = pytest.mark.mariadb

DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL DEFAULT 'new',"
    " amount_cents BIGINT NOT NULL, KEY (user_id))",
    "order_items": "CREATE TABLE {t} (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, PRIMARY KEY (order_id, line))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
    "countries": "CREATE TABLE {t} (code CHAR(2) PRIMARY KEY, name VARCHAR(64) NOT NULL)",
}

INSERT_ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, :m, :a)"
)
INSERT_USER = "INSERT INTO users (user_id, email) VALUES (:u, :e)"


@pytest.fixture(scope="module")
def _router(shard_databases: Any) -> Iterator[Router]:
    router = Router(Topology.load(shard_databases), max_fanout=None)
    create_tables(router, DDL)
    yield router
    router.close()


@pytest.fixture
def router(_router: Router) -> Router:
    empty_tables(_router, DDL)
    return _router


_GENERATORS: dict[int, Any] = {}


def _order_id(router: Router, user: int) -> int:
    key = id(router.topology)
    if key not in _GENERATORS:
        _GENERATORS[key] = router.topology.id_generator("orders")
    return int(_GENERATORS[key].next_id(user_id=user))


def _users_on_two_shards(router: Router, start: int = 1000) -> tuple[int, int]:
    shard_of = router.topology.shard_for
    a = start
    b = next(u for u in range(a + 1, a + 10_000) if shard_of("orders", u) != shard_of("orders", a))
    return a, b


def _merchant_rows(router: Router) -> list[tuple[Any, ...]]:
    rows = router.execute("SELECT merchant_id, order_id, user_id FROM merchant_orders").rows
    return sorted(rows)


def _email_rows(router: Router) -> list[tuple[Any, ...]]:
    return sorted(router.execute("SELECT email, user_id FROM user_emails").rows)


def _orphan_merchant_row(router: Router, merchant: int, order_id: int, user: int) -> None:
    """A merchant_orders row whose owner does not exist (a crash between the two writes)."""
    topology = router.topology
    slot = topology.slot_for("merchant_orders", merchant)
    physical = topology.table("merchant_orders").physical(slot)
    with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
        conn.execute(
            text(f"INSERT INTO {physical} VALUES (:m, :o, :u)"),
            {"m": merchant, "o": order_id, "u": user},
        )


# -- A1.1: a failed INSERT removes the lookup rows it wrote ---------------------------------


def test_duplicate_order_insert_leaves_no_lookup_row_for_the_new_merchant(router: Router) -> None:
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 10})
    with pytest.raises(ExecutionError):
        router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 7, "a": 10})
    # the existing order keeps its own lookup row; no row for merchant 7
    assert _merchant_rows(router) == [(1, order, 8)]


def test_duplicate_order_insert_keeps_the_lookup_row_of_the_existing_owner(router: Router) -> None:
    """The same merchant: the lookup row is the existing order's (not created by the failed
    insert, and its owner carries the value): kept."""
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 10})
    with pytest.raises(ExecutionError):
        router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 11})
    assert _merchant_rows(router) == [(1, order, 8)]
    assert router.execute("SELECT order_id FROM orders WHERE merchant_id = 1").scalars() == [order]


def test_duplicate_user_insert_leaves_no_email_row(router: Router) -> None:
    router.execute(INSERT_USER, {"u": 1, "e": "ada@example.com"})
    with pytest.raises(ExecutionError):
        router.execute(INSERT_USER, {"u": 1, "e": "emile@example.com"})
    assert _email_rows(router) == [("ada@example.com", 1)]
    # the address is free for anybody (no orphan blocks it)
    router.execute(INSERT_USER, {"u": 2, "e": "emile@example.com"})
    assert _email_rows(router) == [("ada@example.com", 1), ("emile@example.com", 2)]


def test_failed_insert_keeps_a_lookup_row_that_was_there_before(router: Router) -> None:
    """An orphan left by a crash is not this statement's: the failed insert does not remove it
    (check lookups --fix does)."""
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 10})
    _orphan_merchant_row(router, 7, order, 8)
    with pytest.raises(ExecutionError):
        router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 7, "a": 10})
    assert _merchant_rows(router) == [(1, order, 8), (7, order, 8)]


# -- A1.2: a multi-row INSERT failing part-way --------------------------------------------


def test_multi_row_insert_failing_on_one_shard_leaves_no_lookup_rows(router: Router) -> None:
    a, b = _users_on_two_shards(router)
    taken = _order_id(router, b)
    router.execute(INSERT_ORDER, {"o": taken, "u": b, "m": 1, "a": 10})
    fresh = _order_id(router, a)
    with pytest.raises(ExecutionError):
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
            " VALUES (:o1, :a, 42, 1), (:o2, :b, 43, 1)",
            {"o1": fresh, "a": a, "o2": taken, "b": b},
        )
    assert _merchant_rows(router) == [(1, taken, b)]
    assert router.execute("SELECT COUNT(*) FROM orders").scalar() == 1


def test_multi_row_insert_repeating_a_key_leaves_no_lookup_rows(router: Router) -> None:
    order = _order_id(router, 8)
    with pytest.raises(ExecutionError):
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
            " VALUES (:o, 8, 42, 1), (:o, 8, 42, 1)",
            {"o": order},
        )
    assert _merchant_rows(router) == []


def test_users_insert_failing_on_the_unique_check_removes_the_other_rows(router: Router) -> None:
    router.execute(INSERT_USER, {"u": 1, "e": "ada@example.com"})
    with pytest.raises(ExecutionError, match="already belongs"):
        router.execute(
            "INSERT INTO users (user_id, email) VALUES (:u1, :e1), (:u2, :e2)",
            {"u1": 2, "e1": "zoe@example.com", "u2": 3, "e2": "ADA@example.com"},
        )
    assert _email_rows(router) == [("ada@example.com", 1)]


# -- A1.3 / A1.4: INSERT IGNORE, ON DUPLICATE KEY UPDATE -------------------------------------


def test_insert_ignore_into_a_lookup_owner_is_refused(router: Router) -> None:
    with pytest.raises(UnsupportedQueryError, match="INSERT IGNORE"):
        router.execute(
            "INSERT IGNORE INTO orders (order_id, user_id, merchant_id, amount_cents)"
            " VALUES (:o, 8, 7, 1)",
            {"o": _order_id(router, 8)},
        )
    assert _merchant_rows(router) == []


def test_upsert_of_an_existing_order_adds_no_lookup_row_for_a_merchant_it_keeps_not(
    router: Router,
) -> None:
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 2, "a": 10})
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
        " VALUES (:o, 8, 1, 'paid', 10) ON DUPLICATE KEY UPDATE status = VALUES(status)",
        {"o": order},
    )
    assert router.execute("SELECT merchant_id, status FROM orders").rows == [(2, "paid")]
    assert _merchant_rows(router) == [(2, order, 8)]


def test_upsert_inserting_a_new_order_keeps_its_lookup_row(router: Router) -> None:
    order = _order_id(router, 8)
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
        " VALUES (:o, 8, 1, 'new', 10) ON DUPLICATE KEY UPDATE status = VALUES(status)",
        {"o": order},
    )
    assert _merchant_rows(router) == [(1, order, 8)]
    assert router.execute("SELECT order_id FROM orders WHERE merchant_id = 1").scalars() == [order]


@pytest.mark.parametrize("update", ["merchant_id = VALUES(merchant_id)", "merchant_id = 3"])
def test_upsert_changing_a_lookup_column_is_refused(router: Router, update: str) -> None:
    with pytest.raises(UnsupportedQueryError, match="merchant_id"):
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
            f" VALUES (:o, 8, 1, 10) ON DUPLICATE KEY UPDATE {update}",
            {"o": _order_id(router, 8)},
        )


# -- A13: transactions and sessions that roll back ------------------------------------------


def test_rolled_back_transaction_leaves_no_email_row(router: Router) -> None:
    with pytest.raises(RuntimeError), router.transaction() as txn:
        txn.execute(INSERT_USER, {"u": 77, "e": "new2@example.com"})
        raise RuntimeError("the application gives up")
    assert router.execute("SELECT COUNT(*) FROM users").scalar() == 0
    assert _email_rows(router) == []
    router.execute(INSERT_USER, {"u": 78, "e": "NEW2@example.com"})  # not blocked


def test_transaction_failing_on_another_shard_leaves_no_merchant_row(router: Router) -> None:
    a, b = _users_on_two_shards(router)
    order_b = _order_id(router, b)
    with pytest.raises(CrossShardTransactionError), router.transaction() as txn:
        txn.execute("DELETE FROM orders WHERE user_id = :a", {"a": a})
        txn.execute(INSERT_ORDER, {"o": _order_id(router, a), "u": a, "m": 5, "a": 1})
        txn.execute(INSERT_ORDER, {"o": order_b, "u": b, "m": 1, "a": 1})
    assert _merchant_rows(router) == []
    assert router.execute("SELECT COUNT(*) FROM orders").scalar() == 0


def test_committed_transaction_keeps_its_lookup_rows_and_drops_a_failed_statements(
    router: Router,
) -> None:
    order = _order_id(router, 8)
    with router.transaction() as txn:
        txn.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 1})
        with pytest.raises(ExecutionError):  # duplicate key inside the transaction
            txn.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 9, "a": 1})
        txn.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
            " VALUES (:o, 8, 4, 'paid', 1) ON DUPLICATE KEY UPDATE status = VALUES(status)",
            {"o": order},
        )
    assert _merchant_rows(router) == [(1, order, 8)]
    assert router.execute("SELECT merchant_id, status FROM orders").rows == [(1, "paid")]


def test_async_failed_insert_and_rolled_back_transaction_leave_no_lookup_rows(
    router: Router,
) -> None:
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 10})

    async def main() -> None:
        async with AsyncRouter(router.topology) as arouter:
            with pytest.raises(ExecutionError):
                await arouter.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 7, "a": 10})
            with pytest.raises(RuntimeError):
                async with arouter.transaction() as txn:
                    await txn.execute(INSERT_USER, {"u": 77, "e": "new3@example.com"})
                    raise RuntimeError("rolled back")
            await arouter.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents)"
                " VALUES (:o, 8, 3, 'paid', 10) ON DUPLICATE KEY UPDATE status = VALUES(status)",
                {"o": order},
            )

    asyncio.run(main())
    assert _merchant_rows(router) == [(1, order, 8)]
    assert _email_rows(router) == []


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))


def test_orm_session_rolled_back_after_a_flush_leaves_no_email_row(router: Router) -> None:
    with routed_sessionmaker(router)() as session:
        session.add(User(user_id=21, email="lovelace@example.com"))
        session.flush()
        session.rollback()
    assert _email_rows(router) == []
    with routed_sessionmaker(router)() as session:
        session.add(User(user_id=22, email="Lovelace@example.com"))
        session.commit()
    assert _email_rows(router) == [("Lovelace@example.com", 22)]


def test_orm_session_failing_on_a_duplicate_user_leaves_no_email_row(router: Router) -> None:
    router.execute(INSERT_USER, {"u": 23, "e": "ada@example.com"})
    with routed_sessionmaker(router)() as session:
        session.add(User(user_id=23, email="turing@example.com"))
        with pytest.raises(Exception, match="Duplicate"):
            session.commit()
    assert _email_rows(router) == [("ada@example.com", 23)]


# -- the discard and check lookups --fix -----------------------------------------------------


def test_discard_keeps_the_row_when_its_owner_appears_after_the_check(
    router: Router,
) -> None:
    """The owner's insert lands between the discard's first owner check and its delete (its
    lookup write found the row there): the delete and a second owner check run in one write,
    which sees the owner and rolls back, so the owner is not left without its lookup row (and
    the row was never absent for another writer to take)."""
    from shardrouter.sql.execution import discard_lookups, lookup_rows

    order = _order_id(router, 8)
    owner = {"order_id": order, "user_id": 8, "merchant_id": 7}
    table = router.topology.table("orders")
    rows = lookup_rows(router.topology, table, [owner])
    _orphan_merchant_row(router, 7, order, 8)
    runner = _Runner(router)
    step = discard_lookups(router.topology, rows)
    checks = next(step)
    together = step.send(runner.run(checks))  # the owner is absent: the row is to go
    # the concurrent insert of this very order commits now
    shard = router.topology.shard_for("orders", 8)
    physical = table.physical(router.topology.slot_for("orders", 8))
    with router.engines.primary(shard).begin() as conn:
        conn.execute(
            text(
                f"INSERT INTO {physical} (order_id, user_id, merchant_id, amount_cents)"
                " VALUES (:o, 8, 7, 1)"
            ),
            {"o": order},
        )
    with pytest.raises(GuardFailed):
        runner.run(together)  # the delete, then the owner: there, so all rolled back
    with pytest.raises(StopIteration) as stop:
        step.throw(GuardFailed("owner there"))
    assert stop.value.value == 0
    assert _merchant_rows(router) == [(7, order, 8)]


def test_check_lookups_fix_removes_an_orphan_whose_owner_has_another_value(
    router: Router,
) -> None:
    order = _order_id(router, 8)
    router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 1, "a": 10})
    _orphan_merchant_row(router, 7, order, 8)  # order exists, but with merchant 1
    reports = check_lookups(router, fix=True, grace_s=0)
    merchants = next(r for r in reports if r.lookup_table == "merchant_orders")
    assert merchants.removed == 1
    assert _merchant_rows(router) == [(1, order, 8)]


def test_insert_writes_again_a_lookup_row_a_discard_removed_before_its_owner_landed(
    router: Router,
) -> None:
    """The other side: the insert found its lookup row there (an orphan, adopted), a discard
    removed it before the owner row landed. The insert checks its adopted rows under lock in
    the owner rows' own write, finds it gone, rolls the owner row back and runs again: the
    row is written (created) and the owner lands."""
    from sqlalchemy import event

    order = _order_id(router, 8)
    _orphan_merchant_row(router, 7, order, 8)
    topology = router.topology
    slot = topology.slot_for("merchant_orders", 7)
    lookup_engine = router.engines.primary(topology.shard_of_slot(slot))
    physical = topology.table("merchant_orders").physical(slot)
    owner_engine = router.engines.primary(topology.shard_for("orders", 8))

    removed: list[int] = []

    def discard_meanwhile(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("INSERT INTO orders_") and not removed:
            with lookup_engine.begin() as other:
                deleted = other.execute(
                    text(f"DELETE FROM {physical} WHERE order_id = :o"), {"o": order}
                )
                removed.append(deleted.rowcount)

    event.listen(owner_engine, "before_cursor_execute", discard_meanwhile)
    try:
        router.execute(INSERT_ORDER, {"o": order, "u": 8, "m": 7, "a": 1})
    finally:
        event.remove(owner_engine, "before_cursor_execute", discard_meanwhile)
    assert removed == [1]
    assert _merchant_rows(router) == [(7, order, 8)]


def test_orm_savepoint_is_refused(router: Router) -> None:
    """horizontal_shard flushes through the root transaction (no SAVEPOINT): a savepoint
    rolled back kept its owner rows and their lookup rows."""
    with routed_sessionmaker(router)() as session:
        session.add(User(user_id=24, email="kept@example.com"))
        with pytest.raises(UnsupportedQueryError, match="savepoint"):
            session.begin_nested()
        session.commit()
    assert _email_rows(router) == [("kept@example.com", 24)]


def test_committed_transaction_writes_its_lookup_rows_again(router: Router) -> None:
    """A lookup row removed while the transaction was open (check lookups --fix took it for
    an orphan: its owner row was not there yet) is written again when the transaction
    commits."""
    topology = router.topology
    slot = topology.slot_for("user_emails", "long@example.com")
    physical = topology.table("user_emails").physical(slot)
    with router.transaction() as txn:
        txn.execute(INSERT_USER, {"u": 31, "e": "long@example.com"})
        with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
            conn.execute(text(f"DELETE FROM {physical}"))
    assert _email_rows(router) == [("long@example.com", 31)]
