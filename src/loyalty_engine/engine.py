"""The engine: a customer club run by a :class:`~loyalty_engine.program.Program` over a ledger.

One facade for the host: enroll, purchase (one receipt or a batch of millions, through the same
kernel), quote, refund, redeem, member, expire, and an outbox of events to deliver. Every call that
changes something is one LMDB write transaction holding the ledger transfers, the members' state, the
receipt and the events together. See docs/rules.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC as UTC_TZ
from datetime import date, datetime, timedelta
from enum import IntEnum
from typing import Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from . import _bulk, _core, _memory
from .errors import ConfigError, CorruptionError, InsufficientBalanceError, NotFoundError, StorageError, ValidationError
from .ledger import KIND_ACCOUNTS, KIND_TRANSFERS, Ledger, _account_records
from .program import Program
from .rules.expr import EPOCH_ORDINAL, VARIABLES
from .store import EngineLock
from .types import (
    RECORD_DTYPE,
    Account,
    AccountFlags,
    AccountResult,
    Code,
    TransferFlags,
    TransferResult,
    from_micros,
    to_micros,
)

__all__ = ["Engine", "Item", "Receipt", "RefundReceipt", "MemberInfo", "Event", "RowStatus", "POINTS", "CREDIT"]

POINTS, CREDIT = 1, 2                       # ledger assets
ISSUE_POINTS, REDEEMED_POINTS, EXPIRED_POINTS, CLAWBACK_POINTS = 1, 2, 3, 4
ISSUE_CREDIT, SPENT_CREDIT, CLAWBACK_CREDIT = 5, 6, 7
MEMBER_BASE = 1 << 20
DAY_US = 86_400_000_000
MSTATE = _core.MSTATE_DTYPE
HEV = _core.HEV_DTYPE
ROW = _core.ROW_DTYPE
OUT = _core.OUT_DTYPE
N_FACTS = len(VARIABLES)
_NO_HIST = np.zeros(0, HEV)
_NO_I32 = np.zeros(0, np.int32)
#: account results that leave a member's account ready: created, or there already with the same fields
_ACCOUNT_READY = (int(AccountResult.OK), int(AccountResult.EXISTS))
_NO_I64 = np.zeros(0, np.int64)
_QUARTER_US = 900_000_000             # a quarter hour in microseconds
_SEG0 = np.zeros(1, np.int64)         # one purchase is one segment
_NO_FACTS = np.zeros((0, N_FACTS), np.int64)   # batches record no facts


def _event_json(kind: str, member: str, at_us: int, data: dict[str, Any]) -> bytes:
    """``json.dumps({"kind": ..., "member": ..., "at": ..., "data": data}).encode()``, the same bytes,
    written directly for the values events hold (strings and integers; anything else goes to json)."""
    parts = []
    for k, v in data.items():
        if type(v) is int:
            parts.append(f"{_json_str(k)}: {v}")
        elif type(v) is str:
            parts.append(f"{_json_str(k)}: {_json_str(v)}")
        else:
            return json.dumps({"kind": kind, "member": member, "at": at_us, "data": data}).encode()
    return (f'{{"kind": {_json_str(kind)}, "member": {_json_str(member)}, "at": {int(at_us)}, '
            f'"data": {{{", ".join(parts)}}}}}').encode()


_json_str = json.encoder.encode_basestring_ascii     # type: ignore[attr-defined]


def _bits(mask: int) -> list[int]:
    """The positions of the set bits of a non-negative mask, lowest first."""
    out = []
    mask &= (1 << 64) - 1               # an int64 mask with bit 63 set is negative
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def _as_i64(bits: int) -> int:
    """A 64-bit set (bit 63 may be set) as the int64 the kernel's rows hold."""
    return bits - (1 << 64) if bits >= 1 << 63 else bits
OUT_NAMES = OUT.names
#: Where each result sits in a row of OUT as a tuple.
_O_POINTS = OUT_NAMES.index("points")
_O_BASE = OUT_NAMES.index("base_points")
_O_RULE = OUT_NAMES.index("rule_points")
_O_BONUS = OUT_NAMES.index("bonus_points")
_O_EVENT = OUT_NAMES.index("event_points")
_O_CAPPED = OUT_NAMES.index("capped")
_O_REFERRER_POINTS = OUT_NAMES.index("referrer_points")
_O_REFERRER = OUT_NAMES.index("referrer")
_O_CREDIT = OUT_NAMES.index("credit")
_O_DISCOUNT = OUT_NAMES.index("discount")
_O_REDEEMED = OUT_NAMES.index("redeemed")
_O_REDEEM_VALUE = OUT_NAMES.index("redeem_value")
_O_RULES = OUT_NAMES.index("rules_fired")
_O_OFFERS = OUT_NAMES.index("offers_fired")
_O_TIER_BEFORE = OUT_NAMES.index("tier_before")
_O_TIER_AFTER = OUT_NAMES.index("tier_after")
_O_STATUS = OUT_NAMES.index("status")
#: What a receipt's repr shows, in order (its facts are left out).
_RECEIPT_SHOWN = ("ref", "member", "at", "amount", "points_earned", "credit_earned", "discount", "points_redeemed",
                  "redeem_value", "tier_before", "tier_after", "offers", "rules", "base_points", "rule_points",
                  "bonus_points", "event_points", "capped", "referrer_points", "committed")
FACT_NAMES = tuple(sorted(VARIABLES, key=lambda k: VARIABLES[k].slot))
CHUNK_ROWS = 200_000
#: Members whose store records are built and written at a time (their bytes are a list while written).
PUT_BATCH = 65_536


class RowStatus(IntEnum):
    """Why a purchase row was not applied (0 = it was)."""

    OK = 0
    REDEEM_BELOW_MIN = 1
    REDEEM_STEP = 2
    REDEEM_INSUFFICIENT = 3
    REDEEM_SHARE = 4
    REDEEM_DISABLED = 5
    OUT_OF_ORDER = 6
    UNKNOWN_MEMBER = 7
    DUPLICATE = 8


_STATUS_TEXT = {
    RowStatus.REDEEM_BELOW_MIN: "fewer points than the program's min_points",
    RowStatus.REDEEM_STEP: "points not a multiple of the program's step",
    RowStatus.REDEEM_INSUFFICIENT: "more points than the member has",
    RowStatus.REDEEM_SHARE: "points worth more than the program's max share of the basket",
    RowStatus.REDEEM_DISABLED: "the program has no burn rate (burn.value = 0)",
    RowStatus.OUT_OF_ORDER: "a purchase dated before the member's last one (purchases go in time order)",
    RowStatus.UNKNOWN_MEMBER: "no such member (enroll them first)",
    RowStatus.DUPLICATE: "this ref was already used",
}


def points_account(member: int) -> int:
    """The ledger account of member number ``member``'s points."""
    return MEMBER_BASE + 2 * member


def credit_account(member: int) -> int:
    """The ledger account of member number ``member``'s store credit."""
    return MEMBER_BASE + 2 * member + 1


@dataclass(frozen=True, slots=True, kw_only=True)
class Item:
    """One line of a basket."""

    #: The product's SKU.
    sku: str = ""
    #: The product's category.
    category: str = ""
    #: What the line costs, in the currency's minor unit.
    amount: int
    #: How many.
    quantity: int = 1


RECEIPT_DTYPE = np.dtype([("member", "<i8"), ("at", "<i8"), ("amount", "<i8"), ("kind", "<i8"),
                          ("refunded", "<i8"), ("points_taken", "<i8"), ("credit_taken", "<i8"),
                          ("shortfall", "<i8"), ("out", OUT), ("facts", "<i8", (N_FACTS,))])


class Receipt:
    """What a purchase gave and took, and why (:meth:`explain`). Read-only.

    Its figures are read from the kernel's result as they are asked for (a checkout that only looks
    at the points pays for no names, times or facts it does not read)."""

    __slots__ = ("_ref", "_member", "_amount", "_at_us", "_o", "_facts", "_program", "_zone", "_committed")

    def __init__(self, ref: str, member: str, amount: int, at_us: int, out: tuple[int, ...],
                 facts: tuple[int, ...], program: Program, zone: Any, committed: bool = True) -> None:
        self._ref, self._member, self._amount, self._at_us = ref, member, amount, at_us
        self._o, self._facts, self._program, self._zone, self._committed = out, facts, program, zone, committed

    ref = property(lambda self: self._ref, doc="The purchase's ref.")
    member = property(lambda self: self._member, doc="The member's name.")
    amount = property(lambda self: self._amount, doc="The basket's amount, in the currency's minor unit.")
    at = property(lambda self: from_micros(self._at_us).astimezone(self._zone),
                  doc="When, in the program's timezone.")
    points_earned = property(lambda self: self._o[_O_POINTS],
                             doc="Points credited to the member (earned plus event bonuses).")
    credit_earned = property(lambda self: self._o[_O_CREDIT], doc="Store credit credited (tier cashback and offers).")
    discount = property(lambda self: self._o[_O_DISCOUNT], doc="Discount on the basket (tier and offers), in money.")
    points_redeemed = property(lambda self: self._o[_O_REDEEMED], doc="Points the member spent on this basket.")
    redeem_value = property(lambda self: self._o[_O_REDEEM_VALUE], doc="What the redeemed points paid for.")
    tier_before = property(lambda self: self._program.tier_name(self._o[_O_TIER_BEFORE]))
    tier_after = property(lambda self: self._program.tier_name(self._o[_O_TIER_AFTER]))
    offers = property(lambda self: tuple(self._program.offers[k].name for k in _bits(self._o[_O_OFFERS])),
                      doc="Names of the offers that fired.")
    rules = property(lambda self: tuple(self._program.rules[k].name for k in _bits(self._o[_O_RULES])),
                     doc="Names of the earn rules that fired.")
    base_points = property(lambda self: self._o[_O_BASE])
    rule_points = property(lambda self: self._o[_O_RULE])
    bonus_points = property(lambda self: self._o[_O_BONUS])
    event_points = property(lambda self: self._o[_O_EVENT])
    capped = property(lambda self: self._o[_O_CAPPED])
    referrer_points = property(lambda self: self._o[_O_REFERRER_POINTS])
    facts = property(lambda self: dict(zip(FACT_NAMES, self._facts, strict=True)),
                     doc="The member's facts just before the purchase (the conditions' inputs).")
    committed = property(lambda self: self._committed, doc="False for a quote.")

    def _key(self) -> tuple[Any, ...]:
        return (self._ref, self._member, self._amount, self._at_us, self._zone, self._o, self._facts,
                self._committed)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Receipt):
            return NotImplemented
        return self._key() == other._key() and self._program.source == other._program.source

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        shown = ", ".join(f"{k}={getattr(self, k)!r}" for k in _RECEIPT_SHOWN)
        return f"Receipt({shown})"

    def explain(self) -> str:
        """Which rules and offers fired, on what inputs, for how much."""
        lines = [f"receipt {self.ref}: {self.member} spent {self.amount:,} at {self.at.isoformat()}"]
        paid = self.amount - self.discount - self.redeem_value
        lines.append(f"  paid {paid:,} (discount {self.discount:,}, points redeemed {self.points_redeemed:,} "
                     f"worth {self.redeem_value:,})")
        lines.append(f"  base rate: {self.base_points:,} points")
        for r in self.rules:
            lines.append(f"  earn rule fired: {r}")
        if self.rule_points:
            lines.append(f"  multipliers (rules, tier {self.tier_before!r}, offers) added {self.rule_points:,} points")
        for o in self.offers:
            lines.append(f"  offer granted: {o}")
        if self.bonus_points:
            lines.append(f"  fixed bonuses: {self.bonus_points:,} points")
        if self.capped:
            lines.append(f"  caps took off {self.capped:,} points")
        if self.event_points:
            lines.append(f"  birthday / anniversary / referral bonus: {self.event_points:,} points")
        if self.referrer_points:
            lines.append(f"  the referrer received {self.referrer_points:,} points")
        lines.append(f"  total: {self.points_earned:,} points, {self.credit_earned:,} credit; "
                     f"tier {self.tier_before or '-'} -> {self.tier_after or '-'}")
        shown = ("amount", "days_since_last", "visits_90d", "avg_basket", "avg_gap_days", "spend_365d",
                 "points_balance", "days_to_birthday")
        lines.append("  inputs: " + ", ".join(f"{k}={self.facts[k]}" for k in shown if k in self.facts))
        return "\n".join(lines)


@dataclass(frozen=True, slots=True, kw_only=True)
class RefundReceipt:
    """What a refund took back."""

    ref: str
    purchase_ref: str
    amount: int
    points_taken: int
    credit_taken: int
    #: Points the member had already spent and the ``cap`` policy did not take (0 under ``allow``).
    shortfall: int
    tier_after: str


@dataclass(frozen=True, slots=True, kw_only=True)
class MemberInfo:
    """A member's balances, tier, window figures and offer usage."""

    member: str
    number: int
    points: int
    credit: int
    tier: str
    enrolled: date
    purchases: int
    figures: dict[str, int]
    offers_used: dict[str, int]


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """A message for the host to deliver (SMS, push, e-mail)."""

    seq: int
    kind: str          #: welcome, points_changed, tier_changed, offer_granted, birthday_soon
    member: str
    at: datetime
    data: dict[str, Any]


def _struct_of(dtype: np.dtype[Any]) -> struct.Struct:
    """A little-endian struct with ``dtype``'s integer fields in order (a dtype without padding)."""
    codes = {"i1": "b", "i2": "h", "i4": "i", "i8": "q", "u1": "B", "u2": "H", "u4": "I", "u8": "Q"}
    fmt = struct.Struct("<" + "".join(codes[dtype.fields[n][0].str[1:]] for n in dtype.names))
    if fmt.size != dtype.itemsize:
        raise TypeError(f"{dtype} has padding or fields a struct cannot hold")
    return fmt


#: The kernel's results (OUT) and facts as structs, to read them without NumPy (tested against NumPy).
_OUT_STRUCT = _struct_of(OUT)
_FACTS_STRUCT = struct.Struct(f"<{N_FACTS}q")
#: A receipt's fields before its results and facts (RECEIPT_DTYPE; a test checks the two agree).
_RECEIPT_HEAD = struct.Struct("<8q")
#: One RECORD_DTYPE record as struct fields (a test checks the two agree).
_RECORD = struct.Struct("<QQQQqQQQqqqQIHH")


_REF_HASH = hashlib.blake2b(digest_size=16, person=b"loyalty-ref")


def _ref_id(ref: str, kind: int) -> tuple[int, int]:
    """The 128-bit transfer id of part ``kind`` of the operation named ``ref`` (lo, hi)."""
    hasher = _REF_HASH.copy()               # (half the cost of a new hash with its parameters)
    hasher.update(ref.encode())
    h = int.from_bytes(hasher.digest(), "little")
    lo = h & 0xFFFF_FFFF_FFFF_FF00 | kind   # (the digest's first 8 bytes, its low byte the part)
    hi = (h >> 64) & 0x7FFF_FFFF_FFFF_FFFF
    return lo or 1, hi


def _checked_ref(ref: Any, what: str = "ref") -> str:
    if not isinstance(ref, str) or not ref or len(ref.encode()) > 400:
        raise ValidationError(f"{what} must be a non-empty string of at most 400 bytes, not {ref!r}")
    return ref


_INTEGERS = (int, np.integer)        # (tuples: an ``int | np.integer`` is built again at each call)
_SEQUENCES = (list, tuple, np.ndarray)


def _checked_whole(v: Any, what: str, noun: str, zero: bool, bits: int) -> int:
    """``v`` as an int in [0 or 1, 2**bits); a ValidationError names ``what`` and the value otherwise."""
    if isinstance(v, bool) or not isinstance(v, _INTEGERS):
        raise ValidationError(f"{what} must be {noun}, not {type(v).__name__} {v!r}")
    v = int(v)
    if v < 0 or (v == 0 and not zero) or v >= 1 << bits:
        raise ValidationError(f"{what} must be {'>= 0' if zero else '> 0'} and below 2**{bits}, not {v}")
    return v


def _checked_amount(v: Any, what: str, zero: bool = False) -> int:
    return _checked_whole(v, what, "an integer in the currency's minor unit", zero, 53)


def _checked_quantity(v: Any, what: str) -> int:
    return _checked_whole(v, what, "a whole number of pieces", True, 31)


class Engine:
    """A customer club: a program, its members and their ledger. Open with :meth:`open`.

    One process owns an engine's directory at a time (the ledger below may be read by others)."""

    def __init__(self, ledger: Ledger, program: Program) -> None:
        self.ledger = ledger
        self._ext = ledger._ext_db()             # (the engine's LMDB database: one handle for the ledger's life)
        self._program = program
        cp = program.compiled
        self._batch_buffers: dict[str, np.ndarray] = {}
        # one purchase's kernel buffers, bound to the kernel once (used under the lock, read out before the
        # next purchase); _bind_one makes them and binds them again when the state's arrays are replaced
        self._one: dict[str, np.ndarray] = {}
        self._onep = _core.OnePurchase()         # (its chain of transfers: docs/rules.md, tested)
        self._onep.set_chain(REDEEMED_POINTS, ISSUE_POINTS, ISSUE_CREDIT, POINTS, CREDIT, Code.REDEEM, Code.EARN,
                             Code.CREDIT, Code.BONUS)
        self._kernel = _core.Kernel(cp.code, cp.pool, cp.conds, cp.rules, cp.offers, cp.tiers, cp.params)
        self._lock = threading.RLock()
        self._names: dict[str, int] = {}
        self._member_names: list[str] = []
        self._members = np.zeros(16, MSTATE)
        self._hist: dict[int, bytes] = {}       # member -> its history events (HEV records, raw bytes)
        self._use_map: np.ndarray | None = None   # stored offer usage column -> this program's offer
        noff = len(program.offers)
        self._offer_use = np.zeros((16, max(noff, 1), 3), np.int64)
        self._budget = np.zeros(max(noff, 1), np.int64)
        self._event_seq = 0
        self._zone = program.zone
        self._offsets: dict[int, int | bool] = {}     # _local_one's: quarter hour of UTC -> the zone's offset
        self._dates: dict[int, tuple[int, int, int]] = {}    # local day -> (weekday, month, day of month)
        self._expiry_cache: dict[tuple[int, int], int] = {}
        self._code_key: Any = None
        self._codes: Any = None
        self._owner: EngineLock | None = None     # the directory's engine lock (Engine.open takes it)

    @property
    def program(self) -> Program:
        """The program this engine runs (fixed for the engine's life: reopen to change it)."""
        return self._program

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, program: Program, sync: str = "full",
             map_size: int | None = None, code_key: bytes | str | os.PathLike[str] | None = None) -> Engine:
        """Open (or create) the club at ``path`` with ``program``. Members, receipts and the outbox live
        in the ledger's LMDB environment beside the journal. ``code_key`` is the master key of product
        codes (bytes, or a key file's path; default: the environment variable
        ``LOYALTY_ENGINE_CODE_KEY``, read when ``engine.codes`` is first used)."""
        if not isinstance(program, Program):
            raise ConfigError(f"program must be a Program (Program.from_toml / from_dict), "
                              f"not {type(program).__name__}")
        # one process, one engine: the lock is taken before the ledger is opened when the directory exists
        # (else right after the ledger created it), and held until close(); a failure releases it
        lock = EngineLock(path) if os.path.isdir(path) else None
        try:
            ledger = Ledger.open(path, sync=sync, map_size=map_size)
            try:
                if lock is None:
                    lock = EngineLock(ledger.path)
                eng = cls(ledger, program)
                eng._code_key = code_key
                eng._setup()
            except BaseException:
                ledger.close()
                raise
        except BaseException:
            if lock is not None:
                lock.release()
            raise
        eng._owner = lock
        return eng

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the ledger and release the engine's directory (its ``engine.lock``)."""
        try:
            self.ledger.close()
        finally:
            if self._owner is not None:
                self._owner.release()

    def _setup(self) -> None:
        flag = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
        self.ledger.create_accounts([
            Account(id=ISSUE_POINTS, asset=POINTS), Account(id=REDEEMED_POINTS, asset=POINTS),
            Account(id=EXPIRED_POINTS, asset=POINTS), Account(id=CLAWBACK_POINTS, asset=POINTS),
            Account(id=ISSUE_CREDIT, asset=CREDIT), Account(id=SPENT_CREDIT, asset=CREDIT),
            Account(id=CLAWBACK_CREDIT, asset=CREDIT)])
        del flag
        db = self.ledger._ext_db()
        names = [o.name for o in self.program.offers]
        with self.ledger._ext_begin() as txn:
            # offer usage is stored per member as int64 columns in the order of the offer names under
            # "O"; a new program version may add, drop or reorder offers (matched by name)
            raw_o = txn.get(b"O", db=db)
            stored = json.loads(bytes(raw_o)) if raw_o is not None else names
            self._use_map = np.array([names.index(x) if x in names else -1 for x in stored], np.int64)
            cur = txn.cursor(db=db)
            if cur.set_range(b"M"):
                for k, (key, value) in enumerate(cur):
                    if not k & 0xFFF:
                        _core.pause_point()
                    if not bytes(key[:1]) == b"M":
                        break
                    self._load_member(int.from_bytes(bytes(key[1:9]), "big"), bytes(value))
            raw = txn.get(b"B", db=db)
            if raw is not None:
                saved = json.loads(bytes(raw))
                for i, o in enumerate(self.program.offers):
                    self._budget[i] = saved.get(o.name, 0)
            raw = txn.get(b"S", db=db)
            if raw is not None:
                self._event_seq = json.loads(bytes(raw))["event_seq"]
            cur = txn.cursor(db=db)
            found = cur.prev() if cur.set_range(b"F") else cur.last()      # the last key before "F"
            if found and bytes(cur.key())[:1] == b"E":
                self._event_seq = max(self._event_seq, int.from_bytes(bytes(cur.key())[1:9], "big"))
        changed = len(self._use_map) != len(names) or bool((self._use_map != np.arange(len(names))).any())
        if changed or raw_o is None:
            # (re)write every member's usage in this program's order, and the names, in one transaction
            def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
                if changed:
                    self._put_members(txn, np.arange(len(self._member_names), dtype=np.int64))
                txn.put(b"O", json.dumps(names).encode(), db=self.ledger._ext_db())

            self._post_with(np.zeros(0, RECORD_DTYPE), extra)
        self._use_map = None

    def _grow(self, n: int) -> None:
        if n <= len(self._members):
            return
        cap = max(n, 2 * len(self._members))
        m = np.zeros(cap, MSTATE)
        m[: len(self._members)] = self._members
        self._members = m
        u = np.zeros((cap, *self._offer_use.shape[1:]), np.int64)
        u[: len(self._offer_use)] = self._offer_use
        self._offer_use = u
        self._onep.release()    # the old arrays are free to go (the next purchase binds the new ones)

    # member record (src/loyalty_engine/_record.pxd): name, state, offer usage (int64 [offer, 3], in the
    # order of the names under key "O"; none when the member never had an offer) and history
    def _member_value(self, idx: int) -> bytes:
        """Member ``idx``'s stored record (``_bulk.member_records``: the compact encoding)."""
        one = np.array([idx], np.int64)
        state, use, used = self._record_rows(one)
        return _bulk.member_records(one, self._member_names, state, use.view(np.uint8), used, self._hist)[0][1]

    def _load_member(self, idx: int, v: bytes) -> None:
        try:
            name, state, use_b, hist = _bulk.member_fields(v, MSTATE.itemsize)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptionError(f"the record of member number {idx} cannot be read: {e}; run "
                                  f"'loyalty-engine verify' on the club's ledger") from e
        self._grow(idx + 1)
        self._members[idx] = np.frombuffer(state, MSTATE)[0]
        if use_b:
            use = np.frombuffer(use_b, np.int64).reshape(-1, 3)
            umap = self._use_map if self._use_map is not None else np.arange(len(use))
            for j in range(min(len(use), len(umap))):
                if umap[j] >= 0:
                    self._offer_use[idx, umap[j]] = use[j]
        if hist:
            self._hist[idx] = hist
        while len(self._member_names) <= idx:
            self._member_names.append("")
        self._member_names[idx] = name
        self._names[name] = idx

    def _put_member(self, txn: lmdb.Transaction, idx: int) -> None:
        txn.put(b"M" + idx.to_bytes(8, "big"), self._member_value(idx), db=self.ledger._ext_db())

    def _record_rows(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The rows of the members ``idx`` that their records hold: state (MSTATE bytes), offer usage
        (int64, in this program's order) and whether any usage is stored (uint8)."""
        noff = len(self.program.offers)
        state = self._members.view(np.uint8).reshape(-1, MSTATE.itemsize)[idx]
        use = np.ascontiguousarray(self._offer_use[idx, :noff]).reshape(len(idx), noff * 3)
        used = use.any(axis=1).view(np.uint8) if noff else np.zeros(len(idx), np.uint8)
        return state, use, used

    def _put_members(self, txn: lmdb.Transaction, idx: Any) -> None:
        """Store many members' records at once (the same bytes as :meth:`_member_value`), in key order."""
        if isinstance(idx, list) and len(idx) <= 2:      # one purchase: the member (and a referrer)
            for i in sorted({int(i) for i in idx if i >= 0}):
                self._put_member(txn, i)
            return
        idx = np.asarray(idx, np.int64)
        idx = _distinct(idx[idx >= 0], len(self._member_names))
        if len(idx) == 0:
            return
        cur = txn.cursor(db=self.ledger._ext_db())
        for start in range(0, len(idx), PUT_BATCH):     # the pairs of one part at a time: bounded memory
            part = idx[start: start + PUT_BATCH]
            state, use, used = self._record_rows(part)
            cur.putmulti(_bulk.member_records(part, self._member_names, state, use.view(np.uint8), used,
                                              self._hist))

    def _members_frozen(self, idx: np.ndarray) -> tuple[Any, ...]:
        """What :meth:`_put_members` would store for ``idx`` (int64) and :meth:`_put_budget` for the
        budget, copied now, for :meth:`_put_frozen` to store later while memory moves on (a bulk import
        commits one chunk in another thread while it evaluates the next). The names are not copied:
        they are only appended to while the engine's lock is held, and a member's name never changes."""
        idx = idx[idx >= 0]
        idx = _distinct(idx, len(self._member_names))
        state, use, used = self._record_rows(idx)
        hist = _bulk.take_values(self._hist, idx)      # (bytes: the chunks after this one replace them)
        return idx, state, use, used, hist, self._budget_value()

    def _put_frozen(self, txn: lmdb.Transaction, frozen: tuple[Any, ...]) -> None:
        """Store what :meth:`_members_frozen` copied (the same bytes as :meth:`_put_members` and
        :meth:`_put_budget` then), in key order; reads no other state of the engine but the names."""
        idx, state, use, used, hist, budget = frozen
        db = self.ledger._ext_db()
        cur = txn.cursor(db=db)
        for start in range(0, len(idx), PUT_BATCH):     # the pairs of one part at a time: bounded memory
            end = start + PUT_BATCH
            cur.putmulti(_bulk.member_records(idx[start: end], self._member_names, state[start: end],
                                              use[start: end].view(np.uint8), used[start: end], hist))
        if budget is not None:
            txn.put(b"B", budget, db=db)

    def _post_with(self, recs: np.ndarray, extra: Any) -> Any:
        """:meth:`Ledger._post_with`, with the outbox numbered exactly: an attempt that does not commit
        (a retry after the map grew, or a failure) gives back the event numbers it took."""
        return self._numbered(self.ledger._post_with, recs, extra)

    def _entries_with(self, entries: Any, extra: Any) -> Any:
        """:meth:`Ledger._entries_with`, numbered as :meth:`_post_with`."""
        return self._numbered(self.ledger._entries_with, entries, extra)

    def _numbered(self, write: Any, arg: Any, extra: Any) -> Any:
        seq0 = self._event_seq
        commits = self.ledger.commits

        def attempt(txn: lmdb.Transaction, results: Any) -> Any:
            nonlocal commits
            commits = self.ledger.commits       # (under the ledger's lock: no other commit comes in between)
            self._event_seq = seq0
            return extra(txn, results)

        try:
            return write(arg, attempt)
        except BaseException:
            if self.ledger.commits == commits:      # nothing committed: the numbers are free again
                self._event_seq = seq0
            raise

    def _put_event(self, txn: lmdb.Transaction, kind: str, member: str, at_us: int, **data: Any) -> None:
        self._event_seq += 1
        body = _event_json(kind, member, at_us, data)
        # the sequence is the last event's key; "S" keeps it only when ack deletes events (one B-tree
        # page fewer for every durable commit that records an event)
        txn.put(b"E" + self._event_seq.to_bytes(8, "big"), body, db=self.ledger._ext_db())

    def _budget_value(self) -> bytes | None:
        """The stored form of the offers' budgets spent (None when the program has no offers)."""
        if not len(self.program.offers):
            return None
        return json.dumps({o.name: int(self._budget[i]) for i, o in enumerate(self.program.offers)}).encode()

    def _put_budget(self, txn: lmdb.Transaction) -> None:
        value = self._budget_value()
        if value is not None:
            txn.put(b"B", value, db=self.ledger._ext_db())

    # -- time --------------------------------------------------------------------------------------------
    def _local_fields(self, at_us: np.ndarray) -> dict[str, np.ndarray]:
        """Day number, hour, weekday (Mon = 0), month and day of month in the program's timezone."""
        arr = pa.array(at_us, type=pa.timestamp("us", tz=self.program.timezone))
        local = pc.local_timestamp(arr).cast(pa.int64()).to_numpy(zero_copy_only=False)
        day = np.floor_divide(local, DAY_US)
        hour = np.floor_divide(local, 3_600_000_000) % 24
        dates = day.astype("datetime64[D]")
        months = dates.astype("datetime64[M]")
        month = months.astype(np.int64) % 12 + 1
        dom = (dates - months.astype("datetime64[D]")).astype(np.int64) + 1
        return {"day": day, "hour": hour, "weekday": (day + 3) % 7, "month": month, "dom": dom}

    def _local_one(self, at_us: int) -> tuple[int, int, int, int, int]:
        """(day, hour, weekday, month, day of month) of one time, in the program's timezone: the same
        answer as :meth:`_local_fields` (a test checks it across DST changes) without an Arrow call. The
        zone's offset is looked up once per quarter hour of UTC (when it is the same at both ends of the
        quarter; a quarter with a change in it is read with zoneinfo every time) and dates once per day."""
        q = at_us // _QUARTER_US
        off = self._offsets.get(q)
        if off is None:
            if len(self._offsets) > 50_000:
                self._offsets.clear()
            off = self._offsets[q] = self._quarter_offset(q)
        if off is False:
            utc = datetime.fromtimestamp(at_us // 1_000_000, UTC_TZ).replace(microsecond=at_us % 1_000_000)
            local = utc.astimezone(self._zone)
            return local.toordinal() - EPOCH_ORDINAL, local.hour, local.weekday(), local.month, local.day
        local_us = at_us + off
        day = local_us // DAY_US
        cal = self._dates.get(day)
        if cal is None:
            if len(self._dates) > 50_000:
                self._dates.clear()
            d = date.fromordinal(day + EPOCH_ORDINAL)
            cal = self._dates[day] = (d.weekday(), d.month, d.day)
        return day, local_us // 3_600_000_000 % 24, cal[0], cal[1], cal[2]

    def _quarter_offset(self, q: int) -> int | bool:
        """The zone's UTC offset in microseconds over the quarter hour ``q`` of UTC, or False when it
        differs at the two ends (the quarter holds a change; zones change at most twice a year)."""
        ends = []
        for us in (q * _QUARTER_US, (q + 1) * _QUARTER_US - 1):
            utc = datetime.fromtimestamp(us // 1_000_000, UTC_TZ).replace(microsecond=us % 1_000_000)
            off = utc.astimezone(self._zone).utcoffset()
            ends.append(None if off is None else off // timedelta(microseconds=1))
        return ends[0] if ends[0] is not None and ends[0] == ends[1] else False

    def _day_of(self, at_us: int) -> int:
        return self._local_one(at_us)[0]

    def _expiry_one(self, at_us: int, day: int) -> int:
        """:meth:`_expiry` of one earning (without arrays for the kinds that need no calendar)."""
        p = self.program
        if p.expiry == "never":
            return 0
        if p.expiry == "days":
            return at_us + p.expiry_days * DAY_US
        return int(self._expiry(np.array([at_us], np.int64), np.array([day], np.int64))[0])

    def _expiry(self, at_us: np.ndarray, day: np.ndarray) -> np.ndarray:
        """When points earned at ``at_us`` expire (0 = never)."""
        p = self.program
        if p.expiry == "never":
            return np.zeros(len(at_us), np.int64)
        if p.expiry == "days":
            return at_us + p.expiry_days * DAY_US
        out = np.empty(len(at_us), np.int64)
        dates = day.astype("datetime64[D]")
        unit = "M" if p.expiry == "end_of_month" else "Y"
        periods = dates.astype(f"datetime64[{unit}]").astype(np.int64)
        for v in np.unique(periods):
            key = (int(v), 0 if unit == "M" else 1)
            if key not in self._expiry_cache:
                nxt = (np.datetime64(int(v) + 1, unit).astype("datetime64[D]").astype(object))
                local = datetime(nxt.year, nxt.month, nxt.day, tzinfo=self._zone)
                self._expiry_cache[key] = to_micros(local)
            out[periods == v] = self._expiry_cache[key]
        return out

    # -- members ----------------------------------------------------------------------------------------
    def _idx(self, member: str) -> int:
        if not isinstance(member, str):
            raise ValidationError(f"a member is named by a string, not {type(member).__name__} {member!r}")
        idx = self._names.get(member)
        if idx is None:
            raise NotFoundError(f"no member {member!r}; enroll them first (engine.enroll)")
        return idx

    def enroll(self, member: str, *, at: datetime | int, birth_date: date | None = None,
               referred_by: str | None = None) -> MemberInfo:
        """Make ``member`` a member (idempotent: enrolling again changes nothing). The sign-up bonus and
        the welcome event commit with the enrolment."""
        if not isinstance(member, str) or not member or len(member.encode()) > 200:
            raise ValidationError(f"a member name is a non-empty string of at most 200 bytes, not {member!r}")
        at_us = to_micros(at, "at")
        if birth_date is not None and not isinstance(birth_date, date):
            raise ValidationError(f"birth_date must be a datetime.date, not {birth_date!r}")
        with self._lock:
            if member in self._names:
                return self.member(member)
            referrer = -1
            if referred_by is not None:
                referrer = self._idx(referred_by)
            idx = len(self._member_names)
            flags = 0 if self.program.negative_balance == "allow" else AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
            res = self.ledger.create_accounts([Account(id=points_account(idx), asset=POINTS, flags=flags),
                                               Account(id=credit_account(idx), asset=CREDIT,
                                                       flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)])
            if any(int(r) not in _ACCOUNT_READY for r in res):  # OK or EXISTS (a crash between two writes)
                raise StorageError(f"cannot create the ledger accounts of member {member!r}: {res}")
            self._grow(idx + 1)
            day = self._day_of(at_us)
            st = self._members[idx]
            st["enroll_day"] = day
            st["last_day"] = -1
            st["tier"] = 1 if self.program.tiers else 0
            st["review_day"] = int(_core.calendar_check(np.array([day], np.int64))[0][
                {"month": 3, "quarter": 4, "year": 5}.get(self.program.tier_review, 5)])
            st["referrer"] = referrer
            st["referred"] = referrer >= 0
            st["birth_md"] = birth_date.month * 100 + birth_date.day if birth_date else 0
            st["earn_day"] = -1
            self._member_names.append(member)
            self._names[member] = idx
            bonus = self.program.signup_bonus
            recs = self._transfers([(ISSUE_POINTS, points_account(idx), bonus, POINTS, Code.BONUS)],
                                   f"enroll:{member}", at_us, self._expiry(np.array([at_us]), np.array([day]))[0])

            def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
                _raise_on(results, f"enrolling {member!r}")
                self._members[idx]["points"] = bonus    # (not +=: a retry after the map grew runs this again)
                self._put_member(txn, idx)
                txn.put(b"N" + member.encode(), idx.to_bytes(8, "big"), db=self.ledger._ext_db())
                self._put_event(txn, "welcome", member, at_us, points=bonus)
                if bonus:
                    self._put_event(txn, "points_changed", member, at_us, delta=bonus, reason="signup")

            try:
                self._post_with(recs, extra)
            except BaseException:
                self._member_names.pop()
                del self._names[member]
                self._members[idx] = np.zeros(1, MSTATE)[0]
                raise
            return self.member(member)

    def enroll_batch(self, members: Sequence[str], *, at: Any, events: bool = True) -> int:
        """Enroll many members at once (an import): ``at`` is one time or one per member (an int64
        array of microseconds UTC is taken as it is). Members already enrolled are skipped; returns how
        many were new. Sign-up bonuses and (unless ``events=False``) welcome events commit with them, in
        one transaction."""
        names = list(members)
        if isinstance(at, np.ndarray) and at.dtype == np.int64:
            ats = at.tolist()
        elif isinstance(at, _SEQUENCES):
            ats = [to_micros(a, f"at[{i}]") for i, a in enumerate(at)]
        else:
            ats = [to_micros(at, "at")] * len(names)
        if len(ats) != len(names):
            raise ValidationError(f"enroll_batch: {len(names)} members but {len(ats)} times")
        for i, m in enumerate(names):
            if not i & 0xFFF:
                _core.pause_point()
            if not isinstance(m, str) or not m or len(m.encode()) > 200:
                raise ValidationError(f"enroll_batch: members[{i}] must be a non-empty string of at most 200 "
                                      f"bytes, not {m!r}")
        with self._lock:
            new: dict[str, int] = {}
            for i, (m, a) in enumerate(zip(names, ats, strict=True)):
                if not i & 0xFFF:
                    _core.pause_point()
                if m not in self._names and m not in new:
                    new[m] = a
            if not new:
                return 0
            self._enroll_new(list(new), np.fromiter(new.values(), np.int64, len(new)), events=events)
            return len(new)

    def _enroll_new(self, names_new: list[str], at_arr: np.ndarray, *, events: bool) -> int:
        """Enroll members that are valid, distinct and not members yet (the caller checked: enroll_batch),
        joining at ``at_arr`` (µs UTC, int64): their accounts, sign-up bonuses, records and (with
        ``events``) welcome events in one transaction; returns the first one's index (the others follow
        in order)."""
        with self._lock:
            first, entries = self._enroll_prepare(names_new, at_arr)
            n = len(names_new)
            bonus = self.program.signup_bonus
            def extra(txn: lmdb.Transaction, results: list[np.ndarray]) -> None:
                self._enroll_check(results)
                self._put_members(txn, np.arange(first, first + n, dtype=np.int64))
                self._put_names(txn, first, names_new)
                if events:
                    for k, m in enumerate(names_new):
                        if not k & 0xFFF:
                            _core.pause_point()
                        self._put_event(txn, "welcome", m, int(at_arr[k]), points=bonus)

            try:
                self._entries_with(entries, extra)
            except BaseException:
                self._enroll_undo(first)
                raise
            return first

    def _enroll_prepare(self, names_new: list[str], at_arr: np.ndarray) -> tuple[int, list[tuple[int, np.ndarray]]]:
        """The in-memory half of enrolling new members (see :meth:`_enroll_new`): their names, indices
        and state (with the sign-up bonus in their points), and the ledger entries that must commit with
        their records: their points accounts, their credit accounts, their bonuses. Returns the first
        index and the entries; :meth:`_enroll_undo` takes it back if the commit fails."""
        n = len(names_new)
        first = len(self._member_names)
        idx = np.arange(first, first + n, dtype=np.int64)
        flags = 0 if self.program.negative_balance == "allow" else AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
        entries = [(KIND_ACCOUNTS, _account_records(points_account(idx), asset=POINTS, flags=flags)),
                   (KIND_ACCOUNTS, _account_records(credit_account(idx), asset=CREDIT,
                                                    flags=AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS))]
        day = self._local_fields(at_arr)["day"]
        bonus = self.program.signup_bonus
        recs = np.zeros(n if bonus else 0, RECORD_DTYPE)
        if bonus:
            ids = np.array([_ref_id(f"enroll:{m}", 1) for m in names_new], np.uint64).reshape(-1, 2)
            recs["id_lo"], recs["id_hi"] = ids[:, 0], ids[:, 1]
            recs["debit"], recs["credit"], recs["amount"] = ISSUE_POINTS, points_account(idx), bonus
            recs["asset"], recs["code"], recs["at"] = POINTS, Code.BONUS, at_arr
            recs["expires_at"] = self._expiry(at_arr, day)
        entries.append((KIND_TRANSFERS, recs))
        self._grow(first + n)
        st = self._members[first: first + n]
        st[:] = np.zeros(1, MSTATE)
        st["enroll_day"] = day
        st["last_day"] = -1
        st["tier"] = 1 if self.program.tiers else 0
        col = {"month": 3, "quarter": 4, "year": 5}.get(self.program.tier_review, 5)
        st["review_day"] = _core.calendar_check(day.astype(np.int64))[:, col]
        st["referrer"] = -1
        st["earn_day"] = -1
        st["points"] = bonus
        self._offer_use[first: first + n] = 0
        self._member_names.extend(names_new)
        self._names.update(zip(names_new, range(first, first + n), strict=True))
        return first, entries

    def _enroll_check(self, results: list[np.ndarray]) -> None:
        """Raise unless the ledger created (or already had) the accounts and posted the bonuses of
        :meth:`_enroll_prepare`'s entries (the first three of ``results``)."""
        if not np.isin(np.concatenate(results[:2]), list(_ACCOUNT_READY)).all():
            raise StorageError("enroll_batch: the ledger refused to create member accounts")
        _raise_on(results[2], "enroll_batch")

    def _enroll_undo(self, first: int) -> None:
        """Forget the members from index ``first`` on (an enrolment whose transaction did not commit)."""
        for m in self._member_names[first:]:
            self._names.pop(m, None)
        n = len(self._member_names) - first
        del self._member_names[first:]
        self._members[first: first + n] = np.zeros(n, MSTATE)
        self._offer_use[first: first + n] = 0
        self._hist_drop(first)

    def _hist_drop(self, first: int) -> None:
        for k in [k for k in self._hist if k >= first]:
            del self._hist[k]

    def _put_names(self, txn: lmdb.Transaction, first: int, names: list[str]) -> None:
        """The name index (``b"N"`` + name -> index) of the members ``first``, ``first + 1``, ..."""
        cur = txn.cursor(db=self.ledger._ext_db())
        for start in range(0, len(names), PUT_BATCH):
            cur.putmulti(_bulk.name_records(names[start: start + PUT_BATCH], first + start))

    def _transfers(self, parts: list[tuple[int, int, int, int, int]], ref: str, at_us: int,
                   expires: int = 0) -> np.ndarray:
        """One linked chain of transfers (debit, credit, amount, asset, code) named after ``ref``;
        zero amounts are left out. (The records are packed as bytes: a third of the cost of an array
        built from tuples.)"""
        parts = [p for p in parts if p[2] > 0]
        last = len(parts) - 1
        lo, hi = _ref_id(ref, 0)
        lo &= ~0xFF
        pack = _RECORD.pack
        return np.frombuffer(b"".join([
            pack(lo | (i + 1), hi, debit, credit, amount, 0, 0, 0, at_us,
                 expires if (asset == POINTS and debit == ISSUE_POINTS) else 0, 0, 0, asset, code,
                 TransferFlags.LINKED if i < last else 0)
            for i, (debit, credit, amount, asset, code) in enumerate(parts)]), RECORD_DTYPE)

    # -- purchases ---------------------------------------------------------------------------------------
    def purchase(self, member: str, *, amount: int, at: datetime | int, ref: str,
                 items: Sequence[Item] = (), branch: str = "", channel: str = "",
                 redeem_points: int = 0) -> Receipt:
        """Evaluate and commit one purchase; a retry with the same ``ref`` returns the first receipt."""
        return self._purchase(member, amount, at, ref, items, branch, channel, redeem_points, commit=True)

    def quote(self, member: str, *, amount: int, at: datetime | int, ref: str = "quote",
              items: Sequence[Item] = (), branch: str = "", channel: str = "", redeem_points: int = 0) -> Receipt:
        """The receipt :meth:`purchase` would give, with nothing committed."""
        return self._purchase(member, amount, at, ref, items, branch, channel, redeem_points, commit=False)

    def _row(self, idx: int, amount: int, at_us: int, items: Sequence[Item], branch: str, channel: str,
             redeem: int) -> tuple[tuple[int, ...], list[int], list[int], list[int]]:
        """One purchase as the kernel's row (a tuple of ROW's fields) and its items' categories, SKUs and
        amounts."""
        sym = self.program.symbols.tables
        n = len(items)
        cats = skus = 0
        if n:
            cat_t, sku_t = sym["category"], sym["sku"]
            cl, sl, al = [0] * n, [0] * n, [0] * n
            qty = 0
            for j, it in enumerate(items):
                if not isinstance(it, Item):
                    raise ValidationError(f"items[{j}] must be an Item, not {type(it).__name__}")
                al[j] = _checked_amount(it.amount, f"items[{j}].amount", zero=True)
                cl[j] = c = cat_t.get(it.category, 0)
                sl[j] = k = sku_t.get(it.sku, 0)
                cats |= 1 << c
                skus |= 1 << k
                qty += _checked_quantity(it.quantity, f"items[{j}].quantity")
        else:
            qty = 1
            cl = sl = al = []
        day, hour, weekday, month, dom = self._local_one(at_us)
        row = (idx, amount, qty, redeem, _as_i64(cats), _as_i64(skus), day, hour, weekday, month, dom,
               sym["branch"].get(branch, 0), sym["channel"].get(channel, 0), 0, n, 0)
        return row, cl, sl, al

    def _bind_one(self, events: int, items: int) -> dict[str, np.ndarray]:
        """(Re)make one purchase's kernel buffers, with room for ``events`` history events and ``items``
        items, and bind them with the state's arrays to the kernel (through ``self._onep``)."""
        one = self._one
        fresh = not one
        ev = max(events + 1, 64 if fresh else 2 * len(one["hist"]))
        it = max(items, 16 if fresh else 2 * len(one["amt"]))
        if fresh or len(one["hist"]) < events + 1:
            one["hist"], one["out_hist"] = np.zeros(ev, HEV), np.zeros(ev, HEV)
        if fresh or len(one["amt"]) < items:
            one["cat"], one["sku"], one["amt"] = np.zeros(it, np.int32), np.zeros(it, np.int32), np.zeros(it, np.int64)
        if fresh:
            one["rows"], one["out"] = np.zeros(1, ROW), np.zeros(1, OUT)
            one["hist_off"], one["out_off"] = np.zeros(2, np.int64), np.zeros(2, np.int64)
            one["facts"] = np.zeros((1, N_FACTS), np.int64)
        self._onep.bind(self._kernel, one["rows"], one["cat"], one["sku"], one["amt"], self._members,
                        one["hist_off"], one["hist"], one["out_off"], one["out_hist"], self._offer_use, self._budget,
                        one["out"], one["facts"], len(self.program.offers))
        return one

    def _evaluate_one(self, idx: int, row: tuple[int, ...], cat: list[int], sku: list[int], amt: list[int],
                      points: int, credit: int) -> int:
        """Run the kernel over one purchase row of member ``idx`` with these balances (``self._onep``
        keeps what it changed, to restore, and holds the results); returns the row's status. The buffers
        are bound once (an array acquired per call costs more than the row's evaluation)."""
        h = self._hist.get(idx, b"")
        items = len(amt)
        one, bound = self._one, self._onep.bound
        if (bound is None or bound[4] is not self._members or bound[9] is not self._offer_use
                or bound[10] is not self._budget or len(one["hist"]) * HEV.itemsize <= len(h)
                or len(one["amt"]) < items):
            one = self._bind_one(len(h) // HEV.itemsize, items)
        if items:
            one["cat"][:items], one["sku"][:items], one["amt"][:items] = cat, sku, amt
        return self._onep.evaluate(row, items, h, points, credit)

    def _one_results(self) -> tuple[tuple[int, ...], tuple[int, ...], bytes]:
        """The evaluated row's results and facts as plain ints, and their bytes (a receipt's after its
        head)."""
        raw = self._onep.results()
        return _OUT_STRUCT.unpack_from(raw), _FACTS_STRUCT.unpack_from(raw, OUT.itemsize), raw

    def _evaluate(self, rows: np.ndarray, cat: np.ndarray, sku: np.ndarray, amt: np.ndarray,
                  reuse: bool = False) -> np.ndarray:
        """Run the kernel over a batch of rows in time order (one purchase: :meth:`_evaluate_one`);
        updates the members' state and histories. With ``reuse`` the results live in the engine's batch
        buffer (valid until the next such call: the import's chunks reuse their memory instead of
        faulting in fresh pages every chunk)."""
        seg_members, seg_of = _small_unique(rows["member"], len(self._member_names))
        isz = HEV.itemsize
        hist_off = np.zeros(len(seg_members) + 1, np.int64)
        hist = np.frombuffer(_bulk.gather_bytes(self._hist, seg_members, hist_off), HEV)
        hist_off //= isz
        if reuse:       # (the kernel writes every row of out and every event it keeps before reading it)
            out_hist = self._batch_buffer("out_hist", len(hist) + len(rows), HEV)
            out = self._batch_buffer("out", len(rows), OUT)
        else:
            out_hist = np.zeros(len(hist) + len(rows), HEV)
            out = np.zeros(len(rows), OUT)
        out_off = np.zeros(len(hist_off), np.int64)
        self._kernel.run(rows, seg_of, cat, sku, amt, self._members, hist_off, hist, out_off,
                         out_hist, self._offer_use, self._budget, out, _NO_FACTS)
        _bulk.scatter_bytes(self._hist, seg_members, out_off * isz, out_hist.view(np.uint8))
        return out

    def _batch_buffer(self, name: str, n: int, dtype: np.dtype[Any], zero: bool = False) -> np.ndarray:
        """``n`` items of the engine's reusable batch buffer ``name`` (grown by a quarter when short)."""
        buf = self._batch_buffers.get(name)
        if buf is None or len(buf) < n or buf.dtype != dtype:
            buf = self._batch_buffers[name] = _memory.empty(max(n, int(1.25 * len(buf)) if buf is not None else n),
                                                            dtype)
        view = buf[:n]
        if zero:
            view.fill(0) if dtype.names is None else view.view(np.uint8).fill(0)
        return view

    def _purchase(self, member: str, amount: int, at: Any, ref: str, items: Sequence[Item], branch: str,
                  channel: str, redeem: int, commit: bool) -> Receipt:
        ref = _checked_ref(ref)
        amount = _checked_amount(amount, "amount")
        redeem = _checked_amount(redeem, "redeem_points", zero=True)
        at_us = to_micros(at, "at")
        for name, v in (("branch", branch), ("channel", channel)):
            if not isinstance(v, str):
                raise ValidationError(f"{name} must be a string, not {v!r}")
        with self._lock:
            idx = self._idx(member)
            row, cat, sku, amt = self._row(idx, amount, at_us, items, branch, channel, redeem)
            if commit:
                return self._commit_purchase(member, idx, ref, amount, at_us, redeem, row, cat, sku, amt)
            points = self.ledger.balance(points_account(idx)).available
            credit = self.ledger.balance(credit_account(idx)).available
            try:
                self._refuse(member, ref, amount, redeem,
                             self._evaluate_one(idx, row, cat, sku, amt, points, credit))
                o, facts, _ = self._one_results()
            finally:
                self._onep.restore()            # (a quote keeps no history either)
            return Receipt(ref, self._member_names[idx], amount, at_us, o, facts, self.program, self._zone,
                           committed=False)

    def _refuse(self, member: str, ref: str, amount: int, redeem: int, status: int) -> None:
        """Raise what a purchase row's kernel status (not 0) means."""
        if status:
            raise (InsufficientBalanceError if status == RowStatus.REDEEM_INSUFFICIENT else ValidationError)(
                f"purchase {ref!r} of {member!r} refused: {_STATUS_TEXT[RowStatus(status)]} "
                f"(redeem_points={redeem}, amount={amount})")

    def _commit_purchase(self, member: str, idx: int, ref: str, amount: int, at_us: int, redeem: int,
                         row: tuple[int, ...], cat: list[int], sku: list[int], amt: list[int]) -> Receipt:
        """Evaluate and commit one purchase in one write transaction: the retry check (its receipt), the
        member's balances from the ledger's state as of this transaction, the kernel, the transfers, the
        receipt, the member's record and the outbox. A refused row or a retry commits nothing."""
        ledger = self.ledger
        db = self._ext
        rkey = b"R" + ref.encode()
        seq0, commits = self._event_seq, ledger.commits
        hist, one = self._hist, self._onep
        kept: list[Any] = []                    # the member's history before the purchase, while evaluated

        def undo() -> None:
            one.restore()
            h = kept.pop()
            if h is None:
                hist.pop(idx, None)
            else:
                hist[idx] = h

        def fn(txn: lmdb.Transaction) -> Any:
            nonlocal commits
            commits = ledger.commits            # (under the ledger's lock: no other commit comes in between)
            self._event_seq = seq0
            if kept:                            # tried again (the map grew): from the state before the try
                undo()
            raw = txn.get(rkey, db=db)
            if raw is not None:                 # a retry: the first receipt
                return np.frombuffer(bytes(raw), RECEIPT_DTYPE)[0].copy()
            state = ledger._state
            pts, cr = state.balance(points_account(idx)), state.balance(credit_account(idx))
            if pts is None or cr is None:
                raise StorageError(f"member {member!r} (number {idx}) has no ledger accounts")
            kept.append(hist.get(idx))
            status = self._evaluate_one(idx, row, cat, sku, amt, pts[4], cr[4])
            if status:
                undo()
                return status
            h = hist[idx] = one.new_history()
            o, facts, raw_out = self._one_results()
            lo, hi = _ref_id(ref, 0)
            recs = np.frombuffer(one.transfers(lo & ~0xFF, hi, at_us, self._expiry_one(at_us, row[6]),
                                               points_account(idx), credit_account(idx),
                                               points_account(o[_O_REFERRER]) if o[_O_REFERRER_POINTS] else 0),
                                 RECORD_DTYPE)
            results = ledger._post_in(txn, recs)
            if results.tobytes().count(0) != len(results):
                _raise_on(results, f"purchase {ref!r}")
            txn.put(rkey, _RECEIPT_HEAD.pack(idx, at_us, amount, 0, 0, 0, 0, 0) + raw_out, db=db)
            name = self._member_names[idx]
            self._row_events(txn, ref, name, at_us, o)
            txn.put(b"M" + idx.to_bytes(8, "big"), one.member_record(idx, name.encode(), h), db=db)
            referrer = one.referrer(idx)
            if 0 <= referrer != idx:
                self._put_member(txn, referrer)
            if one.budget_changed():            # (the stored budgets are the ones before the purchase)
                self._put_budget(txn)
            return o, facts

        try:
            got = ledger._write(fn, 4)
        except BaseException:
            if ledger.commits == commits:       # nothing committed: memory and the outbox's numbers go back
                if kept:
                    undo()
                self._event_seq = seq0
            raise
        one.forget()                            # committed (or nothing to commit): nothing is to be restored
        if type(got) is int:
            self._refuse(member, ref, amount, redeem, got)
        if type(got) is not tuple:              # the receipt of an earlier call with this ref
            if int(got["kind"]) != 0:
                raise ValidationError(f"ref {ref!r} was already used for a refund, a redemption or a survey bonus, "
                                      f"not a purchase")
            if got["member"] != idx or got["amount"] != amount:
                raise ValidationError(f"ref {ref!r} was already used for another purchase "
                                      f"({self._member_names[int(got['member'])]}, amount {int(got['amount'])})")
            return self._receipt_obj(ref, got)
        return Receipt(ref, self._member_names[idx], amount, at_us, got[0], got[1], self.program, self._zone)

    def _save(self, idx: int, referrer: int) -> tuple[Any, ...]:
        """What one purchase may change (the member's, and a referrer's, state and history; the budgets),
        as bytes to restore: a byte copy of a row costs a tenth of a structured copy."""
        m, use, hist = self._members, self._offer_use, self._hist
        rows = ((idx, m[idx: idx + 1].tobytes(), use[idx].tobytes(), hist.get(idx)),)
        if 0 <= referrer != idx:
            rows += ((referrer, m[referrer: referrer + 1].tobytes(), use[referrer].tobytes(), hist.get(referrer)),)
        return rows, self._budget.tobytes()

    def _restore(self, saved: tuple[Any, ...]) -> None:
        rows, budget = saved
        for k, m, use, h in rows:
            self._members[k: k + 1] = np.frombuffer(m, self._members.dtype)
            self._offer_use[k] = np.frombuffer(use, self._offer_use.dtype).reshape(self._offer_use.shape[1:])
            if h is None:
                self._hist.pop(k, None)
            else:
                self._hist[k] = h
        self._budget[:] = np.frombuffer(budget, self._budget.dtype)

    def _commit_rows(self, txn: lmdb.Transaction, refs: Sequence[str], recs: np.ndarray,
                     touched: Sequence[int], events: bool = True) -> None:
        """Store receipts, members and events of committed purchase rows (inside the ledger's txn)."""
        db = self.ledger._ext_db()
        put = txn.put
        for k, (ref, rec) in enumerate(zip(refs, recs, strict=True)):
            if not k & 0xFFF:
                _core.pause_point()
            put(b"R" + ref.encode(), rec.tobytes(), db=db)
            if events:
                self._row_events(txn, ref, self._member_names[int(rec["member"])], int(rec["at"]), rec["out"].item())
        self._put_members(txn, list(touched))
        self._put_budget(txn)

    def _row_events(self, txn: lmdb.Transaction, ref: str, name: str, at: int, o: tuple[int, ...]) -> None:
        """The outbox events of one committed purchase row (its results ``o``, OUT's fields as a tuple)."""
        delta = o[_O_POINTS] - o[_O_REDEEMED]
        if delta:           # (nearly every purchase: its JSON written straight; the same bytes, tested)
            self._event_seq += 1
            txn.put(b"E" + self._event_seq.to_bytes(8, "big"),
                    f'{{"kind": "points_changed", "member": {_json_str(name)}, "at": {at}, "data": {{"delta": '
                    f'{delta}, "reason": "purchase", "ref": {_json_str(ref)}}}}}'.encode(), db=self._ext)
        if o[_O_TIER_AFTER] != o[_O_TIER_BEFORE]:
            self._put_event(txn, "tier_changed", name, at, before=self.program.tier_name(o[_O_TIER_BEFORE]),
                            after=self.program.tier_name(o[_O_TIER_AFTER]), ref=ref)
        if o[_O_OFFERS]:
            for k in _bits(o[_O_OFFERS]):
                self._put_event(txn, "offer_granted", name, at, offer=self.program.offers[k].name, ref=ref)
        if o[_O_REFERRER_POINTS]:
            self._put_event(txn, "points_changed", self._member_names[o[_O_REFERRER]], at,
                            delta=o[_O_REFERRER_POINTS], reason="referral", ref=ref)

    def _receipt(self, ref: str) -> np.void | None:
        with self.ledger._ext_begin() as txn:
            raw = txn.get(b"R" + ref.encode(), db=self.ledger._ext_db())
            if raw is None:
                return None
            return np.frombuffer(bytes(raw), RECEIPT_DTYPE)[0].copy()

    def _receipt_obj(self, ref: str, rec: Any, committed: bool = True, out: tuple[int, ...] | None = None,
                     facts: tuple[int, ...] | None = None) -> Receipt:
        """The receipt of stored (or just evaluated) record ``rec``; ``out`` and ``facts`` may give its
        results and facts as plain ints (else they are read from ``rec``)."""
        return Receipt(ref, self._member_names[int(rec["member"])], int(rec["amount"]), int(rec["at"]),
                       out if out is not None else rec["out"].item(),
                       facts if facts is not None else tuple(rec["facts"].tolist()), self.program, self._zone,
                       committed)

    def receipt(self, ref: str) -> Receipt:
        """The receipt of the purchase committed as ``ref``."""
        rec = self._receipt(_checked_ref(ref))
        if rec is None or int(rec["kind"]) != 0:
            raise NotFoundError(f"no purchase with ref {ref!r}")
        return self._receipt_obj(ref, rec)

    # -- batches --------------------------------------------------------------------------------------
    def purchase_batch(self, table: Any, *, events: bool = True) -> pa.Table:
        """Evaluate and commit many purchases (a pyarrow Table/RecordBatch or a dict of columns):
        ``member`` (str), ``at`` (timestamp with a timezone, or int64 microseconds UTC), ``amount``,
        ``ref``; optional ``redeem_points``, ``branch``, ``channel``, ``category``, ``sku``, ``quantity``
        (one item per row). Rows go in time order per member through the same kernel as
        :meth:`purchase`. Returns a table with one row per input row: ref, status (:class:`RowStatus`),
        points, credit, discount, redeemed, tier_after."""
        with _memory.small_pages():
            return self._purchase_batch(table, events)

    def _purchase_batch(self, table: Any, events: bool) -> pa.Table:
        t = _as_table(table)
        n = t.num_rows
        for col in ("member", "at", "amount", "ref"):
            if col not in t.column_names:
                raise ValidationError(f"purchase_batch: missing column {col!r}; columns are {t.column_names}")
        known = {"member", "at", "amount", "ref", "redeem_points", "branch", "channel", "category", "sku", "quantity"}
        unknown = [c for c in t.column_names if c not in known]
        if unknown:
            raise ValidationError(f"purchase_batch: unknown column(s) {unknown}; the columns are {sorted(known)}")
        members = _str_column(t, "member")
        refs = _str_column(t, "ref")
        at = _time_column(t, "at")
        amount = _int_column(t, "amount", 1)
        redeem = (_int_column(t, "redeem_points", 0, "whole points") if "redeem_points" in t.column_names
                  else np.zeros(n, np.int64))
        status = np.zeros(n, np.int32)
        out = np.zeros(n, OUT)
        with self._lock:
            idx = np.array([self._names.get(m, -1) for m in members], np.int64)
            status[idx < 0] = RowStatus.UNKNOWN_MEMBER
            seen: set[str] = set()
            with self.ledger._ext_begin() as txn:
                db = self.ledger._ext_db()
                for i, r in enumerate(refs):
                    if not r:
                        raise ValidationError(f"purchase_batch: column 'ref' row {i} is empty")
                    if r in seen or txn.get(b"R" + r.encode(), db=db) is not None:
                        status[i] = RowStatus.DUPLICATE
                    seen.add(r)
            live = np.flatnonzero(status == 0)
            order = live[np.argsort(at[live], kind="stable")]
            lf = self._local_fields(at)
            sym = self.program.symbols.tables
            cat_col = _sym_column(t, "category", sym["category"])
            sku_col = _sym_column(t, "sku", sym["sku"])
            br = _sym_column(t, "branch", sym["branch"])
            ch = _sym_column(t, "channel", sym["channel"])
            qty = (_int_column(t, "quantity", 0, "whole pieces", 1 << 31) if "quantity" in t.column_names
                   else np.ones(n, np.int64))
            has_items = "category" in t.column_names or "sku" in t.column_names
            for start in range(0, len(order), CHUNK_ROWS):
                chunk = order[start: start + CHUNK_ROWS]   # time order: budgets and caps see what came first
                rows, icat, isku, iamt = _purchase_rows(
                    idx[chunk], amount[chunk], qty[chunk], {k: v[chunk] for k, v in lf.items()}, br[chunk],
                    ch[chunk], cat_col[chunk] if has_items else None, sku_col[chunk] if has_items else None,
                    redeem[chunk])
                self._refresh_points(np.unique(np.concatenate([idx[chunk], self._members["referrer"][idx[chunk]]])))
                saved_all = (self._members.copy(), self._offer_use.copy(), self._budget.copy(), dict(self._hist))
                try:
                    o = self._evaluate(rows, icat, isku, iamt)
                    ok = o["status"] == 0
                    recs = self._batch_transfers([refs[i] for i in chunk], chunk, idx, o, at, lf["day"])
                    okrows = np.flatnonzero(ok)
                    rec = np.zeros(len(okrows), RECEIPT_DTYPE)
                    rec["member"] = idx[chunk][okrows]
                    rec["at"] = at[chunk][okrows]
                    rec["amount"] = amount[chunk][okrows]
                    rec["out"] = o[okrows]
                    touched = np.unique(np.concatenate([idx[chunk], o["referrer"][o["referrer"] >= 0]]))
                    ok_refs = [refs[chunk[i]] for i in okrows]

                    def extra(txn: lmdb.Transaction, results: np.ndarray, ok_refs: list[str] = ok_refs,
                              rec: np.ndarray = rec, touched: np.ndarray = touched) -> None:
                        _raise_on(results, "purchase_batch")
                        self._commit_rows(txn, ok_refs, rec, touched.tolist(), events=events)

                    self._post_with(recs, extra)
                except BaseException:
                    self._members, self._offer_use, self._budget, self._hist = saved_all
                    raise
                out[chunk] = o
                status[chunk] = o["status"]
        return pa.table({"ref": refs, "status": status, "points": out["points"], "credit": out["credit"],
                         "discount": out["discount"], "redeemed": out["redeemed"], "tier_after": out["tier_after"],
                         "offers_fired": out["offers_fired"]})

    def import_sales(self, source: Any, *, columns: dict[str, str] | None = None, quarantine: Any = None,
                     progress: bool | None = None, resume: bool = False, enroll: bool = True,
                     scale: int | None = None, tz: str | None = None, time_format: str | None = None,
                     delimiter: str | None = None, format: str | None = None, chunk_rows: int = 1_000_000,
                     import_id: str | None = None) -> Any:
        """Import sales history: ``source`` is a Parquet, CSV or Arrow IPC file (``.gz`` too), a directory
        or glob of them, a list of paths, a pyarrow Table, or a pandas/polars DataFrame.

        ``columns`` maps the fields ``member``, ``at``, ``amount`` (required) and ``ref``, ``kind`` (sale
        or return), ``original`` (the ref a return refers to), ``branch``, ``channel``, ``category``,
        ``sku``, ``quantity`` to the source's column names (a field whose name the source already has
        needs no entry). ``scale``: decimal places of the source's amounts (``11.77`` with ``scale=2`` is
        1177 in the minor unit; default 0 for integer columns, the program's ``minor_unit`` otherwise).
        ``tz``: the timezone of times and dates that carry none (without it they are rejected).
        ``time_format``: a strptime format for text times (default: ISO 8601). ``delimiter``: of a CSV
        (default: sniffed; ``"whitespace"`` for columns separated by runs of spaces).

        Bad rows go to ``quarantine`` (a .parquet, .csv or .arrow path) with their file, row number,
        values and reason; good rows still import. Unknown members are enrolled at their first purchase
        unless ``enroll=False``. Each chunk of ``chunk_rows`` rows commits with a checkpoint: the same
        source again posts nothing, and a stopped import continues with ``resume=True``. Returns an
        :class:`~loyalty_engine.bulk_import.ImportReport`. See docs/import.md."""
        from .bulk_import import import_sales

        with _memory.small_pages():
            return import_sales(self, source, columns=columns, quarantine=quarantine, progress=progress,
                                resume=resume, enroll=enroll, scale=scale, tz=tz, time_format=time_format,
                                delimiter=delimiter, format=format, chunk_rows=chunk_rows, import_id=import_id)

    def _refresh_points(self, idx: np.ndarray, available: Any = None) -> None:
        """Take members' available points and credit from the ledger (the truth): by ``available(ids)``
        when given (the state as of a transaction), else as of the last commit."""
        idx = idx[idx >= 0]
        if len(idx) == 0:
            return
        avail = (available or self.ledger._available)(np.concatenate([points_account(idx), credit_account(idx)]))
        self._members["points"][idx] = avail[: len(idx)]
        self._members["credit"][idx] = avail[len(idx):]

    def _batch_transfers(self, refs: list[str], chunk: np.ndarray, idx: np.ndarray, o: np.ndarray,
                         at: np.ndarray, day: np.ndarray) -> np.ndarray:
        ok = np.flatnonzero(o["status"] == 0)
        m = idx[chunk][ok]
        a = at[chunk][ok]
        exp = self._expiry(a, day[chunk][ok])
        oo = o[ok]
        kinds = [  # (debit, credit, amount, asset, code, expires)
            (points_account(m), np.full(len(ok), REDEEMED_POINTS), oo["redeemed"], POINTS, Code.REDEEM, 0),
            (np.full(len(ok), ISSUE_POINTS), points_account(m), oo["points"], POINTS, Code.EARN, 1),
            (np.full(len(ok), ISSUE_CREDIT), credit_account(m), oo["credit"], CREDIT, Code.CREDIT, 0),
            (np.full(len(ok), ISSUE_POINTS), points_account(np.maximum(oo["referrer"], 0)), oo["referrer_points"],
             POINTS, Code.BONUS, 1),
        ]
        present = np.stack([k[2] > 0 for k in kinds], axis=1)       # rows x kinds
        count = present.sum(axis=1)
        total = int(count.sum())
        recs = np.zeros(total, RECORD_DTYPE)
        pos = np.cumsum(count) - count                               # each row's first transfer
        rank = np.cumsum(present, axis=1) - 1                         # place of each kind within its row
        ids = np.array([_ref_id(refs[i], 0) for i in ok], dtype=np.uint64).reshape(-1, 2)
        for kcol, (deb, cre, amt, asset, code, expiring) in enumerate(kinds):
            sel = np.flatnonzero(present[:, kcol])
            at_pos = pos[sel] + rank[sel, kcol]
            recs["id_lo"][at_pos] = ids[sel, 0] | np.uint64(kcol + 1)
            recs["id_hi"][at_pos] = ids[sel, 1]
            recs["debit"][at_pos] = np.asarray(deb)[sel]
            recs["credit"][at_pos] = np.asarray(cre)[sel]
            recs["amount"][at_pos] = amt[sel]
            recs["asset"][at_pos] = asset
            recs["code"][at_pos] = code
            recs["at"][at_pos] = a[sel]
            if expiring:
                recs["expires_at"][at_pos] = exp[sel]
        last = pos + count - 1
        recs["flags"] = TransferFlags.LINKED
        recs["flags"][last[count > 0]] = 0
        return recs

    # -- refunds, redemptions, bonuses ------------------------------------------------------------------
    def refund(self, purchase_ref: str, *, amount: int, at: datetime | int, ref: str) -> RefundReceipt:
        """Refund ``amount`` of the purchase ``purchase_ref``: take back the points and credit earned by
        that share (never more than was earned), and undo a tier upgrade the refunded spend no longer
        supports. A retry with the same ``ref`` returns the first refund receipt."""
        purchase_ref, ref = _checked_ref(purchase_ref, "purchase_ref"), _checked_ref(ref)
        amount = _checked_amount(amount, "amount")
        at_us = to_micros(at, "at")
        with self._lock:
            done = self._receipt(ref)
            if done is not None:
                if int(done["kind"]) != 1:
                    raise ValidationError(f"ref {ref!r} was already used for something else than a refund")
                with self.ledger._ext_begin() as txn:
                    orig = txn.get(b"r" + ref.encode(), db=self.ledger._ext_db())
                if orig is None or bytes(orig).decode() != purchase_ref:
                    raise ValidationError(f"ref {ref!r} was already used to refund another purchase")
                return self._refund_obj(ref, done, purchase_ref)
            rec = self._receipt(purchase_ref)
            if rec is None or int(rec["kind"]) != 0:
                raise NotFoundError(f"no purchase with ref {purchase_ref!r} to refund")
            if int(rec["refunded"]) + amount > int(rec["amount"]):
                raise ValidationError(f"refund of {amount} exceeds what is left of purchase {purchase_ref!r} "
                                      f"({int(rec['amount']) - int(rec['refunded'])} of {int(rec['amount'])})")
            idx = int(rec["member"])
            o = rec["out"]
            share = int(rec["refunded"]) + amount
            earned = int(o["points"]) - int(o["event_points"])
            pts = earned * share // int(rec["amount"]) - int(rec["points_taken"])
            cred = int(o["credit"]) * share // int(rec["amount"]) - int(rec["credit_taken"])
            bal = self.ledger.balance(points_account(idx)).available
            cbal = self.ledger.balance(credit_account(idx)).available
            shortfall = 0
            if self.program.negative_balance == "cap":
                if pts > max(bal, 0):
                    shortfall = pts - max(bal, 0)
                    pts = max(bal, 0)
            cred_short = max(cred - max(cbal, 0), 0)
            cred -= cred_short
            recs = self._transfers([(points_account(idx), CLAWBACK_POINTS, pts, POINTS, Code.REFUND),
                                    (credit_account(idx), CLAWBACK_CREDIT, cred, CREDIT, Code.REFUND)], ref, at_us)
            saved = self._save(idx, -1)
            # the refunded spend leaves the member's history (and with it the tier metric)
            day = int(self._local_fields(np.array([int(rec["at"])], np.int64))["day"][0])
            hist = np.frombuffer(self._hist.get(idx, b""), HEV)
            fix = np.zeros(1, HEV)
            fix[0] = (day, -1 if share == int(rec["amount"]) else 0, -amount, -(pts + shortfall))
            pos = int(np.searchsorted(hist["day"], day, side="right"))
            self._hist[idx] = np.concatenate([hist[:pos], fix, hist[pos:]]).tobytes()
            st = self._members[idx]
            tier_before = int(st["tier"])
            lifted = int(o["tier_after"]) > int(o["tier_before"])
            if lifted and tier_before > int(o["tier_before"]) and self.program.tiers:
                # the purchase lifted the member: drop back as far as the remaining spend allows
                # the upgrades the corrected history still earns: the tier at each purchase from the
                # refunded one on, as the kernel ranks at a purchase (its window or period, recency 0)
                h = np.frombuffer(self._hist[idx], HEV)
                days = sorted(set(h["day"][(h["visits"] > 0) & (h["day"] >= day)].tolist()))
                new = max([int(o["tier_before"])] + [self._tier_at_purchase(idx, d) for d in days])
                if new < tier_before:
                    st["tier"] = new
            rec["refunded"] += amount
            rec["points_taken"] += pts + shortfall
            rec["credit_taken"] += cred
            rec["shortfall"] += shortfall
            ref_rec = np.zeros(1, RECEIPT_DTYPE)[0]
            ref_rec["member"], ref_rec["at"], ref_rec["amount"], ref_rec["kind"] = idx, at_us, amount, 1
            ref_rec["points_taken"], ref_rec["credit_taken"], ref_rec["shortfall"] = pts, cred, shortfall
            ref_rec["out"]["tier_after"] = st["tier"]
            name = self._member_names[idx]

            def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
                _raise_on(results, f"refund {ref!r}")
                db = self.ledger._ext_db()
                txn.put(b"R" + purchase_ref.encode(), rec.tobytes(), db=db)
                txn.put(b"R" + ref.encode(), ref_rec.tobytes(), db=db)
                txn.put(b"r" + ref.encode(), purchase_ref.encode(), db=db)
                self._put_member(txn, idx)
                if pts:
                    self._put_event(txn, "points_changed", name, at_us, delta=-pts, reason="refund", ref=ref)
                if int(st["tier"]) != tier_before:
                    self._put_event(txn, "tier_changed", name, at_us, before=self.program.tier_name(tier_before),
                                    after=self.program.tier_name(int(st["tier"])), ref=ref)

            try:
                self._post_with(recs, extra)
            except BaseException:
                self._restore(saved)
                raise
            self._members[idx]["points"] -= pts
            return self._refund_obj(ref, ref_rec, purchase_ref)

    def _refund_obj(self, ref: str, rec: Any, purchase_ref: str) -> RefundReceipt:
        return RefundReceipt(ref=ref, purchase_ref=purchase_ref, amount=int(rec["amount"]),
                             points_taken=int(rec["points_taken"]), credit_taken=int(rec["credit_taken"]),
                             shortfall=int(rec["shortfall"]),
                             tier_after=self.program.tier_name(int(rec["out"]["tier_after"])))

    def _tier_at_purchase(self, idx: int, day: int) -> int:
        """The tier the metric supports at a purchase on ``day``, as the kernel ranks it then: over the
        window or calendar period ending that day, recency 0 for an RFM score."""
        h = np.frombuffer(self._hist.get(idx, b""), HEV)
        start = day - self.program.tier_window_days + 1
        if self.program.tier_period != "rolling":      # the calendar period so far
            d = date(1970, 1, 1) + timedelta(days=day)
            first = {"month": d.replace(day=1), "quarter": d.replace(month=(d.month - 1) // 3 * 3 + 1, day=1),
                     "year": d.replace(month=1, day=1)}[self.program.tier_period]
            start = (first - date(1970, 1, 1)).days
        w = h[(h["day"] >= start) & (h["day"] <= day)]
        visits, spend = int(w["visits"].sum()), int(w["amount"].sum())
        if self.program.tier_metric == "rfm":     # the kernel's metric_of: recency 0 at a purchase scores 5
            b = self.program.tier_rfm
            metric = 5 + 2 + sum(visits >= b[4 + k] for k in range(4)) + sum(spend >= b[8 + k] for k in range(4))
        else:
            metric = {"points": int(w["points"].sum()), "spend": spend, "visits": visits}[self.program.tier_metric]
        t = 0
        for i, tier in enumerate(self.program.tiers):
            if tier.threshold <= metric:
                t = i + 1
        return t

    def redeem(self, member: str, *, points: int, at: datetime | int, ref: str) -> int:
        """Spend ``points`` outside a purchase (a voucher, a gift); returns their money value. Refused with
        :class:`InsufficientBalanceError` when the member has fewer available points."""
        ref = _checked_ref(ref)
        points = _checked_amount(points, "points")
        at_us = to_micros(at, "at")
        p = self.program
        with self._lock:
            idx = self._idx(member)
            if points < p.burn_min or points % p.burn_step:
                raise ValidationError(f"redeem of {points} points refused: the program takes at least "
                                      f"{p.burn_min}, in steps of {p.burn_step}")
            done = self._receipt(ref)
            if done is not None:
                return int(done["out"]["redeem_value"])
            bal = self.ledger.balance(points_account(idx)).available
            if points > bal:
                raise InsufficientBalanceError(f"{member!r} has {bal} points available, cannot redeem {points}")
            value = points * p.burn_value // p.burn_points
            recs = self._transfers([(points_account(idx), REDEEMED_POINTS, points, POINTS, Code.REDEEM)], ref, at_us)
            rec = np.zeros(1, RECEIPT_DTYPE)[0]
            rec["member"], rec["at"], rec["kind"] = idx, at_us, 2
            rec["out"]["redeemed"], rec["out"]["redeem_value"] = points, value

            def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
                if results[0] != 0:
                    raise InsufficientBalanceError(f"{member!r} cannot redeem {points} points: "
                                                   f"{TransferResult(int(results[0])).name}")
                txn.put(b"R" + ref.encode(), rec.tobytes(), db=self.ledger._ext_db())
                self._put_event(txn, "points_changed", member, at_us, delta=-points, reason="redeem", ref=ref)

            self._post_with(recs, extra)
            self._members[idx]["points"] = bal - points
            return value

    def survey(self, member: str, *, at: datetime | int, ref: str) -> int:
        """Credit the program's survey bonus for an answered survey (once per ``ref``); returns the points."""
        ref = _checked_ref(ref)
        at_us = to_micros(at, "at")
        with self._lock:
            idx = self._idx(member)
            if self._receipt(ref) is not None:
                return self.program.survey_bonus
            pts = self.program.survey_bonus
            day = self._day_of(at_us)
            recs = self._transfers([(ISSUE_POINTS, points_account(idx), pts, POINTS, Code.BONUS)], ref, at_us,
                                   int(self._expiry(np.array([at_us]), np.array([day]))[0]))
            rec = np.zeros(1, RECEIPT_DTYPE)[0]
            rec["member"], rec["at"], rec["kind"] = idx, at_us, 3
            rec["out"]["points"] = pts

            def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
                _raise_on(results, f"survey {ref!r}")
                txn.put(b"R" + ref.encode(), rec.tobytes(), db=self.ledger._ext_db())
                if pts:
                    self._put_event(txn, "points_changed", member, at_us, delta=pts, reason="survey", ref=ref)

            self._post_with(recs, extra)
            self._members[idx]["points"] += pts
            return pts

    # -- reading -----------------------------------------------------------------------------------------
    def member(self, member: str, at: datetime | int | None = None) -> MemberInfo:
        """Balances, tier, window figures (as of ``at``, default the last purchase day) and offer usage."""
        with self._lock:
            idx = self._idx(member)
            st = self._members[idx]
            day = (self._day_of(to_micros(at, "at")) if at is not None
                   else max(int(st["last_day"]), int(st["enroll_day"])))
            h = np.frombuffer(self._hist.get(idx, b""), HEV)
            figures: dict[str, int] = {}
            for w in (30, 90, 365):
                sel = h[(h["day"] > day - w) & (h["day"] <= day)]
                figures[f"visits_{w}d"] = int(sel["visits"].sum())
                figures[f"spend_{w}d"] = int(sel["amount"].sum())
            figures["avg_basket"] = figures["spend_365d"] // figures["visits_365d"] if figures["visits_365d"] > 0 else 0
            figures["days_since_last"] = day - int(st["last_day"]) if st["purchases"] else -1
            figures["member_days"] = day - int(st["enroll_day"])
            return MemberInfo(
                member=member, number=idx, points=self.ledger.balance(points_account(idx)).available,
                credit=self.ledger.balance(credit_account(idx)).available, tier=self.program.tier_name(int(st["tier"])),
                enrolled=date.fromordinal(int(st["enroll_day"]) + EPOCH_ORDINAL), purchases=int(st["purchases"]),
                figures=figures,
                offers_used={o.name: int(self._offer_use[idx, i, 0]) for i, o in enumerate(self.program.offers)})

    @property
    def codes(self) -> Any:
        """The program's product codes (:class:`loyalty_engine.codes.Codes`)."""
        if self._codes is None:
            from .codes import Codes, load_key

            self._codes = Codes(self, load_key(self._code_key))
        return self._codes

    @property
    def members(self) -> int:
        """How many members the club has."""
        return len(self._member_names)

    # -- housekeeping ----------------------------------------------------------------------------------------
    def expire(self, at: datetime | int) -> int:
        """Expire points whose lots ended by ``at``, and queue ``birthday_soon`` events for members whose
        birthday is within the program's birthday window (once a year). Run it daily. Returns the number
        of expiry transfers.

        One write transaction: the expiry transfers, their ``points_changed`` events and the birthday
        notices (with the members' records) commit together or not at all."""
        at_us = to_micros(at, "at")
        with self._lock:
            count = len(self._member_names)
            if count == 0:
                return self.ledger.expire(at_us, sink=EXPIRED_POINTS)
            ids = np.arange(count, dtype=np.int64)
            day = self._day_of(at_us)
            soon: list[tuple[int, int]] = []
            p = self.program
            if p.birthday_bonus:
                md = self._members["birth_md"][:count].astype(np.int64)
                today = date.fromordinal(day + EPOCH_ORDINAL)
                for k, i in enumerate(np.flatnonzero(md > 0).tolist()):
                    if not k & 0xFFF:
                        _core.pause_point()
                    m, dd = divmod(int(md[i]), 100)
                    for y in (today.year, today.year + 1):
                        try:
                            b = date(y, m, dd)
                        except ValueError:
                            b = date(y, 2, 28)
                        gap = (b - today).days
                        if 0 <= gap <= p.birthday_within and int(self._members[i]["notice_year"]) < y:
                            soon.append((int(i), y))
                            break
            notified = np.array([i for i, _ in soon], np.int64)
            saved = self._members[notified].copy()

            def extra(txn: lmdb.Transaction, records: np.ndarray) -> None:
                # (may run twice: a write that filled the map is retried; _numbered numbers it afresh)
                delta = self._expired_points(records, count)
                for k, i in enumerate(np.flatnonzero(delta).tolist()):
                    if not k & 0xFFF:
                        _core.pause_point()
                    self._put_event(txn, "points_changed", self._member_names[i], at_us,
                                    delta=int(delta[i]), reason="expiry")
                if not soon:
                    return
                self._refresh_points(notified, lambda ids: self.ledger._available_in(txn, ids))
                for k, (i, y) in enumerate(soon):
                    if not k & 0xFFF:
                        _core.pause_point()
                    self._members[i]["notice_year"] = y
                    self._put_member(txn, i)
                    self._put_event(txn, "birthday_soon", self._member_names[i], at_us,
                                    points=p.birthday_bonus, within_days=p.birthday_within)

            commits = self.ledger.commits
            try:
                n = self._numbered(lambda a, fn: self.ledger.expire(a, sink=EXPIRED_POINTS, extra=fn), at_us,
                                   extra)
            except BaseException:
                if self.ledger.commits == commits:      # nothing committed: the notices are still to send
                    self._members[notified] = saved
                raise
            self._refresh_points(ids)
            return n

    @staticmethod
    def _expired_points(records: np.ndarray, count: int) -> np.ndarray:
        """Each member's change of available points (int64, one per member number below ``count``) made by
        the ledger's expiry ``records``: an expiry debits the member's points account, the release of a
        hold the account held gives the amount back."""
        delta = np.zeros(count, np.int64)
        if len(records) == 0:
            return delta
        debit = records["debit"]
        mine = ((debit >= MEMBER_BASE) & ((debit - MEMBER_BASE) % 2 == 0)
                & ((debit - MEMBER_BASE) // 2 < count) & (records["asset"] == POINTS))
        sign = np.where(records["flags"] & TransferFlags.VOID_PENDING, 1, -1)
        idx = ((debit[mine] - MEMBER_BASE) // 2).astype(np.int64)
        np.add.at(delta, idx, sign[mine] * records["amount"][mine])
        return delta

    def events(self, after: int = 0, limit: int = 1000) -> list[Event]:
        """Undelivered events with a sequence number above ``after``, oldest first."""
        out: list[Event] = []
        with self.ledger._ext_begin() as txn:
            cur = txn.cursor(db=self.ledger._ext_db())
            if not cur.set_range(b"E" + (after + 1).to_bytes(8, "big")):
                return out
            for key, value in cur:
                k = bytes(key)
                if k[:1] != b"E" or len(out) >= limit:
                    break
                body = json.loads(bytes(value))
                out.append(Event(seq=int.from_bytes(k[1:], "big"), kind=body["kind"], member=body["member"],
                                 at=from_micros(body["at"]).astimezone(self._zone), data=body["data"]))
        return out

    def ack(self, upto: int) -> int:
        """Acknowledge (delete) every event up to and including sequence number ``upto``; returns how many."""
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise ValidationError(f"ack takes an event sequence number, not {upto!r}")

        def extra(txn: lmdb.Transaction, results: np.ndarray) -> int:
            db = self.ledger._ext_db()
            cur = txn.cursor(db=db)
            n = 0
            if cur.set_range(b"E"):
                while True:
                    k = bytes(cur.key())
                    if k[:1] != b"E" or int.from_bytes(k[1:], "big") > upto:
                        break
                    cur.delete()
                    n += 1
                    if not cur.key():
                        break
            # numbering goes on after the acknowledged events are gone
            txn.put(b"S", b'{"event_seq": %d}' % self._event_seq, db=db)
            return n

        with self._lock:
            return int(self._post_with(np.zeros(0, RECORD_DTYPE), extra))


#: the byte offsets of ROW's fields for _bulk.purchase_rows (its order), and the record's size
_ROW_LAYOUT = np.array([ROW.fields[f][1] for f in ("member", "amount", "quantity", "redeem", "cats", "skus", "day",
                                                     "hour", "weekday", "month", "dom", "branch", "channel",
                                                     "item_start", "item_end")] + [ROW.itemsize], np.int64)


def _purchase_rows(member: np.ndarray, amount: np.ndarray, qty: np.ndarray, local: dict[str, np.ndarray],
                   branch: np.ndarray, channel: np.ndarray, cat: np.ndarray | None, sku: np.ndarray | None,
                   redeem: np.ndarray | None = None, into: np.ndarray | None = None
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The kernel's rows (and item arrays: one item per row when ``cat``/``sku`` are given) of a batch
    of purchases; ``local`` holds day, hour, weekday, month and dom in the program's timezone. ``into``
    is a ROW array of the batch's length to fill (else one is allocated): without ``redeem`` every byte
    of it is written in one pass (``_bulk.purchase_rows``), with ``redeem`` it must be zeroed."""
    n = len(member)
    if into is not None and redeem is None:     # (the import's chunks: one pass, every byte written)
        i64, i32 = np.int64, np.int32
        no_items = np.zeros(0, i32)
        _bulk.purchase_rows(into.view(np.uint8).reshape(n, ROW.itemsize), _ROW_LAYOUT,
                            *(np.ascontiguousarray(a, i64) for a in (member, amount, qty)),
                            *(np.ascontiguousarray(local[k], i64) for k in ("day", "hour", "weekday", "month", "dom")),
                            np.ascontiguousarray(branch, i32), np.ascontiguousarray(channel, i32),
                            no_items if cat is None or sku is None else np.ascontiguousarray(cat, i32),
                            no_items if cat is None or sku is None else np.ascontiguousarray(sku, i32))
        if cat is None or sku is None:
            return into, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
        return into, cat, sku, np.array(amount, np.int64)
    rows = np.zeros(n, ROW) if into is None else into
    rows["member"], rows["amount"], rows["quantity"] = member, amount, qty
    if redeem is not None:
        rows["redeem"] = redeem
    for k in ("day", "hour", "weekday", "month", "dom"):
        rows[k] = local[k]
    rows["branch"], rows["channel"] = branch, channel
    if cat is None or sku is None:
        return rows, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.int64)
    rows["cats"] = np.left_shift(1, cat.astype(np.int64))
    rows["skus"] = np.left_shift(1, sku.astype(np.int64))
    rows["item_start"] = np.arange(n)
    rows["item_end"] = rows["item_start"] + 1
    return rows, cat, sku, np.array(amount, np.int64)


def _table_pays(values: np.ndarray, bound: int) -> bool:
    """Whether a presence table over [0, bound) finds the distinct ``values`` cheaper than a sort (many
    values, all in range)."""
    n = len(values)
    return n >= 4096 and bound <= 16 * n and values.min() >= 0 and values.max() < bound


def _distinct(values: np.ndarray, bound: int) -> np.ndarray:
    """``np.unique(values)`` for integers in [0, bound), by a presence table when that is cheaper than
    sorting (:func:`_small_unique` without the inverse: no prefix sum or gather over the table)."""
    values = np.asarray(values, np.int64)
    if not _table_pays(values, bound):
        return np.unique(values)
    present = np.zeros(bound, bool)
    present[values] = True
    return np.flatnonzero(present)


#: The presence table of :func:`_small_unique` (int32, every entry -1 between calls), kept from call to
#: call: an import's chunks need one the size of the club, and fresh memory's first touch is dear.
_unique_slot = np.empty(0, np.int32)
_unique_lock = threading.Lock()


def _small_unique(values: np.ndarray, bound: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for integers in [0, bound): by the kept presence table
    when that is cheaper than sorting (and no other thread has it), by sorting otherwise."""
    global _unique_slot
    values = np.ascontiguousarray(values, np.int64)
    if not _table_pays(values, bound) or not _unique_lock.acquire(blocking=False):
        u, inv = np.unique(values, return_inverse=True)
        return u, inv.reshape(-1)
    try:
        if len(_unique_slot) < bound:
            _unique_slot = np.full(max(bound, len(_unique_slot) + len(_unique_slot) // 4), -1, np.int32)
        inv = np.empty(len(values), np.int64)
        keys = np.empty(min(len(values), bound), np.int64)
        k = _bulk.unique_inverse(values, bound, _unique_slot, inv, keys)
    finally:
        _unique_lock.release()
    return (keys[:k] if 2 * k >= len(keys) else keys[:k].copy()), inv


def _raise_on(results: np.ndarray, what: str) -> None:
    if results.tobytes().count(0) == len(results):     # (for a few results, a fifth of results.any())
        return
    r = TransferResult(int(results[np.flatnonzero(results)[0]]))
    if r == TransferResult.EXISTS:
        raise StorageError(f"{what}: its transfers are already in the ledger but its receipt is not; "
                           f"the engine's records were written by another program version")
    if r.name.startswith("EXCEEDS"):
        raise InsufficientBalanceError(f"{what}: the ledger refused it ({r.name})")
    raise ValidationError(f"{what}: the ledger refused it ({r.name})")


def _as_table(table: Any) -> pa.Table:
    if isinstance(table, pa.RecordBatch):
        return pa.Table.from_batches([table])
    if isinstance(table, pa.Table):
        return table
    if isinstance(table, dict):
        return pa.table(table)
    raise ValidationError(f"purchase_batch takes a pyarrow Table/RecordBatch or a dict of columns, "
                          f"not {type(table).__name__}")


def _str_column(t: pa.Table, name: str) -> list[str]:
    col = t.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ValidationError(f"column {name!r} must be strings, not {col.type}")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValidationError(f"column {name!r} row {row} is null")
    return col.to_pylist()


def _int_column(t: pa.Table, name: str, lo: int, what: str = "money in the minor unit",
                hi: int = 1 << 53) -> np.ndarray:
    col = t.column(name)
    if not pa.types.is_integer(col.type):
        raise ValidationError(f"column {name!r} must be integers ({what}), not {col.type}")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValidationError(f"column {name!r} row {row} is null")
    arr = col.to_numpy().astype(np.int64)
    bad = np.flatnonzero((arr < lo) | (arr >= hi))
    if len(bad):
        raise ValidationError(f"column {name!r} row {int(bad[0])}: {int(arr[bad[0]])} is out of range "
                              f"[{lo}, 2**{hi.bit_length() - 1})")
    return arr


def _time_column(t: pa.Table, name: str) -> np.ndarray:
    col = t.column(name)
    if pa.types.is_timestamp(col.type):
        if col.type.tz is None:
            raise ValidationError(f"column {name!r} is a timestamp without a timezone; give it one "
                                  f"(e.g. pa.timestamp('us', tz='UTC')) or pass int64 microseconds UTC")
        col = col.cast(pa.timestamp("us", tz=col.type.tz)).cast(pa.int64())
    elif not pa.types.is_integer(col.type):
        raise ValidationError(f"column {name!r} must be a timestamp with a timezone or int64 microseconds, "
                              f"not {col.type}")
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValidationError(f"column {name!r} row {row} is null")
    return col.to_numpy().astype(np.int64)


def _sym_column(t: pa.Table, name: str, table: dict[str, int]) -> np.ndarray:
    if name not in t.column_names:
        return np.zeros(t.num_rows, np.int32)
    col = t.column(name)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        raise ValidationError(f"column {name!r} must be strings, not {col.type}")
    if not table:
        return np.zeros(t.num_rows, np.int32)
    keys = pa.array(list(table), pa.string())
    pos = pc.index_in(col, value_set=keys).to_numpy(zero_copy_only=False)
    vals = np.asarray(list(table.values()), np.int32)
    out = np.zeros(t.num_rows, np.int32)
    hit = ~np.isnan(pos.astype(float)) if pos.dtype.kind == "f" else pos >= 0
    out[hit] = vals[pos[hit].astype(np.int64)]
    return out

