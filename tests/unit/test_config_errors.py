"""Bad topology configs: each problem is reported with its field path, the bad value and the fix."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shardrouter.core.config import config_from_dict, load_config, safe_url, validate_file
from shardrouter.core.topology import Topology
from shardrouter.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
ORDERS_YAML = REPO / "config" / "orders.yaml"
ORDERS_SQLITE_YAML = REPO / "config" / "orders-sqlite.yaml"

Mutation = Callable[[dict[str, Any]], None]


def problems_of(raw: Any, env: dict[str, str] | None = None) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, env={} if env is None else env)
    assert info.value.problems, "a ConfigError must list at least one problem"
    return info.value.problems


def put(path: str, value: Any) -> Mutation:
    """Set the value at a dotted path (``tables.orders.strategy``)."""

    def mutate(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        node[last] = value

    return mutate


def drop(path: str) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(raw: dict[str, Any]) -> None:
        for m in mutations:
            m(raw)

    return mutate


USERS_LOOKUP = "tables.users.secondary.0.strategy"
ALL_TABLES = "countries, merchant_orders, order_items, orders, user_emails, users"

# Each case: a mutation of config/orders.yaml and the exact problem line it must produce.
EXACT_CASES = [
    pytest.param(
        put("slots", 1000),
        "slots: 1000 is not a power of two in [1, 65536]"
        " (use e.g. 1024; it is fixed for the life of the cluster)",
        id="slots-not-power-of-two",
    ),
    pytest.param(
        put("slots", 0),
        "slots: 0 is not a power of two in [1, 65536]"
        " (use e.g. 1024; it is fixed for the life of the cluster)",
        id="slots-zero",
    ),
    pytest.param(
        put("slots", 1 << 17),
        "slots: 131072 is not a power of two in [1, 65536]"
        " (use e.g. 1024; it is fixed for the life of the cluster)",
        id="slots-too-many",
    ),
    pytest.param(
        put("slots", "many"),
        "slots: Input should be a valid integer, unable to parse string as an integer (got 'many')",
        id="slots-not-a-number",
    ),
    pytest.param(
        put("shards.s2.slots", [[512, 800]]),
        "shards.s3.slots: [768, 1024) overlaps s2 [512, 800)",
        id="overlap",
    ),
    pytest.param(
        put("shards.s2.slots", [[512, 700]]),
        "slots: [700, 768) are owned by no shard (add the range to a shard's slots)",
        id="gap-in-the-middle",
    ),
    pytest.param(
        put("shards.s3.slots", [[768, 1000]]),
        "slots: [1000, 1024) are owned by no shard (add the range to a shard's slots)",
        id="gap-at-the-end",
    ),
    pytest.param(
        put("shards.s0.slots", [[10, 256]]),
        "slots: [0, 10) are owned by no shard (add the range to a shard's slots)",
        id="gap-at-the-start",
    ),
    pytest.param(
        put("shards.s3.slots", [[768, 2048]]),
        "shards.s3.slots[0]: [768, 2048) is outside [0, 1024) (slots is 1024)",
        id="range-beyond-slots",
    ),
    pytest.param(
        put("shards.s0.slots", [[-5, 256]]),
        "shards.s0.slots[0]: [-5, 256) is outside [0, 1024) (slots is 1024)",
        id="range-negative",
    ),
    pytest.param(
        put("shards.s3.slots", [[1024, 768]]),
        "shards.s3.slots[0]: [1024, 768) is empty or reversed"
        " (write [start, end) with start < end)",
        id="range-reversed",
    ),
    pytest.param(
        put("shards.s3.slots", [[768, 768], [768, 1024]]),
        "shards.s3.slots[0]: [768, 768) is empty or reversed (write [start, end) with start < end)",
        id="range-empty",
    ),
    pytest.param(
        put("shards.s3.slots", []),
        "slots: [768, 1024) are owned by no shard (add the range to a shard's slots)",
        id="shard-slots-empty-list",
    ),
    pytest.param(
        put("shards.s0.slots", [[0, 128, 256]]),
        "shards.s0.slots[0]: Tuple should have at most 2 items after validation, not 3"
        " (got [0, 128, 256])",
        id="range-with-three-numbers",
    ),
    pytest.param(
        put("shards", {}),
        "shards: no shards defined (add at least one under shards:)",
        id="no-shards",
    ),
    pytest.param(
        drop("shards"),
        "shards: required but missing (add it)",
        id="shards-key-missing",
    ),
    pytest.param(
        drop("shards.s0.primary"),
        "shards.s0.primary: required but missing (add it)",
        id="shard-primary-missing",
    ),
    pytest.param(
        lambda raw: raw["shards"].update({"s 4": raw["shards"].pop("s3")}),
        "shards.s 4: name 's 4' must be 1-64 letters, digits, '_' or '-'",
        id="shard-name-with-space",
    ),
    pytest.param(
        put("shards.s0.primary", "not a url"),
        "shards.s0.primary: 'not a url' is not a database URL"
        " (write e.g. mysql+pymysql://user:${DB_PASSWORD}@host:3306/orders_s0)",
        id="bad-url",
    ),
    pytest.param(
        put("shards.s0.primary", "postgresql://app@db.internal/orders"),
        "shards.s0.primary: backend 'postgresql' in 'postgresql://app@db.internal/orders'"
        " is not supported (use a mysql+<driver>:// or mariadb+<driver>:// URL;"
        " sqlite:// for the demo)",
        id="unsupported-backend-postgresql",
    ),
    pytest.param(
        put("shards.s1.replicas", ["oracle://app@db.internal/orders"]),
        "shards.s1.replicas[0]: backend 'oracle' in 'oracle://app@db.internal/orders'"
        " is not supported (use a mysql+<driver>:// or mariadb+<driver>:// URL;"
        " sqlite:// for the demo)",
        id="unsupported-backend-in-replica",
    ),
    pytest.param(
        put("shards.s0.primary", "mysql+pymysql://app@127.0.0.1:3401"),
        "shards.s0.primary: 'mysql+pymysql://app@127.0.0.1:3401' names no database"
        " (end the URL with /<database>, e.g. /orders_s0)",
        id="url-without-database",
    ),
    pytest.param(
        put("shards.s0.pool", {"size": 0}),
        "shards.s0.pool.size: Input should be greater than or equal to 1 (got 0)",
        id="pool-size-zero",
    ),
    pytest.param(
        put("tables.orders.strategy", "hsah"),
        "tables.orders.strategy: unknown 'hsah'"
        " (did you mean 'hash'? known: gene, hash, lookup, mod, range)",
        id="unknown-strategy-did-you-mean",
    ),
    pytest.param(
        put("tables.orders.strategy", "consistent"),
        "tables.orders.strategy: unknown 'consistent' (known: gene, hash, lookup, mod, range)",
        id="unknown-strategy-no-close-match",
    ),
    pytest.param(
        put("tables.merchant_orders.strategy", {"boundaries": [1]}),
        "tables.merchant_orders.strategy: no strategy name"
        " (write strategy: hash, or strategy: {name: ...})",
        id="strategy-without-name",
    ),
    pytest.param(
        put(
            "tables.orders.strategy",
            {"name": "lookup", "table": "merchant_orders", "from": "merchant_id", "to": "user_id"},
        ),
        "tables.orders.strategy: lookup cannot be a table's primary strategy (it needs a query"
        " to find slots); shard the table by hash and list the lookup under secondary",
        id="lookup-as-primary",
    ),
    pytest.param(
        put("tables.orders.colum", "user_id"),
        "tables.orders.colum: unknown key (did you mean 'column'? known here: bound_to,"
        " broadcast, column, secondary, split, strategy, type)",
        id="unknown-table-key-did-you-mean",
    ),
    pytest.param(
        put("tabels", {}),
        "tabels: unknown key (did you mean 'tables'? known here: ids, meta, moving, name,"
        " shards, slots, tables, version)",
        id="unknown-top-level-key",
    ),
    pytest.param(
        put("ids.worker", 3),
        "ids.worker: unknown key (did you mean 'worker_id'? known here: epoch, gene_bits,"
        " max_backward_ms, sequence_bits, timestamp_bits, worker_bits, worker_id)",
        id="unknown-ids-key",
    ),
    pytest.param(
        put("shards.s0.replica", []),
        "shards.s0.replica: unknown key (did you mean 'replicas'? known here: pool, primary,"
        " replicas, slots)",
        id="unknown-shard-key",
    ),
    pytest.param(
        drop("tables.users.column"),
        "tables.users: column missing (give column and strategy, or bound_to: <table>,"
        " or broadcast: true)",
        id="missing-column",
    ),
    pytest.param(
        drop("tables.users.strategy"),
        "tables.users: strategy missing (give column and strategy, or bound_to: <table>,"
        " or broadcast: true)",
        id="missing-strategy",
    ),
    pytest.param(
        put("tables.order_items.bound_to", "ordrs"),
        f"tables.order_items.bound_to: unknown table 'ordrs' (known: {ALL_TABLES})",
        id="bound-to-unknown-table",
    ),
    pytest.param(
        put("tables.order_items.bound_to", "countries"),
        "tables.order_items.bound_to: countries is broadcast"
        " (bind to a table that has its own column and strategy)",
        id="bound-to-broadcast-table",
    ),
    pytest.param(
        put("tables.order_items.bound_to", "order_items"),
        "tables.order_items.bound_to: a table cannot be bound to itself",
        id="bound-to-itself",
    ),
    pytest.param(
        put("tables.oi2", {"bound_to": "order_items"}),
        "tables.oi2.bound_to: order_items is itself bound to orders"
        " (bind to a table that has its own column and strategy)",
        id="bound-to-a-bound-table",
    ),
    pytest.param(
        put("tables.order_items.column", "user_id"),
        "tables.order_items.column: a bound table takes its owner's column (remove it)",
        id="bound-table-with-own-column",
    ),
    pytest.param(
        put("tables.order_items.split", 2),
        "tables.order_items.split: a bound table is split like its owner (4); remove split",
        id="bound-table-with-other-split",
    ),
    pytest.param(
        put("tables.countries.column", "code"),
        "tables.countries.column: a broadcast table has no column (remove it)",
        id="broadcast-with-column",
    ),
    pytest.param(
        put("tables.countries.split", 2),
        "tables.countries.split: a broadcast table is not split (remove split)",
        id="broadcast-with-split",
    ),
    pytest.param(
        put("tables.countries.bound_to", "orders"),
        "tables.countries: broadcast and bound_to exclude each other (keep one)",
        id="broadcast-and-bound-to",
    ),
    pytest.param(
        put("ids.timestamp_bits", 40),
        "ids: timestamp_bits 40 + gene_bits 10 + worker_bits 8 + sequence_bits 4 = 62,"
        " not 63 (ids are 63-bit; adjust timestamp_bits or worker_bits)",
        id="id-bits-not-63",
    ),
    pytest.param(
        both(put("ids.gene_bits", 9), put("ids.timestamp_bits", 42)),
        "ids.gene_bits: 9 does not match 1024 slots (gene_bits must be log2(slots) = 10)",
        id="gene-bits-not-log2-slots",
    ),
    pytest.param(
        put("ids.worker_id", 256),
        "ids.worker_id: 256 does not fit in 8 worker bits (use 0..255 or widen worker_bits)",
        id="worker-id-too-big",
    ),
    pytest.param(
        put("ids.worker_id", -1),
        "ids.worker_id: Input should be greater than or equal to 0 (got -1)",
        id="worker-id-negative",
    ),
    pytest.param(
        put("ids.epoch", "2025-01-01T00:00:00+08:00"),
        "ids.epoch: 2025-01-01T00:00:00+08:00 is not in UTC"
        " (write it with a Z suffix, e.g. 2025-01-01T00:00:00Z)",
        id="epoch-not-utc",
    ),
    pytest.param(
        put("ids.epoch", "2025-01-01T00:00:00"),
        "ids.epoch: 2025-01-01T00:00:00 is not in UTC"
        " (write it with a Z suffix, e.g. 2025-01-01T00:00:00Z)",
        id="epoch-naive-text",
    ),
    pytest.param(
        put("ids.epoch", dt.datetime(2025, 1, 1)),
        "ids.epoch: 2025-01-01T00:00:00 is not in UTC"
        " (write it with a Z suffix, e.g. 2025-01-01T00:00:00Z)",
        id="epoch-naive-datetime",
    ),
    pytest.param(
        put("ids.epoch", "2999-01-01T00:00:00Z"),
        "ids.epoch: 2999-01-01T00:00:00+00:00 is in the future (ids would be refused until then)",
        id="epoch-in-the-future",
    ),
    pytest.param(
        put("tables.merchant_orders.strategy", {"name": "range", "boundaries": [10, 5]}),
        "tables.merchant_orders.strategy: boundaries[1] 5 is not greater than 10"
        " (boundaries must be strictly increasing)",
        id="range-boundaries-not-increasing",
    ),
    pytest.param(
        put(
            "tables.merchant_orders.strategy",
            {"name": "range", "boundaries": [10, 20], "slots": [0, 1]},
        ),
        "tables.merchant_orders.strategy: slots has 2 entries but 2 boundaries make 3 ranges"
        " (give one slot per range)",
        id="range-slots-count-mismatch",
    ),
    pytest.param(
        put(
            "tables.merchant_orders.strategy",
            {"name": "range", "boundaries": [10], "slots": [0, 5000]},
        ),
        "tables.merchant_orders.strategy: slots[1] 5000 is outside [0, 1024)",
        id="range-slot-out-of-range",
    ),
    pytest.param(
        put("tables.merchant_orders.strategy", {"name": "range", "boundaries": ["a", "b"]}),
        "tables.merchant_orders.strategy: boundary 'a' is not an integer (the column's type)",
        id="range-boundary-wrong-type",
    ),
    pytest.param(
        put("tables.merchant_orders.strategy", {"name": "hash", "seed": 3}),
        "tables.merchant_orders.strategy.seed: unknown parameter of hash (known: fold_case)",
        id="unknown-strategy-parameter",
    ),
    pytest.param(
        put(f"{USERS_LOOKUP}.too", "user_id"),
        "tables.users.secondary[0].strategy.too: unknown parameter of lookup"
        " (known: from, key, table, to)",
        id="unknown-lookup-parameter",
    ),
    pytest.param(
        drop(f"{USERS_LOOKUP}.to"),
        "tables.users.secondary[0].strategy.to: required by strategy lookup but missing (add it)",
        id="lookup-missing-to",
    ),
    pytest.param(
        put(f"{USERS_LOOKUP}.table", "user_mails"),
        "tables.users.secondary[0].strategy.table: unknown table 'user_mails'"
        " (define the lookup table under tables:, sharded by email)",
        id="lookup-table-unknown",
    ),
    pytest.param(
        put(f"{USERS_LOOKUP}.from", "mail"),
        "tables.users.secondary[0].strategy.from: 'mail' is not the sharding column of"
        " user_emails ('email'); a lookup table is sharded by its 'from' column",
        id="lookup-from-not-lookup-tables-column",
    ),
    pytest.param(
        put(f"{USERS_LOOKUP}.to", "uid"),
        "tables.users.secondary[0].strategy.to: 'uid' is not users's sharding column"
        " ('user_id'); a lookup maps to the owner's primary key",
        id="lookup-to-not-owners-column",
    ),
    pytest.param(
        put("tables.users.secondary.0.type", "int"),
        "tables.users.secondary[0].type: int but lookup table user_emails is sharded by a str"
        " column (make them the same)",
        id="lookup-type-mismatch",
    ),
    pytest.param(
        put("tables.orders.secondary.0.column", "user_id"),
        "tables.orders.secondary[0].column: 'user_id' is already a sharding column of orders",
        id="secondary-duplicates-primary",
    ),
    pytest.param(
        put("tables.orders.secondary.1.column", "order_id"),
        "tables.orders.secondary[1].column: 'order_id' is already a sharding column of orders",
        id="secondary-duplicates-secondary",
    ),
    pytest.param(
        put("tables.user_emails.strategy", "mod"),
        "tables.user_emails.strategy: strategy mod cannot route a str column"
        " (it takes int; fix the column's type or pick another strategy)",
        id="mod-on-str-column",
    ),
    pytest.param(
        put("tables.orders.secondary.0.type", "date"),
        "tables.orders.secondary[0].strategy: strategy gene cannot route a date column"
        " (it takes int; fix the column's type or pick another strategy)",
        id="gene-on-date-column",
    ),
    pytest.param(
        put("tables.users.type", "uuid"),
        "tables.users.type: Input should be 'int', 'str' or 'date' (got 'uuid')",
        id="unknown-column-type",
    ),
    pytest.param(
        put("tables.bad-name", {"column": "x", "strategy": "hash"}),
        "tables.bad-name: name 'bad-name' is not a plain SQL identifier (letters, digits, '_')",
        id="table-name-not-identifier",
    ),
    pytest.param(
        put("tables.1orders", {"column": "x", "strategy": "hash"}),
        "tables.1orders: name '1orders' is not a plain SQL identifier (letters, digits, '_')",
        id="table-name-starts-with-digit",
    ),
    pytest.param(
        put("tables.orders.split", 2048),
        "tables.orders.split: 2048 is more than the 1024 slots",
        id="split-more-than-slots",
    ),
    pytest.param(
        put("tables.orders.split", 0),
        "tables.orders.split: Input should be greater than or equal to 1 (got 0)",
        id="split-zero",
    ),
    pytest.param(
        put("version", 0),
        "version: Input should be greater than or equal to 1 (got 0)",
        id="version-zero",
    ),
]


@pytest.mark.parametrize(("mutate", "expected"), EXACT_CASES)
def test_bad_config_problem(orders_raw: dict[str, Any], mutate: Mutation, expected: str) -> None:
    mutate(orders_raw)
    problems = problems_of(orders_raw)
    assert expected in problems, "\n".join(problems)


def test_at_least_thirty_bad_config_cases() -> None:
    assert len(EXACT_CASES) >= 30


# -- secrets --------------------------------------------------------------------------------

SECRET = "s3cr3t-Pa55"


@pytest.mark.parametrize(
    ("url", "expected_fragment"),
    [
        pytest.param(
            f"postgresql://app:{SECRET}@db/orders",
            "'postgresql://app:***@db/orders' is not supported",
            id="unsupported-backend",
        ),
        pytest.param(
            f"mysql+pymysql://app:{SECRET}@127.0.0.1:3401",
            "'mysql+pymysql://app:***@127.0.0.1:3401' names no database",
            id="no-database",
        ),
        pytest.param(
            f"mysql+pymysql//app:{SECRET}@127.0.0.1/orders",
            "'mysql+pymysql//app:***@127.0.0.1/orders' is not a database URL",
            id="unparsable",
        ),
    ],
)
def test_password_is_masked_in_url_problems(
    orders_raw: dict[str, Any], url: str, expected_fragment: str
) -> None:
    orders_raw["shards"]["s0"]["primary"] = url
    with pytest.raises(ConfigError) as info:
        config_from_dict(orders_raw, env={})
    assert SECRET not in str(info.value)
    assert any(expected_fragment in p for p in info.value.problems), info.value.problems


def test_password_from_env_is_masked(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = "${SHARD_URL}"
    env = {"SHARD_URL": f"postgresql://app:{SECRET}@db/orders"}
    with pytest.raises(ConfigError) as info:
        config_from_dict(orders_raw, env=env)
    assert SECRET not in str(info.value)
    assert "postgresql://app:***@db/orders" in str(info.value)


def test_safe_url() -> None:
    assert (
        safe_url(f"mysql+pymysql://root:{SECRET}@h:3306/db") == "mysql+pymysql://root:***@h:3306/db"
    )
    assert safe_url("mysql+pymysql://root@h/db") == "mysql+pymysql://root@h/db"
    assert SECRET not in safe_url(f"mysql+pymysql//root:{SECRET}@h/db")


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(
            put("shards.s0.replicas", f"mysql+pymysql://ro:{SECRET}@h/orders_s0"),
            id="replicas-given-as-a-string",
        ),
        pytest.param(
            put("shards.s0.primary", [f"mysql+pymysql://app:{SECRET}@h/orders_s0"]),
            id="primary-given-as-a-list",
        ),
        pytest.param(
            put("shards.s0", f"mysql+pymysql://app:{SECRET}@h/orders_s0"),
            id="shard-given-as-a-url",
        ),
    ],
)
def test_password_is_masked_in_structure_problems(
    orders_raw: dict[str, Any], mutate: Mutation
) -> None:
    mutate(orders_raw)
    with pytest.raises(ConfigError) as info:
        config_from_dict(orders_raw, env={})
    assert SECRET not in str(info.value)


def test_password_is_masked_in_a_url_without_scheme(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = f"app:{SECRET}@127.0.0.1/orders_s0"
    with pytest.raises(ConfigError) as info:
        config_from_dict(orders_raw, env={})
    assert SECRET not in str(info.value)


def test_non_numeric_port_is_a_config_error(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = f"mysql+pymysql://app:{SECRET}@127.0.0.1:x/orders"
    with pytest.raises(ConfigError) as info:
        config_from_dict(orders_raw, env={})
    assert any(p.startswith("shards.s0.primary: ") for p in info.value.problems)
    assert SECRET not in str(info.value)


# -- environment interpolation ----------------------------------------------------------------


def test_missing_env_var_names_the_variable(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = "mysql+pymysql://app:${ORDERS_DB_PW}@h/orders_s0"
    assert problems_of(orders_raw, env={}) == (
        "shards.s0.primary: environment variable ORDERS_DB_PW is not set"
        " (export it, or write ${ORDERS_DB_PW:-default})",
    )


def test_env_default_is_used(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = "mysql+pymysql://app:${PW:-dflt}@h/${DB:-orders_s0}"
    model = config_from_dict(orders_raw, env={})
    primary = model.shards["s0"].primary.render_as_string(hide_password=False)
    assert primary == "mysql+pymysql://app:dflt@h/orders_s0"


def test_env_value_wins_over_default(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = "mysql+pymysql://app:${PW:-dflt}@h/${DB}"
    model = config_from_dict(orders_raw, env={"PW": "fromenv", "DB": "orders_x"})
    assert (
        model.shards["s0"].primary.render_as_string(hide_password=False)
        == "mysql+pymysql://app:fromenv@h/orders_x"
    )


def test_env_empty_default(orders_raw: dict[str, Any]) -> None:
    model = config_from_dict(orders_raw, env={})
    assert (
        model.shards["s0"].primary.render_as_string(hide_password=False)
        == "mysql+pymysql://root:@127.0.0.1:3401/orders_s0"
    )


def test_every_missing_env_var_is_reported(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"]["s0"]["primary"] = "mysql+pymysql://${USER_A}:${PW_A}@h/db"
    orders_raw["shards"]["s1"]["primary"] = "mysql+pymysql://u:${PW_B}@h/db"
    problems = problems_of(orders_raw, env={})
    assert [p.split(": environment variable ")[1].split()[0] for p in problems] == [
        "USER_A",
        "PW_A",
        "PW_B",
    ]


# -- YAML files -----------------------------------------------------------------------------


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text("name: a\nslots: 1024\nname: b\nshards: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert info.value.problems == (
        "YAML error at line 3, column 1: duplicate key 'name' (first at line 1;"
        " remove one of them)",
    )
    assert info.value.source == str(path)


def test_duplicate_nested_yaml_key(tmp_path: Path) -> None:
    text = ORDERS_YAML.read_text(encoding="utf-8").replace(
        "    slots: [[0, 256]]\n", "    slots: [[0, 256]]\n    slots: [[0, 512]]\n", 1
    )
    path = tmp_path / "dup.yaml"
    path.write_text(text, encoding="utf-8")
    problems = validate_file(path, env={})
    assert len(problems) == 1
    assert "duplicate key 'slots'" in problems[0] and "remove one of them" in problems[0]


def test_yaml_syntax_error_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: orders\nshards:\n  s0: {primary: x\n  s1: 2\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    (problem,) = info.value.problems
    assert problem.startswith("YAML error at line 4, column ")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param(
            "- a\n- b\n",
            "the top level is a list, not a mapping (start with 'shards:' and 'tables:')",
            id="list",
        ),
        pytest.param(
            "just text\n",
            "the top level is a str, not a mapping (start with 'shards:' and 'tables:')",
            id="scalar",
        ),
        pytest.param(
            "",
            "the top level is empty, not a mapping (start with 'shards:' and 'tables:')",
            id="empty-file",
        ),
    ],
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "top.yaml"
    path.write_text(text, encoding="utf-8")
    assert validate_file(path, env={}) == [expected]


def test_missing_file(tmp_path: Path) -> None:
    problems = validate_file(tmp_path / "nope.yaml", env={})
    assert problems == ["cannot read the file: No such file or directory"]


# -- reporting ------------------------------------------------------------------------------


def test_several_problems_are_all_reported(orders_raw: dict[str, Any]) -> None:
    orders_raw["ids"]["worker_id"] = 999
    orders_raw["tables"]["orders"]["strategy"] = "hsah"
    orders_raw["tables"]["order_items"]["bound_to"] = "ordrs"
    orders_raw["shards"]["s2"]["slots"] = [[512, 700]]
    problems = problems_of(orders_raw)
    assert len(problems) == 4, problems
    assert any(p.startswith("ids.worker_id: 999") for p in problems)
    assert any(p.startswith("tables.orders.strategy: unknown 'hsah'") for p in problems)
    assert any(p.startswith("tables.order_items.bound_to: unknown table 'ordrs'") for p in problems)
    assert any(p.startswith("slots: [700, 768) are owned by no shard") for p in problems)


def test_several_structure_problems_are_all_reported(orders_raw: dict[str, Any]) -> None:
    orders_raw["tables"]["orders"]["colum"] = "x"
    orders_raw["ids"]["worker_id"] = -1
    orders_raw["shards"]["s0"]["pool"] = {"size": 0}
    problems = problems_of(orders_raw)
    assert len(problems) == 3, problems


def test_every_overlap_is_reported(orders_raw: dict[str, Any]) -> None:
    orders_raw["shards"] = {
        "a": {"primary": "sqlite://", "slots": [[0, 1024]]},
        "b": {"primary": "sqlite://", "slots": [[100, 200]]},
        "c": {"primary": "sqlite://", "slots": [[300, 400]]},
    }
    problems = problems_of(orders_raw)
    assert "shards.b.slots: [100, 200) overlaps a [0, 1024)" in problems
    assert "shards.c.slots: [300, 400) overlaps a [0, 1024)" in problems


def test_config_error_str_names_the_source_file(tmp_path: Path) -> None:
    path = tmp_path / "topology.yaml"
    path.write_text(
        ORDERS_YAML.read_text(encoding="utf-8").replace("slots: 1024", "slots: 1000", 1),
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    text = str(info.value)
    count = len(info.value.problems)
    assert text.startswith(f"invalid topology config {path} ({count} problems):\n")
    for problem in info.value.problems:
        assert f"  {path}: {problem}" in text


def test_config_error_from_dict_names_its_source() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict([], source="inline-test")
    assert info.value.source == "inline-test"
    assert str(info.value).startswith("invalid topology config inline-test (1 problem):")


def test_config_error_is_raised_by_topology_load(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text("shards: {}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="no shards defined"):
        Topology.load(path, env={})


def test_shipped_configs_are_valid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert validate_file(ORDERS_YAML, env={}) == []
    monkeypatch.delenv("SHARDROUTER_DEMO_DIR", raising=False)
    # Shipped configs validate as shipped (issue 7, defect 25): the demo folder has a default.
    assert validate_file(ORDERS_SQLITE_YAML) == []
    unset = load_config(ORDERS_SQLITE_YAML)
    assert str(unset.shards["s0"].primary) == "sqlite:///.shardrouter-demo/orders_s0.db"
    monkeypatch.setenv("SHARDROUTER_DEMO_DIR", str(tmp_path))
    assert validate_file(ORDERS_SQLITE_YAML) == []
    model = load_config(ORDERS_SQLITE_YAML)
    assert str(model.shards["s0"].primary) == f"sqlite:///{tmp_path}/orders_s0.db"


def test_valid_config_is_frozen(orders_raw: dict[str, Any]) -> None:
    model = config_from_dict(orders_raw, env={})
    with pytest.raises(ValueError, match="frozen"):
        model.slots = 2048  # type: ignore[misc]
