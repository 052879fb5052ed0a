"""Control plane review, round 2 (engines, stored documents, write doors, worker ids), on a
SQLite meta store: each test failed before its fix (findings 4, 6, 10 and 11 of the review,
and the lease release / interrupted push notes)."""

from __future__ import annotations

import copy
import gc
import json
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner
from control_cluster import moving_document, user_in_slots, wait_until
from sqlalchemy import select, text, update

from shardrouter.cli import main
from shardrouter.control.leases import WorkerLease, worker_leases
from shardrouter.control.store import MetaStore, versions_table, worker_leases_table
from shardrouter.control.versions import open_store, plan_push, publish, read_proposal
from shardrouter.core.config import config_from_dict
from shardrouter.core.ids import IdGenerator
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.engine.snapshot import Resolution
from shardrouter.errors import (
    FencedError,
    MetaStoreDocumentError,
    MetaStoreError,
    MetaStoreUnavailableError,
    WorkerLeaseError,
)
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(60)


# -- 4: an engine shared by several snapshots is disposed after the last of them ---------------


def test_engine_kept_by_an_intermediate_version_is_not_disposed_under_an_older_user(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """A session pins version 1 and uses shard s1's engine E. Version 2 (a replica on s0)
    keeps E; version 3 (s1's pool changed) drops it. Version 2's retirement must not dispose E
    while version 1 is still pinned, and version 1's release must dispose it (once)."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        engine = router.engines.primary("s1")
        session = RoutedSession(router)
        try:
            assert session._snap.version == 1
            session.connection(bind_arguments={"shard_id": "s1"}).execute(text("SELECT 1"))
            pool = engine.pool
            v2 = copy.deepcopy(raw)
            v2["shards"]["s0"]["replicas"] = [f"sqlite:///{tmp_path}/s0.db"]
            store.push(v2, expected=1, comment="replica on s0")
            wait_until(lambda: router.version == 2)  # swapped (the ack waits for version 1's user)
            assert router.engines.primary("s1") is engine  # taken over by version 2
            v3 = copy.deepcopy(v2)
            v3["shards"]["s1"]["pool"] = {"size": 3}
            store.push(v3, expected=2, comment="s1 pool")
            wait_until(lambda: router.version == 3)
            assert router.engines.primary("s1") is not engine
            assert engine.pool is pool, "s1's engine was disposed while version 1 still uses it"
        finally:
            session.close()
            del session
            gc.collect()
        assert engine.pool is not pool  # disposed once the last user of version 1 let go


def test_engine_shared_by_an_older_pinned_version_outlives_the_newer_retirement(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """The other order: version 1 is released first (version 2 still pinned): E stays (version
    2 holds it); releasing version 2 (after version 3 dropped E) disposes it. An engine every
    version keeps (s2's) is never disposed by a swap."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        e1 = router.engines.primary("s1")
        e2 = router.engines.primary("s2")
        pools = (e1.pool, e2.pool)
        first = router._pin()
        v2 = copy.deepcopy(raw)
        v2["shards"]["s0"]["replicas"] = [f"sqlite:///{tmp_path}/s0.db"]
        store.push(v2, expected=1, comment="replica on s0")
        wait_until(lambda: router.version == 2)  # swapped (the ack waits for the pins)
        second = router._pin()
        v3 = copy.deepcopy(v2)
        v3["shards"]["s1"]["pool"] = {"size": 3}
        store.push(v3, expected=2, comment="s1 pool")
        wait_until(lambda: router.version == 3)
        first.release()
        assert e1.pool is pools[0], "disposed while version 2 still uses it"
        second.release()
        assert e1.pool is not pools[0], "never disposed: a pool nothing closes"
        assert e2.pool is pools[1], "an engine the current version uses was disposed"


# -- 6: a malformed stored document is a typed error -------------------------------------------


@pytest.mark.parametrize("stored", ["{not json", "[1, 2]", "null"])
def test_malformed_stored_document_is_a_typed_error(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path, stored: str
) -> None:
    """A stored version whose document is not a JSON object is a MetaStoreError naming the
    version, by the store API, a router starting on it and the CLI (``--json``: one
    {"ok": false} document, exit 1; without it one line, no traceback)."""
    raw, store = cluster
    with store.begin() as conn:
        conn.execute(update(versions_table).values(document=stored))
    with pytest.raises(MetaStoreDocumentError, match="version 1"):
        store.get(1)
    with pytest.raises(MetaStoreError, match="version 1"):
        store.history()
    with pytest.raises(MetaStoreError, match="version 1"):
        Router.from_config(config_from_dict(raw)).close()
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    commands = (
        ["topology", "show", "--config", str(path)],
        ["topology", "history", "--config", str(path)],
        ["topology", "push", str(path)],
    )
    for command in commands:
        result = CliRunner().invoke(main, [*command, "--json"])
        assert result.exit_code == 1, (command, result.output, result.exception)
        data = json.loads(result.stdout)
        assert data["ok"] is False and "version 1" in data["error"], data
        plain = CliRunner().invoke(main, command)
        assert plain.exit_code == 1, (command, plain.output, plain.exception)
        assert "Traceback" not in plain.output and "version 1" in plain.output


def test_follower_rejects_a_malformed_version_once(
    cluster: tuple[dict[str, Any], MetaStore], caplog: pytest.LogCaptureFixture
) -> None:
    """A running router meeting a malformed new version keeps serving its own, records the
    version in ``rejected`` and logs it once (not on every fast poll); its lease is not lost
    (the store answered)."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        follower = router._follower
        follower.pause()
        store.push(copy.deepcopy(raw) | {"name": "v2"}, expected=1, comment="v2")
        with store.begin() as conn:
            conn.execute(
                update(versions_table).where(versions_table.c.version == 2).values(document="[")
            )
        with caplog.at_level(logging.WARNING, logger="shardrouter.control"):
            follower.resume()
            wait_until(lambda: 2 in follower.rejected)
            time.sleep(0.3)  # many fast polls
        assert router.version == 1
        assert "version 2" in follower.rejected[2]
        mentions = [r for r in caplog.records if "version 2" in r.getMessage()]
        assert len(mentions) == 1, [r.getMessage() for r in mentions]
        assert not any(r.exc_info for r in caplog.records)
        assert not router.resolver.fence.expired()


# -- 10: raw SQL on a session's placement connection passes the write resolver ---------------


def test_session_placement_connection_is_a_write_door_the_resolver_sees(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """RoutedSession.connection(bind_arguments={"shard_id": ...}) runs text SQL on one
    placement: a fenced router's raw INSERT there, on a moving range's source shard, is
    refused (FencedError) and the resolver hook records it, as Router.connection() and the
    flush do."""
    raw, store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        store.push(moving_document(raw, 0, 10), expected=1, comment="slots 0-10 moving")
        wait_until(lambda: router.version == 2)  # swapped (the ack waits for the pins)
        moving_user = user_in_slots(router, 0, 10)
        seen: list[Resolution] = []
        router.resolver.hook = seen.append
        router._follower.pause()
        try:
            wait_until(lambda: router.resolver.fence.expired(), timeout=3)
            session = RoutedSession(router)
            try:
                conn = session.connection(bind_arguments={"shard_id": "s0"})
                conn.execute(text("SELECT COUNT(*) FROM notes")).scalar_one()  # reads pass
                assert seen == []
                with pytest.raises(FencedError):
                    conn.execute(
                        text("INSERT INTO notes (user_id, body) VALUES (:u, 'raw')"),
                        {"u": moving_user},
                    )
                with pytest.raises(FencedError):
                    conn.exec_driver_sql("DELETE FROM notes")
                session.commit()
            finally:
                session.close()
            assert [(r.path, r.shard, r.version) for r in seen] == [("orm", "s0", 2)] * 2
        finally:
            router._follower.resume()


def test_session_placement_connection_writes_are_recorded_when_allowed(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """With nothing moving, raw writes on a placement run and the resolver records them (one
    Resolution per write statement, none for a read)."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        seen: list[Resolution] = []
        router.resolver.hook = seen.append
        with RoutedSession(router) as session:
            conn = session.connection(bind_arguments={"shard_id": "s1"})
            conn.execute(text("INSERT INTO notes (user_id, body) VALUES (7, 'raw')"))
            assert conn.execute(text("SELECT body FROM notes")).scalar_one() == "raw"
            session.commit()
        assert [(r.path, r.shard, r.slot, r.role) for r in seen] == [
            ("orm", "s1", None, "placement")
        ]


# -- 11: worker ids of a topology with meta: ---------------------------------------------------


def test_id_generator_of_a_meta_topology_does_not_silently_share_the_config_worker_id(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """With meta: configured, topology.id_generator("orders") refuses (every process would
    get the config's worker id 0 and issue the same ids), naming the fix; an explicit worker
    id and WorkerLease.for_topology(...).generator(...) work, and so does a topology without
    meta: (ids.worker_id as before)."""
    raw, _store = cluster
    with Router.from_config(config_from_dict(raw)) as router:
        with pytest.raises(WorkerLeaseError, match=r"WorkerLease\.for_topology") as refused:
            router.topology.id_generator("orders")
        assert "worker_id=" in str(refused.value)
        assert router.topology.id_generator("orders", worker_id=5).worker_id == 5
        with (
            WorkerLease.for_topology(router.topology) as first,
            WorkerLease.for_topology(router.topology) as second,
        ):
            a = first.generator(router.topology, "orders")
            b = second.generator(router.topology, "orders")
            assert a.worker_id != b.worker_id
            assert not set(a.next_ids(16, user_id=42)) & set(b.next_ids(16, user_id=42))
    plain = {k: v for k, v in raw.items() if k != "meta"}
    assert Topology(config_from_dict(plain)).id_generator("orders").worker_id == 0


def test_shardctl_ids_new_leases_a_worker_id_on_a_meta_config(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """`shardctl ids new` with a meta: config leases a worker id for the command (released at
    its end): with worker id 0 held by another process it issues under worker id 1."""
    raw, store = cluster
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw))
    topology = Topology(config_from_dict(raw))
    command = ["ids", "new", "--config", str(path), "--table", "orders", "--key", "user_id=42"]
    with WorkerLease.for_topology(topology) as held:
        assert held.worker_id == 0
        result = CliRunner().invoke(
            main,
            [*command, "--count", "3", "--json"],
        )
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        workers = {topology.id_layout.decode(i).worker for i in data["ids"]}
        assert workers == {1}, data
        assert data["worker_id"] == 1
    records = {r.worker_id: r for r in worker_leases(store)}
    assert records[1].holder is None  # given back when the command ended
    explicit = CliRunner().invoke(
        main,
        [*command, "--worker", "9", "--json"],
    )
    assert explicit.exit_code == 0, explicit.output
    assert topology.id_layout.decode(json.loads(explicit.stdout)["ids"][0]).worker == 9


# -- the lease release never lowers the floor the next holder starts from -----------------


def test_lease_release_keeps_the_floor_it_inherited(
    cluster: tuple[dict[str, Any], MetaStore],
) -> None:
    """A holder that inherited a floor (the previous holder's ids lie up to it) later than its
    own lease expiry must hand that floor on when it releases: the release writes the larger
    of the two, never the smaller (before: min(expiry, high + 1), the expiry here)."""
    _raw, store = cluster
    with store.begin() as conn:
        now = store.server_now_ms(conn)
        conn.execute(
            worker_leases_table.insert().values(
                worker_id=0,
                holder=None,
                acquired_at_ms=now - 10_000,
                lease_expires_at_ms=now + 3_000,  # the previous holder's ids lie below this
                reusable_at_ms=now,  # freed by an operator
            )
        )
    inherited = now + 3_000
    for attach in (True, False):
        lease = WorkerLease.acquire(
            store, worker_bits=0, lease_s=1.0, fence_margin_s=0.1, max_backward_ms=5_000
        )
        assert lease.expires_at_ms < inherited
        if attach:
            lease.attach(IdGenerator(Topology(config_from_dict(_raw)).id_layout, 0))
        assert lease.close() is True
        with store.begin() as conn:
            row = conn.execute(select(worker_leases_table)).one()
        assert row.lease_expires_at_ms >= inherited, (attach, row)
        assert row.reusable_at_ms <= row.lease_expires_at_ms
        with store.begin() as conn:  # free it again for the second round
            conn.execute(update(worker_leases_table).values(reusable_at_ms=now))


# -- a store that stops answering during a push: the outcome is unknown --------------------


def test_push_interrupted_by_the_store_says_the_outcome_is_unknown(
    cluster: tuple[dict[str, Any], MetaStore], tmp_path: Path
) -> None:
    """A push whose store stops answering (here: held locked by another connection past the
    query timeout) may or may not have landed; the error says so and names the way to find
    out (shardctl topology history), in the library and the CLI."""
    raw, _store = cluster
    raw = copy.deepcopy(raw)
    raw["meta"]["query_timeout_s"] = 0.3
    raw["tables"]["more"] = {"column": "user_id", "strategy": "hash"}
    path = tmp_path / "v2.yaml"
    path.write_text(yaml.safe_dump(raw))
    proposal = read_proposal(path)
    with open_store(proposal.config, None, str(path)) as store:
        plan = plan_push(store, proposal)
        locker = sqlite3.connect(str(tmp_path / "meta.db"), isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(MetaStoreUnavailableError) as err:
                publish(store, plan)
            assert "unknown" in str(err.value) and "shardctl topology history" in str(err.value)
        finally:
            locker.execute("ROLLBACK")
            locker.close()
