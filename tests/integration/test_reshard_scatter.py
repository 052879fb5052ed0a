"""Reads across shards during a migration (issue 9; issue 10 needs its back-office counts to
keep working through a reshard). A shard that holds a migration's copies besides its own rows
(Topology.mirrored: the source between the switch and finalize, a target that already serves
slots between start and the switch) skips them by the slot in the rows' ids (orders.order_id,
order_items.order_id: Target.exclude). Answers must equal the answers before the migration
(no writes in between); statements whose copies cannot be skipped are refused typed, as
before. Real MariaDB."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from reshard_cluster import Cluster, build_cluster
from reshard_load import INSERT_ITEM, INSERT_ORDER, INSERT_USER

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError
from shardrouter.reshard import state
from shardrouter.reshard.plan import plan_move
from shardrouter.reshard.workflow import Workflow

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

ANSWERED = (
    "SELECT COUNT(*) FROM orders",
    "SELECT status, COUNT(*), SUM(amount_cents) FROM orders GROUP BY status ORDER BY status",
    "SELECT order_id, user_id, status FROM orders ORDER BY order_id DESC LIMIT 7",
    "SELECT o.order_id, i.line, i.sku FROM orders o JOIN order_items i"
    " ON i.order_id = o.order_id ORDER BY o.order_id, i.line",
    "SELECT o.order_id, COUNT(i.line) FROM orders o LEFT JOIN order_items i"
    " ON i.order_id = o.order_id GROUP BY o.order_id ORDER BY o.order_id",
    "SELECT user_id, COUNT(*) FROM orders WHERE status = 'paid' GROUP BY user_id"
    " HAVING COUNT(*) > 0 ORDER BY user_id",
    "SELECT DISTINCT user_id FROM order_items ORDER BY user_id",
    "SELECT o.status, c.name FROM orders o JOIN countries c ON c.code = 'de'"
    " ORDER BY o.order_id LIMIT 3",
)
REFUSED = (
    "SELECT COUNT(*) FROM users",  # hashed keys: the slot is not computable in SQL
    "SELECT email FROM users ORDER BY user_id LIMIT 3",
)


@pytest.fixture
def cluster(shard_databases: Path, sandbox: Any, tmp_path: Path) -> Iterator[Cluster]:
    with build_cluster(shard_databases, sandbox, tmp_path, "reshard_sc") as made:
        yield made


def _fill(cluster: Cluster) -> None:
    topology = cluster.slots
    router = Router(cluster.current())
    try:
        router.execute("INSERT INTO countries (code, name) VALUES ('de', 'Germany')")
        n = 0
        for user in range(1, 80):
            router.execute(INSERT_USER, {"u": user, "e": f"u{user}@example.com", "n": "u"})
            slot = topology.slot_for("orders", user)
            for k in range(user % 3):
                n += 1
                order = int(topology.id_layout.compose(n, slot, 1, 0))
                router.execute(
                    INSERT_ORDER, {"o": order, "u": user, "m": 1 + user % 5, "a": 100 * user}
                )
                for line in range(k + 1):
                    router.execute(
                        INSERT_ITEM,
                        {"o": order, "l": line, "u": user, "s": f"sku{line}", "q": 1, "p": 5},
                    )
                if user % 4 == 0:
                    router.execute(
                        "UPDATE orders SET status = 'paid' WHERE order_id = :o", {"o": order}
                    )
    finally:
        router.close()


def _live(cluster: Cluster) -> Topology:
    """The store's current version as routers serve it (moving ranges included)."""
    found = cluster.store.current()
    assert found is not None
    doc = copy.deepcopy(dict(found.document))
    doc.pop("meta", None)
    return Topology(config_from_dict(doc))


def _answers(cluster: Cluster) -> dict[str, list[tuple[Any, ...]]]:
    router = Router(_live(cluster))
    try:
        out = {sql: [tuple(r) for r in router.execute(sql).rows] for sql in ANSWERED}
        for sql in REFUSED:
            if router.topology.mirrored:
                with pytest.raises(UnsupportedQueryError, match="refused"):
                    router.execute(sql)
        return out
    finally:
        router.close()


@pytest.mark.parametrize(
    ("to", "steps", "mirrored"),
    [
        ("s2", ("start", "copy", "verify", "switch"), "s0"),  # new target: the source after
        ("s1", ("start", "copy"), "s1"),  # a serving target before the switch
        ("s1", ("start", "copy", "verify", "switch"), "s0"),
    ],
    ids=["new-target-switched", "serving-target-copied", "serving-target-switched"],
)
def test_reads_across_shards_skip_the_copies(
    cluster: Cluster, to: str, steps: tuple[str, ...], mirrored: str
) -> None:
    _fill(cluster)
    before = _answers(cluster)
    assert before["SELECT COUNT(*) FROM orders"][0][0] > 40
    found = cluster.store.current()
    assert found is not None
    new = {to: cluster.four["shards"][to]} if to not in found.document["shards"] else {}
    plan = plan_move(
        found.document, (0, 256), to, new, base_version=found.version, migration_id="m-sc"
    )
    state.create(cluster.store, plan)
    with Workflow(cluster.store, "m-sc") as flow:
        for step in steps:
            flow.act(step)
        assert mirrored in _live(cluster).mirrored, _live(cluster).mirrored
        during = _answers(cluster)
        for sql in ANSWERED:
            assert during[sql] == before[sql], sql
        if "switch" in steps:
            flow.act("finalize")
        else:
            flow.act("rollback")
            flow.act("cancel")
    assert not _live(cluster).mirrored
    after = _answers(cluster)
    for sql in ANSWERED:
        assert after[sql] == before[sql], sql
