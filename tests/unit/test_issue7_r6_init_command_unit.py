"""Issue 7, review 5, finding 4: a shard URL with its own init_command (which replaces the
session setup that sets the lock wait) must set innodb_lock_wait_timeout itself, below the
answer timeout; before, such a URL kept the server's 50 s lock wait and a held row read as an
unavailable shard."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from shardrouter.core.config import config_from_dict
from shardrouter.engine.engines import engine_options
from shardrouter.errors import ConfigError

pytestmark = pytest.mark.timeout(30)

ORDERS_YAML = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"
URL = "mysql+pymysql://root:secret@127.0.0.1:3401/orders_s0"


def _raw(url: str, *, replica: bool = False, query_timeout_s: float = 3) -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(ORDERS_YAML.read_text())
    shard = raw["shards"]["s0"]
    if replica:
        shard["replicas"] = [url]
    else:
        shard["primary"] = url
    shard["pool"] = {"query_timeout_s": query_timeout_s}
    return raw


@pytest.mark.parametrize("replica", [False, True])
def test_an_init_command_without_a_lock_wait_is_refused_with_the_fix(replica: bool) -> None:
    url = URL + "?init_command=SET+SESSION+sql_mode%3D%27STRICT_ALL_TABLES%27"
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_raw(url, replica=replica), env={})
    message = str(refused.value)
    assert "init_command" in message and "innodb_lock_wait_timeout = 1" in message
    assert "secret" not in message


@pytest.mark.parametrize("seconds", [3, 50])
def test_an_init_command_lock_wait_not_below_the_answer_timeout_is_refused(seconds: int) -> None:
    url = URL + f"?init_command=SET+SESSION+innodb_lock_wait_timeout%3D{seconds}"
    with pytest.raises(ConfigError) as refused:
        config_from_dict(_raw(url), env={})
    assert "not below the answer timeout" in str(refused.value)


def test_an_init_command_that_sets_a_short_lock_wait_is_used_as_written() -> None:
    command = "SET SESSION sql_mode='STRICT_ALL_TABLES', innodb_lock_wait_timeout = 2"
    url = URL + "?init_command=" + command.replace(" ", "+").replace("'", "%27").replace("=", "%3D")
    config = config_from_dict(_raw(url), env={})
    shard = config.shards["s0"]
    assert shard.primary.query["init_command"] == command
    assert "init_command" not in engine_options(shard.primary, shard.pool)["connect_args"]
