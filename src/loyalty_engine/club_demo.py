"""The club demo (the README's main job): the bundled CDNOW purchase history imported, in its real
format (runs of spaces between columns, YYYYMMDD dates, dollars with cents), under the example program
``examples/cdnow_club/program.toml`` by ``Engine.import_sales``; then what a club manager wants to see
first: members, purchases, points issued and outstanding, members per tier, offers granted, the import
speed, and one member's next checkout explained."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

import numpy as np

from .engine import ISSUE_POINTS, Engine, points_account
from .errors import ConfigError
from .program import Program

#: Where the example program lives in a source checkout (the README installs with ``pip install -e .``).
PROGRAM = Path(__file__).resolve().parents[2] / "examples" / "cdnow_club" / "program.toml"
#: How the CDNOW master file's columns map to the import's fields.
CDNOW_COLUMNS = {"member": "customer_id", "at": "date", "amount": "dollar_value", "quantity": "number_of_cds"}


def cdnow_path() -> Path:
    """The bundled copy of CDNOW_master.txt (gzip-compressed, as shipped)."""
    return Path(str(resources.files(__package__).joinpath("data/CDNOW_master.txt.gz")))


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
    t0 = time.perf_counter()
    echo(f"\nclub demo: program {prog.name!r} ({len(prog.rules)} earn rules, {len(prog.tiers)} tiers, "
         f"{len(prog.offers)} offers); importing the CDNOW history ({cdnow_path().name})")
    with Engine.open(path, program=prog, sync=sync) as club:
        quarantine = path.parent / f"{path.name}-rejected.csv"
        rep = club.import_sales(cdnow_path(), columns=CDNOW_COLUMNS, time_format="%Y%m%d", tz=prog.timezone,
                                scale=2, quarantine=quarantine, progress=None)
        echo("  " + rep.summary().replace("\n", "\n  "))
        members = club.members
        idx = np.arange(members, dtype=np.int64)
        bal = club.ledger.balances(points_account(idx).astype(np.uint64))
        outstanding = int(bal["available"].sum()) if bal.dtype.names else int(bal[:, -1].sum())
        issued = club.ledger.balance(ISSUE_POINTS).debits_posted
        tiers = Counter(prog.tier_name(int(t)) for t in club._members["tier"][:members])
        echo(f"  members {members:,}; purchases {rep.sales_posted:,}; points issued {issued:,}, "
             f"outstanding {outstanding:,}")
        echo("  members per tier: " + ", ".join(f"{t.name} {tiers.get(t.name, 0):,}" for t in prog.tiers))
        echo(f"  offers granted {rep.offers_granted:,}; store credit issued ${rep.credit_issued / 100:,.2f}")
        echo(f"  import speed: {rep.rows_per_second:,.0f} rows/s ({rep.rows_read:,} rows in {rep.seconds:.2f} s, "
             f"ledger commits included)")
        spend = club._members["purchases"][:members]
        top = int(np.argmax(spend))
        name = club._member_names[top]
        last_day = int(club._members["last_day"][top])
        from datetime import datetime
        from zoneinfo import ZoneInfo
        at = datetime(1970, 1, 1, 12, tzinfo=ZoneInfo(prog.timezone)) + timedelta(days=last_day + 3)
        q = club.quote(name, amount=20_000, at=at)
        echo(f"  member {name}'s next basket of $200.00, quoted (nothing committed):\n"
             + "\n".join("    " + ln for ln in q.explain().splitlines()))
        report = club.ledger.verify()
        assert report.ok, report.problems
        echo(f"  verify: ok ({report.transfers:,} transfers)")
        return ClubSummary(members=members, purchases=rep.sales_posted, points_issued=issued,
                           credit_issued=rep.credit_issued, offers_granted=rep.offers_granted,
                           tiers=dict(tiers), seconds=time.perf_counter() - t0)
