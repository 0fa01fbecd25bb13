"""The user-space page cache: logical pages of every section under one memory budget.

Pages are full-size, zero-padded bytearrays keyed by (section id, page index). The cache owns
the memory and the eviction order; sections own the meaning (size, dirty data, write-back).
A dirty page remembers the span of it that was written (one range, the union of its writes),
so a write-back writes that span, not the whole page.
Only clean pages are evicted: a dirty page leaves the cache only after its section wrote it
back, and writers push back (flush their own section) when dirty bytes pass half the budget.

Eviction is a segmented LRU, like the kernel's inactive and active lists. A page read in
waits in the probation segment; used again, it moves to the protected segment. Each segment
may hold half the budget: protected pages beyond that go back to probation (newest end), and
probation evicts its oldest. A long streaming read therefore cycles through half the budget
instead of flushing every page that was in use, and does not grow the cache to its whole
budget (fresh memory is costly to touch on a VM).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

DEFAULT_BUDGET = 256 << 20
MIN_PAGE_SIZE = 64 << 10


def page_size_for(block_size: int) -> int:
    """Page size for a stack: a multiple of its block size, at least 64 KiB."""
    block = max(1, block_size)
    return max(1, -(-MIN_PAGE_SIZE // block)) * block


@dataclass(frozen=True, slots=True)
class PageCacheStatistics:
    budget: int
    bytes_cached: int
    dirty_bytes: int
    pages: int
    hits: int
    misses: int
    evictions: int
    write_backs: int

    @property
    def hit_ratio(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PageCache:
    """Pages of all sections; clean ones in two least-recently-used segments for eviction."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self._pages: dict[tuple[int, int], bytearray] = {}
        #: Clean pages used once since they came in (oldest first), and their bytes.
        self._probation: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._probation_bytes = 0
        #: Clean pages used again (or written) while cached.
        self._protected: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._protected_bytes = 0
        self._by_section: dict[int, set[int]] = {}
        #: Dirty pages of each section: index -> the span written, (lo, hi) within the page.
        self._dirty: dict[int, dict[int, tuple[int, int]]] = {}
        self._bytes = 0
        self._dirty_bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.write_backs = 0

    # ------------------------------------------------------------------ lookups

    def get(self, section: int, index: int) -> bytearray | None:
        key = (section, index)
        page = self._pages.get(key)
        if page is None:
            self.misses += 1
            return None
        self.hits += 1
        if key in self._protected:
            self._protected.move_to_end(key)
        elif key in self._probation:
            self._unlist(key, page)
            self._protect(key, page)
            self._evict()
        return page

    def count_miss(self) -> None:
        """A read found no page and was served without loading one (sections' random reads)."""
        self.misses += 1

    def peek(self, section: int, index: int) -> bytearray | None:
        """A page without counting a hit or touching the LRU (for internal edits)."""
        return self._pages.get((section, index))

    # ------------------------------------------------------------------ changes

    def put(
        self, section: int, index: int, page: bytearray, *, dirty: bool = False,
        span: tuple[int, int] | None = None,
    ) -> None:
        """Cache a page; `dirty`: written, over `span` of it (default: all of it)."""
        key = (section, index)
        old = self._pages.get(key)
        if old is not None:
            self._bytes -= len(old)
            if index in self._dirty.get(section, ()):
                self._dirty_bytes -= len(old)
                del self._dirty[section][index]
            self._unlist(key, old)
        self._pages[key] = page
        self._bytes += len(page)
        self._by_section.setdefault(section, set()).add(index)
        if dirty:
            self._add_dirty(section, index, page, span or (0, len(page)))
        else:
            self._probation[key] = None
            self._probation_bytes += len(page)
        self._evict(newest=key)

    def _unlist(self, key: tuple[int, int], page: bytearray) -> None:
        """Take a page out of whichever eviction segment holds it."""
        if self._probation.pop(key, 0) is None:
            self._probation_bytes -= len(page)
        elif self._protected.pop(key, 0) is None:
            self._protected_bytes -= len(page)

    def _protect(self, key: tuple[int, int], page: bytearray) -> None:
        self._protected[key] = None
        self._protected_bytes += len(page)

    def mark_dirty(self, section: int, index: int, span: tuple[int, int] | None = None) -> None:
        """A cached page was written over `span` of it (default: all of it)."""
        page = self._pages[(section, index)]
        span = span or (0, len(page))
        spans = self._dirty.get(section)
        if spans is not None and index in spans:
            lo, hi = spans[index]
            spans[index] = (min(lo, span[0]), max(hi, span[1]))
            return
        self._unlist((section, index), page)
        self._add_dirty(section, index, page, span)

    def _add_dirty(
        self, section: int, index: int, page: bytearray, span: tuple[int, int]
    ) -> None:
        self._dirty.setdefault(section, {})[index] = span
        self._dirty_bytes += len(page)

    def dirty_indexes(self, section: int) -> list[int]:
        return sorted(self._dirty.get(section, ()))

    def dirty_span(self, section: int, index: int) -> tuple[int, int]:
        """(lo, hi) of a dirty page that was written: what its write-back must write."""
        return self._dirty[section][index]

    def has_dirty(self, section: int) -> bool:
        return bool(self._dirty.get(section))

    def mark_clean(self, section: int, indexes: list[int]) -> None:
        dirty = self._dirty.get(section)
        if not dirty:
            return
        for index in indexes:
            if index in dirty:
                del dirty[index]
                self._dirty_bytes -= len(self._pages[(section, index)])
                self._protect((section, index), self._pages[(section, index)])  # in use
                self.write_backs += 1
        if not dirty:
            del self._dirty[section]
        self._evict()

    def drop(self, section: int, from_index: int = 0) -> None:
        """Forget pages of a section from `from_index` on, dirty ones included."""
        self.drop_range(section, from_index, None)

    def drop_range(self, section: int, start: int, stop: int | None) -> None:
        """Forget pages start..stop-1 (stop None: to the end), dirty ones included."""
        indexes = self._by_section.get(section)
        if not indexes:
            return
        dirty = self._dirty.get(section, {})
        if stop is not None and stop - start < len(indexes):
            doomed = [i for i in range(start, stop) if i in indexes]
        else:
            doomed = [i for i in indexes if i >= start and (stop is None or i < stop)]
        for index in doomed:
            indexes.discard(index)
            page = self._pages.pop((section, index))
            self._bytes -= len(page)
            if index in dirty:
                del dirty[index]
                self._dirty_bytes -= len(page)
            else:
                self._unlist((section, index), page)
        if not indexes:
            del self._by_section[section]
        if section in self._dirty and not dirty:
            del self._dirty[section]

    def _evict(self, newest: tuple[int, int] | None = None) -> None:
        """Keep each segment within half the budget (protected overflow is demoted to
        probation; probation drops its oldest, sparing the newest page), then drop clean
        pages, probation's first, oldest first, until the whole cache is within budget.
        `newest` is a page just put."""
        half = self.budget // 2
        while self._protected_bytes > self.budget - half and len(self._protected) > 1:
            key, _ = self._protected.popitem(last=False)
            page = self._pages[key]
            self._protected_bytes -= len(page)
            self._probation[key] = None
            self._probation_bytes += len(page)
        while self._probation_bytes > half and len(self._probation) > 1:
            self._evict_oldest(self._probation)
        while self._bytes > self.budget and (self._probation or self._protected):
            # A page just put is spared while protected pages remain: dirty pages may fill
            # what protected leaves free, and a new page must still get in.
            spare = self._protected and next(iter(self._probation), None) == newest
            self._evict_oldest(self._protected if spare else self._probation or self._protected)

    def _evict_oldest(self, segment: OrderedDict[tuple[int, int], None]) -> None:
        key, _ = segment.popitem(last=False)
        page = self._pages.pop(key)
        self._bytes -= len(page)
        if segment is self._probation:
            self._probation_bytes -= len(page)
        else:
            self._protected_bytes -= len(page)
        section, index = key
        indexes = self._by_section[section]
        indexes.discard(index)
        if not indexes:
            del self._by_section[section]
        self.evictions += 1

    # ------------------------------------------------------------------ checking

    def check_invariants(self) -> None:
        """Assert the accounting and the promises of docs/LOCKING.md (for tests).

        Dirty pages are never evicted (nor listed for eviction); the budget holds unless only
        dirty pages are left to blame; each segment keeps to its half (a single page may be
        larger than that on its own).
        """
        pages = self._pages
        dirty = {(s, i) for s, indexes in self._dirty.items() for i in indexes}
        assert dirty <= pages.keys(), "a dirty page left the cache"
        probation, protected = set(self._probation), set(self._protected)
        assert not probation & protected, "a page is in both segments"
        assert probation | protected == pages.keys() - dirty, "segments are not the clean pages"
        listed = {(s, i) for s, indexes in self._by_section.items() for i in indexes}
        assert all(self._by_section.values()) and listed == pages.keys(), "section index"
        assert self._bytes == sum(len(p) for p in pages.values()), "bytes_cached"
        assert self._dirty_bytes == sum(len(pages[k]) for k in dirty), "dirty_bytes"
        for section, spans in self._dirty.items():
            for index, (lo, hi) in spans.items():
                assert 0 <= lo <= hi <= len(pages[(section, index)]), "dirty span"
        assert self._probation_bytes == sum(len(pages[k]) for k in probation)
        assert self._protected_bytes == sum(len(pages[k]) for k in protected)
        assert self._bytes <= self.budget or not probation | protected, "over budget"
        half = self.budget // 2
        assert self._probation_bytes <= half or len(probation) <= 1, "probation over half"
        assert self._protected_bytes <= self.budget - half or len(protected) <= 1

    # ------------------------------------------------------------------ pressure

    @property
    def dirty_bytes(self) -> int:
        return self._dirty_bytes

    def over_dirty_limit(self) -> bool:
        return self._dirty_bytes > self.budget // 2

    def statistics(self) -> PageCacheStatistics:
        return PageCacheStatistics(
            budget=self.budget,
            bytes_cached=self._bytes,
            dirty_bytes=self._dirty_bytes,
            pages=len(self._pages),
            hits=self.hits,
            misses=self.misses,
            evictions=self.evictions,
            write_backs=self.write_backs,
        )
