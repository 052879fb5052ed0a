"""Issue 7, A6: ``fold_case`` hash keys route by their utf8mb4_general_ci weight string.

Pure tests of the fold against the shipped weight table (general_ci.bin); the table itself and
the fold's agreement with the server's ``=`` are checked on MariaDB in
tests/integration/test_issue7_fold_mariadb.py.
"""

from __future__ import annotations

from importlib.resources import files

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardrouter.core.config import config_from_dict
from shardrouter.core.strategies import general_ci
from shardrouter.core.strategies.hash import fold
from shardrouter.core.topology import Topology
from shardrouter.errors import ExecutionError, KeyValueError
from shardrouter.sql.execution import _conflicts, lookup_rows, write_lookups

RAW = files("shardrouter.core.strategies").joinpath("general_ci.bin").read_bytes()


def _table_weight(c: int) -> bytes:
    """Entry c of the file; every supplementary character has the file's last entry."""
    return RAW[2 * c : 2 * c + 2] if c < 0x10000 else RAW[-2:]


def reference(value: str) -> bytes:
    """The fold the slow, obvious way: one table entry per character, trailing spaces off."""
    return b"".join(_table_weight(ord(ch)) for ch in value.rstrip(" "))


TOPOLOGY = Topology(
    config_from_dict(
        {
            "shards": {
                "s0": {"primary": "sqlite:///a.db", "slots": [[0, 256]]},
                "s1": {"primary": "sqlite:///b.db", "slots": [[256, 512]]},
                "s2": {"primary": "sqlite:///c.db", "slots": [[512, 768]]},
                "s3": {"primary": "sqlite:///d.db", "slots": [[768, 1024]]},
            },
            "tables": {
                "folded": {
                    "column": "k",
                    "type": "str",
                    "strategy": {"name": "hash", "fold_case": True},
                },
                "plain": {"column": "k", "type": "str", "strategy": "hash"},
                "users": {
                    "column": "user_id",
                    "strategy": "hash",
                    "secondary": [
                        {
                            "column": "email",
                            "type": "str",
                            "strategy": {
                                "name": "lookup",
                                "table": "user_emails",
                                "from": "email",
                                "to": "user_id",
                            },
                        }
                    ],
                },
                "user_emails": {
                    "column": "email",
                    "type": "str",
                    "strategy": {"name": "hash", "fold_case": True},
                },
            },
        }
    )
)
FOLDED = TOPOLOGY.table("folded").primary
PLAIN = TOPOLOGY.table("plain").primary

# Groups of values utf8mb4_general_ci holds as one (measured on MariaDB 10.11: the integration
# test asks the server about these same groups).
EQUAL_GROUPS = [
    ["émile@example.com", "EMILE@EXAMPLE.COM", "Emile@Example.com  ", "ÉMILE@example.COM"],
    ["straße", "STRASE", "strase", "\u017ftra\u017fe"],
    ["ß", "s", "S", "ś", "Š"],
    ["\u00b5", "\u03bc", "\u039c"],  # micro sign, Greek mu, Greek Mu
    ["ÿ", "Ÿ", "y", "Ý"],
    ["😀", "\U0001f4a9", "\U00010000", "\ufffd"],
    ["\uff21\uff44\uff41", "\uff41\uff44\uff41"],  # fullwidth Ada, ada
    ["", " ", "   "],
]


@pytest.mark.parametrize("group", EQUAL_GROUPS, ids=lambda g: g[0] or "empty")
def test_values_equal_under_general_ci_route_together(group: list[str]) -> None:
    assert FOLDED is not None
    assert len({fold(v) for v in group}) == 1
    assert len({FOLDED.keyspace_id(v) for v in group}) == 1
    assert len({FOLDED.slot(v) for v in group}) == 1
    assert len({TOPOLOGY.shard_for("folded", v) for v in group}) == 1


# Values the collation tells apart (general_ci: a tab is not a trailing space, æ is one letter,
# the German sharp s weighs S, not SS; leading spaces count).
DISTINCT = ["a", "a\t", "æ", "ae", "ss", " a", "a a", "a\u00a0", "\U0001f600x"]


def test_values_the_collation_tells_apart_hash_apart() -> None:
    assert FOLDED is not None
    assert len({fold(v) for v in DISTINCT}) == len(DISTINCT)
    assert len({FOLDED.keyspace_id(v) for v in DISTINCT}) == len(DISTINCT)


def test_keyspace_id_is_xxhash64_of_the_weight_string() -> None:
    """The documented key: xxhash64 of big-endian 2-byte weights, laid out like Vitess's."""
    from xxhash import xxh64_digest

    assert FOLDED is not None
    for value in ("ada@example.com", "Émile@Example.com ", "订单", "😀x"):
        expected = int.from_bytes(xxh64_digest(reference(value)), "little")
        assert FOLDED.keyspace_id(value) == expected
        assert FOLDED.slot(value) == expected >> 54


def test_plain_hash_keys_stay_exact() -> None:
    """Without fold_case, string keys hash their UTF-8 text (Vitess's xxhash), case and all."""
    assert PLAIN is not None
    from xxhash import xxh64_digest

    for value in ("émile@example.com", "EMILE@EXAMPLE.COM"):
        assert PLAIN.keyspace_id(value) == int.from_bytes(xxh64_digest(value.encode()), "little")
    assert PLAIN.keyspace_id("a") != PLAIN.keyspace_id("A")


# Characters of every path through weight_string: ASCII, Latin-1, the rest of the BMP, and
# supplementary characters, plus spaces and tabs where trailing spaces are cut.
TEXT = st.text(
    alphabet=st.one_of(
        st.sampled_from(" \t aAzZ_[\\]^`~.@"),
        st.characters(max_codepoint=0xFF),
        st.characters(max_codepoint=0xFFFF, exclude_categories=("Cs",)),
        st.characters(min_codepoint=0x10000, exclude_categories=("Cs",)),
    ),
    max_size=12,
)


@settings(max_examples=500, deadline=None)
@given(value=TEXT)
def test_fold_equals_the_table_lookup_on_every_path(value: str) -> None:
    assert fold(value) == reference(value)


def test_every_code_point_folds_to_its_table_entry() -> None:
    """Each BMP character alone, after an ASCII or a Latin-1 prefix (other fast paths), and
    between spaces: the shortcuts agree with the table for all 63,488 of them."""
    for c in range(0x10000):
        if 0xD800 <= c <= 0xDFFF:
            continue
        ch, w = chr(c), _table_weight(c)
        assert fold(ch) == (b"" if c == 0x20 else w), hex(c)
        assert fold("a" + ch) == b"\x00A" + (b"" if c == 0x20 else w), hex(c)
        assert fold("é" + ch + " ") == b"\x00E" + (b"" if c == 0x20 else w), hex(c)


def test_the_table_facts_the_fold_relies_on() -> None:
    """Only U+0020 weighs a space (so cutting trailing U+0020 is cutting trailing weights
    0x0020, and the fold equals WEIGHT_STRING(RTRIM(x))); no weight is a surrogate (each
    weight encodes as one UTF-16 unit); supplementary characters weigh U+FFFD."""
    assert len(RAW) == 2 * 0x10001
    weights = [int.from_bytes(RAW[i : i + 2], "big") for i in range(0, len(RAW), 2)]
    bmp = [w for c, w in enumerate(weights[:0x10000]) if not 0xD800 <= c <= 0xDFFF]
    assert [c for c, w in enumerate(weights[:0x10000]) if w == 0x20] == [0x20]
    assert not [w for w in bmp if 0xD800 <= w <= 0xDFFF]
    assert weights[0x10000] == 0xFFFD
    assert general_ci._ASCII_IS_UPPER  # the ASCII shortcut is on (and checked above)


@pytest.mark.parametrize("value", ["\ud800", "é\udfff", "\U0001f600\ud83d", "ok\udc00 "])
def test_lone_surrogates_are_key_value_errors(value: str) -> None:
    with pytest.raises(KeyValueError, match="lone surrogate"):
        TOPOLOGY.shard_for("folded", value)


def test_unique_check_matches_an_accent_variant_among_several_values() -> None:
    """The unique check reads back the stored rows equal (under the collation) to the values
    written together, and must tell which one each belongs to: 'émile@…' stored for user 5 is
    the 'EMILE@…' that user 77 writes, not user 78's 'zed@…'."""
    owners = [
        {"user_id": 77, "email": "EMILE@example.com  "},
        {"user_id": 78, "email": "zed@example.com"},
    ]
    group = lookup_rows(TOPOLOGY, TOPOLOGY.table("users"), owners)
    found = [("émile@example.com", 5), ("zed@example.com", 78)]
    conflicts = _conflicts(group, found)
    assert [(ours.row["user_id"], stored, owner) for ours, stored, owner in conflicts] == [
        (77, "émile@example.com", 5)
    ]


def test_installs_carry_the_weight_table() -> None:
    """setup.cfg ships general_ci.bin with the package (the fold cannot import without it)."""
    import configparser
    from pathlib import Path

    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    shipped = [p.strip() for p in cfg["options.package_data"]["shardrouter"].split(",")]
    assert "core/strategies/general_ci.bin" in shipped


def test_two_spellings_of_one_address_for_two_owners_are_refused_before_writing() -> None:
    """'zoë@…' and 'ZOE@…' written together for users 80 and 81: the lookup upsert would keep
    the first and the read-back would not notice the second; refused before any job."""
    owners = [
        {"user_id": 80, "email": "zoë@example.com"},
        {"user_id": 81, "email": "ZOE@example.com "},
    ]
    steps = write_lookups(TOPOLOGY, lookup_rows(TOPOLOGY, TOPOLOGY.table("users"), owners))
    with pytest.raises(ExecutionError, match="one value of user_emails for two owners"):
        next(steps)
    # One owner with two spellings, or two owners with two addresses, are written.
    for same in (
        [{**owners[0]}, {**owners[1], "user_id": 80}],
        [owners[0], {**owners[1], "email": "zed@example.com"}],
    ):
        steps = write_lookups(TOPOLOGY, lookup_rows(TOPOLOGY, TOPOLOGY.table("users"), same))
        jobs = next(steps)
        bound = [job.statement.compile().params for job in jobs]  # type: ignore[union-attr]
        written = sorted(v for p in bound for k, v in p.items() if k.startswith("user_id"))
        assert written == sorted(o["user_id"] for o in same)
