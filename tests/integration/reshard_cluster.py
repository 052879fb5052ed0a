"""The cluster of the resharding tests, shared by test_reshard_workflow, test_reshard_rollback,
test_reshard_crash and test_reshard_refusals (``build_cluster``): fresh databases on the
session sandbox's four instances (one per test: nothing of an earlier test can leak into the
next), a meta store database on s0's server holding a 2-shard version (s0 [0, 512), s1
[512, 1024)), and the 4-shard topology a split moves to (s0 [0, 256), s2 [256, 512), s1
[512, 768), s3 [768, 1024)).

Also what every test of a migration checks its end state with: the oracle (the writers'
ledgers replayed on one unsharded database, the lookup rows derived from it), the rows each
shard holds with their slots, and the writers (reshard_load's workload, recording the
statement before running it and its acknowledgement after, retrying what the router refused
with nothing run).

And the lighter cluster of the review tests (test_reshard_review9/10/11, test_reshard_keytypes_db:
``ReviewCluster``, made by ``review_clusters``): the same fresh databases and 2-shard version,
no topology files, any number of clusters per test, optional extra tables, DDL and pool
settings, and the helpers those tests drive it with.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from reshard_load import Ledger, Writer
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.ops.schema import apply
from shardrouter.reshard import journal, state
from shardrouter.reshard.plan import plan_move
from shardrouter.reshard.workflow import Options, Workflow

META = {
    "poll_interval_s": 0.2,
    "fast_poll_interval_s": 0.05,
    "lease_s": 3.0,
    "fence_margin_s": 0.5,
    "connect_timeout_s": 2.0,
    "query_timeout_s": 2.0,
}
BASE_TABLES = {
    "users": ("user_id", "email", "name"),
    "orders": ("order_id", "user_id", "merchant_id", "status", "amount_cents", "created_at"),
    "order_items": ("order_id", "line", "user_id", "sku", "qty", "price_cents"),
}
LOOKUP_TABLES = {
    # created_at of merchant_orders is the time of the router's write: not compared
    "merchant_orders": ("merchant_id", "order_id", "user_id"),
    "user_emails": ("email", "user_id"),
}
TABLES = {**BASE_TABLES, **LOOKUP_TABLES}
SHARD_COLUMN = {
    "users": "user_id",
    "orders": "user_id",
    "order_items": "user_id",
    "merchant_orders": "merchant_id",
    "user_emails": "email",
}
SCHEMA = Path(__file__).resolve().parents[2] / "migrations" / "0001_orders.sql"
REPO = Path(__file__).resolve().parents[2]

Rows = dict[str, Counter[tuple[Any, ...]]]


def fresh_database(server_url: str, name: str) -> str:
    """``name`` dropped and created on the server of ``server_url``; its URL."""
    url = make_url(server_url)
    engine = create_engine(url.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))
        conn.execute(text(f"CREATE DATABASE `{name}`"))
    engine.dispose()
    return url.set(database=name).render_as_string(hide_password=False)


def drop_database(url: str) -> None:
    u = make_url(url)
    engine = create_engine(u.set(database="").render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{u.database}`"))
    engine.dispose()


@dataclass
class Cluster:
    """The documents of a test's cluster and its meta store (``path``: the 2-shard topology
    with ``meta:``, what routers and ``shardctl --config`` start from)."""

    before: dict[str, Any]
    after: dict[str, Any]
    four: dict[str, Any]
    store: MetaStore
    path: Path
    after_path: Path
    meta_url: str
    prefix: str

    @property
    def slots(self) -> Topology:
        """A topology of every shard (slots and physical names do not depend on who owns
        them): what a row's slot and physical table are computed with."""
        return _plain_topology(self.four)

    def current(self) -> Topology:
        """The meta store's current version."""
        found = self.store.current()
        assert found is not None
        return _plain_topology(found.document)

    def engines(self) -> ShardEngines:
        return ShardEngines(self.slots)


def _plain_topology(doc: dict[str, Any]) -> Topology:
    doc = copy.deepcopy(doc)
    doc.pop("meta", None)
    doc.pop("moving", None)
    return Topology(config_from_dict(doc))


def two_shards(four: dict[str, Any]) -> dict[str, Any]:
    """The 2-shard "before" version of ``four``: s0 owns [0, 512), s1 [512, 1024)."""
    before = copy.deepcopy(four)
    before["shards"] = {
        "s0": {**four["shards"]["s0"], "slots": [[0, 512]]},
        "s1": {**four["shards"]["s1"], "slots": [[512, 1024]]},
    }
    return before


def apply_schema(doc: dict[str, Any]) -> None:
    """The schema (every table of ``doc``) applied on ``doc``'s shards."""
    topology = Topology(config_from_dict(doc))
    engines = ShardEngines(topology)
    try:
        apply(topology, engines).raise_for_errors()
    finally:
        engines.dispose()


@contextlib.contextmanager
def build_cluster(
    shard_databases: Path,
    sandbox: Any,
    directory: Path,
    prefix: str,
    meta: dict[str, Any] | None = None,
) -> Iterator[Cluster]:
    """Fresh databases ``<prefix>_s0`` .. ``<prefix>_s3`` and ``<prefix>_meta``, the schema on
    s0 and s1, the 2-shard version pushed; the databases are dropped afterwards."""
    four = yaml.safe_load(shard_databases.read_text())
    meta_url = fresh_database(sandbox.shards[0].url, f"{prefix}_meta")
    four["meta"] = {"url": meta_url, **(META if meta is None else meta)}
    for name in four["shards"]:
        four["shards"][name]["primary"] = fresh_database(
            four["shards"][name]["primary"], f"{prefix}_{name}"
        )
    before = two_shards(four)
    after = copy.deepcopy(four)
    after["shards"]["s0"]["slots"] = [[0, 256]]
    after["shards"]["s2"]["slots"] = [[256, 512]]
    after["shards"]["s1"]["slots"] = [[512, 768]]
    after["shards"]["s3"]["slots"] = [[768, 1024]]
    apply_schema(before)
    store = MetaStore(meta_url)
    store.init()
    store.push(before, expected=None, comment="2 shards")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "topology.yaml"
    path.write_text(yaml.safe_dump(before))
    after_path = directory / "after.yaml"
    after_path.write_text(yaml.safe_dump(after))
    try:
        yield Cluster(before, after, four, store, path, after_path, meta_url, prefix)
    finally:
        store.close()
        for url in [meta_url, *(s["primary"] for s in four["shards"].values())]:
            with contextlib.suppress(Exception):
                drop_database(url)


# -- the review tests' clusters -----------------------------------------------------------------


@dataclass
class ReviewCluster:
    """A review test's cluster: fresh databases ``<prefix>_<tag>_s0`` .. ``_s3`` and
    ``<prefix>_<tag>_meta``, the schema on s0 and s1, a meta store holding the 2-shard
    "before" version (s0 [0, 512), s1 [512, 1024)); s2 and s3 are defined for plans that add
    them. No follower routers: ``router()`` is a plain Router on the store's current version.
    ``engines`` are plain SQLAlchemy engines per shard (not ShardEngines, unlike Cluster)."""

    store: MetaStore
    four: dict[str, Any]
    """Every shard's definition (s0..s3) with its own fresh database."""
    before: dict[str, Any]
    meta_url: str
    tag: str
    engines: dict[str, Engine] = field(default_factory=dict)

    def engine(self, shard: str) -> Engine:
        if shard not in self.engines:
            self.engines[shard] = create_engine(self.four["shards"][shard]["primary"])
        return self.engines[shard]

    def current(self) -> dict[str, Any]:
        """The meta store's current document, without its ``meta:``."""
        found = self.store.current()
        assert found is not None
        doc = copy.deepcopy(dict(found.document))
        doc.pop("meta", None)
        return doc

    def topology(self) -> Topology:
        return Topology(config_from_dict(self.current()))

    def router(self, **options: Any) -> Router:
        """A plain router on the store's current version (not a follower)."""
        return Router(self.topology(), **options)

    def move(self, slots: tuple[int, int], to: str, migration_id: str) -> None:
        """Plan and store a migration of ``slots`` to ``to`` (new shards defined from four)."""
        found = self.store.current()
        assert found is not None
        new = {to: self.four["shards"][to]} if to not in found.document["shards"] else {}
        plan = plan_move(
            found.document, slots, to, new, base_version=found.version, migration_id=migration_id
        )
        state.create(self.store, plan)

    def run(self, migration: str, *actions: str, **options: Any) -> None:
        """``actions`` of ``migration`` in one Workflow (``options``: its Options)."""
        with Workflow(self.store, migration, Options(**options)) as flow:
            for action in actions:
                flow.act(action)

    def rows(self, shard: str, sql: str) -> list[tuple[Any, ...]]:
        with self.engine(shard).connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

    def raw(self, shard: str, *statements: str) -> None:
        """Statements run on ``shard`` directly, bypassing the router (a legacy writer)."""
        with self.engine(shard).begin() as conn:
            conn.exec_driver_sql("SET SESSION sql_mode = ''")
            for statement in statements:
                conn.exec_driver_sql(statement)


MakeReviewCluster = Callable[..., ReviewCluster]
"""``make(tag, tables=None, ddl=(), pool=None)``: see review_clusters."""


@contextlib.contextmanager
def review_clusters(
    shard_databases: Path, sandbox: Any, prefix: str
) -> Iterator[MakeReviewCluster]:
    """A factory of ReviewClusters on the sandbox's servers; every database it created is
    dropped afterwards. ``prefix`` names the databases (``<prefix>_<tag>_s0`` ...): one per
    test module, as all modules share the session's servers.

    ``make(tag, tables=None, ddl=(), pool=None)``: ``tables`` are added to the document's
    ``tables:``; ``ddl`` (a statement or several) runs on each of the four databases before
    the schema is applied; ``pool`` becomes every shard's ``pool:``."""
    clusters: list[ReviewCluster] = []
    urls: list[str] = []

    def make(
        tag: str,
        tables: dict[str, Any] | None = None,
        ddl: str | Sequence[str] = (),
        pool: dict[str, Any] | None = None,
    ) -> ReviewCluster:
        statements = (ddl,) if isinstance(ddl, str) else tuple(ddl)
        four = yaml.safe_load(shard_databases.read_text())
        four.pop("meta", None)
        four["tables"].update(tables or {})
        meta_url = fresh_database(sandbox.shards[0].url, f"{prefix}_{tag}_meta")
        urls.append(meta_url)
        for name in four["shards"]:
            url = fresh_database(four["shards"][name]["primary"], f"{prefix}_{tag}_{name}")
            urls.append(url)
            four["shards"][name]["primary"] = url
            if pool is not None:
                four["shards"][name]["pool"] = dict(pool)
            if statements:
                engine = create_engine(url)
                try:
                    with engine.begin() as conn:
                        for statement in statements:
                            conn.exec_driver_sql(statement)
                finally:
                    engine.dispose()
        before = two_shards(four)
        apply_schema(before)
        store = MetaStore(meta_url)
        clusters.append(ReviewCluster(store, four, before, meta_url, tag))
        store.init()
        store.push(before, expected=None, comment="2 shards")
        return clusters[-1]

    try:
        yield make
    finally:
        for cluster in clusters:
            for engine in cluster.engines.values():
                engine.dispose()
            cluster.store.close()
        for url in urls:
            drop_database(url)


def values_in(topology: Topology, table: str, lo: int, hi: int, n: int, values: Any) -> list[Any]:
    """The first ``n`` of ``values`` whose slots (of ``table``) lie in [lo, hi)."""
    found: list[Any] = []
    for v in values:
        if lo <= topology.slot_for(table, v) < hi:
            found.append(v)
            if len(found) == n:
                break
    assert len(found) == n
    return found


def users_in(topology: Topology, lo: int, hi: int, n: int, start: int = 1) -> list[int]:
    """``n`` user ids from ``start`` whose slots lie in [lo, hi)."""
    return values_in(topology, "users", lo, hi, n, range(start, 10**6))


def add_users(router: Router, users: list[int], name: str = "v0") -> None:
    """``users`` inserted through ``router`` (email ``u<id>@example.com``, ``name``)."""
    for u in users:
        router.execute(
            "INSERT INTO users (user_id, email, name) VALUES (:u, :e, :n)",
            {"u": u, "e": f"u{u}@example.com", "n": name},
        )


# -- what the shards hold ---------------------------------------------------------------------


@dataclass(frozen=True)
class Held:
    """One row on one shard: where it is and which slot it belongs to."""

    table: str
    shard: str
    physical: str
    slot: int
    row: tuple[Any, ...]


def held_rows(cluster: Cluster, shards: Iterable[str] | None = None) -> list[Held]:
    """Every row of TABLES on ``shards`` (default: all four), with its slot."""
    slots = cluster.slots
    engines = cluster.engines()
    out: list[Held] = []
    try:
        for shard in shards if shards is not None else cluster.four["shards"]:
            with engines.primary(shard).connect() as conn:  # type: ignore[arg-type]
                present = {r[0] for r in conn.execute(text("SHOW TABLES"))}
                for table, columns in TABLES.items():
                    key = columns.index(SHARD_COLUMN[table])
                    for physical in slots.table(table).physical_names:
                        if physical not in present:
                            continue  # a target before start: no schema yet
                        for row in conn.execute(
                            text(f"SELECT {', '.join(columns)} FROM {physical}")
                        ):
                            value = tuple(row)
                            slot = slots.slot_for(table, value[key])
                            out.append(Held(table, shard, physical, slot, value))
    finally:
        engines.dispose()
    return out


def in_ranges(slot: int, ranges: Iterable[tuple[int, int]]) -> bool:
    return any(start <= slot < end for start, end in ranges)


def owned(cluster: Cluster, topology: Topology | None = None) -> tuple[Rows, list[str]]:
    """The rows each shard holds of the slots it owns in ``topology`` (default: the current
    version), per table, and the rows in the wrong physical table of their slot."""
    topology = topology or cluster.current()
    rows: Rows = {t: Counter() for t in TABLES}
    misplaced: list[str] = []
    for held in held_rows(cluster, [str(s) for s in topology.shards]):
        if topology.shard_of_slot(held.slot) != held.shard:  # type: ignore[arg-type]
            continue
        rows[held.table][held.row] += 1
        if cluster.slots.table(held.table).physical(held.slot) != held.physical:
            misplaced.append(f"{held.table} {held.row[:2]} in {held.physical}")
    return rows, misplaced


def outside_owner(cluster: Cluster, topology: Topology | None = None) -> list[Held]:
    """Rows on a shard that does not own their slot (in ``topology``, default current)."""
    topology = topology or cluster.current()
    return [
        h
        for h in held_rows(cluster)
        if topology.shard_of_slot(h.slot) != h.shard  # type: ignore[comparison-overlap]
    ]


def triggers(cluster: Cluster) -> dict[str, list[str]]:
    """The journal triggers left on each of the four shards (empty lists when clean)."""
    engines = cluster.engines()
    try:
        return {
            shard: journal.installed_triggers(engines.primary(shard))  # type: ignore[arg-type]
            for shard in cluster.four["shards"]
        }
    finally:
        engines.dispose()


# -- the oracle ---------------------------------------------------------------------------------


@dataclass
class Statement:
    sql: str
    params: dict[str, Any]
    acked: bool


def read_ledger(path: Path) -> list[Statement]:
    """A ledger's statements in order. Lines ``{"sql", "params"}`` are acknowledged writes
    (reshard_load.Ledger); ``{"sql", "params", "intent": true}`` is a statement about to run,
    acknowledged by the next line ``{"ack": true}`` (IntentLedger). A process killed mid-line
    leaves a torn last line: ignored (its statement was not acknowledged)."""
    out: list[Statement] = []
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("ack"):
            assert out and not out[-1].acked, f"{path}: an ack without its intent"
            out[-1].acked = True
        else:
            out.append(Statement(entry["sql"], entry["params"], not entry.get("intent")))
    unacked = [i for i, s in enumerate(out) if not s.acked]
    assert unacked in ([], [len(out) - 1]), f"{path}: unacknowledged statements {unacked}"
    return out


def oracle_rows(oracle_server: str, statements: Iterable[Statement], database: str) -> Rows:
    """``statements`` replayed on a fresh database of the oracle server: the rows of
    BASE_TABLES, and the lookup rows the router must keep for them."""
    url = fresh_database(oracle_server, database)
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in SCHEMA.read_text().split(";"):
                if "CREATE TABLE" in statement:
                    conn.execute(text(statement))
            for s in statements:
                conn.execute(text(s.sql), s.params)
        with engine.connect() as conn:
            rows: Rows = {
                t: Counter(tuple(r) for r in conn.execute(text(f"SELECT {', '.join(c)} FROM {t}")))
                for t, c in BASE_TABLES.items()
            }
    finally:
        engine.dispose()
        drop_database(url)
    rows["merchant_orders"] = Counter({(r[2], r[0], r[1]): n for r, n in rows["orders"].items()})
    rows["user_emails"] = Counter({(r[1], r[0]): n for r, n in rows["users"].items()})
    return rows


def ledgers(directory: Path) -> list[Path]:
    return sorted(directory.glob("ledger-*.jsonl"))


def acked(paths: Iterable[Path]) -> list[Statement]:
    return [s for p in paths for s in read_ledger(p) if s.acked]


def differences(actual: Rows, expected: Rows, tables: Iterable[str] = TABLES) -> list[str]:
    """What ``actual`` lost and has extra against ``expected``, per table (empty: equal)."""
    out: list[str] = []
    for table in tables:
        lost = expected[table] - actual[table]
        extra = actual[table] - expected[table]
        if lost or extra:
            out.append(f"{table}: lost {sorted(lost)[:5]}, extra {sorted(extra)[:5]}")
    return out


def lost_rows(actual: Rows, expected: Rows) -> list[str]:
    """The rows of ``expected`` that ``actual`` lacks, per table (lookup rows included; their
    extras, orphans, are left to the caller: checked last, see orphans)."""
    return [
        f"{t}: lost {sorted(expected[t] - actual[t])[:5]}"
        for t in TABLES
        if expected[t] - actual[t]
    ]


def orphans(actual: Rows, expected: Rows) -> list[str]:
    """Lookup rows without their owner (DELETE's lookup cleanup that gave up)."""
    return [
        f"{t}: orphans {sorted(actual[t] - expected[t])[:5]}"
        for t in LOOKUP_TABLES
        if actual[t] - expected[t]
    ]


def select_slots(rows: Rows, cluster: Cluster, ranges: Iterable[tuple[int, int]]) -> Rows:
    """The rows of ``rows`` whose slot is in ``ranges``."""
    ranges = list(ranges)
    slots = cluster.slots
    out: Rows = {}
    for table, counter in rows.items():
        key = TABLES[table].index(SHARD_COLUMN[table])
        out[table] = Counter(
            {r: n for r, n in counter.items() if in_ranges(slots.slot_for(table, r[key]), ranges)}
        )
    return out


# -- writers ------------------------------------------------------------------------------------


class IntentLedger(Ledger):
    """A ledger that records each statement before it runs and its acknowledgement after
    (both flushed): a process killed in between leaves one statement that may or may not have
    committed, and no other doubt."""

    def intent(self, sql: str, params: dict[str, Any]) -> None:
        self._file.write(json.dumps({"sql": sql, "params": params, "intent": True}) + "\n")
        self._file.flush()

    def ack(self) -> None:
        self._file.write('{"ack": true}\n')
        self._file.flush()


@dataclass
class Outcomes:
    """What one writer thread met: refusals it retried (nothing ran), and when."""

    held: int = 0
    fenced: int = 0
    fenced_at: list[float] = field(default_factory=list)
    """time.time() of each FencedError (not a hold)."""
    ok_after_fence: list[tuple[float, int]] = field(default_factory=list)
    """(time.time(), the router's version) of the first write acknowledged after fences."""


class RetryingWriter(Writer):
    """reshard_load's workload, each statement recorded before it runs and acknowledged after;
    a statement refused with nothing run (SwitchHoldError: held past hold_s; FencedError: the
    router's lease lapsed) is retried, counted. ``busy`` (a shared int) is 1 while a statement
    runs: a test pauses the process only between statements. ``pace_s`` between operations."""

    def __init__(self, *args: Any, busy: Any = None, pace_s: float = 0.0, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.busy = busy
        self.pace_s = pace_s
        self.outcomes = Outcomes()

    def _attempt(self, fn: Any) -> None:
        from shardrouter.errors import FencedError, SwitchHoldError

        deadline = time.monotonic() + 120
        fenced = False
        while True:
            try:
                fn()
            except SwitchHoldError:
                self.outcomes.held += 1
            except FencedError:
                self.outcomes.fenced += 1
                self.outcomes.fenced_at.append(time.time())
                fenced = True
            else:
                if fenced:
                    self.outcomes.ok_after_fence.append((time.time(), self.router.version))
                return
            if time.monotonic() > deadline:
                raise TimeoutError("writes refused for 120 s")
            time.sleep(0.01)

    def _mark(self, value: int) -> None:
        if self.busy is not None:
            self.busy.value = value

    def run(self, sql: str, params: dict[str, Any]) -> None:
        self._mark(1)
        try:
            self.ledger.intent(sql, params)  # type: ignore[attr-defined]
            self._attempt(lambda: self.router.execute(sql, params))
            self.ledger.ack()  # type: ignore[attr-defined]
        finally:
            self._mark(0)

    def explicit(self) -> None:
        from reshard_load import RENAME_USER

        user = self.rng.choice(self.users)
        params = {"n": f"renamed {self.rng.randrange(10**6)}", "u": user}

        def block() -> None:
            with self.router.connection(user_id=user) as conn:
                conn.execute(text(RENAME_USER), params)

        self._mark(1)
        try:
            self.ledger.intent(RENAME_USER, params)  # type: ignore[attr-defined]
            self._attempt(block)
            self.ledger.ack()  # type: ignore[attr-defined]
        finally:
            self._mark(0)

    def step(self) -> None:
        super().step()
        if self.pace_s:
            time.sleep(self.pace_s)


def retrying_writer_process(
    topology_path: str,
    ledger_dir: str,
    index: int,
    threads: int,
    stop_file: str,
    seed: int,
    busy: Any = None,
    pace_s: float = 0.0,
) -> None:
    """A process with its own Router following the meta store; ``threads`` RetryingWriters
    (users and id workers of ``index``) until ``stop_file`` exists. Errors go to
    ``errors-<index>.txt``, outcomes to ``stats-<index>.json``; ``ready-<index>`` appears once
    every thread wrote its users."""
    import logging

    from shardrouter.engine.router import Router

    directory = Path(ledger_dir)
    logging.basicConfig(  # the router's warnings (lookup rows left behind...), for diagnosis
        filename=directory / f"log-{index}.txt",
        level=logging.WARNING,
        format="%(created).3f %(name)s %(levelname)s %(message)s",
    )
    router = Router.load(topology_path)
    errors = directory / f"errors-{index}.txt"
    lock = threading.Lock()
    writers: list[RetryingWriter] = []
    ready = threading.Barrier(threads + 1)

    def work(t: int) -> None:
        ledger = IntentLedger(directory / f"ledger-{index}-{t}.jsonl")
        writer = RetryingWriter(
            router,
            router.topology.id_layout,
            router.topology,
            ledger,
            first_user=1_000_000 * (index + 1) + 100 * t,
            worker=index * 16 + t,
            seed=seed * 1000 + index * 100 + t,
            busy=busy if t == 0 else None,
            pace_s=pace_s,
        )
        with lock:
            writers.append(writer)
        try:
            writer.setup()
            ready.wait()
            while not Path(stop_file).exists():
                writer.step()
        except BaseException:
            with lock, errors.open("a") as f:
                f.write(f"thread {t}:\n{traceback.format_exc()}\n")
            with contextlib.suppress(threading.BrokenBarrierError):
                ready.abort()
        finally:
            ledger.close()

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    with contextlib.suppress(threading.BrokenBarrierError):
        ready.wait()
        (directory / f"ready-{index}").touch()
    for th in pool:
        th.join()
    stats = {
        "ops": sum(w.ops for w in writers),
        "held": sum(w.outcomes.held for w in writers),
        "fenced": sum(w.outcomes.fenced for w in writers),
        "fenced_at": sorted(t for w in writers for t in w.outcomes.fenced_at),
        "ok_after_fence": sorted(x for w in writers for x in w.outcomes.ok_after_fence),
        "router_held": router.holds.held,
    }
    (directory / f"stats-{index}.json").write_text(json.dumps(stats))
    router.close()


@dataclass
class Writers:
    """Writer processes of a test (spawned), stopped by a file."""

    directory: Path
    processes: list[Any]
    stop_file: Path

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        for i, p in enumerate(self.processes):
            while not (self.directory / f"ready-{p.index}").exists():  # type: ignore[attr-defined]
                errors = self.errors()
                assert not errors, errors
                assert p.is_alive(), f"writer {i} exited with {p.exitcode}"
                assert time.monotonic() < deadline, "writers not ready"
                time.sleep(0.05)

    def stop(self, timeout: float = 60) -> None:
        self.stop_file.touch()
        for p in self.processes:
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(p.pid, signal.SIGCONT)  # a paused one must be able to exit
        for p in self.processes:
            p.join(timeout)
            if p.is_alive():
                p.kill()
                p.join(10)

    def errors(self) -> str:
        return "\n".join(e.read_text() for e in sorted(self.directory.glob("errors-*.txt")))

    def stats(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.directory.glob("stats-*.json"))]

    def ledger_lines(self) -> int:
        total = 0
        for p in ledgers(self.directory):
            with p.open("rb") as f:
                total += sum(1 for _ in f)
        return total


def start_writers(
    cluster: Cluster,
    directory: Path,
    count: int,
    *,
    threads: int = 2,
    seed: int = 20261201,
    first_index: int = 0,
    busy: list[Any] | None = None,
    pace_s: float = 0.0,
) -> Writers:
    """``count`` retrying writer processes (indexes first_index..) on ``cluster``."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    directory.mkdir(parents=True, exist_ok=True)
    stop_file = directory / "stop"
    processes = []
    for i in range(count):
        index = first_index + i
        p = ctx.Process(
            target=retrying_writer_process,
            args=(str(cluster.path), str(directory), index, threads, str(stop_file), seed),
            kwargs={"busy": busy[i] if busy else None, "pace_s": pace_s},
            daemon=True,
        )
        p.index = index  # type: ignore[attr-defined]
        p.start()
        processes.append(p)
    return Writers(directory, processes, stop_file)
