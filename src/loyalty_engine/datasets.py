"""Bundled sample data: the CDNOW purchase history (Fader & Hardie), for demos, examples and tests.

69,659 purchases by the 23,570 customers who first bought from CDNOW in the first quarter of 1997,
up to 1998-06-30. Amounts are parsed to integer cents (never through a float).
"""

from __future__ import annotations

import gzip
from importlib import resources

import numpy as np
import pyarrow as pa

from .errors import ValidationError

__all__ = ["load_cdnow"]


def load_cdnow() -> pa.Table:
    """The CDNOW master file as an Arrow table.

    Columns: ``customer_id`` (int64, 1..23570), ``date`` (date32, the purchase day), ``cds``
    (int64, number of CDs bought) and ``amount_cents`` (int64, the basket in US cents), in file order
    (by customer, then date).
    """
    raw = resources.files(__package__).joinpath("data/CDNOW_master.txt.gz").read_bytes()
    return parse_cdnow(gzip.decompress(raw).decode("ascii"), source="CDNOW_master.txt")


def parse_cdnow(text: str, *, source: str = "<text>") -> pa.Table:
    """Parse CDNOW master text (a header line, then ``customer_id YYYYMMDD cds dollars.cents``)."""
    lines = text.splitlines()
    if not lines or lines[0].split() != ["customer_id", "date", "number_of_cds", "dollar_value"]:
        raise ValidationError(f"{source}:1: expected the header 'customer_id date number_of_cds dollar_value'")
    rows = [ln.split() for ln in lines[1:] if ln.strip()]
    for i, r in enumerate(rows):
        if len(r) != 4 or not (r[0].isdigit() and r[1].isdigit() and len(r[1]) == 8 and r[2].isdigit()):
            raise ValidationError(f"{source}:{i + 2}: cannot read the row {' '.join(r)!r}")
        whole, _, frac = r[3].partition(".")
        if not whole.isdigit() or not (frac.isdigit() and len(frac) == 2):
            raise ValidationError(f"{source}:{i + 2}: dollar_value={r[3]!r} is not dollars.cents")
    cols = np.array(rows, dtype=object).T if rows else np.empty((4, 0), dtype=object)
    ymd = cols[1].astype(np.int64)
    dates = (
        (ymd // 10000 - 1970).astype("datetime64[Y]").astype("datetime64[M]")
        + (ymd // 100 % 100 - 1).astype("timedelta64[M]")
    ).astype("datetime64[D]") + (ymd % 100 - 1).astype("timedelta64[D]")
    cents = np.fromiter((int(v.replace(".", "")) for v in cols[3]), dtype=np.int64, count=len(rows))
    return pa.table(
        {
            "customer_id": pa.array(cols[0].astype(np.int64)),
            "date": pa.array(dates, type=pa.date32()),
            "cds": pa.array(cols[2].astype(np.int64)),
            "amount_cents": pa.array(cents),
        }
    )
