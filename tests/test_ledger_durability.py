"""Crash safety, tampering, and several processes on one ledger."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lmdb
import numpy as np
import pytest

from loyalty_engine import Account, Ledger, Transfer, TransferResult

N_BATCHES = 100_000  # more than a round can post: every round ends in a kill
PER_BATCH = 200
MEMBERS = 50

# A writer that posts deterministic batches from `start` and reports each one after post_batch returns.
CHILD = textwrap.dedent('''
    import os, sys
    import numpy as np
    from loyalty_engine import RECORD_DTYPE, Account, Ledger, TransferResult as R
    path, start, report = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    def batch(b):
        r = np.zeros({per}, RECORD_DTYPE)
        ids = np.arange(b * {per} + 1, (b + 1) * {per} + 1, dtype=np.uint64)
        r["id_lo"] = ids
        r["debit"] = 1
        r["credit"] = 100 + ids % {members}
        r["amount"] = ids % 13 + 1
        r["at"] = 1_767_225_600_000_000 + ids.astype(np.int64)
        return r
    fd = os.open(report, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    with Ledger.open(path, sync="full") as ledger:
        ledger.create_accounts([Account(id=1, asset=0)] + [Account(id=100 + i, asset=0) for i in range({members})])
        for b in range(start, {n}):
            res = ledger.post_batch(batch(b))
            assert ((res == R.OK) | (res == R.EXISTS)).all(), res
            os.write(fd, f"{{b}}\\n".encode())
''').format(per=PER_BATCH, members=MEMBERS, n=N_BATCHES)


def expected_credits(k: int) -> dict[int, int]:
    ids = np.arange(1, k * PER_BATCH + 1, dtype=np.int64)
    sums = np.bincount(ids % MEMBERS, weights=ids % 13 + 1, minlength=MEMBERS)
    return {100 + i: int(sums[i]) for i in range(MEMBERS)}


def test_sigkill_at_random_moments_leaves_exactly_a_committed_prefix(tmp_path: Path) -> None:
    path = tmp_path / "crash.ledger"
    report = tmp_path / "committed.txt"
    rng = random.Random(20261122)
    start = 0
    progress = []
    for _round in range(8):
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(start), str(report)])
        time.sleep(rng.uniform(0.3, 1.2))  # the import takes a while; kills land before, during, after
        child.send_signal(signal.SIGKILL)
        assert child.wait() == -signal.SIGKILL  # killed, not failed on its own
        reported = [int(x) for x in report.read_text().split()] if report.exists() else []
        with Ledger.open(path, sync="full") as ledger:
            rep = ledger.verify()
            assert rep.ok, rep.problems
            # the journal's transfers are exactly batches 0..k-1, in order
            ids = ledger.transfers()["id"].to_numpy()
            k = len(ids) // PER_BATCH
            assert len(ids) == k * PER_BATCH
            assert np.array_equal(ids, np.arange(1, k * PER_BATCH + 1, dtype=np.uint64))
            # every batch the writer saw committed is there
            assert not reported or max(reported) < k
            credits = expected_credits(k)
            bal = ledger.balances(np.array(sorted(credits), np.uint64))
            assert bal["credits_posted"].tolist() == [credits[a] for a in sorted(credits)]
            assert ledger.balance(1).debits_posted == sum(credits.values())
        progress.append(k)
        start = max(0, k - 1)  # resume with one retry of a committed batch: it answers EXISTS
    assert progress == sorted(progress) and progress[-1] > progress[0] > 0, progress


def _make(path: Path, n: int = 30) -> int:
    with Ledger.open(path, sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        for i in range(3):
            ledger.post([Transfer(id=i * n + j + 1, debit=1, credit=2, amount=j + 1, at=10**15 + j)
                         for j in range(n)])
        return ledger.head[0]


def _flip(path: Path, db: bytes, key: bytes | None, offset: int) -> bytes:
    env = lmdb.open(str(path), max_dbs=8, lock=False)
    handle = env.open_db(db, create=False)
    with env.begin(write=True, db=handle) as txn:
        if key is None:
            key = bytes(next(iter(txn.cursor()))[0])
        value = bytearray(txn.get(key))
        value[offset % len(value)] ^= 0x10
        txn.put(key, bytes(value))
    env.close()
    return key


@pytest.mark.parametrize("where,offset", [("header count", 4), ("header time", 20), ("previous hash", 30),
                                          ("a record", 56 + 104 * 7 + 40), ("the stored hash", -5)])
def test_a_flipped_journal_byte_is_reported_with_its_entry(tmp_path: Path, where: str, offset: int) -> None:
    path = tmp_path / "t.ledger"
    last = _make(path)
    _flip(path, b"journal", (last - 1).to_bytes(8, "big"), offset)
    with Ledger.open(path, sync="none", readonly=True, create=False) as ledger:
        rep = ledger.verify()
    assert not rep.ok, where
    assert any(f"journal entry {last - 1}" in p for p in rep.problems), rep.problems


def test_a_flipped_snapshot_byte_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.ledger"
    _make(path)  # closing a writing handle writes a snapshot
    _flip(path, b"snapshot", b"state", 200)
    with Ledger.open(path, sync="none", readonly=True, create=False) as ledger:
        rep = ledger.verify()
    assert not rep.ok
    assert any("snapshot" in p for p in rep.problems), rep.problems


def test_a_flipped_index_byte_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "t.ledger"
    _make(path, n=2000)  # entries this big are indexed at once
    _flip(path, b"index", None, 8 + 8 * 3)  # an account id in the first run
    with Ledger.open(path, sync="none", readonly=True, create=False) as ledger:
        rep = ledger.verify()
    assert not rep.ok
    assert any("index" in p for p in rep.problems), rep.problems


READER = textwrap.dedent('''
    import sys
    from loyalty_engine import Ledger
    with Ledger.open(sys.argv[1], readonly=True, create=False) as ledger:
        for line in sys.stdin:
            want = int(line)
            got = ledger.balance(2).credits_posted
            print(got, flush=True)
            assert got == want, (got, want)
''')


def test_a_reader_in_another_process_sees_every_commit(tmp_path: Path) -> None:
    path = tmp_path / "r.ledger"
    with Ledger.open(path, sync="full") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        with subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) as reader:
            assert reader.stdin is not None and reader.stdout is not None
            total = 0
            for i in range(1, 21):
                res = ledger.post([Transfer(id=i, debit=1, credit=2, amount=i, at=10**15)])
                assert res == [TransferResult.OK]
                total += i
                reader.stdin.write(f"{total}\n")
                reader.stdin.flush()
                assert int(reader.stdout.readline()) == total
            reader.stdin.close()
            assert reader.wait(timeout=60) == 0


WRITER = textwrap.dedent('''
    import sys
    from loyalty_engine import Ledger, Transfer
    path, base = sys.argv[1], int(sys.argv[2])
    with Ledger.open(path, sync="group") as ledger:
        for i in range(100):
            t = [Transfer(id=base + 10 * i + j, debit=1, credit=2, amount=1, at=10**15) for j in range(10)]
            assert all(r == 0 for r in ledger.post(t))
''')


def test_two_writer_processes_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "w.ledger"
    with Ledger.open(path, sync="group") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(base)])
             for base in (1, 1_000_001)]
    for p in procs:
        assert p.wait(timeout=120) == 0
    with Ledger.open(path, sync="group") as ledger:
        assert ledger.balance(2).credits_posted == 2000
        assert len(ledger.transfers(account=2)) == 2000
        assert ledger.verify().ok


def test_the_map_grows_by_itself(tmp_path: Path) -> None:
    path = tmp_path / "g.ledger"
    with Ledger.open(path, sync="none", map_size=1 << 16) as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        for b in range(5):
            res = ledger.post([Transfer(id=b * 2000 + j + 1, debit=1, credit=2, amount=1, at=10**15)
                               for j in range(2000)])
            assert res == [TransferResult.OK] * 2000
        assert ledger.balance(2).credits_posted == 10_000
        assert ledger.verify().ok
    assert os.path.getsize(path / "data.mdb") > 1 << 16


def test_writer_threads_with_their_own_handles_lose_nothing(tmp_path: Path) -> None:
    import threading

    path = tmp_path / "threads.ledger"
    with Ledger.open(path, sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
    errors: list[BaseException] = []

    def writer(base: int) -> None:
        try:
            with Ledger.open(path, sync="none") as own:
                for i in range(200):
                    res = own.post([Transfer(id=base + i, debit=1, credit=2, amount=1, at=10**15)])
                    assert res == [TransferResult.OK], res
                    assert own.balance(2).credits_posted >= i + 1
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(base,)) for base in (1, 10_001, 20_001)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    with Ledger.open(path, sync="none") as ledger:
        assert ledger.balance(2).credits_posted == 600
        assert len(ledger.transfers(account=2)) == 600
        assert ledger.verify().ok


def test_a_handles_next_write_reads_the_journal_only_when_someone_else_wrote(tmp_path: Path, monkeypatch) -> None:
    """A write transaction whose LMDB id follows this handle's last entry needs no look at the journal
    (nobody wrote in between); any other write does: another handle's, or after a commit of nothing, whose
    id LMDB gives to the next transaction (someone else's here)."""
    looked: list[int] = []
    catch_up = Ledger._catch_up

    def counting(self: Ledger, txn: lmdb.Transaction) -> None:
        looked.append(id(self))
        catch_up(self, txn)

    monkeypatch.setattr(Ledger, "_catch_up", counting)
    path = tmp_path / "turns.ledger"
    with Ledger.open(path, sync="none") as a, Ledger.open(path, sync="none") as b:
        a.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        looked.clear()
        for i in range(5):                                  # one handle's writes in a row
            assert a.post([Transfer(id=10 + i, debit=1, credit=2, amount=1, at=10**15)]) == [TransferResult.OK]
        assert looked.count(id(a)) == 0
        assert b.post([Transfer(id=20, debit=1, credit=2, amount=2, at=10**15)]) == [TransferResult.OK]
        assert a.post([Transfer(id=21, debit=1, credit=2, amount=3, at=10**15)]) == [TransferResult.OK]
        assert looked.count(id(a)) == 1                     # b wrote in between: a caught up
        assert a.balance(2).credits_posted == 10
        # a write that journals nothing (a retried transfer) commits nothing: its id goes to b's next write
        looked.clear()
        assert a.post([Transfer(id=21, debit=1, credit=2, amount=3, at=10**15)]) == [TransferResult.EXISTS]
        assert b.post([Transfer(id=22, debit=1, credit=2, amount=4, at=10**15)]) == [TransferResult.OK]
        assert a.post([Transfer(id=23, debit=1, credit=2, amount=5, at=10**15)]) == [TransferResult.OK]
        assert looked.count(id(a)) == 1                     # (not the retry's: nobody had written before it)
        assert a.balance(2).credits_posted == 19
        assert b.balance(2).credits_posted == 19
        assert a.verify().ok


def test_a_writers_own_tail_is_indexed_without_reading_the_journal_back(tmp_path: Path, monkeypatch) -> None:
    """Single posts wait in the journal's unindexed tail until 32 entries are there; a handle that wrote
    them all (nobody else wrote since the index's last run) indexes them from memory, and the index is
    the one the journal gives (verify compares them); after another handle's write in between, it reads
    them back from the journal as before."""
    import loyalty_engine.ledger as ledger_module

    read_back: list[int] = []
    records = ledger_module._records

    def counting(txn: lmdb.Transaction, rdb: object, seq: int, value: object) -> np.ndarray:
        read_back.append(seq)
        return records(txn, rdb, seq, value)

    path = tmp_path / "tail.ledger"
    with Ledger.open(path, sync="none") as a, Ledger.open(path, sync="none") as b:
        a.create_accounts([Account(id=k, asset=0) for k in (1, 2, 3)])
        for i in range(1, 36):      # (the first tail holds the accounts' entry, which a did not keep)
            a.post([Transfer(id=i, debit=1, credit=2, amount=1, at=10**15 + i)])
        monkeypatch.setattr(ledger_module, "_records", counting)
        for i in range(36, 100):                             # two more tails indexed, all of them a's
            a.post([Transfer(id=i, debit=1, credit=2 + i % 2, amount=i, at=10**15 + i)])
        assert read_back == []
        b.post([Transfer(id=500, debit=1, credit=3, amount=7, at=10**15 + 500)])
        for i in range(100, 140):                            # b's entry in the next tail: read back
            a.post([Transfer(id=i, debit=1, credit=2, amount=1, at=10**15 + i)])
        assert read_back
        monkeypatch.setattr(ledger_module, "_records", records)
        assert a.verify().ok
        assert len(a.transfers(account=3)) == 33             # (32 of a's, b's one)
        assert len(a.transfers(account=1)) == 140
