"""Local MariaDB instances, one ``mariadbd`` per shard, for tests and demos."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pymysql
import yaml

from ..errors import PortInUseError, SandboxError, ServerBinaryMissingError

__all__ = [
    "DEFAULT_TEMPLATE",
    "Sandbox",
    "SandboxShard",
    "down",
    "is_running",
    "kill_shard",
    "slot_ranges",
    "start_shard",
    "status",
    "up",
]

#: The topology template used when ``up`` is given none: the repository's ``config/orders.yaml``.
DEFAULT_TEMPLATE = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"

STATE_FILE = "sandbox.json"
TOPOLOGY_FILE = "topology.yaml"
_LOCK_FILE = ".sandbox.lock"
_TEMPLATE_DIR = "_template"
_STATE_FORMAT = 1

START_TIMEOUT = 60.0  # seconds a shard may take to answer after it was started
STOP_TIMEOUT = 20.0  # seconds a shard may take to stop after SIGTERM, before SIGKILL
_POLL = 0.1

_SERVER = "mariadbd"
_INSTALL_DB = "mariadb-install-db"
_EXTRA_BIN_DIRS = ("/usr/sbin", "/usr/local/sbin")
_INSTALL_HINT = "apt-get install -y mariadb-server"

_MAX_SOCKET_PATH = 100  # sun_path holds 107 bytes; keep a margin

# Options shared by mariadb-install-db and mariadbd (the redo log size must match the datadir).
_STORAGE_OPTIONS = (
    "--innodb-buffer-pool-size=32M",
    "--innodb-log-file-size=16M",
)
# A small, fast server: a process crash loses no committed transaction with
# flush_log_at_trx_commit=2 (only an OS crash could), which is all tests and demos need.
# utf8mb4_general_ci matches Debian's packaged server, the usual oracle in tests.
_SERVER_OPTIONS = (
    *_STORAGE_OPTIONS,
    "--bind-address=127.0.0.1",
    "--skip-name-resolve",
    "--performance-schema=OFF",
    "--innodb-log-buffer-size=4M",
    "--innodb-flush-log-at-trx-commit=2",
    "--innodb-doublewrite=0",
    "--key-buffer-size=4M",
    "--aria-pagecache-buffer-size=8M",
    "--max-connections=300",
    "--character-set-server=utf8mb4",
    "--collation-server=utf8mb4_general_ci",
)

# Popen objects of the servers this process started, so they are reaped, never left as zombies.
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class SandboxShard:
    """One running (or recorded) sandbox instance."""

    name: str
    port: int
    socket: Path
    datadir: Path
    pid: int
    url: str


@dataclass(frozen=True)
class Sandbox:
    """A sandbox directory: its shards (in slot order) and the topology file written for them."""

    directory: Path
    shards: tuple[SandboxShard, ...]
    topology_path: Path

    def shard(self, name: str) -> SandboxShard:
        """The shard called ``name``; SandboxError if there is none."""
        for shard in self.shards:
            if shard.name == name:
                return shard
        known = ", ".join(s.name for s in self.shards) or "none"
        raise SandboxError(f"no shard {name!r} in sandbox {self.directory} (shards: {known})")


# --------------------------------------------------------------------------- public API


def up(
    directory: Path | str,
    shards: int = 4,
    base_port: int = 3401,
    template: Path | str | None = None,
) -> Sandbox:
    """Start ``shards`` MariaDB instances s0..s{N-1} on base_port.. and write topology.yaml.

    Idempotent: shards already running are kept, recorded shards whose process died are
    restarted on their datadir. If anything fails, the servers this call started are stopped and
    the files it created are removed before the error is raised.
    """
    _check_shape(shards, base_port)
    template_path = _resolve_template(template)
    template_doc = _load_template(template_path, shards)
    server, install_db = _find_binaries()

    root = Path(directory).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise SandboxError(f"sandbox directory {root} exists and is not a directory")
    created_root = not root.exists()
    try:
        root.mkdir(parents=True, exist_ok=True)
        with _locked(root):
            return _up_locked(
                root, shards, base_port, template_doc, server, install_db, created_root
            )
    except BaseException:
        if created_root:
            shutil.rmtree(root, ignore_errors=True)
        elif not (root / STATE_FILE).exists():
            (root / _LOCK_FILE).unlink(missing_ok=True)
        raise


def down(directory: Path | str) -> list[str]:
    """Stop every shard recorded in ``directory`` and remove what ``up`` created there.

    Returns the names of the shards that were running and were stopped (a shard already dead is
    cleaned up but not listed). A directory without a sandbox gives [] and is left untouched.
    """
    root = Path(directory).expanduser().resolve()
    if not (root / STATE_FILE).is_file():
        return []
    with _locked(root):
        state = _read_state(root)
        if state is None:
            return []
        stopped: list[str] = []
        for shard in _state_shards(state):
            if _stop_shard(shard):
                stopped.append(shard.name)
        for shard in _state_shards(state):
            _remove_shard_files(root, shard)
        shutil.rmtree(root / _TEMPLATE_DIR, ignore_errors=True)
        for name in (TOPOLOGY_FILE, STATE_FILE):
            (root / name).unlink(missing_ok=True)
        created_root = bool(state.get("created_directory", False))
    (root / _LOCK_FILE).unlink(missing_ok=True)
    if created_root:
        with contextlib.suppress(OSError):
            root.rmdir()  # only if now empty: never remove files up did not create
    return stopped


def status(directory: Path | str) -> Sandbox | None:
    """The sandbox recorded in ``directory``, or None. Use ``is_running`` for each shard's state."""
    root = Path(directory).expanduser().resolve()
    state = _read_state(root)
    if state is None:
        return None
    return _sandbox_from_state(root, state)


def is_running(shard: SandboxShard) -> bool:
    """True if the shard's recorded server process is alive (it may still be starting up)."""
    return _is_our_server(shard.pid, shard.datadir)


def kill_shard(sandbox: Sandbox, name: str) -> None:
    """SIGKILL one shard's server (a crash, for fault tests); a shard already dead is left so."""
    with _locked(sandbox.directory):
        shard = _current_shard(sandbox, name)
        if not _is_our_server(shard.pid, shard.datadir):
            return
        _signal(shard.pid, signal.SIGKILL)
        if not _wait_gone(shard.pid, shard.datadir, STOP_TIMEOUT):
            raise SandboxError(f"shard {name} (pid {shard.pid}) did not die after SIGKILL")


def pause_shard(sandbox: Sandbox, name: str, timeout_s: float = STOP_TIMEOUT) -> None:
    """SIGSTOP one shard's server (a hung server, for fault tests) and wait until it is stopped.

    ``kill()`` returns before the stop has reached every thread: the kernel hands SIGSTOP to one
    thread, which stops the others when it next runs. On a loaded machine a connection thread
    woken by a query can answer it in between, so this waits until /proc shows every thread
    stopped. Undo with ``resume_shard``.
    """
    shard = _current_shard(sandbox, name)
    if not _is_our_server(shard.pid, shard.datadir):
        raise SandboxError(f"shard {name} is not running; nothing to pause")
    _signal(shard.pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not _all_threads_stopped(shard.pid):
        if time.monotonic() > deadline:
            _signal(shard.pid, signal.SIGCONT)
            raise SandboxError(f"shard {name} (pid {shard.pid}) did not stop within {timeout_s} s")
        time.sleep(0.005)


def resume_shard(sandbox: Sandbox, name: str) -> None:
    """SIGCONT a shard paused with ``pause_shard``; harmless on a running or dead one."""
    shard = _current_shard(sandbox, name)
    if _is_our_server(shard.pid, shard.datadir):
        _signal(shard.pid, signal.SIGCONT)


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return False
    for task in tasks:
        try:
            stat = Path(f"/proc/{pid}/task/{task}/stat").read_text()
        except FileNotFoundError:
            continue  # the thread exited
        # Field 3 follows the command name, which is parenthesised and may hold spaces.
        if stat.rpartition(")")[2].split()[0] not in ("T", "t"):
            return False
    return True


def start_shard(sandbox: Sandbox, name: str) -> SandboxShard:
    """Start a stopped or killed shard again on its port and datadir; wait until it answers.

    Returns the shard with its new pid (``sandbox`` itself is immutable and keeps the old one).
    A shard that is already running is returned as it is.
    """
    with _locked(sandbox.directory):
        shard = _current_shard(sandbox, name)
        if _is_our_server(shard.pid, shard.datadir):
            _wait_ready(shard, None)
            return shard
        if not (shard.datadir / "mysql").is_dir():
            raise SandboxError(
                f"shard {name}: datadir {shard.datadir} is missing; run sandbox down, then up"
            )
        _check_port_free(shard.port)
        server, _ = _find_binaries()
        proc = _launch(server, shard)
        started = replace(shard, pid=proc.pid)
        try:
            _wait_ready(started, proc)
            _create_database(started)
            _update_state_pid(sandbox.directory, name, started.pid)
        except BaseException:
            _stop_shard(started)
            raise
        return started


# --------------------------------------------------------------------------- up, step by step


def _up_locked(
    root: Path,
    count: int,
    base_port: int,
    template_doc: dict[str, Any],
    server: str,
    install_db: str,
    created_root: bool,
) -> Sandbox:
    old_state = _read_state(root)
    if old_state is not None:
        old_shards = _state_shards(old_state)
        old_base = old_state.get("base_port")
        if len(old_shards) != count or old_base != base_port:
            raise SandboxError(
                f"{root} already holds a sandbox of {len(old_shards)} shard(s) on base port "
                f"{old_base}; run `shardctl sandbox down --dir {root}` before asking for "
                f"{count} shard(s) on base port {base_port}"
            )
        created_root = bool(old_state.get("created_directory", created_root))
    planned = [_plan_shard(root, i, base_port) for i in range(count)]
    recorded = {s.name: s for s in _state_shards(old_state)} if old_state else {}

    keep: list[SandboxShard] = []
    to_start: list[SandboxShard] = []
    for shard in planned:
        prior = recorded.get(shard.name)
        if prior is not None and _is_our_server(prior.pid, prior.datadir):
            keep.append(prior)
        else:
            to_start.append(shard)
    for shard in to_start:  # preflight: refuse before touching anything
        _check_port_free(shard.port)

    created_dirs: list[Path] = []
    started: list[tuple[SandboxShard, subprocess.Popen[bytes]]] = []
    try:
        if any(not (s.datadir / "mysql").is_dir() for s in to_start):
            template_dir = _init_template(root, install_db)
            for shard in to_start:
                if (shard.datadir / "mysql").is_dir():
                    continue
                shard_dir = shard.datadir.parent
                if not shard_dir.exists():
                    created_dirs.append(shard_dir)
                elif shard.datadir.exists():
                    raise SandboxError(
                        f"shard {shard.name}: {shard.datadir} exists but is not a MariaDB "
                        f"datadir; remove it or use another --dir"
                    )
                shard_dir.mkdir(parents=True, exist_ok=True)
                shutil.copytree(template_dir, shard.datadir, symlinks=True)
            shutil.rmtree(template_dir.parent, ignore_errors=True)

        for shard in to_start:
            _check_port_free(shard.port)
            proc = _launch(server, shard)
            started.append((replace(shard, pid=proc.pid), proc))
            # Record at once, so `down` finds the process even if this call is interrupted.
            current = _merge(planned, keep, [s for s, _ in started])
            _write_state(root, base_port, current, None, created_root)

        for shard in keep:
            _wait_ready(shard, None)
        for shard, proc in started:
            _wait_ready(shard, proc)
        for shard in [*keep, *(s for s, _ in started)]:
            _create_database(shard)

        final = _merge(planned, keep, [s for s, _ in started])
        topology_path = root / TOPOLOGY_FILE
        _write_topology(topology_path, template_doc, final)
        _write_state(root, base_port, final, topology_path, created_root)
        return Sandbox(directory=root, shards=tuple(final), topology_path=topology_path)
    except BaseException:
        for shard, _ in started:
            with contextlib.suppress(Exception):
                _stop_shard(shard)
        for path in created_dirs:
            shutil.rmtree(path, ignore_errors=True)
        for shard, _ in started:
            _remove_socket(shard)
        shutil.rmtree(root / _TEMPLATE_DIR, ignore_errors=True)
        if old_state is not None:
            _write_raw_state(root, old_state)
        else:
            (root / STATE_FILE).unlink(missing_ok=True)
            (root / TOPOLOGY_FILE).unlink(missing_ok=True)
        raise


def _merge(
    planned: Sequence[SandboxShard],
    keep: Sequence[SandboxShard],
    started: Sequence[SandboxShard],
) -> list[SandboxShard]:
    by_name = {s.name: s for s in planned}
    by_name.update({s.name: s for s in keep})
    by_name.update({s.name: s for s in started})
    return [by_name[s.name] for s in planned]


def _plan_shard(root: Path, index: int, base_port: int) -> SandboxShard:
    name = f"s{index}"
    port = base_port + index
    shard_dir = root / name
    return SandboxShard(
        name=name,
        port=port,
        socket=_socket_path(root, shard_dir, name),
        datadir=shard_dir / "data",
        pid=0,
        url=f"mysql+pymysql://root@127.0.0.1:{port}/{_database(name)}",
    )


def _database(name: str) -> str:
    return f"orders_{name}"


def _socket_path(root: Path, shard_dir: Path, name: str) -> Path:
    path = shard_dir / "mysqld.sock"
    if len(os.fsencode(path)) <= _MAX_SOCKET_PATH:
        return path
    digest = hashlib.sha1(os.fsencode(root)).hexdigest()[:12]
    return Path(tempfile.gettempdir()) / f"shardrouter-{digest}-{name}.sock"


def _check_shape(shards: int, base_port: int) -> None:
    if isinstance(shards, bool) or not isinstance(shards, int) or shards < 1:
        raise SandboxError(f"shards must be a positive integer, got {shards!r}")
    if isinstance(base_port, bool) or not isinstance(base_port, int):
        raise SandboxError(f"base_port must be an integer, got {base_port!r}")
    last = base_port + shards - 1
    if base_port < 1 or last > 65535:
        raise SandboxError(
            f"ports {base_port}..{last} are outside 1..65535; choose another --base-port"
        )


# --------------------------------------------------------------------------- binaries and ports


def _bin_search_path() -> str:
    """Where the MariaDB binaries are looked for: PATH, then /usr/sbin and /usr/local/sbin."""
    parts = [os.environ.get("PATH", ""), *_EXTRA_BIN_DIRS]
    return os.pathsep.join(p for p in parts if p)


def _find_binaries() -> tuple[str, str]:
    search = _bin_search_path()
    found = {name: shutil.which(name, path=search) for name in (_SERVER, _INSTALL_DB)}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise ServerBinaryMissingError(
            f"{' and '.join(missing)} not found on PATH or in {', '.join(_EXTRA_BIN_DIRS)}; "
            f"the sandbox needs a local MariaDB server: {_INSTALL_HINT}"
        )
    server, install_db = found[_SERVER], found[_INSTALL_DB]
    assert server is not None and install_db is not None
    return server, install_db


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise PortInUseError(
                f"port {port} on 127.0.0.1 is already in use by another process ({err.strerror}); "
                f"stop it or choose another --base-port"
            ) from err


# --------------------------------------------------------------------------- processes


def _init_template(root: Path, install_db: str) -> Path:
    """Initialise one datadir with mariadb-install-db; the shards get copies of it."""
    base = root / _TEMPLATE_DIR
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    datadir = base / "data"
    # Its own temp dir, as the servers get: in the shared /tmp another server's cleanup can
    # remove the bootstrap's temp table files (seen as install-db failing on a missing
    # '/tmp/#sql-temptable-...' while other sandboxes ran).
    tmpdir = base / "tmp"
    tmpdir.mkdir()
    cmd = [
        install_db,
        "--no-defaults",
        f"--datadir={datadir}",
        f"--tmpdir={tmpdir}",
        "--auth-root-authentication-method=normal",
        "--skip-test-db",
        *_user_option(),
        *_STORAGE_OPTIONS,
    ]
    try:
        done = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=180,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as err:
        raise SandboxError(f"{_INSTALL_DB} failed for {datadir}: {err}") from err
    if done.returncode != 0 or not (datadir / "mysql").is_dir():
        output = (done.stdout + done.stderr).decode(errors="replace")
        raise SandboxError(
            f"{_INSTALL_DB} failed for {datadir} (exit {done.returncode}):\n{_tail(output)}"
        )
    return datadir


def _user_option() -> list[str]:
    # mariadbd refuses to run as root unless told to; as any other user it needs nothing.
    return ["--user=root"] if os.geteuid() == 0 else []


def _launch(server: str, shard: SandboxShard) -> subprocess.Popen[bytes]:
    shard_dir = shard.datadir.parent
    log_path = _log_path(shard)
    # Its own temp dir: in the shared /tmp another process may clean up a server's temp table
    # files under it (seen as "Error on delete of '/tmp/#sql-temptable-...'").
    tmpdir = shard_dir / "tmp"
    tmpdir.mkdir(exist_ok=True)
    cmd = [
        server,
        "--no-defaults",
        f"--tmpdir={tmpdir}",
        f"--datadir={shard.datadir}",
        f"--port={shard.port}",
        f"--socket={shard.socket}",
        f"--pid-file={shard_dir / 'mariadbd.pid'}",
        f"--log-error={log_path}",
        *_user_option(),
        *_SERVER_OPTIONS,
    ]
    with log_path.open("ab") as log:
        try:
            proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=shard_dir,
                start_new_session=True,  # outlives the caller, deaf to its terminal's Ctrl-C
            )
        except OSError as err:
            raise SandboxError(f"shard {shard.name}: cannot start {server}: {err}") from err
    _children[proc.pid] = proc
    return proc


def _log_path(shard: SandboxShard) -> Path:
    return shard.datadir.parent / "error.log"


def _wait_ready(shard: SandboxShard, proc: subprocess.Popen[bytes] | None) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last_error = "no answer yet"
    while True:
        try:
            conn = pymysql.connect(
                host="127.0.0.1", port=shard.port, user="root", password="", connect_timeout=2
            )
        except pymysql.MySQLError as err:
            last_error = str(err)
        else:
            conn.close()
            return
        exited = proc.poll() is not None if proc is not None else not is_running(shard)
        if exited:
            raise SandboxError(
                f"shard {shard.name} (port {shard.port}) exited while starting; "
                f"tail of {_log_path(shard)}:\n{_tail_file(_log_path(shard))}"
            )
        if time.monotonic() > deadline:
            raise SandboxError(
                f"shard {shard.name} (port {shard.port}) did not answer within "
                f"{START_TIMEOUT:.0f} s ({last_error}); tail of {_log_path(shard)}:\n"
                f"{_tail_file(_log_path(shard))}"
            )
        time.sleep(_POLL)


def _create_database(shard: SandboxShard) -> None:
    try:
        conn = pymysql.connect(
            host="127.0.0.1", port=shard.port, user="root", password="", connect_timeout=5
        )
        try:
            with conn.cursor() as cur:
                cur.execute(
                    f"CREATE DATABASE IF NOT EXISTS `{_database(shard.name)}` "
                    "CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"
                )
        finally:
            conn.close()
    except pymysql.MySQLError as err:
        raise SandboxError(
            f"shard {shard.name}: cannot create database {_database(shard.name)}: {err}"
        ) from err


def _stop_shard(shard: SandboxShard) -> bool:
    """Stop the shard's server (SIGTERM, then SIGKILL); True if one was running."""
    pids = {shard.pid}
    pid_file = shard.datadir.parent / "mariadbd.pid"
    with contextlib.suppress(OSError, ValueError):
        pids.add(int(pid_file.read_text().strip()))
    stopped = False
    for pid in sorted(pids):
        if not _is_our_server(pid, shard.datadir):
            continue
        stopped = True
        _signal(pid, signal.SIGTERM)
        if _wait_gone(pid, shard.datadir, STOP_TIMEOUT):
            continue
        _signal(pid, signal.SIGKILL)
        if not _wait_gone(pid, shard.datadir, 10.0):
            raise SandboxError(f"shard {shard.name} (pid {pid}) does not stop, even after SIGKILL")
    return stopped


def _signal(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def _wait_gone(pid: int, datadir: Path, timeout: float) -> bool:
    proc = _children.get(pid)
    if proc is not None:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        _children.pop(pid, None)
        return True
    deadline = time.monotonic() + timeout
    while _is_our_server(pid, datadir):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _is_our_server(pid: int, datadir: Path) -> bool:
    """True if ``pid`` is a live (not zombie) mariadbd serving ``datadir``."""
    if pid <= 0:
        return False
    proc = _children.get(pid)
    if proc is not None and proc.poll() is not None:
        _children.pop(pid, None)  # reaped
        return False
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # no procfs: trust the pid
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    try:
        args = (proc_dir / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    if not args or not os.path.basename(args[0]).startswith(os.fsencode(_SERVER)):
        return False  # gone, a zombie (empty cmdline), or the pid was reused
    return os.fsencode(f"--datadir={datadir}") in args


def _remove_shard_files(root: Path, shard: SandboxShard) -> None:
    shard_dir = shard.datadir.parent
    if shard_dir.parent == root:  # never remove anything outside the sandbox directory
        shutil.rmtree(shard_dir, ignore_errors=True)
    _remove_socket(shard)


def _remove_socket(shard: SandboxShard) -> None:
    for path in (shard.socket, Path(f"{shard.socket}.lock")):
        with contextlib.suppress(OSError):
            path.unlink()


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


def _tail_file(path: Path, lines: int = 20) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 16384))
            return _tail(fh.read().decode(errors="replace"), lines)
    except OSError:
        return "(no log)"


# --------------------------------------------------------------------------- state and topology


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """Serialise up/down/start/kill on one directory across processes."""
    with (root / _LOCK_FILE).open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _read_state(root: Path) -> dict[str, Any] | None:
    path = root / STATE_FILE
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as err:
        raise SandboxError(f"cannot read sandbox state {path}: {err}") from err
    try:
        state = json.loads(text)
        if not isinstance(state, dict) or not isinstance(state.get("shards"), list):
            raise ValueError("not a sandbox state object")
        _state_shards(state)
    except (ValueError, KeyError, TypeError) as err:
        raise SandboxError(
            f"sandbox state {path} is unreadable ({err}); stop its mariadbd processes by hand "
            f"and remove {root}"
        ) from err
    return state


def _state_shards(state: dict[str, Any]) -> list[SandboxShard]:
    return [
        SandboxShard(
            name=str(entry["name"]),
            port=int(entry["port"]),
            socket=Path(entry["socket"]),
            datadir=Path(entry["datadir"]),
            pid=int(entry["pid"]),
            url=str(entry["url"]),
        )
        for entry in state["shards"]
    ]


def _sandbox_from_state(root: Path, state: dict[str, Any]) -> Sandbox:
    topology = state.get("topology")
    return Sandbox(
        directory=root,
        shards=tuple(_state_shards(state)),
        topology_path=Path(topology) if topology else root / TOPOLOGY_FILE,
    )


def _write_state(
    root: Path,
    base_port: int,
    shards: Sequence[SandboxShard],
    topology: Path | None,
    created_root: bool,
) -> None:
    state: dict[str, Any] = {
        "format": _STATE_FORMAT,
        "base_port": base_port,
        "created_directory": created_root,
        "topology": str(topology) if topology else None,
        "shards": [
            {
                "name": s.name,
                "port": s.port,
                "url": s.url,
                "socket": str(s.socket),
                "datadir": str(s.datadir),
                "pid": s.pid,
            }
            for s in shards
        ],
    }
    _write_raw_state(root, state)


def _write_raw_state(root: Path, state: dict[str, Any]) -> None:
    _atomic_write(root / STATE_FILE, json.dumps(state, indent=2) + "\n")


def _update_state_pid(root: Path, name: str, pid: int) -> None:
    state = _read_state(root)
    if state is None:
        raise SandboxError(f"sandbox state {root / STATE_FILE} disappeared")
    for entry in state["shards"]:
        if entry["name"] == name:
            entry["pid"] = pid
    _write_raw_state(root, state)


def _current_shard(sandbox: Sandbox, name: str) -> SandboxShard:
    """The shard as recorded now (its pid may have changed since ``sandbox`` was made)."""
    current = status(sandbox.directory)
    if current is None:
        raise SandboxError(f"no sandbox recorded in {sandbox.directory}; run sandbox up")
    return current.shard(name)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _resolve_template(template: Path | str | None) -> Path:
    if template is None:
        if not DEFAULT_TEMPLATE.is_file():
            raise SandboxError(
                f"default topology template {DEFAULT_TEMPLATE} not found (shardrouter is "
                f"installed without its repository); pass a template file (--template FILE)"
            )
        return DEFAULT_TEMPLATE
    path = Path(template).expanduser().resolve()
    if not path.is_file():
        raise SandboxError(f"topology template {path} not found; pass an existing YAML file")
    return path


def _load_template(path: Path, shards: int) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise SandboxError(f"cannot read topology template {path}: {err}") from err
    if not isinstance(doc, dict):
        raise SandboxError(f"topology template {path} must be a YAML mapping")
    slots = doc.get("slots", 1024)
    if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
        raise SandboxError(f"topology template {path}: slots must be a positive integer")
    if slots < shards:
        raise SandboxError(
            f"topology template {path} has {slots} slots, fewer than the {shards} shards "
            f"asked for; ask for at most {slots} shards"
        )
    return doc


def slot_ranges(slots: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges over 0..slots; the first ``slots % shards`` get one more."""
    base, extra = divmod(slots, shards)
    ranges: list[tuple[int, int]] = []
    start = 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def _write_topology(
    path: Path, template_doc: dict[str, Any], shards: Sequence[SandboxShard]
) -> None:
    doc = dict(template_doc)
    slots = int(doc.get("slots", 1024))
    doc["shards"] = {
        shard.name: {"primary": shard.url, "slots": [[start, end]]}
        for shard, (start, end) in zip(shards, slot_ranges(slots, len(shards)), strict=True)
    }
    header = (
        "# Written by `shardctl sandbox up`: the template topology with its shards pointing at\n"
        "# the sandbox instances. Re-running `sandbox up` overwrites this file.\n"
    )
    _atomic_write(path, header + yaml.safe_dump(doc, sort_keys=False))
