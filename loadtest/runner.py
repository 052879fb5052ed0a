"""``loadtest/run``: the order service under Locust on real MariaDB shards, in one command.

1. The cluster: a 4-instance MariaDB sandbox on loopback (``--port``), started here and
   stopped on every exit (also Ctrl-C and SIGTERM), with a meta store; or ``--config`` of a
   running cluster (its order tables must be empty, ``--reset`` empties them).
2. The schema, then seed orders through the service (progress with rate and ETA).
3. Locust headless for ``-t`` with ``-u`` users (``--processes N``: Locust's master and N
   workers), its CSV and HTML reports, and the request log of every client process.
4. ``--baseline``: the same service and mix on one plain database on the same server, no router;
   ``--compare``: the baseline, then the router, and their ratio.
5. ``--reshard``: the cluster starts on 2 shards; while Locust runs, the whole
   ``shardctl reshard`` workflow (plan 2 -> 4, start, copy, verify, shadow reads, switch,
   finalize) runs as the CLI commands a person would type, each phase timed.
6. After the run: the ledger check (every acknowledged order, its last status, nothing lost,
   duplicated or resurrected; exit status 1 when it fails), the summary per operation, per
   phase and around the switch, as text, ``summary.md``, ``summary.json`` and ``timeline.png``.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import itertools
import json
import os
import random
import re
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

META = {"poll_interval_s": 0.5, "fast_poll_interval_s": 0.05, "lease_s": 4.0}
SCRATCH_TABLES = ("orders", "order_items", "merchant_orders")
RESHARD_STEPS: tuple[tuple[str, list[str]], ...] = (
    ("start", ["start"]),
    ("copy", ["copy"]),
    ("verify", ["verify"]),
    ("shadow", ["switch-reads", "--shadow", "--percent", "10", "--seconds", "{shadow}"]),
    ("switch", ["switch"]),
    ("finalize", ["finalize", "--yes"]),
)
"""After ``plan``: the phases of the workflow, as ``shardctl reshard`` subcommands."""
SHARDCTL = "import sys; from shardrouter.cli import main; sys.argv[0] = 'shardctl'; main()"
"""``shardctl`` as ``python -c``: the interpreter running this, whatever is on PATH."""
SWITCH_ATTEMPTS = 5
UNFINISHED = "the reshard did not finish within the run: raise -t or lower --seed-users"
EXIT_REFUSED = 3
"""shardctl reshard's exit status of a refused action, e.g. a switch abandoned because a router
did not acknowledge the freeze in time."""


def reshard_command(args: list[str]) -> list[str]:
    """``shardctl reshard ARGS`` as this interpreter runs it."""
    return [sys.executable, "-c", SHARDCTL, "reshard", *args]


def seconds_of(text: str) -> float:
    """``90``, ``90s``, ``2m``, ``1m30s``, ``1h`` -> seconds (Locust's ``-t`` forms)."""
    parts = re.fullmatch(r"\s*(?:(\d+)h)?\s*(?:(\d+)m)?\s*(?:(\d+)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise click.BadParameter(f"{text!r} is not a duration: e.g. 30s, 2m, 1m30s")
    h, m, s = (int(g) if g else 0 for g in parts.groups())
    return float(h * 3600 + m * 60 + s)


def say(message: str, quiet: bool) -> None:
    if not quiet:
        click.echo(message, err=True)


# -- the cluster ------------------------------------------------------------------------------


@dataclass
class Cluster:
    topology_path: Path
    """What the service and Locust load (with meta: follows the store)."""
    final: dict[str, Any]
    """The topology the ledger is checked against (after a reshard: the 4-shard one)."""
    baseline_url: str | None = None
    after_path: Path | None = None
    """--reshard: the 4-shard topology the plan moves to."""
    started: list[str] = field(default_factory=list)


@contextlib.contextmanager
def sandbox_cluster(
    directory: Path,
    port: int,
    reshard: bool,
    baseline: bool,
    lookups: bool,
    pool_size: int,
    quiet: bool,
) -> Iterator[Cluster]:
    from shardrouter.control.store import MetaStore
    from shardrouter.core.config import config_from_dict
    from shardrouter.core.topology import Topology
    from shardrouter.engine.engines import ShardEngines
    from shardrouter.ops import sandbox as sb
    from shardrouter.ops.demo_reshard import _database, split_cluster
    from shardrouter.ops.schema import apply

    say(f"starting 4 MariaDB instances on 127.0.0.1:{port}..{port + 3} in {directory}", quiet)
    box = sb.up(directory, shards=4, base_port=port)
    try:
        before, after = split_cluster(box, META)
        for document in (before, after):
            for shard in document["shards"].values():
                # As many connections per shard as Locust users could want at once (the
                # default 5 + 10 overflow closes and reopens connections under 20 users); the
                # baseline takes the same pool settings (PlainDatabase).
                shard["pool"] = {"size": pool_size, "max_overflow": pool_size}
        if not lookups:
            for document in (before, after):
                orders = document["tables"]["orders"]
                orders["secondary"] = [
                    key for key in orders.get("secondary", []) if key["column"] != "merchant_id"
                ]
        first = before if reshard else after
        if not reshard:
            engines = ShardEngines(Topology(config_from_dict(_without_meta(after))))
            try:
                apply(Topology(config_from_dict(_without_meta(after))), engines)
            finally:
                engines.dispose()
        store = MetaStore(first["meta"]["url"])
        try:
            store.init()
            store.push(first, expected=None, comment="loadtest")
        finally:
            store.close()
        path = directory / "topology.yaml"
        path.write_text(yaml.safe_dump(first))
        after_path = directory / "topology-4.yaml"
        after_path.write_text(yaml.safe_dump(after))
        url = _database(box.shards[0].url, "loadtest_baseline") if baseline else None
        yield Cluster(path, after, url, after_path if reshard else None)
    finally:
        sb.down(directory)
        say("sandbox stopped", quiet)


def _without_meta(document: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in document.items() if k != "meta"}


@contextlib.contextmanager
def config_cluster(path: Path, reset: bool, processes: int) -> Iterator[Cluster]:
    from sqlalchemy import create_engine, text

    from shardrouter.core.topology import Topology
    from shardrouter.engine.engines import ShardEngines
    from shardrouter.ops.schema import apply

    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    topology = Topology.load(path)
    if processes > 1 and topology.config.meta is None:
        raise click.UsageError(
            f"--processes {processes}: {path} has no meta: section, so every process would"
            " issue ids under the one ids.worker_id of the file (duplicate order ids). Add a"
            " meta store (worker ids are leased from it) or run one process."
        )
    engines = ShardEngines(topology)
    try:
        apply(topology, engines).raise_for_errors()
    finally:
        engines.dispose()
    for name, shard in topology.shards.items():
        engine = create_engine(shard.primary.render_as_string(hide_password=False))
        try:
            with engine.begin() as conn:
                for logical in SCRATCH_TABLES:
                    for physical in topology.table(logical).physical_names:
                        if reset:
                            conn.execute(text(f"DELETE FROM {physical}"))
                        elif conn.execute(text(f"SELECT 1 FROM {physical} LIMIT 1")).first():
                            raise click.UsageError(
                                f"{name}.{physical} is not empty: the ledger check needs order"
                                " tables that only this run writes. Pass --reset to empty"
                                " orders, order_items and merchant_orders first (deletes their"
                                " rows), or use the sandbox (no --config)."
                            )
        finally:
            engine.dispose()
    yield Cluster(path, document)


# -- seeding ----------------------------------------------------------------------------------


def seed(
    cluster: Cluster,
    run_dir: Path,
    users: int,
    per_user: int,
    merchants: int,
    rng_seed: int,
    baseline: bool,
    quiet: bool,
) -> dict[str, Any]:
    """``users`` x ``per_user`` orders through the order service, 8 threads; every order in
    the ledger (file ``ledger-seed.jsonl``)."""
    from baseline import PlainDatabase, create_schema
    from ledger import LedgerWriter
    from order_service import Item, OrderService

    from shardrouter import Router, Topology
    from shardrouter.cli._progress import TextProgress

    router: Any
    if baseline:
        assert cluster.baseline_url is not None
        create_schema(cluster.baseline_url)
        router = PlainDatabase(cluster.baseline_url, Topology.load(cluster.topology_path))
    else:
        router = Router.load(cluster.topology_path)
    service = OrderService(router)
    ledger = LedgerWriter(run_dir, "seed")
    rng = random.Random(rng_seed)
    jobs = [
        (u, rng.randrange(1, merchants + 1), [Item("sku-seed", 1 + rng.randrange(3), 1000)])
        for u in range(1, users + 1)
        for _ in range(per_user)
    ]
    total = len(jobs)
    task = TextProgress(every_s=0.5).task("seeding", total, "orders")
    started = time.monotonic()

    def place(job: tuple[int, int, list[Any]]) -> tuple[int, int, int, list[Any]]:
        user, merchant, items = job
        key = service.new_order_key(user)
        service.place_order(user, merchant, items, idempotency_key=key)
        return key, user, merchant, items

    pool = concurrent.futures.ThreadPoolExecutor(8)
    try:
        for key, user, merchant, items in pool.map(place, jobs):
            lines = [(i.sku, i.qty, i.price_cents) for i in items]
            ledger.placed(key, user, merchant, len(items), True, lines)
            task.advance(1)
        task.done()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # Ctrl-C: the queued orders are dropped
        ledger.close()
        service.close()
        router.close()
    took = time.monotonic() - started
    say(f"seeded {total:,} orders of {users:,} users in {took:.1f} s", quiet)
    return {"orders": total, "seconds": round(took, 2), "rate": round(total / took, 1)}


# -- resharding under load ------------------------------------------------------------------


class ReshardDriver(threading.Thread):
    """Runs ``shardctl reshard plan`` and the RESHARD_STEPS one after the other, from ``at``
    seconds after it starts; every phase timed (Unix seconds)."""

    def __init__(self, cluster: Cluster, at: float, shadow_s: float, log: Path) -> None:
        super().__init__(daemon=True)
        self.cluster = cluster
        self.at = at
        self.shadow_s = shadow_s
        self.log = log
        self.phases: list[dict[str, Any]] = []
        self.error: str | None = None
        self.finished = threading.Event()
        self.cancel = threading.Event()
        self._proc: subprocess.Popen[str] | None = None

    def run(self) -> None:
        try:
            if self.cancel.wait(self.at):
                return
            config = str(self.cluster.topology_path)
            assert self.cluster.after_path is not None
            steps = [("plan", ["plan", "--to", str(self.cluster.after_path)])]
            steps += [
                (name, [a.format(shadow=f"{self.shadow_s:g}") for a in args])
                for name, args in RESHARD_STEPS
            ]
            for name, args in steps:
                for attempt in range(1, SWITCH_ATTEMPTS + 1):
                    if self.cancel.is_set():
                        self.error = f"{UNFINISHED} (stopped before {name})"
                        return
                    rc = self._step(name, [*args, "--config", config, "--json"])
                    if rc == 0:
                        break
                    if self.cancel.is_set():  # interrupted by the end of the run, not failed
                        self.error = f"{UNFINISHED} (stopped during {name})"
                        return
                    # An abandoned switch changed nothing (writes went on where they were):
                    # what the message tells an operator to do is to run it again.
                    if name != "switch" or rc != EXIT_REFUSED or attempt == SWITCH_ATTEMPTS:
                        self.error = f"shardctl reshard {name} exited {rc} (see {self.log})"
                        return
                    self.phases[-1]["name"] = "switch (abandoned)"
                    if self.cancel.wait(1.0):
                        continue
                    self.phases[-1]["end"] = time.time()  # the pause is the attempt's
        except Exception as exc:  # shown in the report; the run's exit status says it failed
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.finished.set()

    def _step(self, name: str, args: list[str]) -> int:
        command = reshard_command(args)
        start = time.time()
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"$ shardctl reshard {shlex.join(args)}\n")
            log.flush()
            self._proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, cwd=ROOT
            )
            out, _ = self._proc.communicate(timeout=600)
            log.write(out + "\n")
        end = time.time()
        rc = self._proc.returncode
        self.phases.append({"name": name, "start": start, "end": end, "rc": rc})
        return rc

    def settle(self) -> str:
        """After a failed reshard: leave the cluster in a whole state, as an operator would:
        a switched migration is finalized, an earlier one cancelled (the sources own every
        row again, the copies go). Returns what was done."""
        config = str(self.cluster.topology_path)
        status = subprocess.run(
            reshard_command(["status", "--config", config, "--json"]),
            capture_output=True, text=True, timeout=120, cwd=ROOT,
        )  # fmt: skip
        try:
            phase = json.loads(status.stdout).get("phase")
        except json.JSONDecodeError:
            phase = None
        if phase in (None, "finalized", "cancelled"):
            return f"nothing to settle (phase {phase})"
        action = "finalize" if phase == "switched" else "cancel"
        rc = self._step(action, [action, "--yes", "--config", config, "--json"])
        self.phases.pop()  # after the run: not one of its phases
        return f"phase {phase}: {action} exited {rc}"

    def stop(self) -> None:
        self.cancel.set()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)  # a paused migration, resumable


# -- one Locust run ---------------------------------------------------------------------------


@dataclass
class Settings:
    users: int
    spawn_rate: float
    seconds: float
    processes: int
    rate: float
    mix: str
    seed_users: int
    merchants: int
    seed: int


def run_locust(
    name: str,
    cluster: Cluster,
    run_dir: Path,
    settings: Settings,
    baseline: bool,
    on_start: Callable[[], None] | None = None,
) -> int:
    env = dict(
        os.environ,
        LOADTEST_TOPOLOGY=str(cluster.topology_path),
        LOADTEST_OUT=str(run_dir),
        LOADTEST_MIX=settings.mix,
        LOADTEST_USERS=str(settings.seed_users),
        LOADTEST_MERCHANTS=str(settings.merchants),
        LOADTEST_RATE=f"{settings.rate:g}",
        LOADTEST_SEED=str(settings.seed),
    )
    if baseline:
        assert cluster.baseline_url is not None
        env["LOADTEST_BASELINE_URL"] = cluster.baseline_url
    else:
        env.pop("LOADTEST_BASELINE_URL", None)
    command = [
        sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless",
        "-u", str(settings.users), "-r", f"{settings.spawn_rate:g}",
        "-t", f"{int(settings.seconds)}s", "--stop-timeout", "10",
        "--csv", str(run_dir / name), "--html", str(run_dir / f"{name}.html"),
        "--only-summary", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    if settings.processes > 1:
        command += ["--processes", str(settings.processes)]
    with (run_dir / f"{name}-locust.log").open("w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir,
            start_new_session=True,
        )  # fmt: skip
        try:
            if on_start is not None:
                on_start()
            rc = proc.wait(timeout=settings.seconds + 120)
            # With --processes the master exits without waiting for its workers, which
            # write their ledgers as they stop: the check must not read them before.
            _wait_group(proc.pid, timeout=30)
            return rc
        finally:
            if proc.poll() is None or _group_alive(proc.pid):
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                    _wait_group(proc.pid, timeout=15)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()


def _group_alive(pgid: int) -> bool:
    """Whether a process of group ``pgid`` still runs (a zombie, exited but not yet reaped by
    whoever adopted it, does not count: it writes nothing more)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for stat in proc.glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


def _wait_group(pgid: int, timeout: float) -> None:
    """Until every process of the group has exited; TimeoutExpired after ``timeout``."""
    deadline = time.monotonic() + timeout
    while _group_alive(pgid):
        if time.monotonic() > deadline:
            raise subprocess.TimeoutExpired(f"process group {pgid}", timeout)
        time.sleep(0.1)


def analyse(name: str, run_dir: Path, phases: list[dict[str, Any]], title: str) -> dict[str, Any]:
    import report

    requests = report.read_requests(run_dir)
    if not requests:
        raise click.ClickException(
            f"{name}: Locust recorded no request; see {run_dir / f'{name}-locust.log'}"
        )
    start, end = requests[0].t - requests[0].ms / 1000, requests[-1].t
    out: dict[str, Any] = {"name": name, "summary": report.summary(requests, start, end)}
    if phases:
        # Contiguous spans, each cut at the run's end: every request ends in exactly one (a
        # gap between two steps belongs to the earlier; a step still running when Locust
        # stopped ends with the run).
        end_all = end + 1e-3
        phases = [
            {**p, "start": min(p["start"], end_all), "end": min(nxt_start, end_all)}
            for p, nxt_start in zip(
                phases, [*(q["start"] for q in phases[1:]), phases[-1]["end"]], strict=True
            )
        ]
        spans = [{"name": "before", "start": start, "end": phases[0]["start"]}, *phases]
        spans.append({"name": "after", "start": phases[-1]["end"], "end": end_all})
        out["phases"] = report.per_phase(requests, spans)
        out["switch_windows"] = report.switch_windows(requests, phases)
        out["timeline_phases"] = [
            {"name": p["name"], "start": round(p["start"] - start, 3),
             "end": round(p["end"] - start, 3)}
            for p in phases
        ]  # fmt: skip
    out["plot"] = str(
        report.plot(run_dir / f"{name}-timeline.png", requests, start, end, phases, title)
    )
    return out


# -- the command ------------------------------------------------------------------------------


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A running cluster's topology instead of the sandbox (order tables empty).",
)
@click.option("--reset", is_flag=True, help="With --config: empty the order tables first.")
@click.option(
    "--port", default=3470, show_default=True, help="Sandbox ports PORT..PORT+3 (loopback)."
)
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    help="Sandbox data folder (default: a temporary one, removed).",
)
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Results folder (default: loadtest/results/<UTC time>).",
)
@click.option("-u", "--users", default=20, show_default=True, help="Locust users.")
@click.option("-r", "--spawn-rate", default=20.0, show_default=True, help="Users started per s.")
@click.option("-t", "--run-time", default="30s", show_default=True, help="Per run: 30s, 2m, ...")
@click.option(
    "--processes",
    default=1,
    show_default=True,
    help="Locust worker processes (master + N workers when > 1).",
)
@click.option(
    "--rate",
    default=0.0,
    show_default=True,
    help="Requests per second per Locust user (0: no wait, saturate).",
)
@click.option(
    "--mix",
    type=click.Choice(["full", "keyed"]),
    default="full",
    show_default=True,
    help="keyed: no merchant pages, no back office (single-shard operations only).",
)
@click.option("--seed-users", default=2000, show_default=True, help="Users seeded (and drawn).")
@click.option("--orders-per-user", default=3, show_default=True, help="Orders seeded per user.")
@click.option("--merchants", default=300, show_default=True, help="Merchant ids drawn.")
@click.option("--seed", "rng_seed", default=1, show_default=True, help="Random seed.")
@click.option("--baseline", is_flag=True, help="One plain database, no router.")
@click.option("--compare", is_flag=True, help="The baseline, then the router; their ratio.")
@click.option(
    "--rounds",
    default=1,
    show_default=True,
    help="With --compare: this many baseline/router pairs, alternating which goes first"
    " (B R, R B, ...), each -t long; the ratio is the median of the pairs' ratios.",
)
@click.option("--reshard", is_flag=True, help="Reshard 2 -> 4 shards in the middle of the run.")
@click.option(
    "--reshard-at",
    default=None,
    type=float,
    help="Seconds after Locust starts that the reshard starts (default: a fifth of -t).",
)
@click.option("--shadow-seconds", default=2.0, show_default=True, help="Shadow reads phase.")
@click.option(
    "--lookups/--no-lookups",
    default=True,
    show_default=True,
    help="--no-lookups: the sandbox topology without the merchant_id lookup, so a placed order"
    " is one transaction as on one database: the router's own cost, without the lookup rows'.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
def main(
    config_path: Path | None,
    reset: bool,
    port: int,
    directory: Path | None,
    out: Path | None,
    users: int,
    spawn_rate: float,
    run_time: str,
    processes: int,
    rate: float,
    mix: str,
    seed_users: int,
    orders_per_user: int,
    merchants: int,
    rng_seed: int,
    baseline: bool,
    compare: bool,
    rounds: int,
    reshard: bool,
    reshard_at: float | None,
    shadow_seconds: float,
    lookups: bool,
    as_json: bool,
) -> None:
    """The order service under Locust on real MariaDB shards: start the sandbox (or take
    --config), apply the schema, seed, run Locust headless, check the ledger, report.

    \b
    loadtest/run -u 20 -t 30s              the router, 4 shards
    loadtest/run --compare --mix keyed      baseline (no router), then the router; the ratio
    loadtest/run --reshard -t 60s --rate 20 reshard 2 -> 4 shards under load

    Results (Locust CSV + HTML, request logs, ledger, summary.md/json, PNG) go to --out.
    Exit status: 0; 1 when the ledger check or the reshard failed; 2 bad usage.
    """
    seconds = seconds_of(run_time)
    checks = [
        (baseline and compare, "--baseline and --compare: --compare runs the baseline already"),
        (reshard and (baseline or compare), "--reshard runs the router only: drop --baseline"
         " / --compare"),
        (reshard and config_path is not None, "--reshard needs the sandbox (it grows it from 2"
         " to 4 shards): drop --config"),
        ((baseline or compare) and config_path is not None, "--baseline needs the sandbox (a"
         " plain database on its first server): drop --config"),
        (not 1 <= users <= 10_000, f"-u {users}: give 1..10000 users"),
        (not 1 <= processes <= 64, f"--processes {processes}: give 1..64"),
        (not 1 <= seconds <= 86_400, f"-t {run_time}: give 1s..24h"),
        (seed_users < 1 or merchants < 1 or orders_per_user < 0,
         "--seed-users and --merchants must be >= 1, --orders-per-user >= 0"),
        (rate < 0 or spawn_rate <= 0, "--rate must be >= 0 and --spawn-rate > 0"),
        (not 1024 <= port <= 65_000, f"--port {port}: give 1024..65000"),
        (not lookups and config_path is not None, "--no-lookups changes the sandbox's"
         " topology: drop --config"),
        (not 1 <= rounds <= 20, f"--rounds {rounds}: give 1..20"),
        (rounds > 1 and not compare, "--rounds goes with --compare"),
    ]  # fmt: skip
    for bad, message in checks:
        if bad:
            raise click.UsageError(message)
    at = reshard_at if reshard_at is not None else max(3.0, seconds / 5)
    if reshard and at >= seconds:
        raise click.UsageError(f"--reshard-at {at:g} s is past the run's end (-t {run_time})")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = out or ROOT / "loadtest" / "results" / stamp
    used = [
        path for path in out.glob("*/*")
        if path.name.startswith(("ledger-", "requests-"))
    ]  # fmt: skip
    if used:
        raise click.UsageError(
            f"--out {out} holds a previous run ({used[0].relative_to(out)}): its ledger and"
            " request logs would be read as this run's. Give a new folder, or no --out (a new"
            " one under loadtest/results/)."
        )
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        users, spawn_rate, seconds, processes, rate, mix, seed_users, merchants, rng_seed
    )
    quiet = as_json
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        report = _run(
            out, config_path, reset, port, directory, settings, orders_per_user,
            baseline, compare, reshard, at, shadow_seconds, lookups, quiet, rounds,
        )  # fmt: skip
    finally:
        signal.signal(signal.SIGTERM, previous)
    report["command"] = "loadtest/run " + shlex.join(sys.argv[1:])
    report["label"] = out.name
    (out / "summary.json").write_text(json.dumps(report, indent=2, default=str))
    import report as reporting

    (out / "summary.md").write_text(reporting.render(report, md=True))
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        click.echo(reporting.render(report))
    failed = [r for r in report["runs"] if r.get("ledger") and not r["ledger"]["ok"]]
    if failed or report.get("reshard_error") or report.get("locust_error"):
        sys.exit(1)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _run(
    out: Path,
    config_path: Path | None,
    reset: bool,
    port: int,
    directory: Path | None,
    settings: Settings,
    orders_per_user: int,
    baseline: bool,
    compare: bool,
    reshard: bool,
    at: float,
    shadow_s: float,
    lookups: bool,
    quiet: bool,
    rounds: int = 1,
) -> dict[str, Any]:
    import ledger as ledgers

    from shardrouter.core.config import config_from_dict
    from shardrouter.core.topology import Topology

    # (kind, folder): with --rounds the pairs alternate their order (B R, R B, ...), so a
    # drift of the machine's speed weighs on both sides alike.
    kinds: list[tuple[str, str]] = []
    if compare:
        for r in range(rounds):
            pair = ("baseline", "router") if r % 2 == 0 else ("router", "baseline")
            kinds += [(kind, kind if r == 0 else f"{kind}-{r + 1}") for kind in pair]
    else:
        kinds = [("baseline", "baseline")] if baseline else [("router", "router")]
    seeded: set[str] = set()
    routed_dirs: list[Path] = []
    report: dict[str, Any] = {
        "settings": vars(settings) | {"reshard": reshard, "lookups": lookups},
        "runs": [],
    }
    with contextlib.ExitStack() as stack:
        if config_path is not None:
            cluster = stack.enter_context(config_cluster(config_path, reset, settings.processes))
        else:
            root = directory or Path(stack.enter_context(tempfile.TemporaryDirectory()))
            cluster = stack.enter_context(
                sandbox_cluster(
                    root,
                    port,
                    reshard,
                    baseline or compare,
                    lookups,
                    max(10, settings.users),
                    quiet,
                )
            )
        for kind, name in kinds:
            run_dir = out / name
            run_dir.mkdir(parents=True, exist_ok=True)
            is_baseline = kind == "baseline"
            if kind not in seeded:  # (later rounds run on the same data, and add to it)
                seeded.add(kind)
                report.setdefault("seed", {})[kind] = seed(
                    cluster, run_dir, settings.seed_users, orders_per_user, settings.merchants,
                    settings.seed, is_baseline, quiet,
                )  # fmt: skip
            driver = None
            if reshard:
                driver = ReshardDriver(cluster, at, shadow_s, run_dir / "reshard.log")
            say(
                f"{name}: Locust, {settings.users} users for {settings.seconds:g} s"
                + (f", reshard 2 -> 4 shards from {at:g} s" if driver else ""),
                quiet,
            )
            try:
                rc = run_locust(
                    name, cluster, run_dir, settings, is_baseline,
                    on_start=driver.start if driver else None,
                )  # fmt: skip
                if rc != 0:
                    report["locust_error"] = (
                        f"{name}: Locust exited {rc}; see {run_dir / f'{name}-locust.log'}"
                    )
            finally:
                if driver is not None:
                    driver.stop()
                    driver.join(timeout=60)
            phases = list(driver.phases) if driver else []
            if driver is not None and (
                driver.error or [p["name"] for p in phases][-1:] != ["finalize"]
            ):
                report["reshard_error"] = driver.error or UNFINISHED
                report["reshard_settled"] = driver.settle()
            title = f"{name}: {settings.users} users" + (", reshard 2 -> 4" if driver else "")
            run = analyse(name, run_dir, phases, title)
            if driver is not None:
                run["reshard_log"] = str(run_dir / "reshard.log")
            if not is_baseline:
                # Every router round's ledger so far: the rounds write to one cluster.
                routed_dirs.append(run_dir)
                final = Topology(config_from_dict(_without_meta(_current(cluster))))
                records = itertools.chain.from_iterable(
                    ledgers.read_records(d) for d in routed_dirs
                )
                run["ledger"] = ledgers.check(
                    ledgers.expected(records), ledgers.scan(final), final
                ).as_dict()
            report["runs"].append(run)
    if compare:
        report["ratio"] = ratio_of(report["runs"])
    return report


def ratio_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Router / baseline throughput and p99 of each pair of runs (in the order they ran), and
    their medians (one pair: its own ratios)."""
    pairs = []
    for first, second in zip(runs[::2], runs[1::2], strict=True):
        is_base = first["name"].startswith("baseline")
        base, routed = (first, second) if is_base else (second, first)
        b, r = base["summary"]["all"], routed["summary"]["all"]
        pairs.append({"throughput": r["rps"] / b["rps"], "p99": r["p99_ms"] / b["p99_ms"]})
    return {
        "throughput": statistics.median(p["throughput"] for p in pairs),
        "p99": statistics.median(p["p99"] for p in pairs),
        "rounds": pairs,
    }


def _current(cluster: Cluster) -> dict[str, Any]:
    """The topology the cluster is on now: with a meta store, its current version (after a
    reshard the 4 shards; after a cancelled one the 2), else the file's."""
    from shardrouter.control.store import MetaStore
    from shardrouter.core.topology import Topology

    meta = Topology.load(cluster.topology_path).config.meta
    if meta is None:
        return cluster.final
    store = MetaStore.from_config(meta)
    try:
        version = store.current()
    finally:
        store.close()
    return cluster.final if version is None else dict(version.document)


def entry() -> None:
    main(prog_name="loadtest/run")


if __name__ == "__main__":
    entry()


__all__ = ["main", "seconds_of"]
