"""Review 25: the fixes of review 24 (git log 48870e8..c65f4a6 and b2520cf, 88a12cf) attacked
on 4 real MariaDB shards against the oracle sandbox.

Each test marked FINDING failed on the reviewed code (all fixed since); its docstring gives the
statement, what one database answers, what the router answered and a guess of the cause. The tests named
``test_passing_*`` pin shapes that were attacked and found right.

Tables (own names, own oracle database): ``r25`` (hash on user_id, 2 splits) and ``r25b``
(hash on user_id), with strings differing in case/accents/trailing spaces, NULLs, DATE, FLOAT,
FLOAT(7,2), DOUBLE, BIGINT UNSIGNED, large BIGINTs and DECIMAL.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import os
import signal
import subprocess
import sys
import threading
import time
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
    func,
    select,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.readpool import _Slots
from shardrouter.engine.router import Router
from shardrouter.errors import ShardRouterError, UnsupportedQueryError
from shardrouter.orm import routed_sessionmaker

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(180)]

ORACLE_DB = "review25"
USERS = [5 * i + 2 for i in range(24)]
STRINGS = ("b", "B", "a", "é", "e", "E ", "c", None, "ä", "A")

DDL = {
    "r25": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, s VARCHAR(16) NULL, n INT NULL,"
    " d DATE NULL, f FLOAT NULL, f2 FLOAT(7,2) NULL, db DOUBLE NULL, u BIGINT UNSIGNED NULL,"
    " big BIGINT NULL, amt DECIMAL(10,2) NULL, PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
    "r25b": "(id BIGINT NOT NULL, user_id BIGINT NOT NULL, s VARCHAR(16) NULL, n INT NULL,"
    " PRIMARY KEY (id)) DEFAULT CHARSET=utf8mb4",
}
FLOATS = (1000001.0, 1000002.0, 1000003.0, None, 16777217.0, 2.5)


def _rows() -> dict[str, list[dict[str, Any]]]:
    r25, r25b = [], []
    k = 0
    for i, user in enumerate(USERS):
        for _ in range(3):
            k += 1
            r25.append(
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
        r25b.append({"id": i + 1, "user_id": user, "s": STRINGS[i % 5], "n": i % 4})
    return {"r25": r25, "r25b": r25b}


@pytest.fixture(scope="module")
def w25(shard_databases: Path, oracle: Any) -> Iterator[dict[str, Any]]:
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"]["r25"] = {"column": "user_id", "strategy": "hash", "split": 2}
    raw["tables"]["r25b"] = {"column": "user_id", "strategy": "hash"}
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


class _R25(_Base):
    __tablename__ = "r25"
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


# -- a254c01: fair read-pool slots ----------------------------------------------------------------


class _Interrupt(Exception):
    pass


def _interrupt(signum: int, frame: Any) -> None:
    raise _Interrupt


def test_slots_interrupted_waiter_keeps_the_next_released_slot() -> None:
    """FINDING (regression of a254c01). A caller waiting in _Slots.acquire that is interrupted
    (KeyboardInterrupt / a signal handler's exception in the main thread; under gevent a
    gevent.Timeout or a killed greenlet, below) leaves its _Waiter in the queue; the next
    release() hands the slot to that dead waiter, and the slot is gone for good: with
    pool.size + max_overflow such interrupts every read of the shard waits pool.timeout_s and
    fails. Before a254c01 (Condition.wait_for, ``_waiting`` decremented in ``finally``) the slot
    came back: try_acquire() after the release was True; now it is False.

    Cause: shardrouter/engine/readpool.py _Slots.acquire removes the waiter only on its own
    timeout (``if left <= 0``), not in a ``finally`` for an exception out of
    ``waiter.wake.wait`` (nor hands on a slot granted just before the exception)."""
    slots = _Slots(1)
    assert slots.acquire(1.0)
    previous = signal.signal(signal.SIGALRM, _interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        with pytest.raises(_Interrupt):
            slots.acquire(5.0)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    slots.release()
    assert slots.try_acquire(), "the released slot went to the interrupted waiter: leaked"


GEVENT_LEAK = """
from gevent import monkey; monkey.patch_all()
import gevent
from shardrouter.engine.readpool import _Slots
slots = _Slots(1)
assert slots.acquire(1.0)
try:
    with gevent.Timeout(0.05):
        slots.acquire(5.0)
except gevent.Timeout:
    pass
slots.release()
killed = _Slots(1)
assert killed.acquire(1.0)
g = gevent.spawn(killed.acquire, 5.0)
gevent.sleep(0.05)
g.kill()
killed.release()
print(slots.try_acquire(), killed.try_acquire())
"""


def test_slots_under_gevent_timeout_or_kill_leak_a_slot() -> None:
    """FINDING (regression of a254c01), the gevent form (Locust users wrap calls in
    gevent.Timeout; Locust kills its users' greenlets on stop): a waiter ended by
    gevent.Timeout or greenlet.kill() keeps its place in the queue and swallows the next
    released slot. Before a254c01 both print True; now False False."""
    out = subprocess.run(
        [sys.executable, "-c", GEVENT_LEAK],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_passing_slots_many_threads_short_timeouts_no_drift() -> None:
    """Attacked, found right: 16 threads acquiring with timeouts around the hold time, then
    releasing: no slot lost or added (the count ends where it began)."""
    slots = _Slots(3)
    stop = time.monotonic() + 1.0

    def work() -> None:
        while time.monotonic() < stop:
            if slots.acquire(0.001):
                time.sleep(0.0005)
                slots.release()

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert [slots.try_acquire() for _ in range(4)] == [True, True, True, False]


# -- 040ea62: GROUP BY without ORDER BY ----------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT DISTINCT MAX(n) FROM r25 GROUP BY user_id LIMIT 3",
        "SELECT DISTINCT n FROM r25 GROUP BY user_id, n LIMIT 4",
        "SELECT DISTINCT SUM(amt) FROM r25 GROUP BY user_id LIMIT 4",
    ],
    ids=["max", "group-column", "sum"],
)
def test_distinct_over_groups_limit_keeps_other_rows(w25: dict[str, Any], sql: str) -> None:
    """FINDING (040ea62 incomplete). SELECT DISTINCT MAX(n) FROM r25 GROUP BY user_id LIMIT 3:
    one database sorts the groups by user_id, deduplicates in that order and keeps the first
    three: [7, 3, 5]. The router: [1, 5, 6] -- other values, not another order (likewise
    DISTINCT n ... GROUP BY user_id, n LIMIT 4: [0, 4, 7, None] vs [-3, 0, -2, 1]). The ORM's
    select(max(n)).group_by(user_id).distinct().limit(3) too.

    Cause: merge._grouped runs _distinct (first occurrence in the shards' arrival order)
    before the new GROUP BY sort, so the row kept for a value is not the one of the first
    group in GROUP BY order; the sort then orders the survivors by those later groups."""
    _exact(w25, sql)


def test_orm_distinct_over_groups_limit(w25: dict[str, Any]) -> None:
    """FINDING (same cause, through routed_sessionmaker): [(7,), (3,), (5,)] on one database,
    [(1,), (5,), (6,)] through the ORM."""
    stmt = select(func.max(_R25.n)).group_by(_R25.user_id).distinct().limit(3)
    with w25["oracle"].connect() as conn:
        expected = [tuple(r) for r in conn.execute(stmt)]
    with routed_sessionmaker(w25["router"])() as session:
        got = [tuple(r) for r in session.execute(stmt)]
    assert got == expected


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT n, COUNT(*) FROM r25 GROUP BY n LIMIT 4",  # NULL group first
        "SELECT d, COUNT(*) FROM r25 GROUP BY d LIMIT 4",
        "SELECT n % 3, COUNT(*) FROM r25 GROUP BY n % 3",
        "SELECT u, COUNT(*) FROM r25 GROUP BY u LIMIT 3",
        "SELECT big, COUNT(*) FROM r25 GROUP BY big",
        "SELECT UPPER(s), COUNT(*) FROM r25 GROUP BY UPPER(s) LIMIT 4",
        "SELECT BINARY s, COUNT(*) FROM r25 GROUP BY BINARY s",
        "SELECT DISTINCT COUNT(*) FROM r25 GROUP BY user_id LIMIT 2",
        "SELECT n, COUNT(DISTINCT s) FROM r25 GROUP BY n LIMIT 4",
        "SELECT n, SUM(DISTINCT amt) FROM r25 GROUP BY n LIMIT 4",
        "SELECT s, n, COUNT(*) FROM r25 WHERE user_id IN (7, 12) GROUP BY n, s",
        "SELECT b.n, COUNT(*) FROM r25 a JOIN r25b b ON a.user_id = b.user_id GROUP BY b.n",
        "SELECT n > 0, COUNT(*) FROM r25 GROUP BY n > 0",
    ],
)
def test_passing_group_by_order_shapes(w25: dict[str, Any], sql: str) -> None:
    _exact(w25, sql)


# -- 0861032: FLOAT columns -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT user_id, COUNT(*), MAX(f) FROM r25 GROUP BY user_id HAVING COUNT(*) > 1"
        " ORDER BY 1 LIMIT 3",
        "SELECT user_id, COUNT(*) * 2, MAX(f) FROM r25 GROUP BY user_id ORDER BY 1 LIMIT 3",
    ],
    ids=["having", "computed"],
)
def test_float_only_carried_beside_having_or_computed_item_is_refused(
    w25: dict[str, Any], sql: str
) -> None:
    """FINDING (regression of 0861032). MAX(f) is only carried (docs/SQL.md: "Carried through,
    or as MIN/MAX (the rounding keeps the order), a FLOAT merges"); HAVING and the computed
    item read COUNT(*) only. One database: [(2, 3, 1000000.0), (7, 3, 16777200.0), ...]; the
    router answered exactly that before 0861032 and now raises UnsupportedQueryError "a FLOAT
    value (MAX(f)) is ordered, grouped, deduplicated or computed with".

    Cause: execution._refuse_floats treats every column as compared as soon as the plan has a
    HAVING or a computed item (``positions = set(range(width))``), instead of the columns those
    expressions read."""
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT DISTINCT f2 FROM r25 ORDER BY f2",
        "SELECT f2, COUNT(*) FROM r25 GROUP BY f2 ORDER BY 1",
        "SELECT f2 FROM r25 ORDER BY f2, id LIMIT 5",
    ],
    ids=["distinct", "group-by", "order-by"],
)
def test_float_m_d_column_is_refused_though_exact(w25: dict[str, Any], sql: str) -> None:
    """FINDING (regression of 0861032, over-refusal). f2 is FLOAT(7,2): MariaDB sends it with
    its 2 decimals (3.5, 7.75, 12.25), not in 6 significant digits, and the value stored was
    rounded to those decimals, so two stored values the server tells apart are sent apart.
    One database and the router before 0861032: [None, 3.5, 7.75, 12.25]; now
    UnsupportedQueryError "a FLOAT value (f2) ...".

    Cause: execution.float_columns flags every MYSQL_TYPE_FLOAT, whatever its decimals in the
    metadata (31 for a plain FLOAT; D for FLOAT(M,D)).

    Answered after review 25, refused again after review 27: a fixed-decimal expression
    (f2 * 0.01) has the same metadata as the column and is not kept apart by its decimals, so
    both are refused; CAST(f2 AS DOUBLE) is exact."""
    from shardrouter.errors import UnsupportedQueryError

    with pytest.raises(UnsupportedQueryError, match="FLOAT"):
        w25["router"].execute(sql)
    _exact(
        w25,
        sql.replace("f2", "CAST(f2 AS DOUBLE)", 1)
        .replace("ORDER BY f2", "ORDER BY 1")
        .replace("GROUP BY f2", "GROUP BY 1"),
    )


def test_union_float_refusal_names_a_way_out_that_is_refused(w25: dict[str, Any]) -> None:
    """FINDING (message). SELECT f FROM r25 WHERE f > 100 UNION ALL SELECT n FROM r25b ORDER
    BY 1 is refused: "... CAST(x AS DECIMAL(...)) or DOUBLE in every SELECT". Following it
    with DOUBLE (CAST(f AS DOUBLE) in both SELECTs, or two DOUBLE columns) is refused with
    the same message (docs/SQL.md says a UNION of DOUBLE SELECTs across targets is refused),
    while one database answers [None, 2.5, 1000001.0, ...].

    Cause: execution._union_rows' refusal text (the "or DOUBLE" way out)."""
    _exact(
        w25,
        "SELECT CAST(f AS DOUBLE) FROM r25 WHERE user_id = 7 UNION"
        " SELECT CAST(f AS DOUBLE) FROM r25 WHERE user_id = 12 ORDER BY 1",
    )


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT MIN(f), MAX(f) FROM r25",
        "SELECT d, MIN(f) FROM r25 GROUP BY d ORDER BY d LIMIT 3",
        "SELECT f + 0 AS g, COUNT(*) FROM r25 WHERE f > 100 GROUP BY 1 ORDER BY 1",
        "SELECT COALESCE(f, 0) AS g FROM r25 WHERE f > 100 ORDER BY g, id",
        "SELECT id FROM r25 WHERE f > 100 ORDER BY f * 1 DESC, id LIMIT 5",
        "SELECT user_id, GROUP_CONCAT(f ORDER BY id) FROM r25 WHERE f > 100 GROUP BY user_id"
        " ORDER BY user_id LIMIT 3",
        "SELECT user_id, MAX(db) - MIN(db) FROM r25 GROUP BY user_id ORDER BY 1 LIMIT 4",
        "SELECT id, f > 1000001 AS big FROM r25 WHERE f > 100 ORDER BY big, id",
        "SELECT -f AS g FROM r25 WHERE f > 100 ORDER BY g, id",  # -f is a DOUBLE
    ],
)
def test_passing_float_shapes(w25: dict[str, Any], sql: str) -> None:
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT CASE WHEN f > 0 THEN f END AS g FROM r25 WHERE f > 100 ORDER BY g, id",
        "SELECT a.id FROM r25 a JOIN r25b b ON a.user_id = b.user_id WHERE a.f > 100"
        " ORDER BY a.f DESC, a.id LIMIT 5",
        "SELECT GROUP_CONCAT(DISTINCT f) FROM r25 WHERE f > 100",
        "SELECT MAX(f) + 0 FROM r25",
    ],
)
def test_passing_float_shapes_refused(w25: dict[str, Any], sql: str) -> None:
    for run in _both(w25, sql):
        with pytest.raises(UnsupportedQueryError, match="FLOAT"):
            run()


def test_orm_float_refusal_names_an_internal_column(w25: dict[str, Any]) -> None:
    """FINDING (message, 0861032). select(R.id, R.f).order_by(R.f.desc(), R.id).limit(3)
    through routed_sessionmaker is refused (right), but the message names
    "a FLOAT value (shardrouter_sort_0)": the ORM path's own sort-key label, which means
    nothing to the caller (the router's path hides its shardrouter_h* columns).

    Cause: execution._refuse_float_at's _HIDDEN pattern matches only hidden_name() columns,
    not orm/session.py's _SORT_LABEL columns (_refuse_index_ordered_sort_keys)."""
    stmt = select(_R25.id, _R25.f).where(_R25.f > 100).order_by(_R25.f.desc(), _R25.id).limit(3)
    with (
        routed_sessionmaker(w25["router"])() as session,
        pytest.raises(UnsupportedQueryError) as info,
    ):
        session.execute(stmt).all()
    assert "shardrouter_sort" not in str(info.value)


# -- 1327d33: UNION quotients ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT ROUND(AVG(amt), 2) FROM r25 WHERE user_id = 7 UNION ALL"
        " SELECT amt / 3 FROM r25 WHERE user_id = 12 ORDER BY 1",
        "SELECT id, ROUND(amt / 3, 2) FROM r25 WHERE user_id = 7 UNION ALL"
        " SELECT id, amt / 3 FROM r25 WHERE user_id = 12 ORDER BY 1",
        "SELECT id, amt / 2 FROM r25 WHERE user_id = 7 UNION ALL"
        " SELECT id, CAST(amt AS DECIMAL(20,8)) FROM r25 WHERE user_id = 12 ORDER BY 1",
    ],
    ids=["round-avg", "round-division", "exact-half"],
)
def test_union_exact_quotient_is_refused(w25: dict[str, Any], sql: str) -> None:
    """FINDING (regression of 1327d33, over-refusal). ROUND(AVG(amt), 2) is exactly its 2
    decimals; one database pads it to the UNION column's scale 6: Decimal('1.920000'), as the
    router did before 1327d33. Now UnsupportedQueryError "SELECT 1 sends a quotient (a
    division or AVG) rounded to 2 decimals". Same for ROUND(amt / 3, 2), and for amt / 2
    (exact at its own scale 6, column scale 8: Decimal('2.12500000')).

    Cause: planner.quotient_items marks any item holding an AVG or a division anywhere
    (item.find(exp.Avg), find_all(exp.Div)), even under a ROUND that fixes its digits, and
    every divisor but 10**k, though x / 2 (or / 4, / 5, / 8 ...) is exact at the scale its
    SELECT sends."""
    _exact(w25, sql)


# -- b2520cf / c65f4a6: integer arithmetic after the merge -----------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT COUNT(*) - 18446744073709551616 FROM r25",
        "SELECT COUNT(*) + 18446744073709551616 FROM r25",
        "SELECT COUNT(*) * 99999999999999999999 FROM r25",
    ],
    ids=["minus", "plus", "times"],
)
def test_integer_literal_beyond_bigint_unsigned_is_decimal(w25: dict[str, Any], sql: str) -> None:
    """FINDING (b2520cf/c65f4a6). An integer literal above 18446744073709551615 is a DECIMAL
    in MySQL, so COUNT(*) - 18446744073709551616 is DECIMAL arithmetic: one database answers
    Decimal('-18446744073709551544'). The router raises ExecutionError "BIGINT UNSIGNED value
    is out of range ... (error 1690)" (before c65f4a6 it answered the int, wrong type).

    Cause: scatter._arith/_bigint treat every Python int operand as BIGINT; the literal's
    value is parsed as an int, not typed DECIMAL when it exceeds 2**64 - 1."""
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT -MIN(big) FROM r25",
        "SELECT user_id, COUNT(*) FROM r25 GROUP BY user_id HAVING -MAX(u) < 0",
        "SELECT user_id, ABS(MIN(big)) FROM r25 GROUP BY user_id",
        "SELECT user_id, MIN(big) DIV -1 FROM r25 GROUP BY user_id",
        "SELECT user_id, MAX(u) DIV -2 FROM r25 WHERE u < 100 GROUP BY user_id",
        "SELECT user_id, MAX(u) % 10 - 1 FROM r25 WHERE u < 100 GROUP BY user_id",
    ],
    ids=["neg-signed", "neg-unsigned", "abs", "div-signed", "div-unsigned", "mod-unsigned"],
)
def test_range_error_of_one_database_answered(w25: dict[str, Any], sql: str) -> None:
    """FINDING (b2520cf incomplete: "integer arithmetic ... MySQL's BIGINT arithmetic ... a
    result outside its range is ExecutionError"). One database raises 1690 (BIGINT [UNSIGNED]
    value is out of range) for each; the router answers rows: -MIN(big) with MIN(big) =
    -2**63 gives 9223372036854775808, HAVING -MAX(u) < 0 keeps groups (MAX(u) = 2**64 - 1),
    ABS(MIN(big)) 9223372036854775808, MIN(big) DIV -1 9223372036854775808, MAX(u) DIV -2
    gives -2 (UNSIGNED DIV is UNSIGNED), and MAX(u) % 10 - 1 gives -1 for MAX(u) = 0
    (UNSIGNED MOD is UNSIGNED, so the subtraction is too).

    Cause: only + - * go through scatter._bigint; scatter._negate, ABS, _int_divide and
    _modulo neither check the BIGINT range nor keep merge.Unsigned on their result."""
    with pytest.raises(Exception, match="out of range"):
        _oracle(w25, sql)
    for run in _both(w25, sql):
        with pytest.raises(ShardRouterError, match="out of range"):
            run()


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT user_id, MIN(u) - 1 FROM r25 GROUP BY user_id ORDER BY user_id LIMIT 1",
        "SELECT user_id, MAX(big) + 1 FROM r25 WHERE big < 5 OR user_id = 7 GROUP BY user_id"
        " ORDER BY user_id LIMIT 1",
    ],
    ids=["unsigned", "signed"],
)
def test_select_item_error_in_a_group_limit_drops(w25: dict[str, Any], sql: str) -> None:
    """FINDING (regression of b2520cf). One database computes a select item for the rows it
    sends: ... ORDER BY user_id LIMIT 1 answers [(2, 4)] although MIN(u) - 1 is out of range
    for user 7 (MIN(u) = 0), which LIMIT drops. The router computes every kept group's items
    before ORDER BY/LIMIT and raises ExecutionError "BIGINT UNSIGNED value is out of range (0
    and 1 give -1)". Before b2520cf the unsigned form answered [(2, 4)]. docs/SQL.md: "Select
    items are computed for the groups HAVING keeps, as MySQL computes them".

    Cause: merge._grouped computes ``plan.computed`` for every group after HAVING, before the
    sort and merge()'s islice; only the items ORDER BY reads need computing for all groups."""
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT user_id, MAX(u) DIV 2, MAX(u) % 7, MAX(u) + 0 FROM r25 GROUP BY user_id"
        " ORDER BY user_id LIMIT 4",
        "SELECT user_id, -MAX(u) FROM r25 WHERE u < 100 GROUP BY user_id ORDER BY 1 LIMIT 4",
        "SELECT user_id, MIN(n) % 3, MIN(n) DIV 2, MIN(n) DIV -2 FROM r25 GROUP BY user_id"
        " ORDER BY user_id LIMIT 6",
        "SELECT user_id, SUM(u) - 100 FROM r25 GROUP BY user_id ORDER BY user_id LIMIT 4",
        "SELECT user_id, MIN(u) / 2, MIN(u) - 1.5 FROM r25 GROUP BY user_id ORDER BY 1 LIMIT 4",
        "SELECT MAX(u) = 5, MAX(u) IN (5, 6), MAX(u) BETWEEN 1 AND 9 FROM r25 WHERE u = 5",
        "SELECT user_id, SUM(n) * 9223372036854775807 FROM r25 GROUP BY user_id"
        " ORDER BY user_id LIMIT 3",
        "SELECT user_id, MIN(u) - 1 FROM r25 WHERE u IS NOT NULL GROUP BY user_id"
        " HAVING MIN(u) > 0 ORDER BY 1 LIMIT 4",
    ],
)
def test_passing_integer_arithmetic(w25: dict[str, Any], sql: str) -> None:
    _exact(w25, sql)


# -- ceae3a0 / 7419c20: labels --------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT s AS 'x😀' FROM r25 WHERE user_id = 7 ORDER BY id LIMIT 1",
        "SELECT COUNT(*) AS 'a😀' FROM r25",
        'SELECT MAX(s) AS "m😀" FROM r25',
    ],
    ids=["one-target", "scatter", "double-quoted"],
)
def test_non_bmp_string_alias_is_an_error(w25: dict[str, Any], sql: str) -> None:
    """FINDING (ceae3a0 incomplete). An alias written as a string ('x😀') is accepted by
    MariaDB and labelled 'x?' (only an identifier alias `x😀` is error 1300). The router
    raises ExecutionError "1300: Invalid utf8mb4 character string" -- even routed to one
    shard by its key: it sends the alias as an identifier.

    Cause: the rendering turns a string alias into a quoted identifier, and
    scatter.mysql_label applies only to unaliased items (planner.label_as_written,
    scatter._label keeps an Alias's identifier as it is)."""
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT (.5), COUNT(*) FROM r25",
        "SELECT +.5, COUNT(*) FROM r25",
        "SELECT ('a' 'b'), COUNT(*) FROM r25",
    ],
    ids=["parenthesised", "plus", "parenthesised-strings"],
)
def test_literal_label_forms_left_out(w25: dict[str, Any], sql: str) -> None:
    """FINDING (7419c20 incomplete, labels). One database labels (.5) and +.5 as '.5' and
    ('a' 'b') as 'ab'; the router labels them '0.5', '0.5' and "('a' 'b')".

    Cause: planner._literal_label looks at the item itself (a Literal, or a Concat of
    strings), not under a Paren, and skips any text starting with '+' (MariaDB drops the
    '+' and keeps the rest as written)."""
    _exact(w25, sql)


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT CONCAT(s, '😀'), COUNT(*) FROM r25 WHERE user_id = 7 GROUP BY s ORDER BY 2",
        "SELECT '😀' '😀', COUNT(*) FROM r25",
        "SELECT 1e3, 1.50, 00012, 0x41, -.5, 5., COUNT(*) FROM r25",
        "SELECT 'it''s', 'a' 'b''c', 'a' 'b' 'c', '' 'b', 'x' /* c */ 'y', COUNT(*) FROM r25",
        "SELECT .5, s FROM r25 ORDER BY id LIMIT 2",
        "SELECT .5 FROM r25 UNION ALL SELECT .25 FROM r25b ORDER BY 1 LIMIT 2",
    ],
)
def test_passing_labels(w25: dict[str, Any], sql: str) -> None:
    _exact(w25, sql)


# -- 88a12cf: UNION LIMIT/OFFSET parameters -------------------------------------------------------


@pytest.mark.parametrize(
    ("sql", "params"),
    [
        (
            "SELECT id FROM r25 UNION ALL SELECT id FROM r25b ORDER BY 1 LIMIT :n OFFSET :m",
            {"n": 3, "m": 70},
        ),
        (
            "SELECT id FROM r25 UNION ALL SELECT id FROM r25b ORDER BY 1 LIMIT :n OFFSET :m",
            {"n": 18446744073709551615, "m": 5},
        ),
        (
            "SELECT id FROM r25 WHERE id > :n UNION ALL SELECT id FROM r25b ORDER BY 1 LIMIT :n",
            {"n": 3},
        ),
        (
            "SELECT id FROM r25 UNION ALL SELECT id FROM r25b ORDER BY 1 LIMIT :n OFFSET :n",
            {"n": 3},
        ),
        (
            "SELECT user_id, COUNT(*) FROM r25 GROUP BY user_id UNION ALL"
            " SELECT user_id, n FROM r25b ORDER BY 1, 2 LIMIT :n OFFSET :m",
            {"n": 3, "m": 2},
        ),
        (
            "SELECT s FROM r25 WHERE user_id = 7 UNION SELECT s FROM r25 WHERE user_id = 7"
            " ORDER BY 1 LIMIT :m, :n",
            {"n": 2, "m": 1},
        ),
    ],
)
def test_passing_union_limit_parameters(
    w25: dict[str, Any], sql: str, params: dict[str, Any]
) -> None:
    _exact(w25, sql, params)
