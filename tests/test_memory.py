"""Large arrays without NumPy's huge-page stall: the switch is restored however the block ends."""

from __future__ import annotations

import threading

import pytest

from loyalty_engine import _memory


def _advice() -> bool:
    switch = _memory._advice_switch()
    assert switch is not None, "this NumPy has no huge-page switch"
    before = switch(True)         # read it by setting it (NumPy returns the previous value)
    switch(before)
    return bool(before)


def test_small_pages_turns_the_advice_off_and_restores_it() -> None:
    start = _advice()
    with _memory.small_pages():
        assert _advice() is False
        with _memory.small_pages():
            assert _advice() is False
        assert _advice() is False               # the outer block is still open
    assert _advice() is start
    with pytest.raises(RuntimeError), _memory.small_pages():
        raise RuntimeError("boom")
    assert _advice() is start


def test_concurrent_blocks_restore_when_the_last_one_ends() -> None:
    start = _advice()
    inside, release = threading.Event(), threading.Event()

    def other() -> None:
        with _memory.small_pages():
            inside.set()
            release.wait(10)

    t = threading.Thread(target=other)
    t.start()
    inside.wait(10)
    with _memory.small_pages():
        pass
    assert _advice() is False                   # the other thread's block is still open
    release.set()
    t.join()
    assert _advice() is start


def test_the_command_line_keeps_freed_memory_where_the_c_library_is_glibc() -> None:
    import platform

    took = _memory.keep_freed_memory()
    assert isinstance(took, bool)
    if platform.libc_ver()[0] == "glibc":
        assert took


def _vm_flags(addr: int) -> list[str]:
    """The VmFlags of the mapping of this process that holds ``addr`` (Linux's /proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= addr < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {addr:#x}")


@pytest.mark.skipif(not hasattr(__import__("mmap"), "MADV_HUGEPAGE"), reason="no MADV_HUGEPAGE here")
def test_huge_arrays_are_zeroed_aligned_private_and_advised_even_inside_small_pages() -> None:
    import numpy as np

    with _memory.small_pages():
        a = _memory.huge((300_000, 5, 3), np.int64)          # 36 MB
    assert a.shape == (300_000, 5, 3) and a.dtype == np.int64 and a.flags.c_contiguous and a.flags.writeable
    assert not a.any()
    assert a.ctypes.data % (2 << 20) == 0                     # huge pages need 2 MB alignment
    flags = _vm_flags(a.ctypes.data)
    assert "hg" in flags                                      # madvise(MADV_HUGEPAGE)
    assert "sh" not in flags                                  # private: shared memory gets no huge pages
    a[-1, -1, -1] = 7
    assert int(a.sum()) == 7
    small = _memory.huge(1000, np.int64)                      # below the threshold: NumPy's own
    assert small.shape == (1000,) and not small.any() and small.base is None
