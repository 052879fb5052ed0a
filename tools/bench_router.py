#!/usr/bin/env python3
"""Router overhead on real MariaDB shards, measured; prints JSON.

Starts its own 4-shard sandbox (unless --config points at a running topology), loads orders,
then times in one run, alternating A/B blocks so drift hits both sides alike:

- point query by user id: explicit path (router.connection) and raw-SQL path (router.execute,
  plan cached) against SQLAlchemy Core on the shard's own engine, same SQL, same driver;
- ORDER BY ... LIMIT 20 over every shard (sync and async) against the same query on one shard,
  and the floor of a pipelined scatter: the four statements sent on plain PyMySQL connections
  and their answers read undecoded, no router.

Usage: python3 tools/bench_router.py [--seconds 2] [--config topology.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pymysql
from pymysql.constants import COMMAND
from sqlalchemy import text

from shardrouter.core.topology import Topology
from shardrouter.engine import readpool
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.ops import sandbox as sb
from shardrouter.sql.planner import Target

POINT = "SELECT order_id, status, amount_cents FROM orders WHERE user_id = :u"
SCATTER = "SELECT order_id, created_at FROM orders ORDER BY created_at DESC, order_id DESC LIMIT 20"


def rate(fn: Callable[[int], None], seconds: float) -> float:
    """Calls per second of fn(i), over about ``seconds``."""
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(10):
            fn(n)
            n += 1
    return n / (time.perf_counter() - start)


def cpu_us(fn: Callable[[int], None], calls: int) -> float:
    """Microseconds of this process's CPU time per call of fn(i), over ``calls`` calls."""
    start = time.process_time()
    for i in range(calls):
        fn(i)
    return round((time.process_time() - start) / calls * 1e6, 1)


def summary(ra: list[float], rb: list[float]) -> dict[str, Any]:
    """Median rates of a and b, and the median and quartiles of the per-round ratio a/b.

    A ratio per round, from two neighbouring blocks, cancels the drift of this machine's speed
    (a shared VM: the same loop varies by 30% from minute to minute); its median is robust to
    a round hit by a burst.
    """
    ratios = sorted(a / b for a, b in zip(ra, rb, strict=True))
    q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "a_per_s": round(statistics.median(ra), 1),
        "b_per_s": round(statistics.median(rb), 1),
        "ratio": round(statistics.median(ratios), 3),
        "ratio_q1_q3": [round(q[0], 3), round(q[2], 3)],
        "rounds": len(ratios),
    }


def ab(a: Callable[[int], None], b: Callable[[int], None], seconds: float) -> dict[str, Any]:
    """a against b in alternating blocks of about 0.2 s (ABBA order, so neither side always
    runs first); see summary()."""
    rounds = max(6, round(seconds / 0.4))
    ra, rb = [], []
    for r in range(rounds):
        first, second = (a, b) if r % 2 == 0 else (b, a)
        x, y = rate(first, 0.2), rate(second, 0.2)
        ra.append(x if r % 2 == 0 else y)
        rb.append(y if r % 2 == 0 else x)
    return summary(ra, rb)


def load(router: Router, users: list[int]) -> None:
    topology = router.topology
    ddl = (
        "CREATE TABLE IF NOT EXISTS {t} (order_id BIGINT PRIMARY KEY, user_id BIGINT NOT NULL,"
        " merchant_id BIGINT NOT NULL, status VARCHAR(16) NOT NULL, amount_cents BIGINT,"
        " created_at DATETIME(3) NOT NULL, KEY (user_id), KEY (created_at))"
    )
    lookup = (
        "CREATE TABLE IF NOT EXISTS {t} (merchant_id BIGINT, order_id BIGINT,"
        " user_id BIGINT NOT NULL, PRIMARY KEY (merchant_id, order_id))"
    )
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for name in topology.table("orders").physical_names:
                conn.execute(text(ddl.format(t=name)))
                conn.execute(text(f"DELETE FROM {name}"))
            conn.execute(text(lookup.format(t="merchant_orders")))
            conn.execute(text("DELETE FROM merchant_orders"))
    ids = topology.id_generator("orders")
    rng = random.Random(1)
    cols = ("order_id", "user_id", "merchant_id", "status", "amount_cents", "created_at")
    for start in range(0, len(users), 100):
        rows = []
        for u in users[start : start + 100]:
            for o in ids.next_ids(3, user_id=u):
                rows.append(
                    (
                        o,
                        u,
                        rng.randrange(50),
                        "paid",
                        rng.randrange(10_000),
                        f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} 12:00:00",
                    )
                )
        marks = ", ".join("(" + ", ".join(f":{c}{i}" for c in cols) + ")" for i in range(len(rows)))
        params = {f"{c}{i}": v for i, r in enumerate(rows) for c, v in zip(cols, r, strict=True)}
        router.execute(f"INSERT INTO orders ({', '.join(cols)}) VALUES {marks}", params)


def measure(topology: Topology, seconds: float) -> dict[str, Any]:
    router = Router(topology)
    rng = random.Random(2)
    users = rng.sample(range(1, 10**9), 2000)
    load(router, users)
    shard_for = topology.shard_for
    table_of = topology.table("orders")
    physical_text = {name: text(POINT.replace("orders", name)) for name in table_of.physical_names}
    engines = router.engines

    def core(i: int) -> None:
        u = users[i % len(users)]
        slot = topology.slot_for("orders", u)
        stmt = physical_text[table_of.physical(slot)]
        with engines.primary(shard_for("orders", u)).connect() as conn:
            conn.execute(stmt, {"u": u}).all()

    def core_in_transaction(i: int) -> None:
        # The explicit path hands out a connection inside a transaction: compare like with like.
        u = users[i % len(users)]
        slot = topology.slot_for("orders", u)
        stmt = physical_text[table_of.physical(slot)]
        with engines.primary(shard_for("orders", u)).begin() as conn:
            conn.execute(stmt, {"u": u}).all()

    def explicit(i: int) -> None:
        u = users[i % len(users)]
        with router.connection(user_id=u) as conn:
            conn.execute(physical_text[conn.physical("orders")], {"u": u}).all()

    def raw_sql(i: int) -> None:
        u = users[i % len(users)]
        router.execute(POINT, {"u": u})

    results: dict[str, Any] = {}
    for fn in (core, core_in_transaction, explicit, raw_sql):  # warm pools and caches
        for i in range(200):
            fn(i)
    results["point_explicit_vs_core"] = ab(explicit, core_in_transaction, seconds)
    results["point_raw_sql_vs_core"] = ab(raw_sql, core, seconds)

    # "One shard" = exactly what the router sends to one shard for this query (its 4 split
    # tables in one UNION statement), run with Core on that shard's engine: the difference is
    # the fan-out and the merge.
    one_shard = next(iter(topology.shards))
    plan = router.planner.plan(SCATTER)
    targets = [Target(one_shard, i) for i in range(table_of.split)]
    one_sql = text(
        plan.render_union(targets) if len(targets) > 1 else plan.render(targets[0], scatter=True)
    )

    def single(i: int) -> None:
        with engines.primary(one_shard).connect() as conn:
            conn.execute(one_sql).all()

    def scatter_sync(i: int) -> None:
        router.execute(SCATTER)

    for i in range(50):
        scatter_sync(i)
        single(i)
    sync = ab(scatter_sync, single, seconds)
    results["scatter_limit20_sync_vs_one_shard"] = {**sync, "slowdown": round(1 / sync["ratio"], 3)}
    # The client's own CPU per call (process time: this process's user + system time), the
    # part of the difference the router can act on.
    results["client_cpu_us_per_call"] = {
        "scatter_sync": cpu_us(scatter_sync, 1000),
        "one_shard_core": cpu_us(single, 1000),
    }

    # The floor of a pipelined scatter on this machine: no router, each shard's statement sent
    # on a plain PyMySQL connection, then every answer's packets read undecoded (what the
    # router's scatter does before it decodes the rows its merge reads, and merges).
    shard_sql = {
        shard: (
            plan.render_union([Target(shard, i) for i in range(table_of.split)])
            if table_of.split > 1
            else plan.render(Target(shard, 0), scatter=True)
        ).encode()
        for shard in topology.shards
    }
    raw = {}
    for shard in topology.shards:
        url = topology.shards[shard].primary
        raw[shard] = pymysql.connect(
            host=url.host,
            port=url.port or 3306,
            user=url.username,
            password=url.password or "",
            database=url.database,
            autocommit=True,
        )

    def floor(i: int) -> None:
        for shard, conn in raw.items():
            conn._execute_command(COMMAND.COM_QUERY, shard_sql[shard])
        for conn in raw.values():
            readpool._read_lazy(conn)

    for i in range(50):
        floor(i)
    bare = ab(floor, single, seconds)
    results["scatter_floor_pipelined_driver_vs_one_shard"] = {
        **bare,
        "slowdown": round(1 / bare["ratio"], 3),
    }
    for conn in raw.values():
        conn.close()

    async def async_part() -> dict[str, Any]:
        aio = AsyncRouter(topology)
        engine = aio._engine(one_shard)
        for _ in range(50):
            await aio.execute(SCATTER)

        async def arate(fn: Callable[[], Any], secs: float) -> float:
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < secs:
                await fn()
                n += 1
            return n / (time.perf_counter() - start)

        async def one() -> None:
            async with engine.connect() as conn:
                (await conn.execute(one_sql)).all()

        async def fan() -> None:
            await aio.execute(SCATTER)

        ra, rb = [], []
        for r in range(max(6, round(seconds / 0.4))):
            if r % 2 == 0:
                ra.append(await arate(fan, 0.2))
                rb.append(await arate(one, 0.2))
            else:
                rb.append(await arate(one, 0.2))
                ra.append(await arate(fan, 0.2))
        await aio.close()
        out = summary(ra, rb)
        return {**out, "slowdown": round(1 / out["ratio"], 3)}

    results["scatter_limit20_async_vs_one_shard"] = asyncio.run(async_part())
    router.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="per comparison")
    parser.add_argument("--config", type=Path, help="a running topology (default: a sandbox)")
    args = parser.parse_args()
    meta = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cores": __import__("os").cpu_count(),
        "seconds_per_comparison": args.seconds,
        "point_sql": POINT,
        "scatter_sql": SCATTER,
        "note": (
            "a = through shardrouter, b = SQLAlchemy Core on one shard's engine (for the"
            " scatter: the statement the router sends to one shard); ratio = a/b"
        ),
    }
    if args.config:
        out = measure(Topology.load(args.config), args.seconds)
    else:
        directory = Path(tempfile.mkdtemp(prefix="shardrouter-bench-"))
        try:
            box = sb.up(directory, shards=4, base_port=3501)
            out = measure(Topology.load(box.topology_path), args.seconds)
        finally:
            sb.down(directory)
    print(json.dumps({**meta, **out}, indent=2))


if __name__ == "__main__":
    main()
