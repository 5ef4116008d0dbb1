"""Bugs found once, and the storage paths the state machine's small batches do not reach."""

from __future__ import annotations

import mmap
from pathlib import Path

import lmdb
import numpy as np
import pytest

import loyalty_engine.ledger as ledger_module
from loyalty_engine import (
    RECORD_DTYPE,
    Account,
    AccountFlags,
    Ledger,
    Transfer,
    TransferFlags,
    TransferResult,
)

AT = 1_767_225_600_000_000  # 2026-01-01T00:00Z in µs
SEC = 1_000_000


def test_account_zero_never_resolves_to_an_existing_account(tmp_path: Path) -> None:
    """Id 0 marks an empty hash bucket; once it resolved to the first account created."""
    with Ledger.open(tmp_path / "l", sync="none") as ledger:
        ledger.create_accounts([Account(id=5, asset=0), Account(id=6, asset=0)])
        res = ledger.post([Transfer(id=1, debit=0, credit=6, amount=3, at=AT),
                           Transfer(id=2, debit=6, credit=0, amount=3, at=AT)])
        assert res == [TransferResult.ACCOUNT_NOT_FOUND, TransferResult.ACCOUNT_NOT_FOUND]
        assert ledger.balance(5).debits_posted == 0 and ledger.balance(6).credits_posted == 0
        assert ledger.balances(np.array([0], np.uint64))["found"].tolist() == [False]


def test_a_timed_out_hold_answers_pending_expired_before_field_checks(tmp_path: Path) -> None:
    """docs/ledger.md check 4 orders PENDING_EXPIRED before PENDING_FIELDS_DIFFER."""
    with Ledger.open(tmp_path / "l", sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0), Account(id=3, asset=0)])
        assert ledger.post([Transfer(id=10, debit=1, credit=2, amount=5, at=AT, timeout=SEC,
                                     flags=TransferFlags.PENDING)]) == [TransferResult.OK]
        late = Transfer(id=11, debit=0, credit=3, amount=0, related=10, at=AT + 2 * SEC,
                        flags=TransferFlags.POST_PENDING)
        assert ledger.post([late]) == [TransferResult.PENDING_EXPIRED]
        in_time = Transfer(id=12, debit=0, credit=3, amount=0, related=10, at=AT,
                           flags=TransferFlags.POST_PENDING)
        assert ledger.post([in_time]) == [TransferResult.PENDING_FIELDS_DIFFER]


def _earn_batch(first_id: int, n: int, members: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    r = np.zeros(n, RECORD_DTYPE)
    r["id_lo"] = np.arange(first_id, first_id + n, dtype=np.uint64)
    r["debit"] = 1
    r["credit"] = rng.choice(members, n)
    r["amount"] = rng.integers(1, 100, n)
    r["at"] = AT + r["id_lo"].astype(np.int64)
    # expiries out of order, so lots are inserted at the head, the middle and the tail of the lists
    r["expires_at"] = AT + SEC * rng.integers(1, 50, n) * 3600
    return r


def _open_club(path: Path, members: np.ndarray, flags: int = 0) -> Ledger:
    """A ledger with the issuer (account 1) and ``members``."""
    ledger = Ledger.open(path, sync="none")
    ledger.create_accounts([Account(id=1, asset=0)])
    ledger.create_accounts_batch(members, asset=0, flags=flags)
    return ledger


def _post_earns(ledger: Ledger, members: np.ndarray, rng: np.random.Generator, batches: int,
                size: int) -> np.ndarray:
    """Post ``batches`` earn batches of ``size``; all must be OK. Returns every record posted."""
    posted = []
    for b in range(batches):
        batch = _earn_batch(1 + size * b, size, members, rng)
        assert (ledger.post_batch(batch) == TransferResult.OK).all()
        posted.append(batch)
    return np.concatenate(posted)


def test_many_batches_merge_index_runs_and_queries_stay_exact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "RUN_FANOUT", 8)  # merges after 8 runs instead of 16
    rng = np.random.default_rng(7)
    members = np.arange(100, 160, dtype=np.uint64)
    path = tmp_path / "l"
    with _open_club(path, members, AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS) as ledger:
        # 20 batches, each indexed at once: level-0 runs merge into level-1 runs
        allrecs = _post_earns(ledger, members, rng, 20, 1500)
        for m in members[:10]:
            got = ledger.transfers(account=int(m))
            want = allrecs[allrecs["credit"] == m]
            assert got["id"].to_pylist() == want["id_lo"].tolist()  # time order = posting order here
            assert sum(got["amount"].to_pylist()) == ledger.balance(int(m)).credits_posted
            lots = ledger.lots(int(m))
            assert [e for e, _ in lots] == sorted({int(e) for e in want["expires_at"]})
            assert sum(a for _, a in lots) == ledger.balance(int(m)).available
        assert len(ledger.transfers(account=1)) == len(allrecs)
        assert ledger.verify().ok
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    with env.begin(db=env.open_db(b"index", create=False)) as txn:
        levels = [bytes(k)[0] for k, _ in txn.cursor()]
    env.close()
    # 20 level-0 runs (the first also covers the two account entries): two merges of eight
    assert levels.count(1) == 2 and levels.count(0) == 4 and levels.count(255) == 1, levels


def test_small_entries_wait_in_the_tail_and_queries_still_see_them(tmp_path: Path) -> None:
    path = tmp_path / "l"
    with Ledger.open(path, sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0), Account(id=3, asset=0)])
        for i in range(1, 71):  # 70 single posts: the tail is indexed at entries 32 and 64
            assert ledger.post([Transfer(id=i, debit=1, credit=2 + i % 2, amount=i, at=AT + i)]) == [
                TransferResult.OK]
            if i in (5, 31, 32, 33, 70):
                got = ledger.transfers(account=3)["id"].to_pylist()
                assert got == [k for k in range(1, i + 1) if k % 2 == 1], i
        assert ledger.transfers(account=2)["amount"].to_pylist() == list(range(2, 71, 2))
        assert ledger.verify().ok
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    with env.begin(db=env.open_db(b"index", create=False)) as txn:
        keys = [bytes(k) for k, _ in txn.cursor()]
        indexed = int.from_bytes(bytes(txn.get(keys[-1])), "big")
    env.close()
    # entry 1 holds the accounts; entries 2..71 the posts; runs cover 1..32 and 33..64
    assert [k[0] for k in keys] == [0, 0, 255] and indexed == 64


@pytest.mark.parametrize("damage", ["flip", "delete"])
def test_damage_to_a_later_part_of_a_large_entry_is_found(tmp_path: Path, damage: str) -> None:
    """Entries over SEG_RECORDS records keep their records in parts (one hash leaf each); every part is
    covered by the entry's hash, and a missing part is reported."""
    rng = np.random.default_rng(3)
    members = np.arange(100, 200, dtype=np.uint64)
    path = tmp_path / "l"
    with _open_club(path, members) as ledger:
        assert (ledger.post_batch(_earn_batch(1, 8000, members, rng)) == TransferResult.OK).all()
        seq = ledger.head[0]
        before = ledger.transfers(account=150)
    env = lmdb.open(str(path), max_dbs=8, lock=False)
    records = env.open_db(b"records", create=False)
    key = seq.to_bytes(8, "big") + (2).to_bytes(4, "big")
    with env.begin(write=True, db=records) as txn:
        parts = [bytes(k) for k, _ in txn.cursor()]
        assert len(parts) == 4  # 8000 records in parts of 2520
        if damage == "flip":
            value = bytearray(txn.get(key))
            value[1000] ^= 0x40
            txn.put(key, bytes(value))
        else:
            txn.delete(key)
    env.close()
    with Ledger.open(path, sync="none", readonly=True, create=False) as ledger:
        report = ledger.verify()
        if damage == "flip":  # records in other parts still read
            assert ledger.transfers(account=150).num_rows == before.num_rows
    assert not report.ok
    assert any(f"journal entry {seq}" in p for p in report.problems), report.problems


@pytest.mark.parametrize("readonly", [True, False])
def test_post_batch_does_not_modify_the_callers_array(tmp_path: Path, readonly: bool) -> None:
    rng = np.random.default_rng(1)
    members = np.arange(100, 110, dtype=np.uint64)
    batch = _earn_batch(1, 50, members, rng)
    before = batch.copy()
    batch.flags.writeable = not readonly
    with _open_club(tmp_path / "l", members) as ledger:
        assert (ledger.post_batch(batch) == TransferResult.OK).all()
        assert (ledger.post_batch(batch) == TransferResult.EXISTS).all()
    assert batch.tobytes() == before.tobytes()


def test_big_runs_are_stored_in_chunks_and_merge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A run over RUN_CHUNK entries is chunks under a directory; lookups read only the chunks that
    can hold the account, and merging and verification read them all."""
    monkeypatch.setattr(ledger_module, "RUN_FANOUT", 8)  # merges after 8 runs instead of 16
    rng = np.random.default_rng(5)
    members = np.arange(100, 5100, dtype=np.uint64)
    path = tmp_path / "l"
    with _open_club(path, members) as ledger:
        # 9 runs of 80,000 entries: eight merge into one of 640,000
        allrecs = _post_earns(ledger, members, rng, 9, 40_000)
        for m in (100, 101, 2600, 5099):
            got = ledger.transfers(account=m)["id"].to_numpy()
            assert np.array_equal(got, allrecs["id_lo"][allrecs["credit"] == m])
        assert ledger.verify().ok
    env = lmdb.open(str(path), max_dbs=8, readonly=True, lock=False)
    with env.begin(db=env.open_db(b"index", create=False)) as txn:
        keys = [bytes(k) for k, _ in txn.cursor()]
    env.close()
    directories = [k for k in keys if len(k) == 17]
    chunks = [k for k in keys if len(k) == 21]
    assert [k[0] for k in directories] == [0, 1]
    assert len(chunks) == 2 + 10  # 80,000 entries in 2 chunks; 640,000 in 10


def test_the_map_grows_before_a_write_that_could_fill_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fills the LMDB map is redone from a state rebuilt from the journal; the ledger
    grows the map ahead (when it is half full) so that steady writes never pay for that."""
    resets = {"n": 0}
    real = Ledger._reset

    def counting(self: Ledger) -> None:
        resets["n"] += 1
        real(self)

    monkeypatch.setattr(Ledger, "_reset", counting)
    with Ledger.open(tmp_path / "l", sync="none", map_size=1 << 18) as ledger:
        ledger.create_accounts([Account(id=1), Account(id=2)])
        start = ledger._st().env.info()["map_size"]
        recs = np.zeros(200, RECORD_DTYPE)
        recs["debit"], recs["credit"], recs["amount"], recs["at"] = 1, 2, 1, AT
        for b in range(60):
            recs["id_lo"] = np.arange(b * 200 + 1, (b + 1) * 200 + 1, dtype=np.uint64)
            assert not ledger.post_batch(recs).any()
        assert ledger._st().env.info()["map_size"] >= 4 * start
        assert ledger.balance(2).credits_posted == 12_000
    assert resets["n"] == 0


def test_every_writer_opens_lmdb_with_the_same_writemap_whatever_its_sync(tmp_path: Path) -> None:
    """LMDB: processes with and without MDB_WRITEMAP on one environment do not cooperate (it can defeat
    durability). A host at sync="none" and an operator's import at sync="full" open the same ledger, so every
    writable open uses the same flag (once: writemap only at sync="none"); readonly opens still work."""
    import subprocess
    import sys

    path = tmp_path / "l"
    flags = {}
    for i, sync in enumerate(("none", "group", "full")):
        with Ledger.open(path, sync=sync) as ledger:
            f = ledger._st().env.flags()
            flags[sync] = (f["writemap"], f["sync"], f["metasync"])
            ledger.create_accounts([Account(id=2 * i + 1, asset=0), Account(id=2 * i + 2, asset=0)])
            assert ledger.post([Transfer(id=i + 1, debit=2 * i + 1, credit=2 * i + 2, amount=5, at=AT)]) == [
                TransferResult.OK]
    assert flags == {"none": (False, False, False), "group": (False, True, False), "full": (False, True, True)}
    with Ledger.open(path, create=False, readonly=True) as reader:
        f = reader._st().env.flags()
        assert f["readonly"] and not f["writemap"] and reader.verify().ok and reader.balance(6).credits_posted == 5
    # a readonly reader in another process while this one writes, at each mode
    script = ("import sys\nfrom loyalty_engine import Ledger\n"
              "with Ledger.open(sys.argv[1], create=False, readonly=True) as r:\n"
              "    print(r.balance(6).credits_posted, r._st().env.flags()['writemap'], r.verify().ok)\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src")}
    for k, sync in enumerate(("none", "full")):
        with Ledger.open(path, sync=sync) as ledger:
            ledger.post([Transfer(id=10 + k, debit=5, credit=6, amount=1, at=AT)])
            got = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True,
                                 env=env, timeout=120)
            assert got.returncode == 0, got.stderr
            assert got.stdout.split() == [str(6 + k), "False", "True"]


def test_many_balances_at_once_are_each_accounts_balance(tmp_path: Path) -> None:
    """``balances`` of many ids (looked up in two prefetching passes) answers as ``balance`` does one by
    one: unknown ids, repeats, any order, holds and posted amounts."""
    rng = np.random.default_rng(5)
    with Ledger.open(tmp_path / "l", sync="none") as ledger:
        ledger.create_accounts_batch(np.arange(1, 301, dtype=np.uint64))
        trs = [Transfer(id=k + 1, debit=int(rng.integers(1, 301)), credit=int(rng.integers(1, 301)),
                        amount=int(rng.integers(1, 50)), at=AT,
                        flags=TransferFlags.PENDING if k % 3 == 0 else TransferFlags.NONE)
               for k in range(400)]
        ledger.post([t for t in trs if t.debit != t.credit])
        ids = rng.integers(0, 400, 700).astype(np.uint64)        # (0 and 301..399 are unknown)
        rows = ledger.balances(ids)
        for aid, row in zip(ids.tolist(), rows, strict=True):
            assert int(row["id"]) == aid
            if not 1 <= aid <= 300:
                assert not row["found"]
                continue
            b = ledger.balance(aid)
            assert row["found"] and (int(row["debits_posted"]), int(row["credits_posted"]), int(row["debits_pending"]),
                                     int(row["credits_pending"]), int(row["available"])) == (
                b.debits_posted, b.credits_posted, b.debits_pending, b.credits_pending, b.available)
        assert rows["debits_pending"].sum() > 0 and rows["credits_posted"].sum() > 0


def test_the_head_hint_is_published_after_each_commit_and_never_fails_a_closing_store(tmp_path: Path) -> None:
    """Writers publish the head in ``head.hint`` for readers (a hint only); publishing into a hint that
    was closed (the store closing) is skipped, not an error."""
    with Ledger.open(tmp_path / "l", sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        ledger.post([Transfer(id=1, debit=1, credit=2, amount=3, at=AT)])
        st = ledger._st()
        assert st.hinted_head() == ledger.head[0] == 2
        with open(tmp_path / "l" / "head.hint", "rb") as f:
            assert int.from_bytes(f.read(8), "little") == 2
        hint = st.hint
        st.hint = mmap.mmap(-1, 8)
        st.hint.close()
        st.publish_head(3)                          # (no error)
        st.hint = hint
