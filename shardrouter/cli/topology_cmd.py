"""``shardctl topology``: publish, inspect and compare the versions of a live topology."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ._common import emit_json, json_option
from .meta_cmd import (
    EXIT_NOT_CONFIRMED,
    EXIT_RACE,
    EXIT_REFUSED,
    STORE_EXIT,
    control_errors,
    meta_url_option,
    open_store,
    store_config_option,
)

if TYPE_CHECKING:
    from ..control.diff import TopologyDiff
    from ..control.store import MetaStore

_PUSH_EXIT = f"""\b
Exit status:
  0  published; or nothing to publish (the file is the current version); or --dry-run with
     every change safe live
  1  the push could not run: the file does not validate, names a driver this host cannot
     load (routers would reject it too: install it), names no meta store (add meta: or pass
     --meta-url), the store does not answer or is not initialised (`shardctl meta init`); a
     store that stopped answering while publishing leaves the outcome unknown (the message
     says so): check `shardctl topology history` before pushing again
  2  usage error (bad option)
  {EXIT_REFUSED}  refused: a change is not safe live (each is listed with its way out); nothing
     was pushed
  {EXIT_RACE}  another push changed the current version first; nothing was pushed: re-run
  {EXIT_NOT_CONFIRMED}  not confirmed: a primary is re-pointed and the prompt was declined (or
     --json without --yes); nothing was pushed
With --json, a failure is one JSON object {{"ok": false, "error": ..., "exit_code": n}} on stdout
(a refused push also lists its changes) and the text is on stderr.
"""

_DIFF_EXIT = f"""\b
Exit status:
  0  every change is safe live (or there is none)
  1  a side could not be read (a file that does not validate, a version not in the store,
     a store that does not answer)
  2  usage error (bad option, a side that is neither a version number nor a file)
  {EXIT_REFUSED}  some change would be refused by `shardctl topology push`
"""


@click.group("topology")
def topology() -> None:
    """Live topology versions in the meta store: push, status, history, show, diff."""


def _print_diff(diff: TopologyDiff) -> None:
    if diff.empty:
        click.echo("  no changes")
    for change in diff.changes:
        click.echo(f"  {change.render()}")


@topology.command("push", epilog=_PUSH_EXIT)
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--comment", default="", help="Why this version: kept in the history.")
@click.option("--dry-run", is_flag=True, help="Print the diff and the verdict; push nothing.")
@click.option("--yes", is_flag=True, help="Confirm a re-pointed primary without a prompt.")
@meta_url_option
@json_option
@control_errors
def push(
    file: Path, comment: str, dry_run: bool, yes: bool, meta_url: str | None, as_json: bool
) -> None:
    """Publish FILE as the next topology version, if every change is safe live.

    FILE is validated (in this environment) and diffed against the current version; the diff
    is printed (URLs with their passwords masked). Safe live: new tables, new shards with
    `slots: []`, replicas, pool settings, a primary re-pointed to another server (a
    failover; you confirm that the server holds the shard's rows). Refused: moving slots
    (`shardctl reshard`), the slot count, the id layout, an existing table's rule, removing a
    table or a shard that owns slots, moving the meta store, giving a shard (as primary or
    replica) a database that another shard uses now or in the current version (swapping two
    shards' databases re-places their data: `shardctl reshard`). The document is stored as
    written, ${VAR} placeholders unexpanded; its `version:` is ignored (the store numbers
    versions). The push is atomic: if another push lands first, this one fails and writes
    nothing. A file equal to the current version pushes nothing."""
    from ..control.versions import open_store as open_for
    from ..control.versions import plan_push, publish, read_proposal
    from ..core.config import safe_url

    proposal = read_proposal(file)
    with open_for(proposal.config, meta_url, str(file)) as store:
        plan = plan_push(store, proposal)
        data: dict[str, Any] = {"ok": True, **plan.as_dict(), "version": None}
        where = f"meta store {safe_url(store.url)}"
        if not as_json:
            base = "no version yet" if plan.bootstrap else f"current version {plan.base_version}"
            click.echo(f"{file} -> {where} ({base}):")
            if plan.bootstrap:
                c = proposal.config
                click.echo(
                    f"  first version: topology {c.name!r}, {c.slots} slots,"
                    f" {len(c.shards)} shards, {len(c.tables)} tables"
                )
            else:
                _print_diff(plan.diff)
        if not plan.diff.safe:
            _refuse(data, plan.diff.problems(), as_json)
        if plan.unchanged:
            data["status"], data["version"] = "unchanged", plan.base_version
            _done(data, as_json, f"nothing to push: {file} is version {plan.base_version} already")
            return
        next_version = 1 if plan.base_version is None else plan.base_version + 1
        if dry_run:
            data["status"] = "dry-run"
            _done(data, as_json, f"dry run: nothing pushed (it would be version {next_version})")
            return
        if plan.diff.confirmations and not yes:
            _confirm(plan.diff, data, as_json, next_version)
        version = publish(store, plan, comment=comment)
    data["status"], data["version"] = "published", version
    _done(data, as_json, f"published version {version}")


def _refuse(data: dict[str, Any], problems: list[str], as_json: bool) -> None:
    from ..errors import TopologyChangeError

    message = f"{TopologyChangeError(problems)}\nnothing was pushed"
    if as_json:
        emit_json({**data, "ok": False, "error": message, "exit_code": EXIT_REFUSED})
    click.echo(message, err=True)
    raise SystemExit(EXIT_REFUSED)


def _confirm(diff: TopologyDiff, data: dict[str, Any], as_json: bool, version: int) -> None:
    if as_json:
        message = (
            "a primary is re-pointed and --json never prompts: pass --yes to confirm"
            " (nothing was pushed)"
        )
        emit_json({**data, "ok": False, "error": message, "exit_code": EXIT_NOT_CONFIRMED})
        click.echo(message, err=True)
        raise SystemExit(EXIT_NOT_CONFIRMED)
    for change in diff.confirmations:
        click.echo(change.confirm)
    try:
        confirmed = click.confirm(f"Publish version {version}?", default=False)
    except click.Abort:
        confirmed = False
    if not confirmed:
        click.echo("not confirmed: nothing was pushed", err=True)
        raise SystemExit(EXIT_NOT_CONFIRMED)


def _done(data: dict[str, Any], as_json: bool, line: str) -> None:
    if as_json:
        emit_json(data)
    else:
        click.echo(line)


@topology.command("status", epilog=STORE_EXIT)
@store_config_option
@meta_url_option
@json_option
@control_errors
def status(config_path: Path | None, meta_url: str | None, as_json: bool) -> None:
    """The current version and every registered router: its acknowledged version, heartbeat
    age and lease. A router is lagging (marked `!`) when it has not acknowledged the current
    version or its lease has expired; lagging routers do not change the exit status (--json
    lists them under "lagging")."""
    from ..control.versions import cluster_status
    from ..core.config import safe_url

    with open_store(config_path, meta_url) as store:
        state = cluster_status(store)
        url = safe_url(store.url)
    if as_json:
        emit_json({"ok": True, "url": url, **state.as_dict()})
        return
    current = "none" if state.current is None else f"v{state.current}"
    click.echo(f"meta store {url}: current version {current}")
    if not state.routers:
        click.echo("no routers registered")
        return
    click.echo(
        f"  {'instance':<24} {'host':<20} {'pid':>7} {'kind':<8} {'serving':>7} {'acked':>5}"
        f" {'heartbeat':>10} {'lease':>10}"
    )
    for r in state.routers:
        rec = r.record
        lease = f"{r.lease_left_ms / 1000:.1f}s" if rec.live else "expired"
        row = (
            f"{'!' if r.lagging else ' '} {rec.instance_id:<24} {rec.host[:20]:<20} {rec.pid:>7}"
            f" {rec.kind:<8} {rec.serving_version:>7} {rec.acked_version:>5}"
            f" {rec.heartbeat_age_ms / 1000:>9.1f}s {lease:>10}"
        )
        click.echo(click.style(row, fg="yellow") if r.lagging else row)
    if state.lagging:
        click.echo(f"{len(state.lagging)} lagging (!): not acked v{state.current} or lease expired")


@topology.command("history", epilog=STORE_EXIT)
@store_config_option
@meta_url_option
@click.option("--limit", type=click.IntRange(1), default=None, help="Newest N versions only.")
@json_option
@control_errors
def history(
    config_path: Path | None, meta_url: str | None, limit: int | None, as_json: bool
) -> None:
    """Every pushed version, newest first: who pushed it, when (the store's clock), why."""
    from ..control.versions import summary

    with open_store(config_path, meta_url) as store:
        current = store.current_version()
        rows = [summary(v, current) for v in store.history(limit)]
    if as_json:
        emit_json({"ok": True, "current_version": current, "versions": rows})
        return
    if not rows:
        click.echo("no versions yet (`shardctl topology push FILE` publishes the first)")
    for row in rows:
        mark = "*" if row["current"] else " "
        comment = f"  {row['comment']}" if row["comment"] else ""
        click.echo(
            f"{mark} v{row['version']:<4} {row['pushed_at']}  {row['pushed_by']}"
            f"  ({row['shards']} shards, {row['tables']} tables){comment}"
        )


@topology.command("show", epilog=STORE_EXIT)
@click.argument("version", type=click.IntRange(1), required=False)
@store_config_option
@meta_url_option
@json_option
@control_errors
def show(
    version: int | None, config_path: Path | None, meta_url: str | None, as_json: bool
) -> None:
    """Print VERSION (default: the current one) as YAML, passwords masked (a password written
    as a bare ${VAR} placeholder is shown as the placeholder)."""
    from ..control.versions import masked
    from ..core.config import safe_url
    from ..errors import MetaStoreError

    with open_store(config_path, meta_url) as store:
        found = store.current() if version is None else store.get(version)
        if found is None:
            raise MetaStoreError(
                f"the meta store {safe_url(store.url)} has no"
                " version yet; `shardctl topology push FILE` publishes the first"
            )
    document = _ordered(masked(dict(found.document)))
    if as_json:
        emit_json({"ok": True, "version": found.version, "document": document})
        return
    import yaml

    click.echo(f"# version {found.version}, pushed by {found.pushed_by}")
    click.echo(yaml.safe_dump(document, sort_keys=False, default_flow_style=None), nl=False)


def _ordered(document: dict[str, Any]) -> dict[str, Any]:
    """The document's top-level keys in the order a topology file is written."""
    order = ["name", "version", "slots", "ids", "shards", "tables", "meta"]
    first = {k: document[k] for k in order if k in document}
    return {**first, **{k: v for k, v in document.items() if k not in first}}


@topology.command("diff", epilog=_DIFF_EXIT)
@click.argument("a")
@click.argument("b")
@store_config_option
@meta_url_option
@json_option
@control_errors
def diff(a: str, b: str, config_path: Path | None, meta_url: str | None, as_json: bool) -> None:
    """Compare A with B (each a version number in the meta store, or a YAML file) and judge
    each change as `topology push` would (B proposed over A)."""
    from ..control.diff import diff_topologies

    sides = [_side(a, "A"), _side(b, "B")]
    store: MetaStore | None = None
    try:
        configs = []
        for _, spec in sides:
            if isinstance(spec, int):
                if store is None:
                    store = _store_for_diff(sides, config_path, meta_url)
                from ..control.versions import version_config

                configs.append(version_config(store.get(spec)))
            else:
                configs.append(spec.config)
    finally:
        if store is not None:
            store.close()
    result = diff_topologies(configs[0], configs[1])
    names = [label for label, _ in sides]
    if as_json:
        data = {"ok": result.safe, "a": names[0], "b": names[1], **result.as_dict()}
        if not result.safe:
            count = len(result.refused)
            data["error"] = f"{count} change{'s' if count > 1 else ''} would be refused live"
            data["exit_code"] = EXIT_REFUSED
        emit_json(data)
    else:
        click.echo(f"{names[0]} -> {names[1]}:")
        _print_diff(result)
    if not result.safe:
        raise SystemExit(EXIT_REFUSED)


def _side(spec: str, which: str) -> tuple[str, Any]:
    """(label, version number or Proposal) of one side of `topology diff`."""
    from ..control.versions import read_proposal

    path = Path(spec)
    if path.is_file():
        return spec, read_proposal(path)
    text = spec.removeprefix("v")
    if text.isdigit() and int(text) >= 1:
        return f"v{int(text)}", int(text)
    raise click.BadParameter(
        f"{spec!r} is neither a version number (e.g. 3) nor an existing YAML file",
        param_hint=which,
    )


def _store_for_diff(
    sides: list[tuple[str, Any]], config_path: Path | None, meta_url: str | None
) -> MetaStore:
    """The store a version side is read from: --config / --meta-url, else the meta: section
    of a file side."""
    from ..control.versions import open_store as open_for

    if config_path is None and meta_url is None:
        for label, spec in sides:
            if not isinstance(spec, int) and spec.config.meta is not None:
                return open_for(spec.config, None, label)
    return open_store(config_path, meta_url)
