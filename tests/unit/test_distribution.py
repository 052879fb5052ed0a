"""Slot distribution of the hash strategy: a million users spread evenly over the four shards."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable

import pytest

from shardrouter.core.topology import Topology

USERS = 1_000_000
TOLERANCE = 0.05


def shard_counts(topology: Topology, user_ids: Iterable[int]) -> Counter[str]:
    rule = topology.table("orders").primary
    assert rule is not None
    # The bound KeyRule.slot in a tight loop (via map): ~0.3 us per key.
    per_slot = Counter(map(rule.slot, user_ids))
    shards: Counter[str] = Counter()
    for slot, count in per_slot.items():
        shards[topology.shard_of_slot(slot)] += count
    return shards


def assert_uniform(topology: Topology, counts: Counter[str]) -> None:
    assert sum(counts.values()) == USERS
    assert set(counts) == set(topology.shards)
    for shard, spec in topology.shards.items():
        expected = USERS * spec.slot_count / topology.slots
        assert (1 - TOLERANCE) * expected <= counts[shard] <= (1 + TOLERANCE) * expected, (
            f"{shard}: {counts[shard]} keys, expected {expected:.0f} +- {TOLERANCE:.0%}"
        )


@pytest.mark.timeout(60)
def test_sequential_user_ids_spread_evenly(orders_topology: Topology) -> None:
    assert [s.slot_count for s in orders_topology.shards.values()] == [256] * 4
    assert_uniform(orders_topology, shard_counts(orders_topology, range(1, USERS + 1)))


@pytest.mark.timeout(60)
def test_random_63_bit_user_ids_spread_evenly(orders_topology: Topology) -> None:
    rng = random.Random(20250101)
    user_ids = [rng.getrandbits(63) for _ in range(USERS)]
    assert_uniform(orders_topology, shard_counts(orders_topology, user_ids))


def test_slots_are_all_used_by_sequential_ids(orders_topology: Topology) -> None:
    """Every one of the 1024 slots gets keys, within +-50% of the mean (100k keys, ~98 each)."""
    rule = orders_topology.table("orders").primary
    assert rule is not None
    per_slot = Counter(map(rule.slot, range(1, 100_001)))
    assert set(per_slot) == set(range(1024))
    mean = 100_000 / 1024
    assert 0.5 * mean <= min(per_slot.values()) and max(per_slot.values()) <= 1.5 * mean


def test_shard_for_agrees_with_slot_path(orders_topology: Topology) -> None:
    rule = orders_topology.table("orders").primary
    assert rule is not None
    for user_id in range(1, 20_001):
        assert orders_topology.shard_for("orders", user_id) == orders_topology.shard_of_slot(
            rule.slot(user_id)
        )
