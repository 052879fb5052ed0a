"""The small hand-driven clusters of the ORM-hold tests (test_reshard_orm_hold.py,
test_reshard_review12.py): two fresh shard databases with the orders schema and a plain
sharded table, ORM models for them, and versions that freeze and switch one slot, installed
into a router by hand as its follower would."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from reshard_cluster import apply_schema, drop_database, fresh_database
from sqlalchemy import BigInteger, Engine, String, create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router

NOTES_DDL = (
    "CREATE TABLE oh_notes (id BIGINT PRIMARY KEY, account_id BIGINT NOT NULL,"
    " v VARCHAR(32) NOT NULL)"
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))


class Note(Base):
    """A sharded table without lookup rows (oh_notes by account_id)."""

    __tablename__ = "oh_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(BigInteger)
    v: Mapped[str] = mapped_column(String(32))


@dataclass
class Cluster:
    doc: dict[str, Any]
    """The 2-shard version (s0 [0, 512), s1 [512, 1024))."""
    engines: dict[str, Engine] = field(default_factory=dict)

    def topology(self) -> Topology:
        return Topology(config_from_dict(self.doc))

    def rows(self, shard: str, sql: str) -> list[tuple[Any, ...]]:
        if shard not in self.engines:
            self.engines[shard] = create_engine(self.doc["shards"][shard]["primary"])
        with self.engines[shard].connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

    def raw(self, shard: str, sql: str) -> None:
        self.rows(shard, "SELECT 1")  # (the engine, made once)
        with self.engines[shard].begin() as conn:
            conn.exec_driver_sql(sql)

    def everywhere(self, sql: str) -> dict[str, list[tuple[Any, ...]]]:
        return {shard: self.rows(shard, sql) for shard in ("s0", "s1")}


@contextlib.contextmanager
def hold_clusters(shard_databases: Path, prefix: str) -> Iterator[Callable[[str], Cluster]]:
    """``make(tag)``: a 2-shard cluster (s0 [0, 512), s1 [512, 1024), no meta store) with the
    orders schema and ``oh_notes``, in databases ``<prefix>_<tag>_s0/s1``, dropped after."""
    made: list[tuple[Cluster, list[str]]] = []

    def make(tag: str) -> Cluster:
        doc = yaml.safe_load(shard_databases.read_text())
        doc.pop("meta", None)
        doc["tables"]["oh_notes"] = {"column": "account_id", "strategy": "hash"}
        urls: list[str] = []
        shards = {}
        for name, slots in (("s0", [[0, 512]]), ("s1", [[512, 1024]])):
            url = fresh_database(doc["shards"][name]["primary"], f"{prefix}_{tag}_{name}")
            urls.append(url)
            engine = create_engine(url)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(NOTES_DDL)
            finally:
                engine.dispose()
            shards[name] = {**doc["shards"][name], "primary": url, "slots": slots}
        doc["shards"] = shards
        apply_schema(doc)
        cluster = Cluster(doc)
        made.append((cluster, urls))
        return cluster

    try:
        yield make
    finally:
        for cluster, urls in made:
            for engine in cluster.engines.values():
                engine.dispose()
            for url in urls:
                drop_database(url)


def frozen_and_switched(
    doc: dict[str, Any], slot: int, hold_s: float = 5.0
) -> tuple[Topology, Topology]:
    """(frozen, switched) versions of ``doc`` for ``slot`` moving s0 -> s1, as the workflow
    pushes them (installed by hand into a router, as its follower would)."""
    frozen = copy.deepcopy(doc)
    frozen["moving"] = [
        {
            "slots": [slot, slot + 1],
            "source": "s0",
            "target": "s1",
            "write_mode": "frozen",
            "hold_s": hold_s,
            "migration": "m-hand",
        }
    ]
    switched = copy.deepcopy(frozen)
    start, end = switched["shards"]["s0"]["slots"][0]
    switched["shards"]["s0"]["slots"] = [r for r in ([start, slot], [slot + 1, end]) if r[0] < r[1]]
    switched["shards"]["s1"]["slots"] = [[slot, slot + 1], *switched["shards"]["s1"]["slots"]]
    switched["moving"][0]["write_mode"] = "dual_new_primary"
    return Topology(config_from_dict(frozen)), Topology(config_from_dict(switched))


def values_in_slots(
    topology: Topology, table: str, lo: int, hi: int, n: int, start: int = 1
) -> list[int]:
    found = [v for v in range(start, start + 100_000) if lo <= topology.slot_for(table, v) < hi]
    assert len(found) >= n
    return found[:n]


def email_shard(topology: Topology, email: str) -> str:
    return str(topology.shard_of_slot(topology.slot_for("user_emails", email)))


def switch_later(router: Router, switched: Topology, after_s: float) -> threading.Timer:
    timer = threading.Timer(after_s, lambda: router._install(switched))
    timer.start()
    return timer
