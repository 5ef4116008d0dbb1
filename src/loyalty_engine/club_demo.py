"""The club demo: the example program (examples/customer_club/program.toml) run over the bundled CDNOW
purchase history: every customer enrolled, 18 months of purchases evaluated through the rule kernel
and posted as one batch per chunk, then the club's tiers, offers and liabilities, and one member's
next checkout explained."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa

from .datasets import load_cdnow
from .engine import Engine
from .errors import ConfigError
from .program import Program

#: Where the example program lives in a source checkout (the README installs with ``pip install -e .``).
PROGRAM = Path(__file__).resolve().parents[2] / "examples" / "customer_club" / "program.toml"


@dataclass(frozen=True, slots=True, kw_only=True)
class ClubSummary:
    """What the club demo did."""

    members: int
    purchases: int
    points_issued: int
    credit_issued: int
    offers_granted: int
    tiers: dict[str, int]
    seconds: float


def run_club_demo(path: str | Path | None = None, *, echo: Callable[[str], None] = print,
                  sync: str = "none", program: str | Path | None = None) -> ClubSummary:
    """Run the club demo in ``path`` (a temporary directory if None, removed afterwards)."""
    prog_path = Path(program) if program is not None else PROGRAM
    if not prog_path.exists():
        raise ConfigError(f"the example program is not at {prog_path}; run the demo from a source checkout "
                          f"(pip install -e .) or pass program=PATH")
    prog = Program.from_toml(prog_path)
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="loyalty-club-")
        path = Path(tmp) / "club"
    try:
        return _run(Path(path), prog, echo, sync)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(path: Path, prog: Program, echo: Callable[[str], None], sync: str) -> ClubSummary:
    data = load_cdnow()
    cust = data.column("customer_id").to_numpy()
    days = data.column("date").cast(pa.int32()).to_numpy().astype(np.int64)
    amount = data.column("amount_cents").to_numpy()
    keep = amount > 0
    # amounts converted at 1 cent = 100 toman, the program's currency
    cust, days, amount = cust[keep], days[keep], amount[keep] * 100
    # CDNOW gives days only: purchases at 12:00 plus a few minutes per purchase that day, in UTC
    at = days * 86_400_000_000 + 12 * 3_600_000_000 + np.arange(len(days)) % 600 * 60_000_000
    echo(f"\nclub demo: program {prog.name!r} ({len(prog.rules)} earn rules, {len(prog.tiers)} tiers, "
         f"{len(prog.offers)} offers) over {len(cust):,} CDNOW purchases (1 cent = 100 toman)")
    t0 = time.perf_counter()
    with Engine.open(path, program=prog, sync=sync) as club:
        first = {}
        for c, d in zip(cust.tolist(), days.tolist(), strict=True):
            first.setdefault(c, d)
        club.enroll_batch([f"cdnow-{c}" for c in first],
                          at=[(d - 1) * 86_400_000_000 for d in first.values()])
        t_enrol = time.perf_counter() - t0
        table = pa.table({"member": [f"cdnow-{c}" for c in cust.tolist()],
                          "ref": [f"cdnow-{i}" for i in range(len(cust))],
                          "at": pa.array(at, pa.timestamp("us", tz="UTC")), "amount": amount})
        t1 = time.perf_counter()
        res = club.purchase_batch(table, events=False)
        t_batch = time.perf_counter() - t1
        status = res.column("status").to_numpy()
        assert (status == 0).all(), "every CDNOW purchase should post"
        points = int(res.column("points").to_numpy().sum())
        credit = int(res.column("credit").to_numpy().sum())
        fired = res.column("offers_fired").to_numpy()
        offers = {o.name: int(((fired >> k) & 1).sum()) for k, o in enumerate(prog.offers)}
        tiers = Counter(club.member(f"cdnow-{c}").tier for c in first)
        echo(f"  enrolled {len(first):,} members in {t_enrol:.1f} s; evaluated and posted {len(cust):,} "
             f"purchases in {t_batch:.2f} s ({len(cust) / t_batch:,.0f} rows/s, ledger included)")
        echo(f"  points issued {points:,}; store credit issued {credit:,} toman")
        echo("  offers granted: " + ", ".join(f"{k} {v:,}" for k, v in offers.items()))
        echo("  tiers at the end: " + ", ".join(f"{t.name} {tiers.get(t.name, 0):,}" for t in prog.tiers))
        top = int(np.bincount(cust, weights=amount).argmax())
        last = datetime.fromtimestamp(int(at[cust == top].max()) // 1_000_000, UTC)
        q = club.quote(f"cdnow-{top}", amount=2_000_000, at=last + timedelta(days=3))
        echo("  the biggest spender's next basket of 2,000,000 toman, quoted (nothing committed):\n"
             + "\n".join("    " + ln for ln in q.explain().splitlines()))
        report = club.ledger.verify()
        assert report.ok, report.problems
        echo(f"  verify: ok ({report.transfers:,} transfers)")
        return ClubSummary(members=len(first), purchases=len(cust), points_issued=points, credit_issued=credit,
                           offers_granted=sum(offers.values()), tiers=dict(tiers),
                           seconds=time.perf_counter() - t0)
