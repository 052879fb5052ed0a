"""Issue 7, round 5: a committed DELETE whose lookup cleanup fails is reported committed
(finding 2); the lock wait always ends before the read timeout (finding 3); a unique lookup
value freed by the transaction itself (its owner deleted, or its insert undone) can be taken
in that transaction, as one database with a UNIQUE key allows (finding 4). Real MariaDB shards
(the module ``world`` of test_issue7_review: users and orders on four shards)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import BigInteger, Connection, Integer, String, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ConfigError, ShardRouterError
from shardrouter.orm import routed_sessionmaker
from tests.integration import test_issue7_review as _review

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

INSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, 'r4', 'mid', 'x', 1)"
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


def _topology(path: Any, **pool: Any) -> Topology:
    """The module's shards with short timeouts (``pool`` settings on every shard)."""
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        shard["pool"] = {"connect_timeout_s": 2, "timeout_s": 3, **pool}
    return Topology(config_from_dict(raw))


def _lookup(router: Router, email: str) -> list[Any]:
    sql = "SELECT email, user_id FROM user_emails WHERE email = :e"
    return router.execute(sql, {"e": email}).rows


def _user(router: Router, user: int) -> list[Any]:
    return router.execute("SELECT user_id FROM users WHERE user_id = :u", {"u": user}).rows


def _same_shard_user(router: Router, user: int) -> int:
    home = router.route_key(user_id=user)[0]
    return next(u for u in range(user + 1, user + 1000) if router.route_key(user_id=u)[0] == home)


@contextlib.contextmanager
def _owner_row_held(router: Router, user: int) -> Iterator[None]:
    """Another session inserts (uncommitted) the users row ``user``: an INSERT of that key
    waits for its lock (the router's lookup rows are written by then)."""
    topology = router.topology
    slot = topology.slot_for("users", user)
    physical = topology.table("users").physical(slot)
    holder: Connection = router.engines.primary(topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    try:
        holder.execute(
            text(
                f"INSERT INTO {physical} (user_id, email, name, tier, tag, score)"
                " VALUES (:u, 'holder@r4.example', 'h', 'mid', 'x', 1)"
            ),
            {"u": user},
        )
        yield
    finally:
        trans.rollback()
        holder.close()


@contextlib.contextmanager
def _lookup_row_held(router: Router, email: str) -> Iterator[None]:
    """Another session holds the user_emails row of ``email`` (SELECT ... FOR UPDATE)."""
    topology = router.topology
    slot = topology.slot_for("user_emails", email)
    physical = topology.table("user_emails").physical(slot)
    holder: Connection = router.engines.primary(topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    try:
        holder.execute(text(f"SELECT * FROM {physical} WHERE email = :e FOR UPDATE"), {"e": email})
        yield
    finally:
        trans.rollback()
        holder.close()


# -- finding 2: a committed DELETE reported as a lock conflict ---------------------------------


def _assert_cleanup_logged(caplog: pytest.LogCaptureFixture) -> None:
    """The cleanup's failure is logged (a warning naming the repair)."""
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("check lookups --fix" in m and "DELETE committed" in m for m in warned), warned


def test_delete_whose_lookup_cleanup_waits_is_not_reported_as_failed(
    world: dict[str, Any], shard_databases: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """DELETE of a user outside a transaction: the owner row's delete commits, then the
    user_emails cleanup waits for a held lookup row, and its lock wait (now 1 s here; by
    default half of query_timeout_s) ends in 1205. The caller gets LockConflictError
    ("another writer held the rows, retry") for a DELETE that is committed: the user is gone,
    a retry deletes nothing and leaves the lookup row (an orphan) for good. Either the DELETE
    reports its row (the cleanup's failure logged, as LookupLedger.settle does), or nothing
    is deleted."""
    router: Router = world["router"]
    user, email = 881_001, "r4-del-held@example.com"
    router.execute(INSERT_USER, {"u": user, "e": email})
    topology = _topology(shard_databases, query_timeout_s=4, lock_wait_timeout_s=1)
    outcome: Any = None
    with _lookup_row_held(router, email), Router(topology, max_fanout=None) as short:
        try:
            outcome = short.execute("DELETE FROM users WHERE user_id = :u", {"u": user}).rowcount
        except ShardRouterError as exc:
            outcome = type(exc).__name__  # was: LockConflictError, with the user deleted
    assert outcome == 1, (outcome, _user(router, user))
    assert _user(router, user) == []
    _assert_cleanup_logged(caplog)
    assert _lookup(router, email) == [(email, user)]  # the orphan, for check lookups --fix


def test_async_delete_whose_lookup_cleanup_waits_is_not_reported_as_failed(
    world: dict[str, Any], shard_databases: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The async twin: LockConflictError for a committed DELETE."""
    router: Router = world["router"]
    user, email = 881_002, "r4-adel-held@example.com"
    router.execute(INSERT_USER, {"u": user, "e": email})
    topology = _topology(shard_databases, query_timeout_s=4, lock_wait_timeout_s=1)

    async def run() -> Any:
        async with AsyncRouter(topology, max_fanout=None) as aio:
            try:
                sql = "DELETE FROM users WHERE user_id = :u"
                return (await aio.execute(sql, {"u": user})).rowcount
            except ShardRouterError as exc:
                return type(exc).__name__

    with _lookup_row_held(router, email):
        outcome = world["loop"].run_until_complete(run())
    assert outcome == 1, (outcome, _user(router, user))
    assert _user(router, user) == []
    _assert_cleanup_logged(caplog)


# -- finding 3: the default lock wait is not below a query timeout of 1 s ----------------------


def test_default_lock_wait_ends_before_a_one_second_query_timeout(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """query_timeout_s: 1 gave the default lock wait max(1, 1 // 2) = 1 s, not below the query
    timeout: an async UPDATE of a row another session holds was cancelled by query_timeout_s
    at 1 s, as the lock wait ended: ShardUnavailableError (a healthy shard reported down)
    instead of LockConflictError. No whole second of lock wait fits below 1 s: the config is
    refused, naming the fixes; one of them, lock_wait_timeout_s: 0, makes the held row a
    conflict at once (MariaDB: no wait)."""
    router: Router = world["router"]
    user = world["data"]["users"][7]["user_id"]
    with pytest.raises(ConfigError, match="lock_wait_timeout_s: 0"):
        _topology(shard_databases, query_timeout_s=1)
    topology = _topology(shard_databases, query_timeout_s=1, lock_wait_timeout_s=0)
    slot = router.topology.slot_for("users", user)
    physical = router.topology.table("users").physical(slot)
    holder = router.engines.primary(router.topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    holder.execute(text(f"UPDATE {physical} SET score = score WHERE user_id = :u"), {"u": user})

    async def run() -> str:
        async with AsyncRouter(topology) as aio:
            try:
                sql = "UPDATE users SET score = score WHERE user_id = :u"
                await aio.execute(sql, {"u": user})
            except ShardRouterError as exc:
                return type(exc).__name__
            return "updated"

    try:
        outcome = world["loop"].run_until_complete(run())
    finally:
        trans.rollback()
        holder.close()
    assert outcome == "LockConflictError"  # was: ShardUnavailableError


# -- finding 4: the uniqueness check ignores the transaction's own earlier statements ----------


def test_email_freed_by_a_delete_can_be_taken_in_the_same_transaction(
    world: dict[str, Any],
) -> None:
    """DELETE a user, then INSERT another user with its address, in one transaction: one
    database (UNIQUE email) accepts it. The router refuses the INSERT: "already belongs to
    another owner (883000)", the owner this very transaction deleted (write_lookups checks
    the owner outside the transaction, where the delete is not yet visible, and does not
    consult the transaction's ledger of removed lookup rows)."""
    router: Router = world["router"]
    first = 883_000
    second = _same_shard_user(router, first)
    email = "r4-reuse@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
    got = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
    assert got == [(second,)]
    assert _lookup(router, email) == [(email, second)]


def test_orm_email_freed_by_a_delete_can_be_taken_in_the_same_session(
    world: dict[str, Any],
) -> None:
    """The ORM twin: delete a user, flush, add another with its address, commit."""
    router: Router = world["router"]
    first = 883_100
    second = _same_shard_user(router, first)
    email = "r4-orm-reuse@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    sessions = routed_sessionmaker(router)
    with sessions() as session:
        session.delete(session.get(User, first))
        session.flush()
        session.add(User(user_id=second, email=email, tier="mid", tag="a"))
        session.commit()  # was: ExecutionError "already belongs to another owner (883100)"
    got = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
    assert got == [(second,)]


def test_email_of_an_undone_insert_can_be_taken_in_the_same_transaction(
    world: dict[str, Any],
) -> None:
    """xa=True: a two-row INSERT fails on one shard (duplicate key) and is undone (ROLLBACK TO
    SAVEPOINT); the caller goes on and inserts the address of the undone row for another
    user. One database accepts it (the failed statement left nothing). The router refuses:
    the undone row's user_emails row stays until the transaction ends ("an insert still in
    flight (retry in a moment) or an orphan"), and no retry within the transaction helps."""
    router: Router = world["router"]
    taken = world["data"]["users"][20]["user_id"]
    fresh = 884_000
    while router.route_key(user_id=fresh)[0] == router.route_key(user_id=taken)[0]:
        fresh += 1
    email = "r4-undone@example.com"
    with Router(router.topology, max_fanout=None, xa=True) as xa, xa.transaction() as txn:
        with pytest.raises(ShardRouterError):
            txn.execute(
                "INSERT INTO users (user_id, email, name, tier, tag, score) VALUES"
                " (:a, :e, 'r4', 'mid', 'x', 1),"
                " (:t, 'r4-dup@example.com', 'r4', 'mid', 'x', 1)",
                {"a": fresh, "t": taken, "e": email},
            )
        txn.execute(INSERT_USER, {"u": fresh + 1, "e": email})  # was: ExecutionError
    got = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
    assert got == [(fresh + 1,)]


def test_a_rolled_back_takeover_leaves_the_original_lookup_row(world: dict[str, Any]) -> None:
    """The value taken in the transaction, then a rollback: the deleted owner is back and so
    is its one lookup row (never changed: it named it all along); the new owner left nothing."""
    router: Router = world["router"]
    first = 883_200
    second = _same_shard_user(router, first)
    email = "r5-rollback@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    with pytest.raises(KeyError), router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
        raise KeyError("the caller gives up: the transaction rolls back")
    assert _user(router, first) == [(first,)] and _user(router, second) == []
    assert _lookup(router, email) == [(email, first)]
    got = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
    assert got == [(first,)]


def test_a_value_freed_in_a_transaction_is_not_free_for_others(world: dict[str, Any]) -> None:
    """While the transaction that deleted the owner and gave its address to another is open,
    another writer is refused the address (its lookup row still names the owner, which exists
    for everybody else) and reads by it still find the owner; after the commit, the lookup
    row names the new owner, once."""
    router: Router = world["router"]
    first = 883_300
    second = _same_shard_user(router, first)
    email = "r5-busy@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
        with pytest.raises(ShardRouterError, match="already belongs"):
            router.execute(INSERT_USER, {"u": 883_399, "e": email})
        got = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
        assert got == [(first,)]  # outside, the delete is not visible yet
        inside = txn.execute("SELECT user_id FROM users WHERE email = :e", {"e": email}).rows
        assert inside == [(second,)]
    assert _lookup(router, email) == [(email, second)]
    assert _user(router, 883_399) == []


def test_a_value_given_away_in_a_transaction_cannot_be_taken_back(world: dict[str, Any]) -> None:
    """DELETE A, INSERT B with A's address, INSERT A again with it: one database refuses the
    last (B holds the address); so does the router, before writing anything, and the
    transaction goes on: its commit gives the address to B."""
    router: Router = world["router"]
    first = 883_400
    second = _same_shard_user(router, first)
    email = "r5-back@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
        with pytest.raises(ShardRouterError, match=f"another owner \\({second}\\)"):
            txn.execute(INSERT_USER, {"u": first, "e": email})
    assert _user(router, first) == [] and _user(router, second) == [(second,)]
    assert _lookup(router, email) == [(email, second)]


def test_a_deleted_value_taken_and_deleted_again_is_free_at_commit(world: dict[str, Any]) -> None:
    """DELETE A, INSERT B with its address, DELETE B: the committed address has no owner and
    no lookup row."""
    router: Router = world["router"]
    first = 883_500
    second = _same_shard_user(router, first)
    email = "r5-twice@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    with router.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": second})
    assert _user(router, first) == [] and _user(router, second) == []
    assert _lookup(router, email) == []


def test_async_email_freed_by_a_delete_can_be_taken_in_the_same_transaction(
    world: dict[str, Any],
) -> None:
    """The AsyncTransaction twin (the same ledger)."""
    router: Router = world["router"]
    first = 883_600
    second = _same_shard_user(router, first)
    email = "r5-async-reuse@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})

    async def run() -> None:
        async with world["aio"].transaction() as txn:
            await txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
            await txn.execute(INSERT_USER, {"u": second, "e": email})

    world["loop"].run_until_complete(run())
    assert _user(router, first) == [] and _user(router, second) == [(second,)]
    assert _lookup(router, email) == [(email, second)]


def test_an_undone_value_taken_by_its_owner_outside_is_not_free(world: dict[str, Any]) -> None:
    """xa=True: the undone INSERT of ``fresh`` left its lookup row (settled at the end);
    meanwhile another writer inserts ``fresh`` with that address, adopting the row, and
    commits. The address is no longer free in the transaction: taking it is refused."""
    router: Router = world["router"]
    taken = world["data"]["users"][21]["user_id"]
    fresh = 884_100
    while router.route_key(user_id=fresh)[0] == router.route_key(user_id=taken)[0]:
        fresh += 1
    email = "r5-undone-taken@example.com"
    with Router(router.topology, max_fanout=None, xa=True) as xa, xa.transaction() as txn:
        with pytest.raises(ShardRouterError):
            txn.execute(
                "INSERT INTO users (user_id, email, name, tier, tag, score) VALUES"
                " (:a, :e, 'r5', 'mid', 'x', 1),"
                " (:t, 'r5-dup@example.com', 'r5', 'mid', 'x', 1)",
                {"a": fresh, "t": taken, "e": email},
            )
        router.execute(INSERT_USER, {"u": fresh, "e": email})  # outside: adopts the row
        with pytest.raises(ShardRouterError, match=f"another owner \\({fresh}\\)"):
            txn.execute(INSERT_USER, {"u": fresh + 1, "e": email})
    assert _user(router, fresh) == [(fresh,)] and _user(router, fresh + 1) == []
    assert _lookup(router, email) == [(email, fresh)]


def test_a_value_taken_on_another_shard_is_read_by_it_in_the_transaction(
    world: dict[str, Any],
) -> None:
    """xa=True, the new owner on another shard than the deleted one: until the commit the
    lookup row names the deleted owner, yet the transaction's own reads by the address find
    the new owner (as one database: it reads its own writes), and UPDATE by it reaches it."""
    router: Router = world["router"]
    first = 883_700
    second = first + 1
    while router.route_key(user_id=second)[0] == router.route_key(user_id=first)[0]:
        second += 1
    email = "r5-elsewhere@example.com"
    router.execute(INSERT_USER, {"u": first, "e": email})
    by_email = "SELECT user_id FROM users WHERE email = :e"
    with Router(router.topology, max_fanout=None, xa=True) as xa, xa.transaction() as txn:
        txn.execute("DELETE FROM users WHERE user_id = :u", {"u": first})
        txn.execute(INSERT_USER, {"u": second, "e": email})
        assert txn.execute(by_email, {"e": email}).rows == [(second,)]
        changed = txn.execute("UPDATE users SET score = 7 WHERE email = :e", {"e": email})
        assert changed.rowcount == 1
    assert router.execute(by_email, {"e": email}).rows == [(second,)]
    assert _lookup(router, email) == [(email, second)]
