"""The fuzzer's judge: runs one generated statement on the oracle and through Router and
AsyncRouter, and raises ``Finding`` unless each router answers what one database answers or
refuses with a typed shardrouter error.

The world: 4 shards (the orders topology, loaded through the router) and one unsharded MariaDB
database with the same rows (the oracle). Reads always see the base data; a write is checked on
its own copy and the tables it may change are restored afterwards, on both sides.

Comparison rules (MySQL's result is the truth):
- column labels must be the oracle's labels;
- values compare with their type: int, Decimal (with its scale), float (to 12 digits: summation
  order is not an error), dates; strings compare by their utf8mb4_general_ci weight, which the
  oracle computes (a case-insensitive GROUP BY may return any member of a group);
- rows are checked against the oracle's *rank query* (see fuzz_grammar): every row must exist
  in the full answer at the rank its position implies, so any order among ties and any choice
  among ties at a LIMIT boundary is accepted, and nothing else;
- writes: the same rowcount, then every table equal between the union of the shards and the
  oracle, every broadcast copy equal, and the lookup tables exactly what the base tables imply.
"""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import re
from collections import Counter
from collections.abc import Iterable
from decimal import Decimal
from pathlib import Path
from typing import Any, ClassVar

from fuzz_data import ALL_COLUMNS, Dataset, build
from fuzz_grammar import Case
from sqlalchemy import Engine, create_engine, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.aio import AsyncRouter
from shardrouter.engine.engines import ShardEngines
from shardrouter.engine.router import Router
from shardrouter.errors import ExecutionError, ShardRouterError, UnknownKeyError
from shardrouter.ops.schema import apply
from shardrouter.sql.planner import Planner, Target

BASE_TABLES = ("users", "orders", "order_items", "countries")
LOOKUPS = {"orders": ("merchant_orders",), "users": ("user_emails",)}
SHARDED = ("users", "orders", "order_items", "merchant_orders", "user_emails")


REPORTS: list[dict[str, Any]] = []
"""Coverage of each finished fuzz session, for the pytest terminal summary (conftest.py)."""


class Finding(AssertionError):
    """A wrong answer, an untyped exception, a shard error on an accepted statement, or sync
    and async disagreeing. ``signature`` groups findings by cause for the long run."""

    def __init__(self, kind: str, case: Case, detail: str, signature: str) -> None:
        self.kind = kind
        self.case = case
        self.signature = signature
        super().__init__(f"[{kind}] {case}\n{detail}")


class HarnessError(RuntimeError):
    """The fuzzer itself is wrong (its checker rejected the oracle's own answer)."""


def _order_dependent(exc: BaseException) -> bool:
    """An error one database raises or not depending on which rows it evaluates first (a value
    out of range in one row): a router that answers without reaching that row is not wrong."""
    return "1690" in str(exc) or "out of range" in str(exc)


def _message_shape(exc: BaseException) -> str:
    """An exception message without its values: for grouping findings by cause."""
    msg = str(exc).split("\n")[0]
    msg = re.sub(r"'[^']*'|\"[^\"]*\"|`[^`]*`", "?", msg)
    msg = re.sub(r"\d+", "N", msg)
    return f"{type(exc).__name__}: {msg[:90]}"


class Outcome:
    """What one side did with a statement: rows (and labels, rowcount) or an exception."""

    def __init__(
        self,
        columns: tuple[str, ...] = (),
        rows: list[tuple[Any, ...]] | None = None,
        rowcount: int = -1,
        error: BaseException | None = None,
    ) -> None:
        self.columns = columns
        self.rows = rows or []
        self.rowcount = rowcount
        self.error = error

    def describe(self, limit: int = 12) -> str:
        if self.error is not None:
            return _message_shape(self.error) + f" | {str(self.error).splitlines()[0][:300]}"
        shown = "\n      ".join(repr(r) for r in self.rows[:limit])
        more = f"\n      ... {len(self.rows) - limit} more" if len(self.rows) > limit else ""
        return f"columns={self.columns} rowcount={self.rowcount} rows({len(self.rows)}):\n      {shown}{more}"


class World:
    """Shards + oracle loaded with the fuzz data set, and the two routers under test."""

    def __init__(self, shard_topology: Path, oracle_server_url: str, oracle_db: str) -> None:
        self.topology = Topology.load(shard_topology)
        self.engines = ShardEngines(self.topology)
        apply(self.topology, self.engines).raise_for_errors()
        raw: dict[str, Any] = copy.deepcopy(
            self.topology.config.model_dump(by_alias=True, mode="json")
        )
        server = create_engine(oracle_server_url)
        with server.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{oracle_db}`"))
            conn.execute(text(f"CREATE DATABASE `{oracle_db}`"))
        server.dispose()
        url = oracle_server_url.rstrip("/").rsplit("/", 1)[0] + f"/{oracle_db}"
        raw["shards"] = {"oracle": {"primary": url, "slots": [[0, raw["slots"]]]}}
        for table in raw["tables"].values():
            table["split"] = 1
        oracle_topology = Topology(config_from_dict(raw))
        self.oracle_engines = ShardEngines(oracle_topology)
        apply(oracle_topology, self.oracle_engines).raise_for_errors()
        self.oracle: Engine = self.oracle_engines.primary("oracle")
        self.router = Router(self.topology, engines=self.engines, allow_scatter_write=True)
        self.aio = AsyncRouter(self.topology, allow_scatter_write=True)
        self.loop = asyncio.new_event_loop()
        self._planner = Planner(self.topology)
        self._weights: dict[str, bytes] = {}
        self._shown: dict[bytes, str] = {}
        self.counts: Counter[str] = Counter()
        self.refusals: Counter[str] = Counter()  # typed refusals by message shape
        self.statements = 0
        layout = self.topology.id_layout
        user_slot = self.topology.table("orders").key("user_id").slot
        counter = iter(range(1_000_000, 10_000_000))

        def next_id(user: int) -> int:  # deterministic ids with the user's gene
            return layout.compose(next(counter), user_slot(user), 0, 0)

        self.data: Dataset = build(next_id)
        self.load_findings: list[str] = []
        self._load()

    def close(self) -> None:
        self.loop.run_until_complete(self.aio.close())
        self.loop.close()
        self.router.close()
        self.oracle_engines.dispose()

    # -- data -------------------------------------------------------------------------------

    def _physical(self, table: str) -> list[tuple[str, str]]:
        rule = self.topology.table(table)
        return [(sid, name) for sid in self.topology.shards for name in rule.physical_names]

    def _load(self) -> None:
        for table in (*BASE_TABLES, "merchant_orders", "user_emails"):
            for sid, name in self._physical(table):
                with self.engines.primary(sid).begin() as conn:
                    conn.execute(text(f"DELETE FROM {name}"))
        rows = {
            "users": self.data.users,
            "orders": self.data.orders,
            "order_items": self.data.order_items,
            "countries": self.data.countries,
        }
        for table in BASE_TABLES:  # through the router: it writes the lookup rows
            cols = ALL_COLUMNS[table]
            sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
            for row in rows[table]:
                self.router.execute(sql, dict(zip(cols, row, strict=True)))
        self.snapshot = {
            t: self._shard_tables(t) for t in (*BASE_TABLES, "merchant_orders", "user_emails")
        }
        with self.oracle.begin() as conn:
            for table in (*BASE_TABLES, "merchant_orders", "user_emails"):
                conn.execute(text(f"DELETE FROM {table}"))
                cols = ALL_COLUMNS[table]
                union = [r for per in self.snapshot[table].values() for r in per]
                if table == "countries":
                    union = list(next(iter(self.snapshot[table].values())))
                if union:
                    conn.execute(
                        text(
                            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
                        ),
                        [dict(zip(cols, r, strict=True)) for r in union],
                    )
        self.oracle_snapshot = {
            t: self._oracle_table(t) for t in (*BASE_TABLES, "merchant_orders", "user_emails")
        }
        for table in BASE_TABLES:
            expected = Counter(rows[table])
            got = Counter(r for per in self.snapshot[table].values() for r in per)
            if table == "countries":
                for key, per in self.snapshot[table].items():
                    if Counter(per) != expected:
                        self.load_findings.append(f"countries copy on {key} differs after load")
            elif got != expected:
                self.load_findings.append(
                    f"{table}: loaded rows differ: missing {expected - got}, extra {got - expected}"
                )
        problem = self._lookup_problems(("orders", "users", "order_items"))
        if problem:
            self.load_findings.append(problem)

    def _shard_tables(self, table: str) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
        cols = ", ".join(ALL_COLUMNS[table])
        out = {}
        for sid, name in self._physical(table):
            with self.engines.primary(sid).connect() as conn:
                out[(sid, name)] = [
                    tuple(r) for r in conn.execute(text(f"SELECT {cols} FROM {name}"))
                ]
        return out

    def _oracle_table(self, table: str) -> list[tuple[Any, ...]]:
        cols = ", ".join(ALL_COLUMNS[table])
        with self.oracle.connect() as conn:
            return [tuple(r) for r in conn.execute(text(f"SELECT {cols} FROM {table}"))]

    def restore(self, tables: Iterable[str]) -> None:
        """Put the base rows back into ``tables`` on every shard and in the oracle."""
        tables = set(tables)
        cols_of = ALL_COLUMNS
        by_shard: dict[str, list[tuple[str, str, list[tuple[Any, ...]]]]] = {}
        for table in tables:
            for (sid, name), rows in self.snapshot[table].items():
                by_shard.setdefault(sid, []).append((table, name, rows))
        for sid, parts in by_shard.items():
            with self.engines.primary(sid).begin() as conn:
                for table, name, rows in parts:
                    cols = cols_of[table]
                    conn.execute(text(f"DELETE FROM {name}"))
                    if rows:
                        conn.execute(
                            text(
                                f"INSERT INTO {name} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
                            ),
                            [dict(zip(cols, r, strict=True)) for r in rows],
                        )
        with self.oracle.begin() as conn:
            for table in tables:
                cols = cols_of[table]
                conn.execute(text(f"DELETE FROM {table}"))
                rows = self.oracle_snapshot[table]
                if rows:
                    conn.execute(
                        text(
                            f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join(':' + c for c in cols)})"
                        ),
                        [dict(zip(cols, r, strict=True)) for r in rows],
                    )

    # Where each table's rows must live: (column index, routing column) per table; orders rows
    # must also sit where their order_id's gene routes (reads by order_id go there).
    PLACEMENT: ClassVar[dict[str, tuple[tuple[int, str], ...]]] = {
        "users": ((0, "user_id"),),
        "orders": ((1, "user_id"), (0, "order_id")),
        "order_items": ((2, "user_id"), (0, "order_id")),
        "merchant_orders": ((0, "merchant_id"),),
        "user_emails": ((0, "email"),),
    }

    def _misplaced(self, tables: Iterable[str]) -> list[str]:
        out = []
        for table in tables:
            rules = self.PLACEMENT.get(table)
            if not rules:
                continue
            for (sid, name), rows in self._shard_tables(table).items():
                for row in rows:
                    for index, column in rules:
                        try:
                            route = self.topology.route(table, column, row[index])
                        except UnknownKeyError:
                            continue  # not a routing column of this table (yet: issue 7 #13)
                        except Exception as exc:  # a value the topology cannot route at all
                            out.append(
                                f"{table} row {row[:3]} on {sid}/{name}: {column} unroutable ({exc})"
                            )
                            continue
                        if (route.shard, route.physical_table) != (sid, name):
                            out.append(
                                f"{table} row {row[:3]} is on {sid}/{name}, its {column} routes to "
                                f"{route.shard}/{route.physical_table}"
                            )
        return out

    def _lookup_problems(self, tables: Iterable[str]) -> str | None:
        """The lookup rows must be exactly what the base tables imply (no orphan, none lost),
        and every row must live where its keys route."""
        problems = []
        tables = list(tables)
        placed = [*tables, *(lk for t in tables for lk in LOOKUPS.get(t, ()))]
        misplaced = self._misplaced(placed)
        if misplaced:
            problems.append(f"misplaced rows ({len(misplaced)}): {misplaced[:2]}")
        if "orders" in tables:
            orders = [r for per in self._shard_tables("orders").values() for r in per]
            expected = Counter((r[2], r[0], r[1]) for r in orders)
            got = Counter(
                r[:3] for per in self._shard_tables("merchant_orders").values() for r in per
            )
            if got != expected:
                problems.append(
                    f"merchant_orders != orders' (merchant_id, order_id, user_id): "
                    f"lost {sorted(expected - got)[:5]}, orphans {sorted(got - expected)[:5]}"
                )
        if "users" in tables:
            users = [r for per in self._shard_tables("users").values() for r in per]
            expected = Counter((self.weight(r[1]), r[0]) for r in users)
            got = Counter(
                (self.weight(r[0]), r[1])
                for per in self._shard_tables("user_emails").values()
                for r in per
            )
            owners = Counter(weight for weight, _ in got)
            shared = [self._shown.get(w, w) for w, n in owners.items() if n > 1]
            if shared:
                problems.append(f"user_emails: one address, two owners: {shared[:3]}")
            if got != expected:
                problems.append(
                    f"user_emails != users' (email, user_id): lost {len(expected - got)}, "
                    f"orphans {len(got - expected)}: {sorted(got - expected, key=repr)[:3]}"
                )
        return "; ".join(problems) or None

    # -- values -----------------------------------------------------------------------------

    def weight(self, value: str) -> bytes:
        w = self._weights.get(value)
        if w is None:
            self._fill_weights([value])
            w = self._weights[value]
        return w

    def _fill_weights(self, values: Iterable[str]) -> None:
        todo = sorted({v for v in values if v not in self._weights})
        for start in range(0, len(todo), 200):
            chunk = todo[start : start + 200]
            exprs = ", ".join(
                f"WEIGHT_STRING(CONVERT(:s{i} USING utf8mb4) COLLATE utf8mb4_general_ci AS CHAR(2000))"
                for i in range(len(chunk))
            )
            with self.oracle.connect() as conn:
                row = conn.execute(
                    text(f"SELECT {exprs}"), {f"s{i}": v for i, v in enumerate(chunk)}
                ).one()
            for value, weight in zip(chunk, row, strict=True):
                # AS CHAR(n) pads with spaces (PAD SPACE: 'a' = 'a  '); drop the padding so
                # weights stay short, and keep one original per weight for messages.
                while weight.endswith(b"\x00 "):
                    weight = weight[:-2]
                self._weights[value] = weight
                self._shown.setdefault(weight, value)

    def norm(self, value: Any) -> Any:
        if value is None:
            return ("null",)
        if isinstance(value, bool):
            return ("bool", value)
        if isinstance(value, int):
            return ("int", value)
        if isinstance(value, Decimal):
            return ("decimal", str(value))
        if isinstance(value, float):
            return ("float", float(f"{value:.12g}"))
        if isinstance(value, str):
            return ("str", self.weight(value))
        if isinstance(value, bytes):
            return ("bytes", value)
        if isinstance(value, dt.datetime):
            return ("datetime", value)
        if isinstance(value, dt.date):
            return ("date", value)
        return (type(value).__name__, value)

    def norm_rows(self, rows: Iterable[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        rows = list(rows)
        self._fill_weights(v for r in rows for v in r if isinstance(v, str))
        return [tuple(self.norm(v) for v in r) for r in rows]

    # -- running ----------------------------------------------------------------------------

    def _oracle_run(self, sql: str, params: dict[str, Any]) -> Outcome:
        try:
            with self.oracle.begin() as conn:
                result = conn.execute(text(sql), params)
                if result.returns_rows:
                    return Outcome(
                        tuple(result.keys()), [tuple(r) for r in result], result.rowcount
                    )
                return Outcome(rowcount=result.rowcount)
        except Exception as exc:  # the oracle refusing is an outcome, not a failure
            return Outcome(error=exc)

    def _sync(self, case: Case) -> Outcome:
        try:
            res = self.router.execute(case.sql, dict(case.params))
            return Outcome(tuple(res.columns), list(res.rows), res.rowcount)
        except Exception as exc:
            return Outcome(error=exc)

    def _async(self, case: Case) -> Outcome:
        try:
            res = self.loop.run_until_complete(self.aio.execute(case.sql, dict(case.params)))
            return Outcome(tuple(res.columns), list(res.rows), res.rowcount)
        except Exception as exc:
            return Outcome(error=exc)

    def check(self, case: Case) -> None:
        """Judge one statement; raises Finding (or HarnessError) when something is wrong."""
        self.statements += 1
        for feature in case.features:
            self.counts[feature] += 1
        self.counts[f"kind:{case.kind}"] += 1
        try:
            if case.kind == "select":
                self._check_select(case)
            elif case.kind == "txn":
                self._check_txn(case)
            else:
                self._check_write(case)
        except Finding:
            self.counts["outcome:finding"] += 1
            raise

    def _judge_error(self, case: Case, side: str, got: Outcome, oracle: Outcome) -> bool:
        """True if ``got`` is an acceptable refusal; raises Finding if it is a defect; False if
        it answered (to be compared)."""
        exc = got.error
        if exc is None:
            if oracle.error is not None and _order_dependent(oracle.error):
                self.counts["outcome:oracle-order-dependent"] += 1
                return False
            if oracle.error is not None:
                raise Finding(
                    "accepted-invalid",
                    case,
                    f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
                    f"accepted-invalid {_message_shape(oracle.error)}",
                )
            return False
        if not isinstance(exc, ShardRouterError):
            raise Finding(
                "untyped-exception",
                case,
                f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
                f"untyped {_message_shape(exc)}",
            )
        if isinstance(exc, ExecutionError) and exc.orig is not None and oracle.error is None:
            if case.kind == "select" and self._plan_dependent(case, exc):
                self.counts["outcome:shard-plan-dependent"] += 1
                return True
            raise Finding(
                "shard-error",
                case,
                f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
                f"shard-error {_message_shape(exc.orig or exc)}",
            )
        self.counts[f"outcome:refused:{type(exc).__name__}"] += 1
        self.refusals[_message_shape(exc)] += 1
        return True

    def _plan_dependent(self, case: Case, exc: ExecutionError) -> bool:
        """True if the shard's out-of-range error is MariaDB's own plan-dependent evaluation,
        not the router's rewrite: the user's statement, with only the physical table names put
        in (no hidden sort columns, no LIMIT rewrite), raises it on that shard too.

        MariaDB evaluates a sort key or a select expression on rows its plan reaches before a
        join or WHERE rejects them (a filesort of the first table ahead of an eq_ref join, say),
        so whether ``merchant_id * 2`` overflows depends on the plan, and a shard with fewer
        rows picks another plan than the one database does. Anything else stays a finding."""
        if exc.orig is None or not _order_dependent(exc.orig) or exc.shard is None:
            return False
        plan = self._planner.plan(case.sql)
        splits = max(len(self.topology.table(t).physical_names) for t in SHARDED)
        with self.engines.primary(exc.shard).connect() as conn:
            for split in range(splits):
                sql = plan.render(Target(exc.shard, split), scatter=False)
                try:
                    conn.execute(text(sql), dict(case.params)).fetchall()
                except Exception as plain:
                    # Failing otherwise is not this case: it stays a finding.
                    return _order_dependent(plain)
        return False

    def _check_select(self, case: Case) -> None:
        oracle = self._oracle_run(case.sql, case.params)
        sync = self._sync(case)
        aio = self._async(case)
        ranked = None
        if oracle.error is None and case.rank_sql is None:
            ranked = Outcome(oracle.columns, [(*r, 1) for r in oracle.rows], oracle.rowcount)
        elif oracle.error is None:
            ranked = self._oracle_run(case.rank_sql, case.params)
            if ranked.error is not None:
                # The statement only succeeded on one database because LIMIT stopped it before
                # a row that errors (e.g. BIGINT overflow): its answer is not well defined, so
                # an error from the router is as good as the oracle's rows.
                self.counts["outcome:oracle-order-dependent"] += 1
                oracle = Outcome(oracle.columns, oracle.rows, oracle.rowcount, error=ranked.error)
        else:
            self.counts["outcome:oracle-error"] += 1
        refused = [
            self._judge_error(case, side, got, oracle)
            for side, got in (("sync", sync), ("async", aio))
        ]
        if refused[0] != refused[1] or (refused[0] and type(sync.error) is not type(aio.error)):
            raise Finding(
                "sync-async",
                case,
                f"  sync: {sync.describe()}\n  async: {aio.describe()}",
                f"sync-async {type(sync.error).__name__}/{type(aio.error).__name__}",
            )
        if refused[0] or oracle.error is not None or ranked is None:
            return  # both refused (or the oracle's answer is order-dependent, see above)
        pairs = [
            (r, row[-1])
            for r, row in zip(
                self.norm_rows(row[:-1] for row in ranked.rows), ranked.rows, strict=True
            )
        ]
        try:
            self._judge_rows(case, "oracle-self", oracle, oracle, pairs, harness=True)
        except HarnessError:
            ranked_values = Counter(r for r, _ in pairs)
            if all(row in ranked_values for row in self.norm_rows(oracle.rows)):
                raise  # the same values ranked otherwise: the harness's own defect
            # MariaDB computes the values otherwise beside the rank's window function (10.11:
            # MAX(x) - MIN(x) over one row is NULL there, 0 without it), so the ranks do not
            # describe this answer: compare the rows without them, or not at all past a LIMIT.
            self.counts["outcome:oracle-window-differs"] += 1
            if case.limit is not None or case.offset:
                return
            pairs = [(r, 1) for r in self.norm_rows(oracle.rows)]
        # Rows first (a wrong value is worse than a wrong label, and a label defect must not
        # hide one), then labels.
        for side, got in (("sync", sync), ("async", aio)):
            self._judge_rows(case, side, got, oracle, pairs)
        for side, got in (("sync", sync), ("async", aio)):
            if got.columns != oracle.columns:
                raise Finding(
                    "wrong-labels",
                    case,
                    f"  oracle columns: {oracle.columns}\n  {side} columns: {got.columns}",
                    f"wrong-labels {_cause(case)}",
                )
        self.counts["outcome:answered"] += 1

    def _judge_rows(
        self,
        case: Case,
        side: str,
        got: Outcome,
        oracle: Outcome,
        pairs: list[tuple[tuple[Any, ...], int]],
        harness: bool = False,
    ) -> None:
        ranks = sorted(rank for _, rank in pairs)
        end = len(ranks) if case.limit is None else min(len(ranks), case.offset + case.limit)
        window = ranks[case.offset : end]
        rows = self.norm_rows(got.rows)
        problem = None
        if len(rows) != len(window):
            problem = f"{len(rows)} rows, one database gives {len(window)}"
        elif rows and len(rows[0]) != len(pairs[0][0]):
            problem = f"rows of width {len(rows[0])}, one database gives {len(pairs[0][0])}"
        else:
            extra = Counter(zip(rows, window, strict=True)) - Counter(pairs)
            if extra:
                row, rank = next(iter(extra))
                where = [r for p, r in pairs if p == row]
                problem = f"row {_show(row, self._shown)} at rank {rank}: " + (
                    f"one database ranks it {sorted(set(where))}"
                    if where
                    else "not in one database's answer"
                )
        if problem is None:
            return
        if harness:
            raise HarnessError(
                f"checker rejects the oracle's own answer: {problem}\n{case}\n{case.rank_sql}"
            )
        raise Finding(
            "wrong-answer",
            case,
            f"  {problem}\n  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
            f"wrong-answer {'count' if 'one database gives' in problem else 'rows'} {_cause(case)}",
        )

    # -- writes -----------------------------------------------------------------------------

    def _tables_state(self, tables: Iterable[str]) -> dict[str, Counter[tuple[Any, ...]]]:
        state = {}
        for table in tables:
            per = self._shard_tables(table)
            if table == "countries":
                copies = {k: Counter(v) for k, v in per.items()}
                first = next(iter(copies.values()))
                for key, copy_ in copies.items():
                    if copy_ != first:
                        state["countries@" + key[0]] = copy_
                state[table] = first
            else:
                state[table] = Counter(r for rows in per.values() for r in rows)
        return state

    def _check_write(self, case: Case) -> None:
        base = [t for t in case.tables if t in BASE_TABLES]
        closure = {*base, *(lk for t in base for lk in LOOKUPS.get(t, ()))}
        try:
            oracle = self._oracle_run(case.sql, case.params)
            if oracle.error is not None:
                self.counts["outcome:oracle-error"] += 1
            expected = {t: Counter(self._oracle_table(t)) for t in base}
            outcomes = []
            for side, runner in (("sync", self._sync), ("async", self._async)):
                self.restore(closure)
                got = runner(case)
                outcomes.append(got)
                refused = self._judge_error(case, side, got, oracle)
                state = self._tables_state(base)
                if refused:
                    # A refusal must leave every table as it was.
                    expected_now = {
                        t: Counter(r for rows in self.snapshot[t].values() for r in rows)
                        for t in base
                    }
                    if "countries" in base:
                        expected_now["countries"] = Counter(
                            next(iter(self.snapshot["countries"].values()))
                        )
                else:
                    expected_now = expected
                if "write:nondeterministic" in case.features and not refused:
                    # RAND()/UUID() differ from the oracle's by nature: only the broadcast
                    # copies must agree with each other (and the row count with the oracle's).
                    copies = [t for t in state if t.startswith("countries@")]
                    if copies:
                        raise Finding(
                            "broadcast-diverged",
                            case,
                            f"  {side}: {got.describe()}\n  copies differ: "
                            + "; ".join(
                                f"{t}: {_show_counter(state[t] - state['countries'])}"
                                for t in copies
                            ),
                            f"broadcast-diverged {_cause(case)}",
                        )
                    state = {}  # the values cannot equal the oracle's; the copies agree
                for table in sorted(state):
                    want = expected_now.get(table.split("@")[0])
                    if state[table] != want:
                        assert want is not None
                        raise Finding(
                            "wrong-table",
                            case,
                            f"  {side} {'refused' if refused else 'ran'}: {got.describe()}\n"
                            f"  table {table} differs from one database after the statement:\n"
                            f"    missing on shards: {_show_counter(want - state[table])}\n"
                            f"    extra on shards:   {_show_counter(state[table] - want)}",
                            f"wrong-table {table} {'refused' if refused else 'ran'} {_cause(case)}",
                        )
                problem = self._lookup_problems(base)
                if problem:
                    raise Finding(
                        "lookup-drift",
                        case,
                        f"  {side}: {got.describe()}\n  {problem}",
                        f"lookup-drift {problem.split(':')[0]} {_cause(case)} {'after-error' if got.error else 'after-success'}",
                    )
                # Last: wrong data and lost lookup rows matter more than a wrong count.
                if not refused and got.rowcount != oracle.rowcount:
                    raise Finding(
                        "wrong-rowcount",
                        case,
                        f"  oracle rowcount {oracle.rowcount}, {side} rowcount {got.rowcount}",
                        f"wrong-rowcount {_cause(case)}",
                    )
            sync, aio = outcomes
            if (sync.error is None) != (aio.error is None) or type(sync.error) is not type(
                aio.error
            ):
                raise Finding(
                    "sync-async",
                    case,
                    f"  sync: {sync.describe()}\n  async: {aio.describe()}",
                    f"sync-async {type(sync.error).__name__}/{type(aio.error).__name__}",
                )
            if sync.error is None:
                self.counts["outcome:answered"] += 1
        finally:
            self.restore(closure)

    # -- transactions -----------------------------------------------------------------------

    def _txn_oracle(self, case: Case) -> Outcome:
        """All steps in one oracle transaction; the first error rolls everything back."""
        try:
            with self.oracle.begin() as conn:
                for step in case.steps:
                    conn.execute(text(step.sql), step.params)
            return Outcome()
        except Exception as exc:
            return Outcome(error=exc)

    def _txn_sync(self, case: Case) -> Outcome:
        try:
            with self.router.transaction() as txn:
                for step in case.steps:
                    txn.execute(step.sql, dict(step.params))
            return Outcome()
        except Exception as exc:
            return Outcome(error=exc)

    def _txn_async(self, case: Case) -> Outcome:
        async def run() -> None:
            async with self.aio.transaction() as txn:
                for step in case.steps:
                    await txn.execute(step.sql, dict(step.params))

        try:
            self.loop.run_until_complete(run())
            return Outcome()
        except Exception as exc:
            return Outcome(error=exc)

    def _txn_going_on(self, case: Case, side: str) -> tuple[Outcome, frozenset[int]]:
        """The steps in one transaction, each failure caught, then commit. Returns the
        outcome of the commit and the steps the router refused before running them (a typed
        refusal without a server error), which one database is then not asked to run."""
        skipped: set[int] = set()

        def refused(index: int, exc: BaseException) -> None:
            if not isinstance(exc, ShardRouterError):
                raise exc
            if not (isinstance(exc, ExecutionError) and exc.orig is not None):
                skipped.add(index)

        async def run_async() -> None:
            async with self.aio.transaction() as txn:
                for index, step in enumerate(case.steps):
                    try:
                        await txn.execute(step.sql, dict(step.params))
                    except Exception as exc:
                        refused(index, exc)

        try:
            if side == "sync":
                with self.router.transaction() as txn:
                    for index, step in enumerate(case.steps):
                        try:
                            txn.execute(step.sql, dict(step.params))
                        except Exception as exc:
                            refused(index, exc)
            else:
                self.loop.run_until_complete(run_async())
            return Outcome(), frozenset(skipped)
        except Exception as exc:
            return Outcome(error=exc), frozenset(skipped)

    def _oracle_going_on(self, case: Case, skipped: frozenset[int]) -> None:
        """One database: every step the router did not refuse, failures caught (the server
        rolls back only the failed statement), then commit."""
        with self.oracle.begin() as conn:
            for index, step in enumerate(case.steps):
                if index in skipped:
                    continue
                try:
                    with conn.begin_nested():  # the failed statement only, as the server does
                        conn.execute(text(step.sql), step.params)
                except Exception:
                    pass

    def _check_txn_going_on(self, case: Case) -> None:
        """A transaction that catches failed steps and commits: its tables must equal one
        database's that ran the same steps (minus those the router refused up front), and a
        failed step must leave nothing of itself behind."""
        base = [t for t in case.tables if t in BASE_TABLES]
        closure = {*base, *(lk for t in base for lk in LOOKUPS.get(t, ()))}
        try:
            for side in ("sync", "async"):
                self.restore(closure)
                got, skipped = self._txn_going_on(case, side)
                if got.error is not None and not isinstance(got.error, ShardRouterError):
                    raise Finding(
                        "untyped-exception",
                        case,
                        f"  {side}: {got.describe()}",
                        f"untyped {_message_shape(got.error)} (txn going on)",
                    )
                if got.error is None:
                    self._oracle_going_on(case, skipped)
                want = {t: Counter(self._oracle_table(t)) for t in base}
                state = self._tables_state(base)
                for table in sorted(state):
                    if "write:nondeterministic" in case.features:
                        break
                    if state[table] != want.get(table.split("@")[0]):
                        raise Finding(
                            "txn-going-on",
                            case,
                            f"  {side}: {got.describe()}, steps refused up front: {sorted(skipped)}\n"
                            f"  table {table} after the commit:\n"
                            f"    missing on shards: {_show_counter(want[table.split('@')[0]] - state[table])}\n"
                            f"    extra on shards:   {_show_counter(state[table] - want[table.split('@')[0]])}",
                            f"txn-going-on {table} {type(got.error).__name__ if got.error else 'ok'}",
                        )
                problem = self._lookup_problems(base)
                if problem:
                    raise Finding(
                        "lookup-drift",
                        case,
                        f"  {side}: {got.describe()}\n  {problem}",
                        f"lookup-drift {problem.split(':')[0]} txn going on",
                    )
                outcome = type(got.error).__name__ if got.error else "committed"
                self.counts[f"outcome:txn-going-on:{outcome}"] += 1
        finally:
            self.restore(closure)

    def _check_txn(self, case: Case) -> None:
        """A transaction either commits exactly what one database commits or, refused or
        failed, leaves every table as it was: never a part of it."""
        if case.continue_on_error:
            self._check_txn_going_on(case)
            return
        base = [t for t in case.tables if t in BASE_TABLES]
        closure = {*base, *(lk for t in base for lk in LOOKUPS.get(t, ()))}
        try:
            oracle = self._txn_oracle(case)
            expected = {t: Counter(self._oracle_table(t)) for t in base}
            before = {
                t: Counter(r for rows in self.snapshot[t].values() for r in rows) for t in base
            }
            if "countries" in base:
                before["countries"] = Counter(next(iter(self.snapshot["countries"].values())))
            for side, runner in (("sync", self._txn_sync), ("async", self._txn_async)):
                self.restore(closure)
                got = runner(case)
                if got.error is not None and not isinstance(got.error, ShardRouterError):
                    raise Finding(
                        "untyped-exception",
                        case,
                        f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
                        f"untyped {_message_shape(got.error)} (txn)",
                    )
                if (
                    isinstance(got.error, ExecutionError)
                    and got.error.orig is not None
                    and oracle.error is None
                ):
                    raise Finding(
                        "shard-error",
                        case,
                        f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}",
                        f"shard-error {_message_shape(got.error.orig)} (txn)",
                    )
                failed = got.error is not None
                want = before if failed else expected
                state = self._tables_state(base)
                for table in sorted(state):
                    if "write:nondeterministic" in case.features:
                        break
                    if state[table] != want.get(table.split("@")[0]):
                        raise Finding(
                            "txn-partial" if failed else "wrong-table",
                            case,
                            f"  oracle: {oracle.describe()}\n  {side}: {got.describe()}\n"
                            f"  table {table} after the transaction:\n"
                            f"    missing on shards: {_show_counter(want[table.split('@')[0]] - state[table])}\n"
                            f"    extra on shards:   {_show_counter(state[table] - want[table.split('@')[0]])}",
                            f"{'txn-partial' if failed else 'txn-wrong-table'} {table} "
                            f"{type(got.error).__name__ if failed else 'ok'}",
                        )
                problem = self._lookup_problems(base)
                if problem:
                    raise Finding(
                        "lookup-drift",
                        case,
                        f"  {side}: {got.describe()}\n  {problem}",
                        f"lookup-drift {problem.split(':')[0]} txn",
                    )
                if failed:
                    self.counts[f"outcome:refused:{type(got.error).__name__}"] += 1
                    self.refusals[_message_shape(got.error)] += 1
                elif oracle.error is not None and not _order_dependent(oracle.error):
                    raise Finding(
                        "accepted-invalid",
                        case,
                        f"  oracle: {oracle.describe()}\n  {side}: committed",
                        f"accepted-invalid txn {_message_shape(oracle.error)}",
                    )
                else:
                    self.counts["outcome:answered"] += 1
        finally:
            self.restore(closure)


def _show(row: tuple[Any, ...], shown: dict[bytes, str]) -> str:
    def one(v: tuple[Any, ...]) -> str:
        if v[0] == "null":
            return "NULL"
        if v[0] == "str":
            return f"str~{shown.get(v[1], v[1])!r}"
        return f"{v[0]}:{v[1]!r}"

    return "(" + ", ".join(one(v) for v in row) + ")"


# Shape features that most often name a cause, most telling first: a finding's signature
# carries the first one the statement has, so one cause groups into few signatures.
CAUSES = (
    "comment:exec-false",
    "comment:exec-m",
    "comment:exec-true",
    "lock:lock",
    "limit:to-end",
    "select:star",
    "select:t.star",
    "insert:on-duplicate",
    "insert:subquery",
    "insert:select",
    "insert:duplicate",
    "write:join",
    "write:broadcast",
    "collate",
    "having:alias-expr",
    "having:string-literal",
    "having:date-vs-string",
    "having:string-compare",
    "having:in",
    "having:between",
    "having:is-null",
    "having:alias",
    "agg:avg",
    "agg:group_concat",
    "agg:computed",
    "agg:distinct",
    "join",
    "subquery",
    "value:int-as-string",
    "value:trailing-space",
    "from:lookup-table",
    "select:grouped",
    "select:distinct",
    "select:agg",
    "order",
)


def _cause(case: Case) -> str:
    head = next((c for c in CAUSES if c in case.features), "other")
    return f"{case.kind}/{head}"


def _show_counter(counter: Counter[tuple[Any, ...]]) -> str:
    items = list(counter.elements())
    return repr(items[:6]) + (f" ... {len(items) - 6} more" if len(items) > 6 else "")


def coverage(world: World) -> dict[str, Any]:
    """Statement count and shape coverage, as the report prints it."""
    return {
        "statements": world.statements,
        "coverage": dict(sorted(world.counts.items())),
        "top_refusals": dict(world.refusals.most_common(25)),
    }
