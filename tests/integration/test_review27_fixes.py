"""Review 27: the fixes of review 26 (git show d36212c) attacked on 4 real MariaDB shards
against the oracle sandbox.

Each test fails on the reviewed code (d36212c); its docstring gives the statement, what one
database answers, what the router answered and a guess of the cause. The tests named
``test_passing_*`` pin shapes that were attacked and found right.

Tables (own names, own oracle database ``review27``): ``r27`` (hash on user_id, 2 splits) with
INT, FLOAT, FLOAT(7,2), DOUBLE(10,2), DOUBLE, DECIMAL, BIGINT UNSIGNED, BIGINT and ENUM values;
``r27c`` (hash on user_id) with FLOAT(7,2), FLOAT(10,4) and DOUBLE(10,2) values (0.1, 0.11,
1.15, ...).
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import (
    Engine,
    create_engine,
    text,
)
from sqlalchemy.engine import make_url

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.router import Router

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

ORACLE_DB = "review27"
USERS = [5 * i + 2 for i in range(24)]

DDL = {
    "r27": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, n INT NULL, f FLOAT NULL,"
    " f2 FLOAT(7,2) NULL, dd DOUBLE(10,2) NULL, db DOUBLE NULL, amt DECIMAL(10,2) NULL,"
    " u BIGINT UNSIGNED NULL, big BIGINT NULL, e ENUM('z','a','m') NULL,"
    " PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
    "r27c": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, f2 FLOAT(7,2) NULL,"
    " f4 FLOAT(10,4) NULL, dd DOUBLE(10,2) NULL, PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
}


def _rows() -> dict[str, list[dict[str, Any]]]:
    r27 = []
    k = 0
    for user in USERS:
        for _ in range(3):
            k += 1
            r27.append(
                {
                    "id": k,
                    "user_id": user,
                    "n": None if k % 6 == 0 else (k * 7) % 11 - 3,
                    "f": (1000001.0, 2.5, None, 16777217.0, 0.1)[k % 5],
                    "f2": (12.25, 3.5, None, 7.75, 0.1, 0.11)[k % 6],
                    "dd": (0.1, 0.2, 1.15, None, 123.45)[k % 5],
                    "db": (0.1, 0.2, 0.30000000000000004, None)[k % 4],
                    "amt": Decimal(k % 5) + Decimal("0.25"),
                    "u": (0, 5, 18446744073709551615, None, 9223372036854775808)[k % 5],
                    "big": (1, 9223372036854775807, -9223372036854775808, 4611686018427387904)[
                        k % 4
                    ],
                    "e": ("z", "a", None, "m")[k % 4],
                }
            )
    r27c = [
        {
            "id": i + 1,
            "user_id": USERS[i % 8],
            "f2": (0.1, 1.15, 123.45, 0.3, 0.11)[i % 5],
            "f4": (0.1, 2.0001, 0.7, 1.1)[i % 4],
            "dd": (0.1, 0.2, 1.15, 0.3, 0.12)[i % 5],
        }
        for i in range(20)
    ]
    return {"r27": r27, "r27c": r27c}


@pytest.fixture(scope="module")
def w27(shard_databases: Path, oracle: Any) -> Iterator[dict[str, Any]]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["r27"] = {"column": "user_id", "strategy": "hash", "split": 2}
    raw["tables"]["r27c"] = {"column": "user_id", "strategy": "hash"}
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


def _both(w: dict[str, Any], sql: str, params: dict[str, Any] | None = None) -> list[Any]:
    """The sync and the async router's runs of ``sql``, as callables."""
    params = params or {}
    return [
        lambda: w["router"].execute(sql, params),
        lambda: w["loop"].run_until_complete(w["aio"].execute(sql, params)),
    ]


# -- -9223372036854775808 is a BIGINT on MariaDB (regression of d36212c) ------------------------


@pytest.mark.parametrize(
    "sql,params",
    [
        ("SELECT COUNT(*) + -9223372036854775808 FROM r27", {}),
        ("SELECT COUNT(*) + -(9223372036854775808) FROM r27", {}),
        ("SELECT -+9223372036854775808 + COUNT(*) FROM r27", {}),
        ("SELECT -9223372036854775808 % COUNT(*) FROM r27", {}),
        ("SELECT COUNT(*) % -9223372036854775808 FROM r27", {}),
        (
            "SELECT user_id, COUNT(*) + -9223372036854775808 AS c FROM r27 GROUP BY user_id"
            " ORDER BY user_id LIMIT 2",
            {},
        ),
        ("SELECT COUNT(*) + :k FROM r27", {"k": -9223372036854775808}),
        ("SELECT COUNT(*) + -:k FROM r27", {"k": 9223372036854775808}),
    ],
    ids=[
        "plus",
        "minus-paren",
        "minus-plus",
        "mod-left",
        "mod-right",
        "grouped",
        "param",
        "minus-param",
    ],
)
def test_bigint_min_literal_is_bigint(
    w27: dict[str, Any], sql: str, params: dict[str, Any]
) -> None:
    """FINDING (regression of d36212c: right before it). SELECT COUNT(*) + -9223372036854775808
    FROM r27: one database (MariaDB 10.11) types the literal -9223372036854775808 -- also
    written -(9223372036854775808), -+9223372036854775808, or a parameter -2**63 / ``-:k`` with
    k = 2**63, which the driver writes as that literal -- as a BIGINT (description type 8,
    LONGLONG) and answers the int -9223372036854775736; -9223372036854775808 % COUNT(*) is the
    int -8, COUNT(*) % -9223372036854775808 the int 72. The router answers
    Decimal('-9223372036854775736'), Decimal('-8'), Decimal('72'). Before d36212c: the ints.

    Only its minus is a DECIMAL: -(-9223372036854775808) is Decimal('9223372036854775808')
    (review 26), so the literal itself must stay a BIGINT.

    Cause: scatter._Having's literal branch turns -9223372036854775808 (not ``_SIGNED_MIN <
    value``) into a Decimal, and scatter._negate turns the minus of 9223372036854775808 into
    Decimal(-number) although -9223372036854775808 is in the signed range; _modulo then
    returns a Decimal because _bigint_operands sees a non-BIGINT operand."""
    _exact(w27, sql, params)


# -- DIV beyond BIGINT is error 1690, not an answer ----------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT 18446744073709551616 DIV (COUNT(*) - 71) FROM r27",
        "SELECT -18446744073709551616 DIV (COUNT(*) - 71) FROM r27",
        "SELECT MAX(u) DIV 0.5 FROM r27",
    ],
    ids=["decimal-literal", "negative-decimal-literal", "decimal-divisor"],
)
def test_div_result_beyond_bigint_is_refused(w27: dict[str, Any], sql: str) -> None:
    """FINDING (wrong answer; d36212c made it an int, before it was a Decimal). SELECT
    18446744073709551616 DIV (COUNT(*) - 71) FROM r27 (72 rows): one database refuses it,
    error 1690 "BIGINT value is out of range in '18446744073709551616 DIV (count(0) - 71)'";
    likewise -18446744073709551616 DIV ..., and MAX(u) DIV 0.5 (u BIGINT UNSIGNED up to
    2**64 - 1: "BIGINT UNSIGNED value is out of range"). The router answers
    18446744073709551616, -18446744073709551616 and 36893488147419103230.

    Cause: scatter._int_divide returns the bare quotient when an operand is a DECIMAL (a
    literal beyond BIGINT, or 0.5) with no range check; DIV's result is a BIGINT on MariaDB,
    and out of its range is error 1690."""
    from shardrouter.errors import ExecutionError

    with pytest.raises(Exception, match="1690"):
        _oracle(w27, sql)
    for run in _both(w27, sql):
        with pytest.raises(ExecutionError, match="1690"):
            run()


# -- a constant whose minus overflows is a DECIMAL -----------------------------------------------


def test_minus_of_constant_bigint_min_is_decimal(w27: dict[str, Any]) -> None:
    """FINDING (false error; not new in d36212c). SELECT -(-9223372036854775807 - 1) + COUNT(*)
    FROM r27: one database answers Decimal('9223372036854775880') -- the minus of the constant
    -9223372036854775808 is folded to a DECIMAL (a column's MIN(big) = -2**63 under minus is
    error 1690, which the router gets right). The router raises ExecutionError "BIGINT value is
    out of range (-(-9223372036854775808) give 9223372036854775808) ... (error 1690)".

    Cause: scatter._negate applies BIGINT range checks to an int computed from literals only;
    MariaDB's minus of a constant LONGLONG_MIN switches to DECIMAL."""
    _exact(w27, "SELECT -(-9223372036854775807 - 1) + COUNT(*) FROM r27")


# -- fixed-decimal DOUBLE expressions are not "kept apart" by their decimals ---------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT id, f2 * 0.01 AS x FROM r27c ORDER BY x, id LIMIT 8",
        "SELECT id FROM r27c ORDER BY f2 * 0.01, id LIMIT 8",
        "SELECT id, dd * 0.01 AS x FROM r27c ORDER BY x, id LIMIT 8",
    ],
    ids=["float-m-d-item", "float-m-d-hidden-key", "double-m-d-item"],
)
def test_fixed_decimal_expression_ordered_by_sent_text(w27: dict[str, Any], sql: str) -> None:
    """FINDING (wrong answer; not new, but d36212c's premise that fixed decimals keep stored
    values apart does not hold for expressions). SELECT id, f2 * 0.01 AS x FROM r27c ORDER BY
    x, id LIMIT 8 (f2 FLOAT(7,2) holding 0.1, 0.11, 0.3, ...): f2 * 0.01 is a DOUBLE with 2
    decimals (description scale 2), sent as 0.00 for 0.001, 0.0011 and 0.003, but one database
    sorts by the computed value: ids 1, 6, 11, 16 (0.1), 5, 10, 15, 20 (0.11). The router sorts
    on the rounded text, all ties, then id: 1, 5, 6, 11, 10, 9, 14, 15. Same with the
    expression only in ORDER BY (hidden sort key) and over a DOUBLE(10,2) column (dd * 0.01).

    Cause: execution._refuse_floats compares positions in ``rounded`` (fixed-decimal
    FLOAT/DOUBLE) freely: ``(floats - rounded) & compared``; a column's stored value is rounded
    to its decimals, but an expression's is not -- MariaDB rounds only the text it sends.

    Fixed by refusing any fixed-decimal FLOAT/DOUBLE compared across shards (the metadata does
    not tell a column from an expression); CAST(... AS DOUBLE) is exact."""
    _refused(w27, sql)
    _exact(
        w27,
        sql.replace("f2 * 0.01", "CAST(f2 * 0.01 AS DOUBLE)").replace(
            "dd * 0.01", "CAST(dd * 0.01 AS DOUBLE)"
        ),
    )


REFUSED_SINCE_REVIEW_27 = [
    "SELECT user_id, MAX(dd) AS m FROM r27 GROUP BY user_id ORDER BY m, user_id LIMIT 5",
    "SELECT user_id, MAX(f2) FROM r27 GROUP BY user_id ORDER BY MAX(f2), user_id LIMIT 4",
    "SELECT f2, id FROM r27 ORDER BY f2, id LIMIT 5",
    "SELECT id, f2 FROM r27c ORDER BY f2 DESC, id LIMIT 5",
    "SELECT DISTINCT f2 FROM r27 ORDER BY f2",
    "SELECT DISTINCT dd FROM r27 ORDER BY dd",
    "SELECT f2, COUNT(*) FROM r27 GROUP BY f2 ORDER BY f2",
]


@pytest.mark.parametrize("sql", REFUSED_SINCE_REVIEW_27)
def test_fixed_decimal_columns_compared_are_refused(w27: dict[str, Any], sql: str) -> None:
    """Answered right by the column's own decimals, but refused with the expressions above:
    the result metadata cannot tell a FLOAT(M,D) column from a fixed-decimal expression."""
    _refused(w27, sql)


def _refused(w: dict[str, Any], sql: str) -> None:
    from shardrouter.errors import UnsupportedQueryError

    for run in (
        lambda: w["router"].execute(sql),
        lambda: w["loop"].run_until_complete(w["aio"].execute(sql)),
    ):
        with pytest.raises(UnsupportedQueryError, match="FLOAT"):
            run()


# -- attacked, found right -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) + 9223372036854775808 - 9223372036854775808 FROM r27",
        "SELECT - - 9223372036854775808 + COUNT(*), -(-(9223372036854775808)) + COUNT(*) FROM r27",
        "SELECT -9223372036854775809 + COUNT(*), -18446744073709551615 + COUNT(*) FROM r27",
        "SELECT 18446744073709551615 % COUNT(*), 18446744073709551616 % COUNT(*),"
        " COUNT(*) % 18446744073709551615 FROM r27",
        "SELECT 18446744073709551615 DIV COUNT(*), -18446744073709551615 DIV COUNT(*),"
        " 36893488147419103232 DIV COUNT(*) FROM r27",
        "SELECT -COUNT(*) % 18446744073709551616, -COUNT(*) DIV 18446744073709551616 FROM r27",
        "SELECT -MAX(u) FROM r27 WHERE u = 9223372036854775808",
        "SELECT MIN(big) % -1, MIN(big) DIV 1 FROM r27",
        "SELECT COUNT(*) DIV 0.5, MAX(n) DIV 0.001 FROM r27",
        "SELECT +(+.5), (+(.5)), + ( .5 ), -(.5), +(-.5), +('a'), (+'a'), +(1e0), +((1))"
        " FROM r27 LIMIT 1",
        "SELECT SUM(amt), AVG(amt), AVG(n), AVG(ROUND(amt, 1)), SUM(amt * 2) FROM r27",
        "SELECT user_id, SUM(amt), AVG(db), SUM(f) FROM r27 GROUP BY user_id ORDER BY user_id"
        " LIMIT 3",
        "SELECT f2 * 3 AS x, ROUND(f2, 1), ROUND(db, 2) FROM r27 ORDER BY id LIMIT 6",
        "SELECT user_id, MAX(f2), SUM(amt) * 2 FROM r27 GROUP BY user_id ORDER BY user_id LIMIT 3",
        "SELECT user_id, MAX(f2) AS m, SUM(amt) FROM r27 GROUP BY user_id HAVING SUM(amt) > 3"
        " ORDER BY user_id LIMIT 3",
        "SELECT user_id, MAX(f2) FROM r27 GROUP BY user_id HAVING COUNT(*) > 2 ORDER BY user_id"
        " LIMIT 3",
        "SELECT MIN(f), MAX(f), COUNT(f), COUNT(f2), MIN(f2), MAX(f2), MIN(dd), MAX(dd) FROM r27",
        "SELECT dd FROM r27 WHERE user_id = 2 UNION SELECT dd FROM r27 WHERE user_id = 7"
        " ORDER BY 1",
        "SELECT dd FROM r27c WHERE user_id = 2 UNION SELECT f4 FROM r27c WHERE user_id = 7"
        " ORDER BY 1",
        "SELECT f2 FROM r27c WHERE user_id = 2 UNION SELECT f4 FROM r27c WHERE user_id = 7"
        " ORDER BY 1",
        "SELECT f2 FROM r27c WHERE user_id = 2 UNION SELECT dd FROM r27c WHERE user_id = 7"
        " ORDER BY 1",
        "SELECT amt FROM r27 WHERE user_id = 2 UNION SELECT dd FROM r27 WHERE user_id = 7"
        " ORDER BY 1",
    ],
)
def test_passing_review27_shapes(w27: dict[str, Any], sql: str) -> None:
    """Attacked, found right (labels, values, types, sync and async)."""
    _exact(w27, sql)
