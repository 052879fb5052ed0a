"""The ``shardctl demo`` tour: place and read orders on SQLite shard files, showing each route."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    create_engine,
    func,
    insert,
    select,
)

from .topology import Topology
from .types import ShardId

DEMO_USERS: tuple[tuple[int, str], ...] = (
    (42, "ada@example.com"),
    (1001, "grace@example.com"),
    (77777, "linus@example.com"),
    (314159, "barbara@example.com"),
    (8675309, "edsger@example.com"),
)


def physical_metadata(topology: Topology) -> MetaData:
    """users / orders / order_items under their physical names (splits expanded).

    A stand-in for the versioned migrations: enough schema to show routing end to end.
    """
    md = MetaData()
    for name in topology.table("users").physical_names:
        Table(
            name,
            md,
            Column("user_id", BigInteger, primary_key=True, autoincrement=False),
            Column("email", String(255), nullable=False),
        )
    for name in topology.table("orders").physical_names:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False, index=True),
            Column("merchant_id", BigInteger, nullable=False),
            Column("amount_cents", Integer, nullable=False),
        )
    for name in topology.table("order_items").physical_names:
        Table(
            name,
            md,
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("line", Integer, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
            Column("sku", String(64), nullable=False),
        )
    for name in topology.table("merchant_orders").physical_names:
        Table(
            name,
            md,
            Column("merchant_id", BigInteger, primary_key=True, autoincrement=False),
            Column("order_id", BigInteger, primary_key=True, autoincrement=False),
            Column("user_id", BigInteger, nullable=False),
        )
    return md


@contextmanager
def shard_engines(topology: Topology) -> Iterator[dict[ShardId, Engine]]:
    """One engine per shard primary, disposed on exit."""
    engines = {sid: create_engine(spec.primary) for sid, spec in topology.shards.items()}
    try:
        yield engines
    finally:
        for engine in engines.values():
            engine.dispose()


def run_demo(config: Path, directory: Path, say: Callable[[str], None]) -> Mapping[str, Any]:
    """Run the tour against SQLite files in ``directory``; returns figures for tests."""
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SHARDROUTER_DEMO_DIR=str(directory.resolve()))
    topology = Topology.load(config, env)
    say(
        f"topology {topology.name!r} v{topology.version}: {topology.slots} slots on"
        f" {len(topology.shards)} SQLite shards in {directory}"
    )
    for sid, spec in topology.shards.items():
        ranges = ", ".join(f"{r} (Vitess {r.keyrange(topology.slot_bits)})" for r in spec.ranges)
        say(f"  {sid}: slots {ranges}")

    md = physical_metadata(topology)
    ids = topology.id_generator("orders")
    placed: dict[int, list[int]] = {}
    with shard_engines(topology) as engines:
        for engine in engines.values():
            md.drop_all(engine)
            md.create_all(engine)
        say("\nplacing users and their orders (each write goes to exactly one shard):")
        for n, (user_id, email) in enumerate(DEMO_USERS):
            route = topology.route("users", "user_id", user_id)
            assert route.shard is not None and route.slot is not None
            order_ids = ids.next_ids(2, user_id=user_id)
            placed[user_id] = order_ids
            orders_table = md.tables[topology.table("orders").physical(route.slot)]
            users_table = md.tables[topology.table("users").physical(route.slot)]
            with engines[route.shard].begin() as conn:
                conn.execute(insert(users_table), {"user_id": user_id, "email": email})
                conn.execute(
                    insert(orders_table),
                    [
                        {
                            "order_id": oid,
                            "user_id": user_id,
                            "merchant_id": 500 + n % 2,
                            "amount_cents": 1000 * (i + 1) + n,
                        }
                        for i, oid in enumerate(order_ids)
                    ],
                )
            say(
                f"  user {user_id:>8} -> keyspace id {route.keyspace_id:016x} -> slot"
                f" {route.slot:>4} -> shard {route.shard} ({orders_table.name});"
                f" orders {order_ids[0]}, {order_ids[1]}"
            )

        say("\nreading one order by its id alone (the gene bits carry the user's slot):")
        user_id = DEMO_USERS[2][0]
        order_id = placed[user_id][1]
        decoded = topology.id_layout.decode(order_id)
        by_gene = topology.route("orders", "order_id", order_id)
        assert by_gene.shard is not None and by_gene.physical_table is not None
        with engines[by_gene.shard].connect() as conn:
            table = md.tables[by_gene.physical_table]
            row = conn.execute(select(table).where(table.c.order_id == order_id)).one()
        say(
            f"  order {order_id}: issued {decoded.time:%Y-%m-%d %H:%M:%S.%f}"[:-3]
            + f" UTC, slot {decoded.slot}, worker {decoded.worker}, seq {decoded.sequence}"
        )
        say(
            f"  -> shard {by_gene.shard} ({by_gene.physical_table}) found user {row.user_id},"
            f" {row.amount_cents} cents; user {user_id} routes to"
            f" {topology.shard_for('users', user_id)} too"
        )

        say("\ncounting orders on every shard (a scatter read; the router merges in issue 3):")
        total = 0
        for sid, engine in engines.items():
            with engine.connect() as conn:
                count = sum(
                    conn.execute(select(func.count()).select_from(md.tables[name])).scalar_one()
                    for name in topology.table("orders").physical_names
                )
            total += count
            say(f"  {sid}: {count} orders")
        say(f"  total: {total} orders for {len(DEMO_USERS)} users")
    return {"users": len(DEMO_USERS), "orders": total, "placed": placed}


__all__ = ["DEMO_USERS", "physical_metadata", "run_demo", "shard_engines"]
