"""The chunk store both backends share: packs, the index, write ordering, gc, rebuild.

`PackedStore` keeps its index and the packs it writes in one local directory; a subclass
says where sealed packs finally live (`EmbeddedStore`: right there; `S3Store`: in a bucket,
the local copy only until its upload is confirmed) by overriding the `_remote_*` hooks and
`_sealed`.

Write ordering (what a crash may leave, see docs/FORMAT-dedup.md): `put` appends records to
the open pack and keeps their index rows in memory; `commit` fsyncs the pack, then commits the
rows in one transaction; a pack is sealed (trailer written and fsynced) only after its rows
are committed. A pack file nobody holds the lock of is adopted, torn tail cut off. gc writes
the live chunks of a pack it rewrites into a new pack, fsyncs it, moves their rows in one
transaction, and only then deletes the old pack.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from isofs.provider import CorruptData

from .base import CHUNK_ID_SIZE, ChunkStore, GarbageReport, MissingChunk
from .codec import DEFAULT_LEVEL, ChunkCodec
from .index import DELETING, OPEN, SEALED, UPLOADED, Index, Location
from .packs import (
    HEADER_SIZE,
    MAX_RECORD_SIZE,
    RECORD_HEADER_SIZE,
    TEMP_PREFIX,
    PackWriter,
    decode_record,
    encode_record,
    has_valid_footer,
    pread_exact,
    read_pack_entries,
    short,
)

log = logging.getLogger(__name__)

DEFAULT_PACK_SIZE = 32 * 1024 * 1024
#: Live ids handed to SQLite per statement batch while marking (and per progress call).
MARK_BATCH = 10_000
#: Largest span gc reads at once when it copies a pack's live records.
COPY_SPAN = 8 * 1024 * 1024
OPEN_FDS = 64

#: Tests set this to a callable that is told every step of the write ordering (and may kill
#: the process there); production code never sets it.
crash_hook: Callable[[str], None] | None = None


def crash_point(step: str) -> None:
    if crash_hook is not None:
        crash_hook(step)


class RemoteUnavailable(OSError):
    """The final place of packs (an object store) cannot be reached or refused a request."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


class StoreBusy(OSError):
    """Another garbage collection or index rebuild holds the store's maintenance lock."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)


class MissingChunks(MissingChunk):
    """`reference` named ids the store does not have (a gc freed them since `has`); `ids`
    lists them: put their content again, then reference them."""

    def __init__(self, ids: list[bytes]) -> None:
        names = ", ".join(short(i) for i in ids[:4]) + (" ..." if len(ids) > 4 else "")
        super().__init__(f"{len(ids)} chunk(s) are not in the store: {names}")
        self.ids = ids


@dataclass
class Pending:
    """A chunk appended to a pack whose index row is not committed yet."""

    pack: int
    pack_name: str
    offset: int
    length: int
    size: int
    refs: int = 0


@dataclass
class _Handle:
    """A cached pack descriptor and how many readers use it now (guarded by the fd lock)."""

    fd: int
    users: int = 0
    retired: bool = False

    def retire(self) -> None:
        self.retired = True
        if self.users == 0 and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class OpenPack:
    writer: PackWriter
    num: int
    since: float = field(default_factory=time.monotonic)


def batched(items: Iterable[bytes], size: int) -> Iterator[list[bytes]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class PackedStore(ChunkStore):
    """Packs plus an SQLite index under `directory` (see the module docstring)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        key: bytes | None = None,
        level: int = DEFAULT_LEVEL,
        pack_size: int = DEFAULT_PACK_SIZE,
        verify_ids: bool = True,
    ) -> None:
        if pack_size < 4096:
            raise ValueError(f"pack size {pack_size} is too small")
        self.directory = Path(directory)
        self.pack_dir = self.directory / "packs"
        self.pack_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.codec = ChunkCodec(key, level)
        self.pack_size = pack_size
        self.verify_ids = verify_ids
        self.index = Index(self.directory / "index.db")
        self._check_key()
        self._lock = threading.RLock()
        self._open: OpenPack | None = None
        self._full: list[OpenPack] = []
        self._pending: dict[bytes, Pending] = {}
        self._fds: OrderedDict[str, _Handle] = OrderedDict()
        self._fd_lock = threading.Lock()
        self._closed = False
        self._recover(seal_orphans=self.seal_on_close)

    #: Seal the open pack at close (and orphans at open), so it can go to its final place.
    seal_on_close = False
    #: Seconds before a collection's start within which a counted reference still protects.
    gc_grace = 2.0

    # ------------------------------------------------------------------ interface

    def chunk_id(self, content: bytes | memoryview) -> bytes:
        return self.codec.chunk_id(content)

    def has(self, ids: Sequence[bytes]) -> list[bool]:
        with self._lock:
            pending = {i for i in ids if i in self._pending}
        stored = self.index.present([i for i in ids if i not in pending]) if ids else set()
        return [i in pending or i in stored for i in ids]

    def get(self, chunk_id: bytes) -> bytes:
        if len(chunk_id) != CHUNK_ID_SIZE:
            raise MissingChunk(f"chunk id {chunk_id.hex()[:12]} is not {CHUNK_ID_SIZE} bytes")
        location = self._locate(chunk_id)
        for _attempt in range(3):
            where = f"pack {location.pack_name}"
            if not RECORD_HEADER_SIZE <= location.length <= MAX_RECORD_SIZE or location.offset < 0:
                raise CorruptData(
                    f"chunk {short(chunk_id)} in {where}: the index gives an absurd record "
                    f"({location.length} bytes at {location.offset})"
                )
            try:
                data = self._read_record(location)
            except RemoteUnavailable as exc:
                raise MissingChunk(
                    f"chunk {short(chunk_id)} in {where}: {exc.strerror}"
                ) from None
            except FileNotFoundError:
                moved = self._locate(chunk_id)  # gc moved it meanwhile?
                if moved == location:
                    raise MissingChunk(
                        f"chunk {short(chunk_id)}: its {where} is missing"
                    ) from None
                location = moved
                continue
            if len(data) != location.length:
                raise CorruptData(
                    f"chunk {short(chunk_id)} in {where}: pack ends inside the record "
                    f"(offset {location.offset})"
                )
            record = decode_record(data, location.offset, where, expected_id=chunk_id)
            return self.codec.decode(record, where)
        raise MissingChunk(f"chunk {short(chunk_id)} keeps moving between packs")

    def put(self, chunks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        self._check_open()
        fresh: dict[bytes, bytes | memoryview] = {}
        with self._lock:
            for chunk_id, content in chunks:
                if chunk_id not in self._pending:
                    fresh.setdefault(chunk_id, content)
        if not fresh:
            return
        existing = self._touch(list(fresh))
        records = []
        for chunk_id, content in fresh.items():
            if chunk_id in existing:
                continue
            if len(chunk_id) != CHUNK_ID_SIZE:
                raise ValueError(f"chunk id of {len(chunk_id)} bytes")
            if self.verify_ids and self.codec.chunk_id(content) != chunk_id:
                raise ValueError(f"chunk {short(chunk_id)}: id does not match its content")
            flags, logical, payload = self.codec.encode(chunk_id, content)
            records.append((chunk_id, logical, encode_record(chunk_id, flags, logical, payload)))
        with self._lock:
            records = [r for r in records if r[0] not in self._pending]
            while records:
                target = self._writer()
                room = self.pack_size - target.writer.end
                take, used = 0, 0
                while take < len(records) and (take == 0 or used + len(records[take][2]) <= room):
                    used += len(records[take][2])
                    take += 1
                batch, records = records[:take], records[take:]
                placed = target.writer.append([(cid, data) for cid, _, data in batch])
                for (cid, logical, _), (offset, length) in zip(batch, placed, strict=True):
                    self._pending[cid] = Pending(
                        target.num, target.writer.name, offset, length, logical
                    )
                crash_point("appended")
                if target.writer.end >= self.pack_size:
                    self._full.append(target)
                    self._open = None

    def reference(self, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        gained, lost = Counter(added), Counter(removed)
        if not gained and not lost:
            return
        missing = []
        with self._lock, self.index.transaction() as db:
            generation = self._generation(db)
            for chunk_id, count in gained.items():
                if chunk_id in self._pending:
                    self._pending[chunk_id].refs += count
                    continue
                cursor = db.execute(
                    "UPDATE chunks SET refcount = refcount + ?, generation = ?, referenced_at = ? "
                    "WHERE id = ?",
                    (count, generation, time.time(), chunk_id),
                )
                if cursor.rowcount == 0:
                    missing.append(chunk_id)
            for chunk_id, count in lost.items():
                if chunk_id in self._pending:
                    self._pending[chunk_id].refs -= count
                    continue
                db.execute(
                    "UPDATE chunks SET refcount = max(refcount - ?, 0) WHERE id = ?",
                    (count, chunk_id),
                )
        if missing:
            raise MissingChunks(missing)

    def commit(self) -> None:
        with self._lock:
            targets = [*self._full, *([self._open] if self._open else [])]
            for target in targets:
                target.writer.sync()
            crash_point("packs-synced")
            if self._pending:
                self._commit_rows(targets)
            crash_point("index-committed")
            full, self._full = self._full, []
            for target in full:
                self._seal(target)

    def collect_garbage(
        self,
        live: Iterable[bytes],
        progress: Callable[[int], Any],
        *,
        repack_dead_share: float = 0.3,
        grace: float | None = None,
    ) -> GarbageReport:
        """See ChunkStore. Besides chunks referenced since the collection began, a chunk
        with references counted that was referenced less than `grace` seconds before it
        began is kept too: its writer may be between `reference` and writing the manifest
        that a walk of manifests which started meanwhile has already passed."""
        grace = self.gc_grace if grace is None else grace
        if not 0.0 <= repack_dead_share <= 1.0:
            raise ValueError(f"repack_dead_share must be within 0..1, not {repack_dead_share}")
        with self._maintenance():
            self.commit()
            self._recover(seal_orphans=True)
            report = GarbageReport()
            with self.index.transaction() as db:
                generation = self._generation(db) + 1
                self.index.set_meta(db, "generation", generation)
                cutoff = time.time() - grace
            db = self.index.connection()
            try:
                self._mark(db, live, progress, report)
                self._sweep(generation, cutoff, report)
            finally:
                db.execute("DROP TABLE IF EXISTS temp.gc_live")
            self._repack(repack_dead_share, report)
            return report

    def statistics(self) -> dict[str, Any]:
        db = self.index.connection()
        chunks, logical, refs, referenced = db.execute(
            "SELECT count(*), coalesce(sum(size), 0), coalesce(sum(refcount), 0), "
            "coalesce(sum(refcount > 0), 0) FROM chunks"
        ).fetchone()
        packs = {state: 0 for state in (OPEN, SEALED, UPLOADED, DELETING)}
        stored = live = dead = 0
        for row in self.index.packs():
            packs[row.state] = packs.get(row.state, 0) + 1
            stored += row.size
            live += row.live_bytes
            dead += row.dead_bytes
        with self._lock:
            pending = len(self._pending)
        return {
            "chunks": chunks,
            "logical_bytes": logical,
            "stored_bytes": stored,
            "live_bytes": live,
            "dead_bytes": dead,
            "packs": sum(packs.values()),
            "packs_by_state": packs,
            "refcount_total": refs,
            "referenced_chunks": referenced,
            "uncommitted_chunks": pending,
            "encrypted": self.codec.encrypted,
            "compression_level": self.codec.level,
            "upload_backlog_packs": 0,
            "upload_backlog_bytes": 0,
            "last_error": None,
        }

    def close(self) -> None:
        if self._closed:
            return
        try:
            self.commit()
            with self._lock:
                if self._open is not None:
                    if self.seal_on_close and self._open.writer.end > HEADER_SIZE:
                        self._seal(self._open)
                    else:
                        self._open.writer.close()
                    self._open = None
            self._before_release()
        finally:
            self._closed = True
            with self._fd_lock:
                for handle in self._fds.values():
                    handle.retire()
                self._fds.clear()
            self.index.close()

    # ------------------------------------------------------------------ index rebuild

    def rebuild_index(self, progress: Callable[[int], Any] | None = None) -> dict[str, Any]:
        """Rebuild the index from the packs alone (a lost or damaged index.db).

        Every record of every pack is indexed again, first copy of an id wins; refcounts
        start at 0 (gc and fsck mark from the manifests, which are the truth). Returns what
        it found: packs, chunks, duplicate records and the packs it could not read.
        """
        with self._maintenance(), self._lock:
            self.commit()
            if self._open is not None:
                self._open.writer.close()
                self._open = None
            summary: dict[str, Any] = {"packs": 0, "chunks": 0, "duplicates": 0, "unreadable": []}
            with self.index.transaction() as db:
                generation = self._generation(db)
                db.execute("DELETE FROM chunks")
                db.execute("DELETE FROM packs")
                for name, size, state in self._pack_inventory():
                    where = f"pack {name}"
                    try:
                        entries, sealed = read_pack_entries(
                            lambda off, n, name=name: self._read_raw(name, off, n), size, where
                        )
                    except (CorruptData, OSError) as exc:
                        summary["unreadable"].append(f"{name}: {exc}")
                        continue
                    num = int(
                        db.execute(
                            "INSERT INTO packs (name, size, state) VALUES (?, ?, ?)",
                            (name, size, state if sealed else OPEN),
                        ).lastrowid
                        or 0
                    )
                    live = 0
                    for chunk_id, offset, length, logical in entries:
                        cursor = db.execute(
                            "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, 0, ?, ?)",
                            (chunk_id, num, offset, length, logical, generation, time.time()),
                        )
                        if cursor.rowcount:
                            live += length
                            summary["chunks"] += 1
                        else:
                            summary["duplicates"] += 1
                    records_end = entries[-1][1] + entries[-1][2] if entries else HEADER_SIZE
                    db.execute(
                        "UPDATE packs SET live_bytes = ?, dead_bytes = ? WHERE num = ?",
                        (live, records_end - HEADER_SIZE - live, num),
                    )
                    summary["packs"] += 1
                    if progress is not None:
                        progress(1)
            self._recover(seal_orphans=self.seal_on_close)
            return summary

    # ------------------------------------------------------------------ backend hooks

    def _is_local(self, name: str) -> bool:
        return (self.pack_dir / name).exists()

    def _remote_read(self, name: str, offset: int, length: int) -> bytes:
        """Bytes of a pack that is not here (the S3 store reads them with a ranged GET)."""
        raise FileNotFoundError(name)

    def _remote_delete(self, name: str) -> None:
        """Remove a pack from its final place (nothing to do for the embedded store)."""

    def _remote_inventory(self) -> dict[str, int]:
        """name -> size of the packs in their final place (none for the embedded store)."""
        return {}

    def _sealed(self, num: int) -> None:
        """A pack was sealed and its state committed (the S3 store queues its upload)."""

    def _before_release(self) -> None:
        """At close, after the last seal, before the index closes (S3: drain uploads)."""

    def seal_open_pack(self, older_than: float = 0.0) -> bool:
        """Commit and seal the open pack if it holds records and was opened more than
        `older_than` seconds ago (so its chunks can reach their final place)."""
        with self._lock:
            target = self._open
            if target is None or target.writer.end <= HEADER_SIZE:
                return False
            if time.monotonic() - target.since < older_than:
                return False
            self.commit()
            if self._open is target:
                self._open = None
                self._seal(target)
            return True

    # ------------------------------------------------------------------ internals

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the chunk store is closed")

    def _check_key(self) -> None:
        stored = self.index.get_meta("key_check")
        if stored is None:
            with self.index.transaction() as db:
                if self.index.get_meta("key_check") is None:
                    self.index.set_meta(db, "key_check", self.codec.key_check)
                    return
            stored = self.index.get_meta("key_check")
        if stored != self.codec.key_check:
            self.index.close()
            if not stored:
                raise CorruptData(f"chunk store {self.directory} is not encrypted; a key was given")
            if not self.codec.key_check:
                raise CorruptData(f"chunk store {self.directory} is encrypted; no key was given")
            raise CorruptData(f"chunk store {self.directory}: wrong key")

    @staticmethod
    def _generation(db: Any) -> int:
        row = db.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        return int(row[0]) if row else 0

    def _locate(self, chunk_id: bytes) -> Location:
        with self._lock:
            pending = self._pending.get(chunk_id)
            if pending is not None:
                return Location(
                    pending.pack, pending.pack_name, pending.offset, pending.length,
                    pending.size, OPEN,
                )  # fmt: skip
        location = self.index.locate(chunk_id)
        if location is None:
            raise MissingChunk(f"chunk {short(chunk_id)} is not in the store")
        return location

    def _touch(self, ids: list[bytes]) -> set[bytes]:
        """Ids of `ids` already stored, their generation moved to now (a gc that began
        before leaves them alone)."""
        present = self.index.present(ids)
        if not present:
            return set()
        touched: set[bytes] = set()
        with self.index.transaction() as db:
            generation = self._generation(db)
            for chunk_id in present:
                cursor = db.execute(
                    "UPDATE chunks SET generation = ?, referenced_at = ? WHERE id = ?",
                    (generation, time.time(), chunk_id),
                )
                if cursor.rowcount:
                    touched.add(chunk_id)
        return touched

    def _writer(self) -> OpenPack:
        """The open pack to append to: ours, an orphan one adopted, or a new one."""
        if self._open is not None:
            return self._open
        for row in self.index.packs(OPEN):
            writer = PackWriter.adopt(self.pack_dir, row.name)
            if writer is None:
                continue
            target = OpenPack(writer, row.num)
            if writer.end >= self.pack_size:
                self._seal(target)
                continue
            self._open = target
            return target
        writer = PackWriter.create(self.pack_dir)
        try:
            num = self.index.add_pack(writer.name, OPEN, writer.end)
        except BaseException:
            writer.close()
            raise
        self._open = OpenPack(writer, num)
        return self._open

    def _commit_rows(self, targets: list[OpenPack]) -> None:
        live: Counter[int] = Counter()
        dead: Counter[int] = Counter()
        with self.index.transaction() as db:
            generation = self._generation(db)
            now = time.time()
            for chunk_id, p in self._pending.items():
                cursor = db.execute(
                    "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (chunk_id, p.pack, p.offset, p.length, p.size, max(p.refs, 0), generation,
                     now),
                )  # fmt: skip
                if cursor.rowcount:
                    live[p.pack] += p.length
                    continue
                dead[p.pack] += p.length  # another process stored the same chunk meanwhile
                db.execute(
                    "UPDATE chunks SET refcount = max(refcount + ?, 0), generation = ?, "
                    "referenced_at = ? WHERE id = ?",
                    (p.refs, generation, now, chunk_id),
                )
            for num in live.keys() | dead.keys():
                db.execute(
                    "UPDATE packs SET live_bytes = live_bytes + ?, dead_bytes = dead_bytes + ? "
                    "WHERE num = ?",
                    (live[num], dead[num], num),
                )
            for target in targets:
                db.execute(
                    "UPDATE packs SET size = ? WHERE num = ?", (target.writer.end, target.num)
                )
        self._pending.clear()

    def _seal(self, target: OpenPack) -> None:
        records_end = target.writer.end
        size = target.writer.seal()
        crash_point("sealed")
        self.index.seal_pack(target.num, size, records_end - HEADER_SIZE)
        target.writer.close()
        self._sealed(target.num)

    def _recover(self, *, seal_orphans: bool) -> None:
        """Tidy what a crash (or a closed writer) left: unindexed pack files nobody holds,
        packs half deleted by gc; with `seal_orphans`, seal open packs nobody holds."""
        known = {row.name: row for row in self.index.packs()}
        for path in self.pack_dir.iterdir():
            name = path.name
            if name in known:
                continue
            # a pack file the index does not know may be all that is left of a lost index
            # (rebuild_index adopts it): only unheld temporaries and header-only packs go
            if name.startswith(TEMP_PREFIX) or (
                len(name) == 32 and path.stat().st_size <= HEADER_SIZE
            ):
                self._unlink_if_unheld(path)
        for row in known.values():
            if row.state == DELETING:
                self._finish_delete(row.num, row.name)
            elif row.state == OPEN and seal_orphans:
                if self._open is not None and self._open.num == row.num:
                    continue
                if any(t.num == row.num for t in self._full):
                    continue
                writer = PackWriter.adopt(self.pack_dir, row.name)
                if writer is not None:
                    self._seal(OpenPack(writer, row.num))
                elif not self._is_local(row.name) and self.index.chunk_count_in(row.num) == 0:
                    self.index.delete_pack(row.num)
                elif self._is_local(row.name) and self._has_footer(row.name):
                    # sealed on disk, the crash came before its state was committed
                    size = os.stat(self.pack_dir / row.name).st_size
                    entries, _ = read_pack_entries(
                        lambda off, n, name=row.name: self._read_raw(name, off, n),
                        size,
                        f"pack {row.name}",
                    )
                    end = entries[-1][1] + entries[-1][2] if entries else HEADER_SIZE
                    self.index.seal_pack(row.num, size, end - HEADER_SIZE)
                    self._sealed(row.num)

    def _has_footer(self, name: str) -> bool:
        """Whether a pack nobody writes (no lock held) is sealed on disk."""
        try:
            fd = os.open(self.pack_dir / name, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            size = os.fstat(fd).st_size
            return has_valid_footer(lambda off, n: pread_exact(fd, n, off), size, name)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)

    @staticmethod
    def _unlink_if_unheld(path: Path) -> None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return
        finally:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

    def _finish_delete(self, num: int, name: str) -> bool:
        """Second half of deleting a pack no row points into: file, remote copy, its row.
        False when the remote copy cannot be deleted now (the row stays, state deleting)."""
        if self.index.chunk_count_in(num):
            log.warning("pack %s marked for deletion still holds chunks: kept", name)
            self.index.set_pack_state(num, SEALED)
            return False
        self._forget_fd(name)
        try:
            self._remote_delete(name)
        except RemoteUnavailable as exc:
            log.warning("pack %s: remote copy not deleted yet: %s", name, exc)
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.pack_dir / name)
        self.index.delete_pack(num)
        return True

    @contextlib.contextmanager
    def _pack_fd(self, name: str) -> Iterator[int]:
        """A read descriptor of a local pack, cached; never closed while a reader uses it
        (the uploader or gc may retire it meanwhile)."""
        with self._fd_lock:
            handle = self._fds.get(name)
            if handle is None:
                handle = _Handle(os.open(self.pack_dir / name, os.O_RDONLY | os.O_CLOEXEC))
                self._fds[name] = handle
                while len(self._fds) > OPEN_FDS:
                    _, old = self._fds.popitem(last=False)
                    old.retire()
            else:
                self._fds.move_to_end(name)
            handle.users += 1
        try:
            yield handle.fd
        finally:
            with self._fd_lock:
                handle.users -= 1
                if handle.retired:
                    handle.retire()

    def _forget_fd(self, name: str) -> None:
        with self._fd_lock:
            handle = self._fds.pop(name, None)
            if handle is not None:
                handle.retire()

    def _read_raw(self, name: str, offset: int, length: int) -> bytes:
        """Bytes of a pack, from the local copy when there is one, else its final place."""
        try:
            with self._pack_fd(name) as fd:
                return pread_exact(fd, length, offset)
        except FileNotFoundError:
            return self._remote_read(name, offset, length)

    def _read_record(self, location: Location) -> bytes:
        return self._read_raw(location.pack_name, location.offset, location.length)

    def _pack_inventory(self) -> list[tuple[str, int, str]]:
        """(name, size, state) of every pack there is, here or in the final place."""
        found: dict[str, tuple[int, str]] = {}
        for name, size in self._remote_inventory().items():
            found[name] = (size, UPLOADED)
        for path in sorted(self.pack_dir.iterdir()):
            if len(path.name) != 32 or path.name.startswith(TEMP_PREFIX):
                continue
            if path.name not in found:
                found[path.name] = (path.stat().st_size, SEALED)
        return [(name, size, state) for name, (size, state) in sorted(found.items())]

    @contextlib.contextmanager
    def _maintenance(self) -> Iterator[None]:
        """One gc or rebuild at a time per store, across processes (flock)."""
        self._check_open()
        fd = os.open(self.directory / "maintenance.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                     0o600)  # fmt: skip
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreBusy(
                    f"chunk store {self.directory}: another gc or rebuild is running"
                ) from None
            yield
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ gc steps

    def _mark(self, db: Any, live: Iterable[bytes], progress: Callable[[int], Any],
              report: GarbageReport) -> None:  # fmt: skip
        db.execute("CREATE TEMP TABLE IF NOT EXISTS gc_live (id BLOB PRIMARY KEY) WITHOUT ROWID")
        db.execute("DELETE FROM temp.gc_live")
        for batch in batched(live, MARK_BATCH):
            db.execute("BEGIN")
            try:
                db.executemany(
                    "INSERT OR IGNORE INTO temp.gc_live VALUES (?)", ((i,) for i in batch)
                )
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")
            progress(len(batch))
        with self._lock:
            pending = set(self._pending)
        report.missing = [
            bytes(row[0])
            for row in db.execute(
                "SELECT id FROM temp.gc_live WHERE id NOT IN (SELECT id FROM chunks)"
            )
            if bytes(row[0]) not in pending
        ]
        report.live_chunks = int(
            db.execute(
                "SELECT count(*) FROM temp.gc_live WHERE id IN (SELECT id FROM chunks)"
            ).fetchone()[0]
        )

    def _sweep(self, generation: int, cutoff: float, report: GarbageReport) -> None:
        """Delete unmarked chunks not referenced since the collection began (nor, with
        references counted, since `cutoff`), in one transaction that also moves their bytes
        to their packs' dead bytes."""
        garbage = (
            "generation < ? AND (refcount <= 0 OR referenced_at < ?) "
            "AND id NOT IN (SELECT id FROM temp.gc_live)"
        )
        with self.index.transaction() as tx:
            freed = tx.execute(
                f"SELECT pack, count(*), sum(length) FROM chunks WHERE {garbage} GROUP BY pack",
                (generation, cutoff),
            ).fetchall()
            tx.execute(f"DELETE FROM chunks WHERE {garbage}", (generation, cutoff))
            for pack, count, length in freed:
                tx.execute(
                    "UPDATE packs SET live_bytes = live_bytes - ?, dead_bytes = dead_bytes + ? "
                    "WHERE num = ?",
                    (length, length, pack),
                )
                report.chunks_freed += count

    def _repack(self, dead_share: float, report: GarbageReport) -> None:
        target: OpenPack | None = None
        written: list[OpenPack] = []
        try:
            for row in self.index.packs(SEALED, UPLOADED):
                if self.index.chunk_count_in(row.num) == 0:
                    self.index.set_pack_state(row.num, DELETING)
                    self._finish_delete(row.num, row.name)
                    report.packs_deleted += 1
                    report.bytes_freed += row.size
                    continue
                total = row.live_bytes + row.dead_bytes
                if total <= 0 or row.dead_bytes / total <= dead_share:
                    continue
                try:
                    records = self._live_records(row.num, row.name)
                except (CorruptData, OSError) as exc:
                    log.warning("gc: pack %s not rewritten: %s", row.name, exc)
                    continue
                moved: list[tuple[bytes, int, int, int]] = []
                for chunk_id, data in records:
                    if target is None or target.writer.end >= self.pack_size:
                        if target is not None:
                            target.writer.sync()
                        target = self._new_gc_pack()
                        written.append(target)
                    (offset, length), = target.writer.append([(chunk_id, data)])
                    moved.append((chunk_id, target.num, offset, length))
                for pack in written:
                    pack.writer.sync()
                crash_point("repack-synced")
                self._move_rows(row.num, moved)
                crash_point("repack-moved")
                self._finish_delete(row.num, row.name)
                report.packs_rewritten += 1
                report.bytes_freed += row.size - sum(m[3] for m in moved)
            for pack in written:
                self._seal(pack)
            written.clear()
        finally:
            for pack in written:
                pack.writer.close()

    def _new_gc_pack(self) -> OpenPack:
        writer = PackWriter.create(self.pack_dir)
        return OpenPack(writer, self.index.add_pack(writer.name, OPEN, writer.end))

    def _live_records(self, num: int, name: str) -> list[tuple[bytes, bytes]]:
        """The live records of a pack, CRC- and id-checked, read in bounded spans."""
        entries = self.index.chunks_in(num)
        out: list[tuple[bytes, bytes]] = []
        i = 0
        while i < len(entries):
            j = i + 1
            start = entries[i][1]
            while j < len(entries) and entries[j][1] + entries[j][2] - start <= COPY_SPAN:
                j += 1
            end = entries[j - 1][1] + entries[j - 1][2]
            span = self._read_raw(name, start, end - start)
            for chunk_id, offset, length in entries[i:j]:
                if not RECORD_HEADER_SIZE <= length <= MAX_RECORD_SIZE:
                    raise CorruptData(f"chunk {short(chunk_id)}: absurd index length {length}")
                data = span[offset - start : offset - start + length]
                decode_record(data, offset, f"pack {name}", expected_id=chunk_id)
                out.append((chunk_id, data))
            i = j
        return out

    def _move_rows(self, old: int, moved: list[tuple[bytes, int, int, int]]) -> None:
        live: Counter[int] = Counter()
        with self.index.transaction() as db:
            for chunk_id, num, offset, length in moved:
                cursor = db.execute(
                    "UPDATE chunks SET pack = ?, offset = ?, length = ? WHERE id = ? AND pack = ?",
                    (num, offset, length, chunk_id, old),
                )
                live[num] += length if cursor.rowcount else 0
            for num, length in live.items():
                db.execute(
                    "UPDATE packs SET live_bytes = live_bytes + ? WHERE num = ?", (length, num)
                )
            db.execute(
                "UPDATE packs SET state = ?, live_bytes = 0 WHERE num = ?", (DELETING, old)
            )
