"""Large output arrays without the huge-page stall.

NumPy asks the kernel for transparent huge pages on every allocation of 4 MB or more
(``madvise(MADV_HUGEPAGE)``). Where the kernel's THP defrag setting is ``madvise`` (a common default,
and this project's machines), the first touch of such memory may compact memory synchronously: on
these 2-core machines writing a fresh 80 MB NumPy array costs about 0.15 s, as long as generating 4
million codes. Memory mapped anonymously, without that advice, is faulted in 4 KB pages at about a
tenth of the cost. :func:`empty` gives such memory for the big outputs of the code kernels (codes,
their strings, validation results); small arrays come from NumPy as usual.
"""

from __future__ import annotations

import mmap
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
