#!/usr/bin/env python3
"""The control plane's costs on real MariaDB shards, measured; prints JSON.

1. Point-query latency of a router following a meta store (``meta:``; its poller thread
   heartbeating every poll_interval_s) against a router without one, same topology, same
   rows, alternating blocks (tools/bench_router.py's ABBA rounds). Target: <= 1% difference;
   the poll runs on its own thread, never on the statement path.
   Also the CPU one heartbeat costs the poller thread (its share of a core at 1 s / 100 ms).
2. Time from a push (MetaStore.push) to all 3 routers acknowledged (wait_for_acks), each
   router in its own process polling every 100 ms. Target: <= 300 ms.

The meta store is a database on the first shard's server. Starts its own 4-shard sandbox
on --base-port (unless --config points at a running topology).

Usage: python3 tools/bench_control.py [--seconds 6] [--pushes 10] [--base-port 3501]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import platform
import random
import statistics
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_router import POINT, ab, load

from shardrouter.control.registry import Registration, wait_for_acks
from shardrouter.control.store import MetaStore
from shardrouter.core.config import load_config
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.ops import sandbox as sb

META_DB = "shardrouter_bench_meta"


def meta_database(server_url: str) -> str:
    url = make_url(server_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{META_DB}`"))
        conn.execute(text(f"CREATE DATABASE `{META_DB}`"))
    engine.dispose()
    return url.set(database=META_DB).render_as_string(hide_password=False)


def drop_meta(meta_url: str) -> None:
    url = make_url(meta_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{META_DB}`"))
    engine.dispose()


def follower(conn: Connection, path: str) -> None:
    """A child process: a router following the store until told to stop."""
    router = Router.load(path)
    conn.send(router.version)
    conn.recv()
    router.close()


def point_overhead(plain: Router, following: Router, users: list[int], seconds: float) -> Any:
    def a(i: int) -> None:
        following.execute(POINT, {"u": users[i % len(users)]})

    def b(i: int) -> None:
        plain.execute(POINT, {"u": users[i % len(users)]})

    out = ab(a, b, seconds)
    out["note"] = "a = router with a meta store (polling), b = the same router without; ratio = a/b"
    follower = following._follower

    def running(i: int) -> None:
        follower.resume()
        following.execute(POINT, {"u": users[i % len(users)]})

    def paused(i: int) -> None:
        follower.pause()
        following.execute(POINT, {"u": users[i % len(users)]})

    same = ab(running, paused, seconds)
    follower.resume()
    same["note"] = "one router with a meta store: a = its poller running, b = paused; ratio = a/b"
    return {"meta_vs_none": out, "poller_running_vs_paused": same}


def poll_cost(store: MetaStore, n: int = 200) -> dict[str, Any]:
    """CPU of a poll between renewals (a read) and of a heartbeat (a renewal)."""
    heartbeat = heartbeat_cost(store, n)
    registration = Registration(store, kind="sync", lease_s=10.0)
    for _ in range(20):
        registration.read()
    cpu = time.thread_time()
    for _ in range(n):
        registration.read()
    heartbeat["read_cpu_ms"] = round((time.thread_time() - cpu) / n * 1000, 3)
    return heartbeat


def heartbeat_cost(store: MetaStore, n: int = 200) -> dict[str, Any]:
    """CPU and wall time of one heartbeat (what the poller spends per poll, off the hot path)."""
    registration = Registration(store, kind="sync", lease_s=10.0)
    version = store.current_version() or 1
    registration.register(version)
    try:
        for _ in range(20):
            registration.heartbeat(version, version)
        cpu, wall = time.thread_time(), time.perf_counter()
        for _ in range(n):
            registration.heartbeat(version, version)
        cpu_ms = (time.thread_time() - cpu) / n * 1000
        wall_ms = (time.perf_counter() - wall) / n * 1000
    finally:
        registration.deregister()
    return {
        "cpu_ms": round(cpu_ms, 3),
        "wall_ms": round(wall_ms, 3),
        "cpu_share_at_poll_1s_pct": round(cpu_ms / 10, 3),
        "cpu_share_at_poll_0.1s_pct": round(cpu_ms, 3),
    }


def push_to_acks(path: Path, store: MetaStore, raw: dict[str, Any], pushes: int) -> Any:
    ctx = multiprocessing.get_context("spawn")
    children = []
    try:
        for _ in range(3):
            parent, child = ctx.Pipe()
            process = ctx.Process(target=follower, args=(child, str(path)), daemon=True)
            process.start()
            children.append((process, parent))
        for _, parent in children:
            assert parent.poll(60), "a router did not start"
            parent.recv()
        times: list[float] = []
        incomplete = 0
        for _ in range(pushes):
            current = store.current_version()
            time.sleep(random.uniform(0.0, 0.1))  # pushes land anywhere in the poll cycle
            start = time.perf_counter()
            version = store.push(raw, expected=current, comment="bench")
            report = wait_for_acks(store, version, timeout=5, poll_s=0.002)
            times.append((time.perf_counter() - start) * 1000)
            incomplete += not report.complete
        return {
            "routers": 3,
            "poll_interval_s": raw["meta"]["poll_interval_s"],
            "pushes": pushes,
            "incomplete": incomplete,
            "ms_median": round(statistics.median(times), 1),
            "ms_p90": round(sorted(times)[int(0.9 * (len(times) - 1))], 1),
            "ms_max": round(max(times), 1),
            "target_ms": 300,
        }
    finally:
        for _, parent in children:
            with contextlib.suppress(OSError):
                parent.send("stop")
        for process, _ in children:
            process.join(10)
            if process.is_alive():
                process.kill()


def measure(topology_path: Path, seconds: float, pushes: int) -> dict[str, Any]:
    raw = yaml.safe_load(topology_path.read_text())
    first = next(iter(raw["shards"].values()))["primary"]
    meta_url = meta_database(first)
    try:
        results: dict[str, Any] = {}
        plain = Router(Topology.load(topology_path))
        users = random.Random(2).sample(range(1, 10**9), 2000)
        load(plain, users)
        for poll in (1.0, 0.1):
            raw["meta"] = {"url": meta_url, "poll_interval_s": poll, "fast_poll_interval_s": 0.05}
            path = topology_path.parent / f"topology-meta-{poll}.yaml"
            path.write_text(yaml.safe_dump(raw, sort_keys=False))
            with MetaStore(meta_url) as store:
                store.init()
                store.push(raw, expected=store.current_version(), comment="bench")
            following = Router.from_config(load_config(path))
            try:
                results[f"point_query_meta_vs_none_poll_{poll}s"] = point_overhead(
                    plain, following, users, seconds
                )
            finally:
                following.close()
        plain.close()
        with MetaStore(meta_url) as store:
            results["poll_cpu"] = poll_cost(store)
            results["push_to_all_acked"] = push_to_acks(path, store, raw, pushes)
        return results
    finally:
        drop_meta(meta_url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per comparison")
    parser.add_argument("--pushes", type=int, default=10)
    parser.add_argument("--config", type=Path, help="a running topology (default: a sandbox)")
    parser.add_argument("--base-port", type=int, default=3501, help="of the sandbox")
    args = parser.parse_args()
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cores": __import__("os").cpu_count(),
        "seconds_per_comparison": args.seconds,
        "point_sql": POINT,
    }
    if args.config:
        out = measure(args.config, args.seconds, args.pushes)
    else:
        directory = Path(tempfile.mkdtemp(prefix="shardrouter-bench-control-"))
        try:
            box = sb.up(directory, shards=4, base_port=args.base_port)
            out = measure(box.topology_path, args.seconds, args.pushes)
        finally:
            sb.down(directory)
    print(json.dumps({**meta, **out}, indent=2))


if __name__ == "__main__":
    main()
