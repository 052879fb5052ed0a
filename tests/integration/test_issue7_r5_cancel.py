"""Issue 7, round 5: cancellation runs the cleanup of a failure, and a transaction ends for
good (findings 1, 5 and 6 of the fourth review, and a multi-shard write cancelled while it
commits), on real MariaDB shards (the module ``world`` of test_issue7_review).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import Connection, event, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError, TransactionAbortedError
from tests.integration import test_issue7_review as _review

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

INSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, 'r4', 'mid', 'x', 1)"
)


def _lookup(router: Router, email: str) -> list[Any]:
    sql = "SELECT email, user_id FROM user_emails WHERE email = :e"
    return router.execute(sql, {"e": email}).rows


def _user(router: Router, user: int) -> list[Any]:
    return router.execute("SELECT user_id FROM users WHERE user_id = :u", {"u": user}).rows


@contextlib.contextmanager
def _owner_gap_held(router: Router, user: int) -> Iterator[None]:
    """Another session holds the gap where the users row ``user`` would go (a locking read of
    an empty key range): an INSERT of that key waits for it, after the router wrote its lookup
    rows. (Not an uncommitted insert of the same key: that one holds the row lock a cleanup's
    owner check reads as "an insert in flight", keeping the lookup row, as after a failure.)"""
    topology = router.topology
    slot = topology.slot_for("users", user)
    physical = topology.table("users").physical(slot)
    holder: Connection = router.engines.primary(topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    try:
        rows = holder.execute(
            text(f"SELECT user_id FROM {physical} WHERE user_id BETWEEN :a AND :b FOR UPDATE"),
            {"a": user - 50, "b": user + 50},
        ).all()
        assert rows == []
        yield
    finally:
        trans.rollback()
        holder.close()


@contextlib.contextmanager
def _lookup_row_held_for(router: Router, email: str, seconds: float) -> Iterator[None]:
    """Another session holds the user_emails row of ``email`` (SELECT ... FOR UPDATE) for
    ``seconds`` from now, then lets it go (on its own thread: the event loop may be running)."""
    topology = router.topology
    slot = topology.slot_for("user_emails", email)
    physical = topology.table("user_emails").physical(slot)
    holder: Connection = router.engines.primary(topology.shard_of_slot(slot)).connect()
    trans = holder.begin()
    holder.execute(text(f"SELECT * FROM {physical} WHERE email = :e FOR UPDATE"), {"e": email})

    def release() -> None:
        time.sleep(seconds)
        trans.rollback()
        holder.close()

    thread = threading.Thread(target=release)
    thread.start()
    try:
        yield
    finally:
        thread.join()


def _run(world: dict[str, Any], coro: Any) -> Any:
    return world["loop"].run_until_complete(coro)


# -- finding 1: a cancelled async statement cleans up like a failed one -------------------------


def test_cancelled_async_insert_leaves_no_lookup_row(world: dict[str, Any]) -> None:
    """An async INSERT of a user is cancelled (asyncio.wait_for) while its owner row waits
    for a lock: its user_emails row is already written, the owner row never is. The router
    stops the statement (KILL QUERY) and removes the lookup row, as after a failure; the
    cancellation reaches the caller (wait_for's TimeoutError), never swallowed."""
    router: Router = world["router"]
    user, email = 880_001, "r5-cancelled@example.com"
    with _owner_gap_held(router, user):

        async def cancelled() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    world["aio"].execute(INSERT_USER, {"u": user, "e": email}), 0.5
                )

        _run(world, cancelled())
    assert _user(router, user) == []
    assert _lookup(router, email) == []  # was: [(email, 880001)], an orphan
    router.execute(INSERT_USER, {"u": 880_011, "e": email})  # the address is free


def test_cancelled_async_insert_in_a_transaction_leaves_no_lookup_row(
    world: dict[str, Any],
) -> None:
    """The same inside an AsyncTransaction: the cancelled statement ends the transaction
    (rolled back), and its lookup row, entered in the transaction's ledger like a failed
    statement's, is removed by the rollback's settling."""
    router: Router = world["router"]
    user, email = 880_102, "r5-cancelled-txn@example.com"
    with _owner_gap_held(router, user):

        async def cancelled() -> None:
            with pytest.raises(TimeoutError):
                async with world["aio"].transaction() as txn:
                    await asyncio.wait_for(txn.execute(INSERT_USER, {"u": user, "e": email}), 0.5)

        _run(world, cancelled())
    assert _user(router, user) == []
    assert _lookup(router, email) == []  # was: [(email, 880102)], an orphan
    router.execute(INSERT_USER, {"u": 880_112, "e": email})  # the address is free


def test_cancelled_async_delete_leaves_no_lookup_row(world: dict[str, Any]) -> None:
    """An async DELETE of a user commits, then its lookup cleanup waits for a lock (held for
    1 s) and is cancelled there (0.5 s): the cleanup runs to its end (within the shard's
    timeouts) and then the cancellation reaches the caller. Was: the cleanup was stopped, the
    user gone, its user_emails row left, the address refused to the next sign-up."""
    router: Router = world["router"]
    user, email = 880_203, "r5-del-cancel@example.com"
    router.execute(INSERT_USER, {"u": user, "e": email})
    with _lookup_row_held_for(router, email, 1.0):

        async def cancelled() -> None:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(
                    world["aio"].execute("DELETE FROM users WHERE user_id = :u", {"u": user}),
                    0.5,
                )

        _run(world, cancelled())
    assert _user(router, user) == []
    assert _lookup(router, email) == []  # was: [(email, 880203)], an orphan
    router.execute(INSERT_USER, {"u": 880_213, "e": email})


def _topology(path: Any, **pool: Any) -> Topology:
    """The module's shards with short timeouts (``pool`` settings on every shard)."""
    raw = yaml.safe_load(Path(path).read_text())
    for shard in raw["shards"].values():
        shard["pool"] = {"connect_timeout_s": 2, "timeout_s": 3, **pool}
    return Topology(config_from_dict(raw))


def test_cleanup_after_a_cancellation_is_bounded_and_reraises(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """The cleanup a cancellation runs is bounded by the shard's timeouts: a DELETE's lookup
    cleanup waiting on a row held for longer than the caller waits ends at the lock wait
    (1 s here), and the caller gets its cancellation then (wait_for's TimeoutError), not the
    cleanup's error and not after an unbounded wait. The user is deleted; its lookup row stays
    (logged; ``check lookups --fix`` removes such orphans)."""
    router: Router = world["router"]
    user, email = 880_503, "r5-del-bounded@example.com"
    router.execute(INSERT_USER, {"u": user, "e": email})
    topology = _topology(shard_databases, query_timeout_s=4, lock_wait_timeout_s=1)
    outcome: list[str] = []

    async def cancelled() -> None:
        async with AsyncRouter(topology, max_fanout=None) as aio:
            started = time.monotonic()
            try:
                await asyncio.wait_for(
                    aio.execute("DELETE FROM users WHERE user_id = :u", {"u": user}), 0.3
                )
            except TimeoutError:
                outcome.append("cancelled")
            except BaseException as exc:
                outcome.append(type(exc).__name__)
            outcome.append("bounded" if time.monotonic() - started < 3 else "waited")

    with _lookup_row_held_for(router, email, 5.0):
        _run(world, cancelled())
    assert outcome == ["cancelled", "bounded"]
    assert _user(router, user) == []


# -- a multi-shard write outside a transaction cancelled while it commits -----------------------


def _users_on_two_shards(router: Router, start: int) -> tuple[int, int]:
    first = start
    second = next(
        u
        for u in range(start + 1, start + 1000)
        if router.route_key(user_id=u)[0] != router.route_key(user_id=first)[0]
    )
    return first, second


class _CancelOnCommit:
    """Cancels ``task`` as the first COMMIT of the async router's shards is about to be sent
    (a caller's timeout landing on the commit phase of a multi-shard write)."""

    def __init__(self, aio: AsyncRouter) -> None:
        self.engines = [e.sync_engine for e in aio._snap.engines.all]
        self.task: asyncio.Future[Any] | None = None
        self.fired = False

    def __call__(self, conn: Any) -> None:
        if self.task is not None:
            self.task.cancel()
            self.task = None
            self.fired = True

    def __enter__(self) -> _CancelOnCommit:
        for engine in self.engines:
            event.listen(engine, "commit", self)
        return self

    def __exit__(self, *exc: object) -> None:
        for engine in self.engines:
            event.remove(engine, "commit", self)


@pytest.mark.parametrize("kind", ["update", "delete"])
def test_multi_shard_write_cancelled_while_committing_is_all_or_nothing(
    world: dict[str, Any], kind: str
) -> None:
    """An async write of two users on two shards, outside a transaction, is cancelled as its
    first shard commits: the commit phase runs to its end (every part commits: the first
    COMMIT may be applied already), then the cancellation reaches the caller. A DELETE's
    lookup cleanup runs too. Was: the first shard's part committed, the other's rolled back."""
    router: Router = world["router"]
    first, second = _users_on_two_shards(router, 880_300 if kind == "update" else 880_400)
    emails = {u: f"r5-commit-{kind}-{u}@example.com" for u in (first, second)}
    for user, email in emails.items():
        router.execute(INSERT_USER, {"u": user, "e": email})
    if kind == "update":
        sql = "UPDATE users SET name = 'r5-both' WHERE user_id IN (:a, :b)"
    else:
        sql = "DELETE FROM users WHERE user_id IN (:a, :b)"
    outcome: list[str] = []

    async def run() -> None:
        with _CancelOnCommit(world["aio"]) as hook:
            statement = asyncio.ensure_future(world["aio"].execute(sql, {"a": first, "b": second}))
            hook.task = statement
            try:
                await statement
                outcome.append("done")
            except asyncio.CancelledError:
                outcome.append("cancelled")
            assert hook.fired

    _run(world, run())
    assert outcome == ["cancelled"]  # the cancellation is not swallowed
    if kind == "update":
        names = router.execute(
            "SELECT user_id, name FROM users WHERE user_id IN (:a, :b) ORDER BY user_id",
            {"a": first, "b": second},
        ).rows
        assert names == [(first, "r5-both"), (second, "r5-both")]  # was: one of them
    else:
        assert _user(router, first) == [] and _user(router, second) == []
        for email in emails.values():
            assert _lookup(router, email) == []


# -- finding 5: a transaction used after its block ended is refused, typed ---------------------


def test_a_transaction_used_after_it_ended_is_refused_typed(world: dict[str, Any]) -> None:
    """``with router.transaction() as txn: ...`` then ``txn.execute(...)`` after the block
    (a nested helper keeping the object, a retry loop): one that ran no statement opens a
    new branch and runs the UPDATE in a transaction nobody commits: the caller gets
    rowcount 1, the write is lost, its connection stays checked out holding the row lock
    (other writers wait out the lock wait; the module's DROP DATABASE hangs). One that ran a
    statement raises SQLAlchemy's ResourceClosedError (untyped). Either should be a typed
    refusal (TransactionAbortedError or the like) with nothing run."""
    router: Router = world["router"]
    user = world["data"]["users"][2]["user_id"]
    update = "UPDATE users SET name = 'r4-lost' WHERE user_id = :u"
    with router.transaction() as empty:
        pass
    try:
        with pytest.raises(TransactionAbortedError, match="has ended"):
            empty.execute(update, {"u": user})  # was: rowcount 1, never committed
        assert empty._branches == {}  # nothing ran
    finally:
        for conn in empty._branches.values():  # the leaked branch: give its lock back
            with contextlib.suppress(Exception):
                conn.rollback()
                conn.close()
    with router.transaction() as used:
        used.execute("SELECT name FROM users WHERE user_id = :u", {"u": user})
    with pytest.raises(TransactionAbortedError, match="has ended"):
        used.execute(update, {"u": user})  # was: sqlalchemy.exc.ResourceClosedError
    assert router.execute("SELECT name FROM users WHERE user_id = :u", {"u": user}).rows != [
        ("r4-lost",)
    ]


def test_an_async_transaction_used_after_it_ended_is_refused_typed(world: dict[str, Any]) -> None:
    """The async twin: an AsyncTransaction kept past its block refuses, nothing runs."""
    router: Router = world["router"]
    user = world["data"]["users"][3]["user_id"]
    update = "UPDATE users SET name = 'r5-lost' WHERE user_id = :u"
    outcome: list[str] = []

    async def run() -> None:
        async with world["aio"].transaction() as empty:
            pass
        try:
            await empty.execute(update, {"u": user})  # was: ran on a branch never committed
        except TransactionAbortedError as exc:
            outcome.append("refused: has ended" if "has ended" in str(exc) else str(exc))
        assert empty._conn is None  # nothing ran
        async with world["aio"].transaction() as used:
            await used.execute("SELECT name FROM users WHERE user_id = :u", {"u": user})
        try:
            await used.execute(update, {"u": user})  # was: untyped ResourceClosedError
        except TransactionAbortedError as exc:
            outcome.append("refused: has ended" if "has ended" in str(exc) else str(exc))

    _run(world, run())
    assert outcome == ["refused: has ended"] * 2
    assert router.execute("SELECT name FROM users WHERE user_id = :u", {"u": user}).rows != [
        ("r5-lost",)
    ]


# -- finding 6: a cancellation while a failed statement is undone gives an untyped error ---------


class _CancelWhenLogged(logging.Handler):
    """Cancels ``task`` when the router logs a statement containing ``needle`` (before sending
    it): a cancellation (a caller's timeout) landing exactly on that statement's await."""

    def __init__(self, needle: str) -> None:
        super().__init__(logging.DEBUG)
        self.needle = needle
        self.task: asyncio.Future[Any] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.task is not None and self.needle in getattr(record, "statement", ""):
            self.task.cancel()
            self.task = None


def _two_splits_of_one_shard(router: Router, start: int) -> tuple[int, int]:
    topology = router.topology
    table = topology.table("orders")

    def place(user: int) -> tuple[str, str]:
        slot = topology.slot_for("orders", user)
        return topology.shard_of_slot(slot), table.physical(slot)

    for other in range(start + 1, start + 10_000):
        if place(other)[0] == place(start)[0] and place(other)[1] != place(start)[1]:
            return start, other
    raise AssertionError("no such pair")


def test_cancelled_undo_of_a_failed_statement_ends_the_async_transaction_typed(
    world: dict[str, Any],
) -> None:
    """An async transaction's UPDATE over two split tables fails (1690 overflow in one part)
    and is being undone (ROLLBACK TO SAVEPOINT) when the caller's timeout cancels it. The
    next statement is refused (TransactionAbortedError), but the commit at the end of the
    block raises SQLAlchemy's PendingRollbackError, untyped: AsyncTransaction._undo lets the
    cancellation through without marking the transaction broken (a cancellation while the
    SAVEPOINT is set does, and the commit then raises TransactionAbortedError)."""
    router: Router = world["router"]
    first, second = _two_splits_of_one_shard(router, 979_500)
    ids = router.topology.id_generator("orders", worker_id=26)
    for user, amount in ((first, 1), (second, 4)):
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
            " VALUES (:o, :u, 90, :a, 'new')",
            {"o": ids.next_id(user_id=user), "u": user, "a": amount},
        )
    handler = _CancelWhenLogged("ROLLBACK TO SAVEPOINT")
    sql_log = logging.getLogger("shardrouter.sql")
    level = sql_log.level
    sql_log.setLevel(logging.DEBUG)
    sql_log.addHandler(handler)
    outcome: list[str] = []

    async def run() -> None:
        try:
            async with world["aio"].transaction() as txn:
                update = txn.execute(
                    "UPDATE orders SET amount_cents = amount_cents * 4611686018427387904"
                    " WHERE user_id IN (:u1, :u2)",
                    {"u1": first, "u2": second},
                )
                statement = asyncio.ensure_future(update)
                handler.task = statement
                with contextlib.suppress(asyncio.CancelledError):
                    await statement  # cancelled while its failure is undone
                with pytest.raises(ShardRouterError):
                    await txn.execute(
                        "SELECT amount_cents FROM orders WHERE user_id = :u", {"u": first}
                    )
            outcome.append("committed")
        except ShardRouterError as exc:
            outcome.append(type(exc).__name__)
        except Exception as exc:
            outcome.append(f"untyped {type(exc).__module__}.{type(exc).__name__}")

    try:
        world["loop"].run_until_complete(run())
    finally:
        sql_log.removeHandler(handler)
        sql_log.setLevel(level)
    assert outcome == ["TransactionAbortedError"]  # was: untyped ...PendingRollbackError
