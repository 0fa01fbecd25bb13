"""The user-space page cache: logical pages of every section under one memory budget.

Pages are full-size, zero-padded bytearrays keyed by (section id, page index). The cache owns
the memory and the LRU order; sections own the meaning (size, dirty data, write-back). Only
clean pages are evicted: a dirty page leaves the cache only after its section wrote it back,
and writers push back (flush their own section) when dirty bytes pass half the budget.
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
    """Pages of all sections; clean ones in least-recently-used order for eviction."""

    def __init__(self, budget: int = DEFAULT_BUDGET) -> None:
        self.budget = budget
        self._pages: dict[tuple[int, int], bytearray] = {}
        self._clean_lru: OrderedDict[tuple[int, int], None] = OrderedDict()
        self._by_section: dict[int, set[int]] = {}
        self._dirty: dict[int, set[int]] = {}
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
        if key in self._clean_lru:
            self._clean_lru.move_to_end(key)
        return page

    def peek(self, section: int, index: int) -> bytearray | None:
        """A page without counting a hit or touching the LRU (for internal edits)."""
        return self._pages.get((section, index))

    # ------------------------------------------------------------------ changes

    def put(self, section: int, index: int, page: bytearray, *, dirty: bool = False) -> None:
        key = (section, index)
        old = self._pages.get(key)
        if old is not None:
            self._bytes -= len(old)
            if index in self._dirty.get(section, ()):
                self._dirty_bytes -= len(old)
                self._dirty[section].discard(index)
            self._clean_lru.pop(key, None)
        self._pages[key] = page
        self._bytes += len(page)
        self._by_section.setdefault(section, set()).add(index)
        if dirty:
            self._add_dirty(section, index, page)
        else:
            self._clean_lru[key] = None
        self._evict()

    def mark_dirty(self, section: int, index: int) -> None:
        if index not in self._dirty.get(section, ()):
            self._clean_lru.pop((section, index), None)
            self._add_dirty(section, index, self._pages[(section, index)])

    def _add_dirty(self, section: int, index: int, page: bytearray) -> None:
        self._dirty.setdefault(section, set()).add(index)
        self._dirty_bytes += len(page)

    def dirty_indexes(self, section: int) -> list[int]:
        return sorted(self._dirty.get(section, ()))

    def has_dirty(self, section: int) -> bool:
        return bool(self._dirty.get(section))

    def mark_clean(self, section: int, indexes: list[int]) -> None:
        dirty = self._dirty.get(section)
        if not dirty:
            return
        for index in indexes:
            if index in dirty:
                dirty.discard(index)
                self._dirty_bytes -= len(self._pages[(section, index)])
                self._clean_lru[(section, index)] = None
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
        dirty = self._dirty.get(section, set())
        if stop is not None and stop - start < len(indexes):
            doomed = [i for i in range(start, stop) if i in indexes]
        else:
            doomed = [i for i in indexes if i >= start and (stop is None or i < stop)]
        for index in doomed:
            indexes.discard(index)
            page = self._pages.pop((section, index))
            self._bytes -= len(page)
            if index in dirty:
                dirty.discard(index)
                self._dirty_bytes -= len(page)
            else:
                self._clean_lru.pop((section, index), None)
        if not indexes:
            del self._by_section[section]
        if section in self._dirty and not dirty:
            del self._dirty[section]

    def _evict(self) -> None:
        """Drop clean pages, least recently used first, until within budget."""
        while self._bytes > self.budget and self._clean_lru:
            key, _ = self._clean_lru.popitem(last=False)
            page = self._pages.pop(key)
            self._bytes -= len(page)
            section, index = key
            indexes = self._by_section[section]
            indexes.discard(index)
            if not indexes:
                del self._by_section[section]
            self.evictions += 1

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
