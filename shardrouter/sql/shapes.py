"""The statement shapes the planner accepts: tables of clauses, nodes and functions, and the walker
that refuses everything not in them.

The planner routes and merges only what it positively understands. Everything in a statement is
checked against the tables below, once, when the statement is planned (plans are cached by text):

- ``CLAUSES``: per statement kind, the sqlglot ``args`` that may be set; any other is refused.
- ``NODES``: the expression and clause node types accepted, each with the args it may carry
  (``None``: any of its declared args; they are all plain operands).
- ``FUNCTIONS``: the functions accepted, by MySQL name, each with where it may run:
  ``ANYWHERE`` (deterministic: every shard computes what one database would) or ``ONE_TARGET``
  (the value depends on the server, the session or the moment: right on one shard, wrong or
  meaningless when several shards each compute their own). ``REFUSED_FUNCTIONS`` names the ones
  refused everywhere, with why; any function in neither table is refused too.
- ``ONE_TARGET_NODES``: node types accepted only when the statement reaches one target.

docs/SQL.md lists every name in these tables; tests/unit/test_issue7_shapes.py fails when the
document and the tables disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from sqlglot import exp

from ..errors import UnsupportedQueryError

Where = Literal["anywhere", "one target"]
ANYWHERE: Where = "anywhere"
ONE_TARGET: Where = "one target"

StatementKind = Literal["select", "insert", "update", "delete"]

CLAUSES: Mapping[StatementKind, frozenset[str]] = {
    # hint (/*+ */), into (SELECT ... INTO), operation_modifiers (SQL_CALC_FOUND_ROWS,
    # HIGH_PRIORITY, STRAIGHT_JOIN, SQL_NO_CACHE...), windows (WINDOW w AS), with_ (CTEs) and
    # the dialect args of other databases are absent on purpose: refused.
    "select": frozenset(
        {
            "expressions",
            "distinct",
            "from_",
            "joins",
            "where",
            "group",
            "having",
            "order",
            "limit",
            "offset",
            "locks",
        }
    ),
    # ignore (INSERT IGNORE) is checked by the planner: refused on tables that own lookup rows.
    # returning, partition, overwrite... are refused.
    "insert": frozenset({"this", "expression", "conflict", "ignore"}),
    "update": frozenset({"this", "expressions", "where", "order", "limit"}),
    # tables: the targets of a multi-table DELETE (DELETE o FROM orders o JOIN ...).
    "delete": frozenset({"this", "tables", "where", "order", "limit"}),
}

_ANY = None
NODES: Mapping[type[exp.Expression], frozenset[str] | None] = {
    # names and values
    exp.Column: frozenset({"this", "table"}),
    exp.Identifier: _ANY,
    exp.Star: frozenset(),
    exp.Literal: _ANY,
    exp.HexString: _ANY,
    exp.Null: frozenset(),
    exp.Boolean: _ANY,
    exp.Placeholder: _ANY,
    exp.Var: _ANY,
    exp.Tuple: _ANY,
    exp.Interval: _ANY,
    exp.DataType: _ANY,
    exp.DataTypeParam: _ANY,
    # JSON_EXTRACT's path, written back as the same path ('$.a[1]', '$."a b"[*]')
    exp.JSONPath: frozenset({"expressions"}),
    exp.JSONPathRoot: frozenset(),
    exp.JSONPathKey: frozenset({"this", "quoted"}),
    exp.JSONPathSubscript: frozenset({"this"}),
    exp.JSONPathWildcard: frozenset(),
    # sqlglot's implicit argument cast of DATE_FORMAT(d, f): rendered back as written
    exp.TsOrDsToTimestamp: _ANY,
    # clauses
    exp.From: frozenset({"this"}),
    exp.Table: frozenset({"this", "alias", "joins", "hints", "db"}),  # db: planner refuses
    exp.TableAlias: frozenset({"this"}),
    exp.IndexTableHint: _ANY,  # USE/FORCE/IGNORE INDEX: the plan changes, never the rows
    exp.Join: frozenset({"this", "on", "side", "kind", "using"}),
    exp.Where: _ANY,
    exp.Group: frozenset({"expressions"}),  # no WITH ROLLUP, no grouping sets
    exp.Having: _ANY,
    exp.Order: frozenset({"this", "expressions"}),  # this: GROUP_CONCAT(x ORDER BY y)
    exp.Ordered: frozenset({"this", "desc", "nulls_first"}),
    exp.Limit: frozenset({"expression"}),
    exp.Offset: frozenset({"expression"}),
    exp.Lock: frozenset({"update", "wait"}),  # no OF tables (MySQL 8 only)
    exp.Alias: _ANY,
    exp.Distinct: frozenset({"expressions"}),
    exp.Schema: frozenset({"this", "expressions"}),
    exp.Values: frozenset({"expressions"}),
    exp.OnConflict: frozenset({"duplicate", "expressions", "action"}),  # ON DUPLICATE KEY UPDATE
    # operators
    exp.Paren: _ANY,
    exp.Neg: _ANY,
    exp.Add: _ANY,
    exp.Sub: _ANY,
    exp.Mul: _ANY,
    exp.Div: _ANY,
    exp.IntDiv: _ANY,
    exp.Mod: _ANY,
    exp.BitwiseAnd: _ANY,
    exp.BitwiseOr: _ANY,
    exp.BitwiseXor: _ANY,
    exp.BitwiseNot: _ANY,
    exp.BitwiseLeftShift: _ANY,
    exp.BitwiseRightShift: _ANY,
    exp.EQ: _ANY,
    exp.NEQ: _ANY,
    exp.NullSafeEQ: _ANY,
    exp.GT: _ANY,
    exp.GTE: _ANY,
    exp.LT: _ANY,
    exp.LTE: _ANY,
    exp.And: _ANY,
    exp.Or: _ANY,
    exp.Xor: _ANY,
    exp.Not: _ANY,
    exp.In: frozenset({"this", "expressions", "query"}),  # query: the planner decides
    exp.Between: _ANY,
    exp.Like: _ANY,
    exp.Escape: _ANY,
    exp.Is: _ANY,
    exp.Case: _ANY,
    exp.If: _ANY,
    exp.Cast: frozenset({"this", "to"}),
    exp.Collate: _ANY,
    # subqueries: accepted as nodes; the planner refuses them over sharded tables and in INSERT
    exp.Subquery: frozenset({"this", "alias"}),
    exp.Exists: frozenset({"this"}),
}

# Node types the merge cannot combine across shards: accepted on one target only.
ONE_TARGET_NODES: Mapping[type[exp.Expression], str] = {
    exp.Window: "window function {sql} numbers each shard's rows on its own",
    exp.WindowSpec: "window function {sql} numbers each shard's rows on its own",
    exp.RowNumber: "window function {sql} numbers each shard's rows on its own",
    exp.Rank: "window function {sql} numbers each shard's rows on its own",
    exp.DenseRank: "window function {sql} numbers each shard's rows on its own",
}


@dataclass(frozen=True, slots=True)
class Function:
    """An accepted function: its MySQL name, the sqlglot node it parses to (None: parsed as
    an anonymous call, matched by name) and where it may run."""

    name: str
    node: type[exp.Func] | None
    where: Where
    why: str = ""
    """For ONE_TARGET: why several shards cannot compute it."""


_NOW = "each shard reads its own clock, so the statement would see several instants"
_RANDOM = "each shard draws its own random values"
_SESSION = "each shard answers for its own server and session"
_IDENTITY = (
    "answers with the shard's own identity (its physical database, account or server), not"
    " the logical database's, even on one target"
)
_AGG = "each shard would aggregate only its own rows and the merge cannot combine them"

_FUNCTION_LIST: tuple[Function, ...] = (
    # aggregates the merge combines (scatter.py: COUNT/SUM/MIN/MAX, AVG as SUM/COUNT)
    Function("COUNT", exp.Count, ANYWHERE),
    Function("SUM", exp.Sum, ANYWHERE),
    Function("MIN", exp.Min, ANYWHERE),
    Function("MAX", exp.Max, ANYWHERE),
    Function("AVG", exp.Avg, ANYWHERE),
    # joined from the shards' pieces when it is a select item (scatter.py refuses it elsewhere)
    Function("GROUP_CONCAT", exp.GroupConcat, ANYWHERE),
    # aggregates no merge can combine: right on one target
    Function("STDDEV_POP", exp.StddevPop, ONE_TARGET, _AGG),
    Function("STDDEV_SAMP", exp.StddevSamp, ONE_TARGET, _AGG),
    Function("STDDEV", exp.Stddev, ONE_TARGET, _AGG),
    Function("VAR_POP", exp.VariancePop, ONE_TARGET, _AGG),
    Function("VAR_SAMP", exp.Variance, ONE_TARGET, _AGG),
    Function("BIT_AND", exp.BitwiseAndAgg, ONE_TARGET, _AGG),
    Function("BIT_OR", exp.BitwiseOrAgg, ONE_TARGET, _AGG),
    Function("BIT_XOR", exp.BitwiseXorAgg, ONE_TARGET, _AGG),
    # deterministic scalar functions: every shard computes what one database would
    Function("COALESCE", exp.Coalesce, ANYWHERE),
    Function("IFNULL", exp.Coalesce, ANYWHERE),
    Function("NULLIF", exp.Nullif, ANYWHERE),
    Function("IF", exp.If, ANYWHERE),
    Function("GREATEST", exp.Greatest, ANYWHERE),
    Function("LEAST", exp.Least, ANYWHERE),
    Function("CONCAT", exp.Concat, ANYWHERE),
    Function("CONCAT_WS", exp.ConcatWs, ANYWHERE),
    Function("LOWER", exp.Lower, ANYWHERE),
    Function("UPPER", exp.Upper, ANYWHERE),
    Function("LENGTH", exp.Length, ANYWHERE),
    Function("CHAR_LENGTH", exp.Length, ANYWHERE),
    Function("SUBSTRING", exp.Substring, ANYWHERE),
    Function("TRIM", exp.Trim, ANYWHERE),
    Function("REPLACE", exp.Replace, ANYWHERE),
    Function("LEFT", exp.Left, ANYWHERE),
    Function("RIGHT", exp.Right, ANYWHERE),
    Function("LPAD", exp.Pad, ANYWHERE),
    Function("REVERSE", exp.Reverse, ANYWHERE),
    Function("REPEAT", exp.Repeat, ANYWHERE),
    Function("LOCATE", exp.StrPosition, ANYWHERE),
    Function("HEX", exp.Hex, ANYWHERE),
    Function("UNHEX", exp.Unhex, ANYWHERE),
    Function("MD5", exp.MD5, ANYWHERE),
    Function("SHA2", exp.SHA2, ANYWHERE),
    Function("ABS", exp.Abs, ANYWHERE),
    Function("SIGN", exp.Sign, ANYWHERE),
    Function("ROUND", exp.Round, ANYWHERE),
    Function("FLOOR", exp.Floor, ANYWHERE),
    Function("CEIL", exp.Ceil, ANYWHERE),
    Function("TRUNCATE", exp.Trunc, ANYWHERE),
    Function("POWER", exp.Pow, ANYWHERE),
    Function("SQRT", exp.Sqrt, ANYWHERE),
    Function("DATE", exp.TsOrDsToDate, ANYWHERE),
    Function("YEAR", exp.Year, ANYWHERE),
    Function("MONTH", exp.Month, ANYWHERE),
    Function("DAY", exp.Day, ANYWHERE),
    Function("DAYOFMONTH", exp.DayOfMonth, ANYWHERE),
    Function("DAYOFWEEK", exp.DayOfWeek, ANYWHERE),
    Function("HOUR", exp.Hour, ANYWHERE),
    Function("MINUTE", exp.Minute, ANYWHERE),
    Function("SECOND", exp.Second, ANYWHERE),
    Function("DATE_FORMAT", exp.TimeToStr, ANYWHERE),
    Function("STR_TO_DATE", exp.StrToDate, ANYWHERE),
    # STR_TO_DATE with a time in its format (sqlglot's StrToTime; %I/%h and %S/%s come back as
    # their MySQL synonyms)
    Function("STR_TO_DATE", exp.StrToTime, ANYWHERE),
    Function("DATE_ADD", exp.DateAdd, ANYWHERE),
    Function("DATE_SUB", exp.DateSub, ANYWHERE),
    Function("DATEDIFF", exp.DateDiff, ANYWHERE),
    Function("TIMESTAMPDIFF", exp.TimestampDiff, ANYWHERE),
    Function("EXTRACT", exp.Extract, ANYWHERE),
    Function("JSON_EXTRACT", exp.JSONExtract, ANYWHERE),
    Function("JSON_UNQUOTE", None, ANYWHERE),
    Function("WEIGHT_STRING", exp.WeightString, ANYWHERE),
    Function("REGEXP", exp.RegexpLike, ANYWHERE),
    Function("SUBSTRING_INDEX", exp.SubstringIndex, ANYWHERE),
    Function("MID", None, ANYWHERE),
    Function("FIELD", None, ANYWHERE),
    Function("STRCMP", None, ANYWHERE),
    Function("ASCII", exp.Ascii, ANYWHERE),
    Function("CHAR", exp.Chr, ANYWHERE),
    Function("OCTET_LENGTH", None, ANYWHERE),
    Function("BIT_LENGTH", exp.BitLength, ANYWHERE),
    Function("FORMAT", exp.NumberToStr, ANYWHERE),
    Function("CRC32", None, ANYWHERE),
    Function("SHA1", exp.SHA, ANYWHERE),
    Function("TO_BASE64", exp.ToBase64, ANYWHERE),
    Function("LN", exp.Ln, ANYWHERE),
    Function("EXP", exp.Exp, ANYWHERE),
    Function("WEEK", exp.Week, ANYWHERE),
    Function("WEEKDAY", None, ANYWHERE),
    Function("QUARTER", exp.Quarter, ANYWHERE),
    Function("DAYOFYEAR", exp.DayOfYear, ANYWHERE),
    Function("DAYNAME", exp.Dayname, ANYWHERE),
    Function("LAST_DAY", exp.LastDay, ANYWHERE),
    Function("TIME", exp.Time, ANYWHERE),
    Function("TIMESTAMP", exp.Timestamp, ANYWHERE),
    Function("TIMESTAMPADD", exp.TimestampAdd, ANYWHERE),
    Function("FROM_UNIXTIME", exp.UnixToTime, ANYWHERE),
    Function("CONVERT_TZ", exp.ConvertTimezone, ANYWHERE),
    Function("JSON_OBJECT", exp.JSONObject, ANYWHERE),
    Function("JSON_CONTAINS", None, ANYWHERE),
    Function("JSON_LENGTH", None, ANYWHERE),
    # right on one target only: the moment, chance or the server decide the value
    Function("NOW", None, ONE_TARGET, _NOW),
    Function("CURRENT_TIMESTAMP", exp.CurrentTimestamp, ONE_TARGET, _NOW),
    Function("CURRENT_DATE", exp.CurrentDate, ONE_TARGET, _NOW),
    Function("CURRENT_TIME", exp.CurrentTime, ONE_TARGET, _NOW),
    Function("UTC_TIMESTAMP", exp.UtcTimestamp, ONE_TARGET, _NOW),
    Function("UTC_DATE", exp.UtcDate, ONE_TARGET, _NOW),
    Function("UTC_TIME", exp.UtcTime, ONE_TARGET, _NOW),
    Function("UNIX_TIMESTAMP", None, ONE_TARGET, _NOW),
    Function("RAND", exp.Rand, ONE_TARGET, _RANDOM),
    Function("UUID", exp.Uuid, ONE_TARGET, _RANDOM),
    # The id of the pooled shard connection that ran the statement: that session's own id, as
    # on one database (diagnostics of the pool use it); meaningless across shards.
    Function("CONNECTION_ID", None, ONE_TARGET, _SESSION),
    Function("VERSION", exp.CurrentVersion, ONE_TARGET, _SESSION),
    Function("SLEEP", None, ONE_TARGET, "every shard would sleep"),
)

FUNCTIONS: Mapping[str, Function] = {f.name: f for f in _FUNCTION_LIST}

TIME_FUNCTIONS: frozenset[str] = frozenset(f.name for f in _FUNCTION_LIST if f.why == _NOW)
"""Accepted in INSERT VALUES of a sharded table too: every row is written once, by one shard."""

RANDOM_FUNCTIONS: frozenset[str] = frozenset(f.name for f in _FUNCTION_LIST if f.why == _RANDOM)
"""Likewise: a random value per row is what one database gives too."""

REFUSED_FUNCTIONS: Mapping[str, str] = {
    "LAST_INSERT_ID": "reads the previous statement of the connection, and the router picks"
    " pooled connections per statement; ids come from the router's generator",
    "FOUND_ROWS": "reads the previous statement of the connection, which a pool does not keep",
    "ROW_COUNT": "reads the previous statement of the connection, which a pool does not keep",
    "GET_LOCK": "takes a lock owned by a pooled connection that goes back to the pool",
    "RELEASE_LOCK": "releases a lock owned by whichever pooled connection took it",
    "SYSDATE": "changes within one statement; use NOW() on one target",
    "UUID_SHORT": "depends on the server id; use the router's id generator",
    "BENCHMARK": "is a load test, not a query",
    "LOAD_FILE": "reads a file on the shard's server",
    # The shard's identity is not the logical database's: orders_s1 is not "the" database.
    "DATABASE": _IDENTITY,
    "SCHEMA": _IDENTITY,
    "USER": _IDENTITY,
    "CURRENT_USER": _IDENTITY,
    "SESSION_USER": _IDENTITY,
    "SYSTEM_USER": _IDENTITY,
}

_REFUSED_NODES: Mapping[type, str] = {
    exp.CurrentSchema: "DATABASE",
    exp.CurrentUser: "CURRENT_USER",
    exp.SessionUser: "SESSION_USER",
}
"""Refused functions sqlglot parses to a node of their own (the others parse by name)."""

IDENTITY_VARIABLES: frozenset[str] = frozenset(
    {
        "hostname",
        "port",
        "socket",
        "server_id",
        "server_uuid",
        "datadir",
        "basedir",
        "pid_file",
        "tmpdir",
        "bind_address",
        "report_host",
        "report_port",
        "log_bin_basename",
        "gtid_domain_id",
        "gtid_current_pos",
        "gtid_binlog_pos",
        "gtid_slave_pos",
        "wsrep_node_name",
        "wsrep_node_address",
    }
)
"""System variables that name the shard's server or connection: refused even on one target
(``@@hostname`` of a shard is not the logical database's). Other ``@@`` variables are settings
every shard shares (the sandbox and `shardctl schema` keep them alike): one target only."""

_BY_NODE: dict[type, Function] = {}  # sqlglot's Func is a mixin, not an Expression type
for _f in _FUNCTION_LIST:
    if _f.node is not None:
        _BY_NODE.setdefault(_f.node, _f)
_BY_NAME: dict[str, Function] = {f.name: f for f in _FUNCTION_LIST if f.node is None}

# Constructs named in messages (clauses refused because they are absent from CLAUSES/NODES).
_CLAUSE_NAMES: Mapping[str, str] = {
    "hint": "optimizer hint /*+ ... */",
    "into": "SELECT ... INTO",
    "operation_modifiers": "SELECT modifier (SQL_CALC_FOUND_ROWS, HIGH_PRIORITY, STRAIGHT_JOIN,"
    " SQL_NO_CACHE ...)",
    "windows": "named WINDOW clause",
    "with_": "WITH (common table expression)",
    "returning": "RETURNING",
    "partition": "PARTITION (...)",
    "rollup": "GROUP BY ... WITH ROLLUP",
    "totals": "GROUP BY ... WITH ROLLUP",
    "using": "DELETE ... USING",
    "expressions": "FOR UPDATE OF / FOR SHARE OF",
}


@dataclass(slots=True)
class Verdict:
    """What the walk found: why the statement cannot fan out (None: it can)."""

    fanout_refusal: str | None = None
    strict_refusal: str | None = None
    """Like fanout_refusal, but ignoring time and random functions: an INSERT writes each row
    once, on one shard, so NOW() or RAND() in its VALUES are what one database computes."""

    def refuse_fanout(self, reason: str, *, per_row: bool = False) -> None:
        if self.fanout_refusal is None:
            self.fanout_refusal = reason
        if not per_row and self.strict_refusal is None:
            self.strict_refusal = reason


def refuse_hidden_syntax(sql: str) -> None:
    """Refuse MySQL executable comments and optimizer hints, found in the raw text.

    sqlglot reads ``/*! ... */``, ``/*!50100 ... */`` and ``/*M! ... */`` as plain comments,
    yet MySQL and MariaDB execute their contents: the shards would run a statement the
    planner never saw. Optimizer hints ``/*+ ... */`` are refused too (they can change which
    rows a LIMIT keeps, and the planner does not read them). Strings, quoted identifiers and
    ordinary comments are skipped, so ``'/*!'`` in a literal is data.
    """
    i, n = 0, len(sql)
    while i < n:
        c = sql[i]
        if c == "'" and i > 0 and sql[i - 1] in "xX" and not _identifier_char(sql, i - 2):
            # sqlglot parses X'07' and 0x07 into one node, but MariaDB does not treat them
            # alike: `7 = X'07'` is false (a binary string), `7 = 0x07` true (a number).
            raise UnsupportedQueryError(
                "hex string X'...' is not routed: it would reach the shards as 0x..., which"
                " MariaDB compares differently; write 0x... for a number or a quoted string"
            )
        if c in "'\"`":
            i = _skip_quoted(sql, i, c)
            continue
        if c == "#" or (
            c == "-" and sql.startswith("--", i) and (i + 2 >= n or sql[i + 2] in " \t\r\n")
        ):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if c == "/" and sql.startswith("/*", i):
            marker = sql[i + 2 : i + 4]
            if marker[:1] == "!" or marker == "M!":
                raise UnsupportedQueryError(
                    "executable comment /*! ... */ (or /*M! ... */) is not routed: MySQL runs its"
                    " contents, which the planner cannot see; write the SQL without the comment"
                )
            if marker[:1] == "+":
                raise UnsupportedQueryError(
                    "optimizer hint /*+ ... */ is not routed: the planner does not read hints;"
                    " remove it (or run the statement on a shard connection)"
                )
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        i += 1


def _identifier_char(sql: str, index: int) -> bool:
    return index >= 0 and (sql[index].isalnum() or sql[index] in "_$")


def _skip_quoted(sql: str, start: int, quote: str) -> int:
    """The index just past the quoted token opening at ``start`` (backslash escapes in strings,
    doubled quotes everywhere)."""
    i, n = start + 1, len(sql)
    while i < n:
        c = sql[i]
        if c == "\\" and quote != "`":
            i += 2
            continue
        if c == quote:
            if i + 1 < n and sql[i + 1] == quote:
                i += 2
                continue
            return i + 1
        i += 1
    return n


def check(tree: exp.Expression, kind: StatementKind) -> Verdict:
    """Walk ``tree``: raise UnsupportedQueryError on anything outside the tables; return what
    restricts the statement to one target."""
    verdict = Verdict()
    _check_args(tree, CLAUSES[kind], f"{kind.upper()} clause")
    for value in tree.args.values():
        for child in _children(value):
            _walk(child, verdict, in_conflict=False)
    return verdict


def _children(value: object) -> list[exp.Expression]:
    if isinstance(value, exp.Expression):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, exp.Expression)]
    return []


def _set(value: object) -> bool:
    return value is not None and value is not False and value != []


def _check_args(node: exp.Expression, allowed: frozenset[str], what: str) -> None:
    for key, value in node.args.items():
        if key not in allowed and _set(value):
            name = _CLAUSE_NAMES.get(key, key)
            shown = _show(value if isinstance(value, exp.Expression) else node)
            raise UnsupportedQueryError(
                f"{what} {name!s} ({shown}) is not routed: the planner accepts only the"
                " clauses listed in docs/SQL.md; rewrite without it or run it on a shard"
                " connection"
            )


def _walk(node: exp.Expression, verdict: Verdict, *, in_conflict: bool) -> None:
    kind = type(node)
    if isinstance(node, exp.Select):
        # A subquery: the same clause table as a top-level SELECT (the planner decides
        # whether a subquery may run at all).
        _check_args(node, CLAUSES["select"], "subquery clause")
    elif kind in NODES:
        allowed = NODES[kind]
        if allowed is not None:
            _check_args(node, allowed, type(node).__name__)
        if kind is exp.Join and str(node.args.get("kind") or "").upper() not in (
            "",
            "INNER",
            "OUTER",
            "CROSS",
            "STRAIGHT_JOIN",
        ):
            raise UnsupportedQueryError(
                f"{node.args['kind']} JOIN is not routed; write [LEFT|RIGHT] JOIN ... ON"
            )
    elif kind in ONE_TARGET_NODES:
        verdict.refuse_fanout(
            ONE_TARGET_NODES[kind].format(sql=_show(node)) + "; route it by a key"
        )
    elif isinstance(node, exp.Func):
        _function(node, verdict, in_conflict=in_conflict)
    elif isinstance(node, exp.Parameter | exp.PropertyEQ):
        raise UnsupportedQueryError(
            f"user variable {_show(node)} is not routed: session variables live on one pooled"
            " connection of one shard; pass the value as a parameter"
        )
    elif isinstance(node, exp.SessionParameter):
        if str(node.name).lower() in IDENTITY_VARIABLES:
            raise UnsupportedQueryError(
                f"system variable {_show(node)} {_IDENTITY}: not routed; read it on a shard"
                " connection if you mean that shard's server"
            )
        verdict.refuse_fanout(f"system variable {_show(node)}: {_SESSION}; read it on one target")
    elif isinstance(node, exp.Union | exp.Intersect | exp.Except):
        pass  # the planner refuses set operations over sharded tables
    else:
        raise UnsupportedQueryError(
            f"{_describe(node)} is not routed: the planner accepts only the expressions listed"
            " in docs/SQL.md"
        )
    if isinstance(node, exp.OnConflict):
        in_conflict = True
    for value in node.args.values():
        for child in _children(value):
            _walk(child, verdict, in_conflict=in_conflict)


def _function(node: exp.Func, verdict: Verdict, *, in_conflict: bool) -> None:
    if isinstance(node, exp.Anonymous):
        name = str(node.name).upper()
        if name == "VALUES" and in_conflict:
            return  # ON DUPLICATE KEY UPDATE c = VALUES(c): the row being inserted
        function = _BY_NAME.get(name)
    else:
        function = _BY_NODE.get(type(node))
        if function is not None:
            name = function.name
        else:
            name = _REFUSED_NODES.get(type(node), type(node).__name__.upper())
    if function is None:
        reason = REFUSED_FUNCTIONS.get(name)
        if reason is not None:
            raise UnsupportedQueryError(f"function {name}() {reason}: not routed")
        raise UnsupportedQueryError(
            f"function {_show(node)} is not routed: the planner accepts only the functions"
            " listed in docs/SQL.md (deterministic ones everywhere, NOW()/RAND()/CONNECTION_ID()"
            " and the like on one target)"
        )
    if isinstance(node, exp.RegexpLike) and node.args.get("flag") is not None:
        raise UnsupportedQueryError(
            f"{_show(node)} is not routed: MariaDB has no REGEXP_LIKE with flags; write x REGEXP y"
        )
    if function.name == "UNIX_TIMESTAMP" and node.expressions:
        return  # UNIX_TIMESTAMP(d) converts d; only UNIX_TIMESTAMP() reads the clock
    if function.where == ONE_TARGET:
        verdict.refuse_fanout(
            f"function {function.name}() across shards: {function.why}; route the statement"
            " by a key",
            per_row=function.name in TIME_FUNCTIONS or function.name in RANDOM_FUNCTIONS,
        )


def _describe(node: exp.Expression) -> str:
    return f"{type(node).__name__} {_show(node)}"


def _show(node: object) -> str:
    try:
        text = node.sql(dialect="mysql") if isinstance(node, exp.Expression) else str(node)
    except Exception:  # only for the message: never let rendering hide the refusal
        text = type(node).__name__
    return text if len(text) <= 80 else text[:77] + "..."


__all__ = [
    "ANYWHERE",
    "CLAUSES",
    "FUNCTIONS",
    "IDENTITY_VARIABLES",
    "NODES",
    "ONE_TARGET",
    "ONE_TARGET_NODES",
    "REFUSED_FUNCTIONS",
    "Function",
    "Verdict",
    "check",
    "refuse_hidden_syntax",
]
