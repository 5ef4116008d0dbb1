"""Bad input: a clear error naming the value and the place, or a result code; the ledger unchanged."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from loyalty_engine import Account, Ledger, Transfer, TransferResult
from loyalty_engine.errors import LedgerClosedError, ValidationError

AT = 1_767_225_600_000_000


@pytest.fixture()
def ledger(tmp_path: Path) -> Iterator[Ledger]:
    with Ledger.open(tmp_path / "l", sync="none") as led:
        led.create_accounts([Account(id=1, asset=0), Account(id=2, asset=0)])
        led.post([Transfer(id=1, debit=1, credit=2, amount=5, at=AT)])
        yield led


def table(**overrides: Any) -> pa.Table:
    cols: dict[str, Any] = {"id": pa.array([10, 11], pa.uint64()), "debit": pa.array([1, 1], pa.uint64()),
                            "credit": pa.array([2, 2], pa.uint64()), "amount": pa.array([3, 4], pa.int64()),
                            "at": pa.array([AT, AT], pa.int64())}
    cols.update(overrides)
    return pa.table({k: v for k, v in cols.items() if v is not None})


def unchanged(ledger: Ledger, call: Callable[[], Any], exc: type[Exception], *needles: str) -> None:
    head, bal = ledger.head, ledger.balance(2)
    with pytest.raises(exc) as info:
        call()
    for needle in needles:
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    assert ledger.head == head and ledger.balance(2) == bal


@pytest.mark.parametrize("column", ["id", "debit", "credit", "amount", "at"])
def test_a_missing_required_column_is_named(ledger: Ledger, column: str) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(**{column: None})), ValidationError, column, "missing")


def test_an_unknown_column_is_named(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(points=pa.array([1, 2]))), ValidationError, "points")


def test_float_amounts_are_refused(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(amount=pa.array([1.0, 2.5]))), ValidationError,
              "'amount'", "double", "integer")


def test_nan_in_an_arrow_column_is_refused(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(amount=pa.array([float("nan"), 1.0]))), ValidationError,
              "'amount'", "NaN")


def test_a_null_is_named_with_its_row(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(credit=pa.array([2, None], pa.uint64()))),
              ValidationError, "'credit'", "row 1")


def test_negative_ids_are_named_with_their_row(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch(table(debit=pa.array([1, -4], pa.int64()))), ValidationError,
              "'debit'", "row 1", "-4")


def test_naive_arrow_timestamps_are_refused(ledger: Ledger) -> None:
    naive = pa.array([datetime(2026, 1, 1), datetime(2026, 1, 2)], pa.timestamp("us"))
    unchanged(ledger, lambda: ledger.post_batch(table(at=naive)), ValidationError, "'at'", "naive")


def test_zoned_arrow_timestamps_are_accepted(ledger: Ledger) -> None:
    zoned = pa.array([AT, AT], pa.timestamp("us", tz="Asia/Tehran"))
    assert ledger.post_batch(table(at=zoned)).tolist() == [TransferResult.OK] * 2


def test_naive_datetime_on_a_transfer_is_refused(ledger: Ledger) -> None:
    t = Transfer(id=20, debit=1, credit=2, amount=1, at=datetime(2026, 1, 1))
    unchanged(ledger, lambda: ledger.post([t]), ValidationError, "at", "timezone")


@pytest.mark.parametrize("field,value", [("id", 1 << 128), ("id", -1), ("debit", 1 << 64), ("amount", 1 << 63),
                                         ("user_data", -1)])
def test_values_out_of_range_are_named(ledger: Ledger, field: str, value: int) -> None:
    t = Transfer(**{"id": 30, "debit": 1, "credit": 2, "amount": 1, "at": AT, field: value})
    unchanged(ledger, lambda: ledger.post([Transfer(id=31, debit=1, credit=2, amount=1, at=AT), t]),
              ValidationError, f"transfers[1].{field}", str(value))


def test_a_bool_or_a_string_is_not_an_amount(ledger: Ledger) -> None:
    for bad in (True, "5", 2.0):
        t = Transfer(id=40, debit=1, credit=2, amount=bad, at=AT)  # type: ignore[arg-type]
        unchanged(ledger, lambda t=t: ledger.post([t]), ValidationError, "amount")


def test_zero_and_negative_amounts_are_results_not_errors(ledger: Ledger) -> None:
    res = ledger.post([Transfer(id=50, debit=1, credit=2, amount=0, at=AT),
                       Transfer(id=51, debit=1, credit=2, amount=-3, at=AT)])
    assert res == [TransferResult.AMOUNT_MUST_BE_POSITIVE] * 2
    assert ledger.balance(2).credits_posted == 5


def test_a_structured_array_with_a_float_field_is_refused(ledger: Ledger) -> None:
    arr = np.zeros(2, [("id", "<u8"), ("debit", "<u8"), ("credit", "<u8"), ("amount", "<f8"), ("at", "<i8")])
    unchanged(ledger, lambda: ledger.post_batch(arr), ValidationError, "'amount'", "float64")


def test_numpy_datetime64_has_no_timezone_and_is_refused(ledger: Ledger) -> None:
    arr = np.zeros(1, [("id", "<u8"), ("debit", "<u8"), ("credit", "<u8"), ("amount", "<i8"), ("at", "<M8[us]")])
    unchanged(ledger, lambda: ledger.post_batch(arr), ValidationError, "'at'", "timezone")


def test_a_list_is_not_a_batch(ledger: Ledger) -> None:
    unchanged(ledger, lambda: ledger.post_batch([1, 2, 3]), ValidationError, "list")


def test_a_bad_sync_mode_and_a_bad_map_size_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="'fast'"):
        Ledger.open(tmp_path / "x", sync="fast")
    with pytest.raises(ValidationError, match="map_size"):
        Ledger.open(tmp_path / "x", map_size=10)


def test_a_closed_handle_refuses_calls(tmp_path: Path) -> None:
    led = Ledger.open(tmp_path / "c", sync="none")
    led.close()
    with pytest.raises(LedgerClosedError):
        led.post([Transfer(id=1, debit=1, credit=2, amount=1, at=AT)])
    with pytest.raises(LedgerClosedError):
        led.balance(1)


def test_an_aware_datetime_in_another_zone_is_the_same_instant(ledger: Ledger) -> None:
    from datetime import timedelta

    tehran = timezone(timedelta(hours=3, minutes=30))
    when = datetime(2026, 1, 1, 3, 30, tzinfo=tehran)  # 2026-01-01T00:00Z
    assert ledger.post([Transfer(id=60, debit=1, credit=2, amount=1, at=when)]) == [TransferResult.OK]
    row = ledger.transfers(account=2).to_pylist()[-1]
    assert row["id"] == 60 and row["at"] == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", [-1, 1 << 64, "7", 2.0])
def test_a_bad_account_id_in_a_read_is_named(ledger: Ledger, bad: object) -> None:
    with pytest.raises(ValidationError, match="account="):
        ledger.balance(bad)  # type: ignore[arg-type]
