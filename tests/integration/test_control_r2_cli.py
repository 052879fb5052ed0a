"""shardctl topology push / route on a MariaDB meta store with the session sandbox's shards
(review round 2): swapped shard databases and a replica that is another shard's primary are
refused with nothing written, whatever the URLs' spelling; `shardctl route` routes by the
store's current version and fails clearly when the store does not answer."""

from __future__ import annotations

import copy
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.cli import main
from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology

pytestmark = pytest.mark.timeout(120)

ENV = {"SHARDROUTER_META_URL": None}


@pytest.fixture
def meta_url(sandbox: Any) -> Iterator[str]:
    """A fresh meta store database on the sandbox's s0 server, dropped afterwards."""
    server = make_url(sandbox.shards[0].url).set(database="")
    database = f"shardmeta_r2_{uuid.uuid4().hex[:10]}"
    engine = create_engine(server)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{database}`"))
    try:
        yield server.set(database=database).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
        engine.dispose()


@pytest.fixture
def published(
    shard_databases: Path, meta_url: str, tmp_path: Path
) -> Iterator[tuple[dict[str, Any], Path]]:
    """The sandbox topology with a meta: section, published as version 1."""
    raw: dict[str, Any] = yaml.safe_load(shard_databases.read_text())
    raw["meta"] = {"url": meta_url, "connect_timeout_s": 2, "query_timeout_s": 2}
    path = write(tmp_path / "v1.yaml", raw)
    assert run("meta", "init", "--config", str(path)).exit_code == 0
    done = run("topology", "push", "--yes", str(path))
    assert done.exit_code == 0, done.output
    yield raw, path


def write(path: Path, raw: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), env=ENV)


def current_version(meta_url: str) -> int | None:
    with MetaStore(meta_url) as store:
        return store.current_version()


def loopback_spelling(url: str) -> str:
    """The same database written with localhost instead of 127.0.0.1 (and another user)."""
    parsed = make_url(url)
    assert parsed.host == "127.0.0.1"
    return parsed.set(host="localhost").render_as_string(hide_password=False)


def test_push_of_swapped_shard_databases_is_refused_on_mariadb(
    published: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    raw, _ = published
    swapped = copy.deepcopy(raw)
    s0, s1 = swapped["shards"]["s0"], swapped["shards"]["s1"]
    s0["primary"], s1["primary"] = loopback_spelling(s1["primary"]), s0["primary"]
    path = write(tmp_path / "swapped.yaml", swapped)
    done = run("topology", "push", "--json", "--yes", str(path))
    assert done.exit_code == 3, done.output
    data = json.loads(done.stdout)
    assert data["ok"] is False and data["refused"] == 2
    refused = [c for c in data["changes"] if not c["safe"]]
    assert [c["path"] for c in refused] == ["shards.s0.primary", "shards.s1.primary"]
    assert all("in the current version" in c["line"] for c in refused)
    assert "`shardctl reshard`" in data["error"]
    assert current_version(raw["meta"]["url"]) == 1


def test_push_of_a_replica_that_is_another_shards_primary_is_refused_on_mariadb(
    published: tuple[dict[str, Any], Path], tmp_path: Path
) -> None:
    raw, _ = published
    bad = copy.deepcopy(raw)
    bad["shards"]["s1"]["replicas"] = [loopback_spelling(bad["shards"]["s0"]["primary"])]
    path = write(tmp_path / "replica.yaml", bad)
    done = run("topology", "push", "--json", "--yes", str(path))
    assert done.exit_code == 1, done.output
    error = json.loads(done.stdout)["error"]
    assert "shards.s1.replicas[0]:" in error and "is shard s0's primary database" in error
    assert current_version(raw["meta"]["url"]) == 1


def test_route_follows_the_stores_current_version_on_mariadb(
    published: tuple[dict[str, Any], Path],
) -> None:
    raw, path = published
    v2 = copy.deepcopy(raw)
    v2["tables"]["refunds"] = {"column": "user_id", "strategy": "hash"}
    with MetaStore(raw["meta"]["url"]) as store:
        assert store.push(v2, expected=1, comment="refunds") == 2
    args = ["route", "--config", str(path), "--table", "refunds", "--key", "user_id=7"]
    done = run(*args, "--json")
    assert done.exit_code == 0, done.output
    data = json.loads(done.stdout)
    assert data["topology"]["source"] == "meta_store" and data["topology"]["version"] == 2
    expected = Topology(config_from_dict(v2)).route("refunds", "user_id", 7)
    assert data["shard"] == expected.shard and data["slot"] == expected.slot
    assert run(*args).stdout.startswith("topology        version 2 (current in meta store ")
    assert run(*args, "--file-only").exit_code == 1  # the file has no table refunds


def test_route_with_a_meta_store_that_does_not_answer_fails_clearly(
    shard_databases: Path, scratch_port: int, tmp_path: Path
) -> None:
    raw: dict[str, Any] = yaml.safe_load(shard_databases.read_text())
    # Nothing listens on the scratch port in this test: connections are refused.
    raw["meta"] = {
        "url": f"mysql+pymysql://root@127.0.0.1:{scratch_port}/shardmeta",
        "connect_timeout_s": 2,
        "query_timeout_s": 2,
    }
    path = write(tmp_path / "orders.yaml", raw)
    args = ["route", "--config", str(path), "--table", "users", "--key", "user_id=7"]
    started = time.monotonic()
    done = run(*args, "--json")
    assert time.monotonic() - started < 30
    assert done.exit_code == 1, done.output
    data = json.loads(done.stdout)
    assert data["ok"] is False
    assert "did not answer" in data["error"] and "--file-only" in data["error"]
    offline = run(*args, "--file-only", "--json")
    assert offline.exit_code == 0, offline.output
    assert json.loads(offline.stdout)["topology"]["source"] == "file"
