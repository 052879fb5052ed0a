"""shardctl meta / topology on a real meta store (a database on the session sandbox's MariaDB,
and a SQLite file): init, status, push of each safe change, refusal of each unsafe one with
nothing written, the push race, history / show / diff, --json, no password in any output."""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner, Result
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.cli import main
from shardrouter.control.store import MetaStore, routers_table
from shardrouter.control.versions import plan_push, publish, read_proposal
from shardrouter.errors import ConcurrentChangeError

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cr3t-ctl"  # written literally in shard URLs
ENV_SECRET = "env-s3cr3t-ctl"  # the value of ${CTL_DB_PASSWORD}
ENV = {"CTL_DB_PASSWORD": ENV_SECRET, "SHARDROUTER_META_URL": None}

Mutation = Callable[[dict[str, Any]], None]


@pytest.fixture(params=["sqlite", "mariadb"])
def meta_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty meta store database: a SQLite file, or a fresh database on the sandbox's s0."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    sandbox = request.getfixturevalue("sandbox")
    server = make_url(sandbox.shards[0].url).set(database="")
    database = f"shardmeta_cli_{uuid.uuid4().hex[:10]}"
    engine = create_engine(server)
    with engine.begin() as conn:
        conn.execute(text(f"CREATE DATABASE `{database}`"))
    try:
        yield server.set(database=database).render_as_string(hide_password=False)
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
        engine.dispose()


def base_document(meta_url: str) -> dict[str, Any]:
    return {
        "name": "orders",
        "version": 1,
        "slots": 1024,
        "shards": {
            "s0": {
                "primary": f"mysql+pymysql://app:{SECRET}@db0:3306/orders_s0",
                "slots": [[0, 512]],
            },
            "s1": {
                "primary": "mysql+pymysql://app:${CTL_DB_PASSWORD}@db1:3306/orders_s1",
                "slots": [[512, 1024]],
            },
        },
        "tables": {
            "users": {"column": "user_id", "strategy": "hash"},
            "orders": {"column": "user_id", "strategy": "hash", "split": 2},
            "countries": {"broadcast": True},
        },
        "meta": {"url": meta_url},
    }


class Cluster:
    """A meta store and the topology files a test writes for it; every CLI run is checked
    for passwords."""

    def __init__(self, meta_url: str, directory: Path) -> None:
        self.meta_url = meta_url
        self.directory = directory
        self.doc = base_document(meta_url)
        self.files = 0

    def file(self, mutate: Mutation | None = None, *, keep: bool = True) -> str:
        """Write the current document, changed by ``mutate`` (kept for the next file unless
        keep=False), and return its path."""
        doc = copy.deepcopy(self.doc)
        if mutate is not None:
            mutate(doc)
        if keep:
            self.doc = doc
        self.files += 1
        path = self.directory / f"topology-{self.files}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        return str(path)

    def store(self) -> MetaStore:
        return MetaStore(self.meta_url)

    def versions(self) -> tuple[int | None, int]:
        """(current version, number of versions) as the store has them."""
        with self.store() as store:
            status = store.status()
        return status.current_version, status.versions


def run(*args: str, input: Any = None) -> Result:
    result = CliRunner().invoke(main, list(args), env=ENV, input=input)
    for out in (result.stdout, result.stderr):
        assert SECRET not in out and ENV_SECRET not in out, (args, out)
    return result


def run_json(*args: str, exit_code: int = 0, input: Any = None) -> dict[str, Any]:
    result = run(*args, "--json", input=input)
    assert result.exit_code == exit_code, (args, result.output)
    data = json.loads(result.stdout)  # one JSON document, nothing before or after it
    assert isinstance(data, dict)
    assert data["ok"] is (exit_code == 0), data
    if exit_code:
        assert data["exit_code"] == exit_code
    return data


@pytest.fixture
def cluster(meta_url: str, tmp_path: Path) -> Cluster:
    return Cluster(meta_url, tmp_path)


def initialised(cluster: Cluster) -> Cluster:
    assert run("meta", "init", "--meta-url", cluster.meta_url).exit_code == 0
    result = run("topology", "push", cluster.file(), "--comment", "first")
    assert result.exit_code == 0, result.output
    assert cluster.versions() == (1, 1)
    return cluster


def put(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        node[last] = value

    return mutate


def drop(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


def both(*mutations: Mutation) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        for m in mutations:
            m(doc)

    return mutate


# -- meta init / status ----------------------------------------------------------------------


def test_meta_init_is_idempotent_and_status_reports(cluster: Cluster) -> None:
    url = cluster.meta_url
    before = run_json("meta", "status", "--meta-url", url)
    assert before["initialised"] is False and before["current_version"] is None
    result = run("meta", "status", "--meta-url", url)
    assert result.exit_code == 0 and "not initialised (run `shardctl meta init`)" in result.stdout

    result = run("meta", "init", "--meta-url", url)
    assert result.exit_code == 0, result.output
    assert ": initialised (schema version 1)" in result.stdout
    assert "no topology version yet" in result.stdout
    again = run_json("meta", "init", "--meta-url", url)
    assert again["created"] is False and again["schema_version"] == 1

    # with a version pushed, init leaves it as it is (and --config finds the store by meta:)
    path = cluster.file()
    assert run("topology", "push", path).exit_code == 0
    result = run("meta", "init", "--config", path)
    assert result.exit_code == 0 and "already initialised, left as it is" in result.stdout
    status = run_json("meta", "status", "--config", path)
    assert (status["initialised"], status["current_version"], status["versions"]) == (True, 1, 1)
    assert status["url"] == make_url(url).render_as_string(hide_password=True)
    text_status = run("meta", "status", "--config", path).stdout
    assert "current        v1" in text_status and "versions       1" in text_status


def test_commands_on_an_uninitialised_store_name_the_fix(cluster: Cluster) -> None:
    for args in (
        ["topology", "push", cluster.file()],
        ["topology", "history", "--meta-url", cluster.meta_url],
        ["topology", "status", "--meta-url", cluster.meta_url],
    ):
        result = run(*args)
        assert result.exit_code == 1, (args, result.output)
        assert "has no shardrouter tables; run `shardctl meta init`" in result.stderr


def test_a_store_must_be_named(cluster: Cluster) -> None:
    result = run("topology", "status")
    assert result.exit_code == 2
    assert "no meta store named: pass --config FILE" in result.stderr
    no_meta = cluster.file(drop("meta"), keep=False)
    result = run("topology", "push", no_meta)
    assert result.exit_code == 1
    assert "meta: missing: no meta store is named (add a meta: {url: ...} section" in result.stderr
    assert "or pass --meta-url URL)" in result.stderr
    # --meta-url names it instead (the first push: any valid config)
    assert run("meta", "init", "--meta-url", cluster.meta_url).exit_code == 0
    result = run("topology", "push", no_meta, "--meta-url", cluster.meta_url)
    assert result.exit_code == 0, result.output
    assert cluster.versions() == (1, 1)


# -- push: safe changes ----------------------------------------------------------------------


def safe_steps(meta_url: str) -> list[tuple[str, Mutation, str]]:
    """(comment, change, the diff line it prints) of each safe change, applied in turn."""
    s2 = {"primary": "mysql+pymysql://app:${CTL_DB_PASSWORD}@db2/orders_s2", "slots": []}
    return [
        (
            "replica for s0",
            put("shards.s0.replicas", [f"mysql+pymysql://ro:{SECRET}@db0r:3306/orders_s0"]),
            "safe    shards.s0.replicas: [none] -> [mysql+pymysql://ro:***@db0r:3306/orders_s0]",
        ),
        (
            "new empty shard",
            put("shards.s2", s2),
            "safe    shards.s2 added (mysql+pymysql://app:***@db2/orders_s2), owning no slots yet",
        ),
        (
            "bigger pool",
            put("shards.s1.pool", {"size": 12}),
            "safe    shards.s1.pool.size: 5 -> 12",
        ),
        (
            "refunds table",
            put("tables.refunds", {"column": "user_id", "strategy": "hash"}),
            "safe    tables.refunds added (sharded by user_id (int, hash))",
        ),
        ("renamed", put("name", "orders-eu"), "safe    name: 'orders' -> 'orders-eu'"),
        (
            "s1 failed over",
            put("shards.s1.primary", "mysql+pymysql://app:${CTL_DB_PASSWORD}@db1b:3306/orders_s1"),
            "safe    shards.s1.primary: mysql+pymysql://app:***@db1:3306/orders_s1"
            " -> mysql+pymysql://app:***@db1b:3306/orders_s1",
        ),
        (
            "s0 password rotated",
            put("shards.s0.primary", f"mysql+pymysql://app:{SECRET}-2@db0:3306/orders_s0"),
            "safe    shards.s0.primary: mysql+pymysql://app:***@db0:3306/orders_s0"
            " -> mysql+pymysql://app:***@db0:3306/orders_s0",
        ),
        (
            "faster poll",
            put("meta", {"url": meta_url, "poll_interval_s": 0.5}),
            "safe    meta.poll_interval_s: 1.0 -> 0.5",
        ),
        ("worker 3", put("ids", {"worker_id": 3}), "safe    ids.worker_id: 0 -> 3"),
    ]


def test_each_safe_change_is_published(cluster: Cluster) -> None:
    initialised(cluster)
    steps = safe_steps(cluster.meta_url)
    for number, (comment, mutate, line) in enumerate(steps, start=2):
        path = cluster.file(mutate)
        result = run("topology", "push", path, "--comment", comment, "--yes")
        assert result.exit_code == 0, (comment, result.output)
        assert f"  {line}" in result.stdout, (comment, result.stdout)
        assert result.stdout.endswith(f"published version {number}\n")
        assert cluster.versions() == (number, number)
    history = run_json("topology", "history", "--meta-url", cluster.meta_url)
    assert [v["comment"] for v in history["versions"]] == [
        *reversed([c for c, _, _ in steps]),
        "first",
    ]
    assert [v["current"] for v in history["versions"]][:2] == [True, False]
    # the store keeps the document as written: placeholders unexpanded, version its own
    with cluster.store() as store:
        current = store.current()
    assert current is not None
    stored = dict(current.document)
    assert stored["version"] == len(steps) + 1
    assert stored["shards"]["s1"]["primary"].startswith("mysql+pymysql://app:${CTL_DB_PASSWORD}@")


def test_a_push_of_the_current_document_writes_nothing(cluster: Cluster) -> None:
    initialised(cluster)
    path = cluster.file(put("version", 9))  # the version: of a file is not compared
    result = run("topology", "push", path)
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith(f"nothing to push: {path} is version 1 already\n")
    data = run_json("topology", "push", path)
    assert (data["status"], data["version"], data["unchanged"]) == ("unchanged", 1, True)
    assert cluster.versions() == (1, 1)


def test_dry_run_prints_the_diff_and_writes_nothing(cluster: Cluster) -> None:
    initialised(cluster)
    path = cluster.file(put("tables.refunds", {"column": "user_id", "strategy": "hash"}))
    result = run("topology", "push", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "  safe    tables.refunds added (sharded by user_id (int, hash))" in result.stdout
    assert result.stdout.endswith("dry run: nothing pushed (it would be version 2)\n")
    data = run_json("topology", "push", path, "--dry-run")
    assert data["status"] == "dry-run" and data["version"] is None
    assert [c["kind"] for c in data["changes"]] == ["table_added"]
    assert cluster.versions() == (1, 1)


# -- push: unsafe changes --------------------------------------------------------------------

REFUSED_STEPS = [
    pytest.param(
        both(put("shards.s0.slots", [[0, 256]]), put("shards.s1.slots", [[256, 1024]])),
        "slots [256, 512) move from s0 to s1: moving slots moves their rows, which a topology"
        " push does not do; keep the slots where they are and move them with `shardctl reshard`",
        id="slots-moved",
    ),
    pytest.param(
        both(
            put("slots", 2048),
            put("ids", {"gene_bits": 11, "timestamp_bits": 40}),
            put("shards.s1.slots", [[512, 2048]]),
        ),
        "slots: 1024 -> 2048: the slot count is fixed for the life of a cluster",
        id="slot-count",
    ),
    pytest.param(
        put("ids", {"worker_bits": 9, "timestamp_bits": 40}),
        "ids.worker_bits: 8 -> 9: the id layout of a live cluster cannot change",
        id="id-layout",
    ),
    pytest.param(
        put("tables.orders.split", 4),
        "tables.orders.split: 2 -> 4: the rows of orders are placed by its current rule",
        id="table-rule",
    ),
    pytest.param(
        drop("tables.users"),
        "tables.users removed: its rows stay on the shards",
        id="table-removed",
    ),
    pytest.param(
        both(drop("shards.s1"), put("shards.s0.slots", [[0, 1024]])),
        "shards.s1 removed (it owns slots [512, 1024)): its slots hold rows",
        id="shard-with-slots-removed",
    ),
    pytest.param(
        both(
            put("shards.s2", {"primary": "mysql+pymysql://app@db2/orders_s2", "slots": [[0, 1]]}),
            put("shards.s0.slots", [[1, 512]]),
        ),
        "shards.s2 added (mysql+pymysql://app@db2/orders_s2) owning slots [0, 1): a new shard"
        " starts empty",
        id="shard-added-with-slots",
    ),
]


@pytest.mark.parametrize(("mutate", "message"), REFUSED_STEPS)
def test_each_unsafe_change_is_refused_and_nothing_written(
    cluster: Cluster, mutate: Mutation, message: str
) -> None:
    initialised(cluster)
    path = cluster.file(mutate)
    for extra in ([], ["--dry-run"], ["--yes"]):
        result = run("topology", "push", path, *extra)
        assert result.exit_code == 3, (extra, result.output)
        assert "REFUSED " + message in result.stdout
        assert result.stderr.startswith("the topology change cannot be applied live:\n")
        assert f"  {message}" in result.stderr
        assert result.stderr.endswith("nothing was pushed\n")
    data = run_json("topology", "push", path, exit_code=3)
    assert data["error"].startswith("the topology change cannot be applied live:")
    assert data["safe"] is False and data["version"] is None
    assert any(not c["safe"] and message.startswith(c["line"]) for c in data["changes"])
    assert cluster.versions() == (1, 1)


def test_a_file_naming_another_meta_store_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    initialised(cluster)
    elsewhere = f"sqlite:///{tmp_path / 'other-meta.db'}"
    path = cluster.file(put("meta.url", elsewhere), keep=False)
    result = run("topology", "push", path, "--meta-url", cluster.meta_url)
    assert result.exit_code == 1
    assert f"meta.url: {elsewhere} is not the meta store pushed to" in result.stderr
    assert "drop --meta-url to use the file's store, or make meta.url name the store" in (
        result.stderr
    )
    # and `topology diff` names the move itself
    result = run("topology", "diff", "1", path, "--meta-url", cluster.meta_url)
    assert result.exit_code == 3
    assert "REFUSED meta.url: " in result.stdout
    assert "a meta store cannot move itself" in result.stdout
    assert cluster.versions() == (1, 1)


# -- push: confirmation of a re-pointed primary ---------------------------------------------


def test_a_repointed_primary_needs_confirmation(cluster: Cluster) -> None:
    initialised(cluster)
    path = cluster.file(put("shards.s0.primary", f"mysql+pymysql://app:{SECRET}@db0b/orders_s0"))
    result = run("topology", "push", path, input="n\n")
    assert result.exit_code == 5, result.output
    assert (
        "shard s0's primary moves to mysql+pymysql://app:***@db0b/orders_s0. That server must"
        " already hold every row of s0" in result.stdout
    )
    assert "Publish version 2? [y/N]" in result.stdout
    assert "not confirmed: nothing was pushed" in result.stderr
    result = run("topology", "push", path)  # no answer at all (stdin closed): not confirmed
    assert result.exit_code == 5, result.output
    data = run_json("topology", "push", path, exit_code=5)
    assert "--json never prompts: pass --yes" in data["error"]
    assert cluster.versions() == (1, 1)
    result = run("topology", "push", path, input="y\n")
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("published version 2\n")
    assert cluster.versions() == (2, 2)


# -- the push race ----------------------------------------------------------------------------


def test_two_pushes_from_the_same_base_one_fails(cluster: Cluster) -> None:
    """Four MetaStore.push with the same expected version, each on its own store (its own
    connections), released together after every one has read the current version: exactly
    one publishes version 2, the others fail with ConcurrentChangeError and write nothing."""
    initialised(cluster)
    document = copy.deepcopy(cluster.doc)
    stores = [cluster.store() for _ in range(4)]
    barrier = threading.Barrier(len(stores), timeout=30)
    outcomes: list[object] = [None] * len(stores)

    def contender(i: int) -> None:
        store = stores[i]
        expected = store.current_version()
        barrier.wait()  # every contender has read version 1 before any writes
        try:
            outcomes[i] = store.push(
                {**document, "name": f"contender-{i}"}, expected=expected, comment=f"c{i}"
            )
        except ConcurrentChangeError as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(len(stores))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for s in stores:
            s.close()
    assert sorted(o for o in outcomes if isinstance(o, int)) == [2], outcomes
    errors = [o for o in outcomes if isinstance(o, ConcurrentChangeError)]
    assert len(errors) == 3
    for e in errors:
        assert str(e) == (
            "the topology changed while this push was prepared: it was based on version 1, the"
            " meta store now has version 2; re-run the push to diff against the new current"
            " version"
        )
    assert cluster.versions() == (2, 2)
    with cluster.store() as store:
        winner = store.current()
    assert winner is not None
    assert winner.comment == f"c{outcomes.index(2)}"


def test_planned_pushes_race_through_the_workflow(cluster: Cluster) -> None:
    """plan_push in two threads (both diff against version 1), then publish: one wins."""
    initialised(cluster)
    paths = [
        cluster.file(put("tables.a", {"column": "user_id", "strategy": "hash"}), keep=False),
        cluster.file(put("tables.b", {"column": "user_id", "strategy": "hash"}), keep=False),
    ]
    barrier = threading.Barrier(2, timeout=30)
    outcomes: list[object] = [None, None]

    def contender(i: int) -> None:
        with cluster.store() as store:
            plan = plan_push(store, read_proposal(paths[i], ENV_ONLY), ENV_ONLY)
            barrier.wait()
            try:
                outcomes[i] = publish(store, plan)
            except ConcurrentChangeError as exc:
                outcomes[i] = exc

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(type(o).__name__ for o in outcomes) == ["ConcurrentChangeError", "int"]
    assert 2 in outcomes
    assert cluster.versions() == (2, 2)


ENV_ONLY = {"CTL_DB_PASSWORD": ENV_SECRET}


class _AnswerAfterAnotherPush(io.BytesIO):
    """stdin of a push waiting at its prompt: before the operator answers "y", another
    process publishes a version (the real interleaving of a slow confirmation)."""

    def __init__(self, interleave: Callable[[], None]) -> None:
        super().__init__(b"y\n")
        self._interleave: Callable[[], None] | None = interleave

    def _first(self) -> None:
        if self._interleave is not None:
            step, self._interleave = self._interleave, None
            step()

    def read(self, size: int | None = -1) -> bytes:
        if size == 0:  # click's probe for a binary stream, not the operator's answer
            return b""
        self._first()
        return super().read(size)

    def read1(self, size: int = -1) -> bytes:
        self._first()
        return super().read1(size)

    def readline(self, size: int | None = -1) -> bytes:
        self._first()
        return super().readline(size)

    def readinto(self, buffer: Any) -> int:
        self._first()
        return super().readinto(buffer)


def test_a_push_that_loses_the_race_exits_4_and_writes_nothing(cluster: Cluster) -> None:
    initialised(cluster)
    repoint = cluster.file(
        put("shards.s0.primary", f"mysql+pymysql://app:{SECRET}@db0b/orders_s0"), keep=False
    )
    other = cluster.file(put("tables.refunds", {"column": "user_id", "strategy": "hash"}))

    def another_push() -> None:  # another operator's push, through the same workflow
        with cluster.store() as store:
            plan = plan_push(store, read_proposal(other, ENV_ONLY), ENV_ONLY)
            assert publish(store, plan, comment="the other one") == 2

    result = run("topology", "push", repoint, input=_AnswerAfterAnotherPush(another_push))
    assert result.exit_code == 4, result.output
    assert "it was based on version 1, the meta store now has version 2" in result.stderr
    assert "re-run the push" in result.stderr and "(nothing was pushed)" in result.stderr
    assert cluster.versions() == (2, 2)
    with cluster.store() as store:
        assert [v.comment for v in store.history()] == ["the other one", "first"]


# -- status, history, show, diff --------------------------------------------------------------


def test_status_lists_routers_and_highlights_the_lagging(cluster: Cluster) -> None:
    initialised(cluster)
    assert run("topology", "push", cluster.file(put("name", "v2"))).exit_code == 0
    empty = run("topology", "status", "--meta-url", cluster.meta_url)
    assert empty.exit_code == 0
    assert empty.stdout.endswith("current version v2\nno routers registered\n")
    with cluster.store() as store, store.begin() as conn:
        now = store.server_now_ms(conn)
        for instance, acked, lease in (
            ("r-current", 2, 10_000),
            ("r-behind", 1, 10_000),
            ("r-expired", 2, -5_000),
        ):
            conn.execute(
                routers_table.insert().values(
                    instance_id=instance,
                    host="app-1",
                    pid=4242,
                    process_start_ms=now - 60_000,
                    kind="sync",
                    serving_version=acked,
                    acked_version=acked,
                    registered_at_ms=now - 60_000,
                    heartbeat_at_ms=now - 1_500,
                    lease_expires_at_ms=now + lease,
                )
            )
    data = run_json("topology", "status", "--meta-url", cluster.meta_url)
    assert data["current_version"] == 2
    assert data["lagging"] == ["r-behind", "r-expired"]
    by_id = {r["instance_id"]: r for r in data["routers"]}
    assert by_id["r-current"]["lagging"] is False and by_id["r-current"]["live"] is True
    assert by_id["r-expired"]["live"] is False
    assert 1_400 <= by_id["r-current"]["heartbeat_age_ms"] < 60_000
    assert 0 < by_id["r-current"]["lease_left_ms"] <= 10_000
    result = run("topology", "status", "--meta-url", cluster.meta_url)
    lines = {line[2:].split()[0]: line for line in result.stdout.splitlines() if "app-1" in line}
    assert lines["r-current"].startswith("  ") and lines["r-behind"].startswith("! ")
    assert lines["r-expired"].startswith("! ") and "expired" in lines["r-expired"]
    assert result.stdout.endswith("2 lagging (!): not acked v2 or lease expired\n")


def test_history_show_and_diff(cluster: Cluster) -> None:
    initialised(cluster)
    replica = put("shards.s0.replicas", [f"mysql+pymysql://ro:{SECRET}@db0r/orders_s0"])
    assert run("topology", "push", cluster.file(replica), "--comment", "replica").exit_code == 0
    url = cluster.meta_url

    history = run("topology", "history", "--meta-url", url)
    assert history.exit_code == 0
    lines = history.stdout.splitlines()
    assert re.match(r"\* v2 +\d{4}-\d\d-\d\dT.* \(2 shards, 3 tables\)  replica$", lines[0])
    assert re.match(r"  v1 +.*  first$", lines[1])
    assert len(run_json("topology", "history", "--meta-url", url, "--limit", "1")["versions"]) == 1

    shown = run("topology", "show", "--meta-url", url)
    assert shown.exit_code == 0, shown.output
    assert shown.stdout.startswith("# version 2, pushed by ")
    document = yaml.safe_load(shown.stdout)
    assert list(document)[:3] == ["name", "version", "slots"]
    assert document["version"] == 2
    assert document["shards"]["s0"]["primary"] == "mysql+pymysql://app:***@db0:3306/orders_s0"
    assert document["shards"]["s0"]["replicas"] == ["mysql+pymysql://ro:***@db0r/orders_s0"]
    assert document["shards"]["s1"]["primary"] == (
        "mysql+pymysql://app:${CTL_DB_PASSWORD}@db1:3306/orders_s1"
    )
    first = run_json("topology", "show", "1", "--meta-url", url)
    assert first["version"] == 1 and "replicas" not in first["document"]["shards"]["s0"]
    missing = run("topology", "show", "99", "--meta-url", url)
    assert missing.exit_code == 1
    assert "topology version 99 is not in the meta store" in missing.stderr
    assert "(shardctl topology history lists the versions)" in missing.stderr

    diff = run("topology", "diff", "1", "2", "--meta-url", url)
    assert diff.exit_code == 0, diff.output
    assert diff.stdout == (
        "v1 -> v2:\n"
        "  safe    shards.s0.replicas: [none] -> [mysql+pymysql://ro:***@db0r/orders_s0]:"
        " reads use the new replica set once routers ack\n"
    )
    same = run_json("topology", "diff", "v2", "2", "--meta-url", url)
    assert same["changes"] == [] and same["safe"] is True
    split = cluster.file(put("tables.orders.split", 8), keep=False)
    refused = run("topology", "diff", "2", split, "--meta-url", url)
    assert refused.exit_code == 3
    assert "REFUSED tables.orders.split: 2 -> 8" in refused.stdout
    # two files need no store; a version side without --meta-url uses a file's meta: section
    files = run_json("topology", "diff", cluster.file(), split, exit_code=3)
    assert files["refused"] == 1
    assert run("topology", "diff", "1", split).exit_code == 3
    bad = run("topology", "diff", "one", split, "--meta-url", url)
    assert bad.exit_code == 2
    assert "'one' is neither a version number (e.g. 3) nor an existing YAML file" in bad.stderr


def test_every_command_prints_one_json_object(cluster: Cluster) -> None:
    url = cluster.meta_url
    path = cluster.file()
    ok = [
        ["meta", "status", "--meta-url", url],
        ["meta", "init", "--meta-url", url],
        ["topology", "push", path, "--dry-run"],
        ["topology", "push", path],
        ["topology", "push", path],
        ["topology", "status", "--meta-url", url],
        ["topology", "history", "--meta-url", url],
        ["topology", "show", "--meta-url", url],
        ["topology", "show", "1", "--config", path],
        ["topology", "diff", "1", path, "--meta-url", url],
    ]
    for args in ok:
        run_json(*args)
    failing = [
        (["topology", "show", "7", "--meta-url", url], 1),
        (["topology", "push", str(cluster.directory / "missing.yaml")], 1),
        (["topology", "push", cluster.file(put("tables.orders.split", 4), keep=False)], 3),
        (["topology", "status"], 2),
        (["meta", "status", "--meta-url", "nonsense"], 1),
    ]
    for args, code in failing:
        data = run_json(*args, exit_code=code)
        assert data["error"], args


# -- README ----------------------------------------------------------------------------------

README_BLOCK = "shardctl meta init --config orders.yaml"


def test_readme_control_plane_commands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, meta_url: str
) -> None:
    """The README's control-plane commands, as written, on the demo topology (SQLite shard
    files) with a meta: section, and a second file adding a replica."""
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    found = re.search(
        r"^```bash\n(shardctl meta init --config orders\.yaml.*?)^```$", readme, re.S | re.M
    )
    assert found, "README has no control-plane command block"
    raw = yaml.safe_load((REPO / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw["meta"] = {"url": meta_url}
    (tmp_path / "orders.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    raw["shards"]["s0"]["replicas"] = [raw["shards"]["s0"]["primary"]]
    (tmp_path / "orders-v2.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    commands = [re.sub(r"\s+#.*$", "", line).strip() for line in found.group(1).splitlines()]
    assert len(commands) >= 8
    for command in commands:
        argv = shlex.split(command)
        assert argv[0] == "shardctl"
        result = run(*argv[1:])
        assert result.exit_code == 0, (command, result.output)
    with MetaStore(meta_url) as store:
        assert store.current_version() == 2
