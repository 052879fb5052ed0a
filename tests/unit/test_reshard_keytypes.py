"""The movers' handling of sharding and key values as MariaDB gives them back (review 10):
a stored value is routed as the routers route the value the service passed
(``spec.routed_value``), a value without a slot (NULL, the zero date) stays where it is, a
value no router routes is refused by the strict walks (``BelongsCache(strict=True)``), and
the copy's checkpoints keep typed keys exactly (``spec.key_to_json``)."""

from __future__ import annotations

import datetime as dt
import json
from decimal import Decimal
from typing import Any

import pytest

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.errors import ReshardDataError
from shardrouter.reshard.journal import BelongsCache, _shard_value
from shardrouter.reshard.spec import (
    Belongs,
    TableSpec,
    UnroutableValue,
    key_from_json,
    key_to_json,
    routed_value,
)
from shardrouter.types import KeyType

pytestmark = pytest.mark.timeout(30)


def _topology() -> Topology:
    return Topology(
        config_from_dict(
            {
                "shards": {"s0": {"primary": "sqlite:///unused.db", "slots": [[0, 1024]]}},
                "tables": {
                    "acc": {"column": "a", "strategy": "hash"},
                    "codes": {"column": "c", "type": "str", "strategy": "hash"},
                    "days": {"column": "d", "type": "date", "strategy": "hash"},
                    "ranged": {
                        "column": "r",
                        "strategy": {"name": "range", "boundaries": [100, 1000]},
                    },
                    "ranged_days": {
                        "column": "d",
                        "type": "date",
                        "strategy": {"name": "range", "boundaries": ["2025-06-01"]},
                    },
                },
            },
            env={},
        )
    )


def _spec(logical: str, column: str) -> TableSpec:
    return TableSpec(logical, logical, ("id", column), ("id",), column, types=("int", "x"))


@pytest.mark.parametrize(
    ("key_type", "stored", "routed"),
    [
        (KeyType.INT, 123, 123),
        (KeyType.INT, Decimal("123"), 123),  # DECIMAL(20,0) from the driver
        (KeyType.INT, Decimal("123.00"), 123),  # DECIMAL(12,2) holding an integer
        (KeyType.INT, Decimal("-7"), -7),
        (KeyType.INT, "123", 123),  # digits in a VARCHAR column, or the journal's JSON text
        (KeyType.INT, " 0123", 123),  # MariaDB compares it with 123 as equal
        (KeyType.INT, None, None),
        (KeyType.STR, "abc", "abc"),
        (KeyType.STR, 42, "42"),  # an integer column routed by text
        (KeyType.STR, Decimal("42"), "42"),
        (KeyType.STR, dt.date(2025, 1, 2), "2025-01-02"),
        (KeyType.STR, None, None),
        (KeyType.DATE, dt.date(2025, 1, 2), dt.date(2025, 1, 2)),
        (KeyType.DATE, dt.datetime(2025, 1, 2, 10, 30), dt.date(2025, 1, 2)),
        (KeyType.DATE, "2025-01-02", dt.date(2025, 1, 2)),  # the journal's JSON
        (KeyType.DATE, "2025-01-02 10:30:00.000000", dt.date(2025, 1, 2)),
        (KeyType.DATE, "0000-00-00", None),  # the zero date: no slot, as NULL
        (KeyType.DATE, "0000-00-00 00:00:00", None),
        (KeyType.DATE, "0000-00-00 00:00:00.000", None),
        (KeyType.DATE, None, None),
    ],
)
def test_stored_values_are_routed_as_the_routers_route_them(
    key_type: KeyType, stored: Any, routed: Any
) -> None:
    got = routed_value(key_type, stored)
    assert got == routed and type(got) is type(routed)


@pytest.mark.parametrize(
    ("key_type", "stored"),
    [
        (KeyType.INT, Decimal("1.5")),
        (KeyType.INT, "12abc"),
        (KeyType.INT, ""),
        (KeyType.INT, "1.0"),
        (KeyType.INT, True),
        (KeyType.INT, dt.date(2025, 1, 1)),
        (KeyType.STR, Decimal("1.50")),
        (KeyType.STR, dt.datetime(2025, 1, 1, 1)),
        (KeyType.STR, b"raw"),
        (KeyType.DATE, "2025-00-10"),  # a zero month alone: not the zero date
        (KeyType.DATE, "2025-02-30"),
        (KeyType.DATE, "yesterday"),
        (KeyType.DATE, 20250101),
    ],
)
def test_values_no_router_routes_are_refused(key_type: KeyType, stored: Any) -> None:
    with pytest.raises(ValueError):
        routed_value(key_type, stored)


def test_belongs_routes_the_stored_forms_as_the_router_routes_the_service_value() -> None:
    topology = _topology()
    everything = Belongs(topology, ((0, 1024),))
    acc, codes, days = _spec("acc", "a"), _spec("codes", "c"), _spec("days", "d")
    for n in (1, 2, 99, 10**15, 2**64 - 1):
        slot = topology.slot_for("acc", n)
        assert everything.slot(acc, Decimal(n)) == slot
        assert everything.slot(acc, str(n)) == slot
        assert everything.slot(acc, n) == slot
        assert everything.slot(codes, n) == topology.slot_for("codes", str(n))
    day = dt.date(2025, 3, 4)
    assert everything.slot(days, day.isoformat()) == topology.slot_for("days", day)
    assert everything.slot(days, dt.datetime(2025, 3, 4, 23, 59)) == topology.slot_for("days", day)
    # range strategies compare numbers and dates, not text
    ranged, ranged_days = _spec("ranged", "r"), _spec("ranged_days", "d")
    assert everything.slot(ranged, "99") == topology.slot_for("ranged", 99)
    assert everything.slot(ranged, "200") == topology.slot_for("ranged", 200)
    assert everything.slot(ranged, Decimal("1000")) == topology.slot_for("ranged", 1000)
    late = dt.datetime(2025, 7, 1, 12)
    assert everything.slot(ranged_days, late) == topology.slot_for("ranged_days", late.date())
    # no slot: moves nowhere, whatever the ranges
    assert everything.slot(days, "0000-00-00") is None
    assert everything.slot(acc, None) is None
    assert everything(days, "0000-00-00") is False
    # beyond the strategy's domain: unroutable, with the router's reason
    with pytest.raises(UnroutableValue, match="64-bit"):
        everything.slot(acc, Decimal(2**64))
    with pytest.raises(UnroutableValue, match="not an integer"):
        everything(acc, Decimal("2.5"))


def test_the_strict_cache_refuses_naming_the_row_and_the_lenient_one_does_not_move_it() -> None:
    topology = _topology()
    belongs = Belongs(topology, ((0, 1024),))
    acc = _spec("acc", "a")
    lenient = BelongsCache(belongs)
    assert lenient(acc, Decimal("2.5"), (7,)) is False
    assert lenient(acc, Decimal("2")) is True
    assert lenient(acc, None) is False
    strict = BelongsCache(belongs, strict=True)
    assert strict(acc, Decimal("2")) is True
    assert strict(acc, None) is False  # NULL has no slot: not a refusal
    with pytest.raises(UnroutableValue) as refused:
        strict(acc, Decimal("2.5"), (7,))
    assert isinstance(refused.value, ReshardDataError)
    assert refused.value.key == (7,)
    message = str(refused.value)
    assert "table acc" in message and "sharding column a" in message
    assert "id=7" in message and "Decimal('2.5')" in message and "resume" in message
    with pytest.raises(UnroutableValue):  # not memoized as "does not move"
        strict(acc, Decimal("2.5"), (8,))


def test_a_journal_entry_value_is_read_as_its_json_gives_it() -> None:
    days = _spec("days", "d")
    assert _shard_value(days, '["0000-00-00"]') == "0000-00-00"
    assert _shard_value(days, '["2025-01-02"]') == "2025-01-02"
    assert _shard_value(days, None) is None
    assert _shard_value(_spec("acc", "a"), "[12.50]") == Decimal("12.50")
    belongs = Belongs(_topology(), ((0, 1024),))
    assert BelongsCache(belongs)(days, _shard_value(days, '["0000-00-00"]')) is False


@pytest.mark.parametrize(
    "key",
    [
        (1, "a", None),
        (Decimal("12.50"), Decimal("-0.001"), Decimal("1E+3")),
        (dt.datetime(2026, 1, 1, 0, 0, 0, 123000), dt.date(2025, 2, 28)),
        (dt.datetime(2026, 1, 1, 0, 0, 0, 5, tzinfo=dt.UTC),),
        (dt.time(23, 59, 59, 999999), dt.timedelta(hours=-838, microseconds=7)),
        (b"\x00\xffbin", bytearray(b"x")),
        (0.1, 2**63, 'with "quotes" and {braces}'),
    ],
)
def test_checkpoint_keys_round_trip_exactly(key: tuple[Any, ...]) -> None:
    stored = json.loads(json.dumps(key_to_json(key)))
    back = key_from_json(stored)
    assert back == tuple(bytes(v) if isinstance(v, bytearray) else v for v in key)
    assert [type(v) for v in back] == [bytes if isinstance(v, bytearray) else type(v) for v in key]
    assert [str(v) for v in back] == [str(bytes(v) if isinstance(v, bytearray) else v) for v in key]


def test_checkpoint_keys_written_before_the_tags_still_read() -> None:
    assert key_from_json([5, "x"]) == (5, "x")


def test_checkpoint_keys_refuse_what_they_cannot_keep() -> None:
    with pytest.raises(ReshardDataError, match="cannot be kept"):
        key_to_json((object(),))
    with pytest.raises(ReshardDataError, match="not one key_to_json writes"):
        key_from_json([{"decimal": "x", "date": "y"}])
    with pytest.raises(ReshardDataError, match="not one key_to_json writes"):
        key_from_json([{"date": "not a date"}])
