"""Review 13 (issue 10, the load-test kit): cases where loadtest/ledger.py's check PASSES
although the cluster holds data no acknowledged (or possibly-run) write could have left, on real
MariaDB shards (the session sandbox), read directly as the check reads them."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shard_tables import empty_tables
from sqlalchemy import Engine, create_engine, text

from shardrouter import Router, Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import apply

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
import ledger as ledgers  # noqa: E402  (loadtest/ is a folder of scripts, not a package)
import order_service as svc  # noqa: E402

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def topology(shard_databases: Path) -> Topology:
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    return topology


@pytest.fixture
def world(topology: Topology, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """Emptied order tables, a plain engine per shard, the service, a ledger writer."""
    engines: dict[str, Engine] = {
        name: create_engine(topology.shards[name].primary.render_as_string(hide_password=False))
        for name in topology.shards
    }
    router = Router(topology)
    empty_tables(router, ("orders", "order_items", "merchant_orders"))
    service = svc.OrderService(router)
    writer = ledgers.LedgerWriter(tmp_path, "test")
    try:
        yield {"engines": engines, "service": service, "writer": writer, "dir": tmp_path}
    finally:
        writer.close()
        service.close()
        router.close()
        for engine in engines.values():
            engine.dispose()


def _place(topology: Topology, order_id: int) -> tuple[str, str, str]:
    """(shard, orders table, order_items table) of an order, by its id's slot."""
    slot = int(topology.slot_for("orders", order_id, "order_id"))
    return (
        topology.shard_of_slot(slot),
        topology.table("orders").physical(slot),
        topology.table("order_items").physical(slot),
    )


def _check(world: dict[str, Any], topology: Topology) -> ledgers.Report:
    world["writer"].close()
    return ledgers.check_directory(world["dir"], topology)


def test_item_lines_left_by_an_uncertain_place_without_their_order_fail_the_check(
    world: dict[str, Any], topology: Topology
) -> None:
    """place_order is one transaction: its item lines can never be stored without their order.
    An order whose placing ended in doubt (ledger ok=None, present None) found as item lines
    alone is a torn transaction; ledger.check only reports orphan lines of orders the ledger
    does not know or knows purged (ledger.py:296-299), so this passes."""
    service: svc.OrderService = world["service"]
    key = service.new_order_key(11)
    service.place_order(11, 5, [svc.Item("a", 1, 100), svc.Item("b", 2, 50)], key)
    world["writer"].placed(key, 11, 5, 2, None)  # every attempt failed: outcome unknown
    shard, orders_table, _ = _place(topology, key)
    with world["engines"][shard].begin() as conn:  # the order row lost, its lines kept
        conn.execute(text(f"DELETE FROM {orders_table} WHERE order_id = :o"), {"o": key})
    report = _check(world, topology)
    assert not report.ok, report.lines()


def test_item_lines_left_by_an_uncertain_purge_without_their_order_fail_the_check(
    world: dict[str, Any], topology: Topology
) -> None:
    """purge deletes the order and its lines in one transaction: a purge in doubt (ok=None)
    may leave both or neither, never the lines alone."""
    service: svc.OrderService = world["service"]
    writer = world["writer"]
    key = service.new_order_key(12)
    service.place_order(12, 6, [svc.Item("a", 1, 100)], key)
    writer.placed(key, 12, 6, 1, True)
    assert service.cancel(key)
    writer.moved(key, "new", "cancelled", True)
    writer.purged(key, None)  # the purge's outcome unknown
    shard, orders_table, _ = _place(topology, key)
    with world["engines"][shard].begin() as conn:  # half a purge: the order gone, lines kept
        conn.execute(text(f"DELETE FROM {orders_table} WHERE order_id = :o"), {"o": key})
    report = _check(world, topology)
    assert not report.ok, report.lines()


def test_a_lookup_row_that_sends_the_merchant_page_elsewhere_fails_the_check(
    world: dict[str, Any], topology: Topology
) -> None:
    """ledger.check calls a lookup row present when (merchant_id, order_id) exists on the
    lookup's shard (ledger.py:193-195, 284-289): the row's user_id, which the merchant page
    routes by, is never read. A lookup row naming a user on another shard hides the order from
    the merchant's page (what 'lookup missing' is there to catch), and the check passes."""
    service: svc.OrderService = world["service"]
    user, merchant = 21, 9
    key = service.new_order_key(user)
    service.place_order(user, merchant, [svc.Item("a", 1, 100)], key)
    world["writer"].placed(key, user, merchant, 1, True)
    assert [o.order_id for o in service.merchant_orders(merchant)] == [key]
    home = topology.shard_for("orders", user)
    stranger = next(u for u in range(1000, 5000) if topology.shard_for("orders", u) != home)
    lookup_shard = topology.shard_for("merchant_orders", merchant)
    (physical,) = {
        topology.table("merchant_orders").physical(int(topology.slot_for("merchant_orders", m)))
        for m in (merchant,)
    }
    with world["engines"][lookup_shard].begin() as conn:
        conn.execute(
            text(f"UPDATE {physical} SET user_id = :u WHERE order_id = :o"),
            {"u": stranger, "o": key},
        )
    assert [o.order_id for o in service.merchant_orders(merchant)] == []  # the page misses it
    report = _check(world, topology)
    assert not report.ok, report.lines()


def test_changed_item_lines_fail_the_check(world: dict[str, Any], topology: Topology) -> None:
    """'wrong items' is only a count of lines (ledger.py:277-283): a line whose quantity or
    price changed after the acknowledgement passes, although the order's amount_cents, written
    in the same transaction, no longer matches its lines."""
    service: svc.OrderService = world["service"]
    key = service.new_order_key(31)
    service.place_order(31, 2, [svc.Item("a", 2, 150)], key)
    world["writer"].placed(key, 31, 2, 1, True)
    shard, _, items_table = _place(topology, key)
    with world["engines"][shard].begin() as conn:
        conn.execute(text(f"UPDATE {items_table} SET qty = 7 WHERE order_id = :o"), {"o": key})
    order = service.get_order(key)
    assert order is not None and order.amount_cents != sum(
        i.qty * i.price_cents for i in order.items
    )
    report = _check(world, topology)
    assert not report.ok, report.lines()
