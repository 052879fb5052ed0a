"""Review 8u of commit 827dc23 (the ORM parts): _Routing._refused, the cache of the
RoutingError of a class a routing cannot map (re-raised with ``with_traceback(None)``);
_listen's ``registry.configure()`` when reading the registry's mappers raises
UnmappedClassError; _sharding_value re-raising SQLAlchemy's error when the remembered marker
is known. Attacked for: a class refused once and routable later in the same routing; the
cached exception object shared between callers and threads; configure() called from inside a
flush or a load; untyped errors in ordinary use. SQLite cluster of control_cluster (no
MariaDB).

Findings (these tests failed on 827dc23; all fixed: a refusal is cached as its class and
arguments and raised anew each time, only for reasons fixed for the version (a table not in
the topology, not one table); the registry is configured with cascade=True):

- the cached exception is one object shared by every caller of a routing (every session and
  thread of a topology version): two threads refused at once catch the same instance, and the
  second raise rewrites the traceback the first thread is holding (with_traceback(None));
- that object keeps the ``__traceback__`` of its last raise: the frames of the last refused
  caller (its session, its statement) stay alive for the life of the topology version;
- and it keeps the ``__context__`` of its first raise inside an except block: a later,
  unrelated caller's refusal reports "During handling of the above exception" with another
  request's exception;
- a class refused because its sharding column is not mapped stays refused in that routing
  after the column is appended to it (SQLAlchemy's documented ``Cls.col = mapped_column()``
  on a declarative class): before 827dc23 the next use routed it;
- _listen's ``registry.configure()`` is cascade=False: a registry holding an unconfigured
  AbstractConcreteBase whose classes have a relationship to a class of another registry
  raises sqlalchemy's InvalidRequestError ("configure was called with cascade=False but
  additional registries remain") from the first session.get(); plain Session.get works
  (SQLAlchemy's own _check_configure uses cascade=True).

The other tests are guards of attacks that held.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import traceback
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from control_cluster import document, user_in_slots
from sqlalchemy import BigInteger, Column, ForeignKey, MetaData, String, Table, inspect, select
from sqlalchemy.ext.declarative import AbstractConcreteBase
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import RoutingError
from shardrouter.orm.session import RoutedSession

pytestmark = pytest.mark.timeout(120)

_PLAIN = MetaData()
Table(
    "pages",
    _PLAIN,
    Column("page_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger),
    Column("body", String(64)),
)
Table(
    "tags",
    _PLAIN,
    Column("tag_id", BigInteger, primary_key=True, autoincrement=False),
    Column("page_id", BigInteger),
    Column("user_id", BigInteger),
)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Router, Path]]:
    raw = document(tmp_path)
    raw["tables"]["pages"] = {"column": "user_id", "strategy": "hash"}
    raw["tables"]["tags"] = {"column": "user_id", "strategy": "hash"}
    store = MetaStore(raw["meta"]["url"])
    store.init()
    store.push(raw, expected=None, comment="v1")
    router = Router.from_config(config_from_dict(raw))
    for engine in router.engines.primaries.values():
        _PLAIN.create_all(engine)
    try:
        yield router, tmp_path
    finally:
        router.close()
        store.close()


def _unroutable() -> type:
    """A class mapping table pages without its sharding column: refused by the routing."""

    class Base(DeclarativeBase):
        pass

    class Bare(Base):
        __tablename__ = "pages"
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        body: Mapped[str | None] = mapped_column(String(64))

    return Bare


# -- findings --------------------------------------------------------------------------------


def test_two_threads_refused_at_once_do_not_share_one_exception_object(
    app: tuple[Router, Path],
) -> None:
    """Thread A's session.get(Bare) is refused (the routing builds and caches the error); then
    thread B's is refused from the cache: the same object, re-raised with
    with_traceback(None). A still holds it (a logger formatting it, an error handler): its
    traceback is now B's (B's frames, not A's). Fix: cache the message (or the class and
    args) and raise a new exception each time, e.g. ``raise type(exc)(*exc.args)``."""
    router, _ = app
    bare = _unroutable()
    caught: dict[str, BaseException] = {}
    a_caught = threading.Event()

    def worker_a() -> None:
        with RoutedSession(router) as session:
            try:
                session.get(bare, 1)
            except RoutingError as exc:
                caught["a"] = exc
        a_caught.set()

    def worker_b() -> None:
        a_caught.wait(10)
        with RoutedSession(router) as session:
            try:
                session.get(bare, 1)
            except RoutingError as exc:
                caught["b"] = exc

    threads = [threading.Thread(target=worker_a), threading.Thread(target=worker_b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(caught) == {"a", "b"}, caught
    a_frames = [f.name for f in traceback.extract_tb(caught["a"].__traceback__)]
    assert caught["a"] is not caught["b"], "one exception object raised in both threads"
    assert "worker_a" in a_frames, f"thread A's exception now carries B's traceback: {a_frames}"


def test_a_refusal_does_not_keep_the_refused_session_alive(app: tuple[Router, Path]) -> None:
    """The cached exception keeps the __traceback__ of its last raise (the first, then each
    re-raise's): its frames hold the refused caller's locals, the RoutedSession (and the
    ORMExecuteState of a select) included, for as long as the topology version's routing
    lives. Here a closed session, dropped by its caller, stays reachable through
    routing._refused. (Control: the same without a refusal is collected.) Fix: cache no
    exception object (raise a new one each time), or strip its traceback before caching."""
    router, _ = app
    bare = _unroutable()

    def refused_session() -> weakref.ref[RoutedSession]:
        session = RoutedSession(router)
        with contextlib.suppress(RoutingError):
            session.get(bare, 1)
        session.close()
        return weakref.ref(session)

    def plain_session() -> weakref.ref[RoutedSession]:
        session = RoutedSession(router)
        session.get(inspect(_routable()).class_, 1)
        session.close()
        return weakref.ref(session)

    control = plain_session()
    gc.collect()
    assert control() is None, "control: a closed session is collected"
    ref = refused_session()
    ref2 = refused_session()  # a re-raise: its frames replace the first's
    gc.collect()
    assert ref() is None and ref2() is None, "a refused session stays alive (routing._refused)"


def test_a_refusal_does_not_carry_another_callers_exception_as_its_context(
    app: tuple[Router, Path],
) -> None:
    """The first refusal raised while its caller handled another exception (a fallback path,
    an error handler) gets that exception as __context__; the cached object keeps it, and
    every later refusal (another request, no exception being handled) reports it: "During
    handling of the above exception, another exception occurred" with the first request's
    KeyError (its message and frames). Fix: raise a new exception per refusal."""
    router, _ = app
    bare = _unroutable()
    with RoutedSession(router) as session:
        try:
            raise KeyError("request 1: cache miss for customer 4711")
        except KeyError:
            with pytest.raises(RoutingError):
                session.get(bare, 1)
    with RoutedSession(router) as session, pytest.raises(RoutingError) as info:
        session.get(bare, 1)
    assert info.value.__context__ is None, repr(info.value.__context__)


def test_a_class_whose_sharding_column_is_appended_later_is_routed_then(
    app: tuple[Router, Path],
) -> None:
    """Page first maps pages without user_id: session.get(Page, 1) is refused (RoutingError,
    correct). Then the column is appended to the class (SQLAlchemy documents
    ``Cls.attr = mapped_column(...)`` on a declarative class: it adds the column to the table
    and the property to the mapper). The routing still refuses Page with the cached error
    until the topology version changes (before 827dc23 it rebuilt and routed). Fix: cache
    the refusal with what it depended on (e.g. the mapper's ``_columntoproperty`` size or
    the selectable's column count) and rebuild when it changed, or cache only refusals that
    cannot change (not one table, unknown table)."""
    router, _ = app
    user = user_in_slots(router, 0, 256)
    router.execute("INSERT INTO pages (page_id, user_id, body) VALUES (1, :u, 'b')", {"u": user})

    class Base(DeclarativeBase):
        pass

    class Page(Base):
        __tablename__ = "pages"
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        body: Mapped[str | None] = mapped_column(String(64))

    with RoutedSession(router) as session, pytest.raises(RoutingError):
        session.get(Page, 1)
    Page.user_id = mapped_column(BigInteger)  # type: ignore[attr-defined]
    assert "user_id" in Page.__table__.c
    with RoutedSession(router) as session:
        try:
            page = session.get(Page, 1)
            outcome = page.body if page is not None else None
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {exc}"
    assert outcome == "b", outcome


def test_the_first_get_with_an_abstract_concrete_base_and_a_cross_registry_relationship(
    app: tuple[Router, Path],
) -> None:
    """Registry A: an AbstractConcreteBase (mapped at configure) and Page, which has a
    relationship to Tag of registry B. Nothing configured yet (a fresh process).
    session.get(Page, 1): _choose_identity -> mapped -> _listen -> registry.mappers raises
    UnmappedClassError -> ``mapper.registry.configure()`` (cascade=False): configuring Page's
    relationship makes A depend on B, and SQLAlchemy raises InvalidRequestError "configure
    was called with cascade=False but additional registries remain" (untyped, from the first
    get). Plain Session.get works: SQLAlchemy's own _check_configure passes cascade=True.
    Fix: ``registry.configure(cascade=True)`` (as SQLAlchemy does), or scan only the mapped
    managers (``m.mapper for m in registry._managers if m.is_mapped``) and configure not at
    all."""
    router, _ = app
    user = user_in_slots(router, 0, 256)
    router.execute("INSERT INTO pages (page_id, user_id, body) VALUES (1, :u, 'b')", {"u": user})

    class BaseB(DeclarativeBase):
        pass

    class Tag(BaseB):
        __tablename__ = "tags"
        tag_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        page_id: Mapped[int] = mapped_column(BigInteger)
        user_id: Mapped[int] = mapped_column(BigInteger)

    class BaseA(DeclarativeBase):
        pass

    class Thing(AbstractConcreteBase, BaseA):
        strict_attrs = True
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)

    class Page(Thing):
        __tablename__ = "pages"
        body: Mapped[str | None] = mapped_column(String(64))
        tags: Mapped[list[Tag]] = relationship(
            Tag,
            primaryjoin=lambda: Page.page_id == Tag.page_id,
            foreign_keys=lambda: [Tag.page_id],
            viewonly=True,
        )
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_identity": "page",
            "concrete": True,
        }

    assert not inspect(Page).configured  # as in a fresh process: nothing compiled yet
    with RoutedSession(router) as session:
        try:
            page = session.get(Page, 1)
            outcome = page.body if page is not None else None
        except Exception as exc:
            outcome = f"{type(exc).__module__}.{type(exc).__name__}: {exc}"
    assert outcome == "b", outcome


# -- guards ----------------------------------------------------------------------------------


def _routable() -> type:
    class Base(DeclarativeBase):
        pass

    class Page(Base):
        __tablename__ = "pages"
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        body: Mapped[str | None] = mapped_column(String(64))

    return Page


def test_a_relationship_added_after_first_use_and_configure_inside_a_flush(
    app: tuple[Router, Path],
) -> None:
    """Held: Page is mapped by a routing (its registry scanned); then, in the same registry,
    a new AbstractConcreteBase hierarchy and Tag (with a relationship to Page, added to Page
    after first use) are defined, unconfigured, after a Tag instance exists. The flush maps
    Tag first (_before_flush -> mapped -> _listen -> UnmappedClassError -> configure(),
    inside the flush): it writes, and the relationship loads (configure inside a load)."""
    router, _ = app
    user = user_in_slots(router, 0, 256)

    class Base(DeclarativeBase):
        pass

    class Page(Base):
        __tablename__ = "pages"
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        body: Mapped[str | None] = mapped_column(String(64))

    with RoutedSession(router) as session:
        session.add(Page(page_id=1, user_id=user, body="b"))
        session.commit()

    class Tag(Base):
        __tablename__ = "tags"
        tag_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        page_id: Mapped[int] = mapped_column(ForeignKey("pages.page_id"))
        user_id: Mapped[int] = mapped_column(BigInteger)

    Page.tags = relationship(Tag, viewonly=True)  # type: ignore[attr-defined]
    tag = Tag(tag_id=5, page_id=1, user_id=user)  # configures the registry

    class Thing(AbstractConcreteBase, Base):
        strict_attrs = True
        thing_id: Mapped[int] = mapped_column(BigInteger, primary_key=True)

    class Thing1(Thing):
        __tablename__ = "things1"
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "1", "concrete": True}

    with pytest.raises(Exception):  # noqa: B017 (the abstract base has no mapper yet)
        list(Base.registry.mappers)
    with RoutedSession(router) as session:
        session.add(tag)
        session.commit()
        page = session.scalars(select(Page).where(Page.user_id == user)).one()
        assert [t.tag_id for t in page.tags] == [5]  # type: ignore[attr-defined]
    with Session(router.engines.primaries["s0"]) as plain:
        assert plain.get(Tag, 5) is not None


def test_the_refusal_stays_typed_and_its_message_names_the_class(app: tuple[Router, Path]) -> None:
    """Held: refused twice (built, then from the cache), each a RoutingError naming the class
    and the missing sharding column; a select of the refused class stays typed."""
    router, _ = app
    bare = _unroutable()
    for _ in range(2):
        session = RoutedSession(router)
        with session, pytest.raises(RoutingError, match="Bare maps table pages but not its"):
            session.get(bare, 1)
