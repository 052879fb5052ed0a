"""`shardctl reshard drain` (issue 9): between steps nothing drains the journals, and after the
switch nothing until finalize or a rollback; drain copies the authorities' changes into the
mirrors on demand, so a waiting migration's journals stay short. Real MariaDB, the CLI as an
operator runs it (plan --to the 4-shard file, start, copy, verify, switch)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from reshard_cluster import Cluster, build_cluster
from reshard_load import INSERT_USER, RENAME_USER
from sqlalchemy import text

from shardrouter.cli import main as cli_main
from shardrouter.engine.router import Router
from shardrouter.reshard import journal

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_dr") as made:
        yield made


def _cli(cluster: Cluster, *args: str) -> Any:
    found = CliRunner().invoke(cli_main, ["reshard", *args, "--config", str(cluster.path)])
    return found


def test_drain_keeps_the_mirror_current_before_and_after_the_switch(cluster: Cluster) -> None:
    topology = cluster.slots
    user = next(u for u in range(1, 10_000) if 256 <= topology.slot_for("users", u) < 512)
    router = Router(cluster.current())
    try:
        router.execute(INSERT_USER, {"u": user, "e": f"u{user}@example.com", "n": "v0"})
    finally:
        router.close()
    found = _cli(cluster, "drain")  # before start: no journal yet
    assert found.exit_code == 2 and "name the migration (active: none)" in found.output
    assert _cli(cluster, "plan", "--to", str(cluster.after_path)).exit_code == 0
    found = _cli(cluster, "drain")
    assert found.exit_code == 3 and "planned: drain refused" in found.output, found.output
    for step in ("start", "copy", "verify"):
        assert _cli(cluster, step).exit_code == 0
    engines = cluster.engines()
    physical = "users"

    def name_on(shard: str) -> Any:
        with engines.primary(shard).connect() as conn:  # type: ignore[arg-type]
            return conn.execute(
                text(f"SELECT name FROM {physical} WHERE user_id = :u"), {"u": user}
            ).scalar()

    try:
        router = Router(cluster.current())
        try:
            router.execute(RENAME_USER, {"u": user, "n": "v1"})  # on s0, journaled there
        finally:
            router.close()
        assert journal.backlog(engines.primary("s0")) >= 1  # type: ignore[arg-type]
        assert name_on("s2") == "v0"
        found = _cli(cluster, "drain", "--json")
        assert found.exit_code == 0, found.output
        report = json.loads(found.output)
        assert report["into"] == "targets" and report["entries"] >= 1
        assert report["left"] == {"s0": 0, "s1": 0}, report
        assert name_on("s2") == "v1"
        assert _cli(cluster, "switch").exit_code == 0
        router = Router(cluster.current())
        try:
            router.execute(RENAME_USER, {"u": user, "n": "v2"})  # now on s2, journaled there
        finally:
            router.close()
        assert name_on("s0") == "v1"  # the source's copy lags until a drain
        found = _cli(cluster, "drain", "--seconds", "0.5")
        assert found.exit_code == 0, found.output
        assert "into the sources; left: s2 0, s3 0" in found.output, found.output
        assert name_on("s0") == "v2"
        assert name_on("s2") == "v2"
    finally:
        engines.dispose()
