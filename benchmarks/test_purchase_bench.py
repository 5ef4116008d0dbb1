"""Checkouts beside the SQLite peer (pytest-benchmark groups; ``python -m benchmarks.report --only rules``
prints the one-purchase figure at full size).

Our side is ``Engine.purchase`` / ``Engine.purchase_batch`` with the rules workload's program (10 earn
rules, 4 tiers, 5 offers): a ref (idempotency) check, the member's facts, the rule kernel, the points
transfers, the receipt and its outbox event, committed in one LMDB transaction. The peer is
``SqlitePeer`` as a shop would write it: points at the base rate only (one per 1,000 of the amount; no
rules, tiers, offers, receipts or events), so it does strictly less work per checkout than we do."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from loyalty_engine import RECORD_DTYPE, AccountFlags, Code, TransferResult
from loyalty_engine.bench.rules_workload import program
from loyalty_engine.bench.sqlite_peer import SqlitePeer
from loyalty_engine.bench.workloads import MEMBER_BASE, T0, member_ids
from loyalty_engine.engine import Engine, RowStatus

MEMBERS = 1_000
AMOUNT = 120_000  # 120 points at the base rate
BATCH = 1_000
ISSUER = 1
T0_DT = datetime(2026, 1, 1, tzinfo=UTC)
assert int(T0_DT.timestamp()) * 1_000_000 == T0
MINUTE = 60_000_000  # µs
# sync= for Engine.open, and the peer's PRAGMA synchronous giving the same durability
SYNC = {"full": "FULL", "none": "OFF"}


def _engine(path: Path, sync: str) -> Engine:
    engine = Engine.open(path, program=program(), sync=sync)
    assert engine.enroll_batch([f"m{i}" for i in range(MEMBERS)], at=T0_DT) == MEMBERS
    return engine


def _peer(path: Path, sync: str) -> SqlitePeer:
    peer = SqlitePeer(str(path), synchronous=SYNC[sync])
    peer.create_accounts([ISSUER], 0)
    peer.create_accounts(member_ids(MEMBERS).tolist(), int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
    return peer


# -- one checkout per call ----------------------------------------------------------------------------


SYNCS = [pytest.param(s, marks=pytest.mark.benchmark(group=f"one checkout per call, sync={s}")) for s in SYNC]


@pytest.mark.parametrize("sync", SYNCS)
def test_purchase(benchmark: Any, tmp_path: Path, sync: str) -> None:
    """``engine.purchase`` of one basket per call, one commit each (one fsync each under sync=full)."""
    with _engine(tmp_path / "club", sync) as engine:
        n = itertools.count()

        def one() -> Any:
            k = next(n)
            return engine.purchase(f"m{k % MEMBERS}", amount=AMOUNT, at=T0_DT + timedelta(minutes=1 + k), ref=f"r{k}")

        receipt = benchmark(one)
        assert receipt.points_earned >= AMOUNT // 1000
        benchmark.extra_info["checkouts"] = next(n)


@pytest.mark.parametrize("sync", SYNCS)
def test_sqlite_purchase(benchmark: Any, tmp_path: Path, sync: str) -> None:
    """``peer.purchase``: one SQLite transaction per checkout (WAL, synchronous=FULL or OFF)."""
    peer = _peer(tmp_path / "p.sqlite", sync)
    n = itertools.count(1)

    def one() -> int:
        k = next(n)
        return peer.purchase(k, MEMBER_BASE + k % MEMBERS, AMOUNT, T0 + (1 + k) * MINUTE)

    assert benchmark(one) == TransferResult.OK == 0
    checkouts = next(n) - 1
    assert peer.balance(ISSUER) == (checkouts * (AMOUNT // 1000), 0)
    benchmark.extra_info["checkouts"] = checkouts
    peer.close()


# -- 1,000 checkouts in one call ----------------------------------------------------------------------

GROUP_BATCH = f"purchase_batch of {BATCH:,} checkouts, sync=full"


def _baskets(round_: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round ``round_``'s 1,000 baskets, a minute apart after the previous round's: member index, at (µs
    UTC), amount (seeded, 10,000 to 800,000)."""
    rng = np.random.default_rng(round_)
    member = rng.integers(0, MEMBERS, BATCH)
    at = T0 + (1 + round_ * BATCH + np.arange(BATCH, dtype=np.int64)) * MINUTE
    amount = rng.integers(10_000, 800_000, BATCH)
    return member, at, amount


@pytest.mark.benchmark(group=GROUP_BATCH)
def test_purchase_batch(benchmark: Any, tmp_path: Path) -> None:
    """``engine.purchase_batch`` of a 1,000-row table (member, at, amount, ref): one durable commit."""
    rounds = itertools.count()
    with _engine(tmp_path / "club", "full") as engine:

        def setup() -> tuple[tuple[pa.Table], dict[str, Any]]:
            r = next(rounds)
            member, at, amount = _baskets(r)
            table = pa.table({"member": [f"m{i}" for i in member.tolist()], "at": at, "amount": amount,
                              "ref": [f"b{r}-{i}" for i in range(BATCH)]})
            return (table,), {}

        res = benchmark.pedantic(engine.purchase_batch, setup=setup, rounds=10, iterations=1)
        assert res.num_rows == BATCH
        assert res.column("status").to_pylist() == [RowStatus.OK] * BATCH
        assert min(res.column("points").to_pylist()) >= 10
        benchmark.extra_info["rows_per_round"] = BATCH


@pytest.mark.benchmark(group=GROUP_BATCH)
def test_sqlite_purchase_batch(benchmark: Any, tmp_path: Path) -> None:
    """``peer.post_batch`` of the same 1,000 checkouts as base-rate earns (issuer to member, amount =
    amount // 1,000) in one transaction (WAL, synchronous=FULL): per row an idempotency check, two balance
    reads, two balance updates and an insert."""
    peer = _peer(tmp_path / "p.sqlite", "full")
    rounds = itertools.count()

    def setup() -> tuple[tuple[np.ndarray], dict[str, Any]]:
        r = next(rounds)
        member, at, amount = _baskets(r)
        recs = np.zeros(BATCH, RECORD_DTYPE)
        recs["id_lo"] = np.arange(1 + r * BATCH, 1 + (r + 1) * BATCH, dtype=np.uint64)
        recs["debit"] = ISSUER
        recs["credit"] = (MEMBER_BASE + member).astype(np.uint64)
        recs["amount"] = amount // 1000
        recs["code"] = Code.EARN
        recs["at"] = at
        recs["user_data"] = amount
        return (recs,), {}

    res = benchmark.pedantic(peer.post_batch, setup=setup, rounds=10, iterations=1)
    assert res.tolist() == [TransferResult.OK] * BATCH
    benchmark.extra_info["rows_per_round"] = BATCH
    peer.close()
