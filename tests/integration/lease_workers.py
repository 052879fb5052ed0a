"""Child-process bodies for the worker-lease tests (spawned: importable, top-level, picklable)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from shardrouter.control.leases import WorkerLease
from shardrouter.control.store import MetaStore
from shardrouter.core.ids import IdGenerator, IdLayout
from shardrouter.errors import WorkerLeaseError

EPOCH_MS = 1_735_689_600_000


@contextmanager
def reaped(procs: Sequence[BaseProcess]) -> Iterator[Sequence[BaseProcess]]:
    """Start ``procs``; whatever happens, every one is stopped (TERM, then KILL) and joined."""
    try:
        for proc in procs:
            proc.start()
        yield procs
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in procs:
            proc.join(timeout=max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)


def race(url: str, worker_bits: int, ready: Any, go: Any, hold: Any, results: Any) -> None:
    """Wait for the start signal, try to lease a worker id, report, hold it until told."""
    store = MetaStore(url)
    ready.put(os.getpid())
    if not go.wait(120):
        results.put(("timeout", "no start signal"))
        return
    try:
        lease = WorkerLease.acquire(store, worker_bits=worker_bits, lease_s=60, fence_margin_s=1)
    except WorkerLeaseError as exc:
        results.put(("error", str(exc)))
        store.close()
        return
    results.put(("ok", lease.worker_id))
    hold.wait(120)
    lease.close()
    store.close()


def hold_and_issue(
    url: str, worker_bits: int, lease_s: float, max_backward_ms: int, out: str, results: Any
) -> None:
    """Lease a worker id, then issue ids for slot 7 until killed, a line of them per batch
    appended to ``out``."""
    store = MetaStore(url)
    lease = WorkerLease.acquire(
        store,
        worker_bits=worker_bits,
        max_backward_ms=max_backward_ms,
        lease_s=lease_s,
        fence_margin_s=0.2,
        renew_every_s=lease_s / 4,
    )
    layout = layout_for(worker_bits)
    gen = lease.attach(IdGenerator(layout, lease.worker_id, max_backward_ms=max_backward_ms))
    results.put(("leased", lease.worker_id, lease.holder))
    with open(out, "a", encoding="utf-8") as f:
        while True:
            f.write(" ".join(str(gen.next_for_slot(7)) for _ in range(200)) + "\n")
            f.flush()
            time.sleep(0.01)


def issue_in_turn(url: str, worker_bits: int, count: int, out: str, ready: Any, go: Any) -> None:
    """Lease a worker id (waiting while all are taken), issue ``count`` ids for one slot,
    release, and write them to ``out``."""
    store = MetaStore(url)
    ready.put(os.getpid())
    go.wait(120)
    deadline = time.monotonic() + 90
    while True:
        try:
            lease = WorkerLease.acquire(store, worker_bits=worker_bits, lease_s=30)
            break
        except WorkerLeaseError as exc:
            if "no worker id is free" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    layout = layout_for(worker_bits)
    gen = lease.attach(IdGenerator(layout, lease.worker_id))
    ids = [gen.next_id(slot=7) for _ in range(count)]
    worker = lease.worker_id
    assert lease.close()
    store.close()
    Path(out).write_text(f"{worker}\n" + "\n".join(map(str, ids)), encoding="utf-8")


def layout_for(worker_bits: int) -> IdLayout:
    """The default 10 gene bits and 4 sequence bits, with ``worker_bits`` worker bits."""
    return IdLayout(
        epoch_ms=EPOCH_MS,
        timestamp_bits=63 - 10 - worker_bits - 4,
        gene_bits=10,
        worker_bits=worker_bits,
        sequence_bits=4,
    )


def spawn(ctx: SpawnContext, target: Any, *args: Any) -> SpawnProcess:
    return ctx.Process(target=target, args=args, daemon=True)
