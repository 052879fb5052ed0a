"""Issue 7, review 5, on real MariaDB shards (the module ``world`` of test_issue7_review):
cancellation at every point of async writes (owner and lookup rows together; nothing checked
out or left open), the transaction's own lookup claims and their takeover, the ENUM probe of
split tables, and the lock-wait rules. Fixed findings: an async single-shard DELETE cancelled
during its commit left the lookup row of a deleted user (its commit now runs to its end, as a
multi-shard write's does); a URL init_command kept the server's 50 s lock wait. The other
tests are attacks that held, kept as guards. (Findings 2 and 3, the settle's window after the
commit, are fixed and tested in test_issue7_r7_settle.py.)"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import BigInteger, Integer, String, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ConfigError, LockConflictError, ShardRouterError
from shardrouter.orm import routed_sessionmaker
from tests.integration import test_issue7_review as _review

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(240)]

INSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, 'r5', 'mid', 'x', 1)"
)


def _run(world: dict[str, Any], coro: Any) -> Any:
    return world["loop"].run_until_complete(coro)


def _lookup(router: Router, email: str) -> list[Any]:
    sql = "SELECT email, user_id FROM user_emails WHERE email = :e"
    return [tuple(r) for r in router.execute(sql, {"e": email}).rows]


def _user(router: Router, user: int) -> list[Any]:
    sql = "SELECT user_id, email FROM users WHERE user_id = :u"
    return [tuple(r) for r in router.execute(sql, {"u": user}).rows]


def _same_shard_user(router: Router, user: int) -> int:
    home = router.route_key(user_id=user)[0]
    return next(u for u in range(user + 1, user + 1000) if router.route_key(user_id=u)[0] == home)


def _scores(router: Router) -> dict[int, Any]:
    sql = "SELECT user_id, score FROM users WHERE user_id < 900000"
    return {r[0]: r[1] for r in router.execute(sql).rows}


def _checked_out(aio: AsyncRouter) -> int:
    return sum(e.sync_engine.pool.checkedout() for e in aio._snap.engines.all)  # type: ignore[attr-defined]


def _open_server_transactions(router: Router) -> int:
    n = 0
    for engine in router.engines.primaries.values():
        with engine.connect() as conn:
            n += conn.execute(
                text("SELECT COUNT(*) FROM information_schema.innodb_trx")
            ).scalar_one()
    return n


async def _cancel_after(coro: Any, delay: float) -> str:
    task = asyncio.ensure_future(coro)
    await asyncio.sleep(delay)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        return "cancelled"
    except Exception as exc:  # reported in the outcome
        return f"error {type(exc).__name__}: {exc}"
    return "done"


DELAYS = [i * 0.0007 for i in range(40)]
FINE = [i * 0.0003 for i in range(60)]


def test_an_async_insert_cancelled_anywhere_leaves_owner_and_lookup_together(
    world: dict[str, Any],
) -> None:
    """An async INSERT of a user cancelled at every point of its run: afterwards the users row
    and its user_emails row exist together or not at all, no connection stays checked out and
    no transaction stays open on a shard."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    bad = []
    for n, delay in enumerate(DELAYS):
        user, email = 950_000 + n, f"r5-fuzz-{n}@example.com"
        outcome = _run(
            world, _cancel_after(aio.execute(INSERT_USER, {"u": user, "e": email}), delay)
        )
        _run(world, asyncio.sleep(0.05))
        owner, lookup = _user(router, user), _lookup(router, email)
        state = (bool(owner), lookup)
        if state not in ((False, []), (True, [(email, user)])):
            bad.append((delay, outcome, owner, lookup))
        out = _checked_out(aio)
        if out:
            bad.append((delay, outcome, "checked out", out))
        trx = _open_server_transactions(router)
        if trx:
            bad.append((delay, outcome, "open transactions", trx))
    assert bad == []


def test_an_async_takeover_cancelled_anywhere_leaves_one_owner_of_the_value(
    world: dict[str, Any],
) -> None:
    """In an AsyncTransaction user A is deleted and user B inserted with A's e-mail (a value
    the transaction freed), then committed; the whole is cancelled at every point of its run.
    Afterwards exactly one of A, B exists and the user_emails row of the e-mail names it; no
    connection checked out, no transaction open on a shard."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    bad = []
    for n, delay in enumerate(DELAYS):
        a = 2_000_000 + 1000 * n
        b = _same_shard_user(router, a)
        email = f"r5-take-{n}@example.com"
        router.execute(INSERT_USER, {"u": a, "e": email})

        async def swap(a: int = a, b: int = b, email: str = email) -> None:
            async with aio.transaction() as txn:
                await txn.execute("DELETE FROM users WHERE user_id = :u", {"u": a})
                await txn.execute(INSERT_USER, {"u": b, "e": email})

        outcome = _run(world, _cancel_after(swap(), delay))
        _run(world, asyncio.sleep(0.05))
        owners = _user(router, a) + _user(router, b)
        lookup = _lookup(router, email)
        if len(owners) != 1 or lookup != [(email, owners[0][0])]:
            bad.append((delay, outcome, owners, lookup))
        out = _checked_out(aio)
        if out:
            bad.append((delay, outcome, "checked out", out))
        trx = _open_server_transactions(router)
        if trx:
            bad.append((delay, outcome, "open transactions", trx))
    assert bad == []


def test_a_failed_insert_of_a_freed_value_does_not_take_it(world: dict[str, Any]) -> None:
    """In one transaction user A (e-mail e) is deleted, then an INSERT of the existing user B
    with e fails (duplicate key: B exists, with another e-mail) and is undone; the
    transaction commits. One database: A is gone, B keeps its own e-mail, e belongs to nobody
    and a new user C can take it. Expected: no user_emails row of e (or one naming nobody
    live), C's insert succeeds."""
    router: Router = world["router"]
    a = 970_001
    b = _same_shard_user(router, a)
    c = 970_500
    e, other = "r5-failed-take@example.com", "r5-failed-take-b@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    router.execute(INSERT_USER, {"u": b, "e": other})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": a})
        with pytest.raises(ShardRouterError):
            txn.execute(INSERT_USER, {"u": b, "e": e})  # B exists: duplicate key
    assert _user(router, a) == [] and _user(router, b) == [(b, other)]
    looked_up = _lookup(router, e)
    router.execute(INSERT_USER, {"u": c, "e": e})  # one database: accepted
    assert _lookup(router, e) == [(e, c)], looked_up


def _other_shard_user(router: Router, user: int) -> int:
    home = router.route_key(user_id=user)[0]
    return next(u for u in range(user + 1, user + 1000) if router.route_key(user_id=u)[0] != home)


@pytest.mark.parametrize("commit", [True, False], ids=["commit", "rollback"])
def test_xa_takeover_of_a_freed_value_across_shards(world: dict[str, Any], commit: bool) -> None:
    """Router(xa=True): user A (e-mail e) deleted on one shard, user B inserted with e on
    another, in one transaction. Committed: B holds e (its user_emails row names B); rolled
    back: A holds it, B does not exist."""
    router: Router = world["router"]
    xa = Router(router.topology, xa=True)
    try:
        a = 975_001 if commit else 976_001
        b = _other_shard_user(router, a)
        e = f"r5-xa-{int(commit)}@example.com"
        router.execute(INSERT_USER, {"u": a, "e": e})

        class Undo(Exception):
            pass

        try:
            with xa.transaction() as txn:
                txn.execute("DELETE FROM users WHERE user_id = :u", {"u": a})
                txn.execute(INSERT_USER, {"u": b, "e": e})
                if not commit:
                    raise Undo
        except Undo:
            pass
        owner = b if commit else a
        gone = a if commit else b
        assert _user(router, gone) == []
        assert _user(router, owner) == [(owner, e)]
        assert _lookup(router, e) == [(e, owner)]
        rows = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": e}).rows
        assert [tuple(r) for r in rows] == [(owner,)]
    finally:
        xa.close()


def test_an_async_delete_cancelled_anywhere_leaves_owner_and_lookup_together(
    world: dict[str, Any],
) -> None:
    """An async DELETE of a user cancelled at every point: the users row and its user_emails
    row go together or stay together; nothing checked out or left open."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    bad = []
    for n, delay in enumerate(FINE):
        user, email = 980_000 + n, f"r5-del-{n}@example.com"
        router.execute(INSERT_USER, {"u": user, "e": email})
        sql = "DELETE FROM users WHERE user_id = :u"
        outcome = _run(world, _cancel_after(aio.execute(sql, {"u": user}), delay))
        _run(world, asyncio.sleep(0.05))
        owner, lookup = _user(router, user), _lookup(router, email)
        if (bool(owner), lookup) not in ((False, []), (True, [(email, user)])):
            bad.append((delay, outcome, owner, lookup))
        for what, count in (
            ("checked out", _checked_out(aio)),
            ("open", _open_server_transactions(router)),
        ):
            if count:
                bad.append((delay, outcome, what, count))
    assert bad == []


def test_an_async_scatter_update_cancelled_anywhere_is_all_or_nothing(
    world: dict[str, Any],
) -> None:
    """An async UPDATE of every shard's users (outside a transaction: all commit or none)
    cancelled at every point: every row updated or none; nothing checked out or left open."""
    router: Router = world["router"]
    aio = AsyncRouter(router.topology, allow_scatter_write=True, max_fanout=None)
    bad = []
    for n, delay in enumerate(FINE):
        sql = "UPDATE users SET score = :s WHERE user_id < 900000"
        before = _scores(router)
        outcome = _run(world, _cancel_after(aio.execute(sql, {"s": 1000 + n}), delay))
        _run(world, asyncio.sleep(0.05))
        after = _scores(router)
        if after != before and set(after.values()) != {1000 + n}:
            bad.append((delay, outcome, "half applied", sorted(set(after.values()), key=str)))
        for what, count in (
            ("checked out", _checked_out(aio)),
            ("open", _open_server_transactions(router)),
        ):
            if count:
                bad.append((delay, outcome, what, count))
    _run(world, aio.close())
    assert bad == []


def test_a_url_init_command_keeps_the_lock_wait_below_the_answer_timeout(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """A shard URL with its own init_command (any session setup, here sql_mode) and no
    lock_wait_timeout_s: the router's session setup, which sets the lock wait below the
    answer timeout, is dropped, and the server's innodb_lock_wait_timeout (50 s by default)
    applies. With query_timeout_s: 3 an UPDATE of a row another session holds then ends in the
    read timeout: ShardUnavailableError ("shard down") for a healthy shard, instead of
    LockConflictError ("retry"). Expected: LockConflictError, or the config refused (as it is
    when lock_wait_timeout_s is set together with init_command)."""
    router: Router = world["router"]
    raw = yaml.safe_load(Path(shard_databases).read_text())
    for shard in raw["shards"].values():
        url = make_url(shard["primary"])
        setup = "SET SESSION sql_mode = 'STRICT_TRANS_TABLES'"
        shard["primary"] = url.update_query_dict({"init_command": setup}).render_as_string(
            hide_password=False
        )
        shard["pool"] = {"connect_timeout_s": 2, "timeout_s": 3, "query_timeout_s": 3}
    try:
        topology = Topology(config_from_dict(raw))
    except ConfigError:
        return  # refused: the other acceptable answer
    user = world["data"]["users"][9]["user_id"]
    slot = router.topology.slot_for("users", user)
    physical = router.topology.table("users").physical(slot)
    holder = router.engines.primary(router.topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    holder.execute(text(f"UPDATE {physical} SET score = score WHERE user_id = :u"), {"u": user})
    other = Router(topology)
    try:
        with pytest.raises(LockConflictError):
            other.execute("UPDATE users SET score = score WHERE user_id = :u", {"u": user})
    finally:
        trans.rollback()
        holder.close()
        other.close()


def _server_connections(router: Router) -> int:
    n = 0
    for engine in router.engines.primaries.values():
        database = engine.url.database
        with engine.connect() as conn:
            sql = "SELECT COUNT(*) FROM information_schema.processlist WHERE db = :d AND id <> CONNECTION_ID()"
            n += conn.execute(text(sql), {"d": database}).scalar_one()
    return n


def test_async_reads_cancelled_anywhere_leave_no_connection_open(world: dict[str, Any]) -> None:
    """A fresh AsyncRouter's first reads (a point read, a scatter read) cancelled at every
    point, connecting included, then the router closed: no connection of it stays open on the
    shards."""
    router: Router = world["router"]
    user = world["data"]["users"][3]["user_id"]
    base = _server_connections(router)
    bad = []
    for delay in FINE:
        aio = AsyncRouter(router.topology, max_fanout=None)
        point = aio.execute("SELECT * FROM users WHERE user_id = :u", {"u": user})
        outcome = _run(world, _cancel_after(point, delay))
        scatter = aio.execute("SELECT name, COUNT(*) FROM users GROUP BY name")
        outcome2 = _run(world, _cancel_after(scatter, delay))
        _run(world, aio.close())
        _run(world, asyncio.sleep(0.05))
        now = _server_connections(router)
        if now > base:
            bad.append((delay, outcome, outcome2, now - base))
    assert bad == []


@pytest.mark.parametrize("kind", ["insert", "delete"])
def test_an_async_transaction_cancelled_anywhere_keeps_owner_and_lookup_together(
    world: dict[str, Any], kind: str
) -> None:
    """An AsyncTransaction that inserts (or deletes) one user and commits, cancelled at every
    point: the users row and its user_emails row together or not at all afterwards."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    bad = []
    for n, delay in enumerate(FINE):
        user, email = 3_000_000 + 100 * n + (kind == "delete"), f"r5-txn-{kind}-{n}@example.com"
        if kind == "delete":
            router.execute(INSERT_USER, {"u": user, "e": email})

        async def work(user: int = user, email: str = email) -> None:
            async with aio.transaction() as txn:
                if kind == "delete":
                    await txn.execute("DELETE FROM users WHERE user_id = :u", {"u": user})
                else:
                    await txn.execute(INSERT_USER, {"u": user, "e": email})

        outcome = _run(world, _cancel_after(work(), delay))
        _run(world, asyncio.sleep(0.05))
        owner, lookup = _user(router, user), _lookup(router, email)
        if (bool(owner), lookup) not in ((False, []), (True, [(email, user)])):
            bad.append((delay, outcome, owner, lookup))
        for what, count in (
            ("checked out", _checked_out(aio)),
            ("open", _open_server_transactions(router)),
        ):
            if count:
                bad.append((delay, outcome, what, count))
    assert bad == []


class _Base(DeclarativeBase):
    pass


class _User(_Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    tier: Mapped[str] = mapped_column(String(8))
    tag: Mapped[str] = mapped_column(String(32))
    name: Mapped[str | None] = mapped_column(String(64))
    score: Mapped[int | None] = mapped_column(Integer)


def test_orm_takeover_undone_by_a_savepoint_is_not_handed_over(world: dict[str, Any]) -> None:
    """ORM: user A deleted and flushed; in a SAVEPOINT (begin_nested) user B is added with A's
    e-mail and flushed, then the savepoint is rolled back; the session commits. One database:
    A gone, B never existed, the e-mail free. Expected: no user_emails row naming B (or none
    at all), and a new user C can take the e-mail (or begin_nested refused typed)."""
    router: Router = world["router"]
    a = 985_001
    b = _same_shard_user(router, a)
    c = 985_700
    e = "r5-orm-savepoint@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.delete(session.get(_User, a))
        session.flush()
        try:
            nested = session.begin_nested()
        except ShardRouterError:
            return  # refused typed: acceptable
        session.add(_User(user_id=b, email=e, tier="mid", tag="a"))
        session.flush()
        nested.rollback()
        session.commit()
    assert _user(router, a) == [] and _user(router, b) == []
    assert (e, b) not in _lookup(router, e), _lookup(router, e)
    router.execute(INSERT_USER, {"u": c, "e": e})  # one database: accepted
    assert _lookup(router, e) == [(e, c)]


def test_orm_takeover_rolled_back_leaves_the_original_owner(world: dict[str, Any]) -> None:
    """ORM: user A deleted and flushed, user B added with A's e-mail and flushed, then the
    session rolls back: A keeps its e-mail and its user_emails row."""
    router: Router = world["router"]
    a = 986_001
    b = _same_shard_user(router, a)
    e = "r5-orm-rollback@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.delete(session.get(_User, a))
        session.flush()
        session.add(_User(user_id=b, email=e, tier="mid", tag="a"))
        session.flush()
        session.rollback()
    assert _user(router, a) == [(a, e)] and _user(router, b) == []
    assert _lookup(router, e) == [(e, a)]


def test_a_takeover_undone_by_a_user_savepoint_is_not_handed_over(world: dict[str, Any]) -> None:
    """A Transaction: user A deleted; SAVEPOINT; user B inserted with A's e-mail; ROLLBACK TO
    SAVEPOINT; commit. One database: A gone, B never existed, the e-mail free. Expected: the
    SAVEPOINT statements refused typed, or no user_emails row naming B and C can take it."""
    router: Router = world["router"]
    a = 987_001
    b = _same_shard_user(router, a)
    c = 987_700
    e = "r5-user-savepoint@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": a})
        try:
            txn.execute("SAVEPOINT s1")
        except ShardRouterError:
            return  # refused typed: acceptable
        txn.execute(INSERT_USER, {"u": b, "e": e})
        txn.execute("ROLLBACK TO SAVEPOINT s1")
    assert _user(router, a) == [] and _user(router, b) == []
    assert (e, b) not in _lookup(router, e), _lookup(router, e)
    router.execute(INSERT_USER, {"u": c, "e": e})
    assert _lookup(router, e) == [(e, c)]


from tests.integration import test_issue7_r5_enum_split as _enum  # noqa: E402

orders_with_enum = _enum.orders_with_enum  # prio ENUM on orders; merchant 900 on two splits


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT order_id, prio FROM orders WHERE merchant_id = :m ORDER BY prio, order_id"
        " FOR UPDATE",
        "SELECT order_id, status FROM orders WHERE merchant_id = :m ORDER BY status, order_id"
        " FOR UPDATE",
        "SELECT order_id, prio FROM orders WHERE merchant_id = :m ORDER BY prio, order_id"
        " LIMIT 2 OFFSET 1",
        "SELECT prio, COUNT(*) FROM orders WHERE merchant_id = :m AND prio IS NOT NULL"
        " GROUP BY prio ORDER BY COUNT(*), prio",
    ],
    ids=["enum_for_update", "varchar_for_update", "enum_offset", "enum_group_count"],
)
def test_one_shards_splits_in_a_transaction_answer_as_one_database(
    world: dict[str, Any], orders_with_enum: None, sql: str
) -> None:
    """Merchant 900's orders: one shard, two splits (a UNION ALL with its probe), read in a
    Transaction, an AsyncTransaction and outside: the oracle's rows or a typed ENUM refusal."""
    router: Router = world["router"]
    params = {"m": _enum.MERCHANT}
    want = _enum._oracle(world, sql, params)
    outcomes: list[Any] = []

    def attempt(call: Any) -> None:
        try:
            outcomes.append([tuple(r) for r in call().rows])
        except ShardRouterError as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")

    for _ in range(2):
        attempt(lambda: router.execute(sql, params))
        with router.transaction() as txn:
            attempt(lambda txn=txn: txn.execute(sql, params))

        async def in_async() -> Any:
            async with world["aio"].transaction() as atxn:
                return await atxn.execute(sql, params)

        attempt(lambda: _run(world, in_async()))
    for outcome in outcomes:
        refused = "ENUM or SET" in str(outcome) or "locking read" in str(outcome)
        assert outcome == want or refused, (outcome, want)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT MIN(prio), MAX(prio) FROM orders",
        "SELECT user_id, MIN(prio), MAX(prio) FROM orders GROUP BY user_id ORDER BY user_id",
        "SELECT GROUP_CONCAT(prio ORDER BY prio) FROM orders WHERE merchant_id = 900",
        "SELECT prio FROM orders WHERE merchant_id = 900 ORDER BY prio DESC LIMIT 1",
        "SELECT COUNT(DISTINCT prio) FROM orders",
        "SELECT MAX(prio) FROM orders WHERE merchant_id = 900",
    ],
    ids=["min_max", "min_max_grouped", "group_concat", "top1", "count_distinct", "max_lookup"],
)
def test_enum_aggregates_over_splits_answer_as_one_database(
    world: dict[str, Any], orders_with_enum: None, sql: str
) -> None:
    """Aggregates of the ENUM prio across shards and splits: the oracle's answer, or refused."""
    for _ in range(2):
        _review.check(world, sql, ordered="ORDER BY" in sql)


@pytest.mark.parametrize("where", ["autocommit", "transaction", "async"])
def test_a_failed_insert_of_an_existing_owner_leaves_no_lookup_row(
    world: dict[str, Any], where: str
) -> None:
    """INSERT of user X, who exists with e-mail e1, with a fresh e-mail e3: duplicate key.
    One database: nothing written, e3 free. Expected: no user_emails row (e3, X), and a new
    user C can take e3."""
    router: Router = world["router"]
    base = {"autocommit": 993_001, "transaction": 993_101, "async": 993_201}[where]
    x, c = base, base + 50
    e1, e3 = f"r5-dup-{where}@example.com", f"r5-dup-new-{where}@example.com"
    router.execute(INSERT_USER, {"u": x, "e": e1})
    with pytest.raises(ShardRouterError):
        if where == "autocommit":
            router.execute(INSERT_USER, {"u": x, "e": e3})
        elif where == "transaction":
            with router.transaction() as txn:
                txn.execute(INSERT_USER, {"u": x, "e": e3})
        else:
            _run(world, world["aio"].execute(INSERT_USER, {"u": x, "e": e3}))
    assert _user(router, x) == [(x, e1)]
    left = _lookup(router, e3)
    assert left == [], left
    router.execute(INSERT_USER, {"u": c, "e": e3})


@pytest.mark.parametrize(("query", "lock"), [(1.5, 1), (2.0, None), (2.5, None), (2.0, 1)], ids=str)
def test_a_held_row_near_the_lock_wait_boundary_is_a_conflict(
    world: dict[str, Any], shard_databases: Any, query: float, lock: int | None
) -> None:
    """Configs just inside the lock wait rules (lock wait strictly below the answer timeout):
    an UPDATE of a row another session holds ends in LockConflictError, sync and async, never
    ShardUnavailableError."""
    router: Router = world["router"]
    raw = yaml.safe_load(Path(shard_databases).read_text())
    pool: dict[str, Any] = {"connect_timeout_s": 2, "timeout_s": 3, "query_timeout_s": query}
    if lock is not None:
        pool["lock_wait_timeout_s"] = lock
    for shard in raw["shards"].values():
        shard["pool"] = pool
    topology = Topology(config_from_dict(raw))
    user = world["data"]["users"][11]["user_id"]
    slot = router.topology.slot_for("users", user)
    physical = router.topology.table("users").physical(slot)
    holder = router.engines.primary(router.topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    holder.execute(text(f"UPDATE {physical} SET score = score WHERE user_id = :u"), {"u": user})
    sql = "UPDATE users SET score = score WHERE user_id = :u"
    outcomes = []
    other = Router(topology)

    async def in_async() -> None:
        async with AsyncRouter(topology) as aio:
            await aio.execute(sql, {"u": user})

    try:
        for call in (
            lambda: other.execute(sql, {"u": user}),
            lambda: _run(world, in_async()),
        ):
            try:
                call()
                outcomes.append("updated")
            except ShardRouterError as exc:
                outcomes.append(type(exc).__name__)
    finally:
        trans.rollback()
        holder.close()
        other.close()
    assert outcomes == ["LockConflictError", "LockConflictError"]


def test_a_value_freed_and_handed_over_cannot_be_taken_in_between(world: dict[str, Any]) -> None:
    """T deletes A (e) and D (e2), inserts B with e, commits; its settling is stalled before
    the hand-over (D's lookup row held). Another writer inserting C with e meanwhile is refused
    typed (B holds e for every reader once T committed); after the settling, e's row names B."""
    import threading

    router: Router = world["router"]
    topology = router.topology
    a = 994_001
    b = _same_shard_user(router, a)
    d = _same_shard_user(router, b)
    c = 994_900
    e, e2 = "r5-between@example.com", "r5-between-d@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    router.execute(INSERT_USER, {"u": d, "e": e2})
    slot = topology.slot_for("user_emails", e2)
    physical = topology.table("user_emails").physical(slot)
    holder = router.engines.primary(topology.shard_of_slot(slot)).connect()
    hold = holder.begin()
    holder.execute(text(f"SELECT * FROM {physical} WHERE email = :e FOR UPDATE"), {"e": e2})
    errors: list[BaseException] = []

    def swap() -> None:
        try:
            with router.transaction() as txn:
                txn.execute("DELETE FROM users WHERE user_id = :u", {"u": a})
                txn.execute("DELETE FROM users WHERE user_id = :u", {"u": d})
                txn.execute(INSERT_USER, {"u": b, "e": e})
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=swap)
    thread.start()
    try:
        for _ in range(100):
            if _user(router, b):
                break
            _run(world, asyncio.sleep(0.05))
        with pytest.raises(ShardRouterError):
            router.execute(INSERT_USER, {"u": c, "e": e})
    finally:
        hold.rollback()
        holder.close()
        thread.join()
    assert errors == []
    assert _user(router, c) == [] and _user(router, b) == [(b, e)]
    assert _lookup(router, e) == [(e, b)]
    rows = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": e}).rows
    assert [tuple(r) for r in rows] == [(b,)]
