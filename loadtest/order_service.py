"""An order service on the public shardrouter API: the worked example of README, and what the
Locust load test drives.

Operations and how each is routed (``config/orders.yaml``):

- ``place_order``: the order row, its item rows and (written by the router, before the
  transaction) the ``merchant_orders`` lookup row, in one transaction on the user's shard.
- ``get_order``: by order id, routed by the slot the id carries (gene): one shard.
- ``user_orders``: a keyset page of one user's orders (``Router.page``, user_id: one shard).
- ``merchant_orders``: a keyset page of one merchant's orders (through the lookup table).
- ``pay`` / ``cancel``: guarded status transitions, ``UPDATE orders SET status = :new WHERE
  order_id = :o AND status = :old``; ``False`` when the order is not in a status the
  transition leaves from (nothing changed).
- ``purge``: delete a cancelled order and its items (one transaction on its shard; the
  router removes its merchant lookup row); ``False`` when the order is not cancelled.
- ``count_by_status``: the back office's count, a read across every shard, merged.

Status transitions (``TRANSITIONS``): ``new -> paid`` (pay), ``new -> cancelled`` and
``paid -> cancelled`` (cancel; a paid order may still be cancelled, i.e. refunded, before it
ships). ``cancelled`` is final: nothing leaves it, so a cancelled order never comes back to an
earlier status. Each guard is one statement, so two racing transitions cannot both win: the
row lock serialises them and the loser's ``WHERE status = :old`` no longer matches.

Idempotency: the key *is the order id*. A client asks ``new_order_key(user_id)`` for an id
(from the id generator, carrying the user's slot) before its first attempt, keeps it, and sends
the same key with every retry of that request; ``place_order`` inserts the order under that id.
The orders table's primary key makes a second insert of the same id a duplicate key, atomically:
a retry after a commit gets the duplicate at once, and a concurrent duplicate waits on the first
insert's row lock, then gets the duplicate (first committed) or inserts (first rolled back). On
a duplicate, the stored order is read and its id returned when it is the same request (same user
and merchant; else ``IdempotencyKeyError``). So a retried request never writes a second order,
and the idempotent path costs nothing extra on the first attempt (no extra row, no extra read).

Why not a table of request keys (``order_requests (user_id, request_key, order_id)``, sharded
like the user's orders, its row inserted first in the same transaction): that accepts any client
string (an HTTP ``Idempotency-Key`` header) and is the way to go when clients cannot be handed an
id first. It needs a new migration and a new table in every topology, which changes every
schema, resharding and oracle check of the suite; the id-as-key design needs no schema change
and gives the same guarantee for clients that can keep an id between attempts. The trade-off:
the key must be an id minted by ``new_order_key`` for that user (checked: its slot must be the
user's, else the order would be written where its id does not route), not an arbitrary string,
and an abandoned key leaves a gap in the ids (harmless: ids need not be dense).

Ids come from ``router.topology.id_generator("orders")``; a topology with a meta store (a router
following one) leases a worker id instead (``WorkerLease.for_topology``), released by
``close()``. Pass ``ids=`` to share a generator.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from shardrouter import ExecutionError, IdGenerator, Router, WorkerLease

NEW = "new"
PAID = "paid"
CANCELLED = "cancelled"
TRANSITIONS: Mapping[str, frozenset[str]] = {
    NEW: frozenset({PAID, CANCELLED}),
    PAID: frozenset({CANCELLED}),
    CANCELLED: frozenset(),
}
"""Status -> the statuses an order in it may move to. ``cancelled`` is final."""

_ORDER_COLUMNS = ("order_id", "user_id", "merchant_id", "status", "amount_cents", "created_at")
_PAGE_ORDER = ("created_at", "order_id")


class IdempotencyKeyError(ValueError):
    """The key was not minted for this user, or it was used already for another request."""


@dataclass(frozen=True)
class Item:
    """One line of an order."""

    sku: str
    qty: int
    price_cents: int


@dataclass(frozen=True)
class OrderSummary:
    """An order row (what a listing shows)."""

    order_id: int
    user_id: int
    merchant_id: int
    status: str
    amount_cents: int
    created_at: dt.datetime


@dataclass(frozen=True)
class Order(OrderSummary):
    """An order with its items, lines in order."""

    items: tuple[Item, ...] = ()


@dataclass(frozen=True)
class OrderPage:
    """One keyset page of orders, newest first; pass ``after`` back for the next page (None:
    this was the last one)."""

    orders: tuple[OrderSummary, ...]
    after: tuple[Any, ...] | None

    def __iter__(self) -> Iterator[OrderSummary]:
        return iter(self.orders)

    def __len__(self) -> int:
        return len(self.orders)


def _summary(row: Sequence[Any]) -> OrderSummary:
    order_id, user_id, merchant_id, status, amount, created = row
    return OrderSummary(
        int(order_id), int(user_id), int(merchant_id), str(status), int(amount), _datetime(created)
    )


def _datetime(value: Any) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value
    return dt.datetime.fromisoformat(str(value))  # SQLite hands back text


def _is_duplicate_key(error: BaseException) -> bool:
    """Whether a driver error in ``error``'s chain is a duplicate key (MySQL 1062, SQLite
    UNIQUE/PRIMARY KEY constraint)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        args = getattr(exc, "args", ())
        if args and args[0] == 1062:
            return True
        if "UNIQUE constraint failed" in str(exc) or "Duplicate entry" in str(exc):
            return True
        todo += [getattr(exc, "orig", None), exc.__cause__, exc.__context__]
    return False


class OrderService:
    """Orders of buyers and merchants on a sharded cluster; see the module docstring."""

    def __init__(self, router: Router, *, ids: IdGenerator | None = None) -> None:
        self.router = router
        self._lease: WorkerLease | None = None
        if ids is None:
            topology = router.topology
            if topology.config.meta is not None:
                self._lease = WorkerLease.for_topology(topology)
                ids = self._lease.generator(topology, "orders")
            else:
                ids = topology.id_generator("orders")
        self.ids = ids

    def close(self) -> None:
        """Release the worker-id lease, if this service took one (the router stays open)."""
        if self._lease is not None:
            self._lease.close()
            self._lease = None

    # -- writes -------------------------------------------------------------------------------

    def new_order_key(self, user_id: int) -> int:
        """An idempotency key for one place-order request of ``user_id``: the order's id to
        be. Keep it and send it with every attempt of that request."""
        return self.ids.next_id(user_id=user_id)

    def place_order(
        self, user_id: int, merchant_id: int, items: Sequence[Item], idempotency_key: int
    ) -> int:
        """Write the order, its items and its merchant lookup row; return the order id (the
        key). A retry with the same key returns the same id and writes nothing."""
        if not items:
            raise ValueError("an order needs at least one item")
        _, slot = self.router.route_key(user_id=user_id)
        if self.ids.decode(idempotency_key).slot != slot:
            raise IdempotencyKeyError(
                f"key {idempotency_key} was not minted for user {user_id} (its slot is not the"
                " user's); get one from new_order_key(user_id)"
            )
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        now = now.replace(microsecond=now.microsecond // 1000 * 1000)  # DATETIME(3)
        params: dict[str, Any] = {
            "o": idempotency_key,
            "u": user_id,
            "m": merchant_id,
            "a": sum(item.qty * item.price_cents for item in items),
            "t": now,
        }
        values = []
        for line, item in enumerate(items):
            values.append(f"(:o, {line}, :u, :s{line}, :q{line}, :p{line})")
            params.update(
                {f"s{line}": item.sku, f"q{line}": item.qty, f"p{line}": item.price_cents}
            )
        try:
            with self.router.transaction() as tx:
                tx.execute(
                    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                    " created_at) VALUES (:o, :u, :m, 'new', :a, :t)",
                    params,
                )
                tx.execute(
                    "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents)"
                    " VALUES " + ", ".join(values),
                    params,
                )
        except ExecutionError as error:
            if not _is_duplicate_key(error):
                raise
            existing = self._summary_of(idempotency_key)
            if existing is None:
                raise  # a duplicate of something else
            if (existing.user_id, existing.merchant_id) != (user_id, merchant_id):
                raise IdempotencyKeyError(
                    f"key {idempotency_key} was used for another request (order of user"
                    f" {existing.user_id} at merchant {existing.merchant_id})"
                ) from error
        return idempotency_key

    def pay(self, order_id: int) -> bool:
        """``new -> paid``; False (nothing changed) when the order is not new."""
        return self._move(order_id, NEW, PAID)

    def cancel(self, order_id: int) -> bool:
        """``new -> cancelled`` or ``paid -> cancelled``; False when the order is cancelled
        already or absent. Each step is guarded, so a pay racing this cancel is either before
        it (then paid -> cancelled) or refused after it."""
        return self._move(order_id, NEW, CANCELLED) or self._move(order_id, PAID, CANCELLED)

    def purge(self, order_id: int) -> bool:
        """Delete a cancelled order and its items; False (nothing deleted) when the order is
        absent or not cancelled. The guard is the DELETE's own ``WHERE status``, so an order
        cannot be paid between the check and the delete."""
        with self.router.transaction() as tx:
            done = tx.execute(
                "DELETE FROM orders WHERE order_id = :o AND status = :cancelled",
                {"o": order_id, "cancelled": CANCELLED},
            )
            if done.rowcount != 1:
                return False
            tx.execute("DELETE FROM order_items WHERE order_id = :o", {"o": order_id})
        return True

    def _move(self, order_id: int, before: str, after: str) -> bool:
        if after not in TRANSITIONS[before]:
            raise ValueError(f"{before} -> {after} is not a transition of an order")
        done = self.router.execute(
            "UPDATE orders SET status = :new_status WHERE order_id = :o AND status = :old_status",
            {"new_status": after, "o": order_id, "old_status": before},
        )
        return done.rowcount == 1

    # -- reads --------------------------------------------------------------------------------

    def _summary_of(self, order_id: int) -> OrderSummary | None:
        rows = self.router.execute(
            f"SELECT {', '.join(_ORDER_COLUMNS)} FROM orders WHERE order_id = :o",
            {"o": order_id},
        ).rows
        return _summary(rows[0]) if rows else None

    def get_order(self, order_id: int) -> Order | None:
        """The order and its items (one shard, by the id's gene), or None."""
        summary = self._summary_of(order_id)
        if summary is None:
            return None
        rows = self.router.execute(
            "SELECT sku, qty, price_cents FROM order_items WHERE order_id = :o ORDER BY line",
            {"o": order_id},
        ).rows
        items = tuple(Item(str(sku), int(qty), int(price)) for sku, qty, price in rows)
        return Order(**vars(summary), items=items)

    def user_orders(
        self, user_id: int, after: Sequence[Any] | None = None, limit: int = 20
    ) -> OrderPage:
        """A page of the user's orders, newest first (one shard)."""
        return self._page({"user_id": user_id}, after, limit)

    def merchant_orders(
        self, merchant_id: int, after: Sequence[Any] | None = None, limit: int = 20
    ) -> OrderPage:
        """A page of the merchant's orders, newest first (the shards its lookup rows name)."""
        return self._page({"merchant_id": merchant_id}, after, limit)

    def _page(self, where: Mapping[str, Any], after: Sequence[Any] | None, limit: int) -> OrderPage:
        page = self.router.page(
            "orders",
            columns=_ORDER_COLUMNS,
            order_by=_PAGE_ORDER,
            where=where,
            after=after,
            limit=limit,
        )
        return OrderPage(tuple(_summary(row) for row in page.rows), page.after)

    def count_by_status(self) -> dict[str, int]:
        """Orders per status over the whole cluster (a read of every shard, merged)."""
        result = self.router.execute("SELECT status, COUNT(*) FROM orders GROUP BY status")
        return {str(status): int(count) for status, count in result.rows}
