"""Issue 7, the write path on real MariaDB shards: lookup cleanup of exactly the deleted rows,
transactions that check every target before running anything, one lookup implementation for the
router and the ORM (case folding, orphans), broadcast rowcounts, async timeouts, and the
lookup check's lock-wait setting not leaking into the pool."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from shard_tables import create_tables, empty_tables
from sqlalchemy import BigInteger, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import (
    CrossShardTransactionError,
    ExecutionError,
    ShardUnavailableError,
    UnsupportedQueryError,
)
from shardrouter.ops import sandbox as sb
from shardrouter.ops.lookups import check_lookups
from shardrouter.orm.session import routed_sessionmaker

pytestmark = pytest.mark.mariadb

DDL = {
    "orders": "CREATE TABLE {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, amount_cents BIGINT NOT NULL, KEY (user_id))",
    "order_items": "CREATE TABLE {t} (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, PRIMARY KEY (order_id, line))",
    "merchant_orders": "CREATE TABLE {t} (merchant_id BIGINT NOT NULL, order_id BIGINT NOT NULL,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)",
    "countries": "CREATE TABLE {t} (code CHAR(2) PRIMARY KEY, name VARCHAR(64) NOT NULL)",
}


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


def _users_on_two_shards(router: Router, start: int = 1000) -> tuple[int, int]:
    shard_of = router.topology.shard_for
    a = start
    b = next(u for u in range(a + 1, a + 10_000) if shard_of("orders", u) != shard_of("orders", a))
    return a, b


_GENERATORS: dict[int, Any] = {}


def _next_order_id(router: Router, user: int) -> int:
    """From one generator per topology: two made in one millisecond would repeat ids."""
    key = id(router.topology)
    if key not in _GENERATORS:
        _GENERATORS[key] = router.topology.id_generator("orders")
    return int(_GENERATORS[key].next_id(user_id=user))


def _add_order(router: Router, user: int, merchant: int, amount: int) -> int:
    order_id = _next_order_id(router, user)
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, :m, :a)",
        {"o": order_id, "u": user, "m": merchant, "a": amount},
    )
    return order_id


def _lookup_row_count(router: Router, merchant: int, order_id: int) -> int:
    return int(
        router.execute(
            "SELECT COUNT(*) FROM merchant_orders WHERE merchant_id = :m AND order_id = :o",
            {"m": merchant, "o": order_id},
        ).scalar()
    )


# -- 2. DELETE's lookup cleanup removes exactly the deleted rows' lookup rows -----------------


def _delete_racing_an_update(router: Router, delete: Any) -> tuple[int, int]:
    """Two orders match the DELETE's WHERE when it starts; a concurrent transaction has moved
    one (``kept``) out of it and commits while the DELETE waits for that row's lock. Returns
    (deleted order, kept order). ``delete()`` runs the DELETE (sync or async)."""
    user, merchant = 4242, 77
    gone = _add_order(router, user, merchant, 10)
    kept = _add_order(router, user, merchant, 20)
    topology = router.topology
    slot = topology.table("orders").primary.slot(user)  # type: ignore[union-attr]
    physical = topology.table("orders").physical(slot)
    engine = router.engines.primary(topology.shard_of_slot(slot))
    with engine.connect() as other:
        other.begin()
        other.execute(
            text(f"UPDATE {physical} SET amount_cents = 500 WHERE order_id = :o"), {"o": kept}
        )
        errors: list[BaseException] = []

        def run() -> None:
            try:
                delete()
            except BaseException as exc:  # re-raised by the test below
                errors.append(exc)

        worker = threading.Thread(target=run)
        worker.start()
        _wait_for_the_delete(other, errors)  # ... which waits for `kept`'s row lock
        other.commit()
        worker.join(30)
    assert not worker.is_alive() and not errors, errors
    return gone, kept


def _wait_for_the_delete(conn: Any, errors: list[BaseException]) -> None:
    """Until the DELETE runs on ``conn``'s server (at most 30 s): it cannot finish before
    ``conn`` commits, as it needs a row ``conn`` holds locked; asked on ``conn`` itself,
    as another connection from the pool could starve the DELETE of one."""
    running = (
        "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE INFO LIKE 'DELETE FROM orders%'"
    )
    deadline = time.monotonic() + 30
    while conn.execute(text(running)).scalar() == 0:
        assert not errors and time.monotonic() < deadline, f"the DELETE did not run: {errors}"
        time.sleep(0.05)
    time.sleep(0.3)  # from running to waiting for the lock


def _check_survivor(router: Router, gone: int, kept: int) -> None:
    survivors = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": 4242})
    assert survivors.scalars() == [kept]
    assert _lookup_row_count(router, 77, kept) == 1  # the survivor keeps its lookup row
    assert _lookup_row_count(router, 77, gone) == 0  # the deleted row's is gone
    by_merchant = router.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 77})
    assert by_merchant.scalars() == [kept]


SQL_DELETE = "DELETE FROM orders WHERE user_id = :u AND amount_cents < 100"


def test_delete_keeps_lookup_rows_of_rows_a_concurrent_update_saved(router: Router) -> None:
    gone, kept = _delete_racing_an_update(router, lambda: router.execute(SQL_DELETE, {"u": 4242}))
    _check_survivor(router, gone, kept)


def test_delete_in_a_transaction_keeps_lookup_rows_of_saved_rows(router: Router) -> None:
    def delete() -> None:
        with router.transaction() as txn:
            assert txn.execute(SQL_DELETE, {"u": 4242}).rowcount == 1

    gone, kept = _delete_racing_an_update(router, delete)
    _check_survivor(router, gone, kept)


def test_async_delete_keeps_lookup_rows_of_rows_a_concurrent_update_saved(
    router: Router,
) -> None:
    async def delete() -> None:
        async with AsyncRouter(router.topology) as aio:
            assert (await aio.execute(SQL_DELETE, {"u": 4242})).rowcount == 1

    gone, kept = _delete_racing_an_update(router, lambda: asyncio.run(delete()))
    _check_survivor(router, gone, kept)


def test_multi_table_delete_of_a_lookup_owner_is_refused(router: Router) -> None:
    order_id = _add_order(router, 4243, 78, 10)
    sql = (
        "DELETE orders FROM order_items JOIN orders ON orders.order_id = order_items.order_id"
        " WHERE orders.user_id = :u"
    )
    with pytest.raises(UnsupportedQueryError, match="multi-table DELETE"):
        router.execute(sql, {"u": 4243})
    assert _lookup_row_count(router, 78, order_id) == 1


# -- 5. a transaction checks every target before running anything -----------------------------


def _amount(router: Router, order_id: int) -> int:
    sql = "SELECT amount_cents FROM orders WHERE order_id = :o"
    return int(router.execute(sql, {"o": order_id}).scalar())


def test_transaction_refuses_a_fan_out_before_running_any_part(router: Router) -> None:
    a, b = _users_on_two_shards(router)
    oa, ob = _add_order(router, a, 1, 10), _add_order(router, b, 1, 10)
    with router.transaction() as txn:
        txn.execute("SELECT COUNT(*) FROM orders WHERE user_id = :a", {"a": a})  # binds a's
        with pytest.raises(CrossShardTransactionError):
            txn.execute(
                "UPDATE orders SET amount_cents = 99 WHERE user_id IN (:a, :b)", {"a": a, "b": b}
            )
    assert (_amount(router, oa), _amount(router, ob)) == (10, 10)  # committed: nothing ran


def test_transaction_insert_for_another_shard_writes_no_lookup_row(router: Router) -> None:
    a, b = _users_on_two_shards(router)
    order_b = _next_order_id(router, b)
    with router.transaction() as txn:
        txn.execute("SELECT COUNT(*) FROM orders WHERE user_id = :a", {"a": a})
        with pytest.raises(CrossShardTransactionError):
            txn.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
                " VALUES (:o, :b, 79, 1)",
                {"o": order_b, "b": b},
            )
    assert _lookup_row_count(router, 79, order_b) == 0


def test_scatter_read_first_is_refused_and_binds_nothing(router: Router) -> None:
    _a, b = _users_on_two_shards(router)
    ob = _add_order(router, b, 1, 10)
    with router.transaction() as txn:
        with pytest.raises(CrossShardTransactionError):
            txn.execute("SELECT COUNT(*) FROM orders")
        assert txn.shard is None
        # ... so the transaction can still go to b's shard, whichever shard is listed first.
        txn.execute("UPDATE orders SET amount_cents = 11 WHERE user_id = :b", {"b": b})
    assert _amount(router, ob) == 11


def test_async_transaction_refuses_a_fan_out_before_running_any_part(router: Router) -> None:
    a, b = _users_on_two_shards(router)
    oa, ob = _add_order(router, a, 1, 10), _add_order(router, b, 1, 10)

    async def run() -> tuple[Any, Any]:
        async with AsyncRouter(router.topology) as aio, aio.transaction() as txn:
            with pytest.raises(CrossShardTransactionError):
                await txn.execute("SELECT COUNT(*) FROM orders")
            first = txn.shard
            await txn.execute("SELECT COUNT(*) FROM orders WHERE user_id = :a", {"a": a})
            with pytest.raises(CrossShardTransactionError):
                await txn.execute(
                    "UPDATE orders SET amount_cents = 99 WHERE user_id IN (:a, :b)",
                    {"a": a, "b": b},
                )
            return first, txn.shard

    first, bound = asyncio.run(run())
    assert first is None and bound == router.topology.shard_for("orders", a)
    assert (_amount(router, oa), _amount(router, ob)) == (10, 10)


def test_transaction_refuses_a_broadcast_write_before_any_copy_changes(router: Router) -> None:
    router.execute("INSERT INTO countries (code, name) VALUES ('DE', 'Germany')")
    with router.transaction() as txn, pytest.raises(CrossShardTransactionError):
        txn.execute("UPDATE countries SET name = 'Z' WHERE code = 'DE'")
    for engine in router.engines.primaries.values():
        with engine.connect() as conn:
            assert conn.execute(text("SELECT name FROM countries")).scalar() == "Germany"


def test_lookup_read_finding_no_owner_does_not_bind_the_transaction(router: Router) -> None:
    first = next(iter(router.topology.shards))  # where an owner-less lookup read runs
    b = next(u for u in range(1000, 10_000) if router.topology.shard_for("orders", u) != first)
    ob = _add_order(router, b, 1, 10)
    with router.transaction() as txn:
        found = txn.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 404})
        assert found.rows == [] and txn.shard is None
        txn.execute("UPDATE orders SET amount_cents = 12 WHERE user_id = :b", {"b": b})
    assert _amount(router, ob) == 12


# -- 11. and 12. unique lookups: one implementation, case folded, orphans refused by name ------


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))


INSERT_USER = "INSERT INTO users (user_id, email) VALUES (:u, :e)"


def _users_with_email(router: Router, email: str) -> list[int]:
    sql = "SELECT user_id FROM users WHERE email = :e ORDER BY user_id"
    return list(router.execute(sql, {"e": email}).scalars())


def test_orm_refuses_an_email_taken_in_another_case(router: Router) -> None:
    router.execute(INSERT_USER, {"u": 5, "e": "Ada@Example.com"})
    with routed_sessionmaker(router)() as session:
        session.add(User(user_id=6, email="ADA@example.com"))
        with pytest.raises(ExecutionError, match="already belongs"):
            session.flush()
        session.rollback()
    assert _users_with_email(router, "ada@example.com") == [5]


def _orphan_email(router: Router, email: str, owner: int) -> None:
    """A user_emails row whose owner does not exist (a crash between the two writes)."""
    topology = router.topology
    slot = topology.slot_for("user_emails", email)
    physical = topology.table("user_emails").physical(slot)
    with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
        conn.execute(text(f"INSERT INTO {physical} VALUES (:e, :u)"), {"e": email, "u": owner})


def _refused_as_orphan(call: Any) -> None:
    """An orphan is not taken over (its owner's insert may be in flight): the refusal names
    the way out, ``check lookups --fix`` (defect 12 is solved by that plus this message)."""
    with pytest.raises(ExecutionError, match="check lookups --fix"):
        call()


def test_router_refuses_an_email_held_by_an_orphan_until_check_lookups_fixes_it(
    router: Router,
) -> None:
    _orphan_email(router, "Grace@Example.com", 999)
    _refused_as_orphan(lambda: router.execute(INSERT_USER, {"u": 7, "e": "grace@example.com"}))
    check_lookups(router, fix=True, grace_s=0)
    router.execute(INSERT_USER, {"u": 7, "e": "grace@example.com"})
    assert _users_with_email(router, "GRACE@example.com") == [7]
    rows = router.execute("SELECT email, user_id FROM user_emails").rows
    assert rows == [("grace@example.com", 7)]
    # a live owner still keeps it
    with pytest.raises(ExecutionError, match="already belongs to another owner"):
        router.execute(INSERT_USER, {"u": 8, "e": "GRACE@example.com"})


def test_orm_refuses_an_email_held_by_an_orphan_until_check_lookups_fixes_it(
    router: Router,
) -> None:
    _orphan_email(router, "hopper@example.com", 998)

    def add() -> None:
        with routed_sessionmaker(router)() as session:
            session.add(User(user_id=9, email="Hopper@example.com"))
            session.commit()

    _refused_as_orphan(add)
    check_lookups(router, fix=True, grace_s=0)
    add()
    assert _users_with_email(router, "hopper@example.com") == [9]


def test_orphan_email_of_an_owner_now_holding_another_address_is_refused_until_fixed(
    router: Router,
) -> None:
    router.execute(INSERT_USER, {"u": 10, "e": "new@example.com"})
    _orphan_email(router, "old@example.com", 10)  # user 10 exists, but not with this address
    _refused_as_orphan(lambda: router.execute(INSERT_USER, {"u": 11, "e": "old@example.com"}))
    check_lookups(router, fix=True, grace_s=0)
    router.execute(INSERT_USER, {"u": 11, "e": "old@example.com"})
    assert _users_with_email(router, "old@example.com") == [11]


def test_email_of_an_owner_being_inserted_is_not_taken_over(router: Router) -> None:
    """The lookup row of an insert still in flight (owner row written, not committed) looks
    like an orphan to a plain read: the locking read sees the insert's row lock and refuses."""
    _orphan_email(router, "lin@example.com", 12)  # written by user 12's insert, which ...
    engine = router.engines.primary(router.topology.shard_for("users", 12))
    with engine.connect() as other:
        other.begin()
        other.execute(text("INSERT INTO users VALUES (12, 'lin@example.com')"))  # ... is open
        with pytest.raises(ExecutionError):
            router.execute(INSERT_USER, {"u": 13, "e": "LIN@example.com"})
        other.commit()
    assert _users_with_email(router, "lin@example.com") == [12]


@pytest.mark.timeout(30)
def test_transaction_reusing_an_email_it_deletes_takes_it_at_once(router: Router) -> None:
    """As one database with a UNIQUE email: the address of the user the transaction deleted
    is free in it (round 5, finding 4; was refused "already belongs", without waiting)."""
    shard_of = router.topology.shard_for
    other = next(u for u in range(15, 10_000) if shard_of("users", u) == shard_of("users", 14))
    router.execute(INSERT_USER, {"u": 14, "e": "kay@example.com"})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": 14})
        txn.execute(INSERT_USER, {"u": other, "e": "kay@example.com"})
    assert _users_with_email(router, "kay@example.com") == [other]


# -- 17. broadcast UPDATE/DELETE report one database's rowcount ------------------------------


def test_broadcast_write_reports_one_shards_rowcount(
    router: Router, caplog: pytest.LogCaptureFixture
) -> None:
    router.execute("INSERT INTO countries (code, name) VALUES ('DE', 'Germany'), ('FR', 'France')")
    assert router.execute("UPDATE countries SET name = 'X' WHERE code = 'DE'").rowcount == 1
    assert router.execute("DELETE FROM countries WHERE code = 'DE'").rowcount == 1
    # A copy that diverged (a row missing on one shard) is reported, not summed away.
    last = list(router.topology.shards)[-1]
    with router.engines.primary(last).begin() as conn:
        conn.execute(text("DELETE FROM countries WHERE code = 'FR'"))
    with caplog.at_level(logging.WARNING, logger="shardrouter"):
        router.execute("UPDATE countries SET name = 'Y' WHERE code = 'FR'")
    assert any("different row counts" in r.getMessage() for r in caplog.records)


def test_async_broadcast_write_reports_one_shards_rowcount(router: Router) -> None:
    router.execute("INSERT INTO countries (code, name) VALUES ('DE', 'Germany')")

    async def run() -> int:
        async with AsyncRouter(router.topology) as aio:
            return (await aio.execute("UPDATE countries SET name = 'X'")).rowcount

    assert asyncio.run(run()) == 1


# -- 22. check lookups --fix leaves the pool's lock wait timeout alone ------------------------


def test_check_lookups_fix_does_not_change_pooled_sessions(router: Router) -> None:
    order_id = _add_order(router, 4244, 80, 10)
    topology = router.topology
    slot = topology.table("orders").primary.slot(4244)  # type: ignore[union-attr]
    with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
        conn.execute(text(f"DELETE FROM {topology.table('orders').physical(slot)}"))
    reports = check_lookups(router, fix=True, grace_s=0)
    assert sum(r.removed for r in reports) == 1 and _lookup_row_count(router, 80, order_id) == 0
    for shard, engine in router.engines.primaries.items():
        configured = topology.shards[shard].pool.lock_wait_s  # what every session starts with
        pooled = engine.pool.checkedin()  # type: ignore[attr-defined]
        conns = [engine.connect() for _ in range(max(1, pooled))]
        try:
            for conn in conns:
                session = conn.execute(text("SELECT @@session.innodb_lock_wait_timeout")).scalar()
                assert session == configured
        finally:
            for conn in conns:
                conn.close()


# -- 20. async transactions and multi-shard writes honour query_timeout_s ---------------------


@pytest.fixture
def two_shards(scratch_dir: Any, scratch_port: int) -> Iterator[tuple[sb.Sandbox, Topology]]:
    box = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    raw = config_from_dict(
        {
            "slots": 1024,
            "shards": {
                s.name: {
                    "primary": s.url,
                    "slots": [[i * 512, (i + 1) * 512]],
                    "pool": {"connect_timeout_s": 2, "timeout_s": 3, "query_timeout_s": 2},
                }
                for i, s in enumerate(box.shards)
            },
            "tables": {"orders": {"column": "user_id", "strategy": "hash"}},
        }
    )
    topology = Topology(raw)
    with Router(topology) as router:
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                conn.execute(
                    text("CREATE TABLE orders (order_id BIGINT PRIMARY KEY, user_id BIGINT)")
                )
    yield box, topology


@pytest.mark.timeout(90)
def test_async_transaction_and_multi_shard_write_fail_within_the_query_timeout(
    two_shards: tuple[sb.Sandbox, Topology],
) -> None:
    box, topology = two_shards
    hung = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s1")
    live = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s0")
    insert = "INSERT INTO orders (order_id, user_id) VALUES (:o, :u)"

    async def run() -> list[float]:
        took = []
        async with AsyncRouter(topology) as aio:
            # pooled connections on both shards exist: the hang is mid-statement
            await aio.execute(insert, {"o": 1, "u": hung})
            await aio.execute(insert, {"o": 2, "u": live})
            sb.pause_shard(box, "s1")
            try:
                started = time.monotonic()
                with pytest.raises(ShardUnavailableError) as err:
                    async with aio.transaction() as txn:
                        await txn.execute(insert, {"o": 3, "u": hung})
                assert err.value.shard == "s1"
                took.append(time.monotonic() - started)
                started = time.monotonic()
                with pytest.raises(ShardUnavailableError):
                    await aio.execute(
                        "INSERT INTO orders (order_id, user_id) VALUES (:a, :la), (:b, :h)",
                        {"a": 4, "la": live, "b": 5, "h": hung},
                    )
                took.append(time.monotonic() - started)
                started = time.monotonic()
                with pytest.raises(ShardUnavailableError):
                    await aio.execute(
                        "UPDATE orders SET order_id = order_id WHERE user_id IN (:l, :h)",
                        {"l": live, "h": hung},
                    )
                took.append(time.monotonic() - started)
                # the live shard keeps serving, and the multi-shard insert left nothing on it
                count = "SELECT COUNT(*) FROM orders WHERE user_id = :u"
                took.append(float((await aio.execute(count, {"u": live})).scalar()))
            finally:
                sb.resume_shard(box, "s1")
        return took

    took = asyncio.run(asyncio.wait_for(run(), 60))
    assert all(t < 8 for t in took[:3]), took
    assert took[3] == 1.0  # only order 2: order 4 was rolled back with the hung part
