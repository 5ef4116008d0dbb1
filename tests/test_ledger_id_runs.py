"""The ledger keeps the ids of transfers that a write posts with ids stepping by a constant stride (a
bulk import's) as runs, a few numbers each, instead of a table entry each: the memory a writer holds for
``exists`` does not grow with such history, and every id is still found, with its fields compared."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from loyalty_engine import Account, AccountFlags, Ledger, TransferResult
from loyalty_engine._core import ID_RUN_MIN
from loyalty_engine.types import RECORD_DTYPE

EXISTS, DIFFERENT, OK = TransferResult.EXISTS, TransferResult.EXISTS_WITH_DIFFERENT_FIELDS, TransferResult.OK


def batch(ids: np.ndarray, hi: int = 0, amount: int = 1) -> np.ndarray:
    r = np.zeros(len(ids), RECORD_DTYPE)
    r["id_lo"], r["id_hi"] = ids, hi
    r["debit"], r["credit"], r["amount"], r["at"] = 1, 2, amount, 1_700_000_000_000_000
    return r


def make(path: Path) -> Ledger:
    led = Ledger.open(path, sync="none")
    led.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0, flags=AccountFlags.NONE)])
    return led


def test_ids_of_bulk_writes_are_runs_and_are_all_found_again(tmp_path: Path) -> None:
    led = make(tmp_path / "l")
    ids = [np.arange(10, 10 + 5_000, dtype=np.uint64),                      # stride 1
           np.uint64(1 << 40) + np.uint64(256) * np.arange(3_000, dtype=np.uint64) + np.uint64(1),   # an import's
           np.arange(7, 7 + 4_000, dtype=np.uint64)]                        # another high half
    his = [0, 0, 9]
    for i, h in zip(ids, his, strict=True):
        assert (led.post_batch(batch(i, h)) == OK).all()
    st = led._state
    assert st.n_ids == 0 and st.n_runs == 3 and st.ids_in_runs == 12_000
    for rnd in range(2):         # this handle, then one that rebuilt its ids from the journal
        for i, h in zip(ids, his, strict=True):
            pick = i[[0, 1, 777, len(i) - 1]]
            assert (led.post_batch(batch(pick, h)) == EXISTS).all()
            assert (led.post_batch(batch(pick, h, amount=2)) == DIFFERENT).all()
            assert led.post_batch(batch(pick[:1] + np.uint64(rnd), h + 100))[0] == OK          # not in a run
        # between the members of a stride-256 run: a new id
        assert led.post_batch(batch(ids[1][:1] + np.uint64(128 + rnd)))[0] == OK
        assert led._state.n_ids < 40          # the ids looked up, and the single posts
        led.close()
        led = Ledger.open(tmp_path / "l", sync="none")
        led.post_batch(batch(np.array([2**63], np.uint64)))           # the first write rebuilds the ids
        assert led._state.n_runs == 3 and led._state.ids_in_runs == 12_000
    assert led.verify().ok
    led.close()


def test_a_batch_repeating_an_id_of_a_run_it_broke_off(tmp_path: Path) -> None:
    """A run that ends inside the batch (a failed transfer breaks it) is still seen by the batch's later
    transfers: the repeat answers exists (found by the state machine)."""
    led = make(tmp_path / "l")
    n = ID_RUN_MIN + 13
    r = batch(np.arange(1_000, 1_000 + n, dtype=np.uint64))
    r["amount"][ID_RUN_MIN + 9: ID_RUN_MIN + 12] = 0           # refused: the run breaks off before them
    again = r[[8, 8, ID_RUN_MIN + 12]].copy()
    again["amount"][1] = 5
    got = led.post_batch(np.concatenate([r, again]))
    assert got[:ID_RUN_MIN + 9].tolist() == [OK] * (ID_RUN_MIN + 9)
    assert got[ID_RUN_MIN + 9: ID_RUN_MIN + 12].tolist() == [TransferResult.AMOUNT_MUST_BE_POSITIVE] * 3
    assert got[n:].tolist() == [EXISTS, DIFFERENT, EXISTS]
    assert led._state.n_runs == 1 and led._state.n_ids == 1     # the run, and the one after the break
    led.close()


def test_short_runs_and_scattered_ids_go_to_the_table(tmp_path: Path) -> None:
    led = make(tmp_path / "l")
    rng = np.random.default_rng(1)
    scattered = rng.choice(1 << 60, 500, replace=False).astype(np.uint64) + np.uint64(1)
    short = np.arange(5, 5 + ID_RUN_MIN - 1, dtype=np.uint64) + np.uint64(1 << 61)
    assert (led.post_batch(batch(scattered)) == OK).all() and (led.post_batch(batch(short)) == OK).all()
    assert led._state.n_runs == 0 and led._state.n_ids == 500 + ID_RUN_MIN - 1
    assert (led.post_batch(batch(np.concatenate([short, scattered]))) == EXISTS).all()
    led.close()


def test_a_snapshot_holds_the_state_twice_at_most(tmp_path: Path) -> None:
    """Writing a snapshot holds the exported state and the value built from it, not also a copy of each
    array and their join (an import's snapshot of 2 M accounts took 260 MB more)."""
    import tracemalloc

    led = Ledger.open(tmp_path / "l", sync="none")
    led.create_accounts_batch(np.arange(1, 200_001, dtype=np.uint64))
    size = sum(a.nbytes for a in led._state.export().values())
    tracemalloc.start()
    try:
        led._write_snapshot()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert size > 10 << 20 and peak < 2.5 * size, (peak >> 20, size >> 20)
    led.close()
    with Ledger.open(tmp_path / "l", sync="none") as again:
        assert again.verify().ok and again.balance(200_000).available == 0
