"""The LMDB environment under a ledger: opening, named databases, growth, key encodings.

One process opens one LMDB environment per directory (LMDB's rule), so handles on the same path share
it through a small registry.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import struct
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any

import lmdb

from .errors import StorageError

__all__ = ["Store", "open_store", "u64be", "from_u64be", "EngineLock", "ENGINE_LOCK"]

FORMAT = b"loyalty_engine ledger 2"
DEFAULT_MAP_SIZE = 1 << 30
DB_NAMES = (b"meta", b"journal", b"records", b"snapshot", b"index", b"ext")
#: LMDB's MDB_WRITEMAP, the same for every writer of every mode (readonly opens never write through the map).
WRITEMAP = False
#: The file in an engine's directory that the open engine holds locked (flock), with its PID inside.
ENGINE_LOCK = "engine.lock"


_HINT = struct.Struct("<Q")


def u64be(n: int) -> bytes:
    """A key that sorts numerically."""
    return n.to_bytes(8, "big")


def from_u64be(b: bytes | memoryview) -> int:
    return int.from_bytes(bytes(b), "big")


@dataclass
class Store:
    """An open LMDB environment and its named databases, shared by the handles of one process."""

    path: str
    env: lmdb.Environment
    dbs: dict[bytes, Any]
    mode: str
    refs: int = 0
    #: Serialises this process's writers and map resizes (LMDB's lock serialises processes).
    lock: threading.RLock = field(default_factory=threading.RLock)
    #: ``head.hint``: the last committed sequence number, mapped shared by every process. Writers set
    #: it after each commit so that a reader can tell in nanoseconds that nothing changed; it is only a
    #: hint (readers still look at the journal head now and then), never the truth.
    hint: mmap.mmap | None = None

    def hinted_head(self) -> int:
        """The head sequence number as last published by a writer (-1 if there is no hint)."""
        return _HINT.unpack_from(self.hint, 0)[0] if self.hint is not None else -1

    def publish_head(self, seq: int) -> None:
        if self.hint is not None:
            try:
                _HINT.pack_into(self.hint, 0, seq)
            except (TypeError, ValueError):     # (the hint was closed: the store is closing)
                pass

    def grow(self) -> None:
        """Double the map (the data outgrew it)."""
        with self.lock:
            size = self.env.info()["map_size"]
            self.env.set_mapsize(size * 2)

    def refresh_map(self) -> None:
        """Adopt a map size another process set."""
        with self.lock:
            self.env.set_mapsize(0)

    def begin(self, write: bool = False) -> lmdb.Transaction:
        """A transaction; adopts another process's map growth if needed."""
        for _ in range(3):
            try:
                return self.env.begin(None, None, write, True)     # (db, parent, write, buffers)
            except lmdb.MapResizedError:
                self.refresh_map()
        return self.env.begin(None, None, write, True)


_registry: dict[str, Store] = {}
_registry_lock = threading.Lock()


def open_store(path: str | os.PathLike[str], *, mode: str, create: bool, readonly: bool,
               map_size: int | None) -> Store:
    """Open (or share) the LMDB environment at ``path``.

    ``mode`` is the durability: ``"full"`` (LMDB syncs data and meta page at every commit),
    ``"group"`` (one sync per commit; the meta page rides on the next one, so a power loss may undo the
    last commit but never damages the ledger) or ``"none"`` (the OS writes when it likes: a process crash
    loses nothing, a power loss may lose recent commits; call ``Ledger.sync()`` at checkpoints).
    """
    real = os.path.realpath(os.fspath(path))
    with _registry_lock:
        st = _registry.get(real)
        if st is not None:
            if st.mode != mode:
                raise StorageError(f"the ledger at {real!r} is already open in this process with "
                                   f"sync={st.mode!r}; open it again with the same sync mode")
            st.refs += 1
            return st
        if not os.path.exists(real):
            if not create or readonly:
                raise StorageError(f"no ledger at {os.fspath(path)!r}; create it with Ledger.open(path) "
                                   f"or 'loyalty-engine init {os.fspath(path)}'")
            try:
                os.makedirs(real, exist_ok=True)
            except OSError as e:
                raise StorageError(f"cannot create the ledger directory {real!r}: {e}") from e
        elif not os.path.isdir(real):
            raise StorageError(f"{os.fspath(path)!r} is a file, not a ledger directory")
        try:
            env = lmdb.open(
                real,
                map_size=map_size or DEFAULT_MAP_SIZE,
                max_dbs=len(DB_NAMES) + 2,
                sync=mode != "none",
                metasync=mode == "full",
                # the same for every open, whatever the mode: LMDB says processes with and without
                # MDB_WRITEMAP on one environment do not cooperate (it can defeat durability), and a host at
                # sync="none" beside an operator's import at sync="full" is one environment (docs/ledger.md,
                # durability: why without)
                writemap=WRITEMAP,
                readonly=readonly,
                max_readers=1024,
                max_spare_txns=4,
            )
        except lmdb.Error as e:
            raise StorageError(f"cannot open the ledger at {real!r}: {e}") from e
        try:
            if readonly:
                dbs = {name: env.open_db(name, create=False) for name in DB_NAMES}
            else:
                with env.begin(write=True) as txn:
                    dbs = {name: env.open_db(name, txn=txn) for name in DB_NAMES}
                    fmt = txn.get(b"format", db=dbs[b"meta"])
                    if fmt is None:
                        txn.put(b"format", FORMAT, db=dbs[b"meta"])
                    elif bytes(fmt) != FORMAT:
                        raise StorageError(f"{real!r} holds {bytes(fmt)!r}, not a {FORMAT.decode()}")
        except lmdb.Error as e:
            env.close()
            raise StorageError(f"{real!r} is not a loyalty_engine ledger: {e}") from e
        except StorageError:
            env.close()
            raise
        st = Store(path=real, env=env, dbs=dbs, mode=mode, refs=1, hint=_open_hint(real, not readonly))
        _registry[real] = st
        return st


def release_store(st: Store) -> None:
    """Drop one handle's reference; the last one closes the environment."""
    with _registry_lock:
        st.refs -= 1
        if st.refs <= 0:
            _registry.pop(st.path, None)
            st.env.close()
            if st.hint is not None:
                st.hint.close()


def _open_hint(real: str, writable: bool) -> mmap.mmap | None:
    """Map ``head.hint`` in the ledger directory (created by writers); None where it cannot be."""
    path = os.path.join(real, "head.hint")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644) if writable else os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        if os.fstat(fd).st_size < 8:
            if not writable:
                return None
            os.ftruncate(fd, 8)
        return mmap.mmap(fd, 8, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class EngineLock:
    """An exclusive ``flock`` on ``engine.lock`` in an engine's directory, held while the engine is open:
    an engine keeps its members' state in memory and writes it through, so a second one on the same
    directory (in this process or another) would work from stale memory. The lock file holds the
    holder's PID. The kernel drops the lock when the holder closes it or dies (a SIGKILL included);
    an engine dropped without :meth:`release` releases it when it is garbage-collected."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        real = os.path.realpath(os.fspath(directory))
        self.path = os.path.join(real, ENGINE_LOCK)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StorageError(f"cannot open the engine lock {self.path!r}: {e}") from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            try:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise StorageError(f"cannot lock the engine lock {self.path!r}: {e}") from e
            who = ("this process" if holder == str(os.getpid())
                   else f"process {holder}" if holder.isdigit() else "another process")
            raise StorageError(f"the club at {real!r} is already open in an Engine ({who} holds "
                               f"{ENGINE_LOCK}); one process, one engine: close that engine first (the ledger "
                               f"can still be read: Ledger.open(path, readonly=True))") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass                            # the PID is a courtesy for the message; the lock is what counts
        self._fd = fd
        self._close = weakref.finalize(self, os.close, fd)
        _LOCKS.add(self)

    @property
    def held(self) -> bool:
        return self._close.alive

    def _forget_in_child(self) -> None:
        """In a child made by fork(): close its copy of the file without unlocking it (the lock is the
        parent's; an unlock would drop it for the parent too), so that the child does not keep the engine
        locked after the parent closes it or dies."""
        if self._close.detach() is not None:
            try:
                os.close(self._fd)
            except OSError:
                pass

    def release(self) -> None:
        """Drop the lock (closing the file releases it); again does nothing."""
        self._close()


#: The engine locks this process holds (a child made by fork() lets go of its copies of them).
_LOCKS: weakref.WeakSet[EngineLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_LOCKS):
        lock._forget_in_child()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
