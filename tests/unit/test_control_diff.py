"""control.diff: every change kind between two topology versions, its verdict and its message."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from shardrouter.control import diff as diff_module
from shardrouter.control.diff import RESHARD, ChangeKind, TopologyDiff, diff_topologies
from shardrouter.core.config import TopologyConfig, config_from_dict
from shardrouter.errors import ConfigError, TopologyChangeError

pytestmark = pytest.mark.timeout(30)

SECRET = "s3cr3t-diff"
META_SECRET = "m3ta-diff"

BASE: dict[str, Any] = {
    "name": "orders",
    "slots": 1024,
    "shards": {
        "s0": {"primary": f"mysql+pymysql://app:{SECRET}@db0:3306/orders_s0", "slots": [[0, 512]]},
        "s1": {
            "primary": f"mysql+pymysql://app:{SECRET}@db1:3306/orders_s1",
            "slots": [[512, 1024]],
        },
    },
    "tables": {
        "users": {"column": "user_id", "strategy": "hash"},
        "orders": {
            "column": "user_id",
            "strategy": "hash",
            "split": 2,
            "secondary": [{"column": "order_id", "strategy": "gene"}],
        },
        "order_items": {"bound_to": "orders"},
        "countries": {"broadcast": True},
    },
    "meta": {"url": f"mysql+pymysql://meta:{META_SECRET}@dbm:3306/shardmeta"},
}

Mutation = Callable[[dict[str, Any]], None]


def config(mutate: Mutation | None = None) -> TopologyConfig:
    raw = copy.deepcopy(BASE)
    if mutate is not None:
        mutate(raw)
    return config_from_dict(raw, env={})


def changes_of(new: Mutation, old: Mutation | None = None) -> TopologyDiff:
    return diff_topologies(config(old), config(new))


def assert_no_secret(diff: TopologyDiff) -> None:
    text = json.dumps(diff.as_dict()) + "\n".join(c.render() for c in diff.changes)
    assert SECRET not in text and META_SECRET not in text, text


def add_shard(slots: list[list[int]]) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        raw["shards"]["s2"] = {
            "primary": f"mysql+pymysql://app:{SECRET}@db2/orders_s2",
            "slots": slots,
        }

    return mutate


def _set(path: str, value: Any) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _both(*mutations: Mutation) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        for m in mutations:
            m(raw)

    return mutate


def _drop(path: str) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


# -- safe changes: (new, old, kind, line, reason fragment, needs confirmation) --------------------

SAFE = [
    pytest.param(
        _set("name", "orders-eu"),
        None,
        ChangeKind.NAME,
        "name: 'orders' -> 'orders-eu'",
        "",
        False,
        id="name",
    ),
    pytest.param(
        _set("tables.refunds", {"column": "user_id", "strategy": "hash"}),
        None,
        ChangeKind.TABLE_ADDED,
        "tables.refunds added (sharded by user_id (int, hash))",
        "create it on every shard first (`shardctl schema apply`)",
        False,
        id="table-added",
    ),
    pytest.param(
        _set("tables.refund_items", {"bound_to": "orders"}),
        None,
        ChangeKind.TABLE_ADDED,
        "tables.refund_items added (bound to orders)",
        "schema apply",
        False,
        id="bound-table-added",
    ),
    pytest.param(
        _set("tables.currencies", {"broadcast": True}),
        None,
        ChangeKind.TABLE_ADDED,
        "tables.currencies added (broadcast)",
        "schema apply",
        False,
        id="broadcast-table-added",
    ),
    pytest.param(
        add_shard([]),
        None,
        ChangeKind.SHARD_ADDED,
        "shards.s2 added (mysql+pymysql://app:***@db2/orders_s2), owning no slots yet",
        "apply the schema to it first",
        False,
        id="shard-added-without-slots",
    ),
    pytest.param(
        lambda raw: None,
        add_shard([]),
        ChangeKind.SHARD_REMOVED,
        "shards.s2 removed (mysql+pymysql://app:***@db2/orders_s2, owned no slots)",
        "no rows are routed to it",
        False,
        id="empty-shard-removed",
    ),
    pytest.param(
        _set("shards.s0.replicas", [f"mysql+pymysql://ro:{SECRET}@db0r/orders_s0"]),
        None,
        ChangeKind.REPLICAS,
        "shards.s0.replicas: [none] -> [mysql+pymysql://ro:***@db0r/orders_s0]",
        "reads use the new replica set",
        False,
        id="replica-added",
    ),
    pytest.param(
        lambda raw: None,
        _set("shards.s0.replicas", [f"mysql+pymysql://ro:{SECRET}@db0r/orders_s0"]),
        ChangeKind.REPLICAS,
        "shards.s0.replicas: [mysql+pymysql://ro:***@db0r/orders_s0] -> [none]",
        "reads use the new replica set",
        False,
        id="replica-removed",
    ),
    pytest.param(
        _set("shards.s1.pool", {"size": 20, "query_timeout_s": 10}),
        None,
        ChangeKind.POOL,
        "shards.s1.pool.query_timeout_s: 30.0 -> 10.0",
        "",
        False,
        id="pool-settings",
    ),
    pytest.param(
        _set("shards.s1.primary", f"mysql+pymysql://app:{SECRET}@db1-promoted:3306/orders_s1"),
        None,
        ChangeKind.PRIMARY_REPOINTED,
        "shards.s1.primary: mysql+pymysql://app:***@db1:3306/orders_s1"
        " -> mysql+pymysql://app:***@db1-promoted:3306/orders_s1",
        "a failover",
        True,
        id="primary-repointed",
    ),
    pytest.param(
        _set("shards.s1.primary", "mysql+mysqldb://app:rotated@db1:3306/orders_s1"),
        None,
        ChangeKind.CONNECTION_SETTINGS,
        "shards.s1.primary: mysql+pymysql://app:***@db1:3306/orders_s1"
        " -> mysql+mysqldb://app:***@db1:3306/orders_s1",
        "same server and database",
        False,
        id="password-and-driver-of-the-same-database",
    ),
    pytest.param(
        _set("shards.s0.slots", [[0, 100], [100, 512]]),
        None,
        ChangeKind.SLOT_RANGES_REWRITTEN,
        "shards.s0.slots: [0, 512) -> [0, 100), [100, 512)",
        "the same slots, written differently",
        False,
        id="slot-ranges-rewritten",
    ),
    pytest.param(
        _set("ids.worker_id", 3),
        None,
        ChangeKind.WORKER_ID,
        "ids.worker_id: 0 -> 3",
        "generators lease theirs",
        False,
        id="worker-id",
    ),
    pytest.param(
        _set("ids.max_backward_ms", 50),
        None,
        ChangeKind.MAX_BACKWARD,
        "ids.max_backward_ms: 100 -> 50",
        "give up sooner",
        False,
        id="max-backward-lowered",
    ),
    pytest.param(
        lambda raw: None,
        _drop("meta"),
        ChangeKind.META_ADDED,
        "meta: added (mysql+pymysql://meta:***@dbm:3306/shardmeta)",
        "poll and lease settings",
        False,
        id="meta-added",
    ),
    pytest.param(
        _set("meta.poll_interval_s", 0.5),
        None,
        ChangeKind.META_SETTINGS,
        "meta.poll_interval_s: 1.0 -> 0.5",
        "",
        False,
        id="meta-poll-interval",
    ),
    pytest.param(
        _set("meta.url", "mysql+pymysql://meta2:rotated@dbm:3306/shardmeta"),
        None,
        ChangeKind.CONNECTION_SETTINGS,
        "meta.url: mysql+pymysql://meta:***@dbm:3306/shardmeta"
        " -> mysql+pymysql://meta2:***@dbm:3306/shardmeta",
        "same server and database",
        False,
        id="meta-credentials",
    ),
]


@pytest.mark.parametrize(("new", "old", "kind", "line", "reason", "confirm"), SAFE)
def test_safe_change(
    new: Mutation, old: Mutation | None, kind: ChangeKind, line: str, reason: str, confirm: bool
) -> None:
    diff = changes_of(new, old)
    assert diff.safe and not diff.empty
    (change,) = [c for c in diff.changes if c.line == line]
    assert change.kind is kind and change.safe
    assert reason in change.reason
    assert bool(change.confirm) is confirm
    assert change.render().startswith(f"safe    {line}")
    assert {c.kind for c in diff.changes} == {kind}
    diff.raise_if_refused()  # nothing to refuse
    assert_no_secret(diff)


def test_primary_repointed_asks_the_operator() -> None:
    diff = changes_of(
        _set("shards.s1.primary", f"mysql+pymysql://app:{SECRET}@db1-promoted/orders_s1")
    )
    (change,) = diff.confirmations
    assert change.confirm == (
        "shard s1's primary moves to mysql+pymysql://app:***@db1-promoted/orders_s1. That server"
        " must already hold every row of s1 (a promoted, caught-up replica): shardrouter copies"
        " nothing, and writes go there as soon as routers switch. Is it the shard's new primary?"
    )
    assert diff.as_dict()["confirmations"] == [change.confirm]


def test_pool_changes_are_one_line_per_setting() -> None:
    diff = changes_of(_set("shards.s1.pool", {"size": 20, "query_timeout_s": 10}))
    assert [c.line for c in diff.changes] == [
        "shards.s1.pool.query_timeout_s: 30.0 -> 10.0",
        "shards.s1.pool.size: 5 -> 20",
    ]


# -- refused changes: (new, old, kind, line, reason fragment naming the way out) -----------------

REFUSED = [
    pytest.param(
        _both(_set("shards.s0.slots", [[0, 256]]), _set("shards.s1.slots", [[256, 1024]])),
        None,
        ChangeKind.SLOTS_MOVED,
        "slots [256, 512) move from s0 to s1",
        RESHARD,
        id="slots-moved",
    ),
    pytest.param(
        _both(
            _set("slots", 2048),
            _set("ids", {"gene_bits": 11, "timestamp_bits": 40}),
            _set("shards.s1.slots", [[512, 2048]]),
        ),
        None,
        ChangeKind.SLOT_COUNT,
        "slots: 1024 -> 2048",
        "the slot count is fixed for the life of a cluster (every key's slot and every id's gene"
        " depend on it); keep slots: 1024",
        id="slot-count",
    ),
    pytest.param(
        _set("ids.epoch", "2024-01-01T00:00:00Z"),
        None,
        ChangeKind.ID_LAYOUT,
        'ids.epoch: "2025-01-01 00:00:00+00:00" -> "2024-01-01 00:00:00+00:00"',
        "the id layout of a live cluster cannot change: issued ids would decode to other slots"
        ' and times, and new ids could repeat old ones; keep ids.epoch: "2025-01-01',
        id="id-epoch",
    ),
    pytest.param(
        _set("ids", {"worker_bits": 9, "timestamp_bits": 40}),
        None,
        ChangeKind.ID_LAYOUT,
        "ids.worker_bits: 8 -> 9",
        "keep ids.worker_bits: 8",
        id="id-worker-bits",
    ),
    pytest.param(
        _set("ids", {"sequence_bits": 5, "timestamp_bits": 40}),
        None,
        ChangeKind.ID_LAYOUT,
        "ids.sequence_bits: 4 -> 5",
        "keep ids.sequence_bits: 4",
        id="id-sequence-bits",
    ),
    pytest.param(
        _set("ids.max_backward_ms", 1000),
        None,
        ChangeKind.MAX_BACKWARD,
        "ids.max_backward_ms: 100 -> 1000",
        "could let a reused worker id repeat ids; keep ids.max_backward_ms: 100 (lowering it is"
        " safe)",
        id="max-backward-raised",
    ),
    pytest.param(
        _set("tables.users.column", "uid"),
        None,
        ChangeKind.TABLE_RULE,
        "tables.users.column: 'user_id' -> 'uid'",
        "the rows of users are placed by its current rule, and a new rule would look for them on"
        " other shards (or miss them); keep tables.users.column: 'user_id' (re-placing a table's"
        " rows is a migration, not a push)",
        id="table-column",
    ),
    pytest.param(
        _set("tables.users.type", "str"),
        None,
        ChangeKind.TABLE_RULE,
        "tables.users.type: 'int' -> 'str'",
        "keep tables.users.type: 'int'",
        id="table-type",
    ),
    pytest.param(
        _set("tables.users.strategy", "mod"),
        None,
        ChangeKind.TABLE_RULE,
        "tables.users.strategy: 'hash' -> 'mod'",
        "keep tables.users.strategy: 'hash'",
        id="table-strategy",
    ),
    pytest.param(
        _set("tables.orders.secondary", []),
        None,
        ChangeKind.TABLE_RULE,
        'tables.orders.secondary: [{"column": "order_id", "strategy": "gene", "type": "int"}] -> []',
        "keep tables.orders.secondary",
        id="table-secondary",
    ),
    pytest.param(
        _set("tables.order_items.bound_to", "users"),
        None,
        ChangeKind.TABLE_RULE,
        "tables.order_items.bound_to: 'orders' -> 'users'",
        "keep tables.order_items.bound_to: 'orders'",
        id="table-bound-to",
    ),
    pytest.param(
        _set("tables.countries", {"column": "code", "type": "str", "strategy": "hash"}),
        None,
        ChangeKind.TABLE_RULE,
        "tables.countries.broadcast: true -> false",
        "keep tables.countries.broadcast: true",
        id="table-broadcast",
    ),
    pytest.param(
        _set("tables.orders.split", 4),
        None,
        ChangeKind.TABLE_RULE,
        "tables.orders.split: 2 -> 4",
        "keep tables.orders.split: 2",
        id="table-split",
    ),
    pytest.param(
        _drop("tables.users"),
        None,
        ChangeKind.TABLE_REMOVED,
        "tables.users removed",
        "its rows stay on the shards and routers would refuse every statement on users; keep it"
        " in the file",
        id="table-removed",
    ),
    pytest.param(
        _both(_drop("shards.s1"), _set("shards.s0.slots", [[0, 1024]])),
        None,
        ChangeKind.SHARD_REMOVED,
        "shards.s1 removed (it owns slots [512, 1024))",
        "move them away with `shardctl reshard` first, then remove the empty shard",
        id="shard-with-slots-removed",
    ),
    pytest.param(
        _both(add_shard([[768, 1024]]), _set("shards.s1.slots", [[512, 768]])),
        None,
        ChangeKind.SHARD_ADDED,
        "shards.s2 added (mysql+pymysql://app:***@db2/orders_s2) owning slots [768, 1024)",
        "a new shard starts empty: add it with slots: [] and move slots to it with `shardctl"
        " reshard`",
        id="shard-added-with-slots",
    ),
    pytest.param(  # (two shards on one database in one version: a ConfigError already)
        lambda raw: (
            _set("shards.s1.primary", f"mysql+pymysql://app:{SECRET}@db9:3306/orders_s9")(raw),
            _set(
                "shards.s2",
                {"primary": f"mysql+pymysql://other:{SECRET}@db1:3306/orders_s1", "slots": []},
            )(raw),
        )[-1],
        None,
        ChangeKind.SHARED_DATABASE,
        "shards.s2.primary: mysql+pymysql://other:***@db1:3306/orders_s1 is shard s1's primary"
        " database in the current version",
        "re-places data, it is not a failover",
        id="new-shard-in-another-shards-database",
    ),
    pytest.param(
        _set("meta.url", f"mysql+pymysql://meta:{META_SECRET}@elsewhere:3306/shardmeta"),
        None,
        ChangeKind.META_URL,
        "meta.url: mysql+pymysql://meta:***@dbm:3306/shardmeta"
        " -> mysql+pymysql://meta:***@elsewhere:3306/shardmeta",
        "a meta store cannot move itself: routers would follow a store that holds no versions;"
        " keep meta.url",
        id="meta-url",
    ),
    pytest.param(
        _drop("meta"),
        None,
        ChangeKind.META_REMOVED,
        "meta: removed",
        "keep the meta: section",
        id="meta-removed",
    ),
]


@pytest.mark.parametrize(("new", "old", "kind", "line", "reason"), REFUSED)
def test_refused_change(
    new: Mutation, old: Mutation | None, kind: ChangeKind, line: str, reason: str
) -> None:
    diff = changes_of(new, old)
    assert not diff.safe
    (change,) = [c for c in diff.changes if c.line == line]
    assert change.kind is kind and not change.safe
    assert reason in change.reason, change.reason
    assert change.render() == f"REFUSED {line}: {change.reason}"
    with pytest.raises(TopologyChangeError) as info:
        diff.raise_if_refused()
    assert f"{line}: {change.reason}" in info.value.problems
    assert f"  {line}: {change.reason}" in str(info.value)
    assert_no_secret(diff)


def test_two_shards_on_one_database_is_a_config_error() -> None:
    """Re-pointing s1 at s0's database in one version is refused before any diff: the config
    itself is invalid (the two shards' rows would share one set of tables)."""
    mutate = _set("shards.s1.primary", f"mysql+pymysql://app:{SECRET}@DB0:3306/orders_s0")
    with pytest.raises(ConfigError) as info:
        config(mutate)
    assert "is also shard s0's primary database" in str(info.value)
    assert SECRET not in str(info.value)


def test_every_change_kind_is_tested() -> None:
    tested = {p.values[2] for p in SAFE} | {p.values[2] for p in REFUSED} | {ChangeKind.UNKNOWN}
    assert tested == set(ChangeKind)


def test_identical_versions_have_no_changes() -> None:
    diff = diff_topologies(config(), config())
    assert diff.empty and diff.safe and diff.changes == ()
    assert diff.as_dict() == {"safe": True, "changes": [], "refused": 0, "confirmations": []}


def test_version_field_is_not_a_change() -> None:
    """The store numbers versions: a file's `version:` is not compared."""
    assert diff_topologies(config(), config(_set("version", 7))).empty


def test_every_refusal_is_listed_not_only_the_first() -> None:
    diff = changes_of(
        _both(
            _set("tables.orders.split", 4),
            _drop("tables.users"),
            _set("shards.s0.slots", [[0, 256]]),
            _set("shards.s1.slots", [[256, 1024]]),
            _set("shards.s0.replicas", ["mysql+pymysql://ro@db0r/orders_s0"]),
        )
    )
    with pytest.raises(TopologyChangeError) as info:
        diff.raise_if_refused()
    assert [p.split(":")[0] for p in info.value.problems] == [
        "slots [256, 512) move from s0 to s1",
        "tables.orders.split",
        "tables.users removed",
    ]
    assert [c.kind for c in diff.changes if c.safe] == [ChangeKind.REPLICAS]


def test_slot_moves_group_ranges_by_source_and_target() -> None:
    diff = changes_of(
        _both(
            add_shard([[0, 10], [500, 512]]),
            _set("shards.s0.slots", [[10, 500]]),
        )
    )
    moves = [c.line for c in diff.changes if c.kind is ChangeKind.SLOTS_MOVED]
    assert moves == ["slots [0, 10), [500, 512) move from s0 to s2"]


def test_a_field_nobody_classified_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The allow-list: a setting this module does not name as safe is refused as unknown (here
    the pool's size, taken off the list as if it were a field added to the config later)."""
    monkeypatch.setattr(diff_module, "_POOL_FIELDS", diff_module._POOL_FIELDS - {"size"})
    diff = changes_of(_set("shards.s1.pool", {"size": 20}))
    (change,) = diff.changes
    assert change.kind is ChangeKind.UNKNOWN and not change.safe
    assert change.line == "shards.s1.pool.size: 5 -> 20"
    assert change.reason == (
        "shardrouter does not know this change to be safe live, so it refuses it; keep"
        " shards.s1.pool.size as it is"
    )


def test_the_diff_is_json() -> None:
    diff = changes_of(_both(_set("tables.orders.split", 4), add_shard([])))
    data = json.loads(json.dumps(diff.as_dict()))
    assert data["safe"] is False and data["refused"] == 1
    assert [c["kind"] for c in data["changes"]] == ["shard_added", "table_rule"]
    assert set(data["changes"][0]) == {"kind", "path", "line", "safe", "reason", "confirm"}


def test_an_empty_shard_is_a_valid_config() -> None:
    """`slots: []` (a shard owning nothing yet) validates; coverage is still required."""
    assert config(add_shard([])).shards["s2"].slots == []
