"""The meta store: the one source of truth of a cluster's topology when ``meta:`` is configured.

A small database (MySQL/MariaDB in production, a SQLite file for the demo) holding:

- ``shardrouter_meta``: one row, the store's own schema version and the current topology
  version (exactly one is current; a push moves it with an optimistic check);
- ``shardrouter_topology_versions``: every version ever pushed (the YAML document as proposed,
  ``${VAR}`` placeholders kept so no secret is stored that was not written literally), who
  pushed it, when (server time) and why;
- ``shardrouter_routers``: the registry of live routers, their served and acknowledged versions,
  heartbeats and leases;
- ``shardrouter_worker_leases``: worker ids of the id generators, leased;
- ``shardrouter_migrations``, ``shardrouter_checkpoints``: migration state (resharding).

Every time is the store server's clock in milliseconds since the Unix epoch (``now_ms``), so
leases never compare two machines' clocks. The store is reached through SQLAlchemy Core with
short timeouts; a store that does not answer raises MetaStoreUnavailableError, which callers
(routers, generators) treat as "keep what you have until your lease says otherwise".
"""

from __future__ import annotations

import getpass
import json
import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    func,
    inspect,
    literal_column,
    select,
    update,
)
from sqlalchemy.dialects.mysql import LONGTEXT
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.sql.elements import ColumnElement

from ..core.config import MetaConfig, safe_url
from ..errors import (
    ConcurrentChangeError,
    MetaStoreDocumentError,
    MetaStoreError,
    MetaStoreUnavailableError,
)

SCHEMA_VERSION = 1
"""The meta store's own schema version; a release refuses a store newer than it knows and
migrates an older one in ``init``."""

_DOCUMENT = Text().with_variant(LONGTEXT(), "mysql", "mariadb")

metadata = MetaData()

meta_table = Table(
    "shardrouter_meta",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("schema_version", Integer, nullable=False),
    Column("current_version", BigInteger, nullable=True),
    Column("created_at_ms", BigInteger, nullable=False),
)
versions_table = Table(
    "shardrouter_topology_versions",
    metadata,
    Column("version", BigInteger, primary_key=True, autoincrement=False),
    Column("document", _DOCUMENT, nullable=False),
    Column("pushed_by", String(255), nullable=False),
    Column("pushed_at_ms", BigInteger, nullable=False),
    Column("comment", Text, nullable=False),
)
routers_table = Table(
    "shardrouter_routers",
    metadata,
    Column("instance_id", String(64), primary_key=True),
    Column("host", String(255), nullable=False),
    Column("pid", Integer, nullable=False),
    Column("process_start_ms", BigInteger, nullable=False),
    Column("kind", String(32), nullable=False),
    Column("serving_version", BigInteger, nullable=False),
    Column("acked_version", BigInteger, nullable=False),
    Column("registered_at_ms", BigInteger, nullable=False),
    Column("heartbeat_at_ms", BigInteger, nullable=False),
    Column("lease_expires_at_ms", BigInteger, nullable=False),
)
worker_leases_table = Table(
    "shardrouter_worker_leases",
    metadata,
    Column("worker_id", Integer, primary_key=True, autoincrement=False),
    Column("holder", String(64), nullable=True),
    Column("acquired_at_ms", BigInteger, nullable=False),
    Column("lease_expires_at_ms", BigInteger, nullable=False),
    Column("reusable_at_ms", BigInteger, nullable=False),
)
migrations_table = Table(
    "shardrouter_migrations",
    metadata,
    Column("migration_id", String(64), primary_key=True),
    Column("state", String(32), nullable=False),
    Column("plan", _DOCUMENT, nullable=False),
    Column("created_at_ms", BigInteger, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)
checkpoints_table = Table(
    "shardrouter_checkpoints",
    metadata,
    Column("migration_id", String(64), primary_key=True),
    Column("name", String(191), primary_key=True),
    Column("value", _DOCUMENT, nullable=False),
    Column("updated_at_ms", BigInteger, nullable=False),
)

TABLES = tuple(metadata.tables)

# Driver error numbers meaning "the store did not answer" (engine.engines.UNAVAILABLE_ERRNOS).
_UNAVAILABLE = frozenset({1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013, 2055})


@dataclass(frozen=True, slots=True)
class TopologyVersion:
    """One pushed version: the document as proposed (``${VAR}`` kept) and its provenance."""

    version: int
    document: Mapping[str, Any]
    pushed_by: str
    pushed_at_ms: int
    comment: str


@dataclass(frozen=True, slots=True)
class StoreStatus:
    url: str
    """The store's URL, password masked."""
    initialised: bool
    schema_version: int | None
    current_version: int | None
    versions: int
    routers: int
    worker_leases: int
    server_now_ms: int | None


@dataclass(frozen=True, slots=True)
class RouterRecord:
    """One registered router, as the store sees it (times: the store's clock, ms)."""

    instance_id: str
    host: str
    pid: int
    process_start_ms: int
    kind: str
    serving_version: int
    acked_version: int
    registered_at_ms: int
    heartbeat_at_ms: int
    lease_expires_at_ms: int
    now_ms: int
    """The store's clock when this was read: ``heartbeat_age_ms`` and ``live`` use it."""

    @property
    def live(self) -> bool:
        return self.lease_expires_at_ms > self.now_ms

    @property
    def heartbeat_age_ms(self) -> int:
        return max(0, self.now_ms - self.heartbeat_at_ms)


def now_ms(dialect_name: str) -> ColumnElement[int]:
    """The store server's clock, in ms since the Unix epoch, as a SQL expression."""
    if dialect_name == "sqlite":
        return literal_column(
            "CAST(ROUND((julianday('now') - 2440587.5) * 86400000) AS INTEGER)", BigInteger
        )
    return literal_column("CAST(ROUND(UNIX_TIMESTAMP(NOW(3)) * 1000) AS SIGNED)", BigInteger)


def who() -> str:
    """``user@host`` of this process, recorded with each push."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry in some containers
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


class MetaStore:
    """The meta store of one cluster, over a SQLAlchemy engine of its own.

    Every operation is one short transaction; SQLite transactions that write begin IMMEDIATE
    (taking the write lock up front), so two processes cannot both read a version and then
    both write it.
    """

    def __init__(self, url: URL | str, *, config: MetaConfig | None = None) -> None:
        self.config = config
        connect = config.connect_timeout_s if config else 5.0
        query = config.query_timeout_s if config else 5.0
        self.engine = _engine(url, connect, query)
        self.url = self.engine.url
        self.dialect = self.engine.dialect.name
        self._now = now_ms(self.dialect)

    @classmethod
    def from_config(cls, config: MetaConfig) -> MetaStore:
        return cls(config.url, config=config)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> MetaStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"MetaStore({safe_url(self.url)!r})"

    # -- transactions -----------------------------------------------------------------------

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        """A transaction on the store; errors of the server or the network become the project's
        tree (MetaStoreUnavailableError when it did not answer)."""
        try:
            with self.engine.begin() as conn:
                yield conn
        except (DBAPIError, PoolTimeoutError) as exc:
            raise self._classify(exc) from exc

    def server_now_ms(self, conn: Connection) -> int:
        return int(conn.execute(select(self._now)).scalar_one())

    @property
    def now(self) -> ColumnElement[int]:
        """The server-clock expression, for statements built by the control plane."""
        return self._now

    def _classify(self, exc: BaseException) -> MetaStoreError:
        orig = exc.orig if isinstance(exc, DBAPIError) else exc
        args = tuple(getattr(orig, "args", ()))
        errno = args[0] if args and isinstance(args[0], int) else None
        where = safe_url(self.url)
        if (
            isinstance(exc, PoolTimeoutError)
            or errno in _UNAVAILABLE
            or (isinstance(exc, DBAPIError) and exc.connection_invalidated)
        ):
            return MetaStoreUnavailableError(
                f"meta store {where} did not answer ({type(orig).__name__} {errno or ''}); routers"
                " keep serving their version; each refuses every write (FencedError) once its"
                " lease has expired unrenewed"
            )
        if isinstance(exc, OperationalError) and self.dialect == "sqlite":
            return MetaStoreUnavailableError(f"meta store {where}: {orig}")
        detail = args[1] if len(args) > 1 else (args[0] if args else type(orig).__name__)
        return MetaStoreError(f"meta store {where}: {errno or ''} {detail}".replace("  ", " "))

    # -- schema -----------------------------------------------------------------------------

    def init(self) -> bool:
        """Create the store's tables and its meta row if missing; True when it created them.
        Idempotent; a store of a newer schema is refused untouched."""
        try:
            with self.engine.begin() as conn:
                existing = set(inspect(conn).get_table_names())
                if meta_table.name in existing:
                    version = conn.execute(select(meta_table.c.schema_version)).scalar()
                    if version is not None and version > SCHEMA_VERSION:
                        raise MetaStoreError(_newer(self.url, version))
                metadata.create_all(conn, checkfirst=True)
                if conn.execute(select(meta_table.c.id)).first() is not None:
                    return False
                conn.execute(
                    meta_table.insert().values(
                        id=1,
                        schema_version=SCHEMA_VERSION,
                        current_version=None,
                        created_at_ms=self._now,
                    )
                )
                return True
        except (DBAPIError, PoolTimeoutError) as exc:
            raise self._classify(exc) from exc

    def check(self, conn: Connection, *, lock: bool = False) -> int | None:
        """The current topology version; MetaStoreError when the store is not initialised or
        newer than this release. ``lock`` holds the meta row until the transaction ends
        (FOR UPDATE; SQLite's BEGIN IMMEDIATE already holds the whole file)."""
        query = select(meta_table.c.schema_version, meta_table.c.current_version)
        try:
            row = conn.execute(query.with_for_update() if lock else query).first()
        except DBAPIError as exc:
            if _missing_table(exc):
                raise MetaStoreError(_not_initialised(self.url)) from None
            raise
        if row is None:
            raise MetaStoreError(_not_initialised(self.url))
        if row.schema_version > SCHEMA_VERSION:
            raise MetaStoreError(_newer(self.url, row.schema_version))
        return None if row.current_version is None else int(row.current_version)

    def status(self) -> StoreStatus:
        where = safe_url(self.url)
        with self.begin() as conn:
            names = set(inspect(conn).get_table_names())
            now = self.server_now_ms(conn)
            if meta_table.name not in names:
                return StoreStatus(where, False, None, None, 0, 0, 0, now)
            row = conn.execute(
                select(meta_table.c.schema_version, meta_table.c.current_version)
            ).first()
            if row is None:
                return StoreStatus(where, False, None, None, 0, 0, 0, now)

            def count(table: Table) -> int:
                return int(conn.execute(select(func.count()).select_from(table)).scalar_one())

            return StoreStatus(
                where,
                True,
                int(row.schema_version),
                None if row.current_version is None else int(row.current_version),
                count(versions_table),
                count(routers_table),
                count(worker_leases_table),
                now,
            )

    # -- topology versions ------------------------------------------------------------------

    def current(self) -> TopologyVersion | None:
        """The current version, or None before the first push."""
        with self.begin() as conn:
            version = self.check(conn)
            return None if version is None else self._get(conn, version)

    def current_version(self) -> int | None:
        """Only the number of the current version: the cheap question a poll asks."""
        with self.begin() as conn:
            return self.check(conn)

    def get(self, version: int) -> TopologyVersion:
        with self.begin() as conn:
            self.check(conn)
            return self._get(conn, version)

    def history(self, limit: int | None = None) -> list[TopologyVersion]:
        """Every pushed version, newest first."""
        with self.begin() as conn:
            self.check(conn)
            query = select(versions_table).order_by(versions_table.c.version.desc())
            if limit is not None:
                query = query.limit(limit)
            return [_version(row, self.url) for row in conn.execute(query)]

    def push(
        self,
        document: Mapping[str, Any],
        *,
        expected: int | None,
        comment: str = "",
        pushed_by: str | None = None,
    ) -> int:
        """Publish ``document`` as the next version, if the current version is still
        ``expected`` (None: no version yet). Returns the new version number. Atomic: the
        version row and the current pointer change in one transaction, and a push that lost
        the race raises ConcurrentChangeError with nothing written."""
        with self.begin() as conn:
            current = self.check(conn, lock=True)  # pushes queue here, one at a time
            if current != expected:
                raise ConcurrentChangeError(_raced(expected, current))
            new = 1 if current is None else current + 1
            body = dict(document)
            body["version"] = new
            conn.execute(
                versions_table.insert().values(
                    version=new,
                    document=json.dumps(body, sort_keys=True, default=str),
                    pushed_by=(pushed_by or who())[:255],
                    pushed_at_ms=self._now,
                    comment=comment,
                )
            )
            moved = conn.execute(
                update(meta_table)
                .where(meta_table.c.id == 1)
                .where(
                    meta_table.c.current_version.is_(None)
                    if current is None
                    else meta_table.c.current_version == current
                )
                .values(current_version=new)
            )
            if moved.rowcount != 1:  # MySQL: another push committed between check and update
                raise ConcurrentChangeError(_raced(expected, None))
            return new

    # -- the router registry (read side; routers write their rows in control.registry) ------

    def routers(self) -> list[RouterRecord]:
        """Every registered router, live or with an expired lease, by instance id."""
        with self.begin() as conn:
            self.check(conn)
            now = self.server_now_ms(conn)
            rows = conn.execute(select(routers_table).order_by(routers_table.c.instance_id))
            return [RouterRecord(**row._mapping, now_ms=now) for row in rows]

    def _get(self, conn: Connection, version: int) -> TopologyVersion:
        row = conn.execute(
            select(versions_table).where(versions_table.c.version == version)
        ).first()
        if row is None:
            raise MetaStoreError(
                f"topology version {version} is not in the meta store {safe_url(self.url)}"
                " (shardctl topology history lists the versions)"
            )
        return _version(row, self.url)


def _version(row: Any, url: URL | str) -> TopologyVersion:
    version = int(row.version)
    return TopologyVersion(
        version=version,
        document=_document(row.document, version, url),
        pushed_by=row.pushed_by,
        pushed_at_ms=int(row.pushed_at_ms),
        comment=row.comment,
    )


def _document(stored: Any, version: int, url: URL | str) -> dict[str, Any]:
    """A stored document, parsed: a JSON object, or MetaStoreDocumentError naming the version
    (the store only ever writes objects: the row was changed outside shardctl)."""
    try:
        document = json.loads(stored)
    except (TypeError, ValueError) as exc:  # JSONDecodeError is a ValueError
        problem = f"is not valid JSON ({exc})"
    else:
        if isinstance(document, dict):
            return document
        problem = f"is a JSON {_json_kind(document)}, not an object"
    raise MetaStoreDocumentError(
        f"topology version {version} in the meta store {safe_url(url)}: its stored document"
        f" {problem}; the row was changed outside shardctl. Restore the document of version"
        f" {version} (table shardrouter_topology_versions) from a backup or the pushed YAML"
        " file as JSON; routers already running keep serving the version they have",
        version,
    )


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    return "string" if isinstance(value, str) else type(value).__name__


def _engine(url: URL | str, connect_timeout_s: float, query_timeout_s: float) -> Engine:
    from sqlalchemy.engine import make_url

    url = make_url(url)
    if url.get_backend_name() == "sqlite":
        engine = create_engine(url, connect_args={"timeout": query_timeout_s})

        @event.listens_for(engine, "connect")
        def _manual_transactions(dbapi_conn: Any, record: Any) -> None:
            # pysqlite's own BEGIN is deferred (the write lock is taken at the first write,
            # too late for read-then-write); SQLAlchemy's begin event issues BEGIN IMMEDIATE.
            dbapi_conn.isolation_level = None
            dbapi_conn.execute("PRAGMA journal_mode=WAL")

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    if url.get_driver_name() in ("aiomysql", "asyncmy"):
        url = url.set(drivername=f"{url.get_backend_name()}+pymysql")
    timeout = int(max(1, round(connect_timeout_s)))
    io = int(max(1, round(query_timeout_s)))
    connect_args: dict[str, Any] = {"connect_timeout": timeout}
    if url.get_driver_name() in ("pymysql", "mysqldb"):
        connect_args.update(read_timeout=io, write_timeout=io)
    return create_engine(
        url,
        pool_size=2,
        max_overflow=4,
        pool_timeout=connect_timeout_s,
        pool_pre_ping=True,
        pool_recycle=3600,
        isolation_level="READ COMMITTED",
        connect_args=connect_args,
    )


def _missing_table(exc: DBAPIError) -> bool:
    args = tuple(getattr(exc.orig, "args", ()))
    if args and args[0] == 1146:  # ER_NO_SUCH_TABLE
        return True
    return "no such table" in str(exc.orig)


def _not_initialised(url: URL) -> str:
    return f"the meta store {safe_url(url)} has no shardrouter tables; run `shardctl meta init`"


def _newer(url: URL, version: int) -> str:
    return (
        f"the meta store {safe_url(url)} has schema version {version}, newer than this release"
        f" knows ({SCHEMA_VERSION}); upgrade shardrouter"
    )


def _raced(expected: int | None, current: int | None) -> str:
    seen = "no version" if expected is None else f"version {expected}"
    now = "another push" if current is None else f"version {current}"
    return (
        f"the topology changed while this push was prepared: it was based on {seen}, the meta"
        f" store now has {now}; re-run the push to diff against the new current version"
    )


__all__ = [
    "SCHEMA_VERSION",
    "TABLES",
    "MetaStore",
    "RouterRecord",
    "StoreStatus",
    "TopologyVersion",
    "checkpoints_table",
    "meta_table",
    "metadata",
    "migrations_table",
    "now_ms",
    "routers_table",
    "versions_table",
    "who",
    "worker_leases_table",
]
