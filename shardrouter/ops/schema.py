"""Versioned DDL across shards: load ``migrations/``, render it per physical table, apply it.

A migration is written once, in logical table names and MySQL syntax. Rendering copies each
statement once per physical table of the table it names (``orders`` -> ``orders_0000`` ..
``orders_0003`` when split, ``countries`` once) in the shard's dialect; applying runs the pending
versions on every shard independently and records each version in the shard's
``shardrouter_schema_version`` table once all its statements succeeded.

MySQL DDL is not transactional, so a version interrupted midway is simply run again: every
rendered statement carries the effects it leaves behind (this table exists with these columns,
that index is gone), and a statement whose effects are already there is skipped, not re-run.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlglot
from sqlalchemy import (
    CHAR,
    Column,
    Connection,
    DateTime,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine.reflection import Inspector
from sqlalchemy.exc import SQLAlchemyError
from sqlglot import exp
from sqlglot.errors import ErrorLevel, SqlglotError

from ..core.topology import TableRule, Topology
from ..engine.engines import ShardEngines, classify
from ..errors import ExecutionError, SchemaError, ShardUnavailableError
from ..types import ShardId

DEFAULT_DIRECTORY = Path(__file__).resolve().parents[2] / "migrations"
"""The repository's ``migrations/`` folder, used when no directory is given."""

VERSION_TABLE = "shardrouter_schema_version"
"""The bookkeeping table in every shard: one row per applied version."""

LOCK_TIMEOUT_S = 30
"""Seconds ``apply`` waits for another ``apply`` on the same MySQL database to finish."""

Dialect = Literal["mysql", "sqlite"]
"""The SQL a shard speaks: ``mysql`` (MySQL and MariaDB) or ``sqlite`` (the demo)."""

ProgressCallback = Callable[[ShardId, int, str], None]
"""``progress(shard, version, outcome)``; outcome is ``applied``, ``skipped`` or ``failed``."""

_FILE_NAME = re.compile(r"(?P<version>\d{4,})_(?P<description>[A-Za-z0-9][A-Za-z0-9_-]*)\.sql")
_MAX_WORKERS = 16

_metadata = MetaData()
VERSIONS = Table(
    VERSION_TABLE,
    _metadata,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("name", String(255), nullable=False),
    Column("checksum", CHAR(64), nullable=False),
    Column(
        "applied_at",
        DateTime().with_variant(mysql.DATETIME(fsp=3), "mysql", "mariadb"),
        nullable=False,
    ),
    mysql_engine="InnoDB",
    mysql_charset="utf8mb4",
)


# -- migration files ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Migration:
    """One versioned file of DDL in logical table names: ``NNNN_description.sql``."""

    version: int
    description: str
    path: Path
    sql: str
    checksum: str
    """SHA-256 of the text (line endings normalised): an applied file must never change."""

    @property
    def name(self) -> str:
        """The file name, as recorded on the shards: ``0001_orders.sql``."""
        return self.path.name

    @property
    def label(self) -> str:
        """``0001_orders``: for progress lines."""
        return self.path.stem

    @classmethod
    def from_file(cls, path: Path) -> Migration:
        """Read one migration file; SchemaError if its name or encoding is wrong."""
        match = _FILE_NAME.fullmatch(path.name)
        if match is None:
            raise SchemaError(
                f"{path}: a migration file is named NNNN_description.sql (four or more digits,"
                f" an underscore, letters, digits, '_' or '-'); rename it, e.g."
                f" 0002_add_order_notes.sql"
            )
        version = int(match["version"])
        if version < 1:
            raise SchemaError(f"{path}: version 0 is not a version; number migrations from 0001")
        try:
            sql = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise SchemaError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
        except OSError as exc:
            raise SchemaError(f"{path}: cannot read the file: {exc.strerror}") from None
        normalised = sql.replace("\r\n", "\n")
        checksum = hashlib.sha256(normalised.encode("utf-8")).hexdigest()
        return cls(version, match["description"], path, normalised, checksum)


def load_migrations(directory: Path | None = None) -> list[Migration]:
    """The migrations in ``directory`` (default: the repository's ``migrations/``), by version.

    Every ``*.sql`` file must be named ``NNNN_description.sql`` and versions must be unique;
    other files (a README) are ignored. SchemaError lists every bad file, not only the first.
    """
    directory = DEFAULT_DIRECTORY if directory is None else Path(directory)
    if not directory.is_dir():
        raise SchemaError(
            f"no migrations directory at {directory} (installed without the repository?);"
            " pass the folder of NNNN_description.sql files (shardctl schema apply --dir DIR)"
        )
    problems: list[str] = []
    found: list[Migration] = []
    for path in sorted(directory.iterdir()):
        if path.name.startswith(".") or not path.is_file() or path.suffix.lower() != ".sql":
            continue
        try:
            found.append(Migration.from_file(path))
        except SchemaError as exc:
            problems.append(str(exc))
    problems += _version_problems(found)
    if problems:
        raise SchemaError("\n".join(problems))
    return sorted(found, key=lambda m: m.version)


def _version_problems(migrations: Sequence[Migration]) -> list[str]:
    seen: dict[int, Migration] = {}
    problems: list[str] = []
    for m in migrations:
        other = seen.setdefault(m.version, m)
        if other is not m:
            problems.append(
                f"{other.path} and {m.name} both have version {m.version}; renumber one of them"
                " above the highest version"
            )
    return problems


# -- rendering ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Effect:
    """What a statement leaves behind, so that a re-run can tell it already ran.

    ``kind`` is what exists (or not) afterwards: a ``table``, a ``column`` or an ``index``
    called ``name`` in physical table ``table``. ``columns`` are a created table's declared
    columns or an index's columns; ``indexes`` a created table's declared index names.
    """

    kind: Literal["table", "column", "index"]
    table: str
    name: str
    present: bool
    columns: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Step:
    """One rendered statement on one physical table, with the effects that show it ran."""

    sql: str
    logical: str
    table: str
    effects: tuple[Effect, ...]


@dataclass(frozen=True, slots=True)
class _Index:
    name: str
    columns: tuple[exp.Expression, ...]
    unique: bool

    @property
    def column_names(self) -> tuple[str, ...]:
        return tuple(_column_name(c) for c in self.columns)


def dialect_of(engine: Engine) -> Dialect:
    """The dialect rendered for ``engine``'s database; SchemaError for any other database."""
    return _dialect(engine.dialect.name)


def _dialect(name: str) -> Dialect:
    if name in ("mysql", "mariadb"):
        return "mysql"
    if name == "sqlite":
        return "sqlite"
    raise SchemaError(
        f"cannot render migrations for {name!r} databases; shards are MySQL/MariaDB (or SQLite"
        " for the demo)"
    )


def render(migration: Migration, topology: Topology, dialect: str) -> list[str]:
    """The statements ``migration`` runs on one shard of ``topology``, in ``dialect``.

    ``dialect`` is ``mysql`` (also for MariaDB) or ``sqlite``. SchemaError names the file, the
    statement and the fix when a statement names a table the topology does not have, or
    cannot be written per physical table.
    """
    return [step.sql for step in render_steps(migration, topology, dialect)]


def render_steps(migration: Migration, topology: Topology, dialect: str) -> list[Step]:
    """``render`` with the effects of each statement (what ``apply`` checks on a re-run)."""
    target = _dialect(dialect)
    steps: list[Step] = []
    for number, tree in enumerate(_parse(migration), 1):
        where = f"{migration.name} statement {number} ({_snippet(tree)})"
        steps += _Renderer(tree, where, topology, target).steps()
    return steps


def _parse(migration: Migration) -> list[exp.Expression]:
    try:
        trees = sqlglot.parse(migration.sql, read="mysql")
    except SqlglotError as exc:
        raise SchemaError(f"{migration.name}: cannot parse the SQL: {exc}") from None
    statements = [t for t in trees if isinstance(t, exp.Expression)]
    if not statements:
        raise SchemaError(f"{migration.name}: no statements; write DDL separated by ';'")
    return statements


def _snippet(tree: exp.Expression, width: int = 60) -> str:
    sql = " ".join(tree.sql(dialect="mysql", comments=False).split())
    return sql if len(sql) <= width else sql[: width - 3] + "..."


def _column_name(node: exp.Expression) -> str:
    inner = node.this if isinstance(node, exp.Ordered) else node
    return inner.name if isinstance(inner, exp.Column | exp.Identifier) else inner.sql()


def _sqlite_index_name(table: str, index: str) -> str:
    # SQLite index names are per database, MySQL's per table: prefix the physical table.
    return f"{table}__{index}"


class _Renderer:
    """Renders one parsed statement into steps, one (or more) per physical table."""

    def __init__(
        self, tree: exp.Expression, where: str, topology: Topology, dialect: Dialect
    ) -> None:
        self.tree = tree
        self.where = where
        self.topology = topology
        self.dialect = dialect

    def steps(self) -> list[Step]:
        tree = self.tree
        kind = str(tree.args.get("kind") or "").upper()
        self._refuse_auto_increment()
        if isinstance(tree, exp.Create) and kind == "TABLE":
            return self._create_table()
        if isinstance(tree, exp.Create) and kind == "INDEX":
            return self._create_index()
        if isinstance(tree, exp.Alter) and kind == "TABLE":
            return self._alter()
        if isinstance(tree, exp.Drop) and kind == "TABLE":
            return self._drop_table()
        if isinstance(tree, exp.Drop) and kind == "INDEX":
            return self._drop_index()
        raise SchemaError(
            f"{self.where}: migrations hold CREATE TABLE, CREATE INDEX, ALTER TABLE, DROP TABLE"
            " and DROP INDEX only; load data through the router, and rename a table by a"
            " topology change"
        )

    # -- checks ---------------------------------------------------------------------------------

    def _rule(self, node: exp.Table) -> TableRule:
        if node.args.get("db") is not None or node.args.get("catalog") is not None:
            raise SchemaError(
                f"{self.where}: {node.sql(dialect='mysql')} names a database; write the bare"
                " logical table name (each shard's database comes from its URL)"
            )
        rule = self.topology.tables.get(node.name)
        if rule is None:
            known = ", ".join(sorted(self.topology.tables)) or "none"
            raise SchemaError(
                f"{self.where}: table {node.name!r} is not in topology {self.topology.name!r};"
                f" fix the name or add the table under tables: in the topology (known: {known})"
            )
        return rule

    def _only_table(self, *allowed: exp.Expression) -> None:
        """Refuse a statement that names a table besides the one it is copied for."""
        keep = {id(node) for node in allowed}
        for node in self.tree.find_all(exp.Table):
            if id(node) not in keep:
                raise SchemaError(
                    f"{self.where}: also names table {node.name!r}; each statement is copied per"
                    " physical table, so it may name one table only (no foreign keys, RENAME"
                    " TO or CREATE TABLE ... LIKE; split the statement)"
                )

    def _refuse_auto_increment(self) -> None:
        node = self.tree.find(exp.AutoIncrementColumnConstraint, exp.AutoIncrementProperty)
        if node is not None:
            raise SchemaError(
                f"{self.where}: AUTO_INCREMENT counts per shard, so shards would hand out the"
                " same ids; drop it and take ids from the id generator (topology.id_generator)"
            )

    # -- output ---------------------------------------------------------------------------------

    def _sql(self, tree: exp.Expression) -> str:
        try:
            return tree.sql(
                dialect=self.dialect, comments=False, unsupported_level=ErrorLevel.RAISE
            )
        except SqlglotError as exc:
            detail = " ".join(str(exc).split())
            raise SchemaError(
                f"{self.where}: cannot be written for {self.dialect}: {detail}"
            ) from None

    def _for_sqlite(self, tree: exp.Expression) -> exp.Expression:
        """Drop what only MySQL has and SQLite has no use for: storage options, charsets,
        collations, comments, fractional-second precision, column positions."""
        for node in list(tree.find_all(exp.ColumnConstraint)):
            if isinstance(
                node.args.get("kind"),
                exp.CharacterSetColumnConstraint
                | exp.CollateColumnConstraint
                | exp.CommentColumnConstraint,
            ):
                node.pop()
        for dtype in tree.find_all(exp.DataType):
            if dtype.this in (exp.DataType.Type.DATETIME, exp.DataType.Type.TIMESTAMP):
                dtype.set("expressions", [])
        for column in tree.find_all(exp.ColumnDef):
            column.set("position", None)
        return tree

    def _index_sql(self, table: str, index: _Index) -> str:
        """A CREATE INDEX for SQLite, which has no index clauses inside CREATE TABLE."""
        name = exp.to_identifier(_sqlite_index_name(table, index.name)).sql(dialect="sqlite")
        columns = ", ".join(self._sql(c.copy()) for c in index.columns)
        unique = "UNIQUE " if index.unique else ""
        quoted = exp.to_identifier(table).sql(dialect="sqlite")
        return f"CREATE {unique}INDEX IF NOT EXISTS {name} ON {quoted} ({columns})"

    def _index_step(self, rule: TableRule, table: str, index: _Index) -> Step:
        name = self._index_name(table, index.name)
        effect = Effect("index", table, name, True, index.column_names)
        return Step(self._index_sql(table, index), rule.name, table, (effect,))

    # -- statements -----------------------------------------------------------------------------

    def _create_table(self) -> list[Step]:
        schema = self.tree.this
        if not isinstance(schema, exp.Schema) or self.tree.args.get("expression") is not None:
            raise SchemaError(
                f"{self.where}: CREATE TABLE ... AS SELECT / LIKE cannot be copied per shard;"
                " write the columns out"
            )
        node = schema.this
        assert isinstance(node, exp.Table)
        rule = self._rule(node)
        self._only_table(node)
        columns = tuple(c.name for c in schema.expressions if isinstance(c, exp.ColumnDef))
        inline = _inline_indexes(schema)
        steps: list[Step] = []
        for physical in rule.physical_names:
            tree = self.tree.copy()
            tree.set("exists", True)
            copy_schema = tree.this
            copy_schema.this.set("this", exp.to_identifier(physical))
            if self.dialect == "mysql":
                effect = Effect(
                    "table", physical, physical, True, columns, tuple(i.name for i in inline)
                )
                steps.append(Step(self._sql(tree), rule.name, physical, (effect,)))
                continue
            tree.set("properties", None)
            copy_schema.set(
                "expressions",
                [e for e in copy_schema.expressions if not _is_index_definition(e)],
            )
            effect = Effect("table", physical, physical, True, columns)
            steps.append(Step(self._sql(self._for_sqlite(tree)), rule.name, physical, (effect,)))
            steps += [self._index_step(rule, physical, index) for index in inline]
        return steps

    def _create_index(self) -> list[Step]:
        index = self.tree.this
        assert isinstance(index, exp.Index)
        node = index.args.get("table")
        if not isinstance(node, exp.Table) or not index.name:
            raise SchemaError(f"{self.where}: write CREATE INDEX name ON table (columns)")
        rule = self._rule(node)
        self._only_table(node)
        params = index.args.get("params")
        columns = tuple(params.args.get("columns") or ()) if params is not None else ()
        spec = _Index(index.name, columns, bool(self.tree.args.get("unique")))
        steps: list[Step] = []
        for physical in rule.physical_names:
            if self.dialect == "sqlite":
                steps.append(self._index_step(rule, physical, spec))
                continue
            tree = self.tree.copy()
            tree.this.args["table"].set("this", exp.to_identifier(physical))
            effect = Effect("index", physical, spec.name, True, spec.column_names)
            steps.append(Step(self._sql(tree), rule.name, physical, (effect,)))
        return steps

    def _alter(self) -> list[Step]:
        node = self.tree.this
        assert isinstance(node, exp.Table)
        rule = self._rule(node)
        actions: list[exp.Expression] = list(self.tree.args.get("actions") or ())
        index_names = [n for a in actions if _is_drop(a, "INDEX") for n in _dropped(a)]
        self._only_table(node, *index_names)
        steps: list[Step] = []
        for physical in rule.physical_names:
            if self.dialect == "mysql":
                tree = self.tree.copy()
                tree.this.set("this", exp.to_identifier(physical))
                effects = tuple(e for a in actions for e in self._action_effects(physical, a))
                steps.append(Step(self._sql(tree), rule.name, physical, effects))
            else:
                steps += [self._sqlite_action(rule, physical, a) for a in actions]
        return steps

    def _action_effects(self, table: str, action: exp.Expression) -> list[Effect]:
        """What one ALTER TABLE action leaves behind (none for MODIFY and the like, which are
        safe to run twice)."""
        if isinstance(action, exp.ColumnDef):
            return [Effect("column", table, action.name, True)]
        if _is_drop(action, "COLUMN"):
            return [Effect("column", table, n.name, False) for n in _dropped(action)]
        if _is_drop(action, "INDEX"):
            return [
                Effect("index", table, self._index_name(table, n.name), False)
                for n in _dropped(action)
            ]
        if isinstance(action, exp.RenameColumn):
            old, new = action.this, action.args.get("to")
            assert isinstance(old, exp.Expression) and isinstance(new, exp.Expression)
            return [
                Effect("column", table, old.name, False),
                Effect("column", table, new.name, True),
            ]
        added = self._added_index(action)
        if added is not None:
            name = self._index_name(table, added.name)
            return [Effect("index", table, name, True, added.column_names)]
        return []

    def _index_name(self, table: str, index: str) -> str:
        return _sqlite_index_name(table, index) if self.dialect == "sqlite" else index

    def _added_index(self, action: exp.Expression) -> _Index | None:
        """The index an ``ADD INDEX``/``ADD UNIQUE KEY`` action creates; it must be named."""
        if isinstance(action, exp.AddConstraint) and len(action.expressions) == 1:
            inner = action.expressions[0]
            unnamed = (isinstance(inner, exp.IndexColumnConstraint) and not inner.name) or (
                isinstance(inner, exp.UniqueColumnConstraint)
                and isinstance(inner.this, exp.Schema)
                and inner.this.this is None
            )
            if unnamed:
                raise SchemaError(
                    f"{self.where}: name the index (ADD INDEX idx_name (...)): MySQL would"
                    " name it after its first column, which a re-run or a later DROP INDEX"
                    " cannot tell apart"
                )
        return _added_index(action, [])

    def _sqlite_action(self, rule: TableRule, table: str, action: exp.Expression) -> Step:
        """One SQLite statement per ALTER TABLE action: SQLite takes one action at a time and
        has indexes only as CREATE/DROP INDEX."""
        quoted = exp.to_identifier(table).sql(dialect="sqlite")
        effects = tuple(self._action_effects(table, action))
        added = self._added_index(action)
        if added is not None:
            return self._index_step(rule, table, added)
        if _is_drop(action, "INDEX"):
            names = _dropped(action)
            if len(names) != 1:
                raise SchemaError(f"{self.where}: drop one index per DROP INDEX action")
            name = exp.to_identifier(_sqlite_index_name(table, names[0].name)).sql("sqlite")
            return Step(f"DROP INDEX IF EXISTS {name}", rule.name, table, effects)
        if isinstance(action, exp.ColumnDef):
            column = self._sql(self._for_sqlite(action.copy()))
            return Step(f"ALTER TABLE {quoted} ADD COLUMN {column}", rule.name, table, effects)
        if _is_drop(action, "COLUMN"):
            names = _dropped(action)
            if len(names) != 1:
                raise SchemaError(f"{self.where}: drop one column per DROP COLUMN action")
            column = exp.to_identifier(names[0].name).sql(dialect="sqlite")
            return Step(f"ALTER TABLE {quoted} DROP COLUMN {column}", rule.name, table, effects)
        if isinstance(action, exp.RenameColumn):
            tree = exp.Alter(this=exp.to_table(table), kind="TABLE", actions=[action.copy()])
            return Step(self._sql(tree), rule.name, table, effects)
        raise SchemaError(
            f"{self.where}: {action.sql(dialect='mysql')} cannot be written for sqlite (SQLite"
            " alters a table only by ADD/DROP/RENAME COLUMN and CREATE/DROP INDEX)"
        )

    def _drop_table(self) -> list[Step]:
        nodes = [n for n in self.tree.args.get("tables") or () if isinstance(n, exp.Table)]
        self._only_table(*nodes)
        steps: list[Step] = []
        for node in nodes:
            rule = self._rule(node)
            for physical in rule.physical_names:
                tree = self.tree.copy()
                tree.set("tables", [exp.to_table(physical)])
                tree.set("exists", True)
                effect = Effect("table", physical, physical, False)
                steps.append(Step(self._sql(tree), rule.name, physical, (effect,)))
        return steps

    def _drop_index(self) -> list[Step]:
        names = [n for n in self.tree.args.get("tables") or () if isinstance(n, exp.Table)]
        on = self.tree.args.get("cluster")
        node = on.this if isinstance(on, exp.OnProperty) else None
        if len(names) != 1 or not isinstance(node, exp.Table):
            raise SchemaError(f"{self.where}: write DROP INDEX name ON table")
        rule = self._rule(node)
        self._only_table(node, *names)
        index = names[0].name
        steps: list[Step] = []
        for physical in rule.physical_names:
            if self.dialect == "sqlite":
                name = _sqlite_index_name(physical, index)
                sql = f"DROP INDEX IF EXISTS {exp.to_identifier(name).sql(dialect='sqlite')}"
            else:
                tree = self.tree.copy()
                tree.args["cluster"].this.set("this", exp.to_identifier(physical))
                name, sql = index, self._sql(tree)
            effect = Effect("index", physical, name, False)
            steps.append(Step(sql, rule.name, physical, (effect,)))
        return steps


def _is_drop(action: exp.Expression, kind: str) -> bool:
    return isinstance(action, exp.Drop) and str(action.args.get("kind") or "").upper() == kind


def _dropped(action: exp.Expression) -> list[exp.Expression]:
    return [n for n in action.args.get("tables") or () if isinstance(n, exp.Expression)]


def _is_index_definition(node: exp.Expression) -> bool:
    """An index clause inside CREATE TABLE: ``INDEX name (cols)`` or ``UNIQUE KEY name (cols)``
    (a PRIMARY KEY clause is not one: SQLite has it inside CREATE TABLE too)."""
    return isinstance(node, exp.IndexColumnConstraint | exp.UniqueColumnConstraint)


def _added_index(node: exp.Expression, taken: list[str]) -> _Index | None:
    """The index an ``INDEX``/``UNIQUE KEY`` clause or ``ADD INDEX`` action defines.

    An unnamed index gets MySQL's name for it: its first column, then ``_2``, ``_3`` ...
    """
    if isinstance(node, exp.AddConstraint):
        inner = node.expressions
        if len(inner) != 1:
            return None
        node = inner[0]
    name: str | None
    if isinstance(node, exp.IndexColumnConstraint):
        name, columns, unique = (node.name or None), tuple(node.expressions), False
    elif isinstance(node, exp.UniqueColumnConstraint) and isinstance(node.this, exp.Schema):
        schema = node.this
        name = schema.this.name if schema.this is not None else None
        columns, unique = tuple(schema.expressions), True
    else:
        return None
    if not columns:
        return None
    if name is None:
        first = _column_name(columns[0])
        name, n = first, 2
        while name.lower() in (t.lower() for t in taken):
            name, n = f"{first}_{n}", n + 1
    taken.append(name)
    return _Index(name, columns, unique)


def _inline_indexes(schema: exp.Schema) -> list[_Index]:
    taken: list[str] = []
    found = (_added_index(e, taken) for e in schema.expressions if _is_index_definition(e))
    return [i for i in found if i is not None]


# -- applying -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShardFailure:
    """Why a shard stopped: the version and statement it was at and the driver's message."""

    message: str
    version: int | None = None
    statement: str | None = None
    code: int | None = None
    """The driver's error number (MySQL ``ER_*``) when the database refused something."""
    unavailable: bool = False
    """True when the shard did not answer (nothing about the migration is known to be wrong)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "version": self.version,
            "statement": self.statement,
            "code": self.code,
            "unavailable": self.unavailable,
        }


@dataclass(frozen=True, slots=True)
class ShardReport:
    """What ``apply`` did on one shard."""

    shard: ShardId
    applied: tuple[int, ...]
    skipped: tuple[int, ...]
    """Versions that were applied before this run."""
    error: ShardFailure | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {
            "shard": self.shard,
            "ok": self.ok,
            "applied": list(self.applied),
            "skipped": list(self.skipped),
            "error": None if self.error is None else self.error.as_dict(),
        }


@dataclass(frozen=True, slots=True)
class ApplyReport:
    """What ``apply`` did on every shard, in topology order."""

    shards: tuple[ShardReport, ...]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.shards)

    @property
    def failed(self) -> tuple[ShardReport, ...]:
        return tuple(s for s in self.shards if not s.ok)

    def shard(self, shard: str) -> ShardReport:
        for report in self.shards:
            if report.shard == shard:
                return report
        raise KeyError(shard)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "shards": [s.as_dict() for s in self.shards]}

    def raise_for_errors(self) -> None:
        """Raise SchemaError naming every failed shard and why; nothing if all succeeded."""
        if self.ok:
            return
        lines = [describe_failure(s) for s in self.failed]
        raise SchemaError(
            f"schema apply failed on {len(lines)} of {len(self.shards)} shards:\n"
            + "\n".join(f"  {line}" for line in lines),
            shard=self.failed[0].shard,
            version=self.failed[0].error.version if self.failed[0].error else None,
        )


def describe_failure(report: ShardReport) -> str:
    """One line for a failed shard: ``s2: version 1: <why>``."""
    error = report.error
    if error is None:
        return f"{report.shard}: ok"
    at = f" at version {error.version}" if error.version is not None else ""
    return f"{report.shard}{at}: {error.message}"


def apply(
    topology: Topology,
    engines: ShardEngines,
    migrations: Sequence[Migration] | None = None,
    *,
    progress: ProgressCallback | None = None,
) -> ApplyReport:
    """Apply the pending migrations on every shard of ``topology``; never re-run a version.

    Every migration is rendered for every dialect in use before any shard is touched, so a bad
    file (SchemaError) changes nothing. Shards then run concurrently and independently: one
    that fails is reported (shard, version, statement, the driver's message) and the others
    still get their versions. ``progress(shard, version, outcome)`` is called once per shard
    and version, from worker threads, one call at a time.
    """
    chosen = load_migrations() if migrations is None else sorted(migrations, key=_version)
    problems = _version_problems(chosen)
    if problems:
        raise SchemaError("\n".join(problems))
    shard_ids = list(topology.shards)
    dialects = {sid: dialect_of(engines.primary(sid)) for sid in shard_ids}
    rendered = {
        dialect: {m.version: render_steps(m, topology, dialect) for m in chosen}
        for dialect in sorted(set(dialects.values()))
    }
    lock = threading.Lock()

    def say(shard: ShardId, version: int, outcome: str) -> None:
        if progress is not None:
            with lock:
                progress(shard, version, outcome)

    def run(sid: ShardId) -> ShardReport:
        return _ShardRun(sid, engines.primary(sid), chosen, rendered[dialects[sid]], say).run()

    if not shard_ids:
        return ApplyReport(())
    with ThreadPoolExecutor(min(_MAX_WORKERS, len(shard_ids)), "schema-apply") as pool:
        reports = list(pool.map(run, shard_ids))
    return ApplyReport(tuple(reports))


def _version(migration: Migration) -> int:
    return migration.version


def status(topology: Topology, engines: ShardEngines) -> dict[ShardId, list[int]]:
    """The versions applied on every shard (empty when a shard has never been migrated).

    ShardUnavailableError (or ExecutionError) names a shard that cannot be read.
    """
    versions: dict[ShardId, list[int]] = {}
    for sid in topology.shards:
        engine = engines.primary(sid)
        try:
            with engine.connect() as conn:
                versions[sid] = sorted(_applied(conn))
        except SQLAlchemyError as exc:
            raise _scrubbed(classify(exc, sid), engine) from exc
    return versions


def _applied(conn: Connection) -> dict[int, tuple[str, str]]:
    """{version: (file name, checksum)} recorded on the shard; empty without the table."""
    if not inspect(conn).has_table(VERSION_TABLE):
        return {}
    rows = conn.execute(select(VERSIONS.c.version, VERSIONS.c.name, VERSIONS.c.checksum))
    return {int(v): (str(n), str(c)) for v, n, c in rows}


def _scrubbed(error: ExecutionError, engine: Engine) -> ExecutionError:
    """``error`` with the shard URL's password masked, should a driver ever echo it."""
    password = engine.url.password
    message = str(error)
    if password and str(password) in message:
        masked = message.replace(str(password), "***")
        return type(error)(masked, shard=error.shard, orig=error.orig)
    return error


class _ShardRun:
    """Applies the pending versions on one shard, over one connection in autocommit mode."""

    def __init__(
        self,
        shard: ShardId,
        engine: Engine,
        migrations: Sequence[Migration],
        steps: Mapping[int, list[Step]],
        say: ProgressCallback,
    ) -> None:
        self.shard = shard
        self.engine = engine
        self.migrations = migrations
        self.steps = steps
        self.say = say
        self.applied: list[int] = []
        self.skipped: list[int] = []
        self.version: int | None = None
        self.statement: str | None = None

    def run(self) -> ShardReport:
        failure: ShardFailure | None = None
        try:
            with self.engine.connect() as raw:
                conn = raw.execution_options(isolation_level="AUTOCOMMIT")
                with _migration_lock(conn, self.shard):
                    self._apply(conn)
        except SchemaError as exc:
            message = str(exc).removeprefix(f"shard {self.shard}: ")
            failure = ShardFailure(message, exc.version or self.version, self.statement)
        except SQLAlchemyError as exc:
            error = _scrubbed(classify(exc, self.shard), self.engine)
            orig_args = getattr(error.orig, "args", ())
            code = orig_args[0] if orig_args and isinstance(orig_args[0], int) else None
            message = str(error).removeprefix(f"shard {self.shard}: ")
            failure = ShardFailure(
                message,
                self.version,
                self.statement,
                code,
                isinstance(error, ShardUnavailableError),
            )
        if failure is not None and failure.version is not None:
            self.say(self.shard, failure.version, "failed")
        return ShardReport(self.shard, tuple(self.applied), tuple(self.skipped), failure)

    def _apply(self, conn: Connection) -> None:
        _metadata.create_all(conn, checkfirst=True)
        done = _applied(conn)
        self._check_history(done)
        for migration in self.migrations:
            if migration.version in done:
                self.skipped.append(migration.version)
                self.say(self.shard, migration.version, "skipped")
                continue
            self.version = migration.version
            for step in self.steps[migration.version]:
                self.statement = step.sql
                _run_step(conn, step, self.shard, migration)
            self.statement = None
            conn.execute(
                VERSIONS.insert().values(
                    version=migration.version,
                    name=migration.name,
                    checksum=migration.checksum,
                    applied_at=datetime.now(UTC).replace(tzinfo=None),
                )
            )
            self.applied.append(migration.version)
            self.say(self.shard, migration.version, "applied")
        self.version = None

    def _check_history(self, done: Mapping[int, tuple[str, str]]) -> None:
        """Refuse to go on when the shard's history and the files disagree."""
        files = {m.version: m for m in self.migrations}
        for version, (name, checksum) in sorted(done.items()):
            migration = files.get(version)
            if migration is None:
                raise SchemaError(
                    f"shard {self.shard}: version {version} ({name}) is applied but there is no"
                    f" migration file for it; restore {name} (or use the checkout that has it)",
                    shard=self.shard,
                    version=version,
                )
            if checksum != migration.checksum:
                latest = max(files)
                raise SchemaError(
                    f"shard {self.shard}: {migration.name} was edited after it was applied"
                    f" (checksum on the shard {checksum[:12]}, file {migration.checksum[:12]});"
                    f" restore the applied text (git checkout -- {migration.path}) and put the"
                    f" change in a new migration, e.g. {latest + 1:04d}_<change>.sql",
                    shard=self.shard,
                    version=version,
                )
        latest_applied = max(done, default=0)
        for migration in self.migrations:
            if migration.version not in done and migration.version < latest_applied:
                raise SchemaError(
                    f"shard {self.shard}: {migration.name} is older than version"
                    f" {latest_applied}, which is already applied; renumber it above it"
                    f" ({latest_applied + 1:04d}_{migration.description}.sql)",
                    shard=self.shard,
                    version=migration.version,
                )


@contextlib.contextmanager
def _migration_lock(conn: Connection, shard: ShardId) -> Iterator[None]:
    """On MySQL, one ``apply`` per database at a time (GET_LOCK is held by the session)."""
    if conn.dialect.name not in ("mysql", "mariadb"):
        yield
        return
    database = conn.engine.url.database or ""
    name = f"shardrouter_schema:{database}"[:64]
    got = conn.execute(
        text("SELECT GET_LOCK(:name, :timeout)"), {"name": name, "timeout": LOCK_TIMEOUT_S}
    ).scalar()
    if got != 1:
        raise SchemaError(
            f"shard {shard}: another schema apply holds lock {name!r} (waited"
            f" {LOCK_TIMEOUT_S} s); let it finish, then run again",
            shard=shard,
        )
    try:
        yield
    finally:
        with contextlib.suppress(SQLAlchemyError):  # a dead session has released it anyway
            conn.execute(text("SELECT RELEASE_LOCK(:name)"), {"name": name})


def _run_step(conn: Connection, step: Step, shard: ShardId, migration: Migration) -> bool:
    """Run ``step`` unless its effects are already there; True if it ran.

    A statement whose effects are partly there was not run by us (MySQL runs one ALTER TABLE
    whole or not at all): somebody changed the table by hand, so it is refused.
    """
    if step.effects:
        inspector = inspect(conn)
        done = [_effect_done(inspector, e, shard, migration) for e in step.effects]
        if all(done):
            return False
        if any(done):
            present = ", ".join(
                f"{e.kind} {e.name} {'exists' if e.present else 'is gone'}"
                for e, d in zip(step.effects, done, strict=True)
                if d
            )
            raise SchemaError(
                f"shard {shard}: {migration.name} on {step.table} is partly in place already"
                f" ({present}) although the version is not recorded; make the table match"
                " either the state before or after the statement, then run again",
                shard=shard,
                version=migration.version,
            )
    conn.exec_driver_sql(step.sql, execution_options={"no_parameters": True})
    return True


def _effect_done(
    inspector: Inspector, effect: Effect, shard: ShardId, migration: Migration
) -> bool:
    """Whether ``effect`` holds on the shard; SchemaError if an object of that name exists
    but is not the one the migration creates."""
    if not inspector.has_table(effect.table):
        return not effect.present
    if effect.kind == "table":
        if effect.present:
            _check_table(inspector, effect, shard, migration)
        return effect.present
    if effect.kind == "column":
        names = {c["name"].lower() for c in inspector.get_columns(effect.table)}
        return (effect.name.lower() in names) == effect.present
    indexes = {str(i["name"]).lower(): i for i in inspector.get_indexes(effect.table)}
    found = indexes.get(effect.name.lower())
    if found is not None and effect.present and effect.columns:
        have = tuple(str(c).lower() for c in found["column_names"])
        if have != tuple(c.lower() for c in effect.columns):
            raise SchemaError(
                f"shard {shard}: {migration.name} creates index {effect.name} on {effect.table}"
                f" ({', '.join(effect.columns)}) but an index of that name exists on"
                f" ({', '.join(have)}); drop or rename it, then run again",
                shard=shard,
                version=migration.version,
            )
    return (found is not None) == effect.present


def _check_table(
    inspector: Inspector, effect: Effect, shard: ShardId, migration: Migration
) -> None:
    """An existing table must have every column and index the CREATE TABLE declares: it was
    created by an interrupted run of this version, not by someone else."""
    columns = {c["name"].lower() for c in inspector.get_columns(effect.table)}
    missing = [c for c in effect.columns if c.lower() not in columns]
    if effect.indexes:
        indexes = {str(i["name"]).lower() for i in inspector.get_indexes(effect.table)}
        missing += [f"index {i}" for i in effect.indexes if i.lower() not in indexes]
    if missing:
        raise SchemaError(
            f"shard {shard}: {migration.name} creates table {effect.table}, which exists already"
            f" without {', '.join(missing)}: it is not the table this migration describes;"
            " rename or drop it, then run again",
            shard=shard,
            version=migration.version,
        )


__all__ = [
    "DEFAULT_DIRECTORY",
    "LOCK_TIMEOUT_S",
    "VERSIONS",
    "VERSION_TABLE",
    "ApplyReport",
    "Dialect",
    "Effect",
    "Migration",
    "ProgressCallback",
    "ShardFailure",
    "ShardReport",
    "Step",
    "apply",
    "describe_failure",
    "dialect_of",
    "load_migrations",
    "render",
    "render_steps",
    "status",
]
