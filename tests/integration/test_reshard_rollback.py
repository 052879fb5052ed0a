"""Rollback and cancel of a resharding migration under writes (issue 9): a 2-shard cluster split
to 4 (reshard_cluster) is rolled back from every phase before finalize while a writer process
(its own Router following the meta store) writes. After the rollback the source side must equal
the oracle (the writer's ledger replayed) and own the moving slots again; cancel then leaves
no row of the moving slots on the targets and no journal trigger anywhere. A rollback after
the switch is the switch run backwards (back in verified, the source the authority): switched
again and finalized, the end state still equals the oracle.

Orphan lookup rows are checked last in every test: the journal triggers' DDL (start, and the
journals' removal in rollback, cancel, finalize) makes a concurrent DELETE's lookup cleanup
keep its lookup row (an open defect of the lookup cleanup, reproduced deterministically by
tests/integration/repro_reshard_ddl_lookups.py, run by hand); every action that runs such
DDL ends with the lookup check that removes those rows (Workflow._reconcile_lookups).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import (
    BASE_TABLES,
    Cluster,
    Writers,
    acked,
    build_cluster,
    differences,
    held_rows,
    in_ranges,
    ledgers,
    lost_rows,
    oracle_rows,
    orphans,
    outside_owner,
    owned,
    select_slots,
    start_writers,
    triggers,
)

from shardrouter.engine.router import Router
from shardrouter.ops.lookups import check_lookups
from shardrouter.reshard import state
from shardrouter.reshard.plan import ReshardPlan, plan_to
from shardrouter.reshard.workflow import Options, Workflow

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(90)]

# The switch and the switch back get a budget the loaded 2-core CI machine meets; routers
# hold writes longer than it, so an abandoned switch releases writes instead of failing them.
OPTIONS = Options(chunk=200, freeze_timeout_s=3.0, hold_s=6.0, ack_timeout_s=30.0)
PATH = {
    "prepared": ("start",),
    "copied": ("start", "copy"),
    "verified": ("start", "copy", "verify"),
    "switched": ("start", "copy", "verify", "switch"),
}


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_rb") as made:
        yield made


@pytest.fixture
def writers(cluster: Cluster, tmp_path: Path) -> Iterator[Writers]:
    """One writer process (two threads) writing from before the plan to the test's stop."""
    # paced: a few thousand rows, a copy of seconds on the loaded 2-core CI machine
    running = start_writers(cluster, tmp_path / "ledgers", 1, threads=2, pace_s=0.01)
    try:
        running.wait_ready()
        time.sleep(0.5)  # rows on the 2-shard version before anything moves
        yield running
    finally:
        running.stop()


def _plan(cluster: Cluster, migration_id: str) -> ReshardPlan:
    current = cluster.store.current()
    assert current is not None
    plan = plan_to(
        current.document, cluster.after, base_version=current.version, migration_id=migration_id
    )
    state.create(cluster.store, plan)
    return plan


def _stop(writers: Writers) -> None:
    writers.stop()
    assert not writers.errors(), writers.errors()
    assert all(p.exitcode == 0 for p in writers.processes), [p.exitcode for p in writers.processes]
    stats = writers.stats()
    assert sum(s["ops"] for s in stats) > 30, stats  # the writer really wrote meanwhile
    # budget 3 s < hold 6 s: no write was failed by a hold, and the router never lapsed
    assert sum(s["held"] for s in stats) == 0 and sum(s["fenced"] for s in stats) == 0, stats


def _expected(cluster: Cluster, oracle: Any, writers: Writers) -> dict[str, Any]:
    return oracle_rows(
        oracle.shards[0].url, acked(ledgers(writers.directory)), f"{cluster.prefix}_oracle"
    )


def _assert_source_is_authority(
    cluster: Cluster, plan: ReshardPlan, expected: dict[str, Any]
) -> None:
    """The current version routes every moving slot to its source, and the rows each shard
    owns (the moving slots on their sources included) equal the oracle."""
    current = cluster.current()
    for move in plan.moves:
        owners = {current.shard_of_slot(s) for s in range(*move.slots)}
        assert owners == {move.source}, (move, owners)
    rows, misplaced = owned(cluster, current)
    assert misplaced == []
    assert differences(rows, expected, BASE_TABLES) == []
    assert lost_rows(rows, expected) == []  # orphan lookup rows: checked last (_lookups_clean)
    moving = select_slots(rows, cluster, [m.slots for m in plan.moves])
    assert sum(sum(c.values()) for c in moving.values()) > 10, "no rows in the moving slots"


def _target_rows(cluster: Cluster, plan: ReshardPlan) -> list[Any]:
    ranges = [m.slots for m in plan.moves]
    return [h for h in held_rows(cluster, plan.targets) if in_ranges(h.slot, ranges)]


def _assert_cancelled_clean(cluster: Cluster, plan: ReshardPlan, expected: dict[str, Any]) -> None:
    assert state.get(cluster.store, plan.migration_id).phase == "cancelled"
    assert _target_rows(cluster, plan) == []
    assert triggers(cluster) == {s: [] for s in cluster.four["shards"]}
    assert outside_owner(cluster) == []
    rows, _ = owned(cluster)
    assert differences(rows, expected, BASE_TABLES) == []  # cancel deleted nothing
    assert lost_rows(rows, expected) == []
    doc = cluster.store.current()
    assert doc is not None and not doc.document.get("moving")


def _lookups_clean(cluster: Cluster, expected: dict[str, Any]) -> None:
    """No lookup row missing, and none without its owner (checked last in every test: the
    trigger DDL of start and of the journals' removal makes a concurrent DELETE's lookup
    cleanup give up and leave its lookup row, see the module's report)."""
    router = Router(cluster.current())
    try:
        reports = check_lookups(router)
    finally:
        router.close()
    assert [r.as_dict() for r in reports if r.missing] == []
    rows, _ = owned(cluster)
    assert orphans(rows, expected) == []
    assert [r.as_dict() for r in reports if r.orphans] == []


@pytest.mark.parametrize("phase", list(PATH))
def test_rollback_then_cancel(phase: str, cluster: Cluster, writers: Writers, oracle: Any) -> None:
    t0 = time.monotonic()
    timeline: list[str] = []
    plan = _plan(cluster, f"m-rb-{phase}")
    with Workflow(cluster.store, plan.migration_id, OPTIONS) as flow:
        for action in (*PATH[phase], "rollback"):
            if action == "rollback":
                assert flow.migration.phase == phase
            t = time.monotonic()
            back = flow.act(action)
            timeline.append(f"{action} {time.monotonic() - t:.1f}")
            time.sleep(0.3)  # writes in every phase
        if phase == "switched":  # the switch run backwards: verified, source the authority
            assert back.phase == "verified"
            assert flow.current_stage() == "copy"
        else:
            assert back.phase == "rolled_back"
            assert flow.current_stage() is None
        time.sleep(0.2)  # writes after the rollback
        _stop(writers)
        t = time.monotonic()
        expected = _expected(cluster, oracle, writers)
        timeline.append(f"oracle {time.monotonic() - t:.1f}")
        _assert_source_is_authority(cluster, plan, expected)
        copied = _target_rows(cluster, plan)
        if phase != "prepared":
            assert copied, "the targets held no copy to cancel"
        t = time.monotonic()
        assert flow.act("cancel").phase == "cancelled"
        timeline.append(f"cancel {time.monotonic() - t:.1f}")
    _assert_cancelled_clean(cluster, plan, expected)
    print(
        f"rollback from {phase}: {time.monotonic() - t0:.1f} s ({', '.join(timeline)}),"
        f" {len(copied)} rows cancelled"
    )
    _lookups_clean(cluster, expected)


def test_rollback_after_switch_then_switch_again_and_finalize(
    cluster: Cluster, writers: Writers, oracle: Any
) -> None:
    plan = _plan(cluster, "m-rb-again")
    with Workflow(cluster.store, plan.migration_id, OPTIONS) as flow:
        for action in PATH["switched"]:
            flow.act(action)
            time.sleep(0.3)
        assert flow.act("rollback").phase == "verified"
        time.sleep(0.5)  # writes land on the sources again
        assert flow.current_stage() == "copy"
        assert flow.act("switch").phase == "switched"
        time.sleep(0.5)  # and on the targets again
        assert flow.act("finalize").phase == "finalized"
        time.sleep(0.3)
    _stop(writers)
    expected = _expected(cluster, oracle, writers)
    final = cluster.current()
    for move in plan.moves:
        assert {final.shard_of_slot(s) for s in range(*move.slots)} == {move.target}
    rows, misplaced = owned(cluster, final)
    assert misplaced == []
    assert differences(rows, expected, BASE_TABLES) == []
    assert lost_rows(rows, expected) == []
    assert outside_owner(cluster, final) == []  # nothing of the moved slots on the sources
    assert triggers(cluster) == {s: [] for s in cluster.four["shards"]}
    _lookups_clean(cluster, expected)
    events = [e["message"] for e in state.events(cluster.store, plan.migration_id)]
    assert any("switched back" in e for e in events), events


def test_cancel_from_copied_cleans_the_targets(
    cluster: Cluster, writers: Writers, oracle: Any
) -> None:
    plan = _plan(cluster, "m-rb-cancel")
    with Workflow(cluster.store, plan.migration_id, OPTIONS) as flow:
        flow.act("start")
        flow.act("copy")
        assert flow.migration.phase == "copied"
        assert _target_rows(cluster, plan), "the copy left nothing on the targets"
        assert flow.act("cancel").phase == "cancelled"
        time.sleep(0.5)  # writes after the cancel go to the sources
    _stop(writers)
    expected = _expected(cluster, oracle, writers)
    _assert_source_is_authority(cluster, plan, expected)
    _assert_cancelled_clean(cluster, plan, expected)
    _lookups_clean(cluster, expected)
