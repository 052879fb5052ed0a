"""Sharding strategies (vindexes): one module each, registered by name on import."""

from __future__ import annotations

from . import gene as gene
from . import hash as hash
from . import lookup as lookup
from . import mod as mod
from . import range as range
from .base import FunctionalStrategy as FunctionalStrategy
from .base import Strategy as Strategy
from .base import StrategyContext as StrategyContext
from .base import StrategyDomainError as StrategyDomainError
from .base import StrategyParams as StrategyParams
from .base import build as build
from .base import key_types as key_types
from .base import known_strategies as known_strategies
from .base import params_model as params_model
from .base import register as register
from .gene import GeneStrategy as GeneStrategy
from .hash import HashStrategy as HashStrategy
from .lookup import LookupQuery as LookupQuery
from .lookup import LookupStrategy as LookupStrategy
from .mod import ModStrategy as ModStrategy
from .range import RangeStrategy as RangeStrategy

__all__ = [
    "FunctionalStrategy",
    "GeneStrategy",
    "HashStrategy",
    "LookupQuery",
    "LookupStrategy",
    "ModStrategy",
    "RangeStrategy",
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
