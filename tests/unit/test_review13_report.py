"""Review 13 (issue 10): loadtest/run's per-phase figures (runner.analyse) drop the requests
that end between two phases. The ReshardDriver sleeps 1 s after an abandoned switch before the
next attempt (runner.py: ``time.sleep(1.0)``), and that second belongs to no span: its requests
and failures are in the run's totals but in no phase, so the per-phase table (and the test
that sums its failures) does not see them.

Pure: the request log is the one the Locust processes write (requests-<pid>.csv); no server
is needed to show the arithmetic (the reshard run that abandons a switch is not deterministic).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "loadtest"))
import runner  # noqa: E402  (loadtest/ is a folder of scripts, not a package)

pytestmark = pytest.mark.timeout(60)

T0 = 1_700_000_000.0


def _phases() -> list[dict[str, float | str | int]]:
    """What ReshardDriver records when the first switch is abandoned (rc 3), then retried."""
    spans = [
        ("plan", 2.0, 2.5, 0),
        ("start", 2.5, 3.0, 0),
        ("copy", 3.0, 4.0, 0),
        ("verify", 4.0, 4.5, 0),
        ("shadow", 4.5, 6.5, 0),
        ("switch (abandoned)", 6.5, 7.0, 3),
        # time.sleep(1.0): 7.0 .. 8.0 is in no phase
        ("switch", 8.0, 8.5, 0),
        ("finalize", 8.5, 9.5, 0),
    ]
    return [{"name": n, "start": T0 + a, "end": T0 + b, "rc": rc} for n, a, b, rc in spans]


def test_every_request_is_in_one_phase(tmp_path: Path) -> None:
    lines = []
    for i in range(120):  # one request every 0.1 s from 0.1 s to 12 s, each 5 ms
        t = T0 + 0.1 * (i + 1)
        failed = 7.0 <= t - T0 < 8.0  # the writes that fail just after the abandoned switch
        lines.append(f"{t:.4f},pay,5.000,{0 if failed else 1},1,0,{'Fenced' if failed else ''}")
    (tmp_path / "requests-1.csv").write_text("\n".join(lines) + "\n")
    out = runner.analyse("router", tmp_path, _phases(), "review 13")
    total = out["summary"]["all"]
    phases = out["phases"]
    assert total["failures"] == 10
    assert sum(p["requests"] for p in phases) == total["requests"], [
        (p["phase"], p["requests"]) for p in phases
    ]
    assert sum(p["failures"] for p in phases) == total["failures"], [
        (p["phase"], p["failures"]) for p in phases
    ]
