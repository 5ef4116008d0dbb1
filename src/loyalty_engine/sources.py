"""Sources of sales history for the bulk import: Parquet, CSV (any delimiter, or columns separated by
runs of spaces), Arrow IPC (file or stream), a directory or glob of them, a pyarrow Table, a pandas or
polars DataFrame. Each is read as a stream of record batches in bounded memory, with the name of its
file and the number of each row, so that a bad row can be named to a person."""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from .errors import ValidationError

FORMATS = ("parquet", "csv", "ipc")
_SUFFIX = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".tsv": "csv", ".txt": "csv",
           ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc", ".arrows": "ipc"}
WHITESPACE = "whitespace"


@dataclass(slots=True)
class Malformed:
    """A CSV line that could not be split into the header's columns."""

    row: int          # its data-row number (1 = the first line after the header)
    text: str
    reason: str


@dataclass(slots=True)
class Part:
    """One file (or in-memory table) of a source."""

    name: str
    fmt: str
    path: Path | None = None
    table: pa.Table | None = None
    rows: int | None = None
    columns: list[str] = field(default_factory=list)
    size: int = 0


def _fmt_of(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise ValidationError(f"format must be one of {FORMATS}, not {fmt!r}")
        return fmt
    name = path.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    suffix = Path(name).suffix
    if suffix not in _SUFFIX:
        raise ValidationError(f"{path}: cannot tell the format from the name {path.name!r}; "
                              f"name it .parquet, .csv, .txt, .arrow or .feather, or pass format=")
    return _SUFFIX[suffix]


def _as_table(obj: Any) -> pa.Table | None:
    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    mod = type(obj).__module__.split(".")[0]
    if mod == "polars":
        return obj.to_arrow()
    if mod == "pandas":
        return pa.Table.from_pandas(obj, preserve_index=False)
    return None


def resolve(source: Any, fmt: str | None = None, delimiter: str | None = None) -> list[Part]:
    """The parts of ``source`` in reading order (files sorted by name)."""
    table = _as_table(source)
    if table is not None:
        return [Part(name="<table>", fmt="table", table=table, rows=table.num_rows, columns=table.column_names)]
    items = list(source) if isinstance(source, list | tuple) else [source]
    paths: list[Path] = []
    for item in items:
        if not isinstance(item, str | os.PathLike):
            raise ValidationError(f"a source is a path, a glob, a directory, a list of paths, a pyarrow Table or a "
                                  f"pandas/polars DataFrame, not {type(item).__name__}")
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith((".", "_")))
            if not found:
                raise ValidationError(f"{p}: the directory holds no files to import")
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif any(ch in str(item) for ch in "*?["):
            found = sorted(Path(q) for q in glob.glob(str(item)) if Path(q).is_file())
            if not found:
                raise ValidationError(f"{item}: no file matches the pattern")
            paths.extend(found)
        else:
            raise ValidationError(f"{item}: no such file or directory")
    parts = [Part(name=str(p), fmt=_fmt_of(p, fmt), path=p, size=p.stat().st_size) for p in paths]
    for part in parts:
        _inspect(part, delimiter)
    return parts


def _open_bytes(path: Path) -> io.BufferedIOBase:
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    return open(path, "rb")


def sniff_delimiter(head: bytes) -> str:
    """The delimiter of a CSV from its first line: the most frequent of , ; tab |, or runs of spaces."""
    first = head.split(b"\n", 1)[0].rstrip(b"\r")
    counts = {d: first.count(d.encode()) for d in (",", ";", "\t", "|")}
    best = max(counts, key=lambda d: counts[d])
    if counts[best]:
        return best
    if re.search(rb"\S\s+\S", first):
        return WHITESPACE
    return ","


class _SpacesToCommas(io.RawIOBase):
    """A byte stream that rewrites columns separated by runs of spaces or tabs (leading ones dropped) into
    comma-separated lines, block by block, for Arrow's CSV reader."""

    def __init__(self, raw: io.BufferedIOBase, block: int = 1 << 22) -> None:
        self.raw = raw
        self.block = block
        self.pending = b""
        self.out = b""
        self.eof = False

    def readable(self) -> bool:
        return True

    def _fill(self) -> None:
        while not self.out and not self.eof:
            data = self.raw.read(self.block)
            if not data:
                self.eof = True
                text = self.pending
                self.pending = b""
            else:
                buf = self.pending + data
                cut = buf.rfind(b"\n")
                if cut < 0:
                    self.pending = buf
                    continue
                text, self.pending = buf[: cut + 1], buf[cut + 1:]
            text = re.sub(rb"(?m)^[ \t]+|[ \t]+(?=\r?$)|\r", b"", text)
            self.out = re.sub(rb"[ \t]+", b",", text)

    def readinto(self, b: Any) -> int:
        self._fill()
        n = min(len(b), len(self.out))
        b[:n] = self.out[:n]
        self.out = self.out[n:]
        return n

    def close(self) -> None:
        self.raw.close()
        super().close()


def _csv_stream(part: Part, delimiter: str | None) -> tuple[Any, str]:
    raw = _open_bytes(part.path)  # type: ignore[arg-type]
    head = raw.peek(1 << 16)[: 1 << 16] if hasattr(raw, "peek") else b""
    delim = delimiter or sniff_delimiter(head)
    if delim == WHITESPACE:
        return io.BufferedReader(_SpacesToCommas(raw)), delim
    return raw, delim


def _inspect(part: Part, delimiter: str | None) -> None:
    if part.fmt == "parquet":
        f = pq.ParquetFile(part.path)
        part.rows = f.metadata.num_rows
        part.columns = f.schema_arrow.names
    elif part.fmt == "ipc":
        try:
            with ipc.open_file(part.path) as r:
                part.rows = sum(r.get_batch(i).num_rows for i in range(r.num_record_batches))
                part.columns = r.schema.names
        except pa.ArrowInvalid:
            with ipc.open_stream(part.path) as r2:
                part.columns = r2.schema.names
    else:
        stream, delim = _csv_stream(part, delimiter)
        try:
            parse = pacsv.ParseOptions(delimiter="," if delim == WHITESPACE else delim,
                                       invalid_row_handler=lambda row: "skip")
            with pacsv.open_csv(stream, parse_options=parse) as r3:
                part.columns = r3.schema.names
        except pa.ArrowInvalid as e:
            raise ValidationError(f"{part.name}: cannot read it as CSV: {e}") from None
        finally:
            stream.close()


def identity(parts: list[Part], extra: str) -> bytes:
    """A 16-byte name of this source (its files' names and sizes, or a table's contents) and the
    options that change what it means (``extra``): an import's checkpoint and transfer ids hang on it."""
    h = hashlib.blake2b(digest_size=16, person=b"loyalty-import")
    h.update(extra.encode())
    for part in parts:
        if part.table is not None:
            h.update(part.table.schema.to_string().encode())
            h.update(str(part.table.num_rows).encode())
            sink = pa.BufferOutputStream()
            with ipc.new_stream(sink, part.table.schema) as w:
                w.write_table(part.table)
            h.update(sink.getvalue().to_pybytes())
        else:
            h.update(f"{Path(part.name).name}\0{part.size}\0".encode())
    return h.digest()


def batches(part: Part, columns: list[str], batch_rows: int, delimiter: str | None,
            malformed: list[Malformed]) -> Iterator[tuple[pa.RecordBatch, np.ndarray]]:
    """The rows of ``part`` (only ``columns``), in order, as (batch, row numbers from 1). CSV columns come
    as strings (converted, row by row, by the importer); lines that do not split into the header's
    columns go to ``malformed`` instead."""
    if part.fmt == "table":
        t = part.table.select(columns)  # type: ignore[union-attr]
        start = 0
        for b in t.to_batches(max_chunksize=batch_rows):
            yield b, np.arange(start + 1, start + 1 + b.num_rows, dtype=np.int64)
            start += b.num_rows
        return
    if part.fmt == "parquet":
        f = pq.ParquetFile(part.path)
        start = 0
        # one row group at a time: a reader over the whole file keeps what it pre-buffered of every
        # row group read so far until it ends (about the file's compressed size: 28 MB more every 2 M
        # rows of the benchmark's history); one per row group lets it go after each
        for group in range(f.num_row_groups):
            for b in f.iter_batches(batch_size=batch_rows, columns=columns, row_groups=[group]):
                yield b, np.arange(start + 1, start + 1 + b.num_rows, dtype=np.int64)
                start += b.num_rows
        return
    if part.fmt == "ipc":
        try:
            reader: Any = ipc.open_file(part.path)
            it: Any = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except pa.ArrowInvalid:
            reader = ipc.open_stream(part.path)
            it = iter(reader)
        start = 0
        for b in it:
            b = b.select(columns)
            for off in range(0, b.num_rows, batch_rows):
                s = b.slice(off, batch_rows)
                yield s, np.arange(start + 1, start + 1 + s.num_rows, dtype=np.int64)
                start += s.num_rows
        return
    stream, delim = _csv_stream(part, delimiter)
    invalid: list[int] = []

    def on_invalid(row: Any) -> str:
        # Arrow numbers physical lines from 1 with the header as line 1; data rows from 1 after it
        number = (row.number - 1) if row.number is not None else -1
        invalid.append(number)
        malformed.append(Malformed(row=number, text=row.text[:500],
                                   reason=f"the line has {row.actual_columns} fields, the header "
                                          f"{row.expected_columns}"))
        return "skip"

    parse = pacsv.ParseOptions(delimiter="," if delim == WHITESPACE else delim, invalid_row_handler=on_invalid)
    convert = pacsv.ConvertOptions(include_columns=columns, column_types={c: pa.string() for c in columns},
                                   strings_can_be_null=False, quoted_strings_can_be_null=False)
    read = pacsv.ReadOptions(block_size=max(1 << 20, min(batch_rows * 64, 1 << 26)), use_threads=False)
    valid = 0
    try:
        with pacsv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert) as r:
            for b in r:
                rows = np.arange(valid + 1, valid + 1 + b.num_rows, dtype=np.int64)
                for x in sorted(v for v in invalid if v > 0):
                    rows[rows >= x] += 1
                valid += b.num_rows
                yield b, rows
    except pa.ArrowInvalid as e:
        raise ValidationError(f"{part.name}: cannot read it as CSV: {e}") from None
    finally:
        stream.close()
