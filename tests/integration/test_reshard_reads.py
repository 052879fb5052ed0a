"""Reads while slots move (issue 9): a migration's copies must never be read as rows of their
own. A shard that owns no slots yet (a target before its switch) holds copies and possibly
half-copied broadcast tables: reads across shards and broadcast reads skip it. A serving
shard holding copies of rows it does not own (a source after the switch, until finalize) would
count them twice in a read across shards: such a read is refused, typed; reads by key go to
the one owner. Real MariaDB; versions installed by hand (the follower installs them so)."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, text

from shardrouter.core.config import config_from_dict
from shardrouter.core.topology import Topology
from shardrouter.engine.router import Router
from shardrouter.errors import UnsupportedQueryError

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def docs(shard_databases: Path) -> Iterator[dict[str, dict[str, Any]]]:
    """ "copy": s3 is new (no slots) and listed first, holds copies of s0's moving slots and
    an empty copy of the broadcast table; "switched": s3 owns the moved range, s0 still holds
    its copies (and its other slots)."""
    raw = yaml.safe_load(shard_databases.read_text())
    raw["tables"] = {
        "notes": {"column": "user_id", "strategy": "hash"},
        "codes": {"broadcast": True},
    }
    for name, shard in raw["shards"].items():
        engine = create_engine(shard["primary"])
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS notes"))
            conn.execute(text("DROP TABLE IF EXISTS codes"))
            conn.execute(text("CREATE TABLE notes (user_id BIGINT PRIMARY KEY, body TEXT)"))
            conn.execute(text("CREATE TABLE codes (code CHAR(2) PRIMARY KEY)"))
            if name != "s3":  # the new shard's broadcast copy is not there yet
                conn.execute(text("INSERT INTO codes VALUES ('de'), ('fr')"))
        engine.dispose()
    shards = raw["shards"]
    before = copy.deepcopy(raw)
    before["shards"] = {
        "s3": {**shards["s3"], "slots": []},
        "s0": {**shards["s0"], "slots": [[0, 512]]},
        "s1": {**shards["s1"], "slots": [[512, 1024]]},
    }
    moving = {"slots": [256, 512], "source": "s0", "target": "s3"}
    copying = copy.deepcopy(before)
    copying["moving"] = [{**moving, "write_mode": "dual_old_primary"}]
    switched = copy.deepcopy(before)
    switched["shards"]["s0"]["slots"] = [[0, 256]]
    switched["shards"]["s3"]["slots"] = [[256, 512]]
    switched["moving"] = [{**moving, "write_mode": "dual_new_primary"}]
    yield {"before": before, "copy": copying, "switched": switched}


def _fill(router: Router, users: range) -> None:
    for u in users:
        router.execute("INSERT INTO notes (user_id, body) VALUES (:u, 'x')", {"u": u})


def _copy_moving(doc: dict[str, Any], topology: Topology) -> int:
    """What the backfill does: the moving rows of s0 copied to s3."""
    source = create_engine(doc["shards"]["s0"]["primary"])
    target = create_engine(doc["shards"]["s3"]["primary"])
    with source.connect() as conn:
        rows = [tuple(r) for r in conn.execute(text("SELECT user_id, body FROM notes"))]
    moving = [r for r in rows if 256 <= topology.slot_for("notes", r[0]) < 512]
    with target.begin() as conn:
        for r in moving:
            conn.execute(text("INSERT INTO notes VALUES (:u, :b)"), {"u": r[0], "b": r[1]})
    source.dispose()
    target.dispose()
    return len(moving)


def test_reads_skip_a_shard_without_slots_and_refuse_to_count_copies_twice(
    docs: dict[str, dict[str, Any]],
) -> None:
    before = Topology(config_from_dict(docs["before"]))
    router = Router(before)
    try:
        _fill(router, range(1, 201))
        copied = _copy_moving(docs["before"], before)
        assert copied > 10
        # Before the switch: s3 holds copies but owns nothing; reads do not see them.
        router._install(Topology(config_from_dict(docs["copy"])))
        assert router.execute("SELECT COUNT(*) FROM notes").rows == [(200,)]
        codes = router.execute("SELECT code FROM codes ORDER BY code").rows
        assert codes == [("de",), ("fr",)]  # not s3's empty copy, though s3 is listed first
        target = create_engine(docs["before"]["shards"]["s3"]["primary"])
        with target.begin() as conn:  # the migration copies broadcast tables before its switch
            conn.execute(text("INSERT INTO codes VALUES ('de'), ('fr')"))
        target.dispose()
        # After the switch: s0 keeps copies until finalize; a read across shards is refused.
        router._install(Topology(config_from_dict(docs["switched"])))
        with pytest.raises(UnsupportedQueryError, match=r"shard s0 holds copies .* twice"):
            router.execute("SELECT COUNT(*) FROM notes")
        moved = next(u for u in range(1, 201) if 256 <= before.slot_for("notes", u) < 512)
        assert router.execute("SELECT user_id FROM notes WHERE user_id = :u", {"u": moved}).rows
        assert router.execute("SELECT code FROM codes ORDER BY code").rows == [("de",), ("fr",)]
    finally:
        router.close()
