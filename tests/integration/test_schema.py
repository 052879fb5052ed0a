"""Migrations on real MariaDB shards: every physical table on every shard, idempotent re-runs,
resumed versions, and shards that fail on their own while the others are migrated.

Each test migrates databases of its own on the session's servers (schema_it_sN, schema_test_*),
never the shared orders_sN databases that other integration tests create and drop tables in.
"""

from __future__ import annotations

import itertools
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pymysql
import pytest
import yaml
from click.testing import CliRunner
from sqlalchemy import Engine, event, inspect, text
from sqlalchemy.engine import make_url

from shardrouter.cli.schema_cmd import schema
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import (
    DEFAULT_DIRECTORY,
    VERSION_TABLE,
    ApplyReport,
    apply,
    load_migrations,
    render,
    status,
)
from shardrouter.types import ShardId

pytestmark = pytest.mark.mariadb

SHARDS = [ShardId(f"s{i}") for i in range(4)]
PHYSICAL = {
    "users": ["users"],
    "orders": [f"orders_{i:04d}" for i in range(4)],
    "order_items": [f"order_items_{i:04d}" for i in range(4)],
    "merchant_orders": ["merchant_orders"],
    "user_emails": ["user_emails"],
    "countries": ["countries"],
}
ALL_PHYSICAL = sorted(name for names in PHYSICAL.values() for name in names)
COLUMNS = {  # information_schema.columns: name, column_type, nullable, default
    "users": [
        ("user_id", "bigint(20)", "NO", None),
        ("email", "varchar(255)", "NO", None),
        ("name", "varchar(255)", "YES", "NULL"),
        ("created_at", "datetime(3)", "NO", "current_timestamp(3)"),
    ],
    "orders": [
        ("order_id", "bigint(20)", "NO", None),
        ("user_id", "bigint(20)", "NO", None),
        ("merchant_id", "bigint(20)", "NO", None),
        ("status", "varchar(16)", "NO", None),
        ("amount_cents", "bigint(20)", "NO", None),
        ("created_at", "datetime(3)", "NO", None),
    ],
    "order_items": [
        ("order_id", "bigint(20)", "NO", None),
        ("line", "int(11)", "NO", None),
        ("user_id", "bigint(20)", "NO", None),
        ("sku", "varchar(64)", "NO", None),
        ("qty", "int(11)", "NO", None),
        ("price_cents", "bigint(20)", "NO", None),
    ],
    "merchant_orders": [
        ("merchant_id", "bigint(20)", "NO", None),
        ("order_id", "bigint(20)", "NO", None),
        ("user_id", "bigint(20)", "NO", None),
        ("created_at", "datetime(3)", "NO", "current_timestamp(3)"),
    ],
    "user_emails": [
        ("email", "varchar(255)", "NO", None),
        ("user_id", "bigint(20)", "NO", None),
    ],
    "countries": [("code", "char(2)", "NO", None), ("name", "varchar(64)", "NO", None)],
}
PRIMARY_KEYS = {
    "users": ["user_id"],
    "orders": ["order_id"],
    "order_items": ["order_id", "line"],
    "merchant_orders": ["merchant_id", "order_id"],
    "user_emails": ["email"],
    "countries": ["code"],
}
INDEXES = {
    "orders": {
        "idx_user_created": ["user_id", "created_at"],
        "idx_merchant_created": ["merchant_id", "created_at"],
    },
    "order_items": {"idx_user": ["user_id"]},
}

_numbers = itertools.count()


def _admin(port: int) -> pymysql.connections.Connection:
    return pymysql.connect(host="127.0.0.1", port=port, user="root", password="", autocommit=True)


def _raw_topology(sandbox: Any, prefix: str) -> dict[str, Any]:
    """The sandbox topology with every shard pointing at database ``{prefix}_{shard}``."""
    raw: dict[str, Any] = yaml.safe_load(Path(sandbox.topology_path).read_text(encoding="utf-8"))
    for sid, shard in raw["shards"].items():
        url = make_url(shard["primary"]).set(database=f"{prefix}_{sid}")
        shard["primary"] = url.render_as_string(hide_password=False)
    return raw


@pytest.fixture
def databases(sandbox: Any) -> Iterator[Callable[[str], dict[str, Any]]]:
    """``make(prefix)`` creates database ``{prefix}_sN`` on shard sN's server and returns the
    raw topology pointing at them; every database made is dropped after the test."""
    made: list[tuple[int, str]] = []

    def make(prefix: str) -> dict[str, Any]:
        prefix = f"{prefix}_{next(_numbers)}"
        for shard in sandbox.shards:
            name = f"{prefix}_{shard.name}"
            conn = _admin(shard.port)
            try:
                with conn.cursor() as cur:
                    cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
                    cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            finally:
                conn.close()
            made.append((shard.port, name))
        return _raw_topology(sandbox, prefix)

    yield make
    for port, name in made:
        conn = _admin(port)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
        finally:
            conn.close()


@pytest.fixture(scope="module")
def migrated(sandbox: Any) -> Iterator[tuple[Topology, ShardEngines, ApplyReport]]:
    """schema_it_sN on the four sandbox servers with the repository's migrations applied."""
    ports = {shard.name: shard.port for shard in sandbox.shards}
    for sid, port in ports.items():
        conn = _admin(port)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS schema_it_{sid}")
                cur.execute(f"CREATE DATABASE schema_it_{sid} CHARACTER SET utf8mb4")
        finally:
            conn.close()
    topology = Topology(config_from_dict(_raw_topology(sandbox, "schema_it")))
    engines = ShardEngines(topology)
    report = apply(topology, engines)
    yield topology, engines, report
    engines.dispose()
    for sid, port in ports.items():
        conn = _admin(port)
        try:
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS schema_it_{sid}")
        finally:
            conn.close()


def _record(engines: ShardEngines) -> tuple[list[str], Callable[[], None]]:
    """Record every statement the shards' engines send; returns (statements, stop)."""
    statements: list[str] = []
    lock = threading.Lock()

    def before(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        with lock:
            statements.append(statement)

    targets: list[Engine] = list(engines.primaries.values())
    for engine in targets:
        event.listen(engine, "before_cursor_execute", before)

    def stop() -> None:
        for engine in targets:
            event.remove(engine, "before_cursor_execute", before)

    return statements, stop


# -- the shared migrated databases ----------------------------------------------------------------


def test_apply_migrates_every_shard(migrated: tuple[Topology, ShardEngines, ApplyReport]) -> None:
    _, _, report = migrated
    assert report.ok
    assert [(s.shard, s.applied, s.skipped, s.error) for s in report.shards] == [
        (sid, (1,), (), None) for sid in SHARDS
    ]


@pytest.mark.parametrize("shard", SHARDS)
def test_every_physical_table_has_its_columns_and_indexes(
    migrated: tuple[Topology, ShardEngines, ApplyReport], shard: ShardId
) -> None:
    _, engines, _ = migrated
    with engines.primary(shard).connect() as conn:
        inspector = inspect(conn)
        assert sorted(inspector.get_table_names()) == sorted([*ALL_PHYSICAL, VERSION_TABLE])
        for logical, names in PHYSICAL.items():
            for name in names:
                columns = conn.execute(
                    text(
                        "SELECT column_name, column_type, is_nullable, column_default"
                        " FROM information_schema.columns"
                        " WHERE table_schema = DATABASE() AND table_name = :t"
                        " ORDER BY ordinal_position"
                    ),
                    {"t": name},
                ).all()
                assert [tuple(c) for c in columns] == COLUMNS[logical], name
                pk = inspector.get_pk_constraint(name)["constrained_columns"]
                assert pk == PRIMARY_KEYS[logical], name
                indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes(name)}
                assert indexes == INDEXES.get(logical, {}), name
        options = conn.execute(
            text(
                "SELECT DISTINCT engine, table_collation FROM information_schema.tables"
                " WHERE table_schema = DATABASE()"
            )
        ).all()
        assert len(options) == 1
        assert options[0][0] == "InnoDB" and options[0][1].startswith("utf8mb4_")


def test_no_auto_increment_anywhere(migrated: tuple[Topology, ShardEngines, ApplyReport]) -> None:
    _, engines, _ = migrated
    for shard in SHARDS:
        with engines.primary(shard).connect() as conn:
            extra = conn.execute(
                text(
                    "SELECT COUNT(*) FROM information_schema.columns"
                    " WHERE table_schema = DATABASE() AND extra LIKE '%auto_increment%'"
                )
            ).scalar_one()
            assert extra == 0


def test_second_apply_runs_no_ddl(migrated: tuple[Topology, ShardEngines, ApplyReport]) -> None:
    topology, engines, _ = migrated
    statements, stop = _record(engines)
    calls: list[tuple[str, int, str]] = []
    try:
        again = apply(topology, engines, progress=lambda *call: calls.append(call))
    finally:
        stop()
    assert again.ok
    assert [(s.applied, s.skipped) for s in again.shards] == [((), (1,))] * 4
    assert sorted(calls) == [(sid, 1, "skipped") for sid in SHARDS]
    ddl = [s for s in statements if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))]
    assert ddl == []


def test_status_reports_the_version(migrated: tuple[Topology, ShardEngines, ApplyReport]) -> None:
    topology, engines, _ = migrated
    assert status(topology, engines) == {sid: [1] for sid in SHARDS}
    with engines.primary(SHARDS[0]).connect() as conn:
        row = conn.execute(text(f"SELECT version, name, checksum FROM {VERSION_TABLE}")).one()
    assert tuple(row) == (1, "0001_orders.sql", load_migrations()[0].checksum)


def test_rows_fit_the_schema(migrated: tuple[Topology, ShardEngines, ApplyReport]) -> None:
    topology, engines, _ = migrated
    slot = topology.slot_for("users", 42)
    shard = topology.shard_of_slot(slot)
    orders = topology.table("orders").physical(slot)
    with engines.primary(shard).begin() as conn:
        conn.execute(text("INSERT INTO users (user_id, email) VALUES (42, 'ada@example.com')"))
        conn.execute(
            text(
                f"INSERT INTO {orders} (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (1, 42, 7, 'new', 1000, '2025-01-01 00:00:00.123')"
            )
        )
        conn.execute(
            text("INSERT INTO merchant_orders (merchant_id, user_id, order_id) VALUES (7, 42, 1)")
        )
        created = conn.execute(text(f"SELECT created_at FROM {orders}")).scalar_one()
        assert created.microsecond == 123000
        conn.execute(text(f"DELETE FROM {orders}"))
        conn.execute(text("DELETE FROM users"))
        conn.execute(text("DELETE FROM merchant_orders"))


# -- throwaway databases: failures, resumes, concurrency --------------------------------------------


def test_conflicting_table_fails_its_shard_and_the_others_succeed(
    databases: Callable[[str], dict[str, Any]],
) -> None:
    raw = databases("schema_test")
    topology = Topology(config_from_dict(raw))
    engines = ShardEngines(topology)
    try:
        with engines.primary(SHARDS[2]).begin() as conn:
            conn.execute(text("CREATE TABLE orders_0001 (order_id BIGINT PRIMARY KEY, note TEXT)"))
        report = apply(topology, engines)
        assert [s.shard for s in report.failed] == ["s2"]
        error = report.shard("s2").error
        assert error is not None and error.version == 1 and not error.unavailable
        assert error.message.startswith(
            "0001_orders.sql creates table orders_0001, which exists already without user_id,"
        )
        assert error.statement is not None
        assert error.statement.startswith("CREATE TABLE IF NOT EXISTS orders_0001 (")
        for sid in ("s0", "s1", "s3"):
            assert report.shard(sid).applied == (1,)
        assert status(topology, engines) == {"s0": [1], "s1": [1], "s2": [], "s3": [1]}
        # s2 got users and orders_0000 before it stopped; the fix and a re-run complete it
        with engines.primary(SHARDS[2]).begin() as conn:
            conn.execute(text("DROP TABLE orders_0001"))
        again = apply(topology, engines)
        assert again.ok
        assert [(s.shard, s.applied) for s in again.shards if s.applied] == [("s2", (1,))]
        assert status(topology, engines) == {sid: [1] for sid in SHARDS}
    finally:
        engines.dispose()


def test_statement_the_server_refuses_is_reported_with_its_error(
    databases: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    directory.mkdir()
    (directory / "0001_orders.sql").write_bytes(
        (DEFAULT_DIRECTORY / "0001_orders.sql").read_bytes()
    )
    (directory / "0002_broken.sql").write_text(
        "ALTER TABLE orders ADD COLUMN note VARCHAR(200) NULL;\n"
        "CREATE INDEX idx_channel ON orders (channel);\n",
        encoding="utf-8",
    )
    topology = Topology(config_from_dict(databases("schema_test")))
    engines = ShardEngines(topology)
    try:
        report = apply(topology, engines, load_migrations(directory))
        assert [s.shard for s in report.failed] == SHARDS
        for shard in report.shards:
            assert shard.applied == (1,)
            assert shard.error is not None
            assert (shard.error.version, shard.error.code) == (
                2,
                1072,
            )  # ER_KEY_COLUMN_DOES_NOT_EXITS
            assert "Key column 'channel' doesn't exist in table" in shard.error.message
            assert shard.error.statement == "CREATE INDEX idx_channel ON orders_0000(channel)"
        assert status(topology, engines) == {sid: [1] for sid in SHARDS}
        # the fixed file: the column added by the failed run is kept, not added twice
        (directory / "0002_broken.sql").write_text(
            "ALTER TABLE orders ADD COLUMN note VARCHAR(200) NULL;\n"
            "CREATE INDEX idx_note ON orders (note);\n",
            encoding="utf-8",
        )
        fixed = apply(topology, engines, load_migrations(directory))
        assert fixed.ok and [s.applied for s in fixed.shards] == [(2,)] * 4
        with engines.primary(SHARDS[1]).connect() as conn:
            indexes = {i["name"] for i in inspect(conn).get_indexes("orders_0003")}
        assert "idx_note" in indexes
    finally:
        engines.dispose()


EVERY_KIND = """\
ALTER TABLE orders ADD COLUMN channel VARCHAR(16) NULL AFTER status,
  ADD UNIQUE KEY uq_user_order (user_id, order_id);
CREATE INDEX idx_status ON orders (status, created_at);
ALTER TABLE order_items MODIFY COLUMN sku VARCHAR(128) NOT NULL;
ALTER TABLE users RENAME COLUMN name TO full_name;
DROP INDEX idx_user ON order_items;
ALTER TABLE countries ADD COLUMN region VARCHAR(32) NULL, DROP COLUMN name;
DROP TABLE user_emails;
"""


def test_every_kind_of_statement_runs_once_and_reruns_safely(
    databases: Callable[[str], dict[str, Any]], tmp_path: Path
) -> None:
    directory = tmp_path / "migrations"
    directory.mkdir()
    (directory / "0001_orders.sql").write_bytes(
        (DEFAULT_DIRECTORY / "0001_orders.sql").read_bytes()
    )
    (directory / "0002_every_kind.sql").write_text(EVERY_KIND, encoding="utf-8")
    topology = Topology(config_from_dict(databases("schema_test")))
    engines = ShardEngines(topology)
    try:
        first = apply(topology, engines, load_migrations(directory))
        assert first.ok and [s.applied for s in first.shards] == [(1, 2)] * 4
        with engines.primary(SHARDS[3]).connect() as conn:
            inspector = inspect(conn)
            orders = {i["name"]: i for i in inspector.get_indexes("orders_0002")}
            assert orders["uq_user_order"]["unique"]
            assert orders["idx_status"]["column_names"] == ["status", "created_at"]
            assert "channel" in [c["name"] for c in inspector.get_columns("orders_0002")]
            assert inspector.get_indexes("order_items_0001") == []
            assert [c["name"] for c in inspector.get_columns("users")][2] == "full_name"
            assert [c["name"] for c in inspector.get_columns("countries")] == ["code", "region"]
            assert "user_emails" not in inspector.get_table_names()
        # as if every shard crashed after the statements of version 2, before recording it
        for engine in engines.primaries.values():
            with engine.begin() as conn:
                conn.execute(text(f"DELETE FROM {VERSION_TABLE} WHERE version = 2"))
        recorded, stop = _record(engines)
        try:
            again = apply(topology, engines, load_migrations(directory))
        finally:
            stop()
        assert again.ok and [s.applied for s in again.shards] == [(2,)] * 4
        ddl = [s for s in recorded if s.lstrip().upper().startswith(("CREATE", "ALTER", "DROP"))]
        # only MODIFY, which has nothing to look for and is safe to repeat, runs again
        assert sorted(ddl) == [
            f"ALTER TABLE order_items_{i:04d} MODIFY COLUMN sku VARCHAR(128) NOT NULL"
            for i in range(4)
            for _ in SHARDS
        ]
        # a statement half in place was not done by us: refused, naming what is there
        with engines.primary(SHARDS[0]).begin() as conn:
            conn.execute(text(f"DELETE FROM {VERSION_TABLE} WHERE version = 2"))
            conn.execute(text("ALTER TABLE orders_0003 DROP COLUMN channel"))
        partial = apply(topology, engines, load_migrations(directory))
        assert [s.shard for s in partial.failed] == ["s0"]
        error = partial.shard("s0").error
        assert error is not None and error.version == 2
        assert error.message.startswith(
            "0002_every_kind.sql on orders_0003 is partly in place already"
            " (index uq_user_order exists) although the version is not recorded"
        )
        assert error.statement is not None and error.statement.startswith("ALTER TABLE orders_0003")
    finally:
        engines.dispose()


def test_interrupted_version_resumes(databases: Callable[[str], dict[str, Any]]) -> None:
    """MySQL DDL commits statement by statement: a crash midway leaves part of a version,
    which the next run completes without redoing or tripping over what is there."""
    topology = Topology(config_from_dict(databases("schema_test")))
    engines = ShardEngines(topology)
    try:
        (migration,) = load_migrations()
        statements = render(migration, topology, "mysql")
        with engines.primary(SHARDS[1]).connect() as conn:
            for statement in statements[:4]:
                conn.execute(text(statement))
        recorded, stop = _record(engines)
        try:
            report = apply(topology, engines, [migration])
        finally:
            stop()
        assert report.ok and [s.applied for s in report.shards] == [(1,)] * 4
        creates = [s for s in recorded if s.startswith("CREATE TABLE IF NOT EXISTS ")]
        # 12 tables on each shard, less the 4 the interrupted run already made on s1
        assert len(creates) == 4 * 12 - 4
    finally:
        engines.dispose()


def test_unreachable_shard_does_not_stop_the_others(
    databases: Callable[[str], dict[str, Any]],
) -> None:
    raw = databases("schema_test")
    raw["shards"]["s1"]["primary"] = "mysql+pymysql://root:s3cr3t-pw@127.0.0.1:1/orders_s1"
    topology = Topology(config_from_dict(raw))
    engines = ShardEngines(topology)
    try:
        report = apply(topology, engines)
    finally:
        engines.dispose()
    assert [s.shard for s in report.failed] == ["s1"]
    error = report.shard("s1").error
    assert error is not None and error.unavailable and error.code == 2003
    assert [report.shard(s).applied for s in ("s0", "s2", "s3")] == [(1,)] * 3
    assert "s3cr3t" not in json.dumps(report.as_dict())


def test_concurrent_applies_take_turns(databases: Callable[[str], dict[str, Any]]) -> None:
    topology = Topology(config_from_dict(databases("schema_test")))
    engines = [ShardEngines(topology), ShardEngines(topology)]
    reports: list[ApplyReport] = []
    barrier = threading.Barrier(2)

    def run(e: ShardEngines) -> None:
        barrier.wait()
        reports.append(apply(topology, e))

    threads = [threading.Thread(target=run, args=(e,)) for e in engines]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert len(reports) == 2 and all(r.ok for r in reports)
        for i in range(4):
            outcomes = sorted((r.shards[i].applied, r.shards[i].skipped) for r in reports)
            assert outcomes == [((), (1,)), ((1,), ())]
        with engines[0].primary(SHARDS[0]).connect() as conn:
            assert conn.execute(text(f"SELECT COUNT(*) FROM {VERSION_TABLE}")).scalar_one() == 1
    finally:
        for e in engines:
            e.dispose()


def test_cli_on_mariadb(databases: Callable[[str], dict[str, Any]], tmp_path: Path) -> None:
    config = tmp_path / "topology.yaml"
    config.write_text(yaml.safe_dump(databases("schema_test")), encoding="utf-8")
    runner = CliRunner()
    applied = runner.invoke(schema, ["apply", "--config", str(config)])
    assert applied.exit_code == 0, applied.output
    assert sorted(applied.output.splitlines()[:4]) == [
        f"s{i}  0001_orders  applied" for i in range(4)
    ]
    shown = runner.invoke(schema, ["status", "--config", str(config), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout) == {"shards": {f"s{i}": [1] for i in range(4)}}
