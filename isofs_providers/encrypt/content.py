"""The content format: a 32-byte header, then AES-256-GCM blocks of 4,096 plaintext bytes.

Specified in docs/FORMAT-encrypt.md §2; keep the two in step. Sizes are pure arithmetic on
the native size (no I/O), so directory listings and fsck need not open files.
"""

from __future__ import annotations

import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isofs.provider import CorruptData, RandomAccessFile
from isofs_providers.encrypt.kdf import GCM_OVERHEAD, NONCE_SIZE, TAG_SIZE

MAGIC = b"ISOFSENC"
FORMAT_VERSION = 1
FILE_ID_SIZE = 16
_HEADER = struct.Struct(">8sHH4s16s")  # magic, version, flags, reserved, file id
HEADER_SIZE = _HEADER.size  # 32
BLOCK_SIZE = 4096
BLOCK_OVERHEAD = GCM_OVERHEAD  # 28: each block's nonce and tag
NATIVE_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD  # 4124
#: Blocks per lower write when zero-filling without holes (bounds memory to ~1 MiB).
_ZERO_FILL_BATCH = 256

_ZERO_NONCE = bytes(NONCE_SIZE)
_ZERO_NATIVE_BLOCK = bytes(NATIVE_BLOCK_SIZE)


# --- header -----------------------------------------------------------------------------------


def new_header() -> bytes:
    """The header of a new file: a fresh random file id binds its blocks to it."""
    return _HEADER.pack(MAGIC, FORMAT_VERSION, 0, bytes(4), os.urandom(FILE_ID_SIZE))


def is_header(head: bytes) -> bool:
    """Whether `head` starts a file in this format (of a version this code may read)."""
    if len(head) != HEADER_SIZE:
        return False
    magic, version, _flags, _reserved, _file_id = _HEADER.unpack(head)
    return magic == MAGIC and version == FORMAT_VERSION


def check_header(head: bytes) -> bytes:
    """`head` if it is a header this code can read, else CorruptData saying what is wrong."""
    if len(head) != HEADER_SIZE:
        raise CorruptData(f"encrypt: header truncated ({len(head)} of {HEADER_SIZE} bytes)")
    magic, version, flags, reserved, _file_id = _HEADER.unpack(head)
    if magic != MAGIC:
        raise CorruptData("encrypt: bad magic, not an encrypted file")
    if version != FORMAT_VERSION:
        raise CorruptData(f"encrypt: unsupported format version {version}")
    if flags or any(reserved):
        raise CorruptData(f"encrypt: unknown header flags {flags:#x}/reserved bytes")
    return head


# --- size arithmetic --------------------------------------------------------------------------


def logical_size_of(native_size: int) -> int | None:
    """Logical size for a native size, or None when no valid file has that native size."""
    if native_size < HEADER_SIZE:
        return None
    full, rest = divmod(native_size - HEADER_SIZE, NATIVE_BLOCK_SIZE)
    if rest == 0:
        return full * BLOCK_SIZE
    if rest <= BLOCK_OVERHEAD:
        return None
    return full * BLOCK_SIZE + rest - BLOCK_OVERHEAD


def native_size_of(logical_size: int) -> int:
    """Native size of a file holding `logical_size` plaintext bytes."""
    full, rest = divmod(logical_size, BLOCK_SIZE)
    return HEADER_SIZE + full * NATIVE_BLOCK_SIZE + (rest + BLOCK_OVERHEAD if rest else 0)


def last_valid_size_of(native_size: int) -> int:
    """The largest valid native size <= `native_size`: what a torn tail is cut back to.

    A valid layout is the header, whole native blocks, and a last block longer than its
    28-byte overhead; a tail of 1..28 bytes is dropped. Below the header no size is valid:
    the size is returned unchanged, for opening the file to report the short header.
    """
    if native_size < HEADER_SIZE:
        return native_size
    rest = (native_size - HEADER_SIZE) % NATIVE_BLOCK_SIZE
    return native_size - rest if rest <= BLOCK_OVERHEAD else native_size


def _block_offset(n: int) -> int:
    return HEADER_SIZE + n * NATIVE_BLOCK_SIZE


class EncryptedFile:
    """The plaintext (upper) view of one encrypted native (lower) file."""

    def __init__(
        self, lower: RandomAccessFile, header: bytes, aead: AESGCM, *, allow_holes: bool
    ) -> None:
        self._lower = lower
        self._header = header
        self._aead = aead
        self._allow_holes = allow_holes

    # -- blocks --

    def _aad(self, n: int) -> bytes:
        # The whole header (magic, version, flags, file id) plus the block number.
        return self._header + n.to_bytes(8, "big")

    def _seal(self, first: int, plain: bytes | bytearray | memoryview) -> bytearray:
        """Native bytes of the blocks holding `plain`, block `first` onwards.

        One output buffer and one draw of nonces for the whole run: per-block Python work
        (allocations, joins, a getrandom call each), not AES, was most of the cost.
        """
        source = memoryview(plain)
        count = -(-len(source) // BLOCK_SIZE)
        native = bytearray(len(source) + count * BLOCK_OVERHEAD)
        out = memoryview(native)
        nonces = os.urandom(count * NONCE_SIZE)
        encrypt_into = self._aead.encrypt_into
        pos = 0
        for i in range(count):
            chunk = source[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            nonce = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            body = pos + NONCE_SIZE
            end = body + len(chunk) + TAG_SIZE
            out[pos:body] = nonce
            encrypt_into(nonce, chunk, self._aad(first + i), out[body:end])
            pos = end
        return native

    def _is_hole(self, raw: bytes | memoryview) -> bool:
        # Checking the nonce first keeps the common (non-hole) case to a 12-byte compare.
        return (
            self._allow_holes
            and raw[:NONCE_SIZE] == _ZERO_NONCE
            and raw == _ZERO_NATIVE_BLOCK[: len(raw)]
        )

    def _open(self, first: int, raw: bytes | bytearray | memoryview) -> bytearray:
        """Plaintext of the native blocks `raw` (block `first` onwards), in one buffer.

        A short last block is a torn write; a block that fails its tag was tampered with,
        moved or torn: either raises CorruptData naming the block.
        """
        source = memoryview(raw)
        full, rest = divmod(len(source), NATIVE_BLOCK_SIZE)
        if rest and rest <= BLOCK_OVERHEAD:
            raise CorruptData(f"encrypt: block {first + full} is truncated ({rest} native bytes)")
        plain = bytearray(len(source) - (full + bool(rest)) * BLOCK_OVERHEAD)
        out = memoryview(plain)
        decrypt_into = self._aead.decrypt_into
        for i in range(full + bool(rest)):
            block = source[i * NATIVE_BLOCK_SIZE : (i + 1) * NATIVE_BLOCK_SIZE]
            if self._is_hole(block):
                continue  # the buffer is zeros already
            start = i * BLOCK_SIZE
            try:
                decrypt_into(
                    block[:NONCE_SIZE],
                    block[NONCE_SIZE:],
                    self._aad(first + i),
                    out[start : start + len(block) - BLOCK_OVERHEAD],
                )
            except InvalidTag:
                raise CorruptData(
                    f"encrypt: block {first + i} failed authentication (tampered, moved or torn)"
                ) from None
        return plain

    def _read_raw(self, first: int, last: int) -> bytes:
        """Native bytes of blocks first..last with one lower read (all must exist)."""
        raw = self._lower.read(_block_offset(first), (last - first + 1) * NATIVE_BLOCK_SIZE)
        if len(raw) <= (last - first) * NATIVE_BLOCK_SIZE:
            n = first + -(-len(raw) // NATIVE_BLOCK_SIZE)
            raise CorruptData(f"encrypt: block {n} is missing (native file shrank)")
        return raw

    def _read_blocks(self, first: int, last: int) -> bytearray:
        return self._open(first, self._read_raw(first, last))

    # -- RandomAccessFile --

    def size(self) -> int:
        """Logical size; a torn last block (too short to hold a tag) still counts as a byte.

        Counting it keeps the good blocks readable (reads of the torn block fail with
        CorruptData) instead of failing the whole file.
        """
        native = self._lower.size()
        logical = logical_size_of(native)
        if logical is None:
            if native < HEADER_SIZE:
                raise CorruptData(f"encrypt: native size {native} is shorter than the header")
            return (native - HEADER_SIZE) // NATIVE_BLOCK_SIZE * BLOCK_SIZE + 1
        return logical

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size())
        if end <= offset:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        plain = self._read_blocks(first, last)
        start = offset - first * BLOCK_SIZE
        if start == 0 and len(plain) == end - offset:
            return plain  # the common aligned read: no copy
        return plain[start : start + end - offset]

    def write(self, offset: int, data: bytes) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        length = len(data)
        if length == 0:
            return 0
        total = self.size()
        first = offset // BLOCK_SIZE
        if first * BLOCK_SIZE > total:
            # The gap spans whole blocks: extend to the write's first block, then write.
            self._grow(total, first * BLOCK_SIZE)
            total = first * BLOCK_SIZE
        end = offset + length
        last = (end - 1) // BLOCK_SIZE
        head_len = offset - first * BLOCK_SIZE
        tail_end = min((last + 1) * BLOCK_SIZE, total) - last * BLOCK_SIZE  # in block `last`
        tail_start = end - last * BLOCK_SIZE
        need_head = head_len > 0 and first * BLOCK_SIZE < total
        need_tail = tail_start < tail_end
        old_first = old_last = b""
        if first == last and (need_head or need_tail):
            old_first = old_last = self._read_blocks(first, first)
        else:
            if need_head:
                old_first = self._read_blocks(first, first)
            if need_tail:
                old_last = self._read_blocks(last, last)
        plain: bytes | bytearray = data
        if head_len or need_tail:
            head = old_first[:head_len].ljust(head_len, b"\0")  # zeros past the old EOF
            tail = old_last[tail_start:tail_end] if need_tail else b""
            plain = b"".join((head, data, tail))
        self._lower.write(_block_offset(first), self._seal(first, plain))
        return length

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        if size == 0:
            # Needs no valid layout, so O_TRUNC can always reset a corrupt file.
            self._lower.truncate(HEADER_SIZE)
            return
        total = self.size()
        if size > total:
            self._grow(total, size)
            return
        if size == total:
            return
        block, rest = divmod(size, BLOCK_SIZE)
        if rest == 0:
            self._lower.truncate(_block_offset(block))
            return
        raw = self._read_raw(block, block)
        if self._is_hole(raw):
            self._lower.truncate(native_size_of(size))
            return
        plain = self._open(block, raw)[:rest]
        # Cut at the block boundary first: a crash in between leaves a valid, shorter file.
        self._lower.truncate(_block_offset(block))
        self._lower.write(_block_offset(block), self._seal(block, plain))

    def flush(self) -> None:
        self._lower.flush()

    # -- growing --

    def _grow(self, total: int, new: int) -> None:
        """Extend from `total` to `new` logical bytes, the new range reading as zeros."""
        last, rest = divmod(total, BLOCK_SIZE)
        next_block = last
        if rest:
            # The old partial last block must be padded (it is no longer last, or longer).
            next_block = last + 1
            raw = self._read_raw(last, last)
            if not self._is_hole(raw):
                fill = min(new, next_block * BLOCK_SIZE) - last * BLOCK_SIZE
                plain = self._open(last, raw).ljust(fill, b"\0")
                self._lower.write(_block_offset(last), self._seal(last, plain))
        if self._allow_holes:
            # Gap blocks become native zeros (sparse where the lower file supports it).
            self._lower.truncate(native_size_of(new))
            return
        end_block = -(-new // BLOCK_SIZE)
        for batch in range(next_block, end_block, _ZERO_FILL_BATCH):
            stop = min(new, (batch + _ZERO_FILL_BATCH) * BLOCK_SIZE)
            zeros = bytes(stop - batch * BLOCK_SIZE)
            self._lower.write(_block_offset(batch), self._seal(batch, zeros))
