"""Migrations of tables whose sharding or primary-key columns are not plain BIGINT/VARCHAR
(review 10, findings on column types), on real MariaDB (the session sandbox):

- a sharding column whose stored values read back in another type than the routers route
  (DECIMAL / VARCHAR holding integers, a DATETIME under a date key) moves every row, as the
  routers place them (``spec.routed_value``);
- a stored value no router routes refuses the copy and verify, typed, naming table, column
  and key, before the switch; fixing the row lets the migration go on;
- the zero date has no slot (as NULL): it stays on the source through every step, and its
  journal entries never stop a drain;
- DECIMAL / DATETIME / DATE primary keys checkpoint exactly: a paused copy resumes after its
  last chunk and copies every row once.

Clusters come from reshard_cluster.review_clusters (databases kt_<tag>_...): fresh databases
per test, a meta store, a 2-shard "before" version (s0 [0, 512), s1 [512, 1024)), s2 and s3
defined for plans.
"""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable, Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import (
    MakeReviewCluster,
    ReviewCluster,
    review_clusters,
    values_in,
)

import shardrouter.reshard.copy as mover
from shardrouter.errors import ReshardDataError
from shardrouter.reshard import journal, state
from shardrouter.reshard.spec import UnroutableValue, key_from_json
from shardrouter.reshard.workflow import Options, Workflow

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


@pytest.fixture
def make_cluster(shard_databases: Path, sandbox: Any) -> Iterator[MakeReviewCluster]:
    with review_clusters(shard_databases, sandbox, "kt") as make:
        yield make


ACCOUNTS = {"kt_accounts": {"column": "account_id", "strategy": "hash"}}


def _accounts(c: ReviewCluster, n: int = 15) -> tuple[list[int], list[int]]:
    """Accounts inserted through the router: (moving: slots [0, 128), staying: [128, 512))."""
    topology = c.topology()
    moving = values_in(topology, "kt_accounts", 0, 128, n, range(1, 10**5))
    staying = values_in(topology, "kt_accounts", 128, 512, n, range(1, 10**5))
    router = c.router()
    try:
        for i, a in enumerate(moving + staying):
            router.execute(
                "INSERT INTO kt_accounts (id, account_id, v) VALUES (:i, :a, 1)",
                {"i": i + 1, "a": a},
            )
    finally:
        router.close()
    return moving, staying


def _values_by_account(c: ReviewCluster, accounts: list[int]) -> dict[int, int]:
    router = c.router()
    try:
        found = {}
        for a in accounts:
            rows = router.execute("SELECT v FROM kt_accounts WHERE account_id = :a", {"a": a}).rows
            if rows:
                found[a] = int(rows[0][0])
        return found
    finally:
        router.close()


def _ids(c: ReviewCluster, shard: str) -> set[int]:
    return {int(r[0]) for r in c.rows(shard, "SELECT id FROM kt_accounts")}


@pytest.mark.parametrize(
    "column",
    ["DECIMAL(20,0)", "DECIMAL(12,2)", "NUMERIC(30,0) UNSIGNED", "VARCHAR(20)"],
    ids=["decimal", "decimal-scale", "numeric", "varchar-digits"],
)
def test_a_sharding_column_read_back_in_another_type_moves_every_row(
    make_cluster: MakeReviewCluster, column: str
) -> None:
    """The router hashes the integer the service passes; the column hands it back as a
    Decimal or as text (and the journal's JSON as a number or text). Every moving row is
    copied, changes made during the migration reach the target, verify compares them all,
    every account is readable after the switch, and finalize removes exactly the moved rows
    from the source."""
    c = make_cluster(
        "conv",
        ACCOUNTS,
        f"CREATE TABLE kt_accounts (id BIGINT NOT NULL PRIMARY KEY, account_id {column} NOT NULL,"
        " v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    moving, staying = _accounts(c)
    c.move((0, 128), "s2", "m-conv")
    c.run("m-conv", "start", "copy")
    assert _ids(c, "s2") == set(range(1, len(moving) + 1)), "the backfill copied the movers"
    topology = c.topology()
    late = values_in(topology, "kt_accounts", 0, 128, 1, range(10**5, 2 * 10**5))[0]
    router = c.router()
    try:  # journaled changes: an update, an insert, a delete of moving rows
        router.execute("UPDATE kt_accounts SET v = 2 WHERE account_id = :a", {"a": moving[0]})
        router.execute(
            "INSERT INTO kt_accounts (id, account_id, v) VALUES (1000, :a, 3)", {"a": late}
        )
        router.execute("DELETE FROM kt_accounts WHERE account_id = :a", {"a": moving[1]})
    finally:
        router.close()
    with Workflow(c.store, "m-conv") as flow:
        flow.act("verify")
        tables = state.get_checkpoint(c.store, "m-conv", "verify")["tables"]
        mine = [t for t in tables if "kt_accounts" in str(t)]
        assert mine and all(t["equal"] for t in mine), mine
        flow.act("switch")
    expected = {a: 1 for a in moving + staying if a != moving[1]}
    expected.update({moving[0]: 2, late: 3})
    assert _values_by_account(c, [*moving, *staying, late]) == expected
    c.run("m-conv", "finalize")
    moved_ids = {*range(3, len(moving) + 1), 1, 1000}
    assert _ids(c, "s2") == moved_ids
    assert _ids(c, "s0") == set(range(len(moving) + 1, len(moving) + len(staying) + 1))
    assert _values_by_account(c, [*moving, *staying, late]) == expected


def _decimal_accounts(make_cluster: MakeReviewCluster, tag: str) -> ReviewCluster:
    return make_cluster(
        tag,
        ACCOUNTS,
        "CREATE TABLE kt_accounts (id BIGINT NOT NULL PRIMARY KEY,"
        " account_id DECIMAL(12,2) NOT NULL, v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )


def test_a_value_no_router_routes_refuses_the_copy_naming_the_row_until_it_is_fixed(
    make_cluster: MakeReviewCluster,
) -> None:
    """A fraction in an integer-keyed DECIMAL column (written around the router) has no slot
    the routers would give it: the copy stops, typed, naming the table, the column and the
    row's key, before anything is switched; once the row is corrected, resume copies it
    where the routers look for it."""
    c = _decimal_accounts(make_cluster, "refuse")
    moving, _ = _accounts(c)
    c.raw("s0", "INSERT INTO kt_accounts VALUES (500, 5.50, 9)")
    c.move((0, 128), "s2", "m-r")
    with pytest.raises(UnroutableValue) as refused:
        c.run("m-r", "start", "copy")
    message = str(refused.value)
    assert "kt_accounts" in message and "account_id" in message and "id=500" in message
    assert "Decimal('5.50')" in message and "resume" in message
    assert refused.value.key == (500,)
    assert state.get(c.store, "m-r").phase == "copying"
    assert c.topology().shard_for("kt_accounts", moving[0]) == "s0"  # nothing switched
    fixed = values_in(c.topology(), "kt_accounts", 0, 128, 1, range(10**5, 2 * 10**5))[0]
    c.raw("s0", f"UPDATE kt_accounts SET account_id = {fixed} WHERE id = 500")
    with Workflow(c.store, "m-r") as flow:
        flow.resume()
        flow.act("verify")
        flow.act("switch")
    assert _values_by_account(c, [fixed]) == {fixed: 9}
    assert 500 in _ids(c, "s2")


def test_a_value_no_router_routes_written_during_the_copy_refuses_verify(
    make_cluster: MakeReviewCluster,
) -> None:
    """The same value written after the backfill passed: its journal entry is discarded by
    the drain (never stopping it), and verify, which walks the source, refuses it; fixed,
    verify passes and the row moves."""
    c = _decimal_accounts(make_cluster, "refuse2")
    moving, _ = _accounts(c)
    c.move((0, 128), "s2", "m-r2")
    c.run("m-r2", "start", "copy")
    c.raw("s0", "INSERT INTO kt_accounts VALUES (501, 0.5, 9)")
    with Workflow(c.store, "m-r2") as flow:
        with pytest.raises(UnroutableValue, match=r"id=501"):
            flow.act("verify")
        assert journal.backlog(c.engine("s0")) == 0  # the drain ran through the entry
        fixed = moving[2]
        c.raw("s0", f"UPDATE kt_accounts SET account_id = {fixed} WHERE id = 501")
        flow.act("verify")
        flow.act("switch")
    assert sorted(r[0] for r in c.rows("s2", "SELECT id FROM kt_accounts WHERE id = 501")) == [501]
    router = c.router()
    try:
        rows = router.execute(
            "SELECT id FROM kt_accounts WHERE account_id = :a ORDER BY id", {"a": fixed}
        ).rows
    finally:
        router.close()
    assert [r[0] for r in rows] == [3, 501]


@pytest.mark.parametrize(
    ("column", "zero"),
    [("DATE", "0000-00-00"), ("DATETIME(3)", "0000-00-00 00:00:00.000")],
    ids=["date", "datetime"],
)
def test_zero_dates_have_no_slot_and_stay_on_the_source_through_every_step(
    make_cluster: MakeReviewCluster, column: str, zero: str
) -> None:
    """Rows whose date sharding column holds the zero date are not copied, their journal
    entries (an update before and during the copy, an insert during it) are discarded by
    every drain, verify passes over them, the switch goes through, and finalize does not
    delete them: they stay on the source (scatter reads find them there), nothing of them
    on the target."""
    tables = {"kt_days": {"column": "day", "type": "date", "strategy": "hash"}}
    c = make_cluster(
        "zero" + column[:4].lower(),
        tables,
        f"CREATE TABLE kt_days (id INT NOT NULL PRIMARY KEY, day {column} NOT NULL,"
        " v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    topology = c.topology()
    days = [dt.date(2025, 1, 1) + dt.timedelta(days=i) for i in range(400)]
    moving = values_in(topology, "kt_days", 0, 128, 10, days)
    router = c.router()
    try:
        for i, d in enumerate(moving):
            router.execute("INSERT INTO kt_days (id, day, v) VALUES (:i, :d, 0)", {"i": i, "d": d})
    finally:
        router.close()
    c.raw("s0", f"INSERT INTO kt_days VALUES (1000, '{zero}', 0)")
    c.move((0, 128), "s2", "m-zero")
    c.run("m-zero", "start")
    c.raw("s0", "UPDATE kt_days SET v = 1 WHERE id = 1000")  # journaled before the copy
    c.run("m-zero", "copy")
    c.raw(
        "s0",
        "UPDATE kt_days SET v = 2 WHERE id = 1000",
        f"INSERT INTO kt_days VALUES (1001, '{zero}', 0)",
    )
    router = c.router()
    try:
        router.execute("UPDATE kt_days SET v = 7 WHERE day = :d", {"d": moving[0]})
    finally:
        router.close()
    c.run("m-zero", "verify", "switch")
    assert journal.backlog(c.engine("s0")) == 0
    c.run("m-zero", "finalize")
    assert sorted(r[0] for r in c.rows("s0", "SELECT id FROM kt_days")) == [1000, 1001]
    assert sorted(r[0] for r in c.rows("s2", "SELECT id FROM kt_days")) == list(range(10))
    router = c.router()
    try:
        got = router.execute("SELECT v FROM kt_days WHERE day = :d", {"d": moving[0]}).rows
    finally:
        router.close()
    assert [tuple(r) for r in got] == [(7,)]


def test_a_date_with_a_zero_month_refuses_the_copy(make_cluster: MakeReviewCluster) -> None:
    """'2025-00-10' (kept by a lenient sql_mode) is not the zero date: no router routes it
    and it is not MariaDB's NULL-like placeholder either; the copy refuses it, typed."""
    tables = {"kt_days": {"column": "day", "type": "date", "strategy": "hash"}}
    c = make_cluster(
        "zmonth",
        tables,
        "CREATE TABLE kt_days (id INT NOT NULL PRIMARY KEY, day DATE NOT NULL,"
        " v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    c.raw("s0", "INSERT INTO kt_days VALUES (7, '2025-00-10', 0)")
    c.move((0, 128), "s2", "m-zm")
    with pytest.raises(ReshardDataError, match=r"kt_days.*id=7.*'2025-00-10'.*sharding column day"):
        c.run("m-zm", "start", "copy")
    assert c.rows("s2", "SELECT COUNT(*) FROM kt_days") == [(0,)]


@pytest.mark.parametrize(
    ("key", "value_of"),
    [
        ("id DECIMAL(12,2) NOT NULL PRIMARY KEY", lambda i: Decimal(f"{i}.25")),
        (
            "id DATETIME(3) NOT NULL, PRIMARY KEY (id, account_id)",
            lambda i: dt.datetime(2026, 1, 1) + dt.timedelta(seconds=i, milliseconds=i),
        ),
        ("id DATE NOT NULL PRIMARY KEY", lambda i: dt.date(2020, 1, 1) + dt.timedelta(days=i)),
    ],
    ids=["decimal", "datetime", "date"],
)
def test_a_paused_copy_resumes_after_its_typed_checkpoint_and_copies_every_row_once(
    make_cluster: MakeReviewCluster,
    monkeypatch: pytest.MonkeyPatch,
    key: str,
    value_of: Callable[[int], Any],
) -> None:
    """A copy in chunks of 3 rows, paused after its third chunk: the checkpoint holds the
    third chunk's last key in typed JSON; the resumed copy starts right after exactly that
    key (the same Decimal / datetime / date), reads each remaining row once, and the copied
    count ends equal to the moving rows."""
    c = make_cluster(
        "ckpt",
        ACCOUNTS,
        f"CREATE TABLE kt_accounts ({key}, account_id BIGINT NOT NULL, v INT NOT NULL)"
        " DEFAULT CHARSET=utf8mb4",
    )
    topology = c.topology()
    moving = values_in(topology, "kt_accounts", 0, 128, 12, range(1, 10**5))
    staying = values_in(topology, "kt_accounts", 128, 512, 12, range(1, 10**5))
    rows = list(enumerate(moving + staying))
    router = c.router()
    try:
        for i, a in rows:
            router.execute(
                "INSERT INTO kt_accounts (id, account_id, v) VALUES (:i, :a, 1)",
                {"i": value_of(i), "a": a},
            )
    finally:
        router.close()
    c.move((0, 128), "s2", "m-ck")
    halt = threading.Event()
    calls: list[dict[str, Any]] = []
    original = mover.backfill

    def backfill(*args: Any, **kwargs: Any) -> mover.BackfillReport:
        if args[2].physical != "kt_accounts":
            return original(*args, **kwargs)
        chunks: list[mover.ChunkDone] = []
        outer = kwargs["on_chunk"]

        def on_chunk(done: mover.ChunkDone) -> None:
            chunks.append(done)
            outer(done)
            if len(chunks) == 3 and not calls:
                halt.set()

        report = original(*args, **{**kwargs, "on_chunk": on_chunk})
        calls.append({"after": kwargs["after"], "chunks": chunks, "report": report})
        return report

    monkeypatch.setattr(mover, "backfill", backfill)
    with Workflow(c.store, "m-ck", Options(chunk=3), stop=halt.is_set) as flow:
        flow.act("start")
        flow.act("copy")  # paused after the third chunk
    point = state.get_checkpoint(c.store, "m-ck", "backfill:s0:s2:kt_accounts")
    assert point["done"] is False
    first = calls[0]
    assert first["report"].done is False and len(first["chunks"]) == 3
    stored = key_from_json(point["last_key"])
    assert stored == first["chunks"][-1].last_key
    assert [type(v) for v in stored] == [type(v) for v in first["chunks"][-1].last_key]
    with Workflow(c.store, "m-ck", Options(chunk=3)) as flow:
        flow.resume()
        second = calls[1]
        assert second["after"] == stored  # continued right after the checkpoint
        assert [type(v) for v in second["after"]] == [type(v) for v in stored]
        assert second["report"].done is True
        read = first["report"].rows_read + second["report"].rows_read
        assert read == len(rows)  # every row of the source read once
        point = state.get_checkpoint(c.store, "m-ck", "backfill:s0:s2:kt_accounts")
        assert point["done"] is True and point["copied"] == len(moving)
        flow.act("verify")
        flow.act("switch")
    assert c.rows("s2", "SELECT COUNT(*) FROM kt_accounts") == [(len(moving),)]
    router = c.router()
    try:
        found = [
            a
            for a in moving + staying
            if router.execute("SELECT v FROM kt_accounts WHERE account_id = :a", {"a": a}).rows
        ]
    finally:
        router.close()
    assert found == moving + staying
