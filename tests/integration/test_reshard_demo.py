"""``shardctl demo --reshard`` does what README says: a 2 -> 4 split on a sandbox it starts and
stops itself, with a writer running, and the ledger equal to the shards at the end."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrouter.cli import main

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(240)]


def test_demo_reshard_splits_with_writes_and_loses_nothing(
    scratch_dir: Path, scratch_port: int
) -> None:
    result = CliRunner().invoke(
        main,
        ["demo", "--reshard", "--port", str(scratch_port), "--dir", str(scratch_dir), "--json"],
    )
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["phase"] == "finalized"
    assert [t["action"] for t in figures["timeline"]] == [
        "start",
        "copy",
        "verify",
        "switch",
        "finalize",
    ]
    assert figures["writes"] > 50 and figures["orders"] > 10
    assert figures["failed_writes"] == []
    assert (figures["lost"], figures["extra"], figures["wrong"], figures["misplaced"]) == (
        [],
        [],
        [],
        [],
    )
    assert 0 < figures["freeze_s"] < 2.0
    for port in range(scratch_port, scratch_port + 4):  # the demo stopped its sandbox
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", port)) != 0, port
