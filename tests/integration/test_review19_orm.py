"""Review 19: the ORM's lookup-first reads (2bc09d6, RoutedSession._lookup_tokens) on the real
MariaDB sandbox. Reuses test_orm's router/world (users with orders of merchants
FIRST_USER + u % 5).

Found (each failed; fixed since, each passes):
- test_lookup_first_read_of_a_replicated_router_misses_the_sessions_own_order
- test_lookup_first_read_of_a_replicated_router_misses_committed_orders
- test_repeatable_read_inside_a_session_transaction

PASSING (behaviour pinned): the rest.
"""

# ruff: noqa: F811  (the `router` and `world` fixtures are imported from test_orm)
from __future__ import annotations

import copy
import datetime as dt
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, func, or_, select, text
from sqlalchemy.engine import make_url
from test_orm import (  # noqa: F401  (fixtures)
    FIRST_USER,
    USERS,
    Order,
    Recorder,
    User,
    _orders_queried,
    router,
    where_is,
    world,
)

from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.orm.session import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


def _order(oid: int, user: int, merchant: int, amount: int = 5) -> Order:
    return Order(
        order_id=oid,
        user_id=user,
        merchant_id=merchant,
        status="new",
        amount_cents=amount,
        created_at=dt.datetime(2026, 1, 2),
    )


def _expected(world: dict[str, Any], merchants: set[int]) -> list[int]:
    return sorted(o for o, _, m, _ in world["orders"] if m in merchants)


# -- replicas -----------------------------------------------------------------------------------


@pytest.fixture
def lagging(router: Router, shard_databases: Path) -> Iterator[Router]:
    """The same shards, each with a 'replica' that lags: an empty copy of every table."""
    raw = yaml.safe_load(shard_databases.read_text())
    created = []
    for shard in raw["shards"].values():
        url = make_url(shard["primary"])
        lag_db = f"{url.database}_lag19"
        server = create_engine(url.set(database=""))
        with server.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{lag_db}`"))
            conn.execute(text(f"CREATE DATABASE `{lag_db}`"))
            names = conn.execute(
                text("SELECT table_name FROM information_schema.tables WHERE table_schema = :d"),
                {"d": url.database},
            ).scalars()
            for name in list(names):
                conn.execute(
                    text(f"CREATE TABLE `{lag_db}`.`{name}` LIKE `{url.database}`.`{name}`")
                )
        server.dispose()
        created.append(url.set(database=lag_db))
        shard["replicas"] = [url.set(database=lag_db).render_as_string(hide_password=False)]
    path = shard_databases.with_name(shard_databases.stem + "-lag19.yaml")
    path.write_text(yaml.safe_dump(copy.deepcopy(raw), sort_keys=False))
    lag_router = Router(Topology.load(path))  # replica_reads=True: the default
    try:
        yield lag_router
    finally:
        lag_router.close()
        for lag in created:
            server = create_engine(lag.set(database=""))
            with server.begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{lag.database}`"))
            server.dispose()


def test_lookup_first_read_of_a_replicated_router_misses_the_sessions_own_order(
    world: dict[str, Any], lagging: Router
) -> None:
    """FAILS. The session flushed an order (its rows and its lookup row are on the primaries;
    the session reads its own writes on them). _lookup_tokens reads merchant_orders through
    _Runner(self.router) outside any transaction, and Router(replica_reads=True) - the
    default - sends that read to a replica: a lagging replica has no lookup row yet, so the
    session's own order is not found. Before 2bc09d6 the fan-out ran on the session's
    primary connections and found it."""
    merchant = FIRST_USER + 555
    user = USERS[6]
    oid = lagging.topology.id_generator("orders").next_id(user_id=user)
    with routed_sessionmaker(lagging)() as session:
        session.add(_order(oid, user, merchant))
        session.flush()
        found = session.scalars(select(Order.order_id).where(Order.merchant_id == merchant))
        assert found.all() == [oid]
        session.rollback()


def test_lookup_first_read_of_a_replicated_router_misses_committed_orders(
    world: dict[str, Any], lagging: Router
) -> None:
    """FAILS. Same cause: the session's reads are all on the primaries except this one
    lookup read; a lagging replica hides every order whose lookup row it has not got yet.
    (session.get / user_id criteria on the same session do find those orders.)"""
    merchant = FIRST_USER + 3
    with routed_sessionmaker(lagging)() as session:
        found = session.scalars(
            select(Order.order_id).where(Order.merchant_id == merchant).order_by(Order.order_id)
        ).all()
        assert found == _expected(world, {merchant})


# -- one database's answers ---------------------------------------------------------------------


def test_in_list_with_duplicates_and_or_conditions(world: dict[str, Any], router: Router) -> None:
    """PASSES. IN with duplicates; OR with a lookup term (fans out); ORDER BY/LIMIT with a
    lookup IN; empty IN."""
    one, two = FIRST_USER + 1, FIRST_USER + 2
    with world["make"]() as session:
        got = session.scalars(
            select(Order.order_id)
            .where(Order.merchant_id.in_([one, one, two, one]))
            .order_by(Order.order_id)
        ).all()
        assert got == _expected(world, {one, two})
        some_user = next(u for _, u, m, _ in world["orders"] if m != one)
        got = session.scalars(
            select(Order.order_id)
            .where(or_(Order.merchant_id == one, Order.user_id == some_user))
            .order_by(Order.order_id)
        ).all()
        want = sorted(o for o, u, m, _ in world["orders"] if m == one or u == some_user)
        assert got == want
        top = session.scalars(
            select(Order.order_id)
            .where(Order.merchant_id.in_([one, two]))
            .order_by(Order.amount_cents.desc(), Order.order_id)
            .limit(4)
        ).all()
        rows = sorted(
            (r for r in world["orders"] if r[2] in (one, two)), key=lambda r: (-r[3], r[0])
        )
        assert top == [r[0] for r in rows[:4]]
        assert session.scalars(select(Order).where(Order.merchant_id.in_([]))).all() == []
        total = session.scalar(select(func.sum(Order.amount_cents)).where(Order.merchant_id == two))
        assert int(total) == sum(r[3] for r in world["orders"] if r[2] == two)


def test_deleted_order_flushed_is_gone_then_back_after_rollback(
    world: dict[str, Any], router: Router
) -> None:
    """PASSES. A flushed delete: not found by merchant (one database would not); rolled back:
    found again (its lookup row is still there)."""
    one = FIRST_USER + 4
    victim = _expected(world, {one})[0]
    with world["make"]() as session:
        session.delete(session.get(Order, victim))
        session.flush()
        got = session.scalars(select(Order.order_id).where(Order.merchant_id == one)).all()
        assert victim not in got and sorted(got) == _expected(world, {one})[1:]
        session.rollback()
        got = session.scalars(select(Order.order_id).where(Order.merchant_id == one)).all()
        assert sorted(got) == _expected(world, {one})


def test_unique_lookup_value_handed_to_another_user_in_the_session(
    world: dict[str, Any], router: Router
) -> None:
    """PASSES. users.email (user_emails, unique): user A deleted and the email given to a new
    user B in one session, flushed: the email finds B only (the ledger names B; the lookup row
    still names A until the commit)."""
    a = USERS[2]
    email = f"orm-{a}@example.com"
    b = FIRST_USER + 900
    with world["make"]() as session:
        session.delete(session.get(User, a))
        session.flush()
        assert session.scalars(select(User.user_id).where(User.email == email)).all() == []
        session.add(User(user_id=b, email=email))
        session.flush()
        assert session.scalars(select(User.user_id).where(User.email == email)).all() == [b]
        session.rollback()
        assert session.scalars(select(User.user_id).where(User.email == email)).all() == [a]


def test_repeatable_read_inside_a_session_transaction(
    world: dict[str, Any], router: Router
) -> None:
    """FAILS. Inside one session transaction (REPEATABLE READ on each shard), a merchant's
    orders are read; another client deletes one of them (and its lookup row). One database
    (and the fan-out before 2bc09d6, on the session's snapshots) answers the same rows again;
    the lookup-first read takes the lookup table's current state (outside the session's
    transaction) and no longer queries the placement whose snapshot still holds the order."""
    one = FIRST_USER + 1
    # an order of `one` that is alone on its placement (so its placement is then skipped)
    topology = router.topology
    by_place: dict[tuple[str, str], list[int]] = {}
    for oid, user, merchant, _ in world["orders"]:
        if merchant == one:
            route = topology.route("orders", "user_id", user)
            by_place.setdefault((route.shard, route.physical_table), []).append((oid, user))
    alone = [v for v in by_place.values() if len({u for _, u in v}) == 1]
    assert alone, by_place
    victim, victim_user = alone[0][0]
    with world["make"]() as session:
        first = sorted(session.scalars(select(Order.order_id).where(Order.merchant_id == one)))
        assert victim in first
        # the user's orders (all of merchant `one`) and their lookup rows
        router.execute("DELETE FROM orders WHERE user_id = :u", {"u": victim_user})
        again = sorted(session.scalars(select(Order.order_id).where(Order.merchant_id == one)))
        session.rollback()
    assert again == first


def test_in_list_with_null_as_router_execute(world: dict[str, Any], router: Router) -> None:
    """PASSES if the session answers as router.execute does for IN (v, NULL)."""
    one = FIRST_USER + 1
    try:
        want: Any = sorted(
            router.execute(
                "SELECT order_id FROM orders WHERE merchant_id IN (:a, :b)", {"a": one, "b": None}
            ).scalars()
        )
    except Exception as exc:
        want = type(exc)
    with world["make"]() as session:
        try:
            got: Any = sorted(
                session.scalars(
                    select(Order.order_id).where(Order.merchant_id.in_([one, None]))
                ).all()
            )
        except Exception as exc:
            got = type(exc)
    assert got == want
