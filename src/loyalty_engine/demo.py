"""The demo: eighteen months of a CD shop's customer club, run on the ledger from the bundled CDNOW data.

Every purchase earns one point per whole dollar, valid for a year. At the end of each month, members
holding at least 200 points redeem 200 of them through a hold that the shop then posts (the till
confirms the voucher), and points past their year expire to the breakage account. The journal is then
verified from scratch, and one member's statement is printed.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .datasets import load_cdnow
from .ledger import Ledger
from .types import Account, AccountFlags, Code, TransferFlags, TransferResult

#: System accounts of the demo club (asset 0, points).
ISSUER, REDEMPTIONS, BREAKAGE = 1, 2, 3
#: Members are 1_000_000 + CDNOW customer id.
MEMBER_BASE = 1_000_000
#: Redeem this many points once a member holds them.
VOUCHER = 200
DAY_US = 86_400_000_000
YEAR_US = 365 * DAY_US
#: Purchases are booked at noon UTC of their day (CDNOW gives only the day).
NOON_US = 12 * 3_600_000_000


@dataclass(frozen=True, slots=True, kw_only=True)
class DemoSummary:
    """What the demo did; the figures the self-checks and tests rely on."""

    members: int
    purchases: int
    points_earned: int
    points_redeemed: int
    points_expired: int
    outstanding: int
    batches: int
    transfers: int
    seconds: float


def _month_starts(days: np.ndarray) -> np.ndarray:
    return days.astype("datetime64[M]").astype("datetime64[D]")


def run_demo(path: str | Path | None = None, *, echo: Callable[[str], None] = print,
             sync: str = "full") -> DemoSummary:
    """Run the demo in ``path`` (a new temporary directory if None, removed afterwards)."""
    tmp = None
    if path is None:
        tmp = tempfile.mkdtemp(prefix="loyalty-demo-")
        path = Path(tmp) / "club.ledger"
    try:
        return _run(Path(path), echo, sync)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _run(path: Path, echo: Callable[[str], None], sync: str) -> DemoSummary:
    t0 = time.perf_counter()
    sales = load_cdnow()
    cust = sales["customer_id"].to_numpy()
    days = sales["date"].to_numpy(zero_copy_only=False).astype("datetime64[D]")
    cents = sales["amount_cents"].to_numpy()
    order = np.lexsort((np.arange(len(cust)), days))  # time order, file order within a day
    cust, days, cents = cust[order], days[order], cents[order]
    row_ids = order.astype(np.uint64) + np.uint64(1)  # transfer id = 1 + row in the file: re-runs are no-ops
    at = days.astype(np.int64) * DAY_US + NOON_US
    points = cents // 100
    members = np.unique(cust).astype(np.uint64) + np.uint64(MEMBER_BASE)
    echo(f"CDNOW: {len(cust):,} purchases by {len(members):,} customers, "
         f"{days.min()} .. {days.max()}; ledger at {path}")

    earned = redeemed = expired = 0
    with Ledger.open(path, sync=sync) as ledger:
        ledger.create_accounts([Account(id=ISSUER, asset=0), Account(id=REDEMPTIONS, asset=0),
                                Account(id=BREAKAGE, asset=0)])
        ledger.create_accounts_batch(members, asset=0, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
        months = _month_starts(days)
        echo(f"{'month':<8} {'sales':>6} {'earned':>8} {'redeemed':>9} {'expired':>8} {'outstanding':>12}")
        voucher_id = 1 << 40
        for m in np.unique(months):
            sel = months == m
            keep = sel & (points > 0)  # a $0.00 basket earns nothing: no transfer
            n = int(keep.sum())
            batch = pa.table({
                "id": pa.array(row_ids[keep]),
                "debit": pa.array(np.full(n, ISSUER, np.uint64)),
                "credit": pa.array(cust[keep].astype(np.uint64) + np.uint64(MEMBER_BASE)),
                "amount": pa.array(points[keep]),
                "code": pa.array(np.full(n, Code.EARN, np.uint16)),
                "at": pa.array(at[keep]),
                "expires_at": pa.array(at[keep] + YEAR_US),
                "user_data": pa.array(cents[keep].astype(np.uint64)),  # the basket, for the statement
            })
            res = ledger.post_batch(batch)
            ok = res == TransferResult.OK
            if not (ok | (res == TransferResult.EXISTS)).all():
                bad = int(np.flatnonzero(~ok)[0])
                raise RuntimeError(f"demo earn refused: {TransferResult(int(res[bad])).name}")
            month_earned = int(points[keep][ok].sum())
            end = (m.astype("datetime64[M]") + np.timedelta64(1, "M")).astype("datetime64[D]").astype(np.int64) * DAY_US
            # month end: members with a voucher's worth redeem it (a hold, then the till posts it)
            bal = ledger.balances(members)
            who = members[bal["available"] >= VOUCHER]
            k = len(who)
            ids = np.arange(voucher_id, voucher_id + 2 * k, dtype=np.uint64)
            voucher_id += 2 * k
            hold = pa.table({
                "id": pa.array(ids[:k]), "debit": pa.array(who), "credit": pa.array(np.full(k, REDEMPTIONS, np.uint64)),
                "amount": pa.array(np.full(k, VOUCHER, np.int64)), "code": pa.array(np.full(k, Code.REDEEM, np.uint16)),
                "flags": pa.array(np.full(k, TransferFlags.PENDING, np.uint16)),
                "at": pa.array(np.full(k, end - DAY_US, np.int64)),
                "timeout": pa.array(np.full(k, DAY_US // 2, np.int64)),
            })
            post = pa.table({
                "id": pa.array(ids[k:]), "debit": pa.array(np.zeros(k, np.uint64)),
                "credit": pa.array(np.zeros(k, np.uint64)), "amount": pa.array(np.zeros(k, np.int64)),
                "flags": pa.array(np.full(k, TransferFlags.POST_PENDING, np.uint16)),
                "code": pa.array(np.full(k, Code.REDEEM, np.uint16)),
                "related": pa.array(ids[:k]), "at": pa.array(np.full(k, end - DAY_US + 60_000_000, np.int64)),
            })
            for t in (hold, post):
                r = ledger.post_batch(t)
                if not (r == TransferResult.OK).all():
                    bad = int(np.flatnonzero(r != TransferResult.OK)[0])
                    raise RuntimeError(f"demo redemption refused: {TransferResult(int(r[bad])).name}")
            month_redeemed = VOUCHER * k
            before = ledger.balance(BREAKAGE).credits_posted
            ledger.expire(end, sink=BREAKAGE)
            month_expired = ledger.balance(BREAKAGE).credits_posted - before
            earned += month_earned
            redeemed += month_redeemed
            expired += month_expired
            outstanding = -ledger.balance(ISSUER).available - redeemed - expired
            echo(f"{str(m)[:7]:<8} {int(sel.sum()):>6,} {month_earned:>8,} {month_redeemed:>9,} "
                 f"{month_expired:>8,} {outstanding:>12,}")

        report = ledger.verify()
        if not report.ok:
            raise RuntimeError("demo ledger failed verification: " + "; ".join(report.problems[:5]))
        echo(f"verify: ok — {report.batches:,} journal entries, {report.transfers:,} transfers replayed "
             f"from the start and matched against the stored balances and lots")

        # a statement for the most active customer
        top = int(np.bincount(cust).argmax())
        member = MEMBER_BASE + top
        st = ledger.transfers(account=member)
        b = ledger.balance(member)
        echo(f"member {member} (CDNOW customer {top}): {st.num_rows} transfers; "
             f"earned {b.credits_posted:,}, spent or expired {b.debits_posted:,}, available {b.available:,}")
        for row in st.slice(max(0, st.num_rows - 3)).to_pylist():
            kind = str(TransferFlags(row["flags"]).name) if row["flags"] else "posted"
            echo(f"  {row['at']:%Y-%m-%d %H:%M}  {Code(row['code']).name:<7} {kind.lower():<12} "
                 f"{row['debit']:>8} -> {row['credit']:<8} {row['amount']:>6,}")
        outstanding = sum(int(v) for v in ledger.balances(members)["available"])
        summary = DemoSummary(
            members=len(members), purchases=len(cust), points_earned=earned, points_redeemed=redeemed,
            points_expired=expired, outstanding=outstanding, batches=report.batches,
            transfers=report.transfers, seconds=time.perf_counter() - t0,
        )
    if earned != redeemed + expired + outstanding:
        raise RuntimeError(f"points do not add up: earned {earned} != redeemed {redeemed} + expired "
                           f"{expired} + outstanding {outstanding}")
    echo(f"points: earned {earned:,} = redeemed {redeemed:,} + expired {expired:,} + outstanding "
         f"{outstanding:,}; {summary.seconds:.2f} s")
    return summary
