"""Review of c79527d (the settle's owner check after the commit), on real MariaDB shards (the
module ``world`` of test_issue7_review). The settle is stalled deterministically as in
test_issue7_r7_settle: the transaction also deletes user D, whose user_emails row another
connection holds, so the settle waits on that row after the commit.

Findings, both fixed (the owner checks fall back to one by one when their batch fails):

- test_a_locked_bystander_owner_leaves_the_row_of_an_owner_deleted_meanwhile (and its async
  twin): the settle checked every row of a rewritten group in one batch; one owner row held
  by an unrelated writer failed its NOWAIT read, the batch's first error dropped every check,
  and the row of an owner deleted meanwhile stayed (an orphan).

The review's third finding, the discard's window (a row removed under a writer that
re-inserts its owner and adopted it, while a third writer takes the value), is fixed too: a
discard deletes and checks the owner in one write under lock, and an adopter checks its rows
again under lock once its owner rows are written (the tests at the end). The other tests are
attacks that held, kept as guards."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError
from shardrouter.orm import routed_sessionmaker
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_r6_review5 import (
    INSERT_USER,
    _lookup,
    _same_shard_user,
    _user,
)
from tests.integration.test_issue7_r6_review5 import _User as User

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(60)]

DELETE_USER = "DELETE FROM users WHERE user_id = :u"


@contextmanager
def _held(router: Router, table: str, column: str, key: Any, value: Any) -> Iterator[None]:
    """Hold the row ``column = value`` of the physical table of ``table`` that ``key`` routes
    to (FOR UPDATE, in an open transaction on another connection) until the block ends."""
    topology = router.topology
    slot = topology.slot_for(table, key)
    physical = topology.table(table).physical(slot)
    conn = router.engines.primary(topology.shard_of_slot(slot)).connect()
    trans = conn.begin()
    try:
        conn.execute(text(f"SELECT * FROM {physical} WHERE {column} = :v FOR UPDATE"), {"v": value})
        yield
    finally:
        trans.rollback()
        conn.close()


def _stalled(
    router: Router,
    held_email: str,
    run: Callable[[], None],
    committed: Callable[[], bool],
    meanwhile: Callable[[], None],
) -> list[BaseException]:
    """Run ``run`` (a transaction that deletes the owner of ``held_email``) in a thread while
    that lookup row is held; once ``committed()`` holds, call ``meanwhile()`` (the settle is
    waiting on the held row), then release the row and wait for the thread."""
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    with _held(router, "user_emails", "email", held_email, held_email):
        thread.start()
        deadline = time.monotonic() + 20
        while not committed() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert committed(), "the transaction never committed"
        meanwhile()
    thread.join(30)
    assert not thread.is_alive()
    return errors


def _place(router: Router, email: str) -> tuple[str, str]:
    topology = router.topology
    slot = topology.slot_for("user_emails", email)
    return str(topology.shard_of_slot(slot)), topology.table("user_emails").physical(slot)


def _same_place_email(router: Router, email: str, prefix: str) -> str:
    """An e-mail whose user_emails row lives in the same physical table as ``email``'s (one
    insert of the settle's write-again writes both)."""
    place = _place(router, email)
    return next(
        e for e in (f"{prefix}{n}@example.com" for n in range(10_000)) if _place(router, e) == place
    )


# -- fixed: one locked bystander owner made the whole owner check give up --------------------


def _bystander(router: Router, base: int, name: str) -> tuple[int, int, int, str, str, str]:
    """D inserted (``name``-d@), B and C not inserted, all on one shard; B's and C's e-mails
    share one user_emails table (one write-again insert, so one batch of owner checks)."""
    d = base
    b = _same_shard_user(router, d)
    c = _same_shard_user(router, b)
    e_d, e_b = f"{name}-d@example.com", f"{name}-b@example.com"
    e_c = _same_place_email(router, e_b, f"{name}-c")
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    return d, b, c, e_d, e_b, e_c


def _delete_b_while_c_is_locked(
    router: Router, b: int, c: int, locks: list[Any]
) -> Callable[[], None]:
    """Another writer deletes B (its cleanup removes B's lookup row: the settle writes it
    again); an unrelated transaction holds C's user row (an UPDATE of C's name in flight, say)
    until the test ends."""

    def meanwhile() -> None:
        lock = _held(router, "users", "user_id", c, c)
        lock.__enter__()
        locks.append(lock)
        router.execute(DELETE_USER, {"u": b})

    return meanwhile


def test_a_locked_bystander_owner_leaves_the_row_of_an_owner_deleted_meanwhile(
    world: dict[str, Any],
) -> None:
    """T deletes D, inserts B and C (e-mails in one user_emails table) and commits; before the
    settle, another writer deletes B, and an unrelated transaction holds C's user row. The
    settle writes B's row again, then checks B's and C's owners in one batch: C's NOWAIT read
    fails, the whole batch is dropped (first error wins) and B's row stays, naming a user that
    no longer exists. Expected: C's row kept (its owner is present, locked), B's row removed."""
    router: Router = world["router"]
    d, b, c, e_d, e_b, e_c = _bystander(router, 997_001, "r7s-by")
    locks: list[Any] = []

    def run() -> None:
        with router.transaction() as txn:
            txn.execute(DELETE_USER, {"u": d})
            txn.execute(INSERT_USER, {"u": b, "e": e_b})
            txn.execute(INSERT_USER, {"u": c, "e": e_c})

    try:
        errors = _stalled(
            router,
            e_d,
            run,
            lambda: bool(_user(router, b)),
            _delete_b_while_c_is_locked(router, b, c, locks),
        )
    finally:
        for lock in locks:
            lock.__exit__(None, None, None)
    assert errors == []
    assert _user(router, b) == [] and _user(router, c) == [(c, e_c)]
    assert _lookup(router, e_c) == [(e_c, c)]
    assert _lookup(router, e_b) == [], "an orphan naming the deleted B was left"


def test_async_a_locked_bystander_owner_leaves_the_row_of_an_owner_deleted_meanwhile(
    world: dict[str, Any],
) -> None:
    """The same through AsyncRouter (asyncio.gather, first error wins)."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    d, b, c, e_d, e_b, e_c = _bystander(router, 997_101, "r7s-aby")
    locks: list[Any] = []

    async def swap() -> None:
        async with aio.transaction() as txn:
            await txn.execute(DELETE_USER, {"u": d})
            await txn.execute(INSERT_USER, {"u": b, "e": e_b})
            await txn.execute(INSERT_USER, {"u": c, "e": e_c})

    loop = world["loop"]
    try:
        errors = _stalled(
            router,
            e_d,
            lambda: loop.run_until_complete(swap()),
            lambda: bool(_user(router, b)),
            _delete_b_while_c_is_locked(router, b, c, locks),
        )
    finally:
        for lock in locks:
            lock.__exit__(None, None, None)
    assert errors == []
    assert _user(router, b) == [] and _user(router, c) == [(c, e_c)]
    assert _lookup(router, e_c) == [(e_c, c)]
    assert _lookup(router, e_b) == [], "an orphan naming the deleted B was left"


# -- guards: attacks that held ---------------------------------------------------------------


def test_orm_settle_removes_the_row_of_an_owner_deleted_meanwhile(world: dict[str, Any]) -> None:
    """The ORM routed session settles with the same ledger: it deletes D and adds B (new
    e-mail); before its settle writes B's row again, another writer deletes B. No row is left
    naming B."""
    router: Router = world["router"]
    d = 997_201
    b = _same_shard_user(router, d)
    e, e_d = "r7s-orm@example.com", "r7s-orm-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    sessions = routed_sessionmaker(router)

    def run() -> None:
        with sessions() as session:
            session.delete(session.get(User, d))
            session.flush()
            session.add(User(user_id=b, email=e, tier="mid", tag="a"))
            session.commit()

    errors = _stalled(
        router,
        e_d,
        run,
        lambda: bool(_user(router, b)),
        lambda: router.execute(DELETE_USER, {"u": b}),
    )
    assert errors == []
    assert _user(router, b) == [] and _user(router, d) == []
    assert _lookup(router, e) == [] and _lookup(router, e_d) == []


def test_orm_hand_over_whose_new_owner_is_deleted_meanwhile_leaves_no_row(
    world: dict[str, Any],
) -> None:
    """ORM: the session deletes A (e) and D, adds B with A's e-mail; before the hand-over,
    another writer deletes B. No row is left naming B (or A)."""
    router: Router = world["router"]
    a = 997_251
    d = _same_shard_user(router, a)
    b = _same_shard_user(router, d)
    e, e_d = "r7s-orm-hand@example.com", "r7s-orm-hand-d@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    sessions = routed_sessionmaker(router)

    def run() -> None:
        with sessions() as session:
            session.delete(session.get(User, a))
            session.delete(session.get(User, d))
            session.flush()
            session.add(User(user_id=b, email=e, tier="mid", tag="a"))
            session.commit()

    errors = _stalled(
        router,
        e_d,
        run,
        lambda: bool(_user(router, b)),
        lambda: router.execute(DELETE_USER, {"u": b}),
    )
    assert errors == []
    assert _user(router, a) == [] and _user(router, b) == []
    assert _lookup(router, e) == [] and _lookup(router, e_d) == []


def test_an_owner_reinserted_with_another_email_meanwhile_loses_only_the_stale_row(
    world: dict[str, Any],
) -> None:
    """T deletes D, inserts B (e), commits; before the settle, another writer deletes B and a
    third inserts B again with e2. The settle writes (B, e) again and its check removes it (B
    no longer has e); (B, e2) stays."""
    router: Router = world["router"]
    d = 997_301
    b = _same_shard_user(router, d)
    e, e2, e_d = "r7s-re@example.com", "r7s-re2@example.com", "r7s-re-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})

    def run() -> None:
        with router.transaction() as txn:
            txn.execute(DELETE_USER, {"u": d})
            txn.execute(INSERT_USER, {"u": b, "e": e})

    def meanwhile() -> None:
        router.execute(DELETE_USER, {"u": b})
        router.execute(INSERT_USER, {"u": b, "e": e2})

    errors = _stalled(router, e_d, run, lambda: bool(_user(router, b)), meanwhile)
    assert errors == []
    assert _user(router, b) == [(b, e2)]
    assert _lookup(router, e) == [] and _lookup(router, e2) == [(e2, b)]


def test_an_owner_reinserted_with_its_email_meanwhile_keeps_its_row(world: dict[str, Any]) -> None:
    """As above, but the third writer inserts B again with the same e-mail in another case
    (the lookup folds case): B keeps one row for it."""
    router: Router = world["router"]
    d = 997_351
    b = _same_shard_user(router, d)
    e, e_d = "r7s-same@example.com", "r7s-same-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})

    def run() -> None:
        with router.transaction() as txn:
            txn.execute(DELETE_USER, {"u": d})
            txn.execute(INSERT_USER, {"u": b, "e": e})

    def meanwhile() -> None:
        router.execute(DELETE_USER, {"u": b})
        router.execute(INSERT_USER, {"u": b, "e": e.upper()})

    errors = _stalled(router, e_d, run, lambda: bool(_user(router, b)), meanwhile)
    assert errors == []
    assert _user(router, b) == [(b, e.upper())]
    assert [u for _, u in _lookup(router, e)] == [b]


def test_a_locked_present_owner_keeps_its_written_again_row(world: dict[str, Any]) -> None:
    """T deletes D, inserts B, commits; before the settle, B's lookup row is removed (as
    `check lookups --fix` would) and B's user row is held by an UPDATE in flight. The settle
    writes the row again; its owner check fails on the lock and keeps it."""
    router: Router = world["router"]
    d = 997_401
    b = _same_shard_user(router, d)
    e, e_d = "r7s-lock@example.com", "r7s-lock-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    locks: list[Any] = []

    def run() -> None:
        with router.transaction() as txn:
            txn.execute(DELETE_USER, {"u": d})
            txn.execute(INSERT_USER, {"u": b, "e": e})

    def meanwhile() -> None:
        router.execute("DELETE FROM user_emails WHERE email = :e", {"e": e})
        lock = _held(router, "users", "user_id", b, b)
        lock.__enter__()
        locks.append(lock)

    try:
        errors = _stalled(router, e_d, run, lambda: bool(_user(router, b)), meanwhile)
    finally:
        for lock in locks:
            lock.__exit__(None, None, None)
    assert errors == []
    assert _user(router, b) == [(b, e)]
    assert _lookup(router, e) == [(e, b)]


@pytest.mark.parametrize("new", ["r7s-case@example.com", "R7S-CASE@EXAMPLE.COM "])
def test_a_case_folded_hand_over_keeps_the_row_of_the_new_owner(
    world: dict[str, Any], new: str
) -> None:
    """T deletes A ('R7s-Case@Example.com') and inserts B with a case/trailing-space variant
    of it: the hand-over changes the row, the check after it finds B (the owner column
    compares as the lookup does) and keeps it."""
    router: Router = world["router"]
    a = 997_501 if new.islower() else 997_551
    b = _same_shard_user(router, a)
    old = "R7s-Case@Example.com"
    router.execute(INSERT_USER, {"u": a, "e": old})
    try:
        with router.transaction() as txn:
            txn.execute(DELETE_USER, {"u": a})
            txn.execute(INSERT_USER, {"u": b, "e": new})
        assert _user(router, b) == [(b, new)]
        assert [u for _, u in _lookup(router, old)] == [b]
    finally:
        router.execute(DELETE_USER, {"u": b})
    assert _lookup(router, old) == []


# -- guards: the common path pays no owner check ----------------------------------------------


@contextmanager
def _owner_checks(caplog: pytest.LogCaptureFixture) -> Iterator[list[str]]:
    """The owner checks logged in the block: locking reads of users (the log shows the
    statement uncompiled, ``FOR UPDATE`` for the dialect's ``LOCK IN SHARE MODE NOWAIT``)."""
    found: list[str] = []
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        caplog.clear()
        yield found
        statements = [getattr(r, "statement", "") for r in caplog.records]
    found.extend(s for s in statements if "FOR UPDATE" in s and "FROM users" in s)
    assert statements, "no statement logged: the guard would prove nothing"


def test_a_committed_transaction_without_rewrites_pays_no_owner_check(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """Sync, async, ORM and a plain INSERT of a new user: the settle's write-again finds every
    row there and runs no owner check (no extra round trip)."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    loop = world["loop"]
    users = [997_601 + n for n in range(4)]
    emails = [f"r7s-fast{n}@example.com" for n in range(4)]

    async def in_async() -> None:
        async with aio.transaction() as txn:
            await txn.execute(INSERT_USER, {"u": users[1], "e": emails[1]})

    with _owner_checks(caplog) as checks:
        with router.transaction() as txn:
            txn.execute(INSERT_USER, {"u": users[0], "e": emails[0]})
        loop.run_until_complete(in_async())
        with routed_sessionmaker(router)() as session:
            session.add(User(user_id=users[2], email=emails[2], tier="mid", tag="a"))
            session.commit()
        router.execute(INSERT_USER, {"u": users[3], "e": emails[3]})
    assert checks == []
    for u, e in zip(users, emails, strict=True):
        assert _lookup(router, e) == [(e, u)]


def test_a_hand_over_pays_one_owner_check(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A hand-over always changes a row, so it is always checked: one locking read (the cost
    of the fix on that path, measured)."""
    router: Router = world["router"]
    a = 997_701
    b = _same_shard_user(router, a)
    e = "r7s-cost@example.com"
    router.execute(INSERT_USER, {"u": a, "e": e})
    with _owner_checks(caplog) as checks, router.transaction() as txn:
        txn.execute(DELETE_USER, {"u": a})
        txn.execute(INSERT_USER, {"u": b, "e": e})
    assert len(checks) == 1
    assert _lookup(router, e) == [(e, b)]


# -- fixed: the discard's window in which a re-adopted value was taken twice ----------------------


def _discard_step(router: Router, b: int, e: str) -> tuple[Any, Any]:
    """(e, B) present with B absent (written directly, as a settle leaves it when B was
    deleted meanwhile), and the discard of it started: its first batch (the owner checks)
    run, its next batch returned. Returns (step, next jobs)."""
    from shardrouter.engine.router import _Runner
    from shardrouter.sql.execution import discard_lookups, lookup_rows

    topology = router.topology
    rows = lookup_rows(topology, topology.table("users"), [{"user_id": b, "email": e}])
    (row,) = rows
    with router.engines.primary(row.shard).begin() as conn:
        conn.execute(text(f"INSERT INTO {row.physical} VALUES (:e, :u)"), {"e": e, "u": b})
    assert _lookup(router, e) == [(e, b)] and _user(router, b) == []
    step = discard_lookups(topology, rows)
    checks = step.send(None)  # the owner checks: B absent
    return step, step.send(_Runner(router).run(checks))


def _finish(router: Router, step: Any, jobs: Any) -> int:
    """Run the rest of a discard step as the router's runner does; its return value."""
    from shardrouter.engine.router import _Runner

    runner = _Runner(router)
    try:
        while True:
            try:
                results = runner.run(jobs)
            except Exception as exc:
                jobs = step.throw(exc)
            else:
                jobs = step.send(results)
    except StopIteration as stop:
        return int(stop.value)


def test_a_row_removed_under_a_readopting_insert_is_not_taken_twice(
    world: dict[str, Any],
) -> None:
    """(The review's third finding, driven step by step.) The discard of (e, B) has seen B
    absent; writer X inserts B again with e (its lookup write finds the row and adopts it; its
    owner INSERT then waits on a gap lock another session holds on B's key). The discard
    removes (e, B) (B still absent: committed); writer Y inserts C with e: e is free, Y takes
    it. X's owner insert proceeds, and its check of the adopted row under lock finds it gone:
    X writes it again, finds e taken by C and is refused; its owner row is not written. Before
    the fix X's write-again (INSERT IGNORE) found (e, C) and said nothing: B and C both had e."""
    router: Router = world["router"]
    b, c = 998_801, 998_899
    e = "r7s-twice@example.com"
    step, jobs = _discard_step(router, b, e)
    errors: list[BaseException] = []

    def x() -> None:
        try:
            router.execute(INSERT_USER, {"u": b, "e": e})
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=x)
    try:
        with _held(router, "users", "user_id", b, b):  # a gap lock: X's owner insert waits
            thread.start()
            time.sleep(0.5)  # X adopted (e, B) and checked it; its owner insert waits
            assert thread.is_alive()
            assert _finish(router, step, jobs) == 1  # (e, B) removed: B was absent
            router.execute(INSERT_USER, {"u": c, "e": e})  # Y: e is free
    finally:
        thread.join(30)
    assert not thread.is_alive()
    # X is refused: e taken by C (or, when its check of the adopted row ran before its owner
    # insert waited on the test's gap lock, a lock wait on that insert while the discard
    # waited on X's check): either way not both owners.
    assert len(errors) == 1 and isinstance(errors[0], ShardRouterError), errors
    assert _user(router, b) == [] and _user(router, c) == [(c, e)]
    assert _lookup(router, e) == [(e, c)]


def test_a_discard_deciding_on_a_row_makes_its_adopter_wait_and_keeps_the_row(
    world: dict[str, Any],
) -> None:
    """The other order: the discard has seen B absent; X inserts B again with e (adopts
    (e, B), writes B, commits) before the discard's delete. The discard's delete and its
    owner check run in one write: it sees B and rolls back, (e, B) stays, B has e."""
    router: Router = world["router"]
    b = 998_701
    e = "r7s-wait@example.com"
    step, jobs = _discard_step(router, b, e)
    router.execute(INSERT_USER, {"u": b, "e": e})  # X: adopts (e, B), writes B
    assert _finish(router, step, jobs) == 0  # the discard sees B and keeps the row
    assert _user(router, b) == [(b, e)]
    assert _lookup(router, e) == [(e, b)]


@pytest.mark.parametrize("taken", [False, True], ids=["written-again", "taken-meanwhile"])
def test_in_a_transaction_an_adopted_row_removed_before_its_owner_is_checked_at_commit(
    world: dict[str, Any], taken: bool
) -> None:
    """In router.transaction(), X adopts (e, B) and writes B; the discard had seen B absent
    before and removes (e, B) while X's owner insert waited on a gap lock. X's commit checks
    its adopted rows (LookupLedger.verify): (e, B) is gone, so it is written again before the
    commit and B keeps its lookup row; or, when Y took e (inserted C) meanwhile, X's commit is
    refused (typed), nothing of X is committed and C keeps e."""
    router: Router = world["router"]
    b, c = (998_501, 998_599) if taken else (998_601, 998_699)
    e = f"r7s-txn-{taken}@example.com"
    step, jobs = _discard_step(router, b, e)
    errors: list[BaseException] = []
    inserted = threading.Event()
    go_on = threading.Event()

    def x() -> None:
        try:
            with router.transaction() as txn:
                txn.execute(INSERT_USER, {"u": b, "e": e})
                inserted.set()
                go_on.wait(20)
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=x)
    try:
        with _held(router, "users", "user_id", b, b):
            thread.start()
            time.sleep(0.5)  # X adopted (e, B); its owner insert waits on the gap lock
            assert thread.is_alive() and not inserted.is_set()
            assert _finish(router, step, jobs) == 1  # B absent and not locked: removed
            if taken:
                router.execute(INSERT_USER, {"u": c, "e": e})  # Y takes e
        assert inserted.wait(20)
        assert _lookup(router, e) == ([(e, c)] if taken else [])  # until X's commit
        go_on.set()
    finally:
        go_on.set()
        thread.join(30)
    if taken:
        assert len(errors) == 1 and isinstance(errors[0], ShardRouterError), errors
        assert "already belongs to another owner" in str(errors[0])
        assert _user(router, b) == [] and _user(router, c) == [(c, e)]
        assert _lookup(router, e) == [(e, c)]
    else:
        assert errors == []
        assert _user(router, b) == [(b, e)]
        assert _lookup(router, e) == [(e, b)]
