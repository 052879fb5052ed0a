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

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from orm_hold_cluster import Cluster, Note, User, hold_clusters
from orm_hold_cluster import email_shard as _email_shard
from orm_hold_cluster import frozen_and_switched as _frozen_and_switched
from orm_hold_cluster import switch_later as _switch_later
from orm_hold_cluster import values_in_slots as _in
from sqlalchemy import inspect, select

from shardrouter.engine.router import Router
from shardrouter.errors import SwitchHoldError
from shardrouter.orm.session import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


@pytest.fixture
def make_cluster(shard_databases: Path) -> Iterator[Callable[[str], Cluster]]:
    with hold_clusters(shard_databases, "oh") as make:
        yield make


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
