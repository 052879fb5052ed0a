"""Fixtures of the unit suite: the shipped topologies, loaded once. No database is needed here."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from control_cluster import make_cluster

from shardrouter.control.store import MetaStore
from shardrouter.core.topology import Topology

REPO = Path(__file__).resolve().parents[2]
ORDERS_YAML = REPO / "config" / "orders.yaml"
ORDERS_SQLITE_YAML = REPO / "config" / "orders-sqlite.yaml"

# No env var set: ${SHARDROUTER_DB_PASSWORD:-} falls back to its default, whatever the shell has.
EMPTY_ENV: dict[str, str] = {}


@pytest.fixture(scope="session")
def orders_topology() -> Topology:
    """config/orders.yaml: 1024 slots on four shards of 256 slots each."""
    return Topology.load(ORDERS_YAML, EMPTY_ENV)


@pytest.fixture(scope="session")
def _orders_raw() -> dict[str, Any]:
    with ORDERS_YAML.open(encoding="utf-8") as f:
        raw: dict[str, Any] = yaml.safe_load(f)
    return raw


@pytest.fixture
def orders_raw(_orders_raw: dict[str, Any]) -> dict[str, Any]:
    """A fresh deep copy of config/orders.yaml as parsed YAML: mutate it freely."""
    return copy.deepcopy(_orders_raw)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[dict[str, Any], MetaStore]]:
    """A SQLite cluster following a SQLite meta store (tests/unit/control_cluster.py)."""
    raw, store = make_cluster(tmp_path)
    try:
        yield raw, store
    finally:
        store.close()
