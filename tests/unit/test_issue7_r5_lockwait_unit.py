"""Issue 7, round 5, finding 3: the lock wait always ends strictly before the answer timeout,
the shorter of query_timeout_s (async) and the sync drivers' whole-second read timeout; a URL
with its own init_command and an explicit lock_wait_timeout_s is refused, not half ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import make_url

from shardrouter.core.config import PoolConfig, config_from_dict
from shardrouter.engine.engines import engine_options
from shardrouter.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

ORDERS_YAML = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"
URL = "mysql+pymysql://root:secret@127.0.0.1:3401/orders_s0"


def _raw(pool: dict[str, Any], url: str = URL) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(ORDERS_YAML.read_text())
    raw["shards"]["s0"]["primary"] = url
    raw["shards"]["s0"]["pool"] = pool
    return raw


def _refusal(pool: dict[str, Any], url: str = URL) -> str:
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_raw(pool, url), env={})
    message = str(refused.value)
    assert "secret" not in message
    return message


QUERY_TIMEOUTS = [2, 2.4, 2.5, 2.6, 3, 3.5, 4, 9, 30, 86_400]


@pytest.mark.parametrize("query_timeout", QUERY_TIMEOUTS)
def test_default_lock_wait_ends_before_every_answer_timeout(query_timeout: float) -> None:
    """Sync drivers read int(max(1, round(q))) seconds, the async routers wait q: the default
    lock wait is below both (a held row is a LockConflictError, never a read timeout)."""
    pool = PoolConfig(query_timeout_s=query_timeout)
    sync_read = engine_options(make_url(URL), pool)["connect_args"]["read_timeout"]
    assert 1 <= pool.lock_wait_s < sync_read
    assert pool.lock_wait_s < query_timeout


@pytest.mark.parametrize(
    ("query_timeout", "lock_wait"), [(2, 1), (2.4, 1), (2.6, 1), (3.5, 1), (9, 4), (30, 15)]
)
def test_default_lock_wait_is_half_the_answer_timeout(query_timeout: float, lock_wait: int) -> None:
    """Half of the answer timeout (2.4 s reads as 2 for the sync drivers), rounded down."""
    assert PoolConfig(query_timeout_s=query_timeout).lock_wait_s == lock_wait


@pytest.mark.parametrize("query_timeout", [0.1, 0.5, 1, 1.4, 1.9])
def test_a_query_timeout_leaving_no_second_for_the_default_lock_wait_is_refused(
    query_timeout: float,
) -> None:
    """Below 2 s no whole second of lock wait ends before the answer timeout (was: a lock
    wait of 1 s, as long as a 1 s query timeout: a held row read as an unavailable shard).
    The message names both ways out."""
    message = _refusal({"query_timeout_s": query_timeout})
    assert "query_timeout_s to 2 or more" in message
    assert "lock_wait_timeout_s: 0" in message


@pytest.mark.parametrize("query_timeout", [0.1, 0.5, 1, 1.9])
def test_a_short_query_timeout_with_no_lock_wait_is_taken(query_timeout: float) -> None:
    """lock_wait_timeout_s: 0, chosen: MariaDB fails a held row at once (checked on 10.11)."""
    config = config_from_dict(
        _raw({"query_timeout_s": query_timeout, "lock_wait_timeout_s": 0}), env={}
    )
    options = engine_options(config.shards["s0"].primary, config.shards["s0"].pool)
    assert options["connect_args"]["init_command"] == "SET SESSION innodb_lock_wait_timeout = 0"


@pytest.mark.parametrize(
    ("query_timeout", "lock_wait"), [(2.4, 2), (1, 1), (0.5, 1), (1.5, 2), (4, 4)]
)
def test_an_explicit_lock_wait_not_below_the_answer_timeout_is_refused(
    query_timeout: float, lock_wait: int
) -> None:
    """2.4 s reads as a 2 s read timeout for PyMySQL: a lock wait of 2 ends with it (was:
    accepted, compared with the float 2.4)."""
    message = _refusal({"query_timeout_s": query_timeout, "lock_wait_timeout_s": lock_wait})
    assert "lock_wait_timeout_s" in message and "query_timeout_s" in message


@pytest.mark.parametrize(("query_timeout", "lock_wait"), [(2.6, 2), (0.5, 0), (1.5, 1), (4, 3)])
def test_an_explicit_lock_wait_below_the_answer_timeout_is_taken(
    query_timeout: float, lock_wait: int
) -> None:
    config = config_from_dict(
        _raw({"query_timeout_s": query_timeout, "lock_wait_timeout_s": lock_wait}), env={}
    )
    pool = config.shards["s0"].pool
    assert pool.lock_wait_s == lock_wait
    assert (
        lock_wait
        < engine_options(config.shards["s0"].primary, pool)["connect_args"]["read_timeout"]
    )


def test_a_url_init_command_with_an_explicit_lock_wait_is_refused() -> None:
    """The URL's init_command replaces the router's session setup: the explicit lock wait
    would be silently ignored (was: accepted, the server's 50 s lock wait in force)."""
    url = URL + "?init_command=SET+SESSION+sql_mode%3D%27STRICT_ALL_TABLES%27"
    message = _refusal({"query_timeout_s": 4, "lock_wait_timeout_s": 1}, url)
    assert "init_command" in message and "lock_wait_timeout_s" in message
    assert "innodb_lock_wait_timeout = 1" in message  # the way out


def test_a_replica_url_init_command_with_an_explicit_lock_wait_is_refused() -> None:
    raw = _raw({"query_timeout_s": 4, "lock_wait_timeout_s": 1})
    raw["shards"]["s0"]["replicas"] = [URL + "?init_command=SET+autocommit%3D1"]
    with pytest.raises(ConfigError) as refused:
        config_from_dict(raw, env={})
    assert "init_command" in str(refused.value)


def test_a_url_init_command_without_a_lock_wait_is_the_operators_choice() -> None:
    url = URL + "?init_command=SET+SESSION+innodb_lock_wait_timeout%3D1"
    config = config_from_dict(_raw({"query_timeout_s": 4}, url), env={})
    options = engine_options(config.shards["s0"].primary, config.shards["s0"].pool)
    assert "init_command" not in options["connect_args"]  # the URL's own one is used
