"""fsck for the compress format: check every frame, and rebuild a file from what is intact.

`check_frames` decodes every frame through the seek table. When anything is wrong, `scan`
reads the file from the start the way a recovery tool must: zstd frames and skippable frames
one after the other, checking each frame's header, blocks and checksum and the trailer after
it (which names the frame's index and the write-out that wrote it), and resynchronising on
the next magic number after anything it cannot parse. `choose` then picks one intact copy per
frame (the seek table's own version when the table survived, else the newest), and `rebuild`
writes the file again from those, a frame of zeros for each one lost, and a new seek table.

A rewrite interrupted by a crash leaves the old slots not yet overwritten and the new slots
already written both intact, at different offsets; the trailers' indexes put them back in
order, so only the slot being written at the moment of the crash can be lost. The scan's work
is linear in the file's size whatever the bytes are (a budget on frame attempts), and it never
allocates more than a window of the file and one frame.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from dataclasses import dataclass, field

from isofs.provider import CorruptData, Progress, RandomAccessFile
from isofs_providers.compress import format as fmt
from isofs_providers.compress.codec import Codec
from isofs_providers.compress.file import CompressedFile

#: Bytes read per scan window (a window always holds a whole slot when the file does).
SCAN_WINDOW = 4 << 20
#: Bytes per batch when checking frames through the seek table.
CHECK_BATCH = 1 << 20
#: Bytes per copy when moving a rebuilt file into place.
COPY_CHUNK = 1 << 20
_SKIPPABLE_TAIL = bytes.fromhex("2a4d18")  # bytes 1..3 of every skippable magic


def check_frames(upper: CompressedFile, lower: RandomAccessFile, progress: Progress) -> list[int]:
    """Numbers of the frames that fail to decode through the seek table."""
    bad: list[int] = []
    frames = upper.stored_frames
    offsets = upper.table.offsets
    index = 0
    while index < frames:
        stop = index + 1
        while stop < frames and offsets[stop + 1] - offsets[index] <= CHECK_BATCH:
            stop += 1
        batch = list(range(index, stop))
        try:
            upper.decode(batch)
        except CorruptData:
            for one in batch:
                try:
                    upper.decode([one])
                except CorruptData:
                    bad.append(one)
        progress(offsets[stop] - offsets[index])
        index = stop
    progress(lower.size() - offsets[frames] + fmt.HEADER_SIZE)
    return bad


# ------------------------------------------------------------------------------ scanning


@dataclass(frozen=True)
class Found:
    """An intact slot the scan found: its frame verified, its trailer read."""

    index: int
    generation: int
    offset: int
    frame_length: int
    content_length: int
    checksum: int


@dataclass
class Scan:
    found: dict[int, list[Found]] = field(default_factory=dict)
    #: (start, end) of every seek table frame seen.
    tables: list[tuple[int, int]] = field(default_factory=list)
    #: Byte ranges that are no part of the format.
    garbage: list[tuple[int, int]] = field(default_factory=list)
    #: Where a part starts that runs past the end of the file (a torn tail), if one does.
    torn_at: int | None = None
    #: The work budget ran out before the end (the rest counts as garbage).
    exhausted: bool = False
    #: Where the last recognised part ends.
    data_end: int = 0
    #: Bytes parsed or decompressed so far (bounded by a budget linear in the file size).
    work: int = 0


class _Window:
    """Sequential access to a lower file through one buffer of SCAN_WINDOW bytes."""

    def __init__(self, lower: RandomAccessFile, size: int) -> None:
        self._lower = lower
        self.size = size
        self.base = 0
        self.buf = b""

    def at(self, pos: int, need: int) -> tuple[bytes, int, int]:
        """(buffer, index of `pos` in it, end of valid bytes) holding at least `need` bytes
        from `pos` when the file has them."""
        need = min(need, self.size - pos)
        if pos < self.base or pos + need > self.base + len(self.buf):
            length = min(max(need, SCAN_WINDOW), self.size - pos)
            self.buf = bytes(self._lower.read(pos, length))
            self.base = pos
        return self.buf, pos - self.base, len(self.buf)


def scan(lower: RandomAccessFile, frame_size: int, codec: Codec) -> Scan:
    """Everything intact in a formatted file, read from its start (module doc)."""
    size = lower.size()
    result = Scan()
    window = _Window(lower, size)
    slot_max = fmt.max_slot_size(frame_size)
    max_index = size // (fmt.TRAILER_MIN + 13)
    budget = 8 * size + 64 * slot_max
    pos = fmt.HEADER_SIZE
    result.data_end = pos
    while pos < size:
        if result.work > budget:
            result.exhausted = True
            result.garbage.append((pos, size))
            break
        buf, at, end = window.at(pos, slot_max + fmt.SKIPPABLE_HEADER_SIZE)
        step = _part_at(buf, at, end, pos, size, frame_size, codec, result, max_index)
        if step > 0:
            pos += step
            result.data_end = pos
            continue
        if step < 0:  # a part that runs past the end of the file
            result.torn_at = pos
            result.garbage.append((pos, size))
            break
        result.work += 64
        following = _next_magic(buf, at + 1, end)
        if following is None:
            following = min(size, window.base + max(at + 1, end - 3))
            if end - at < 4 and window.base + end >= size:
                following = size
        else:
            following += window.base
        result.garbage.append((pos, following))
        pos = following
    return result


def _part_at(
    buf: bytes, at: int, end: int, pos: int, size: int, frame_size: int, codec: Codec,
    result: Scan, max_index: int,
) -> int:  # fmt: skip
    """Bytes of the part at `pos` when it is one (recorded in `result`), 0 when it is not,
    -1 when it is cut off by the end of the file."""
    at_eof = pos + (end - at) >= size
    head = buf[at : at + 4]
    if head == fmt.ZSTD_MAGIC_BYTES:
        result.work += 64
        try:
            header = fmt.parse_frame_header(buf, at, end, frame_size)
            length = fmt.frame_extent(buf, at, end, header)
            result.work += length
            trailer = fmt.parse_trailer_at(buf, at + length, end)
        except fmt.Truncated:
            return -1 if at_eof else 0
        except CorruptData:
            return 0
        frame = memoryview(buf)[at : at + length]
        if trailer.index >= max_index or header.content_size == 0:
            return 0
        try:
            content = codec.decompress_one(frame, trailer.index)
        except CorruptData:
            result.work += header.content_size  # only failed attempts count as wasted work
            return 0
        if len(content) != header.content_size:
            return 0
        found = Found(
            trailer.index, trailer.generation, pos, length, header.content_size,
            fmt.frame_checksum(frame),
        )  # fmt: skip
        result.found.setdefault(trailer.index, []).append(found)
        return length + trailer.length
    if len(head) == 4 and head[1:] == _SKIPPABLE_TAIL and 0x50 <= head[0] <= 0x5F:
        if end - at < fmt.SKIPPABLE_HEADER_SIZE:
            return -1 if at_eof else 0
        magic = int.from_bytes(head, "little")
        length = fmt.SKIPPABLE_HEADER_SIZE + int.from_bytes(buf[at + 4 : at + 8], "little")
        if pos + length > size:
            return -1 if magic in (fmt.SEEK_TABLE_MAGIC, fmt.TRAILER_MAGIC) else 0
        if magic == fmt.SEEK_TABLE_MAGIC and length >= fmt.TABLE_OVERHEAD:
            # (A table longer than the window is taken on its length: only its end matters.)
            tail = buf[at + length - 4 : at + length] if length <= end - at else b""
            if tail == fmt.SEEKABLE_MAGIC.to_bytes(4, "little") or length > end - at:
                result.tables.append((pos, pos + length))
                return length
        if magic == fmt.TRAILER_MAGIC and length <= end - at:
            try:  # a trailer whose frame was damaged: skip it whole
                fmt.parse_trailer_at(buf, at, end)
                return length
            except CorruptData:
                return 0
    return 0


def _next_magic(buf: bytes, start: int, end: int) -> int | None:
    """Index of the next zstd or skippable magic number in buf[start:end]."""
    best = buf.find(fmt.ZSTD_MAGIC_BYTES, start, end)
    search = max(start + 1, 1)
    while True:
        hit = buf.find(_SKIPPABLE_TAIL, search, end)
        if hit < 0:
            break
        if 0x50 <= buf[hit - 1] <= 0x5F and hit - 1 >= start:
            if best < 0 or hit - 1 < best:
                best = hit - 1
            break
        search = hit + 1
    return best if best >= 0 else None


# ------------------------------------------------------------------------------ choosing


@dataclass
class Plan:
    """What a rebuilt file holds: per frame an intact copy, or nothing (lost: zeros)."""

    frame_size: int
    picks: dict[int, Found]
    lost: list[int]
    lengths: list[int]

    @property
    def frames(self) -> int:
        return len(self.lengths)


def choose(result: Scan, table: fmt.Table | None, frame_size: int) -> Plan:
    """One copy per frame: the frame count is the seek table's, or more when the scan found
    frames past it; non-last frames must be full; the table's own version wins, then the
    newest write-out."""
    table_frames = table.frames if table is not None else 0
    count = max(table_frames, max(result.found, default=-1) + 1)
    picks: dict[int, Found] = {}
    lost: list[int] = []
    lengths: list[int] = []
    for index in range(count):
        last = index == count - 1
        options = [
            f for f in result.found.get(index, ())
            if f.content_length == frame_size or (last and f.content_length <= frame_size)
        ]  # fmt: skip
        preferred = []
        if table is not None and index < table_frames:
            length = frame_size if index < table_frames - 1 else table.last_size
            preferred = [
                f for f in options
                if f.checksum == table.checksums[index] and f.content_length == length
            ]  # fmt: skip
        pick = max(preferred or options, key=lambda f: f.generation, default=None)
        if pick is not None:
            picks[index] = pick
            lengths.append(pick.content_length)
        else:
            lost.append(index)
            if table is not None and index == table_frames - 1 and last:
                lengths.append(table.last_size)
            else:
                lengths.append(frame_size)
    return Plan(frame_size, picks, lost, lengths)


# ------------------------------------------------------------------------------ rebuilding


def rebuild(
    lower: RandomAccessFile, header: bytes, plan: Plan, codec: Codec, generation: Callable[[], int]
) -> None:
    """Write the file `plan` describes after the current end, then move it to the start and
    cut the file there (the intact copies are read before anything they occupy is written)."""
    start = lower.size()
    position = start
    pending = bytearray(header)
    sizes = array("I", [fmt.HEADER_SIZE])
    lengths = array("I", [0])
    sums = array("I", [fmt.EMPTY_CHECKSUM])
    stamp = generation()
    for index, length in enumerate(plan.lengths):
        found = plan.picks.get(index)
        if found is not None:
            frame = bytes(lower.read(found.offset, found.frame_length))
            if len(frame) != found.frame_length:
                raise CorruptData(f"compress: frame {index} vanished during the repair")
        else:
            frame = codec.zero_frame(length)
        slot = fmt.encode_slot(frame, index, stamp, len(frame) + fmt.TRAILER_MIN)
        pending += slot
        sizes.append(len(slot))
        lengths.append(length)
        sums.append(fmt.frame_checksum(frame))
        if len(pending) >= COPY_CHUNK:
            lower.write(position, pending)
            position += len(pending)
            pending = bytearray()
    pending += fmt.encode_table(sizes, lengths, sums)
    lower.write(position, pending)
    total = position + len(pending) - start
    for offset in range(0, total, COPY_CHUNK):
        chunk = lower.read(start + offset, min(COPY_CHUNK, total - offset))
        lower.write(offset, chunk)
    lower.truncate(total)
