"""Topology routing: route() fields, split and bound tables, lookups, errors, key ranges, purity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import SlotRange, Topology
from shardrouter.errors import (
    KeyValueError,
    RoutingError,
    UnknownKeyError,
    UnknownTableError,
)

REPO = Path(__file__).resolve().parents[2]
ORDERS_YAML = REPO / "config" / "orders.yaml"


def _expected_shard(slot: int) -> str:
    return f"s{slot // 256}"  # orders.yaml: s0 [0, 256), s1 [256, 512), ...


@pytest.mark.parametrize(
    ("user_id", "ksid", "slot"),
    [
        pytest.param(42, "b942d776d0f5e66d", 741, id="user-42"),
        pytest.param(1001, "2887cb4140259609", 162, id="user-1001"),
        pytest.param(77777, "f8653a203d03e219", 993, id="user-77777"),
        pytest.param(8675309, "cc029ae6868349db", 816, id="user-8675309"),
    ],
)
def test_route_fields_for_a_user(
    orders_topology: Topology, user_id: int, ksid: str, slot: int
) -> None:
    route = orders_topology.route("orders", "user_id", user_id)
    assert route.as_dict() == {
        "table": "orders",
        "column": "user_id",
        "value": user_id,
        "strategy": "hash",
        "keyspace_id": ksid,
        "slot": slot,
        "shard": _expected_shard(slot),
        "physical_table": f"orders_{slot % 4:04d}",
        "via": None,
    }
    assert route.keyspace_id is not None and route.keyspace_id >> 54 == slot
    assert orders_topology.shard_for("orders", user_id) == route.shard
    assert orders_topology.slot_for("orders", user_id) == slot


def test_split_table_physical_names(orders_topology: Topology) -> None:
    orders = orders_topology.table("orders")
    assert orders.physical_names == ("orders_0000", "orders_0001", "orders_0002", "orders_0003")
    assert [orders.physical(s) for s in (0, 1, 2, 3, 4, 1023)] == [
        "orders_0000",
        "orders_0001",
        "orders_0002",
        "orders_0003",
        "orders_0000",
        "orders_0003",
    ]
    assert orders_topology.table("users").physical_names == ("users",)


@settings(max_examples=200, deadline=None)
@given(user_id=st.integers(-(2**63), 2**64 - 1))
def test_bound_table_follows_its_owner(orders_topology: Topology, user_id: int) -> None:
    owner = orders_topology.route("orders", "user_id", user_id)
    items = orders_topology.route("order_items", "user_id", user_id)
    assert (items.slot, items.shard, items.keyspace_id) == (
        owner.slot,
        owner.shard,
        owner.keyspace_id,
    )
    assert owner.slot is not None
    assert items.physical_table == f"order_items_{owner.slot % 4:04d}"
    assert orders_topology.shard_for("order_items", user_id) == owner.shard


def test_bound_table_rule(orders_topology: Topology) -> None:
    items = orders_topology.table("order_items")
    assert items.bound_to == "orders" and items.split == 4 and items.kind == "sharded"
    # issue 7 defect 13: the owner's functional secondary key (order_id, gene) is inherited;
    # its lookup (merchant_id) is not.
    assert list(items.keys) == ["user_id", "order_id"]


def test_secondary_columns(orders_topology: Topology) -> None:
    orders = orders_topology.table("orders")
    assert list(orders.keys) == ["user_id", "order_id", "merchant_id"]
    assert orders.primary is not None and orders.primary.column == "user_id"
    assert [k.strategy.name for k in orders.keys.values()] == ["hash", "gene", "lookup"]


def test_order_id_route_has_no_keyspace_id(orders_topology: Topology) -> None:
    order_id = orders_topology.id_layout.compose(1000, 741, 0, 0)
    route = orders_topology.route("orders", "order_id", order_id)
    assert (route.strategy, route.keyspace_id, route.slot, route.shard) == ("gene", None, 741, "s2")
    assert route.physical_table == "orders_0001"
    assert route.as_dict()["keyspace_id"] is None


def test_lookup_column_route_goes_via_the_lookup_table(orders_topology: Topology) -> None:
    route = orders_topology.route("orders", "merchant_id", 7)
    assert (route.strategy, route.slot, route.shard, route.physical_table) == (
        "lookup",
        None,
        None,
        None,
    )
    assert route.via is not None
    via = route.via
    assert via.table == "merchant_orders" and via.column == "merchant_id" and via.value == 7
    assert via.shard == orders_topology.shard_for("merchant_orders", 7)
    assert via.slot == orders_topology.slot_for("merchant_orders", 7)
    assert via.physical_table == "merchant_orders"
    assert route.as_dict()["via"] == via.as_dict()


def test_string_lookup_route(orders_topology: Topology) -> None:
    route = orders_topology.route("users", "email", "ada@example.com")
    assert route.via is not None and route.via.table == "user_emails"
    assert route.via.shard == orders_topology.shard_for("user_emails", "ada@example.com")
    with pytest.raises(KeyValueError, match="value 42 is not a string"):
        orders_topology.route("users", "email", 42)


def test_lookup_route_error_names_the_asked_column(orders_topology: Topology) -> None:
    with pytest.raises(KeyValueError, match=r"^users\.email: value 42 is not a string"):
        orders_topology.route("users", "email", 42)


def test_lookup_column_refuses_direct_slot(orders_topology: Topology) -> None:
    with pytest.raises(RoutingError, match="routes through lookup table merchant_orders"):
        orders_topology.shard_for("orders", 7, "merchant_id")


def test_broadcast_table_refuses_routing(orders_topology: Topology) -> None:
    rule = orders_topology.table("countries")
    assert rule.kind == "broadcast" and rule.primary is None and dict(rule.keys) == {}
    with pytest.raises(RoutingError, match="countries is a broadcast table"):
        orders_topology.shard_for("countries", 1)
    with pytest.raises(RoutingError, match="countries is a broadcast table"):
        orders_topology.slot_for("countries", 1)
    with pytest.raises(UnknownKeyError, match=r"sharding columns: none \(broadcast table\)"):
        orders_topology.route("countries", "code", "FR")


def test_unknown_table_lists_known_tables(orders_topology: Topology) -> None:
    expected = (
        "table 'ordrs' is not in topology 'orders' (known: countries, merchant_orders,"
        " order_items, orders, user_emails, users)"
    )
    for call in (
        lambda: orders_topology.table("ordrs"),
        lambda: orders_topology.route("ordrs", "user_id", 1),
        lambda: orders_topology.shard_for("ordrs", 1),
        lambda: orders_topology.slot_for("ordrs", 1),
    ):
        with pytest.raises(UnknownTableError) as info:
            call()
        assert str(info.value) == expected
    assert issubclass(UnknownTableError, RoutingError)


def test_unknown_key_lists_sharding_columns(orders_topology: Topology) -> None:
    with pytest.raises(UnknownKeyError) as info:
        orders_topology.route("orders", "amount_cents", 1)
    assert str(info.value) == (
        "orders.amount_cents is not a sharding column of orders"
        " (sharding columns: user_id, order_id, merchant_id)"
    )
    with pytest.raises(UnknownKeyError, match=r"\(sharding columns: user_id, order_id\)"):
        orders_topology.shard_for("order_items", 1, "merchant_id")


def test_shard_of_slot_and_slots_of(orders_topology: Topology) -> None:
    assert [orders_topology.shard_of_slot(s) for s in (0, 255, 256, 511, 512, 767, 768, 1023)] == [
        "s0",
        "s0",
        "s1",
        "s1",
        "s2",
        "s2",
        "s3",
        "s3",
    ]
    assert orders_topology.slots_of("s1") == (SlotRange(256, 512),)
    with pytest.raises(RoutingError, match=r"shard 's9' is not in topology \(known: s0, s1"):
        orders_topology.slots_of("s9")


# -- key ranges -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "end", "slot_bits", "expected"),
    [
        pytest.param(0, 256, 10, "-40", id="4-shards-first"),
        pytest.param(256, 512, 10, "40-80", id="4-shards-second"),
        pytest.param(512, 768, 10, "80-c0", id="4-shards-third"),
        pytest.param(768, 1024, 10, "c0-", id="4-shards-last"),
        pytest.param(0, 512, 10, "-80", id="2-shards-first"),
        pytest.param(512, 1024, 10, "80-", id="2-shards-last"),
        pytest.param(0, 1024, 10, "-", id="one-shard"),
        pytest.param(0, 128, 8, "-80", id="256-slots-half"),
        pytest.param(1, 3, 10, "0040-00c0", id="sub-byte-prefix"),
        pytest.param(64, 128, 10, "10-20", id="16th"),
        pytest.param(1, 2, 16, "0001-0002", id="65536-slots"),
        pytest.param(1, 2, 4, "10-20", id="16-slots"),
    ],
)
def test_keyrange_vitess_names(start: int, end: int, slot_bits: int, expected: str) -> None:
    assert SlotRange(start, end).keyrange(slot_bits) == expected


def test_topology_shard_keyranges(orders_topology: Topology) -> None:
    names = [
        r.keyrange(orders_topology.slot_bits)
        for spec in orders_topology.shards.values()
        for r in spec.ranges
    ]
    assert names == ["-40", "40-80", "80-c0", "c0-"]


def test_slot_range_basics() -> None:
    r = SlotRange(256, 512)
    assert str(r) == "[256, 512)" and len(r) == 256
    assert 256 in r and 511 in r and 512 not in r and 255 not in r and "300" not in r


# -- purity ---------------------------------------------------------------------------------

_SECOND = Topology.load(ORDERS_YAML, {})


@settings(max_examples=300, deadline=None)
@given(
    key=st.one_of(
        st.tuples(st.just("orders"), st.just("user_id"), st.integers(-(2**63), 2**64 - 1)),
        st.tuples(st.just("merchant_orders"), st.just("merchant_id"), st.integers(0, 2**63)),
        st.tuples(st.just("user_emails"), st.just("email"), st.text(max_size=40)),
        st.tuples(st.just("orders"), st.just("order_id"), st.integers(0, 2**63 - 1)),
    )
)
def test_routing_is_a_pure_function(orders_topology: Topology, key: tuple[str, str, Any]) -> None:
    table, column, value = key
    first = orders_topology.route(table, column, value)
    again = orders_topology.route(table, column, value)
    other = _SECOND.route(table, column, value)
    assert first == again == other
    assert orders_topology.shard_for(table, value, column) == _SECOND.shard_for(
        table, value, column
    )
    assert first.shard == orders_topology.shard_for(table, value, column)


def test_date_column_route() -> None:
    topology = Topology(
        config_from_dict(
            {
                "shards": {
                    "old": {"primary": "sqlite:///old.db", "slots": [[0, 512]]},
                    "new": {"primary": "sqlite:///new.db", "slots": [[512, 1024]]},
                },
                "tables": {
                    "events": {
                        "column": "day",
                        "type": "date",
                        "strategy": {"name": "range", "boundaries": ["2025-01-01"]},
                    }
                },
            },
            env={},
        )
    )
    assert topology.shard_for("events", dt.date(2024, 12, 31)) == "old"
    assert topology.shard_for("events", dt.date(2025, 1, 1)) == "new"
    route = topology.route("events", "day", dt.date(2025, 1, 1))
    assert route.as_dict()["value"] == "2025-01-01" and route.keyspace_id is None
    with pytest.raises(KeyValueError, match=r"events\.day: value '2025-01-01' is not a date"):
        topology.shard_for("events", "2025-01-01")


def test_datetime_in_a_date_column_routes_like_its_date() -> None:
    topology = Topology(
        config_from_dict(
            {
                "shards": {"s0": {"primary": "sqlite:///x.db", "slots": [[0, 1024]]}},
                "tables": {"days": {"column": "day", "type": "date", "strategy": "hash"}},
            },
            env={},
        )
    )
    day = dt.date(2025, 3, 14)
    moment = dt.datetime(2025, 3, 14, 15, 9, 26)
    try:
        slot = topology.slot_for("days", moment)
    except KeyValueError:
        return  # refusing the datetime would be just as correct
    assert slot == topology.slot_for("days", day)


# -- secrets --------------------------------------------------------------------------------


def test_repr_does_not_leak_the_password() -> None:
    topology = Topology(
        config_from_dict(
            {
                "shards": {
                    "s0": {
                        "primary": "mysql+pymysql://app:s3cr3t@db0:3306/orders_s0",
                        "replicas": ["mysql+pymysql://ro:s3cr3t@db0r:3306/orders_s0"],
                        "slots": [[0, 1024]],
                    }
                },
                "tables": {"t": {"column": "k", "strategy": "hash"}},
            },
            env={},
        )
    )
    spec = topology.shards["s0"]
    for text in (repr(spec), str(spec), repr(topology), str(topology), repr(spec.primary)):
        assert "s3cr3t" not in text
    assert "app:***@db0" in repr(spec) and "ro:***@db0r" in repr(spec)
    # The real password is still there for the engine to use.
    assert spec.primary.password == "s3cr3t"
    assert repr(topology) == (
        "Topology('default', version=1, slots=1024, shards=['s0'], tables=['t'])"
    )
