"""Figures of a load run from its request log (``requests-*.csv``, one line per Locust request,
written by every client process): per operation, per phase, around each switch, per second;
as text, Markdown and a PNG. Pure but for reading the log and writing the files.

Percentiles are exact (nearest rank over every request), not Locust's rounded buckets; Locust's
own CSV and HTML reports are written beside them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SWITCH_MARGIN_S = 1.0
"""The switch window: from this long before the switch command starts to this long after it
ends (held writes are released just after the new version is acknowledged)."""


@dataclass(frozen=True)
class Request:
    t: float
    """When it ended (Unix seconds)."""
    op: str
    ms: float
    ok: bool
    write: bool
    retries: int
    error: str


def read_requests(directory: Path) -> list[Request]:
    out: list[Request] = []
    for path in sorted(directory.glob("requests-*.csv")):
        with path.open(encoding="utf-8") as f:
            for line in f:
                if not line.endswith("\n"):
                    break  # a torn last line
                t, op, ms, ok, write, retries, error = line.rstrip("\n").split(",", 6)
                out.append(
                    Request(float(t), op, float(ms), ok == "1", write == "1", int(retries), error)
                )
    out.sort(key=lambda r: r.t)
    return out


def percentile(sorted_values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, int(-(-q * len(sorted_values) // 100)))  # ceil, without float rounding
    return sorted_values[rank - 1]


def stats(requests: Sequence[Request], seconds: float) -> dict[str, Any]:
    times = sorted(r.ms for r in requests)
    return {
        "requests": len(requests),
        "failures": sum(not r.ok for r in requests),
        "retries": sum(r.retries for r in requests),
        "rps": round(len(requests) / seconds, 1) if seconds > 0 else None,
        "p50_ms": _round(percentile(times, 50)),
        "p95_ms": _round(percentile(times, 95)),
        "p99_ms": _round(percentile(times, 99)),
        "max_ms": _round(times[-1] if times else None),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def summary(requests: Sequence[Request], start: float, end: float) -> dict[str, Any]:
    """Per operation and in all, over [start, end)."""
    seconds = end - start
    by_op: dict[str, list[Request]] = {}
    for r in requests:
        by_op.setdefault(r.op, []).append(r)
    errors: dict[str, int] = {}
    for r in requests:
        if not r.ok:
            errors[f"{r.op}: {r.error}"] = errors.get(f"{r.op}: {r.error}", 0) + 1
    return {
        "seconds": round(seconds, 1),
        "operations": {op: stats(rs, seconds) for op, rs in sorted(by_op.items())},
        "all": stats(requests, seconds),
        "errors": errors,
    }


def per_phase(
    requests: Sequence[Request], phases: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Requests, failures and write p99 of every phase (a request belongs to the phase in
    which it ended)."""
    out = []
    for phase in phases:
        inside = [r for r in requests if phase["start"] <= r.t < phase["end"]]
        writes = sorted(r.ms for r in inside if r.write)
        out.append(
            {
                "phase": phase["name"],
                "seconds": round(phase["end"] - phase["start"], 2),
                "requests": len(inside),
                "failures": sum(not r.ok for r in inside),
                "write_p99_ms": _round(percentile(writes, 99)),
                "write_max_ms": _round(writes[-1] if writes else None),
            }
        )
    return out


def switch_windows(
    requests: Sequence[Request], phases: Sequence[Mapping[str, Any]]
) -> list[dict[str, Any]]:
    """Writes that ended from SWITCH_MARGIN_S before each ``switch`` phase to SWITCH_MARGIN_S
    after it: count, failures, p99, max."""
    out = []
    for phase in phases:
        if not phase["name"].startswith("switch"):  # also "switch (abandoned)": it froze too
            continue
        lo, hi = phase["start"] - SWITCH_MARGIN_S, phase["end"] + SWITCH_MARGIN_S
        writes = [r for r in requests if r.write and lo <= r.t < hi]
        times = sorted(r.ms for r in writes)
        out.append(
            {
                "phase": phase["name"],
                "window_s": round(hi - lo, 2),
                "writes": len(writes),
                "failures": sum(not r.ok for r in writes),
                "retries": sum(r.retries for r in writes),
                "p99_ms": _round(percentile(times, 99)),
                "max_ms": _round(times[-1] if times else None),
            }
        )
    return out


def timeline(requests: Sequence[Request], start: float, step: float = 1.0) -> list[dict[str, Any]]:
    """Per ``step`` seconds from ``start``: throughput, p50, p99, failures."""
    bins: dict[int, list[Request]] = {}
    for r in requests:
        bins.setdefault(int((r.t - start) // step), []).append(r)
    out = []
    for index in range(max(bins) + 1 if bins else 0):
        rs = bins.get(index, [])
        times = sorted(r.ms for r in rs)
        out.append(
            {
                "t": index * step,
                "rps": len(rs) / step,
                "p50_ms": percentile(times, 50),
                "p99_ms": percentile(times, 99),
                "failures": sum(not r.ok for r in rs),
            }
        )
    return out


def table(rows: Iterable[Sequence[Any]], header: Sequence[str], markdown: bool = False) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines)
    widths = [max([len(str(h)), *(len(r[i]) for r in cells)]) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), *(fmt.format(*row) for row in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


OP_HEADER = ("operation", "requests", "req/s", "p50 ms", "p95 ms", "p99 ms", "max ms", "failed")


def op_rows(result: Mapping[str, Any]) -> list[list[Any]]:
    rows = [
        [op, s["requests"], s["rps"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"],
         s["failures"]]
        for op, s in result["operations"].items()
    ]  # fmt: skip
    s = result["all"]
    rows.append(
        ["all", s["requests"], s["rps"], s["p50_ms"], s["p95_ms"], s["p99_ms"], s["max_ms"],
         s["failures"]]
    )  # fmt: skip
    return rows


PHASE_HEADER = ("phase", "seconds", "requests", "failed", "write p99 ms", "write max ms")


def render(report: Mapping[str, Any], md: bool = False) -> str:
    """The report of ``loadtest/run --json`` as text (a terminal) or Markdown (summary.md)."""
    out = [f"# Load run {report['label']}", "", f"`{report['command']}`", ""] if md else []
    for run in report["runs"]:
        out += [f"## {run['name']}" if md else f"== {run['name']} ==", ""]
        out += [table(op_rows(run["summary"]), OP_HEADER, md), ""]
        errors = run["summary"]["errors"]
        if errors:
            out.append("Failures: " + ", ".join(f"{k} x{v}" for k, v in errors.items()))
        if run.get("phases"):
            rows = [[p["phase"], p["seconds"], p["requests"], p["failures"], p["write_p99_ms"],
                     p["write_max_ms"]] for p in run["phases"]]  # fmt: skip
            out += ["Phases (a request counts in the phase in which it ended):", ""]
            out += [table(rows, PHASE_HEADER, md), ""]
        for w in run.get("switch_windows", []):
            out.append(
                f"Switch window ({w['window_s']} s around the {w.get('phase', 'switch')}):"
                f" {w['writes']} writes,"
                f" {w['failures']} failed, {w['retries']} retries, p99 {_cell(w['p99_ms'])} ms,"
                f" max {_cell(w['max_ms'])} ms."
            )
        if run.get("ledger"):
            ledger = run["ledger"]
            out.append(
                f"Ledger check {'PASSED' if ledger['ok'] else 'FAILED'}:"
                f" {ledger['orders_in_ledger']} orders in the ledger, {ledger['orders_found']}"
                " on the shards; "
                + ", ".join(f"{k} {v}" for k, v in ledger["problems"].items())
                + "."
            )
            out += [f"  {kind}: {examples[0]}" for kind, examples in ledger["examples"].items()]
        if run.get("plot"):
            name = Path(run["plot"]).name
            out += ["", f"![throughput and latency]({run['name']}/{name})" if md else
                    f"plot: {run['plot']}"]  # fmt: skip
        out.append("")
    if report.get("ratio"):
        r = report["ratio"]
        out += [
            "## Router / baseline" if md else "== router / baseline ==",
            "",
            f"Throughput {r['throughput']:.2f}x, p99 {r['p99']:.2f}x (router / baseline).",
            "",
        ]
        if len(r.get("rounds", ())) > 1:
            each = ", ".join(f"{p['throughput']:.2f}x" for p in r["rounds"])
            out += [f"Median of {len(r['rounds'])} rounds; throughput per round: {each}.", ""]
    if report.get("reshard_error"):
        out.append(f"RESHARD FAILED: {report['reshard_error']}")
        if report.get("reshard_settled"):
            out.append(f"  then: {report['reshard_settled']}")
    if report.get("locust_error"):
        out.append(f"LOCUST FAILED: {report['locust_error']}")
    return "\n".join(out)


def plot(
    path: Path,
    requests: Sequence[Request],
    start: float,
    end: float,
    phases: Sequence[Mapping[str, Any]],
    title: str,
) -> Path:
    """Throughput and p50/p99 per second, each phase a shaded band; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = timeline([r for r in requests if start <= r.t < end], start)
    if len(points) > 2 and end - start < len(points):
        points = points[:-1]  # the last second is cut short by the end of the run
    t = [p["t"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    top.plot(t, [p["rps"] for p in points], color="tab:blue", label="requests/s")
    failed = [(p["t"], p["failures"]) for p in points if p["failures"]]
    if failed:
        top.scatter(*zip(*failed, strict=True), color="tab:red", label="failed/s", zorder=3)
    top.set_ylabel("requests / s")
    top.set_ylim(bottom=0)
    top.legend(loc="lower left")
    top.set_title(title, pad=28)
    bottom.plot(t, [p["p50_ms"] for p in points], color="tab:green", label="p50")
    bottom.plot(t, [p["p99_ms"] for p in points], color="tab:orange", label="p99")
    bottom.set_yscale("log")
    bottom.set_ylabel("latency ms (log)")
    bottom.set_xlabel("seconds since the start of the run")
    bottom.legend(loc="upper left")
    colours = ("#e8e8ff", "#e8ffe8", "#fff3e0", "#ffe8f0", "#e8f8ff", "#f8f8e0", "#ffe8e8")
    for i, phase in enumerate(phases):
        lo, hi = phase["start"] - start, phase["end"] - start
        if phase["name"].startswith("switch"):
            for axis in (top, bottom):
                axis.axvline(lo, color="tab:red", linestyle="--", linewidth=1)
        for axis in (top, bottom):
            axis.axvspan(lo, max(hi, lo + 0.2), color=colours[i % len(colours)], zorder=0)
        top.text(
            (lo + hi) / 2, 1.0, phase["name"], transform=top.get_xaxis_transform(),
            ha="center", va="bottom", fontsize=7, rotation=30,
        )  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
