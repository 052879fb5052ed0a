"""Issue 7 second review: reproductions of defects in the last round of fixes (0f68e7f..HEAD),
each on real MariaDB shards compared with one MariaDB holding every row (the oracle).

These tests document defects: a failing test here is a finding, not a broken test.
"""

from __future__ import annotations

from typing import Any

import pytest

from shardrouter.errors import ShardRouterError
from shardrouter.router import Router
from tests.integration.test_issue7_review import check, oracle_rows, world  # noqa: F401

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


def test_group_by_alias_shadowing_an_unmentioned_column(world: dict[str, Any]) -> None:
    """`users.name` exists but the statement names it nowhere else: MariaDB's GROUP BY name takes
    the column users.name (column before alias, 10 groups); the router groups by the alias
    UPPER(tier) (3 groups, counts not even those of tier)."""
    sql = "SELECT COUNT(*) AS n, UPPER(tier) AS name FROM users GROUP BY name"
    _, expected = oracle_rows(world, sql)
    for answer in (
        world["router"].execute(sql),
        world["loop"].run_until_complete(world["aio"].execute(sql)),
    ):
        assert sorted(r[0] for r in answer.rows) == sorted(r[0] for r in expected), sql


def test_derived_table_string_column_named_like_the_int_key(world: dict[str, Any]) -> None:
    """A derived table's string column named user_id is classified an int sharding key (the
    single table found is inside the subquery): no weight, so case variants split."""
    check(
        world,
        "SELECT d.user_id, COUNT(*) AS n FROM (SELECT IF(user_id % 2 = 0, 'a', 'A') AS user_id"
        " FROM orders) AS d GROUP BY d.user_id",
        ordered=False,
    )
    check(
        world,
        "SELECT user_id, COUNT(*) AS n FROM (SELECT IF(user_id % 2 = 0, 'a', 'A') AS user_id"
        " FROM orders) AS d GROUP BY user_id",
        ordered=False,
    )


def test_dayname_group_merges_case_variants(world: dict[str, Any]) -> None:
    check(
        world,
        "SELECT IF(merchant_id % 2 = 0, 'x', 'X') AS k, COUNT(*) AS n FROM orders GROUP BY k",
        ordered=False,
    )


def _all_pages(world: dict[str, Any], asyncio_: bool, **kw: Any) -> list[tuple[Any, ...]]:
    seen: list[tuple[Any, ...]] = []
    after = None
    for _ in range(200):
        if asyncio_:
            page = world["loop"].run_until_complete(world["aio"].page(after=after, **kw))
        else:
            page = world["router"].page(after=after, **kw)
        seen += [tuple(r) for r in page.rows]
        after = page.after
        if after is None:
            return seen
    raise AssertionError("page never ended")


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("limit", [1, 3, 7])
@pytest.mark.parametrize(
    "where", [{}, {"tier": "alpha"}, {"name": None}, {"tag": "a"}, {"score": None}]
)
def test_keyset_pages_with_nulls_in_several_sort_columns(
    world: dict[str, Any], descending: bool, limit: int, where: dict[str, Any]
) -> None:
    """Paging users by (name, score, user_id): NULLs in two sort columns, both directions,
    with filters; every row once, in the order one database gives."""
    direction = " DESC" if descending else ""
    filters = " AND ".join(f"{c} IS NULL" if v is None else f"{c} = :{c}" for c, v in where.items())
    sql = (
        "SELECT user_id, name, score FROM users"
        + (f" WHERE {filters}" if filters else "")
        + f" ORDER BY name{direction}, score{direction}, user_id{direction}"
    )
    _, expected = oracle_rows(world, sql, {c: v for c, v in where.items() if v is not None})
    for asyncio_ in (False, True):
        got = _all_pages(
            world,
            asyncio_,
            table="users",
            columns=("user_id", "name", "score"),
            order_by=("name", "score", "user_id"),
            where=where,
            limit=limit,
            descending=descending,
        )
        assert got == [tuple(r) for r in expected], (asyncio_, sql)


def _fresh_orders(world: dict[str, Any], user_id: int, n: int) -> list[int]:
    router = world["router"]
    ids = router.topology.id_generator("orders", worker_id=23)
    order_ids = list(ids.next_ids(n, user_id=user_id))
    for order_id in order_ids:
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents, status)"
            " VALUES (:o, :u, 1, 0, 'new')",
            {"o": order_id, "u": user_id},
        )
    return order_ids


def test_transaction_after_a_deadlock_does_not_commit_half(world: dict[str, Any]) -> None:
    """1213 (deadlock) rolls back the victim's WHOLE transaction on the server. The router
    raises LockConflictError and leaves the Transaction usable: the victim's next statement
    runs in a fresh server transaction and commit() commits it, without the victim's first
    write. A commit after a deadlock must be refused (TransactionAbortedError), as after a
    timeout."""
    import threading
    import time

    from shardrouter.errors import LockConflictError

    router: Router = world["router"]
    o1, o2, o3 = _fresh_orders(world, 777_000_001, 3)
    barrier = threading.Barrier(2, timeout=30)
    outcome: dict[str, Any] = {}

    def worker(name: str, mark: int, first: int, second: int, delay: float) -> None:
        try:
            with router.transaction() as txn:
                upd = "UPDATE orders SET amount_cents = :m WHERE order_id = :o"
                txn.execute(upd, {"m": mark, "o": first})
                barrier.wait()
                time.sleep(delay)
                try:
                    txn.execute(upd, {"m": mark, "o": second})
                except LockConflictError:
                    outcome[name + "_deadlocked"] = True
                    txn.execute(upd, {"m": mark, "o": o3})  # the rest of "its" transaction
            outcome[name] = "committed"
        except ShardRouterError as exc:
            outcome[name] = type(exc).__name__

    threads = [
        threading.Thread(target=worker, args=("a", 101, o1, o2, 0.0)),
        threading.Thread(target=worker, args=("b", 202, o2, o1, 0.5)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert outcome.get("a_deadlocked") or outcome.get("b_deadlocked"), outcome
    victim = "a" if outcome.get("a_deadlocked") else "b"
    mark = 101 if victim == "a" else 202
    first = o1 if victim == "a" else o2
    got = dict(
        world["router"]
        .execute(
            "SELECT order_id, amount_cents FROM orders WHERE user_id = :u", {"u": 777_000_001}
        )
        .rows
    )
    # All or nothing for the victim: its o3 write committed only with its first write.
    assert not (got[o3] == mark and got[first] != mark), (outcome, got)
