#!/usr/bin/env python3
"""What a migration costs the service's writes, measured on real MariaDB; prints JSON.

Starts a 4-instance sandbox on --port (stopped at the end, whatever happens), a meta store,
and a 2-shard topology version; --threads writer threads write at a steady pace (--rate
writes/s in all: an order insert, which writes its merchant lookup row too, or a status
update) through one Router that follows the meta store. Then:

1. baseline: --seconds of writes, no migration: latency p50/p99/mean.
2. journal on: the migration planned and started (triggers on every moving table of the
   sources and targets), --seconds of writes: the same figures; ``journal_overhead`` is the
   ratio of means (issue 9's "dual-write overhead", target <= 2).
3. copy and verify run (writes go on, not measured), then the switch: every write that
   started between the switch's first and last step is counted: failed (target 0), p99 and
   max latency (targets <= 250 ms and <= 1 s); ``freeze_s`` is what the switch recorded.

Usage: python3 tools/bench_switch.py --port 4190 [--threads 4] [--rate 200] [--seconds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from shardrouter.control.store import MetaStore
from shardrouter.engine.router import Router
from shardrouter.ops import sandbox as sb
from shardrouter.ops.demo_reshard import split_cluster
from shardrouter.reshard import state
from shardrouter.reshard.plan import plan_to
from shardrouter.reshard.workflow import Options, Workflow

INSERT = (
    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
    " VALUES (:o, :u, :m, 'new', :a, '2026-11-30 12:00:00')"
)


class Writers:
    """Threads writing at a steady pace; every write's (start, seconds, ok)."""

    def __init__(self, router: Router, threads: int, rate: float) -> None:
        self.router = router
        self.stop = threading.Event()
        self.samples: list[tuple[float, float, bool]] = []
        self.errors: list[str] = []
        self._lock = threading.Lock()
        self._interval = threads / rate
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def _run(self, index: int) -> None:
        rng = random.Random(index)
        layout = self.router.topology.id_layout
        mine: list[int] = []
        seq = 0
        next_at = time.monotonic()
        while not self.stop.is_set():
            next_at += self._interval
            started = time.monotonic()
            ok = True
            try:
                if rng.random() < 0.6 or not mine:
                    user = rng.randrange(1, 10**6)
                    seq += 1
                    slot = self.router.route_key(user_id=user)[1]
                    order = int(layout.compose(seq, slot, index, 0))
                    self.router.execute(
                        INSERT, {"o": order, "u": user, "m": rng.randrange(1, 50), "a": 100}
                    )
                    mine.append(order)
                else:
                    self.router.execute(
                        "UPDATE orders SET status = 'paid' WHERE order_id = :o",
                        {"o": rng.choice(mine)},
                    )
            except Exception as exc:
                ok = False
                with self._lock:
                    self.errors.append(f"{type(exc).__name__}: {exc}"[:300])
            took = time.monotonic() - started
            with self._lock:
                self.samples.append((started, took, ok))
            time.sleep(max(0.0, next_at - time.monotonic()))

    def window(self, start: float, end: float) -> dict[str, Any]:
        with self._lock:
            inside = [s for s in self.samples if start <= s[0] <= end]
        lat = sorted(s[1] for s in inside)
        if not lat:
            return {"writes": 0}
        return {
            "writes": len(lat),
            "failed": sum(1 for s in inside if not s[2]),
            "p50_ms": round(1000 * lat[len(lat) // 2], 2),
            "p99_ms": round(1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))], 2),
            "max_ms": round(1000 * lat[-1], 2),
            "mean_ms": round(1000 * statistics.fmean(lat), 3),
        }


def run(port: int, threads: int, rate: float, seconds: float, root: Path) -> dict[str, Any]:
    box = sb.up(root, shards=4, base_port=port)
    before, after = split_cluster(box, {"poll_interval_s": 1.0, "fast_poll_interval_s": 0.05})
    store = MetaStore(before["meta"]["url"])
    store.init()
    version = store.push(before, expected=None, comment="two shards")
    path = root / "two.yaml"
    path.write_text(yaml.safe_dump(before))
    router = Router.load(path)
    writers = Writers(router, threads, rate)
    out: dict[str, Any] = {}
    try:
        writers.start()
        time.sleep(2.0)  # warm-up: pools, plans
        t0 = time.monotonic()
        time.sleep(seconds)
        out["baseline"] = writers.window(t0, time.monotonic())
        plan = plan_to(store.get(version).document, after, base_version=version)
        state.create(store, plan)
        with Workflow(store, plan.migration_id, Options(freeze_timeout_s=0.5)) as flow:
            flow.act("start")
            t0 = time.monotonic()
            time.sleep(seconds)
            out["journal_on"] = writers.window(t0, time.monotonic())
            flow.act("copy")
            flow.act("verify")
            time.sleep(1.0)
            t0 = time.monotonic()
            flow.act("switch")
            t1 = time.monotonic()
            time.sleep(1.0)
            out["switch"] = {
                "seconds": round(t1 - t0, 3),
                "freeze_s": (flow.status().get("switch") or {}).get("freeze_s"),
                **writers.window(t0, t1),
            }
        base, journal_on = out["baseline"], out["journal_on"]
        out["journal_overhead"] = round(journal_on["mean_ms"] / base["mean_ms"], 3)
        out["held_writes"] = router.holds.held
        out["max_hold_ms"] = round(router.holds.max_wait_s * 1000, 1)
        out["errors"] = writers.errors[:5]
    finally:
        writers.join()
        router.close()
        store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="first port of the sandbox")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0, help="writes/s, all threads")
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="shardrouter-bench-switch-"))
    try:
        figures = run(args.port, args.threads, args.rate, args.seconds, root)
    finally:
        sb.down(root)
    print(
        json.dumps(
            {
                "bench": "switch",
                "threads": args.threads,
                "rate": args.rate,
                "seconds": args.seconds,
                "machine": {
                    "cpus": os.cpu_count(),
                    "loadavg": os.getloadavg(),
                    "python": platform.python_version(),
                },
                "targets": {
                    "switch_failed": 0,
                    "switch_p99_ms": 250,
                    "switch_max_ms": 1000,
                    "journal_overhead": 2.0,
                },
                **figures,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
