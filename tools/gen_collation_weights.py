#!/usr/bin/env python3
"""Writes shardrouter/core/strategies/general_ci.bin: utf8mb4_general_ci weights measured on
MariaDB.

The ``hash`` strategy's ``fold_case`` keys hash a string's utf8mb4_general_ci weight string
(shardrouter/core/strategies/general_ci.py), so that two strings the collation compares equal route
to one slot. The weights are not written by hand: this script asks a server for the weight of
every code point and stores them. Run it again to check or refresh the file:

    python3 tools/gen_collation_weights.py                      # system MariaDB, 127.0.0.1:3306
    python3 tools/gen_collation_weights.py --port 3421 --check  # compare only, write nothing

The file is 65,537 big-endian 2-byte weights: entry ``c`` (0..0xFFFF) is the weight of code
point U+c (for the surrogates D800..DFFF, which are not characters, the code point itself), and
the last entry is the one weight the collation gives every supplementary character
(U+10000..U+10FFFF; the script checks that they all share one). The password, if any, is read
from the environment (MYSQL_PWD), never from the command line.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path

import pymysql

COLLATION = "utf8mb4_general_ci"
OUT = Path(__file__).resolve().parent.parent / "shardrouter" / "strategies" / "general_ci.bin"
SURROGATES = range(0xD800, 0xE000)

# One character per row: CHAR(n USING utf32) is code point n. The recursion limit is raised for
# this statement only.
_RANGE = (
    "SET STATEMENT max_recursive_iterations = 2000000 FOR"
    " WITH RECURSIVE s (n) AS (SELECT {lo} UNION ALL SELECT n + 1 FROM s WHERE n < {hi})"
)
BMP_SQL = (
    _RANGE.format(lo=0, hi=0xFFFF)
    + f" SELECT n, WEIGHT_STRING(CONVERT(CHAR(n USING utf32) USING utf8mb4) COLLATE {COLLATION})"
    + f" FROM s WHERE n NOT BETWEEN {SURROGATES.start} AND {SURROGATES.stop - 1} ORDER BY n"
)
SUPPLEMENTARY_SQL = (
    _RANGE.format(lo=0x10000, hi=0x10FFFF)
    + f" SELECT WEIGHT_STRING(CONVERT(CHAR(n USING utf32) USING utf8mb4) COLLATE {COLLATION}) w,"
    + " COUNT(*) FROM s GROUP BY w"
)
CLIENT_SQL = f"SELECT WEIGHT_STRING(CONVERT(%s USING utf8mb4) COLLATE {COLLATION})"


def measure(conn: pymysql.connections.Connection) -> bytes:
    """The file's content, measured on the server behind ``conn`` (SystemExit if the collation
    does not fit the format: a weight that is not 2 bytes, supplementary weights that differ)."""
    weights = list(range(0x10000))  # surrogates keep their own code point
    with conn.cursor() as cur:
        cur.execute(BMP_SQL)
        rows = cur.fetchall()
        if len(rows) != 0x10000 - len(SURROGATES):
            sys.exit(f"expected {0x10000 - len(SURROGATES)} BMP weights, got {len(rows)}")
        for n, weight in rows:
            if weight is None or len(weight) != 2:
                sys.exit(f"U+{n:04X} has weight {weight!r}, not 2 bytes: the format cannot hold it")
            weights[n] = int.from_bytes(weight, "big")
        cur.execute(SUPPLEMENTARY_SQL)
        groups = cur.fetchall()
        if len(groups) != 1 or len(groups[0][0]) != 2 or groups[0][1] != 0x100000:
            sys.exit(f"supplementary characters do not share one 2-byte weight: {groups!r}")
        supplementary = int.from_bytes(groups[0][0], "big")
        # The characters built on the server are the ones a client sends: check a sample.
        rng = random.Random(0)
        sample = [c for c in range(0x10000) if c not in SURROGATES]
        for c in [*range(0x250), *rng.sample(sample, 2000)]:
            cur.execute(CLIENT_SQL, (chr(c),))
            (got,) = cur.fetchone()
            if int.from_bytes(got, "big") != weights[c]:
                sys.exit(f"U+{c:04X}: the client's character weighs {got!r}, CHAR(n) did not")
        for c in (0x10000, 0x1F600, 0x10FFFF):
            cur.execute(CLIENT_SQL, (chr(c),))
            (got,) = cur.fetchone()
            if int.from_bytes(got, "big") != supplementary:
                sys.exit(f"U+{c:04X}: the client's character weighs {got!r}")
    return b"".join(w.to_bytes(2, "big") for w in [*weights, supplementary])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=3306)
    parser.add_argument("--user", default="root")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--check", action="store_true", help="compare with --out and write nothing")
    args = parser.parse_args(argv)
    conn = pymysql.connect(
        host=args.host,
        port=args.port,
        user=args.user,
        password=os.environ.get("MYSQL_PWD", ""),
        charset="utf8mb4",
    )
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT VERSION()")
            (version,) = cur.fetchone()
        data = measure(conn)
    finally:
        conn.close()
    old = args.out.read_bytes() if args.out.exists() else b""
    differ = [c for c in range(len(data) // 2) if old[2 * c : 2 * c + 2] != data[2 * c : 2 * c + 2]]
    folded = sum(1 for c in range(0x10000) if int.from_bytes(data[2 * c : 2 * c + 2]) != c)
    print(
        f"{COLLATION} on {version}: {folded} of 65,536 BMP code points weigh another code point;"
        f" supplementary characters weigh U+{int.from_bytes(data[-2:]):04X}"
    )
    if args.check:
        print(f"{args.out}: " + (f"{len(differ)} entries differ" if differ else "up to date"))
        return 1 if differ else 0
    args.out.write_bytes(data)
    print(f"wrote {args.out} ({len(data):,} bytes, {len(differ)} entries changed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
