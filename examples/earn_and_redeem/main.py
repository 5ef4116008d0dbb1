"""A member earns points that expire, redeems a voucher through a hold, and the rest expires.

Shows: accounts with DEBITS_MUST_NOT_EXCEED_CREDITS, earning with an expiry (lots), a linked pair that
succeeds or fails together, a pending hold posted by the till, idempotent retries, expire(), a statement
and verify(). Run: python examples/earn_and_redeem/main.py
"""

import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

from loyalty_engine import (
    Account,
    AccountFlags,
    Code,
    Ledger,
    Transfer,
    TransferFlags,
    TransferResult,
)

TEHRAN = timezone(timedelta(hours=3, minutes=30))
ISSUER, REDEMPTIONS, BREAKAGE, SARA = 1, 2, 3, 1_000_042
t0 = datetime(2026, 3, 1, 18, 0, tzinfo=TEHRAN)

with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "club.ledger", sync="full") as ledger:
    ledger.create_accounts([
        Account(id=ISSUER, asset=0),
        Account(id=REDEMPTIONS, asset=0),
        Account(id=BREAKAGE, asset=0),
        Account(id=SARA, asset=0, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS),
    ])

    # Two purchases: 120 points valid 30 days, 300 points valid 90 days.
    earn = [
        Transfer(id=101, debit=ISSUER, credit=SARA, amount=120, code=Code.EARN, at=t0,
                 expires_at=t0 + timedelta(days=30)),
        Transfer(id=102, debit=ISSUER, credit=SARA, amount=300, code=Code.EARN, at=t0 + timedelta(days=2),
                 expires_at=t0 + timedelta(days=92)),
    ]
    assert ledger.post(earn) == [TransferResult.OK, TransferResult.OK]
    # The till retries after a time-out: nothing changes.
    assert ledger.post(earn) == [TransferResult.EXISTS, TransferResult.EXISTS]
    assert ledger.balance(SARA).available == 420

    # A linked pair fails as a whole: the second leg names an account that does not exist.
    pair = [
        Transfer(id=201, debit=ISSUER, credit=SARA, amount=50, code=Code.BONUS, at=t0 + timedelta(days=3),
                 flags=TransferFlags.LINKED),
        Transfer(id=202, debit=ISSUER, credit=999, amount=50, code=Code.BONUS, at=t0 + timedelta(days=3)),
    ]
    assert ledger.post(pair) == [TransferResult.LINKED_EVENT_FAILED, TransferResult.ACCOUNT_NOT_FOUND]
    assert ledger.balance(SARA).available == 420

    # Redeem 200 points: hold them while the basket is paid, then post the hold.
    at = t0 + timedelta(days=10)
    hold = Transfer(id=301, debit=SARA, credit=REDEMPTIONS, amount=200, code=Code.REDEEM, at=at,
                    flags=TransferFlags.PENDING, timeout=timedelta(minutes=15))
    assert ledger.post([hold]) == [TransferResult.OK]
    b = ledger.balance(SARA)
    assert (b.debits_pending, b.available) == (200, 220)
    post = Transfer(id=302, related=301, amount=0, code=Code.REDEEM, flags=TransferFlags.POST_PENDING,
                    at=at + timedelta(minutes=2))
    assert ledger.post([post]) == [TransferResult.OK]
    # The 200 came from the lot that expires first (120 of it), then 80 of the next.
    assert [remaining for _, remaining in ledger.lots(SARA)] == [220]

    # Ninety-three days on, the rest of the second lot expires to breakage.
    assert ledger.expire(t0 + timedelta(days=93), sink=BREAKAGE) == 1
    assert ledger.balance(SARA).available == 0
    assert ledger.balance(BREAKAGE).credits_posted == 220

    statement = ledger.transfers(account=SARA)
    for row in statement.to_pylist():
        print(f"{row['at'].astimezone(TEHRAN):%Y-%m-%d %H:%M}  {Code(row['code']).name:<7} {row['debit']:>8} -> "
              f"{row['credit']:<8} {row['amount']:>4}")
    assert statement.num_rows == 5  # two earns, the hold, its post, the expiry
    report = ledger.verify()
    assert report.ok, report.problems
    print(f"verified: {report.batches} journal entries, {report.transfers} transfers")
