"""The lazy reader's row decoder gives exactly what PyMySQL's MySQLResult._read_row_from_packet
gives for the same packet and converters: NULLs, every length-coding (1, 3, 4 and 9 bytes),
encodings and converters, rows shorter than their columns."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymysql import converters
from pymysql.connections import MySQLResult
from pymysql.protocol import MysqlPacket

from shardrouter.engine.readpool import _decode_row

pytestmark = pytest.mark.timeout(120)


def _length_coded(value: bytes | None, coding: int) -> bytes:
    """``value`` as the server writes a column: 0xFB for NULL, else its length in the
    smallest coding that fits, or the wider ``coding`` asked for (also valid protocol)."""
    if value is None:
        return b"\xfb"
    n = len(value)
    if n < 251 and coding == 1:
        return bytes([n]) + value
    if n < 2**16 and coding <= 3:
        return b"\xfc" + n.to_bytes(2, "little") + value
    if n < 2**24 and coding <= 4:
        return b"\xfd" + n.to_bytes(3, "little") + value
    return b"\xfe" + n.to_bytes(8, "little") + value


def _pymysql(payload: bytes, conv: list[tuple[str | None, Any]]) -> tuple[Any, ...]:
    result = MySQLResult.__new__(MySQLResult)
    result.converters = conv
    result.unbuffered_active = False  # (its __del__ reads it)
    return tuple(result._read_row_from_packet(MysqlPacket(payload, "utf8")))


COLUMN_KINDS: list[tuple[str | None, Any, st.SearchStrategy[bytes]]] = [
    (None, None, st.binary(max_size=300)),
    ("utf8", None, st.text(max_size=80).map(lambda t: t.encode("utf8"))),
    ("ascii", int, st.integers(-(2**63), 2**64 - 1).map(lambda i: str(i).encode())),
    (
        "ascii",
        converters.convert_datetime,
        st.sampled_from(
            [b"2026-12-01 08:30:01", b"2026-12-01 08:30:01.123", b"0000-00-00 00:00:00"]
        ),
    ),
]


@st.composite
def rows(draw: Any) -> tuple[bytes, list[tuple[str | None, Any]]]:
    kinds = draw(st.lists(st.sampled_from(COLUMN_KINDS), min_size=1, max_size=8))
    conv = [(encoding, converter) for encoding, converter, _ in kinds]
    parts = []
    for _, _, values in kinds:
        value = draw(st.one_of(st.none(), values))
        parts.append(_length_coded(value, draw(st.sampled_from([1, 1, 3, 4, 9]))))
    keep = draw(st.integers(0, len(parts)))  # a row may end before its columns do
    return b"".join(parts[:keep]) if keep else b"".join(parts), conv


@settings(max_examples=1500, deadline=None)
@given(rows())
def test_rows_decode_as_pymysql_decodes_them(row: tuple[bytes, list[Any]]) -> None:
    payload, conv = row
    assert _decode_row(payload, conv) == _pymysql(payload, conv)


@pytest.mark.parametrize("size", [250, 251, 252, 65535, 65536, 2**24 - 1, 2**24])
def test_every_length_coding_boundary(size: int) -> None:
    value = b"x" * size
    conv: list[tuple[str | None, Any]] = [("ascii", None), (None, None)]
    payload = _length_coded(value, 1) + _length_coded(b"\x00\xff", 1)
    assert _decode_row(payload, conv) == _pymysql(payload, conv) == ("x" * size, b"\x00\xff")


def test_a_0xff_length_reads_as_null_as_pymysql_reads_it() -> None:
    conv: list[tuple[str | None, Any]] = [(None, None), (None, None)]
    payload = b"\xff" + _length_coded(b"ab", 1)
    assert _decode_row(payload, conv) == _pymysql(payload, conv)
