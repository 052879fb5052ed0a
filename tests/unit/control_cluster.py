"""Test helpers for the control plane on SQLite: a cluster of the shipped SQLite topology with a
``notes`` table and a meta store, all in one folder, and small waits. Used by the
test_control_* modules (the ``cluster`` fixture itself is in tests/unit/conftest.py)."""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text

from shardrouter.control.store import MetaStore
from shardrouter.engine.router import Router

SQLITE_YAML = Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml"


def document(directory: Path, **meta: Any) -> dict[str, Any]:
    """The SQLite topology with its shard files and meta store in ``directory``, fast polls and
    a 1 s lease (``meta`` overrides)."""
    raw = yaml.safe_load(SQLITE_YAML.read_text())
    for name, shard in raw["shards"].items():
        shard["primary"] = f"sqlite:///{directory}/{name}.db"
    raw["tables"]["notes"] = {"column": "user_id", "strategy": "hash"}
    raw["meta"] = {
        "url": f"sqlite:///{directory}/meta.db",
        "poll_interval_s": 0.05,
        "fast_poll_interval_s": 0.02,
        "lease_s": 1.0,
        "fence_margin_s": 0.2,
        **meta,
    }
    return raw


def make_cluster(directory: Path, **meta: Any) -> tuple[dict[str, Any], MetaStore]:
    """``document(directory)`` pushed as version 1 of a fresh store, ``notes`` on every shard."""
    raw = document(directory, **meta)
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    for name in raw["shards"]:
        engine = create_engine(f"sqlite:///{directory}/{name}.db")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)"))
        engine.dispose()
    return raw, store


def wait_until(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def moving_document(raw: dict[str, Any], start: int, end: int) -> dict[str, Any]:
    """``raw`` with slots [start, end) moving from s0 to s1."""
    doc = copy.deepcopy(raw)
    doc["moving"] = [{"slots": [start, end], "source": "s0", "target": "s1"}]
    return doc


def user_in_slots(router: Router, start: int, end: int) -> int:
    return next(u for u in range(1, 100_000) if start <= router.route_key(user_id=u)[1] < end)
