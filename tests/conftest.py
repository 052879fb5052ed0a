"""Shared fixtures: the MariaDB sandbox (4 shards for the whole session) and the oracle server.

The sandbox servers run detached, so every exit path stops them: the fixtures' own teardown,
pytest_sessionfinish, atexit, and SIGTERM turned into KeyboardInterrupt. A session killed with
SIGKILL leaves them running; the next session finds them in its fixed directory under the temp
dir and stops them before starting its own. Two sessions at once need different
SHARDROUTER_SANDBOX_PORT values (pytest-xdist workers are spread 100 ports apart).
"""

from __future__ import annotations

import atexit
import itertools
import os
import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import pytest

from shardrouter.ops import sandbox as sb

ORACLE_URL = os.environ.get("SHARDROUTER_ORACLE_URL", "mysql+pymysql://root@127.0.0.1:3306/")
SANDBOX_SHARDS = 4


def _base_port() -> int:
    raw = os.environ.get("SHARDROUTER_SANDBOX_PORT", "3401")
    try:
        port = int(raw)
    except ValueError:
        raise pytest.UsageError(
            f"SHARDROUTER_SANDBOX_PORT={raw!r} is not a port number; use e.g. 3401"
        ) from None
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ... under pytest-xdist
    if worker.startswith("gw") and worker[2:].isdigit():
        port += 100 * int(worker[2:])
    return port


SANDBOX_PORT = _base_port()  # the session sandbox: s0..s3 on SANDBOX_PORT..+3
SCRATCH_PORT = SANDBOX_PORT + 50  # throwaway sandboxes of tests that kill or break servers

_ROOT = Path(tempfile.gettempdir()) / f"shardrouter-pytest-{SANDBOX_PORT}"
_OWNER = _ROOT / "owner.pid"
_live: dict[Path, None] = {}  # sandbox directories this session may have servers in
_scratch_numbers = itertools.count()


def _down_all() -> None:
    """Stop every sandbox this session started; safe to call more than once."""
    for directory in list(_live):
        _live.pop(directory, None)
        sb.down(directory)


atexit.register(_down_all)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    _down_all()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim_root() -> None:
    """Make _ROOT ours: refuse if a live session owns it, stop what a dead one left behind."""
    try:
        owner = int(_OWNER.read_text().strip())
    except (OSError, ValueError):
        owner = 0
    if owner and owner != os.getpid() and _pid_alive(owner):
        raise RuntimeError(
            f"test session pid {owner} is using the sandbox ports {SANDBOX_PORT}.. "
            f"({_ROOT}); wait for it, or run with SHARDROUTER_SANDBOX_PORT=<another base port>"
        )
    if _ROOT.is_dir():
        for leftover in sorted(_ROOT.iterdir()):
            if (leftover / sb.STATE_FILE).is_file():
                sb.down(leftover)
    _ROOT.mkdir(parents=True, exist_ok=True)
    _OWNER.write_text(f"{os.getpid()}\n")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def _sandbox_root() -> Iterator[Path]:
    """The session's directory of sandboxes, cleared of leftovers, removed at the end."""
    _claim_root()
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:  # let `kill <pytest>` unwind through the teardowns
        signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield _ROOT
    finally:
        try:
            _down_all()
        finally:
            if previous is signal.SIG_DFL:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
            shutil.rmtree(_ROOT, ignore_errors=True)


@pytest.fixture(scope="session")
def sandbox(_sandbox_root: Path) -> Iterator[sb.Sandbox]:
    """Four MariaDB shards s0..s3 (databases orders_s0..), shared by the whole session.

    Tests must not stop or break these servers; use ``scratch_dir`` for that.
    """
    directory = _sandbox_root / "session"
    _live[directory] = None
    try:
        yield sb.up(directory, shards=SANDBOX_SHARDS, base_port=SANDBOX_PORT)
    finally:
        _live.pop(directory, None)
        sb.down(directory)


@pytest.fixture
def scratch_dir(_sandbox_root: Path) -> Iterator[Path]:
    """A fresh directory for a test's own sandbox (ports from ``scratch_port``); downed after."""
    directory = _sandbox_root / f"scratch-{next(_scratch_numbers)}"
    _live[directory] = None
    try:
        yield directory
    finally:
        _live.pop(directory, None)
        sb.down(directory)


@pytest.fixture(scope="session")
def scratch_port() -> int:
    """Base port for scratch sandboxes, away from the session sandbox's ports."""
    return SCRATCH_PORT


@pytest.fixture(scope="session")
def oracle(_sandbox_root: Path) -> Iterator[sb.Sandbox]:
    """One more MariaDB instance holding every row unsharded: the answer multi-shard queries
    must equal. Its own instance (not the system server) so a fresh machine needs nothing
    running, and with the same server settings and collation as the shards."""
    directory = _sandbox_root / "oracle"
    _live[directory] = None
    try:
        yield sb.up(directory, shards=1, base_port=SANDBOX_PORT + 20)
    finally:
        _live.pop(directory, None)
        sb.down(directory)


@pytest.fixture(scope="session")
def oracle_url() -> str:
    """The system MariaDB (one unsharded database), for ad-hoc comparisons."""
    return ORACLE_URL


@pytest.fixture(scope="module")
def shard_databases(sandbox: sb.Sandbox, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A topology file whose shards are fresh databases on the session sandbox, private to the
    requesting test module (``orders_s0_<module>`` ...), dropped when the module ends: modules
    cannot see each other's tables, whatever order they run in."""
    import yaml
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    suffix = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")[:24]
    raw = yaml.safe_load(sandbox.topology_path.read_text())
    created: list[tuple[str, str]] = []
    for shard in raw["shards"].values():
        url = make_url(shard["primary"])
        database = f"{url.database}_{suffix}"
        server = url.set(database="").render_as_string(hide_password=False)
        engine = create_engine(server)
        with engine.begin() as conn:
            conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
            conn.execute(text(f"CREATE DATABASE `{database}`"))
        engine.dispose()
        created.append((server, database))
        shard["primary"] = url.set(database=database).render_as_string(hide_password=False)
    path = sandbox.directory / f"topology-{suffix}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        yield path
    finally:
        for server, database in created:
            engine = create_engine(server)
            with engine.begin() as conn:
                conn.execute(text(f"DROP DATABASE IF EXISTS `{database}`"))
            engine.dispose()
