"""The `xorpad` example provider: a 16-byte header, then content XOR'ed with a keystream.

THIS IS NOT ENCRYPTION. The keystream is a public, 256-byte-periodic function of the byte
offset and a seed stored in clear in every file's header; anyone can undo it. It exists to
show plugin authors a complete provider whose target view differs from the native bytes in
both content and size, and to give the core's tests a cheap transformation of that kind.

Native layout of a formatted file::

    offset 0   8 bytes   magic b"XORPAD01"
    offset 8   8 bytes   seed, unsigned 64-bit big-endian
    offset 16  n bytes   content: logical byte i is stored as  c[i] ^ keystream(i)

    keystream(i) = (i * 131 + 7 + seed) & 0xFF

so the logical size is the native size minus 16. A native file shorter than 16 bytes, or one
that does not start with the magic, is not formatted: the core passes it through unchanged.
Because 131 is odd, `i * 131 mod 256` runs through every byte value once per 256 bytes: the
keystream has period 256 and only the low 8 bits of the seed change it.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from isofs.provider import (
    CorruptData,
    Layer,
    Provider,
    ProviderError,
    RandomAccessFile,
    SetupRequest,
)

MAGIC = b"XORPAD01"
_HEADER = struct.Struct(">8sQ")  # magic, seed
HEADER_SIZE = _HEADER.size  # 16
PERIOD = 256
MAX_SEED = 2**64 - 1
CONFIG_VERSION = 1
#: Largest lower write used to fill a gap (bounds memory when a file grows by gigabytes).
FILL_CHUNK = 1 << 20


# --- the transformation ------------------------------------------------------------------------


@lru_cache(maxsize=PERIOD)
def _pattern(seed_byte: int) -> bytes:
    """One period of the keystream, starting at offset 0, repeated twice (for rotations)."""
    period = bytes((i * 131 + 7 + seed_byte) & 0xFF for i in range(PERIOD))
    return period * 2


def keystream(seed: int, offset: int, size: int) -> bytes:
    """The `size` keystream bytes for logical offsets offset .. offset+size-1.

    Built by slicing and repeating one cached period (memory copies, no per-byte Python).
    """
    doubled = _pattern(seed & 0xFF)
    start = offset % PERIOD
    if size <= PERIOD:
        return doubled[start : start + size]
    rotated = doubled[start : start + PERIOD]
    return (rotated * -(-size // PERIOD))[:size]


def xor_at(seed: int, offset: int, data: bytes | bytearray | memoryview) -> bytes:
    """`data` XOR'ed with the keystream at `offset` (the same call encodes and decodes).

    The whole buffer is XOR'ed as one big integer: three linear passes in C, so a 1 MiB
    buffer takes milliseconds instead of the second a per-byte Python loop would.
    """
    size = len(data)
    if size == 0:
        return b""
    pad = keystream(seed, offset, size)
    mixed = int.from_bytes(data, "little") ^ int.from_bytes(pad, "little")
    return mixed.to_bytes(size, "little")


# --- the upper (logical) file ------------------------------------------------------------------


class XorPadFile:
    """The logical view of one formatted lower file (implements RandomAccessFile).

    It keeps no state but the seed: sizes and bytes always come from the lower file, so
    there is nothing to flush and nothing to go stale if the lower file is another layer.
    """

    def __init__(self, lower: RandomAccessFile, seed: int) -> None:
        self._lower = lower
        self.seed = seed

    def size(self) -> int:
        native = self._lower.size()
        if native < HEADER_SIZE:
            raise CorruptData(f"xorpad: native size {native} is shorter than the header")
        return native - HEADER_SIZE

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        if size == 0:
            return b""
        # The lower read is already short at end of file, so no size() call is needed.
        native = self._lower.read(HEADER_SIZE + offset, size)
        return xor_at(self.seed, offset, native)

    def write(self, offset: int, data: bytes) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        length = len(data)
        if length == 0:
            return 0
        encoded = xor_at(self.seed, offset, data)
        current = self.size()
        if offset > current:
            # A hole must read back as zeros, i.e. be stored as the keystream itself: the
            # zeros the lower file would leave there would decode to keystream garbage.
            gap = offset - current
            if gap <= FILL_CHUNK:
                # One lower write for gap and data together.
                fill = keystream(self.seed, current, gap)
                self._lower.write(HEADER_SIZE + current, fill + encoded)
                return length
            self._fill(current, offset)
        self._lower.write(HEADER_SIZE + offset, encoded)
        return length

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        if size == 0:
            # Needs no valid size, so O_TRUNC can always reset a damaged file.
            self._lower.truncate(HEADER_SIZE)
            return
        current = self.size()
        if size < current:
            self._lower.truncate(HEADER_SIZE + size)
        elif size > current:
            self._fill(current, size)

    def flush(self) -> None:
        # Nothing is buffered here; pass the request on for layers below that do buffer.
        self._lower.flush()

    def _fill(self, start: int, end: int) -> None:
        """Store logical zeros for [start, end), in chunks of at most FILL_CHUNK bytes."""
        for chunk_start in range(start, end, FILL_CHUNK):
            chunk_size = min(FILL_CHUNK, end - chunk_start)
            fill = keystream(self.seed, chunk_start, chunk_size)
            self._lower.write(HEADER_SIZE + chunk_start, fill)


# --- the layer and the provider -----------------------------------------------------------------


def parse_header(head: bytes | bytearray | memoryview) -> int | None:
    """The seed recorded in a header, or None when `head` is not an xorpad header."""
    if len(head) < HEADER_SIZE:
        return None
    magic, seed = _HEADER.unpack(bytes(head[:HEADER_SIZE]))
    return seed if magic == MAGIC else None


class XorPadLayer(Layer):
    """Opens and creates xorpad files; `seed` is what new files get in their header.

    Existing files are decoded with the seed in their own header, so a file stays readable
    whatever seed the source was later configured with (per-file parameters belong in the
    file, per-source parameters in the config).
    """

    block_size = 1  # Byte-granular: any byte can be read or written on its own.

    def __init__(self, seed: int = 0) -> None:
        self.seed = _check_seed(seed)

    def header_size(self) -> int:
        return HEADER_SIZE

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return parse_header(lower.read(0, HEADER_SIZE)) is not None

    def open(self, lower: RandomAccessFile) -> XorPadFile:
        head = lower.read(0, HEADER_SIZE)
        seed = parse_header(head)
        if seed is None:
            raise CorruptData(f"xorpad: not an xorpad file ({len(head)}-byte head, bad magic?)")
        return XorPadFile(lower, seed)

    def create(self, lower: RandomAccessFile) -> XorPadFile:
        if lower.size() != 0:
            raise ValueError("xorpad: create() needs an empty lower file")
        lower.write(0, _HEADER.pack(MAGIC, self.seed))
        return XorPadFile(lower, self.seed)

    def logical_size(self, lower_size: int) -> int | None:
        # Too short to be formatted: the size alone cannot say what the file shows.
        if lower_size < HEADER_SIZE:
            return None
        return lower_size - HEADER_SIZE


class XorPadProvider(Provider):
    """The `xorpad` provider. Option for `initialise`: seed (integer 0 .. 2**64-1, default 0).

    It keeps no files in the source's metadata directory: its whole state is the config.
    """

    name = "xorpad"

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        seed = _check_seed(request.options.get("seed", 0))
        return {"version": CONFIG_VERSION, "seed": seed}

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> XorPadLayer:
        version = config.get("version")
        if version != CONFIG_VERSION:
            raise ProviderError(
                f"xorpad: unsupported config version {version!r} "
                f"(this plugin reads version {CONFIG_VERSION})"
            )
        return XorPadLayer(_check_seed(config.get("seed", 0)))


def _check_seed(value: Any) -> int:
    """A seed from an int or from command-line text ("42", "0x2a")."""
    if isinstance(value, bool):
        raise ProviderError("xorpad: option seed must be an integer, not a boolean")
    try:
        seed = int(value, 0) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ProviderError(f"xorpad: option seed must be an integer, got {value!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ProviderError(f"xorpad: option seed={seed} outside 0..2**64-1")
    return seed
