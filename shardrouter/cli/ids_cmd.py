"""``shardctl ids``: generate and decode ids that carry their shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import config_option, emit_json, handle_errors, json_option, parse_key
from .route import describe_origin, file_only_option, served_config


@click.group("ids")
def ids() -> None:
    """Generate and decode ids."""


@ids.command("new")
@config_option
@click.option("--table", required=True, help="Logical table whose key the ids carry.")
@click.option("--key", required=True, help="COL=VALUE, e.g. user_id=42.")
@click.option("--count", default=1, show_default=True, type=click.IntRange(1, 1_000_000))
@click.option(
    "--worker",
    type=int,
    default=None,
    help="Worker id (default: leased from the meta store with meta:, else ids.worker_id).",
)
@file_only_option
@json_option
@handle_errors
def new(
    config_path: Path,
    table: str,
    key: str,
    count: int,
    worker: int | None,
    file_only: bool,
    as_json: bool,
) -> None:
    """Generate COUNT ids for the row whose sharding key is KEY.

    Each process that generates ids needs its own worker id: two processes with the same
    worker id issue the same ids. With a meta: section the command leases a free worker id
    from the meta store for its own run (given back at its end); without one it uses
    ids.worker_id. --worker overrides both (you then answer for its uniqueness).

    Like `shardctl route`, the slot's shard is that of the meta store's current version when
    the file has a meta: section (the output names the version); --file-only: the file's."""
    from contextlib import ExitStack

    from ..core.topology import Topology

    config, origin = served_config(config_path, file_only)
    topology = Topology(config)
    column, value = parse_key(topology, table, key)
    with ExitStack() as stack:
        if worker is None and topology.config.meta is not None:
            from ..control.leases import WorkerLease

            lease = stack.enter_context(WorkerLease.for_topology(topology))
            generator = lease.generator(topology, table)
        else:
            generator = topology.id_generator(table, worker)
        new_ids = generator.next_ids(count, **{column: value})
    slot = generator.decode(new_ids[0]).slot
    shard = topology.shard_of_slot(slot)
    if as_json:
        data = {
            "table": table,
            "key": {column: value},
            "slot": slot,
            "shard": shard,
            "worker_id": generator.worker_id,
            "ids": new_ids,
        }
        if origin is not None:
            data["topology"] = origin
        emit_json(data)
    else:
        for id_ in new_ids:
            click.echo(id_)
        by = "" if origin is None else f", by {describe_origin(origin, config_path)}"
        click.echo(f"# slot {slot}, shard {shard}, worker {generator.worker_id}{by}", err=True)


@ids.command("decode")
@click.argument("id_text", metavar="ID")
@config_option
@file_only_option
@json_option
@handle_errors
def decode(id_text: str, config_path: Path, file_only: bool, as_json: bool) -> None:
    """Show the timestamp, slot (and its shard), worker and sequence of ID.

    Like `shardctl route`, the slot's shard is that of the meta store's current version when
    the file has a meta: section (the output names the version); --file-only: the file's."""
    from ..core.topology import Topology

    try:
        id_ = int(id_text, 10)
    except ValueError:
        raise click.BadParameter(f"{id_text!r} is not an integer id", param_hint="ID") from None
    config, origin = served_config(config_path, file_only)
    topology = Topology(config)
    d = topology.id_layout.decode(id_)
    data: dict[str, Any] = {
        "id": d.id,
        "timestamp_ms": d.timestamp_ms,
        "time": d.time.isoformat(),
        "slot": d.slot,
        "shard": topology.shard_of_slot(d.slot),
        "worker": d.worker,
        "sequence": d.sequence,
    }
    if as_json:
        if origin is not None:
            data["topology"] = origin
        emit_json(data)
    else:
        if origin is not None:
            click.echo(f"{'topology':<13} {describe_origin(origin, config_path)}")
        for k, v in data.items():
            click.echo(f"{k:<13} {v}")
