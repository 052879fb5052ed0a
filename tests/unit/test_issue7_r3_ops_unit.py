"""Issue 7, third round (ops): passwords masked in every URL shape, submodules as attributes of
the lazy package, and --json errors as JSON for every shardctl command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from shardrouter.cli import main
from shardrouter.core.config import load_config, safe_url
from shardrouter.errors import ConfigError

SECRET = "Sekr3tPW"

# Shapes a password can take in a value that may not parse: spaces, quotes, several '@',
# '//', two URLs in one value, no '@' at all (host forgotten), a query parameter.
URL_SHAPES = [
    f"mysql+pymysql://root:my {SECRET}@127.0.0.1:39x0/orders_s0",
    f"mysql+pymysql://root:my {SECRET}@127.0.0.1:3306/orders_s0",
    f"mysql+pymysql://root:{SECRET} x@y@127.0.0.1:39x0/orders_s0",
    f"mysql+pymysql://root:{SECRET}@x@127.0.0.1/orders_s0",
    f"mysql+pymysql://root:'{SECRET}'@127.0.0.1:39x0/orders_s0",
    f'mysql+pymysql://root:"a {SECRET}"@127.0.0.1/orders_s0',
    f"mysql+pymysql://root:a//{SECRET}@127.0.0.1:x/orders_s0",
    f"mysql+pymysql:root:a//{SECRET}@127.0.0.1/orders_s0",
    f"mysql+pymysql//root:{SECRET} @127.0.0.1/orders_s0",
    f"  mysql+pymysql://root:{SECRET}@127.0.0.1:x/orders_s0",
    f"mysql+pymysql://a:{SECRET}@h1/x mysql+pymysql://b:{SECRET}@h2/y",
    f"mysql+pymysql://root:{SECRET}",
    f"mysql+pymysql://root:{SECRET}/orders_s0",
    f"mysql+pymysql://root:my {SECRET}/orders_s0",
    f"mysql+pymysql://ro ot:{SECRET}@127.0.0.1:x/orders_s0",
    f"mysql+pymysql://root@127.0.0.1/orders_s0?password={SECRET}",
    f"mysql+pymysql://root@127.0.0.1:x/orders_s0?charset=utf8mb4&passwd={SECRET}",
    f"root:my {SECRET}@127.0.0.1/orders_s0",
]


@pytest.mark.parametrize("url", URL_SHAPES)
def test_safe_url_never_shows_the_password(url: str) -> None:
    assert SECRET not in safe_url(url)


def test_safe_url_keeps_what_helps() -> None:
    """The masking hides the password, not the host and port a user must fix."""
    shown = safe_url(f"mysql+pymysql://root:my {SECRET}@127.0.0.1:39x0/orders_s0")
    assert shown == "mysql+pymysql://root:***@127.0.0.1:39x0/orders_s0"
    assert safe_url("mysql+pymysql://root@h:3306/db") == "mysql+pymysql://root@h:3306/db"
    assert safe_url("mysql+pymysql://h:3306/db") == "mysql+pymysql://h:3306/db"


def _doc_with(url: Any, where: str = "primary") -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(Path("config/orders.yaml").read_text())
    for shard in doc["shards"].values():
        if where == "primary":
            shard["primary"] = url
        else:
            shard["replicas"] = [url]
    return doc


@pytest.mark.parametrize("url", URL_SHAPES)
@pytest.mark.parametrize("where", ["primary", "replicas"])
def test_load_config_and_config_validate_never_show_the_password(
    url: str, where: str, tmp_path: Path
) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_doc_with(url, where), sort_keys=False))
    try:
        model = load_config(path)
    except ConfigError as exc:
        assert SECRET not in str(exc)
        status = 1
    else:  # a space or quotes in a password are legal: the model never shows it either
        assert SECRET not in repr(model) + str(model) + model.model_dump_json()
        status = 0
    for args in (["config", "validate", str(path)], ["config", "validate", "--json", str(path)]):
        done = CliRunner().invoke(main, args)
        assert done.exit_code == status
        assert SECRET not in done.output
        assert SECRET not in (done.stderr if done.stderr_bytes is not None else "")


def test_a_url_holding_a_password_in_its_query_is_refused(tmp_path: Path) -> None:
    """repr() of a SQLAlchemy URL masks its password part only; a query password would show
    in every repr of the config, so it is refused with the way out."""
    url = f"mysql+pymysql://root@127.0.0.1:3306/orders_s0?password={SECRET}"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_doc_with(url), sort_keys=False))
    with pytest.raises(ConfigError, match="query parameter 'password' carries a password"):
        load_config(path)


def test_two_urls_in_one_value_are_refused(tmp_path: Path) -> None:
    """They parse as one URL whose database name holds the second URL and its password."""
    url = f"mysql+pymysql://a:{SECRET}@h1/x mysql+pymysql://b:{SECRET}@h2/y"
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_doc_with(url), sort_keys=False))
    with pytest.raises(ConfigError, match="holds an '@'") as caught:
        load_config(path)
    assert SECRET not in str(caught.value)


# -- submodules of the lazy package ---------------------------------------------------------


def test_the_submodule_list_is_the_package_folder() -> None:
    import pkgutil

    import shardrouter

    found = {m.name for m in pkgutil.iter_modules(shardrouter.__path__)}
    assert found == set(shardrouter.SUBMODULES)


def _fresh(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("name", sorted(__import__("shardrouter").SUBMODULES))
def test_every_submodule_is_an_attribute_after_import_shardrouter(name: str) -> None:
    done = _fresh(
        f"import shardrouter, sys; m = shardrouter.{name};"
        f" assert m is sys.modules['shardrouter.{name}'], m"
    )
    assert done.returncode == 0, done.stderr[-400:]


def test_unknown_names_are_still_attribute_errors_and_import_loads_nothing_heavy() -> None:
    done = _fresh(
        "import shardrouter, sys\n"
        "assert not hasattr(shardrouter, 'nope')\n"
        "heavy = [m for m in ('sqlglot', 'sqlalchemy', 'aiomysql') if m in sys.modules]\n"
        "assert heavy == [], heavy\n"
        "assert 'errors' in dir(shardrouter)\n"
    )
    assert done.returncode == 0, done.stderr[-400:]


# -- --json errors are JSON, for every command -------------------------------------------


def _leaves(group: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    import click

    out: list[tuple[str, ...]] = []
    for name, command in sorted(group.commands.items()):
        if isinstance(command, click.Group):
            out += _leaves(command, (*path, name))
        else:
            out.append((*path, name))
    return out


# One failing invocation per command (no server is needed: each fails before it connects or
# on a config that cannot be read); the test below checks this covers `shardctl --help`.
FAILING = {
    ("bench",): ["--config", "{missing}", "--json"],
    ("check", "lookups"): ["--config", "{missing}", "--json"],
    ("config", "validate"): ["{missing}", "--json"],
    ("demo",): ["--config", "{missing}", "--json"],
    ("ids", "decode"): ["abc", "--config", "config/orders.yaml", "--json"],
    ("ids", "new"): ["--json", "--config", "config/orders.yaml", "--table", "countries"],
    ("meta", "init"): ["--config", "{missing}", "--json"],
    ("meta", "status"): ["--json", "--meta-url", "not a url"],
    ("route",): ["--config", "config/orders.yaml", "--table", "nope", "--key", "a=1", "--json"],
    **{
        ("reshard", name): ["--config", "{missing}", "--json"]
        for name in (
            "advance",
            "cancel",
            "copy",
            "drain",
            "finalize",
            "list",
            "plan",
            "resume",
            "rollback",
            "run",
            "start",
            "status",
            "switch",
            "switch-reads",
            "verify",
        )
    },
    ("topology", "diff"): ["1", "2", "--config", "{missing}", "--json"],
    ("topology", "history"): ["--config", "{missing}", "--json"],
    ("topology", "push"): ["{missing}", "--json"],
    ("topology", "show"): ["--json"],
    ("topology", "status"): ["--config", "{missing}", "--json"],
    ("sandbox", "down"): ["--dir", "{file}", "--json"],
    ("sandbox", "status"): ["--dir", "{file}", "--json"],
    ("sandbox", "up"): ["--shards", "0", "--json"],
    ("schema", "apply"): ["--config", "{missing}", "--json"],
    ("schema", "status"): ["--config", "{missing}", "--json"],
}


def test_the_failing_invocations_cover_every_command() -> None:
    assert sorted(FAILING) == _leaves(main)


@pytest.mark.parametrize("command", sorted(FAILING), ids=" ".join)
def test_json_errors_are_one_json_object_on_stdout(
    command: tuple[str, ...], tmp_path: Path
) -> None:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    args = [a.format(missing=tmp_path / "missing.yaml", file=a_file) for a in FAILING[command]]
    done = CliRunner().invoke(main, [*command, *args])
    assert done.exit_code != 0, done.output
    data = json.loads(done.stdout)  # one document: the error, nothing before or after it
    assert data["ok"] is False and data["error"], data
    assert data["exit_code"] == done.exit_code
    assert data["error"].splitlines()[0] in done.stderr  # the text for a human stays there


def test_json_error_from_a_usage_error_before_the_json_option() -> None:
    done = CliRunner().invoke(
        main, ["ids", "new", "--count", "abc", "--json", "--config", "config/orders.yaml"]
    )
    assert done.exit_code == 2
    assert "--count" in json.loads(done.stdout)["error"]


def test_without_json_errors_stay_text_on_stderr() -> None:
    done = CliRunner().invoke(main, ["route", "--config", "config/orders.yaml", "--table", "x"])
    assert done.exit_code == 2 and done.stdout == ""
    assert "Error:" in done.stderr


def test_a_duplicate_key_holding_a_url_is_shown_masked(tmp_path: Path) -> None:
    key = f"mysql+pymysql://root:my {SECRET}@h/db"
    path = tmp_path / "t.yaml"
    path.write_text(f"shards:\n  '{key}': 1\n  '{key}': 2\n")
    with pytest.raises(ConfigError, match="duplicate key") as caught:
        load_config(path)
    assert SECRET not in str(caught.value)


# -- keyset predicate with NULLs (the SQL; tests/integration/test_issue7_r3_ops.py runs it) ----


def test_keyset_query_spells_out_null_cursor_values() -> None:
    from shardrouter.sql.execution import keyset_query

    sql, params, _ = keyset_query(
        "users", ("user_id",), ("name", "user_id"), {}, (None, 7), 5, descending=False
    )
    assert "(name IS NOT NULL) OR (name IS NULL AND user_id > :a1)" in sql
    assert params == {"a1": 7}  # no NULL is bound: a comparison with NULL is never true
    sql, params, _ = keyset_query(
        "users", ("user_id",), ("name", "user_id"), {}, ("x", 7), 5, descending=True
    )
    assert (
        "((name < :a0 OR name IS NULL)) OR (name = :a0 AND (user_id < :a1 OR user_id IS NULL))"
        in sql
    )
    sql, params, _ = keyset_query(
        "users", ("user_id",), ("name",), {"score": None}, (None,), 5, descending=True
    )
    assert "WHERE score IS NULL AND 1 = 0 ORDER BY name DESC" in sql and params == {}
