"""The order service of loadtest/order_service.py (issue 10, section 1) on real MariaDB shards:
every operation against the session sandbox, compared with what the shards hold when read
directly (not through the router); idempotent retries, also two threads racing one key;
guarded status transitions; keyset pages; the back-office count."""

from __future__ import annotations

import random
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, create_engine, text

from shardrouter import Router, Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.ops.schema import apply

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
import order_service as svc  # noqa: E402  (loadtest/ is a folder of scripts, not a package)

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def topology(shard_databases: Path) -> Topology:
    topology = Topology.load(shard_databases)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    return topology


@pytest.fixture
def shards(topology: Topology) -> Iterator[dict[str, Engine]]:
    """A plain engine per shard, to read what is really stored; every order table emptied."""
    engines = {
        name: create_engine(topology.shards[name].primary.render_as_string(hide_password=False))
        for name in topology.shards
    }
    for engine in engines.values():
        with engine.begin() as conn:
            for logical in ("orders", "order_items", "merchant_orders"):
                for physical in topology.table(logical).physical_names:
                    conn.execute(text(f"DELETE FROM {physical}"))
    yield engines
    for engine in engines.values():
        engine.dispose()


@pytest.fixture
def service(topology: Topology) -> Iterator[svc.OrderService]:
    router = Router(topology)
    service = svc.OrderService(router)
    yield service
    service.close()
    router.close()


def stored(topology: Topology, shards: dict[str, Engine], logical: str, columns: str) -> list[Any]:
    """Every row of ``logical`` on every shard, read directly."""
    rows: list[Any] = []
    for engine in shards.values():
        with engine.connect() as conn:
            for physical in topology.table(logical).physical_names:
                rows += [tuple(r) for r in conn.execute(text(f"SELECT {columns} FROM {physical}"))]
    return rows


ITEMS = [svc.Item("SKU-1", 2, 1250), svc.Item("SKU-2", 1, 990)]


def place_many(service: svc.OrderService, users: int, per_user: int) -> dict[int, dict[str, Any]]:
    """Orders of ``users`` users at 5 merchants; order id -> what was placed."""
    rng = random.Random(10)
    placed: dict[int, dict[str, Any]] = {}
    for user in range(1, users + 1):
        for _ in range(per_user):
            merchant = rng.randrange(1, 6)
            items = [
                svc.Item(
                    f"SKU-{rng.randrange(99)}", rng.randrange(1, 4), 100 * rng.randrange(1, 50)
                )
            ]
            key = service.new_order_key(user)
            assert service.place_order(user, merchant, items, key) == key
            placed[key] = {"user": user, "merchant": merchant, "items": tuple(items)}
    return placed


def test_every_operation_matches_the_shards(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    placed = place_many(service, users=6, per_user=7)
    rows = stored(
        topology, shards, "orders", "order_id, user_id, merchant_id, status, amount_cents"
    )
    assert sorted(rows) == sorted(
        (o, p["user"], p["merchant"], "new", sum(i.qty * i.price_cents for i in p["items"]))
        for o, p in placed.items()
    )
    # every order on the shard its id routes to, its lookup row written once
    for order_id in placed:
        owner = topology.shard_for("orders", order_id, "order_id")
        with shards[owner].connect() as conn:
            physical = topology.route("orders", "order_id", order_id).physical_table
            hit = conn.execute(text(f"SELECT COUNT(*) FROM {physical} WHERE order_id = {order_id}"))
            assert hit.scalar() == 1
    lookups = stored(topology, shards, "merchant_orders", "merchant_id, order_id, user_id")
    assert sorted(lookups) == sorted((p["merchant"], o, p["user"]) for o, p in placed.items())

    # get_order: the row and its items, lines in order
    for order_id, p in placed.items():
        order = service.get_order(order_id)
        assert order is not None
        assert (order.order_id, order.user_id, order.merchant_id, order.status) == (
            order_id,
            p["user"],
            p["merchant"],
            "new",
        )
        assert order.items == p["items"]
    assert service.get_order(service.new_order_key(1)) is None  # minted, never placed

    # pages walk every order exactly once, newest first
    for user in range(1, 7):
        seen: list[svc.OrderSummary] = []
        page = service.user_orders(user, limit=3)
        while True:
            seen += page.orders
            if page.after is None:
                break
            page = service.user_orders(user, after=page.after, limit=3)
        assert sorted(o.order_id for o in seen) == sorted(
            o for o, p in placed.items() if p["user"] == user
        )
        assert len({o.order_id for o in seen}) == len(seen)
        keys = [(o.created_at, o.order_id) for o in seen]
        assert keys == sorted(keys, reverse=True)
    for merchant in range(1, 6):
        seen = []
        after: Any = None
        while True:
            page = service.merchant_orders(merchant, after=after, limit=4)
            seen += page.orders
            assert len(page) <= 4
            after = page.after
            if after is None:
                break
        expected = sorted(o for o, p in placed.items() if p["merchant"] == merchant)
        assert sorted(o.order_id for o in seen) == expected
        assert all(o.merchant_id == merchant for o in seen)

    # transitions, then the back-office count equals a direct count of the shards
    ids = sorted(placed)
    assert all(service.pay(o) for o in ids[:10])
    assert all(service.cancel(o) for o in ids[5:15])  # 5 paid -> cancelled, 5 new -> cancelled
    direct = Counter(status for (status,) in stored(topology, shards, "orders", "status"))
    assert direct == Counter({"new": len(ids) - 15, "paid": 5, "cancelled": 10})
    assert service.count_by_status() == dict(direct)


def test_a_retried_request_writes_one_order(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    key = service.new_order_key(42)
    first = service.place_order(42, 7, ITEMS, key)
    for _ in range(3):
        assert service.place_order(42, 7, ITEMS, key) == first
    assert stored(topology, shards, "orders", "order_id") == [(first,)]
    assert sorted(stored(topology, shards, "order_items", "order_id, line")) == [
        (first, 0),
        (first, 1),
    ]
    assert stored(topology, shards, "merchant_orders", "merchant_id, order_id") == [(7, first)]
    # a retry after a state change still answers the order, and changes nothing
    assert service.pay(first)
    assert service.place_order(42, 7, ITEMS, key) == first
    order = service.get_order(first)
    assert order is not None and order.status == "paid"


def test_a_key_of_another_request_is_refused_and_writes_nothing(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    key = service.new_order_key(42)
    service.place_order(42, 7, ITEMS, key)
    with pytest.raises(svc.IdempotencyKeyError, match="used for another request"):
        service.place_order(42, 8, ITEMS, key)  # same user, another merchant
    other = next(
        u
        for u in range(43, 10_000)
        if topology.route("orders", "user_id", u).slot
        != topology.route("orders", "user_id", 42).slot
    )
    with pytest.raises(svc.IdempotencyKeyError, match="not minted for user"):
        service.place_order(other, 7, ITEMS, key)
    with pytest.raises(ValueError, match="at least one item"):
        service.place_order(42, 7, [], service.new_order_key(42))
    assert stored(topology, shards, "orders", "order_id, merchant_id") == [(key, 7)]
    assert stored(topology, shards, "merchant_orders", "merchant_id, order_id") == [(7, key)]
    assert len(stored(topology, shards, "order_items", "order_id")) == 2


def together(*calls: Callable[[], Any]) -> list[Any]:
    """Run the calls in threads released at once; their results in order (an exception is
    raised here, after every thread ended)."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait(10)
        try:
            out[i] = calls[i]()
        except BaseException as error:  # re-raised below
            out[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for result in out:
        if isinstance(result, BaseException):
            raise result
    return out


def test_two_threads_racing_one_key_write_one_order(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    keys = [service.new_order_key(100 + n) for n in range(8)]
    for n, key in enumerate(keys):
        place = partial(service.place_order, 100 + n, 7, ITEMS, key)
        assert together(place, place) == [key, key]
    assert sorted(stored(topology, shards, "orders", "order_id")) == sorted((k,) for k in keys)
    items = Counter(o for (o,) in stored(topology, shards, "order_items", "order_id"))
    assert items == Counter({k: 2 for k in keys})
    lookups = stored(topology, shards, "merchant_orders", "order_id")
    assert sorted(lookups) == sorted((k,) for k in keys)


def test_guarded_transitions_refuse_illegal_moves(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    def status(order_id: int) -> str:
        order = service.get_order(order_id)
        assert order is not None
        return order.status

    a = service.place_order(1, 1, ITEMS, service.new_order_key(1))
    assert service.pay(a) and status(a) == "paid"
    assert not service.pay(a) and status(a) == "paid"  # paid -> paid: refused
    assert service.cancel(a) and status(a) == "cancelled"  # paid -> cancelled
    assert not service.pay(a) and status(a) == "cancelled"  # cancelled is final
    assert not service.cancel(a) and status(a) == "cancelled"

    b = service.place_order(2, 1, ITEMS, service.new_order_key(2))
    assert service.cancel(b) and status(b) == "cancelled"  # new -> cancelled
    assert not service.pay(b) and status(b) == "cancelled"

    absent = service.new_order_key(3)
    assert not service.pay(absent) and not service.cancel(absent)
    assert service.get_order(absent) is None
    assert svc.TRANSITIONS["cancelled"] == frozenset()
    assert Counter(s for (s,) in stored(topology, shards, "orders", "status")) == {"cancelled": 2}


def test_racing_pay_and_cancel_end_in_one_legal_state(
    topology: Topology, shards: dict[str, Engine], service: svc.OrderService
) -> None:
    """pay and cancel of one new order at once: cancel always wins in the end (before pay:
    new -> cancelled, pay refused; after: paid -> cancelled); never paid after a cancel."""
    for n in range(10):
        order_id = service.place_order(n, 1, ITEMS, service.new_order_key(n))
        _paid, cancelled = together(
            partial(service.pay, order_id), partial(service.cancel, order_id)
        )
        order = service.get_order(order_id)
        assert order is not None and order.status == "cancelled"
        assert cancelled is True


def test_the_readme_block_runs_on_mariadb(
    topology: Topology, shards: dict[str, Engine], monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "readme_blocks", REPO / "tests/unit/test_readme.py"
    )
    assert spec is not None and spec.loader is not None
    readme = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, readme)  # its dataclasses look their module up
    spec.loader.exec_module(readme)
    monkeypatch.chdir(REPO)
    router = Router(topology)
    namespace: dict[str, Any] = {"router": router}
    try:
        exec(compile(readme.block(readme.ORDER_SERVICE_FIRST).code, "README", "exec"), namespace)
    finally:
        namespace["orders"].close()
        router.close()
    order_id = namespace["order_id"]
    assert stored(topology, shards, "orders", "order_id, status") == [(order_id, "paid")]
    assert namespace["paid"] == (True, False)
