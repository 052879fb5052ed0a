"""README tells the truth: its quickstart runs as written, and what it prints is what we say."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_quickstart_block_runs_and_its_comments_hold() -> None:
    text = README.read_text()
    quickstart = re.findall(r"```python\n(.*?)```", text, re.S)[0]
    namespace: dict[str, object] = {}
    exec(compile(quickstart, "README quickstart", "exec"), namespace)
    topology = namespace["topology"]
    route = namespace["route"]
    assert topology.shard_for("orders", 42) == "s2"  # type: ignore[attr-defined]
    assert (f"{route.keyspace_id:016x}", route.slot, route.physical_table) == (  # type: ignore[attr-defined]
        "b942d776d0f5e66d",
        741,
        "orders_0001",
    )
    order_id = namespace["order_id"]
    assert topology.shard_for("orders", order_id, "order_id") == "s2"  # type: ignore[attr-defined]


def test_readme_names_the_test_command_that_ci_runs() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    assert "tools/test" in README.read_text() and "tools/test" in ci
