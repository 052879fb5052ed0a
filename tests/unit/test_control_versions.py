"""control.versions without a meta store: proposals, the store's URL, masked documents."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from shardrouter.cli import main
from shardrouter.control.versions import masked, meta_url, normalise, read_proposal
from shardrouter.errors import ConfigError, MetaStoreError

pytestmark = pytest.mark.timeout(60)

SECRET = "s3cr3t-versions"
DOC = f"""\
name: orders
version: 4
ids: {{epoch: 2025-01-01T00:00:00Z}}
shards:
  s0: {{primary: "mysql+pymysql://app:${{V_PASSWORD}}@db0/orders_s0", slots: [[0, 512]]}}
  s1: {{primary: "mysql+pymysql://app:{SECRET}@db1/orders_s1", slots: [[512, 1024]]}}
tables:
  users: {{column: user_id, strategy: hash}}
meta: {{url: "sqlite:///meta.db"}}
"""


def test_a_proposal_keeps_the_document_as_written(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(DOC, encoding="utf-8")
    proposal = read_proposal(path, env={"V_PASSWORD": "expanded-pw"})
    doc = proposal.document
    assert "version" not in doc  # the store numbers versions
    assert doc["shards"]["s0"]["primary"] == "mysql+pymysql://app:${V_PASSWORD}@db0/orders_s0"
    assert doc["ids"]["epoch"] == "2025-01-01 00:00:00+00:00"  # a YAML date, as JSON text
    assert json.loads(json.dumps(doc)) == doc
    url = proposal.config.shards["s0"].primary
    assert url.password == "expanded-pw"  # validated in the environment
    with pytest.raises(ConfigError, match="environment variable V_PASSWORD is not set"):
        read_proposal(path, env={})


def test_normalise_drops_the_version_and_is_stable() -> None:
    raw = yaml.safe_load(DOC)
    once = normalise(raw)
    assert "version" not in once and normalise(once) == once


def test_the_meta_url_comes_from_the_file_or_the_option(tmp_path: Path) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(DOC, encoding="utf-8")
    config = read_proposal(path, env={"V_PASSWORD": "x"}).config
    assert str(meta_url(config, None, "t.yaml")) == "sqlite:///meta.db"
    assert str(meta_url(config, "sqlite:///meta.db", "t.yaml")) == "sqlite:///meta.db"
    with pytest.raises(ConfigError) as info:
        meta_url(config, f"mysql+pymysql://m:{SECRET}@other/meta", "t.yaml")
    assert info.value.problems == (
        "meta.url: sqlite:///meta.db is not the meta store pushed to"
        " (mysql+pymysql://m:***@other/meta); drop --meta-url to use the file's store, or make"
        " meta.url name the store you push to",
    )
    bare = config.model_copy(update={"meta": None})
    with pytest.raises(ConfigError, match=r"meta: missing: no meta store is named"):
        meta_url(bare, None, "t.yaml")
    with pytest.raises(MetaStoreError) as bad:
        meta_url(bare, f"mysql://u:{SECRET}@h:port/x", "t.yaml")
    assert "is not a database URL" in str(bad.value) and SECRET not in str(bad.value)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        pytest.param(
            "mysql+pymysql://app:${DB_PASSWORD}@h/x",
            "mysql+pymysql://app:${DB_PASSWORD}@h/x",
            id="placeholder-kept",
        ),
        pytest.param(
            f"mysql+pymysql://app:{SECRET}@h/x", "mysql+pymysql://app:***@h/x", id="literal"
        ),
        pytest.param(
            f"mysql+pymysql://app:${{DB_PASSWORD:-{SECRET}}}@h/x",
            "mysql+pymysql://app:***@h/x",
            id="placeholder-default-masked",
        ),
        pytest.param(
            f"mysql://u:p@h/x?password={SECRET}", "mysql://u:***@h/x?password=***", id="query"
        ),
        pytest.param(
            "sqlite:///${DEMO_DIR:-.demo}/s0.db", "sqlite:///${DEMO_DIR:-.demo}/s0.db", id="sqlite"
        ),
        pytest.param("not a url", "not a url", id="plain-text"),
    ],
)
def test_masked_documents_show_no_password(value: str, shown: str) -> None:
    assert masked({"shards": {"s0": {"primary": value, "replicas": [value]}}}) == {
        "shards": {"s0": {"primary": shown, "replicas": [shown]}}
    }


@pytest.mark.timeout(60)
def test_an_unreachable_store_is_named_without_its_password() -> None:
    """Nothing listens on port 1: the store does not answer, at once."""
    url = f"mysql+pymysql://meta:{SECRET}@127.0.0.1:1/shardmeta"
    for args in (["meta", "status"], ["topology", "status"], ["topology", "history"]):
        result = CliRunner().invoke(main, [*args, "--meta-url", url, "--json"])
        assert result.exit_code == 1, result.output
        data = json.loads(result.stdout)
        assert data["ok"] is False
        assert (
            "meta store mysql+pymysql://meta:***@127.0.0.1:1/shardmeta did not answer"
            in (data["error"])
        )
        assert SECRET not in result.output
