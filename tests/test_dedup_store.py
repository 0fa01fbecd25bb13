"""The embedded dedup chunk store: round trips, dedup, compression, encryption, damage,
crashes at every step of the write ordering, gc (and its race with writers), index rebuild,
and arbitrary bytes as packs and index rows."""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
import tracemalloc
from pathlib import Path

import dedup_store_checks as checks
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from isofs.provider import CorruptData
from isofs_providers.dedup.store import EmbeddedStore, MissingChunk, PackedStore, StoreBusy
from isofs_providers.dedup.store import packs as packfmt

KEY = bytes(range(32))


@pytest.fixture
def open_store(tmp_path: Path):  # type: ignore[no-untyped-def]
    opened: list[PackedStore] = []

    def open_(name: str = "a", **options: object) -> EmbeddedStore:
        store = EmbeddedStore(tmp_path / name / "dedup", **options)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()


def pack_bytes(tmp_path: Path, name: str = "a") -> int:
    return sum(p.stat().st_size for p in (tmp_path / name / "dedup" / "packs").iterdir())


def pack_files(store: PackedStore) -> list[Path]:
    return sorted(p for p in store.pack_dir.iterdir() if len(p.name) == 32)


# ------------------------------------------------------------------ shared behaviour


def test_round_trip(open_store) -> None:
    checks.check_round_trip(open_store)


def test_uncommitted_chunks_are_readable(open_store) -> None:
    checks.check_uncommitted_reads(open_store)


def test_identical_chunks_are_stored_once(open_store, tmp_path: Path) -> None:
    checks.check_stored_once(open_store, lambda name: pack_bytes(tmp_path, name))


def test_gc_frees_unreferenced_and_repacks(open_store, tmp_path: Path) -> None:
    checks.check_gc_frees_and_keeps(open_store, lambda name: pack_bytes(tmp_path, name))


def test_gc_keeps_chunks_referenced_while_it_runs(open_store) -> None:
    checks.check_gc_protects_concurrent_references(open_store)


def test_gc_grace_for_counted_references(open_store) -> None:
    checks.check_gc_grace_for_counted_references(open_store)


def test_reference_of_a_freed_chunk_says_which(open_store) -> None:
    checks.check_reference_of_freed_chunk(open_store)


def test_gc_races_a_writer(open_store) -> None:
    checks.check_gc_race(open_store, rounds=60, seconds=20.0)


def test_statistics_keys(open_store) -> None:
    checks.stats_keys(open_store().statistics())


# ------------------------------------------------------------------ stored form


def test_compression_level_and_raw_fallback(open_store, tmp_path: Path) -> None:
    text = checks.content(1, compressible=True)
    noise = checks.content(2)
    fast = open_store("fast", level=1)
    checks.put_committed(fast, [text, noise])
    small = open_store("small", level=19)
    checks.put_committed(small, [text, noise])
    for store in (fast, small):
        rows = dict(store.index.connection().execute("SELECT id, length FROM chunks"))
        assert rows[store.chunk_id(text)] < len(text) // 2  # compressed
        # incompressible: stored raw, one record header of overhead
        assert rows[store.chunk_id(noise)] == len(noise) + packfmt.RECORD_HEADER_SIZE
        assert store.get(store.chunk_id(text)) == text
    assert pack_bytes(tmp_path, "small") <= pack_bytes(tmp_path, "fast")
    with pytest.raises(ValueError, match="level"):
        open_store("bad", level=0)


def test_encrypted_store(open_store, tmp_path: Path) -> None:
    text = checks.content(3, compressible=True)
    store = open_store("enc", key=KEY)
    other = open_store("other", key=bytes(32))
    plain = open_store("plain")
    chunk_id = store.chunk_id(text)
    assert chunk_id != plain.chunk_id(text) != other.chunk_id(text)  # keyed ids
    checks.put_committed(store, [text])
    assert store.get(chunk_id) == text
    store.close()
    raw = b"".join(p.read_bytes() for p in pack_files(store))
    assert text[:64] not in raw and plain.chunk_id(text) not in raw
    with pytest.raises(CorruptData, match="wrong key"):
        EmbeddedStore(tmp_path / "enc" / "dedup", key=bytes(32))
    with pytest.raises(CorruptData, match="is encrypted"):
        EmbeddedStore(tmp_path / "enc" / "dedup")
    with pytest.raises(CorruptData, match="not encrypted"):
        EmbeddedStore(tmp_path / "plain" / "dedup", key=KEY)
    again = open_store("enc", key=KEY)
    assert again.get(chunk_id) == text


@pytest.mark.parametrize("key", [None, KEY], ids=["plain", "encrypted"])
def test_a_flipped_byte_fails_exactly_the_chunks_it_touches(open_store, key) -> None:
    store = open_store(key=key, pack_size=1 << 20)
    blobs = [checks.content(i, 700 + 300 * i, compressible=i % 2 == 0) for i in range(8)]
    ids = checks.put_committed(store, blobs)
    store.close()
    store = open_store(key=key, pack_size=1 << 20)
    store.seal_open_pack()
    (path,) = pack_files(store)
    spans = {
        chunk_id: (offset, offset + length)
        for chunk_id, offset, length in store.index.connection().execute(
            "SELECT id, offset, length FROM chunks"
        )
    }
    size = path.stat().st_size
    rng = random.Random(5)
    first_offset, _ = spans[ids[0]]
    positions = set(range(first_offset, first_offset + packfmt.RECORD_HEADER_SIZE + 4))
    positions |= set(range(packfmt.HEADER_SIZE)) | set(range(size - 60, size))
    positions |= {rng.randrange(size) for _ in range(250)}
    fd = os.open(path, os.O_RDWR)
    try:
        for position in sorted(positions):
            original = os.pread(fd, 1, position)
            os.pwrite(fd, bytes([original[0] ^ 0x5A]), position)
            for chunk_id, blob in zip(ids, blobs, strict=True):
                start, end = spans[chunk_id]
                if start <= position < end:
                    with pytest.raises(CorruptData, match=chunk_id[:6].hex()):
                        store.get(chunk_id)
                else:
                    assert store.get(chunk_id) == blob, position
            os.pwrite(fd, original, position)
    finally:
        os.close(fd)


def test_a_truncated_pack_fails_the_cut_chunks(open_store) -> None:
    store = open_store()
    blobs = [checks.content(i, 5000) for i in range(4)]
    ids = checks.put_committed(store, blobs)
    (path,) = pack_files(store)
    _, offset, _ = store.index.connection().execute(
        "SELECT id, offset, length FROM chunks WHERE id = ?", (ids[3],)
    ).fetchone()
    os.truncate(path, offset + 10)
    for chunk_id, blob in zip(ids[:3], blobs[:3], strict=True):
        assert store.get(chunk_id) == blob
    with pytest.raises(CorruptData, match=ids[3][:6].hex()):
        store.get(ids[3])


# ------------------------------------------------------------------ index rebuild


def test_rebuild_index_from_packs(open_store, tmp_path: Path) -> None:
    store = open_store(pack_size=300 * 1024)
    blobs = [checks.content(i, 20_000 + 1000 * i, compressible=i % 3 == 0) for i in range(40)]
    ids = checks.put_committed(store, blobs)
    store.close()  # the last pack stays open (unsealed): rebuilt by scanning
    store_dir = tmp_path / "a" / "dedup"
    def is_sealed(path: Path) -> bool:
        data = path.read_bytes()
        return packfmt.has_valid_footer(lambda off, n: data[off : off + n], len(data), "")

    sealed = [p for p in pack_files(store) if is_sealed(p)]
    assert len(sealed) >= 3
    # one sealed pack loses its trailer's checksum: the rebuild scans it instead
    victim = sealed[0]
    data = bytearray(victim.read_bytes())
    data[-10] ^= 0xFF
    victim.write_bytes(bytes(data))
    for suffix in ("", "-wal", "-shm"):
        Path(f"{store_dir}/index.db{suffix}").unlink(missing_ok=True)
    store = open_store(pack_size=300 * 1024)
    assert store.has(ids) == [False] * len(ids)
    summary = store.rebuild_index()
    assert summary["chunks"] == len(ids)
    assert summary["unreadable"] == []
    assert store.has(ids) == [True] * len(ids)
    for chunk_id, blob in zip(ids, blobs, strict=True):
        assert store.get(chunk_id) == blob
    assert store.statistics()["logical_bytes"] == sum(map(len, blobs))
    report = store.collect_garbage(ids[:10], lambda n: None)
    assert report.chunks_freed == 30 and report.missing == []
    for chunk_id, blob in zip(ids[:10], blobs[:10], strict=True):
        assert store.get(chunk_id) == blob


def test_one_maintenance_at_a_time(open_store) -> None:
    store = open_store()
    checks.put_committed(store, [checks.content(1)])
    other = open_store()

    def nested(_n: int) -> None:
        with pytest.raises(StoreBusy, match="another gc"):
            other.collect_garbage([], lambda n: None)

    store.collect_garbage(iter([b"\0" * 32]), nested)


# ------------------------------------------------------------------ crashes


CHILD = textwrap.dedent(
    """
    import os, random, signal, sys
    sys.path.insert(0, sys.argv[5])
    import dedup_store_checks as checks
    from isofs_providers.dedup.store import EmbeddedStore, packed

    path, seed, kill_at, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    steps = 0

    def hook(step):
        global steps
        steps += 1
        if steps == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    if kill_at > 0:
        packed.crash_hook = hook
    store = EmbeddedStore(path, pack_size=200 * 1024)
    rng = random.Random(seed)
    if mode == "gc":
        store.collect_garbage(
            [store.chunk_id(checks.numbered_blob(n)) for n in range(0, 10_000, 3)],
            lambda n: None, repack_dead_share=0.1, grace=0.0,
        )
        print("gc done", flush=True)
        sys.exit(0)
    base = seed * 1000
    for batch in range(25):
        numbers = [base + batch * 10 + k for k in range(rng.randint(1, 10))]
        blobs = [checks.numbered_blob(n) for n in numbers]
        ids = [store.chunk_id(b) for b in blobs]
        store.put(list(zip(ids, blobs)))
        store.reference(ids, [])
        store.commit()
        print(" ".join(map(str, numbers)), flush=True)
    """
)


def run_child(tmp_path: Path, store_dir: Path, seed: int, kill_at: int, mode: str = "put",
              kill_after: float | None = None) -> list[int]:  # fmt: skip
    """Run the child; return the chunk numbers whose commit it reported."""
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(store_dir), str(seed), str(kill_at), mode,
         str(Path(__file__).parent)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    if kill_after is not None:
        time.sleep(kill_after)
        proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode in (0, -signal.SIGKILL), err
    return [int(n) for line in out.splitlines() if line and line[0].isdigit() for n in line.split()]


def verify_after_crash(store_dir: Path, committed: list[int]) -> PackedStore:
    store = EmbeddedStore(store_dir, pack_size=200 * 1024)
    rows = [bytes(r[0]) for r in store.index.connection().execute("SELECT id FROM chunks")]
    for chunk_id in rows:
        store.get(chunk_id)  # every indexed chunk reads back (verified against its id)
    for n in committed:
        blob = checks.numbered_blob(n)
        assert store.get(store.chunk_id(blob)) == blob, n
    return store


def test_crash_at_every_step_of_the_write_ordering(tmp_path: Path) -> None:
    """SIGKILL at the n-th step (appended, packs synced, index committed, sealed) of a
    child doing puts, for a spread of n; then reopen, check, and write on."""
    store_dir = tmp_path / "dedup"
    committed: list[int] = []
    rng = random.Random(11)
    for round_ in range(10):
        kill_at = rng.randint(1, 80) if round_ % 4 != 3 else 0
        committed += run_child(tmp_path, store_dir, round_, kill_at)
        verify_after_crash(store_dir, committed).close()
    assert committed  # the children got somewhere before dying


def test_crash_at_random_times(tmp_path: Path) -> None:
    store_dir = tmp_path / "dedup"
    committed: list[int] = []
    rng = random.Random(12)
    for round_ in range(6):
        delay = 0.3 + rng.random() * 0.8
        committed += run_child(tmp_path, store_dir, 50 + round_, 0, kill_after=delay)
        verify_after_crash(store_dir, committed).close()


def test_crash_during_gc_repack(tmp_path: Path) -> None:
    store_dir = tmp_path / "dedup"
    committed: list[int] = []
    for seed in range(3):
        committed += run_child(tmp_path, store_dir, seed, 0)
    live = [n for n in committed if n % 3 == 0]
    rng = random.Random(13)
    for _ in range(5):
        run_child(tmp_path, store_dir, 0, rng.randint(1, 30), mode="gc")
        verify_after_crash(store_dir, live).close()
    run_child(tmp_path, store_dir, 0, 0, mode="gc")
    store = verify_after_crash(store_dir, live)
    assert store.statistics()["chunks"] == len(live)
    store.close()


# ------------------------------------------------------------------ untrusted bytes


def seeded_store(tmp_path: Path, name: str) -> tuple[EmbeddedStore, list[bytes], list[bytes]]:
    store = EmbeddedStore(tmp_path / name / "dedup")
    blobs = [checks.content(i, 3000, compressible=i % 2 == 0) for i in range(5)]
    ids = checks.put_committed(store, blobs)
    store.seal_open_pack()
    return store, ids, blobs


def get_or_corrupt(store: PackedStore, chunk_id: bytes, expected: bytes | None) -> None:
    try:
        data = store.get(chunk_id)
    except CorruptData:
        return
    assert expected is not None and data == expected


@settings(
    max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    garbage=st.binary(max_size=3000),
    keep_header=st.booleans(),
    rows=st.lists(
        st.tuples(
            st.binary(min_size=32, max_size=32),
            st.integers(min_value=-(2**40), max_value=2**62),
            st.integers(min_value=-(2**31), max_value=2**62),
            st.integers(min_value=1, max_value=3),
        ),
        max_size=6,
    ),
)
@example(garbage=b"", keep_header=True, rows=[(b"\x01" * 32, 32, 16 * 1024 * 1024, 1)])
def test_arbitrary_pack_bytes_and_index_rows(tmp_path_factory, garbage, keep_header, rows) -> None:
    """Arbitrary bytes as a pack and arbitrary index rows (absurd lengths, ids and packs
    that do not exist) end in CorruptData quickly, with bounded memory."""
    tmp = tmp_path_factory.mktemp("prop")
    store, ids, blobs = seeded_store(tmp, "p")
    (path,) = pack_files(store)
    original = path.read_bytes()
    data = (original[: packfmt.HEADER_SIZE] if keep_header else b"") + garbage
    path.write_bytes(data)
    db = store.index.connection()
    for chunk_id, offset, length, pack in rows:
        db.execute(
            "INSERT OR REPLACE INTO chunks VALUES (?, ?, ?, ?, 0, 1, 0, 0)",
            (chunk_id, pack, offset, length),
        )
    tracemalloc.start()
    started = time.monotonic()
    try:
        for chunk_id, *_ in rows:
            get_or_corrupt(store, chunk_id, None)
        for chunk_id in ids:
            get_or_corrupt(store, chunk_id, None)
        summary = store.rebuild_index()
        for chunk_id, blob in zip(ids, blobs, strict=True):
            get_or_corrupt(store, chunk_id, blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()
    # Lengths claimed reach 2^62 bytes, and up to the 16 MiB record limit pass the index
    # check: a peak this far below them means no read allocated what a row claimed.
    # (zstd's and SQLite's own buffers are C allocations that tracemalloc does not see.)
    assert peak < 1024 * 1024
    assert time.monotonic() - started < 2.0
    assert isinstance(summary["unreadable"], list)


@settings(
    max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["flip", "cut", "swap", "dup", "absurd"]),
            st.integers(min_value=0, max_value=2**20),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_damaged_valid_packs(tmp_path_factory, edits) -> None:
    """Real packs with flipped bytes, cuts, records swapped or repeated, absurd lengths
    written into record headers: every chunk reads back right or fails with CorruptData,
    before and after an index rebuild."""
    tmp = tmp_path_factory.mktemp("damaged")
    store, ids, blobs = seeded_store(tmp, "d")
    (path,) = pack_files(store)
    data = bytearray(path.read_bytes())
    spans = [
        (offset, length)
        for offset, length in store.index.connection().execute(
            "SELECT offset, length FROM chunks ORDER BY offset"
        )
    ]
    for kind, where in edits:
        if not data:
            break
        if kind == "flip":
            data[where % len(data)] ^= 1 << (where % 8)
        elif kind == "cut":
            del data[where % len(data) :]
        elif kind in ("swap", "dup") and len(spans) >= 2:
            a, b = spans[where % len(spans)], spans[(where + 1) % len(spans)]
            first = bytes(data[a[0] : a[0] + a[1]])
            second = bytes(data[b[0] : b[0] + b[1]])
            if kind == "swap" and a[0] < b[0] and a[0] + a[1] + b[1] <= len(data):
                data[a[0] : a[0] + a[1] + b[1]] = second + first
            else:
                data[b[0] : b[0] + b[1]] = first[: b[1]].ljust(b[1], b"\0")
        elif kind == "absurd":
            offset = spans[where % len(spans)][0]
            if offset + 40 <= len(data):
                data[offset + 36 : offset + 40] = (0xFFFFFFF0).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    tracemalloc.start()
    try:
        for chunk_id, blob in zip(ids, blobs, strict=True):
            get_or_corrupt(store, chunk_id, blob)
        store.rebuild_index()
        for chunk_id, blob in zip(ids, blobs, strict=True):
            get_or_corrupt(store, chunk_id, blob)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        store.close()
    assert peak < 4 * 1024 * 1024


def test_a_missing_pack_is_a_missing_chunk(open_store) -> None:
    store = open_store()
    ids = checks.put_committed(store, [checks.content(1)])
    store.close()
    for path in pack_files(store):
        path.unlink()
    store = open_store()
    with pytest.raises(MissingChunk, match=ids[0][:6].hex()):
        store.get(ids[0])


def test_index_is_shared_by_processes(open_store, tmp_path: Path) -> None:
    """Two store objects on one directory (as the daemon and `isofs gc` are): each sees
    the other's committed chunks, the index is in WAL mode."""
    first = open_store()
    second = open_store()
    ids = checks.put_committed(first, [checks.content(1)])
    assert second.get(ids[0]) == checks.content(1)
    more = checks.put_committed(second, [checks.content(2)])
    assert first.has(more) == [True]
    mode = sqlite3.connect(tmp_path / "a" / "dedup" / "index.db").execute(
        "PRAGMA journal_mode"
    ).fetchone()[0]
    assert mode == "wal"
