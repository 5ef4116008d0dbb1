"""The operator's bench and capacity planner: the bench measures every workload beside its peer and
writes what it measured; the planner's arithmetic; profile validation; the check that replays a
compressed peak hour. No test asserts a duration: figures are checked for shape and consistency."""

from __future__ import annotations

import copy
import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from loyalty_engine.bench.capacity import Profile, plan
from loyalty_engine.bench.plot import bench_svg
from loyalty_engine.bench.runner import SIZES, format_table
from loyalty_engine.cli import main
from loyalty_engine.errors import ConfigError

PEERED = ["online_full", "online_group", "online_none", "balance_reads", "verify", "import", "codes_generate",
          "codes_validate"] + [f"post_batch_{s}" for s in SIZES["tiny"]["batch_sizes"]]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, str]:
    tmp = tmp_path_factory.mktemp("bench")
    out = CliRunner().invoke(main, ["bench", "--size", "tiny", "--dir", str(tmp), "--json", str(tmp / "b.json"),
                                    "--plot", str(tmp / "b.svg")])
    assert out.exit_code == 0, out.output
    return json.loads((tmp / "b.json").read_text()), tmp, out.output


def test_bench_measures_every_workload_beside_its_peer_with_repeats(bench_run: Any) -> None:
    result, tmp, output = bench_run
    figs = result["figures"]
    for key in PEERED + ["online_group_commit"]:
        f = figs[key]
        assert len(f["runs"]) == SIZES["tiny"]["repeats"] or key in ("verify",), key
        assert 0 < f["min"] <= f["median"] <= f["max"], key
    for key in PEERED:
        peer = figs[key]["peer"]
        assert peer["median"] > 0 and peer["label"], key
        assert figs[key]["ratio"] == pytest.approx(figs[key]["median"] / peer["median"])
    for name, p in result["latency"].items():
        assert 0 < p["p50"] <= p["p90"] <= p["p99"] <= p["p999"], name
    assert {"purchase, sync=full", "purchase, sync=none", "SQLite peer checkout, synchronous=FULL",
            "balance read", "code check"} <= set(result["latency"])
    fp = result["footprint"]
    for key in ("disk_per_member", "disk_per_purchase", "disk_per_imported_row", "memory_per_member",
                "ram_per_transfer", "transfers_per_purchase"):
        assert fp[key] > 0, key
    assert result["disk"]["fsync_floor_us"] > 0 and result["disk"]["write_mb_per_s"] > 0
    assert result["cpu"]["purchase_cpu_us"] > 0
    m = result["machine"]
    assert m["cores"] >= 1 and m["memory_bytes"] > 0 and m["cpu"]
    assert m["disk"]["dir"] == str(tmp) and m["disk"]["filesystem"] and m["disk"]["free_bytes"] > 0
    assert {"loyalty_engine", "python", "numpy", "pyarrow", "lmdb", "sqlite"} <= set(m["versions"])
    assert result["batch_curve"]["batch_size"] == SIZES["tiny"]["batch_sizes"]
    # the table the command printed holds every figure, and nothing of the run is left on the disk
    for f in figs.values():
        assert f["label"] in output
    assert "ours/peer" in output and "fsync floor" in output
    assert sorted(p.name for p in tmp.iterdir()) == ["b.json", "b.svg"]


def test_bench_plot_draws_both_panels_from_the_figures(bench_run: Any) -> None:
    result, tmp, _ = bench_run
    root = ET.fromstring((tmp / "b.svg").read_text())
    lines = {e.get("data-name"): e.get("points") for e in root.iter("{http://www.w3.org/2000/svg}polyline")}
    assert {"loyalty_engine", "SQLite peer", "engine sync=full", "engine sync=none", "SQLite FULL"} <= set(lines)
    assert len(lines["loyalty_engine"].split()) == len(SIZES["tiny"]["batch_sizes"])
    assert len(lines["engine sync=full"].split()) == 4          # p50, p90, p99, p99.9
    # a higher throughput is drawn higher (smaller y)
    curve = result["batch_curve"]
    ys = [float(p.split(",")[1]) for p in lines["loyalty_engine"].split()]
    order = sorted(range(len(ys)), key=lambda i: curve["ledger"][i])
    assert [ys[i] for i in order] == sorted(ys, reverse=True)
    assert bench_svg(result) == (tmp / "b.svg").read_text()


def test_bench_refuses_a_missing_directory(tmp_path: Path) -> None:
    out = CliRunner().invoke(main, ["bench", "--quick", "--dir", str(tmp_path / "nope")])
    assert out.exit_code == 2 and "nope" in out.output


# -- the planner's arithmetic, on a bench result with round figures ---------------------------------------

BENCH: dict[str, Any] = {
    "kind": "loyalty_engine bench",
    "figures": {"online_full": {"median": 1000.0}, "online_group_commit": {"median": 20_000.0},
                "online_group": {"median": 1500.0}, "online_none": {"median": 5000.0},
                "import": {"median": 100_000.0}},
    "footprint": {"disk_per_member": 300.0, "disk_per_purchase": 1000.0, "disk_per_imported_row": 100.0,
                  "memory_per_member": 400.0, "ram_per_transfer": 100.0, "transfers_per_purchase": 2.0},
    "disk": {"fsync_floor_us": 300.0, "write_mb_per_s": 500.0},
    "cpu": {"purchase_cpu_us": 200.0},
    "machine": {"cpu": "test cpu", "cores": 2, "memory_bytes": 24 * 10**9,
                "disk": {"device": "/dev/x", "filesystem": "ext4", "free_bytes": 10**12}},
    "import_rows": 1_000_000,
}


def test_plan_headroom_import_disk_and_memory() -> None:
    prof = Profile(members=100_000, purchases_per_day=36_000, peak_hour_share=0.1, history_years=2,
                   code_batches_per_month=10, codes_per_batch=80_000, retention_years=5)
    bench = copy.deepcopy(BENCH)
    bench["machine"]["memory_bytes"] = 64 * 10**9          # five years of ids and lots fit in 60% of it
    p = plan(prof, bench)
    assert p.peak_per_second == pytest.approx(1.0)                      # 3,600 in the busiest hour
    assert p.modes["full"] == (1000.0, pytest.approx(1000.0))
    assert p.modes["group commit"][1] == pytest.approx(20_000.0)
    assert p.import_rows == 2 * 365 * 36_000
    assert p.import_hours == pytest.approx(2 * 365 * 36_000 / 100_000 / 3600)
    base = 100_000 * 300 + 2 * 365 * 36_000 * 100
    assert p.disk_bytes_1y == pytest.approx(base + 365 * 36_000 * 1000 + 12 * 10 * 80_000 / 8)
    assert p.disk_bytes_5y == pytest.approx(base + 5 * 365 * 36_000 * 1000 + 5 * 12 * 10 * 80_000 / 8)
    assert p.memory_bytes_1y == pytest.approx(100_000 * 400 + (365 * 36_000 + p.import_rows) * 2 * 100)
    assert p.fits and p.partitions == 1 and p.machines == 1 and not p.reasons
    text = p.text()
    assert "1.0 purchases per second" in text and "headroom 1,000.0x (comfortable)" in text
    assert "one machine carries this profile" in text
    # the limit: a durable purchase takes 1,000 us of which 200 are CPU: the disk's flushes
    assert p.limit.startswith("the disk's flushes") and "800 us wait" in p.limit


def test_plan_retention_caps_the_journal_and_says_so() -> None:
    prof = Profile(members=1000, purchases_per_day=10_000, retention_years=2)
    p = plan(prof, BENCH)
    assert p.disk_bytes_5y == pytest.approx(1000 * 300 + 2 * 365 * 10_000 * 1000)
    assert p.disk_bytes_5y_all == pytest.approx(1000 * 300 + 5 * 365 * 10_000 * 1000)
    assert "cannot drop old journal entries" in p.text()


def test_plan_outgrows_one_machine_and_sizes_the_partitions() -> None:
    # a peak of 22,222/s (more than half of the best mode's 20,000/s), and disk and memory beyond one machine
    prof = Profile(members=50_000_000, purchases_per_day=400_000_000, peak_hour_share=0.2)
    p = plan(prof, BENCH)
    peak = 400_000_000 * 0.2 / 3600
    assert not p.fits
    assert any("peak" in r for r in p.reasons) and any("disk" in r for r in p.reasons)
    assert any("memory" in r for r in p.reasons)
    writers = math.ceil(peak * 2 / 20_000)
    machines = max(math.ceil(writers / 2), math.ceil(2 * p.disk_bytes_5y / 10**12),
                   math.ceil(p.memory_bytes_5y / (0.6 * 24 * 10**9)))
    assert p.machines == machines and p.partitions == max(writers, machines)
    assert f"across {p.partitions} ledgers" in p.text() and "OUTGROWS" in p.text()
    assert p.modes["full"][1] < 1 and "NOT enough" in p.text()


def test_plan_names_the_cpu_or_the_disk_bandwidth_as_the_limit() -> None:
    b = copy.deepcopy(BENCH)
    b["cpu"]["purchase_cpu_us"] = 900.0                  # of 1,000 us: the writer's core
    assert plan(Profile(members=10, purchases_per_day=10), b).limit.startswith("one core")
    b["disk"]["write_mb_per_s"] = 0.001                 # a peak that writes more than the disk takes
    assert plan(Profile(members=10, purchases_per_day=100_000), b).limit.startswith("disk bandwidth")


@pytest.mark.parametrize(("where", "value", "message"), [
    (("machine", "memory_bytes"), 0, "machine.memory_bytes = 0 is not a positive figure"),
    (("disk", "write_mb_per_s"), 0, "disk.write_mb_per_s = 0"),
    (("figures", "online_full", "median"), 0.0, "online_full and import figures must be positive"),
    (("footprint", "disk_per_purchase"), -1, "footprint.disk_per_purchase = -1"),
])
def test_plan_names_a_zero_or_missing_figure(where: tuple[str, ...], value: Any, message: str) -> None:
    b = copy.deepcopy(BENCH)
    d = b
    for k in where[:-1]:
        d = d[k]
    d[where[-1]] = value
    with pytest.raises(ConfigError, match=message):
        plan(Profile(members=10, purchases_per_day=10), b)
    del d[where[-1]]
    with pytest.raises(ConfigError):
        plan(Profile(members=10, purchases_per_day=10), b)


def test_a_full_disk_outgrows_and_says_so() -> None:
    b = copy.deepcopy(BENCH)
    b["machine"]["disk"]["free_bytes"] = 0
    p = plan(Profile(members=10, purchases_per_day=10), b)
    assert not p.fits and any("free disk (none)" in r for r in p.reasons)


def test_the_disk_verdict_counts_the_whole_journal() -> None:
    # one year of journal "retained", but nothing is pruned: five years stay on the disk
    b = copy.deepcopy(BENCH)
    prof = Profile(members=1000, purchases_per_day=1_000_000, retention_years=1)
    b["machine"]["disk"]["free_bytes"] = int(3 * plan(prof, BENCH).disk_bytes_5y)   # room for 5y capped at 1y
    p = plan(prof, b)
    assert p.disk_bytes_5y_all > 1.5 * b["machine"]["disk"]["free_bytes"] / 2
    assert not p.fits and any("five years of data" in r for r in p.reasons)


def test_plan_refuses_what_is_not_a_bench_result() -> None:
    with pytest.raises(ConfigError, match="not a 'loyalty-engine bench' result"):
        plan(Profile(members=1, purchases_per_day=1), {"figures": {}})
    b = copy.deepcopy(BENCH)
    del b["figures"]["import"]
    with pytest.raises(ConfigError, match="no figure 'import'"):
        plan(Profile(members=1, purchases_per_day=1), b)


@pytest.mark.parametrize(("d", "message"), [
    ({"members": 10}, "'purchases_per_day' is required"),
    ({"members": 10, "purchases_per_day": 5, "shops": 3}, r"unknown field\(s\) \['shops'\]"),
    ({"members": -1, "purchases_per_day": 5}, "members = -1 must not be negative"),
    ({"members": 10, "purchases_per_day": 5.5}, "purchases_per_day = 5.5 must be a whole number"),
    ({"members": True, "purchases_per_day": 5}, "members = True must be a whole number"),
    ({"members": 10, "purchases_per_day": 5, "peak_hour_share": 1.5}, "peak_hour_share = 1.5 must be in"),
    ({"members": 10, "purchases_per_day": 5, "history_years": "3"}, "history_years = '3' must be a number"),
])
def test_profile_errors_name_the_field_and_value(d: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Profile.from_dict(d)


def test_profile_from_toml_names_the_file(tmp_path: Path) -> None:
    f = tmp_path / "club.toml"
    f.write_text("members = 2_000\npurchases_per_day = 500\nhistory_years = 1.5\n")
    assert Profile.from_toml(f) == Profile(members=2000, purchases_per_day=500, history_years=1.5)
    f.write_text("members = 2_000\npurchases_per_day = 500\nbranches = 4\n")
    with pytest.raises(ConfigError, match="club.toml.*branches"):
        Profile.from_toml(f)


# -- the command ------------------------------------------------------------------------------------------

def test_capacity_command_from_a_bench_file(tmp_path: Path) -> None:
    (tmp_path / "b.json").write_text(json.dumps(BENCH))
    (tmp_path / "club.toml").write_text("members = 100_000\npurchases_per_day = 36_000\npeak_hour_share = 0.1\n")
    out = CliRunner().invoke(main, ["capacity", str(tmp_path / "club.toml"), "--from", str(tmp_path / "b.json"),
                                    "--history-years", "2", "--json", str(tmp_path / "plan.json")])
    assert out.exit_code == 0, out.output
    assert "headroom" in out.output and "import in about" in out.output and "Limit:" in out.output
    saved = json.loads((tmp_path / "plan.json").read_text())["plan"]
    assert saved["profile"]["history_years"] == 2 and saved["peak_per_second"] == pytest.approx(1.0)
    out = CliRunner().invoke(main, ["capacity", "--from", str(tmp_path / "b.json")])
    assert out.exit_code == 2 and "--members N --purchases-per-day N" in out.output
    (tmp_path / "bad.json").write_text("{not json")
    out = CliRunner().invoke(main, ["capacity", "--members", "5", "--purchases-per-day", "5",
                                    "--from", str(tmp_path / "bad.json")])
    assert out.exit_code == 2 and "bad.json" in out.output


def test_capacity_check_replays_the_compressed_peak_hour(bench_run: Any, tmp_path: Path) -> None:
    _, tmp, _ = bench_run
    out = CliRunner().invoke(main, ["capacity", "--members", "500", "--purchases-per-day", "2000",
                                    "--from", str(tmp / "b.json"), "--check", "--seconds", "2",
                                    "--dir", str(tmp_path), "--json", str(tmp_path / "c.json")])
    assert out.exit_code == 0, out.output
    chk = json.loads((tmp_path / "c.json").read_text())["check"]
    flat, paced = chk["flat_out"], chk["paced"]
    assert flat["purchases"] >= 200 and flat["measured_per_s"] > 0 and flat["measured_disk_per_purchase"] > 0
    assert flat["error"] == pytest.approx(flat["measured_per_s"] / flat["predicted_per_s"] - 1)
    # the busiest hour (12% of 2,000) or as much of it as fits in half the 2 seconds at the paced rate (a
    # machine that measured itself slow, e.g. while busy, paces fewer)
    assert paced["purchases"] == int(min(240, paced["rate_per_s"] * 2 / 2)) > 0
    # compressed to arrive at 80% of the predicted durable rate
    assert paced["rate_per_s"] == pytest.approx(0.8 * flat["predicted_per_s"])
    assert paced["predicted_busy_share"] == pytest.approx(0.8) and paced["predicted_keeps_up"]
    assert 0 <= paced["measured_busy_share"] <= 1 and paced["p99_wait_and_commit_us"] > 0
    assert "predicted" in out.output and "measured" in out.output
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]   # the check's club is removed


def test_format_table_prints_each_figure_with_its_spread() -> None:
    result = {"figures": {"x": {"label": "things/s", "unit": "things/s", "median": 2000.0, "min": 1500.0,
                                "max": 2500.0, "higher_is_better": True, "peer": {"median": 500.0}, "ratio": 4.0}},
              "latency": {"one thing": {"p50": 1.0, "p90": 2.0, "p99": 3.0, "p999": 4.0}}, "footprint": {}}
    table = format_table(result)
    assert "things/s" in table and "1,500-2,500" in table and "4.0x" in table and "one thing" in table
