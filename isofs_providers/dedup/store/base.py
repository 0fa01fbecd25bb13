"""The chunk store interface the dedup layer uses (see docs/FORMAT-dedup.md).

A chunk is identified by its id, a 32-byte hash of its content (SHA-256, or a keyed hash when
the store is encrypted, so ids reveal nothing about known content). Stores keep chunks
compressed (and, when encrypted, authenticated-encrypted) in append-only pack files, with an
on-disk index chunk id -> (pack, offset, length, refcount); no store keeps all of its index in
memory.

Durability order (what a crash may leave): chunk data is durable before its index row, and the
index row before any manifest that refers to it is written (`commit` returns only when both are
durable). Reference counts are advisory bookkeeping for statistics and gc's fast path; the truth
is the set of manifests, so `collect_garbage` marks from every manifest it is given, and a chunk
referenced by a writer since the collection began (`reference` or `put`) is never freed by it.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from isofs.provider import CorruptData

CHUNK_ID_SIZE = 32


class MissingChunk(CorruptData):
    """A manifest refers to a chunk the store does not have (or cannot reach now)."""


@dataclass
class GarbageReport:
    """What a garbage collection did."""

    chunks_freed: int = 0
    bytes_freed: int = 0
    packs_rewritten: int = 0
    packs_deleted: int = 0
    live_chunks: int = 0
    #: Chunk ids some manifest refers to that the store does not have.
    missing: list[bytes] = field(default_factory=list)


class ChunkStore(abc.ABC):
    """Where a dedup source's chunks live. Methods are blocking and thread-safe."""

    #: True when calls may wait on the network (the core then keeps them off the event loop).
    io_bound: bool = False

    @abc.abstractmethod
    def chunk_id(self, content: bytes | memoryview) -> bytes:
        """The id of a chunk's content (32 bytes)."""

    @abc.abstractmethod
    def has(self, ids: Sequence[bytes]) -> list[bool]:
        """Whether each chunk is stored (one index query for all)."""

    @abc.abstractmethod
    def get(self, chunk_id: bytes) -> bytes:
        """A chunk's content, verified against its id; MissingChunk or CorruptData otherwise."""

    @abc.abstractmethod
    def put(self, chunks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        """Store (id, content) pairs whose ids the store does not have yet (others are only
        referenced). Not durable until `commit`."""

    @abc.abstractmethod
    def reference(self, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        """Count references gained and lost by a manifest change (ids may repeat). Protects
        `added` from a garbage collection running now."""

    @abc.abstractmethod
    def commit(self) -> None:
        """Make every `put` and `reference` so far durable (packs fsynced, then the index)."""

    @abc.abstractmethod
    def collect_garbage(
        self,
        live: Iterable[bytes],
        progress: Callable[[int], Any],
        *,
        repack_dead_share: float = 0.3,
    ) -> GarbageReport:
        """Free chunks no id in `live` names (except those referenced since it began), and
        rewrite packs whose dead share exceeds `repack_dead_share`."""

    @abc.abstractmethod
    def statistics(self) -> dict[str, Any]:
        """Chunks, packs, stored bytes, dead bytes awaiting gc, upload backlog (plain data)."""

    def close(self) -> None:
        """Commit and release files, connections and threads."""
        self.commit()
