"""The double-entry points ledger: accounts, transfers, balances, lots, holds, a hash-chained journal.

The journal in LMDB is the truth. Balances, lots and holds are a pure function of it, kept in memory
by each handle (a compiled :class:`~loyalty_engine._core.State`), written as a snapshot now and then,
and brought up to date by replaying the journal entries after the state a handle holds. See
``docs/ledger.md`` for the contract.
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import blake3
import lmdb
import numpy as np
import pyarrow as pa

from . import _core
from .batch import normalize_accounts, normalize_batch, normalize_transfers
from .errors import CorruptionError, LedgerClosedError, NotFoundError, StorageError, ValidationError, warn_caller
from .store import Store, from_u64be, open_store, release_store, u64be
from .types import (
    ACCOUNT_RECORD_DTYPE,
    BALANCE_DTYPE,
    RECORD_DTYPE,
    SYSTEM_ID_HI,
    Account,
    AccountFlags,
    AccountResult,
    Balance,
    Code,
    Transfer,
    TransferResult,
    VerifyReport,
    to_micros,
)

__all__ = ["Ledger"]

_RESULTS = tuple(TransferResult(i) if i in TransferResult._value2member_map_ else i for i in range(256))

KIND_ACCOUNTS = 1
KIND_TRANSFERS = 2
# kind, pad, count, seq, committed_at (µs), previous hash
HEADER = struct.Struct("<B3xIQq32s")
HASH_SIZE = 32
#: A big transfer entry keeps its records outside the journal value, in parts of this many records
#: (py-lmdb makes a value's buffer in time proportional to its size, so values stay small).
SEG_RECORDS = 2520
PART_BYTES = SEG_RECORDS * 104  # 262,080 bytes
ZERO_HASH = bytes(32)
MAX_BATCH = (1 << 24) - 1
# Index runs: level-0 runs are merged into one run of the next level when this many pile up.
RUN_FANOUT = 16
MAX_RUN_ENTRIES = 1 << 25
# The journal's tail (entries after the last indexed one) is indexed as one level-0 run as soon as
# an entry holds this many records, or the tail this many entries; queries scan the tail itself.
INDEX_NOW_RECORDS = 1024
INDEX_TAIL_ENTRIES = 32
#: In the index database: the last journal entry covered by runs (8 bytes, big-endian).
INDEXED_KEY = b"\xff\xffindexed"
#: Runs of more entries than this are stored as chunks of this many, under a directory value.
RUN_CHUNK = 1 << 16
CHUNKED = 1 << 63
RUN_KEY_LEN = 17
SYNC_MODES = ("full", "group", "none")
#: A write of this many records makes room in the map first; smaller ones look every ROOM_CHECK_EVERY writes.
ROOM_CHECK_RECORDS = 16
ROOM_CHECK_EVERY = 64

#: Transfers journaled since the last snapshot before another is written (more when the state is big).
SNAPSHOT_MIN = 250_000

#: Seconds a reader trusts ``head.hint`` before it looks at the journal head itself (the hint lags
#: only if a writer died between its commit and publishing it).
HINT_TRUST = 0.05


def _entry_hash(header: bytes | memoryview, payload: bytes | memoryview) -> bytes:
    """The hash of a journal entry: BLAKE3 of its header (which holds the previous entry's hash) and
    its records. BLAKE3 is a tree hash: big payloads are hashed on every core, the GIL released."""
    if len(payload) < 1 << 20:       # (one purchase's entry: one call, no thread pool)
        h = blake3.blake3(header)
        h.update(payload)
        return h.digest()
    return _entry_hash_parts(header, [payload])


def _entry_hash_parts(header: bytes | memoryview, parts: list[Any]) -> bytes:
    """The same hash over records given as consecutive parts."""
    big = sum(len(p) for p in parts) >= 1 << 20
    h = blake3.blake3(header, max_threads=blake3.blake3.AUTO if big else 1)
    for p in parts:
        h.update(p)
    return h.digest()



def available_in_state(state: Any, ids: np.ndarray) -> np.ndarray:
    """The available balance of each of ``ids`` (0 for an unknown id) in a ledger ``State`` (the caller
    sees to it that nothing changes the state meanwhile)."""
    arr = np.ascontiguousarray(ids, np.uint64)
    vals = np.empty((len(arr), 5), np.int64)
    found = np.empty(len(arr), np.uint8)
    state.balances_into(arr, vals, found)
    return vals[:, 4].copy()

class Ledger:
    """A points ledger in an LMDB directory. Open with :meth:`Ledger.open`; use as a context manager.

    One writer at a time across threads and processes (a second writer waits); readers never block.
    """

    def __init__(self, store: Store, *, readonly: bool) -> None:
        self._store: Store | None = store
        self._readonly = readonly
        self._lock = threading.RLock()
        self._state: Any = None  # _core.State, built lazily
        self._seq = 0
        self._hash = ZERO_HASH
        self._since_snapshot = 0
        self._wrote = False
        self._writes = 0
        #: write transactions this handle committed (a caller tells a failed write from housekeeping
        #: that failed after its commit)
        self.commits = 0
        self._fresh_until = 0.0
        #: the LMDB id of the last write transaction this handle committed with a journal entry in it,
        #: while the state is that commit's: a write transaction whose id follows it is the next one
        #: after it (LMDB numbers committed write transactions one by one, across processes), so nobody
        #: else wrote in between and the state needs no look at the journal (see _write)
        self._txn_known: int | None = None
        #: the index's INDEXED_KEY as this handle last read or wrote it, trusted only in such a write, and
        #: then (when known) the transfer entries with records journaled after it, all of them this handle's
        #: (sequence number, records' bytes), so that indexing the tail reads nothing back from the journal
        self._indexed: int | None = None
        self._tail: list[tuple[int, bytes]] | None = None
        self._scratch = np.empty(0, np.uint8)
        self._scratch_views: tuple[Any, Any] = (None, None)    # (dtype, n) of the last _entry_buffer, its views

    # -- opening and closing ------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | os.PathLike[str], *, sync: str = "full", create: bool = True,
             readonly: bool = False, map_size: int | None = None) -> Ledger:
        """Open (creating if needed) the ledger in directory ``path``.

        ``sync``: ``"full"`` (durable at every commit, the default), ``"group"`` (one sync per commit:
        a power loss may undo the last commit, never damage the ledger) or ``"none"`` (bulk work: a
        process crash loses nothing; call :meth:`sync` at checkpoints). ``map_size`` is the initial
        LMDB map in bytes; it grows by itself when the data outgrows it.
        """
        if sync not in SYNC_MODES:
            raise ValidationError(f"sync={sync!r} is not one of {', '.join(map(repr, SYNC_MODES))}")
        if map_size is not None and (not isinstance(map_size, int) or map_size < 1 << 16):
            raise ValidationError(f"map_size={map_size!r} must be an integer of at least 65536 bytes")
        store = open_store(path, mode=sync, create=create, readonly=readonly, map_size=map_size)
        ledger = cls(store, readonly=readonly)
        if not readonly:  # repair a hint left behind by a writer that died after a commit
            with store.begin() as txn:
                store.publish_head(ledger._head(txn)[0])
        return ledger

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Write a snapshot if this handle wrote since the last one, then release the ledger."""
        with self._lock:
            if self._store is None:
                return
            try:
                if self._wrote and self._since_snapshot and not self._readonly:
                    self._write_snapshot()
                if self._wrote and self._store.mode != "full":
                    self._store.env.sync(True)
            finally:
                release_store(self._store)
                self._store = None
                self._state = None

    @property
    def closed(self) -> bool:
        return self._store is None

    @property
    def path(self) -> str:
        return self._st().path

    def sync(self) -> None:
        """Force everything committed so far to disk (for ``sync="none"``/``"group"``)."""
        self._st().env.sync(True)

    def _st(self) -> Store:
        if self._store is None:
            raise LedgerClosedError("this ledger handle is closed; open it again with Ledger.open(path)")
        return self._store

    # -- state: load, catch up ----------------------------------------------------------------------
    def _head(self, txn: lmdb.Transaction) -> tuple[int, bytes]:
        """(sequence number, hash) of the last journal entry: the head is the journal's end, so a
        commit writes no separate head record (one B-tree page fewer to sync)."""
        cur = txn.cursor(db=self._st().dbs[b"journal"])
        if not cur.last():
            return 0, ZERO_HASH
        return from_u64be(cur.key()), bytes(cur.value()[-HASH_SIZE:])

    def _reset(self) -> None:
        self._state = None
        self._seq = 0
        self._hash = ZERO_HASH
        self._since_snapshot = 0
        self._forget_chain()

    def _forget_chain(self) -> None:
        """Trust nothing about the journal's end any more (see ``_txn_known``): the next write looks."""
        self._txn_known = self._indexed = self._tail = None

    def _load(self, txn: lmdb.Transaction) -> None:
        """Build the state from the snapshot (if any) and replay the journal after it."""
        st = self._st()
        snap = _read_snapshot(txn, st.dbs[b"snapshot"])
        if snap is None:
            self._state = _core.State()
            self._seq, self._hash = 0, ZERO_HASH
        else:
            seq, entry_hash, arrays = snap
            try:
                self._state = _core.State.from_export(arrays)
            except (ValueError, KeyError) as e:
                raise CorruptionError(f"the snapshot at entry {seq} cannot be decoded: {e}; "
                                      f"run 'loyalty-engine verify' on the ledger") from e
            self._seq, self._hash = seq, entry_hash
        self._since_snapshot = 0

    def _catch_up(self, txn: lmdb.Transaction) -> None:
        """Replay the journal entries committed after the state this handle holds. Anything raised on
        the way (a Ctrl-C, which uncompiled code may take between an entry's effect and the note of it)
        drops the state, which the next read builds again: a handle never holds half an entry."""
        try:
            self._replay_journal(txn)
        except BaseException:
            self._reset()
            raise

    def _replay_journal(self, txn: lmdb.Transaction) -> None:
        if self._state is None:
            self._load(txn)
        cur = txn.cursor(db=self._st().dbs[b"journal"])
        head = int.from_bytes(cur.key(), "big") if cur.last() else 0
        if head < self._seq:  # the ledger was replaced under us
            self._load(txn)
        if head == self._seq:
            return
        jdb = self._st().dbs[b"journal"]
        cur = txn.cursor(db=jdb)
        if not cur.set_key(u64be(self._seq + 1)):
            raise CorruptionError(f"journal entry {self._seq + 1} is missing (head is {head})")
        for key, value in cur:
            _core.pause_point()
            seq = from_u64be(key)
            if seq > head:
                break
            kind, recs, entry_hash = _decode_entry(txn, self._st().dbs[b"records"], seq, value, self._hash)
            self._replay(seq, kind, recs)
            self._seq, self._hash = seq, entry_hash
            self._since_snapshot += len(recs)

    def _replay(self, seq: int, kind: int, recs: np.ndarray) -> None:
        self._state.entry_seq = seq
        if kind == KIND_ACCOUNTS:
            r = self._state.apply_accounts(recs, np.empty(0, np.uint8), np.empty(0, ACCOUNT_RECORD_DTYPE),
                                           True)
        else:
            r = self._state.apply(recs, np.empty(0, np.uint8), np.empty(len(recs), RECORD_DTYPE), True)
        if r < 0:
            raise CorruptionError(f"journal entry {seq}, record {-r - 1} does not apply to the state "
                                  f"before it; run 'loyalty-engine verify' on the ledger")

    def _ensure_ids(self, txn: lmdb.Transaction) -> None:
        """Track every committed transfer id (needed to answer ``exists``), built from the journal once
        per writer; and tell the state which entry the write about to apply will be, and how to read
        a committed record back (``txn``).

        Ids are kept two ways (see ``_core.State``): consecutive records of an entry whose ids step
        by a constant stride (a bulk import's, for one) as a run of a few numbers; the others in a
        hash table with their fingerprints. A transfer whose id lies in a run is answered ``exists``
        or ``exists_different`` from the record read back from the journal, as from the table."""
        st = self._st()
        state = self._state
        self._id_context(txn)
        if state.ids_enabled:
            return
        jdb = st.dbs[b"journal"]
        entries = []
        for key, value in txn.cursor(db=jdb):
            _core.pause_point()
            if from_u64be(key) > self._seq:
                break
            if value[0] == KIND_TRANSFERS:
                entries.append((from_u64be(key), value))
        state.enable_ids(0)
        rdb = st.dbs[b"records"]
        for seq, value in entries:
            _core.pause_point()
            state.add_ids(_records(txn, rdb, seq, value), seq)
        state.entry_seq = self._seq + 1

    def _id_context(self, txn: lmdb.Transaction) -> None:
        """Before a write applies transfers in ``txn``: the entry it writes, and how the state reads a
        committed record's fingerprint back."""
        self._state.entry_seq = self._seq + 1
        self._state.id_source = lambda seq, pos, lo, hi: self._committed_fp(txn, seq, pos, lo, hi)

    def _committed_fp(self, txn: lmdb.Transaction, seq: int, pos: int, lo: int, hi: int) -> int:
        """The fingerprint of the committed record at position ``pos`` of journal entry ``seq``, which
        the state's id runs say has id (``lo``, ``hi``)."""
        st = self._st()
        rec = _records_at(txn, st.dbs[b"journal"], st.dbs[b"records"], seq, np.array([pos], np.int64))
        if int(rec["id_lo"][0]) != lo or int(rec["id_hi"][0]) != hi:
            raise CorruptionError(f"journal entry {seq}, record {pos} has id {int(rec['id_hi'][0]):x}:"
                                  f"{int(rec['id_lo'][0]):x}, not {hi:x}:{lo:x} as the id runs say; run "
                                  f"'loyalty-engine verify' on the ledger")
        return int(rec["fp"][0])

    def _read(self) -> None:
        """Bring the state up to date for a read. When the head a writer published (``head.hint``)
        is the one this handle holds, and the journal was looked at less than HINT_TRUST seconds ago,
        nothing is read: a balance costs a hash probe, not an LMDB transaction."""
        st = self._st()
        if (self._state is not None and st.hinted_head() == self._seq
                and time.monotonic() < self._fresh_until):
            return
        with st.begin() as txn:
            self._catch_up(txn)
        self._fresh_until = time.monotonic() + HINT_TRUST

    # -- writing ------------------------------------------------------------------------------------
    def _write(self, fn: Any, records: int = 0) -> Any:
        """Run ``fn(txn)`` in a write transaction with the state caught up; commit; retry on map full.
        ``records`` says how big the write is: a big one makes room in the map first (small ones look
        every ROOM_CHECK_EVERY writes: the look costs about as much as a small write's own work)."""
        if self._readonly:
            raise StorageError("this ledger was opened readonly=True")
        st = self._st()
        with self._lock, st.lock:
            self._writes += 1
            if records >= ROOM_CHECK_RECORDS or self._writes % ROOM_CHECK_EVERY == 1:
                self._make_room(st)
            for _attempt in range(40):
                txn = st.begin(write=True)
                try:
                    # (a write transaction's id is the last committed one's plus one: when that was this
                    # handle's last entry, the journal ends where the state does)
                    tid = txn.id()
                    if self._state is None or self._txn_known is None or tid != self._txn_known + 1:
                        self._forget_chain()
                        self._catch_up(txn)
                    seq0 = self._seq
                    out = fn(txn)
                    txn.commit()
                except lmdb.MapFullError:
                    txn.abort()
                    self._reset()  # the state may hold the failed batch
                    st.grow()
                    continue
                except BaseException:
                    txn.abort()
                    self._reset()
                    raise
                # (a transaction that wrote nothing commits without an id of its own: only one that
                # journaled an entry is known to hold ``tid``)
                if self._seq > seq0:
                    self._txn_known = tid
                else:
                    self._forget_chain()
                self._wrote = True
                self.commits += 1
                st.publish_head(self._seq)
                break
            else:  # pragma: no cover - 40 doublings is beyond any disk
                raise StorageError("the ledger map could not grow enough for this batch")
        self._after_commit()
        return out

    @staticmethod
    def _make_room(st: Store) -> None:
        """Double the map before a write when it is more than half full. A write that fills the map is
        retried after the map grows, from a state rebuilt from the snapshot and the journal after it:
        for a bulk import's big transactions, seconds, where growing the map first costs nothing."""
        info = st.env.info()
        if (info["last_pgno"] + 1) * st.env.stat()["psize"] * 2 > info["map_size"]:
            st.grow()

    def _entry_buffer(self, dtype: np.dtype[Any], n: int) -> tuple[np.ndarray, np.ndarray]:
        """A journal entry's bytes, and a view of room for ``n`` records in it (filled in place, so
        the records are never copied between the kernel and LMDB). The memory is this handle's,
        reused by every write (under the handle's lock): fresh memory costs a page fault per 4 KB."""
        key = (dtype, n)
        if self._scratch_views[0] == key:        # the same shape as the last write's (one purchase after another)
            return self._scratch_views[1]
        size = HEADER.size + n * dtype.itemsize + HASH_SIZE
        if len(self._scratch) < size:
            self._scratch = np.empty(max(size, 2 * len(self._scratch)), np.uint8)
        buf = self._scratch[:size]
        views = buf, buf[HEADER.size: HEADER.size + n * dtype.itemsize].view(dtype)
        self._scratch_views = key, views
        return views

    def _append(self, txn: lmdb.Transaction, kind: int, recs: np.ndarray) -> None:
        """Journal one entry (and its index run) in ``txn``; the state already holds its effect."""
        buf, room = self._entry_buffer(recs.dtype, len(recs))
        room[:] = recs
        self._append_entry(txn, kind, buf, len(recs))

    def _append_entry(self, txn: lmdb.Transaction, kind: int, buf: np.ndarray, count: int) -> None:
        """Journal the entry whose first ``count`` records are already in place in ``buf``."""
        st = self._st()
        seq = self._seq + 1
        size = (RECORD_DTYPE if kind == KIND_TRANSFERS else ACCOUNT_RECORD_DTYPE).itemsize
        end = HEADER.size + count * size
        mv = memoryview(buf)
        HEADER.pack_into(mv, 0, kind, count, seq, time.time_ns() // 1000, self._hash)
        entry_hash = _entry_hash(mv[: HEADER.size], mv[HEADER.size: end])
        mv[end: end + HASH_SIZE] = entry_hash
        if kind == KIND_TRANSFERS and count > SEG_RECORDS:
            value: Any = bytes(mv[: HEADER.size]) + entry_hash
            rdb = st.dbs[b"records"]
            for j, off in enumerate(range(HEADER.size, end, PART_BYTES)):
                if not txn.put(_part_key(seq, j), mv[off: min(off + PART_BYTES, end)], db=rdb, append=True):
                    raise CorruptionError(f"journal entry {seq} part {j} already exists")
        else:
            value = mv[: end + HASH_SIZE]
        if not txn.put(u64be(seq), value, db=st.dbs[b"journal"], append=True, overwrite=False):
            raise CorruptionError(f"journal entry {seq} already exists: another writer raced this one")
        if kind == KIND_TRANSFERS and count:
            # Index the unindexed tail of the journal when this entry is big or the tail is long;
            # small entries (single posts) wait, so most commits write one B-tree page, not three.
            idb = st.dbs[b"index"]
            indexed, tail = self._indexed, self._tail
            if indexed is None:
                raw = txn.get(INDEXED_KEY, db=idb)
                indexed = from_u64be(raw) if raw is not None else 0
                tail = [] if indexed == seq - 1 else None   # (nothing unindexed before: the tail starts here)
            if count >= INDEX_NOW_RECORDS or seq - indexed >= INDEX_TAIL_ENTRIES:
                _index_tail(txn, st.dbs[b"journal"], st.dbs[b"records"], idb, indexed, seq,
                            buf[HEADER.size: end].view(RECORD_DTYPE), tail)
                indexed, tail = seq, []
            elif tail is not None:
                tail.append((seq, bytes(mv[HEADER.size: end])))
            self._indexed, self._tail = indexed, tail
        self._seq, self._hash = seq, entry_hash
        self._since_snapshot += count

    def _after_commit(self) -> None:
        """Housekeeping outside the commit: write a snapshot when due."""
        if self._since_snapshot < SNAPSHOT_MIN:      # (most writes: no locks taken to know it)
            return
        st = self._st()
        try:
            with self._lock, st.lock:
                state = self._state
                size = state.n_accounts + state.lots_in_use + state.n_pending if state is not None else 0
                # a snapshot costs about as much as replaying this many transfers
                if self._since_snapshot >= 4 * size + SNAPSHOT_MIN:
                    self._write_snapshot()
        except lmdb.MapFullError:
            st.grow()  # housekeeping retries after a later commit
        except Exception as exc:    # the write committed: a snapshot that failed is retried after a later one
            warn_caller(f"the ledger's snapshot after a commit failed ({type(exc).__name__}: {exc}); the "
                        f"commit stands, and the snapshot is tried again after a later commit", RuntimeWarning)

    def _write_snapshot(self) -> None:
        """Store the state as of the journal's head; a snapshot that fills the map is written again
        after the map grows (as :meth:`_write` does), so that closing a ledger never fails for it."""
        st = self._st()
        with self._lock, st.lock:
            for _attempt in range(40):
                txn = st.begin(write=True)
                try:
                    self._catch_up(txn)
                    _put_snapshot(txn, st.dbs[b"snapshot"], self._seq, self._hash, self._state.export())
                    txn.commit()
                except lmdb.MapFullError:
                    txn.abort()
                    st.grow()
                    continue
                except BaseException:
                    txn.abort()
                    raise
                self._since_snapshot = 0
                return
            raise StorageError("the ledger map could not grow enough for a snapshot")  # pragma: no cover

    # -- accounts -----------------------------------------------------------------------------------
    def create_accounts(self, accounts: Sequence[Account]) -> list[AccountResult]:
        """Create accounts; one :class:`AccountResult` per account, in order."""
        recs = normalize_accounts(accounts)
        return [AccountResult(r) for r in self._account_ops(recs)]

    def create_accounts_batch(self, ids: Any, *, asset: int = 0, flags: int = 0,
                              user_data: int = 0) -> np.ndarray:
        """Create many accounts of one asset and flags at once; returns a uint8 array of results."""
        return self._account_ops(_account_records(ids, asset=asset, flags=flags, user_data=user_data))

    def close_accounts(self, ids: Iterable[int]) -> None:
        """Mark accounts closed: they take no new transfers. Raises NotFoundError for an unknown id."""
        self._close_reopen(ids, 1)

    def reopen_accounts(self, ids: Iterable[int]) -> None:
        """Clear the closed mark."""
        self._close_reopen(ids, 2)

    def _close_reopen(self, ids: Iterable[int], op: int) -> None:
        ids = [_checked_int(i, "account id", 1, (1 << 64) - 1) for i in ids]
        recs = np.zeros(len(ids), ACCOUNT_RECORD_DTYPE)
        recs["id"] = ids
        recs["op"] = op

        def run(txn: lmdb.Transaction) -> None:
            for i in ids:
                if self._state.slot_of(i) < 0:
                    raise NotFoundError(f"account {i} does not exist")
            out = np.empty(len(recs), ACCOUNT_RECORD_DTYPE)
            k = self._state.apply_accounts(recs, np.empty(len(recs), np.uint8), out, False)
            if k:
                self._append(txn, KIND_ACCOUNTS, out[:k])

        if ids:
            self._write(run)

    def _account_ops(self, recs: np.ndarray) -> np.ndarray:
        results = np.zeros(len(recs), np.uint8)
        if len(recs) == 0:
            return results

        def run(txn: lmdb.Transaction) -> None:
            out = np.empty(len(recs), ACCOUNT_RECORD_DTYPE)
            k = self._state.apply_accounts(recs, results, out, False)
            if k:
                self._append(txn, KIND_ACCOUNTS, out[:k])

        self._write(run, len(recs))
        return results

    def account(self, account_id: int) -> Account:
        """The account ``account_id`` (flags include CLOSED when closed)."""
        with self._lock:
            self._read()
            row = self._state.account_row(_checked_int(account_id, "account id", 0, (1 << 64) - 1))
        if row is None:
            raise NotFoundError(f"account {account_id} does not exist")
        return Account(id=account_id, asset=int(row[0]), flags=AccountFlags(int(row[1])),
                       user_data=int(row[2]))

    # -- transfers ----------------------------------------------------------------------------------
    def post(self, transfers: Sequence[Transfer]) -> list[TransferResult]:
        """Post transfers in order; one :class:`TransferResult` per transfer.

        Raises only when the call itself is wrong (a wrong type, a naive datetime, a value out of
        range, a closed handle); then nothing is written.
        """
        recs = normalize_transfers(transfers)
        return [_RESULTS[r] for r in self._post(recs).tolist()]

    def post_batch(self, batch: Any) -> np.ndarray:
        """Post a pyarrow Table/RecordBatch or structured NumPy array of transfers (see docs/ledger.md
        for the columns); returns a ``uint8`` array of :class:`TransferResult` codes."""
        return self._post(normalize_batch(batch))

    def _post(self, recs: np.ndarray) -> np.ndarray:
        n = len(recs)
        if n > MAX_BATCH:
            raise ValidationError(f"a batch holds at most {MAX_BATCH} transfers, this one {n}; split it")
        results = np.zeros(n, np.uint8)
        if n == 0:
            return results

        def run(txn: lmdb.Transaction) -> None:
            self._ensure_ids(txn)
            buf, out = self._entry_buffer(RECORD_DTYPE, n)
            k = self._state.apply(recs, results, out, False)
            if k:
                self._append_entry(txn, KIND_TRANSFERS, buf, k)

        self._write(run, len(recs))
        return results

    def _post_with(self, recs: np.ndarray, extra: Any) -> np.ndarray:
        """Post ``recs`` (RECORD_DTYPE) and run ``extra(txn, results)`` in the same write transaction,
        so that what a caller stores beside the ledger (the engine's members, receipts, outbox) commits
        with the transfers or not at all; ``extra`` raising aborts both."""
        n = len(recs)
        if n > MAX_BATCH:
            raise ValidationError(f"a batch holds at most {MAX_BATCH} transfers, this one {n}; split it")
        return self._write(lambda txn: extra(txn, self._post_in(txn, recs)), n)

    def _post_in(self, txn: lmdb.Transaction, recs: np.ndarray) -> np.ndarray:
        """Post ``recs`` (RECORD_DTYPE) inside ``txn``, a :meth:`_write` callback's transaction; returns
        one result per record. What the callback stores beside them commits with them or not at all."""
        n = len(recs)
        if n > MAX_BATCH:
            raise ValidationError(f"a batch holds at most {MAX_BATCH} transfers, this one {n}; split it")
        results = np.zeros(n, np.uint8)
        if n:
            self._ensure_ids(txn)
            buf, out = self._entry_buffer(RECORD_DTYPE, n)
            k = self._state.apply(recs, results, out, False)
            if k:
                self._append_entry(txn, KIND_TRANSFERS, buf, k)
        return results

    def _entries_with(self, entries: Sequence[tuple[int, np.ndarray]], extra: Any) -> Any:
        """Journal several entries in one write transaction, in order: ``(KIND_ACCOUNTS, account
        records)`` creates accounts (as :meth:`create_accounts_batch`), ``(KIND_TRANSFERS, records)``
        posts transfers (as :meth:`_post_with`); an empty one journals nothing. Then ``extra(txn,
        results)`` runs with one result array per entry; all of it commits together or not at all."""
        for kind, recs in entries:
            if kind not in (KIND_ACCOUNTS, KIND_TRANSFERS):
                raise ValidationError(f"an entry's kind is {KIND_ACCOUNTS} or {KIND_TRANSFERS}, not {kind!r}")
            if len(recs) > MAX_BATCH:
                raise ValidationError(f"a batch holds at most {MAX_BATCH} records, this one {len(recs)}; split it")

        def run(txn: lmdb.Transaction) -> Any:
            results = []
            for kind, recs in entries:
                res = np.zeros(len(recs), np.uint8)
                if len(recs) and kind == KIND_ACCOUNTS:
                    out = np.empty(len(recs), ACCOUNT_RECORD_DTYPE)
                    k = self._state.apply_accounts(recs, res, out, False)
                    if k:
                        self._append(txn, KIND_ACCOUNTS, out[:k])
                elif len(recs):
                    self._ensure_ids(txn)
                    buf, out = self._entry_buffer(RECORD_DTYPE, len(recs))
                    k = self._state.apply(recs, res, out, False)
                    if k:
                        self._append_entry(txn, KIND_TRANSFERS, buf, k)
                results.append(res)
            return extra(txn, results)

        return self._write(run, sum(len(r) for _, r in entries))

    def _ext_db(self) -> Any:
        """The named database extensions (the engine) keep their own keys in."""
        return self._st().dbs[b"ext"]

    def _ext_begin(self) -> lmdb.Transaction:
        return self._st().begin()

    def expire(self, at: datetime | int, sink: int, code: int = Code.EXPIRE, *, extra: Any = None) -> int:
        """Expire what remains of every lot that ended by ``at`` (accounts of the sink's asset) into
        ``sink``, and release every hold whose time-out ended by ``at``. Returns transfers written.

        ``extra(txn, records)``, if given, runs in the same write transaction after the expiry records
        (RECORD_DTYPE, as journaled; empty when nothing expired) are appended, as :meth:`_post_with`'s
        ``extra``: what it stores commits with the expiry or not at all, and it raising aborts both. It
        may run more than once (a write that filled the map is retried after the map grows)."""
        at_us = to_micros(at, "at")
        sink = _checked_int(sink, "sink", 1, (1 << 64) - 1)
        code = _checked_int(int(code), "code", 0, 0xFFFF)
        count = 0

        def run(txn: lmdb.Transaction) -> None:
            nonlocal count
            row = self._state.account_row(sink)
            if row is None:
                raise NotFoundError(f"sink account {sink} does not exist")
            if row[1] & (AccountFlags.CREDITS_MUST_NOT_EXCEED_DEBITS | AccountFlags.CLOSED):
                raise ValidationError(f"sink account {sink} is closed or may not receive credits "
                                      f"(flags {AccountFlags(int(row[1]))!r})")
            recs = self._state.expiry_records(at_us, sink, code)
            count = 0
            if len(recs) == 0:
                if extra is not None:
                    extra(txn, recs)
                return
            seq = self._seq + 1
            recs["id_hi"] = SYSTEM_ID_HI
            recs["id_lo"] = (np.uint64(seq) << np.uint64(24)) | np.arange(len(recs), dtype=np.uint64)
            recs["fp"] = _core.fingerprints(recs)
            out = np.empty(len(recs), RECORD_DTYPE)
            results = np.zeros(len(recs), np.uint8)
            self._id_context(txn)
            k = self._state.apply(recs, results, out, False)
            if k != len(recs):
                bad = int(np.flatnonzero(results)[0])
                raise CorruptionError(f"expiry transfer {bad} was refused "
                                      f"({TransferResult(int(results[bad])).name}); the state is "
                                      f"inconsistent: run 'loyalty-engine verify'")
            self._append(txn, KIND_TRANSFERS, out)
            count = k
            if extra is not None:
                extra(txn, out)

        self._write(run)
        return count

    # -- reading ------------------------------------------------------------------------------------
    def balance(self, account_id: int) -> Balance:
        """The balance of one account; NotFoundError if it does not exist."""
        with self._lock:
            self._read()
            try:
                if type(account_id) is not int and not isinstance(account_id, np.integer):
                    raise TypeError
                b = self._state.balance(account_id)
            except (OverflowError, TypeError):
                raise ValidationError(f"account={account_id!r} is not an account id (an integer in "
                                      f"[0, 2**64 - 1])") from None
        if b is None:
            raise NotFoundError(f"account {account_id} does not exist")
        return tuple.__new__(Balance, b)

    def balances(self, ids: Any) -> np.ndarray:
        """Balances of many accounts as a ``BALANCE_DTYPE`` array (``found`` False for unknown ids)."""
        arr = np.ascontiguousarray(ids)
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise ValidationError(f"ids must be a 1-d integer array, not {arr.dtype} of shape {arr.shape}")
        if arr.dtype.kind == "i" and len(arr) and arr.min() < 0:
            raise ValidationError(f"ids[{int(np.argmin(arr))}]={int(arr.min())} is negative")
        arr = arr.astype(np.uint64, copy=False)
        vals = np.empty((len(arr), 5), np.int64)
        found = np.empty(len(arr), np.uint8)
        with self._lock:
            self._read()
            self._state.balances_into(arr, vals, found)
        out = np.empty(len(arr), BALANCE_DTYPE)
        out["id"] = arr
        for j, name in enumerate(("debits_posted", "credits_posted", "debits_pending", "credits_pending",
                                  "available")):
            out[name] = vals[:, j]
        out["found"] = found.astype(bool)
        return out

    def _available(self, ids: np.ndarray) -> np.ndarray:
        """The available balance of each of ``ids`` (uint64; 0 for an unknown id): the ``available``
        column of :meth:`balances` without the other columns (the engine's batches ask for millions)."""
        with self._lock:
            self._read()
            return available_in_state(self._state, ids)

    def _available_in(self, txn: lmdb.Transaction, ids: np.ndarray) -> np.ndarray:
        """:meth:`_available` inside a :meth:`_write` callback's ``txn``: the state as of that
        transaction, what it applied so far included (:meth:`_available` would read the last commit)."""
        del txn                             # (the state under the write lock is the transaction's)
        return available_in_state(self._state, ids)

    def lots(self, account_id: int) -> list[tuple[int, int]]:
        """The account's lots as (expires_at µs, remaining), soonest first."""
        with self._lock:
            self._read()
            lots = self._state.lots(account_id)
        if lots is None:
            raise NotFoundError(f"account {account_id} does not exist")
        return [(int(e), int(a)) for e, a in lots]

    @property
    def head(self) -> tuple[int, str]:
        """(sequence number, hex hash) of the last committed journal entry."""
        with self._st().begin() as txn:
            seq, h = self._head(txn)
        return seq, h.hex()

    def transfers(self, account: int | None = None, since: datetime | int | None = None,
                  until: datetime | int | None = None) -> pa.Table:
        """Committed transfers (of one account, or all) with ``since <= at < until``, in time order."""
        lo = to_micros(since, "since") if since is not None else -(1 << 63)
        hi = to_micros(until, "until") if until is not None else (1 << 63) - 1
        st = self._st()
        parts = []
        with st.begin() as txn:
            jdb = st.dbs[b"journal"]
            rdb = st.dbs[b"records"]
            if account is None:
                for key, value in txn.cursor(db=jdb):
                    _core.pause_point()
                    if value[0] == KIND_TRANSFERS:
                        recs = _records(txn, rdb, from_u64be(key), value)
                        sel = np.flatnonzero((recs["at"] >= lo) & (recs["at"] < hi))
                        parts.append((from_u64be(key), sel, recs[sel].copy()))
            else:
                acct = np.uint64(_checked_int(account, "account", 0, (1 << 64) - 1))
                locs, indexed = _runs_lookup(txn, st.dbs[b"index"], acct)
                # the unindexed tail: a few small entries, scanned
                cur = txn.cursor(db=jdb)
                if cur.set_range(u64be(indexed + 1)):
                    for key, value in cur:
                        if value[0] != KIND_TRANSFERS:
                            continue
                        recs = _records(txn, rdb, from_u64be(key), value)
                        p = np.flatnonzero((recs["debit"] == acct) | (recs["credit"] == acct))
                        if len(p):
                            locs.append((np.uint64(from_u64be(key)) << np.uint64(24)) | p.astype(np.uint64))
                if locs:
                    allloc = np.unique(np.concatenate(locs))
                    seqs = allloc >> np.uint64(24)
                    pos = (allloc & np.uint64(0xFFFFFF)).astype(np.int64)
                    for s in np.unique(seqs):
                        p = pos[seqs == s]
                        r = _records_at(txn, jdb, rdb, int(s), p)
                        keep = (r["at"] >= lo) & (r["at"] < hi)
                        parts.append((int(s), p[keep], r[keep].copy()))
        return _records_table(parts)

    def export(self, out: str | os.PathLike[str]) -> int:
        """Write the whole journal of transfers to a Parquet file; returns rows written."""
        import pyarrow.parquet as pq

        st = self._st()
        rows = 0
        writer = None
        try:
            with st.begin() as txn:
                for key, value in txn.cursor(db=st.dbs[b"journal"]):
                    _core.pause_point()
                    if value[0] != KIND_TRANSFERS:
                        continue
                    recs = np.array(_records(txn, st.dbs[b"records"], from_u64be(key), value))
                    n = len(recs)
                    table = _records_table([(from_u64be(key), np.arange(n), recs)], sort=False)
                    if writer is None:
                        writer = pq.ParquetWriter(os.fspath(out), table.schema)
                    writer.write_table(table)
                    rows += n
            if writer is None:
                pq.write_table(_records_table([]), os.fspath(out))
        finally:
            if writer is not None:
                writer.close()
        return rows

    # -- verification -------------------------------------------------------------------------------
    def verify(self) -> VerifyReport:
        """Walk the hash chain, replay the journal from empty, check conservation, and compare the
        result with the stored snapshot and with this handle's live state."""
        st = self._st()
        problems: list[str] = []
        batches = transfers = 0
        with self._lock, st.begin() as txn:
            state = _core.State()
            prev = ZERO_HASH
            expected = 1
            snap = None
            try:
                snap = _read_snapshot(txn, st.dbs[b"snapshot"])
            except CorruptionError as e:
                problems.append(str(e))
            derived_runs: list[tuple[int, np.ndarray]] = []
            for key, value in txn.cursor(db=st.dbs[b"journal"]):
                _core.pause_point()
                seq = from_u64be(key)
                batches += 1
                if seq != expected:
                    problems.append(f"journal entry {expected} is missing (found {seq} next)")
                    expected = seq
                try:
                    kind, recs, entry_hash = _decode_entry(txn, st.dbs[b"records"], seq, value, prev,
                                                           strict=False)
                except CorruptionError as e:
                    problems.append(str(e))
                    break
                stored = bytes(value[-HASH_SIZE:])
                if stored != entry_hash:
                    problems.append(f"journal entry {seq}: hash mismatch (stored {stored.hex()[:16]}..., "
                                    f"computed {entry_hash.hex()[:16]}...): the entry was altered")
                hdr_prev = bytes(value[24:56])
                if hdr_prev != prev:
                    problems.append(f"journal entry {seq}: does not chain to entry {seq - 1}")
                prev = stored
                if kind == KIND_ACCOUNTS:
                    r = state.apply_accounts(recs, np.empty(0, np.uint8),
                                             np.empty(0, ACCOUNT_RECORD_DTYPE), True)
                else:
                    r = state.apply(recs, np.empty(0, np.uint8), np.empty(len(recs), RECORD_DTYPE), True)
                    transfers += len(recs)
                    derived_runs.append((seq, _core.index_run(recs, seq)))
                if r < 0:
                    problems.append(f"journal entry {seq}, record {-r - 1}: does not apply to the state "
                                    f"before it")
                if snap is not None and seq == snap[0]:
                    problems += _compare_states(state.export(), snap[2], f"snapshot at entry {seq}")
                expected = seq + 1
            if snap is not None and snap[0] > expected - 1:
                problems.append(f"the snapshot names entry {snap[0]}, past the journal's end")
            final = state.export()
            problems += _conservation(final)
            problems += _check_index(txn, st.dbs[b"index"], derived_runs, expected - 1)
            if not problems and not self._readonly:
                try:
                    self._catch_up(txn)
                    problems += _compare_states(final, self._state.export(), "this handle's live state")
                except CorruptionError as e:
                    problems.append(str(e))
        return VerifyReport(ok=not problems, batches=batches, transfers=transfers, problems=problems)


# --- helpers: journal entries ----------------------------------------------------------------------

def _part_key(seq: int, part: int) -> bytes:
    return u64be(seq) + part.to_bytes(4, "big")


def _parts(txn: lmdb.Transaction, rdb: Any, seq: int, count: int) -> list[memoryview]:
    """The record parts of a big transfer entry, checked for number and size."""
    want = -(-count // SEG_RECORDS)
    out: list[memoryview] = []
    cur = txn.cursor(db=rdb)
    prefix = u64be(seq)
    if want and cur.set_key(_part_key(seq, 0)):
        for key, value in cur:
            if len(out) == want or bytes(key[:8]) != prefix:
                break
            out.append(value)
    size = RECORD_DTYPE.itemsize
    if len(out) != want or sum(len(v) for v in out) != count * size or any(
            len(v) % size for v in out):
        raise CorruptionError(f"journal entry {seq}: its records are missing or damaged "
                              f"({len(out)} of {want} parts)")
    return out


def _records(txn: lmdb.Transaction, rdb: Any, seq: int, value: memoryview) -> np.ndarray:
    """The records of a transfer entry: a view into the map when they are stored inline."""
    n = struct.unpack_from("<I", value, 4)[0]
    if len(value) == HEADER.size + n * RECORD_DTYPE.itemsize + HASH_SIZE:
        return np.frombuffer(value, RECORD_DTYPE, n, HEADER.size)
    if len(value) != HEADER.size + HASH_SIZE or n <= SEG_RECORDS:
        raise CorruptionError(f"journal entry {seq} has a damaged header ({n} records, {len(value)} bytes)")
    return np.concatenate([np.frombuffer(v, RECORD_DTYPE) for v in _parts(txn, rdb, seq, n)])


def _records_at(txn: lmdb.Transaction, jdb: Any, rdb: Any, seq: int, pos: np.ndarray) -> np.ndarray:
    """Copies of the records at positions ``pos`` (sorted) of entry ``seq``: reads only their parts."""
    value = txn.get(u64be(seq), db=jdb)
    if value is None:
        raise CorruptionError(f"the index names journal entry {seq}, which is missing")
    n = struct.unpack_from("<I", value, 4)[0]
    if len(pos) and int(pos[-1]) >= n:
        raise CorruptionError(f"the index names record {int(pos[-1])} of journal entry {seq}, which has {n}")
    if len(value) == HEADER.size + n * RECORD_DTYPE.itemsize + HASH_SIZE:
        return np.frombuffer(value, RECORD_DTYPE, n, HEADER.size)[pos]
    size = RECORD_DTYPE.itemsize
    out = bytearray(len(pos) * size)
    have, raw = -1, None
    for i, p in enumerate(pos.tolist()):  # a member's records lie in different parts: one get each
        j, r = divmod(p, SEG_RECORDS)
        if j != have:
            raw = txn.get(_part_key(seq, j), db=rdb)
            if raw is None or len(raw) < (r + 1) * size:
                raise CorruptionError(f"journal entry {seq}: record part {j} is missing or short")
            have = j
        out[i * size: (i + 1) * size] = raw[r * size: (r + 1) * size]
    return np.frombuffer(out, RECORD_DTYPE)


def _decode_entry(txn: lmdb.Transaction, rdb: Any, seq: int, value: memoryview, prev_hash: bytes,
                  strict: bool = True) -> tuple[int, np.ndarray, bytes]:
    """(kind, records copy, computed hash) of a journal entry; checks the chain when ``strict``."""
    if len(value) < HEADER.size + HASH_SIZE:
        raise CorruptionError(f"journal entry {seq} is truncated ({len(value)} bytes)")
    kind, count, hseq, _at, hprev = HEADER.unpack_from(value, 0)
    size = {KIND_ACCOUNTS: ACCOUNT_RECORD_DTYPE.itemsize, KIND_TRANSFERS: RECORD_DTYPE.itemsize}.get(kind)
    external = (kind == KIND_TRANSFERS and count > SEG_RECORDS
                and len(value) == HEADER.size + HASH_SIZE and hseq == seq)
    if not external and (size is None or len(value) != HEADER.size + count * size + HASH_SIZE
                         or hseq != seq):
        raise CorruptionError(f"journal entry {seq} has a damaged header (kind {kind}, count {count}, "
                              f"seq {hseq}, {len(value)} bytes)")
    header = bytes(value[: HEADER.size])
    if external:
        chunks: list[Any] = _parts(txn, rdb, seq, count)
        entry_hash = _entry_hash_parts(header, chunks)
        recs = np.concatenate([np.frombuffer(c, RECORD_DTYPE) for c in chunks])
    else:
        payload = value[HEADER.size: HEADER.size + count * size]
        entry_hash = _entry_hash(header, payload)
        dtype = ACCOUNT_RECORD_DTYPE if kind == KIND_ACCOUNTS else RECORD_DTYPE
        recs = np.frombuffer(payload, dtype, count).copy()
    if strict and (entry_hash != bytes(value[-HASH_SIZE:]) or hprev != prev_hash):
        raise CorruptionError(f"journal entry {seq} fails its hash check; run 'loyalty-engine verify'")
    return kind, recs, entry_hash


def _records_table(parts: list[tuple[int, np.ndarray, np.ndarray]], sort: bool = True) -> pa.Table:
    if parts:
        seq = np.concatenate([np.full(len(p), s, np.uint64) for s, p, _ in parts])
        pos = np.concatenate([np.asarray(p, np.uint32) for _, p, _ in parts])
        recs = np.concatenate([r for _, _, r in parts])
    else:
        seq = np.empty(0, np.uint64)
        pos = np.empty(0, np.uint32)
        recs = np.empty(0, RECORD_DTYPE)
    if sort and len(recs):
        order = np.lexsort((pos, seq, recs["at"]))
        seq, pos, recs = seq[order], pos[order], recs[order]
    ts = pa.timestamp("us", tz="UTC")
    exp = recs["expires_at"]
    cols = {
        "seq": pa.array(seq),
        "position": pa.array(pos),
        "id": pa.array(recs["id_lo"]),
        "id_hi": pa.array(recs["id_hi"]),
        "debit": pa.array(recs["debit"]),
        "credit": pa.array(recs["credit"]),
        "amount": pa.array(recs["amount"]),
        "asset": pa.array(recs["asset"]),
        "code": pa.array(recs["code"]),
        "flags": pa.array(recs["flags"]),
        "at": pa.array(recs["at"], type=pa.int64()).cast(ts),
        "expires_at": pa.array(exp, type=pa.int64(), mask=exp == 0).cast(ts),
        "related": pa.array(recs["related_lo"]),
        "related_hi": pa.array(recs["related_hi"]),
        "timeout": pa.array(recs["timeout"]),
        "user_data": pa.array(recs["user_data"]),
    }
    return pa.table(cols)


# --- helpers: snapshot -----------------------------------------------------------------------------

def _put_snapshot(txn: lmdb.Transaction, db: Any, seq: int, entry_hash: bytes,
                  arrays: dict[str, np.ndarray]) -> None:
    names = sorted(arrays)
    index = []
    parts = []
    off = 0
    for name in names:
        a = np.ascontiguousarray(arrays[name])
        index.append(f"{name}:{a.dtype.str}:{len(a)}:{off}")
        parts.append(a)
        off += a.nbytes
    meta = ";".join(index).encode()
    head = u64be(seq) + entry_hash + struct.pack("<I", len(meta)) + meta
    # the value is built in one buffer from the arrays themselves (a copy per array and a join of
    # the copies cost two more state-sized blocks of memory at the moment of the snapshot)
    value = np.empty(len(head) + off + HASH_SIZE, np.uint8)
    value[: len(head)] = np.frombuffer(head, np.uint8)
    pos = len(head)
    for a in parts:
        value[pos: pos + a.nbytes] = a.reshape(-1).view(np.uint8)
        pos += a.nbytes
    h = blake3.blake3(max_threads=blake3.blake3.AUTO)
    h.update(value[:pos])
    value[pos:] = np.frombuffer(h.digest(), np.uint8)
    txn.put(b"state", value, db=db)


def _read_snapshot(txn: lmdb.Transaction, db: Any) -> tuple[int, bytes, dict[str, np.ndarray]] | None:
    raw = txn.get(b"state", db=db)
    if raw is None:
        return None
    try:
        seq = from_u64be(raw[:8])
        entry_hash = bytes(raw[8:40])
        (mlen,) = struct.unpack_from("<I", raw, 40)
        meta = bytes(raw[44:44 + mlen]).decode()
        start = 44 + mlen
        if blake3.blake3(raw[:-HASH_SIZE], max_threads=blake3.blake3.AUTO).digest() != bytes(raw[-HASH_SIZE:]):
            raise CorruptionError(f"the snapshot at entry {seq} fails its hash check (it was altered)")
        arrays = {}
        for item in meta.split(";"):
            name, dt, n, off = item.split(":")
            arrays[name] = np.frombuffer(raw, np.dtype(dt), int(n), start + int(off)).copy()
        return seq, entry_hash, arrays
    except (ValueError, UnicodeDecodeError, struct.error) as e:
        raise CorruptionError(f"the snapshot cannot be decoded: {e}") from e


def _compare_states(a: dict[str, np.ndarray], b: dict[str, np.ndarray], what: str) -> list[str]:
    problems = []
    ids = a["a_id"]
    for name in sorted(set(a) | set(b)):
        x, y = a.get(name), b.get(name)
        if x is None or y is None or x.shape != y.shape:
            problems.append(f"{what}: '{name}' differs in size from the journal's replay")
        elif not np.array_equal(x, y):
            i = int(np.flatnonzero(x != y)[0])
            where = f"account {int(ids[i])}" if name in ("dp", "cp", "dpend", "cpend", "a_flags",
                                                         "a_asset", "a_user") and i < len(ids) else f"row {i}"
            problems.append(f"{what}: '{name}' of {where} is {y[i]!r}, the journal gives {x[i]!r}")
    return problems


def _conservation(s: dict[str, np.ndarray]) -> list[str]:
    problems = []
    for asset in np.unique(s["a_asset"]):
        m = s["a_asset"] == asset
        net = int(s["cp"][m].astype(object).sum() - s["dp"][m].astype(object).sum())
        pend = int(s["cpend"][m].astype(object).sum() - s["dpend"][m].astype(object).sum())
        if net or pend:
            problems.append(f"asset {int(asset)} does not balance: posted {net:+d}, pending {pend:+d}")
    return problems


# --- helpers: index runs ---------------------------------------------------------------------------

def _run_key(level: int, first: int, last: int) -> bytes:
    return bytes([level]) + u64be(first) + u64be(last)


def _run_arrays(value: memoryview) -> tuple[np.ndarray, np.ndarray]:
    (n,) = struct.unpack_from("<Q", value, 0)
    acc = np.frombuffer(value, np.uint64, n, 8)
    loc = np.frombuffer(value, np.uint64, n, 8 + 8 * n)
    return acc, loc


def _runs_lookup(txn: lmdb.Transaction, db: Any, account: np.uint64) -> tuple[list[np.ndarray], int]:
    """Locators of ``account`` in every stored run, and the last journal entry the runs cover."""
    out = []
    indexed = 0
    for key in txn.cursor(db=db).iternext(keys=True, values=False):
        if len(key) != RUN_KEY_LEN:
            if key == INDEXED_KEY:
                indexed = from_u64be(txn.get(INDEXED_KEY, db=db))
            continue  # a chunk is read through its directory
        value = txn.get(key, db=db)
        n, k = struct.unpack_from("<QQ", value, 0) if len(value) >= 16 else (len(value), 0)
        if n & CHUNKED:
            firsts = np.frombuffer(value, np.uint64, k, 16)
            c0 = max(0, int(np.searchsorted(firsts, account, "left")) - 1)
            c1 = int(np.searchsorted(firsts, account, "right"))
            chunks = []
            for c in range(c0, c1):
                raw = txn.get(bytes(key) + c.to_bytes(4, "big"), db=db)
                if raw is None:
                    raise CorruptionError(f"index run {bytes(key).hex()}: chunk {c} is missing")
                chunks.append(raw)
        else:
            chunks = [value]
        for raw in chunks:
            acc, loc = _run_arrays(raw)
            lo = int(np.searchsorted(acc, account, "left"))
            hi = int(np.searchsorted(acc, account, "right"))
            if hi > lo:
                out.append(loc[lo:hi].copy())
    return out, indexed


def _put_run(txn: lmdb.Transaction, db: Any, key: bytes, run: np.ndarray) -> None:
    """Store a run; one of more than RUN_CHUNK entries as chunks under a directory of their first
    accounts (so a lookup reads a few small values, however big the run)."""
    n = int(struct.unpack_from("<Q", run, 0)[0])
    if n <= RUN_CHUNK:
        txn.put(key, run, db=db)
        return
    acc = run[8: 8 + 8 * n].view(np.uint64)
    loc = run[8 + 8 * n: 8 + 16 * n].view(np.uint64)
    k = -(-n // RUN_CHUNK)
    for c in range(k):
        a = acc[c * RUN_CHUNK: (c + 1) * RUN_CHUNK]
        lc = loc[c * RUN_CHUNK: (c + 1) * RUN_CHUNK]
        txn.put(key + c.to_bytes(4, "big"), b"".join((struct.pack("<Q", len(a)), a.tobytes(), lc.tobytes())),
                db=db)
    txn.put(key, struct.pack("<QQ", n | CHUNKED, k) + acc[::RUN_CHUNK].tobytes(), db=db)


def _run_size(value: memoryview) -> int:
    return int(struct.unpack_from("<Q", value, 0)[0]) & ~CHUNKED


def _get_run(txn: lmdb.Transaction, db: Any, key: bytes, value: memoryview) -> np.ndarray:
    """A stored run as one buffer (chunks joined)."""
    n = int(struct.unpack_from("<Q", value, 0)[0])
    if not n & CHUNKED:
        return np.frombuffer(value, np.uint8)
    k = int(struct.unpack_from("<Q", value, 8)[0])
    chunks = []
    for c in range(k):
        raw = txn.get(key + c.to_bytes(4, "big"), db=db)
        if raw is None:
            raise CorruptionError(f"index run {key.hex()}: chunk {c} is missing")
        chunks.append(np.frombuffer(raw, np.uint8))
    return _core.merge_runs(chunks)


def _delete_run(txn: lmdb.Transaction, db: Any, key: bytes) -> None:
    value = txn.get(key, db=db)
    if value is not None and int(struct.unpack_from("<Q", value, 0)[0]) & CHUNKED:
        for c in range(int(struct.unpack_from("<Q", value, 8)[0])):
            txn.delete(key + c.to_bytes(4, "big"), db=db)
    txn.delete(key, db=db)


def _index_tail(txn: lmdb.Transaction, jdb: Any, rdb: Any, idb: Any, indexed: int, seq: int,
                last: np.ndarray, tail: list[tuple[int, bytes]] | None = None) -> None:
    """Index journal entries ``indexed + 1 .. seq`` as one level-0 run (``last``: the records of
    entry ``seq``, at hand; ``tail``, when given: the transfer entries before it, as the journal holds
    them), then merge levels."""
    raw, seqs, counts = [], [], []
    if tail is not None:
        for s, b in tail:
            raw.append(b)
            seqs.append(s)
            counts.append(len(b) // RECORD_DTYPE.itemsize)
    elif seq > indexed + 1 and (cur := txn.cursor(db=jdb)).set_range(u64be(indexed + 1)):
        for key, value in cur:
            s = int.from_bytes(key, "big")
            if s >= seq:
                break
            if value[0] == KIND_TRANSFERS:
                r = _records(txn, rdb, s, value)
                raw.append(r.tobytes())
                seqs.append(s)
                counts.append(len(r))
    # one sort over the entries' records in journal order (the run merging each entry's would be), the
    # records joined as bytes (NumPy's concatenate of small structured arrays costs ~13 us an array)
    joined = np.frombuffer(b"".join([*raw, last.tobytes()]), RECORD_DTYPE) if raw else last
    run = _core.index_run_entries(joined, [*seqs, seq], [*counts, len(last)])
    _put_run(txn, idb, _run_key(0, indexed + 1, seq), run)
    txn.put(INDEXED_KEY, u64be(seq), db=idb)
    _compact_levels(txn, idb)


def _level_keys(txn: lmdb.Transaction, db: Any, level: int, limit: int) -> list[bytes]:
    """Keys of up to ``limit`` mergeable runs of one level, oldest first."""
    keys: list[bytes] = []
    cur = txn.cursor(db=db)
    if not cur.set_range(bytes([level])):
        return keys
    for key, value in cur:
        if key[0] != level or len(keys) == limit:
            break
        if len(key) == RUN_KEY_LEN and _run_size(value) < MAX_RUN_ENTRIES:
            keys.append(bytes(key))
    return keys


def _compact_levels(txn: lmdb.Transaction, db: Any) -> None:
    """Merge RUN_FANOUT runs of level 0 into one of level 1 when that many piled up; cascade upwards
    (each level looked at only when the one below just grew it)."""
    level = 0
    while level < 254:
        keys = _level_keys(txn, db, level, RUN_FANOUT)
        if len(keys) < RUN_FANOUT:
            return
        merged = _core.merge_runs([_get_run(txn, db, k, txn.get(k, db=db)) for k in keys])
        first = from_u64be(keys[0][1:9])
        last = max(from_u64be(k[9:17]) for k in keys)
        for k in keys:
            _delete_run(txn, db, k)
        _put_run(txn, db, _run_key(min(level + 1, 254), first, last), merged)
        level += 1


def _check_index(txn: lmdb.Transaction, db: Any, derived_runs: list[tuple[int, np.ndarray]],
                 journal_end: int) -> list[str]:
    """Compare the stored index runs, as a whole, with the runs derived from the journal entries they
    claim to cover."""
    raw = txn.get(INDEXED_KEY, db=db)
    indexed = from_u64be(raw) if raw is not None else 0
    if indexed > journal_end:
        return [f"the account index claims to cover entry {indexed}, past the journal's end ({journal_end})"]
    derived_runs = [r for s, r in derived_runs if s <= indexed]
    stored = sorted(((from_u64be(bytes(key[1:9])), bytes(key), value) for key, value in txn.cursor(db=db)
                     if key != INDEXED_KEY and len(key) == RUN_KEY_LEN), key=lambda kv: kv[0])
    try:
        have = _core.merge_runs([_get_run(txn, db, k, v) for _, k, v in stored])
    except (ValueError, CorruptionError) as e:
        return [f"the account index is damaged: {e}"]
    want = _core.merge_runs(derived_runs)
    if not np.array_equal(have, want):
        return [f"the account index ({(len(have) - 8) // 16} entries) does not match the journal "
                f"({(len(want) - 8) // 16} entries)"]
    return []


def _account_records(ids: Any, *, asset: int = 0, flags: int = 0, user_data: int = 0) -> np.ndarray:
    """The records that create the accounts ``ids`` (of one asset and flags)."""
    arr = np.asarray(ids)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValidationError(f"ids must be a 1-d integer array, not {arr.dtype} of shape {arr.shape}")
    if arr.dtype.kind == "i" and len(arr) and arr.min() < 0:
        raise ValidationError(f"ids[{int(np.argmin(arr))}]={int(arr.min())} is negative")
    recs = np.zeros(len(arr), ACCOUNT_RECORD_DTYPE)
    recs["id"] = arr.astype(np.uint64)
    recs["asset"] = _checked_int(asset, "asset", 0, (1 << 32) - 1)
    recs["flags"] = _checked_int(int(flags), "flags", 0, 0xFFFF)
    recs["user_data"] = _checked_int(user_data, "user_data", 0, (1 << 64) - 1)
    return recs


def _checked_int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise ValidationError(f"{name}={v!r} must be an integer")
    v = int(v)
    if not lo <= v <= hi:
        raise ValidationError(f"{name}={v} is out of range [{lo}, {hi}]")
    return v

