"""Persistent cache of logical (target-view) file sizes, so listings need not open files.

The target view must report every file's *logical* size (e.g. the decrypted size). Learning
it may mean opening the native file and reading its header, which makes ``ls -l`` of a big
directory crawl. `SizeCache` remembers the answer per native inode, across mounts.

Keys and validity
-----------------
The key is the native file's identity ``(st_dev, st_ino)``: a size belongs to the inode, not
to a name, so all hard links share one entry and a rename keeps it. Each entry carries the
validators ``(st_size, st_mtime_ns, st_ctime_ns)`` of the native file it was computed from; a
lookup with different validators is a miss and drops the stale entry (this also covers inode
numbers reused by a new file). Callers should take the validators from a stat made *before*
computing the size, so a concurrent change makes the entry stale rather than wrong.

Timestamps are only as fine as the file system's clock tick: a file rewritten twice within one
tick, keeping its size, has the same validators before and after. As git does for its index
("racily clean" entries), `put` therefore ignores a size whose ``ctime`` is within
`racy_window_ns` (default 0.5 s) of now, or in the future; such files are simply recomputed
until they are older. Pass ``racy_window_ns=0`` to trust every timestamp.

The value is a `CachedSize`: the logical size (an ``int``), or `NOT_FORMATTED` when the native
file is not in the provider stack's format, so it is passed through and its logical size is
its native size. `get` returns None on a miss, so test the result with ``is None`` (a
logical size of 0 is falsy).

Hot path and persistence
------------------------
All entries live in a dict loaded in bulk at open; a hit is a dict lookup plus a tuple compare,
with no lock, syscall or SQL (about 0.1 µs, see bench/bench_sizecache.py). Bulk load was chosen
over a lazy per-key SQL lookup because a cold listing is exactly the case the cache exists for:
loading 100k entries takes about 0.1 s once, while a lazy miss would cost a query per file on
every first listing. Persistence is write-behind: `put`/`forget`/stale drops only mark the key
dirty, and `flush` (called by the file system every few seconds and at unmount) writes every
dirty key in ONE SQLite transaction.

Storage is a SQLite file (normally ``.isofs/sizecache.db`` in the source's metadata directory,
whose parent must exist) in WAL mode with ``synchronous=NORMAL``: a crash may lose the last
flushes, never consistency, and losing them only costs recomputation. The cache is only a
cache: a corrupt file is renamed aside (``*.corrupt``) and recreated empty, a file with an
unknown schema version is recreated, and a file that cannot be opened or written at all
leaves the cache running in memory only; each case logs a warning and never fails the mount.

Size bound
----------
At most `max_entries` entries are kept (default 1,000,000). In memory each is two Python ints
(the key and a packed value), about 150 bytes, and about 66 bytes in the file; a full default
cache means some 150 MB and a few seconds of loading before the mount is ready
(bench/bench_sizecache.py measures it). `flush` drops the least recently *put* entries
beyond the cap. Hits do not refresh an entry: that would put a write on the hot path, and a
wrongly pruned entry only costs one recomputation. The dict's insertion order is the put order
(`put` re-inserts), and the stored ``seq`` column (the rowid, so the load needs no sort)
restores that order at load.

Threads
-------
`get`, `put` and `forget` are meant for one thread (the trio event loop); `flush`,
`statistics` and `close` may run in any thread. `_lock` (a `threading.Lock`) guards every
*mutation* of the dict and of the dirty map: `put`, `forget`, the stale drop, and in `flush`
the pruning plus the swap of the dirty map for an empty one. `get`'s hit path reads the dict
without the lock, which CPython's dict makes safe. `_flush_lock` serialises whole flushes
(and close), so SQL runs outside `_lock` and the event loop never waits on disk.
"""

from __future__ import annotations

import contextlib
import enum
import gc
import itertools
import logging
import sqlite3
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias

from isofs.core.native import Validators

log = logging.getLogger(__name__)

#: File name of the cache inside a source's metadata directory.
DB_FILE_NAME: Final = "sizecache.db"
#: Version of the on-disk schema; a file with any other version is recreated.
SCHEMA_VERSION: Final = 1
DEFAULT_MAX_ENTRIES: Final = 1_000_000
DEFAULT_RACY_WINDOW_NS: Final = 500_000_000

_I64_MIN: Final = -(1 << 63)
_I64_MAX: Final = (1 << 63) - 1
_U64: Final = 1 << 64
# Error codes after which the file is not trusted any more and is moved aside.
_CORRUPT_CODES: Final = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
# Primary error codes meaning "cannot use the file now", not "the file is damaged".
_INACCESSIBLE_CODES: Final = frozenset(
    {
        sqlite3.SQLITE_PERM,
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
        sqlite3.SQLITE_NOMEM,
        sqlite3.SQLITE_READONLY,
        sqlite3.SQLITE_IOERR,
        sqlite3.SQLITE_FULL,
        sqlite3.SQLITE_CANTOPEN,
        sqlite3.SQLITE_PROTOCOL,
        sqlite3.SQLITE_NOLFS,
        sqlite3.SQLITE_AUTH,
    }
)
_BUSY_TIMEOUT_S: Final = 5.0

# The rowid is the put sequence number, so a plain scan returns rows in put order (no sort at
# load) and REPLACE moves a re-put row to the end. dev/ino are stored as signed 64-bit (SQLite
# has no unsigned); logical NULL means not formatted.
_SCHEMA: Final = (
    "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID",
    "CREATE TABLE sizes ("
    " seq INTEGER PRIMARY KEY, dev INTEGER NOT NULL, ino INTEGER NOT NULL,"
    " size INTEGER NOT NULL, mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL,"
    " logical INTEGER)",
    "CREATE UNIQUE INDEX sizes_key ON sizes (dev, ino)",
)
# Rows of a damaged or tampered file with a non-integer size must never reach st_size.
_LOAD: Final = (
    "SELECT dev, ino, size, mtime_ns, ctime_ns, logical FROM sizes"
    " WHERE logical IS NULL OR (typeof(logical) = 'integer' AND logical >= 0) ORDER BY seq"
)
_UPSERT: Final = (
    "INSERT OR REPLACE INTO sizes (seq, dev, ino, size, mtime_ns, ctime_ns, logical)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_DELETE: Final = "DELETE FROM sizes WHERE dev = ? AND ino = ?"


class NotFormatted(enum.Enum):
    """Marker type: the native file is not in the stack's format (logical = native size)."""

    NOT_FORMATTED = "not formatted"


NOT_FORMATTED: Final = NotFormatted.NOT_FORMATTED

SizeKey: TypeAlias = tuple[int, int]  # (st_dev, st_ino) of the native file
CachedSize: TypeAlias = int | Literal[NotFormatted.NOT_FORMATTED]
_Entry: TypeAlias = tuple[Validators, CachedSize]
# A pending write: the entry and its put sequence number, or None to delete the row.
_Pending: TypeAlias = tuple[_Entry, int] | None

# In memory an entry is two Python ints, not nine objects (a dict of tuples of tuples took
# 415 bytes per entry, 1,000,000 entries 415 MB; two ints take about 150): the key
# dev << 64 | ino, and the value size | mtime << 64 | ctime << 128 | (logical + 1) << 192
# (times offset by 2^63 so that times before 1970 pack too; logical + 1 = 0 means
# NOT_FORMATTED).
_OFFSET: Final = 1 << 63
_MASK64: Final = (1 << 64) - 1
_VALIDATORS_MASK: Final = (1 << 192) - 1


def _key_int(key: SizeKey) -> int:
    return key[0] << 64 | key[1]


def _key_tuple(packed: int) -> SizeKey:
    return packed >> 64, packed & _MASK64


def _pack_validators(validators: Validators) -> int:
    size, mtime_ns, ctime_ns = validators
    return size | (mtime_ns + _OFFSET) << 64 | (ctime_ns + _OFFSET) << 128


def _pack(validators: Validators, value: CachedSize) -> int:
    logical = 0 if value is NOT_FORMATTED else value + 1
    return _pack_validators(validators) | logical << 192


def _unpack(packed: int) -> _Entry:
    logical = packed >> 192
    validators = Validators(
        packed & _MASK64,
        (packed >> 64 & _MASK64) - _OFFSET,
        (packed >> 128 & _MASK64) - _OFFSET,
    )
    return validators, (NOT_FORMATTED if logical == 0 else logical - 1)


def _value(packed: int) -> CachedSize:
    logical = packed >> 192
    return NOT_FORMATTED if logical == 0 else logical - 1


def logical_size(cached: CachedSize, native_size: int) -> int:
    """The size to report for a cached value of a file whose native size is `native_size`."""
    return native_size if cached is NOT_FORMATTED else cached


@dataclass(frozen=True, slots=True)
class SizeCacheStatistics:
    """Counters for `isofs status`: how well the size cache works and what it costs."""

    hits: int  # get() answered from the cache
    misses: int  # get() found nothing usable (includes stale drops)
    stale_drops: int  # entries found with other validators and dropped
    entries: int  # entries in memory now
    capacity: int  # max_entries: flush prunes beyond it
    pending: int  # dirty keys not flushed yet
    persisted_writes: int  # rows written or deleted by flushes since open
    pruned: int  # entries dropped to stay under max_entries
    skipped_puts: int  # puts ignored: racily recent ctime or values SQLite cannot store
    flushes: int  # flushes that committed (or pruned, when memory-only)
    flush_failures: int  # flushes whose transaction failed (their writes were requeued)
    loaded: int  # entries loaded at open
    load_ns: int  # time spent opening and loading the file
    persistent: bool  # False when running memory-only (no path, or the file is unusable)
    file_bytes: int  # the file and its write-ahead log on disk
    memory_bytes: int  # the entries in memory (estimated from one entry's objects)


class _SchemaMismatch(Exception):
    """The file holds another schema version (or foreign tables): recreate it."""


# What opening/loading a damaged or inaccessible file can raise (TypeError: tampered rows).
_OPEN_ERRORS: Final = (sqlite3.Error, OSError, TypeError, ValueError)


class SizeCache:
    """Logical sizes per native inode, validated by (size, mtime_ns, ctime_ns); see module doc.

    `path` is the SQLite file (normally ``META_DIR/sizecache.db``), or None for a cache that
    lives in memory only.
    """

    def __init__(
        self,
        path: Path | None,
        *,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        racy_window_ns: int = DEFAULT_RACY_WINDOW_NS,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._path = path
        self._max_entries = max_entries
        self._racy_window_ns = racy_window_ns
        self._entries: dict[int, int] = {}  # packed, see _pack
        self._dirty: dict[SizeKey, _Pending] = {}
        self._seq = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self._failing = False
        self._hits = 0
        self._misses = 0
        self._stale_drops = 0
        self._persisted_writes = 0
        self._pruned = 0
        self._skipped_puts = 0
        self._flushes = 0
        self._flush_failures = 0
        self._loaded = 0
        start = time.perf_counter_ns()
        if path is not None:
            self._open(path)
        self._load_ns = time.perf_counter_ns() - start

    def __enter__(self) -> SizeCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- hot path (event-loop thread) ---------------------------------------------------------

    def get(self, key: SizeKey, validators: Validators) -> CachedSize | None:
        """The cached logical size of `key`, or None if unknown or its validators changed."""
        packed_key = key[0] << 64 | key[1]
        entry = self._entries.get(packed_key)
        if entry is not None:
            if entry & _VALIDATORS_MASK == _pack_validators(validators):
                self._hits += 1
                return _value(entry)
            self._drop_stale(key, packed_key, entry)
        self._misses += 1
        return None

    def peek(self, key: SizeKey, validators: Validators) -> CachedSize | None:
        """What `get` would return, counting nothing and dropping nothing."""
        entry = self._entries.get(_key_int(key))
        if entry is not None and entry & _VALIDATORS_MASK == _pack_validators(validators):
            return _value(entry)
        return None

    def count_hit(self) -> None:
        """A value `peek` returned was used as `get`'s would have been."""
        self._hits += 1

    def put(
        self, key: SizeKey, validators: Validators, value: CachedSize, *, exact: bool = False
    ) -> None:
        """Remember `value` for `key` as computed from a native file with `validators`.

        Only marks the key dirty; `flush` persists it. Ignored (counted in `skipped_puts`)
        when the ctime is racily recent or a number does not fit SQLite's signed 64 bits.
        `exact`: the caller wrote the file itself and knows the value without having read it
        (the filesystem after its own write-back), so a recent ctime is no reason to doubt it.
        """
        if value is not NOT_FORMATTED and (type(value) is not int or value < 0):
            raise ValueError(f"a logical size must be an int >= 0 or NOT_FORMATTED: {value!r}")
        dev, ino = key
        if not (0 <= dev < _U64 and 0 <= ino < _U64):
            raise ValueError(f"not an (st_dev, st_ino) pair: {key!r}")
        size, mtime_ns, ctime_ns = validators
        if (
            (not exact and time.time_ns() - ctime_ns < self._racy_window_ns)
            or not _I64_MIN <= mtime_ns <= _I64_MAX
            or not _I64_MIN <= ctime_ns <= _I64_MAX
            or not 0 <= size <= _I64_MAX
            or (value is not NOT_FORMATTED and value > _I64_MAX)
        ):
            self._skipped_puts += 1
            return
        entry: _Entry = (validators, value)
        packed_key = _key_int(key)
        with self._lock:
            # Re-insert so the dict's order stays the put order pruning relies on.
            self._entries.pop(packed_key, None)
            self._entries[packed_key] = _pack(validators, value)
            self._seq += 1
            self._dirty[key] = (entry, self._seq)

    def forget(self, key: SizeKey) -> None:
        """Drop `key` (e.g. the file was rewritten or unlinked through the mount)."""
        with self._lock:
            if self._entries.pop(_key_int(key), None) is not None:
                self._dirty[key] = None

    def _drop_stale(self, key: SizeKey, packed_key: int, entry: int) -> None:
        with self._lock:
            if self._entries.get(packed_key) == entry:  # not replaced by a put meanwhile
                del self._entries[packed_key]
                self._dirty[key] = None
                self._stale_drops += 1

    # -- persistence (any thread) -------------------------------------------------------------

    def flush(self) -> int:
        """Prune to `max_entries` and write every dirty key in one transaction.

        Returns the number of rows written or deleted. Never raises for storage errors: a
        failed transaction is requeued for the next flush, a corrupt file is recreated.
        """
        with self._flush_lock:
            return self._flush_locked()

    def close(self) -> None:
        """Flush and close the file; the cache keeps working in memory only afterwards."""
        with self._flush_lock:
            self._flush_locked()
            conn, self._conn = self._conn, None
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()

    def statistics(self) -> SizeCacheStatistics:
        """Snapshot of the counters."""
        return SizeCacheStatistics(
            hits=self._hits,
            misses=self._misses,
            stale_drops=self._stale_drops,
            entries=len(self._entries),
            capacity=self._max_entries,
            pending=len(self._dirty),
            persisted_writes=self._persisted_writes,
            pruned=self._pruned,
            skipped_puts=self._skipped_puts,
            flushes=self._flushes,
            flush_failures=self._flush_failures,
            loaded=self._loaded,
            load_ns=self._load_ns,
            persistent=self._conn is not None,
            file_bytes=self._file_bytes(),
            memory_bytes=self._memory_bytes(),
        )

    def _file_bytes(self) -> int:
        total = 0
        if self._path is not None:
            for suffix in ("", "-wal"):
                with contextlib.suppress(OSError):
                    total += self._path.with_name(self._path.name + suffix).stat().st_size
        return total

    def _memory_bytes(self) -> int:
        entries = self._entries
        sample = next(iter(entries.items()), None)
        if sample is None:
            return sys.getsizeof(entries)
        return sys.getsizeof(entries) + len(entries) * (
            sys.getsizeof(sample[0]) + sys.getsizeof(sample[1])
        )

    def _flush_locked(self) -> int:
        """`flush` body; the caller holds `_flush_lock`."""
        with self._lock:
            self._prune_locked()
            batch, self._dirty = self._dirty, {}
        conn = self._conn
        if conn is None:
            self._flushes += 1
            return 0
        try:
            written = self._write(conn, batch)
        except sqlite3.Error as e:
            self._flush_failures += 1
            self._requeue(batch)
            self._flush_failed(e)
            return 0
        if self._failing:
            self._failing = False
            log.info("size cache %s: writes work again", self._path)
        self._flushes += 1
        self._persisted_writes += written
        return written

    def _prune_locked(self) -> None:
        """Drop the least recently put entries beyond the cap (caller holds `_lock`)."""
        excess = len(self._entries) - self._max_entries
        if excess <= 0:
            return
        for packed_key in list(itertools.islice(self._entries, excess)):
            del self._entries[packed_key]
            self._dirty[_key_tuple(packed_key)] = None
        self._pruned += excess

    def _requeue(self, batch: dict[SizeKey, _Pending]) -> None:
        """Put a failed batch back; anything dirtied since then is newer and wins."""
        with self._lock:
            for key, pending in batch.items():
                self._dirty.setdefault(key, pending)

    @staticmethod
    def _write(conn: sqlite3.Connection, batch: dict[SizeKey, _Pending]) -> int:
        """Apply `batch` to the file in one transaction."""
        if not batch:
            return 0
        upserts = []
        deletes = []
        for (dev, ino), pending in batch.items():
            dev = dev - _U64 if dev > _I64_MAX else dev
            ino = ino - _U64 if ino > _I64_MAX else ino
            if pending is None:
                deletes.append((dev, ino))
            else:
                ((size, mtime_ns, ctime_ns), value), seq = pending
                logical = None if value is NOT_FORMATTED else value
                upserts.append((seq, dev, ino, size, mtime_ns, ctime_ns, logical))
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.executemany(_DELETE, deletes)
            conn.executemany(_UPSERT, upserts)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return len(batch)

    def _flush_failed(self, error: sqlite3.Error) -> None:
        """Log a failed flush; recreate the file if it turned out to be corrupt."""
        code = getattr(error, "sqlite_errorcode", None)
        if code is None or (code & 0xFF) not in _CORRUPT_CODES:
            if not self._failing:
                self._failing = True
                log.warning("size cache %s: flush failed, will retry: %s", self._path, error)
            return
        assert self._path is not None
        log.warning("size cache %s is corrupt (%s); recreating it", self._path, error)
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._move_aside(self._path)
        try:
            self._conn, _entries, _seq = self._connect(self._path, load=False)
        except (_SchemaMismatch, *_OPEN_ERRORS) as e:
            log.warning("size cache %s: cannot recreate (%s); memory only", self._path, e)
            return
        with self._lock:  # everything in memory must be written to the new file
            self._dirty = {}
            for packed_key, entry in self._entries.items():
                self._seq += 1
                self._dirty[_key_tuple(packed_key)] = (_unpack(entry), self._seq)

    # -- opening ------------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        """Open and load `path`; on trouble recreate it, or fall back to memory only."""
        try:
            self._conn, self._entries, self._seq = self._connect(path, load=True)
            self._loaded = len(self._entries)
            return
        except _SchemaMismatch as e:
            log.warning("size cache %s: %s; recreating it", path, e)
            try:
                _remove_db_files(path)
            except OSError as e2:
                log.warning("size cache %s: cannot remove (%s); memory only", path, e2)
                return
        except _OPEN_ERRORS as e:
            if not _is_corrupt(e):
                log.warning("size cache %s unusable (%s); running in memory only", path, e)
                return
            log.warning("size cache %s is corrupt (%s); moving it aside, starting empty", path, e)
            self._move_aside(path)
        self._entries = {}
        try:
            self._conn, _entries, _seq = self._connect(path, load=False)
        except (_SchemaMismatch, *_OPEN_ERRORS) as e:
            log.warning("size cache %s: cannot recreate (%s); memory only", path, e)

    @classmethod
    def _connect(
        cls, path: Path, *, load: bool
    ) -> tuple[sqlite3.Connection, dict[int, int], int]:
        """Connect, check or create the schema, and (if `load`) read every entry."""
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            tables = {
                row[0]
                for row in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table'"
                    " AND name NOT LIKE 'sqlite_%'"
                )
            }
            if not tables:
                cls._create_schema(conn)
                return conn, {}, 0
            version = None
            if "meta" in tables:
                row = conn.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
                version = row[0] if row else None
            if version != SCHEMA_VERSION or tables != {"meta", "sizes"}:
                raise _SchemaMismatch(
                    f"schema version {version!r} (tables {sorted(tables)}),"
                    f" expected {SCHEMA_VERSION}"
                )
            if not load:
                return conn, {}, 0
            return conn, _load(conn), _max_seq(conn)
        except BaseException:
            conn.close()
            raise

    @staticmethod
    def _create_schema(conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA:
                conn.execute(statement)
            conn.execute(
                "INSERT INTO meta (name, value) VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _move_aside(path: Path) -> None:
        """Rename a corrupt file (and its WAL/SHM) to ``*.corrupt*``, replacing older ones.

        The WAL must go too: replayed onto a fresh file it would resurrect the damage.
        """
        for suffix in ("", "-wal", "-shm"):
            source = path.with_name(path.name + suffix)
            try:
                source.replace(path.with_name(path.name + ".corrupt" + suffix))
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("size cache: cannot move %s aside: %s", source, e)
                with contextlib.suppress(OSError):
                    source.unlink()


def _load(conn: sqlite3.Connection) -> dict[int, int]:
    """Read every valid row, in put order, into the in-memory dict (packed, see _pack).

    The cyclic GC is paused meanwhile: the fresh objects of a large load would trigger
    collections that rescan everything alive and more than double the load time.
    """
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return {
            (dev + _U64 if dev < 0 else dev) << 64 | (ino + _U64 if ino < 0 else ino): size
            | (mtime_ns + _OFFSET) << 64
            | (ctime_ns + _OFFSET) << 128
            | (0 if logical is None else logical + 1) << 192
            for dev, ino, size, mtime_ns, ctime_ns, logical in conn.execute(_LOAD)
        }
    finally:
        if gc_was_enabled:
            gc.enable()


def _max_seq(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(seq) FROM sizes").fetchone()
    return row[0] if row and type(row[0]) is int else 0


def _is_corrupt(error: BaseException) -> bool:
    """Whether an open/load error means the file's content is bad (vs. inaccessible).

    Inaccessible (permissions, read-only, busy, I/O, full disk) leaves the file alone and runs
    memory-only: moving aside a file we cannot use may break whoever can. Anything else the
    file made SQLite or the loader say (not a database, corrupt, malformed schema, odd rows)
    is treated as damage.
    """
    if isinstance(error, sqlite3.Error):
        code = getattr(error, "sqlite_errorcode", None)
        return code is None or (code & 0xFF) not in _INACCESSIBLE_CODES
    return isinstance(error, TypeError | ValueError)


def _remove_db_files(path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        with contextlib.suppress(FileNotFoundError):
            path.with_name(path.name + suffix).unlink()
