"""The ``gene`` strategy: the slot is read out of the gene bits of a shardrouter id."""

from __future__ import annotations

from typing import Any, ClassVar

from ...types import KeyspaceId, KeyType, Slot
from .base import StrategyContext, StrategyDomainError, StrategyParams, register


class GeneParams(StrategyParams):
    """``gene`` takes no parameters: the bit positions come from the topology's id layout."""


@register("gene", GeneParams)
class GeneStrategy:
    """An id generated for a row carries its owner's slot, so routing by id needs no lookup."""

    name: ClassVar[str] = "gene"
    cost: ClassVar[int] = 0
    unique: ClassVar[bool] = True
    needs_io: ClassVar[bool] = False
    key_types: ClassVar[frozenset[KeyType]] = frozenset({KeyType.INT})

    __slots__ = ("_mask", "_shift")

    def __init__(self, params: GeneParams, context: StrategyContext) -> None:
        layout = context.id_layout
        if layout is None:  # config validation refuses this earlier; kept for direct use
            raise ValueError("the gene strategy needs an id layout (ids: in the topology)")
        self._shift = layout.gene_shift
        self._mask = (1 << layout.gene_bits) - 1

    def keyspace_id(self, value: Any) -> KeyspaceId | None:
        return None

    def slot(self, value: Any) -> Slot:
        if type(value) is not int or not 0 <= value <= 0x7FFFFFFFFFFFFFFF:
            raise StrategyDomainError(
                f"{value!r} is not a shardrouter id (a non-negative 63-bit integer)"
            )
        return (value >> self._shift) & self._mask  # type: ignore[return-value]
