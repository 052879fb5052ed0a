"""Review of dd0fecf (a discard decides under lock; an adopter checks again under lock), on real
MariaDB shards (the module ``world`` of test_issue7_review). The others are attacks that held,
kept as guards.

Findings, all fixed (verify exempts only values another owner freed; the parts of a write on
one shard share one connection; the ORM commit flushes until clean before verify; guard parts
run after every owner part):

- test_an_undone_insert_of_the_same_owner_does_not_exempt_its_adopted_row_from_verify:
  LookupLedger.verify skips every adopted row whose value is in ``freed``; an insert of the same
  owner undone earlier in the transaction (claims (False, True, row)) puts the value there, so
  the row is never checked and a value taken meanwhile is held by two owners.
- test_a_one_connection_pool_can_discard_and_adopt_on_one_shard: two parts on one shard take two
  connections of its pool at once (hold and wait): with pool.size 1 (max_overflow 0) a discard
  whose lookup row lives on its owner's shard never commits, and an insert adopting such a row
  always fails.
- test_orm_rows_flushed_after_the_verify_are_not_checked: the before_commit hook flushes once;
  objects an after_flush_postexec listener adds are flushed by the commit's own loop after
  verify ran, so their adopted rows are never checked (the control, B added before commit, holds).
- test_a_guard_waiting_on_a_transaction_does_not_stall_its_verify: guard parts run in shard order,
  so when the lookup shard sorts first a guard holds its shared lock on the lookup row while its
  owner insert waits (for a transaction inserting the same key); a discard's DELETE queues behind
  it and that transaction's verify queues behind the DELETE: a cycle over two servers, nobody sees
  it, the commit stalls until a lock wait times out (14 s here).

Held (guards below): read-your-writes of a scope after a guarded insert (the lookup write already
set ``wrote``), the plain insert's cost (3 statements, no locking read), a rollback discard of 24
rows (32 statements: 24 owner checks + 4 places x (DELETE + owner read); 72 before), XA verify,
an async guarded insert cancelled while its guard waits, case-folded and duplicate adopted rows,
merchant_orders guards of a multi-row insert spanning shards, a threaded race of adopters,
discards, deletes and other owners (lookup shard equal to the owner shard or not), a failing
flush inside before_commit, and SQLite (the demo's backend; ``shardctl demo`` ran too).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router, _Runner
from shardrouter.errors import ShardRouterError
from shardrouter.orm import routed_sessionmaker
from shardrouter.sql.execution import discard_lookups, lookup_rows
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_r6_review5 import (
    INSERT_USER,
    _lookup,
    _same_shard_user,
    _user,
)
from tests.integration.test_issue7_r6_review5 import _User as User
from tests.integration.test_issue7_review7s import _finish, _held, _place

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(90)]


def _orphan(router: Router, b: int, e: str) -> Any:
    """Write the lookup row (e, B) directly, B absent (an orphan, or a row a discard is about
    to judge). Returns its LookupRow."""
    topology = router.topology
    (row,) = lookup_rows(topology, topology.table("users"), [{"user_id": b, "email": e}])
    with router.engines.primary(row.shard).begin() as conn:
        conn.execute(text(f"INSERT INTO {row.physical} VALUES (:e, :u)"), {"e": e, "u": b})
    return row


def _email_on(router: Router, shard: str, prefix: str) -> str:
    """An e-mail whose user_emails row lives on ``shard``."""
    return next(
        e
        for e in (f"{prefix}{n}@example.com" for n in range(10_000))
        if _place(router, e)[0] == shard
    )


def _email_off(router: Router, shard: str, prefix: str) -> str:
    """An e-mail whose user_emails row lives on another shard than ``shard``."""
    return next(
        e
        for e in (f"{prefix}{n}@example.com" for n in range(10_000))
        if _place(router, e)[0] != shard
    )


# -- finding: a Scope's read-your-writes is lost after a guarded insert ---------------------------


@pytest.fixture
def replicated(world: dict[str, Any]) -> Iterator[Router]:
    """The world's shards, each with a 'replica': another database on the same server, with
    an empty users table, so a read that went to a replica finds nothing."""
    router: Router = world["router"]
    raw = router.topology.config.model_dump(by_alias=True, mode="json")
    for name, shard in raw["shards"].items():
        primary = router.topology.shards[name].primary
        replica = f"{primary.database}_r7d_replica"
        shard["replicas"] = [primary.set(database=replica).render_as_string(hide_password=False)]
        with router.engines.primary(name).begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS {replica}"))
            conn.execute(text(f"CREATE DATABASE {replica}"))
            conn.execute(
                text(f"CREATE TABLE {replica}.users (user_id BIGINT PRIMARY KEY, email TEXT)")
            )
    out = Router(Topology(config_from_dict(raw)), max_fanout=None)
    try:
        yield out
    finally:
        out.close()
        for name in raw["shards"]:
            primary = router.topology.shards[name].primary
            with router.engines.primary(name).begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS {primary.database}_r7d_replica"))


@pytest.mark.parametrize("adopted", [False, True], ids=["created", "adopted"])
def test_scope_reads_its_own_insert_that_adopted_a_lookup_row(
    replicated: Router, adopted: bool
) -> None:
    """In router.scope(), a write sends the scope's later reads to the primaries (a replica may
    lag). An insert that adopted a lookup row runs as a guarded write (_Runner.run returns
    _write_together before it sets ``wrote``): the scope's next read goes to the replica and
    does not see the row just inserted."""
    router = replicated
    b = 997_101 if adopted else 997_151
    e = f"r7d-scope-{adopted}@example.com"
    if adopted:
        _orphan(router, b, e)  # left by a crash, say: the insert adopts it
    q = "SELECT email FROM users WHERE user_id = :u"
    with router.scope() as scope:
        scope.execute(INSERT_USER, {"u": b, "e": e})
        seen = scope.execute(q, {"u": b}).scalar()
    assert seen == e  # read-your-writes


# -- finding: an undone insert of the same owner exempts its adopted row from verify ---------------


def test_an_undone_insert_of_the_same_owner_does_not_exempt_its_adopted_row_from_verify(
    world: dict[str, Any],
) -> None:
    """In router.transaction(), X's first INSERT of B (with D, which exists: duplicate key) fails
    after writing (e, B): the ledger records the value as freed by an undone insert. X inserts B
    again: its lookup write adopts (e, B). A discard that had seen B absent removes (e, B) while
    X's owner insert waits; Y inserts C with e. X's commit must be refused (e is C's), as when
    there was no first attempt (test_issue7_review7s ...checked_at_commit[taken-meanwhile]).
    verify skips (e, B) because e is in ``freed`` (meant for a value handed over from another
    owner): X commits, B and C both hold e."""
    router: Router = world["router"]
    b = 997_201
    d = _same_shard_user(router, b)
    c = 997_299
    e, e_d = "r7d-undone@example.com", "r7d-undone-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    topology = router.topology
    rows = lookup_rows(topology, topology.table("users"), [{"user_id": b, "email": e}])
    errors: list[BaseException] = []
    first_failed = threading.Event()
    second = threading.Event()
    inserted = threading.Event()
    both = (
        "INSERT INTO users (user_id, email, name, tier, tag, score) VALUES"
        " (:b, :e, 'r7d', 'mid', 'x', 1), (:d, :ed, 'r7d', 'mid', 'x', 1)"
    )

    def x() -> None:
        try:
            with router.transaction() as txn:
                with pytest.raises(ShardRouterError):
                    txn.execute(both, {"b": b, "e": e, "d": d, "ed": e_d})
                first_failed.set()
                assert second.wait(20)
                txn.execute(INSERT_USER, {"u": b, "e": e})
                inserted.set()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=x)
    try:
        thread.start()
        assert first_failed.wait(20)
        assert _lookup(router, e) == [(e, b)]  # written by the failed first attempt
        step = discard_lookups(topology, rows)
        checks = step.send(None)  # the owner checks: B absent
        jobs = step.send(_Runner(router).run(checks))
        with _held(router, "users", "user_id", b, b):  # X's owner insert waits (gap lock)
            second.set()
            time.sleep(0.5)  # X adopted (e, B); its owner insert waits
            assert thread.is_alive() and not inserted.is_set()
            assert _finish(router, step, jobs) == 1  # B absent and not locked: removed
            router.execute(INSERT_USER, {"u": c, "e": e})  # Y takes e
    finally:
        second.set()
        thread.join(30)
    assert not thread.is_alive()
    holders = sorted(u for u in (b, c) if _user(router, u))
    assert holders == [c], f"users holding {e}: {holders}; lookup {_lookup(router, e)}"
    assert len(errors) == 1 and isinstance(errors[0], ShardRouterError), errors


# -- finding: two parts on one shard hold one pooled connection and wait for another -----------


@pytest.fixture
def one_connection(world: dict[str, Any]) -> Iterator[Router]:
    """The world's shards with pools of one connection (size 1, max_overflow 0: valid)."""
    router: Router = world["router"]
    raw = router.topology.config.model_dump(by_alias=True, mode="json")
    for shard in raw["shards"].values():
        pool = shard.setdefault("pool", {})
        pool.update({"size": 1, "max_overflow": 0, "timeout_s": 2.0})
    out = Router(Topology(config_from_dict(raw)), max_fanout=None)
    try:
        yield out
    finally:
        out.close()


@pytest.mark.parametrize("what", ["discard", "adopting-insert"])
def test_a_one_connection_pool_can_discard_and_adopt_on_one_shard(
    one_connection: Router, caplog: pytest.LogCaptureFixture, what: str
) -> None:
    """A discard of an orphan whose lookup row lives on its owner's shard (DELETE, then the
    owner check, in two open transactions on two connections of one pool), and an insert that
    adopts such a row (owner insert and guard read, likewise): each holds the shard's one
    connection and waits for a second until the pool times out. Before dd0fecf both ran one
    statement per connection at a time. The orphan is never removed (check lookups --fix runs
    the same discard), and B cannot be inserted at all."""
    router = one_connection
    b = 997_301 if what == "discard" else 997_351
    home = str(router.route_key(user_id=b)[0])
    e = _email_on(router, home, f"r7d-pool-{what}-")
    row = _orphan(router, b, e)
    assert str(row.shard) == home
    if what == "discard":
        with caplog.at_level(logging.WARNING, logger="shardrouter"):
            removed = _Runner(router).drive(discard_lookups(router.topology, [row]))
        assert removed == 1, [r.getMessage() for r in caplog.records]
        assert _lookup(router, e) == []
    else:
        router.execute(INSERT_USER, {"u": b, "e": e})  # adopts (e, B)
        assert _user(router, b) == [(b, e)] and _lookup(router, e) == [(e, b)]


# -- finding: the ORM verifies before the commit's own flush loop ------------------------------


@pytest.mark.parametrize("late", [False, True], ids=["added-before-commit", "added-by-listener"])
def test_orm_rows_flushed_after_the_verify_are_not_checked(
    world: dict[str, Any], late: bool
) -> None:
    """An after_flush_postexec listener adds B (SQLAlchemy's commit flushes again for that, up
    to 100 times). _before_commit flushed once and ran verify; B's flush comes after it. B's
    lookup write adopts (e, B); a discard that had seen B absent removes it before B's owner
    insert (run here from a before_cursor_execute hook), and Y takes e. The commit must be
    refused (verify would find e taken); instead B commits with e and C keeps e too."""
    router: Router = world["router"]
    b, c, a = (997_401, 997_499, 997_450) if late else (997_411, 997_489, 997_460)
    e = f"r7d-orm-late-{late}@example.com"
    row = _orphan(router, b, e)
    topology = router.topology
    step = discard_lookups(topology, [row])
    checks = step.send(None)
    jobs = step.send(_Runner(router).run(checks))  # B absent: the discard will delete
    Session = routed_sessionmaker(router)
    added: list[bool] = []
    fired: list[bool] = []
    home = router.route_key(user_id=b)[0]
    engine = router.engines.primary(home)

    def before(
        conn: Any, cursor: Any, statement: str, params: Any, context: Any, many: Any
    ) -> None:
        if (
            not fired
            and statement.lstrip().upper().startswith("INSERT INTO USERS")
            and str(b) in repr(params)
        ):
            fired.append(True)
            assert _finish(router, step, jobs) == 1  # (e, B) removed: B still absent
            router.execute(INSERT_USER, {"u": c, "e": e})  # Y takes e

    event.listen(engine, "before_cursor_execute", before)
    error: BaseException | None = None
    try:
        with Session() as session:

            @event.listens_for(session, "after_flush_postexec")
            def more(s: Any, ctx: Any) -> None:
                if not added:
                    added.append(True)
                    s.add(User(user_id=b, email=e, tier="mid", tag="x", name="late", score=1))

            session.add(User(user_id=a, email=f"r7d-orm-a-{late}@example.com", tier="mid", tag="x"))
            if not late:  # the control: B flushed by the commit hook's own flush
                added.append(True)
                session.add(User(user_id=b, email=e, tier="mid", tag="x", name="early", score=1))
            try:
                session.commit()
            except ShardRouterError as exc:
                error = exc
    finally:
        event.remove(engine, "before_cursor_execute", before)
    assert fired, "B's owner insert never ran"
    holders = [u for u in (b, c) if _user(router, u)]
    assert holders == [c], f"users holding {e}: {holders}; lookup {_lookup(router, e)}"
    assert error is not None


# -- held: guards -------------------------------------------------------------------------------


def _statements(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, "statement", "") for r in caplog.records if getattr(r, "statement", "")]


def test_an_insert_without_adopted_rows_pays_nothing_new(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The common path: lookup insert, uniqueness read, owner insert; no guard read."""
    router: Router = world["router"]
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        caplog.clear()
        router.execute(INSERT_USER, {"u": 997_501, "e": "r7d-plain@example.com"})
        statements = _statements(caplog)
    assert len(statements) == 3, statements
    assert not any("FOR UPDATE" in s for s in statements), statements


def test_a_rollback_discard_of_many_rows_runs_one_write_per_place(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """A transaction inserts 24 users on one shard and rolls back: the discard checks the
    owners (one read each) and then removes the rows in one write per (lookup place, owner
    place), not one write per row."""
    router: Router = world["router"]
    users = [997_601]
    while len(users) < 24:
        users.append(_same_shard_user(router, users[-1]))
    emails = [f"r7d-many-{u}@example.com" for u in users]
    places = {_place(router, e) for e in emails}
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        with pytest.raises(RuntimeError), router.transaction() as txn:
            for u, e in zip(users, emails, strict=True):
                txn.execute(INSERT_USER, {"u": u, "e": e})
            caplog.clear()
            raise RuntimeError("roll back")
        statements = _statements(caplog)
    assert all(_lookup(router, e) == [] for e in emails)
    deletes = [s for s in statements if s.startswith("DELETE")]
    print(f"rollback of {len(users)} rows: {len(statements)} statements, {len(places)} places")
    # One DELETE and one owner check per row, in one write per (lookup place, owner place)
    # (an OR of rows may be read with a full scan, locking every row: see review 7f), after
    # one owner check per row; never redone row by row.
    assert len(deletes) == len(users), statements
    assert len(statements) <= 3 * len(users), statements


def test_xa_transaction_verify_refuses_a_value_taken_meanwhile(world: dict[str, Any]) -> None:
    """Router(xa=True): as test_issue7_review7s ...checked_at_commit[taken-meanwhile]; the XA
    commit is refused before XA PREPARE, nothing of X is committed, C keeps e."""
    base: Router = world["router"]
    router = Router(base.topology, engines=base.engines, max_fanout=None, xa=True)
    b, c = 997_701, 997_799
    e = "r7d-xa@example.com"
    row = _orphan(router, b, e)
    step = discard_lookups(router.topology, [row])
    checks = step.send(None)
    jobs = step.send(_Runner(router).run(checks))
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
            time.sleep(0.5)
            assert thread.is_alive() and not inserted.is_set()
            assert _finish(router, step, jobs) == 1
            router.execute(INSERT_USER, {"u": c, "e": e})
        assert inserted.wait(20)
        go_on.set()
    finally:
        go_on.set()
        thread.join(30)
    assert len(errors) == 1 and isinstance(errors[0], ShardRouterError), errors
    assert _user(router, b) == [] and _user(router, c) == [(c, e)]
    assert _lookup(router, e) == [(e, c)]
    assert not router.recover_xa(min_age_s=0).in_doubt


def test_async_cancelled_guarded_insert_leaves_nothing(world: dict[str, Any]) -> None:
    """An async insert adopting a lookup row whose guard read waits (the row held FOR UPDATE by
    another connection), cancelled by a timeout: the owner row is rolled back, the adopted row
    stays (it was there before), no connection stays checked out."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    loop: asyncio.AbstractEventLoop = world["loop"]
    b = 997_801
    home = str(router.route_key(user_id=b)[0])
    e = _email_off(router, home, "r7d-cancel-")
    _orphan(router, b, e)

    async def insert() -> None:
        await asyncio.wait_for(aio.execute(INSERT_USER, {"u": b, "e": e}), 1.0)

    with (
        _held(router, "user_emails", "email", e, e),
        pytest.raises((TimeoutError, asyncio.TimeoutError)),
    ):
        loop.run_until_complete(insert())
    assert _user(router, b) == []
    assert _lookup(router, e) == [(e, b)]
    checked = sum(en.sync_engine.pool.checkedout() for en in aio._snap.engines.all)  # type: ignore[attr-defined]
    assert checked == 0
    loop.run_until_complete(aio.execute(INSERT_USER, {"u": b, "e": e}))
    assert _user(router, b) == [(b, e)] and _lookup(router, e) == [(e, b)]


@pytest.mark.parametrize("same", [True, False], ids=["lookup-on-owner-shard", "other-shard"])
def test_concurrent_adopters_and_discards_keep_one_owner_per_value(
    world: dict[str, Any], same: bool
) -> None:
    """Threads race on a few e-mails: inserts of users that adopt orphan rows, discards of
    those rows, deletes, inserts of other users taking the values. At the end: no value held
    by two users, every user has its lookup row, no lookup row without its owner (after a
    final discard)."""
    router: Router = world["router"]
    base = 996_000 if same else 996_500
    pairs = []
    for n in range(4):
        u = base + n * 7
        home = str(router.route_key(user_id=u)[0])
        pick = _email_on if same else _email_off
        pairs.append((u, u + 3, pick(router, home, f"r7d-race-{same}-{n}-")))
    stop = time.monotonic() + 8
    errors: list[BaseException] = []

    def orphaner() -> None:
        while time.monotonic() < stop:
            for u, _, e in pairs:
                try:
                    if not _lookup(router, e):
                        _orphan(router, u, e)
                except Exception:
                    pass
                rows = lookup_rows(
                    router.topology, router.topology.table("users"), [{"user_id": u, "email": e}]
                )
                try:
                    _Runner(router).drive(discard_lookups(router.topology, rows))
                except Exception as exc:  # best effort by design: must not raise
                    errors.append(exc)

    def writer(which: int) -> None:
        while time.monotonic() < stop:
            for u, v, e in pairs:
                who = u if which == 0 else v
                with contextlib.suppress(ShardRouterError):
                    router.execute(INSERT_USER, {"u": who, "e": e})
                with contextlib.suppress(ShardRouterError):
                    router.execute("DELETE FROM users WHERE user_id = :u", {"u": who})

    threads = [threading.Thread(target=orphaner)] + [
        threading.Thread(target=writer, args=(i,)) for i in (0, 1)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(40)
    assert not any(t.is_alive() for t in threads)
    assert errors == []
    for u, v, e in pairs:
        holders = [w for w in (u, v) if _user(router, w)]
        assert len(holders) <= 1, (e, holders)
        rows = lookup_rows(
            router.topology,
            router.topology.table("users"),
            [{"user_id": w, "email": e} for w in (u, v)],
        )
        _Runner(router).drive(discard_lookups(router.topology, rows))
        assert _lookup(router, e) == [(e, w) for w in holders], (e, holders)


# -- held: SQLite (the demo backend) ---------------------------------------------------------------


@pytest.fixture
def sqlite_router(tmp_path: Any) -> Iterator[Router]:
    """The demo's topology on SQLite files in tmp_path, with the schema applied."""
    from pathlib import Path

    from shardrouter.engine.engines import ShardEngines
    from shardrouter.ops.schema import apply as apply_schema

    config = Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml"
    env = {"SHARDROUTER_DEMO_DIR": str(tmp_path)}
    topology = Topology.load(config, env)
    engines = ShardEngines(topology)
    apply_schema(topology, engines).raise_for_errors()
    router = Router(topology, engines=engines)
    try:
        yield router
    finally:
        router.close()


@pytest.mark.parametrize("same", [True, False], ids=["lookup-on-owner-shard", "other-shard"])
def test_sqlite_discard_guard_and_verify(sqlite_router: Router, same: bool) -> None:
    """On SQLite files: a discard of an orphan (one write of two parts, two connections,
    maybe on one file), an insert adopting an orphan (owner insert + guard read), a
    transaction adopting one (verify), a rolled-back transaction's discard."""
    router = sqlite_router
    insert = "INSERT INTO users (user_id, email) VALUES (:u, :e)"
    for n, b in enumerate((501, 502, 503, 504)):
        home = str(router.route_key(user_id=b)[0])
        pick = _email_on if same else _email_off
        e = pick(router, home, f"r7d-sqlite-{n}-")
        row = _orphan(router, b, e)
        if n == 0:
            assert _Runner(router).drive(discard_lookups(router.topology, [row])) == 1
            assert _lookup(router, e) == []
        elif n == 1:
            router.execute(insert, {"u": b, "e": e})
            assert _lookup(router, e) == [(e, b)]
        elif n == 2:
            with router.transaction() as txn:
                txn.execute(insert, {"u": b, "e": e})
            assert _lookup(router, e) == [(e, b)]
        else:
            with pytest.raises(RuntimeError), router.transaction() as txn:
                txn.execute(insert, {"u": b, "e": e})
                txn.execute(insert, {"u": b + 1000, "e": f"x{e}"})
                raise RuntimeError("roll back")
            assert _lookup(router, f"x{e}") == []
            assert _lookup(router, e) == [(e, b)]  # the orphan: adopted, not ours to remove


# -- held: guards count what they read ------------------------------------------------------------


def _guard_reads(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for s in _statements(caplog) if "FOR UPDATE" in s and "user_emails" in s)


def test_guard_counts_a_case_folded_adopted_row(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """The orphan ('R7D-Fold@Example.com', B); B inserted with 'r7d-fold@example.com ' adopts
    it (one value for the lookup): its guard reads one row, expects one."""
    router: Router = world["router"]
    b = 997_901
    stored, ours = "R7D-Fold@Example.com", "r7d-fold@example.com "
    _orphan(router, b, stored)
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        router.execute(INSERT_USER, {"u": b, "e": ours})
        assert _guard_reads(caplog) == 1  # adopted: guarded
    assert _user(router, b) == [(b, ours)]
    assert _lookup(router, stored) == [(stored, b)]


def test_guard_counts_duplicate_rows_of_one_upsert(
    world: dict[str, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """One multi-row upsert names B twice, its e-mail spelt two ways that fold to one value,
    the lookup row already there: two adopted rows, one stored row, the guard expects one."""
    router: Router = world["router"]
    b = 997_911
    e1, e2 = "r7d-dup@example.com", "R7D-DUP@example.com "
    _orphan(router, b, e1)
    sql = (
        "INSERT INTO users (user_id, email, name, tier, tag, score) VALUES"
        " (:u, :e1, 'one', 'mid', 'x', 1), (:u, :e2, 'two', 'mid', 'x', 1)"
        " ON DUPLICATE KEY UPDATE name = VALUES(name)"
    )
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        router.execute(sql, {"u": b, "e1": e1, "e2": e2})
        assert _guard_reads(caplog) == 1  # adopted: guarded
    assert _user(router, b) == [(b, e1)]
    assert _lookup(router, e1) == [(e1, b)]


def test_guards_of_a_multi_row_order_insert_spanning_shards(world: dict[str, Any]) -> None:
    """Orders of two users on two shards, merchant 7; both merchant_orders rows already there
    (left by a crash): the insert's guards (one per merchant_orders place) pass and every
    part commits; an order whose row was not there gets it created."""
    router: Router = world["router"]
    topology = router.topology
    u1 = 997_921
    home = router.route_key(user_id=u1)[0]
    u2 = next(u for u in range(u1 + 1, u1 + 1000) if router.route_key(user_id=u)[0] != home)
    ids = topology.id_generator("orders", worker_id=23)
    (o1,) = ids.next_ids(1, user_id=u1)
    o2, o3 = ids.next_ids(2, user_id=u2)
    for o, u in ((o1, u1), (o2, u2)):
        (row,) = lookup_rows(
            topology,
            topology.table("orders"),
            [{"order_id": o, "user_id": u, "merchant_id": 7}],
        )
        with router.engines.primary(row.shard).begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {row.physical} (merchant_id, order_id, user_id)"
                    " VALUES (7, :o, :u)"
                ),
                {"o": o, "u": u},
            )
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status) VALUES"
        " (:o1, :u1, 7, 1, 'new'), (:o2, :u2, 7, 2, 'new'), (:o3, :u2, 7, 3, 'new')",
        {"o1": o1, "u1": u1, "o2": o2, "u2": u2, "o3": o3},
    )
    found = router.execute(
        "SELECT order_id, user_id FROM merchant_orders WHERE merchant_id = 7"
        " AND order_id IN (:o1, :o2, :o3) ORDER BY order_id",
        {"o1": o1, "o2": o2, "o3": o3},
    ).rows
    assert sorted(tuple(r) for r in found) == sorted([(o1, u1), (o2, u2), (o3, u2)])
    got = router.execute(
        "SELECT order_id FROM orders WHERE order_id IN (:o1, :o2, :o3)",
        {"o1": o1, "o2": o2, "o3": o3},
    ).rows
    assert len(got) == 3


# -- attack: a guard's shared lock held across shards, a discard queued behind it -----------------


def test_a_guard_waiting_on_a_transaction_does_not_stall_its_verify(
    world: dict[str, Any],
) -> None:
    """The orphan (e, B), B absent, its lookup row on a lower shard than B. Transaction T
    inserts B (adopts (e, B); holds B's key). G inserts B outside a transaction: its write
    runs in shard order, so its guard takes a shared lock on (e, B) first, then its owner
    insert waits for T. A discard of the orphan (its owner checks saw B absent) queues its
    DELETE behind G's shared lock. T commits: its verify's shared read of (e, B) queues behind
    the discard's DELETE. T waits for the discard, which waits for G, which waits for T: on
    two servers, no deadlock is seen, and T's commit stalls until a lock wait times out."""
    router: Router = world["router"]
    topology = router.topology
    b = next(
        u
        for u in range(997_951, 999_000)
        if str(router.route_key(user_id=u)[0]) != min(str(s) for s in topology.shards)
    )
    home = str(router.route_key(user_id=b)[0])
    e = next(
        f"r7d-stall-{n}@example.com"
        for n in range(10_000)
        if _place(router, f"r7d-stall-{n}@example.com")[0] < home
    )
    row = _orphan(router, b, e)
    step = discard_lookups(topology, [row])
    checks = step.send(None)
    jobs = step.send(_Runner(router).run(checks))  # B absent: the discard will delete
    t_inserted, t_commit = threading.Event(), threading.Event()
    outcome: dict[str, Any] = {}

    def t() -> None:
        try:
            with router.transaction() as txn:
                txn.execute(INSERT_USER, {"u": b, "e": e})
                t_inserted.set()
                assert t_commit.wait(30)
                outcome["t_start"] = time.monotonic()
        except BaseException as exc:  # reported to the test
            outcome["t_error"] = exc
        outcome["t_end"] = time.monotonic()

    def g() -> None:
        try:
            router.execute(INSERT_USER, {"u": b, "e": e})
        except BaseException as exc:  # B is T's: a duplicate key is expected
            outcome["g_error"] = exc

    def d() -> None:
        try:
            outcome["removed"] = _finish(router, step, jobs)
        except BaseException as exc:
            outcome["d_error"] = exc

    threads = [threading.Thread(target=f) for f in (t, g, d)]
    threads[0].start()
    assert t_inserted.wait(20)
    threads[1].start()
    time.sleep(0.5)  # G's guard holds (e, B) shared; its owner insert waits for T
    threads[2].start()
    time.sleep(0.5)  # the discard's DELETE waits for G's shared lock
    t_commit.set()
    for thread in threads:
        thread.join(60)
    assert not any(th.is_alive() for th in threads)
    took = outcome["t_end"] - outcome["t_start"]
    assert "t_error" not in outcome, outcome
    assert took < 3, f"T's commit took {took:.1f}s: {outcome}"
    assert _user(router, b) == [(b, e)] and _lookup(router, e) == [(e, b)]


def test_orm_commit_whose_flush_fails_leaves_no_lookup_row(world: dict[str, Any]) -> None:
    """The flush now runs inside before_commit: one that fails (B's key is taken) raises from
    commit() typed, the lookup row it created is removed, and the session works afterwards."""
    router: Router = world["router"]
    b = 997_981
    router.execute(INSERT_USER, {"u": b, "e": "r7d-orm-fail-b@example.com"})
    e = "r7d-orm-fail-new@example.com"
    Session = routed_sessionmaker(router)
    with Session() as session:
        session.add(User(user_id=b, email=e, tier="mid", tag="x"))
        with pytest.raises(Exception) as info:
            session.commit()
        session.rollback()
        assert _lookup(router, e) == []
        session.add(User(user_id=b + 1, email=e, tier="mid", tag="x"))
        session.commit()
    assert isinstance(info.value, ShardRouterError) or "Duplicate" in str(info.value), info.value
    assert _user(router, b + 1) == [(b + 1, e)] and _lookup(router, e) == [(e, b + 1)]
