"""Bulk import of sales history (``Engine.import_sales``): a source streamed in chunks, checked with
vectorised rules, bad rows quarantined with their reason, good rows evaluated by the same kernel as
``Engine.purchase`` and posted as per-member aggregates, a checkpoint committed with each chunk.

See docs/import.md. The steps of one chunk:

1. read up to ``chunk_rows`` rows; convert member, time and amount (and the optional columns) to the
   engine's types, marking each row that cannot be converted with a reason;
2. duplicates of a ref inside the source, sales without a member, returns without an original;
3. unknown members are enrolled (their first purchase in the source is their join time), in memory:
   their accounts, bonuses and records commit with the chunk (step 7);
4. the sales of the chunk, in time order, through the rule kernel (rows older than the member's last
   purchase are refused by the kernel, and quarantined with that reason);
5. returns are checked against their original (in this source or an earlier receipt);
6. bad rows are appended to the quarantine (before the commit, so a crash loses none);
7. one LMDB transaction: the new members' accounts and sign-up bonuses, the aggregated transfers
   (earned points per member and expiry, credit per member, referral bonuses), the members' state and
   names, receipts of purchases a return will refer to, and the checkpoint (a failure leaves the
   engine's memory as it was before the chunk);
8. the chunk's returns, each a refund (idempotent by its ref), and the checkpoint marks them done.

Step 7 runs in a writer thread while this thread reads, checks and evaluates the next chunk (steps 1
to 6); the next chunk's transaction starts once this one committed. The next chunk takes its members'
balances from the ledger's state as the transaction in flight applied it; a chunk with returns waits
for the commit before step 8 (and before its own returns look for their originals). When a commit
fails, both chunks are taken out of memory, the later one first.

A re-run of the same source finds its checkpoint: a finished import posts nothing; a stopped one
continues with ``resume=True`` from the first chunk that did not commit.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from . import _bulk, _core
from .errors import NotFoundError, StorageError, ValidationError
from .progress import Progress
from .sources import Malformed, Part, batches, identity, resolve
from .types import RECORD_DTYPE, Code

if TYPE_CHECKING:
    from .engine import Engine

__all__ = ["ImportReport", "FIELDS", "import_sales"]

#: The columns an import understands; member, at and amount are required.
FIELDS = ("member", "at", "amount", "ref", "kind", "original", "branch", "channel", "category", "sku",
          "quantity")
REQUIRED = ("member", "at", "amount")
RETURN_KINDS = ("return", "refund", "r")
SALE_KINDS = ("sale", "s", "purchase")
MAX_AMOUNT = 1 << 53

# reasons a row is quarantined (code -> text a person can read)
R_MEMBER_NULL, R_MEMBER_LONG, R_AT_NULL, R_AT_BAD, R_AT_NAIVE = 1, 2, 3, 4, 5
R_AMT_NULL, R_AMT_BAD, R_AMT_INF, R_AMT_DEC, R_AMT_NEG, R_AMT_ZERO, R_AMT_BIG = 6, 7, 8, 9, 10, 11, 12
R_KIND, R_REF_NULL, R_DUP, R_NO_ORIG, R_ORIG_UNKNOWN, R_RET_EXCEEDS = 13, 14, 15, 16, 17, 18
R_UNKNOWN_MEMBER, R_KERNEL, R_MALFORMED, R_QTY, R_RET_EARLY = 19, 20, 21, 22, 23
REASONS = {
    R_MEMBER_NULL: "no member (the value is empty)",
    R_MEMBER_LONG: "the member name is longer than 200 bytes",
    R_AT_NULL: "no time (the value is empty)",
    R_AT_BAD: "the time cannot be read (give time_format=, e.g. '%Y-%m-%d %H:%M:%S')",
    R_AT_NAIVE: "the time has no timezone (state the source's timezone: tz='Asia/Tehran', or --tz)",
    R_AMT_NULL: "no amount (the value is empty)",
    R_AMT_BAD: "the amount is not a number",
    R_AMT_INF: "the amount is not a finite number",
    R_AMT_DEC: "the amount has more decimals than the stated scale",
    R_AMT_NEG: "a negative amount on a row that is not a return",
    R_AMT_ZERO: "the amount is zero",
    R_AMT_BIG: "the amount is 2**53 or more in the minor unit",
    R_KIND: "unknown kind (sale or return)",
    R_REF_NULL: "no receipt ref (the value is empty)",
    R_DUP: "the same ref appears earlier in this source",
    R_NO_ORIG: "a return without the ref of the original purchase",
    R_ORIG_UNKNOWN: "a return whose original purchase is unknown (not in this source before it, nor imported "
                    "or posted earlier)",
    R_RET_EXCEEDS: "the return is larger than what is left of its original purchase",
    R_UNKNOWN_MEMBER: "an unknown member (the import was told not to enroll: enroll=False)",
    R_MALFORMED: "a malformed line",
    R_QTY: "the quantity is not a whole number >= 0",
    R_RET_EARLY: "a return dated before its original purchase",
    R_KERNEL: "refused by the program (see the kernel's reason)",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportReport:
    """What an import did. ``rows_read`` = ``rows_posted`` + ``rows_rejected`` (+ rows of a resumed
    import that an earlier run already read, counted in ``resumed_from_row``)."""

    source: str
    import_id: str
    rows_read: int
    rows_posted: int
    rows_rejected: int
    sales_posted: int
    returns_posted: int
    members_enrolled: int
    points_issued: int
    points_clawed_back: int
    credit_issued: int
    offers_granted: int
    transfers: int
    chunks: int
    resumed_from_row: int
    already_imported: bool
    quarantine: str | None
    reasons: dict[str, int]
    seconds: float
    examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def rows_per_second(self) -> float:
        return self.rows_read / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """A few lines for a person."""
        lines = [f"imported {self.source}: {self.rows_read:,} rows read, {self.rows_posted:,} posted "
                 f"({self.sales_posted:,} sales, {self.returns_posted:,} returns), {self.rows_rejected:,} rejected"
                 f" in {self.seconds:.2f} s ({self.rows_per_second:,.0f} rows/s)"]
        if self.already_imported:
            lines.append("  this source was imported before: nothing posted")
        if self.resumed_from_row:
            lines.append(f"  resumed after row {self.resumed_from_row:,} (an earlier run's checkpoint)")
        lines.append(f"  members enrolled {self.members_enrolled:,}; points issued {self.points_issued:,}, "
                     f"clawed back {self.points_clawed_back:,}; credit issued {self.credit_issued:,}; "
                     f"offers granted {self.offers_granted:,}; {self.transfers:,} ledger transfers")
        for reason, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]):
            lines.append(f"  rejected {n:,}: {reason}")
        if self.quarantine and self.rows_rejected:
            lines.append(f"  rejected rows, with file, row and reason: {self.quarantine}")
        return "\n".join(lines)


# -- conversion of columns ----------------------------------------------------------------------------

def _strings(col: pa.Array) -> pa.Array:
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return col
    if pa.types.is_dictionary(col.type):
        return _strings(col.dictionary_decode())
    return pc.cast(col, pa.string())


def _blank(col: pa.Array) -> np.ndarray:
    """Null or empty (after trimming) values of a string column."""
    s = pc.utf8_trim_whitespace(col)
    return pc.or_kleene(pc.is_null(s), pc.equal(pc.utf8_length(s), 0)).fill_null(True).to_numpy(
        zero_copy_only=False)


def convert_times(col: pa.Array, tz: str | None, time_format: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(microseconds UTC, reason code per row: 0, R_AT_NULL, R_AT_BAD or R_AT_NAIVE)."""
    n = len(col)
    reason = np.zeros(n, np.int8)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    if pa.types.is_timestamp(t):
        ts = col
    elif pa.types.is_date(t):
        ts = pc.cast(pc.cast(col, pa.date32()), pa.timestamp("us"))
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(col)
        empty = pc.or_kleene(pc.is_null(s), pc.equal(pc.utf8_length(s), 0)).fill_null(True)
        s = pc.if_else(empty, pa.scalar(None, pa.string()), s)
        empty_np = empty.to_numpy(zero_copy_only=False)
        ts = None
        if time_format is not None:
            ts = pc.strptime(s, format=time_format, unit="us", error_is_null=True)
        else:
            for target in (pa.timestamp("us", tz="UTC"), pa.timestamp("us")):
                try:
                    ts = pc.cast(s, target)
                    break
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                    continue
            if ts is None:   # a mix, or not ISO 8601: try the usual shapes one by one
                zoned = naive = None
                for fmt in ("%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z"):
                    got = pc.strptime(s, format=fmt, unit="us", error_is_null=True)
                    zoned = got if zoned is None else pc.coalesce(zoned, got)
                for fmt in ("%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
                    got = pc.strptime(s, format=fmt, unit="us", error_is_null=True)
                    naive = got if naive is None else pc.coalesce(naive, got)
                zoned_us = pc.cast(zoned, pa.int64()).to_numpy(zero_copy_only=False)
                naive_v = _naive_to_utc(naive, tz)
                reason[empty_np] = R_AT_NULL
                z_ok = ~pc.is_null(zoned).to_numpy(zero_copy_only=False)
                n_ok = ~pc.is_null(naive).to_numpy(zero_copy_only=False)
                out = np.zeros(n, np.int64)
                out[z_ok] = np.nan_to_num(zoned_us[z_ok]).astype(np.int64)
                use_naive = n_ok & ~z_ok
                if tz is None:
                    reason[use_naive & (reason == 0)] = R_AT_NAIVE
                else:
                    out[use_naive] = naive_v[use_naive]
                reason[~z_ok & ~n_ok & (reason == 0)] = R_AT_BAD
                return out, reason
        reason[empty_np] = R_AT_NULL
        reason[pc.is_null(ts).to_numpy(zero_copy_only=False) & ~empty_np] = R_AT_BAD
    else:
        raise ValidationError(f"the time column is {t}; give timestamps, dates or text (numbers are ambiguous: "
                              f"seconds? milliseconds?)")
    if pa.types.is_timestamp(ts.type) and ts.type.tz is None:
        valid = ~pc.is_null(ts).to_numpy(zero_copy_only=False)
        if tz is None:
            reason[valid & (reason == 0)] = R_AT_NAIVE
            return np.zeros(n, np.int64), reason
        out = _naive_to_utc(ts, tz)
    else:
        out = pc.cast(pc.cast(ts, pa.timestamp("us", tz="UTC")), pa.int64()).fill_null(0).to_numpy(
            zero_copy_only=False)
    nulls = pc.is_null(ts).to_numpy(zero_copy_only=False)
    reason[nulls & (reason == 0)] = R_AT_NULL
    return np.asarray(out, np.int64), reason


def _naive_to_utc(ts: pa.Array, tz: str | None) -> np.ndarray:
    if tz is None:
        return np.zeros(len(ts), np.int64)
    ts = pc.cast(ts, pa.timestamp("us"))
    zoned = pc.assume_timezone(ts, timezone=tz, ambiguous="earliest", nonexistent="earliest")
    return pc.cast(zoned, pa.int64()).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def convert_amounts(col: pa.Array, scale: int) -> tuple[np.ndarray, np.ndarray]:
    """(signed amounts in the minor unit, reason code per row). Integer columns are taken as they are
    times 10**scale; decimals and text exactly; floats when they are whole after scaling."""
    n = len(col)
    reason = np.zeros(n, np.int8)
    mult = 10 ** scale
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    t = col.type
    nulls = pc.is_null(col).to_numpy(zero_copy_only=False)
    if pa.types.is_integer(t):
        v = pc.fill_null(col, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        big = np.abs(v) >= MAX_AMOUNT // mult
        out = v * mult
        reason[big] = R_AMT_BIG
    elif pa.types.is_floating(t):
        f = pc.fill_null(col, 0.0).to_numpy(zero_copy_only=False).astype(np.float64)
        fin = np.isfinite(f)
        reason[~fin] = R_AMT_INF
        scaled = np.where(fin, f, 0.0) * mult
        rounded = np.round(scaled)
        reason[fin & (np.abs(scaled - rounded) > 1e-6 * np.maximum(1.0, np.abs(scaled)))] = R_AMT_DEC
        reason[fin & (np.abs(rounded) >= MAX_AMOUNT) & (reason == 0)] = R_AMT_BIG
        out = np.where(reason == 0, rounded, 0).astype(np.int64)
    elif pa.types.is_decimal(t):
        return convert_amounts(pc.cast(col, pa.string()), scale)
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(col)
        s = pc.replace_substring(s, ",", "")     # thousands separators
        empty = pc.equal(pc.utf8_length(s), 0).fill_null(True).to_numpy(zero_copy_only=False)
        ok = pc.match_substring_regex(s, r"^[+-]?[0-9]{1,16}(\.[0-9]*)?$").fill_null(False).to_numpy(
            zero_copy_only=False)
        inf = pc.match_substring_regex(s, r"(?i)^[+-]?(inf|infinity|nan)$").fill_null(False).to_numpy(
            zero_copy_only=False)
        reason[~ok] = R_AMT_BAD
        reason[inf] = R_AMT_INF
        reason[empty] = R_AMT_NULL
        dot = pc.find_substring(s, ".").fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        length = pc.utf8_length(s).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        decimals = np.where(dot >= 0, length - dot - 1, 0)
        reason[ok & (decimals > scale)] = R_AMT_DEC
        good = reason == 0
        digits = pc.replace_substring(pc.filter(s, pa.array(good)), ".", "")
        vals = pc.cast(digits, pa.int64()).to_numpy(zero_copy_only=False) if good.any() else np.zeros(0, np.int64)
        out = np.zeros(n, np.int64)
        out[good] = vals * (10 ** (scale - decimals[good]))
        reason[good & (np.abs(out) >= MAX_AMOUNT)] = R_AMT_BIG
    else:
        raise ValidationError(f"the amount column is {t}; give integers, decimals, floats or text")
    reason[nulls] = R_AMT_NULL
    out = np.where(reason == 0, out, 0)
    return out.astype(np.int64), reason


def _string_buffers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """The value offsets (int64, ``n + 1``) and data buffer of a string array (nulls as empty strings)."""
    col = pc.fill_null(_strings(col), "").cast(pa.large_string())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    bufs = col.buffers()
    off = np.frombuffer(bufs[1], np.int64)[col.offset: col.offset + len(col) + 1] if len(col) \
        else np.zeros(1, np.int64)
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    return np.ascontiguousarray(off), data


def hash_strings(col: pa.Array, seed: int = 0) -> np.ndarray:
    """64-bit hashes of a string column (nulls hash as empty strings)."""
    col = pc.fill_null(_strings(col), "").cast(pa.large_string())
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    n = len(col)
    out = np.zeros(n, np.uint64)
    if n == 0:
        return out
    bufs = col.buffers()
    off = np.frombuffer(bufs[1], np.int64)[col.offset: col.offset + n + 1]
    data = np.frombuffer(bufs[2], np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    _core.hash_strings(np.ascontiguousarray(off), data, seed, out)
    return out


def _in_sorted(values: np.ndarray, table: np.ndarray) -> np.ndarray:
    """``np.isin(values, table)`` for a sorted ``table`` (no sort of the table)."""
    if not len(table):
        return np.zeros(len(values), bool)
    pos = np.minimum(np.searchsorted(table, values), len(table) - 1)
    return table[pos] == values


def _insert_sorted(table: np.ndarray, new: np.ndarray) -> np.ndarray:
    """``np.union1d(table, new)`` for a sorted, distinct ``table``: one pass over the table instead of a
    sort of both (the table grows by a chunk at a time)."""
    new = np.unique(new)
    new = new[~_in_sorted(new, table)]
    return np.insert(table, np.searchsorted(table, new), new) if len(new) else table


class _SeenRefs:
    """The set of ref hashes an import has seen, in bounded memory: the newest up to ``spill`` in RAM
    (sorted), the older ones in sorted runs in files (memory-mapped: read through the page cache, not
    held by the process), merged two at a time when more than ``max_runs`` pile up. Files live in a
    temporary directory removed by :meth:`close`."""

    def __init__(self, spill: int, max_runs: int = 4, block: int = 1 << 20) -> None:
        self.spill, self.max_runs, self.block = spill, max_runs, block
        self.mem = np.zeros(0, np.uint64)
        self.runs: list[tuple[Path, np.ndarray]] = []
        self._dir: Path | None = None
        self._files = 0

    def __len__(self) -> int:
        return len(self.mem) + sum(len(r) for _, r in self.runs)

    def contains(self, h: np.ndarray) -> np.ndarray:
        """Which of ``h`` (sorted, for the page cache's sake) are in the set."""
        out = _in_sorted(h, self.mem)
        for _, run in self.runs:
            out |= _in_sorted(h, run)
        return out

    def add(self, new: np.ndarray) -> None:
        """Add ``new`` (none of them in the set)."""
        self.mem = _insert_sorted(self.mem, new)
        if len(self.mem) >= self.spill:
            self.runs.append(self._write(self.mem))
            self.mem = np.zeros(0, np.uint64)
            while len(self.runs) > self.max_runs:
                self.runs.sort(key=lambda r: len(r[1]))
                (pa_, a), (pb, b) = self.runs[0], self.runs[1]
                merged = self._merge(a, b)
                del a, b
                self.runs = [merged, *self.runs[2:]]
                pa_.unlink()
                pb.unlink()

    def _path(self) -> Path:
        import tempfile

        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="loyalty-import-refs-"))
        self._files += 1
        return self._dir / f"run-{self._files}.u64"

    def _write(self, arr: np.ndarray) -> tuple[Path, np.ndarray]:
        path = self._path()
        arr.tofile(path)
        return path, np.memmap(path, np.uint64, "r")

    def _merge(self, a: np.ndarray, b: np.ndarray) -> tuple[Path, np.ndarray]:
        """One sorted run of two (distinct values), a block of each at a time."""
        path = self._path()
        i = j = 0
        with open(path, "wb") as f:
            while i < len(a) or j < len(b):
                x, y = np.asarray(a[i: i + self.block]), np.asarray(b[j: j + self.block])
                if not len(x) or not len(y):
                    rest = x if len(x) else y
                    rest.tofile(f)
                    i, j = i + len(x), j + len(y)
                    continue
                cut = min(x[-1], y[-1])
                nx, ny = int(np.searchsorted(x, cut, "right")), int(np.searchsorted(y, cut, "right"))
                m = np.concatenate([x[:nx], y[:ny]])
                m.sort()
                m.tofile(f)
                i, j = i + nx, j + ny
        return path, np.memmap(path, np.uint64, "r")

    def close(self) -> None:
        self.runs = []
        self.mem = np.zeros(0, np.uint64)
        if self._dir is not None:
            import shutil

            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


#: Ref hashes an import keeps in RAM (8 bytes each) before it writes them to a sorted run on disk.
SEEN_SPILL = 2_000_000


# -- the import --------------------------------------------------------------------------------------------

#: Transfers per journal entry of a chunk's transaction (a chunk's transfers may take several entries).
ENTRY_TRANSFERS = 8_000_000

@dataclass
class _Chunk:
    cols: dict[str, pa.ChunkedArray]
    file_no: np.ndarray      # index into the parts list
    row: np.ndarray          # row number in its file, from 1
    seq0: int                # stream position of the chunk's first row
    malformed: list[tuple[int, Malformed]]


@dataclass
class _Job:
    """A chunk's transaction, committing in the importer's writer thread while the next chunk is read,
    checked and evaluated. ``undo`` and ``enrolling`` take the chunk back out of the engine's memory if
    it does not commit; ``state`` is the ledger's state once the transaction applied the chunk's
    entries (``applied`` is set then, or when the job ends without getting that far)."""

    undo: list[tuple[np.ndarray, tuple[Any, ...]]]
    enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None
    commits: int                     # the ledger's commits before it: it committed when they differ
    rows_done: int
    rejected: int
    pending: list[list[Any]]
    applied: threading.Event = field(default_factory=threading.Event)
    state: Any = None
    future: Future[None] | None = None


class _Importer:
    def __init__(self, engine: Engine, source: Any, *, columns: dict[str, str] | None, quarantine: Any,
                 progress: bool | None, resume: bool, enroll: bool, scale: int | None, tz: str | None,
                 time_format: str | None, delimiter: str | None, fmt: str | None, chunk_rows: int,
                 import_id: str | None) -> None:
        self.engine = engine
        self.program = engine.program
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or not 1_000 <= chunk_rows <= 4_000_000:
            raise ValidationError(f"chunk_rows must be an integer from 1,000 to 4,000,000, not {chunk_rows!r}")
        if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int) or not 0 <= scale <= 6):
            raise ValidationError(f"scale (decimal places of the source's amounts) must be 0..6, not {scale!r}")
        if tz is not None:
            try:
                from zoneinfo import ZoneInfo
                ZoneInfo(tz)
            except Exception:
                raise ValidationError(f"tz={tz!r} is not a known timezone (e.g. 'UTC', 'Asia/Tehran')") from None
        self.parts: list[Part] = resolve(source, fmt, delimiter)
        self.delimiter = delimiter
        self.mapping = self._mapping(columns)
        self.scale = scale
        self.tz = tz
        self.time_format = time_format
        self.chunk_rows = chunk_rows
        self.enroll = enroll
        self.resume = resume
        self.source_name = (self.parts[0].name if len(self.parts) == 1
                            else f"{self.parts[0].name} and {len(self.parts) - 1} more")
        opts = json.dumps({"map": self.mapping, "scale": scale, "tz": tz, "fmt": time_format,
                           "id": import_id, "chunk": chunk_rows}, sort_keys=True)
        self.key = identity(self.parts, opts) if import_id is None else identity([], opts)
        self.key_hi = int.from_bytes(self.key[8:], "little") & 0x7FFF_FFFF_FFFF_FFFF
        self.quarantine = Path(quarantine) if quarantine is not None else None
        self.total = sum(p.rows for p in self.parts) if all(p.rows is not None for p in self.parts) else None
        self.progress = Progress(self.total, label="import", enabled=progress)
        self.reasons: Counter[int] = Counter()
        self.kernel_reasons: Counter[str] = Counter()
        self.examples: list[dict[str, Any]] = []
        self.seen = _SeenRefs(SEEN_SPILL)            # ref hashes of this source so far (duplicates)
        self.wanted = np.zeros(0, np.uint64)        # refs that returns refer to
        self.remaining: dict[str, list[int]] = {}   # original ref -> [amount left, member, at]
        self.stats = Counter()
        self.writer: Any = None
        self._index: tuple[np.ndarray, np.ndarray] | None = None    # see _member_index
        self._indexed = 0
        self._id_keys, self._id_slots = np.zeros(0, np.int64), np.zeros(0, np.int32)   # _encode_ids' table
        self._writer: ThreadPoolExecutor | None = None   # commits chunk k while chunk k + 1 is evaluated
        self._inflight: _Job | None = None

    def _member_index(self) -> tuple[np.ndarray, np.ndarray]:
        """A hash table of the members' names (their 64-bit hash -> index; see ``_bulk.index_lookup``),
        brought up to date with the engine's members: a chunk's names are looked up without a ``str``
        and a dict probe each. The import holds the engine's lock, so only the import enrolls."""
        names = self.engine._member_names
        n = len(names)
        if self._index is None or self._indexed > n or 2 * n > len(self._index[0]):
            cap = 1 << max(10, (2 * n).bit_length())      # at most half full: 32 to 64 bytes a member
            self._index = (np.zeros(cap, np.uint64), np.full(cap, -1, np.int64))
            self._indexed = 0
        if self._indexed < n:
            new = pa.array(names[self._indexed:], pa.string())
            idx = np.arange(self._indexed, n, dtype=np.int64)
            real = pc.greater(pc.binary_length(new), 0).to_numpy(zero_copy_only=False)   # not the gaps ("")
            _bulk.index_insert(*self._index, hash_strings(new)[real], idx[real])
            self._indexed = n
        return self._index

    # -- set-up --------------------------------------------------------------------------------------
    def _mapping(self, columns: dict[str, str] | None) -> dict[str, str]:
        if columns is not None and not isinstance(columns, dict):
            raise ValidationError(f"columns must map field -> source column (a dict), not {columns!r}")
        columns = dict(columns or {})
        unknown = [k for k in columns if k not in FIELDS]
        if unknown:
            raise ValidationError(f"columns: unknown field(s) {unknown}; the fields are {list(FIELDS)}")
        have = self.parts[0].columns
        for f in FIELDS:
            if f not in columns and f in have:
                columns[f] = f
        for f in REQUIRED:
            if f not in columns:
                raise ValidationError(f"columns: the required field {f!r} is not mapped and the source has no "
                                      f"column {f!r} (its columns: {have}); pass columns={{'{f}': 'its column'}}")
        for part in self.parts:
            missing = [f"{f}={c}" for f, c in columns.items() if c not in part.columns]
            if missing:
                raise ValidationError(f"{part.name}: no column for {', '.join(missing)}; its columns are "
                                      f"{part.columns}")
        if "original" in columns and "kind" not in columns:
            raise ValidationError("columns: 'original' (the receipt a return refers to) needs 'kind' too")
        return columns

    def _checkpoint_key(self) -> bytes:
        return b"I" + self.key

    def _load_checkpoint(self) -> dict[str, Any] | None:
        with self.engine.ledger._ext_begin() as txn:
            raw = txn.get(self._checkpoint_key(), db=self.engine.ledger._ext_db())
        return json.loads(bytes(raw)) if raw is not None else None

    # -- reading -------------------------------------------------------------------------------------
    def _stream(self, columns: list[str], skip: int = 0) -> Any:
        """Chunks of ``chunk_rows`` stream rows (all files in order), from stream position ``skip``."""
        src_cols = list(dict.fromkeys(self.mapping[f] for f in columns))
        pending: list[tuple[int, pa.RecordBatch, np.ndarray]] = []
        have = 0
        pos = 0          # stream position of the next row read
        start = skip
        malformed: list[Malformed] = []
        tagged: list[tuple[int, Malformed]] = []
        for fno, part in enumerate(self.parts):
            if part.rows is not None and pos + part.rows <= skip:
                pos += part.rows
                continue
            malformed.clear()
            for b, rows in batches(part, src_cols, min(self.chunk_rows, 1 << 20), self.delimiter, malformed):
                tagged.extend((fno, m) for m in malformed)
                malformed.clear()
                if pos + b.num_rows <= skip:
                    pos += b.num_rows
                    continue
                if pos < skip:
                    cut = skip - pos
                    b, rows = b.slice(cut), rows[cut:]
                    pos = skip
                pos += b.num_rows
                pending.append((fno, b, rows))
                have += b.num_rows
                while have >= self.chunk_rows:
                    chunk, pending, have = self._take(pending, self.chunk_rows, start, src_cols, tagged)
                    tagged = []
                    start += self.chunk_rows
                    yield chunk
            tagged.extend((fno, m) for m in malformed)
        if have or tagged:
            chunk, pending, have = self._take(pending, have, start, src_cols, tagged)
            yield chunk

    def _take(self, pending: list[tuple[int, pa.RecordBatch, np.ndarray]], n: int, start: int,
              src_cols: list[str], tagged: list[tuple[int, Malformed]]) -> tuple[_Chunk, list[Any], int]:
        got: list[tuple[int, pa.RecordBatch, np.ndarray]] = []
        need = n
        while need:
            fno, b, rows = pending[0]
            if b.num_rows <= need:
                got.append(pending.pop(0))
                need -= b.num_rows
            else:
                got.append((fno, b.slice(0, need), rows[:need]))
                pending[0] = (fno, b.slice(need), rows[need:])
                need = 0
        cols: dict[str, pa.ChunkedArray] = {}
        for c in src_cols:
            arrays = [b.column(c) for _, b, _ in got]
            types = {a.type for a in arrays}
            if len(types) > 1:   # files whose column types differ (e.g. int and text): read as text
                arrays = [_strings(a) for a in arrays]
            cols[c] = pa.chunked_array(arrays, type=arrays[0].type if arrays else pa.string())
        fno_arr = np.concatenate([np.full(b.num_rows, f, np.int32) for f, b, _ in got]) if got \
            else np.zeros(0, np.int32)
        row_arr = np.concatenate([r for _, _, r in got]) if got else np.zeros(0, np.int64)
        left = sum(b.num_rows for _, b, _ in pending)
        return _Chunk(cols, fno_arr, row_arr, start, tagged), pending, left

    # -- the pre-pass: which purchases do returns refer to ------------------------------------------
    def _prepass(self) -> None:
        if "kind" not in self.mapping:
            return
        found: list[np.ndarray] = []
        for ch in self._stream(["kind", "original"] if "original" in self.mapping else ["kind"]):
            kind = pc.utf8_lower(pc.utf8_trim_whitespace(_strings(ch.cols[self.mapping["kind"]])))
            is_ret = pc.is_in(kind, value_set=pa.array(RETURN_KINDS)).fill_null(False).to_numpy(
                zero_copy_only=False)
            if is_ret.any() and "original" in self.mapping:
                orig = ch.cols[self.mapping["original"]].filter(pa.array(is_ret))
                found.append(hash_strings(orig.combine_chunks() if isinstance(orig, pa.ChunkedArray) else orig))
        if found:
            self.wanted = np.unique(np.concatenate(found))

    # -- the run ------------------------------------------------------------------------------------------
    def run(self) -> ImportReport:
        t0 = time.perf_counter()
        cp = self._load_checkpoint()
        resumed_from = 0
        if cp is not None and cp.get("complete"):
            # a run stopped between its last commit and writing the quarantine out: write it now
            partial = self._partial()
            if partial is not None and partial.exists():
                self._write_quarantine(partial)
            return self._report(t0, cp, already=True)
        if cp is not None:
            if not self.resume:
                raise ValidationError(
                    f"an import of {self.source_name} stopped after {cp['rows_done']:,} rows "
                    f"(checkpoint of chunk {cp['chunks']}); run it again with resume=True (--resume) to continue")
            resumed_from = int(cp["rows_done"])
            self.stats.update(cp.get("stats", {}))
            self.reasons.update({int(k): v for k, v in cp.get("reasons", {}).items()})
            self.kernel_reasons.update(cp.get("kernel_reasons", {}))
            if cp.get("pending_refunds"):
                self._refunds(cp["pending_refunds"])
                cp["pending_refunds"] = []
                self._save_checkpoint(cp)
        else:
            cp = {"source": self.source_name, "rows_done": 0, "chunks": 0, "complete": False,
                  "started": time.time(), "stats": {}, "reasons": {}, "kernel_reasons": {}}
        self._prepass()
        self._open_quarantine(resumed_from)
        self.progress.update(resumed_from, self.stats["rejected"], force=True)
        cols = [f for f in FIELDS if f in self.mapping]
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loyalty-import-commit")
        try:
            if resumed_from and "ref" in self.mapping:
                self._replay_refs(resumed_from, cols)
            try:
                for chunk in self._stream(cols, skip=resumed_from):
                    self._chunk(chunk, cp)
                self._finish_job(cp)           # the last chunk's commit, and its returns
            except BaseException:
                self._abort_inflight()         # (a chunk in flight that fails is taken out of memory)
                raise
            cp["complete"] = True
            cp["finished"] = time.time()
            self._save_checkpoint(cp)
        finally:
            self._abort_inflight()
            self._writer.shutdown(wait=True)
            self._writer = None
            self.progress.close()
            self._close_quarantine(cp.get("complete", False))
            self.engine._batch_buffers.clear()     # the chunks' buffers are not kept past the import
            self.engine._kernel.release_scratch()   # (nor the kernel's)
            self.seen.close()
        return self._report(t0, cp, already=False, resumed_from=resumed_from)

    def _dedupe(self, reason: np.ndarray, ref_hash: np.ndarray) -> None:
        """Mark the rows (still good) whose ref an earlier good row used, in this chunk or before, as
        duplicates; the others' refs join the set."""
        live = np.flatnonzero(reason == 0)
        h = ref_hash[live]
        order = np.argsort(h, kind="stable")
        sh = h[order]
        dup_in = np.zeros(len(h), bool)
        dup_in[order[1:]] = sh[1:] == sh[:-1]
        dup_before = np.empty(len(h), bool)
        dup_before[order] = self.seen.contains(sh)
        reason[live[dup_in | dup_before]] = R_DUP
        self.seen.add(h[~(dup_in | dup_before)])

    def _replay_refs(self, upto: int, cols: list[str]) -> None:
        """Rebuild the duplicate-ref set of the rows an earlier run already imported, as that run built
        it: the same checks first (a row refused before the duplicate check leaves its ref free), then
        the trimmed refs of the rows still good."""
        pos = 0
        for ch in self._stream(cols):
            n = len(ch.row)
            take = min(n, upto - pos)
            if take <= 0:
                break
            if take < n:
                ch = _Chunk({k: v.slice(0, take) for k, v in ch.cols.items()}, ch.file_no[:take], ch.row[:take],
                            ch.seq0, [])
            reason, *_, ref_hash = self._row_checks(ch)
            self._dedupe(reason, ref_hash)
            pos += n

    def _report(self, t0: float, cp: dict[str, Any], *, already: bool, resumed_from: int = 0) -> ImportReport:
        # a source imported before reports what this call did: nothing
        st: Counter[str] = Counter() if already else self.stats
        reasons: dict[str, int] = {}
        if not already:
            reasons = {REASONS[k]: v for k, v in self.reasons.items() if k != R_KERNEL}
            for k2, v in self.kernel_reasons.items():
                reasons[k2] = reasons.get(k2, 0) + v
        return ImportReport(
            source=self.source_name, import_id=self.key.hex(), rows_read=st["read"],
            rows_posted=st["sales"] + st["returns"], rows_rejected=st["rejected"], sales_posted=st["sales"],
            returns_posted=st["returns"], members_enrolled=st["enrolled"], points_issued=st["points"],
            points_clawed_back=st["clawback"], credit_issued=st["credit"], offers_granted=st["offers"],
            transfers=st["transfers"], chunks=int(cp.get("chunks", 0)), resumed_from_row=resumed_from,
            already_imported=already, quarantine=str(self.quarantine) if self.quarantine else None,
            reasons=reasons, seconds=time.perf_counter() - t0, examples=[] if already else self.examples)

    # -- one chunk -------------------------------------------------------------------------------------
    def _row_checks(self, ch: _Chunk) -> tuple[Any, ...]:
        """The checks a chunk's rows pass before the duplicate-ref check, and what they parse: the
        reason per row (0 = good so far), the members' dictionary, times, amounts, returns, quantities,
        refs and their hashes. A resumed import replays them to rebuild the duplicate-ref set exactly."""
        m = self.mapping
        n = len(ch.row)
        reason = np.zeros(n, np.int8)

        def mark(mask: np.ndarray, code: int) -> None:
            reason[mask & (reason == 0)] = code

        def col(f: str) -> pa.Array:
            c = ch.cols[m[f]]
            return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

        raw_member = col("member")
        if pa.types.is_integer(raw_member.type):
            # the names are the numbers' text: encode the numbers, and cast only the distinct ones
            mem_dict = self._encode_ids(raw_member)
            mark(pc.is_null(raw_member).to_numpy(zero_copy_only=False), R_MEMBER_NULL)
        else:
            member = _strings(raw_member)
            mark(_blank(member), R_MEMBER_NULL)
            mark(pc.greater(pc.binary_length(member), 200).fill_null(False).to_numpy(zero_copy_only=False),
                 R_MEMBER_LONG)
            mem_dict = pc.dictionary_encode(member)
        at, r_at = convert_times(col("at"), self.tz, self.time_format)
        reason = np.where(reason == 0, r_at, reason)
        scale = self.scale if self.scale is not None else (
            0 if pa.types.is_integer(col("amount").type) else self.program.minor_unit)
        amount, r_amt = convert_amounts(col("amount"), scale)
        reason = np.where(reason == 0, r_amt, reason)
        is_ret = np.zeros(n, bool)
        if "kind" in m:
            kind = pc.utf8_lower(pc.utf8_trim_whitespace(_strings(col("kind"))))
            is_ret = pc.is_in(kind, value_set=pa.array(RETURN_KINDS)).fill_null(False).to_numpy(zero_copy_only=False)
            is_sale = pc.is_in(kind, value_set=pa.array(SALE_KINDS)).fill_null(False).to_numpy(zero_copy_only=False)
            mark(~is_ret & ~is_sale, R_KIND)
        amount = np.where(is_ret, np.abs(amount), amount)
        mark(amount < 0, R_AMT_NEG)
        mark(amount == 0, R_AMT_ZERO)
        qty = np.ones(n, np.int64)
        if "quantity" in m:
            q, r_q = convert_amounts(col("quantity"), 0)
            mark((r_q > 0) | (q < 0), R_QTY)
            qty = np.maximum(q, 0)
        refs: pa.Array | None = None
        ref_hash = np.zeros(n, np.uint64)
        if "ref" in m:
            refs = pc.utf8_trim_whitespace(_strings(col("ref")))
            mark(_blank(refs), R_REF_NULL)
            ref_hash = hash_strings(refs)
        return reason, raw_member, mem_dict, at, amount, is_ret, qty, refs, ref_hash

    def _encode_ids(self, ids: pa.Array) -> pa.DictionaryArray:
        """``pc.dictionary_encode`` of integer member ids, with the distinct ones as text (the same
        dictionary, in the same order), by ``_bulk.encode_ids`` in a hash table kept from chunk to chunk:
        Arrow's grows a fresh table every chunk, and first touches of fresh memory are dear here."""
        n = len(ids)
        wide = ids.type if ids.type.bit_width == 64 else pa.int64()
        values = np.frombuffer(ids.cast(wide).buffers()[1], np.uint64 if pa.types.is_unsigned_integer(wide)
                               else np.int64, n, (ids.offset if wide == ids.type else 0) * 8)
        valid = (ids.is_valid().to_numpy(zero_copy_only=False).view(np.uint8) if ids.null_count
                 else np.zeros(0, np.uint8))
        cap = 1 << max(4, (2 * n - 1).bit_length())
        if len(self._id_keys) < cap:
            self._id_keys, self._id_slots = np.empty(cap, np.int64), np.empty(cap, np.int32)
        codes, uniques = np.empty(n, np.int64), np.empty(n, np.int64)
        nu = _bulk.encode_ids(values.view(np.int64), valid, self._id_keys[:cap], self._id_slots[:cap], codes,
                              uniques)
        distinct = pa.array(uniques[:nu].view(values.dtype))
        return pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), _strings(distinct))

    def _chunk(self, ch: _Chunk, cp: dict[str, Any]) -> None:
        eng = self.engine
        m = self.mapping
        n = len(ch.row)
        reason, raw_member, mem_dict, at, amount, is_ret, qty, refs, ref_hash = self._row_checks(ch)

        def mark(mask: np.ndarray, code: int) -> None:
            reason[mask & (reason == 0)] = code

        def col(f: str) -> pa.Array:
            c = ch.cols[m[f]]
            return c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c

        if "ref" in m:
            self._dedupe(reason, ref_hash)
        originals: pa.Array | None = None
        if "original" in m:
            originals = pc.utf8_trim_whitespace(_strings(col("original")))
            mark(is_ret & _blank(originals), R_NO_ORIG)
        elif is_ret.any():
            mark(is_ret, R_NO_ORIG)

        # members: known ones, and new ones enrolled at their first purchase in the source
        good = reason == 0
        off, data = _string_buffers(mem_dict.dictionary)
        codes = mem_dict.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        uidx = np.empty(len(off) - 1, np.int64)      # the dictionary's members (-1: not a member)
        hashes = np.empty(len(uidx), np.uint64)
        _core.hash_strings(off, data, 0, hashes)
        _bulk.index_lookup(*self._member_index(), hashes, off, data, eng._member_names, uidx)

        def row_members() -> np.ndarray:
            if not len(uidx):
                return np.full(n, -1, np.int64)
            return np.where(codes >= 0, uidx[np.maximum(codes, 0)], -1)

        midx = row_members()
        enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None = None
        undo: list[tuple[np.ndarray, tuple[Any, ...]]] = []
        first_new = len(eng._member_names)      # (what this chunk enrolls starts here: undone from here)
        try:
            unknown = good & ~is_ret & (midx < 0)
            if unknown.any():
                if not self.enroll:
                    mark(unknown, R_UNKNOWN_MEMBER)
                else:
                    # the dictionary's names are distinct, unknown, and checked above (not blank, at most 200
                    # bytes)
                    first_at = np.full(len(uidx), np.iinfo(np.int64).max, np.int64)
                    np.minimum.at(first_at, codes[unknown], at[unknown])
                    new_codes = np.flatnonzero(first_at < np.iinfo(np.int64).max)
                    # they are members in memory now; their accounts and records commit with the chunk
                    names_new = _bulk.take_strings(off, data, new_codes)
                    first, entries = eng._enroll_prepare(names_new, first_at[new_codes])
                    enrolling = (first, names_new, entries)
                    uidx[new_codes] = np.arange(first, first + len(new_codes), dtype=np.int64)
                    midx = row_members()
            mark(~is_ret & (midx < 0), R_UNKNOWN_MEMBER)
            job = self._post(ch, cp, reason, midx, at, amount, qty, is_ret, refs, ref_hash, originals,
                             enrolling, undo)
        except BaseException:
            job = self._inflight
            if job is not None and job.undo is undo:
                # the chunk was handed to the writer (an interrupt came after): it may commit yet, so
                # wait for it and take it out only if it did not (the chunk before it had committed)
                self._abort_inflight()
            else:
                # the chunk did not get to commit: the engine's memory as it was before it (its enrolments
                # too, even one interrupted half way), and as it was before the chunk in flight too if that
                # one did not commit (in this order: the later first)
                self._restore(undo, None)
                eng._enroll_undo(first_new)
                self._abort_inflight()
            raise
        if job.pending:     # returns are refunds of what committed: before the next chunk is evaluated
            self._finish_job(cp)

    def _restore(self, undo: list[tuple[np.ndarray, tuple[Any, ...]]],
                 enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None) -> None:
        """Take a chunk that did not commit out of the engine's memory (``undo``: what its members,
        offer use, budget and histories were before it)."""
        eng = self.engine
        for involved, saved in reversed(undo):
            eng._members[involved], eng._offer_use[involved], eng._budget, hist = saved
            for k in involved.tolist():     # (the histories of the members it involved, as they were)
                h = hist.get(k)
                if h is None:
                    eng._hist.pop(k, None)
                else:
                    eng._hist[k] = h
        if enrolling is not None:
            eng._enroll_undo(enrolling[0])

    def _settle(self) -> _Job | None:
        """Wait for the chunk in flight to commit (its error is raised here, the chunk left in flight
        for :meth:`_abort_inflight` to take back); returns it."""
        job = self._inflight
        if job is None:
            return None
        assert job.future is not None
        job.future.result()
        self._inflight = None
        self.progress.update(job.rows_done, job.rejected)
        return job

    def _finish_job(self, cp: dict[str, Any]) -> None:
        """The chunk in flight committed, then its returns (refunds) and the checkpoint that says so."""
        job = self._settle()
        if job is not None and job.pending:
            self._refunds(job.pending)
            cp["pending_refunds"] = []
            self._stats_into(cp)
            self._save_checkpoint(cp)

    def _abort_inflight(self) -> None:
        """After an error: wait for the chunk in flight to end, and take it out of memory unless it
        committed. The job stays the one in flight until that is done, so an interrupt meanwhile (a
        second Ctrl-C) neither loses it nor stops the wait."""
        job = self._inflight
        if job is None:
            return
        interrupted: BaseException | None = None
        while True:
            try:
                if job.future is None:
                    # the hand-over itself was interrupted: the work may be queued; shutting the writer
                    # down waits for whatever is
                    if self._writer is not None:
                        self._writer.shutdown(wait=True)
                else:
                    wait([job.future])        # (the transaction cannot be stopped half-way)
                break
            except BaseException as e:        # noqa: BLE001 - an interrupt: the commit ends first
                interrupted = e
        if self.engine.ledger.commits == job.commits:
            self._restore(job.undo, job.enrolling)
        self._inflight = None
        if interrupted is not None:
            raise interrupted

    def _refresh_points(self, idx: np.ndarray) -> None:
        """:meth:`Engine._refresh_points`, also while the chunk before commits: then from the ledger's
        state once that chunk's transaction applied its entries, the balances it commits (if it does
        not, this chunk is taken back with it)."""
        eng = self.engine
        job = self._inflight
        if job is not None:
            job.applied.wait()
            if job.state is None:       # it ended before applying its entries: its error is raised here
                self._settle()
        job = self._inflight
        if job is None:
            eng._refresh_points(idx)
            return
        from .ledger import available_in_state

        state = job.state               # (reads only; the writer thread no longer changes it)
        eng._refresh_points(idx, lambda ids: available_in_state(state, ids))

    def _post(self, ch: _Chunk, cp: dict[str, Any], reason: np.ndarray, midx: np.ndarray, at: np.ndarray,
              amount: np.ndarray, qty: np.ndarray, is_ret: np.ndarray, refs: pa.Array | None, ref_hash: np.ndarray,
              originals: pa.Array | None, enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None,
              undo: list[tuple[np.ndarray, tuple[Any, ...]]]) -> _Job:
        """Steps 4 to 7 of a chunk whose rows are checked and whose members are known (``enrolling``:
        the ones this chunk enrolls, not committed yet): the kernel, the returns, the quarantine, the
        commit (started in the writer thread once the chunk before committed). Appends to ``undo`` what
        to restore if it fails; returns its job (its refunds to make once it committed)."""
        from .engine import _distinct

        eng = self.engine
        n = len(ch.row)
        # sales, in time order, through the kernel (which changes the state of the members and their
        # referrers: keep a copy of theirs until the chunk commits)
        sales = np.flatnonzero((reason == 0) & ~is_ret)
        sales = sales[np.argsort(at[sales], kind="stable")]
        buyers = midx[sales]
        involved = np.concatenate([buyers, eng._members["referrer"][buyers]])
        involved = _distinct(involved[involved >= 0], len(eng._member_names))
        undo.append((involved, (eng._members.view(f"V{eng._members.itemsize}")[involved].view(eng._members.dtype),
                                eng._offer_use[involved], eng._budget.copy(),
                                _bulk.take_values(eng._hist, involved))))
        o, status, day = self._evaluate(ch, sales, midx, at, amount, qty, involved, enrolling)
        refused = status != 0
        ktext: dict[int, str] = {}
        if refused.any():
            from .engine import _STATUS_TEXT, RowStatus
            for s_code in np.unique(status[refused]).tolist():
                self.kernel_reasons[_STATUS_TEXT[RowStatus(s_code)]] += int((status == s_code).sum())
            for i, s_code in zip(sales[refused].tolist(), status[refused].tolist(), strict=True):
                ktext[i] = _STATUS_TEXT[RowStatus(s_code)]
            reason[sales[refused]] = R_KERNEL
        posted, o_ok = (sales[~refused], o[~refused]) if refused.any() else (sales, o)

        # returns: against their original (in this source or stored), in time order
        pending: list[list[Any]] = []
        ret_rows = np.flatnonzero((reason == 0) & is_ret)
        want_rec: list[int] = []
        if len(self.wanted) and len(posted):
            hit = np.isin(ref_hash[posted], self.wanted)
            want_rec = np.flatnonzero(hit).tolist()
            posted_refs = refs.take(pa.array(posted[hit])).to_pylist() if refs is not None else []
            for k, r in zip(want_rec, posted_refs, strict=True):
                self.remaining[r] = [int(amount[posted[k]]), int(midx[posted[k]]), int(at[posted[k]])]
        if len(ret_rows):
            self._settle()      # (their originals may be read from the ledger: the chunk before committed)
            ret_rows = ret_rows[np.argsort(at[ret_rows], kind="stable")]
            orig_list = originals.take(pa.array(ret_rows)).to_pylist() if originals is not None else []
            ref_list = refs.take(pa.array(ret_rows)).to_pylist() if refs is not None else \
                [f"{self.key.hex()[:16]}:{ch.seq0 + int(i)}" for i in ret_rows]
            for i, orig, rref in zip(ret_rows.tolist(), orig_list, ref_list, strict=True):
                left = self.remaining.get(orig)
                if left is None:
                    rec = eng._receipt(orig)
                    if rec is not None and int(rec["kind"]) == 0:
                        left = [int(rec["amount"]) - int(rec["refunded"]), int(rec["member"]), int(rec["at"])]
                        self.remaining[orig] = left
                if left is None:
                    reason[i] = R_ORIG_UNKNOWN
                elif at[i] < left[2]:
                    reason[i] = R_RET_EARLY
                elif amount[i] > left[0]:
                    reason[i] = R_RET_EXCEEDS
                else:
                    left[0] -= int(amount[i])
                    pending.append([orig, int(amount[i]), int(at[i]), rref])

        # the quarantine first (a crash after this loses nothing), then one transaction
        bad = reason != 0
        self._quarantine(ch, reason, bad, ktext)
        recs = self._transfers(ch, posted, midx, o_ok, at, day[~refused] if refused.any() else day)
        touched = np.concatenate([midx[posted], o_ok["referrer"][o_ok["referrer"] >= 0]])
        receipts = self._receipts(posted, want_rec, midx, at, amount, o_ok, refs)
        n_bad = int(bad.sum())
        self.stats["read"] += n
        self.stats["rejected"] += n_bad
        self.stats["sales"] += len(posted)
        self.stats["points"] += int(o_ok["points"].sum() + o_ok["referrer_points"].sum())
        self.stats["credit"] += int(o_ok["credit"].sum())
        self.stats["offers"] += int(np.unpackbits(o_ok["offers_fired"].astype("<u8").view(np.uint8)).sum())
        self.stats["transfers"] += len(recs)
        if enrolling is not None:
            touched = np.concatenate([touched, np.arange(enrolling[0], enrolling[0] + len(enrolling[1]))])
            self.stats["enrolled"] += len(enrolling[1])
        for code_, k in zip(*np.unique(reason[bad], return_counts=True), strict=True):
            self.reasons[int(code_)] += int(k)
        cp["rows_done"] = ch.seq0 + n
        cp["chunks"] = int(cp["chunks"]) + 1
        cp["pending_refunds"] = pending
        self._stats_into(cp)
        return self._commit(recs, touched, receipts, cp, enrolling, undo)

    def _commit(self, recs: np.ndarray, touched: np.ndarray, receipts: list[tuple[bytes, bytes]],
                cp: dict[str, Any], enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None,
                undo: list[tuple[np.ndarray, tuple[Any, ...]]]) -> _Job:
        """The chunk's one transaction: the enrolled members' accounts and bonuses (journal entries of
        their own, as enroll_batch writes them), the transfers (an entry per 8 M), the members' records,
        the budget, the receipts and the checkpoint. All of it commits together or none of it does.

        It runs in the writer thread once the chunk before committed (LMDB writes, page writes and the
        fsync release the GIL), while this thread goes on with the next chunk: what it stores is copied
        here (the members' records, the budget, the checkpoint), as the next chunk changes memory."""
        from .ledger import KIND_TRANSFERS

        eng = self.engine
        head = list(enrolling[2]) if enrolling is not None else []
        parts = [(KIND_TRANSFERS, recs[start: start + ENTRY_TRANSFERS])
                 for start in range(0, max(len(recs), 1), ENTRY_TRANSFERS)]
        frozen = eng._members_frozen(np.asarray(touched, np.int64))
        cp_value = json.dumps(cp).encode()
        chunk_no = cp["chunks"]
        key = self._checkpoint_key()

        def extra(txn: lmdb.Transaction, all_results: list[np.ndarray]) -> None:
            job.state = eng.ledger._state      # the balances with this chunk's entries: the next chunk's
            job.applied.set()
            done = 0
            for results in all_results[len(head):]:
                bad_r = np.flatnonzero((results != 0) & (results != 3))
                if len(bad_r):
                    from .types import TransferResult
                    raise StorageError(f"import: the ledger refused transfer {done + int(bad_r[0])} of chunk "
                                       f"{chunk_no}: {TransferResult(int(results[bad_r[0]])).name}")
                done += len(results)
            if enrolling is not None:
                first, names, _ = enrolling
                eng._enroll_check(all_results)
                eng._put_names(txn, first, names)
            db = eng.ledger._ext_db()
            eng._put_frozen(txn, frozen)
            if receipts:
                txn.cursor(db=db).putmulti(receipts)
            txn.put(key, cp_value, db=db)

        def work() -> None:
            try:
                # (not Engine._entries_with: an import writes no events, so there are no numbers to give back)
                eng.ledger._entries_with([*head, *parts], extra)
            finally:
                job.applied.set()

        self._settle()          # the chunk before committed (or its error is raised here)
        job = _Job(undo=undo, enrolling=enrolling, commits=eng.ledger.commits, rows_done=int(cp["rows_done"]),
                   rejected=int(self.stats["rejected"]), pending=list(cp["pending_refunds"]))
        assert self._writer is not None
        self._inflight = job            # (before the hand-over: an interrupt inside submit() still finds it)
        job.future = self._writer.submit(work)
        return job

    def _stats_into(self, cp: dict[str, Any]) -> None:
        cp["stats"] = dict(self.stats)
        cp["reasons"] = {str(k): v for k, v in self.reasons.items()}
        cp["kernel_reasons"] = dict(self.kernel_reasons)

    def _save_checkpoint(self, cp: dict[str, Any]) -> None:
        eng = self.engine

        def extra(txn: lmdb.Transaction, results: np.ndarray) -> None:
            txn.put(self._checkpoint_key(), json.dumps(cp).encode(), db=eng.ledger._ext_db())

        eng._post_with(np.zeros(0, RECORD_DTYPE), extra)

    def _refunds(self, pending: list[list[Any]]) -> None:
        for orig, amount, at_us, rref in pending:
            try:
                r = self.engine.refund(orig, amount=amount, at=at_us, ref=rref)
            except (NotFoundError, ValidationError) as e:   # checked before the commit: should not happen
                raise StorageError(f"import: the return {rref!r} of {orig!r} could not be refunded: {e}") from e
            self.stats["returns"] += 1
            self.stats["clawback"] += r.points_taken

    # -- evaluation and posting -----------------------------------------------------------------------
    def _evaluate(self, ch: _Chunk, sales: np.ndarray, midx: np.ndarray, at: np.ndarray, amount: np.ndarray,
                  qty: np.ndarray, involved: np.ndarray,
                  enrolling: tuple[int, list[str], list[tuple[int, np.ndarray]]] | None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kernel's output and status of each sale (in the order of ``sales``), and its local day;
        ``involved`` are the members of the sales and their referrers (sorted, distinct). The points of
        the members enrolled by this chunk are their sign-up bonus (their accounts are not in the
        ledger before the chunk commits); the others' come from the ledger."""
        from .engine import OUT, ROW, _purchase_rows

        eng = self.engine
        k = len(sales)
        if k == 0:
            return np.zeros(0, OUT), np.zeros(0, np.int32), np.zeros(0, np.int64)
        sym = self.program.symbols.tables
        zero = np.zeros(k, np.int32)
        sy = {f: self._symbols(ch, f, sym[f])[sales] if f in self.mapping else zero
              for f in ("branch", "channel", "category", "sku")}
        has_items = "category" in self.mapping or "sku" in self.mapping
        local = eng._local_fields(at[sales])
        rows, icat, isku, iamt = _purchase_rows(
            midx[sales], amount[sales], qty[sales], local, sy["branch"], sy["channel"],
            sy["category"] if has_items else None, sy["sku"] if has_items else None,
            into=eng._batch_buffer("rows", k, ROW))     # (every byte written)
        self._refresh_points(involved if enrolling is None else involved[involved < enrolling[0]])
        o = eng._evaluate(rows, icat, isku, iamt, reuse=True)   # valid until the next chunk
        return o, o["status"].astype(np.int32), local["day"]

    def _symbols(self, ch: _Chunk, f: str, table: dict[str, int]) -> np.ndarray:
        from .engine import _sym_column

        c = ch.cols[self.mapping[f]]
        out = []
        for part in (c.chunks if isinstance(c, pa.ChunkedArray) else [c]):
            if pa.types.is_dictionary(part.type):     # the symbols of the dictionary, taken per row
                of_dict = _sym_column(pa.table({f: _strings(part.dictionary)}), f, table)
                idx = part.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
                out.append(np.where(idx >= 0, of_dict[np.maximum(idx, 0)], 0).astype(np.int32) if len(of_dict)
                           else np.zeros(len(part), np.int32))
            else:
                out.append(_sym_column(pa.table({f: _strings(part)}), f, table))
        return np.concatenate(out) if out else np.zeros(0, np.int32)

    def _transfers(self, ch: _Chunk, posted: np.ndarray, midx: np.ndarray, o: np.ndarray,
                   at: np.ndarray, day: np.ndarray) -> np.ndarray:
        """Per-member aggregates: points earned (per member and expiry), credit (per member), referral
        bonuses (per referrer and expiry). Ids: this import's key, the chunk number and the position among
        the chunk's transfers."""
        from .engine import CREDIT, ISSUE_CREDIT, ISSUE_POINTS, POINTS, _small_unique, credit_account, points_account

        eng = self.engine
        if len(posted) == 0:
            return np.zeros(0, RECORD_DTYPE)
        m = midx[posted]
        a = at[posted]
        exp = eng._expiry(a, day)
        chunk_no = (ch.seq0 // self.chunk_rows) & 0xFFFFFF

        # a group is (member, expiry), or the member alone: one int64 key, member * expiries + the
        # expiry's rank, so that groups in key order are in (member, expiry) order
        exp_values, exp_rank = np.unique(exp, return_inverse=True)
        n_exp = len(exp_values)
        bound = len(eng._member_names) * n_exp
        if bound >= 1 << 62:
            raise ValidationError(f"import: {len(eng._member_names):,} members times {n_exp:,} expiry dates "
                                  f"in one chunk is too many; give a smaller chunk_rows")

        def group(member: np.ndarray, amt: np.ndarray, expiring: bool) -> tuple[Any, ...] | None:
            sel = np.flatnonzero(amt > 0)
            if not len(sel):
                return None
            if expiring:
                keys, inv = _small_unique(member[sel] * n_exp + exp_rank[sel], bound)
                owner = keys // n_exp
            else:
                keys, inv = _small_unique(member[sel], len(eng._member_names))
                owner = keys
            total = np.zeros(len(keys), np.int64)
            np.add.at(total, inv, amt[sel])
            last = np.full(len(keys), np.iinfo(np.int64).min, np.int64)
            np.maximum.at(last, inv, a[sel])
            return keys, owner, total, last

        groups = [(group(m, o["points"], True), ISSUE_POINTS, points_account, POINTS, Code.EARN, True),
                  (group(m, o["credit"], False), ISSUE_CREDIT, credit_account, CREDIT, Code.CREDIT, False),
                  (group(np.maximum(o["referrer"], 0), o["referrer_points"], True), ISSUE_POINTS, points_account,
                   POINTS, Code.BONUS, True)]
        # the chunk's transfers in one array, each group's in its slice (no copy joining them)
        recs = np.zeros(sum(len(g[0][0]) for g in groups if g[0] is not None), RECORD_DTYPE)
        placed = 0
        for g, debit, credit_of, asset, code, expiring in groups:
            if g is None:
                continue
            keys, owner, total, last = g
            part = recs[placed: placed + len(keys)]
            # the position among the chunk's transfers: one arithmetic run of ids a chunk, which the
            # ledger keeps as a run instead of an entry per id (see Ledger._ensure_ids)
            pos = np.arange(placed, placed + len(keys), dtype=np.uint64)
            placed += len(keys)
            part["id_hi"] = self.key_hi
            part["id_lo"] = (np.uint64(chunk_no) << np.uint64(40)) | pos
            part["debit"] = debit
            part["credit"] = credit_of(owner)
            part["amount"] = total
            part["at"] = last
            if expiring:
                part["expires_at"] = exp_values[keys % n_exp]
            part["asset"] = asset
            part["code"] = code
        return recs

    def _receipts(self, posted: np.ndarray, want: list[int], midx: np.ndarray, at: np.ndarray,
                  amount: np.ndarray, o: np.ndarray, refs: pa.Array | None) -> list[tuple[bytes, bytes]]:
        """Receipts of the purchases that a return in this source refers to (so that the return, a
        refund, finds what the purchase earned)."""
        from .engine import RECEIPT_DTYPE

        if not want or refs is None:
            return []
        rows = posted[want]
        rec = np.zeros(len(rows), RECEIPT_DTYPE)
        rec["member"], rec["at"], rec["amount"] = midx[rows], at[rows], amount[rows]
        rec["out"] = o[want]
        names = refs.take(pa.array(rows)).to_pylist()
        return sorted((b"R" + r.strip().encode(), rec[k].tobytes()) for k, r in enumerate(names))

    # -- the quarantine ---------------------------------------------------------------------------------
    def _partial(self) -> Path | None:
        return None if self.quarantine is None else self.quarantine.with_name(self.quarantine.name + ".partial")

    def _schema(self) -> pa.Schema:
        fields = [pa.field("file", pa.string()), pa.field("row", pa.int64()), pa.field("reason", pa.string())]
        for f in FIELDS:
            if f in self.mapping:
                fields.append(pa.field(self.mapping[f], pa.string()))
        fields.append(pa.field("line", pa.string()))
        fields.append(pa.field("_seq", pa.int64()))
        return pa.schema(fields)

    def _open_quarantine(self, resumed_from: int) -> None:
        partial = self._partial()
        if partial is None:
            return
        kept: pa.Table | None = None
        if resumed_from and partial.exists():
            try:
                with ipc.open_stream(partial) as r:
                    got = []
                    while True:
                        try:
                            got.append(r.read_next_batch())
                        except (StopIteration, pa.ArrowInvalid, OSError):
                            break
                kept = pa.Table.from_batches(got, schema=self._schema()) if got else None
            except (pa.ArrowInvalid, OSError):
                kept = None
            if kept is not None:
                kept = kept.filter(pc.less(kept.column("_seq"), resumed_from))
        partial.parent.mkdir(parents=True, exist_ok=True)
        self._qfile = open(partial, "wb")
        self.writer = ipc.new_stream(self._qfile, self._schema())
        if kept is not None and kept.num_rows:
            self.writer.write_table(kept)
            self._qfile.flush()

    def _quarantine(self, ch: _Chunk, reason: np.ndarray, bad: np.ndarray, kernel_text: dict[int, str]) -> None:
        rows = np.flatnonzero(bad)
        texts = REASONS
        if len(self.examples) < 20 and len(rows):
            for i in rows[: 20 - len(self.examples)].tolist():
                rec = {"file": self.parts[int(ch.file_no[i])].name, "row": int(ch.row[i]),
                       "reason": kernel_text.get(i, REASONS[R_KERNEL]) if (kernel_text and reason[i] == R_KERNEL)
                       else texts[int(reason[i])]}
                for f in FIELDS:
                    if f in self.mapping:
                        rec[self.mapping[f]] = ch.cols[self.mapping[f]][i].as_py()
                self.examples.append(rec)
        for _ in ch.malformed:
            self.stats["read"] += 1
            self.stats["rejected"] += 1
            self.reasons[R_MALFORMED] += 1
        if self.writer is None or (not len(rows) and not ch.malformed):
            return
        sel = pa.array(rows)
        cols: dict[str, Any] = {
            "file": pa.array([self.parts[int(f)].name for f in ch.file_no[rows]], pa.string()),
            "row": pa.array(ch.row[rows], pa.int64()),
            "reason": pa.array([kernel_text.get(i, REASONS[R_KERNEL]) if (kernel_text and reason[i] == R_KERNEL)
                                else texts[int(reason[i])] for i in rows.tolist()], pa.string()),
        }
        for f in FIELDS:
            if f in self.mapping:
                c = ch.cols[self.mapping[f]]
                c = c.combine_chunks() if isinstance(c, pa.ChunkedArray) else c
                cols[self.mapping[f]] = _strings(c.take(sel))
        cols["line"] = pa.nulls(len(rows), pa.string())
        cols["_seq"] = pa.array(ch.seq0 + rows, pa.int64())
        t = pa.table(cols, schema=self._schema())
        if ch.malformed:
            extra: dict[str, Any] = {
                "file": pa.array([self.parts[f].name for f, _ in ch.malformed], pa.string()),
                "row": pa.array([mm.row for _, mm in ch.malformed], pa.int64()),
                "reason": pa.array([f"{REASONS[R_MALFORMED]}: {mm.reason}" for _, mm in ch.malformed], pa.string()),
            }
            for f in FIELDS:
                if f in self.mapping:
                    extra[self.mapping[f]] = pa.nulls(len(ch.malformed), pa.string())
            extra["line"] = pa.array([mm.text for _, mm in ch.malformed], pa.string())
            extra["_seq"] = pa.array([ch.seq0] * len(ch.malformed), pa.int64())
            t = pa.concat_tables([t, pa.table(extra, schema=self._schema())])
        self.writer.write_table(t)
        self._qfile.flush()
        os.fsync(self._qfile.fileno())

    def _close_quarantine(self, complete: bool) -> None:
        if self.writer is None:
            return
        self.writer.close()
        self._qfile.close()
        partial = self._partial()
        if not complete or partial is None or self.quarantine is None:
            return
        self._write_quarantine(partial)

    def _write_quarantine(self, partial: Path) -> None:
        """The quarantine file from its side file (every chunk's bad rows, written before its commit)."""
        assert self.quarantine is not None
        with ipc.open_stream(partial) as r:
            t = r.read_all().drop_columns(["_seq"])
        t = t.sort_by([("file", "ascending"), ("row", "ascending")]) if t.num_rows else t
        if all(v is None for v in t.column("line").to_pylist()):
            t = t.drop_columns(["line"])
        suffix = self.quarantine.suffix.lower()
        tmp = self.quarantine.with_name(self.quarantine.name + ".tmp")
        if suffix == ".csv":
            pacsv.write_csv(t, tmp)
        elif suffix in (".arrow", ".feather", ".ipc"):
            with ipc.new_file(tmp, t.schema) as w:
                w.write_table(t)
        else:
            pq.write_table(t, tmp)
        os.replace(tmp, self.quarantine)
        partial.unlink()


def import_sales(engine: Engine, source: Any, *, columns: dict[str, str] | None = None, quarantine: Any = None,
                 progress: bool | None = None, resume: bool = False, enroll: bool = True, scale: int | None = None,
                 tz: str | None = None, time_format: str | None = None, delimiter: str | None = None,
                 format: str | None = None, chunk_rows: int = 1_000_000,
                 import_id: str | None = None) -> ImportReport:
    """See :meth:`Engine.import_sales`."""
    with engine._lock:
        return _Importer(engine, source, columns=columns, quarantine=quarantine, progress=progress, resume=resume,
                         enroll=enroll, scale=scale, tz=tz, time_format=time_format, delimiter=delimiter,
                         fmt=format, chunk_rows=chunk_rows, import_id=import_id).run()
