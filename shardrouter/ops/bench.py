"""Micro-benchmarks of the hot paths (routing, id generation); results are measured, as JSON."""

from __future__ import annotations

import platform
import random
import time
from collections.abc import Callable
from typing import Any

from ..core.topology import Topology


def _rate(fn: Callable[[], int], repeat: int) -> float:
    """Best of ``repeat`` runs of ``fn`` (which returns how many operations it did), in ops/s."""
    best = 0.0
    for _ in range(repeat):
        start = time.perf_counter()
        ops = fn()
        elapsed = time.perf_counter() - start
        best = max(best, ops / elapsed)
    return best


def run_bench(topology: Topology, n: int = 200_000, repeat: int = 3) -> dict[str, Any]:
    """Measure routes/s and ids/s on this machine; ``n`` operations per run, best of ``repeat``."""
    rng = random.Random(7)
    users = [rng.randrange(1, 2**40) for _ in range(n)]
    # A fixed worker id, leased from no meta store even with meta:: these ids are thrown away.
    gen = topology.id_generator("orders", worker_id=topology.config.ids.worker_id)
    order_ids = [gen.next_for_slot(rng.randrange(topology.slots)) for _ in range(min(n, 50_000))]
    order_ids = (order_ids * (n // len(order_ids) + 1))[:n]
    shard_for = topology.shard_for
    orders_key = topology.table("orders").primary
    assert orders_key is not None

    def route_hash() -> int:
        for u in users:
            shard_for("orders", u)
        return n

    def route_gene() -> int:
        for o in order_ids:
            shard_for("orders", o, "order_id")
        return n

    def slot_hash() -> int:
        slot = orders_key.slot
        for u in users:
            slot(u)
        return n

    slots = [u % topology.slots for u in users]

    def ids_single_slot() -> int:
        nxt = gen.next_for_slot
        for s in slots:
            nxt(s)
        return n

    def ids_single_key() -> int:
        nxt = gen.next_id
        for u in users[: n // 4]:
            nxt(user_id=u)
        return n // 4

    # One millisecond's per-slot sequence for one key (an order's items), on slots taken in
    # turn: a second batch for a slot within the same millisecond waits for the next one,
    # which would measure the clock, not the code.
    size = min(100, topology.id_layout.max_sequence + 1)
    batch_slots = [i % topology.slots for i in range(n // size)]

    def ids_batch() -> int:
        batch = gen.next_ids
        for s in batch_slots:
            batch(size, slot=s)
        return (n // size) * size

    layout = topology.id_layout
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "n_per_run": n,
        "best_of": repeat,
        "batch_size": size,
        "routes_per_s": {
            "hash_shard_for": round(_rate(route_hash, repeat)),
            "gene_shard_for": round(_rate(route_gene, repeat)),
            "hash_slot_only": round(_rate(slot_hash, repeat)),
        },
        "ids_per_s": {
            "next_for_slot": round(_rate(ids_single_slot, repeat)),
            "next_id_by_key": round(_rate(ids_single_key, repeat)),
            "batch_per_ms": round(_rate(ids_batch, repeat)),
        },
        "id_layout": {
            "bits": {
                "timestamp": layout.timestamp_bits,
                "gene": layout.gene_bits,
                "worker": layout.worker_bits,
                "sequence": layout.sequence_bits,
            },
            "workers": layout.workers,
            "lifetime_ends": layout.end.isoformat(),
            "ceiling_per_slot_per_worker_per_s": layout.per_slot_ceiling_per_second(),
            "ceiling_per_worker_per_s": layout.per_slot_ceiling_per_second() * topology.slots,
            "ceiling_cluster_per_s": layout.ceiling_per_second(),
        },
    }


__all__ = ["run_bench"]
