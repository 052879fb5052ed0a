"""The ``lookup`` strategy: a lookup table maps a secondary key to its rows' owning keys."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import Field
from sqlalchemy import ColumnClause, Select, column, select, table

from ...types import KeyType
from .base import StrategyContext, StrategyParams, register


class LookupParams(StrategyParams):
    """``table``: the logical lookup table (itself sharded by ``from``);
    ``from``: its column holding the secondary key; ``to``: its column holding the owner's
    primary sharding key (for merchant_orders: merchant_id -> user_id);
    ``key``: optional, a unique column of the owner row copied into the lookup row so each
    owner row has its own lookup row (merchant_orders.order_id); without it the lookup is
    unique: one ``from`` value belongs to one owner (user_emails: email -> user_id)."""

    table: str
    from_: str = Field(alias="from")
    to: str
    key: str | None = None


@dataclass(frozen=True, slots=True)
class LookupQuery:
    """A lookup to run: ``statement`` on the lookup table's shards, values as bound params."""

    table: str
    from_column: str
    to_column: str
    values: tuple[Any, ...]
    statement: Select[Any]


@register("lookup", LookupParams)
class LookupStrategy:
    """Needs I/O, so it does none: it returns the query to run and maps the rows it gets back.

    The sync and async executors both run the query, so neither owns the mapping. Rows that
    point at an owner key are turned into slots by the owner table's primary strategy (the
    topology does that, as only it knows the owner).
    """

    name: ClassVar[str] = "lookup"
    cost: ClassVar[int] = 20
    unique: ClassVar[bool] = False
    needs_io: ClassVar[bool] = True
    key_types: ClassVar[frozenset[KeyType]] = frozenset(KeyType)

    __slots__ = ("from_column", "key_column", "table", "to_column")

    def __init__(self, params: LookupParams, context: StrategyContext) -> None:
        self.table = params.table
        self.from_column = params.from_
        self.to_column = params.to
        self.key_column = params.key

    @property
    def row_columns(self) -> tuple[str, ...]:
        """The columns of one lookup row, in order: from, to[, key]."""
        cols = (self.from_column, self.to_column)
        return cols if self.key_column is None else (*cols, self.key_column)

    def query(self, values: Sequence[Any], physical_table: str | None = None) -> LookupQuery:
        """The statement that finds the owner keys of ``values``; values are bound parameters.

        ``physical_table`` names the table in the shard when the lookup table is split.
        """
        src: ColumnClause[Any] = column(self.from_column)
        dst: ColumnClause[Any] = column(self.to_column)
        stmt = select(src, dst).select_from(table(physical_table or self.table, src, dst))
        stmt = stmt.where(src.in_(list(values)))
        return LookupQuery(self.table, self.from_column, self.to_column, tuple(values), stmt)

    def owner_keys(self, rows: Iterable[Sequence[Any]]) -> dict[Any, set[Any]]:
        """Map rows ``(from, to)`` of the lookup query to {secondary key: {owner keys}}."""
        found: dict[Any, set[Any]] = {}
        for src, dst in rows:
            found.setdefault(src, set()).add(dst)
        return found
