"""Review 8t of commit 01589f6 (the ORM parts): the load listener on the root of each hierarchy
(propagated, registered by _listen before mapped() publishes the class), the mapping of each
select's entities' descendants, tokenless keys, merged slot ranges, the typed refusal of an
unreadable sharding value; attacked for regressions in ordinary use (no version change) with
unusual mappings (joined, concrete and abstract-concrete inheritance, mixins and __abstract__
bases, imperative mappings, classes mapped to a join or a subquery, a single-table root that
does not map the sharding column) and for untyped exceptions. SQLite cluster of
control_cluster (no MariaDB).

Findings (these tests failed on 01589f6; all fixed: the scan configures the registry first,
a routing remembers the classes it cannot map, a row gone from a placement that still holds
its slots is reported as SQLAlchemy reports it, not fenced):

- a registry holding an AbstractConcreteBase that is not configured yet (a fresh process, no
  query compiled yet): the first session.get() of a class of that registry raises
  sqlalchemy's UnmappedClassError from _listen (registry.mappers reads manager.mapper of
  every class, the abstract base has none before configure); plain Session.get works (the
  scan dates from 5f912ef, not a regression of 01589f6, but it escapes _listen untyped);
- rows of a class the routing cannot map (a joined-table subclass of a routed root) run
  _Routing._build, and raise and drop a RoutingError, once per row loaded or refreshed
  (the root's listener now propagates to them) and once per select of their root (its
  descendants are mapped): failures are not cached;
- an object loaded without its sharding value (load_only), whose row another connection
  deleted, with no version change: its DELETE (or UPDATE) is refused with FencedError
  ("loaded under an older topology version, before its slot moved?"), though the marker the
  session remembered shows its shard still holds its slots; plain SQLAlchemy deletes it (a
  warning) or reports StaleDataError on UPDATE.

The other tests are guards of attacks that held.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from control_cluster import document, user_in_slots
from sqlalchemy import (
    BigInteger,
    Column,
    ForeignKey,
    MetaData,
    String,
    Table,
    create_engine,
    inspect,
    join,
    select,
    text,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.declarative import AbstractConcreteBase
from sqlalchemy.orm import (
    DeclarativeBase,
    Mapped,
    Session,
    declared_attr,
    load_only,
    mapped_column,
    registry,
)

from shardrouter.control.store import MetaStore
from shardrouter.core.config import config_from_dict
from shardrouter.engine.router import Router
from shardrouter.errors import FencedError, ShardRouterError
from shardrouter.orm import session as session_module
from shardrouter.orm.session import RoutedSession, _remember_slot, _remembered_value

pytestmark = pytest.mark.timeout(120)

_PLAIN = MetaData()
Table(
    "docs",
    _PLAIN,
    Column("doc_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger),
    Column("body", String(64)),
    Column("kind", String(16)),
)
Table(
    "doc_extras",  # a joined-table subclass's own table (no sharding column)
    _PLAIN,
    Column("doc_id", BigInteger, primary_key=True, autoincrement=False),
    Column("extra", String(64)),
)
Table(
    "pages",
    _PLAIN,
    Column("page_id", BigInteger, primary_key=True, autoincrement=False),
    Column("user_id", BigInteger),
    Column("body", String(64)),
)


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Router, Path]]:
    raw = document(tmp_path)
    raw["tables"]["docs"] = {"column": "user_id", "strategy": "hash"}
    raw["tables"]["pages"] = {"column": "user_id", "strategy": "hash"}
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


def _listeners(cls: type) -> int:
    return sum(fn is _remember_slot for fn in inspect(cls).class_manager.dispatch.load)


def _shard_sql(path: Path, statement: str, params: dict[str, Any] | None = None) -> None:
    engine = create_engine(f"sqlite:///{path}")
    try:
        with engine.begin() as conn:
            conn.execute(text(statement), params or {})
    finally:
        engine.dispose()


# -- findings --------------------------------------------------------------------------------


def test_the_first_get_with_an_unconfigured_abstract_concrete_base_in_the_registry(
    app: tuple[Router, Path],
) -> None:
    """AbstractConcreteBase (SQLAlchemy's documented abstract concrete pattern) maps its base
    only when the registry is configured (at the first query compiled, or an instance made).
    session.get() calls _choose_identity -> routing.mapped() -> _listen before anything
    configures, and _listen iterates mapper.registry.mappers, which reads manager.mapper of
    every class of the registry: UnmappedClassError ("Class Thing is not mapped"), untyped,
    from the first get of a fresh process (select() and add() configure first, so they pass).
    Plain Session.get works. Fix: scan the registry's managers that are mapped
    (``m.mapper for m in registry._managers if m.is_mapped``), or catch UnmappedClassError
    around the scan (configure_mappers() first would also do, at a cost)."""
    router, _ = app
    user = user_in_slots(router, 0, 256)
    router.execute("INSERT INTO pages (page_id, user_id, body) VALUES (1, :u, 'b')", {"u": user})

    class Base(DeclarativeBase):
        pass

    class Thing(AbstractConcreteBase, Base):
        strict_attrs = True
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)

    class Page(Thing):
        __tablename__ = "pages"
        body: Mapped[str | None] = mapped_column(String(64))
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


def test_rows_of_an_unroutable_subclass_do_not_rebuild_its_mapping_per_row(
    app: tuple[Router, Path], tmp_path: Path
) -> None:
    """Doc (docs, keyed by its own id) is routed; DocX is its joined-table subclass (mapped to
    docs JOIN doc_extras: not one table, so the routing cannot map it). 01589f6 registers the
    listener on Doc with propagate=True, so it runs for DocX rows too: each row loaded (load)
    or partially refreshed (refresh: its doc_extras columns are unloaded) calls
    routing.mapped(DocX, listen=False) -> _build, which raises UnsupportedQueryError (message
    formatted, traceback built) and is dropped; and each select(Doc) maps its descendants in
    _on_execute, DocX again. Failures are never cached: 100 rows loaded twice make ~200
    builds (before 01589f6, DocX had no listener: none). Measured ~1.2 us per row, ~18% of
    the load of 300 rows. Fix: cache the refusal per routing (a dict of mapper -> exception,
    or a set of unroutable mappers checked in mapped() before _build)."""
    router, _ = app

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "docs"
        doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        kind: Mapped[str] = mapped_column(String(16))
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "kind",
            "polymorphic_identity": "doc",
        }

    class DocX(Doc):
        __tablename__ = "doc_extras"
        doc_id: Mapped[int] = mapped_column(ForeignKey("docs.doc_id"), primary_key=True)
        extra: Mapped[str | None] = mapped_column(String(64))
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "x"}

    user = user_in_slots(router, 0, 256)  # on s0
    rows = 100
    for i in range(1, rows + 1):
        router.execute(
            "INSERT INTO docs (doc_id, user_id, kind) VALUES (:d, :u, 'x')", {"d": i, "u": user}
        )
        _shard_sql(tmp_path / "s0.db", "INSERT INTO doc_extras VALUES (:d, 'e')", {"d": i})
    builds: dict[Any, int] = {}
    original = session_module._Routing._build

    def counting(self: Any, mapper: Any) -> Any:
        builds[mapper.class_.__name__] = builds.get(mapper.class_.__name__, 0) + 1
        return original(self, mapper)

    session_module._Routing._build = counting  # type: ignore[method-assign]
    try:
        with RoutedSession(router) as session:
            loaded = session.scalars(select(Doc).where(Doc.user_id == user)).all()
            again = session.scalars(select(Doc).where(Doc.user_id == user)).all()
            assert len(loaded) == len(again) == rows
            assert all(type(d) is DocX for d in loaded)
    finally:
        session_module._Routing._build = original  # type: ignore[method-assign]
    assert builds.get("DocX", 0) <= 2, f"_build calls per class for {rows} rows x2: {builds}"


def test_a_row_deleted_by_another_connection_is_not_fenced_without_a_version_change(
    app: tuple[Router, Path], tmp_path: Path
) -> None:
    """No version change. A page (keyed by its own id) loaded with load_only(body): the
    session remembers (key, None, marker of s0's holding). Another connection deletes its row.
    session.delete(page) + commit: _resolve -> _loaded_slot (the marker equals the session's
    _holding: nothing moved, returns None) -> _sharding_value's refresh finds no row ->
    InvalidRequestError, turned by 01589f6 into FencedError "loaded under an older topology
    version, before its slot moved?" (the same version; FencedError documents a retry on a
    new version or a reload). Plain SQLAlchemy deletes it (a warning: 0 rows matched).
    Fix: convert to FencedError only when the object's marker is not the session's holding
    (or its load's version is not the session's); otherwise raise sqlalchemy's
    ObjectDeletedError / StaleDataError as a plain Session would report the missing row."""
    router, _ = app

    class Base(DeclarativeBase):
        pass

    class Page(Base):
        __tablename__ = "pages"
        page_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        body: Mapped[str | None] = mapped_column(String(64))

    user = user_in_slots(router, 0, 256)  # on s0
    router.execute("INSERT INTO pages (page_id, user_id, body) VALUES (1, :u, 'b')", {"u": user})
    with RoutedSession(router, expire_on_commit=False) as session:
        page = session.scalars(
            select(Page).where(Page.page_id == 1).options(load_only(Page.body))
        ).one()
        assert "user_id" not in inspect(page).dict
        session.commit()
        _shard_sql(tmp_path / "s0.db", "DELETE FROM pages WHERE page_id = 1")
        session.delete(page)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", sa_exc.SAWarning)
                session.commit()
            outcome = "deleted"
        except FencedError as exc:
            outcome = f"FencedError: {exc}"
        except sa_exc.SQLAlchemyError as exc:  # as a plain Session reports a missing row
            outcome = f"sqlalchemy {type(exc).__name__}"
    assert not outcome.startswith("FencedError"), outcome


# -- guards (held) ---------------------------------------------------------------------------


def test_unusual_mappers_in_the_registry_leave_ordinary_use_alone(
    app: tuple[Router, Path],
) -> None:
    """One registry with: an __abstract__ base and a mixin under the routed Doc (docs, keyed by
    its own id, single-table subclass Memo), a joined-table subclass (DocX), an imperative
    mapping of pages, a class mapped to a join and one to a subquery. Ordinary use: add,
    get, select, update, delete of the routable classes; each routable hierarchy has one
    listener, on its root; nothing escapes the scan or the descendants' mapping."""
    router, _ = app
    user = user_in_slots(router, 0, 256)
    reg = registry()

    class Base(DeclarativeBase):
        registry = reg

    class Abstract(Base):
        __abstract__ = True
        body: Mapped[str | None] = mapped_column(String(64))

    class Owned:
        @declared_attr
        def user_id(cls) -> Mapped[int]:
            return mapped_column(BigInteger)

    class Doc(Owned, Abstract):
        __tablename__ = "docs"
        doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(16))
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "kind",
            "polymorphic_identity": "doc",
        }

    class Memo(Doc):
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "memo"}

    class DocX(Doc):
        __tablename__ = "doc_extras"
        doc_id: Mapped[int] = mapped_column(ForeignKey("docs.doc_id"), primary_key=True)
        extra: Mapped[str | None] = mapped_column(String(64))
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "x"}

    class PlainPage:
        pass

    class Joined:
        pass

    class Sub:
        pass

    pages = Table(
        "pages",
        reg.metadata,
        Column("page_id", BigInteger, primary_key=True, autoincrement=False),
        Column("user_id", BigInteger),
        Column("body", String(64)),
    )
    reg.map_imperatively(PlainPage, pages)
    docs = Doc.__table__
    reg.map_imperatively(
        Joined,
        join(pages, docs, pages.c.page_id == docs.c.doc_id),
        properties={"page_id": [pages.c.page_id, docs.c.doc_id], "user_id": pages.c.user_id},
        include_properties=[pages.c.page_id, docs.c.doc_id, pages.c.user_id],
    )
    reg.map_imperatively(Sub, select(pages).where(pages.c.body == "x").subquery())

    with RoutedSession(router) as session:
        page = PlainPage()
        page.page_id, page.user_id, page.body = 1, user, "p"  # type: ignore[attr-defined]
        session.add_all(
            [page, Doc(doc_id=1, user_id=user, kind="doc"), Memo(doc_id=2, user_id=user)]
        )
        session.commit()
    with RoutedSession(router) as session:
        memo = session.get(Memo, 2)
        assert memo is not None and _remembered_value(inspect(memo)) == user
        found = session.scalars(select(Doc).where(Doc.user_id == user).order_by(Doc.doc_id)).all()
        assert [type(d).__name__ for d in found] == ["Doc", "Memo"]
        got = session.get(PlainPage, 1)
        assert got is not None and _remembered_value(inspect(got)) == user
        got.body = "q"  # type: ignore[attr-defined]
        memo.body = "m"
        session.commit()
        session.delete(found[0])
        session.commit()
    assert router.execute("SELECT body FROM pages WHERE page_id = 1").rows == [("q",)]
    assert router.execute("SELECT doc_id, body FROM docs").rows == [(2, "m")]
    assert (_listeners(Doc), _listeners(Memo), _listeners(DocX), _listeners(PlainPage)) == (
        1,
        1,
        1,
        1,
    )
    with RoutedSession(router) as session, pytest.raises(ShardRouterError):
        session.scalars(select(Joined)).all()  # refused typed, as before


def test_a_single_table_root_without_the_sharding_column(app: tuple[Router, Path]) -> None:
    """The root of a single-table hierarchy does not map the sharding column (not routable),
    its subclass adds it (routable, keyed by its own id): the listener goes on the root,
    propagated; the subclass is written, read and updated, and remembers its value; the
    root's rows load (its query fans out) and refuse their writes typed."""
    router, _ = app
    user = user_in_slots(router, 0, 256)

    class Base(DeclarativeBase):
        pass

    class Loose(Base):
        __tablename__ = "docs"
        doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        kind: Mapped[str] = mapped_column(String(16))
        body: Mapped[str | None] = mapped_column(String(64))
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "kind",
            "polymorphic_identity": "loose",
        }

    class Owned(Loose):
        user_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "owned"}

    router.execute(
        "INSERT INTO docs (doc_id, user_id, kind, body) VALUES (9, :u, 'loose', 'l')", {"u": user}
    )
    with RoutedSession(router) as session:
        session.add(Owned(doc_id=1, user_id=user, body="o"))
        session.commit()
        owned = session.get(Owned, 1)
        assert owned is not None and _remembered_value(inspect(owned)) == user
        owned.body = "o2"
        session.commit()
        everything = session.scalars(select(Loose).order_by(Loose.doc_id)).all()
        assert [(type(d).__name__, d.body) for d in everything] == [
            ("Owned", "o2"),
            ("Loose", "l"),
        ]
        everything[1].body = "x"
        with pytest.raises(ShardRouterError):
            session.commit()
        session.rollback()
    assert _listeners(Owned) == _listeners(Loose) == 1


def test_a_plain_session_still_loads_every_mapping(
    app: tuple[Router, Path], tmp_path: Path
) -> None:
    """The propagated listener runs for plain Sessions too: it returns at once (not a
    RoutedSession), whatever the class."""
    router, _ = app

    class Base(DeclarativeBase):
        pass

    class Doc(Base):
        __tablename__ = "docs"
        doc_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
        user_id: Mapped[int] = mapped_column(BigInteger)
        kind: Mapped[str] = mapped_column(String(16))
        __mapper_args__: ClassVar[dict[str, Any]] = {
            "polymorphic_on": "kind",
            "polymorphic_identity": "doc",
        }

    class DocX(Doc):
        __tablename__ = "doc_extras"
        doc_id: Mapped[int] = mapped_column(ForeignKey("docs.doc_id"), primary_key=True)
        extra: Mapped[str | None] = mapped_column(String(64))
        __mapper_args__: ClassVar[dict[str, Any]] = {"polymorphic_identity": "x"}

    user = user_in_slots(router, 0, 256)
    with RoutedSession(router) as session:
        session.add(Doc(doc_id=1, user_id=user, kind="doc"))
        session.commit()
    assert _listeners(DocX) == 1
    engine = create_engine(f"sqlite:///{tmp_path / 's0.db'}")
    try:
        with Session(engine) as plain:
            plain.add(DocX(doc_id=2, user_id=user, extra="e"))
            plain.commit()
            plain.expire_all()
            assert [type(d).__name__ for d in plain.scalars(select(Doc).order_by(Doc.doc_id))] == [
                "Doc",
                "DocX",
            ]
            assert plain.get(DocX, 2).extra == "e"  # type: ignore[union-attr]
    finally:
        engine.dispose()
