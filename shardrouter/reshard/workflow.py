"""The orchestration of a resharding migration (docs/RESHARDING.md): each action checks the
phase table, pushes the topology versions of its step, waits for every live router's
acknowledgement, runs the movers (journal, copy) and records the new phase and its
checkpoints in the meta store. Every action is idempotent, so ``resume`` after a crash is the
interrupted action run again from the stored phase and checkpoints.

The CLI (``shardctl reshard``) only parses arguments and prints; everything here is library
code a service's own tooling can call.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

from sqlalchemy import Engine

from ..control.registry import AckReport, wait_for_acks
from ..control.store import MetaStore
from ..control.versions import cluster_status, normalise
from ..core.config import config_from_dict
from ..core.progress import NullProgress, Progress, Task
from ..core.topology import Topology
from ..engine.engines import ShardEngines
from ..errors import ReshardDataError, ReshardStateError
from ..types import ShardId
from . import copy as mover
from . import journal, phases, state
from .plan import Move, ReshardPlan, Stage
from .spec import Belongs, TableSpec, describe


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
    _locked: bool = False

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

    def push(self, stage: Stage, *, timeout: float | None = None) -> AckReport:
        """Publish the plan's document for ``stage`` applied to the current version (nothing
        if the current version already is it) and wait for every live router's
        acknowledgement (an AckReport; ``complete`` False at the timeout)."""
        current = self.store.current()
        base = current.document if current is not None else None
        doc = self.plan.document(stage, self.options.hold_s, base=base)
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
        with self._runner():
            migration = self.migration
            phases.check(migration.phase, action)
            method: Callable[[], None] = getattr(self, f"_{action}")
            method()
            return self.migration

    @contextmanager
    def _runner(self) -> Iterator[None]:
        """This process is the migration's one runner while the block runs: a named lock on
        the meta store (MySQL/MariaDB ``GET_LOCK``, released with its connection, so a killed
        runner frees it at once; SQLite: an advisory file lock beside the database). The
        movers rely on it: copies of one migration never run side by side (journal.copy_keys
        reads without row locks)."""
        if self._locked:
            yield
            return
        name = f"shardrouter_reshard_{self.migration_id}"[:64]
        if self.store.dialect == "sqlite":
            import fcntl

            path = f"{self.store.url.database or 'meta'}.{self.migration_id}.lock"
            with open(path, "a") as handle:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    raise self._busy() from None
                self._locked = True
                try:
                    yield
                finally:
                    self._locked = False
                    fcntl.flock(handle, fcntl.LOCK_UN)
            return
        with self.store.engine.connect() as conn:
            got = conn.exec_driver_sql("SELECT GET_LOCK(%s, 0)", (name,)).scalar()
            if got != 1:
                raise self._busy()
            self._locked = True
            try:
                yield
            finally:
                self._locked = False
                conn.exec_driver_sql("SELECT RELEASE_LOCK(%s)", (name,))

    def _busy(self) -> ReshardStateError:
        return ReshardStateError(
            f"migration {self.migration_id}: another process is running one of its actions"
            " right now (one runner at a time); wait for it, or stop it: a killed runner"
            " releases the migration at once, and `shardctl reshard resume` continues"
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
        while not self.stop():
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
        if phase == "switched" and stage == "final":
            return self.act("finalize")  # finalize was asked for and its version is out
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
        self._record("start", "prepared: shards in the topology, schema applied, journals on")

    # copy: the copy version, backfill with the journal drained between chunks ---------------

    def _copy(self) -> None:
        if self.migration.phase == "prepared":
            self.push("copy").raise_if_incomplete()
            state.mark_running(self.store, self.migration_id, "copy")
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
                    done: mover.ChunkDone, name: str = name, task: Task = task, pair: Pair = pair
                ) -> None:
                    nonlocal copied
                    copied += done.rows_copied
                    task.advance(done.rows_copied)
                    self._set_checkpoint(
                        name,
                        {"last_key": list(done.last_key), "copied": copied, "done": False},
                    )
                    self._drain(pair, batches=2)  # the copy stays current as it goes

                after = tuple(point["last_key"]) if point.get("last_key") else None
                report = mover.backfill(
                    source,
                    target,
                    spec,
                    belongs,
                    after=after,
                    chunk=self.options.chunk,
                    throttle=self._throttle(),
                    on_chunk=on_chunk,
                    stop=self.stop,
                )
                task.done()
                if not report.done:
                    return  # paused: resume continues from the checkpoint
                self._set_checkpoint(
                    name,
                    {
                        "last_key": list(report.last_key) if report.last_key else None,
                        "copied": copied,
                        "done": True,
                    },
                )
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
            stop=stop or self.stop,
            keep=self.belongs(others) if others else None,
            upto=upto,
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

    # switch ----------------------------------------------------------------------------------

    def _switch(self) -> None:
        self._freeze_and_flip(forward=True)

    def _freeze_and_flip(self, *, forward: bool) -> None:
        """Freeze the ranges where they are written now, wait for every router, drain that
        side's journal to the last entry written before the freeze, and give the ranges to
        the other side; abandon (unfreeze where they were) past the budget."""
        frozen: Stage
        flipped: Stage
        unfrozen: Stage
        frozen, flipped, unfrozen = (
            ("frozen", "switched", "copy") if forward else ("frozen_back", "copy", "switched")
        )
        started = time.monotonic()
        budget = self.options.freeze_timeout_s
        report = self.push(frozen, timeout=budget)
        reason = None
        if not report.complete:
            reason = f"routers did not acknowledge the freeze in {budget:g} s: {report.describe()}"
        else:

            def late() -> bool:
                return time.monotonic() - started >= budget

            for pair in pairs(self.plan):
                authority = pair.source if forward else pair.target
                last = journal.last_id(self.engine(authority))
                drained = self._drain(pair, back=not forward, upto=last, stop=late)
                if drained.left:
                    reason = (
                        f"the journal of {authority} did not drain within {budget:g} s"
                        f" ({drained.left} entries left)"
                    )
                    break
        if reason is not None:
            self.push(unfrozen)
            state.add_event(self.store, self.migration_id, f"switch abandoned: {reason}")
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

    # rollback / cancel / finalize -------------------------------------------------------------

    def _rollback(self) -> None:
        if self.migration.phase == "switched":
            self._freeze_and_flip(forward=False)
            return
        self.push("rolled_back").raise_if_incomplete()
        self._remove_journals()
        self._record("rollback", "rolled back: the source owns every slot, journals off")

    def _remove_journals(self) -> None:
        for pair in pairs(self.plan):
            journal.remove(self.engine(pair.source), self.specs(pair.source, pair.broadcast))
            journal.remove(self.engine(pair.target), self.specs(pair.target, pair.broadcast))

    def _cancel(self) -> None:
        if self.migration.phase not in ("planned", "rolled_back"):
            self.push("rolled_back").raise_if_incomplete()
            self._remove_journals()
        if self.migration.phase != "planned":
            for pair in pairs(self.plan):
                belongs = self.belongs(pair.ranges)
                for spec in self.specs(pair.target, False):
                    task = self.progress.task(
                        f"cancel: delete {spec.physical} on {pair.target}", None
                    )
                    mover.delete_moved(
                        self.engine(pair.target), spec, belongs, on_chunk=_advancing(task)
                    )
                    task.done()
        self._record("cancel", "cancelled: the target's copy deleted")

    def _finalize(self) -> None:
        self.push("final").raise_if_incomplete()
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
                    throttle=self._throttle(),
                    on_chunk=_advancing(task),
                )
                task.done()
        self._record("finalize", "finalized: moved rows deleted from the sources")

    # checkpoints -----------------------------------------------------------------------------

    def _checkpoint(self, name: str) -> Any:
        return state.get_checkpoint(self.store, self.migration_id, name)

    def _set_checkpoint(self, name: str, value: Any) -> None:
        state.set_checkpoint(self.store, self.migration_id, name, value)

    # status ----------------------------------------------------------------------------------

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
            "journal_backlog": backlog,
            "verify": points.get("verify"),
            "switch": points.get("switch"),
            "cluster": cluster.as_dict(),
            "events": state.events(self.store, self.migration_id, limit=20),
        }


def _advancing(task: Task) -> Callable[[mover.ChunkDone], None]:
    def on_chunk(done: mover.ChunkDone) -> None:
        task.advance(done.rows_copied)

    return on_chunk


@contextmanager
def workflow(store: MetaStore, migration_id: str, **kwargs: Any) -> Iterator[Workflow]:
    flow = Workflow(store, migration_id, **kwargs)
    try:
        yield flow
    finally:
        flow.close()


__all__ = ["Move", "Options", "Pair", "Workflow", "pairs", "workflow"]
