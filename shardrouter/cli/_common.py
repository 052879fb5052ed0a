"""Helpers shared by the shardctl commands: error mapping, JSON output, key parsing."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import click

from ..errors import ShardRouterError
from ..topology import Topology

P = ParamSpec("P")
R = TypeVar("R")

REPO_CONFIG = Path(__file__).resolve().parent.parent.parent / "config"


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a ShardRouterError into a one-message click error (exit status 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except ShardRouterError as exc:
            raise click.ClickException(str(exc)) from None

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


config_option = click.option(
    "--config",
    "config_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Topology YAML file.",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON for machines.")


def parse_key(topology: Topology, table: str, key: str) -> tuple[str, Any]:
    """Split ``COL=VALUE`` and parse VALUE by the column's declared type."""
    column, sep, text = key.partition("=")
    if not sep or not column:
        raise click.BadParameter(f"{key!r} is not COL=VALUE (e.g. user_id=42)", param_hint="--key")
    rule = topology.table(table).key(column)
    try:
        return column, rule.key_type.parse(text)
    except ValueError as exc:
        raise click.BadParameter(
            f"{table}.{column}: {exc} (the column is declared {rule.key_type.value})",
            param_hint="--key",
        ) from None
