"""The ``mod`` strategy: slot = value mod slots, for legacy ``user_id % 1024`` layouts."""

from __future__ import annotations

from typing import Any, ClassVar

from ...types import KeyspaceId, KeyType, Slot
from .base import StrategyContext, StrategyDomainError, StrategyParams, register


class ModParams(StrategyParams):
    """``mod`` takes no parameters: the modulus is the topology's slot count."""


@register("mod", ModParams)
class ModStrategy:
    """Integer value modulo the slot count. Negative values are refused: MySQL's ``%`` keeps the
    sign (-1 % 1024 = -1) while Python's does not, so a legacy layout never had them."""

    name: ClassVar[str] = "mod"
    cost: ClassVar[int] = 0
    unique: ClassVar[bool] = True
    needs_io: ClassVar[bool] = False
    key_types: ClassVar[frozenset[KeyType]] = frozenset({KeyType.INT})

    __slots__ = ("_mask",)

    def __init__(self, params: ModParams, context: StrategyContext) -> None:
        # slots is a power of two, so value % slots == value & (slots - 1) for value >= 0.
        self._mask = context.slots - 1

    def keyspace_id(self, value: Any) -> KeyspaceId | None:
        return None

    def slot(self, value: Any) -> Slot:
        if type(value) is not int or value < 0:
            raise StrategyDomainError(f"{value!r} is not a non-negative integer (mod needs one)")
        return value & self._mask  # type: ignore[return-value]
