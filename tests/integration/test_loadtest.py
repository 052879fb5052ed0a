"""The Locust load test runs against real shards, headless and bounded, without failures."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import apply

pytestmark = pytest.mark.mariadb

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(120)
def test_locust_run_has_no_failures(shard_databases: Path, tmp_path: Path) -> None:
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    prefix = tmp_path / "run"
    env = dict(os.environ, SHARDROUTER_TOPOLOGY=str(shard_databases))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtest" / "locustfile.py"),
            "--headless",
            "-u",
            "8",
            "-r",
            "8",
            "-t",
            "6s",
            "--only-summary",
            "--csv",
            str(prefix),
            "--exit-code-on-error",
            "1",
        ],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with open(f"{prefix}_stats.csv", newline="") as f:
        rows = {r["Name"]: r for r in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 100
    assert int(total["Failure Count"]) == 0
    for name in ("place order (txn + lookup)", "my orders (user_id)", "one order (gene)"):
        assert int(rows[name]["Request Count"]) > 0, name
