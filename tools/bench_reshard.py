#!/usr/bin/env python3
"""The data movers of online resharding, measured on real MariaDB; prints JSON.

Starts its own 2-shard sandbox on --port (stopped at the end, whatever happens), loads N
orders-shaped rows into s0's four ``orders_000x`` tables (users of s0's slots, half of them in
the moving slots [0, 128)), then times, moving those slots from s0 to s1:

1. backfill: every orders table, chunk 2000, no throttle. rows/s = source rows walked per
   second (every row is read, the moving half upserted into s1). Target: >= 50k.
2. verify: every orders table, no repair. rows/s = source rows compared per second (both
   sides hash their rows; the target's rows of each key range are read too). Target: >= 200k.
3. drain: triggers installed, one UPDATE touching --drain-rows rows (each one journal entry),
   then drain to empty. entries/s.
4. delete_moved: the moving rows deleted from s0 (finalize). rows/s = rows deleted per second.

Each is measured with the movers' engines on PyMySQL (the topology's usual driver, pure
Python) and on mysqlclient (C): the client's share of the work differs a lot between them.
Every number is one run on whatever else the machine is doing (see loadavg in the output).

Usage: python3 tools/bench_reshard.py --port 4180 [--rows 200000] [--drain-rows 20000]
       [--driver pymysql|mysqldb|both]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine

from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops import sandbox as sb
from shardrouter.ops.schema import apply
from shardrouter.reshard import journal
from shardrouter.reshard.copy import backfill, count, delete_moved, verify
from shardrouter.reshard.spec import Belongs, TableSpec, describe, statements
from shardrouter.types import ShardId

MOVING = ((0, 128),)
TARGETS = {"backfill_rows_per_s": 50_000, "verify_rows_per_s": 200_000}


def users_of_s0(topology: Topology, n: int) -> list[int]:
    out: list[int] = []
    candidate = 1
    while len(out) < n:
        if topology.slot_for("users", candidate) < 256:
            out.append(candidate)
        candidate += 1
    return out


def load(topology: Topology, engine: Engine, rows: int, seed: int = 1) -> None:
    """``rows`` orders on s0, spread over its four physical tables by their users' slots."""
    rng = random.Random(seed)
    users = users_of_s0(topology, max(100, rows // 20))
    rule = topology.table("orders")
    start = dt.datetime(2025, 1, 1)
    batch: dict[str, list[tuple[Any, ...]]] = {name: [] for name in rule.physical_names}
    statuses = ("new", "paid", "shipped", "cancelled")

    def flush(conn: Any) -> None:
        for name, values in batch.items():
            if values:
                conn.exec_driver_sql(f"INSERT INTO {name} VALUES (%s, %s, %s, %s, %s, %s)", values)
                values.clear()
        conn.commit()

    with engine.connect() as conn:
        for order_id in range(1, rows + 1):
            user = rng.choice(users)
            table = rule.physical(topology.slot_for("users", user))
            batch[table].append(
                (
                    order_id,
                    user,
                    rng.randint(1, 5000),
                    rng.choice(statuses),
                    rng.randint(100, 100_000),
                    start + dt.timedelta(seconds=order_id, microseconds=rng.randint(0, 999) * 1000),
                )
            )
            if order_id % 5000 == 0:
                flush(conn)
        flush(conn)


def timed(fn: Any) -> tuple[Any, float]:
    started = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - started


def reset(topology: Topology) -> None:
    """The orders schema on both shards, every table empty, no journal."""
    engines = ShardEngines(topology)
    try:
        apply(topology, engines).raise_for_errors()
        for sid in topology.shards:
            with engines.primary(sid).begin() as conn:
                conn.exec_driver_sql("DROP TABLE IF EXISTS shardrouter_journal")
                for name in topology.table("orders").physical_names:
                    conn.exec_driver_sql(f"TRUNCATE TABLE {name}")
    finally:
        engines.dispose()


def measure(
    sandbox: sb.Sandbox, rows: int, drain_rows: int, chunk: int, driver: str
) -> dict[str, Any]:
    topology = Topology.load(sandbox.topology_path)
    reset(topology)
    urls = [topology.shards[ShardId(s)].primary for s in ("s0", "s1")]
    a, b = (create_engine(url.set(drivername=f"mysql+{driver}")) for url in urls)
    try:
        _, load_s = timed(lambda: load(topology, a, rows))
        with a.connect() as conn:
            specs: list[TableSpec] = describe(conn, topology, ["orders"])
            for spec in specs:
                conn.exec_driver_sql(f"ANALYZE TABLE {statements(spec).table}").all()
        belongs = Belongs(topology, MOVING)
        moving = sum(count(a, spec, belongs) for spec in specs)

        def copy_all() -> tuple[int, int]:
            read = copied = 0
            for spec in specs:
                report = backfill(a, b, spec, belongs, chunk=chunk)
                read += report.rows_read
                copied += report.rows_copied
            return read, copied

        (read, copied), backfill_s = timed(copy_all)

        def verify_all() -> tuple[int, int, bool]:
            source = target = 0
            equal = True
            for spec in specs:
                report = verify(a, b, spec, belongs, repair=False)
                source += report.rows_source
                target += report.rows_target
                equal = equal and report.equal
            return source, target, equal

        (v_source, v_target, equal), verify_s = timed(verify_all)

        journal.install(a, specs)
        journal.install(b, specs)
        per_table = max(1, drain_rows // len(specs))
        with a.begin() as conn:
            for spec in specs:
                st = statements(spec)
                conn.exec_driver_sql(
                    f"UPDATE {st.table} SET amount_cents = amount_cents + 1 {st.order_by} LIMIT %s",
                    (per_table,),
                )
        entries = journal.backlog(a)
        drained, drain_s = timed(lambda: journal.drain(a, b, specs, belongs, batch=500))
        after_drain = [verify(a, b, spec, belongs, repair=False).equal for spec in specs]
        journal.remove(a, specs)
        journal.remove(b, specs)

        deleted, delete_s = timed(
            lambda: sum(delete_moved(a, spec, belongs, chunk=1000) for spec in specs)
        )
        return {
            "driver": driver,
            "rows": rows,
            "moving_rows": moving,
            "load_s": round(load_s, 2),
            "backfill": {
                "rows_read": read,
                "rows_copied": copied,
                "seconds": round(backfill_s, 3),
                "rows_per_s": round(read / backfill_s),
                "copied_rows_per_s": round(copied / backfill_s),
                "chunk": chunk,
            },
            "verify": {
                "rows_source": v_source,
                "rows_target": v_target,
                "equal": equal,
                "seconds": round(verify_s, 3),
                "rows_per_s": round(read / verify_s),
                "moving_rows_per_s": round(v_source / verify_s),
            },
            "drain": {
                "entries": entries,
                "copied": drained.copied,
                "discarded": drained.discarded,
                "left": drained.left,
                "equal_after": all(after_drain),
                "seconds": round(drain_s, 3),
                "entries_per_s": round(entries / drain_s),
            },
            "delete": {
                "rows_deleted": deleted,
                "seconds": round(delete_s, 3),
                "rows_per_s": round(deleted / delete_s),
                "rows_walked_per_s": round(read / delete_s),
            },
        }
    finally:
        a.dispose()
        b.dispose()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="first port of the sandbox")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--drain-rows", type=int, default=20_000)
    parser.add_argument("--chunk", type=int, default=2000, help="backfill chunk")
    parser.add_argument(
        "--driver",
        choices=("pymysql", "mysqldb", "both"),
        default="both",
        help="the movers' driver: PyMySQL (pure Python) or mysqlclient (C)",
    )
    args = parser.parse_args()
    drivers = ("pymysql", "mysqldb") if args.driver == "both" else (args.driver,)
    directory = Path(tempfile.mkdtemp(prefix="bench-reshard-"))
    started = time.time()
    try:
        sandbox = sb.up(directory / "sandbox", shards=2, base_port=args.port)
        runs = [measure(sandbox, args.rows, args.drain_rows, args.chunk, d) for d in drivers]
    finally:
        sb.down(directory / "sandbox")
        shutil.rmtree(directory, ignore_errors=True)
    meta = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "wall_s": round(time.time() - started, 1),
        "targets": TARGETS,
    }
    print(json.dumps({**meta, "runs": runs}, indent=2))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
