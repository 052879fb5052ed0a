"""The changes between two topology versions, each judged safe live or refused (pure, no I/O).

``diff_topologies(old, new)`` compares two validated :class:`TopologyConfig` (the current
version and a proposed one) field by field and returns one :class:`Change` per difference,
each with a human line (URLs masked) and a verdict:

- **safe live** (routers swap to it between statements, no data moves): a new table, a new
  shard that owns no slots yet, a shard removed that owned none, replica lists, pool settings,
  a primary re-pointed to another server (a failover: safe for shardrouter, but only the
  operator knows that the new server holds the shard's rows, so it asks for confirmation),
  new credentials or driver for the same database, slot ranges rewritten without changing
  their owner, the topology's name, ``ids.worker_id`` (the generator's own, leased from the
  store when one is configured), a lower ``ids.max_backward_ms``, the meta store's poll and
  lease settings;
- **refused**, with the reason and the way out: any change of slot ownership (``shardctl
  reshard``), the slot count, the id layout (epoch, bit widths) or a higher clock-step bound,
  any change to an existing table's rule (its rows are placed by it), removing a table or a
  shard that owns slots, moving or removing ``meta:``, and a database given to a shard (a
  primary re-pointed or added, a replica added) that another shard uses, in the proposed
  version or in the current one: that is not a failover but the data of another shard
  re-placed (two shards' primaries swapped re-place every slot of both).

Two URLs name one database when they reach the same server and database name
(``core.config.database_identity``): the driver, user, password and options are ignored,
``localhost``/``127.0.0.1``/``::1`` are one host, an absent port is 3306; host names are not
resolved (a name and its IP address compare different).

The classification is an allow-list: a field this module does not name is refused as an
unknown change, so a field added to the config later is refused until someone decides it is
safe. ``version`` is not compared: the meta store numbers versions itself.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from pydantic import BaseModel
from sqlalchemy.engine import URL

from ..core.config import (
    IdConfig,
    MetaConfig,
    PoolConfig,
    ShardConfig,
    TableConfig,
    TopologyConfig,
    database_identity,
    safe_url,
    same_database,
)
from ..errors import TopologyChangeError


class ChangeKind(StrEnum):
    """What changed; the verdict of each kind is fixed (``SAFE_KINDS``), except where noted."""

    NAME = "name"
    TABLE_ADDED = "table_added"
    SHARD_ADDED = "shard_added"  # safe only when the new shard owns no slots
    SHARD_REMOVED = "shard_removed"  # safe only when the old shard owned no slots
    REPLICAS = "replicas"
    POOL = "pool"
    PRIMARY_REPOINTED = "primary_repointed"  # safe, after the operator's confirmation
    CONNECTION_SETTINGS = "connection_settings"  # same database: user, password, driver
    SLOT_RANGES_REWRITTEN = "slot_ranges_rewritten"
    WORKER_ID = "worker_id"
    MAX_BACKWARD = "max_backward"  # safe when lowered, refused when raised
    META_ADDED = "meta_added"
    META_SETTINGS = "meta_settings"
    SLOTS_MOVED = "slots_moved"
    SLOT_COUNT = "slot_count"
    ID_LAYOUT = "id_layout"
    TABLE_RULE = "table_rule"
    TABLE_REMOVED = "table_removed"
    SHARED_DATABASE = "shared_database"
    META_URL = "meta_url"
    META_REMOVED = "meta_removed"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Change:
    """One difference between two versions and its verdict."""

    kind: ChangeKind
    path: str
    """Where in the YAML document, e.g. ``shards.s1.primary`` (``slots`` for slot moves)."""
    line: str
    """What changed, for a human (URLs with their passwords masked)."""
    safe: bool
    reason: str = ""
    """Refused: why, and the way out. Safe: a note for the operator, or empty."""
    confirm: str = ""
    """Safe only on the operator's word: the question to confirm (a primary re-pointed)."""

    def render(self) -> str:
        mark = "safe   " if self.safe else "REFUSED"
        text = f"{mark} {self.line}"
        return f"{text}: {self.reason}" if self.reason else text

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "path": self.path,
            "line": self.line,
            "safe": self.safe,
            "reason": self.reason,
            "confirm": self.confirm,
        }


@dataclass(frozen=True, slots=True)
class TopologyDiff:
    """Every change from ``old`` to ``new``, in document order (name, slots, ids, shards,
    slot moves, tables, meta)."""

    changes: tuple[Change, ...] = field(default_factory=tuple)

    @property
    def empty(self) -> bool:
        return not self.changes

    @property
    def refused(self) -> tuple[Change, ...]:
        return tuple(c for c in self.changes if not c.safe)

    @property
    def safe(self) -> bool:
        """True when every change can be applied live (an empty diff is safe)."""
        return not self.refused

    @property
    def confirmations(self) -> tuple[Change, ...]:
        """The safe changes that need the operator's confirmation."""
        return tuple(c for c in self.changes if c.safe and c.confirm)

    def problems(self) -> list[str]:
        return [f"{c.line}: {c.reason}" for c in self.refused]

    def raise_if_refused(self) -> None:
        """TopologyChangeError listing every refused change with its way out."""
        if self.refused:
            raise TopologyChangeError(self.problems())

    def as_dict(self) -> dict[str, Any]:
        return {
            "safe": self.safe,
            "changes": [c.as_dict() for c in self.changes],
            "refused": len(self.refused),
            "confirmations": [c.confirm for c in self.confirmations],
        }


# -- the way out, worded once -----------------------------------------------------------------

RESHARD = (
    "moving slots moves their rows, which a topology push does not do; keep the slots where"
    " they are and move them with `shardctl reshard` (online resharding, the next release)"
)
_LAYOUT = (
    "the id layout of a live cluster cannot change: issued ids would decode to other slots and"
    " times, and new ids could repeat old ones; keep {path}: {old}"
)
_RULE = (
    "the rows of {table} are placed by its current rule, and a new rule would look for them on"
    " other shards (or miss them); keep {path}: {old} (re-placing a table's rows is a"
    " migration, not a push)"
)

# The fields of each model and what a change of each is; a field missing here is UNKNOWN.
_TOP_FIELDS = frozenset({"name", "version", "slots", "ids", "shards", "tables", "meta"})
_ID_LAYOUT_FIELDS = ("epoch", "timestamp_bits", "gene_bits", "worker_bits", "sequence_bits")
_POOL_FIELDS = frozenset(
    {
        "size",
        "max_overflow",
        "timeout_s",
        "recycle_s",
        "pre_ping",
        "connect_timeout_s",
        "query_timeout_s",
        "lock_wait_timeout_s",
    }
)
_SHARD_FIELDS = frozenset({"primary", "replicas", "pool", "slots"})
_TABLE_RULE_FIELDS = (
    "column",
    "type",
    "strategy",
    "secondary",
    "bound_to",
    "broadcast",
    "split",
)
_META_SETTINGS = frozenset(
    {
        "poll_interval_s",
        "fast_poll_interval_s",
        "lease_s",
        "fence_margin_s",
        "connect_timeout_s",
        "query_timeout_s",
    }
)


def diff_topologies(old: TopologyConfig, new: TopologyConfig) -> TopologyDiff:
    """Every change from ``old`` (the current version) to ``new`` (the proposed one)."""
    out: list[Change] = []
    out += _unknown_fields("", old, new, _TOP_FIELDS)
    if old.name != new.name:
        out.append(
            Change(
                ChangeKind.NAME,
                "name",
                f"name: {_show(old.name)} -> {_show(new.name)}",
                safe=True,
            )
        )
    same_slots = old.slots == new.slots
    if not same_slots:
        out.append(
            Change(
                ChangeKind.SLOT_COUNT,
                "slots",
                f"slots: {old.slots} -> {new.slots}",
                safe=False,
                reason=(
                    "the slot count is fixed for the life of a cluster (every key's slot and"
                    f" every id's gene depend on it); keep slots: {old.slots}"
                ),
            )
        )
    out += _ids(old.ids, new.ids)
    out += _shards(old, new, compare_slots=same_slots)
    if same_slots:
        out += _moves(old, new)
    out += _tables(old.tables, new.tables)
    out += _meta(old.meta, new.meta)
    return TopologyDiff(tuple(out))


# -- ids -------------------------------------------------------------------------------------


def _ids(old: IdConfig, new: IdConfig) -> list[Change]:
    out = _unknown_fields(
        "ids", old, new, frozenset({*_ID_LAYOUT_FIELDS, "worker_id", "max_backward_ms"})
    )
    for name in _ID_LAYOUT_FIELDS:
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            path = f"ids.{name}"
            out.append(
                Change(
                    ChangeKind.ID_LAYOUT,
                    path,
                    f"{path}: {_show(a)} -> {_show(b)}",
                    safe=False,
                    reason=_LAYOUT.format(path=path, old=_show(a)),
                )
            )
    if old.worker_id != new.worker_id:
        out.append(
            Change(
                ChangeKind.WORKER_ID,
                "ids.worker_id",
                f"ids.worker_id: {old.worker_id} -> {new.worker_id}",
                safe=True,
                reason=(
                    "a generator's own worker id (with a meta store, generators lease theirs"
                    " and this value is not used)"
                ),
            )
        )
    a_ms, b_ms = old.max_backward_ms, new.max_backward_ms
    if a_ms != b_ms:
        lowered = b_ms < a_ms
        out.append(
            Change(
                ChangeKind.MAX_BACKWARD,
                "ids.max_backward_ms",
                f"ids.max_backward_ms: {a_ms} -> {b_ms}",
                safe=lowered,
                reason=(
                    "generators give up sooner on a clock that stepped back"
                    if lowered
                    else "a worker id is reused after its lease expires plus this clock-step"
                    " bound, and held leases were taken under the current one: a larger bound"
                    f" could let a reused worker id repeat ids; keep ids.max_backward_ms: {a_ms}"
                    " (lowering it is safe)"
                ),
            )
        )
    return out


# -- shards ----------------------------------------------------------------------------------


def _shards(old: TopologyConfig, new: TopologyConfig, *, compare_slots: bool) -> list[Change]:
    out: list[Change] = []
    for name, shard in new.shards.items():
        was = old.shards.get(name)
        if was is None:
            out += _shard_added(name, shard, old, new)
        else:
            out += _shard_changed(name, was, shard, old, new, compare_slots=compare_slots)
    for name, shard in old.shards.items():
        if name in new.shards:
            continue
        path = f"shards.{name}"
        if shard.slots:
            out.append(
                Change(
                    ChangeKind.SHARD_REMOVED,
                    path,
                    f"{path} removed (it owns slots {_ranges(shard.slots)})",
                    safe=False,
                    reason=(
                        "its slots hold rows that would have no shard (or another one); move"
                        " them away with `shardctl reshard` first, then remove the empty shard"
                    ),
                )
            )
        else:
            out.append(
                Change(
                    ChangeKind.SHARD_REMOVED,
                    path,
                    f"{path} removed ({safe_url(shard.primary)}, owned no slots)",
                    safe=True,
                    reason="no rows are routed to it; its database is left as it is",
                )
            )
    return out


def _shard_added(
    name: str, shard: ShardConfig, old: TopologyConfig, new: TopologyConfig
) -> list[Change]:
    path = f"shards.{name}"
    where = safe_url(shard.primary)
    replicas = f", {len(shard.replicas)} replica(s)" if shard.replicas else ""
    out: list[Change] = []
    if shard.slots:
        out.append(
            Change(
                ChangeKind.SHARD_ADDED,
                path,
                f"{path} added ({where}{replicas}) owning slots {_ranges(shard.slots)}",
                safe=False,
                reason=(
                    "a new shard starts empty: add it with slots: [] and move slots to it with"
                    " `shardctl reshard` (online resharding, the next release)"
                ),
            )
        )
    else:
        out.append(
            Change(
                ChangeKind.SHARD_ADDED,
                path,
                f"{path} added ({where}{replicas}), owning no slots yet",
                safe=True,
                reason=(
                    "broadcast writes and scatter reads reach every shard: apply the schema to"
                    " it first (`shardctl schema apply`)"
                ),
            )
        )
    out += _foreign_database(name, f"{path}.primary", shard.primary, old, new)
    for i, url in enumerate(shard.replicas):
        out += _foreign_database(name, f"{path}.replicas[{i}]", url, old, new)
    return out


def _shard_changed(
    name: str,
    was: ShardConfig,
    now: ShardConfig,
    old: TopologyConfig,
    new: TopologyConfig,
    *,
    compare_slots: bool,
) -> list[Change]:
    base = f"shards.{name}"
    out = _unknown_fields(base, was, now, _SHARD_FIELDS)
    if _secret(was.primary) != _secret(now.primary):
        path = f"{base}.primary"
        line = f"{path}: {safe_url(was.primary)} -> {safe_url(now.primary)}"
        if same_database(was.primary, now.primary):
            out.append(
                Change(
                    ChangeKind.CONNECTION_SETTINGS,
                    path,
                    line,
                    safe=True,
                    reason="same server and database; new credentials, driver or options",
                )
            )
        else:
            out.append(
                Change(
                    ChangeKind.PRIMARY_REPOINTED,
                    path,
                    line,
                    safe=True,
                    reason="a failover: routers write to the new primary once they ack",
                    confirm=(
                        f"shard {name}'s primary moves to {safe_url(now.primary)}. That server"
                        f" must already hold every row of {name} (a promoted, caught-up"
                        " replica): shardrouter copies nothing, and writes go there as soon as"
                        " routers switch. Is it the shard's new primary?"
                    ),
                )
            )
            out += _foreign_database(name, path, now.primary, old, new)
    if [_secret(u) for u in was.replicas] != [_secret(u) for u in now.replicas]:
        path = f"{base}.replicas"
        old_list = ", ".join(safe_url(u) for u in was.replicas) or "none"
        new_list = ", ".join(safe_url(u) for u in now.replicas) or "none"
        out.append(
            Change(
                ChangeKind.REPLICAS,
                path,
                f"{path}: [{old_list}] -> [{new_list}]",
                safe=True,
                reason="reads use the new replica set once routers ack",
            )
        )
        kept = {database_identity(u) for u in was.replicas}
        for i, url in enumerate(now.replicas):
            if database_identity(url) not in kept:
                out += _foreign_database(name, f"{path}[{i}]", url, old, new)
    out += _unknown_fields(f"{base}.pool", was.pool, now.pool, _POOL_FIELDS)
    for field_name in sorted(_POOL_FIELDS & set(PoolConfig.model_fields)):
        a, b = getattr(was.pool, field_name), getattr(now.pool, field_name)
        if a != b:
            path = f"{base}.pool.{field_name}"
            out.append(
                Change(ChangeKind.POOL, path, f"{path}: {_show(a)} -> {_show(b)}", safe=True)
            )
    if compare_slots and was.slots != now.slots and _norm(was.slots) == _norm(now.slots):
        path = f"{base}.slots"
        out.append(
            Change(
                ChangeKind.SLOT_RANGES_REWRITTEN,
                path,
                f"{path}: {_ranges(was.slots)} -> {_ranges(now.slots)}",
                safe=True,
                reason="the same slots, written differently",
            )
        )
    return out


def _foreign_database(
    name: str, path: str, url: URL, old: TopologyConfig, new: TopologyConfig
) -> list[Change]:
    """A refused change when ``url``, newly given to shard ``name`` (a primary re-pointed or
    added, a replica added), is a database of another shard: in the proposed version (two
    shards in one database), or in the current one (the data of another shard re-placed).

    Databases are compared by server and name (``core.config.database_identity``: driver and
    credentials ignored, ``localhost`` the loopback, port 3306 when absent). URLs a shard
    keeps are not compared again: the current version was checked when it was pushed."""
    ident = database_identity(url)
    if ident is None:  # SQLite in memory: a database of its own
        return []
    primary = path.endswith(".primary")
    shown = safe_url(url)
    for other, role in _users(new, ident, skip=name):
        if primary and role == "primary":
            line = f"{path}: {shown} is also shard {other}'s database"
            reason = (
                "two shards in one database share its tables, so every scatter would read"
                " their rows twice; give each shard its own database"
            )
        elif primary:
            line = f"{path}: {shown} is also a replica of shard {other}"
            reason = (
                f"{other}'s replica reads would return {name}'s rows; a database serves one"
                f" shard: remove it from {other}'s replicas, or give {name} its own database"
            )
        else:
            what = "database" if role == "primary" else "replica"
            line = f"{path}: {shown} is also shard {other}'s {what}"
            reason = (
                f"replica reads of {name}'s keys would return {other}'s rows; a replica of"
                f" {name} must be a copy of {name}'s primary"
            )
        return [Change(ChangeKind.SHARED_DATABASE, path, line, safe=False, reason=reason)]
    for other, role in _users(old, ident, skip=name):
        line = f"{path}: {shown} is shard {other}'s {role} database in the current version"
        if primary:
            reason = (
                f"pointing shard {name} at a database of shard {other} re-places data, it is"
                f" not a failover: {name}'s keys would read and write {other}'s rows (swapping"
                " two shards' databases re-places every slot of both). Rows move between"
                " shards with `shardctl reshard` (move the slots, not the databases); if that"
                f" database really holds {name}'s rows now (re-seeded), take it out of {other}"
                f" in one version and point {name} at it in the next"
            )
        else:
            reason = (
                f"replica reads of {name}'s keys would return {other}'s rows, unless that"
                f" database is now a copy of {name}'s primary: then take it out of {other} in"
                " one version and add it here in the next"
            )
        return [Change(ChangeKind.SHARED_DATABASE, path, line, safe=False, reason=reason)]
    return []


def _users(config: TopologyConfig, ident: tuple[str, ...], *, skip: str) -> list[tuple[str, str]]:
    """The shards of ``config`` other than ``skip`` using the database ``ident``, each with
    its role there (``primary`` or ``replica``), primaries first."""
    found = [
        (name, "primary")
        for name, shard in config.shards.items()
        if name != skip and database_identity(shard.primary) == ident
    ]
    found += [
        (name, "replica")
        for name, shard in config.shards.items()
        if name != skip and any(database_identity(u) == ident for u in shard.replicas)
    ]
    return found


def _moves(old: TopologyConfig, new: TopologyConfig) -> list[Change]:
    """One refused change per (from, to) pair of shards that slots would move between."""
    before, after = _owners(old), _owners(new)
    moved: dict[tuple[str, str], list[tuple[int, int]]] = {}
    start = 0
    for slot in range(1, old.slots + 1):
        if slot < old.slots and (before[slot], after[slot]) == (before[start], after[start]):
            continue
        if before[start] != after[start]:
            moved.setdefault((before[start], after[start]), []).append((start, slot))
        start = slot
    return [
        Change(
            ChangeKind.SLOTS_MOVED,
            "slots",
            f"slots {_ranges(ranges)} move from {src} to {dst}",
            safe=False,
            reason=RESHARD,
        )
        for (src, dst), ranges in moved.items()
    ]


def _owners(config: TopologyConfig) -> list[str]:
    owner = [""] * config.slots
    for name, shard in config.shards.items():
        for start, end in shard.slots:
            owner[start:end] = [name] * (end - start)
    return owner


# -- tables ----------------------------------------------------------------------------------


def _tables(old: Mapping[str, TableConfig], new: Mapping[str, TableConfig]) -> list[Change]:
    out: list[Change] = []
    for name, table in new.items():
        was = old.get(name)
        path = f"tables.{name}"
        if was is None:
            out.append(
                Change(
                    ChangeKind.TABLE_ADDED,
                    path,
                    f"{path} added ({_describe(table)})",
                    safe=True,
                    reason="create it on every shard first (`shardctl schema apply`)",
                )
            )
            continue
        out += _unknown_fields(path, was, table, frozenset(_TABLE_RULE_FIELDS))
        for field_name in _TABLE_RULE_FIELDS:
            a, b = getattr(was, field_name), getattr(table, field_name)
            if a != b:
                where = f"{path}.{field_name}"
                out.append(
                    Change(
                        ChangeKind.TABLE_RULE,
                        where,
                        f"{where}: {_show(a)} -> {_show(b)}",
                        safe=False,
                        reason=_RULE.format(table=name, path=where, old=_show(a)),
                    )
                )
    for name in old:
        if name not in new:
            path = f"tables.{name}"
            out.append(
                Change(
                    ChangeKind.TABLE_REMOVED,
                    path,
                    f"{path} removed",
                    safe=False,
                    reason=(
                        "its rows stay on the shards and routers would refuse every statement"
                        f" on {name}; keep it in the file (a table is dropped outside"
                        " shardrouter, then removed in a later version once it is empty)"
                    ),
                )
            )
    return out


def _describe(table: TableConfig) -> str:
    if table.broadcast:
        return "broadcast"
    if table.bound_to is not None:
        return f"bound to {table.bound_to}"
    strategy = table.strategy
    name = strategy if isinstance(strategy, str) else (strategy or {}).get("name", "?")
    split = f", split {table.split}" if table.split != 1 else ""
    return f"sharded by {table.column} ({table.type.value}, {name}){split}"


# -- meta ------------------------------------------------------------------------------------


def _meta(old: MetaConfig | None, new: MetaConfig | None) -> list[Change]:
    if old is None and new is None:
        return []
    if old is None:
        assert new is not None
        return [
            Change(
                ChangeKind.META_ADDED,
                "meta",
                f"meta: added ({safe_url(new.url)})",
                safe=True,
                reason="routers read their poll and lease settings from it",
            )
        ]
    if new is None:
        return [
            Change(
                ChangeKind.META_REMOVED,
                "meta",
                "meta: removed",
                safe=False,
                reason=(
                    "routers follow the meta store named there and would lose their poll and"
                    " lease settings; keep the meta: section"
                ),
            )
        ]
    out = _unknown_fields("meta", old, new, _META_SETTINGS | {"url"})
    if _secret(old.url) != _secret(new.url):
        same = same_database(old.url, new.url)
        out.append(
            Change(
                ChangeKind.CONNECTION_SETTINGS if same else ChangeKind.META_URL,
                "meta.url",
                f"meta.url: {safe_url(old.url)} -> {safe_url(new.url)}",
                safe=same,
                reason=(
                    "same server and database; new credentials, driver or options"
                    if same
                    else "a meta store cannot move itself: routers would follow a store that"
                    " holds no versions; keep meta.url (to move the store, copy its database"
                    " and start the routers on the new URL)"
                ),
            )
        )
    for name in sorted(_META_SETTINGS & set(MetaConfig.model_fields)):
        a, b = getattr(old, name), getattr(new, name)
        if a != b:
            path = f"meta.{name}"
            out.append(
                Change(
                    ChangeKind.META_SETTINGS,
                    path,
                    f"{path}: {_show(a)} -> {_show(b)}",
                    safe=True,
                    reason=(
                        "recorded with the version; a router runs with the meta: settings of"
                        " the file it starts from (restart routers with the new file to apply)"
                    ),
                )
            )
    return out


# -- helpers ---------------------------------------------------------------------------------


def _unknown_fields(
    base: str, old: BaseModel, new: BaseModel, known: Iterable[str]
) -> list[Change]:
    """A refused change for each differing field this module does not classify."""
    known = set(known)
    out: list[Change] = []
    for name in type(new).model_fields:
        if name in known:
            continue
        a, b = getattr(old, name, None), getattr(new, name, None)
        if a != b:
            path = f"{base}.{name}" if base else name
            out.append(
                Change(
                    ChangeKind.UNKNOWN,
                    path,
                    f"{path}: {_show(a)} -> {_show(b)}",
                    safe=False,
                    reason=(
                        "shardrouter does not know this change to be safe live, so it refuses"
                        f" it; keep {path} as it is"
                    ),
                )
            )
    return out


def _secret(url: URL) -> str:
    """The whole URL, password included: for comparison only, never shown."""
    return url.render_as_string(hide_password=False)


def _norm(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for start, end in sorted(ranges):
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], end))
        else:
            out.append((start, end))
    return out


def _ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ", ".join(f"[{s}, {e})" for s, e in ranges) or "none"


def _show(value: Any) -> str:
    """A value for a line: URLs masked, models and lists as compact JSON."""
    if isinstance(value, URL):
        return safe_url(value)
    if isinstance(value, Enum):
        value = value.value
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    elif isinstance(value, list | tuple) and any(isinstance(v, BaseModel) for v in value):
        value = [v.model_dump(mode="json") if isinstance(v, BaseModel) else v for v in value]
    if isinstance(value, str):
        return repr(value)
    try:
        return json.dumps(value, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return repr(value)


__all__ = [
    "RESHARD",
    "Change",
    "ChangeKind",
    "TopologyDiff",
    "diff_topologies",
]
