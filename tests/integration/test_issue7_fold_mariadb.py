"""Issue 7, A6, on real MariaDB: ``fold_case`` keys route by the utf8mb4_general_ci weight string.

The server is the judge: the shipped weight table equals its WEIGHT_STRING of every code point,
two strings fold alike exactly when it says ``a = b``, the fold equals its
``WEIGHT_STRING(RTRIM(x))``, and through the router a user found, updated, deleted or refused by
an accent/case/space variant of the e-mail address is what one database finds, updates,
deletes or refuses.
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import BigInteger, String, create_engine, text
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.strategies.hash import fold
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError
from shardrouter.ops import sandbox as sb
from shardrouter.orm.session import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(300)]

RAW = files("shardrouter.core.strategies").joinpath("general_ci.bin").read_bytes()
CI = "utf8mb4_general_ci"


@pytest.fixture(scope="module")
def server(oracle: sb.Sandbox) -> Iterator[Engine]:
    """A connection to the oracle MariaDB (same build and settings as the shards)."""
    url = make_url(oracle.shards[0].url).set(database="")
    engine = create_engine(url)
    yield engine
    engine.dispose()


# -- the weight table is the server's --------------------------------------------------------

_RANGE = (
    "SET STATEMENT max_recursive_iterations = 2000000 FOR"
    " WITH RECURSIVE s (n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM s WHERE n < {hi})"
)


def test_weight_table_is_the_servers_for_every_code_point(server: Engine) -> None:
    """All 63,488 BMP characters one by one (one statement, well under a second), and all
    1,048,576 supplementary characters share the file's last weight."""
    with server.connect() as conn:
        bmp = conn.execute(
            text(
                _RANGE.format(lo=0, hi=0xFFFF)
                + f" SELECT n, WEIGHT_STRING(CONVERT(CHAR(n USING utf32) USING utf8mb4) COLLATE {CI})"
                " FROM s WHERE n NOT BETWEEN 0xD800 AND 0xDFFF"
            )
        ).all()
        supplementary = conn.execute(
            text(
                _RANGE.format(lo=0x10000, hi=0x10FFFF)
                + f" SELECT WEIGHT_STRING(CONVERT(CHAR(n USING utf32) USING utf8mb4) COLLATE {CI})"
                " w, COUNT(*) FROM s GROUP BY w"
            )
        ).all()
    assert len(bmp) == 0x10000 - 0x800
    differ = [hex(n) for n, w in bmp if RAW[2 * n : 2 * n + 2] != w]
    assert differ == []
    assert [(bytes(w), count) for w, count in supplementary] == [(RAW[-2:], 0x100000)]


# -- the fold agrees with the server's '=' and WEIGHT_STRING ---------------------------------

# Case pairs, accents, letters general_ci equates with others (ß, long s, µ, ÿ, the Kelvin
# sign), ones it keeps apart (æ, ø, dotless i, ǅ), punctuation that sorts between the cases, spaces that PAD
# SPACE ignores at the end (U+0020) and ones it does not (tab, NBSP, ideographic space), and
# supplementary characters (all equal to each other and to U+FFFD).
ALPHABET = (
    "aAáÁàâäåãąǎæÆ"
    "eEéÉêëěēę"
    "iIíï\u0131İ"  # dotless i
    "oOóöøØœ"
    "sSßśš\u017f"  # long s
    "yYÿŸý"
    "kK\u212a"  # Kelvin sign
    "\u00b5\u03bc\u039c\u03c3\u03c2\u03a3"  # micro sign, mu, Mu, sigma, final sigma, Sigma
    "\u01c4\u01c5\u01c6"  # DŽ, Dž, dž
    "\u2160\u2170\uff21\uff41"  # Roman numeral one (upper, lower), fullwidth A, a
    "_[\\]^`~-.@0"
    "  \t\u00a0\u3000"
    "\ufffd\U0001f600\U0001f4a9\U0001d400\U00010400\U00010428"
)


def _variant(ch: str, how: int) -> str:
    """A character the collation may or may not equate with ``ch``."""
    if how == 0:
        return ch.upper() if len(ch.upper()) == 1 else ch
    if how == 1:
        return ch.lower() if len(ch.lower()) == 1 else ch
    if how == 2:  # the letter without its accent
        base = "".join(c for c in unicodedata.normalize("NFD", ch) if not unicodedata.combining(c))
        return base or ch
    return ch


@st.composite
def _pair(draw: Any) -> tuple[str, str]:
    a = draw(st.text(alphabet=ALPHABET, max_size=5))
    if draw(st.booleans()):  # b independent of a: mostly unequal, near misses
        b = draw(st.text(alphabet=ALPHABET, max_size=5))
    else:  # b made from a character by character: often equal
        hows = draw(st.lists(st.integers(0, 4), min_size=len(a), max_size=len(a)))
        b = "".join(_variant(ch, how) for ch, how in zip(a, hows, strict=True))
    return a + draw(st.sampled_from(["", "", " ", "  "])), b + draw(
        st.sampled_from(["", "", " ", "\t", "\u00a0"])
    )


@pytest.mark.timeout(600)
def test_fold_is_equal_exactly_when_the_server_says_equal(server: Engine) -> None:
    """For each drawn pair, the server's ``a = b`` under utf8mb4_general_ci and the fold agree,
    and for each string the fold is the server's WEIGHT_STRING(RTRIM(x)) (so a shard could
    compute the routing key in SQL)."""
    seen: Counter[bool] = Counter()
    batch = 25
    equal = " , ".join(
        f"CONVERT(:a{i} USING utf8mb4) COLLATE {CI} = CONVERT(:b{i} USING utf8mb4)"
        for i in range(batch)
    )
    weights = " , ".join(
        f"WEIGHT_STRING(RTRIM(CONVERT(:{s}{i} USING utf8mb4)) COLLATE {CI})"
        for i in range(batch)
        for s in "ab"
    )
    query = text(f"SELECT {equal}, {weights}")

    with server.connect() as conn:

        @settings(
            max_examples=300,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(pairs=st.lists(_pair(), min_size=batch, max_size=batch))
        def check(pairs: list[tuple[str, str]]) -> None:
            params = {f"{s}{i}": p[j] for i, p in enumerate(pairs) for j, s in enumerate("ab")}
            row = conn.execute(query, params).one()
            server_equal, server_weights = row[:batch], row[batch:]
            for (a, b), eq in zip(pairs, server_equal, strict=True):
                assert (fold(a) == fold(b)) == bool(eq), (a, b, eq)
                seen[bool(eq)] += 1
            strings = [s for pair in pairs for s in pair]
            for s, w in zip(strings, server_weights, strict=True):
                assert fold(s) == bytes(w), s

        check()
    # Both answers were exercised, not just the easy one.
    print(f"pairs equal/unequal under {CI}: {seen[True]}/{seen[False]}")
    assert seen[True] > 1000 and seen[False] > 1000, seen


# -- through the router, as one database -----------------------------------------------------

DDL = {
    "users": "CREATE TABLE {t} (user_id BIGINT PRIMARY KEY, email VARCHAR(255) NOT NULL,"
    " name VARCHAR(64) NULL{extra}) DEFAULT CHARSET=utf8mb4",
    "user_emails": "CREATE TABLE {t} (email VARCHAR(255) PRIMARY KEY, user_id BIGINT NOT NULL)"
    " DEFAULT CHARSET=utf8mb4",
}


class World:
    """The router over the four sandbox shards and one database (users with a UNIQUE email)."""

    def __init__(self, router: Router, single: Engine) -> None:
        self.router = router
        self.single = single

    def both(self, sql: str, params: dict[str, Any] | None = None) -> tuple[Any, Any]:
        """(router answer, one database's answer): rows for a SELECT, else the rowcount."""
        routed = self.router.execute(sql, params or {})
        with self.single.begin() as conn:
            single = conn.execute(text(sql), params or {})
            if single.returns_rows:
                return sorted(routed.rows), sorted(tuple(r) for r in single.all())
            return routed.rowcount, single.rowcount

    def refused_by_both(self, sql: str, params: dict[str, Any]) -> None:
        with pytest.raises(ExecutionError, match="already belongs"):
            self.router.execute(sql, params)
        with pytest.raises(IntegrityError, match="Duplicate entry"), self.single.begin() as conn:
            conn.execute(text(sql), params)

    def same_users(self) -> list[tuple[Any, ...]]:
        sql = "SELECT user_id, email, name FROM users"
        routed, single = self.both(sql)
        assert routed == single
        emails = sorted(self.router.execute("SELECT email, user_id FROM user_emails").rows)
        assert emails == sorted((email, user) for user, email, _ in single)
        return list(single)


@pytest.fixture(scope="module")
def _env(shard_databases: Path, server: Engine) -> Iterator[tuple[Router, Engine]]:
    router = Router(Topology.load(shard_databases), max_fanout=None)
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical, ddl in DDL.items():
                for name in router.topology.table(logical).physical_names:
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    conn.execute(text(ddl.format(t=name, extra="")))
    with server.begin() as conn:
        conn.execute(text("DROP DATABASE IF EXISTS fold_oracle"))
        conn.execute(text("CREATE DATABASE fold_oracle"))
        conn.execute(text("USE fold_oracle"))
        conn.execute(text(DDL["users"].format(t="users", extra=", UNIQUE KEY (email)")))
    single = create_engine(server.url.set(database="fold_oracle"))
    try:
        yield router, single
    finally:
        router.close()
        single.dispose()
        with server.begin() as conn:
            conn.execute(text("DROP DATABASE IF EXISTS fold_oracle"))


@pytest.fixture
def world(_env: tuple[Router, Engine]) -> World:
    router, single = _env
    for engine in router.engines.primaries.values():
        with engine.begin() as conn:
            for logical in DDL:
                for name in router.topology.table(logical).physical_names:
                    conn.execute(text(f"DELETE FROM {name}"))
    with single.begin() as conn:
        conn.execute(text("DELETE FROM users"))
    return World(router, single)


INSERT = "INSERT INTO users (user_id, email, name) VALUES (:u, :e, NULL)"
VARIANTS = ["émile@example.com", "EMILE@example.com  ", "Emile@Example.com", "EMILE@EXAMPLE.COM"]


def test_accent_variants_find_update_and_delete_the_user(world: World) -> None:
    world.both(INSERT, {"u": 5, "e": "émile@example.com"})
    world.both(INSERT, {"u": 6, "e": "bob@example.com"})
    for e in VARIANTS:
        routed, single = world.both("SELECT user_id, email FROM users WHERE email = :e", {"e": e})
        assert routed == single == [(5, "émile@example.com")], e
    # The issue's own shapes: a literal with trailing spaces, an IN list mixing forms.
    routed, single = world.both("SELECT user_id FROM users WHERE email = 'EMILE@example.com  '")
    assert routed == single == [(5,)]
    sql = "SELECT user_id FROM users WHERE email IN (:e, 'BOB@example.com')"
    routed, single = world.both(sql, {"e": "emile@example.com"})
    assert routed == single == [(5,), (6,)]
    sql = "UPDATE users SET name = 'Émile' WHERE email = 'EMILE@EXAMPLE.COM'"
    assert world.both(sql) == (1, 1)
    assert (5, "émile@example.com", "Émile") in world.same_users()
    assert world.both("DELETE FROM users WHERE email = :e", {"e": "Emile@example.COM "}) == (1, 1)
    assert world.same_users() == [(6, "bob@example.com", None)]
    # Its lookup row went with it: the address is free for another user.
    world.both(INSERT, {"u": 77, "e": "Emile@Example.com"})
    assert (77, "Emile@Example.com", None) in world.same_users()


@pytest.mark.parametrize(
    "taken_as", ["Emile@Example.com", "EMILE@example.com  ", "emile@EXAMPLE.com"]
)
def test_an_address_taken_in_another_accent_case_or_spacing_is_refused(
    world: World, taken_as: str
) -> None:
    world.both(INSERT, {"u": 5, "e": "émile@example.com"})
    world.refused_by_both(INSERT, {"u": 77, "e": taken_as})
    assert world.same_users() == [(5, "émile@example.com", None)]


class _Base(DeclarativeBase):
    pass


class _User(_Base):
    __tablename__ = "users"
    user_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    email: Mapped[str] = mapped_column(String(255))
    name: Mapped[str | None] = mapped_column(String(64))


def test_orm_refuses_an_address_taken_with_an_accent(world: World) -> None:
    """The ORM writes lookups with the router's code: the same refusal."""
    world.both(INSERT, {"u": 5, "e": "émile@example.com"})
    with routed_sessionmaker(world.router)() as session:
        session.add(_User(user_id=78, email="Emile@Example.com"))
        with pytest.raises(ExecutionError, match="already belongs"):
            session.flush()
        session.rollback()
    assert world.same_users() == [(5, "émile@example.com", None)]


def test_two_spellings_of_one_address_in_one_insert_are_refused(world: World) -> None:
    sql = "INSERT INTO users (user_id, email, name) VALUES (:u, :e, NULL), (:v, :f, NULL)"
    params = {"u": 80, "e": "zoë@example.com", "v": 81, "f": "ZOE@example.com"}
    with pytest.raises(ExecutionError):
        world.router.execute(sql, params)
    with pytest.raises(IntegrityError, match="Duplicate entry"), world.single.begin() as conn:
        conn.execute(text(sql), params)
    assert world.same_users() == []
