"""A router in a child process (multiprocessing spawn), driven over a Pipe by the follow tests
and tools/bench_control.py. Commands are tuples; every answer is ("ok", value) or
("error", class name, message)."""

from __future__ import annotations

import asyncio
import threading
import time
from multiprocessing.connection import Connection
from typing import Any

from sqlalchemy import text

from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.engine.snapshot import Resolution


def serve(conn: Connection, config_path: str, kind: str) -> None:
    """Build a router from ``config_path`` (with ``meta:``) and answer commands until close."""
    loop = asyncio.new_event_loop() if kind == "async" else None

    def wait(aw: Any) -> Any:
        assert loop is not None
        return loop.run_until_complete(aw)

    router: Any = AsyncRouter.load(config_path) if kind == "async" else Router.load(config_path)
    seen: list[Resolution] = []
    router.resolver.hook = seen.append
    txn_cm: Any = None
    txn: Any = None
    inflight: dict[str, Any] = {}

    def execute(sql: str, params: dict[str, Any]) -> Any:
        if kind == "async":
            return wait(router.execute(sql, params))
        return router.execute(sql, params)

    try:
        while True:
            command, *args = conn.recv()
            try:
                if command == "close":
                    break
                if command == "info":
                    value: Any = (router._follower.instance_id, router.version)
                elif command == "version":
                    value = router.version
                elif command == "wait_version":
                    version, timeout = args
                    deadline = time.monotonic() + timeout
                    while router.version < version and time.monotonic() < deadline:
                        time.sleep(0.002)
                    value = router.version
                elif command == "execute":
                    result = execute(*args)
                    value = [tuple(r) for r in result.rows] if result.rows else result.rowcount
                elif command == "begin":  # a transaction left open across commands
                    sql, params = args
                    if kind == "async":
                        txn_cm = router.transaction()
                        txn = wait(txn_cm.__aenter__())
                        wait(txn.execute(sql, params))
                    else:
                        txn_cm = router.transaction()
                        txn = txn_cm.__enter__()
                        txn.execute(sql, params)
                    value = txn._snap.version
                elif command == "commit":
                    sql, params = args
                    if kind == "async":
                        wait(txn.execute(sql, params))
                        wait(txn_cm.__aexit__(None, None, None))
                    else:
                        txn.execute(sql, params)
                        txn_cm.__exit__(None, None, None)
                    value = (txn._snap.version, router.version)
                elif command == "slow_write":  # a statement in flight: started, not waited
                    sql, params = args
                    before = len(seen)

                    if kind == "async":
                        raise ValueError("slow_write runs on a sync router")

                    def slow(sql: str = sql, params: Any = params, before: int = before) -> None:
                        try:
                            router.execute(sql, params)
                            inflight["version"] = seen[before].version
                        except Exception as exc:
                            inflight["error"] = f"{type(exc).__name__}: {exc}"

                    inflight.clear()
                    thread = threading.Thread(target=slow)
                    thread.start()
                    inflight["thread"] = thread
                    deadline = time.monotonic() + 5
                    while len(seen) == before and time.monotonic() < deadline:
                        time.sleep(0.001)  # resolved: the statement has pinned its snapshot
                    value = router.version
                elif command == "slow_done":
                    inflight.pop("thread").join(30)
                    value = (inflight.get("version"), inflight.get("error"), router.version)
                elif command == "explicit_write":
                    (user_id,) = args
                    if kind == "async":

                        async def explicit(user_id: int = user_id) -> None:
                            async with router.connection(user_id=user_id) as c:
                                await c.execute(text("SELECT 1"))

                        wait(explicit())
                    else:
                        with router.connection(user_id=user_id) as c:
                            c.execute(text("SELECT 1"))
                    value = True
                elif command == "doors":
                    value = [r.path for r in seen]
                elif command == "fenced":
                    value = router.resolver.fence.expired()
                else:
                    raise ValueError(f"unknown command {command!r}")
                conn.send(("ok", value))
            except Exception as exc:
                conn.send(("error", type(exc).__name__, str(exc)))
    finally:
        if kind == "async":
            wait(router.close())
            assert loop is not None
            loop.close()
        else:
            router.close()
        conn.close()
