"""Locust load test of the order service (loadtest/order_service.py) on shardrouter: no HTTP,
the service is the client. ``loadtest/run`` starts it with the settings below; by hand:

    shardctl sandbox up --shards 4 --dir .sandbox
    shardctl schema apply --config .sandbox/topology.yaml
    LOADTEST_TOPOLOGY=.sandbox/topology.yaml \\
        locust -f loadtest/locustfile.py --headless -u 20 -r 10 -t 30s

Every operation fires Locust's request event: request_type "mysql", name = the operation,
context = {"shard": ...}, the exception as the failure. The mix (weights in ``MIXES``): most
traffic by user id and order id, some by merchant (lookup), little back office (scatter); user
ids and merchant ids are drawn Zipf-like (a few hot ones), so hot users and merchants exist.
PyMySQL under gevent (Locust patches the standard library; PyMySQL is pure Python).

Settings (environment, all optional but the topology):

- ``LOADTEST_TOPOLOGY``: the topology file (a ``meta:`` section makes the routers follow the
  meta store, as during ``--reshard``; ids then come from a leased worker id);
- ``LOADTEST_BASELINE_URL``: run the same service on this one plain database instead (no router);
- ``LOADTEST_OUT``: a folder for the ledger and the request log (``ledger-<pid>.jsonl``,
  ``requests-<pid>.csv``; nothing written without it);
- ``LOADTEST_MIX``: ``full`` (default) or ``keyed`` (no merchant pages, no back office: only
  single-shard operations, for the router/baseline ratio);
- ``LOADTEST_USERS`` / ``LOADTEST_MERCHANTS``: how many user ids / merchant ids to draw from
  (default 2000 / 300); ``LOADTEST_ZIPF``: the skew exponent (default 1.1);
- ``LOADTEST_RATE``: tasks per second per Locust user (0, the default: no wait, saturate).

A request is retried (same idempotency key, so a retried order is written once) when shardrouter
says nothing ran (a write held past a switch, a lock conflict, an aborted transaction): up to
``ATTEMPTS`` times in all, within one Locust request, counted in the request log's ``retries``.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
from baseline import PlainDatabase
from ledger import LedgerWriter
from locust import User, constant, constant_throughput, events, task
from locust.runners import STATE_STOPPED, STATE_STOPPING, WorkerRunner
from locust.stats import CSV_STATS_INTERVAL_SEC
from order_service import CANCELLED, NEW, PAID, Item, OrderService

from shardrouter import (
    ExecutionError,
    FencedError,
    LockConflictError,
    Router,
    Topology,
    TransactionAbortedError,
)

ATTEMPTS = 5
RETRY_PAUSE_S = 0.05
RETRYABLE = (FencedError, LockConflictError, TransactionAbortedError)
"""shardrouter's word that the statement did not run: safe to run again."""
IDEMPOTENT_RETRY = (*RETRYABLE, ExecutionError)
"""place_order carries an idempotency key: any failed attempt may be retried, also one whose
outcome is unknown (a lost connection at commit), and the order is written once."""

MIXES: dict[str, dict[str, int]] = {
    "full": {
        "place_order": 20,
        "get_order": 30,
        "user_orders": 25,
        "pay": 8,
        "cancel": 4,
        "purge": 1,
        "merchant_orders": 8,
        "count_by_status": 1,
    },
}
SCATTER = frozenset({"merchant_orders", "count_by_status"})
"""Operations that read more than one shard (a lookup's owners, or all)."""
MIXES["keyed"] = {k: v for k, v in MIXES["full"].items() if k not in SCATTER}
WRITES = frozenset({"place_order", "pay", "cancel", "purge"})
KEEP_ORDERS = 200
"""Orders a Locust user remembers (the most recent); older ones stay in the ledger."""

SKUS = tuple(f"sku-{i}" for i in range(50))


class Zipf:
    """Draws 1..n with P(k) proportional to 1/k**s (k = 1 the hottest); the table is built
    once, a draw is one bisect."""

    def __init__(self, n: int, s: float, rng: random.Random) -> None:
        weights = [1.0 / k**s for k in range(1, n + 1)]
        self._cdf = list(itertools.accumulate(weights))
        self._total = self._cdf[-1]
        self._rng = rng

    def draw(self) -> int:
        return bisect.bisect_left(self._cdf, self._rng.random() * self._total) + 1


class _Process:
    """What one Locust process shares between its users: the router (or plain database), the
    service, the ledger and the request log. Built at the first user's start, after Locust's
    fork (``--processes``), so every process has its own connections and worker id."""

    def __init__(self) -> None:
        topology_path = os.environ.get("LOADTEST_TOPOLOGY", ".sandbox/topology.yaml")
        baseline = os.environ.get("LOADTEST_BASELINE_URL")
        self.router: Any
        if baseline:
            self.router = PlainDatabase(baseline, Topology.load(topology_path))
        else:
            self.router = Router.load(topology_path)
        self.service = OrderService(self.router)
        out = os.environ.get("LOADTEST_OUT")
        self.ledger = LedgerWriter(Path(out)) if out else None
        self._log = None
        if out:
            self._log = (Path(out) / f"requests-{os.getpid()}.csv").open("a", encoding="utf-8")
        self.mix = MIXES[os.environ.get("LOADTEST_MIX", "full")]
        # Each process its own stream (with --processes N the workers would otherwise draw
        # the same users, merchants and operations in the same order).
        rng = random.Random(f"{os.environ.get('LOADTEST_SEED', '0')}:{os.getpid()}")
        skew = float(os.environ.get("LOADTEST_ZIPF", "1.1"))
        self.users = Zipf(int(os.environ.get("LOADTEST_USERS", "2000")), skew, rng)
        self.merchants = Zipf(int(os.environ.get("LOADTEST_MERCHANTS", "300")), skew, rng)
        self.rng = rng

    def log(self, op: str, ms: float, ok: bool, retries: int, error: str) -> None:
        if self._log is not None:
            write = 1 if op in WRITES else 0
            self._log.write(
                f"{time.time():.4f},{op},{ms:.3f},{int(ok)},{write},{retries},{error}\n"
            )

    def close(self) -> None:
        if self.ledger is not None:
            self.ledger.close()
        if self._log is not None:
            self._log.close()
        self.service.close()
        self.router.close()


_process: _Process | None = None
_process_lock = threading.Lock()  # a gevent lock once Locust has patched threading


def process() -> _Process:
    """The process's one _Process. Built under a lock: building it waits on the network, so
    every user starting meanwhile would otherwise build its own (a router, a worker lease and
    a ledger writer each, several writers appending to one ledger file)."""
    global _process
    if _process is None:
        with _process_lock:
            if _process is None:
                _process = _Process()
    return _process


@events.test_stop.add_listener
def _flush(environment: Any, **kwargs: Any) -> None:
    if _process is not None and _process.ledger is not None:
        _process.ledger.flush()
    options = environment.parsed_options
    if (
        options is not None
        and options.csv_prefix
        and not isinstance(environment.runner, WorkerRunner)
    ):
        # Locust writes its CSV every CSV_STATS_INTERVAL_SEC and not again at exit: without
        # this pause the last second of requests is missing from <prefix>_stats.csv.
        gevent.sleep(CSV_STATS_INTERVAL_SEC + 0.2)


@events.quitting.add_listener
def _close(environment: Any, **kwargs: Any) -> None:
    global _process
    if _process is not None:
        runner = environment.runner
        if runner is not None and runner.state not in (STATE_STOPPED, STATE_STOPPING):
            # Locust fires `quitting` before it stops the users (SIGTERM, Ctrl-C): stop them
            # first, so a write in flight records its outcome before the ledger is closed.
            runner.stop()
        _process.close()
        _process = None


def _wait() -> Callable[..., float]:
    rate = float(os.environ.get("LOADTEST_RATE", "0"))
    return constant_throughput(rate) if rate > 0 else constant(0)


class Shopper(User):
    """Buyers, merchants and the back office of one shop, by the mix's weights."""

    wait_time = _wait()

    def on_start(self) -> None:
        self.p = process()
        self.service = self.p.service
        self.orders: dict[int, str] = {}  # order id -> status, the orders this user placed
        names = list(self.p.mix)
        self._ops = [getattr(self, name) for name in names]
        self._weights = list(itertools.accumulate(self.p.mix[n] for n in names))

    @task
    def one_request(self) -> None:
        rng = self.p.rng
        op = self._ops[bisect.bisect_right(self._weights, rng.random() * self._weights[-1])]
        op()

    # -- the client: events, retries, the ledger -------------------------------------------

    def _call(
        self,
        name: str,
        shard: str,
        fn: Callable[[], Any],
        retryable: tuple[type[BaseException], ...] = RETRYABLE,
    ) -> tuple[bool, Any]:
        """Run one operation as one Locust request (retried on ``retryable``: by default
        while shardrouter says nothing ran); (True, result) or (False, the exception)."""
        start = time.perf_counter()
        retries = 0
        error: BaseException | None = None
        result: Any = None
        while True:
            try:
                result = fn()
                error = None
                break
            except retryable as exc:
                error = exc
                retries += 1
                if retries >= ATTEMPTS:
                    break
                time.sleep(RETRY_PAUSE_S)
            except Exception as exc:  # a failure of this request; the run goes on
                error = exc
                break
        ms = (time.perf_counter() - start) * 1000
        self.environment.events.request.fire(
            request_type="mysql",
            name=name,
            response_time=ms,
            response_length=0,
            exception=error,
            context={"shard": shard, "retries": retries},
        )
        self.p.log(name, ms, error is None, retries, type(error).__name__ if error else "")
        return (error is None, error if error is not None else result)

    @contextlib.contextmanager
    def _in_doubt(self, record: Callable[[], Any]) -> Iterator[None]:
        """Run a write; when the user is stopped in the middle of it (Locust kills user
        greenlets at the end of a run: GreenletExit, a BaseException), ``record`` notes its
        outcome as unknown before the stop goes on: the server may have committed it."""
        try:
            yield
        except Exception:
            raise
        except BaseException:
            record()
            raise

    def _placed(
        self, key: int, user: int, merchant: int, lines: list[Any], ok: bool | None
    ) -> None:
        if self.p.ledger is not None:
            self.p.ledger.placed(key, user, merchant, len(lines), ok, lines)

    def _shard(self, **key: Any) -> str:
        return str(self.p.router.route_key(**key)[0])

    def _pick(self, status: str | None = None) -> int | None:
        if not self.orders:
            return None
        if status is None:
            return self.p.rng.choice(list(self.orders))
        choices = [o for o, s in self.orders.items() if s == status]
        return self.p.rng.choice(choices) if choices else None

    def _remember(self, order_id: int, status: str) -> None:
        self.orders[order_id] = status
        if len(self.orders) > KEEP_ORDERS:
            del self.orders[next(iter(self.orders))]

    # -- the operations ---------------------------------------------------------------------

    def place_order(self) -> None:
        rng = self.p.rng
        user = self.p.users.draw()
        merchant = self.p.merchants.draw()
        items = [
            Item(rng.choice(SKUS), rng.randint(1, 3), rng.randrange(100, 20_000))
            for _ in range(rng.randint(1, 3))
        ]
        key = self.service.new_order_key(user)
        lines = [(i.sku, i.qty, i.price_cents) for i in items]
        with self._in_doubt(lambda: self._placed(key, user, merchant, lines, None)):
            ok, _ = self._call(
                "place_order",
                self._shard(user_id=user),
                lambda: self.service.place_order(user, merchant, items, idempotency_key=key),
                retryable=IDEMPOTENT_RETRY,
            )
        self._placed(key, user, merchant, lines, True if ok else None)
        if ok:
            self._remember(key, NEW)

    def get_order(self) -> None:
        order = self._pick()
        if order is None:
            return self.place_order()
        ok, found = self._call(
            "get_order", self._shard(order_id=order), lambda: self.service.get_order(order)
        )
        if ok and found is None:  # an acknowledged order that cannot be read back
            self.environment.events.request.fire(
                request_type="mysql",
                name="get_order: missing",
                response_time=0,
                response_length=0,
                exception=LookupError(f"order {order} not found"),
                context={},
            )

    def user_orders(self) -> None:
        user = self.p.users.draw()
        self._call("user_orders", self._shard(user_id=user), lambda: self.service.user_orders(user))

    def merchant_orders(self) -> None:
        merchant = self.p.merchants.draw()
        self._call("merchant_orders", "lookup", lambda: self.service.merchant_orders(merchant))

    def count_by_status(self) -> None:
        self._call("count_by_status", "all", self.service.count_by_status)

    def _transition(self, name: str, order: int, before: str, after: str) -> None:
        move = self.service.pay if after == PAID else self.service.cancel
        ledger = self.p.ledger
        with self._in_doubt(lambda: ledger and ledger.moved(order, before, after, None)):
            ok, changed = self._call(name, self._shard(order_id=order), lambda: move(order))
        if ledger is not None:
            ledger.moved(order, before, after, bool(changed) if ok else None)
        if ok and changed:
            self._remember(order, after)
        elif not ok:
            self.orders.pop(order, None)  # its status is unknown now: leave it alone

    def pay(self) -> None:
        order = self._pick(NEW)
        if order is not None:
            self._transition("pay", order, NEW, PAID)

    def cancel(self) -> None:
        order = self._pick(PAID if self.p.rng.random() < 0.5 else NEW)
        if order is not None:
            self._transition("cancel", order, self.orders[order], CANCELLED)

    def purge(self) -> None:
        order = self._pick(CANCELLED)
        if order is None:
            return
        ledger = self.p.ledger
        with self._in_doubt(lambda: ledger and ledger.purged(order, None)):
            ok, done = self._call(
                "purge", self._shard(order_id=order), lambda: self.service.purge(order)
            )
        if ledger is not None:
            ledger.purged(order, bool(done) if ok else None)
        self.orders.pop(order, None)
