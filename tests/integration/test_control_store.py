"""The meta store (control/store.py) on real MariaDB and on SQLite: schema init, the not-
initialised and newer-schema refusals, versions pushed atomically with an optimistic check
(a real race: several processes push from the same base, exactly one wins), history, server
time, and a store that does not answer (typed, password masked)."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, text, update
from sqlalchemy.engine import make_url

from shardrouter.control.store import SCHEMA_VERSION, MetaStore, meta_table
from shardrouter.errors import ConcurrentChangeError, MetaStoreError, MetaStoreUnavailableError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


@pytest.fixture(params=["mariadb", "sqlite"])
def store_url(request: pytest.FixtureRequest, sandbox: Any, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'meta.db'}"
        return
    server = make_url(sandbox.shards[0].url).set(database="")
    admin = create_engine(server.render_as_string(hide_password=False))
    with admin.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS meta_store_test"))
        conn.execute(text("CREATE DATABASE meta_store_test"))
    try:
        yield server.set(database="meta_store_test").render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS meta_store_test"))
        admin.dispose()


DOC = {"name": "orders", "shards": {}, "tables": {}}


def test_a_store_without_tables_is_refused_with_the_fix(store_url: str) -> None:
    with MetaStore(store_url) as store:
        for call in (store.current, store.history, store.current_version, store.routers):
            with pytest.raises(MetaStoreError, match="shardctl meta init"):
                call()
        assert store.status().initialised is False


def test_init_is_idempotent_and_status_reports(store_url: str) -> None:
    with MetaStore(store_url) as store:
        assert store.init() is True
        assert store.init() is False
        status = store.status()
        assert status.initialised and status.schema_version == SCHEMA_VERSION
        assert status.current_version is None and status.versions == 0
        assert status.server_now_ms is not None
        assert abs(status.server_now_ms - time.time() * 1000) < 60_000  # the server's clock
        assert store.current() is None


def test_push_history_and_the_optimistic_check(store_url: str) -> None:
    with MetaStore(store_url) as store:
        store.init()
        assert store.push(DOC, expected=None, comment="first", pushed_by="ann@h") == 1
        assert store.push({**DOC, "name": "two"}, expected=1, comment="second") == 2
        with pytest.raises(ConcurrentChangeError, match="re-run the push"):
            store.push({**DOC, "name": "late"}, expected=1)
        with pytest.raises(ConcurrentChangeError):
            store.push({**DOC, "name": "late"}, expected=None)
        current = store.current()
        assert current is not None and current.version == 2
        assert current.document["name"] == "two" and current.document["version"] == 2
        history = store.history()
        assert [(v.version, v.comment) for v in history] == [(2, "second"), (1, "first")]
        assert history[1].pushed_by == "ann@h" and "@" in history[0].pushed_by
        assert history[0].pushed_at_ms >= history[1].pushed_at_ms
        with pytest.raises(MetaStoreError, match="topology history"):
            store.get(7)


def _push_from(url: str, base: int | None, name: str, start: Any, out: Any) -> None:
    store = MetaStore(url)
    try:
        start.wait(30)
        try:
            out.put(("ok", store.push({**DOC, "name": name}, expected=base)))
        except ConcurrentChangeError:
            out.put(("raced", name))
        except Exception as exc:  # anything else is a finding: report its type
            out.put(("error", f"{type(exc).__name__}: {exc}"))
    finally:
        store.close()


def test_concurrent_pushes_from_one_base_exactly_one_wins(store_url: str) -> None:
    with MetaStore(store_url) as store:
        store.init()
        store.push(DOC, expected=None)
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Event()
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_push_from, args=(store_url, 1, f"p{i}", start, out)) for i in range(6)
    ]
    try:
        for p in procs:
            p.start()
        start.set()
        results = [out.get(timeout=60) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
    assert sorted(r[0] for r in results) == ["ok"] + ["raced"] * 5, results
    with MetaStore(store_url) as store:
        assert [v.version for v in store.history()] == [2, 1]


def test_a_newer_schema_is_refused_untouched(store_url: str) -> None:
    with MetaStore(store_url) as store:
        store.init()
        with store.begin() as conn:
            conn.execute(update(meta_table).values(schema_version=SCHEMA_VERSION + 1))
        with pytest.raises(MetaStoreError, match="upgrade shardrouter"):
            store.init()
        with pytest.raises(MetaStoreError, match="newer than this release"):
            store.current()


def test_a_store_that_does_not_answer_is_typed_and_masked(scratch_port: int) -> None:
    url = f"mysql+pymysql://app:Sekr3tPW@127.0.0.1:{scratch_port + 40}/meta"  # nothing listens
    with MetaStore(url) as store:
        with pytest.raises(MetaStoreUnavailableError) as caught:
            store.current()
        assert "Sekr3tPW" not in str(caught.value) and "***" in str(caught.value)
        assert "Sekr3tPW" not in repr(store)
