"""The ledger's value types: accounts, transfers, flags, results, balances.

Plain, frozen, slotted records with integer fields (ids as Python ints, amounts as integers in the
asset's smallest unit, times as aware datetimes or integer microseconds since the Unix epoch, UTC).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import IntEnum, IntFlag
from typing import NamedTuple

import numpy as np

__all__ = [
    "AccountFlags",
    "TransferFlags",
    "AccountResult",
    "TransferResult",
    "Code",
    "Account",
    "Transfer",
    "Balance",
    "VerifyReport",
    "BALANCE_DTYPE",
    "RECORD_DTYPE",
    "ACCOUNT_RECORD_DTYPE",
    "SYSTEM_ID_HI",
    "to_micros",
    "from_micros",
]

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
U64_MAX = (1 << 64) - 1
I64_MAX = (1 << 63) - 1
U32_MAX = (1 << 32) - 1
#: The high 64 bits of ids the ledger gives its own transfers (expiry, hold time-outs).
SYSTEM_ID_HI = U64_MAX


class AccountFlags(IntFlag):
    """Constraints on an account."""

    NONE = 0
    #: The account may not spend more than it holds (members' accounts).
    DEBITS_MUST_NOT_EXCEED_CREDITS = 1
    #: The account may not receive more than it has given (e.g. a budget account).
    CREDITS_MUST_NOT_EXCEED_DEBITS = 2
    #: The account takes no new transfers (set by ``close_accounts``).
    CLOSED = 4


class TransferFlags(IntFlag):
    """How a transfer is applied."""

    NONE = 0
    #: This transfer and the next succeed or fail together.
    LINKED = 1
    #: Hold the amount (debits_pending / credits_pending) until posted or voided.
    PENDING = 2
    #: Post (part of) the hold named by ``related``.
    POST_PENDING = 4
    #: Release the hold named by ``related``.
    VOID_PENDING = 8
    #: Set by the ledger on transfers it makes itself (expiry, hold time-outs); hosts may not set it.
    SYSTEM = 1 << 15


#: Flags a host may set on a transfer.
HOST_TRANSFER_FLAGS = int(
    TransferFlags.LINKED | TransferFlags.PENDING | TransferFlags.POST_PENDING | TransferFlags.VOID_PENDING
)


class AccountResult(IntEnum):
    """The outcome of creating one account."""

    OK = 0
    EXISTS = 1
    EXISTS_WITH_DIFFERENT_FIELDS = 2
    ID_MUST_NOT_BE_ZERO = 3
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 4


class TransferResult(IntEnum):
    """The outcome of one transfer. Only ``OK`` and ``EXISTS`` leave the ledger as the caller wants."""

    OK = 0
    LINKED_EVENT_FAILED = 1
    LINKED_EVENT_CHAIN_OPEN = 2
    EXISTS = 3
    EXISTS_WITH_DIFFERENT_FIELDS = 4
    ID_MUST_NOT_BE_ZERO = 5
    ACCOUNTS_MUST_DIFFER = 6
    AMOUNT_MUST_BE_POSITIVE = 7
    ASSET_MISMATCH = 8
    ACCOUNT_NOT_FOUND = 9
    ACCOUNT_CLOSED = 10
    EXCEEDS_CREDITS = 11
    EXCEEDS_DEBITS = 12
    PENDING_NOT_FOUND = 13
    PENDING_EXPIRED = 14
    PENDING_ALREADY_POSTED = 15
    PENDING_ALREADY_VOIDED = 16
    PENDING_AMOUNT_EXCEEDED = 17
    FLAGS_ARE_MUTUALLY_EXCLUSIVE = 18
    PENDING_ID_REQUIRED = 19
    TIMEOUT_RESERVED_FOR_PENDING = 20
    PENDING_FIELDS_DIFFER = 21
    EXPIRY_NOT_AFTER_EVENT = 22
    OVERFLOW = 23


class Code(IntEnum):
    """Standard reasons for transfers; hosts may use any integer in [0, 65535]."""

    UNSPECIFIED = 0
    EARN = 1
    BONUS = 2
    OFFER = 3
    REDEEM = 4
    EXPIRE = 5
    REFUND = 6
    TRANSFER = 7
    CODE = 8
    ADJUST = 9
    CREDIT = 10
    PENDING_TIMEOUT = 11


# One committed transfer as stored in the journal (104 bytes, little-endian, no padding).
RECORD_DTYPE = np.dtype(
    [
        ("id_lo", "<u8"),
        ("id_hi", "<u8"),
        ("debit", "<u8"),
        ("credit", "<u8"),
        ("amount", "<i8"),
        ("related_lo", "<u8"),
        ("related_hi", "<u8"),
        ("user_data", "<u8"),
        ("at", "<i8"),
        ("expires_at", "<i8"),
        ("timeout", "<i8"),
        ("fp", "<u8"),
        ("asset", "<u4"),
        ("code", "<u2"),
        ("flags", "<u2"),
    ]
)
assert RECORD_DTYPE.itemsize == 104

# One account event as stored in the journal (op 0 create, 1 close, 2 reopen).
ACCOUNT_RECORD_DTYPE = np.dtype(
    [("id", "<u8"), ("user_data", "<u8"), ("asset", "<u4"), ("flags", "<u2"), ("op", "<u2")]
)

BALANCE_DTYPE = np.dtype(
    [
        ("id", "<u8"),
        ("debits_posted", "<i8"),
        ("credits_posted", "<i8"),
        ("debits_pending", "<i8"),
        ("credits_pending", "<i8"),
        ("available", "<i8"),
        ("found", "?"),
    ]
)


def to_micros(value: datetime | int, name: str = "at") -> int:
    """An aware datetime or integer microseconds (UTC) as integer microseconds since the epoch."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            from .errors import ValidationError

            raise ValidationError(
                f"{name}={value!r} is a naive datetime; give it a timezone "
                f"(e.g. tzinfo=timezone.utc or ZoneInfo('Asia/Tehran'))"
            )
        delta = value - EPOCH
        return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        v = int(value)
        if not -(1 << 63) <= v <= I64_MAX:
            from .errors import ValidationError

            raise ValidationError(f"{name}={v} is out of range for microseconds since the epoch")
        return v
    from .errors import ValidationError

    raise ValidationError(
        f"{name}={value!r} must be an aware datetime or integer microseconds since the Unix epoch (UTC)"
    )


def from_micros(us: int) -> datetime:
    """Integer microseconds since the epoch as an aware UTC datetime."""
    return EPOCH + timedelta(microseconds=int(us))


@dataclass(frozen=True, slots=True, kw_only=True)
class Account:
    """An account holding one asset."""

    #: The account's id, in [1, 2**64 - 1].
    id: int
    #: The asset it holds (0 = points by convention), in [0, 2**32 - 1].
    asset: int = 0
    #: Constraints (``AccountFlags``).
    flags: AccountFlags = AccountFlags.NONE
    #: Free for the host, in [0, 2**64 - 1].
    user_data: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class Transfer:
    """A movement of ``amount`` of ``asset`` from ``debit`` to ``credit``."""

    #: The transfer's id, in [1, 2**128 - 2**64).
    id: int
    #: The account debited.
    debit: int = 0
    #: The account credited.
    credit: int = 0
    #: How much, in the asset's smallest unit (> 0; 0 only for post/void: "the held amount").
    amount: int = 0
    #: The asset moved; must match both accounts.
    asset: int = 0
    #: Why (``Code`` or the host's own integer).
    code: int = 0
    #: ``TransferFlags``.
    flags: TransferFlags = TransferFlags.NONE
    #: When it happened: an aware datetime or integer microseconds since the epoch (UTC).
    at: datetime | int = 0
    #: When the credited points expire (aware datetime, microseconds, or None).
    expires_at: datetime | int | None = None
    #: The related transfer: the hold a post/void resolves, or the purchase a refund reverses.
    related: int = 0
    #: For ``PENDING``: how long the hold lasts after ``at`` (timedelta or microseconds; 0 = forever).
    timeout: timedelta | int = 0
    #: Free for the host, in [0, 2**64 - 1].
    user_data: int = 0


class Balance(NamedTuple):
    """An account's balance, in the asset's smallest unit. (A named tuple rather than a frozen
    dataclass: it is made once per balance read, and a tuple is made in a fifth of the time.)"""

    debits_posted: int
    credits_posted: int
    debits_pending: int
    credits_pending: int
    #: credits_posted - debits_posted - debits_pending: what can be spent now.
    available: int


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """What ``Ledger.verify()`` found."""

    #: True when the hash chain, every replayed balance, lot and hold, and conservation all check out.
    ok: bool
    #: Journal entries walked.
    batches: int
    #: Transfers replayed.
    transfers: int
    #: One line per problem found, naming the journal entry (sequence number) or account.
    problems: list[str] = field(default_factory=list)
