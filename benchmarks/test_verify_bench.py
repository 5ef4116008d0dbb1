"""The audit beside its peer (pytest-benchmark group): ``ledger.verify()`` walks the hash chain, replays
every journal entry from empty, checks conservation and the account index, and compares the result with
the stored snapshot and the live state; the SQLite peer's ``verify()`` runs ``PRAGMA integrity_check``
and rebuilds every balance from the transfers table. Both hold the same 200,000 posted batches."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from loyalty_engine import AccountFlags, Ledger, TransferResult
from loyalty_engine.bench.sqlite_peer import SqlitePeer
from loyalty_engine.bench.workloads import SYSTEM, make_workload, member_ids, open_ledger

MEMBERS = 10_000
BATCH = 20_000
BATCHES = 10  # 200,000 transfers
GROUP = f"verify() of a journal of {BATCH * BATCHES:,} transfers"


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Ledger, SqlitePeer, int]]:
    """A ledger and a peer with the same batches posted (not durable while building: only the audit is
    timed). Yields them and the number of transfers both accepted."""
    tmp = tmp_path_factory.mktemp("verify")
    ledger = open_ledger(str(tmp / "l"), MEMBERS, sync="none")
    peer = SqlitePeer(str(tmp / "p.sqlite"), synchronous="OFF")
    peer.create_accounts(SYSTEM, 0)
    peer.create_accounts(member_ids(MEMBERS).tolist(), int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))
    posted = 0
    for batch in make_workload(MEMBERS, BATCH, BATCHES, seed=11, spend_share=0.02).batches:
        ours = np.asarray(ledger.post_batch(batch))
        theirs = peer.post_batch(batch)
        assert (ours == theirs).all()
        posted += int((ours == TransferResult.OK).sum())
    assert posted > BATCH * BATCHES * 0.95
    yield ledger, peer, posted
    ledger.close()
    peer.close()


@pytest.mark.benchmark(group=GROUP)
def test_ledger_verify(benchmark: Any, journal: tuple[Ledger, SqlitePeer, int]) -> None:
    ledger, _, posted = journal
    rep = benchmark.pedantic(ledger.verify, rounds=5, iterations=1)
    assert rep.ok, rep.problems
    assert rep.transfers == posted
    benchmark.extra_info["transfers"] = rep.transfers
    benchmark.extra_info["journal_entries"] = rep.batches


@pytest.mark.benchmark(group=GROUP)
def test_sqlite_verify(benchmark: Any, journal: tuple[Ledger, SqlitePeer, int]) -> None:
    _, peer, posted = journal
    assert benchmark.pedantic(peer.verify, rounds=5, iterations=1) is True
    benchmark.extra_info["transfers"] = posted
