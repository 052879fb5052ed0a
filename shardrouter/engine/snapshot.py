"""The routing snapshot: one immutable view of a topology version and everything derived from it.

A router reads its topology, engines, planner, key rules and lean read pools through one
snapshot object (``router._snap``). Each statement pins the current snapshot once at its start
(``_pin``), each transaction at its start and until it ends, so a statement and a transaction
run entirely under one version. A new version swaps the snapshot in one attribute assignment,
between statements; what did not change (the engines and lean pools of shards whose URLs and
pool settings are the same) is carried over. A retired snapshot is disposed when its last user
releases it (reference counting: ``acquire``/``release``/``retire``), and then only the engines
and lean pools that no other live snapshot holds are disposed (``LiveSnapshots``): an engine
shared by several versions goes with the last of them, whatever order they are released in.

The write resolver (``WriteResolver``) is the one place every write passes on its way to a
shard, whatever the door (``Router.execute`` jobs, transactions, the explicit path, the ORM
flush, the AsyncRouter): it records the resolution for an optional hook and applies the fencing
rules of the control plane (see shardrouter.control.follow).

The follower acknowledges a new version only once no statement, transaction, explicit
connection or routed ORM session holds an older snapshot (``users`` of the retired ones is 0:
a retired snapshot whose last user left can never be pinned again), so a write under an
older version cannot happen after the acknowledgement.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from ..core.topology import KeyRule, Topology
from ..errors import FencedError, RouterForkedError, SwitchHoldError
from ..sql.planner import Planner
from ..types import ShardId, Slot
from .shadow import shadow_slots


class _EngineSet(Protocol):
    @property
    def all(self) -> Sequence[Any]: ...


E = TypeVar("E", bound=_EngineSet)
"""The engines of a snapshot: ShardEngines (sync) or AsyncShardEngines."""
L = TypeVar("L")
"""A lean read pool (ReadPool / AsyncReadPool)."""


@dataclass(frozen=True, slots=True)
class MovingRange:
    """Slots [start, end) whose placement is changing from ``source`` to ``target``;
    ``write_mode`` "frozen": writes to them are held while the switch runs (docs/RESHARDING.md)."""

    start: int
    end: int
    source: ShardId
    target: ShardId
    write_mode: str = "dual_old_primary"
    hold_s: float = 2.0

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot < self.end

    @property
    def frozen(self) -> bool:
        return self.write_mode == "frozen"


def moving_ranges(topology: Topology) -> tuple[MovingRange, ...]:
    return tuple(
        MovingRange(
            m.slots[0], m.slots[1], ShardId(m.source), ShardId(m.target), m.write_mode, m.hold_s
        )
        for m in topology.config.moving
    )


class Frozen(SwitchHoldError):
    """Raised by the resolver for a write to a range frozen in the write's own snapshot,
    before anything of that write ran: the routers' doors that can start over (a statement
    outside a transaction, a ``connection()`` / ``session()`` block being opened) hold it and
    retry on the next version (``hold``); elsewhere (inside a transaction) it reaches the
    caller as SwitchHoldError: nothing of that statement ran, retry the transaction."""

    def __init__(self, message: str, *, slots: tuple[int, int], hold_s: float) -> None:
        super().__init__(message, slots=slots)
        self.hold_s = hold_s


def steps_blind(snap: RoutingSnapshot[Any, Any], plan: Any) -> Frozen | None:
    """A Frozen for a write statement that maintains lookup rows while ``snap`` freezes any
    range, else None. Such a statement writes in steps (the owner rows, then lookup rows on
    other shards, or the reverse) and a later step's slots are known only once an earlier one
    ran (the merchant of a deleted order): a freeze met half-way would leave the earlier step
    done and the later one undone, so the whole statement waits for the switch before its
    first step (the freeze lasts at most the switch's budget). Other writes are checked per
    job by the resolver and wait only for their own slots."""
    if plan.kind == "select" or not any(m.frozen for m in snap.moving):
        return None
    in_steps = any(
        key.lookup_table is not None for rule in plan.tables for key in rule.keys.values()
    ) or any(rule.name in snap.lookup_tables for rule in plan.tables)
    if not in_steps:
        return None
    return lookups_frozen(snap)


def lookups_frozen(snap: RoutingSnapshot[Any, Any]) -> Frozen | None:
    """The Frozen for a write that maintains lookup rows (see steps_blind; the ORM flush's
    lookup rows too) while ``snap`` freezes any range, else None."""
    frozen = next((m for m in snap.moving if m.frozen), None)
    if frozen is None:
        return None
    return Frozen(
        f"write refused: it maintains lookup rows in several steps and slots [{frozen.start},"
        f" {frozen.end}) are being switched from {frozen.source} to {frozen.target} right now;"
        f" such writes wait (at most {frozen.hold_s:g} s) outside a transaction; inside one,"
        " nothing of this statement ran: roll the transaction back and retry it",
        slots=(frozen.start, frozen.end),
        hold_s=frozen.hold_s,
    )


def frozen_now(snap: RoutingSnapshot[Any, Any], slots: tuple[int, int]) -> bool:
    """True while ``snap`` freezes any slot of ``slots``."""
    return any(m.frozen and m.start < slots[1] and slots[0] < m.end for m in snap.moving)


def held_too_long(exc: Frozen, waited_s: float) -> SwitchHoldError:
    start, end = exc.slots or (0, 0)
    return SwitchHoldError(
        f"a write to slots [{start}, {end}) was held {waited_s:.2f} s for a switch between"
        f" shards that did not finish (the router holds such writes at most {exc.hold_s:g} s);"
        " nothing ran: retry it. `shardctl reshard status` shows the migration",
        slots=exc.slots,
    )


HOLD_POLL_S = 0.002
"""How often a held write looks for the version that releases it (only while one is held)."""


class HoldQueue:
    """The writes a router holds during a switch: at most ``limit`` at once (beyond it a
    write fails at once with SwitchHoldError rather than pile up); counts for status."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.holding = 0
        self.held = 0
        """Writes held since the router started."""
        self.max_wait_s = 0.0
        self._lock = threading.Lock()

    def enter(self, exc: Frozen) -> None:
        with self._lock:
            if self.holding >= self.limit:
                raise queue_full(exc, self.limit) from exc
            self.holding += 1
            self.held += 1

    def leave(self, waited_s: float) -> None:
        with self._lock:
            self.holding -= 1
            self.max_wait_s = max(self.max_wait_s, waited_s)


def queue_full(exc: Frozen, limit: int) -> SwitchHoldError:
    start, end = exc.slots or (0, 0)
    return SwitchHoldError(
        f"a write to slots [{start}, {end}) could not be held for the switch between shards:"
        f" this router already holds {limit} writes (max_held_writes); nothing ran: retry it",
        slots=exc.slots,
    )


class RoutingSnapshot(Generic[E, L]):
    """Topology + version + engines + planner + key rules + lean pools, pinned and swapped whole.

    Immutable in what it routes by; ``lean`` is a cache filled on first use (shared with the
    next snapshot for the engines it keeps). ``retire(dispose)`` runs ``dispose`` once no
    statement holds it any more (at once if none does).
    """

    __slots__ = (
        "__weakref__",
        "_dispose",
        "_lock",
        "_users",
        "engines",
        "forked",
        "key_rules",
        "lapsed",
        "lean",
        "lookup_tables",
        "moving",
        "moving_shards",
        "planner",
        "retired",
        "shadowed",
        "topology",
        "version",
    )

    def __init__(
        self,
        topology: Topology,
        engines: E,
        key_rules: Mapping[str, KeyRule],
        lean: dict[Any, L | Literal[False]] | None = None,
    ) -> None:
        self.topology = topology
        self.version: int = topology.version
        self.engines = engines
        self.planner = Planner(topology)
        self.key_rules = key_rules
        self.lean: dict[Any, L | Literal[False]] = lean if lean is not None else {}
        self.moving = moving_ranges(topology)
        self.lookup_tables = frozenset(
            key.lookup_table
            for name in topology.config.tables
            for key in topology.table(name).keys.values()
            if key.lookup_table is not None
        )
        """Tables that hold lookup rows (merchant_orders, user_emails): written in steps."""
        self.moving_shards = frozenset(s for m in self.moving for s in (m.source, m.target))
        self.shadowed = shadow_slots(topology)
        """Slots whose reads are compared with their target (engine.shadow); usually empty."""
        self._lock = threading.Lock()
        self._users = 0
        self._dispose: Callable[[], None] | None = None
        self.retired = False
        self.forked = ""
        """Set in a fork()ed child of a following router's process: why pinning refuses."""
        self.lapsed = ""
        """Set when this router's lease lapsed while the snapshot existed (when, for
        FencedError): nothing pinned on it writes again, even once the router has recovered
        (the follower installs a fresh snapshot for new statements)."""

    def __repr__(self) -> str:
        return f"RoutingSnapshot(version={self.version}, users={self._users})"

    def acquire(self) -> bool:
        """Pin it (False: it was retired and disposed meanwhile; pin the current one).
        RouterForkedError in a fork()ed child of a router that follows a meta store."""
        if self.forked:  # before the lock: a parent's thread may have held it at the fork
            raise RouterForkedError(self.forked)
        with self._lock:
            if self.retired and self._dispose is None and self._users == 0:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            dispose = self._dispose if self._users == 0 else None
            if dispose is not None:
                self._dispose = None
        if dispose is not None:
            dispose()

    def retire(self, dispose: Callable[[], None]) -> None:
        """No new statement pins it; ``dispose`` runs when the last user releases it."""
        with self._lock:
            self.retired = True
            if self._users:
                self._dispose = dispose
                return
        dispose()

    @property
    def users(self) -> int:
        return self._users


class SnapshotHolder(Generic[E, L]):
    """What the sync and async routers read through their current snapshot, and how they pin
    it: one definition for both (each router only says which engines and pools it holds)."""

    _snap: RoutingSnapshot[E, L]

    @property
    def topology(self) -> Topology:
        return self._snap.topology

    @property
    def planner(self) -> Planner:
        return self._snap.planner

    @property
    def version(self) -> int:
        """The topology version this router serves."""
        return self._snap.version

    @property
    def _key_rules(self) -> Mapping[str, KeyRule]:
        return self._snap.key_rules

    @property
    def _lean(self) -> dict[Any, L | Literal[False]]:
        return self._snap.lean

    def _pin(self) -> RoutingSnapshot[E, L]:
        """The current snapshot, held until ``release()``: a swap never disposes what a
        statement still uses."""
        while True:
            snap = self._snap
            if snap.acquire():
                return snap


class LiveSnapshots(Generic[E, L]):
    """The snapshots of one router not yet disposed (the current one and retired ones still
    pinned), to tell what a snapshot being disposed may take with it.

    Versions share engines and lean pools (a new version takes over what did not change), so
    what the disposed snapshot holds alone, compared against every live snapshot and not only
    its successor, is what can go: an engine kept by version 2 and dropped by version 3 is
    disposed only once neither version 1 nor version 2 is in use. Thread-safe.
    """

    def __init__(self, first: RoutingSnapshot[E, L]) -> None:
        # Reentrant: a snapshot released by a garbage-collected session's finalizer may leave
        # from inside another leave of the same thread.
        self._lock = threading.RLock()
        self._live: list[RoutingSnapshot[E, L]] = [first]

    def add(self, snap: RoutingSnapshot[E, L]) -> None:
        with self._lock:
            self._live.append(snap)

    def lapse(self, when: str) -> None:
        """The lease lapsed: every snapshot alive now (the current one and retired ones still
        pinned) is write-dead for good (``RoutingSnapshot.lapsed``)."""
        with self._lock:
            for snap in self._live:
                if not snap.lapsed:
                    snap.lapsed = when

    def leave(self, snap: RoutingSnapshot[E, L]) -> tuple[list[L], list[Any]]:
        """Forget ``snap``: (its lean pools, its engines) that no live snapshot still holds,
        for the caller to close (pools before their engines). Of two snapshots sharing an
        engine and leaving at once, the later one (in lock order) disposes it."""
        with self._lock:
            if snap in self._live:
                self._live.remove(snap)
            others = list(self._live)
        engines = {id(e) for s in others for e in s.engines.all}
        pools = {id(p) for s in others for p in list(s.lean.values()) if p is not False}
        own_pools = {id(p): p for p in list(snap.lean.values()) if p is not False}
        return (
            [p for k, p in own_pools.items() if k not in pools],
            [e for e in snap.engines.all if id(e) not in engines],
        )

    def __len__(self) -> int:
        return len(self._live)


class SlotRecorder:
    """A Topology stand-in for one statement that notes every slot routed through it (all
    routing of execution.run goes through ``shard_of_slot``), so the resolver can check a
    job's own slots. Used only while some snapshot has moving ranges: no cost otherwise."""

    def __init__(self, topology: Topology) -> None:
        self._topology = topology
        self.slots: list[Slot] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._topology, name)

    def shard_of_slot(self, slot: int) -> ShardId:
        self.slots.append(Slot(slot))
        return self._topology.shard_of_slot(slot)

    def on(self, shard: ShardId) -> list[Slot] | None:
        """The slots routed to ``shard`` (None: none known, e.g. a scatter write)."""
        owner = self._topology.shard_of_slot
        found = [s for s in dict.fromkeys(self.slots) if owner(s) == shard]
        return found or None


@dataclass(frozen=True, slots=True)
class Resolution:
    """One write on its way to a shard, as the resolver saw it."""

    path: str
    """The door: execute, transaction, explicit, orm, async, async_transaction, async_explicit."""
    shard: ShardId
    slot: Slot | None
    """None when the door knows only the shard (a job of Router.execute)."""
    version: int
    role: str
    """The job's role (statement, lookup, lookup_cleanup) or the door's (explicit, orm)."""


@dataclass
class FenceState:
    """What the follower knows of this router's lease and the cluster's acknowledgements.

    ``lease_end`` is this process's monotonic clock: the start of the last successful renewal
    (request sent) plus lease_s minus fence_margin_s. Without a follower it is infinite."""

    lease_end: float = float("inf")
    acked: int = 0
    """The version this router has acknowledged (it serves it)."""
    all_acked: int = 0
    """The lowest version acknowledged by every live router, as last read from the store."""
    current: int = 0
    """The current version, as last read from the store."""
    reason: str = ""
    """Why the lease was not renewed (the last error), for FencedError."""
    forked: str = ""
    """Set in a fork()ed child: every write refuses with RouterForkedError (this message)."""

    def expired(self) -> bool:
        return time.monotonic() >= self.lease_end

    def expired_at(self) -> str:
        """When the lease ended, on this host's wall clock (UTC), and how long ago."""
        ago = time.monotonic() - self.lease_end
        if ago == float("inf"):
            return "before this process could renew it"
        at = time.strftime("%H:%M:%S", time.gmtime(time.time() - ago))
        return f"{at} UTC ({ago:.1f} s ago)"


@dataclass
class WriteResolver:
    """The one door every write passes (slot/shard -> shard, role) and the fencing check.

    - Every write is refused (FencedError) once the lease has expired by this process's clock
      (the fence margin included): the router no longer knows which slots are moving now (a
      version pushed since may have started moving any of them, and the cluster goes on
      without it once its lease has expired in the store), so it cannot tell a safe write
      from a stale one. Reads go on. It recovers by itself at the next renewal after the meta
      store answers again and it has caught up with the current version. The doors call
      ``before_commit`` before committing writes checked earlier (a transaction, a
      ``connection()`` block, an ORM session, a statement): refused too once it expired.
    - A write to a slot whose placement is changing (in the pinned snapshot's or the current
      snapshot's ``moving`` ranges) is refused when the pinned snapshot is older than the
      version this router (or the whole cluster) has acknowledged. (The follower acknowledges
      only once no older snapshot is pinned, so this is a second line of defence.)
    - A write or commit through a snapshot marked ``lapsed`` (alive when the lease was
      renewed after lapsing: pinned before the recovery) is refused for good, whatever the
      router serves now: the cluster may have moved past its version meanwhile.
    - In a fork()ed child of a following router, every write refuses with RouterForkedError.

    Jobs of Router.execute carry no slot: while moving ranges exist, the statement routes
    through a SlotRecorder and each write job is checked with the slots routed to its shard. A
    write whose slots are unknown (a scatter write) is checked against every moving range with
    its shard as source or target: conservative, never permissive.
    Everything else passes untouched; with no moving ranges and no hook the check costs three
    attribute reads and one monotonic-clock comparison (the lease).
    """

    current: Callable[[], RoutingSnapshot[Any, Any]]
    fence: FenceState = field(default_factory=FenceState)
    hook: Callable[[Resolution], None] | None = None

    def write_slot(
        self, snap: RoutingSnapshot[Any, Any], slot: Slot, path: str, role: str = "statement"
    ) -> ShardId:
        """The shard that takes a write to ``slot`` under ``snap`` (FencedError if fenced)."""
        shard = snap.topology.shard_of_slot(slot)
        if self.hook is not None:
            self.hook(Resolution(path, shard, slot, snap.version, role))
        if (  # the lease before ``lapsed``: the follower marks snapshots, then lifts it
            snap.moving
            or self.current().moving
            or time.monotonic() >= self.fence.lease_end
            or snap.lapsed
        ):
            self._check(snap, shard, (slot,))
        return shard

    def write_shard(
        self,
        snap: RoutingSnapshot[Any, Any],
        shard: ShardId,
        path: str,
        role: str = "statement",
        slots: Iterable[Slot] | None = None,
    ) -> None:
        """A write to ``shard`` (its slots when the door knows them)."""
        if self.hook is not None:
            for slot in slots if slots is not None else (None,):
                self.hook(Resolution(path, shard, slot, snap.version, role))
        if (  # the lease before ``lapsed``: the follower marks snapshots, then lifts it
            snap.moving
            or self.current().moving
            or time.monotonic() >= self.fence.lease_end
            or snap.lapsed
        ):
            self._check(snap, shard, tuple(slots) if slots is not None else None)

    def before_commit(
        self, snap: RoutingSnapshot[Any, Any], shard: ShardId | None, slot: Slot | None = None
    ) -> None:
        """Before the commit of writes the resolver passed earlier under ``snap`` (a
        transaction, a ``connection()`` block, a routed ORM session, a statement): refused
        once the lease has expired meanwhile, since the cluster may have moved on without this
        router, and when it lapsed since ``snap`` was pinned (even if renewed again). The
        caller rolls back. One attribute read and one monotonic-clock comparison while the
        lease is live."""
        if time.monotonic() >= self.fence.lease_end or snap.lapsed:  # in this order
            slots = (slot,) if slot is not None else None
            self._refuse_expired(shard, slots, "commit of")
            self._refuse_lapsed(snap, shard, slots, "commit of")

    def _refuse_expired(
        self, shard: ShardId | None, slots: tuple[Slot, ...] | None, what: str = "write to"
    ) -> None:
        fence = self.fence
        if fence.forked:
            raise RouterForkedError(fence.forked)
        if not fence.expired():
            return
        where = f"shard {shard}" if shard is not None else "the shards"
        if slots:
            where = f"slot {slots[0]} on {where}"
        why = f": {fence.reason}" if fence.reason else ""
        raise FencedError(
            f"{what} {where} refused: this router's lease with the meta store expired at"
            f" {fence.expired_at()}{why}; this router cannot know which slots are moving"
            " now (a version pushed since may move any of them, and the cluster no longer"
            " waits for this router), so it refuses every write until it is renewed. Reads"
            " keep working. The way out: the meta store must answer again; the router then"
            " catches up and recovers by itself",
            slot=slots[0] if slots else None,
        )

    @staticmethod
    def _refuse_lapsed(
        snap: RoutingSnapshot[Any, Any],
        shard: ShardId | None,
        slots: tuple[Slot, ...] | None,
        what: str = "write to",
    ) -> None:
        if not snap.lapsed:
            return
        where = f"shard {shard}" if shard is not None else "the shards"
        if slots:
            where = f"slot {slots[0]} on {where}"
        raise FencedError(
            f"{what} {where} refused: it runs on topology version {snap.version} as this router"
            f" pinned it before its lease with the meta store lapsed ({snap.lapsed}); while the"
            " router was cut off the cluster may have moved past that version, so nothing"
            " pinned before the lapse writes again, even now that the router has recovered."
            " The way out: end this transaction (roll it back), routed ORM session (rollback()"
            " or close()) or connection() block and start a new one: it runs on the router's"
            " current version",
            slot=slots[0] if slots else None,
        )

    def _check(
        self, snap: RoutingSnapshot[Any, Any], shard: ShardId, slots: tuple[Slot, ...] | None
    ) -> None:
        self._refuse_expired(shard, slots)
        self._refuse_lapsed(snap, shard, slots)
        fence = self.fence
        current = self.current()
        ranges = snap.moving + tuple(m for m in current.moving if m not in snap.moving)
        for m in ranges:
            if slots is None:
                hit: Slot | None = Slot(m.start) if shard in (m.source, m.target) else None
            else:
                hit = next((s for s in slots if s in m), None)
            if hit is None:
                continue
            where = f"slot {hit}" if slots is not None else f"slots [{m.start}, {m.end})"
            if m.frozen and m in snap.moving:  # frozen in the write's own version: hold it
                raise Frozen(
                    f"write to {where} on shard {shard} refused: its slots are being switched"
                    f" from {m.source} to {m.target} right now and writes to them wait (at most"
                    f" {m.hold_s:g} s) outside a transaction; inside one, nothing of this"
                    " statement ran: roll the transaction back and retry it",
                    slots=(m.start, m.end),
                    hold_s=m.hold_s,
                )
            newest = max(fence.acked, fence.all_acked)
            if snap.version < newest:
                raise FencedError(
                    f"write to {where} on shard {shard} refused: its placement is moving"
                    f" ({m.source} -> {m.target}) and this statement runs on topology version"
                    f" {snap.version}, older than version {newest} that this router"
                    " acknowledged; retry the statement (or transaction) on the new version",
                    slot=hit,
                )


__all__ = [
    "HOLD_POLL_S",
    "FenceState",
    "Frozen",
    "HoldQueue",
    "LiveSnapshots",
    "MovingRange",
    "Resolution",
    "RoutingSnapshot",
    "SlotRecorder",
    "SnapshotHolder",
    "WriteResolver",
    "frozen_now",
    "held_too_long",
    "lookups_frozen",
    "moving_ranges",
    "queue_full",
    "steps_blind",
]
