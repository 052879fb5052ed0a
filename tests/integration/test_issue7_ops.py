"""Issue 7, operations part, on real MariaDB shards: the XA decision survives a reordered
topology, and ``shardctl check lookups`` reports problems with clean errors and exit codes."""

from __future__ import annotations

import shlex
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import bindparam, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine import xa
from shardrouter.engine.router import Router

pytestmark = pytest.mark.mariadb


class _Crash(BaseException):
    """The coordinator process dies: nothing after this point of the commit runs."""


def _topology(raw: dict[str, Any], shard_order: list[str] | None = None) -> Topology:
    shards = raw["shards"]
    order = shard_order or list(shards)
    config = dict(raw, shards={name: shards[name] for name in order})
    return Topology(config_from_dict(config, env={}))


@pytest.fixture(scope="module")
def xa_raw(shard_databases: Path) -> Iterator[dict[str, Any]]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"] = {"xa_rows": {"column": "user_id", "strategy": "hash"}}
    with Router(_topology(raw)) as router:
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                conn.execute(
                    text(
                        "CREATE TABLE IF NOT EXISTS xa_rows"
                        " (id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL)"
                    )
                )
    yield raw


def _users_on_two_shards(topology: Topology, start: int) -> tuple[int, int]:
    a = start
    b = next(
        u
        for u in range(start + 1, start + 500)
        if topology.shard_for("xa_rows", u) != topology.shard_for("xa_rows", a)
    )
    return a, b


def _rows(router: Router, ids: list[int]) -> int:
    total = 0
    for engine in router.engines.primaries.values():
        with engine.connect() as conn:
            total += int(
                conn.execute(
                    text("SELECT COUNT(*) FROM xa_rows WHERE id IN :ids").bindparams(
                        bindparam("ids", expanding=True)
                    ),
                    {"ids": ids},
                ).scalar_one()
            )
    return total


@pytest.mark.parametrize("reorder", ["reversed", "rotated"])
def test_xa_decision_survives_reordered_shards(
    xa_raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch, reorder: str
) -> None:
    """Defect 3: commit via XA, the coordinator dies right after recording its decision, the
    shards are listed in another order, recovery runs: the committed rows are there."""
    names = list(xa_raw["shards"])
    topology = _topology(xa_raw)
    start = 1000 if reorder == "reversed" else 2000
    a, b = _users_on_two_shards(topology, start)
    ids = [start * 10 + 1, start * 10 + 2]

    def commit_then_die(branches: Any, gtrid: str, coordinator: Any) -> None:
        # xa.commit's first phase and decision, then the process dies: its connections go
        # with it and the branches stay prepared on the shards.
        first = next(iter(branches))
        for shard, conn in branches.items():
            conn.exec_driver_sql(f"XA END '{xa.xid(gtrid, shard, first)}'")
            conn.exec_driver_sql(f"XA PREPARE '{xa.xid(gtrid, shard, first)}'")
        xa.record_decision(coordinator, gtrid)
        for conn in branches.values():
            conn.invalidate()
        raise _Crash

    monkeypatch.setattr(xa, "commit", commit_then_die)
    with Router(topology, xa=True) as router, pytest.raises(_Crash), router.transaction() as tx:
        tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (:i, :u)", {"i": ids[0], "u": a})
        tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (:i, :u)", {"i": ids[1], "u": b})
    monkeypatch.undo()
    order = names[::-1] if reorder == "reversed" else names[1:] + names[:1]
    with Router(_topology(xa_raw, order)) as later:
        assert _rows(later, ids) == 0  # prepared, not committed yet
        report = later.recover_xa(min_age_s=0)
        assert not report.rolled_back, report
        assert len(report.committed) == 2, report
        assert _rows(later, ids) == 2  # the committed transaction is committed
        again = later.recover_xa(min_age_s=0)
        assert not (again.committed or again.rolled_back or again.in_doubt), again


def test_xa_branch_whose_decider_is_missing_stays_prepared(
    xa_raw: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Recovery that cannot ask the decider (gone from the topology, or down) must not guess:
    the branch stays prepared, reported in doubt, and a later full recovery commits it."""
    topology = _topology(xa_raw)
    a, b = _users_on_two_shards(topology, 3000)
    ids = [30001, 30002]
    decider = topology.shard_for("xa_rows", a)  # the first statement's shard decides

    def commit_then_die(branches: Any, gtrid: str, engine: Any) -> None:
        first = next(iter(branches))
        for shard, conn in branches.items():
            conn.exec_driver_sql(f"XA END '{xa.xid(gtrid, shard, first)}'")
            conn.exec_driver_sql(f"XA PREPARE '{xa.xid(gtrid, shard, first)}'")
        xa.record_decision(engine, gtrid)
        for conn in branches.values():
            conn.invalidate()
        raise _Crash

    monkeypatch.setattr(xa, "commit", commit_then_die)
    with Router(topology, xa=True) as router:
        with pytest.raises(_Crash), router.transaction() as tx:
            tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (:i, :u)", {"i": ids[0], "u": a})
            tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (:i, :u)", {"i": ids[1], "u": b})
        monkeypatch.undo()
        without = {s: e for s, e in router.engines.primaries.items() if s != decider}
        partial = xa.recover(without, min_age_s=0)
        assert not partial.committed and not partial.rolled_back, partial
        assert len(partial.in_doubt) == 1 and f".{decider}" in partial.in_doubt[0], partial
        full = router.recover_xa(min_age_s=0)
        assert len(full.committed) == 2 and not full.rolled_back, full
        assert _rows(router, ids) == 2


def test_xa_commit_records_the_decision_on_the_first_branch(xa_raw: dict[str, Any]) -> None:
    """A normal XA commit across two shards: both rows land, no decision row is left."""
    topology = _topology(xa_raw, list(xa_raw["shards"])[::-1])
    a, b = _users_on_two_shards(topology, 4000)
    with Router(topology, xa=True) as router:
        with router.transaction() as tx:
            tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (40001, :u)", {"u": a})
            tx.execute("INSERT INTO xa_rows (id, user_id) VALUES (40002, :u)", {"u": b})
        assert _rows(router, [40001, 40002]) == 2
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                conn.exec_driver_sql(xa._CREATE)  # absent on a shard that never decided
                left = conn.execute(text(f"SELECT COUNT(*) FROM {xa.OUTCOMES}")).scalar_one()
            assert left == 0


# -- defect 24: shardctl check lookups -------------------------------------------------------


def _write(tmp_path: Path, raw: dict[str, Any], name: str) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _check(path: Path, *extra: str) -> Any:
    from click.testing import CliRunner

    from shardrouter.cli import main

    return CliRunner().invoke(main, ["check", "lookups", "--config", str(path), *extra])


@pytest.fixture(scope="module")
def orders_raw(shard_databases: Path) -> dict[str, Any]:
    """The shipped order tables on this module's (schema-less) shard databases."""
    return dict(yaml.safe_load(shard_databases.read_text()))


def test_check_lookups_with_a_shard_down_is_one_line_and_exit_3(
    orders_raw: dict[str, Any], tmp_path: Path, scratch_port: int
) -> None:
    from sqlalchemy.engine import make_url

    raw = yaml.safe_load(yaml.safe_dump(orders_raw))
    s1 = make_url(raw["shards"]["s1"]["primary"])
    raw["shards"]["s1"]["primary"] = s1.set(port=scratch_port + 40).render_as_string(False)
    path = _write(tmp_path, raw, "down")
    result = _check(path)
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output and "sqlalchemy" not in result.output.lower()
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "shard s1" in lines[0] and "does not answer" in lines[0] and "2003" in lines[0]
    as_json = _check(path, "--json")
    assert as_json.exit_code == 3
    data = __import__("json").loads(as_json.stdout)
    assert data["ok"] is False and "shard s1" in data["error"]


def test_check_lookups_with_schema_missing_is_one_line_and_exit_3(
    orders_raw: dict[str, Any], tmp_path: Path
) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    raw = yaml.safe_load(yaml.safe_dump(orders_raw))
    servers = []
    for shard in raw["shards"].values():  # empty databases of this test's own
        url = make_url(shard["primary"])
        database = f"{url.database}_noschema"
        server = create_engine(url.set(database=""))
        with server.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
            conn.execute(text(f"CREATE DATABASE `{database}`"))
        servers.append((server, database))
        shard["primary"] = url.set(database=database).render_as_string(False)
    path = _write(tmp_path, raw, "noschema")
    try:
        result = _check(path)
    finally:
        for server, database in servers:
            with server.begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
            server.dispose()
    assert result.exit_code == 3, result.output
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "1146" in lines[0] and "doesn't exist" in lines[0] and "schema apply" in lines[0]


def test_check_lookups_exit_status_reports_orphans_and_fix_clears_them(
    orders_raw: dict[str, Any], tmp_path: Path
) -> None:
    from click.testing import CliRunner

    from shardrouter.cli import main

    path = _write(tmp_path, orders_raw, "orders")
    applied = CliRunner().invoke(main, ["schema", "apply", "--config", str(path), "--json"])
    assert applied.exit_code == 0, applied.output
    clean = _check(path)
    assert clean.exit_code == 0, clean.output
    with Router.load(path) as router:
        topology = router.topology
        slot = topology.slot_for("merchant_orders", 4242)
        with router.engines.primary(topology.shard_of_slot(slot)).begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {topology.table('merchant_orders').physical(slot)}"
                    " (merchant_id, order_id, user_id) VALUES (4242, 99, 77)"
                )
            )
    found = _check(path)
    assert found.exit_code == 1, found.output  # was 0: orphans did not fail the check
    assert "1 orphans" in found.stdout and "orphan lookup row (4242, 77, 99)" in found.stdout
    as_json = _check(path, "--json")
    assert as_json.exit_code == 1
    fixed = _check(path, "--fix", "--grace", "0")
    assert fixed.exit_code == 0, fixed.output
    assert _check(path).exit_code == 0


# -- defect 26: README blocks that need MariaDB ----------------------------------------------


def _readme() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "unit" / "test_readme.py"
    spec = importlib.util.spec_from_file_location("readme_blocks", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(240)
def test_readme_blocks_run_on_mariadb(
    orders_raw: dict[str, Any],
    sandbox: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The README's MariaDB tour as a reader runs it: `.sandbox/topology.yaml` is this module's
    databases on the session sandbox (what `shardctl sandbox up --shards 4 --dir .sandbox`
    writes, on SHARDROUTER_SANDBOX_PORT), and every block runs as written, in order."""
    from click.testing import CliRunner

    from shardrouter.cli import main

    readme = _readme()
    repo = Path(readme.REPO)
    assert len(sandbox.shards) == 4  # the sandbox the README's `sandbox up --shards 4` starts
    (tmp_path / ".sandbox").mkdir()
    _write(tmp_path / ".sandbox", orders_raw, "topology")
    (tmp_path / "config").symlink_to(repo / "config")
    monkeypatch.chdir(tmp_path)
    ran = []
    for b in readme.readme_blocks():
        if b.lang not in ("bash", "console"):
            continue
        for command, _ in readme.shell_commands(b):
            if readme.COMMANDS.get(command) == readme.INTEGRATION and "schema" in command:
                result = CliRunner().invoke(main, shlex.split(command)[1:])
                assert result.exit_code == 0, (command, result.output)
                ran.append(command)
    # A module of its own, as a reader's script would be: SQLAlchemy resolves the ORM block's
    # annotations in the module its classes are defined in.
    tour = types.ModuleType("readme_tour")
    monkeypatch.setitem(sys.modules, "readme_tour", tour)
    namespace: dict[str, Any] = tour.__dict__
    for first in (
        "from shardrouter import Topology",
        "from sqlalchemy import text",
        "import datetime as dt",
    ):
        code = readme.block(first).code
        exec(compile(code, f"README block {first!r}", "exec"), namespace)
        if readme.BLOCKS[first] == readme.INTEGRATION:  # the quickstart is the unit test's
            ran.append(first)
    # What the comments say holds.
    assert namespace["page"].scatter is True
    assert namespace["order"].order_id == namespace["orm_order_id"]
    assert 1 <= len(namespace["top"]) <= 5
    for b in readme.readme_blocks():
        if b.lang != "console":
            continue
        for command, _ in readme.shell_commands(b):
            if readme.COMMANDS.get(command) == readme.INTEGRATION:
                result = CliRunner().invoke(main, shlex.split(command)[1:])
                assert result.exit_code == 0, (command, result.output)
                ran.append(command)
    claimed = [c for c, v in readme.COMMANDS.items() if v == readme.INTEGRATION]
    claimed += [k for k, v in readme.BLOCKS.items() if v == readme.INTEGRATION]
    assert sorted(claimed) == sorted(ran)
