"""``shardctl route``: show where a key goes, step by step."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ._common import config_option, emit_json, handle_errors, json_option, parse_key

if TYPE_CHECKING:
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


@click.command("route")
@config_option
@click.option("--table", required=True, help="Logical table, e.g. orders.")
@click.option("--key", required=True, help="COL=VALUE, e.g. user_id=42.")
@json_option
@handle_errors
def route(config_path: Path, table: str, key: str, as_json: bool) -> None:
    """Show the keyspace id, slot, shard and physical table of one key."""
    from ..core.topology import Topology

    topology = Topology.load(config_path)
    column, value = parse_key(topology, table, key)
    result = topology.route(table, column, value)
    if as_json:
        emit_json(result.as_dict())
    else:
        click.echo("\n".join(_describe(result)))
