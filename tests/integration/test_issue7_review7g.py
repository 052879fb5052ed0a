"""Review 7g of d4b7479 and 98c9743 (lookup removals one DELETE and one NOWAIT owner check per
row, halves when an owner stays; adopted-row guards one row each; verify reads an upsert's
adopted rows' owners in the transaction, with the transaction's runner). On real MariaDB shards
(the module ``world`` of test_issue7_review). The others are attacks that held, kept as
guards.

Findings, both fixed (a group that fails is redone row by row, once; a shard that does not
answer is skipped for the rest of the removal):

- test_a_cleanup_whose_owners_are_all_in_flight_is_not_n_log_n: _remove_halves reruns every
  row's DELETE and check at every level when many owners stay (in flight or back): 1,302
  lookup DELETEs for 256 rows (2 n (log2 n + 1) per group; row by row after one failure: 2 n).
- test_a_cleanup_with_its_lookup_shard_hung_waits_one_timeout: each (lookup place, owner
  place) group that needs a hung shard waits the answer timeout in sequence: 3 x 2 s here,
  90 s for one DELETE with the default timeouts.

Held (guards): XA transaction upserting across two branches (verify's owner read on the right
branch; the 7f discard-and-take attack refused, nothing in doubt; no interference commits); a
deadlock victim that swallowed the error and committed gets TransactionAbortedError (verify's
owner read on the broken transaction), B absent, the adopted orphan untouched; an async
transaction cancelled during verify's owner read commits, raises CancelledError, leaves no
connection checked out."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import event, text

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router, _Runner
from shardrouter.sql.execution import discard_lookups, lookup_rows
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_r6_review5 import INSERT_USER, _lookup, _user
from tests.integration.test_issue7_review7f import (
    UPSERT_USER,
    _before_cleanup,
    _counted,
    _delete_sql,
    _home,
    _insert_many,
    _lookups_of,
    _Open,
    _users_of,
)

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(240)]


def _spread(base: int, n: int) -> dict[int, str]:
    return {base + i: f"r7g-{base}-{i}@example.com" for i in range(n)}


def _orphan(router: Router, user: int, email: str) -> Any:
    topology = router.topology
    (row,) = lookup_rows(topology, topology.table("users"), [{"user_id": user, "email": email}])
    with router.engines.primary(row.shard).begin() as conn:
        conn.execute(text(f"INSERT INTO {row.physical} VALUES (:e, :u)"), {"e": email, "u": user})
    return row


# -- verify with the transaction's runner: XA ---------------------------------------------------


def test_xa_upsert_adopting_an_orphan_keeps_its_e_mail_unique(world: dict[str, Any]) -> None:
    """Router(xa=True): a transaction writes a user on another shard first (the upsert's owner
    shard is its second branch), then upserts B (new) adopting the orphan (e, B). Before the
    upsert's owner statement, the orphan is discarded and C registers e. verify's owner read
    runs on B's XA branch (sees B), finds the row gone, e taken: the commit is refused; one
    owner of e, no XA transaction left in doubt."""
    base: Router = world["router"]
    router = Router(base.topology, engines=base.engines, max_fanout=None, xa=True)
    b, c = 8_960_001, 8_960_099
    other = next(u for u in range(8_960_200, 8_961_000) if _home(router, u) != _home(router, b))
    e = "r7g-xa-upsert@example.com"
    row = _orphan(router, b, e)
    fired = threading.Event()
    errors: list[BaseException] = []

    def meanwhile() -> None:
        try:
            assert _Runner(router).drive(discard_lookups(router.topology, [row])) == 1
            router.execute(INSERT_USER, {"u": c, "e": e})
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if "ON DUPLICATE KEY UPDATE" in statement and not fired.is_set():
            fired.set()
            thread = threading.Thread(target=meanwhile)
            thread.start()
            thread.join(30)

    engine = router.engines.primary(_home(router, b))
    event.listen(engine, "before_cursor_execute", hook)
    refused: BaseException | None = None
    try:
        with router.transaction() as txn:
            txn.execute(INSERT_USER, {"u": other, "e": f"r7g-xa-other-{other}@example.com"})
            txn.execute(UPSERT_USER, {"u": b, "e": e})
            assert len(txn.shards) == 2
    except Exception as exc:  # the expected outcome
        refused = exc
    finally:
        event.remove(engine, "before_cursor_execute", hook)
    assert fired.is_set() and errors == []
    owners = [u for u in (b, c) if _user(router, u) == [(u, e)]]
    print("R7G-XA", {"refused": repr(refused), "owners": owners, "row": _lookup(router, e)})
    assert refused is not None and owners == [c]
    assert _lookup(router, e) == [(e, c)]
    assert _user(router, other) == []  # rolled back with it
    assert not router.recover_xa(min_age_s=0).in_doubt


def test_xa_upsert_adopting_an_orphan_commits_and_keeps_its_row(world: dict[str, Any]) -> None:
    """No interference: an XA transaction over two shards upserting B (new) that adopted its
    orphan commits, B owns e and the lookup row names B."""
    base: Router = world["router"]
    router = Router(base.topology, engines=base.engines, max_fanout=None, xa=True)
    b = 8_961_001
    other = next(u for u in range(8_961_200, 8_962_000) if _home(router, u) != _home(router, b))
    e = "r7g-xa-ok@example.com"
    _orphan(router, b, e)
    with router.transaction() as txn:
        txn.execute(INSERT_USER, {"u": other, "e": f"r7g-xa-ok-{other}@example.com"})
        txn.execute(UPSERT_USER, {"u": b, "e": e})
    assert _user(router, b) == [(b, e)] and _lookup(router, e) == [(e, b)]
    assert not router.recover_xa(min_age_s=0).in_doubt


# -- verify with the transaction's runner: a broken transaction, async cancellation -------------


def test_a_deadlocked_transaction_with_an_upsert_refuses_its_commit_and_settles(
    world: dict[str, Any],
) -> None:
    """A transaction upserts B (new, adopting its orphan), then becomes a deadlock victim and
    the caller ignores the error and leaves the block normally: verify's owner read runs on a
    broken transaction; the commit is refused with TransactionAbortedError (not a
    CrossShardTransactionError or a raw driver error); B is absent and (e, B) is removed by the
    settle (its owner absent)."""
    from shardrouter.errors import LockConflictError, TransactionAbortedError

    router: Router = world["router"]
    b = 8_962_001
    x = next(u for u in range(8_962_100, 8_963_000) if _home(router, u) == _home(router, b))
    y = next(u for u in range(x + 1, 8_963_000) if _home(router, u) == _home(router, b))
    for u in (x, y):
        router.execute(INSERT_USER, {"u": u, "e": f"r7g-dl-{u}@example.com"})
    e = "r7g-deadlock@example.com"
    extras = [u for u in range(y + 1, 8_966_000) if _home(router, u) == _home(router, b)][:20]
    _orphan(router, b, e)
    step = threading.Barrier(2, timeout=30)
    outcome: dict[str, Any] = {}

    def other() -> None:
        try:
            with router.transaction() as t2:
                t2.execute("UPDATE users SET score = 2 WHERE user_id = :u", {"u": y})
                for extra in extras:  # heavier: InnoDB picks the lighter one as its victim
                    t2.execute(INSERT_USER, {"u": extra, "e": f"r7g-dl-x-{extra}@example.com"})
                step.wait()
                time.sleep(0.3)
                t2.execute("UPDATE users SET score = 2 WHERE user_id = :u", {"u": x})
        except Exception as exc:  # either may be the victim
            outcome["other"] = exc

    thread = threading.Thread(target=other)
    thread.start()
    refused: BaseException | None = None
    victim = False
    try:
        with router.transaction() as txn:
            txn.execute(UPSERT_USER, {"u": b, "e": e})
            txn.execute("UPDATE users SET score = 3 WHERE user_id = :u", {"u": x})
            step.wait()
            try:
                txn.execute("UPDATE users SET score = 3 WHERE user_id = :u", {"u": y})
            except LockConflictError:
                victim = True  # swallowed: the block ends normally, a commit is asked for
    except Exception as exc:
        refused = exc
    thread.join(60)
    print("R7G-DEADLOCK", {"victim": victim, "refused": repr(refused), "other": outcome})
    if not victim:
        # InnoDB chose the other transaction: this one commits, verify included (B owns e,
        # its lookup row checked before the commit), and the other ended typed.
        assert refused is None, repr(refused)
        assert isinstance(outcome.get("other"), LockConflictError | TransactionAbortedError)
        assert _user(router, b) == [(b, e)]
        assert _lookup(router, e) == [(e, b)]
        return
    assert isinstance(refused, TransactionAbortedError), repr(refused)
    assert _user(router, b) == []
    assert _lookup(router, e) == [(e, b)]  # the orphan it found, untouched


def test_async_transaction_cancelled_during_verify_commits_and_raises(
    world: dict[str, Any],
) -> None:
    """An async transaction upserts B (new, adopting its orphan); the caller's task is
    cancelled while verify reads B's owner row: the commit runs to its end (to_the_end), the
    caller gets CancelledError, B owns e with its row, no connection is left checked out."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    loop: asyncio.AbstractEventLoop = world["loop"]
    b = 8_963_001
    e = "r7g-async-verify@example.com"
    _orphan(router, b, e)
    state: dict[str, Any] = {}

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        # verify's owner read: a plain SELECT of the users table naming the e-mail
        if (
            statement.startswith("SELECT")
            and "users" in statement
            and "email" in statement
            and "LOCK" not in statement
            and "armed" in state
            and "done" not in state
        ):
            state["done"] = True
            loop.call_soon_threadsafe(state["task"].cancel)

    engines = [en.sync_engine for en in aio._snap.engines.all]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", hook)

    async def body() -> None:
        async with aio.transaction() as txn:
            await txn.execute(UPSERT_USER, {"u": b, "e": e})
            state["armed"] = True

    async def main() -> None:
        state["task"] = asyncio.ensure_future(body())
        await state["task"]

    try:
        with pytest.raises(asyncio.CancelledError):
            loop.run_until_complete(main())
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", hook)
    assert state.get("done"), "verify's owner read did not run"
    assert _user(router, b) == [(b, e)]
    assert _lookup(router, e) == [(e, b)]
    checked = sum(en.sync_engine.pool.checkedout() for en in aio._snap.engines.all)  # type: ignore[attr-defined]
    assert checked == 0


# -- removals: halves with several owners present ------------------------------------------------


def test_a_cleanup_whose_owners_are_all_in_flight_is_not_n_log_n(world: dict[str, Any]) -> None:
    """A DELETE of 256 users; just before its cleanup, one transaction inserts all of them
    again and stays open (a re-import in flight: every owner row locked). Every row is kept
    (right), but each group is split in halves down to single rows, every level running the
    DELETE and the NOWAIT check of every row again: 2 n (log2 n + 1) statements in sequence
    for a group of n rows (here 1,302 lookup DELETEs for 256 rows in 4 groups). Expected: about
    the cost of the group once then row by row: 2 n DELETEs."""
    router: Router = world["router"]
    users = _spread(8_970_000, 256)
    _insert_many(router, users)
    homes: dict[str, dict[int, str]] = {}
    for u, e in users.items():
        homes.setdefault(_home(router, u), {})[u] = e
    reimports = [_Open(router, part) for part in homes.values()]

    def reimport() -> None:
        for r in reimports:
            r.start()

    deletes = {"n": 0}

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.startswith("DELETE FROM user_emails"):
            deletes["n"] += 1

    engines = list(router.engines.primaries.values())
    for engine in engines:
        event.listen(engine, "before_cursor_execute", count)
    started = time.monotonic()
    try:
        with _counted(router) as n, _before_cleanup(router, reimport) as errors:
            rowcount = router.execute(_delete_sql(list(users))).rowcount
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", count)
        for r in reimports:
            r.end(commit=True)
    elapsed = time.monotonic() - started
    print("R7G-HALVES", {"lookup_deletes": deletes["n"], "cleanup": n["cleanup"], "s": elapsed})
    assert errors == [] and [r.errors for r in reimports if r.errors] == []
    assert rowcount == 256
    assert _users_of(router, list(users)) == users
    assert _lookups_of(router, list(users.values())) == {e: u for u, e in users.items()}
    assert deletes["n"] <= 2 * 256 + 8, deletes["n"]


# -- removals: a shard that hangs -----------------------------------------------------------------


def test_a_cleanup_with_its_lookup_shard_hung_waits_one_timeout(
    world: dict[str, Any], shard_databases: Path
) -> None:
    """Users whose owner rows are on the three shards that answer and whose e-mail rows are on
    a shard that hangs (accepts TCP, never answers, as a stopped mysqld: the answer timeout, connect 1 s + query
    2 s, ends each wait). Their DELETE commits; its cleanup's groups (one per lookup place and
    owner place: 3 here) each wait that timeout in sequence (with the default 5 s + 30 s
    timeouts: 90 s for this one DELETE). Expected: one wait per shard down (a shard that
    failed is not tried again by the same cleanup: its rows stay, orphans, logged)."""
    router: Router = world["router"]
    topology = router.topology
    hung = sorted(topology.shards)[-1]
    users: dict[int, str] = {}
    u = 8_980_000
    while len(users) < 120:
        u += 1
        email = f"r7g-hung-{u}@example.com"
        lookup_shard = str(topology.shard_of_slot(topology.slot_for("user_emails", email)))
        if lookup_shard == hung and _home(router, u) != hung:
            users[u] = email
    _insert_many(router, users)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(256)  # never accepted: the handshake never comes
    port = listener.getsockname()[1]
    raw = yaml.safe_load(shard_databases.read_text())
    for name, shard in raw["shards"].items():
        shard.setdefault("pool", {}).update(connect_timeout_s=1, query_timeout_s=2)
        if str(name) == hung:
            url = shard["primary"]
            shard["primary"] = url.replace(
                url.split("@", 1)[1].split("/", 1)[0], f"127.0.0.1:{port}"
            )
    path = shard_databases.parent / "topology-r7g-hung.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    broken = Router(Topology.load(path), max_fanout=None)
    groups = {
        (r.shard, r.physical)
        for r in lookup_rows(
            topology,
            topology.table("users"),
            [{"user_id": k, "email": v} for k, v in users.items()],
        )
    }
    owners = {
        (_home(router, k), topology.table("users").physical(topology.slot_for("users", k)))
        for k in users
    }
    try:
        started = time.monotonic()
        rowcount = broken.execute(_delete_sql(list(users))).rowcount
        elapsed = time.monotonic() - started
    finally:
        broken.close()
        listener.close()
    print("R7G-HUNG", {"s": elapsed, "lookup_places": len(groups), "owner_places": len(owners)})
    assert rowcount == len(users)
    assert _users_of(router, list(users)) == {}
    assert len(_lookups_of(router, list(users.values()))) == len(users)  # kept
    assert elapsed < 4, elapsed
