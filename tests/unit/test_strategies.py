"""Per-strategy tests: mod, range, gene, lookup, the registry and what each strategy declares."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import Select
from sqlalchemy.dialects import mysql, sqlite

from shardrouter.core import strategies
from shardrouter.core.config import config_from_dict
from shardrouter.core.ids import IdLayout
from shardrouter.core.strategies import (
    FunctionalStrategy,
    GeneStrategy,
    HashStrategy,
    LookupQuery,
    LookupStrategy,
    ModStrategy,
    RangeStrategy,
    StrategyContext,
    StrategyDomainError,
)
from shardrouter.core.strategies import base as strategy_base
from shardrouter.core.strategies.hash import HashParams
from shardrouter.core.topology import Topology
from shardrouter.errors import KeyValueError, RoutingError
from shardrouter.types import KeyType

LAYOUT = IdLayout(epoch_ms=1_735_689_600_000)  # 2025-01-01T00:00:00Z, 41/10/5/7 bits


def ctx(slots: int = 1024, key_type: KeyType = KeyType.INT) -> StrategyContext:
    return StrategyContext(slots=slots, id_layout=LAYOUT, key_type=key_type)


def one_table_topology(table: dict[str, Any], slots: int = 1024) -> Topology:
    gene_bits = slots.bit_length() - 1
    return Topology(
        config_from_dict(
            {
                "slots": slots,
                "ids": {"gene_bits": gene_bits, "timestamp_bits": 63 - 5 - 7 - gene_bits},
                "shards": {
                    "a": {"primary": "sqlite:///a.db", "slots": [[0, slots // 2]]},
                    "b": {"primary": "sqlite:///b.db", "slots": [[slots // 2, slots]]},
                },
                "tables": {"t": table},
            },
            env={},
        )
    )


# -- mod ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "slots", "expected"),
    [
        pytest.param(0, 1024, 0, id="zero"),
        pytest.param(1, 1024, 1, id="one"),
        pytest.param(1023, 1024, 1023, id="last-slot"),
        pytest.param(1024, 1024, 0, id="wraps"),
        pytest.param(1025, 1024, 1, id="wraps-plus-one"),
        pytest.param(123_456_789, 1024, 123_456_789 % 1024, id="large"),
        pytest.param(2**63 - 1, 1024, (2**63 - 1) % 1024, id="int64-max"),
        pytest.param(2**64 - 1, 1024, (2**64 - 1) % 1024, id="uint64-max"),
        pytest.param(77, 16, 77 % 16, id="16-slots"),
        pytest.param(12345, 1, 0, id="one-slot"),
    ],
)
def test_mod_is_value_modulo_slots(value: int, slots: int, expected: int) -> None:
    strategy = strategies.build("mod", {}, ctx(slots))
    assert isinstance(strategy, ModStrategy)
    assert strategy.slot(value) == expected
    assert strategy.keyspace_id(value) is None


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="minus-one"),
        pytest.param(-1024, id="minus-slots"),
        pytest.param(-(2**63), id="int64-min"),
    ],
)
def test_mod_refuses_negative_values(value: int) -> None:
    with pytest.raises(StrategyDomainError, match="non-negative"):
        strategies.build("mod", {}, ctx()).slot(value)  # type: ignore[attr-defined]
    topology = one_table_topology({"column": "uid", "strategy": "mod"})
    with pytest.raises(KeyValueError) as info:
        topology.shard_for("t", value)
    message = str(info.value)
    assert "t.uid" in message and str(value) in message and "mod" in message
    with pytest.raises(KeyValueError):
        topology.route("t", "uid", value)


def test_mod_through_topology_matches_legacy_layout() -> None:
    topology = one_table_topology({"column": "uid", "strategy": "mod"})
    for uid in (0, 1, 511, 512, 1023, 1024, 99_999):
        assert topology.slot_for("t", uid) == uid % 1024
        assert topology.shard_for("t", uid) == ("a" if uid % 1024 < 512 else "b")
    assert topology.shard_for("t", "7") == topology.shard_for("t", 7)  # MySQL: '7' = 7
    with pytest.raises(KeyValueError, match="is not an integer"):
        topology.shard_for("t", "7.0")


# -- range ----------------------------------------------------------------------------------

INT_BOUNDS = [100, 200, 300]  # four ranges, spread as slots 0, 256, 512, 768 of 1024


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(-(2**63), 0, id="far-below"),
        pytest.param(-1, 0, id="negative"),
        pytest.param(0, 0, id="zero"),
        pytest.param(99, 0, id="just-below-first"),
        pytest.param(100, 256, id="exactly-first-boundary"),
        pytest.param(101, 256, id="just-above-first"),
        pytest.param(199, 256, id="just-below-second"),
        pytest.param(200, 512, id="exactly-second-boundary"),
        pytest.param(299, 512, id="just-below-last"),
        pytest.param(300, 768, id="exactly-last-boundary"),
        pytest.param(2**64, 768, id="far-above"),
    ],
)
def test_range_int_boundaries_default_spread(value: int, expected: int) -> None:
    strategy = strategies.build("range", {"boundaries": INT_BOUNDS}, ctx())
    assert isinstance(strategy, RangeStrategy)
    assert strategy.slot(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(99, 7, id="range-0"),
        pytest.param(100, 3, id="boundary-starts-range-1"),
        pytest.param(250, 1000, id="range-2"),
        pytest.param(300, 0, id="boundary-starts-range-3"),
    ],
)
def test_range_explicit_slots(value: int, expected: int) -> None:
    strategy = strategies.build(
        "range", {"boundaries": INT_BOUNDS, "slots": [7, 3, 1000, 0]}, ctx()
    )
    assert strategy.slot(value) == expected  # type: ignore[attr-defined]


MONTHS = ["2025-01-01", "2025-02-01", "2025-03-01"]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(dt.date(1970, 1, 1), 0, id="long-ago"),
        pytest.param(dt.date(2024, 12, 31), 0, id="day-before-first"),
        pytest.param(dt.date(2025, 1, 1), 256, id="exactly-first"),
        pytest.param(dt.date(2025, 1, 31), 256, id="end-of-january"),
        pytest.param(dt.date(2025, 2, 1), 512, id="exactly-february"),
        pytest.param(dt.date(2025, 2, 28), 512, id="end-of-february"),
        pytest.param(dt.date(2025, 3, 1), 768, id="exactly-march"),
        pytest.param(dt.date(9999, 12, 31), 768, id="date-max"),
    ],
)
def test_range_date_boundaries(value: dt.date, expected: int) -> None:
    strategy = strategies.build("range", {"boundaries": MONTHS}, ctx(key_type=KeyType.DATE))
    assert strategy.slot(value) == expected  # type: ignore[attr-defined]
    topology = one_table_topology(
        {"column": "day", "type": "date", "strategy": {"name": "range", "boundaries": MONTHS}}
    )
    assert topology.slot_for("t", value) == expected
    assert topology.shard_for("t", value) == ("a" if expected < 512 else "b")


@pytest.mark.parametrize(
    ("boundaries", "slots", "expected"),
    [
        pytest.param([10], 1024, [0, 512], id="two-ranges"),
        pytest.param([10, 20], 1024, [0, 341, 682], id="three-ranges"),
        pytest.param([1, 2, 3, 4, 5, 6, 7], 8, [0, 1, 2, 3, 4, 5, 6, 7], id="one-slot-each"),
        pytest.param([1, 2, 3], 1, [0, 0, 0, 0], id="single-slot"),
    ],
)
def test_range_default_spread(boundaries: list[int], slots: int, expected: list[int]) -> None:
    strategy = strategies.build("range", {"boundaries": boundaries}, ctx(slots))
    probes = [boundaries[0] - 1, *boundaries]
    assert [strategy.slot(p) for p in probes] == expected  # type: ignore[attr-defined]


def test_range_string_boundaries() -> None:
    strategy = strategies.build("range", {"boundaries": ["g", "n", "t"]}, ctx(key_type=KeyType.STR))
    got = [strategy.slot(v) for v in ("", "a", "g", "gz", "n", "t", "zzz")]  # type: ignore[attr-defined]
    assert got == [0, 0, 256, 256, 512, 768, 768]


@pytest.mark.parametrize(
    ("params", "key_type", "message"),
    [
        pytest.param({"boundaries": []}, KeyType.INT, "boundaries is empty", id="empty"),
        pytest.param(
            {"boundaries": [5, 5]},
            KeyType.INT,
            "boundaries[1] 5 is not greater than 5",
            id="equal",
        ),
        pytest.param(
            {"boundaries": [1], "slots": [0, 1024]},
            KeyType.INT,
            "slots[1] 1024 is outside [0, 1024)",
            id="slot-out-of-range",
        ),
        pytest.param(
            {"boundaries": ["a"]}, KeyType.INT, "boundary 'a' is not an integer", id="str-in-int"
        ),
        pytest.param({"boundaries": ["2025-13-01"]}, KeyType.DATE, "month", id="bad-date"),
    ],
)
def test_range_bad_parameters(params: dict[str, Any], key_type: KeyType, message: str) -> None:
    with pytest.raises(ValueError) as info:
        strategies.build("range", params, ctx(key_type=key_type))
    assert message in str(info.value)


def test_range_value_of_wrong_type_is_a_key_value_error() -> None:
    topology = one_table_topology({"column": "n", "strategy": {"name": "range", "boundaries": [5]}})
    with pytest.raises(KeyValueError, match=r"t\.n: value 'x' is not an integer"):
        topology.shard_for("t", "x")
    strategy = strategies.build("range", {"boundaries": [5]}, ctx())
    with pytest.raises(StrategyDomainError, match="cannot be compared"):
        strategy.slot("x")  # type: ignore[attr-defined]


# -- gene -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("timestamp", "slot", "worker", "sequence"),
    [
        pytest.param(0, 0, 0, 0, id="all-zero"),
        pytest.param(1, 1023, 0, 0, id="last-slot"),
        pytest.param(123_456_789, 513, 31, 127, id="all-fields-max-ish"),
        pytest.param((1 << 41) - 1, 777, 17, 5, id="last-millisecond"),
    ],
)
def test_gene_reads_the_slot_bits(timestamp: int, slot: int, worker: int, sequence: int) -> None:
    strategy = strategies.build("gene", {}, ctx())
    assert isinstance(strategy, GeneStrategy)
    id_ = LAYOUT.compose(timestamp, slot, worker, sequence)
    assert strategy.slot(id_) == slot
    assert strategy.keyspace_id(id_) is None


def test_gene_with_a_smaller_layout() -> None:
    layout = IdLayout(epoch_ms=0, timestamp_bits=45, gene_bits=6, worker_bits=5, sequence_bits=7)
    strategy = strategies.build(
        "gene", {}, StrategyContext(slots=64, id_layout=layout, key_type=KeyType.INT)
    )
    assert strategy.slot(layout.compose(99, 63, 31, 127)) == 63  # type: ignore[attr-defined]
    assert strategy.slot(layout.compose(99, 1, 0, 0)) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "value",
    [
        pytest.param(-1, id="negative"),
        pytest.param(2**63, id="64-bit"),
        pytest.param(True, id="bool"),
        pytest.param("12", id="str"),
    ],
)
def test_gene_refuses_values_that_are_not_ids(value: Any) -> None:
    with pytest.raises(StrategyDomainError, match="not a shardrouter id"):
        strategies.build("gene", {}, ctx()).slot(value)  # type: ignore[attr-defined]


def test_gene_needs_an_id_layout() -> None:
    with pytest.raises(ValueError, match="needs an id layout"):
        strategies.build(
            "gene", {}, StrategyContext(slots=1024, id_layout=None, key_type=KeyType.INT)
        )


# -- lookup ---------------------------------------------------------------------------------


def _lookup(**extra: Any) -> LookupStrategy:
    params = {"table": "merchant_orders", "from": "merchant_id", "to": "user_id", **extra}
    strategy = strategies.build("lookup", params, ctx())
    assert isinstance(strategy, LookupStrategy)
    return strategy


SECRET_VALUES = [918273645, 564738291]


@pytest.mark.parametrize(
    "dialect",
    [
        pytest.param(None, id="default"),
        pytest.param(mysql.dialect(), id="mysql"),
        pytest.param(sqlite.dialect(), id="sqlite"),
    ],
)
def test_lookup_query_uses_bound_parameters(dialect: Any) -> None:
    query = _lookup().query(SECRET_VALUES)
    assert isinstance(query, LookupQuery)
    assert isinstance(query.statement, Select)
    assert (query.table, query.from_column, query.to_column) == (
        "merchant_orders",
        "merchant_id",
        "user_id",
    )
    assert query.values == tuple(SECRET_VALUES)
    compiled = query.statement.compile(dialect=dialect)
    sql = str(compiled)
    assert "merchant_orders" in sql and "merchant_id" in sql and "user_id" in sql
    for value in SECRET_VALUES:
        assert str(value) not in sql
    assert list(compiled.params.values()) == [SECRET_VALUES]
    # Expanded into one placeholder per value, still no literal in the SQL.
    expanded = query.statement.compile(
        dialect=dialect or sqlite.dialect(), compile_kwargs={"render_postcompile": True}
    )
    for value in SECRET_VALUES:
        assert str(value) not in str(expanded)
    assert sorted(expanded.params.values()) == sorted(SECRET_VALUES)


def test_lookup_query_string_values_are_never_inlined() -> None:
    hostile = "x'); DROP TABLE users; --"
    strategy = strategies.build(
        "lookup",
        {"table": "user_emails", "from": "email", "to": "user_id"},
        ctx(key_type=KeyType.STR),
    )
    compiled = strategy.query([hostile, "ada@example.com"]).statement.compile()  # type: ignore[attr-defined]
    assert "DROP" not in str(compiled) and "ada@" not in str(compiled)
    assert list(compiled.params.values()) == [[hostile, "ada@example.com"]]


def test_lookup_query_physical_table() -> None:
    compiled = _lookup().query([1], "merchant_orders_0003").statement.compile()
    assert "FROM merchant_orders_0003" in str(compiled)


def test_lookup_owner_keys_maps_rows() -> None:
    strategy = _lookup()
    rows = [(7, 42), (7, 43), (8, 42), (7, 42)]
    assert strategy.owner_keys(rows) == {7: {42, 43}, 8: {42}}
    assert strategy.owner_keys([]) == {}


def test_lookup_row_columns() -> None:
    assert _lookup().row_columns == ("merchant_id", "user_id")
    assert _lookup(key="order_id").row_columns == ("merchant_id", "user_id", "order_id")


def test_lookup_through_topology(orders_topology: Topology) -> None:
    rule = orders_topology.table("orders").key("merchant_id")
    query = rule.lookup_query([500, 501])
    assert query.table == "merchant_orders"
    with pytest.raises(KeyValueError, match=r"orders\.merchant_id: value 'x' is not an integer"):
        rule.lookup_query(["x"])
    with pytest.raises(RoutingError, match="needs a query"):
        rule.slot(500)
    with pytest.raises(RoutingError, match="not a lookup column"):
        orders_topology.table("orders").key("user_id").lookup_query([1])
    # Rows map back to the owners' slots through the owner's primary strategy.
    owners = rule.strategy.owner_keys([(500, 42), (500, 1001)])  # type: ignore[attr-defined]
    assert orders_topology.owner_slots("orders", owners[500]) == {
        orders_topology.slot_for("orders", 42),
        orders_topology.slot_for("orders", 1001),
    }


# -- registry -------------------------------------------------------------------------------


def test_known_strategies_lists_all_five_sorted() -> None:
    assert strategies.known_strategies() == ("gene", "hash", "lookup", "mod", "range")


def test_registering_a_duplicate_name_raises() -> None:
    before = strategies.known_strategies()
    with pytest.raises(RuntimeError, match="'hash' is registered twice"):
        strategies.register("hash", HashParams)(HashStrategy)
    assert strategies.known_strategies() == before
    assert strategies.build("hash", {}, ctx()).__class__ is HashStrategy


def test_registering_a_new_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(strategy_base, "_REGISTRY", dict(strategy_base._REGISTRY))

    @strategies.register("hash2", HashParams)
    class Hash2(HashStrategy):
        name = "hash2"

    assert "hash2" in strategies.known_strategies()
    assert isinstance(strategies.build("hash2", {}, ctx()), Hash2)
    with pytest.raises(RuntimeError, match="registered twice"):
        strategies.register("hash2", HashParams)(Hash2)


@pytest.mark.parametrize("name", ["gene", "hash", "mod", "range"])
def test_unknown_parameter_is_refused(name: str) -> None:
    params: dict[str, Any] = {"boundaries": [1]} if name == "range" else {}
    with pytest.raises(ValueError, match="Extra inputs are not permitted"):
        strategies.build(name, {**params, "seed": 1}, ctx())


# -- declarations (Vitess: per-vindex Cost / IsUnique / NeedsVCursor tests) ------------------

ALL_TYPES = frozenset(KeyType)


@pytest.mark.parametrize(
    ("name", "cls", "cost", "unique", "needs_io", "key_types", "functional"),
    [
        pytest.param("hash", HashStrategy, 1, True, False, ALL_TYPES, True, id="hash"),
        pytest.param("mod", ModStrategy, 0, True, False, {KeyType.INT}, True, id="mod"),
        pytest.param("range", RangeStrategy, 0, True, False, ALL_TYPES, True, id="range"),
        pytest.param("gene", GeneStrategy, 0, True, False, {KeyType.INT}, True, id="gene"),
        pytest.param("lookup", LookupStrategy, 20, False, True, ALL_TYPES, False, id="lookup"),
    ],
)
def test_strategy_declarations(
    name: str,
    cls: type,
    cost: int,
    unique: bool,
    needs_io: bool,
    key_types: frozenset[KeyType],
    functional: bool,
) -> None:
    params: dict[str, Any] = {
        "range": {"boundaries": [1]},
        "lookup": {"table": "l", "from": "a", "to": "b"},
    }.get(name, {})
    built = strategies.build(name, params, ctx())
    assert type(built) is cls
    assert (built.name, built.cost, built.unique, built.needs_io) == (name, cost, unique, needs_io)
    assert built.key_types == key_types
    assert strategies.key_types(name) == key_types
    assert isinstance(built, strategies.Strategy)
    assert isinstance(built, FunctionalStrategy) is functional
    # A strategy that needs I/O is never functional; a functional one never needs I/O.
    assert built.needs_io is not functional


def test_fold_case_routes_case_variants_together_and_only_for_str() -> None:
    from shardrouter.core.config import config_from_dict
    from shardrouter.core.topology import Topology
    from shardrouter.errors import ConfigError

    def topo(strategy: object, key_type: str = "str") -> Topology:
        return Topology(
            config_from_dict(
                {
                    "shards": {
                        "s0": {"primary": "sqlite:///a.db", "slots": [[0, 512]]},
                        "s1": {"primary": "sqlite:///b.db", "slots": [[512, 1024]]},
                    },
                    "tables": {"t": {"column": "k", "type": key_type, "strategy": strategy}},
                }
            )
        )

    folded = topo({"name": "hash", "fold_case": True})
    plain = topo("hash")
    # Case, trailing spaces and accents: utf8mb4_general_ci holds these as one value.
    variants = ["Ada@Example.com", "ada@example.com", "ADA@EXAMPLE.COM  ", "ÄDA@éxample.com"]
    assert len({folded.slot_for("t", v) for v in variants}) == 1
    assert len({plain.slot_for("t", v) for v in variants}) > 1  # Vitess-exact without folding
    # A folded key hashes its weight string (2 bytes a character), not its lowercased text.
    # An ASCII letter's weight is 0x00 and its upper case: the UTF-8 of NUL and that letter,
    # which the plain hash of that text hashes.
    ksid = folded.route("t", "k", "Ada@Example.com  ").keyspace_id
    assert ksid == plain.route("t", "k", "".join("\0" + c for c in "ADA@EXAMPLE.COM")).keyspace_id
    assert ksid != plain.route("t", "k", "ada@example.com").keyspace_id
    with pytest.raises(ConfigError, match="fold_case applies to str columns"):
        topo({"name": "hash", "fold_case": True}, "int")
