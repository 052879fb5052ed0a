"""Writes, lookups, refusals, transactions and failures of the routers on real MariaDB shards."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import event, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import (
    CrossShardTransactionError,
    ExecutionError,
    FanoutLimitError,
    KeyValueError,
    ScatterWriteError,
    ShardUnavailableError,
    UnsupportedQueryError,
)
from shardrouter.ops import sandbox as sb

pytestmark = pytest.mark.mariadb

DDL = [
    "CREATE TABLE IF NOT EXISTS {orders} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, amount_cents BIGINT, KEY (user_id))",
    "CREATE TABLE IF NOT EXISTS {merchant_orders} (merchant_id BIGINT, order_id BIGINT,"
    " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))",
    "CREATE TABLE IF NOT EXISTS {users} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)",
    "CREATE TABLE IF NOT EXISTS {user_emails} (email VARCHAR(255) PRIMARY KEY,"
    " user_id BIGINT NOT NULL)",
]
TABLES = ("orders", "merchant_orders", "users", "user_emails")


def _create(router: Router) -> None:
    topology = router.topology
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for split in range(topology.table("orders").split):
                names = {t: topology.table(t).physical(split) for t in TABLES}
                for ddl in DDL:
                    conn.execute(text(ddl.format(**names)))
                for name in names.values():
                    conn.execute(text(f"DELETE FROM {name}"))


@pytest.fixture(scope="module")
def router(shard_databases) -> Iterator[Router]:  # type: ignore[no-untyped-def]
    r = Router(Topology.load(shard_databases), max_fanout=None)
    r.topology_path = shard_databases  # type: ignore[attr-defined]
    _create(r)
    yield r
    r.close()


@pytest.fixture
def ids(router: Router) -> Any:
    return router.topology.id_generator("orders")


def _count(router: Router, table: str) -> int:
    return int(router.execute(f"SELECT COUNT(*) FROM {table}").scalar())


def _insert_order(router: Router, order_id: int, user_id: int, merchant: int) -> Any:
    return router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
        " VALUES (:o, :u, :m, 100)",
        {"o": order_id, "u": user_id, "m": merchant},
    )


class Recorder:
    """Records (shard, statement) in execution order across every shard engine."""

    def __init__(self, router: Router) -> None:
        self.log: list[tuple[str, str]] = []
        self._hooks = []
        for sid, engine in router.engines.primaries.items():

            def hook(conn: Any, cursor: Any, statement: str, *args: Any, _sid: str = sid) -> None:
                self.log.append((_sid, statement.split()[0].upper() + " " + _target(statement)))

            event.listen(engine, "before_cursor_execute", hook)
            self._hooks.append((engine, hook))

    def close(self) -> None:
        for engine, hook in self._hooks:
            event.remove(engine, "before_cursor_execute", hook)


def _target(statement: str) -> str:
    words = statement.replace("(", " ").split()
    for i, w in enumerate(words):
        if w.upper() in ("INTO", "FROM", "UPDATE") and i + 1 < len(words):
            return words[i + 1]
    return ""


def test_lookup_row_is_written_before_its_owner(router: Router, ids: Any) -> None:
    order_id = ids.next_id(user_id=7001)
    rec = Recorder(router)
    try:
        res = _insert_order(router, order_id, 7001, 55)
    finally:
        rec.close()
    writes = [entry for entry in rec.log if entry[1].startswith("INSERT")]
    assert [w[1].split()[1].rstrip("_0123456789") for w in writes] == ["merchant_orders", "orders"]
    assert res.lookups and res.shards == (router.topology.shard_for("orders", 7001),)


def test_owner_delete_comes_before_its_lookup_delete(router: Router, ids: Any) -> None:
    order_id = ids.next_id(user_id=7002)
    _insert_order(router, order_id, 7002, 56)
    rec = Recorder(router)
    try:
        router.execute("DELETE FROM orders WHERE order_id = :o", {"o": order_id})
    finally:
        rec.close()
    deletes = [e[1].split()[1].rstrip("_0123456789") for e in rec.log if e[1].startswith("DELETE")]
    assert deletes == ["orders", "merchant_orders"]
    assert (
        router.execute("SELECT COUNT(*) FROM merchant_orders WHERE merchant_id = 56").scalar() == 0
    )


def test_crash_between_lookup_and_owner_leaves_only_an_orphan(router: Router, ids: Any) -> None:
    # An owner insert that fails after the lookup row was written (a duplicate order id)
    # removes the lookup row it created (issue 7, fuzz A1); only a crash between the two
    # writes leaves an orphan (written directly here), and reads through the lookup ignore it.
    first, second = ids.next_ids(2, user_id=7003)
    _insert_order(router, first, 7003, 57)
    with pytest.raises(ExecutionError) as err:
        router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
            " VALUES (:o, :u, :m, 1)",
            {"o": first, "u": 7003, "m": 58},
        )
    assert err.value.shard == router.topology.shard_for("orders", 7003)
    assert err.value.orig is not None and err.value.orig.args[0] == 1062  # duplicate key
    gone = router.execute("SELECT order_id FROM merchant_orders WHERE merchant_id = 58")
    assert gone.scalars() == []  # the failed insert left no lookup row
    slot = router.topology.slot_for("merchant_orders", 58)
    physical = router.topology.table("merchant_orders").physical(slot)
    with router.engines.primary(router.topology.shard_of_slot(slot)).begin() as conn:
        conn.execute(  # the crash: the lookup row written, the owner never
            text(f"INSERT INTO {physical} (merchant_id, order_id, user_id) VALUES (58, :o, 7003)"),
            {"o": first},
        )
    orphan = router.execute("SELECT order_id FROM merchant_orders WHERE merchant_id = 58")
    assert orphan.scalars() == [first]  # the orphan lookup row exists
    via_lookup = router.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 58})
    assert via_lookup.rows == []  # ... and is ignored: no owner row matches
    _insert_order(router, second, 7003, 58)
    again = router.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 58})
    assert again.scalars() == [second]


def test_unique_lookup_refuses_a_taken_value(router: Router) -> None:
    sql = "INSERT INTO users (user_id, email) VALUES (:u, :e)"
    router.execute(sql, {"u": 8001, "e": "ada@example.com"})
    with pytest.raises(ExecutionError, match="already belongs"):
        router.execute(sql, {"u": 8002, "e": "ada@example.com"})
    assert (
        router.execute("SELECT COUNT(*) FROM users WHERE user_id = :u", {"u": 8002}).scalar() == 0
    )
    found = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": "ada@example.com"})
    assert found.scalars() == [8001] and len(found.shards) == 1


def test_update_and_delete_by_key(router: Router, ids: Any) -> None:
    oids = ids.next_ids(3, user_id=7004)
    for o in oids:
        _insert_order(router, o, 7004, 59)
    res = router.execute("UPDATE orders SET amount_cents = 5 WHERE user_id = :u", {"u": 7004})
    assert res.rowcount == 3 and len(res.shards) == 1
    total = router.execute("SELECT SUM(amount_cents) FROM orders WHERE user_id = :u", {"u": 7004})
    assert total.scalar() == 15
    res = router.execute(
        "DELETE FROM orders WHERE order_id IN (:a, :b)", {"a": oids[0], "b": oids[1]}
    )
    assert res.rowcount == 2
    assert router.execute(
        "SELECT order_id FROM orders WHERE user_id = :u", {"u": 7004}
    ).scalars() == [oids[2]]


@pytest.mark.parametrize(
    ("sql", "error", "words"),
    [
        pytest.param(
            "DELETE FROM orders WHERE amount_cents > 0",
            ScatterWriteError,
            "allow_scatter_write",
            id="scatter-delete",
        ),
        pytest.param(
            "UPDATE orders SET amount_cents = 1",
            ScatterWriteError,
            "no sharding-key",
            id="scatter-update",
        ),
        pytest.param(
            "UPDATE orders SET user_id = 2 WHERE user_id = 1",
            UnsupportedQueryError,
            "Delete it and insert it again",
            id="update-key",
        ),
        pytest.param(
            "UPDATE users SET email = 'x' WHERE user_id = 1",
            UnsupportedQueryError,
            "lookup column users.email",
            id="update-lookup-column",
        ),
        pytest.param(
            "SELECT * FROM orders o JOIN merchant_orders m ON o.merchant_id = m.merchant_id",
            UnsupportedQueryError,
            "meet only inside one shard",
            id="unbound-join",
        ),
        pytest.param(
            "SELECT * FROM orders WHERE user_id IN (SELECT user_id FROM users)",
            UnsupportedQueryError,
            "not confined to one shard",
            id="subquery",
        ),
        pytest.param(
            "SELECT COUNT(DISTINCT merchant_id), COUNT(DISTINCT status) FROM orders",
            UnsupportedQueryError,
            "COUNT(DISTINCT",
            id="count-distinct",
        ),
        pytest.param(
            "INSERT INTO orders SELECT * FROM orders",
            UnsupportedQueryError,
            "INSERT ... SELECT",
            id="insert-select",
        ),
        pytest.param(
            "INSERT INTO orders (amount_cents) VALUES (1)",
            UnsupportedQueryError,
            "no sharding key",
            id="insert-without-key",
        ),
        pytest.param("SELECT 1; SELECT 2", UnsupportedQueryError, "2 statements", id="two"),
        pytest.param("DROP TABLE orders", UnsupportedQueryError, "schema apply", id="ddl"),
        pytest.param("SELEC * FROM orders", UnsupportedQueryError, "parse", id="syntax"),
        pytest.param(
            "SELECT CAST(SUM(amount_cents) AS CHAR) FROM orders",
            UnsupportedQueryError,
            "over aggregates",
            id="expression-of-aggregates",
        ),
    ],
)
def test_refusals_name_the_construct(router: Router, sql: str, error: type, words: str) -> None:
    before = _count(router, "orders")
    with pytest.raises(error, match=words.replace("(", r"\(")):
        router.execute(sql)
    assert _count(router, "orders") == before  # nothing ran


def test_caps_on_fanout_and_offset(router: Router) -> None:
    capped = Router(router.topology, engines=router.engines, max_fanout=2, max_offset=100)
    with pytest.raises(FanoutLimitError, match="max_fanout=2"):
        capped.execute("SELECT order_id FROM orders ORDER BY order_id LIMIT 5")
    with pytest.raises(FanoutLimitError, match="OFFSET 101"):
        Router(router.topology, engines=router.engines, max_offset=100).execute(
            "SELECT order_id FROM orders ORDER BY order_id LIMIT 5 OFFSET 101"
        )
    # One key is one shard: the caps do not apply.
    assert capped.execute("SELECT COUNT(*) FROM orders WHERE user_id = 1").scalar() == 0


def test_scatter_write_when_allowed(router: Router, ids: Any) -> None:
    o = ids.next_id(user_id=7005)
    _insert_order(router, o, 7005, 60)
    permissive = Router(router.topology, engines=router.engines, allow_scatter_write=True)
    res = permissive.execute(
        "UPDATE orders SET amount_cents = 77 WHERE merchant_id = 60 AND amount_cents = 100"
    )
    assert res.rowcount == 1 and len(res.shards) == 1  # routed by the lookup, not scattered
    res = permissive.execute("UPDATE orders SET amount_cents = 78 WHERE amount_cents = 77")
    assert res.rowcount == 1 and res.scatter and len(res.shards) == len(router.topology.shards)


def test_transaction_is_single_shard(router: Router, ids: Any) -> None:
    users = [u for u in range(9000, 9100)]
    a = users[0]
    b = next(
        u
        for u in users
        if router.topology.shard_for("orders", u) != router.topology.shard_for("orders", a)
    )
    oa, ob = ids.next_id(user_id=a), ids.next_id(user_id=b)
    sql = "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, 61, 1)"
    with (
        pytest.raises(CrossShardTransactionError, match="bound to shard"),
        router.transaction() as tx,
    ):
        tx.execute(sql, {"o": oa, "u": a})
        tx.execute(sql, {"o": ob, "u": b})
    # Rolled back: nothing of the transaction is visible, not even its first statement.
    assert router.execute("SELECT COUNT(*) FROM orders WHERE user_id = :u", {"u": a}).scalar() == 0
    with router.transaction() as tx:
        tx.execute(sql, {"o": oa, "u": a})
        tx.execute("UPDATE orders SET amount_cents = 2 WHERE order_id = :o", {"o": oa})
    assert (
        router.execute("SELECT amount_cents FROM orders WHERE order_id = :o", {"o": oa}).scalar()
        == 2
    )


def test_explicit_connection_reaches_the_key_shard(router: Router, ids: Any) -> None:
    o = ids.next_id(user_id=7006)
    _insert_order(router, o, 7006, 62)
    with router.connection(user_id=7006) as conn:
        assert conn.shard == router.topology.shard_for("orders", 7006)
        table = conn.physical("orders")
        got = conn.execute(text(f"SELECT user_id FROM {table} WHERE order_id = :o"), {"o": o})
        assert got.scalar() == 7006
    with router.connection(order_id=o) as conn:  # the gene finds the same shard
        assert conn.shard == router.topology.shard_for("orders", 7006)


def test_async_router_writes_and_reads(router: Router, ids: Any) -> None:
    async def scenario() -> list[Any]:
        async with AsyncRouter(router.topology) as aio:
            o = ids.next_id(user_id=7007)
            await aio.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
                " VALUES (:o, :u, 63, 9)",
                {"o": o, "u": 7007},
            )
            async with aio.connection(user_id=7007) as conn:
                direct = (
                    await conn.execute(
                        text(
                            f"SELECT amount_cents FROM {conn.physical('orders')} WHERE order_id = :o"
                        ),
                        {"o": o},
                    )
                ).scalar()
            via_lookup = (
                await aio.execute("SELECT order_id FROM orders WHERE merchant_id = :m", {"m": 63})
            ).scalars()
            return [o, direct, via_lookup]

    o, direct, via_lookup = asyncio.run(scenario())
    assert direct == 9 and via_lookup == [o]


# -- a killed shard -----------------------------------------------------------------------------


@pytest.fixture
def two_shards(scratch_dir, scratch_port) -> Iterator[tuple[sb.Sandbox, Router]]:  # type: ignore[no-untyped-def]
    box = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    raw = config_from_dict(
        {
            "slots": 1024,
            "shards": {
                s.name: {
                    "primary": s.url,
                    "slots": [[i * 512, (i + 1) * 512]],
                    "pool": {"connect_timeout_s": 2, "timeout_s": 3, "query_timeout_s": 2},
                }
                for i, s in enumerate(box.shards)
            },
            "tables": {"orders": {"column": "user_id", "strategy": "hash"}},
        }
    )
    router = Router(Topology(raw))
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE orders (order_id BIGINT PRIMARY KEY, user_id BIGINT)"))
    yield box, router
    router.close()


def test_killed_shard_fails_fast_and_others_keep_serving(
    two_shards: tuple[sb.Sandbox, Router],
) -> None:
    box, router = two_shards
    topology = router.topology
    live_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s0")
    dead_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s1")
    for n, u in enumerate((live_user, dead_user)):
        router.execute("INSERT INTO orders (order_id, user_id) VALUES (:o, :u)", {"o": n, "u": u})
    sb.kill_shard(box, "s1")
    started = time.monotonic()
    with pytest.raises(ShardUnavailableError) as err:
        router.execute("SELECT * FROM orders WHERE user_id = :u", {"u": dead_user})
    assert err.value.shard == "s1" and time.monotonic() - started < 10
    assert "s1" in str(err.value) and "root" not in str(err.value).split("://")[0]
    rows = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": live_user})
    assert rows.scalars() == [0]
    with pytest.raises(ShardUnavailableError):
        router.execute("SELECT COUNT(*) FROM orders")  # a scatter needs every shard
    sb.start_shard(box, "s1")
    rows = router.execute("SELECT order_id FROM orders WHERE user_id = :u", {"u": dead_user})
    assert rows.scalars() == [1]  # back, with its data


def test_keyset_pages_walk_a_merchant_in_order(router: Router, ids: Any) -> None:
    merchant = 64
    placed = []
    for user in range(7100, 7130):
        for o in ids.next_ids(2, user_id=user):
            _insert_order(router, o, user, merchant)
            placed.append(o)
    seen: list[int] = []
    after = None
    pages = 0
    while True:
        page = router.page(
            "orders",
            columns=("order_id", "user_id"),
            order_by=("order_id",),
            where={"merchant_id": merchant},
            after=after,
            limit=7,
        )
        seen += [r[0] for r in page.rows]
        pages += 1
        if page.after is None:
            break
        after = page.after
    assert seen == sorted(placed, reverse=True)  # every order once, newest id first
    assert pages == len(placed) // 7 + 1


def test_check_lookups_finds_and_fixes_orphans_and_reports_missing(
    router: Router, ids: Any
) -> None:
    from click.testing import CliRunner

    from shardrouter.cli import main
    from shardrouter.ops.lookups import check_lookups

    orphan_order, missing_order = ids.next_ids(2, user_id=7200)
    topology = router.topology
    slot = topology.slot_for("merchant_orders", 65)
    with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO merchant_orders (merchant_id, order_id, user_id) VALUES (65, :o, 7200)"
            ),
            {"o": orphan_order},
        )
    with router.connection(user_id=7200) as conn:  # an owner written behind the router's back
        conn.execute(
            text(
                f"INSERT INTO {conn.physical('orders')} (order_id, user_id,"
                " merchant_id, amount_cents) VALUES (:o, 7200, 66, 1)"
            ),
            {"o": missing_order},
        )
    report = next(r for r in check_lookups(router) if r.lookup_table == "merchant_orders")
    assert (65, 7200, orphan_order) in report.orphans
    assert (66, 7200, missing_order) in report.missing
    fixed = next(
        r for r in check_lookups(router, fix=True, grace_s=0) if r.lookup_table == "merchant_orders"
    )
    assert fixed.removed >= 1
    again = next(r for r in check_lookups(router) if r.lookup_table == "merchant_orders")
    assert (65, 7200, orphan_order) not in again.orphans
    result = CliRunner().invoke(
        main, ["check", "lookups", "--config", str(topology_path(router)), "--json"]
    )
    assert result.exit_code == 1, result.output  # a missing entry fails the check
    assert "missing" in result.output and str(missing_order) in result.output
    router.execute("DELETE FROM orders WHERE order_id = :o", {"o": missing_order})


def topology_path(router: Router) -> Any:
    return router.topology_path  # type: ignore[attr-defined]


def _two_users_on_two_shards(router: Router, start: int) -> tuple[int, int]:
    a = start
    b = next(
        u
        for u in range(start + 1, start + 200)
        if router.topology.shard_for("orders", u) != router.topology.shard_for("orders", a)
    )
    return a, b


def test_xa_transaction_spans_shards_and_commits_both(router: Router, ids: Any) -> None:
    xa_router = Router(router.topology, engines=router.engines, xa=True)
    a, b = _two_users_on_two_shards(router, 9200)
    oa, ob = ids.next_id(user_id=a), ids.next_id(user_id=b)
    sql = "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, 67, 3)"
    with xa_router.transaction() as tx:
        tx.execute(sql, {"o": oa, "u": a})
        tx.execute(sql, {"o": ob, "u": b})
        assert len(tx.shards) == 2
    got = router.execute(
        "SELECT order_id FROM orders WHERE user_id IN (:a, :b) ORDER BY order_id", {"a": a, "b": b}
    )
    assert got.scalars() == sorted([oa, ob])
    oc, od = ids.next_id(user_id=a), ids.next_id(user_id=b)
    with pytest.raises(RuntimeError, match="boom"), xa_router.transaction() as tx:
        tx.execute(sql, {"o": oc, "u": a})
        tx.execute(sql, {"o": od, "u": b})
        raise RuntimeError("boom")
    left = router.execute(
        "SELECT COUNT(*) FROM orders WHERE order_id IN (:c, :d)", {"c": oc, "d": od}
    )
    assert left.scalar() == 0  # both branches rolled back


@pytest.mark.parametrize("decided", [False, True], ids=["crash-before-decision", "crash-after"])
def test_xa_recovery_finishes_prepared_branches(router: Router, ids: Any, decided: bool) -> None:
    from shardrouter.engine import xa

    a, b = _two_users_on_two_shards(router, 9300 + 100 * decided)
    rows = {a: ids.next_id(user_id=a), b: ids.next_id(user_id=b)}
    gtrid = xa.new_gtrid()
    conns = {}
    for user, order in rows.items():  # a coordinator that dies after PREPARE
        shard = router.topology.shard_for("orders", user)
        conn = router.engines.primary(shard).connect()
        xa.start(conn, gtrid, shard, None)  # the older xid form
        table = router.topology.table("orders").physical(router.topology.slot_for("orders", user))
        conn.execute(
            text(
                f"INSERT INTO {table} (order_id, user_id, merchant_id, amount_cents)"
                " VALUES (:o, :u, 68, 1)"
            ),
            {"o": order, "u": user},
        )
        conn.exec_driver_sql(f"XA END '{xa.xid(gtrid, shard)}'")
        conn.exec_driver_sql(f"XA PREPARE '{xa.xid(gtrid, shard)}'")
        conns[shard] = conn
    coordinator = router.engines.primary(next(iter(router.topology.shards)))
    if decided:
        xa.record_decision(coordinator, gtrid)
    for conn in conns.values():
        conn.invalidate()  # the connection dies with its coordinator; the branch stays prepared
    young = router.recover_xa()  # default min_age_s: a coordinator may still be at work
    assert sum(gtrid in x for x in young.in_doubt) == 2
    assert not any(gtrid in x for x in young.committed + young.rolled_back)
    report = router.recover_xa(min_age_s=0)
    mine = [x for x in report.committed + report.rolled_back if gtrid in x]
    assert len(mine) == 2
    assert (set(mine) <= set(report.committed)) is decided
    found = router.execute(
        "SELECT COUNT(*) FROM orders WHERE order_id IN (:x, :y)", {"x": rows[a], "y": rows[b]}
    ).scalar()
    assert found == (2 if decided else 0)  # all or nothing
    again = router.recover_xa(min_age_s=0)
    assert not any(gtrid in x for x in again.committed + again.rolled_back + again.in_doubt)


def test_xa_recovery_fences_a_slow_coordinator(
    router: Router, ids: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery that overtakes a live coordinator between PREPARE and its decision records
    "abort" first: the coordinator then cannot record "commit", rolls back and raises."""
    from shardrouter.engine import xa
    from shardrouter.errors import ExecutionError

    a, b = _two_users_on_two_shards(router, 9700)
    xa_router = Router(router.topology, xa=True)
    real_record = xa.record_decision
    reports: list[xa.RecoveryReport] = []

    def slow_coordinator(coordinator: Any, gtrid: str, outcome: str = "commit") -> None:
        if outcome == "commit":  # the coordinator's call (recovery's own fence passes through)
            reports.append(router.recover_xa(min_age_s=0))  # runs while the coordinator stalls
        real_record(coordinator, gtrid, outcome)

    monkeypatch.setattr(xa, "record_decision", slow_coordinator)
    placed = {u: ids.next_id(user_id=u) for u in (a, b)}
    sql = "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents) VALUES (:o, :u, 69, 1)"
    try:
        with (
            pytest.raises(ExecutionError, match="rolled back by recover_xa"),
            xa_router.transaction() as tx,
        ):
            for u, o in placed.items():
                tx.execute(sql, {"o": o, "u": u})
    finally:
        monkeypatch.undo()
        xa_router.close()
    assert len(reports) == 1
    found = router.execute(
        "SELECT COUNT(*) FROM orders WHERE order_id IN (:x, :y)",
        {"x": placed[a], "y": placed[b]},
    ).scalar()
    assert found == 0  # neither branch committed
    leftover = router.recover_xa(min_age_s=0)
    assert not leftover.in_doubt  # nothing left prepared anywhere


@pytest.fixture
def with_replicas(router: Router) -> Iterator[Router]:
    """The session shards, each with a 'replica': another real database on the same server
    whose users rows say 'replica', so a test can tell which side answered a read."""
    raw = router.topology.config.model_dump(by_alias=True, mode="json")
    for name, shard in raw["shards"].items():
        primary = router.topology.shards[name].primary
        shard["replicas"] = [
            primary.set(database=f"{primary.database}_replica").render_as_string(
                hide_password=False
            )
        ]
        with router.engines.primary(name).begin() as conn:
            conn.execute(text(f"CREATE DATABASE IF NOT EXISTS {primary.database}_replica"))
            conn.execute(
                text(
                    f"CREATE TABLE IF NOT EXISTS {primary.database}_replica.users"
                    " (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL)"
                )
            )
            conn.execute(text(f"DELETE FROM {primary.database}_replica.users"))
    replicated = Router(Topology(config_from_dict(raw)))
    for user in (9501, 9502):
        shard = replicated.topology.shard_for("users", user)
        primary = replicated.topology.shards[shard].primary.database
        with replicated.engines.primary(shard).begin() as conn:
            conn.execute(
                text("REPLACE INTO users (user_id, email) VALUES (:u, 'primary')"), {"u": user}
            )
            conn.execute(
                text(
                    f"REPLACE INTO {primary}_replica.users (user_id, email) VALUES (:u, 'replica')"
                ),
                {"u": user},
            )
    yield replicated
    replicated.close()


def test_reads_use_replicas_outside_transactions_only(with_replicas: Router) -> None:
    r = with_replicas
    q = "SELECT email FROM users WHERE user_id = :u"
    assert r.execute(q, {"u": 9501}).scalar() == "replica"
    with r.transaction() as tx:
        assert tx.execute(q, {"u": 9501}).scalar() == "primary"
    with r.scope() as s:
        assert s.execute(q, {"u": 9502}).scalar() == "replica"
        s.execute(
            "INSERT INTO users (user_id, email) VALUES (:u, 'fresh@example.com')", {"u": 9503}
        )
        assert s.execute(q, {"u": 9503}).scalar() == "fresh@example.com"  # read-your-writes
        assert s.execute(q, {"u": 9502}).scalar() == "primary"
    assert r.execute(q, {"u": 9503}).scalar() is None  # the 'replica' never saw it
    pinned = Router(r.topology, engines=r.engines, replica_reads=False)
    assert pinned.execute(q, {"u": 9501}).scalar() == "primary"


def test_router_session_is_an_orm_session_on_the_key_shard(router: Router) -> None:
    with router.session(user_id=9601) as session:
        session.execute(text("INSERT INTO users (user_id, email) VALUES (9601, 's@example.com')"))
    with router.connection(user_id=9601) as conn:
        assert (
            conn.execute(text("SELECT email FROM users WHERE user_id = 9601")).scalar()
            == "s@example.com"
        )


def test_core_statements_route_like_sql(router: Router, ids: Any) -> None:
    from sqlalchemy import BigInteger, Column, MetaData, Table, func, insert, select

    orders = Table(
        "orders",
        MetaData(),
        Column("order_id", BigInteger),
        Column("user_id", BigInteger),
        Column("merchant_id", BigInteger),
        Column("amount_cents", BigInteger),
    )
    o1, o2 = ids.next_ids(2, user_id=9801)
    res = router.execute(
        insert(orders).values(order_id=o1, user_id=9801, merchant_id=71, amount_cents=4)
    )
    assert res.rowcount == 1 and res.lookups  # the lookup row came with it
    router.execute(insert(orders).values(order_id=o2, user_id=9801, merchant_id=71, amount_cents=6))
    one = router.execute(
        select(orders.c.order_id).where(orders.c.user_id == 9801).order_by(orders.c.order_id)
    )
    assert one.scalars() == [o1, o2] and len(one.shards) == 1
    total = router.execute(
        select(func.sum(orders.c.amount_cents)).where(orders.c.merchant_id == 71)
    )
    assert total.scalar() == 10 and total.lookups


def test_async_router_reports_a_killed_shard(two_shards: tuple[Any, Router]) -> None:
    box, router = two_shards
    topology = router.topology
    dead_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s1")
    live_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s0")
    sb.kill_shard(box, "s1")

    async def run() -> tuple[type, Any]:
        async with AsyncRouter(topology) as aio:
            try:
                await aio.execute("SELECT * FROM orders WHERE user_id = :u", {"u": dead_user})
            except ShardUnavailableError as exc:
                error: Any = exc
            live = await aio.execute(
                "SELECT COUNT(*) FROM orders WHERE user_id = :u", {"u": live_user}
            )
            return type(error), (error.shard, live.scalar())

    started = time.monotonic()
    kind, (shard, live_count) = asyncio.run(run())
    assert kind is ShardUnavailableError and shard == "s1" and live_count == 0
    assert time.monotonic() - started < 15


def test_in_list_sends_each_shard_only_its_own_values(
    router: Router, ids: Any, caplog: pytest.LogCaptureFixture
) -> None:
    users = list(range(9900, 9912))
    placed = {u: ids.next_id(user_id=u) for u in users}
    for u, o in placed.items():
        _insert_order(router, o, u, 72)
    marks = ", ".join(f":u{i}" for i in range(len(users)))
    params = {f"u{i}": u for i, u in enumerate(users)}
    with caplog.at_level(logging.DEBUG, logger="shardrouter.sql"):
        res = router.execute(
            f"SELECT order_id FROM orders WHERE user_id IN ({marks}) ORDER BY order_id", params
        )
    assert sorted(res.scalars()) == sorted(placed.values())
    sent = [r for r in caplog.records if r.name == "shardrouter.sql"]
    assert len(sent) > 1  # the users live on several shards
    seen: list[int] = []
    for record in sent:
        statement: str = record.statement  # type: ignore[attr-defined]
        # the values the statement binds (params may hold more: the caller's whole mapping)
        values = [record.params[name] for name in re.findall(r":(u\d+)\b", statement)]  # type: ignore[attr-defined]
        # every value a shard was sent routes to that shard, and each value went out once
        assert all(router.topology.shard_for("orders", v) == record.shard for v in values), (
            statement
        )  # type: ignore[attr-defined]
        seen += values
    assert sorted(seen) == sorted(users)


def test_core_select_with_limit_fans_out_and_merges(router: Router, ids: Any) -> None:
    from sqlalchemy import BigInteger, Column, MetaData, Table, select

    orders = Table(
        "orders",
        MetaData(),
        Column("order_id", BigInteger),
        Column("user_id", BigInteger),
        Column("amount_cents", BigInteger),
    )
    for user in range(9960, 9970):
        _insert_order(router, ids.next_id(user_id=user), user, 74)
    every = router.execute("SELECT order_id FROM orders").scalars()
    top = router.execute(
        select(orders.c.order_id).order_by(orders.c.order_id.desc()).limit(3).offset(1)
    )
    assert top.scalars() == sorted(every, reverse=True)[1:4] and top.scalar() is not None


def test_insert_refuses_an_order_id_from_another_users_slot(router: Router, ids: Any) -> None:
    a, b = _two_users_on_two_shards(router, 9950)
    foreign_id = ids.next_id(user_id=b)  # carries b's slot
    with pytest.raises(KeyValueError, match="generate order_id with the id generator"):
        _insert_order(router, foreign_id, a, 73)
    assert (
        router.execute(
            "SELECT COUNT(*) FROM orders WHERE order_id = :o", {"o": foreign_id}
        ).scalar()
        == 0
    )


def test_hung_shard_fails_within_the_query_timeout(two_shards: tuple[Any, Router]) -> None:
    """A shard that accepts connections but stops answering (SIGSTOP) fails within
    query_timeout_s, sync and async, while the other shard keeps serving."""
    box, router = two_shards
    topology = router.topology
    hung_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s1")
    live_user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s0")
    q = "SELECT COUNT(*) FROM orders WHERE user_id = :u"
    router.execute(q, {"u": hung_user})  # a pooled connection exists: the hang is mid-query
    sb.pause_shard(box, "s1")
    try:
        started = time.monotonic()
        with pytest.raises(ShardUnavailableError) as err:
            router.execute(q, {"u": hung_user})
        assert err.value.shard == "s1" and time.monotonic() - started < 8
        assert router.execute(q, {"u": live_user}).scalar() == 0

        async def run() -> Any:
            async with AsyncRouter(topology) as aio:
                assert (await aio.execute(q, {"u": live_user})).scalar() == 0
                with pytest.raises(ShardUnavailableError) as aerr:
                    await aio.execute(q, {"u": hung_user})
                return aerr.value.shard

        started = time.monotonic()
        assert asyncio.run(run()) == "s1" and time.monotonic() - started < 8
    finally:
        sb.resume_shard(box, "s1")


def test_async_multi_shard_insert_is_all_or_nothing(router: Router, ids: Any) -> None:
    a, b = _two_users_on_two_shards(router, 9980)
    taken = ids.next_id(user_id=b)
    _insert_order(router, taken, b, 75)
    fresh = ids.next_id(user_id=a)
    sql = (
        "INSERT INTO orders (order_id, user_id, merchant_id, amount_cents)"
        " VALUES (:o1, :a, 76, 1), (:o2, :b, 76, 1)"
    )

    async def run() -> None:
        async with AsyncRouter(router.topology) as aio:
            await aio.execute(sql, {"o1": fresh, "a": a, "o2": taken, "b": b})

    with pytest.raises(ExecutionError):
        asyncio.run(run())
    assert (
        router.execute("SELECT COUNT(*) FROM orders WHERE order_id = :o", {"o": fresh}).scalar()
        == 0
    )
