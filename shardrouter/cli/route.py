"""``shardctl route``: show where a key goes, step by step.

With a topology whose ``meta:`` names a meta store, the key is routed by the store's current
version (what routers serve), not by the file, which may be older or newer: the output names
the version. ``--file-only`` routes by the file itself (offline, or to try a change before
pushing it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._common import config_option, emit_json, handle_errors, json_option, parse_key

if TYPE_CHECKING:
    from ..core.config import TopologyConfig
    from ..core.topology import Route


def _describe(route: Route) -> list[str]:
    lines = [
        f"table           {route.table}",
        f"column          {route.column}",
        f"value           {route.value!r}",
        f"strategy        {route.strategy}",
    ]
    if route.via is not None:
        via = route.via
        lines.append(
            f"via lookup      {via.table} (slot {via.slot}, shard {via.shard},"
            f" table {via.physical_table}): the lookup row names the owning rows' keys"
        )
        return lines
    ksid = "-" if route.keyspace_id is None else f"{route.keyspace_id:016x}"
    lines += [
        f"keyspace_id     {ksid}",
        f"slot            {route.slot}",
        f"shard           {route.shard}",
        f"physical_table  {route.physical_table}",
    ]
    return lines


def _current(config: TopologyConfig, source: str) -> tuple[TopologyConfig, dict[str, Any]]:
    """The meta store's current version (validated here) and where it came from."""
    from ..control.versions import open_store, version_config
    from ..core.config import safe_url
    from ..errors import MetaStoreError, MetaStoreUnavailableError

    fallback = "; pass --file-only to route by the file alone"
    try:
        with open_store(config, None, source) as store:
            url = safe_url(store.url)
            found = store.current()
    except MetaStoreUnavailableError as exc:
        raise MetaStoreUnavailableError(f"{exc}{fallback}") from None
    except MetaStoreError as exc:
        if type(exc) is not MetaStoreError:
            raise
        raise MetaStoreError(f"{exc}{fallback}") from None
    if found is None:
        raise MetaStoreError(
            f"the meta store {url} has no version yet (`shardctl topology push {source}`"
            f" publishes the first){fallback}"
        )
    origin = {"source": "meta_store", "version": found.version, "meta_url": url}
    return version_config(found), origin


@click.command("route")
@config_option
@click.option("--table", required=True, help="Logical table, e.g. orders.")
@click.option("--key", required=True, help="COL=VALUE, e.g. user_id=42.")
@click.option(
    "--file-only",
    is_flag=True,
    help="Route by the file even when its meta: names a meta store (default: by the store's"
    " current version).",
)
@json_option
@handle_errors
def route(config_path: Path, table: str, key: str, file_only: bool, as_json: bool) -> None:
    """Show the keyspace id, slot, shard and physical table of one key.

    When the file has a meta: section, the key is routed by the meta store's current version
    (what routers serve) and the output names that version; --file-only routes by the file.
    A store that does not answer is an error (exit status 1), never a silent fall back to the
    file."""
    from ..core.config import load_config
    from ..core.topology import Topology

    config = load_config(config_path)
    origin: dict[str, Any] | None = None
    if config.meta is not None:
        if file_only:
            origin = {"source": "file", "version": None, "file": str(config_path)}
        else:
            config, origin = _current(config, str(config_path))
    topology = Topology(config)
    column, value = parse_key(topology, table, key)
    result = topology.route(table, column, value)
    if as_json:
        data = result.as_dict()
        if origin is not None:
            data["topology"] = origin
        emit_json(data)
        return
    if origin is not None:
        if origin["source"] == "meta_store":
            where = f"version {origin['version']} (current in meta store {origin['meta_url']})"
        else:
            where = f"file {config_path} (--file-only: not the meta store's current version)"
        click.echo(f"topology        {where}")
    click.echo("\n".join(_describe(result)))
