"""``shardctl check``: consistency checks across shards."""

from __future__ import annotations

from pathlib import Path

import click

from ..lookups import check_lookups
from ..router import Router
from ._common import config_option, emit_json, handle_errors, json_option


@click.group("check")
def check() -> None:
    """Consistency checks across shards."""


@check.command("lookups")
@config_option
@click.option("--fix", is_flag=True, help="Delete orphan lookup rows (after a grace period).")
@click.option(
    "--grace",
    default=2.0,
    show_default=True,
    type=click.FloatRange(0, 600),
    help="Seconds an orphan must stay one before --fix deletes it.",
)
@json_option
@handle_errors
def lookups(config_path: Path, fix: bool, grace: float, as_json: bool) -> None:
    """Find orphan lookup rows (owner gone) and missing ones (owner without lookup row)."""
    with Router.load(config_path) as router:
        reports = check_lookups(router, fix=fix, grace_s=grace)
    if as_json:
        emit_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            click.echo(
                f"{r.owner}.{r.column} -> {r.lookup_table}: {r.lookup_rows} lookup rows,"
                f" {r.owner_rows} owner rows, {len(r.orphans)} orphans"
                f"{f' ({r.removed} removed)' if fix else ''}, {len(r.missing)} missing"
            )
            for m in r.missing[:10]:
                click.echo(f"  missing lookup row for {r.owner} {m}")
    if any(r.missing for r in reports):
        raise SystemExit(1)
