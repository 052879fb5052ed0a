"""``shardctl config``: validate topology files."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigError
from ._common import emit_json, json_option


@click.group("config")
def config() -> None:
    """Check topology configuration files."""


@config.command("validate")
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@json_option
def validate(file: Path, as_json: bool) -> None:
    """Validate FILE; print every problem; exit 0 only when it is valid (1 when not)."""
    from ..core.config import load_config

    try:
        model = load_config(file)
    except ConfigError as exc:
        if as_json:
            emit_json(
                {
                    "ok": False,
                    "error": str(exc),
                    "exit_code": 1,
                    "file": str(file),
                    "valid": False,
                    "problems": list(exc.problems),
                }
            )
        click.echo(str(exc), err=True)  # for a human, as every command's errors
        raise SystemExit(1) from None
    summary = {
        "ok": True,
        "file": str(file),
        "valid": True,
        "problems": [],
        "name": model.name,
        "version": model.version,
        "slots": model.slots,
        "shards": len(model.shards),
        "tables": len(model.tables),
    }
    if as_json:
        emit_json(summary)
    else:
        click.echo(
            f"{file}: valid (topology {model.name!r} v{model.version}: {model.slots} slots,"
            f" {len(model.shards)} shards, {len(model.tables)} tables)"
        )
