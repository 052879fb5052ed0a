"""The client-side ledger of a load run and its check against the cluster.

Every client process appends what the service acknowledged to its own JSON-lines file (one
``LedgerWriter`` per process): an order placed, a status transition that won or was refused,
an order purged. A request whose outcome the client cannot know (an error after the statement
may have run) is recorded too, as uncertain. Each order is written to by one client only (the
one that placed it), so replaying a file in order gives that order's history.

``expected`` replays the files into what the cluster must hold; ``scan`` reads what it does
hold, every shard's physical tables directly (not through the router, whose answers are what
is being checked); ``check`` compares the two:

- lost: an acknowledged order not found;
- duplicated: an order id on more than one shard, or twice in one;
- wrong status: not the last acknowledged status (or, after an uncertain transition, neither
  of its two); ``regressed`` lists those the ledger says are cancelled (final) but are found in
  an earlier status;
- resurrected: an acknowledged purge, found again;
- misplaced: on a shard or in a physical table its slot does not route to;
- items: not the number of item lines acknowledged, or not beside their order;
- lookup missing: no ``merchant_orders`` row for a present order (a merchant page misses it);
- phantom: a row no client wrote (nor may have written);
- refused transitions the ledger says should have won (the row was not in the status the
  client knew: a lost or foreign write).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import create_engine, text

from shardrouter import Topology

LEDGER_GLOB = "ledger-*.jsonl"


class LedgerWriter:
    """Appends acknowledged writes to ``<directory>/ledger-<name>.jsonl``; ``flush()`` and
    ``close()`` write what is buffered (a process that ends without them loses its tail: the
    check then reports those orders as phantoms, never as passed)."""

    def __init__(self, directory: Path, name: str | None = None) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"ledger-{name or os.getpid()}.jsonl"
        self._file: IO[str] | None = self.path.open("a", encoding="utf-8")

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is not None:
            self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def placed(
        self,
        order_id: int,
        user_id: int,
        merchant_id: int,
        items: int,
        ok: bool | None,
        lines: Sequence[tuple[str, int, int]] | None = None,
    ) -> None:
        """ok True: acknowledged; None: the outcome is unknown (every attempt failed).
        ``lines``: the items (sku, qty, price_cents) in line order, checked when given."""
        record: dict[str, Any] = {"op": "place", "o": order_id, "u": user_id, "m": merchant_id,
                                  "n": items, "ok": ok}  # fmt: skip
        if lines is not None:
            record["i"] = [list(line) for line in lines]
        self._write(record)

    def moved(self, order_id: int, before: str, after: str, ok: bool | None) -> None:
        """ok True: the guarded UPDATE changed the row; False: it matched nothing; None:
        unknown."""
        self._write({"op": "move", "o": order_id, "from": before, "to": after, "ok": ok})

    def purged(self, order_id: int, ok: bool | None) -> None:
        self._write({"op": "purge", "o": order_id, "ok": ok})

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


@dataclass
class Expected:
    """What one order must look like: ``present`` True / False / None (either), and the
    statuses it may have."""

    user_id: int
    merchant_id: int
    items: int
    present: bool | None
    statuses: frozenset[str]
    cancelled: bool = False
    """An acknowledged cancel: the order must never be found in an earlier status."""
    lines: tuple[tuple[str, int, int], ...] | None = None
    """The item lines (sku, qty, price_cents) in line order, when the ledger has them."""


@dataclass
class Replay:
    orders: dict[int, Expected] = field(default_factory=dict)
    refused: list[str] = field(default_factory=list)
    """Transitions refused although the ledger knew the order to be in their from-status."""
    records: int = 0


def read_records(directory: Path) -> Iterator[dict[str, Any]]:
    for path in sorted(directory.glob(LEDGER_GLOB)):
        with path.open(encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.endswith("\n"):
                    break  # a torn last line of a killed process: never acknowledged whole
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{number}: not a ledger record ({exc})") from exc


def expected(records: Iterable[Mapping[str, Any]]) -> Replay:
    """Replay ledger records (each order's in the order its one client wrote them)."""
    replay = Replay()
    orders = replay.orders
    for record in records:
        replay.records += 1
        op, order_id, ok = record["op"], int(record["o"]), record["ok"]
        if op == "place":
            lines = record.get("i")
            orders[order_id] = Expected(
                int(record["u"]), int(record["m"]), int(record["n"]),
                True if ok else None, frozenset({"new"}),
                lines=None if lines is None else tuple((str(a), int(b), int(c))
                                                       for a, b, c in lines),
            )  # fmt: skip
            continue
        order = orders.get(order_id)
        if order is None:
            raise ValueError(f"ledger: {op} of order {order_id} before it was placed")
        if op == "move":
            before, after = str(record["from"]), str(record["to"])
            if ok is True:
                order.statuses = frozenset({after})
                order.present = True
                order.cancelled = order.cancelled or after == "cancelled"
            elif ok is None:  # it may have won: either status
                if before in order.statuses:
                    order.statuses |= {after}
            elif order.statuses == {before} and order.present is True:
                replay.refused.append(f"order {order_id}: {before} -> {after} refused")
            elif len(order.statuses) > 1:  # refused: it was not in ``before``
                order.statuses -= {before}
        elif op == "purge":
            if ok is True:
                order.present = False
            elif ok is None and order.present is not False:
                order.present = None
            elif ok is False and order.statuses == {"cancelled"} and order.present is True:
                replay.refused.append(f"order {order_id}: purge refused")
        else:
            raise ValueError(f"ledger: unknown op {op!r}")
    return replay


@dataclass
class Found:
    """One stored order row."""

    shard: str
    table: str
    user_id: int
    merchant_id: int
    status: str
    amount_cents: int | None = None


@dataclass
class Scan:
    orders: dict[int, list[Found]] = field(default_factory=dict)
    items: dict[int, list[tuple[str, str]]] = field(default_factory=dict)
    """order id -> (shard, physical table) of each item line."""
    lookups: set[tuple[int, int, str]] = field(default_factory=set)
    """(merchant id, order id, shard) of each merchant_orders row."""
    lines: dict[int, list[tuple[int, str, int, int]]] = field(default_factory=dict)
    """order id -> (line, sku, qty, price_cents) of each item line (scan() fills it)."""
    lookup_users: dict[tuple[int, int, str], int] = field(default_factory=dict)
    """(merchant id, order id, shard) -> the user id the lookup row names (its route)."""


def scan(topology: Topology) -> Scan:
    """Every orders, order_items and merchant_orders row of every shard's primary, read
    directly."""
    out = Scan()
    for name, shard in topology.shards.items():
        engine = create_engine(shard.primary.render_as_string(hide_password=False))
        try:
            with engine.connect() as conn:
                for physical in topology.table("orders").physical_names:
                    for o, u, m, status, amount in conn.execute(
                        text(
                            "SELECT order_id, user_id, merchant_id, status, amount_cents FROM"
                            f" {physical}"
                        )
                    ):
                        out.orders.setdefault(int(o), []).append(
                            Found(name, physical, int(u), int(m), str(status), int(amount))
                        )
                for physical in topology.table("order_items").physical_names:
                    for o, line, sku, qty, price in conn.execute(
                        text(f"SELECT order_id, line, sku, qty, price_cents FROM {physical}")
                    ):
                        out.items.setdefault(int(o), []).append((name, physical))
                        out.lines.setdefault(int(o), []).append(
                            (int(line), str(sku), int(qty), int(price))
                        )
                for physical in topology.table("merchant_orders").physical_names:
                    for m, o, u in conn.execute(
                        text(f"SELECT merchant_id, order_id, user_id FROM {physical}")
                    ):
                        out.lookups.add((int(m), int(o), name))
                        out.lookup_users[(int(m), int(o), name)] = int(u)
        finally:
            engine.dispose()
    return out


@dataclass
class Report:
    orders: int
    found: int
    records: int
    problems: dict[str, list[str]]

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "orders_in_ledger": self.orders,
            "orders_found": self.found,
            "records": self.records,
            "problems": {k: len(v) for k, v in self.problems.items()},
            "examples": {k: v[:5] for k, v in self.problems.items() if v},
        }

    def lines(self) -> list[str]:
        verdict = "PASS" if self.ok else "FAIL"
        head = (
            f"ledger check {verdict}: {self.orders} orders in the ledger ({self.records}"
            f" records), {self.found} found on the shards"
        )
        out = [head]
        for kind, found in self.problems.items():
            out.append(f"  {kind:<13} {len(found)}" + (f"   e.g. {found[0]}" if found else ""))
        return out


KINDS = (
    "lost", "duplicated", "wrong_status", "regressed", "resurrected", "misplaced", "items",
    "lookup_missing", "phantom", "refused",
)  # fmt: skip


def check(replay: Replay, found: Scan, topology: Topology) -> Report:
    """Compare the replayed ledger with a scan of the cluster (``topology``: its owners)."""
    problems: dict[str, list[str]] = {kind: [] for kind in KINDS}
    problems["refused"] = list(replay.refused)
    orders_rule = topology.table("orders")
    items_rule = topology.table("order_items")
    merchant_lookup = "merchant_id" in orders_rule.keys  # (loadtest/run --no-lookups: none)
    for order_id, rows in sorted(found.orders.items()):
        want = replay.orders.get(order_id)
        if want is None:
            problems["phantom"].append(f"order {order_id} on {rows[0].shard}: in no ledger")
            continue
        if want.present is False:
            problems["resurrected"].append(f"order {order_id} purged, found on {rows[0].shard}")
        if len(rows) > 1:
            where = ", ".join(f"{r.shard}.{r.table}" for r in rows)
            problems["duplicated"].append(f"order {order_id} found {len(rows)} times: {where}")
        row = rows[0]
        slot = topology.slot_for("orders", row.user_id)
        owner = topology.shard_of_slot(int(slot))
        table = orders_rule.physical(int(slot))
        if row.shard != owner or row.table != table:
            problems["misplaced"].append(
                f"order {order_id} in {row.shard}.{row.table}, its slot {slot} routes to"
                f" {owner}.{table}"
            )
        if (row.user_id, row.merchant_id) != (want.user_id, want.merchant_id):
            problems["wrong_status"].append(
                f"order {order_id}: user/merchant {row.user_id}/{row.merchant_id}, acknowledged"
                f" {want.user_id}/{want.merchant_id}"
            )
        if row.status not in want.statuses:
            kind = "regressed" if want.cancelled else "wrong_status"
            problems[kind].append(
                f"order {order_id}: status {row.status!r}, acknowledged"
                f" {'/'.join(sorted(want.statuses))}"
            )
        lines = found.items.get(order_id, [])
        item_table = items_rule.physical(int(slot))
        if len(lines) != want.items or any(loc != (owner, item_table) for loc in lines):
            problems["items"].append(
                f"order {order_id}: {len(lines)} item lines ({sorted(set(lines))}), acknowledged"
                f" {want.items} in {owner}.{item_table}"
            )
        stored = sorted(found.lines.get(order_id, []))
        if stored:
            total = sum(qty * price for _, _, qty, price in stored)
            if row.amount_cents is not None and total != row.amount_cents:
                problems["items"].append(
                    f"order {order_id}: its lines sum to {total}, its amount_cents is"
                    f" {row.amount_cents} (written in one transaction)"
                )
            elif want.lines is not None and tuple(x[1:] for x in stored) != want.lines:
                problems["items"].append(
                    f"order {order_id}: lines {[x[1:] for x in stored]}, acknowledged"
                    f" {list(want.lines)}"
                )
        lookup_shard = topology.shard_for("merchant_orders", row.merchant_id)
        lookup = (row.merchant_id, order_id, lookup_shard)
        if merchant_lookup and lookup not in found.lookups:
            problems["lookup_missing"].append(
                f"order {order_id}: no merchant_orders row ({row.merchant_id}, {order_id}) on"
                f" {lookup_shard}"
            )
        elif merchant_lookup and found.lookup_users.get(lookup, row.user_id) != row.user_id:
            problems["lookup_missing"].append(
                f"order {order_id}: its merchant_orders row names user"
                f" {found.lookup_users[lookup]}, not {row.user_id}: the merchant's page looks"
                " for it elsewhere"
            )
    for order_id, want in sorted(replay.orders.items()):
        if want.present is True and order_id not in found.orders:
            problems["lost"].append(
                f"order {order_id} of user {want.user_id}, acknowledged"
                f" {'/'.join(sorted(want.statuses))}, found nowhere"
            )
    for order_id in sorted(set(found.items) - set(found.orders)):
        # An order and its lines are written and purged in one transaction: lines alone are a
        # torn write whatever the ledger says (also after a place or purge in doubt).
        want = replay.orders.get(order_id)
        if want is None:
            kind = "phantom"
        elif want.present is False:
            kind = "resurrected"
        elif want.present is True:
            continue  # reported as lost above (its lines left behind are that loss)
        else:
            kind = "items"
        problems[kind].append(f"item lines of order {order_id} without their order")
    return Report(len(replay.orders), len(found.orders), replay.records, problems)


def check_directory(directory: Path, topology: Topology) -> Report:
    return check(expected(read_records(directory)), scan(topology), topology)


def main(argv: list[str] | None = None) -> int:
    """``python3 loadtest/ledger.py RUN_DIR --config TOPOLOGY [--json]``: check a run's ledger
    again against the cluster (exit 1 when it fails)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="loadtest/ledger.py",
        description="Check the ledger files of a load run (ledger-*.jsonl in RUN_DIR) against"
        " the cluster of TOPOLOGY: exit 0 when every acknowledged write is there, 1 if not.",
    )
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--config", type=Path, required=True, help="the cluster's topology")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not any(args.run_dir.glob(LEDGER_GLOB)):
        parser.error(f"{args.run_dir} holds no {LEDGER_GLOB}: give the folder of one run")
    # The file's shards: with a meta: section, the store's current version may differ (after
    # a reshard, give the topology the cluster ended on).
    report = check_directory(args.run_dir, Topology.load(args.config))
    print(json.dumps(report.as_dict(), indent=2) if args.json else "\n".join(report.lines()))
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
