"""What the dedup tests share: a real `ChunkStore` over dicts, and a file over a bytearray.

`MemoryStore` implements the whole interface of `isofs_providers.dedup.store.base` (it is not
a mock: ids are hashes of the content, `get` verifies them, refcounts and the collection's
generations are kept as a store must), with one addition for crash tests: `crash()` forgets
everything not committed, as a killed process would.
"""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from isofs.provider import CorruptData
from isofs_providers.dedup.store.base import ChunkStore, GarbageReport, MissingChunk


class MemoryStore(ChunkStore):
    """Chunks in a dict; `commit` is what makes puts and references survive `crash()`."""

    def __init__(self, key: bytes | None = None) -> None:
        self.key = key
        self.chunks: dict[bytes, bytes] = {}
        self.refs: Counter[bytes] = Counter()
        self._staged: dict[bytes, bytes] = {}
        self._staged_refs: Counter[bytes] = Counter()
        self._generation = 0
        self._last_use: dict[bytes, int] = {}
        self._lock = threading.RLock()
        self.calls: list[str] = []
        self.closed = False

    def chunk_id(self, content: bytes | memoryview) -> bytes:
        if self.key is not None:
            return hmac.new(self.key, content, hashlib.sha256).digest()
        return hashlib.sha256(content).digest()

    def has(self, ids: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [cid in self.chunks or cid in self._staged for cid in ids]

    def get(self, chunk_id: bytes) -> bytes:
        with self._lock:
            data = self._staged.get(chunk_id, self.chunks.get(chunk_id))
        if data is None:
            raise MissingChunk(f"chunk {chunk_id.hex()[:16]} is not in the store")
        if self.chunk_id(data) != chunk_id:
            raise CorruptData(f"chunk {chunk_id.hex()[:16]} fails verification")
        return data

    def put(self, chunks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        with self._lock:
            self.calls.append("put")
            for cid, content in chunks:
                self._last_use[cid] = self._generation
                if cid not in self.chunks and cid not in self._staged:
                    self._staged[cid] = bytes(content)

    def reference(self, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        with self._lock:
            self.calls.append("reference")
            for cid in added:
                self._staged_refs[cid] += 1
                self._last_use[cid] = self._generation
            for cid in removed:
                self._staged_refs[cid] -= 1

    def commit(self) -> None:
        with self._lock:
            self.calls.append("commit")
            self.chunks.update(self._staged)
            self._staged.clear()
            self.refs.update(self._staged_refs)
            self._staged_refs.clear()

    def crash(self) -> None:
        """What a killed process leaves: the committed state only."""
        with self._lock:
            self._staged.clear()
            self._staged_refs.clear()

    def collect_garbage(
        self,
        live: Iterable[bytes],
        progress: Callable[[int], Any],
        *,
        repack_dead_share: float = 0.3,
    ) -> GarbageReport:
        with self._lock:
            self._generation += 1
            start = self._generation
        marked: set[bytes] = set()
        for cid in live:  # consumed after the start is taken, as the interface needs
            marked.add(cid)
            progress(1)
        report = GarbageReport()
        with self._lock:
            for cid in list(self.chunks):
                if cid not in marked and self._last_use.get(cid, -1) < start:
                    report.chunks_freed += 1
                    report.bytes_freed += len(self.chunks.pop(cid))
                    self.refs.pop(cid, None)
            report.live_chunks = len(self.chunks)
            report.missing = sorted(cid for cid in marked if cid not in self.chunks)
        return report

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            dead = sum(len(d) for cid, d in self.chunks.items() if self.refs[cid] <= 0)
            return {
                "chunks": len(self.chunks),
                "packs": 1 if self.chunks else 0,
                "stored_bytes": self.stored_bytes,
                "dead_bytes": dead,
            }

    @property
    def stored_bytes(self) -> int:
        with self._lock:
            return sum(len(d) for d in self.chunks.values()) + sum(
                len(d) for d in self._staged.values()
            )

    def reconcile_references(self, counts: Mapping[bytes, int]) -> int:
        """Set every refcount to what the manifests say; the number of rows changed."""
        with self._lock:
            changed = 0
            for cid in set(self.chunks) | set(self.refs):
                want = counts.get(cid, 0)
                if self.refs.get(cid, 0) != want:
                    self.refs[cid] = want
                    changed += 1
            return changed

    def close(self) -> None:
        self.commit()
        self.closed = True
