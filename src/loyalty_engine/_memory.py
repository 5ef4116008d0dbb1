"""Large output arrays without the huge-page stall.

NumPy asks the kernel for transparent huge pages on every allocation of 4 MB or more
(``madvise(MADV_HUGEPAGE)``). Where the kernel's THP defrag setting is ``madvise`` (a common default,
and this project's machines), the first touch of such memory may compact memory synchronously: on
these 2-core machines writing a fresh 80 MB NumPy array costs about 0.15 s, as long as generating 4
million codes. Memory mapped anonymously, without that advice, is faulted in 4 KB pages at about a
tenth of the cost. :func:`empty` gives such memory for the big outputs of the code kernels (codes,
their strings, validation results); small arrays come from NumPy as usual. :func:`small_pages` turns
NumPy's advice off for the length of a batch job (bulk import, ``purchase_batch``), whose chunks make
and drop many such arrays: a 2-million-row import went from 286 k to 346 k rows/s with it.
"""

from __future__ import annotations

import contextlib
import importlib
import mmap
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np

#: Outputs at least this big come from an anonymous mapping.
THRESHOLD = 8 << 20


def empty(shape: int | tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised C-contiguous array, from an anonymous mapping when it is big (the mapping is
    released when the array and its views are)."""
    dt = np.dtype(dtype)
    count = int(np.prod(shape))
    nbytes = count * dt.itemsize
    if nbytes < THRESHOLD:
        return np.empty(shape, dt)
    buf = mmap.mmap(-1, nbytes)
    return np.frombuffer(buf, dt, count).reshape(shape)


_advice_lock = threading.Lock()
_advice_depth = 0
_advice_saved = True


def _advice_switch() -> Any:
    """NumPy's switch for the huge-page advice (private in NumPy; None where it is missing)."""
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = importlib.import_module(mod)
        except ImportError:
            continue
        if hasattr(m, "_set_madvise_hugepage"):
            return m._set_madvise_hugepage
    return None


@contextlib.contextmanager
def small_pages() -> Iterator[None]:
    """Within the block, NumPy allocates without the huge-page advice (see above): the batch paths
    (bulk import, ``purchase_batch``) make and drop arrays of megabytes per chunk, and their first touch
    was a quarter of an import's time here. The switch is NumPy's and process-wide: other threads'
    allocations meanwhile get small pages too (a matter of speed only). Nested and concurrent blocks
    restore NumPy's setting when the last one ends."""
    global _advice_depth, _advice_saved
    switch = _advice_switch()
    if switch is None:
        yield
        return
    with _advice_lock:
        if _advice_depth == 0:
            _advice_saved = bool(switch(False))     # returns the previous setting
        _advice_depth += 1
    try:
        yield
    finally:
        with _advice_lock:
            _advice_depth -= 1
            if _advice_depth == 0:
                switch(_advice_saved)


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 1 GB for reuse instead of returning them to the
    kernel (``M_MMAP_THRESHOLD``, ``M_TRIM_THRESHOLD``). A bulk import makes and drops arrays of tens
    to hundreds of MB every chunk, and each fresh mapping is faulted in and zeroed page by page again:
    a 2-million-row import ran 5-28% faster with this (two runs each way on a busy 2-core machine).
    It changes the whole process's allocator and cannot be undone, so only the command line calls it,
    for its own process; an application embedding the engine decides for itself. Returns whether the
    setting took (False where the C library is not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 31))
