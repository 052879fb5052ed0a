"""The pure side of worker-id leases: IdGenerator.grant/revoke, and the default id layout."""

from __future__ import annotations

import pytest

from shardrouter.core.config import IdConfig
from shardrouter.core.ids import IdGenerator, IdLayout
from shardrouter.errors import ClockMovedBackwardsError, WorkerLeaseError

EPOCH_MS = 1_735_689_600_000  # 2025-01-01T00:00:00Z
LAYOUT = IdLayout(epoch_ms=EPOCH_MS)
START_MS = EPOCH_MS + 10_000


class Clocks:
    """A wall clock (ms) and a monotonic clock (s) that move only when told, or on sleep."""

    def __init__(self) -> None:
        self.wall = float(START_MS)
        self.mono = 1000.0
        self.mono_reads = 0

    def clock_ms(self) -> int:
        return int(self.wall)

    def monotonic(self) -> float:
        self.mono_reads += 1
        return self.mono

    def sleep(self, seconds: float) -> None:
        self.wall += seconds * 1000
        self.mono += seconds

    def advance(self, seconds: float) -> None:
        self.sleep(seconds)


def generator(clocks: Clocks, worker: int = 5, max_backward_ms: int = 100) -> IdGenerator:
    return IdGenerator(
        LAYOUT,
        worker,
        max_backward_ms=max_backward_ms,
        clock_ms=clocks.clock_ms,
        sleep=clocks.sleep,
        monotonic=clocks.monotonic,
    )


def test_default_layout_fits_256_generators() -> None:
    config = IdConfig()
    assert (config.timestamp_bits, config.gene_bits, config.worker_bits, config.sequence_bits) == (
        41,
        10,
        8,
        4,
    )
    layout = IdLayout(epoch_ms=EPOCH_MS)
    assert layout.worker_bits == config.worker_bits and layout.sequence_bits == 4
    assert layout.workers == 256
    assert layout.max_sequence == 15
    assert layout.per_slot_ceiling_per_second() == 16_000
    assert layout.per_slot_ceiling_per_second() * 1024 == 16_384_000  # one worker, all slots
    assert layout.ceiling_per_second() == 16_000 * 1024 * 256 == 4_194_304_000
    assert layout.end.isoformat() == "2094-09-07T15:47:35.552000+00:00"
    assert round(layout.lifetime.days / 365.2425, 1) == 69.7


def test_an_ungranted_generator_issues_as_before() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    clocks.mono = float("inf")  # no deadline applies without a lease, whatever the clock says
    ids = [gen.next_for_slot(3) for _ in range(40)]
    assert len(set(ids)) == 40
    assert gen.lease_valid


def test_granted_generator_stops_at_its_monotonic_deadline_and_never_issues_after() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=clocks.mono + 2.0, issue_before_ms=START_MS + 60_000)
    first = gen.next_for_slot(1)
    clocks.advance(1.5)
    second = gen.next_for_slot(1)
    assert second > first
    clocks.advance(0.5)  # exactly at the deadline: refused
    for _ in range(3):
        with pytest.raises(WorkerLeaseError, match="worker id 5's lease ran out by this process"):
            gen.next_for_slot(1)
        clocks.advance(1.0)
    with pytest.raises(WorkerLeaseError):
        gen.next_ids(3, slot=2)
    assert not gen.lease_valid


def test_the_deadline_is_read_once_per_millisecond_not_once_per_id() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=clocks.mono + 10.0, issue_before_ms=START_MS + 60_000)
    reads = clocks.mono_reads
    for slot in range(200):  # 200 ids in one millisecond, on 200 slots
        gen.next_for_slot(slot)
    assert clocks.mono_reads - reads == 1
    clocks.advance(0.001)
    gen.next_for_slot(0)
    assert clocks.mono_reads - reads == 2


def test_a_renewal_moves_the_deadline_and_ids_resume() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=clocks.mono + 1.0, issue_before_ms=START_MS + 60_000)
    before = gen.next_for_slot(4)
    clocks.advance(1.2)
    with pytest.raises(WorkerLeaseError):
        gen.next_for_slot(4)
    gen.grant(valid_until=clocks.mono + 1.0, issue_before_ms=START_MS + 60_000)
    assert gen.next_for_slot(4) > before


def test_the_store_clock_ceiling_refuses_ids_stamped_at_or_after_the_expiry() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=float("inf"), issue_before_ms=START_MS + 5)
    ids = [gen.next_for_slot(9) for _ in range(3)]
    clocks.wall = START_MS + 4
    ids.append(gen.next_for_slot(9))
    assert max(LAYOUT.decode(i).timestamp_ms for i in ids) == START_MS + 4
    clocks.wall = START_MS + 5
    with pytest.raises(WorkerLeaseError, match="expiry of worker id 5's lease on the meta store's"):
        gen.next_for_slot(9)


def test_a_batch_that_would_cross_the_ceiling_stops_before_it() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=float("inf"), issue_before_ms=START_MS + 2)
    # 16 ids per ms per slot: 40 ids need 3 milliseconds, only 2 are left in the lease.
    with pytest.raises(WorkerLeaseError):
        gen.next_ids(40, slot=0)
    assert clocks.wall < START_MS + 3


def test_a_reused_worker_id_starts_at_the_previous_holders_end() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    floor = START_MS + 40  # the previous holder stamped ids up to START_MS + 39
    gen.grant(valid_until=float("inf"), issue_before_ms=START_MS + 60_000, issue_from_ms=floor)
    first = gen.next_for_slot(0)
    assert LAYOUT.decode(first).timestamp_ms >= floor
    assert clocks.wall >= floor  # it waited for its clock rather than stamp earlier


def test_a_floor_beyond_the_tolerated_clock_step_is_refused() -> None:
    clocks = Clocks()
    gen = generator(clocks, max_backward_ms=100)
    gen.grant(
        valid_until=float("inf"), issue_before_ms=START_MS + 60_000, issue_from_ms=START_MS + 500
    )
    with pytest.raises(ClockMovedBackwardsError):
        gen.next_for_slot(0)


def test_revoke_is_for_good() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=clocks.mono + 10, issue_before_ms=START_MS + 60_000)
    gen.next_for_slot(0)
    gen.revoke("the lease of worker id 5 was lost")
    with pytest.raises(WorkerLeaseError, match="the lease of worker id 5 was lost"):
        gen.next_for_slot(0)
    gen.grant(valid_until=clocks.mono + 10, issue_before_ms=START_MS + 60_000)
    with pytest.raises(WorkerLeaseError, match="was lost"):
        gen.next_id(slot=0)


def test_lease_trouble_is_named_in_the_error() -> None:
    clocks = Clocks()
    gen = generator(clocks)
    gen.grant(valid_until=clocks.mono + 1, issue_before_ms=START_MS + 60_000)
    gen.lease_trouble("last renewal failed: meta store did not answer")
    clocks.advance(2)
    with pytest.raises(WorkerLeaseError, match="meta store did not answer"):
        gen.next_for_slot(0)
