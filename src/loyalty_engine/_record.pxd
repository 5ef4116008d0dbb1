# cython: language_level=3
"""The compact encoding of a member record's offer usage and history (cimported by _core and _bulk,
which write records; ``_bulk.member_fields`` reads both encodings).

A member record is ``name length (2 bytes, little-endian) | name | state (MSTATE bytes) | usage |
history``. In the compact encoding (bit 15 of the name length set) the usage is the count of its int64
values (0 when the member never used an offer) and the values, and the history is its events (HEV:
int32 day, int32 visits, int64 amount, int64 points), each field a zigzag varint, the day as the
difference from the event before. The state (MSTATE, 76 bytes: 5 int64, 8 int32, an int16, 2 int8
fields, in that order) is its 16 fields as zigzag varints. These are a few small numbers each, so a
record takes well under half the bytes of the plain encoding (raw state, usage and events), which is
what an import rewrites for every member that a chunk touches."""

from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint8_t, uint64_t
from libc.string cimport memcpy

#: Bit 15 of the name length: the record is in the compact encoding.
cdef enum:
    COMPACT = 0x8000
    HEV_SIZE = 24
    STATE_SIZE = 76             # MSTATE's bytes
    STATE_FIELDS = 16


cdef inline int state_width(int f) noexcept nogil:
    """The byte width of MSTATE's field ``f`` (fields in order, signed, little-endian)."""
    if f < 5:
        return 8
    if f < 13:
        return 4
    if f == 13:
        return 2
    return 1


cdef inline int64_t _field(const uint8_t* s, int w) noexcept nogil:
    cdef int64_t v8
    cdef int32_t v4
    cdef int16_t v2
    if w == 8:
        memcpy(&v8, s, 8)
        return v8
    if w == 4:
        memcpy(&v4, s, 4)
        return v4
    if w == 2:
        memcpy(&v2, s, 2)
        return v2
    return <int8_t>s[0]


cdef inline Py_ssize_t state_size(const uint8_t* s) noexcept nogil:
    cdef Py_ssize_t n = 0
    cdef int f, w
    for f in range(STATE_FIELDS):
        w = state_width(f)
        n += varint_size(zigzag(_field(s, w)))
        s += w
    return n


cdef inline uint8_t* put_state(uint8_t* p, const uint8_t* s) noexcept nogil:
    cdef int f, w
    for f in range(STATE_FIELDS):
        w = state_width(f)
        p = put_varint(p, zigzag(_field(s, w)))
        s += w
    return p


cdef inline const uint8_t* get_state(const uint8_t* p, const uint8_t* end, uint8_t* out) noexcept nogil:
    """MSTATE's 76 bytes from their varints into ``out``; NULL when cut short or a value does not fit."""
    cdef int f, w
    cdef uint64_t u
    cdef int64_t v
    cdef int32_t v4
    cdef int16_t v2
    for f in range(STATE_FIELDS):
        w = state_width(f)
        p = get_varint(p, end, &u)
        if p == NULL:
            return NULL
        v = unzigzag(u)
        if w == 8:
            memcpy(out, &v, 8)
        elif w == 4:
            if v < -2147483648 or v > 2147483647:
                return NULL
            v4 = <int32_t>v
            memcpy(out, &v4, 4)
        elif w == 2:
            if v < -32768 or v > 32767:
                return NULL
            v2 = <int16_t>v
            memcpy(out, &v2, 2)
        else:
            if v < -128 or v > 127:
                return NULL
            out[0] = <uint8_t><int8_t>v
        out += w
    return p


cdef inline uint64_t zigzag(int64_t v) noexcept nogil:
    return (<uint64_t>v << 1) ^ <uint64_t>(v >> 63)


cdef inline int64_t unzigzag(uint64_t u) noexcept nogil:
    return <int64_t>(u >> 1) ^ -<int64_t>(u & 1)


cdef inline Py_ssize_t varint_size(uint64_t v) noexcept nogil:
    cdef Py_ssize_t n = 1
    while v >= 0x80:
        v >>= 7
        n += 1
    return n


cdef inline uint8_t* put_varint(uint8_t* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <uint8_t>(v | 0x80)
        v >>= 7
        p += 1
    p[0] = <uint8_t>v
    return p + 1


cdef inline const uint8_t* get_varint(const uint8_t* p, const uint8_t* end, uint64_t* out) noexcept nogil:
    """The varint at ``p`` into ``out``; NULL when it runs past ``end`` or past 64 bits."""
    cdef uint64_t v = 0
    cdef int shift = 0
    while p < end and shift < 64:
        v |= <uint64_t>(p[0] & 0x7F) << shift
        if not (p[0] & 0x80):
            out[0] = v
            return p + 1
        p += 1
        shift += 7
    return NULL


cdef inline Py_ssize_t usage_size(const uint8_t* u, Py_ssize_t n) noexcept nogil:
    """Bytes the usage of ``n`` int64 values at ``u`` takes (``n`` = 0: never used)."""
    cdef Py_ssize_t s = varint_size(<uint64_t>n), j
    cdef int64_t v
    for j in range(n):
        memcpy(&v, u + 8 * j, 8)
        s += varint_size(zigzag(v))
    return s


cdef inline uint8_t* put_usage(uint8_t* p, const uint8_t* u, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    cdef int64_t v
    p = put_varint(p, <uint64_t>n)
    for j in range(n):
        memcpy(&v, u + 8 * j, 8)
        p = put_varint(p, zigzag(v))
    return p


cdef inline void _event(const uint8_t* e, int64_t* day, int64_t* visits, int64_t* amount,
                        int64_t* points) noexcept nogil:
    cdef int32_t d, vis
    memcpy(&d, e, 4)
    memcpy(&vis, e + 4, 4)
    memcpy(amount, e + 8, 8)
    memcpy(points, e + 16, 8)
    day[0] = d
    visits[0] = vis


cdef inline Py_ssize_t history_size(const uint8_t* h, Py_ssize_t nbytes) noexcept nogil:
    """Bytes the history of ``nbytes // HEV_SIZE`` events at ``h`` takes."""
    cdef Py_ssize_t k, s = 0
    cdef int64_t day, visits, amount, points, prev = 0
    for k in range(nbytes // HEV_SIZE):
        _event(h + HEV_SIZE * k, &day, &visits, &amount, &points)
        s += (varint_size(zigzag(day - prev)) + varint_size(zigzag(visits)) + varint_size(zigzag(amount))
              + varint_size(zigzag(points)))
        prev = day
    return s


cdef inline uint8_t* put_history(uint8_t* p, const uint8_t* h, Py_ssize_t nbytes) noexcept nogil:
    cdef Py_ssize_t k
    cdef int64_t day, visits, amount, points, prev = 0
    for k in range(nbytes // HEV_SIZE):
        _event(h + HEV_SIZE * k, &day, &visits, &amount, &points)
        p = put_varint(p, zigzag(day - prev))
        p = put_varint(p, zigzag(visits))
        p = put_varint(p, zigzag(amount))
        p = put_varint(p, zigzag(points))
        prev = day
    return p


cdef inline Py_ssize_t record_size(Py_ssize_t nlen, const uint8_t* state, const uint8_t* use, Py_ssize_t nuse,
                                   const uint8_t* hist, Py_ssize_t hlen) noexcept nogil:
    """The bytes of a compact record: a name of ``nlen`` bytes, the state (STATE_SIZE bytes at
    ``state``), ``nuse`` int64 usage values at ``use`` and ``hlen`` bytes of events at ``hist``."""
    return 2 + nlen + state_size(state) + usage_size(use, nuse) + history_size(hist, hlen)


cdef inline uint8_t* put_record(uint8_t* p, const char* name, Py_ssize_t nlen, const uint8_t* state,
                                const uint8_t* use, Py_ssize_t nuse, const uint8_t* hist,
                                Py_ssize_t hlen) noexcept nogil:
    """Write the compact record (``record_size`` bytes) at ``p``; returns its end. ``nlen`` is below
    COMPACT (the caller checks)."""
    cdef Py_ssize_t nl = nlen | COMPACT
    p[0] = <uint8_t>(nl & 0xFF)
    p[1] = <uint8_t>(nl >> 8)
    memcpy(p + 2, name, nlen)
    p = put_state(p + 2 + nlen, state)
    p = put_usage(p, use, nuse)
    return put_history(p, hist, hlen)
