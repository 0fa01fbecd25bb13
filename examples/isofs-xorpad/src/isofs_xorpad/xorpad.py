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

With the init option `checksum`, new files get a checked header of the same size instead::

    offset 0   4 bytes   magic b"XPC1"
    offset 4   8 bytes   seed, unsigned 64-bit big-endian
    offset 12  4 bytes   CRC-32 (zlib.crc32) of bytes 0..11, unsigned 32-bit big-endian

A checked file whose CRC does not match is refused (EIO) unless the mount option
`ignore_checksums` is given, and `isofs fsck` reports it as "header checksum mismatch". The
128-bit header has a Hamming distance of at least 6 under CRC-32, so one flipped bit in the
seed or the CRC is located without ambiguity: `isofs fsck --repair` flips it back.
"""

from __future__ import annotations

import contextlib
import struct
import zlib
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from isofs.provider import (
    CorruptData,
    Damage,
    Layer,
    Option,
    Progress,
    Provider,
    ProviderError,
    RandomAccessFile,
    SecretSource,
    SetupRequest,
)
from isofs_xorpad.seedstore import (
    read_seedstore,
    seedstore_path,
    unwrap_seed,
    wrap_seed,
    write_seedstore,
)

MAGIC = b"XORPAD01"
_HEADER = struct.Struct(">8sQ")  # magic, seed
HEADER_SIZE = _HEADER.size  # 16
CHECKED_MAGIC = b"XPC1"
_CHECKED_HEADER = struct.Struct(">4sQI")  # magic, seed, CRC-32 of magic and seed
#: The damage `XorPadLayer.verify` reports for a checked header whose CRC does not match.
HEADER_CHECKSUM_MISMATCH = "header checksum mismatch"
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


# --- headers -----------------------------------------------------------------------------------


def _crc(magic_and_seed: bytes) -> int:
    return zlib.crc32(magic_and_seed) & 0xFFFFFFFF


def pack_header(seed: int, *, checksum: bool = False) -> bytes:
    """The 16-byte header of a new file: plain, or checked (with a CRC-32)."""
    if not checksum:
        return _HEADER.pack(MAGIC, seed)
    body = CHECKED_MAGIC + seed.to_bytes(8, "big")
    return body + _crc(body).to_bytes(4, "big")


def parse_header(head: bytes | bytearray | memoryview) -> int | None:
    """The seed recorded in a header, or None when `head` is not an xorpad header.

    A checked header is recognised by its magic alone, whatever its CRC: a damaged header
    must be reported, not make the file pass through as if it were plain.
    """
    if len(head) < HEADER_SIZE:
        return None
    head = bytes(head[:HEADER_SIZE])
    magic, seed = _HEADER.unpack(head)
    if magic == MAGIC:
        return seed
    checked_magic, seed, _crc32 = _CHECKED_HEADER.unpack(head)
    return seed if checked_magic == CHECKED_MAGIC else None


def header_checksum_ok(head: bytes) -> bool:
    """False only for a checked header whose CRC does not match (plain headers have none)."""
    if head[: len(CHECKED_MAGIC)] != CHECKED_MAGIC:
        return True
    _magic, _seed, stored = _CHECKED_HEADER.unpack(head[:HEADER_SIZE])
    return _crc(head[:12]) == stored


def corrected_header(head: bytes) -> bytes | None:
    """The checked header that differs from `head` in exactly one bit of the seed or CRC and
    matches its CRC, or None when no single flip does (more damage than that)."""
    for bit in range(len(CHECKED_MAGIC) * 8, HEADER_SIZE * 8):
        candidate = bytearray(head[:HEADER_SIZE])
        candidate[bit // 8] ^= 0x80 >> (bit % 8)
        if header_checksum_ok(bytes(candidate)):
            return bytes(candidate)
    return None


# --- the layer and the provider -----------------------------------------------------------------


class XorPadLayer(Layer):
    """Opens and creates xorpad files; `seed` is what new files get in their header.

    Existing files are decoded with the seed in their own header, so a file stays readable
    whatever seed the source was later configured with (per-file parameters belong in the
    file, per-source parameters in the config). `checksum` gives new files a checked header;
    `ignore_checksums` opens checked files whose CRC fails instead of refusing them.
    """

    block_size = 1  # Byte-granular: any byte can be read or written on its own.

    def __init__(
        self, seed: int = 0, *, checksum: bool = False, ignore_checksums: bool = False
    ) -> None:
        self.seed = _check_seed(seed)
        self.checksum = checksum
        self.ignore_checksums = ignore_checksums

    def header_size(self) -> int:
        """The header's length (this example's own helper: the core never asks for it)."""
        return HEADER_SIZE

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return parse_header(lower.read(0, HEADER_SIZE)) is not None

    def open(self, lower: RandomAccessFile) -> XorPadFile:
        head = bytes(lower.read(0, HEADER_SIZE))
        seed = parse_header(head)
        if seed is None:
            raise CorruptData(f"xorpad: not an xorpad file ({len(head)}-byte head, bad magic?)")
        if not self.ignore_checksums and not header_checksum_ok(head):
            # The seed may be wrong: decoding with it would return garbage, silently.
            raise CorruptData(f"xorpad: {HEADER_CHECKSUM_MISMATCH} (isofs fsck --repair)")
        return XorPadFile(lower, seed)

    def create(self, lower: RandomAccessFile) -> XorPadFile:
        if lower.size() != 0:
            raise ValueError("xorpad: create() needs an empty lower file")
        lower.write(0, pack_header(self.seed, checksum=self.checksum))
        return XorPadFile(lower, self.seed)

    def logical_size(self, lower_size: int) -> int | None:
        # Too short to be formatted: the size alone cannot say what the file shows.
        if lower_size < HEADER_SIZE:
            return None
        return lower_size - HEADER_SIZE

    # -- fsck: what the generic check cannot know ------------------------------------------

    def verify(self, lower: RandomAccessFile, progress: Progress) -> list[Damage]:
        """A checked header's CRC; then the generic check (every byte must read)."""
        head = bytes(lower.read(0, HEADER_SIZE))
        if header_checksum_ok(head):
            return super().verify(lower, progress)
        fixable = corrected_header(head) is not None
        progress(lower.size())
        how = "one flipped bit, repairable" if fixable else "more than one bit damaged"
        return [Damage(HEADER_CHECKSUM_MISMATCH, how, repairable=fixable)]

    def repair(self, lower: RandomAccessFile, damage: list[Damage]) -> None:
        """Flip a checked header's one damaged bit back; other damage the generic way."""
        if any(found.kind == HEADER_CHECKSUM_MISMATCH for found in damage):
            fixed = corrected_header(bytes(lower.read(0, HEADER_SIZE)))
            if fixed is None:
                raise CorruptData(f"xorpad: {HEADER_CHECKSUM_MISMATCH} is not repairable")
            lower.write(0, fixed)
            lower.flush()
        rest = [found for found in damage if found.kind != HEADER_CHECKSUM_MISMATCH]
        if rest:
            super().repair(lower, rest)


def _seed_from_text(value: Any) -> Any:
    """Command-line text may give the seed in any base Python reads ("42", "0x2a")."""
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            return int(value, 0)
    return value


SEED_OPTION = Option(
    "seed",
    "keystream seed of new files (only its low 8 bits change the keystream)",
    kind="int",
    default=0,
    minimum=0,
    maximum=MAX_SEED,
    metavar="N",
)


def _check_seed(value: Any) -> int:
    """A seed from an int or from command-line text; ProviderError naming the option."""
    return SEED_OPTION.parse(_seed_from_text(value), "xorpad")


class XorPadProvider(Provider):
    """Position-dependent XOR with a 16-byte header: an example plugin, NOT security.

    Its whole state is the config `{"version": 1, "seed": N}` (plus `"checksum": true` when
    new files get checked headers), unless `wrap_seed` keeps the seed in `xorpad.json`
    wrapped under a passphrase instead, which `isofs passwd` re-wraps.
    """

    name = "xorpad"
    options = (
        SEED_OPTION,
        Option(
            "checksum",
            "give new files a header with a CRC-32 that fsck checks and repairs",
            kind="bool",
            default=False,
        ),
        Option(
            "wrap_seed",
            "keep the seed wrapped under a passphrase, changed by isofs passwd (a toy: every "
            "file's header still holds its seed in clear)",
            kind="bool",
            default=False,
        ),
        Option(
            "ignore_checksums",
            "read files whose header checksum fails instead of refusing them (EIO), to rescue "
            "their data",
            kind="bool",
            default=False,
            scopes=frozenset({"mount"}),
        ),
    )

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        given = dict(request.options)
        if "seed" in given:
            given["seed"] = _seed_from_text(given["seed"])
        options = cls.parse_options(given, "init")
        seed = options.get("seed", SEED_OPTION.default)
        config: dict[str, Any] = {"version": CONFIG_VERSION}
        if options.get("wrap_seed"):
            if seedstore_path(meta_dir).exists():
                raise ProviderError(f"xorpad: {seedstore_path(meta_dir).name} already exists")
            passphrase = _passphrase(request.secret_source, "New passphrase: ", confirm=True)
            Path(meta_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
            write_seedstore(meta_dir, wrap_seed(seed, passphrase))
            config["wrap_seed"] = True
        else:
            config["seed"] = seed
        if options.get("checksum"):
            config["checksum"] = True
        return config

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> XorPadLayer:
        version = config.get("version")
        if version != CONFIG_VERSION:
            raise ProviderError(
                f"xorpad: unsupported config version {version!r} "
                f"(this plugin reads version {CONFIG_VERSION})"
            )
        options = cls.parse_options(request.options, "mount")
        if config.get("wrap_seed"):
            store = read_seedstore(meta_dir)
            if store is None:
                raise ProviderError(f"xorpad: {seedstore_path(meta_dir).name} is missing")
            seed = unwrap_seed(store, _passphrase(request.secret_source, "Passphrase: "))
        else:
            seed = _check_seed(config.get("seed", 0))
        return XorPadLayer(
            seed,
            checksum=bool(config.get("checksum", False)),
            ignore_checksums=bool(options.get("ignore_checksums", False)),
        )

    @classmethod
    def change_passphrase(
        cls,
        meta_dir: Path,
        old: SecretSource,
        new: SecretSource,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> bool:
        """Re-wrap the seed under a new passphrase; False when it is not wrapped (no
        passphrase to change). A wrong old passphrase changes nothing."""
        store = read_seedstore(meta_dir)
        if store is None:
            return False
        seed = unwrap_seed(store, _passphrase(old, "Old passphrase: "))
        write_seedstore(meta_dir, wrap_seed(seed, _passphrase(new, "New passphrase: ", True)))
        return True


def _passphrase(secrets: SecretSource | None, prompt: str, confirm: bool = False) -> bytes:
    if secrets is None:
        raise ProviderError(
            "xorpad: wrap_seed needs a passphrase (--passfile, --extpass or --keyfile)"
        )
    return secrets.passphrase(prompt, confirm=confirm)
