"""``shardctl demo --reshard``: an online split from 2 shards to 4 on a MariaDB sandbox the demo
starts and stops itself (the movers need MariaDB: triggers, information_schema), while a
writer keeps placing, paying and cancelling orders through a router that follows the meta
store. Every write the router acknowledged is kept in a ledger; at the end the shards must
hold exactly what the ledger says, each row on the shard that owns its slot.
"""

from __future__ import annotations

import copy
import random
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from ..control.store import MetaStore
from ..core.config import config_from_dict
from ..core.topology import Topology
from ..engine.engines import ShardEngines
from ..engine.router import Router
from ..reshard import state
from ..reshard.plan import plan_to
from ..reshard.workflow import Options, Workflow
from . import sandbox as sb
from .schema import apply

META = {"poll_interval_s": 0.5, "fast_poll_interval_s": 0.05, "lease_s": 4.0}
INSERT = (
    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents, created_at)"
    " VALUES (:o, :u, :m, 'new', :a, '2026-11-30 12:00:00')"
)


class _Writer(threading.Thread):
    """Places, pays and cancels orders through its own router; ``orders`` is the ledger of
    what the router acknowledged (order id -> (user, status)); ``failed`` what it refused."""

    def __init__(self, topology_path: Path) -> None:
        super().__init__(daemon=True)
        self.router = Router.load(topology_path)
        self.stop = threading.Event()
        self.orders: dict[int, tuple[int, str]] = {}
        self.failed: list[str] = []
        self.writes = 0
        self._rng = random.Random(7)
        self._seq = 0

    def run(self) -> None:
        layout = self.router.topology.id_layout
        try:
            while not self.stop.is_set():
                roll = self._rng.random()
                try:
                    if roll < 0.6 or not self.orders:
                        user = self._rng.randrange(1, 5000)
                        self._seq += 1
                        slot = self.router.route_key(user_id=user)[1]
                        order = int(layout.compose(self._seq, slot, 1, 0))
                        self.router.execute(
                            INSERT,
                            {
                                "o": order,
                                "u": user,
                                "m": self._rng.randrange(1, 9),
                                "a": self._rng.randrange(100, 99_999),
                            },
                        )
                        self.orders[order] = (user, "new")
                    elif roll < 0.85:
                        order = self._rng.choice(list(self.orders))
                        self.router.execute(
                            "UPDATE orders SET status = 'paid' WHERE order_id = :o", {"o": order}
                        )
                        self.orders[order] = (self.orders[order][0], "paid")
                    else:
                        order = self._rng.choice(list(self.orders))
                        self.router.execute("DELETE FROM orders WHERE order_id = :o", {"o": order})
                        del self.orders[order]
                    self.writes += 1
                except Exception as exc:  # counted and shown: the demo's point is that none fail
                    self.failed.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.002)
        finally:
            self.router.close()


def _database(url: str, name: str) -> str:
    server = make_url(url).set(database="")
    engine = create_engine(server.render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def run_reshard_demo(
    say: Callable[[str], None], *, port: int = 3461, directory: Path | None = None
) -> Mapping[str, Any]:
    """The tour; returns its figures (for tests and ``--json``). The sandbox is stopped on
    every exit path."""
    root = directory or Path(tempfile.mkdtemp(prefix="shardrouter-reshard-demo-"))
    say(f"starting 4 MariaDB instances on ports {port}..{port + 3} in {root} ...")
    box = sb.up(root, shards=4, base_port=port)
    try:
        return _tour(box, root, say)
    finally:
        sb.down(root)
        say("sandbox stopped")


def split_cluster(
    box: sb.Sandbox, meta: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(before, after) topology documents on a 4-instance sandbox: s0 and s1 owning half the
    slots each, then split into s0..s3; a meta store database ``shardmeta`` on the first
    instance (with ``meta`` settings), the schema applied to s0 and s1. The demo's and
    tools/bench_switch.py's cluster."""
    four = yaml.safe_load(box.topology_path.read_text())
    four["meta"] = {"url": _database(box.shards[0].url, "shardmeta"), **meta}
    before = copy.deepcopy(four)
    before["shards"] = {
        "s0": {**four["shards"]["s0"], "slots": [[0, 512]]},
        "s1": {**four["shards"]["s1"], "slots": [[512, 1024]]},
    }
    after = copy.deepcopy(four)
    for name, slots in (
        ("s0", [0, 256]),
        ("s2", [256, 512]),
        ("s1", [512, 768]),
        ("s3", [768, 1024]),
    ):
        after["shards"][name]["slots"] = [slots]
    topology = Topology(config_from_dict(before))
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    return before, after


def _tour(box: sb.Sandbox, root: Path, say: Callable[[str], None]) -> Mapping[str, Any]:
    before, after = split_cluster(box, META)
    store = MetaStore(before["meta"]["url"])
    try:
        store.init()
        version = store.push(before, expected=None, comment="two shards")
        path = root / "two-shards.yaml"
        path.write_text(yaml.safe_dump(before))
        say(f"version {version}: s0 owns slots [0, 512), s1 [512, 1024); a writer starts")
        writer = _Writer(path)
        writer.start()
        time.sleep(1.0)
        plan = plan_to(store.get(version).document, after, base_version=version)
        state.create(store, plan)
        say(f"planned {plan.migration_id}:")
        for line in plan.describe()[1:]:
            say(f"  {line.strip()}")
        timeline: list[dict[str, Any]] = []
        with Workflow(store, plan.migration_id, Options(chunk=500, freeze_timeout_s=2.0)) as flow:
            for action in ("start", "copy", "verify", "switch", "finalize"):
                before_writes = writer.writes
                t0 = time.monotonic()
                flow.act(action)
                took = time.monotonic() - t0
                time.sleep(0.5)  # writes go on between the phases
                timeline.append(
                    {
                        "action": action,
                        "seconds": round(took, 3),
                        "writes_meanwhile": writer.writes - before_writes,
                    }
                )
                say(
                    f"  {action:<9} {took * 1000:7.0f} ms   phase {flow.migration.phase:<10}"
                    f" writes so far {writer.writes} (failed {len(writer.failed)})"
                )
            status = flow.status()
        writer.stop.set()
        writer.join(timeout=30)
        final = Topology(config_from_dict({k: v for k, v in after.items() if k != "meta"}))
        found, misplaced = _orders(final)
        expected = {o: v for o, v in writer.orders.items()}
        lost = sorted(set(expected) - set(found))
        extra = sorted(set(found) - set(expected))
        wrong = sorted(o for o in set(found) & set(expected) if found[o] != expected[o])
        say(
            f"ledger: {len(expected)} orders acknowledged; on the shards: {len(found)};"
            f" lost {len(lost)}, extra {len(extra)}, wrong {len(wrong)}, misplaced"
            f" {len(misplaced)}; failed writes {len(writer.failed)}"
        )
        if status.get("switch"):
            say(f"the switch held writes for {status['switch']['freeze_s'] * 1000:.0f} ms")
        return {
            "migration": plan.migration_id,
            "phase": status["phase"],
            "timeline": timeline,
            "writes": writer.writes,
            "failed_writes": writer.failed[:5],
            "orders": len(expected),
            "lost": lost[:5],
            "extra": extra[:5],
            "wrong": wrong[:5],
            "misplaced": misplaced[:5],
            "freeze_s": (status.get("switch") or {}).get("freeze_s"),
        }
    finally:
        store.close()


def _orders(topology: Topology) -> tuple[dict[int, tuple[int, str]], list[str]]:
    engines = ShardEngines(topology)
    found: dict[int, tuple[int, str]] = {}
    misplaced: list[str] = []
    try:
        for shard in topology.shards:
            with engines.primary(shard).connect() as conn:
                for physical in topology.table("orders").physical_names:
                    rows = conn.execute(text(f"SELECT order_id, user_id, status FROM {physical}"))
                    for order, user, status in rows:
                        found[int(order)] = (int(user), str(status))
                        if topology.shard_for("orders", user) != shard:
                            misplaced.append(f"order {order} on {shard}")
    finally:
        engines.dispose()
    return found, misplaced


__all__ = ["run_reshard_demo", "split_cluster"]
