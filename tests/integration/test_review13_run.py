"""Review 13 (issue 10): loadtest/run end to end on real MariaDB.

- A reshard that has not finished when Locust stops: the runner interrupts the running step
  (ReshardDriver.stop: SIGINT), then reports that step as having *failed* ("shardctl reshard
  shadow exited 1") instead of "did not finish within the run", and its per-phase table has an
  "after" phase of negative length (its start is the end of a step that ran past the run).
- A second run into the same --out reads the first run's ledger and request logs as its own.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from loadtest_cli import run

pytestmark = pytest.mark.mariadb


@pytest.mark.timeout(300)
def test_a_reshard_cut_short_by_the_end_of_the_run_is_reported_as_such(
    scratch_dir: Path, scratch_port: int, tmp_path: Path
) -> None:
    done = run(
        "--reshard", "--port", str(scratch_port), "--dir", str(scratch_dir), "-u", "6",
        "--rate", "15", "-t", "10s", "--reshard-at", "3", "--seed-users", "3000",
        "--out", str(tmp_path), "--json", timeout=280,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]  # the reshard did not finish
    report: dict[str, Any] = json.loads(done.stdout)
    (only,) = report["runs"]
    assert only["ledger"]["ok"], only["ledger"]
    negative = [(p["phase"], p["seconds"]) for p in only["phases"] if p["seconds"] < 0]
    assert not negative, only["phases"]
    assert "did not finish within the run" in report["reshard_error"], report["reshard_error"]


@pytest.mark.timeout(300)
def test_a_second_run_into_the_same_out_folder_checks_only_its_own_ledger(
    shard_databases: Path, tmp_path: Path
) -> None:
    common = (
        "--config", str(shard_databases), "--reset", "-u", "4", "-t", "4s", "--rate", "10",
        "--seed-users", "30", "--orders-per-user", "1", "--out", str(tmp_path), "--json",
    )  # fmt: skip
    first = run(*common)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(*common)
    # Either refused (a used folder) or a run of its own: not the first run's orders, emptied
    # by --reset, reported lost, nor its requests counted again.
    assert second.returncode in (0, 2), second.stdout[-3000:] + second.stderr[-3000:]
    if second.returncode == 0:
        (only,) = json.loads(second.stdout)["runs"]
        assert only["ledger"]["ok"], only["ledger"]
        assert only["summary"]["seconds"] < 30, only["summary"]["seconds"]
