"""Topology: the immutable placement of slots on shards and the routing rules of every table."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal

from sqlalchemy.engine import URL, make_url

from ..errors import (
    KeyValueError,
    RoutingError,
    UnknownKeyError,
    UnknownTableError,
    WorkerLeaseError,
)
from ..types import KeyspaceId, KeyType, ShardId, Slot
from . import strategies
from .config import PoolConfig, TableConfig, TopologyConfig, load_config
from .ids import IdGenerator, IdLayout
from .strategies import FunctionalStrategy, LookupQuery, LookupStrategy, StrategyDomainError
from .strategies.base import StrategyContext


@dataclass(frozen=True, slots=True, order=True)
class SlotRange:
    """A half-open range of slots ``[start, end)``."""

    start: int
    end: int

    def __str__(self) -> str:
        return f"[{self.start}, {self.end})"

    def __contains__(self, slot: object) -> bool:
        return isinstance(slot, int) and self.start <= slot < self.end

    def __len__(self) -> int:
        return self.end - self.start

    def keyrange(self, slot_bits: int) -> str:
        """The Vitess key range of these slots, e.g. ``[0, 512)`` of 1024 is ``-80``.

        Vitess writes the shortest hex prefixes of the keyspace ids, empty at either end.
        """

        def prefix(slot: int) -> str:
            if slot in (0, 1 << slot_bits):
                return ""
            value = slot << (64 - slot_bits)
            text = f"{value:016x}".rstrip("0")
            return text + "0" * (len(text) % 2)

        return f"{prefix(self.start)}-{prefix(self.end)}"


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """One physical shard of a topology. The URLs' repr hides their passwords."""

    id: ShardId
    primary: URL
    replicas: tuple[URL, ...]
    pool: PoolConfig
    ranges: tuple[SlotRange, ...]

    @property
    def slot_count(self) -> int:
        return sum(len(r) for r in self.ranges)


@dataclass(frozen=True, slots=True)
class Route:
    """Where one key goes, with every step shown (what ``shardctl route`` prints)."""

    table: str
    column: str
    value: Any
    strategy: str
    keyspace_id: KeyspaceId | None
    slot: Slot | None
    shard: ShardId | None
    physical_table: str | None
    via: Route | None = None
    """For a lookup column: where the lookup row for the value lives."""

    def as_dict(self) -> dict[str, Any]:
        value = self.value if isinstance(self.value, int | str) else str(self.value)
        return {
            "table": self.table,
            "column": self.column,
            "value": value,
            "strategy": self.strategy,
            "keyspace_id": None if self.keyspace_id is None else f"{self.keyspace_id:016x}",
            "slot": self.slot,
            "shard": self.shard,
            "physical_table": self.physical_table,
            "via": None if self.via is None else self.via.as_dict(),
        }


_DECIMAL_INT = re.compile(r"[+-]?[0-9]+")
"""A string that routes as an integer (ASCII digits: ``int()`` would also take ``' 4_2 '``)."""


class KeyRule:
    """A sharding column of a table and the strategy that maps its values to slots."""

    __slots__ = (
        "_exact",
        "_map",
        "column",
        "key_type",
        "lookup_table",
        "primary",
        "strategy",
        "table",
    )

    def __init__(
        self,
        table: str,
        column: str,
        key_type: KeyType,
        strategy: strategies.Strategy,
        *,
        primary: bool,
    ) -> None:
        self.table = table
        self.column = column
        self.key_type = key_type
        self.strategy = strategy
        self.primary = primary
        self.lookup_table: str | None = (
            strategy.table if isinstance(strategy, LookupStrategy) else None
        )
        # The common key types are matched by exact type first: one identity test on the hot path.
        self._exact: type = {KeyType.INT: int, KeyType.STR: str}.get(key_type, type(None))
        self._map: Callable[[Any], Slot] = (
            strategy.slot if isinstance(strategy, FunctionalStrategy) else self._needs_lookup
        )

    def __repr__(self) -> str:
        return f"KeyRule({self.table}.{self.column}, {self.strategy.name})"

    def value(self, value: Any) -> Any:
        """``value`` as this column routes it; KeyValueError unless it is of the column's
        declared type or, for an int column, a decimal integer string (``'42'``, ``'-7'``,
        ``'007'``: what a web handler often holds), which MySQL compares with the column
        numerically and which therefore routes as that integer. Nothing else is converted:
        ``' 42'``, ``'42.0'``, ``'4e1'`` and ``'42abc'`` (which MySQL would truncate to 42,
        with a warning) stay errors that name the value."""
        if type(value) is self._exact or self.key_type.accepts(value):
            return value
        if self._exact is int and type(value) is str and _DECIMAL_INT.fullmatch(value):
            digits = value.lstrip("+-").lstrip("0")
            if len(digits) <= 20:  # (a 64-bit key has at most 20 digits; int() stops at 4300)
                return -int(digits or "0") if value.startswith("-") else int(digits or "0")
            raise KeyValueError(
                f"{self.table}.{self.column}: value {value[:40]!r}... ({len(value)} characters)"
                f" is outside the 64-bit range of strategy {self.strategy.name}"
            )
        shown = "None (NULL)" if value is None else repr(value)
        problem = "cannot be routed" if value is None else f"is not {self.key_type.label}"
        way = " (or a string of its decimal digits)" if self._exact is int else ""
        raise KeyValueError(
            f"{self.table}.{self.column}: value {shown} {problem}"
            f" (strategy {self.strategy.name} expects {self.key_type.value}); pass the row's"
            f" {self.column} as {self.key_type.label}{way}"
        )

    def check(self, value: Any) -> None:
        """Raise KeyValueError unless ``value`` routes on this column (``value()``)."""
        self.value(value)

    def _needs_lookup(self, value: Any) -> Slot:
        raise RoutingError(
            f"{self.table}.{self.column} routes through lookup table {self.lookup_table}:"
            " finding its slots needs a query (use the router, or route by the owner's key)"
        )

    def slot(self, value: Any) -> Slot:
        """The slot of ``value``; the routing hot path for functional strategies."""
        if type(value) is not self._exact:
            value = self.value(value)
        try:
            return self._map(value)
        except StrategyDomainError as exc:
            raise KeyValueError(
                f"{self.table}.{self.column}: value {value!r}: {exc}"
                f" (strategy {self.strategy.name} expects {self.key_type.value})"
            ) from None

    def shard_function(self, owner: Sequence[ShardId]) -> Callable[[Any], ShardId]:
        """A fused value -> shard function for ``owner`` (slot -> shard): the hot path.

        Values of the column's exact type go straight to the strategy, which checks its own
        domain; anything else (bool, None, a str in an int column) takes the checked path.
        """
        exact, fast, checked = self._exact, self._map, self.slot

        def shard_of(value: Any) -> ShardId:
            if type(value) is exact:
                try:
                    return owner[fast(value)]
                except StrategyDomainError:
                    pass  # re-raised with the table and column by the checked path
            return owner[checked(value)]

        return shard_of

    def keyspace_id(self, value: Any) -> KeyspaceId | None:
        value = self.value(value)
        if isinstance(self.strategy, FunctionalStrategy):
            try:
                return self.strategy.keyspace_id(value)
            except StrategyDomainError as exc:
                raise KeyValueError(f"{self.table}.{self.column}: value {value!r}: {exc}") from None
        return None

    def lookup_query(self, values: Sequence[Any], physical_table: str | None = None) -> LookupQuery:
        """The query that finds the owner keys of ``values`` (lookup columns only)."""
        if not isinstance(self.strategy, LookupStrategy):
            raise RoutingError(f"{self.table}.{self.column} is not a lookup column")
        for value in values:
            self.check(value)
        return self.strategy.query(values, physical_table)


TableKind = Literal["sharded", "broadcast"]


@dataclass(frozen=True, slots=True, eq=False)
class TableRule:
    """How a logical table is placed: its keys, its binding and its physical names."""

    name: str
    kind: TableKind
    primary: KeyRule | None
    keys: Mapping[str, KeyRule]
    """Every sharding column, primary first: {column: rule}."""
    bound_to: str | None
    split: int
    physical_names: tuple[str, ...]
    placement: str = ""
    """How its group's primary key places rows (strategy, its parameters, key type): two
    groups with equal placements put rows of equal keys in one slot, hence one shard ("" for
    a broadcast table)."""

    def key(self, column: str) -> KeyRule:
        rule = self.keys.get(column)
        if rule is None:
            known = ", ".join(self.keys) or "none (broadcast table)"
            raise UnknownKeyError(
                f"{self.name}.{column} is not a sharding column of {self.name}"
                f" (sharding columns: {known})"
            )
        return rule

    def physical(self, slot: int) -> str:
        """The physical table that holds ``slot``'s rows inside its shard."""
        names = self.physical_names
        return names[slot % len(names)]


def _mirrored(
    config: TopologyConfig, owning: set[ShardId]
) -> Mapping[ShardId, tuple[tuple[int, int], ...]]:
    held: dict[ShardId, list[tuple[int, int]]] = {}
    for m in config.moving:
        holder = ShardId(m.source if m.write_mode == "dual_new_primary" else m.target)
        if m.write_mode == "frozen":
            owner_is_target = any(s <= m.slots[0] < e for s, e in config.shards[m.target].slots)
            holder = ShardId(m.source if owner_is_target else m.target)
        if holder in owning:
            held.setdefault(holder, []).append((m.slots[0], m.slots[1]))
    return MappingProxyType({k: tuple(v) for k, v in held.items()})


class Topology:
    """Slots -> shards, tables -> rules, the id layout. Immutable; a change is a new version.

    Routing is a pure function of (version, key): nothing here does I/O or keeps state that a
    key could change.
    """

    def __init__(self, config: TopologyConfig) -> None:
        """Build from a validated config (load_config / config_from_dict validate first)."""
        self.config = config
        self.name = config.name
        self.version = config.version
        self.slots = config.slots
        self.slot_bits = config.slots.bit_length() - 1
        self.id_layout: IdLayout = config.id_layout()
        shards: dict[ShardId, ShardSpec] = {}
        owner: list[ShardId | None] = [None] * config.slots
        for name, shard in config.shards.items():
            sid = ShardId(name)
            ranges = tuple(sorted(SlotRange(s, e) for s, e in shard.slots))
            shards[sid] = ShardSpec(
                id=sid,
                primary=make_url(shard.primary),
                replicas=tuple(make_url(u) for u in shard.replicas),
                pool=shard.pool,
                ranges=ranges,
            )
            for r in ranges:
                owner[r.start : r.end] = [sid] * len(r)
        if any(o is None for o in owner):  # config.check guarantees full cover
            raise RoutingError("topology: some slots have no shard; validate the config first")
        self.shards: Mapping[ShardId, ShardSpec] = MappingProxyType(shards)
        self._owner: tuple[ShardId, ...] = tuple(o for o in owner if o is not None)
        owning = set(self._owner)
        self.serving: tuple[ShardId, ...] = tuple(s for s in self.shards if s in owning)
        """Shards that own slots, in config order: what reads across shards (and reads of
        broadcast tables) use. A shard without slots (one just added, a migration's target
        before its switch) may hold partial broadcast tables or copies of rows it does not
        own; writes to every shard still reach it."""
        self.mirrored: Mapping[ShardId, tuple[tuple[int, int], ...]] = _mirrored(config, owning)
        """Serving shards that also hold copies of rows they do not own: a migration's
        target that already served before it (until the switch) or its source after the
        switch (until finalize), with the copied ranges. A read across shards would count
        those rows twice (execution.run refuses it)."""
        self._tables: dict[str, TableRule] = {}
        for name in config.tables:
            self._tables[name] = self._build_table(name, config.tables)
        self.tables: Mapping[str, TableRule] = MappingProxyType(self._tables)
        # Per table, the primary key's value -> shard function: shard_for's common case.
        self._primary_shard: dict[str, Callable[[Any], ShardId]] = {
            name: rule.primary.shard_function(self._owner)
            for name, rule in self._tables.items()
            if rule.primary
        }

    @classmethod
    def load(cls, path: str | Path, env: Mapping[str, str] | None = None) -> Topology:
        """Load, validate and build a topology from a YAML file (ConfigError on problems)."""
        return cls(load_config(path, env))

    def __repr__(self) -> str:
        return (
            f"Topology({self.name!r}, version={self.version}, slots={self.slots},"
            f" shards={list(self.shards)}, tables={list(self._tables)})"
        )

    # -- construction -------------------------------------------------------------------------

    def _context(self, key_type: KeyType) -> StrategyContext:
        return StrategyContext(slots=self.slots, id_layout=self.id_layout, key_type=key_type)

    def _build_strategy(self, spec: str | dict[str, Any], key_type: KeyType) -> Any:
        if isinstance(spec, str):
            return strategies.build(spec, {}, self._context(key_type))
        params = {k: v for k, v in spec.items() if k != "name"}
        return strategies.build(spec["name"], params, self._context(key_type))

    def _build_table(self, name: str, tables: Mapping[str, TableConfig]) -> TableRule:
        table = tables[name]
        if table.broadcast:
            return TableRule(name, "broadcast", None, MappingProxyType({}), None, 1, (name,))
        source = tables[table.bound_to] if table.bound_to else table
        assert source.column is not None and source.strategy is not None
        primary = KeyRule(
            name,
            source.column,
            source.type,
            self._build_strategy(source.strategy, source.type),
            primary=True,
        )
        keys: dict[str, KeyRule] = {primary.column: primary}
        for sec in table.secondary:
            keys[sec.column] = KeyRule(
                name,
                sec.column,
                sec.type,
                self._build_strategy(sec.strategy, sec.type),
                primary=False,
            )
        if table.bound_to:
            # A bound table's rows sit with their owner's, so a functional secondary key of
            # the owner (order_id, whose gene carries the slot) routes the bound table's rows
            # too. Lookups are not inherited: their rows index the owner table only. A bound
            # table without the column never names it in a statement, so the rule is inert.
            for sec in source.secondary:
                if sec.column in keys:
                    continue
                strategy = self._build_strategy(sec.strategy, sec.type)
                if isinstance(strategy, FunctionalStrategy):
                    keys[sec.column] = KeyRule(name, sec.column, sec.type, strategy, primary=False)
        split = source.split
        physical = (name,) if split == 1 else tuple(f"{name}_{i:04d}" for i in range(split))
        spec = source.strategy if isinstance(source.strategy, dict) else {"name": source.strategy}
        placement = json.dumps([spec, source.type.value], sort_keys=True, default=str)
        return TableRule(
            name,
            "sharded",
            primary,
            MappingProxyType(keys),
            table.bound_to,
            split,
            physical,
            placement,
        )

    # -- routing ------------------------------------------------------------------------------

    def table(self, name: str) -> TableRule:
        """The rule of logical table ``name``; UnknownTableError lists the known tables."""
        rule = self._tables.get(name)
        if rule is None:
            raise UnknownTableError(
                f"table {name!r} is not in topology {self.name!r}"
                f" (known: {', '.join(sorted(self._tables)) or 'none'})"
            )
        return rule

    def shard_of_slot(self, slot: int) -> ShardId:
        """The shard that owns ``slot``."""
        return self._owner[slot]

    def slot_for(self, table: str, value: Any, column: str | None = None) -> Slot:
        """The slot of a row of ``table`` whose key ``column`` (default: primary) is ``value``."""
        rule = self._tables.get(table) or self.table(table)
        key = rule.primary if column is None else rule.key(column)
        if key is None:
            raise RoutingError(f"{table} is a broadcast table: it lives on every shard")
        return key.slot(value)

    def shard_for(self, table: str, value: Any, column: str | None = None) -> ShardId:
        """The shard of a row of ``table`` whose key ``column`` (default: primary) is ``value``.

        The hot path: one dict lookup, one type check, one hash and one indexing.
        """
        if column is None:
            shard_of = self._primary_shard.get(table)
            if shard_of is not None:
                return shard_of(value)
        return self._owner[self.slot_for(table, value, column)]

    def route(self, table: str, column: str, value: Any) -> Route:
        """Every step of routing one key (for humans: ``shardctl route``)."""
        rule = self.table(table)
        key = rule.key(column)
        if key.lookup_table is not None:
            key.check(value)  # name the column asked about, not the lookup table's
            lookup = self.table(key.lookup_table)
            assert lookup.primary is not None
            via = self.route(lookup.name, lookup.primary.column, value)
            return Route(table, column, value, key.strategy.name, None, None, None, None, via)
        slot = key.slot(value)
        return Route(
            table=table,
            column=column,
            value=value,
            strategy=key.strategy.name,
            keyspace_id=key.keyspace_id(value),
            slot=slot,
            shard=self._owner[slot],
            physical_table=rule.physical(slot),
        )

    def slots_of(self, shard: str) -> tuple[SlotRange, ...]:
        spec = self.shards.get(ShardId(shard))
        if spec is None:
            raise RoutingError(
                f"shard {shard!r} is not in topology (known: {', '.join(self.shards)})"
            )
        return spec.ranges

    def owner_slots(self, table: str, owner_keys: Iterable[Any]) -> set[Slot]:
        """Slots of the owner rows a lookup returned (their primary keys)."""
        rule = self.table(table)
        assert rule.primary is not None
        return {rule.primary.slot(k) for k in owner_keys}

    # -- ids ------------------------------------------------------------------------------------

    def id_generator(self, table: str, worker_id: int | None = None) -> IdGenerator:
        """An id generator whose ``next_id(<key>=v)`` embeds the slot of ``table``'s key v.

        ``worker_id`` defaults to the config's ``ids.worker_id``, except on a topology with a
        ``meta:`` section (also a router's topology served by a meta store: the follower
        completes a version stored without one with its store): there every process would
        share that one worker id and issue the same ids, so the worker id must be leased
        (WorkerLease.for_topology(topology).generator(topology, table)) or given explicitly
        (WorkerLeaseError otherwise)."""
        rule = self.table(table)
        if rule.primary is None:
            raise RoutingError(f"{table} is a broadcast table: its ids carry no slot")
        if worker_id is None and self.config.meta is not None:
            raise WorkerLeaseError(
                f"id_generator({table!r}): this topology has a meta: section, so its processes"
                " lease their worker ids from the meta store; ids.worker_id would give every"
                " process the same worker id and the same ids. Lease one:"
                " shardrouter.control.leases.WorkerLease.for_topology(topology)"
                f".generator(topology, {table!r}) (close the lease when done), or pass"
                " worker_id=N yourself if you assign worker ids per process"
            )

        def slot_of(column: str, value: Any) -> Slot:
            return rule.key(column).slot(value)

        ids = self.config.ids
        return IdGenerator(
            self.id_layout,
            ids.worker_id if worker_id is None else worker_id,
            slot_of=slot_of,
            max_backward_ms=ids.max_backward_ms,
        )


__all__ = ["KeyRule", "Route", "ShardSpec", "SlotRange", "TableRule", "Topology"]
