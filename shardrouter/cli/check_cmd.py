"""``shardctl check``: consistency checks across shards."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ._common import CommandError, config_option, describe_error, emit_json, json_option

EXIT_PROBLEMS = 1
EXIT_CANNOT_CHECK = 3

_LOOKUPS_EPILOG = f"""\b
Exit status:
  0  every lookup table matches its owner rows (with --fix: after fixing)
  {EXIT_PROBLEMS}  orphan or missing lookup rows found (with --fix: orphans left, or missing rows)
  2  usage error (bad option)
  {EXIT_CANNOT_CHECK}  the check could not run: invalid config, a shard that does not answer,
     tables missing (apply the schema first); one line on stderr, and with --json
     {{"ok": false, "error": ...}} on stdout
"""


@click.group("check")
def check() -> None:
    """Consistency checks across shards."""


@check.command("lookups", epilog=_LOOKUPS_EPILOG)
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
def lookups(config_path: Path, fix: bool, grace: float, as_json: bool) -> None:
    """Find orphan lookup rows (owner gone) and missing ones (owner without lookup row)."""
    try:
        reports = _run_lookups(config_path, fix, grace)
    except Exception as exc:
        message = describe_error(exc)
        if message is None:
            raise
        # Printed by the shardctl group: text on stderr, and with --json one JSON object.
        raise CommandError(f"check lookups: {message}", EXIT_CANNOT_CHECK) from None
    problems = any(r.missing or len(r.orphans) > (r.removed if fix else 0) for r in reports)
    if as_json:
        emit_json([r.as_dict() for r in reports])
    else:
        for r in reports:
            click.echo(
                f"{r.owner}.{r.column} -> {r.lookup_table}: {r.lookup_rows} lookup rows,"
                f" {r.owner_rows} owner rows, {len(r.orphans)} orphans"
                f"{f' ({r.removed} removed)' if fix else ''}, {len(r.missing)} missing"
            )
            for o in r.orphans[:10]:
                click.echo(f"  orphan lookup row {o} (its owner row does not exist)")
            for m in r.missing[:10]:
                click.echo(f"  missing lookup row for {r.owner} {m}")
    if problems:
        raise SystemExit(EXIT_PROBLEMS)


def _run_lookups(config_path: Path, fix: bool, grace: float) -> list[Any]:
    from ..core.config import safe_url
    from ..engine.router import Router
    from ..errors import ShardUnavailableError
    from ..ops.lookups import check_lookups

    with Router.load(config_path) as router:
        # Ask every shard first, so a shard that is down is named (the scan's own error
        # names only a host).
        for shard, engine in router.engines.primaries.items():
            try:
                engine.connect().close()
            except Exception as exc:
                detail = describe_error(exc) or type(exc).__name__
                raise ShardUnavailableError(
                    f"shard {shard} ({safe_url(engine.url)}) does not answer: {detail}", shard=shard
                ) from None
        return check_lookups(router, fix=fix, grace_s=grace)
