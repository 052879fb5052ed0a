"""Resharding under load (issue 9, section 4): a 2-shard cluster split to 4 while two writer
processes (two threads each, one async writer) insert orders with items and lookups, update
statuses, delete orders and use the explicit path through their own routers, which follow the
meta store. Every acknowledged write is in a ledger; replayed on one database (the oracle) it
must give exactly what the shards hold after finalize: nothing lost, duplicated or
resurrected, every row on the shard that owns its slot, lookups consistent, no write failed.
"""

from __future__ import annotations

import copy
import json
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import BASE_TABLES, Cluster, acked, build_cluster, oracle_rows
from reshard_load import writer_process
from sqlalchemy import text

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.lookups import check_lookups
from shardrouter.reshard import state
from shardrouter.reshard.plan import plan_to
from shardrouter.reshard.workflow import Options, Workflow

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_wf") as made:
        yield made


def _oracle(oracle_server: str, ledgers: list[Path]) -> dict[str, Counter[tuple[Any, ...]]]:
    return oracle_rows(oracle_server, acked(ledgers), "reshard_wf_oracle")


def _sharded(topology: Topology) -> tuple[dict[str, Counter[tuple[Any, ...]]], list[str]]:
    """The union of every shard's rows per logical table, and the rows on a shard that does
    not own their slot."""
    engines = ShardEngines(topology)
    union: dict[str, Counter[tuple[Any, ...]]] = {t: Counter() for t in BASE_TABLES}
    misplaced: list[str] = []
    try:
        for shard in topology.shards:
            with engines.primary(shard).connect() as conn:
                for table, columns in BASE_TABLES.items():
                    for physical in topology.table(table).physical_names:
                        for row in conn.execute(
                            text(f"SELECT {', '.join(columns)} FROM {physical}")
                        ):
                            union[table][tuple(row)] += 1
                            slot = topology.slot_for(table, row[columns.index("user_id")])
                            if topology.shard_of_slot(slot) != shard:
                                misplaced.append(f"{table} {tuple(row)[:2]} on {shard}")
                            if topology.table(table).physical(slot) != physical:
                                misplaced.append(f"{table} {tuple(row)[:2]} in {physical}")
    finally:
        engines.dispose()
    return union, misplaced


def test_split_two_to_four_under_load(cluster: Cluster, oracle: Any, tmp_path: Path) -> None:
    store: MetaStore = cluster.store
    ledger_dir = tmp_path / "ledgers"
    ledger_dir.mkdir()
    stop = tmp_path / "stop"
    ctx = multiprocessing.get_context("spawn")
    writers = [
        ctx.Process(
            target=writer_process,
            args=(str(cluster.path), str(ledger_dir), i, 2, str(stop), i == 0, 20261130),
        )
        for i in range(2)
    ]
    for w in writers:
        w.start()
    try:
        current = store.current()
        assert current is not None
        plan = plan_to(
            current.document, cluster.after, base_version=current.version, migration_id="m-load"
        )
        state.create(store, plan)
        time.sleep(2.0)  # writers running on the 2-shard version
        timeline: list[tuple[str, float]] = []
        with Workflow(store, "m-load", Options(chunk=200, freeze_timeout_s=2.0)) as flow:
            for action in ("start", "copy", "verify", "switch", "finalize"):
                t0 = time.monotonic()
                flow.act(action)
                timeline.append((action, time.monotonic() - t0))
                time.sleep(1.0)  # writes between the phases
            status = flow.status()
        assert status["phase"] == "finalized", status
    finally:
        stop.touch()
        for w in writers:
            w.join(timeout=60)
    errors = sorted(ledger_dir.glob("errors-*.txt"))
    assert not errors, "\n".join(e.read_text() for e in errors)
    assert all(w.exitcode == 0 for w in writers), [w.exitcode for w in writers]
    stats = [json.loads(p.read_text()) for p in sorted(ledger_dir.glob("stats-*.json"))]
    assert sum(s["ops"] for s in stats) > 100, stats  # the writers really wrote meanwhile

    final = Topology(config_from_dict(cluster.after))
    union, misplaced = _sharded(final)
    assert misplaced == []
    expected = _oracle(oracle.shards[0].url, sorted(ledger_dir.glob("ledger-*.jsonl")))
    for table in BASE_TABLES:
        lost = expected[table] - union[table]
        extra = union[table] - expected[table]
        assert not lost and not extra, f"{table}: lost {list(lost)[:5]}, extra {list(extra)[:5]}"
    assert sum(expected["orders"].values()) > 50
    after = copy.deepcopy(cluster.after)
    after.pop("meta")
    router = Router(Topology(config_from_dict(after)))
    try:
        for report in check_lookups(router):
            assert report.orphans == [] and report.missing == [], report.as_dict()
    finally:
        router.close()
    print("timeline", timeline, "stats", stats)
