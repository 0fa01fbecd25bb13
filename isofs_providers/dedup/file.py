"""`DedupFile`: the logical (upper) file of one manifest (docs/FORMAT-dedup.md, "Writes").

Reads fetch only the chunks they touch, through a small cache shared by the layer's files.
Writes and truncates are kept in memory (dirty ranges, and how far the old content is still
valid) until `flush()`, which re-chunks from the first changed chunk until the new cuts line
up with old ones again (content-defined cuts resynchronise), puts the new chunks, counts the
references, commits the store (chunk data, then the index: durable) and only then replaces
the manifest with one small write (`manifest.write`). A crash before that write leaves the
old manifest, which refers only to chunks that were already durable.

Thread safety: the core calls a file under its section lock, exclusive for writes, truncates
and flushes, shared for reads; reads may run concurrently in worker threads, so what they
share (the lazily loaded entry list, the chunk cache) is locked.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from isofs.provider import CorruptData, PlainFile, Progress, RandomAccessFile
from isofs_providers.dedup import manifest
from isofs_providers.dedup.chunker import Chunker, ChunkerParams
from isofs_providers.dedup.manifest import ZERO_ID, Entries, Header
from isofs_providers.dedup.store.base import ChunkStore, MissingChunk

log = logging.getLogger(__name__)

#: Dirty bytes a file holds before it flushes on its own (bounds the memory of a big write).
DIRTY_LIMIT = 32 << 20
#: New chunks handed to the store per `put` call.
PUT_BATCH = 8 << 20
#: Bytes of chunks the layer's read cache keeps (a few chunks: the page cache holds the rest).
CACHE_BYTES = 8 << 20
#: Bytes cut per call of the chunker while re-chunking.
WINDOW = 4 << 20

INFINITY = float("inf")


def short_id(chunk_id: bytes) -> str:
    """A chunk id as log lines and reports name it."""
    return chunk_id.hex()[:16]


# ----------------------------------------------------------------------------- shared state


class ChunkCache:
    """Recently read chunks by id (shared by every file of a layer: identical chunks hit)."""

    def __init__(self, max_bytes: int = CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._chunks: OrderedDict[bytes, bytes] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def get(self, chunk_id: bytes) -> bytes | None:
        with self._lock:
            data = self._chunks.get(chunk_id)
            if data is None:
                self.misses += 1
                return None
            self._chunks.move_to_end(chunk_id)
            self.hits += 1
            return data

    def put(self, chunk_id: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes:
            return
        with self._lock:
            if chunk_id in self._chunks:
                return
            self._chunks[chunk_id] = data
            self._bytes += len(data)
            while self._bytes > self.max_bytes:
                _, dropped = self._chunks.popitem(last=False)
                self._bytes -= len(dropped)


class WriterBarrier:
    """Keeps a garbage collection from starting while a flush is between its first `put` and
    its manifest write (docs/FORMAT-dedup.md, "Crash safety").

    Flushes hold a shared `flock` on a file in the store's directory; `isofs gc` holds it
    exclusive until the store has begun its collection. A flush that starts later has its
    puts and references made during the collection, which protects them; one that finished
    earlier has its manifest on disk, where the collection's marking finds it.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None
        self._holders = 0
        self._mutex = threading.Lock()
        self._unusable = False

    def _open(self) -> int | None:
        if self._fd is None and not self._unusable:
            try:
                self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:  # a read-only source: nothing is flushed there anyway
                log.warning("dedup: no writer lock %s: %s", self.path, exc.strerror)
                self._unusable = True
        return self._fd

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        with self._mutex:
            fd = self._open()
            if self._holders == 0 and fd is not None:
                fcntl.flock(fd, fcntl.LOCK_SH)
            self._holders += 1
        try:
            yield
        finally:
            with self._mutex:
                self._holders -= 1
                if self._holders == 0 and self._fd is not None:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)

    def exclusive(self) -> Callable[[], None]:
        """Wait for running flushes and keep new ones out; returns the release function."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                os.close(fd)

        return release

    def close(self) -> None:
        with self._mutex:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


class _NoBarrier:
    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        yield


@dataclass
class LayerCounters:
    """What `isofs status` shows of the layer's work."""

    flushes: int = 0
    manifests_written: int = 0
    chunks_cut: int = 0
    chunks_put: int = 0
    bytes_cut: int = 0
    chunks_kept: int = 0
    resyncs: int = 0


@dataclass
class FileContext:
    """What every file of a layer shares: the store, keys, caches, limits."""

    store: ChunkStore
    params: ChunkerParams
    manifest_key: bytes | None = None
    cache: ChunkCache = field(default_factory=ChunkCache)
    barrier: Any = field(default_factory=_NoBarrier)
    dirty_limit: int = DIRTY_LIMIT
    counters: LayerCounters = field(default_factory=LayerCounters)
    _chunkers: dict[ChunkerParams, Chunker] = field(default_factory=dict)

    def chunker(self, params: ChunkerParams) -> Chunker:
        found = self._chunkers.get(params)
        if found is None:
            found = self._chunkers[params] = Chunker(params)
        return found

    def fetch(self, chunk_id: bytes, length: int, start: int) -> bytes:
        """A chunk's content, checked against its manifest length; CorruptData (EIO)
        naming the chunk and the logical bytes it holds when it cannot be had."""
        data = self.cache.get(chunk_id)
        if data is not None:
            return data
        where = f"chunk {short_id(chunk_id)} (logical bytes {start}..{start + length})"
        try:
            data = bytes(self.store.get(chunk_id))
        except MissingChunk as exc:
            raise CorruptData(f"dedup: {where}: missing from the store ({_reason(exc)})") from None
        except CorruptData as exc:
            raise CorruptData(f"dedup: {where}: damaged ({_reason(exc)})") from None
        if len(data) != length:
            raise CorruptData(f"dedup: {where}: {len(data)} bytes, the manifest says {length}")
        self.cache.put(chunk_id, data)
        return data


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)


# ----------------------------------------------------------------------------- dirty ranges


class DirtyRanges:
    """Bytes written since the last flush: sorted, disjoint, non-adjacent ranges."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.buffers: list[bytearray] = []
        self.bytes = 0

    def __bool__(self) -> bool:
        return bool(self.starts)

    def clear(self) -> None:
        self.starts, self.buffers, self.bytes = [], [], 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        length = len(data)
        if not length:
            return
        end = offset + length
        starts, buffers = self.starts, self.buffers
        i = bisect_right(starts, offset) - 1
        if i >= 0:
            start, buffer = starts[i], buffers[i]
            buffer_end = start + len(buffer)
            if offset <= buffer_end and (i + 1 == len(starts) or end < starts[i + 1]):
                if end <= buffer_end:
                    buffer[offset - start : end - start] = data
                else:
                    buffer[offset - start :] = data
                    self.bytes += end - buffer_end
                return
        low = i if i >= 0 and starts[i] + len(buffers[i]) >= offset else i + 1
        high = low
        while high < len(starts) and starts[high] <= end:
            high += 1
        if low == high:
            starts.insert(low, offset)
            buffers.insert(low, bytearray(data))
            self.bytes += length
            return
        new_start = min(starts[low], offset)
        new_end = max(starts[high - 1] + len(buffers[high - 1]), end)
        merged = bytearray(new_end - new_start)
        replaced = 0
        for k in range(low, high):
            merged[starts[k] - new_start : starts[k] - new_start + len(buffers[k])] = buffers[k]
            replaced += len(buffers[k])
        merged[offset - new_start : end - new_start] = data
        starts[low:high] = [new_start]
        buffers[low:high] = [merged]
        self.bytes += len(merged) - replaced

    def truncate(self, size: int) -> None:
        starts, buffers = self.starts, self.buffers
        i = bisect_left(starts, size)
        for buffer in buffers[i:]:
            self.bytes -= len(buffer)
        del starts[i:], buffers[i:]
        if i and starts[i - 1] + len(buffers[i - 1]) > size:
            cut = size - starts[i - 1]
            self.bytes -= len(buffers[i - 1]) - cut
            del buffers[i - 1][cut:]

    def next_at_or_after(self, position: int) -> int | None:
        """The first dirty byte at or after `position`, or None."""
        i = bisect_right(self.starts, position) - 1
        if i >= 0 and self.starts[i] + len(self.buffers[i]) > position:
            return position
        return self.starts[i + 1] if i + 1 < len(self.starts) else None

    def overlay(self, out: bytearray | memoryview, offset: int) -> None:
        """Copy the dirty bytes that fall into `out` (which holds bytes from `offset`)."""
        end = offset + len(out)
        starts, buffers = self.starts, self.buffers
        i = max(0, bisect_right(starts, offset) - 1)
        while i < len(starts) and starts[i] < end:
            start, buffer = starts[i], buffers[i]
            low, high = max(offset, start), min(end, start + len(buffer))
            if low < high:
                out[low - offset : high - offset] = memoryview(buffer)[low - start : high - start]
            i += 1


# ----------------------------------------------------------------------------- cutting


class Content(Protocol):
    """Bytes to be chunked: a file's new content, or a plain file being imported."""

    size: int

    def read(self, offset: int, length: int) -> bytes | bytearray: ...

    def zeros_at_least(self, offset: int, length: int) -> bool:
        """Whether [offset, offset+length) is known to be zeros (a hole) without reading."""
        ...


Emit = Callable[[int, memoryview | None], None]


def cut(
    chunker: Chunker,
    content: Content,
    start: int,
    emit: Emit,
    realign: Callable[[int], bool] | None = None,
) -> int:
    """Cut `content` from `start` (a cut point) into chunks, calling `emit(length, bytes or
    None for a hole)` for each (the bytes are only valid during the call), until the end or
    until `realign(position)` says the cuts line up with old ones again; returns where it
    stopped. Runs of zeros known as holes are cut without being read or hashed."""
    position = start
    size = content.size
    zero_length = chunker.zero_length
    zero_run = zero_length + chunker.lookahead
    window_size = max(WINDOW, 4 * chunker.max_size)
    window = bytearray()  # the content from `position` on
    while position < size:
        if content.zeros_at_least(position, zero_run):
            del window[:zero_length]
            emit(zero_length, None)
            position += zero_length
            if realign is not None and realign(position):
                return position
            continue
        wanted = min(window_size, size - position)
        if len(window) < wanted:
            window += content.read(position + len(window), wanted - len(window))
        if len(window) < wanted:
            raise CorruptData(f"dedup: content ended at {position + len(window)} of {size}")
        lengths = chunker.cut(window, position + len(window) >= size)
        if not lengths:
            raise AssertionError(f"no chunk decided in {len(window)} bytes at {position}")
        used = 0
        stop = False
        with memoryview(window) as view:
            for length in lengths:
                with view[used : used + length] as piece:
                    emit(length, piece)
                used += length
                position += length
                if realign is not None and realign(position):
                    stop = True
                    break
                if content.zeros_at_least(position, zero_run):
                    break
        if stop:
            return position
        del window[:used]
    return position


def _is_zero(data: memoryview) -> bool:
    return data[0] == 0 and data[-1] == 0 and data == bytes(len(data))


class _Collector:
    """Gathers the chunks of a re-chunked run: their ids, lengths, and the new ones to put."""

    def __init__(self, context: FileContext) -> None:
        self.context = context
        self.ids = bytearray()
        self.lengths = array("I")
        self.added: list[bytes] = []
        self._batch: list[tuple[bytes, bytes]] = []
        self._batch_bytes = 0
        self._batched: set[bytes] = set()
        self.progress: Progress | None = None

    def emit(self, length: int, data: memoryview | None) -> None:
        counters = self.context.counters
        counters.chunks_cut += 1
        counters.bytes_cut += length
        if data is None or _is_zero(data):
            self.ids += ZERO_ID
        else:
            raw = bytes(data)
            chunk_id = self.context.store.chunk_id(raw)
            self.ids += chunk_id
            self.added.append(chunk_id)
            if chunk_id not in self._batched:
                # Every chunk goes to put, matched ones too: the store decides what it has,
                # atomically with a collection (a `has` first could race with its sweep).
                self._batched.add(chunk_id)
                self._batch.append((chunk_id, raw))
                self._batch_bytes += length
                if self._batch_bytes >= PUT_BATCH:
                    self.put()
        self.lengths.append(length)
        if self.progress is not None:
            self.progress(length)

    def put(self) -> None:
        if self._batch:
            self.context.store.put(self._batch)
            self.context.counters.chunks_put += len(self._batch)
            for chunk_id, raw in self._batch[-2:]:  # an append re-reads the last chunk
                self.context.cache.put(chunk_id, raw)
        self._batch, self._batch_bytes = [], 0

    def take(self) -> tuple[bytes, array]:
        """The run gathered so far, as a piece for `Entries.splice`."""
        piece = (bytes(self.ids), self.lengths)
        self.ids, self.lengths = bytearray(), array("I")
        return piece


def stored_ids(entries: Entries, start: int = 0, stop: int | None = None) -> list[bytes]:
    """The ids of entries start..stop-1 that refer to the store (holes do not)."""
    return [cid for cid in entries.iter_ids(start, stop) if cid != ZERO_ID]


# ----------------------------------------------------------------------------- the file


class DedupFile:
    """The logical file of one manifest (implements `RandomAccessFile`)."""

    def __init__(
        self,
        lower: RandomAccessFile,
        context: FileContext,
        headers: list[Header],
        entries: Entries | None = None,
    ) -> None:
        self._lower = lower
        self._context = context
        self._headers = headers
        self._header = headers[0]
        self._entries = entries
        self._size = self._header.size
        #: Old content is valid below this offset (a truncate cuts it; growing reads zeros).
        self._keep_below = self._header.size
        self._dirty = DirtyRanges()
        self._pending = False
        self._lock = threading.Lock()

    @property
    def header(self) -> Header:
        return self._header

    def entries(self) -> Entries:
        """The live entry list, read (and checked) on first use."""
        if self._entries is None:
            with self._lock:
                if self._entries is None:
                    header, entries, fell_back = manifest.load(
                        self._lower, self._context.manifest_key, self._headers
                    )
                    if fell_back:
                        log.warning("dedup: manifest generation %d is torn; reading "
                                    "generation %d", self._headers[0].generation,
                                    header.generation)  # fmt: skip
                        self._header = header
                        self._keep_below = min(self._keep_below, header.size)
                        if not self._pending:
                            self._size = header.size
                    self._entries = entries
        return self._entries

    # -- RandomAccessFile ---------------------------------------------------------------

    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if self._entries is None and offset < self._keep_below:
            self.entries()  # a fallback to an older generation may change the size
        end = min(offset + size, self._size)
        if offset >= end:
            return b""
        return bytes(self._assemble(offset, end))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        length = len(data)
        if not length:
            return 0
        self._dirty.write(offset, data)
        self._size = max(self._size, offset + length)
        self._pending = True
        if self._dirty.bytes > self._context.dirty_limit:
            self._flush_changes()
        return length

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        if size < self._size:
            self._dirty.truncate(size)
            self._keep_below = min(self._keep_below, size)
        self._size = size
        self._pending = True

    def flush(self) -> None:
        if self._pending:
            self._flush_changes()
        self._lower.flush()

    # -- reading ------------------------------------------------------------------------

    def _assemble(self, offset: int, end: int) -> bytes | bytearray:
        """Logical bytes [offset, end): old content below `_keep_below`, zeros above it, and
        the dirty bytes over both."""
        old_end = min(end, self._keep_below)
        if offset < old_end:
            old = self._read_old(offset, old_end)
            if old_end == end and not self._dirty:
                return old
            out = bytearray(old)
            out.extend(bytes(end - old_end))
        else:
            out = bytearray(end - offset)
        self._dirty.overlay(out, offset)
        return out

    def _read_old(self, offset: int, end: int) -> bytes | bytearray:
        """Bytes [offset, end) of the live manifest's content (end <= its size)."""
        entries = self.entries()
        starts, lengths = entries.starts, entries.lengths
        index = entries.find(offset)
        first_start = starts[index]
        if end <= starts[index + 1]:
            data = self._chunk(entries, index)
            if data is None:
                return bytes(end - offset)
            return data[offset - first_start : end - first_start]
        out = bytearray()
        position = offset
        while position < end:
            start = starts[index]
            stop = min(end, start + lengths[index])
            data = self._chunk(entries, index)
            if data is None:
                out.extend(bytes(stop - position))
            else:
                out += memoryview(data)[position - start : stop - start]
            position = stop
            index += 1
        return out

    def _chunk(self, entries: Entries, index: int) -> bytes | None:
        chunk_id = entries.id(index)
        if chunk_id == ZERO_ID:
            return None
        return self._context.fetch(chunk_id, entries.lengths[index], entries.starts[index])

    # -- re-chunking --------------------------------------------------------------------

    def _next_changed(self, position: int) -> float:
        """The first byte at or after `position` whose content is not the old content."""
        found: float = INFINITY
        dirty = self._dirty.next_at_or_after(position)
        if dirty is not None:
            found = dirty
        if self._keep_below < self._size and position < self._size:
            found = min(found, max(position, self._keep_below))
        return found

    def _reusable_until(self, entries: Entries, index: int, lookahead: int) -> int:
        """The end of the run of old chunks from `index` on that stay as they are: their
        bytes, and the lookahead bytes that decided their cut, are unchanged."""
        starts = entries.starts
        limit = min(self._next_changed(starts[index]) - lookahead, self._keep_below)
        reusable = bisect_right(starts, int(limit)) - 1
        return max(index, min(len(entries), reusable))

    def zeros_at_least(self, offset: int, length: int) -> bool:
        """Part of `Content`: the new content of [offset, offset+length) is a hole."""
        end = offset + length
        if end > self._size:
            return False
        dirty = self._dirty.next_at_or_after(offset)
        if dirty is not None and dirty < end:
            return False
        position = offset
        if position < self._keep_below:
            entries = self.entries()
            index = entries.find(position)
            while position < min(end, self._keep_below):
                if entries.id(index) != ZERO_ID:
                    return False
                position = entries.starts[index + 1]
                index += 1
        return True

    def _flush_changes(self) -> None:
        """Re-chunk what changed, put, reference, commit, then flip the manifest."""
        context = self._context
        entries = self.entries()
        header = self._header
        chunker = context.chunker(header.params)
        lookahead = chunker.lookahead
        starts = entries.starts
        count = len(entries)
        size = self._size
        content = _NewContent(self)
        context.counters.flushes += 1
        with context.barrier.writing():
            collector = _Collector(context)
            pieces: list[tuple[bytes | bytearray, array]] = []
            removed: list[bytes] = []
            position, index = 0, 0
            realigned: list[int] = []

            def realign(at: int) -> bool:
                found = bisect_left(starts, at)
                if (
                    found < count
                    and starts[found] == at
                    and self._reusable_until(entries, found, lookahead) > found
                ):
                    realigned.append(found)
                    return True
                return False

            while position < size:
                if index < count and starts[index] == position:
                    until = self._reusable_until(entries, index, lookahead)
                    if until > index:
                        pieces.append(entries.piece(index, until))
                        context.counters.chunks_kept += until - index
                        position, index = starts[until], until
                        continue
                realigned.clear()
                position = cut(chunker, content, position, collector.emit, realign)
                pieces.append(collector.take())
                until = realigned[0] if realigned else count
                if realigned:
                    context.counters.resyncs += 1
                removed += stored_ids(entries, index, until)
                index = until
            removed += stored_ids(entries, index, count)
            new = entries.splice(pieces)
            if new.size != size:
                raise AssertionError(f"re-chunked to {new.size} bytes, not {size}")
            if new.ids != entries.ids or new.lengths != entries.lengths:
                collector.put()
                context.store.reference(collector.added, removed)
                context.store.commit()
                self._header = manifest.write(self._lower, header, new, context.manifest_key)
                self._headers = [self._header]
                context.counters.manifests_written += 1
        self._entries = new
        self._keep_below = size
        self._dirty.clear()
        self._pending = False

    # -- import (migrate) ---------------------------------------------------------------

    def import_plain(self, plain: PlainFile, progress: Progress) -> None:
        """Chunk a whole plain file in one go into this empty manifest."""
        context = self._context
        chunker = context.chunker(self._header.params)
        content = _PlainContent(plain)
        collector = _Collector(context)
        collector.progress = progress
        with context.barrier.writing():
            cut(chunker, content, 0, collector.emit)
            new = Entries.empty().splice([collector.take()])
            collector.put()
            context.store.reference(collector.added, [])
            context.store.commit()
            self._header = manifest.write(self._lower, self._header, new, context.manifest_key)
        self._headers = [self._header]
        self._entries = new
        self._size = self._keep_below = new.size


class _NewContent:
    """A file's content as its next manifest will hold it (for `cut`)."""

    def __init__(self, file: DedupFile) -> None:
        self._file = file
        self.size = file.size()

    def read(self, offset: int, length: int) -> bytes | bytearray:
        return self._file._assemble(offset, min(offset + length, self.size))

    def zeros_at_least(self, offset: int, length: int) -> bool:
        return self._file.zeros_at_least(offset, length)


class _PlainContent:
    """A plain file being imported: its holes are known zeros."""

    def __init__(self, plain: PlainFile) -> None:
        self._plain = plain
        self.size = plain.size()
        self._ranges = [(start, min(end, self.size)) for start, end in plain.data_ranges()]
        self._starts = [start for start, _ in self._ranges]

    def read(self, offset: int, length: int) -> bytes | bytearray:
        end = offset + length
        out = bytearray(length)
        i = max(0, bisect_right(self._starts, offset) - 1)
        while i < len(self._ranges) and self._ranges[i][0] < end:
            low, high = max(offset, self._ranges[i][0]), min(end, self._ranges[i][1])
            if low < high:
                data = self._plain.read(low, high - low)
                if len(data) != high - low:
                    raise OSError(f"it shrank while being imported (at {low + len(data)})")
                out[low - offset : high - offset] = data
            i += 1
        return out

    def zeros_at_least(self, offset: int, length: int) -> bool:
        end = offset + length
        if end > self.size:
            return False
        i = bisect_right(self._starts, offset) - 1
        if i >= 0 and self._ranges[i][1] > offset:
            return False
        return i + 1 >= len(self._ranges) or self._ranges[i + 1][0] >= end


def manifest_ids(entries: Entries) -> Iterable[bytes]:
    """Every stored chunk id a manifest refers to, in order (repeats included)."""
    return (cid for cid in entries.iter_ids() if cid != ZERO_ID)

