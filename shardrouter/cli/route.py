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

    fallback = "; pass --file-only to use the file alone"
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
    current = version_config(found)
    if current.meta is None:  # pushed with --meta-url: served by the store it was read from
        current = current.model_copy(update={"meta": config.meta})
    return current, origin


def served_config(
    config_path: Path, file_only: bool
) -> tuple[TopologyConfig, dict[str, Any] | None]:
    """The config a command routes by: with meta:, the store's current version (what routers
    serve) unless ``file_only``; else the file. Also where it came from (None: no meta:)."""
    from ..core.config import load_config

    config = load_config(config_path)
    if config.meta is None:
        return config, None
    if file_only:
        return config, {"source": "file", "version": None, "file": str(config_path)}
    return _current(config, str(config_path))


def describe_origin(origin: dict[str, Any], config_path: Path) -> str:
    """Which topology the output is by, in words."""
    if origin["source"] == "meta_store":
        return f"version {origin['version']} (current in meta store {origin['meta_url']})"
    return f"file {config_path} (--file-only: not the meta store's current version)"


file_only_option = click.option(
    "--file-only",
    is_flag=True,
    help="Use the file even when its meta: names a meta store (default: the store's current"
    " version).",
)


@click.command("route")
@config_option
@click.option("--table", required=True, help="Logical table, e.g. orders.")
@click.option("--key", required=True, help="COL=VALUE, e.g. user_id=42.")
@file_only_option
@json_option
@handle_errors
def route(config_path: Path, table: str, key: str, file_only: bool, as_json: bool) -> None:
    """Show the keyspace id, slot, shard and physical table of one key.

    When the file has a meta: section, the key is routed by the meta store's current version
    (what routers serve) and the output names that version; --file-only routes by the file.
    A store that does not answer is an error (exit status 1), never a silent fall back to the
    file."""
    from ..core.topology import Topology

    config, origin = served_config(config_path, file_only)
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
        click.echo(f"topology        {describe_origin(origin, config_path)}")
    click.echo("\n".join(_describe(result)))
