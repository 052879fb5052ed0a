"""The ``hash`` strategy: xxHash64 of the value's canonical text, laid out as Vitess's xxhash."""

from __future__ import annotations

import datetime as dt
from typing import Any, ClassVar

from xxhash import xxh64_digest, xxh64_intdigest

from ...types import KeyspaceId, KeyType, Slot
from .base import StrategyContext, StrategyDomainError, StrategyParams, register
from .general_ci import weight_string

_INT_MIN = -(2**63)
_UINT_MAX = 2**64 - 1


class HashParams(StrategyParams):
    """``fold_case``: for string columns of collation ``utf8mb4_general_ci`` (MariaDB's default
    for utf8mb4): hash the value's weight string under that collation (trailing spaces aside)
    instead of its text, so ``'Ada@Example.com'``, ``'ada@example.com  '`` and
    ``'ÄDA@example.com'``, which the column holds as one value, route to one shard, and values
    the column tells apart route independently. Off by default: then keyspace ids equal
    Vitess's ``xxhash`` vindex exactly."""

    fold_case: bool = False


fold = weight_string
"""The form of a string in which values equal under utf8mb4_general_ci are equal: its weight
string without trailing spaces (general_ci.weight_string). ``fold_case`` keys hash it, and the
unique-lookup check matches stored values to written ones with it."""


def canonical_bytes(value: Any) -> bytes:
    """The bytes that are hashed: an integer in decimal, a string as UTF-8, a date in ISO form.

    Decimal text for integers is what Vitess hashes for an integer bind variable, so the
    keyspace ids here equal those of Vitess's ``xxhash`` vindex.
    """
    if type(value) is int:
        if value < _INT_MIN or value > _UINT_MAX:
            raise StrategyDomainError(
                f"{value} is outside the 64-bit range [-2**63, 2**64) of a BIGINT column"
            )
        return b"%d" % value
    if isinstance(value, str):
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError:
            raise StrategyDomainError(
                f"{value!r} is not valid Unicode (a lone surrogate cannot be stored or hashed)"
            ) from None
    if isinstance(value, dt.datetime):
        # A DATE column stores a datetime as its date: route it where that date routes.
        return value.date().isoformat().encode("ascii")
    if isinstance(value, dt.date):
        return value.isoformat().encode("ascii")
    raise StrategyDomainError(f"{value!r} cannot be hashed (int, str or date expected)")


@register("hash", HashParams)
class HashStrategy:
    """keyspace id = the 8 bytes of xxHash64 (seed 0), little-endian, read big-endian.

    xxh64_digest returns the canonical big-endian digest; reading it little-endian is the same
    as writing the 64-bit hash little-endian and reading that big-endian, which is what Vitess's
    ``vXXHash`` does. The slot is the top ``log2(slots)`` bits of the keyspace id.
    """

    name: ClassVar[str] = "hash"
    cost: ClassVar[int] = 1
    unique: ClassVar[bool] = True
    needs_io: ClassVar[bool] = False
    key_types: ClassVar[frozenset[KeyType]] = frozenset(KeyType)

    __slots__ = ("_fold", "_shift")

    def __init__(self, params: HashParams, context: StrategyContext) -> None:
        if params.fold_case and context.key_type is not KeyType.STR:
            raise ValueError(
                f"fold_case applies to str columns, not {context.key_type.value} (remove it)"
            )
        self._fold = params.fold_case
        # slot_bits <= 16 (config caps slots at 2**16), so the slot lies in the keyspace id's
        # first two bytes, which are the two low bytes of the integer digest, swapped.
        self._shift = 16 - context.slot_bits

    @property
    def fold_case(self) -> bool:
        """Whether string keys are compared (and hashed) by their general_ci fold."""
        return self._fold

    def keyspace_id(self, value: Any) -> KeyspaceId:
        if self._fold and isinstance(value, str):
            key = weight_string(value)
        else:
            key = canonical_bytes(value)
        return KeyspaceId(int.from_bytes(xxh64_digest(key), "little"))

    def slot(self, value: Any) -> Slot:
        # The int fast path avoids the generic canonical_bytes dispatch, and reading the slot
        # from the integer digest avoids building the 8-byte keyspace id (half the cost).
        # Literal bounds (not the module constants) save two global lookups per call.
        if type(value) is int and -0x8000000000000000 <= value <= 0xFFFFFFFFFFFFFFFF:
            h = xxh64_intdigest(b"%d" % value)
        elif self._fold and isinstance(value, str):
            h = xxh64_intdigest(weight_string(value))
        else:
            h = xxh64_intdigest(canonical_bytes(value))
        # Slot() is a NewType call (~45 ns): the hot path returns the int itself.
        return (((h & 0xFF) << 8) | ((h >> 8) & 0xFF)) >> self._shift  # type: ignore[return-value]
