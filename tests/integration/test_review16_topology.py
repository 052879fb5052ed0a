"""Review 16: TableRule.placement (681e227) json.dumps the strategy spec as written, and YAML
reads an unquoted date as datetime.date: a topology with a range strategy on a date column
(boundaries: [2025-01-01, ...]) no longer loads (TypeError, not even a ConfigError). It loaded
before 681e227. No database needed."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardrouter.core.topology import Topology

pytestmark = [pytest.mark.mariadb, pytest.mark.timeout(120)]

CONFIG = Path(__file__).resolve().parents[2] / "config" / "orders.yaml"


def test_review16_range_on_dates_written_as_yaml_dates_loads(tmp_path: Path) -> None:
    text = CONFIG.read_text() + (
        "  events:\n"
        "    column: day\n"
        "    type: date\n"
        "    strategy: {name: range, boundaries: [2025-01-01, 2026-01-01]}\n"
    )
    path = tmp_path / "topology.yaml"
    path.write_text(text)
    topology = Topology.load(path)  # TypeError: Object of type date is not JSON serializable
    assert topology.table("events").placement
