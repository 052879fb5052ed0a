"""Review 12: the ORM hold at a resharding switch (RoutedSession.flush) and the movers' typing
of stored sharding/key values, attacked on real MariaDB (the session sandbox). Each test states
what docs/RESHARDING.md / the module docstrings promise and fails while the package breaks it.

The ORM tests build their own databases (s0 owns [0, 512), s1 [512, 1024)) and install the
frozen and switched versions into a plain Router by hand, as its follower would (the switch is
a timer), as tests/integration/test_reshard_orm_hold.py does.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from orm_hold_cluster import Cluster, Note, User, hold_clusters
from orm_hold_cluster import frozen_and_switched as _frozen_and_switched
from orm_hold_cluster import switch_later as _switch_later
from orm_hold_cluster import values_in_slots as _in
from reshard_cluster import (
    MakeReviewCluster,
    ReviewCluster,
    review_clusters,
)
from sqlalchemy import select

from shardrouter.engine.router import Router
from shardrouter.errors import ReshardDataError
from shardrouter.orm.session import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]


@pytest.fixture
def make_cluster(shard_databases: Path) -> Iterator[Callable[[str], Cluster]]:
    with hold_clusters(shard_databases, "rv12") as make:
        yield make


# --------------------------------------------------------------------------- ORM hold


def test_rv12_orm_autoflush_held_by_a_query_then_the_query_reads_the_old_owner(
    make_cluster: Callable[[str], Cluster],
) -> None:
    """A query's autoflush is the transaction's first flush and meets the frozen range: it is
    held and written on the new owner (s1). The query itself must then read under the same
    (new) version as the flush it triggered: it should see the note just flushed, and the
    moved row's current image on s1, not the source's stale copy.

    What happens: RoutedSession._on_execute plans the SELECT (placement s0, the frozen
    version's owner) before SQLAlchemy runs the autoflush inside invoke_statement; the held
    flush re-pins the session to the switched version, but the already-planned SELECT still
    runs on s0: it misses the note it has just flushed and returns the source's stale copy."""
    c = make_cluster("aflush")
    router = Router(c.topology())
    try:
        account = _in(router.topology, "oh_notes", 0, 512, 1, start=40)[0]  # on s0 before
        frozen, switched = _frozen_and_switched(
            c.doc, router.topology.slot_for("oh_notes", account)
        )
        # Note 1 was copied to s1 (the switch's copy); the source keeps its copy until
        # finalize. After the switch only s1's image is current: make the two differ.
        c.raw("s0", f"INSERT INTO oh_notes VALUES (1, {account}, 'stale')")
        c.raw("s1", f"INSERT INTO oh_notes VALUES (1, {account}, 'current')")
        router._install(frozen)
        timer = _switch_later(router, switched, 0.3)
        try:
            with routed_sessionmaker(router)() as session:
                session.add(Note(id=2, account_id=account, v="new"))
                found = session.scalars(
                    select(Note).where(Note.account_id == account).order_by(Note.id)
                ).all()
                seen = [(n.id, n.v) for n in found]
                session.commit()
        finally:
            timer.join()
        assert router.holds.held == 1  # the autoflush was held, then written
        assert c.everywhere("SELECT id, v FROM oh_notes WHERE id = 2") == {
            "s0": [],
            "s1": [(2, "new")],
        }
        assert seen == [(1, "current"), (2, "new")], (
            f"the query that autoflushed read {seen}: planned on the frozen version's owner s0"
            " before its held autoflush re-pinned the session to the switched version"
        )
    finally:
        router.close()


def test_rv12_orm_session_get_of_an_object_just_added_returns_none_after_its_held_autoflush(
    make_cluster: Callable[[str], Cluster],
) -> None:
    """The same defect through session.get(): a user added then looked up by its key in the
    same unit of work. get() autoflushes (held: its first flush meets the switch, written on
    s1), then loads by the key on the placement planned before the hold (s0) and returns None
    for an object the session has just written; expected: the added object itself."""
    c = make_cluster("aget")
    router = Router(c.topology())
    try:
        user = _in(router.topology, "users", 0, 512, 1, start=700)[0]
        frozen, switched = _frozen_and_switched(c.doc, router.topology.slot_for("users", user))
        router._install(frozen)
        timer = _switch_later(router, switched, 0.3)
        try:
            with routed_sessionmaker(router)() as session:
                added = User(user_id=user, email=f"g{user}@example.com", name="got")
                session.add(added)
                got = session.get(User, user)
                session.commit()
        finally:
            timer.join()
        assert router.holds.held == 1
        assert c.everywhere(f"SELECT user_id FROM users WHERE user_id = {user}") == {
            "s0": [],
            "s1": [(user,)],
        }
        assert got is added, f"session.get() of the user just added gave {got!r}"
    finally:
        router.close()


# --------------------------------------------------------------------------- key typing


@pytest.fixture
def make_review_cluster(shard_databases: Path, sandbox: Any) -> Iterator[MakeReviewCluster]:
    with review_clusters(shard_databases, sandbox, "rv12") as make:
        yield make


def test_rv12_char_key_with_trailing_spaces_is_moved_by_the_stripped_value_and_lost(
    make_review_cluster: MakeReviewCluster,
) -> None:
    """A str sharding key (hash, no fold_case) in a CHAR column: the router routes the value
    the service gives, 'K7 ' with its trailing space, but MariaDB gives a CHAR back without
    its trailing spaces, so the movers route 'K7' (spec.routed_value returns the str as the
    driver read it). A row whose two values route to different sides of the move is placed
    where the router never looks for it: copied away when only the stripped value moves (and
    deleted from the source at finalize), or left behind when only the given value moves.

    Oracle: every code is readable through the router by the value it was inserted with,
    after the switch and after finalize; expected as before the migration."""
    tables = {"rv12_codes": {"column": "code", "type": "str", "strategy": "hash"}}
    c: ReviewCluster = make_review_cluster(
        "char",
        tables,
        "CREATE TABLE rv12_codes (id BIGINT NOT NULL PRIMARY KEY, code CHAR(16) NOT NULL,"
        " v INT NOT NULL) DEFAULT CHARSET=utf8mb4",
    )
    topology = c.topology()

    def moves(value: str) -> bool:  # s0's slots [0, 128) move to s2
        return topology.slot_for("rv12_codes", value) < 128

    def stays(value: str) -> bool:  # s0's slots [128, 512) stay
        return 128 <= topology.slot_for("rv12_codes", value) < 512

    candidates = [f"K{i} " for i in range(5000)]
    away = [v for v in candidates if moves(v.rstrip()) and stays(v)][:3]  # copied away
    behind = [v for v in candidates if moves(v) and stays(v.rstrip())][:3]  # left behind
    assert len(away) == 3 and len(behind) == 3
    codes = away + behind
    router = c.router()
    try:
        for i, code in enumerate(codes):
            router.execute(
                "INSERT INTO rv12_codes (id, code, v) VALUES (:i, :c, :v)",
                {"i": i + 1, "c": code, "v": i + 1},
            )
        before = _codes_read(router, codes)
    finally:
        router.close()
    assert before == {code: i + 1 for i, code in enumerate(codes)}  # the router finds them all

    c.move((0, 128), "s2", "m-char")
    try:
        c.run("m-char", "start")
    except ReshardDataError as exc:  # the fix: refused before anything moved, typed
        assert "is CHAR" in str(exc) and "fold_case" in str(exc), exc
        assert _codes_read_on(c, codes) == before
        return
    c.run("m-char", "copy", "verify", "switch")
    after_switch = _codes_read_on(c, codes)
    c.run("m-char", "finalize")
    after_finalize = _codes_read_on(c, codes)
    assert (after_switch, after_finalize) == (before, before), (
        f"after the switch the router reads {after_switch}, after finalize {after_finalize};"
        f" before the migration {before} (copied away: {away}, left behind: {behind})"
    )


def _codes_read(router: Router, codes: list[str]) -> dict[str, int]:
    found = {}
    for code in codes:
        rows = router.execute("SELECT v FROM rv12_codes WHERE code = :c", {"c": code}).rows
        if rows:
            found[code] = int(rows[0][0])
    return found


def _codes_read_on(c: ReviewCluster, codes: list[str]) -> dict[str, int]:
    router = c.router()
    try:
        return _codes_read(router, codes)
    finally:
        router.close()
