"""``loyalty-engine capacity``: from a club's profile and a bench result, what one machine carries.

A profile (TOML, or options on the command line) says how big the club is and how it is used::

    members = 2_000_000
    purchases_per_day = 400_000
    peak_hour_share = 0.12          # the busiest hour's share of a day's purchases
    history_years = 3               # sales history to import at the start
    code_batches_per_month = 20
    codes_per_batch = 100_000
    retention_years = 5             # years of journal kept on this machine

:func:`plan` combines it with the figures of ``loyalty-engine bench`` (measured on the machine being
sized) into a :class:`Plan`: headroom at the peak per durability mode, hours to import the history,
disk after one and five years, memory for the member state, where the limit is, and whether the club
outgrows one machine (then: how many partitions by member). :func:`check` runs a compressed slice of
the profile's day on this machine and compares what it measures with what the plan predicted.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

#: Headroom below which a mode is called tight (the peak needs more than half of what it carries).
COMFORT = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Profile:
    """How big a club is and how it is used."""

    #: Members enrolled.
    members: int
    #: Purchases on an ordinary day, over all branches.
    purchases_per_day: int
    #: The busiest hour's share of a day's purchases (0.12 = 12%).
    peak_hour_share: float = 0.12
    #: Years of sales history to import at the start.
    history_years: float = 0.0
    #: Purchases per day in that history (default: ``purchases_per_day``).
    history_purchases_per_day: int | None = None
    #: Product-code batches generated per month, and codes in each.
    code_batches_per_month: int = 0
    codes_per_batch: int = 0
    #: Years of journal kept on this machine.
    retention_years: float = 5.0

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "profile") -> Profile:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {unknown}; the fields are {sorted(known)}")
        for req in ("members", "purchases_per_day"):
            if req not in d:
                raise ConfigError(f"{where}: {req!r} is required")
        ints = {"members", "purchases_per_day", "history_purchases_per_day", "code_batches_per_month",
                "codes_per_batch"}
        for k, v in d.items():
            if v is None and k == "history_purchases_per_day":
                continue
            if k in ints and (not isinstance(v, int) or isinstance(v, bool)):
                raise ConfigError(f"{where}: {k} = {v!r} must be a whole number")
            if k not in ints and (not isinstance(v, int | float) or isinstance(v, bool)):
                raise ConfigError(f"{where}: {k} = {v!r} must be a number")
            if v < 0:
                raise ConfigError(f"{where}: {k} = {v!r} must not be negative")
        if d["members"] < 1 or d["purchases_per_day"] < 1:
            raise ConfigError(f"{where}: members and purchases_per_day must be at least 1")
        if not 0 < d.get("peak_hour_share", 0.12) <= 1:
            raise ConfigError(f"{where}: peak_hour_share = {d['peak_hour_share']!r} must be in (0, 1]: the "
                              f"busiest hour's share of a day's purchases")
        return cls(**d)

    @classmethod
    def from_toml(cls, path: str | Path | None, **overrides: Any) -> Profile:
        """The profile in a TOML file (None: no file), with ``overrides`` that are not None (options
        given beside it) replacing its fields."""
        d: dict[str, Any] = {}
        where = "profile"
        if path is not None:
            path = Path(path)
            where = f"profile {str(path)!r}"
            try:
                d = tomllib.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError as e:
                raise ConfigError(f"{where} does not exist") from e
            except tomllib.TOMLDecodeError as e:
                raise ConfigError(f"{where}: {e}") from e
        d.update({k: v for k, v in overrides.items() if v is not None})
        return cls.from_dict(d, where=where)

    @property
    def peak_per_second(self) -> float:
        return self.purchases_per_day * self.peak_hour_share / 3600

    @property
    def history_rows(self) -> int:
        per_day = self.history_purchases_per_day if self.history_purchases_per_day is not None \
            else self.purchases_per_day
        return int(self.history_years * 365 * per_day)


MODES = (("full", "online_full", "an fsync per purchase (sync=full)"),
         ("group commit", "online_group_commit", "group commit, one fsync per batch of checkouts"),
         ("group", "online_group", "sync=group (data synced, meta page not)"),
         ("none", "online_none", "no fsync per purchase (sync=none, durable at checkpoints)"))


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What the profile needs of this machine, and what the machine carries."""

    profile: Profile
    #: Purchases per second in the busiest hour.
    peak_per_second: float
    #: Per mode: (purchases/s this machine carries, headroom = carried / needed at the peak).
    modes: dict[str, tuple[float, float]]
    import_rows: int
    import_hours: float
    #: Rows of the import the bench measured.
    bench_import_rows: int
    disk_bytes_1y: float
    disk_bytes_5y: float
    #: Five years with the whole journal kept (what the ledger holds without an archive).
    disk_bytes_5y_all: float
    disk_free_bytes: int
    memory_bytes_1y: float
    memory_bytes_5y: float
    machine_memory_bytes: int
    #: The resource that bounds durable checkouts on this machine, in words.
    limit: str
    #: False when the profile outgrows one machine.
    fits: bool
    #: Ledgers (partitions by member) the profile needs, 1 when one machine carries it.
    partitions: int
    #: Machines of the measured size those partitions need (for throughput, disk, memory and import).
    machines: int
    reasons: list[str]
    machine: str

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["profile"] = asdict(self.profile)
        return d

    def text(self) -> str:
        """The plan in plain words."""
        p = self.profile
        out = [f"Capacity plan for {p.members:,} members and {p.purchases_per_day:,} purchases a day, "
               f"on {self.machine}.", ""]
        out.append(f"Peak: {p.peak_hour_share:.0%} of a day's purchases in the busiest hour is "
                   f"{self.peak_per_second:,.1f} purchases per second.")
        for name, _, words in MODES:
            if name not in self.modes:
                continue
            carried, head = self.modes[name]
            verdict = ("comfortable" if head >= COMFORT else "tight: the peak takes more than half of it"
                       if head >= 1 else "NOT enough: the peak needs more than this machine carries")
            out.append(f"  with {words}: carries {carried:,.0f}/s, headroom {head:,.1f}x ({verdict})")
        if self.import_rows:
            out.append(f"History: {self.import_rows:,} rows ({p.history_years:g} years) import in about "
                       f"{_hours(self.import_hours)}.")
            if self.import_rows > 10 * self.bench_import_rows:
                out.append(f"  (extrapolated from an import of {self.bench_import_rows:,} rows: the rate falls as "
                           f"members and history grow, so the time is a lower bound; import a year of the real "
                           f"history on this machine to see)")
        out.append(f"Disk: about {_size(self.disk_bytes_1y)} after one year and {_size(self.disk_bytes_5y)} after "
                   f"five (free now on the measured disk: {_size(self.disk_free_bytes)}); keep as much again "
                   f"free for a compacting copy (backup).")
        if p.retention_years < 5:
            out.append(f"  The five-year figure keeps {p.retention_years:g} years of journal on this machine. The "
                       f"ledger cannot drop old journal entries yet (export them with 'loyalty-engine export', "
                       f"then move members to a fresh ledger), so left alone it holds all five years: "
                       f"{_size(self.disk_bytes_5y_all)}.")
        out.append(f"Memory: the member state and the ledger's in-memory ids and lots take about "
                   f"{_size(self.memory_bytes_1y)} after one year and {_size(self.memory_bytes_5y)} after five "
                   f"(this machine has {_size(self.machine_memory_bytes)}).")
        out.append(f"Limit: {self.limit}")
        if self.fits:
            out.append("Verdict: one machine carries this profile.")
        else:
            out.append("Verdict: this profile OUTGROWS one machine: " + "; ".join(self.reasons) + ".")
            out.append(f"  Partition members across {self.partitions} ledgers (each member lives in one; route by a "
                       f"hash of the member id), one writer process per ledger, on {self.machines} machine"
                       f"{'s' if self.machines > 1 else ''} of this size; or bench a bigger machine (faster disk, "
                       f"more memory) and plan again.")
        return "\n".join(out)


def _size(b: float) -> str:
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= div:
            return f"{b / div:,.1f} {unit}"
    return f"{b:,.0f} bytes"


def _hours(h: float) -> str:
    if h < 1 / 60:
        return f"{h * 3600:,.0f} seconds"
    if h < 1:
        return f"{h * 60:,.0f} minutes"
    return f"{h:,.1f} hours"


def _fig(bench: dict[str, Any], key: str) -> float:
    try:
        return float(bench["figures"][key]["median"])
    except KeyError as e:
        raise ConfigError(f"the bench result has no figure {key!r}: run 'loyalty-engine bench --json FILE' "
                          f"with this version and plan from that file") from e


def plan(profile: Profile, bench: dict[str, Any]) -> Plan:
    """The capacity plan of ``profile`` on the machine ``bench`` was measured on."""
    if bench.get("kind") != "loyalty_engine bench":
        raise ConfigError("this is not a 'loyalty-engine bench' result (its 'kind' field is missing or other)")
    try:
        fp, disk, cpu, mach = bench["footprint"], bench["disk"], bench["cpu"], bench["machine"]
        needed = {"footprint." + k: fp[k] for k in ("disk_per_member", "disk_per_purchase", "disk_per_imported_row",
                                                     "memory_per_member", "ram_per_transfer",
                                                     "transfers_per_purchase")}
        needed.update({"disk.fsync_floor_us": disk["fsync_floor_us"], "disk.write_mb_per_s": disk["write_mb_per_s"],
                       "cpu.purchase_cpu_us": cpu["purchase_cpu_us"], "machine.memory_bytes": mach["memory_bytes"],
                       "machine.disk.free_bytes": mach["disk"]["free_bytes"]})
    except (KeyError, TypeError) as e:
        raise ConfigError(f"the bench result lacks {e}: run 'loyalty-engine bench --json FILE' with this version "
                          f"and plan from that file") from None
    for name, v in needed.items():
        if not isinstance(v, int | float) or v < 0 or (v == 0 and name != "machine.disk.free_bytes"):
            raise ConfigError(f"the bench result's {name} = {v!r} is not a positive figure: bench again")
    if _fig(bench, "online_full") <= 0 or _fig(bench, "import") <= 0:
        raise ConfigError("the bench result's online_full and import figures must be positive: bench again")
    peak = profile.peak_per_second
    modes = {}
    for name, key, _ in MODES:
        if key in bench["figures"]:
            carried = _fig(bench, key)
            modes[name] = (carried, carried / peak if peak else math.inf)
    import_rate = _fig(bench, "import")
    rows = profile.history_rows
    import_hours = rows / import_rate / 3600 if rows else 0.0

    def disk_after(years: float, retention: float = profile.retention_years) -> float:
        kept = min(years, retention)
        purchases = kept * 365 * profile.purchases_per_day
        codes = years * 12 * profile.code_batches_per_month * profile.codes_per_batch
        return (profile.members * fp["disk_per_member"] + rows * fp["disk_per_imported_row"]
                + purchases * fp["disk_per_purchase"] + codes / 8)   # a redeemed-bit per code serial

    def memory_after(years: float) -> float:
        transfers = (years * 365 * profile.purchases_per_day + rows) * fp["transfers_per_purchase"]
        return profile.members * fp["memory_per_member"] + transfers * fp["ram_per_transfer"]

    # where the limit is, for durable checkouts one at a time
    full = modes.get("full", (0.0, 0.0))[0]
    floor_us = disk["fsync_floor_us"]
    per_purchase_us = 1e6 / full if full else math.inf
    cpu_us = cpu["purchase_cpu_us"]
    wait_us = max(0.0, per_purchase_us - cpu_us)
    write_share = (peak * fp["disk_per_purchase"]) / (disk["write_mb_per_s"] * 1e6)
    if write_share > 0.5:
        limit = (f"disk bandwidth: the peak writes {peak * fp['disk_per_purchase'] / 1e6:,.1f} MB/s of "
                 f"{disk['write_mb_per_s']:,.0f} MB/s this disk sustains")
    elif wait_us >= cpu_us:
        limit = (f"the disk's flushes: of the {per_purchase_us:,.0f} us a durable purchase takes, "
                 f"{wait_us:,.0f} us wait for the disk (the fsync floor is {floor_us:,.0f} us, and each page the "
                 f"commit dirties adds to it) and {cpu_us:,.0f} us are CPU; group commit, or a disk with a "
                 f"faster flush (NVMe with power-loss protection), raises it")
    else:
        limit = (f"one core: the single writer spends {cpu_us:,.0f} us of CPU of the {per_purchase_us:,.0f} us a "
                 f"durable purchase takes; more cores do not help one ledger, partitions by member do")
    reasons = []
    best = max((c for c, _ in modes.values()), default=0.0)
    writers = machines = 1
    if peak * COMFORT > best:
        reasons.append(f"the peak ({peak:,.0f}/s) needs more than half of the best mode's {best:,.0f}/s")
        writers = math.ceil(peak * COMFORT / best)
        machines = math.ceil(writers / max(1, int(bench["machine"]["cores"] or 1)))
    free = int(bench["machine"]["disk"]["free_bytes"])
    kept = disk_after(5, math.inf)        # the ledger cannot drop old journal entries yet: it keeps them all
    if 2 * kept > free:
        reasons.append(f"five years of data ({_size(kept)}, twice that with a backup copy) exceed the free disk "
                       f"({_size(free) if free else 'none'})")
        machines = max(machines, math.ceil(2 * kept / free) if free else math.ceil(2 * kept / 1e12))
    mem = int(bench["machine"]["memory_bytes"])
    if memory_after(5) > 0.6 * mem:
        reasons.append(f"the in-memory state after five years ({_size(memory_after(5))}) exceeds 60% of memory "
                       f"({_size(mem)})")
        machines = max(machines, math.ceil(memory_after(5) / (0.6 * mem)))
    if import_hours > 24 * 7:
        reasons.append(f"the history import takes {_hours(import_hours)}, over a week")
        machines = max(machines, math.ceil(import_hours / (24 * 7)))
    m = bench["machine"]
    return Plan(profile=profile, peak_per_second=peak, modes=modes, import_rows=rows, import_hours=import_hours,
                bench_import_rows=int(bench.get("import_rows", 0)),
                disk_bytes_1y=disk_after(1), disk_bytes_5y=disk_after(5),
                disk_bytes_5y_all=disk_after(5, math.inf), disk_free_bytes=free,
                memory_bytes_1y=memory_after(1), memory_bytes_5y=memory_after(5), machine_memory_bytes=mem,
                limit=limit, fits=not reasons, partitions=max(writers, machines), machines=machines,
                reasons=reasons,
                machine=f"{m['cpu']}, {m['cores']} cores, {_size(m['memory_bytes'])} memory, disk "
                        f"{m['disk']['device']} ({m['disk']['filesystem']})")


def check(profile: Profile, bench: dict[str, Any], directory: str | Path, *, seconds: float = 20.0,
          say: Any = print) -> dict[str, Any]:
    """Run a compressed slice of the profile's day on this machine, ``sync="full"``, and compare it with
    the plan: (1) checkouts one per call as fast as they go, against the bench's durable rate and bytes on
    disk per purchase; (2) checkouts paced at the profile's peak rate, against the plan's headroom (the
    writer should be busy peak/capacity of the time and keep up exactly when the headroom is at least 1).
    Members: the profile's, at most 200,000 (the per-member cost is in the disk and memory figures)."""
    import shutil
    import tempfile
    import time
    from datetime import UTC, datetime, timedelta

    import numpy as np

    from ..engine import Engine
    from .rules_workload import program
    from .runner import _used_bytes

    p = plan(profile, bench)
    predicted_rate = p.modes["full"][0]         # plan() made sure it is there and positive
    members = min(profile.members, 200_000)
    names = [f"m{i}" for i in range(members)]
    rng = np.random.default_rng(17)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    tmp = Path(tempfile.mkdtemp(prefix="loyalty-check-", dir=directory))
    result: dict[str, Any] = {"members": members}
    try:
        with Engine.open(tmp / "club", program=program(), sync="full") as eng:
            env = eng.ledger._st().env
            eng.enroll_batch(names, at=t0, events=False)
            k = 0

            def one() -> int:
                nonlocal k
                eng.purchase(names[int(rng.integers(0, members))], amount=int(rng.integers(20_000, 800_000)),
                             at=t0 + timedelta(seconds=k), ref=f"c{k}")
                k += 1
                return time.perf_counter_ns()

            for _ in range(50):   # warm-up
                one()
            # (1) flat out
            n = int(min(50_000, max(200, predicted_rate * seconds / 2)))
            before = _used_bytes(env)
            start = time.perf_counter_ns()
            for _ in range(n):
                one()
            measured_rate = n / ((time.perf_counter_ns() - start) / 1e9)
            measured_disk = (_used_bytes(env) - before) / n
            result["flat_out"] = {"purchases": n, "predicted_per_s": predicted_rate, "measured_per_s": measured_rate,
                                  "error": measured_rate / predicted_rate - 1,
                                  "predicted_disk_per_purchase": bench["footprint"]["disk_per_purchase"],
                                  "measured_disk_per_purchase": measured_disk,
                                  "disk_error": measured_disk / bench["footprint"]["disk_per_purchase"] - 1}
            say(f"flat out, {n:,} durable checkouts: predicted {predicted_rate:,.0f}/s, measured "
                f"{measured_rate:,.0f}/s ({result['flat_out']['error']:+.0%}); disk per purchase predicted "
                f"{bench['footprint']['disk_per_purchase']:,.0f} B, measured {measured_disk:,.0f} B "
                f"({result['flat_out']['disk_error']:+.0%})")
            # (2) the busiest hour, compressed in time: its checkouts arrive k times faster than planned,
            # k such that they come at 80% of the predicted capacity (the check asks whether the machine
            # keeps up with a load the plan says it carries), for the hour or as much of it as fits in
            # seconds / 2; when the plan says the peak exceeds the capacity, k = 1 and the check shows
            # whether it falls behind as predicted
            hour = profile.purchases_per_day * profile.peak_hour_share
            real_rate = hour / 3600
            compression = max(1.0, 0.8 * predicted_rate / real_rate) if real_rate < predicted_rate else 1.0
            rate = real_rate * compression
            m = int(max(1, min(hour, rate * seconds / 2, 100_000)))     # at most seconds / 2 of checkouts
            busy = 0
            start = time.perf_counter_ns()
            lat = []
            for i in range(m):
                due = start + int(i / rate * 1e9)
                now = time.perf_counter_ns()
                if now < due:
                    time.sleep((due - now) / 1e9)
                s = time.perf_counter_ns()
                e = one()
                busy += e - s
                lat.append(e - due)
            wall = (time.perf_counter_ns() - start) / 1e9
            scheduled = (m - 1) / rate
            lag = max(0.0, wall - scheduled)
            predicted_busy = min(1.0, rate / predicted_rate)
            result["compression"] = compression
            kept_up = lag < max(0.05 * scheduled, 0.05)
            result["paced"] = {"purchases": m, "rate_per_s": rate, "predicted_busy_share": predicted_busy,
                               "measured_busy_share": busy / 1e9 / wall, "predicted_keeps_up": rate <= predicted_rate,
                               "measured_keeps_up": kept_up, "lag_seconds": lag,
                               "p99_wait_and_commit_us": float(np.percentile(np.asarray(lat) / 1000, 99))}
            r = result["paced"]
            say(f"the busiest hour compressed {compression:,.0f} times, {m:,} of its checkouts paced at {rate:,.1f}/s: "
                f"the writer was busy "
                f"{r['measured_busy_share']:.0%} of the time (predicted {predicted_busy:.0%}); "
                f"{'kept up' if kept_up else f'fell {lag:,.1f} s behind'} (predicted: "
                f"{'keeps up' if r['predicted_keeps_up'] else 'falls behind'}); p99 from due to committed "
                f"{r['p99_wait_and_commit_us']:,.0f} us")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result
