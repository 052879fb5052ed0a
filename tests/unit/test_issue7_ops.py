"""Issue 7, operations part: shipped configs validate as shipped, fork-safe ids, masked
secrets, clean CLI errors and exit codes, lazy imports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrouter.cli import main
from shardrouter.config import validate_file

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

    from shardrouter.ids import IdGenerator, IdLayout

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
    from shardrouter.ids import IdGenerator, IdLayout

    try:
        value = IdGenerator(IdLayout(epoch_ms=1_735_689_600_000), worker_id=2).next_for_slot(3)
    except BaseException as exc:
        queue.put(("other", f"{type(exc).__name__}: {exc}"))  # type: ignore[attr-defined]
    else:
        queue.put(("issued", value))  # type: ignore[attr-defined]
