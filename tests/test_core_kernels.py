"""The index kernels against plain NumPy: index_run (radix sort) and merge_runs (pairwise merges)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from loyalty_engine import RECORD_DTYPE, _core


def records(debits: list[int], credits: list[int]) -> np.ndarray:
    r = np.zeros(len(debits), RECORD_DTYPE)
    r["debit"] = debits
    r["credit"] = credits
    return r


def unpack(run: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = int(run[:8].view(np.uint64)[0])
    assert len(run) == 8 + 16 * n
    return run[8: 8 + 8 * n].view(np.uint64), run[8 + 8 * n:].view(np.uint64)


def reference(entries: list[tuple[int, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    acc, loc = [], []
    for seq, r in entries:
        pos = np.arange(len(r), dtype=np.uint64)
        acc += [r["debit"], r["credit"]]
        loc += [(np.uint64(seq) << np.uint64(24)) | pos] * 2
    a = np.concatenate(acc) if acc else np.empty(0, np.uint64)
    lc = np.concatenate(loc) if loc else np.empty(0, np.uint64)
    order = np.lexsort((lc, a))
    return a[order], lc[order]


ids = st.one_of(st.integers(0, 40), st.integers(0, 2**64 - 1))
entry = st.lists(st.tuples(ids, ids), max_size=300)


@settings(max_examples=200, deadline=None)
@given(st.lists(entry, max_size=12))
def test_runs_merge_to_the_sorted_index(entries: list[list[tuple[int, int]]]) -> None:
    built = [(seq, records([d for d, _ in e], [c for _, c in e])) for seq, e in enumerate(entries, 1)]
    runs = [_core.index_run(r, seq) for seq, r in built]
    for (seq, r), run in zip(built, runs, strict=True):
        a, lc = unpack(run)
        ra, rl = reference([(seq, r)])
        assert np.array_equal(a, ra) and np.array_equal(lc, rl)
    a, lc = unpack(_core.merge_runs(runs))
    ra, rl = reference(built)
    assert np.array_equal(a, ra) and np.array_equal(lc, rl)
    if built:                   # all the entries' records sorted at once: the same run
        at = _core.index_run_entries(np.concatenate([r for _, r in built]), [seq for seq, _ in built],
                                     [len(r) for _, r in built])
        assert np.array_equal(at, _core.merge_runs(runs)) if len(runs) > 1 else np.array_equal(at, runs[0])


def test_a_damaged_run_is_refused() -> None:
    run = _core.index_run(records([1, 2], [3, 4]), 1)
    try:
        _core.merge_runs([run[:-8]])
    except ValueError as e:
        assert "does not hold" in str(e)
    else:
        raise AssertionError("a truncated run was merged")
