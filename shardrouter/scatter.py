"""The scatter rewrite: a SELECT as each shard runs it for a fan-out, and how the merge
combines the shards' rows (hidden ORDER/GROUP columns, AVG -> SUM + COUNT, LIMIT n+m, HAVING
moved after the merge)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sqlglot import exp

from .errors import UnsupportedQueryError
from .merge import Aggregate, Average, MergePlan, SortKey
from .refs import value_ref

_AGGREGATES: dict[type[exp.Expression], str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Min: "min",
    exp.Max: "max",
}


def scatter(tree: exp.Select) -> tuple[exp.Select, MergePlan]:
    """Rewrite a SELECT for fan-out and describe how to merge the shards' rows."""
    shard = tree.copy()
    select_items = list(shard.expressions)
    if any(
        isinstance(item, exp.Star)
        or (isinstance(item, exp.Column) and isinstance(item.this, exp.Star))
        for item in select_items
    ):
        if shard.args.get("group") or any(_aggregate_of(i) for i in select_items):
            raise UnsupportedQueryError("SELECT * with aggregates is not supported")
        if shard.args.get("order"):
            raise UnsupportedQueryError(
                "SELECT * with ORDER BY across shards: name the columns so the merge can"
                " find the sort keys"
            )
    for window in tree.find_all(exp.Window):
        raise UnsupportedQueryError(
            f"window function {window.sql(dialect='mysql')!r} across shards would number each"
            " shard's rows on its own; route by a key"
        )
    for node in tree.find_all(exp.AggFunc):
        name = type(node).__name__.upper()
        if not isinstance(node, (*_AGGREGATES, exp.Avg)):
            raise UnsupportedQueryError(
                f"aggregate {name} cannot be merged across shards (only COUNT, SUM, MIN, MAX and"
                " AVG can); route by a key"
            )
        if isinstance(node, exp.Sum | exp.Avg) and isinstance(node.this, exp.Distinct):
            raise UnsupportedQueryError(
                f"{name}(DISTINCT ...) across shards cannot be merged from partial sums;"
                " route by a key"
            )
    width = len(select_items)
    hidden: list[exp.Expression] = []

    def position_of(expr: exp.Expression) -> int:
        """Position of ``expr`` among select items (by alias, position or equality)."""
        if isinstance(expr, exp.Literal) and not expr.is_string:
            pos = int(expr.this) - 1
            if not 0 <= pos < width:
                raise UnsupportedQueryError(f"ORDER BY position {expr.this} is out of range")
            return pos
        if isinstance(expr, exp.Column) and not expr.table:
            # Aliases first, as MySQL resolves ORDER BY names: `a AS b, b AS a ORDER BY a`.
            for i, item in enumerate(select_items):
                if item.alias and item.alias.lower() == expr.name.lower():
                    return i
        for i, item in enumerate(select_items):
            if item.unalias() == expr or (
                isinstance(expr, exp.Column)
                and isinstance(item.unalias(), exp.Column)
                and item.unalias().name == expr.name
                and (not expr.table or item.unalias().table in ("", expr.table))
            ):
                return i
        for j, extra in enumerate(hidden):
            if extra == expr:
                return width + j
        hidden.append(expr.copy())
        return width + len(hidden) - 1

    aggregates: list[Aggregate] = []
    averages: list[Average] = []
    new_items: list[exp.Expression] = []
    for i, item in enumerate(select_items):
        inner = item.unalias()
        func = _aggregate_of(inner)
        if func is None:
            if any(isinstance(n, (*_AGGREGATES, exp.Avg)) for n in inner.find_all(exp.AggFunc)):
                raise UnsupportedQueryError(
                    f"expression over aggregates {item.sql(dialect='mysql')!r} cannot be merged"
                    " across shards; select the aggregates and compute it in the application"
                )
            new_items.append(item)
            continue
        if isinstance(inner, exp.Count) and (
            inner.args.get("distinct") or isinstance(inner.this, exp.Distinct)
        ):
            raise UnsupportedQueryError(
                "COUNT(DISTINCT ...) across shards cannot be merged from partial counts;"
                " select DISTINCT values and count them, or route by a key"
            )
        if func == "avg":
            arg = inner.this
            sum_expr = exp.Sum(this=arg.copy())
            count_expr = exp.Count(this=arg.copy())
            new_items.append(exp.alias_(sum_expr, item.alias) if item.alias else sum_expr)  # type: ignore[arg-type]
            hidden.append(count_expr)
            averages.append(Average(index=i, sum_index=i, count_index=width + len(hidden) - 1))
        else:
            new_items.append(item)
            aggregates.append(Aggregate(index=i, func=func))  # type: ignore[arg-type]
    group = shard.args.get("group")
    group_positions: tuple[int, ...] = ()
    if group is not None:
        group_positions = tuple(position_of(g) for g in group.expressions)
    having_fn: Callable[[tuple[Any, ...]], bool] | None = None
    having = shard.args.get("having")
    grouping = bool(
        group_positions
        or aggregates
        or averages
        or (having is not None and any(True for _ in having.find_all(exp.AggFunc)))
    )
    if having is not None and grouping:
        # Partial groups cannot be filtered: HAVING moves to the merge. Without grouping it
        # filters single rows like WHERE and stays on the shards (before their LIMIT).
        having_fn = _compile_having(having.this, position_of, aggregates, averages, hidden, width)
        shard.set("having", None)
    order = shard.args.get("order")
    sort_keys: list[SortKey] = []
    if order is not None:
        for ordered in order.expressions:
            sort_keys.append(
                SortKey(index=position_of(ordered.this), descending=bool(ordered.args.get("desc")))
            )
            if ordered.args.get("nulls_first") is not None and "NULLS" in ordered.sql().upper():
                raise UnsupportedQueryError("NULLS FIRST/LAST is not MySQL syntax")
    # Aggregates hidden by HAVING are partials too: they merge like the visible ones.
    for j, extra in enumerate(hidden):
        func = _aggregate_of(extra)
        pos = width + j
        if (
            func is not None
            and func != "avg"
            and not any(a.index == pos for a in aggregates)
            and not any(a.count_index == pos for a in averages)
        ):
            aggregates.append(Aggregate(index=pos, func=func))  # type: ignore[arg-type]
    shard.set("expressions", new_items + [h.copy() for h in hidden])
    limit = shard.args.get("limit")
    offset = shard.args.get("offset")
    limit_n = _int_of(limit.expression) if limit is not None else None
    offset_n = _int_of(offset.expression) if offset is not None else 0
    grouped = grouping or bool(aggregates)
    if grouped:
        # Partial groups must all reach the merge: no LIMIT, ORDER or HAVING on the shards.
        shard.set("limit", None)
        shard.set("offset", None)
        shard.set("order", None)
    else:
        shard.set("offset", None)
        if limit_n is not None:
            shard.set("limit", exp.Limit(expression=exp.Literal.number(limit_n + offset_n)))
    if shard.args.get("distinct") and hidden and not grouped:
        raise UnsupportedQueryError(
            "SELECT DISTINCT with ORDER BY on a column that is not selected cannot be merged;"
            " select the ORDER BY columns too"
        )
    plan = MergePlan(
        width=width,
        order_by=tuple(sort_keys),
        group_by=group_positions,
        aggregates=tuple(aggregates),
        averages=tuple(averages),
        having=having_fn,
        distinct=bool(tree.args.get("distinct")),
        limit=limit_n,
        offset=offset_n,
    )
    return shard, plan


def _aggregate_of(expr: exp.Expression) -> str | None:
    node: Any = expr.unalias()
    if isinstance(node, exp.Avg):
        return "avg"
    for cls, name in _AGGREGATES.items():
        if type(node) is cls:
            return name
    return None


_COMPARE: dict[type[exp.Expression], Callable[[Any, Any], bool]] = {
    exp.EQ: lambda a, b: a == b,
    exp.NEQ: lambda a, b: a != b,
    exp.GT: lambda a, b: a > b,
    exp.GTE: lambda a, b: a >= b,
    exp.LT: lambda a, b: a < b,
    exp.LTE: lambda a, b: a <= b,
}


def _compile_having(
    node: exp.Expression,
    position_of: Callable[[exp.Expression], int],
    aggregates: list[Aggregate],
    averages: list[Average],
    hidden: list[exp.Expression],
    width: int,
) -> Callable[[tuple[Any, ...]], bool]:
    """HAVING as a predicate over merged rows (SQL three-valued logic: NULL is not true)."""

    def operand(expr: exp.Expression) -> Callable[[tuple[Any, ...]], Any]:
        if isinstance(expr, exp.Paren):
            return operand(expr.this)
        ref = value_ref(expr)
        if ref is not None and ref.param is None:
            value = ref.literal
            return lambda row: value
        if isinstance(expr, exp.Literal):
            text = expr.this
            number = float(text)
            return lambda row: number
        if isinstance(expr, exp.Placeholder):
            raise UnsupportedQueryError(
                "parameters in HAVING are not supported across shards; write the value"
            )
        if isinstance(expr, exp.Avg):
            raise UnsupportedQueryError(
                "AVG in HAVING across shards: select the AVG and filter on its alias"
            )
        pos = position_of(expr)
        return lambda row: row[pos]

    def build(expr: exp.Expression) -> Callable[[tuple[Any, ...]], bool | None]:
        if isinstance(expr, exp.Paren):
            return build(expr.this)
        if isinstance(expr, exp.And):
            left, right = build(expr.this), build(expr.expression)
            return lambda row: _and(left(row), right(row))
        if isinstance(expr, exp.Or):
            left, right = build(expr.this), build(expr.expression)
            return lambda row: _or(left(row), right(row))
        if isinstance(expr, exp.Not):
            inner = build(expr.this)
            return lambda row: None if (v := inner(row)) is None else not v
        compare = _COMPARE.get(type(expr))
        if compare is None:
            raise UnsupportedQueryError(
                f"HAVING {expr.sql(dialect='mysql')!r} is not supported across shards"
                " (use comparisons of selected columns or aggregates with literals)"
            )
        left_v, right_v = operand(expr.this), operand(expr.expression)

        def check(row: tuple[Any, ...]) -> bool | None:
            a, b = left_v(row), right_v(row)
            if a is None or b is None:
                return None
            return compare(a, b)

        return check

    predicate = build(node)
    return lambda row: predicate(row) is True


def _and(a: bool | None, b: bool | None) -> bool | None:
    if a is False or b is False:
        return False
    if a is None or b is None:
        return None
    return True


def _or(a: bool | None, b: bool | None) -> bool | None:
    if a is True or b is True:
        return True
    if a is None or b is None:
        return None
    return False


def _int_of(node: exp.Expression | None) -> int:
    if isinstance(node, exp.Literal) and not node.is_string:
        try:
            return int(node.this)
        except ValueError:
            pass
    raise UnsupportedQueryError(
        "LIMIT/OFFSET must be integer literals for multi-shard queries (the merge needs them)"
    )


__all__ = ["scatter"]
