"""README's resharding guide, as written: its commands run in order against a real 2-shard
cluster (sandbox MariaDB, a meta store) and take it to 4 shards; its `status` block is what
the command prints (numbers, times and the migration id aside)."""

from __future__ import annotations

import copy
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from reshard_cluster import fresh_database
from sqlalchemy import text

from shardrouter.cli import main
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.schema import apply

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(240)]

REPO = Path(__file__).resolve().parents[2]
GUIDE = r"^```bash\n(shardctl reshard plan --config orders\.yaml.*?)^```$"
STATUS = r"^```console\n\$ shardctl reshard status --config orders\.yaml\n(.*?)^```$"


@pytest.fixture
def files(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Path]:
    four = yaml.safe_load(shard_databases.read_text())
    four["meta"] = {
        "url": fresh_database(sandbox.shards[0].url, "reshard_rm_meta"),
        "fast_poll_interval_s": 0.05,
    }
    for name in four["shards"]:
        four["shards"][name]["primary"] = fresh_database(
            four["shards"][name]["primary"], f"reshard_rm_{name}"
        )
    two = copy.deepcopy(four)
    two["shards"] = {
        "s0": {**four["shards"]["s0"], "slots": [[0, 512]]},
        "s1": {**four["shards"]["s1"], "slots": [[512, 1024]]},
    }
    for name, slots in (
        ("s0", [0, 256]),
        ("s2", [256, 512]),
        ("s1", [512, 768]),
        ("s3", [768, 1024]),
    ):
        four["shards"][name]["slots"] = [slots]
    (tmp_path / "orders.yaml").write_text(yaml.safe_dump(two, sort_keys=False))
    (tmp_path / "orders-4.yaml").write_text(yaml.safe_dump(four, sort_keys=False))
    plain = {k: v for k, v in two.items() if k != "meta"}
    topology = Topology(config_from_dict(plain))
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    router = Router(topology)
    try:
        layout = topology.id_layout
        for user in range(1, 301):
            router.execute(
                "INSERT INTO users (user_id, email, name) VALUES (:u, :e, 'n')",
                {"u": user, "e": f"u{user}@example.com"},
            )
            order = layout.compose(user, int(topology.slot_for("orders", user)), 0, 0)
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (:o, :u, :m, 'new', 100, '2026-11-30 12:00:00')",
                {"o": order, "u": user, "m": user % 7},
            )
            router.execute(
                "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents)"
                " VALUES (:o, 1, :u, 'sku', 1, 100)",
                {"o": order, "u": user},
            )
    finally:
        router.close()
    with MetaStore(two["meta"]["url"]) as store:
        store.init()
        store.push(two, expected=None, comment="two shards")
    yield tmp_path


def _shape(line: str) -> str:
    """A status line without what changes from run to run."""
    line = re.sub(r"\bm\d+-[0-9a-f]{6}\b", "M", line)
    line = re.sub(r"\d[\d,.:]*", "N", line)
    return re.sub(r"\s+", " ", line).strip()


def test_readme_reshard_guide_runs_as_written(files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    guide = re.search(GUIDE, readme, re.S | re.M)
    shown = re.search(STATUS, readme, re.S | re.M)
    assert guide and shown, "README has no resharding guide or status block"
    monkeypatch.chdir(files)
    runner = CliRunner()
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in guide.group(1).splitlines()]
    assert [shlex.split(c)[2] for c in commands] == [
        "plan",
        "start",
        "copy",
        "verify",
        "switch-reads",
        "switch",
        "status",
        "finalize",
    ]
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "shardctl"
        result = runner.invoke(main, argv[1:])
        assert result.exit_code == 0, (command, result.output)
        if argv[2] == "copy":
            status = runner.invoke(main, ["reshard", "status", "--config", "orders.yaml"])
            assert status.exit_code == 0, status.output
            if _print_status():
                print(status.output)
            got = [_shape(x) for x in status.output.splitlines()]
            want = [_shape(x) for x in shown.group(1).splitlines()]
            assert got == want, "\n".join(status.output.splitlines())
    listed = runner.invoke(main, ["reshard", "list", "--config", "orders.yaml", "--json"])
    assert '"phase": "finalized"' in listed.output
    four = yaml.safe_load((files / "orders-4.yaml").read_text())
    four.pop("meta")
    topology = Topology(config_from_dict(four))
    engines = ShardEngines(topology)
    try:
        total = 0
        for shard in topology.shards:
            with engines.primary(shard).connect() as conn:
                for physical in topology.table("orders").physical_names:
                    for (user,) in conn.execute(text(f"SELECT user_id FROM {physical}")):
                        assert topology.shard_for("orders", user) == shard
                        total += 1
        assert total == 300
    finally:
        engines.dispose()


def _print_status() -> bool:
    import os

    return bool(os.environ.get("SHARDROUTER_PRINT_STATUS"))
