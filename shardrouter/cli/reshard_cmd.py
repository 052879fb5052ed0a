"""``shardctl reshard``: plan, run and watch an online resharding migration (docs/RESHARDING.md).

Thin: every command opens the meta store, calls ``shardrouter.reshard``, prints (text, or one
JSON document with ``--json``). Progress bars (rate, ETA) go to stderr on a terminal only.
"""

from __future__ import annotations

import functools
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

import click

from ._common import CommandError, emit_json, json_option
from .meta_cmd import (
    EXIT_NOT_CONFIRMED,
    EXIT_RACE,
    EXIT_REFUSED,
    control_errors,
    meta_url_option,
    open_store,
    store_config_option,
)

if TYPE_CHECKING:
    from ..control.store import MetaStore
    from ..reshard.workflow import Workflow

P = ParamSpec("P")
R = TypeVar("R")

_EXIT = f"""\b
Exit status:
  0  done
  1  the migration could not go on: a store or shard that does not answer, data that cannot
     take part (the message names it); nothing is half-applied: `resume` continues
  2  usage error (bad option)
  {EXIT_REFUSED}  refused: the action is not legal in the migration's phase (the message lists
     the legal ones), or a plan that cannot be made
  {EXIT_RACE}  another process changed the migration or the topology first: re-run
  {EXIT_NOT_CONFIRMED}  not confirmed (finalize and cancel delete rows: pass --yes)
With --json, a failure is one JSON object {{"ok": false, "error": ..., "exit_code": n}} on stdout.
"""


def reshard_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A refused action or plan exits 3 with its reason and the legal next steps."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        from ..errors import ReshardPlanError, ReshardStateError

        try:
            return fn(*args, **kwargs)
        except (ReshardStateError, ReshardPlanError) as exc:
            raise CommandError(str(exc), EXIT_REFUSED) from None

    return control_errors(wrapper)


run_options = [
    click.option(
        "--chunk",
        type=click.IntRange(1, 100_000),
        default=2000,
        show_default=True,
        help="Rows per chunk of the backfill and of the deletes (finalize, cancel, rollback).",
    ),
    click.option(
        "--max-rows-per-s",
        type=click.FloatRange(min=1),
        default=None,
        help="Throttle the copy and the deletes (rows read per second).",
    ),
    click.option(
        "--freeze-timeout",
        type=click.FloatRange(min=0.01, max=30),
        default=0.5,
        show_default=True,
        help="Seconds the switch may hold writes; past it the switch is abandoned.",
    ),
    click.option(
        "--ack-timeout",
        type=click.FloatRange(min=0.1),
        default=60.0,
        show_default=True,
        help="Seconds to wait for every live router to acknowledge a version.",
    ),
]


def _with(options: list[Callable[[Any], Any]]) -> Callable[[Any], Any]:
    def apply(fn: Any) -> Any:
        for option in reversed(options):
            fn = option(fn)
        return fn

    return apply


@contextmanager
def _pausable(flow: Workflow) -> Iterator[threading.Event]:
    """Ctrl-C (SIGINT) or SIGTERM pauses the running action at its next chunk (checkpointed:
    `resume` continues); a second Ctrl-C interrupts at once."""
    paused = threading.Event()

    def pause(signum: int, frame: object) -> None:
        if paused.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        paused.set()
        click.echo("pausing at the next chunk (Ctrl-C again to stop at once) ...", err=True)

    previous = {sig: signal.signal(sig, pause) for sig in (signal.SIGINT, signal.SIGTERM)}
    flow.stop = paused.is_set
    try:
        yield paused
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _flow(store: MetaStore, migration_id: str | None, as_json: bool, **run: Any) -> Workflow:
    from ..reshard import state
    from ..reshard.workflow import Options, Workflow
    from ._progress import TextProgress

    if migration_id is None:
        active = state.active(store)
        if len(active) != 1:
            names = ", ".join(m.migration_id for m in active) or "none"
            raise click.UsageError(
                f"name the migration (active: {names}); `shardctl reshard list` shows all"
            )
        migration_id = active[0].migration_id
    options = Options(
        chunk=run.get("chunk", 2000),
        max_rows_per_s=run.get("max_rows_per_s"),
        freeze_timeout_s=run.get("freeze_timeout", 0.5),
        ack_timeout_s=run.get("ack_timeout", 60.0),
    )
    progress = TextProgress()
    if as_json:
        progress.enabled = False
    return Workflow(store, migration_id, options, progress)


@click.group("reshard")
def reshard() -> None:
    """Move slots between shards while the service writes: plan, start, status, advance,
    run, switch-reads --shadow, drain, rollback, resume, cancel, finalize (docs/RESHARDING.md)."""


@reshard.command("plan", epilog=_EXIT)
@store_config_option
@meta_url_option
@click.option(
    "--to",
    "to",
    default=None,
    help="The proposed topology YAML (new shards, new slot ranges); with --move: the "
    "shard the slots go to.",
)
@click.option("--split", "split", default=None, help="Split this shard's slots ...")
@click.option(
    "--into",
    "into",
    default=None,
    help="... into these shards (comma-separated; new ones must be in --config with slots: []).",
)
@click.option("--move", "move", default=None, help="Move slots START:END (with --to SHARD).")
@json_option
@reshard_errors
def plan_cmd(
    config_path: Path | None,
    meta_url: str | None,
    to: str | None,
    split: str | None,
    into: str | None,
    move: str | None,
    as_json: bool,
) -> None:
    """Compute the moves from the current version and store the plan (nothing runs yet)."""
    from ..control.versions import normalise, read_proposal
    from ..core.config import parse_yaml
    from ..errors import ConfigError, ReshardPlanError
    from ..reshard import plan as planning
    from ..reshard import state

    chosen = [x for x in (split, move) if x] + ([to] if to and not move else [])
    if len(chosen) != 1 or (split and not into) or (move and not to):
        raise click.UsageError(
            "give exactly one of: --to NEW.yaml | --split SHARD --into A,B | --move START:END"
            " --to SHARD"
        )
    with open_store(config_path, meta_url) as store:
        current = store.current()
        if current is None:
            raise CommandError("the meta store has no topology version yet: push one first", 1)
        before = normalise(current.document)
        new_shards: dict[str, Any] = {}
        if config_path is not None:
            raw = parse_yaml(config_path.read_text(encoding="utf-8"), str(config_path))
            new_shards = {
                k: v for k, v in (raw.get("shards") or {}).items() if k not in before["shards"]
            }
        mid = planning.new_migration_id(current.version)
        if split:
            names = [n.strip() for n in (into or "").split(",") if n.strip()]
            made = planning.plan_split(
                before, split, names, new_shards, base_version=current.version, migration_id=mid
            )
        elif move:
            try:
                start, end = (int(x) for x in move.split(":"))
            except ValueError:
                raise click.UsageError(f"--move {move!r}: write START:END, e.g. 0:128") from None
            made = planning.plan_move(
                before,
                (start, end),
                str(to),
                new_shards,
                base_version=current.version,
                migration_id=mid,
            )
        else:
            try:
                proposal = read_proposal(str(to))
            except ConfigError as exc:  # a plan that cannot be made: refused (3), as the rest
                raise ReshardPlanError([f"--to {to}: {p}" for p in exc.problems]) from None
            made = planning.plan_to(
                before, proposal.document, base_version=current.version, migration_id=mid
            )
        state.create(store, made)
    if as_json:
        emit_json({"ok": True, "plan": made.as_dict()})
        return
    click.echo(f"planned migration {made.migration_id} (from version {made.base_version}):")
    for text in made.describe():
        click.echo(f"  {text}")
    click.echo(f"next: shardctl reshard start {made.migration_id}")


def _action(name: str, help_text: str, *, confirm: bool = False) -> None:
    @reshard.command(name, epilog=_EXIT, help=help_text)
    @click.argument("migration_id", required=False)
    @store_config_option
    @meta_url_option
    @_with(run_options)
    @click.option("--yes", is_flag=True, help="Confirm (finalize and cancel delete rows).")
    @json_option
    @reshard_errors
    def command(
        migration_id: str | None,
        config_path: Path | None,
        meta_url: str | None,
        yes: bool,
        as_json: bool,
        **run: Any,
    ) -> None:
        if confirm and not yes:
            raise CommandError(f"{name} deletes rows: pass --yes to confirm", EXIT_NOT_CONFIRMED)
        with (
            open_store(config_path, meta_url) as store,
            _flow(store, migration_id, as_json, **run) as flow,
            _pausable(flow) as paused,
        ):
            if name == "advance":
                migration = flow.advance()
            elif name == "resume":
                migration = flow.resume()
            else:
                migration = flow.act(name.replace("-", "_"))
        from ..reshard.phases import legal

        allowed = list(legal(migration.phase))
        if as_json:
            emit_json(
                {
                    "ok": True,
                    "migration": migration.migration_id,
                    "phase": migration.phase,
                    "paused": paused.is_set(),
                    "legal": allowed,
                }
            )
            return
        click.echo(f"migration {migration.migration_id}: {migration.phase}")
        if paused.is_set():
            click.echo("paused: `shardctl reshard resume` continues from the checkpoints")
        if allowed:
            click.echo(f"next: {', '.join(allowed)}")


for _name, _help, _confirm in (
    ("start", "Add the new shards, apply the schema, switch the journals on.", False),
    ("copy", "Backfill the moving rows (resumable; the journal keeps the copy current).", False),
    ("verify", "Compare both sides row by row, repair differences, record the result.", False),
    ("switch", "Hold writes to the moving slots, drain, make the target the authority.", False),
    ("advance", "Run the next action of the forward path (never finalize).", False),
    ("resume", "Continue an interrupted action from the stored phase and checkpoints.", False),
    (
        "rollback",
        "Return the moving slots to their source (nothing lost, also after the switch).",
        False,
    ),
    ("cancel", "Roll back and delete the target's copy (before the switch only).", True),
    ("finalize", "Stop the mirror and delete the moved rows from the sources.", True),
):
    _action(_name, _help, confirm=_confirm)


NEW_READS_REFUSED = (
    "switch-reads without --shadow (serving reads from the targets before the switch) is"
    " refused: a target's copy lags its source by the drain, so a read served there could miss"
    " a write the caller made a moment ago. Reads move with the writes at `shardctl reshard"
    " switch` (writes held, journal drained to zero, then both move). Compare first:"
    " `shardctl reshard switch-reads --shadow --percent 10 --seconds 60`; to move traffic in"
    " steps, move fewer slots at a time (`shardctl reshard plan --move START:END --to SHARD`)"
)


@reshard.command("switch-reads", epilog=_EXIT)
@click.argument("migration_id", required=False)
@store_config_option
@meta_url_option
@click.option(
    "--shadow",
    is_flag=True,
    help="SHADOW reads: answers still come from the sources; the routers also read the"
    " targets and count the answers that differ.",
)
@click.option(
    "--percent",
    type=click.IntRange(1, 100),
    default=100,
    show_default=True,
    help="Share of the moving slots compared (by slot: a key is always in or out).",
)
@click.option(
    "--seconds",
    type=click.FloatRange(min=1, max=86_400),
    default=60.0,
    show_default=True,
    help="How long shadow reads run (Ctrl-C ends them early); then they stop.",
)
@_with(run_options)
@json_option
@reshard_errors
def switch_reads_cmd(
    migration_id: str | None,
    config_path: Path | None,
    meta_url: str | None,
    shadow: bool,
    percent: int,
    seconds: float,
    as_json: bool,
    **run: Any,
) -> None:
    """Read modes before the switch: --shadow compares the targets with the sources under the
    service's real reads for a while (copied or verified migrations), then reports how many
    answers differed (exit 1 if any did). Reads are served from the targets only by
    `switch`, together with the writes."""
    if not shadow:
        raise CommandError(NEW_READS_REFUSED, EXIT_REFUSED)
    with (
        open_store(config_path, meta_url) as store,
        _flow(store, migration_id, as_json, **run) as flow,
        _pausable(flow),
    ):
        report = flow.shadow(percent, seconds)
    if as_json:
        emit_json({"ok": True, "migration": flow.migration_id, "shadow": report})
        return
    click.echo(shadow_text(report))


@reshard.command("drain", epilog=_EXIT)
@click.argument("migration_id", required=False)
@store_config_option
@meta_url_option
@click.option(
    "--seconds",
    type=click.FloatRange(min=0, max=86_400),
    default=0.0,
    show_default=True,
    help="Keep draining this long (0: once, to empty; Ctrl-C ends it early).",
)
@_with(run_options)
@json_option
@reshard_errors
def drain_cmd(
    migration_id: str | None,
    config_path: Path | None,
    meta_url: str | None,
    seconds: float,
    as_json: bool,
    **run: Any,
) -> None:
    """Copy the journals' changes into the mirrors now (the targets before the switch, the
    sources after it): keeps a waiting migration's journals short and a rollback quick."""
    with (
        open_store(config_path, meta_url) as store,
        _flow(store, migration_id, as_json, **run) as flow,
        _pausable(flow),
    ):
        report = flow.drain(seconds)
    if as_json:
        emit_json({"ok": True, "migration": flow.migration_id, **report})
        return
    left = ", ".join(f"{k} {v}" for k, v in report["left"].items())
    click.echo(
        f"drained {report['entries']:,} journal entries into the {report['into']}; left: {left}"
    )


def shadow_text(report: dict[str, Any]) -> str:
    return (
        f"shadow reads on {report['percent']}% of the moving slots for {report['seconds']:g} s"
        f" ({report['routers']} routers): {report['compared']:,} compared, {report['equal']:,}"
        f" equal, {report['lagged']:,} lagged (equal on recheck), {report['differed']:,}"
        f" differed, {report['errors']:,} not compared (errors), {report['dropped']:,} dropped"
        " (worker busy)"
    )


@reshard.command("run", epilog=_EXIT)
@click.argument("migration_id", required=False)
@store_config_option
@meta_url_option
@_with(run_options)
@click.option(
    "--through",
    type=click.Choice(["switched", "finalized"]),
    default="switched",
    show_default=True,
    help="Stop after this phase (finalize needs --yes).",
)
@click.option("--yes", is_flag=True, help="Confirm finalize (it deletes the moved rows).")
@json_option
@reshard_errors
def run_cmd(
    migration_id: str | None,
    config_path: Path | None,
    meta_url: str | None,
    through: str,
    yes: bool,
    as_json: bool,
    **run: Any,
) -> None:
    """Every action up to the switch (or through finalize with --yes)."""
    if through == "finalized" and not yes:
        raise CommandError("--through finalized deletes rows: pass --yes", EXIT_NOT_CONFIRMED)
    with (
        open_store(config_path, meta_url) as store,
        _flow(store, migration_id, as_json, **run) as flow,
    ):
        migration = flow.run("finalized" if through == "finalized" else "switched")
    if as_json:
        emit_json({"ok": True, "migration": migration.migration_id, "phase": migration.phase})
        return
    click.echo(f"migration {migration.migration_id}: {migration.phase}")


@reshard.command("status", epilog=_EXIT)
@click.argument("migration_id", required=False)
@store_config_option
@meta_url_option
@json_option
@reshard_errors
def status_cmd(
    migration_id: str | None, config_path: Path | None, meta_url: str | None, as_json: bool
) -> None:
    """Phase, rows copied per table (real counts), journal backlog, verify, routers, events."""
    with open_store(config_path, meta_url) as store, _flow(store, migration_id, as_json) as flow:
        data = flow.status()
    if as_json:
        emit_json({"ok": True, **data})
        return

    def eta_text(seconds: float) -> str:
        minutes, rest = divmod(int(seconds), 60)
        return f"{minutes}:{rest:02d}"

    click.echo(f"migration {data['migration']}: {data['phase']}")
    for m in data["moves"]:
        click.echo(f"  slots [{m['slots'][0]}, {m['slots'][1]}) {m['source']} -> {m['target']}")
    for (table, source, target), (copied, total) in _by_table(data["tables"]).items():
        click.echo("  " + bar(f"{table:<16} {source}->{target}", copied, total))
    copy = data["copy"]
    if copy["total"] is not None:
        rate = f", {copy['rows_per_s']:,.0f} rows/s" if copy["rows_per_s"] else ""
        eta = f", ETA {eta_text(copy['eta_s'])}" if copy["eta_s"] is not None else ""
        click.echo(f"  copied {copy['copied']:,} of {copy['total']:,} rows{rate}{eta}")
    if data["journal_backlog"]:
        backlog = ", ".join(
            f"{k} {v if v is not None else '?'}" for k, v in data["journal_backlog"].items()
        )
        click.echo(f"  journal backlog: {backlog}")
    if data["verify"]:
        v = data["verify"]
        click.echo(
            f"  verify: {'equal' if v['equal'] else 'DIFFERENT'}"
            f" ({sum(t['rows_source'] for t in v['tables']):,} rows compared,"
            f" {sum(t['repaired'] for t in v['tables'])} repaired)"
        )
    if data.get("shadow"):
        click.echo("  " + shadow_text(data["shadow"]))
    if data["switch"]:
        click.echo(f"  switch: writes held {data['switch']['freeze_s'] * 1000:.0f} ms")
    cluster = data["cluster"]
    routers = cluster.get("routers", [])
    lagging = len(cluster.get("lagging", []))
    click.echo(
        f"  routers: {len(routers)} registered, {lagging} behind version"
        f" {cluster.get('current_version')}"
    )
    for event in data["events"][-4:]:
        when = time.strftime("%H:%M:%S", time.gmtime(event["at_ms"] / 1000))
        click.echo(f"  {when} {event['message']}")
    if data["legal"]:
        click.echo(f"next: {', '.join(data['legal'])}")


def _by_table(tables: list[dict[str, Any]]) -> dict[tuple[str, str, str], tuple[int, int | None]]:
    """Rows copied / total per logical table and pair (a split table's physical tables
    added up: orders_0000..orders_0003 are orders)."""
    out: dict[tuple[str, str, str], tuple[int, int | None]] = {}
    for t in tables:
        logical = re.sub(r"_\d{4}$", "", t["table"])
        key = (logical, t["source"], t["target"])
        copied, total = out.get(key, (0, 0))
        if total is None or t["total"] is None:
            out[key] = (copied + t["copied"], None)
        else:
            out[key] = (copied + t["copied"], total + t["total"])
    return out


def bar(name: str, done: int, total: int | None, width: int = 20) -> str:
    if not total:
        return f"{name} {done:,} rows"
    filled = min(width, int(width * done / total))
    return f"{name} [{'#' * filled}{'.' * (width - filled)}] {done:,}/{total:,} rows"


@reshard.command("list", epilog=_EXIT)
@store_config_option
@meta_url_option
@json_option
@reshard_errors
def list_cmd(config_path: Path | None, meta_url: str | None, as_json: bool) -> None:
    """Every migration in the store with its phase."""
    from ..reshard import state

    with open_store(config_path, meta_url) as store:
        rows = [
            {"migration": m.migration_id, "phase": m.phase, "moves": len(m.plan.moves)}
            for m in state.all(store)
        ]
    if as_json:
        emit_json({"ok": True, "migrations": rows})
        return
    if not rows:
        click.echo("no migrations")
    for r in rows:
        click.echo(f"{r['migration']}  {r['phase']}  ({r['moves']} moving ranges)")


__all__ = ["reshard"]
