"""loadtest/locustfile.py: one router, service, lease and ledger writer per Locust process,
however many users start at once (building them waits on the network, and a second user
starting meanwhile used to build its own: 13 routers in one process, found by a reshard under
load whose switch then waited on 13 late acknowledgements)."""

from __future__ import annotations

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
