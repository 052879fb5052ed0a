"""The strategy protocol (Vitess calls it a vindex), its build context, and the name registry."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict

from ...types import KeyspaceId, KeyType, Slot

if TYPE_CHECKING:
    from ..ids import IdLayout


class StrategyParams(BaseModel):
    """Parameters of a strategy as written in the topology; each strategy subclasses this.

    Frozen and ``extra="forbid"`` so an unknown or misspelt parameter fails at load time.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")


@dataclass(frozen=True, slots=True)
class StrategyContext:
    """What a strategy may know about the cluster when it is built: fixed for a topology."""

    slots: int
    id_layout: IdLayout | None
    key_type: KeyType

    @property
    def slot_bits(self) -> int:
        return self.slots.bit_length() - 1


class StrategyDomainError(ValueError):
    """A value is of the column's type but outside what the strategy can map.

    Raised by strategies, which do not know the table or column; the topology turns it into a
    KeyValueError that names them.
    """


@runtime_checkable
class Strategy(Protocol):
    """What every strategy declares about itself."""

    name: ClassVar[str]
    cost: ClassVar[int]
    """Relative cost of one mapping (Vitess scale: 0 numeric, 1 hash, 20 lookup)."""
    unique: ClassVar[bool]
    """Whether one value maps to exactly one slot."""
    needs_io: ClassVar[bool]
    """Whether mapping a value needs a query (lookups); functional strategies are pure."""
    key_types: ClassVar[frozenset[KeyType]]
    """The column types this strategy accepts."""


@runtime_checkable
class FunctionalStrategy(Strategy, Protocol):
    """A pure strategy: value -> slot with no I/O. This is the routing hot path."""

    def slot(self, value: Any) -> Slot:
        """The slot of ``value``; raise StrategyDomainError for values outside the domain."""
        ...

    def keyspace_id(self, value: Any) -> KeyspaceId | None:
        """The 64-bit keyspace id of ``value``, or None when the strategy has none."""
        ...


S = TypeVar("S")

StrategyFactory = Callable[[Mapping[str, Any], StrategyContext], Strategy]

_REGISTRY: dict[str, tuple[type[StrategyParams], Any, StrategyFactory]] = {}


def register(
    name: str, params: type[StrategyParams]
) -> Callable[[Callable[[Any, StrategyContext], S]], Callable[[Any, StrategyContext], S]]:
    """Register a strategy class under ``name``; a duplicate name fails at import time.

    The decorated class is constructed as ``cls(params_instance, context)``.
    """

    def decorate(cls: Callable[[Any, StrategyContext], S]) -> Callable[[Any, StrategyContext], S]:
        if name in _REGISTRY:
            raise RuntimeError(f"strategy name {name!r} is registered twice")

        def factory(raw: Mapping[str, Any], context: StrategyContext) -> Strategy:
            built = cls(params.model_validate(dict(raw)), context)
            assert isinstance(built, Strategy)
            return built

        _REGISTRY[name] = (params, cls, factory)
        return cls

    return decorate


def known_strategies() -> tuple[str, ...]:
    """Registered strategy names, sorted."""
    return tuple(sorted(_REGISTRY))


def params_model(name: str) -> type[StrategyParams]:
    """The parameter model of a registered strategy; KeyError when unknown."""
    return _REGISTRY[name][0]


def key_types(name: str) -> frozenset[KeyType]:
    """The column types a registered strategy accepts; KeyError when unknown."""
    types: frozenset[KeyType] = _REGISTRY[name][1].key_types
    return types


def build(name: str, raw: Mapping[str, Any], context: StrategyContext) -> Strategy:
    """Build a registered strategy from its raw parameters (already validated by config)."""
    return _REGISTRY[name][2](raw, context)


__all__ = [
    "FunctionalStrategy",
    "Strategy",
    "StrategyContext",
    "StrategyDomainError",
    "StrategyParams",
    "build",
    "key_types",
    "known_strategies",
    "params_model",
    "register",
]
