"""loadtest/order_service.py (issue 10, section 1) uses the public shardrouter API only, and its
operations run on the demo's SQLite backend too (the MariaDB tests, races included, are
tests/integration/test_order_service.py)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

import shardrouter
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.schema import apply

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "loadtest" / "order_service.py"


def test_only_public_names_are_imported() -> None:
    imported: list[str] = []
    for node in ast.walk(ast.parse(MODULE.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("shardrouter"):
            assert node.module == "shardrouter", f"private module {node.module}"
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            assert not any(a.name.startswith("shardrouter") for a in node.names)
    assert imported and set(imported) <= set(shardrouter.__all__), imported


@pytest.mark.timeout(60)
def test_operations_on_sqlite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(REPO / "loadtest"))
    import order_service as svc

    topology = Topology.load(
        REPO / "config" / "orders-sqlite.yaml", {"SHARDROUTER_DEMO_DIR": str(tmp_path)}
    )
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    router = Router(topology)
    service = svc.OrderService(router)
    try:
        items = [svc.Item("A", 1, 100), svc.Item("B", 3, 20)]
        placed = []
        for n in range(12):
            user = 1 + n % 3
            key = service.new_order_key(user)
            assert service.place_order(user, 5 + n % 2, items, key) == key
            assert service.place_order(user, 5 + n % 2, items, key) == key  # a retry
            placed.append((key, user))
        order = service.get_order(placed[0][0])
        assert order is not None and order.items == tuple(items) and order.amount_cents == 160
        walked = []
        page = service.merchant_orders(5, limit=2)
        while True:
            walked += [o.order_id for o in page]
            if page.after is None:
                break
            page = service.merchant_orders(5, after=page.after, limit=2)
        assert sorted(walked) == sorted(k for n, (k, _) in enumerate(placed) if n % 2 == 0)
        user_1 = [o.order_id for o in service.user_orders(1, limit=100)]
        assert sorted(user_1) == sorted(k for k, u in placed if u == 1)
        assert service.pay(placed[0][0]) and not service.pay(placed[0][0])
        assert service.cancel(placed[1][0]) and not service.pay(placed[1][0])
        assert service.count_by_status() == {"new": 10, "paid": 1, "cancelled": 1}
    finally:
        service.close()
        router.close()
        sys.modules.pop("order_service", None)


@pytest.mark.timeout(60)
def test_a_router_following_a_meta_store_gets_a_leased_worker_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With a meta store, topology.id_generator() refuses without a worker id: the service
    leases one (WorkerLease) and releases it on close()."""
    import yaml

    from shardrouter import MetaStore
    from shardrouter.control.leases import worker_leases

    monkeypatch.syspath_prepend(str(REPO / "loadtest"))
    import order_service as svc

    raw = yaml.safe_load((REPO / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw["meta"] = {"url": f"sqlite:///{tmp_path / 'meta.db'}"}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    monkeypatch.setenv("SHARDROUTER_DEMO_DIR", str(tmp_path))
    topology = Topology.load(path)
    engines = ShardEngines(topology)
    apply(topology, engines).raise_for_errors()
    engines.dispose()
    assert topology.config.meta is not None
    with MetaStore.from_config(topology.config.meta) as store:
        store.init()
        store.push(raw, expected=None)
        router = Router.load(path)
        service = svc.OrderService(router)
        try:
            (lease,) = worker_leases(store)
            assert lease.holder is not None  # held by this service
            key = service.new_order_key(42)
            assert service.ids.decode(key).worker == lease.worker_id
            assert service.place_order(42, 1, [svc.Item("A", 1, 100)], key) == key
        finally:
            service.close()
            router.close()
            sys.modules.pop("order_service", None)
        (lease,) = worker_leases(store)
        assert lease.holder is None  # released
