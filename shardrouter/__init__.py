"""shardrouter: the sharding layer for Python order services on MySQL.

The public names below are imported on first use (PEP 562): ``import shardrouter`` (and so
``shardctl --help``) does not load SQLAlchemy, sqlglot or the async stack until a name that
needs them is touched.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from .control.leases import WorkerLease as WorkerLease
    from .control.registry import AckReport as AckReport
    from .control.registry import wait_for_acks as wait_for_acks
    from .control.store import MetaStore as MetaStore
    from .core.config import TopologyConfig as TopologyConfig
    from .core.config import config_from_dict as config_from_dict
    from .core.config import load_config as load_config
    from .core.config import validate_file as validate_file
    from .core.ids import DecodedId as DecodedId
    from .core.ids import IdGenerator as IdGenerator
    from .core.ids import IdLayout as IdLayout
    from .core.topology import Route as Route
    from .core.topology import SlotRange as SlotRange
    from .core.topology import Topology as Topology
    from .engine.aio import AsyncRouter as AsyncRouter
    from .engine.router import Router as Router
    from .engine.router import Transaction as Transaction
    from .errors import ClockMovedBackwardsError as ClockMovedBackwardsError
    from .errors import ConcurrentChangeError as ConcurrentChangeError
    from .errors import ConfigError as ConfigError
    from .errors import CrossShardTransactionError as CrossShardTransactionError
    from .errors import ExecutionError as ExecutionError
    from .errors import FanoutLimitError as FanoutLimitError
    from .errors import FencedError as FencedError
    from .errors import IdDecodeError as IdDecodeError
    from .errors import IdError as IdError
    from .errors import IdGeneratorForkedError as IdGeneratorForkedError
    from .errors import KeyValueError as KeyValueError
    from .errors import LockConflictError as LockConflictError
    from .errors import MetaStoreDocumentError as MetaStoreDocumentError
    from .errors import MetaStoreError as MetaStoreError
    from .errors import MetaStoreUnavailableError as MetaStoreUnavailableError
    from .errors import ReshardDataError as ReshardDataError
    from .errors import ReshardError as ReshardError
    from .errors import ReshardPlanError as ReshardPlanError
    from .errors import ReshardStateError as ReshardStateError
    from .errors import RouterForkedError as RouterForkedError
    from .errors import RoutingError as RoutingError
    from .errors import ScatterWriteError as ScatterWriteError
    from .errors import ShardRouterError as ShardRouterError
    from .errors import ShardUnavailableError as ShardUnavailableError
    from .errors import SwitchHoldError as SwitchHoldError
    from .errors import TopologyChangeError as TopologyChangeError
    from .errors import TransactionAbortedError as TransactionAbortedError
    from .errors import UnknownKeyError as UnknownKeyError
    from .errors import UnknownTableError as UnknownTableError
    from .errors import UnsupportedQueryError as UnsupportedQueryError
    from .errors import WorkerLeaseError as WorkerLeaseError
    from .sql.execution import Page as Page
    from .sql.execution import ResultSet as ResultSet
    from .types import KeyspaceId as KeyspaceId
    from .types import KeyType as KeyType
    from .types import ShardId as ShardId
    from .types import Slot as Slot

_WHERE: dict[str, str] = {
    "AckReport": "control.registry",
    "AsyncRouter": "engine.aio",
    "ClockMovedBackwardsError": "errors",
    "ConcurrentChangeError": "errors",
    "ConfigError": "errors",
    "CrossShardTransactionError": "errors",
    "DecodedId": "core.ids",
    "ExecutionError": "errors",
    "FanoutLimitError": "errors",
    "FencedError": "errors",
    "IdDecodeError": "errors",
    "IdError": "errors",
    "IdGenerator": "core.ids",
    "IdGeneratorForkedError": "errors",
    "IdLayout": "core.ids",
    "KeyType": "types",
    "KeyValueError": "errors",
    "KeyspaceId": "types",
    "LockConflictError": "errors",
    "MetaStore": "control.store",
    "MetaStoreDocumentError": "errors",
    "MetaStoreError": "errors",
    "MetaStoreUnavailableError": "errors",
    "Page": "sql.execution",
    "ResultSet": "sql.execution",
    "Route": "core.topology",
    "SwitchHoldError": "errors",
    "ReshardStateError": "errors",
    "ReshardPlanError": "errors",
    "ReshardError": "errors",
    "ReshardDataError": "errors",
    "Router": "engine.router",
    "RouterForkedError": "errors",
    "RoutingError": "errors",
    "ScatterWriteError": "errors",
    "ShardId": "types",
    "ShardRouterError": "errors",
    "ShardUnavailableError": "errors",
    "Slot": "types",
    "SlotRange": "core.topology",
    "Topology": "core.topology",
    "TopologyChangeError": "errors",
    "TopologyConfig": "core.config",
    "Transaction": "engine.router",
    "TransactionAbortedError": "errors",
    "UnknownKeyError": "errors",
    "UnknownTableError": "errors",
    "UnsupportedQueryError": "errors",
    "WorkerLease": "control.leases",
    "WorkerLeaseError": "errors",
    "config_from_dict": "core.config",
    "load_config": "core.config",
    "validate_file": "core.config",
    "wait_for_acks": "control.registry",
}
"""Public name -> the module (under shardrouter) that defines it."""


SUBMODULES = frozenset(
    {"cli", "control", "core", "engine", "errors", "ops", "orm", "reshard", "sql", "types"}
)
"""The package's modules: ``shardrouter.errors`` after ``import shardrouter`` works as it did
when the package imported them eagerly (a test keeps this list equal to the folder's)."""


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
    elif name in SUBMODULES:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module 'shardrouter' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__, *SUBMODULES})


__all__ = [
    "AckReport",
    "AsyncRouter",
    "ClockMovedBackwardsError",
    "ConcurrentChangeError",
    "ConfigError",
    "CrossShardTransactionError",
    "DecodedId",
    "ExecutionError",
    "FanoutLimitError",
    "FencedError",
    "IdDecodeError",
    "IdError",
    "IdGenerator",
    "IdGeneratorForkedError",
    "IdLayout",
    "KeyType",
    "KeyValueError",
    "KeyspaceId",
    "LockConflictError",
    "MetaStore",
    "MetaStoreDocumentError",
    "MetaStoreError",
    "MetaStoreUnavailableError",
    "Page",
    "ReshardDataError",
    "ReshardError",
    "ReshardPlanError",
    "ReshardStateError",
    "ResultSet",
    "Route",
    "Router",
    "RouterForkedError",
    "RoutingError",
    "ScatterWriteError",
    "ShardId",
    "ShardRouterError",
    "ShardUnavailableError",
    "Slot",
    "SlotRange",
    "SwitchHoldError",
    "Topology",
    "TopologyChangeError",
    "TopologyConfig",
    "Transaction",
    "TransactionAbortedError",
    "UnknownKeyError",
    "UnknownTableError",
    "UnsupportedQueryError",
    "WorkerLease",
    "WorkerLeaseError",
    "config_from_dict",
    "load_config",
    "validate_file",
    "wait_for_acks",
]
