"""Topology versions: propose a YAML file, diff it against the current version, publish it.

The workflow of ``shardctl topology push`` (the CLI only prints and asks):

1. :func:`read_proposal` reads the file. The raw document is kept as written, ``${VAR}``
   placeholders unexpanded (what is stored: a secret reaches the store only if it was written
   literally), and validated with ``config_from_dict`` in this process's environment.
2. :func:`open_store` finds the meta store: the file's ``meta:`` section or an explicit URL
   (and refuses a file whose ``meta.url`` names another store than the one pushed to).
3. :func:`plan_push` checks that every URL's driver loads in this process
   (:func:`check_drivers`: a router lacking it would reject the version, so a typo like
   ``mysql+pymsql`` or a driver not installed is refused here, before anything is written),
   then loads the current version (validated in the same environment) and diffs
   (``control.diff``). With no version yet the push bootstraps: any valid config is accepted.
4. :func:`publish` refuses a plan with an unsafe change (TopologyChangeError listing every
   one, nothing written), otherwise ``MetaStore.push(document, expected=<the planned base>)``:
   one transaction, so a push that raced another from the same base fails with
   ConcurrentChangeError and writes nothing.

A push whose document equals the current one (``version:`` aside) is a no-op: nothing is
written and the current version is reported, so re-running a deployment's push is harmless and
no router swaps for nothing. A document that differs only where the diff cannot see it here
(a ``${VAR}`` renamed, a value the same in this environment) is published: routers expand
placeholders in their own environment, where it may differ.

The ``version:`` of a proposed file is ignored: the store numbers versions.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from ..core.config import TopologyConfig, config_from_dict, parse_yaml, safe_url
from ..errors import ConfigError, MetaStoreError, MetaStoreUnavailableError, TopologyChangeError
from .diff import TopologyDiff, diff_topologies
from .store import MetaStore, RouterRecord, TopologyVersion


@dataclass(frozen=True, slots=True)
class Proposal:
    """A topology proposed for publication: the raw document and its validated config."""

    source: str
    document: Mapping[str, Any]
    """As written (``${VAR}`` kept), normalised to JSON types, without ``version``."""
    config: TopologyConfig


def read_proposal(path: str | Path, env: Mapping[str, str] | None = None) -> Proposal:
    """Read and validate a proposed topology file; ConfigError lists every problem."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read the file: {exc.strerror}"], source) from None
    raw = parse_yaml(text, source)
    config = config_from_dict(raw, source=source, env=env)
    return Proposal(source, normalise(raw), config)


def normalise(document: Mapping[str, Any]) -> dict[str, Any]:
    """A document as the store keeps it (JSON types: YAML dates become text), without the
    ``version`` the store assigns."""
    body: dict[str, Any] = json.loads(json.dumps(dict(document), sort_keys=True, default=str))
    body.pop("version", None)
    return body


def version_config(
    version: TopologyVersion, env: Mapping[str, str] | None = None
) -> TopologyConfig:
    """The validated config of a stored version, its ``${VAR}`` expanded in ``env``."""
    return config_from_dict(
        dict(version.document), source=f"meta store version {version.version}", env=env
    )


# -- the store -------------------------------------------------------------------------------


def meta_url(config: TopologyConfig | None, explicit: str | None, source: str) -> URL:
    """The meta store's URL: ``explicit`` (--meta-url) or the config's ``meta.url``.

    ConfigError when neither is given, or when both are and they differ (a document naming
    another store than the one it is stored in would send routers elsewhere)."""
    named = config.meta.url if config is not None and config.meta is not None else None
    if explicit is None:
        if named is None:
            raise ConfigError(
                [
                    "meta: missing: no meta store is named (add a meta: {url: ...} section,"
                    ' e.g. meta: {url: "mysql+pymysql://user:${META_PASSWORD}@host/shardmeta"},'
                    " or pass --meta-url URL)"
                ],
                source,
            )
        return named
    try:
        url = make_url(explicit)
    except (ArgumentError, ValueError):  # ValueError: a port that is not a number
        raise MetaStoreError(
            f"--meta-url: {safe_url(explicit)!r} is not a database URL (write e.g."
            " mysql+pymysql://user:pass@host/shardmeta or sqlite:///meta.db)"
        ) from None
    if named is not None and _full(named) != _full(url):
        raise ConfigError(
            [
                f"meta.url: {safe_url(named)} is not the meta store pushed to"
                f" ({safe_url(url)}); drop --meta-url to use the file's store, or make"
                " meta.url name the store you push to"
            ],
            source,
        )
    return url


def open_store(config: TopologyConfig | None, explicit: str | None, source: str) -> MetaStore:
    """The meta store named by ``explicit`` or ``config.meta`` (its timeouts when given)."""
    url = meta_url(config, explicit, source)
    meta = config.meta if config is not None else None
    if meta is not None and _full(meta.url) == _full(url):
        return MetaStore(url, config=meta)
    return MetaStore(url)


def _full(url: URL) -> str:
    return url.render_as_string(hide_password=False)


# -- push ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PushPlan:
    """What a push would do: the base version it was diffed against and the diff."""

    proposal: Proposal
    base: TopologyVersion | None
    diff: TopologyDiff

    @property
    def base_version(self) -> int | None:
        return None if self.base is None else self.base.version

    @property
    def bootstrap(self) -> bool:
        """No version yet: this push publishes the first."""
        return self.base is None

    @property
    def unchanged(self) -> bool:
        """The proposed document is the current one: nothing to publish."""
        return self.base is not None and normalise(self.base.document) == self.proposal.document

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.proposal.source,
            "base_version": self.base_version,
            "bootstrap": self.bootstrap,
            "unchanged": self.unchanged,
            **self.diff.as_dict(),
        }


def plan_push(
    store: MetaStore, proposal: Proposal, env: Mapping[str, str] | None = None
) -> PushPlan:
    """Diff ``proposal`` against the store's current version (nothing is written).

    ConfigError when a URL's driver cannot be loaded here (:func:`check_drivers`)."""
    check_drivers(proposal.config, proposal.source)
    base = store.current()
    if base is None:
        return PushPlan(proposal, None, TopologyDiff())
    running = sorted({str(m.get("migration") or "?") for m in base.document.get("moving") or ()})
    if running:
        # A migration's plan fixed its tables and shards when it was made: a table added
        # now would get no journal, no copy and no verify, and its rows of the moving slots
        # would be left behind at the switch (review 9). The migration owns the topology.
        raise TopologyChangeError(
            [
                f"migration {', '.join(running)} is moving slots (version {base.version}):"
                " the topology cannot change under it; push after it is finalized or"
                " cancelled (`shardctl reshard status` shows it)"
            ]
        )
    return PushPlan(proposal, base, diff_topologies(version_config(base, env), proposal.config))


def publish(
    store: MetaStore, plan: PushPlan, *, comment: str = "", pushed_by: str | None = None
) -> int:
    """Publish a plan as the next version; returns its number (the base's, unchanged, for a
    plan with nothing to publish). TopologyChangeError when a change is unsafe live;
    ConcurrentChangeError when another push moved the current version since the plan."""
    plan.diff.raise_if_refused()
    if plan.unchanged:
        assert plan.base is not None
        return plan.base.version
    try:
        return store.push(
            plan.proposal.document,
            expected=plan.base_version,
            comment=comment,
            pushed_by=pushed_by,
        )
    except MetaStoreUnavailableError as exc:
        # It may have stopped answering after the commit reached it: nobody can tell here.
        n = 1 if plan.base_version is None else plan.base_version + 1
        raise MetaStoreUnavailableError(
            f"{exc}. The push of version {n} was interrupted: whether it was published is"
            " unknown. Once the store answers, check with `shardctl topology history` (or"
            " `shardctl topology status`); pushing the same file again is safe: it publishes"
            " nothing if the version landed"
        ) from exc


@dataclass(frozen=True, slots=True)
class PushResult:
    plan: PushPlan
    status: str
    """``published``, ``unchanged`` (nothing written), ``dry-run`` or ``declined``."""
    version: int | None


def push_file(
    store: MetaStore,
    path: str | Path,
    *,
    comment: str = "",
    dry_run: bool = False,
    confirm: Callable[[PushPlan], bool] | None = None,
    env: Mapping[str, str] | None = None,
) -> PushResult:
    """The whole push for library callers: read, plan, refuse or publish.

    ``confirm`` is asked when a change needs the operator's word (a primary re-pointed);
    without it such a push is declined. Raises TopologyChangeError for unsafe changes (also
    on a dry run), ConcurrentChangeError when another push won."""
    plan = plan_push(store, read_proposal(path, env), env)
    plan.diff.raise_if_refused()
    if plan.unchanged:
        return PushResult(plan, "unchanged", plan.base_version)
    if dry_run:
        return PushResult(plan, "dry-run", None)
    if plan.diff.confirmations and (confirm is None or not confirm(plan)):
        return PushResult(plan, "declined", None)
    return PushResult(plan, "published", publish(store, plan, comment=comment))


# -- drivers ---------------------------------------------------------------------------------

# The pip package of each DBAPI driver SQLAlchemy names (the driver part of mysql+<driver>).
_PACKAGES = {
    "pymysql": "PyMySQL",
    "mysqldb": "mysqlclient",
    "mariadbconnector": "mariadb",
    "mysqlconnector": "mysql-connector-python",
    "aiomysql": "aiomysql",
    "asyncmy": "asyncmy",
    "cymysql": "cymysql",
    "pyodbc": "pyodbc",
    "aiosqlite": "aiosqlite",
    "pysqlcipher": "sqlcipher3",
}


def driver_problem(url: URL) -> str | None:
    """Why ``url``'s SQLAlchemy dialect or DBAPI driver cannot be loaded in this process
    (the way out included), or None when it loads. Nothing connects."""
    name = url.drivername
    try:
        dialect = url.get_dialect()
    except NoSuchModuleError:
        return (
            f"SQLAlchemy knows no driver {name!r} (a typo? write e.g. mysql+pymysql://,"
            " mariadb+mariadbconnector:// or sqlite:///)"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        driver = dialect.driver
        package = _PACKAGES.get(driver, driver)
        return (
            f"driver {driver} ({name}) cannot be loaded on this host: {exc}"
            f" (`pip install {package}` here; every router needs it too)"
        )
    return None


def check_drivers(config: TopologyConfig, source: str = "<config>") -> None:
    """ConfigError listing every URL (shard primaries and replicas, the meta store) whose
    driver this process cannot load: routers without it would reject the version (it would
    be stored, never served), so a push refuses it before writing anything."""
    urls: list[tuple[str, URL]] = []
    for name, shard in config.shards.items():
        urls.append((f"shards.{name}.primary", shard.primary))
        urls += [(f"shards.{name}.replicas[{i}]", u) for i, u in enumerate(shard.replicas)]
    if config.meta is not None:
        urls.append(("meta.url", config.meta.url))
    problems: list[str] = []
    seen: dict[str, str | None] = {}
    for path, url in urls:
        if url.drivername not in seen:
            seen[url.drivername] = driver_problem(url)
        problem = seen[url.drivername]
        if problem is not None:
            problems.append(f"{path}: {problem}; routers would reject this version")
    if problems:
        raise ConfigError(problems, source)


# -- reading the store for status, history, show -----------------------------------------------


@dataclass(frozen=True, slots=True)
class RouterState:
    """One registered router as ``topology status`` shows it."""

    record: RouterRecord
    current: int | None

    @property
    def lagging(self) -> bool:
        """Its lease expired, or it has not acknowledged the current version."""
        behind = self.current is not None and self.record.acked_version < self.current
        return behind or not self.record.live

    @property
    def lease_left_ms(self) -> int:
        return self.record.lease_expires_at_ms - self.record.now_ms

    def as_dict(self) -> dict[str, Any]:
        r = self.record
        return {
            "instance_id": r.instance_id,
            "host": r.host,
            "pid": r.pid,
            "kind": r.kind,
            "serving_version": r.serving_version,
            "acked_version": r.acked_version,
            "heartbeat_age_ms": r.heartbeat_age_ms,
            "lease_left_ms": self.lease_left_ms,
            "live": r.live,
            "lagging": self.lagging,
        }


@dataclass(frozen=True, slots=True)
class ClusterStatus:
    current: int | None
    routers: tuple[RouterState, ...]

    @property
    def lagging(self) -> tuple[RouterState, ...]:
        return tuple(r for r in self.routers if r.lagging)

    def as_dict(self) -> dict[str, Any]:
        return {
            "current_version": self.current,
            "routers": [r.as_dict() for r in self.routers],
            "lagging": [r.record.instance_id for r in self.lagging],
        }


def cluster_status(store: MetaStore) -> ClusterStatus:
    """The current version and every registered router (lagging ones flagged)."""
    current = store.current_version()
    return ClusterStatus(current, tuple(RouterState(r, current) for r in store.routers()))


def summary(version: TopologyVersion, current: int | None) -> dict[str, Any]:
    """One line of ``topology history``: provenance and the document's size (no URLs)."""
    doc = version.document
    shards = doc.get("shards")
    tables = doc.get("tables")
    return {
        "version": version.version,
        "current": version.version == current,
        "pushed_by": version.pushed_by,
        "pushed_at": iso_ms(version.pushed_at_ms),
        "comment": version.comment,
        "name": doc.get("name", "default"),
        "shards": len(shards) if isinstance(shards, Mapping) else 0,
        "tables": len(tables) if isinstance(tables, Mapping) else 0,
    }


def iso_ms(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds")


def masked(document: Any) -> Any:
    """``document`` with every password in a URL masked (``${VAR}`` placeholders are kept
    when they are the whole password: they name a variable, not a secret; a ``${VAR:-...}``
    default is masked, since it may be one)."""
    if isinstance(document, Mapping):
        return {k: masked(v) for k, v in document.items()}
    if isinstance(document, list):
        return [masked(v) for v in document]
    if isinstance(document, str) and "://" in document:
        return _mask_url_text(document)
    return document


def _mask_url_text(text: str) -> str:
    try:
        url = make_url(text)
    except (ArgumentError, ValueError):  # not a URL after all: mask what looks like one
        return safe_url(text)
    if url.password is None and not any("pass" in k.lower() for k in url.query):
        return text  # nothing secret: shown as written (placeholders not percent-encoded)
    whole = re.search(r"(?<=:)(\$\{[A-Za-z_][A-Za-z0-9_]*\})(?=@)", text)
    if whole is None:
        return safe_url(text)
    # The password is a bare placeholder: mask the text with a plain token in its place (a
    # placeholder does not survive URL parsing as itself), then put the placeholder back.
    out = safe_url(text[: whole.start()] + "placeholder" + text[whole.end() :])
    return out.replace(":***@", f":{whole.group(1)}@", 1)


__all__ = [
    "ClusterStatus",
    "Proposal",
    "PushPlan",
    "PushResult",
    "RouterState",
    "check_drivers",
    "cluster_status",
    "driver_problem",
    "iso_ms",
    "masked",
    "meta_url",
    "normalise",
    "open_store",
    "plan_push",
    "publish",
    "push_file",
    "read_proposal",
    "summary",
    "version_config",
]
