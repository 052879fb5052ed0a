"""Issue 7 second review: reproductions of defects in the last round of fixes (0f68e7f..HEAD),
each on real MariaDB shards compared with one MariaDB holding every row (the oracle).

These tests document defects: a failing test here is a finding, not a broken test.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest

from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError
from tests.integration import test_issue7_review as _review
from tests.integration.test_issue7_review import check, oracle_rows

world = _review.world  # the module-scoped fixture: the same rows and oracle

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


def test_group_by_alias_shadowing_an_unmentioned_column(world: dict[str, Any]) -> None:
    """`users.name` exists but the statement names it nowhere else: MariaDB's GROUP BY name takes
    the column users.name (column before alias, 10 groups); the router groups by the alias
    UPPER(tier) (3 groups, counts not even those of tier)."""
    sql = "SELECT COUNT(*) AS n, UPPER(tier) AS name FROM users GROUP BY name"
    _, expected = oracle_rows(world, sql)
    for call in (
        lambda: world["router"].execute(sql),
        lambda: world["loop"].run_until_complete(world["aio"].execute(sql)),
    ):
        try:
            answer = call()
        except ShardRouterError:
            continue  # a typed refusal is allowed by the bar
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
        .execute("SELECT order_id, amount_cents FROM orders WHERE user_id = :u", {"u": 777_000_001})
        .rows
    )
    # The fixture's rows stay as the oracle has them.
    router.execute("DELETE FROM orders WHERE user_id = :u", {"u": 777_000_001})
    # All or nothing for the victim: its o3 write committed only with its first write.
    assert not (got[o3] == mark and got[first] != mark), (outcome, got)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sleep", [1.3, 1.6])
def test_async_multi_shard_write_timed_out_leaves_no_desynchronised_connection(
    world: dict[str, Any], shard_databases: Any, sleep: float
) -> None:
    """AsyncRouter._write_together: a part cancelled by query_timeout_s (1 s) is ended with a
    bounded ROLLBACK (_end), not dropped (_discard) as AsyncTransaction now does: the ROLLBACK
    can read the cancelled UPDATE's late answer as its own, and the connection goes back to
    the pool one answer behind; later statements on that shard read each other's answers."""
    import time

    from shardrouter.engine.aio import AsyncRouter
    from tests.integration.test_issue7_review import _short_timeout_topology

    topology = _short_timeout_topology(shard_databases)
    users = world["data"]["users"][:12]

    async def run() -> list[Any]:
        async with AsyncRouter(topology) as aio:
            await aio.execute("DELETE FROM countries WHERE code = 'zz'")
            await aio.execute("INSERT INTO countries (code, name) VALUES ('zz', 'Zed')")
            with contextlib.suppress(ShardRouterError):
                await aio.execute(
                    f"UPDATE countries SET name = 'Why' WHERE code = 'zz' AND SLEEP({sleep}) = 0"
                )
            time.sleep(2.5)
            out: list[Any] = []
            for user in users:
                try:
                    async with aio.transaction() as txn:
                        got = await txn.execute(
                            "SELECT email FROM users WHERE user_id = :u", {"u": user["user_id"]}
                        )
                    out.append((user["email"], got.rows))
                except ShardRouterError as exc:
                    out.append((user["email"], type(exc).__name__))
            await aio.execute("DELETE FROM countries WHERE code = 'zz'")
            return out

    answers = asyncio.run(asyncio.wait_for(run(), 90))
    bad = [(e, a) for e, a in answers if a != [(e,)] and not isinstance(a, str)]
    assert not bad, answers


HAVING_SWEEP = [
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n > '1e1'",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n > ' 9x'",
    "SELECT merchant_id, SUM(amount_cents) AS s FROM orders GROUP BY merchant_id"
    " HAVING s > '5000.5'",
    "SELECT merchant_id, AVG(amount_cents) AS a FROM orders GROUP BY merchant_id HAVING a > '400'",
    "SELECT merchant_id, AVG(amount_cents) AS a FROM orders GROUP BY merchant_id"
    " HAVING a = ROUND(a)",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id HAVING m = 'PAID'",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id HAVING m > 0",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id"
    " HAVING IF(m = 'void', 1, 0) = 1",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
    " HAVING IF(n > 30, 'big', 'small') = 'BIG'",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
    " HAVING COALESCE(NULL, n) > 30",
    "SELECT merchant_id, MIN(amount_cents) AS m FROM orders GROUP BY merchant_id"
    " HAVING IFNULL(m, 0) < 120",
    "SELECT merchant_id, MIN(amount_cents) AS m FROM orders GROUP BY merchant_id"
    " HAVING ABS(m - 500) > 350",
    "SELECT merchant_id, COUNT(*) AS n, SUM(amount_cents) AS s FROM orders GROUP BY merchant_id"
    " HAVING s / n > 480",
    "SELECT merchant_id, COUNT(*) AS n, SUM(amount_cents) AS s FROM orders GROUP BY merchant_id"
    " HAVING s DIV n > 480",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n % 2 = 1",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING -n < -30",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n BETWEEN 30 AND 40",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n IN (30, 31, 32)",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING NOT n > 30",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n > 30 XOR n > 35",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n <=> NULL",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n = 30.0",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id HAVING m LIKE 'V%'",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id"
    " HAVING NULLIF(m, 'VOID') IS NULL",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n > TRUE",
    "SELECT merchant_id, MIN(amount_cents) AS m FROM orders GROUP BY merchant_id HAVING m > '1e2'",
    "SELECT merchant_id, SUM(amount_cents) / 3 AS s FROM orders GROUP BY merchant_id"
    " HAVING s = '5000'",
    "SELECT merchant_id, MAX(status) AS m FROM orders GROUP BY merchant_id"
    " HAVING IF(TRUE, m, 'x') = 'VOID'",
    "SELECT user_id, MAX(amount_cents) AS m FROM orders GROUP BY user_id"
    " HAVING COALESCE(m, 'none') = 'none'",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id HAVING n > 0x1F",
    "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
    " HAVING merchant_id + 0 = '2'",
    "SELECT merchant_id AS k, COUNT(*) AS n FROM orders GROUP BY k HAVING k = '2abc'",
    "SELECT status, COUNT(*) AS n FROM orders GROUP BY status HAVING status = 0",
    "SELECT status, COUNT(*) AS n FROM orders GROUP BY status HAVING status = 'PAID '",
    "SELECT tag, COUNT(*) AS n FROM users GROUP BY tag HAVING tag = 'a'",
    "SELECT tag, COUNT(*) AS n FROM users GROUP BY tag HAVING tag > 'a'",
    "SELECT tier, COUNT(*) AS n FROM users GROUP BY tier HAVING tier > 'alpha'",
    "SELECT tier, COUNT(*) AS n FROM users GROUP BY tier HAVING tier = 2",
    "SELECT score, COUNT(*) AS n FROM users GROUP BY score HAVING score = '3.0'",
    "SELECT score, COUNT(*) AS n FROM users GROUP BY score HAVING score IS NULL",
    "SELECT score, COUNT(*) AS n FROM users GROUP BY score HAVING IF(score, 1, 0) = 0",
    "SELECT name, COUNT(*) AS n FROM users GROUP BY name HAVING IF(name, 1, 0) = 0",
    "SELECT name, COUNT(*) AS n FROM users GROUP BY name HAVING ABS(name) = 0",
    "SELECT name, COUNT(*) AS n FROM users GROUP BY name HAVING COALESCE(name, 'zz') > 'name5'",
]


@pytest.mark.parametrize("sql", HAVING_SWEEP)
def test_having_sweep(world: dict[str, Any], sql: str) -> None:
    check(world, sql, ordered=False)


@pytest.mark.parametrize(
    "shard_block",
    [
        # a URL pasted as a key (a mis-indented or half-edited file): "unknown key" names it
        "  s0:\n    slots: [0, 15]\n    primary: mysql+pymysql://root:Sup3rS3cret@127.0.0.1:1/db\n"
        "    mysql+pymysql://root:Sup3rS3cret@127.0.0.2:1/db: replica\n",
        # the URL written where the shard's name goes: every message about it names it
        "  mysql+pymysql://root:Sup3rS3cret@127.0.0.1:1/db:\n    slots: [0, 15]\n",
    ],
)
def test_password_in_a_yaml_key_is_not_printed(tmp_path: Any, shard_block: str) -> None:
    """config._structure_problems masks the bad VALUE (_show/_scrub) but prints the key path
    (_loc_path) as is: a URL that YAML read as a key is printed with its password, on stderr
    and in the --json document, by every command that loads the file."""
    import subprocess
    import sys

    path = tmp_path / "topology.yaml"
    path.write_text(f"name: t\nversion: 1\nslots: 16\nshards:\n{shard_block}tables: {{}}\n")
    for args in (
        ["config", "validate", str(path), "--json"],
        ["schema", "status", "--config", str(path), "--json"],
    ):
        done = subprocess.run(
            [sys.executable, "-c", "import shardrouter.cli as c; c.main()", *args],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0, done
        assert "Sup3rS3cret" not in done.stdout + done.stderr, (args, done.stdout)


ORDER_SWEEP = [
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY COUNT(DISTINCT user_id)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY SUM(DISTINCT amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY STD(amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY BIT_OR(amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY GROUP_CONCAT(status)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY MAX(status), MIN(status), 1",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY -SUM(amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY (SUM(amount_cents))",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY COUNT(amount_cents) DESC, 1",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY AVG(amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY MAX(amount_cents) - 1",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY IF(COUNT(*) > 30, 1, 0), 1",
    "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY VARIANCE(amount_cents)",
    "SELECT merchant_id FROM orders GROUP BY merchant_id"
    " ORDER BY COUNT(CASE WHEN status = 'paid' THEN 1 END), 1",
    "SELECT DISTINCT merchant_id FROM orders ORDER BY merchant_id DESC",
    "SELECT COUNT(*) AS n FROM orders ORDER BY SUM(amount_cents)",
    "SELECT merchant_id, status FROM orders GROUP BY merchant_id, status"
    " ORDER BY COUNT(*), merchant_id, status",
    "SELECT UPPER(status) AS status, COUNT(*) AS n FROM orders GROUP BY status ORDER BY status",
    "SELECT LOWER(tier) AS tier, COUNT(*) AS n FROM users GROUP BY tier ORDER BY tier",
    "SELECT CONCAT(user_id, '') AS user_id, COUNT(*) AS n FROM orders GROUP BY user_id"
    " ORDER BY n, user_id",
    "SELECT CAST(merchant_id AS CHAR) AS m, COUNT(*) AS n FROM orders GROUP BY m ORDER BY m",
    "SELECT MAX(CONCAT(user_id, 'x')) AS m, merchant_id FROM orders GROUP BY merchant_id"
    " ORDER BY m, merchant_id",
    "SELECT IF(merchant_id > 1, 'a', 'A') AS k, COUNT(*) AS n FROM orders GROUP BY k",
    "SELECT DATE_FORMAT('2024-01-01', '%a') AS k, COUNT(*) AS n FROM orders GROUP BY k",
]


@pytest.mark.parametrize("sql", ORDER_SWEEP)
def test_order_group_sweep(world: dict[str, Any], sql: str) -> None:
    check(world, sql, ordered="ORDER BY" in sql)


def test_order_by_an_unselected_count_distinct(world: dict[str, Any]) -> None:
    """ORDER BY COUNT(DISTINCT x) not selected: the new refusal (2d71bea) covers AVG and
    expressions over aggregates only; COUNT(DISTINCT) partials cannot be merged either (a
    value counted on two shards counts twice), so the groups come back in a wrong order."""
    check(
        world,
        "SELECT merchant_id FROM orders GROUP BY merchant_id ORDER BY COUNT(DISTINCT status), 1",
    )
    check(
        world,
        "SELECT merchant_id FROM orders GROUP BY merchant_id"
        " ORDER BY COUNT(DISTINCT user_id) DESC, 1",
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " HAVING COUNT(DISTINCT status) = 3",
        "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " HAVING COUNT(DISTINCT user_id) < 30",
        "SELECT status, COUNT(*) AS n FROM orders GROUP BY status"
        " HAVING SUM(DISTINCT merchant_id) = 6",
        "SELECT merchant_id, COUNT(*) AS n FROM orders GROUP BY merchant_id"
        " ORDER BY SUM(DISTINCT amount_cents), 1",
    ],
)
def test_distinct_aggregates_not_selected(world: dict[str, Any], sql: str) -> None:
    """HAVING COUNT(DISTINCT x) / SUM(DISTINCT x) evaluated after the merge (430ce36) on the
    SUM of the shards' partial values: a value present on two shards counts twice."""
    check(world, sql, ordered="ORDER BY" in sql)


def test_async_transaction_after_a_deadlock_does_not_commit_half(world: dict[str, Any]) -> None:
    """AsyncTransaction: the same as the sync test (its _broken is set only for a timeout)."""
    from shardrouter.errors import LockConflictError

    o1, o2, o3 = _fresh_orders(world, 777_000_002, 3)
    aio = world["aio"]
    outcome: dict[str, Any] = {}

    async def run() -> None:
        barrier = asyncio.Barrier(2)

        async def worker(name: str, mark: int, first: int, second: int, delay: float) -> None:
            try:
                async with aio.transaction() as txn:
                    upd = "UPDATE orders SET amount_cents = :m WHERE order_id = :o"
                    await txn.execute(upd, {"m": mark, "o": first})
                    await barrier.wait()
                    await asyncio.sleep(delay)
                    try:
                        await txn.execute(upd, {"m": mark, "o": second})
                    except LockConflictError:
                        outcome[name + "_deadlocked"] = True
                        await txn.execute(upd, {"m": mark, "o": o3})
                outcome[name] = "committed"
            except ShardRouterError as exc:
                outcome[name] = type(exc).__name__

        await asyncio.wait_for(
            asyncio.gather(worker("a", 101, o1, o2, 0.0), worker("b", 202, o2, o1, 0.5)), 60
        )

    world["loop"].run_until_complete(run())
    router: Router = world["router"]
    got = dict(
        router.execute(
            "SELECT order_id, amount_cents FROM orders WHERE user_id = :u", {"u": 777_000_002}
        ).rows
    )
    router.execute("DELETE FROM orders WHERE user_id = :u", {"u": 777_000_002})
    assert outcome.get("a_deadlocked") or outcome.get("b_deadlocked"), outcome
    victim = "a" if outcome.get("a_deadlocked") else "b"
    mark = 101 if victim == "a" else 202
    first = o1 if victim == "a" else o2
    assert not (got[o3] == mark and got[first] != mark), (outcome, got)


@pytest.mark.timeout(120)
def test_xa_commit_after_a_timed_out_branch_is_typed_and_leaves_nothing_prepared(
    world: dict[str, Any], shard_databases: Any
) -> None:
    """Router(xa=True): a statement on the second branch times out (its connection is gone);
    the commit then runs XA END/PREPARE branch by branch: the first branch is PREPARED, the
    second raises SQLAlchemy's PendingRollbackError, which Transaction._end's XA path does not
    catch (only DBAPIError/PoolTimeoutError): no xa.rollback, an untyped error, and a prepared
    branch holding its locks until recover_xa() runs."""
    import time

    from sqlalchemy import text as sql_text

    from tests.integration.test_issue7_review import _short_timeout_topology

    topology = _short_timeout_topology(shard_databases)
    users = world["data"]["users"]
    first = users[0]
    shard_a = topology.route("users", "user_id", first["user_id"]).shard
    other = next(
        u for u in users if topology.route("users", "user_id", u["user_id"]).shard != shard_a
    )
    error: BaseException | None = None
    with Router(topology, xa=True) as router:
        try:
            with router.transaction() as txn:
                txn.execute(
                    "UPDATE users SET score = score WHERE user_id = :u", {"u": first["user_id"]}
                )
                with contextlib.suppress(ShardRouterError):
                    txn.execute(
                        "SELECT SLEEP(2) AS s FROM users WHERE user_id = :u",
                        {"u": other["user_id"]},
                    )
                time.sleep(2.5)
        except BaseException as exc:  # the type is what is checked
            error = exc
        engine = router.engines.primary(shard_a)
        with engine.connect() as conn:
            prepared = [r for r in conn.execute(sql_text("XA RECOVER")).fetchall()]
        for row in prepared:  # leave no prepared branch behind for the other tests
            with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
                data = row[3].decode() if isinstance(row[3], bytes) else row[3]
                with contextlib.suppress(Exception):  # 1402: rolled back, as wanted
                    conn.exec_driver_sql(f"XA ROLLBACK '{data}'")
    assert isinstance(error, ShardRouterError) and not prepared, (repr(error), prepared)


@pytest.mark.parametrize("args", [["--bogus", "--json"], ["--json", "ids", "decode", "x"]])
def test_cli_json_error_for_a_usage_error_of_the_group_itself(args: list[str]) -> None:
    """JsonErrorsGroup prints the JSON document from invoke(); a usage error in the shardctl
    group's own options is raised by make_context (super().make_context) before that: no
    JSON on stdout."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", "import shardrouter.cli as c; c.main()", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    document = json.loads(done.stdout or "null")
    assert isinstance(document, dict) and document.get("ok") is False, (done.stdout, done.stderr)
