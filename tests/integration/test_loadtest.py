"""The load-test kit end to end on real MariaDB (issue 10): ``loadtest/run`` on a running
cluster, under ``--compare`` with two Locust processes, and ``--reshard`` (2 -> 4 shards under
load) whose ledger check must pass; then the ledger check shown to fail when acknowledged
writes are dropped, changed, duplicated or a purged order comes back."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from loadtest_cli import ROOT, RUN, report_of, run
from sqlalchemy import Engine, create_engine, text

from shardrouter import Router, Topology

pytestmark = pytest.mark.mariadb

sys.path.insert(0, str(ROOT / "loadtest"))
import ledger as ledgers  # noqa: E402  (loadtest/ is a folder of scripts, not a package)
import order_service as svc  # noqa: E402

PNG = b"\x89PNG\r\n\x1a\n"


def assert_run_files(out: Path, name: str) -> None:
    for suffix in ("_stats.csv", "_stats_history.csv", ".html"):
        assert (out / name / f"{name}{suffix}").stat().st_size > 0, suffix
    assert (out / name / f"{name}-timeline.png").read_bytes().startswith(PNG)
    assert (out / "summary.md").read_text().startswith("# Load run")
    assert json.loads((out / "summary.json").read_text())["runs"]


@pytest.fixture(scope="module")
def cluster(shard_databases: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One short run on the session sandbox (``--config``, ``--reset``); yields its folder."""
    out = tmp_path_factory.mktemp("loadrun")
    done = run(
        "--config", str(shard_databases), "--reset", "-u", "6", "-t", "6s",
        "--seed-users", "60", "--orders-per-user", "2", "--out", str(out), "--json",
    )  # fmt: skip
    report = report_of(done)
    (out / "report.json").write_text(json.dumps(report))
    yield out


@pytest.mark.timeout(300)
def test_a_run_on_a_running_cluster_reports_and_checks_its_ledger(
    cluster: Path, shard_databases: Path
) -> None:
    report = json.loads((cluster / "report.json").read_text())
    (only,) = report["runs"]
    total = only["summary"]["all"]
    assert total["requests"] > 100 and total["failures"] == 0, total
    for op in ("place_order", "get_order", "user_orders", "pay", "merchant_orders"):
        assert only["summary"]["operations"][op]["requests"] > 0, op
    assert only["ledger"]["ok"], only["ledger"]
    assert only["ledger"]["orders_in_ledger"] >= 120  # the seed at least
    assert_run_files(cluster, "router")
    # Locust's own count agrees with the request log's (Locust writes its CSV as the users
    # stop: the requests they finish meanwhile are in the log only)
    stats = (cluster / "router" / "router_stats.csv").read_text().splitlines()
    aggregated = next(line for line in stats if ",Aggregated," in line)
    assert 0.9 * total["requests"] <= int(aggregated.split(",")[2]) <= total["requests"]


def _engines(topology: Topology) -> dict[str, Engine]:
    return {
        name: create_engine(shard.primary.render_as_string(hide_password=False))
        for name, shard in topology.shards.items()
    }


def _check(out: Path, config: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, str(ROOT / "loadtest" / "ledger.py"), str(out), "--config", str(config),
         "--json"],
        capture_output=True, text=True, timeout=120, check=False, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.timeout(300)
def test_the_ledger_check_fails_for_each_lost_or_wrong_write(
    cluster: Path, shard_databases: Path
) -> None:
    out = cluster / "router"
    topology = Topology.load(shard_databases)
    # An order placed, cancelled and purged by this test, in the ledger like the run's own.
    router = Router(topology)
    service = svc.OrderService(router)
    writer = ledgers.LedgerWriter(out, "test")
    try:
        purged = service.new_order_key(7)
        service.place_order(7, 3, [svc.Item("sku", 1, 100)], idempotency_key=purged)
        writer.placed(purged, 7, 3, 1, True)
        assert service.cancel(purged)
        writer.moved(purged, "new", "cancelled", True)
        assert service.purge(purged)
        writer.purged(purged, True)
    finally:
        writer.close()
        service.close()
        router.close()
    rc, found = _check(out, shard_databases)
    assert rc == 0 and found["ok"], found

    replay = ledgers.expected(ledgers.read_records(out))
    present = sorted(o for o, e in replay.orders.items() if e.present is True)
    moved = [o for o in present if replay.orders[o].statuses == {"paid"}]
    cancelled = [o for o in present if replay.orders[o].statuses == {"cancelled"}]
    assert len(present) > 3 and moved and cancelled, "the run paid and cancelled orders"
    engines = _engines(topology)

    def place_of(order_id: int) -> tuple[str, str, int]:
        user = replay.orders[order_id].user_id
        slot = int(topology.slot_for("orders", user))
        return topology.shard_of_slot(slot), topology.table("orders").physical(slot), slot

    try:
        # 1. an acknowledged order dropped (the write deliberately lost)
        lost = present[0]
        shard, table, _ = place_of(lost)
        with engines[shard].begin() as conn:
            conn.execute(text(f"DELETE FROM {table} WHERE order_id = :o"), {"o": lost})
        rc, found = _check(out, shard_databases)
        assert rc == 1 and not found["ok"]
        assert found["problems"]["lost"] == 1 and str(lost) in found["examples"]["lost"][0]
        # 2. a paid order back to new, a cancelled one back to paid
        for order_id, status in ((moved[0], "new"), (cancelled[0], "paid")):
            shard, table, _ = place_of(order_id)
            with engines[shard].begin() as conn:
                conn.execute(
                    text(f"UPDATE {table} SET status = :s WHERE order_id = :o"),
                    {"s": status, "o": order_id},
                )
        rc, found = _check(out, shard_databases)
        assert rc == 1
        assert found["problems"]["wrong_status"] == 1 and found["problems"]["regressed"] == 1
        # 3. a purged order resurrected
        shard, table, _ = place_of(purged)
        with engines[shard].begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {table} (order_id, user_id, merchant_id, status, amount_cents,"
                    " created_at) VALUES (:o, 7, 3, 'cancelled', 100, NOW())"
                ),
                {"o": purged},
            )
        rc, found = _check(out, shard_databases)
        assert found["problems"]["resurrected"] == 1, found
        # 4. an order duplicated onto another shard
        copy = present[1]
        shard, table, _ = place_of(copy)
        other = next(s for s in topology.shards if s != shard)
        with engines[shard].connect() as conn:
            row = conn.execute(text(f"SELECT * FROM {table} WHERE order_id = :o"), {"o": copy})
            values = dict(row.mappings().one())
        with engines[other].begin() as conn:
            conn.execute(
                text(
                    f"INSERT INTO {table} (order_id, user_id, merchant_id, status, amount_cents,"
                    " created_at) VALUES (:order_id, :user_id, :merchant_id, :status,"
                    " :amount_cents, :created_at)"
                ),
                values,
            )
        rc, found = _check(out, shard_databases)
        assert found["problems"]["duplicated"] == 1, found
        assert (found["problems"]["lost"], found["problems"]["phantom"]) == (1, 0)
    finally:
        for engine in engines.values():
            engine.dispose()


@pytest.mark.timeout(400)
def test_reshard_under_load_loses_nothing(
    scratch_dir: Path, scratch_port: int, tmp_path: Path
) -> None:
    done = run(
        "--reshard", "--port", str(scratch_port), "--dir", str(scratch_dir), "-u", "6",
        "--rate", "15", "-t", "30s", "--reshard-at", "4", "--seed-users", "100",
        "--shadow-seconds", "1", "--out", str(tmp_path), "--json", timeout=360,
    )  # fmt: skip
    report = report_of(done)
    (only,) = report["runs"]
    assert not report.get("reshard_error")
    # (a switch abandoned because a router acked late is run again: it shows as its own phase)
    names = [p["phase"] for p in only["phases"] if p["phase"] != "switch (abandoned)"]
    assert names == [
        "before", "plan", "start", "copy", "verify", "shadow", "switch", "finalize", "after"
    ]  # fmt: skip
    assert all(p["requests"] > 0 for p in only["phases"] if p["phase"] in ("before", "after"))
    assert only["summary"]["all"]["failures"] == 0, only["summary"]["errors"]
    assert sum(p["failures"] for p in only["phases"]) == 0
    window = only["switch_windows"][-1]
    assert window["phase"] == "switch" and window["writes"] > 0
    assert all(w["failures"] == 0 for w in only["switch_windows"])
    assert only["ledger"]["ok"], only["ledger"]
    assert only["ledger"]["orders_found"] > 0
    assert_run_files(tmp_path, "router")
    log = Path(only["reshard_log"]).read_text()
    assert "shardctl reshard finalize --yes" in log


@pytest.mark.timeout(400)
def test_compare_without_lookups_with_two_locust_processes(
    scratch_dir: Path, scratch_port: int, tmp_path: Path
) -> None:
    done = run(
        "--compare", "--mix", "keyed", "--no-lookups", "--processes", "2", "--port",
        str(scratch_port),
        "--dir", str(scratch_dir), "-u", "6", "-t", "5s", "--seed-users", "50",
        "--out", str(tmp_path), "--json", timeout=300,
    )  # fmt: skip
    report = report_of(done)
    baseline, routed = report["runs"]
    assert (baseline["name"], routed["name"]) == ("baseline", "router")
    for one in (baseline, routed):
        ops = set(one["summary"]["operations"])
        assert ops and not ops & {"merchant_orders", "count_by_status"}, ops
        assert one["summary"]["all"]["failures"] == 0
        assert len(list((tmp_path / one["name"]).glob("requests-*.csv"))) == 2  # two workers
    assert "ledger" not in baseline and routed["ledger"]["ok"], routed["ledger"]
    ratio = report["ratio"]
    assert ratio["throughput"] == pytest.approx(
        routed["summary"]["all"]["rps"] / baseline["summary"]["all"]["rps"]
    )
    assert "Router / baseline" in (tmp_path / "summary.md").read_text()


@pytest.mark.timeout(400)
def test_compare_in_alternating_rounds(
    scratch_dir: Path, scratch_port: int, tmp_path: Path
) -> None:
    """--rounds 2: baseline then router, then router then baseline, on the data of the first
    round; each router round's ledger check covers every router round so far; the ratio is
    the median of the pairs'."""
    done = run(
        "--compare", "--rounds", "2", "--mix", "keyed", "--no-lookups", "--port",
        str(scratch_port), "--dir", str(scratch_dir), "-u", "4", "-t", "4s",
        "--seed-users", "50", "--out", str(tmp_path), "--json", timeout=300,
    )  # fmt: skip
    report = report_of(done)
    names = [r["name"] for r in report["runs"]]
    assert names == ["baseline", "router", "router-2", "baseline-2"]
    assert set(report["seed"]) == {"baseline", "router"}  # seeded once per side
    assert all(r["ledger"]["ok"] for r in report["runs"] if "ledger" in r)
    later = report["runs"][2]["ledger"]
    assert later["orders_in_ledger"] > report["runs"][1]["ledger"]["orders_in_ledger"]
    pairs = report["ratio"]["rounds"]
    assert len(pairs) == 2
    assert report["ratio"]["throughput"] == pytest.approx(
        sorted(p["throughput"] for p in pairs)[0] / 2
        + sorted(p["throughput"] for p in pairs)[1] / 2
    )
    assert "Median of 2 rounds" in (tmp_path / "summary.md").read_text()


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--baseline", "--compare"], "--compare runs the baseline already"),
        (["--reshard", "--compare"], "--reshard runs the router only"),
        (["-t", "soon"], "is not a duration"),
        (["-u", "0"], "give 1..10000 users"),
        (["--reshard", "-t", "10s", "--reshard-at", "12"], "past the run's end"),
    ],
)
def test_bad_usage_is_refused_before_anything_starts(args: list[str], message: str) -> None:
    done = run(*args, timeout=50)
    assert done.returncode == 2, done.stderr
    assert message in done.stderr


@pytest.mark.timeout(60)
def test_several_processes_need_a_meta_store(shard_databases: Path) -> None:
    done = run("--config", str(shard_databases), "--processes", "2", timeout=50)
    assert done.returncode == 2
    assert "duplicate order ids" in done.stderr and "meta" in done.stderr


@pytest.mark.timeout(180)
def test_the_locustfile_runs_by_hand(shard_databases: Path, tmp_path: Path) -> None:
    """README's by-hand Locust command (no loadtest/run: no ledger, no request log)."""
    prefix = tmp_path / "hand"
    done = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(ROOT / "loadtest" / "locustfile.py"),
         "--headless", "-u", "8", "-r", "8", "-t", "5s", "--csv", str(prefix)],
        env=dict(os.environ, LOADTEST_TOPOLOGY=str(shard_databases)),
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "hand_stats.csv").read_text().splitlines()
    aggregated = next(line for line in rows if ",Aggregated," in line).split(",")
    assert int(aggregated[2]) > 50 and int(aggregated[3]) == 0, aggregated
    assert not list(tmp_path.glob("ledger-*")) and not list(tmp_path.glob("requests-*"))


@pytest.mark.timeout(240)
def test_ctrl_c_stops_locust_and_every_server(
    scratch_dir: Path, scratch_port: int, tmp_path: Path
) -> None:
    from shardrouter.ops import sandbox as sb

    proc = subprocess.Popen(
        [sys.executable, str(RUN), "--port", str(scratch_port), "--dir", str(scratch_dir),
         "-u", "4", "-t", "120s", "--seed-users", "30", "--out", str(tmp_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 150
        while not list((tmp_path / "router").glob("requests-*.csv")):  # Locust is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        box = sb.status(scratch_dir)
        assert box is not None and all(sb.is_running(s) for s in box.shards)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert "sandbox stopped" in err
    after = sb.status(scratch_dir)
    assert after is None or not any(sb.is_running(s) for s in after.shards)
    for shard in box.shards:  # the ports are free again
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", shard.port)) != 0, shard.port
    locusts = subprocess.run(
        ["pgrep", "-f", f"--csv {tmp_path}"], capture_output=True, text=True, check=False
    )
    assert locusts.stdout.strip() == "", "a Locust process outlived loadtest/run"
