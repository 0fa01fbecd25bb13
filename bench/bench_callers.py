"""Microseconds per CallerResolver.resolve(): cold (cache miss) and warm (cache hit).

Run from the repository root: python bench/bench_callers.py [BATCHES]
Each figure is the best batch, so a busy machine inflates it less.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from isofs.views.callers import CallerResolver

CHILDREN = 4
PER_BATCH = 50


def cold(pids: list[int]) -> float:
    """µs per resolve with an empty cache (every call reads /proc)."""
    with CallerResolver() as resolver:
        start = time.perf_counter_ns()
        for _ in range(PER_BATCH):
            resolver.clear()
            for pid in pids:
                resolver.resolve(pid, 0, 0)
        elapsed = time.perf_counter_ns() - start
    return elapsed / 1000 / (PER_BATCH * len(pids))


def warm(pids: list[int]) -> float:
    """µs per resolve of already cached processes (the one-syscall check)."""
    with CallerResolver() as resolver:
        for pid in pids:
            resolver.resolve(pid, 0, 0)
        start = time.perf_counter_ns()
        for _ in range(PER_BATCH * 20):
            for pid in pids:
                resolver.resolve(pid, 0, 0)
        elapsed = time.perf_counter_ns() - start
        assert resolver.statistics().misses == len(pids), "the warm loop must only hit"
    return elapsed / 1000 / (PER_BATCH * 20 * len(pids))


def main() -> None:
    batches = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    sleep = shutil.which("sleep") or "sleep"
    children = [subprocess.Popen([sleep, "600"]) for _ in range(CHILDREN)]
    try:
        for label, pids in (
            ("self", [os.getpid()]),
            (f"{CHILDREN} children", [c.pid for c in children]),
        ):
            best_cold = min(cold(pids) for _ in range(batches))
            best_warm = min(warm(pids) for _ in range(batches))
            print(f"{label:12s} cold {best_cold:7.1f} µs/resolve  warm {best_warm:4.1f} µs/resolve")
    finally:
        for c in children:
            os.kill(c.pid, signal.SIGKILL)
            c.wait()


if __name__ == "__main__":
    main()
