"""Review 7f of 78f01f6 (lookup part): a DELETE's cleanup and the settle's removals run like a
discard (DELETE of the lookup rows and a NOWAIT locking read of their owners in one write,
grouped per lookup place and owner place, row by row when a group fails); LookupLedger.add no
longer lists an upsert's adopted rows for verify. On real MariaDB shards (the module ``world``
of test_issue7_review). Failing tests here are findings; the others are attacks that held,
kept as guards.

Findings, both fixed (verify checks an upsert's adopted rows whose owner row, read in the
transaction, has the value; a removal runs one DELETE and one owner check per row, each an
equality on the row's key, all of a place pair's in one write, halves when one fails):

- test_a_transaction_upsert_that_inserts_keeps_its_e_mail_unique: an upsert in a transaction
  that inserts its owner (taking the value) and adopted an orphan is no longer verified; a
  discard of that row before its owner statement plus another owner taking the value leaves
  two committed owners of one unique e-mail. New in 78f01f6 (78f01f6~1 refused the commit).
- test_a_signup_in_flight_does_not_send_a_bulk_cleanup_row_by_row: a group's lookup DELETE and
  owner check (OR-lists of (col = v AND ...)) are read by full scans (EXPLAIN type ALL; FORCE
  INDEX (PRIMARY) gives range), so the NOWAIT check locks every owner row of the shard and
  fails on any unrelated writer's row (a signup in flight); every group then runs row by row:
  2,040 statements in sequence for 1,000 users (old code: 1,004, in parallel).

Held (guards): rowcount and exactly the re-inserted owners' rows kept in a bulk DELETE of 200
users with re-inserts (committed, in flight then committed, in flight then rolled back) and
bystander locks; the lookup and owner on one shard (one connection) decide at once, sync and
async; an async DELETE cancelled during its cleanup (CancelledError, rows removed, no
connection left); XA transaction deletes; ORM session deletes; merchant_orders (split owner
tables) bulk delete with one re-insert; 15 s of bulk inserts against bulk deletes (no
deadlock, no lock wait, no row left).

Cost of one DELETE of 1,000 users on 4 shards (test_cost_of_deleting_1000_users, statements
counted with before_cursor_execute on the primaries): 78f01f6: 36 statements (32 cleanup), 0.41
s (cleanup 0.24 s); with one unrelated row lock per shard: 2,040 (2,032), 1.41 s (1.32 s).
78f01f6~1: 1,004 (1,000), 0.61 s (0.40 s); with the locks: 1,008, 0.59 s. After the fix
(same command): 2,004 (2,000), 0.61 s (cleanup 0.56 s); with the locks: 2,008 (2,000), 0.48 s
(0.43 s): the bystanders cost nothing.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import event, text

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.orm import routed_sessionmaker
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_r6_review5 import INSERT_USER, _lookup, _user
from tests.integration.test_issue7_r6_review5 import _User as User

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


# -- helpers ----------------------------------------------------------------------------------


def _email_place(router: Router, email: str) -> tuple[str, str]:
    topology = router.topology
    slot = topology.slot_for("user_emails", email)
    return str(topology.shard_of_slot(slot)), topology.table("user_emails").physical(slot)


def _home(router: Router, user: int) -> str:
    return str(router.route_key(user_id=user)[0])


def _insert_many(router: Router, users: dict[int, str]) -> None:
    """Insert ``users`` (id -> e-mail) with multi-row INSERTs of 250 rows."""
    items = list(users.items())
    for start in range(0, len(items), 250):
        chunk = items[start : start + 250]
        values = ", ".join(f"({u}, '{e}', 'r7f', 'mid', 'x', 1)" for u, e in chunk)
        sql = f"INSERT INTO users (user_id, email, name, tier, tag, score) VALUES {values}"
        assert router.execute(sql).rowcount == len(chunk)


def _delete_sql(users: list[int]) -> str:
    return f"DELETE FROM users WHERE user_id IN ({', '.join(str(u) for u in users)})"


def _lookups_of(router: Router, emails: list[str]) -> dict[str, int]:
    """e-mail -> user_id of every user_emails row of ``emails`` (read on every shard)."""
    out: dict[str, int] = {}
    wanted = set(emails)
    for engine in router.engines.primaries.values():
        with engine.connect() as conn:
            for physical in router.topology.table("user_emails").physical_names:
                for e, u in conn.execute(text(f"SELECT email, user_id FROM {physical}")):
                    if e in wanted:
                        out[e] = u
    return out


def _users_of(router: Router, ids: list[int]) -> dict[int, str]:
    rows = router.execute(
        f"SELECT user_id, email FROM users WHERE user_id IN ({', '.join(map(str, ids))})"
    ).rows
    return {u: e for u, e in rows}


@contextmanager
def _counted(router: Router) -> Iterator[dict[str, Any]]:
    """Statements sent to the primaries (before_cursor_execute), by kind, and the time of the
    first and last lookup-cleanup statement."""
    counts: dict[str, Any] = {"statements": 0, "cleanup": 0, "first": None, "last": None}

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        counts["statements"] += 1
        if "user_emails" in statement or "LOCK IN SHARE MODE" in statement:
            counts["cleanup"] += 1
            now = time.monotonic()
            counts["first"] = counts["first"] or now
            counts["last"] = now

    engines = list(router.engines.primaries.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", hook)
    try:
        yield counts
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hook)


@contextmanager
def _before_cleanup(
    router: Router, action: Callable[[], None], aio: AsyncRouter | None = None
) -> Iterator[list[BaseException]]:
    """Run ``action`` (in another thread, to its end) the first time a DELETE of user_emails
    rows is about to run on any primary, from a thread other than the action's own ones."""
    fired = threading.Event()
    errors: list[BaseException] = []
    acting: set[int] = set()

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired.is_set() or threading.get_ident() in acting:
            return
        if not statement.startswith("DELETE FROM user_emails"):
            return
        fired.set()

        def act() -> None:
            acting.add(threading.get_ident())
            try:
                action()
            except BaseException as exc:  # reported to the test
                errors.append(exc)

        thread = threading.Thread(target=act)
        thread.start()
        thread.join(60)

    engines = list(router.engines.primaries.values())
    if aio is not None:
        engines = [e.sync_engine for e in aio._snap.engines.all]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", hook)
    try:
        yield errors
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hook)
    assert fired.is_set(), "no lookup cleanup ran"


class _Open:
    """A router.transaction() in its own thread that inserts users and waits, open (their
    owner rows uncommitted and locked), until told to commit or roll back."""

    def __init__(self, router: Router, users: dict[int, str]) -> None:
        self.router, self.users = router, users
        self.ready, self.go = threading.Event(), threading.Event()
        self.commit = True
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            with self.router.transaction() as txn:
                for u, e in self.users.items():
                    txn.execute(INSERT_USER, {"u": u, "e": e})
                self.ready.set()
                self.go.wait(60)
                if not self.commit:
                    raise _Rollback
        except _Rollback:
            pass
        except BaseException as exc:  # reported to the test
            self.errors.append(exc)
        finally:
            self.ready.set()

    def start(self) -> None:
        self.thread.start()
        assert self.ready.wait(30)

    def end(self, commit: bool) -> None:
        self.commit = commit
        self.go.set()
        self.thread.join(60)


class _Rollback(Exception):
    pass


class _Bystanders:
    """Unrelated writers: open transactions each holding one user's row (FOR UPDATE), taken
    after the owner DELETE ran (its own scan would wait on them) and before its cleanup."""

    def __init__(self, router: Router, users: list[int]) -> None:
        self.router, self.users = router, users
        self.held: list[tuple[Any, Any]] = []

    def start(self) -> None:
        topology = self.router.topology
        for user in self.users:
            slot = topology.slot_for("users", user)
            physical = topology.table("users").physical(slot)
            conn = self.router.engines.primary(str(topology.shard_of_slot(slot))).connect()
            trans = conn.begin()
            self.held.append((conn, trans))
            rows = conn.execute(
                text(f"SELECT user_id FROM {physical} WHERE user_id = :u FOR UPDATE"), {"u": user}
            ).all()
            assert rows, "the bystander must exist"

    def end(self) -> None:
        for conn, trans in self.held:
            trans.rollback()
            conn.close()
        self.held = []


def _spread(router: Router, base: int, n: int) -> dict[int, str]:
    return {base + i: f"r7f-{base}-{i}@example.com" for i in range(n)}


# -- the cost of a DELETE of 1,000 users (numbers in the report) ------------------------------


def test_cost_of_deleting_1000_users(world: dict[str, Any]) -> None:
    """One DELETE ... WHERE user_id IN (1,000 ids) on 4 shards: the router adds RETURNING and
    removes their 1,000 user_emails rows. Printed: statements sent to the primaries, those of
    the cleanup, the cleanup's wall time; with and without an unrelated writer holding one
    user's row on every shard (a group's owner check may then fail and run row by row)."""
    router: Router = world["router"]
    out = {}
    for case, base in (("quiet", 8_100_000), ("bystanders", 8_200_000)):
        users = _spread(router, base, 1000)
        _insert_many(router, users)
        bystanders: list[int] = []
        for shard in sorted(router.topology.shards):
            bystanders.append(
                next(u for u in range(base + 5000, base + 9000) if _home(router, u) == shard)
            )
        _insert_many(router, {u: f"r7f-by-{u}@example.com" for u in bystanders})
        held = _Bystanders(router, bystanders if case == "bystanders" else [])
        try:
            start = time.monotonic()
            with _counted(router) as n, _before_cleanup(router, held.start):
                rowcount = router.execute(_delete_sql(list(users))).rowcount
            took = time.monotonic() - start
        finally:
            held.end()
        cleanup_s = (n["last"] - n["first"]) if n["first"] else 0.0
        out[case] = {
            "rowcount": rowcount,
            "statements": n["statements"],
            "cleanup_statements": n["cleanup"],
            "delete_s": round(took, 3),
            "cleanup_s": round(cleanup_s, 3),
        }
        assert rowcount == 1000
        assert _lookups_of(router, list(users.values())) == {}
    print("R7F-COST", out)


# -- a DELETE of many users while some are inserted again, some in flight, bystanders locked -----


@pytest.mark.parametrize("bystanders", [False, True], ids=["quiet", "bystanders"])
def test_a_bulk_delete_with_owners_inserted_again_keeps_exactly_their_rows(
    world: dict[str, Any], bystanders: bool
) -> None:
    """200 users on 4 shards, deleted by one statement. Just before its cleanup: 10 of them
    inserted again with their e-mails (committed), 10 inserted again in an open transaction
    that commits after the DELETE returned, 10 in one that rolls back (documented orphans);
    optionally an unrelated writer holds one user's row on every shard. Expected: rowcount
    200; every user that exists at the end has its lookup row; every other deleted user's row
    is gone (except the rolled-back ones, documented)."""
    router: Router = world["router"]
    base = 8_300_000 if bystanders else 8_400_000
    users = _spread(router, base, 200)
    _insert_many(router, users)
    ids = list(users)
    again = {u: users[u] for u in ids[0:200:20]}  # 10
    flight_ok = {u: users[u] for u in ids[5:200:20]}  # 10
    flight_undone = {u: users[u] for u in ids[10:200:20]}  # 10
    by_ids = []
    for shard in sorted(router.topology.shards):
        by_ids.append(next(u for u in range(base + 5000, base + 9000) if _home(router, u) == shard))
    _insert_many(router, {u: f"r7f-by-{u}@example.com" for u in by_ids})
    # one transaction per user: a transaction stays on one shard
    opened_ok = [_Open(router, {u: e}) for u, e in flight_ok.items()]
    opened_undone = [_Open(router, {u: e}) for u, e in flight_undone.items()]
    opened = [*opened_ok, *opened_undone]
    held = _Bystanders(router, by_ids if bystanders else [])

    def meanwhile() -> None:
        _insert_many(router, again)
        for o in opened:
            o.start()
        held.start()

    try:
        with _before_cleanup(router, meanwhile) as errors:
            rowcount = router.execute(_delete_sql(ids)).rowcount
    finally:
        held.end()
    for o in opened_ok:
        o.end(commit=True)
    for o in opened_undone:
        o.end(commit=False)
    assert errors == [] and [o.errors for o in opened if o.errors] == []
    assert rowcount == 200
    present = _users_of(router, ids)
    assert present == {**again, **flight_ok}
    rows = _lookups_of(router, list(users.values()))
    for u, e in present.items():
        assert rows.get(e) == u, (u, e)
    left = {e: u for e, u in rows.items() if u not in present and u not in flight_undone}
    assert left == {}
    assert _lookups_of(router, [f"r7f-by-{u}@example.com" for u in by_ids]) == {
        f"r7f-by-{u}@example.com": u for u in by_ids
    }


# -- the same shard for the lookup row and its owner: one connection -----------------------------


def _email_on(router: Router, shard: str, prefix: str) -> str:
    return next(
        e
        for e in (f"{prefix}{n}@example.com" for n in range(10_000))
        if _email_place(router, e)[0] == shard
    )


@pytest.mark.parametrize("driver", ["sync", "async"])
def test_same_shard_cleanup_keeps_the_row_of_an_owner_in_flight_at_once(
    world: dict[str, Any], driver: str
) -> None:
    """B and D deleted by one statement, their user_emails rows on their own shard (the
    cleanup's DELETE and owner check share one connection). Before the cleanup, B is inserted
    again in an open transaction (uncommitted). The cleanup does not wait (< 3 s), removes D's
    row, keeps B's; B's transaction commits with its row."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    b = 8_500_001 if driver == "sync" else 8_500_101
    home = _home(router, b)
    d = next(u for u in range(b + 1, b + 1000) if _home(router, u) == home)
    eb = _email_on(router, home, f"r7f-same-{driver}-b-")
    ed = _email_on(router, home, f"r7f-same-{driver}-d-")
    _insert_many(router, {b: eb, d: ed})
    opened = _Open(router, {b: eb})
    with _before_cleanup(router, opened.start, aio if driver == "async" else None) as errors:
        start = time.monotonic()
        if driver == "sync":
            rowcount = router.execute(_delete_sql([b, d])).rowcount
        else:
            result = world["loop"].run_until_complete(aio.execute(_delete_sql([b, d])))
            rowcount = result.rowcount
        took = time.monotonic() - start
    opened.end(commit=True)
    assert errors == [] and opened.errors == []
    assert rowcount == 2
    assert took < 3, took
    assert _user(router, b) == [(b, eb)] and _user(router, d) == []
    assert _lookup(router, eb) == [(eb, b)] and _lookup(router, ed) == []


# -- async: cancelled during the cleanup -------------------------------------------------------


def test_async_delete_cancelled_during_its_cleanup_still_removes_the_rows(
    world: dict[str, Any],
) -> None:
    """An async DELETE of 40 users cancelled (task.cancel) while its cleanup runs: the caller
    gets CancelledError, the owner rows are deleted and every lookup row is removed; no
    connection stays checked out."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    loop: asyncio.AbstractEventLoop = world["loop"]
    users = _spread(router, 8_600_000, 40)
    _insert_many(router, users)
    state: dict[str, Any] = {}

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE FROM user_emails") and "done" not in state:
            state["done"] = True
            loop.call_soon_threadsafe(state["task"].cancel)

    engines = [e.sync_engine for e in aio._snap.engines.all]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", hook)

    async def main() -> None:
        state["task"] = asyncio.ensure_future(aio.execute(_delete_sql(list(users))))
        await asyncio.sleep(0)
        await state["task"]

    try:
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(main())
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hook)
    assert state.get("done")
    assert _users_of(router, list(users)) == {}
    assert _lookups_of(router, list(users.values())) == {}
    checked = sum(en.sync_engine.pool.checkedout() for en in aio._snap.engines.all)  # type: ignore[attr-defined]
    assert checked == 0


# -- XA and the ORM ------------------------------------------------------------------------------


def test_xa_transaction_deleting_owners_on_every_shard_removes_their_rows(
    world: dict[str, Any],
) -> None:
    """Router(xa=True): a transaction deletes 40 users on 4 shards (one statement) and one more
    by key; after the commit the settle removes their 41 rows; one user inserted again just
    before the settle keeps its row."""
    base: Router = world["router"]
    router = Router(base.topology, engines=base.engines, max_fanout=None, xa=True)
    users = _spread(router, 8_700_000, 41)
    _insert_many(router, users)
    ids = list(users)
    keep = ids[7]
    with (
        _before_cleanup(router, lambda: _insert_many(router, {keep: users[keep]})) as errors,
        router.transaction() as txn,
    ):
        assert txn.execute(_delete_sql(ids[:40])).rowcount == 40
        assert txn.execute("DELETE FROM users WHERE user_id = :u", {"u": ids[40]}).rowcount == 1
    assert errors == []
    assert _users_of(router, ids) == {keep: users[keep]}
    assert _lookups_of(router, list(users.values())) == {users[keep]: keep}
    assert not router.recover_xa(min_age_s=0).in_doubt


def test_orm_session_deleting_objects_removes_their_rows_and_keeps_one_inserted_again(
    world: dict[str, Any],
) -> None:
    """The routed ORM session deletes 12 users on several shards and commits; one of them is
    inserted again (by the router) just before the settle's removal: its row stays, the 11
    others go."""
    router: Router = world["router"]
    users = _spread(router, 8_800_000, 12)
    _insert_many(router, users)
    ids = list(users)
    keep = ids[3]
    sessions = routed_sessionmaker(router)
    again = {keep: users[keep]}
    with (
        _before_cleanup(router, lambda: _insert_many(router, again)) as errors,
        sessions() as session,
    ):
        for u in ids:
            session.delete(session.get(User, u))
        session.commit()
    assert errors == []
    assert _users_of(router, ids) == {keep: users[keep]}
    assert _lookups_of(router, list(users.values())) == {users[keep]: keep}


# -- finding: one signup in flight on an owner shard sends the whole cleanup row by row -----------


def test_a_signup_in_flight_does_not_send_a_bulk_cleanup_row_by_row(world: dict[str, Any]) -> None:
    """A DELETE of 1,000 users; while its cleanup runs, one unrelated user is being inserted
    on every shard (an open transaction: a signup in flight). The group's owner check (one
    OR of 250 (user_id, email) pairs, LOCK IN SHARE MODE NOWAIT) is read by a full scan of the
    users table (EXPLAIN: type ALL, printed), which locks every row it reads, so it fails on
    the unrelated uncommitted row, on every group; each group is then redone row by row: 1,000
    writes of 2 statements on 2 connections, one after the other (2,032 cleanup statements
    instead of 32; 1.3 s instead of 0.24 s here, and every row by row write pays its round
    trips in sequence on a real network). Expected: the check locks only the owners it names,
    so an unrelated writer costs nothing. (Fixed with one statement per row instead of ORs:
    2,000 cleanup statements, none redone.)"""
    router: Router = world["router"]
    base = 8_900_000
    users = _spread(router, base, 1000)
    _insert_many(router, users)
    signups = []
    for shard in sorted(router.topology.shards):
        u = next(u for u in range(base + 5000, base + 9000) if _home(router, u) == shard)
        signups.append(_Open(router, {u: f"r7f-signup-{u}@example.com"}))
    explained: list[Any] = []

    def meanwhile() -> None:
        for s in signups:
            s.start()

    def explain(conn: Any, cursor: Any, statement: str, params: Any, *args: Any) -> None:
        if "LOCK IN SHARE MODE" in statement and not any("check" in x for x in explained):
            try:  # the plan of the check, on its own connection (EXPLAIN takes no lock)
                raw = conn.connection.driver_connection.cursor()
                sql = statement.replace(" LOCK IN SHARE MODE NOWAIT", "")
                raw.execute("EXPLAIN " + sql, params)
                explained.append(["check"] + [r[:6] + r[9:10] for r in raw.fetchall()])
                forced = sql.replace("FROM users", "FROM users FORCE INDEX (PRIMARY)", 1)
                raw.execute("EXPLAIN " + forced, params)
                explained.append(["forced"] + [r[:6] + r[9:10] for r in raw.fetchall()])
            except Exception as exc:  # the diagnostic only
                explained.append(repr(exc))
        if statement.startswith("DELETE FROM user_emails") and not any(
            "lookup delete" in x for x in explained
        ):
            try:
                raw = conn.connection.driver_connection.cursor()
                raw.execute("EXPLAIN " + statement, params)
                explained.append(["lookup delete"] + [r[:6] + r[9:10] for r in raw.fetchall()])
            except Exception as exc:  # the diagnostic only
                explained.append(repr(exc))

    engines = list(router.engines.primaries.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", explain)
    try:
        with _counted(router) as n, _before_cleanup(router, meanwhile) as errors:
            rowcount = router.execute(_delete_sql(list(users))).rowcount
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", explain)
        for s in signups:
            s.end(commit=True)
    print("R7F-SIGNUP", {"cleanup_statements": n["cleanup"], "explain": explained})
    assert errors == [] and [s.errors for s in signups if s.errors] == []
    assert rowcount == 1000
    assert _lookups_of(router, list(users.values())) == {}
    # Fixed: one DELETE and one owner check per row (an equality on its key locks that row
    # only), all of a shard pair's on one connection pair in one write: the signups in flight
    # cost nothing (no group fails, nothing is redone in halves).
    assert n["cleanup"] <= 2 * 1000 + 8, n["cleanup"]


# -- finding: an upsert's adopted row is no longer verified: two owners of one e-mail ------------

UPSERT_USER = (
    "INSERT INTO users (user_id, email, name, tier, tag, score)"
    " VALUES (:u, :e, 'r7f', 'mid', 'x', 1) ON DUPLICATE KEY UPDATE name = 'r7f-up'"
)


def test_a_transaction_upsert_that_inserts_keeps_its_e_mail_unique(world: dict[str, Any]) -> None:
    """B is absent; (e, B) is an orphan (e.g. left by B's insert rolled back, documented). In a
    transaction, an upsert of B with e (B is new: the upsert inserts it, taking e) adopts
    (e, B). Just before its owner statement runs, the orphan is discarded (B absent: correct,
    as `check lookups --fix` does) and C registers e (no row: created, C committed). 78f01f6
    no longer lists an upsert's adopted rows for verify, so nothing checks (e, B) before the
    commit: B and C both commit with e; the settle's write-again of (e, B) finds (e, C) and
    writes nothing: B is unfindable by its e-mail. One database: the second writer of e fails
    (UNIQUE). At 78f01f6~1 verify found the row gone, tried to write it, found e taken and
    refused the commit. Expected: the commit refused (or C refused), one owner of e."""
    from shardrouter.engine.router import _Runner
    from shardrouter.sql.execution import discard_lookups, lookup_rows

    router: Router = world["router"]
    b, c = 8_950_001, 8_950_099
    e = "r7f-upsert@example.com"
    topology = router.topology
    (row,) = lookup_rows(topology, topology.table("users"), [{"user_id": b, "email": e}])
    with router.engines.primary(row.shard).begin() as conn:
        conn.execute(text(f"INSERT INTO {row.physical} VALUES (:e, :u)"), {"e": e, "u": b})
    owner_shard = _home(router, b)
    fired = threading.Event()
    errors: list[BaseException] = []

    def meanwhile() -> None:
        try:
            assert _Runner(router).drive(discard_lookups(topology, [row])) == 1
            router.execute(INSERT_USER, {"u": c, "e": e})
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "ON DUPLICATE KEY UPDATE" in statement and not fired.is_set():
            fired.set()
            thread = threading.Thread(target=meanwhile)
            thread.start()
            thread.join(30)

    engine = router.engines.primary(owner_shard)
    event.listen(engine, "before_cursor_execute", hook)
    refused: BaseException | None = None
    try:
        with router.transaction() as txn:
            txn.execute(UPSERT_USER, {"u": b, "e": e})
    except Exception as exc:  # the expected outcome: the commit refused
        refused = exc
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert fired.is_set() and errors == []
    owners = [u for u in (b, c) if _user(router, u) == [(u, e)]]
    print("R7F-UPSERT", {"refused": repr(refused), "owners": owners, "row": _lookup(router, e)})
    assert len(owners) == 1, owners


# -- bulk cleanups against bulk signups: the cleanup's full-scan DELETE of lookup rows -----------


def test_bulk_deletes_do_not_fail_concurrent_bulk_inserts(world: dict[str, Any]) -> None:
    """Two threads for 15 s: one inserts batches of 250 new users (one multi-row INSERT each:
    its lookup rows are one multi-row INSERT IGNORE per lookup place), the other deletes
    earlier batches (one DELETE each: its cleanup deletes 250 lookup rows in groups, each
    one OR-list DELETE, read by a full scan of the lookup table: it locks every row and gap
    it reads). Expected: no statement of either fails (a deadlock, a lock wait), and no
    lookup row is left for a deleted user. Printed: errors and statements of both."""
    router: Router = world["router"]
    base = 9_000_000
    stop = time.monotonic() + 15
    batches: list[dict[int, str]] = []
    ready = threading.Condition()
    errors: dict[str, list[str]] = {"insert": [], "delete": []}
    done = {"insert": 0, "delete": 0}

    def inserter() -> None:
        n = 0
        while time.monotonic() < stop:
            users = _spread(router, base + n * 1000, 250)
            n += 1
            try:
                _insert_many(router, users)
            except Exception as exc:  # counted
                errors["insert"].append(repr(exc)[:160])
                continue
            done["insert"] += 1
            with ready:
                batches.append(users)
                ready.notify()

    def deleter() -> None:
        while time.monotonic() < stop:
            with ready:
                if not batches:
                    ready.wait(1)
                    continue
                users = batches.pop(0)
            try:
                assert router.execute(_delete_sql(list(users))).rowcount == 250
            except Exception as exc:  # counted
                errors["delete"].append(repr(exc)[:160])
                continue
            done["delete"] += 1
            left = _lookups_of(router, list(users.values()))
            if left:
                errors["delete"].append(f"{len(left)} lookup rows left")

    threads = [threading.Thread(target=inserter), threading.Thread(target=deleter)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    print("R7F-BULK", {"done": done, "errors": errors})
    assert done["delete"] > 0
    assert errors == {"insert": [], "delete": []}


# -- merchant_orders: a non-unique lookup whose owners live in split tables ----------------------


def test_a_bulk_delete_of_orders_removes_their_merchant_rows_and_keeps_one_inserted_again(
    world: dict[str, Any],
) -> None:
    """Orders of 24 users (3 each, split tables on 4 shards: up to 4 x 16 groups) deleted by
    one statement; one order inserted again (same id, same merchant) just before the cleanup
    keeps its merchant_orders row; every other row goes; the rowcount is the orders'."""
    router: Router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=23)
    owners = list(range(9_100_000, 9_100_024))
    orders = []
    for u in owners:
        for n, order_id in enumerate(ids.next_ids(3, user_id=u)):
            orders.append({"o": order_id, "u": u, "m": 700 + (u + n) % 5})
    insert = (
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
        " VALUES (:o, :u, :m, 1, 'new')"
    )
    for o in orders:
        router.execute(insert, o)
    again = orders[7]
    merchants = sorted({o["m"] for o in orders})

    def merchant_rows() -> set[tuple[int, int, int]]:
        sql = (
            "SELECT merchant_id, order_id, user_id FROM merchant_orders"
            f" WHERE merchant_id IN ({', '.join(map(str, merchants))})"
        )
        mine = {o["o"] for o in orders}
        return {tuple(r) for r in router.execute(sql).rows if r[1] in mine}  # type: ignore[misc]

    assert len(merchant_rows()) == len(orders)
    with _before_cleanup_of(router, "merchant_orders", lambda: router.execute(insert, again)) as e:
        rowcount = router.execute(
            f"DELETE FROM orders WHERE user_id IN ({', '.join(map(str, owners))})"
        ).rowcount
    assert e == []
    assert rowcount == len(orders)
    assert merchant_rows() == {(again["m"], again["o"], again["u"])}


@contextmanager
def _before_cleanup_of(
    router: Router, table: str, action: Callable[[], None]
) -> Iterator[list[BaseException]]:
    """_before_cleanup for the lookup table ``table``."""
    fired = threading.Event()
    errors: list[BaseException] = []
    acting: set[int] = set()

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if fired.is_set() or threading.get_ident() in acting:
            return
        if not statement.startswith(f"DELETE FROM {table}"):
            return
        fired.set()

        def act() -> None:
            acting.add(threading.get_ident())
            try:
                action()
            except BaseException as exc:  # reported to the test
                errors.append(exc)

        thread = threading.Thread(target=act)
        thread.start()
        thread.join(60)

    engines = list(router.engines.primaries.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", hook)
    try:
        yield errors
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hook)
    assert fired.is_set(), "no lookup cleanup ran"
