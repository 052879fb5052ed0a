"""Progress of finalize's and cancel's deletes (workflow._advancing): the movers report running
totals per chunk; the bar must move by each chunk's rows, not by the total again."""

from __future__ import annotations

from shardrouter.reshard.copy import ChunkDone
from shardrouter.reshard.workflow import _advancing


class _Task:
    def __init__(self) -> None:
        self.steps: list[int] = []

    def advance(self, n: int) -> None:
        self.steps.append(n)

    def done(self) -> None:
        pass


def test_chunks_advance_by_their_own_rows() -> None:
    task = _Task()
    on_chunk = _advancing(task)
    for total in (1000, 2000, 2500):
        on_chunk(ChunkDone("orders_0000", (total,), total, total))
    assert task.steps == [1000, 1000, 500]
    assert sum(task.steps) == 2500
