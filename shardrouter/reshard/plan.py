"""Resharding plans: which slot ranges move from which shard to which, and the topology
documents the workflow pushes for each step (pure: no I/O, no database).

A plan is made from the current version's raw document (``${VAR}`` kept, as the meta store
holds it) by one of three planners:

- :func:`plan_to`: a proposed topology that differs from the current one only by slot
  ownership and added shards (``shardctl reshard plan --to F``);
- :func:`plan_split`: one shard's slots divided into contiguous parts, as equal as possible,
  among itself and new shards (``--split``);
- :func:`plan_move`: one slot range given to one shard (``--move``). A range owned by several
  shards is split per owner: one move from each of them (slots the target already owns stay).

Each planner validates the documents with ``config_from_dict`` (in ``env``: os.environ by
default, as ``control.versions.version_config`` does) and raises ReshardPlanError listing
every problem with its way out.

:meth:`ReshardPlan.document` gives the document of each stage (docs/RESHARDING.md, "Versions
and write modes"); it never contains ``version``: the store numbers versions. It can be
applied to another base than the plan's own ``before`` (the current version when another
migration pushed since): it only touches the moved ranges' owners, the new shards and this
migration's own ``moving`` entries.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..control.versions import normalise
from ..core.config import DEFAULT_SLOTS, TopologyConfig, config_from_dict, safe_url
from ..errors import ConfigError, ReshardPlanError

Stage = Literal["prepare", "copy", "frozen", "switched", "final", "rolled_back", "frozen_back"]
STAGES: tuple[Stage, ...] = get_args(Stage)

PLAN_FORMAT = 1
"""The version of :meth:`ReshardPlan.as_dict`'s layout, stored with each migration."""

_MIGRATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")

# Stages before the switch: the sources own (are the authority of) the moved ranges.
_SOURCE_OWNS: frozenset[str] = frozenset({"prepare", "copy", "frozen", "rolled_back"})
_WRITE_MODE = {
    "copy": "dual_old_primary",
    "frozen": "frozen",
    "frozen_back": "frozen",
    "switched": "dual_new_primary",
}
_PUSH_SEPARATELY = "change it with `shardctl topology push` before or after the migration"


@dataclass(frozen=True, slots=True)
class Move:
    """Slots ``[start, end)`` moving from shard ``source`` to shard ``target``."""

    slots: tuple[int, int]
    source: str
    target: str

    @property
    def size(self) -> int:
        return self.slots[1] - self.slots[0]

    def as_dict(self) -> dict[str, Any]:
        return {"slots": list(self.slots), "source": self.source, "target": self.target}

    def __str__(self) -> str:
        start, end = self.slots
        return f"slots [{start}, {end}) ({self.size}) {self.source} -> {self.target}"


@dataclass(frozen=True)
class ReshardPlan:
    """What a migration moves, and from which version.

    ``before`` is the raw document of the base version (normalised: JSON types, no
    ``version``); ``after`` the final one (every moved range owned by its target, the new
    shards defined, no ``moving`` entry of this migration). ``moves`` are maximal contiguous
    ranges per (source, target), sorted by slot."""

    migration_id: str
    base_version: int
    before: dict[str, Any]
    after: dict[str, Any]
    moves: tuple[Move, ...]
    new_shards: tuple[str, ...]
    sharded_tables: tuple[str, ...]
    broadcast_tables: tuple[str, ...]

    # -- derived ------------------------------------------------------------------------------

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(sorted({m.source for m in self.moves}))

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted({m.target for m in self.moves}))

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Every moved range, sorted (for overlap checks and the slot filter)."""
        return tuple(m.slots for m in self.moves)

    @property
    def slot_count(self) -> int:
        return sum(m.size for m in self.moves)

    def overlaps(self, other: ReshardPlan) -> list[tuple[Move, Move]]:
        """The pairs of moves of this plan and ``other`` sharing a slot."""
        return [
            (a, b)
            for a in self.moves
            for b in other.moves
            if a.slots[0] < b.slots[1] and b.slots[0] < a.slots[1]
        ]

    # -- documents ----------------------------------------------------------------------------

    def document(
        self,
        stage: Stage,
        hold_s: float = 2.0,
        *,
        base: Mapping[str, Any] | None = None,
        shadow_percent: int = 0,
    ) -> dict[str, Any]:
        """The raw topology document of ``stage`` (without ``version``):

        - ``prepare``: the new shards added with ``slots: []``, nothing else changes;
        - ``copy``: prepare plus one ``moving`` entry per move in ``dual_old_primary``;
        - ``frozen``: the same in ``frozen``, with ``hold_s``;
        - ``switched``: every moved range owned by its target, ``dual_new_primary``;
        - ``final``: switched without the moving entries (``after``);
        - ``rolled_back``: the prepare document (the sources own everything again);
        - ``frozen_back``: switched, in ``frozen`` (a rollback after the switch freezes the
          ranges where the targets own them, then gives them back).

        ``shadow_percent`` (``copy`` only): the share of the moving slots whose reads the
        routers also run on the target and compare (engine.shadow).

        ``base`` (default: ``before``) is the document to apply the stage to, e.g. the current
        version when another migration pushed since this plan was made: only the moved
        ranges' owners, the new shards and this migration's ``moving`` entries change."""
        if stage not in STAGES:
            raise ReshardPlanError(f"unknown stage {stage!r} (known: {', '.join(STAGES)})")
        if not 0 < hold_s <= 60:
            raise ReshardPlanError(
                f"hold_s {hold_s:g} is outside (0, 60]: routers hold a frozen write that long"
                " at most; give a few seconds (the switch budget is well below it)"
            )
        doc = normalise(self.before if base is None else base)
        shards: dict[str, Any] = doc.setdefault("shards", {})
        for name in self.new_shards:
            if name not in shards:
                definition = dict(self.after["shards"][name])
                definition["slots"] = []
                shards[name] = definition
        _give(doc, self.moves, to_source=stage in _SOURCE_OWNS)
        moving = [m for m in doc.get("moving") or [] if m.get("migration") != self.migration_id]
        mode = _WRITE_MODE.get(stage)
        if mode is not None:
            for move in self.moves:
                entry: dict[str, Any] = {
                    "slots": list(move.slots),
                    "source": move.source,
                    "target": move.target,
                    "write_mode": mode,
                    "migration": self.migration_id,
                }
                if mode == "frozen":
                    entry["hold_s"] = hold_s
                if shadow_percent and stage == "copy":
                    entry["shadow_percent"] = shadow_percent
                moving.append(entry)
            moving.sort(key=lambda m: tuple(m["slots"]))
        if moving:
            doc["moving"] = moving
        else:
            doc.pop("moving", None)
        return doc

    def documents(self, hold_s: float = 2.0) -> dict[Stage, dict[str, Any]]:
        """Every stage's document, from ``before``."""
        return {stage: self.document(stage, hold_s) for stage in STAGES}

    # -- serialisation ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able form (stored with the migration); :meth:`from_dict` reads it back."""
        return {
            "format": PLAN_FORMAT,
            "migration_id": self.migration_id,
            "base_version": self.base_version,
            "moves": [m.as_dict() for m in self.moves],
            "new_shards": list(self.new_shards),
            "sharded_tables": list(self.sharded_tables),
            "broadcast_tables": list(self.broadcast_tables),
            "before": copy.deepcopy(self.before),
            "after": copy.deepcopy(self.after),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReshardPlan:
        """The plan of :meth:`as_dict`; ReshardPlanError naming what is missing or wrong (a
        stored plan changed outside shardctl, or written by a newer release)."""
        try:
            fmt = data.get("format")
            if fmt != PLAN_FORMAT:
                raise ReshardPlanError(
                    f"stored plan format {fmt!r} is not {PLAN_FORMAT}: written by another"
                    " release of shardrouter; use that release to resume or cancel it"
                )
            moves = tuple(
                Move(
                    (_int(m["slots"][0]), _int(m["slots"][1])),
                    _str(m["source"]),
                    _str(m["target"]),
                )
                for m in data["moves"]
            )
            before, after = data["before"], data["after"]
            if not isinstance(before, dict) or not isinstance(after, dict):
                raise TypeError("before and after must be objects")
            return cls(
                migration_id=_str(data["migration_id"]),
                base_version=_int(data["base_version"]),
                before=normalise(before),
                after=normalise(after),
                moves=moves,
                new_shards=tuple(_str(s) for s in data["new_shards"]),
                sharded_tables=tuple(_str(s) for s in data["sharded_tables"]),
                broadcast_tables=tuple(_str(s) for s in data["broadcast_tables"]),
            )
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
            raise ReshardPlanError(
                f"stored plan is malformed ({type(exc).__name__}: {exc}); it was changed"
                " outside shardctl: plan the migration again"
            ) from None

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), sort_keys=True)

    # -- for humans ---------------------------------------------------------------------------

    def describe(self) -> list[str]:
        """Lines for ``shardctl reshard plan/status`` (URLs with their passwords masked)."""
        total = _slot_total(self.before)
        lines = [
            f"migration {self.migration_id} from version {self.base_version}:"
            f" {self.slot_count} of {total} slots move in {len(self.moves)} range(s)"
        ]
        for name in self.new_shards:
            primary = self.after["shards"][name].get("primary", "?")
            lines.append(f"  new shard {name}: {safe_url(str(primary))}")
        lines += [f"  move {m}" for m in self.moves]
        for name in sorted({*self.sources, *self.targets}):
            was = _ranges_text(_owned(self.before, name))
            now = _ranges_text(_owned(self.after, name))
            lines.append(f"  {name}: {was} -> {now}")
        lines.append(f"  sharded tables: {', '.join(self.sharded_tables) or 'none'}")
        if self.broadcast_tables:
            copied = " (copied to the new shards)" if self.new_shards else ""
            lines.append(f"  broadcast tables: {', '.join(self.broadcast_tables)}{copied}")
        return lines


# -- planners -----------------------------------------------------------------------------------


def new_migration_id(base_version: int) -> str:
    """A short, readable, unique id: ``m<base version>-<6 hex digits>``."""
    return f"m{base_version}-{secrets.token_hex(3)}"


def plan_to(
    current_doc: Mapping[str, Any],
    proposed_doc: Mapping[str, Any],
    *,
    base_version: int,
    migration_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ReshardPlan:
    """The plan that takes the current topology to ``proposed_doc``, which may differ from it
    only by slot ownership and added shards (every other difference is refused, named, since
    the migration's documents are built from the current one and would drop it)."""
    before, after_raw = normalise(current_doc), normalise(proposed_doc)
    problems = _id_problems(migration_id) + _only_placement_differs(before, after_raw)
    old = _validate("current topology", before, env, problems)
    new = _validate("proposed topology", after_raw, env, problems)
    if old is None or new is None or problems:
        raise ReshardPlanError(problems)
    owners_before, owners_after = _owners(old), _owners(new)
    moves = moves_between(owners_before, owners_after)
    if not moves:
        raise ReshardPlanError(
            "nothing moves: the proposed topology gives every slot to the shard that owns it"
            f" now ({_PUSH_SEPARATELY.replace('change it', 'push other changes')})"
        )
    added = {n: after_raw["shards"][n] for n in after_raw["shards"] if n not in before["shards"]}
    return _finish(before, moves, added, base_version, migration_id, env)


def plan_split(
    current_doc: Mapping[str, Any],
    shard: str,
    into: Sequence[str],
    new_shards: Mapping[str, Mapping[str, Any]],
    *,
    base_version: int,
    migration_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ReshardPlan:
    """Split ``shard``'s slots into ``len(into)`` contiguous parts (in slot order, as equal as
    possible: the first ``n % k`` parts one slot larger). ``shard`` keeps the first part if it
    is in ``into``; the others go, in order, to the other names of ``into``: new shards
    (defined in ``new_shards``, e.g. the ``shards:`` of ``--config F``; other entries there
    are ignored) or existing ones."""
    before = normalise(current_doc)
    problems = _id_problems(migration_id)
    old = _validate("current topology", before, env, problems)
    if old is None:
        raise ReshardPlanError(problems)
    names = list(into)
    if shard not in old.shards:
        problems.append(f"--split {shard}: no such shard (known: {', '.join(old.shards)})")
    elif not old.shards[shard].slots:
        problems.append(f"--split {shard}: it owns no slots; there is nothing to split")
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"--into: {', '.join(duplicates)} named twice; name each shard once")
    if not [n for n in names if n != shard]:
        problems.append(
            f"--into: names no shard besides {shard}; name the new shards to split it into"
            f" (e.g. --into {shard},{shard}b)"
        )
    added = _new_definitions(names, old, before["shards"], new_shards, "--into", problems)
    if problems:
        raise ReshardPlanError(problems)
    slots = [s for start, end in sorted(old.shards[shard].slots) for s in range(start, end)]
    parts = len(names)
    if len(slots) < parts:
        raise ReshardPlanError(
            f"--into: {shard} owns {len(slots)} slot(s), too few for {parts} parts; name at"
            f" most {len(slots)} shards"
        )
    order = ([shard] if shard in names else []) + [n for n in names if n != shard]
    after = _owners(old)
    size, extra = divmod(len(slots), parts)
    at = 0
    for i, name in enumerate(order):
        count = size + (1 if i < extra else 0)
        for slot in slots[at : at + count]:
            after[slot] = name
        at += count
    moves = moves_between(_owners(old), after)
    return _finish(before, moves, added, base_version, migration_id, env)


def plan_move(
    current_doc: Mapping[str, Any],
    slots: tuple[int, int],
    to: str,
    new_shards: Mapping[str, Mapping[str, Any]],
    *,
    base_version: int,
    migration_id: str | None = None,
    env: Mapping[str, str] | None = None,
) -> ReshardPlan:
    """Give slots ``[start, end)`` to shard ``to`` (existing, or new and defined in
    ``new_shards``). A range owned by several shards becomes one move from each (split per
    owner); slots ``to`` owns already stay where they are. Refused when ``to`` owns all of
    it."""
    before = normalise(current_doc)
    problems = _id_problems(migration_id)
    old = _validate("current topology", before, env, problems)
    if old is None:
        raise ReshardPlanError(problems)
    start, end = slots
    if not 0 <= start < end <= old.slots:
        problems.append(
            f"--move: [{start}, {end}) is not a slot range in [0, {old.slots}) (write START:END"
            " with START < END)"
        )
    added = _new_definitions([to], old, before["shards"], new_shards, "--to", problems)
    if problems:
        raise ReshardPlanError(problems)
    owners = _owners(old)
    if all(owners[s] == to for s in range(start, end)):
        raise ReshardPlanError(f"--move: {to} owns [{start}, {end}) already; nothing moves")
    after = list(owners)
    after[start:end] = [to] * (end - start)
    moves = moves_between(owners, after)
    return _finish(before, moves, added, base_version, migration_id, env)


# -- slot arithmetic ------------------------------------------------------------------------------


def moves_between(before: Sequence[str], after: Sequence[str]) -> tuple[Move, ...]:
    """Every slot whose owner changes, as maximal contiguous ranges per (source, target),
    sorted by slot. ``before`` and ``after`` give each slot's owner."""
    if len(before) != len(after):
        raise ReshardPlanError(
            f"the slot counts differ ({len(before)} and {len(after)}): the slot count is fixed"
            " for the life of a cluster"
        )
    out: list[Move] = []
    start = 0
    total = len(before)
    for slot in range(1, total + 1):
        if slot < total and (before[slot], after[slot]) == (before[start], after[start]):
            continue
        if before[start] != after[start]:
            out.append(Move((start, slot), before[start], after[start]))
        start = slot
    return tuple(out)


def apply_moves(owners: Sequence[str], moves: Iterable[Move]) -> list[str]:
    """``owners`` (each slot's shard) with every move applied; ReshardPlanError when a move's
    range is not owned by its source."""
    out = list(owners)
    for move in moves:
        start, end = move.slots
        wrong = sorted({out[s] for s in range(start, end)} - {move.source})
        if wrong:
            raise ReshardPlanError(
                f"move {move}: part of the range is owned by {', '.join(wrong)}, not by"
                f" {move.source}"
            )
        out[start:end] = [move.target] * (end - start)
    return out


def owners_of(document: Mapping[str, Any]) -> list[str]:
    """Each slot's owner in a raw document (``""`` for a slot no shard owns)."""
    owner = [""] * _slot_total(document)
    for name, shard in (document.get("shards") or {}).items():
        for start, end in _raw_ranges(shard):
            owner[start:end] = [name] * (end - start)
    return owner


def canonical(document: Mapping[str, Any]) -> dict[str, Any]:
    """``document`` normalised with every shard's slot ranges merged and sorted and the
    moving entries sorted: two documents equal after this place every slot alike."""
    doc = normalise(document)
    for shard in (doc.get("shards") or {}).values():
        if isinstance(shard, dict) and "slots" in shard:
            shard["slots"] = [list(r) for r in merge_ranges(_raw_ranges(shard))]
    if doc.get("moving"):
        doc["moving"] = sorted(doc["moving"], key=lambda m: tuple(m["slots"]))
    return doc


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Ranges sorted, overlapping and adjacent ones merged."""
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _give(doc: dict[str, Any], moves: Sequence[Move], *, to_source: bool) -> None:
    """Make each move's range owned by its source (or target), rewriting only the slot lists
    of shards whose owned slots change (merged, sorted); the others stay as written."""
    owners = owners_of(doc)
    wanted = list(owners)
    for move in moves:
        start, end = move.slots
        wanted[start:end] = [move.source if to_source else move.target] * (end - start)
    changed = {owners[s] for s in range(len(owners)) if owners[s] != wanted[s]}
    changed |= {wanted[s] for s in range(len(owners)) if owners[s] != wanted[s]}
    changed.discard("")
    missing = sorted(changed - set(doc["shards"]))
    if missing:
        raise ReshardPlanError(
            f"the base document has no shard {', '.join(missing)} that this migration moves"
            " slots between; it was removed since the plan was made: roll back or cancel"
        )
    for name in changed:
        doc["shards"][name]["slots"] = [list(r) for r in _runs(wanted, name)]


def _runs(owners: Sequence[str], name: str) -> list[tuple[int, int]]:
    """The maximal ranges of slots ``name`` owns."""
    out: list[tuple[int, int]] = []
    for slot, owner in enumerate(owners):
        if owner != name:
            continue
        if out and out[-1][1] == slot:
            out[-1] = (out[-1][0], slot + 1)
        else:
            out.append((slot, slot + 1))
    return out


def _owners(config: TopologyConfig) -> list[str]:
    owner = [""] * config.slots
    for name, shard in config.shards.items():
        for start, end in shard.slots:
            owner[start:end] = [name] * (end - start)
    return owner


def _raw_ranges(shard: Any) -> list[tuple[int, int]]:
    if not isinstance(shard, Mapping):
        return []
    return [(int(r[0]), int(r[1])) for r in shard.get("slots") or []]


def _owned(document: Mapping[str, Any], name: str) -> list[tuple[int, int]]:
    return merge_ranges(_raw_ranges((document.get("shards") or {}).get(name)))


def _slot_total(document: Mapping[str, Any]) -> int:
    return int(document.get("slots", DEFAULT_SLOTS))


def _ranges_text(ranges: Sequence[tuple[int, int]]) -> str:
    return ", ".join(f"[{s}, {e})" for s, e in ranges) or "none"


# -- checks ---------------------------------------------------------------------------------------


def _id_problems(migration_id: str | None) -> list[str]:
    if migration_id is None or _MIGRATION_ID.fullmatch(migration_id):
        return []
    return [
        f"migration id {migration_id!r}: use 1-64 letters, digits, '_' or '-' (or let the"
        " planner make one)"
    ]


def _validate(
    what: str, document: dict[str, Any], env: Mapping[str, str] | None, problems: list[str]
) -> TopologyConfig | None:
    try:
        return config_from_dict(document, source=what, env=env)
    except ConfigError as exc:
        problems += [f"{what}: {p}" for p in exc.problems]
        return None


def _only_placement_differs(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Every difference between the two raw documents other than slot ownership and added
    shards, each with its way out."""
    problems: list[str] = []
    if before.get("slots", DEFAULT_SLOTS) != after.get("slots", DEFAULT_SLOTS):
        problems.append(
            f"slots: {before.get('slots', DEFAULT_SLOTS)} -> {after.get('slots', DEFAULT_SLOTS)}:"
            " the slot count is fixed for the life of a cluster (every key's slot and every"
            " id's gene depend on it); keep it"
        )
    for key in sorted({*before, *after} - {"version", "slots", "shards", "moving"}):
        for path in _differences(before.get(key), after.get(key), key):
            what = (
                "the migration copies rows under the current table rules"
                if key == "tables"
                else "a migration only moves slots"
            )
            problems.append(f"{path} differs from the current version: {what}; {_PUSH_SEPARATELY}")
    if after.get("moving") and after.get("moving") != before.get("moving"):
        problems.append(
            "moving: the proposed topology lists moving ranges; remove them (the migration"
            " writes its own)"
        )
    old_shards = before.get("shards") or {}
    new_shards = after.get("shards") or {}
    if not isinstance(old_shards, dict) or not isinstance(new_shards, dict):
        return problems  # validation names it
    for name, shard in old_shards.items():
        if name not in new_shards:
            owned = _ranges_text(merge_ranges(_raw_ranges(shard)))
            if _raw_ranges(shard):
                problems.append(
                    f"shards.{name} removed, but it owns slots {owned}: keep it in the proposed"
                    f" file with `slots: []` (its slots move away), then remove the empty shard"
                    " with `shardctl topology push` after the migration is finalized"
                )
            else:
                problems.append(
                    f"shards.{name} removed: it owns no slots, so nothing moves; keep it here"
                    " and remove it with `shardctl topology push`"
                )
            continue
        was, now = dict(shard), dict(new_shards[name])
        was.pop("slots", None)
        now.pop("slots", None)
        for path in _differences(was, now, f"shards.{name}"):
            if path.endswith((".primary", ".replicas")) or ".replicas[" in path:
                reason = (
                    "a migration copies rows between the shards' current databases and does"
                    " not re-point a shard; keep the URL and re-point it with `shardctl"
                    " topology push` before or after the migration"
                )
            else:
                reason = f"a migration only moves slots; {_PUSH_SEPARATELY}"
            problems.append(f"{path} differs from the current version: {reason}")
    return problems


def _differences(a: Any, b: Any, path: str) -> Iterator[str]:
    """The paths where two JSON values differ (values never shown: they may hold secrets)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted({*a, *b}, key=str):
            yield from _differences(a.get(key), b.get(key), f"{path}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _differences(x, y, f"{path}[{i}]")
    elif a != b:
        yield path


def _new_definitions(
    names: Sequence[str],
    old: TopologyConfig,
    before_shards: Mapping[str, Any],
    new_shards: Mapping[str, Mapping[str, Any]],
    flag: str,
    problems: list[str],
) -> dict[str, dict[str, Any]]:
    """The raw definitions of the names not in the current topology (from ``new_shards``);
    a definition given for an existing shard must not change it."""
    out: dict[str, dict[str, Any]] = {}
    for name in names:
        given = new_shards.get(name)
        if name in old.shards:
            current = _url_of(before_shards.get(name))
            if given is not None and _url_of(given) not in (None, current):
                problems.append(
                    f"{flag} {name}: it exists already, with another primary than --config"
                    " gives; a migration does not re-point a shard (use `shardctl topology"
                    " push`), or name a new shard"
                )
            continue
        if given is None:
            problems.append(
                f"{flag} {name}: a new shard, but no definition of it was given; define it"
                f" under shards.{name} (primary: ...) in the file passed with --config"
            )
        elif not isinstance(given, Mapping):
            problems.append(f"{flag} {name}: its definition is not a mapping (primary: ...)")
        else:
            out[name] = normalise(given)
    return out


def _url_of(definition: Any) -> str | None:
    if isinstance(definition, Mapping):
        url = definition.get("primary")
        return str(url) if url is not None else None
    return None


def _finish(
    before: dict[str, Any],
    moves: tuple[Move, ...],
    added: Mapping[str, Mapping[str, Any]],
    base_version: int,
    migration_id: str | None,
    env: Mapping[str, str] | None,
) -> ReshardPlan:
    """The plan of ``moves`` from ``before``, its ``after`` built and every stage's document
    validated (a problem there is a bug or a bad new shard definition: refused, named)."""
    after = normalise(before)
    after.pop("moving", None)
    new_names = tuple(sorted(added))
    for name in new_names:
        definition = dict(added[name])
        definition["slots"] = []
        after["shards"][name] = definition
    # `before` may carry other migrations' moving entries: the final document keeps them.
    if before.get("moving"):
        after["moving"] = copy.deepcopy(before["moving"])
    _give(after, moves, to_source=False)
    problems: list[str] = []
    for entry in before.get("moving") or []:
        a, b = entry.get("slots", (0, 0))
        for move in moves:
            if move.slots[0] < b and a < move.slots[1]:
                problems.append(
                    f"move {move}: slots [{a}, {b}) are moving already (migration"
                    f" {entry.get('migration') or 'unnamed'}, {entry.get('source')} ->"
                    f" {entry.get('target')}); finish or cancel that migration first"
                )
    if problems:
        raise ReshardPlanError(problems)
    config = _validate("resulting topology", after, env, problems)
    if config is None:
        raise ReshardPlanError(problems)
    tables = config.tables
    plan = ReshardPlan(
        migration_id=migration_id or new_migration_id(base_version),
        base_version=base_version,
        before=before,
        after=after,
        moves=moves,
        new_shards=new_names,
        sharded_tables=tuple(sorted(n for n, t in tables.items() if not t.broadcast)),
        broadcast_tables=tuple(sorted(n for n, t in tables.items() if t.broadcast)),
    )
    for stage in STAGES:
        _validate(f"the {stage} document", plan.document(stage), env, problems)
    if problems:
        raise ReshardPlanError(problems)
    return plan


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not an integer")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a string")
    return value


__all__ = [
    "PLAN_FORMAT",
    "STAGES",
    "Move",
    "ReshardPlan",
    "Stage",
    "apply_moves",
    "canonical",
    "merge_ranges",
    "moves_between",
    "new_migration_id",
    "owners_of",
    "plan_move",
    "plan_split",
    "plan_to",
]
