"""shardctl through click's CliRunner: exit codes, human and JSON output, error messages."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from shardrouter.cli import main
from shardrouter.core.topology import Topology

REPO = Path(__file__).resolve().parents[2]
ORDERS_YAML = str(REPO / "config" / "orders.yaml")
ORDERS_SQLITE_YAML = str(REPO / "config" / "orders-sqlite.yaml")
NO_ENV = {"SHARDROUTER_DB_PASSWORD": None, "SHARDROUTER_DEMO_DIR": None}


def run(*args: str, env: dict[str, str | None] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env={**NO_ENV, **(env or {})})


def run_json(*args: str) -> Any:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


BAD_CONFIG = """\
slots: 1000
shards:
  s0:
    primary: "postgresql://app:s3cr3t-cli@db/orders"
    slots: [[0, 1000]]
tables:
  orders: {column: user_id, strategy: hsah}
"""

BAD_CONFIG_PROBLEMS = [
    "slots: 1000 is not a power of two in [1, 65536]",
    "shards.s0.primary: backend 'postgresql' in 'postgresql://app:***@db/orders' is not supported",
    "tables.orders.strategy: unknown 'hsah' (did you mean 'hash'?",
]


@pytest.fixture
def bad_config(tmp_path: Path) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(BAD_CONFIG, encoding="utf-8")
    return str(path)


# -- config validate ------------------------------------------------------------------------


def test_config_validate_valid() -> None:
    result = run("config", "validate", ORDERS_YAML)
    assert result.exit_code == 0, result.output
    assert result.stdout == (
        f"{ORDERS_YAML}: valid (topology 'orders' v1: 1024 slots, 4 shards, 6 tables)\n"
    )


def test_config_validate_valid_json() -> None:
    data = run_json("config", "validate", ORDERS_YAML)
    assert data == {
        "ok": True,
        "file": ORDERS_YAML,
        "valid": True,
        "problems": [],
        "name": "orders",
        "version": 1,
        "slots": 1024,
        "shards": 4,
        "tables": 6,
    }


def test_config_validate_invalid_prints_every_problem(bad_config: str) -> None:
    result = run("config", "validate", bad_config)
    assert result.exit_code == 1
    assert f"invalid topology config {bad_config} (3 problems)" in result.stderr
    for problem in BAD_CONFIG_PROBLEMS:
        assert problem in result.stderr
    assert "s3cr3t-cli" not in result.output
    assert "valid (" not in result.stdout


def test_config_validate_invalid_json(bad_config: str) -> None:
    result = run("config", "validate", bad_config, "--json")
    assert result.exit_code == 1
    data = json.loads(result.stdout)
    assert data["valid"] is False and data["file"] == bad_config
    assert data["ok"] is False and data["exit_code"] == 1 and "3 problems" in data["error"]
    assert len(data["problems"]) == 3
    for expected, problem in zip(BAD_CONFIG_PROBLEMS, data["problems"], strict=True):
        assert problem.startswith(expected)
    assert "s3cr3t-cli" not in result.output


def test_config_validate_sqlite_config_as_shipped_and_with_its_env(tmp_path: Path) -> None:
    shipped = run("config", "validate", ORDERS_SQLITE_YAML)  # no SHARDROUTER_DEMO_DIR
    assert shipped.exit_code == 0, shipped.output
    ok = run("config", "validate", ORDERS_SQLITE_YAML, env={"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    assert ok.exit_code == 0, ok.output
    assert "valid (topology 'orders' v1" in ok.stdout


def test_config_validate_missing_file(tmp_path: Path) -> None:
    result = run("config", "validate", str(tmp_path / "nope.yaml"))
    assert result.exit_code == 1
    assert "cannot read the file" in result.stderr


# -- route ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "key", "column", "value"),
    [
        pytest.param("orders", "user_id=42", "user_id", 42, id="orders-user-42"),
        pytest.param("orders", "user_id=-1", "user_id", -1, id="negative-user"),
        pytest.param("order_items", "user_id=1001", "user_id", 1001, id="bound-table"),
        pytest.param("user_emails", "email=ada@example.com", "email", "ada@example.com", id="str"),
        pytest.param("users", "user_id=18446744073709551615", "user_id", 2**64 - 1, id="u64-max"),
    ],
)
def test_route_json_matches_topology(
    orders_topology: Topology, table: str, key: str, column: str, value: Any
) -> None:
    data = run_json("route", "--config", ORDERS_YAML, "--table", table, "--key", key)
    expected = orders_topology.route(table, column, value)
    assert data == expected.as_dict()
    assert set(data) >= {
        "table",
        "column",
        "value",
        "strategy",
        "keyspace_id",
        "slot",
        "shard",
        "physical_table",
    }
    assert re.fullmatch(r"[0-9a-f]{16}", data["keyspace_id"])
    assert data["slot"] == int(data["keyspace_id"], 16) >> 54
    assert data["shard"] == orders_topology.shard_of_slot(data["slot"])


def test_route_human_output() -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=42")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert "keyspace_id     b942d776d0f5e66d" in lines
    assert "slot            741" in lines
    assert "shard           s2" in lines
    assert "physical_table  orders_0001" in lines


def test_route_lookup_column(orders_topology: Topology) -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "orders", "--key", "merchant_id=7")
    assert result.exit_code == 0, result.output
    via = orders_topology.route("merchant_orders", "merchant_id", 7)
    assert f"via lookup      merchant_orders (slot {via.slot}, shard {via.shard}," in result.stdout
    data = run_json("route", "--config", ORDERS_YAML, "--table", "orders", "--key", "merchant_id=7")
    assert data["via"]["table"] == "merchant_orders" and data["shard"] is None


def test_route_bad_key_value_is_a_usage_error() -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=abc")
    assert result.exit_code == 2
    assert "orders.user_id: 'abc' is not an integer (the column is declared int)" in result.stderr
    assert "--key" in result.stderr


@pytest.mark.parametrize(
    ("key", "message"),
    [
        pytest.param("user_id", "'user_id' is not COL=VALUE (e.g. user_id=42)", id="no-equals"),
        pytest.param("=42", "'=42' is not COL=VALUE", id="no-column"),
        pytest.param("user_id=", "'' is not an integer", id="empty-value"),
        pytest.param("user_id=4.2", "'4.2' is not an integer", id="float-value"),
    ],
)
def test_route_malformed_key(key: str, message: str) -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "orders", "--key", key)
    assert result.exit_code == 2
    assert message in result.stderr


def test_route_unknown_table_lists_known_tables() -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "ordrs", "--key", "user_id=1")
    assert result.exit_code == 1
    assert result.stderr == (
        "Error: table 'ordrs' is not in topology 'orders' (known: countries, merchant_orders,"
        " order_items, orders, user_emails, users)\n"
    )


def test_route_unknown_column_lists_sharding_columns() -> None:
    result = run("route", "--config", ORDERS_YAML, "--table", "orders", "--key", "amount=1")
    assert result.exit_code == 1
    assert "(sharding columns: user_id, order_id, merchant_id)" in result.stderr


def test_route_with_invalid_config(bad_config: str) -> None:
    result = run("route", "--config", bad_config, "--table", "orders", "--key", "user_id=1")
    assert result.exit_code == 1
    assert "unknown 'hsah'" in result.stderr
    assert "Traceback" not in result.output and "s3cr3t-cli" not in result.output


# -- ids ------------------------------------------------------------------------------------


def test_ids_new_json(orders_topology: Topology) -> None:
    data = run_json(
        "ids", "new", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=42",
        "--count", "5",
    )  # fmt: skip
    ids = data["ids"]
    assert len(ids) == 5 and len(set(ids)) == 5
    user_shard = orders_topology.shard_for("users", 42)
    assert data["shard"] == user_shard and data["slot"] == orders_topology.slot_for("users", 42)
    assert data["key"] == {"user_id": 42} and data["table"] == "orders"
    for id_ in ids:
        assert orders_topology.shard_for("orders", id_, "order_id") == user_shard
        assert orders_topology.id_layout.decode(id_).worker == 0


def test_ids_new_text_and_worker(orders_topology: Topology) -> None:
    result = run(
        "ids", "new", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=7",
        "--count", "3", "--worker", "9",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ids = [int(line) for line in result.stdout.splitlines()]
    assert len(set(ids)) == 3
    assert {orders_topology.id_layout.decode(i).worker for i in ids} == {9}
    slot = orders_topology.slot_for("users", 7)
    assert f"# slot {slot}, shard {orders_topology.shard_of_slot(slot)}" in result.stderr


def test_ids_new_bad_worker() -> None:
    result = run(
        "ids", "new", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=7",
        "--worker", "256",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "worker_id 256 is outside [0, 256)" in result.stderr


def test_ids_decode_round_trip(orders_topology: Topology) -> None:
    new = run_json(
        "ids", "new", "--config", ORDERS_YAML, "--table", "orders", "--key", "user_id=1001",
        "--count", "2",
    )  # fmt: skip
    for id_ in new["ids"]:
        data = run_json("ids", "decode", str(id_), "--config", ORDERS_YAML)
        d = orders_topology.id_layout.decode(id_)
        assert data == {
            "id": id_,
            "timestamp_ms": d.timestamp_ms,
            "time": d.time.isoformat(),
            "slot": new["slot"],
            "shard": new["shard"],
            "worker": 0,
            "sequence": d.sequence,
        }


def test_ids_decode_human() -> None:
    result = run("ids", "decode", "12345678901234", "--config", ORDERS_YAML)
    assert result.exit_code == 0, result.output
    assert "slot          226" in result.stdout and "shard         s0" in result.stdout


@pytest.mark.parametrize(
    ("text", "code", "message"),
    [
        pytest.param("abc", 2, "'abc' is not an integer id", id="not-a-number"),
        pytest.param(str(2**63), 1, "is not a shardrouter id", id="too-wide"),
    ],
)
def test_ids_decode_refuses(text: str, code: int, message: str) -> None:
    result = run("ids", "decode", text, "--config", ORDERS_YAML)
    assert result.exit_code == code
    assert message in result.stderr


# -- demo and bench -------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_demo(tmp_path: Path) -> None:
    import sqlite3

    from shardrouter.core.topology import Topology
    from shardrouter.ops.demo import DEMO_USERS

    result = run("demo", "--dir", str(tmp_path))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for shard, keyrange in (("s0", "-40"), ("s1", "40-80"), ("s2", "80-c0"), ("s3", "c0-")):
        assert f"  {shard}: slots " in out and f"(Vitess {keyrange})" in out
    assert "  total: 10 orders for 5 users [every shard]" in out
    # The control plane on a SQLite meta store: v1 published, a router following it picks up
    # v2 (a new, empty shard) and acknowledges it; moving slots to the new shard is refused.
    assert "  published v1 from topology-v1.yaml" in out
    assert (
        "acknowledged by 1 router(s)" in out and "now serves v2, shards s0, s1, s2, s3, s4" in out
    )
    assert "move from s3 to s4" in out and "shardctl reshard" in out
    from shardrouter.control.store import MetaStore

    with MetaStore(f"sqlite:///{tmp_path / 'meta.db'}") as store:
        assert [v.version for v in store.history()] == [2, 1]  # the refused v3 wrote nothing
        assert store.routers() == []  # the demo's router deregistered
    assert "via lookup" in out  # merchant and email reads went through their lookup tables
    pages = re.findall(r"^  page \d: users \[([\d, ]*)\]$", out, re.MULTILINE)
    paged = [int(u) for page in pages for u in page.split(", ") if u]
    assert sorted(paged) == sorted(u for u, _ in DEMO_USERS)  # merchant 500 has one order each
    # Every order sits in the shard file and split table its user routes to, nowhere else.
    topology = Topology.load(
        Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml",
        {"SHARDROUTER_DEMO_DIR": str(tmp_path)},
    )
    for shard in topology.shards:
        with sqlite3.connect(tmp_path / f"orders_{shard}.db") as db:
            for table in topology.table("orders").physical_names:
                users = {u for (u,) in db.execute(f"SELECT user_id FROM {table}")}
                expected = {
                    u
                    for u, _ in DEMO_USERS
                    if topology.route("orders", "user_id", u).physical_table == table
                    and topology.shard_for("orders", u) == shard
                }
                assert users == expected, (shard, table)
    shard_files = [f"orders_s{i}.db" for i in range(5)]  # s4: the control plane's new shard
    assert sorted(p.name for p in tmp_path.glob("*.db")) == ["meta.db", *shard_files]


def test_demo_runs_twice_in_the_same_folder(tmp_path: Path) -> None:
    assert run("demo", "--dir", str(tmp_path)).exit_code == 0
    again = run("demo", "--dir", str(tmp_path))
    assert again.exit_code == 0, again.output
    assert "  total: 10 orders for 5 users" in again.stdout


@pytest.mark.timeout(60)
def test_bench_prints_positive_rates() -> None:
    result = run("bench", "-n", "2000", "--repeat", "1")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["n_per_run"] == 2000 and data["best_of"] == 1
    rates = {**data["routes_per_s"], **data["ids_per_s"]}
    assert set(rates) == {
        "hash_shard_for",
        "gene_shard_for",
        "hash_slot_only",
        "next_for_slot",
        "next_id_by_key",
        "batch_per_ms",
    }
    assert all(isinstance(v, int) and v > 0 for v in rates.values()), rates
    assert data["id_layout"]["bits"] == {"timestamp": 41, "gene": 10, "worker": 8, "sequence": 4}
    assert data["batch_size"] == 16  # one millisecond's per-slot sequence


def test_bench_refuses_too_few_ops() -> None:
    result = run("bench", "-n", "10")
    assert result.exit_code == 2
    assert "10 is not in the range x>=1000" in result.stderr
