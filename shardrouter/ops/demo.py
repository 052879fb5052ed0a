"""The ``shardctl demo`` tour: an order service's day on SQLite shard files, each route shown."""

from __future__ import annotations

import datetime as dt
import itertools
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..core.topology import Topology
from ..engine.engines import ShardEngines
from ..engine.router import Router
from ..sql.execution import ResultSet
from ..types import ShardId, Slot
from .schema import apply as apply_schema

DEMO_USERS: tuple[tuple[int, str], ...] = (
    (42, "ada@example.com"),
    (1001, "grace@example.com"),
    (77777, "linus@example.com"),
    (314159, "barbara@example.com"),
    (8675309, "edsger@example.com"),
)
MERCHANT = 500


def _route(result: ResultSet) -> str:
    """How a statement travelled, in words."""
    where = ", ".join(result.shards)
    how = (
        "every shard"
        if result.scatter
        else f"shard {where}"
        if len(result.shards) == 1
        else (f"shards {where}")
    )
    via = f" via lookup on {', '.join(dict.fromkeys(result.lookups))}" if result.lookups else ""
    return f"[{how}{via}]"


def run_demo(config: Path, directory: Path, say: Callable[[str], None]) -> Mapping[str, Any]:
    """Run the tour against SQLite files in ``directory``; returns figures for tests."""
    directory.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, SHARDROUTER_DEMO_DIR=str(directory.resolve()))
    topology = Topology.load(config, env)
    for spec in topology.shards.values():  # a fresh tour: the shard files are the demo's own
        if spec.primary.database:
            Path(spec.primary.database).unlink(missing_ok=True)
    say(
        f"topology {topology.name!r} v{topology.version}: {topology.slots} slots on"
        f" {len(topology.shards)} SQLite shards in {directory}"
    )
    for sid, spec in topology.shards.items():
        ranges = ", ".join(f"{r} (Vitess {r.keyrange(topology.slot_bits)})" for r in spec.ranges)
        say(f"  {sid}: slots {ranges}")

    engines = ShardEngines(topology)
    router = Router(topology, engines=engines)
    try:
        report = apply_schema(topology, engines)
        report.raise_for_errors()
        versions = sorted({v for s in report.shards for v in s.applied})
        say(f"\nschema: migrations {versions} applied to every shard (orders split in 4 tables)")
        figures = dict(_tour(topology, router, say))
    finally:
        router.close()
    figures["control"] = _control_plane(config, directory, env, say)
    return figures


def _control_plane(
    config: Path, directory: Path, env: Mapping[str, str], say: Callable[[str], None]
) -> Mapping[str, Any]:
    """The control plane on a SQLite meta store: publish the topology, a router following it,
    a live change (a new, empty shard) acknowledged, and a change that would move data
    refused."""
    import yaml

    from ..control.registry import wait_for_acks
    from ..control.store import MetaStore
    from ..control.versions import push_file
    from ..core.config import load_config, parse_yaml
    from ..errors import TopologyChangeError

    meta_db = directory / "meta.db"
    meta_db.unlink(missing_ok=True)
    raw = parse_yaml(config.read_text(encoding="utf-8"), str(config))
    raw["meta"] = {"url": f"sqlite:///{meta_db}", "poll_interval_s": 0.1, "lease_s": 3.0}
    v1 = directory / "topology-v1.yaml"
    v1.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    say(f"\nthe control plane (meta store {meta_db.name}: versions, routers, leases):")
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        first = push_file(store, v1, comment="the demo topology", env=env)
        say(f"  published v{first.version} from {v1.name}")
        follower = Router.from_config(load_config(v1, env), env=env)
        try:
            say(f"  a router follows it: serves v{follower.version}, registered in the store")
            new = next(
                f"s{n}" for n in itertools.count(len(raw["shards"])) if f"s{n}" not in raw["shards"]
            )
            raw["shards"][new] = {
                "primary": f"sqlite:///${{SHARDROUTER_DEMO_DIR:-.shardrouter-demo}}/orders_{new}.db",
                "slots": [],
            }
            v2 = directory / "topology-v2.yaml"
            v2.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
            grown = Topology(load_config(v2, env))
            Path(grown.shards[ShardId(new)].primary.database or "").unlink(missing_ok=True)
            engines = ShardEngines(grown)
            try:  # the new shard gets the schema before any router can send it statements
                apply_schema(grown, engines).raise_for_errors()
            finally:
                engines.dispose()
            second = push_file(store, v2, comment="a new, empty shard s4", env=env)
            assert second.version is not None
            report = wait_for_acks(store, second.version, timeout=10.0)
            say(
                f"  pushed v{second.version} (shard {new}, no slots yet): acknowledged by"
                f" {len(report.acked)} router(s) in {report.waited_s * 1000:.0f} ms; the router"
                f" now serves v{follower.version}, shards {', '.join(follower.topology.shards)}"
            )
            last = grown.shard_of_slot(Slot(grown.slots - 1))  # give the new shard its tail
            start, end = raw["shards"][last]["slots"][-1]
            cut = end - max(1, (end - start) // 10)
            raw["shards"][last]["slots"][-1] = [start, cut]
            raw["shards"][new]["slots"] = [[cut, end]]
            v3 = directory / "topology-v3.yaml"
            v3.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
            try:
                push_file(store, v3, env=env)
                refused = ""
            except TopologyChangeError as exc:
                refused = exc.problems[0]
            say(f"  moving slots to {new} is refused (it moves data):\n    {refused}")
            return {
                "versions": [first.version, second.version],
                "acked": report.complete,
                "serving": follower.version,
                "refused": refused,
            }
        finally:
            follower.close()


def _tour(topology: Topology, router: Router, say: Callable[[str], None]) -> Mapping[str, Any]:
    # The config's own worker id even with meta:: the tour writes only to its own shard files
    # (its ids reach no shared shard), and its control plane uses a meta store of its own.
    ids = topology.id_generator("orders", worker_id=topology.config.ids.worker_id)
    placed: dict[int, list[int]] = {}
    start = dt.datetime(2026, 11, 24, 9, 0)
    say("\nplacing users and their orders (the lookup rows are written first):")
    for n, (user_id, email) in enumerate(DEMO_USERS):
        user = router.execute(
            "INSERT INTO users (user_id, email) VALUES (:u, :e)", {"u": user_id, "e": email}
        )
        order_ids = ids.next_ids(2, user_id=user_id)
        placed[user_id] = order_ids
        values = ", ".join(f"(:o{i}, :u, :m{i}, 'new', :a{i}, :t{i})" for i in range(2))
        params: dict[str, Any] = {"u": user_id}
        for i, oid in enumerate(order_ids):
            params |= {
                f"o{i}": oid,
                f"m{i}": MERCHANT + (n + i) % 2,
                f"a{i}": 1000 * (i + 1) + n,
                f"t{i}": (start + dt.timedelta(minutes=7 * n + i)).isoformat(sep=" "),
            }
        orders = router.execute(
            "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
            f" created_at) VALUES {values}",
            params,
        )
        route = topology.route("orders", "user_id", user_id)
        say(
            f"  user {user_id:>8} -> keyspace id {route.keyspace_id:016x} -> slot"
            f" {route.slot:>4} -> {route.shard}/{route.physical_table}: user {_route(user)},"
            f" 2 orders {_route(orders)}"
        )

    say("\nreading by user id (hash):")
    user_id = DEMO_USERS[0][0]
    mine = router.execute(
        "SELECT order_id, amount_cents FROM orders WHERE user_id = :u ORDER BY order_id",
        {"u": user_id},
    )
    say(f"  user {user_id}: orders {mine.scalars()} {_route(mine)}")

    say("\nreading one order by its id alone (its gene bits carry the user's slot):")
    order_id = placed[DEMO_USERS[2][0]][1]
    decoded = topology.id_layout.decode(order_id)
    one = router.execute(
        "SELECT user_id, amount_cents FROM orders WHERE order_id = :o", {"o": order_id}
    )
    say(
        f"  order {order_id}: issued {decoded.time:%Y-%m-%d %H:%M:%S} UTC, slot {decoded.slot},"
        f" worker {decoded.worker}, seq {decoded.sequence}"
    )
    say(f"  -> user {one.one()[0]}, {one.one()[1]} cents {_route(one)}")

    say("\nreading by email (the user_emails lookup finds the user's shard):")
    email = DEMO_USERS[3][1]
    found = router.execute("SELECT user_id FROM users WHERE email = :e", {"e": email})
    say(f"  {email} -> user {found.scalar()} {_route(found)}")

    say(f"\nmerchant {MERCHANT}'s orders, newest first, pages of 2 (keyset: no OFFSET):")
    after = None
    for number in (1, 2, 3):
        page = router.page(
            "orders",
            columns=("order_id", "user_id", "created_at"),
            order_by=("created_at", "order_id"),
            where={"merchant_id": MERCHANT},
            after=after,
            limit=2,
        )
        users = [row[1] for row in page.rows]
        say(f"  page {number}: users {users}")
        if page.after is None:
            break
        after = page.after

    say("\nacross all shards (fan-out, merged as one database would answer):")
    top = router.execute(
        "SELECT user_id, amount_cents FROM orders ORDER BY amount_cents DESC, order_id LIMIT 3"
    )
    say(f"  top 3 orders by amount: {top.rows} {_route(top)}")
    totals = router.execute(
        "SELECT merchant_id, COUNT(*), SUM(amount_cents), AVG(amount_cents) FROM orders"
        " GROUP BY merchant_id ORDER BY merchant_id"
    )
    for merchant, count, total, avg in totals.rows:
        say(f"  merchant {merchant}: {count} orders, {total} cents, average {avg}")
    count = router.execute("SELECT COUNT(*) FROM orders")
    say(f"  total: {count.scalar()} orders for {len(DEMO_USERS)} users {_route(count)}")
    return {"users": len(DEMO_USERS), "orders": count.scalar(), "placed": placed}


__all__ = ["DEMO_USERS", "run_demo"]
