"""loadtest/locustfile.py: one router, service, lease and ledger writer per Locust process,
however many users start at once (building them waits on the network, and a second user
starting meanwhile used to build its own: 13 routers in one process, found by a reshard under
load whose switch then waited on 13 late acknowledgements)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
from gevent import monkey; monkey.patch_all()
import sys, gevent
sys.path.insert(0, %(loadtest)r)
import locustfile
built = []
class Slow:
    def __init__(self):
        gevent.sleep(0.05)          # as Router.load waits on the meta store
        built.append(self)
locustfile._Process = Slow
got = [gevent.spawn(locustfile.process) for _ in range(16)]
gevent.joinall(got, timeout=10)
print(len(built), len({id(g.value) for g in got}))
"""


@pytest.mark.timeout(60)
def test_users_starting_together_share_one_process_state() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT % {"loadtest": str(ROOT / "loadtest")}],
        capture_output=True, text=True, timeout=50, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "1"]


KILLED = """
from gevent import monkey; monkey.patch_all()
import sys, json, types, gevent
sys.path.insert(0, %(loadtest)r)
import locustfile
from ledger import LedgerWriter
from pathlib import Path

class Events:
    class request:
        @staticmethod
        def fire(**kw): pass

class Service:
    def new_order_key(self, user): return 4242
    def place_order(self, *a, **k): gevent.sleep(5)      # in flight when the user is stopped
    def pay(self, order): gevent.sleep(5)

out = Path(%(out)r)
p = types.SimpleNamespace(
    ledger=LedgerWriter(out), rng=__import__("random").Random(1),
    users=types.SimpleNamespace(draw=lambda: 7), merchants=types.SimpleNamespace(draw=lambda: 3),
    router=types.SimpleNamespace(route_key=lambda **k: ("s0", 1)), log=lambda *a: None,
)
user = object.__new__(locustfile.Shopper)
user.p, user.service, user.orders = p, Service(), {99: "new"}
user.environment = types.SimpleNamespace(events=Events)
for op in (user.place_order, user.pay):
    g = gevent.spawn(op)
    gevent.sleep(0.05)
    g.kill()                 # what Locust does to its users at the end of a run
p.ledger.close()
for path in sorted(out.glob("ledger-*.jsonl")):
    print(path.read_text())
"""


@pytest.mark.timeout(60)
def test_a_write_in_flight_when_the_user_is_stopped_is_recorded_in_doubt(
    tmp_path: Path,
) -> None:
    """Locust kills user greenlets at the end of a run (GreenletExit): a write in flight then
    may have committed, so the ledger says its outcome is unknown rather than nothing (the
    ledger check found a committed order 'in no ledger', and a pay it never heard of)."""
    script = KILLED % {"loadtest": str(ROOT / "loadtest"), "out": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=50, cwd=ROOT,
        check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    found = {(r["op"], r["o"], r["ok"]) for r in records}
    assert found == {("place", 4242, None), ("move", 99, None)}, records


QUITTING = """
from gevent import monkey; monkey.patch_all()
import sys, types
sys.path.insert(0, %(loadtest)r)
import locustfile
from locust.runners import STATE_RUNNING, STATE_STOPPED
calls = []
class Process:
    def close(self): calls.append("close")
class Runner:
    state = STATE_RUNNING
    def stop(self):
        calls.append("stop")      # the users' in-doubt records are written here
        self.state = STATE_STOPPED
locustfile._process = Process()
locustfile._close(types.SimpleNamespace(runner=Runner()))
print(" ".join(calls))
"""


@pytest.mark.timeout(60)
def test_quitting_stops_the_users_before_closing_the_ledger() -> None:
    """Locust fires `quitting` before it stops the users (SIGTERM, Ctrl-C): the ledger is
    closed only after they stopped, so a write in flight still records its outcome."""
    done = subprocess.run(
        [sys.executable, "-c", QUITTING % {"loadtest": str(ROOT / "loadtest")}],
        capture_output=True, text=True, timeout=50, cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["stop", "close"]
