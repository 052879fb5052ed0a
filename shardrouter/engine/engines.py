"""One SQLAlchemy engine per shard (primary and replicas), built once from the topology."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ..core.config import PoolConfig
from ..core.topology import ShardSpec, Topology
from ..errors import ExecutionError, LockConflictError, RoutingError, ShardUnavailableError
from ..types import ShardId

# Drivers whose DBAPI takes read/write timeouts: a shard that stops answering mid-query fails
# within the configured time instead of hanging the caller.
_RW_TIMEOUT_DRIVERS = frozenset({"pymysql", "mysqldb"})


# Driver error numbers (MySQL client/server) meaning "the shard is not answering", as opposed
# to "the statement is wrong": can't connect, server gone, lost connection, too many
# connections, connection killed, server shutdown in progress.
UNAVAILABLE_ERRNOS = frozenset({1040, 1053, 1927, 2002, 2003, 2005, 2006, 2013, 2055})
DEADLOCK_ERRNO = 1213  # ER_LOCK_DEADLOCK: the server rolled back the whole transaction
LOCK_CONFLICT_ERRNOS = frozenset({1205, DEADLOCK_ERRNO})  # and ER_LOCK_WAIT_TIMEOUT


def classify(exc: BaseException, shard: ShardId, statement: str | None = None) -> ExecutionError:
    """Wrap a driver error in the project's tree, naming the shard and keeping the original.

    Classified by the driver's error number (``orig.args[0]``), never by message text.
    """
    if isinstance(exc, PoolTimeoutError):
        return ShardUnavailableError(
            f"shard {shard}: no connection from its pool within the timeout ({exc.args[0]})",
            shard=shard,
            orig=exc,
        )
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ()))
    errno = args[0] if args and isinstance(args[0], int) else None
    detail = args[1] if len(args) > 1 else (args[0] if args else type(orig).__name__)
    if errno in UNAVAILABLE_ERRNOS or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        error: ExecutionError = ShardUnavailableError(
            f"shard {shard} is unavailable ({errno}: {detail}); other shards keep serving",
            shard=shard,
            orig=orig,
        )
    elif errno in LOCK_CONFLICT_ERRNOS:
        error = LockConflictError(
            f"shard {shard}: {errno}: {detail}; another writer held the rows, retry",
            shard=shard,
            orig=orig,
        )
    else:
        code = f"{errno}: " if errno is not None else ""
        error = ExecutionError(f"shard {shard}: {code}{detail}", shard=shard, orig=orig)
    error.statement = statement  # type: ignore[attr-defined]
    return error


def engine_options(url: URL, pool: PoolConfig) -> dict[str, Any]:
    """create_engine keyword arguments for ``url`` with ``pool`` settings and timeouts."""
    if url.get_backend_name() == "sqlite":
        # SQLite files have no server and no pool to size; the demo only needs the defaults.
        return {}
    timeout = int(max(1, round(pool.connect_timeout_s)))
    connect_args: dict[str, Any] = {"connect_timeout": timeout}
    # A URL's own session setup is the operator's choice (it keeps the server's lock wait; an
    # explicit pool.lock_wait_timeout_s with it is refused by the config, ShardConfig).
    if "init_command" not in url.query:
        # Every MySQL driver takes init_command (PyMySQL, mysqlclient, aiomysql, asyncmy), so
        # pooled and lean connections alike wait for a row lock less long than for an answer:
        # a lock held on another shard (two writers taking shards in different orders) ends as
        # LockConflictError, which says "retry", instead of a read timeout that says "shard down".
        connect_args["init_command"] = f"SET SESSION innodb_lock_wait_timeout = {pool.lock_wait_s}"
    if url.get_driver_name() in _RW_TIMEOUT_DRIVERS:
        io_timeout = pool.read_timeout_s  # whole seconds: lock_wait_s is validated below it
        connect_args["read_timeout"] = io_timeout
        connect_args["write_timeout"] = io_timeout
    return {
        "pool_size": pool.size,
        "max_overflow": pool.max_overflow,
        "pool_timeout": pool.timeout_s,
        "pool_recycle": pool.recycle_s,
        "pool_pre_ping": pool.pre_ping,
        "connect_args": connect_args,
    }


class ShardEngines:
    """The engines of every shard of a topology: created once, disposed together.

    Creating an engine opens no connection, so building this for a topology with a dead shard
    succeeds; the dead shard's engine fails when first used.
    """

    def __init__(self, topology: Topology, reuse: ShardEngines | None = None) -> None:
        """``reuse``: the engines of a previous version; an engine whose URL and pool settings
        are unchanged is taken over rather than made again (a new topology version rebuilds
        only what changed, see shardrouter.engine.snapshot)."""
        self.topology = topology
        self._primary: dict[ShardId, Engine] = {}
        self._replicas: dict[ShardId, tuple[Engine, ...]] = {}
        self._next_replica: dict[ShardId, Iterator[Engine]] = {}
        self._by_key: dict[tuple[str, PoolConfig], Engine] = {}
        old = reuse._by_key if reuse is not None else {}

        def make(url: URL, spec: ShardSpec) -> Engine:
            key = (url.render_as_string(hide_password=False), spec.pool)
            engine = self._by_key.get(key) or old.get(key) or _make(url, spec)
            self._by_key[key] = engine
            return engine

        for sid, spec in topology.shards.items():
            self._primary[sid] = make(spec.primary, spec)
            replicas = tuple(make(url, spec) for url in spec.replicas)
            self._replicas[sid] = replicas
            if replicas:
                self._next_replica[sid] = itertools.cycle(replicas)

    def primary(self, shard: ShardId) -> Engine:
        try:
            return self._primary[shard]
        except KeyError:
            raise RoutingError(
                f"shard {shard!r} is not in topology {self.topology.name!r}"
                f" (known: {', '.join(self._primary)})"
            ) from None

    def reader(self, shard: ShardId) -> Engine:
        """A replica of ``shard`` (round robin) when it has any, else its primary."""
        replicas = self._next_replica.get(shard)
        return next(replicas) if replicas is not None else self.primary(shard)

    @property
    def primaries(self) -> Mapping[ShardId, Engine]:
        return dict(self._primary)

    @property
    def all(self) -> list[Engine]:
        """Every engine, each once."""
        return list(self._by_key.values())

    def dropped_by(self, new: ShardEngines) -> list[Engine]:
        """The engines of this set that ``new`` does not take over."""
        kept = {id(e) for e in new._by_key.values()}
        return [e for e in self._by_key.values() if id(e) not in kept]

    def dispose(self) -> None:
        for engine in self._by_key.values():
            engine.dispose()


class AsyncShardEngines:
    """The async primary engines of every shard (the AsyncRouter reads from primaries), with
    the same take-over of unchanged engines as ShardEngines."""

    def __init__(self, topology: Topology, reuse: AsyncShardEngines | None = None) -> None:
        self.topology = topology
        self._primary: dict[ShardId, AsyncEngine] = {}
        self._by_key: dict[tuple[str, PoolConfig], AsyncEngine] = {}
        old = reuse._by_key if reuse is not None else {}
        for sid, spec in topology.shards.items():
            key = (spec.primary.render_as_string(hide_password=False), spec.pool)
            engine = self._by_key.get(key) or old.get(key)
            if engine is None:
                engine = make_async_engine(spec.primary, spec.pool)
            self._primary[sid] = self._by_key[key] = engine

    def primary(self, shard: ShardId) -> AsyncEngine:
        try:
            return self._primary[shard]
        except KeyError:
            raise RoutingError(f"shard {shard!r} is not in the topology") from None

    @property
    def all(self) -> list[AsyncEngine]:
        return list(self._by_key.values())

    def dropped_by(self, new: AsyncShardEngines) -> list[AsyncEngine]:
        kept = {id(e) for e in new._by_key.values()}
        return [e for e in self._by_key.values() if id(e) not in kept]


def _make(url: URL, spec: ShardSpec) -> Engine:
    url = sync_url(url)
    return create_engine(url, **engine_options(url, spec.pool))


def sync_url(url: URL) -> URL:
    """The sync twin of an async URL (aiomysql/asyncmy -> pymysql); sync URLs kept.

    One topology serves both routers: written with async drivers it still gives the sync
    router (and the CLI) a working engine.
    """
    if url.get_driver_name() in ("aiomysql", "asyncmy"):
        return url.set(drivername=f"{url.get_backend_name()}+pymysql")
    return url


def async_url(url: URL) -> URL:
    """The async twin of a sync MySQL URL: pymysql/mysqldb -> aiomysql; async URLs kept."""
    if url.get_backend_name() == "sqlite":
        return url.set(drivername="sqlite+aiosqlite")
    if url.get_driver_name() in ("aiomysql", "asyncmy"):
        return url
    return url.set(drivername=f"{url.get_backend_name()}+aiomysql")


def make_async_engine(url: URL, pool: PoolConfig) -> AsyncEngine:
    options = engine_options(url, pool)
    options.get("connect_args", {}).pop("read_timeout", None)
    options.get("connect_args", {}).pop("write_timeout", None)
    return create_async_engine(async_url(url), **options)


__all__ = [
    "UNAVAILABLE_ERRNOS",
    "AsyncShardEngines",
    "ShardEngines",
    "async_url",
    "classify",
    "engine_options",
    "make_async_engine",
    "sync_url",
]
