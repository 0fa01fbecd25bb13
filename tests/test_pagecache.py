"""PageCache: lookups, segmented-LRU eviction of clean pages only, dirty accounting, statistics.

The unit tests pin each rule down with a concrete scenario and check the byte accounting
(`bytes_cached`, `dirty_bytes`) after every operation; the state machine at the end drives
random operation sequences against a plain model of (contents, dirty set, both segments'
orders, counters).
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from isofs.core.pagecache import (
    DEFAULT_BUDGET,
    MIN_PAGE_SIZE,
    PageCache,
    PageCacheStatistics,
    page_size_for,
)

P = 64  # page size used by the unit tests (the cache itself is size-agnostic)


def page(fill: int, size: int = P) -> bytearray:
    return bytearray([fill]) * size


def accounting(cache: PageCache) -> tuple[int, int, int]:
    s = cache.statistics()
    return s.bytes_cached, s.dirty_bytes, s.pages


# ------------------------------------------------------------------------ page sizes


@pytest.mark.parametrize(
    ("block", "expected"),
    [
        (1, MIN_PAGE_SIZE),
        (0, MIN_PAGE_SIZE),  # nonsense block sizes are treated as byte-granular
        (-5, MIN_PAGE_SIZE),
        (512, MIN_PAGE_SIZE),
        (4096, MIN_PAGE_SIZE),
        (MIN_PAGE_SIZE, MIN_PAGE_SIZE),
        (3, 21846 * 3),  # rounded up to a multiple of the block
        (4096 + 16, 16 * (4096 + 16)),
        (MIN_PAGE_SIZE + 1, MIN_PAGE_SIZE + 1),
        (1 << 20, 1 << 20),
    ],
)
def test_page_size_for(block: int, expected: int) -> None:
    assert page_size_for(block) == expected


@pytest.mark.parametrize("block", [1, 2, 3, 7, 100, 4095, 4096, 5000, 65535, 65537, 200_000])
def test_page_size_is_smallest_multiple_of_block_at_least_min(block: int) -> None:
    size = page_size_for(block)
    assert size % block == 0
    assert size >= MIN_PAGE_SIZE
    assert size - block < MIN_PAGE_SIZE or size == block


def test_default_budget() -> None:
    assert PageCache().budget == DEFAULT_BUDGET
    assert PageCache().statistics().budget == DEFAULT_BUDGET


# -------------------------------------------------------------------------- lookups


def test_empty_cache() -> None:
    cache = PageCache(budget=10 * P)
    assert cache.statistics() == PageCacheStatistics(10 * P, 0, 0, 0, 0, 0, 0, 0)
    assert cache.statistics().hit_ratio == 0.0
    assert cache.dirty_bytes == 0
    assert not cache.over_dirty_limit()
    assert cache.dirty_indexes(1) == []
    assert not cache.has_dirty(1)


def test_put_get_peek() -> None:
    cache = PageCache(budget=10 * P)
    p = page(1)
    cache.put(1, 0, p)
    assert cache.get(1, 0) is p  # the very object: sections edit pages in place
    assert cache.peek(1, 0) is p
    assert cache.get(1, 1) is None
    assert cache.get(2, 0) is None  # sections are separate namespaces
    assert cache.peek(2, 0) is None
    s = cache.statistics()
    assert (s.hits, s.misses) == (1, 2)  # peek counts nothing
    assert accounting(cache) == (P, 0, 1)


def test_put_replaces_page_and_accounting() -> None:
    cache = PageCache(budget=10 * P)
    cache.put(1, 0, page(1))
    new = page(2, 2 * P)
    cache.put(1, 0, new)
    assert cache.peek(1, 0) is new
    assert accounting(cache) == (2 * P, 0, 1)
    # dirty replaced by clean: dirty accounting goes away
    cache.put(1, 0, page(3), dirty=True)
    assert accounting(cache) == (P, P, 1)
    assert cache.dirty_indexes(1) == [0]
    cache.put(1, 0, page(4, 3 * P))
    assert accounting(cache) == (3 * P, 0, 1)
    assert cache.dirty_indexes(1) == []
    assert not cache.has_dirty(1)
    # clean replaced by dirty
    cache.put(1, 0, page(5), dirty=True)
    assert accounting(cache) == (P, P, 1)
    # dirty replaced by dirty (a different size)
    cache.put(1, 0, page(6, 2 * P), dirty=True)
    assert accounting(cache) == (2 * P, 2 * P, 1)
    assert cache.dirty_indexes(1) == [0]


def test_hit_ratio() -> None:
    cache = PageCache(budget=10 * P)
    cache.put(1, 0, page(0))
    for _ in range(3):
        cache.get(1, 0)
    cache.get(1, 9)
    s = cache.statistics()
    assert (s.hits, s.misses) == (3, 1)
    assert s.hit_ratio == pytest.approx(0.75)
    only_misses = PageCache(budget=P)
    only_misses.get(1, 0)
    assert only_misses.statistics().hit_ratio == 0.0


def test_get_of_dirty_page_counts_hit() -> None:
    cache = PageCache(budget=10 * P)
    cache.put(1, 0, page(0), dirty=True)
    assert cache.get(1, 0) is not None
    assert cache.statistics().hits == 1


# ------------------------------------------------------------------------- eviction


def test_pages_read_once_take_at_most_half_the_budget_oldest_out_first() -> None:
    cache = PageCache(budget=4 * P)
    for i in range(2):
        cache.put(1, i, page(i))
    assert accounting(cache) == (2 * P, 0, 2)  # half the budget: nothing evicted
    cache.put(1, 2, page(2))
    assert [cache.peek(1, i) is not None for i in range(3)] == [False, True, True]
    assert accounting(cache) == (2 * P, 0, 2)
    assert cache.statistics().evictions == 1


def test_a_streaming_read_does_not_flush_pages_in_use() -> None:
    """Scan resistance: pages used twice survive any number of pages used once."""
    cache = PageCache(budget=4 * P)
    for i in range(2):
        cache.put(1, i, page(i))
        assert cache.get(1, i) is not None  # used again: protected
    for i in range(100):
        cache.put(2, i, page(i))
    assert cache.peek(1, 0) is not None and cache.peek(1, 1) is not None
    assert [i for i in range(100) if cache.peek(2, i) is not None] == [98, 99]
    assert accounting(cache) == (4 * P, 0, 4)


def test_get_protects_but_peek_does_not() -> None:
    cache = PageCache(budget=4 * P)
    cache.put(1, 0, page(0))
    cache.put(1, 1, page(1))
    cache.get(1, 0)  # protected now: 1 is the only page on probation
    cache.peek(1, 1)  # no effect
    cache.put(1, 2, page(2))
    cache.put(1, 3, page(3))  # probation holds 1, 2, 3: over its half, 1 goes
    assert cache.peek(1, 1) is None
    assert sorted(i for i in range(4) if cache.peek(1, i) is not None) == [0, 2, 3]
    assert cache.statistics().evictions == 1


def test_protected_overflow_goes_back_on_probation() -> None:
    cache = PageCache(budget=4 * P)
    for i in range(3):
        cache.put(1, i, page(i))
        cache.get(1, i)
    # three protected pages are over half the budget: the oldest (0) is demoted, not dropped
    assert accounting(cache) == (3 * P, 0, 3)
    cache.put(1, 3, page(3))
    cache.put(1, 4, page(4))  # probation (0, 3, 4) over its half: 0 goes first
    assert cache.peek(1, 0) is None
    assert sorted(i for i in range(5) if cache.peek(1, i) is not None) == [1, 2, 3, 4]
    cache.get(1, 3)  # protected: 1 is demoted in turn, to probation's newest end
    cache.put(1, 5, page(5))  # so probation (4, 1, 5) drops 4, not 1
    assert cache.peek(1, 4) is None
    assert sorted(i for i in range(6) if cache.peek(1, i) is not None) == [1, 2, 3, 5]


def test_reput_starts_again_on_probation() -> None:
    cache = PageCache(budget=4 * P)
    cache.put(1, 0, page(0))
    cache.get(1, 0)
    cache.put(1, 0, page(9))  # new contents: not proven useful yet
    cache.put(1, 1, page(1))
    cache.put(1, 2, page(2))
    assert cache.peek(1, 0) is None
    assert cache.peek(1, 2) == page(2)


def test_eviction_is_global_across_sections() -> None:
    cache = PageCache(budget=4 * P)
    cache.put(1, 0, page(0))
    cache.put(2, 0, page(1))
    cache.put(3, 0, page(2))
    assert cache.peek(1, 0) is None
    assert cache.peek(2, 0) is not None
    assert cache.peek(3, 0) is not None


def test_big_page_evicts_several() -> None:
    cache = PageCache(budget=8 * P)
    for i in range(4):
        cache.put(1, i, page(i))
    cache.put(2, 0, page(9, 3 * P))  # probation 7 pages' worth > 4: oldest go until it fits
    assert accounting(cache) == (4 * P, 0, 2)
    assert cache.statistics().evictions == 3
    assert cache.peek(1, 3) is not None


def test_page_larger_than_budget_is_evicted_itself() -> None:
    cache = PageCache(budget=P)
    cache.put(1, 0, page(0, 2 * P))
    assert cache.peek(1, 0) is None
    assert accounting(cache) == (0, 0, 0)


def test_dirty_pages_are_never_evicted() -> None:
    cache = PageCache(budget=2 * P)
    for i in range(5):
        cache.put(1, i, page(i), dirty=True)
    assert accounting(cache) == (5 * P, 5 * P, 5)  # over budget, but all dirty
    assert cache.statistics().evictions == 0
    assert cache.dirty_indexes(1) == [0, 1, 2, 3, 4]
    # a clean page put while over budget is evicted at once (it is the only candidate)
    cache.put(2, 0, page(7))
    assert cache.peek(2, 0) is None
    assert accounting(cache) == (5 * P, 5 * P, 5)
    assert cache.statistics().evictions == 1


def test_mark_dirty_protects_and_mark_clean_releases() -> None:
    cache = PageCache(budget=4 * P)
    cache.put(1, 0, page(0))
    cache.put(1, 1, page(1))
    cache.mark_dirty(1, 0)
    assert accounting(cache) == (2 * P, P, 2)
    cache.mark_dirty(1, 0)  # idempotent
    assert accounting(cache) == (2 * P, P, 2)
    for i in range(2, 6):  # probation churns; the dirty page is never a candidate
        cache.put(1, i, page(i))
    assert cache.peek(1, 0) is not None
    assert cache.peek(1, 1) is None
    assert cache.has_dirty(1)
    cache.mark_clean(1, [0])  # written back: in use, so protected
    assert not cache.has_dirty(1)
    assert accounting(cache) == (3 * P, 0, 3)
    assert cache.statistics().write_backs == 1
    for i in range(6, 10):
        cache.put(1, i, page(i))
    assert cache.peek(1, 0) is not None


def test_dropped_clean_pages_leave_their_segment() -> None:
    cache = PageCache(budget=6 * P)
    cache.put(1, 0, page(0))
    cache.put(2, 0, page(1))
    cache.put(2, 1, page(2))
    cache.drop(1)
    cache.put(3, 0, page(3))  # probation back at its half: nothing evicted
    assert cache.statistics().evictions == 0
    cache.put(3, 1, page(4))  # evicts (2, 0), the oldest remaining
    assert cache.peek(2, 0) is None
    assert cache.peek(2, 1) is not None
    assert accounting(cache) == (3 * P, 0, 3)


def test_mark_clean_evicts_when_over_budget() -> None:
    cache = PageCache(budget=2 * P)
    for i in range(4):
        cache.put(1, i, page(i), dirty=True)
    assert accounting(cache) == (4 * P, 4 * P, 4)
    cache.mark_clean(1, [0, 1, 2])
    # 0, 1, 2 became clean in that order; 0 and 1 go to get back within the budget
    assert accounting(cache) == (2 * P, P, 2)
    assert cache.peek(1, 2) is not None
    assert cache.peek(1, 3) is not None
    s = cache.statistics()
    assert (s.write_backs, s.evictions) == (3, 2)


def test_mark_clean_ignores_clean_and_unknown_indexes() -> None:
    cache = PageCache(budget=10 * P)
    cache.put(1, 0, page(0))
    cache.put(1, 1, page(1), dirty=True)
    cache.mark_clean(1, [0, 1, 7])
    cache.mark_clean(2, [0])  # section without dirty pages
    assert cache.statistics().write_backs == 1
    assert accounting(cache) == (2 * P, 0, 2)


def test_dirty_indexes_sorted_per_section() -> None:
    cache = PageCache(budget=100 * P)
    for i in (5, 1, 3):
        cache.put(1, i, page(i), dirty=True)
    cache.put(2, 2, page(2), dirty=True)
    cache.put(1, 4, page(4))
    assert cache.dirty_indexes(1) == [1, 3, 5]
    assert cache.dirty_indexes(2) == [2]
    assert cache.dirty_indexes(3) == []


def test_a_dirty_page_remembers_the_span_its_writes_covered() -> None:
    cache = PageCache(budget=100 * P)
    cache.put(1, 0, page(0), dirty=True, span=(100, 200))
    cache.mark_dirty(1, 0, (50, 120))  # the union of the writes, one range
    assert cache.dirty_span(1, 0) == (50, 200)
    cache.put(1, 1, page(1))
    cache.mark_dirty(1, 1, (7, 8))
    assert cache.dirty_span(1, 1) == (7, 8)
    cache.put(1, 2, page(2), dirty=True)  # no span given: the whole page
    assert cache.dirty_span(1, 2) == (0, P)
    cache.mark_clean(1, [0, 1, 2])
    cache.mark_dirty(1, 0, (3, 4))  # clean again: a new span, not the old union
    assert cache.dirty_span(1, 0) == (3, 4)
    cache.check_invariants()


# ---------------------------------------------------------------------------- drop


def test_drop_from_index_includes_dirty() -> None:
    cache = PageCache(budget=100 * P)
    for i in range(6):
        cache.put(1, i, page(i), dirty=i % 2 == 0)
    cache.put(2, 0, page(9), dirty=True)
    assert accounting(cache) == (7 * P, 4 * P, 7)
    cache.drop(1, 3)
    assert [cache.peek(1, i) is not None for i in range(6)] == [True] * 3 + [False] * 3
    assert cache.dirty_indexes(1) == [0, 2]
    assert accounting(cache) == (4 * P, 3 * P, 4)
    cache.drop(1, 10)  # nothing there
    assert accounting(cache) == (4 * P, 3 * P, 4)
    cache.drop(1)
    assert accounting(cache) == (P, P, 1)
    assert not cache.has_dirty(1)
    assert cache.dirty_indexes(2) == [0]
    cache.drop(1)  # section without pages
    cache.drop(42, 0)
    assert accounting(cache) == (P, P, 1)
    # dropped pages count neither as evictions nor as write-backs
    s = cache.statistics()
    assert (s.evictions, s.write_backs) == (0, 0)


def test_drop_then_repopulate_section() -> None:
    cache = PageCache(budget=10 * P)
    cache.put(1, 0, page(0), dirty=True)
    cache.drop(1)
    cache.put(1, 0, page(1), dirty=True)
    cache.mark_clean(1, [0])
    assert accounting(cache) == (P, 0, 1)
    assert cache.statistics().write_backs == 1


# ------------------------------------------------------------------------ pressure


def test_over_dirty_limit_is_more_than_half_the_budget() -> None:
    cache = PageCache(budget=4 * P)
    cache.put(1, 0, page(0), dirty=True)
    cache.put(1, 1, page(1), dirty=True)
    assert cache.dirty_bytes == 2 * P
    assert not cache.over_dirty_limit()  # exactly half
    cache.put(2, 0, page(2, 1), dirty=True)
    assert cache.over_dirty_limit()
    cache.mark_clean(2, [0])
    assert not cache.over_dirty_limit()
    cache.put(2, 0, page(2, 1), dirty=True)
    cache.drop(2)
    assert not cache.over_dirty_limit()


def test_statistics_snapshot_is_frozen() -> None:
    cache = PageCache(budget=10 * P)
    before = cache.statistics()
    cache.put(1, 0, page(0))
    cache.get(1, 0)
    assert before.pages == 0 and before.hits == 0
    with pytest.raises(AttributeError):
        before.hits = 5  # type: ignore[misc]


# ------------------------------------------------------------------ model checking


class Model:
    """What the cache should hold: pages, dirty set, the two clean segments, counters."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.pages: dict[tuple[int, int], bytearray] = {}
        self.dirty: set[tuple[int, int]] = set()
        self.probation: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.protected: OrderedDict[tuple[int, int], None] = OrderedDict()
        self.hits = self.misses = self.evictions = self.write_backs = 0

    @property
    def bytes(self) -> int:
        return sum(len(p) for p in self.pages.values())

    @property
    def dirty_bytes(self) -> int:
        return sum(len(self.pages[k]) for k in self.dirty)

    def size_of(self, segment: OrderedDict[tuple[int, int], None]) -> int:
        return sum(len(self.pages[k]) for k in segment)

    def drop_key(self, key: tuple[int, int]) -> None:
        del self.pages[key]
        self.evictions += 1

    def evict(self, newest: tuple[int, int] | None = None) -> None:
        half = self.budget // 2
        while self.size_of(self.protected) > self.budget - half and len(self.protected) > 1:
            key, _ = self.protected.popitem(last=False)
            self.probation[key] = None
        while self.size_of(self.probation) > half and len(self.probation) > 1:
            self.drop_key(self.probation.popitem(last=False)[0])
        while self.bytes > self.budget and (self.probation or self.protected):
            if self.protected and next(iter(self.probation), None) == newest:  # a new page gets in
                self.drop_key(self.protected.popitem(last=False)[0])
            else:
                self.drop_key((self.probation or self.protected).popitem(last=False)[0])

    def unlist(self, key: tuple[int, int]) -> None:
        self.probation.pop(key, None)
        self.protected.pop(key, None)

    def put(self, key: tuple[int, int], data: bytearray, dirty: bool) -> None:
        self.unlist(key)
        self.dirty.discard(key)
        self.pages[key] = data
        if dirty:
            self.dirty.add(key)
        else:
            self.probation[key] = None
        self.evict(newest=key)

    def get(self, key: tuple[int, int]) -> bytearray | None:
        if key not in self.pages:
            self.misses += 1
            return None
        self.hits += 1
        page = self.pages[key]
        if key in self.protected:
            self.protected.move_to_end(key)
        elif key in self.probation:
            del self.probation[key]
            self.protected[key] = None
            self.evict()
        return page

    def mark_dirty(self, key: tuple[int, int]) -> None:
        self.unlist(key)
        self.dirty.add(key)

    def mark_clean(self, section: int, indexes: list[int]) -> None:
        for index in indexes:
            key = (section, index)
            if key in self.dirty:
                self.dirty.discard(key)
                self.protected[key] = None
                self.write_backs += 1
        self.evict()

    def drop(self, section: int, from_index: int) -> None:
        for key in [k for k in self.pages if k[0] == section and k[1] >= from_index]:
            del self.pages[key]
            self.dirty.discard(key)
            self.unlist(key)


SECTIONS = st.integers(1, 3)
INDEXES = st.integers(0, 5)


class PageCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.budget = 0
        self.cache: PageCache | None = None
        self.model: Model | None = None
        self.fill = 0

    @precondition(lambda self: self.cache is None)
    @rule(budget=st.integers(0, 40))
    def start(self, budget: int) -> None:
        self.cache = PageCache(budget=budget)
        self.model = Model(budget)

    def _new_page(self, size: int) -> bytearray:
        self.fill = (self.fill + 1) % 256
        return bytearray([self.fill]) * size

    @precondition(lambda self: self.cache is not None)
    @rule(section=SECTIONS, index=INDEXES, size=st.integers(0, 12), dirty=st.booleans())
    def put(self, section: int, index: int, size: int, dirty: bool) -> None:
        data = self._new_page(size)
        self.cache.put(section, index, data, dirty=dirty)
        self.model.put((section, index), data, dirty)

    @precondition(lambda self: self.cache is not None)
    @rule(section=SECTIONS, index=INDEXES)
    def get(self, section: int, index: int) -> None:
        got = self.cache.get(section, index)
        expected = self.model.get((section, index))
        assert got is expected

    @precondition(lambda self: self.cache is not None)
    @rule(section=SECTIONS, index=INDEXES)
    def peek(self, section: int, index: int) -> None:
        assert self.cache.peek(section, index) is self.model.pages.get((section, index))

    @precondition(lambda self: self.cache is not None and self.model.pages)
    @rule(data=st.data())
    def mark_dirty(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model.pages)))
        self.cache.mark_dirty(*key)
        self.model.mark_dirty(key)

    @precondition(lambda self: self.cache is not None)
    @rule(section=SECTIONS, indexes=st.lists(INDEXES, max_size=4), all_dirty=st.booleans())
    def mark_clean(self, section: int, indexes: list[int], all_dirty: bool) -> None:
        if all_dirty:  # what a write-back does
            indexes = self.cache.dirty_indexes(section)
        self.cache.mark_clean(section, indexes)
        self.model.mark_clean(section, indexes)

    @precondition(lambda self: self.cache is not None)
    @rule(section=SECTIONS, from_index=st.integers(0, 6))
    def drop(self, section: int, from_index: int) -> None:
        self.cache.drop(section, from_index)
        self.model.drop(section, from_index)

    @invariant()
    def agrees_with_model(self) -> None:
        if self.cache is None:
            return
        m = self.model
        s = self.cache.statistics()
        assert s.bytes_cached == m.bytes
        assert s.dirty_bytes == m.dirty_bytes == self.cache.dirty_bytes
        assert s.pages == len(m.pages)
        assert (s.hits, s.misses, s.evictions, s.write_backs) == (
            m.hits,
            m.misses,
            m.evictions,
            m.write_backs,
        )
        assert self.cache.over_dirty_limit() == (m.dirty_bytes > m.budget // 2)
        for section in (1, 2, 3):
            expected = sorted(i for (sec, i) in m.dirty if sec == section)
            assert self.cache.dirty_indexes(section) == expected
            assert self.cache.has_dirty(section) == bool(expected)
        for key, data in m.pages.items():
            assert self.cache.peek(*key) is data
        # within budget unless only dirty pages remain to blame
        assert s.bytes_cached <= m.budget or not (m.probation or m.protected)


PageCacheMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=40, deadline=None
)
test_page_cache_against_model = PageCacheMachine.TestCase
