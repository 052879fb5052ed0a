"""The MariaDB sandbox against real mariadbd processes: start, reuse, crash, restart, stop."""

from __future__ import annotations

import itertools
import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import create_engine, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.pool import NullPool

from shardrouter.cli.sandbox import sandbox as sandbox_cli
from shardrouter.errors import PortInUseError, SandboxError, ServerBinaryMissingError
from shardrouter.ops import sandbox as sb

pytestmark = pytest.mark.mariadb


def scalar(url: str, sql: str) -> object:
    engine = create_engine(url, poolclass=NullPool, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as conn:
            return conn.execute(text(sql)).scalar_one()
    finally:
        engine.dispose()


def execute(url: str, *statements: str) -> None:
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.begin() as conn:
            for sql in statements:
                conn.execute(text(sql))
    finally:
        engine.dispose()


@pytest.fixture
def listener() -> Iterator[int]:
    """A port held by a plain socket that is not a sandbox server."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


# --------------------------------------------------------------------------- the session sandbox


def test_every_shard_answers_on_its_url_with_its_database(sandbox: sb.Sandbox) -> None:
    assert [s.name for s in sandbox.shards] == ["s0", "s1", "s2", "s3"]
    base = sandbox.shards[0].port
    assert [s.port for s in sandbox.shards] == [base, base + 1, base + 2, base + 3]
    for shard in sandbox.shards:
        assert shard.url == f"mysql+pymysql://root@127.0.0.1:{shard.port}/orders_{shard.name}"
        assert scalar(shard.url, "SELECT 1") == 1
        assert scalar(shard.url, "SELECT DATABASE()") == f"orders_{shard.name}"
        assert scalar(shard.url, "SELECT @@port") == shard.port
        assert str(scalar(shard.url, "SELECT @@datadir")).rstrip("/") == str(shard.datadir)
        assert sb.is_running(shard)
        assert shard.socket.is_socket()


def test_topology_spreads_all_slots_contiguously(sandbox: sb.Sandbox) -> None:
    doc = yaml.safe_load(sandbox.topology_path.read_text())
    template = yaml.safe_load(sb.DEFAULT_TEMPLATE.read_text())
    assert list(doc["shards"]) == ["s0", "s1", "s2", "s3"]
    ranges = [tuple(r) for spec in doc["shards"].values() for r in spec["slots"]]
    assert ranges == [(0, 256), (256, 512), (512, 768), (768, 1024)]
    for shard in sandbox.shards:
        assert doc["shards"][shard.name]["primary"] == shard.url
    # Everything but the shards is the template's, in the template's order.
    assert list(doc) == list(template)
    assert {k: v for k, v in doc.items() if k != "shards"} == {
        k: v for k, v in template.items() if k != "shards"
    }


def test_status_reports_the_session_sandbox(sandbox: sb.Sandbox) -> None:
    assert sb.status(sandbox.directory) == sandbox


def test_up_again_reuses_the_running_servers(sandbox: sb.Sandbox) -> None:
    again = sb.up(sandbox.directory, shards=4, base_port=sandbox.shards[0].port)
    assert [s.pid for s in again.shards] == [s.pid for s in sandbox.shards]
    assert again == sandbox
    assert all(sb.is_running(s) for s in again.shards)


def test_up_with_another_shape_on_a_used_directory_is_refused(sandbox: sb.Sandbox) -> None:
    with pytest.raises(SandboxError, match="sandbox down") as info:
        sb.up(sandbox.directory, shards=2, base_port=sandbox.shards[0].port)
    assert "4 shard(s)" in str(info.value)
    assert sb.status(sandbox.directory) == sandbox  # untouched


def test_slot_ranges_spread_the_remainder_over_the_first_shards() -> None:
    assert sb.slot_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert sb.slot_ranges(1024, 1) == [(0, 1024)]
    ranges = sb.slot_ranges(1024, 7)
    assert ranges[0][0] == 0 and ranges[-1][1] == 1024
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert sorted({end - start for start, end in ranges}) == [146, 147]


# --------------------------------------------------------------------------- refusals


def test_down_without_a_sandbox_returns_nothing(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("not the sandbox's")
    assert sb.down(tmp_path) == []
    assert sb.down(tmp_path / "missing") == []
    assert (tmp_path / "keep.txt").read_text() == "not the sandbox's"
    assert not (tmp_path / "missing").exists()
    assert sb.status(tmp_path) is None


def test_port_taken_by_another_process(listener: int, scratch_dir: Path) -> None:
    with pytest.raises(PortInUseError) as info:
        sb.up(scratch_dir, shards=1, base_port=listener)
    message = str(info.value)
    assert str(listener) in message
    assert "--base-port" in message
    assert not scratch_dir.exists()  # nothing created


def test_second_port_taken_starts_nothing(scratch_dir: Path, scratch_port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT of earlier tests
        sock.bind(("127.0.0.1", scratch_port + 1))
        sock.listen()
        with pytest.raises(PortInUseError, match=str(scratch_port + 1)):
            sb.up(scratch_dir, shards=2, base_port=scratch_port)
    assert sb.status(scratch_dir) is None
    assert not scratch_dir.exists()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:  # s0's port stayed free
        assert probe.connect_ex(("127.0.0.1", scratch_port)) != 0


def test_missing_server_binary(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, scratch_dir: Path, scratch_port: int
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setattr(sb, "_bin_search_path", lambda: str(empty))
    with pytest.raises(ServerBinaryMissingError) as info:
        sb.up(scratch_dir, shards=1, base_port=scratch_port)
    assert isinstance(info.value, SandboxError)
    assert "mariadbd" in str(info.value)
    assert "apt-get install -y mariadb-server" in str(info.value)
    assert not scratch_dir.exists()


def test_missing_template_is_named(tmp_path: Path, scratch_dir: Path, scratch_port: int) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(SandboxError, match=r"nope\.yaml"):
        sb.up(scratch_dir, shards=1, base_port=scratch_port, template=missing)
    assert not scratch_dir.exists()


def test_shard_failing_to_start_stops_the_others(scratch_dir: Path, scratch_port: int) -> None:
    # s1's datadir holds a corrupt system table: s0 starts, s1 dies, and up must undo s0.
    bad = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    sb.kill_shard(bad, "s1")
    (bad.shard("s1").datadir / "mysql" / "db.MAI").write_bytes(b"\0" * 8192)
    (bad.shard("s1").datadir / "mysql" / "db.MAD").write_bytes(b"garbage")
    sb.kill_shard(bad, "s0")
    s0_pid_before = bad.shard("s0").pid
    with pytest.raises(SandboxError, match="s1") as info:
        sb.up(scratch_dir, shards=2, base_port=scratch_port)
    assert "error.log" in str(info.value)
    current = sb.status(scratch_dir)
    assert current is not None and current.shard("s0").pid == s0_pid_before  # state restored
    assert not any(sb.is_running(s) for s in current.shards)
    with pytest.raises(OperationalError):
        scalar(bad.shard("s0").url, "SELECT 1")


# --------------------------------------------------------------------------- crash and restart


def test_kill_and_restart_a_shard_keeps_committed_rows(
    scratch_dir: Path, scratch_port: int
) -> None:
    box = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    s0, s1 = box.shards
    execute(
        s1.url,
        "CREATE TABLE t (id INT PRIMARY KEY, v VARCHAR(20))",
        "INSERT INTO t VALUES (1, 'before crash')",
    )

    sb.kill_shard(box, "s1")
    assert not sb.is_running(s1)
    with pytest.raises(OperationalError):
        scalar(s1.url, "SELECT 1")
    assert scalar(s0.url, "SELECT 1") == 1  # the other shard is unaffected

    restarted = sb.start_shard(box, "s1")
    assert restarted.pid != s1.pid
    assert (restarted.port, restarted.datadir, restarted.url) == (s1.port, s1.datadir, s1.url)
    assert scalar(s1.url, "SELECT v FROM t WHERE id = 1") == "before crash"
    current = sb.status(scratch_dir)
    assert current is not None and current.shard("s1").pid == restarted.pid
    assert sb.start_shard(box, "s1") == restarted  # already running: unchanged

    assert sorted(sb.down(scratch_dir)) == ["s0", "s1"]
    assert not sb.is_running(restarted) and not sb.is_running(s0)
    assert not scratch_dir.exists()


def test_up_restarts_a_recorded_shard_whose_process_died(
    scratch_dir: Path, scratch_port: int
) -> None:
    box = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    execute(
        box.shards[0].url, "CREATE TABLE kept (id INT PRIMARY KEY)", "INSERT INTO kept VALUES (7)"
    )
    sb.kill_shard(box, "s0")
    again = sb.up(scratch_dir, shards=2, base_port=scratch_port)
    assert again.shard("s1").pid == box.shard("s1").pid  # alive: kept
    assert again.shard("s0").pid != box.shard("s0").pid  # dead: restarted on its datadir
    assert scalar(again.shard("s0").url, "SELECT id FROM kept") == 7


def test_kill_unknown_shard_names_the_known_ones(scratch_dir: Path, scratch_port: int) -> None:
    box = sb.up(scratch_dir, shards=1, base_port=scratch_port)
    with pytest.raises(SandboxError, match="s0"):
        sb.kill_shard(box, "s9")
    assert sb.is_running(box.shards[0])


# --------------------------------------------------------------------------- CLI


def test_cli_up_status_down(tmp_path: Path, scratch_dir: Path, scratch_port: int) -> None:
    template = tmp_path / "small.yaml"
    template.write_text("name: small\nslots: 10\nshards: {}\ntables: {t: {column: id}}\n")
    runner = CliRunner()
    args = ["--dir", str(scratch_dir)]

    result = runner.invoke(
        sandbox_cli,
        [
            "up",
            "--shards",
            "3",
            "--base-port",
            str(scratch_port),
            "--template",
            str(template),
            "--json",
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["directory"] == str(scratch_dir)
    assert [s["name"] for s in payload["shards"]] == ["s0", "s1", "s2"]
    assert set(payload["shards"][0]) == {"name", "port", "url", "socket", "datadir", "pid"}
    for shard in payload["shards"]:
        assert scalar(shard["url"], "SELECT DATABASE()") == f"orders_{shard['name']}"
    topology = yaml.safe_load(Path(payload["topology"]).read_text())
    assert topology["name"] == "small" and topology["tables"] == {"t": {"column": "id"}}
    assert [spec["slots"] for spec in topology["shards"].values()] == [
        [[0, 4]],
        [[4, 7]],
        [[7, 10]],
    ]

    result = runner.invoke(sandbox_cli, ["status", "--json", *args])
    assert result.exit_code == 0, result.output
    assert [s["running"] for s in json.loads(result.stdout)["shards"]] == [True] * 3

    result = runner.invoke(sandbox_cli, ["status", *args])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("running") == 3 and str(scratch_port + 2) in result.stdout

    result = runner.invoke(
        sandbox_cli,
        [
            "up",
            "--shards",
            "3",
            "--base-port",
            str(scratch_port),
            "--template",
            str(template),
            *args,
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith(f"s0  port {scratch_port}  mysql+pymysql://")
    assert "topology: " in result.stdout

    result = runner.invoke(sandbox_cli, ["down", "--json", *args])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["stopped"] == ["s0", "s1", "s2"]

    result = runner.invoke(sandbox_cli, ["status", *args])
    assert result.exit_code == 0 and "no sandbox" in result.stdout


def test_cli_port_in_use_is_a_clean_error(listener: int, scratch_dir: Path) -> None:
    result = CliRunner().invoke(
        sandbox_cli,
        ["up", "--shards", "1", "--base-port", str(listener), "--dir", str(scratch_dir)],
    )
    assert result.exit_code == 1
    assert f"port {listener}" in result.stderr and "--base-port" in result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.output
