"""The lazy reader's date and datetime decoders give exactly what PyMySQL's give: the same type
and value for every string of the server's shape (valid or not: zero dates, February 31st) and
for strings of other shapes, whether passed as str or bytes."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pymysql import converters

from shardrouter.engine.readpool import _fast_date, _fast_datetime

pytestmark = pytest.mark.timeout(120)

digits = st.text(alphabet="0123456789", min_size=1, max_size=1)


def _same(fast: Any, slow: Any) -> None:
    assert type(fast) is type(slow)
    assert fast == slow


def _field(width: int) -> st.SearchStrategy[str]:
    # mostly in range, sometimes not (month 13, day 31 of February, year 0)
    return st.one_of(
        st.integers(0, 10**width - 1).map(lambda v: str(v).zfill(width)),
        st.text(alphabet="0123456789", min_size=width, max_size=width),
    )


server_datetimes = st.builds(
    lambda y, mo, d, h, mi, s, frac: f"{y}-{mo}-{d} {h}:{mi}:{s}{frac}",
    _field(4),
    _field(2),
    _field(2),
    _field(2),
    _field(2),
    _field(2),
    st.one_of(
        st.just(""), st.text(alphabet="0123456789", min_size=1, max_size=6).map(".{}".format)
    ),
)


near_misses = st.one_of(
    st.text(alphabet="0123456789-: .T+Zab", min_size=0, max_size=28),
    # the server's shape with something after it (a zone, a seventh digit, a letter)
    st.builds(
        lambda t, tail: t + tail,
        server_datetimes,
        st.sampled_from(["+01", "Z", "+01:00", "-05", "7", "x", " ", ".5+01"]),
    ),
    # the fraction's place taken by other characters
    st.builds(
        lambda t, tail: t[:19] + tail, server_datetimes, st.text("0123456789.+-:Z ", max_size=7)
    ),
)


@settings(max_examples=3000, deadline=None)
@given(st.one_of(server_datetimes, near_misses), st.booleans())
def test_datetime_decoding_equals_pymysqls(text: str, as_bytes: bool) -> None:
    value: str | bytes = text.encode("ascii") if as_bytes else text
    try:
        expected: Any = converters.convert_datetime(value)
    except Exception as exc:  # PyMySQL's own failure (e.g. '0'): the same one
        with pytest.raises(type(exc)):
            _fast_datetime(value)
        return
    _same(_fast_datetime(value), expected)


server_dates = st.builds(lambda y, m, d: f"{y}-{m}-{d}", _field(4), _field(2), _field(2))


@settings(max_examples=2000, deadline=None)
@given(st.one_of(server_dates, near_misses), st.booleans())
def test_date_decoding_equals_pymysqls(text: str, as_bytes: bool) -> None:
    value: str | bytes = text.encode("ascii") if as_bytes else text
    try:
        expected: Any = converters.convert_date(value)
    except Exception as exc:  # PyMySQL's own failure (e.g. no '-' at all): the same one
        with pytest.raises(type(exc)):
            _fast_date(value)
        return
    _same(_fast_date(value), expected)


@pytest.mark.parametrize(
    "text",
    [
        "2026-12-01 08:30:01",
        "2026-12-01 08:30:01.5",
        "2026-12-01 08:30:01.123456",
        "0000-00-00 00:00:00",
        "2026-02-31 00:00:00",
        "9999-12-31 23:59:59.999999",
        "0001-01-01 00:00:00.000001",
    ],
)
def test_known_values(text: str) -> None:
    _same(_fast_datetime(text), converters.convert_datetime(text))
    _same(_fast_date(text[:10]), converters.convert_date(text[:10]))
