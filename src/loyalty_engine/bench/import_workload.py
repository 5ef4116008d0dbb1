"""The bulk-import workload and its peer.

``write_history`` writes synthetic sales history to Parquet in bounded memory: ``rows`` purchases by
``members`` members over three years, in time order, one row group per million rows (customer id,
time with a timezone, amount in the minor unit, category). ``peer_import`` is what a shop would write
without loyalty_engine: read the Parquet with PyArrow, evaluate the same program row by row in pure
Python (``rules_workload.python_evaluate``, checked equal to the kernel) and write a SQLite ledger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from loyalty_engine.bench.rules_workload import CATEGORIES

START_US = 1_640_995_200_000_000          # 2022-01-01 UTC
SPAN_US = 3 * 365 * 86_400_000_000
COLUMNS = {"member": "customer_id", "at": "sold_at", "amount": "total", "category": "category"}


def write_history(path: str | Path, rows: int, members: int, *, seed: int = 11,
                  row_group: int = 1_000_000) -> Path:
    """Write the history; returns the path."""
    rng = np.random.default_rng(seed)
    path = Path(path)
    schema = pa.schema([("customer_id", pa.int64()), ("sold_at", pa.timestamp("us", tz="UTC")),
                        ("total", pa.int64()), ("category", pa.dictionary(pa.int8(), pa.string()))])
    cats = pa.array(CATEGORIES)
    with pq.ParquetWriter(path, schema) as w:
        for start in range(0, rows, row_group):
            n = min(row_group, rows - start)
            lo = START_US + SPAN_US * start // rows
            hi = START_US + SPAN_US * (start + n) // rows
            at = np.sort(rng.integers(lo, hi, n))
            t = pa.table({"customer_id": rng.integers(1, members + 1, n),
                          "sold_at": pa.array(at, pa.timestamp("us", tz="UTC")),
                          "total": rng.integers(10_000, 800_000, n),
                          "category": pa.DictionaryArray.from_arrays(
                              pa.array(rng.integers(0, len(CATEGORIES), n).astype(np.int8)), cats)},
                         schema=schema)
            w.write_table(t)
    return path


def peer_import(path: str | Path, sqlite_path: str | Path) -> tuple[int, int]:
    """The peer: (rows imported, points issued). Reads with PyArrow, evaluates in pure Python,
    writes one SQLite transaction per row group (balances + transfers tables, like SqlitePeer)."""
    from loyalty_engine import _core
    from loyalty_engine.bench.rules_workload import program, python_evaluate
    from loyalty_engine.bench.sqlite_peer import SqlitePeer

    prog = program()
    cat_sym = prog.symbols.tables["category"]
    peer = SqlitePeer(str(sqlite_path), synchronous="FULL")
    f = pq.ParquetFile(path)
    total = points_sum = 0
    seen_members: set[int] = set()
    try:
        # the peer keeps its evaluation state across row groups by evaluating the whole history at once
        # (python_evaluate holds per-member state in dicts); the ledger writes go per row group
        t = f.read()
        member = t.column("customer_id").to_numpy()
        at = t.column("sold_at").cast(pa.int64()).to_numpy()
        amount = t.column("total").to_numpy()
        cat_names = t.column("category").to_pylist()
        n = len(member)
        minute = at // 60_000_000
        day = minute // 1440
        rows = np.zeros(n, _core.ROW_DTYPE)
        rows["member"], rows["amount"], rows["quantity"], rows["day"] = member, amount, 1, day
        rows["hour"] = (minute // 60) % 24
        rows["weekday"] = (day + 3) % 7
        dates = day.astype("datetime64[D]")
        rows["month"] = dates.astype("datetime64[M]").astype(np.int64) % 12 + 1
        rows["dom"] = (dates - dates.astype("datetime64[M]").astype("datetime64[D]")).astype(np.int64) + 1
        cat = np.array([cat_sym.get(c, 0) for c in cat_names], np.int32)
        rows["cats"] = np.left_shift(1, cat.astype(np.int64))
        out = python_evaluate(prog, {"rows": rows, "cat": cat, "sku": np.zeros(n, np.int32), "amount": amount},
                              int(member.max()) + 1)
        from loyalty_engine.types import RECORD_DTYPE
        for start in range(0, n, f.metadata.row_group(0).num_rows):
            end = min(n, start + f.metadata.row_group(0).num_rows)
            new = {int(m) for m in member[start:end]} - seen_members
            peer.create_accounts([(1 << 20) + 2 * m for m in new], 0)
            seen_members |= new
            pts = np.array([o[0] for o in out[start:end]], np.int64)
            keep = np.flatnonzero(pts > 0)
            recs = np.zeros(len(keep), RECORD_DTYPE)
            recs["id_lo"] = start + keep + 1
            recs["debit"] = 1
            recs["credit"] = (1 << 20) + 2 * member[start:end][keep]
            recs["amount"] = pts[keep]
            recs["at"] = at[start:end][keep]
            peer.post_batch(recs)
            total += end - start
            points_sum += int(pts.sum())
    finally:
        peer.close()
    return total, points_sum
