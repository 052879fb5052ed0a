"""Issue 7, operations part: shipped configs validate as shipped, fork-safe ids, masked
secrets, clean CLI errors and exit codes, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrouter.cli import main
from shardrouter.core.config import validate_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "config").glob("*.yaml"))
NO_ENV = {"SHARDROUTER_DB_PASSWORD": None, "SHARDROUTER_DEMO_DIR": None}


# -- defect 25: a shipped config validates as shipped -----------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates_without_any_environment(path: Path) -> None:
    assert SHIPPED, "no shipped configs found"
    assert validate_file(path, env={}) == []
    result = CliRunner().invoke(main, ["config", "validate", str(path), "--json"], env=NO_ENV)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True


# -- defect 4: a forked child must not issue the parent's ids ---------------------------------


def _child_next_id(generator: object, queue: object) -> None:
    """In the forked child: the inherited generator must refuse, not issue an id."""
    try:
        value = generator.next_for_slot(3)  # type: ignore[attr-defined]
    except BaseException as exc:
        queue.put((type(exc).__name__, str(exc)))  # type: ignore[attr-defined]
    else:
        queue.put(("issued", value))  # type: ignore[attr-defined]


@pytest.mark.timeout(60)
def test_forked_child_refuses_to_issue_ids_from_the_parents_generator() -> None:
    import multiprocessing

    from shardrouter.core.ids import IdGenerator, IdLayout

    generator = IdGenerator(IdLayout(epoch_ms=1_735_689_600_000), worker_id=1)
    parent_first = generator.next_for_slot(3)  # used before the fork: the state is shared
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_next_id, args=(generator, queue))
    child.start()
    outcome, detail = queue.get(timeout=30)
    child.join(30)
    assert outcome == "IdGeneratorForkedError", (outcome, detail)
    assert "worker_id" in str(detail) and "fork" in str(detail)
    # The parent keeps working: its ids stay unique and increasing.
    assert generator.next_for_slot(3) > parent_first


@pytest.mark.timeout(60)
def test_a_generator_made_in_the_child_works() -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_new_generator, args=(queue,))
    child.start()
    outcome, detail = queue.get(timeout=30)
    child.join(30)
    assert outcome == "issued" and isinstance(detail, int) and detail > 0, (outcome, detail)


def _child_new_generator(queue: object) -> None:
    from shardrouter.core.ids import IdGenerator, IdLayout

    try:
        value = IdGenerator(IdLayout(epoch_ms=1_735_689_600_000), worker_id=2).next_for_slot(3)
    except BaseException as exc:
        queue.put(("other", f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
    else:
        queue.put(("issued", value))  # type: ignore[attr-defined]


# -- defect 23: passwords never in repr/str/dumps/messages -----------------------------------

SECRET = "Pw-7f3Kq"
URL_WITH_PASSWORD = f"mysql+pymysql://app:{SECRET}@db1:3306/orders_s0"


def _raw(primary: str, replica: str | None = None) -> dict[str, object]:
    shard: dict[str, object] = {"primary": primary, "slots": [[0, 1024]]}
    if replica is not None:
        shard["replicas"] = [replica]
    return {"shards": {"s0": shard}, "tables": {"t": {"column": "user_id", "strategy": "hash"}}}


def test_config_models_never_show_the_password() -> None:
    from shardrouter.core.config import config_from_dict
    from shardrouter.core.topology import Topology

    model = config_from_dict(_raw(URL_WITH_PASSWORD, URL_WITH_PASSWORD), env={})
    shard = model.shards["s0"]
    rendered = [
        repr(model),
        str(model),
        repr(shard),
        str(shard),
        repr(shard.primary),
        str(shard.primary),
        f"{shard.primary}",
        model.model_dump_json(),
        json.dumps(model.model_dump(mode="json")),
        repr(model.model_dump()),
        repr(Topology(model)),
    ]
    for text in rendered:
        assert SECRET not in text, text
    assert "app:***@db1:3306/orders_s0" in model.model_dump_json()
    # Code that needs the password asks for it explicitly.
    assert shard.primary.password == SECRET
    revealed = model.model_dump(mode="json", context={"reveal_passwords": True})
    assert revealed["shards"]["s0"]["primary"] == URL_WITH_PASSWORD
    assert config_from_dict(revealed, env={}) == model  # a revealed dump round-trips


@pytest.mark.parametrize(
    "password",
    [f"{SECRET}'x", f"it's-{SECRET}", f'{SECRET}"q', f"a/{SECRET}"],
    ids=["quote-end", "quote-mid", "double-quote", "slash"],
)
def test_unparsable_url_with_quotes_in_the_password_is_masked(password: str) -> None:
    for url in (f"mysql+pymysql//app:{password}@db1/orders_s0", f"app:{password}@db1/orders_s0"):
        problems = validate_file_text(_raw(url))
        assert problems, url
        assert not any(SECRET in p for p in problems), problems


def validate_file_text(raw: dict[str, object]) -> list[str]:
    from shardrouter.core.config import config_from_dict
    from shardrouter.errors import ConfigError

    try:
        config_from_dict(raw, env={})
    except ConfigError as exc:
        assert SECRET not in str(exc)
        return list(exc.problems)
    return []


def test_password_with_an_unencoded_at_is_refused_with_the_fix() -> None:
    problems = validate_file_text(_raw(f"mysql+pymysql://app:{SECRET}@x@db1:3306/orders_s0"))
    assert len(problems) == 1, problems
    assert "percent-encode it as %40" in problems[0]
    assert SECRET not in problems[0] and "x@db1" not in problems[0]
    # percent-encoded, it is accepted and the password is the real one
    from urllib.parse import quote

    from shardrouter.core.config import config_from_dict

    encoded = f"mysql+pymysql://app:{quote(SECRET + '@x', safe='')}@db1:3306/orders_s0"
    model = config_from_dict(_raw(encoded), env={})
    assert model.shards["s0"].primary.password == SECRET + "@x"
    assert model.shards["s0"].primary.host == "db1"


def test_config_validate_cli_never_prints_the_password(tmp_path: Path) -> None:
    cases = {
        "quote": f"mysql+pymysql//app:{SECRET}'q@db1/orders_s0",
        "at": f"mysql+pymysql://app:{SECRET}@x@db1/orders_s0",
        "backend": f"postgresql://app:{SECRET}@db1/orders",
        "valid": URL_WITH_PASSWORD,
    }
    for name, url in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(json.dumps(_raw(url)), encoding="utf-8")  # JSON is YAML
        for extra in ([], ["--json"]):
            result = CliRunner().invoke(main, ["config", "validate", str(path), *extra], env=NO_ENV)
            assert result.exit_code == (0 if name == "valid" else 1), result.output
            assert SECRET not in result.output, (name, result.output)


# -- defect 26 (CLI start-up): importing the CLI loads no database or SQL stack --------------


HEAVY = (
    "sqlglot",
    "sqlalchemy",
    "sqlalchemy.ext.asyncio",
    "aiomysql",
    "shardrouter.engine.readpool",
)


@pytest.mark.parametrize("module", ["shardrouter", "shardrouter.cli"])
def test_importing_loads_no_heavy_module(module: str) -> None:
    code = f"import sys, {module}\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", f"{module} imports {out.stdout.strip()}"


def test_help_of_every_command_loads_no_heavy_module() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from shardrouter.cli import main\n"
        "cmds = [[], ['check', 'lookups'], ['config', 'validate'], ['ids', 'new'], ['route'],\n"
        "        ['sandbox', 'up'], ['schema', 'apply'], ['demo'], ['bench'],\n"
        "        ['meta', 'init'], ['meta', 'status'], ['topology', 'push'],\n"
        "        ['topology', 'status'], ['topology', 'history'], ['topology', 'show'],\n"
        "        ['topology', 'diff']]\n"
        "for c in cmds:\n"
        "    r = CliRunner().invoke(main, [*c, '--help'])\n"
        "    assert r.exit_code == 0, (c, r.output)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "", out.stdout


def test_lazy_public_names_resolve_to_their_modules() -> None:
    import shardrouter
    from shardrouter.engine.router import Router
    from shardrouter.errors import IdGeneratorForkedError

    assert shardrouter.Router is Router
    assert shardrouter.IdGeneratorForkedError is IdGeneratorForkedError
    assert set(shardrouter.__all__) <= set(dir(shardrouter))
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        shardrouter.Nope  # noqa: B018


# -- defect 24: every command has --json; check lookups documents its exit status -------------


def _leaf_commands() -> list[tuple[str, ...]]:
    import click

    out: list[tuple[str, ...]] = []

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        if isinstance(cmd, click.Group):
            for name, sub in cmd.commands.items():
                walk(sub, (*path, name))
        else:
            out.append(path)

    walk(main, ())
    return out


def test_every_command_has_json() -> None:
    leaves = _leaf_commands()
    assert len(leaves) >= 10
    for path in leaves:
        result = CliRunner().invoke(main, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert "--json" in result.output, path


def test_check_lookups_help_documents_exit_status() -> None:
    result = CliRunner().invoke(main, ["check", "lookups", "--help"])
    assert "Exit status:" in result.output
    assert "1  orphan or missing lookup rows found" in result.output
    assert "3  the check could not run" in result.output


@pytest.mark.timeout(60)
def test_check_lookups_error_never_shows_the_password(tmp_path: Path) -> None:
    """A shard that does not answer is named with its URL, password masked (nothing listens
    on port 1 of 127.0.0.1: the connection is refused at once, no server needed)."""
    raw = _raw(f"mysql+pymysql://app:{SECRET}@127.0.0.1:1/orders_s0")
    raw["tables"] = {
        "orders": {
            "column": "user_id",
            "strategy": "hash",
            "secondary": [
                {
                    "column": "merchant_id",
                    "strategy": {
                        "name": "lookup",
                        "table": "merchant_orders",
                        "from": "merchant_id",
                        "to": "user_id",
                    },
                }
            ],
        },
        "merchant_orders": {"column": "merchant_id", "strategy": "hash"},
    }
    path = tmp_path / "down.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    for extra in ([], ["--json"]):
        result = CliRunner().invoke(main, ["check", "lookups", "--config", str(path), *extra])
        assert result.exit_code == 3, result.output
        assert SECRET not in result.output
        assert "app:***@127.0.0.1:1/orders_s0" in result.output
        assert "Traceback" not in result.output


def test_demo_json_prints_only_json(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["demo", "--dir", str(tmp_path), "--json"], env=NO_ENV)
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["users"] == 5 and data["directory"] == str(tmp_path)
