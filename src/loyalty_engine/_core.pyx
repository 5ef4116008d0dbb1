# cython: language_level=3
"""Compiled kernels of loyalty_engine.

The ledger's in-memory state (accounts, balances, lots, holds, seen transfer ids) lives in
:class:`State`, whose arrays are NumPy buffers grown from Python and read by kernels that hold no
Python objects in their loops. Everything that talks to a person (errors, names, LMDB, Arrow) is in the
Python modules; the kernels return counts and status codes.
"""

cimport cython
from libc.stdint cimport int64_t, uint64_t, int32_t, uint32_t, int16_t, uint16_t, int8_t, uint8_t, INT64_MAX, INT64_MIN
from loyalty_engine._mix cimport mix64
from loyalty_engine cimport _record as rec
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcmp, memcpy, memset
from cpython.exc cimport PyErr_CheckSignals
from cpython.buffer cimport PyObject_GetBuffer, PyBuffer_Release, PyBUF_SIMPLE, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_Check

import mmap

import numpy as np

HUGE_TABLE = 4 << 20
#: Consecutive committed transfers (of one journal entry) whose ids step by a constant stride are kept
#: as one run (a few numbers) instead of an entry each in the id table, when at least this many.
ID_RUN_MIN = 64
cdef Py_ssize_t _ID_RUN_MIN = ID_RUN_MIN
# A write keeps at most this many new runs (a later transfer of the same batch looks its id up in each);
# the ids of any further run of that write go to the table.
DEF RUNS_PER_WRITE = 8

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

cdef packed struct IdRun:
    # committed transfer ids hi, first, first + stride, ..., last: the records at positions pos,
    # pos + 1, ... of journal entry seq (their fingerprints are read from there when asked)
    uint64_t hi
    uint64_t first
    uint64_t last
    uint64_t stride
    int64_t seq
    int64_t pos

cdef extern from *:
    """
    #define LE_PREFETCH(p) __builtin_prefetch((const void *)(p))
    #define LE_CTZ(x) __builtin_ctzll(x)
    #define LE_MUL_OVERFLOW(a, b, r) __builtin_mul_overflow((a), (b), (r))
    """
    void LE_PREFETCH(const void* p) noexcept nogil
    int LE_CTZ(unsigned long long x) noexcept nogil
    bint LE_MUL_OVERFLOW(int64_t a, int64_t b, int64_t* r) noexcept nogil

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
        # big tables: an anonymous map (zeroed, page-aligned). Not advised onto huge pages: on this
        # project's virtual machines the first touch of fresh huge pages cost 1.4 s for 128 MB (74 ms with
        # small pages), and a 1 M-row import into a new club ran 131-135 k rows/s with the advice against
        # 172-270 k without (durable batches over 1 M members did not get slower without it)
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
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
    # ...and runs of them (see IdRun): ids_in_runs ids in n_runs runs, read back through id_source
    cdef public object _runs_arr
    cdef IdRun[::1] runs
    cdef public Py_ssize_t n_runs, ids_in_runs
    #: the journal entry the next apply() (or add_ids) writes; 0: unknown, so no run is kept. The
    #: ledger sets it before each write; apply() clears it.
    cdef public int64_t entry_seq
    #: id_source(seq, pos, id_lo, id_hi) -> the fingerprint of the committed record at position pos of
    #: entry seq (the ledger reads it from the journal); asked only for an id found in a run
    cdef public object id_source
    # the run being built: records or_pos .. or_pos + or_count - 1 of or_src
    cdef const TRec* or_src
    cdef uint64_t or_hi, or_first, or_stride
    cdef Py_ssize_t or_pos, or_count
    # runs runs_at_start .. n_runs - 1 were closed by the apply() under way, from records of w_src
    cdef Py_ssize_t runs_at_start
    cdef const TRec* w_src

    def __init__(self):
        self.n_accounts = 0
        self.n_pending = 0
        self.n_ids = 0
        self.ids_enabled = False
        self._ids_arr = None
        self._runs_arr = None
        self.n_runs = 0
        self.ids_in_runs = 0
        self.entry_seq = 0
        self.id_source = None
        self.or_src = NULL
        self.or_count = 0
        self.runs_at_start = 0
        self.w_src = NULL
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

    cpdef reserve(self, Py_ssize_t accounts=0, Py_ssize_t transfers=0, Py_ssize_t pending=-1):
        """Grow every table so that ``accounts`` more accounts and ``transfers`` more transfers fit, of
        which ``pending`` (all of them when -1) may be holds."""
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
            need = self.n_pending + (transfers if pending < 0 else pending)
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
            # the id table grows when an insert needs it (_id_put): most of a bulk write's ids end in
            # runs, not in the table

    def enable_ids(self, Py_ssize_t expected=0):
        """Start tracking seen transfer ids (for idempotency); the caller then feeds the journal."""
        cdef Py_ssize_t cap = 1024
        while cap < expected * 2:
            cap *= 2
        self._ids_arr = None
        self._alloc_ids(cap)
        self._runs_arr = np.zeros(16, [("hi", "<u8"), ("first", "<u8"), ("last", "<u8"), ("stride", "<u8"),
                                       ("seq", "<i8"), ("pos", "<i8")])
        self.runs = self._runs_arr
        self.n_runs = 0
        self.ids_in_runs = 0
        self.or_src = NULL
        self.or_count = 0
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
        """A committed id (its fingerprint in ``fp``): in the table, in the run being built, or in a
        run this write closed (the ids of a batch that are in earlier writes' runs were put in the table
        before it, by _promote)."""
        cdef uint64_t i = hash128(lo, hi) & self.t_mask, d
        cdef Py_ssize_t r
        while True:
            if self.ids[i].lo == lo and self.ids[i].hi == hi:
                fp[0] = self.ids[i].fp
                return 1
            if self.ids[i].lo == 0 and self.ids[i].hi == 0:
                break
            i = (i + 1) & self.t_mask
        if self.or_count > 0 and hi == self.or_hi and lo >= self.or_first:
            d = lo - self.or_first
            if d == 0:
                fp[0] = self.or_src[self.or_pos].fp
                return 1
            if self.or_count > 1 and d % self.or_stride == 0 and d // self.or_stride < <uint64_t>self.or_count:
                fp[0] = self.or_src[self.or_pos + <Py_ssize_t>(d // self.or_stride)].fp
                return 1
        for r in range(self.runs_at_start, self.n_runs):    # closed by this write (its records in w_src)
            if (self.runs[r].hi == hi and self.runs[r].first <= lo and lo <= self.runs[r].last
                    and (lo - self.runs[r].first) % self.runs[r].stride == 0):
                fp[0] = self.w_src[self.runs[r].pos + <Py_ssize_t>((lo - self.runs[r].first) // self.runs[r].stride)].fp
                return 1
        return 0

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

    cdef int _id_put(self, uint64_t lo, uint64_t hi, uint64_t fp) noexcept nogil:
        """Insert into the id table, growing it first when it would be more than half full."""
        cdef Py_ssize_t cap
        if (self.n_ids + 1) * 2 > self.ids.shape[0]:
            with gil:
                try:
                    cap = self._ids_arr.shape[0]
                    self._alloc_ids(cap * 4)   # the id table only grows: rehash it less often
                except BaseException:
                    return -1
        self._id_insert(lo, hi, fp)
        return 0

    cdef int _id_add(self, const TRec* src, Py_ssize_t j) noexcept nogil:
        """Remember the id of committed record ``src[j]`` (position ``j`` of the entry being written;
        records are added in position order, none twice): it extends the open run, or closes it and
        opens a new one."""
        cdef uint64_t lo = src[j].id_lo, d
        if self.or_count > 0 and src == self.or_src and j == self.or_pos + self.or_count \
                and src[j].id_hi == self.or_hi and lo > self.or_first:
            d = lo - self.or_first
            if self.or_count == 1:
                self.or_stride = d
                self.or_count = 2
                return 0
            if d % self.or_stride == 0 and d // self.or_stride == <uint64_t>self.or_count:
                self.or_count += 1
                return 0
        if self._ids_close():
            return -1
        self.or_src = src
        self.or_pos = j
        self.or_hi = src[j].id_hi
        self.or_first = lo
        self.or_stride = 0
        self.or_count = 1
        return 0

    cdef int _ids_close(self) noexcept nogil:
        """Close the open run: a long one (of a known entry) joins the runs, a short one's ids the table."""
        cdef Py_ssize_t k
        cdef IdRun* r
        if self.or_count == 0:
            return 0
        if self.or_count >= _ID_RUN_MIN and self.entry_seq > 0 and self.n_runs - self.runs_at_start < RUNS_PER_WRITE:
            if self.n_runs == self.runs.shape[0]:
                with gil:
                    try:
                        arr = np.zeros(2 * self.n_runs, self._runs_arr.dtype)
                        arr[:self.n_runs] = self._runs_arr
                        self._runs_arr = arr
                        self.runs = arr
                    except BaseException:
                        return -1
            r = &self.runs[self.n_runs]
            r.hi = self.or_hi
            r.first = self.or_first
            r.last = self.or_first + <uint64_t>(self.or_count - 1) * self.or_stride
            r.stride = self.or_stride
            r.seq = self.entry_seq
            r.pos = self.or_pos
            self.n_runs += 1
            self.ids_in_runs += self.or_count
        else:
            for k in range(self.or_pos, self.or_pos + self.or_count):
                if self._id_put(self.or_src[k].id_lo, self.or_src[k].id_hi, self.or_src[k].fp):
                    return -1
        self.or_count = 0
        self.or_src = NULL
        return 0

    cdef inline Py_ssize_t _run_find(self, uint64_t lo, uint64_t hi) noexcept nogil:
        """The stored run holding id (lo, hi), or -1."""
        cdef Py_ssize_t r
        for r in range(self.n_runs):
            if (self.runs[r].hi == hi and self.runs[r].first <= lo and lo <= self.runs[r].last
                    and (lo - self.runs[r].first) % self.runs[r].stride == 0):
                return r
        return -1

    cdef int _promote(self, const TRec* batch, Py_ssize_t n) except -1:
        """Before a batch is applied: the ids of the batch found in stored runs go into the table with
        their fingerprints (``id_source`` reads them from the journal), so that the batch sees them as
        it sees any committed id. Such ids are re-submissions: rare, and each looked up once."""
        cdef Py_ssize_t i, r, k, pos
        cdef Buf hits
        hits.data = NULL; hits.n = 0; hits.cap = 0
        cdef int err = 0
        try:
            with nogil:
                for i in range(n):
                    r = self._run_find(batch[i].id_lo, batch[i].id_hi)
                    if r >= 0 and (buf_push(&hits, i) or buf_push(&hits, r)):
                        err = 1
                        break
            if err:
                raise MemoryError("ledger kernel: no memory for the run look-ups")
            for k in range(0, hits.n, 2):
                i, r = hits.data[k], hits.data[k + 1]
                if self.id_source is None:
                    raise RuntimeError("the ledger state keeps id runs but has no id_source to read them")
                pos = self.runs[r].pos + <Py_ssize_t>((batch[i].id_lo - self.runs[r].first) // self.runs[r].stride)
                fp = self.id_source(self.runs[r].seq, pos, batch[i].id_lo, batch[i].id_hi)
                if self._id_put(batch[i].id_lo, batch[i].id_hi, <uint64_t>fp):
                    raise MemoryError("ledger kernel: could not grow the id table")
        finally:
            free(hits.data)
        return 0

    def add_ids(self, const TRec[::1] recs, int64_t seq=0):
        """Record the ids (and submitted-field fingerprints) of committed transfers: the records of
        journal entry ``seq`` in order (with ``seq`` 0, every id goes to the table)."""
        cdef Py_ssize_t i, n = recs.shape[0]
        cdef int err = 0
        if not self.ids_enabled or n == 0:
            return
        self.entry_seq = seq
        self.runs_at_start = self.n_runs
        try:
            with nogil:
                for i in range(n):
                    if self._id_add(&recs[0], i):
                        err = 1
                        break
                if not err and self._ids_close():
                    err = 1
        finally:
            self.or_count = 0
            self.or_src = NULL
            self.entry_seq = 0
            self.runs_at_start = self.n_runs
        if err:
            raise MemoryError("ledger kernel: could not grow the id table")

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
        """Fill out[i] = (dp, cp, dpend, cpend, available) for each id; found[i] = 0 if unknown.

        Many ids are looked up in two passes, each prefetching ahead of it (the hash table's buckets,
        then the balances' slots): both are random reads over tables bigger than the caches."""
        cdef Py_ssize_t i, n = ids.shape[0]
        cdef int32_t s
        if out.shape[0] < n or out.shape[1] < 5 or found.shape[0] < n:
            raise ValueError("out must be (len(ids), 5) and found len(ids)")
        cdef int32_t* slots = <int32_t*>malloc(n * sizeof(int32_t)) if n >= 64 else NULL
        with nogil:
            if slots != NULL:
                for i in range(n):
                    if i + PF_FAR < n:
                        LE_PREFETCH(&self.acc[mix64(ids[i + PF_FAR]) & self.acc_mask])
                    slots[i] = self._acc_find(ids[i])
            for i in range(n):
                if slots != NULL:
                    if i + PF_NEAR < n and slots[i + PF_NEAR] >= 0:
                        LE_PREFETCH(&self.sl[slots[i + PF_NEAR]])
                    s = slots[i]
                else:
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
        free(slots)

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
        # room for the batch; hold tables only for the holds in it (an import posts none)
        cdef Py_ssize_t holds = 0, i
        for i in range(n):
            if batch[i].flags & F_PENDING:
                holds += 1
        self.reserve(0, n, holds)
        if not replay and self.ids_enabled and self.n_runs:
            self._promote(batch, n)
        self.runs_at_start = self.n_runs
        # the records runs closed by this call are built from (replay: the batch, as journaled)
        self.w_src = batch if replay else out
        cdef Py_ssize_t j, chain_start = 0, chain_out = 0, n_out = 0, chain_pending = 0
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
                                if self._id_add(out, j):
                                    rc = -1
                                    break
                            if rc:
                                break
                if rc == 0 and failed_at < 0 and in_chain and not replay:
                    # the batch ended inside a chain: the chain fails as a whole
                    if not chain_failed:
                        self._rollback(&bal_undo, &lot_undo, &pend_undo, chain_pending)
                        n_out = chain_out
                    for j in range(chain_start, n):
                        results[j] = R_LINKED_EVENT_CHAIN_OPEN
            if rc == 0 and failed_at < 0 and self.ids_enabled:
                with nogil:
                    if replay:
                        for i in range(n):
                            if self._id_add(batch, i):
                                rc = -1
                                break
                    if rc == 0 and self._ids_close():
                        rc = -1
        finally:
            free(slots)
            free(bal_undo.data)
            free(lot_undo.data)
            free(pend_undo.data)
            # the run being built points into this call's buffers: it ends with the call
            self.or_count = 0
            self.or_src = NULL
            self.entry_seq = 0
            self.runs_at_start = self.n_runs
            self.w_src = NULL
        if rc:
            raise MemoryError("ledger kernel: could not grow an undo log or the id table")
        if failed_at >= 0:
            return -(failed_at + 1)
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

#: Pairs up to which _radix_pairs sorts by insertion instead.
DEF RADIX_MIN = 32


cdef uint64_t* _radix_pairs(uint64_t* k, uint64_t* v, uint64_t* k2, uint64_t* v2,
                            Py_ssize_t n) noexcept nogil:
    """Stable LSD radix sort of (k, v) pairs by k, ping-ponging with (k2, v2); bytes where every key
    agrees are skipped (account ids rarely use all eight). Returns whichever key buffer holds the
    result; its values are in the matching value buffer."""
    cdef Py_ssize_t counts[8][256]
    cdef Py_ssize_t i, d, pos, c
    cdef uint64_t x, y
    cdef uint64_t* tk
    cdef uint64_t* tv
    if n <= RADIX_MIN:
        # a few pairs (one purchase's entry): a stable insertion sort in place, without the 16 KB of counts
        for i in range(1, n):
            x = k[i]
            y = v[i]
            pos = i
            while pos > 0 and k[pos - 1] > x:
                k[pos] = k[pos - 1]
                v[pos] = v[pos - 1]
                pos -= 1
            k[pos] = x
            v[pos] = y
        return k
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


def index_run_entries(recs, list seqs, list counts):
    """The stored index run of several journal entries at once: ``recs`` (RECORD_DTYPE) holds their
    records in journal order, ``counts[k]`` of them entry ``seqs[k]``'s. The same run as merging each
    entry's :func:`index_run` (the sort is stable)."""
    cdef Py_buffer rb
    cdef Py_ssize_t i, n, m, k, pos = 0, c
    cdef uint64_t base
    _check_records(recs, "recs")
    if len(seqs) != len(counts):
        raise ValueError("index_run_entries: %d entries, %d counts" % (len(seqs), len(counts)))
    PyObject_GetBuffer(recs, &rb, PyBUF_SIMPLE)
    cdef const TRec* r = <const TRec*>rb.buf
    cdef uint64_t* scratch = NULL
    try:
        n = rb.len // sizeof(TRec)
        if sum(counts) != n or any(c < 0 or c >= (1 << 24) for c in counts):
            raise ValueError("index_run_entries: the counts do not add up to the %d records" % n)
        m = 2 * n
        scratch = <uint64_t*>malloc((4 * m + 1) * sizeof(uint64_t))
        if scratch == NULL:
            raise MemoryError("index run: no memory")
        for k in range(len(seqs)):
            base = (<uint64_t>seqs[k]) << 24
            c = counts[k]
            for i in range(c):
                scratch[2 * pos] = r[pos].debit
                scratch[2 * pos + 1] = r[pos].credit
                scratch[m + 2 * pos] = base | <uint64_t>i
                scratch[m + 2 * pos + 1] = base | <uint64_t>i
                pos += 1
        return _sorted_run(scratch, scratch + m, scratch + 2 * m, scratch + 3 * m, m)
    finally:
        free(scratch)
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


# ===================================================================================================
# The rule engine: a bytecode VM for conditions and the purchase evaluator (program.py compiles the
# tables; engine.py and importer paths call evaluate(); see docs/rules.md for the semantics).

cdef extern from *:
    ctypedef long long i128 "__int128"

# opcodes (must match rules.expr.Op)
DEF OP_CONST = 1
DEF OP_VAR = 2
DEF OP_ADD = 3
DEF OP_SUB = 4
DEF OP_MUL = 5
DEF OP_DIV = 6
DEF OP_MOD = 7
DEF OP_NEG = 8
DEF OP_EQ = 9
DEF OP_NE = 10
DEF OP_LT = 11
DEF OP_LE = 12
DEF OP_GT = 13
DEF OP_GE = 14
DEF OP_NOT = 15
DEF OP_JFALSE = 16
DEF OP_JTRUE = 17
DEF OP_IN = 18
DEF OP_BIT = 19
DEF OP_MIN = 20
DEF OP_MAX = 21
DEF OP_ABS = 22
DEF OP_RANGES = 23
DEF OP_CATAMT = 24
DEF OP_SKUAMT = 25
DEF OP_BOOL = 26

# facts slots (must match rules.expr.VARIABLES)
DEF F_AMOUNT = 0
DEF F_QUANTITY = 1
DEF F_HOUR = 2
DEF F_WEEKDAY = 3
DEF F_DATE = 4
DEF F_MONTH = 5
DEF F_DOM = 6
DEF F_BRANCH = 7
DEF F_CHANNEL = 8
DEF F_CATS = 9
DEF F_SKUS = 10
DEF F_FIRST = 11
DEF F_SINCE = 12
DEF F_V30 = 13
DEF F_V90 = 14
DEF F_V365 = 15
DEF F_S30 = 16
DEF F_S90 = 17
DEF F_S365 = 18
DEF F_AVG = 19
DEF F_GAP = 20
DEF F_TIER = 21
DEF F_POINTS = 22
DEF F_CREDIT = 23
DEF F_BDAY = 24
DEF F_MDAYS = 25
DEF F_REFERRED = 26
DEF N_FACTS = 27

# program parameters (must match program.P_*)
DEF P_RATE_POINTS = 0
DEF P_RATE_PER = 1
DEF P_ROUNDING = 2
DEF P_MIN_BASKET = 3
DEF P_CAP_RECEIPT = 4
DEF P_CAP_DAY = 5
DEF P_STACKING = 6
DEF P_TIER_METRIC = 7
DEF P_TIER_WINDOW = 8
DEF P_REVIEW = 9
DEF P_GRACE = 10
DEF P_BDAY_POINTS = 11
DEF P_BDAY_WITHIN = 12
DEF P_ANNIV_POINTS = 13
DEF P_ANNIV_WITHIN = 14
DEF P_REF_REFERRER = 15
DEF P_REF_REFERRED = 16
DEF P_BURN_POINTS = 17
DEF P_BURN_VALUE = 18
DEF P_BURN_MIN = 19
DEF P_BURN_STEP = 20
DEF P_BURN_SHARE = 21
DEF P_HORIZON = 22
DEF P_TIER_PERIOD = 23
DEF P_RFM = 24              # 12 bounds: recency days, visits, spend (4 each)

DEF BP = 10000
# conditions' table columns and predicate atoms' kinds (program.C_*, rules.expr.A_*)
DEF C_NCOL = 5
DEF R_W = 5                # columns of the rules table (program.R_NCOL)
DEF O_W = 8                # of the offers table (program.O_NCOL)
DEF T_W = 4                # of the tiers table (program.T_NCOL)
DEF PF_ROWS = 8            # rows ahead that the kernel prefetches member state for
DEF A_FACT = 1
DEF A_SCALED = 2
DEF A_CAT = 3
DEF A_SKU = 4
DEF A_BIT = 5
DEF A_MASK = 6
DEF A_IN = 7
DEF A_RANGES = 8
DEF A_CONST = 9
DEF A_TRUTH = 10
DEF STACK = 32

# row status (must match engine.RowStatus)
DEF ST_OK = 0
DEF ST_REDEEM_BELOW_MIN = 1
DEF ST_REDEEM_STEP = 2
DEF ST_REDEEM_INSUFFICIENT = 3
DEF ST_REDEEM_SHARE = 4
DEF ST_REDEEM_DISABLED = 5
DEF ST_OUT_OF_ORDER = 6

cdef packed struct MState:
    int64_t points
    int64_t credit
    int64_t purchases
    int64_t earned_today
    int64_t referrer
    int32_t enroll_day
    int32_t last_day
    int32_t tier
    int32_t review_day
    int32_t earn_day
    int32_t bday_year
    int32_t anniv_year
    int32_t notice_year
    int16_t birth_md
    int8_t referred
    int8_t pad

MSTATE_DTYPE = np.dtype([("points", "<i8"), ("credit", "<i8"), ("purchases", "<i8"), ("earned_today", "<i8"),
                         ("referrer", "<i8"), ("enroll_day", "<i4"), ("last_day", "<i4"), ("tier", "<i4"),
                         ("review_day", "<i4"), ("earn_day", "<i4"), ("bday_year", "<i4"),
                         ("anniv_year", "<i4"), ("notice_year", "<i4"),
                         ("birth_md", "<i2"), ("referred", "i1"), ("pad", "i1")])
if sizeof(MState) != rec.STATE_SIZE or MSTATE_DTYPE.itemsize != rec.STATE_SIZE:   # (_record.pxd's layout)
    raise ImportError(f"MState is {sizeof(MState)} bytes, but member records encode {rec.STATE_SIZE}")

cdef packed struct HEv:
    int32_t day
    int32_t visits     # 1 for a purchase; 0 or -1 for a refund's correction
    int64_t amount
    int64_t points

HEV_DTYPE = np.dtype([("day", "<i4"), ("visits", "<i4"), ("amount", "<i8"), ("points", "<i8")])

cdef packed struct RowIn:
    int64_t member
    int64_t amount
    int64_t quantity
    int64_t redeem
    int64_t cats
    int64_t skus
    int32_t day
    int32_t hour
    int32_t weekday
    int32_t month
    int32_t dom
    int32_t branch
    int32_t channel
    int32_t item_start
    int32_t item_end
    int32_t pad

ROW_DTYPE = np.dtype([("member", "<i8"), ("amount", "<i8"), ("quantity", "<i8"), ("redeem", "<i8"),
                      ("cats", "<i8"), ("skus", "<i8"), ("day", "<i4"), ("hour", "<i4"), ("weekday", "<i4"),
                      ("month", "<i4"), ("dom", "<i4"), ("branch", "<i4"), ("channel", "<i4"),
                      ("item_start", "<i4"), ("item_end", "<i4"), ("pad", "<i4")])

cdef packed struct RowOut:
    int64_t points          # all points credited to the member by this purchase
    int64_t base_points     # the base rate on the paid amount
    int64_t rule_points     # what multipliers (rules, tier, offers) added
    int64_t bonus_points    # fixed bonuses of rules and offers
    int64_t event_points    # birthday, anniversary, referral (the member's side)
    int64_t capped          # points the caps took off
    int64_t referrer_points
    int64_t referrer
    int64_t credit
    int64_t discount
    int64_t redeemed
    int64_t redeem_value
    int64_t paid
    int64_t rules_fired
    int64_t offers_fired
    int32_t tier_before
    int32_t tier_after
    int32_t status
    int32_t pad

OUT_DTYPE = np.dtype([("points", "<i8"), ("base_points", "<i8"), ("rule_points", "<i8"),
                      ("bonus_points", "<i8"), ("event_points", "<i8"), ("capped", "<i8"),
                      ("referrer_points", "<i8"), ("referrer", "<i8"), ("credit", "<i8"),
                      ("discount", "<i8"), ("redeemed", "<i8"), ("redeem_value", "<i8"), ("paid", "<i8"),
                      ("rules_fired", "<i8"), ("offers_fired", "<i8"), ("tier_before", "<i4"),
                      ("tier_after", "<i4"), ("status", "<i4"), ("pad", "<i4")])


cdef inline int64_t fdiv(int64_t a, int64_t b) noexcept nogil:
    cdef int64_t q
    if b == 0:
        return 0
    q = a // b
    if (a % b != 0) and ((a < 0) != (b < 0)):
        q -= 1
    return q


cdef inline int64_t fmod_(int64_t a, int64_t b) noexcept nogil:
    if b == 0:
        return 0
    return a - fdiv(a, b) * b


cdef int64_t vm(const int64_t* code, int64_t pc, int64_t end, const int64_t* pool, const int64_t* facts,
                const int64_t* cat_amt, const int64_t* sku_amt) noexcept nogil:
    """Run one compiled expression (code[pc:end]); returns the value on top of the stack."""
    cdef int64_t st[STACK]
    cdef int sp = -1
    cdef int64_t op, arg, a, b, k, i, x
    while pc < end:
        op = code[pc]
        arg = code[pc + 1]
        pc += 2
        if op == OP_VAR:
            sp += 1
            st[sp] = facts[arg]
        elif op == OP_CONST:
            sp += 1
            st[sp] = arg
        elif op == OP_JFALSE:
            if st[sp] == 0:
                pc = arg
            else:
                sp -= 1
        elif op == OP_JTRUE:
            if st[sp] != 0:
                pc = arg
            else:
                sp -= 1
        elif op == OP_NOT:
            st[sp] = st[sp] == 0
        elif op == OP_NEG:
            st[sp] = -st[sp]
        elif op == OP_ABS:
            if st[sp] < 0:
                st[sp] = -st[sp]
        elif op == OP_BOOL:
            st[sp] = st[sp] != 0
        elif op == OP_BIT:
            st[sp] = (st[sp] >> arg) & 1
        elif op == OP_IN:
            x = st[sp]
            k = pool[arg]
            st[sp] = 0
            for i in range(k):
                if pool[arg + 1 + i] == x:
                    st[sp] = 1
                    break
        elif op == OP_RANGES:
            x = st[sp]
            k = pool[arg]
            st[sp] = 0
            for i in range(k):
                if pool[arg + 1 + 2 * i] <= x <= pool[arg + 2 + 2 * i]:
                    st[sp] = 1
                    break
        elif op == OP_CATAMT:
            sp += 1
            st[sp] = cat_amt[arg] if 0 <= arg < 64 else 0
        elif op == OP_SKUAMT:
            sp += 1
            st[sp] = sku_amt[arg] if 0 <= arg < 64 else 0
        else:
            b = st[sp]
            sp -= 1
            a = st[sp]
            if op == OP_ADD:
                st[sp] = <int64_t>(<uint64_t>a + <uint64_t>b)      # wraps at 64 bits
            elif op == OP_SUB:
                st[sp] = <int64_t>(<uint64_t>a - <uint64_t>b)
            elif op == OP_MUL:
                st[sp] = <int64_t>(<uint64_t>a * <uint64_t>b)
            elif op == OP_DIV:
                st[sp] = fdiv(a, b)
            elif op == OP_MOD:
                st[sp] = fmod_(a, b)
            elif op == OP_EQ:
                st[sp] = a == b
            elif op == OP_NE:
                st[sp] = a != b
            elif op == OP_LT:
                st[sp] = a < b
            elif op == OP_LE:
                st[sp] = a <= b
            elif op == OP_GT:
                st[sp] = a > b
            elif op == OP_GE:
                st[sp] = a >= b
            elif op == OP_MIN:
                st[sp] = a if a < b else b
            elif op == OP_MAX:
                st[sp] = a if a > b else b
    return st[sp] if sp >= 0 else 0


def run_expr(const int64_t[::1] code, const int64_t[::1] pool, const int64_t[::1] facts,
             const int64_t[::1] cat_amt, const int64_t[::1] sku_amt):
    """Run a whole compiled expression over one facts vector (tests compare it with rules.expr.evaluate)."""
    if facts.shape[0] < N_FACTS or cat_amt.shape[0] < 64 or sku_amt.shape[0] < 64:
        raise ValueError("facts needs %d slots and the amount vectors 64" % N_FACTS)
    if pool.shape[0] == 0:
        raise ValueError("the pool holds at least one word")
    _check_code(code, pool, 0, code.shape[0], 0)
    return vm(&code[0], 0, code.shape[0], &pool[0], &facts[0], &cat_amt[0], &sku_amt[0])


def run_cond(const int64_t[::1] code, const int64_t[::1] pool, const int64_t[:, ::1] conds, Py_ssize_t c,
             const int64_t[::1] facts, const int64_t[::1] cat_amt, const int64_t[::1] sku_amt):
    """Condition ``c`` of a conditions table (program.C_* columns) over one facts vector, as the kernel
    tests it: atom by atom for a predicate, on the stack machine otherwise (tests compare the two)."""
    cdef int64_t memo[64]
    if facts.shape[0] < N_FACTS or cat_amt.shape[0] < 64 or sku_amt.shape[0] < 64:
        raise ValueError("facts needs %d slots and the amount vectors 64" % N_FACTS)
    if not (0 <= c < conds.shape[0]):
        raise ValueError("no condition %d in a table of %d" % (c, conds.shape[0]))
    _check_cond(code, pool, conds, c)
    for j in range(64):
        memo[j] = -1
    return int(_cond(&code[0] if code.shape[0] else NULL, &conds[0, 0], c, &pool[0], &facts[0], &cat_amt[0],
                     &sku_amt[0], memo))


# -- calendar (days since 1970-01-01, proleptic Gregorian; H. Hinnant's algorithms) ------------------

cdef inline int64_t days_from_civil(int64_t y, int64_t m, int64_t d) noexcept nogil:
    cdef int64_t era, yoe, doy, doe
    if m <= 2:
        y -= 1
    era = (y if y >= 0 else y - 399) // 400
    yoe = y - era * 400
    doy = (153 * (m - 3 if m > 2 else m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


cdef inline void civil_from_days(int64_t z, int64_t* y, int64_t* m, int64_t* d) noexcept nogil:
    cdef int64_t era, doe, yoe, doy, mp
    z += 719468
    era = (z if z >= 0 else z - 146096) // 146097
    doe = z - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    d[0] = doy - (153 * mp + 2) // 5 + 1
    m[0] = mp + 3 if mp < 10 else mp - 9
    y[0] = yoe + era * 400 + (1 if m[0] <= 2 else 0)


cdef inline bint is_leap(int64_t y) noexcept nogil:
    return (y % 4 == 0 and y % 100 != 0) or y % 400 == 0


cdef inline int64_t md_in_year(int64_t y, int64_t md) noexcept nogil:
    """The day of month-day ``md`` (month*100+day) in year ``y``; 29 February is 28 February in
    common years."""
    cdef int64_t m = md // 100, d = md % 100
    if m == 2 and d == 29 and not is_leap(y):
        d = 28
    return days_from_civil(y, m, d)


cdef inline int64_t period_start(int64_t day, int64_t period) noexcept nogil:
    """The first day of the calendar period holding ``day`` (1 month, 2 quarter, 3 year)."""
    cdef int64_t y, m, d
    civil_from_days(day, &y, &m, &d)
    if period == 1:
        return days_from_civil(y, m, 1)
    if period == 2:
        return days_from_civil(y, ((m - 1) // 3) * 3 + 1, 1)
    return days_from_civil(y, 1, 1)


cdef inline int64_t next_boundary(int64_t day, int64_t review) noexcept nogil:
    """The first day of the period after the one holding ``day`` (review 1 month, 2 quarter, 3 year)."""
    cdef int64_t y, m, d
    civil_from_days(day, &y, &m, &d)
    if review == 1:
        return days_from_civil(y + (1 if m == 12 else 0), 1 if m == 12 else m + 1, 1)
    if review == 2:
        m = ((m - 1) // 3) * 3 + 4
        if m > 12:
            return days_from_civil(y + 1, 1, 1)
        return days_from_civil(y, m, 1)
    return days_from_civil(y + 1, 1, 1)


def calendar_check(const int64_t[::1] days):
    """(year, month, day, next month, next quarter, next year) per day: a test hook for the calendar."""
    cdef Py_ssize_t i, n = days.shape[0]
    out = np.zeros((n, 6), np.int64)
    cdef int64_t[:, ::1] o = out
    cdef int64_t y, m, d
    for i in range(n):
        civil_from_days(days[i], &y, &m, &d)
        o[i, 0] = y
        o[i, 1] = m
        o[i, 2] = d
        o[i, 3] = next_boundary(days[i], 1)
        o[i, 4] = next_boundary(days[i], 2)
        o[i, 5] = next_boundary(days[i], 3)
    return out


cdef inline int64_t round_div(i128 num, i128 den, int64_t mode) noexcept nogil:
    """num // den (num >= 0, den > 0) rounded: 0 floor, 1 half to even, 2 ceiling."""
    cdef i128 q, r
    cdef int64_t q64, r64, d64
    if <int64_t>(num >> 64) == 0 and <int64_t>num >= 0 and den <= <i128>INT64_MAX:
        # the common case, 0 <= num < 2^63: 64-bit division and rounding (0 <= r < den, so 2r > den
        # is r > den - r, which cannot overflow)
        d64 = <int64_t>den
        q64 = <int64_t>num // d64
        r64 = <int64_t>num - q64 * d64
        if mode == 2:
            if r64 != 0:
                q64 += 1
        elif mode == 1:
            if r64 > d64 - r64 or (r64 == d64 - r64 and (q64 & 1)):
                q64 += 1
        return q64
    q = num // den
    r = num - q * den
    if mode == 2:
        if r != 0:
            q += 1
    elif mode == 1:
        if 2 * r > den or (2 * r == den and (q & 1)):
            q += 1
    return <int64_t>q


cdef inline int64_t tier_for(const int64_t* tp, Py_ssize_t nt, int64_t metric) noexcept nogil:
    """The highest tier whose threshold ``metric`` reaches (tiers are rows of 4: threshold first)."""
    cdef Py_ssize_t i
    cdef int64_t t = 0
    for i in range(nt):
        if tp[4 * i] <= metric:
            t = i + 1
    return t


cdef inline int64_t metric_of(int64_t kind, int64_t count, int64_t amount, int64_t points, int64_t recency,
                              const int64_t* rfm) noexcept nogil:
    """The tier metric: points, spend, visits, or the RFM score (3..15): recency scores 5 within
    rfm[0] days of the last purchase, 4 within rfm[1], 3 within rfm[2], 2 within rfm[3], else 1;
    visits and spend score 1 plus the number of their four bounds they reach."""
    cdef int64_t score, k
    if kind == 0:
        return points
    if kind == 1:
        return amount
    if kind == 2:
        return count
    score = 1
    for k in range(4):
        if recency <= rfm[k]:
            score = 5 - k
            break
    for k in range(4):
        if count >= rfm[4 + k]:
            score += 1
        if amount >= rfm[8 + k]:
            score += 1
    return score + 2


def _frozen(a, int ndim):
    """A private, read-only, C-contiguous int64 copy of a program table."""
    out = np.array(a, dtype=np.int64, order="C", copy=True)
    if out.ndim != ndim:
        raise ValueError("a program table of %d dimensions was expected, not %d" % (ndim, out.ndim))
    out.setflags(write=False)
    return out


cdef struct FAtom:
    int64_t kind        # 1: (facts[a] & am) against c * facts[b] (tab: a truth table over <, ==, >);
    int64_t a           # 2: 0 <= facts[a] < 64 and bit facts[a] of c, xor tab; 0: the general test of ptr
    int64_t b
    int64_t c
    int64_t am
    int64_t tab
    int64_t bit         # the atom's bit in the row's set
    const int64_t* ptr
    const int64_t* pa   # &facts[a]
    int64_t lo          # group 0 (a fact against a constant) as an interval: the atom holds when
    uint64_t span       # facts[a] - lo <= span (unsigned), xor neg
    uint64_t neg


cdef packed struct Win:
    # a segment's windows over its history in out_hist (one cache line: the kernel reads and writes one
    # a row): the history starts at ``base``; its end and the 30/90/365-day windows' first events are
    # offsets from there, with the windows' visits and spend
    int64_t a30
    int64_t a90
    int64_t a365
    int64_t base
    int32_t p
    int32_t lo30
    int32_t lo90
    int32_t lo365
    int32_t c30
    int32_t c90
    int32_t c365
    int32_t pad


cdef packed struct TWin:
    # the tier window, where it is not the 365-day window (or the metric is points)
    int64_t ta
    int64_t tpts
    int32_t lot
    int32_t tc
    int64_t pad


cdef struct Plan:
    # what the kernel derives from a program once, when it is bound: the first 64 atoms of predicate
    # conditions (tested once a row into the bits of a word, grouped so that each group's loop has no
    # branch on the kind), and tables that turn those bits into conditions' truths and rules' truths
    FAtom fat[64]
    Py_ssize_t natoms
    Py_ssize_t gend[5]              # where each group of ``fat`` ends
    uint64_t negmask                # the atoms whose test is negated (the row's bits are xor'ed with it)
    int64_t g0_fact[64]             # group 0 (a fact against a constant) by column: the fact, and the
    int64_t g0_lo[64]               # interval [lo, lo + span] it must lie in
    uint64_t g0_span[64]
    int8_t cfast[64]                # condition k < 64 is a predicate whose truth is bit k of the row's word
    Py_ssize_t n_memo               # conditions among the first 64 that are not (the stack machine's)
    uint64_t cw_const               # predicates of no atoms that hold (all of nothing)
    Py_ssize_t nab                  # bytes of the atom bits that ``atab`` maps
    uint64_t atab[8][256]           # byte t of the atom bits -> the predicates one of whose atoms they are
    uint64_t all_conds              # predicates that need all of two or more atoms: they hold unless
    uint64_t ftab[8][256]           # byte t of the atom bits' complement -> those one of whose atoms fails
    Py_ssize_t ncb                  # bytes of the condition word that ``rtab`` maps
    uint64_t rtab[8][256]           # byte t of the condition word -> the rules whose condition they are
    uint64_t rule_always            # rules without a condition
    Py_ssize_t nslow                # rules whose condition is not in the word (tested one by one)
    int64_t slow_rule[64]
    # offers, where none is exclusive (else they are tested one by one in priority order): those whose
    # condition holds by table (``otab``, ``offer_always``) or one by one, less those their limits stop
    bint offers_by_word
    Py_ssize_t ocb
    uint64_t otab[8][256]
    uint64_t offer_always
    Py_ssize_t nslow_off
    int64_t slow_offer[64]
    uint64_t offer_limited          # offers with a limit per member, per period or a budget
    uint64_t offer_discount         # discount_percent offers
    bint tiers_rise                 # thresholds never fall: an upgrade walks up from the member's tier
    bint tier_discount              # some tier has a discount
    bint basket_amounts             # some condition reads a category's or SKU's amount in the basket
    bint tier_cashback              # some tier has cashback
    # the earn rules by scope (an item's category or SKU, or the basket), and byte t of the bonus rules
    # that hold -> the sum of their bonuses
    uint64_t scope_basket
    uint64_t scope_cat[64]
    uint64_t scope_sku[64]
    Py_ssize_t nbb
    int64_t btab[8][256]


# a batch of at least this many rows is evaluated with the GIL released (Kernel._run)
DEF NOGIL_ROWS = 1024


cdef class Kernel:
    """A compiled program bound to the kernel once (its tables checked once), to evaluate batches and
    single purchases against member state with :meth:`run` (a call acquires only the per-call arrays)."""
    cdef const int64_t[::1] code
    cdef const int64_t[::1] pool
    cdef const int64_t[:, ::1] conds
    cdef const int64_t[:, ::1] rules
    cdef const int64_t[:, ::1] offers
    cdef const int64_t[:, ::1] tiers
    cdef const int64_t[::1] params
    cdef Plan plan
    # the buffers of run_bound (one purchase at a time), bound by bind()
    cdef RowIn[::1] b_rows
    cdef int32_t[::1] b_cat, b_sku
    cdef int64_t[::1] b_amt, b_hist_off, b_out_off, b_budget, b_seg
    cdef MState[::1] b_members
    cdef HEv[::1] b_hist, b_out_hist
    cdef int64_t[:, :, ::1] b_use
    cdef RowOut[::1] b_out
    cdef int64_t[:, ::1] b_facts
    cdef public object bound
    # run()'s scratch (segments' members and sizes, windows, tier windows), kept from call to call: a
    # bulk import's chunks need tens of MB of it each, and fresh memory's first touch is dear
    cdef void* scratch[3]
    cdef size_t scratch_cap[3]
    cdef bint running

    def __init__(self, code, pool, conds, rules, offers, tiers, params):
        # private, read-only copies: a caller changing its arrays later cannot get past the checks
        self._bind(_frozen(code, 1), _frozen(pool, 1), _frozen(conds, 2), _frozen(rules, 2), _frozen(offers, 2),
                   _frozen(tiers, 2), _frozen(params, 1))

    cdef _bind(self, const int64_t[::1] code, const int64_t[::1] pool, const int64_t[:, ::1] conds,
              const int64_t[:, ::1] rules, const int64_t[:, ::1] offers, const int64_t[:, ::1] tiers,
              const int64_t[::1] params):
        cdef Py_ssize_t k
        cdef Py_ssize_t nrules = rules.shape[0], noff = offers.shape[0], nt = tiers.shape[0]
        cdef Py_ssize_t ncond = conds.shape[0]
        if nrules > 64 or noff > 64:
            raise ValueError("a program has at most 64 earn rules and 64 offers")
        if (nrules and rules.shape[1] != R_W) or (noff and offers.shape[1] != O_W) or (nt and tiers.shape[1] != T_W):
            raise ValueError("rules, offers and tiers need %d, %d and %d columns" % (R_W, O_W, T_W))
        if params.shape[0] < P_RFM + 12:
            raise ValueError("params is shorter than the program's parameters")
        # (the kernel divides by these: a zero would stop the process)
        if params[P_RATE_POINTS] > 0 and params[P_RATE_PER] < 1:
            raise ValueError("the earn rate's amount (per) is %d; it must be at least 1" % params[P_RATE_PER])
        if params[P_BURN_VALUE] != 0 and (params[P_BURN_POINTS] < 1 or params[P_BURN_STEP] < 1):
            raise ValueError("redemption's points (%d) and step (%d) must be at least 1"
                             % (params[P_BURN_POINTS], params[P_BURN_STEP]))
        if pool.shape[0] == 0:
            raise ValueError("the pool holds at least one word")
        for k in range(ncond):
            _check_cond(code, pool, conds, k)
        for k in range(nrules):
            if not (-1 <= rules[k, 0] < ncond and 0 <= rules[k, 1] <= 2 and 0 <= rules[k, 2] < 64
                    and 0 <= rules[k, 3] <= 1):
                raise ValueError("rule %d: condition %d, scope %d, symbol %d or kind %d is out of range"
                                 % (k, rules[k, 0], rules[k, 1], rules[k, 2], rules[k, 3]))
        for k in range(noff):
            if not (-1 <= offers[k, 0] < ncond and 0 <= offers[k, 2] <= 4):
                raise ValueError("offer %d: condition %d or effect %d is out of range" % (k, offers[k, 0], offers[k, 2]))
        self.code, self.pool, self.conds, self.rules = code, pool, conds, rules
        self.offers, self.tiers, self.params = offers, tiers, params
        _make_plan(&self.plan, &code[0] if code.shape[0] else NULL, &pool[0], &conds[0, 0] if ncond else NULL, ncond,
                   &rules[0, 0] if nrules else NULL, nrules, &offers[0, 0] if noff else NULL, noff,
                   &tiers[0, 0] if nt else NULL, nt)

    def run(self, const RowIn[::1] rows, const int64_t[::1] seg_of, const int32_t[::1] item_cat,
            const int32_t[::1] item_sku, const int64_t[::1] item_amount, MState[::1] members,
            const int64_t[::1] hist_off, const HEv[::1] hist, int64_t[::1] out_off, HEv[::1] out_hist,
            int64_t[:, :, ::1] offer_use, int64_t[::1] budget_used, RowOut[::1] out, int64_t[:, ::1] facts_out):
        """Evaluate purchase rows against a compiled program, updating member state in place.

        Rows are evaluated in the order given, which must be time order (so that budgets, caps and
        referral bonuses see what came first, exactly as one purchase at a time would). ``seg_of[i]`` is
        row i's member segment: ``hist[hist_off[s]:hist_off[s+1]]`` is segment s's purchase history (day
        order), and the kernel writes the history to keep (the horizon's worth, this batch's purchases
        included) to ``out_hist[out_off[s]:out_off[s+1]]`` (``out_hist`` holds at least len(hist) +
        len(rows) events). ``facts_out`` is (len(rows), N_FACTS) to record every row's facts (for
        explanations) or (0, N_FACTS). A history event counts 1, 0 or -1 visits and a segment (its history
        and its rows) holds fewer than 2^31 events: the windows count in 32 bits. Returns the number of
        segments.
        """
        return self._run(rows, seg_of, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist,
                         offer_use, budget_used, out, facts_out)

    def bind(self, rows, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist, offer_use,
             budget_used, out, facts_out):
        """Bind the buffers :meth:`run_bound` evaluates (as :meth:`run`'s arguments, one segment; the
        arrays are acquired here once, not at every call). ``bound`` keeps them, so a caller can tell
        when its arrays were replaced and bind again."""
        self.b_rows, self.b_cat, self.b_sku, self.b_amt = rows, item_cat, item_sku, item_amount
        self.b_members, self.b_hist_off, self.b_hist, self.b_out_off = members, hist_off, hist, out_off
        self.b_out_hist, self.b_use, self.b_budget, self.b_out, self.b_facts = (out_hist, offer_use, budget_used,
                                                                                out, facts_out)
        self.b_seg = np.zeros(len(rows), np.int64)     # one segment: the rows are one member's
        self.bound = (rows, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist, offer_use,
                      budget_used, out, facts_out)

    def __dealloc__(self):
        cdef int k
        for k in range(3):
            free(self.scratch[k])

    def release_scratch(self):
        """Free run()'s scratch memory (it is kept between calls; a later call allocates it again)."""
        cdef int k
        if self.running:
            raise RuntimeError("the kernel is running")
        for k in range(3):
            free(self.scratch[k])
            self.scratch[k] = NULL
            self.scratch_cap[k] = 0

    cdef void* _room(self, int k, size_t n) noexcept:
        """Scratch ``k`` of at least ``n`` bytes (NULL if memory ran out)."""
        if self.scratch_cap[k] < n:
            free(self.scratch[k])
            self.scratch_cap[k] = 0
            n = n + n // 4          # (room to grow: the next batch is often a little bigger)
            self.scratch[k] = malloc(n)
            if self.scratch[k] != NULL:
                self.scratch_cap[k] = n
        return self.scratch[k]

    def release(self):
        """Drop the buffers :meth:`bind` bound (so that arrays the caller replaced can be freed)."""
        self.b_rows = self.b_cat = self.b_sku = self.b_amt = self.b_members = self.b_hist_off = None
        self.b_hist = self.b_out_off = self.b_out_hist = self.b_use = self.b_budget = self.b_out = None
        self.b_facts = self.b_seg = None
        self.bound = None

    def run_bound(self, Py_ssize_t n_rows, Py_ssize_t n_items, Py_ssize_t n_hist):
        """:meth:`run` over the first ``n_rows`` rows (all one member's), ``n_items`` items and ``n_hist``
        history events of the bound buffers (the same checks are made)."""
        if self.bound is None:
            raise ValueError("run_bound needs bind() first")
        if not (0 <= n_rows <= self.b_rows.shape[0] and 0 <= n_items <= self.b_amt.shape[0]
                and 0 <= n_hist <= self.b_hist.shape[0] and self.b_hist_off.shape[0] >= 2
                and self.b_seg.shape[0] >= n_rows):
            raise ValueError("run_bound: %d rows, %d items or %d events exceed the bound buffers"
                             % (n_rows, n_items, n_hist))
        self.b_hist_off[0] = 0
        self.b_hist_off[1] = n_hist
        return self._run(self.b_rows[:n_rows], self.b_seg[:n_rows], self.b_cat[:n_items], self.b_sku[:n_items],
                         self.b_amt[:n_items], self.b_members, self.b_hist_off[:2], self.b_hist[:n_hist],
                         self.b_out_off, self.b_out_hist, self.b_use, self.b_budget, self.b_out, self.b_facts)

    cdef object _run(self, const RowIn[::1] rows, const int64_t[::1] seg_of, const int32_t[::1] item_cat,
                     const int32_t[::1] item_sku, const int64_t[::1] item_amount, MState[::1] members,
                     const int64_t[::1] hist_off, const HEv[::1] hist, int64_t[::1] out_off, HEv[::1] out_hist,
                     int64_t[:, :, ::1] offer_use, int64_t[::1] budget_used, RowOut[::1] out, int64_t[:, ::1] facts_out):
        cdef Py_ssize_t n = rows.shape[0], noff = self.offers.shape[0]
        cdef Py_ssize_t i, j, s
        cdef int64_t mt
        cdef int64_t nseg = hist_off.shape[0] - 1
        if nseg < 0 or out_off.shape[0] < nseg + 1 or seg_of.shape[0] < n:
            raise ValueError("hist_off/out_off/seg_of are too short")
        if facts_out.shape[0] != 0 and (facts_out.shape[0] < n or facts_out.shape[1] < N_FACTS):
            raise ValueError("facts_out must be (rows, %d) or empty" % N_FACTS)
        if noff and (offer_use.shape[1] < noff or offer_use.shape[2] != 3 or budget_used.shape[0] < noff
                     or offer_use.shape[0] < members.shape[0]):
            raise ValueError("offer_use must be (members, offers, 3) and budget_used (offers,)")
        if out.shape[0] < n:
            raise ValueError("out is shorter than rows")
        if out_hist.shape[0] < hist.shape[0] + n or hist_off[nseg] > hist.shape[0] or hist_off[0] < 0:
            raise ValueError("out_hist must hold len(hist) + len(rows) events, and hist_off lie in hist")
        if item_cat.shape[0] < item_amount.shape[0] or item_sku.shape[0] < item_amount.shape[0]:
            raise ValueError("item arrays differ in length")
        cdef Py_ssize_t nm = members.shape[0], ntiers = self.tiers.shape[0]
        cdef int64_t seg, mem, bad = 0, done
        cdef Py_ssize_t first, last
        cdef bint tsep = ntiers > 0 and not (self.params[P_TIER_PERIOD] == 0 and self.params[P_TIER_WINDOW] == 365
                                             and self.params[P_TIER_METRIC] != 0)
        # per segment: its member and its rows (then its size); the windows, one cache line a segment
        if self.running:        # (the scratch is the kernel's: one run at a time)
            raise RuntimeError("Kernel.run was called while it runs (from another thread?): one run at a time")
        cdef int64_t* seg_info = <int64_t*>self._room(0, (nseg + 1) * 2 * sizeof(int64_t))
        cdef char* wmem = <char*>self._room(1, (nseg + 1) * sizeof(Win) + 64)
        cdef char* twmem = <char*>self._room(2, (nseg + 1) * sizeof(TWin) + 64) if tsep else NULL
        if seg_info == NULL or wmem == NULL or (tsep and twmem == NULL):
            self.release_scratch()
            raise MemoryError()
        cdef Win* win = <Win*>(wmem + ((-<Py_ssize_t>wmem) & 63))
        cdef TWin* twin = <TWin*>(twmem + ((-<Py_ssize_t>twmem) & 63)) if tsep else NULL
        for s in range(nseg + 1):
            seg_info[2 * s] = -1
            seg_info[2 * s + 1] = 0
        self.running = True
        try:
            for i in range(n):
                mem = rows[i].member
                seg = seg_of[i]
                # (unsigned comparisons: a negative number is out of range too)
                if <uint64_t>mem >= <uint64_t>nm:
                    raise ValueError("row %d names member %d, beyond the state (%d members)" % (i, mem, nm))
                if <uint64_t>seg >= <uint64_t>nseg:
                    raise ValueError("row %d: segment %d is out of range" % (i, seg))
                if seg_info[2 * seg] != mem:
                    if seg_info[2 * seg] != -1:
                        raise ValueError("row %d: segment %d holds two members" % (i, seg))
                    seg_info[2 * seg] = mem
                seg_info[2 * seg + 1] += 1
                first = rows[i].item_start
                last = rows[i].item_end
                if first < 0 or last > item_amount.shape[0] or last < first:
                    raise ValueError("row %d: items [%d, %d) are out of range" % (i, first, last))
                for j in range(first, last):
                    if (<uint32_t>item_cat[j] | <uint32_t>item_sku[j]) >= 64:
                        raise ValueError("item %d: category/sku symbol out of range" % j)
            # the members' state, once a segment (every row's member is its segment's)
            for s in range(nseg):
                mem = seg_info[2 * s]
                if mem >= 0 and (members[mem].tier < 0 or members[mem].tier > ntiers
                                 or members[mem].referrer >= nm):
                    bad = 1
            if bad:                 # name the first row whose member's state is bad
                for i in range(n):
                    mt = members[rows[i].member].tier
                    if mt < 0 or mt > ntiers:
                        raise ValueError("row %d: member %d has tier %d; the program has %d"
                                         % (i, rows[i].member, mt, ntiers))
                    if members[rows[i].member].referrer >= nm:
                        raise ValueError("row %d: member %d's referrer %d is beyond the state"
                                         % (i, rows[i].member, members[rows[i].member].referrer))
            for s in range(nseg):
                if hist_off[s] > hist_off[s + 1]:
                    raise ValueError("hist_off must not decrease")
                # (the windows count a segment's events in 32 bits)
                if hist_off[s + 1] - hist_off[s] + seg_info[2 * s + 1] >= (<int64_t>1 << 31) - 1:
                    raise ValueError("segment %d holds 2^31 events or more" % s)
            for j in range(hist_off[0], hist_off[nseg]):
                if hist[j].visits < -1 or hist[j].visits > 1:
                    raise ValueError("history event %d counts %d visits (1, 0 or -1)" % (j, hist[j].visits))
            if n < NOGIL_ROWS:      # (one purchase: releasing the GIL would cost more than it gives)
                return _evaluate(self.code, self.pool, self.conds, self.rules, self.offers, self.tiers, self.params,
                                 rows, seg_of, item_cat, item_sku, item_amount, members, hist_off, hist, out_off,
                                 out_hist, offer_use, budget_used, out, facts_out, win, twin, seg_info, nseg,
                                 &self.plan)
            with nogil:             # a batch: other threads (a bulk import's writer) run meanwhile
                done = _evaluate(self.code, self.pool, self.conds, self.rules, self.offers, self.tiers, self.params,
                                 rows, seg_of, item_cat, item_sku, item_amount, members, hist_off, hist, out_off,
                                 out_hist, offer_use, budget_used, out, facts_out, win, twin, seg_info, nseg,
                                 &self.plan)
            return done
        finally:
            self.running = False


def evaluate(code, pool, conds, rules, offers, tiers, params, rows, seg_of, item_cat, item_sku, item_amount,
             members, hist_off, hist, out_off, out_hist, offer_use, budget_used, out, facts_out):
    """Evaluate purchase rows against a compiled program (:class:`Kernel` ``(...).run(...)`` in one call)."""
    return Kernel(code, pool, conds, rules, offers, tiers, params).run(
        rows, seg_of, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist, offer_use,
        budget_used, out, facts_out)


cdef inline void _fast_atom(FAtom* fa, const int64_t* at) noexcept nogil:
    """An atom of the pool (rules.expr.A_*) in the form the kernel tests once a row: most kinds become a
    comparison (the constant as c * facts[N_FACTS], which is 1; a bit or a truth as a masked fact against
    0); a list of small numbers a bit test; the rest stay general."""
    cdef int64_t kind = at[0], op = at[1]
    # the comparisons ==, !=, <, <=, >, >= as truth tables over (x < y, x == y, x > y): 0b010, 0b101,
    # 0b001, 0b011, 0b100, 0b110, packed three bits each
    fa.kind = 1
    fa.a = at[2]
    fa.b = N_FACTS
    fa.c = at[4]
    fa.am = -1
    fa.ptr = at
    fa.tab = (0o643152 >> (3 * op)) & 7 if op <= 5 else 0
    if kind == A_SCALED:
        fa.b = at[3]
    elif kind == A_BIT:
        fa.am = <int64_t>((<uint64_t>1) << at[4])
        fa.c = 0
        fa.tab = 5 if op == 0 else 2            # != 0, or == 0 when negated
    elif kind == A_TRUTH:
        fa.c = 0
        fa.tab = 5 if op == 0 else 2
    elif kind == A_CONST:
        fa.a = N_FACTS                          # 1 > 0 always: the table says the constant's truth
        fa.c = 0
        fa.tab = 4 if (at[4] != 0) != (op != 0) else 0
    elif kind == A_MASK:
        fa.kind = 2
        fa.tab = op
    elif kind != A_FACT:
        fa.kind = 0


cdef inline Py_ssize_t _atom_group(const FAtom* fa) noexcept nogil:
    """0: a plain fact against a constant; 1: a bit of a fact; 2: another comparison; 3: a small set;
    4: the general test."""
    if fa.kind == 1:
        if fa.b == N_FACTS and fa.am == -1:
            return 0
        if fa.b == N_FACTS and fa.c == 0 and (fa.tab == 2 or fa.tab == 5):     # (x & am) == 0, != 0
            return 1
        return 2
    return 3 if fa.kind == 2 else 4


cdef int _check_cond(const int64_t[::1] code, const int64_t[::1] pool, const int64_t[:, ::1] conds,
                     Py_ssize_t k) except -1:
    """Refuse a condition whose code or predicate lies outside the program (the kernel trusts them)."""
    cdef Py_ssize_t j
    if conds.shape[1] != C_NCOL:
        raise ValueError("conds must have %d columns, not %d" % (C_NCOL, conds.shape[1]))
    if not (0 <= conds[k, 0] <= conds[k, 1] <= code.shape[0]):
        raise ValueError("condition %d lies outside the code" % k)
    _check_code(code, pool, conds[k, 0], conds[k, 1], k)
    if conds[k, 2] != 0:
        # (written so that no sum can overflow: a crafted table must not pass by wrapping round)
        if not (conds[k, 2] in (1, 2) and 0 <= conds[k, 3] <= pool.shape[0]
                and 0 <= conds[k, 4] <= (pool.shape[0] - conds[k, 3]) // 5):
            raise ValueError("condition %d: its predicate lies outside the pool" % k)
        for j in range(conds[k, 4]):
            _check_atom(&pool[0], pool.shape[0], conds[k, 3] + 5 * j, k)
    return 0


cdef int _check_code(const int64_t[::1] code, const int64_t[::1] pool, Py_ssize_t start, Py_ssize_t end,
                     Py_ssize_t c) except -1:
    """Refuse code the stack machine could not run safely: an unknown operation, a variable, bit or list
    out of range, a jump that is not forward onto an instruction of the same code, a stack that would
    underflow or outgrow the machine's, or two ways into one place with different stack depths."""
    cdef Py_ssize_t pc, ni = (end - start) // 2, at, npool = pool.shape[0]
    cdef int64_t op, arg, d = 0
    cdef int64_t* depth
    if (end - start) % 2:
        raise ValueError("condition %d: its code is not whole instructions" % c)
    depth = <int64_t*>malloc((ni + 1) * sizeof(int64_t))
    if depth == NULL:
        raise MemoryError()
    try:
        for pc in range(ni + 1):
            depth[pc] = -1
        for pc in range(start, end, 2):
            at = (pc - start) // 2
            if depth[at] >= 0 and depth[at] != d:
                raise ValueError("condition %d: two ways into instruction %d with different stacks" % (c, pc))
            op = code[pc]
            arg = code[pc + 1]
            if op == OP_VAR or op == OP_CONST or op == OP_CATAMT or op == OP_SKUAMT:
                if op == OP_VAR and not (0 <= arg < N_FACTS):
                    raise ValueError("condition %d: variable %d is out of range" % (c, arg))
                d += 1
                if d > STACK:
                    raise ValueError("condition %d: the expression is too deep for the machine's stack" % c)
            elif op in (OP_NEG, OP_NOT, OP_ABS, OP_BOOL, OP_BIT, OP_IN, OP_RANGES):
                if d < 1:
                    raise ValueError("condition %d: operation %d at %d has no operand" % (c, op, pc))
                if op == OP_BIT and not (0 <= arg < 64):
                    raise ValueError("condition %d: bit %d is out of range" % (c, arg))
                if (op == OP_IN or op == OP_RANGES) and not (
                        0 <= arg < npool and 0 <= pool[arg] <= (npool - arg - 1) // (1 if op == OP_IN else 2)):
                    raise ValueError("condition %d: a list is outside the pool" % c)
            elif op in (OP_ADD, OP_SUB, OP_MUL, OP_DIV, OP_MOD, OP_EQ, OP_NE, OP_LT, OP_LE, OP_GT, OP_GE,
                        OP_MIN, OP_MAX):
                if d < 2:
                    raise ValueError("condition %d: operation %d at %d has no operands" % (c, op, pc))
                d -= 1
            elif op == OP_JFALSE or op == OP_JTRUE:
                if d < 1 or not (pc < arg <= end) or (arg - start) % 2:
                    raise ValueError("condition %d: a jump at %d to %d is out of place" % (c, pc, arg))
                at = (arg - start) // 2
                if depth[at] >= 0 and depth[at] != d:
                    raise ValueError("condition %d: two ways into instruction %d with different stacks" % (c, arg))
                depth[at] = d
                d -= 1
            else:
                raise ValueError("condition %d: unknown operation %d at %d" % (c, op, pc))
        if depth[ni] >= 0 and depth[ni] != d:
            raise ValueError("condition %d: two ways out of its code with different stacks" % c)
    finally:
        free(depth)
    return 0


cdef int _check_atom(const int64_t* pp, Py_ssize_t npool, int64_t at, Py_ssize_t c) except -1:
    """Refuse an atom whose kind, comparison or indexes are out of range (the kernel trusts them)."""
    cdef int64_t kind = pp[at], op = pp[at + 1], lst
    if not (A_FACT <= kind <= A_TRUTH) or not (0 <= op <= (5 if kind <= A_SKU else 1)):
        raise ValueError("condition %d: bad predicate atom (kind %d, op %d)" % (c, kind, op))
    if kind in (A_FACT, A_SCALED, A_BIT, A_MASK, A_IN, A_RANGES, A_TRUTH) and not (0 <= pp[at + 2] < N_FACTS):
        raise ValueError("condition %d: atom fact %d is out of range" % (c, pp[at + 2]))
    if kind == A_SCALED and not (0 <= pp[at + 3] < N_FACTS):
        raise ValueError("condition %d: atom fact %d is out of range" % (c, pp[at + 3]))
    if kind == A_BIT and not (0 <= pp[at + 4] < 64):
        raise ValueError("condition %d: atom bit %d is out of range" % (c, pp[at + 4]))
    if kind == A_IN or kind == A_RANGES:
        lst = pp[at + 4]
        if not (0 <= lst < npool and 0 <= pp[lst] <= (npool - lst - 1) // (1 if kind == A_IN else 2)):
            raise ValueError("condition %d: atom list is outside the pool" % c)
    return 0


cdef void _place(uint64_t (*tab)[256], Py_ssize_t* nbytes, uint64_t* always, int64_t* slow, Py_ssize_t* nslow,
                 const int8_t* cfast, int64_t c, Py_ssize_t k) noexcept nogil:
    """Place item ``k`` (a rule or an offer) by its condition ``c``: none (-1) always holds; a bit of the
    condition word goes into the word's table ``tab`` (byte of the word -> the items it holds), widening
    ``nbytes``; any other is tested one by one (appended to ``slow``)."""
    cdef Py_ssize_t v
    if c < 0:
        always[0] |= (<uint64_t>1) << k
    elif c < 64 and cfast[c]:
        for v in range(256):
            if (v >> (c & 7)) & 1:
                tab[c >> 3][v] |= (<uint64_t>1) << k
        if (c >> 3) + 1 > nbytes[0]:
            nbytes[0] = (c >> 3) + 1
    else:
        slow[nslow[0]] = k
        nslow[0] += 1


cdef void _make_plan(Plan* pl, const int64_t* cp, const int64_t* pp, const int64_t* condp, Py_ssize_t ncond,
                     const int64_t* rp,
                     Py_ssize_t nrules, const int64_t* ofp, Py_ssize_t noff, const int64_t* tp,
                     Py_ssize_t nt) noexcept nogil:
    """Fill ``pl`` for a checked program (see :c:type:`Plan`)."""
    cdef Py_ssize_t k, j, g, v, na, nc = ncond if ncond < 64 else 64
    cdef uint64_t amask
    cdef FAtom tmp_atom
    cdef Py_ssize_t ng[5]
    cdef Py_ssize_t first[64]           # a predicate's first atom (in the order of the conditions)
    cdef Py_ssize_t at_bit[64]          # an atom's bit: its place once grouped
    cdef int64_t c
    memset(pl, 0, sizeof(Plan))
    # a basket's amounts by category and SKU, where some condition reads them (an atom, or the code)
    for k in range(ncond):
        for j in range(condp[C_NCOL * k + 4] if condp[C_NCOL * k + 2] else 0):
            if pp[condp[C_NCOL * k + 3] + 5 * j] == A_CAT or pp[condp[C_NCOL * k + 3] + 5 * j] == A_SKU:
                pl.basket_amounts = True
        for j in range(condp[C_NCOL * k + 0], condp[C_NCOL * k + 1], 2):
            if cp[j] == OP_CATAMT or cp[j] == OP_SKUAMT:
                pl.basket_amounts = True
    # the atoms of the first predicates that fit in 64 bits, in the order of their conditions
    for k in range(nc):
        na = condp[C_NCOL * k + 4]
        if (condp[C_NCOL * k + 2] == 1 or condp[C_NCOL * k + 2] == 2) and pl.natoms + na <= 64:
            first[k] = pl.natoms
            for j in range(na):
                _fast_atom(&pl.fat[pl.natoms], pp + condp[C_NCOL * k + 3] + 5 * j)
                pl.fat[pl.natoms].bit = pl.natoms
                pl.natoms += 1
            pl.cfast[k] = <int8_t>condp[C_NCOL * k + 2]
        else:
            pl.n_memo += 1
    # group the atoms (a stable sort by group) so that each group's loop has no branch on the kind;
    # an atom's bit in the row's word is its place in that order
    for g in range(5):
        ng[g] = 0
    for k in range(pl.natoms):
        ng[_atom_group(&pl.fat[k])] += 1
    pl.gend[0] = ng[0]
    for g in range(1, 5):
        pl.gend[g] = pl.gend[g - 1] + ng[g]
    for k in range(1, pl.natoms):       # insertion sort by group keeps the order inside a group
        tmp_atom = pl.fat[k]
        j = k - 1
        while j >= 0 and _atom_group(&pl.fat[j]) > _atom_group(&tmp_atom):
            pl.fat[j + 1] = pl.fat[j]
            j -= 1
        pl.fat[j + 1] = tmp_atom
    for k in range(pl.natoms):
        at_bit[pl.fat[k].bit] = k
        pl.fat[k].bit = k
        if k < pl.gend[0]:
            _interval(&pl.fat[k])
            if pl.fat[k].neg:
                pl.negmask |= (<uint64_t>1) << k
            pl.g0_fact[k] = pl.fat[k].a
            pl.g0_lo[k] = pl.fat[k].lo
            pl.g0_span[k] = pl.fat[k].span
        elif k < pl.gend[1]:                    # a bit: != 0, or == 0 negated
            if pl.fat[k].tab == 2:
                pl.negmask |= (<uint64_t>1) << k
        elif pl.gend[2] <= k < pl.gend[3]:      # a small set: in it, or negated
            if pl.fat[k].tab:
                pl.negmask |= (<uint64_t>1) << k
    # the predicates' tables: any of their atoms (or the one atom) by table, all of several by mask
    for k in range(nc):
        if not pl.cfast[k]:
            continue
        na = condp[C_NCOL * k + 4]
        amask = 0
        for j in range(na):
            amask |= (<uint64_t>1) << at_bit[first[k] + j]
        if na == 0:
            if pl.cfast[k] == 1:                # all of no atoms holds; any of none does not
                pl.cw_const |= (<uint64_t>1) << k
        elif pl.cfast[k] == 2 or na == 1:
            for j in range(64):
                if (amask >> j) & 1:
                    for v in range(256):
                        if (v >> (j & 7)) & 1:
                            pl.atab[j >> 3][v] |= (<uint64_t>1) << k
        else:
            pl.all_conds |= (<uint64_t>1) << k
            for j in range(64):
                if (amask >> j) & 1:
                    for v in range(256):
                        if (v >> (j & 7)) & 1:
                            pl.ftab[j >> 3][v] |= (<uint64_t>1) << k
    pl.nab = (pl.natoms + 7) // 8
    for k in range(nrules):
        if rp[R_W * k + 1] == 0:
            pl.scope_basket |= (<uint64_t>1) << k
        elif rp[R_W * k + 1] == 1:
            pl.scope_cat[rp[R_W * k + 2]] |= (<uint64_t>1) << k
        else:
            pl.scope_sku[rp[R_W * k + 2]] |= (<uint64_t>1) << k
        if rp[R_W * k + 3] == 1:
            for v in range(256):
                if (v >> (k & 7)) & 1:
                    pl.btab[k >> 3][v] += rp[R_W * k + 4]
    pl.nbb = (nrules + 7) // 8
    # rules: a condition in the word is a table entry, no condition always holds, the rest one by one
    for k in range(nrules):
        _place(pl.rtab, &pl.ncb, &pl.rule_always, pl.slow_rule, &pl.nslow, pl.cfast, rp[R_W * k + 0], k)
    # offers likewise, when none is exclusive (an exclusive one makes their order matter)
    pl.offers_by_word = True
    for k in range(noff):
        if ofp[O_W * k + 1] != 0:
            pl.offers_by_word = False
        if ofp[O_W * k + 4] or ofp[O_W * k + 5] or ofp[O_W * k + 7]:
            pl.offer_limited |= (<uint64_t>1) << k
        if ofp[O_W * k + 2] == 4:
            pl.offer_discount |= (<uint64_t>1) << k
        _place(pl.otab, &pl.ocb, &pl.offer_always, pl.slow_offer, &pl.nslow_off, pl.cfast, ofp[O_W * k + 0], k)
    pl.tiers_rise = True
    for k in range(nt):
        if k and tp[T_W * k] < tp[T_W * (k - 1)]:
            pl.tiers_rise = False
        if tp[T_W * k + 2]:
            pl.tier_discount = True
        if tp[T_W * k + 3]:
            pl.tier_cashback = True


cdef inline void _interval(FAtom* fa) noexcept nogil:
    """A fact against a constant (truth table ``tab`` over <, ==, > of facts[a] and c) as an interval
    [lo, lo + span] of facts[a], or its complement when ``neg``: every table is one."""
    cdef int64_t c = fa.c, t = fa.tab
    fa.neg = 0
    if t == 2 or t == 5:                        # == c, != c
        fa.lo = c
        fa.span = 0
        fa.neg = t == 5
    elif t == 3 or t == 7:                      # <= c; anything
        fa.lo = INT64_MIN
        fa.span = <uint64_t>c - <uint64_t>INT64_MIN if t == 3 else <uint64_t>0 - 1
    elif t == 6:                                # >= c
        fa.lo = c
        fa.span = <uint64_t>INT64_MAX - <uint64_t>c
    elif t == 1 and c != INT64_MIN:             # < c
        fa.lo = INT64_MIN
        fa.span = <uint64_t>(c - 1) - <uint64_t>INT64_MIN
    elif t == 4 and c != INT64_MAX:             # > c
        fa.lo = c + 1
        fa.span = <uint64_t>INT64_MAX - <uint64_t>(c + 1)
    else:                                       # nothing (also < the least, > the greatest)
        fa.lo = INT64_MIN
        fa.span = <uint64_t>0 - 1
        fa.neg = 1


cdef int64_t _evaluate(const int64_t[::1] code, const int64_t[::1] pool, const int64_t[:, ::1] conds,
                       const int64_t[:, ::1] rules, const int64_t[:, ::1] offers, const int64_t[:, ::1] tiers,
                       const int64_t[::1] params, const RowIn[::1] rows, const int64_t[::1] seg_of,
                       const int32_t[::1] item_cat, const int32_t[::1] item_sku, const int64_t[::1] item_amount,
                       MState[::1] members, const int64_t[::1] hist_off, const HEv[::1] hist,
                       int64_t[::1] out_off, HEv[::1] out_hist, int64_t[:, :, ::1] offer_use,
                       int64_t[::1] budget_used, RowOut[::1] out, int64_t[:, ::1] facts_out, Win* win,
                       TWin* twin, const int64_t* seg_info, int64_t nseg, const Plan* plan) noexcept nogil:
    cdef Py_ssize_t n = rows.shape[0], nrules = rules.shape[0], noff = offers.shape[0]
    cdef Py_ssize_t nt = tiers.shape[0], ncond = conds.shape[0]
    cdef Py_ssize_t i, j, k, s
    cdef const int64_t* cp = &code[0] if code.shape[0] else NULL
    cdef const int64_t* pp = &pool[0]
    cdef const int64_t* condp = &conds[0, 0] if ncond else NULL
    cdef const int64_t* tp = &tiers[0, 0] if nt else NULL
    cdef const int64_t* rp = &rules[0, 0] if nrules else NULL
    cdef const int64_t* ofp = &offers[0, 0] if noff else NULL
    cdef int64_t* oup = NULL
    cdef Py_ssize_t ou_stride = offer_use.shape[1] * 3 if noff else 0
    cdef int64_t facts[N_FACTS + 1]     # the last slot is 1 (an atom against a constant is c * facts[N_FACTS])
    cdef int64_t cat_amt[64]
    # the plan's atoms, tested once a row into the bits of ``abits``, with their facts' addresses; the
    # predicates' truths are then the bits of ``cw`` (table look-ups and mask tests)
    cdef FAtom fat[64]          # by group: constant comparisons, other comparisons, small sets, the rest
    cdef FAtom* fa
    cdef const Py_ssize_t* gend = &plan.gend[0]
    cdef const int64_t* g0f = &plan.g0_fact[0]
    cdef const int64_t* g0lo = &plan.g0_lo[0]
    cdef const uint64_t* g0sp = &plan.g0_span[0]
    cdef const int8_t* cfast = plan.cfast
    cdef Py_ssize_t n_memo = plan.n_memo
    cdef uint64_t rok, bits, mult_rules = 0, bonus_rules = 0, mult_offers = 0
    cdef uint64_t abits, cw, om, ub
    cdef int64_t ax, ay
    cdef const int64_t* atp
    cdef int64_t sku_amt[64]
    cdef int64_t fired_cond[64]
    cdef Win* ws
    cdef TWin* tw = NULL
    cdef MState* m
    cdef int64_t rate_pts = params[P_RATE_POINTS], rate_per = params[P_RATE_PER], rmode = params[P_ROUNDING]
    cdef int64_t stacking = params[P_STACKING], window = params[P_TIER_WINDOW], review = params[P_REVIEW]
    cdef int64_t tmetric = params[P_TIER_METRIC], horizon = params[P_HORIZON], tperiod = params[P_TIER_PERIOD]
    # (the parameters a row reads, in locals: a store through the member's state might alias params)
    cdef int64_t cap_receipt = params[P_CAP_RECEIPT], cap_day = params[P_CAP_DAY], min_basket = params[P_MIN_BASKET]
    cdef int64_t bday_pts = params[P_BDAY_POINTS], anniv_pts = params[P_ANNIV_POINTS]
    cdef int64_t ref_referred = params[P_REF_REFERRED], ref_referrer = params[P_REF_REFERRER]
    cdef int64_t tstart
    cdef int64_t p0, p, lo30, lo90, lo365, c30, c90, c365, a30, a90, a365
    cdef int64_t lot = 0, tc = 0, ta = 0, tpts = 0
    cdef int64_t d, amount, f, paid, disc, burn_money, earned, base, bonus, evpts, credit, give
    cdef int64_t y, mo, dd, occ, metric, tnew, items_total, q, base_at, b_next
    cdef int32_t saved_tier, saved_review
    cdef i128 S
    cdef bint any_fired, excl
    cdef int64_t offers_mask, rules_mask, cidx
    cdef Py_ssize_t first_item, last_item
    cdef Py_ssize_t prev_first = 0, prev_last = 0
    for k in range(64):
        cat_amt[k] = 0
        sku_amt[k] = 0
    facts[N_FACTS] = 1
    for k in range(plan.natoms):
        fat[k] = plan.fat[k]
        fat[k].pa = &facts[fat[k].a]
    for k in range(nrules):             # (the caller allows at most 64 rules and 64 offers)
        if rp[R_W * k + 3] == 0:
            mult_rules |= (<uint64_t>1) << k
        elif rp[R_W * k + 3] == 1:
            bonus_rules |= (<uint64_t>1) << k
    for k in range(noff):
        if ofp[O_W * k + 2] == 1:
            mult_offers |= (<uint64_t>1) << k
    # lay the segments out: each gets room for its history and its rows
    base_at = 0
    for s in range(nseg):
        ws = win + s
        p = base_at
        c365 = a365 = tpts = 0
        for j in range(hist_off[s], hist_off[s + 1]):
            out_hist[p] = hist[j]
            c365 += hist[j].visits
            a365 += hist[j].amount
            tpts += hist[j].points
            p += 1
        ws.base = base_at
        ws.p = <int32_t>(p - base_at)
        ws.lo30 = ws.lo90 = ws.lo365 = 0
        ws.c30 = ws.c90 = ws.c365 = <int32_t>c365
        ws.a30 = ws.a90 = ws.a365 = a365
        if twin != NULL:
            twin[s].lot = 0
            twin[s].tc = <int32_t>c365
            twin[s].ta = a365
            twin[s].tpts = tpts
        base_at = p + seg_info[2 * s + 1]
    tpts = 0
    for i in range(n):
        # memory, not arithmetic, is the cost with many members: fetch the state of the member two
        # prefetch distances ahead (every cache line of its state and offer use), and the history slots
        # its windows point at one distance ahead
        if i + 2 * PF_ROWS < n:
            j = rows[i + 2 * PF_ROWS].member
            s = seg_of[i + 2 * PF_ROWS]
            LE_PREFETCH(win + s)
            if twin != NULL:
                LE_PREFETCH(twin + s)
            LE_PREFETCH(&members[j])
            LE_PREFETCH(<char*>&members[j] + sizeof(MState) - 1)
            if noff:
                atp = &offer_use[j, 0, 0]
                LE_PREFETCH(atp)
                LE_PREFETCH(atp + 8)
                LE_PREFETCH(atp + ou_stride - 1)
        if i + PF_ROWS < n:
            ws = win + seg_of[i + PF_ROWS]
            q = ws.base
            LE_PREFETCH(&out_hist[q + ws.p])
            if ws.p > 0:
                LE_PREFETCH(&out_hist[q + ws.p - 1])
            LE_PREFETCH(&out_hist[q + ws.lo30])
            LE_PREFETCH(&out_hist[q + ws.lo90])
            LE_PREFETCH(&out_hist[q + ws.lo365])
            if twin != NULL:
                LE_PREFETCH(&out_hist[q + twin[seg_of[i + PF_ROWS]].lot])
        d = rows[i].day
        m = &members[rows[i].member]
        if noff:
            oup = &offer_use[0, 0, 0] + rows[i].member * ou_stride
        ws = win + seg_of[i]
        p0 = ws.base; p = p0 + ws.p; lo30 = p0 + ws.lo30; lo90 = p0 + ws.lo90; lo365 = p0 + ws.lo365
        c30 = ws.c30; c90 = ws.c90; c365 = ws.c365; a30 = ws.a30; a90 = ws.a90; a365 = ws.a365
        if twin != NULL:
            tw = twin + seg_of[i]
            lot = p0 + tw.lot; tc = tw.tc; ta = tw.ta; tpts = tw.tpts
        if True:
            memset(&out[i], 0, sizeof(RowOut))
            out[i].tier_before = m.tier
            out[i].referrer = -1
            if d < m.last_day:
                out[i].status = ST_OUT_OF_ORDER
                out[i].tier_after = m.tier
                continue
            # windows: the W days ending today, purchases before this one
            while lo30 < p and out_hist[lo30].day < d - 29:
                c30 -= out_hist[lo30].visits; a30 -= out_hist[lo30].amount; lo30 += 1
            while lo90 < p and out_hist[lo90].day < d - 89:
                c90 -= out_hist[lo90].visits; a90 -= out_hist[lo90].amount; lo90 += 1
            while lo365 < p and out_hist[lo365].day < d - 364:
                c365 -= out_hist[lo365].visits; a365 -= out_hist[lo365].amount; lo365 += 1
            if tw != NULL:      # the tier window, where it is not the 365-day one
                tstart = period_start(d, tperiod) if tperiod else d - window + 1
                while lot < p and out_hist[lot].day < tstart:
                    tc -= out_hist[lot].visits; ta -= out_hist[lot].amount; tpts -= out_hist[lot].points; lot += 1
            # tier review (downgrades happen only at a period end, after the grace days); a refused
            # row changes nothing, so remember what the review may change
            saved_tier = m.tier
            saved_review = m.review_day
            if nt and review:
                while d >= m.review_day + params[P_GRACE]:
                    if tperiod:     # the calendar period that ended the day before the review
                        metric = _window_metric(out_hist, p0, p, period_start(m.review_day - 1, tperiod) - 1,
                                                m.review_day - 1, tmetric, &params[P_RFM])
                    else:
                        metric = _window_metric(out_hist, p0, p, m.review_day - window - 1, m.review_day - 1,
                                                tmetric, &params[P_RFM])
                    tnew = tier_for(tp, nt, metric)
                    if tnew < m.tier:
                        m.tier = <int32_t>tnew
                    m.review_day = <int32_t>next_boundary(m.review_day, review)
                out[i].tier_before = m.tier
            amount = rows[i].amount
            facts[F_AMOUNT] = amount
            facts[F_QUANTITY] = rows[i].quantity
            facts[F_HOUR] = rows[i].hour
            facts[F_WEEKDAY] = rows[i].weekday
            facts[F_DATE] = d
            facts[F_MONTH] = rows[i].month
            facts[F_DOM] = rows[i].dom
            facts[F_BRANCH] = rows[i].branch
            facts[F_CHANNEL] = rows[i].channel
            facts[F_CATS] = rows[i].cats
            facts[F_SKUS] = rows[i].skus
            facts[F_FIRST] = m.purchases == 0
            facts[F_SINCE] = d - m.last_day if m.last_day >= 0 and m.purchases > 0 else -1
            facts[F_V30] = c30
            facts[F_V90] = c90
            facts[F_V365] = c365
            facts[F_S30] = a30
            facts[F_S90] = a90
            facts[F_S365] = a365
            facts[F_AVG] = a365 // c365 if c365 else 0
            facts[F_GAP] = (out_hist[p - 1].day - out_hist[lo365].day) // (c365 - 1) if c365 >= 2 else 0
            facts[F_TIER] = m.tier
            facts[F_POINTS] = m.points
            facts[F_CREDIT] = m.credit
            if m.birth_md > 0 or anniv_pts:   # the calendar only when a date needs it
                civil_from_days(d, &y, &mo, &dd)
            if m.birth_md > 0:
                b_next = md_in_year(y, m.birth_md)
                if b_next < d:
                    b_next = md_in_year(y + 1, m.birth_md)
                facts[F_BDAY] = b_next - d
            else:
                facts[F_BDAY] = -1
            facts[F_MDAYS] = d - m.enroll_day
            facts[F_REFERRED] = m.referred
            # the basket's items: amounts per category and SKU, one line each
            first_item = rows[i].item_start
            last_item = rows[i].item_end
            items_total = 0
            if plan.basket_amounts:                     # some condition reads them
                for j in range(prev_first, prev_last):  # clear what the previous row set
                    cat_amt[item_cat[j]] = 0
                    sku_amt[item_sku[j]] = 0
                for j in range(first_item, last_item):
                    cat_amt[item_cat[j]] += item_amount[j]
                    sku_amt[item_sku[j]] += item_amount[j]
                    items_total += item_amount[j]
                prev_first = first_item
                prev_last = last_item
            else:
                for j in range(first_item, last_item):
                    items_total += item_amount[j]
            if facts_out.shape[0]:
                for k in range(N_FACTS):
                    facts_out[i, k] = facts[k]
            # conditions of rules and offers, each evaluated once (the memo serves the ones that are
            # not predicates among the first 64: when there are none it is never read)
            if n_memo:
                for k in range(ncond if ncond < 64 else 64):
                    fired_cond[k] = -1
            # atom k is bit k: the groups run from the last atom down, each result shifted in below (the
            # negated ones are turned round together at the end)
            abits = 0
            for k in range(gend[4] - 1, gend[3] - 1, -1):
                abits = (abits << 1) | <uint64_t>_atom(fat[k].ptr, pp, facts, cat_amt, sku_amt)
            for k in range(gend[3] - 1, gend[2] - 1, -1):     # in a list of small numbers
                fa = &fat[k]
                ax = fa.pa[0]
                abits = (abits << 1) | (((<uint64_t>fa.c >> (ax & 63)) & (<uint64_t>ax < 64)))
            for k in range(gend[2] - 1, gend[1] - 1, -1):     # against a multiple of a fact
                fa = &fat[k]
                ax = fa.pa[0] & fa.am
                ay = <int64_t>(<uint64_t>fa.c * <uint64_t>facts[fa.b])    # as the stack machine's product
                abits = (abits << 1) | <uint64_t>((fa.tab >> ((ax > ay) - (ax < ay) + 1)) & 1)
            for k in range(gend[1] - 1, gend[0] - 1, -1):     # a bit of a fact
                fa = &fat[k]
                abits = (abits << 1) | <uint64_t>((fa.pa[0] & fa.am) != 0)
            k = gend[0] - 1                                   # a fact against a constant: an interval
            if k & 1 == 0:                                    # (two a step)
                abits = (abits << 1) | <uint64_t>(<uint64_t>facts[g0f[k]] - <uint64_t>g0lo[k] <= g0sp[k])
                k -= 1
            while k > 0:
                abits = ((abits << 2) | (<uint64_t>(<uint64_t>facts[g0f[k]] - <uint64_t>g0lo[k] <= g0sp[k]) << 1)
                         | <uint64_t>(<uint64_t>facts[g0f[k - 1]] - <uint64_t>g0lo[k - 1] <= g0sp[k - 1]))
                k -= 2
            abits ^= plan.negmask
            # the predicates' truths: any of their atoms (or the one) by table; all of several unless
            # the complement's table names one that fails
            cw = plan.cw_const
            om = 0
            for k in range(plan.nab):
                j = (abits >> (8 * k)) & 0xff
                cw |= plan.atab[k][j]
                om |= plan.ftab[k][j ^ 0xff]
            cw |= plan.all_conds & ~om
            # offers, highest priority first
            offers_mask = 0
            any_fired = False
            disc = 0
            if plan.tier_discount and m.tier > 0:      # (no tier of the program gives a discount: 0)
                disc = mul_bp(amount, tp[4 * (m.tier - 1) + 2])
            if plan.offers_by_word:
                om = plan.offer_always
                for k in range(plan.ocb):
                    om |= plan.otab[k][(cw >> (8 * k)) & 0xff]
                for j in range(plan.nslow_off):
                    k = plan.slow_offer[j]
                    if _cond(cp, condp, ofp[O_W * k + 0], pp, facts, cat_amt, sku_amt, fired_cond):
                        om |= (<uint64_t>1) << k
                bits = om & plan.offer_limited
                while bits:
                    k = LE_CTZ(bits)
                    bits &= bits - 1
                    if ((ofp[O_W * k + 4] and oup[3 * k + 0] >= ofp[O_W * k + 4])
                            or (ofp[O_W * k + 5] and oup[3 * k + 1] and d - oup[3 * k + 2] < ofp[O_W * k + 6]
                                and oup[3 * k + 1] >= ofp[O_W * k + 5])
                            or (ofp[O_W * k + 7] and budget_used[k] >= ofp[O_W * k + 7])):
                        om &= ~((<uint64_t>1) << k)
                offers_mask = <int64_t>om
                bits = om & plan.offer_discount
                while bits:
                    k = LE_CTZ(bits)
                    bits &= bits - 1
                    disc += mul_bp(amount, ofp[O_W * k + 3])
            for k in range(noff if not plan.offers_by_word else 0):
                excl = ofp[O_W * k + 1] != 0
                if excl and any_fired:
                    continue
                if ofp[O_W * k + 4] and oup[3 * k + 0] >= ofp[O_W * k + 4]:
                    continue
                if ofp[O_W * k + 5]:
                    if oup[3 * k + 1] and d - oup[3 * k + 2] < ofp[O_W * k + 6]:
                        if oup[3 * k + 1] >= ofp[O_W * k + 5]:
                            continue
                if ofp[O_W * k + 7] and budget_used[k] >= ofp[O_W * k + 7]:
                    continue
                cidx = ofp[O_W * k + 0]
                if cidx >= 0 and not _cv(cidx, cfast, cw, cp, condp, pp, facts, cat_amt, sku_amt, fired_cond):
                    continue
                offers_mask |= (<int64_t>1) << k
                any_fired = True
                if ofp[O_W * k + 2] == 4:   # discount_percent
                    disc += mul_bp(amount, ofp[O_W * k + 3])
                if excl:
                    break
            if disc > amount:
                disc = amount
            # redemption
            burn_money = 0
            if rows[i].redeem > 0:
                q = rows[i].redeem
                if params[P_BURN_VALUE] == 0:
                    out[i].status = ST_REDEEM_DISABLED
                elif q < params[P_BURN_MIN]:
                    out[i].status = ST_REDEEM_BELOW_MIN
                elif q % params[P_BURN_STEP] != 0:
                    out[i].status = ST_REDEEM_STEP
                elif q > m.points:
                    out[i].status = ST_REDEEM_INSUFFICIENT
                else:
                    burn_money = <int64_t>((<i128>q * params[P_BURN_VALUE]) // params[P_BURN_POINTS])
                    if <i128>burn_money * BP > <i128>(amount - disc) * params[P_BURN_SHARE]:
                        out[i].status = ST_REDEEM_SHARE
                if out[i].status != ST_OK:
                    m.tier = saved_tier
                    m.review_day = saved_review
                    out[i].tier_before = m.tier
                    out[i].tier_after = m.tier
                    out[i].discount = 0
                    continue
            paid = amount - disc - burn_money
            out[i].discount = disc
            out[i].redeemed = rows[i].redeem
            out[i].redeem_value = burn_money
            out[i].paid = paid
            # earning: one line per item (or the whole basket), each with its stacked multiplier
            rules_mask = 0
            bonus = 0
            earned = 0
            base = 0
            if amount >= min_basket and rate_pts > 0 and paid > 0:
                if last_item == first_item:
                    items_total = amount
                S = 0
                base = round_div(<i128>paid * rate_pts, <i128>rate_per, rmode)
                # the rules whose conditions hold, once a row; multipliers then stack in rule order
                rok = plan.rule_always
                for k in range(plan.ncb):
                    rok |= plan.rtab[k][(cw >> (8 * k)) & 0xff]
                for j in range(plan.nslow):
                    k = plan.slow_rule[j]
                    if _cond(cp, condp, rp[R_W * k + 0], pp, facts, cat_amt, sku_amt, fired_cond):
                        rok |= (<uint64_t>1) << k
                if last_item - first_item <= 1:
                    # one line, the basket or its one item: its amount cancels out of its share of the
                    # paid amount, and the stacked multiplier alone decides
                    if last_item == first_item:
                        bits = rok & mult_rules & plan.scope_basket
                        items_total = amount
                    else:
                        bits = rok & mult_rules & (plan.scope_basket | plan.scope_cat[item_cat[first_item]]
                                                   | plan.scope_sku[item_sku[first_item]])
                    rules_mask |= <int64_t>bits
                    f = _line_factor(bits, <uint64_t>offers_mask & mult_offers, rp, ofp, stacking, nt and m.tier > 0,
                                     tp[4 * (m.tier - 1) + 1] if nt and m.tier > 0 else 0)
                    earned = round_div(<i128>f * paid * rate_pts, <i128>rate_per * BP, rmode) if items_total > 0 else 0
                else:
                    for j in range(first_item, last_item):      # each item with the rules of its scope
                        bits = rok & mult_rules & (plan.scope_basket | plan.scope_cat[item_cat[j]]
                                                   | plan.scope_sku[item_sku[j]])
                        rules_mask |= <int64_t>bits
                        f = _line_factor(bits, <uint64_t>offers_mask & mult_offers, rp, ofp, stacking,
                                         nt and m.tier > 0, tp[4 * (m.tier - 1) + 1] if nt and m.tier > 0 else 0)
                        S += <i128>item_amount[j] * f
                    earned = (round_div(S * paid * rate_pts, <i128>items_total * rate_per * BP, rmode)
                              if items_total > 0 else 0)
                out[i].base_points = base
                out[i].rule_points = earned - base
                # fixed bonuses: the rules that hold whose scope is in the basket (summed by table)
                bits = rok & bonus_rules
                if bits:
                    om = plan.scope_basket
                    ub = <uint64_t>rows[i].cats
                    while ub:
                        om |= plan.scope_cat[LE_CTZ(ub)]
                        ub &= ub - 1
                    ub = <uint64_t>rows[i].skus
                    while ub:
                        om |= plan.scope_sku[LE_CTZ(ub)]
                        ub &= ub - 1
                    bits &= om
                    rules_mask |= <int64_t>bits
                    for k in range(plan.nbb):
                        bonus += plan.btab[k][(bits >> (8 * k)) & 0xff]
            # offers' points and credit (budgets cap what an offer gives)
            credit = 0
            if plan.tier_cashback and m.tier > 0:
                credit = mul_bp(paid, tp[4 * (m.tier - 1) + 3])
            bits = <uint64_t>offers_mask
            while bits:
                k = LE_CTZ(bits)
                bits &= bits - 1
                give = 0
                if ofp[O_W * k + 2] == 0:
                    give = ofp[O_W * k + 3]
                elif ofp[O_W * k + 2] == 2:
                    give = mul_bp(paid, ofp[O_W * k + 3])
                elif ofp[O_W * k + 2] == 3:
                    give = ofp[O_W * k + 3]
                if ofp[O_W * k + 7] and give > ofp[O_W * k + 7] - budget_used[k]:
                    give = ofp[O_W * k + 7] - budget_used[k]
                if ofp[O_W * k + 7]:
                    budget_used[k] += give
                if ofp[O_W * k + 2] == 0:
                    bonus += give
                elif ofp[O_W * k + 2] == 2 or ofp[O_W * k + 2] == 3:
                    credit += give
                # usage
                oup[3 * k + 0] += 1
                if ofp[O_W * k + 5]:
                    if oup[3 * k + 1] == 0 or d - oup[3 * k + 2] >= ofp[O_W * k + 6]:
                        oup[3 * k + 1] = 0
                        oup[3 * k + 2] = d
                    oup[3 * k + 1] += 1
            out[i].bonus_points = bonus
            earned += bonus
            # caps (per receipt, then per day)
            if m.earn_day != d:
                m.earn_day = <int32_t>d
                m.earned_today = 0
            q = earned
            if cap_receipt and q > cap_receipt:
                q = cap_receipt
            if cap_day:
                if m.earned_today >= cap_day:
                    q = 0
                elif q > cap_day - m.earned_today:
                    q = cap_day - m.earned_today
            out[i].capped = earned - q
            earned = q
            m.earned_today += earned
            # event bonuses: birthday and anniversary (once a year, within N days), referral
            evpts = 0
            if bday_pts and m.birth_md > 0:
                occ = _occurrence(d, y, m.birth_md, params[P_BDAY_WITHIN], m.bday_year)
                if occ > 0:
                    m.bday_year = <int32_t>occ
                    evpts += bday_pts
            if anniv_pts:
                civil_from_days(m.enroll_day, &q, &mo, &dd)
                occ = _occurrence(d, y, mo * 100 + dd, params[P_ANNIV_WITHIN],
                                  m.anniv_year if m.anniv_year > q else q)
                if occ > 0:
                    m.anniv_year = <int32_t>occ
                    evpts += anniv_pts
            if m.purchases == 0 and m.referred and m.referrer >= 0:
                evpts += ref_referred
                if ref_referrer:
                    out[i].referrer_points = ref_referrer
                    out[i].referrer = m.referrer
                    members[m.referrer].points += ref_referrer
            out[i].event_points = evpts
            out[i].points = earned + evpts
            out[i].credit = credit
            out[i].rules_fired = rules_mask
            out[i].offers_fired = offers_mask
            m.points += earned + evpts - rows[i].redeem
            m.credit += credit
            m.purchases += 1
            m.last_day = <int32_t>d
            # this purchase joins the history and every window
            out_hist[p].day = <int32_t>d
            out_hist[p].visits = 1
            out_hist[p].amount = amount
            out_hist[p].points = earned + evpts
            p += 1
            c30 += 1; c90 += 1; c365 += 1; tc += 1
            a30 += amount; a90 += amount; a365 += amount; ta += amount; tpts += earned + evpts
            if nt:
                if tw != NULL:
                    metric = metric_of(tmetric, tc, ta, tpts, 0, &params[P_RFM])
                else:           # the 365-day window, and the metric is not points
                    metric = metric_of(tmetric, c365, a365, 0, 0, &params[P_RFM])
                if plan.tiers_rise:     # the tiers the member has not reached, from the next one up
                    while m.tier < nt and tp[T_W * m.tier] <= metric:
                        m.tier += 1
                else:
                    tnew = tier_for(tp, nt, metric)
                    if tnew > m.tier:
                        m.tier = <int32_t>tnew
            out[i].tier_after = m.tier
            ws.p = <int32_t>(p - p0); ws.lo30 = <int32_t>(lo30 - p0); ws.lo90 = <int32_t>(lo90 - p0)
            ws.lo365 = <int32_t>(lo365 - p0)
            ws.c30 = <int32_t>c30; ws.c90 = <int32_t>c90; ws.c365 = <int32_t>c365
            ws.a30 = a30; ws.a90 = a90; ws.a365 = a365
            if tw != NULL:
                tw.lot = <int32_t>(lot - p0); tw.tc = <int32_t>tc; tw.ta = ta; tw.tpts = tpts
    # keep each segment's horizon and pack the segments together
    out_off[0] = 0
    base_at = 0
    for s in range(nseg):
        p0 = win[s].base
        p = p0 + win[s].p
        j = p0
        if p > p0:
            q = out_hist[p - 1].day - horizon + 1
            while j < p and out_hist[j].day < q:
                j += 1
        while j < p:
            out_hist[base_at] = out_hist[j]
            base_at += 1
            j += 1
        out_off[s + 1] = base_at
    return nseg


cdef inline int64_t mul_bp(int64_t a, int64_t b) noexcept nogil:
    """a * b / BP, truncated, exact for any int64 operands (128-bit only when the product needs it)."""
    cdef int64_t r
    if not LE_MUL_OVERFLOW(a, b, &r):
        return r // BP
    return <int64_t>((<i128>a * b) // BP)


cdef inline int64_t _line_factor(uint64_t bits, uint64_t obits, const int64_t* rp, const int64_t* ofp,
                                 int64_t stacking, bint tiered, int64_t tier_mult) noexcept nogil:
    """A line's stacked multiplier (BP is x1): the rules ``bits`` in rule order, then the multiplier
    offers ``obits``, then the member's tier's when ``tiered``."""
    cdef int64_t f = BP
    cdef int k
    while bits:
        k = LE_CTZ(bits)
        bits &= bits - 1
        f = _stack(f, rp[R_W * k + 4], stacking)
    while obits:
        k = LE_CTZ(obits)
        obits &= obits - 1
        f = _stack(f, ofp[O_W * k + 3], stacking)
    if tiered:
        f = mul_bp(f, tier_mult)
    return f


cdef inline int64_t _stack(int64_t f, int64_t mult, int64_t stacking) noexcept nogil:
    if stacking == 0:
        return mul_bp(f, mult)
    if stacking == 1:
        return f + mult - BP
    return mult if mult > f else f


cdef inline bint _atom(const int64_t* at, const int64_t* pp, const int64_t* facts, const int64_t* cat_amt,
                       const int64_t* sku_amt) noexcept nogil:
    """One predicate atom's truth (five words: kind, op, a, b, c; see rules.expr.A_*)."""
    cdef int64_t kind = at[0], op = at[1], x, y, k, i
    if kind == A_FACT:
        x = facts[at[2]]
        y = at[4]
    elif kind == A_SCALED:
        x = facts[at[2]]
        y = <int64_t>(<uint64_t>at[4] * <uint64_t>facts[at[3]])
    elif kind == A_BIT:
        return <int64_t>((facts[at[2]] >> at[4]) & 1) != op
    elif kind == A_MASK:
        x = facts[at[2]]
        if x < 0 or x >= 64:
            return op != 0
        return <int64_t>((<uint64_t>at[4] >> x) & 1) != op
    elif kind == A_TRUTH:
        return <int64_t>(facts[at[2]] != 0) != op
    elif kind == A_CAT or kind == A_SKU:
        k = at[2]
        x = (cat_amt[k] if kind == A_CAT else sku_amt[k]) if 0 <= k < 64 else 0
        y = at[4]
    elif kind == A_IN:
        x = facts[at[2]]
        k = pp[at[4]]
        for i in range(k):
            if pp[at[4] + 1 + i] == x:
                return not op
        return op != 0
    elif kind == A_RANGES:
        x = facts[at[2]]
        k = pp[at[4]]
        for i in range(k):
            if pp[at[4] + 1 + 2 * i] <= x <= pp[at[4] + 2 + 2 * i]:
                return not op
        return op != 0
    else:   # A_CONST
        return <int64_t>(at[4] != 0) != op
    if op == 0:
        return x == y
    if op == 1:
        return x != y
    if op == 2:
        return x < y
    if op == 3:
        return x <= y
    if op == 4:
        return x > y
    return x >= y


cdef inline bint _cv(int64_t c, const int8_t* cfast, uint64_t cw, const int64_t* cp, const int64_t* condp,
                     const int64_t* pp, const int64_t* facts, const int64_t* cat_amt, const int64_t* sku_amt,
                     int64_t* memo) noexcept nogil:
    """Condition ``c``'s truth: bit c of the row's condition word for a predicate among the first 64
    conditions, else :func:`_cond`."""
    if c < 64 and cfast[c]:
        return (cw >> c) & 1
    return _cond(cp, condp, c, pp, facts, cat_amt, sku_amt, memo)


cdef inline bint _cond(const int64_t* cp, const int64_t* condp, int64_t c, const int64_t* pp,
                       const int64_t* facts, const int64_t* cat_amt, const int64_t* sku_amt,
                       int64_t* memo) noexcept nogil:
    """Condition ``c``'s truth for this row (memoised for the first 64 conditions); ``condp`` is the
    conditions table (C_NCOL words a row) as a flat pointer (a memoryview argument would cost two atomic
    operations a call). A condition that is a predicate (all or any of its atoms) is tested atom by
    atom; others run on the stack machine."""
    cdef int64_t v, mode, k, n
    cdef const int64_t* row = condp + C_NCOL * c
    cdef const int64_t* at
    if c < 64 and memo[c] >= 0:
        return memo[c] != 0
    mode = row[2]
    if mode == 1 or mode == 2:
        at = pp + row[3]
        n = row[4]
        v = mode == 1
        for k in range(n):
            if _atom(at + 5 * k, pp, facts, cat_amt, sku_amt) != (mode == 1):
                v = mode != 1
                break
    else:
        v = vm(cp, row[0], row[1], pp, facts, cat_amt, sku_amt) != 0
    if c < 64:
        memo[c] = v
    return v != 0


cdef inline int64_t _window_metric(const HEv[::1] h, int64_t p0, int64_t p, int64_t lo, int64_t hi,
                                   int64_t kind, const int64_t* rfm) noexcept nogil:
    """The metric over the events of days (lo, hi], recency counted at ``hi``."""
    cdef int64_t k, c = 0, a = 0, pts = 0, last = -(1 << 40)
    for k in range(p0, p):
        if lo < h[k].day <= hi:
            c += h[k].visits
            a += h[k].amount
            pts += h[k].points
            if h[k].visits and h[k].day > last:
                last = h[k].day
    return metric_of(kind, c, a, pts, hi - last, rfm)


cdef inline int64_t _trim(HEv[::1] h, int64_t p0, int64_t p, int64_t keep_from) noexcept nogil:
    """Drop the segment's events before day ``keep_from``; returns the new end."""
    cdef int64_t k = p0, w
    while k < p and h[k].day < keep_from:
        k += 1
    if k == p0:
        return p
    w = p0
    while k < p:
        h[w] = h[k]
        w += 1
        k += 1
    return w


cdef inline int64_t _occurrence(int64_t d, int64_t y, int64_t md, int64_t within, int64_t last_year) noexcept nogil:
    """The year whose occurrence of month-day ``md`` lies within ``within`` days of day ``d`` and is
    later than ``last_year`` (when it was last rewarded), or -1."""
    cdef int64_t yy, b
    for yy in range(y - 1, y + 2):
        b = md_in_year(yy, md)
        if b - within <= d <= b + within and yy > last_year:
            return yy
    return -1


# ===================================================================================================
# Codes: the Damm check digit and FF1's digit arithmetic (codes.py runs the AES calls, one per round
# over the whole batch, through the `cryptography` package; see docs/codes.md)

cdef extern from *:
    ctypedef unsigned long long u128 "unsigned __int128"

# the Damm quasigroup of order 10 (Damm 2004): every single-digit error and every adjacent
# transposition changes the interim digit
cdef uint8_t DAMM[10][10]
DAMM[:] = [[0, 3, 1, 7, 5, 9, 8, 6, 4, 2], [7, 0, 9, 2, 1, 5, 4, 8, 6, 3], [4, 2, 0, 6, 8, 7, 1, 3, 5, 9],
           [1, 7, 5, 0, 9, 8, 3, 4, 2, 6], [6, 1, 2, 3, 0, 4, 5, 9, 7, 8], [3, 6, 7, 4, 2, 0, 9, 5, 8, 1],
           [5, 8, 6, 9, 7, 2, 0, 1, 3, 4], [8, 9, 4, 5, 3, 6, 2, 0, 1, 7], [9, 4, 3, 8, 6, 1, 7, 2, 0, 5],
           [2, 5, 8, 1, 4, 3, 6, 7, 9, 0]]


def damm_digits(const uint64_t[::1] values, int ndigits, uint8_t[::1] out):
    """The Damm check digit of each value written with ``ndigits`` decimal digits."""
    cdef Py_ssize_t i, n = values.shape[0]
    cdef int k
    cdef uint64_t v, p
    cdef uint8_t interim
    cdef uint64_t pow10[20]
    if ndigits < 1 or ndigits > 19 or out.shape[0] < n:
        raise ValueError("ndigits must be 1..19 and out as long as values")
    pow10[0] = 1
    for k in range(1, 20):
        pow10[k] = pow10[k - 1] * 10
    with nogil:
        for i in range(n):
            v = values[i]
            interim = 0
            for k in range(ndigits - 1, -1, -1):
                interim = DAMM[interim][(v // pow10[k]) % 10]
            out[i] = interim


cdef extern from *:
    """
    static inline uint64_t le_load64(const unsigned char* p) { uint64_t v; memcpy(&v, p, 8); return v; }
    """
    uint64_t le_load64(const uint8_t* p) nogil
    uint64_t __builtin_bswap64(uint64_t) nogil


cdef inline uint64_t _mod_const(uint64_t y, uint64_t modulus) noexcept nogil:
    # the compiler turns division by a literal into a multiply and a shift; the usual moduli get one
    if modulus == 10000:
        return y % 10000
    if modulus == 100000:
        return y % 100000
    if modulus & (modulus - 1) == 0:
        return y & (modulus - 1)
    return y % modulus


cdef extern from *:
    """
    static inline void st64(unsigned char* p, uint64_t v) { memcpy(p, &v, 8); }
    """
    void st64(uint8_t* p, uint64_t v) nogil


cdef inline void _ff1_blocks(uint8_t* bv, const uint64_t* src, Py_ssize_t m, const uint8_t* mask,
                             uint64_t mhi, uint64_t mlo_be, int nbytes, int rnd) noexcept nogil:
    """Round ``rnd``'s AES input blocks: the precomputed CBC state (``mask``) XOR [rnd] || NUM(B) in
    the last nbytes + 1 bytes, big-endian. With nbytes <= 7 that is two 8-byte stores per block."""
    cdef Py_ssize_t i
    cdef int k
    cdef uint64_t v, rterm
    cdef uint8_t* o
    if nbytes <= 7:
        rterm = (<uint64_t>rnd) << (8 * nbytes)
        for i in range(m):
            st64(bv + 16 * i, mhi)
            st64(bv + 16 * i + 8, __builtin_bswap64(mlo_be ^ rterm ^ src[i]))
    else:
        for i in range(m):
            o = bv + 16 * i
            memcpy(o, mask, 16)
            o[15 - nbytes] ^= <uint8_t>rnd
            v = src[i]
            for k in range(nbytes):
                o[15 - k] ^= <uint8_t>(v & 0xFF)
                v >>= 8


cdef inline void _ff1_absorb8(const uint8_t* rv, uint64_t* dst, Py_ssize_t m, uint64_t modulus,
                              bint decrypt) noexcept nogil:
    """dst = dst +/- (the first 8 bytes of each AES output, big-endian) mod ``modulus`` (d == 8).
    Inlined with a literal modulus the compiler turns the division into a multiply and a shift."""
    cdef Py_ssize_t i
    cdef uint64_t ym, c
    for i in range(m):
        ym = __builtin_bswap64(le_load64(rv + 16 * i)) % modulus
        c = dst[i]
        if decrypt:
            dst[i] = c - ym if c >= ym else c + (modulus - ym)
        else:
            c = c + ym
            dst[i] = c - modulus if c >= modulus else c


cdef void _ff1_absorb(const uint8_t* rv, uint64_t* dst, Py_ssize_t m, int d, uint64_t modulus,
                      bint decrypt) noexcept nogil:
    cdef Py_ssize_t i
    cdef int k
    cdef u128 y
    cdef uint64_t ym, c
    if d == 8:
        # the usual moduli get a loop of their own (radix 10 with 9 digits: 10**4 and 10**5)
        if modulus == 10000:
            _ff1_absorb8(rv, dst, m, 10000, decrypt)
        elif modulus == 100000:
            _ff1_absorb8(rv, dst, m, 100000, decrypt)
        else:
            _ff1_absorb8(rv, dst, m, modulus, decrypt)
        return
    for i in range(m):
        y = 0
        for k in range(d):
            y = (y << 8) | rv[16 * i + k]
        ym = <uint64_t>(y % modulus)
        c = dst[i]
        if decrypt:
            dst[i] = c - ym if c >= ym else c + (modulus - ym)
        else:
            # c + ym may exceed 2**64 only for moduli near 2**64; the comparison catches the wrap
            c = c + ym
            dst[i] = c - modulus if (c >= modulus or c < ym) else c


cdef void _ff1_chunk(uint64_t* a, uint64_t* b, Py_ssize_t m, const uint8_t[::1] mask, int nbytes, int d,
                     uint64_t mod_u, uint64_t mod_v, bint decrypt, object aes_into, object blocks,
                     object result, uint8_t* bv, const uint8_t* rv) except *:
    """Ten rounds over one chunk, in place. The halves never move: each round updates one of them
    and the roles swap (encrypting, round i adds to A and A, B become B, A; decrypting runs backwards)."""
    cdef int r, rnd
    cdef uint64_t modulus
    cdef uint64_t* p = a
    cdef uint64_t* q = b
    cdef uint64_t* t
    cdef uint64_t mhi = le_load64(&mask[0])
    cdef uint64_t mlo_be = __builtin_bswap64(le_load64(&mask[8]))
    bview = blocks[: 16 * m]
    rview = result[: 16 * m + 15]
    if decrypt:      # (A, B) after round i+1 = (p, q) = (B_i, ...): undo rounds 9..0
        p, q = b, a
    for r in range(10):
        rnd = 9 - r if decrypt else r
        modulus = mod_u if rnd % 2 == 0 else mod_v
        with nogil:
            _ff1_blocks(bv, q, m, &mask[0], mhi, mlo_be, nbytes, rnd)
        aes_into(bview, rview)
        with nogil:
            _ff1_absorb(rv, p, m, d, modulus, decrypt)
        t = p
        p = q
        q = t


def ff1_one(uint64_t x, const uint8_t[::1] mask, int nbytes, int d, uint64_t mod_u, uint64_t mod_v,
            bint decrypt, object aes_update):
    """FF1 of one value (a single check at the till): the same rounds as :func:`ff1_values` with no
    arrays to set up; ``aes_update`` is the AES-ECB encryptor's ``update`` (16 bytes in, 16 out)."""
    cdef uint64_t a[1]
    cdef uint64_t b[1]
    cdef uint8_t blk[16]
    cdef uint64_t* p = a
    cdef uint64_t* q = b
    cdef uint64_t* t
    cdef int r, rnd
    cdef uint64_t modulus
    cdef const uint8_t* rv
    if mask.shape[0] != 16 or nbytes < 1 or nbytes > 8 or d < 1 or d > 16 or mod_v == 0:
        raise ValueError("bad FF1 parameters")
    cdef uint64_t mhi = le_load64(&mask[0])
    cdef uint64_t mlo_be = __builtin_bswap64(le_load64(&mask[8]))
    a[0] = x // mod_v
    b[0] = x % mod_v
    if decrypt:
        p, q = b, a
    for r in range(10):
        rnd = 9 - r if decrypt else r
        modulus = mod_u if rnd % 2 == 0 else mod_v
        _ff1_blocks(blk, q, 1, &mask[0], mhi, mlo_be, nbytes, rnd)
        out = aes_update(PyBytes_FromStringAndSize(<char*>blk, 16))
        if not PyBytes_Check(out) or PyBytes_GET_SIZE(out) < 16:
            raise ValueError("aes_update must return 16 bytes")
        rv = <const uint8_t*>PyBytes_AS_STRING(out)
        _ff1_absorb(rv, p, 1, d, modulus, decrypt)
        t = p
        p = q
        q = t
    return a[0] * mod_v + b[0]


cdef tuple _ff1_buffers(bint lengths_match, const uint8_t[::1] mask, int nbytes, int d, Py_ssize_t chunk):
    """Check the FF1 parameters; the AES input and output buffers of one chunk."""
    if not lengths_match or mask.shape[0] != 16 or nbytes < 1 or nbytes > 8 or d < 1 or d > 16 or chunk < 1:
        raise ValueError("bad FF1 parameters")
    return np.empty(16 * chunk, np.uint8), np.empty(16 * chunk + 15, np.uint8)


def ff1_crypt(uint64_t[::1] xa, uint64_t[::1] xb, const uint8_t[::1] mask, int nbytes, int d,
              uint64_t mod_u, uint64_t mod_v, bint decrypt, object aes_into, Py_ssize_t chunk=4096):
    """All ten FF1 rounds, in place, over numerals given as their halves: ``xa`` = NUM of the first u
    digits, ``xb`` = NUM of the last v; ``chunk`` values at a time. ``aes_into(blocks, result)`` is the
    AES-ECB encryptor's ``update_into`` (one call per round per chunk). The loop and the digit
    arithmetic stay here; only AES is a Python call."""
    cdef Py_ssize_t n = xa.shape[0], start, m
    blocks, result = _ff1_buffers(xb.shape[0] == n, mask, nbytes, d, chunk)
    cdef uint8_t[::1] bv = blocks
    cdef uint8_t[::1] rv = result
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        _ff1_chunk(&xa[start], &xb[start], m, mask, nbytes, d, mod_u, mod_v, decrypt, aes_into, blocks, result,
                   &bv[0], &rv[0])


def ff1_values(const uint64_t[::1] x, uint64_t[::1] out, const uint8_t[::1] mask, int nbytes, int d,
               uint64_t mod_u, uint64_t mod_v, bint decrypt, object aes_into, Py_ssize_t chunk=4096):
    """FF1 over whole values (NUM of the numeral, < mod_u * mod_v) into ``out``: the split into halves
    and the join are done here, a chunk at a time, so no array of halves is ever made."""
    cdef Py_ssize_t n = x.shape[0], start, m, i
    blocks, result = _ff1_buffers(out.shape[0] == n, mask, nbytes, d, chunk)
    cdef uint8_t[::1] bv = blocks
    cdef uint8_t[::1] rv = result
    cdef uint64_t* a = <uint64_t*>malloc(chunk * sizeof(uint64_t))
    cdef uint64_t* b = <uint64_t*>malloc(chunk * sizeof(uint64_t))
    if a == NULL or b == NULL:
        free(a)
        free(b)
        raise MemoryError()
    try:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            with nogil:
                if mod_v == 100000:
                    for i in range(m):
                        a[i] = x[start + i] // 100000
                        b[i] = x[start + i] % 100000
                else:
                    for i in range(m):
                        a[i] = x[start + i] // mod_v
                        b[i] = x[start + i] % mod_v
            _ff1_chunk(a, b, m, mask, nbytes, d, mod_u, mod_v, decrypt, aes_into, blocks, result, &bv[0], &rv[0])
            with nogil:
                for i in range(m):
                    out[start + i] = a[i] * mod_v + b[i]
    finally:
        free(a)
        free(b)


def codes_format(const uint64_t[::1] values, int ndigits, bint check, uint32_t[:, ::1] out):
    """Write each value as ``ndigits`` decimal digits (UCS-4, for a NumPy 'U' array), followed by its
    Damm check digit when ``check``."""
    cdef Py_ssize_t i, n = values.shape[0]
    cdef int k
    cdef uint64_t v
    cdef uint8_t interim
    cdef uint32_t digit
    if ndigits < 1 or ndigits > 19 or out.shape[0] < n or out.shape[1] < ndigits + (1 if check else 0):
        raise ValueError("out must be (len(values), ndigits + check)")
    with nogil:
        for i in range(n):
            v = values[i]
            for k in range(ndigits - 1, -1, -1):
                out[i, k] = 48 + <uint32_t>(v % 10)
                v //= 10
            if check:
                interim = 0
                for k in range(ndigits):
                    interim = DAMM[interim][out[i, k] - 48]
                out[i, ndigits] = 48 + interim


cdef inline int _digit(uint32_t ch) noexcept nogil:
    # ASCII, Persian (U+06F0..U+06F9) and Arabic-Indic (U+0660..U+0669) digits; -2 to skip; -1 bad
    if 48 <= ch <= 57:
        return ch - 48
    if 0x06F0 <= ch <= 0x06F9:
        return ch - 0x06F0
    if 0x0660 <= ch <= 0x0669:
        return ch - 0x0660
    if ch == 0 or ch == 32 or ch == 45 or ch == 9 or ch == 0x2010 or ch == 0x2011 or ch == 0x2013 or ch == 0x200C or ch == 0xA0:
        return -2
    return -1


def codes_parse(const uint32_t[:, ::1] chars, int ndigits, uint64_t[::1] values, uint8_t[::1] status):
    """Read typed or scanned codes (UCS-4 rows of a NumPy 'U' array): digits in any of three scripts,
    spaces and dashes ignored. ``status``: 0 = ``ndigits`` digits whose Damm check holds (``values``
    holds them without the check digit), 1 = a typo (wrong check digit, or one digit too many or too
    few), 2 = not a code (empty, a letter, far too long or short)."""
    cdef Py_ssize_t i, j, n = chars.shape[0], w = chars.shape[1]
    cdef int dgt, count
    cdef uint64_t v
    cdef uint8_t interim
    if values.shape[0] < n or status.shape[0] < n or ndigits < 2 or ndigits > 20:
        raise ValueError("values and status must be as long as chars; ndigits 2..20")
    with nogil:
        for i in range(n):
            count = 0
            v = 0
            interim = 0
            status[i] = 0
            for j in range(w):
                dgt = _digit(chars[i, j])
                if dgt == -2:
                    continue
                if dgt == -1:
                    status[i] = 2
                    break
                count += 1
                interim = DAMM[interim][dgt]
                if count < ndigits:
                    v = v * 10 + <uint64_t>dgt
            if status[i] == 0:
                if count == 0 or count < ndigits - 1 or count > ndigits + 1:
                    status[i] = 2
                elif count != ndigits or interim != 0:
                    status[i] = 1
            values[i] = v if status[i] == 0 else 0


def codes_lookup(const uint64_t[::1] serial, uint8_t[::1] status, int32_t[::1] batch_idx,
                 const int64_t[::1] firsts, const int64_t[::1] counts, const int64_t[::1] versions,
                 int64_t version, const int64_t[::1] chunk_base, uint8_t[::1] need):
    """Find each well-formed code's batch: rows whose ``status`` is 255 (well-formed, not yet matched)
    and whose decrypted ``serial`` falls in a batch of key ``version`` (``firsts`` sorted) get
    ``batch_idx`` and status 0, and mark the redemption-bitmap chunk (65,536 serials) they fall in:
    ``need[chunk_base[batch] + offset // 65536]``. Returns how many rows matched."""
    cdef Py_ssize_t i, n = serial.shape[0], nb = firsts.shape[0], lo, hi, mid, found = 0
    cdef int64_t s
    if status.shape[0] != n or batch_idx.shape[0] != n or counts.shape[0] != nb or versions.shape[0] != nb \
            or chunk_base.shape[0] != nb + 1 or need.shape[0] < chunk_base[nb]:
        raise ValueError("codes_lookup: arrays of mismatched lengths")
    with nogil:
        for i in range(n):
            if status[i] != 255:
                continue
            s = <int64_t>serial[i]
            lo, hi = 0, nb          # the last batch whose first serial is <= s
            while lo < hi:
                mid = (lo + hi) >> 1
                if firsts[mid] <= s:
                    lo = mid + 1
                else:
                    hi = mid
            lo -= 1
            if lo >= 0 and s < firsts[lo] + counts[lo] and versions[lo] == version:
                batch_idx[i] = <int32_t>lo
                status[i] = 0
                need[chunk_base[lo] + ((s - firsts[lo]) >> 16)] = 1
                found += 1
    return found


def codes_finish(const uint64_t[::1] serial, uint8_t[::1] status, const int32_t[::1] batch_idx,
                 const int64_t[::1] firsts, const uint8_t[::1] void, const int64_t[::1] expires, int64_t now,
                 const uint8_t[::1] bits, const int64_t[::1] base):
    """The status of each matched code (``batch_idx`` >= 0): REDEEMED (3) when its bit is set in its
    batch's bitmap (``bits`` from byte ``base[batch]``; -1: the batch has no redemptions), else VOID (5)
    for a void batch, EXPIRED (4) past its batch's expiry (0 = never), else GENUINE (0)."""
    cdef Py_ssize_t i, n = serial.shape[0], nbits = bits.shape[0]
    cdef int32_t b
    cdef int64_t off, at
    if status.shape[0] != n or batch_idx.shape[0] != n:
        raise ValueError("codes_finish: arrays of mismatched lengths")
    with nogil:
        for i in range(n):
            b = batch_idx[i]
            if b < 0:
                continue
            off = <int64_t>serial[i] - firsts[b]
            at = base[b]
            if at >= 0 and at + (off >> 3) < nbits and (bits[at + (off >> 3)] >> (off & 7)) & 1:
                status[i] = 3
            elif void[b]:
                status[i] = 5
            elif expires[b] != 0 and expires[b] <= now:
                status[i] = 4
            else:
                status[i] = 0


# ---------------------------------------------------------------------------------------------------
# Bulk import: hashing of string columns (refs, member names) without a Python object per row

def pause_point():
    """What the interpreter does between bytecodes, for the long loops of the compiled engine and
    ledger modules (compiled code has no bytecodes): run the signal handlers that are due, so that a
    Ctrl-C raises KeyboardInterrupt here, and hand the GIL to a thread that has been waiting for it
    (releasing it lets CPython's switch happen). Those loops call it once an iteration (over journal
    entries) or once every few thousand (over members and rows)."""
    PyErr_CheckSignals()
    with nogil:
        pass


def hash_strings(const int64_t[::1] offsets, const uint8_t[::1] data, uint64_t seed, uint64_t[::1] out):
    """A 64-bit hash of each string of an Arrow (large) string array, given its value offsets
    (``n + 1``, int64) and data buffer: ``out[i]`` hashes ``data[offsets[i]:offsets[i + 1]]``. Equal
    strings hash equally; the hash is not cryptographic (duplicate detection, not identity)."""
    cdef Py_ssize_t n = offsets.shape[0] - 1, i
    cdef int64_t p, end, k
    cdef uint64_t h, w
    cdef const uint8_t* base
    if n < 0 or out.shape[0] < n:
        raise ValueError("offsets must have n + 1 entries and out n")
    if n and (offsets[0] < 0 or offsets[n] > data.shape[0]):
        raise ValueError("offsets run outside the data buffer")
    if data.shape[0] == 0:
        with nogil:
            for i in range(n):
                out[i] = mix64(seed ^ 0x9E3779B97F4A7C15ULL)
        return
    base = &data[0]
    with nogil:
        for i in range(n):
            p = offsets[i]
            end = offsets[i + 1]
            h = seed ^ (<uint64_t>(end - p) * 0x9E3779B97F4A7C15ULL)
            while end - p >= 8:
                w = le_load64(base + p)
                h = mix64(h ^ w) + 0x632BE59BD9B4E019ULL
                p += 8
            w = 0
            k = 0
            while p < end:
                w |= (<uint64_t>base[p]) << (8 * k)
                k += 1
                p += 1
            out[i] = mix64(h ^ w ^ (<uint64_t>k << 56))


cdef class OnePurchase:
    """The work of one purchase around the kernel, on the engine's arrays bound once (as
    :meth:`Kernel.bind`): keep the member's (and its referrer's) state and the budgets to restore, set the
    member's balances, put the row and the member's history in place and run the kernel; then the bytes
    the commit stores (the results and facts, the member's new history, the member's record)."""
    cdef Kernel kernel
    cdef RowIn[::1] rows
    cdef MState[::1] members
    cdef HEv[::1] hist
    cdef HEv[::1] out_hist
    cdef int64_t[::1] out_off
    cdef int64_t[::1] budget
    cdef int64_t[:, :, ::1] use
    cdef RowOut[::1] out
    cdef int64_t[:, ::1] facts
    cdef public object bound
    cdef Py_ssize_t noff, use_row, nbudget
    cdef MState keep_m[2]
    cdef int64_t keep_idx[2]
    cdef int nkeep
    cdef int64_t* keep_use
    cdef int64_t* keep_budget
    cdef uint64_t c_redeemed, c_issue_points, c_issue_credit
    cdef uint32_t c_points, c_credit
    cdef uint16_t c_redeem, c_earn, c_credit_code, c_bonus
    cdef bint chained

    def __dealloc__(self):
        free(self.keep_use)
        free(self.keep_budget)

    def bind(self, Kernel kernel, rows, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist,
             offer_use, budget_used, out, facts_out, Py_ssize_t noff):
        """Bind ``kernel`` to these buffers (:meth:`Kernel.bind`) and keep them; ``noff`` is the number of
        offers whose use a member's record stores."""
        self.nkeep = 0                  # (nothing kept from an earlier binding is restored into new arrays)
        kernel.bind(rows, item_cat, item_sku, item_amount, members, hist_off, hist, out_off, out_hist, offer_use,
                    budget_used, out, facts_out)
        self.rows, self.members, self.hist, self.out_hist, self.out_off = rows, members, hist, out_hist, out_off
        self.use, self.budget, self.out, self.facts = offer_use, budget_used, out, facts_out
        if self.rows.shape[0] < 1 or self.out.shape[0] < 1 or self.facts.shape[0] < 1 or self.facts.shape[1] < N_FACTS:
            raise ValueError("one purchase binds a row, its result and its facts")
        if not 0 <= noff <= self.use.shape[1] or self.use.shape[2] != 3 or self.use.shape[0] < self.members.shape[0]:
            raise ValueError("offer_use must be (members, offers, 3) with room for %d offers" % noff)
        self.noff, self.use_row, self.nbudget = noff, self.use.shape[1] * 3, self.budget.shape[0]
        cdef int64_t* u = <int64_t*>realloc(self.keep_use, (2 * self.use_row + 1) * sizeof(int64_t))
        if u == NULL:
            raise MemoryError()
        self.keep_use = u
        u = <int64_t*>realloc(self.keep_budget, (self.nbudget + 1) * sizeof(int64_t))
        if u == NULL:
            raise MemoryError()
        self.keep_budget = u
        self.kernel = kernel
        self.nkeep = 0
        self.bound = kernel.bound

    def release(self):
        """Drop the bound buffers, the kernel's too (so that arrays the caller replaced can be freed)."""
        if self.kernel is not None:
            self.kernel.release()
        self.rows = self.members = self.hist = self.out_hist = self.out_off = None
        self.use = self.budget = self.out = self.facts = None
        self.kernel = None
        self.nkeep = self.nbudget = self.use_row = self.noff = 0
        self.bound = None

    cdef _check_bound(self):
        if self.kernel is None:
            raise ValueError("OnePurchase needs bind() first")

    def forget(self):
        """Drop what :meth:`evaluate` kept (its purchase committed: nothing is to be restored)."""
        self.nkeep = 0

    cdef void _keep(self, int64_t idx) noexcept:
        cdef int k = self.nkeep
        self.keep_idx[k] = idx
        self.keep_m[k] = self.members[idx]
        if self.use_row:
            memcpy(self.keep_use + k * self.use_row, &self.use[idx, 0, 0], self.use_row * sizeof(int64_t))
        self.nkeep = k + 1

    def evaluate(self, tuple row, Py_ssize_t n_items, bytes hist, int64_t points, int64_t credit):
        """Keep what the purchase may change, set the member's balances, put ``row`` (ROW's fields as a
        tuple; its items already in the bound item buffers) and ``hist`` (the member's history) in place
        and run the kernel. Returns the row's status (0: evaluated; :meth:`restore` undoes it either way)."""
        self.nkeep = 0
        self._check_bound()
        if len(row) != 16:
            raise ValueError("a row has 16 fields, not %d" % len(row))
        cdef int64_t idx = row[0], ref
        cdef Py_ssize_t size = len(hist), nh = size // sizeof(HEv)
        if idx < 0 or idx >= self.members.shape[0]:
            raise ValueError("member %d is beyond the state (%d members)" % (idx, self.members.shape[0]))
        if size % sizeof(HEv) or nh >= self.hist.shape[0] or nh >= self.out_hist.shape[0]:
            raise ValueError("a history of %d bytes does not fit the bound buffers" % size)
        # the balances first: they are the ledger's, and stay when the rest is restored
        self.members[idx].points = points
        self.members[idx].credit = credit
        self._keep(idx)
        ref = self.members[idx].referrer
        if 0 <= ref < self.members.shape[0] and ref != idx:
            self._keep(ref)
        if self.nbudget:
            memcpy(self.keep_budget, &self.budget[0], self.nbudget * sizeof(int64_t))
        cdef RowIn* r = &self.rows[0]
        r.member, r.amount, r.quantity, r.redeem, r.cats, r.skus = row[0], row[1], row[2], row[3], row[4], row[5]
        r.day, r.hour, r.weekday, r.month, r.dom = row[6], row[7], row[8], row[9], row[10]
        r.branch, r.channel, r.item_start, r.item_end, r.pad = row[11], row[12], row[13], row[14], row[15]
        if nh:
            memcpy(&self.hist[0], PyBytes_AS_STRING(hist), size)
        self.kernel.run_bound(1, n_items, nh)
        return self.out[0].status

    def restore(self):
        """Put back what :meth:`evaluate` kept (the member's and its referrer's state, their offer use, the
        budgets)."""
        cdef int k
        for k in range(self.nkeep):
            self.members[self.keep_idx[k]] = self.keep_m[k]
            if self.use_row:
                memcpy(&self.use[self.keep_idx[k], 0, 0], self.keep_use + k * self.use_row,
                       self.use_row * sizeof(int64_t))
        if self.nbudget and self.nkeep:
            memcpy(&self.budget[0], self.keep_budget, self.nbudget * sizeof(int64_t))
        self.nkeep = 0

    def referrer(self, int64_t idx):
        """Member ``idx``'s referrer (-1: none)."""
        self._check_bound()
        if idx < 0 or idx >= self.members.shape[0]:
            raise ValueError("member %d is beyond the state" % idx)
        return self.members[idx].referrer

    def budget_changed(self):
        """Whether the evaluated purchase changed the budgets (against what :meth:`evaluate` kept)."""
        self._check_bound()
        return self.nbudget > 0 and memcmp(&self.budget[0], self.keep_budget, self.nbudget * sizeof(int64_t)) != 0

    def results(self):
        """The evaluated row's result and facts, as the bytes of OUT_DTYPE then N_FACTS int64."""
        self._check_bound()
        cdef bytes b = PyBytes_FromStringAndSize(NULL, sizeof(RowOut) + N_FACTS * sizeof(int64_t))
        cdef char* p = PyBytes_AS_STRING(b)
        memcpy(p, &self.out[0], sizeof(RowOut))
        memcpy(p + sizeof(RowOut), &self.facts[0, 0], N_FACTS * sizeof(int64_t))
        return b

    def new_history(self):
        """The member's history after the evaluated row, as bytes."""
        self._check_bound()
        cdef int64_t lo = self.out_off[0], hi = self.out_off[1]
        if not 0 <= lo <= hi <= self.out_hist.shape[0]:
            raise ValueError("the kernel's history offsets are out of range")
        return PyBytes_FromStringAndSize(<char*>&self.out_hist[lo] if hi > lo else NULL, (hi - lo) * sizeof(HEv))

    def set_chain(self, uint64_t redeemed, uint64_t issue_points, uint64_t issue_credit, uint32_t points_asset,
                  uint32_t credit_asset, uint16_t redeem, uint16_t earn, uint16_t credit, uint16_t bonus):
        """The engine's accounts, assets and codes of a purchase's chain of transfers (:meth:`transfers`)."""
        self.c_redeemed, self.c_issue_points, self.c_issue_credit = redeemed, issue_points, issue_credit
        self.c_points, self.c_credit = points_asset, credit_asset
        self.c_redeem, self.c_earn, self.c_credit_code, self.c_bonus = redeem, earn, credit, bonus
        self.chained = True

    def transfers(self, uint64_t id_lo, uint64_t id_hi, int64_t at, int64_t expires, uint64_t member_points,
                  uint64_t member_credit, uint64_t referrer_points):
        """The evaluated purchase's linked chain as RECORD_DTYPE bytes: points redeemed (member to the
        redeemed sink), earned (issue to member; these points expire at ``expires``), credit (issue to the
        member's credit) and the referrer's bonus (issue to ``referrer_points``), leaving out zero amounts;
        the k-th transfer's id is (id_lo | k, id_hi), k from 1, its low byte clear in ``id_lo``."""
        if not self.chained or self.kernel is None:
            raise ValueError("transfers need bind() and set_chain() first")
        if id_lo & 0xFF:
            raise ValueError("id_lo's low byte numbers the chain's transfers; it must be 0")
        cdef RowOut* o = &self.out[0]
        cdef uint64_t debit[4]
        cdef uint64_t credit[4]
        cdef int64_t amount[4]
        cdef uint32_t asset[4]
        cdef uint16_t code[4]
        debit[0], credit[0], amount[0], asset[0], code[0] = (member_points, self.c_redeemed, o.redeemed, self.c_points,
                                                             self.c_redeem)
        debit[1], credit[1], amount[1], asset[1], code[1] = (self.c_issue_points, member_points, o.points,
                                                             self.c_points, self.c_earn)
        debit[2], credit[2], amount[2], asset[2], code[2] = (self.c_issue_credit, member_credit, o.credit,
                                                             self.c_credit, self.c_credit_code)
        debit[3], credit[3], amount[3], asset[3], code[3] = (self.c_issue_points, referrer_points,
                                                             o.referrer_points, self.c_points, self.c_bonus)
        cdef int j, n = 0, k = 0
        for j in range(4):
            n += amount[j] > 0
        cdef bytes b = PyBytes_FromStringAndSize(NULL, n * sizeof(TRec))
        cdef TRec* t = <TRec*>PyBytes_AS_STRING(b)
        memset(t, 0, n * sizeof(TRec))
        for j in range(4):
            if amount[j] <= 0:
                continue
            t[k].id_lo = id_lo | <uint64_t>(k + 1)
            t[k].id_hi = id_hi
            t[k].debit, t[k].credit, t[k].amount, t[k].at = debit[j], credit[j], amount[j], at
            t[k].expires_at = expires if (asset[j] == self.c_points and debit[j] == self.c_issue_points) else 0
            t[k].asset, t[k].code = asset[j], code[j]
            t[k].flags = F_LINKED if k < n - 1 else 0
            k += 1
        return b

    def member_record(self, int64_t idx, bytes name, bytes hist):
        """Member ``idx``'s stored record, the bytes ``_bulk.member_records`` writes (the compact
        encoding of _record.pxd): the name, the state, the offer use (none when never used) and
        ``hist`` (the member's history)."""
        self._check_bound()
        if idx < 0 or idx >= self.members.shape[0]:
            raise ValueError("member %d is beyond the state" % idx)
        cdef Py_ssize_t nn = len(name), nu = self.noff * 3, nhb = len(hist), j
        if nn >= rec.COMPACT:
            raise ValueError("a name of %d bytes is too long" % nn)
        if nhb % rec.HEV_SIZE:
            raise ValueError("a history of %d bytes is not whole events" % nhb)
        cdef const uint8_t* u = <const uint8_t*>&self.use[idx, 0, 0]
        cdef bint used = False
        for j in range(nu * 8):
            if u[j]:
                used = True
                break
        if not used:
            nu = 0
        cdef const uint8_t* h = <const uint8_t*>PyBytes_AS_STRING(hist)
        cdef const uint8_t* st = <const uint8_t*>&self.members[idx]
        cdef bytes b = PyBytes_FromStringAndSize(NULL, rec.record_size(nn, st, u, nu, h, nhb))
        rec.put_record(<uint8_t*>PyBytes_AS_STRING(b), PyBytes_AS_STRING(name), nn, st, u, nu, h, nhb)
        return b
