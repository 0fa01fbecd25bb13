"""The chunk index: SQLite in WAL mode (docs/FORMAT-dedup.md, "Index").

One connection per thread (SQLite connections are not shared), a busy timeout so the daemon
and `isofs gc` may both write, synchronous=FULL so a committed transaction is durable when
`commit` returns. Nothing is cached in memory: every question is a query.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from isofs.provider import CorruptData

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000
#: Parameters per IN (...) query: well under SQLite's limit.
BATCH = 900

OPEN, SEALED, UPLOADED, DELETING = "open", "sealed", "uploaded", "deleting"

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS packs (
    num INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL DEFAULT 0,
    live_bytes INTEGER NOT NULL DEFAULT 0,
    dead_bytes INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    pack INTEGER NOT NULL,
    offset INTEGER NOT NULL,
    length INTEGER NOT NULL,
    size INTEGER NOT NULL,
    refcount INTEGER NOT NULL DEFAULT 0,
    generation INTEGER NOT NULL DEFAULT 0,
    referenced_at REAL NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks (pack);
"""


@dataclass(frozen=True)
class Location:
    """Where a chunk's record is: pack number and name, offset and record length."""

    pack: int
    pack_name: str
    offset: int
    length: int
    size: int
    state: str


@dataclass(frozen=True)
class PackRow:
    num: int
    name: str
    size: int
    live_bytes: int
    dead_bytes: int
    state: str


class Index:
    """The on-disk index of one store (thread-safe: a connection per thread)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_lock = threading.Lock()
        db = self.connection()
        try:
            db.executescript(SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise CorruptData(f"chunk index {path}: {exc}") from None
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
            db.execute("INSERT OR IGNORE INTO meta VALUES ('generation', 0)")
        version = self.get_meta("schema")
        if version != SCHEMA_VERSION:
            raise CorruptData(f"chunk index {path}: schema version {version} is not supported")

    def connection(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                check_same_thread=False,
            )  # fmt: skip
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = FULL")
            db.execute("PRAGMA temp_store = FILE")
            self._local.db = db
            with self._all_lock:
                self._all.append(db)
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT (durable on return), ROLLBACK on an exception."""
        db = self.connection()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def close(self) -> None:
        with self._all_lock:
            for db in self._all:
                with contextlib.suppress(sqlite3.Error):
                    db.close()
            self._all.clear()
        self._local = threading.local()

    # ------------------------------------------------------------------ meta

    def get_meta(self, key: str) -> object:
        row = self.connection().execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, db: sqlite3.Connection, key: str, value: object) -> None:
        db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def generation(self) -> int:
        return int(self.get_meta("generation") or 0)

    # ------------------------------------------------------------------ chunks

    def present(self, ids: Sequence[bytes]) -> set[bytes]:
        """Which of `ids` have a row (one query per BATCH ids)."""
        db = self.connection()
        found: set[bytes] = set()
        for start in range(0, len(ids), BATCH):
            part = ids[start : start + BATCH]
            marks = ",".join("?" * len(part))
            found.update(
                row[0] for row in db.execute(f"SELECT id FROM chunks WHERE id IN ({marks})", part)
            )
        return found

    def locate(self, chunk_id: bytes) -> Location | None:
        row = self.connection().execute(
            "SELECT c.pack, p.name, c.offset, c.length, c.size, p.state "
            "FROM chunks c JOIN packs p ON p.num = c.pack WHERE c.id = ?",
            (chunk_id,),
        ).fetchone()
        return Location(*row) if row else None

    # ------------------------------------------------------------------ packs

    def add_pack(self, name: str, state: str, size: int = 0) -> int:
        with self.transaction() as db:
            cursor = db.execute(
                "INSERT INTO packs (name, size, state) VALUES (?, ?, ?)", (name, size, state)
            )
            return int(cursor.lastrowid or 0)

    def pack(self, num: int) -> PackRow | None:
        row = self.connection().execute(
            "SELECT num, name, size, live_bytes, dead_bytes, state FROM packs WHERE num = ?",
            (num,),
        ).fetchone()
        return PackRow(*row) if row else None

    def pack_by_name(self, name: str) -> PackRow | None:
        row = self.connection().execute(
            "SELECT num, name, size, live_bytes, dead_bytes, state FROM packs WHERE name = ?",
            (name,),
        ).fetchone()
        return PackRow(*row) if row else None

    def packs(self, *states: str) -> list[PackRow]:
        db = self.connection()
        if states:
            marks = ",".join("?" * len(states))
            rows = db.execute(
                "SELECT num, name, size, live_bytes, dead_bytes, state FROM packs "
                f"WHERE state IN ({marks}) ORDER BY num",
                states,
            )
        else:
            rows = db.execute(
                "SELECT num, name, size, live_bytes, dead_bytes, state FROM packs ORDER BY num"
            )
        return [PackRow(*row) for row in rows]

    def set_pack_state(self, num: int, state: str) -> None:
        with self.transaction() as db:
            db.execute("UPDATE packs SET state = ? WHERE num = ?", (state, num))

    def seal_pack(self, num: int, size: int, record_bytes: int, state: str = SEALED) -> None:
        """A pack is sealed at `size`; record bytes no chunk row claims are dead."""
        with self.transaction() as db:
            db.execute(
                "UPDATE packs SET state = ?, size = ?, dead_bytes = ? - live_bytes WHERE num = ?",
                (state, size, record_bytes, num),
            )

    def delete_pack(self, num: int) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM packs WHERE num = ?", (num,))

    def chunks_in(self, num: int) -> list[tuple[bytes, int, int]]:
        """(id, offset, length) of a pack's indexed chunks, in pack order."""
        return [
            (bytes(row[0]), row[1], row[2])
            for row in self.connection().execute(
                "SELECT id, offset, length FROM chunks WHERE pack = ? ORDER BY offset", (num,)
            )
        ]

    def chunk_count_in(self, num: int) -> int:
        row = self.connection().execute(
            "SELECT count(*) FROM chunks WHERE pack = ?", (num,)
        ).fetchone()
        return int(row[0])
