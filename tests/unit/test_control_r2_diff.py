"""Control plane, review round 2 (findings 8 and 9 and two smaller ones): a push never
re-places data by giving a shard another shard's database (primaries swapped, a replica that
is another shard's database), never publishes a version whose driver cannot be loaded, and
`shardctl route` routes by the meta store's current version. SQLite meta store."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy.engine import make_url

from shardrouter.cli import main
from shardrouter.control.diff import ChangeKind, diff_topologies
from shardrouter.control.store import MetaStore
from shardrouter.control.versions import check_drivers, push_file
from shardrouter.core.config import (
    TopologyConfig,
    config_from_dict,
    database_identity,
    same_database,
)
from shardrouter.errors import ConfigError, TopologyChangeError

REPO = Path(__file__).resolve().parents[2]
SQLITE_YAML = REPO / "config" / "orders-sqlite.yaml"
SECRET = "s3cr3t-r2"

pytestmark = pytest.mark.timeout(60)


def document(directory: Path) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(SQLITE_YAML.read_text())
    for name, shard in raw["shards"].items():
        shard["primary"] = f"sqlite:///{directory}/{name}.db"
    raw["meta"] = {"url": f"sqlite:///{directory}/meta.db"}
    return raw


def mysql_document() -> dict[str, Any]:
    raw = document(Path("/unused"))
    for i, shard in enumerate(raw["shards"].values()):
        shard["primary"] = f"mysql+pymysql://app:{SECRET}@db{i}:3306/orders_s{i}"
    raw["meta"] = {"url": f"mysql+pymysql://meta:{SECRET}@dbm/shardmeta"}
    return raw


def diff_of(old: dict[str, Any], new: dict[str, Any]) -> Any:
    return diff_topologies(config_from_dict(old, env={}), config_from_dict(new, env={}))


def refused_lines(diff: Any) -> list[str]:
    return [c.line for c in diff.refused]


def assert_no_secret(diff: Any) -> None:
    text = json.dumps(diff.as_dict()) + "\n".join(c.render() for c in diff.changes)
    assert SECRET not in text, text


# -- 8: a shard re-pointed to another shard's database is a re-placement of data ----------------


def test_push_refuses_swapping_two_shards_databases(tmp_path: Path) -> None:
    """Review finding 8 (copied): swapping s0's and s1's primaries was two "safe failovers",
    yet it re-places the data of 512 slots. Each side is now refused, naming the other shard
    and the way out (`shardctl reshard`)."""
    old = document(tmp_path)
    new = copy.deepcopy(old)
    a, b = new["shards"]["s0"]["primary"], new["shards"]["s1"]["primary"]
    new["shards"]["s0"]["primary"], new["shards"]["s1"]["primary"] = b, a
    diff = diff_topologies(config_from_dict(old), config_from_dict(new))
    assert not diff.safe, [c.line for c in diff.changes]
    assert refused_lines(diff) == [
        f"shards.s0.primary: {b} is shard s1's primary database in the current version",
        f"shards.s1.primary: {a} is shard s0's primary database in the current version",
    ]
    for change in diff.refused:
        assert change.kind is ChangeKind.SHARED_DATABASE
        assert "re-places data, it is not a failover" in change.reason
        assert "`shardctl reshard`" in change.reason
    with pytest.raises(TopologyChangeError, match="swapping two shards' databases"):
        diff.raise_if_refused()


@pytest.mark.parametrize(
    ("s0_url", "why"),
    [
        ("mysql+pymysql://other:pw@DB1/orders_s1", "host case, no port, other user"),
        ("mariadb+mysqldb://app@db1:3306/orders_s1?charset=utf8mb4", "other dialect and driver"),
    ],
)
def test_a_swap_spelled_differently_is_still_refused(s0_url: str, why: str) -> None:
    old = mysql_document()
    new = copy.deepcopy(old)
    s0 = new["shards"]["s0"]["primary"]
    new["shards"]["s0"]["primary"], new["shards"]["s1"]["primary"] = s0_url, s0
    diff = diff_of(old, new)
    assert [c.path for c in diff.refused] == ["shards.s0.primary", "shards.s1.primary"], why
    assert_no_secret(diff)


def test_loopback_names_and_the_default_port_are_one_database() -> None:
    """localhost, 127.0.0.1 and ::1 are one host; an absent port is 3306; driver, user,
    password and options do not matter; host names are not resolved."""
    base = make_url("mysql+pymysql://root@127.0.0.1:3306/orders_s0")
    for same in [
        "mysql+pymysql://root@localhost/orders_s0",
        "mysql+mysqldb://app:pw@LOCALHOST:3306/orders_s0?charset=utf8mb4",
        "mariadb+pymysql://root@[::1]/orders_s0",
        "mysql+aiomysql://root@127.0.0.1/orders_s0",
    ]:
        assert same_database(base, make_url(same)), same
    for other in [
        "mysql+pymysql://root@127.0.0.1:3307/orders_s0",  # another server
        "mysql+pymysql://root@127.0.0.1/orders_s1",  # another database
        "mysql+pymysql://root@127.0.0.1/Orders_s0",  # case matters on Linux
        "mysql+pymysql://root@db0/orders_s0",  # not resolved
        "mysql+pymysql://root@localhost/orders_s0?unix_socket=/run/mysqld/other.sock",
    ]:
        assert not same_database(base, make_url(other)), other
    assert database_identity(make_url("sqlite://")) is None  # in memory: its own database
    assert not same_database(make_url("sqlite://"), make_url("sqlite://"))
    assert same_database(make_url("sqlite:///a/../b.db"), make_url("sqlite+pysqlite:///b.db"))


def test_a_primary_repointed_to_another_shards_former_replica_is_refused() -> None:
    """s1's replica R leaves s1 and becomes s0's primary in one push: R holds s1's rows."""
    old = mysql_document()
    replica = f"mysql+pymysql://ro:{SECRET}@db1r/orders_s1"
    old["shards"]["s1"]["replicas"] = [replica]
    new = copy.deepcopy(old)
    new["shards"]["s1"]["replicas"] = []
    new["shards"]["s0"]["primary"] = replica.replace("ro:", "app:")
    diff = diff_of(old, new)
    assert refused_lines(diff) == [
        "shards.s0.primary: mysql+pymysql://app:***@db1r/orders_s1 is shard s1's replica"
        " database in the current version"
    ]
    assert "take it out of s1 in one version and point s0 at it in the next" in (
        diff.refused[0].reason
    )
    assert_no_secret(diff)


def test_a_replica_moved_to_another_shard_in_one_push_is_refused_and_two_pushes_pass() -> None:
    old = mysql_document()
    replica = f"mysql+pymysql://ro:{SECRET}@db0r/orders_s0"
    old["shards"]["s0"]["replicas"] = [replica]
    moved = copy.deepcopy(old)
    moved["shards"]["s0"]["replicas"] = []
    moved["shards"]["s1"]["replicas"] = [replica]
    diff = diff_of(old, moved)
    assert refused_lines(diff) == [
        "shards.s1.replicas[0]: mysql+pymysql://ro:***@db0r/orders_s0 is shard s0's replica"
        " database in the current version"
    ]
    assert "replica reads of s1's keys would return s0's rows" in diff.refused[0].reason
    # The way out: out of s0 in one version (re-seed it), into s1 in the next.
    step1 = copy.deepcopy(old)
    step1["shards"]["s0"]["replicas"] = []
    assert diff_of(old, step1).safe
    assert diff_of(step1, moved).safe


def test_a_new_shard_in_a_database_another_shard_used_is_refused() -> None:
    """A new empty shard still takes broadcast writes and scatter reads: placed in the database
    of a shard the same push re-points elsewhere, scatters would read that shard's rows."""
    old = mysql_document()
    new = copy.deepcopy(old)
    s0_db = new["shards"]["s0"]["primary"]
    new["shards"]["s0"]["primary"] = f"mysql+pymysql://app:{SECRET}@db0-new/orders_s0"
    new["shards"]["s4"] = {"primary": s0_db, "slots": []}
    diff = diff_of(old, new)
    assert refused_lines(diff) == [
        "shards.s4.primary: mysql+pymysql://app:***@db0:3306/orders_s0 is shard s0's primary"
        " database in the current version"
    ]


def test_the_diff_itself_refuses_a_database_shared_within_the_new_version() -> None:
    """Config validation refuses a replica of another shard's database; the diff refuses it
    too for a model built without those checks (TopologyConfig.model_validate)."""
    old = mysql_document()
    new = copy.deepcopy(old)
    replica = f"mysql+pymysql://ro:{SECRET}@dbr/orders_x"
    new["shards"]["s1"]["replicas"] = [replica]
    new["shards"]["s0"]["primary"] = replica  # s0 re-pointed at s1's (new) replica
    new["shards"]["s2"]["replicas"] = [new["shards"]["s3"]["primary"]]
    diff = diff_topologies(config_from_dict(old, env={}), TopologyConfig.model_validate(new))
    assert refused_lines(diff) == [
        "shards.s0.primary: mysql+pymysql://ro:***@dbr/orders_x is also a replica of shard s1",
        "shards.s1.replicas[0]: mysql+pymysql://ro:***@dbr/orders_x is also shard s0's database",
        "shards.s2.replicas[0]: mysql+pymysql://app:***@db3:3306/orders_s3 is also shard s3's"
        " database",
    ]
    assert_no_secret(diff)


def test_a_failover_to_the_shards_own_replica_is_still_a_confirmed_failover() -> None:
    old = mysql_document()
    replica = f"mysql+pymysql://app:{SECRET}@db0r:3306/orders_s0"
    old["shards"]["s0"]["replicas"] = [replica]
    new = copy.deepcopy(old)
    new["shards"]["s0"]["primary"] = replica
    new["shards"]["s0"]["replicas"] = [old["shards"]["s0"]["primary"]]  # the old one demoted
    diff = diff_of(old, new)
    assert diff.safe, diff.problems()
    assert [c.kind for c in diff.confirmations] == [ChangeKind.PRIMARY_REPOINTED]


def test_a_primary_spelled_with_localhost_instead_of_127_0_0_1_is_the_same_database() -> None:
    old = mysql_document()
    old["shards"]["s0"]["primary"] = "mysql+pymysql://root@127.0.0.1:3306/orders_s0"
    new = copy.deepcopy(old)
    new["shards"]["s0"]["primary"] = "mysql+pymysql://root@localhost/orders_s0"
    diff = diff_of(old, new)
    assert [c.kind for c in diff.changes] == [ChangeKind.CONNECTION_SETTINGS]
    assert diff.safe and not diff.confirmations


def test_push_file_refuses_the_swap_and_writes_nothing(tmp_path: Path) -> None:
    raw = document(tmp_path)
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        store.push(raw, expected=None, comment="v1")
        swapped = copy.deepcopy(raw)
        s0, s1 = swapped["shards"]["s0"], swapped["shards"]["s1"]
        s0["primary"], s1["primary"] = s1["primary"], s0["primary"]
        path = tmp_path / "swapped.yaml"
        path.write_text(yaml.safe_dump(swapped))
        with pytest.raises(TopologyChangeError, match="`shardctl reshard`"):
            push_file(store, path, confirm=lambda plan: True)
        assert store.current_version() == 1


# -- 9: a replica that is another shard's database ---------------------------------------------


def test_push_refuses_a_replica_that_is_another_shards_primary(tmp_path: Path) -> None:
    """Review finding 9 (copied, adapted): s1 given s0's primary as a read replica passed
    config validation and the diff. It is now a ConfigError naming both shards (so a push,
    which validates the file first, refuses it)."""
    old = document(tmp_path)
    new = copy.deepcopy(old)
    new["shards"]["s1"]["replicas"] = [new["shards"]["s0"]["primary"]]
    with pytest.raises(ConfigError) as info:
        diff_topologies(config_from_dict(old), config_from_dict(new))
    (problem,) = info.value.problems
    assert problem == (
        f"shards.s1.replicas[0]: sqlite:///{tmp_path}/s0.db is shard s0's primary database:"
        " replica reads of s1's keys would return s0's rows; a replica of s1 must be a copy"
        " of s1's primary (remove it, or name a replica of s1)"
    )


def test_a_replica_shared_by_two_shards_is_a_config_error_naming_both() -> None:
    raw = mysql_document()
    raw["shards"]["s0"]["replicas"] = [f"mysql+pymysql://ro:{SECRET}@dbr/orders"]
    raw["shards"]["s2"]["replicas"] = [f"mysql+mysqldb://other:{SECRET}@DBR:3306/orders"]
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, env={})
    (problem,) = info.value.problems
    assert problem.startswith(
        "shards.s2.replicas[0]: mysql+mysqldb://other:***@DBR:3306/orders is also shard s0's"
        " replica (shards.s0.replicas[0]): one database cannot be a copy of both s0 and s2"
    )
    assert SECRET not in str(info.value)


def test_a_replica_on_a_loopback_spelling_of_another_shards_primary_is_refused() -> None:
    raw = mysql_document()
    raw["shards"]["s0"]["primary"] = "mysql+pymysql://root@127.0.0.1:3306/orders_s0"
    raw["shards"]["s1"]["replicas"] = ["mysql+pymysql://root@localhost/orders_s0"]
    with pytest.raises(ConfigError, match="is shard s0's primary database"):
        config_from_dict(raw, env={})


def test_a_shards_own_primary_listed_as_its_replica_stays_valid(tmp_path: Path) -> None:
    raw = document(tmp_path)
    raw["shards"]["s0"]["replicas"] = [raw["shards"]["s0"]["primary"]]
    assert config_from_dict(raw).shards["s0"].replicas


# -- drivers: a version no router could load is refused before it is written -----------------


@pytest.mark.parametrize(
    ("drivername", "expected"),
    [
        (
            "mysql+pymsql",
            "SQLAlchemy knows no driver 'mysql+pymsql' (a typo? write e.g. mysql+pymysql://,",
        ),
        (
            "mariadb+mariadbconnector",
            "driver mariadbconnector (mariadb+mariadbconnector) cannot be loaded on this host:"
            " No module named 'mariadb' (`pip install mariadb` here; every router needs it too)",
        ),
    ],
)
def test_push_refuses_a_driver_this_host_cannot_load(
    tmp_path: Path, drivername: str, expected: str
) -> None:
    raw = document(tmp_path)
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        store.push(raw, expected=None, comment="v1")
        new = copy.deepcopy(raw)
        new["shards"]["s2"]["replicas"] = [f"{drivername}://ro:{SECRET}@db2r/orders_s2"]
        path = tmp_path / "driver.yaml"
        path.write_text(yaml.safe_dump(new))
        with pytest.raises(ConfigError) as info:
            push_file(store, path)
        (problem,) = info.value.problems
        assert problem.startswith(f"shards.s2.replicas[0]: {expected}"), problem
        assert problem.endswith("; routers would reject this version")
        assert SECRET not in str(info.value)
        assert store.current_version() == 1
        done = CliRunner().invoke(main, ["topology", "push", "--json", "--yes", str(path)])
        assert done.exit_code == 1, done.output
        data = json.loads(done.stdout)
        assert data["ok"] is False and expected in data["error"]
        assert store.current_version() == 1


def test_a_bootstrap_push_checks_drivers_too(tmp_path: Path) -> None:
    raw = document(tmp_path)
    raw["shards"]["s1"]["primary"] = "mysql+mysqlconnector://app@db1/orders_s1"
    path = tmp_path / "first.yaml"
    path.write_text(yaml.safe_dump(raw))
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        with pytest.raises(ConfigError, match=r"pip install mysql-connector-python"):
            push_file(store, path)
        assert store.current_version() is None


def test_check_drivers_accepts_installed_drivers(tmp_path: Path) -> None:
    raw = document(tmp_path)
    raw["shards"]["s0"]["primary"] = "mysql+pymysql://app@db0/orders_s0"
    raw["shards"]["s1"]["primary"] = "mysql+aiomysql://app@db1/orders_s1"
    check_drivers(config_from_dict(raw))  # nothing raised


# -- shardctl route: by the store's current version ------------------------------------------


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def routed(tmp_path: Path) -> tuple[Path, MetaStore]:
    """A file (version 1 as written) and a store whose current version 2 adds a table
    `refunds` (sharded by user_id) and moves nothing."""
    raw = document(tmp_path)
    path = tmp_path / "orders.yaml"
    path.write_text(yaml.safe_dump(raw))
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    v2 = copy.deepcopy(raw)
    v2["tables"]["refunds"] = {"column": "user_id", "strategy": "hash"}
    store.push(v2, expected=1, comment="refunds")
    return path, store


def test_route_uses_the_stores_current_version(routed: tuple[Path, MetaStore]) -> None:
    path, store = routed
    try:
        done = run("route", "--config", str(path), "--table", "refunds", "--key", "user_id=42")
        assert done.exit_code == 0, done.output
        lines = done.stdout.splitlines()
        assert lines[0].startswith("topology        version 2 (current in meta store sqlite:///")
        assert "table           refunds" in lines
        args = ["--config", str(path), "--table", "refunds", "--key", "user_id=42"]
        data = json.loads(run("route", "--json", *args).stdout)
        assert data["topology"]["source"] == "meta_store"
        assert data["topology"]["version"] == 2
        assert data["table"] == "refunds" and data["shard"] in ("s0", "s1", "s2", "s3")
    finally:
        store.close()


def test_route_file_only_routes_by_the_file(routed: tuple[Path, MetaStore]) -> None:
    path, store = routed
    try:
        args = ["route", "--config", str(path), "--file-only", "--key", "user_id=42"]
        done = run(*args, "--table", "refunds")
        assert done.exit_code == 1 and "refunds" in done.output  # not in the file
        done = run(*args, "--table", "users", "--json")
        assert done.exit_code == 0, done.output
        data = json.loads(done.stdout)
        assert data["topology"] == {"source": "file", "version": None, "file": str(path)}
        done = run(*args, "--table", "users")
        assert done.stdout.splitlines()[0] == (
            f"topology        file {path} (--file-only: not the meta store's current version)"
        )
    finally:
        store.close()


def test_route_with_an_empty_or_missing_store_is_an_error(tmp_path: Path) -> None:
    raw = document(tmp_path)
    path = tmp_path / "orders.yaml"
    path.write_text(yaml.safe_dump(raw))
    args = ["route", "--config", str(path), "--table", "users", "--key", "user_id=1"]
    done = run(*args)  # the store file does not exist: not initialised
    assert done.exit_code == 1
    assert "--file-only" in done.output
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
    done = run(*args, "--json")
    assert done.exit_code == 1
    data = json.loads(done.stdout)
    assert data["ok"] is False and "has no version yet" in data["error"]
    assert "--file-only" in data["error"]


def test_route_without_meta_is_unchanged(tmp_path: Path) -> None:
    raw = document(tmp_path)
    del raw["meta"]
    path = tmp_path / "orders.yaml"
    path.write_text(yaml.safe_dump(raw))
    done = run("route", "--json", "--config", str(path), "--table", "users", "--key", "user_id=1")
    assert done.exit_code == 0, done.output
    assert "topology" not in json.loads(done.stdout)
