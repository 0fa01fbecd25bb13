"""Behaviour every dedup chunk store must show, run against the embedded store
(test_dedup_store.py) and the S3 store on a real engine (test_dedup_s3.py).

Each check takes `open_store(name="a", **options)`, which opens (or reopens) the store `name`
of the test, and `stored_bytes(name)`, the bytes the store's packs occupy wherever they are.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from isofs_providers.dedup.store import MissingChunk, MissingChunks, PackedStore

OpenStore = Callable[..., PackedStore]


def content(seed: int, size: int = 65536, compressible: bool = False) -> bytes:
    """Deterministic chunk content (half text-like when compressible)."""
    rng = random.Random(seed)
    if compressible:
        words = [rng.randbytes(rng.randint(3, 9)).hex() for _ in range(50)]
        text = " ".join(rng.choice(words) for _ in range(size // 4)).encode()
        return text[:size]
    return rng.randbytes(size)


def numbered_blob(n: int) -> bytes:
    """The content of chunk number n in crash tests (child and parent agree on it)."""
    return content(n, 9000 + n % 1000, compressible=n % 2 == 0)


def put_committed(store: PackedStore, blobs: list[bytes], refs: bool = True) -> list[bytes]:
    ids = [store.chunk_id(b) for b in blobs]
    store.put(list(zip(ids, blobs, strict=True)))
    if refs:
        store.reference(ids, [])
    store.commit()
    return ids


def check_round_trip(open_store: OpenStore) -> None:
    store = open_store(pack_size=256 * 1024)
    blobs = [content(i, 1000 + 997 * i) for i in range(30)] + [b"", b"x"]
    ids = put_committed(store, blobs)
    assert store.has(ids) == [True] * len(ids)
    for chunk_id, blob in zip(ids, blobs, strict=True):
        assert store.get(chunk_id) == blob
    unknown = [store.chunk_id(content(1000 + i, 100)) for i in range(2000)]
    answer = store.has([*unknown, ids[0]])  # more ids than one SQL batch
    assert answer == [False] * len(unknown) + [True]
    with pytest.raises(MissingChunk, match=unknown[0][:6].hex()):
        store.get(unknown[0])
    stats = store.statistics()
    assert stats["chunks"] == len(blobs)
    assert stats["logical_bytes"] == sum(map(len, blobs))
    assert stats["refcount_total"] == len(blobs)
    assert stats["packs"] >= 2  # 256 KiB packs: several sealed
    store.close()
    store = open_store(pack_size=256 * 1024)
    for chunk_id, blob in zip(ids, blobs, strict=True):
        assert store.get(chunk_id) == blob
    store.close()


def check_uncommitted_reads(open_store: OpenStore) -> None:
    """Chunks put but not committed yet are there for this store object already."""
    store = open_store()
    blob = content(7)
    chunk_id = store.chunk_id(blob)
    store.put([(chunk_id, blob)])
    assert store.has([chunk_id]) == [True]
    assert store.get(chunk_id) == blob
    assert store.statistics()["uncommitted_chunks"] == 1
    store.commit()
    assert store.statistics()["uncommitted_chunks"] == 0
    store.close()


def check_stored_once(open_store: OpenStore, stored_bytes: Callable[[str], int]) -> None:
    store = open_store()
    blobs = [content(i) for i in range(20)]
    put_committed(store, blobs)
    store.close()
    once = stored_bytes("a")
    store = open_store()
    again = [(store.chunk_id(b), b) for b in blobs]
    store.put(again)  # the same chunks again (and in one call twice)
    store.put(again)
    store.reference([i for i, _ in again], [])
    store.commit()
    assert store.statistics()["chunks"] == 20
    assert store.statistics()["refcount_total"] == 40
    store.close()
    assert stored_bytes("a") - once < 4096  # a trailer at most, not 1.3 MB of chunks
    assert once < 20 * 65536 + 20 * 100 + 4096


def check_gc_frees_and_keeps(open_store: OpenStore, stored_bytes: Callable[[str], int]) -> None:
    store = open_store(pack_size=512 * 1024)
    kept = put_committed(store, [content(i) for i in range(12)])
    dropped = put_committed(store, [content(100 + i) for i in range(12)])
    never = put_committed(store, [content(200 + i) for i in range(12)], refs=False)
    store.reference([], dropped)  # a manifest let go of these
    absent = store.chunk_id(b"never stored")
    before = stored_bytes("a")
    counted: list[int] = []
    report = store.collect_garbage([*kept, absent], counted.append, repack_dead_share=0.3)
    assert report.chunks_freed == 24
    assert report.live_chunks == 12
    assert report.missing == [absent]
    assert sum(counted) == 13
    assert report.packs_deleted + report.packs_rewritten >= 1
    assert store.has(kept) == [True] * 12
    assert store.has(dropped + never) == [False] * 24
    for i, chunk_id in enumerate(kept):
        assert store.get(chunk_id) == content(i)
    wait = getattr(store, "wait_for_uploads", None)
    if wait is not None:
        assert wait(60)
    after = stored_bytes("a")
    assert after < before * 0.6, (before, after)
    stats = store.statistics()
    assert stats["chunks"] == 12
    assert stats["dead_bytes"] <= stats["stored_bytes"] * 0.3
    store.close()


def check_gc_protects_concurrent_references(open_store: OpenStore) -> None:
    """Deterministic: a reference or put made while the collection marks is never freed."""
    store = open_store()
    old = put_committed(store, [content(i) for i in range(6)], refs=False)
    fresh = content(99)
    fresh_id = store.chunk_id(fresh)

    def during_marking(_count: int) -> None:
        store.reference(old[:2], [])  # a writer just matched these
        store.put([(old[2], content(2))])  # and tried to store this one again
        store.put([(fresh_id, fresh)])
        store.commit()

    absent = store.chunk_id(b"in no store")
    report = store.collect_garbage(iter([absent]), during_marking)
    assert report.missing == [absent]
    assert store.has([*old, fresh_id]) == [True, True, True, False, False, False, True]
    assert report.chunks_freed == 3
    for i in range(3):
        assert store.get(old[i]) == content(i)
    store.close()


def check_gc_grace_for_counted_references(open_store: OpenStore) -> None:
    """A chunk with counted references, referenced just before the collection, survives it
    (its writer may be about to write the manifest); with no grace it is freed."""
    store = open_store()
    put_committed(store, [content(i) for i in range(3)])
    assert store.collect_garbage([], lambda n: None).chunks_freed == 0
    assert store.collect_garbage([], lambda n: None, grace=0.0).chunks_freed == 3
    store.close()


def check_reference_of_freed_chunk(open_store: OpenStore) -> None:
    store = open_store()
    ids = put_committed(store, [content(1)], refs=False)
    store.collect_garbage([], lambda n: None)
    with pytest.raises(MissingChunks) as caught:
        store.reference(ids, [])
    assert caught.value.ids == ids
    store.close()


def check_gc_race(open_store: OpenStore, rounds: int, seconds: float) -> None:
    """A writer thread matching, putting and referencing chunks from a small pool (so it
    keeps re-using chunks a collection is about to free) races collections that walk the
    published manifests while they change; after every collection every published manifest
    reads back."""
    store = open_store(pack_size=128 * 1024)
    pool = [content(i, 4096) for i in range(48)]
    pool_ids = [store.chunk_id(b) for b in pool]
    blob_of = dict(zip(pool_ids, pool, strict=True))
    manifests: dict[str, list[bytes]] = {}
    lock = threading.Lock()
    stop = threading.Event()
    errors: list[BaseException] = []
    rng = random.Random(1234)

    def writer() -> None:
        try:
            while not stop.is_set():
                name = f"file{rng.randrange(6)}"
                ids = rng.sample(pool_ids, 6)
                missing = [i for i, there in zip(ids, store.has(ids), strict=True) if not there]
                store.put([(i, blob_of[i]) for i in missing])
                try:
                    store.reference(ids, [])
                except MissingChunks as exc:  # freed between has and reference: store again
                    store.put([(i, blob_of[i]) for i in exc.ids])
                    store.reference(exc.ids, [])
                store.commit()
                time.sleep(rng.random() * 0.002)  # between the index and the manifest
                with lock:
                    old = manifests.get(name, [])
                    manifests[name] = ids
                store.reference([], old)
        except BaseException as exc:
            errors.append(exc)

    def walk() -> Iterator[bytes]:
        for n in range(6):
            with lock:
                ids = list(manifests.get(f"file{n}", []))
            yield from ids
            time.sleep(0.001)

    def check_published() -> None:
        with lock:
            snapshot = {name: list(ids) for name, ids in manifests.items()}
        for name, ids in snapshot.items():
            for chunk_id in ids:
                try:
                    assert store.get(chunk_id) == blob_of[chunk_id]
                except MissingChunk:
                    with lock:
                        still = chunk_id in manifests.get(name, [])
                    if still:
                        raise

    thread = threading.Thread(target=writer)
    thread.start()
    freed = 0
    deadline = time.monotonic() + seconds
    try:
        for _ in range(rounds):
            report = store.collect_garbage(walk(), lambda n: None, repack_dead_share=0.2)
            freed += report.chunks_freed
            check_published()
            if time.monotonic() > deadline:
                break
    finally:
        stop.set()
        thread.join()
    assert not errors, errors
    check_published()
    assert freed > 0  # the collections had something to do: the race was real
    store.close()


def stats_keys(stats: dict[str, Any]) -> None:
    for key in (
        "chunks", "packs", "stored_bytes", "logical_bytes", "dead_bytes", "refcount_total",
        "upload_backlog_packs", "upload_backlog_bytes",
    ):  # fmt: skip
        assert key in stats, key


def random_bytes(n: int) -> bytes:
    return os.urandom(n)
