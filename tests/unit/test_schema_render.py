"""Migrations: loading, rendering per physical table (golden SQL), refusals, and applying to
SQLite shard files (config/orders-sqlite.yaml): idempotent, resumable, shards independent."""

from __future__ import annotations

import json
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import inspect, text

from shardrouter.cli.schema_cmd import schema
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.errors import SchemaError, ShardUnavailableError
from shardrouter.ops.schema import (
    DEFAULT_DIRECTORY,
    VERSION_TABLE,
    Migration,
    apply,
    load_migrations,
    render,
    render_steps,
    status,
)
from shardrouter.types import ShardId

REPO = Path(__file__).resolve().parents[2]
ORDERS_SQLITE_YAML = REPO / "config" / "orders-sqlite.yaml"
SHARDS = [ShardId(f"s{i}") for i in range(4)]

ORDERS_COLUMNS = ["order_id", "user_id", "merchant_id", "status", "amount_cents", "created_at"]
PHYSICAL = {
    "users": ["users"],
    "orders": [f"orders_{i:04d}" for i in range(4)],
    "order_items": [f"order_items_{i:04d}" for i in range(4)],
    "merchant_orders": ["merchant_orders"],
    "user_emails": ["user_emails"],
    "countries": ["countries"],
}
ALL_PHYSICAL = sorted(name for names in PHYSICAL.values() for name in names)


def _migration(directory: Path, sql: str, name: str = "0002_change.sql") -> Migration:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(sql, encoding="utf-8")
    return Migration.from_file(path)


@pytest.fixture(scope="module")
def v1() -> Migration:
    (migration,) = load_migrations()
    return migration


# -- loading ------------------------------------------------------------------------------------


def test_repository_migrations_load(v1: Migration) -> None:
    assert DEFAULT_DIRECTORY == REPO / "migrations"
    assert (v1.version, v1.description, v1.name, v1.label) == (
        1,
        "orders",
        "0001_orders.sql",
        "0001_orders",
    )
    assert len(v1.checksum) == 64 and int(v1.checksum, 16) >= 0


def test_checksum_ignores_line_endings(tmp_path: Path) -> None:
    unix = _migration(tmp_path / "a", "DROP TABLE countries;\n")
    dos = _migration(tmp_path / "b", "DROP TABLE countries;\r\n")
    edited = _migration(tmp_path / "c", "DROP TABLE  countries;\n")
    assert unix.checksum == dos.checksum != edited.checksum


def test_versions_sorted_and_other_files_ignored(tmp_path: Path) -> None:
    for name in ("0010_ten.sql", "0002_two.sql", "0001_one.sql"):
        (tmp_path / name).write_text("DROP TABLE countries;", encoding="utf-8")
    (tmp_path / "README.md").write_text("notes", encoding="utf-8")
    (tmp_path / ".0003_draft.sql.swp").write_text("x", encoding="utf-8")
    (tmp_path / "archive").mkdir()
    assert [m.version for m in load_migrations(tmp_path)] == [1, 2, 10]


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("orders.sql", id="no-version"),
        pytest.param("0001-orders.sql", id="dash"),
        pytest.param("v0001_orders.sql", id="prefix"),
        pytest.param("01_orders.sql", id="short-version"),
        pytest.param("0001_.sql", id="no-description"),
        pytest.param("0001_add orders.sql", id="space"),
        pytest.param("0001_orders.SQL.bak.sql", id="dots"),
    ],
)
def test_bad_file_name_refused(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_text("DROP TABLE countries;", encoding="utf-8")
    with pytest.raises(SchemaError) as err:
        load_migrations(tmp_path)
    message = str(err.value)
    assert name in message
    assert (
        "NNNN_description.sql" in message and "rename it, e.g. 0002_add_order_notes.sql" in message
    )


def test_version_zero_refused(tmp_path: Path) -> None:
    (tmp_path / "0000_init.sql").write_text("DROP TABLE countries;", encoding="utf-8")
    with pytest.raises(
        SchemaError, match="version 0 is not a version; number migrations from 0001"
    ):
        load_migrations(tmp_path)


def test_duplicate_versions_refused_with_every_problem(tmp_path: Path) -> None:
    for name in ("0001_a.sql", "0001_b.sql", "bad.sql"):
        (tmp_path / name).write_text("DROP TABLE countries;", encoding="utf-8")
    with pytest.raises(SchemaError) as err:
        load_migrations(tmp_path)
    message = str(err.value)
    assert "0001_a.sql and 0001_b.sql both have version 1; renumber one of them" in message
    assert "bad.sql" in message


def test_missing_directory_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"no migrations directory at .*nowhere.*--dir DIR"):
        load_migrations(tmp_path / "nowhere")


def test_not_utf8_refused(tmp_path: Path) -> None:
    (tmp_path / "0001_latin1.sql").write_bytes(
        "-- caf\xe9\nDROP TABLE countries;".encode("latin-1")
    )
    with pytest.raises(SchemaError, match=r"0001_latin1\.sql: not UTF-8 text"):
        load_migrations(tmp_path)


# -- rendering: the shipped schema (golden) -------------------------------------------------------

ORDERS_0000_MYSQL = (
    "CREATE TABLE IF NOT EXISTS orders_0000 (order_id BIGINT NOT NULL, user_id BIGINT NOT NULL,"
    " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL, amount_cents BIGINT NOT NULL,"
    " created_at DATETIME(3) NOT NULL, PRIMARY KEY (order_id),"
    " INDEX idx_user_created (user_id, created_at),"
    " INDEX idx_merchant_created (merchant_id, created_at)) ENGINE=InnoDB DEFAULT CHARACTER SET=utf8mb4"
)
USERS_MYSQL = (
    "CREATE TABLE IF NOT EXISTS users (user_id BIGINT NOT NULL, email VARCHAR(255) NOT NULL,"
    " name VARCHAR(255) NULL, created_at DATETIME(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),"
    " PRIMARY KEY (user_id)) ENGINE=InnoDB DEFAULT CHARACTER SET=utf8mb4"
)
COUNTRIES_MYSQL = (
    "CREATE TABLE IF NOT EXISTS countries (code CHAR(2) NOT NULL, name VARCHAR(64) NOT NULL,"
    " PRIMARY KEY (code)) ENGINE=InnoDB DEFAULT CHARACTER SET=utf8mb4"
)
ORDER_ITEMS_0003_MYSQL = (
    "CREATE TABLE IF NOT EXISTS order_items_0003 (order_id BIGINT NOT NULL, line INT NOT NULL,"
    " user_id BIGINT NOT NULL, sku VARCHAR(64) NOT NULL, qty INT NOT NULL,"
    " price_cents BIGINT NOT NULL, PRIMARY KEY (order_id, line), INDEX idx_user (user_id))"
    " ENGINE=InnoDB DEFAULT CHARACTER SET=utf8mb4"
)
ORDERS_0001_SQLITE = [
    "CREATE TABLE IF NOT EXISTS orders_0001 (order_id INTEGER NOT NULL PRIMARY KEY,"
    " user_id INTEGER NOT NULL, merchant_id INTEGER NOT NULL, status TEXT(16) NOT NULL,"
    " amount_cents INTEGER NOT NULL, created_at DATETIME NOT NULL)",
    "CREATE INDEX IF NOT EXISTS orders_0001__idx_user_created ON orders_0001 (user_id, created_at)",
    "CREATE INDEX IF NOT EXISTS orders_0001__idx_merchant_created ON orders_0001 (merchant_id, created_at)",
]


def test_mysql_one_create_per_physical_table(orders_topology: Topology, v1: Migration) -> None:
    steps = render_steps(v1, orders_topology, "mysql")
    assert [s.table for s in steps] == [n for names in PHYSICAL.values() for n in names]
    assert all(s.sql.startswith(f"CREATE TABLE IF NOT EXISTS {s.table} (") for s in steps)


def test_mysql_golden(orders_topology: Topology, v1: Migration) -> None:
    sql = render(v1, orders_topology, "mysql")
    assert sql[0] == USERS_MYSQL
    assert sql[1] == ORDERS_0000_MYSQL
    # the split copies differ in the table name only
    assert sql[2:5] == [
        ORDERS_0000_MYSQL.replace("orders_0000", f"orders_{i:04d}") for i in (1, 2, 3)
    ]
    assert sql[8] == ORDER_ITEMS_0003_MYSQL
    assert sql[-1] == COUNTRIES_MYSQL
    assert render(v1, orders_topology, "mariadb") == sql


def test_split_bound_and_broadcast_counts(orders_topology: Topology, v1: Migration) -> None:
    steps = render_steps(v1, orders_topology, "mysql")
    by_table: dict[str, list[str]] = {}
    for step in steps:
        by_table.setdefault(step.logical, []).append(step.table)
    assert by_table == PHYSICAL


def test_sqlite_golden(orders_topology: Topology, v1: Migration) -> None:
    sql = render(v1, orders_topology, "sqlite")
    start = sql.index(ORDERS_0001_SQLITE[0])
    assert sql[start : start + 3] == ORDERS_0001_SQLITE
    # 12 tables, two indexes on each orders split, one on each order_items split
    assert len(sql) == 12 + 4 * 2 + 4
    assert not any(word in s for s in sql for word in ("ENGINE", "CHARACTER SET", "INDEX idx"))


def test_sqlite_render_is_valid_sqlite(orders_topology: Topology, v1: Migration) -> None:
    conn = sqlite3.connect(":memory:")
    for statement in render(v1, orders_topology, "sqlite"):
        conn.execute(statement)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(ALL_PHYSICAL)


# -- rendering: statements beyond CREATE TABLE (golden) -------------------------------------------

STATEMENT_GOLDENS = [
    pytest.param(
        "CREATE INDEX idx_status ON orders (status, created_at DESC)",
        [f"CREATE INDEX idx_status ON orders_{i:04d}(status, created_at DESC)" for i in range(4)],
        [
            f"CREATE INDEX IF NOT EXISTS orders_{i:04d}__idx_status ON orders_{i:04d} (status, created_at DESC)"
            for i in range(4)
        ],
        id="create-index-split",
    ),
    pytest.param(
        "CREATE UNIQUE INDEX uq_email ON users (email)",
        ["CREATE UNIQUE INDEX uq_email ON users(email)"],
        ["CREATE UNIQUE INDEX IF NOT EXISTS users__uq_email ON users (email)"],
        id="create-unique-index",
    ),
    pytest.param(
        "ALTER TABLE order_items ADD COLUMN note VARCHAR(100) NULL COMMENT '100% free' AFTER sku,"
        " ADD INDEX idx_sku (sku)",
        [
            f"ALTER TABLE order_items_{i:04d} ADD COLUMN note VARCHAR(100) NULL COMMENT '100% free' AFTER sku,"
            " ADD INDEX idx_sku (sku)"
            for i in range(4)
        ],
        [
            s
            for i in range(4)
            for s in (
                f"ALTER TABLE order_items_{i:04d} ADD COLUMN note TEXT(100) NULL",
                f"CREATE INDEX IF NOT EXISTS order_items_{i:04d}__idx_sku ON order_items_{i:04d} (sku)",
            )
        ],
        id="alter-bound-two-actions",
    ),
    pytest.param(
        "ALTER TABLE countries ADD UNIQUE KEY uq_name (name)",
        ["ALTER TABLE countries ADD UNIQUE uq_name (name)"],
        ["CREATE UNIQUE INDEX IF NOT EXISTS countries__uq_name ON countries (name)"],
        id="alter-add-unique-broadcast",
    ),
    pytest.param(
        "ALTER TABLE users DROP INDEX uq_email",
        ["ALTER TABLE users DROP INDEX uq_email"],
        ["DROP INDEX IF EXISTS users__uq_email"],
        id="alter-drop-index",
    ),
    pytest.param(
        "ALTER TABLE users RENAME COLUMN name TO full_name",
        ["ALTER TABLE users RENAME COLUMN name TO full_name"],
        ["ALTER TABLE users RENAME COLUMN name TO full_name"],
        id="rename-column",
    ),
    pytest.param(
        "ALTER TABLE orders DROP COLUMN status",
        [f"ALTER TABLE orders_{i:04d} DROP COLUMN status" for i in range(4)],
        [f"ALTER TABLE orders_{i:04d} DROP COLUMN status" for i in range(4)],
        id="drop-column",
    ),
    pytest.param(
        "DROP INDEX idx_user ON order_items",
        [f"DROP INDEX idx_user ON order_items_{i:04d}" for i in range(4)],
        [f"DROP INDEX IF EXISTS order_items_{i:04d}__idx_user" for i in range(4)],
        id="drop-index",
    ),
    pytest.param(
        "DROP TABLE countries, user_emails",
        ["DROP TABLE IF EXISTS countries", "DROP TABLE IF EXISTS user_emails"],
        ["DROP TABLE IF EXISTS countries", "DROP TABLE IF EXISTS user_emails"],
        id="drop-two-tables",
    ),
    pytest.param(
        "CREATE TABLE `countries` (code CHAR(2) CHARACTER SET ascii COLLATE ascii_bin NOT NULL,"
        " region INT, KEY (region), KEY (region, code), PRIMARY KEY (code)) COMMENT='iso 3166'",
        [
            "CREATE TABLE IF NOT EXISTS countries (code CHAR(2) CHARACTER SET ascii COLLATE ascii_bin"
            " NOT NULL, region INT, INDEX (region), INDEX (region, code), PRIMARY KEY (code))"
            " COMMENT='iso 3166'"
        ],
        [
            "CREATE TABLE IF NOT EXISTS countries (code TEXT(2) NOT NULL PRIMARY KEY, region INTEGER)",
            "CREATE INDEX IF NOT EXISTS countries__region ON countries (region)",
            "CREATE INDEX IF NOT EXISTS countries__region_2 ON countries (region, code)",
        ],
        id="unnamed-inline-indexes-get-mysql-names",
    ),
]


@pytest.mark.parametrize(("sql", "mysql", "sqlite"), STATEMENT_GOLDENS)
def test_statement_golden(
    tmp_path: Path, orders_topology: Topology, sql: str, mysql: list[str], sqlite: list[str]
) -> None:
    migration = _migration(tmp_path, f"-- a comment\n{sql};\n")
    assert render(migration, orders_topology, "mysql") == mysql
    assert render(migration, orders_topology, "sqlite") == sqlite


# -- rendering: refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "table"),
    [
        pytest.param("CREATE TABLE order (id BIGINT PRIMARY KEY)", "order", id="create-table"),
        pytest.param("ALTER TABLE ordres ADD COLUMN x INT", "ordres", id="alter"),
        pytest.param("CREATE INDEX i ON order_item (sku)", "order_item", id="create-index"),
        pytest.param("DROP TABLE countries, contries", "contries", id="drop-second-table"),
        pytest.param("DROP INDEX i ON Users", "Users", id="drop-index-case"),
    ],
)
def test_unknown_table_refused(
    tmp_path: Path, orders_topology: Topology, sql: str, table: str
) -> None:
    migration = _migration(tmp_path, f"DROP TABLE countries;\n{sql};")
    for dialect in ("mysql", "sqlite"):
        with pytest.raises(SchemaError) as err:
            render(migration, orders_topology, dialect)
        message = str(err.value)
        assert message.startswith("0002_change.sql statement 2 (")
        assert f"table {table!r} is not in topology 'orders'" in message
        assert (
            "known: countries, merchant_orders, order_items, orders, user_emails, users" in message
        )


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        pytest.param(
            "CREATE TABLE orders (order_id BIGINT AUTO_INCREMENT PRIMARY KEY)",
            "AUTO_INCREMENT counts per shard",
            id="auto-increment",
        ),
        pytest.param(
            "CREATE TABLE countries (code CHAR(2)) AUTO_INCREMENT=5",
            "AUTO_INCREMENT counts per shard",
            id="auto-increment-option",
        ),
        pytest.param(
            "CREATE TABLE app.users (user_id BIGINT)",
            "app.users names a database; write the bare logical table name",
            id="database-qualified",
        ),
        pytest.param(
            "CREATE TABLE order_items (order_id BIGINT, FOREIGN KEY (order_id) REFERENCES orders (order_id))",
            "also names table 'orders'",
            id="foreign-key",
        ),
        pytest.param(
            "ALTER TABLE users RENAME TO customers",
            "also names table 'customers'",
            id="rename-table",
        ),
        pytest.param(
            "CREATE TABLE users LIKE countries",
            "CREATE TABLE ... AS SELECT / LIKE",
            id="create-like",
        ),
        pytest.param(
            "INSERT INTO countries (code, name) VALUES ('DE', 'Germany')",
            "migrations hold CREATE TABLE, CREATE INDEX, ALTER TABLE, DROP TABLE and DROP INDEX only",
            id="insert",
        ),
        pytest.param(
            "RENAME TABLE users TO customers",
            "migrations hold CREATE TABLE",
            id="rename-command",
        ),
        pytest.param(
            "ALTER TABLE orders ADD INDEX (status)",
            "name the index (ADD INDEX idx_name (...))",
            id="unnamed-index-in-alter",
        ),
    ],
)
def test_statement_refused(
    tmp_path: Path, orders_topology: Topology, sql: str, expected: str
) -> None:
    migration = _migration(tmp_path, f"{sql};")
    with pytest.raises(SchemaError) as err:
        render(migration, orders_topology, "mysql")
    assert str(err.value).startswith("0002_change.sql statement 1 (")
    assert expected in str(err.value)


def test_sqlite_cannot_modify_a_column(tmp_path: Path, orders_topology: Topology) -> None:
    migration = _migration(tmp_path, "ALTER TABLE users MODIFY COLUMN name VARCHAR(300) NULL;")
    assert render(migration, orders_topology, "mysql") == [
        "ALTER TABLE users MODIFY COLUMN name VARCHAR(300) NULL"
    ]
    with pytest.raises(SchemaError, match="cannot be written for sqlite"):
        render(migration, orders_topology, "sqlite")


def test_parse_error_names_the_file(tmp_path: Path, orders_topology: Topology) -> None:
    migration = _migration(tmp_path, "CREATE TABLE users (user_id BIGINT,;")
    with pytest.raises(SchemaError, match=r"^0002_change.sql: cannot parse the SQL"):
        render(migration, orders_topology, "mysql")


def test_empty_migration_refused(tmp_path: Path, orders_topology: Topology) -> None:
    migration = _migration(tmp_path, "-- nothing yet\n")
    with pytest.raises(SchemaError, match=r"0002_change\.sql: no statements"):
        render(migration, orders_topology, "mysql")


def test_unknown_dialect_refused(orders_topology: Topology, v1: Migration) -> None:
    with pytest.raises(SchemaError, match="cannot render migrations for 'postgresql'"):
        render(v1, orders_topology, "postgresql")


# -- applying to SQLite shard files ---------------------------------------------------------------


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[tuple[Topology, ShardEngines]]:
    topology = Topology.load(ORDERS_SQLITE_YAML, env={"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    engines = ShardEngines(topology)
    yield topology, engines
    engines.dispose()


@pytest.fixture
def migrations_dir(tmp_path: Path) -> Path:
    """A copy of the repository's migrations/ to add to and edit."""
    directory = tmp_path / "migrations"
    shutil.copytree(DEFAULT_DIRECTORY, directory)
    return directory


def _tables(engines: ShardEngines, shard: ShardId) -> list[str]:
    with engines.primary(shard).connect() as conn:
        return sorted(inspect(conn).get_table_names())


def test_apply_creates_every_table_on_every_shard(demo: tuple[Topology, ShardEngines]) -> None:
    topology, engines = demo
    calls: list[tuple[str, int, str]] = []
    report = apply(topology, engines, progress=lambda *call: calls.append(call))
    assert report.ok and report.failed == ()
    assert [(s.shard, s.applied, s.skipped) for s in report.shards] == [
        (sid, (1,), ()) for sid in SHARDS
    ]
    assert sorted(calls) == [(sid, 1, "applied") for sid in SHARDS]
    for sid in SHARDS:
        assert _tables(engines, sid) == sorted([*ALL_PHYSICAL, VERSION_TABLE])
        with engines.primary(sid).connect() as conn:
            inspector = inspect(conn)
            for name in PHYSICAL["orders"]:
                assert [c["name"] for c in inspector.get_columns(name)] == ORDERS_COLUMNS
                assert inspector.get_pk_constraint(name)["constrained_columns"] == ["order_id"]
                indexes = {i["name"]: i["column_names"] for i in inspector.get_indexes(name)}
                assert indexes == {
                    f"{name}__idx_user_created": ["user_id", "created_at"],
                    f"{name}__idx_merchant_created": ["merchant_id", "created_at"],
                }
            for name in PHYSICAL["order_items"]:
                assert inspector.get_pk_constraint(name)["constrained_columns"] == [
                    "order_id",
                    "line",
                ]
            assert inspector.get_pk_constraint("merchant_orders")["constrained_columns"] == [
                "merchant_id",
                "order_id",
            ]
            row = conn.execute(text(f"SELECT version, name, checksum FROM {VERSION_TABLE}")).one()
            assert tuple(row) == (1, "0001_orders.sql", load_migrations()[0].checksum)


def test_apply_twice_is_a_no_op(demo: tuple[Topology, ShardEngines]) -> None:
    topology, engines = demo
    assert apply(topology, engines).ok
    with engines.primary(SHARDS[0]).begin() as conn:
        conn.execute(text("INSERT INTO countries (code, name) VALUES ('DE', 'Germany')"))
    calls: list[tuple[str, int, str]] = []
    again = apply(topology, engines, progress=lambda *call: calls.append(call))
    assert again.ok
    assert [(s.applied, s.skipped) for s in again.shards] == [((), (1,))] * 4
    assert sorted(calls) == [(sid, 1, "skipped") for sid in SHARDS]
    assert status(topology, engines) == {sid: [1] for sid in SHARDS}
    with engines.primary(SHARDS[0]).connect() as conn:
        assert conn.execute(text("SELECT name FROM countries")).scalar_one() == "Germany"


def test_status_of_a_fresh_shard_is_empty(demo: tuple[Topology, ShardEngines]) -> None:
    topology, engines = demo
    assert status(topology, engines) == {sid: [] for sid in SHARDS}


def test_sqlite_rows_fit_the_schema(demo: tuple[Topology, ShardEngines]) -> None:
    topology, engines = demo
    apply(topology, engines).raise_for_errors()
    with engines.primary(SHARDS[1]).begin() as conn:
        conn.execute(text("INSERT INTO users (user_id, email) VALUES (42, 'ada@example.com')"))
        assert conn.execute(text("SELECT created_at FROM users")).scalar_one() is not None
        conn.execute(
            text(
                "INSERT INTO orders_0002 (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (1, 42, 7, 'new', 1000, '2025-01-01 00:00:00.000')"
            )
        )
        with pytest.raises(Exception, match="NOT NULL"):
            conn.execute(text("INSERT INTO orders_0002 (order_id, user_id) VALUES (2, 42)"))


def test_interrupted_version_is_resumed(demo: tuple[Topology, ShardEngines], v1: Migration) -> None:
    """A crash midway through a version (DDL is not transactional on MySQL) leaves some
    tables; running again completes the version instead of failing on them."""
    topology, engines = demo
    statements = render(v1, topology, "sqlite")
    with engines.primary(SHARDS[2]).begin() as conn:
        for statement in statements[:6]:  # users, orders_0000 and its indexes, half of orders_0001
            conn.execute(text(statement))
    report = apply(topology, engines)
    assert report.ok
    assert report.shard("s2").applied == (1,)
    assert _tables(engines, SHARDS[2]) == sorted([*ALL_PHYSICAL, VERSION_TABLE])


def test_conflicting_table_fails_its_shard_only(demo: tuple[Topology, ShardEngines]) -> None:
    topology, engines = demo
    with engines.primary(SHARDS[1]).begin() as conn:
        conn.execute(text("CREATE TABLE orders_0002 (order_id INTEGER PRIMARY KEY, note TEXT)"))
    report = apply(topology, engines)
    assert not report.ok
    assert [s.shard for s in report.failed] == ["s1"]
    failed = report.shard("s1")
    assert failed.applied == () and failed.error is not None and failed.error.version == 1
    assert "creates table orders_0002, which exists already without user_id, merchant_id" in (
        failed.error.message
    )
    assert "rename or drop it, then run again" in failed.error.message
    assert failed.error.statement is not None and "orders_0002" in failed.error.statement
    assert all(report.shard(s).applied == (1,) for s in ("s0", "s2", "s3"))
    assert status(topology, engines)[SHARDS[1]] == []
    with pytest.raises(SchemaError, match=r"failed on 1 of 4 shards:\n  s1 at version 1: "):
        report.raise_for_errors()
    # the fix: drop the stray table, run again; only s1 has work left
    with engines.primary(SHARDS[1]).begin() as conn:
        conn.execute(text("DROP TABLE orders_0002"))
    again = apply(topology, engines)
    assert again.ok
    assert [(s.applied, s.skipped) for s in again.shards] == [
        ((), (1,)),
        ((1,), ()),
        ((), (1,)),
        ((), (1,)),
    ]


def test_failing_statement_is_reported_and_not_recorded(
    demo: tuple[Topology, ShardEngines], migrations_dir: Path
) -> None:
    topology, engines = demo
    _migration(
        migrations_dir,
        "ALTER TABLE countries ADD COLUMN region INT NULL;\n"
        "CREATE INDEX idx_iso3 ON countries (iso3);\n",  # no such column
    )
    report = apply(topology, engines, load_migrations(migrations_dir))
    assert [s.shard for s in report.failed] == SHARDS
    error = report.shard("s0").error
    assert error is not None
    assert (error.version, error.statement) == (
        2,
        "CREATE INDEX IF NOT EXISTS countries__idx_iso3 ON countries (iso3)",
    )
    assert "no such column: iso3" in error.message
    assert report.shard("s0").applied == (1,)
    assert status(topology, engines) == {sid: [1] for sid in SHARDS}


def test_new_version_applies_on_top(
    demo: tuple[Topology, ShardEngines], migrations_dir: Path
) -> None:
    topology, engines = demo
    assert apply(topology, engines, load_migrations(migrations_dir)).ok
    _migration(
        migrations_dir,
        "ALTER TABLE orders ADD COLUMN note VARCHAR(200) NULL, ADD INDEX idx_status (status);\n"
        "CREATE INDEX idx_sku ON order_items (sku);",
    )
    report = apply(topology, engines, load_migrations(migrations_dir))
    assert [(s.applied, s.skipped) for s in report.shards] == [((2,), (1,))] * 4
    with engines.primary(SHARDS[3]).connect() as conn:
        inspector = inspect(conn)
        assert "note" in [c["name"] for c in inspector.get_columns("orders_0003")]
        assert "orders_0003__idx_status" in [
            i["name"] for i in inspector.get_indexes("orders_0003")
        ]
        assert "order_items_0001__idx_sku" in [
            i["name"] for i in inspector.get_indexes("order_items_0001")
        ]
    assert status(topology, engines) == {sid: [1, 2] for sid in SHARDS}


def test_edited_applied_migration_refused(
    demo: tuple[Topology, ShardEngines], migrations_dir: Path
) -> None:
    topology, engines = demo
    assert apply(topology, engines, load_migrations(migrations_dir)).ok
    path = migrations_dir / "0001_orders.sql"
    path.write_text(path.read_text() + "\nCREATE INDEX idx_email ON users (email);\n")
    report = apply(topology, engines, load_migrations(migrations_dir))
    assert [s.shard for s in report.failed] == SHARDS
    error = report.shard("s2").error
    assert error is not None and error.version == 1
    assert "0001_orders.sql was edited after it was applied" in error.message
    assert f"git checkout -- {path}" in error.message and "e.g. 0002_<change>.sql" in error.message


def test_out_of_order_and_missing_versions_refused(
    demo: tuple[Topology, ShardEngines], migrations_dir: Path
) -> None:
    topology, engines = demo
    _migration(migrations_dir, "CREATE INDEX idx_sku ON order_items (sku);", "0003_sku.sql")
    assert apply(topology, engines, load_migrations(migrations_dir)).ok
    _migration(migrations_dir, "CREATE INDEX idx_qty ON order_items (qty);", "0002_qty.sql")
    late = apply(topology, engines, load_migrations(migrations_dir))
    error = late.shard("s0").error
    assert error is not None and error.version == 2
    assert "0002_qty.sql is older than version 3, which is already applied" in error.message
    assert "0004_qty.sql" in error.message
    (migrations_dir / "0002_qty.sql").unlink()
    (migrations_dir / "0003_sku.sql").unlink()
    gone = apply(topology, engines, load_migrations(migrations_dir))
    error = gone.shard("s3").error
    assert error is not None and error.version == 3
    assert (
        "version 3 (0003_sku.sql) is applied but there is no migration file for it" in error.message
    )


def test_unknown_table_refused_before_any_shard_is_touched(
    demo: tuple[Topology, ShardEngines], migrations_dir: Path
) -> None:
    topology, engines = demo
    _migration(migrations_dir, "ALTER TABLE order_itmes ADD COLUMN note TEXT;")
    with pytest.raises(SchemaError, match=r"0002_change\.sql statement 1 .*table 'order_itmes'"):
        apply(topology, engines, load_migrations(migrations_dir))
    assert all(_tables(engines, sid) == [] for sid in SHARDS)


def test_unreachable_shard_reported_without_its_password(
    orders_raw: dict[str, Any], tmp_path: Path
) -> None:
    orders_raw["shards"]["s3"]["primary"] = "mysql+pymysql://app:s3cr3t-pw@127.0.0.1:1/orders_s3"
    for sid in ("s0", "s1", "s2"):
        # Files, not sqlite:// (one in-memory database per thread: apply's threads and the
        # version read could see different ones, a flaky test).
        orders_raw["shards"][sid]["primary"] = f"sqlite:///{tmp_path}/{sid}.db"
    topology = Topology(config_from_dict(orders_raw))
    engines = ShardEngines(topology)
    try:
        report = apply(topology, engines)
        with pytest.raises(ShardUnavailableError) as err:
            status(topology, engines)
    finally:
        engines.dispose()
    assert [s.shard for s in report.failed] == ["s3"]
    error = report.shard("s3").error
    assert error is not None and error.unavailable and error.code == 2003
    assert error.version is None and "Can't connect" in error.message
    assert all(report.shard(s).applied == (1,) for s in ("s0", "s1", "s2"))
    assert "s3cr3t" not in json.dumps(report.as_dict()) and "s3cr3t" not in str(err.value)
    assert err.value.shard == "s3"


# -- the CLI group --------------------------------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> Any:
    env = {"SHARDROUTER_DEMO_DIR": str(tmp_path / "shards")}
    (tmp_path / "shards").mkdir(exist_ok=True)
    return CliRunner().invoke(schema, [*args, "--config", str(ORDERS_SQLITE_YAML)], env=env)


def test_cli_apply_and_status(tmp_path: Path) -> None:
    first = _cli(tmp_path, "apply")
    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert sorted(lines[:4]) == [f"s{i}  0001_orders  applied" for i in range(4)]
    assert lines[4] == "4 shards: 4 ok, 0 failed; 4 versions applied, 0 already applied"
    second = _cli(tmp_path, "apply", "--json")
    assert second.exit_code == 0, second.output
    data = json.loads(second.stdout)
    assert data["ok"] is True
    assert [(s["shard"], s["applied"], s["skipped"], s["error"]) for s in data["shards"]] == [
        (f"s{i}", [], [1], None) for i in range(4)
    ]
    shown = _cli(tmp_path, "status")
    assert shown.exit_code == 0 and shown.output.splitlines() == [
        f"s{i}  applied: 1" for i in range(4)
    ]
    assert json.loads(_cli(tmp_path, "status", "--json").stdout) == {
        "shards": {f"s{i}": [1] for i in range(4)}
    }


def test_cli_apply_failure_exits_1_naming_the_shard(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    with sqlite3.connect(shards / "orders_s2.db") as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    result = _cli(tmp_path, "apply")
    assert result.exit_code == 1
    assert "3 ok, 1 failed" in result.stdout
    assert (
        "Error: schema apply failed on 1 of 4 shards:\n  s2 at version 1: 0001_orders.sql creates table users"
        in result.output
    )
    assert "statement: CREATE TABLE IF NOT EXISTS users" in result.output
    as_json = _cli(tmp_path, "apply", "--json")
    assert as_json.exit_code == 1
    assert [s["shard"] for s in json.loads(as_json.stdout)["shards"] if not s["ok"]] == ["s2"]


def test_cli_bad_migration_dir(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "orders.sql").write_text("DROP TABLE countries;", encoding="utf-8")
    result = _cli(tmp_path, "apply", "--dir", str(bad))
    assert result.exit_code == 1
    assert "orders.sql: a migration file is named NNNN_description.sql" in result.output
