"""One SQLAlchemy engine per shard (primary and replicas), built once from the topology."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from .config import PoolConfig
from .errors import RoutingError
from .topology import ShardSpec, Topology
from .types import ShardId

# Drivers whose DBAPI takes read/write timeouts: a shard that stops answering mid-query fails
# within the configured time instead of hanging the caller.
_RW_TIMEOUT_DRIVERS = frozenset({"pymysql", "mysqldb"})


def engine_options(url: URL, pool: PoolConfig) -> dict[str, Any]:
    """create_engine keyword arguments for ``url`` with ``pool`` settings and timeouts."""
    if url.get_backend_name() == "sqlite":
        # SQLite files have no server and no pool to size; the demo only needs the defaults.
        return {}
    timeout = int(max(1, round(pool.connect_timeout_s)))
    connect_args: dict[str, Any] = {"connect_timeout": timeout}
    if url.get_driver_name() in _RW_TIMEOUT_DRIVERS:
        connect_args["read_timeout"] = max(timeout, 30)
        connect_args["write_timeout"] = max(timeout, 30)
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

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self._primary: dict[ShardId, Engine] = {}
        self._replicas: dict[ShardId, tuple[Engine, ...]] = {}
        self._next_replica: dict[ShardId, Iterator[Engine]] = {}
        for sid, spec in topology.shards.items():
            self._primary[sid] = _make(spec.primary, spec)
            replicas = tuple(_make(url, spec) for url in spec.replicas)
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

    def dispose(self) -> None:
        for engine in self._primary.values():
            engine.dispose()
        for replicas in self._replicas.values():
            for engine in replicas:
                engine.dispose()


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


__all__ = ["ShardEngines", "async_url", "engine_options", "make_async_engine", "sync_url"]
