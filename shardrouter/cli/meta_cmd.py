"""``shardctl meta``: create and inspect the meta store (and the options that name it)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from ._common import CommandError, describe_error, emit_json, json_option

if TYPE_CHECKING:
    from ..control.store import MetaStore

P = ParamSpec("P")
R = TypeVar("R")

EXIT_ERROR = 1
EXIT_REFUSED = 3
EXIT_RACE = 4
EXIT_NOT_CONFIRMED = 5

STORE_EXIT = """\b
Exit status:
  0  done
  1  the store could not be used: no store named, a config that does not validate, the store
     does not answer or is not initialised (`shardctl meta init`); one line on stderr, and
     with --json {"ok": false, "error": ...} on stdout
  2  usage error (bad option)
"""

store_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Topology YAML whose meta: section names the meta store.",
)
meta_url_option = click.option(
    "--meta-url",
    "meta_url",
    default=None,
    envvar="SHARDROUTER_META_URL",
    help="The meta store's URL (instead of --config; env SHARDROUTER_META_URL).",
)


def control_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Errors of the control plane as one-line click errors with their exit status: an unsafe
    change 3, a lost push race 4, any other known error 1 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from ..errors import ConcurrentChangeError, TopologyChangeError

        try:
            return fn(*args, **kwargs)
        except TopologyChangeError as exc:
            raise CommandError(f"{exc}\nnothing was pushed", EXIT_REFUSED) from None
        except ConcurrentChangeError as exc:
            raise CommandError(f"{exc} (nothing was pushed)", EXIT_RACE) from None
        except Exception as exc:
            message = describe_error(exc)
            if message is None:
                raise
            raise CommandError(message, EXIT_ERROR) from None

    return wrapper


def open_store(config_path: Path | None, meta_url: str | None) -> MetaStore:
    """The meta store named by --meta-url or by the meta: section of --config."""
    from ..control.versions import open_store as _open
    from ..core.config import load_config

    if config_path is None and meta_url is None:
        raise click.UsageError(
            "no meta store named: pass --config FILE (a topology with a meta: section) or"
            " --meta-url URL (or set SHARDROUTER_META_URL)"
        )
    config = load_config(config_path) if config_path is not None else None
    return _open(config, meta_url, str(config_path or "--meta-url"))


def status_dict(store: MetaStore) -> dict[str, Any]:
    from dataclasses import asdict

    return {"ok": True, **asdict(store.status())}


@click.group("meta")
def meta() -> None:
    """The meta store: topology versions, live routers, worker-id leases."""


@meta.command("init", epilog=STORE_EXIT)
@store_config_option
@meta_url_option
@json_option
@control_errors
def init(config_path: Path | None, meta_url: str | None, as_json: bool) -> None:
    """Create the meta store's tables (idempotent: an initialised store is left as it is)."""
    with open_store(config_path, meta_url) as store:
        created = store.init()
        data = {**status_dict(store), "created": created}
    if as_json:
        emit_json(data)
        return
    what = "initialised" if created else "already initialised, left as it is"
    click.echo(f"meta store {data['url']}: {what} (schema version {data['schema_version']})")
    if data["current_version"] is None:
        click.echo("no topology version yet: `shardctl topology push FILE` publishes the first")


@meta.command("status", epilog=STORE_EXIT)
@store_config_option
@meta_url_option
@json_option
@control_errors
def status(config_path: Path | None, meta_url: str | None, as_json: bool) -> None:
    """Show the store's schema version, current topology version and what it holds."""
    with open_store(config_path, meta_url) as store:
        data = status_dict(store)
    if as_json:
        emit_json(data)
        return
    if not data["initialised"]:
        click.echo(f"meta store {data['url']}: not initialised (run `shardctl meta init`)")
        return
    current = data["current_version"]
    click.echo(f"meta store     {data['url']}")
    click.echo(f"schema version {data['schema_version']}")
    click.echo(f"current        {'none (push one)' if current is None else f'v{current}'}")
    click.echo(f"versions       {data['versions']}")
    click.echo(f"routers        {data['routers']} registered")
    click.echo(f"worker leases  {data['worker_leases']}")
