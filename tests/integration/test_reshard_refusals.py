"""``shardctl reshard`` refuses what is illegal, through the CLI on a real cluster (issue 9):
every illegal transition reachable while a 2 -> 4 split walks forward (switch before verify,
finalize before the switch, cancel after it, copy after finalize, advance in switched, a
second plan over the moving slots...) exits 3 with the reason and the actions allowed now,
changes nothing, and with --json prints one object ``{"ok": false, "error", "exit_code"}``;
finalize, cancel and ``run --through finalized`` without --yes exit 5; bad plan arguments exit
2 (usage) or 3 (a plan that cannot be made) and store nothing. No writers: no router is
registered, so version changes need no acknowledgement.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from reshard_cluster import Cluster, build_cluster

from shardrouter.cli import main
from shardrouter.engine.router import Router
from shardrouter.reshard import phases, state

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(60)]

ENV = {"SHARDROUTER_META_URL": None}


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_rf") as made:
        router = Router(made.current())  # a few rows to move (no meta: not registered)
        try:
            for user in range(1, 41):
                router.execute(
                    "INSERT INTO users (user_id, email, name) VALUES (:u, :e, 'x')",
                    {"u": user, "e": f"u{user}@example.com"},
                )
        finally:
            router.close()
        yield made


def shardctl(cluster: Cluster, *args: str) -> Result:
    """``shardctl reshard ARGS --config F``: F is the 2-shard topology with its meta store and
    the definitions of s2 and s3 (``slots: []``), which --split and --move may name."""
    config = cluster.path.with_name("with-new-shards.yaml")
    if not config.exists():
        doc = copy.deepcopy(cluster.before)
        for name in ("s2", "s3"):
            doc["shards"][name] = {**cluster.four["shards"][name], "slots": []}
        config.write_text(yaml.safe_dump(doc))
    return CliRunner().invoke(
        main, ["reshard", *args, "--config", str(config)], env=ENV, catch_exceptions=False
    )


def ok(cluster: Cluster, *args: str) -> dict[str, Any]:
    result = shardctl(cluster, *args, "--json")
    assert result.exit_code == 0, (args, result.stdout, result.stderr)
    answer: dict[str, Any] = json.loads(result.stdout)
    assert answer["ok"] is True
    return answer


def refused(cluster: Cluster, code: int, *args: str, says: tuple[str, ...] = ()) -> str:
    """Run ``args`` twice (text, --json): exit ``code`` both times, the text on stderr naming
    ``says``, the JSON one object with ok false and the exit code; the migrations and the
    current version unchanged. Returns the text."""
    before = _snapshot(cluster)
    result = shardctl(cluster, *args)
    assert result.exit_code == code, (args, result.exit_code, result.stdout, result.stderr)
    message = result.stderr
    for part in says:
        assert part in message, (args, part, message)
    as_json = shardctl(cluster, *args, "--json")
    assert as_json.exit_code == code, (args, as_json.stdout, as_json.stderr)
    answer = json.loads(as_json.stdout)  # exactly one JSON document on stdout
    assert answer["ok"] is False and answer["exit_code"] == code, answer
    for part in says:
        assert part in answer["error"], (args, part, answer)
    assert _snapshot(cluster) == before, args  # a refusal changes nothing
    return message


def _snapshot(cluster: Cluster) -> tuple[Any, ...]:
    return (
        cluster.store.current_version(),
        tuple((m.migration_id, m.phase) for m in state.all(cluster.store)),
    )


def _allowed(phase: str) -> str:
    """The ``allowed now`` list ReshardStateError appends for ``phase``."""
    return "allowed now: " + ", ".join(phases.legal(phase))


def test_bad_plan_arguments(cluster: Cluster, tmp_path: Path) -> None:
    missing = str(tmp_path / "missing.yaml")
    refused(cluster, 3, "plan", "--to", missing, says=("missing.yaml", "cannot read the file"))
    refused(cluster, 3, "plan", "--split", "s9", "--into", "s2,s3", says=("--split s9",))
    refused(cluster, 2, "plan", "--move", "10-20", "--to", "s2", says=("START:END",))
    refused(cluster, 2, "plan", "--move", "a:b", "--to", "s2", says=("START:END",))
    refused(cluster, 3, "plan", "--move", "0:2000", "--to", "s2", says=("[0, 2000)",))
    refused(cluster, 3, "plan", "--move", "20:10", "--to", "s2", says=("not a slot range",))
    refused(cluster, 3, "plan", "--move", "0:16", "--to", "s0", says=("owns [0, 16) already",))
    refused(
        cluster,
        2,
        "plan",
        "--to",
        str(cluster.after_path),
        "--split",
        "s0",
        "--into",
        "s0,s2",
        says=("give exactly one of",),
    )
    refused(cluster, 2, "plan", "--split", "s0", says=("give exactly one of",))  # no --into
    assert state.all(cluster.store) == []


def test_illegal_transitions_along_the_way(cluster: Cluster) -> None:
    made = ok(cluster, "plan", "--to", str(cluster.after_path))
    mid = made["plan"]["migration_id"]

    # planned: nothing applied yet
    refused(cluster, 3, "copy", mid, says=("copy before start", _allowed("planned")))
    refused(cluster, 3, "verify", mid, says=("verify before the copy", _allowed("planned")))
    refused(cluster, 3, "switch", mid, says=("copy and verify first", _allowed("planned")))
    refused(cluster, 3, "rollback", mid, says=("cancel the plan instead",))
    refused(cluster, 3, "finalize", mid, "--yes", says=("finalize before the switch",))

    assert ok(cluster, "start", mid)["phase"] == "prepared"
    refused(cluster, 3, "start", mid, says=("started already", _allowed("prepared")))
    refused(cluster, 3, "switch", mid, says=("before the copy was verified",))
    refused(cluster, 3, "finalize", mid, "--yes", says=("delete the only copy",))
    refused(cluster, 3, "verify", mid, says=("verify before the copy finished",))
    # a second plan over the moving slots, by each way of planning
    for args in (
        ("--split", "s0", "--into", "s0,s2"),
        ("--move", "300:310", "--to", "s1"),
        ("--to", str(cluster.after_path)),
    ):
        refused(cluster, 3, "plan", *args, says=("two migrations at once over one slot", mid))

    assert ok(cluster, "copy", mid)["phase"] == "copied"
    refused(cluster, 3, "switch", mid, says=("before the copy was verified", _allowed("copied")))
    refused(cluster, 3, "copy", mid, says=("the copy is complete",))
    refused(cluster, 3, "finalize", mid, "--yes", says=("switch first", _allowed("copied")))

    assert ok(cluster, "verify", mid)["phase"] == "verified"
    refused(cluster, 3, "start", mid, says=("started already", _allowed("verified")))
    refused(cluster, 5, "finalize", mid, says=("--yes",))  # not confirmed: checked first
    refused(cluster, 5, "cancel", mid, says=("--yes",))
    refused(cluster, 5, "run", mid, "--through", "finalized", says=("--yes",))

    assert ok(cluster, "switch", mid)["phase"] == "switched"
    refused(
        cluster,
        3,
        "cancel",
        mid,
        "--yes",
        says=("cancel after the switch would drop the authority's rows", "roll back first"),
    )
    refused(cluster, 3, "advance", mid, says=("finalize is never automatic", _allowed("switched")))
    refused(cluster, 3, "copy", mid, says=("overwrite newer rows", _allowed("switched")))
    refused(cluster, 3, "verify", mid, says=("roll back to verify again",))
    refused(cluster, 3, "switch", mid, says=("switched already",))
    refused(cluster, 5, "finalize", mid, says=("--yes",))

    assert ok(cluster, "finalize", mid, "--yes")["phase"] == "finalized"
    for action in ("copy", "start", "rollback", "advance", "verify", "switch"):
        refused(cluster, 3, action, mid, says=("the migration is over", "plan a new migration"))
    refused(cluster, 3, "cancel", mid, "--yes", says=("the migration is over",))
    refused(cluster, 3, "finalize", mid, "--yes", says=("the migration is over",))
    # run is idempotent: a finalized migration is where it was asked to go
    assert ok(cluster, "run", mid, "--through", "finalized", "--yes")["phase"] == "finalized"


def test_rolled_back_accepts_only_cancel(cluster: Cluster) -> None:
    mid = ok(cluster, "plan", "--split", "s1", "--into", "s1,s3")["plan"]["migration_id"]
    ok(cluster, "start", mid)
    assert ok(cluster, "rollback", mid)["phase"] == "rolled_back"
    for action in ("copy", "verify", "switch", "advance", "rollback"):
        refused(cluster, 3, action, mid, says=("rolled back", _allowed("rolled_back")))
    refused(cluster, 3, "run", mid, says=("cannot run forward",))
    refused(cluster, 5, "cancel", mid, says=("--yes",))
    assert ok(cluster, "cancel", mid, "--yes")["phase"] == "cancelled"
    # the slots are free again: a new plan over them is accepted
    assert ok(cluster, "plan", "--split", "s1", "--into", "s1,s3")["plan"]["migration_id"] != mid
