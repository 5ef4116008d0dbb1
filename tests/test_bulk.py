"""The compiled batch helpers (loyalty_engine._bulk) against plain Python references, and their stub."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import loyalty_engine._bulk as bulk
from loyalty_engine.bulk_import import hash_strings
from loyalty_engine.engine import HEV, MSTATE

STUB = Path(bulk.__file__).with_name("_bulk.pyi")


def _stub_funcs() -> dict[str, list[str]]:
    tree = ast.parse(STUB.read_text())
    return {n.name: [a.arg for a in n.args.args] for n in tree.body if isinstance(n, ast.FunctionDef)}


def test_stub_names_and_parameters_match_the_module() -> None:
    funcs = _stub_funcs()
    runtime = {n for n in dir(bulk) if not n.startswith("__")}
    assert runtime == set(funcs)
    for name, params in funcs.items():
        assert list(inspect.signature(getattr(bulk, name)).parameters) == params, name


def _varint(v: int) -> bytes:
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _zz(v: int) -> bytes:
    """A signed 64-bit value as a zigzag varint."""
    return _varint((v << 1) ^ (v >> 63) if v >= 0 else ((-v) << 1) - 1)


def _compact_reference(name: bytes, state: bytes, use: np.ndarray | None, hist: bytes) -> bytes:
    """The compact member record (loyalty_engine/_record.pxd), written the plain way."""
    fields = np.frombuffer(state, MSTATE)[0].tolist()
    assert len(fields) == 16 and MSTATE.itemsize == 76
    out = (len(name) | 0x8000).to_bytes(2, "little") + name + b"".join(_zz(int(v)) for v in fields)
    values = [] if use is None else use.tolist()
    out += _varint(len(values)) + b"".join(_zz(v) for v in values)
    prev = 0
    for e in np.frombuffer(hist, HEV).tolist():
        day, visits, amount, points = (int(x) for x in e)
        out += _zz(day - prev) + _zz(visits) + _zz(amount) + _zz(points)
        prev = day
    return out


def _plain_reference(name: bytes, state: bytes, use: np.ndarray | None, hist: bytes) -> bytes:
    """The plain member record that earlier versions wrote (still read)."""
    use_b = b"" if use is None else use.tobytes()
    return len(name).to_bytes(2, "little") + name + state + len(use_b).to_bytes(4, "little") + use_b + hist


def _member_records_reference(idx: np.ndarray, names: list[str], members: np.ndarray, use: np.ndarray,
                              hist: dict[int, bytes]) -> list[tuple[bytes, bytes]]:
    """The member store's records, one member at a time."""
    return [(b"M" + i.to_bytes(8, "big"),
             _compact_reference(names[i].encode(), members[i: i + 1].tobytes(),
                                use[i] if use.shape[1] and use[i].any() else None, hist.get(i, b"")))
            for i in idx.tolist()]


def _random_records(rng: np.random.Generator, n: int, noff: int) -> tuple[list[str], np.ndarray, np.ndarray,
                                                                          dict[int, bytes]]:
    names = [f"m{i}" if i % 7 else f"ç{i}—名" for i in range(n)]
    members = np.zeros(n, MSTATE)
    raw = members.view(np.uint8)
    raw[:] = rng.integers(0, 256, len(raw))
    use = np.zeros((n, noff * 3), np.int64)
    if noff:
        hit = rng.random(n) < 0.3
        use[hit] = rng.integers(-5, 1 << 40, (int(hit.sum()), noff * 3))
        use[0] = [np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1] * noff
    hist = {}
    for i in range(n):
        if i % 3:
            h = np.zeros(int(rng.integers(0, 5)), HEV)
            h.view(np.uint8)[:] = rng.integers(0, 256, h.nbytes, dtype=np.uint8)   # any values at all
            if i % 5 == 0 and len(h):          # and the usual ones: days in order, small counts and sums
                h["day"] = np.sort(rng.integers(19_000, 21_000, len(h)))
                h["visits"], h["amount"] = 1, rng.integers(0, 10**7, len(h))
                h["points"] = h["amount"] // 1000
            hist[i] = h.tobytes()
    hist[1] = np.array([(np.iinfo(np.int32).min, np.iinfo(np.int32).max, np.iinfo(np.int64).min,
                         np.iinfo(np.int64).max), (np.iinfo(np.int32).max, np.iinfo(np.int32).min, -1, 0)],
                       HEV).tobytes()
    return names, members, use, hist


@pytest.mark.parametrize("noff", [0, 1, 5])
def test_member_records_are_the_bytes_of_the_one_member_path(noff: int) -> None:
    rng = np.random.default_rng(5)
    n = 300
    names, members, use, hist = _random_records(rng, n, noff)
    idx = np.sort(np.concatenate([[0, 1], rng.choice(np.arange(2, n), 120, replace=False)])).astype(np.int64)
    got = bulk.member_records(idx, names, members[idx].view(np.uint8).reshape(len(idx), -1),
                              np.ascontiguousarray(use[idx]).view(np.uint8).reshape(len(idx), -1),
                              use[idx].any(axis=1).view(np.uint8) if noff else np.zeros(len(idx), np.uint8), hist)
    assert got == _member_records_reference(idx, names, members, use, hist)


@pytest.mark.parametrize("noff", [0, 2])
def test_member_fields_read_back_both_encodings(noff: int) -> None:
    """What member_records writes (compact) and what earlier versions wrote (plain) read back the same:
    the name, the state's bytes, the usage (int64 values; empty when never used), the history's events."""
    rng = np.random.default_rng(7)
    names, members, use, hist = _random_records(rng, 200, noff)
    idx = np.arange(200, dtype=np.int64)
    used = use.any(axis=1).view(np.uint8) if noff else np.zeros(200, np.uint8)
    compact = bulk.member_records(idx, names, members.view(np.uint8).reshape(200, -1),
                                  np.ascontiguousarray(use).view(np.uint8).reshape(200, -1), used, hist)
    for i, (_, value) in enumerate(compact):      # (random bytes: the worst case for size, see below)
        u = use[i] if used[i] else None
        want = (names[i], members[i: i + 1].tobytes(), b"" if u is None else u.tobytes(), hist.get(i, b""))
        assert bulk.member_fields(value, MSTATE.itemsize) == want
        plain = _plain_reference(names[i].encode(), members[i: i + 1].tobytes(), u, hist.get(i, b""))
        assert bulk.member_fields(plain, MSTATE.itemsize) == want


def test_the_compact_record_of_a_usual_member_takes_about_half_the_bytes() -> None:
    """Ten purchases in a year, some offer use: what an import rewrites for every member it touches."""
    h = np.zeros(10, HEV)
    h["day"] = 20_000 + np.arange(10) * 36
    h["visits"], h["amount"] = 1, np.arange(10) * 10_000 + 120_000
    h["points"] = h["amount"] // 1000
    use = np.array([[1, 1, 20_030], [0, 0, 0], [2, 1, 20_300], [0, 0, 0], [0, 0, 0]], np.int64).reshape(1, -1)
    state = np.zeros(1, MSTATE)
    value = bulk.member_records(np.zeros(1, np.int64), ["cust-000042"], state.view(np.uint8).reshape(1, -1),
                                use.view(np.uint8), np.ones(1, np.uint8), {0: h.tobytes()})[0][1]
    plain = _plain_reference(b"cust-000042", state.tobytes(), use[0], h.tobytes())
    assert len(value) < 0.5 * len(plain)


def test_member_fields_refuse_a_damaged_record() -> None:
    good = bulk.member_records(np.zeros(1, np.int64), ["a"], np.zeros((1, MSTATE.itemsize), np.uint8),
                               np.zeros((1, 0), np.uint8), np.zeros(1, np.uint8),
                               {0: np.zeros(2, HEV).tobytes()})[0][1]
    assert bulk.member_fields(good, MSTATE.itemsize)[3] == np.zeros(2, HEV).tobytes()
    assert len(good) == 2 + 1 + 16 + 1 + 2 * 4        # a zero state: 16 one-byte fields; no usage; 2 events
    head = good[:3]
    for bad in (good[:1],                               # no length
                good[:10],                              # the state cut short
                head + b"\xff" * 11,                    # a state value of more than 64 bits
                head + _zz(1 << 40) * 16,                # an int32 field out of its range
                good[:19] + _varint(5),                  # more usage values than bytes
                good[:-1],                              # the last event cut short
                good + b"\x80"):                        # a varint never ended
        with pytest.raises(ValueError, match="member record"):
            bulk.member_fields(bad, MSTATE.itemsize)
    with pytest.raises(ValueError, match="MSTATE's 76"):
        bulk.member_fields(good, 75)


def test_member_records_refuse_what_is_not_a_member() -> None:
    state = np.zeros((1, MSTATE.itemsize), np.uint8)
    use = np.zeros((1, 0), np.uint8)
    used = np.zeros(1, np.uint8)
    with pytest.raises(ValueError, match="not a member index"):
        bulk.member_records(np.array([3], np.int64), ["a"], state, use, used, {})
    with pytest.raises(TypeError, match="not str"):
        bulk.member_records(np.array([0], np.int64), [b"a"], state, use, used, {})  # type: ignore[list-item]
    with pytest.raises(TypeError, match="not bytes"):
        bulk.member_records(np.array([0], np.int64), ["a"], state, use, used, {0: "x"})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="one row per member"):
        bulk.member_records(np.array([0, 0], np.int64), ["a"], state, use, used, {})


def test_name_records() -> None:
    names = ["a", "", "ç—名", "x" * 200]
    assert bulk.name_records(names, 7) == [(b"N" + m.encode(), (7 + k).to_bytes(8, "big"))
                                           for k, m in enumerate(names)]


def _offsets(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    arr = arr.cast(pa.large_string())
    bufs = arr.buffers()
    off = np.frombuffer(bufs[1], np.int64)[arr.offset: arr.offset + len(arr) + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return np.ascontiguousarray(off), data


def test_take_strings_reads_arrow_buffers() -> None:
    arr = pa.array(["b", "", "ç—名", "zz", "b", None, "q"], pa.string()).slice(1)   # an offset too
    off, data = _offsets(arr)
    which = np.array([2, 0, 1, 3], np.int64)
    assert bulk.take_strings(off, data, which) == ["zz", "", "ç—名", "b"]
    with pytest.raises(ValueError, match="outside"):
        bulk.take_strings(off, data, np.array([len(arr)], np.int64))
    empty_off, empty_data = _offsets(pa.array(["", ""], pa.string()))
    assert bulk.take_strings(empty_off, empty_data, np.array([1, 0], np.int64)) == ["", ""]


def test_the_name_index_finds_what_a_dict_finds_even_when_hashes_collide() -> None:
    rng = np.random.default_rng(4)
    names = [f"m{i}" if i % 11 else f"ç{i}—名" for i in range(3_000)]
    table = {m: i for i, m in enumerate(names)}
    queries = pa.array([names[i] for i in rng.integers(0, len(names), 500)] + ["nobody", "", "m1x"]).slice(2)
    off, data = _offsets(queries)
    cap = 1 << 13
    for label, hashes_of in (("real", lambda a: hash_strings(a)),
                             ("colliding", lambda a: hash_strings(a) % np.uint64(7))):   # 7 hashes for all
        slot_hash, slot_value = np.zeros(cap, np.uint64), np.full(cap, -1, np.int64)
        bulk.index_insert(slot_hash, slot_value, hashes_of(pa.array(names)), np.arange(len(names), dtype=np.int64))
        out = np.zeros(len(queries), np.int64)
        missing = bulk.index_lookup(slot_hash, slot_value, hashes_of(queries), off, data, names, out)
        ref = [table.get(q, -1) for q in queries.to_pylist()]
        assert out.tolist() == ref, label
        assert missing == ref.count(-1) == 3
    with pytest.raises(ValueError, match="power-of-two"):
        bulk.index_insert(np.zeros(6, np.uint64), np.full(6, -1, np.int64), np.zeros(1, np.uint64),
                          np.zeros(1, np.int64))


def test_gather_and_scatter_bytes() -> None:
    rng = np.random.default_rng(2)
    table = {i: rng.integers(0, 256, int(rng.integers(0, 50)), dtype=np.uint8).tobytes() for i in range(0, 40, 2)}
    keys = np.array([5, 2, 0, 38, 39, 2], np.int64)
    off = np.zeros(len(keys) + 1, np.int64)
    got = bulk.gather_bytes(table, keys, off)
    parts = [table.get(k, b"") for k in keys.tolist()]
    assert got == b"".join(parts)
    assert off.tolist() == np.concatenate([[0], np.cumsum([len(p) for p in parts])]).tolist()
    new: dict[int, bytes] = {1: b"old"}
    data = np.frombuffer(b"abcdefgh", np.uint8)
    bulk.scatter_bytes(new, np.array([1, 7, 3], np.int64), np.array([0, 3, 3, 8], np.int64), data)
    assert new == {1: b"abc", 7: b"", 3: b"defgh"}
    with pytest.raises(ValueError, match="outside"):
        bulk.scatter_bytes(new, np.array([1], np.int64), np.array([0, 9], np.int64), data)
    with pytest.raises(TypeError, match="not bytes"):
        bulk.gather_bytes({1: "x"}, np.array([1], np.int64), np.zeros(2, np.int64))  # type: ignore[dict-item]


def test_a_full_name_table_is_refused_and_searched_once_round():
    """The caller keeps the table at most half full; if it does not, insert refuses and lookup ends
    (an open-addressing probe of a full table would never find a free slot)."""
    slot_hash, slot_value = np.zeros(4, np.uint64), np.full(4, -1, np.int64)
    with pytest.raises(ValueError, match="filled up"):
        bulk.index_insert(slot_hash, slot_value, np.arange(5, dtype=np.uint64), np.arange(5, dtype=np.int64))
    with pytest.raises(ValueError, match="no free slot"):
        bulk.index_insert(slot_hash, slot_value, np.arange(1, dtype=np.uint64), np.arange(1, dtype=np.int64))
    names = pa.array(["x"], pa.large_string())
    offsets = np.frombuffer(names.buffers()[1], np.int64)[:2].copy()
    data = np.frombuffer(names.buffers()[2], np.uint8)[:1].copy()
    out = np.zeros(1, np.int64)
    assert bulk.index_lookup(slot_hash, slot_value, np.array([7], np.uint64), offsets, data,
                              ["a", "b", "c", "d"], out) == 1
    assert out.tolist() == [-1]


@pytest.mark.parametrize("items", [True, False])
def test_purchase_rows_in_one_pass_are_the_rows_numpy_builds(items: bool) -> None:
    """_bulk.purchase_rows (the import's rows, into a buffer full of garbage) gives the bytes the NumPy
    assignments give into a zeroed buffer: ids outside 0..63 have no bit, values are cut to 32 bits."""
    from loyalty_engine.engine import ROW, _purchase_rows

    rng = np.random.default_rng(8)
    n = 5_000
    member, amount, qty = rng.integers(0, 10**6, n), rng.integers(1, 10**9, n), rng.integers(0, 5, n)
    local = {k: rng.integers(-5, 40_000, n) for k in ("day", "hour", "weekday", "month", "dom")}
    local["day"][:3] = [1 << 33, -(1 << 33) - 7, (1 << 31) + 5]        # cut to 32 bits as NumPy does
    branch, channel = rng.integers(0, 9, n).astype(np.int32), rng.integers(0, 9, n).astype(np.int32)
    cat, sku = rng.integers(-3, 70, n).astype(np.int32), rng.integers(0, 64, n).astype(np.int32)
    cat[:4] = [63, 64, -1, 0]
    want = np.zeros(n, ROW)
    w = _purchase_rows(member, amount, qty, local, branch, channel, cat if items else None, sku if items else None,
                       redeem=np.zeros(n, np.int64), into=want)
    garbage = np.frombuffer(rng.bytes(n * ROW.itemsize), ROW).copy()
    got = _purchase_rows(member, amount, qty, local, branch, channel, cat if items else None,
                         sku if items else None, into=garbage)
    assert got[0] is garbage and got[0].tobytes() == w[0].tobytes()
    for a, b in zip(got[1:], w[1:], strict=True):
        assert a.dtype == b.dtype and a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="not one a row"):
        bulk.purchase_rows(garbage.view(np.uint8).reshape(n, -1), np.array([0] * 15 + [ROW.itemsize]), member[:-1],
                           amount, qty, *(local[k] for k in ("day", "hour", "weekday", "month", "dom")), branch,
                           channel, cat, sku)
    with pytest.raises(ValueError, match="layout"):
        bulk.purchase_rows(garbage.view(np.uint8).reshape(n, -1), np.array([0] * 15 + [7]), member, amount, qty,
                           *(local[k] for k in ("day", "hour", "weekday", "month", "dom")), branch, channel, cat, sku)


@pytest.mark.parametrize("kind", ["int64", "uint64", "int32"])
def test_encode_ids_is_dictionary_encode_in_first_seen_order(kind: str) -> None:
    rng = np.random.default_rng(8)
    n = 5_000
    raw = rng.integers(0, 700, n)
    if kind == "uint64":
        values = (raw.astype(np.uint64) + np.uint64(1 << 63)) * np.uint64(3)     # above 2^63 too
    elif kind == "int64":
        values = (raw - 350) * (1 << 40)                                        # negative, low bits equal
    else:
        values = raw.astype(np.int32)
    nulls = rng.random(n) < 0.05
    arr = pa.array(values, mask=nulls).slice(7)                                 # an offset too
    want = pc.dictionary_encode(arr)
    cap = 1 << 14
    keys, slots = np.empty(cap, np.int64), np.empty(cap, np.int32)
    wide = np.ascontiguousarray(arr.fill_null(0).to_numpy().astype(np.uint64 if kind == "uint64" else np.int64))
    valid = arr.is_valid().to_numpy(zero_copy_only=False).view(np.uint8).copy()
    codes, uniques = np.empty(len(arr), np.int64), np.empty(len(arr), np.int64)
    for _ in range(2):                          # the table is reused: every slot is cleared first
        nu = bulk.encode_ids(wide.view(np.int64), valid, keys, slots, codes, uniques)
        assert codes.tolist() == want.indices.fill_null(-1).to_numpy(zero_copy_only=False).tolist()
        assert uniques[:nu].view(wide.dtype).tolist() == want.dictionary.to_pylist()
    nu = bulk.encode_ids(wide.view(np.int64), np.zeros(0, np.uint8), keys, slots, codes, uniques)
    assert nu == len(set(wide.tolist())) and (codes >= 0).all()
    with pytest.raises(ValueError, match="power-of-two"):
        bulk.encode_ids(wide.view(np.int64), valid, keys[:100], slots[:100], codes, uniques)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 300), max_size=400), st.integers(0, 40))
def test_unique_inverse_is_numpys_unique_and_leaves_its_table_as_it_found_it(values, extra):
    bound = (max(values) + 1 if values else 0) + extra
    v = np.array(values, np.int64)
    slot = np.full(bound + 3, -1, np.int32)
    inv, keys = np.empty(len(v), np.int64), np.empty(len(v), np.int64)
    k = bulk.unique_inverse(v, bound, slot, inv, keys)
    u, i = np.unique(v, return_inverse=True)
    assert keys[:k].tolist() == u.tolist() and inv.tolist() == i.reshape(-1).tolist()
    assert (slot == -1).all()


def test_unique_inverse_refuses_what_it_cannot_hold():
    slot = np.full(10, -1, np.int32)
    out = np.empty(3, np.int64)
    with pytest.raises(ValueError, match=r"values\[1\] is 10, outside \[0, 10\)"):
        bulk.unique_inverse(np.array([1, 10, 2], np.int64), 10, slot, out, out.copy())
    assert (slot == -1).all()                   # (checked before the table is touched)
    with pytest.raises(ValueError, match="slot holds 10 entries, fewer than bound"):
        bulk.unique_inverse(np.array([1], np.int64), 11, slot, out, out.copy())
    with pytest.raises(ValueError, match="inv holds 0 entries"):
        bulk.unique_inverse(np.array([1], np.int64), 10, slot, np.empty(0, np.int64), out)


def test_take_values_is_the_items_of_those_keys():
    table = {1: b"a", 5: b"bb", 9: b""}
    got = bulk.take_values(table, np.array([9, 2, 5, 5], np.int64))
    assert got == {9: b"", 5: b"bb"} and got is not table
    assert bulk.take_values(table, np.zeros(0, np.int64)) == {}
