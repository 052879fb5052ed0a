"""``shardctl demo`` and ``shardctl bench``."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ..bench import run_bench
from ..demo import run_demo
from ..topology import Topology
from ._common import REPO_CONFIG, emit_json, handle_errors

F = TypeVar("F", bound=Callable[..., Any])


def _default_config(name: str) -> Path:
    path = REPO_CONFIG / name
    if not path.is_file():
        raise click.UsageError(
            f"no default config at {path} (installed without the repository?); pass --config"
        )
    return path


def _config_defaulting_to(name: str, what: str) -> Callable[[F], F]:
    """``--config``, optional: commands that need no server fall back to config/<name>."""
    return click.option(
        "--config",
        "config_path",
        type=click.Path(dir_okay=False, path_type=Path),
        default=None,
        help=f"{what} (default: config/{name}).",
    )


@click.command("demo")
@_config_defaulting_to("orders-sqlite.yaml", "Topology on SQLite")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the shard files (default: a new temp folder).",
)
@handle_errors
def demo(config_path: Path | None, directory: Path | None) -> None:
    """A tour on SQLite shard files: place orders, route by user and order id, count."""
    config_path = config_path or _default_config("orders-sqlite.yaml")
    directory = directory or Path(tempfile.mkdtemp(prefix="shardrouter-demo-"))
    run_demo(config_path, directory, click.echo)


@click.command("bench")
@_config_defaulting_to("orders.yaml", "Topology; no server is used")
@click.option("-n", "--ops", default=200_000, show_default=True, type=click.IntRange(1000))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 20))
@handle_errors
def bench(config_path: Path | None, ops: int, repeat: int) -> None:
    """Measure routes/s and ids/s on this machine and print JSON."""
    topology = Topology.load(config_path or _default_config("orders.yaml"))
    emit_json(run_bench(topology, ops, repeat))
