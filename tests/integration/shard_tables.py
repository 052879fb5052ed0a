"""Test helpers: create or empty a module's tables on every shard of a router, one DDL template
per logical table, rendered for each physical (split) name; a topology on another driver."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sqlalchemy import text

from shardrouter import Router
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology


def create_tables(router: Router, ddl: Mapping[str, str]) -> None:
    """Drop and create every physical table of ``ddl``'s logical tables on every shard."""
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical, template in ddl.items():
                for name in router.topology.table(logical).physical_names:
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    conn.execute(text(template.format(t=name)))


def empty_tables(router: Router, logical_tables: Iterable[str]) -> None:
    """Delete every row of the given logical tables on every shard."""
    tables = list(logical_tables)
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical in tables:
                for name in router.topology.table(logical).physical_names:
                    conn.execute(text(f"DELETE FROM {name}"))


def with_driver(topology: Topology, driver: str) -> Topology:
    """The same topology with every shard URL on another MySQL driver (``mysql+<driver>``)."""
    raw = topology.config.model_dump(by_alias=True, mode="json")
    for name, shard in raw["shards"].items():
        url = topology.shards[name].primary.set(drivername=f"mysql+{driver}")
        shard["primary"] = url.render_as_string(hide_password=False)
    return Topology(config_from_dict(raw))
