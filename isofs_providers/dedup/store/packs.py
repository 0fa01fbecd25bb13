"""The pack file format (docs/FORMAT-dedup.md, "Packs"): parsing treats every byte as untrusted.

A pack is a header, then records, then (once sealed) a trailer listing the records and a
fixed-size footer at the very end:

    header  = magic "ISOFSPK1" | version u16 | reserved 6 bytes | pack id 16 bytes   (32 bytes)
    record  = chunk id 32 | flags u8 | 3 zero bytes | stored length u32
              | logical length u32 | CRC-32 u32 | payload (stored length bytes)
    trailer = count u32 | count x (chunk id 32 | offset u64 | record length u32 | logical u32)
    footer  = trailer offset u64 | count u32 | CRC-32 of trailer u32 | magic "ISOFSPKE" (24)

The record CRC covers the record header before it and the payload; the trailer CRC covers the
trailer. All integers are little-endian. Nothing here allocates more than a record's bounded
length, whatever the bytes say.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from isofs.durable import fsync_directory, pwrite_all
from isofs.provider import CorruptData

PACK_MAGIC = b"ISOFSPK1"
FOOTER_MAGIC = b"ISOFSPKE"
PACK_VERSION = 1
PACK_ID_SIZE = 16

HEADER = struct.Struct("<8sH6x16s")
RECORD = struct.Struct("<32sB3xIII")  # id, flags, stored length, logical length, crc
TRAILER_COUNT = struct.Struct("<I")
TRAILER_ENTRY = struct.Struct("<32sQII")
FOOTER = struct.Struct("<QII8s")

HEADER_SIZE = HEADER.size
RECORD_HEADER_SIZE = RECORD.size

FLAG_COMPRESSED = 0x01
FLAG_ENCRYPTED = 0x02
KNOWN_FLAGS = FLAG_COMPRESSED | FLAG_ENCRYPTED

#: The largest chunk a store accepts (a manifest's chunker never makes larger ones).
MAX_CHUNK_SIZE = 16 * 1024 * 1024
#: Stored form may exceed the content by a nonce, a tag and a raw-fallback byte or so.
MAX_STORED_SIZE = MAX_CHUNK_SIZE + 64
MAX_RECORD_SIZE = RECORD_HEADER_SIZE + MAX_STORED_SIZE
#: A pack never holds more records than this (a 1 GiB pack of 1-byte chunks); a trailer
#: claiming more is corrupt.
MAX_RECORDS = 1 << 24

TEMP_PREFIX = ".isofs-pack-tmp."


def short(chunk_id: bytes) -> str:
    """The hex prefix that names a chunk in messages."""
    return chunk_id[:6].hex()


@dataclass(frozen=True)
class Record:
    """A record as found in a pack (its payload still in stored form)."""

    chunk_id: bytes
    flags: int
    logical_size: int
    payload: bytes
    offset: int
    length: int


def encode_header(pack_id: bytes) -> bytes:
    return HEADER.pack(PACK_MAGIC, PACK_VERSION, pack_id)


def decode_header(data: bytes, where: str) -> bytes:
    """The pack id of a header; CorruptData when it is not one of ours."""
    if len(data) < HEADER_SIZE:
        raise CorruptData(f"{where}: too short for a pack header ({len(data)} bytes)")
    magic, version, pack_id = HEADER.unpack_from(data)
    if magic != PACK_MAGIC:
        raise CorruptData(f"{where}: not a pack (bad magic)")
    if version != PACK_VERSION:
        raise CorruptData(f"{where}: pack version {version} is not supported")
    return bytes(pack_id)


def encode_record(chunk_id: bytes, flags: int, logical_size: int, payload: bytes) -> bytes:
    head = RECORD.pack(chunk_id, flags, len(payload), logical_size, 0)[:-4]
    crc = zlib.crc32(payload, zlib.crc32(head))
    return head + struct.pack("<I", crc) + payload


def record_length(stored_size: int) -> int:
    return RECORD_HEADER_SIZE + stored_size


def decode_record(data: bytes, offset: int, where: str, expected_id: bytes | None = None) -> Record:
    """Parse and CRC-check one whole record (`data` is exactly the record's bytes)."""
    if len(data) < RECORD_HEADER_SIZE:
        raise CorruptData(f"{where}: record at {offset} is truncated")
    chunk_id, flags, stored, logical, crc = RECORD.unpack_from(data)
    label = f"chunk {short(expected_id or chunk_id)} in {where} at {offset}"
    if expected_id is not None and chunk_id != expected_id:
        raise CorruptData(f"{label}: the record holds chunk {short(chunk_id)}")
    if flags & ~KNOWN_FLAGS:
        raise CorruptData(f"{label}: unknown record flags {flags:#x}")
    if stored > MAX_STORED_SIZE or logical > MAX_CHUNK_SIZE:
        raise CorruptData(f"{label}: absurd record lengths ({stored} stored, {logical} logical)")
    if len(data) != RECORD_HEADER_SIZE + stored:
        raise CorruptData(
            f"{label}: record is {len(data)} bytes, its header says {RECORD_HEADER_SIZE + stored}"
        )
    payload = data[RECORD_HEADER_SIZE:]
    if zlib.crc32(payload, zlib.crc32(data[: RECORD_HEADER_SIZE - 4])) != crc:
        raise CorruptData(f"{label}: record checksum mismatch")
    return Record(bytes(chunk_id), flags, logical, bytes(payload), offset, len(data))


#: A pack's record as its trailer lists it: (chunk id, offset, record length, logical size).
Entry = tuple[bytes, int, int, int]


def encode_trailer(entries: list[Entry], trailer_offset: int) -> bytes:
    body = bytearray(TRAILER_COUNT.pack(len(entries)))
    for entry in entries:
        body += TRAILER_ENTRY.pack(*entry)
    footer = FOOTER.pack(trailer_offset, len(entries), zlib.crc32(body), FOOTER_MAGIC)
    return bytes(body) + footer


def trailer_span(footer: bytes, file_size: int, where: str) -> tuple[int, int]:
    """(trailer offset, trailer length) from a footer; CorruptData when it is not valid."""
    if len(footer) != FOOTER.size:
        raise CorruptData(f"{where}: too short for a pack footer")
    offset, count, _crc, magic = FOOTER.unpack(footer)
    if magic != FOOTER_MAGIC:
        raise CorruptData(f"{where}: no trailer (the pack is not sealed)")
    length = TRAILER_COUNT.size + count * TRAILER_ENTRY.size
    if count > MAX_RECORDS or offset < HEADER_SIZE or offset + length + FOOTER.size != file_size:
        raise CorruptData(f"{where}: the footer's trailer position is impossible")
    return offset, length


def decode_trailer(
    trailer: bytes, footer: bytes, trailer_offset: int, where: str
) -> list[Entry]:
    """The entries of a sealed pack, checked for order and bounds."""
    _offset, count, crc, _magic = FOOTER.unpack(footer)
    if zlib.crc32(trailer) != crc:
        raise CorruptData(f"{where}: trailer checksum mismatch")
    if TRAILER_COUNT.unpack_from(trailer)[0] != count:
        raise CorruptData(f"{where}: trailer count differs from the footer's")
    entries = []
    end = HEADER_SIZE
    for i in range(count):
        chunk_id, offset, length, logical = TRAILER_ENTRY.unpack_from(
            trailer, TRAILER_COUNT.size + i * TRAILER_ENTRY.size
        )
        if (
            offset != end
            or not RECORD_HEADER_SIZE <= length <= MAX_RECORD_SIZE
            or logical > MAX_CHUNK_SIZE
        ):
            raise CorruptData(f"{where}: trailer entry {i} is out of order or absurd")
        end = offset + length
        entries.append((bytes(chunk_id), offset, length, logical))
    if end != trailer_offset:
        raise CorruptData(f"{where}: trailer entries do not end where the trailer begins")
    return entries


def scan_records(
    read: Callable[[int, int], bytes], start: int, end: int, where: str
) -> Iterator[Record]:
    """Records from `start` while they parse and check, up to `end` (a torn tail stops it).

    `read(offset, size)` returns up to size bytes. Each record costs one bounded read.
    """
    offset = start
    while offset + RECORD_HEADER_SIZE <= end:
        head = read(offset, RECORD_HEADER_SIZE)
        if len(head) < RECORD_HEADER_SIZE:
            return
        stored = RECORD.unpack_from(head)[2]
        if stored > MAX_STORED_SIZE or offset + RECORD_HEADER_SIZE + stored > end:
            return
        data = head + read(offset + RECORD_HEADER_SIZE, stored)
        try:
            record = decode_record(data, offset, where)
        except CorruptData:
            return
        yield record
        offset += record.length


# ------------------------------------------------------------------------ local pack files


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Up to `size` bytes at `offset` (short only at end of file).

    The read is first cut to what the file holds: os.pread allocates all it is asked for,
    and a damaged index row may claim a 16 MiB record in a pack of a few KiB.
    """
    size = min(size, os.fstat(fd).st_size - offset)
    parts = []
    while size > 0:
        data = os.pread(fd, size, offset)
        if not data:
            break
        parts.append(data)
        size -= len(data)
        offset += len(data)
    return b"".join(parts)


class PackWriter:
    """The open pack one process appends to, locked (flock) so no other process adopts it.

    Records are appended with `append` (not durable), `sync` fsyncs them, `seal` writes the
    trailer and footer. Every record appended is remembered for the trailer.
    """

    def __init__(self, directory: Path, name: str, fd: int, end: int,
                 entries: list[Entry]) -> None:  # fmt: skip
        self.directory = directory
        self.name = name
        self.fd = fd
        self.end = end
        self.synced_end = end
        self.entries = entries

    @classmethod
    def create(cls, directory: Path) -> PackWriter:
        """A new empty pack: written under a temporary name, locked, then renamed in place."""
        pack_id = os.urandom(PACK_ID_SIZE)
        name = pack_id.hex()
        temp = directory / (TEMP_PREFIX + name)
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            pwrite_all(fd, encode_header(pack_id), 0)
            os.fsync(fd)
            os.rename(temp, directory / name)
            fsync_directory(directory)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        return cls(directory, name, fd, HEADER_SIZE, [])

    @classmethod
    def adopt(cls, directory: Path, name: str) -> PackWriter | None:
        """Take over an unsealed pack nobody holds (its writer closed or died): its valid
        records are kept and a torn tail is cut off. None when another process holds it or
        it is not an unsealed pack of ours."""
        try:
            fd = os.open(directory / name, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            size = os.fstat(fd).st_size
            decode_header(pread_exact(fd, HEADER_SIZE, 0), f"pack {name}")
            if size >= HEADER_SIZE + FOOTER.size:
                footer = pread_exact(fd, FOOTER.size, size - FOOTER.size)
                with contextlib.suppress(CorruptData):
                    trailer_span(footer, size, f"pack {name}")
                    os.close(fd)
                    return None  # sealed already (a crash between sealing and the index)
            entries = [
                (r.chunk_id, r.offset, r.length, r.logical_size)
                for r in scan_records(
                    lambda off, n: pread_exact(fd, n, off), HEADER_SIZE, size, f"pack {name}"
                )
            ]
            end = entries[-1][1] + entries[-1][2] if entries else HEADER_SIZE
            if end != size:
                os.ftruncate(fd, end)
                os.fsync(fd)
        except (OSError, CorruptData):
            os.close(fd)
            return None
        return cls(directory, name, fd, end, entries)

    def append(self, records: list[tuple[bytes, bytes]]) -> list[tuple[int, int]]:
        """Append encoded records ((chunk id, record bytes)); their (offset, length)."""
        placed = []
        offset = self.end
        for chunk_id, data in records:
            placed.append((offset, len(data)))
            logical = RECORD.unpack_from(data)[3]
            self.entries.append((chunk_id, offset, len(data), logical))
            offset += len(data)
        pwrite_all(self.fd, b"".join(data for _, data in records), self.end)
        self.end = offset
        return placed

    def sync(self) -> None:
        if self.synced_end != self.end:
            os.fsync(self.fd)
            self.synced_end = self.end

    def seal(self) -> int:
        """Write the trailer and footer and fsync; the pack's final size."""
        trailer = encode_trailer(self.entries, self.end)
        pwrite_all(self.fd, trailer, self.end)
        os.fsync(self.fd)
        self.end += len(trailer)
        self.synced_end = self.end
        return self.end

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)  # the flock goes with it
            self.fd = -1


def read_pack_entries(
    read: Callable[[int, int], bytes], size: int, where: str
) -> tuple[list[Entry], bool]:
    """The records of a pack from its trailer when sealed and valid (True), else by scanning
    its records (False). The header must be valid either way."""
    decode_header(read(0, HEADER_SIZE), where)
    if size >= HEADER_SIZE + FOOTER.size:
        footer = read(size - FOOTER.size, FOOTER.size)
        try:
            offset, length = trailer_span(footer, size, where)
            return decode_trailer(read(offset, length), footer, offset, where), True
        except CorruptData:
            pass
    records = scan_records(read, HEADER_SIZE, size, where)
    return [(r.chunk_id, r.offset, r.length, r.logical_size) for r in records], False


def has_valid_footer(read: Callable[[int, int], bytes], size: int, where: str) -> bool:
    """Whether a pack ends in a footer whose trailer position fits the file (sealed)."""
    if size < HEADER_SIZE + FOOTER.size:
        return False
    try:
        trailer_span(read(size - FOOTER.size, FOOTER.size), size, where)
    except CorruptData:
        return False
    return True
