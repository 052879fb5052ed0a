"""Writers for the resharding tests: processes with their own routers (following the meta
store) whose threads insert orders with items and lookups, update statuses, delete orders and
use the explicit path, and record every acknowledged write in a ledger (one JSON line per
statement, per thread). Replaying a ledger's statements on one database gives what the
sharded cluster must hold: the oracle.

Every thread owns its users (user ids of its own range), so the ledgers of different threads
touch disjoint rows and replay in any interleaving; within a thread the order is the order
the writes were acknowledged.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from sqlalchemy import text

MERCHANTS = (1, 2, 3, 4, 5, 7, 11)
STATUSES = ("new", "paid", "shipped", "done")

INSERT_USER = "INSERT INTO users (user_id, email, name) VALUES (:u, :e, :n)"
INSERT_ORDER = (
    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
    " VALUES (:o, :u, :m, 'new', :a, '2026-01-01 00:00:00')"
)
INSERT_ITEM = (
    "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents)"
    " VALUES (:o, :l, :u, :s, :q, :p)"
)
UPDATE_STATUS = "UPDATE orders SET status = :s WHERE order_id = :o"
DELETE_ITEMS = "DELETE FROM order_items WHERE order_id = :o"
DELETE_ORDER = "DELETE FROM orders WHERE order_id = :o"
RENAME_USER = "UPDATE users SET name = :n WHERE user_id = :u"


class Ledger:
    """Acknowledged statements of one thread, appended as JSON lines (flushed each time, so
    a killed process leaves every acknowledged write on disk)."""

    def __init__(self, path: Path) -> None:
        self._file = path.open("a", encoding="utf-8")

    def record(self, sql: str, params: dict[str, Any]) -> None:
        self._file.write(json.dumps({"sql": sql, "params": params}) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class Writer:
    """One thread's workload over its own users."""

    def __init__(
        self,
        router: Any,
        layout: Any,
        topology: Any,
        ledger: Ledger,
        first_user: int,
        worker: int,
        seed: int,
    ) -> None:
        self.router = router
        self.layout = layout
        self.topology = topology
        self.ledger = ledger
        self.rng = random.Random(seed)
        self.users = [first_user + i for i in range(8)]
        self.worker = worker
        self.counter = 0
        self.orders: dict[int, int] = {}  # order_id -> user
        self.ops = 0
        self.retries = 0

    def next_order_id(self, user: int) -> int:
        self.counter += 1
        slot = self.topology.slot_for("orders", user)
        return int(self.layout.compose(self.counter, slot, self.worker, 0))

    def run(self, sql: str, params: dict[str, Any]) -> None:
        self.router.execute(sql, params)
        self.ledger.record(sql, params)

    def setup(self) -> None:
        for u in self.users:
            self.run(INSERT_USER, {"u": u, "e": f"user{u}@example.com", "n": f"user {u}"})

    def step(self) -> None:
        r = self.rng.random()
        if r < 0.45 or len(self.orders) < 3:
            self.insert_order()
        elif r < 0.7:
            order = self.rng.choice(list(self.orders))
            self.run(UPDATE_STATUS, {"s": self.rng.choice(STATUSES), "o": order})
        elif r < 0.85:
            order = self.rng.choice(list(self.orders))
            self.run(DELETE_ITEMS, {"o": order})
            self.run(DELETE_ORDER, {"o": order})
            del self.orders[order]
        else:
            self.explicit()
        self.ops += 1

    def insert_order(self) -> None:
        user = self.rng.choice(self.users)
        order = self.next_order_id(user)
        self.run(
            INSERT_ORDER,
            {
                "o": order,
                "u": user,
                "m": self.rng.choice(MERCHANTS),
                "a": self.rng.randrange(1, 100_000),
            },
        )
        self.orders[order] = user
        for line in range(1, self.rng.randrange(2, 4)):
            self.run(
                INSERT_ITEM,
                {
                    "o": order,
                    "l": line,
                    "u": user,
                    "s": f"sku-{line}",
                    "q": self.rng.randrange(1, 5),
                    "p": self.rng.randrange(100, 9999),
                },
            )

    def explicit(self) -> None:
        """The explicit path: a connection() block on the user's shard (held during a switch
        like any write), recorded as the statement it ran."""
        user = self.rng.choice(self.users)
        params = {"n": f"renamed {self.rng.randrange(10**6)}", "u": user}
        with self.router.connection(user_id=user) as conn:
            conn.execute(text(RENAME_USER), params)
        self.ledger.record(RENAME_USER, params)


def writer_process(
    topology_path: str,
    ledger_dir: str,
    index: int,
    threads: int,
    stop_file: str,
    with_async: bool,
    seed: int,
) -> None:
    """A process with its own Router (and AsyncRouter) following the meta store; runs until
    ``stop_file`` exists. Errors go to ``<ledger_dir>/errors-<index>.txt``."""
    from shardrouter.engine.aio import AsyncRouter
    from shardrouter.engine.router import Router

    router = Router.load(topology_path)
    errors = Path(ledger_dir) / f"errors-{index}.txt"
    stats = Path(ledger_dir) / f"stats-{index}.json"
    done = {"ops": 0}
    lock = threading.Lock()
    topology = router.topology
    layout = topology.id_layout

    def work(t: int) -> None:
        ledger = Ledger(Path(ledger_dir) / f"ledger-{index}-{t}.jsonl")
        writer = Writer(
            router,
            layout,
            topology,
            ledger,
            first_user=1_000_000 * (index + 1) + 100 * t,
            worker=index * 16 + t,
            seed=seed * 1000 + index * 100 + t,
        )
        try:
            writer.setup()
            while not Path(stop_file).exists():
                writer.step()
        except BaseException:
            with lock, errors.open("a") as f:
                f.write(f"thread {t}:\n{traceback.format_exc()}\n")
        finally:
            ledger.close()
            with lock:
                done["ops"] += writer.ops

    async def async_work() -> None:
        aio = AsyncRouter.load(topology_path)
        ledger = Ledger(Path(ledger_dir) / f"ledger-{index}-async.jsonl")
        writer = Writer(
            None,
            layout,
            topology,
            ledger,
            first_user=1_000_000 * (index + 1) + 900,
            worker=index * 16 + 15,
            seed=seed * 1000 + index * 100 + 99,
        )

        async def run(sql: str, params: dict[str, Any]) -> None:
            await aio.execute(sql, params)
            ledger.record(sql, params)

        try:
            for u in writer.users:
                await run(INSERT_USER, {"u": u, "e": f"user{u}@example.com", "n": f"user {u}"})
            while not Path(stop_file).exists():
                user = writer.rng.choice(writer.users)
                if writer.rng.random() < 0.6 or not writer.orders:
                    order = writer.next_order_id(user)
                    await run(
                        INSERT_ORDER,
                        {
                            "o": order,
                            "u": user,
                            "m": writer.rng.choice(MERCHANTS),
                            "a": writer.rng.randrange(1, 1000),
                        },
                    )
                    writer.orders[order] = user
                else:
                    order = writer.rng.choice(list(writer.orders))
                    await run(UPDATE_STATUS, {"s": writer.rng.choice(STATUSES), "o": order})
                writer.ops += 1
        except BaseException:
            with lock, errors.open("a") as f:
                f.write(f"async:\n{traceback.format_exc()}\n")
        finally:
            ledger.close()
            await aio.close()
            with lock:
                done["ops"] += writer.ops

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    if with_async:
        asyncio.run(async_work())
    for th in pool:
        th.join()
    stats.write_text(
        json.dumps(
            {"ops": done["ops"], "held": router.holds.held, "max_wait_s": router.holds.max_wait_s}
        )
    )
    router.close()


def wait_for(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)
