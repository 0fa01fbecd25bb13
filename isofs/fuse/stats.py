"""Per-request counts, latencies and the slowest operations, for `isofs status`.

Recording costs two clock reads and a dict update per request; the slowest-operations list is
only touched when a request is slower than the fastest one it already holds.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class OperationStats:
    count: int = 0
    errors: int = 0
    total_s: float = 0.0
    max_s: float = 0.0

    def as_dict(self) -> dict[str, float]:
        mean_us = self.total_s / self.count * 1e6 if self.count else 0.0
        return {
            "count": self.count,
            "errors": self.errors,
            "mean_us": round(mean_us, 1),
            "total_us": round(self.total_s * 1e6, 1),
            "max_us": round(self.max_s * 1e6, 1),
        }


@dataclass
class RequestStats:
    #: Turns a request's arguments into text, only for requests kept as the slowest.
    describe: Callable[[tuple[Any, ...]], str] = repr
    keep_slowest: int = 10
    operations: dict[str, OperationStats] = field(default_factory=dict)
    _slowest: list[tuple[float, str, str]] = field(default_factory=list)

    def record(self, name: str, seconds: float, failed: bool, args: tuple[Any, ...]) -> None:
        stats = self.operations.get(name)
        if stats is None:
            stats = self.operations[name] = OperationStats()
        stats.count += 1
        stats.total_s += seconds
        if failed:
            stats.errors += 1
        if seconds > stats.max_s:
            stats.max_s = seconds
        if len(self._slowest) < self.keep_slowest:
            heapq.heappush(self._slowest, (seconds, name, self.describe(args[:2])[:120]))
        elif seconds > self._slowest[0][0]:
            heapq.heapreplace(self._slowest, (seconds, name, self.describe(args[:2])[:120]))

    def snapshot(self) -> dict[str, object]:
        return {
            "operations": {k: v.as_dict() for k, v in sorted(self.operations.items())},
            "slowest": [
                {"op": name, "us": round(s * 1e6, 1), "args": detail}
                for s, name, detail in sorted(self._slowest, reverse=True)
            ],
        }
