"""Issue 7, review 5 findings 2 and 3, on real MariaDB shards (the module ``world`` of
test_issue7_review): a committed transaction's lookup rows are settled after its commit, and an
owner row it wrote may be deleted by another writer in between. That writer's cleanup finds no
lookup row naming the owner (not yet handed over, or already removed), so the settle must not
leave one behind: before the fix, the hand-over (finding 2) and the write-again (finding 3)
left a user_emails row naming a user that no longer exists.

The settle is stalled deterministically: the transaction also deletes user D, whose lookup row
another connection holds, so the settle waits on that row before it hands over or writes again;
meanwhile the other writer deletes B."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import text

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_r6_review5 import (
    INSERT_USER,
    _lookup,
    _same_shard_user,
    _user,
)

world = _review.world  # the module-scoped fixture: users and orders, and their oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

DELETE_USER = "DELETE FROM users WHERE user_id = :u"


def _stalled(
    world: dict[str, Any], held_email: str, run: Callable[[], None], b: int
) -> list[BaseException]:
    """Hold the user_emails row of ``held_email`` (the settle's delete of it waits), run the
    transaction ``run`` in a thread, and once B's row is committed delete B through the
    router; then release the row. Returns what the transaction raised."""
    router: Router = world["router"]
    topology = router.topology
    slot = topology.slot_for("user_emails", held_email)
    physical = topology.table("user_emails").physical(slot)
    holder = router.engines.primary(topology.shard_of_slot(slot)).connect()
    hold = holder.begin()
    holder.execute(text(f"SELECT * FROM {physical} WHERE email = :e FOR UPDATE"), {"e": held_email})
    errors: list[BaseException] = []

    def guarded() -> None:
        try:
            run()
        except BaseException as exc:  # reported to the test
            errors.append(exc)

    thread = threading.Thread(target=guarded)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not _user(router, b) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _user(router, b), "the transaction never committed B"
        router.execute(DELETE_USER, {"u": b})  # the other writer, while the settle waits
    finally:
        hold.rollback()
        holder.close()
        thread.join(60)
    assert not thread.is_alive()
    return errors


def _three_users(router: Router, a: int, name: str) -> tuple[int, int, int]:
    """A and D inserted (e-mails ``name``@ and ``name``-d@), and B, not inserted: all three on
    one shard, so that one transaction writes them."""
    d = _same_shard_user(router, a)
    b = _same_shard_user(router, d)
    router.execute(INSERT_USER, {"u": a, "e": f"{name}@example.com"})
    router.execute(INSERT_USER, {"u": d, "e": f"{name}-d@example.com"})
    return a, d, b


def _swap(router: Router, a: int, d: int, b: int, email: str) -> Callable[[], None]:
    """T: delete A (or nothing when ``a`` is None) and D, insert B with ``email``."""

    def run() -> None:
        with router.transaction() as txn:
            if a is not None:
                txn.execute(DELETE_USER, {"u": a})
            txn.execute(DELETE_USER, {"u": d})
            txn.execute(INSERT_USER, {"u": b, "e": email})

    return run


def test_a_handed_over_value_whose_new_owner_is_deleted_meanwhile_leaves_no_row(
    world: dict[str, Any],
) -> None:
    """Finding 2: T deletes A (e) and D, inserts B with A's e-mail, commits; before the settle
    hands e's row from A to B, another writer deletes B. Afterwards no user has e and no
    user_emails row names it."""
    router: Router = world["router"]
    a, d, b = _three_users(router, 996_001, "r7-hand")
    e, e_d = "r7-hand@example.com", "r7-hand-d@example.com"
    errors = _stalled(world, e_d, _swap(router, a, d, b, e), b)
    assert errors == []
    assert _user(router, a) == [] and _user(router, b) == [] and _user(router, d) == []
    assert _lookup(router, e) == []
    assert _lookup(router, e_d) == []


def test_a_value_written_again_for_an_owner_deleted_meanwhile_leaves_no_row(
    world: dict[str, Any],
) -> None:
    """Finding 3: T deletes D and inserts B with a new e-mail, commits; before the settle
    writes B's lookup row again, another writer deletes B (and its cleanup removes the row).
    Afterwards the settle has not written the row back for the deleted B."""
    router: Router = world["router"]
    d = 996_101
    b = _same_shard_user(router, d)
    e, e_d = "r7-again@example.com", "r7-again-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})
    errors = _stalled(world, e_d, _swap(router, None, d, b, e), b)  # type: ignore[arg-type]
    assert errors == []
    assert _user(router, b) == [] and _user(router, d) == []
    assert _lookup(router, e) == []
    assert _lookup(router, e_d) == []


def test_async_settle_does_not_write_back_a_row_for_an_owner_deleted_meanwhile(
    world: dict[str, Any],
) -> None:
    """Finding 3 through AsyncRouter (the settle is one generator, driven by the async
    runner here): the same interleaving leaves no row naming the deleted B."""
    router: Router = world["router"]
    aio: AsyncRouter = world["aio"]
    d = 996_201
    b = _same_shard_user(router, d)
    e, e_d = "r7-async@example.com", "r7-async-d@example.com"
    router.execute(INSERT_USER, {"u": d, "e": e_d})

    async def swap() -> None:
        async with aio.transaction() as txn:
            await txn.execute(DELETE_USER, {"u": d})
            await txn.execute(INSERT_USER, {"u": b, "e": e})

    loop = world["loop"]
    errors = _stalled(world, e_d, lambda: loop.run_until_complete(swap()), b)
    assert errors == []
    assert _user(router, b) == [] and _user(router, d) == []
    assert _lookup(router, e) == []


def test_a_handed_over_value_whose_owner_stays_keeps_its_row(world: dict[str, Any]) -> None:
    """The check after the settle removes nothing that is owned: the same hand-over with no
    other writer ends with e's row naming B."""
    router: Router = world["router"]
    a, d, b = _three_users(router, 996_301, "r7-keep")
    e, e_d = "r7-keep@example.com", "r7-keep-d@example.com"
    with router.transaction() as txn:
        txn.execute(DELETE_USER, {"u": a})
        txn.execute(DELETE_USER, {"u": d})
        txn.execute(INSERT_USER, {"u": b, "e": e})
    assert _user(router, b) == [(b, e)]
    assert _lookup(router, e) == [(e, b)]
    assert _lookup(router, e_d) == []
