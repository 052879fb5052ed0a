"""Review 10 of online resharding: reproductions on real MariaDB (the session sandbox) of what a
service meets during a migration. Each test states what docs/RESHARDING.md promises and fails
while the package breaks it.

Clusters come from reshard_cluster.review_clusters (databases rv10_<tag>_...): fresh databases
per test on the sandbox's servers, a meta store, the orders schema (plus a test's own tables),
a 2-shard "before" version (s0 owns [0, 512), s1 [512, 1024)); s2 and s3 are defined for plans
that add them. No follower routers are registered (acknowledgements are immediate) unless a
test starts one.
"""

from __future__ import annotations

import copy
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import (
    MakeReviewCluster,
    ReviewCluster,
    add_users,
    review_clusters,
    users_in,
    values_in,
)
from sqlalchemy import BigInteger, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import shardrouter.reshard.copy as mover
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import ReshardError, UnsupportedQueryError
from shardrouter.reshard.workflow import Workflow

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))


# --------------------------------------------------------------------------- the cluster


@pytest.fixture
def make_cluster(shard_databases: Path, sandbox: Any) -> Iterator[MakeReviewCluster]:
    with review_clusters(shard_databases, sandbox, "rv10") as make:
        yield make


def _order_id(topology: Topology, user: int, n: int) -> int:
    slot = topology.slot_for("orders", user)
    return int(topology.id_layout.compose(n, slot, 1, 0))


def _add_order(router: Router, topology: Topology, user: int, merchant: int, n: int) -> int:
    order = _order_id(topology, user, n)
    router.execute(
        "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
        " VALUES (:o, :u, :m, 'new', 100, '2026-01-01 00:00:00')",
        {"o": order, "u": user, "m": merchant},
    )
    return order


# --------------------------------------------------------------------------- findings


def _same_split_users(topology: Topology, moving: tuple[int, int], other: tuple[int, int]) -> Any:
    """A user of the ``moving`` slots and one of the ``other`` slots whose orders share one
    physical table (slot % 4): a read of that table on one shard sees both."""
    for u1 in users_in(topology, *moving, 50):
        for u2 in users_in(topology, *other, 200):
            if topology.slot_for("orders", u1) % 4 == topology.slot_for("orders", u2) % 4:
                return u1, u2
    raise AssertionError("no pair")


def test_rv10_a_merchant_read_after_the_switch_returns_the_sources_stale_copy_too(
    make_cluster: MakeReviewCluster,
) -> None:
    """A read by merchant_id goes through the merchant_orders lookup to the shards of the
    owners (users) found, and runs its WHERE merchant_id = ? there as it is. Between the switch
    and finalize the source still holds copies of the moved orders (and serves its other
    slots): when the merchant also has an order of a user staying on the source, the read on
    the source returns the moved order's stale copy besides the target's current row. Reads
    across shards are refused in this window for exactly that reason ("count them twice"),
    but the lookup route is not: the service sees the order twice, once with its old status.
    Expected: each order once, as its owner holds it."""
    c = make_cluster("merch")
    c.move((0, 128), "s2", "m-m")
    topology = c.topology()
    mover_user, stayer = _same_split_users(topology, (0, 128), (128, 512))
    merchant = 4242
    router = c.router()
    try:
        add_users(router, [mover_user, stayer])
        moved = _add_order(router, topology, mover_user, merchant, 1)
        kept = _add_order(router, topology, stayer, merchant, 2)
    finally:
        router.close()
    c.run("m-m", "start", "copy", "verify", "switch")
    router = c.router()
    try:  # the service pays the moved order, on its new owner
        router.execute("UPDATE orders SET status = 'paid' WHERE order_id = :o", {"o": moved})
        rows = router.execute(
            "SELECT order_id, status FROM orders WHERE merchant_id = :m ORDER BY order_id",
            {"m": merchant},
        ).rows
        counted = router.execute(
            "SELECT COUNT(*) FROM orders WHERE merchant_id = :m", {"m": merchant}
        ).rows
        page = router.page(  # the listing Router.page's docstring gives as its example
            "orders",
            columns=("order_id", "status"),
            order_by=("created_at", "order_id"),
            where={"merchant_id": merchant},
            limit=10,
        )
    finally:
        router.close()
    expected = sorted([(moved, "paid"), (kept, "new")])
    found = {
        "select": sorted(tuple(r) for r in rows),
        "count": [tuple(r) for r in counted],
        "page": sorted(tuple(r) for r in page.rows),
    }
    assert found == {"select": expected, "count": [(2,)], "page": expected}, found


def test_rv10_a_merchant_read_during_a_move_onto_a_serving_shard_counts_the_copy(
    make_cluster: MakeReviewCluster,
) -> None:
    """The same before the switch, when the target already serves slots of its own (a move
    between existing shards): from copy on, the target holds copies of the moving orders, and
    a merchant read that reaches it for an order of its own also returns the copy."""
    c = make_cluster("merch2")
    c.move((0, 128), "s1", "m-n")
    topology = c.topology()
    mover_user, own = _same_split_users(topology, (0, 128), (512, 1024))
    merchant = 777
    router = c.router()
    try:
        add_users(router, [mover_user, own])
        moved = _add_order(router, topology, mover_user, merchant, 1)
        kept = _add_order(router, topology, own, merchant, 2)
    finally:
        router.close()
    c.run("m-n", "start", "copy")
    router = c.router()
    try:
        rows = router.execute(
            "SELECT order_id FROM orders WHERE merchant_id = :m", {"m": merchant}
        ).rows
    finally:
        router.close()
    assert sorted(r[0] for r in rows) == sorted([moved, kept]), rows


@pytest.mark.parametrize(
    ("collation", "variant"),
    [("utf8mb4_general_ci", str.upper), ("utf8mb4_bin", lambda s: s + " ")],
    ids=["letter-case", "trailing-space"],
)
def test_rv10_a_move_onto_a_serving_shard_overwrites_its_row_with_an_equal_key(
    make_cluster: MakeReviewCluster, collation: str, variant: Callable[[str], str]
) -> None:
    """A string sharding key hashed without fold_case (the default: Vitess's keyspace ids)
    routes 'abc' and 'ABC' (or 'abc ' under any PAD SPACE collation, utf8mb4_bin included)
    to different slots, so two shards may each hold one of them, though the column holds
    them as one value. A move onto the shard that holds the other one copies with INSERT ...
    ON DUPLICATE KEY UPDATE (key columns included): the target's own row, of a slot it owns
    and that never moves, is overwritten by the moving row. Verify compares the moving slots
    only (equal); after the switch the target's own row is gone for good. Expected: the
    collision refused (typed, naming the key) before anything is overwritten, or both rows
    kept."""
    ddl = (
        "CREATE TABLE rv10_codes (code VARCHAR(32) NOT NULL, v INT NOT NULL,"
        f" PRIMARY KEY (code)) DEFAULT CHARSET=utf8mb4 COLLATE={collation}",
    )
    tables = {"rv10_codes": {"column": "code", "type": "str", "strategy": "hash"}}
    c = make_cluster("coll", tables, ddl)
    topology = c.topology()
    own = next(
        f"code{i}"
        for i in range(100_000)
        if 512 <= topology.slot_for("rv10_codes", f"code{i}") < 1024
        and topology.slot_for("rv10_codes", variant(f"code{i}")) < 128
    )
    moving = variant(own)
    router = c.router()
    try:
        router.execute("INSERT INTO rv10_codes (code, v) VALUES (:c, 1)", {"c": own})  # s1
        router.execute("INSERT INTO rv10_codes (code, v) VALUES (:c, 2)", {"c": moving})  # s0
    finally:
        router.close()
    c.move((0, 128), "s1", "m-c")
    refused: ReshardError | None = None
    try:
        c.run("m-c", "start", "copy", "verify", "switch")
    except ReshardError as exc:
        refused = exc
    held = c.rows("s1", "SELECT code, v FROM rv10_codes")
    if refused is not None:  # a refusal is fine, as long as nothing was overwritten
        assert (own, 1) in held, f"refused ({refused}) but s1's own row is gone: {held}"
        return
    router = c.router()
    try:
        got_own = router.execute("SELECT v FROM rv10_codes WHERE code = :c", {"c": own}).rows
    finally:
        router.close()
    assert [tuple(r) for r in got_own] == [(1,)], f"s1's own row {own!r}: {got_own}, s1: {held}"


def test_rv10_a_zero_date_in_a_date_sharding_column_stops_every_drain(
    make_cluster: MakeReviewCluster,
) -> None:
    """A DATE sharding column may hold '0000-00-00' (written under a non-strict sql_mode: the
    movers' own sql_mode keeps such values on purpose). The backfill passes over a row whose
    slot cannot be told (RoutingError: not moving). The drain does not: a journal entry with
    that value ('["0000-00-00"]') makes journal._shard_value raise a bare ValueError
    (date.fromisoformat, then datetime.fromisoformat) before any slot check, and the whole
    drain stops, whichever slot the row has, every time (the entry stays). One update of such
    a row on the source blocks verify and the switch for good, with an untyped error that
    names neither the table nor the row. Expected: the entry handled as the backfill handles
    the row (or a typed error naming it), the migration going on."""
    ddl = (
        "CREATE TABLE rv10_days (id INT NOT NULL PRIMARY KEY, day DATE NOT NULL,"
        " v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    tables = {"rv10_days": {"column": "day", "type": "date", "strategy": "hash"}}
    c = make_cluster("zero", tables, ddl)
    topology = c.topology()
    days = [dt.date(2025, 1, 1) + dt.timedelta(days=i) for i in range(400)]
    mine = [d for d in days if topology.slot_for("rv10_days", d) < 512][:30]
    router = c.router()
    try:
        for i, d in enumerate(mine):
            router.execute(
                "INSERT INTO rv10_days (id, day, v) VALUES (:i, :d, 0)", {"i": i + 1, "d": d}
            )
    finally:
        router.close()
    with c.engine("s0").begin() as conn:  # a legacy row, written under a lenient sql_mode
        conn.exec_driver_sql("SET SESSION sql_mode = ''")
        conn.exec_driver_sql("INSERT INTO rv10_days VALUES (1000, '0000-00-00', 0)")
    c.move((0, 128), "s2", "m-z")
    c.run("m-z", "start", "copy")
    with c.engine("s0").begin() as conn:  # the legacy row is touched while the copy runs
        conn.exec_driver_sql("UPDATE rv10_days SET v = 1 WHERE id = 1000")
    router = c.router()
    moving = [d for d in mine if topology.slot_for("rv10_days", d) < 128]
    try:  # and a moving row too: its change must reach the target
        router.execute("UPDATE rv10_days SET v = 7 WHERE day = :d", {"d": moving[0]})
    finally:
        router.close()
    error: BaseException | None = None
    try:
        c.run("m-z", "verify", "switch")
    except Exception as exc:
        error = exc
    assert error is None, f"{type(error).__name__}: {error}"
    router = c.router()
    try:
        got = router.execute("SELECT v FROM rv10_days WHERE day = :d", {"d": moving[0]}).rows
    finally:
        router.close()
    assert [tuple(r) for r in got] == [(7,)]


def test_rv10_finalize_and_cancel_ignore_chunk_and_the_throttle(
    make_cluster: MakeReviewCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`shardctl reshard finalize|cancel` accept --chunk and --max-rows-per-s (help: "Throttle
    the copy and the deletes"), but the deletes ignore them: finalize calls delete_moved with
    its default chunk (1000) whatever --chunk says, and cancel (_delete_copies) passes neither
    a chunk nor a throttle, so an operator who throttles the cleanup of a big table to spare
    the target gets an unthrottled delete at full speed. Expected: the options reach the
    deletes (or are refused for these actions)."""
    from click.testing import CliRunner

    from shardrouter.cli import main

    c = make_cluster("opts")
    topology = c.topology()
    router = c.router()
    try:
        add_users(router, users_in(topology, 0, 64, 5) + users_in(topology, 128, 192, 5))
    finally:
        router.close()
    c.move((0, 64), "s2", "m-o1")
    c.run("m-o1", "start", "copy", "verify", "switch")
    calls: list[tuple[str, dict[str, Any]]] = []
    original = mover.delete_moved

    def delete_moved(*args: Any, **kwargs: Any) -> int:
        calls.append((args[1].physical, dict(kwargs)))
        return original(*args, **kwargs)

    monkeypatch.setattr(mover, "delete_moved", delete_moved)
    flags = ["--meta-url", c.meta_url, "--chunk", "7", "--max-rows-per-s", "50", "--yes"]
    result = CliRunner().invoke(
        main, ["reshard", "finalize", "m-o1", *flags], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    finalize = [kw for _, kw in calls]
    c.move((64, 128), "s2", "m-o2")
    c.run("m-o2", "start", "copy")
    calls.clear()
    result = CliRunner().invoke(main, ["reshard", "cancel", "m-o2", *flags], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    cancel = [kw for _, kw in calls]
    assert finalize and cancel
    problems = [
        f"{what}: chunk {kw.get('chunk', 'default 1000')}, rows/s"
        f" {getattr(kw.get('throttle'), 'max_rows_per_s', 'unthrottled')}"
        for what, kws in (("finalize", finalize), ("cancel", cancel))
        for kw in kws
        if kw.get("chunk") != 7 or getattr(kw.get("throttle"), "max_rows_per_s", None) != 50
    ]
    assert not problems, sorted(set(problems))


def _frozen_and_switched(doc: dict[str, Any], slot: int) -> tuple[Topology, Topology]:
    """(frozen, switched) versions of ``doc`` for ``slot`` moving s0 -> s1, as the workflow
    pushes them (installed by hand into a router, as its follower would)."""
    frozen = copy.deepcopy(doc)
    frozen["moving"] = [
        {
            "slots": [slot, slot + 1],
            "source": "s0",
            "target": "s1",
            "write_mode": "frozen",
            "hold_s": 5.0,
            "migration": "m-hand",
        }
    ]
    switched = copy.deepcopy(frozen)
    start, end = switched["shards"]["s0"]["slots"][0]
    switched["shards"]["s0"]["slots"] = [r for r in ([start, slot], [slot + 1, end]) if r[0] < r[1]]
    switched["shards"]["s1"]["slots"] = [[slot, slot + 1], *switched["shards"]["s1"]["slots"]]
    switched["moving"][0]["write_mode"] = "dual_new_primary"
    return Topology(config_from_dict(frozen)), Topology(config_from_dict(switched))


def test_rv10_an_orm_flush_during_the_switch_fails_instead_of_being_held(
    make_cluster: MakeReviewCluster,
) -> None:
    """The switch holds writes (docs/RESHARDING.md: "every router holds (does not fail)
    writes to S"): router.execute, a connection() or session() block, a transaction's first
    statement all wait for the new version and run there. The ORM's RoutedSession does not:
    a unit of work whose very first statement (nothing ran, nothing pinned before it) is the
    flush of a new object in a frozen range fails at once with SwitchHoldError, so a web
    request saving one object fails during every switch. Expected: held like a transaction's
    first statement, then written on the new owner."""
    from shardrouter.orm.session import routed_sessionmaker

    c = make_cluster("orm")
    doc = c.current()
    router = Router(Topology(config_from_dict(doc)))
    try:
        user = users_in(router.topology, 0, 512, 1, start=500)[0]
        frozen, switched = _frozen_and_switched(doc, int(router.topology.slot_for("users", user)))
        router._install(frozen)
        switcher = threading.Timer(0.3, lambda: router._install(switched))
        switcher.start()
        error: BaseException | None = None
        t0 = time.monotonic()
        try:
            with routed_sessionmaker(router)() as session:
                session.add(User(user_id=user, email=f"orm{user}@example.com", name="orm"))
                session.commit()
        except Exception as exc:
            error = exc
        took = time.monotonic() - t0
        switcher.join()
    finally:
        router.close()
    on_s1 = c.rows("s1", f"SELECT user_id FROM users WHERE user_id = {int(user)}")
    on_s0 = c.rows("s0", f"SELECT user_id FROM users WHERE user_id = {int(user)}")
    emails = [
        r
        for shard in ("s0", "s1")
        for r in c.rows(shard, f"SELECT email FROM user_emails WHERE user_id = {int(user)}")
    ]
    assert len(emails) == len(on_s0 + on_s1), f"lookup rows {emails}, users {on_s0 + on_s1}"
    assert error is None, f"after {took:.2f} s: {type(error).__name__}: {error}"
    assert (on_s1, on_s0) == ([(user,)], [])


def _accounts_cluster(
    make_cluster: MakeReviewCluster, tag: str, ddl: str
) -> tuple[ReviewCluster, list[int]]:
    tables = {"rv10_accounts": {"column": "account_id", "strategy": "hash"}}
    c = make_cluster(tag, tables, (ddl,))
    topology = c.topology()
    accounts = values_in(topology, "rv10_accounts", 0, 128, 20, range(1, 10**6))
    router = c.router()
    try:
        for i, a in enumerate(accounts):
            router.execute(
                "INSERT INTO rv10_accounts (id, account_id, v) VALUES (:i, :a, 1)",
                {"i": i + 1, "a": a},
            )
    finally:
        router.close()
    c.move((0, 128), "s2", f"m-{tag}")
    return c, accounts


def _readable(c: ReviewCluster, accounts: list[int]) -> list[int]:
    router = c.router()
    try:
        return [
            a
            for a in accounts
            if router.execute("SELECT v FROM rv10_accounts WHERE account_id = :a", {"a": a}).rows
        ]
    finally:
        router.close()


def test_rv10_a_decimal_sharding_column_is_not_copied_and_its_rows_vanish_at_the_switch(
    make_cluster: MakeReviewCluster,
) -> None:
    """Ids kept in DECIMAL(20,0) / NUMERIC columns (schemas ported from other databases) route
    fine: the router hashes the integer the service passes. The movers read the column back
    from MariaDB, where the driver gives Decimal('123'): KeyRule.slot refuses it (not an int:
    KeyValueError, a RoutingError) and BelongsCache turns every RoutingError into "does not
    move". So count says 0 rows, the backfill copies none, verify compares 0 with 0 and says
    equal, and after the switch every row not written during the migration is gone for reads
    by key (the journal's JSON gives ints, so only rows changed meanwhile reach the target);
    finalize would leave the rest on the source for good. Expected: the rows copied (the value
    is the integer it routes as), or the table refused before the switch."""
    c, accounts = _accounts_cluster(
        make_cluster,
        "dec",
        "CREATE TABLE rv10_accounts (id BIGINT NOT NULL PRIMARY KEY,"
        " account_id DECIMAL(20,0) NOT NULL, v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    refused: ReshardError | None = None
    try:
        c.run("m-dec", "start", "copy", "verify", "switch")
    except ReshardError as exc:
        refused = exc
    if refused is not None:  # a refusal before the switch is fine: nothing moved
        assert c.topology().shard_for("rv10_accounts", accounts[0]) == "s0", refused
        return
    found = _readable(c, accounts)
    on_target = c.rows("s2", "SELECT COUNT(*) FROM rv10_accounts")[0][0]
    assert len(found) == len(accounts), (
        f"{len(found)} of {len(accounts)} moved accounts readable after the switch;"
        f" the target holds {on_target} rows"
    )


@pytest.mark.parametrize(
    "columns",
    [
        "id DECIMAL(12,2) NOT NULL PRIMARY KEY, account_id BIGINT NOT NULL",
        "id BIGINT NOT NULL, account_id BIGINT NOT NULL,"
        " at DATETIME(3) NOT NULL DEFAULT '2026-01-01 00:00:00', PRIMARY KEY (account_id, at)",
    ],
    ids=["decimal", "datetime"],
)
def test_rv10_a_decimal_or_datetime_primary_key_stops_the_copy_with_an_internal_error(
    make_cluster: MakeReviewCluster, columns: str
) -> None:
    """A table whose primary key has a DECIMAL or a DATETIME column (DATETIME is what the
    refusal of TIMESTAMP keys tells the user to use) passes plan and start; the copy then
    fails at its first chunk when it stores the chunk's last key as its checkpoint
    (state._json: plain json.dumps): "backfill:s0:s2:rv10_accounts: the value is not JSON-able
    (Object of type Decimal is not JSON serializable)" (datetime likewise). Every resume fails
    the same way: the migration can only be rolled back. Expected: copied (the journal names
    such keys exactly), or refused at start, naming the column, before anything is
    installed."""
    c, accounts = _accounts_cluster(
        make_cluster,
        "deckey",
        f"CREATE TABLE rv10_accounts ({columns}, v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    with Workflow(c.store, "m-deckey") as flow:
        flow.act("start")
        try:
            flow.act("copy")
        except ReshardError as exc:
            pytest.fail(f"copy failed: {type(exc).__name__}: {exc}")
        for action in ("verify", "switch"):
            flow.act(action)
    assert _readable(c, accounts) == accounts


# --------------------------------------------------------------------------- guards of the fixes


def test_rv10_fix_writes_through_the_lookup_route_leave_the_copies_alone(
    make_cluster: MakeReviewCluster,
) -> None:
    """Finding 1's fix (Target.only) restricts writes on a mirrored shard too: after the
    switch, an UPDATE and a DELETE by merchant_id change the owners' rows only, never the
    source's copies (which a rollback after the switch relies on: the reverse drain only
    repairs keys journaled on the target); a merchant with no order counts 0 even on a
    mirrored shard; a statement naming the table twice cannot be restricted and is refused
    typed on a mirrored shard (it runs as before elsewhere)."""
    c = make_cluster("merchw")
    c.move((0, 128), "s2", "m-w")
    topology = c.topology()
    mover_user, stayer = _same_split_users(topology, (0, 128), (128, 512))
    merchant = 5150
    router = c.router()
    try:
        add_users(router, [mover_user, stayer])
        moved = _add_order(router, topology, mover_user, merchant, 1)
        kept = _add_order(router, topology, stayer, merchant, 2)
    finally:
        router.close()
    c.run("m-w", "start", "copy", "verify", "switch")
    split = topology.slot_for("orders", mover_user) % 4
    copy_sql = f"SELECT order_id, status FROM orders_{split:04d} WHERE order_id = {moved}"
    assert c.rows("s0", copy_sql) == [(moved, "new")]  # the source's copy, for a rollback
    router = c.router()
    try:
        changed = router.execute(
            "UPDATE orders SET status = 'shipped' WHERE merchant_id = :m", {"m": merchant}
        ).rowcount
        assert changed == 2
        assert c.rows("s0", copy_sql) == [(moved, "new")], "the UPDATE changed the copy"
        none = router.execute(
            "SELECT COUNT(*) FROM orders WHERE merchant_id = :m", {"m": 999_999}
        ).rows
        assert [tuple(r) for r in none] == [(0,)]
        with pytest.raises(UnsupportedQueryError, match="named 2 times"):
            router.execute(
                "SELECT a.order_id FROM orders a JOIN orders b ON b.user_id = a.user_id"
                " WHERE a.merchant_id = :m",
                {"m": merchant},
            )
        gone = router.execute("DELETE FROM orders WHERE merchant_id = :m", {"m": merchant})
        assert gone.rowcount == 2
        assert c.rows("s0", copy_sql) == [(moved, "new")], "the DELETE changed the copy"
    finally:
        router.close()
    c.run("m-w", "rollback")  # the reverse mirror brings the deletes back to s0
    router = c.router()
    try:
        left = router.execute(
            "SELECT order_id FROM orders WHERE order_id IN (:a, :b)", {"a": moved, "b": kept}
        ).rows
    finally:
        router.close()
    assert left == [], left
