"""The scatter rewrite: a SELECT as each shard runs it for a fan-out, and how the merge
combines the shards' rows (hidden ORDER/GROUP columns and their collation weights, AVG -> SUM +
COUNT, LIMIT n+m, HAVING moved after the merge)."""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Callable, Iterator, Mapping
from decimal import ROUND_HALF_UP, Decimal, localcontext
from typing import Any, cast

from sqlglot import exp

from ..errors import ExecutionError, UnsupportedQueryError
from .merge import (
    MAX_LIMIT,
    MAX_SCALE,
    WEIGHT_CHARS,
    AggFunc,
    Aggregate,
    Average,
    Computed,
    Concat,
    MergePlan,
    Unrounded,
    Unsigned,
    inner_average,
    quotient,
    scale_of,
    shown,
)
from .merge import SortKey as SortKey
from .refs import value_ref

_AGGREGATES: dict[type[exp.Expression], str] = {
    exp.Count: "count",
    exp.Sum: "sum",
    exp.Min: "min",
    exp.Max: "max",
}

_WEIGHT = "shardrouter_weight"
"""Meta flag on the hidden weight columns, so a backend without WEIGHT_STRING can drop them."""
_PICK = "shardrouter_pick"
"""Meta flag on HAVING's ``IF(FALSE, x, 'literal')`` helpers (a literal in x's collation)."""

# Expressions whose value is never a string: they need no collation weight.
_NOT_STRINGS = (
    exp.Count,
    exp.Sum,
    exp.Avg,
    exp.Add,
    exp.Sub,
    exp.Mul,
    exp.Div,
    exp.Mod,
    exp.Neg,
    exp.Predicate,
    exp.Connector,
    exp.Not,
    exp.Boolean,
    exp.Null,
    exp.IntDiv,
    exp.BitwiseAnd,
    exp.BitwiseOr,
    exp.BitwiseXor,
    exp.BitwiseNot,
    exp.BitwiseLeftShift,
    exp.BitwiseRightShift,
    # numbers whatever their argument (a string argument is converted to a number)
    exp.Abs,
    exp.Sign,
    exp.Floor,
    exp.Ceil,
    exp.Round,
    exp.Pow,
    exp.Sqrt,
    exp.Ln,
    exp.Exp,
    exp.Length,
    exp.BitLength,
    exp.StrPosition,
    exp.Ascii,
    # date parts and differences are integers, DATE() a DATE (never a string)
    exp.Year,
    exp.Month,
    exp.Day,
    exp.DayOfMonth,
    exp.DayOfWeek,
    exp.DayOfYear,
    exp.Hour,
    exp.Minute,
    exp.Second,
    exp.Quarter,
    exp.Week,
    exp.DateDiff,
    exp.TimestampDiff,
    exp.Extract,
    exp.TsOrDsToDate,
)


def weight(expr: exp.Expression) -> exp.Expression:
    """The shard-side sort key of ``expr`` under its own collation, as a hidden column.

    ``WEIGHT_STRING(x AS CHAR(n))`` pads to ``n`` characters, which makes PAD SPACE collations'
    ``'a' = 'a  '`` hold for the weights too (without AS CHAR, MariaDB 10.11 weighs trailing
    spaces). Numbers, dates and binary strings have the collation ``binary``: their weight is
    NULL and the merge compares the value itself (WEIGHT_STRING(12) weighs the text '12', which
    orders 9 after 12). A string that padding would cut gets an empty weight; the merge refuses
    it rather than compare a prefix.
    """
    chars = exp.Literal.number(WEIGHT_CHARS)
    node = exp.If(
        this=exp.EQ(this=exp.Collation(this=expr.copy()), expression=exp.Literal.string("binary")),
        true=exp.Null(),
        false=exp.If(
            this=exp.GT(
                this=exp.Anonymous(
                    this="CHAR_LENGTH",
                    expressions=[exp.Trim(this=expr.copy(), position="TRAILING")],
                ),
                expression=chars,
            ),
            true=exp.HexString(this=""),
            false=exp.WeightString(
                this=expr.copy(),
                to=exp.DataType(
                    this=exp.DataType.Type.CHAR, expressions=[exp.DataTypeParam(this=chars.copy())]
                ),
            ),
        ),
    )
    node.meta[_WEIGHT] = True
    return node


def without_weights(tree: exp.Expression) -> exp.Expression:
    """``tree`` for a shard without WEIGHT_STRING (SQLite, whose strings compare as BINARY,
    i.e. by code point, as Python's do): every weight column becomes NULL, so the merge
    compares the values."""
    if any(True for _ in tree.find_all(exp.GroupConcat)):
        # SQLite spells it GROUP_CONCAT(x, sep), with no ORDER BY, DISTINCT with a separator
        # or group_concat_max_len: the demo backend answers it on one target only.
        raise UnsupportedQueryError(
            "GROUP_CONCAT across SQLite shards: SQLite has no GROUP_CONCAT(... ORDER BY ..."
            " SEPARATOR ...) to send; route by a key"
        )
    copy = tree.copy()
    for node in list(copy.find_all(exp.If)):
        if node.meta.get(_WEIGHT) and node.find(exp.Collate) is not None:
            # The merge compares the values as Python does (BINARY); a COLLATE NOCASE value
            # that the shards group or order by their own rule would merge otherwise.
            raise UnsupportedQueryError(
                "COLLATE on a value ordered, grouped or deduplicated across SQLite shards: the"
                " merge compares SQLite strings as BINARY; drop the COLLATE, or route by a key"
            )
        if node.meta.get(_WEIGHT):
            node.replace(exp.Null())
        elif node.meta.get(_PICK):
            node.replace(node.args["false"])  # the literal itself (SQLite has no IF)
    return copy


def scatter(
    tree: exp.Select,
    int_columns: Mapping[str, frozenset[str]] | None = None,
    key_columns: frozenset[str] = frozenset(),
    partitioned: Mapping[str, frozenset[str]] | None = None,
) -> tuple[exp.Select, MergePlan]:
    """Rewrite a SELECT for fan-out and describe how to merge the shards' rows.

    ``int_columns``: by table qualifier (``""`` for unqualified names when the statement reads
    one table), lower-case names of columns that hold integers (sharding keys whose strategy
    takes ints): they need no collation weight. ``key_columns``: names of the sharding
    columns of the statement's tables (columns that exist, for GROUP BY name resolution).
    ``partitioned``: as ``int_columns``, the integer keys whose each value lives on one target
    (functional strategies): COUNT/SUM/AVG(DISTINCT) of one merge from per-target partials.
    """
    integers = int_columns or {}
    by_key = partitioned or {}
    # Names known to be columns of the FROM tables (a GROUP BY name is a column before an
    # alias): the sharding keys, and names used as columns where no alias can be meant
    # (the select items' expressions, WHERE, ON).
    columns = {c.lower() for c in key_columns}
    for scope in [
        *(i.unalias() for i in tree.expressions),
        tree.args.get("where"),
        *(j.args.get("on") for j in tree.args.get("joins") or ()),
    ]:
        if isinstance(scope, exp.Expression):
            columns.update(c.name.lower() for c in scope.find_all(exp.Column))
    shard = tree.copy()
    select_items = list(shard.expressions)
    stars = [
        i
        for i, item in enumerate(select_items)
        if isinstance(item, exp.Star)
        or (isinstance(item, exp.Column) and isinstance(item.this, exp.Star))
    ]
    star_at = stars[0] if stars else None
    if star_at is not None:
        if shard.args.get("group") or any(
            _aggregate_of(i) or i.find(exp.AggFunc) for i in select_items
        ):
            raise UnsupportedQueryError(
                "SELECT * with aggregates or GROUP BY across shards is not supported; name the"
                " columns"
            )
        if shard.args.get("distinct"):
            raise UnsupportedQueryError(
                "SELECT DISTINCT * across shards: name the columns (the merge deduplicates each"
                " string column by its collation weight)"
            )
    for window in tree.find_all(exp.Window):
        raise UnsupportedQueryError(
            f"window function {window.sql(dialect='mysql')!r} across shards would number each"
            " shard's rows on its own; route by a key"
        )
    for node in tree.find_all(exp.AggFunc):
        name = type(node).__name__.upper()
        if isinstance(node, exp.GroupConcat):
            if _selected(node, tree):
                continue  # joined by the merge (MergePlan.concats)
            raise UnsupportedQueryError(
                f"{node.sql(dialect='mysql')} across shards is joined by the merge only as a"
                " select item of its own (not inside an expression, HAVING or ORDER BY);"
                " route by a key"
            )
        if not isinstance(node, (*_AGGREGATES, exp.Avg)):
            raise UnsupportedQueryError(
                f"aggregate {name} cannot be merged across shards (only COUNT, SUM, MIN, MAX and"
                " AVG can); route by a key"
            )
        if isinstance(node, exp.Sum | exp.Avg):
            inexact = _inexact_term(node.this)
            if inexact is not None:
                raise UnsupportedQueryError(
                    f"{name}({node.this.sql(dialect='mysql')}) across shards: {inexact}, so"
                    " partial sums rounded on each shard do not add up to what one database"
                    " computes. SUM the numerator (and COUNT) and divide after the query, or"
                    " route by a key"
                )
    # COUNT/SUM/AVG(DISTINCT x) of anything but a partitioned key: the shards group by x too.
    spread = _spread_arguments(tree, by_key)

    def mergeable(agg: exp.Expression | exp.AggFunc) -> bool:
        """Whether a DISTINCT aggregate merges: from distinct values, or per-target partials."""
        return spread is not None or _of_partitioned_key(agg, by_key)

    width = len(select_items)
    hidden: list[exp.Expression] = []
    # With a `*`, only the items before it have a position known before the shards answer;
    # other references get a hidden copy after everything (positions from the end).
    known = width if star_at is None else star_at

    def add_hidden(expr: exp.Expression) -> int:
        for j, extra in enumerate(hidden):
            if extra == expr:
                return width + j
        hidden.append(expr.copy())
        return width + len(hidden) - 1

    def position_of(expr: exp.Expression, *, grouping: bool = False) -> int:
        """Position of ``expr`` among select items (by alias, position or equality); a
        GROUP_CONCAT item is refused (the merge joins it: no shard has its value).

        ``grouping``: a GROUP BY name, which MySQL resolves to a column of the FROM tables
        before a select alias (ORDER BY and HAVING take the alias first)."""
        pos = _position_of(expr, grouping=grouping)
        if pos < width and isinstance(select_items[pos].unalias(), exp.GroupConcat):
            raise UnsupportedQueryError(
                f"{expr.sql(dialect='mysql')} names a GROUP_CONCAT across shards, in ORDER BY,"
                " GROUP BY or HAVING: the merge makes the list, no shard has it to compare;"
                " route by a key"
            )
        return pos

    def _position_of(expr: exp.Expression, *, grouping: bool = False) -> int:
        """position_of without the GROUP_CONCAT check."""
        while isinstance(expr, exp.Paren):
            expr = expr.this  # MySQL reads ORDER BY (2) as position 2, like ORDER BY 2
        if isinstance(expr, exp.Placeholder):
            # The driver writes the value into the text: ORDER BY :p with p = 2 reaches the
            # shards as ORDER BY 2, a position, and with p = 'x' as a constant.
            raise UnsupportedQueryError(
                f"ORDER BY/GROUP BY {expr.sql(dialect='mysql')} across shards: a parameter there"
                " becomes a position or a constant once bound, which the merge cannot know;"
                " write the column (or its position)"
            )
        if _negative_position(expr):
            # MySQL: error 1054 "Unknown column '-1'"; a shard would say so, the merge cannot.
            raise UnsupportedQueryError(
                f"ORDER BY/GROUP BY {expr.sql(dialect='mysql')} is not a column position"
                " (positions count from 1); name the column"
            )
        if is_position(expr):
            pos = int(expr.this) - 1
            if star_at is not None and pos >= known:
                raise UnsupportedQueryError(
                    f"ORDER BY/GROUP BY position {expr.this} points into a * across shards;"
                    " name the column"
                )
            if not 0 <= pos < width:
                raise UnsupportedQueryError(f"ORDER BY position {expr.this} is out of range")
            return pos
        if grouping and isinstance(expr, exp.Column) and not expr.table:
            for i, item in enumerate(select_items[:known]):
                inner = item.unalias()
                if isinstance(inner, exp.Column) and inner.name.lower() == expr.name.lower():
                    return i  # the column itself is selected (aliased or not)
            if expr.name.lower() in columns:
                # `merchant_id AS user_id ... GROUP BY user_id` groups by the column user_id,
                # which exists: a sharding key, or named as a column elsewhere in the statement.
                return add_hidden(expr)
            for item in select_items:
                if item.alias and item.alias.lower() == expr.name.lower():
                    # MySQL groups by a FROM table's column of that name before the alias;
                    # the router does not know the tables' columns, so it cannot tell which.
                    raise UnsupportedQueryError(
                        f"GROUP BY {expr.name} across shards: {expr.name} is the alias of"
                        f" {item.unalias().sql(dialect='mysql')!r}, and MySQL groups by a"
                        " table column of that name first if there is one; GROUP BY the"
                        " expression or its position"
                    )
        if isinstance(expr, exp.Column) and not expr.table:
            # Aliases first, as MySQL resolves ORDER BY names: `a AS b, b AS a ORDER BY a`.
            for i, item in enumerate(select_items):
                if item.alias and item.alias.lower() == expr.name.lower():
                    return i if i < known else add_hidden(item.unalias())
        for i, item in enumerate(select_items[:known]):
            if item.unalias() == expr or (
                isinstance(expr, exp.Column)
                and isinstance(item.unalias(), exp.Column)
                and item.unalias().name == expr.name
                and (not expr.table or item.unalias().table in ("", expr.table))
            ):
                return i
        return add_hidden(expr)

    aggregates: list[Aggregate] = []
    averages: list[Average] = []
    new_items: list[exp.Expression] = []
    pending: list[tuple[int, exp.Expression]] = []  # expressions over aggregates
    for i, item in enumerate(select_items):
        inner = item.unalias()
        func = _aggregate_of(inner)
        if func is None:
            if any(isinstance(n, (*_AGGREGATES, exp.Avg)) for n in inner.find_all(exp.AggFunc)):
                # Computed after the merge (_Computed): the shards send NULL under its label.
                new_items.append(
                    cast(exp.Expression, exp.alias_(exp.Null(), _label(item), quoted=True))
                )
                pending.append((i, cast(exp.Expression, inner)))
                continue
            new_items.append(item)
            continue
        if func == "avg":
            arg = inner.this
            sum_expr = exp.Sum(this=arg.copy())
            count_expr = exp.Count(this=arg.copy())
            # The SUM partial stands where the AVG was, under the AVG's label.
            new_items.append(cast(exp.Expression, exp.alias_(sum_expr, _label(item), quoted=True)))
            hidden.append(count_expr)
            averages.append(Average(index=i, sum_index=i, count_index=width + len(hidden) - 1))
        else:
            new_items.append(item)
            aggregates.append(Aggregate(index=i, func=func))  # type: ignore[arg-type]

    weights: dict[int, int] = {}
    computed_at = {i for i, _ in pending}

    def expression_at(pos: int) -> exp.Expression:
        return (
            cast(exp.Expression, new_items[pos].unalias()) if pos < width else hidden[pos - width]
        )

    def never_string(expr: exp.Expression) -> bool:
        while isinstance(expr, exp.Paren | exp.Min | exp.Max):
            expr = expr.this  # MIN/MAX have their argument's type
        return (
            isinstance(expr, _NOT_STRINGS)
            or (isinstance(expr, exp.Literal) and not expr.is_string)
            or (
                isinstance(expr, exp.Column)
                and expr.name.lower() in integers.get(expr.table.lower(), ())
            )
        )

    def weight_of(pos: int) -> int | None:
        """Position of the collation weight of the value at ``pos`` (added on first use), or
        None for an expression that is never a string."""
        if pos in weights:
            return weights[pos]
        if pos in computed_at:
            return None  # a value of the merge's own (no shard weighs it): numbers only
        expr = expression_at(pos)
        if (
            never_string(expr)
            or any(a.index == pos and a.func in ("count", "sum") for a in aggregates)
            or any(pos in (a.index, a.sum_index, a.count_index) for a in averages)
        ):
            return None
        hidden.append(weight(expr))
        weights[pos] = width + len(hidden) - 1
        return weights[pos]

    group = shard.args.get("group")
    group_positions: tuple[int, ...] = ()
    if group is not None:
        group_positions = tuple(position_of(g, grouping=True) for g in group.expressions)
    having_fn: Callable[[tuple[Any, ...]], bool] | None = None
    having = shard.args.get("having")
    # MySQL resolves a HAVING name to a GROUP BY column of that name before an alias.
    group_columns = {
        g.name.lower(): p
        for g, p in zip(
            group.expressions if group is not None else (), group_positions, strict=True
        )
        if isinstance(g, exp.Column)
    }
    if any(pos in computed_at for pos in group_positions):
        raise UnsupportedQueryError(  # MariaDB: 1056 Can't group on it
            "GROUP BY an expression over aggregates cannot group; group by columns"
        )
    # Both evaluators see the merged row the same way: positions, weights, hidden partials.
    context = (
        position_of,
        weight_of,
        add_hidden,
        expression_at,
        group_columns,
        width,
        mergeable,
        frozenset(computed_at),
        frozenset(a.index for a in averages),
    )
    computing = _Computed(*context)
    computing.aliases = frozenset(
        str(item.alias).lower() for item in select_items if isinstance(item, exp.Alias)
    )
    computed = tuple(Computed(i, computing.value(expr)) for i, expr in pending)
    evaluated = set(computing.reads)
    for pos in computing.partial_sums:
        aggregates.append(Aggregate(index=pos, func="sum"))
    if computed and shard.args.get("distinct"):
        # MariaDB 10.11 answers SELECT DISTINCT COUNT(*) % 2 ... GROUP BY m with only the
        # first group's value: no answer here would match the single database's.
        raise UnsupportedQueryError(
            "SELECT DISTINCT with an expression over aggregates across shards: MariaDB itself"
            " deduplicates such a column wrongly (it keeps one row), so no merged answer"
            " matches it; drop DISTINCT and deduplicate in the application, or route by a key"
        )
    grouping = bool(
        group_positions
        or any(isinstance(i.unalias(), exp.GroupConcat) for i in select_items)
        or aggregates
        or averages
        or computed
        or (having is not None and any(True for _ in having.find_all(exp.AggFunc)))
    )
    if having is not None and grouping:
        # Partial groups cannot be filtered: HAVING moves to the merge. Without grouping it
        # filters single rows like WHERE and stays on the shards (before their LIMIT).
        judge = _Having(*context)
        having_fn = judge.compile(having.this)
        evaluated |= judge.reads
        shard.set("having", None)
    order = shard.args.get("order")
    sort_keys: list[SortKey] = []
    if order is not None:
        for ordered in order.expressions:
            if is_constant(ordered.this):
                # ORDER BY 2.50 or 'x' orders by a constant: a no-op (only an unsigned integer
                # literal is a position).
                continue
            pos = position_of(ordered.this)
            if pos in computed_at and not _numeric_valued(dict(pending)[pos]):
                # A string (or a column's value) the merge made: no shard weighed it.
                raise UnsupportedQueryError(
                    f"ORDER BY {ordered.this.sql(dialect='mysql')} across shards: a value the"
                    " merge computes that may be a string sorts by bytes here and by the"
                    " collation in one database; order by an aggregate, or route by a key"
                )
            extra = hidden[pos - width] if pos >= width else None
            distinct = _distinct_aggregate(extra) if extra is not None else None
            if distinct is not None and not mergeable(distinct):
                # A value counted (or summed) on two shards would count twice.
                raise UnsupportedQueryError(
                    f"ORDER BY {distinct.sql(dialect='mysql')!r} across shards: an aggregate with"
                    " DISTINCT cannot be merged from partial values; route by a key"
                )
            if extra is not None and (
                _aggregate_of(extra) == "avg"
                or (_aggregate_of(extra) is None and next(extra.find_all(exp.AggFunc), None))
            ):
                # Only plain COUNT/SUM/MIN/MAX partials merge; an unselected AVG or expression
                # over aggregates would be one shard's value (found by tools/fuzz:
                # GROUP BY m.user_id ORDER BY AVG(m.merchant_id)).
                raise UnsupportedQueryError(
                    f"ORDER BY {extra.sql(dialect='mysql')!r} across shards: an AVG or an"
                    " expression over aggregates that is not selected cannot be merged; select"
                    " it with an alias and order by the alias"
                )
            sort_keys.append(SortKey(index=pos, descending=bool(ordered.args.get("desc"))))
            if ordered.args.get("nulls_first") is not None and "NULLS" in ordered.sql().upper():
                raise UnsupportedQueryError("NULLS FIRST/LAST is not MySQL syntax")
    sort_hidden = len(hidden)  # the helpers before any weight column
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
    # Every value the merge compares gets its weight: sort keys, group keys, MIN/MAX partials
    # and, for DISTINCT, every visible column.
    compared = [k.index for k in sort_keys] + list(group_positions)
    compared += [a.index for a in aggregates if a.func in ("min", "max")]
    if shard.args.get("distinct"):
        compared += range(width)
    spread_at: tuple[int, ...] = ()
    if spread is not None:
        # Hidden copies (a select item of that name may be an alias of something else).
        spread_at = tuple(add_hidden(x) for x in spread)
        compared += spread_at
    concats: list[Concat] = []
    concat_keys: list[exp.Expression] = []
    for i, item in enumerate(select_items):
        gc = item.unalias()
        if not isinstance(gc, exp.GroupConcat):
            continue
        if spread is not None or shard.args.get("distinct"):
            raise UnsupportedQueryError(
                "GROUP_CONCAT across shards with SELECT DISTINCT, or beside COUNT/SUM/AVG"
                " (DISTINCT ...) of a column that is not a sharding key, cannot be merged; run"
                " them as separate queries, or route by a key"
            )
        argument, order, deduplicated, separator = _concat_parts(gc)
        keys = [argument] if deduplicated else [o.this for o in order]
        concat_keys += [k for k in keys if k not in concat_keys]
        order_by = tuple(SortKey(add_hidden(o.this), bool(o.args.get("desc"))) for o in order)
        at = (add_hidden(argument),) if deduplicated else ()
        compared += [k.index for k in order_by] + list(at)
        concats.append(
            Concat(
                index=i,
                length=add_hidden(exp.Anonymous(this="LENGTH", expressions=[gc.copy()])),
                max_len=add_hidden(
                    exp.SessionParameter(this=exp.to_identifier("group_concat_max_len"))
                ),
                order_by=order_by,
                distinct=at,
                separator=separator,
            )
        )
    if concat_keys:
        for node in _own_aggregates(tree):
            if _distinct_arguments(node) is not None:
                # Per-target DISTINCT partials add up only over the statement's own groups.
                raise UnsupportedQueryError(
                    f"GROUP_CONCAT with ORDER BY or DISTINCT beside {node.sql(dialect='mysql')!r}"
                    " across shards cannot be merged; run them as separate queries, or route by"
                    " a key"
                )
    regroup = list(spread or concat_keys)  # (never both: refused above)
    if regroup:
        # The shards group finer: by the DISTINCT arguments, or the GROUP_CONCAT keys.
        keys = list(group.expressions) if group is not None else []
        shard.set("group", exp.Group(expressions=[*keys, *(k.copy() for k in regroup)]))
    for pos in compared:
        weight_of(pos)
    limit = shard.args.get("limit")
    offset = shard.args.get("offset")
    limit_n = _int_of(limit.expression) if limit is not None else None
    offset_n = _int_of(offset.expression) if offset is not None else 0
    grouped = grouping or bool(aggregates)
    if shard.args.get("distinct") and sort_hidden and not grouped:
        raise UnsupportedQueryError(
            "SELECT DISTINCT with ORDER BY on a column that is not selected cannot be merged;"
            " select the ORDER BY columns too"
        )

    def final(pos: int) -> int:
        # With a `*` the visible width is the shards' business: helpers count from the end.
        return pos - width - len(hidden) if star_at is not None and pos >= width else pos

    # Hidden columns are named, so a UNION of split tables can order by them (union_order).
    shard.set(
        "expressions",
        new_items + [exp.alias_(h.copy(), hidden_name(j)) for j, h in enumerate(hidden)],
    )
    plan = MergePlan(
        width=None if star_at is not None else width,
        order_by=tuple(SortKey(final(k.index), k.descending) for k in sort_keys),
        group_by=group_positions,
        aggregates=tuple(aggregates),
        averages=tuple(averages),
        computed=computed,
        having=having_fn,
        evaluated=tuple(final(p) for p in sorted(evaluated)),
        distinct=bool(tree.args.get("distinct")),
        limit=limit_n,
        offset=offset_n,
        weights=tuple((final(v), final(w)) for v, w in weights.items()),
        hidden=len(hidden),
        first=_first_merge(
            spread_at,
            group_positions,
            aggregates,
            averages,
            expression_at,
            width + len(hidden),
            tuple(weights.items()),
        )
        if spread is not None
        else None,
        numbers=_summed_distinct(spread_at, spread, tree),
        exact=spread_at + tuple(k for c in concats for k in (*c.distinct, *_indexes(c))),
        expanded=bool(regroup),
        concats=tuple(concats),
    )
    if grouped:
        # Partial groups must all reach the merge: no LIMIT, ORDER or HAVING on the shards.
        shard.set("limit", None)
        shard.set("offset", None)
        shard.set("order", None)
    else:
        shard.set("offset", None)
        if plan.shard_limit is not None:
            shard.set("limit", exp.Limit(expression=exp.Literal.number(plan.shard_limit)))
    return shard, plan


def _of_partitioned_key(
    agg: exp.Expression | exp.AggFunc, partitioned: Mapping[str, frozenset[str]]
) -> bool:
    """Whether ``agg`` is COUNT/SUM/AVG(DISTINCT k) of one column k whose values each live
    on one target (an integer functional sharding key): per-target partials then add up."""
    arg = agg.this
    if not isinstance(arg, exp.Distinct) or len(arg.expressions) != 1:
        return False
    column = arg.expressions[0]
    if not isinstance(column, exp.Column):
        return False
    return column.name.lower() in partitioned.get(column.table.lower(), frozenset())


def _indexes(concat: Concat) -> tuple[int, ...]:
    return tuple(k.index for k in concat.order_by)


def _selected(node: exp.Expression, tree: exp.Select) -> bool:
    """Whether ``node`` is a select item of ``tree`` itself (aliased or not), not inside one."""
    parent = node.parent.parent if isinstance(node.parent, exp.Alias) else node.parent
    item = node.parent if isinstance(node.parent, exp.Alias) else node
    return parent is tree and item.arg_key == "expressions"


def _concat_parts(
    gc: exp.GroupConcat,
) -> tuple[exp.Expression, list[exp.Ordered], bool, str]:
    """GROUP_CONCAT's argument, ORDER BY terms, DISTINCT and separator, or a refusal naming
    what the merge cannot join."""
    text = gc.sql(dialect="mysql")
    this = gc.this
    order: list[exp.Ordered] = []
    if isinstance(this, exp.Order):
        order = list(this.expressions)
        this = this.this
    distinct = isinstance(this, exp.Distinct)
    if distinct:
        if len(this.expressions) != 1 or isinstance(this.expressions[0], exp.Concat):
            raise UnsupportedQueryError(
                f"{text} across shards: GROUP_CONCAT(DISTINCT ...) of several arguments (or of"
                " a CONCAT) is not merged; concatenate one argument, or route by a key"
            )
        this = this.expressions[0]
    for term in order:
        key = term.this
        if (
            next(key.find_all(exp.Placeholder, exp.Subquery, exp.AggFunc), None) is not None
            or not any(True for _ in key.find_all(exp.Column))
            or (distinct and key != this)
        ):
            raise UnsupportedQueryError(
                f"{text} across shards: its ORDER BY must name columns (or expressions over"
                " them) without parameters, and with DISTINCT only its argument; route by a key"
            )
    if distinct and (
        next(this.find_all(exp.Placeholder, exp.Subquery), None) is not None
        or not any(True for _ in this.find_all(exp.Column))
    ):
        raise UnsupportedQueryError(
            f"{text} across shards: GROUP_CONCAT(DISTINCT ...) needs a column argument"
            " (no parameters or subqueries); route by a key"
        )
    separator = gc.args.get("separator")
    if separator is None:
        return this, order, distinct, ","
    if (
        not (isinstance(separator, exp.Literal) and separator.is_string)
        or not str(separator.this).isascii()
    ):
        raise UnsupportedQueryError(
            f"{text} across shards: the SEPARATOR must be an ASCII string literal (its length"
            " in bytes is then its length in characters); route by a key"
        )
    return this, order, distinct, str(separator.this)


def _own_aggregates(tree: exp.Select) -> Iterator[exp.AggFunc]:
    """The aggregates of ``tree`` itself: not those of its subqueries (a COUNT(DISTINCT x)
    in a WHERE subquery belongs to that subquery)."""
    for node in tree.find_all(exp.AggFunc):
        scope = node.parent
        while scope is not None and scope is not tree and not isinstance(scope, exp.Query):
            scope = scope.parent
        if scope is tree:
            yield node


def _distinct_arguments(agg: exp.Expression | exp.AggFunc) -> tuple[exp.Expression, ...] | None:
    """The argument list of COUNT/SUM/AVG(DISTINCT ...), or None for another aggregate."""
    arg = agg.this if isinstance(agg, exp.Count | exp.Sum | exp.Avg) else None
    if not isinstance(arg, exp.Distinct):
        return None
    return tuple(arg.expressions)


def _spread_arguments(
    tree: exp.Select, partitioned: Mapping[str, frozenset[str]]
) -> tuple[exp.Expression, ...] | None:
    """The arguments of the statement's DISTINCT aggregates when they must be merged from
    distinct values (some argument is not a partitioned key), or None.

    The shards then group by the statement's groups and these arguments, so every DISTINCT
    aggregate must have the same ones: COUNT(DISTINCT a) per (group, b) rows would count an
    ``a`` once per ``b``.
    """
    found: list[tuple[exp.AggFunc, tuple[exp.Expression, ...]]] = []
    for node in _own_aggregates(tree):
        if isinstance(node, exp.Count) and node.args.get("distinct"):
            raise UnsupportedQueryError(  # (sqlglot's other spelling; never seen from MySQL)
                f"{node.sql(dialect='mysql')!r} across shards: write COUNT(DISTINCT x)"
            )
        args = _distinct_arguments(node)
        if args is not None:
            found.append((node, args))
    if all(_of_partitioned_key(node, partitioned) for node, _ in found):
        return None
    first, args = found[0]
    for node, other in found[1:]:
        if other != args:
            raise UnsupportedQueryError(
                f"{first.sql(dialect='mysql')!r} and {node.sql(dialect='mysql')!r} across"
                " shards: the merge fetches each group's distinct values of one argument list,"
                " and these differ; run one query per argument list, or route by a key"
            )
    for x in args:
        bad = next(x.find_all(exp.Placeholder, exp.Subquery, exp.Select, exp.AggFunc), None)
        if bad is not None or not any(True for _ in x.find_all(exp.Column)):
            # The shards GROUP BY the argument: a bound constant there would group by it (or,
            # an integer, by that position), a subquery or aggregate cannot be grouped.
            raise UnsupportedQueryError(
                f"{first.sql(dialect='mysql')!r} across shards: the argument"
                f" {x.sql(dialect='mysql')!r} must be a column or an expression over columns"
                " (no parameters, subqueries or aggregates); route by a key"
            )
    return args


def _first_merge(
    spread_at: tuple[int, ...],
    group_positions: tuple[int, ...],
    aggregates: list[Aggregate],
    averages: list[Average],
    expression_at: Callable[[int], exp.Expression],
    columns: int,
    weights: tuple[tuple[int, int], ...],
) -> MergePlan:
    """The merge of the shards' rows into one row per (group, DISTINCT arguments): every
    partial combines as it will per group, except the DISTINCT ones, which are the same on
    every shard that holds the value (0/1 counts, the value as its sum) and take ``max``."""
    funcs: dict[int, AggFunc] = {a.index: a.func for a in aggregates}
    for avg in averages:
        funcs[avg.sum_index] = "sum"
        funcs[avg.count_index] = "count"
    for pos, func in funcs.items():
        if func in ("count", "sum") and _distinct_arguments(expression_at(pos)) is not None:
            funcs[pos] = "max"
    return MergePlan(
        width=columns,
        group_by=group_positions + spread_at,
        aggregates=tuple(Aggregate(pos, func) for pos, func in funcs.items()),
        weights=weights,
    )


def _summed_distinct(
    spread_at: tuple[int, ...], spread: tuple[exp.Expression, ...] | None, tree: exp.Select
) -> tuple[int, ...]:
    """Positions of the fetched DISTINCT arguments that SUM/AVG(DISTINCT) add up (see
    MergePlan.numbers), when the statement has such an aggregate."""
    if spread is None:
        return ()
    if any(
        isinstance(node, exp.Sum | exp.Avg) and _distinct_arguments(node) is not None
        for node in _own_aggregates(tree)
    ):
        return spread_at
    return ()


_MERGED = "HAVING or a select item over aggregates"
"""Who evaluates after the merge (both share the evaluator): its refusals name both."""


def _label(item: exp.Expression) -> exp.Identifier | str:
    """The label a single database gives a select item, for a stand-in in its place: its
    alias, identifier kept (quoting included: `my avg`), or the item's text."""
    alias = item.args.get("alias") if isinstance(item, exp.Alias) else None
    if isinstance(alias, exp.Identifier):
        return alias.copy()
    return mysql_label(cast(exp.Expression, item.unalias()).sql(dialect="mysql"))


_SUPPLEMENTARY = re.compile("[\U00010000-\U0010ffff]")


def mysql_label(text: str) -> str:
    """``text`` as MariaDB labels an unaliased item: its identifiers hold no character beyond
    the Basic Multilingual Plane (an alias with one is refused, error 1300), and it writes
    each such character of an item's text as ``?`` (``CONCAT(s, '😀')`` is labelled
    ``CONCAT(s, '?')``)."""
    return _SUPPLEMENTARY.sub("?", text)


def is_position(expr: exp.Expression) -> bool:
    """Whether ``expr`` in ORDER BY/GROUP BY is a column position: MySQL reads only an unsigned
    integer literal so (``2``, ``02``, ``(2)``); ``2.0``, ``2e0``, ``0x2`` or ``'2'`` are
    constants."""
    while isinstance(expr, exp.Paren):
        expr = expr.this
    return isinstance(expr, exp.Literal) and not expr.is_string and expr.this.isdigit()


def is_constant(expr: exp.Expression) -> bool:
    """Whether ``expr`` is a literal that is not a position: ordering by it changes nothing."""
    while isinstance(expr, exp.Paren):
        expr = expr.this
    if is_position(expr) or _negative_position(expr):
        return False
    return isinstance(expr, exp.Literal | exp.HexString | exp.BitString | exp.Null | exp.Boolean)


def _negative_position(expr: exp.Expression) -> bool:
    return isinstance(expr, exp.Neg) and is_position(expr.this)


# Functions whose value is a DOUBLE: a sum of doubles depends on the order of the additions.
_DOUBLES = (exp.Sqrt, exp.Ln, exp.Exp, exp.Pow, exp.Log)


def _inexact_term(expr: exp.Expression) -> str | None:
    """Why a SUM/AVG argument cannot be summed from per-shard partials exactly, or None.

    Integer, DECIMAL and `*`/`+`/`-`/`DIV` arithmetic sum exactly in any grouping (DECIMAL
    scales add up, SUM(a * 1.5) is exact). A `/` is a DECIMAL kept at full precision inside the
    aggregate and rounded once (div_precision_increment) at the end, while each shard rounds its
    partial; a DOUBLE (1e0, SQRT, CAST AS DOUBLE) sums in an order-dependent way.
    """
    for node in expr.find_all(exp.Div, exp.Literal, exp.Cast, *_DOUBLES):
        if isinstance(node, exp.Div):
            return f"the division {node.sql(dialect='mysql')} is a DECIMAL of more digits"
        if isinstance(node, exp.Literal):
            if not node.is_string and "e" in node.this.lower():
                return f"{node.this} is a DOUBLE"
            continue
        if isinstance(node, exp.Cast):
            if node.to.this in (exp.DataType.Type.DOUBLE, exp.DataType.Type.FLOAT):
                return f"{node.sql(dialect='mysql')} is a DOUBLE"
            continue
        return f"{node.sql(dialect='mysql')} is a DOUBLE"
    return None


def hidden_name(j: int) -> str:
    """The label of the ``j``-th hidden column of a scatter statement."""
    return f"shardrouter_h{j}"


def union_order_by(plan: MergePlan) -> str:
    """The ORDER BY of a UNION of scatter statements: positions for the leading columns, names
    for the hidden ones (with a ``*`` their positions are known only from the result)."""
    if not plan.order_by:
        return ""
    terms = []
    for key in plan.order_by:
        if plan.width is None and key.index < 0:
            column = hidden_name(plan.hidden + key.index)
        elif plan.width is not None and key.index >= plan.width:
            column = hidden_name(key.index - plan.width)
        else:
            column = str(key.index + 1)
        terms.append(column + (" DESC" if key.descending else ""))
    return " ORDER BY " + ", ".join(terms)


def _aggregate_of(expr: exp.Expression) -> str | None:
    node: Any = expr.unalias()
    if isinstance(node, exp.Avg):
        return "avg"
    for cls, name in _AGGREGATES.items():
        if type(node) is cls:
            return name
    return None


def _distinct_aggregate(expr: exp.Expression) -> exp.AggFunc | None:
    """The first aggregate with DISTINCT in ``expr`` (COUNT(DISTINCT x), SUM(DISTINCT x)), or
    None."""
    for node in expr.find_all(exp.AggFunc):
        if node.args.get("distinct") or isinstance(node.this, exp.Distinct):
            return node
    return None


# -- HAVING after the merge ------------------------------------------------------------------

_Operand = Callable[[tuple[Any, ...]], tuple[Any, Any]]
"""A HAVING operand: its value in a merged row and, for a string, its collation weight."""

_COMPARE: dict[type[exp.Expression], Callable[[int], bool]] = {
    exp.EQ: lambda c: c == 0,
    exp.NEQ: lambda c: c != 0,
    exp.GT: lambda c: c > 0,
    exp.GTE: lambda c: c >= 0,
    exp.LT: lambda c: c < 0,
    exp.LTE: lambda c: c <= 0,
}

_ARITHMETIC = (exp.Add, exp.Sub, exp.Mul, exp.Div)


class _Having:
    """Compiles a HAVING condition into a predicate over merged rows, with MySQL's rules:
    three-valued logic (NULL is not true), a string compared with a number as a number, with a
    date or datetime as one, with a string under the collation (both weights from the shards),
    and ``/`` giving a DECIMAL with 4 more digits of scale."""

    clause = "HAVING"
    """Which clause the errors name."""

    def __init__(
        self,
        position_of: Callable[[exp.Expression], int],
        weight_of: Callable[[int], int | None],
        add_hidden: Callable[[exp.Expression], int],
        expression_at: Callable[[int], exp.Expression],
        group_columns: dict[str, int],
        width: int,
        mergeable: Callable[[exp.Expression | exp.AggFunc], bool] = lambda agg: False,
        computed_at: frozenset[int] = frozenset(),
        averaged_at: frozenset[int] = frozenset(),
    ) -> None:
        self.mergeable = mergeable
        """Whether a DISTINCT aggregate merges (see scatter)."""
        self.computed_at = computed_at
        """Positions of select items the merge computes (expressions over aggregates)."""
        self.averaged_at = averaged_at
        """Positions of AVG items: their merged value is rounded to its scale, while MariaDB
        does arithmetic on the unrounded quotient."""
        self._arithmetic = 0
        """How deep inside arithmetic the operand being compiled is."""
        self.reads: set[int] = set()
        """The row positions the compiled expressions read (MergePlan.evaluated)."""
        self.width = width
        self.position_of = position_of
        self.weight_of = weight_of
        self.add_hidden = add_hidden
        self.expression_at = expression_at
        self.group_columns = group_columns

    def compile(self, node: exp.Expression) -> Callable[[tuple[Any, ...]], bool]:
        predicate = self.build(node)
        return lambda row: predicate(row) is True

    def build(
        self, expr: exp.Expression, *, rounded: bool = True
    ) -> Callable[[tuple[Any, ...]], bool | None]:
        """``rounded``: a comparison sees a quotient at its scale (MariaDB's ``=``, ``<`` ...);
        IN and BETWEEN see it unrounded."""
        if isinstance(expr, exp.Paren):
            return self.build(expr.this, rounded=rounded)
        if isinstance(expr, exp.And):
            left, right = self.build(expr.this), self.build(expr.expression)
            return lambda row: _and(left(row), right(row))
        if isinstance(expr, exp.Or):
            left, right = self.build(expr.this), self.build(expr.expression)
            return lambda row: _or(left(row), right(row))
        if isinstance(expr, exp.Not):
            inner = self.build(expr.this)
            return lambda row: None if (v := inner(row)) is None else not v
        if isinstance(expr, exp.Is) and isinstance(expr.expression, exp.Null):
            value = self.operand(expr.this, expr.this)
            return lambda row: value(row)[0] is None  # never NULL itself
        if isinstance(expr, exp.Between):
            # x >= a AND x <= b, with one comparison type for all three (MariaDB: with a
            # number among strings all compare as numbers, '10' BETWEEN 9 AND '2' is false).
            value = _no_merged_string(expr, expr.this, self.operand(expr.this, expr.args["low"]))
            low = _no_merged_string(
                expr, expr.args["low"], self.operand(expr.args["low"], expr.this)
            )
            high = _no_merged_string(
                expr, expr.args["high"], self.operand(expr.args["high"], expr.this)
            )

            def between(row: tuple[Any, ...]) -> bool | None:
                x, a, b = value(row), low(row), high(row)
                present = [v for v, _ in (x, a, b) if v is not None]
                if any(isinstance(v, str) for v in present) and any(_is_number(v) for v in present):
                    x, a, b = ((None if v is None else _numeric(v), None) for v, _ in (x, a, b))
                above = (
                    None if x[0] is None or a[0] is None else compare(*x, *a, rounded=False) >= 0
                )
                below = (
                    None if x[0] is None or b[0] is None else compare(*x, *b, rounded=False) <= 0
                )
                return _and(above, below)

            return between
        if isinstance(expr, exp.In) and expr.expressions and not expr.args.get("query"):
            # x IN (a, b): true if x = one of them, else NULL if x or one of them is NULL.
            tests = [
                self.build(exp.EQ(this=expr.this, expression=e), rounded=False)
                for e in expr.expressions
            ]

            def any_equal(row: tuple[Any, ...]) -> bool | None:
                found: bool | None = False
                for test_one in tests:
                    found = _or(found, test_one(row))
                    if found is True:
                        return True
                return found

            return any_equal
        test = _COMPARE.get(type(expr))
        if test is None:
            raise UnsupportedQueryError(
                f"{self.clause} {expr.sql(dialect='mysql')!r} is not supported across shards"
                " (use comparisons, IN, BETWEEN and IS NULL of selected columns, aggregates,"
                " arithmetic and literals)"
            )
        left_node, right_node = expr.this, expr.expression
        left_value = _no_merged_string(expr, left_node, self.operand(left_node, right_node))
        right_value = _no_merged_string(expr, right_node, self.operand(right_node, left_node))

        def check(row: tuple[Any, ...]) -> bool | None:
            (a, wa), (b, wb) = left_value(row), right_value(row)
            if a is None or b is None:
                return None
            return test(compare(a, wa, b, wb, rounded=rounded))

        return check

    def operand(self, expr: exp.Expression, other: exp.Expression) -> _Operand:
        """``expr``'s value (and weight); ``other`` is what it is compared with, whose collation
        a string literal takes."""
        if isinstance(expr, exp.Paren):
            return self.operand(expr.this, other)
        if isinstance(expr, exp.Placeholder):
            raise UnsupportedQueryError(
                f"parameters in {self.clause} are not supported across shards; write the value"
            )
        if isinstance(expr, exp.Literal) and expr.is_string:
            return self.string_literal(expr, other)
        ref = value_ref(expr)
        if ref is not None and ref.param is None:
            value = ref.literal
            if type(value) is int and not _SIGNED_MIN <= value <= _UNSIGNED_MAX:
                value = Decimal(value)  # a literal beyond BIGINT is a DECIMAL in MySQL
            return lambda row: (value, None)
        if isinstance(expr, exp.Literal):
            number = _number(expr.this)
            return lambda row: (number, None)
        if isinstance(expr, exp.Null):
            return lambda row: (None, None)
        if isinstance(expr, exp.Neg):
            inner = self.operand(expr.this, other)
            # MySQL folds the minus of a constant: beyond BIGINT it is a DECIMAL there
            # (-(-9223372036854775807 - 1)), while a column's is error 1690.
            constant = next(expr.this.find_all(exp.Column, exp.AggFunc), None) is None
            return lambda row: (_negate(inner(row)[0], constant=constant), None)
        if isinstance(expr, _ARITHMETIC):
            self._arithmetic += 1
            try:
                a, b = self.operand(expr.this, other), self.operand(expr.expression, other)
            finally:
                self._arithmetic -= 1
            apply = _ARITHMETIC_OPS[type(expr)]
            return lambda row: (apply(a(row)[0], b(row)[0]), None)
        if isinstance(expr, exp.Avg):
            raise UnsupportedQueryError(
                "AVG in HAVING across shards: select the AVG and filter on its alias"
            )
        distinct = _distinct_aggregate(expr)
        if distinct is not None and not self.mergeable(distinct):
            # Partial COUNT(DISTINCT)/SUM(DISTINCT) values add up a value seen on two shards
            # twice.
            raise UnsupportedQueryError(
                f"{self.clause} {distinct.sql(dialect='mysql')!r} across shards: an aggregate with"
                " DISTINCT cannot be merged from partial values; route by a key"
            )
        function = self.function(expr, other)
        if function is not None:
            return function
        if (
            isinstance(expr, exp.Column)
            and not expr.table
            and expr.name.lower() in (self.group_columns)
        ):
            pos = self.group_columns[expr.name.lower()]
        elif isinstance(expr, exp.Column) or _aggregate_of(expr) is not None:
            pos = self.position_of(expr)
        else:
            # Anything else would be computed by the shards, which do not know the select
            # aliases and see only partial aggregates: only a selected expression is read.
            pos = self.position_of(expr)
            if pos >= self.width and any(True for _ in expr.find_all(exp.AggFunc)):
                # A function of an aggregate computed per shard would see only partials.
                raise UnsupportedQueryError(
                    f"{self.clause} operand {expr.sql(dialect='mysql')!r} applies a function to an"
                    " aggregate across shards; select the aggregate and filter in the"
                    " application"
                )
            if pos >= self.width:
                raise UnsupportedQueryError(
                    f"{self.clause} operand {expr.sql(dialect='mysql')!r} is not supported across"
                    " shards (HAVING evaluates comparisons, AND/OR/NOT, arithmetic, NULLIF,"
                    " IFNULL/COALESCE, IF and ABS over selected columns, aggregates and"
                    " literals); select it and filter on its alias"
                )
        if pos in self.computed_at:
            raise UnsupportedQueryError(
                f"{self.clause} reads {expr.sql(dialect='mysql')!r}, an expression over"
                " aggregates the merge computes, across shards; write the expression itself"
                " there (HAVING SUM(a) / 100 > 5), not its alias"
            )
        if pos in self.averaged_at and self._arithmetic:
            raise UnsupportedQueryError(
                f"{self.clause} does arithmetic on {expr.sql(dialect='mysql')!r}, an AVG the merge"
                " rounds, across shards, where one database uses its unrounded value; write"
                " AVG(...) itself in the expression"
            )
        self.reads.add(pos)
        weight_pos = self.weight_of(pos)
        if weight_pos is None:
            return lambda row: (row[pos], None)
        return lambda row: (row[pos], row[weight_pos])

    def function(self, expr: exp.Expression, other: exp.Expression) -> _Operand | None:
        """The functions HAVING evaluates after the merge, with MySQL's semantics, or None."""
        if isinstance(expr, exp.Nullif):
            if self.clause == "HAVING" and any(True for _ in expr.find_all(exp.AggFunc)):
                # MariaDB 10.11 answers `HAVING NULLIF(COUNT(*), 1) > 1` with no group at
                # all (NULLIF over an aggregate in HAVING), which the merge does not mimic.
                raise UnsupportedQueryError(
                    f"{self.clause} {expr.sql(dialect='mysql')} across shards: NULLIF over an"
                    " aggregate; select the aggregate and use NULLIF on its alias"
                )
            a, b = self.operand(expr.this, other), self.operand(expr.expression, expr.this)

            def nullif(row: tuple[Any, ...]) -> tuple[Any, Any]:
                (x, wx), (y, wy) = a(row), b(row)
                if x is None or y is None or compare(x, wx, y, wy) != 0:
                    return x, wx
                return None, None

            return nullif
        if isinstance(expr, exp.Coalesce):
            args = [self.operand(e, other) for e in [expr.this, *expr.expressions]]
            return lambda row: _first_of([arg(row) for arg in args])
        if isinstance(expr, exp.If):
            test: exp.Expression = expr.this
            condition: Callable[[tuple[Any, ...]], bool | None]
            if isinstance(test, _PREDICATES):
                condition = self.build(test)
            else:
                value = self.operand(test, other)

                def condition(row: tuple[Any, ...]) -> bool | None:
                    return _truth(value(row)[0])

            true = self.operand(expr.args["true"], other)
            false = (
                self.operand(expr.args["false"], other)
                if expr.args.get("false") is not None
                else (lambda row: (None, None))
            )

            def pick(row: tuple[Any, ...]) -> tuple[Any, Any]:
                # Both branches decide the result's type in MySQL: a mix is not evaluated.
                _first_of([true(row), false(row)], check_only=True)
                return true(row) if condition(row) is True else false(row)

            return pick
        if isinstance(expr, exp.Abs):
            inner = self.operand(expr.this, other)
            return lambda row: (_absolute(inner(row)[0]), None)
        return None

    def string_literal(self, expr: exp.Literal, other: exp.Expression) -> _Operand:
        text = _Constant(expr.this)
        target: exp.Expression = cast(exp.Expression, other.unalias())
        while isinstance(target, exp.Paren):
            target = target.this
        func = _aggregate_of(target)
        if (
            isinstance(target, (exp.Literal, exp.Placeholder, exp.Null, exp.Neg, *_ARITHMETIC))
            or func == "avg"
            or (func is None and any(True for _ in target.find_all(exp.AggFunc)))
        ):
            # Not a string the shards can weigh (the other operand refuses what cannot merge).
            return lambda row: (text, None)
        # The literal's weight under the collation of what it is compared with: IF(FALSE, x,
        # 'lit') takes x's collation (a column's beats a literal's), and its value is 'lit'.
        # Aliases resolve to their expression: the shards do not see select aliases there.
        shard_side = self.expression_at(self.position_of(target))
        pick = cast(
            exp.Expression, exp.If(this=exp.false(), true=shard_side.copy(), false=expr.copy())
        )
        pick.meta[_PICK] = True
        pos = self.add_hidden(pick)
        weight_pos = self.weight_of(pos)
        if weight_pos is None:
            return lambda row: (text, None)
        return lambda row: (text, row[weight_pos])


_PREDICATES = (*_COMPARE, exp.And, exp.Or, exp.Not, exp.Paren, exp.Is, exp.In, exp.Between)
"""Expressions whose value is true, false or NULL (1, 0 or NULL in a select list)."""


_COMPUTABLE = (
    *_PREDICATES,
    *_ARITHMETIC,
    *_AGGREGATES,
    exp.Avg,
    exp.IntDiv,
    exp.Mod,
    exp.Literal,
    exp.Null,
    exp.Neg,
    exp.Placeholder,
    exp.Column,
    exp.Nullif,
    exp.Coalesce,
    exp.If,
    exp.Abs,
    exp.Round,
    exp.Case,
)
"""What an expression over aggregates may be made of, node by node (an allow-list)."""


class _Computed(_Having):
    """Compiles a select item that is an expression over aggregates (``SUM(a) / 100``,
    ``ROUND(AVG(a), 2)``, ``COALESCE(SUM(a), 0)``, ``CASE WHEN COUNT(*) > 5 ...``) into its
    value from a merged row: the shards return the aggregates' partials (hidden columns), the
    merge combines them, and this computes the item with MySQL's rules, as HAVING does, plus
    AVG (from hidden SUM and COUNT partials), ROUND, CASE, DIV and %."""

    clause = "expression over aggregates"
    aliases: frozenset[str] = frozenset()
    """The select aliases (lower case), which an item cannot name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.partial_sums: list[int] = []
        """Hidden positions of COALESCE(SUM(x), 0) partials, combined by adding."""

    def value(self, expr: exp.Expression) -> Callable[[tuple[Any, ...]], Any]:
        while isinstance(expr, exp.Paren):
            expr = expr.this
        if isinstance(expr, _PREDICATES):
            test = self.build(expr)
            return lambda row: None if (v := test(row)) is None else int(v)
        operand = self.operand(expr, expr)
        # The item's value as MySQL materializes it (for HAVING, ORDER BY and the caller):
        # rounded to its scale once the expression is computed; a plain int, not Unsigned.
        return lambda row: _plain(shown(operand(row)[0]))

    def operand(self, expr: exp.Expression, other: exp.Expression) -> _Operand:
        if not isinstance(expr, _COMPUTABLE):
            # Evaluated by the merge or not at all: a position lookup would find the item's
            # own stand-in (NULL) and answer NULL.
            raise UnsupportedQueryError(
                f"{expr.sql(dialect='mysql')!r} in an expression over aggregates across shards:"
                " the merge computes arithmetic, DIV, %, comparisons, IN, BETWEEN, IS NULL,"
                " AND/OR/NOT, CASE, IF, IFNULL/COALESCE, NULLIF, ABS and ROUND over COUNT, SUM,"
                " MIN, MAX, AVG, group columns and literals; select the aggregates and compute"
                " the rest in the application, or route by a key"
            )
        if (
            isinstance(expr, exp.Column)
            and not expr.table
            and expr.name.lower() in self.aliases
            and expr.name.lower() not in self.group_columns
        ):
            # MariaDB: 1054 Unknown column (a select alias is not visible in another item).
            raise UnsupportedQueryError(
                f"{expr.name!r} in an expression over aggregates is a select alias, which"
                " another select item cannot name (MariaDB: unknown column); write the"
                " expression"
            )
        if _sum_or_zero(expr):
            # COALESCE(SUM(x), 0): each shard's is the column's DECIMAL (0.00 on a shard
            # without rows) and they add up to the answer, typed as one database types it.
            pos = self.add_hidden(expr.copy())
            self.partial_sums.append(pos)
            self.reads.add(pos)
            return lambda row: (row[pos], None)
        if isinstance(expr, exp.Avg) and (
            _distinct_aggregate(expr) is None or self.mergeable(expr)
        ):
            total = self.add_hidden(exp.Sum(this=expr.this.copy()))
            count = self.add_hidden(exp.Count(this=expr.this.copy()))
            self.reads |= {total, count}
            return lambda row: (inner_average(row[total], row[count]), None)
        if isinstance(expr, exp.IntDiv | exp.Mod):
            a, b = self.operand(expr.this, other), self.operand(expr.expression, other)
            apply = _int_divide if isinstance(expr, exp.IntDiv) else _modulo
            return lambda row: (apply(a(row)[0], b(row)[0]), None)
        if isinstance(expr, _PREDICATES) and not isinstance(expr, exp.Paren):
            test = self.build(expr)
            return lambda row: (None if (v := test(row)) is None else int(v), None)
        return super().operand(expr, other)

    def function(self, expr: exp.Expression, other: exp.Expression) -> _Operand | None:
        if isinstance(expr, exp.Round):
            inner = self.operand(expr.this, other)
            places = expr.args.get("decimals")
            digits = 0
            if places is not None:
                ref = value_ref(places)
                if ref is None or ref.param is not None or not isinstance(ref.literal, int):
                    raise UnsupportedQueryError(
                        f"{expr.sql(dialect='mysql')} across shards: ROUND's places must be an"
                        " integer literal"
                    )
                digits = ref.literal
            kind = _kind(expr.this)
            decimal = False
            if digits < 0 and kind not in ("exact", "double"):
                if kind != "bigint":
                    # INT stays an integer, BIGINT becomes a DECIMAL: the column's type decides.
                    raise UnsupportedQueryError(
                        f"{expr.sql(dialect='mysql')} across shards: ROUND to negative places"
                        " of a value whose integer type the router cannot see; ROUND a SUM,"
                        " an AVG or a quotient, or route by a key"
                    )
                decimal = True  # COUNT is a BIGINT
            places = min(digits, MAX_SCALE)
            return lambda row: (_round(inner(row)[0], places, decimal), None)
        if isinstance(expr, exp.Case):
            chosen = self.case(expr, other)
        else:
            found = super().function(expr, other)
            if found is None or not isinstance(expr, exp.Coalesce | exp.If):
                return found
            chosen = found
        return _one_type(expr, chosen)

    @staticmethod
    def _truth_of(value: _Operand) -> Callable[[tuple[Any, ...]], bool | None]:
        return lambda row: _truth(value(row)[0])

    def case(self, expr: exp.Case, other: exp.Expression) -> _Operand:
        subject = expr.this
        tests: list[Callable[[tuple[Any, ...]], bool | None]] = []
        values: list[_Operand] = []
        for branch in expr.args.get("ifs") or ():
            when: exp.Expression = branch.this
            if subject is not None:  # CASE x WHEN v: x = v
                when = exp.EQ(this=subject.copy(), expression=when.copy())
            if isinstance(when, _PREDICATES):
                tests.append(self.build(when))
            else:
                tests.append(self._truth_of(self.operand(when, other)))
            values.append(self.operand(branch.args["true"], other))
        default = expr.args.get("default")
        otherwise = (
            self.operand(default, other) if default is not None else (lambda row: (None, None))
        )

        def pick(row: tuple[Any, ...]) -> tuple[Any, Any]:
            # Every branch decides the result's type in MySQL: a mix is not evaluated.
            _first_of([v(row) for v in (*values, otherwise)], check_only=True)
            for test, value in zip(tests, values, strict=True):
                if test(row) is True:
                    return value(row)
            return otherwise(row)

        return pick


def _branches(expr: exp.Expression) -> list[exp.Expression]:
    """The expressions a COALESCE, IF or CASE may give."""
    if isinstance(expr, exp.Coalesce):
        return [expr.this, *expr.expressions]
    if isinstance(expr, exp.If):
        return [e for e in (expr.args.get("true"), expr.args.get("false")) if e is not None]
    assert isinstance(expr, exp.Case)
    values = [branch.args["true"] for branch in expr.args.get("ifs") or ()]
    default = expr.args.get("default")
    return [*values, *([default] if default is not None else [])]


def _no_merged_string(expr: exp.Expression, node: exp.Expression, value: _Operand) -> _Operand:
    """``value``, refusing to be compared when ``node`` is an IF/CASE/COALESCE/NULLIF the
    merge evaluates and it gives a string: no shard weighed it, and the collation ('x' = 'X',
    'a ' = 'a') is not the byte order (when every branch is a string literal, at once)."""
    while isinstance(node, exp.Paren):
        node = node.this
    if not isinstance(node, exp.Coalesce | exp.If | exp.Case | exp.Nullif):
        return value
    shown_node = node.sql(dialect="mysql")

    def refused() -> UnsupportedQueryError:
        return UnsupportedQueryError(
            f"{expr.sql(dialect='mysql')} across shards compares a string the merge makes"
            f" ({shown_node}) without its collation; compare the values themselves, or route"
            " by a key"
        )

    branches = [node.this] if isinstance(node, exp.Nullif) else _branches(node)
    if {_kind(b) for b in branches if _kind(b) != "null"} == {"str"}:
        raise refused()

    def checked(row: tuple[Any, ...]) -> tuple[Any, Any]:
        found = value(row)
        if isinstance(found[0], str) and found[1] is None:
            raise refused()
        return found

    return checked


def _literal_kind(expr: exp.Literal) -> str:
    if expr.is_string:
        return "str"
    if "e" in expr.this.lower():
        return "double"
    if "." in expr.this:
        return f"dec:{len(expr.this.split('.', 1)[1])}"
    return "int"


def _kind(expr: exp.Expression) -> str:
    """What the router knows of the type MySQL gives ``expr``: "str", "int" (an INT literal
    or arithmetic of them), "bigint" (COUNT, a comparison, DIV), "dec:<scale>" (a decimal
    literal), "double" (1e0), "null", "exact" (a number whose value carries its type and
    scale: SUM, AVG, a quotient), or "any" (a column's type, unknown: MIN, MAX, a column)."""
    while isinstance(expr, exp.Paren):
        expr = expr.this
    if isinstance(expr, exp.Literal):
        return _literal_kind(expr)
    if isinstance(expr, exp.Null):
        return "null"
    if isinstance(expr, (exp.Count, exp.IntDiv, *_PREDICATES)):
        return "bigint"
    if isinstance(expr, exp.Sum | exp.Avg | exp.Div | exp.Mod | exp.Round):
        return "exact"
    if isinstance(expr, exp.Neg | exp.Abs):
        return _kind(expr.this)
    if isinstance(expr, exp.Add | exp.Sub | exp.Mul):
        kinds = {_kind(expr.this), _kind(expr.expression)}
        if kinds <= {"int"}:
            return "int"
        if kinds <= {"int", "bigint"}:
            return "bigint"
        return "double" if "double" in kinds else "exact" if "any" not in kinds else "any"
    return "any"


def _one_type(expr: exp.Expression, chosen: _Operand) -> _Operand:
    """COALESCE, IF and CASE give every branch one type, from all of them: the chosen value
    converted to it, or UnsupportedQueryError when it depends on a column's declared type,
    which the router cannot see (IF(c, MAX(price), 1) is 1.00 for a DECIMAL(10,2) price)."""
    branches = [b for b in _branches(expr) if _kind(b) != "null"]
    kinds = {_kind(b) for b in branches}
    if len(branches) <= 1 or len({b.sql() for b in branches}) == 1 or kinds <= {"str"}:
        return chosen
    if kinds <= {"int", "bigint"}:
        return chosen
    literal = {k for k in kinds if k.startswith("dec:")}
    if kinds <= {"int", "bigint", "double", *literal}:
        if "double" in kinds:
            return lambda row: _as(chosen(row), float)
        scale = max(int(k[4:]) for k in literal)
        step = Decimal(1).scaleb(-scale)
        return lambda row: _as(chosen(row), lambda v: Decimal(v).quantize(step))
    raise UnsupportedQueryError(
        f"{expr.sql(dialect='mysql')} across shards: MySQL gives all its branches one type,"
        " which here depends on a column's declared type (DECIMAL scale, INT or DOUBLE) that"
        " the router cannot see; select the values and choose in the application, or route"
        " by a key"
    )


def _as(value: tuple[Any, Any], convert: Callable[[Any], Any]) -> tuple[Any, Any]:
    number, weight = value
    if number is None or isinstance(number, str | bool):
        return value
    return convert(number), weight


def _sum_or_zero(expr: exp.Expression) -> bool:
    """Whether ``expr`` is COALESCE(SUM(x), 0) or IFNULL(SUM(x), 0) (SUM without DISTINCT)."""
    if not isinstance(expr, exp.Coalesce) or len(expr.expressions) != 1:
        return False
    total, zero = expr.this, expr.expressions[0]
    return (
        isinstance(total, exp.Sum)
        and _distinct_aggregate(total) is None
        and isinstance(zero, exp.Literal)
        and not zero.is_string
        and zero.this == "0"
    )


def _numeric_valued(expr: exp.Expression) -> bool:
    """Whether ``expr`` is always a number (or NULL): what the merge may order by."""
    while isinstance(expr, exp.Paren):
        expr = expr.this
    if isinstance(expr, exp.Coalesce | exp.If | exp.Case | exp.Nullif):
        values = _branches(expr) if not isinstance(expr, exp.Nullif) else [expr.this]
        return all(_numeric_valued(v) for v in values)
    return _kind(expr) not in ("str", "any") or isinstance(
        expr, exp.Add | exp.Sub | exp.Mul | exp.Neg
    )


def _dividing(a: Any, b: Any) -> tuple[Any, Any] | None:
    """The numbers a division (/, DIV, %) works on; None (its NULL) for a NULL or a zero
    divisor, as MySQL answers them."""
    if a is None or b is None:
        return None
    x, y = _numeric(a), _numeric(b)
    return None if y == 0 else (x, y)


def _int_divide(a: Any, b: Any) -> Any:
    """MySQL's DIV: the quotient truncated toward zero, an integer; NULL for a zero divisor."""
    pair = _dividing(a, b)
    if pair is None:
        return None
    x, y = _exact(pair[0]), _exact(pair[1])
    with localcontext() as context:
        context.prec = 100
        quotient = int(x / y)
    a, b = pair
    # An integer, with DECIMAL operands too, in BIGINT's range (UNSIGNED when an operand is).
    return _in_range(quotient, _unsigned(a) or _unsigned(b), f"{a} DIV {b}")


def _modulo(a: Any, b: Any) -> Any:
    """MySQL's %: the remainder with the dividend's sign; NULL for a zero divisor."""
    pair = _dividing(a, b)
    if pair is None:
        return None
    x, y = pair
    if isinstance(x, float) or isinstance(y, float):
        return math.fmod(float(x), float(y))
    with localcontext() as context:
        context.prec = 100
        rest = Decimal(x) % Decimal(y)
    if isinstance(x, int) and isinstance(y, int):
        if not _bigint_operands(x, y):
            return Decimal(int(rest))  # a literal beyond BIGINT is a DECIMAL: so is %
        # UNSIGNED when the dividend is (MySQL's MOD takes its first argument's sign flag).
        return Unsigned(int(rest)) if _unsigned(x) else int(rest)
    if isinstance(x, Unrounded) or isinstance(y, Unrounded):
        return Unrounded(rest, max(scale_of(x), scale_of(y)))
    return rest


def _exact(value: Any) -> Decimal:
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _round(value: Any, digits: int, decimal: bool = False) -> Any:
    """MySQL's ROUND(x, d): exact numbers half away from zero (a DECIMAL gets d places, an
    integer stays one, or becomes a DECIMAL for ``decimal``: a BIGINT to negative places); a
    DOUBLE as MariaDB does it, rint(x * 10^d) / 10^d."""
    if value is None:
        return None
    x = _numeric(value)
    if decimal and isinstance(x, int):
        x = Decimal(x)
    if isinstance(x, float):
        if digits >= 0:
            scale = 10.0**digits
            return round(x * scale) / scale
        scale = 10.0 ** (-digits)
        return round(x / scale) * scale
    with localcontext() as context:
        context.prec = 100
        if isinstance(x, int):
            if digits >= 0:
                return x
            step = Decimal(1).scaleb(-digits)
            return int((Decimal(x) / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step)
        if digits >= 0:
            return x.quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP)
        step = Decimal(1).scaleb(-digits)
        return ((x / step).quantize(Decimal(1), rounding=ROUND_HALF_UP) * step).quantize(Decimal(1))


def compare(a: Any, wa: Any, b: Any, wb: Any, *, rounded: bool = True) -> int:
    """-1, 0 or 1 as MySQL compares two non-NULL values (weights for strings, if any).

    ``rounded``: a quotient is compared at the scale it shows (MariaDB: ``1/3 = 0.3333`` is
    true, while ``1/3*3`` is 1.0000), except with a DOUBLE and in IN and BETWEEN, which see
    the digits it keeps."""
    if rounded and not (isinstance(a, float) or isinstance(b, float)):
        a, b = shown(a), shown(b)
    if isinstance(a, str) and isinstance(b, str):
        if wa is not None and wb is not None:
            if not wa or not wb:
                raise UnsupportedQueryError(
                    f"{_MERGED} compares a string longer than {WEIGHT_CHARS} characters"
                    " across shards; route by a key"
                )
            return _sign(wa, wb)
        return _sign(a, b)  # (SQLite: no weights, binary collation)
    if isinstance(a, str) or isinstance(b, str):
        text, value, flip = (a, b, 1) if isinstance(a, str) else (b, a, -1)
        if isinstance(value, dt.date):
            value = _as_datetime(value)
        elif _is_number(value):
            if isinstance(text, _Constant) and not isinstance(value, float):
                # MariaDB compares an integer or a (non-constant) DECIMAL with a string
                # constant as two DECIMALs: exactly (MAX(id) = '<id + 1>' is false for a 60-bit
                # id, 0.1000 = '0.1' is true).
                return flip * _sign(_leading_decimal(text), value)
            value = float(value)  # otherwise as two doubles
        return flip * _sign(_coerce(text, value), value)
    if isinstance(a, bytes) and isinstance(b, bytes):
        return _sign(a, b)
    if _is_number(a) and _is_number(b):
        if isinstance(a, float) or isinstance(b, float):
            return _sign(float(a), float(b))
        return _sign(a, b)
    if isinstance(a, dt.date) and isinstance(b, dt.date):
        return _sign(_as_datetime(a), _as_datetime(b))
    raise UnsupportedQueryError(
        f"{_MERGED} compares a {type(a).__name__} with a {type(b).__name__} across"
        " shards; compare values of one type"
    )


def _coerce(text: str, value: Any) -> Any:
    """A string as MySQL converts it to compare with ``value``: a temporal for a date or
    datetime, a double for a number, bytes for a binary string."""
    if isinstance(value, dt.date):
        try:
            return _as_datetime(dt.datetime.fromisoformat(text.strip()))
        except ValueError:
            raise UnsupportedQueryError(
                f"{_MERGED} compares a date with {text!r}, which is not a date or datetime"
                " literal ('YYYY-MM-DD' or 'YYYY-MM-DD hh:mm:ss')"
            ) from None
    if _is_number(value):
        return _leading_number(text)
    if isinstance(value, bytes):
        return text.encode()
    raise UnsupportedQueryError(
        f"{_MERGED} compares {text!r} with a {type(value).__name__} across shards;"
        " compare values of one type"
    )


def _as_datetime(value: dt.date) -> dt.datetime:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    return dt.datetime(value.year, value.month, value.day)


_NUMBER_PREFIX = re.compile(r"\s*[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


class _Constant(str):
    """A string literal of the statement (MariaDB compares a constant string with a number
    differently from a string column)."""

    __slots__ = ()


def _leading_decimal(text: str) -> Decimal:
    """The longest numeric prefix as a DECIMAL, 0 if there is none."""
    match = _NUMBER_PREFIX.match(text)
    return Decimal(match.group(0).strip()) if match else Decimal(0)


def _leading_number(text: str) -> float:
    """MySQL's string-to-number conversion: the longest numeric prefix, 0 if there is none."""
    match = _NUMBER_PREFIX.match(text)
    return float(match.group(0)) if match else 0.0


def _number(text: str) -> Any:
    if "e" in text.lower():
        return float(text)  # 1e3 is a DOUBLE in MySQL, 1.5 a DECIMAL
    return Decimal(text)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float | Decimal) and not isinstance(value, bool)


def _sign(a: Any, b: Any) -> int:
    return int(a > b) - int(a < b)


def _negate(value: Any, *, constant: bool = False) -> Any:
    """MySQL's unary minus: of a BIGINT, UNSIGNED (a column's) or not, a signed BIGINT, error
    1690 beyond; of a ``constant`` beyond, a DECIMAL (9223372036854775808 and -(-2**63))."""
    if value is None:
        return None
    number = _numeric(value)
    if type(number) in _INTEGERS:
        if constant and not _SIGNED_MIN <= -number <= _SIGNED_MAX:
            return Decimal(-number)
        return _in_range(-number, False, f"-({number})")
    return _like(-number, value)


def _like(result: Any, value: Any) -> Any:
    """``result`` unrounded, with ``value``'s scale, when ``value`` is (minus, ABS)."""
    return Unrounded(result, value.scale) if isinstance(value, Unrounded) else result


def _numeric(value: Any) -> Any:
    if isinstance(value, str):
        return _leading_number(value)
    if _is_number(value):
        return value
    raise UnsupportedQueryError(
        f"{_MERGED} does arithmetic on a {type(value).__name__} across shards; only numbers merge"
    )


def _arith(
    op: Callable[[Any, Any], Any], scale: Callable[[int, int], int]
) -> Callable[[Any, Any], Any]:
    """An operator with MySQL's types: doubles when either side is one; exact otherwise, and
    an Unrounded operand (a quotient) keeps the result unrounded, with the result's scale
    (``scale`` of the operands' scales: the larger for + and -, their sum for *)."""

    def apply(a: Any, b: Any) -> Any:
        if a is None or b is None:
            return None
        x, y = _numeric(a), _numeric(b)
        if isinstance(x, float) or isinstance(y, float):
            return op(float(x), float(y))
        if isinstance(x, Unrounded) or isinstance(y, Unrounded):
            with localcontext() as context:
                context.prec = 100
                return Unrounded(op(Decimal(x), Decimal(y)), scale(scale_of(x), scale_of(y)))
        result = op(x, y)
        if type(x) in _INTEGERS and type(y) in _INTEGERS:
            return _bigint(result, x, y)
        return result

    return apply


_INTEGERS = (int, Unsigned)
_SIGNED_MIN, _UNSIGNED_MAX, _SIGNED_MAX = -(2**63), 2**64 - 1, 2**63 - 1


def _bigint(result: int, x: int, y: int) -> Any:
    """``result`` of ``x`` and ``y`` as MySQL's BIGINT arithmetic gives it: UNSIGNED when an
    operand is (an Unsigned, from an UNSIGNED column; or beyond the signed range), then from 0
    to 2**64 - 1, else signed; outside its range, error 1690 as on one database. An operand
    beyond both ranges is a literal MySQL types DECIMAL: DECIMAL arithmetic then."""
    if not _bigint_operands(x, y):
        return Decimal(result)
    unsigned = Unsigned in (type(x), type(y)) or x > _SIGNED_MAX or y > _SIGNED_MAX
    return _in_range(result, unsigned, f"{x} and {y}")


def _bigint_operands(x: int, y: int) -> bool:
    """Whether both are BIGINTs (signed or UNSIGNED): a literal beyond is a DECIMAL."""
    return _SIGNED_MIN <= x <= _UNSIGNED_MAX and _SIGNED_MIN <= y <= _UNSIGNED_MAX


def _in_range(result: int, unsigned: bool, operands: str) -> int:
    """``result`` (an Unsigned when ``unsigned``) if it is in its BIGINT range, else error
    1690 as on one database."""
    low, high = (0, _UNSIGNED_MAX) if unsigned else (_SIGNED_MIN, _SIGNED_MAX)
    if not low <= result <= high:
        kind = "BIGINT UNSIGNED" if unsigned else "BIGINT"
        raise ExecutionError(
            f"{kind} value is out of range ({operands} give {result}) in {_MERGED} across"
            " shards, as one database refuses it (error 1690)"
        )
    return Unsigned(result) if unsigned else result


def _plain(value: Any) -> Any:
    return int(value) if type(value) is Unsigned else value


def _unsigned(x: Any) -> bool:
    return type(x) is Unsigned or (type(x) is int and _SIGNED_MAX < x <= _UNSIGNED_MAX)


def _divide(a: Any, b: Any) -> Any:
    """MySQL's ``/``: NULL for a zero divisor, a double for doubles, otherwise a DECIMAL with
    the dividend's scale plus div_precision_increment, rounded half up."""
    pair = _dividing(a, b)
    if pair is None:
        return None
    x, y = pair
    if isinstance(x, float) or isinstance(y, float):
        return float(x) / float(y)
    # Kept to MariaDB's digits while the expression goes on (HAVING SUM(a) / 3 * 3 = SUM(a)),
    # shown at the dividend's scale plus div_precision_increment at the end (merge.quotient).
    return quotient(x, y)


_ARITHMETIC_OPS: dict[type[exp.Expression], Callable[[Any, Any], Any]] = {
    exp.Add: _arith(lambda x, y: x + y, max),
    exp.Sub: _arith(lambda x, y: x - y, max),
    exp.Mul: _arith(lambda x, y: x * y, lambda a, b: a + b),
    exp.Div: _divide,
}


def _first_of(values: list[tuple[Any, Any]], *, check_only: bool = False) -> tuple[Any, Any]:
    """COALESCE: the first non-NULL value. MySQL gives the result one type from all the
    arguments (a number and a string make a string), which a mix here would not reproduce."""
    present = [v for v in values if v[0] is not None]
    if len({isinstance(v[0], str | bytes) for v in present}) > 1:
        raise UnsupportedQueryError(
            f"{_MERGED} mixes strings and numbers in IFNULL/COALESCE/IF across shards;"
            " compare values of one type"
        )
    if check_only or not present:
        return None, None
    return present[0]


def _truth(value: Any) -> bool | None:
    """A value as MySQL's IF reads its condition: NULL is not true, a number is true when
    it is not zero."""
    if value is None:
        return None
    return bool(_numeric(value))


def _absolute(value: Any) -> Any:
    if value is None:
        return None
    number = _numeric(value)
    if type(number) in _INTEGERS and _SIGNED_MIN <= number <= _UNSIGNED_MAX:
        # ABS keeps its argument's type: ABS(-2**63) is out of the signed range.
        return _in_range(abs(number), _unsigned(number), f"ABS({number})")
    return _like(abs(number), value)


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
            value = int(node.this)
        except ValueError:
            pass
        else:
            if value > MAX_LIMIT:
                raise UnsupportedQueryError(
                    f"LIMIT/OFFSET {value} is larger than MySQL's largest, {MAX_LIMIT}"
                )
            return value
    raise UnsupportedQueryError(
        "LIMIT/OFFSET must be integer literals for multi-shard queries (the merge needs them)"
    )


__all__ = ["hidden_name", "scatter", "union_order_by", "weight", "without_weights"]
