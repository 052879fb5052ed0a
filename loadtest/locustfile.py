"""Locust load test of an order service built on shardrouter (no HTTP: the Router is the client).

Each simulated buyer places orders (order + items in one single-shard transaction, lookup row
first), lists their orders, reads one order by id (gene routing), and now and then a merchant
pages through its orders (lookup) or the back office counts orders (fan-out). Loopback only.

    shardctl sandbox up --shards 4 --dir .sandbox
    shardctl schema apply --config .sandbox/topology.yaml
    SHARDROUTER_TOPOLOGY=.sandbox/topology.yaml \\
        locust -f loadtest/locustfile.py --headless -u 20 -r 5 -t 30s --only-summary

Every request is reported to Locust with its latency; failures carry the exception class.
"""

from __future__ import annotations

import datetime as dt
import os
import random
import time
from collections.abc import Callable
from typing import Any

from locust import User, between, events, task

from shardrouter import Router, Topology

_router: Router | None = None


def router() -> Router:
    global _router
    if _router is None:
        topology = Topology.load(os.environ.get("SHARDROUTER_TOPOLOGY", ".sandbox/topology.yaml"))
        _router = Router(topology, max_offset=1000)
    return _router


@events.quitting.add_listener
def _close(environment: Any, **kwargs: Any) -> None:
    if _router is not None:
        _router.close()


class Buyer(User):
    """One user id, its orders, and what its shop and back office do around it."""

    wait_time = between(0.0, 0.02)

    def on_start(self) -> None:
        self.user_id = random.randrange(1, 2**40)
        self.orders: list[int] = []
        self.ids = router().topology.id_generator("orders")

    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        exc: BaseException | None = None
        result = None
        try:
            result = fn()
        except Exception as error:  # reported to Locust, not raised: the run goes on
            exc = error
        self.environment.events.request.fire(
            request_type="router",
            name=name,
            response_time=(time.perf_counter() - start) * 1000,
            response_length=len(getattr(result, "rows", []) or []),
            exception=exc,
            context={},
        )
        return result

    @task(5)
    def place_order(self) -> None:
        order_id = self.ids.next_id(user_id=self.user_id)
        merchant = random.randrange(200)
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None).isoformat(sep=" ")

        def write() -> None:
            with router().transaction() as tx:
                tx.execute(
                    "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                    " created_at) VALUES (:o, :u, :m, 'new', :a, :t)",
                    {
                        "o": order_id,
                        "u": self.user_id,
                        "m": merchant,
                        "a": random.randrange(100, 90_000),
                        "t": now,
                    },
                )
                tx.execute(
                    "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents)"
                    " VALUES (:o, 0, :u, 'sku-1', 1, 100), (:o, 1, :u, 'sku-2', 2, 250)",
                    {"o": order_id, "u": self.user_id},
                )

        self._timed("place order (txn + lookup)", write)
        self.orders.append(order_id)

    @task(10)
    def my_orders(self) -> None:
        self._timed(
            "my orders (user_id)",
            lambda: router().execute(
                "SELECT order_id, status, amount_cents FROM orders WHERE user_id = :u"
                " ORDER BY created_at DESC LIMIT 20",
                {"u": self.user_id},
            ),
        )

    @task(10)
    def one_order(self) -> None:
        if self.orders:
            order_id = random.choice(self.orders)
            self._timed(
                "one order (gene)",
                lambda: router().execute(
                    "SELECT o.order_id, i.line, i.qty FROM orders o JOIN order_items i"
                    " ON o.order_id = i.order_id WHERE o.order_id = :o",
                    {"o": order_id},
                ),
            )

    @task(2)
    def merchant_page(self) -> None:
        merchant = random.randrange(200)
        self._timed(
            "merchant page (lookup)",
            lambda: router().page(
                "orders",
                columns=("order_id", "status"),
                order_by=("created_at", "order_id"),
                where={"merchant_id": merchant},
                limit=20,
            ),
        )

    @task(1)
    def back_office(self) -> None:
        self._timed(
            "back office count (fan-out)",
            lambda: router().execute(
                "SELECT status, COUNT(*), SUM(amount_cents) FROM orders GROUP BY status"
            ),
        )
