"""``shardctl sandbox``: start, inspect and stop local MariaDB shards for tests and demos."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..errors import SandboxError

if TYPE_CHECKING:
    from ..ops import sandbox as sb

_DIR_OPTION = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path(".sandbox"),
    show_default=True,
    help="Sandbox directory: datadirs, logs, sandbox.json and topology.yaml.",
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of text.")


@click.group(
    "sandbox",
    help="Local MariaDB instances, one mariadbd per shard, for tests and demos.",
)
def sandbox() -> None:
    """The ``sandbox`` command group."""


@sandbox.command("up")
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Number of shards (instances s0..sN-1).",
)
@_DIR_OPTION
@click.option(
    "--base-port",
    type=click.IntRange(min=1, max=65535),
    default=3401,
    show_default=True,
    help="TCP port of s0; shard i listens on base-port + i (127.0.0.1 only).",
)
@click.option(
    "--template",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Topology YAML whose shards are replaced [default: config/orders.yaml].",
)
@_JSON_OPTION
def up_command(
    shards: int, directory: Path, base_port: int, template: Path | None, as_json: bool
) -> None:
    """Start the shards (or keep those already running) and write topology.yaml."""
    from ..core.config import safe_url
    from ..ops import sandbox as sb

    try:
        box = sb.up(directory, shards=shards, base_port=base_port, template=template)
    except SandboxError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps(_sandbox_json(box), indent=2))
        return
    for shard in box.shards:
        click.echo(f"{shard.name}  port {shard.port}  {safe_url(shard.url)}")
    click.echo(f"topology: {box.topology_path}")


@sandbox.command("down")
@_DIR_OPTION
@_JSON_OPTION
def down_command(directory: Path, as_json: bool) -> None:
    """Stop the shards and remove the sandbox's data."""
    from ..ops import sandbox as sb

    try:
        stopped = sb.down(directory)
    except SandboxError as err:
        raise click.ClickException(str(err)) from err
    if as_json:
        click.echo(json.dumps({"directory": str(directory.resolve()), "stopped": stopped}))
    elif stopped:
        click.echo(f"stopped {', '.join(stopped)}; removed the sandbox in {directory}")
    else:
        click.echo(f"nothing was running in {directory}")


@sandbox.command("status")
@_DIR_OPTION
@_JSON_OPTION
def status_command(directory: Path, as_json: bool) -> None:
    """Show the shards recorded in the directory and whether each is running."""
    from ..core.config import safe_url
    from ..ops import sandbox as sb

    try:
        box = sb.status(directory)
    except SandboxError as err:
        raise click.ClickException(str(err)) from err
    if box is None:
        if as_json:
            payload: dict[str, Any] = {
                "directory": str(directory.resolve()),
                "topology": None,
                "shards": [],
            }
            click.echo(json.dumps(payload, indent=2))
        else:
            click.echo(f"no sandbox in {directory}")
        return
    if as_json:
        click.echo(json.dumps(_sandbox_json(box, with_state=True), indent=2))
        return
    for shard in box.shards:
        state = "running" if sb.is_running(shard) else "stopped"
        click.echo(f"{shard.name}  port {shard.port}  {state:<7}  {safe_url(shard.url)}")
    click.echo(f"topology: {box.topology_path}")


def _sandbox_json(box: sb.Sandbox, with_state: bool = False) -> dict[str, Any]:
    from ..core.config import safe_url
    from ..ops import sandbox as sb

    shards: list[dict[str, Any]] = []
    for shard in box.shards:
        entry: dict[str, Any] = {
            "name": shard.name,
            "port": shard.port,
            "url": safe_url(shard.url),
            "socket": str(shard.socket),
            "datadir": str(shard.datadir),
            "pid": shard.pid,
        }
        if with_state:
            entry["running"] = sb.is_running(shard)
        shards.append(entry)
    return {"directory": str(box.directory), "topology": str(box.topology_path), "shards": shards}
