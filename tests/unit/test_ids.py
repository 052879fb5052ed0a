"""Ids: layout round trips, uniqueness across threads and workers, clock steps, routing genes."""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardrouter.core.ids import ID_BITS, IdGenerator, IdLayout
from shardrouter.core.topology import Topology
from shardrouter.errors import (
    ClockMovedBackwardsError,
    IdDecodeError,
    IdError,
    KeyValueError,
    RoutingError,
)

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
# 41 / 10 / 5 / 7 bits (the default before 8 worker bits): 128 ids per ms per slot make the
# sequence tests below easy to read; the default layout has its own tests.
LAYOUT = IdLayout(epoch_ms=EPOCH_MS, worker_bits=5, sequence_bits=7)


class FakeClock:
    """A millisecond clock that only moves when told to, or when the generator sleeps."""

    def __init__(self, now_ms: int) -> None:
        self.now = float(now_ms)
        self.sleeps = 0
        self.slept_ms = 0.0

    def __call__(self) -> int:
        return int(self.now)

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.slept_ms += seconds * 1000
        self.now += seconds * 1000

    def set(self, now_ms: int) -> None:
        self.now = float(now_ms)


def fake_generator(
    start_ms: int = EPOCH_MS + 10_000, worker: int = 3, max_backward_ms: int = 100
) -> tuple[IdGenerator, FakeClock]:
    clock = FakeClock(start_ms)
    gen = IdGenerator(
        LAYOUT, worker, max_backward_ms=max_backward_ms, clock_ms=clock, sleep=clock.sleep
    )
    return gen, clock


def run_threads(count: int, target: Callable[[int], None]) -> None:
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def wrapped(i: int) -> None:
        try:
            barrier.wait()
            target(i)
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=wrapped, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def assert_increasing_per_slot(ids: list[int], layout: IdLayout = LAYOUT) -> None:
    last: dict[int, int] = {}
    for id_ in ids:
        slot = layout.slot_of(id_)
        assert id_ > last.get(slot, -1), f"id {id_} not above {last.get(slot)} in slot {slot}"
        last[slot] = id_


# -- layout ---------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    timestamp=st.integers(0, (1 << 41) - 1),
    slot=st.integers(0, 1023),
    worker=st.integers(0, 31),
    sequence=st.integers(0, 127),
)
def test_decode_compose_identity(timestamp: int, slot: int, worker: int, sequence: int) -> None:
    id_ = LAYOUT.compose(timestamp, slot, worker, sequence)
    assert 0 <= id_ < 1 << ID_BITS
    d = LAYOUT.decode(id_)
    assert (d.id, d.timestamp_ms, d.slot, d.worker, d.sequence) == (
        id_,
        timestamp + EPOCH_MS,
        slot,
        worker,
        sequence,
    )
    assert LAYOUT.slot_of(id_) == slot


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    gene_bits=st.integers(0, 16),
    worker_bits=st.integers(0, 10),
    sequence_bits=st.integers(1, 12),
)
def test_decode_compose_identity_any_layout(
    data: st.DataObject, gene_bits: int, worker_bits: int, sequence_bits: int
) -> None:
    timestamp_bits = ID_BITS - gene_bits - worker_bits - sequence_bits
    layout = IdLayout(0, timestamp_bits, gene_bits, worker_bits, sequence_bits)
    fields = [
        data.draw(st.integers(0, (1 << bits) - 1))
        for bits in (timestamp_bits, gene_bits, worker_bits, sequence_bits)
    ]
    d = layout.decode(layout.compose(*fields))
    assert [d.timestamp_ms, d.slot, d.worker, d.sequence] == fields


def test_layout_refuses_bits_not_adding_to_63() -> None:
    with pytest.raises(ValueError, match="add up to 62, not 63"):
        IdLayout(EPOCH_MS, timestamp_bits=40)


def test_layout_figures() -> None:
    assert LAYOUT.max_sequence == 127
    assert LAYOUT.workers == 32
    assert LAYOUT.per_slot_ceiling_per_second() == 128_000
    assert LAYOUT.ceiling_per_second() == 128_000 * 1024 * 32
    assert LAYOUT.end.isoformat() == "2094-09-07T15:47:35.552000+00:00"


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="negative"),
        pytest.param(1 << 63, id="2-to-the-63"),
        pytest.param(1 << 64, id="2-to-the-64"),
        pytest.param("12345", id="str"),
        pytest.param(12345.0, id="float"),
        pytest.param(True, id="bool"),
        pytest.param(None, id="none"),
    ],
)
def test_decode_refuses_non_ids(value: Any) -> None:
    with pytest.raises(IdDecodeError, match=r"is not a shardrouter id \(ids are integers"):
        LAYOUT.decode(value)
    assert issubclass(IdDecodeError, IdError)


def test_decode_edges() -> None:
    assert LAYOUT.decode(0).timestamp_ms == EPOCH_MS
    top = LAYOUT.decode((1 << 63) - 1)
    assert (top.slot, top.worker, top.sequence) == (1023, 31, 127)


# -- generator against the orders topology ---------------------------------------------------


def test_generate_then_decode(orders_topology: Topology) -> None:
    gen = orders_topology.id_generator("orders", worker_id=7)
    for user_id in (1, 42, 1001, 2**40, -5):
        id_ = gen.next_id(user_id=user_id)
        d = gen.decode(id_)
        assert d.slot == orders_topology.slot_for("users", user_id)
        assert d.worker == 7
        assert orders_topology.shard_of_slot(d.slot) == orders_topology.shard_for("orders", user_id)


def test_generator_takes_the_configured_worker(orders_topology: Topology) -> None:
    gen = orders_topology.id_generator("orders")
    assert gen.worker_id == orders_topology.config.ids.worker_id == 0
    assert gen.decode(gen.next_id(user_id=5)).worker == 0


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(user_id=st.integers(-(2**63), 2**64 - 1))
def test_order_id_routes_where_its_user_routes(orders_topology: Topology, user_id: int) -> None:
    gen = orders_topology.id_generator("orders")
    order_id = gen.next_id(user_id=user_id)
    by_order = orders_topology.route("orders", "order_id", order_id)
    by_user = orders_topology.route("orders", "user_id", user_id)
    assert (by_order.slot, by_order.shard, by_order.physical_table) == (
        by_user.slot,
        by_user.shard,
        by_user.physical_table,
    )
    assert orders_topology.shard_for("orders", order_id, "order_id") == orders_topology.shard_for(
        "users", user_id
    )


def test_id_generator_refusals(orders_topology: Topology) -> None:
    with pytest.raises(IdError, match=r"worker_id 256 is outside \[0, 256\) for 8 worker bits"):
        orders_topology.id_generator("orders", worker_id=256)
    with pytest.raises(RoutingError, match="broadcast"):
        orders_topology.id_generator("countries")
    gen = orders_topology.id_generator("orders")
    with pytest.raises(KeyValueError, match=r"orders\.user_id: value 'x' is not an integer"):
        gen.next_id(user_id="x")
    with pytest.raises(RoutingError, match="needs a query"):
        gen.next_id(merchant_id=7)


@pytest.mark.parametrize("worker", [pytest.param(-1, id="negative"), pytest.param(32, id="32")])
def test_bad_worker_id_raises(worker: int) -> None:
    with pytest.raises(IdError, match=f"worker_id {worker} is outside"):
        IdGenerator(LAYOUT, worker)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda g: g.next_id(), r"exactly one sharding key .* got \[\]", id="no-key"),
        pytest.param(
            lambda g: g.next_id(user_id=1, slot=2),
            r"exactly one sharding key .* got \['slot', 'user_id'\]",
            id="two-keys",
        ),
        pytest.param(lambda g: g.next_ids(3), "exactly one sharding key", id="batch-no-key"),
        pytest.param(lambda g: g.next_id(slot=1024), "slot 1024 is outside", id="slot-too-big"),
        pytest.param(lambda g: g.next_id(slot=-1), "slot -1 is outside", id="slot-negative"),
        pytest.param(lambda g: g.next_id(slot="1"), "slot '1' is outside", id="slot-str"),
        pytest.param(lambda g: g.next_for_slot(1024), "slot 1024 is outside", id="for-slot"),
        pytest.param(lambda g: g.next_ids(0, slot=1), "count 0 must be", id="count-zero"),
        pytest.param(lambda g: g.next_ids(-2, slot=1), "count -2 must be", id="count-negative"),
        pytest.param(
            lambda g: g.next_id(user_id=1), "has no topology to route keys", id="no-topology"
        ),
    ],
)
def test_next_id_argument_errors(call: Callable[[IdGenerator], Any], message: str) -> None:
    gen, _clock = fake_generator()
    with pytest.raises(IdError, match=message):
        call(gen)
    assert gen.next_id(slot=1) == LAYOUT.compose(10_000, 1, 3, 0)  # nothing was consumed


# -- fake clock -----------------------------------------------------------------------------


def test_sequence_exhaustion_moves_to_the_next_millisecond() -> None:
    gen, clock = fake_generator()
    ids = gen.next_ids(300, slot=5)
    assert len(set(ids)) == 300
    assert ids == sorted(ids)
    decoded = [gen.decode(i) for i in ids]
    stamps = [d.timestamp_ms - EPOCH_MS for d in decoded]
    assert stamps == [10_000] * 128 + [10_001] * 128 + [10_002] * 44
    assert [d.sequence for d in decoded] == [*range(128), *range(128), *range(44)]
    assert {d.slot for d in decoded} == {5} and {d.worker for d in decoded} == {3}
    assert clock.sleeps > 0 and int(clock.now) == EPOCH_MS + 10_002


def test_sequence_exhaustion_single_ids_never_repeat() -> None:
    gen, clock = fake_generator()
    ids = [gen.next_for_slot(9) for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert_increasing_per_slot(ids)
    assert int(clock.now) - EPOCH_MS == 10_000 + 1000 // 128
    # Another slot has its own sequence: not exhausted by slot 9.
    other = gen.decode(gen.next_for_slot(10))
    assert (other.sequence, other.timestamp_ms - EPOCH_MS) == (0, int(clock.now) - EPOCH_MS)


def test_frozen_clock_raises_instead_of_hanging() -> None:
    clock = FakeClock(EPOCH_MS + 5)
    gen = IdGenerator(LAYOUT, 0, clock_ms=clock, sleep=lambda s: None)
    ids = gen.next_ids(128, slot=0)
    with pytest.raises(ClockMovedBackwardsError, match="did not advance"):
        gen.next_id(slot=0)
    assert len(set(ids)) == 128


@pytest.mark.parametrize(
    "back_ms",
    [
        pytest.param(1, id="1ms"),
        pytest.param(50, id="50ms"),
        pytest.param(100, id="exactly-the-bound"),
    ],
)
def test_clock_step_back_within_bound_waits(back_ms: int) -> None:
    gen, clock = fake_generator(max_backward_ms=100)
    before = [*gen.next_ids(200, slot=1), gen.next_for_slot(2)]
    high = int(clock.now)
    clock.set(high - back_ms)
    after = [*gen.next_ids(300, slot=1), gen.next_for_slot(2), gen.next_for_slot(3)]
    assert clock.slept_ms >= back_ms - 1
    all_ids = before + after
    assert len(set(all_ids)) == len(all_ids)
    assert_increasing_per_slot(all_ids)
    assert min(gen.decode(i).timestamp_ms for i in after) >= high


def test_clock_step_back_beyond_bound_raises_and_issues_nothing() -> None:
    gen, clock = fake_generator(max_backward_ms=100)
    first = gen.next_ids(10, slot=1)
    high = int(clock.now)
    clock.set(high - 101)
    sleeps = clock.sleeps
    with pytest.raises(ClockMovedBackwardsError, match="moved back 101 ms") as info:
        gen.next_ids(5, slot=1)
    assert "max_backward_ms=100" in str(info.value)
    with pytest.raises(ClockMovedBackwardsError):
        gen.next_for_slot(2)  # every slot refuses, not just the one that issued last
    assert clock.sleeps == sleeps  # refused at once, no waiting
    clock.set(high)
    following = gen.next_id(slot=1)
    assert gen.decode(following).sequence == 10  # the refused calls consumed nothing
    assert following > max(first)


def test_clock_step_back_with_zero_tolerance() -> None:
    gen, clock = fake_generator(max_backward_ms=0)
    gen.next_id(slot=0)
    clock.set(int(clock.now) - 1)
    with pytest.raises(ClockMovedBackwardsError, match="moved back 1 ms"):
        gen.next_id(slot=0)


def test_clock_before_epoch_raises() -> None:
    gen, clock = fake_generator(start_ms=EPOCH_MS - 1)
    with pytest.raises(IdError, match="before the id epoch"):
        gen.next_id(slot=0)
    clock.set(EPOCH_MS)
    assert gen.next_id(slot=0) == LAYOUT.compose(0, 0, 3, 0)


def test_clock_past_lifetime_raises() -> None:
    last_ms = EPOCH_MS + (1 << 41) - 1
    gen, clock = fake_generator(start_ms=last_ms)
    assert gen.decode(gen.next_id(slot=7)).timestamp_ms == last_ms
    clock.set(last_ms + 1)
    with pytest.raises(IdError, match=r"lifetime ended at 2094-09-07T15:47:35\.552000"):
        gen.next_id(slot=7)


def test_exhaustion_in_the_last_millisecond_raises() -> None:
    last_ms = EPOCH_MS + (1 << 41) - 1
    gen, _clock = fake_generator(start_ms=last_ms)
    ids = gen.next_ids(128, slot=7)
    with pytest.raises(IdError, match="lifetime ended"):
        gen.next_id(slot=7)
    assert len(set(ids)) == 128


# -- real clock, threads --------------------------------------------------------------------


def test_ids_strictly_increasing_per_slot() -> None:
    gen = IdGenerator(LAYOUT, 1)
    rng = random.Random(11)
    ids = [gen.next_for_slot(rng.randrange(16)) for _ in range(20_000)]
    ids += gen.next_ids(1000, slot=3)
    assert_increasing_per_slot(ids)
    assert len(set(ids)) == len(ids)


@pytest.mark.timeout(120)
def test_ids_unique_across_eight_threads() -> None:
    threads, per_thread = 8, 100_000
    gen = IdGenerator(LAYOUT, 5)
    results: list[list[int]] = [[] for _ in range(threads)]

    def work(i: int) -> None:
        out = results[i]
        single = gen.next_id
        batch = gen.next_ids
        # Half single ids, half batches of 50, over 64 slots that every thread shares.
        for n in range(per_thread // 2):
            out.append(single(slot=(n + i) % 64))
        for n in range(per_thread // 2 // 50):
            out.extend(batch(50, slot=(n * 7 + i) % 64))

    run_threads(threads, work)
    total = sum(len(r) for r in results)
    assert total == threads * per_thread
    assert len({id_ for r in results for id_ in r}) == total
    for r in results:  # each thread sees its ids rise within every slot
        assert_increasing_per_slot(r[: per_thread // 2])
        assert_increasing_per_slot(r[per_thread // 2 :])
    assert {LAYOUT.decode(i).worker for r in results for i in r[:100]} == {5}


@pytest.mark.timeout(120)
def test_two_workers_never_collide() -> None:
    per_thread = 30_000
    gens = [IdGenerator(LAYOUT, 1), IdGenerator(LAYOUT, 2)]
    results: list[list[int]] = [[] for _ in range(4)]

    def work(i: int) -> None:
        gen = gens[i % 2]  # two threads per generator, both generators on the same slots
        out = results[i]
        for n in range(per_thread):
            out.append(gen.next_for_slot(n % 8))

    run_threads(4, work)
    everything = [id_ for r in results for id_ in r]
    assert len(set(everything)) == len(everything) == 4 * per_thread
    by_worker: dict[int, int] = defaultdict(int)
    for id_ in everything:
        by_worker[LAYOUT.decode(id_).worker] += 1
    assert by_worker == {1: 2 * per_thread, 2: 2 * per_thread}
