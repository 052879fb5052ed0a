"""shardrouter: the sharding layer for Python order services on MySQL."""

from __future__ import annotations

from .config import TopologyConfig as TopologyConfig
from .config import config_from_dict as config_from_dict
from .config import load_config as load_config
from .config import validate_file as validate_file
from .errors import ClockMovedBackwardsError as ClockMovedBackwardsError
from .errors import ConfigError as ConfigError
from .errors import IdDecodeError as IdDecodeError
from .errors import IdError as IdError
from .errors import KeyValueError as KeyValueError
from .errors import RoutingError as RoutingError
from .errors import ShardRouterError as ShardRouterError
from .errors import UnknownKeyError as UnknownKeyError
from .errors import UnknownTableError as UnknownTableError
from .ids import DecodedId as DecodedId
from .ids import IdGenerator as IdGenerator
from .ids import IdLayout as IdLayout
from .topology import Route as Route
from .topology import SlotRange as SlotRange
from .topology import Topology as Topology
from .types import KeyspaceId as KeyspaceId
from .types import KeyType as KeyType
from .types import ShardId as ShardId
from .types import Slot as Slot

__version__ = "0.1.0"

__all__ = [
    "ClockMovedBackwardsError",
    "ConfigError",
    "DecodedId",
    "IdDecodeError",
    "IdError",
    "IdGenerator",
    "IdLayout",
    "KeyType",
    "KeyValueError",
    "KeyspaceId",
    "Route",
    "RoutingError",
    "ShardId",
    "ShardRouterError",
    "Slot",
    "SlotRange",
    "Topology",
    "TopologyConfig",
    "UnknownKeyError",
    "UnknownTableError",
    "config_from_dict",
    "load_config",
    "validate_file",
]
