"""loadtest/ledger.py (the replay of the client ledger and its check against a scan of the
shards), loadtest/report.py (the figures of a run) and ``runner.seconds_of``: pure, no database
(the scans are built by hand from where the topology routes each row)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click
import pytest

from shardrouter import Topology

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))

import ledger  # noqa: E402
import report as reporting  # noqa: E402
import runner  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# -- helpers ----------------------------------------------------------------------------------


def place(o: int, u: int, m: int, n: int, ok: bool | None = True) -> dict[str, Any]:
    return {"op": "place", "o": o, "u": u, "m": m, "n": n, "ok": ok}


def move(o: int, before: str, after: str, ok: bool | None = True) -> dict[str, Any]:
    return {"op": "move", "o": o, "from": before, "to": after, "ok": ok}


def purge(o: int, ok: bool | None = True) -> dict[str, Any]:
    return {"op": "purge", "o": o, "ok": ok}


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    """config/orders-sqlite.yaml: four shards of 256 slots, orders split in 4 tables."""
    demo = tmp_path_factory.mktemp("demo")
    return Topology.load(
        REPO / "config" / "orders-sqlite.yaml", {"SHARDROUTER_DEMO_DIR": str(demo)}
    )


def home(topology: Topology, user_id: int) -> tuple[str, str, str]:
    """(shard, orders physical table, order_items physical table) of a user's orders."""
    slot = int(topology.slot_for("orders", user_id))
    return (
        topology.shard_of_slot(slot),
        topology.table("orders").physical(slot),
        topology.table("order_items").physical(slot),
    )


def other_shard(topology: Topology, shard: str) -> str:
    return next(name for name in sorted(topology.shards) if name != shard)


def other_table(topology: Topology, table: str, rule: str = "orders") -> str:
    return next(name for name in topology.table(rule).physical_names if name != table)


def store(
    topology: Topology,
    scan: ledger.Scan,
    order_id: int,
    user_id: int,
    merchant_id: int,
    status: str,
    items: int,
) -> None:
    """Put an order where it belongs: its row, its item lines beside it, its lookup row."""
    shard, orders_table, items_table = home(topology, user_id)
    scan.orders.setdefault(order_id, []).append(
        ledger.Found(shard, orders_table, user_id, merchant_id, status)
    )
    scan.items.setdefault(order_id, []).extend([(shard, items_table)] * items)
    scan.lookups.add((merchant_id, order_id, topology.shard_for("merchant_orders", merchant_id)))


def unstore(scan: ledger.Scan, order_id: int) -> None:
    scan.orders.pop(order_id, None)
    scan.items.pop(order_id, None)
    scan.lookups = {row for row in scan.lookups if row[1] != order_id}


# The ledger of the check tests: order id -> (user, merchant, item lines) and its records.
ORDERS = {
    1: (1, 7, 2),  # placed: new
    2: (2, 8, 1),  # paid
    3: (8, 9, 3),  # cancelled (final)
    4: (10, 7, 1),  # cancelled then purged
    5: (11, 10, 2),  # placed, outcome unknown: not stored
    6: (3, 8, 1),  # new -> paid, outcome unknown: stored as paid
    7: (5, 11, 1),  # placed, outcome unknown: stored
}
RECORDS = [
    *(place(o, u, m, n, ok=None if o in (5, 7) else True) for o, (u, m, n) in ORDERS.items()),
    move(2, "new", "paid"),
    move(3, "new", "cancelled"),
    move(4, "new", "cancelled"),
    purge(4),
    move(6, "new", "paid", ok=None),
]
STORED = {1: "new", 2: "paid", 3: "cancelled", 6: "paid", 7: "new"}


def consistent_scan(topology: Topology) -> ledger.Scan:
    scan = ledger.Scan()
    for order_id, status in STORED.items():
        user, merchant, items = ORDERS[order_id]
        store(topology, scan, order_id, user, merchant, status, items)
    return scan


def run_check(topology: Topology, scan: ledger.Scan, records: list[dict[str, Any]] = RECORDS):
    return ledger.check(ledger.expected(records), scan, topology)


def only(result: ledger.Report, kind: str, order_id: int, count: int = 1) -> None:
    """``kind`` lists ``count`` problems, naming ``order_id``; every other kind is empty."""
    assert set(result.problems) == set(ledger.KINDS)
    others = {k: v for k, v in result.problems.items() if k != kind and v}
    assert others == {}, others
    assert len(result.problems[kind]) == count, result.problems[kind]
    assert all(f"order {order_id}" in p for p in result.problems[kind]), result.problems[kind]
    assert not result.ok


# -- the replay -------------------------------------------------------------------------------


def test_place_acknowledged_is_present_new() -> None:
    replay = ledger.expected([place(1, 10, 20, 3)])
    order = replay.orders[1]
    assert (order.user_id, order.merchant_id, order.items) == (10, 20, 3)
    assert order.present is True
    assert order.statuses == {"new"}
    assert order.cancelled is False
    assert replay.refused == [] and replay.records == 1


def test_place_unknown_outcome_may_be_absent() -> None:
    order = ledger.expected([place(1, 10, 20, 3, ok=None)]).orders[1]
    assert order.present is None
    assert order.statuses == {"new"}


def test_move_acknowledged_sets_status_and_cancelled() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "new", "paid")])
    assert replay.orders[1].statuses == {"paid"}
    assert replay.orders[1].cancelled is False
    replay = ledger.expected(
        [place(1, 10, 20, 1), move(1, "new", "paid"), move(1, "paid", "cancelled")]
    )
    assert replay.orders[1].statuses == {"cancelled"}
    assert replay.orders[1].cancelled is True
    assert replay.records == 3


def test_move_acknowledged_makes_an_uncertain_order_present() -> None:
    replay = ledger.expected([place(1, 10, 20, 1, ok=None), move(1, "new", "paid")])
    assert replay.orders[1].present is True
    assert replay.orders[1].statuses == {"paid"}


def test_move_unknown_outcome_widens_the_statuses() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "new", "paid", ok=None)])
    order = replay.orders[1]
    assert order.statuses == {"new", "paid"}
    assert order.present is True
    # an uncertain cancel is no acknowledged cancel
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "new", "cancelled", ok=None)])
    assert replay.orders[1].statuses == {"new", "cancelled"}
    assert replay.orders[1].cancelled is False


def test_move_unknown_outcome_from_an_impossible_status_changes_nothing() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "paid", "shipped", ok=None)])
    assert replay.orders[1].statuses == {"new"}


def test_refused_move_of_a_known_status_is_reported() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "new", "paid", ok=False)])
    assert replay.refused == ["order 1: new -> paid refused"]
    assert replay.orders[1].statuses == {"new"}


def test_refused_move_of_an_uncertain_order_is_not_reported() -> None:
    # the place may never have happened: nothing to update, nothing wrong
    replay = ledger.expected([place(1, 10, 20, 1, ok=None), move(1, "new", "paid", ok=False)])
    assert replay.refused == []
    assert replay.orders[1].statuses == {"new"}


def test_refused_move_narrows_uncertain_statuses() -> None:
    records = [place(1, 10, 20, 1), move(1, "new", "paid", ok=None)]
    # refused from new: the uncertain move won, the order is paid
    replay = ledger.expected([*records, move(1, "new", "cancelled", ok=False)])
    assert replay.orders[1].statuses == {"paid"}
    assert replay.refused == []
    # refused from paid: the uncertain move lost, the order is new
    replay = ledger.expected([*records, move(1, "paid", "shipped", ok=False)])
    assert replay.orders[1].statuses == {"new"}
    assert replay.refused == []


def test_purge_outcomes() -> None:
    cancelled = [place(1, 10, 20, 1), move(1, "new", "cancelled")]
    replay = ledger.expected([*cancelled, purge(1)])
    assert replay.orders[1].present is False
    replay = ledger.expected([*cancelled, purge(1, ok=None)])
    assert replay.orders[1].present is None
    assert replay.refused == []
    replay = ledger.expected([*cancelled, purge(1, ok=False)])
    assert replay.refused == ["order 1: purge refused"]
    assert replay.orders[1].present is True


def test_unknown_purge_after_an_acknowledged_one_keeps_it_purged() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), move(1, "new", "cancelled"), purge(1)])
    assert replay.orders[1].present is False
    replay = ledger.expected(
        [place(1, 10, 20, 1), move(1, "new", "cancelled"), purge(1), purge(1, ok=None)]
    )
    assert replay.orders[1].present is False


def test_refused_purge_of_an_order_not_known_cancelled_is_not_reported() -> None:
    replay = ledger.expected([place(1, 10, 20, 1), purge(1, ok=False)])
    assert replay.refused == []
    replay = ledger.expected(
        [place(1, 10, 20, 1), move(1, "new", "cancelled", ok=None), purge(1, ok=False)]
    )
    assert replay.refused == []


def test_records_of_an_unplaced_order_raise() -> None:
    with pytest.raises(ValueError, match="move of order 5 before it was placed"):
        ledger.expected([place(1, 10, 20, 1), move(5, "new", "paid")])
    with pytest.raises(ValueError, match="purge of order 5 before it was placed"):
        ledger.expected([purge(5)])


def test_unknown_op_raises() -> None:
    with pytest.raises(ValueError, match="unknown op 'refund'"):
        ledger.expected([place(1, 10, 20, 1), {"op": "refund", "o": 1, "ok": True}])


# -- the check --------------------------------------------------------------------------------


def test_consistent_scan_passes(topology: Topology) -> None:
    result = run_check(topology, consistent_scan(topology))
    assert result.ok
    assert set(result.problems) == set(ledger.KINDS)
    assert all(v == [] for v in result.problems.values()), result.problems
    assert (result.orders, result.found, result.records) == (7, 5, len(RECORDS))
    assert result.lines()[0].startswith("ledger check PASS: 7 orders")
    assert result.as_dict()["ok"] is True and result.as_dict()["examples"] == {}


def test_uncertain_orders_may_be_absent_or_present(topology: Topology) -> None:
    scan = consistent_scan(topology)
    unstore(scan, 7)  # placed uncertain, stored in the consistent scan
    store(topology, scan, 5, *ORDERS[5][:2], "new", ORDERS[5][2])  # the other one
    unstore(scan, 6)
    store(topology, scan, 6, *ORDERS[6][:2], "new", ORDERS[6][2])  # new -> paid uncertain
    assert run_check(topology, scan).ok


def test_lost_order(topology: Topology) -> None:
    scan = consistent_scan(topology)
    unstore(scan, 1)
    result = run_check(topology, scan)
    only(result, "lost", 1)
    assert result.found == 4


def test_lost_order_whose_item_lines_remain_is_only_lost(topology: Topology) -> None:
    scan = consistent_scan(topology)
    del scan.orders[2]
    only(run_check(topology, scan), "lost", 2)


def test_uncertain_place_then_acknowledged_move_must_be_present(topology: Topology) -> None:
    records = [*RECORDS, move(7, "new", "paid")]
    scan = consistent_scan(topology)
    unstore(scan, 7)
    only(run_check(topology, scan, records), "lost", 7)


def test_order_on_two_shards_is_duplicated(topology: Topology) -> None:
    scan = consistent_scan(topology)
    row = scan.orders[1][0]
    scan.orders[1].append(
        ledger.Found(other_shard(topology, row.shard), row.table, row.user_id, 7, "new")
    )
    only(run_check(topology, scan), "duplicated", 1)


def test_order_twice_in_one_table_is_duplicated(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.orders[2].append(scan.orders[2][0])
    only(run_check(topology, scan), "duplicated", 2)


def test_wrong_status(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.orders[2][0].status = "new"  # acknowledged paid
    result = run_check(topology, scan)
    only(result, "wrong_status", 2)
    assert "'new'" in result.problems["wrong_status"][0]
    assert "paid" in result.problems["wrong_status"][0]


def test_status_outside_an_uncertain_pair_is_wrong(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.orders[6][0].status = "shipped"  # new or paid
    only(run_check(topology, scan), "wrong_status", 6)


def test_wrong_merchant_is_reported_as_wrong_status(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.orders[1][0].merchant_id = 99
    scan.lookups.add((99, 1, topology.shard_for("merchant_orders", 99)))  # its lookup exists
    result = run_check(topology, scan)
    only(result, "wrong_status", 1)
    assert "99" in result.problems["wrong_status"][0]


def test_cancelled_order_found_paid_is_regressed(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.orders[3][0].status = "paid"
    result = run_check(topology, scan)
    only(result, "regressed", 3)
    assert result.problems["wrong_status"] == []


def test_purged_order_found_is_resurrected(topology: Topology) -> None:
    scan = consistent_scan(topology)
    store(topology, scan, 4, *ORDERS[4][:2], "cancelled", ORDERS[4][2])
    only(run_check(topology, scan), "resurrected", 4)


def test_order_on_the_wrong_shard_is_misplaced(topology: Topology) -> None:
    scan = consistent_scan(topology)
    row = scan.orders[1][0]
    row.shard = other_shard(topology, row.shard)
    result = run_check(topology, scan)
    only(result, "misplaced", 1)
    shard, table, _ = home(topology, ORDERS[1][0])
    assert f"routes to {shard}.{table}" in result.problems["misplaced"][0]


def test_order_in_the_wrong_physical_table_is_misplaced(topology: Topology) -> None:
    scan = consistent_scan(topology)
    row = scan.orders[2][0]
    row.table = other_table(topology, row.table)
    only(run_check(topology, scan), "misplaced", 2)


def test_missing_item_line(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.items[3].pop()
    only(run_check(topology, scan), "items", 3)


def test_all_item_lines_missing(topology: Topology) -> None:
    scan = consistent_scan(topology)
    del scan.items[2]
    result = run_check(topology, scan)
    only(result, "items", 2)
    assert "0 item lines" in result.problems["items"][0]


def test_extra_item_line(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.items[1].append(scan.items[1][0])
    result = run_check(topology, scan)
    only(result, "items", 1)
    assert "3 item lines" in result.problems["items"][0]


def test_item_line_in_another_table(topology: Topology) -> None:
    scan = consistent_scan(topology)
    shard, table = scan.items[3][0]
    scan.items[3][0] = (shard, other_table(topology, table, "order_items"))
    only(run_check(topology, scan), "items", 3)


def test_item_line_on_another_shard(topology: Topology) -> None:
    scan = consistent_scan(topology)
    shard, table = scan.items[1][1]
    scan.items[1][1] = (other_shard(topology, shard), table)
    only(run_check(topology, scan), "items", 1)


def test_missing_lookup_row(topology: Topology) -> None:
    scan = consistent_scan(topology)
    _, merchant, _ = ORDERS[2]
    scan.lookups.discard((merchant, 2, topology.shard_for("merchant_orders", merchant)))
    only(run_check(topology, scan), "lookup_missing", 2)


def test_lookup_row_on_the_wrong_shard_is_missing(topology: Topology) -> None:
    scan = consistent_scan(topology)
    _, merchant, _ = ORDERS[1]
    right = topology.shard_for("merchant_orders", merchant)
    scan.lookups.discard((merchant, 1, right))
    scan.lookups.add((merchant, 1, other_shard(topology, right)))
    only(run_check(topology, scan), "lookup_missing", 1)


def test_order_in_no_ledger_is_phantom(topology: Topology) -> None:
    scan = consistent_scan(topology)
    store(topology, scan, 99, 4, 7, "new", 2)
    result = run_check(topology, scan)
    only(result, "phantom", 99)
    assert result.found == 6


def test_orphan_item_lines_of_a_purged_order_are_resurrected(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.items[4] = [home(topology, ORDERS[4][0])[::2]]
    result = run_check(topology, scan)
    only(result, "resurrected", 4)
    assert "item lines" in result.problems["resurrected"][0]


def test_orphan_item_lines_of_an_unknown_order_are_phantom(topology: Topology) -> None:
    scan = consistent_scan(topology)
    scan.items[98] = [home(topology, 4)[::2]]
    result = run_check(topology, scan)
    only(result, "phantom", 98)
    assert "item lines" in result.problems["phantom"][0]


def test_refused_transitions_are_reported(topology: Topology) -> None:
    records = [*RECORDS, move(1, "new", "paid", ok=False), purge(3, ok=False)]
    result = run_check(topology, consistent_scan(topology), records)
    assert result.problems["refused"] == [
        "order 1: new -> paid refused",
        "order 3: purge refused",
    ]
    assert all(not v for k, v in result.problems.items() if k != "refused")
    assert not result.ok


def test_report_dict_and_lines_of_a_failure(topology: Topology) -> None:
    scan = consistent_scan(topology)
    unstore(scan, 1)
    unstore(scan, 2)
    for n in range(7):
        store(topology, scan, 100 + n, 4, 7, "new", 1)
    result = run_check(topology, scan)
    out = result.as_dict()
    assert out["ok"] is False
    assert out["orders_in_ledger"] == 7 and out["orders_found"] == 3 + 7
    assert out["problems"] == {
        k: 7 if k == "phantom" else 2 if k == "lost" else 0 for k in ledger.KINDS
    }
    assert set(out["examples"]) == {"lost", "phantom"}
    assert len(out["examples"]["phantom"]) == 5  # at most five examples
    lines = result.lines()
    assert lines[0].startswith("ledger check FAIL: 7 orders in the ledger")
    assert len(lines) == 1 + len(ledger.KINDS)
    assert any(line.split()[:2] == ["phantom", "7"] and "e.g. order 100" in line for line in lines)


# -- the ledger files -------------------------------------------------------------------------


def test_ledger_writer_and_read_records_round_trip(tmp_path: Path) -> None:
    writer = ledger.LedgerWriter(tmp_path / "run", "a")
    assert writer.path == tmp_path / "run" / "ledger-a.jsonl"
    writer.placed(1, 10, 20, 3, True)
    writer.moved(1, "new", "cancelled", True)
    writer.purged(1, None)
    writer.placed(2, 11, 21, 1, None)
    writer.flush()
    writer.close()
    writer.placed(3, 12, 22, 1, True)  # closed: ignored, no error
    records = list(ledger.read_records(tmp_path / "run"))
    assert records == [
        place(1, 10, 20, 3),
        move(1, "new", "cancelled"),
        purge(1, ok=None),
        place(2, 11, 21, 1, ok=None),
    ]
    replay = ledger.expected(records)
    assert replay.orders[1].present is None and replay.orders[1].cancelled is True
    assert replay.orders[2].present is None and replay.records == 4


def test_ledger_writer_default_name_is_the_pid(tmp_path: Path) -> None:
    import os

    writer = ledger.LedgerWriter(tmp_path)
    writer.close()
    assert writer.path.name == f"ledger-{os.getpid()}.jsonl"


def test_ledger_writer_appends(tmp_path: Path) -> None:
    for order_id in (1, 2):
        writer = ledger.LedgerWriter(tmp_path, "w")
        writer.placed(order_id, 10, 20, 1, True)
        writer.close()
    assert [r["o"] for r in ledger.read_records(tmp_path)] == [1, 2]


def test_read_records_of_every_file_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "ledger-b.jsonl").write_text(json.dumps(place(2, 1, 1, 1)) + "\n")
    (tmp_path / "ledger-a.jsonl").write_text(json.dumps(place(1, 1, 1, 1)) + "\n")
    (tmp_path / "other.jsonl").write_text(json.dumps(place(3, 1, 1, 1)) + "\n")
    assert [r["o"] for r in ledger.read_records(tmp_path)] == [1, 2]


def test_torn_last_line_is_ignored(tmp_path: Path) -> None:
    whole = json.dumps(place(1, 10, 20, 1)) + "\n" + json.dumps(move(1, "new", "paid")) + "\n"
    (tmp_path / "ledger-a.jsonl").write_text(whole + '{"op":"move","o":1,"fr')
    (tmp_path / "ledger-b.jsonl").write_text(json.dumps(place(2, 10, 20, 1)) + "\n")
    records = list(ledger.read_records(tmp_path))
    assert records == [place(1, 10, 20, 1), move(1, "new", "paid"), place(2, 10, 20, 1)]


def test_torn_line_that_parses_is_still_ignored(tmp_path: Path) -> None:
    # a record cut right after its closing brace is whole JSON but was never acknowledged whole
    (tmp_path / "ledger-a.jsonl").write_text(json.dumps(place(1, 10, 20, 1)))
    assert list(ledger.read_records(tmp_path)) == []


def test_corrupt_full_line_raises_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ledger-x.jsonl"
    path.write_text(json.dumps(place(1, 10, 20, 1)) + "\n" + "garbage\n")
    records = ledger.read_records(tmp_path)
    assert next(records) == place(1, 10, 20, 1)
    with pytest.raises(ValueError, match=r"ledger-x\.jsonl:2: not a ledger record"):
        next(records)


# -- report: figures --------------------------------------------------------------------------


def req(
    t: float,
    op: str = "get",
    ms: float = 10.0,
    ok: bool = True,
    write: bool = False,
    retries: int = 0,
    error: str = "",
) -> Any:
    return reporting.Request(t, op, ms, ok, write, retries, error)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert reporting.percentile(values, 50) == 50
    assert reporting.percentile(values, 95) == 95
    assert reporting.percentile(values, 99) == 99
    assert reporting.percentile(values, 100) == 100
    assert reporting.percentile(values, 0) == 1
    assert reporting.percentile([], 50) is None
    assert reporting.percentile([7.0], 99) == 7
    assert reporting.percentile([1, 2, 3, 4], 50) == 2
    assert reporting.percentile([1, 2, 3, 4], 75) == 3
    assert reporting.percentile([1, 2, 3, 4], 76) == 4
    assert reporting.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 99) == 10
    assert reporting.percentile([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], 90) == 9


def test_percentile_is_exact_for_every_integer_rank() -> None:
    """Nearest rank of 1..100: the q-th percentile is q, for every whole q."""
    values = list(range(1, 101))
    wrong = {q: reporting.percentile(values, q) for q in range(1, 101)}
    wrong = {q: got for q, got in wrong.items() if got != q}
    assert wrong == {}


def test_percentile_used_by_the_report_matches_integer_arithmetic() -> None:
    for n in range(1, 3001):
        values = list(range(1, n + 1))
        for q in (50, 95, 99):
            assert reporting.percentile(values, q) == max(1, -(-q * n // 100)), (n, q)


def test_stats() -> None:
    rs = [req(1, ms=30.0, retries=2), req(2, ms=10.0, ok=False), req(3, ms=20.0)]
    s = reporting.stats(rs, 2.0)
    assert s == {
        "requests": 3,
        "failures": 1,
        "retries": 2,
        "rps": 1.5,
        "p50_ms": 20.0,
        "p95_ms": 30.0,
        "p99_ms": 30.0,
        "max_ms": 30.0,
    }
    assert reporting.stats(rs, 0)["rps"] is None
    empty = reporting.stats([], 10)
    assert empty["requests"] == 0 and empty["p99_ms"] is None and empty["max_ms"] is None


def test_summary_per_operation() -> None:
    rs = [
        req(100.1, "place", 12.34, write=True),
        req(100.5, "place", 50.0, ok=False, write=True, error="timeout"),
        req(101.0, "place", 8.0, ok=False, write=True, error="timeout"),
        req(102.0, "get", 2.0),
        req(103.0, "get", 4.0, ok=False, error="deadlock, retried"),
    ]
    s = reporting.summary(rs, 100.0, 104.0)
    assert s["seconds"] == 4.0
    assert list(s["operations"]) == ["get", "place"]  # sorted
    place_stats = s["operations"]["place"]
    assert place_stats["requests"] == 3 and place_stats["failures"] == 2
    assert place_stats["rps"] == 0.8  # 3 / 4 s rounded to 0.1
    assert place_stats["p50_ms"] == 12.3 and place_stats["max_ms"] == 50.0
    assert s["operations"]["get"]["requests"] == 2 and s["operations"]["get"]["rps"] == 0.5
    assert s["all"]["requests"] == 5 and s["all"]["failures"] == 3
    assert s["all"]["rps"] == 1.2
    assert s["errors"] == {"place: timeout": 2, "get: deadlock, retried": 1}


def test_per_phase_by_end_time() -> None:
    phases = [
        {"name": "before", "start": 0.0, "end": 10.0},
        {"name": "copy", "start": 10.0, "end": 20.0},
    ]
    rs = [
        req(0.0, ms=1.0, write=True),
        req(9.999, ms=5.0, write=True),
        req(9.5, ms=500.0),  # a slow read: no write figure
        req(10.0, ms=7.0, write=True, ok=False),  # ends at the boundary: the later phase
        req(15.0, ms=3.0),
        req(20.0, ms=999.0, write=True),  # end excluded
        req(-1.0, ms=999.0, write=True),
    ]
    before, copy = reporting.per_phase(rs, phases)
    assert before == {
        "phase": "before",
        "seconds": 10.0,
        "requests": 3,
        "failures": 0,
        "write_p99_ms": 5.0,
        "write_max_ms": 5.0,
    }
    assert copy["phase"] == "copy" and copy["requests"] == 2 and copy["failures"] == 1
    assert copy["write_p99_ms"] == 7.0 and copy["write_max_ms"] == 7.0
    no_writes = reporting.per_phase([req(1.0)], phases[:1])[0]
    assert no_writes["write_p99_ms"] is None and no_writes["write_max_ms"] is None


def test_switch_windows() -> None:
    margin = reporting.SWITCH_MARGIN_S
    assert margin == 1.0
    phases = [
        {"name": "verify", "start": 90.0, "end": 100.0},
        {"name": "switch", "start": 100.0, "end": 102.0},
        {"name": "finalize", "start": 102.0, "end": 110.0},
    ]
    rs = [
        req(98.9, ms=900.0, write=True),  # before the window
        req(99.0, ms=10.0, write=True),  # its first instant
        req(100.5, ms=40.0, write=True, ok=False, retries=3),
        req(101.0, ms=5000.0),  # a read: not counted
        req(102.9, ms=20.0, write=True, retries=1),
        req(103.0, ms=800.0, write=True),  # end excluded
    ]
    (window,) = reporting.switch_windows(rs, phases)
    assert window == {
        "phase": "switch",
        "window_s": 4.0,
        "writes": 3,
        "failures": 1,
        "retries": 4,
        "p99_ms": 40.0,
        "max_ms": 40.0,
    }
    assert reporting.switch_windows(rs, phases[:1]) == []
    two = [*phases, {"name": "switch", "start": 200.0, "end": 200.5}]
    second = reporting.switch_windows(rs, two)[1]
    assert second["window_s"] == 2.5 and second["writes"] == 0 and second["p99_ms"] is None


def test_timeline_bins() -> None:
    rs = [
        req(100.2, ms=10.0),
        req(100.7, ms=30.0),
        req(102.5, ms=5.0, ok=False),
    ]
    points = reporting.timeline(rs, 100.0)
    assert points == [
        {"t": 0.0, "rps": 2.0, "p50_ms": 10.0, "p99_ms": 30.0, "failures": 0},
        {"t": 1.0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "failures": 0},
        {"t": 2.0, "rps": 1.0, "p50_ms": 5.0, "p99_ms": 5.0, "failures": 1},
    ]
    half = reporting.timeline(rs, 100.0, step=0.5)
    assert [p["t"] for p in half] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.5]
    assert [p["rps"] for p in half] == [2.0, 2.0, 0.0, 0.0, 0.0, 2.0]
    assert reporting.timeline([], 100.0) == []


def test_table_text_and_markdown() -> None:
    rows = [["place", 1234, 5.26, None], ["get", 7, 10.0, "x"]]
    header = ("operation", "requests", "ms", "note")
    text = reporting.table(rows, header).splitlines()
    assert len(text) == 3
    assert len({len(line) for line in text}) == 1  # aligned columns
    assert text[0].split() == list(header)
    assert text[1].split() == ["place", "1,234", "5.3", "-"]
    assert text[1].startswith("place ")  # first column left-aligned
    assert text[2].endswith("  x") and text[2].split()[:3] == ["get", "7", "10.0"]
    assert text[0].index("requests") + len("requests") == text[1].index("1,234") + len("1,234")
    md = reporting.table(rows, header, markdown=True).splitlines()
    assert md == [
        "| operation | requests | ms | note |",
        "|---|---|---|---|",
        "| place | 1,234 | 5.3 | - |",
        "| get | 7 | 10.0 | x |",
    ]


def run_report(topology: Topology) -> dict[str, Any]:
    """What runner.py builds: one run with phases, a switch window, a failed ledger, a plot."""
    rs = [
        req(100.5, "place", 20.0, write=True),
        req(101.5, "place", 250.0, ok=False, write=True, error="timeout"),
        req(102.5, "get", 3.0),
        req(103.5, "place", 30.0, write=True),
    ]
    phases = [{"name": "switch", "start": 101.0, "end": 102.0}]
    spans = [
        {"name": "before", "start": 100.0, "end": 101.0},
        *phases,
        {"name": "after", "start": 102.0, "end": 104.0},
    ]
    scan = consistent_scan(topology)
    unstore(scan, 1)
    return {
        "label": "20250101T000000Z",
        "command": "loadtest/run -t 30s --reshard",
        "runs": [
            {
                "name": "router",
                "summary": reporting.summary(rs, 100.0, 104.0),
                "phases": reporting.per_phase(rs, spans),
                "switch_windows": reporting.switch_windows(rs, phases),
                "ledger": run_check(topology, scan).as_dict(),
                "plot": "/tmp/out/router/router-timeline.png",
            }
        ],
        "ratio": {"throughput": 0.8, "p99": 1.25},
        "reshard_error": "the reshard did not finish",
    }


def test_render_markdown(topology: Topology) -> None:
    md = reporting.render(run_report(topology), md=True)
    lines = md.splitlines()
    assert lines[0] == "# Load run 20250101T000000Z"
    assert "`loadtest/run -t 30s --reshard`" in lines
    assert "## router" in lines
    assert "| operation | requests | req/s | p50 ms | p95 ms | p99 ms | max ms | failed |" in lines
    assert "| all | 4 | 1.0 | 20.0 | 250.0 | 250.0 | 250.0 | 1 |" in lines
    assert "| place | 3 | 0.8 | 30.0 | 250.0 | 250.0 | 250.0 | 1 |" in lines
    assert "Failures: place: timeout x1" in lines
    assert "| phase | seconds | requests | failed | write p99 ms | write max ms |" in lines
    assert "| switch | 1.0 | 1 | 1 | 250.0 | 250.0 |" in lines
    assert any(
        line.startswith("Switch window (3.0 s around the switch): 2 writes, 1 failed,")
        for line in lines
    ), md
    ledger_line = next(line for line in lines if line.startswith("Ledger check"))
    assert ledger_line.startswith("Ledger check FAILED: 7 orders in the ledger, 4 on the shards;")
    assert "lost 1" in ledger_line and "phantom 0" in ledger_line
    assert any(line.startswith("  lost: order 1 ") for line in lines)
    assert "![throughput and latency](router/router-timeline.png)" in lines
    assert "## Router / baseline" in lines
    assert "Throughput 0.80x, p99 1.25x (router / baseline)." in lines
    assert lines[-1] == "RESHARD FAILED: the reshard did not finish"


def test_render_text_and_a_passing_ledger(topology: Topology) -> None:
    report = run_report(topology)
    report["runs"][0]["ledger"] = run_check(topology, consistent_scan(topology)).as_dict()
    del report["ratio"], report["reshard_error"]
    text = reporting.render(report)
    lines = text.splitlines()
    assert lines[0] == "== router =="
    assert not any(line.startswith("#") or line.startswith("|") for line in lines)
    assert "plot: /tmp/out/router/router-timeline.png" in lines
    assert any(line.startswith("Ledger check PASSED: 7 orders") for line in lines)
    assert "RESHARD FAILED" not in text and "baseline" not in text


def test_render_without_phases_or_ledger() -> None:
    rs = [req(1.0, "get", 2.0)]
    report = {
        "label": "x",
        "command": "loadtest/run",
        "runs": [{"name": "baseline", "summary": reporting.summary(rs, 0.0, 2.0)}],
    }
    md = reporting.render(report, md=True)
    assert "## baseline" in md and "| get | 1 | 0.5 | 2.0 | 2.0 | 2.0 | 2.0 | 0 |" in md
    assert "Phases" not in md and "Ledger" not in md and "Failures" not in md


def test_plot_writes_a_png(tmp_path: Path) -> None:
    rs = []
    for second in range(12):
        if second == 6:
            continue  # a second in which no request ended: a gap in the curves
        for k in range(5):
            t = 1000.0 + second + k / 5
            rs.append(req(t, "place", 5.0 + k * second, ok=(second, k) != (3, 0), write=True))
    phases = [
        {"name": "copy", "start": 1002.0, "end": 1005.0},
        {"name": "switch", "start": 1005.0, "end": 1005.1},
        {"name": "finalize", "start": 1005.1, "end": 1008.0},
    ]
    path = reporting.plot(tmp_path / "t.png", rs, 1000.0, 1012.0, phases, "router: 5 users")
    assert path == tmp_path / "t.png"
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 10_000


def test_read_requests(tmp_path: Path) -> None:
    (tmp_path / "requests-2.csv").write_text(
        "5.5,get,1.25,1,0,0,\n"
        "7.0,place,300.0,0,1,2,OperationalError: (2013, 'Lost connection')\n"
        "8.0,get,1.0,1,0,0,"  # torn
    )
    (tmp_path / "requests-1.csv").write_text("6.0,move,4.0,1,1,1,\n")
    (tmp_path / "ledger-1.jsonl").write_text("not a request log\n")
    rs = reporting.read_requests(tmp_path)
    assert [r.t for r in rs] == [5.5, 6.0, 7.0]  # sorted by end time
    assert rs[0] == reporting.Request(5.5, "get", 1.25, True, False, 0, "")
    assert rs[1] == reporting.Request(6.0, "move", 4.0, True, True, 1, "")
    assert rs[2] == reporting.Request(
        7.0, "place", 300.0, False, True, 2, "OperationalError: (2013, 'Lost connection')"
    )
    assert reporting.read_requests(tmp_path / "nowhere") == []


# -- runner.seconds_of ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("2m", 120), ("1m30s", 90), ("1h", 3600), ("45", 45), ("1h2m3s", 3723)],
)
def test_seconds_of(text: str, seconds: float) -> None:
    assert runner.seconds_of(text) == seconds


@pytest.mark.parametrize("text", ["", "  ", "abc", "1x", "m", "s", "1.5m", "-3s"])
def test_seconds_of_rejects(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a duration"):
        runner.seconds_of(text)


# -- loadtest/run --compare --rounds: alternating pairs, the median of their ratios ------------


def _run(name: str, rps: float, p99: float) -> dict[str, Any]:
    return {"name": name, "summary": {"all": {"rps": rps, "p99_ms": p99}}}


def test_ratio_of_pairs_in_either_order_is_their_median() -> None:
    runs = [
        _run("baseline", 1000, 30),
        _run("router", 900, 36),  # 0.90
        _run("router-2", 950, 33),  # then the router first: 0.95
        _run("baseline-2", 1000, 30),
        _run("baseline-3", 1000, 30),
        _run("router-3", 800, 45),  # 0.80
    ]
    ratio = runner.ratio_of(runs)
    assert [round(p["throughput"], 2) for p in ratio["rounds"]] == [0.9, 0.95, 0.8]
    assert ratio["throughput"] == pytest.approx(0.9)
    assert ratio["p99"] == pytest.approx(1.2)
    text = reporting.render({"label": "x", "command": "c", "runs": [], "ratio": ratio})
    assert "Throughput 0.90x" in text and "0.90x, 0.95x, 0.80x" in text


def test_one_pair_is_its_own_ratio() -> None:
    ratio = runner.ratio_of([_run("baseline", 1000, 30), _run("router", 880, 39)])
    assert ratio["throughput"] == pytest.approx(0.88) and ratio["p99"] == pytest.approx(1.3)
    text = reporting.render({"label": "x", "command": "c", "runs": [], "ratio": ratio})
    assert "Median of" not in text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--rounds", "2"], "--rounds goes with --compare"),
        (["--compare", "--rounds", "0"], "--rounds 0: give 1..20"),
    ],
)
def test_rounds_usage_errors(args: list[str], message: str, tmp_path: Path) -> None:
    from click.testing import CliRunner

    result = CliRunner().invoke(runner.main, [*args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and message in result.output


def test_run_waits_for_the_whole_locust_process_group(tmp_path: Path) -> None:
    """With --processes the Locust master exits without waiting for its workers, which write
    their ledgers as they stop: the runner waits for every process of the group (a zombie, not
    yet reaped by whoever adopted it, does not count)."""
    import subprocess
    import time

    done = tmp_path / "written"
    worker = tmp_path / "worker.py"
    worker.write_text(f"import time\ntime.sleep(1.0)\nopen({str(done)!r}, 'w').write('x')\n")
    master = tmp_path / "master.py"
    master.write_text(
        "import os, subprocess, sys\n"
        f"subprocess.Popen([sys.executable, {str(worker)!r}])\n"
        "os._exit(0)\n"
    )
    leader = subprocess.Popen([sys.executable, str(master)], start_new_session=True)
    leader.wait(timeout=10)  # the master is gone, its worker still runs
    assert runner._group_alive(leader.pid)
    start = time.monotonic()
    runner._wait_group(leader.pid, timeout=10)
    assert done.exists() and time.monotonic() - start < 10
    assert not runner._group_alive(leader.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        sleeper = subprocess.Popen(["sleep", "5"], start_new_session=True)
        try:
            runner._wait_group(sleeper.pid, timeout=0.3)
        finally:
            sleeper.kill()
            sleeper.wait()
