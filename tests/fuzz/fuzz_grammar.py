"""Hypothesis strategies for statements over the order schema: the fuzzer's grammar.

A ``Case`` is one statement (SQL text with named ``:pN`` parameters and their values), the shape
features it exercises (for coverage) and, for SELECTs, a *rank query*: the same select list,
FROM, WHERE, GROUP BY and HAVING plus ``DENSE_RANK() OVER (ORDER BY <the statement's ORDER BY
as expressions>)``, without LIMIT/OFFSET or locking. The oracle runs it to learn every row of the
full answer and its place in the order, ties included, so the harness can accept any answer one
database could give (any order among ties, any choice among ties at a LIMIT boundary) and nothing
else.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from fuzz_data import (
    BIGINT_MAX,
    COLUMNS,
    DATES,
    DATETIMES,
    EXTRA_INTS,
    NAMES,
    SKUS,
    STATUSES,
    UNIQUE,
    Dataset,
)
from hypothesis import strategies as st

RANK = "fuzz_rank__"


@dataclass
class Case:
    """One generated statement and what the harness needs to judge it."""

    sql: str
    params: dict[str, Any]
    kind: str  # select | insert | update | delete
    features: frozenset[str]
    rank_sql: str | None = None
    """None for a SELECT: no ORDER BY and no LIMIT, so the oracle's rows are the whole answer
    and compare as a multiset."""
    limit: int | None = None
    offset: int = 0
    tables: tuple[str, ...] = ()
    """Writes: the logical tables the statement may change (restored after the check)."""
    steps: tuple[Case, ...] = ()
    continue_on_error: bool = False
    """kind "txn": a failed step is caught and the transaction goes on to commit, as an
    application that handles a duplicate key does: one database undoes only that statement."""
    """kind "txn": the statements run in order inside one transaction."""

    def __str__(self) -> str:
        if self.steps:
            return "\n".join(f"  step {i}: {step}" for i, step in enumerate(self.steps))
        return f"{self.sql}\n  params={self.params!r}"


def render(value: Any) -> str:
    """A MySQL literal for value (strings escaped the way MySQL reads them)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | Decimal):
        return str(value)
    if isinstance(value, dt.datetime):
        return "'" + value.isoformat(sep=" ", timespec="milliseconds") + "'"
    if isinstance(value, dt.date):
        return "'" + value.isoformat() + "'"
    text = str(value).replace("\\", "\\\\").replace("'", "''")
    return "'" + text + "'"


@dataclass
class Col:
    alias: str | None  # None: unqualified reference
    table: str
    name: str
    type: str  # int | str | str? | dt

    @property
    def ref(self) -> str:
        return f"{self.alias}.{self.name}" if self.alias else self.name


@dataclass
class Item:
    """A select-list item: its expression, optional alias, and whether it aggregates."""

    expr: str
    alias: str | None
    agg: bool
    star: bool = False

    def sql(self) -> str:
        return f"{self.expr} AS {self.alias}" if self.alias else self.expr


@dataclass
class Gen:
    """Per-statement generation state: the draw function, parameters and features."""

    draw: Any
    data: Dataset
    params: dict[str, Any] = field(default_factory=dict)
    features: set[str] = field(default_factory=set)

    def pick(self, options: list[Any]) -> Any:
        return self.draw(st.sampled_from(options))

    def chance(self, p: float) -> bool:
        return bool(self.draw(st.integers(0, 999)) < int(p * 1000))

    def value(self, value: Any) -> str:
        """A literal or a named parameter carrying value."""
        if self.chance(0.5):
            name = f"p{len(self.params)}"
            self.params[name] = value
            self.features.add(f"param:{type(value).__name__}")
            return ":" + name
        return render(value)

    # -- values of a column's type, drawn mostly from the data ---------------------------------

    def int_value(self, col: Col | None = None) -> Any:
        pool: list[Any] = []
        if col is not None and col.table in ("users", "orders", "order_items"):
            pool = self.data.values(col.table, col.name)
        if not pool or self.chance(0.2):
            pool = EXTRA_INTS + [Decimal(x) for x in (1, 100, 3)]
        value = self.pick(pool)
        if isinstance(value, int) and self.chance(0.1):
            # MySQL compares numerically; a key routes as the integer when the string is
            # decimal digits with an optional sign, and is refused (KeyValueError) otherwise.
            self.features.add("value:int-as-string")
            form = self.pick(["{}", "{}", "+{}", "00{}", " {}", "{}.0"])
            if form in (" {}", "{}.0"):
                self.features.add("value:int-as-inexact-string")
            return form.format(value) if value >= 0 or form == "{}" else str(value)
        if isinstance(value, int) and self.chance(0.05):
            return Decimal(value)
        return value

    def str_value(self, col: Col | None = None) -> Any:
        pool: list[Any] = []
        if col is not None:
            if col.name == "status":
                pool = STATUSES
            elif col.name == "sku":
                pool = SKUS
            elif col.name == "email":
                pool = self.data.values("users", "email")
            elif col.name == "name" and col.table == "users":
                pool = [n for n in NAMES if n is not None]
            elif col.name in ("code", "name"):
                pool = [c for c, _ in self.data.countries] + [n for _, n in self.data.countries]
        if not pool:
            pool = STATUSES + SKUS
        variant = self.draw(st.integers(0, 9))
        accented = [v for v in pool if v and not v.isascii()]
        if variant == 3 and accented:
            pool = accented  # give the accent fold below something to fold
        value = str(self.pick(pool))
        if variant == 0:
            value = value.upper()
        elif variant == 1:
            value = value.lower()
        elif variant == 2:
            value = value + "  "
            self.features.add("value:trailing-space")
        elif variant == 3:
            # general_ci folds accents: 'émile' = 'EMILE'; a router that only folds case misses
            stripped = "".join(
                ch for ch in unicodedata.normalize("NFKD", value) if not unicodedata.combining(ch)
            )
            if stripped != value:
                self.features.add("value:accent-folded")
            value = stripped.upper() if self.chance(0.5) else stripped
        return value

    def dt_value(self) -> Any:
        value = self.pick([*DATETIMES, *DATES])
        if self.chance(0.2):
            return value.isoformat(sep=" ") if isinstance(value, dt.datetime) else str(value)
        return value

    def typed_value(self, col: Col) -> Any:
        if col.type == "int":
            return self.int_value(col)
        if col.type == "dt":
            return self.dt_value()
        return self.str_value(col)


# ------------------------------------------------------------------------------- FROM clauses

TABLE_ALIAS = {
    "orders": "o",
    "order_items": "i",
    "users": "u",
    "countries": "c",
    "merchant_orders": "m",
    "user_emails": "e",
}

# (left, right, ON templates); templates use the aliases above. Some are deliberately not
# co-located (the router must refuse or answer correctly).
JOINS: list[tuple[str, str, list[str]]] = [
    (
        "orders",
        "order_items",
        [
            "o.order_id = i.order_id",
            "i.order_id = o.order_id",
            "o.user_id = i.user_id",
            "o.order_id = i.order_id AND o.user_id = i.user_id",
            "o.order_id = i.order_id AND i.qty > 0",
            "(o.order_id = i.order_id OR o.user_id = i.user_id)",
            "o.user_id = o.user_id",
            "NOT (o.order_id <> i.order_id)",
            "(o.order_id = i.order_id OR i.qty = 1)",
            "o.merchant_id = i.line",
            "o.order_id = i.order_id AND NOT (i.sku = 'abc')",
        ],
    ),
    (
        "orders",
        "users",
        [
            "o.user_id = u.user_id",
            "u.user_id = o.user_id AND u.name IS NOT NULL",
            "o.merchant_id = u.user_id",
        ],
    ),
    ("orders", "countries", ["c.code = LEFT(o.status, 2)", "(c.name = o.status OR c.code = 'US')"]),
    ("order_items", "countries", ["c.code = LEFT(i.sku, 2)", "c.code <> i.sku"]),
    (
        "orders",
        "merchant_orders",
        ["m.order_id = o.order_id", "m.merchant_id = o.merchant_id AND m.order_id = o.order_id"],
    ),
    ("users", "user_emails", ["e.user_id = u.user_id", "e.email = u.email"]),
]

DERIVED = (
    "(SELECT user_id, COUNT(*) AS n, SUM(amount_cents) AS s FROM orders GROUP BY user_id)",
    [("user_id", "int"), ("n", "int"), ("s", "int")],
)


def from_clause(g: Gen) -> tuple[str, list[Col], list[str]]:
    """FROM text, the columns in scope, and the unique key (as refs) of the row source."""
    shape = g.draw(st.integers(0, 19))  # 0-11 one table, 12-18 a join, 19 a derived table
    if shape <= 11:
        table = g.pick(
            [
                "orders",
                "orders",
                "orders",
                "order_items",
                "users",
                "countries",
                "merchant_orders",
                "user_emails",
            ]
        )
        aliased = g.chance(0.6)
        alias = TABLE_ALIAS[table] if aliased else None
        cols = [Col(alias, table, c, t) for c, t in COLUMNS[table]]
        text = f"{table} {alias}" if alias else table
        if aliased and g.chance(0.2):
            text = f"{table} AS {alias}"
        if table in ("countries",):
            g.features.add("from:broadcast")
        elif table in ("merchant_orders", "user_emails"):
            g.features.add("from:lookup-table")
        unique = [Col(alias, table, c, "").ref for c in UNIQUE[table]]
        return text, cols, unique
    if shape <= 18:
        left, right, ons = g.pick(JOINS)
        on = g.pick(ons)
        kind = g.pick(["JOIN", "JOIN", "INNER JOIN", "LEFT JOIN"])
        g.features.add("join")
        if right == "countries":
            g.features.add("join:broadcast")
        if kind == "LEFT JOIN":
            g.features.add("join:left")
        la, ra = TABLE_ALIAS[left], TABLE_ALIAS[right]
        cols = [Col(la, left, c, t) for c, t in COLUMNS[left]]
        rcols = [Col(ra, right, c, t) for c, t in COLUMNS[right]]
        if kind == "LEFT JOIN":  # right side may be NULL
            rcols = [
                Col(c.alias, c.table, c.name, c.type + "?" if not c.type.endswith("?") else c.type)
                for c in rcols
            ]
        unique = [f"{la}.{c}" for c in UNIQUE[left]] + [f"{ra}.{c}" for c in UNIQUE[right]]
        return f"{left} {la} {kind} {right} {ra} ON {on}", cols + rcols, unique
    g.features.add("subquery:derived")
    sql, dcols = DERIVED
    return f"{sql} d", [Col("d", "derived", c, t) for c, t in dcols], ["d.user_id"]


# ------------------------------------------------------------------------------- expressions


def scalar(g: Gen, cols: list[Col]) -> tuple[str, str]:
    """A non-aggregate expression and its type class."""
    col = g.pick(cols)
    base = col.type.rstrip("?")
    form = g.draw(st.integers(0, 9))
    if form <= 4:
        return col.ref, base
    if base == "int":
        options = [
            (f"{col.ref} * 2", "int"),
            (f"{col.ref} + {g.value(g.pick([1, Decimal('0.5'), -3]))}", "num"),
            (f"{col.ref} DIV 3", "int"),
            (f"{col.ref} / 4", "num"),
            (f"-{col.ref}", "int"),
            (f"COALESCE({col.ref}, 0)", "int"),
            (f"{col.ref} % 7", "int"),
            (f"{col.ref} * 1e0", "num"),
        ]
    elif base == "str":
        options = [
            (f"UPPER({col.ref})", "str"),
            (f"CONCAT({col.ref}, '|')", "str"),
            (f"LENGTH({col.ref})", "int"),
            (f"{col.ref} COLLATE utf8mb4_bin", "str"),
            (f"TRIM({col.ref})", "str"),
            (f"LEFT({col.ref}, 2)", "str"),
        ]
    else:
        options = [
            (f"DATE({col.ref})", "dt"),
            (f"YEAR({col.ref})", "int"),
            (f"{col.ref} + INTERVAL 1 DAY", "dt"),
        ]
    sql, typ = g.pick(options)
    g.features.add("expr")
    if "COLLATE" in sql:
        g.features.add("collate")
    return sql, typ


def aggregate(g: Gen, cols: list[Col]) -> str:
    ints = [c for c in cols if c.type.rstrip("?") == "int"]
    form = g.draw(st.integers(0, 13))
    col = g.pick(cols)
    icol = g.pick(ints) if ints else None
    distinct = "DISTINCT " if g.chance(0.2) else ""
    if distinct:
        g.features.add("agg:distinct")
    if form == 0 or icol is None:
        g.features.add("agg:count")
        return "COUNT(*)"
    if form == 1:
        g.features.add("agg:count")
        return f"COUNT({distinct}{col.ref})"
    if form in (2, 3):
        g.features.add("agg:sum")
        return f"SUM({distinct}{icol.ref})"
    if form in (4, 5):
        g.features.add("agg:avg")
        return f"AVG({distinct}{icol.ref})"
    if form in (6, 7):
        g.features.add("agg:min")
        return f"MIN({col.ref})"
    if form in (8, 9):
        g.features.add("agg:max")
        return f"MAX({col.ref})"
    if form == 10:
        g.features.add("agg:expr")
        return f"SUM({icol.ref}) / COUNT(*)"
    if form == 11:
        g.features.add("agg:expr")
        return f"MAX({icol.ref}) - MIN({icol.ref})"
    if form == 12:
        g.features.add("agg:expr")
        if g.chance(0.5):
            # MySQL keeps the quotient's full precision inside the aggregate; per-shard
            # partials rounded to div_precision_increment and then summed are not the same.
            g.features.add("agg:of-division")
            return f"{g.pick(['SUM', 'AVG'])}({icol.ref} / {g.pick([3, 7])})"
        if g.chance(0.5):
            return "COUNT(*) + 1"
        # Expressions over aggregates the merge computes (issue 11 item 3).
        g.features.add("agg:computed")
        return g.pick(
            [
                f"ROUND(AVG({icol.ref}) / 100, 2)",
                f"ROUND(AVG({icol.ref}))",
                f"COALESCE(SUM({icol.ref}), 0)",
                f"IFNULL(MAX({icol.ref}), -1)",
                "CASE WHEN COUNT(*) > 2 THEN 'many' ELSE 'few' END",
                f"SUM({icol.ref}) DIV 7",
                f"SUM({icol.ref}) % 7",
                f"AVG({icol.ref}) * 2",
                f"NULLIF(COUNT({icol.ref}), 0)",
                f"ABS(MIN({icol.ref}) - 50)",
                f"SUM({icol.ref}) / 3 * 3",
                "COUNT(*) > 1",
                f"IF(SUM({icol.ref}) > 100, 1.5, 2)",
            ]
        )
    g.features.add("agg:group_concat")
    # One order only (DISTINCT values ordered by themselves, or every row of one table ordered
    # by a unique key after the value): one database's list is defined.
    direction = g.pick(["", " DESC"])
    separator = g.pick(["", " SEPARATOR ';'", " SEPARATOR ''", " SEPARATOR ' | '"])
    if len({c.table for c in cols}) == 1 and col.table in UNIQUE and g.chance(0.5):
        # (a derived table has no unique key to order by)
        unique = ", ".join(Col(col.alias, col.table, c, "").ref for c in UNIQUE[col.table])
        return f"GROUP_CONCAT({col.ref} ORDER BY {col.ref}{direction}, {unique}{separator})"
    return f"GROUP_CONCAT(DISTINCT {col.ref} ORDER BY {col.ref}{direction}{separator})"


# ------------------------------------------------------------------------------- WHERE trees


def predicate(g: Gen, cols: list[Col], depth: int = 0) -> str:
    form = g.draw(st.integers(0, 14 if depth < 2 else 9))
    if form >= 12:
        g.features.add("where:" + ["and", "or", "not"][form - 12])
        if form == 14:
            return f"NOT ({predicate(g, cols, depth + 1)})"
        op = " AND " if form == 12 else " OR "
        return "(" + predicate(g, cols, depth + 1) + op + predicate(g, cols, depth + 1) + ")"
    if form == 11 and depth < 2 and g.chance(0.5):  # the planner refuses most subqueries
        return subquery_predicate(g, cols)
    col = g.pick(cols)
    if col.name in ("user_id", "order_id", "merchant_id", "email"):
        g.features.add("where:key")
    if form <= 3:
        op = g.pick(["=", "=", "=", "<>", "<", ">=", "<=>"])
        return f"{col.ref} {op} {g.value(g.typed_value(col))}"
    if form <= 5:
        n = g.draw(st.integers(1, 4))
        values = ", ".join(g.value(g.typed_value(col)) for _ in range(n))
        g.features.add("where:in")
        neg = "NOT " if g.chance(0.15) else ""
        return f"{col.ref} {neg}IN ({values})"
    if form == 6:
        g.features.add("where:between")
        return f"{col.ref} BETWEEN {g.value(g.typed_value(col))} AND {g.value(g.typed_value(col))}"
    if form == 7:
        g.features.add("where:like")
        pattern = g.pick(["p%", "%a%", "a\\_c", "a_c", "%e", "D%", "%\\%%", "é%", "A%C", "%  "])
        return f"{col.ref} LIKE {g.value(pattern)}"
    if form == 8:
        g.features.add("where:null")
        return f"{col.ref} IS {'NOT ' if g.chance(0.5) else ''}NULL"
    if form == 9:
        g.features.add("where:param-null")
        name = f"p{len(g.params)}"
        g.params[name] = None
        return f"{col.ref} = :{name}"
    return f"{col.ref} = {g.value(g.typed_value(col))}"


def subquery_predicate(g: Gen, cols: list[Col]) -> str:
    g.features.add("subquery")
    user_cols = [c for c in cols if c.name == "user_id"]
    order_cols = [c for c in cols if c.name == "order_id" and c.table == "orders"]
    choices = ["scalar"]
    if user_cols:
        choices.append("in-users")
    if order_cols:
        choices.append("exists-items")
    kind = g.pick(choices)
    if kind == "in-users":
        ucol = Col("u2", "users", "name", "str?")
        return f"{user_cols[0].ref} IN (SELECT u2.user_id FROM users u2 WHERE u2.name = {g.value(g.str_value(ucol))} OR u2.name IS NULL)"
    if kind == "exists-items":
        return f"EXISTS (SELECT 1 FROM order_items i2 WHERE i2.order_id = {order_cols[0].ref} AND i2.qty > 0)"
    ints = [c for c in cols if c.type.rstrip("?") == "int"] or cols
    col = g.pick(ints)
    return f"{col.ref} > (SELECT AVG(amount_cents) FROM orders WHERE amount_cents < 1000000)"


# ------------------------------------------------------------------------------- SELECT


def select_case(g: Gen) -> Case:
    from_text, cols, unique = from_clause(g)
    mode = g.pick(["plain", "plain", "distinct", "agg", "grouped", "grouped"])
    g.features.add(f"select:{mode}")
    aliases = iter(f"a{i}" for i in range(100))
    items: list[Item] = []
    group: list[str] = []
    colliding = [c.name for c in cols]

    used: set[str] = set()

    def maybe_alias() -> str | None:
        if not g.chance(0.4):
            return None
        if cols[0].alias and g.chance(0.1):
            name = g.pick(colliding)
            if name not in used:  # two items with one alias: ORDER BY would be ambiguous
                used.add(name)
                g.features.add("alias:shadows-column")
                return name
        return next(aliases)

    if mode in ("plain", "distinct"):
        n = g.draw(st.integers(1, 4))
        for _ in range(n):
            roll = g.draw(st.integers(0, 9))
            if roll == 0:
                items.append(Item("*", None, agg=False, star=True))
                g.features.add("select:star")
            elif roll == 1 and cols[0].alias:
                alias = g.pick(sorted({c.alias for c in cols if c.alias}))
                items.append(Item(f"{alias}.*", None, agg=False, star=True))
                g.features.add("select:t.star")
            elif roll == 2:
                items.append(
                    Item(
                        g.value(g.pick([1, "x", Decimal("2.50"), dt.date(2026, 1, 1)])),
                        "k" + next(aliases),
                        agg=False,
                    )
                )
                g.features.add("select:constant")
            else:
                expr, _ = scalar(g, cols)
                items.append(Item(expr, maybe_alias(), agg=False))
        if items[0].star is False and any(i.expr == "*" for i in items[1:]):
            # MySQL accepts a bare * only first in the list.
            items = [i for i in items if i.expr != "*"] or [Item("*", None, agg=False, star=True)]
    else:
        if mode == "grouped":
            for _ in range(g.draw(st.integers(1, 2))):
                expr, _ = scalar(g, cols)
                if expr not in group:
                    group.append(expr)
            for expr in group:
                if g.chance(0.8):
                    items.append(Item(expr, maybe_alias(), agg=False))
        for _ in range(g.draw(st.integers(1, 3))):
            items.append(Item(aggregate(g, cols), maybe_alias(), agg=True))
    if mode == "distinct" and all(
        i.expr.startswith(":") or (i.alias and i.alias.startswith("k")) for i in items
    ):
        # MariaDB 10.11 answers SELECT DISTINCT <constants> ... LIMIT 4, 4 with one row (it
        # ignores the OFFSET): the oracle itself is wrong there, so give the list a column.
        items.append(Item(cols[0].ref, None, agg=False))
    if g.chance(0.04) and mode != "distinct":
        g.features.add("select:scalar-subquery")
        items.append(Item("(SELECT COUNT(*) FROM countries)", "nc", agg=False))

    where = predicate(g, cols) if g.chance(0.75) else None
    having = None
    if mode == "grouped" and g.chance(0.4):
        g.features.add("having")
        having = having_clause(g, cols, items)

    # ORDER BY: items as (text written in ORDER BY, expression for the rank window).
    order: list[tuple[str, str]] = []
    has_star = any(i.star for i in items)
    # A grouped SELECT often goes without ORDER BY (its groups come sorted by the GROUP BY
    # values: review 24's LIMIT finding); drawn apart, as chance() leans to True.
    if g.chance(0.6) and not (mode == "grouped" and g.chance(0.3)):
        g.features.add("order")
        for _ in range(g.draw(st.integers(1, 3))):
            # A bare integer in ORDER BY is a position, not the constant item it spells; so is
            # an int parameter (PyMySQL interpolates it client-side): order by those through
            # their alias only.
            candidates = [
                i
                for i in items
                if not i.star and not i.expr.isdigit() and not i.expr.startswith(":")
            ]
            form = g.draw(st.integers(0, 4))
            desc = " DESC" if g.chance(0.4) else ""
            if desc:
                g.features.add("order:desc")
            if candidates and form == 0:
                item = g.pick(candidates)
                if item.alias:
                    g.features.add("order:alias")
                    order.append((item.alias + desc, item.expr + desc))
                    continue
            if candidates and form == 1 and not has_star:
                index = g.draw(st.integers(0, len(items) - 1))
                g.features.add("order:position")
                order.append((f"{index + 1}{desc}", items[index].expr + desc))
                continue
            if candidates and form == 2:
                item = g.pick(candidates)
                order.append((item.expr + desc, item.expr + desc))
                continue
            if mode == "plain":
                expr, _ = scalar(g, cols)
                g.features.add("order:expr")
                order.append((expr + desc, expr + desc))
            elif mode == "grouped":
                expr = g.pick(group) if g.chance(0.5) else aggregate(g, cols)
                order.append((expr + desc, expr + desc))
            elif mode == "agg" and candidates:
                item = g.pick(candidates)
                order.append((item.expr + desc, item.expr + desc))
        if mode == "plain" and g.chance(0.5):
            g.features.add("order:total")
            order += [(u, u) for u in unique]
    limit_text, limit, offset = limit_clause(g) if g.chance(0.4) else ("", None, 0)
    lock = ""
    if g.chance(0.08):
        lock = g.pick([" FOR UPDATE", " LOCK IN SHARE MODE"])
        g.features.add("lock:" + lock.strip().split()[0].lower())

    distinct = "DISTINCT " if mode == "distinct" else ""
    head = "SELECT " + distinct
    comment_where = ""
    if g.chance(0.1):
        form = g.pick(["block", "line", "exec-true", "exec-false", "exec-m"])
        g.features.add("comment:" + form)
        if form == "block":
            head = "/* fuzz */ SELECT /* c */ " + distinct
        elif form == "exec-true":
            comment_where = " /*! AND 1 = 1 */"
        elif form == "exec-false":
            comment_where = " /*! AND 1 = 0 */"
        elif form == "exec-m":
            comment_where = " /*M! AND 1 = 0 */"
        else:
            lock = lock + " -- trailing comment"
    select_list = ", ".join(i.sql() for i in items)
    body = f" FROM {from_text}"
    if where or comment_where:
        body += f" WHERE {where or '1 = 1'}{comment_where}"
    if group:
        body += " GROUP BY " + ", ".join(group)
    if having:
        body += f" HAVING {having}"
    order_text = (" ORDER BY " + ", ".join(o for o, _ in order)) if order else ""
    sql = head + select_list + body + order_text + limit_text + lock
    # Without ORDER BY, MariaDB returns groups sorted by the GROUP BY values: a LIMIT keeps
    # the first groups in that order (review 24), so the rank orders by them.
    window = ", ".join(r for _, r in order) if order else ", ".join(group) if group else "NULL"
    rank_sql = (
        f"SELECT {distinct}{select_list}, DENSE_RANK() OVER (ORDER BY {window}) AS {RANK}{body}"
    )
    return Case(sql, g.params, "select", frozenset(g.features), rank_sql, limit, offset)


def limit_clause(g: Gen) -> tuple[str, int | None, int]:
    """A LIMIT [OFFSET] clause (numbers or bound parameters) and its limit and offset."""
    offset = 0
    g.features.add("limit")
    n = g.draw(st.integers(0, 6))
    limit: int | None = n
    form = g.draw(st.integers(0, 3))

    def count(value: int) -> str:
        """``value`` as written, or a bound parameter (known to the router at execution)."""
        if not g.chance(0.3):
            return str(value)
        g.features.add("limit:param")
        name = f"p{len(g.params)}"
        g.params[name] = value
        return ":" + name

    if form == 0:
        limit_text = f" LIMIT {count(n)}"
    else:
        offset = g.draw(st.integers(0, 5))
        g.features.add("offset")
        if form == 1:
            limit_text = f" LIMIT {count(n)} OFFSET {count(offset)}"
        elif form == 2:
            limit_text = f" LIMIT {count(offset)}, {count(n)}"
        else:
            g.features.add("limit:to-end")
            limit = None
            limit_text = f" LIMIT {count(offset)}, 18446744073709551615"
    return limit_text, limit, offset


def union_case(g: Gen) -> Case:
    """A UNION [ALL] of 2-3 plain SELECTs over any row sources, its columns of one type class
    each (else the router refuses it: MySQL would convert them), mostly ordered by every
    column with a LIMIT/OFFSET (numbers or parameters). The rank query ranks the UNION's rows
    by that order, as a SELECT's."""
    union = g.pick([" UNION ", " UNION ALL "])
    g.features.add("union:" + union.strip().split()[-1].lower())
    kinds = [g.pick(["int", "int", "str", "dt"]) for _ in range(g.draw(st.integers(1, 2)))]
    members = []
    for m in range(g.draw(st.integers(2, 3))):
        from_text, cols, _ = from_clause(g)
        items = []
        for i, kind in enumerate(kinds):
            fitting = [c for c in cols if c.type.rstrip("?") == kind]
            expr = g.pick(fitting).ref if fitting else "NULL"
            items.append(f"{expr} AS c{i}" if m == 0 else expr)  # the first SELECT labels
        where = f" WHERE {predicate(g, cols)}" if g.chance(0.6) else ""
        members.append(f"SELECT {', '.join(items)} FROM {from_text}{where}")
    body = union.join(members)
    if not g.chance(0.8):
        return Case(body, g.params, "select", frozenset(g.features))  # compared as multisets
    g.features.add("union:order")
    terms = [(i, " DESC" if g.chance(0.4) else "") for i in range(len(kinds))]
    limit_text, limit, offset = limit_clause(g) if g.chance(0.7) else ("", None, 0)
    sql = body + " ORDER BY " + ", ".join(f"{i + 1}{d}" for i, d in terms) + limit_text
    window = ", ".join(f"c{i}{d}" for i, d in terms)
    rank_sql = f"SELECT u.*, DENSE_RANK() OVER (ORDER BY {window}) AS {RANK} FROM ({body}) u"
    return Case(sql, g.params, "select", frozenset(g.features), rank_sql, limit, offset)


def having_clause(g: Gen, cols: list[Col], items: list[Item]) -> str:
    aliased = [i for i in items if i.agg and i.alias]
    parts = []
    for _ in range(g.draw(st.integers(1, 2))):
        form = g.draw(st.integers(0, 8))
        if form == 6:
            g.features.add("having:in")
            values = ", ".join(g.value(g.pick([0, 1, 2, 3, 100, None, "1"])) for _ in range(3))
            parts.append(f"{aggregate(g, cols)} {g.pick(['IN', 'NOT IN'])} ({values})")
        elif form == 7:
            g.features.add("having:between")
            low, high = g.value(g.pick([0, 1, 2])), g.value(g.pick([3, 100, "50", None]))
            parts.append(f"{aggregate(g, cols)} {g.pick(['', 'NOT '])}BETWEEN {low} AND {high}")
        elif form == 8:
            g.features.add("having:is-null")
            parts.append(f"{aggregate(g, cols)} IS {g.pick(['', 'NOT '])}NULL")
        elif form == 0 and aliased:
            g.features.add("having:alias")
            parts.append(
                f"{g.pick(aliased).alias} > {g.value(g.pick([0, 1, 2, Decimal('1.5'), '1']))}"
            )
        elif form == 1 and len(aliased) >= 2:
            g.features.add("having:alias-expr")
            a, b = aliased[0].alias, aliased[1].alias
            parts.append(f"{a} / NULLIF({b}, 0) > {g.value(g.pick([0, 1, 100]))}")
        elif form == 2:
            g.features.add("having:string-literal")
            parts.append(f"COUNT(*) > {g.value(g.pick(['1', '0', '2 ']))}")
        elif form == 3:
            dcols = [c for c in cols if c.type.rstrip("?") == "dt"]
            if dcols:
                g.features.add("having:date-vs-string")
                parts.append(
                    f"MIN({g.pick(dcols).ref}) > {g.value(g.pick(['2026-01-01', dt.date(2026, 1, 1), '2026-01-01 12:00:00']))}"
                )
            else:
                parts.append("COUNT(*) >= 1")
        elif form == 4:
            scols = [c for c in cols if c.type.rstrip("?") == "str"]
            if scols:
                g.features.add("having:string-compare")
                col = g.pick(scols)
                parts.append(f"MAX({col.ref}) >= {g.value(g.str_value(col))}")
            else:
                parts.append("COUNT(*) > 1")
        else:
            parts.append(f"{aggregate(g, cols)} > {g.value(g.pick([0, 1, 2, 100]))}")
    return g.pick([" AND ", " OR "]).join(parts)


# ------------------------------------------------------------------------------- writes

ORDER_COLS = "order_id, user_id, merchant_id, status, amount_cents, created_at"


def order_key_predicate(g: Gen, alias: str | None) -> str:
    p = f"{alias}." if alias else ""
    form = g.draw(st.integers(0, 6))
    if form == 0:
        g.features.add("write:by-key")
        return f"{p}user_id = {g.value(g.pick(g.data.values('orders', 'user_id')))}"
    if form == 1:
        g.features.add("write:by-gene")
        return f"{p}order_id = {g.value(g.pick(g.data.values('orders', 'order_id')))}"
    if form == 2:
        g.features.add("write:by-lookup")
        return f"{p}merchant_id = {g.value(g.pick(g.data.values('orders', 'merchant_id')))}"
    if form == 3:
        g.features.add("write:by-key-in")
        users = g.data.values("orders", "user_id")
        return f"{p}user_id IN ({g.value(g.pick(users))}, {g.value(g.pick(users))})"
    g.features.add("write:scatter")
    cols = [Col(alias, "orders", c, t) for c, t in COLUMNS["orders"]]
    return predicate(g, cols, depth=1)


def update_case(g: Gen) -> Case:
    target = g.pick(["orders", "orders", "order_items", "users", "countries", "join"])
    g.features.add(f"update:{target}")
    if target == "orders":
        sets = g.pick(
            [
                f"status = {g.value(g.str_value(Col(None, 'orders', 'status', 'str')))}",
                "amount_cents = amount_cents + 1",
                f"merchant_id = {g.value(g.pick([*g.data.values('orders', 'merchant_id'), 99]))}",
                f"user_id = {g.value(g.pick(g.data.values('orders', 'user_id')))}",
                f"created_at = {g.value(g.dt_value())}",
                "status = (SELECT MAX(sku) FROM order_items)",
            ]
        )
        where = order_key_predicate(g, None)
        tail = " ORDER BY order_id LIMIT 1" if g.chance(0.1) else ""
        return Case(
            f"UPDATE orders SET {sets} WHERE {where}{tail}",
            g.params,
            "update",
            frozenset(g.features),
            tables=("orders",),
        )
    if target == "order_items":
        sets = g.pick(
            [
                "qty = qty + 1",
                f"sku = {g.value(g.str_value(Col(None, 'order_items', 'sku', 'str')))}",
            ]
        )
        form = g.draw(st.integers(0, 2))
        if form == 0:
            where = f"order_id = {g.value(g.pick(g.data.values('order_items', 'order_id')))}"
            g.features.add("write:by-gene")
        elif form == 1:
            where = f"user_id = {g.value(g.pick(g.data.values('order_items', 'user_id')))}"
            g.features.add("write:by-key")
        else:
            where = predicate(
                g, [Col(None, "order_items", c, t) for c, t in COLUMNS["order_items"]], 1
            )
            g.features.add("write:scatter")
        return Case(
            f"UPDATE order_items SET {sets} WHERE {where}",
            g.params,
            "update",
            frozenset(g.features),
            tables=("order_items",),
        )
    if target == "users":
        sets = g.pick(
            [
                f"name = {g.value(g.pick([n for n in NAMES if n] + ['new name']))}",
                f"email = {g.value(g.pick(['new@example.com', 'ALICE@example.com', 'Zed@x.org']))}",
            ]
        )
        if g.chance(0.5):
            where = f"user_id = {g.value(g.pick(g.data.values('users', 'user_id')))}"
            g.features.add("write:by-key")
        else:
            where = f"email = {g.value(g.str_value(Col(None, 'users', 'email', 'str')))}"
            g.features.add("write:by-lookup")
        return Case(
            f"UPDATE users SET {sets} WHERE {where}",
            g.params,
            "update",
            frozenset(g.features),
            tables=("users",),
        )
    if target == "countries":
        where = predicate(g, [Col(None, "countries", c, t) for c, t in COLUMNS["countries"]], 1)
        g.features.add("write:broadcast")
        if g.chance(0.15):
            g.features.add("write:nondeterministic")
            func = g.pick(["RAND()", "UUID()", "CONCAT(name, RAND())"])
            return Case(
                f"UPDATE countries SET name = {func} WHERE {where}",
                g.params,
                "update",
                frozenset(g.features),
                tables=("countries",),
            )
        return Case(
            f"UPDATE countries SET name = {g.value('renamed')} WHERE {where}",
            g.params,
            "update",
            frozenset(g.features),
            tables=("countries",),
        )
    g.features.add("write:join")
    _, _, ons = JOINS[0]
    on = g.pick(ons)
    sets = g.pick(
        ["i.qty = i.qty + 1", "o.status = 'joined', i.qty = 2", "o.amount_cents = i.price_cents"]
    )
    where = order_key_predicate(g, "o")
    return Case(
        f"UPDATE orders o JOIN order_items i ON {on} SET {sets} WHERE {where}",
        g.params,
        "update",
        frozenset(g.features),
        tables=("orders", "order_items"),
    )


def delete_case(g: Gen) -> Case:
    target = g.pick(
        ["orders", "orders", "order_items", "users", "countries", "join-owner", "join-items"]
    )
    g.features.add(f"delete:{target}")
    if target == "orders":
        return Case(
            f"DELETE FROM orders WHERE {order_key_predicate(g, None)}",
            g.params,
            "delete",
            frozenset(g.features),
            tables=("orders",),
        )
    if target == "order_items":
        if g.chance(0.5):
            where = f"order_id = {g.value(g.pick(g.data.values('order_items', 'order_id')))}"
            g.features.add("write:by-gene")
        else:
            where = predicate(
                g, [Col(None, "order_items", c, t) for c, t in COLUMNS["order_items"]], 1
            )
            g.features.add("write:scatter")
        return Case(
            f"DELETE FROM order_items WHERE {where}",
            g.params,
            "delete",
            frozenset(g.features),
            tables=("order_items",),
        )
    if target == "users":
        if g.chance(0.5):
            where = f"user_id = {g.value(g.pick(g.data.values('users', 'user_id')))}"
        else:
            where = f"email = {g.value(g.str_value(Col(None, 'users', 'email', 'str')))}"
            g.features.add("write:by-lookup")
        return Case(
            f"DELETE FROM users WHERE {where}",
            g.params,
            "delete",
            frozenset(g.features),
            tables=("users",),
        )
    if target == "countries":
        where = predicate(g, [Col(None, "countries", c, t) for c, t in COLUMNS["countries"]], 1)
        g.features.add("write:broadcast")
        return Case(
            f"DELETE FROM countries WHERE {where}",
            g.params,
            "delete",
            frozenset(g.features),
            tables=("countries",),
        )
    g.features.add("write:join")
    on = g.pick(JOINS[0][2])
    victim = "o" if target == "join-owner" else "i"
    where = order_key_predicate(g, "o")
    return Case(
        f"DELETE {victim} FROM order_items i JOIN orders o ON {on} WHERE {where}",
        g.params,
        "delete",
        frozenset(g.features),
        tables=("orders", "order_items"),
    )


def insert_case(g: Gen) -> Case:
    target = g.pick(
        [
            "orders",
            "orders",
            "orders-multi",
            "order_items",
            "users",
            "countries",
            "select",
            "subquery",
        ]
    )
    g.features.add(f"insert:{target}")

    def order_row() -> str:
        user = g.pick(sorted(g.data.fresh_order_ids))
        if g.chance(0.1):
            order_id = g.pick(g.data.values("orders", "order_id"))  # duplicate key on both
            g.features.add("insert:duplicate")
        else:
            order_id = g.pick(g.data.fresh_order_ids[user])
        values = [
            order_id,
            user,
            g.pick([*g.data.values("orders", "merchant_id"), 42]),
            g.str_value(Col(None, "orders", "status", "str")),
            g.pick([0, 5, BIGINT_MAX]),
            g.pick(DATETIMES),
        ]
        return "(" + ", ".join(g.value(v) for v in values) + ")"

    if target in ("orders", "orders-multi"):
        rows = [order_row() for _ in range(1 if target == "orders" else g.draw(st.integers(2, 3)))]
        tail = ""
        if g.chance(0.15):
            tail = " ON DUPLICATE KEY UPDATE status = VALUES(status)"
            g.features.add("insert:on-duplicate")
        ignore = "IGNORE " if g.chance(0.1) else ""
        return Case(
            f"INSERT {ignore}INTO orders ({ORDER_COLS}) VALUES {', '.join(rows)}{tail}",
            g.params,
            "insert",
            frozenset(g.features),
            tables=("orders",),
        )
    if target == "order_items":
        order = g.pick([r for r in g.data.orders])
        line = g.pick([1, 7, 8])
        values = [
            order[0],
            line,
            order[1],
            g.str_value(Col(None, "order_items", "sku", "str")),
            1,
            100,
        ]
        return Case(
            "INSERT INTO order_items (order_id, line, user_id, sku, qty, price_cents) VALUES ("
            + ", ".join(g.value(v) for v in values)
            + ")",
            g.params,
            "insert",
            frozenset(g.features),
            tables=("order_items",),
        )
    if target == "users":
        user = g.pick([77, 78, BIGINT_MAX - 2, 1])
        email = g.pick(
            [
                "new@example.com",
                "NEW2@example.com",
                "ALICE@example.com",
                "alice@example.com  ",
                "emile@example.com",
            ]
        )
        values = [user, email, g.pick([None, "n"]), g.pick(DATETIMES)]
        return Case(
            "INSERT INTO users (user_id, email, name, created_at) VALUES ("
            + ", ".join(g.value(v) for v in values)
            + ")",
            g.params,
            "insert",
            frozenset(g.features),
            tables=("users",),
        )
    if target == "countries":
        code = g.pick(["zz", "US", "ZZ"])
        return Case(
            f"INSERT INTO countries (code, name) VALUES ({g.value(code)}, {g.value('new')})",
            g.params,
            "insert",
            frozenset(g.features),
            tables=("countries",),
        )
    if target == "select":
        g.features.add("subquery")
        return Case(
            "INSERT INTO countries (code, name) SELECT LEFT(status, 2), MAX(status) FROM orders WHERE status LIKE 'z%' GROUP BY LEFT(status, 2)",
            g.params,
            "insert",
            frozenset(g.features),
            tables=("countries",),
        )
    g.features.add("subquery")
    user = g.pick(sorted(g.data.fresh_order_ids))
    order_id = g.data.fresh_order_ids[user][0]
    return Case(
        f"INSERT INTO orders ({ORDER_COLS}) VALUES ({g.value(order_id)}, {g.value(user)}, 1, 'sub',"
        " (SELECT MAX(amount_cents) FROM orders), '2026-01-01')",
        g.params,
        "insert",
        frozenset(g.features),
        tables=("orders",),
    )


# Statement shapes outside the main grammar, written out: each must be answered exactly or
# refused. ``{u}``/``{m}``/``{e}``/``{o}`` take a user id, merchant id, e-mail variant and order
# id from the data. No ORDER BY/LIMIT here: they compare as multisets.
TEMPLATES: list[tuple[str, str]] = [
    (
        "union",
        "SELECT user_id FROM users WHERE user_id = {u} UNION SELECT user_id FROM orders WHERE merchant_id = {m}",
    ),
    ("union", "SELECT user_id FROM users UNION ALL SELECT user_id FROM orders WHERE user_id = {u}"),
    (
        "cte",
        "WITH x AS (SELECT user_id, amount_cents FROM orders) SELECT COUNT(*), SUM(amount_cents) FROM x",
    ),
    ("cte", "WITH x AS (SELECT user_id FROM orders WHERE user_id = {u}) SELECT * FROM x"),
    (
        "window",
        "SELECT order_id, ROW_NUMBER() OVER (PARTITION BY user_id ORDER BY order_id) AS rn FROM orders",
    ),
    ("window", "SELECT order_id, COUNT(*) OVER () AS n FROM orders WHERE merchant_id = {m}"),
    (
        "window",
        "SELECT user_id, SUM(amount_cents) OVER (PARTITION BY user_id) AS s FROM orders WHERE user_id = {u}",
    ),
    ("rollup", "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY user_id WITH ROLLUP"),
    (
        "agg-other",
        "SELECT STDDEV(amount_cents), VARIANCE(amount_cents), BIT_OR(merchant_id), BIT_XOR(user_id) FROM orders",
    ),
    ("agg-other", "SELECT COUNT(DISTINCT user_id, merchant_id) FROM orders"),
    ("agg-other", "SELECT JSON_ARRAYAGG(order_id) IS NULL FROM orders"),
    ("session", "SELECT SQL_CALC_FOUND_ROWS order_id FROM orders WHERE user_id = {u}"),
    ("session", "SELECT order_id, CONNECTION_ID() > 0 AS c FROM orders WHERE merchant_id = {m}"),
    ("session", "SELECT DATABASE() AS d, order_id FROM orders WHERE user_id = {u}"),
    ("literal", "SELECT order_id FROM orders WHERE user_id = 0x8"),
    ("literal", "SELECT order_id FROM orders WHERE merchant_id = 0x1 OR merchant_id = X'07'"),
    ("literal", "SELECT order_id FROM orders WHERE user_id = b'1000' OR user_id = 8e0"),
    ("literal", "SELECT order_id FROM orders WHERE user_id = '8abc' OR user_id = ' 13'"),
    ("literal", "SELECT order_id, 0x41 AS h, _utf8mb4'x' AS u FROM orders WHERE user_id = {u}"),
    ("literal", "SELECT order_id FROM orders WHERE status = 'x\\'' OR user_id = {u}"),
    ("hint", "SELECT order_id FROM orders FORCE INDEX (idx_user_created) WHERE merchant_id = {m}"),
    (
        "hint",
        "SELECT STRAIGHT_JOIN o.order_id FROM orders o JOIN order_items i ON o.order_id = i.order_id",
    ),
    ("hint", "SELECT HIGH_PRIORITY SQL_NO_CACHE user_id FROM users"),
    (
        "join-other",
        "SELECT o.order_id, i.line FROM orders o, order_items i WHERE o.order_id = i.order_id AND i.qty = 2",
    ),
    ("join-other", "SELECT o.order_id, i.line FROM orders o JOIN order_items i USING (order_id)"),
    (
        "join-other",
        "SELECT o.order_id, i.line FROM orders o JOIN order_items i USING (order_id, user_id)",
    ),
    ("join-other", "SELECT order_id FROM orders o NATURAL JOIN order_items i"),
    (
        "join-other",
        "SELECT o.order_id, i.line FROM orders o RIGHT JOIN order_items i ON o.order_id = i.order_id",
    ),
    (
        "join-other",
        "SELECT o.order_id, c.code FROM orders o CROSS JOIN countries c WHERE o.user_id = {u}",
    ),
    (
        "join-other",
        "SELECT u.user_id, o.order_id, i.line FROM users u JOIN orders o ON o.user_id = u.user_id JOIN order_items i ON i.order_id = o.order_id",
    ),
    (
        "join-other",
        "SELECT o.order_id FROM orders o JOIN order_items i ON o.order_id = i.order_id JOIN merchant_orders m ON m.order_id = o.order_id",
    ),
    (
        "join-other",
        "SELECT a.order_id, b.order_id AS o2 FROM orders a JOIN orders b ON a.user_id = b.user_id AND a.order_id < b.order_id",
    ),
    ("lookup", "SELECT user_id, email FROM users WHERE email = {e}"),
    ("lookup", "SELECT user_id, email FROM users WHERE email IN ({e}, 'bob@example.com')"),
    ("lookup", "SELECT user_id FROM user_emails WHERE email = {e}"),
    (
        "lookup",
        "SELECT order_id, merchant_id FROM orders WHERE merchant_id = {m} AND user_id = {u}",
    ),
    ("lookup", "SELECT order_id FROM orders WHERE merchant_id IN ({m}, 0) AND status <> 'x'"),
    (
        "subquery",
        "SELECT user_id FROM users WHERE user_id IN (SELECT user_id FROM orders WHERE merchant_id = {m})",
    ),
    (
        "subquery",
        "SELECT user_id FROM users u WHERE EXISTS (SELECT 1 FROM orders o WHERE o.user_id = u.user_id AND o.amount_cents > 100)",
    ),
    (
        "subquery",
        "SELECT COUNT(*) FROM order_items WHERE order_id IN (SELECT order_id FROM orders WHERE merchant_id = {m})",
    ),
    (
        "subquery",
        "SELECT order_id FROM orders WHERE user_id = {u} AND amount_cents >= ALL (SELECT amount_cents FROM orders)",
    ),
    (
        "subquery",
        "SELECT (SELECT COUNT(*) FROM orders) AS n, user_id FROM users WHERE user_id = {u}",
    ),
    ("subquery", "SELECT COUNT(*) FROM (SELECT user_id FROM orders LIMIT 3) t"),
    ("subquery", "SELECT COUNT(*) FROM (SELECT DISTINCT status FROM orders) t"),
    ("physical", "SELECT order_id FROM orders_0001"),
    ("physical", "SELECT order_id FROM orders PARTITION (p0)"),
    (
        "case",
        "SELECT CASE WHEN amount_cents > 100 THEN 'big' ELSE status END AS k, COUNT(*) AS n FROM orders GROUP BY k",
    ),
    ("case", "SELECT IF(status = 'PAID', 1, 0) AS p, COUNT(*) AS n FROM orders GROUP BY p"),
    (
        "case",
        "SELECT status COLLATE utf8mb4_bin AS s, COUNT(*) AS n FROM orders GROUP BY status COLLATE utf8mb4_bin",
    ),
    ("case", "SELECT BINARY status AS s, COUNT(*) AS n FROM orders GROUP BY BINARY status"),
    ("case", "SELECT LOWER(status) AS s, COUNT(*) AS n FROM orders GROUP BY LOWER(status)"),
    ("case", "SELECT status, COUNT(*) AS n FROM orders GROUP BY status HAVING status LIKE 'p%'"),
    ("case", "SELECT user_id, COUNT(*) AS n FROM orders GROUP BY 1 HAVING n > 1"),
    (
        "case",
        "SELECT user_id AS u, MAX(created_at) AS t FROM orders GROUP BY u HAVING t > '2026-01-01'",
    ),
    ("case", "SELECT COUNT(*) AS n FROM orders HAVING n > 0"),
    ("case", "SELECT DISTINCT status, COUNT(*) AS n FROM orders GROUP BY status"),
    (
        "case",
        "SELECT SUM(DISTINCT amount_cents) AS s, AVG(DISTINCT amount_cents) AS a, COUNT(DISTINCT status) AS c FROM orders",
    ),
    (
        "case",
        "SELECT MIN(created_at), MAX(created_at), MIN(status), MAX(status) FROM orders WHERE merchant_id = {m}",
    ),
    (
        "case",
        "SELECT GROUP_CONCAT(order_id ORDER BY order_id SEPARATOR ';') AS g FROM orders WHERE merchant_id = {m}",
    ),
    (
        "case",
        "SELECT status, GROUP_CONCAT(DISTINCT user_id ORDER BY user_id) AS g FROM orders GROUP BY status",
    ),
]


def template_case(g: Gen) -> Case:
    kind, template = g.pick(TEMPLATES)
    g.features.add(f"template:{kind}")
    email_col = Col(None, "users", "email", "str")
    sql = template.format(
        u=g.value(g.pick(g.data.values("orders", "user_id"))),
        m=g.value(g.pick(g.data.values("orders", "merchant_id"))),
        e=g.value(g.str_value(email_col)),
        o=g.value(g.pick(g.data.values("orders", "order_id"))),
    )
    return Case(sql, g.params, "select", frozenset(g.features), rank_sql=None)


def _step(g: Gen, kind: str, table: str, render: Callable[[Gen], str]) -> Case:
    step_g = Gen(g.draw, g.data)  # own parameter names per statement
    return Case(render(step_g), step_g.params, kind, frozenset(), tables=(table,))


def lifecycle_steps(g: Gen) -> list[Case]:
    """A row written and then deleted (or deleted and written again with another lookup value)
    inside one transaction: the lookup rows the transaction created must follow their owner."""
    kind = g.pick(["order", "order-again", "user"])
    g.features.add(f"txn:lifecycle-{kind}")
    if kind == "user":
        user = g.pick([77, 78])
        email = g.pick(["new@example.com", "NEW2@example.com", "emile@example.com"])
        when = g.pick(DATETIMES)

        def insert_user(sg: Gen) -> str:
            values = ", ".join(sg.value(v) for v in (user, email, None, when))
            return f"INSERT INTO users (user_id, email, name, created_at) VALUES ({values})"

        delete = _step(
            g, "delete", "users", lambda sg: f"DELETE FROM users WHERE user_id = {sg.value(user)}"
        )
        return [_step(g, "insert", "users", insert_user), delete]
    user = g.pick(sorted(g.data.fresh_order_ids))
    order_id = g.pick(g.data.fresh_order_ids[user])
    merchants = [*g.data.values("orders", "merchant_id"), 42]
    first, second = g.pick(merchants), g.pick(merchants)

    def insert_order(merchant: int) -> Callable[[Gen], str]:
        def render(sg: Gen) -> str:
            values = (order_id, user, merchant, "new", 5, DATETIMES[0])
            return f"INSERT INTO orders ({ORDER_COLS}) VALUES ({', '.join(sg.value(v) for v in values)})"

        return render

    steps = [
        _step(g, "insert", "orders", insert_order(first)),
        _step(
            g,
            "delete",
            "orders",
            lambda sg: f"DELETE FROM orders WHERE order_id = {sg.value(order_id)}",
        ),
    ]
    if kind == "order-again":
        steps.append(_step(g, "insert", "orders", insert_order(second)))
    return steps


def txn_case(g: Gen) -> Case:
    """2-3 statements in one transaction: writes of one user (one shard), of several users
    (a second shard must be refused before anything runs), reads first or between; or a row's
    life in one transaction. Some transactions catch a failed step and commit the rest."""
    g.features.add("txn")
    go_on = g.chance(0.3)
    if go_on:
        g.features.add("txn:continue")
    if g.chance(0.25):
        steps = lifecycle_steps(g)
        tables = tuple(sorted({t for step in steps for t in step.tables}))
        sql = " ; ".join(step.sql for step in steps)
        return Case(
            sql,
            {},
            "txn",
            frozenset(g.features),
            tables=tables,
            steps=tuple(steps),
            continue_on_error=go_on,
        )
    steps = []
    for _ in range(g.draw(st.integers(2, 3))):
        step_g = Gen(g.draw, g.data)  # own parameter names per statement
        roll = g.draw(st.integers(0, 9))
        if roll <= 1:
            step = select_case(step_g)
            g.features.add("txn:read")
        else:
            step = g.pick([update_case, delete_case, insert_case])(step_g)
        g.features.update(step_g.features)
        steps.append(step)
    tables = tuple(sorted({t for step in steps for t in step.tables}))
    sql = " ; ".join(step.sql for step in steps)
    return Case(
        sql,
        {},
        "txn",
        frozenset(g.features),
        tables=tables,
        steps=tuple(steps),
        continue_on_error=go_on,
    )


def statements(data: Dataset, writes: float = 0.25) -> st.SearchStrategy[Case]:
    """Statements over ``data``: SELECTs, and with probability ``writes`` a write."""

    @st.composite
    def strategy(draw: Any) -> Case:
        g = Gen(draw, data)
        roll = draw(st.integers(0, 999))
        if roll >= int(writes * 1000):
            form = draw(st.integers(0, 11))
            return template_case(g) if form == 0 else union_case(g) if form == 1 else select_case(g)
        return draw(st.sampled_from([update_case, delete_case, insert_case, txn_case]))(g)

    return strategy()
