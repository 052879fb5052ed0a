"""Worker-id leases on a real meta store (MariaDB on the sandbox, and SQLite): races between
processes, a killed holder, released ids reused, a store that stops answering."""

from __future__ import annotations

import itertools
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lease_workers as lw
import pytest
from sqlalchemy import create_engine, select, text

from shardrouter.control.leases import WorkerLease, worker_leases
from shardrouter.control.store import MetaStore, worker_leases_table
from shardrouter.core.config import MetaConfig
from shardrouter.core.ids import IdGenerator
from shardrouter.errors import IdGeneratorForkedError, WorkerLeaseError
from shardrouter.ops import sandbox as sb

SPAWN = multiprocessing.get_context("spawn")
_databases = itertools.count()


@pytest.fixture(params=["sqlite", "mariadb"])
def meta_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An initialised, empty meta store: a SQLite file, or a database on the session sandbox."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'meta.db'}"
        with MetaStore(url) as store:
            store.init()
        yield url
        return
    sandbox = request.getfixturevalue("sandbox")
    server = sandbox.shard("s0").url.rsplit("/", 1)[0] + "/"
    database = f"meta_leases_{os.getpid()}_{next(_databases)}"
    engine = create_engine(server)
    try:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
            conn.execute(text(f"CREATE DATABASE `{database}`"))
        url = server + database
        with MetaStore(url) as store:
            store.init()
        yield url
    finally:
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
        engine.dispose()


def drain(results: Any, count: int, timeout: float) -> list[Any]:
    out = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        left = deadline - time.monotonic()
        assert left > 0, f"only {len(out)} of {count} results came back: {out}"
        out.append(results.get(timeout=left))
    return out


# -- atomicity: many processes, few ids ----------------------------------------------------


@pytest.mark.timeout(280)
def test_40_processes_race_for_32_worker_ids(meta_url: str) -> None:
    ready, results = SPAWN.Queue(), SPAWN.Queue()
    go, hold = SPAWN.Event(), SPAWN.Event()
    procs = [lw.spawn(SPAWN, lw.race, meta_url, 5, ready, go, hold, results) for _ in range(40)]
    with lw.reaped(procs):
        drain(ready, 40, timeout=200)  # every child imported and connected: now race
        go.set()
        outcomes = drain(results, 40, timeout=60)
        ok = sorted(o[1] for o in outcomes if o[0] == "ok")
        errors = [o[1] for o in outcomes if o[0] == "error"]
        assert ok == list(range(32)), outcomes  # 32 distinct ids, every one of them
        assert len(errors) == 8, outcomes
        for message in errors:
            assert message.startswith(
                "no worker id is free: all 32 ids of 5 worker bits are taken (32 held by live"
                " generators); widen ids.worker_bits"
            ), message
            assert "run fewer id-generating processes, or wait for expired leases" in message
        with MetaStore(meta_url) as store:
            rows = worker_leases(store)
        assert len({r.holder for r in rows}) == 32 and all(r.held for r in rows)
        hold.set()
        for proc in procs:
            proc.join(timeout=30)
        assert [p.exitcode for p in procs] == [0] * 40
    with MetaStore(meta_url) as store:
        assert not any(r.held for r in worker_leases(store))  # all released by close()


# -- a killed holder -------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_a_killed_holders_id_comes_back_only_after_expiry_plus_max_clock_step(
    meta_url: str, tmp_path: Path
) -> None:
    lease_s, max_backward_ms = 1.2, 600
    results = SPAWN.Queue()
    out = tmp_path / "ids.txt"
    child = lw.spawn(
        SPAWN, lw.hold_and_issue, meta_url, 0, lease_s, max_backward_ms, str(out), results
    )
    with lw.reaped([child]):
        kind, worker, holder = results.get(timeout=60)
        assert (kind, worker) == ("leased", 0)
        time.sleep(2 * lease_s)  # the child issues, renews (every 0.3 s) and issues on
        os.kill(child.pid, signal.SIGKILL)
        child.join(timeout=10)
        assert child.exitcode == -signal.SIGKILL
    lines = out.read_text(encoding="utf-8").split("\n")[:-1]  # the last may be cut short
    seen = [int(v) for line in lines for v in line.split()]
    assert len(seen) >= 2000

    store = MetaStore(meta_url)
    try:
        (row,) = worker_leases(store)
        assert row.holder == holder  # nobody released it: the holder died
        assert row.reusable_at_ms == row.lease_expires_at_ms + max_backward_ms
        layout = lw.layout_for(0)
        assert max(layout.decode(i).timestamp_ms for i in seen) < row.lease_expires_at_ms
        attempts: list[tuple[int, str]] = []
        lease = None
        deadline = time.monotonic() + 30
        while lease is None:
            assert time.monotonic() < deadline, attempts
            try:
                lease = WorkerLease.acquire(
                    store, worker_bits=0, max_backward_ms=max_backward_ms, lease_s=5
                )
            except WorkerLeaseError as exc:
                with store.begin() as conn:
                    attempts.append((store.server_now_ms(conn), str(exc)))
                time.sleep(0.05)
        with lease:
            (taken,) = worker_leases(store)
            # Refused while the store's clock was before expiry + max_backward_ms, taken after.
            assert taken.acquired_at_ms >= row.reusable_at_ms
            assert attempts and all(now <= taken.acquired_at_ms for now, _ in attempts)
            refused_after_expiry = [
                now for now, _ in attempts if row.lease_expires_at_ms <= now < row.reusable_at_ms
            ]
            assert refused_after_expiry, attempts  # the max clock step was waited for, too
            assert "not reusable yet" in attempts[-1][1]
            gen = lease.attach(IdGenerator(layout, 0, max_backward_ms=max_backward_ms))
            fresh = [gen.next_for_slot(7) for _ in range(2000)]
            assert not set(fresh) & set(seen)
            assert min(layout.decode(i).timestamp_ms for i in fresh) >= row.lease_expires_at_ms
    finally:
        store.close()


# -- uniqueness across processes, with ids reused after release -------------------------------


@pytest.mark.timeout(240)
def test_ids_from_8_processes_sharing_4_worker_ids_never_repeat(
    meta_url: str, tmp_path: Path
) -> None:
    ready, go = SPAWN.Queue(), SPAWN.Event()
    outs = [tmp_path / f"ids-{i}.txt" for i in range(8)]
    procs = [
        lw.spawn(SPAWN, lw.issue_in_turn, meta_url, 2, 20_000, str(out), ready, go) for out in outs
    ]
    with lw.reaped(procs):
        drain(ready, 8, timeout=120)
        go.set()
        for proc in procs:
            proc.join(timeout=150)
        assert [p.exitcode for p in procs] == [0] * 8
    workers: list[int] = []
    ids: list[int] = []
    for out in outs:
        first, *rest = out.read_text(encoding="utf-8").splitlines()
        workers.append(int(first))
        ids += map(int, rest)
    assert len(ids) == 160_000
    assert len(set(ids)) == len(ids)  # no id twice, though worker ids were reused at once
    assert sorted(set(workers)) == [0, 1, 2, 3] and len(workers) == 8  # every id served twice+


# -- release and reuse in one process ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_released_id_is_reusable_at_once_and_its_successor_stamps_later(meta_url: str) -> None:
    layout = lw.layout_for(0)
    with MetaStore(meta_url) as store:
        first = WorkerLease.acquire(store, worker_bits=0, lease_s=30)
        gen = first.attach(IdGenerator(layout, 0))
        before = [gen.next_for_slot(3) for _ in range(500)]
        assert first.close() is True
        with pytest.raises(WorkerLeaseError, match="was released"):
            gen.next_for_slot(3)
        (row,) = worker_leases(store)
        assert row.holder is None
        assert row.lease_expires_at_ms == max(layout.decode(i).timestamp_ms for i in before) + 1
        with WorkerLease.acquire(store, worker_bits=0, lease_s=30) as second:
            assert second.worker_id == 0
            gen2 = second.attach(IdGenerator(layout, 0))
            after = [gen2.next_for_slot(3) for _ in range(500)]
            assert min(after) > max(before)


@pytest.mark.timeout(60)
def test_a_lost_lease_stops_its_generators_for_good(meta_url: str) -> None:
    with MetaStore(meta_url) as store:
        lost = WorkerLease.acquire(
            store, worker_bits=0, max_backward_ms=50, lease_s=0.6, fence_margin_s=0.1,
            renew_every_s=0.2, auto_renew=False,
        )  # fmt: skip
        gen = lost.attach(IdGenerator(lw.layout_for(0), 0))
        gen.next_for_slot(1)
        time.sleep(0.8)  # expired + max_backward_ms: another process may take it
        with WorkerLease.acquire(store, worker_bits=0, lease_s=30) as taker:
            assert taker.worker_id == 0
            with pytest.raises(WorkerLeaseError, match="worker id 0's lease ran out"):
                gen.next_for_slot(1)
            with pytest.raises(WorkerLeaseError, match="the lease of worker id 0 was lost"):
                lost.renew()
            with pytest.raises(WorkerLeaseError, match="was lost"):
                gen.next_for_slot(1)
            assert lost.close() is False  # nothing to give back: the taker's row is untouched
            (row,) = worker_leases(store)
            assert row.holder == taker.holder


def test_lease_settings_and_all_taken_errors(meta_url: str) -> None:
    with MetaStore(meta_url) as store:
        with pytest.raises(WorkerLeaseError, match=r"lease_s \(1\) must exceed fence_margin_s"):
            WorkerLease.acquire(store, worker_bits=3, lease_s=1, fence_margin_s=0.5)
        a = WorkerLease.acquire(store, worker_bits=1, auto_renew=False)
        b = WorkerLease.acquire(store, worker_bits=1, auto_renew=False)
        with a, b:
            assert (a.worker_id, b.worker_id) == (0, 1)
            with pytest.raises(WorkerLeaseError, match="all 2 ids of 1 worker bits"):
                WorkerLease.acquire(store, worker_bits=1)
        c = WorkerLease.acquire(store, worker_bits=2, auto_renew=False)
        with c, pytest.raises(WorkerLeaseError, match="has worker id 3, this lease holds 0"):
            c.attach(IdGenerator(lw.layout_for(2), 3))


# -- the meta store stops answering ------------------------------------------------------------


def _issue_until_refused(gen: IdGenerator, lease: WorkerLease, timeout: float) -> float:
    """Issue ids until the generator refuses; returns when (monotonic). Checks that it
    refused no later than the lease's deadline and never issued again afterwards."""
    deadline = time.monotonic() + timeout
    while True:
        assert time.monotonic() < deadline, "the generator kept issuing ids"
        try:
            gen.next_for_slot(5)
        except WorkerLeaseError as exc:
            refused = time.monotonic()
            assert "lease" in str(exc), exc
            break
        time.sleep(0.002)
    assert refused <= lease.valid_until + 0.05  # stopped at its deadline, not later
    until = time.monotonic() + 1.0
    while time.monotonic() < until:
        with pytest.raises(WorkerLeaseError):
            gen.next_for_slot(5)
        time.sleep(0.01)
    return refused


@pytest.mark.timeout(60)
def test_a_locked_sqlite_store_stops_the_generator_at_its_deadline(tmp_path: Path) -> None:
    path = tmp_path / "meta.db"
    url = f"sqlite:///{path}"
    config = MetaConfig(
        url=url, poll_interval_s=0.2, fast_poll_interval_s=0.1, lease_s=1.5,
        fence_margin_s=0.3, query_timeout_s=0.3,
    )  # fmt: skip
    store = MetaStore(url, config=config)
    store.init()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        lease = WorkerLease.acquire(store, worker_bits=3, max_backward_ms=50)
        assert lease.renew_every_s == pytest.approx(0.5)
        gen = lease.attach(IdGenerator(lw.layout_for(3), lease.worker_id, max_backward_ms=50))
        started = time.monotonic()
        while time.monotonic() < started + 1.2:  # renewals keep it going past one lease
            gen.next_for_slot(5)
        valid_before = lease.valid_until
        locker.execute("BEGIN EXCLUSIVE")  # the store's file is locked: no renewal gets in
        locked = time.monotonic()
        refused = _issue_until_refused(gen, lease, timeout=10)
        assert refused - locked <= 1.5  # within one lease of the lock
        assert lease.valid_until <= valid_before + 0.6  # no renewal got through
        locker.execute("COMMIT")
        # The store answers again and nobody took the id: the next renewal resumes the lease.
        until = time.monotonic() + 5
        while True:
            try:
                gen.next_for_slot(5)
                break
            except WorkerLeaseError:
                assert time.monotonic() < until, "the lease was not renewed after the lock"
                time.sleep(0.05)
        assert lease.close() is True
    finally:
        locker.close()
        store.close()


@pytest.mark.timeout(180)
def test_a_stopped_mariadb_store_stops_the_generator_at_its_deadline(
    scratch_dir: Path, scratch_port: int
) -> None:
    scratch = sb.up(scratch_dir, shards=1, base_port=scratch_port)
    url = scratch.shard("s0").url
    config = MetaConfig(
        url=url, poll_interval_s=0.2, fast_poll_interval_s=0.1, lease_s=1.5,
        fence_margin_s=0.3, connect_timeout_s=0.5, query_timeout_s=0.5,
    )  # fmt: skip
    store = MetaStore(url, config=config)
    try:
        store.init()
        lease = WorkerLease.acquire(store, worker_bits=3, max_backward_ms=50)
        gen = lease.attach(IdGenerator(lw.layout_for(3), lease.worker_id, max_backward_ms=50))
        started = time.monotonic()
        while time.monotonic() < started + 1.2:
            gen.next_for_slot(5)
        sb.kill_shard(scratch, "s0")  # SIGKILL: connections refused from now on
        killed = time.monotonic()
        refused = _issue_until_refused(gen, lease, timeout=10)
        assert refused - killed <= 1.5
        assert lease.close() is False  # the store is gone: the lease just expires there
    finally:
        store.close()


# -- fork and exit -----------------------------------------------------------------------------


def _child_uses_inherited(lease: WorkerLease, out: Any) -> None:
    try:
        lease.renew()
        out.put("renewed")
    except IdGeneratorForkedError as exc:
        out.put(f"refused: {exc}")
    out.put(lease.close())


@pytest.mark.timeout(60)
def test_a_forked_child_cannot_renew_or_release_its_parents_lease(meta_url: str) -> None:
    fork = multiprocessing.get_context("fork")
    store = MetaStore(meta_url)
    lease = WorkerLease.acquire(store, worker_bits=2, auto_renew=False)
    with store, lease:
        out = fork.Queue()
        child = fork.Process(target=_child_uses_inherited, args=(lease, out))
        with lw.reaped([child]):
            message = out.get(timeout=30)
            assert message.startswith("refused: this WorkerLease (worker id 0)"), message
            assert out.get(timeout=10) is False
            child.join(timeout=10)
        lease.renew()  # still the parent's
        (row,) = worker_leases(store)
        assert row.holder == lease.holder


@pytest.mark.timeout(60)
def test_a_lease_is_released_at_interpreter_exit(meta_url: str) -> None:
    script = textwrap.dedent(
        f"""
        from shardrouter.control.leases import WorkerLease
        from shardrouter.control.store import MetaStore
        lease = WorkerLease.acquire(MetaStore({meta_url!r}), worker_bits=2, owns_store=True)
        print(lease.worker_id, lease.holder)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=45, check=True
    )
    worker = int(done.stdout.split()[0])
    with MetaStore(meta_url) as store:
        (row,) = worker_leases(store)
        assert (row.worker_id, row.holder) == (worker, None)
        assert row.reusable
        with store.begin() as conn:
            count = conn.execute(select(worker_leases_table.c.worker_id)).all()
        assert len(count) == 1


# -- from a topology with a meta: section ------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_topology_with_a_meta_store_leases_its_generators_worker_id(tmp_path: Path) -> None:
    import yaml

    from shardrouter.core.topology import Topology

    repo = Path(__file__).resolve().parents[2]
    raw = yaml.safe_load((repo / "config" / "orders-sqlite.yaml").read_text(encoding="utf-8"))
    raw["meta"] = {"url": f"sqlite:///{tmp_path / 'meta.db'}"}
    path = tmp_path / "topology.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    topology = Topology.load(path, {"SHARDROUTER_DEMO_DIR": str(tmp_path)})
    assert topology.config.meta is not None
    with MetaStore.from_config(topology.config.meta) as store:
        store.init()
        held = WorkerLease.acquire(store, worker_bits=topology.id_layout.worker_bits)
        with held, WorkerLease.for_topology(topology) as lease:
            assert (held.worker_id, lease.worker_id) == (0, 1)
            assert lease.lease_s == 10.0 and lease.renew_every_s == pytest.approx(10 / 3)
            assert lease.max_backward_ms == topology.config.ids.max_backward_ms
            gen = lease.generator(topology, "orders")
            decoded = gen.decode(gen.next_id(user_id=42))
            assert decoded.worker == 1
            assert decoded.slot == topology.table("orders").key("user_id").slot(42)
        with pytest.raises(WorkerLeaseError, match="was released"):
            gen.next_id(user_id=42)
    bare = Topology.load(repo / "config" / "orders-sqlite.yaml", {})
    with pytest.raises(WorkerLeaseError, match="no meta: section"):
        WorkerLease.for_topology(bare)
    assert bare.id_generator("orders").worker_id == 0  # ids.worker_id, as without leases


@pytest.mark.timeout(60)
def test_no_lease_from_a_store_that_is_not_initialised_or_not_answering(tmp_path: Path) -> None:
    empty = MetaStore(f"sqlite:///{tmp_path / 'empty.db'}")
    not_initialised = r"no shardrouter tables; run `shardctl meta init`$"
    with empty, pytest.raises(WorkerLeaseError, match=not_initialised):
        WorkerLease.acquire(empty, worker_bits=3)
    url = "mysql+pymysql://root@127.0.0.1:1/meta"  # nothing listens on port 1
    config = MetaConfig(url=url, connect_timeout_s=0.5, query_timeout_s=0.5, poll_interval_s=0.5)
    dead = MetaStore(url, config=config)
    with dead, pytest.raises(WorkerLeaseError, match=r"did not answer.*retry when the meta store"):
        WorkerLease.acquire(dead, worker_bits=3)
