"""The fuzzer's fixed data set: rows with NULLs, ties, case and accent variants, trailing spaces,
punctuation that sorts differently under utf8mb4_general_ci, and values at type limits.

The rows are a pure function of this module (no randomness at import), so a failing example
found once replays on the same data; the grammar draws its literals and parameters from the
same pools, so predicates hit rows.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

BIGINT_MAX = 9223372036854775807

# Strings that general_ci compares differently from lower(): it weighs by upper case, so
# `_ [ \ ] ^` and backtick sort between upper- and lower-case letters differently; accents fold;
# trailing spaces pad (PAD SPACE); case variants are one value.
STATUSES = [
    "paid",
    "PAID",
    "Paid ",
    "páid",
    "new",
    "New",
    "done",
    "d_ne",
    "d[ne",
    "d\\ne",
    "d]ne",
    "d^ne",
    "d`ne",
    "Émile",
    "emile",
    "emile  ",
    "z",
    "",
]
SKUS = [
    "abc",
    "ABC",
    "abc ",
    "a_c",
    "a%c",
    "a[c",
    "a\\c",
    "a]c",
    "a^c",
    "a`c",
    "àbc",
    "Zed",
    "zed",
    "x'y",
    'q"r',
]
NAMES: list[str | None] = [None, "Ann", "ann", "ANN ", "Émile", "emile", "_x", "[x", "^x", None]
# user_emails compares without case and without trailing spaces: these stay distinct under
# general_ci (the lookup's primary key), while case and space variants are used as query values.
EMAILS = [
    "alice@example.com",
    "Bob@Example.com",
    "carol_x@example.com",
    "dave[1]@example.com",
    "émile@example.com",
    "frank^@example.com",
    "gina`@example.com",
    "hank\\@example.com",
    "ivy@example.com",
    "jo@example.com",
    "kim@example.com",
    "lee@example.com",
]
USER_IDS = [1, 2, 3, 5, 8, 13, 21, 34, 1000003, 4294967296, BIGINT_MAX - 1, BIGINT_MAX]
MERCHANTS = [0, 1, 2, 3, 7, BIGINT_MAX]
AMOUNTS = [0, 0, 1, 100, 100, 2500, -7, 999999, 123456789, BIGINT_MAX // 4]
DATETIMES = [
    dt.datetime(1000, 1, 1, 0, 0, 0),
    dt.datetime(2026, 1, 1, 0, 0, 0),
    dt.datetime(2026, 1, 1, 0, 0, 0),
    dt.datetime(2026, 1, 1, 12, 30, 15, 123000),
    dt.datetime(2026, 3, 1, 23, 59, 59, 999000),
    dt.datetime(2027, 12, 31, 0, 0, 0),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999000),
]
COUNTRIES = [
    ("US", "United States"),
    ("de", "Germany"),
    ("Fr", "france"),
    ("_a", "under score"),
    ("[b", "bracket"),
    ("é1", "Émile land"),
]


@dataclass
class Dataset:
    """The rows of every table, in column order of migrations/0001_orders.sql."""

    users: list[tuple[Any, ...]] = field(default_factory=list)
    orders: list[tuple[Any, ...]] = field(default_factory=list)
    order_items: list[tuple[Any, ...]] = field(default_factory=list)
    countries: list[tuple[Any, ...]] = field(default_factory=list)
    fresh_order_ids: dict[int, list[int]] = field(default_factory=dict)
    """Per user, order ids not used by any row (for generated INSERTs)."""

    def values(self, table: str, column: str) -> list[Any]:
        cols = COLUMNS[table]
        rows: list[tuple[Any, ...]] = getattr(self, table, [])
        index = [c for c, _ in cols].index(column)
        return sorted({r[index] for r in rows}, key=repr)


COLUMNS: dict[str, list[tuple[str, str]]] = {
    "users": [("user_id", "int"), ("email", "str"), ("name", "str?"), ("created_at", "dt")],
    "orders": [
        ("order_id", "int"),
        ("user_id", "int"),
        ("merchant_id", "int"),
        ("status", "str"),
        ("amount_cents", "int"),
        ("created_at", "dt"),
    ],
    "order_items": [
        ("order_id", "int"),
        ("line", "int"),
        ("user_id", "int"),
        ("sku", "str"),
        ("qty", "int"),
        ("price_cents", "int"),
    ],
    "merchant_orders": [("merchant_id", "int"), ("order_id", "int"), ("user_id", "int")],
    "user_emails": [("email", "str"), ("user_id", "int")],
    "countries": [("code", "str"), ("name", "str")],
}
# Columns that make a row unique (used to make ORDER BY total where the case asks for it).
UNIQUE = {
    "users": ("user_id",),
    "orders": ("order_id",),
    "order_items": ("order_id", "line"),
    "merchant_orders": ("merchant_id", "order_id"),
    "user_emails": ("email",),
    "countries": ("code",),
}
# merchant_orders.created_at is written by the database at lookup-write time: not comparable.
ALL_COLUMNS = {
    **{t: [c for c, _ in cols] for t, cols in COLUMNS.items()},
    "merchant_orders": ["merchant_id", "order_id", "user_id", "created_at"],
}


def build(next_id: Callable[[int], int]) -> Dataset:
    """The data set; ``next_id(user_id)`` issues an order id carrying that user's gene."""
    data = Dataset()
    for i, user in enumerate(USER_IDS):
        data.users.append(
            (user, EMAILS[i % len(EMAILS)], NAMES[i % len(NAMES)], DATETIMES[i % len(DATETIMES)])
        )
    # A deterministic walk over the pools: every user gets 0..5 orders, ties in amount, status
    # and created_at, every merchant several orders.
    n = 0
    for ui, user in enumerate(USER_IDS):
        for k in range((ui * 7) % 6):
            order_id = next_id(user)
            n += 1
            data.orders.append(
                (
                    order_id,
                    user,
                    MERCHANTS[(ui + k) % len(MERCHANTS)],
                    STATUSES[(n * 5) % len(STATUSES)],
                    AMOUNTS[(n * 3) % len(AMOUNTS)],
                    DATETIMES[(n + ui) % len(DATETIMES)],
                )
            )
            for line in range(1, (n % 4) + 1):
                data.order_items.append(
                    (
                        order_id,
                        line,
                        user,
                        SKUS[(n + line * 3) % len(SKUS)],
                        (n + line) % 3,
                        AMOUNTS[(n + line) % len(AMOUNTS)] % 100000,
                    )
                )
        data.fresh_order_ids[user] = [next_id(user) for _ in range(3)]
    data.countries = list(COUNTRIES)
    return data


# Literal pools used by the grammar beyond the data (edges and type variants).
EXTRA_INTS = [0, -1, 4, 99999999, BIGINT_MAX]
DECIMALS = [
    Decimal("0"),
    Decimal("1.5"),
    Decimal("100.00"),
    Decimal("-7.25"),
    Decimal("2500.000000000000000000000000000001"),
    Decimal("0.12345678901234567890123456789012345678"),
]
DATES = [dt.date(1000, 1, 1), dt.date(2026, 1, 1), dt.date(2026, 3, 1), dt.date(9999, 12, 31)]
