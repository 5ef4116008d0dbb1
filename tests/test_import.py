"""Bulk import of sales history: sources, checks and quarantine, enrolment, order, returns, idempotency,
resuming after SIGKILL, and equality with the one-purchase-at-a-time path."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from loyalty_engine.bulk_import import convert_amounts, convert_times
from loyalty_engine.engine import Engine, credit_account, points_account
from loyalty_engine.errors import ValidationError
from loyalty_engine.program import Program
from loyalty_engine.progress import Progress
from loyalty_engine.types import TransferResult

ROOT = Path(__file__).resolve().parent.parent
CLUB = ROOT / "examples" / "customer_club" / "program.toml"
CDNOW = ROOT / "examples" / "cdnow_club" / "program.toml"
MASTER = ROOT / "src" / "loyalty_engine" / "data" / "CDNOW_master.txt.gz"
T0 = 1_767_225_600_000_000          # 2026-01-01T00:00Z in µs
DAY = 86_400_000_000


def history(n: int, members: int, seed: int = 3) -> pa.Table:
    """``n`` sales by ``members`` members over a year, in time order, with refs and categories."""
    rng = np.random.default_rng(seed)
    at = np.sort(rng.integers(T0, T0 + 365 * DAY, n))
    return pa.table({
        "customer": pa.array([f"c{m}" for m in rng.integers(0, members, n)]),
        "sold_at": pa.array(at, pa.timestamp("us", tz="UTC")),
        "total": rng.integers(20_000, 3_000_000, n),
        "receipt": pa.array([f"r{i}" for i in range(n)]),
        "category": pa.array(rng.choice(["cosmetics", "grocery", "toys"], n)),
    })


MAP = {"member": "customer", "at": "sold_at", "amount": "total", "ref": "receipt", "category": "category"}


def balances(engine: Engine) -> dict[str, tuple[int, int, str]]:
    out = {}
    for name, idx in engine._names.items():
        out[name] = (engine.ledger.balance(points_account(idx)).available,
                     engine.ledger.balance(credit_account(idx)).available,
                     engine.program.tier_name(int(engine._members[idx]["tier"])))
    return out


def clean_balances(tmp_path: Path, prog: Program, source: Any) -> dict[str, tuple[int, int, str]]:
    """The balances of one clean import of ``source`` (chunks of 1,000, import id "x") in a club of its own."""
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        eng.import_sales(source, columns=MAP, chunk_rows=1_000, import_id="x")
        return balances(eng)


def lots_by_expiry(engine: Engine) -> dict[tuple[str, int], int]:
    out: dict[tuple[str, int], int] = defaultdict(int)
    for name, idx in engine._names.items():
        for expires, remaining in engine.ledger.lots(points_account(idx)):
            out[(name, expires)] += remaining
    return dict(out)


def import_failing_at_commit(eng: Engine, source: Any, commit: int, check: Any = None, **kw: Any) -> int:
    """Import ``source`` with the ``commit``-th transaction failing (a disk error, say): one transaction
    a chunk, its enrolments included. ``check(entries)`` looks at that transaction first. Returns the
    transactions tried."""
    real = eng.ledger._entries_with
    calls = {"n": 0}

    def failing(entries: Any, extra: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == commit:
            if check is not None:
                check(entries)
            raise OSError("disk full")
        return real(entries, extra)

    eng.ledger._entries_with = failing
    try:
        with pytest.raises(OSError):
            eng.import_sales(source, columns=MAP, chunk_rows=1_000, **kw)
    finally:
        eng.ledger._entries_with = real
    return calls["n"]


# -- the real data, in its real format --------------------------------------------------------------------

def test_cdnow_master_imports_in_its_real_format(tmp_path: Path) -> None:
    prog = Program.from_toml(CDNOW)
    q = tmp_path / "rejected.csv"
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        rep = eng.import_sales(MASTER, columns={"member": "customer_id", "at": "date", "amount": "dollar_value"},
                               time_format="%Y%m%d", tz="America/New_York", scale=2, quarantine=q)
        assert (rep.rows_read, rep.sales_posted, rep.rows_rejected) == (69_659, 69_579, 80)
        assert rep.reasons == {"the amount is zero": 80}
        assert rep.members_enrolled == eng.members == 23_502
        assert eng.ledger.verify().ok
        # points issued = what the ledger's issuer account paid out
        assert eng.ledger.balance(1).debits_posted == rep.points_issued
        # a known customer: 00001 bought once, $11.77 on 1997-01-01 -> 11 points + the welcome basket's 50
        assert eng.ledger.balance(points_account(eng._names["00001"])).available == 11 + 50
    as_text = {"customer_id": pa.string(), "dollar_value": pa.string(), "date": pa.string()}
    t = pacsv.read_csv(q, convert_options=pacsv.ConvertOptions(column_types=as_text))
    assert t.num_rows == 80
    assert set(t.column("reason").to_pylist()) == {"the amount is zero"}
    # each rejected row names its file and row: the row is the data line after the header
    import gzip
    lines = gzip.decompress(MASTER.read_bytes()).decode().splitlines()
    for row, cust, value in zip(t.column("row").to_pylist()[:5], t.column("customer_id").to_pylist()[:5],
                                t.column("dollar_value").to_pylist()[:5], strict=True):
        fields = lines[row].split()
        assert fields[0] == cust and fields[3] == value == "0.00"


# -- the same answer as one purchase at a time ------------------------------------------------------------

def test_import_gives_the_same_ledger_as_purchase_batch(tmp_path: Path) -> None:
    prog = Program.from_toml(CLUB)
    t = history(6_000, 300)
    with Engine.open(tmp_path / "a", program=prog, sync="none") as a:
        rep = a.import_sales(t, columns=MAP, chunk_rows=1_000)
        assert rep.sales_posted == 6_000 and rep.rows_rejected == 0 and rep.chunks == 6
        got, got_lots = balances(a), lots_by_expiry(a)
        assert a.ledger.verify().ok
    with Engine.open(tmp_path / "b", program=prog, sync="none") as b:
        names = t.column("customer").to_pylist()
        at = t.column("sold_at").cast(pa.int64()).to_numpy()
        first: dict[str, int] = {}
        for m, x in zip(names, at.tolist(), strict=True):
            first.setdefault(m, x)
        b.enroll_batch(list(first), at=np.array(list(first.values()), np.int64))
        res = b.purchase_batch(pa.table({"member": names, "at": t.column("sold_at"), "amount": t.column("total"),
                                         "ref": t.column("receipt"), "category": t.column("category")}))
        assert (res.column("status").to_numpy() == 0).all()
        assert balances(b) == got
        assert lots_by_expiry(b) == got_lots
    assert rep.points_issued == sum(v[0] for v in got.values()) - 20 * len(got)   # less sign-up bonuses


# -- bad rows ---------------------------------------------------------------------------------------------

BAD_CSV = """customer,sold_at,total,receipt,kind,original
alice,2026-01-02 10:00:00+00:00,100000,a1,sale,
,2026-01-02 10:00:00+00:00,100000,a2,sale,
bob,yesterday,100000,a3,sale,
bob,2026-01-02 10:00:00,100000,a4,sale,
bob,2026-01-02 11:00:00+00:00,-5,a5,sale,
bob,2026-01-02 11:00:00+00:00,12x,a6,sale,
bob,2026-01-02 11:00:00+00:00,12.5,a7,sale,
bob,2026-01-02 11:00:00+00:00,inf,a8,sale,
bob,2026-01-02 12:00:00+00:00,200000,a1,sale,
bob,2026-01-02 12:00:00+00:00,200000,a9,gift,
bob,2026-01-02 12:00:00+00:00,200000,a10,sale,,,
alice,2026-01-03 12:00:00+00:00,40000,a11,return,
alice,2026-01-03 12:00:00+00:00,40000,a12,return,zzz
alice,2026-01-03 12:00:00+00:00,400000,a13,return,a1
alice,2026-01-03 12:00:00+00:00,-40000,a14,return,a1
bob,2026-01-04 12:00:00+00:00,0,a15,sale,
carol,2026-01-04 12:00:00+00:00,300000,a16,sale,
"""

EXPECTED_REASONS = {   # data rows, counted from 1 after the header
    2: "no member", 3: "the time cannot be read", 4: "the time has no timezone", 5: "a negative amount",
    6: "the amount is not a number", 7: "more decimals than the stated scale", 8: "not a finite number",
    9: "the same ref appears earlier", 10: "unknown kind", 11: "a malformed line",
    12: "a return without the ref", 13: "whose original purchase is unknown",
    14: "larger than what is left", 16: "the amount is zero",
}


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bad_rows_are_quarantined_with_file_row_values_and_reason(tmp_path: Path, fmt: str) -> None:
    src = tmp_path / "sales.csv"
    src.write_text(BAD_CSV)
    q = tmp_path / f"rejected.{fmt}"
    with Engine.open(tmp_path / "club", program=Program.from_toml(CLUB), sync="none") as eng:
        rep = eng.import_sales(src, columns={"member": "customer", "at": "sold_at", "amount": "total",
                                             "ref": "receipt", "kind": "kind", "original": "original"},
                               quarantine=q)
        assert rep.rows_read == 17
        assert rep.sales_posted == 2          # alice's a1 and carol's a16
        assert rep.returns_posted == 1        # a14: 40,000 of a1 (a negative amount on a return is fine)
        assert rep.rows_rejected == 14
        assert rep.rows_posted + rep.rows_rejected == rep.rows_read
        assert eng.members == 2 and "bob" not in eng._names     # bob had no good sale
        assert eng.receipt("a1").amount == 100_000
        assert eng.ledger.verify().ok
    t = pq.read_table(q) if fmt == "parquet" else pacsv.read_csv(
        q, convert_options=pacsv.ConvertOptions(column_types={c: pa.string() for c in
                                                              ("customer", "total", "receipt", "original")}))
    got = dict(zip(t.column("row").to_pylist(), t.column("reason").to_pylist(), strict=True))
    assert set(got) == set(EXPECTED_REASONS)
    for row, words in EXPECTED_REASONS.items():
        assert words in got[row], (row, got[row])
        assert t.column("file").to_pylist()[0] == str(src)
    values = dict(zip(t.column("row").to_pylist(), t.column("total").to_pylist(), strict=True))
    assert values[6] == "12x" and values[5] == "-5"
    lines = dict(zip(t.column("row").to_pylist(), t.column("line").to_pylist(), strict=True))
    assert lines[11].startswith("bob,") and "a10" in lines[11]


def test_conversions_are_exact_and_name_what_is_wrong() -> None:
    amt, why = convert_amounts(pa.array(["11.77", "0.5", "3", " 1,234.50 ", "1.234", "", None, "nan"]), 2)
    assert amt[:4].tolist() == [1177, 50, 300, 123450]
    assert why.tolist()[:4] == [0, 0, 0, 0] and all(why[4:] > 0)
    amt, why = convert_amounts(pa.array([19.99, 0.1 + 0.2, float("inf")]), 2)
    assert amt.tolist()[:2] == [1999, 30] and why[2] > 0
    amt, why = convert_amounts(pa.array([5, 7], pa.int32()), 0)
    assert amt.tolist() == [5, 7]
    us, why = convert_times(pa.array(["2026-03-21T10:30:00+03:30", "2026-03-21 07:00:00", "21/03/2026"]),
                            tz="UTC", time_format=None)
    seven_utc = int(datetime(2026, 3, 21, 7, tzinfo=UTC).timestamp()) * 1_000_000
    assert us[0] == us[1] == seven_utc and why.tolist() == [0, 0, 4]
    us, why = convert_times(pa.array(["19970101"]), tz="America/New_York", time_format="%Y%m%d")
    assert us[0] == int(datetime(1997, 1, 1, 5, tzinfo=UTC).timestamp()) * 1_000_000 and why[0] == 0
    with pytest.raises(ValidationError, match="numbers are ambiguous"):
        convert_times(pa.array([1, 2]), tz="UTC", time_format=None)


def test_mapping_errors_name_the_field_and_the_columns(tmp_path: Path) -> None:
    t = history(10, 3)
    with Engine.open(tmp_path / "club", program=Program.from_toml(CLUB), sync="none") as eng:
        with pytest.raises(ValidationError, match="required field 'member'.*customer"):
            eng.import_sales(t, columns={"at": "sold_at", "amount": "total"})
        with pytest.raises(ValidationError, match="unknown field.*'price'"):
            eng.import_sales(t, columns={**MAP, "price": "total"})
        with pytest.raises(ValidationError, match="no column for amount=nope"):
            eng.import_sales(t, columns={**MAP, "amount": "nope"})
        with pytest.raises(ValidationError, match="no such file"):
            eng.import_sales(tmp_path / "missing.parquet", columns=MAP)
        with pytest.raises(ValidationError, match="tz='Mars/Base'"):
            eng.import_sales(t, columns=MAP, tz="Mars/Base")
        assert eng.members == 0


# -- members and order --------------------------------------------------------------------------------------

def test_unknown_members_are_enrolled_at_their_first_purchase_unless_told_not_to(tmp_path: Path) -> None:
    t = history(500, 20)
    with Engine.open(tmp_path / "a", program=Program.from_toml(CLUB), sync="none") as eng:
        eng.enroll("c1", at=T0 - DAY)
        rep = eng.import_sales(t, columns=MAP, enroll=False)
        assert rep.members_enrolled == 0
        n_c1 = int(np.sum(np.array(t.column("customer").to_pylist()) == "c1"))
        assert rep.sales_posted == n_c1 and rep.rows_rejected == 500 - n_c1
        assert rep.reasons == {"an unknown member (the import was told not to enroll: enroll=False)": 500 - n_c1}
    with Engine.open(tmp_path / "b", program=Program.from_toml(CLUB), sync="none") as eng:
        rep = eng.import_sales(t, columns=MAP)
        assert rep.members_enrolled == 20
        first = t.filter(pa.compute.equal(t.column("customer"), "c7")).column("sold_at")[0].as_py()
        assert eng.member("c7").enrolled == first.astimezone(eng.program.zone).date()


def test_a_null_member_is_quarantined_like_an_empty_one(tmp_path: Path) -> None:
    """A null (not an empty string) in the member column of a Parquet or Arrow source; an all-null
    chunk too."""
    t = history(300, 10)
    names = t.column("customer").to_pylist()
    names[5] = names[17] = None
    names[9] = ""
    t = t.set_column(0, "customer", pa.array(names, pa.string()))
    with Engine.open(tmp_path / "a", program=Program.from_toml(CLUB), sync="none") as eng:
        rep = eng.import_sales(t, columns=MAP)
        assert rep.rows_rejected == 3 and rep.reasons == {"no member (the value is empty)": 3}
        assert rep.sales_posted == 297
        nulls = t.slice(0, 20).set_column(0, "customer", pa.nulls(20, pa.string()))
        rep = eng.import_sales(nulls, columns=MAP, import_id="all null")
        assert rep.rows_rejected == 20 and rep.members_enrolled == 0
        # integer member ids (named by their text), a null among them
        ints = t.slice(0, 30).set_column(0, "customer", pa.array([i % 7 - 3 if i != 4 else None for i in range(30)],
                                                                 pa.int64()))
        rep = eng.import_sales(ints, columns=MAP, import_id="ints")
        assert rep.rows_rejected == 1 and rep.members_enrolled == 7
        assert sorted(m for m in eng._names if m.lstrip("-").isdigit()) == ["-1", "-2", "-3", "0", "1", "2", "3"]


def test_rows_older_than_the_members_last_purchase_are_quarantined_not_evaluated_out_of_order(tmp_path: Path) -> None:
    t = history(3_000, 30)
    # move the first 100 rows (the oldest) to the end: they arrive after later purchases were imported
    idx = np.r_[100:3_000, 0:100]
    shuffled = t.take(pa.array(idx))
    q = tmp_path / "q.parquet"
    with Engine.open(tmp_path / "club", program=Program.from_toml(CLUB), sync="none") as eng:
        rep = eng.import_sales(shuffled, columns=MAP, chunk_rows=1_000, quarantine=q)
        assert rep.rows_rejected == 100
        assert list(rep.reasons) == ["a purchase dated before the member's last one (purchases go in time order)"]
    bad = pq.read_table(q)
    assert sorted(bad.column("row").to_pylist()) == list(range(2_901, 3_001))


# -- returns -------------------------------------------------------------------------------------------------

def test_returns_take_back_the_share_of_their_original(tmp_path: Path) -> None:
    prog = Program.from_toml(CLUB)
    t = pa.table({"m": ["x", "x", "x", "y"],
                  "at": pa.array([T0, T0 + DAY, T0 + 2 * DAY, T0 + 3 * DAY], pa.timestamp("us", tz="UTC")),
                  "amount": [1_000_000, 400_000, 500_000, 300_000],
                  "ref": ["s1", "s2", "r1", "s3"], "kind": ["sale", "sale", "return", "sale"],
                  "orig": [None, None, "s1", None]})
    cols = {"member": "m", "at": "at", "amount": "amount", "ref": "ref", "kind": "kind", "original": "orig"}
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        rep = eng.import_sales(t, columns=cols)
        assert (rep.sales_posted, rep.returns_posted, rep.rows_rejected) == (3, 1, 0)
        earned = eng.receipt("s1").points_earned
        assert rep.points_clawed_back == earned // 2 > 0
        assert eng.ledger.verify().ok


# -- idempotency and resuming ----------------------------------------------------------------------------

def test_the_same_source_twice_posts_nothing_the_second_time(tmp_path: Path) -> None:
    src = tmp_path / "sales.parquet"
    pq.write_table(history(2_000, 50), src, row_group_size=700)
    with Engine.open(tmp_path / "club", program=Program.from_toml(CLUB), sync="none") as eng:
        first = eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        before = balances(eng)
        head = eng.ledger.head
        again = eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        assert first.sales_posted == 2_000
        assert again.already_imported and again.rows_posted == 0
        assert balances(eng) == before and eng.ledger.head == head


def test_sources_parquet_ipc_csv_directory_and_glob_agree(tmp_path: Path) -> None:
    t = history(1_500, 40)
    d = tmp_path / "src"
    d.mkdir()
    pq.write_table(t.slice(0, 500), d / "a.parquet")
    with ipc.new_file(d / "b.arrow", t.schema) as w:
        w.write_table(t.slice(500, 500))
    pacsv.write_csv(t.slice(1_000), d / "c.csv")
    results = []
    for k, source in enumerate([t, d, str(d / "*.*")]):
        with Engine.open(tmp_path / f"club{k}", program=Program.from_toml(CLUB), sync="none") as eng:
            rep = eng.import_sales(source, columns=MAP, chunk_rows=1_000)
            assert rep.sales_posted == 1_500, rep.summary()
            results.append(balances(eng))
    assert results[0] == results[1] == results[2]


def test_a_stopped_import_needs_resume_and_then_finishes(tmp_path: Path) -> None:
    prog = Program.from_toml(CLUB)
    src = tmp_path / "sales.parquet"
    pq.write_table(history(5_000, 100), src)
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        clean = balances(eng)
    path = tmp_path / "club"
    with Engine.open(path, program=prog, sync="none") as eng:
        assert import_failing_at_commit(eng, src, 3) == 3
        members = eng.members            # without the ones the failed chunk would have enrolled
    with Engine.open(path, program=prog, sync="none") as eng:
        assert eng.members == members
    with Engine.open(path, program=prog, sync="none") as eng:
        with pytest.raises(ValidationError, match="resume=True"):
            eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        rep = eng.import_sales(src, columns=MAP, chunk_rows=1_000, resume=True)
        assert rep.resumed_from_row > 0
        assert balances(eng) == clean
        assert eng.ledger.verify().ok


def test_a_failed_chunk_leaves_neither_its_enrolments_nor_its_evaluation_behind(tmp_path: Path) -> None:
    """The members a chunk enrolls commit with the chunk: when its transaction fails, the engine's
    memory is as before the chunk (no new names, the members' state as it was), and a resume gives
    the clean ledger."""
    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    clean = clean_balances(tmp_path, prog, t)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        def enrolls(entries: Any) -> None:
            assert entries[0][1].dtype != entries[-1][1].dtype      # the chunk enrolls members

        import_failing_at_commit(eng, t, 2, enrolls, import_id="x")
        members, state = eng.members, eng._members[: eng.members].copy()
        hist = dict(eng._hist)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert eng.members == members and len(eng._names) == members
        assert eng._members[: members].tobytes() == state.tobytes()
        assert {k: v for k, v in eng._hist.items() if v} == {k: v for k, v in hist.items() if v}
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert balances(eng) == clean
        assert eng.ledger.verify().ok


def _memory(eng: Engine) -> tuple[Any, ...]:
    """The engine's memory of its members: names, state, offer use, budget spent and histories."""
    n = eng.members
    return (dict(eng._names), list(eng._member_names[:n]), eng._members[:n].tobytes(), eng._offer_use[:n].tobytes(),
            eng._budget.tobytes(), {k: v for k, v in eng._hist.items() if v})


class _InterruptedSubmit(ThreadPoolExecutor):
    """A writer pool whose second hand-over is interrupted (a Ctrl-C) after the work was queued: the work
    runs and commits."""

    calls = 0

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        f = super().submit(fn, *args, **kwargs)
        type(self).calls += 1
        if type(self).calls == 2:
            raise KeyboardInterrupt
        return f


def test_an_interrupt_while_a_chunk_is_handed_to_the_writer_keeps_what_commits(tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C inside the hand-over of chunk 2 to the writer, after the work was queued: chunk 2 commits,
    so it stays in memory (memory equals a reopen's), and a resume in the same engine gives the clean
    run's ledger and members."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(3_000, 50)
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        clean, clean_memory = balances(eng), _memory(eng)
    _InterruptedSubmit.calls = 0
    monkeypatch.setattr(bulk, "ThreadPoolExecutor", _InterruptedSubmit)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        with pytest.raises(KeyboardInterrupt):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        interrupted = _memory(eng)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert _memory(eng) == interrupted
        monkeypatch.setattr(bulk, "ThreadPoolExecutor", ThreadPoolExecutor)
        rep = eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert rep.resumed_from_row == 2_000
        assert balances(eng) == clean and _memory(eng) == clean_memory


def test_a_second_interrupt_while_waiting_for_the_writer_still_takes_a_failed_chunk_out(tmp_path: Path,
                                                                                        monkeypatch) -> None:
    """Ctrl-C twice: the first stops chunk 3 while chunk 2 commits, the second lands while the import
    waits for that commit, which then fails. Chunk 2 is still taken out of memory: memory equals a
    reopen's."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    state = {"armed": False, "commits": 0, "transfers": 0}
    real_wait, real_transfers = bulk.wait, bulk._Importer._transfers

    def wait(*args: Any, **kwargs: Any) -> Any:
        if state["armed"]:
            state["armed"] = False
            raise KeyboardInterrupt("second Ctrl-C")
        return real_wait(*args, **kwargs)

    def transfers(self: Any, *args: Any) -> Any:
        state["transfers"] += 1
        if state["transfers"] == 3:
            state["armed"] = True
            raise KeyboardInterrupt("first Ctrl-C")
        return real_transfers(self, *args)

    monkeypatch.setattr(bulk, "wait", wait)
    monkeypatch.setattr(bulk._Importer, "_transfers", transfers)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        real = eng.ledger._entries_with

        def failing(entries: Any, extra: Any) -> Any:
            state["commits"] += 1
            if state["commits"] != 2:
                return real(entries, extra)

            def slow_failure(txn: Any, results: Any) -> None:
                extra(txn, results)
                time.sleep(0.3)             # (the second Ctrl-C comes while this commit is under way)
                raise OSError("disk full")

            return real(entries, slow_failure)

        eng.ledger._entries_with = failing
        with pytest.raises(KeyboardInterrupt):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        eng.ledger._entries_with = real
        assert not state["armed"]                   # (the second one came)
        interrupted = _memory(eng)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert _memory(eng) == interrupted


def test_an_interrupt_right_after_a_chunk_enrolls_its_new_members_forgets_them(tmp_path: Path, monkeypatch) -> None:
    """A Ctrl-C just after chunk 2 enrolled its new members in memory (before its evaluation): they are
    forgotten again, and memory equals a reopen's."""
    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    real = Engine._enroll_prepare
    calls = {"n": 0}

    def enroll_then_interrupt(self: Engine, *args: Any) -> Any:
        out = real(self, *args)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(Engine, "_enroll_prepare", enroll_then_interrupt)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        with pytest.raises(KeyboardInterrupt):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        interrupted = _memory(eng)
    monkeypatch.setattr(Engine, "_enroll_prepare", real)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert calls["n"] == 2 and _memory(eng) == interrupted


def test_a_failed_commit_while_the_next_chunk_is_evaluated_takes_both_out_of_memory(tmp_path: Path) -> None:
    """Chunk k commits in the writer thread while chunk k + 1 is evaluated. When k's commit fails after
    k + 1 was evaluated (k + 1 enrolled members and changed members k had changed too), the engine's
    memory is as a fresh reopen has it (both chunks taken back, the later one first), and a resume
    gives the clean ledger."""
    import threading

    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    clean = clean_balances(tmp_path, prog, t)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        evaluated = {"n": 0}
        third = threading.Event()
        real_eval = eng._evaluate

        def counting_eval(*a: Any, **kw: Any) -> Any:
            out = real_eval(*a, **kw)
            evaluated["n"] += 1
            if evaluated["n"] == 3:
                third.set()
            return out

        real = eng.ledger._entries_with
        calls = {"n": 0, "overlapped": None}

        def failing(entries: Any, extra: Any) -> Any:
            calls["n"] += 1
            if calls["n"] != 2:
                return real(entries, extra)

            def late_failure(txn: Any, results: Any) -> Any:
                extra(txn, results)                     # the chunk's whole transaction, but for its commit
                calls["overlapped"] = third.wait(20)    # (without the writer thread: never, the same thread)
                raise OSError("disk full")

            return real(entries, late_failure)

        eng._evaluate = counting_eval
        eng.ledger._entries_with = failing
        before = None
        try:
            with pytest.raises(OSError, match="disk full"):
                eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        finally:
            eng.ledger._entries_with = real
            del eng._evaluate
        assert calls["overlapped"] is True and calls["n"] == 2     # chunk 3 was evaluated, never committed
        before = _memory(eng)
        members = eng.members
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert eng.members == members
        assert _memory(eng) == before
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert balances(eng) == clean
        assert eng.ledger.verify().ok


def test_chunks_evaluated_while_the_one_before_commits_leave_the_memory_of_one_chunk_at_a_time(
        tmp_path: Path) -> None:
    """Chunk k + 1 takes its members' balances from the ledger's state as chunk k's transaction applied
    it (k not committed yet): the members' state, histories and records are those of importing the
    chunks one import each (each one committed before the next begins), and so are the balances."""
    prog = Program.from_toml(CLUB)
    t = history(4_000, 600, seed=12)              # the same members in every chunk
    with Engine.open(tmp_path / "apart", program=prog, sync="none") as eng:
        for k in range(4):
            eng.import_sales(t.slice(1_000 * k, 1_000), columns=MAP, chunk_rows=1_000, import_id=f"p{k}")
        apart, apart_balances = _memory(eng), balances(eng)
    with Engine.open(tmp_path / "apart", program=prog, sync="none") as eng:
        assert _memory(eng) == apart                                  # (what the records hold)
    with Engine.open(tmp_path / "piped", program=prog, sync="none") as eng:
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="p")
        assert _memory(eng) == apart and balances(eng) == apart_balances
    with Engine.open(tmp_path / "piped", program=prog, sync="none") as eng:
        assert _memory(eng) == apart


def test_a_failure_of_a_chunk_while_the_one_before_commits_keeps_that_one(tmp_path: Path, monkeypatch) -> None:
    """Chunk k + 1 fails (here: building its transfers) while chunk k commits in the writer thread: k
    commits and stays in memory, k + 1 is taken out; memory is as a reopen has it, and a resume gives
    the clean ledger."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    clean = clean_balances(tmp_path, prog, t)
    real = bulk._Importer._transfers
    calls = {"n": 0}

    def failing(self: Any, *a: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise MemoryError("no room for chunk 3's transfers")
        return real(self, *a)

    monkeypatch.setattr(bulk._Importer, "_transfers", failing)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        with pytest.raises(MemoryError):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        before, members = _memory(eng), eng.members
    monkeypatch.setattr(bulk._Importer, "_transfers", real)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert eng.members == members and _memory(eng) == before
        rep = eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert rep.resumed_from_row == 2_000                 # chunk 2 committed
        assert balances(eng) == clean
        assert eng.ledger.verify().ok


def test_resume_rebuilds_the_duplicate_refs_as_the_clean_run_had_them(tmp_path: Path) -> None:
    """Refs are compared trimmed, and a row refused before the duplicate check (a zero amount here)
    leaves its ref free: a resumed import must judge later rows as a clean one does."""
    prog = Program.from_toml(CLUB)
    t = history(3_000, 50)
    total = t.column("total").to_numpy().copy()
    refs = t.column("receipt").to_pylist()
    total[10] = 0                       # refused before the duplicate check: "r10" stays free ...
    refs[2_500] = "r10"                 # ... for this good row (in a chunk after the resume)
    refs[20] = " r20 "                  # and "r20" is taken (trimmed) ...
    refs[2_600] = "r20"                 # ... so this row is a duplicate
    t = t.set_column(2, "total", pa.array(total)).set_column(3, "receipt", pa.array(refs))
    src = tmp_path / "sales.parquet"
    pq.write_table(t, src)
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        clean = eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        clean_balances = balances(eng)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        import_failing_at_commit(eng, src, 3)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        resumed = eng.import_sales(src, columns=MAP, chunk_rows=1_000, resume=True)
        assert resumed.resumed_from_row == 2_000
        assert (resumed.sales_posted, resumed.rows_rejected) == (clean.sales_posted, clean.rows_rejected)
        assert resumed.reasons == clean.reasons
        assert clean.reasons == {"the amount is zero": 1, "the same ref appears earlier in this source": 1}
        assert balances(eng) == clean_balances


def test_the_seen_refs_spill_to_sorted_runs_on_disk_and_answer_as_a_set() -> None:
    """The duplicate-ref set holds at most ``spill`` hashes in RAM; the rest are sorted runs in files,
    merged when too many pile up; it answers as a Python set does (the oracle)."""
    from loyalty_engine.bulk_import import _SeenRefs

    rng = np.random.default_rng(2)
    seen = _SeenRefs(spill=1_000, max_runs=2, block=64)
    oracle: set[int] = set()
    try:
        for _ in range(40):
            h = np.unique(rng.integers(0, 30_000, 400).astype(np.uint64))
            got = seen.contains(h)
            assert got.tolist() == [int(v) in oracle for v in h.tolist()]
            seen.add(h[~got])
            oracle.update(int(v) for v in h[~got].tolist())
            assert len(seen) == len(oracle) and len(seen.mem) < 1_000 and len(seen.runs) <= 2
        assert seen.runs and all((np.diff(np.asarray(r)) > 0).all() for _, r in seen.runs)
        folder = seen._dir
        assert folder is not None and folder.exists()
    finally:
        seen.close()
    assert not folder.exists()


def test_duplicate_refs_are_found_across_spilled_runs(tmp_path: Path, monkeypatch) -> None:
    """With the RAM part of the seen refs made tiny, an import still rejects a ref repeated chunks
    later (and a resumed one rebuilds the same set), as with everything in RAM."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(6_000, 60)
    refs = t.column("receipt").to_pylist()
    refs[5_500], refs[4_100] = "r3", " r1999 "
    t = t.set_column(3, "receipt", pa.array(refs))
    with Engine.open(tmp_path / "ram", program=prog, sync="none") as eng:
        in_ram = eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
    assert in_ram.reasons == {"the same ref appears earlier in this source": 2}
    monkeypatch.setattr(bulk, "SEEN_SPILL", 1_500)
    runs_seen = []
    real_add = bulk._SeenRefs.add

    def add(self: Any, new: np.ndarray) -> None:
        real_add(self, new)
        runs_seen.append((len(self.runs), len(self.mem)))

    monkeypatch.setattr(bulk._SeenRefs, "add", add)
    with Engine.open(tmp_path / "disk", program=prog, sync="none") as eng:
        import_failing_at_commit(eng, t, 5, import_id="x")
    with Engine.open(tmp_path / "disk", program=prog, sync="none") as eng:
        spilled = eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert spilled.resumed_from_row == 4_000
        assert spilled.reasons == in_ram.reasons and spilled.sales_posted == in_ram.sales_posted
        assert balances(eng) == balances_of(tmp_path / "ram", prog)
    assert max(r for r, _ in runs_seen) >= 2 and max(m for _, m in runs_seen) < 1_500


def balances_of(path: Path, prog: Program) -> dict[str, tuple[int, int, str]]:
    with Engine.open(path, program=prog, sync="none") as eng:
        return balances(eng)


def test_reading_a_parquet_file_holds_one_row_group_not_the_file(tmp_path: Path) -> None:
    """Read over the whole file, the Parquet reader kept what it pre-buffered until it ended: Arrow's
    memory grew with the row groups read (the benchmark's 10 M rows: 100 MB, then 215 MB). Read a row
    group at a time, it stays flat."""
    from loyalty_engine.bench.import_workload import write_history
    from loyalty_engine.sources import batches, resolve

    path = write_history(tmp_path / "history.parquet", 3_000_000, 100_000, row_group=250_000)
    held = []
    rows = 0
    for b, r in batches(resolve(path, None, None)[0], ["customer_id", "sold_at", "total", "category"], 1 << 20,
                        None, []):
        assert r[0] == rows + 1
        rows += b.num_rows
        held.append(pa.total_allocated_bytes())
        del b
    assert rows == 3_000_000
    assert max(held[-3:]) - max(held[:3]) < 4 << 20, [h >> 20 for h in held]     # it was 20 MB more


def test_a_stop_after_the_last_commit_still_gives_the_quarantine(tmp_path: Path, monkeypatch) -> None:
    """Killed after its last commit (the checkpoint says complete) but before the quarantine file was
    written out from its side file: running the import again writes it (the SIGKILL test hit this)."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(3_000, 50)
    total = t.column("total").to_numpy().copy()
    total[::500] = 0
    t = t.set_column(2, "total", pa.array(total))
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="q", quarantine=tmp_path / "clean.parquet")
    q = tmp_path / "q.parquet"
    real = bulk._Importer._write_quarantine

    def killed(self: Any, partial: Path) -> None:
        raise KeyboardInterrupt          # as a kill: nothing after this line of the run happens

    monkeypatch.setattr(bulk._Importer, "_write_quarantine", killed)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        with pytest.raises(KeyboardInterrupt):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="q", quarantine=q)
    assert not q.exists() and (tmp_path / "q.parquet.partial").exists()
    monkeypatch.setattr(bulk._Importer, "_write_quarantine", real)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        again = eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="q", quarantine=q)
    assert again.already_imported
    assert pq.read_table(q).equals(pq.read_table(tmp_path / "clean.parquet")) and pq.read_table(q).num_rows == 6
    assert not (tmp_path / "q.parquet.partial").exists()


def test_an_error_after_a_chunk_committed_keeps_the_chunk(tmp_path: Path) -> None:
    """Housekeeping that fails after a chunk's commit (here: the ledger's snapshot) must not roll the
    committed chunk back in memory: its enrolments and state stay, a warning says what failed, and the
    import goes on to the clean ledger."""
    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        clean = balances(eng)
        clean_events = [(e.seq, e.kind, e.member) for e in eng.events(limit=10_000)]
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        eng.ledger._write_snapshot = lambda: (_ for _ in ()).throw(OSError("no space for the snapshot"))
        eng.ledger._since_snapshot = 10**12          # due after every commit
        with pytest.warns(RuntimeWarning, match="snapshot after a commit failed"):
            eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x")
        assert balances(eng) == clean
        assert [(e.seq, e.kind, e.member) for e in eng.events(limit=10_000)] == clean_events
        members = eng.members
        del eng.ledger._write_snapshot               # the disk has room again
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        assert eng.members == members and balances(eng) == clean


def test_the_id_table_in_memory_does_not_grow_with_the_rows_imported(tmp_path: Path) -> None:
    """The ids of an import's transfers are kept as runs (a few per chunk), not one table entry each:
    importing 2.5 times the rows (the same members) leaves the writer's id table as it was, and a
    re-run of the source, or a transfer posted again with an import's id, is still refused."""
    prog = Program.from_toml(CLUB)
    small, large = history(6_000, 300, seed=4), history(15_000, 300, seed=4)
    sizes = {}
    for name, t in (("small", small), ("large", large)):
        with Engine.open(tmp_path / name, program=prog, sync="none") as eng:
            first = eng.import_sales(t.slice(0, 3_000), columns=MAP, chunk_rows=3_000, import_id="a")
            assert first.members_enrolled == 300                   # every member is in the first chunk
            rep = eng.import_sales(t.slice(3_000), columns=MAP, chunk_rows=3_000, import_id="b")
            st = eng.ledger._state
            sizes[name] = (st.n_ids, st.n_runs, st.ids_in_runs)
            assert rep.transfers == 0 or st.ids_in_runs >= rep.transfers
            # an import's transfer posted again answers exists
            recs = [r for _, r in _journal_transfers(eng) if len(r) >= 300][-1]
            got = eng.ledger.post_batch(recs[[0, len(recs) // 2, len(recs) - 1]])
            assert got.tolist() == [TransferResult.EXISTS] * 3
    assert sizes["large"][0] == sizes["small"][0]
    assert sizes["large"][2] > 2 * sizes["small"][2]                 # 2.5 times the rows
    assert sizes["large"][1] <= 8 * 5                                 # a few runs a chunk


def _journal_transfers(eng: Engine) -> list[tuple[int, np.ndarray]]:
    """(sequence number, records) of every transfer entry in the engine's journal."""
    from loyalty_engine.ledger import KIND_TRANSFERS, _records
    from loyalty_engine.store import from_u64be

    st = eng.ledger._st()
    out = []
    with st.begin() as txn:
        for key, value in txn.cursor(db=st.dbs[b"journal"]):
            if value[0] == KIND_TRANSFERS:
                out.append((from_u64be(key), _records(txn, st.dbs[b"records"], from_u64be(key), value).copy()))
    return out


def test_a_chunk_of_many_journal_entries_commits_or_fails_whole(tmp_path: Path, monkeypatch) -> None:
    """A chunk whose transfers take several journal entries is still one transaction: the same ledger
    as one entry, and a failed commit leaves nothing of the chunk (a resume gives the clean ledger)."""
    import loyalty_engine.bulk_import as bulk

    prog = Program.from_toml(CLUB)
    t = history(3_000, 2_000)
    clean = clean_balances(tmp_path, prog, t)
    monkeypatch.setattr(bulk, "ENTRY_TRANSFERS", 300)
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        def many_parts(entries: Any) -> None:
            assert sum(len(r) > 0 for _, r in entries) > 3          # accounts, bonuses and parts

        import_failing_at_commit(eng, t, 2, many_parts, import_id="x")
    with Engine.open(tmp_path / "club", program=prog, sync="none") as eng:
        eng.import_sales(t, columns=MAP, chunk_rows=1_000, import_id="x", resume=True)
        assert balances(eng) == clean
        assert eng.ledger.verify().ok


CHILD = """
import sys
from loyalty_engine.engine import Engine
from loyalty_engine.program import Program
print("READY", flush=True)
with Engine.open(sys.argv[1], program=Program.from_toml(sys.argv[2]), sync="none") as eng:
    rep = eng.import_sales(sys.argv[3], columns={cols!r}, chunk_rows=1_000, resume=True,
                           quarantine=sys.argv[4], progress=False)
print("DONE", rep.rows_read)
"""


def test_sigkill_at_random_moments_then_resume_gives_the_clean_ledger(tmp_path: Path) -> None:
    prog = Program.from_toml(CLUB)
    t = history(60_000, 1_200, seed=9)
    # a few bad rows, so the quarantine is resumed too
    total = t.column("total").to_numpy().copy()
    total[::997] = 0
    t = t.set_column(2, "total", pa.array(total))
    src = tmp_path / "sales.parquet"
    pq.write_table(t, src, row_group_size=3_000)
    with Engine.open(tmp_path / "clean", program=prog, sync="none") as eng:
        clean_rep = eng.import_sales(src, columns=MAP, chunk_rows=1_000, quarantine=tmp_path / "clean_q.parquet")
        clean, clean_lots, clean_state = balances(eng), lots_by_expiry(eng), _memory(eng)
    path = tmp_path / "killed"
    q = tmp_path / "q.parquet"
    script = CHILD.format(cols=MAP)
    rng = np.random.default_rng(int(os.environ.get("IMPORT_KILL_SEED", "5")))
    kills = 0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    # the kill moments are fractions of how long the import itself takes in a whole run of the child on this
    # machine (timed from the child's READY, so the interpreter's start and a cold first compile of the
    # modules are not counted), so they land inside the import however fast or slow the machine is
    def child() -> subprocess.Popen:
        c = subprocess.Popen([sys.executable, "-c", script, str(path), str(CLUB), str(src), str(q)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
        assert c.stdout is not None and c.stdout.readline().startswith(b"READY"), c.communicate()[1]
        return c

    timed = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "timed"), str(CLUB), str(src),
                              str(tmp_path / "timed_q.parquet")], stdout=subprocess.PIPE, env=env)
    assert timed.stdout is not None and timed.stdout.readline().startswith(b"READY")
    t = time.monotonic()
    rest, _ = timed.communicate()
    assert b"DONE" in rest and timed.returncode == 0
    whole = time.monotonic() - t
    for i in range(12):
        p = child()
        # the first kill comes early in the import, so that one lands even if the timed run was slow
        time.sleep(float(rng.uniform(0.05, 0.4) if i == 0 else rng.uniform(0.2, 0.9)) * whole)
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)
            kills += 1
        out, err = p.communicate()
        if b"DONE" in out:
            break
    else:
        p = subprocess.run([sys.executable, "-c", script, str(path), str(CLUB), str(src), str(q)],
                           capture_output=True, env=env, check=True)
    assert kills >= 1, "the import finished before any kill: make the source bigger"
    with Engine.open(path, program=prog, sync="none") as eng:
        assert balances(eng) == clean
        assert lots_by_expiry(eng) == clean_lots
        assert _memory(eng) == clean_state
        assert eng.ledger.verify().ok
        again = eng.import_sales(src, columns=MAP, chunk_rows=1_000)
        assert again.already_imported
    got_q = pq.read_table(q).sort_by("row")
    want_q = pq.read_table(tmp_path / "clean_q.parquet").sort_by("row")
    assert got_q.equals(want_q) and want_q.num_rows == clean_rep.rows_rejected > 0


# -- progress ---------------------------------------------------------------------------------------------

def test_progress_shows_rows_rate_bad_rows_and_time_left() -> None:
    buf = io.StringIO()
    p = Progress(1_000, enabled=True, stream=buf, every=0)
    p.update(250, 3)
    line = buf.getvalue()
    assert "250/1,000 rows (25%)" in line and "rows/s" in line and "bad 3" in line and "left" in line
    quiet = Progress(1_000, stream=io.StringIO())     # not a terminal: nothing written
    quiet.update(10, 0)
    quiet.close()
    assert quiet.stream.getvalue() == ""
