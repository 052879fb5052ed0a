"""A DELETE's lookup cleanup beside the journal triggers' DDL (found by the rollback and crash
tests: orphan merchant_orders rows after start/finalize/rollback/cancel under writes).

``journal.install`` / ``remove`` run ``CREATE TRIGGER`` / ``DROP TRIGGER`` on the owner's
physical table; while such a DDL waits for the table's exclusive metadata lock (an open
transaction touched the table), every new statement on the table queues behind it. The
cleanup after an owner's DELETE checked the owner with a ``FOR SHARE NOWAIT`` read
(execution._owner_check): NOWAIT failed at once on that queued metadata lock, the cleanup
took it for "an owner in flight" and kept the lookup row, an orphan that nothing removes
until ``shardctl check lookups --fix`` ran. This test makes that interleaving deterministic: the
cleanup is held on a row lock of its lookup row until the DDL waits, then released.
Fixed by execution.OwnerCheck: the check still never waits for a row lock (an owner in
flight) but waits for the metadata lock, as every statement on the table does.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import Cluster, build_cluster
from reshard_load import DELETE_ORDER, INSERT_ORDER, INSERT_USER
from sqlalchemy import text

from shardrouter.engine.router import Router
from shardrouter.reshard import journal
from shardrouter.reshard.spec import describe_table

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(60)]

MERCHANT = 7


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_dl") as made:
        yield made


def _wait(condition: Any, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("ddl", [True, False], ids=["trigger-ddl-waiting", "no-ddl"])
def test_delete_beside_trigger_ddl_leaves_no_orphan_lookup_row(cluster: Cluster, ddl: bool) -> None:
    """``no-ddl`` is the control: the same interleaving without the DDL removes the row."""
    router = Router(cluster.current())  # no meta: not registered, nothing to acknowledge
    engines = cluster.engines()
    topology = router.topology
    user = 1
    slot = topology.slot_for("orders", user)
    order = int(topology.id_layout.compose(1, slot, 0, 0))
    owner_shard = topology.shard_for("orders", user)
    owner_table = topology.table("orders").physical(slot)
    lookup_slot = topology.slot_for("merchant_orders", MERCHANT)
    lookup_shard = topology.shard_for("merchant_orders", MERCHANT)
    lookup_table = topology.table("merchant_orders").physical(lookup_slot)
    lookup_row = f"SELECT order_id FROM {lookup_table} WHERE merchant_id = :m AND order_id = :o"
    router.execute(INSERT_USER, {"u": user, "e": "u1@example.com", "n": "one"})
    router.execute(INSERT_ORDER, {"o": order, "u": user, "m": MERCHANT, "a": 100})
    owner_engine = engines.primary(owner_shard)
    lookup_engine = engines.primary(lookup_shard)
    with owner_engine.connect() as conn:
        spec = describe_table(conn, owner_table, logical="orders", shard_column="user_id")
    reader = owner_engine.connect()  # an open transaction that read the owner's table
    reader.execute(text(f"SELECT COUNT(*) FROM {owner_table}"))
    locker = lookup_engine.connect()  # holds the lookup row: the cleanup waits there
    locker.execute(text(lookup_row + " FOR UPDATE"), {"m": MERCHANT, "o": order})
    outcome: dict[str, Any] = {}

    def delete() -> None:
        try:
            outcome["rowcount"] = router.execute(DELETE_ORDER, {"o": order}).rowcount
        except Exception as exc:  # reported below
            outcome["error"] = exc

    def install() -> None:
        try:
            journal.install(owner_engine, [spec])
        except Exception as exc:
            outcome["ddl_error"] = exc

    def waiting(engine: Any, sql: str) -> bool:
        with engine.connect() as conn:
            return bool(conn.execute(text(sql)).scalar())

    deleting = threading.Thread(target=delete)
    installing = threading.Thread(target=install)
    try:
        deleting.start()  # the owner row goes; its cleanup waits on the locked lookup row
        _wait(
            lambda: waiting(
                lookup_engine,
                "SELECT COUNT(*) FROM information_schema.processlist"
                f" WHERE info LIKE 'DELETE FROM {lookup_table} %'",
            ),
            "the cleanup waits for the lookup row",
            timeout=10,  # under the router's lock wait (15 s): the cleanup must still wait
        )
        if ddl:
            installing.start()  # CREATE TRIGGER waits for the reader's metadata lock
            _wait(
                lambda: waiting(
                    owner_engine,
                    "SELECT COUNT(*) FROM information_schema.processlist"
                    " WHERE state LIKE 'Waiting for table metadata lock%'",
                ),
                "the trigger DDL waits for the table",
            )
        locker.rollback()  # the cleanup goes on: its owner check meets the queued DDL
        deleting.join(20)
        reader.rollback()  # the DDL goes on
    finally:
        locker.close()
        reader.close()
        deleting.join(20)
        if installing.is_alive():
            installing.join(30)
    try:
        assert "error" not in outcome and outcome.get("rowcount") == 1, outcome
        assert "ddl_error" not in outcome, outcome
        assert bool(journal.installed_triggers(owner_engine)) == ddl, "the DDL did not complete"
        with lookup_engine.connect() as conn:
            left = conn.execute(text(lookup_row), {"m": MERCHANT, "o": order}).all()
        # The owner is gone: its lookup row must be gone too, not kept as an orphan.
        assert left == [], f"orphan lookup row {lookup_table} ({MERCHANT}, {order}) kept"
    finally:
        if ddl:
            journal.remove(owner_engine, [spec])
        router.close()
        engines.dispose()
