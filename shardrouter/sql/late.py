"""Late parameters: LIMIT/OFFSET and HAVING values that a fan-out needs at planning time.

A statement routed to one target sends its parameters to the shard, which binds them. A fan-out
cannot: each shard must return ``offset + limit`` rows and the merge keeps ``limit`` of them, and
HAVING is evaluated by the merge on the combined groups, so both need the values. The plan of
such a statement (``Plan.late``) is planned again, when it fans out, from its text with these
parameters written in as literals, exactly as the driver would have written them (PyMySQL's own
escaping: every supported driver interpolates on the client, so the shard sees the same text).

Only the clauses' own placeholders are written; the same name elsewhere (WHERE) stays a bound
parameter. The text is edited by token positions, not regenerated: MySQL labels a column by its
text as written, and the labels must not change.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from pymysql.converters import escape_item
from sqlglot import Token, TokenType, exp
from sqlglot.dialects.mysql import MySQL

from ..errors import RoutingError
from .merge import MAX_LIMIT

_CLAUSE_ENDS = frozenset(
    {TokenType.ORDER_BY, TokenType.LIMIT, TokenType.FOR, TokenType.WINDOW, TokenType.LOCK}
)
"""Top-level tokens that end a HAVING clause (what may follow it in a SELECT)."""

_SCALARS = (int, float, str, bytes, Decimal, dt.date, dt.time, dt.timedelta)
"""What a HAVING parameter may be (datetime is a date): what the drivers write as a literal."""


@dataclass(frozen=True, slots=True)
class LateParams:
    limit: tuple[str, ...]
    """The parameters of the top-level LIMIT and OFFSET (``LIMIT :n OFFSET :m``)."""
    having: tuple[str, ...]
    """The parameters in the top-level HAVING (``HAVING COUNT(*) > :n``)."""
    items: tuple[str, ...] = ()
    """The parameters in top-level select items over aggregates (``SUM(a) / :d``: the ORM
    writes every Python number so), computed after the merge."""

    @classmethod
    def of(cls, tree: exp.Select) -> LateParams | None:
        limit = []
        for clause in ("limit", "offset"):
            node = tree.args.get(clause)
            if node is not None and isinstance(node.expression, exp.Placeholder):
                limit.append(str(node.expression.this))
        having_node = tree.args.get("having")
        having = (
            [str(p.this) for p in having_node.find_all(exp.Placeholder) if p.this]
            if having_node is not None
            else []
        )
        items = [
            str(p.this)
            for item in tree.expressions
            if item.find(exp.AggFunc) is not None
            for p in item.find_all(exp.Placeholder)
            if p.this
        ]
        if not limit and not having and not items:
            return None
        return cls(
            tuple(dict.fromkeys(limit)), tuple(dict.fromkeys(having)), tuple(dict.fromkeys(items))
        )

    def values(self, params: Mapping[str, Any]) -> dict[str, Any]:
        """The values these parameters hold, checked: a LIMIT/OFFSET an int from 0 to MySQL's
        largest, a HAVING value a scalar the driver would write (RoutingError naming the
        parameter otherwise)."""
        out: dict[str, Any] = {}
        for name in self._names:
            try:
                value = params[name]
            except KeyError:
                raise RoutingError(f"parameter :{name} has no value (pass it in params)") from None
            if name in self.limit and (type(value) is not int or not 0 <= value <= MAX_LIMIT):
                raise RoutingError(
                    f"LIMIT/OFFSET parameter :{name} is {value!r}; pass an int from 0 to"
                    f" {MAX_LIMIT}"
                )
            out[name] = value
        for name in (*self.having, *self.items):
            value = out[name]
            where = "HAVING" if name in self.having else "select item"
            if value is not None and not isinstance(value, _SCALARS):
                raise RoutingError(
                    f"{where} parameter :{name} is {type(value).__name__} {value!r}; pass a"
                    " number, a string, a date or time, bytes or None"
                )
            if isinstance(value, float) and not math.isfinite(value):
                # No SQL literal: the driver would write `nan`, which the server refuses.
                raise RoutingError(
                    f"{where} parameter :{name} is {value!r}, which MySQL has no value for;"
                    " pass a finite number or None"
                )
        return out

    @property
    def _names(self) -> tuple[str, ...]:
        return (*self.limit, *self.having, *self.items)

    def literals(self, values: Mapping[str, Any]) -> tuple[str, ...]:
        """The SQL literals of ``values`` (checked by ``values()``), in this order: what
        ``write`` writes in."""
        return tuple(_literal(values[name]) for name in self._names)

    def write(self, sql: str, literals: Sequence[str]) -> str:
        """``sql`` with this statement's late placeholders replaced by ``literals``."""
        values = dict(zip(self._names, literals, strict=True))
        tokens = MySQL().tokenize(sql)
        edits: list[tuple[int, int, str]] = []
        if self.items:  # the select list: from SELECT to the top-level FROM
            end = next(
                (i for i in _top_level(tokens, 1) if tokens[i].token_type == TokenType.FROM),
                len(tokens),
            )
            edits += _placeholders(tokens, 1, end, set(self.items), values)
        if self.limit:
            start = _last_top_level(tokens, {TokenType.LIMIT})
            edits += _placeholders(tokens, start + 1, len(tokens), set(self.limit), values)
        if self.having:
            start = _last_top_level(tokens, {TokenType.HAVING})
            end = next(
                (i for i in _top_level(tokens, start + 1) if tokens[i].token_type in _CLAUSE_ENDS),
                len(tokens),
            )
            edits += _placeholders(tokens, start + 1, end, set(self.having), values)
        for begin, stop, text in sorted(edits, reverse=True):
            sql = sql[:begin] + text + sql[stop:]
        return sql


def _top_level(tokens: list[Token], start: int = 0) -> list[int]:
    """Indexes of the tokens outside parentheses (from ``start``, at depth 0 there), not a
    parameter's name (``:limit``)."""
    out, depth = [], 0
    for i in range(start, len(tokens)):
        kind = tokens[i].token_type
        if kind == TokenType.L_PAREN:
            depth += 1
        elif kind == TokenType.R_PAREN:
            depth -= 1
        elif depth == 0 and not (i and tokens[i - 1].token_type == TokenType.COLON):
            out.append(i)
    return out


def _last_top_level(tokens: list[Token], kinds: set[TokenType]) -> int:
    found = [i for i in _top_level(tokens) if tokens[i].token_type in kinds]
    assert found, f"no top-level {kinds} in the statement that has its parameters"
    return found[-1]


def _placeholders(
    tokens: list[Token], start: int, end: int, names: set[str], values: Mapping[str, str]
) -> list[tuple[int, int, str]]:
    """(begin, end, literal) for each ``:name`` of ``names`` in tokens[start:end]."""
    edits = []
    for i in range(start, min(end, len(tokens) - 1)):
        colon, name = tokens[i], tokens[i + 1]
        if colon.token_type == TokenType.COLON and name.text in names:
            edits.append((colon.start, name.end + 1, values[name.text]))
    return edits


def _literal(value: Any) -> str:
    """``value`` as PyMySQL writes a bound parameter (utf8mb4)."""
    return str(escape_item(value, "utf8mb4"))


__all__ = ["LateParams"]
