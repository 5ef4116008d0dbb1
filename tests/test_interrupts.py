"""A signal (Ctrl-C) reaches the long loops of the engine's and the ledger's modules.

They are compiled (setup.py), and compiled code has no bytecodes between which the interpreter would
run signal handlers; so those loops call ``_core.check_interrupt``. Without it, a Ctrl-C during the
replay of a long journal would wait for the whole replay.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest

from loyalty_engine import Account, Ledger, Transfer, _core
from loyalty_engine import ledger as ledger_module
from loyalty_engine.engine import Engine
from loyalty_engine.program import Program

T0 = 1_767_225_600_000_000
ENTRIES = 20_000        # journal entries of one transfer each (fewer than a snapshot waits for)


class _Stop(Exception):
    """What the test's signal handler raises."""


@contextmanager
def _signal_once(started: Callable[[], bool]) -> Iterator[None]:
    """SIGALRM every 0.2 ms; its handler raises _Stop once ``started()`` (before that it returns)."""

    def handler(signum: int, frame: object) -> None:
        if started():
            raise _Stop

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_signal_stops_the_journal_replay_midway_and_the_next_read_finishes_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "l"
    with Ledger.open(path, sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        for i in range(ENTRIES):
            ledger.post([Transfer(id=i + 1, debit=1, credit=2, amount=1, at=T0 + i)])
        head = ledger._seq
    with Ledger.open(path, sync="none") as reader:
        # build the state again from the journal alone (closing the writer wrote a snapshot at its head)
        monkeypatch.setattr(ledger_module, "_read_snapshot", lambda txn, db: None)
        reader._reset()
        with _signal_once(lambda: reader._seq > 0), pytest.raises(_Stop):
            reader.balance(2)                   # replays the journal to build the state
        assert 0 < reader._seq < head           # stopped inside the replay, not after it
        assert reader.balance(2).credits_posted == ENTRIES      # the next read replays the rest
        assert reader.verify().ok


def test_opening_an_engine_checks_for_signals_while_it_loads_members(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    program = Program.from_dict({"name": "a shop", "timezone": "UTC", "earn": {"points": 1, "per": 1000}})
    at = datetime(2026, 1, 1, tzinfo=UTC)
    with Engine.open(tmp_path / "club", program=program, sync="none") as club:
        club.enroll_batch([f"m{i}" for i in range(20_000)], at=at)
    calls = []
    real = _core.check_interrupt

    def counted() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(_core, "check_interrupt", counted)
    with Engine.open(tmp_path / "club", program=program, sync="none") as club:
        assert club.member("m19999").points == 0
    assert len(calls) >= 20_000 // 0x1000      # once every 4,096 members at least
