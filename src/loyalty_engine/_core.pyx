# cython: language_level=3
"""Compiled kernels of loyalty_engine.

The ledger's in-memory state (accounts, balances, lots, holds, seen transfer ids) lives in
:class:`State`, whose arrays are NumPy buffers grown from Python and read by kernels that hold no
Python objects in their loops. Everything that talks to a person (errors, names, LMDB, Arrow) is in the
Python modules; the kernels return counts and status codes.
"""

cimport cython
from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t, uint16_t, uint8_t, INT64_MAX
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE

import mmap

import numpy as np

HUGE_TABLE = 4 << 20

# ---------------------------------------------------------------------------------------------------
# Records (must match types.RECORD_DTYPE and types.ACCOUNT_RECORD_DTYPE)

cdef packed struct TRec:
    uint64_t id_lo
    uint64_t id_hi
    uint64_t debit
    uint64_t credit
    int64_t amount
    uint64_t related_lo
    uint64_t related_hi
    uint64_t user_data
    int64_t at
    int64_t expires_at
    int64_t timeout
    uint64_t fp
    uint32_t asset
    uint16_t code
    uint16_t flags

cdef packed struct Slot:
    # one account: balances and lot list head share a cache line
    int64_t dp
    int64_t cp
    int64_t dpend
    int64_t cpend
    uint64_t id
    uint64_t user
    uint32_t asset
    uint32_t flags
    int32_t lot_head
    int32_t lot_tail

SLOT_DTYPE = np.dtype([("dp", "<i8"), ("cp", "<i8"), ("dpend", "<i8"), ("cpend", "<i8"), ("id", "<u8"),
                       ("user", "<u8"), ("asset", "<u4"), ("flags", "<u4"), ("lot_head", "<i4"),
                       ("lot_tail", "<i4")])

cdef packed struct Lot:
    # one lot: what a debit reads and writes shares a cache line (two lots a line)
    int64_t exp
    int64_t amt
    int32_t next
    int32_t pad
    int64_t pad2

LOT_DTYPE = np.dtype([("exp", "<i8"), ("amt", "<i8"), ("next", "<i4"), ("pad", "<i4"), ("pad2", "<i8")])

cdef packed struct AccEntry:
    uint64_t key
    int64_t slot

cdef packed struct IdEntry:
    uint64_t lo
    uint64_t hi
    uint64_t fp
    uint64_t pad

cdef extern from *:
    """
    #define LE_PREFETCH(p) __builtin_prefetch((const void *)(p))
    """
    void LE_PREFETCH(const void* p) noexcept nogil

cdef packed struct ARec:
    uint64_t id
    uint64_t user_data
    uint32_t asset
    uint16_t flags
    uint16_t op

# Transfer flags
DEF PF_FAR = 32
DEF PF_NEAR = 16
DEF PF_LOTS = 6
DEF F_LINKED = 1
DEF F_PENDING = 2
DEF F_POST = 4
DEF F_VOID = 8
DEF F_SYSTEM = 32768
# Account flags
DEF A_DMNEC = 1
DEF A_CMNED = 2
DEF A_CLOSED = 4
# Transfer results (types.TransferResult)
DEF R_OK = 0
DEF R_LINKED_EVENT_FAILED = 1
DEF R_LINKED_EVENT_CHAIN_OPEN = 2
DEF R_EXISTS = 3
DEF R_EXISTS_DIFFERENT = 4
DEF R_ID_ZERO = 5
DEF R_ACCOUNTS_MUST_DIFFER = 6
DEF R_AMOUNT_MUST_BE_POSITIVE = 7
DEF R_ASSET_MISMATCH = 8
DEF R_ACCOUNT_NOT_FOUND = 9
DEF R_ACCOUNT_CLOSED = 10
DEF R_EXCEEDS_CREDITS = 11
DEF R_EXCEEDS_DEBITS = 12
DEF R_PENDING_NOT_FOUND = 13
DEF R_PENDING_EXPIRED = 14
DEF R_PENDING_ALREADY_POSTED = 15
DEF R_PENDING_ALREADY_VOIDED = 16
DEF R_PENDING_AMOUNT_EXCEEDED = 17
DEF R_FLAGS_EXCLUSIVE = 18
DEF R_PENDING_ID_REQUIRED = 19
DEF R_TIMEOUT_RESERVED = 20
DEF R_PENDING_FIELDS_DIFFER = 21
DEF R_EXPIRY_NOT_AFTER_EVENT = 22
DEF R_OVERFLOW = 23
# Account results (types.AccountResult)
DEF AR_OK = 0
DEF AR_EXISTS = 1
DEF AR_EXISTS_DIFFERENT = 2
DEF AR_ID_ZERO = 3
DEF AR_FLAGS_EXCLUSIVE = 4
# Hold states
DEF P_PENDING = 0
DEF P_POSTED = 1
DEF P_VOIDED = 2
DEF P_EXPIRED = 3


RECORD_SIZE = sizeof(TRec)
ACCOUNT_RECORD_SIZE = sizeof(ARec)


cdef object _RECORD_DTYPE = None


cdef inline int _check_records(object arr, str name) except -1:
    """Raise unless ``arr`` is a RECORD_DTYPE array (identity first: the common case costs nothing)."""
    global _RECORD_DTYPE
    if _RECORD_DTYPE is None:
        from .types import RECORD_DTYPE
        _RECORD_DTYPE = RECORD_DTYPE
    dt = getattr(arr, "dtype", None)
    if dt is not _RECORD_DTYPE and dt != _RECORD_DTYPE:
        raise TypeError(f"{name} must be a RECORD_DTYPE array, not {dt!r}")
    return 0


cdef inline uint64_t mix64(uint64_t x) noexcept nogil:
    # splitmix64 finaliser: a good spread for open addressing and fingerprints
    x ^= x >> 30
    x *= <uint64_t>0xbf58476d1ce4e5b9
    x ^= x >> 27
    x *= <uint64_t>0x94d049bb133111eb
    x ^= x >> 31
    return x


cdef inline uint64_t hash128(uint64_t lo, uint64_t hi) noexcept nogil:
    return mix64(lo ^ mix64(hi + <uint64_t>0x9e3779b97f4a7c15))


cdef inline uint64_t fingerprint(const TRec* r) noexcept nogil:
    """A 64-bit digest of every field the host submitted (not the id)."""
    cdef uint64_t h = <uint64_t>0x243f6a8885a308d3
    h = mix64(h ^ r.debit)
    h = mix64(h ^ r.credit)
    h = mix64(h ^ <uint64_t>r.amount)
    h = mix64(h ^ r.related_lo)
    h = mix64(h ^ r.related_hi)
    h = mix64(h ^ r.user_data)
    h = mix64(h ^ <uint64_t>r.at)
    h = mix64(h ^ <uint64_t>r.expires_at)
    h = mix64(h ^ <uint64_t>r.timeout)
    h = mix64(h ^ ((<uint64_t>r.asset << 32) | (<uint64_t>r.code << 16) | r.flags))
    return h


def fingerprints(const TRec[::1] recs):
    """The fingerprint of each record's submitted fields (uint64 array)."""
    cdef Py_ssize_t i, n = recs.shape[0]
    out = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] o = out
    with nogil:
        for i in range(n):
            o[i] = fingerprint(&recs[i])
    return out


# ---------------------------------------------------------------------------------------------------
# A growable scratch buffer of int64 for undo logs (C memory, no Python in the loop)

cdef struct Buf:
    int64_t* data
    Py_ssize_t n
    Py_ssize_t cap

cdef inline int buf_push(Buf* b, int64_t v) noexcept nogil:
    cdef int64_t* p
    if b.n == b.cap:
        b.cap = b.cap * 2 if b.cap else 256
        p = <int64_t*>realloc(b.data, b.cap * sizeof(int64_t))
        if p == NULL:
            return -1
        b.data = p
    b.data[b.n] = v
    b.n += 1
    return 0


def _zeros_aligned(Py_ssize_t n, dtype, Py_ssize_t align=64):
    """np.zeros(n, dtype) starting on a cache-line boundary (NumPy only promises 16 bytes, and a
    64-byte slot that straddles two lines costs two memory round trips instead of one)."""
    dt = np.dtype(dtype)
    cdef Py_ssize_t size = n * dt.itemsize
    if size >= HUGE_TABLE:
        # big tables are probed at random: ask for 2 MiB pages (fewer TLB misses and page faults);
        # anonymous maps are zeroed and page-aligned
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # shared maps get no THP
        if hasattr(mmap, "MADV_HUGEPAGE"):
            try:
                m.madvise(mmap.MADV_HUGEPAGE)
            except OSError:
                pass
        return np.frombuffer(m, dtype=dt, count=n)
    raw = np.zeros(size + align, dtype=np.uint8)
    cdef Py_ssize_t off = (-raw.ctypes.data) % align
    return raw[off:off + size].view(dt)


@cython.final
cdef class State:
    """Accounts, balances, lots, holds and (optionally) seen transfer ids, in NumPy buffers."""

    # account hash: id -> slot
    cdef public object _acc_arr
    cdef AccEntry[::1] acc
    cdef uint64_t acc_mask
    # per slot
    cdef public object _slots
    cdef Slot[::1] sl
    cdef public Py_ssize_t n_accounts
    # lot pool: singly linked lists sorted by expiry
    cdef public object _lots_arr
    cdef Lot[::1] lots_
    cdef public int32_t lot_free
    cdef public Py_ssize_t lot_cap, lots_in_use
    # holds
    cdef public object _p_keys_lo, _p_keys_hi, _p_vals
    cdef uint64_t[::1] p_keys_lo, p_keys_hi
    cdef int32_t[::1] p_vals
    cdef uint64_t p_mask
    cdef public object _p_id_lo, _p_id_hi, _p_dslot, _p_cslot, _p_amount, _p_asset, _p_deadline
    cdef public object _p_expires, _p_state, _p_code
    cdef uint64_t[::1] p_id_lo, p_id_hi
    cdef int32_t[::1] p_dslot, p_cslot
    cdef int64_t[::1] p_amount, p_deadline, p_expires
    cdef uint32_t[::1] p_asset
    cdef uint16_t[::1] p_code
    cdef uint8_t[::1] p_state
    cdef public Py_ssize_t n_pending
    # seen transfer ids (only for handles that write)
    cdef public object _ids_arr
    cdef IdEntry[::1] ids
    cdef uint64_t t_mask
    cdef public Py_ssize_t n_ids
    cdef public bint ids_enabled

    def __init__(self):
        self.n_accounts = 0
        self.n_pending = 0
        self.n_ids = 0
        self.ids_enabled = False
        self._ids_arr = None
        self.lot_free = -1
        self.lot_cap = 0
        self.lots_in_use = 0
        self._alloc_accounts(1024)
        self._alloc_account_hash(2048)
        self._alloc_lots(1024)
        self._alloc_pending(64)
        self._alloc_pending_hash(128)

    # -- allocation ---------------------------------------------------------------------------
    def _alloc_accounts(self, Py_ssize_t cap):
        new = _zeros_aligned(cap, SLOT_DTYPE)
        new["lot_head"] = -1
        new["lot_tail"] = -1
        old = getattr(self, "_slots", None)
        if old is not None and self.n_accounts:
            new[:self.n_accounts] = old[:self.n_accounts]
        self._slots = new
        self.sl = new

    def _alloc_account_hash(self, Py_ssize_t cap):
        self._acc_arr = _zeros_aligned(cap, [("key", "<u8"), ("slot", "<i8")])
        self.acc = self._acc_arr
        self.acc_mask = cap - 1
        cdef Py_ssize_t i
        for i in range(self.n_accounts):
            self._acc_insert(self.sl[i].id, <int32_t>i)

    def _alloc_lots(self, Py_ssize_t cap):
        cdef Py_ssize_t old = self.lot_cap, i
        arr = _zeros_aligned(cap, LOT_DTYPE)
        if old:
            arr[:old] = self._lots_arr[:old]
        self._lots_arr = arr
        self.lots_ = arr
        # chain the new nodes into the free list
        for i in range(cap - 1, old - 1, -1):
            self.lots_[i].next = self.lot_free
            self.lot_free = <int32_t>i
        self.lot_cap = cap

    def _alloc_pending(self, Py_ssize_t cap):
        n = self.n_pending

        def grow(old, dtype):
            new = np.zeros(cap, dtype=dtype)
            if old is not None and n:
                new[:n] = old[:n]
            return new

        self._p_id_lo = grow(getattr(self, "_p_id_lo", None), np.uint64)
        self._p_id_hi = grow(getattr(self, "_p_id_hi", None), np.uint64)
        self._p_dslot = grow(getattr(self, "_p_dslot", None), np.int32)
        self._p_cslot = grow(getattr(self, "_p_cslot", None), np.int32)
        self._p_amount = grow(getattr(self, "_p_amount", None), np.int64)
        self._p_asset = grow(getattr(self, "_p_asset", None), np.uint32)
        self._p_deadline = grow(getattr(self, "_p_deadline", None), np.int64)
        self._p_expires = grow(getattr(self, "_p_expires", None), np.int64)
        self._p_state = grow(getattr(self, "_p_state", None), np.uint8)
        self._p_code = grow(getattr(self, "_p_code", None), np.uint16)
        self.p_id_lo = self._p_id_lo
        self.p_id_hi = self._p_id_hi
        self.p_dslot = self._p_dslot
        self.p_cslot = self._p_cslot
        self.p_amount = self._p_amount
        self.p_asset = self._p_asset
        self.p_deadline = self._p_deadline
        self.p_expires = self._p_expires
        self.p_state = self._p_state
        self.p_code = self._p_code

    def _alloc_pending_hash(self, Py_ssize_t cap):
        self._p_keys_lo = np.zeros(cap, dtype=np.uint64)
        self._p_keys_hi = np.zeros(cap, dtype=np.uint64)
        self._p_vals = np.full(cap, -1, dtype=np.int32)
        self.p_keys_lo = self._p_keys_lo
        self.p_keys_hi = self._p_keys_hi
        self.p_vals = self._p_vals
        self.p_mask = cap - 1
        cdef Py_ssize_t i
        for i in range(self.n_pending):
            self._p_insert(self.p_id_lo[i], self.p_id_hi[i], <int32_t>i)

    def _alloc_ids(self, Py_ssize_t cap):
        old = self._ids_arr
        self._ids_arr = _zeros_aligned(cap, [("lo", "<u8"), ("hi", "<u8"), ("fp", "<u8"), ("pad", "<u8")])
        self.ids = self._ids_arr
        self.t_mask = cap - 1
        self.n_ids = 0
        cdef IdEntry[::1] o
        cdef Py_ssize_t i, n
        if old is not None:
            o = old
            n = o.shape[0]
            with nogil:
                # the old table is read in order; the new buckets are prefetched ahead, so the
                # scattered writes overlap instead of waiting on memory one at a time
                for i in range(n):
                    if i + PF_FAR < n and (o[i + PF_FAR].lo != 0 or o[i + PF_FAR].hi != 0):
                        LE_PREFETCH(&self.ids[hash128(o[i + PF_FAR].lo, o[i + PF_FAR].hi) & self.t_mask])
                    if o[i].lo != 0 or o[i].hi != 0:
                        self._id_insert(o[i].lo, o[i].hi, o[i].fp)

    cpdef reserve(self, Py_ssize_t accounts=0, Py_ssize_t transfers=0):
        """Grow every table so that ``accounts`` more accounts and ``transfers`` more transfers fit."""
        cdef Py_ssize_t need, cap
        need = self.n_accounts + accounts
        if need > self._slots.shape[0]:
            cap = self._slots.shape[0]
            while cap < need:
                cap *= 2
            self._alloc_accounts(cap)
        if need * 2 > self._acc_arr.shape[0]:
            cap = self._acc_arr.shape[0]
            while cap < need * 2:
                cap *= 2
            self._alloc_account_hash(cap)
        if transfers:
            # each transfer adds at most one lot and one hold
            if self.lots_in_use + transfers > self.lot_cap:
                cap = max(self.lot_cap, 1024)
                while cap < self.lots_in_use + transfers:
                    cap *= 2
                self._alloc_lots(cap)
            need = self.n_pending + transfers
            if need > self._p_id_lo.shape[0]:
                cap = self._p_id_lo.shape[0]
                while cap < need:
                    cap *= 2
                self._alloc_pending(cap)
            if need * 2 > self._p_keys_lo.shape[0]:
                cap = self._p_keys_lo.shape[0]
                while cap < need * 2:
                    cap *= 2
                self._alloc_pending_hash(cap)
            if self.ids_enabled:
                need = self.n_ids + transfers
                if need * 2 > self._ids_arr.shape[0]:
                    cap = self._ids_arr.shape[0]
                    while cap < need * 2:
                        cap *= 4  # the id table only grows: rehash it less often
                    self._alloc_ids(cap)

    def enable_ids(self, Py_ssize_t expected=0):
        """Start tracking seen transfer ids (for idempotency); the caller then feeds the journal."""
        cdef Py_ssize_t cap = 1024
        while cap < expected * 2:
            cap *= 2
        self._ids_arr = None
        self._alloc_ids(cap)
        self.ids_enabled = True

    # -- hash tables ---------------------------------------------------------------------------
    cdef inline int32_t _acc_find(self, uint64_t key) noexcept nogil:
        cdef uint64_t i = mix64(key) & self.acc_mask
        if key == 0:  # the empty-bucket marker: account 0 never exists
            return -1
        while True:
            if self.acc[i].key == key:
                return <int32_t>self.acc[i].slot
            if self.acc[i].key == 0:
                return -1
            i = (i + 1) & self.acc_mask

    cdef inline void _acc_insert(self, uint64_t key, int32_t slot) noexcept nogil:
        cdef uint64_t i = mix64(key) & self.acc_mask
        while self.acc[i].key != 0 and self.acc[i].key != key:
            i = (i + 1) & self.acc_mask
        self.acc[i].key = key
        self.acc[i].slot = slot

    cdef inline int32_t _p_find(self, uint64_t lo, uint64_t hi) noexcept nogil:
        cdef uint64_t i = hash128(lo, hi) & self.p_mask
        cdef int32_t p
        while True:
            if self.p_keys_lo[i] == lo and self.p_keys_hi[i] == hi and self.p_vals[i] >= 0:
                p = self.p_vals[i]
                # a hold rolled back with its linked chain may have had its index reused
                if p < self.n_pending and self.p_id_lo[p] == lo and self.p_id_hi[p] == hi:
                    return p
                return -1
            if self.p_vals[i] < 0:
                return -1
            i = (i + 1) & self.p_mask

    cdef inline void _p_insert(self, uint64_t lo, uint64_t hi, int32_t p) noexcept nogil:
        cdef uint64_t i = hash128(lo, hi) & self.p_mask
        while self.p_vals[i] >= 0 and not (self.p_keys_lo[i] == lo and self.p_keys_hi[i] == hi):
            i = (i + 1) & self.p_mask
        self.p_keys_lo[i] = lo
        self.p_keys_hi[i] = hi
        self.p_vals[i] = p

    cdef inline int _id_find(self, uint64_t lo, uint64_t hi, uint64_t* fp) noexcept nogil:
        cdef uint64_t i = hash128(lo, hi) & self.t_mask
        while True:
            if self.ids[i].lo == lo and self.ids[i].hi == hi:
                fp[0] = self.ids[i].fp
                return 1
            if self.ids[i].lo == 0 and self.ids[i].hi == 0:
                return 0
            i = (i + 1) & self.t_mask

    cdef inline void _id_insert(self, uint64_t lo, uint64_t hi, uint64_t fp) noexcept nogil:
        cdef uint64_t i = hash128(lo, hi) & self.t_mask
        while not (self.ids[i].lo == 0 and self.ids[i].hi == 0):
            if self.ids[i].lo == lo and self.ids[i].hi == hi:
                return
            i = (i + 1) & self.t_mask
        self.ids[i].lo = lo
        self.ids[i].hi = hi
        self.ids[i].fp = fp
        self.n_ids += 1

    def add_ids(self, const TRec[::1] recs):
        """Record the ids (and submitted-field fingerprints) of committed transfers."""
        cdef Py_ssize_t i, n = recs.shape[0]
        if not self.ids_enabled:
            return
        self.reserve(0, n)
        with nogil:
            for i in range(n):
                self._id_insert(recs[i].id_lo, recs[i].id_hi, recs[i].fp)

    # -- lots ----------------------------------------------------------------------------------
    cdef inline int32_t _lot_alloc(self) noexcept nogil:
        cdef int32_t k = self.lot_free
        self.lot_free = self.lots_[k].next
        self.lots_in_use += 1
        return k

    cdef inline void _lot_release(self, int32_t k) noexcept nogil:
        self.lots_[k].next = self.lot_free
        self.lot_free = k
        self.lots_in_use -= 1

    cdef inline void _lot_add(self, int32_t slot, int64_t exp, int64_t amt) noexcept nogil:
        cdef int32_t prev = -1, cur = self.sl[slot].lot_head, k
        cdef int32_t tail = self.sl[slot].lot_tail
        # the common case: a new lot expires no sooner than the last one (append or merge, O(1))
        if tail >= 0 and self.lots_[tail].exp <= exp:
            if self.lots_[tail].exp == exp:
                self.lots_[tail].amt += amt
                return
            k = self._lot_alloc()
            self.lots_[k].exp = exp
            self.lots_[k].amt = amt
            self.lots_[k].next = -1
            self.lots_[tail].next = k
            self.sl[slot].lot_tail = k
            return
        while cur >= 0 and self.lots_[cur].exp < exp:
            prev = cur
            cur = self.lots_[cur].next
        if cur >= 0 and self.lots_[cur].exp == exp:
            self.lots_[cur].amt += amt
            return
        k = self._lot_alloc()
        self.lots_[k].exp = exp
        self.lots_[k].amt = amt
        self.lots_[k].next = cur
        if prev < 0:
            self.sl[slot].lot_head = k
        else:
            self.lots_[prev].next = k
        if cur < 0:
            self.sl[slot].lot_tail = k

    cdef inline void _lot_draw(self, int32_t slot, int64_t amt) noexcept nogil:
        cdef int32_t cur = self.sl[slot].lot_head, nxt
        while cur >= 0 and amt > 0:
            if self.lots_[cur].amt > amt:
                self.lots_[cur].amt -= amt
                return
            amt -= self.lots_[cur].amt
            nxt = self.lots_[cur].next
            self._lot_release(cur)
            cur = nxt
            self.sl[slot].lot_head = cur
            if cur < 0:
                self.sl[slot].lot_tail = -1

    cdef int _lot_save(self, Buf* b, int32_t slot) noexcept nogil:
        """Push (slot, count, exp, amt, ...) then the start offset: undo record for one lot list."""
        cdef Py_ssize_t start = b.n
        cdef int32_t cur = self.sl[slot].lot_head
        cdef int64_t count = 0
        if buf_push(b, slot) or buf_push(b, 0):
            return -1
        while cur >= 0:
            if buf_push(b, self.lots_[cur].exp) or buf_push(b, self.lots_[cur].amt):
                return -1
            count += 1
            cur = self.lots_[cur].next
        b.data[start + 1] = count
        return buf_push(b, start)

    cdef void _lot_restore(self, Buf* b) noexcept nogil:
        """Undo lot changes, newest first, down to an empty buffer."""
        cdef Py_ssize_t start, j
        cdef int32_t slot, cur, nxt, prev, k
        cdef int64_t count
        while b.n > 0:
            start = b.data[b.n - 1]
            slot = <int32_t>b.data[start]
            count = b.data[start + 1]
            cur = self.sl[slot].lot_head
            while cur >= 0:
                nxt = self.lots_[cur].next
                self._lot_release(cur)
                cur = nxt
            self.sl[slot].lot_head = -1
            prev = -1
            for j in range(count):
                k = self._lot_alloc()
                self.lots_[k].exp = b.data[start + 2 + 2 * j]
                self.lots_[k].amt = b.data[start + 3 + 2 * j]
                self.lots_[k].next = -1
                if prev < 0:
                    self.sl[slot].lot_head = k
                else:
                    self.lots_[prev].next = k
                prev = k
            self.sl[slot].lot_tail = prev
            b.n = start

    # -- accounts ------------------------------------------------------------------------------
    def apply_accounts(self, ARec[::1] recs, uint8_t[::1] results, ARec[::1] out, bint replay=False):
        """Create, close or reopen accounts. Returns how many records to journal (written to ``out``);
        in replay mode returns -(i + 1) for the first record that does not apply."""
        cdef Py_ssize_t i, n = recs.shape[0], n_out = 0, failed_at = -1
        cdef int32_t slot
        cdef uint8_t r
        cdef uint16_t f
        self.reserve(n, 0)
        with nogil:
            for i in range(n):
                r = AR_OK
                f = recs[i].flags
                if recs[i].id == 0:
                    r = AR_ID_ZERO
                elif recs[i].op == 0:
                    if (f & A_DMNEC and f & A_CMNED) or f & A_CLOSED:
                        r = AR_FLAGS_EXCLUSIVE
                    else:
                        slot = self._acc_find(recs[i].id)
                        if slot >= 0:
                            if (self.sl[slot].asset == recs[i].asset
                                    and (self.sl[slot].flags & ~A_CLOSED) == f
                                    and self.sl[slot].user == recs[i].user_data):
                                r = AR_EXISTS
                            else:
                                r = AR_EXISTS_DIFFERENT
                        else:
                            slot = <int32_t>self.n_accounts
                            self.n_accounts += 1
                            self.sl[slot].id = recs[i].id
                            self.sl[slot].asset = recs[i].asset
                            self.sl[slot].flags = f
                            self.sl[slot].user = recs[i].user_data
                            self._acc_insert(recs[i].id, slot)
                else:
                    slot = self._acc_find(recs[i].id)
                    if slot < 0:
                        r = AR_ID_ZERO if replay else 255
                    elif recs[i].op == 1:
                        self.sl[slot].flags |= A_CLOSED
                    else:
                        self.sl[slot].flags &= ~A_CLOSED
                if replay:
                    if r != AR_OK:
                        failed_at = i
                        break
                else:
                    results[i] = r
                    if r == AR_OK:
                        out[n_out] = recs[i]
                        n_out += 1
        if failed_at >= 0:
            return -(failed_at + 1)
        return n_out

    def slot_of(self, uint64_t account_id):
        return self._acc_find(account_id)

    def account_row(self, uint64_t account_id):
        """(asset, flags, user_data) of an account, or None."""
        cdef int32_t s = self._acc_find(account_id)
        if s < 0:
            return None
        return (self.sl[s].asset, self.sl[s].flags, self.sl[s].user)

    def balance(self, uint64_t account_id):
        """(debits_posted, credits_posted, debits_pending, credits_pending, available) or None."""
        cdef int32_t s = self._acc_find(account_id)
        if s < 0:
            return None
        return (self.sl[s].dp, self.sl[s].cp, self.sl[s].dpend, self.sl[s].cpend,
                self.sl[s].cp - self.sl[s].dp - self.sl[s].dpend)

    def balances_into(self, const uint64_t[::1] ids, int64_t[:, ::1] out, uint8_t[::1] found):
        """Fill out[i] = (dp, cp, dpend, cpend, available) for each id; found[i] = 0 if unknown."""
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef int32_t s
        with nogil:
            for i in range(n):
                s = self._acc_find(ids[i])
                if s < 0:
                    found[i] = 0
                    out[i, 0] = 0
                    out[i, 1] = 0
                    out[i, 2] = 0
                    out[i, 3] = 0
                    out[i, 4] = 0
                else:
                    found[i] = 1
                    out[i, 0] = self.sl[s].dp
                    out[i, 1] = self.sl[s].cp
                    out[i, 2] = self.sl[s].dpend
                    out[i, 3] = self.sl[s].cpend
                    out[i, 4] = self.sl[s].cp - self.sl[s].dp - self.sl[s].dpend

    def lots(self, uint64_t account_id):
        """[(expires_at, remaining), ...] of an account, soonest first."""
        cdef int32_t s = self._acc_find(account_id)
        if s < 0:
            return None
        out = []
        cdef int32_t cur = self.sl[s].lot_head
        while cur >= 0:
            out.append((self.lots_[cur].exp, self.lots_[cur].amt))
            cur = self.lots_[cur].next
        return out

    # -- transfers -----------------------------------------------------------------------------
    def apply(self, batch, results, out, bint replay=False):
        """Apply transfers in order, with linked chains all-or-nothing.

        ``batch`` and ``out`` are contiguous ``RECORD_DTYPE`` arrays, ``results`` a ``uint8`` array
        (ignored in replay mode). Normal mode: results[i] gets each transfer's result; the committed
        records (resolved, with the fingerprint of the submitted fields) are written to ``out``;
        returns how many. Replay mode (records already in the journal): returns the count, or
        -(i + 1) for the first record that no longer applies (a corrupt journal). Raises MemoryError
        if an undo log cannot grow.

        The arrays are taken as plain buffers (a typed struct memoryview costs microseconds to check
        its format, which is most of a one-transfer call); their dtypes are checked by size.
        """
        cdef Py_buffer bb, rb, ob
        cdef Py_ssize_t n
        _check_records(batch, "batch")
        _check_records(out, "out")
        PyObject_GetBuffer(batch, &bb, PyBUF_SIMPLE)
        try:
            n = bb.len // sizeof(TRec)
            PyObject_GetBuffer(out, &ob, PyBUF_SIMPLE | PyBUF_WRITABLE)
            try:
                if ob.len // <Py_ssize_t>sizeof(TRec) < n:
                    raise ValueError(f"out holds {ob.len // sizeof(TRec)} records, the batch {n}")
                PyObject_GetBuffer(results, &rb, PyBUF_SIMPLE | PyBUF_WRITABLE)
                try:
                    if not replay and rb.len < n:
                        raise ValueError(f"results holds {rb.len} bytes, the batch {n} records")
                    return self._apply(<const TRec*>bb.buf, n, <uint8_t*>rb.buf, <TRec*>ob.buf, replay)
                finally:
                    PyBuffer_Release(&rb)
            finally:
                PyBuffer_Release(&ob)
        finally:
            PyBuffer_Release(&bb)

    cdef object _apply(self, const TRec* batch, Py_ssize_t n, uint8_t* results, TRec* out, bint replay):
        self.reserve(0, n)
        cdef Py_ssize_t i, j, chain_start = 0, chain_out = 0, n_out = 0, chain_pending = 0
        cdef Py_ssize_t failed_at = -1
        cdef bint in_chain = False, chain_failed = False
        cdef uint8_t r
        cdef int rc = 0
        cdef int32_t k
        cdef Buf bal_undo, lot_undo, pend_undo
        bal_undo.data = NULL; bal_undo.n = 0; bal_undo.cap = 0
        lot_undo.data = NULL; lot_undo.n = 0; lot_undo.cap = 0
        pend_undo.data = NULL; pend_undo.n = 0; pend_undo.cap = 0
        # Accounts cannot appear during a transfer batch, so every debit and credit is resolved to its
        # slot up front: independent hash probes that the prefetcher overlaps, and exact addresses to
        # prefetch in the second pass (memory latency, not arithmetic, is the cost at a million accounts).
        cdef int32_t* slots = <int32_t*>malloc((2 * n + 1) * sizeof(int32_t))
        if slots == NULL:
            raise MemoryError("ledger kernel: no memory for the slot table")
        try:
            with nogil:
                for i in range(n):
                    if i + PF_FAR < n:
                        LE_PREFETCH(&self.acc[mix64(batch[i + PF_FAR].debit) & self.acc_mask])
                        LE_PREFETCH(&self.acc[mix64(batch[i + PF_FAR].credit) & self.acc_mask])
                        if self.ids_enabled:
                            LE_PREFETCH(&self.ids[hash128(batch[i + PF_FAR].id_lo, batch[i + PF_FAR].id_hi)
                                                  & self.t_mask])
                    slots[2 * i] = self._acc_find(batch[i].debit)
                    slots[2 * i + 1] = self._acc_find(batch[i].credit)
                for i in range(n):
                    if i + PF_NEAR < n:
                        j = 2 * (i + PF_NEAR)
                        if slots[j] >= 0:
                            LE_PREFETCH(&self.sl[slots[j]])
                        if slots[j + 1] >= 0:
                            LE_PREFETCH(&self.sl[slots[j + 1]])
                        if self.ids_enabled:
                            LE_PREFETCH(&self.ids[hash128(batch[i + PF_NEAR].id_lo, batch[i + PF_NEAR].id_hi)
                                                  & self.t_mask])
                    if i + PF_LOTS < n:
                        # the slots prefetched PF_NEAR - PF_LOTS transfers ago are in cache by now:
                        # fetch the lot a debit draws from (the head) and one a credit joins (the tail)
                        j = 2 * (i + PF_LOTS)
                        if slots[j] >= 0 and self.sl[slots[j]].lot_head >= 0:
                            k = self.sl[slots[j]].lot_head
                            LE_PREFETCH(&self.lots_[k])
                        if slots[j + 1] >= 0 and self.sl[slots[j + 1]].lot_tail >= 0:
                            k = self.sl[slots[j + 1]].lot_tail
                            LE_PREFETCH(&self.lots_[k])
                    if not in_chain:
                        chain_start = i
                        chain_out = n_out
                        chain_pending = self.n_pending
                        chain_failed = False
                        bal_undo.n = 0
                        lot_undo.n = 0
                        pend_undo.n = 0
                    in_chain = (batch[i].flags & F_LINKED) != 0
                    if chain_failed:
                        r = R_LINKED_EVENT_FAILED
                    else:
                        r = self._apply_one(&batch[i], slots[2 * i], slots[2 * i + 1], &out[n_out], replay,
                                            (in_chain or i > chain_start) and not replay,
                                            &batch[chain_start], i - chain_start,
                                            &bal_undo, &lot_undo, &pend_undo, &rc)
                        if rc:
                            break
                        if r == R_OK:
                            n_out += 1
                        elif r != R_EXISTS:
                            if replay:
                                failed_at = i
                                break
                            chain_failed = True
                            if i > chain_start or in_chain:
                                self._rollback(&bal_undo, &lot_undo, &pend_undo, chain_pending)
                                n_out = chain_out
                                for j in range(chain_start, i):
                                    results[j] = R_LINKED_EVENT_FAILED
                    if not replay:
                        results[i] = r
                    if not in_chain:
                        # chain (or single transfer) complete: remember its ids
                        if self.ids_enabled and not chain_failed:
                            for j in range(chain_out, n_out):
                                self._id_insert(out[j].id_lo, out[j].id_hi, out[j].fp)
                if rc == 0 and failed_at < 0 and in_chain and not replay:
                    # the batch ended inside a chain: the chain fails as a whole
                    if not chain_failed:
                        self._rollback(&bal_undo, &lot_undo, &pend_undo, chain_pending)
                        n_out = chain_out
                    for j in range(chain_start, n):
                        results[j] = R_LINKED_EVENT_CHAIN_OPEN
        finally:
            free(slots)
            free(bal_undo.data)
            free(lot_undo.data)
            free(pend_undo.data)
        if rc:
            raise MemoryError("ledger kernel: could not grow an undo log")
        if failed_at >= 0:
            return -(failed_at + 1)
        if replay and self.ids_enabled:
            with nogil:
                for i in range(n):
                    self._id_insert(batch[i].id_lo, batch[i].id_hi, batch[i].fp)
        return n_out

    cdef void _rollback(self, Buf* bal_undo, Buf* lot_undo, Buf* pend_undo,
                        Py_ssize_t chain_pending) noexcept nogil:
        cdef Py_ssize_t k
        cdef int32_t s
        # balances: entries of (slot, dp, cp, dpend, cpend), newest first
        k = bal_undo.n
        while k > 0:
            k -= 5
            s = <int32_t>bal_undo.data[k]
            self.sl[s].dp = bal_undo.data[k + 1]
            self.sl[s].cp = bal_undo.data[k + 2]
            self.sl[s].dpend = bal_undo.data[k + 3]
            self.sl[s].cpend = bal_undo.data[k + 4]
        bal_undo.n = 0
        self._lot_restore(lot_undo)
        # hold states changed by posts/voids: (index, old state), newest first
        k = pend_undo.n
        while k > 0:
            k -= 2
            self.p_state[pend_undo.data[k]] = <uint8_t>pend_undo.data[k + 1]
        pend_undo.n = 0
        self.n_pending = chain_pending

    cdef inline int _save_bal(self, Buf* b, int32_t s) noexcept nogil:
        if buf_push(b, s) or buf_push(b, self.sl[s].dp) or buf_push(b, self.sl[s].cp):
            return -1
        return buf_push(b, self.sl[s].dpend) or buf_push(b, self.sl[s].cpend)

    cdef uint8_t _apply_one(self, const TRec* t, int32_t ds, int32_t cs, TRec* o, bint replay, bint chained,
                            const TRec* chain, Py_ssize_t n_chain_before,
                            Buf* bal_undo, Buf* lot_undo, Buf* pend_undo, int* rc) noexcept nogil:
        cdef uint16_t f = t.flags
        cdef uint16_t kind = f & (F_PENDING | F_POST | F_VOID)
        cdef uint64_t fp, seen_fp
        cdef int32_t p
        cdef int64_t amount, held
        cdef Py_ssize_t j
        cdef bint system = (f & F_SYSTEM) != 0
        if t.id_lo == 0 and t.id_hi == 0:
            return R_ID_ZERO
        if kind != 0 and kind != F_PENDING and kind != F_POST and kind != F_VOID:
            return R_FLAGS_EXCLUSIVE
        if replay:
            fp = t.fp
        else:
            fp = fingerprint(t)
            if self.ids_enabled:
                if self._id_find(t.id_lo, t.id_hi, &seen_fp):
                    return R_EXISTS if seen_fp == fp else R_EXISTS_DIFFERENT
                for j in range(n_chain_before):
                    if chain[j].id_lo == t.id_lo and chain[j].id_hi == t.id_hi:
                        return R_EXISTS if fingerprint(&chain[j]) == fp else R_EXISTS_DIFFERENT
        if kind == F_POST or kind == F_VOID:
            if t.related_lo == 0 and t.related_hi == 0:
                return R_PENDING_ID_REQUIRED
            p = self._p_find(t.related_lo, t.related_hi)
            if p < 0:
                return R_PENDING_NOT_FOUND
            if self.p_state[p] == P_POSTED:
                return R_PENDING_ALREADY_POSTED
            if self.p_state[p] == P_VOIDED:
                return R_PENDING_ALREADY_VOIDED
            if self.p_state[p] == P_EXPIRED or (not system and self.p_deadline[p] <= t.at):
                return R_PENDING_EXPIRED
            ds = self.p_dslot[p]
            cs = self.p_cslot[p]
            held = self.p_amount[p]
            if ((t.debit != 0 and t.debit != self.sl[ds].id)
                    or (t.credit != 0 and t.credit != self.sl[cs].id)
                    or (t.asset != 0 and t.asset != self.p_asset[p])
                    or t.timeout != 0
                    or (kind == F_VOID and t.amount != 0 and t.amount != held)):
                return R_PENDING_FIELDS_DIFFER
            if t.amount < 0:
                return R_AMOUNT_MUST_BE_POSITIVE
            amount = held if t.amount == 0 else t.amount
            if amount > held:
                return R_PENDING_AMOUNT_EXCEEDED
            if kind == F_POST and not system and (
                    (self.sl[ds].flags & A_CLOSED) or (self.sl[cs].flags & A_CLOSED)):
                return R_ACCOUNT_CLOSED
            if kind == F_POST and (self.sl[ds].dp > INT64_MAX - amount or self.sl[cs].cp > INT64_MAX - amount):
                return R_OVERFLOW
            # apply
            if chained:
                if (self._save_bal(bal_undo, ds) or self._save_bal(bal_undo, cs)
                        or buf_push(pend_undo, p) or buf_push(pend_undo, self.p_state[p])):
                    rc[0] = -1
                    return R_OK
                if kind == F_POST and (self._lot_save(lot_undo, ds) or (
                        self.p_expires[p] != 0 and self._lot_save(lot_undo, cs))):
                    rc[0] = -1
                    return R_OK
            self.sl[ds].dpend -= held
            self.sl[cs].cpend -= held
            if kind == F_POST:
                self.sl[ds].dp += amount
                self.sl[cs].cp += amount
                self._lot_draw(ds, amount)
                if self.p_expires[p] != 0:
                    self._lot_add(cs, self.p_expires[p], amount)
                self.p_state[p] = P_POSTED
            else:
                self.p_state[p] = P_EXPIRED if system else P_VOIDED
                amount = held
            o[0] = t[0]
            o.debit = self.sl[ds].id
            o.credit = self.sl[cs].id
            o.asset = self.p_asset[p]
            o.amount = amount
            o.expires_at = self.p_expires[p]
            o.fp = fp
            return R_OK
        # plain or pending
        if t.timeout != 0 and kind != F_PENDING:
            return R_TIMEOUT_RESERVED
        if t.timeout < 0:
            return R_TIMEOUT_RESERVED
        if t.amount <= 0:
            return R_AMOUNT_MUST_BE_POSITIVE
        if t.debit == t.credit:
            return R_ACCOUNTS_MUST_DIFFER
        if t.expires_at != 0 and t.expires_at <= t.at:
            return R_EXPIRY_NOT_AFTER_EVENT
        if ds < 0 or cs < 0:  # resolved by apply()
            return R_ACCOUNT_NOT_FOUND
        if not system and ((self.sl[ds].flags & A_CLOSED) or (self.sl[cs].flags & A_CLOSED)):
            return R_ACCOUNT_CLOSED
        if self.sl[ds].asset != t.asset or self.sl[cs].asset != t.asset:
            return R_ASSET_MISMATCH
        amount = t.amount
        if (self.sl[ds].flags & A_DMNEC) and (
                self.sl[ds].dp + self.sl[ds].dpend > self.sl[ds].cp - amount):
            return R_EXCEEDS_CREDITS
        if (self.sl[cs].flags & A_CMNED) and (
                self.sl[cs].cp + self.sl[cs].cpend > self.sl[cs].dp - amount):
            return R_EXCEEDS_DEBITS
        if kind == F_PENDING:
            if self.sl[ds].dpend > INT64_MAX - amount or self.sl[cs].cpend > INT64_MAX - amount:
                return R_OVERFLOW
        elif self.sl[ds].dp > INT64_MAX - amount or self.sl[cs].cp > INT64_MAX - amount:
            return R_OVERFLOW
        if chained:
            if self._save_bal(bal_undo, ds) or self._save_bal(bal_undo, cs):
                rc[0] = -1
                return R_OK
            if kind != F_PENDING and (self._lot_save(lot_undo, ds) or (
                    t.expires_at != 0 and self._lot_save(lot_undo, cs))):
                rc[0] = -1
                return R_OK
        if kind == F_PENDING:
            self.sl[ds].dpend += amount
            self.sl[cs].cpend += amount
            p = <int32_t>self.n_pending
            self.n_pending += 1
            self.p_id_lo[p] = t.id_lo
            self.p_id_hi[p] = t.id_hi
            self.p_dslot[p] = ds
            self.p_cslot[p] = cs
            self.p_amount[p] = amount
            self.p_asset[p] = t.asset
            self.p_code[p] = t.code
            self.p_deadline[p] = t.at + t.timeout if t.timeout > 0 else INT64_MAX
            if t.timeout > 0 and t.at > INT64_MAX - t.timeout:
                self.p_deadline[p] = INT64_MAX
            self.p_expires[p] = t.expires_at
            self.p_state[p] = P_PENDING
            self._p_insert(t.id_lo, t.id_hi, p)
        else:
            self.sl[ds].dp += amount
            self.sl[cs].cp += amount
            self._lot_draw(ds, amount)
            if t.expires_at != 0:
                self._lot_add(cs, t.expires_at, amount)
        o[0] = t[0]
        o.fp = fp
        return R_OK

    # -- expiry --------------------------------------------------------------------------------
    def expiry_records(self, int64_t at, uint64_t sink_id, uint16_t code):
        """Records (not yet applied) that expire every lot ended by ``at`` on accounts of the sink's
        asset, and release every hold whose time-out ended by ``at``. Ids are left for the caller."""
        cdef int32_t sink = self._acc_find(sink_id)
        if sink < 0:
            raise KeyError(sink_id)
        cdef uint32_t asset = self.sl[sink].asset
        cdef Py_ssize_t s, p, n = 0, k = 0
        cdef int32_t cur
        cdef int64_t due, avail
        # count, allocate, fill
        for s in range(self.n_accounts):
            if s != sink and self.sl[s].asset == asset and self.sl[s].lot_head >= 0 \
                    and self.lots_[self.sl[s].lot_head].exp <= at:
                n += 1
        for p in range(self.n_pending):
            if self.p_state[p] == P_PENDING and self.p_deadline[p] <= at:
                n += 1
        from .types import RECORD_DTYPE
        recs = np.zeros(n, dtype=RECORD_DTYPE)
        if n == 0:
            return recs
        cdef TRec[::1] r = recs
        for s in range(self.n_accounts):
            if s == sink or self.sl[s].asset != asset or self.sl[s].lot_head < 0:
                continue
            cur = self.sl[s].lot_head
            due = 0
            while cur >= 0 and self.lots_[cur].exp <= at:
                due += self.lots_[cur].amt
                cur = self.lots_[cur].next
            if due == 0:
                continue
            if self.sl[s].flags & A_DMNEC:
                avail = self.sl[s].cp - self.sl[s].dp - self.sl[s].dpend
                if due > avail:
                    due = avail if avail > 0 else 0
            if due <= 0:
                continue
            r[k].debit = self.sl[s].id
            r[k].credit = sink_id
            r[k].amount = due
            r[k].asset = asset
            r[k].code = code
            r[k].at = at
            r[k].flags = F_SYSTEM
            k += 1
        for p in range(self.n_pending):
            if self.p_state[p] == P_PENDING and self.p_deadline[p] <= at:
                r[k].related_lo = self.p_id_lo[p]
                r[k].related_hi = self.p_id_hi[p]
                r[k].debit = self.sl[self.p_dslot[p]].id
                r[k].credit = self.sl[self.p_cslot[p]].id
                r[k].asset = self.p_asset[p]
                r[k].amount = self.p_amount[p]
                r[k].code = self.p_code[p]
                r[k].at = at
                r[k].flags = F_SYSTEM | F_VOID
                k += 1
        return recs[:k]

    # -- snapshot ------------------------------------------------------------------------------
    def export(self):
        """The state as a dict of NumPy arrays (copies), lots in list order."""
        cdef Py_ssize_t n = self.n_accounts, s, k = 0
        cdef int32_t cur
        lot_slot = np.empty(self.lots_in_use, dtype=np.int32)
        lot_exp = np.empty(self.lots_in_use, dtype=np.int64)
        lot_amt = np.empty(self.lots_in_use, dtype=np.int64)
        cdef int32_t[::1] ls = lot_slot
        cdef int64_t[::1] le = lot_exp, la = lot_amt
        for s in range(n):
            cur = self.sl[s].lot_head
            while cur >= 0:
                ls[k] = <int32_t>s
                le[k] = self.lots_[cur].exp
                la[k] = self.lots_[cur].amt
                k += 1
                cur = self.lots_[cur].next
        m = self.n_pending
        return {
            "a_id": self._slots["id"][:n].copy(), "a_asset": self._slots["asset"][:n].copy(),
            "a_flags": self._slots["flags"][:n].copy(), "a_user": self._slots["user"][:n].copy(),
            "dp": self._slots["dp"][:n].copy(), "cp": self._slots["cp"][:n].copy(),
            "dpend": self._slots["dpend"][:n].copy(), "cpend": self._slots["cpend"][:n].copy(),
            "lot_slot": lot_slot[:k], "lot_exp": lot_exp[:k], "lot_amt": lot_amt[:k],
            "p_id_lo": self._p_id_lo[:m].copy(), "p_id_hi": self._p_id_hi[:m].copy(),
            "p_dslot": self._p_dslot[:m].copy(), "p_cslot": self._p_cslot[:m].copy(),
            "p_amount": self._p_amount[:m].copy(), "p_asset": self._p_asset[:m].copy(),
            "p_deadline": self._p_deadline[:m].copy(), "p_expires": self._p_expires[:m].copy(),
            "p_state": self._p_state[:m].copy(), "p_code": self._p_code[:m].copy(),
        }

    @classmethod
    def from_export(cls, d):
        """A State rebuilt from ``export()``'s arrays (ids not tracked)."""
        cdef State st = cls()
        cdef Py_ssize_t n = len(d["a_id"]), m = len(d["p_id_lo"]), i
        cdef int32_t s, prev_slot = -1, prev = -1, k
        st.reserve(n, max(len(d["lot_slot"]), m))
        st.n_accounts = n
        sl = st._slots
        sl["id"][:n] = d["a_id"]
        sl["asset"][:n] = d["a_asset"]
        sl["flags"][:n] = d["a_flags"]
        sl["user"][:n] = d["a_user"]
        sl["dp"][:n] = d["dp"]
        sl["cp"][:n] = d["cp"]
        sl["dpend"][:n] = d["dpend"]
        sl["cpend"][:n] = d["cpend"]
        for i in range(n):
            st._acc_insert(st.sl[i].id, <int32_t>i)
        cdef const int32_t[::1] ls = np.ascontiguousarray(d["lot_slot"], dtype=np.int32)
        cdef const int64_t[::1] le = np.ascontiguousarray(d["lot_exp"], dtype=np.int64)
        cdef const int64_t[::1] la = np.ascontiguousarray(d["lot_amt"], dtype=np.int64)
        for i in range(ls.shape[0]):
            s = ls[i]
            if s < 0 or s >= n:
                raise ValueError("snapshot lot names an account slot out of range")
            k = st._lot_alloc()
            st.lots_[k].exp = le[i]
            st.lots_[k].amt = la[i]
            st.lots_[k].next = -1
            if s != prev_slot:
                st.sl[s].lot_head = k
            else:
                st.lots_[prev].next = k
            st.sl[s].lot_tail = k
            prev_slot = s
            prev = k
        st.n_pending = m
        for name in ("p_id_lo", "p_id_hi", "p_dslot", "p_cslot", "p_amount", "p_asset",
                     "p_deadline", "p_expires", "p_state", "p_code"):
            getattr(st, "_" + name)[:m] = d[name]
        for i in range(m):
            st._p_insert(st.p_id_lo[i], st.p_id_hi[i], <int32_t>i)
        return st


# ---------------------------------------------------------------------------------------------------
# Index runs: (account, locator) pairs sorted by account then locator; locator = seq << 24 | position.
# A stored run is one buffer: n (u64), n accounts, n locators (little-endian u64).

cdef uint64_t* _radix_pairs(uint64_t* k, uint64_t* v, uint64_t* k2, uint64_t* v2,
                            Py_ssize_t n) noexcept nogil:
    """Stable LSD radix sort of (k, v) pairs by k, ping-ponging with (k2, v2); bytes where every key
    agrees are skipped (account ids rarely use all eight). Returns whichever key buffer holds the
    result; its values are in the matching value buffer."""
    cdef Py_ssize_t counts[8][256]
    cdef Py_ssize_t i, d, pos, c
    cdef uint64_t x
    cdef uint64_t* tk
    cdef uint64_t* tv
    for d in range(8):
        for i in range(256):
            counts[d][i] = 0
    for i in range(n):
        x = k[i]
        for d in range(8):
            counts[d][(x >> (8 * d)) & 0xFF] += 1
    for d in range(8):
        if counts[d][(k[0] >> (8 * d)) & 0xFF] == n:
            continue  # every key has this byte: the pass would not move anything
        pos = 0
        for i in range(256):
            c = counts[d][i]
            counts[d][i] = pos
            pos += c
        for i in range(n):
            x = (k[i] >> (8 * d)) & 0xFF
            pos = counts[d][x]
            counts[d][x] = pos + 1
            k2[pos] = k[i]
            v2[pos] = v[i]
        tk = k; k = k2; k2 = tk
        tv = v; v = v2; v2 = tv
    return k


cdef object _sorted_run(uint64_t* k, uint64_t* v, uint64_t* k2, uint64_t* v2, Py_ssize_t n):
    """Sort (k, v) (scratch k2, v2) into a new stored-run buffer."""
    buf = np.empty(8 + 16 * n, dtype=np.uint8)
    cdef uint8_t[::1] b = buf
    cdef uint64_t* head = <uint64_t*>&b[0]
    cdef uint64_t* res
    head[0] = <uint64_t>n
    if n == 0:
        return buf
    with nogil:
        res = _radix_pairs(k, v, k2, v2, n)
        if res == k:
            memcpy(head + 1, k, n * sizeof(uint64_t))
            memcpy(head + 1 + n, v, n * sizeof(uint64_t))
        else:
            memcpy(head + 1, k2, n * sizeof(uint64_t))
            memcpy(head + 1 + n, v2, n * sizeof(uint64_t))
    return buf


def index_run(recs, uint64_t seq):
    """The stored index run of one journal entry: both accounts of every record, sorted."""
    cdef Py_buffer rb
    _check_records(recs, "recs")
    PyObject_GetBuffer(recs, &rb, PyBUF_SIMPLE)
    try:
        return _index_run(<const TRec*>rb.buf, rb.len // sizeof(TRec), seq)
    finally:
        PyBuffer_Release(&rb)


cdef object _index_run(const TRec* recs, Py_ssize_t n, uint64_t seq):
    cdef Py_ssize_t i, m = 2 * n
    cdef uint64_t base = seq << 24
    cdef uint64_t* scratch = <uint64_t*>malloc((4 * m + 1) * sizeof(uint64_t))
    if scratch == NULL:
        raise MemoryError("index run: no memory")
    try:
        with nogil:
            for i in range(n):
                scratch[2 * i] = recs[i].debit
                scratch[2 * i + 1] = recs[i].credit
                scratch[m + 2 * i] = base | <uint64_t>i
                scratch[m + 2 * i + 1] = base | <uint64_t>i
        return _sorted_run(scratch, scratch + m, scratch + 2 * m, scratch + 3 * m, m)
    finally:
        free(scratch)


cdef void _merge2(const uint64_t* ak, const uint64_t* av, Py_ssize_t na,
                  const uint64_t* bk, const uint64_t* bv, Py_ssize_t nb,
                  uint64_t* ok, uint64_t* ov) noexcept nogil:
    """Stable merge by key: on equal keys the left run's entry (the older journal entry) comes first."""
    cdef Py_ssize_t i = 0, j = 0, o = 0
    while i < na and j < nb:
        if bk[j] < ak[i]:
            ok[o] = bk[j]
            ov[o] = bv[j]
            j += 1
        else:
            ok[o] = ak[i]
            ov[o] = av[i]
            i += 1
        o += 1
    if i < na:
        memcpy(ok + o, ak + i, (na - i) * sizeof(uint64_t))
        memcpy(ov + o, av + i, (na - i) * sizeof(uint64_t))
    if j < nb:
        memcpy(ok + o, bk + j, (nb - j) * sizeof(uint64_t))
        memcpy(ov + o, bv + j, (nb - j) * sizeof(uint64_t))


def merge_runs(list runs):
    """Merge stored runs (buffers, in journal order, each sorted) into one stored run: pairwise
    sequential merges, log2(runs) passes."""
    cdef Py_ssize_t total = 0, at = 0, n, k = len(runs), m, w, lo, mid, hi, i
    cdef const uint8_t[::1] r
    for run in runs:
        r = run
        if r.shape[0] < 8:
            raise ValueError(f"index run of {r.shape[0]} bytes is truncated")
        total += (<const uint64_t*>&r[0])[0]
    buf = np.empty(8 + 16 * total, dtype=np.uint8)
    cdef uint8_t[::1] out = buf
    (<uint64_t*>&out[0])[0] = <uint64_t>total
    if total == 0:
        return buf
    cdef uint64_t* scratch = <uint64_t*>malloc((4 * total + 1) * sizeof(uint64_t))
    cdef Py_ssize_t* bounds = <Py_ssize_t*>malloc((k + 1) * sizeof(Py_ssize_t))
    cdef uint64_t* K = scratch
    cdef uint64_t* V = scratch + total
    cdef uint64_t* K2 = scratch + 2 * total
    cdef uint64_t* V2 = scratch + 3 * total
    cdef uint64_t* t
    if scratch == NULL or bounds == NULL:
        free(scratch)
        free(bounds)
        raise MemoryError("index merge: no memory")
    try:
        m = 0
        for run in runs:
            r = run
            n = <Py_ssize_t>(<const uint64_t*>&r[0])[0]
            if r.shape[0] != 8 + 16 * n:
                raise ValueError(f"index run of {r.shape[0]} bytes does not hold {n} entries")
            if n == 0:
                continue
            bounds[m] = at
            m += 1
            memcpy(K + at, &r[8], n * sizeof(uint64_t))
            memcpy(V + at, &r[8 + 8 * n], n * sizeof(uint64_t))
            at += n
        bounds[m] = total
        with nogil:
            while m > 1:
                w = 0
                for i in range(0, m, 2):
                    lo = bounds[i]
                    if i + 1 < m:
                        mid = bounds[i + 1]
                        hi = bounds[i + 2]
                        _merge2(K + lo, V + lo, mid - lo, K + mid, V + mid, hi - mid, K2 + lo, V2 + lo)
                    else:
                        hi = bounds[i + 1]
                        memcpy(K2 + lo, K + lo, (hi - lo) * sizeof(uint64_t))
                        memcpy(V2 + lo, V + lo, (hi - lo) * sizeof(uint64_t))
                    bounds[w] = lo
                    w += 1
                bounds[w] = total
                m = w
                t = K; K = K2; K2 = t
                t = V; V = V2; V2 = t
            memcpy(&out[8], K, total * sizeof(uint64_t))
            memcpy(&out[8 + 8 * total], V, total * sizeof(uint64_t))
        return buf
    finally:
        free(scratch)
        free(bounds)
