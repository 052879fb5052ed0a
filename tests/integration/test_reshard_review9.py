"""Review 9 of online resharding (issue 9): reproductions of wrong answers, lost writes and
stuck switches, each on real MariaDB (the session sandbox). Every test here states what the
protocol of docs/RESHARDING.md promises and fails while the package breaks it.

Clusters come from reshard_cluster.review_clusters (databases rv9_<tag>_...): fresh databases
per test on the sandbox's servers, a meta store, the orders schema, a 2-shard "before" version
(s0 owns [0, 512), s1 [512, 1024)); s2 and s3 are defined for plans that add them. No follower
routers are registered (acknowledgements are immediate); writes go through plain Routers built
from the store's current version, or straight to a shard where the point is a trigger or a
lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from reshard_cluster import (
    MakeReviewCluster,
    ReviewCluster,
    add_users,
    review_clusters,
    users_in,
)
from sqlalchemy import Engine, create_engine, text

import shardrouter.reshard.copy as mover
from shardrouter.control.versions import push_file
from shardrouter.engine import xa
from shardrouter.errors import (
    ReshardDataError,
    ReshardError,
    ReshardStateError,
    TopologyChangeError,
    UnsupportedQueryError,
)
from shardrouter.reshard import journal, state
from shardrouter.reshard.journal import install, remove
from shardrouter.reshard.spec import describe_table
from shardrouter.reshard.workflow import Options, Workflow
from shardrouter.types import ShardId

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


# --------------------------------------------------------------------------- the cluster


@pytest.fixture
def make_cluster(shard_databases: Path, sandbox: Any) -> Iterator[MakeReviewCluster]:
    with review_clusters(shard_databases, sandbox, "rv9") as make:
        yield make


def _name(cluster: ReviewCluster, user: int) -> Any:
    router = cluster.router()
    try:
        rows = router.execute("SELECT name FROM users WHERE user_id = :u", {"u": user}).rows
    finally:
        router.close()
    return rows[0][0] if rows else None


# --------------------------------------------------------------------------- findings


def test_rv9_a_second_migration_sharing_a_shard_is_refused_and_the_first_keeps_its_writes(
    make_cluster: MakeReviewCluster,
) -> None:
    """Finding 1: two migrations from one source shared its one journal: B's drain discarded
    A's entries (a write after A's verify was lost at A's switch) and B's cancel dropped A's
    triggers. Now a migration whose shards take part in an active one is refused, and A's
    write made after its verify reaches its target."""
    c = make_cluster("conc")
    c.move((0, 128), "s2", "m-a")
    topology = c.topology()
    mine = users_in(topology, 0, 128, 4)
    router = c.router()
    try:
        add_users(router, mine)
    finally:
        router.close()
    with Workflow(c.store, "m-a") as flow:
        for action in ("start", "copy", "verify"):
            flow.act(action)
    with pytest.raises(ReshardStateError, match=r"shard\(s\) s0 take part in migration m-a"):
        c.move((128, 256), "s3", "m-b")  # other slots, same source: refused
    router = c.router()
    try:
        router.execute("UPDATE users SET name = 'after-verify' WHERE user_id = :u", {"u": mine[0]})
    finally:
        router.close()
    with Workflow(c.store, "m-a") as flow:
        flow.act("switch")
    assert c.topology().shard_for("users", mine[0]) == "s2"
    assert _name(c, mine[0]) == "after-verify"
    assert any("users" in t for t in journal.installed_triggers(c.engine("s0")))


def test_rv9_an_xa_branch_committed_by_recovery_after_the_switch_is_lost(
    make_cluster: MakeReviewCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """xa.commit reports success once the decision row is durable, even when a branch's XA
    COMMIT failed (recover_xa() finishes it later). The router then releases its snapshot, so
    the switch's acknowledgement does not wait for that branch; the branch's row and journal
    entry are invisible to the switch's drain (prepared, not committed). recover_xa() then
    commits it on the source, now a mirror whose journal nobody drains: the write the client
    was told is committed never reaches the new owner."""
    c = make_cluster("xa")
    c.move((0, 128), "s2", "m-x")
    topology = c.topology()
    moving = users_in(topology, 0, 128, 1)[0]
    other = users_in(topology, 512, 1024, 1)[0]
    router = c.router()
    try:
        add_users(router, [moving, other])
    finally:
        router.close()
    with Workflow(c.store, "m-x") as flow:
        for action in ("start", "copy", "verify"):
            flow.act(action)

    original_commit, original_record = xa.commit, xa.record_decision

    def commit(branches: Any, gtrid: str, decider: Engine) -> None:
        # The s0 branch's connection drops right after the decision (a network blip): its
        # XA COMMIT fails, the branch stays prepared on the server (MariaDB >= 10.5 keeps it).
        victim = branches[ShardId("s0")].connection.driver_connection.thread_id()

        def record(engine: Engine, g: str, outcome: str = "commit") -> None:
            original_record(engine, g, outcome)
            with c.engine("s0").connect() as conn:
                conn.exec_driver_sql(f"KILL CONNECTION {int(victim)}")

        monkeypatch.setattr(xa, "record_decision", record)
        try:
            original_commit(branches, gtrid, decider)
        finally:
            monkeypatch.setattr(xa, "record_decision", original_record)

    monkeypatch.setattr(xa, "commit", commit)
    router = c.router(xa=True)
    try:  # returns normally: the caller is told the transaction committed
        with router.transaction() as txn:  # decider: s1 (first branch)
            txn.execute("UPDATE users SET name = 'xa' WHERE user_id = :u", {"u": other})
            txn.execute("UPDATE users SET name = 'xa' WHERE user_id = :u", {"u": moving})
    finally:
        router.close()
    monkeypatch.setattr(xa, "commit", original_commit)
    with Workflow(c.store, "m-x") as flow:  # fixed: the switch waits for no prepared branch
        with pytest.raises(ReshardStateError, match=r"XA branch\(es\) are prepared on s0"):
            flow.act("switch")
        assert flow.migration.phase == "verified"
        assert flow.current_stage() == "copy"  # abandoned: writes go on to the source
        router = c.router()
        try:
            report = router.recover_xa(min_age_s=0)
        finally:
            router.close()
        assert report.committed, report  # the in-doubt branch was committed, on s0
        flow.act("switch")  # now it goes through, and the drain carries the branch's row
    assert _name(c, other) == "xa"
    assert _name(c, moving) == "xa", "a committed XA write to the moving slots is lost"


def test_rv9_a_timestamp_key_journaled_in_a_non_utc_session_names_another_row(
    shard_databases: Path,
) -> None:
    """The trigger writes the key with JSON_ARRAY(NEW.ts), i.e. as text in the *writer's*
    session time zone; the drain binds that text in its UTC session (mover_session), so it
    looks up another instant: the changed row is never copied (and a deleted one never
    deleted). A table whose primary key has a TIMESTAMP column loses every change made by
    a client whose session zone is not UTC (e.g. a server running in its SYSTEM zone)."""
    raw = yaml.safe_load(shard_databases.read_text())
    raw.pop("meta", None)
    raw["tables"] = {"rv9_events": {"column": "user_id", "strategy": "hash"}}
    a = create_engine(raw["shards"]["s0"]["primary"])
    b = create_engine(raw["shards"]["s1"]["primary"])
    ddl = (
        "CREATE TABLE rv9_events (user_id BIGINT NOT NULL, at TIMESTAMP(6) NOT NULL,"
        " payload VARCHAR(32) NOT NULL, PRIMARY KEY (user_id, at))"
    )
    for engine in (a, b):
        with engine.begin() as conn:
            conn.exec_driver_sql("DROP TABLE IF EXISTS rv9_events")
            conn.exec_driver_sql(ddl)
    spec = None
    try:
        with a.begin() as conn:
            conn.exec_driver_sql("SET time_zone = '+00:00'")
            conn.exec_driver_sql(
                "INSERT INTO rv9_events VALUES (1, '2024-06-01 12:00:00', 'old'),"
                " (2, '2024-06-01 12:00:00', 'old'), (3, '2024-06-01 12:00:00', 'old')"
            )
        with a.connect() as conn:
            spec = describe_table(conn, "rv9_events", logical="rv9_events", shard_column="user_id")
        # Fixed: such a table is refused before anything is installed (a TIMESTAMP prints in
        # each writer's zone; DATETIME does not), naming the column and the way out.
        with pytest.raises(ReshardDataError, match=r"rv9_events\.at is timestamp.*DATETIME"):
            install(a, [spec])
        assert journal.installed_triggers(a) == []
    finally:
        if spec is not None:
            remove(a, [spec], drop_table=False)
        for engine in (a, b):
            with engine.begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS rv9_events")
            engine.dispose()


def test_rv9_an_error_in_the_switch_leaves_the_slots_frozen_past_the_budget(
    make_cluster: MakeReviewCluster,
) -> None:
    """The switch's budget (freeze_timeout_s) is checked between drain batches only, and an
    error inside the switch (here: the target's row held by another session, so the drain's
    upsert times out five times) propagates without pushing the unfrozen version back: the
    frozen version stays current, so every write to the moving slots is held and fails
    (SwitchHoldError) until an operator runs resume. Expected: abandoned within the budget,
    writes going on to the source."""
    c = make_cluster("stuck", pool={"lock_wait_timeout_s": 1})
    c.move((0, 128), "s2", "m-s")
    topology = c.topology()
    user = users_in(topology, 0, 128, 1)[0]
    router = c.router()
    try:
        add_users(router, [user])
    finally:
        router.close()
    with Workflow(c.store, "m-s", Options(freeze_timeout_s=0.5)) as flow:
        for action in ("start", "copy", "verify"):
            flow.act(action)
        router = c.router()
        try:  # journaled on s0: the switch must copy it
            router.execute("UPDATE users SET name = 'late' WHERE user_id = :u", {"u": user})
        finally:
            router.close()
        holder = c.engine("s2").connect()
        holder.begin()
        holder.execute(text("SELECT * FROM users WHERE user_id = :u FOR UPDATE"), {"u": user})
        error: BaseException | None = None
        t0 = time.monotonic()
        try:
            flow.act("switch")
        except Exception as exc:
            error = exc
        took = time.monotonic() - t0
        holder.rollback()
        holder.close()
        stage = flow.current_stage()
    # Fixed: typed, nothing left frozen; the lock wait is bounded (the row is held from
    # before the switch, so the drain ahead of the freeze meets it: 5 tries of 1 s).
    found = (stage, isinstance(error, ReshardStateError), took < 8.0)
    assert found == ("copy", True, True), (
        f"after the switch failed ({type(error).__name__}, {took:.1f} s with a 0.5 s budget)"
        f" the current version is {stage}"
    )


def test_rv9_after_a_rollback_reads_across_shards_count_the_targets_copies(
    make_cluster: MakeReviewCluster,
) -> None:
    """A rollback before the switch pushes the version without the moving range and leaves
    the target's copy in place "until cancel deletes it". When the target is a shard that
    already serves (a --move to an existing shard), nothing refuses reads across shards any
    more (Topology.mirrored is empty without the range): they count the copies twice, for
    as long as the migration stays rolled back."""
    c = make_cluster("rollbk")
    c.move((0, 64), "s1", "m-r")
    topology = c.topology()
    users = users_in(topology, 0, 64, 5) + users_in(topology, 64, 512, 5)
    users += users_in(topology, 512, 1024, 5)
    router = c.router()
    try:
        add_users(router, users)
    finally:
        router.close()
    with Workflow(c.store, "m-r") as flow:
        for action in ("start", "copy", "verify", "rollback"):
            flow.act(action)
        assert flow.migration.phase == "rolled_back"
    router = c.router()
    try:
        counted = router.execute("SELECT COUNT(*) FROM users").rows[0][0]
        emails = router.execute("SELECT COUNT(*) FROM user_emails").rows[0][0]
    finally:
        router.close()
    assert (counted, emails) == (15, 15), f"users {counted}, user_emails {emails}"


def test_rv9_during_finalize_reads_across_shards_count_the_sources_copies(
    make_cluster: MakeReviewCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finalize pushes the version without the range first, then deletes the moved rows from
    the source in throttled chunks: for the whole deletion (long on a big table) the source
    serves its other slots and still holds the moved rows, and nothing refuses a read across
    shards: it counts them twice. (Cancel has the same window on an existing target.)"""
    c = make_cluster("final")
    c.move((0, 64), "s2", "m-f")
    topology = c.topology()
    users = users_in(topology, 0, 64, 5) + users_in(topology, 64, 1024, 10)
    router = c.router()
    try:
        add_users(router, users)
    finally:
        router.close()
    seen: list[int] = []
    original = mover.delete_moved

    def delete_moved(*args: Any, **kwargs: Any) -> int:
        if not seen:  # what a service reads while the deletion runs
            router = c.router()
            try:
                seen.append(router.execute("SELECT COUNT(*) FROM users").rows[0][0])
            except UnsupportedQueryError as exc:  # fixed: refused, never counted twice
                seen.append(str(exc))
            finally:
                router.close()
        return original(*args, **kwargs)

    monkeypatch.setattr(mover, "delete_moved", delete_moved)
    with Workflow(c.store, "m-f") as flow:
        for action in ("start", "copy", "verify", "switch", "finalize"):
            flow.act(action)
    assert len(seen) == 1 and "count them twice" in str(seen[0]), seen
    router = c.router()
    try:
        assert router.execute("SELECT COUNT(*) FROM users").rows == [(15,)]
    finally:
        router.close()


def test_rv9_one_runner_even_when_its_store_connection_drops(
    make_cluster: MakeReviewCluster,
) -> None:
    """Finding 7: the one-runner guarantee was a GET_LOCK on one pooled connection; a dropped
    connection let a second runner in beside the first. Now it is a lease in the meta store
    (renewed by the runner, by the store's clock): the store's connections going away does
    not decide anything: a second runner is refused while the first holds the lease, and a
    runner whose lease was taken stops at its next chunk, typed."""
    c = make_cluster("lock")
    c.move((0, 128), "s2", "m-l")
    router = c.router()
    try:
        add_users(router, users_in(c.topology(), 0, 128, 60))
    finally:
        router.close()
    halt = threading.Event()
    errors: list[BaseException] = []
    first = Workflow(c.store, "m-l", Options(chunk=5, max_rows_per_s=20), stop=halt.is_set)
    first.act("start")

    def run() -> None:
        try:
            first.act("copy")
        except BaseException as exc:
            errors.append(exc)

    runner = threading.Thread(target=run, daemon=True)
    runner.start()
    second_error: BaseException | None = None
    try:
        deadline = time.monotonic() + 20
        while first.migration.phase != "copying" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert first.migration.phase == "copying"
        c.store.engine.dispose()  # its connections are gone (a blip): the lease is not
        time.sleep(0.2)
        assert runner.is_alive(), errors  # the first runner copies on
        with Workflow(c.store, "m-l", stop=lambda: True) as second:
            try:
                second.resume()
            except ReshardStateError as exc:
                second_error = exc
        assert second_error is not None and "one runner" in str(second_error)
        # The lease taken from under it (as after it expired): the first stops, typed.
        state.set_checkpoint(
            c.store, "m-l", state.RUNNER, {"holder": "another", "expires_at_ms": 2**62}
        )
        runner.join(timeout=30)
        assert not runner.is_alive()
        assert errors and isinstance(errors[0], ReshardStateError), errors
        assert "lost its lease" in str(errors[0])
    finally:
        halt.set()
        runner.join(timeout=30)
        first.close()


def test_rv9_a_rollback_after_the_switch_must_drain_everything_since_the_switch_in_the_budget(
    make_cluster: MakeReviewCluster,
) -> None:
    """Nothing drains the target's journal into the source while switched (no action does,
    and verify is not legal there), so the rollback's frozen drain must copy every write
    since the switch within freeze_timeout_s (0.5 s). A day of writes makes the documented
    way back ("nothing lost, also after the switch") fail as abandoned; each retry freezes
    writes again. The journals also grow without bound meanwhile."""
    c = make_cluster("rback")
    c.move((0, 128), "s2", "m-b")
    users = users_in(c.topology(), 0, 128, 500)
    with c.engine("s0").begin() as conn:  # straight into the source (faster than the router)
        conn.execute(
            text("INSERT INTO users (user_id, email, name) VALUES (:u, :e, 'v0')"),
            [{"u": u, "e": f"u{u}@example.com"} for u in users],
        )
    with Workflow(c.store, "m-b", Options(freeze_timeout_s=0.5)) as flow:
        for action in ("start", "copy", "verify", "switch"):
            flow.act(action)
        with c.engine("s2").begin() as conn:  # the service writes on the new owner
            for i in range(40):
                conn.exec_driver_sql("UPDATE users SET name = %s", (f"v{i + 1}",))
        backlog = journal.backlog(c.engine("s2"))
        assert backlog >= 20_000
        try:
            flow.act("rollback")
        except ReshardError as exc:
            pytest.fail(f"rollback after the switch with {backlog} journal entries: {exc}")
        assert flow.migration.phase == "verified"


def test_rv9_switch_reads_is_no_longer_offered(make_cluster: MakeReviewCluster) -> None:
    """Finding 9: switch_reads was legal in verified with nothing behind it (untyped
    AttributeError). Reads move with the writes at the switch; the action is gone: status
    does not offer it, and asking for it is a typed refusal."""
    c = make_cluster("reads")
    c.move((0, 64), "s2", "m-w")
    with Workflow(c.store, "m-w") as flow:
        for action in ("start", "copy", "verify"):
            flow.act(action)
        assert "switch_reads" not in flow.status()["legal"]
        with pytest.raises(ReshardStateError, match="unknown action 'switch_reads'"):
            flow.act("switch_reads")


def test_rv9_a_table_added_by_a_live_push_during_a_migration_is_not_moved(
    make_cluster: MakeReviewCluster, tmp_path: Path
) -> None:
    """A new table is a safe live change for `topology push` (control/diff.py), also while a
    migration runs, and the migration's documents keep it (built on the current version). But
    the plan fixed its tables when it was made: the new table gets no triggers, no backfill,
    no verify. Its rows of the moving slots written on the source stay there, and after the
    switch reads by key go to the target, which never got them: verify said equal, the rows
    are gone for the service (and finalize leaves them on the source for good)."""
    c = make_cluster("newtbl")
    c.move((0, 128), "s2", "m-t")
    with Workflow(c.store, "m-t") as flow:
        flow.act("start")
        flow.act("copy")
    for shard in ("s0", "s1", "s2"):
        with c.engine(shard).begin() as conn:
            conn.exec_driver_sql(
                "CREATE TABLE rv9_notes (user_id BIGINT PRIMARY KEY, body VARCHAR(32))"
            )
    doc = c.current()
    doc["tables"]["rv9_notes"] = {"column": "user_id", "strategy": "hash"}
    proposal = tmp_path / "topology.yaml"
    proposal.write_text(yaml.safe_dump(doc))
    # Fixed: a push while a migration moves slots is refused, nothing published.
    before = c.store.current_version()
    with pytest.raises(TopologyChangeError, match="migration m-t is moving slots"):
        push_file(c.store, proposal, comment="a new table")
    assert c.store.current_version() == before
