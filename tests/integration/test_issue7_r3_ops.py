"""Issue 7, third round (ops): keyset pagination over sort columns holding NULLs, sync and
async, against the single-database oracle on MariaDB."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.sql.execution import Page

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

DDL = (
    "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL,"
    " grp INT NOT NULL, name VARCHAR(64) NULL, score INT NULL)"
)
LOOKUP_DDL = "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)"
NAMES = ("ann", "Ann", "bob", "b_b", "Émile", "emile", "zed")


def _users() -> list[dict[str, Any]]:
    users = []
    for n in range(73):
        users.append(
            {
                "user_id": 5000 + n * 104729,
                "email": f"p{n}@example.com",
                "grp": n % 4,
                # NULLs in both nullable columns, in different rows, with ties between values
                "name": None if n % 3 == 0 else NAMES[n % len(NAMES)],
                "score": None if n % 5 == 1 else n % 6,
            }
        )
    return users


@pytest.fixture(scope="module")
def world(shard_databases: Any, oracle: Any) -> Iterator[dict[str, Any]]:
    topology = Topology.load(shard_databases)
    server = make_url(oracle.shards[0].url)
    admin = create_engine(server.set(database="").render_as_string(hide_password=False))
    with admin.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS issue7_r3_ops"))
        conn.execute(text("CREATE DATABASE issue7_r3_ops"))
    oracle_engine = create_engine(
        server.set(database="issue7_r3_ops").render_as_string(hide_password=False)
    )
    router = Router(topology, max_fanout=None)
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical, ddl in (("users", DDL), ("user_emails", LOOKUP_DDL)):
                for name in topology.table(logical).physical_names:
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    conn.execute(text(ddl.format(t=name)))
    insert = (
        "INSERT INTO users (user_id, email, grp, name, score)"
        " VALUES (:user_id, :email, :grp, :name, :score)"
    )
    users = _users()
    with oracle_engine.begin() as conn:
        conn.execute(text(DDL.format(t="users")))
        conn.execute(text(insert), users)
    for row in users:
        router.execute(insert, row)
    aio = AsyncRouter(topology, max_fanout=None)
    loop = asyncio.new_event_loop()
    try:
        yield {"router": router, "aio": aio, "loop": loop, "oracle": oracle_engine}
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        router.close()
        oracle_engine.dispose()
        with admin.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS issue7_r3_ops"))
        admin.dispose()


def _pages(world: dict[str, Any], mode: str, **kwargs: Any) -> list[tuple[Any, ...]]:
    """Every row, page after page, through the sync or the async router."""
    rows: list[tuple[Any, ...]] = []
    after = None
    for _ in range(200):
        if mode == "sync":
            page: Page = world["router"].page("users", after=after, **kwargs)
        else:
            page = world["loop"].run_until_complete(
                world["aio"].page("users", after=after, **kwargs)
            )
        rows += page.rows
        after = page.after
        if after is None:
            return rows
    raise AssertionError("the pages never ended")


ORDERS = [
    ("name", "user_id"),  # NULLs in the first sort column
    ("grp", "name", "user_id"),  # NULLs in a middle column, after a column with ties
    ("score", "name", "user_id"),  # NULLs in two columns
]


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("descending", [False, True], ids=["asc", "desc"])
@pytest.mark.parametrize("order_by", ORDERS, ids=lambda o: ",".join(o))
@pytest.mark.parametrize("limit", [1, 4, 9])
def test_keyset_pages_with_nulls_are_the_oracle_order(
    world: dict[str, Any], mode: str, descending: bool, order_by: tuple[str, ...], limit: int
) -> None:
    columns = ("user_id", "grp", "name", "score")
    direction = " DESC" if descending else ""
    with world["oracle"].connect() as conn:
        expected = [
            tuple(r)
            for r in conn.execute(
                text(
                    f"SELECT {', '.join(columns)} FROM users"
                    f" ORDER BY {', '.join(c + direction for c in order_by)}"
                )
            )
        ]
    got = _pages(
        world, mode, columns=columns, order_by=order_by, limit=limit, descending=descending
    )
    # Every row exactly once, in the order one database gives: no row lost, none repeated.
    assert [r[0] for r in got] == [r[0] for r in expected]
    assert got == expected


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_cursor_of_nulls_descending_ends_the_listing(world: dict[str, Any], mode: str) -> None:
    """Descending, NULLs come last: nothing sorts after an all-NULL cursor."""
    kwargs: dict[str, Any] = {"columns": ("user_id",), "order_by": ("name",), "limit": 5}
    if mode == "sync":
        page = world["router"].page("users", after=(None,), descending=True, **kwargs)
    else:
        page = world["loop"].run_until_complete(
            world["aio"].page("users", after=(None,), descending=True, **kwargs)
        )
    assert page.rows == [] and page.after is None


def test_where_none_is_is_null(world: dict[str, Any]) -> None:
    with world["oracle"].connect() as conn:
        expected = [
            r[0]
            for r in conn.execute(
                text("SELECT user_id FROM users WHERE name IS NULL ORDER BY user_id")
            )
        ]
    assert expected  # the data has NULL names
    got = _pages(
        world,
        "sync",
        columns=("user_id",),
        order_by=("user_id",),
        where={"name": None},
        limit=6,
        descending=False,
    )
    assert [r[0] for r in got] == expected


# -- README: the long fuzz run ---------------------------------------------------------------


@pytest.mark.timeout(240)
def test_readme_fuzz_command_runs(tmp_path: Any) -> None:
    """The README's `tools/fuzz --statements 100000 --out fuzz.json`, as written but with 20
    statements, a fixed seed and ports of its own (base + 70: away from the session sandbox,
    its oracle at +20 and the scratch sandboxes at +50): it starts and stops its own
    sandbox, judges every statement and reports them, with nothing found."""
    import json
    import os
    import re
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text(encoding="utf-8")
    (line,) = re.findall(r"^tools/fuzz [^#\n]*", readme, re.M)
    argv = shlex.split(line)
    assert argv[:3] == ["tools/fuzz", "--statements", "100000"]
    argv[2] = "20"
    out = tmp_path / "fuzz.json"
    argv[argv.index("--out") + 1] = str(out)
    port = int(os.environ.get("SHARDROUTER_SANDBOX_PORT", "3401")) + 70
    argv += ["--seed", "20261130", "--port", str(port)]
    helped = subprocess.run(
        [sys.executable, str(repo / argv[0]), "--help"], capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--statements" in helped.stdout
    assert "default 100000" in helped.stdout and "--out" in helped.stdout
    done = subprocess.run(
        [sys.executable, str(repo / argv[0]), *argv[1:]],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=repo,
    )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    report = json.loads(done.stdout)
    assert report["statements"] == 20 and report["findings"] == []
    assert sum(v for k, v in report["coverage"].items() if k.startswith("kind:")) == 20
    written = json.loads(out.read_text())  # the same report (its timings taken a moment apart)
    for key in ("statements", "findings", "coverage", "seed"):
        assert written[key] == report[key], key
