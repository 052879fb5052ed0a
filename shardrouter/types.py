"""Domain value types shared across the package: shard ids, slots, keyspace ids, key types."""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import NewType

ShardId = NewType("ShardId", str)
"""The name of a physical shard as written under ``shards:`` in the topology (``s0``)."""

Slot = NewType("Slot", int)
"""A slot number in ``[0, slots)``: the unit of placement and movement."""

KeyspaceId = NewType("KeyspaceId", int)
"""A 64-bit keyspace id read big-endian; its top ``log2(slots)`` bits are the slot."""

KeyValue = int | str | dt.date
"""The values a sharding key may take (``datetime`` is a ``date`` subclass and is accepted)."""


class KeyType(StrEnum):
    """The declared type of a sharding column; it decides how CLI text is parsed and what
    runtime values are accepted."""

    INT = "int"
    STR = "str"
    DATE = "date"

    def parse(self, text: str) -> KeyValue:
        """Parse command-line text as a value of this type; ValueError names what was expected."""
        if self is KeyType.INT:
            try:
                return int(text, 10)
            except ValueError:
                raise ValueError(f"{text!r} is not an integer") from None
        if self is KeyType.DATE:
            try:
                return dt.date.fromisoformat(text)
            except ValueError:
                raise ValueError(f"{text!r} is not a date (write YYYY-MM-DD)") from None
        return text

    def accepts(self, value: object) -> bool:
        """Whether a runtime value is of this type (bool is not an integer here)."""
        if self is KeyType.INT:
            return type(value) is int or (isinstance(value, int) and not isinstance(value, bool))
        if self is KeyType.STR:
            return isinstance(value, str)
        return isinstance(value, dt.date)

    @property
    def label(self) -> str:
        return {"int": "an integer", "str": "a string", "date": "a date"}[self.value]


__all__ = ["KeyType", "KeyValue", "KeyspaceId", "ShardId", "Slot"]
