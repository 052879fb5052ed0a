"""Online resharding: moving slots between shards while the service writes (docs/RESHARDING.md).

``spec`` (what moves), ``journal`` (triggers + drain), ``copy`` (backfill, verify, cleanup),
``plan`` and ``phases`` (pure), ``state`` (the meta store's record), ``workflow`` (the
orchestration behind ``shardctl reshard``).
"""
