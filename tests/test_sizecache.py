"""SizeCache: validation, persistence, recovery from bad files, threads, pruning."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from isofs.core.sizecache import (
    DB_FILE_NAME,
    NOT_FORMATTED,
    SCHEMA_VERSION,
    SizeCache,
    SizeKey,
    Validators,
    logical_size,
)

OLD_NS = 1_600_000_000_123_456_789  # a 2020 timestamp, far outside the racy window
KEY: SizeKey = (64769, 1234)
VALID: Validators = (10_000, OLD_NS, OLD_NS + 5)


def key(n: int) -> SizeKey:
    return (64769, 1000 + n)


def valid(n: int) -> Validators:
    return (4096 + n, OLD_NS + n, OLD_NS + n)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / DB_FILE_NAME


@pytest.fixture
def cache(db: Path) -> Iterator[SizeCache]:
    with SizeCache(db) as c:
        yield c


def stored_rows(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM sizes").fetchone()[0]
    finally:
        conn.close()


# -- lookups -------------------------------------------------------------------------------


def test_miss_then_hit(cache: SizeCache) -> None:
    assert cache.get(KEY, VALID) is None
    cache.put(KEY, VALID, 9_000)
    assert cache.get(KEY, VALID) == 9_000
    # Equal but distinct tuples, as built from a fresh stat, hit too.
    assert cache.get((KEY[0], KEY[1]), tuple(list(VALID))) == 9_000  # type: ignore[arg-type]
    assert cache.get((KEY[0], KEY[1] + 1), VALID) is None
    stats = cache.statistics()
    assert (stats.hits, stats.misses, stats.entries, stats.pending) == (2, 2, 1, 1)


def test_zero_is_a_hit_not_a_miss(cache: SizeCache) -> None:
    cache.put(KEY, VALID, 0)
    assert cache.get(KEY, VALID) == 0
    assert cache.get(KEY, VALID) is not None


@pytest.mark.parametrize(
    "changed",
    [
        (VALID[0] + 1, VALID[1], VALID[2]),  # size
        (VALID[0], VALID[1] + 1, VALID[2]),  # mtime
        (VALID[0], VALID[1], VALID[2] + 1),  # ctime
    ],
)
def test_changed_validators_miss_and_drop_the_entry(
    db: Path, cache: SizeCache, changed: Validators
) -> None:
    cache.put(KEY, VALID, 9_000)
    cache.flush()
    assert stored_rows(db) == 1
    assert cache.get(KEY, changed) is None
    stats = cache.statistics()
    assert (stats.stale_drops, stats.misses, stats.entries) == (1, 1, 0)
    # Dropped, not just skipped: the old validators do not bring it back...
    assert cache.get(KEY, VALID) is None
    assert cache.statistics().stale_drops == 1
    # ...and the drop reaches the file.
    cache.flush()
    assert stored_rows(db) == 0


def test_hard_links_share_one_entry(tmp_path: Path, cache: SizeCache) -> None:
    first = tmp_path / "a"
    first.write_bytes(b"x" * 100)
    os.link(first, tmp_path / "b")
    st_a = os.stat(first)
    st_b = os.stat(tmp_path / "b")
    key_a = (st_a.st_dev, st_a.st_ino)
    key_b = (st_b.st_dev, st_b.st_ino)
    assert key_a == key_b
    # Timestamps of a just-written file are racy; the test is about keys, so opt out.
    racy_ok = SizeCache(None, racy_window_ns=0)
    for c in (cache, racy_ok):
        c.put(key_a, (st_a.st_size, st_a.st_mtime_ns, st_a.st_ctime_ns), 60)
    assert racy_ok.get(key_b, (st_b.st_size, st_b.st_mtime_ns, st_b.st_ctime_ns)) == 60
    assert racy_ok.statistics().entries == 1


def test_put_replaces_and_forget_removes(db: Path, cache: SizeCache) -> None:
    cache.put(KEY, VALID, 1)
    cache.put(KEY, VALID, 2)
    assert cache.get(KEY, VALID) == 2
    assert cache.statistics().entries == 1
    cache.flush()
    cache.forget(KEY)
    cache.forget((1, 1))  # unknown: no effect
    assert cache.get(KEY, VALID) is None
    cache.flush()
    assert stored_rows(db) == 0


def test_not_formatted_marker(db: Path) -> None:
    with SizeCache(db) as cache:
        cache.put(KEY, VALID, NOT_FORMATTED)
        assert cache.get(KEY, VALID) is NOT_FORMATTED
    with SizeCache(db) as cache:
        cached = cache.get(KEY, VALID)
        assert cached is NOT_FORMATTED
        assert logical_size(cached, VALID[0]) == VALID[0]
    assert logical_size(123, VALID[0]) == 123


def test_racily_recent_ctime_is_not_cached() -> None:
    now = time.time_ns()
    cache = SizeCache(None)
    cache.put(KEY, (10, now, now), 5)
    assert cache.get(KEY, (10, now, now)) is None
    assert cache.statistics().skipped_puts == 1
    eager = SizeCache(None, racy_window_ns=0)
    eager.put(KEY, (10, now, now), 5)
    assert eager.get(KEY, (10, now, now)) == 5


def test_put_rejects_bad_values_and_skips_unstorable_ones(cache: SizeCache) -> None:
    with pytest.raises(ValueError):
        cache.put(KEY, VALID, -1)
    with pytest.raises(ValueError):
        cache.put(KEY, VALID, True)
    with pytest.raises(ValueError):
        cache.put((-1, 5), VALID, 1)
    cache.put(KEY, (10, 1 << 63, 0), 1)  # mtime beyond SQLite's 64 bits
    cache.put(KEY, VALID, 1 << 63)
    assert cache.statistics().skipped_puts == 2
    assert cache.statistics().entries == 0


def test_hot_path_runs_no_sql(cache: SizeCache) -> None:
    cache.put(KEY, VALID, 7)
    cache.flush()
    statements: list[str] = []
    assert cache._conn is not None
    cache._conn.set_trace_callback(statements.append)
    for _ in range(100):
        cache.get(KEY, VALID)
        cache.get(key(1), VALID)
    cache.put(key(2), valid(2), 3)
    assert statements == []


# -- persistence ---------------------------------------------------------------------------


def test_entries_survive_close_and_reopen(db: Path) -> None:
    huge: SizeKey = ((1 << 64) - 1, (1 << 63) + 12345)  # beyond signed 64 bits
    with SizeCache(db) as cache:
        for n in range(50):
            cache.put(key(n), valid(n), n * 3)
        cache.put(huge, VALID, 77)
        cache.put(KEY, VALID, NOT_FORMATTED)
    assert stored_rows(db) == 52
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()
    with SizeCache(db) as cache:
        stats = cache.statistics()
        assert stats.persistent
        assert stats.loaded == stats.entries == 52
        assert all(cache.get(key(n), valid(n)) == n * 3 for n in range(50))
        assert cache.get(huge, VALID) == 77
        assert cache.get(KEY, VALID) is NOT_FORMATTED
        assert cache.statistics().hits == 52


def test_flush_writes_only_dirty_entries_in_one_transaction(cache: SizeCache) -> None:
    for n in range(20):
        cache.put(key(n), valid(n), n)
    assert cache.flush() == 20
    assert cache.flush() == 0
    for n in range(5):
        cache.put(key(n), valid(n), n + 1)
    cache.forget(key(10))
    cache.get(key(11), valid(0))  # stale drop
    statements: list[str] = []
    assert cache._conn is not None
    cache._conn.set_trace_callback(statements.append)
    assert cache.flush() == 7
    transaction = [s.split()[0].upper() for s in statements]
    assert transaction.count("BEGIN") == 1
    assert transaction.count("COMMIT") == 1
    assert cache.statistics().persisted_writes == 27


def test_memory_only_cache_works_without_a_file() -> None:
    with SizeCache(None) as cache:
        cache.put(KEY, VALID, 5)
        assert cache.get(KEY, VALID) == 5
        assert cache.flush() == 0
        assert cache.get(KEY, VALID) == 5
        assert not cache.statistics().persistent


@pytest.mark.parametrize("where", ["missing directory", "a directory"])
def test_unusable_location_runs_memory_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    if where == "missing directory":
        path = tmp_path / "no-such-dir" / DB_FILE_NAME
    else:
        path = tmp_path / DB_FILE_NAME
        path.mkdir()
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"):
        cache = SizeCache(path)
    assert "memory only" in caplog.text
    assert not cache.statistics().persistent
    cache.put(KEY, VALID, 5)
    assert cache.get(KEY, VALID) == 5
    cache.close()
    assert sorted(p.name for p in tmp_path.rglob("*")) == (
        [] if where == "missing directory" else [DB_FILE_NAME]
    )


# -- damaged and foreign files ---------------------------------------------------------------


def _truncated_database(db: Path) -> None:
    with SizeCache(db) as cache:
        for n in range(5000):
            cache.put(key(n), valid(n), n)
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 2] + b"\xa5" * (len(data) // 2))


@pytest.mark.parametrize(
    "damage",
    [
        lambda db: db.write_bytes(b"this is not a database at all" * 100),
        _truncated_database,
    ],
    ids=["garbage", "scrambled"],
)
def test_corrupt_file_is_moved_aside_and_recreated(
    db: Path, caplog: pytest.LogCaptureFixture, damage
) -> None:
    damage(db)
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"):
        cache = SizeCache(db)
    assert "corrupt" in caplog.text
    stats = cache.statistics()
    assert stats.persistent
    assert stats.entries == 0
    assert db.with_name(DB_FILE_NAME + ".corrupt").exists()
    cache.put(KEY, VALID, 5)
    cache.close()
    with SizeCache(db) as reopened:
        assert reopened.get(KEY, VALID) == 5


@pytest.mark.parametrize("version", [SCHEMA_VERSION + 1, 0, None])
def test_unknown_schema_version_is_recreated(
    db: Path, caplog: pytest.LogCaptureFixture, version: int | None
) -> None:
    with SizeCache(db) as cache:
        cache.put(KEY, VALID, 5)
    conn = sqlite3.connect(db)
    with conn:
        if version is None:
            conn.execute("DELETE FROM meta")
        else:
            conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (version,))
    conn.close()
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"):
        cache = SizeCache(db)
    assert "schema version" in caplog.text
    assert cache.statistics().persistent
    assert cache.get(KEY, VALID) is None
    cache.put(KEY, VALID, 6)
    cache.close()
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT value FROM meta").fetchall() == [(SCHEMA_VERSION,)]
    conn.close()
    with SizeCache(db) as cache:
        assert cache.get(KEY, VALID) == 6


def test_foreign_database_is_recreated(db: Path, caplog: pytest.LogCaptureFixture) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE something_else (x)")
    conn.commit()
    conn.close()
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"), SizeCache(db) as cache:
        assert cache.statistics().persistent
    assert "recreating" in caplog.text


def test_rows_with_impossible_sizes_are_not_loaded(db: Path) -> None:
    with SizeCache(db) as cache:
        cache.put(key(1), valid(1), 1)
        cache.put(key(2), valid(2), 2)
    conn = sqlite3.connect(db)
    with conn:
        conn.execute("UPDATE sizes SET logical = 'oops' WHERE ino = ?", (key(1)[1],))
    conn.close()
    with SizeCache(db) as cache:
        assert cache.get(key(1), valid(1)) is None
        assert cache.get(key(2), valid(2)) == 2


def test_failed_flush_is_retried(
    cache: SizeCache, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache.put(key(1), valid(1), 1)
    real_write = SizeCache._write

    def failing(conn: sqlite3.Connection, batch: dict) -> int:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(SizeCache, "_write", staticmethod(failing))
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"):
        assert cache.flush() == 0
    assert "will retry" in caplog.text
    cache.put(key(2), valid(2), 2)
    stats = cache.statistics()
    assert (stats.flush_failures, stats.pending) == (1, 2)
    monkeypatch.setattr(SizeCache, "_write", staticmethod(real_write))
    assert cache.flush() == 2
    assert cache.statistics().pending == 0


def test_corruption_found_by_a_flush_recreates_the_file(
    db: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    cache = SizeCache(db)
    for n in range(10):
        cache.put(key(n), valid(n), n)
    cache.flush()
    cache.put(key(10), valid(10), 10)
    real_write = SizeCache._write

    def corrupt(conn: sqlite3.Connection, batch: dict) -> int:
        error = sqlite3.DatabaseError("database disk image is malformed")
        error.sqlite_errorcode = sqlite3.SQLITE_CORRUPT  # type: ignore[attr-defined]
        raise error

    monkeypatch.setattr(SizeCache, "_write", staticmethod(corrupt))
    with caplog.at_level(logging.WARNING, logger="isofs.core.sizecache"):
        cache.flush()
    assert "corrupt" in caplog.text
    monkeypatch.setattr(SizeCache, "_write", staticmethod(real_write))
    assert cache.flush() == 11  # everything in memory goes to the new file
    cache.close()
    assert db.with_name(DB_FILE_NAME + ".corrupt").exists()
    with SizeCache(db) as reopened:
        assert all(reopened.get(key(n), valid(n)) == n for n in range(11))


# -- threads -------------------------------------------------------------------------------


def test_concurrent_flushes_lose_no_puts(db: Path) -> None:
    cache = SizeCache(db)
    stop = threading.Event()
    flushes = 0
    errors: list[BaseException] = []

    def flusher() -> None:
        nonlocal flushes
        try:
            while not stop.is_set():
                cache.flush()
                flushes += 1
        except BaseException as e:  # surfaced by the assertion below
            errors.append(e)

    thread = threading.Thread(target=flusher)
    thread.start()
    try:
        for n in range(20_000):
            cache.put(key(n), valid(n), n)
            assert cache.get(key(n), valid(n)) == n
            if n % 7 == 0:  # re-puts and forgets race with the flushes too
                cache.put(key(n // 2), valid(n // 2), n)
            if n % 11 == 0:
                cache.forget(key(n // 3))
            if n % 1000 == 0:
                time.sleep(0.001)  # let the flusher in
    finally:
        stop.set()
        thread.join()
    assert not errors
    assert flushes > 1
    expected = dict(cache._entries)
    cache.close()
    with SizeCache(db) as reopened:
        assert reopened._entries == expected
        assert reopened.statistics().entries == len(expected) > 10_000


# -- pruning -------------------------------------------------------------------------------


def test_flush_prunes_least_recently_put_to_the_cap(db: Path) -> None:
    with SizeCache(db, max_entries=100) as cache:
        for n in range(150):
            cache.put(key(n), valid(n), n)
        cache.put(key(0), valid(0), 0)  # re-put: now the most recent
        assert cache.statistics().entries == 150  # only flush prunes
        cache.flush()
        stats = cache.statistics()
        assert (stats.entries, stats.pruned) == (100, 50)
        assert cache.get(key(0), valid(0)) == 0
        assert all(cache.get(key(n), valid(n)) is None for n in range(1, 51))
        assert all(cache.get(key(n), valid(n)) == n for n in range(51, 150))
    assert stored_rows(db) == 100
    # The put order survives a reopen: the oldest stored entries are pruned first.
    with SizeCache(db, max_entries=100) as cache:
        for n in range(200, 210):
            cache.put(key(n), valid(n), n)
        cache.flush()
        assert all(cache.get(key(n), valid(n)) is None for n in range(51, 61))
        assert all(cache.get(key(n), valid(n)) == n for n in range(61, 150))
        assert cache.get(key(0), valid(0)) == 0
    assert stored_rows(db) == 100
