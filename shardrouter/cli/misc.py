"""``shardctl demo`` and ``shardctl bench``."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from ._common import REPO_CONFIG, emit_json, handle_errors, json_option

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
@click.option(
    "--reshard",
    is_flag=True,
    help="Instead: split 2 shards into 4 online on a MariaDB sandbox (started and stopped"
    " by the demo) while a writer keeps writing; the ledger is checked at the end.",
)
@click.option(
    "--port",
    type=click.IntRange(1024, 65000),
    default=3461,
    show_default=True,
    help="--reshard: the sandbox's first port (it takes 4).",
)
@json_option
@handle_errors
def demo(
    config_path: Path | None, directory: Path | None, reshard: bool, port: int, as_json: bool
) -> None:
    """A tour on SQLite shard files: place orders, route by user and order id, count; then the
    control plane on a SQLite meta store (publish, follow, a live change, a refused one).

    --reshard: an online split 2 -> 4 on MariaDB (needs mariadbd, as the tests do): plan,
    start, copy, verify, switch, finalize with writes running; lost/extra/failed counted.

    With --json, the tour's text is left out and its figures are printed as JSON."""
    if reshard:
        from ..ops.demo_reshard import run_reshard_demo

        say = (lambda _: None) if as_json else click.echo
        figures = run_reshard_demo(say, port=port, directory=directory)
        if as_json:
            emit_json(dict(figures))
        if figures["lost"] or figures["extra"] or figures["wrong"] or figures["misplaced"]:
            raise click.ClickException("the ledger and the shards differ (see above)")
        return
    from ..ops.demo import run_demo

    config_path = config_path or _default_config("orders-sqlite.yaml")
    directory = directory or Path(tempfile.mkdtemp(prefix="shardrouter-demo-"))
    figures = run_demo(config_path, directory, (lambda _: None) if as_json else click.echo)
    if as_json:
        emit_json({"directory": str(directory), **dict(figures)})


@click.command("bench")
@_config_defaulting_to("orders.yaml", "Topology; no server is used")
@click.option("-n", "--ops", default=200_000, show_default=True, type=click.IntRange(1000))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1, 20))
@json_option
@handle_errors
def bench(config_path: Path | None, ops: int, repeat: int, as_json: bool) -> None:
    """Measure routes/s and ids/s on this machine and print JSON (always; --json is accepted
    like every command's)."""
    from ..core.topology import Topology
    from ..ops.bench import run_bench

    del as_json  # the output is JSON either way
    topology = Topology.load(config_path or _default_config("orders.yaml"))
    emit_json(run_bench(topology, ops, repeat))
