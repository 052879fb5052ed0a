"""``shardctl schema``: apply the versioned DDL of ``migrations/`` to every shard."""

from __future__ import annotations

from pathlib import Path

import click

from ._common import config_option, emit_json, handle_errors, json_option

dir_option = click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of NNNN_description.sql files (default: migrations/ of the repository).",
)


@click.group("schema")
def schema() -> None:
    """Versioned DDL across shards: migrations/ in logical names, applied to every shard."""


@schema.command("apply")
@config_option
@dir_option
@json_option
@handle_errors
def apply_command(config_path: Path, directory: Path | None, as_json: bool) -> None:
    """Apply the pending migrations on every shard; exit 1 if any shard failed."""
    from ..core.topology import Topology
    from ..engine.engines import ShardEngines
    from ..ops.schema import apply, describe_failure, load_migrations

    topology = Topology.load(config_path)
    migrations = load_migrations(directory)
    labels = {m.version: m.label for m in migrations}

    def progress(shard: str, version: int, outcome: str) -> None:
        click.echo(f"{shard}  {labels.get(version, version)}  {outcome}")

    engines = ShardEngines(topology)
    try:
        report = apply(topology, engines, migrations, progress=None if as_json else progress)
    finally:
        engines.dispose()
    if as_json:
        emit_json(report.as_dict())
        if not report.ok:
            raise SystemExit(1)
        return
    applied = sum(len(s.applied) for s in report.shards)
    skipped = sum(len(s.skipped) for s in report.shards)
    click.echo(
        f"{len(report.shards)} shards: {len(report.shards) - len(report.failed)} ok,"
        f" {len(report.failed)} failed; {applied} versions applied, {skipped} already applied"
    )
    if not report.ok:
        lines = []
        for failed in report.failed:
            lines.append(describe_failure(failed))
            if failed.error is not None and failed.error.statement:
                lines.append(f"    statement: {failed.error.statement}")
        raise click.ClickException(
            f"schema apply failed on {len(report.failed)} of {len(report.shards)} shards:\n  "
            + "\n  ".join(lines)
        )


@schema.command("status")
@config_option
@json_option
@handle_errors
def status_command(config_path: Path, as_json: bool) -> None:
    """Show the versions applied on every shard."""
    from ..core.topology import Topology
    from ..engine.engines import ShardEngines
    from ..ops.schema import status

    topology = Topology.load(config_path)
    engines = ShardEngines(topology)
    try:
        versions = status(topology, engines)
    finally:
        engines.dispose()
    if as_json:
        emit_json({"shards": {sid: applied for sid, applied in versions.items()}})
        return
    for sid, applied in versions.items():
        shown = ", ".join(str(v) for v in applied) or "none"
        click.echo(f"{sid}  applied: {shown}")


__all__ = ["schema"]
