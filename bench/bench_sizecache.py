"""SizeCache costs: µs per get (hit, miss) and put, flush of 10k dirty entries, load at open.

Run from the repository root: python bench/bench_sizecache.py [ENTRIES] [BATCHES]
ENTRIES (default 100000) is the size of the stored cache that is loaded at open. Each timing is
the best of BATCHES runs (default 5), so a busy machine inflates it less. The database lives in
a temporary directory that is removed afterwards.
"""

from __future__ import annotations

import gc
import random
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from isofs.core.sizecache import NOT_FORMATTED, CachedSize, SizeCache, SizeKey, Validators

DIRTY = 10_000
LOOKUPS = 200_000
DEV = 0xFD01
EPOCH_NS = 1_700_000_000_000_000_000  # timestamps of 2023: far outside the racy window


def make_entries(count: int, seed: int) -> list[tuple[SizeKey, Validators, CachedSize]]:
    """Realistic-looking entries: random 32-bit inode numbers, ns timestamps, sizes."""
    rng = random.Random(seed)
    entries: list[tuple[SizeKey, Validators, CachedSize]] = []
    for ino in rng.sample(range(1, 1 << 32), count):
        size = rng.randrange(1 << 30)
        mtime = EPOCH_NS + rng.randrange(1 << 50)
        value: CachedSize = NOT_FORMATTED if ino % 10 == 0 else max(0, size - 4096)
        entries.append(((DEV, ino), (size, mtime, mtime + rng.randrange(1000)), value))
    return entries


def best(batches: int, run: Callable[[], float]) -> float:
    return min(run() for _ in range(batches))


def fill(path: Path, entries: list[tuple[SizeKey, Validators, CachedSize]]) -> None:
    with SizeCache(path) as cache:
        for key, validators, value in entries:
            cache.put(key, validators, value)


def bench_get_put(entries: list[tuple[SizeKey, Validators, CachedSize]], batches: int) -> None:
    cache = SizeCache(None)
    for key, validators, value in entries:
        cache.put(key, validators, value)
    # Fresh tuples, as the file system builds them from each stat (no identity shortcut).
    probes = [((k[0], k[1] + 0), tuple(list(v))) for k, v, _ in entries[: min(len(entries), 1000)]]
    misses = [((k[0] + 1, k[1]), v) for k, v in probes]
    rounds = max(1, LOOKUPS // len(probes))

    def lookups(pairs: list[tuple[SizeKey, tuple[int, ...]]]) -> Callable[[], float]:
        def run() -> float:
            get = cache.get
            start = time.perf_counter_ns()
            for _ in range(rounds):
                for key, validators in pairs:
                    get(key, validators)  # type: ignore[arg-type]
            return (time.perf_counter_ns() - start) / 1000 / (rounds * len(pairs))

        return run

    def puts() -> float:
        fresh = SizeCache(None)
        start = time.perf_counter_ns()
        for key, validators, value in entries:
            fresh.put(key, validators, value)
        return (time.perf_counter_ns() - start) / 1000 / len(entries)

    print(f"get, hit:  {best(batches, lookups(probes)):.3f} µs")
    print(f"get, miss: {best(batches, lookups(misses)):.3f} µs")
    print(f"put:       {best(batches, puts):.3f} µs")


def bench_flush(path: Path, count: int, batches: int) -> None:
    """Flush DIRTY puts (half updates of stored keys, half new keys) into a stored cache."""

    def run(seed: int) -> float:
        with SizeCache(path, max_entries=2 * count + DIRTY * batches) as cache:
            stored = make_entries(count, 1)[: DIRTY // 2]
            updates = [(k, (v[0] + seed, v[1], v[2]), val) for k, v, val in stored]
            new = [((DEV + 1 + seed, ino), v, val) for (_, ino), v, val in stored]
            for key, validators, value in updates + new:
                cache.put(key, validators, value)
            start = time.perf_counter_ns()
            written = cache.flush()
            elapsed = time.perf_counter_ns() - start
            assert written == DIRTY, written
            return elapsed / 1e6

    print(f"flush of {DIRTY} dirty entries: {min(run(s + 1) for s in range(batches)):.1f} ms")


def bench_load(path: Path, count: int, batches: int) -> None:
    def run() -> float:
        start = time.perf_counter_ns()
        cache = SizeCache(path)
        elapsed = time.perf_counter_ns() - start
        assert cache.statistics().loaded >= count, cache.statistics()
        cache.close()
        return elapsed / 1e6

    print(f"open + load of {count} entries: {best(batches, run):.1f} ms")
    gc.collect()
    tracemalloc.start()
    cache = SizeCache(path)
    used, _peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    print(f"memory: {used / cache.statistics().entries:.0f} bytes per loaded entry")
    cache.close()


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    batches = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    entries = make_entries(count, 1)
    bench_get_put(entries, batches)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "sizecache.db"
        fill(path, entries)
        print(f"database file: {path.stat().st_size / count:.0f} bytes per entry")
        bench_load(path, count, batches)
        bench_flush(path, count, batches)


if __name__ == "__main__":
    main()
