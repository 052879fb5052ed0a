"""The merge engine: MergePlan and merge(), which combine the rows of one multi-shard SELECT.

Every shard ran the planner's rewrite of the statement (sorted, limited to ``offset + limit``,
grouped into partial aggregates); ``merge`` turns those per-shard answers into the answer one
database holding every row would give (DESIGN.md, invariant 2). It is a pure function of the plan
and the rows: no I/O, no SQL, so the sync and async executors share it and tests can drive it with
lists.

The way of the rows::

    no grouping:  k-way merge (or concatenation) -> HAVING -> DISTINCT -> OFFSET/LIMIT -> width
    grouping:     combine partials per group -> AVG -> HAVING -> DISTINCT -> ORDER BY
                  -> OFFSET/LIMIT -> width

The ungrouped path streams: it reads no more rows from a shard than the output needs (plus the
one row per shard a merge must look ahead), so shards may be lazy, unbuffered cursors.

Semantics follow MySQL/MariaDB:

- ``NULL`` sorts before every value in ascending order and after every value in descending order.
- ``NULL`` is a group of its own in GROUP BY and a value of its own in DISTINCT.
- ``COUNT`` partials add up; ``SUM`` partials add up and stay ``NULL`` only when every partial is
  ``NULL``; ``MIN``/``MAX`` ignore ``NULL``. A global aggregate (no GROUP BY) always yields
  exactly one row, even when no shard matched a row (``COUNT`` 0, the others ``NULL``).
- ``AVG`` of an integer or DECIMAL column is a DECIMAL with the scale of its sum plus 4
  (``div_precision_increment``), rounded half away from zero; ``AVG`` of a float column is a
  float.
- A column that is neither a group key nor an aggregate takes the first non-``NULL`` value seen,
  a value of some row of the group (MySQL picks an arbitrary row's value there).

Strings compare as the shards' collation does: the planner has each shard compute a sort
key, ``WEIGHT_STRING(expr AS CHAR(n))``, as a hidden column next to every string it orders,
groups, deduplicates or takes MIN/MAX of (``MergePlan.weights``). The merge compares those bytes
instead of the strings and returns the shards' own values. A weight of ``NULL`` (a number, a
date, a binary string, a SQLite shard whose strings compare as BINARY) means: compare the value.
"""

from __future__ import annotations

import datetime as dt
import heapq
import itertools
import operator
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal, localcontext
from typing import Any, Literal, TypeVar, get_args

from ..errors import UnsupportedQueryError

__all__ = [
    "AVG_SCALE_INCREMENT",
    "MAX_LIMIT",
    "WEIGHT_CHARS",
    "AggFunc",
    "Aggregate",
    "Average",
    "Computed",
    "Concat",
    "MergePlan",
    "SortKey",
    "average",
    "merge",
    "ordering",
    "sort_key",
]

AggFunc = Literal["count", "sum", "min", "max"]
"""How partials combine (``max`` also merges a DISTINCT partial seen on several shards)."""
_AGG_FUNCS: frozenset[str] = frozenset(get_args(AggFunc))

_Row = TypeVar("_Row", bound=Sequence[Any])

#: MySQL's default ``div_precision_increment``: digits AVG adds to the scale of its argument.
AVG_SCALE_INCREMENT = 4

#: MySQL's largest LIMIT (2**64 - 1), its spelling of "all the rest".
MAX_LIMIT = 18446744073709551615

#: Characters a string sort key covers (``WEIGHT_STRING(x AS CHAR(255))``): the padding to a
#: fixed length gives PAD SPACE collations' ``'a' = 'a  '``; a longer string (trailing spaces
#: aside) would be cut, so the shards send an empty weight for it and the merge refuses.
WEIGHT_CHARS = 255


@dataclass(frozen=True, slots=True)
class SortKey:
    """One ORDER BY term: the position of its column in the shard rows and its direction."""

    index: int
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Aggregate:
    """A column holding each shard's partial aggregate, and how the partials combine.

    ``count`` partials are summed; ``sum`` partials are summed (``NULL`` if all are ``NULL``);
    ``min``/``max`` take the smallest/largest non-``NULL`` partial.
    """

    index: int
    func: AggFunc


@dataclass(frozen=True, slots=True)
class Average:
    """An AVG column: its output position and the hidden SUM(x) and COUNT(x) partials behind it.

    The merged value (total sum / total count, ``NULL`` when the count is 0) is written at
    ``index``, which may be the position of the SUM partial itself.
    """

    index: int
    sum_index: int
    count_index: int


@dataclass(frozen=True, slots=True)
class Computed:
    """A select item computed after the merge from the merged row (an expression over
    aggregates: ``SUM(a) / 100``); the shards return NULL at ``index`` and the partials."""

    index: int
    value: Callable[[tuple[Any, ...]], Any]


@dataclass(frozen=True, slots=True)
class Concat:
    """A GROUP_CONCAT column: each shard row holds, at ``index``, the GROUP_CONCAT of its
    (group, ORDER BY values, DISTINCT values) rows, a *piece*; the merge joins a group's pieces.

    ``length``: the piece's length in bytes as the shard measured it (LENGTH), for the cut at
    ``group_concat_max_len`` (the shard's value at ``max_len``). ``order_by``: the GROUP_CONCAT's
    own ORDER BY over the row. ``distinct``: for GROUP_CONCAT(DISTINCT ...), the positions of its
    arguments, whose collation weights deduplicate the pieces (a value on two shards appears
    once). ``separator``: ASCII (its length in bytes is its length in characters).
    """

    index: int
    length: int
    max_len: int
    order_by: tuple[SortKey, ...] = ()
    distinct: tuple[int, ...] = ()
    separator: str = ","


@dataclass(frozen=True, slots=True)
class MergePlan:
    """How to combine the shards' rows of one SELECT into the single-database answer.

    ``width`` leading columns are what the caller sees; columns at ``width`` and beyond are
    helpers the planner added (ORDER BY and GROUP BY columns, AVG partials, collation weights)
    and are dropped. With a ``*`` (``width`` None) the helpers are the last ``hidden`` columns
    and the plan's positions of them are negative, counted from the end of the row.
    ``having`` sees the merged row at full width, hidden columns included, after AVG is computed.
    With aggregates or averages but no ``group_by``, the result is a single global row.
    """

    width: int | None
    """Visible columns; None when the select list has a ``*``: then every column but the
    ``hidden`` trailing ones is visible (the count is known only from the shards' rows)."""
    order_by: tuple[SortKey, ...] = ()
    group_by: tuple[int, ...] = ()
    aggregates: tuple[Aggregate, ...] = ()
    averages: tuple[Average, ...] = ()
    computed: tuple[Computed, ...] = ()
    """Expressions over aggregates, computed (in order) after AVG and HAVING (which never
    reads them: an item's alias in HAVING is refused)."""
    having: Callable[[tuple[Any, ...]], bool] | None = None
    distinct: bool = False
    limit: int | None = None
    offset: int = 0
    weights: tuple[tuple[int, int], ...] = ()
    """(value position, weight position) pairs: where the shard put the collation sort key
    (``WEIGHT_STRING``) of a value that is ordered, grouped, deduplicated or a MIN/MAX. The
    merge compares the weight when it is not NULL, the value otherwise."""
    hidden: int = 0
    """How many trailing columns are the planner's helpers (used when ``width`` is None)."""
    first: MergePlan | None = None
    """A merge the shards' rows go through before this one, or None. COUNT/SUM/AVG(DISTINCT x)
    of a column whose values may live on several shards: each shard groups by the statement's
    groups *and* x, ``first`` merges those rows into one per (group, x) (the DISTINCT partials
    taking ``max``: a value on two shards counts once), and this plan adds them up per group."""
    concats: tuple[Concat, ...] = ()
    """GROUP_CONCAT columns: joined from the pieces of a group's rows (see Concat)."""
    numbers: tuple[int, ...] = ()
    """Positions of the fetched arguments of SUM/AVG(DISTINCT), which MariaDB deduplicates as
    the numbers they convert to ('1' and '1.0', two DATETIME(6) a microsecond apart are one)
    and sums in its own order: a string, a date or time, or a float there is refused."""
    exact: tuple[int, ...] = ()
    """Positions of fetched DISTINCT arguments (see ``first``) and GROUP_CONCAT keys: a float
    there is refused, as a FLOAT comes back in 6 digits (three FLOATs a shard tells apart
    decode equal)."""
    expanded: bool = False
    """The shards group by more than the statement does (DISTINCT arguments, GROUP_CONCAT
    keys): their rows grow with the distinct values (Limits.max_distinct_rows)."""
    evaluated: tuple[int, ...] = ()
    """Positions HAVING and the computed items read (the FLOAT refusal: a FLOAT only carried
    along merges right)."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if self.width is not None and self.width < 0:
            problems.append(f"width {self.width} is negative; it counts the visible columns")
        if self.offset < 0:
            problems.append(f"offset {self.offset} is negative; OFFSET must be 0 or more")
        if self.limit is not None and self.limit < 0:
            problems.append(f"limit {self.limit} is negative; LIMIT must be 0 or more, or None")
        for what, index in self._positions():
            if index < 0 and (self.width is not None or index < -self.hidden):
                problems.append(
                    f"{what} index {index} is negative; positions count from 0 (from the end,"
                    " within the hidden columns, when width is None)"
                )
        for agg in self.aggregates:
            if agg.func not in _AGG_FUNCS:
                problems.append(
                    f"aggregate at index {agg.index} has func {agg.func!r};"
                    f" expected one of {sorted(_AGG_FUNCS)}"
                )
        if not problems:
            problems.extend(self._combine_conflicts())
        if problems:
            raise ValueError("invalid MergePlan: " + "; ".join(problems))

    def _positions(self) -> Iterator[tuple[str, int]]:
        for key in self.order_by:
            yield "order_by", key.index
        for index in self.group_by:
            yield "group_by", index
        for agg in self.aggregates:
            yield "aggregate", agg.index
        for item in self.computed:
            yield "computed", item.index
        for avg in self.averages:
            yield "average", avg.index
            yield "average sum", avg.sum_index
            yield "average count", avg.count_index
        for value, weight in self.weights:
            yield "weighted value", value
            yield "weight", weight
        for concat in self.concats:
            yield "concat", concat.index
            yield "concat length", concat.length
            yield "concat max_len", concat.max_len
            for key in concat.order_by:
                yield "concat order_by", key.index
            for index in concat.distinct:
                yield "concat distinct", index

    def _combine_conflicts(self) -> list[str]:
        # A position may be shared (two AVGs over one column share a COUNT partial), but it
        # cannot combine two ways, and a group key is never a partial.
        problems: list[str] = []
        seen: dict[int, str] = {}
        for index, func in _partials(self):
            if seen.setdefault(index, func) != func:
                problems.append(f"column {index} combines both as {seen[index]!r} and as {func!r}")
        for index in self.group_by:
            if index in seen:
                problems.append(f"column {index} is both a group key and a {seen[index]!r}")
        return problems

    @property
    def regrouped(self) -> bool:
        """The statement has no GROUP BY but the shards group (``expanded``): a shard without
        matching rows sends no row, so when none sends one the answer is the statement run
        over no rows (Plan.render_empty), not a row made up here."""
        return self.expanded and not self.group_by

    @property
    def grouped(self) -> bool:
        """Whether rows combine into groups (GROUP BY, or a global aggregate)."""
        return bool(
            self.group_by or self.aggregates or self.averages or self.computed or self.concats
        )

    @property
    def columns_needed(self) -> int:
        """How many columns each shard row must have for this plan."""
        if self.width is None:
            return self.hidden + 1
        return max([self.width, *(index + 1 for _, index in self._positions())])

    @property
    def shard_limit(self) -> int | None:
        """The LIMIT each shard runs: ``offset + limit`` rows, capped at MySQL's largest LIMIT
        (``LIMIT m, 18446744073709551615`` means "to the end")."""
        if self.limit is None:
            return None
        return min(self.limit + self.offset, MAX_LIMIT)

    def visible_width(self, columns: int) -> int:
        """How many of a shard result's ``columns`` the caller sees."""
        return columns - self.hidden if self.width is None else self.width

    def weight_of(self) -> dict[int, int]:
        """The weights as a mapping from value position to weight position."""
        return dict(self.weights)


def _partials(plan: MergePlan) -> Iterator[tuple[int, AggFunc]]:
    """Every partial-aggregate position of the plan with how it combines, AVG partials included."""
    for agg in plan.aggregates:
        yield agg.index, agg.func
    for avg in plan.averages:
        yield avg.sum_index, "sum"
        yield avg.count_index, "count"


class Unsigned(int):
    """An integer of an UNSIGNED column (the result metadata's flag), as HAVING and the
    expressions over aggregates see it: MySQL's arithmetic with it is unsigned (``0 - 1`` is
    error 1690), which a plain int cannot tell when the value is small."""

    __slots__ = ()


def with_unsigned(plan: MergePlan, positions: frozenset[int]) -> MergePlan:
    """``plan`` whose HAVING and computed items see the integers at ``positions`` (UNSIGNED
    columns) as Unsigned. The plan itself when there is nothing to mark."""
    if not positions or (plan.having is None and not plan.computed):
        return plan

    def marked(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(
            Unsigned(v) if type(v) is int and i in positions else v for i, v in enumerate(row)
        )

    def computing(value: Callable[[tuple[Any, ...]], Any]) -> Callable[[tuple[Any, ...]], Any]:
        return lambda row: value(marked(row))  # (the value is a plain int: scatter._plain)

    having = plan.having
    return replace(
        plan,
        having=None if having is None else (lambda row: having(marked(row))),
        computed=tuple(Computed(c.index, computing(c.value)) for c in plan.computed),
    )


def merge(plan: MergePlan, shards: Sequence[Iterable[Sequence[Any]]]) -> Iterator[tuple[Any, ...]]:
    """Combine the rows of ``shards`` (one iterable per shard) into the single-database answer.

    Each row is a sequence of column values as the shard returned it; every output row is a
    tuple of the plan's visible columns. Iterating raises ValueError when a shard's first row is
    too short for the plan (a planner bug: the shard query lacks a hidden column).
    """
    if plan.limit == 0 or plan.offset > sys.maxsize:
        # LIMIT 0 is empty whatever the shards hold (and no result has 2**63 rows to skip);
        # do not touch their cursors.
        return iter(())
    if plan.first is not None:
        # One row per (group, DISTINCT value) first: the shards' rows combined exactly.
        shards = [merge(plan.first, shards)]
    need = plan.columns_needed
    inputs = [_checked(rows, need, number) for number, rows in enumerate(shards)]
    rows = _grouped(plan, inputs, need) if plan.grouped else _streamed(plan, inputs)
    stop = None if plan.limit is None else plan.offset + plan.limit
    if stop is not None and stop > sys.maxsize:
        stop = None  # LIMIT 2**64-1: all the rest (islice takes no larger stop)
    # islice checks its stop before pulling, so no row past the last one needed is read.
    # C-level map/islice: no Python frame per row (a LIMIT 20 scatter is ~25 rows).
    visible = operator.itemgetter(slice(None, _cut(plan)))
    kept: Iterator[Sequence[Any]] = itertools.islice(rows, plan.offset, stop)
    if plan.grouped and _computed_late(plan):
        kept = (_computed(plan, tuple(row)) for row in kept)
    return map(tuple, map(visible, kept))


def _cut(plan: MergePlan) -> int | None:
    """The slice end that keeps the visible columns (a negative one drops the hidden tail)."""
    if plan.width is not None:
        return plan.width
    return -plan.hidden if plan.hidden else None


def _checked(rows: Iterable[Sequence[Any]], need: int, number: int) -> Iterator[Sequence[Any]]:
    """The shard's rows, after checking that its first row holds every column the plan reads
    (rows of one result set all have the same length). The first row is read when the merge
    asks for it, the rest pass through without a Python frame per row."""
    iterator = iter(rows)

    def first() -> Iterator[Sequence[Any]]:
        for row in iterator:
            if len(row) < need:
                raise ValueError(
                    f"merge: shard {number} returned a row of {len(row)} columns but the plan"
                    f" reads {need}; the shard query must select the hidden sort, group and AVG"
                    " columns"
                )
            yield row
            break

    return itertools.chain(first(), iterator)


def _streamed(plan: MergePlan, inputs: list[Iterator[Sequence[Any]]]) -> Iterator[Sequence[Any]]:
    rows: Iterator[Sequence[Any]]
    weights = plan.weight_of()
    if plan.order_by:
        # heapq.merge breaks ties by input order, so equal keys keep shard order (stable).
        key, reverse = ordering(plan.order_by, weights)
        rows = heapq.merge(*inputs, key=key, reverse=reverse)
    else:
        rows = itertools.chain.from_iterable(inputs)
    if plan.having is not None:
        # MySQL's HAVING without GROUP BY or aggregates filters rows like a WHERE.
        having = plan.having
        rows = (row for row in rows if having(tuple(row)))
    if plan.distinct:
        rows = _distinct(rows, _cut(plan), weights)
    return rows


def _too_long() -> UnsupportedQueryError:
    return UnsupportedQueryError(
        f"a string longer than {WEIGHT_CHARS} characters is ordered, grouped, deduplicated or"
        " compared across shards, where its collation sort key (WEIGHT_STRING) would be cut;"
        " route the query by a key, or order by a prefix (LEFT(x, 255))"
    )


def _comparable(value: Any, weight: Any) -> Any:
    """What the merge compares for a value: its collation weight, or itself (no weight)."""
    if weight is None:
        return value
    if weight:
        return weight
    raise _too_long()


def _getter(index: int, weights: Mapping[int, int]) -> Callable[[Sequence[Any]], Any]:
    """A function giving the comparable form of the value at ``index`` of a row."""
    weight = weights.get(index)
    if weight is None:
        return operator.itemgetter(index)

    def comparable(row: Sequence[Any]) -> Any:
        w = row[weight]
        if w is None:
            return row[index]
        if w:
            return w
        raise _too_long()

    return comparable


def _distinct(
    rows: Iterable[_Row], cut: int | None, weights: Mapping[int, int] | None = None
) -> Iterator[_Row]:
    """First occurrence of each distinct visible row, in input order, lazily."""
    seen: set[tuple[Any, ...]] = set()
    pairs = sorted((weights or {}).items())
    for row in rows:
        visible = list(row[:cut])
        for index, weight in pairs:
            if index < len(visible):
                visible[index] = _comparable(row[index], row[weight])
        key = tuple(visible)
        if key not in seen:
            seen.add(key)
            yield row


def _grouped(
    plan: MergePlan, inputs: list[Iterator[Sequence[Any]]], need: int
) -> Iterator[tuple[Any, ...]]:
    """Combine partial groups from every shard, then AVG, HAVING, DISTINCT and ORDER BY."""
    weights = plan.weight_of()
    combiners = {index: _COMBINE[func] for index, func in _partials(plan)}
    # MIN/MAX of strings compare by weight and carry the weight along with the value.
    paired: dict[int, tuple[int, bool]] = {}
    for agg in plan.aggregates:
        weight = weights.get(agg.index)
        if agg.func in ("min", "max") and weight is not None:
            paired[agg.index] = (weight, agg.func == "min")
            del combiners[agg.index]
    carried = {w for w, _ in paired.values()}
    getters = [_getter(i, weights) for i in plan.group_by]
    groups: dict[tuple[Any, ...], list[Any]] = {}
    pieces: dict[tuple[Any, ...], list[Sequence[Any]]] = {}
    """Every row of a group, when GROUP_CONCAT columns join them (_joined)."""
    rows: Iterable[Sequence[Any]] = itertools.chain.from_iterable(inputs)
    if plan.numbers or plan.exact:
        rows = _numeric(rows, plan.numbers, plan.exact)
    for row in rows:
        # Python's None == None puts every NULL key in one group, as SQL's GROUP BY does.
        key = tuple(get(row) for get in getters)
        if plan.concats:
            pieces.setdefault(key, []).append(row)
        state = groups.get(key)
        if state is None:
            groups[key] = list(row)
            continue
        for index, value in enumerate(row):
            combine = combiners.get(index)
            if combine is not None:
                state[index] = combine(state[index], value)
            elif index in paired:
                weight, smallest = paired[index]
                if _better(value, row[weight], state[index], state[weight], smallest):
                    state[index] = value
                    state[weight] = row[weight]
            elif state[index] is None and index not in carried:
                state[index] = value
    if not plan.group_by and not groups:
        # A global aggregate over no rows at all is still one row: COUNT 0, the rest NULL.
        groups[()] = [None] * need
    for key, state in groups.items():
        for concat in plan.concats:
            state[concat.index] = _joined(concat, pieces.get(key, ()), weights)
    merged: Iterable[tuple[Any, ...]] = (_finish(plan, state) for state in groups.values())
    if plan.having is not None:
        having = plan.having
        merged = (row for row in merged if having(row))
    if plan.computed and not _computed_late(plan):
        # After HAVING, as MySQL evaluates select items only for the groups it keeps (an
        # item's range error in a group HAVING drops is no error there).
        merged = (_computed(plan, row) for row in merged)
    if not plan.order_by and plan.group_by:
        # Without ORDER BY, MariaDB returns the groups sorted by the GROUP BY values (MySQL
        # 5.x's documented rule, which MariaDB keeps; MySQL 8 leaves the order undefined, so
        # this order is right there too): a LIMIT keeps the first groups in that order, and
        # DISTINCT the first group of each value.
        by_group = sort_key([SortKey(i) for i in plan.group_by], weights)
        merged = sorted(merged, key=by_group)
    if plan.distinct:
        merged = _distinct(merged, _cut(plan), weights)
    if plan.order_by:
        order, reverse = ordering(plan.order_by, weights)
        merged = sorted(merged, key=order, reverse=reverse)
    yield from merged


def _computed_late(plan: MergePlan) -> bool:
    """Whether the computed items wait for the LIMIT (merge): MySQL computes a select item
    only for the rows it sends, unless it orders or deduplicates by it (an item's range error
    in a group LIMIT drops is no error there)."""
    if not plan.computed or plan.distinct:
        return False
    at = {c.index for c in plan.computed}
    return not any(k.index in at for k in plan.order_by)


def _joined(
    concat: Concat, rows: Iterable[Sequence[Any]], weights: Mapping[int, int]
) -> str | bytes | None:
    """A group's GROUP_CONCAT from its rows' pieces: deduplicated (DISTINCT), ordered, joined
    and cut at ``group_concat_max_len`` bytes as MariaDB cuts it (not inside a character)."""
    found = [row for row in rows if row[concat.index] is not None]
    if not found:
        return None  # GROUP_CONCAT of no (non-NULL) value is NULL
    if concat.distinct:
        getters = [_getter(i, weights) for i in concat.distinct]
        seen: set[tuple[Any, ...]] = set()
        unique = []
        for row in found:
            seen_as = tuple(get(row) for get in getters)
            if seen_as not in seen:
                seen.add(seen_as)
                unique.append(row)
        found = unique
    order = concat.order_by or tuple(SortKey(i) for i in concat.distinct)
    if order:
        sort_by, reverse = ordering(order, weights)
        found.sort(key=sort_by, reverse=reverse)
    limit = found[0][concat.max_len]
    parts: list[Any] = []
    used = 0
    for n, row in enumerate(found):
        piece = row[concat.index]
        size = row[concat.length]
        if isinstance(piece, str) and size not in (len(piece), len(piece.encode())):
            # utf16, ucs2, sjis...: the separator's bytes there are not its characters.
            raise UnsupportedQueryError(
                "GROUP_CONCAT across shards of a character set that is neither one byte a"
                " character nor UTF-8: the merge cannot count its bytes for"
                " group_concat_max_len; CONVERT(x USING utf8mb4), or route by a key"
            )
        if n:
            if used + len(concat.separator) > limit:
                parts.append(concat.separator[: limit - used])
                break
            parts.append(concat.separator)
            used += len(concat.separator)
        if used + size <= limit:
            if size > limit - _CHAR_BYTES and n + 1 < len(found):
                # The shard may have cut this piece (short of the limit, not to split a
                # character), and then one database's list ends inside it: no telling.
                raise UnsupportedQueryError(
                    "GROUP_CONCAT across shards reaches group_concat_max_len inside one shard's"
                    " part of the list, which that shard may have cut; raise"
                    " group_concat_max_len, or route by a key"
                )
            parts.append(piece)
            used += size
            continue
        parts.append(_cut_piece(piece, size, limit - used))
        break
    if isinstance(found[0][concat.index], bytes | bytearray):
        return b"".join(p if isinstance(p, bytes | bytearray) else p.encode() for p in parts)
    return "".join(parts)


_CHAR_BYTES = 4
"""The longest character in bytes (utf8mb4): a shard cuts its piece at most this much short
of group_concat_max_len."""


def _cut_piece(piece: str | bytes, size: int, room: int) -> str | bytes:
    """The first ``room`` bytes of a piece of ``size`` bytes (in the shard's character set),
    without a partial character."""
    if isinstance(piece, bytes | bytearray):
        return piece[:room]
    if size == len(piece):  # one byte a character (latin1, ASCII text)
        return piece[:room]
    if size == len(piece.encode()):  # UTF-8
        return piece.encode()[:room].decode(errors="ignore")
    raise UnsupportedQueryError(
        "GROUP_CONCAT across shards is cut at group_concat_max_len inside a value of a"
        " multi-byte character set other than UTF-8, where the merge cannot find the character"
        " boundary; raise group_concat_max_len, or route by a key"
    )


_NOT_A_NUMBER = (str, bytes, bytearray, float, dt.date, dt.time, dt.timedelta)


def _numeric(
    rows: Iterable[Sequence[Any]], numbers: tuple[int, ...], exact: tuple[int, ...]
) -> Iterator[Sequence[Any]]:
    """``rows``, refusing what MergePlan.numbers and MergePlan.exact exclude."""
    for row in rows:
        for p in numbers:
            if isinstance(row[p], _NOT_A_NUMBER):
                kind = "string" if isinstance(row[p], str | bytes | bytearray) else "float"
                if isinstance(row[p], dt.date | dt.time | dt.timedelta):
                    kind = "date or time"
                raise UnsupportedQueryError(
                    f"SUM/AVG(DISTINCT x) across shards where x is a {kind}"
                    f" ({row[p]!r}): MariaDB deduplicates and adds the numbers it converts to,"
                    " the merge would deduplicate the values; SUM(DISTINCT x) of an integer or"
                    " DECIMAL (CAST), or route by a key"
                )
        for p in exact:
            if isinstance(row[p], float):
                raise UnsupportedQueryError(
                    f"COUNT/SUM/AVG(DISTINCT x) across shards where x is a float ({row[p]!r}):"
                    " a FLOAT reaches the router in 6 digits, so values the shards tell apart"
                    " would merge; CAST(x AS DECIMAL(...)), or route by a key"
                )
        yield row


def _better(value: Any, weight: Any, best: Any, best_weight: Any, smallest: bool) -> bool:
    """Whether a MIN (``smallest``) or MAX partial beats the best so far; NULLs never do."""
    if value is None:
        return False
    if best is None:
        return True
    a, b = _comparable(value, weight), _comparable(best, best_weight)
    return bool(a < b) if smallest else bool(a > b)


def _finish(plan: MergePlan, state: list[Any]) -> tuple[Any, ...]:
    for agg in plan.aggregates:
        if agg.func == "count" and state[agg.index] is None:
            state[agg.index] = 0
    # Read every partial before writing any AVG: an AVG usually replaces its own SUM partial.
    values = [
        (avg.index, average(state[avg.sum_index], state[avg.count_index])) for avg in plan.averages
    ]
    for index, value in values:
        state[index] = value
    return tuple(state)


def _computed(plan: MergePlan, row: tuple[Any, ...]) -> tuple[Any, ...]:
    """``row`` with its computed items: each reads partials and AVGs, not the others."""
    state = list(row)
    for item in plan.computed:
        state[item.index] = item.value(row)
    return tuple(state)


def _add(total: Any, partial: Any) -> Any:
    if total is None:
        return partial
    if partial is None:
        return total
    return total + partial


def _least(best: Any, partial: Any) -> Any:
    if best is None or (partial is not None and partial < best):
        return partial
    return best


def _greatest(best: Any, partial: Any) -> Any:
    if best is None or (partial is not None and partial > best):
        return partial
    return best


# COUNT and SUM combine alike; COUNT's NULL (no partial at all) becomes 0 in _finish.
_COMBINE: dict[str, Callable[[Any, Any], Any]] = {
    "count": _add,
    "sum": _add,
    "min": _least,
    "max": _greatest,
}


class Unrounded(Decimal):
    """A DECIMAL inside an expression over aggregates: MySQL keeps a quotient (``/``, AVG) at
    more digits than it shows (``SELECT 1/3*3`` is 1.0000, not 0.9999) and rounds to
    ``scale``, its result's scale, only when the value leaves the expression (``shown``)."""

    scale: int

    def __new__(cls, value: Any, scale: int) -> Unrounded:
        made = super().__new__(cls, value)
        made.scale = scale
        return made


def scale_of(value: Any) -> int:
    """The scale MySQL gives an exact number: digits after the point (0 for an integer)."""
    if isinstance(value, Unrounded):
        return value.scale
    if isinstance(value, Decimal) and value.is_finite():
        exponent = value.as_tuple().exponent
        return max(0, -exponent) if isinstance(exponent, int) else 0
    return 0


def shown(value: Any) -> Any:
    """``value`` as it leaves an expression: an Unrounded rounded (half away from zero) to its
    scale, a plain Decimal; a zero without its sign (MariaDB has no -0); anything else as it
    is."""
    if isinstance(value, Unrounded):
        with localcontext() as context:
            context.prec = 200
            value = Decimal(value).quantize(
                Decimal(1).scaleb(-min(value.scale, MAX_SCALE)), rounding=ROUND_HALF_UP
            )
    if isinstance(value, Decimal | float) and value == 0:
        return abs(value)  # Decimal('-0.00') -> Decimal('0.00'), -0.0 -> 0.0
    return value


MAX_SCALE = 38
"""MariaDB's largest DECIMAL scale (DECIMAL_MAX_SCALE)."""


def quotient(x: Any, y: Any) -> Unrounded:
    """MariaDB's DECIMAL ``x / y`` (exact x, y; y not 0) as an expression keeps it: cut off
    (not rounded) after a whole number of 9-digit words, enough for the operands' digits plus
    div_precision_increment (decimal_div: ``COUNT(*)/7/7*49`` is 43.99999999 for 44 rows), and
    shown at the dividend's scale plus 4."""
    digits = _digits(x) + _digits(y) + AVG_SCALE_INCREMENT
    words = -(-digits // 9) * 9
    with localcontext() as context:
        context.prec = 200
        exact = Decimal(x) / Decimal(y)
        cut = exact.quantize(Decimal(1).scaleb(-words), rounding=ROUND_DOWN)
    return Unrounded(cut, scale_of(x) + AVG_SCALE_INCREMENT)


def _digits(value: Any) -> int:
    """Digits after the point a number holds (an Unrounded: all it keeps, not its scale)."""
    if isinstance(value, Decimal) and value.is_finite():
        exponent = value.as_tuple().exponent
        return max(0, -exponent) if isinstance(exponent, int) else 0
    return 0


def inner_average(total: Any, count: Any) -> Any:
    """AVG inside an expression: the quotient as MariaDB keeps it (``quotient``: the sum's
    scale plus 4 shown); ``average`` is the same value as a column shows it."""
    if total is None or count is None or count == 0:
        return None
    if isinstance(total, float):
        return total / count
    return quotient(total, int(count))


def average(total: Any, count: Any) -> Any:
    """MySQL's AVG from a total sum and a total count: ``NULL`` when the count is 0 or the sum
    ``NULL``; a float for a float sum; otherwise a Decimal with the sum's scale plus 4 digits,
    rounded half away from zero (``average(3, 2) == Decimal('1.5000')``)."""
    if total is None or count is None or count == 0:
        return None
    if isinstance(total, float):
        return total / count
    if isinstance(total, int) and not isinstance(total, bool):
        total = Decimal(total)
    if not isinstance(total, Decimal) or not total.is_finite():
        return total / count
    # Exact integer arithmetic: Decimal division would round to the context precision first,
    # and rounding twice can land on the wrong side of a half.
    sign, digits, exponent = total.as_tuple()
    assert isinstance(exponent, int)  # finite, checked above
    scale = max(0, -exponent) + AVG_SCALE_INCREMENT
    coefficient = int("".join(map(str, digits)) or "0")
    numerator = coefficient * 10 ** (exponent + scale)  # exponent + scale >= 4 > 0
    quotient, remainder = divmod(numerator, int(count))
    if 2 * remainder >= int(count):
        quotient += 1
    return Decimal(f"{'-' if sign and quotient else ''}{quotient}E-{scale}")


class _Descending:
    """A value that orders in reverse, for DESC keys over any comparable type (str, bytes,
    Decimal, datetime), where negating the value is not an option."""

    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Descending) and bool(self.value == other.value)

    def __lt__(self, other: _Descending) -> bool:
        return bool(other.value < self.value)

    __hash__ = None  # type: ignore[assignment]


_NO_WEIGHTS: Mapping[int, int] = {}


def ordering(
    order_by: Sequence[SortKey], weights: Mapping[int, int] = _NO_WEIGHTS
) -> tuple[Callable[[Sequence[Any]], tuple[Any, ...]], bool]:
    """(key, reverse) for sorted() and heapq.merge(). When every term has the same direction,
    an all-DESC order is the ascending key reversed (NULLs, the smallest, then come last, as
    in MySQL), which spares a wrapper object per value; mixed directions use sort_key."""
    if all(k.descending for k in order_by):
        ascending = [SortKey(k.index, False) for k in order_by]
        return sort_key(ascending, weights), True
    return sort_key(order_by, weights), False


def sort_key(
    order_by: Sequence[SortKey], weights: Mapping[int, int] = _NO_WEIGHTS
) -> Callable[[Sequence[Any]], tuple[Any, ...]]:
    """A key function ordering rows as MySQL's ORDER BY does, NULLs included, comparing a
    value's collation weight where ``weights`` has one.

    Each term contributes a flag and a value: ascending puts NULL (flag 0) before values
    (flag 1), descending puts values (flag 0, reversed) before NULL (flag 1). Equal flags mean
    both NULL or both not, so a value is never compared with NULL.
    """
    terms = tuple((_getter(key.index, weights), key.descending) for key in order_by)
    if len(terms) == 1 and not terms[0][1]:
        ((get, _),) = terms

        def one(row: Sequence[Any]) -> tuple[Any, ...]:
            value = get(row)
            return (0, None) if value is None else (1, value)

        return one

    def key(row: Sequence[Any]) -> tuple[Any, ...]:
        parts: list[Any] = []
        for get, descending in terms:
            value = get(row)
            if value is None:
                parts += (1, None) if descending else (0, None)
            elif descending:
                parts += (0, _Descending(value))
            else:
                parts += (1, value)
        return tuple(parts)

    return key
