"""The exception hierarchy of shardrouter: every error the library raises derives from one root.

::

    ShardRouterError                    root; catch this to catch everything shardrouter raises
    ├── ConfigError                     a topology file or model is invalid (load time);
    │                                   ``.problems`` lists every problem found, not only the first
    ├── RoutingError                    a statement or key cannot be routed (run time)
    │   ├── UnknownTableError           the logical table is not in the topology
    │   ├── UnknownKeyError             the column is not a sharding column of that table
    │   ├── KeyValueError               the key's value has the wrong type, is NULL or out of range
    │   ├── UnsupportedQueryError       the planner cannot run this SQL correctly on shards
    │   ├── ScatterWriteError           an UPDATE/DELETE without a sharding key, not allowed
    │   └── FanoutLimitError            a query exceeds the configured fan-out or OFFSET cap
    ├── ExecutionError                  a statement failed on a shard (``.shard``, ``.orig``)
    │   ├── ShardUnavailableError       the shard did not answer within its timeout
    │   ├── LockConflictError           a lock wait timed out or a deadlock was broken (1205,
    │   │                               1213): the statement did not apply; retry it
    │   ├── TransactionAbortedError     an earlier statement of this transaction failed so that
    │   │                               it cannot go on: roll it back, retry it whole
    │   └── CrossShardTransactionError  a transaction would touch a second shard (no XA)
    ├── IdError                         id generation or decoding failed
    │   ├── ClockMovedBackwardsError    the clock went back further than the configured bound
    │   ├── IdGeneratorForkedError      a generator was inherited through fork(): the child
    │   │                               must make its own, with its own worker_id
    │   ├── IdDecodeError               a value is not an id of this layout
    │   └── WorkerLeaseError            no worker id could be leased, or the lease was lost:
    │                                   the generator stops issuing ids rather than risk a repeat
    ├── SchemaError                     a migration file is invalid, or could not be applied to a
    │                                   shard (``.shard``, ``.version`` when known)
    ├── MetaStoreError                  the meta store is missing its tables, holds a newer schema,
    │   │                               or refused an operation
    │   ├── MetaStoreUnavailableError   the meta store did not answer (routers keep serving their
    │   │                               version; their writes fence once their lease expires)
    │   ├── MetaStoreDocumentError      a stored topology version's document is not a JSON object
    │   │                               (changed outside shardctl): ``.version`` names it
    │   └── ConcurrentChangeError       another process changed the same thing first (a push
    │                                   raced another push): re-read and retry
    ├── TopologyChangeError             a proposed topology change cannot be applied live (it
    │                                   would move data or change what cannot change)
    ├── FencedError                     a write refused: this router's lease expired (it cannot
    │   │                               know which slots are moving), or the write's topology
    │   │                               version is older than one it acknowledged (moving slot)
    │   └── SwitchHoldError             a write to slots being switched between shards was held
    │                                   longer than the hold allows (or the queue was full):
    │                                   it ran nowhere; retry it
    ├── ReshardError                    a resharding migration cannot do what was asked
    │   ├── ReshardPlanError            the plan's arguments or topologies are invalid
    │   ├── ReshardStateError           an illegal transition (``.legal`` lists the next steps)
    │   └── ReshardDataError            the two sides differ where they must not (verify), or a
    │                                   shard's tables cannot take part (no primary key, ...)
    ├── RouterForkedError               a router following the meta store was inherited through
    │                                   fork(): build the router in the child, after forking
    └── SandboxError                    the local MariaDB sandbox could not start or stop
        ├── ServerBinaryMissingError    mariadbd / mariadb-install-db are not installed
        └── PortInUseError              a port the sandbox needs is taken by another process

Configuration problems are raised when a topology is loaded; routing and id problems when a key
is routed. Messages name the operation, the value and the way out. Handle errors by class,
never by message text.
"""

from __future__ import annotations

from collections.abc import Sequence


class ShardRouterError(Exception):
    """Root of every exception raised by shardrouter."""


class ConfigError(ShardRouterError):
    """A topology configuration is invalid; raised at load time, before anything is applied.

    ``problems`` holds one human-readable line per problem, each naming the field path, the bad
    value and the fix; ``source`` names the file (or ``<dict>``) the configuration came from.
    """

    def __init__(self, problems: Sequence[str], source: str = "<config>") -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        self.source = source
        lines = "\n".join(f"  {source}: {p}" for p in self.problems)
        count = len(self.problems)
        noun = "problem" if count == 1 else "problems"
        super().__init__(f"invalid topology config {source} ({count} {noun}):\n{lines}")


class RoutingError(ShardRouterError):
    """A key or statement cannot be routed to a shard."""


class UnknownTableError(RoutingError):
    """The logical table is not defined in the topology."""


class UnknownKeyError(RoutingError):
    """The column given as a key is not a sharding column (primary or secondary) of the table."""


class KeyValueError(RoutingError):
    """A sharding key's value has the wrong type, is NULL, or is outside the strategy's domain."""


class UnsupportedQueryError(RoutingError):
    """The planner cannot run this statement correctly on shards; the message names the
    construct and what to do instead. Nothing was executed."""


class ScatterWriteError(RoutingError):
    """An UPDATE or DELETE has no sharding-key predicate and scatter writes are not allowed."""


class FanoutLimitError(RoutingError):
    """A query would reach more shards, or skip more rows (OFFSET), than configured."""


class ExecutionError(ShardRouterError):
    """A statement failed on a shard. ``shard`` names it; ``orig`` is the driver's error."""

    def __init__(
        self, message: str, *, shard: str | None = None, orig: BaseException | None = None
    ):
        super().__init__(message)
        self.shard = shard
        self.orig = orig


class ShardUnavailableError(ExecutionError):
    """A shard did not answer (refused, timed out, went away); other shards keep serving."""


class LockConflictError(ExecutionError):
    """A lock wait timed out (1205) or the shard broke a deadlock (1213): another writer held
    the rows. Retryable: the statement (after a deadlock, its whole transaction) was rolled
    back on that shard."""


class TransactionAbortedError(ExecutionError):
    """A transaction whose earlier statement failed so that its connection is gone or its
    state unknown (a statement timed out, say): nothing more runs in it; roll it back and
    retry the transaction from its start."""


class CrossShardTransactionError(ExecutionError):
    """A transaction would touch a second shard and XA mode is not configured."""


class IdError(ShardRouterError):
    """Id generation or decoding failed."""


class ClockMovedBackwardsError(IdError):
    """The wall clock moved backwards by more than the configured bound; no id was issued."""


class IdGeneratorForkedError(IdError):
    """An IdGenerator was used in a process forked after it was made: parent and child would
    issue the same ids (same worker, same state). Make a new generator in the child, with a
    worker_id no other live process uses."""


class IdDecodeError(IdError):
    """A value cannot be an id of this layout (not an integer, negative, or wider than 63 bits)."""


class SchemaError(ShardRouterError):
    """A migration (``migrations/NNNN_*.sql``) is invalid, cannot be rendered for the topology,
    or cannot be applied to a shard: a bad file name, an unknown table, a migration edited after
    it was applied, an existing table that is not the one the migration creates.

    ``shard`` and ``version`` name where it happened when that is known.
    """

    def __init__(self, message: str, *, shard: str | None = None, version: int | None = None):
        super().__init__(message)
        self.shard = shard
        self.version = version


class WorkerLeaseError(IdError):
    """No worker id could be leased from the meta store (all taken, or the store did not
    answer), or a held lease could not be renewed before it expired: the generator refuses to
    issue ids, since another process may now hold its worker id."""


class MetaStoreError(ShardRouterError):
    """The meta store cannot be used: its tables are missing (run ``shardctl meta init``), it
    holds a schema newer than this release, or it refused an operation."""


class MetaStoreUnavailableError(MetaStoreError):
    """The meta store did not answer within its timeout. A router keeps serving the version it
    has; once its lease has expired it refuses every write (FencedError) until it renews."""


class MetaStoreDocumentError(MetaStoreError):
    """A stored topology version's document does not parse as a JSON object (the row was
    edited or truncated outside shardctl). ``version`` is the version's number. Routers
    already serving keep their version and do not apply it."""

    def __init__(self, message: str, version: int) -> None:
        super().__init__(message)
        self.version = version


class ConcurrentChangeError(MetaStoreError):
    """Another process changed the same record first (optimistic check): e.g. two
    ``topology push`` of the same base version; the second fails. Re-read, then retry."""


class TopologyChangeError(ShardRouterError):
    """A proposed topology version cannot be applied live: it moves slots between shards (use
    ``shardctl reshard``), changes the slot count or the id layout of a live cluster, or is
    otherwise unsafe without moving data. ``problems`` lists each reason with its way out."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: tuple[str, ...] = tuple(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"the topology change cannot be applied live:\n{lines}")


class FencedError(ShardRouterError):
    """A write refused by the fence of the control plane (shardrouter.control.follow).

    Either this router could not renew its lease with the meta store before the lease expired
    (by its own clock): it cannot know which slots started moving since, so it refuses every
    write (``slot`` names the write's slot when the door knows it); reads go on, and it
    recovers by itself once the meta store answers again and it has caught up. Or the write
    runs on a snapshot pinned before such a lapse (end the transaction, session or
    connection() block and start a new one). Or the write's topology version is older than
    one this router acknowledged and its slot is moving: retry it on the new version. Or an
    ORM object loaded under an older version is written where its slot no longer lives:
    reload it in the session."""

    def __init__(self, message: str, *, slot: int | None = None) -> None:
        super().__init__(message)
        self.slot = slot


class SwitchHoldError(FencedError):
    """A write to slots whose placement is being switched between shards (a resharding
    migration's switch: writes to them are held, not failed, for a moment) was held longer
    than the router's hold limit, or the router's hold queue was full. Nothing ran: retry
    the statement (or the transaction). ``slots`` names the range."""

    def __init__(self, message: str, *, slots: tuple[int, int] | None = None) -> None:
        super().__init__(message, slot=slots[0] if slots else None)
        self.slots = slots


class ReshardError(ShardRouterError):
    """A resharding migration (``shardrouter.reshard``, ``shardctl reshard``) cannot do what
    was asked."""


class ReshardPlanError(ReshardError):
    """A resharding plan cannot be made: bad arguments, or a proposed topology that does not
    describe slot moves (``problems`` lists each reason with its way out)."""

    def __init__(self, problems: Sequence[str] | str) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        lines = "\n".join(f"  {p}" for p in self.problems)
        super().__init__(f"cannot plan the resharding:\n{lines}")


class ReshardStateError(ReshardError):
    """An action that is illegal in the migration's current phase (switch writes before the
    copy was verified, finalize before the switch, cancel after it, a second migration over
    the same slots). ``legal`` lists the actions that are allowed now."""

    def __init__(self, message: str, *, legal: Sequence[str] = ()) -> None:
        self.legal: tuple[str, ...] = tuple(legal)
        hint = f"; allowed now: {', '.join(self.legal)}" if self.legal else ""
        super().__init__(message + hint)


class ReshardDataError(ReshardError):
    """The data cannot take part in a migration as it is (a table without a primary key, a
    target that already holds rows of the moving slots), or the two sides still differ after
    repair (verify)."""


class RouterForkedError(ShardRouterError):
    """A Router or AsyncRouter that follows a meta store (``meta:``) was inherited through
    ``fork()`` (multiprocessing 'fork', gunicorn --preload, Celery prefork): the child has no
    poller, so it would route by a version the cluster may have left behind, under the
    parent's registry row. Every statement, transaction and session refuses in the child;
    build the router in the child, after forking."""


class SandboxError(ShardRouterError):
    """The local MariaDB sandbox could not be started, reached or stopped."""


class ServerBinaryMissingError(SandboxError):
    """``mariadbd`` or ``mariadb-install-db`` is not installed on this machine."""


class PortInUseError(SandboxError):
    """A TCP port the sandbox wants is already taken by a process it did not start."""


__all__ = [
    "ClockMovedBackwardsError",
    "ConcurrentChangeError",
    "ConfigError",
    "CrossShardTransactionError",
    "ExecutionError",
    "FanoutLimitError",
    "FencedError",
    "IdDecodeError",
    "IdError",
    "IdGeneratorForkedError",
    "KeyValueError",
    "LockConflictError",
    "MetaStoreDocumentError",
    "MetaStoreError",
    "MetaStoreUnavailableError",
    "PortInUseError",
    "ReshardDataError",
    "ReshardError",
    "ReshardPlanError",
    "ReshardStateError",
    "RouterForkedError",
    "RoutingError",
    "SandboxError",
    "ScatterWriteError",
    "SchemaError",
    "ServerBinaryMissingError",
    "ShardRouterError",
    "ShardUnavailableError",
    "SwitchHoldError",
    "TopologyChangeError",
    "TransactionAbortedError",
    "UnknownKeyError",
    "UnknownTableError",
    "UnsupportedQueryError",
    "WorkerLeaseError",
]
