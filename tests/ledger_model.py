"""A pure-Python reference model of the ledger, written from docs/ledger.md and nothing else.

It is the oracle of ``test_ledger_state_machine.py``: small dicts and lists, no storage, no speed.
Every rule below quotes the contract it follows; where docs/ledger.md leaves a choice open, the comment
says which reading the model takes (and the state machine avoids generating that case, so a mismatch
always means one side disagrees with the written contract).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from loyalty_engine.types import (
    Account,
    AccountFlags,
    AccountResult,
    Transfer,
    TransferFlags,
    TransferResult,
)

I64_MAX = (1 << 63) - 1
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

DMNEC = int(AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS)
CMNED = int(AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS)
CLOSED = int(AccountFlags.CLOSED)
LINKED = int(TransferFlags.LINKED)
PENDING = int(TransferFlags.PENDING)
POST = int(TransferFlags.POST_PENDING)
VOID = int(TransferFlags.VOID_PENDING)

R = TransferResult


def micros(value: datetime | timedelta | int | None) -> int | None:
    """Integer microseconds of an aware datetime (since the epoch), a timedelta, or an int."""
    if value is None:
        return None
    if isinstance(value, datetime):
        assert value.tzinfo is not None, "the model only takes aware datetimes"
        value = value - _EPOCH
    if isinstance(value, timedelta):
        return (value.days * 86_400 + value.seconds) * 1_000_000 + value.microseconds
    return int(value)


def submitted(t: Transfer) -> tuple[int | None, ...]:
    """The fields a retry is compared on (check 2): what the host submitted, as integers."""
    return (
        t.debit,
        t.credit,
        t.amount,
        t.asset,
        t.code,
        int(t.flags),
        micros(t.at),
        micros(t.expires_at),
        t.related,
        micros(t.timeout),
        t.user_data,
    )


@dataclass
class ModelAccount:
    asset: int
    flags: int  # as created (never includes CLOSED)
    user_data: int
    closed: bool = False
    dp: int = 0  # debits_posted
    cp: int = 0  # credits_posted
    dpend: int = 0  # debits_pending
    cpend: int = 0  # credits_pending
    #: [expires_at_us, remaining], sorted by expiry, one per expiry, remaining > 0.
    lots: list[list[int]] = field(default_factory=list)

    @property
    def available(self) -> int:
        return self.cp - self.dp - self.dpend

    def add_lot(self, expires_at: int, amount: int) -> None:
        """A credit with an expiry forms a lot; lots with the same expiry merge."""
        for lot in self.lots:
            if lot[0] == expires_at:
                lot[1] += amount
                return
        self.lots.append([expires_at, amount])
        self.lots.sort()

    def draw(self, amount: int) -> None:
        """A posted debit draws from the lots that expire soonest first (the rest from non-expiring)."""
        for lot in self.lots:
            if amount == 0:
                break
            take = min(amount, lot[1])
            lot[1] -= take
            amount -= take
        self.lots = [lot for lot in self.lots if lot[1] > 0]


@dataclass
class Hold:
    debit: int
    credit: int
    amount: int
    asset: int
    deadline: int | None  # at + timeout, or None (timeout 0 = never)
    expires_at: int | None  # the expiry of the points the hold credits once posted
    state: str = "pending"  # pending | posted | voided | expired


class AccountNotFound(KeyError):
    """What the model says where the ledger raises NotFoundError."""


class LedgerModel:
    def __init__(self) -> None:
        self.accounts: dict[int, ModelAccount] = {}
        self.transfers: dict[int, tuple[int | None, ...]] = {}  # id -> submitted fields
        self.holds: dict[int, Hold] = {}

    # ---------------------------------------------------------------- accounts
    def create_accounts(self, accounts: list[Account]) -> list[AccountResult]:
        out = []
        for a in accounts:
            flags = int(a.flags)
            if a.id == 0:
                out.append(AccountResult.ID_MUST_NOT_BE_ZERO)
            elif (flags & DMNEC and flags & CMNED) or flags & CLOSED:
                # (The state machine only sends these with fresh ids: the docs give no order between
                # this check and EXISTS.)
                out.append(AccountResult.FLAGS_ARE_MUTUALLY_EXCLUSIVE)
            elif a.id in self.accounts:
                old = self.accounts[a.id]
                same = (old.asset, old.flags, old.user_data) == (a.asset, flags, a.user_data)
                out.append(AccountResult.EXISTS if same else AccountResult.EXISTS_WITH_DIFFERENT_FIELDS)
            else:
                self.accounts[a.id] = ModelAccount(asset=a.asset, flags=flags, user_data=a.user_data)
                out.append(AccountResult.OK)
        return out

    def _set_closed(self, ids: list[int], closed: bool) -> None:
        missing = [i for i in ids if i not in self.accounts]
        if missing:
            raise AccountNotFound(missing[0])  # nothing changes
        for i in ids:
            self.accounts[i].closed = closed

    def close_accounts(self, ids: list[int]) -> None:
        self._set_closed(ids, True)

    def reopen_accounts(self, ids: list[int]) -> None:
        self._set_closed(ids, False)

    # ---------------------------------------------------------------- transfers
    def post(self, transfers: list[Transfer]) -> list[TransferResult]:
        """One result per transfer; chains all-or-nothing; an open chain at the end does nothing."""
        n = len(transfers)
        results: list[TransferResult | None] = [None] * n
        i = 0
        while i < n:
            j = i
            while j < n and int(transfers[j].flags) & LINKED:
                j += 1
            if j == n:  # still open at the end of the batch
                for k in range(i, n):
                    results[k] = R.LINKED_EVENT_CHAIN_OPEN
                break
            saved = self._save() if j > i else None
            failed = None
            for k in range(i, j + 1):
                r = self._apply(transfers[k])
                results[k] = r
                if r not in (R.OK, R.EXISTS):
                    failed = k
                    break
            if failed is not None:
                if saved is not None:
                    self._restore(saved)
                for k in range(i, j + 1):
                    if k != failed:
                        results[k] = R.LINKED_EVENT_FAILED
            i = j + 1
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def _save(self) -> tuple[Any, ...]:
        return (copy.deepcopy(self.accounts), dict(self.transfers), copy.deepcopy(self.holds))

    def _restore(self, saved: tuple[Any, ...]) -> None:
        self.accounts, self.transfers, self.holds = saved

    def _apply(self, t: Transfer) -> TransferResult:
        """Checks in the documented order; a failing transfer changes nothing."""
        flags = int(t.flags)
        # 1.
        if t.id == 0:
            return R.ID_MUST_NOT_BE_ZERO
        if bin(flags & (PENDING | POST | VOID)).count("1") > 1:
            return R.FLAGS_ARE_MUTUALLY_EXCLUSIVE
        # 2.
        key = submitted(t)
        if t.id in self.transfers:
            return R.EXISTS if self.transfers[t.id] == key else R.EXISTS_WITH_DIFFERENT_FIELDS
        # 3. / 4.
        if flags & (POST | VOID):
            r = self._resolve(t)
        else:
            r = self._create(t)
        if r == R.OK:
            self.transfers[t.id] = key
        return r

    def _create(self, t: Transfer) -> TransferResult:
        at = micros(t.at)
        expires_at = micros(t.expires_at)
        timeout = micros(t.timeout)
        assert at is not None and timeout is not None
        pending = bool(int(t.flags) & PENDING)
        if timeout != 0 and not pending:
            return R.TIMEOUT_RESERVED_FOR_PENDING
        if t.amount <= 0:
            return R.AMOUNT_MUST_BE_POSITIVE
        if t.debit == t.credit:
            return R.ACCOUNTS_MUST_DIFFER
        if expires_at is not None and expires_at <= at:
            return R.EXPIRY_NOT_AFTER_EVENT
        d = self.accounts.get(t.debit)
        c = self.accounts.get(t.credit)
        if d is None or c is None:
            return R.ACCOUNT_NOT_FOUND
        if d.closed or c.closed:
            return R.ACCOUNT_CLOSED
        if d.asset != t.asset or c.asset != t.asset:
            return R.ASSET_MISMATCH
        if d.flags & DMNEC and d.dp + d.dpend + t.amount > d.cp:
            return R.EXCEEDS_CREDITS
        if c.flags & CMNED and c.cp + c.cpend + t.amount > c.dp:
            return R.EXCEEDS_DEBITS
        if pending:
            if d.dpend + t.amount > I64_MAX or c.cpend + t.amount > I64_MAX:
                return R.OVERFLOW
            d.dpend += t.amount
            c.cpend += t.amount
            self.holds[t.id] = Hold(
                debit=t.debit,
                credit=t.credit,
                amount=t.amount,
                asset=t.asset,
                deadline=at + timeout if timeout else None,
                expires_at=expires_at,
            )
        else:
            if d.dp + t.amount > I64_MAX or c.cp + t.amount > I64_MAX:
                return R.OVERFLOW
            self._move(d, c, t.amount, expires_at)
        return R.OK

    @staticmethod
    def _move(d: ModelAccount, c: ModelAccount, amount: int, expires_at: int | None) -> None:
        """Post ``amount``: debit draws lots soonest first; a credit with an expiry forms a lot."""
        d.dp += amount
        c.cp += amount
        d.draw(amount)
        if expires_at is not None:
            c.add_lot(expires_at, amount)

    def _resolve(self, t: Transfer) -> TransferResult:
        post = bool(int(t.flags) & POST)
        at = micros(t.at)
        assert at is not None
        if t.related == 0:
            return R.PENDING_ID_REQUIRED
        h = self.holds.get(t.related)
        if h is None:
            return R.PENDING_NOT_FOUND
        if h.state == "posted":
            return R.PENDING_ALREADY_POSTED
        if h.state == "voided":
            return R.PENDING_ALREADY_VOIDED
        if h.state == "expired" or (h.deadline is not None and h.deadline <= at):
            return R.PENDING_EXPIRED
        if (
            (t.debit != 0 and t.debit != h.debit)
            or (t.credit != 0 and t.credit != h.credit)
            or (t.asset != 0 and t.asset != h.asset)
            or micros(t.timeout) != 0
            or (not post and t.amount != 0 and t.amount != h.amount)
        ):
            return R.PENDING_FIELDS_DIFFER
        if post and t.amount > h.amount:
            return R.PENDING_AMOUNT_EXCEEDED
        d = self.accounts[h.debit]
        c = self.accounts[h.credit]
        if post and (d.closed or c.closed):
            return R.ACCOUNT_CLOSED
        self._release(h)
        if post:
            # The posted credit keeps the hold's expiry (the post itself carries none here).
            self._move(d, c, t.amount or h.amount, h.expires_at)
            h.state = "posted"
        else:
            h.state = "voided"
        return R.OK

    def _release(self, h: Hold) -> None:
        self.accounts[h.debit].dpend -= h.amount
        self.accounts[h.credit].cpend -= h.amount

    # ---------------------------------------------------------------- expiry
    def expire(self, at: int, sink: int) -> int:
        """Lots ended at or before ``at`` (sink's asset) go to ``sink``; holds timed out are released.

        Reading taken where the docs are silent, in the order they are written: lots first (capped
        by ``available`` while a timed-out hold still counts), then every timed-out hold of any
        asset. The sink itself is skipped (a transfer may not debit and credit one account).
        """
        s = self.accounts[sink]
        written = 0
        for aid in sorted(self.accounts):
            a = self.accounts[aid]
            if aid == sink or a.asset != s.asset:
                continue
            due = sum(rem for exp, rem in a.lots if exp <= at)
            if a.flags & DMNEC:
                due = min(due, max(0, a.available))
            if due > 0:
                self._move(a, s, due, None)
                written += 1
        for h in self.holds.values():
            if h.state == "pending" and h.deadline is not None and h.deadline <= at:
                self._release(h)
                h.state = "expired"
                written += 1
        return written

    # ---------------------------------------------------------------- reading
    def balance(self, account_id: int) -> tuple[int, int, int, int, int]:
        a = self.accounts[account_id]
        return (a.dp, a.cp, a.dpend, a.cpend, a.available)

    def lots(self, account_id: int) -> list[tuple[int, int]]:
        return [(exp, rem) for exp, rem in self.accounts[account_id].lots]
