"""Topology configuration: frozen pydantic models, YAML loading, ${ENV} interpolation, checks.

Loading runs in three passes, each collecting every problem before it reports:

1. YAML: syntax, duplicate keys (PyYAML would silently keep the last one), ``${VAR}`` values;
2. structure: the pydantic models (types, unknown keys, missing fields);
3. meaning: slot coverage, table references, strategy names and parameters, the id layout.

A ConfigError carries one line per problem naming the field path, the bad value and the fix.
"""

from __future__ import annotations

import datetime as dt
import difflib
import math
import os
import re
import types
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from ..errors import ConfigError
from ..types import KeyType
from . import strategies
from .ids import ID_BITS, IdLayout
from .strategies.base import StrategyContext

DEFAULT_SLOTS = 1024
MAX_SLOTS = 1 << 16


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class PoolConfig(_Model):
    """Connection pool settings of one shard's engines (SQLAlchemy QueuePool)."""

    size: Annotated[int, Field(ge=1, le=1000)] = 5
    max_overflow: Annotated[int, Field(ge=0, le=1000)] = 10
    timeout_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    recycle_s: Annotated[int, Field(ge=-1)] = 3600
    pre_ping: bool = True
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    query_timeout_s: Annotated[float, Field(gt=0, le=86_400)] = 30.0
    """How long one statement may wait for the shard's answer before ShardUnavailableError:
    a shard that accepts connections but stops answering fails within it."""
    lock_wait_timeout_s: Annotated[int, Field(ge=0, le=86_400)] | None = None
    """The session's ``innodb_lock_wait_timeout``: how long a statement waits for a row lock
    before LockConflictError (0: not at all, MariaDB fails a held row at once; MySQL's least
    is 1). It must end before the answer timeout (``answer_timeout_s``), or a held row reads
    as an unavailable shard; unset, it is half of that timeout, rounded down, which needs an
    answer timeout of 2 s or more (below, set it: 0 is the only value left)."""

    @model_validator(mode="after")
    def _lock_wait_below_query_timeout(self) -> PoolConfig:
        lock_wait = self.lock_wait_timeout_s
        limit = self.answer_timeout_s
        if lock_wait is None and limit < 2:
            raise ValueError(
                f"query_timeout_s ({self.query_timeout_s:g}) leaves no whole second for the row"
                " lock wait below it (innodb_lock_wait_timeout counts whole seconds and must end"
                " before the answer does, or a held row reads as an unavailable shard): raise"
                " query_timeout_s to 2 or more, or set lock_wait_timeout_s: 0 (a held row then"
                " fails at once with LockConflictError; MariaDB only, MySQL waits 1 s at least)"
            )
        if lock_wait is not None and lock_wait >= limit:
            rounded = (
                f"; sync drivers read whole seconds: query_timeout_s {self.query_timeout_s:g}"
                f" times out after {self.read_timeout_s} s"
                if self.read_timeout_s < self.query_timeout_s
                else ""
            )
            raise ValueError(
                f"lock_wait_timeout_s ({lock_wait}) must be below query_timeout_s"
                f" ({limit:g} s{rounded}): a longer lock wait ends in the client's read"
                f" timeout and reports a held row as an unavailable shard; lower it (at most"
                f" {math.ceil(limit) - 1}) or raise query_timeout_s"
            )
        return self

    @property
    def read_timeout_s(self) -> int:
        """The sync drivers' read timeout (PyMySQL, mysqlclient): whole seconds, at least 1."""
        return int(max(1, round(self.query_timeout_s)))

    @property
    def answer_timeout_s(self) -> float:
        """The shortest wait for a shard's answer, sync or async: the async routers wait
        ``query_timeout_s`` itself, the sync drivers ``read_timeout_s``."""
        return min(self.query_timeout_s, self.read_timeout_s)

    @property
    def lock_wait_s(self) -> int:
        """The lock wait the shard's sessions are given (see lock_wait_timeout_s): always
        below answer_timeout_s, at least 1 s unless set to 0."""
        if self.lock_wait_timeout_s is not None:
            return self.lock_wait_timeout_s
        return int(self.answer_timeout_s // 2)


def _to_url(value: Any) -> URL:
    """A shard URL from YAML: parsed once, refused with a masked message when it cannot be."""
    if isinstance(value, URL):
        return value
    if not isinstance(value, str):
        raise PydanticCustomError("string_type", "Input should be a valid string")
    try:
        url = make_url(value)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise PydanticCustomError(
            "database_url",
            "{message}",
            {
                "message": f"{safe_url(value)!r} is not a database URL (write e.g."
                " mysql+pymysql://user:${DB_PASSWORD}@host:3306/orders_s0)"
            },
        ) from None
    if _misparsed(url):
        # "user:p@ss@host": the URL grammar ends the password at the first '@', so the rest of
        # the password would be taken for the host (and shown in every message naming it);
        # two URLs in one value put the second one's password in the database name.
        raise PydanticCustomError(
            "database_url",
            "{message}",
            {
                "message": f"{safe_url(value)!r}: the user name or password holds an '@';"
                " percent-encode it as %40 (urllib.parse.quote(password, safe=''))"
            },
        )
    secret = sorted(k for k in url.query if "pass" in k.lower())
    if secret:
        # repr() and str() of a URL mask only its password part: a query password would show.
        raise PydanticCustomError(
            "database_url",
            "{message}",
            {
                "message": f"{safe_url(value)!r}: the query parameter {secret[0]!r} carries a"
                " password, which messages would show; write user:password@host instead"
                " (percent-encoded)"
            },
        )
    return url


def _misparsed(url: URL) -> bool:
    """An '@' outside the user part: part of a password was taken for the host or database."""
    return "@" in (url.host or "") or "@" in (url.database or "")


def _dump_url(url: URL, info: SerializationInfo) -> str:
    # Dumps mask the password like repr() does; a caller that must round-trip the secret asks
    # for it explicitly: model_dump(context={"reveal_passwords": True}).
    reveal = isinstance(info.context, dict) and info.context.get("reveal_passwords") is True
    return url.render_as_string(hide_password=not reveal)


DatabaseURL = Annotated[
    URL,
    PlainValidator(_to_url),
    PlainSerializer(_dump_url, return_type=str, when_used="always"),
    WithJsonSchema({"type": "string", "format": "uri"}),
]
"""A database URL whose password never shows: SQLAlchemy's URL masks it in repr() and str(),
dumps mask it, and code that needs it asks explicitly (``create_engine(url)``,
``url.render_as_string(hide_password=False)``)."""


class ShardConfig(_Model):
    """One physical shard: where it is and which slot ranges it owns."""

    primary: DatabaseURL
    replicas: list[DatabaseURL] = []
    pool: PoolConfig = PoolConfig()
    slots: list[tuple[int, int]]
    """The slot ranges ``[start, end)`` the shard owns; ``[]``: none yet (a new shard, written
    out explicitly so that a forgotten ``slots:`` is still an error)."""

    @model_validator(mode="after")
    def _lock_wait_not_overridden(self) -> ShardConfig:
        """A URL's own ``init_command`` replaces the session setup that sets the lock wait
        (engines.engine_options): with an explicit lock_wait_timeout_s, one of the two would
        be silently ignored; without one, the init_command must set a lock wait below the
        answer timeout itself."""
        lock_wait = self.pool.lock_wait_timeout_s
        for url in (self.primary, *self.replicas):
            if "init_command" in url.query and lock_wait is None:
                _check_own_lock_wait(url, self.pool)
            elif "init_command" in url.query:
                raise ValueError(
                    f"{safe_url(url)!r} sets its own init_command, which replaces the session"
                    f" setup that applies pool.lock_wait_timeout_s ({lock_wait}); remove"
                    " lock_wait_timeout_s and put `SET SESSION innodb_lock_wait_timeout ="
                    f" {lock_wait}` into the URL's init_command, or drop init_command from"
                    " the URL"
                )
        return self


_OWN_LOCK_WAIT = re.compile(r"innodb_lock_wait_timeout\s*=\s*(\d+)", re.I)


def _check_own_lock_wait(url: URL, pool: PoolConfig) -> None:
    """A URL whose own init_command replaces the session setup must set the lock wait itself,
    below the answer timeout: else the server's (50 s by default) outlasts every answer
    timeout and a held row reads as an unavailable shard."""
    command = url.query["init_command"]
    text = command[-1] if isinstance(command, tuple) else command
    found = _OWN_LOCK_WAIT.search(text)
    answer = pool.answer_timeout_s
    if found is None:
        raise ValueError(
            f"{safe_url(url)!r} sets its own init_command, which replaces the session setup"
            " that sets the lock wait: the server's (50 s by default) would outlast the answer"
            f" timeout ({answer:g} s) and a held row would read as an unavailable shard; add"
            f" `innodb_lock_wait_timeout = {pool.lock_wait_s}` to it (SET SESSION a = ...,"
            " innodb_lock_wait_timeout = N) or drop init_command from the URL"
        )
    if int(found.group(1)) >= answer:
        raise ValueError(
            f"{safe_url(url)!r}: its init_command sets innodb_lock_wait_timeout ="
            f" {found.group(1)}, not below the answer timeout ({answer:g} s): a held row would"
            f" read as an unavailable shard; set it below {answer:g} or raise query_timeout_s"
        )


StrategySpec = str | dict[str, Any]


class SecondaryKeyConfig(_Model):
    """A further column that routes the table: order_id by gene, merchant_id by lookup."""

    column: str
    type: KeyType = KeyType.INT
    strategy: StrategySpec


class TableConfig(_Model):
    """A logical table: sharded by a column, bound to another table, or broadcast."""

    column: str | None = None
    type: KeyType = KeyType.INT
    strategy: StrategySpec | None = None
    secondary: list[SecondaryKeyConfig] = []
    bound_to: str | None = None
    broadcast: bool = False
    split: Annotated[int, Field(ge=1)] = 1


class IdConfig(_Model):
    """The id layout: bit widths (adding up to 63), custom epoch (UTC), this process's worker."""

    epoch: dt.datetime = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    timestamp_bits: Annotated[int, Field(ge=1, le=62)] = 41
    gene_bits: Annotated[int, Field(ge=0, le=16)] = 10
    worker_bits: Annotated[int, Field(ge=0, le=20)] = 8
    """256 generators at once: leased from the meta store, or one ids.worker_id per process."""
    sequence_bits: Annotated[int, Field(ge=1, le=30)] = 4
    """16 ids per millisecond per slot per worker (16,000/s for one key from one process)."""
    worker_id: Annotated[int, Field(ge=0)] = 0
    max_backward_ms: Annotated[int, Field(ge=0, le=60_000)] = 100


class MetaConfig(_Model):
    """Where the meta store is and how routers follow it (``meta:``; absent: no meta store,
    the file is the topology and nothing polls)."""

    url: DatabaseURL
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 1.0
    """How often a router asks for a new version (and renews its lease) when nothing moves."""
    fast_poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.1
    """The same while a version change or a migration is in flight: phase switches then take
    milliseconds, not seconds."""
    lease_s: Annotated[float, Field(gt=0, le=3600)] = 10.0
    """How long a router's registration and a worker-id lease live without renewal; a dead
    router blocks a version change for at most this long."""
    fence_margin_s: Annotated[float, Field(ge=0, le=3600)] = 1.0
    """A router fences itself this long before its lease expires by its own clock, so that
    clock drift between it and the meta store cannot let it write after the store let go."""
    connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0
    query_timeout_s: Annotated[float, Field(gt=0, le=600)] = 5.0

    @model_validator(mode="after")
    def _intervals_fit_the_lease(self) -> MetaConfig:
        slowest = max(self.poll_interval_s, self.fast_poll_interval_s)
        if self.fence_margin_s + 2 * slowest >= self.lease_s:
            raise ValueError(
                f"lease_s ({self.lease_s:g}) must exceed fence_margin_s + 2 x poll_interval_s"
                f" ({self.fence_margin_s:g} + 2 x {slowest:g}): a router must get two chances"
                " to renew before it fences itself; raise lease_s or poll faster"
            )
        return self


WriteMode = Literal["dual_old_primary", "frozen", "dual_new_primary"]
"""Where writes to a moving range go (docs/RESHARDING.md): to the source (the copy is kept
current from its journal), nowhere for a moment (held by the routers while the journal drains:
the switch), to the target (the source kept current for a rollback)."""


class MovingSlotsConfig(_Model):
    """Slots [start, end) whose placement is changing from ``source`` to ``target`` (written by
    the resharding workflow, not by hand): while listed, a router whose lease expired refuses
    writes to them (FencedError), and so does a statement pinned to an older version. The
    range's owner in ``shards`` is its authority: the source until the switch, the target in
    ``dual_new_primary``."""

    slots: tuple[int, int]
    source: str
    target: str
    write_mode: WriteMode = "dual_old_primary"
    hold_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    """``frozen``: how long a router holds a write to these slots before failing it
    (SwitchHoldError); the switch gives up well before, so held writes are released."""
    migration: str | None = None
    """The migration that wrote this range (shardctl reshard), for messages."""
    shadow_percent: Annotated[int, Field(ge=0, le=100)] = 0
    """SHADOW reads (``dual_old_primary`` only): routers answer a read by key from the
    source, as always, and for the slots with ``slot % 100 < shadow_percent`` (the same key
    always in or out) run it on the target too and count the reads whose answers differ
    (engine.shadow; ``shardctl reshard switch-reads --shadow``)."""


class TopologyConfig(_Model):
    """The whole placement as written in YAML."""

    name: str = "default"
    version: Annotated[int, Field(ge=1)] = 1
    slots: int = DEFAULT_SLOTS
    ids: IdConfig = IdConfig()
    shards: dict[str, ShardConfig]
    tables: dict[str, TableConfig] = {}
    meta: MetaConfig | None = None
    moving: tuple[MovingSlotsConfig, ...] = ()

    def id_layout(self) -> IdLayout:
        ids = self.ids
        return IdLayout(
            epoch_ms=int(ids.epoch.timestamp() * 1000),
            timestamp_bits=ids.timestamp_bits,
            gene_bits=ids.gene_bits,
            worker_bits=ids.worker_bits,
            sequence_bits=ids.sequence_bits,
        )


# -- loading --------------------------------------------------------------------------------


class _UniqueKeyLoader(yaml.SafeLoader):
    """A SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {_show(key)} (first at line {seen[key]}; remove one of them)",
                key_node.start_mark,
            )
        seen[key] = line
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _interpolate(raw: Any, path: str, env: Mapping[str, str], problems: list[str]) -> Any:
    """Replace ``${VAR}`` / ``${VAR:-default}`` in every string of ``raw``."""
    if isinstance(raw, str):

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            problems.append(
                f"{path}: environment variable {name} is not set"
                f" (export it, or write ${{{name}:-default}})"
            )
            return ""

        return _ENV.sub(sub, raw)
    if isinstance(raw, dict):
        return {k: _interpolate(v, _join(path, k), env, problems) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_interpolate(v, f"{path}[{i}]", env, problems) for i, v in enumerate(raw)]
    return raw


def _join(path: str, key: Any) -> str:
    return f"{path}.{key}" if path else str(key)


def parse_yaml(text: str, source: str = "<string>") -> Any:
    """Parse YAML text, refusing duplicate keys; ConfigError names the line and column."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise ConfigError([f"YAML error at {where}: {exc.problem}"], source) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"YAML error: {exc}"], source) from None


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> TopologyConfig:
    """Load and fully validate a topology file; ConfigError lists every problem found."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], source) from None
    return config_from_dict(parse_yaml(text, source), source=source, env=env)


def config_from_dict(
    raw: Any, *, source: str = "<dict>", env: Mapping[str, str] | None = None
) -> TopologyConfig:
    """Validate an already-parsed configuration (what YAML gives); ConfigError on problems."""
    if not isinstance(raw, dict):
        kind = "empty" if raw is None else f"a {type(raw).__name__}"
        raise ConfigError(
            [f"the top level is {kind}, not a mapping (start with 'shards:' and 'tables:')"],
            source,
        )
    problems: list[str] = []
    raw = _interpolate(raw, "", os.environ if env is None else env, problems)
    if problems:
        raise ConfigError(problems, source)
    try:
        model = TopologyConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_structure_problems(exc), source) from None
    problems = list(check(model))
    if problems:
        raise ConfigError(problems, source)
    return model


def validate_file(path: str | Path, env: Mapping[str, str] | None = None) -> list[str]:
    """Every problem of a topology file, as lines; empty when the file is valid."""
    try:
        load_config(path, env)
    except ConfigError as exc:
        return list(exc.problems)
    return []


# -- pass 2: structure (pydantic) -------------------------------------------------------------


def _loc_path(loc: tuple[int | str, ...]) -> str:
    # A key can be a pasted URL (a mis-indented file, a URL where a shard name goes): each
    # segment is masked like a value.
    out = ""
    for part in loc:
        out = f"{out}[{part}]" if isinstance(part, int) else _join(out, _mask_text(part))
    return out


def _model_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at ``loc`` (to list its allowed keys)."""
    current: Any = TopologyConfig
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif typing.get_origin(current) in (dict, list, tuple):
            args = typing.get_args(current)
            current = args[-1] if args else Any
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional so the model class or container is left."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (typing.Union, types.UnionType):
            models = [
                a
                for a in typing.get_args(tp)
                if a is not type(None) and not (isinstance(a, type) and a in (str, int))
            ]
            if len(models) != 1:
                return tp
            tp = models[0]
        else:
            return tp


# A scheme as URLs start (``mysql+pymysql://``, or ``mysql+pymysql//`` with the colon
# forgotten); leading blanks allowed, since a value from YAML may carry them.
_SCHEME = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*:?//")
_PLAIN_USER = re.compile(r"[A-Za-z0-9_.$-]+")
# A password passed as a query parameter (``?password=…``, ``&passwd=…``): up to the next '&'.
_QUERY_SECRET = re.compile(r"(?i)([?&;][^=&?;]*pass[^=&?;]*=)[^&]*")


def _mask_text(text: str) -> str:
    """``text`` with any credentials masked, whatever it holds (spaces, quotes, '/', several
    '@' or URLs): everything between the scheme's ``//`` (or the start) and the LAST '@' is
    the user part, shown as ``user:***`` when the user name is plain, else as ``***``.

    Without an '@', a ``scheme://name:rest`` whose rest is no port may be a password with
    the host forgotten: the rest is masked too. Query parameters naming a password are
    masked in every case."""
    scheme = _SCHEME.match(text)
    start = scheme.end() if scheme else 0
    at = text.rfind("@")
    if at >= start:
        user, colon, _ = text[start:at].partition(":")
        shown = f"{user}:***" if colon and _PLAIN_USER.fullmatch(user) else "***"
        text = f"{text[:start]}{shown}{text[at:]}"
    elif scheme:
        name, colon, rest = text[start:].partition(":")
        if colon and not re.fullmatch(r"\d*(/[A-Za-z0-9_$-]*)?", rest):
            text = f"{text[:start]}{name}:***"
    return _mask_query(text)


def _mask_query(text: str) -> str:
    return _QUERY_SECRET.sub(r"\1***", text)


def _scrub(value: Any) -> Any:
    """``value`` with every string masked by _mask_text (lists and dicts too)."""
    if isinstance(value, str):
        return _mask_text(value)
    if isinstance(value, URL):
        return safe_url(value)
    if isinstance(value, dict):
        return {_scrub(k): _scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_scrub(v) for v in value]
    return value


def _show(value: Any) -> str:
    """A bad value for a message: short, and with any ``user:password@`` masked."""
    text = repr(_scrub(value))
    return text if len(text) <= 60 else text[:57] + "..."


def _structure_problems(exc: ValidationError) -> list[str]:
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = tuple(err["loc"])
        # pydantic tries each member of a union and reports each; the member name is noise.
        loc = tuple(p for p in loc if p not in ("str", "int", "dict[str,any]", "bool"))
        path = _loc_path(loc) or "(top level)"
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            known = sorted(owner.model_fields) if owner else []
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            fix = f"did you mean '{hint[0]}'? " if hint else ""
            line = f"{path}: unknown key ({fix}known here: {', '.join(known)})"
        elif kind == "missing":
            line = f"{path}: required but missing (add it)"
        elif kind == "database_url":  # its message shows the URL masked, never the input
            line = f"{path}: {err['msg']}"
        else:
            line = f"{path}: {err['msg']} (got {_show(err.get('input'))})"
        if line not in seen:
            seen.add(line)
            problems.append(line)
    return problems


# -- pass 3: meaning ------------------------------------------------------------------------


def safe_url(url: str | URL) -> str:
    """A URL for messages: the password replaced by ***."""
    if isinstance(url, URL):
        return _mask_query(url.render_as_string(hide_password=True))
    try:
        parsed = make_url(url)
    except (ArgumentError, ValueError):
        return _mask_text(url)
    if _misparsed(parsed):  # the password held an '@': the parse is wrong
        return _mask_text(url)
    return _mask_query(parsed.render_as_string(hide_password=True))


def check(model: TopologyConfig) -> Iterator[str]:
    """Every semantic problem of a structurally valid configuration."""
    yield from _check_slots_and_ids(model)
    yield from _check_shards(model)
    yield from _check_replicas(model)
    yield from _check_tables(model)
    yield from _check_moving(model)


def _check_moving(model: TopologyConfig) -> Iterator[str]:
    """Moving ranges: inside the slot space, between two known shards, one owning them."""
    taken: list[tuple[int, int]] = []
    for i, m in enumerate(model.moving):
        where = f"moving[{i}]"
        start, end = m.slots
        if not 0 <= start < end <= model.slots:
            yield f"{where}.slots: [{start}, {end}) is not a slot range in [0, {model.slots})"
            continue
        for name in (m.source, m.target):
            if name not in model.shards:
                yield (
                    f"{where}: shard {_show(name)} is not in shards"
                    f" (known: {', '.join(model.shards)})"
                )
        if m.source == m.target:
            yield f"{where}: source and target are both {_show(m.source)}; name two shards"
        for a, b in taken:
            if start < b and a < end:
                yield f"{where}.slots: [{start}, {end}) overlaps moving range [{a}, {b})"
        taken.append((start, end))
        owners = {
            name
            for name, shard in model.shards.items()
            for s, e in shard.slots
            if s < end and start < e
        }
        if m.shadow_percent and m.write_mode != "dual_old_primary":
            yield (
                f"{where}.shadow_percent: {m.shadow_percent} in write_mode {m.write_mode};"
                " shadow reads compare a target with its source before the switch"
                " (dual_old_primary): set it to 0"
            )
        authority = m.target if m.write_mode == "dual_new_primary" else m.source
        if m.write_mode == "frozen" and owners == {m.target}:
            authority = m.target  # a switch back (rollback after the switch) freezes it there
        if owners - {authority}:
            side = "target" if authority == m.target else "source"
            yield (
                f"{where}.slots: [{start}, {end}) is owned by {', '.join(sorted(owners))},"
                f" not only by its {side} {authority}, which takes its writes in write_mode"
                f" {m.write_mode}"
            )


def _check_slots_and_ids(model: TopologyConfig) -> Iterator[str]:
    slots = model.slots
    if not 1 <= slots <= MAX_SLOTS or slots & (slots - 1):
        yield (
            f"slots: {slots} is not a power of two in [1, {MAX_SLOTS}]"
            " (use e.g. 1024; it is fixed for the life of the cluster)"
        )
        return
    ids = model.ids
    bits = ids.timestamp_bits + ids.gene_bits + ids.worker_bits + ids.sequence_bits
    if bits != ID_BITS:
        yield (
            f"ids: timestamp_bits {ids.timestamp_bits} + gene_bits {ids.gene_bits} + worker_bits"
            f" {ids.worker_bits} + sequence_bits {ids.sequence_bits} = {bits}, not {ID_BITS}"
            " (ids are 63-bit; adjust timestamp_bits or worker_bits)"
        )
    slot_bits = slots.bit_length() - 1
    if ids.gene_bits != slot_bits:
        yield (
            f"ids.gene_bits: {ids.gene_bits} does not match {slots} slots"
            f" (gene_bits must be log2(slots) = {slot_bits})"
        )
    if ids.worker_id >= 1 << ids.worker_bits:
        yield (
            f"ids.worker_id: {ids.worker_id} does not fit in {ids.worker_bits} worker bits"
            f" (use 0..{(1 << ids.worker_bits) - 1} or widen worker_bits)"
        )
    epoch = ids.epoch
    if epoch.tzinfo is None or epoch.utcoffset() != dt.timedelta(0):
        yield (
            f"ids.epoch: {epoch.isoformat()} is not in UTC"
            " (write it with a Z suffix, e.g. 2025-01-01T00:00:00Z)"
        )
    elif epoch > dt.datetime.now(dt.UTC):
        yield f"ids.epoch: {epoch.isoformat()} is in the future (ids would be refused until then)"


def _check_shards(model: TopologyConfig) -> Iterator[str]:
    slots = model.slots
    if not model.shards:
        yield "shards: no shards defined (add at least one under shards:)"
        return
    ranges: list[tuple[int, int, str]] = []
    for name, shard in model.shards.items():
        base = f"shards.{name}"
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            yield f"{base}: name {name!r} must be 1-64 letters, digits, '_' or '-'"
        for field_name, url in [("primary", shard.primary)] + [
            (f"replicas[{i}]", r) for i, r in enumerate(shard.replicas)
        ]:
            yield from _check_url(f"{base}.{field_name}", url)
        # slots: [] is a shard that owns no slots yet: added live (`shardctl topology push`)
        # before data moves to it; coverage below still requires every slot to have an owner.
        for i, (start, end) in enumerate(shard.slots):
            where = f"{base}.slots[{i}]"
            if start >= end:
                yield (
                    f"{where}: [{start}, {end}) is empty or reversed"
                    " (write [start, end) with start < end)"
                )
            elif start < 0 or end > slots:
                yield f"{where}: [{start}, {end}) is outside [0, {slots}) (slots is {slots})"
            else:
                ranges.append((start, end, name))
    ranges.sort()
    covered_to = 0
    # Compare each range with the earlier one reaching furthest right, so every overlap is
    # reported (neighbours alone miss [100, 200) and [300, 400) both inside [0, 1024)).
    widest: tuple[int, int, str] | None = None
    for s2, e2, n2 in ranges:
        if widest is not None and s2 < widest[1]:
            s1, e1, n1 = widest
            yield f"shards.{n2}.slots: [{s2}, {e2}) overlaps {n1} [{s1}, {e1})"
        if widest is None or e2 > widest[1]:
            widest = (s2, e2, n2)
    for start, end, _ in ranges:
        if start > covered_to:
            yield (
                f"slots: [{covered_to}, {start}) are owned by no shard"
                " (add the range to a shard's slots)"
            )
        covered_to = max(covered_to, end)
    if ranges and covered_to < slots:
        yield (
            f"slots: [{covered_to}, {slots}) are owned by no shard"
            " (add the range to a shard's slots)"
        )


_LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})
_DEFAULT_PORTS = {"mysql": 3306}


def database_identity(url: URL) -> tuple[str, ...] | None:
    """Which database a URL reaches, for telling whether two URLs name one database; None for
    a database no other URL can share (SQLite in memory).

    Compared: the server and the database, never the driver, user, password or options:

    - ``mysql`` and ``mariadb`` are one family (either dialect reaches either server);
    - the host is lowercased, and ``localhost``, ``127.0.0.1`` and ``::1`` are one host (the
      loopback: PyMySQL and the async drivers connect to ``localhost`` over TCP, so the same
      port is the same server; mysqlclient connects to ``localhost`` through the default
      socket whatever the port, a server this cannot tell from the one on that port); other
      names are not resolved (``db0`` and its IP address compare different: the check does
      no I/O);
    - an absent port is the backend's default (3306 for MySQL/MariaDB);
    - a ``?unix_socket=`` names the server by its socket path instead of host and port;
    - the database name is compared exactly (MySQL on Linux tells ``Orders`` from ``orders``);
    - SQLite: the file path, normalised (``a/../b.db`` is ``b.db``; a relative path is not made
      absolute, since every process resolves it in its own directory).
    """
    backend = url.get_backend_name()
    if backend == "sqlite":
        path = url.database or ""
        if path in ("", ":memory:") or url.query.get("mode") == "memory":
            return None
        return ("sqlite", os.path.normpath(path))
    family = "mysql" if backend in ("mysql", "mariadb") else backend
    database = url.database or ""
    socket = url.query.get("unix_socket")
    if isinstance(socket, str) and socket:
        return (family, "socket", os.path.normpath(socket), database)
    host = (url.host or "localhost").lower().rstrip(".")
    if host in _LOOPBACK:
        host = "localhost"
    port = url.port if url.port is not None else _DEFAULT_PORTS.get(family, 0)
    return (family, host, str(port), database)


def same_database(a: URL, b: URL) -> bool:
    """True when ``a`` and ``b`` reach one database (see :func:`database_identity`)."""
    ident = database_identity(a)
    return ident is not None and ident == database_identity(b)


def _check_replicas(model: TopologyConfig) -> Iterator[str]:
    """A replica is a copy of its own shard's primary: never another shard's primary or
    replica (its reads would return the other shard's rows, silently)."""
    primaries = {name: database_identity(s.primary) for name, s in model.shards.items()}
    first_owner: dict[tuple[str, ...], str] = {}
    for name, ident in primaries.items():
        if ident is None:
            continue
        other = first_owner.setdefault(ident, name)
        if other != name:  # two shards' tables would be one set of tables: rows of both mixed
            yield (
                f"shards.{name}.primary: {safe_url(model.shards[name].primary)} is also shard"
                f" {other}'s primary database: the two shards' rows would share one set of"
                f" tables; give each shard its own database (many may share one server)"
            )
    seen: dict[tuple[str, ...], tuple[str, str]] = {}  # a replica's database -> (shard, path)
    for name, shard in model.shards.items():
        for i, url in enumerate(shard.replicas):
            where = f"shards.{name}.replicas[{i}]"
            ident = database_identity(url)
            if ident is None:
                continue
            owners = [o for o, p in primaries.items() if o != name and p == ident]
            if owners:
                other = owners[0]
                yield (
                    f"{where}: {safe_url(url)} is shard {other}'s primary database: replica"
                    f" reads of {name}'s keys would return {other}'s rows; a replica of {name}"
                    f" must be a copy of {name}'s primary (remove it, or name a replica of"
                    f" {name})"
                )
                continue
            other, first = seen.get(ident, (name, ""))
            if other != name:
                yield (
                    f"{where}: {safe_url(url)} is also shard {other}'s replica ({first}): one"
                    f" database cannot be a copy of both {other} and {name}, so the reads of"
                    " one of them would return the other's rows; give each shard its own"
                    " replicas"
                )
                continue
            seen.setdefault(ident, (name, where))


def _check_url(path: str, parsed: URL) -> Iterator[str]:
    backend = parsed.get_backend_name()
    if backend not in ("mysql", "mariadb", "sqlite"):
        yield (
            f"{path}: backend {backend!r} in {safe_url(parsed)!r} is not supported"
            " (use a mysql+<driver>:// or mariadb+<driver>:// URL; sqlite:// for the demo)"
        )
    elif backend != "sqlite" and not parsed.database:
        yield (
            f"{path}: {safe_url(parsed)!r} names no database"
            " (end the URL with /<database>, e.g. /orders_s0)"
        )


def _strategy_name_and_params(spec: StrategySpec) -> tuple[str, dict[str, Any]]:
    if isinstance(spec, str):
        return spec, {}
    params = dict(spec)
    name = params.pop("name", None)
    return (name if isinstance(name, str) else ""), params


def _check_strategy(
    path: str,
    spec: StrategySpec,
    key_type: KeyType,
    model: TopologyConfig,
    *,
    primary: bool,
) -> Iterator[str]:
    name, params = _strategy_name_and_params(spec)
    known = strategies.known_strategies()
    if not name:
        yield f"{path}: no strategy name (write strategy: hash, or strategy: {{name: ...}})"
        return
    if name not in known:
        hint = difflib.get_close_matches(name, known, n=1)
        fix = f"did you mean '{hint[0]}'? " if hint else ""
        yield f"{path}: unknown {name!r} ({fix}known: {', '.join(known)})"
        return
    if name == "lookup" and primary:
        yield (
            f"{path}: lookup cannot be a table's primary strategy (it needs a query to find"
            " slots); shard the table by hash and list the lookup under secondary"
        )
        return
    params_model = strategies.params_model(name)
    try:
        params_model.model_validate(params)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _loc_path(tuple(err["loc"]))
            if err["type"] == "extra_forbidden":
                names = sorted(f.alias or n for n, f in params_model.model_fields.items())
                yield (
                    f"{path}.{loc}: unknown parameter of {name}"
                    f" (known: {', '.join(names) or 'none'})"
                )
            elif err["type"] == "missing":
                yield f"{path}.{loc}: required by strategy {name} but missing (add it)"
            else:
                yield f"{path}.{loc}: {err['msg']} (got {_show(err.get('input'))})"
        return
    strat_types = strategies.key_types(name)
    if key_type not in strat_types:
        allowed = ", ".join(sorted(t.value for t in strat_types))
        yield (
            f"{path}: strategy {name} cannot route a {key_type.value} column"
            f" (it takes {allowed}; fix the column's type or pick another strategy)"
        )
        return
    context = StrategyContext(
        slots=model.slots, id_layout=_layout_or_none(model), key_type=key_type
    )
    try:
        strategies.build(name, params, context)
    except (ValueError, TypeError) as exc:
        yield f"{path}: {exc}"


def _layout_or_none(model: TopologyConfig) -> IdLayout | None:
    try:
        return model.id_layout()
    except ValueError:
        return None


def _check_tables(model: TopologyConfig) -> Iterator[str]:
    tables = model.tables
    for name, table in tables.items():
        base = f"tables.{name}"
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,58}", name):
            yield f"{base}: name {name!r} is not a plain SQL identifier (letters, digits, '_')"
        if table.split > model.slots:
            yield f"{base}.split: {table.split} is more than the {model.slots} slots"
        kinds = [
            k for k, on in [("broadcast", table.broadcast), ("bound_to", table.bound_to)] if on
        ]
        if len(kinds) > 1:
            yield f"{base}: broadcast and bound_to exclude each other (keep one)"
            continue
        if table.broadcast:
            for field_name in ("column", "strategy"):
                if getattr(table, field_name) is not None:
                    yield f"{base}.{field_name}: a broadcast table has no {field_name} (remove it)"
            if table.secondary:
                yield f"{base}.secondary: a broadcast table has no sharding keys (remove it)"
            if table.split != 1:
                yield f"{base}.split: a broadcast table is not split (remove split)"
            continue
        if table.bound_to is not None:
            yield from _check_bound(name, table, tables)
        elif table.column is None or table.strategy is None:
            missing = " and ".join(
                f for f, v in [("column", table.column), ("strategy", table.strategy)] if v is None
            )
            yield (
                f"{base}: {missing} missing (give column and strategy, or bound_to: <table>,"
                " or broadcast: true)"
            )
            continue
        else:
            yield from _check_strategy(
                f"{base}.strategy", table.strategy, table.type, model, primary=True
            )
        yield from _check_secondaries(name, table, model)


def _check_bound(name: str, table: TableConfig, tables: Mapping[str, TableConfig]) -> Iterator[str]:
    base = f"tables.{name}"
    owner_name = table.bound_to
    owner = tables.get(owner_name or "")
    if owner is None:
        yield (
            f"{base}.bound_to: unknown table {owner_name!r}"
            f" (known: {', '.join(sorted(tables)) or 'none'})"
        )
    elif owner_name == name:
        yield f"{base}.bound_to: a table cannot be bound to itself"
    elif owner.broadcast or owner.bound_to is not None:
        what = "broadcast" if owner.broadcast else f"itself bound to {owner.bound_to}"
        yield (
            f"{base}.bound_to: {owner_name} is {what}"
            " (bind to a table that has its own column and strategy)"
        )
    for field_name in ("column", "strategy"):
        if getattr(table, field_name) is not None:
            yield (f"{base}.{field_name}: a bound table takes its owner's {field_name} (remove it)")
    if owner is not None and table.split != 1 and table.split != owner.split:
        yield (f"{base}.split: a bound table is split like its owner ({owner.split}); remove split")


def _check_secondaries(name: str, table: TableConfig, model: TopologyConfig) -> Iterator[str]:
    primary_column = table.column
    if table.bound_to is not None:
        owner = model.tables.get(table.bound_to)
        primary_column = owner.column if owner is not None else None
    seen: set[str] = set()
    if primary_column is not None and primary_column != primary_column.lower():
        yield (
            f"tables.{name}.column: {primary_column!r} must be lowercase (MySQL column names"
            f" ignore case, and routing compares them lowercased): write {primary_column.lower()!r}"
        )
    for i, key in enumerate(table.secondary):
        if key.column != key.column.lower():
            yield (
                f"tables.{name}.secondary[{i}].column: {key.column!r} must be lowercase (MySQL"
                f" column names ignore case): write {key.column.lower()!r}"
            )
        path = f"tables.{name}.secondary[{i}]"
        if key.column == primary_column or key.column in seen:
            yield f"{path}.column: {key.column!r} is already a sharding column of {name}"
        seen.add(key.column)
        yield from _check_strategy(f"{path}.strategy", key.strategy, key.type, model, primary=False)
        strat, params = _strategy_name_and_params(key.strategy)
        if strat == "lookup":
            yield from _check_lookup_target(path, key, params, name, model)


def _check_lookup_target(
    path: str,
    key: SecondaryKeyConfig,
    params: Mapping[str, Any],
    owner: str,
    model: TopologyConfig,
) -> Iterator[str]:
    lookup_name = params.get("table")
    if not isinstance(lookup_name, str):
        return
    lookup = model.tables.get(lookup_name)
    where = f"{path}.strategy.table"
    if lookup is None:
        yield (
            f"{where}: unknown table {lookup_name!r} (define the lookup table under tables:,"
            f" sharded by {params.get('from', key.column)})"
        )
        return
    if lookup_name == owner:
        yield f"{where}: a table cannot be its own lookup table"
        return
    if lookup.column != params.get("from"):
        yield (
            f"{path}.strategy.from: {params.get('from')!r} is not the sharding column of"
            f" {lookup_name} ({lookup.column!r}); a lookup table is sharded by its 'from' column"
        )
    if lookup.type != key.type:
        yield (
            f"{path}.type: {key.type.value} but lookup table {lookup_name} is sharded by a"
            f" {lookup.type.value} column (make them the same)"
        )
    owner_table = model.tables[owner]
    owner_column = owner_table.column
    if owner_table.bound_to is not None:
        bound_owner = model.tables.get(owner_table.bound_to)
        owner_column = bound_owner.column if bound_owner is not None else None
    if params.get("to") != owner_column:
        yield (
            f"{path}.strategy.to: {params.get('to')!r} is not {owner}'s sharding column"
            f" ({owner_column!r}); a lookup maps to the owner's primary key"
        )


__all__ = [
    "DatabaseURL",
    "IdConfig",
    "MetaConfig",
    "MovingSlotsConfig",
    "PoolConfig",
    "SecondaryKeyConfig",
    "ShardConfig",
    "TableConfig",
    "TopologyConfig",
    "check",
    "config_from_dict",
    "database_identity",
    "load_config",
    "parse_yaml",
    "safe_url",
    "same_database",
    "validate_file",
]
