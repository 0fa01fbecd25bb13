"""Sections: the shadow object of one (file, transformed view).

A section owns what a view of a file needs to be right on every path: the logical size, a
reader/writer lock, the upper file (the provider stack opened over the native file), and its
pages in the page cache. All handles of one (file, view) share it, so read(), mmap write-back
and stat agree. Provider calls run under the section lock (shared for reads, exclusive for
writes, truncate and write-back), inline unless their work is unbounded (`blocking`).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TypeVar

import trio

from isofs.core import native
from isofs.core.locks import ResourceLock
from isofs.core.pagecache import PageCache
from isofs.durable import pwrite_all
from isofs.provider import CorruptData, RandomAccessFile, Stack

log = logging.getLogger(__name__)
T = TypeVar("T")


#: The allocation unit below which a write is all or nothing on a full disk (ext4, xfs,
#: btrfs and tmpfs allocate 4 KiB blocks or pages).
FS_BLOCK = 4096


class NativeFile:
    """The native file as the lowest `RandomAccessFile` of a stack (thread-safe pread/pwrite).

    Writes reserve their range first, so that a full disk fails a write before it changes
    anything: a provider's write is several blocks, and a write cut short half-way would
    leave a torn block (EIO) in a file that was fine.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._can_reserve = True

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        view = memoryview(data)
        # A write inside one filesystem block cannot be cut short half-way: no reservation.
        if self._can_reserve and view.nbytes and (
            offset // FS_BLOCK != (offset + view.nbytes - 1) // FS_BLOCK
        ):
            self._can_reserve = native.reserve(self.fd, offset, view.nbytes)
        pwrite_all(self.fd, view, offset)
        return view.nbytes

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def flush(self) -> None:
        """Nothing is buffered here; durability is fsync's job."""


#: Provider work on more bytes than this runs on a worker thread; everything a single FUSE
#: request can ask for (at most 1 MiB) runs inline. `cryptography` releases the GIL around
#: each AES-GCM call, i.e. every 4 KiB block, so a worker thread and the event loop hand
#: the GIL back and forth once per block: measured, 1 GiB overwrites went from 870 to 700
#: MiB/s and cold reads lost about a third when run in threads. Only work of unbounded size
#: (a truncate that zero-fills, a large write-back) is worth keeping off the event loop.
INLINE_LIMIT = 4 << 20

#: Random reads that miss a page and get only their own blocks; the next one loads the page.
#: Two: with reads spread over a large file a page is rarely hit three times (a third of the
#: pages of a 1 GiB file read at 20,000 random 4 KiB offsets would be loaded after one repeat,
#: a tenth after two), while reads that keep coming back to a small file load it soon.
RANDOM_MISSES_BEFORE_PAGE = 2
#: Pages a section counts random misses for (forgotten all at once past it).
MAX_PROBED_PAGES = 4096

#: A file no larger than this fraction of a page keeps no pages once nothing uses it.
SMALL_FILE_PAGE_FRACTION = 8


async def blocking(
    function: Callable[..., T], *args: object, size: int = 0, io_bound: bool = False
) -> T:
    """Run provider or disk work: inline unless it is larger than any one request, or it may
    block on I/O beyond the native file (a layer over a network store)."""
    if size <= INLINE_LIMIT and not io_bound:
        return function(*args)
    return await trio.to_thread.run_sync(function, *args)


class _Hold:
    """`async with` a section's lock, exclusive or shared; uncontended it costs no trip
    through the scheduler and no async generator (the lock's own context managers always
    checkpoint, ~4 us each; an @asynccontextmanager costs trio's async-generator hooks, and a
    request takes the lock several times). Stateless, so one per mode serves every task."""

    __slots__ = ("_exclusive", "_lock")

    def __init__(self, lock: ResourceLock, exclusive: bool) -> None:
        self._lock = lock
        self._exclusive = exclusive

    async def __aenter__(self) -> None:
        lock = self._lock
        if self._exclusive:
            if not lock.try_acquire_exclusive():
                await lock.acquire_exclusive()
        elif not lock.try_acquire_shared():
            await lock.acquire_shared()

    async def __aexit__(self, *exc_info: object) -> None:
        self._lock.release()


class Section:
    """One (file, view) of a transformed view.

    A file not in the stack's format is shown as its native bytes: the section's upper file is
    then the native file itself (`formatted` False), so every handle of a transformed view goes
    through a section either way and one mechanism serves both.
    """

    def __init__(
        self,
        section_id: int,
        native_fd: int,
        stack: Stack,
        cache: PageCache,
        page_size: int,
        view: str,
        on_write_back: Callable[[], None],
    ) -> None:
        self.id = section_id
        self.native_fd = native_fd
        self.lower = NativeFile(native_fd)
        self.stack = stack
        self.cache = cache
        self.page_size = page_size
        self.view = view
        #: Told whenever this section changed the native file (coherence with other views).
        self.on_write_back = on_write_back
        self.lock = ResourceLock()
        self._exclusive = _Hold(self.lock, exclusive=True)
        self._shared = _Hold(self.lock, exclusive=False)
        self.upper: RandomAccessFile = self.lower
        self.formatted = False
        self.size = self.stored_size = 0
        self.validators = native.Validators(-1, -1, -1)
        self.handles = 0
        #: Set when the native file changed under us; the next read or write reloads first.
        self.stale = True
        #: Set by attach(): the upper file must be rebuilt on the new descriptor.
        self._rebind = False
        #: The upper file was written or truncated since its last flush: a layer may hold
        #: state (an index, a table at the end of the file) that only its flush() writes.
        self._upper_pending = False
        #: Where the last read ended: a read starting there continues a sequential run.
        self._read_end = 0
        #: Where the last write ended, likewise for writes.
        self._write_end = 0
        #: The smallest span the stack reads and verifies (an AES-GCM block, a zstd frame).
        self._block = max(1, stack.block_size)
        #: Random reads that missed each page since it was last loaded (RANDOM_MISSES...).
        self._probed: dict[int, int] = {}

    def native_path(self) -> str | None:
        """Where the native file is now (None when idle), worked out only when asked: a
        readlink per section created was measurable in small-file workloads."""
        if not self.attached:
            return None
        try:
            return os.readlink(native.proc_path(self.native_fd))
        except OSError as exc:
            return f"unnamed ({exc.strerror})"

    @property
    def label(self) -> str:
        """The file and view, for log lines."""
        return f"{self.native_path() or 'idle'} ({self.view} view)"

    async def _call(self, function: Callable[..., T], *args: object, size: int = 0) -> T:
        """A provider call, placed by `blocking` (the stack says whether it may block)."""
        return await blocking(function, *args, size=size, io_bound=self.stack.io_bound)

    async def load(self) -> None:
        """Open the upper file (reads the header; in a worker thread only for io-bound
        stacks)."""
        async with self._exclusive:
            await self._reload_if_stale()

    async def ensure_formatted(self) -> None:
        """Format an empty native file before the first write through this view.

        An empty file has no content to pass through, and new data must not land in clear.
        """
        if self.formatted:
            return
        async with self._exclusive:
            await self._reload_if_stale()
            if self.formatted or self.stored_size != 0 or self.has_dirty_pages:
                return
            if self.lower.size() != 0:
                return
            self._upper_pending = True
            self.upper = await self._call(self.stack.create, self.lower)
            self.formatted = True
            self.size = self.stored_size = 0
            self._wrote_native()

    # --------------------------------------------------------------------- reading

    async def read(self, offset: int, size: int) -> bytes:
        while True:
            if self.stale:
                async with self._exclusive:
                    await self._reload_if_stale()
            async with self._shared:
                # Marked stale while this task waited (a native write that went before it in
                # the queue changed the file right after its release): reload again first.
                if not self.stale:
                    return await self._read_locked(offset, size)

    async def _read_locked(self, offset: int, size: int) -> bytes | memoryview:
        """The bytes, or a view of them when no copy is needed.

        pyfuse3 replies from any buffer before another task runs, so a view of a page, or of
        what the provider just returned, is safe to hand back: a cold 1 MiB read then costs
        one copy (into the cache) instead of two.

        A small read that misses, does not continue the previous read and needs fewer blocks
        than a page holds is a random read: the first two in a page get only their own blocks
        from the provider, uncached (a 4 KiB read of an encrypted file then decrypts one
        block, not sixteen); a third miss in the same page shows the reads come back there,
        and loads the page. Sequential runs, and reads as large as a page, load whole pages.
        """
        end = min(offset + size, self.size)
        if offset >= end:
            return b""
        page_size = self.page_size
        first, last = offset // page_size, (end - 1) // page_size
        base = first * page_size
        sequential, self._read_end = offset == self._read_end, end
        if not sequential and self._small_and_uncached(offset, end):
            misses = self._probed.get(first, 0)
            if misses < RANDOM_MISSES_BEFORE_PAGE:  # its blocks only
                if len(self._probed) >= MAX_PROBED_PAGES:
                    self._probed.clear()
                self._probed[first] = misses + 1
                self.cache.count_miss()
                return await self._read_uncached(offset, end - offset)
            del self._probed[first]  # reads keep coming back here: load and keep the page
        pages, fresh = await self._pages(first, last)  # a cached page: its hit counted here
        if fresh is not None and len(fresh) >= end - base:
            return memoryview(fresh)[offset - base : end - base]
        if first == last and pages[0] is not None:
            return memoryview(pages[0])[offset - base : end - base]
        pieces: list[bytes | bytearray | memoryview] = []
        for index in range(first, last + 1):
            base = index * page_size
            lo, hi = max(offset, base), min(end, base + page_size)
            page = pages[index - first]
            if page is None:  # a damaged page: only a read that avoids the bad block succeeds
                pieces.append(await self._read_uncached(lo, hi - lo))
            else:
                pieces.append(memoryview(page)[lo - base : hi - base])
        return b"".join(pieces)

    def _small_and_uncached(self, offset: int, end: int) -> bool:
        """offset..end lies in one page that is not cached and needs fewer of the stack's
        blocks than a page holds: what makes a read or write that does not continue the
        previous one a random access."""
        page = self.page_size
        first = offset // page
        return (
            first == (end - 1) // page
            and self._blocks_span(offset, end) < page
            and self.cache.peek(self.id, first) is None
        )

    def _blocks_span(self, offset: int, end: int) -> int:
        """Bytes the stack must read and verify to return offset..end."""
        block = self._block
        return -(-end // block) * block - offset // block * block

    async def _pages(
        self, first: int, last: int
    ) -> tuple[list[bytearray | None], bytes | bytearray | None]:
        """Pages first..last, loading each missing run with one provider read; and when that
        was one run of all of them, what the provider returned for it.

        A run that fails verification is retried page by page; a page that still fails is
        None, so the rest of the file stays readable around a damaged block.
        """
        fresh = None
        found: dict[int, bytearray | None] = {}
        missing: list[int] = []
        for index in range(first, last + 1):
            page = self.cache.get(self.id, index)
            if page is None:
                missing.append(index)
            else:
                found[index] = page
        for start, count in _runs(missing):
            try:
                data, pages = await self._read_pages(start, count)
                loaded: list[bytearray | None] = list(pages)
                if count == last - first + 1:
                    fresh = data
            except CorruptData:
                loaded = []
                for index in range(start, start + count):
                    try:
                        loaded += await self._load(index, 1)
                    except CorruptData:
                        loaded.append(None)
            for index, page in zip(range(start, start + count), loaded, strict=True):
                found[index] = page
        return [found[index] for index in range(first, last + 1)], fresh

    async def _read_uncached(self, offset: int, size: int) -> bytes:
        """Bytes straight from the provider (zeros past the stored size), not cached."""
        stored = max(0, min(size, self.stored_size - offset))
        data = await self._provider_read(offset, stored) if stored else b""
        return data + bytes(size - len(data))

    async def _provider_read(self, offset: int, size: int) -> bytes:
        try:
            return await self._call(self.upper.read, offset, size, size=size)
        except CorruptData as exc:  # name the file: the provider only knows blocks
            raise CorruptData(f"{self.label}: {exc.strerror}") from None

    async def _load(self, start: int, count: int) -> list[bytearray]:
        return (await self._read_pages(start, count))[1]

    async def _read_pages(
        self, start: int, count: int
    ) -> tuple[bytes | bytearray | None, list[bytearray]]:
        """Read pages from the provider (zeros past the stored size) and cache them clean;
        also the provider's bytes, unless a page was cached meanwhile (then it wins)."""
        size = self.page_size
        offset = start * size
        length = max(0, min(count * size, self.stored_size - offset))
        data = await self._provider_read(offset, length) if length else b""
        view = memoryview(data)
        pages = []
        fresh: bytes | bytearray | None = data
        for i in range(count):
            page = bytearray(view[i * size : (i + 1) * size])
            if len(page) < size:
                page.extend(bytes(size - len(page)))
            # Another task may have filled or dirtied it while we were in the thread.
            current = self.cache.peek(self.id, start + i)
            if current is not None:
                pages.append(current)
                fresh = None
                continue
            self.cache.put(self.id, start + i, page)
            pages.append(page)
        return fresh, pages

    # --------------------------------------------------------------------- writing

    async def write(self, offset: int, data: bytes) -> int:
        """Whole pages go straight to the provider; partial pages wait in the page cache.

        Large sequential writes arrive as 1 MiB requests: writing their whole pages through
        at once spreads the provider work over the requests (and, where the stack allows it,
        over both cores) instead of piling up dirty pages for one long write-back.

        A small write that does not continue the previous one, into a page that is not
        cached, and needing fewer blocks than a page holds, is a random write: it goes
        straight to the provider, which rewrites the blocks it touches, instead of loading
        the page to change a block of it (the random reads' rule, for writes).
        """
        async with self._exclusive:
            await self._reload_if_stale()
            page = self.page_size
            end = offset + len(data)
            sequential, self._write_end = offset == self._write_end, end
            if data and not sequential and self._small_and_uncached(offset, end):
                await self._write_through(offset, data)  # a random write
                return len(data)
            through_lo = -(-offset // page) * page
            through_hi = end // page * page
            if through_hi > through_lo:
                whole = data[through_lo - offset : through_hi - offset]
                await self._write_through(through_lo, whole)
                await self._write_locked(offset, data[: through_lo - offset])
                await self._write_locked(through_hi, data[through_hi - offset :])
            else:
                await self._write_locked(offset, data)
            if self.cache.over_dirty_limit():
                await self._write_back_locked()
        return len(data)

    async def _write_through(self, offset: int, data: bytes) -> None:
        """Write straight to the provider; cached copies of the whole pages it covers are
        superseded (a random write's one page is not cached: there is nothing to drop)."""
        page = self.page_size
        end = offset + len(data)
        self.cache.drop_range(self.id, -(-offset // page), end // page)
        self._upper_pending = True
        await self._call(self.upper.write, offset, data, size=len(data))
        self.stored_size = max(self.stored_size, end)
        self.size = max(self.size, end)
        self._wrote_native()

    async def _write_locked(self, offset: int, data: bytes) -> None:
        if not data:
            return
        size = self.page_size
        end = offset + len(data)
        first, last = offset // size, (end - 1) // size
        # Edge pages that are only partly overwritten need their old bytes first. Hold on to
        # them: filling the other pages may evict them from the cache before we write.
        edges = {first} if offset % size else set()
        if end % size:
            edges.add(last)
        loaded: dict[int, bytearray] = {}
        for index in sorted(edges):
            page = self.cache.peek(self.id, index)
            if page is None and index * size < self.stored_size:
                page = (await self._load(index, 1))[0]
            if page is not None:
                loaded[index] = page
        source = memoryview(data)
        for index in range(first, last + 1):
            page_start = index * size
            lo = max(offset, page_start)
            hi = min(end, page_start + size)
            span = (lo - page_start, hi - page_start)
            page = self.cache.peek(self.id, index)
            if page is None:
                page = loaded.get(index) or bytearray(size)
                self.cache.put(self.id, index, page, dirty=True, span=span)
            else:
                self.cache.mark_dirty(self.id, index, span)
            page[span[0] : span[1]] = source[lo - offset : hi - offset]
        self.size = max(self.size, end)

    async def truncate(self, new_size: int) -> None:
        async with self._exclusive:
            await self._reload_if_stale()
            await self._truncate_locked(new_size)

    async def _truncate_locked(self, new_size: int) -> None:
        size = self.page_size
        if new_size < self.size:
            boundary = new_size // size
            keep_from = boundary + 1 if new_size % size else boundary
            self.cache.drop(self.id, keep_from)
            page = self.cache.peek(self.id, boundary) if new_size % size else None
            if page is not None:  # later growth must read zeros, not the old tail
                page[new_size % size :] = bytes(size - new_size % size)
        self._upper_pending = True
        await self._call(self.upper.truncate, new_size, size=abs(new_size - self.stored_size))
        self.stored_size = new_size
        self.size = new_size
        await self._flush_upper()

    # ------------------------------------------------------------------ write-back

    @property
    def dirty(self) -> bool:
        """Pages or layer state not yet written to the native file."""
        return self._upper_pending or self.cache.has_dirty(self.id)

    @property
    def has_dirty_pages(self) -> bool:
        """Pages not yet given to the provider: then only this section knows the size."""
        return self.cache.has_dirty(self.id)

    async def flush(self) -> bool:
        """Write dirty pages back to the provider and flush it; True if anything was written.

        Waits for an operation in flight even when nothing is dirty: a native change through
        the mount comes right after this flush, and one made while a writer was in a worker
        thread would be hidden by the validators that writer takes when it is done. A stale
        section reloads first, as before a read or write: pages of a file replaced behind the
        mount's back must not be written through the old upper file into the new one.
        """
        if not self.dirty and not self.lock.in_use:
            return False
        async with self._exclusive:
            await self._reload_if_stale()
            return await self._write_back_locked()

    async def _write_back_locked(self) -> bool:
        indexes = self.cache.dirty_indexes(self.id)
        if not indexes:
            if not self._upper_pending:
                return False
            await self._flush_upper()
            return True
        size = self.page_size
        for offset, end, pages in self._dirty_extents(indexes):
            end = min(end, self.size)  # only below the size: a small file's page is mostly pad
            if end > offset:
                blob = bytearray()
                for index in pages:
                    page = self.cache.peek(self.id, index)
                    lo = max(offset - index * size, 0)
                    hi = min(end - index * size, size)
                    if page is not None and hi > lo:
                        blob += memoryview(page)[lo:hi]
                await self._call(self.upper.write, offset, blob, size=len(blob))
                self.stored_size = max(self.stored_size, end)
            self.cache.mark_clean(self.id, pages)
        await self._flush_upper()
        return True

    def _dirty_extents(self, indexes: list[int]) -> list[tuple[int, int, list[int]]]:
        """(start, end, page indexes) of what the dirty pages' writes touched, each span
        widened to whole blocks of the stack, and joined where they meet: a 4 KiB write into a
        64 KiB page writes back 4 KiB (and re-encrypts one block, not sixteen)."""
        size, block = self.page_size, self._block
        extents: list[tuple[int, int, list[int]]] = []
        for index in indexes:
            lo, hi = self.cache.dirty_span(self.id, index)
            start = index * size + lo // block * block  # a page starts and ends on a block
            end = index * size + -(-hi // block) * block
            if extents and start == extents[-1][1]:  # this page's span meets the last one's
                first, _, pages = extents.pop()
                start = first
            else:
                pages = []
            pages.append(index)
            extents.append((start, end, pages))
        return extents

    async def _flush_upper(self) -> None:
        self._upper_pending = False
        # A layer that keeps writes (compress encodes its changed frames at flush) may say
        # how much its flush will write: more than a request's worth goes to a worker thread,
        # so the loop keeps answering other processes meanwhile.
        pending = getattr(self.upper, "pending_bytes", None)
        size = pending() if pending is not None else 0
        try:
            await self._call(self.upper.flush, size=size)
        except BaseException:
            self._upper_pending = True
            raise
        self._wrote_native()

    async def fsync(self, datasync: bool) -> None:
        await self.flush()
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, self.native_fd)

    # ------------------------------------------------------------------- coherence

    def _refresh_validators(self) -> None:
        self.validators = native.Validators.of(os.fstat(self.native_fd))

    def _wrote_native(self) -> None:
        self._refresh_validators()
        self.on_write_back()

    def native_changed(self) -> bool:
        return native.Validators.of(os.fstat(self.native_fd)) != self.validators

    def _native_now(self) -> native.Validators:
        return native.Validators.of(os.fstat(self.native_fd))

    def mark_stale(self) -> None:
        self.stale = True

    async def _reload_if_stale(self) -> None:
        """Rebuild from the native file after it changed (call with the lock exclusive).

        Every cached page and the size are dropped. Writes through the mount flush this
        section before they change native bytes, so dirty pages here mean a conflicting change
        made behind the mount's back: writing them back through the old upper file could
        corrupt the new one, so they are discarded, loudly. A file that is no longer in the
        stack's format (rewritten in clear) is shown as its native bytes.
        """
        if not self.stale:
            return
        now = self._native_now()
        if now == self.validators:
            if self._rebind:  # same file, new descriptor: only the upper file is rebuilt
                upper = await self._call(self.stack.open, self.lower)
                self.upper = upper if upper is not None else self.lower
                self._rebind = False
            self.stale = False  # nothing changed after all: keep pages and pending writes
            return
        if self.dirty:
            log.error("%s: changed behind the mount's back; unwritten data discarded", self.label)
        self.cache.drop(self.id)
        self._upper_pending = False
        # An empty file is in no format: nothing to read (a new file's first open).
        upper = await self._call(self.stack.open, self.lower) if now.size else None
        self.formatted = upper is not None
        self.upper = upper if upper is not None else self.lower
        self.size = self.stored_size = await self._call(self.upper.size) if upper else now.size
        self.validators = self._native_now() if upper else now
        self.stale = self._rebind = False

    @property
    def attached(self) -> bool:
        return self.native_fd >= 0

    def detach(self) -> None:
        """Give back the native descriptor when nothing uses the section; pages stay.

        Nothing: no handle, no dirty page, and no task holding or waiting for the lock (a
        truncate, or an open that has no handle yet, may be waiting for it).

        A section per file ever opened would otherwise hold a descriptor per file (10,000
        created files: 10,000 descriptors). The validators decide at the next attach whether
        the pages still describe the file.

        A small file's pages go too: its one page is mostly padding (a 64 KiB page for a
        4 KiB file), the kernel keeps its own copy, and reading it again costs one small
        provider read. Kept, 4,096 small files would fill a 256 MiB cache, and every new
        file's page would be fresh memory the kernel must fault in (~45 us a page here).
        """
        if self.attached and not self.handles and not self.dirty and not self.lock.in_use:
            os.close(self.native_fd)
            self.native_fd = -1
            if self.size <= self.page_size // SMALL_FILE_PAGE_FRACTION:
                self.cache.drop(self.id)

    def attach(self, fd: int) -> None:
        """Take a fresh read-write descriptor on the file; the next use validates the pages."""
        self.native_fd = fd
        self.lower = NativeFile(fd)
        self._rebind = self.stale = True

    def check_invariants(self) -> None:
        """Assert the promises of docs/LOCKING.md about this section (for tests).

        The structure holds at every task switch. The content (clean pages and stored size
        agree with the provider file) is only checked while no task holds the lock exclusive
        (a writer may be between changing the provider file and recording it) and the section
        is current: not stale, native file unchanged since its validators.
        """
        cache, size = self.cache, self.page_size
        assert 0 <= self.stored_size <= self.size, (self.stored_size, self.size)
        indexes = sorted(cache._by_section.get(self.id, ()))
        dirty = set(cache.dirty_indexes(self.id))
        assert dirty <= set(indexes), "a dirty page left the cache"
        for index in indexes:
            page = cache.peek(self.id, index)
            assert page is not None and len(page) == size, index
            assert index * size < self.size, f"page {index} lies beyond the size {self.size}"
            tail = max(0, self.size - index * size)
            assert not any(page[tail:]), f"page {index} is not zero beyond the size"
        if not self.attached:
            assert not self.handles and not dirty, "detached while handles or pages need it"
            assert not self.lock.in_use, "detached while a task uses the section"
            return
        os.fstat(self.native_fd)  # EBADF if someone closed it
        if self.stale or self.lock.is_exclusive or self.native_changed():
            return
        upper = self.stack.open(NativeFile(self.native_fd))
        assert self.formatted == (upper is not None)
        current = upper if upper is not None else NativeFile(self.native_fd)
        assert self.stored_size == current.size(), (self.stored_size, current.size())
        for index in sorted(set(indexes) - dirty):
            page = cache.peek(self.id, index)
            assert page is not None
            start = index * size
            stored = current.read(start, max(0, min(size, self.stored_size - start)))
            assert page[: len(stored)] == stored, f"clean page {index} differs from the file"
            assert not any(page[len(stored) :]), f"clean page {index}: not zero past the data"

    def close(self) -> None:
        """Forget pages and close the native descriptor (after a final flush)."""
        self.cache.drop(self.id)
        if self.attached:
            os.close(self.native_fd)
            self.native_fd = -1


def _runs(indexes: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted page indexes as (start, count)."""
    runs: list[tuple[int, int]] = []
    for index in indexes:
        if runs and runs[-1][0] + runs[-1][1] == index:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((index, 1))
    return runs
