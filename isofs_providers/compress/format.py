"""The on-disk format of the `compress` provider: pure functions over bytes.

A formatted file is a zstd seekable stream (facebook/zstd contrib/seekable_format) that the
stock `zstd -d` decodes, specified to the byte in docs/FORMAT-compress.md; keep the two in step.
In order, every part a zstd frame or a skippable frame (which `zstd -d` ignores):

    header      skippable frame (magic 0x184D2A50): tag, version, frame size F, level
    slot 0..n-1 one zstd frame holding F logical bytes (the last 1..F), with its content size
                and content checksum, followed by a trailer skippable frame (magic
                0x184D2A51) that names the frame's index and absorbs any slack in the slot
    seek table  skippable frame (magic 0x184D2A5E): one entry per part before it (header
                first), then the 9-byte footer ending in the seekable magic 0x8F92EAB1

Everything that parses here treats its input as hostile: every length is checked against
the bytes actually there before it is used, nothing is allocated from a size field, and any
inconsistency raises `CorruptData` (EIO) with a one-line reason.
"""

from __future__ import annotations

import struct
import sys
from array import array
from dataclasses import dataclass
from itertools import accumulate

import xxhash

from isofs.provider import CorruptData

# --- magic numbers (all little-endian on disk) ---------------------------------------------

ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC_BASE = 0x184D2A50  # ... 0x184D2A5F: skippable frames
HEADER_MAGIC = 0x184D2A50
TRAILER_MAGIC = 0x184D2A51
SEEK_TABLE_MAGIC = 0x184D2A5E
SEEKABLE_MAGIC = 0x8F92EAB1

ZSTD_MAGIC_BYTES = struct.pack("<I", ZSTD_MAGIC)
TAG = b"ISOFSZST"
FORMAT_VERSION = 1

# --- sizes ----------------------------------------------------------------------------------

MIN_FRAME_SIZE = 64 << 10
MAX_FRAME_SIZE = 1 << 20
#: The seekable format's limit on entries (the header's entry included).
MAX_ENTRIES = 0x8000000
#: zstd's largest block (Block_Maximum_Size is min(window, 128 KiB)).
MAX_BLOCK = 128 << 10

_SKIPPABLE = struct.Struct("<II")  # magic, content size
SKIPPABLE_HEADER_SIZE = _SKIPPABLE.size  # 8
_HEADER_BODY = struct.Struct("<8sHHIiI")  # tag, version, flags, frame size, level, reserved
HEADER_SIZE = SKIPPABLE_HEADER_SIZE + _HEADER_BODY.size  # 32
_TRAILER_TAIL = struct.Struct("<IQI")  # frame index, generation, trailer length
TRAILER_MIN = SKIPPABLE_HEADER_SIZE + _TRAILER_TAIL.size  # 24
ENTRY_SIZE = 12  # compressed size, decompressed size, checksum (u32 each)
_FOOTER = struct.Struct("<IBI")  # number of entries, descriptor, seekable magic
FOOTER_SIZE = _FOOTER.size  # 9
CHECKSUM_FLAG = 0x80
_RESERVED_DESCRIPTOR_BITS = 0x7C
#: Seek table frame bytes besides its entries.
TABLE_OVERHEAD = SKIPPABLE_HEADER_SIZE + FOOTER_SIZE  # 17
#: Low 32 bits of XXH64 of no bytes: the header entry's checksum.
EMPTY_CHECKSUM = xxhash.xxh64_intdigest(b"") & 0xFFFFFFFF
_BIG_ENDIAN = sys.byteorder == "big"


def check_frame_size(frame_size: int) -> int:
    """`frame_size` if it is a power of two in 64 KiB .. 1 MiB, else ValueError."""
    if not (MIN_FRAME_SIZE <= frame_size <= MAX_FRAME_SIZE) or frame_size & (frame_size - 1):
        raise ValueError(f"frame size {frame_size} is not a power of two in 64K..1M")
    return frame_size


def frame_count(logical_size: int, frame_size: int) -> int:
    return -(-logical_size // frame_size)


def max_slot_size(frame_size: int) -> int:
    """No valid slot is longer: a raw frame plus a trailer padded by at most as much again."""
    return 2 * raw_frame_size(frame_size) + TRAILER_MIN


class Truncated(CorruptData):
    """A part runs past the end of the bytes given (a torn tail, when those end the file)."""


# --- the header -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Header:
    """What the leading skippable frame records (the level is the one the file was created
    with; later writes may use another)."""

    frame_size: int
    level: int


def encode_header(frame_size: int, level: int) -> bytes:
    body = _HEADER_BODY.pack(TAG, FORMAT_VERSION, 0, check_frame_size(frame_size), level, 0)
    return _SKIPPABLE.pack(HEADER_MAGIC, len(body)) + body


def looks_like_header(head: bytes | bytearray | memoryview) -> bool:
    """Whether a file starts with this format's header frame (magic, size and tag only)."""
    if len(head) < HEADER_SIZE:
        return False
    magic, size = _SKIPPABLE.unpack_from(head)
    return magic == HEADER_MAGIC and size == _HEADER_BODY.size and head[8:16] == TAG


def parse_header(head: bytes | bytearray | memoryview) -> Header:
    if not looks_like_header(head):
        raise CorruptData("compress: not a compressed file (no isofs header frame)")
    _tag, version, flags, frame_size, level, reserved = _HEADER_BODY.unpack_from(head, 8)
    if version != FORMAT_VERSION:
        raise CorruptData(f"compress: unsupported format version {version}")
    if flags or reserved:
        raise CorruptData(f"compress: unknown header flags {flags:#x}/{reserved:#x}")
    try:
        check_frame_size(frame_size)
    except ValueError as exc:
        raise CorruptData(f"compress: header: {exc}") from None
    return Header(frame_size, level)


# --- zstd frames ----------------------------------------------------------------------------


def raw_frame_size(length: int) -> int:
    """Bytes of the raw frame `raw_frame` builds for `length` content bytes."""
    blocks = max(1, -(-length // MAX_BLOCK))
    return 4 + 1 + _fcs_bytes(length) + 3 * blocks + length + 4


def _fcs_bytes(length: int) -> int:
    if length < 256:
        return 1
    if length < 65536 + 256:
        return 2
    return 4 if length < 1 << 32 else 8


def checksum_of(data: bytes | bytearray | memoryview) -> int:
    """zstd's content checksum: the low 32 bits of XXH64 (seed 0)."""
    return xxhash.xxh64_intdigest(data) & 0xFFFFFFFF


def raw_frame(data: bytes | bytearray | memoryview) -> bytearray:
    """A zstd frame storing `data` as raw blocks: content size and checksum, no compression.

    Frame header: magic, a descriptor with Single_Segment (window = content size) and
    Content_Checksum set, the content size in the fewest bytes; then raw blocks of at most
    128 KiB (the last one flagged), then the checksum.
    """
    view = memoryview(data)
    length = len(view)
    fcs_size = _fcs_bytes(length)
    fcs_flag = {1: 0, 2: 1, 4: 2, 8: 3}[fcs_size]
    out = bytearray(raw_frame_size(length))
    struct.pack_into("<IB", out, 0, ZSTD_MAGIC, fcs_flag << 6 | 1 << 5 | 1 << 2)
    stored = length - 256 if fcs_size == 2 else length
    out[5 : 5 + fcs_size] = stored.to_bytes(fcs_size, "little")
    pos = 5 + fcs_size
    start = 0
    while True:
        chunk = view[start : start + MAX_BLOCK]
        start += len(chunk)
        last = start >= length
        out[pos : pos + 3] = (int(last) | len(chunk) << 3).to_bytes(3, "little")
        out[pos + 3 : pos + 3 + len(chunk)] = chunk
        pos += 3 + len(chunk)
        if last:
            break
    struct.pack_into("<I", out, pos, checksum_of(view))
    return out


@dataclass(frozen=True)
class FrameHeader:
    """The parts of a zstd frame header the format relies on."""

    header_size: int
    content_size: int
    window_size: int


def parse_frame_header(
    buf: bytes | bytearray | memoryview, pos: int, end: int, max_content: int
) -> FrameHeader:
    """Parse and check a zstd frame header at `pos` (within `end`); CorruptData when it is
    not one this format writes: content size present and at most `max_content`, a content
    checksum, no dictionary, a window no larger than the frame's bound."""
    if end - pos < 6:
        raise Truncated("truncated zstd frame header")
    if buf[pos : pos + 4] != ZSTD_MAGIC_BYTES:
        raise CorruptData("not a zstd frame (bad magic)")
    fhd = buf[pos + 4]
    fcs_flag, single, reserved, checksum, dict_flag = (
        fhd >> 6, fhd >> 5 & 1, fhd >> 3 & 1, fhd >> 2 & 1, fhd & 3,
    )  # fmt: skip
    if reserved:
        raise CorruptData("zstd frame header has its reserved bit set")
    if dict_flag:
        raise CorruptData("zstd frame needs a dictionary")
    if not checksum:
        raise CorruptData("zstd frame has no content checksum")
    if not single and fcs_flag == 0:
        raise CorruptData("zstd frame has no content size")
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    size = 5 + (0 if single else 1) + fcs_size
    if end - pos < size:
        raise Truncated("truncated zstd frame header")
    window = 0
    if not single:
        descriptor = buf[pos + 5]
        exponent, mantissa = descriptor >> 3, descriptor & 7
        base = 1 << (10 + exponent)
        window = base + base // 8 * mantissa
    raw = int.from_bytes(buf[pos + size - fcs_size : pos + size], "little")
    content = raw + 256 if fcs_size == 2 else raw
    if content > max_content:
        raise CorruptData(f"zstd frame claims {content} bytes (at most {max_content} allowed)")
    if single:
        window = content
    elif window > max(max_content, 1 << 10):
        raise CorruptData(f"zstd frame needs a {window}-byte window")
    return FrameHeader(size, content, window)


def frame_extent(
    buf: bytes | bytearray | memoryview, pos: int, end: int, header: FrameHeader
) -> int:
    """Length of the zstd frame at `pos` whose header is `header`, by walking its block
    headers (bounded by `end` and the frame's content size); CorruptData if malformed."""
    block_max = min(header.window_size, MAX_BLOCK)
    at = pos + header.header_size
    regenerated = 0
    while True:
        if end - at < 3:
            raise Truncated("zstd frame is truncated (block header)")
        bh = buf[at] | buf[at + 1] << 8 | buf[at + 2] << 16
        last, kind, size = bh & 1, bh >> 1 & 3, bh >> 3
        at += 3
        if kind == 3:
            raise CorruptData("zstd frame has a reserved block type")
        if size > block_max:
            raise CorruptData("zstd block larger than the frame allows")
        stored = 1 if kind == 1 else size  # an RLE block stores one byte
        if kind != 2:
            regenerated += size
            if regenerated > header.content_size:
                raise CorruptData("zstd blocks hold more than the frame's content size")
        if end - at < stored:
            raise Truncated("zstd frame is truncated (block)")
        at += stored
        if last:
            break
    if end - at < 4:
        raise Truncated("zstd frame is truncated (checksum)")
    return at + 4 - pos


def frame_checksum(frame: bytes | bytearray | memoryview) -> int:
    """The content checksum stored in a frame's last 4 bytes."""
    return int.from_bytes(frame[-4:], "little")


# --- slot trailers --------------------------------------------------------------------------


def encode_trailer(index: int, generation: int, length: int) -> bytearray:
    """A trailer of exactly `length` (>= TRAILER_MIN) bytes: zero padding between its
    skippable-frame header and its tail (frame index, generation, length)."""
    if length < TRAILER_MIN:
        raise ValueError("trailer too short")
    out = bytearray(length)
    _SKIPPABLE.pack_into(out, 0, TRAILER_MAGIC, length - SKIPPABLE_HEADER_SIZE)
    _TRAILER_TAIL.pack_into(out, length - _TRAILER_TAIL.size, index, generation, length)
    return out


@dataclass(frozen=True)
class Trailer:
    index: int
    generation: int
    length: int


def parse_trailer_at_end(slot: bytes | bytearray | memoryview) -> Trailer:
    """The trailer that ends `slot` (found from its last 4 bytes)."""
    size = len(slot)
    if size < TRAILER_MIN:
        raise CorruptData("slot too short for a trailer")
    index, generation, length = _TRAILER_TAIL.unpack_from(slot, size - _TRAILER_TAIL.size)
    if not TRAILER_MIN <= length <= size:
        raise CorruptData("slot trailer has a bad length")
    magic, content = _SKIPPABLE.unpack_from(slot, size - length)
    if magic != TRAILER_MAGIC or content != length - SKIPPABLE_HEADER_SIZE:
        raise CorruptData("slot trailer is damaged")
    return Trailer(index, generation, length)


#: Bytes at the end of every trailer that give its length (index, generation, length).
TRAILER_TAIL = _TRAILER_TAIL.size  # 16


def trailer_length(tail: bytes | bytearray | memoryview, slot_size: int) -> int | None:
    """The trailer length a slot's last TRAILER_TAIL bytes give, if it can be one."""
    if len(tail) != TRAILER_TAIL:
        return None
    length = _TRAILER_TAIL.unpack(tail)[2]
    return length if TRAILER_MIN <= length <= slot_size else None


def is_trailer_head(head: bytes | bytearray | memoryview, length: int) -> bool:
    """Whether `head` is the skippable-frame header of a trailer of `length` bytes (with
    `trailer_length`, the checks of `parse_trailer_at_end` without reading the padding)."""
    if len(head) != SKIPPABLE_HEADER_SIZE:
        return False
    return _SKIPPABLE.unpack(head) == (TRAILER_MAGIC, length - SKIPPABLE_HEADER_SIZE)


def parse_trailer_at(buf: bytes | bytearray | memoryview, pos: int, end: int) -> Trailer:
    """The trailer starting at `pos` (what a scan finds after a frame)."""
    if end - pos < SKIPPABLE_HEADER_SIZE:
        raise Truncated("no room for a slot trailer")
    magic, content = _SKIPPABLE.unpack_from(buf, pos)
    length = content + SKIPPABLE_HEADER_SIZE
    if magic != TRAILER_MAGIC or length < TRAILER_MIN:
        raise CorruptData("no slot trailer after the frame")
    if end - pos < length:
        raise Truncated("the slot trailer is cut short")
    tail = pos + length - _TRAILER_TAIL.size
    index, generation, stored = _TRAILER_TAIL.unpack_from(buf, tail)
    if stored != length:
        raise CorruptData("slot trailer is damaged")
    return Trailer(index, generation, length)


def encode_slot(frame: bytes | bytearray, index: int, generation: int, slot_size: int) -> bytes:
    return b"".join((frame, encode_trailer(index, generation, slot_size - len(frame))))


# --- the seek table -------------------------------------------------------------------------


def table_size(entries: int) -> int:
    return TABLE_OVERHEAD + ENTRY_SIZE * entries


def encode_table(slot_sizes: array, decompressed: array, checksums: array) -> bytes:
    """The seek table frame for the given entries (header entry first), checksums on."""
    count = len(slot_sizes)
    fields = array("I", bytes(4 * 3 * count))
    fields[0::3] = slot_sizes
    fields[1::3] = decompressed
    fields[2::3] = checksums
    if _BIG_ENDIAN:
        fields.byteswap()
    body = fields.tobytes()
    return b"".join(
        (
            _SKIPPABLE.pack(SEEK_TABLE_MAGIC, len(body) + FOOTER_SIZE),
            body,
            _FOOTER.pack(count, CHECKSUM_FLAG, SEEKABLE_MAGIC),
        )
    )


def encode_entry(slot_size: int, decompressed: int, checksum: int) -> bytes:
    return struct.pack("<III", slot_size, decompressed, checksum)


def entry_offset(index: int) -> int:
    """Offset of frame `index`'s entry inside the seek table frame (the header's is 0)."""
    return SKIPPABLE_HEADER_SIZE + ENTRY_SIZE * (index + 1)


def parse_footer(footer: bytes | bytearray | memoryview, file_size: int) -> int:
    """Number of entries the last 9 bytes announce, checked against the file size."""
    if len(footer) != FOOTER_SIZE:
        raise CorruptData("compress: missing seek table (file too short)")
    count, descriptor, magic = _FOOTER.unpack(footer)
    if magic != SEEKABLE_MAGIC:
        raise CorruptData("compress: missing seek table (no seekable magic at the end)")
    if descriptor & _RESERVED_DESCRIPTOR_BITS or not descriptor & CHECKSUM_FLAG:
        raise CorruptData(f"compress: corrupt seek table (descriptor {descriptor:#x})")
    if not 1 <= count <= MAX_ENTRIES:
        raise CorruptData(f"compress: corrupt seek table ({count} entries)")
    if table_size(count) + HEADER_SIZE > file_size:
        raise CorruptData(f"compress: corrupt seek table ({count} entries in {file_size} bytes)")
    return count


@dataclass
class Table:
    """A parsed and checked seek table: per data frame its slot offset, size and checksum."""

    #: offsets[i] is where slot i starts; offsets[n] is where the seek table starts.
    offsets: array
    slot_sizes: array
    checksums: array
    #: Logical bytes in the last frame (F when it is full; 0 when there are no frames).
    last_size: int

    @property
    def frames(self) -> int:
        return len(self.slot_sizes)

    def logical_size(self, frame_size: int) -> int:
        return (self.frames - 1) * frame_size + self.last_size if self.frames else 0

    @classmethod
    def empty(cls) -> Table:
        return cls(array("Q", [HEADER_SIZE]), array("I"), array("I"), 0)


def encode_empty_table() -> bytes:
    """The seek table of a file without data frames (its only entry is the header's)."""
    return encode_table(array("I", [HEADER_SIZE]), array("I", [0]), array("I", [EMPTY_CHECKSUM]))


def parse_table(table: bytes | bytearray | memoryview, file_size: int, frame_size: int) -> Table:
    """Check a whole seek table frame (the file's last `len(table)` bytes) and index it.

    The entries must describe exactly the bytes before the table: the header first (its
    size, no content), then data frames of F logical bytes each but the last (1..F), every
    slot between the smallest and largest a slot can be, their sizes adding up to the
    table's offset.
    """
    count = parse_footer(table[-FOOTER_SIZE:], file_size)
    size = table_size(count)
    if len(table) != size:
        raise CorruptData("compress: corrupt seek table (length)")
    magic, content = _SKIPPABLE.unpack_from(table, 0)
    if magic != SEEK_TABLE_MAGIC or content != size - SKIPPABLE_HEADER_SIZE:
        raise CorruptData("compress: corrupt seek table (frame header)")
    fields = array("I")
    fields.frombytes(bytes(table[SKIPPABLE_HEADER_SIZE : size - FOOTER_SIZE]))
    if _BIG_ENDIAN:
        fields.byteswap()
    sizes, lengths, sums = fields[0::3], fields[1::3], fields[2::3]
    if sizes[0] != HEADER_SIZE or lengths[0] != 0 or sums[0] != EMPTY_CHECKSUM:
        raise CorruptData("compress: corrupt seek table (header entry)")
    frames = count - 1
    slots, data_lengths, checksums = sizes[1:], lengths[1:], sums[1:]
    last = 0
    if frames:
        last = data_lengths[-1]
        if not 1 <= last <= frame_size or data_lengths[:-1].count(frame_size) != frames - 1:
            raise CorruptData("compress: corrupt seek table (frame sizes do not add up)")
        if min(slots) < TRAILER_MIN + 13 or max(slots) > max_slot_size(frame_size):
            raise CorruptData("compress: corrupt seek table (impossible slot size)")
    offsets = array("Q", accumulate(slots, initial=HEADER_SIZE))
    if offsets[-1] != file_size - size:
        raise CorruptData("compress: corrupt seek table (slot sizes do not add up)")
    return Table(offsets, slots, checksums, last)
