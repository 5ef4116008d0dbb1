"""The real ledger driven beside the pure-Python model of ``ledger_model.py`` (pyroaring's pattern).

Each step does one thing to both (post a batch, a chain, a retry, expire, close an account, reopen the
handle, ...), compares the answers, and then every account's balance and lots. Times are integer
microseconds from a clock that only moves forward, sometimes by days, so lots expire and holds time
out; transfers are sometimes back-dated and sometimes given as datetimes/timedeltas in another zone.

Cases docs/ledger.md leaves open are not generated (see the comments at ``POOL`` and in the rules), so
every mismatch is a disagreement with the written contract.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, TypeVar

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule
from ledger_model import (
    CLOSED,
    CMNED,
    DMNEC,
    I64_MAX,
    LINKED,
    PENDING,
    POST,
    VOID,
    AccountNotFound,
    LedgerModel,
    micros,
)

from loyalty_engine import Account, AccountFlags, Ledger, Transfer, TransferFlags
from loyalty_engine._core import ID_RUN_MIN
from loyalty_engine.errors import NotFoundError

SEC = 1_000_000
MIN = 60 * SEC
HOUR = 60 * MIN
DAY = 24 * HOUR
T0 = 1_767_225_600 * SEC  # 2026-01-01T00:00:00Z
TEHRAN = timezone(timedelta(hours=3, minutes=30))
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

M = AccountFlags.DEBITS_MUST_NOT_EXCEED_CREDITS
B = AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS
INITIAL = [
    # asset 0: members, system accounts, a budget account
    *(Account(id=i, asset=0, flags=M) for i in (1, 2, 3)),
    Account(id=10, asset=0),
    Account(id=11, asset=0, user_data=2**64 - 1),
    Account(id=20, asset=0, flags=B),
    # asset 1
    *(Account(id=i, asset=1, flags=M) for i in (101, 102)),
    Account(id=110, asset=1),
    # the expiry sinks: never in POOL, so they never hold lots nor get closed
    Account(id=30, asset=0),
    Account(id=130, asset=1),
    # a member and a system account that only move amounts near 2**63 between themselves, so
    # every balance stays in range whatever else happens (docs name OVERFLOW only for check 3)
    Account(id=40, asset=0, flags=M),
    Account(id=50, asset=0),
]
SINKS = {0: 30, 1: 130}
BIG_MEMBER, WHALE = 40, 50
#: Accounts ordinary transfers name: the initial ones, ids the create rule may or may not create, and
#: 999, never created.
POOL = (1, 2, 3, 4, 10, 11, 12, 20, 101, 102, 103, 110, 999)
CREATE_IDS = (0, 1, 3, 4, 10, 12, 20, 30, 40, 103, 110)
ALL_IDS = (*POOL, 30, 130, BIG_MEMBER, WHALE)

T = TypeVar("T")


def pick(data: Any, options: tuple[T, ...] | list[T], label: str) -> T:
    return data.draw(st.sampled_from(options), label=label)  # type: ignore[no-any-return]


def as_datetime(us: int) -> datetime:
    return (EPOCH + timedelta(microseconds=us)).astimezone(TEHRAN)


def with_datetimes(t: Transfer) -> Transfer:
    """The same transfer with its times as aware datetimes and a timedelta (same microseconds)."""
    at, exp, timeout = micros(t.at), micros(t.expires_at), micros(t.timeout)
    assert at is not None and timeout is not None
    return replace(
        t,
        at=as_datetime(at),
        expires_at=None if exp is None else as_datetime(exp),
        timeout=timedelta(microseconds=timeout),
    )


def describe(batch: list[Transfer], expected: list[Any], got: list[Any]) -> str:
    lines = []
    for t, e, g in zip(batch, expected, got, strict=True):
        mark = "  " if e == g else "!!"
        lines.append(f"{mark} model={e!r:<40} ledger={g!r:<40} {t!r}")
    return "results differ:\n" + "\n".join(lines)


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-sm-")
        self.path = os.path.join(self.dir, "sm.ledger")
        self.ledger = Ledger.open(self.path, sync="none")
        self.model = LedgerModel()
        self.now = T0
        self.last_id = 0
        self.history: list[Transfer] = []
        self.batches: list[list[Transfer]] = []
        self.pendings: dict[int, Transfer] = {}  # every PENDING transfer drawn, committed or not
        self.system_written = 0  # transfers expire() wrote

    # ------------------------------------------------------------------ drawing
    def fresh_id(self, data: Any) -> int:
        """A never-used id; some use the high 64 bits (but never all ones: reserved)."""
        self.last_id += 1
        c = self.last_id
        style = pick(data, (0, 0, 0, 1, 2), "id style")
        return (c, (c << 64) | c, (1 << 128) - (1 << 64) - 1 - c)[style]

    def draw_at(self, data: Any) -> int:
        return self.now - pick(data, (0, 0, 0, 0, 1, MIN, HOUR), "back-dated by")

    def draw_pair(self, data: Any) -> tuple[int, int, int]:
        """debit, credit, asset: mostly sensible, sometimes any ids at all."""
        acc = self.model.accounts
        live = [a for a in POOL if a in acc]
        members = [a for a in live if acc[a].flags & DMNEC]
        others = [a for a in live if not acc[a].flags & DMNEC]
        shape = pick(data, ("earn", "earn", "spend", "spend", "any", "random"), "shape")
        if shape == "random":
            debit = pick(data, POOL, "debit")
            credit = pick(data, POOL, "credit")
        else:
            first = pick(data, members if shape == "earn" else (others if shape == "spend" else live), "a")
            asset = acc[first].asset
            second_from = members if shape == "spend" else (others if shape == "earn" else live)
            second_from = [a for a in second_from if acc[a].asset == asset] or second_from
            second = pick(data, second_from, "b")
            debit, credit = (second, first) if shape == "earn" else (first, second)
        asset = acc[debit].asset if debit in acc else 0
        if pick(data, (False,) * 7 + (True,), "other asset"):
            asset = 1 - asset
        return debit, credit, asset

    def draw_amount(self, data: Any) -> int:
        size = pick(data, ("small",) * 4 + ("medium", "medium", "zero"), "amount size")
        if size == "zero":
            return 0
        return data.draw(st.integers(1, 30) if size == "small" else st.integers(31, 500), label="amount")

    def draw_expiry(self, data: Any, at: int) -> int | None:
        kind = pick(data, ("none", "none", "slot", "slot", "raw", "bad"), "expiry")
        if kind == "none":
            return None
        if kind == "slot":  # on the hour, so lots often merge
            return (at // HOUR + data.draw(st.integers(1, 72), label="hours")) * HOUR
        if kind == "raw":
            return at + data.draw(st.integers(1, 3 * DAY), label="expires in")
        return at - data.draw(st.integers(0, HOUR), label="expired before")

    def maybe_datetimes(self, data: Any, t: Transfer) -> Transfer:
        if pick(data, (False, False, False, True), "as datetimes"):
            return with_datetimes(t)
        return t

    def draw_create(self, data: Any, pending: bool) -> Transfer:
        debit, credit, asset = self.draw_pair(data)
        at = self.draw_at(data)
        if pending:
            timeout = pick(data, (0, 0, SEC, MIN, HOUR, DAY, -1), "timeout")
            if timeout == -1:
                timeout = data.draw(st.integers(1, 2 * DAY), label="timeout us")
        else:
            timeout = pick(data, (0,) * 9 + (SEC,), "timeout")
        t = Transfer(
            id=0 if pick(data, (False,) * 15 + (True,), "zero id") else self.fresh_id(data),
            debit=debit,
            credit=credit,
            amount=self.draw_amount(data),
            asset=asset,
            code=data.draw(st.integers(0, 12), label="code"),
            flags=TransferFlags.PENDING if pending else TransferFlags.NONE,
            at=at,
            expires_at=self.draw_expiry(data, at),
            timeout=timeout,
            user_data=pick(data, (0, 0, 1, 2**64 - 1), "user_data"),
        )
        if pending and t.id:
            self.pendings[t.id] = t
        return self.maybe_datetimes(data, t)

    def draw_resolution(self, data: Any, flag: int) -> Transfer:
        """A POST_PENDING / VOID_PENDING, mostly of a drawn pending, with right or wrong fields."""
        source = pick(data, ("pending",) * 6 + ("any", "zero", "unknown"), "related")
        if source == "pending" and self.pendings:
            related = pick(data, sorted(self.pendings), "pending id")
        elif source == "any" and self.history:
            related = pick(data, self.history, "any transfer").id
        elif source == "zero":
            related = 0
        else:
            related = self.fresh_id(data)
        held = self.pendings.get(related) or Transfer(id=0, debit=1, credit=10, amount=10, asset=0)
        h_amount = max(held.amount, 1)
        amount_kind = pick(data, ("zero", "zero", "held", "less", "more"), "amount")
        amount = {
            "zero": 0,
            "held": held.amount,
            "less": data.draw(st.integers(1, h_amount), label="less"),
            "more": min(h_amount + data.draw(st.integers(1, 5), label="more"), I64_MAX),
        }[amount_kind]

        def account(label: str, same: int) -> int:
            kind = pick(data, ("zero", "zero", "zero", "same", "other"), label)
            return {"zero": 0, "same": same, "other": pick(data, POOL, label + " id")}[kind]

        t = Transfer(
            id=0 if pick(data, (False,) * 15 + (True,), "zero id") else self.fresh_id(data),
            debit=account("debit", held.debit),
            credit=account("credit", held.credit),
            amount=amount,
            asset=pick(data, (0, 0, held.asset, 1 - held.asset), "asset"),
            code=data.draw(st.integers(0, 12), label="code"),
            flags=TransferFlags(flag),
            at=self.draw_at(data),
            related=related,
            timeout=pick(data, (0,) * 9 + (SEC,), "timeout"),
            user_data=pick(data, (0, 3), "user_data"),
        )
        return self.maybe_datetimes(data, t)

    def draw_retry(self, data: Any) -> Transfer:
        """A transfer sent before, as it was or with one field changed."""
        t = pick(data, self.history, "retry of")
        how = pick(
            data,
            ("same", "same", "datetimes", "amount", "code", "user_data", "at", "expires_at", "debit"),
            "changed",
        )
        at = micros(t.at)
        assert at is not None
        if how == "same":
            return t
        if how == "datetimes":
            return with_datetimes(t)
        if how == "expires_at" and t.flags & (POST | VOID):
            how = "user_data"  # not generated: what an expiry on a post or void means is not written
        changed: dict[str, Any] = {
            "amount": {"amount": t.amount ^ 1},  # stays within [0, 2**63 - 1]
            "code": {"code": t.code ^ 1},
            "user_data": {"user_data": t.user_data ^ 1},
            "at": {"at": at + 1},
            "expires_at": {"expires_at": at + DAY if t.expires_at is None else None},
            "debit": {"debit": 999 if t.debit != 999 else 1},
        }[how]
        return replace(t, **changed)

    def draw_transfer(self, data: Any) -> tuple[Transfer, bool]:
        """One transfer of any kind, and whether it is a retry (whose flags must stay as sent)."""
        kinds = ("plain",) * 4 + ("pending",) * 2 + ("post", "post", "void", "conflict")
        kind = pick(data, kinds + (("retry",) if self.history else ()), "kind")
        if kind == "retry":
            return self.draw_retry(data), True
        if kind == "plain":
            return self.draw_create(data, pending=False), False
        if kind == "pending":
            return self.draw_create(data, pending=True), False
        if kind in ("post", "void"):
            return self.draw_resolution(data, POST if kind == "post" else VOID), False
        t = self.draw_create(data, pending=False)
        flags = pick(data, (PENDING | POST, PENDING | VOID, POST | VOID, PENDING | POST | VOID), "flags")
        return replace(t, flags=TransferFlags(flags)), False

    # ------------------------------------------------------------------ doing
    def post(self, batch: list[Transfer]) -> None:
        expected = self.model.post(batch)
        got = self.ledger.post(batch)
        self.history.extend(batch)
        self.batches.append(batch)
        assert list(got) == expected, describe(batch, expected, list(got))

    @initialize()
    def create_initial_accounts(self) -> None:
        expected = self.model.create_accounts(INITIAL)
        assert expected == [0] * len(INITIAL)
        assert self.ledger.create_accounts(INITIAL) == expected

    @rule(data=st.data())
    def tick(self, data: Any) -> None:
        self.now += pick(data, (1, SEC, MIN, HOUR, 6 * HOUR, DAY, 3 * DAY), "clock advances by")

    @rule(data=st.data(), n=st.integers(1, 6))
    def post_batch(self, data: Any, n: int) -> None:
        """Mixed transfers; some carry LINKED, so chains (and an open chain at the end) form by chance."""
        batch = []
        for _ in range(n):
            t, retry = self.draw_transfer(data)
            if not retry and pick(data, (False, False, True), "linked"):
                t = replace(t, flags=t.flags | TransferFlags.LINKED)
            batch.append(t)
        self.post(batch)

    @rule(data=st.data(), n=st.integers(2, 4))
    def post_chain(self, data: Any, n: int) -> None:
        """One chain of n transfers (left open at the end of the batch now and then)."""
        batch = [self.draw_transfer(data)[0] for _ in range(n)]
        open_chain = pick(data, (False,) * 5 + (True,), "leave open")
        linked = [True] * (n - 1) + [open_chain]
        batch = [
            replace(t, flags=(t.flags | LINKED) if ln else (t.flags & ~TransferFlags.LINKED))
            for t, ln in zip(batch, linked, strict=True)
        ]
        self.post(batch)

    @rule(data=st.data(), n=st.integers(ID_RUN_MIN - 2, ID_RUN_MIN + 40), stride=st.sampled_from((1, 2, 256)))
    def post_run(self, data: Any, n: int, stride: int) -> None:
        """A bulk batch whose ids step by a constant stride, as an import's do (the ledger keeps such ids
        as runs, not a table entry each): some of its transfers fail (a zero amount, or more than the
        debit holds), which breaks the run; a few at the end repeat one before them, as sent or changed.
        Later retries (retry_batch, a retry in post_batch) and a reopened handle look them up again."""
        first = self.last_id + 1
        self.last_id += n * stride
        hi = pick(data, (0, 0, 5), "id high bits") << 64
        debit, credit, asset = self.draw_pair(data)
        amounts = data.draw(st.lists(st.integers(0, 40), min_size=n, max_size=n), label="amounts")
        batch = [Transfer(id=hi | (first + k * stride), debit=debit, credit=credit, amount=amounts[k], asset=asset,
                          code=7, at=self.now) for k in range(n)]
        for _ in range(pick(data, (0, 0, 1, 3), "repeats")):
            t = batch[data.draw(st.integers(0, n - 1), label="repeat of")]
            batch.append(t if pick(data, (True, False), "as sent") else replace(t, amount=t.amount ^ 1))
        self.post(batch)

    @precondition(lambda self: bool(self.batches))
    @rule(data=st.data())
    def retry_batch(self, data: Any) -> None:
        """A whole earlier batch again: every transfer that went through answers EXISTS."""
        batch = pick(data, self.batches, "batch")
        if pick(data, (False, True), "as datetimes"):
            batch = [with_datetimes(t) for t in batch]
        self.post(list(batch))

    @rule(data=st.data())
    def post_big(self, data: Any) -> None:
        """Amounts near 2**63 between BIG_MEMBER and WHALE only: EXCEEDS_CREDITS and OVERFLOW edges."""
        amount = data.draw(
            st.one_of(
                st.sampled_from((I64_MAX, I64_MAX - 1, 1 << 62, (1 << 62) + 1, 1 << 61)),
                st.integers(1, I64_MAX),
            ),
            label="amount",
        )
        direction = pick(data, ("in", "in", "out", "hold"), "direction")
        debit, credit = (WHALE, BIG_MEMBER) if direction == "in" else (BIG_MEMBER, WHALE)
        t = Transfer(
            id=self.fresh_id(data),
            debit=debit,
            credit=credit,
            amount=amount,
            asset=0,
            code=1,
            flags=TransferFlags.PENDING if direction == "hold" else TransferFlags.NONE,
            at=self.now,
            timeout=pick(data, (0, HOUR), "timeout") if direction == "hold" else 0,
        )
        if direction == "hold":
            self.pendings[t.id] = t
        self.post([t])

    @rule(data=st.data())
    def expire(self, data: Any) -> None:
        asset = pick(data, (0, 1), "asset")
        at = self.now - pick(data, (0, 0, HOUR), "at before now")
        given: int | datetime = as_datetime(at) if pick(data, (False, True), "as datetime") else at
        expected = self.model.expire(at, SINKS[asset])
        got = self.ledger.expire(given, SINKS[asset])
        self.system_written += expected
        assert got == expected, f"expire({at}, {SINKS[asset]}) wrote {got} transfers, model {expected}"

    @rule(data=st.data(), n=st.integers(1, 3))
    def create_accounts(self, data: Any, n: int) -> None:
        batch = []
        exists = set(self.model.accounts)
        for _ in range(n):
            a = Account(
                id=pick(data, CREATE_IDS, "id"),
                asset=pick(data, (0, 1), "asset"),
                flags=AccountFlags(pick(data, (0, DMNEC, DMNEC, CMNED, DMNEC | CMNED, CLOSED), "flags")),
                user_data=pick(data, (0, 5), "user_data"),
            )
            bad_flags = bool((a.flags & DMNEC and a.flags & CMNED) or a.flags & CLOSED)
            closed = a.id in self.model.accounts and self.model.accounts[a.id].closed
            # Not generated: the docs give no order between the flag check and EXISTS, nor say
            # whether EXISTS looks at CLOSED.
            if a.id in exists and (bad_flags or closed):
                continue
            if a.id and not bad_flags:
                exists.add(a.id)
            batch.append(a)
        expected = self.model.create_accounts(batch)
        got = self.ledger.create_accounts(batch)
        assert list(got) == expected, f"{batch}: ledger {got}, model {expected}"

    @rule(data=st.data(), close=st.booleans())
    def close_or_reopen(self, data: Any, close: bool) -> None:
        ids = data.draw(st.lists(st.sampled_from(POOL + (BIG_MEMBER,)), min_size=1, max_size=3), label="ids")
        try:
            (self.model.close_accounts if close else self.model.reopen_accounts)(ids)
        except AccountNotFound:
            with pytest.raises(NotFoundError):
                (self.ledger.close_accounts if close else self.ledger.reopen_accounts)(ids)
        else:
            (self.ledger.close_accounts if close else self.ledger.reopen_accounts)(ids)

    @rule()
    def reopen_handle(self) -> None:
        self.ledger.close()
        self.ledger = Ledger.open(self.path, sync="none")

    @rule()
    def verify(self) -> None:
        self.check_verify()

    def check_verify(self) -> None:
        report = self.ledger.verify()
        assert report.ok, report.problems
        assert report.problems == []
        committed = len(self.model.transfers) + self.system_written
        assert report.transfers == committed, f"verify replayed {report.transfers}, committed {committed}"

    # ------------------------------------------------------------------ comparing
    @invariant()
    def agrees_with_model(self) -> None:
        fields = ("debits_posted", "credits_posted", "debits_pending", "credits_pending", "available")
        rows = self.ledger.balances(np.array(ALL_IDS, dtype=np.uint64))
        totals: dict[int, list[int]] = {}
        for aid, row in zip(ALL_IDS, rows, strict=True):
            assert int(row["id"]) == aid
            if aid not in self.model.accounts:
                assert not row["found"], f"account {aid} was never created, balances() found it"
                continue
            want = self.model.balance(aid)
            b = self.ledger.balance(aid)
            got = tuple(getattr(b, f) for f in fields)
            assert got == want, f"balance({aid}) = {got}, model {want} ({', '.join(fields)})"
            assert row["found"]
            assert tuple(int(row[f]) for f in fields) == want, f"balances() row of {aid}: {row}, model {want}"
            lots = [tuple(lot) for lot in self.ledger.lots(aid)]
            assert lots == self.model.lots(aid), f"lots({aid}) = {lots}, model {self.model.lots(aid)}"
            t = totals.setdefault(self.model.accounts[aid].asset, [0, 0])
            t[0] += b.credits_posted - b.debits_posted
            t[1] += b.credits_pending - b.debits_pending
        for asset, (posted, pending) in totals.items():
            assert posted == 0 and pending == 0, f"asset {asset} does not balance: {posted}, {pending}"

    def teardown(self) -> None:
        try:
            self.check_verify()
        finally:
            self.ledger.close()
            shutil.rmtree(self.dir, ignore_errors=True)


LedgerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("LEDGER_SM_EXAMPLES", "80")),
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
TestLedgerStateMachine = LedgerMachine.TestCase
