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

