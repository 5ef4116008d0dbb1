"""Identical, seeded workloads for the ledger and the SQLite peer.

Members are accounts 1_000_000 + i (flagged DEBITS_MUST_NOT_EXCEED_CREDITS); three system accounts
(1 = the points issuer, 2 = redemptions, 3 = breakage). Nine transfers in ten are earns from the
issuer to a random member with an expiry a year on; one in ten is a member spending at most what an
earn gives to redemptions (some are refused for want of points, as at a real till).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from loyalty_engine import RECORD_DTYPE, Account, AccountFlags, Code, Ledger

MEMBER_BASE = 1_000_000
SYSTEM = (1, 2, 3)
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00Z, µs
YEAR = 365 * 86_400_000_000


@dataclass
class Workload:
    members: int
    batches: list[np.ndarray]  # RECORD_DTYPE arrays

    @property
    def rows(self) -> int:
        return sum(len(b) for b in self.batches)


def make_workload(members: int, batch_size: int, n_batches: int, seed: int = 1, first_id: int = 1,
                  spend_share: float = 0.1) -> Workload:
    rng = np.random.default_rng(seed)
    batches = []
    next_id = first_id
    for _ in range(n_batches):
        r = np.zeros(batch_size, RECORD_DTYPE)
        r["id_lo"] = np.arange(next_id, next_id + batch_size, dtype=np.uint64)
        member = (MEMBER_BASE + rng.integers(0, members, batch_size)).astype(np.uint64)
        spend = rng.random(batch_size) < spend_share
        r["debit"] = np.where(spend, member, np.uint64(1))
        r["credit"] = np.where(spend, np.uint64(2), member)
        r["amount"] = rng.integers(1, 500, batch_size)
        r["code"] = np.where(spend, Code.REDEEM, Code.EARN)
        r["at"] = T0 + r["id_lo"].astype(np.int64) * 1000
        r["expires_at"] = np.where(spend, 0, r["at"] + YEAR)
        batches.append(r)
        next_id += batch_size
    return Workload(members=members, batches=batches)


def member_ids(members: int) -> np.ndarray:
    return np.arange(MEMBER_BASE, MEMBER_BASE + members, dtype=np.uint64)


def open_ledger(path: str, members: int, sync: str) -> Ledger:
    ledger = Ledger.open(path, sync=sync)
    ledger.create_accounts([Account(id=i, asset=0) for i in SYSTEM])
    ledger.create_accounts_batch(member_ids(members), asset=0,
                                 flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
    return ledger
