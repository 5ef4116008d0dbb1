# cython: language_level=3
"""Compiled helpers of the batch paths (bulk import, ``enroll_batch``, ``purchase_batch``): the member
store's LMDB keys and values and the members' history bytes, built from arrays without a Python
expression per member.

The engine keeps a member's name (``str``) in a list and its history (HEV records, ``bytes``) in a dict
keyed by the member's index; these helpers read and write those containers directly, so that one
member costs a few C calls instead of a dozen Python operations. They know nothing of LMDB (they
return the ``(key, value)`` pairs a cursor's ``putmulti`` takes), of business rules or of messages: a
wrong input raises ``ValueError``/``TypeError`` naming the argument. ``tests/test_bulk.py`` checks each
against a plain Python reference.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_Check, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem, PyDict_SetItem
from cpython.list cimport PyList_GET_ITEM, PyList_GET_SIZE
from cpython.long cimport PyLong_FromLongLong
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_Check, PyUnicode_DecodeUTF8
from libc.stdint cimport INT32_MAX, INT32_MIN, int32_t, int64_t, uint8_t, uint64_t
from loyalty_engine._mix cimport mix64
from loyalty_engine cimport _record as rec
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset


cdef extern from "Python.h":
    const char* PyUnicode_AsUTF8AndSize(object s, Py_ssize_t* size) except NULL


cdef const char* _EMPTY = ""


cdef inline void _be64(char* p, uint64_t v) noexcept nogil:
    cdef int j
    for j in range(8):
        p[j] = <char>((v >> (56 - 8 * j)) & 0xFF)


cdef inline bytes _key(char prefix, uint64_t v):
    cdef bytes k = PyBytes_FromStringAndSize(NULL, 9)
    cdef char* p = PyBytes_AS_STRING(k)
    p[0] = prefix
    _be64(p + 1, v)
    return k



cdef Py_ssize_t _bytes_value(dict table, long long key, PyObject** found) except -1:
    """The length of ``table[key]`` (bytes), 0 when absent; ``found`` gets the borrowed value or NULL."""
    found[0] = PyDict_GetItem(table, PyLong_FromLongLong(key))
    if found[0] == NULL:
        return 0
    if not PyBytes_Check(<object>found[0]):
        raise TypeError(f"the value of {key} is {type(<object>found[0]).__name__}, not bytes")
    return PyBytes_GET_SIZE(<object>found[0])


cdef struct _Rec:
    # one member's record as member_records writes it (_record.pxd's compact encoding)
    const char* name
    Py_ssize_t nlen
    const uint8_t* hist
    Py_ssize_t hlen
    Py_ssize_t nuse         # the usage's int64 values (0: never used)
    Py_ssize_t size         # the value's length


cdef int _record_of(_Rec* r, int64_t i, Py_ssize_t k, list names, const uint8_t[:, ::1] state,
                    const uint8_t[:, ::1] use, const uint8_t[::1] used, dict hist) except -1:
    cdef Py_ssize_t nnames = PyList_GET_SIZE(names)
    cdef object name
    cdef PyObject* h
    if i < 0 or i >= nnames:
        raise ValueError(f"idx[{k}]={i} is not a member index (0..{nnames - 1})")
    name = <object>PyList_GET_ITEM(names, i)
    if not PyUnicode_Check(name):
        raise TypeError(f"names[{i}] is {type(name).__name__}, not str")
    r.name = PyUnicode_AsUTF8AndSize(name, &r.nlen)
    if r.nlen >= rec.COMPACT:
        raise ValueError(f"names[{i}] is {r.nlen} bytes long, more than a record's 15-bit length holds")
    r.hlen = _bytes_value(hist, i, &h)
    if r.hlen % rec.HEV_SIZE:
        raise ValueError(f"the history of member {i} is {r.hlen} bytes, not whole events of {rec.HEV_SIZE}")
    r.hist = <const uint8_t*>PyBytes_AS_STRING(<object>h) if r.hlen else NULL
    r.nuse = use.shape[1] // 8 if used[k] else 0
    r.size = rec.record_size(r.nlen, &state[k, 0], &use[k, 0] if r.nuse else NULL, r.nuse, r.hist, r.hlen)
    return 0


cdef _check_rows(Py_ssize_t n, const uint8_t[:, ::1] state, const uint8_t[:, ::1] use, const uint8_t[::1] used):
    if state.shape[0] != n or use.shape[0] != n or used.shape[0] != n:
        raise ValueError(f"state, use and used need one row per member ({n}), not {state.shape[0]}, "
                         f"{use.shape[0]}, {used.shape[0]}")


def member_records(const int64_t[::1] idx, list names, const uint8_t[:, ::1] state, const uint8_t[:, ::1] use,
                   const uint8_t[::1] used, dict hist):
    """The member store's ``(key, value)`` pairs of the members ``idx`` (in that order).

    Key: ``b"M"`` + the index (8 bytes, big-endian). Value, in the compact encoding (_record.pxd): the
    name's UTF-8 length with bit 15 set (2 bytes, little-endian), the name (``names[i]``), the state
    (row ``k`` of ``state``: the MSTATE record of ``idx[k]``, as its fields), the offer usage (row ``k`` of ``use``,
    int64 values) when ``used[k]`` (else none), then the history (``hist.get(i, b"")``, HEV events).
    :func:`member_fields` reads it back."""
    cdef Py_ssize_t n = idx.shape[0], k
    cdef _Rec r
    cdef object value
    cdef list out = []
    _check_rows(n, state, use, used)
    if use.shape[1] % 8:
        raise ValueError(f"a usage row is {use.shape[1]} bytes, not whole int64 values")
    if state.shape[1] != rec.STATE_SIZE:
        raise ValueError(f"a state row is {state.shape[1]} bytes, not MSTATE's {rec.STATE_SIZE}")
    for k in range(n):
        _record_of(&r, idx[k], k, names, state, use, used, hist)
        value = PyBytes_FromStringAndSize(NULL, r.size)
        rec.put_record(<uint8_t*>PyBytes_AS_STRING(value), r.name, r.nlen, &state[k, 0],
                       &use[k, 0] if r.nuse else NULL, r.nuse, r.hist, r.hlen)
        out.append((_key(b"M", <uint64_t>idx[k]), value))
    return out


def member_fields(bytes value, Py_ssize_t state_size):
    """A stored member record's parts, of either encoding: ``(name, state, usage, history)``, the name
    a str, the state its ``state_size`` bytes, the usage its int64 values' bytes (empty when never
    used) and the history its HEV events' bytes. Raises ValueError when the record is cut short or
    damaged."""
    cdef const uint8_t* p = <const uint8_t*>PyBytes_AS_STRING(value)
    cdef const uint8_t* end = p + PyBytes_GET_SIZE(value)
    cdef Py_ssize_t nl, nuse, j, room, count = 0
    cdef bint compact
    cdef uint64_t u
    cdef int64_t day = 0, visits, amount, points, d
    cdef int32_t d32, v32
    cdef object name, state, usage, history
    cdef uint8_t* out
    if end - p < 2:
        raise ValueError("a member record of fewer than 2 bytes")
    nl = p[0] | (p[1] << 8)
    compact = (nl & rec.COMPACT) != 0
    nl &= ~rec.COMPACT
    p += 2
    if end - p < nl + (0 if compact else state_size):
        raise ValueError(f"a member record of {PyBytes_GET_SIZE(value)} bytes is cut short (name of {nl} bytes)")
    name = PyUnicode_DecodeUTF8(<const char*>p, nl, NULL)
    p += nl
    if not compact:             # the plain encoding: the raw state, a 4-byte usage length, the raw usage and events
        state = PyBytes_FromStringAndSize(<const char*>p, state_size)
        p += state_size
        if end - p < 4:
            raise ValueError("a member record is cut short (its usage length)")
        nuse = p[0] | (p[1] << 8) | (p[2] << 16) | (<Py_ssize_t>p[3] << 24)
        if end - p - 4 < nuse:
            raise ValueError(f"a member record is cut short (usage of {nuse} bytes)")
        usage = PyBytes_FromStringAndSize(<const char*>p + 4, nuse)
        p += 4 + nuse
        return name, state, usage, PyBytes_FromStringAndSize(<const char*>p, end - p)
    if state_size != rec.STATE_SIZE:
        raise ValueError(f"a compact member record holds MSTATE's {rec.STATE_SIZE} bytes, not {state_size}")
    state = PyBytes_FromStringAndSize(NULL, state_size)
    p = rec.get_state(p, end, <uint8_t*>PyBytes_AS_STRING(state))
    if p == NULL:
        raise ValueError("a member record's state is damaged")
    p = rec.get_varint(p, end, &u)
    if p == NULL or u > <uint64_t>(end - p):
        raise ValueError("a member record's usage is damaged")
    nuse = <Py_ssize_t>u
    usage = PyBytes_FromStringAndSize(NULL, 8 * nuse)
    out = <uint8_t*>PyBytes_AS_STRING(usage)
    for j in range(nuse):
        p = rec.get_varint(p, end, &u)
        if p == NULL:
            raise ValueError("a member record's usage is damaged")
        d = rec.unzigzag(u)
        memcpy(out + 8 * j, &d, 8)
    room = (end - p) // 4          # every event takes 4 bytes at least
    history = PyBytes_FromStringAndSize(NULL, rec.HEV_SIZE * room)
    out = <uint8_t*>PyBytes_AS_STRING(history)
    while p < end:
        p = rec.get_varint(p, end, &u)
        if p != NULL:
            day += rec.unzigzag(u)
            p = rec.get_varint(p, end, &u)
        if p != NULL:
            visits = rec.unzigzag(u)
            p = rec.get_varint(p, end, &u)
        if p != NULL:
            amount = rec.unzigzag(u)
            p = rec.get_varint(p, end, &u)
        if p == NULL or day < INT32_MIN or day > INT32_MAX or visits < INT32_MIN or visits > INT32_MAX:
            raise ValueError(f"a member record's history is damaged (event {count})")
        points = rec.unzigzag(u)
        d32 = <int32_t>day
        v32 = <int32_t>visits
        memcpy(out + rec.HEV_SIZE * count, &d32, 4)
        memcpy(out + rec.HEV_SIZE * count + 4, &v32, 4)
        memcpy(out + rec.HEV_SIZE * count + 8, &amount, 8)
        memcpy(out + rec.HEV_SIZE * count + 16, &points, 8)
        count += 1
    return name, state, usage, history[: rec.HEV_SIZE * count]


def name_records(list names, int64_t first):
    """The name index's ``(key, value)`` pairs: ``b"N"`` + the UTF-8 of ``names[k]``, and ``first + k``
    (8 bytes, big-endian)."""
    cdef Py_ssize_t n = PyList_GET_SIZE(names), k, nlen
    cdef object name, key
    cdef const char* nptr
    cdef bytes value
    cdef list out = []
    for k in range(n):
        name = <object>PyList_GET_ITEM(names, k)
        if not PyUnicode_Check(name):
            raise TypeError(f"names[{k}] is {type(name).__name__}, not str")
        nptr = PyUnicode_AsUTF8AndSize(name, &nlen)
        key = PyBytes_FromStringAndSize(NULL, nlen + 1)
        PyBytes_AS_STRING(key)[0] = b"N"
        memcpy(PyBytes_AS_STRING(key) + 1, nptr, nlen)
        value = PyBytes_FromStringAndSize(NULL, 8)
        _be64(PyBytes_AS_STRING(value), <uint64_t>(first + k))
        out.append((key, value))
    return out


cdef inline const char* _string_at(const int64_t[::1] offsets, const uint8_t[::1] data, Py_ssize_t j,
                                   Py_ssize_t* size) except? NULL:
    cdef int64_t a = offsets[j], b = offsets[j + 1]
    if a < 0 or b < a or b > data.shape[0]:
        raise ValueError(f"string {j}'s offsets ({a}, {b}) run outside the data buffer ({data.shape[0]} bytes)")
    size[0] = b - a
    if data.shape[0] == 0:
        return _EMPTY
    return <const char*>&data[0] + a


def take_strings(const int64_t[::1] offsets, const uint8_t[::1] data, const int64_t[::1] which):
    """The strings ``which`` of an Arrow (large) string array (value offsets and data), as a list of
    ``str``."""
    cdef Py_ssize_t n = offsets.shape[0] - 1, k, size = 0
    cdef int64_t j
    cdef const char* s
    cdef list out = []
    cdef object name
    for k in range(which.shape[0]):
        j = which[k]
        if j < 0 or j >= n:
            raise ValueError(f"which[{k}]={j} is outside the array (0..{n - 1})")
        s = _string_at(offsets, data, j, &size)
        name = PyUnicode_DecodeUTF8(s, size, NULL)
        out.append(name)
    return out


def gather_bytes(dict table, const int64_t[::1] keys, int64_t[::1] offsets):
    """The values ``table.get(k, b"")`` of ``keys`` joined into one ``bytes``; ``offsets`` (``n + 1``)
    receives where each starts (bytes) and the total at the end."""
    cdef Py_ssize_t n = keys.shape[0], k, total = 0, size
    cdef PyObject** got
    cdef PyObject* hp
    cdef bytes out
    cdef char* p
    if offsets.shape[0] != n + 1:
        raise ValueError(f"offsets needs {n + 1} entries, not {offsets.shape[0]}")
    got = <PyObject**>malloc(max(n, 1) * sizeof(PyObject*))
    if got == NULL:
        raise MemoryError()
    try:
        offsets[0] = 0
        for k in range(n):
            size = _bytes_value(table, keys[k], &hp)
            got[k] = hp       # borrowed: the dict is not changed until the copy below is done
            total += size
            offsets[k + 1] = total
        out = PyBytes_FromStringAndSize(NULL, total)
        p = PyBytes_AS_STRING(out)
        for k in range(n):
            if got[k] != NULL:
                size = offsets[k + 1] - offsets[k]
                if size:
                    memcpy(p + offsets[k], PyBytes_AS_STRING(<object>got[k]), size)
    finally:
        free(got)
    return out


def scatter_bytes(dict table, const int64_t[::1] keys, const int64_t[::1] offsets, const uint8_t[::1] data):
    """``table[keys[k]] = bytes(data[offsets[k]:offsets[k + 1]])`` for each ``k`` (empty values too)."""
    cdef Py_ssize_t n = keys.shape[0], k
    cdef int64_t a, b
    cdef object key, value
    if offsets.shape[0] != n + 1:
        raise ValueError(f"offsets needs {n + 1} entries, not {offsets.shape[0]}")
    for k in range(n):
        a = offsets[k]
        b = offsets[k + 1]
        if a < 0 or b < a or b > data.shape[0]:
            raise ValueError(f"offsets[{k}:{k + 2}] = ({a}, {b}) run outside the data ({data.shape[0]} bytes)")
        value = PyBytes_FromStringAndSize(<const char*>&data[0] + a if b > a else NULL, b - a)
        key = PyLong_FromLongLong(keys[k])
        PyDict_SetItem(table, key, value)


def index_insert(uint64_t[::1] slot_hash, int64_t[::1] slot_value, const uint64_t[::1] hashes,
                 const int64_t[::1] values):
    """Insert ``(hashes[k], values[k])`` into an open-addressing table (``slot_hash``, ``slot_value``;
    a power-of-two size, ``slot_value`` -1 where a slot is empty; several entries may share a hash).
    The caller keeps the table at most half full."""
    cdef Py_ssize_t cap = slot_hash.shape[0], k, probes
    cdef uint64_t mask, pos
    cdef bint full = False
    if cap == 0 or cap & (cap - 1) or slot_value.shape[0] != cap:
        raise ValueError("the table's two arrays must have the same power-of-two size")
    if values.shape[0] != hashes.shape[0]:
        raise ValueError("hashes and values need the same length")
    mask = <uint64_t>cap - 1
    for k in range(cap):                    # a table with no free slot would be probed for ever
        if slot_value[k] < 0:
            break
    else:
        raise ValueError("the table has no free slot")
    with nogil:
        for k in range(hashes.shape[0]):
            pos = hashes[k] & mask
            probes = 0
            while slot_value[pos] >= 0:
                pos = (pos + 1) & mask
                probes += 1
                if probes == cap:
                    break
            if probes == cap:
                full = True
                break
            slot_hash[pos] = hashes[k]
            slot_value[pos] = values[k]
    if full:
        raise ValueError("the table filled up: the caller must keep it at most half full")


def index_lookup(const uint64_t[::1] slot_hash, const int64_t[::1] slot_value, const uint64_t[::1] hashes,
                 const int64_t[::1] offsets, const uint8_t[::1] data, list names, int64_t[::1] out):
    """For each string ``s_j`` of an Arrow (large) string array (value offsets, data) with hash
    ``hashes[j]``: ``out[j]`` = the value ``i`` of an entry of the table (see :func:`index_insert`)
    with that hash whose ``names[i]`` is ``s_j`` (compared byte for byte), or -1. Returns how many were
    not found."""
    cdef Py_ssize_t cap = slot_hash.shape[0], n = offsets.shape[0] - 1, j, size, nlen
    cdef Py_ssize_t nnames = PyList_GET_SIZE(names), missing = 0, probes
    cdef uint64_t mask, pos, h
    cdef int64_t v
    cdef const char* s
    cdef const char* nptr
    cdef object name
    if cap == 0 or cap & (cap - 1) or slot_value.shape[0] != cap:
        raise ValueError("the table's two arrays must have the same power-of-two size")
    if n < 0 or out.shape[0] != n or hashes.shape[0] != n:
        raise ValueError("offsets must have n + 1 entries, hashes and out n")
    mask = <uint64_t>cap - 1
    for j in range(n):
        s = _string_at(offsets, data, j, &size)
        h = hashes[j]
        pos = h & mask
        out[j] = -1
        probes = 0
        while probes < cap:                 # (a full table is searched once round, not for ever)
            probes += 1
            v = slot_value[pos]
            if v < 0:
                break
            if slot_hash[pos] == h:
                if v >= nnames:
                    raise ValueError(f"the table holds {v}, not an index of names (0..{nnames - 1})")
                name = <object>PyList_GET_ITEM(names, v)
                if not PyUnicode_Check(name):
                    raise TypeError(f"names[{v}] is {type(name).__name__}, not str")
                nptr = PyUnicode_AsUTF8AndSize(name, &nlen)
                if nlen == size and (size == 0 or memcmp(nptr, s, size) == 0):
                    out[j] = v
                    break
            pos = (pos + 1) & mask
        if out[j] < 0:
            missing += 1
    return missing


cdef inline void _put64(uint8_t* p, int64_t v) noexcept nogil:
    memcpy(p, &v, 8)


cdef inline void _put32(uint8_t* p, int64_t v) noexcept nogil:
    cdef int32_t w = <int32_t>v
    memcpy(p, &w, 4)


def purchase_rows(uint8_t[:, ::1] out, const int64_t[::1] layout, const int64_t[::1] member,
                  const int64_t[::1] amount, const int64_t[::1] quantity, const int64_t[::1] day,
                  const int64_t[::1] hour, const int64_t[::1] weekday, const int64_t[::1] month,
                  const int64_t[::1] dom, const int32_t[::1] branch, const int32_t[::1] channel,
                  const int32_t[::1] cat, const int32_t[::1] sku):
    """The rule kernel's rows of a batch of purchases, in one pass over ``out`` (the rows' bytes, one row
    of ``out`` a purchase; every byte is written, the ones no field covers with 0), the GIL released.

    ``layout`` is the record's byte offset of each field, in the order member, amount, quantity,
    redeem, cats, skus (8 bytes each), day, hour, weekday, month, dom, branch, channel, item_start,
    item_end (4 bytes each, the values cut to 32 bits as NumPy's assignment does), then the record's
    size. redeem is 0. With ``cat`` and ``sku`` (one item a row) cats and skus are ``1 << id`` (0 for an
    id outside 0..63, as NumPy's shift) and row i's item is item i; without them (both empty), all 0."""
    cdef Py_ssize_t n = out.shape[0], i, f
    cdef Py_ssize_t size = out.shape[1]
    cdef bint items = cat.shape[0] != 0 or sku.shape[0] != 0
    cdef int64_t o[15]
    cdef uint8_t* p
    cdef int64_t c, k
    if layout.shape[0] != 16 or layout[15] != size:
        raise ValueError(f"layout holds 15 field offsets and the record's size ({size}), not {layout.shape[0]} "
                         f"values ending in {layout[layout.shape[0] - 1] if layout.shape[0] else None}")
    for f in range(15):
        if layout[f] < 0 or layout[f] + (8 if f < 6 else 4) > size:
            raise ValueError(f"layout[{f}]={layout[f]} does not fit a {size}-byte record")
        o[f] = layout[f]
    for name, arr in (("member", member), ("amount", amount), ("quantity", quantity), ("day", day),
                      ("hour", hour), ("weekday", weekday), ("month", month), ("dom", dom)):
        if arr.shape[0] != n:
            raise ValueError(f"{name} holds {arr.shape[0]} values, not one a row ({n})")
    if branch.shape[0] != n or channel.shape[0] != n:
        raise ValueError(f"branch and channel need one value a row ({n}), not {branch.shape[0]}, {channel.shape[0]}")
    if items and (cat.shape[0] != n or sku.shape[0] != n):
        raise ValueError(f"cat and sku need one value a row ({n}) or none, not {cat.shape[0]}, {sku.shape[0]}")
    with nogil:
        for i in range(n):
            p = &out[i, 0]
            memset(p, 0, size)
            _put64(p + o[0], member[i])
            _put64(p + o[1], amount[i])
            _put64(p + o[2], quantity[i])
            if items:
                c = cat[i]
                k = sku[i]
                _put64(p + o[4], (<int64_t>1 << c) if <uint64_t>c < 64 else 0)
                _put64(p + o[5], (<int64_t>1 << k) if <uint64_t>k < 64 else 0)
                _put32(p + o[13], i)
                _put32(p + o[14], i + 1)
            _put32(p + o[6], day[i])
            _put32(p + o[7], hour[i])
            _put32(p + o[8], weekday[i])
            _put32(p + o[9], month[i])
            _put32(p + o[10], dom[i])
            _put32(p + o[11], branch[i])
            _put32(p + o[12], channel[i])


cdef extern from *:
    """
    #define LE_BULK_PREFETCH(p) __builtin_prefetch((const void *)(p))
    """
    void LE_BULK_PREFETCH(const void* p) noexcept nogil


def encode_ids(const int64_t[::1] values, const uint8_t[::1] valid, int64_t[::1] keys, int32_t[::1] slot_code,
               int64_t[::1] codes, int64_t[::1] uniques):
    """Dictionary-encode 64-bit ids in the order they first appear (as Arrow's ``dictionary_encode``):
    ``codes[i]`` is the place in ``uniques`` of ``values[i]``, or -1 where ``valid`` (when not empty) is
    0. ``keys`` and ``slot_code`` are the hash table, of one power-of-two length at least twice the
    values: scratch that the caller may keep from call to call (every slot is cleared here). Returns
    the number of uniques."""
    cdef Py_ssize_t n = values.shape[0], cap = keys.shape[0], i, nu = 0
    cdef uint64_t mask = <uint64_t>cap - 1, h
    cdef int64_t v
    cdef bint check = valid.shape[0] != 0
    if cap == 0 or (cap & (cap - 1)) or slot_code.shape[0] != cap or cap < 2 * n:
        raise ValueError(f"keys and slot_code must have one power-of-two length of at least {2 * n}, "
                         f"not {keys.shape[0]} and {slot_code.shape[0]}")
    if codes.shape[0] < n or uniques.shape[0] < n or (check and valid.shape[0] < n):
        raise ValueError(f"codes, uniques (and valid, when given) must hold {n} values")
    with nogil:
        memset(&slot_code[0], 0xFF, cap * sizeof(int32_t))
        for i in range(n):
            if i + 16 < n:      # (the table is far bigger than the caches: fetch a slot ahead)
                h = mix64(<uint64_t>values[i + 16]) & mask
                LE_BULK_PREFETCH(&slot_code[h])
                LE_BULK_PREFETCH(&keys[h])
            if check and not valid[i]:
                codes[i] = -1
                continue
            v = values[i]
            h = mix64(<uint64_t>v) & mask
            while slot_code[h] >= 0 and keys[h] != v:
                h = (h + 1) & mask
            if slot_code[h] < 0:
                keys[h] = v
                slot_code[h] = <int32_t>nu
                uniques[nu] = v
                nu += 1
            codes[i] = slot_code[h]
    return nu


def unique_inverse(const int64_t[::1] values, int64_t bound, int32_t[::1] slot, int64_t[::1] inv, int64_t[::1] keys):
    """``np.unique(values, return_inverse=True)`` for integers in [0, bound) through a presence table
    kept by the caller: ``slot`` holds at least ``bound`` entries, every one -1, and is left so; the
    distinct values go to ``keys`` in ascending order (their count is returned) and each value's
    position among them to ``inv``. One pass over the values, one over the table, one to put the table
    back: no sort, and no fresh memory but what the caller gives."""
    cdef Py_ssize_t n = values.shape[0], i, k = 0
    cdef int64_t v, u
    if bound < 0 or slot.shape[0] < bound:
        raise ValueError("slot holds %d entries, fewer than bound (%d)" % (slot.shape[0], bound))
    if inv.shape[0] < n:
        raise ValueError("inv holds %d entries, fewer than the %d values" % (inv.shape[0], n))
    if keys.shape[0] < n and keys.shape[0] < bound:
        raise ValueError("keys holds %d entries, fewer than the distinct values may be" % keys.shape[0])
    for i in range(n):      # (checked first: a bad value leaves the table as it was)
        if <uint64_t>values[i] >= <uint64_t>bound:
            raise ValueError("values[%d] is %d, outside [0, %d)" % (i, values[i], bound))
    with nogil:
        for i in range(n):
            slot[values[i]] = 0
        for u in range(bound):
            if slot[u] == 0:
                slot[u] = <int32_t>k
                keys[k] = u
                k += 1
        for i in range(n):
            inv[i] = slot[values[i]]
        for i in range(k):
            slot[keys[i]] = -1
    return k


def take_values(dict table, const int64_t[::1] keys):
    """A new dict of the items of ``table`` whose keys are in ``keys`` (those present): the members'
    histories that a chunk may change or store, say, instead of a copy of every member's."""
    cdef Py_ssize_t n = keys.shape[0], k
    cdef dict out = {}
    cdef object key
    cdef PyObject* v
    for k in range(n):
        key = PyLong_FromLongLong(keys[k])
        v = PyDict_GetItem(table, key)
        if v != NULL:
            PyDict_SetItem(out, key, <object>v)
    return out
