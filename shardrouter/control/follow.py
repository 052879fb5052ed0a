"""The follower: a router built from a config with ``meta:`` serves the meta store's version.

``Router.load(path)`` / ``Router.from_config(config)`` (and the AsyncRouter's) read ``meta:``
from the file (the file only says where the store is), load the store's CURRENT version (its
document validated here, with this process's environment for ``${VAR}``), register in the
registry (shardrouter.control.registry) and start a daemon thread. Without ``meta:`` nothing
of this exists: no thread, no registry row.

The thread, never the statement path, talks to the store. Every ``poll_interval_s`` (every
``fast_poll_interval_s`` while a change is *in flight*: the current version is not yet
acknowledged by every live router, this router has not caught up, or the served topology has
moving slot ranges) it polls: one SELECT reads the current version, the lowest acknowledgement
of the live routers and the store's clock. At least every (lease_s - fence_margin_s) / 4 the
poll is a heartbeat instead: it renews the lease and records the served and acknowledged
versions in the same transaction (about 1 ms of CPU on MariaDB, measured by
tools/bench_control.py); a read in between is one round trip on a connection the poller
keeps. On a new version it fetches and validates the document, builds the new
routing snapshot and swaps it in (``router._install``: statements and transactions already
running finish on the version they started with). It acknowledges it (a second heartbeat)
once no user of an older snapshot is left: at once when nothing is in flight, else at the
first poll after the last transaction, ``connection()``/``session()`` block or routed ORM
session transaction holding an older snapshot has let go; until then its heartbeats
report the new version as served and the old one as acknowledged, and ``wait_for_acks``
waits for it (or names it lagging at its timeout). A version that fails validation here is
not applied: the router keeps serving its version, logs the problems (passwords masked by the
config's messages) and does not acknowledge it, so ``wait_for_acks`` names it as lagging.

Start. After its registration has committed, the router reads the current version once more
and, if a newer one was pushed in between (it may even have been acknowledged by every live
router, which did not yet include this one), swaps to it and acknowledges it before
``from_config`` returns: a router never serves a version older than one the cluster has
acknowledged without it.

Fencing. The lease end is tracked by this process's monotonic clock: the moment the renewing
heartbeat was SENT, plus ``lease_s``, minus ``fence_margin_s`` (the store's lease runs from
the moment it received the request, later, so this end is always earlier than the store's).
It is renewed only by a heartbeat that succeeded while this router had caught up with the
current version. Once it passes, the router refuses EVERY write, and the commit of writes
checked before (shardrouter.engine.snapshot.WriteResolver): cut off from the store, it cannot
know which slots a version pushed since has started moving, and the cluster stops waiting
for it once its lease has expired in the store. Reads go on. The next successful heartbeat
after catching up lifts the fence, for new statements only: before it lifts, every snapshot
alive (pinned before or during the lapse) is marked lapsed and a fresh snapshot of the same
topology is installed (``_lapse``); a write or commit through a lapsed snapshot is refused for
good, since the cluster may have moved past its version while this router was cut off (a
transaction open across the outage must not write by version 1 once the router serves 3).

Why a router never writes with a topology older than the one all live routers acknowledged:
a live router acknowledges version v only after it swapped to v and no statement,
transaction or session of an older version is left, so no write can run under an older
version afterwards (the resolver also refuses a write to a moving slot from a snapshot
older than the acknowledged version, a second line); a router that could not acknowledge is
either still live (then ``wait_for_acks`` waits for it) or its lease expired (then it has
fenced every write by its own clock before the store's lease ended); a router that started
meanwhile caught up before serving.

fork(). A following router inherited through fork() has no poller in the child and its
registry row is the parent's: in the child every statement, transaction, connection and
session refuses with RouterForkedError (build the router after forking), and its close()
neither deregisters nor closes the parent's connections to the store.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from collections.abc import Mapping
from typing import Any

from sqlalchemy.engine import URL

from ..core.config import (
    MetaConfig,
    TopologyConfig,
    _mask_text,
    config_from_dict,
    safe_url,
    same_database,
)
from ..core.topology import Topology
from ..engine.snapshot import FenceState, RoutingSnapshot
from ..errors import ConfigError, MetaStoreDocumentError, MetaStoreError
from .registry import Heartbeat, Registration, RouterKind
from .store import MetaStore, TopologyVersion

log = logging.getLogger("shardrouter.control")

_followers: weakref.WeakSet[Follower] = weakref.WeakSet()
_followers_lock = threading.Lock()


class Follower:
    """One router's registration and poller (see the module docstring)."""

    def __init__(
        self,
        meta: MetaConfig,
        *,
        kind: RouterKind,
        env: Mapping[str, str] | None = None,
        store: MetaStore | None = None,
    ) -> None:
        self.meta = meta
        self.kind = kind
        self.env = env
        self.store = store or MetaStore.from_config(meta)
        self.fence = FenceState()
        self.registration = Registration(self.store, kind=kind, lease_s=meta.lease_s)
        self.rejected: dict[int, str] = {}
        self._told: set[int] = set()  # versions whose other meta: settings were logged
        """Versions that failed validation here: version -> the problems (masked)."""
        self.last_error: str = ""
        self.in_flight = False
        self._last_renewal = float("-inf")
        self._renew_every = max(meta.poll_interval_s, (meta.lease_s - meta.fence_margin_s) / 4)
        """Polls in between only read (one SELECT); a renewal comes at least every
        (lease_s - fence_margin_s) / 4 plus one poll interval, well before the fence."""
        self._router: weakref.ReferenceType[Any] | None = None
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._draining: list[RoutingSnapshot[Any, Any]] = []
        """Snapshots swapped out since the last acknowledgement: the router acknowledges the
        version it serves only once none of them has a user left (see _ack_due)."""
        self._pid = os.getpid()
        self._forked = False

    # -- start ------------------------------------------------------------------------------

    def initial_topology(self) -> Topology:
        """The store's current version, validated here (ConfigError / MetaStoreError)."""
        current = self.store.current()
        if current is None:
            raise MetaStoreError(
                f"the meta store {safe_url(self.store.url)} has no topology version yet; push"
                " one first: shardctl topology push TOPOLOGY.yaml"
            )
        return Topology(self._validate(current))

    def _validate(self, found: TopologyVersion) -> TopologyConfig:
        config = config_from_dict(
            dict(found.document),
            source=f"meta store {safe_url(self.store.url)} version {found.version}",
            env=self.env,
        )
        if config.version != found.version:  # push stamps the number into the document
            config = config.model_copy(update={"version": found.version})
        pushed = config.meta
        if pushed is not None and not _same_store(pushed.url, self.store.url):
            # MetaStore.push stores any document; `topology push` refuses this one. Followed,
            # it would claim a store this router does not poll.
            raise ConfigError(
                [
                    f"meta.url: version {found.version} names the meta store"
                    f" {safe_url(pushed.url)}, but it was pushed to {safe_url(self.store.url)},"
                    " which this router follows; push a version whose meta.url names this"
                    " store (or has no meta: section)"
                ],
                f"meta store {safe_url(self.store.url)} version {found.version}",
            )
        differs = pushed is not None and _settings(pushed) != _settings(self.meta)
        if differs and found.version not in self._told:
            self._told.add(found.version)
            log.warning(
                "router %s: version %d has other meta: settings (poll, lease, timeouts) than"
                " this router's; a router runs with those of the file it started from"
                " (restart routers with the new file to change them)",
                self.instance_id,
                found.version,
            )
        # The settings this router runs with: its fence and its registration must agree on
        # one lease length, so they never change under a running router.
        return config.model_copy(update={"meta": self.meta})

    def start(self, router: Any) -> None:
        """Register ``router`` (serving its version), catch up with the current version if
        one was pushed before the registration was visible, and start polling.

        The catch-up closes a race: between loading the current version and registering, a
        newer version may have been pushed and acknowledged by every live router (this one
        was not live yet, so no one waited for it). After the registration has committed,
        every later push waits for this router; one more read then sees every earlier push.
        The router reaches its caller (so it serves anything) only after that read and the
        swap to what it found; a version that does not validate here fails the start."""
        router._follower = self
        router.resolver.fence = self.fence
        self._router = weakref.ref(router)
        started = time.monotonic()
        self.registration.register(router.version)
        self.fence.acked = router.version
        beat = self.registration.read()  # after the commit: sees every push before it
        current = beat.current_version
        if current is not None and current > router.version:
            self._install(router, self._validate(self.store.get(current)))
            self._draining.clear()  # nothing ran on the loaded snapshot: no user to wait for
            self.fence.acked = current
            started = time.monotonic()
            beat = self.registration.heartbeat(current, current)
        self._renewed(started, beat, router.version, True)
        with _followers_lock:
            _followers.add(self)
        self._thread = threading.Thread(
            target=self._run,
            name=f"shardrouter-follow-{self.registration.instance_id[:8]}",
            daemon=True,
        )
        self._thread.start()

    # -- the poller -------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                interval = self.meta.fast_poll_interval_s if self.in_flight else None
                if self._stop.wait(interval or self.meta.poll_interval_s):
                    return
                if self._paused.is_set():
                    continue
                router = self._router() if self._router is not None else None
                if router is None:
                    return  # the router was dropped without close()
                try:
                    self.poll_once(router)
                except Exception as exc:  # never let the thread die: log and retry
                    log.exception("router %s: poll failed: %s", self.instance_id, exc)
                del router
        finally:
            self._deregister()

    def poll_once(self, router: Any) -> None:
        """One poll: a heartbeat when the lease is due for renewal (or was lost) or an
        acknowledgement is due, else a read; a new version is validated and swapped in, and
        acknowledged (a heartbeat) once no statement, transaction, explicit connection or ORM
        session holds an older snapshot (at once in the usual case; else at a later poll)."""
        started = time.monotonic()
        shadow = getattr(router, "_shadow", None)
        if shadow is not None:  # SHADOW read counters, for the migration's runner
            shadow.stats.publish(self.store, self.instance_id)
        acking = self._ack_due(router)
        if acking:
            self.fence.acked = router.version
        renew = acking or started - self._last_renewal >= self._renew_every
        try:
            if renew:
                beat = self.registration.heartbeat(router.version, self.fence.acked)
            else:
                beat = self.registration.read()
        except MetaStoreError as exc:
            self._lost(exc)
            return
        current = beat.current_version
        if current is not None and current > router.version and current not in self.rejected:
            found: TopologyVersion | MetaStoreDocumentError
            try:
                found = self.store.get(current)
            except MetaStoreDocumentError as exc:
                found = exc  # the store answered: a version that cannot be applied (below)
            except MetaStoreError as exc:
                self._lost(exc)
                return
            try:
                if isinstance(found, MetaStoreDocumentError):
                    raise found
                self._install(router, self._validate(found))
            except Exception as exc:  # invalid here (env, drivers): not applied, not acked
                problem = exc if isinstance(exc, ConfigError) else _mask_text(f"{exc}")
                self.rejected[current] = f"{type(exc).__name__}: {problem}"
                log.error(
                    "router %s: topology version %d not applied, it keeps serving version %d: %s",
                    self.instance_id,
                    current,
                    router.version,
                    self.rejected[current],
                )
            else:
                log.info("router %s: now serving topology version %d", self.instance_id, current)
                if self._ack_due(router):
                    self.fence.acked = current
                    started = time.monotonic()
                    try:
                        beat = self.registration.heartbeat(current, current)  # the ack
                    except MetaStoreError as exc:
                        self._lost(exc)
                        return
                    renew = True
                else:
                    log.info(
                        "router %s: version %d acknowledged once the users of older versions"
                        " (transactions, connection() blocks, ORM sessions) finish",
                        self.instance_id,
                        current,
                    )
        self._renewed(started, beat, router.version, renew)

    def _install(self, router: Any, config: TopologyConfig) -> None:
        old = router._snap
        router._install(Topology(config))
        self._draining.append(old)

    def _ack_due(self, router: Any) -> bool:
        """Whether the served version can be acknowledged now: it is newer than the last
        acknowledgement and no older snapshot has a user left. A retired snapshot whose
        users reached 0 can never be pinned again (RoutingSnapshot.acquire), so once this
        holds no write can run under an older version."""
        if self.fence.acked >= router.version:
            return False
        if any(snap.users for snap in self._draining):
            return False
        self._draining.clear()
        return True

    def _renewed(self, started: float, beat: Heartbeat, serving: int, renewed: bool) -> None:
        fence = self.fence
        current = beat.current_version
        caught_up = current is None or serving >= current
        fence.current = current or 0
        fence.all_acked = beat.all_acked_version or 0
        router = self._router() if self._router is not None else None
        if caught_up and renewed:
            if fence.expired() and router is not None:
                self._lapse(router)  # before the fence lifts
            fence.lease_end = started + self.meta.lease_s - self.meta.fence_margin_s
            self._last_renewal = started
            fence.reason = ""
            self.last_error = ""
        elif caught_up:
            pass  # a read between renewals: the lease stands as it was
        else:
            fence.reason = f"not caught up: serving version {serving}, current {current}"
        moving = bool(router is not None and router._snap.moving)
        self.in_flight = (
            not caught_up or (current is not None and beat.all_acked_version != current) or moving
        )

    def _lapse(self, router: Any) -> None:
        """The lease lapsed (by this process's clock) before this renewal: every snapshot
        alive now, current or retired and still pinned, stays write-dead for good (the
        cluster may have moved past its version while this router was cut off, and its users
        may have been pinned before the lapse), and new statements get a fresh snapshot of
        the same topology (engines and lean pools taken over). Called before the fence lifts:
        in between every write is refused anyway."""
        now = time.time()
        ago = time.monotonic() - self.fence.lease_end
        expired = "at start" if ago == float("inf") else _utc(now - ago)
        router._live.lapse(f"it expired at {expired}, renewed at {_utc(now)}")
        old = router._snap
        router._install(router.topology)
        self._draining.append(old)
        log.warning(
            "router %s: lease renewed after it had lapsed; transactions, connection() blocks"
            " and ORM sessions pinned before refuse to write (end them and start new ones)",
            self.instance_id,
        )

    def _lost(self, exc: MetaStoreError) -> None:
        self._last_renewal = float("-inf")  # the next poll renews
        self.last_error = self.fence.reason = str(exc)
        self.in_flight = True
        log.warning("router %s: lease not renewed: %s", self.instance_id, exc)

    # -- control ----------------------------------------------------------------------------

    @property
    def instance_id(self) -> str:
        return self.registration.instance_id

    def pause(self) -> None:
        """Stop polling (and so renewing) until ``resume``: a test hook for a stalled router."""
        self._paused.set()

    def resume(self) -> None:
        self._paused.clear()

    def close(self) -> None:
        """Stop polling, deregister, close the store's engine. Idempotent. In a fork()ed
        child: none of that (the registry row, the poller and the store's connections are
        the parent's); the child's copy of the store's pool is dropped without closing."""
        if self._closed:
            return
        self._closed = True
        if self._forked or os.getpid() != self._pid:
            self.store.engine.dispose(close=False)
            return
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=self.meta.query_timeout_s + self.meta.connect_timeout_s + 1)
        if thread is None:
            self._deregister()
        with _followers_lock:
            _followers.discard(self)
        self.store.close()

    def _deregister(self) -> None:
        try:
            self.registration.deregister()
        except MetaStoreError as exc:  # its lease expires by itself
            log.warning("router %s: not deregistered: %s", self.instance_id, exc)


def _utc(at: float) -> str:
    return time.strftime("%H:%M:%S UTC", time.gmtime(at))


def _forked_message(follower: Follower) -> str:
    return (
        f"this {follower.kind} router follows the meta store {safe_url(follower.store.url)}"
        f" and was inherited through fork() by process {os.getpid()} from process"
        f" {follower._pid}: a child has no poller, so it would route by a topology version the"
        " cluster may have left behind, and the registry row acknowledging versions is the"
        " parent's. Build the router in the child, after forking (gunicorn: post_fork or no"
        " --preload; multiprocessing: create it in the target, or use the 'spawn' start"
        " method; Celery: worker_process_init)"
    )


def _fence_after_fork() -> None:
    """In a fork()ed child: every following router refuses (statements, transactions and
    sessions when they pin a snapshot, writes through snapshots pinned before the fork), and
    nothing of its follower runs at exit (the parent deregisters its own row)."""
    global _followers_lock
    _followers_lock = threading.Lock()  # a parent's thread may have held it at the fork
    for follower in list(_followers):
        follower._forked = True
        message = _forked_message(follower)
        follower.fence.forked = message
        follower.fence.lease_end = float("-inf")
        router = follower._router() if follower._router is not None else None
        if router is not None:
            router._snap.forked = message
    _followers.clear()


os.register_at_fork(after_in_child=_fence_after_fork)


@atexit.register
def _deregister_all() -> None:
    """Interpreter exit: every follower still running deregisters (best effort)."""
    with _followers_lock:
        followers = list(_followers)
    for follower in followers:
        try:
            follower.close()
        except Exception as exc:  # exiting anyway
            log.warning("deregistering at exit failed: %s", exc)


__all__ = ["Follower"]


def _settings(meta: MetaConfig) -> dict[str, Any]:
    """The settings of ``meta`` without its URL (whose spelling may differ for one store)."""
    return meta.model_dump(exclude={"url"})


def _same_store(a: URL, b: URL) -> bool:
    """Whether two URLs reach one meta store, as this process resolves them: same_database,
    with SQLite paths made absolute here (both are opened by this router, in its directory)."""
    if a.get_backend_name() == "sqlite" and b.get_backend_name() == "sqlite":
        paths = [os.path.abspath(u.database) if u.database else "" for u in (a, b)]
        return bool(paths[0]) and paths[0] == paths[1] and ":memory:" not in paths[0]
    return same_database(a, b) or a.render_as_string(hide_password=False) == b.render_as_string(
        hide_password=False
    )
