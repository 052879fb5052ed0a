"""Third round on the control plane (issue 8), on SQLite meta stores: worker ids of a topology
served by a meta store, shardctl bench / demo / ids on a config with meta:, and smaller fixes
(the async router's copy of the lean pools, message texts, the ORM bulk methods)."""

from __future__ import annotations

import asyncio
import copy
import json
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from control_cluster import SQLITE_YAML, document, user_in_slots
from sqlalchemy import create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.cli import main
from shardrouter.control.leases import WorkerLease
from shardrouter.control.store import MetaStore
from shardrouter.control.versions import push_file
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router
from shardrouter.errors import KeyValueError, UnsupportedQueryError, WorkerLeaseError
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(60)


def plain(raw: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in raw.items() if k != "meta"}


def create_notes(directory: Path, raw: dict[str, Any]) -> None:
    for name in raw["shards"]:
        engine = create_engine(f"sqlite:///{directory}/{name}.db")
        with engine.begin() as conn:
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)"))
        engine.dispose()


KEY = ("--key", "user_id=4")


# -- 2: worker ids of a topology served by a meta store ---------------------------------------


def test_id_generator_of_a_router_following_a_store_whose_document_has_no_meta_section(
    tmp_path: Path,
) -> None:
    """`shardctl topology push FILE --meta-url URL` stores FILE as written, here without a
    meta: section. A router following the store serves that version: its
    topology.id_generator("notes") must still refuse (not take ids.worker_id, the same in
    every process), and WorkerLease.for_topology(router.topology) leases from the store the
    router follows."""
    raw = document(tmp_path)
    store = MetaStore(raw["meta"]["url"])
    try:
        store.init()
        path = tmp_path / "no-meta.yaml"
        path.write_text(yaml.safe_dump(plain(raw)))
        result = push_file(store, path, comment="pushed with --meta-url")
        assert result.status == "published"
        with Router.from_config(config_from_dict(raw)) as router:
            assert router._follower is not None  # it follows the store
            with pytest.raises(WorkerLeaseError, match=r"WorkerLease\.for_topology"):
                router.topology.id_generator("notes")
            assert router.topology.id_generator("notes", worker_id=3).worker_id == 3
            with (
                WorkerLease.for_topology(router.topology) as first,
                WorkerLease.for_topology(router.topology) as second,
            ):
                a = first.generator(router.topology, "notes")
                b = second.generator(router.topology, "notes")
                assert a.worker_id != b.worker_id
                assert not set(a.next_ids(8, user_id=42)) & set(b.next_ids(8, user_id=42))
                held = store.engine.connect()
                try:
                    rows = held.execute(
                        text("SELECT worker_id FROM shardrouter_worker_leases ORDER BY 1")
                    ).all()
                finally:
                    held.close()
                assert [r[0] for r in rows] == sorted([a.worker_id, b.worker_id])
    finally:
        store.close()


def test_a_topology_served_after_a_swap_to_a_version_without_meta_refuses_too(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """The same for a version the router swaps to while running (pushed without meta:)."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        v2 = plain(copy.deepcopy(raw))
        v2["tables"]["more_notes"] = {"column": "user_id", "strategy": "hash"}
        store.push(v2, expected=1, comment="a table more, no meta:")
        deadline = 200
        while router.version != 2 and deadline:
            deadline -= 1
            threading.Event().wait(0.025)
        assert router.version == 2
        with pytest.raises(WorkerLeaseError):
            router.topology.id_generator("more_notes")


# -- 4: shardctl bench and shardctl demo on a config with meta: -------------------------------


def test_shardctl_bench_runs_on_a_config_with_a_meta_section(tmp_path: Path) -> None:
    """`shardctl bench` measures id generation in this process and throws the ids away: on
    a config with meta: it runs (a fixed worker id; the store is never contacted)."""
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(document(tmp_path)))
    result = CliRunner().invoke(
        main, ["bench", "--config", str(path), "--ops", "1000", "--repeat", "1", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "ok" not in data and data["n_per_run"] == 1000
    assert not (tmp_path / "meta.db").exists()


def test_shardctl_demo_runs_on_a_config_with_a_meta_section(tmp_path: Path) -> None:
    """`shardctl demo --config` with a meta: section: the tour's ids go only to its own shard
    files and its control plane uses a meta store of its own, so it runs through."""
    raw = yaml.safe_load(SQLITE_YAML.read_text())
    raw["meta"] = {"url": f"sqlite:///{tmp_path}/elsewhere/meta.db"}  # never contacted
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--config", str(path), "--dir", str(out), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert "ok" not in data, data
    assert data["control"]["acked"] is True
    assert not (tmp_path / "elsewhere").exists()


# -- 5: shardctl ids new / decode by the store's version, like route --------------------------


def _moved(raw: dict[str, Any], store: MetaStore) -> None:
    v2 = copy.deepcopy(raw)
    v2["shards"]["s0"]["slots"] = [[10, 256]]
    v2["shards"]["s1"]["slots"] = [[0, 10], [256, 512]]
    store.push(v2, expected=1, comment="slots 0-10 now on s1")


def test_shardctl_ids_names_the_shard_of_the_stores_version_like_route(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """After a version that gave slots [0, 10) to s1, `shardctl route`, `ids new` and `ids
    decode` all name s1 (the store's current version) and say so; --file-only: s0."""
    raw, store = cluster
    _moved(raw, store)
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(raw))  # the file as first pushed (it names the store)
    with Router.from_config(config_from_dict(plain(raw))) as file_router:
        user = user_in_slots(file_router, 0, 10)
    runner = CliRunner()
    base = ["--config", str(path)]
    route = runner.invoke(
        main, ["route", *base, "--table", "notes", "--key", f"user_id={user}", "--json"]
    )
    assert route.exit_code == 0, route.output
    assert json.loads(route.stdout)["shard"] == "s1"
    new = runner.invoke(
        main, ["ids", "new", *base, "--table", "notes", "--key", f"user_id={user}", "--json"]
    )
    assert new.exit_code == 0, new.output
    made = json.loads(new.stdout)
    assert made["shard"] == "s1", made
    assert made["topology"]["source"] == "meta_store" and made["topology"]["version"] == 2
    decoded = runner.invoke(main, ["ids", "decode", str(made["ids"][0]), *base, "--json"])
    assert decoded.exit_code == 0, decoded.output
    data = json.loads(decoded.stdout)
    assert data["shard"] == "s1" and data["topology"]["version"] == 2

    text_new = runner.invoke(
        main, ["ids", "new", *base, "--table", "notes", "--key", f"user_id={user}"]
    )
    assert text_new.exit_code == 0, text_new.output
    assert ", shard s1, " in text_new.stderr
    assert "by version 2 (current in meta store" in text_new.stderr
    text_decoded = runner.invoke(main, ["ids", "decode", str(made["ids"][0]), *base])
    assert text_decoded.exit_code == 0, text_decoded.output
    assert "topology      version 2 (current in meta store" in text_decoded.stdout
    assert "shard         s1" in text_decoded.stdout

    file_new = runner.invoke(
        main,
        [
            "ids",
            "new",
            *base,
            "--table",
            "notes",
            "--key",
            f"user_id={user}",
            "--worker",
            "7",
            "--file-only",
            "--json",
        ],
    )
    assert file_new.exit_code == 0, file_new.output
    by_file = json.loads(file_new.stdout)
    assert by_file["shard"] == "s0" and by_file["topology"]["source"] == "file"
    file_decoded = runner.invoke(
        main, ["ids", "decode", str(made["ids"][0]), *base, "--file-only", "--json"]
    )
    assert file_decoded.exit_code == 0, file_decoded.output
    assert json.loads(file_decoded.stdout)["shard"] == "s0"


def test_shardctl_ids_new_leases_from_the_file_store_when_the_version_has_no_meta(
    tmp_path: Path,
) -> None:
    """The store's current version was pushed without meta: (--meta-url): ids new still
    leases its worker id from the store it read the version from."""
    raw = document(tmp_path)
    create_notes(tmp_path, raw)
    with MetaStore(raw["meta"]["url"]) as store:
        store.init()
        store.push(plain(raw), expected=None, comment="no meta:")
        path = tmp_path / "meta.yaml"
        path.write_text(yaml.safe_dump(raw))
        with WorkerLease.for_topology(Topology(config_from_dict(raw))) as held:
            assert held.worker_id == 0
            result = CliRunner().invoke(
                main,
                ["ids", "new", "--config", str(path), "--table", "notes", "--json", *KEY],
            )
            assert result.exit_code == 0, result.output
            assert json.loads(result.stdout)["worker_id"] == 1


def test_shardctl_ids_refuses_an_unreachable_store_naming_file_only(tmp_path: Path) -> None:
    """A store that does not answer is an error naming --file-only (never a silent fall back
    to the file), and its text no longer says only writes to moving slots fence."""
    raw = document(tmp_path)
    raw["meta"] = {"url": "mysql+pymysql://root@127.0.0.1:1/shardmeta", "connect_timeout_s": 1}
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(raw))
    runner = CliRunner()
    for args in (
        ["ids", "new", "--table", "notes", "--key", "user_id=4", "--worker", "1"],
        ["ids", "decode", "253080917055774721"],
        ["route", "--table", "notes", "--key", "user_id=4"],
    ):
        result = runner.invoke(main, [*args, "--config", str(path), "--json"])
        assert result.exit_code == 1, result.output
        error = json.loads(result.stdout)["error"]
        assert "did not answer" in error and "--file-only" in error, error
        assert "moving slots" not in error and "every write" in error, error


# -- smaller ----------------------------------------------------------------------------------


def test_async_install_copies_the_lean_pools_while_the_loop_adds_one(tmp_path: Path) -> None:
    """The follower's thread swaps an AsyncRouter's snapshot (_install) while the event loop
    may add a lean pool to the old snapshot's dict (an unlocked item assignment): the copy
    must not fail with "dictionary changed size during iteration" (the version would be
    rejected for good)."""
    raw = plain(document(tmp_path))
    for name, shard in raw["shards"].items():  # engines are made, never connected
        shard["primary"] = f"mysql+pymysql://root@127.0.0.1:9/never_{name}"
    topology = Topology(config_from_dict(raw))
    router = AsyncRouter(topology)
    interval = sys.getswitchinterval()
    failures: list[BaseException] = []
    try:
        sys.setswitchinterval(1e-6)
        for _ in range(20):
            lean: dict[Any, Any] = router._snap.lean
            for _ in range(20_000):
                lean[object()] = False
            stop = threading.Event()

            def add(lean: dict[Any, Any] = lean, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    lean[object()] = False  # what the loop does: snap.lean[engine] = pool

            adder = threading.Thread(target=add, daemon=True)
            adder.start()
            try:
                router._install(Topology(config_from_dict(raw)))
            except RuntimeError as exc:
                failures.append(exc)
            finally:
                stop.set()
                adder.join(timeout=5)
    finally:
        sys.setswitchinterval(interval)
        asyncio.run(router.close())
    assert failures == []


def test_secondary_key_hint_names_the_lease_for_a_meta_topology(tmp_path: Path) -> None:
    """An order id of another slot is refused with a hint that works with meta: too (a
    lease's generator), not only topology.id_generator (which refuses there)."""
    raw = plain(document(tmp_path))
    topology = Topology(config_from_dict(raw))
    gen = topology.id_generator("orders")
    router = Router(topology)
    try:
        with pytest.raises(KeyValueError, match=r"WorkerLease\.for_topology") as refused:
            router.execute(
                "INSERT INTO orders (order_id, user_id, merchant_id, status, amount_cents,"
                " created_at) VALUES (:o, :u, 1, 'new', 1, '2026-01-01')",
                {"o": gen.next_for_slot(router.route_key(user_id=5)[1] ^ 1), "u": 5},
            )
        assert "topology.id_generator('orders')" in str(refused.value)
    finally:
        router.close()


class _Base(DeclarativeBase):
    pass


class _Note(_Base):
    __tablename__ = "notes"
    user_id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str]


def test_orm_bulk_methods_are_refused_typed_naming_add_all(tmp_path: Path) -> None:
    """bulk_save_objects / bulk_insert_mappings / bulk_update_mappings on a RoutedSession:
    UnsupportedQueryError naming session.add_all (not SQLAlchemy's NotImplementedError),
    and the session stays usable."""
    raw = plain(document(tmp_path))
    create_notes(tmp_path, raw)
    with Router(Topology(config_from_dict(raw))) as router:
        session = RoutedSession(router)
        try:
            calls = (
                lambda: session.bulk_save_objects([_Note(user_id=1, body="a")]),
                lambda: session.bulk_insert_mappings(_Note, [{"user_id": 2, "body": "b"}]),
                lambda: session.bulk_update_mappings(_Note, [{"user_id": 2, "body": "c"}]),
            )
            for call in calls:
                with pytest.raises(UnsupportedQueryError, match=r"session\.add_all"):
                    call()
            session.add_all([_Note(user_id=1, body="a"), _Note(user_id=2, body="b")])
            session.commit()
        finally:
            session.close()
        assert router.execute("SELECT COUNT(*) FROM notes").scalar() == 2
