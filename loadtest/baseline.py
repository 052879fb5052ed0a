"""The baseline of ``loadtest/run --baseline``: the same order service on one plain database,
no router. ``PlainDatabase`` answers the few Router calls the service makes (``execute``,
``transaction``, ``page``, ``route_key``, ``topology``) with SQLAlchemy on one engine, so the
service code, its statements and the Locust mix are exactly those of the sharded run.

What differs is what an unsharded service would do differently: no merchant lookup rows (the
``idx_merchant_created`` index answers a merchant's page), no routing, no merge. The topology
is kept for what is not database work: ids (same generator, same lease) and the id's slot
check, which the sharded service does too.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.engine import make_url

from shardrouter import Topology
from shardrouter.engine.engines import engine_options

SCHEMA = Path(__file__).resolve().parents[1] / "migrations" / "0001_orders.sql"


@dataclass
class PlainResult:
    rows: list[tuple[Any, ...]]
    rowcount: int


@dataclass
class PlainPage:
    rows: list[tuple[Any, ...]]
    after: tuple[Any, ...] | None


class _Tx:
    def __init__(self, conn: Connection, texts: dict[str, Any]) -> None:
        self._conn = conn
        self._texts = texts

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> PlainResult:
        return _run(self._conn, self._texts, sql, params)


def _run(
    conn: Connection, texts: dict[str, Any], sql: str, params: Mapping[str, Any] | None
) -> PlainResult:
    clause = texts.get(sql)
    if clause is None:  # compiled once per statement text, as the router caches its plans
        clause = texts[sql] = text(sql)
    result = conn.execute(clause, dict(params or {}))
    rows = [tuple(r) for r in result] if result.returns_rows else []
    return PlainResult(rows, result.rowcount)


class PlainDatabase:
    """One database; see the module docstring. ``close()`` disposes of the engine."""

    def __init__(self, url: str, topology: Topology) -> None:
        self.topology = topology
        # The engine settings of the topology's first shard, as the router makes its engines:
        # the same pool (connection reuse, pre-ping) and the same driver settings (connect,
        # read and write timeouts, the session's lock wait). Without the read timeout the
        # baseline would skip a cost the shards pay for a safety a production service also
        # wants: under gevent every socket wait arms a timer (measured: about 20 us of client
        # CPU per write of the keyed mix, 25 per placed order).
        options = engine_options(make_url(url), next(iter(topology.config.shards.values())).pool)
        self.engine: Engine = create_engine(url, **options)
        # Reads as the router's lean read pool runs them: autocommit connections, one round
        # trip per query (no checkout ping, no BEGIN, no reset ROLLBACK). A baseline paying
        # two more round trips per read than the router would flatter the router (review 13).
        self.reader: Engine = create_engine(
            url,
            isolation_level="AUTOCOMMIT",
            pool_reset_on_return=None,
            **{**options, "pool_pre_ping": False},
        )
        # SQLAlchemy rolls back a Connection's (autobegun) transaction when it closes, also on
        # an autocommit connection: a ROLLBACK round trip for nothing. Not on this engine,
        # which only runs single SELECTs in autocommit.
        self.reader.dialect.do_rollback = lambda dbapi_connection: None  # type: ignore[method-assign]
        self._texts: dict[str, Any] = {}

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    def route_key(self, **key: Any) -> tuple[str, int]:
        ((column, value),) = key.items()
        return "baseline", int(self.topology.slot_for("orders", value, column))

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> PlainResult:
        if sql.lstrip()[:6].upper() == "SELECT":
            with self.reader.connect() as conn:
                return _run(conn, self._texts, sql, params)
        with self.engine.begin() as conn:
            return _run(conn, self._texts, sql, params)

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        with self.engine.begin() as conn:
            yield _Tx(conn, self._texts)

    def page(
        self,
        table: str,
        *,
        columns: Sequence[str],
        order_by: Sequence[str],
        where: Mapping[str, Any] | None = None,
        after: Sequence[Any] | None = None,
        limit: int = 20,
    ) -> PlainPage:
        """Newest first, keyset: the same page the router returns (columns are NOT NULL here,
        so the cursor needs no NULL cases)."""
        params: dict[str, Any] = {}
        clauses = []
        for i, (column, value) in enumerate((where or {}).items()):
            params[f"w{i}"] = value
            clauses.append(f"{column} = :w{i}")
        if after is not None:
            # (a, b) < (:a, :b) spelled out, as the router spells it
            past = []
            for i in range(len(order_by)):
                equal = [f"{order_by[j]} = :k{j}" for j in range(i)]
                past.append("(" + " AND ".join([*equal, f"{order_by[i]} < :k{i}"]) + ")")
            clauses.append("(" + " OR ".join(past) + ")")
            params.update({f"k{i}": value for i, value in enumerate(after)})
        selected = list(dict.fromkeys([*columns, *order_by]))
        sql = (
            f"SELECT {', '.join(selected)} FROM {table}"
            + (f" WHERE {' AND '.join(clauses)}" if clauses else "")
            + f" ORDER BY {', '.join(f'{c} DESC' for c in order_by)} LIMIT {int(limit)}"
        )
        rows = self.execute(sql, params).rows
        positions = [selected.index(c) for c in order_by]
        last = tuple(rows[-1][p] for p in positions) if len(rows) == limit else None
        return PlainPage([r[: len(columns)] for r in rows], last)


def create_schema(url: str) -> None:
    """The orders schema in logical names (one table each) on the baseline database."""
    statements = [
        s.strip()
        for s in "\n".join(
            line for line in SCHEMA.read_text().splitlines() if not line.startswith("--")
        ).split(";")
        if s.strip()
    ]
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            for statement in statements:
                conn.execute(text(statement))
    finally:
        engine.dispose()
