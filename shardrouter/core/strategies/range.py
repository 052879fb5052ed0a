"""The ``range`` strategy: ordered boundaries (numbers, dates or strings) -> slots."""

from __future__ import annotations

import datetime as dt
import itertools
from bisect import bisect_right
from typing import Any, ClassVar

from ...types import KeyspaceId, KeyType, Slot
from .base import StrategyContext, StrategyDomainError, StrategyParams, register


class RangeParams(StrategyParams):
    """``boundaries``: strictly increasing; value < boundaries[0] is range 0, and so on.

    ``slots``: the slot of each of the len(boundaries) + 1 ranges; when omitted the ranges are
    spread evenly over the slot space (range i -> slot i * slots // (len(boundaries) + 1)).
    """

    boundaries: list[int | dt.date | str]
    slots: list[int] | None = None


def _coerce(value: int | dt.date | str, key_type: KeyType) -> int | dt.date | str:
    if key_type is KeyType.DATE and isinstance(value, str):
        return dt.date.fromisoformat(value)
    if not key_type.accepts(value):
        raise ValueError(f"boundary {value!r} is not {key_type.label} (the column's type)")
    return value


@register("range", RangeParams)
class RangeStrategy:
    """Binary search over the boundaries; the same value always lands in the same range."""

    name: ClassVar[str] = "range"
    cost: ClassVar[int] = 0
    unique: ClassVar[bool] = True
    needs_io: ClassVar[bool] = False
    key_types: ClassVar[frozenset[KeyType]] = frozenset(KeyType)

    __slots__ = ("_boundaries", "_key_type", "_slots")

    def __init__(self, params: RangeParams, context: StrategyContext) -> None:
        if not params.boundaries:
            raise ValueError("boundaries is empty (give at least one boundary)")
        bounds = [_coerce(b, context.key_type) for b in params.boundaries]
        for i, (low, high) in enumerate(itertools.pairwise(bounds)):
            if not low < high:  # type: ignore[operator]
                raise ValueError(
                    f"boundaries[{i + 1}] {high!r} is not greater than {low!r}"
                    " (boundaries must be strictly increasing)"
                )
        count = len(bounds) + 1
        if params.slots is None:
            slots = [i * context.slots // count for i in range(count)]
        else:
            slots = list(params.slots)
            if len(slots) != count:
                raise ValueError(
                    f"slots has {len(slots)} entries but {len(bounds)} boundaries make "
                    f"{count} ranges (give one slot per range)"
                )
            for i, s in enumerate(slots):
                if not 0 <= s < context.slots:
                    raise ValueError(f"slots[{i}] {s} is outside [0, {context.slots})")
        self._boundaries = bounds
        self._slots = tuple(Slot(s) for s in slots)
        self._key_type = context.key_type

    def keyspace_id(self, value: Any) -> KeyspaceId | None:
        return None

    def slot(self, value: Any) -> Slot:
        try:
            return self._slots[bisect_right(self._boundaries, value)]
        except TypeError:
            raise StrategyDomainError(
                f"{value!r} cannot be compared with the range boundaries"
                f" ({self._key_type.label} expected)"
            ) from None
