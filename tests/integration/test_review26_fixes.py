"""Review 26: the fixes of review 25 (git show 091ed7d, ef5b4dc, 88a12cf, b2520cf) attacked
on 4 real MariaDB shards against the oracle sandbox.

Each test marked FINDING fails on the reviewed code (9409212); its docstring gives the
statement, what one database answers, what the router answered and a guess of the cause. The tests named
``test_passing_*`` pin shapes that were attacked and found right.

Tables (own names, own oracle database): ``r26`` (hash on user_id, 2 splits) and ``r26b``
(hash on user_id), with strings differing in case/accents/trailing spaces, NULLs, DATE, FLOAT,
FLOAT(7,2), DOUBLE, BIGINT UNSIGNED, large BIGINTs and DECIMAL; ``r26c`` (hash on user_id) with
FLOAT(7,2) and FLOAT(10,4) values that float32 does not hold exactly (0.1, 2.0001, ...).
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import threading
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import (
    BigInteger,
    Engine,
    Float,
    Integer,
    String,
    create_engine,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

ORACLE_DB = "review26"
USERS = [5 * i + 2 for i in range(24)]
STRINGS = ("b", "B", "a", "é", "e", "E ", "c", None, "ä", "A")

DDL = {
    "r26": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, s VARCHAR(16) NULL, n INT NULL,"
    " d DATE NULL, f FLOAT NULL, f2 FLOAT(7,2) NULL, db DOUBLE NULL, u BIGINT UNSIGNED NULL,"
    " big BIGINT NULL, amt DECIMAL(10,2) NULL, PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
    "r26c": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, f2 FLOAT(7,2) NULL,"
    " f4 FLOAT(10,4) NULL, PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
    "r26b": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, s VARCHAR(16) NULL, n INT NULL,"
    " PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
}
FLOATS = (1000001.0, 1000002.0, 1000003.0, None, 16777217.0, 2.5)


def _rows() -> dict[str, list[dict[str, Any]]]:
    r26, r26b = [], []
    k = 0
    for i, user in enumerate(USERS):
        for _ in range(3):
            k += 1
            r26.append(
                {
                    "id": k,
                    "user_id": user,
                    "s": STRINGS[k % len(STRINGS)],
                    "n": None if k % 6 == 0 else (k * 7) % 11 - 3,
                    "d": None if k % 8 == 0 else dt.date(2026, 1 + k % 3, 1 + k % 4),
                    "f": FLOATS[k % len(FLOATS)],
                    "f2": (12.25, 3.5, None, 7.75)[k % 4],
                    "db": (0.1, 0.2, 0.30000000000000004, None)[k % 4],
                    "u": (0, 5, 18446744073709551615, None, 9223372036854775808)[k % 5],
                    "big": (1, 9223372036854775807, -9223372036854775808, 4611686018427387904)[
                        k % 4
                    ],
                    "amt": Decimal(k % 5) + Decimal("0.25"),
                }
            )
        r26b.append({"id": i + 1, "user_id": user, "s": STRINGS[i % 5], "n": i % 4})
    r26c = [
        {
            "id": i + 1,
            "user_id": USERS[i % 8],
            "f2": (0.1, 1.15, 123.45, 0.3)[i % 4],
            "f4": (0.1, 2.0001, 0.7, 1.1)[i % 4],
        }
        for i in range(16)
    ]
    return {"r26": r26, "r26b": r26b, "r26c": r26c}


@pytest.fixture(scope="module")
def w26(shard_databases: Path, oracle: Any) -> Iterator[dict[str, Any]]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["r26"] = {"column": "user_id", "strategy": "hash", "split": 2}
    raw["tables"]["r26b"] = {"column": "user_id", "strategy": "hash"}
    raw["tables"]["r26c"] = {"column": "user_id", "strategy": "hash"}
    topology = Topology(config_from_dict(copy.deepcopy(raw)))
    router = Router(topology, max_offset=1000)
    server = create_engine(make_url(oracle.shards[0].url).set(database=""))
    with server.begin() as conn:
        conn.execute(text(f"DROP DATABASE IF EXISTS `{ORACLE_DB}`"))
        conn.execute(text(f"CREATE DATABASE `{ORACLE_DB}`"))
    server.dispose()
    oracle_engine: Engine = create_engine(make_url(oracle.shards[0].url).set(database=ORACLE_DB))
    for table, ddl in DDL.items():
        for engine in router.engines.primaries.values():
            with engine.begin() as conn:
                for name in topology.table(table).physical_names:
                    conn.execute(text(f"DROP TABLE IF EXISTS {name}"))
                    conn.execute(text(f"CREATE TABLE {name} {ddl}"))
        with oracle_engine.begin() as conn:
            conn.execute(text(f"CREATE TABLE {table} {ddl}"))
    for table, rows in _rows().items():
        columns = list(rows[0])
        sql = (
            f"INSERT INTO {table} ({', '.join(columns)}) VALUES"
            f" ({', '.join(':' + c for c in columns)})"
        )
        for row in rows:
            router.execute(sql, row)
        with oracle_engine.begin() as conn:
            conn.execute(text(sql), rows)
    aio = AsyncRouter(topology, max_offset=1000)
    loop = asyncio.new_event_loop()
    try:
        yield {"router": router, "aio": aio, "loop": loop, "oracle": oracle_engine, "raw": raw}
    finally:
        loop.run_until_complete(aio.close())
        loop.close()
        router.close()
        oracle_engine.dispose()


def _oracle(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> Any:
    with w["oracle"].connect() as conn:
        result = conn.execute(text(sql), params or {})
        return tuple(result.keys()), [tuple(r) for r in result]


def _routers(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    params = params or {}
    sync = w["router"].execute(sql, params)
    aio = w["loop"].run_until_complete(w["aio"].execute(sql, params))
    return [(tuple(r.columns), list(r.rows)) for r in (sync, aio)]


def _exact(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> None:
    """Labels, values and their Python types (repr) equal to the oracle's, in order."""
    expected = _oracle(w, sql, params)
    for got in _routers(w, sql, params):
        assert repr(got) == repr(expected), sql


def _multiset(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> None:
    labels, rows = _oracle(w, sql, params)
    for got_labels, got in _routers(w, sql, params):
        assert got_labels == labels, sql
        assert Counter(map(repr, got)) == Counter(map(repr, rows)), sql


class _Base(DeclarativeBase):
    pass


class _R26(_Base):
    __tablename__ = "r26"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    user_id: Mapped[int] = mapped_column(BigInteger)
    s: Mapped[str | None] = mapped_column(String(16))
    n: Mapped[int | None] = mapped_column(Integer)
    f: Mapped[float | None] = mapped_column(Float)
    f2: Mapped[float | None] = mapped_column(Float)
    u: Mapped[int | None] = mapped_column(BigInteger)


def _both(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """The sync and the async router's runs of ``sql``, as callables."""
    params = params or {}
    return [
        lambda: w["router"].execute(sql, params),
        lambda: w["loop"].run_until_complete(w["aio"].execute(sql, params)),
    ]


# -- FLOAT(M,D) no longer flagged (execution.float_columns) --------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT MAX(f2) * 3, MAX(f4) * 3 FROM r26c",
        "SELECT user_id, MAX(f2) * 3 AS x FROM r26c GROUP BY user_id ORDER BY user_id",
    ],
    ids=["scalar", "grouped"],
)
def test_float_m_d_computed_item_differs(w26: dict[str, Any], sql: str) -> None:
    """FINDING (regression of 091ed7d: refused before, wrong now). SELECT MAX(f2) * 3,
    MAX(f4) * 3 FROM r26c (f2 FLOAT(7,2) holding 0.1, f4 FLOAT(10,4) holding 2.0001): one
    database computes with the stored float32 and sends the DOUBLE result with the column's
    decimals: (370.35, 6.0003); grouped, MAX(f2) * 3 over 0.1 gives 0.3, 3.45, 0.9. The router
    computes with the 2/4-decimal text the shards sent, in full double precision:
    6.000300000000001, 0.30000000000000004, 3.4499999999999997, 0.8999999999999999.

    Cause: execution.float_columns no longer flags FLOAT(M,D) (decimals < 31), so
    merge/scatter evaluate computed items over it as if exact; MariaDB rounds the result to
    the item's decimals when it sends it.

    Fixed by refusing (execution._refuse_floats: fixed-decimal FLOAT/DOUBLE columns,
    JobResult.rounded, where the merge computes with them); CAST(x AS DOUBLE) is exact."""
    _refused_both(w26, sql)
    cast = sql.replace("MAX(f2)", "MAX(CAST(f2 AS DOUBLE))")
    _exact(w26, cast.replace("MAX(f4)", "MAX(CAST(f4 AS DOUBLE))"))


def test_float_m_d_having_parameter_drops_groups(w26: dict[str, Any]) -> None:
    """FINDING (regression of 091ed7d: refused before, wrong now). SELECT user_id, MIN(f2) AS m
    FROM r26c GROUP BY user_id HAVING m > :v ORDER BY user_id, v = 0.1 (written 0.1e0, a
    DOUBLE): one database compares the stored float32 0.100000001490116 > 0.1: true, all 8
    groups. The router compares the sent text 0.1 with 0.1: false, 6 groups (2 and 22 dropped).

    Cause: execution.float_columns does not flag FLOAT(M,D), so HAVING (scatter._Having)
    reads the rounded text value instead of refusing.

    Fixed by refusing, as above."""
    _refused_both(
        w26,
        "SELECT user_id, MIN(f2) AS m FROM r26c GROUP BY user_id HAVING m > :v ORDER BY user_id",
        {"v": 0.1},
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT AVG(f2), AVG(f4), SUM(f2) / 7 FROM r26c",
        "SELECT user_id, AVG(f2) FROM r26 GROUP BY user_id ORDER BY user_id LIMIT 4",
    ],
    ids=["scalar", "grouped"],
)
def test_float_m_d_avg_and_quotient_precision(w26: dict[str, Any], sql: str) -> None:
    """FINDING (not new: wrong before 091ed7d too, now without any FLOAT refusal left). SELECT
    AVG(f2), AVG(f4), SUM(f2) / 7 FROM r26c: one database sends the DOUBLE with the column's
    decimals + 4: (31.249999, 0.97502498, 71.42857); the router: (31.25, 0.975025,
    71.42857142857143). Grouped over r26: AVG(f2) 7.833333 vs 7.833333333333333.

    Cause: merge's AVG / computed quotient over a FLOAT(M,D) (execution.float_columns lets it
    through) is a Python float, not rounded to the item's decimals (D + 4) as MariaDB sends
    it.

    Fixed by refusing: the SUM partials of a FLOAT(M,D) come back rounded to its decimals
    (JobResult.rounded), which the merge would add."""
    _refused_both(w26, sql)


def _refused_both(w26: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> None:
    from shardrouter.errors import UnsupportedQueryError

    for run in (
        lambda: w26["router"].execute(sql, params or {}),
        lambda: w26["loop"].run_until_complete(w26["aio"].execute(sql, params or {})),
    ):
        with pytest.raises(UnsupportedQueryError, match="FLOAT"):
            run()


# -- integer ranges (scatter._negate, _int_divide, _modulo) --------------------------------------


def test_double_negation_of_bigint_min_literal_is_decimal(w26: dict[str, Any]) -> None:
    """FINDING (b2520cf/091ed7d: wrong type before, a false error now). SELECT
    -(-9223372036854775808) + COUNT(*), -(-9223372036854775808) FROM r26: one database
    answers (Decimal('9223372036854775880'), Decimal('9223372036854775808')) -- the literal
    9223372036854775808 is beyond BIGINT, so the negations are DECIMAL. The router raises
    ExecutionError "BIGINT value is out of range (-(-9223372036854775808) ...) (error 1690)".
    Same with - -9223372036854775808 and with ``-:k`` for k = -2**63 (the driver writes
    --9223372036854775808).

    Cause: scatter._negate / _bigint fold -9223372036854775808 into a BIGINT literal and
    negate it with BIGINT range checks; MariaDB types it DECIMAL."""
    _exact(w26, "SELECT -(-9223372036854775808) + COUNT(*), -(-9223372036854775808) FROM r26")


def test_div_and_mod_by_literal_beyond_bigint_types(w26: dict[str, Any]) -> None:
    """FINDING (DIV: regression of 091ed7d). SELECT COUNT(*) DIV 18446744073709551616,
    COUNT(*) % 18446744073709551616 FROM r26: one database (0, Decimal('72')) -- DIV is always
    an integer, % over a DECIMAL operand is DECIMAL. The router: (Decimal('0'), 72); before
    091ed7d (0, 72). Grouped (MAX(n) DIV 18446744073709551616) likewise Decimal('0') for 0.

    Cause: scatter._int_divide returns the DECIMAL type of the literal beyond BIGINT (now
    DECIMAL), _modulo keeps the int type."""
    _exact(
        w26, "SELECT COUNT(*) DIV 18446744073709551616, COUNT(*) % 18446744073709551616 FROM r26"
    )


# -- labels --------------------------------------------------------------------------------------


def test_unary_plus_of_parenthesized_literal_label(w26: dict[str, Any]) -> None:
    """FINDING (091ed7d's (.5)/+.5 labels incomplete). SELECT (('a' 'b')), ((.5)), +(.5), +'a'
    FROM r26 LIMIT 1 across shards: one database labels them ('ab', '.5', '.5', 'a'); the
    router ('ab', '.5', '(.5)', 'a').

    Cause: planner._literal_label strips a unary plus before a literal and parentheses around
    one, but not a plus before parentheses."""
    _exact(w26, "SELECT (('a' 'b')), ((.5)), +(.5), +'a' FROM r26 LIMIT 1")


# -- attacked, found right -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql,params",
    [
        ("SELECT user_id, -COUNT(*) AS c FROM r26 GROUP BY user_id ORDER BY user_id LIMIT 3", {}),
        (
            "SELECT user_id, MIN(n) % -3 AS c, MIN(n) DIV -3 FROM r26 GROUP BY user_id"
            " ORDER BY user_id LIMIT 5",
            {},
        ),
        ("SELECT MAX(u) - 6 FROM r26 WHERE u < 6 LIMIT 1 OFFSET 1", {}),
        ("SELECT user_id, MAX(u) - 6 AS c FROM r26 GROUP BY user_id LIMIT 2 OFFSET 3", {}),
        (
            "SELECT user_id, MAX(u) - 6 AS c FROM r26 GROUP BY user_id ORDER BY user_id DESC"
            " LIMIT 3",
            {},
        ),
        ("SELECT SUM(n) / :d FROM r26 WHERE n > :d", {"d": 1}),
        (
            "SELECT user_id, SUM(n) * :k AS c FROM r26 WHERE n < :k GROUP BY user_id"
            " HAVING SUM(n) > :k ORDER BY user_id LIMIT :k",
            {"k": 3},
        ),
        (
            "SELECT user_id, COUNT(*) * :k AS `:k`, ':k' /* :k */ FROM r26 GROUP BY user_id"
            " ORDER BY user_id LIMIT 4",
            {"k": 3},
        ),
        (
            "SELECT user_id, MAX(d) < :k, COUNT(*) = :s FROM r26 GROUP BY user_id ORDER BY user_id"
            " LIMIT 4",
            {"k": "2026-02-03", "s": "3abc"},
        ),
        (
            "SELECT user_id, COALESCE(:k, COUNT(*)), IF(COUNT(*) > 2, :a, :b) FROM r26"
            " GROUP BY user_id ORDER BY user_id LIMIT 4",
            {"k": None, "a": 1, "b": 2.5},
        ),
        ("SELECT COUNT(*) AS '\U0001d518x', COUNT(*) AS 'a\\'\U0001f600' FROM r26", {}),
        (
            "SELECT db FROM r26 WHERE user_id = 2 UNION SELECT db FROM r26 WHERE user_id = 7"
            " ORDER BY 1",
            {},
        ),
        (
            "SELECT id FROM r26 WHERE user_id = :u UNION SELECT id FROM r26 WHERE user_id = 7"
            " ORDER BY 1 LIMIT :u OFFSET :u",
            {"u": 2},
        ),
    ],
)
def test_passing_review26_shapes(w26: dict[str, Any], sql: str, params: dict[str, Any]) -> None:
    """Attacked, found right (labels, values, types, sync and async)."""
    _exact(w26, sql, params)


def test_passing_item_parameters_from_threads(w26: dict[str, Any]) -> None:
    """Attacked, found right: one statement with a select-item parameter run from 8 threads
    with 100 different values (more than the 64 plans kept): each answer is its own value's."""
    sql = "SELECT user_id, COUNT(*) * :k AS c FROM r26 GROUP BY user_id ORDER BY user_id LIMIT 2"
    bad: list[Any] = []

    def work(start: int) -> None:
        for k in range(start, 100, 8):
            rows = w26["router"].execute(sql, {"k": k}).rows
            if list(rows) != [(2, 3 * k), (7, 3 * k)]:
                bad.append((k, rows))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not bad
