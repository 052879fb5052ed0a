"""Helpers shared by the shardctl commands: error mapping, JSON output, key parsing.

The command modules import only click at import time (``shardctl --help`` stays fast); the
library's heavy modules (SQLAlchemy, sqlglot, the async stack) load inside the commands.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from ..errors import ShardRouterError

if TYPE_CHECKING:
    from ..core.topology import Topology

P = ParamSpec("P")
R = TypeVar("R")

REPO_CONFIG = Path(__file__).resolve().parent.parent.parent / "config"

_HINTS = {
    1044: "check the user's grants on that database",
    1045: "check the user name and password in the shard URL",
    1049: "create the database, then run `shardctl schema apply --config FILE`",
    1146: "apply the schema: `shardctl schema apply --config FILE`",
    2003: "is the server running? (`shardctl sandbox status`)",
    2013: "the server dropped the connection; check it is up",
}


def describe_error(exc: BaseException) -> str | None:
    """One line for an error shardctl knows (ours, or a database error); None otherwise.

    Database errors show the server's own message (it names the database or host), never the
    SQLAlchemy wrapper, which carries the statement and its parameters."""
    if isinstance(exc, ShardRouterError):
        return str(exc)
    sa_exc = sys.modules.get("sqlalchemy.exc")  # loaded if the error can be SQLAlchemy's
    if sa_exc is None or not isinstance(exc, sa_exc.SQLAlchemyError):
        return None
    orig = getattr(exc, "orig", None)
    args: tuple[Any, ...] = tuple(getattr(orig, "args", ())) if orig is not None else ()
    if len(args) >= 2 and isinstance(args[0], int):
        hint = _HINTS.get(args[0])
        text = f"database error {args[0]}: {str(args[1]).splitlines()[0] if args[1] else ''}"
        return f"{text} ({hint})" if hint else text
    first = str(orig if orig is not None else exc).splitlines()
    return f"{type(orig or exc).__name__}: {first[0] if first else ''}"


class CommandError(click.ClickException):
    """A one-line error with its own exit status."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def handle_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """Turn a ShardRouterError or a database error into a one-message click error (exit
    status 1, no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            message = describe_error(exc)
            if message is None:
                raise
            raise CommandError(message) from None

    return wrapper


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=str))


_JSON_WANTED = "shardctl.json"


def wants_json(args: list[str]) -> bool:
    """``--json`` among the command line's options (not after a ``--``)."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


class JsonErrorsGroup(click.Group):
    """The shardctl group: with ``--json``, any error of any command (a usage error, ours, a
    database's, an unexpected one) is also one JSON object on stdout,
    ``{"ok": false, "error": ..., "exit_code": n}``, so a script reading stdout always gets
    a document; the text stays on stderr and the exit status stays non-zero.

    The command line is read before click parses it: a usage error can come before the
    ``--json`` option is parsed (``--count abc --json``)."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        wanted = wants_json(list(args))
        try:
            ctx = super().make_context(info_name, args, parent, **extra)
        except click.ClickException as exc:
            # A usage error of the group's own options (`--bogus --json`) comes before invoke.
            if wanted and parent is None:
                emit_json({"ok": False, "error": exc.format_message(), "exit_code": exc.exit_code})
            raise
        ctx.meta[_JSON_WANTED] = wanted  # meta is shared by the subcommands' contexts
        return ctx

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            if ctx.meta.get(_JSON_WANTED) and ctx.parent is None:
                emit_json({"ok": False, "error": exc.format_message(), "exit_code": exc.exit_code})
            raise
        except (click.exceptions.Exit, click.Abort, SystemExit, KeyboardInterrupt):
            raise  # an exit a command chose (its JSON, if any, is printed), or ^C
        except Exception as exc:
            if ctx.meta.get(_JSON_WANTED) and ctx.parent is None:
                # A bug of ours: name it in JSON (its text may hold anything: not shown here);
                # the traceback follows on stderr.
                error = f"internal error: {type(exc).__name__} (the traceback is on stderr)"
                emit_json({"ok": False, "error": error, "exit_code": 1})
            raise


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
