"""A stand-in for the embedded chunk store (`EmbeddedStore(directory, *, key=None, level=3,
pack_size=...)`): chunks zlib-compressed in one SQLite database in WAL mode, shared safely by
the daemon and `isofs gc` running at once. Not the real format (no packs): only what the
mounted tests of the layer need until the real store is merged.
"""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from isofs.provider import CorruptData
from isofs_providers.dedup.store.base import ChunkStore, GarbageReport, MissingChunk


class EmbeddedStore(ChunkStore):
    def __init__(
        self, directory: Path, *, key: bytes | None = None, level: int = 3, pack_size: int = 0
    ) -> None:
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.key = key
        self.level = min(9, max(1, level))
        self._db = sqlite3.connect(
            directory / "stand-in.db", timeout=60, isolation_level=None, check_same_thread=False
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("CREATE TABLE IF NOT EXISTS chunks (id BLOB PRIMARY KEY, data BLOB, "
                         "size INT, refs INT, gen INT)")
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v INT)")
        self._db.execute("INSERT OR IGNORE INTO meta VALUES ('gen', 0)")
        self._lock = threading.RLock()
        self._open = False

    def _begin(self) -> None:
        if not self._open:
            self._db.execute("BEGIN IMMEDIATE")
            self._open = True

    def _gen(self) -> int:
        return self._db.execute("SELECT v FROM meta WHERE k='gen'").fetchone()[0]

    def chunk_id(self, content: bytes | memoryview) -> bytes:
        if self.key is not None:
            return hmac.new(self.key, content, hashlib.sha256).digest()
        return hashlib.sha256(content).digest()

    def has(self, ids: Sequence[bytes]) -> list[bool]:
        with self._lock:
            return [self._db.execute("SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone()
                    is not None for cid in ids]

    def get(self, chunk_id: bytes) -> bytes:
        with self._lock:
            row = self._db.execute("SELECT data FROM chunks WHERE id=?", (chunk_id,)).fetchone()
        if row is None:
            raise MissingChunk(f"chunk {chunk_id.hex()[:16]} is not in the store")
        try:
            data = zlib.decompress(row[0])
        except zlib.error:
            raise CorruptData(f"chunk {chunk_id.hex()[:16]}: damaged") from None
        if self.chunk_id(data) != chunk_id:
            raise CorruptData(f"chunk {chunk_id.hex()[:16]} fails verification")
        return data

    def put(self, chunks: Sequence[tuple[bytes, bytes | memoryview]]) -> None:
        with self._lock:
            self._begin()
            gen = self._gen()
            for cid, content in chunks:
                self._db.execute("UPDATE chunks SET gen=? WHERE id=?", (gen, cid))
                self._db.execute(
                    "INSERT OR IGNORE INTO chunks VALUES (?, ?, ?, 0, ?)",
                    (cid, zlib.compress(bytes(content), self.level), len(content), gen),
                )

    def reference(self, added: Iterable[bytes], removed: Iterable[bytes]) -> None:
        with self._lock:
            self._begin()
            gen = self._gen()
            for cid in added:
                self._db.execute("UPDATE chunks SET refs=refs+1, gen=? WHERE id=?", (gen, cid))
            for cid in removed:
                self._db.execute("UPDATE chunks SET refs=refs-1 WHERE id=?", (cid,))

    def commit(self) -> None:
        with self._lock:
            if self._open:
                self._db.execute("COMMIT")
                self._open = False

    def collect_garbage(
        self, live: Iterable[bytes], progress: Callable[[int], Any], *,
        repack_dead_share: float = 0.3,
    ) -> GarbageReport:
        with self._lock:
            self.commit()
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("UPDATE meta SET v=v+1 WHERE k='gen'")
            start = self._gen()
            self._db.execute("COMMIT")
        marked = set()
        for cid in live:
            marked.add(cid)
            progress(1)
        report = GarbageReport()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            rows = self._db.execute("SELECT id, length(data) FROM chunks WHERE gen < ?",
                                    (start,)).fetchall()
            for cid, stored in rows:
                if cid not in marked:
                    self._db.execute("DELETE FROM chunks WHERE id=?", (cid,))
                    report.chunks_freed += 1
                    report.bytes_freed += stored
            report.live_chunks = self._db.execute("SELECT count(*) FROM chunks").fetchone()[0]
            report.missing = [cid for cid in marked if self._db.execute(
                "SELECT 1 FROM chunks WHERE id=?", (cid,)).fetchone() is None]
            self._db.execute("COMMIT")
        return report

    def statistics(self) -> dict[str, Any]:
        with self._lock:
            chunks, stored, logical = self._db.execute(
                "SELECT count(*), coalesce(sum(length(data)), 0), coalesce(sum(size), 0) "
                "FROM chunks").fetchone()
            dead = self._db.execute("SELECT coalesce(sum(length(data)), 0) FROM chunks "
                                    "WHERE refs <= 0").fetchone()[0]
        return {"chunks": chunks, "packs": 1 if chunks else 0, "stored_bytes": stored,
                "logical_bytes": logical, "dead_bytes": dead, "stand_in": True}

    def reconcile_references(self, counts: Mapping[bytes, int]) -> int:
        with self._lock:
            self._begin()
            changed = 0
            for cid, refs in self._db.execute("SELECT id, refs FROM chunks").fetchall():
                want = counts.get(cid, 0)
                if refs != want:
                    self._db.execute("UPDATE chunks SET refs=? WHERE id=?", (want, cid))
                    changed += 1
            self.commit()
            return changed

    def close(self) -> None:
        with self._lock:
            self.commit()
            self._db.close()
