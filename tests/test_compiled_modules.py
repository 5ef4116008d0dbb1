"""What compiling the engine's and the ledger's modules (setup.py) must not change.

Compiled code has no bytecodes, between which the interpreter runs signal handlers and hands the GIL
to waiting threads, and no frames. So their long loops call ``_core.pause_point`` (without it, a Ctrl-C
during the replay of a long journal waited for the whole replay, and other threads waited too), and
their warnings name the host's line, not a frame counted from a place that does not exist.
"""

from __future__ import annotations

import signal
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, date, datetime, timedelta
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
def _signal_once(started: Callable[[], int]) -> Iterator[list[int]]:
    """SIGALRM every 0.2 ms; its handler raises _Stop the first time ``started()`` is not 0 (and stops
    the timer, and yields what ``started()`` said then); every other time it returns."""
    raised: list[int] = []

    def handler(signum: int, frame: object) -> None:
        if not raised and (at := started()):
            raised.append(at)
            signal.setitimer(signal.ITIMER_REAL, 0)
            raise _Stop

    old = signal.signal(signal.SIGALRM, handler)
    signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
    try:
        yield raised
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_signal_stops_the_journal_replay_midway_and_the_next_read_builds_the_state_again(
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
        with _signal_once(lambda: reader._seq) as stopped_at, pytest.raises(_Stop):
            reader.balance(2)                   # replays the journal to build the state
        assert 0 < stopped_at[0] < head         # stopped inside the replay, not after it
        assert reader._state is None            # and the half-built state is dropped
        assert reader.balance(2).credits_posted == ENTRIES      # the next read builds it again
        assert reader.verify().ok


def test_the_engines_long_loops_pause_for_signals_and_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once every 4,096 members or rows at least: opening (loading members), enroll_batch, expire (the
    birthday notices), purchase_batch (its receipts)."""
    program = Program.from_dict({"name": "a shop", "timezone": "UTC", "earn": {"points": 1, "per": 1000},
                                 "bonuses": {"birthday": {"points": 10, "within_days": 7}}})
    at = datetime(2026, 1, 1, tzinfo=UTC)
    n = 5_000
    with Engine.open(tmp_path / "club", program=program, sync="none") as club:
        for i in range(n):
            club.enroll(f"b{i}", at=at, birth_date=date(1990, 1, 5))
    calls: list[int] = []
    real = _core.pause_point

    def counted() -> None:
        calls.append(1)
        real()

    monkeypatch.setattr(_core, "pause_point", counted)

    def pauses(what: Callable[[], object]) -> int:
        calls.clear()
        what()
        return len(calls)

    club = Engine.open(tmp_path / "club", program=program, sync="none")
    try:
        assert pauses(lambda: Engine.open(tmp_path / "club2", program=program, sync="none").close()) == 0
        club.close()
        holder: list[Engine] = []
        assert pauses(lambda: holder.append(Engine.open(tmp_path / "club", program=program, sync="none"))) >= 2
        club = holder[0]
        assert pauses(lambda: club.enroll_batch([f"m{i}" for i in range(n)], at=at)) >= 3 * 2
        assert pauses(lambda: club.expire(at=at)) >= 2                    # 5,000 birthday notices
        assert len([e for e in club.events(limit=20_000) if e.kind == "birthday_soon"]) == n
        batch = {"member": [f"m{i}" for i in range(n)], "at": [at + timedelta(hours=1)] * n,
                 "amount": [50_000] * n, "ref": [f"p{i}" for i in range(n)]}
        assert pauses(lambda: club.purchase_batch(batch)) >= 2
        assert club.member("m4999").points == 50
    finally:
        club.close()


def test_a_warning_names_the_hosts_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The snapshot that fails after a commit warns at the caller's line (here), compiled or not."""
    with Ledger.open(tmp_path / "l", sync="none") as ledger:
        ledger.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])

        def no_room() -> None:
            raise OSError("no space for the snapshot")

        monkeypatch.setattr(ledger, "_write_snapshot", no_room)
        ledger._since_snapshot = 10**12
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            ledger.post([Transfer(id=1, debit=1, credit=2, amount=1, at=T0)])
        monkeypatch.undo()
    assert [w.category for w in seen] == [RuntimeWarning]
    assert "snapshot after a commit failed" in str(seen[0].message)
    assert seen[0].filename == __file__
