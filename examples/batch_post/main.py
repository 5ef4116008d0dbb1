"""Post a purchase history in batches from Arrow, re-run it safely, and read it back.

Shows: post_batch with a pyarrow Table (one result code per row, no Python object per transfer),
refused rows found with NumPy, an idempotent re-run (every row answers EXISTS, nothing is written),
transfers(account=...) and export() to Parquet, and verify(). Run: python examples/batch_post/main.py
"""

import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from loyalty_engine import AccountFlags, Code, Ledger, TransferResult
from loyalty_engine.datasets import load_cdnow

ISSUER, MEMBER_BASE = 1, 1_000_000
DAY_US = 86_400_000_000

sales = load_cdnow()  # customer_id, date, cds, amount_cents
at = pc.cast(pc.cast(sales["date"], pa.timestamp("s")), pa.int64()).to_numpy() * 1_000_000  # midnight UTC
points = sales["amount_cents"].to_numpy() // 100  # one point per whole dollar
batch = pa.table({
    "id": pa.array(np.arange(1, sales.num_rows + 1, dtype=np.uint64)),  # the row: re-runs are no-ops
    "debit": pa.array(np.full(sales.num_rows, ISSUER, np.uint64)),
    "credit": pa.array(sales["customer_id"].to_numpy().astype(np.uint64) + MEMBER_BASE),
    "amount": pa.array(points),
    "code": pa.array(np.full(sales.num_rows, Code.EARN, np.uint16)),
    "at": pa.array(at),
    "expires_at": pa.array(at + 365 * DAY_US),
})

with tempfile.TemporaryDirectory() as tmp, Ledger.open(Path(tmp) / "club.ledger", sync="full") as ledger:
    members = np.unique(batch["credit"].to_numpy())
    ledger.create_accounts_batch(np.array([ISSUER], np.uint64))
    ledger.create_accounts_batch(members, flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)

    results = np.concatenate([ledger.post_batch(b) for b in batch.to_batches(max_chunksize=20_000)])
    refused = np.flatnonzero(results != TransferResult.OK)
    # $0.00 baskets earn 0 points: the ledger refuses a zero amount, row by row, and posts the rest
    assert set(results[refused].tolist()) == {TransferResult.AMOUNT_MUST_BE_POSITIVE}
    assert len(refused) == int((points == 0).sum()) == 80
    print(f"posted {len(results) - len(refused):,} earns; refused {len(refused)} zero-point baskets")

    again = ledger.post_batch(batch)  # the whole history again, e.g. after a crash mid-import
    assert (again[results == TransferResult.OK] == TransferResult.EXISTS).all()
    head_before = ledger.head

    member = MEMBER_BASE + 14048  # CDNOW's most frequent buyer
    history = ledger.transfers(account=member)
    assert history.num_rows == int((batch["credit"].to_numpy() == member).sum())
    assert sum(history["amount"].to_pylist()) == ledger.balance(member).credits_posted
    print(f"member {member}: {history.num_rows} earns, {ledger.balance(member).available:,} points")

    out = Path(tmp) / "journal.parquet"
    assert ledger.export(out) == len(results) - len(refused)
    assert pq.read_table(out).num_rows == len(results) - len(refused)
    assert ledger.head == head_before  # reading writes nothing
    report = ledger.verify()
    assert report.ok, report.problems
    print(f"verified: {report.transfers:,} transfers in {report.batches} journal entries")
