"""The routed ORM session during a resharding switch, on real MariaDB (the session sandbox).

docs/RESHARDING.md: while a switch runs, the routers hold writes to the frozen range. For the
ORM: a flush that meets the switch before anything of the session's transaction ran on any
shard (its first flush, nothing read or written yet) is held like a transaction's first
statement and then written on the new owner; a flush after the transaction already ran
something is refused with SwitchHoldError, nothing of it applied; a hold longer than
``hold_s`` fails typed and writes nothing.

Each test builds its own databases on the sandbox's servers (s0 owns [0, 512), s1 [512,
1024)) and a plain Router; the frozen and switched versions are installed into the router by
hand, as its follower would (no meta store, no runner: the switch is a timer here).
"""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from reshard_cluster import apply_schema, drop_database, fresh_database
from sqlalchemy import BigInteger, Engine, String, create_engine, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import SwitchHoldError
from shardrouter.orm.session import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

NOTES_DDL = (
    "CREATE TABLE oh_notes (id BIGINT PRIMARY KEY, account_id BIGINT NOT NULL,"
    " v VARCHAR(32) NOT NULL)"
)


class Base(DeclarativeBase):
    pass


class User(Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    name: Mapped[str] = mapped_column(String(255))


class Note(Base):
    """A sharded table without lookup rows (oh_notes by account_id)."""

    __tablename__ = "oh_notes"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    account_id: Mapped[int] = mapped_column(BigInteger)
    v: Mapped[str] = mapped_column(String(32))


@dataclass
class Cluster:
    doc: dict[str, Any]
    """The 2-shard version (s0 [0, 512), s1 [512, 1024))."""
    engines: dict[str, Engine] = field(default_factory=dict)

    def topology(self) -> Topology:
        return Topology(config_from_dict(self.doc))

    def rows(self, shard: str, sql: str) -> list[tuple[Any, ...]]:
        if shard not in self.engines:
            self.engines[shard] = create_engine(self.doc["shards"][shard]["primary"])
        with self.engines[shard].connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]

    def everywhere(self, sql: str) -> dict[str, list[tuple[Any, ...]]]:
        return {shard: self.rows(shard, sql) for shard in ("s0", "s1")}


@pytest.fixture
def make_cluster(shard_databases: Path) -> Iterator[Callable[[str], Cluster]]:
    made: list[tuple[Cluster, list[str]]] = []

    def make(tag: str) -> Cluster:
        doc = yaml.safe_load(shard_databases.read_text())
        doc.pop("meta", None)
        doc["tables"]["oh_notes"] = {"column": "account_id", "strategy": "hash"}
        urls: list[str] = []
        shards = {}
        for name, slots in (("s0", [[0, 512]]), ("s1", [[512, 1024]])):
            url = fresh_database(doc["shards"][name]["primary"], f"oh_{tag}_{name}")
            urls.append(url)
            engine = create_engine(url)
            try:
                with engine.begin() as conn:
                    conn.exec_driver_sql(NOTES_DDL)
            finally:
                engine.dispose()
            shards[name] = {**doc["shards"][name], "primary": url, "slots": slots}
        doc["shards"] = shards
        apply_schema(doc)
        cluster = Cluster(doc)
        made.append((cluster, urls))
        return cluster

    try:
        yield make
    finally:
        for cluster, urls in made:
            for engine in cluster.engines.values():
                engine.dispose()
            for url in urls:
                drop_database(url)


def _frozen_and_switched(
    doc: dict[str, Any], slot: int, hold_s: float = 5.0
) -> tuple[Topology, Topology]:
    """(frozen, switched) versions of ``doc`` for ``slot`` moving s0 -> s1, as the workflow
    pushes them (installed by hand into a router, as its follower would)."""
    frozen = copy.deepcopy(doc)
    frozen["moving"] = [
        {
            "slots": [slot, slot + 1],
            "source": "s0",
            "target": "s1",
            "write_mode": "frozen",
            "hold_s": hold_s,
            "migration": "m-hand",
        }
    ]
    switched = copy.deepcopy(frozen)
    start, end = switched["shards"]["s0"]["slots"][0]
    switched["shards"]["s0"]["slots"] = [r for r in ([start, slot], [slot + 1, end]) if r[0] < r[1]]
    switched["shards"]["s1"]["slots"] = [[slot, slot + 1], *switched["shards"]["s1"]["slots"]]
    switched["moving"][0]["write_mode"] = "dual_new_primary"
    return Topology(config_from_dict(frozen)), Topology(config_from_dict(switched))


def _in(topology: Topology, table: str, lo: int, hi: int, n: int, start: int = 1) -> list[int]:
    found = [v for v in range(start, start + 100_000) if lo <= topology.slot_for(table, v) < hi]
    assert len(found) >= n
    return found[:n]


def _email_shard(topology: Topology, email: str) -> str:
    return str(topology.shard_of_slot(topology.slot_for("user_emails", email)))


def _switch_later(router: Router, switched: Topology, after_s: float) -> threading.Timer:
    timer = threading.Timer(after_s, lambda: router._install(switched))
    timer.start()
    return timer


# --------------------------------------------------------------------------- held, then written


def test_orm_first_flush_in_the_frozen_range_is_held_then_written_on_the_new_owner(
    make_cluster: Callable[[str], Cluster],
) -> None:
    c = make_cluster("held")
    router = Router(c.topology())
    try:
        user = _in(router.topology, "users", 0, 512, 1, start=700)[0]  # on s0 before
        frozen, switched = _frozen_and_switched(c.doc, router.topology.slot_for("users", user))
        email = f"Held{user}@Example.com"
        router._install(frozen)
        timer = _switch_later(router, switched, 0.3)
        t0 = time.monotonic()
        try:
            with routed_sessionmaker(router)() as session:
                session.add(User(user_id=user, email=email, name="held"))
                session.commit()
        finally:
            timer.join()
        took = time.monotonic() - t0
        assert took >= 0.25, f"not held: the flush ran after {took:.2f} s, before the switch"
        assert (router.holds.held, router.holds.holding) == (1, 0)

        # Written on the new owner only, its lookup row once, where the e-mail's slot lives.
        users = c.everywhere(f"SELECT user_id, name FROM users WHERE user_id = {user}")
        assert users == {"s0": [], "s1": [(user, "held")]}
        emails = c.everywhere(f"SELECT email FROM user_emails WHERE user_id = {user}")
        where = _email_shard(switched, email)
        assert emails[where] == [(email,)] and sum(len(v) for v in emails.values()) == 1

        # Read back through the ORM: from the target's placement, by key and by lookup.
        with routed_sessionmaker(router)() as session:
            found = session.get(User, user)
            assert found is not None and found.email == email
            assert inspect(found).identity_token == "s1"
        by_email = router.execute(
            "SELECT user_id FROM users WHERE email = :e", {"e": email.lower()}
        ).rows
        assert [tuple(r) for r in by_email] == [(user,)]
    finally:
        router.close()


def test_orm_first_flush_with_lookup_rows_waits_for_any_switch(
    make_cluster: Callable[[str], Cluster],
) -> None:
    """A user outside the frozen range still has a lookup row that lands by its e-mail's
    slot, written in a step of its own: as the router's steps_blind, the flush waits for the
    switch before its first step (and is then written once), instead of failing."""
    c = make_cluster("blind")
    router = Router(c.topology())
    try:
        moving = _in(router.topology, "users", 0, 512, 1, start=900)[0]
        user = _in(router.topology, "users", 512, 1024, 1, start=900)[0]  # on s1, not moving
        frozen, switched = _frozen_and_switched(c.doc, router.topology.slot_for("users", moving))
        router._install(frozen)
        timer = _switch_later(router, switched, 0.3)
        t0 = time.monotonic()
        try:
            with routed_sessionmaker(router)() as session:
                session.add(User(user_id=user, email=f"b{user}@example.com", name="blind"))
                session.commit()
        finally:
            timer.join()
        assert time.monotonic() - t0 >= 0.25
        assert router.holds.held == 1
        assert c.everywhere(f"SELECT user_id FROM users WHERE user_id = {user}") == {
            "s0": [],
            "s1": [(user,)],
        }
        emails = c.everywhere(f"SELECT email FROM user_emails WHERE user_id = {user}")
        assert sum(len(v) for v in emails.values()) == 1
    finally:
        router.close()


# --------------------------------------------------------------------------- refused


@pytest.mark.parametrize("first", ["flush", "read"])
def test_orm_a_later_flush_meeting_the_switch_is_refused_with_nothing_of_it_applied(
    make_cluster: Callable[[str], Cluster], first: str
) -> None:
    """The session's transaction already ran something under the frozen version (a flush of
    a note outside the frozen range, or a read): a flush meeting the switch then is refused at
    once (not held: the switch comes 0.6 s later), typed, and nothing of it is applied, not
    even its rows outside the frozen range or its lookup rows."""
    c = make_cluster(f"later_{first}")
    router = Router(c.topology())
    try:
        topology = router.topology
        a, b_outside = _in(topology, "oh_notes", 512, 1024, 2)  # s1, not moving
        frozen_account = _in(topology, "oh_notes", 0, 512, 1)[0]
        slot = topology.slot_for("oh_notes", frozen_account)
        user = _in(topology, "users", 512, 1024, 1, start=300)[0]  # not moving, but a lookup
        frozen, switched = _frozen_and_switched(c.doc, slot)
        if first == "read":
            router.execute(
                "INSERT INTO oh_notes (id, account_id, v) VALUES (1, :a, 'old')", {"a": a}
            )
        router._install(frozen)
        timer = _switch_later(router, switched, 0.6)
        error: BaseException | None = None
        try:
            with routed_sessionmaker(router)() as session:
                if first == "flush":
                    session.add(Note(id=1, account_id=a, v="first"))
                    t0 = time.monotonic()
                    session.flush()  # outside the frozen range, no lookup rows: not held
                    assert time.monotonic() - t0 < 0.25
                else:
                    read = session.scalars(select(Note).where(Note.account_id == a)).all()
                    assert [n.id for n in read] == [1]  # by key: its one owner, s1
                second = [
                    Note(id=2, account_id=frozen_account, v="frozen"),
                    Note(id=3, account_id=b_outside, v="outside"),
                    User(user_id=user, email=f"l{user}@example.com", name="later"),
                ]
                session.add_all(second)
                t0 = time.monotonic()
                try:
                    session.commit()
                except SwitchHoldError as exc:
                    error = exc
                took = time.monotonic() - t0
                assert error is not None, "the later flush was held and written"
                assert took < 0.4, f"refused only after {took:.2f} s (held?)"
                assert all(obj in session.new for obj in second)  # still pending, unflushed
                # Not even in the transaction: its own connection to s1 sees note 1 alone.
                on_s1 = session.connection(bind_arguments={"shard_id": "s1"}).exec_driver_sql(
                    "SELECT id FROM oh_notes ORDER BY id"
                )
                assert [tuple(r) for r in on_s1] == [(1,)]
                session.rollback()
        finally:
            timer.join()
        assert router.holds.held == 0
        notes = c.everywhere("SELECT id FROM oh_notes ORDER BY id")
        assert notes == {"s0": [], "s1": [(1,)] if first == "read" else []}
        assert c.everywhere(f"SELECT user_id FROM users WHERE user_id = {user}") == {
            "s0": [],
            "s1": [],
        }
        assert c.everywhere(f"SELECT email FROM user_emails WHERE user_id = {user}") == {
            "s0": [],
            "s1": [],
        }
    finally:
        router.close()


def test_orm_a_hold_that_outlasts_hold_s_fails_typed_and_writes_nothing(
    make_cluster: Callable[[str], Cluster],
) -> None:
    c = make_cluster("timeout")
    router = Router(c.topology())
    try:
        user = _in(router.topology, "users", 0, 512, 1, start=1200)[0]
        frozen, switched = _frozen_and_switched(
            c.doc, router.topology.slot_for("users", user), hold_s=0.5
        )
        router._install(frozen)  # the switch never ends
        error: BaseException | None = None
        t0 = time.monotonic()
        with routed_sessionmaker(router)() as session:
            session.add(User(user_id=user, email=f"t{user}@example.com", name="timeout"))
            try:
                session.commit()
            except SwitchHoldError as exc:
                error = exc
            took = time.monotonic() - t0
            assert error is not None
            assert "held" in str(error) and error.slots is not None
            assert 0.45 <= took < 3.0, f"failed after {took:.2f} s (hold_s 0.5)"
            assert (router.holds.held, router.holds.holding) == (1, 0)
            session.rollback()
        assert c.everywhere(f"SELECT user_id FROM users WHERE user_id = {user}") == {
            "s0": [],
            "s1": [],
        }
        assert c.everywhere(f"SELECT email FROM user_emails WHERE user_id = {user}") == {
            "s0": [],
            "s1": [],
        }

        # Nothing is left pinned or queued: after the switch the same write goes through.
        router._install(switched)
        with routed_sessionmaker(router)() as session:
            session.add(User(user_id=user, email=f"t{user}@example.com", name="after"))
            session.commit()
        assert c.everywhere(f"SELECT name FROM users WHERE user_id = {user}") == {
            "s0": [],
            "s1": [("after",)],
        }
    finally:
        router.close()
