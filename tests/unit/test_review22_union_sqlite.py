"""Review 22 (0e80d06, Plan.render_union_types) on SQLite shards, the demo backend."""

from __future__ import annotations

from pathlib import Path

from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.schema import apply as apply_schema

CONFIG = Path(__file__).resolve().parents[2] / "config" / "orders-sqlite.yaml"


def test_union_across_targets_on_sqlite_shards(tmp_path: Path) -> None:
    """A UNION whose SELECTs run on different targets, on the SQLite topology `shardctl demo`
    uses: SELECT order_id FROM orders WHERE user_id = 3 UNION ALL SELECT order_id FROM orders
    WHERE user_id = 4 (and SELECT amount_cents FROM orders UNION ALL SELECT 1 FROM
    countries). Before 0e80d06 both answered (the members' rows, combined); now both raise
    ExecutionError 'shard s2: near "(": syntax error' after the members ran.

    Cause: _union always sends render_union_types' statement, rendered in MySQL's syntax with
    every member parenthesized - (SELECT ... LIMIT 0) UNION ALL SELECT 0 - which SQLite does
    not parse (a compound SELECT's members cannot be parenthesized there). Expected: the
    combined rows (skip the typing statement on SQLite shards, or render it for SQLite)."""
    topology = Topology.load(CONFIG, {"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    engines = ShardEngines(topology)
    apply_schema(topology, engines).raise_for_errors()
    router = Router(topology, engines=engines)
    try:
        ids = topology.id_generator("orders")
        for user in (3, 4, 5, 6, 7, 8):
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (:o, :u, 1, 'paid', 100, '2026-01-01 00:00:00.000')",
                {"o": ids.next_id(user_id=user), "u": user},
            )
        first = router.execute("SELECT order_id FROM orders WHERE user_id = 3").rows
        second = router.execute("SELECT order_id FROM orders WHERE user_id = 4").rows
        got = router.execute(
            "SELECT order_id FROM orders WHERE user_id = 3 UNION ALL"
            " SELECT order_id FROM orders WHERE user_id = 4"
        )
        assert sorted(got.rows) == sorted(first + second)
        got = router.execute("SELECT amount_cents FROM orders UNION ALL SELECT 1 FROM countries")
        assert got.rows == [(100,)] * 6
    finally:
        router.close()
