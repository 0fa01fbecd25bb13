"""`CompressLayer` and `CompressProvider`: the `compress` provider's layer and plugin class.

The layer's block size is the frame size F, so the core's page cache holds whole frames
(pages of F bytes) and writes whole frames through. Opening a file reads its header and its
seek table from the end (a few KiB, one read for files up to SMALL_FILE) and never a frame:
directory listings open files to learn their logical size, which only the seek table knows.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isofs.provider import (
    BAD_BLOCKS,
    CORRUPT_HEADER,
    TRUNCATED_TAIL,
    CorruptData,
    Damage,
    Layer,
    Option,
    PlainFile,
    Progress,
    Provider,
    ProviderError,
    RandomAccessFile,
    SetupRequest,
    copy_plain,
)
from isofs_providers.compress import format as fmt
from isofs_providers.compress import recovery
from isofs_providers.compress.codec import Codec
from isofs_providers.compress.file import CompressedFile

CONFIG_VERSION = 1
DEFAULT_LEVEL = 3
DEFAULT_FRAME_SIZE = 128 << 10
MIN_LEVEL = -(1 << 17)  # zstd's fastest level (ZSTD_minCLevel)
MAX_LEVEL = 19
#: Files up to this size are opened with one read (header, frames and table together).
SMALL_FILE = 64 << 10
#: Bytes read from the end of a larger file to find its seek table (one read for files of
#: up to about 1,300 frames: 160 MiB at the default frame size).
TAIL_READ = 16 << 10
#: Dirty bytes per batch when importing a plain file (`isofs migrate`).
IMPORT_BATCH = 32 << 20

MISSING_TABLE = "missing seek table"
CORRUPT_TABLE = "corrupt seek table"
#: Frames that are intact but not where the seek table says (a rebuild keeps them).
TABLE_MISMATCH = "seek table mismatch"


def check_level(level: int) -> int:
    if level == 0 or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ProviderError(f"compress: level {level} is not 1..19 or a negative (fast) level")
    return level


class CompressLayer(Layer):
    """Opens and creates files in the compress format (docs/FORMAT-compress.md)."""

    def __init__(self, frame_size: int = DEFAULT_FRAME_SIZE, level: int = DEFAULT_LEVEL) -> None:
        self.frame_size = fmt.check_frame_size(frame_size)
        self.block_size = self.frame_size
        self.level = check_level(level)
        self.codec = Codec(level)
        self._generation_lock = threading.Lock()
        self._last_generation = 0

    def next_generation(self) -> int:
        """A number larger than any this layer handed out before (and, clocks permitting,
        than any an earlier mount did): the trailers of one write-out carry it."""
        with self._generation_lock:
            self._last_generation = max(time.time_ns(), self._last_generation + 1)
            return self._last_generation

    # ------------------------------------------------------------------------ files

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return fmt.looks_like_header(lower.read(0, fmt.HEADER_SIZE))

    def size_probe(self, lower_size: int) -> list[tuple[int, int]]:
        """`open` reads the header and the file's last TAIL_READ bytes (the seek table)."""
        if lower_size <= SMALL_FILE:
            return [(0, lower_size)]
        return [(0, fmt.HEADER_SIZE), (lower_size - TAIL_READ, TAIL_READ)]

    def open(self, lower: RandomAccessFile) -> CompressedFile:
        size = lower.size()
        if size <= SMALL_FILE:
            whole = bytes(lower.read(0, size))
            head, tail = whole[: fmt.HEADER_SIZE], whole
        else:
            head = bytes(lower.read(0, fmt.HEADER_SIZE))
            tail = bytes(lower.read(size - TAIL_READ, TAIL_READ))
        header = fmt.parse_header(head)
        count = fmt.parse_footer(tail[-fmt.FOOTER_SIZE :], size)
        length = fmt.table_size(count)
        if length > len(tail):
            tail = bytes(lower.read(size - length, length))
            if len(tail) != length:
                raise CorruptData("compress: the file shrank while its seek table was read")
        table = fmt.parse_table(tail[len(tail) - length :], size, header.frame_size)
        return CompressedFile(lower, self.codec, header, table, self.next_generation)

    def create(self, lower: RandomAccessFile) -> CompressedFile:
        if lower.size() != 0:
            raise ValueError("compress: create() needs an empty lower file")
        head = fmt.encode_header(self.frame_size, self.level)
        lower.write(0, head + fmt.encode_empty_table())  # a complete (empty) stream at once
        header = fmt.Header(self.frame_size, self.level)
        return CompressedFile(lower, self.codec, header, fmt.Table.empty(), self.next_generation)

    def logical_size(self, lower_size: int) -> int | None:
        return None  # in the seek table, not in the native size

    # ------------------------------------------------------------------ maintenance

    def verify(self, lower: RandomAccessFile, progress: Progress) -> list[Damage]:
        """Every frame through the seek table; when anything fails, a scan of the whole file
        says what a repair keeps (misplaced frames) and what it loses (bad blocks)."""
        try:
            header = fmt.parse_header(lower.read(0, fmt.HEADER_SIZE))
        except CorruptData as exc:
            return [Damage(CORRUPT_HEADER, exc.strerror or str(exc))]
        frame_size = header.frame_size
        damage: list[Damage] = []
        table: fmt.Table | None = None
        bad: list[int] = []
        try:
            upper = self.open(lower)
        except CorruptData as exc:
            reason = _reason(exc)
            kind = MISSING_TABLE if reason.startswith(MISSING_TABLE) else CORRUPT_TABLE
            damage.append(Damage(kind, reason.partition("(")[2].rstrip(")") or reason,
                                 repairable=True))  # fmt: skip
        else:
            table = upper.table
            bad = recovery.check_frames(upper, lower, progress)
            if not bad:
                return []
        found = recovery.scan(lower, frame_size, self.codec)
        if table is None:
            progress(lower.size())
        plan = recovery.choose(found, table, frame_size)
        if found.torn_at is not None:
            cut = lower.size() - found.torn_at
            kept = sum(plan.lengths)
            detail = f"the last {cut} bytes are cut off; the repaired file ends at byte {kept}"
            damage.append(Damage(TRUNCATED_TAIL, detail, repairable=True))
        misplaced = [n for n in bad if n in plan.picks]
        if misplaced:
            damage.append(Damage(TABLE_MISMATCH, "", misplaced, frame_size, repairable=True))
        if plan.lost:
            damage.append(Damage(BAD_BLOCKS, "", plan.lost, frame_size, repairable=True))
        return damage

    def repair(self, lower: RandomAccessFile, damage: list[Damage]) -> None:
        """Rebuild the file from its intact frames (a zero frame for each one lost) and a new
        seek table; the frames `verify` reported as bad blocks are the ones lost."""
        head = bytes(lower.read(0, fmt.HEADER_SIZE))
        header = fmt.parse_header(head)
        try:
            table: fmt.Table | None = self.open(lower).table
        except CorruptData:
            table = None
        found = recovery.scan(lower, header.frame_size, self.codec)
        plan = recovery.choose(found, table, header.frame_size)
        recovery.rebuild(lower, head, plan, self.codec, self.next_generation)

    def last_valid_size(self, lower: RandomAccessFile) -> int:
        """The current size when the seek table ends the file; else the end of the last
        seek table that describes the bytes before it; 0 when there is none (then only a
        rebuild, `repair`, keeps the intact frames)."""
        try:
            self.open(lower)
            return lower.size()
        except CorruptData:
            pass
        try:
            header = fmt.parse_header(lower.read(0, fmt.HEADER_SIZE))
        except CorruptData:
            return 0  # no size of it is a valid file
        found = recovery.scan(lower, header.frame_size, self.codec)
        for start, end in reversed(found.tables):
            try:
                fmt.parse_table(lower.read(start, end - start), end, header.frame_size)
                return end
            except CorruptData:
                continue
        return 0

    def import_plain(
        self, plain: PlainFile, lower: RandomAccessFile, progress: Progress
    ) -> RandomAccessFile:
        """Compress a plain file in large batches (the batch call spreads each one over
        several threads); holes become zero frames without being read."""
        upper = self.create(lower)
        upper.dirty_limit = max(IMPORT_BATCH, 4 * self.frame_size)
        copy_plain(plain, upper, progress)
        return upper

    def statistics(self) -> dict[str, Any]:
        return {"level": self.level, "frame_size": self.frame_size, **self.codec.stats.as_dict()}


def _reason(exc: Exception) -> str:
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return text.removeprefix("compress: ")


class CompressProvider(Provider):
    """The `compress` provider: zstd seekable files, decompressed in the target view."""

    name = "compress"
    options = (
        Option(
            "level",
            "zstd level for new writes: 1..19, or negative for the fast levels; a mount may "
            "give another one",
            kind="int",
            default=DEFAULT_LEVEL,
            scopes=frozenset({"init", "mount"}),
            minimum=MIN_LEVEL,
            maximum=MAX_LEVEL,
            metavar="N",
        ),
        Option(
            "frame_size",
            "logical bytes per zstd frame, a power of two from 64K to 1M (fixed at init)",
            kind="size",
            default=DEFAULT_FRAME_SIZE,
            minimum=fmt.MIN_FRAME_SIZE,
            maximum=fmt.MAX_FRAME_SIZE,
            metavar="SIZE",
        ),
    )

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        level = check_level(request.options.get("level", DEFAULT_LEVEL))
        frame_size = _frame_size(request.options.get("frame_size", DEFAULT_FRAME_SIZE))
        return {"version": CONFIG_VERSION, "level": level, "frame_size": frame_size}

    @classmethod
    def load(
        cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest
    ) -> CompressLayer:
        version = config.get("version")
        if version != CONFIG_VERSION:
            raise ProviderError(
                f"compress: unsupported config version {version!r} "
                f"(this isofs reads version {CONFIG_VERSION})"
            )
        level = request.options.get("level", config.get("level", DEFAULT_LEVEL))
        if not isinstance(level, int) or isinstance(level, bool):
            raise ProviderError(f"compress: level must be an integer, not {level!r}")
        frame_size = _frame_size(config.get("frame_size", DEFAULT_FRAME_SIZE))
        return CompressLayer(frame_size, check_level(level))


def _frame_size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProviderError(f"compress: frame size must be an integer, not {value!r}")
    try:
        return fmt.check_frame_size(value)
    except ValueError as exc:
        raise ProviderError(f"compress: {exc}") from None
