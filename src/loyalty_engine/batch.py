"""Turning what a host hands the ledger (value objects, Arrow tables, NumPy arrays) into records.

Every check here is about the call itself (types, ranges, naive times, missing columns): a failure
raises :class:`ValidationError` naming the value and where it is, and nothing is written. Business
rejections (zero amounts, unknown accounts) are left to the kernel, which answers with results.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from datetime import timedelta
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .errors import ValidationError
from .types import (
    ACCOUNT_RECORD_DTYPE,
    HOST_TRANSFER_FLAGS,
    RECORD_DTYPE,
    SYSTEM_ID_HI,
    Account,
    Transfer,
    to_micros,
)

__all__ = ["normalize_accounts", "normalize_transfers", "normalize_batch", "TRANSFER_COLUMNS"]

U64 = (1 << 64) - 1
I64_MIN, I64_MAX = -(1 << 63), (1 << 63) - 1

# column -> (record field, lo, hi, required)
TRANSFER_COLUMNS: dict[str, tuple[str, int, int, bool]] = {
    "id": ("id_lo", 0, U64, True),
    "id_hi": ("id_hi", 0, SYSTEM_ID_HI - 1, False),
    "debit": ("debit", 0, U64, True),
    "credit": ("credit", 0, U64, True),
    "amount": ("amount", I64_MIN, I64_MAX, True),
    "asset": ("asset", 0, (1 << 32) - 1, False),
    "code": ("code", 0, 0xFFFF, False),
    "flags": ("flags", 0, 0xFFFF, False),
    "at": ("at", I64_MIN, I64_MAX, True),
    "expires_at": ("expires_at", I64_MIN, I64_MAX, False),
    "related": ("related_lo", 0, U64, False),
    "related_hi": ("related_hi", 0, U64, False),
    "timeout": ("timeout", I64_MIN, I64_MAX, False),
    "user_data": ("user_data", 0, U64, False),
}
TIME_COLUMNS = ("at", "expires_at")
_ID_LIMIT = SYSTEM_ID_HI << 64
#: One RECORD_DTYPE record (id_lo, id_hi, debit, credit, amount, related_lo, related_hi, user_data, at,
#: expires_at, timeout, fp, asset, code, flags).
_PACK = struct.Struct("<QQQQqQQQqqqQIHH")


def _int(v: Any, where: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValidationError(f"{where}={v!r} must be an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise ValidationError(f"{where}={v} is out of range [{lo}, {hi}]")
    return v


def normalize_accounts(accounts: Sequence[Account]) -> np.ndarray:
    if isinstance(accounts, Account):
        raise ValidationError("create_accounts takes a list of Account, not one Account")
    recs = np.zeros(len(accounts), ACCOUNT_RECORD_DTYPE)
    for i, a in enumerate(accounts):
        if not isinstance(a, Account):
            raise ValidationError(f"accounts[{i}]={a!r} is not an Account")
        recs[i] = (
            _int(a.id, f"accounts[{i}].id", 0, U64),
            _int(a.user_data, f"accounts[{i}].user_data", 0, U64),
            _int(a.asset, f"accounts[{i}].asset", 0, (1 << 32) - 1),
            _int(int(a.flags), f"accounts[{i}].flags", 0, 7),
            0,
        )
    return recs


def normalize_transfers(transfers: Sequence[Transfer]) -> np.ndarray:
    if isinstance(transfers, Transfer):
        raise ValidationError("post takes a list of Transfer, not one Transfer; use post([t])")
    n = len(transfers)
    raw = bytearray(n * _PACK.size)
    for i, t in enumerate(transfers):
        # the common case, checked without building a message: plain ints, no times to convert
        fl = t.flags if type(t) is Transfer else -1
        fl = fl if type(fl) is int else (int(fl) if isinstance(fl, (int, np.integer)) else -1)
        if (type(t) is Transfer and type(t.id) is int and 0 < t.id < _ID_LIMIT and type(t.debit) is int
                and 0 <= t.debit <= U64 and type(t.credit) is int and 0 <= t.credit <= U64
                and type(t.amount) is int and I64_MIN <= t.amount <= I64_MAX and type(t.at) is int
                and I64_MIN <= t.at <= I64_MAX and t.expires_at is None and type(t.related) is int
                and 0 <= t.related < 1 << 128 and type(t.timeout) is int and I64_MIN <= t.timeout <= I64_MAX
                and type(t.user_data) is int and 0 <= t.user_data <= U64 and type(t.asset) is int
                and 0 <= t.asset < 1 << 32 and type(t.code) is int and 0 <= t.code <= 0xFFFF
                and 0 <= fl <= 0xFFFF and not fl & ~HOST_TRANSFER_FLAGS):
            _PACK.pack_into(raw, i * _PACK.size, t.id & U64, t.id >> 64, t.debit, t.credit, t.amount,
                            t.related & U64, t.related >> 64, t.user_data, t.at, 0, t.timeout, 0, t.asset,
                            t.code, fl)
            continue
        if not isinstance(t, Transfer):
            raise ValidationError(f"transfers[{i}]={t!r} is not a Transfer")
        w = f"transfers[{i}]"
        tid = _int(t.id, f"{w}.id", 0, (SYSTEM_ID_HI << 64) - 1)
        rel = _int(t.related, f"{w}.related", 0, (1 << 128) - 1)
        flags = _int(int(t.flags), f"{w}.flags", 0, 0xFFFF)
        if flags & ~HOST_TRANSFER_FLAGS:
            raise ValidationError(f"{w}.flags={flags:#x} sets flags reserved for the ledger")
        timeout = t.timeout
        if isinstance(timeout, timedelta):
            timeout = (timeout.days * 86_400 + timeout.seconds) * 1_000_000 + timeout.microseconds
        at = to_micros(t.at, f"{w}.at")
        exp = 0 if t.expires_at is None else to_micros(t.expires_at, f"{w}.expires_at")
        if t.expires_at is not None and exp == 0:
            raise ValidationError(f"{w}.expires_at=0 is the epoch itself; use None for 'never'")
        _PACK.pack_into(
            raw, i * _PACK.size,
            tid & U64, tid >> 64,
            _int(t.debit, f"{w}.debit", 0, U64),
            _int(t.credit, f"{w}.credit", 0, U64),
            _int(t.amount, f"{w}.amount", I64_MIN, I64_MAX),
            rel & U64, rel >> 64,
            _int(t.user_data, f"{w}.user_data", 0, U64),
            at, exp,
            _int(timeout, f"{w}.timeout", I64_MIN, I64_MAX),
            0,
            _int(t.asset, f"{w}.asset", 0, (1 << 32) - 1),
            _int(t.code, f"{w}.code", 0, 0xFFFF),
            flags,
        )
    return np.frombuffer(raw, RECORD_DTYPE) if n else np.zeros(0, RECORD_DTYPE)


def _arrow_column(col: pa.ChunkedArray | pa.Array, name: str) -> np.ndarray:
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    t = col.type
    if name in TIME_COLUMNS and pa.types.is_timestamp(t):
        if t.tz is None:
            raise ValidationError(f"column '{name}' holds naive timestamps ({t}); give them a timezone "
                                  f"(e.g. pc.assume_timezone(col, 'Asia/Tehran')) or pass UTC microseconds")
        col = col.cast(pa.timestamp("us", tz="UTC"), safe=True).cast(pa.int64())
    elif name == "timeout" and pa.types.is_duration(t):
        col = col.cast(pa.duration("us"), safe=True).cast(pa.int64())
    elif not pa.types.is_integer(t):
        hint = " (NaN or fractions cannot be points or money: use integers)" if pa.types.is_floating(t) else ""
        raise ValidationError(f"column '{name}' has type {t}; it must be integer{hint}")
    if col.null_count:
        if name == "expires_at":
            col = pc.fill_null(col, 0)
        else:
            row = int(pc.index(pc.is_null(col), True).as_py())
            raise ValidationError(f"column '{name}' is null at row {row}; every row needs a value")
    return col.to_numpy(zero_copy_only=False)


def normalize_batch(batch: Any) -> np.ndarray:
    """A record array from a pyarrow Table/RecordBatch, a structured ndarray or a dict of arrays."""
    if isinstance(batch, (pa.Table, pa.RecordBatch)):
        names = list(batch.schema.names)
        n = batch.num_rows

        def get(name: str) -> np.ndarray:
            return _arrow_column(batch.column(name), name)
    elif isinstance(batch, np.ndarray) and batch.dtype.names is not None:
        if batch.ndim != 1:
            raise ValidationError(f"a structured array batch must be 1-d, not of shape {batch.shape}")
        if batch.dtype == RECORD_DTYPE:
            # used as it is (the kernel only reads it, and computes the fingerprints itself)
            out = np.ascontiguousarray(batch)
            _check_flags(out["flags"])
            sys_ids = out["id_hi"] == np.uint64(SYSTEM_ID_HI)
            if sys_ids.any():
                row = int(np.argmax(sys_ids))
                raise ValidationError(f"column 'id_hi' row {row}: ids with all-ones high bits are "
                                      f"reserved for the ledger")
            return out
        names = list(batch.dtype.names)
        n = len(batch)

        def get(name: str) -> np.ndarray:
            col = batch[name]
            if name in TIME_COLUMNS and col.dtype.kind == "M":
                raise ValidationError(f"column '{name}' is numpy datetime64, which has no timezone; "
                                      f"pass int64 microseconds since the epoch (UTC) or an Arrow "
                                      f"timestamp with a timezone")
            if col.dtype.kind not in "iu":
                raise ValidationError(f"column '{name}' has dtype {col.dtype}; it must be integer")
            return col
    elif isinstance(batch, dict):
        return normalize_batch(pa.table(batch))
    else:
        raise ValidationError(f"post_batch takes a pyarrow Table/RecordBatch or a structured NumPy array, "
                              f"not {type(batch).__name__}")
    unknown = [c for c in names if c not in TRANSFER_COLUMNS and c != "fp"]
    if unknown:
        raise ValidationError(f"unknown column(s) {unknown}; the columns are {list(TRANSFER_COLUMNS)}")
    missing = [c for c, (_, _, _, req) in TRANSFER_COLUMNS.items() if req and c not in names]
    if missing:
        raise ValidationError(f"missing required column(s) {missing}")
    recs = np.zeros(n, RECORD_DTYPE)
    for name in names:
        if name == "fp":
            continue
        field, lo, hi, _ = TRANSFER_COLUMNS[name]
        col = get(name)
        if n:
            if col.dtype.kind == "u":
                bad = col > np.uint64(hi) if hi < U64 else None
                low_bad = None
            else:
                c64 = col.astype(np.int64, copy=False)
                low_bad = c64 < lo
                bad = (c64 > hi) if hi < I64_MAX else None
            for mask in (low_bad, bad):
                if mask is not None and mask.any():
                    row = int(np.argmax(mask))
                    raise ValidationError(f"column '{name}' row {row}: {col[row]} is out of range "
                                          f"[{lo}, {hi}]")
        recs[field] = col
    _check_flags(recs["flags"])
    return recs


def _check_flags(flags: np.ndarray) -> None:
    bad = (flags & ~np.uint16(HOST_TRANSFER_FLAGS)) != 0
    if bad.any():
        row = int(np.argmax(bad))
        raise ValidationError(f"column 'flags' row {row}: {int(flags[row]):#x} sets flags reserved for the "
                              f"ledger")
