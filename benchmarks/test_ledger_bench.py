"""pytest-benchmark scenarios, each with the SQLite peer beside it in the same group (modest sizes;
``python -m benchmarks.report`` prints the capacity figures at full size)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loyalty_engine import Account, AccountFlags, Ledger, Transfer, TransferResult
from loyalty_engine.bench.sqlite_peer import SqlitePeer
from loyalty_engine.bench.workloads import MEMBER_BASE, SYSTEM, T0, make_workload, member_ids, open_ledger

MEMBERS = 10_000
BATCH = 10_000


@pytest.fixture()
def batches() -> Iterator[Any]:
    work = make_workload(MEMBERS, BATCH, 60, seed=3)
    yield iter(work.batches)


@pytest.mark.benchmark(group="post_batch 10k x 10k members, durable")
def test_ledger_post_batch(benchmark: Any, tmp_path: Path, batches: Iterator[np.ndarray]) -> None:
    ledger = open_ledger(str(tmp_path / "l"), MEMBERS, sync="full")
    ledger.post_batch(next(batches))
    res = benchmark.pedantic(lambda: ledger.post_batch(next(batches)), rounds=20, iterations=1)
    assert len(res) == BATCH and (res == TransferResult.OK).sum() > BATCH // 2
    benchmark.extra_info["rows_per_round"] = BATCH
    ledger.close()


@pytest.mark.benchmark(group="post_batch 10k x 10k members, durable")
def test_sqlite_post_batch(benchmark: Any, tmp_path: Path, batches: Iterator[np.ndarray]) -> None:
    peer = SqlitePeer(str(tmp_path / "p.sqlite"))
    peer.create_accounts(SYSTEM, 0)
    peer.create_accounts(member_ids(MEMBERS).tolist(), int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
    peer.post_batch(next(batches))
    res = benchmark.pedantic(lambda: peer.post_batch(next(batches)), rounds=3, iterations=1)
    assert len(res) == BATCH
    benchmark.extra_info["rows_per_round"] = BATCH
    peer.close()


@pytest.mark.parametrize("sync", ["none", "full"])
@pytest.mark.benchmark(group="one transfer per call")
def test_ledger_single_post(benchmark: Any, tmp_path: Path, sync: str) -> None:
    with Ledger.open(tmp_path / "l", sync=sync) as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        ids = itertools.count(1)

        def one() -> Any:
            return ledger.post([Transfer(id=next(ids), debit=1, credit=2, amount=1, at=T0)])

        assert benchmark(one) == [TransferResult.OK]


@pytest.mark.benchmark(group="one transfer per call")
def test_sqlite_single_post(benchmark: Any, tmp_path: Path) -> None:
    peer = SqlitePeer(str(tmp_path / "p.sqlite"))
    peer.create_accounts([1, 2], 0)
    ids = itertools.count(1)

    def one() -> Any:
        r = make_workload(1, 1, 1, first_id=next(ids)).batches[0]
        r["debit"], r["credit"] = 1, 2
        return peer.post_batch(r)

    assert benchmark.pedantic(one, rounds=200, iterations=1).tolist() == [TransferResult.OK]
    peer.close()


@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ledger, SqlitePeer]]:
    tmp = tmp_path_factory.mktemp("big")
    ledger = open_ledger(str(tmp / "l"), 100_000, sync="none")
    peer = SqlitePeer(str(tmp / "p.sqlite"), synchronous="OFF")
    peer.create_accounts(member_ids(100_000).tolist(), 1)
    for b in range(4):
        batch = make_workload(1000, 100_000, 1, seed=b, first_id=1 + b * 100_000, spend_share=0.0).batches[0]
        ledger.post_batch(batch)
        peer.bulk_load(batch)
    yield ledger, peer
    ledger.close()
    peer.close()


@pytest.mark.benchmark(group="balance read, 100k accounts")
def test_ledger_balance(benchmark: Any, big: tuple[Ledger, SqlitePeer]) -> None:
    ids = itertools.cycle((MEMBER_BASE + np.random.default_rng(0).integers(0, 100_000, 10_000)).tolist())
    b = benchmark(lambda: big[0].balance(next(ids)))
    assert b.available >= 0


@pytest.mark.benchmark(group="balance read, 100k accounts")
def test_sqlite_balance(benchmark: Any, big: tuple[Ledger, SqlitePeer]) -> None:
    ids = itertools.cycle((MEMBER_BASE + np.random.default_rng(0).integers(0, 100_000, 10_000)).tolist())
    assert benchmark(lambda: big[1].balance(next(ids))) is not None


@pytest.mark.benchmark(group="transfers of an account (400 each), 400k transfers")
def test_ledger_transfers_of_account(benchmark: Any, big: tuple[Ledger, SqlitePeer]) -> None:
    ids = itertools.cycle(range(MEMBER_BASE, MEMBER_BASE + 1000))
    table = benchmark(lambda: big[0].transfers(account=next(ids)))
    assert table.num_rows > 200


@pytest.mark.benchmark(group="transfers of an account (400 each), 400k transfers")
def test_sqlite_transfers_of_account(benchmark: Any, big: tuple[Ledger, SqlitePeer]) -> None:
    ids = itertools.cycle(range(MEMBER_BASE, MEMBER_BASE + 1000))
    assert len(benchmark(lambda: big[1].transfers_of(next(ids)))) > 200
