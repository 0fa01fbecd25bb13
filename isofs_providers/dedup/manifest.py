"""The manifest: the native file of a dedup file (docs/FORMAT-dedup.md, "Manifest").

Layout inside the one lower file the layer gets::

    offset    0   header slot 0 (88 bytes)
    offset  128   header slot 1 (88 bytes)
    offset  256+  entry lists: (chunk id 32 bytes, length u32 big-endian) per chunk

The live header is the valid slot with the highest generation; it points at the live entry
list and carries its digest. An update writes the new list where it overlaps neither slot
nor the live list (at offset 256 when it fits before the live list, else right after it),
then the new header into the other slot: one small write flips the file from the old
manifest to the new one, and a crash before it leaves the old one untouched. After the
flip the file is cut back to the end of the new list. A list whose digest fails (it never
reached the disk) makes the reader fall back to the other slot.

Manifests are untrusted input (a native-view process may write anything): everything is
checked, and every length is bounded by the file's size before anything is read.
"""

from __future__ import annotations

import hashlib
import struct
import sys
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import accumulate

from isofs.provider import CorruptData, RandomAccessFile
from isofs_providers.dedup.chunker import ChunkerParams
from isofs_providers.dedup.store.base import CHUNK_ID_SIZE

MAGIC = b"ISOFSDD\x01"
VERSION = 1
FLAG_KEYED = 1
#: Both slots sit in the file's first 512 bytes: a one-chunk manifest is 292 bytes (with the
#: slots 512 bytes apart it took 1 KiB, and small files' manifests cost a tenth of the
#: dedup ratio). One sector holds both either way on disks with 4 KiB sectors.
SLOT_OFFSETS = (0, 128)
DATA_START = 256
ENTRY_SIZE = CHUNK_ID_SIZE + 4
#: Chunk id of a run of zeros (a hole): never stored, never referenced.
ZERO_ID = bytes(CHUNK_ID_SIZE)
DIGEST_SIZE = 16

# magic, version, mode, flags, min, avg, max, generation, size, count, list offset,
# list digest, header digest (of everything before it)
_HEADER = struct.Struct(">8sHBBIIIQQQQ16s16s")
HEADER_SIZE = _HEADER.size  # 88
_DIGESTED = HEADER_SIZE - DIGEST_SIZE
#: Bytes read to find the live header: both slots.
HEAD_READ = SLOT_OFFSETS[1] + HEADER_SIZE
_PERSON_HEADER = b"isofs-dd-header"
_PERSON_LIST = b"isofs-dd-list"


def _digest(data: bytes | bytearray | memoryview, key: bytes | None, person: bytes) -> bytes:
    """BLAKE2b-128 of `data`; keyed with the source's manifest key when it has one, so that
    without the key a manifest cannot be forged (only copied whole)."""
    return hashlib.blake2b(data, digest_size=DIGEST_SIZE, key=key or b"", person=person).digest()


@dataclass(frozen=True)
class Header:
    """One valid header slot."""

    params: ChunkerParams
    keyed: bool
    generation: int
    size: int
    count: int
    list_offset: int
    list_digest: bytes
    slot: int

    @property
    def list_end(self) -> int:
        return self.list_offset + self.count * ENTRY_SIZE


def is_manifest(lower: RandomAccessFile) -> bool:
    """Whether the file starts like a manifest (the magic; the rest is checked at open)."""
    return bytes(lower.read(0, len(MAGIC))) == MAGIC


def _parse_slot(raw: bytes, slot: int, lower_size: int, key: bytes | None) -> Header | str:
    """The header in one slot, or why it is not a valid one."""
    if len(raw) < HEADER_SIZE:
        return "short"
    fields = _HEADER.unpack(raw[:HEADER_SIZE])
    magic, version, mode, flags, low, avg, high, generation, size, count, offset = fields[:11]
    list_digest, header_digest = fields[11], fields[12]
    if magic != MAGIC:
        return "bad magic"
    if version != VERSION:
        return f"unsupported version {version}"
    if flags & ~FLAG_KEYED:
        return f"unknown flags {flags:#x}"
    keyed = bool(flags & FLAG_KEYED)
    if keyed and key is None:
        return "keyed manifest, but this source has no chunk key"
    if not keyed and key is not None:
        return "unkeyed manifest in a source with a chunk key"
    if _digest(raw[:_DIGESTED], key, _PERSON_HEADER) != header_digest:
        return "header digest mismatch"
    params = ChunkerParams(mode, low, avg, high)
    problem = params.problem()
    if problem:
        return problem
    if generation < 1:
        return "generation 0"
    if offset < DATA_START:
        return f"entry list at {offset}, inside the header area"
    if count > (lower_size - min(offset, lower_size)) // ENTRY_SIZE:
        return f"{count} entries at {offset} do not fit in {lower_size} bytes"
    if size < count or size > count * params.max_size:
        return f"size {size} impossible for {count} chunks of at most {params.max_size}"
    return Header(params, keyed, generation, size, count, offset, list_digest, slot)


def read_headers(lower: RandomAccessFile, key: bytes | None) -> list[Header]:
    """The valid header slots, newest first; CorruptData when there is none."""
    raw = bytes(lower.read(0, HEAD_READ))
    lower_size = lower.size()
    found: list[Header] = []
    reasons: list[str] = []
    for slot, offset in enumerate(SLOT_OFFSETS):
        parsed = _parse_slot(raw[offset : offset + HEADER_SIZE], slot, lower_size, key)
        if isinstance(parsed, Header):
            found.append(parsed)
        else:
            reasons.append(f"slot {slot}: {parsed}")
    if not found:
        raise CorruptData("dedup: not a valid manifest (" + "; ".join(reasons) + ")")
    if len(found) == 2 and found[0].generation == found[1].generation:
        raise CorruptData("dedup: corrupt manifest (two headers of one generation)")
    found.sort(key=lambda header: header.generation, reverse=True)
    return found


class Entries:
    """A manifest's chunk list: ids, lengths and cumulative offsets (for bisection).

    Kept in flat buffers (32 bytes of id and 12 bytes of offsets and length per chunk),
    not as Python objects: a 100 GiB image in fixed 64 KiB chunks has 1.6 million.
    """

    __slots__ = ("ids", "lengths", "starts")

    def __init__(self, ids: bytearray, lengths: array) -> None:
        self.ids = ids
        self.lengths = lengths
        self.starts = array("Q", accumulate(lengths, initial=0))

    @classmethod
    def empty(cls) -> Entries:
        return cls(bytearray(), array("I"))

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def size(self) -> int:
        return self.starts[-1]

    def id(self, index: int) -> bytes:
        return bytes(self.ids[index * CHUNK_ID_SIZE : (index + 1) * CHUNK_ID_SIZE])

    def find(self, offset: int) -> int:
        """Index of the chunk holding logical byte `offset` (0 <= offset < size)."""
        return bisect_right(self.starts, offset) - 1

    def iter_ids(self, start: int = 0, stop: int | None = None) -> Iterator[bytes]:
        stop = len(self) if stop is None else stop
        ids = self.ids
        for index in range(start, stop):
            yield bytes(ids[index * CHUNK_ID_SIZE : (index + 1) * CHUNK_ID_SIZE])

    def encode(self) -> bytes:
        """The on-disk list: each id followed by its length (u32 big-endian)."""
        count = len(self)
        out = bytearray(count * ENTRY_SIZE)
        for i in range(CHUNK_ID_SIZE):
            out[i::ENTRY_SIZE] = self.ids[i::CHUNK_ID_SIZE]
        lengths = array("I", self.lengths)
        if sys.byteorder == "little":
            lengths.byteswap()
        raw = lengths.tobytes()
        for i in range(4):
            out[CHUNK_ID_SIZE + i :: ENTRY_SIZE] = raw[i::4]
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes, header: Header) -> Entries:
        """Parse a list already checked against its digest; CorruptData if inconsistent."""
        count = header.count
        if len(data) != count * ENTRY_SIZE:
            raise CorruptData(f"dedup: entry list cut short ({len(data)} bytes of "
                              f"{count * ENTRY_SIZE})")  # fmt: skip
        ids = bytearray(count * CHUNK_ID_SIZE)
        for i in range(CHUNK_ID_SIZE):
            ids[i::CHUNK_ID_SIZE] = data[i::ENTRY_SIZE]
        raw = bytearray(count * 4)
        for i in range(4):
            raw[i::4] = data[CHUNK_ID_SIZE + i :: ENTRY_SIZE]
        lengths = array("I")
        lengths.frombytes(bytes(raw))
        if sys.byteorder == "little":
            lengths.byteswap()
        if count:
            if min(lengths) < 1:
                raise CorruptData("dedup: corrupt manifest (a chunk of length 0)")
            if max(lengths) > header.params.max_size:
                raise CorruptData(f"dedup: corrupt manifest (a chunk longer than "
                                  f"{header.params.max_size})")  # fmt: skip
        entries = cls(ids, lengths)
        if entries.size != header.size:
            raise CorruptData(f"dedup: corrupt manifest (chunks add up to {entries.size} "
                              f"bytes, the header says {header.size})")  # fmt: skip
        return entries

    def splice(self, pieces: list[tuple[bytes | bytearray, array]]) -> Entries:
        """A new list made of (ids, lengths) pieces in order."""
        ids = bytearray()
        lengths = array("I")
        for piece_ids, piece_lengths in pieces:
            ids += piece_ids
            lengths.extend(piece_lengths)
        return Entries(ids, lengths)

    def piece(self, start: int, stop: int) -> tuple[bytes, array]:
        """(ids, lengths) of entries start..stop-1, for `splice`."""
        return (
            bytes(self.ids[start * CHUNK_ID_SIZE : stop * CHUNK_ID_SIZE]),
            self.lengths[start:stop],
        )


def read_entries(lower: RandomAccessFile, header: Header, key: bytes | None) -> Entries:
    """The entry list `header` points at, checked against its digest and the header."""
    length = header.count * ENTRY_SIZE
    data = bytes(lower.read(header.list_offset, length)) if length else b""
    if len(data) != length:
        raise CorruptData(f"dedup: entry list cut short ({len(data)} of {length} bytes)")
    if _digest(data, key, _PERSON_LIST) != header.list_digest:
        raise CorruptData(f"dedup: entry list digest mismatch (generation {header.generation})")
    return Entries.decode(data, header)


def load(
    lower: RandomAccessFile, key: bytes | None, headers: list[Header] | None = None
) -> tuple[Header, Entries, bool]:
    """(header, entries, fell back): the newest header whose list is intact; `fell back` when
    that was not the newest (an update torn by a crash of the machine, not of the daemon)."""
    headers = headers if headers is not None else read_headers(lower, key)
    errors = []
    for header in headers:
        try:
            return header, read_entries(lower, header, key), header is not headers[0]
        except CorruptData as exc:
            errors.append(exc.strerror or str(exc))
    raise CorruptData("; ".join(errors))


def _pack(header: Header, key: bytes | None) -> bytes:
    params = header.params
    flags = FLAG_KEYED if header.keyed else 0
    body = _HEADER.pack(
        MAGIC, VERSION, params.mode, flags, params.min_size, params.avg_size, params.max_size,
        header.generation, header.size, header.count, header.list_offset, header.list_digest,
        bytes(DIGEST_SIZE),
    )  # fmt: skip
    return body[:_DIGESTED] + _digest(body[:_DIGESTED], key, _PERSON_HEADER)


def create(lower: RandomAccessFile, params: ChunkerParams, key: bytes | None) -> Header:
    """Write the first header of an empty manifest into an empty lower file."""
    if lower.size() != 0:
        raise ValueError("dedup: create() needs an empty lower file")
    empty = _digest(b"", key, _PERSON_LIST)
    header = Header(params, key is not None, 1, 0, 0, DATA_START, empty, 0)
    lower.write(SLOT_OFFSETS[0], _pack(header, key))
    return header


def write(
    lower: RandomAccessFile,
    live: Header,
    entries: Entries,
    key: bytes | None,
) -> Header:
    """Replace the manifest atomically (see the module doc); returns the new live header."""
    data = entries.encode()
    length = len(data)
    if DATA_START + length <= live.list_offset:
        offset = DATA_START
    else:
        offset = max(live.list_end, DATA_START)
    if length:
        lower.write(offset, data)
    header = Header(
        live.params,
        key is not None,
        live.generation + 1,
        entries.size,
        len(entries),
        offset,
        _digest(data, key, _PERSON_LIST),
        1 - live.slot,
    )
    lower.write(SLOT_OFFSETS[header.slot], _pack(header, key))
    end = max(offset + length, SLOT_OFFSETS[1] + HEADER_SIZE)
    if lower.size() > end:
        lower.truncate(end)
    return header
