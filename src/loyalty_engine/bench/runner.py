"""``loyalty-engine bench``: the standard workloads on a temporary club on the disk the operator names,
each beside its peer in the same run, with a warm-up and repeats; median and spread, not one run.

The workloads (sizes in :data:`SIZES`):

- online checkouts, one ``engine.purchase`` per call, for each durability mode (``full``: an fsync per
  purchase; ``group``: LMDB's data sync without the meta sync; ``none``: no sync), with the example
  program of the rules benchmark (10 earn rules, 4 tiers, 5 offers), over members enrolled beforehand;
  and group commit: checkouts gathered into ``purchase_batch`` calls of :data:`GROUP` with one fsync
  each, as a checkout server with a commit queue would do. The peer is a SQLite ledger doing one
  checkout per transaction at the base rate (less work than the engine: no rules);
- batched postings (``post_batch``, ``sync="full"``) at several batch sizes, beside the SQLite peer's
  batch (balance checks, one transaction per batch);
- bulk import of synthetic history from Parquet to a durable ledger, beside PyArrow + pure-Python
  evaluation + SQLite;
- product codes generated (to strings) and validated in batches, beside a per-code FF1;
- balance reads, beside SQLite's primary-key lookup;
- ``verify()`` of the batched ledger, beside SQLite's integrity check plus balances rebuilt by SQL;
- what this disk does: the fsync floor (the cheapest durable LMDB commit) and sequential writes;
- footprint: bytes on disk per member, per online purchase and per imported row; memory per member.

:func:`run` returns a JSON-ready dict (``loyalty-engine bench --json`` writes it; ``capacity --from``
reads it); :func:`format_table` prints it for a person.
"""

from __future__ import annotations

import gc
import os
import platform
import resource
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

ns = time.perf_counter_ns

#: Checkouts per commit in the group-commit workload.
GROUP = 64

#: Workload sizes. ``quick`` runs in under a minute on two cores; ``tiny`` is for the test suite.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": {"repeats": 2, "members": 2_000, "online": 60, "online_full": 30, "group_batches": 3,
             "accounts": 20_000, "batch_sizes": [10, 100, 1_000], "batch_rows": 3_000, "peer_rows": 1_000,
             "import_rows": 20_000, "import_members": 2_000, "peer_import_rows": 2_000,
             "codes": 100_000, "peer_codes": 300, "balance_reads": 5_000, "fsync_commits": 30,
             "write_mb": 8},
    "quick": {"repeats": 3, "members": 10_000, "online": 400, "online_full": 150, "group_batches": 10,
              "accounts": 100_000, "batch_sizes": [10, 100, 1_000, 10_000], "batch_rows": 20_000,
              "peer_rows": 3_000, "import_rows": 200_000, "import_members": 20_000, "peer_import_rows": 5_000,
              "codes": 1_000_000, "peer_codes": 1_000, "balance_reads": 50_000, "fsync_commits": 100,
              "write_mb": 64},
    "standard": {"repeats": 5, "members": 100_000, "online": 3_000, "online_full": 1_000, "group_batches": 50,
                 "accounts": 1_000_000, "batch_sizes": [10, 100, 1_000, 10_000, 100_000], "batch_rows": 200_000,
                 "peer_rows": 20_000, "import_rows": 2_000_000, "import_members": 200_000,
                 "peer_import_rows": 20_000, "codes": 10_000_000, "peer_codes": 5_000, "balance_reads": 200_000,
                 "fsync_commits": 500, "write_mb": 256},
}

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- figures --------------------------------------------------------------------------------------------

def _stats(runs: list[float]) -> dict[str, Any]:
    a = np.asarray(runs, np.float64)
    return {"median": float(np.median(a)), "min": float(a.min()), "max": float(a.max()),
            "runs": [float(x) for x in runs]}


def _pcts(samples_ns: list[int]) -> dict[str, float]:
    a = np.asarray(samples_ns, np.float64) / 1000.0
    return {k: float(np.percentile(a, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9))}


class _Figures:
    def __init__(self, say: Callable[[str], None]) -> None:
        self.figures: dict[str, dict[str, Any]] = {}
        self.say = say

    def add(self, key: str, label: str, unit: str, runs: list[float], peer: list[float] | None = None,
            peer_label: str = "", higher_is_better: bool = True) -> None:
        fig = {"label": label, "unit": unit, **_stats(runs), "higher_is_better": higher_is_better}
        if peer:
            fig["peer"] = {"label": peer_label, **_stats(peer)}
            fig["ratio"] = fig["median"] / fig["peer"]["median"] if fig["peer"]["median"] else None
        self.figures[key] = fig
        self.say(_row(fig))


def _fmt(v: float) -> str:
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:,.1f}"
    return f"{v:,.2f}"


def _row(fig: dict[str, Any]) -> str:
    spread = f"{_fmt(fig['min'])}-{_fmt(fig['max'])}"
    peer = fig.get("peer")
    peer_s = _fmt(peer["median"]) if peer else "-"
    ratio = fig.get("ratio")
    if ratio is not None and not fig["higher_is_better"]:
        ratio = 1 / ratio
    ratio_s = "-" if ratio is None else (f"{ratio:,.1f}x" if ratio >= 1 else f"{ratio:.2f}x")
    return f"{fig['label']:<52} {_fmt(fig['median']):>12} {spread:>23} {fig['unit']:<12} {peer_s:>11} {ratio_s:>8}"


HEADER = (f"{'measure':<52} {'median':>12} {'spread (min-max)':>23} {'unit':<12} {'SQLite peer':>11} "
          f"{'ours/peer':>8}")


def format_table(result: dict[str, Any], figures: bool = True) -> str:
    """The figures of a bench result as the table the command prints (``figures=False``: only the
    latency and footprint parts, when the rows were printed as they were measured)."""
    lines = [HEADER, *(_row(f) for f in result["figures"].values())] if figures else []
    lat = result.get("latency", {})
    if lat:
        lines.append("")
        lines.append(f"{'latency per call (us)':<52} {'p50':>10} {'p90':>10} {'p99':>10} {'p99.9':>10}")
        for name, p in lat.items():
            lines.append(f"{name:<52} {_fmt(p['p50']):>10} {_fmt(p['p90']):>10} {_fmt(p['p99']):>10} "
                         f"{_fmt(p['p999']):>10}")
    fp = result.get("footprint", {})
    if fp:
        lines.append("")
        for k, label in FOOTPRINT_LABELS.items():
            if k in fp:
                lines.append(f"{label:<52} {fp[k]:>12,.0f} bytes")
    return "\n".join(lines)


FOOTPRINT_LABELS = {
    "disk_per_member": "disk per member (enrolled, no purchases)",
    "disk_per_purchase": "disk per online purchase (receipt, transfers, state)",
    "disk_per_imported_row": "disk per imported history row",
    "memory_per_member": "memory per member (process growth)",
    "ram_per_transfer": "ledger memory per transfer kept (ids and lots)",
}


# -- the machine ----------------------------------------------------------------------------------------

def machine(directory: Path) -> dict[str, Any]:
    """What the figures were measured on: CPU, cores, memory, the disk under ``directory``, versions."""
    import cryptography
    import lmdb
    import pyarrow

    from .. import __version__

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    if not mem:
        try:
            mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError):
            mem = 0
    usage = shutil.disk_usage(directory)
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(),
            "disk": {"dir": str(directory), **_filesystem(directory), "total_bytes": usage.total,
                     "free_bytes": usage.free},
            "versions": {"loyalty_engine": __version__, "python": sys.version.split()[0],
                         "numpy": np.__version__, "pyarrow": pyarrow.__version__, "lmdb": lmdb.__version__,
                         "sqlite": sqlite3.sqlite_version, "cryptography": cryptography.__version__}}


def _filesystem(directory: Path) -> dict[str, str]:
    """The mount (device, filesystem type) that holds ``directory``, from /proc/mounts."""
    best = ("", "?", "?")
    try:
        real = str(directory.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype = line.split()[:3]
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best[0]):
                best = (mnt, dev, fstype)
    except OSError:
        pass
    return {"mount": best[0], "device": best[1], "filesystem": best[2]}


def _rss() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _used_bytes(env: Any) -> int:
    """Bytes of the LMDB data file in use (its high-water mark of pages)."""
    return (int(env.info()["last_pgno"]) + 1) * int(env.stat()["psize"])


# -- workloads ------------------------------------------------------------------------------------------

def _online(figs: _Figures, lat: dict[str, Any], fp: dict[str, float], cpu: dict[str, float], tmp: Path,
            sz: dict[str, Any]) -> None:
    from ..engine import Engine
    from .rules_workload import program
    from .sqlite_peer import SqlitePeer

    prog = program()
    members = sz["members"]
    names = [f"m{i}" for i in range(members)]
    rng = np.random.default_rng(3)
    for mode in ("full", "group", "none"):
        n = sz["online_full"] if mode == "full" else sz["online"]
        path = tmp / f"online-{mode}"
        gc.collect()
        rss0 = _rss()
        with Engine.open(path, program=prog, sync=mode) as eng:
            env = eng.ledger._st().env
            before = _used_bytes(env)
            eng.enroll_batch(names, at=T0, events=False)
            if mode == "none":
                fp["disk_per_member"] = (_used_bytes(env) - before) / members
                fp["memory_per_member"] = max(0, _rss() - rss0) / members
            k = 0
            runs, samples, cpu_s = [], [], 0.0
            who = rng.integers(0, members, (sz["repeats"] + 1) * n).tolist()
            amounts = rng.integers(20_000, 800_000, len(who)).tolist()
            start_bytes = start_ids = 0
            for rep in range(sz["repeats"] + 1):          # the first round is the warm-up
                if rep == 1:
                    start_bytes, start_ids = _used_bytes(env), eng.ledger._state.n_ids
                c0 = time.process_time()
                t = ns()
                for _ in range(n):
                    s = ns()
                    eng.purchase(names[who[k]], amount=amounts[k], at=T0 + timedelta(seconds=k), ref=f"r{k}")
                    if rep:
                        samples.append(ns() - s)
                    k += 1
                if rep:
                    runs.append(n / ((ns() - t) / 1e9))
                    cpu_s += time.process_time() - c0
            if mode == "none":
                fp["disk_per_purchase"] = (_used_bytes(env) - start_bytes) / (n * sz["repeats"])
                cpu["purchase_cpu_us"] = cpu_s / (n * sz["repeats"]) * 1e6
                fp["transfers_per_purchase"] = (eng.ledger._state.n_ids - start_ids) / (n * sz["repeats"])
            if mode == "full":  # group commit: GROUP checkouts per purchase_batch, one fsync each
                gruns = []
                for rep in range(sz["repeats"] + 1):
                    t = ns()
                    for _ in range(sz["group_batches"]):
                        sel = slice(k % members, k % members + GROUP)
                        m = names[sel] if len(names[sel]) == GROUP else names[:GROUP]
                        eng.purchase_batch({"member": m, "amount": [150_000] * GROUP,
                                            "at": [int((T0 + timedelta(seconds=k + j)).timestamp() * 1e6)
                                                   for j in range(GROUP)],
                                            "ref": [f"g{k + j}" for j in range(GROUP)]}, events=False)
                        k += GROUP
                    if rep:
                        gruns.append(sz["group_batches"] * GROUP / ((ns() - t) / 1e9))
        shutil.rmtree(path, ignore_errors=True)
        # the peer: one checkout per SQLite transaction, the same synchronous level as the mode
        peer_sync = {"full": "FULL", "group": "NORMAL", "none": "OFF"}[mode]
        peer = SqlitePeer(str(tmp / f"online-{mode}.sqlite"), synchronous=peer_sync)
        peer.create_accounts([1], 0)
        peer.create_accounts(range(1_000_000, 1_000_000 + members), 0)
        peer_runs, peer_samples = [], []
        tid = 1
        for rep in range(sz["repeats"] + 1):
            t = ns()
            for j in range(n):
                s = ns()
                peer.purchase(tid, 1_000_000 + who[j], amounts[j], tid)
                tid += 1
                if rep:
                    peer_samples.append(ns() - s)
            if rep:
                peer_runs.append(n / ((ns() - t) / 1e9))
        peer.close()
        label = {"full": "fsync per purchase", "group": "sync without meta sync", "none": "no sync"}[mode]
        figs.add(f"online_{mode}", f"purchases/s online, sync={mode} ({label})", "purchases/s", runs,
                 peer_runs, f"SQLite synchronous={peer_sync}, base rate only")
        lat[f"purchase, sync={mode}"] = _pcts(samples)
        lat[f"SQLite peer checkout, synchronous={peer_sync}"] = _pcts(peer_samples)
        if mode == "full":
            figs.add("online_group_commit", f"purchases/s, group commit ({GROUP} per fsync)", "purchases/s",
                     gruns)


def _batched(figs: _Figures, curve: dict[str, list[float]], fp: dict[str, float], tmp: Path,
             sz: dict[str, Any]) -> dict[str, Any]:
    from ..types import TransferResult
    from .sqlite_peer import SqlitePeer
    from .workloads import SYSTEM, make_workload, member_ids, open_ledger

    accounts = sz["accounts"]
    ledger = open_ledger(str(tmp / "batched"), accounts, sync="full")
    peer = SqlitePeer(str(tmp / "batched.sqlite"))
    peer.create_accounts(SYSTEM, 0)
    peer.create_accounts(member_ids(accounts).tolist(), 1)
    next_id = 1
    for size in sz["batch_sizes"]:
        per_rep = max(size, min(sz["batch_rows"], 300 * size) // size * size)   # at most 300 commits a round
        per_rep_peer = max(size, min(per_rep, sz["peer_rows"] // size * size))
        work = make_workload(accounts, size, (per_rep // size) * (sz["repeats"] + 1), seed=size, first_id=next_id)
        next_id += work.rows
        runs, res = _rounds(work.batches, per_rep // size, sz["repeats"], ledger.post_batch)
        assert (res == TransferResult.OK).any()
        pwork = make_workload(accounts, size, (per_rep_peer // size) * (sz["repeats"] + 1), seed=size + 1,
                              first_id=10**12 + next_id)
        next_id += pwork.rows
        pruns, _ = _rounds(pwork.batches, per_rep_peer // size, sz["repeats"], peer.post_batch)
        figs.add(f"post_batch_{size}", f"postings/s batched, {size:,} per durable commit", "transfers/s", runs,
                 pruns, "SQLite, one transaction per batch")
        curve["batch_size"].append(size)
        curve["ledger"].append(figs.figures[f"post_batch_{size}"]["median"])
        curve["peer"].append(figs.figures[f"post_batch_{size}"]["peer"]["median"])
    st = ledger._state
    fp["ram_per_transfer"] = (st._ids_arr.nbytes + st._lots_arr.nbytes) / max(1, st.n_ids)
    return {"ledger": ledger, "peer": peer, "accounts": accounts}


def _rounds(batches: list[Any], per: int, repeats: int, post: Callable[[Any], Any]) -> tuple[list[float], Any]:
    """Post ``per`` batches a round, a warm-up round and ``repeats`` timed ones: rows/s of each timed
    round, and the last result."""
    runs, res = [], None
    rows = sum(len(b) for b in batches[:per])
    for rep in range(repeats + 1):
        t = ns()
        for b in batches[rep * per:(rep + 1) * per]:
            res = post(b)
        if rep:
            runs.append(rows / ((ns() - t) / 1e9))
    return runs, res


def _balances(figs: _Figures, lat: dict[str, Any], b: dict[str, Any], sz: dict[str, Any]) -> None:
    from .workloads import MEMBER_BASE

    ledger, peer = b["ledger"], b["peer"]
    ids = (MEMBER_BASE + np.random.default_rng(9).integers(0, b["accounts"], sz["balance_reads"])).tolist()
    runs, samples = [], []
    for rep in range(sz["repeats"] + 1):
        t = ns()
        for i in ids:
            s = ns()
            ledger.balance(i)
            if rep == 1:
                samples.append(ns() - s)
        if rep:
            runs.append(len(ids) / ((ns() - t) / 1e9))
    pruns = []
    pids = ids[: max(1000, len(ids) // 10)]
    for rep in range(sz["repeats"] + 1):
        t = ns()
        for i in pids:
            peer.balance(i)
        if rep:
            pruns.append(len(pids) / ((ns() - t) / 1e9))
    figs.add("balance_reads", f"balance reads/s, {b['accounts']:,} accounts", "reads/s", runs, pruns,
             "SQLite primary-key lookup")
    lat["balance read"] = _pcts(samples)


def _verify(figs: _Figures, b: dict[str, Any], sz: dict[str, Any]) -> None:
    ledger, peer = b["ledger"], b["peer"]
    runs = []
    for _ in range(max(2, sz["repeats"] - 2)):
        t = ns()
        rep = ledger.verify()
        runs.append(rep.transfers / ((ns() - t) / 1e9))
        if not rep.ok:
            raise RuntimeError(f"verify() found problems in the benchmark's own ledger: {rep.problems[:3]}")
    rows = peer.db.execute("SELECT COUNT(*) FROM transfers").fetchone()[0]
    t = ns()
    if not peer.verify():
        raise RuntimeError("the SQLite peer's balances disagree with its transfers")
    pr = rows / ((ns() - t) / 1e9)
    figs.add("verify", f"verify(), {rep.transfers:,} transfers (chain + replay)", "transfers/s", runs, [pr],
             "SQLite integrity_check + SQL rebuild")


def _import(figs: _Figures, fp: dict[str, float], tmp: Path, sz: dict[str, Any]) -> None:
    from ..engine import Engine
    from .import_workload import COLUMNS, peer_import, write_history
    from .rules_workload import program

    rows = sz["import_rows"]
    src = write_history(tmp / "history.parquet", rows, sz["import_members"], row_group=min(rows, 1_000_000))
    runs = []
    for rep in range(sz["repeats"]):
        path = tmp / f"import-{rep}"
        with Engine.open(path, program=program(), sync="full") as eng:
            t = ns()
            r = eng.import_sales(src, columns=COLUMNS, progress=False)
            runs.append(r.rows_read / ((ns() - t) / 1e9))
            if r.rows_posted != rows:
                raise RuntimeError(f"the import posted {r.rows_posted} of {rows} rows: {r.reasons}")
            if rep == 0:
                fp["disk_per_imported_row"] = _used_bytes(eng.ledger._st().env) / rows
        shutil.rmtree(path, ignore_errors=True)
    psrc = write_history(tmp / "peer-history.parquet", sz["peer_import_rows"],
                         max(1, sz["peer_import_rows"] // 10))
    pruns = []
    for rep in range(max(1, sz["repeats"] - 1)):
        t = ns()
        n, _ = peer_import(psrc, tmp / f"peer-import-{rep}.sqlite")
        pruns.append(n / ((ns() - t) / 1e9))
    figs.add("import", f"import rows/s, Parquet to a durable ledger ({rows:,} rows)", "rows/s", runs, pruns,
             "PyArrow + pure-Python rules + SQLite")


def _codes(figs: _Figures, lat: dict[str, Any], tmp: Path, sz: dict[str, Any]) -> None:
    from ..engine import Engine
    from ..program import Program
    from .codes_peer import PeerFF1, peer_code

    n = sz["codes"]
    with Engine.open(tmp / "codes", program=Program.from_dict({"name": "bench"}), sync="none",
                     code_key=bytes(range(32))) as e:
        batch = e.codes.generate(n, points=10)
        gen, val = [], []
        for rep in range(sz["repeats"] + 1):
            t = ns()
            strs = batch.codes()
            g = n / ((ns() - t) / 1e9)
            t = ns()
            st = e.codes.check_array(strs)
            v = n / ((ns() - t) / 1e9)
            if not (st == 0).all():
                raise RuntimeError("generated codes did not all check GENUINE")
            if rep:
                gen.append(g)
                val.append(v)
        samples = []
        for c in strs[: min(n, 2_000)].tolist():
            s = ns()
            e.codes.check(c)
            samples.append(ns() - s)
        ff1 = e.codes._cipher(batch.key_version)
        peer = PeerFF1(ff1._key_for_peer, ff1._tweak_for_peer)
        pg = []
        for _ in range(max(1, sz["repeats"] - 1)):
            t = ns()
            pc = [peer_code(peer, k) for k in range(sz["peer_codes"])]
            pg.append(sz["peer_codes"] / ((ns() - t) / 1e9))
        if pc != strs[: sz["peer_codes"]].tolist():
            raise RuntimeError("the per-code peer and the batched FF1 disagree")
    figs.add("codes_generate", f"codes/s generated to strings ({n:,})", "codes/s", gen, pg, "per-code FF1")
    figs.add("codes_validate", f"codes/s validated, batched ({n:,})", "codes/s", val, pg, "per-code FF1")
    lat["code check"] = _pcts(samples)


def _disk(disk: dict[str, float], tmp: Path, sz: dict[str, Any]) -> None:
    """The fsync floor (one small put and a durable commit) and sequential write bandwidth with fsync."""
    import lmdb

    env = lmdb.open(str(tmp / "floor"), sync=True, metasync=True, map_size=1 << 26)
    samples = []
    for i in range(sz["fsync_commits"] + 20):
        t = ns()
        with env.begin(write=True) as txn:
            txn.put(i.to_bytes(8, "big"), b"x" * 104)
        samples.append(ns() - t)
    env.close()
    disk["fsync_floor_us"] = float(np.median(samples[20:])) / 1000
    block = os.urandom(1 << 22)
    path = tmp / "bandwidth"
    t = ns()
    with open(path, "wb") as f:
        for _ in range(sz["write_mb"] // 4):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    disk["write_mb_per_s"] = sz["write_mb"] / ((ns() - t) / 1e9)
    path.unlink()


# -- the run --------------------------------------------------------------------------------------------

def run(directory: str | os.PathLike[str] | None = None, *, size: str = "standard",
        say: Callable[[str], None] = print) -> dict[str, Any]:
    """Run every workload at ``size`` ("tiny", "quick" or "standard") in a temporary folder under
    ``directory`` (default: the system's temporary folder) and return the result as a JSON-ready dict."""
    if size not in SIZES:
        raise ValueError(f"size={size!r} is not one of {', '.join(SIZES)}")
    base = Path(directory) if directory is not None else Path(tempfile.gettempdir())
    if not base.is_dir():
        raise FileNotFoundError(f"--dir {str(base)!r} is not a directory: name a folder on the disk to measure")
    sz = SIZES[size]
    mach = machine(base)
    figs = _Figures(say)
    lat: dict[str, Any] = {}
    fp: dict[str, float] = {}
    disk: dict[str, float] = {}
    cpu: dict[str, float] = {}
    curve: dict[str, list[float]] = {"batch_size": [], "ledger": [], "peer": []}
    started = time.time()
    if mach["disk"]["filesystem"] in ("tmpfs", "ramfs"):
        say(f"note: {base} is on {mach['disk']['filesystem']}: fsync costs nothing there, so the durable "
            f"figures say nothing about a real disk; name a folder on the disk to size with --dir")
    say(HEADER)
    tmp = Path(tempfile.mkdtemp(prefix="loyalty-bench-", dir=base))
    try:
        _disk(disk, tmp, sz)
        _online(figs, lat, fp, cpu, tmp, sz)
        b = _batched(figs, curve, fp, tmp, sz)
        try:
            _balances(figs, lat, b, sz)
            _verify(figs, b, sz)
        finally:
            b["ledger"].close()
            b["peer"].close()
        _import(figs, fp, tmp, sz)
        _codes(figs, lat, tmp, sz)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"kind": "loyalty_engine bench", "version": 1, "size": size,
            "when": datetime.now(UTC).isoformat(timespec="seconds"), "seconds": round(time.time() - started, 1),
            "machine": mach, "figures": figs.figures, "latency": lat, "footprint": fp, "disk": disk, "cpu": cpu,
            "batch_curve": curve, "group_commit_size": GROUP, "import_rows": sz["import_rows"]}
