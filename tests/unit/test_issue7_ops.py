"""Issue 7, operations part: shipped configs validate as shipped, fork-safe ids, masked
secrets, clean CLI errors and exit codes, lazy imports."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from shardrouter.cli import main
from shardrouter.config import validate_file

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "config").glob("*.yaml"))
NO_ENV = {"SHARDROUTER_DB_PASSWORD": None, "SHARDROUTER_DEMO_DIR": None}


# -- defect 25: a shipped config validates as shipped -----------------------------------------


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_config_validates_without_any_environment(path: Path) -> None:
    assert SHIPPED, "no shipped configs found"
    assert validate_file(path, env={}) == []
    result = CliRunner().invoke(main, ["config", "validate", str(path), "--json"], env=NO_ENV)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["valid"] is True
