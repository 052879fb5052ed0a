"""The utf8mb4_general_ci weight string of a text, from weights measured on MariaDB.

utf8mb4_general_ci compares two strings by their sequences of 2-byte character weights,
trailing spaces aside (PAD SPACE): ``'émile@example.com' = 'EMILE@EXAMPLE.COM  '`` and
``'ß' = 's'``. :func:`weight_string` computes that sequence, so two strings are equal under the
collation exactly when their weight strings are equal; ``hash`` keys with ``fold_case`` hash it.

The weights come from ``general_ci.bin``, written by tools/gen_collation_weights.py from a
server's own ``WEIGHT_STRING(c COLLATE utf8mb4_general_ci)`` of every code point (MariaDB
10.11.19): 65,536 big-endian 2-byte weights indexed by BMP code point (surrogates: their own
code point, unused), then the one weight of every supplementary character (U+FFFD: all of
U+10000..U+10FFFF compare equal to each other and to U+FFFD). Only U+0020 weighs 0x0020, so
the result equals the server's ``WEIGHT_STRING(RTRIM(x) COLLATE utf8mb4_general_ci)``:
a shard can compute the same key in SQL (tests/integration/test_issue7_fold_mariadb.py).
"""

from __future__ import annotations

import re
from codecs import charmap_decode, utf_16_be_encode
from importlib.resources import files

from .base import StrategyDomainError

_BMP = 0x10000


def _weights(raw: bytes) -> str:
    """Big-endian 2-byte weights as the characters of those code points."""
    # surrogatepass lets a weight be any 16-bit value; two that formed a surrogate pair would
    # decode to one character, which the length check refuses.
    text = raw.decode("utf-16-be", "surrogatepass")
    if 2 * len(text) != len(raw):
        raise ImportError("general_ci.bin holds weights that pair up as UTF-16 surrogates")
    return text


def _load() -> tuple[str, str]:
    raw = files(__package__).joinpath("general_ci.bin").read_bytes()
    if len(raw) != 2 * (_BMP + 1):
        raise ImportError(f"general_ci.bin holds {len(raw)} bytes, not {2 * (_BMP + 1)}")
    # A 65,536-character str is the translate table: indexing it is C, and a supplementary
    # character (beyond its end) raises IndexError, which str.translate leaves unchanged. The
    # surrogates (not characters) map to themselves, so the UTF-16 encode refuses a lone one.
    surrogates = "".join(map(chr, range(0xD800, 0xE000)))
    table = _weights(raw[: 2 * 0xD800]) + surrogates + _weights(raw[2 * 0xE000 : 2 * _BMP])
    # re.sub's replacement is a template: a backslash would be an escape.
    return table, _weights(raw[2 * _BMP :]).replace("\\", "\\\\")


_TABLE, _SUPPLEMENTARY_WEIGHT = _load()
_SUPPLEMENTARY = re.compile("[\U00010000-\U0010ffff]")

# Two shortcuts for the common strings, both checked against the table here rather than
# assumed. Where the ASCII characters weigh what str.upper() makes of them (in general_ci: a-z
# weigh A-Z, the rest themselves), ASCII text skips the table: e-mail addresses mostly are.
# Latin-1 text is mapped by a 256-entry charmap decode, a C table lookup per byte several
# times faster than str.translate's per-character call (U+FFFE would mean "unmapped" there).
_ASCII_IS_UPPER = _TABLE[:128] == "".join(map(chr, range(128))).upper()
_LATIN1 = _TABLE[:256]
if "\ufffe" in _LATIN1:
    raise ImportError("general_ci.bin gives a Latin-1 character the weight 0xFFFE")


def weight_string(value: str) -> bytes:
    """The 2-byte big-endian weights of ``value``'s characters, trailing spaces removed.

    Trailing characters of weight 0x0020 (only U+0020) are what PAD SPACE ignores. A lone
    surrogate is not a character (MariaDB cannot store it): StrategyDomainError.
    """
    if _ASCII_IS_UPPER and value.isascii():
        return utf_16_be_encode(value.rstrip(" ").upper())[0]
    # "ignore" and a length check, not try/except: raising for other text costs more.
    latin1 = value.encode("latin-1", "ignore")
    if len(latin1) == len(value):
        return utf_16_be_encode(charmap_decode(latin1, "strict", _LATIN1)[0].rstrip(" "))[0]
    folded = value.translate(_TABLE).rstrip(" ")
    try:
        weights = utf_16_be_encode(folded)[0]
    except UnicodeEncodeError:
        raise StrategyDomainError(
            f"{value!r} is not valid Unicode (a lone surrogate cannot be stored or hashed)"
        ) from None
    if len(weights) != 2 * len(folded):  # a supplementary character took 4 bytes
        folded = _SUPPLEMENTARY.sub(_SUPPLEMENTARY_WEIGHT, folded)
        weights = utf_16_be_encode(folded)[0]
    return weights
