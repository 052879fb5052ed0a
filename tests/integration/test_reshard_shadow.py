"""SHADOW reads during a migration (issue 9, docs/RESHARDING.md "Shadow reads"), on real
MariaDB: routers answer from the source and compare the same read on the target, counting
equal / lagged / differed reads; ``shardctl reshard switch-reads --shadow`` turns them on for
a while, drains meanwhile, turns them off and reports the routers' published counters.

Clusters come from reshard_cluster.build_cluster (s0 owns [0, 512), s1 [512, 1024)); the
migration moves [256, 512) from s0 to s2. "Plain" routers get a hand-made version with
``shadow_percent`` (exact counts, no follower timing); "following" routers load the meta
store and see the workflow's versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from reshard_cluster import Cluster, build_cluster
from reshard_load import INSERT_USER, RENAME_USER
from sqlalchemy import text

from shardrouter.cli import main as cli_main
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import ConfigError, ReshardDataError, ReshardError, ReshardStateError
from shardrouter.reshard import state
from shardrouter.reshard.journal import MIRROR_VARIABLE
from shardrouter.reshard.plan import plan_move
from shardrouter.reshard.workflow import Workflow, pairs

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

MID = "m-shadow"
MOVING = (256, 512)
READ = "SELECT user_id, email, name FROM users WHERE user_id = :u"


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_sh") as made:
        yield made


def _plan(cluster: Cluster) -> None:
    found = cluster.store.current()
    assert found is not None
    plan = plan_move(
        found.document,
        MOVING,
        "s2",
        {"s2": cluster.four["shards"]["s2"]},
        base_version=found.version,
        migration_id=MID,
    )
    state.create(cluster.store, plan)


def _users(topology: Topology, n: int, inside: Callable[[int], bool]) -> list[int]:
    found: list[int] = []
    user = 1
    while len(found) < n:
        if inside(topology.slot_for("users", user)):
            found.append(user)
        user += 1
    return found


def _moving(slot: int) -> bool:
    return MOVING[0] <= slot < MOVING[1]


def _copied(cluster: Cluster, users: list[int]) -> Workflow:
    """The migration planned, started, copied (users inserted before the copy)."""
    _plan(cluster)
    router = Router(cluster.current())
    try:
        for u in users:
            router.execute(INSERT_USER, {"u": u, "e": f"u{u}@example.com", "n": "v0"})
    finally:
        router.close()
    flow = Workflow(cluster.store, MID)
    flow.act("start")
    flow.act("copy")
    return flow


def _shadow_doc(cluster: Cluster, percent: int) -> dict[str, Any]:
    """The current version (the migration's copy stage) with shadow reads on ``percent``."""
    found = cluster.store.current()
    assert found is not None
    doc = copy.deepcopy(dict(found.document))
    doc.pop("meta", None)
    assert doc["moving"], "the migration's copy stage is current"
    for entry in doc["moving"]:
        entry["shadow_percent"] = percent
    return doc


def _settled(stats: Callable[[], dict[str, dict[str, int]]], timeout: float = 10) -> dict[str, int]:
    """The router's counters of MID once unchanged for 2 s (rechecks take 1.3 s)."""
    deadline = time.monotonic() + timeout
    last = stats().get(MID, {})
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = stats().get(MID, {})
        if now == last:
            return now
        last = now
    raise AssertionError(f"shadow counters never settled: {last}")


def _behind_the_journal(cluster: Cluster, shard: str, sql: str, params: dict[str, Any]) -> None:
    """A write on ``shard`` that journals nothing (as the mirror's own writes): a difference
    no drain repairs, only verify."""
    engine = cluster.engines().primary(shard)  # type: ignore[arg-type]
    try:
        with engine.begin() as conn:
            conn.execute(text(f"SET {MIRROR_VARIABLE} = 1"))
            conn.execute(text(sql), params)
            conn.execute(text(f"SET {MIRROR_VARIABLE} = NULL"))
    finally:
        engine.dispose()


# -------------------------------------------------------------------- plain routers


def test_reads_of_shadowed_slots_are_compared_and_answered_from_the_source(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    topology = cluster.slots
    users = _users(topology, 12, _moving)
    flow = _copied(cluster, users)
    flow.close()
    victim = users[0]
    _behind_the_journal(
        cluster, "s2", "UPDATE users SET name = 'only-on-target' WHERE user_id = :u", {"u": victim}
    )
    router = Router(Topology(config_from_dict(_shadow_doc(cluster, 100))))
    try:
        with caplog.at_level(logging.WARNING, logger="shardrouter.shadow"):
            answers = {u: router.execute(READ, {"u": u}).rows for u in users}
            counts = _settled(lambda: router.shadow_stats)
        # The answer is the source's, also for the row that differs on the target.
        assert answers[victim] == [(victim, f"u{victim}@example.com", "v0")]
        assert all(len(rows) == 1 for rows in answers.values())
        assert counts["compared"] == len(users), counts
        assert counts["differed"] == 1 and counts["equal"] == len(users) - 1, counts
        assert counts["errors"] == 0 and counts["dropped"] == 0, counts
        logged = [r.getMessage() for r in caplog.records if r.name == "shardrouter.shadow"]
        assert len(logged) == 1 and "differs" in logged[0] and MID in logged[0], logged
        assert "only-on-target" not in logged[0] and str(victim) not in logged[0].split(":")[-1]
        # Reads across shards and reads outside the moving slots are not compared.
        router.execute("SELECT COUNT(*) FROM users")
        other = _users(topology, 3, lambda s: not _moving(s))
        for u in other:
            router.execute(READ, {"u": u})
        assert _settled(lambda: router.shadow_stats)["compared"] == len(users)
    finally:
        router.close()


def test_a_percentage_compares_the_reads_of_that_share_of_slots_by_slot(cluster: Cluster) -> None:
    topology = cluster.slots
    inside = _users(topology, 10, lambda s: _moving(s) and s % 100 < 30)
    outside = _users(topology, 10, lambda s: _moving(s) and s % 100 >= 30)
    flow = _copied(cluster, inside + outside)
    flow.close()
    router = Router(Topology(config_from_dict(_shadow_doc(cluster, 30))))
    try:
        for _ in range(2):  # the same keys twice: the same ones compared both times
            for u in inside + outside:
                router.execute(READ, {"u": u})
        counts = _settled(lambda: router.shadow_stats)
        assert counts["compared"] == 2 * len(inside) and counts["equal"] == 2 * len(inside)
    finally:
        router.close()


def test_a_target_that_lags_is_counted_lagged_not_differed(cluster: Cluster) -> None:
    topology = cluster.slots
    users = _users(topology, 3, _moving)
    flow = _copied(cluster, users)
    router = Router(Topology(config_from_dict(_shadow_doc(cluster, 100))))
    try:
        router.execute(RENAME_USER, {"u": users[0], "n": "v1"})  # journaled, not drained yet
        assert router.execute(READ, {"u": users[0]}).rows[0][2] == "v1"
        deadline = time.monotonic() + 10
        while not router._shadow._parked:  # the first comparison found the lag, rechecks wait
            assert time.monotonic() < deadline, "the first comparison never ran"
            time.sleep(0.01)
        (pair,) = pairs(flow.plan)
        flow._drain(pair)  # what the runner does every 0.1 s: before the recheck at 0.3 s
        counts = _settled(lambda: router.shadow_stats)
        assert counts["compared"] == 1 and counts["lagged"] == 1, counts
        assert counts["differed"] == 0
    finally:
        router.close()
        flow.close()


def test_the_async_router_compares_too(cluster: Cluster) -> None:
    topology = cluster.slots
    users = _users(topology, 6, _moving)
    flow = _copied(cluster, users)
    flow.close()
    _behind_the_journal(
        cluster, "s2", "DELETE FROM users WHERE user_id = :u", {"u": users[-1]}
    )  # a row missing on the target
    doc = _shadow_doc(cluster, 100)

    async def main() -> dict[str, int]:
        router = AsyncRouter(Topology(config_from_dict(doc)))
        try:
            for u in users:
                assert len((await router.execute(READ, {"u": u})).rows) == 1
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                counts = router.shadow_stats.get(MID, {})
                if counts.get("compared") == len(users):
                    return counts
            raise AssertionError(f"not every read compared: {router.shadow_stats}")
        finally:
            await router.close()

    counts = asyncio.run(main())
    assert counts["differed"] == 1 and counts["equal"] == len(users) - 1, counts


def test_shadow_percent_is_refused_outside_dual_old_primary(cluster: Cluster) -> None:
    users = _users(cluster.slots, 1, _moving)
    flow = _copied(cluster, users)
    flow.close()
    doc = _shadow_doc(cluster, 10)
    doc["moving"][0]["write_mode"] = "frozen"
    with pytest.raises(ConfigError, match="shadow_percent: 10 in write_mode frozen"):
        config_from_dict(doc)


# -------------------------------------------------------------------- the workflow


def test_switch_reads_shadow_with_following_routers_reports_their_counts(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    topology = cluster.slots
    users = _users(topology, 20, _moving)
    flow = _copied(cluster, users)
    flow.act("verify")
    router = Router.load(cluster.path)  # follows the meta store

    def busy(n: int) -> None:
        u = users[n % len(users)]
        if n % 7 == 0:  # writes go on: the runner drains them to the target
            router.execute(RENAME_USER, {"u": u, "n": f"v{n}"})
        router.execute(READ, {"u": u})
        time.sleep(0.005)

    def first_only(n: int) -> None:
        router.execute(READ, {"u": users[0]})
        time.sleep(0.05)

    try:
        with _reading(busy):
            report = flow.shadow(100, 3)
        assert report["routers"] == 1 and report["percent"] == 100
        assert report["compared"] > 50, report
        assert report["differed"] == 0 and report["errors"] == 0, report
        assert report["compared"] == report["equal"] + report["lagged"], report
        assert flow.status()["shadow"]["compared"] == report["compared"]
        assert flow.migration.phase == "verified"
        assert not flow._shadowing(), "shadow reads stay on after the report"
        mine = router.shadow_stats[MID]
        assert mine["compared"] >= report["compared"]
        # A row that differs with nothing journaled: the report fails typed, verify repairs.
        _behind_the_journal(
            cluster, "s2", "UPDATE users SET email = 'x@y' WHERE user_id = :u", {"u": users[0]}
        )
        # 5 s, not 2: under the full suite's load the following router may learn of the
        # shadow window late (one CI-like run compared nothing in 2 s and did not raise).
        with _reading(first_only), pytest.raises(ReshardDataError, match=r"answered differently"):
            flow.shadow(100, 5)
        assert flow.status()["shadow"]["differed"] >= 1
        assert not flow._shadowing()
        flow.act("verify")  # repairs the row
        with _reading(first_only):
            report = flow.shadow(100, 2)
        assert report["differed"] == 0 and report["compared"] > 0, report
    finally:
        router.close()
        flow.close()


@contextlib.contextmanager
def _reading(step: Callable[[int], None]) -> Iterator[None]:
    """``step(0)``, ``step(1)``, ... on a thread while the block runs; its error re-raised."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def loop() -> None:
        n = 0
        try:
            while not stop.is_set():
                step(n)
                n += 1
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(30)
    assert not errors, errors


def test_shadow_refusals_and_the_cli(cluster: Cluster) -> None:
    _plan(cluster)
    cli = CliRunner()
    base = ["reshard", "switch-reads", MID, "--config", str(cluster.path)]
    found = cli.invoke(cli_main, [*base, "--percent", "10"])
    assert found.exit_code == 3, found.output
    assert "refused" in found.output and "lags its source" in found.output
    found = cli.invoke(cli_main, [*base, "--shadow", "--seconds", "1"])
    assert found.exit_code == 3, found.output
    assert "shadow reads before the copy finished" in found.output
    found = cli.invoke(cli_main, [*base, "--shadow", "--percent", "0"])
    assert found.exit_code == 2, found.output
    with Workflow(cluster.store, MID) as flow:
        with pytest.raises(ReshardError, match=r"Workflow\.shadow"):
            flow.act("shadow")
        with pytest.raises(ReshardError, match=r"percent 101 must be in 1\.\.100"):
            flow.shadow(101, 5)
        with pytest.raises(ReshardStateError, match="migration is planned: shadow refused"):
            flow.shadow(10, 5)
        flow.act("start")
        flow.act("copy")
    found = cli.invoke(cli_main, [*base, "--shadow", "--seconds", "1", "--json"])
    assert found.exit_code == 0, found.output
    assert '"compared": 0' in found.output and '"differed": 0' in found.output
    found = cli.invoke(cli_main, ["reshard", "status", MID, "--config", str(cluster.path)])
    assert found.exit_code == 0 and "shadow reads on 100% of the moving slots" in found.output


def test_a_paused_shadow_ends_at_once_and_resume_turns_a_leftover_off(cluster: Cluster) -> None:
    users = _users(cluster.slots, 2, _moving)
    flow = _copied(cluster, users)
    flow.close()
    with Workflow(cluster.store, MID, stop=lambda: True) as paused:
        started = time.monotonic()
        report = paused.shadow(50, 600)
        assert time.monotonic() - started < 30 and report["seconds"] < 5
        assert not paused._shadowing()
    # A runner killed with shadow reads on leaves them on: resume turns them off.
    with Workflow(cluster.store, MID) as flow:
        flow.push("copy", shadow_percent=40).raise_if_incomplete()
        assert flow._shadowing()
        flow.resume()
        assert not flow._shadowing()
        assert any(
            "shadow reads ended on resume" in e["message"] for e in state.events(cluster.store, MID)
        )
