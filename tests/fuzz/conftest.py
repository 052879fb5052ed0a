"""The fuzz module's terminal summary: statements judged and their shape coverage, printed at
the end of every run (pass or fail) so CI logs say what the bounded run covered."""

from __future__ import annotations

import json

import pytest
from fuzz_harness import REPORTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in REPORTS:
        terminalreporter.section("differential fuzzer coverage")
        terminalreporter.write_line(json.dumps(report, sort_keys=True))
