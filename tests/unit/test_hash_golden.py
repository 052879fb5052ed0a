"""Golden keyspace ids of the hash strategy, equal to those of Vitess's xxhash vindex, and of
``fold_case`` keys, equal to xxHash64 of MariaDB's utf8mb4_general_ci weight string."""

from __future__ import annotations

from typing import Any

import pytest

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import KeyRule, Topology
from shardrouter.errors import KeyValueError


def _topology(slots: int) -> Topology:
    gene_bits = slots.bit_length() - 1
    return Topology(
        config_from_dict(
            {
                "slots": slots,
                "ids": {"gene_bits": gene_bits, "timestamp_bits": 63 - 5 - 7 - gene_bits},
                "shards": {"s0": {"primary": "sqlite:///x.db", "slots": [[0, slots]]}},
                "tables": {
                    "t": {"column": "k", "strategy": "hash"},
                    "ts": {"column": "k", "type": "str", "strategy": "hash"},
                    "tf": {
                        "column": "k",
                        "type": "str",
                        "strategy": {"name": "hash", "fold_case": True},
                    },
                },
            },
            env={},
        )
    )


TOPO_1024 = _topology(1024)
TOPO_256 = _topology(256)


def _rule(topology: Topology, value: Any) -> KeyRule:
    rule = topology.table("ts" if isinstance(value, str) else "t").primary
    assert rule is not None
    return rule


# From Vitess go/vt/vtgate/vindexes/xxhash_test.go (keyspace ids as 16 hex digits), then values
# computed with this package and pinned so that a change of canonical bytes shows up here.
GOLDEN = [
    pytest.param("test1", "d01ab7e4d6978f0b", id="vitess-test1"),
    pytest.param("test2", "87eb11714c0a0e89", id="vitess-test2"),
    pytest.param(
        "testaverylongvaluetomakesurethisworks", "81d8c38e0d850e6a", id="vitess-long-string"
    ),
    pytest.param(1, "d46405367612b4b7", id="vitess-1"),
    pytest.param(-1, "d8e2a6a7c8c7623d", id="vitess-minus-1"),
    pytest.param(18446744073709551615, "477cfa8d6d8f1f8d", id="vitess-uint64-max"),
    pytest.param(9223372036854775807, "b37eb01f7bffafd8", id="vitess-int64-max"),
    pytest.param(-9223372036854775808, "102c27ddb26a609e", id="vitess-int64-min"),
    pytest.param(0, "ecaf441208573463", id="pinned-0"),
    pytest.param("", "99e9d85137db46ef", id="pinned-empty-string"),
    pytest.param("ünïcødé", "3959522906be5a4d", id="pinned-latin-accents"),
    pytest.param("订单", "51854a02820b1b42", id="pinned-cjk"),
]


# fold_case keys: xxHash64 (laid out as above) of what MariaDB 10.11 answers for
# WEIGHT_STRING(RTRIM(CONVERT(:v USING utf8mb4)) COLLATE utf8mb4_general_ci), computed from the
# server's answer, not with this package. Before issue 7 (A6) fold_case hashed the lowercased
# text (accents not folded): these slots moved, a pre-1.0 placement change.
GOLDEN_FOLDED = [
    pytest.param("test1", "96526cb42efe6bbd", id="ascii"),
    pytest.param("ada@example.com", "65fb5b05e7f691da", id="email"),
    pytest.param("Ada@Example.com  ", "65fb5b05e7f691da", id="email-case-and-trailing-spaces"),
    pytest.param("émile@example.com", "072ef537ea27855b", id="email-accent"),
    pytest.param("EMILE@EXAMPLE.COM", "072ef537ea27855b", id="email-accent-folded"),
    pytest.param("ünïcødé", "977510fef6be2437", id="latin-accents"),
    pytest.param("订单", "85cec8ed1c8980dd", id="cjk"),
    pytest.param("😀", "33e7a9324ca1245d", id="supplementary-weighs-fffd"),
    pytest.param("", "99e9d85137db46ef", id="empty-string"),
    pytest.param("   ", "99e9d85137db46ef", id="spaces-are-empty"),
]


@pytest.mark.parametrize(("value", "ksid_hex"), GOLDEN_FOLDED)
def test_fold_case_keyspace_id_golden(value: str, ksid_hex: str) -> None:
    rule = TOPO_1024.table("tf").primary
    assert rule is not None
    assert f"{rule.keyspace_id(value):016x}" == ksid_hex
    assert rule.slot(value) == int(ksid_hex, 16) >> 54
    assert TOPO_256.slot_for("tf", value) == int(ksid_hex, 16) >> 56
    assert TOPO_1024.route("tf", "k", value).as_dict()["keyspace_id"] == ksid_hex


@pytest.mark.parametrize(("value", "ksid_hex"), GOLDEN)
def test_keyspace_id_golden(value: Any, ksid_hex: str) -> None:
    rule = _rule(TOPO_1024, value)
    assert f"{rule.keyspace_id(value):016x}" == ksid_hex


@pytest.mark.parametrize(("value", "ksid_hex"), GOLDEN)
def test_slot_is_top_10_bits_for_1024_slots(value: Any, ksid_hex: str) -> None:
    expected = int(ksid_hex, 16) >> 54
    assert _rule(TOPO_1024, value).slot(value) == expected
    table = "ts" if isinstance(value, str) else "t"
    assert TOPO_1024.slot_for(table, value) == expected
    assert TOPO_1024.route(table, "k", value).slot == expected


@pytest.mark.parametrize(("value", "ksid_hex"), GOLDEN)
def test_slot_is_top_8_bits_for_256_slots(value: Any, ksid_hex: str) -> None:
    expected = int(ksid_hex, 16) >> 56
    assert _rule(TOPO_256, value).slot(value) == expected
    assert TOPO_256.slot_for("ts" if isinstance(value, str) else "t", value) == expected


@pytest.mark.parametrize(("value", "ksid_hex"), GOLDEN)
def test_route_reports_the_same_keyspace_id(value: Any, ksid_hex: str) -> None:
    table = "ts" if isinstance(value, str) else "t"
    route = TOPO_1024.route(table, "k", value)
    assert route.as_dict()["keyspace_id"] == ksid_hex
    assert route.shard == "s0"


BAD_VALUES = [
    pytest.param("t", None, "None", "int", id="null-in-int-column"),
    pytest.param("ts", None, "None", "str", id="null-in-str-column"),
    pytest.param("t", True, "True", "int", id="bool-is-not-an-int"),
    pytest.param("t", False, "False", "int", id="bool-false"),
    pytest.param("t", 1.5, "1.5", "int", id="float"),
    pytest.param("t", "42abc", "'42abc'", "int", id="str-in-int-column"),
    pytest.param("t", " 42", "' 42'", "int", id="padded-digits"),
    pytest.param("t", "42.0", "'42.0'", "int", id="decimal-point"),
    pytest.param("t", str(2**64), str(2**64), "int", id="digits-above-uint64-max"),
    pytest.param("ts", 42, "42", "str", id="int-in-str-column"),
    pytest.param("t", 2**64, str(2**64), "int", id="above-uint64-max"),
    pytest.param("t", -(2**63) - 1, str(-(2**63) - 1), "int", id="below-int64-min"),
    pytest.param("t", 10**30, str(10**30), "int", id="far-above-range"),
]


@pytest.mark.parametrize(("table", "value", "shown", "expected_type"), BAD_VALUES)
def test_bad_values_raise_key_value_error(
    table: str, value: Any, shown: str, expected_type: str
) -> None:
    rule = TOPO_1024.table(table).primary
    assert rule is not None
    calls = [
        lambda: rule.slot(value),
        lambda: TOPO_1024.shard_for(table, value),
        lambda: TOPO_1024.slot_for(table, value),
        lambda: TOPO_1024.route(table, "k", value),
    ]
    for call in calls:
        with pytest.raises(KeyValueError) as info:
            call()
        message = str(info.value)
        assert f"{table}.k" in message  # table and column
        assert shown in message  # the value
        assert f"expects {expected_type}" in message  # the expected type


def test_range_edges_route() -> None:
    """The extreme values of the accepted range route (and differ from their neighbours)."""
    for value in (-(2**63), 2**64 - 1):
        assert 0 <= TOPO_1024.slot_for("t", value) < 1024


def test_int_and_its_decimal_text_share_a_keyspace_id() -> None:
    """Vitess hashes an integer bind variable as its decimal text; so does the hash strategy."""
    int_rule, str_rule = _rule(TOPO_1024, 12345), _rule(TOPO_1024, "12345")
    assert int_rule.keyspace_id(12345) == str_rule.keyspace_id("12345")
    assert int_rule.keyspace_id(-7) == str_rule.keyspace_id("-7")


def test_lone_surrogate_is_a_key_value_error() -> None:
    value = "\ud800x"
    with pytest.raises(KeyValueError) as info:
        TOPO_1024.shard_for("ts", value)
    assert "ts.k" in str(info.value)


@pytest.mark.parametrize("text", ["42", "+42", "0042", "-7", str(2**63 - 1), str(-(2**63))])
def test_decimal_digits_route_as_the_integer(text: str) -> None:
    """MySQL compares such a string with an int column numerically (issue 11 item 7)."""
    number = int(text)
    routed, expected = (TOPO_1024.route("t", "k", v).as_dict() for v in (text, number))
    assert routed.pop("value") == text and expected.pop("value") == number
    assert routed == expected  # keyspace id, slot, shard, physical table
    assert TOPO_1024.slot_for("t", text) == TOPO_1024.slot_for("t", number)
