"""The orchestration of a resharding migration (docs/RESHARDING.md): each action checks the
phase table, pushes the topology versions of its step, waits for every live router's
acknowledgement, runs the movers (journal, copy) and records the new phase and its
checkpoints in the meta store. Every action is idempotent, so ``resume`` after a crash is the
interrupted action run again from the stored phase and checkpoints.

The CLI (``shardctl reshard``) only parses arguments and prints; everything here is library
code a service's own tooling can call.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine

from ..control.registry import AckReport, wait_for_acks
from ..control.store import MetaStore, who
from ..control.versions import cluster_status, normalise
from ..core.config import config_from_dict
from ..core.progress import NullProgress, Progress, Task
from ..core.topology import Topology
from ..engine import shadow, xa
from ..engine.engines import ShardEngines
from ..errors import ReshardDataError, ReshardError, ReshardStateError
from ..types import ShardId
from . import copy as mover
from . import journal, phases, state
from .plan import ReshardPlan, Stage
from .spec import Belongs, TableSpec, describe, key_from_json, key_to_json

log = logging.getLogger("shardrouter.reshard")

RUNNER_LEASE_MS = 15_000
"""How long a runner's lease lives without renewal (a killed runner blocks resume this long)."""
RUNNER_RENEW_S = 1.0
"""How often a running action renews it (between chunks)."""
SHADOW_DRAIN_EVERY_S = 0.1
"""The pause between drains while shadow reads run (what a target lags by, about)."""
SHADOW_SETTLE_S = 10.0
"""How long the shadow report waits at most for the routers' last counters."""


@dataclass(frozen=True)
class Options:
    """How a migration runs (CLI flags)."""

    chunk: int = 2000
    max_rows_per_s: float | None = None
    ack_timeout_s: float = 60.0
    """How long a version change waits for every live router (a dead router's lease expires
    well before: meta.lease_s)."""
    freeze_timeout_s: float = 0.5
    """The switch's budget: acks of the frozen version plus the journal drained to zero; past
    it the switch is abandoned and writes go on to the source."""
    hold_s: float = 2.0
    """What routers are told to hold a write at most (above the budget, so an abandoned
    switch releases held writes rather than failing them)."""
    drain_batch: int = 500


@dataclass(frozen=True)
class Pair:
    """One (source, target) of a plan with every range moving between them."""

    source: ShardId
    target: ShardId
    ranges: tuple[tuple[int, int], ...]
    broadcast: bool
    """This pair copies the broadcast tables (the target is new; one pair per new target)."""


def pairs(plan: ReshardPlan) -> tuple[Pair, ...]:
    grouped: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for move in plan.moves:
        grouped.setdefault((move.source, move.target), []).append(tuple(move.slots))  # type: ignore[arg-type]
    out: list[Pair] = []
    copied_to: set[str] = set()
    for (source, target), ranges in sorted(grouped.items()):
        broadcast = target in plan.new_shards and target not in copied_to
        copied_to.add(target)
        out.append(Pair(ShardId(source), ShardId(target), tuple(sorted(ranges)), broadcast))
    return tuple(out)


@dataclass
class Workflow:
    """One migration's actions. ``close()`` (or ``with``) releases its shard engines."""

    store: MetaStore
    migration_id: str
    options: Options = field(default_factory=Options)
    progress: Progress = field(default_factory=NullProgress)
    env: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    stop: Callable[[], bool] = lambda: False
    """Checked between chunks: True pauses the running action (resume continues)."""
    _engines: ShardEngines | None = None
    _topology: Topology | None = None
    _specs: dict[tuple[str, bool], list[TableSpec]] = field(default_factory=dict)
    _plan: ReshardPlan | None = None
    _holder: str | None = None
    _lost: bool = False

    def __enter__(self) -> Workflow:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._engines is not None:
            self._engines.dispose()
            self._engines = None

    # -- reading ----------------------------------------------------------------------------

    @property
    def migration(self) -> state.Migration:
        return state.get(self.store, self.migration_id)

    @property
    def plan(self) -> ReshardPlan:
        if self._plan is None:
            self._plan = self.migration.plan  # a plan never changes once stored
        return self._plan

    def topology(self) -> Topology:
        """The prepare stage's topology (every shard of the plan), env expanded."""
        if self._topology is None:
            doc = self.plan.document("prepare", self.options.hold_s)
            self._topology = Topology(
                config_from_dict(doc, source=f"migration {self.migration_id}", env=self.env)
            )
        return self._topology

    def engines(self) -> ShardEngines:
        if self._engines is None:
            self._engines = ShardEngines(self.topology())
        return self._engines

    def engine(self, shard: str) -> Engine:
        return self.engines().primary(ShardId(shard))

    def belongs(self, ranges: Sequence[tuple[int, int]]) -> Belongs:
        return Belongs(self.topology(), tuple(ranges))

    def specs(self, shard: str, broadcast: bool) -> list[TableSpec]:
        """The tables of ``shard`` a migration journals and copies (sharded tables, and the
        broadcast tables where ``broadcast``), read once per workflow."""
        found = self._specs.get((shard, broadcast))
        if found is None:
            plan = self.plan
            names = [*plan.sharded_tables, *(plan.broadcast_tables if broadcast else ())]
            with self.engine(shard).connect() as conn:
                found = self._specs[(shard, broadcast)] = describe(conn, self.topology(), names)
        return found

    # -- versions ---------------------------------------------------------------------------

    def push(
        self, stage: Stage, *, timeout: float | None = None, shadow_percent: int = 0
    ) -> AckReport:
        """Publish the plan's document for ``stage`` applied to the current version (nothing
        if the current version already is it) and wait for every live router's
        acknowledgement (an AckReport; ``complete`` False at the timeout)."""
        current = self.store.current()
        base = current.document if current is not None else None
        doc = self.plan.document(
            stage, self.options.hold_s, base=base, shadow_percent=shadow_percent
        )
        config_from_dict(doc, source=f"migration {self.migration_id} ({stage})", env=self.env)
        if current is not None and normalise(current.document) == normalise(doc):
            version = current.version
        else:
            version = self.store.push(
                doc,
                expected=current.version if current is not None else None,
                comment=f"reshard {self.migration_id}: {stage}",
            )
            state.add_event(self.store, self.migration_id, f"pushed version {version} ({stage})")
        return wait_for_acks(
            self.store, version, self.options.ack_timeout_s if timeout is None else timeout
        )

    def current_stage(self) -> str | None:
        """Where the current version has this migration's ranges: "copy", "frozen",
        "switched", "frozen_back" (its moving entries' write mode and owner), "final" (no
        entry, the targets own them) or None (no entry, the sources own them)."""
        current = self.store.current()
        if current is None:
            return None
        doc = current.document
        mine = [m for m in doc.get("moving") or () if m.get("migration") == self.migration_id]
        first = self.plan.moves[0]
        owner = next(
            (
                name
                for name, shard in (doc.get("shards") or {}).items()
                for start, end in shard.get("slots") or ()
                if start <= first.slots[0] < end
            ),
            None,
        )
        at_target = owner == first.target
        if not mine:
            return "final" if at_target else None
        mode = mine[0].get("write_mode", "dual_old_primary")
        if mode == "frozen":
            return "frozen_back" if at_target else "frozen"
        return "switched" if mode == "dual_new_primary" else "copy"

    # -- the actions ------------------------------------------------------------------------

    def act(self, action: str) -> state.Migration:
        """Run one action of the phase table (start, copy, verify, switch, rollback, cancel,
        finalize); ReshardStateError when it is not legal now, or when another process runs
        an action of this migration right now (one runner at a time: see _runner)."""
        if action in ("shadow", "drain"):
            raise ReshardError(
                f"{action} takes its own arguments: Workflow.{action}(...), or `shardctl"
                f" reshard {'switch-reads --shadow' if action == 'shadow' else 'drain'}`"
            )
        with self._runner():
            migration = self.migration
            phases.check(migration.phase, action)
            method: Callable[[], None] = getattr(self, f"_{action}")
            method()
            return self.migration

    @contextmanager
    def _runner(self) -> Iterator[None]:
        """This process is the migration's one runner while the block runs: a lease in the
        meta store (state.claim_runner, by the store's clock), renewed every second by a
        daemon thread. A runner whose lease could not be renewed in time (the store did not
        answer, or it passed to another) stops at its next chunk with ReshardStateError
        (``_halt``); a killed runner blocks another for at most the lease (RUNNER_LEASE_MS).
        The movers rely on it: copies of one migration never run side by side
        (journal.copy_keys reads without row locks)."""
        if self._holder is not None:
            yield
            return
        holder = f"{who()}:{uuid.uuid4().hex[:8]}"
        if not state.claim_runner(self.store, self.migration_id, holder, RUNNER_LEASE_MS):
            raise self._busy()
        self._holder = holder
        self._lost = False
        done = threading.Event()

        def renew() -> None:
            renewed = time.monotonic()
            while not done.wait(RUNNER_RENEW_S):
                try:
                    ok = state.claim_runner(self.store, self.migration_id, holder, RUNNER_LEASE_MS)
                except Exception as exc:
                    log.warning("runner lease not renewed: %s", exc)
                    ok = None
                if ok:
                    renewed = time.monotonic()
                elif ok is False or time.monotonic() - renewed >= RUNNER_LEASE_MS / 2000:
                    self._lost = True  # another holder, or half the lease without an answer
                    return

        thread = threading.Thread(target=renew, name="shardrouter-reshard-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=5)
            self._holder = None
            try:
                state.release_runner(self.store, self.migration_id, holder)
            except Exception as exc:  # it expires by itself
                log.warning("runner lease not released (it expires): %s", exc)

    def _paused(self, what: str) -> None:
        """A pause (``stop``) during an action that must run to its end before its phase is
        recorded: stop here; running the action again (or resume) finishes it."""
        if self.stop():
            raise ReshardStateError(
                f"migration {self.migration_id}: paused while {what}; run the same action"
                " again (or `shardctl reshard resume`) to finish it",
                legal=phases.legal(self.migration.phase),
            )

    def _halt(self) -> bool:
        """The movers' stop check, between chunks: True to pause (``stop``);
        ReshardStateError once the runner lease is lost."""
        if self._lost:
            raise ReshardStateError(
                f"migration {self.migration_id}: this runner lost its lease (the meta store did"
                " not answer, or another runner took over): stopped at a chunk boundary;"
                " `shardctl reshard resume` continues",
                legal=("resume",),
            )
        return self.stop()

    def _busy(self) -> ReshardStateError:
        return ReshardStateError(
            f"migration {self.migration_id}: another process is running one of its actions"
            " right now (one runner at a time); wait for it, or stop it: a killed runner"
            f" releases the migration within {RUNNER_LEASE_MS // 1000} s, and"
            " `shardctl reshard resume` continues"
        )

    def advance(self) -> state.Migration:
        """The next action on the forward path (finalize is never implied)."""
        phase = self.migration.phase
        path = phases.forward_path(phase, "switched")
        if not path:
            phases.check(phase, "advance")  # refuses with the reason (switched, or over)
            raise ReshardStateError(
                f"migration {self.migration_id} is {self.migration.phase}: nothing to advance",
                legal=phases.legal(self.migration.phase),
            )
        return self.act(path[0])

    def run(self, through: Literal["switched", "finalized"] = "switched") -> state.Migration:
        """Every action up to ``through`` ("switched", or "finalized"), each once."""
        while not self._halt():
            path = phases.forward_path(self.migration.phase, through)
            if not path:
                break
            self.act(path[0])
        return self.migration

    def resume(self) -> state.Migration:
        """Reconcile the phase with the current version (a crash between a push and the
        record of its phase; a crash inside a switch, which is then abandoned: writes go on
        where they were), then run the interrupted action again (start, copy)."""
        with self._runner():
            return self._resume()

    def _resume(self) -> state.Migration:
        phase = self.migration.phase
        stage = self.current_stage()
        if stage == "copy" and self._shadowing():
            self.push("copy")  # no runner drains: the targets would lag more and more
            state.add_event(self.store, self.migration_id, "shadow reads ended on resume")
        if stage == "frozen":
            self.push("copy")
            state.add_event(self.store, self.migration_id, "switch abandoned on resume")
        elif stage == "frozen_back":
            self.push("switched")
            state.add_event(self.store, self.migration_id, "switch back abandoned on resume")
        elif phase == "verified" and stage == "switched":
            self._record("switch", "switched (the version was pushed before a crash)")
        elif phase == "switched" and stage == "copy":
            self._record("rollback", "switched back (the version was pushed before a crash)")
        phase = self.migration.phase
        action = {"planned": "start", "prepared": "copy", "copying": "copy"}.get(phase)
        if action is not None:
            return self.act(action)
        if phase == "switched" and (stage == "final" or self._checkpoint("finalize_started")):
            return self.act("finalize")  # finalize was asked for and had begun
        return self.migration

    def _record(self, action: str, event: str) -> None:
        state.advance(self.store, self.migration_id, action)
        state.add_event(self.store, self.migration_id, event)

    # start: new shards in the topology, schema, journals -----------------------------------

    def _start(self) -> None:
        from ..ops.schema import apply  # ops.schema does not import reshard: no cycle

        self.push("prepare").raise_if_incomplete()
        apply(self.topology(), self.engines()).raise_for_errors()
        for pair in pairs(self.plan):
            belongs = self.belongs(pair.ranges)
            target_specs = self.specs(pair.target, pair.broadcast)
            if not self._checkpoint(f"journal:{pair.source}:{pair.target}"):
                held = [
                    f"{spec.physical}: {n}"
                    for spec in target_specs
                    if spec.shard_column is not None
                    and (n := mover.count(self.engine(pair.target), spec, belongs))
                ]
                if held:
                    raise ReshardDataError(
                        f"target {pair.target} already holds rows of the moving slots"
                        f" ({', '.join(held)}): they would be overwritten or kept stale;"
                        " remove them (or cancel this migration) first"
                    )
            journal.install(self.engine(pair.source), self.specs(pair.source, pair.broadcast))
            journal.install(self.engine(pair.target), target_specs)
            self._set_checkpoint(f"journal:{pair.source}:{pair.target}", True)
        self._reconcile_lookups()  # the trigger DDL may have made a DELETE keep its lookup row
        self._record("start", "prepared: shards in the topology, schema applied, journals on")

    # copy: the copy version, backfill with the journal drained between chunks ---------------

    def _copy(self) -> None:
        if self.migration.phase == "prepared":
            self.push("copy").raise_if_incomplete()
            state.mark_running(self.store, self.migration_id, "copy")
        # The copy's rate for status (rows copied by this run since it started, and when).
        run = {"started_at": time.time(), "copied_before": self._copied()}
        self._set_checkpoint("copy_run", run)
        for pair in pairs(self.plan):
            belongs = self.belongs(pair.ranges)
            source, target = self.engine(pair.source), self.engine(pair.target)
            for spec in self.specs(pair.source, pair.broadcast):
                name = f"backfill:{pair.source}:{pair.target}:{spec.physical}"
                point = self._checkpoint(name) or {}
                if point.get("done"):
                    continue
                total = mover.count(source, spec, belongs)
                self._set_checkpoint(f"total:{pair.source}:{pair.target}:{spec.physical}", total)
                task = self.progress.task(
                    f"copy {spec.physical} {pair.source}->{pair.target}", total
                )
                task.advance(int(point.get("copied", 0)))
                copied = int(point.get("copied", 0))

                def on_chunk(
                    done: mover.ChunkDone,
                    name: str = name,
                    task: Task = task,
                    pair: Pair = pair,
                    before: int = copied,
                ) -> None:
                    nonlocal copied
                    # done.rows_copied counts from the start of this backfill call
                    task.advance(before + done.rows_copied - copied)
                    copied = before + done.rows_copied
                    self._set_checkpoint(
                        name,
                        {"last_key": key_to_json(done.last_key), "copied": copied, "done": False},
                    )
                    self._drain(pair, batches=2)  # the copy stays current as it goes

                after = key_from_json(point["last_key"]) if point.get("last_key") else None
                report = mover.backfill(
                    source,
                    target,
                    spec,
                    belongs,
                    after=after,
                    chunk=self.options.chunk,
                    throttle=self._throttle(),
                    on_chunk=on_chunk,
                    stop=self._halt,
                )
                task.done()
                if not report.done:
                    return  # paused: resume continues from the checkpoint
                self._set_checkpoint(
                    name,
                    {
                        "last_key": key_to_json(report.last_key) if report.last_key else None,
                        "copied": copied,
                        "done": True,
                    },
                )
        self._set_checkpoint("copy_run", {**run, "finished_at": time.time()})
        for pair in pairs(self.plan):
            self._drain(pair)
        self._record("copy", "copied: every table backfilled, journal drained")

    def _throttle(self) -> mover.Throttle | None:
        if self.options.max_rows_per_s is None:
            return mover.Throttle()
        return mover.Throttle(max_rows_per_s=self.options.max_rows_per_s)

    def _drain(
        self,
        pair: Pair,
        *,
        batches: int | None = None,
        back: bool = False,
        upto: int | None = None,
        stop: Callable[[], bool] | None = None,
        lock_wait_s: int | None = None,
        attempts: int | None = None,
    ) -> journal.DrainReport:
        """Drain the authority's journal into the mirror (``back``: target -> source),
        passing over entries of the other pairs with the same authority."""
        authority, mirror = (pair.target, pair.source) if back else (pair.source, pair.target)
        others = [
            r
            for p in pairs(self.plan)
            if p != pair and (p.target if back else p.source) == authority
            for r in p.ranges
        ]
        return journal.drain(
            self.engine(authority),
            self.engine(mirror),
            self.specs(authority, pair.broadcast),
            self.belongs(pair.ranges),
            batch=self.options.drain_batch,
            max_batches=batches,
            stop=stop or self._halt,
            keep=self.belongs(others) if others else None,
            upto=upto,
            lock_wait_s=lock_wait_s,
            attempts=attempts,
        )

    # verify ----------------------------------------------------------------------------------

    def _verify(self) -> None:
        results: list[dict[str, Any]] = []
        equal = True
        for pair in pairs(self.plan):
            self._drain(pair)
            belongs = self.belongs(pair.ranges)
            for spec in self.specs(pair.source, pair.broadcast):
                report = mover.verify(
                    self.engine(pair.source), self.engine(pair.target), spec, belongs
                )
                equal = equal and report.equal
                results.append(
                    {
                        "source": pair.source,
                        "target": pair.target,
                        "table": spec.physical,
                        "rows_source": report.rows_source,
                        "rows_target": report.rows_target,
                        "differing": report.differing,
                        "repaired": report.repaired,
                        "equal": report.equal,
                        "sample": [list(k) for k in report.sample],
                    }
                )
        self._set_checkpoint("verify", {"equal": equal, "tables": results})
        if not equal:
            bad = [r["table"] for r in results if not r["equal"]]
            raise ReshardDataError(
                f"verify: {', '.join(bad)} still differ after repair; `shardctl reshard"
                " status` lists the rows; run verify again (writes may have raced it) or cancel"
            )
        self._record("verify", "verified: every table equal on both sides")

    # drain -----------------------------------------------------------------------------------

    def drain(self, seconds: float = 0.0) -> dict[str, Any]:
        """Drain the authorities' journals into the mirrors (the sources' before the switch,
        the targets' after it): to empty once, or on for ``seconds`` (about every 0.1 s; a
        pause ends it). Between steps nothing else drains, and after the switch nothing until
        finalize or a rollback: this keeps the mirrors current and the journals short while a
        migration waits (a rollback after the switch then has little to drain). The phase
        does not change. Returns the entries handled and those left."""
        if not 0 <= seconds <= 86_400:
            raise ReshardError(f"drain: seconds {seconds:g} must be in [0, 86400]")
        with self._runner():
            phase = self.migration.phase
            phases.check(phase, "drain")
            back = phase == "switched"
            handled = 0
            deadline = time.monotonic() + seconds
            while True:
                for pair in pairs(self.plan):
                    handled += self._drain(pair, back=back).entries
                if time.monotonic() >= deadline or self._halt():
                    break
                time.sleep(SHADOW_DRAIN_EVERY_S)
            authorities = sorted({p.target if back else p.source for p in pairs(self.plan)})
            left = {shard: journal.backlog(self.engine(shard)) for shard in authorities}
            state.add_event(
                self.store,
                self.migration_id,
                f"drained {handled} journal entries into the {'sources' if back else 'targets'}",
            )
            return {"entries": handled, "left": left, "into": "sources" if back else "targets"}

    # shadow reads ----------------------------------------------------------------------------

    def shadow(self, percent: int, seconds: float) -> dict[str, Any]:
        """SHADOW reads for ``seconds`` (docs/RESHARDING.md, "Shadow reads"): the routers go
        on answering every read from the sources and, for ``percent`` % of the moving slots
        (by slot: a key is always in or out), also run it on the target and compare; this
        runner drains the journals continuously meanwhile, so a target lags by a fraction of
        a second. Then shadow reads end (always, also on an error or a pause), the runner
        drains on while the routers finish their comparisons, and their counters (published
        in the meta store) are summed into the report, stored as the checkpoint ``shadow``
        and shown by status. ReshardDataError when a read differed (the routers log each
        one, logger ``shardrouter.shadow``); the phase does not change."""
        if not 1 <= percent <= 100 or not 0 < seconds <= 86_400:
            raise ReshardError(
                f"shadow reads: percent {percent} must be in 1..100 and seconds {seconds:g} in"
                " (0, 86400]; e.g. --percent 10 --seconds 60"
            )
        with self._runner():
            phases.check(self.migration.phase, "shadow")
            return self._shadow(percent, seconds)

    def _shadow(self, percent: int, seconds: float) -> dict[str, Any]:
        before, _ = self._shadow_counts()
        started = time.monotonic()
        try:
            self.push("copy", shadow_percent=percent).raise_if_incomplete()
            state.add_event(
                self.store, self.migration_id, f"shadow reads on {percent}% of the moving slots"
            )
            self._drain_until(started + seconds, pausable=True)
        finally:
            self.push("copy").raise_if_incomplete()  # shadow reads off, whatever happened
        elapsed = time.monotonic() - started
        after, routers = self._settled_shadow_counts()
        counts = {k: after.get(k, 0) - before.get(k, 0) for k in shadow.OUTCOMES}
        report: dict[str, Any] = {
            "percent": percent,
            "seconds": round(elapsed, 1),
            "routers": routers,
            **counts,
            "at": time.time(),
        }
        self._set_checkpoint("shadow", report)
        state.add_event(
            self.store,
            self.migration_id,
            f"shadow reads ended: {counts['compared']} compared, {counts['differed']} differed,"
            f" {counts['lagged']} lagged",
        )
        if counts["differed"]:
            raise ReshardDataError(
                f"shadow reads: {counts['differed']} of {counts['compared']} reads answered"
                " differently on the targets (the routers log each statement, logger"
                " shardrouter.shadow); run verify, which compares every row and repairs, then"
                " shadow again"
            )
        return report

    def _drain_until(self, deadline: float, *, pausable: bool = False) -> None:
        """Drain every pair about every SHADOW_DRAIN_EVERY_S until ``deadline``; paused
        (``stop``), it returns at once when ``pausable``, else waits without draining."""
        while time.monotonic() < deadline:
            if not self._halt():
                for pair in pairs(self.plan):
                    self._drain(pair)
            elif pausable:
                return
            time.sleep(max(0.0, min(SHADOW_DRAIN_EVERY_S, deadline - time.monotonic())))

    def _shadowing(self) -> bool:
        current = self.store.current()
        return current is not None and any(
            m.get("migration") == self.migration_id and m.get("shadow_percent")
            for m in current.document.get("moving") or ()
        )

    def _shadow_counts(self) -> tuple[dict[str, int], int]:
        """The routers' published shadow counters of this migration, summed, and how many
        routers published."""
        total: dict[str, int] = dict.fromkeys(shadow.OUTCOMES, 0)
        routers = 0
        for name, value in state.checkpoints(self.store, self.migration_id).items():
            if name.startswith(shadow.CHECKPOINT_PREFIX) and isinstance(value, dict):
                routers += 1
                for k in shadow.OUTCOMES:
                    total[k] += int(value.get(k, 0))
        return total, routers

    def _settled_shadow_counts(self) -> tuple[dict[str, int], int]:
        """The counters once the routers' last comparisons ended (their rechecks, against
        targets this keeps draining) and were published (once a second, at a poll):
        unchanged over a publishing period, waited for SHADOW_SETTLE_S at most."""
        period = shadow.PUBLISH_EVERY_S + 0.5
        self._drain_until(time.monotonic() + sum(shadow.RECHECK_S))
        found = self._shadow_counts()
        deadline = time.monotonic() + SHADOW_SETTLE_S
        while time.monotonic() < deadline:
            self._drain_until(time.monotonic() + period)
            again = self._shadow_counts()
            if again == found:
                break
            found = again
        return found

    # switch ----------------------------------------------------------------------------------

    def _switch(self) -> None:
        self._freeze_and_flip(forward=True)

    def _freeze_and_flip(self, *, forward: bool) -> None:
        """Drain the authority's journal (no freeze yet, so the freeze has little left),
        freeze the ranges where they are written now, wait for every router, check that no
        XA branch is left prepared on the authority, drain its journal to the last entry
        written before the freeze, and give the ranges to the other side. Past the budget,
        on any error, or when interrupted, the switch is abandoned: the version unfreezing
        the ranges where they were is pushed (held writes go on there) before this raises."""
        frozen: Stage
        flipped: Stage
        unfrozen: Stage
        frozen, flipped, unfrozen = (
            ("frozen", "switched", "copy") if forward else ("frozen_back", "copy", "switched")
        )
        self._journals_on()
        budget = self.options.freeze_timeout_s
        wait = max(1, math.ceil(budget))
        try:
            for pair in pairs(self.plan):  # the bulk of the backlog, while writes go on
                self._drain(pair, back=not forward, lock_wait_s=wait)
        except Exception as exc:
            raise ReshardStateError(
                "switch not started (nothing was frozen): draining the journal before it"
                f" failed ({type(exc).__name__}: {str(exc)[:200]}); run it again",
                legal=phases.legal(self.migration.phase),
            ) from exc
        started = time.monotonic()
        reason: str | None = None
        try:
            report = self.push(frozen, timeout=budget)
            if not report.complete:
                reason = (
                    f"routers did not acknowledge the freeze in {budget:g} s: {report.describe()}"
                )
            else:
                reason = self._drain_frozen(forward, started, budget)
        except BaseException as exc:
            self._abandon(unfrozen, f"{type(exc).__name__}: {exc}"[:300])
            if isinstance(exc, Exception):
                raise ReshardStateError(
                    f"switch abandoned, writes go on where they were: it failed"
                    f" ({type(exc).__name__}: {str(exc)[:200]}); run it again",
                    legal=phases.legal(self.migration.phase),
                ) from exc
            raise
        if reason is not None:
            self._abandon(unfrozen, reason)
            raise ReshardStateError(
                f"switch abandoned, writes go on where they were: {reason}; run it again"
                " (with a larger --freeze-timeout, or when routers answer)",
                legal=phases.legal(self.migration.phase),
            )
        self.push(flipped, timeout=self.options.ack_timeout_s)
        took = time.monotonic() - started
        self._set_checkpoint("switch" if forward else "switch_back", {"freeze_s": round(took, 4)})
        if forward:
            self._record(
                "switch", f"switched: target is the authority (freeze {took * 1000:.0f} ms)"
            )
        else:
            self._record(
                "rollback", f"switched back: source is the authority (freeze {took * 1000:.0f} ms)"
            )

    def _drain_frozen(self, forward: bool, started: float, budget: float) -> str | None:
        """Under the freeze: the authority's journal drained to its last entry; None when
        done, else why not (within the budget; a mirror write held by a lock waits at most
        about the budget)."""

        def late() -> bool:
            return time.monotonic() - started >= budget

        wait = max(1, math.ceil(budget))
        for pair in pairs(self.plan):
            authority = pair.source if forward else pair.target
            engine = self.engine(authority)
            prepared = len(xa.prepared_branches(engine, ShardId(authority)))
            if prepared:
                return (
                    f"{prepared} XA branch(es) are prepared on {authority}: their rows would"
                    " commit after the journal drained; finish them first"
                    " (Router.recover_xa)"
                )
            last = journal.last_id(engine)
            drained = self._drain(
                pair, back=not forward, upto=last, stop=late, lock_wait_s=wait, attempts=1
            )
            if drained.left:
                return (
                    f"the journal of {authority} did not drain within {budget:g} s"
                    f" ({drained.left} entries left)"
                )
        return None

    def _abandon(self, unfrozen: Stage, reason: str) -> None:
        """Unfreeze the ranges where they were (best effort: resume does it too)."""
        try:
            self.push(unfrozen)
            state.add_event(self.store, self.migration_id, f"switch abandoned: {reason}")
        except Exception as exc:  # the store or the routers did not answer: resume unfreezes
            log.error("switch abandoned but not unfrozen (run resume): %s", exc)

    def _journals_on(self) -> None:
        """Refuse a switch whose journals are not all there (a rollback or cancel that
        removed them and crashed before recording it): writes would not have been journaled,
        and the copy is not current."""
        missing: list[str] = []
        for pair in pairs(self.plan):
            for shard in (pair.source, pair.target):
                names = set(journal.installed_triggers(self.engine(shard)))
                specs = self.specs(shard, pair.broadcast and shard == pair.source)
                wanted = {n for spec in specs for n in journal.trigger_names(spec)}
                if not wanted <= names:
                    missing.append(shard)
        if missing:
            raise ReshardStateError(
                f"the journals of {', '.join(sorted(set(missing)))} are off (a rollback or"
                " cancel was interrupted?): the copy may have missed writes; roll back and"
                " cancel, then plan again",
                legal=phases.legal(self.migration.phase),
            )

    # rollback / cancel / finalize -------------------------------------------------------------

    def _rollback(self) -> None:
        if self.migration.phase == "switched":
            if self._checkpoint("finalize_started"):
                raise ReshardStateError(
                    f"migration {self.migration_id}: finalize has started (the sources' copies"
                    " are being deleted and the journals are off), so it cannot be rolled back;"
                    " run finalize again to finish it",
                    legal=("finalize",),
                )
            self._freeze_and_flip(forward=False)
            return
        # Copies on a target that serves slots of its own are deleted while the version still
        # marks it as holding copies (reads across shards refused): after the version without
        # the range they would be read as its own rows. A new target's copies are never read:
        # cancel deletes them.
        self._delete_copies(serving_only=True)
        self.push("rolled_back").raise_if_incomplete()
        self._remove_journals()
        self._reconcile_lookups()
        self._record("rollback", "rolled back: the source owns every slot, journals off")

    def _delete_copies(self, *, serving_only: bool) -> None:
        """Delete the moving rows from the targets (all, or those that own other slots)."""
        serving = set(self.topology().serving)
        for pair in pairs(self.plan):
            if serving_only and pair.target not in serving:
                continue
            belongs = self.belongs(pair.ranges)
            for spec in self.specs(pair.target, False):
                task = self.progress.task(f"delete {spec.physical} copies on {pair.target}", None)
                mover.delete_moved(
                    self.engine(pair.target),
                    spec,
                    belongs,
                    chunk=self.options.chunk,
                    throttle=self._throttle(),
                    on_chunk=_advancing(task),
                    stop=self._halt,
                )
                task.done()
                self._paused("deleting the copies")

    def _remove_journals(self) -> None:
        for pair in pairs(self.plan):
            journal.remove(self.engine(pair.source), self.specs(pair.source, pair.broadcast))
            journal.remove(self.engine(pair.target), self.specs(pair.target, pair.broadcast))

    def _cancel(self) -> None:
        if self.migration.phase != "planned":
            self._delete_copies(serving_only=False)  # before the version: see _rollback
        if self.migration.phase not in ("planned", "rolled_back"):
            self.push("rolled_back").raise_if_incomplete()
            self._remove_journals()
        self._reconcile_lookups()
        self._record("cancel", "cancelled: the target's copy deleted")

    def _finalize(self) -> None:
        """The point of no return, recorded first (rollback is refused from here). The
        journals go (nothing mirrors any more), then the sources' copies are deleted while
        the switched version is still current, so reads across shards stay refused until
        they are gone; only then the version without the range."""
        self._set_checkpoint("finalize_started", True)
        self._remove_journals()
        for pair in pairs(self.plan):
            belongs = self.belongs(pair.ranges)
            for spec in self.specs(pair.source, False):
                total = mover.count(self.engine(pair.source), spec, belongs)
                task = self.progress.task(
                    f"finalize: delete {spec.physical} on {pair.source}", total
                )
                mover.delete_moved(
                    self.engine(pair.source),
                    spec,
                    belongs,
                    chunk=self.options.chunk,
                    throttle=self._throttle(),
                    on_chunk=_advancing(task),
                    stop=self._halt,
                )
                task.done()
                self._paused("finalize")
        self.push("final").raise_if_incomplete()
        self._reconcile_lookups()
        self._record("finalize", "finalized: moved rows deleted from the sources")

    def _reconcile_lookups(self) -> None:
        """Remove orphan lookup rows, with the routers' own guarded discard (``check lookups
        --fix``: an orphan that stays one for its grace period, its owner checked under lock).
        Why here: a migration's actions run beside routers that may die between an owner's
        DELETE and its lookup cleanup (an orphan, harmless to reads); the trigger DDL itself
        no longer leaves any (the cleanup's owner check waits for the table's metadata lock,
        execution.OwnerCheck; tests/integration/test_reshard_ddl_lookups.py), but a migration
        ends with the lookups clean either way."""
        from ..engine.router import Router
        from ..ops.lookups import check_lookups  # ops imports nothing of reshard: no cycle

        current = self.store.current()
        if current is None:
            return
        doc = dict(current.document)
        doc.pop("meta", None)  # a plain router: it must not register as a follower
        router = Router(Topology(config_from_dict(doc, env=self.env)))
        try:
            reports = check_lookups(router, fix=True)
        finally:
            router.close()
        removed = sum(r.removed for r in reports)
        left = sum(len(r.orphans) - r.removed for r in reports)
        state.add_event(
            self.store,
            self.migration_id,
            f"lookups checked: {removed} orphan rows removed, {left} kept (owners in flight)",
        )

    # checkpoints -----------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Any:
        return state.get_checkpoint(self.store, self.migration_id, name)

    def _set_checkpoint(self, name: str, value: Any) -> None:
        state.set_checkpoint(self.store, self.migration_id, name, value)

    # status ----------------------------------------------------------------------------------

    def _copied(self) -> int:
        points = state.checkpoints(self.store, self.migration_id)
        return sum(int(v.get("copied", 0)) for k, v in points.items() if k.startswith("backfill:"))

    @staticmethod
    def _copy_progress(tables: list[dict[str, Any]], run: Any) -> dict[str, Any]:
        """Rows copied of the total (real counts taken when each table's copy began), the
        rate of the current (or last) copy run and the time left at that rate."""
        copied = sum(int(t["copied"]) for t in tables)
        known = [t for t in tables if t["total"] is not None]
        total = sum(int(t["total"]) for t in known) if known else None
        out: dict[str, Any] = {"copied": copied, "total": total, "rows_per_s": None, "eta_s": None}
        if run:
            end = float(run.get("finished_at") or time.time())
            seconds = max(end - float(run["started_at"]), 1e-6)
            rate = (copied - int(run.get("copied_before", 0))) / seconds
            out["rows_per_s"] = round(rate, 1)
            done = all(t["done"] for t in tables) and bool(tables)
            if done:
                out["eta_s"] = 0
            elif total is not None and rate > 0:
                out["eta_s"] = round(max(total - copied, 0) / rate, 1)
        return out

    def status(self) -> dict[str, Any]:
        """What `shardctl reshard status` prints: phase, tables copied/total from real
        counts, journal backlogs, verify, routers and their acks."""
        migration = self.migration
        points = state.checkpoints(self.store, self.migration_id)
        tables = []
        for name, value in sorted(points.items()):
            if not name.startswith("backfill:"):
                continue
            _, source, target, physical = name.split(":", 3)
            total = points.get(f"total:{source}:{target}:{physical}")
            tables.append(
                {
                    "source": source,
                    "target": target,
                    "table": physical,
                    "copied": value.get("copied", 0),
                    "total": total,
                    "done": value.get("done", False),
                }
            )
        backlog: dict[str, int | None] = {}
        if migration.phase not in ("planned", "finalized", "cancelled"):
            for shard in sorted({s for p in pairs(migration.plan) for s in (p.source, p.target)}):
                try:
                    backlog[shard] = journal.backlog(self.engine(shard))
                except Exception:  # a shard that does not answer: shown as unknown
                    backlog[shard] = None
        cluster = cluster_status(self.store)
        return {
            "migration": self.migration_id,
            "phase": migration.phase,
            "legal": list(phases.legal(migration.phase)),
            "moves": [
                {"slots": list(m.slots), "source": m.source, "target": m.target}
                for m in migration.plan.moves
            ],
            "tables": tables,
            "copy": self._copy_progress(tables, points.get("copy_run")),
            "journal_backlog": backlog,
            "verify": points.get("verify"),
            "switch": points.get("switch"),
            "shadow": points.get("shadow"),
            "cluster": cluster.as_dict(),
            "events": state.events(self.store, self.migration_id, limit=20),
        }


def _advancing(task: Task) -> Callable[[mover.ChunkDone], None]:
    """An on_chunk that moves ``task`` by each chunk's rows (ChunkDone counts are running
    totals of the walk)."""
    seen = 0

    def on_chunk(done: mover.ChunkDone) -> None:
        nonlocal seen
        task.advance(done.rows_copied - seen)
        seen = done.rows_copied

    return on_chunk


__all__ = ["Options", "Pair", "Workflow", "pairs"]
