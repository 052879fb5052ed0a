"""Review 13 (issue 10): the baseline of ``loadtest/run --compare`` reads through SQLAlchemy's
pool (a ping at checkout, a ROLLBACK at return) while the router reads on lean autocommit
connections (shardrouter/engine/readpool.py: one round trip). The router/baseline ratio of
README ("0.98x, >= 0.9 target") compares the router against a baseline handicapped on every
read. Counted on a real MariaDB server (the session sandbox), by the server's own counters."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, text

from shardrouter import Router, Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import apply

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
import baseline as baselines  # noqa: E402  (loadtest/ is a folder of scripts, not a package)

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

READS = 200
SQL = "SELECT order_id FROM orders WHERE order_id = :o"


def _counters(engine: Engine) -> dict[str, int]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT VARIABLE_NAME, VARIABLE_VALUE FROM information_schema.GLOBAL_STATUS"
                " WHERE VARIABLE_NAME IN ('COM_ROLLBACK', 'COM_ADMIN_COMMANDS', 'COM_SELECT')"
            )
        ).all()
    return {str(k).lower(): int(v) for k, v in rows}


def _extra_per_read(engine: Engine, read: object) -> float:
    """Round trips other than the SELECT itself (ROLLBACKs, pings) per read, on the server."""
    before = _counters(engine)
    for _ in range(READS):
        read()  # type: ignore[operator]
    after = _counters(engine)
    extra = (after["com_rollback"] - before["com_rollback"]) + (
        after["com_admin_commands"] - before["com_admin_commands"]
    )
    return extra / READS


def test_the_baseline_reads_with_no_more_round_trips_than_the_router(
    shard_databases: Path,
) -> None:
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    # One order id that routes to s0; the baseline database is s0's own (same server).
    user = next(u for u in range(1, 1000) if topology.shard_for("orders", u) == "s0")
    order_id = topology.id_generator("orders").next_id(user_id=user)
    url = topology.shards["s0"].primary
    server = url.set(database="").render_as_string(hide_password=False)
    observer = create_engine(server)
    with observer.begin() as conn:  # the baseline's own database, on s0's server
        conn.execute(text("DROP DATABASE IF EXISTS review13_baseline"))
        conn.execute(text("CREATE DATABASE review13_baseline"))
    plain_url = url.set(database="review13_baseline").render_as_string(hide_password=False)
    baselines.create_schema(plain_url)
    router = Router(topology)
    plain = baselines.PlainDatabase(plain_url, topology)
    try:
        router.execute(SQL, {"o": order_id})  # warm both pools
        plain.execute(SQL, {"o": order_id})
        routed = _extra_per_read(observer, lambda: router.execute(SQL, {"o": order_id}))
        base = _extra_per_read(observer, lambda: plain.execute(SQL, {"o": order_id}))
    finally:
        plain.close()
        router.close()
        with observer.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS review13_baseline"))
        observer.dispose()
    # The router reads in one round trip; the baseline's read should cost no more.
    assert base <= routed + 0.05, (
        f"baseline: {base:.2f} extra round trips per read (ROLLBACK at return, ping at"
        f" checkout), router: {routed:.2f}"
    )
