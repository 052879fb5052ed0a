"""The fuzz module's terminal summary: statements judged and their shape coverage, printed at
the end of every run (pass or fail) so CI logs say what the bounded run covered."""

from __future__ import annotations

import json
from typing import Any

import pytest

REPORTS: list[dict[str, Any]] = []  # filled by test_differential's world fixture


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for report in REPORTS:
        terminalreporter.section("differential fuzzer coverage")
        terminalreporter.write_line(json.dumps(report, sort_keys=True))
