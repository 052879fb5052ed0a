"""README tells the truth: every fenced block in it runs, here or in a named test.

Each block is claimed by its first line (``BLOCKS``), and each shell command in a bash or
console block by its text (``COMMANDS``). A block or command nobody claims fails
``test_every_block_and_command_is_claimed``: nothing is skipped silently. Blocks that need
MariaDB (the statements tour, the ORM, ``schema apply``, ``check lookups``) run in
tests/integration/test_issue7_ops.py::test_readme_blocks_run_on_mariadb against the session
sandbox; the rest run here.
"""

from __future__ import annotations

import re
import shlex
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shardrouter.cli import main

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
INTEGRATION = "tests/integration/test_issue7_ops.py::test_readme_blocks_run_on_mariadb"
CONTROL = "tests/integration/test_control_cli.py::test_readme_control_plane_commands"
RESHARD = "tests/integration/test_reshard_readme.py::test_readme_reshard_guide_runs_as_written"
LOADTEST = "tests/integration/test_loadtest.py"
ORDER_SERVICE_FIRST = "import sys"
"""The first line of the order-service block (run here on SQLite, and on MariaDB by
tests/integration/test_order_service.py::test_the_readme_block_runs_on_mariadb)."""


@dataclass(frozen=True)
class Block:
    lang: str
    code: str
    line: int

    @property
    def first(self) -> str:
        return self.code.splitlines()[0].strip() if self.code.strip() else ""


def readme_blocks() -> list[Block]:
    text = README.read_text(encoding="utf-8")
    out = []
    for m in re.finditer(r"^```(\w*)\n(.*?)^```$", text, re.S | re.M):
        out.append(Block(m.group(1), m.group(2), text.count("\n", 0, m.start()) + 1))
    return out


def block(first_line: str) -> Block:
    (found,) = [b for b in readme_blocks() if b.first == first_line]
    return found


def shell_commands(b: Block) -> list[tuple[str, list[str]]]:
    """(command, expected output lines) of a bash or console block; comments stripped,
    ``\\`` continuations joined, ``&&`` chains split."""
    lines = b.code.replace("\\\n", " ").splitlines()
    out: list[tuple[str, list[str]]] = []
    for raw in lines:
        if b.lang == "console" and not raw.startswith("$ "):
            out[-1][1].append(raw)
            continue
        line = raw[2:] if b.lang == "console" else raw
        line = re.sub(r"\s+#.*$", "", line).strip()
        out += [(" ".join(part.split()), []) for part in line.split("&&") if part.strip()]
    return out


# The first line of every block -> where it runs.
BLOCKS = {
    "pip install -e '.[dev]' && shardctl demo     # the tour, on SQLite shard files: no server"
    " needed": "commands",
    "from shardrouter import Topology": "test_quickstart_block_runs_and_its_comments_hold",
    "shardctl sandbox up --shards 4 --dir .sandbox              # 4 mariadbd +"
    " .sandbox/topology.yaml": "commands",
    "from sqlalchemy import text": INTEGRATION,
    "import datetime as dt": INTEGRATION,
    "loadtest/run --config .sandbox/topology.yaml --reset -u 20 -t 30s   # a running cluster"
    " (--reset empties its order tables)": "commands",
    "$ shardctl route --config config/orders.yaml --table orders --key user_id=42": "commands",
    "slots: 1024                     # power of two, fixed for the life of the cluster": (
        "test_topology_block_is_a_valid_config"
    ),
    "SHARDROUTER_FUZZ_EXAMPLES=5000 python3 -m pytest tests/fuzz -q   # more statements than CI": (
        "commands"
    ),
    "from shardrouter.control.leases import WorkerLease": "test_lease_block_runs_on_sqlite",
    ORDER_SERVICE_FIRST: "test_order_service_block_runs_on_sqlite",
    "# bad.yaml": "test_bad_yaml_block_gives_the_problems_shown",
    "meta:": "test_meta_block_is_a_valid_meta_section",
    "from shardrouter import Router": "test_follow_block_runs_on_sqlite",
    "shardctl meta init --config orders.yaml                 # create the store's tables"
    " (idempotent)": "commands",
    "$ shardctl config validate bad.yaml": "test_bad_yaml_block_gives_the_problems_shown",
    "shardctl demo --reshard      # 2 -> 4 shards on a sandbox it starts and stops, a writer"
    " running": "commands",
    "shardctl reshard plan --config orders.yaml --to orders-4.yaml   # the moves, stored;"
    " nothing runs": "commands",
    "$ shardctl reshard status --config orders.yaml": "commands",
    "orders.user_id: value 'abc' is not an integer (strategy hash expects int); pass the row's"
    " user_id as an integer (or a string of its decimal digits)": "test_error_block_is_the_real_message",
}

# Every shell command -> "run" (test_shell_commands_run_as_written runs it here),
# INTEGRATION, or "<file>::<test>" that runs the same command (checked to exist).
COMMANDS = {
    "pip install -e '.[dev]'": "tests/unit/test_readme.py::test_install_command_matches_setup",
    "shardctl demo": "run",
    "tools/test": "tests/unit/test_readme.py::test_readme_names_the_test_command_that_ci_runs",
    "shardctl sandbox up --shards 4 --dir .sandbox": (
        "tests/integration/test_sandbox.py::test_cli_up_status_down"
    ),
    "shardctl schema apply --config .sandbox/topology.yaml": INTEGRATION,
    # loadtest/run and Locust: the same commands, shorter and on other ports, in LOADTEST
    "loadtest/run --config .sandbox/topology.yaml --reset -u 20 -t 30s": (
        f"{LOADTEST}::test_a_run_on_a_running_cluster_reports_and_checks_its_ledger"
    ),
    "loadtest/run --compare --mix keyed --no-lookups -u 16 -t 60s": (
        f"{LOADTEST}::test_compare_without_lookups_with_two_locust_processes"
    ),
    "loadtest/run --reshard -u 16 --rate 25 -t 90s": (
        f"{LOADTEST}::test_reshard_under_load_loses_nothing"
    ),
    "python3 loadtest/ledger.py loadtest/results/RUN/router --config .sandbox/topology.yaml": (
        f"{LOADTEST}::test_the_ledger_check_fails_for_each_lost_or_wrong_write"
    ),
    "LOADTEST_TOPOLOGY=.sandbox/topology.yaml locust -f loadtest/locustfile.py --headless -u 20"
    " -t 30s": f"{LOADTEST}::test_the_locustfile_runs_by_hand",
    "shardctl route --config config/orders.yaml --table orders --key user_id=42": "run",
    "shardctl ids new --config config/orders.yaml --table orders --key user_id=42 --count 2"
    " --json": "run",
    "shardctl ids decode 251023518008758272 --config config/orders.yaml": "run",
    "shardctl config validate config/orders.yaml": "run",
    "shardctl bench": "run",
    "shardctl check lookups --config .sandbox/topology.yaml": INTEGRATION,
    "SHARDROUTER_FUZZ_EXAMPLES=5000 python3 -m pytest tests/fuzz -q": (
        "tests/unit/test_readme.py::test_fuzz_pytest_command_is_the_ci_module_with_its_count"
    ),
    "tools/fuzz --statements 100000 --out fuzz.json": (
        "tests/integration/test_issue7_r3_ops.py::test_readme_fuzz_command_runs"
    ),
    "shardctl meta init --config orders.yaml": CONTROL,
    'shardctl topology push orders.yaml --comment "first version"': CONTROL,
    "shardctl topology push orders-v2.yaml --dry-run": CONTROL,
    'shardctl topology push orders-v2.yaml --comment "replica for s0"': CONTROL,
    "shardctl topology status --config orders.yaml": CONTROL,
    "shardctl topology history --config orders.yaml": CONTROL,
    "shardctl topology show 1 --config orders.yaml": CONTROL,
    "shardctl topology diff 1 2 --config orders.yaml": CONTROL,
    "shardctl demo --reshard": (
        "tests/integration/test_reshard_demo.py::test_demo_reshard_splits_with_writes_and_loses_nothing"
    ),
    "shardctl reshard plan --config orders.yaml --to orders-4.yaml": RESHARD,
    "shardctl reshard start --config orders.yaml": RESHARD,
    "shardctl reshard copy --config orders.yaml": RESHARD,
    "shardctl reshard verify --config orders.yaml": RESHARD,
    "shardctl reshard switch-reads --shadow --percent 10 --seconds 2 --config orders.yaml": RESHARD,
    "shardctl reshard switch --config orders.yaml": RESHARD,
    "shardctl reshard status --config orders.yaml": RESHARD,
    "shardctl reshard finalize --yes --config orders.yaml": RESHARD,
    "shardctl sandbox down --dir .sandbox": (
        "tests/integration/test_sandbox.py::test_cli_up_status_down"
    ),
}


def _test_exists(ref: str) -> bool:
    path, _, name = ref.partition("::")
    return f"def {name}(" in (REPO / path).read_text(encoding="utf-8")


def test_every_block_and_command_is_claimed() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 10
    for b in blocks:
        assert b.first in BLOCKS, f"README line {b.line}: block {b.first!r} is run by no test"
        claim = BLOCKS[b.first]
        if claim == INTEGRATION:
            assert _test_exists(claim), claim
        elif claim != "commands":
            assert claim in globals(), claim
        if b.lang in ("bash", "console"):
            for command, _ in shell_commands(b):
                if b.first == "$ shardctl config validate bad.yaml":
                    continue  # run by its own test with the bad.yaml block
                assert command in COMMANDS, f"README line {b.line}: {command!r} is run by no test"
    for command, claim in COMMANDS.items():
        assert claim == "run" or _test_exists(claim), (command, claim)
    claimed = {c for b in blocks if b.lang in ("bash", "console") for c, _ in shell_commands(b)}
    assert set(COMMANDS) <= claimed, set(COMMANDS) - claimed  # no stale claims


def test_quickstart_block_runs_and_its_comments_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    namespace: dict[str, object] = {}
    exec(compile(block("from shardrouter import Topology").code, "README", "exec"), namespace)
    topology = namespace["topology"]
    route = namespace["route"]
    assert topology.shard_for("orders", 42) == "s2"  # type: ignore[attr-defined]
    assert (f"{route.keyspace_id:016x}", route.slot, route.physical_table) == (  # type: ignore[attr-defined]
        "b942d776d0f5e66d",
        741,
        "orders_0001",
    )
    order_id = namespace["order_id"]
    assert topology.shard_for("orders", order_id, "order_id") == "s2"  # type: ignore[attr-defined]
    assert namespace["ids"].decode(order_id).slot == 741  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_lease_block_runs_on_sqlite(tmp_path: Path) -> None:
    """The worker-lease block, on the SQLite topology with a meta store in a temporary file."""
    from shardrouter.control.leases import worker_leases
    from shardrouter.control.store import MetaStore
    from shardrouter.core.topology import Topology

    raw = yaml.safe_load((REPO / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw["meta"] = {"url": f"sqlite:///{tmp_path / 'meta.db'}"}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    topology = Topology.load(path, {"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    assert topology.config.meta is not None
    with MetaStore.from_config(topology.config.meta) as store:
        store.init()
        namespace: dict[str, object] = {"topology": topology}
        code = block("from shardrouter.control.leases import WorkerLease").code
        exec(compile(code, "README", "exec"), namespace)
        decoded = namespace["ids"].decode(namespace["order_id"])  # type: ignore[attr-defined]
        assert (decoded.worker, decoded.slot) == (0, 741)
        (row,) = worker_leases(store)
        assert row.worker_id == 0 and row.holder is None  # leased, then released by close()


@pytest.mark.timeout(60)
def test_follow_block_runs_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The follow block, as written, in a folder holding orders.yaml (the SQLite topology with
    a meta store) and orders-v2.yaml (the same with a new, empty shard s4)."""
    from shardrouter.control.store import MetaStore

    raw = yaml.safe_load((REPO / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw["meta"] = {"url": "sqlite:///meta.db", "poll_interval_s": 0.1, "lease_s": 2.0}
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SHARDROUTER_DEMO_DIR", str(tmp_path))
    Path("orders.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    raw["shards"]["s4"] = {"primary": f"sqlite:///{tmp_path}/orders_s4.db", "slots": []}
    Path("orders-v2.yaml").write_text(yaml.safe_dump(raw), encoding="utf-8")
    with MetaStore("sqlite:///meta.db") as store:
        store.init()
        store.push(yaml.safe_load(Path("orders.yaml").read_text()), expected=None)
    namespace: dict[str, object] = {}
    code = block("from shardrouter import Router").code
    exec(compile(code, "README", "exec"), namespace)
    report, router = namespace["report"], namespace["router"]
    assert report.complete and len(report.acked) == 1  # type: ignore[attr-defined]
    assert router.version == 2 and "s4" in router.topology.shards  # type: ignore[attr-defined]
    with MetaStore("sqlite:///meta.db") as store:
        assert store.routers() == []  # close() deregistered


@pytest.mark.timeout(60)
def test_order_service_block_runs_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The order-service block, as written from the repository, on the SQLite topology."""
    from shardrouter.core.topology import Topology
    from shardrouter.engine.engines import ShardEngines
    from shardrouter.engine.router import Router
    from shardrouter.ops.schema import apply

    topology = Topology.load(
        REPO / "config" / "orders-sqlite.yaml", {"SHARDROUTER_DEMO_DIR": str(tmp_path)}
    )
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(sys, "path", list(sys.path))  # the block's insert undone
    router = Router(topology)
    namespace: dict[str, object] = {"router": router}
    try:
        exec(compile(block(ORDER_SERVICE_FIRST).code, "README", "exec"), namespace)
        order_id = namespace["order_id"]
        assert namespace["paid"] == (True, False)
        page = namespace["page"]
        assert [o.order_id for o in page.orders] == [order_id]  # type: ignore[attr-defined]
        assert page.after is None  # type: ignore[attr-defined]
        assert namespace["orders"].count_by_status() == {"paid": 1}  # type: ignore[attr-defined]
    finally:
        router.close()


@pytest.mark.timeout(120)
def test_shell_commands_run_as_written(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Every command claimed "run" runs here through the CLI (in the repository, as a reader
    would) and prints what the README shows, where it shows output."""
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # `shardctl demo`'s folder
    ran = 0
    for b in readme_blocks():
        if b.lang not in ("bash", "console"):
            continue
        for command, expected in shell_commands(b):
            if COMMANDS.get(command) != "run":
                continue
            argv = shlex.split(command)
            assert argv[0] == "shardctl", command
            result = CliRunner().invoke(main, argv[1:])
            assert result.exit_code == 0, (command, result.output)
            if expected:
                assert result.stdout.splitlines() == expected, command
            ran += 1
    assert ran == sum(1 for v in COMMANDS.values() if v == "run")


def test_install_command_matches_setup() -> None:
    """`pip install -e '.[dev]'` installs the dev extra and the shardctl command (the install
    itself is what tools/test and CI do)."""
    setup = (REPO / "setup.cfg").read_text(encoding="utf-8")
    assert re.search(r"^dev =", setup, re.M)
    assert "shardctl = shardrouter.cli:main" in setup
    assert "pip install" in (REPO / "tools" / "test").read_text(encoding="utf-8")


def test_readme_names_the_test_command_that_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "tools/test" in README.read_text() and "tools/test" in ci


def test_topology_block_is_a_valid_config() -> None:
    from shardrouter.core.config import config_from_dict

    raw = yaml.safe_load(block(next(k for k in BLOCKS if k.startswith("slots: 1024"))).code)
    model = config_from_dict(raw, env={"DB_PASSWORD": "pw"})
    assert sorted(model.shards) == ["s0", "s1"]
    assert "pw" not in repr(model)


def test_meta_block_is_a_valid_meta_section() -> None:
    from shardrouter.core.config import config_from_dict

    raw = yaml.safe_load((REPO / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw.update(yaml.safe_load(block("meta:").code))
    model = config_from_dict(raw, env={"META_PASSWORD": "pw-meta"})
    assert model.meta is not None and model.meta.poll_interval_s == 1.0
    assert model.meta.url.database == "shardmeta"
    assert "pw-meta" not in repr(model)


def test_bad_yaml_block_gives_the_problems_shown(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    (tmp_path / "bad.yaml").write_text(block("# bad.yaml").code, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    console = block("$ shardctl config validate bad.yaml")
    ((command, expected),) = shell_commands(console)
    result = CliRunner().invoke(main, shlex.split(command)[1:])
    assert result.exit_code == 1
    assert result.stderr.splitlines() == expected


def test_error_block_is_the_real_message() -> None:
    from shardrouter.core.topology import Topology
    from shardrouter.errors import KeyValueError

    expected = next(k for k, v in BLOCKS.items() if v == "test_error_block_is_the_real_message")
    topology = Topology.load(REPO / "config" / "orders.yaml")
    with pytest.raises(KeyValueError) as info:
        topology.shard_for("orders", "abc")
    assert str(info.value) == expected


def test_fuzz_pytest_command_is_the_ci_module_with_its_count() -> None:
    """`SHARDROUTER_FUZZ_EXAMPLES=N python3 -m pytest tests/fuzz` runs the CI fuzz module (what
    tools/test runs, since pytest's testpaths include tests/fuzz) with N statements instead of
    the default: the variable is the module's bound and the default is the README's."""
    module = (REPO / "tests" / "fuzz" / "test_differential.py").read_text(encoding="utf-8")
    assert 'int(os.environ.get("SHARDROUTER_FUZZ_EXAMPLES", "1500"))' in module
    assert "max_examples=EXAMPLES" in module
    assert "default 1500" in README.read_text(encoding="utf-8")
    pyproject = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'testpaths = ["tests"]' in pyproject
