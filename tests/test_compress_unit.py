"""Unit tests of the compress provider (no FUSE): the format, random access, writes, stacks.

Two decoders that share no code with the provider check every file the tests make: the
stock `zstd -d` command (the native file must be a plain zstd stream), and `decode_native`
below, written from docs/FORMAT-compress.md (header frame, slots with trailers, the seek
table and its footer). The model-based tests run random read/write/truncate/flush/reopen
sequences against a bytearray over an in-memory lower file and over the encrypt layer in
both stack orders.
"""

from __future__ import annotations

import errno
import os
import random
import shutil
import struct
import subprocess
import time
import tracemalloc
from pathlib import Path

import pytest
import xxhash
import zstandard
from compress_support import source_like
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isofs.provider import CorruptData, MemoryFile, ProviderError, SetupRequest
from isofs_providers.compress import CompressLayer, CompressProvider
from isofs_providers.compress import format as fmt
from isofs_providers.compress.file import INCOMPRESSIBLE_RUN, LOCAL_LIMIT
from isofs_providers.encrypt import EncryptLayer

F = 64 << 10  # the smallest frame size keeps the tests' data small
MASTER = bytes(range(32))
ROOT = Path(__file__).resolve().parent.parent

needs_zstd = pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed")


class Recording:
    """A proxy that records the writes made on the file it wraps."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.writes: list[tuple[int, int]] = []

    def write(self, offset: int, data: bytes) -> int:
        self.writes.append((offset, len(data)))
        return self.inner.write(offset, data)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


# ------------------------------------------------------------ the independent decoders


def zstd_cli(native: bytes | bytearray) -> bytes:
    """What the stock zstd command makes of a native file."""
    result = subprocess.run(
        ["zstd", "-d", "-c", "-q"], input=bytes(native), capture_output=True, timeout=60
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def u32(buf: bytes | bytearray, at: int) -> int:
    return int.from_bytes(buf[at : at + 4], "little")


def decode_native(native: bytes | bytearray) -> bytes:
    """The logical bytes of a native file, checking every rule of the format document."""
    native = bytes(native)
    # §2 header frame
    assert u32(native, 0) == 0x184D2A50 and u32(native, 4) == 24, "header frame"
    assert native[8:16] == b"ISOFSZST"
    version, flags, frame_size, _level, reserved = struct.unpack_from("<HHIiI", native, 16)
    assert (version, flags, reserved) == (1, 0, 0)
    assert frame_size in (1 << 16, 1 << 17, 1 << 18, 1 << 19, 1 << 20)
    # §5 footer and seek table
    count, descriptor, magic = struct.unpack("<IBI", native[-9:])
    assert magic == 0x8F92EAB1 and descriptor == 0x80 and count >= 1
    table_at = len(native) - (17 + 12 * count)
    assert table_at >= 32
    assert u32(native, table_at) == 0x184D2A5E and u32(native, table_at + 4) == 12 * count + 9
    entries = [struct.unpack_from("<III", native, table_at + 8 + 12 * i) for i in range(count)]
    assert entries[0] == (32, 0, xxhash.xxh64_intdigest(b"") & 0xFFFFFFFF)
    offset, out = 32, []
    for index, (slot_size, length, checksum) in enumerate(entries[1:]):
        slot = native[offset : offset + slot_size]
        assert len(slot) == slot_size
        # §4 trailer: found from the slot's end
        tail_index, _generation, trailer_len = struct.unpack_from("<IQI", slot, slot_size - 16)
        assert tail_index == index and 24 <= trailer_len <= slot_size
        assert u32(slot, slot_size - trailer_len) == 0x184D2A51
        assert u32(slot, slot_size - trailer_len + 4) == trailer_len - 8
        frame = slot[: slot_size - trailer_len]
        params = zstandard.get_frame_parameters(frame)
        assert params.content_size == length and params.has_checksum
        assert length == frame_size or (index == count - 2 and 1 <= length <= frame_size)
        content = zstandard.ZstdDecompressor().decompress(frame)
        assert len(content) == length
        digest = xxhash.xxh64_intdigest(content) & 0xFFFFFFFF
        assert digest == checksum == u32(frame, len(frame) - 4)
        out.append(content)
        offset += slot_size
    assert offset == table_at, "slot sizes add up to the seek table's offset"
    return b"".join(out)


# ------------------------------------------------------------ data and stacks

_CORPUS = source_like(2 << 20)


def text(length: int, seed: int = 0) -> bytes:
    """Compressible bytes (source code), `length` of them."""
    start = seed % len(_CORPUS)
    return ((_CORPUS[start:] + _CORPUS) * (length // len(_CORPUS) + 2))[:length]


def noise(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def make_data(kind: str, length: int, seed: int) -> bytes:
    if kind == "text":
        return text(length, seed)
    if kind == "zeros":
        return bytes(length)
    return noise(length, seed)


class Stack:
    """One of the three stacks under test over an in-memory native file."""

    def __init__(self, kind: str, frame_size: int = F, level: int = 3) -> None:
        self.kind = kind
        self.frame_size = frame_size
        self.level = level
        self.native = MemoryFile()
        self.upper = self._create()

    def _compress(self) -> CompressLayer:
        return CompressLayer(self.frame_size, self.level)

    def _create(self):
        if self.kind == "compress":
            return self._compress().create(self.native)
        if self.kind == "encrypt-under":  # encrypt nearest the disk, compress on top
            return self._compress().create(EncryptLayer(MASTER).create(self.native))
        self.spy = Recording(self._compress().create(self.native))
        return EncryptLayer(MASTER).create(self.spy)

    def reopen(self) -> None:
        self.upper.flush()
        if self.kind == "compress":
            self.upper = self._compress().open(self.native)
        elif self.kind == "encrypt-under":
            self.upper = self._compress().open(EncryptLayer(MASTER).open(self.native))
        else:
            self.spy = Recording(self._compress().open(self.native))
            self.upper = EncryptLayer(MASTER).open(self.spy)

    def stream(self) -> bytes:
        """The zstd stream: the native file, or under encrypt its plaintext."""
        if self.kind == "encrypt-under":
            lower = EncryptLayer(MASTER).open(MemoryFile(self.native.data))
            return lower.read(0, lower.size())
        return bytes(self.native.data)

    def check_native(self, model: bytes | bytearray) -> None:
        """After a flush: both decoders turn the native bytes into exactly `model`."""
        stream = self.stream()
        decoded = zstd_cli(stream)
        assert decoded == decode_native(stream)
        if self.kind == "encrypt-over":  # zstd restores the ciphertext; decrypt it
            plain = EncryptLayer(MASTER).open(MemoryFile(decoded))
            decoded = plain.read(0, plain.size())
        assert decoded == bytes(model)


STACKS = ["compress", "encrypt-under", "encrypt-over"]


# ------------------------------------------------------------ the format itself


def test_decoder_agrees_with_a_hand_made_file():
    # A file built from the document's bytes alone (one raw frame, one zstd frame).
    def skippable(magic: int, body: bytes) -> bytes:
        return struct.pack("<II", magic, len(body)) + body

    def trailer(index: int, length: int) -> bytes:
        body = bytes(length - 24) + struct.pack("<IQI", index, 7, length)
        return skippable(0x184D2A51, body)

    header = skippable(0x184D2A50, b"ISOFSZST" + struct.pack("<HHIiI", 1, 0, F, 3, 0))
    first = noise(F, 1)
    raw = (
        struct.pack("<IB", 0xFD2FB528, 0x64) + (F - 256).to_bytes(2, "little")
        + (1 | F << 3).to_bytes(3, "little") + first
        + struct.pack("<I", xxhash.xxh64_intdigest(first) & 0xFFFFFFFF)
    )  # fmt: skip
    second = text(100)
    packed = zstandard.ZstdCompressor(write_checksum=True).compress(second)
    slots = [raw + trailer(0, 24), packed + trailer(1, 31)]
    entries = [(32, 0, xxhash.xxh64_intdigest(b"") & 0xFFFFFFFF)] + [
        (len(s), len(d), xxhash.xxh64_intdigest(d) & 0xFFFFFFFF)
        for s, d in zip(slots, [first, second], strict=True)
    ]
    body = b"".join(struct.pack("<III", *e) for e in entries)
    table = skippable(0x184D2A5E, body + struct.pack("<IBI", 3, 0x80, 0x8F92EAB1))
    native = header + b"".join(slots) + table
    assert decode_native(native) == first + second
    upper = CompressLayer(F).open(MemoryFile(native))
    assert upper.size() == F + 100 and upper.read(0, F + 100) == first + second
    if shutil.which("zstd"):
        assert zstd_cli(native) == first + second
    # the frame our raw builder makes is byte for byte the document's
    assert bytes(fmt.raw_frame(first)) == raw


@needs_zstd
@pytest.mark.parametrize("slack", range(0, 12))
def test_any_slack_is_absorbed_by_the_trailer(slack):
    """Slack of 1..7 bytes (smaller than a skippable frame header) needs no special case:
    the slot's trailer always exists and just grows."""
    data = text(F + 10)
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    upper.write(0, data)
    upper.flush()
    table = upper.table
    frame0 = native.data[table.offsets[0] : table.offsets[1]]
    trailer = fmt.parse_trailer_at_end(memoryview(frame0))
    frame = bytes(frame0[: len(frame0) - trailer.length])
    grown = fmt.encode_slot(frame, 0, 1, len(frame) + fmt.TRAILER_MIN + slack)
    rest = native.data[table.offsets[1] : table.offsets[2]]
    sizes = fmt.array("I", [32, len(grown), len(rest)])
    built = (
        bytes(native.data[:32]) + grown + bytes(rest)
        + fmt.encode_table(sizes, fmt.array("I", [0, F, 10]),
                           fmt.array("I", [fmt.EMPTY_CHECKSUM, *table.checksums]))
    )  # fmt: skip
    assert zstd_cli(built) == decode_native(built) == data
    assert layer.open(MemoryFile(built)).read(0, F + 10) == data


@needs_zstd
@pytest.mark.parametrize("kind", ["text", "random"])
@pytest.mark.parametrize("frame_size", [64 << 10, 128 << 10])
def test_every_size_around_frame_boundaries_decodes_with_zstd(kind, frame_size):
    fs = frame_size
    for size in sorted({0, 1, fs - 1, fs, fs + 1, 2 * fs - 1, 2 * fs, 2 * fs + 1, 3 * fs - 3,
                        5 * fs + 17}):  # fmt: skip
        data = make_data(kind, size, size)
        native = MemoryFile()
        upper = CompressLayer(frame_size).create(native)
        for offset in range(0, size, 7777):  # unaligned pieces
            upper.write(offset, data[offset : offset + 7777])
        upper.flush()
        assert zstd_cli(native.data) == decode_native(native.data) == data, size
        again = CompressLayer(frame_size).open(MemoryFile(native.data))
        assert again.size() == size and again.read(0, size + 5) == data, size
        assert fmt.frame_count(size, frame_size) == again.stored_frames


def test_empty_file_is_a_complete_stream():
    native = MemoryFile()
    layer = CompressLayer(F)
    layer.create(native)
    assert len(native.data) == 32 + 17 + 12
    assert layer.is_formatted(native) and layer.open(native).size() == 0
    if shutil.which("zstd"):
        assert zstd_cli(native.data) == b""
    assert not layer.is_formatted(MemoryFile(b"plain text that is not compressed"))
    assert not layer.is_formatted(MemoryFile(b""))


@pytest.mark.parametrize("frame_size", [64 << 10, 128 << 10, 1 << 20])
def test_incompressible_data_grows_by_less_than_half_a_percent(frame_size):
    data = noise(8 << 20, 5)
    native = MemoryFile()
    upper = CompressLayer(frame_size).create(native)
    for offset in range(0, len(data), 1 << 20):
        upper.write(offset, data[offset : offset + (1 << 20)])
    upper.flush()
    growth = (len(native.data) - len(data)) / len(data)
    assert 0 < growth < 0.005, growth
    assert decode_native(native.data) == data


def test_incompressible_files_stop_being_tried_for_a_while():
    layer = CompressLayer(F)
    upper = layer.create(MemoryFile())
    upper.write(0, noise(64 * F, 2))
    upper.flush()
    stats = layer.statistics()
    assert stats["frames_compressed"] == 0
    assert stats["frames_raw"] <= 2 * INCOMPRESSIBLE_RUN + 2, stats  # only the probes
    assert stats["frames_raw_untried"] >= 64 - stats["frames_raw"]
    # compressible data later in the same file is compressed again once the pause ends
    upper.write(64 * F, text(2048 * F, 3))
    upper.flush()
    assert layer.statistics()["frames_compressed"] > 1000
    # a fresh file starts trying at once
    other = layer.create(MemoryFile())
    other.write(0, text(4 * F))
    other.flush()
    assert layer.statistics()["frames_compressed"] >= 1004


def test_rewrites_that_fit_are_written_in_place_with_only_their_table_entries():
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    model = bytearray(text(20 * F, 9))
    upper.write(0, model)
    upper.flush()
    size_before = len(native.data)
    table = upper.table
    native.writes.clear()
    # frame 5 becomes more compressible: it fits its slot
    patch = bytes(3000)
    upper.write(5 * F + 100, patch)
    model[5 * F + 100 : 5 * F + 3100] = patch
    upper.flush()
    assert len(native.data) == size_before
    table_at = table.offsets[-1]
    assert native.writes == [
        (table.offsets[5], table.slot_sizes[5]),
        (table_at + fmt.entry_offset(5), 12),
    ]
    assert decode_native(native.data) == model
    stats = layer.statistics()
    assert stats["in_place_rewrites"] == 1 and stats["tail_rewrites"] == 1  # the first write


def test_a_frame_that_outgrows_its_slot_lays_the_rest_out_again_with_headroom():
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    model = bytearray(text(30 * F, 4))
    upper.write(0, model)
    upper.flush()
    sizes_before = list(upper.table.slot_sizes)
    noisy = noise(5000, 1)  # frame 3 no longer fits
    upper.write(3 * F + 10, noisy)
    model[3 * F + 10 : 3 * F + 5010] = noisy
    upper.flush()
    assert decode_native(native.data) == model
    assert layer.statistics()["tail_rewrites"] == 2
    after = list(upper.table.slot_sizes)
    assert after[:3] == sizes_before[:3]
    assert all(a > b for a, b in zip(after[4:], sizes_before[4:], strict=True)), "headroom"
    # later rewrites of frames with headroom fit in place: one that grows a little, and one
    # that grows as much as frame 3 did (the headroom follows the largest growth seen)
    more = text(F, 77)[: F // 2]
    upper.write(12 * F, more)
    model[12 * F : 12 * F + len(more)] = more
    upper.flush()
    assert decode_native(native.data) == model
    assert layer.statistics()["tail_rewrites"] == 2
    upper.write(20 * F + 10, noise(5000, 2))
    model[20 * F + 10 : 20 * F + 5010] = noise(5000, 2)
    upper.flush()
    assert decode_native(native.data) == model
    assert layer.statistics()["tail_rewrites"] == 2
    assert layer.statistics()["in_place_rewrites"] == 2


def _headroom_everywhere(layer: CompressLayer, frames: int) -> tuple[MemoryFile, object, bytearray]:
    """A file of text whose frame 0 outgrew its slot: every slot has headroom."""
    native = MemoryFile()
    upper = layer.create(native)
    model = bytearray(text(frames * F, 4))
    upper.write(0, model)
    upper.flush()
    noisy = noise(5000, 1)
    upper.write(10, noisy)
    model[10:5010] = noisy
    upper.flush()
    assert layer.statistics()["tail_rewrites"] == 2
    return native, upper, model


def test_a_frame_that_outgrows_its_headroom_borrows_room_from_its_neighbours_only():
    layer = CompressLayer(F)
    native, upper, model = _headroom_everywhere(layer, 40)
    before = upper.table
    old_native = bytes(native.data)
    native.writes.clear()
    noisy = noise(12000, 2)  # more than frame 20's headroom, less than its neighbours'
    upper.write(20 * F + 100, noisy)
    model[20 * F + 100 : 20 * F + 12100] = noisy
    upper.flush()
    after = upper.table
    stats = layer.statistics()
    assert (stats["tail_rewrites"], stats["local_relayouts"]) == (2, 1)
    changed = [i for i in range(40) if before.slot_sizes[i] != after.slot_sizes[i]]
    assert changed and changed[0] <= 20 <= changed[-1] and len(changed) < 8
    first, stop = changed[0], changed[-1] + 1
    assert after.offsets[first] == before.offsets[first]
    assert after.offsets[stop:] == before.offsets[stop:], "nothing after the run moved"
    assert native.data[: before.offsets[first]] == old_native[: before.offsets[first]]
    table_at = before.offsets[-1]
    assert native.data[after.offsets[stop] : table_at] == old_native[after.offsets[stop] : table_at]
    assert len(native.data) == len(old_native)
    for offset, length in native.writes:  # the run (staged past the end first), its entries
        inside_run = before.offsets[first] <= offset and offset + length <= before.offsets[stop]
        assert inside_run or offset >= table_at, (offset, length)
    assert sum(length for _, length in native.writes) < 4 * (after.offsets[stop]
                                                              - after.offsets[first])  # fmt: skip
    assert decode_native(native.data) == model
    assert CompressLayer(F).open(MemoryFile(native.data)).read(0, len(model)) == model


def test_a_second_rewrite_that_outgrows_its_slot_before_the_headroom_lays_out_the_whole_file():
    """The first frame that outgrows its slot gives the rest of the file headroom; one before
    it that does so later, too far from that headroom to borrow from it (LOCAL_LIMIT), shows
    that rewrites land all over the file: all of it gets headroom, once, instead of one
    relayout of the rest per frame further to the front."""
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    model = bytearray(text(200 * F, 4))
    upper.write(0, model)
    upper.flush()
    sizes_before = list(upper.table.slot_sizes)
    assert upper.table.offsets[150] - upper.table.offsets[3] > LOCAL_LIMIT
    for frame, seed in ((150, 1), (3, 2)):
        noisy = noise(5000, seed)
        upper.write(frame * F + 10, noisy)
        model[frame * F + 10 : frame * F + 5010] = noisy
        upper.flush()
    assert layer.statistics()["tail_rewrites"] == 3
    after = list(upper.table.slot_sizes)
    assert all(a > b for a, b in zip(after, sizes_before, strict=True)), "headroom everywhere"
    assert decode_native(native.data) == model


def test_a_relayout_moves_the_rest_of_the_file_up_in_place_writing_it_about_once():
    """Slots move up back to front where they belong; only the first few, which move less
    than their own size, are staged past the end (staging all of it would write it twice)."""
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    model = bytearray(text(100 * F, 4))
    upper.write(0, model)
    upper.flush()
    native.writes.clear()
    noisy = noise(5000, 1)
    upper.write(3 * F + 10, noisy)
    model[3 * F + 10 : 3 * F + 5010] = noisy
    upper.flush()
    assert layer.statistics()["tail_rewrites"] == 2
    written = sum(length for _, length in native.writes)
    rest = len(native.data) - upper.table.offsets[3]  # with its headroom now
    assert rest < written < 1.2 * rest, (written, rest)
    staged_at = max(offset for offset, _ in native.writes)
    assert staged_at >= len(native.data), "something was staged past the end"
    assert decode_native(native.data) == model


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_rewrites_reach_a_steady_state_where_every_rewrite_is_in_place(seed):
    """4 KiB random rewrites of text with text, each flushed (fsync): at most two relayouts
    (the rest of the file from the first frame that outgrew its slot, then the whole file),
    then every rewrite is written in place."""
    layer = CompressLayer(F)
    native = MemoryFile()
    upper = layer.create(native)
    size = 200 * F
    model = bytearray(text(size, 3))
    upper.write(0, model)
    upper.flush()
    rng = random.Random(seed)

    def rewrite(count: int) -> dict[str, int]:
        start = layer.statistics()
        for _ in range(count):
            offset = rng.randrange(size // 4096) * 4096
            data = text(4096, rng.randrange(10**6))
            upper.write(offset, data)
            model[offset : offset + 4096] = data
            upper.flush()
        end = layer.statistics()
        keys = ("tail_rewrites", "local_relayouts", "in_place_rewrites")
        return {k: end[k] - start[k] for k in keys}

    first = rewrite(100)
    assert first["tail_rewrites"] <= 2, first
    assert rewrite(100) == {"tail_rewrites": 0, "local_relayouts": 0, "in_place_rewrites": 100}
    assert decode_native(native.data) == model


def test_holes_and_zero_extension_cost_a_few_bytes_per_frame():
    native = MemoryFile()
    upper = CompressLayer(F).create(native)
    upper.write(300 * F + 5, b"tail")
    upper.truncate(400 * F)
    upper.flush()
    assert len(native.data) < 400 * 120
    again = CompressLayer(F).open(MemoryFile(native.data))
    assert again.size() == 400 * F
    assert again.read(0, F) == bytes(F)
    assert again.read(300 * F, 16) == bytes(5) + b"tail" + bytes(7)


def test_shrinking_then_growing_reads_zeros_not_old_bytes():
    native = MemoryFile()
    upper = CompressLayer(F).create(native)
    data = text(3 * F + 50)
    upper.write(0, data)
    upper.flush()
    upper.truncate(F + 10)
    upper.truncate(3 * F)
    expect = data[: F + 10] + bytes(2 * F - 10)
    assert upper.read(0, 3 * F) == expect
    upper.flush()
    assert decode_native(native.data) == expect
    upper.truncate(0)
    upper.flush()
    assert decode_native(native.data) == b"" and len(native.data) == 61


def test_sizes_past_the_seekable_formats_limit_fail_with_efbig_and_change_nothing():
    native = MemoryFile()
    upper = CompressLayer(F).create(native)
    upper.write(0, b"kept")
    limit = (fmt.MAX_ENTRIES - 1) * F
    for attempt in (lambda: upper.truncate(limit + 1), lambda: upper.write(limit, b"x")):
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EFBIG
    assert upper.size() == 4
    upper.flush()
    assert decode_native(native.data) == b"kept"
    assert set(CompressLayer(F).statistics()) >= {
        "level", "frame_size", "frames_compressed", "frames_raw", "frames_raw_untried",
        "bytes_in", "bytes_out", "ratio",
    }  # fmt: skip


@pytest.mark.parametrize("level", [-5, 1, 19])
def test_levels(level):
    layer = CompressLayer(F, level)
    native = MemoryFile()
    upper = layer.create(native)
    data = text(3 * F)
    upper.write(0, data)
    upper.flush()
    assert decode_native(native.data) == data
    assert struct.unpack_from("<i", native.data, 24)[0] == level
    assert CompressLayer(F, 3).open(native).read(0, len(data)) == data


def test_compress_under_encrypt_sees_encrypt_block_writes():
    stack = Stack("encrypt-over")
    data = text(5 * F + 123)
    stack.upper.write(0, data)
    stack.upper.flush()
    offsets = {offset for offset, _ in stack.spy.writes}
    assert any(offset % F for offset in offsets), "writes arrive unaligned to frames"
    assert all((offset - 32) % 4124 == 0 for offset in offsets if offset >= 32)
    stack.check_native(data) if shutil.which("zstd") else None


# ------------------------------------------------------------ the model

_offsets = st.one_of(
    st.integers(0, 5 * F),
    st.sampled_from([0, 1, F - 1, F, F + 1, 2 * F - 1, 2 * F, 2 * F + 1, 3 * F - 4096, 4 * F]),
)
_data = st.builds(
    make_data, st.sampled_from(["text", "text", "random", "zeros"]),
    st.integers(1, 2 * F + 300), st.integers(0, 2**32),
)  # fmt: skip
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, _data),
        st.tuples(st.just("write"), _offsets, st.binary(min_size=1, max_size=5000)),
        st.tuples(st.just("truncate"), _offsets),
        st.tuples(st.just("read"), _offsets, st.integers(0, 3 * F)),
        st.tuples(st.just("flush")),
        st.tuples(st.just("reopen")),
    ),
    max_size=18,
)


def run_model(stack: Stack, ops: list) -> None:
    model = bytearray()
    for op in ops:
        if op[0] == "write":
            _, offset, data = op
            assert stack.upper.write(offset, data) == len(data)
            if offset > len(model):
                model.extend(bytes(offset - len(model)))
            model[offset : offset + len(data)] = data
        elif op[0] == "truncate":
            stack.upper.truncate(op[1])
            del model[op[1] :]
            model.extend(bytes(op[1] - len(model)))
        elif op[0] == "read":
            _, offset, size = op
            assert stack.upper.read(offset, size) == model[offset : offset + size]
        elif op[0] == "flush":
            stack.upper.flush()
            stack.check_native(model)
        else:
            stack.reopen()
        assert stack.upper.size() == len(model)
    stack.upper.flush()
    stack.check_native(model)
    stack.reopen()
    assert stack.upper.read(0, len(model) + 1) == model


@needs_zstd
@pytest.mark.parametrize("kind", STACKS)
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_ops)
def test_model(kind, ops):
    run_model(Stack(kind), ops)


@needs_zstd
@pytest.mark.parametrize("kind", STACKS)
def test_long_model_with_dirty_frames_written_out_under_pressure(kind):
    stack = Stack(kind)
    compress = stack.spy.inner if kind == "encrypt-over" else stack.upper
    compress.dirty_limit = 4 * F  # write-outs happen inside write() too
    rng = random.Random(kind)
    ops: list = []
    for _ in range(80):
        ops.append(("write", rng.randrange(0, 40 * F), make_data(
            rng.choice(["text", "random"]), rng.randrange(1, 3 * F), rng.randrange(1 << 30))))
        if rng.random() < 0.1:
            ops.append(("truncate", rng.randrange(0, 40 * F)))
        if rng.random() < 0.1:
            ops.append(("flush",))
        if rng.random() < 0.2:
            ops.append(("read", rng.randrange(0, 40 * F), rng.randrange(0, 3 * F)))
        if rng.random() < 0.03:
            ops.append(("reopen",))
    run_model(stack, ops)


# ------------------------------------------------------------ the provider


def test_provider_options_and_config(tmp_path):
    config = CompressProvider.initialise(tmp_path, SetupRequest(options={"level": 7}))
    assert config == {"version": 1, "level": 7, "frame_size": 128 << 10}
    layer = CompressProvider.load(tmp_path, config, SetupRequest())
    assert (layer.level, layer.frame_size, layer.block_size) == (7, 128 << 10, 128 << 10)
    assert CompressProvider.load(tmp_path, config, SetupRequest(options={"level": -3})).level == -3
    assert layer.logical_size(12345) is None
    parsed = CompressProvider.parse_options({"level": "9", "frame_size": "256K"}, "init")
    assert parsed == {"level": 9, "frame_size": 256 << 10}
    assert CompressProvider.parse_options({"level": "2"}, "mount") == {"level": 2}
    with pytest.raises(ProviderError, match="only be given at init"):
        CompressProvider.parse_options({"frame_size": "64K"}, "mount")
    for bad in ({"frame_size": "96K"}, {"frame_size": "2M"}, {"level": "20"}, {"level": "x"}):
        with pytest.raises(ProviderError):
            opts = CompressProvider.parse_options(bad, "init")
            CompressProvider.initialise(tmp_path, SetupRequest(options=opts))
    with pytest.raises(ProviderError, match="level 0"):
        CompressProvider.initialise(tmp_path, SetupRequest(options={"level": 0}))
    with pytest.raises(ProviderError, match="config version"):
        CompressProvider.load(tmp_path, {"version": 2}, SetupRequest())


def test_open_reads_only_the_header_and_the_seek_table():
    native = MemoryFile()
    upper = CompressLayer(F).create(native)
    upper.write(0, text(400 * F))  # 25 MiB in 400 frames
    upper.flush()

    probe = MemoryFile(native.data)
    assert CompressLayer(F).open(probe).size() == 400 * F
    assert sum(size for _, size in probe.reads) <= 32 + (16 << 10)
    assert len(probe.reads) == 2


def test_reads_decode_only_the_frames_they_touch():
    layer = CompressLayer(F)
    upper = layer.create(MemoryFile())
    upper.write(0, text(50 * F))
    upper.flush()
    upper = layer.open(upper._lower)
    before = layer.statistics()["frames_decoded"]
    assert upper.read(10 * F - 5, 10) == text(50 * F)[10 * F - 5 : 10 * F + 5]
    assert layer.statistics()["frames_decoded"] - before == 2
    upper.read(20 * F, 8 * F)  # one batch of 8 frames
    assert layer.statistics()["frames_decoded"] - before == 10


# ------------------------------------------------------------ the adversarial decoder


def valid_file(frames: float = 3.5, kind: str = "text") -> tuple[bytes, bytes]:
    data = make_data(kind, int(frames * F), 11)
    native = MemoryFile()
    upper = CompressLayer(F).create(native)
    upper.write(0, data)
    upper.flush()
    return bytes(native.data), data


def decode_hostile(native: bytes | bytearray, original: bytes | None = None) -> str:
    """Open and read a hostile native file frame by frame: 'ok', 'corrupt' or 'plain';
    bytes that read successfully must be the original's. Bounded time and memory."""
    layer = CompressLayer(F)
    lower = MemoryFile(native)
    tracemalloc.start()
    started = time.monotonic()
    try:
        if not layer.is_formatted(lower):
            return "plain"
        try:
            upper = layer.open(lower)
        except CorruptData:
            return "corrupt"
        size = upper.size()
        assert size <= upper.stored_frames * F
        outcome = "ok"
        for offset in range(0, min(size, 64 * F), F):
            try:
                got = upper.read(offset, F)
            except CorruptData:
                outcome = "corrupt"
                continue
            if original is not None:
                assert got == original[offset : offset + F], f"wrong bytes at {offset}"
        return outcome
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < 8 * (F + len(native)) + (4 << 20), peak
        assert time.monotonic() - started < 10


def check_maintenance_is_bounded(native: bytes | bytearray) -> None:
    """verify/last_valid_size/repair on hostile bytes end in Damage, never another error."""
    layer = CompressLayer(F)
    lower = MemoryFile(native)
    if not layer.is_formatted(lower):
        return
    started = time.monotonic()
    damage = layer.verify(lower, lambda _n: None)
    assert all(d.kind for d in damage)
    assert 0 <= layer.last_valid_size(lower) <= len(native)
    if damage and all(d.repairable for d in damage):
        layer.repair(lower, damage)
        assert layer.verify(lower, lambda _n: None) == []
    assert time.monotonic() - started < 30


_HEADER = fmt.encode_header(F, 3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=3000), st.booleans())
def test_arbitrary_bytes_end_in_corrupt_data(blob, with_header):
    native = (_HEADER + blob) if with_header else blob
    assert decode_hostile(native) in ("corrupt", "plain", "ok")
    check_maintenance_is_bounded(native)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 10**9), st.data())
def test_truncated_files(seed, data):
    native, original = valid_file(3.5, "text" if seed % 2 else "random")
    cut = data.draw(st.integers(0, len(native) - 1))
    outcome = decode_hostile(native[:cut], original)
    assert outcome in ("corrupt", "plain")
    check_maintenance_is_bounded(native[:cut])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_bit_flips_never_give_wrong_bytes(data):
    native, original = valid_file(3.5, data.draw(st.sampled_from(["text", "random"])))
    damaged = bytearray(native)
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(0, len(native) - 1))
        damaged[at] ^= 1 << data.draw(st.integers(0, 7))
    decode_hostile(damaged, original)  # reads that succeed return the original's bytes
    check_maintenance_is_bounded(damaged)


def _with_footer(native: bytes, count: int) -> bytes:
    return native[:-9] + struct.pack("<IBI", count, 0x80, 0x8F92EAB1)


def _with_entry(native: bytes, index: int, slot: int, length: int, checksum: int) -> bytes:
    count = struct.unpack_from("<I", native, len(native) - 9)[0]
    at = len(native) - (17 + 12 * count) + 8 + 12 * (index + 1)
    return native[:at] + struct.pack("<III", slot, length, checksum) + native[at + 12 :]


def test_crafted_seek_tables_end_in_corrupt_data_quickly():
    native, original = valid_file(3.5)
    table = CompressLayer(F).open(MemoryFile(native)).table
    sizes, sums = table.slot_sizes, table.checksums
    cases = {
        "2^27 frames": _with_footer(native, 1 << 27),
        "2^32-1 frames": _with_footer(native, (1 << 32) - 1),
        "no frames": _with_footer(native, 0),
        "a 2 GiB frame": _with_entry(native, 1, sizes[1], 2 << 30, sums[1]),
        "a 2 GiB last frame": _with_entry(native, 3, sizes[3], 2 << 30, sums[3]),
        "a 4 GiB slot": _with_entry(native, 0, (1 << 32) - 1, F, sums[0]),
        "sizes that do not add up": _with_entry(native, 2, sizes[2] + 1, F, sums[2]),
        "a short middle frame": _with_entry(native, 1, sizes[1], F - 1, sums[1]),
        "descriptor without checksums": native[:-5] + b"\x00" + native[-4:],
        "reserved descriptor bits": native[:-5] + b"\xc0" + native[-4:],
    }
    for name, crafted in cases.items():
        assert decode_hostile(crafted, original) == "corrupt", name
        check_maintenance_is_bounded(crafted)


def test_frames_that_do_not_match_their_entries_end_in_corrupt_data():
    native, original = valid_file(4)  # four full frames: slots can trade places
    layer = CompressLayer(F)
    table = layer.open(MemoryFile(native)).table
    o = table.offsets
    slots = [native[o[i] : o[i + 1]] for i in range(4)]
    # two slots swapped, the table following them (sizes add up): trailers name the frames
    swapped = native[: o[0]] + slots[1] + slots[0] + b"".join(slots[2:]) + native[o[4] :]
    swapped = _with_entry(swapped, 0, len(slots[1]), F, table.checksums[1])
    swapped = _with_entry(swapped, 1, len(slots[0]), F, table.checksums[0])
    upper = layer.open(MemoryFile(swapped))
    for index in (0, 1):
        with pytest.raises(CorruptData, match=f"frame {index}: its slot holds frame {1 - index}"):
            upper.read(index * F, 10)
    assert upper.read(2 * F, F) == original[2 * F : 3 * F]
    # an entry whose checksum is another frame's
    wrong = _with_entry(native, 2, table.slot_sizes[2], F, table.checksums[3])
    with pytest.raises(CorruptData, match="does not match its seek table entry"):
        layer.open(MemoryFile(wrong)).read(2 * F, 1)
    # a frame whose header claims 2 GiB, and one claiming a 2 GiB window
    frame_at = o[1]
    huge = bytearray(native)
    huge[frame_at + 4] = 0x84 | 0x20  # single segment, 4-byte content size
    huge[frame_at + 5 : frame_at + 9] = (2 << 30).to_bytes(4, "little")
    window = bytearray(native)
    window[frame_at + 4] = 0x84  # content size 4 bytes, a window descriptor
    window[frame_at + 5] = 21 << 3  # 2 GiB
    for crafted in (huge, window):
        assert decode_hostile(crafted, original) == "corrupt"
        with pytest.raises(CorruptData):
            layer.open(MemoryFile(crafted)).read(F, 1)
        check_maintenance_is_bounded(crafted)


def test_a_scan_of_hostile_bytes_is_linear():
    """Garbage full of magic numbers: the recovery scan still ends quickly."""
    magic = fmt.ZSTD_MAGIC_BYTES + bytes([0x64, 0xFF, 0xFE])
    skippable = struct.pack("<II", fmt.TRAILER_MAGIC, 16)
    blob = _HEADER + (magic + skippable) * 40000  # 600 KB
    started = time.monotonic()
    check_maintenance_is_bounded(blob)
    assert time.monotonic() - started < 20


def test_zero_frames_are_cached_and_tiny():
    codec = CompressLayer(F).codec
    frame = codec.zero_frame(F)
    assert len(frame) < 40 and frame is codec.zero_frame(F)
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes(F)


def test_raw_frames_decode_with_zstd_everywhere_on_the_size_ranges():
    for length in (1, 255, 256, 65535, 65791, 65792, 128 << 10, (128 << 10) + 1, 1 << 20):
        data = os.urandom(length)
        frame = bytes(fmt.raw_frame(data))
        assert len(frame) == fmt.raw_frame_size(length)
        assert zstandard.ZstdDecompressor().decompress(frame) == data
        header = fmt.parse_frame_header(frame, 0, len(frame), length)
        assert fmt.frame_extent(frame, 0, len(frame), header) == len(frame)
        if shutil.which("zstd"):
            assert zstd_cli(frame) == data
