"""The dedup layer through the provider API, over `MemoryStore` (tests/dedup_support.py).

Model-based random I/O against a bytearray, dedup across files and after an insertion
(measured by the store's bytes and the chunks kept), crashes at every step of the write
ordering, manifests as untrusted input, fsck's checks, the provider's options and key, and
the gc / dedup-stats / dedup-check commands over in-memory files.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dedup_support import MemoryStore
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isofs.provider import (
    CommandRequest,
    CorruptData,
    MemoryFile,
    ProviderError,
    SetupRequest,
    Stack,
)
from isofs_providers.dedup import manifest
from isofs_providers.dedup.chunker import MODE_CDC, Chunker, ChunkerParams, zero_chunk_length
from isofs_providers.dedup.file import DirtyRanges, WriterBarrier
from isofs_providers.dedup.layer import (
    CORRUPT_MANIFEST,
    DAMAGED_CHUNKS,
    MISSING_CHUNKS,
    DedupLayer,
    DedupProvider,
    parse_store,
)
from isofs_providers.dedup.manifest import DATA_START, ENTRY_SIZE, SLOT_OFFSETS, ZERO_ID

SMALL = ChunkerParams(MODE_CDC, 256, 1024, 4096)
SMALL_FIXED = ChunkerParams.fixed(4096)


def small_layer(
    store: MemoryStore | None = None, params: ChunkerParams = SMALL, **kw: Any
) -> DedupLayer:
    kw.setdefault("dirty_limit", 16 << 10)
    return DedupLayer(store or MemoryStore(), params=params, **kw)


def content(tag: str, size: int) -> bytes:
    return random.Random(tag).randbytes(size)


def stored_ids(layer: DedupLayer, lower: MemoryFile) -> list[bytes]:
    return [cid for cid in layer.load_manifest(lower).iter_ids() if cid != ZERO_ID]


# ----------------------------------------------------------------------------- chunker


def test_chunker_cuts_depend_only_on_the_bytes_from_the_last_cut():
    chunker = Chunker(ChunkerParams())
    data = content("cdc", 4 << 20)
    whole = chunker.cut(data, True)
    assert sum(whole) == len(data)
    assert all(16 << 10 <= n <= 256 << 10 for n in whole[:-1])
    # Cutting again from any cut point gives the same cuts from there on.
    start = sum(whole[:7])
    assert chunker.cut(data[start:], True) == whole[7:]
    # A window that does not end the file leaves its undecided last chunk out.
    partial = chunker.cut(data[:1 << 20], False)
    assert partial == whole[: len(partial)] and sum(partial) < 1 << 20


def test_zero_runs_cut_like_zeros():
    for params in (ChunkerParams(), SMALL, SMALL_FIXED):
        chunker = Chunker(params)
        length = zero_chunk_length(params)
        cuts = chunker.cut(bytes(length * 3 + 5), True)
        assert cuts[:3] == [length] * 3


def test_chunker_parameters_are_checked():
    assert ChunkerParams(MODE_CDC, 4096, 3000, 8192).problem()
    assert ChunkerParams(MODE_CDC, 4096, 65536, 2048).problem()
    assert ChunkerParams(7, 4096, 65536, 1 << 20).problem()
    assert ChunkerParams(1, 4096, 8192, 8192).problem()
    assert ChunkerParams.fixed(1 << 30).problem()
    assert ChunkerParams().problem() is None


# ----------------------------------------------------------------------------- dirty ranges


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 300), st.integers(0, 120))))
def test_dirty_ranges_match_a_model(operations):
    dirty = DirtyRanges()
    model: dict[int, int] = {}
    for is_write, offset, length in operations:
        if is_write:
            data = bytes((offset + i) % 251 for i in range(length))
            dirty.write(offset, data)
            model.update({offset + i: data[i] for i in range(length)})
        else:
            dirty.truncate(offset)
            model = {k: v for k, v in model.items() if k < offset}
    assert dirty.bytes == len(model)
    out = bytearray(b"\xff" * 450)
    dirty.overlay(out, 0)
    assert all(out[k] == v for k, v in model.items())
    assert all(out[k] == 0xFF for k in range(450) if k not in model)
    for a, b in zip(dirty.starts, dirty.starts[1:], strict=False):
        assert a < b
    for start, buffer, next_start in zip(dirty.starts, dirty.buffers, dirty.starts[1:],
                                         strict=False):  # fmt: skip
        assert start + len(buffer) < next_start, "ranges are disjoint and not adjacent"


# ----------------------------------------------------------------------------- model-based


byte_values = st.sampled_from(["random", "zeros", "pattern"])
operation = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 60_000), st.integers(1, 12_000), byte_values),
    st.tuples(st.just("truncate"), st.integers(0, 90_000)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("read"), st.integers(0, 70_000), st.integers(0, 20_000)),
)


def _bytes_for(kind: str, length: int, seed: int) -> bytes:
    if kind == "zeros":
        return bytes(length)
    if kind == "pattern":
        return (b"isofs dedup pattern " * (length // 20 + 1))[:length]
    return random.Random(seed).randbytes(length)


@pytest.mark.parametrize("params", [SMALL, SMALL_FIXED], ids=["fastcdc", "fixed"])
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation, max_size=25))
def test_random_io_matches_a_bytearray(params, operations):
    store = MemoryStore()
    layer = small_layer(store, params)
    lower = MemoryFile()
    upper = layer.create(lower)
    model = bytearray()
    for step, op in enumerate(operations):
        if op[0] == "write":
            _, offset, length, kind = op
            data = _bytes_for(kind, length, step)
            upper.write(offset, data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + length] = data
        elif op[0] == "truncate":
            upper.truncate(op[1])
            del model[op[1] :]
            model.extend(bytes(op[1] - len(model)))
        elif op[0] == "flush":
            upper.flush()
        elif op[0] == "reopen":
            upper.flush()
            upper = layer.open(lower)
        else:
            _, offset, size = op
            assert upper.read(offset, size) == bytes(model[offset : offset + size])
        assert upper.size() == len(model)
    upper.flush()
    again = layer.open(lower)
    assert again.size() == len(model)
    assert again.read(0, len(model) + 10) == bytes(model)
    entries = layer.load_manifest(lower)
    assert all(length <= params.max_size for length in entries.lengths)
    assert all(store.has(stored_ids(layer, lower)))


def test_manifest_updates_reuse_the_space_of_dead_lists():
    layer = small_layer()
    lower = MemoryFile()
    upper = layer.create(lower)
    upper.write(0, content("compact", 200_000))
    upper.flush()
    rng = random.Random(3)
    for step in range(40):
        upper.write(rng.randrange(200_000), content(f"edit{step}", rng.randrange(1, 5000)))
        upper.flush()
        entries = len(layer.load_manifest(lower))
        # The live list and at most one dead one (of a similar size) before it.
        assert lower.size() <= DATA_START + 3 * entries * ENTRY_SIZE


def test_large_files_flush_early_and_stay_correct():
    layer = small_layer(params=ChunkerParams(), dirty_limit=1 << 20)
    lower = MemoryFile()
    upper = layer.create(lower)
    data = content("large", 6 << 20)
    for offset in range(0, len(data), 1 << 20):
        upper.write(offset, data[offset : offset + (1 << 20)])
    assert layer.context.counters.flushes >= 3, "the dirty bytes are bounded"
    upper.flush()
    assert layer.open(lower).read(0, len(data)) == data


def test_holes_cost_no_chunks_and_read_as_zeros():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    lower = MemoryFile()
    upper = layer.create(lower)
    upper.write(0, b"head")
    upper.truncate(8 << 30)  # 8 GiB of hole
    upper.write((8 << 30) - 4, b"tail")
    started = time.perf_counter()
    upper.flush()
    assert time.perf_counter() - started < 5, "a hole is cut without hashing it"
    assert len(store.chunks) == 2, "only the chunks holding data are stored"
    again = layer.open(lower)
    assert again.size() == 8 << 30
    assert again.read(0, 4) == b"head" and again.read((8 << 30) - 4, 8) == b"tail"
    assert again.read(3 << 30, 1 << 20) == bytes(1 << 20)
    assert lower.size() < 2 << 20, "the manifest lists the hole in max-size entries"


def test_reads_fetch_only_the_chunks_they_touch():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    lower = MemoryFile()
    upper = layer.create(lower)
    upper.write(0, content("reads", 8 << 20))
    upper.flush()
    fetched: list[bytes] = []
    original_get = store.get

    def counting_get(chunk_id: bytes) -> bytes:
        fetched.append(chunk_id)
        return original_get(chunk_id)

    store.get = counting_get  # type: ignore[method-assign]
    rng = random.Random(1)
    for _ in range(50):
        reader = small_layer(store, ChunkerParams()).open(lower)
        fetched.clear()
        reader.read(rng.randrange(8 << 20), 4096)
        assert 1 <= len(fetched) <= 2


# ----------------------------------------------------------------------------- dedup


def test_two_files_with_shared_content_store_it_once():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    shared = content("shared", 4 << 20)
    for tag in ("a", "b"):
        upper = layer.create(MemoryFile())
        upper.write(0, content(tag, 100_000) + shared)
        upper.flush()
    assert store.stored_bytes < len(shared) + 2 * 100_000 + 2 * (256 << 10)
    assert store.stored_bytes < 1.2 * len(shared)


def test_an_insertion_near_the_start_keeps_most_chunks():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    lower = MemoryFile()
    upper = layer.create(lower)
    data = content("insert", 16 << 20)
    upper.write(0, data)
    upper.flush()
    before_ids = stored_ids(layer, lower)
    before_bytes = store.stored_bytes
    edited = data[:5000] + b"an insertion" + data[5000:]
    upper.write(0, edited)  # an editor writes the whole file again
    upper.flush()
    after_ids = stored_ids(layer, lower)
    kept = len(set(after_ids) & set(before_ids))
    assert layer.open(lower).read(0, len(edited)) == edited
    assert kept >= len(after_ids) - 2, f"{kept} of {len(after_ids)} chunks kept"
    assert store.stored_bytes - before_bytes <= 2 * (256 << 10)


def test_a_small_overwrite_rechunks_only_near_it():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    lower = MemoryFile()
    upper = layer.create(lower)
    upper.write(0, content("overwrite", 16 << 20))
    upper.flush()
    counters = layer.context.counters
    cut_before = counters.bytes_cut
    upper.write(8 << 20, b"changed")
    upper.flush()
    assert counters.bytes_cut - cut_before < 1 << 20, "re-chunking resynchronised"
    assert counters.resyncs >= 1


# ----------------------------------------------------------------------------- crashes


class Crash(Exception):
    """Stands for the daemon being killed at this step."""


class FaultyStore(MemoryStore):
    """Raises Crash at the n-th call of one method (then behaves)."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_at: tuple[str, int] | None = None
        self._counts: dict[str, int] = {}

    def _step(self, name: str) -> None:
        self._counts[name] = self._counts.get(name, 0) + 1
        if self.fail_at == (name, self._counts[name]):
            raise Crash(name)

    def put(self, chunks):  # type: ignore[no-untyped-def]
        self._step("put")
        super().put(chunks)

    def reference(self, added, removed):  # type: ignore[no-untyped-def]
        self._step("reference")
        super().reference(added, removed)

    def commit(self) -> None:
        self._step("commit")
        super().commit()


class FaultyLower(MemoryFile):
    """Raises Crash at its n-th write or truncate, after writing `torn` bytes of it."""

    def __init__(self) -> None:
        super().__init__()
        self.fail_at: int | None = None
        self.torn = 0
        self.calls = 0

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        self.calls += 1
        if self.calls == self.fail_at:
            super().write(offset, bytes(data)[: self.torn])
            raise Crash("write")
        return super().write(offset, data)

    def truncate(self, size: int) -> None:
        self.calls += 1
        if self.calls == self.fail_at:
            raise Crash("truncate")
        super().truncate(size)


def _crash_once(step: str, number: int, torn: int, params: ChunkerParams) -> None:
    store = FaultyStore()
    lower = FaultyLower()
    layer = small_layer(store, params, dirty_limit=1 << 30)
    upper = layer.create(lower)
    old = content("old", 200_000)
    upper.write(0, old)
    upper.flush()
    new = bytearray(old)
    new[50_000:50_010] = b"0123456789"
    new += content("appended", 30_000)
    upper.write(50_000, b"0123456789")
    upper.write(len(old), new[len(old) :])
    if step == "lower":
        lower.calls, lower.fail_at, lower.torn = 0, number, torn
    else:
        store.fail_at = (step, store._counts.get(step, 0) + number)
    try:
        upper.flush()
        crashed = False
    except Crash:
        crashed = True
    store.crash()  # the process is gone: what was not committed is lost
    reopened = small_layer(store, params).open(lower)
    seen = reopened.read(0, 1 << 20)
    assert seen in (old, bytes(new)), f"crash at {step} #{number}: neither old nor new"
    if not crashed:
        assert seen == bytes(new)
    referenced = stored_ids(small_layer(store, params), lower)
    assert all(store.has(referenced)), "the manifest refers only to durable chunks"


@pytest.mark.parametrize("params", [SMALL, ChunkerParams()], ids=["small", "default"])
def test_a_crash_at_any_step_of_a_flush_leaves_the_old_or_the_new_file(params):
    for step in ("put", "reference", "commit"):
        _crash_once(step, 1, 0, params)
    for number in range(1, 5):  # list write, header write, truncate, and past the end
        for torn in (0, 7, 100):
            _crash_once("lower", number, torn, params)


def test_a_torn_list_from_a_machine_crash_falls_back_to_the_previous_generation():
    store = MemoryStore()
    layer = small_layer(store)
    lower = MemoryFile()
    upper = layer.create(lower)
    upper.write(0, b"first version " * 1000)
    upper.flush()
    upper.write(0, b"second version" * 1000)
    upper.flush()
    newest = manifest.read_headers(lower, None)[0]
    lower.data[newest.list_offset + 5] ^= 0xFF  # the list never reached the disk whole
    reopened = layer.open(lower)
    assert reopened.read(0, 14) == b"first version "
    damage = layer.verify(lower, lambda n: None)
    assert [d.kind for d in damage] == ["torn manifest update"]
    layer.repair(lower, damage)
    assert layer.verify(lower, lambda n: None) == []
    assert layer.open(lower).read(0, 14) == b"first version "


# ----------------------------------------------------------------------------- untrusted manifests


def _slot(
    *,
    mode: int = 0,
    flags: int = 0,
    sizes: tuple[int, int, int] = (256, 1024, 4096),
    generation: int = 1,
    size: int = 0,
    count: int = 0,
    offset: int = DATA_START,
    list_digest: bytes = b"",
    key: bytes | None = None,
) -> bytes:
    """A header slot with a correct digest, whatever its fields say (see FORMAT-dedup.md)."""
    body = struct.pack(">8sHBBIIIQQQQ16s", manifest.MAGIC, 1, mode, flags, *sizes, generation,
                       size, count, offset, list_digest.ljust(16, b"\0"))  # fmt: skip
    digest = hashlib.blake2b(body, digest_size=16, key=key or b"", person=b"isofs-dd-header")
    return body + digest.digest()


def _list_digest(data: bytes, key: bytes | None = None) -> bytes:
    return hashlib.blake2b(data, digest_size=16, key=key or b"", person=b"isofs-dd-list").digest()


def _manifest_file(slot0: bytes, entries: bytes = b"", slot1: bytes = b"") -> MemoryFile:
    data = bytearray(DATA_START)
    data[0 : len(slot0)] = slot0
    data[SLOT_OFFSETS[1] : SLOT_OFFSETS[1] + len(slot1)] = slot1
    return MemoryFile(bytes(data) + entries)


def _entry(cid: bytes, length: int) -> bytes:
    return cid + length.to_bytes(4, "big")


def _must_fail_quickly(lower: MemoryFile, layer: DedupLayer) -> None:
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CorruptData):
            layer.open(lower).read(0, 1 << 20)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert time.perf_counter() - started < 1.0
    assert peak < 4 * lower.size() + (1 << 20), f"{peak} bytes for a {lower.size()}-byte file"


def test_the_test_encoder_agrees_with_the_layer():
    layer = small_layer()
    data = b"x" * 300
    cid = layer.store.chunk_id(data)
    layer.store.put([(cid, data)])
    entries = _entry(cid, 300)
    lower = _manifest_file(_slot(size=300, count=1, list_digest=_list_digest(entries)), entries)
    assert layer.open(lower).read(0, 1000) == data


absurd = st.integers(0, 2**64 - 1)


@settings(max_examples=300, deadline=None)
@given(
    mode=st.integers(0, 255),
    flags=st.integers(0, 255),
    sizes=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
                    st.integers(0, 2**32 - 1)),
    generation=absurd,
    size=absurd,
    count=absurd,
    offset=absurd,
    tail=st.binary(max_size=400),
)
def test_headers_with_absurd_fields_end_in_corrupt_data(
    mode, flags, sizes, generation, size, count, offset, tail
):
    slot = _slot(mode=mode, flags=flags, sizes=sizes, generation=generation, size=size,
                 count=count, offset=offset)  # fmt: skip
    lower = _manifest_file(slot, tail)
    layer = small_layer()
    try:
        upper = layer.open(lower)
    except CorruptData:
        return
    # The header was plausible: then the list must fail (its digest is of nothing).
    if upper.size() == 0:
        assert upper.read(0, 10) == b""
        return
    _must_fail_quickly(lower, layer)


@settings(max_examples=200, deadline=None)
@given(
    lengths=st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=40),
    claimed=st.integers(0, 10**7),
    ids=st.sampled_from(["missing", "zero", "random"]),
)
def test_entries_that_do_not_add_up_end_in_corrupt_data(lengths, claimed, ids):
    rng = random.Random(len(lengths))
    raw = b"".join(
        _entry(ZERO_ID if ids == "zero" else rng.randbytes(32), n % (2**32)) for n in lengths
    )
    valid = all(1 <= n <= 4096 for n in lengths) and sum(lengths) == claimed
    slot = _slot(size=claimed, count=len(lengths), list_digest=_list_digest(raw))
    lower = _manifest_file(slot, raw)
    layer = small_layer()
    if valid and ids == "zero":
        assert layer.open(lower).read(0, claimed) == bytes(claimed)
        return
    _must_fail_quickly(lower, layer)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000))
def test_arbitrary_bytes_end_in_corrupt_data(data):
    lower = MemoryFile(manifest.MAGIC + data)
    layer = small_layer()
    assert layer.is_formatted(lower)
    _must_fail_quickly(lower, layer)


def test_a_huge_claimed_list_is_refused_before_reading():
    slot = _slot(size=10**15, count=10**12, list_digest=b"x")
    lower = _manifest_file(slot, b"\0" * 1000)
    with pytest.raises(CorruptData, match="do not fit"):
        small_layer().open(lower)


def test_keyed_manifests_cannot_be_forged_or_mixed():
    key = os.urandom(32)
    keyed = small_layer(MemoryStore(key=os.urandom(32)), manifest_key=key)
    lower = MemoryFile()
    upper = keyed.create(lower)
    upper.write(0, b"secret data " * 100)
    upper.flush()
    with pytest.raises(CorruptData, match="no chunk key"):
        small_layer().open(lower)
    other = small_layer(manifest_key=os.urandom(32))
    with pytest.raises(CorruptData, match="digest"):
        other.open(lower)
    # A native process edits a length and re-computes the digests without the key: the
    # keyed reader refuses that header and sees the previous (empty) generation instead.
    header = manifest.read_headers(lower, key)[0]
    forged = bytearray(lower.data)
    raw = bytearray(forged[header.list_offset : header.list_end])
    raw[32:36] = (1).to_bytes(4, "big")
    forged[header.list_offset : header.list_end] = raw
    first_length = keyed.load_manifest(lower).lengths[0]
    slot = _slot(size=header.size - first_length + 1, count=header.count,
                 generation=header.generation, offset=header.list_offset,
                 list_digest=_list_digest(bytes(raw)), flags=1)  # fmt: skip
    forged[SLOT_OFFSETS[header.slot] : SLOT_OFFSETS[header.slot] + len(slot)] = slot
    assert keyed.open(MemoryFile(bytes(forged))).size() == 0


# ----------------------------------------------------------------------------- fsck


def test_verify_names_missing_and_damaged_chunks_and_repair_zeroes_damaged_ones():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    lower = MemoryFile()
    upper = layer.create(lower)
    data = content("fsck", 2 << 20)
    upper.write(0, data)
    upper.flush()
    assert layer.verify(lower, lambda n: None) == []
    entries = layer.load_manifest(lower)
    first, second = entries.id(1), entries.id(3)
    del store.chunks[first]
    store.chunks[second] = b"garbage" + store.chunks[second][7:]
    damage = small_layer(store, ChunkerParams()).verify(lower, lambda n: None)
    kinds = {d.kind: d for d in damage}
    assert set(kinds) == {MISSING_CHUNKS, DAMAGED_CHUNKS}
    missing = kinds[MISSING_CHUNKS]
    assert not missing.repairable and first.hex()[:16] in missing.detail
    start, end = entries.starts[1], entries.starts[2]
    assert missing.ranges[0][0] <= start and missing.ranges[-1][1] >= end
    with pytest.raises(CorruptData, match="missing from the store"):
        layer.open(lower).read(start, 10)
    # Only damaged chunks: repair makes them holes, the rest of the file stays.
    store.chunks[first] = data[start:end]
    layer2 = small_layer(store, ChunkerParams())
    damage = layer2.verify(lower, lambda n: None)
    assert [d.kind for d in damage] == [DAMAGED_CHUNKS] and damage[0].repairable
    layer2.repair(lower, damage)
    assert layer2.verify(lower, lambda n: None) == []
    fixed = layer2.open(lower).read(0, len(data))
    s3, e3 = entries.starts[3], entries.starts[4]
    assert fixed[:s3] == data[:s3] and fixed[s3:e3] == bytes(e3 - s3) and fixed[e3:] == data[e3:]


def test_verify_reports_a_corrupt_manifest():
    lower = MemoryFile(manifest.MAGIC + b"\0" * 700)
    damage = small_layer().verify(lower, lambda n: None)
    assert [d.kind for d in damage] == [CORRUPT_MANIFEST]


def test_import_plain_keeps_holes_as_holes():
    class Plain:
        def __init__(self) -> None:
            self.data = bytearray(5 << 20)
            self.data[:1000] = b"a" * 1000
            self.data[4 << 20 : (4 << 20) + 1000] = content("plain", 1000)

        def size(self) -> int:
            return len(self.data)

        def read(self, offset: int, size: int) -> bytes:
            return bytes(self.data[offset : offset + size])

        def data_ranges(self) -> Iterator[tuple[int, int]]:
            yield 0, 1000
            yield 4 << 20, (4 << 20) + 1000

    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    plain = Plain()
    done: list[int] = []
    lower = MemoryFile()
    upper = Stack([layer]).import_plain(plain, lower, done.append)
    upper.flush()
    assert sum(done) == plain.size()
    assert layer.open(lower).read(0, 6 << 20) == bytes(plain.data)
    assert store.stored_bytes < 600 << 10


# ----------------------------------------------------------------------------- the provider


class Secrets:
    def __init__(self, passphrase: bytes, master: bytes | None = None) -> None:
        self._passphrase = passphrase
        self._master = master

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        return self._passphrase

    def master_key(self) -> bytes | None:
        return self._master


def test_store_specs():
    assert parse_store("local") == ("local", "", "")
    assert parse_store("s3://bucket/some/prefix/") == ("s3", "bucket", "some/prefix")
    for bad in ("s3://", "nfs://x", "s3:///x", "", "s3://w/p", "s3://Upper/p", "s3://-x-/p"):
        with pytest.raises(ProviderError):
            parse_store(bad)
    assert parse_store("s3://isofs-bench.1/p") == ("s3", "isofs-bench.1", "p")


def test_initialise_records_the_chunking_and_refuses_bad_options(tmp_path: Path):
    config = DedupProvider.initialise(
        tmp_path, SetupRequest(options={"chunk_avg": "32K", "chunk_min": "8K"})
    )
    assert config["chunking"] == {"mode": "fastcdc", "min": 8192, "avg": 32768, "max": 262144}
    assert config["store"] == "local" and config["encrypt_chunks"] is False
    fixed = DedupProvider.initialise(tmp_path, SetupRequest(options={"fixed": True}))
    assert fixed["chunking"]["mode"] == "fixed" and fixed["chunking"]["max"] == 65536
    for bad in ({"chunk_avg": "48K"}, {"chunk_min": "128K"}, {"store": "ftp://x"},
                {"endpoint": "http://127.0.0.1:1"}, {"level": 99}):  # fmt: skip
        with pytest.raises(ProviderError):
            DedupProvider.initialise(tmp_path, SetupRequest(options=bad))
    with pytest.raises(ProviderError, match="malformed chunking"):
        DedupProvider.load(tmp_path, {"version": 1, "chunking": {"mode": "x"}}, SetupRequest())


def test_the_chunk_key_is_stored_wrapped_and_its_passphrase_can_change(tmp_path: Path):
    report: dict[str, str] = {}
    request = SetupRequest(
        options={"encrypt_chunks": True, "scrypt_n": 16384},
        secrets=Secrets(b"old passphrase"),
        report=report,
    )
    DedupProvider.initialise(tmp_path, request)
    recovery = report["dedup_key"]
    stored = (tmp_path / "dedup" / "key.json").read_text()
    assert recovery.replace("-", "") not in stored.replace("-", "")
    assert (tmp_path / "dedup" / "key.json").stat().st_mode & 0o077 == 0
    from isofs_providers.encrypt.keystore import unlock

    document = __import__("json").loads(stored)
    assert bytes(unlock(document, Secrets(b"old passphrase"))).hex() == recovery.replace("-", "")
    with pytest.raises(ProviderError, match="wrong"):
        DedupProvider.change_passphrase(tmp_path, Secrets(b"wrong"), Secrets(b"new"))
    assert (tmp_path / "dedup" / "key.json").read_text() == stored
    assert DedupProvider.change_passphrase(tmp_path, Secrets(b"old passphrase"), Secrets(b"new"))
    document = __import__("json").loads((tmp_path / "dedup" / "key.json").read_text())
    assert bytes(unlock(document, Secrets(b"new"))).hex() == recovery.replace("-", "")
    assert not DedupProvider.change_passphrase(tmp_path / "none", Secrets(b"a"), Secrets(b"b"))


# ----------------------------------------------------------------------------- commands


class Source:
    """In-memory files standing for a source's native files (for the commands)."""

    def __init__(self, layer: DedupLayer) -> None:
        self.layer = layer
        self.files: dict[str, MemoryFile] = {}
        self.output = io.StringIO()
        self.lock = threading.Lock()

    def remove(self, name: str) -> None:
        with self.lock:
            self.files.pop(name, None)

    def write(self, name: str, data: bytes) -> None:
        with self.lock:
            lower = self.files.setdefault(name, MemoryFile())
        upper = self.layer.open(lower) if lower.size() else self.layer.create(lower)
        upper.truncate(0)
        upper.write(0, data)
        upper.flush()

    def request(self, **options: Any) -> CommandRequest:
        def files() -> Iterable[tuple[str, Callable[[bool], MemoryFile]]]:
            with self.lock:
                snapshot = sorted(self.files.items())
            for name, lower in snapshot:
                yield name, (lambda writable, lower=lower: lower)

        return CommandRequest(
            source=Path("/src"), meta_dir=Path("/src/.isofs"), stack=Stack([self.layer]),
            layer=self.layer, options=options, files=files,
            out=lambda line: print(line, file=self.output),
        )  # fmt: skip


def _command(name: str) -> Callable[[CommandRequest], int]:
    return next(c.run for c in DedupProvider.commands if c.name == name)


def test_gc_frees_what_no_manifest_names_and_keeps_copied_manifests():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    source = Source(layer)
    source.write("a", content("a", 1 << 20))
    source.write("b", content("b", 1 << 20))
    source.files["copy-of-b"] = MemoryFile(bytes(source.files["b"].data))  # a native cp
    source.files["plain"] = MemoryFile(b"not a manifest")
    source.write("b", content("b2", 1 << 20))  # b changes; its copy keeps the old chunks
    del source.files["a"]  # unlinked natively: its chunks are garbage
    before = store.stored_bytes
    assert _command("gc")(source.request(repack_percent=30)) == 0
    assert "3 manifests" not in source.output.getvalue()
    assert before - store.stored_bytes >= (1 << 20) - (300 << 10)
    for name in ("b", "copy-of-b"):
        upper = layer.open(source.files[name])
        assert upper.read(0, 1 << 21) == content("b2" if name == "b" else "b", 1 << 20)


def test_gc_refuses_to_free_anything_when_a_manifest_is_unreadable():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    source = Source(layer)
    source.write("a", content("a", 300_000))
    source.write("gone", content("gone", 300_000))
    del source.files["gone"]
    source.files["broken"] = MemoryFile(manifest.MAGIC + b"\0" * 700)
    before = store.stored_bytes
    with pytest.raises(ProviderError, match="broken"):
        _command("gc")(source.request())
    assert store.stored_bytes == before


def test_dedup_stats_and_check():
    store = MemoryStore()
    layer = small_layer(store, ChunkerParams())
    source = Source(layer)
    shared = content("shared", 2 << 20)
    source.write("a", shared)
    source.write("b", shared)
    assert _command("dedup-stats")(source.request(json=True)) == 0
    figures = __import__("json").loads(source.output.getvalue())
    assert figures["logical_bytes"] == 4 << 20 and figures["manifests"] == 2
    assert figures["stored_bytes"] == 2 << 20 and figures["dedup_ratio"] == 2.0
    # Refcounts: the store heard of one reference per chunk per file; a copy adds one.
    source.files["c"] = MemoryFile(bytes(source.files["a"].data))
    source.output = io.StringIO()
    assert _command("dedup-check")(source.request()) == 0
    assert all(count == 3 for count in store.refs.values() if count)
    lost = layer.load_manifest(source.files["a"]).id(2)
    del store.chunks[lost]
    source.output = io.StringIO()
    assert _command("dedup-check")(source.request()) == 1
    text = source.output.getvalue()
    assert "a: 1 chunks missing" in text and "c: 1 chunks missing" in text


def test_gc_racing_writers_never_frees_a_chunk_a_manifest_refers_to(tmp_path: Path):
    store = MemoryStore()
    barrier = WriterBarrier(tmp_path / "writers.lock")
    layer = small_layer(store, ChunkerParams(), barrier=barrier)
    source = Source(layer)
    source.write("seed", content("seed", 200_000))
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        rng = random.Random(5)
        try:
            n = 0
            while not stop.is_set():
                n += 1
                # Rewrite files whose chunks are also in files being deleted.
                data = content(f"v{rng.randrange(4)}", 150_000) + content(f"w{n}", 1000)
                source.write(f"f{n % 3}", data)
                if n % 4 == 0:
                    source.remove(f"f{(n + 1) % 3}")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        for _ in range(60):
            assert _command("gc")(source.request()) == 0
    finally:
        stop.set()
        thread.join()
    assert not errors
    for name, lower in list(source.files.items()):
        assert all(store.has(stored_ids(layer, lower))), f"{name} lost a chunk"
