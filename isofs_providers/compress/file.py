"""`CompressedFile`: the logical (upper) file of one compressed native (lower) file.

Logical byte `x` is in frame `x // F`, and frame `i` is slot `i` of the seek table, so finding
bytes is arithmetic; a read decompresses only the frames it touches (several in one batch
call). Writes change frames in memory ("dirty" frames, whole logical frames); `flush()`, or
too many dirty frames, encodes them and writes them out:

- a frame whose new encoding fits its old slot is written in place, the slot's trailer
  growing over the slack (so slack of any size, 1..7 bytes included, costs nothing);
- a frame that does not fit borrows the spare room of the slots around it when they have
  enough: that run of slots is laid out again over the bytes it occupies (staged past the
  seek table first), and nothing else moves;
- otherwise, from the first frame that does not fit (or the first new frame) on, the rest of
  the file is laid out again (all of it when the file had taken rewrites before: they land
  all over it). When old slots have to move, they move up in place, back to front, each step
  written past the old place of the slots it holds; the first slots, which move less than
  their own size, are staged past the end of the file first, with the local runs and spare
  copies of the slots rewritten in place. Until the file is cut after its new table every
  frame has an intact copy, old or new, that fsck's scan finds. Without slots to move
  (appends, a last frame that grew) the slots are written where they belong at once. When a
  frame that was full outgrew its slot, every slot laid out again gets headroom (an eighth of
  its frame, or twice the largest growth seen) so that the next rewrite likely fits;
- then the seek table: only the changed entries when the layout did not move, else whole.

Everything here runs under the section lock (exclusive for writes, truncate and flush), so
the only state reads share is the small cache of decoded frames, which has its own lock.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from array import array
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import TYPE_CHECKING

from isofs.provider import CorruptData, RandomAccessFile
from isofs_providers.compress import format as fmt
from isofs_providers.compress.codec import Bytes, Codec

if TYPE_CHECKING:
    from isofs_providers.compress.format import Header, Table

#: Dirty logical bytes kept before they are encoded and written without waiting for flush().
DIRTY_LIMIT = 8 << 20
#: Bytes per lower write when laying out the rest of a file again.
WRITE_CHUNK = 1 << 20
#: The longest run of slots a frame that outgrew its slot lays out again in their own place,
#: borrowing their spare room, before the rest of the file is laid out again instead.
LOCAL_LIMIT = 2 << 20
#: Decoded frames kept for partial reads and read-modify-write (per file).
CLEAN_FRAMES = 2
#: Incompressible-file heuristic: after this many frames in a row that did not shrink, stop
#: trying for a while (INITIAL_SKIP frames, doubling up to MAX_SKIP while it keeps failing).
INCOMPRESSIBLE_RUN = 2
INITIAL_SKIP = 16
MAX_SKIP = 1024


def headroom(frame_len: int, frame_size: int, growth: int = 0) -> int:
    """Spare bytes for a slot laid out again after a rewrite outgrew its slot: an eighth of
    the frame, or twice the largest growth seen in the file when that is more, up to half the
    frame (holes stay small) and an eighth of the frame size (one frame turning
    incompressible must not double the others); never past the raw frame, which no frame
    exceeds."""
    room = max(frame_len >> 3, min(frame_len >> 1, 2 * growth, frame_size >> 3))
    return max(0, min(fmt.raw_frame_size(frame_size) - frame_len, room))


def _runs(indexes: Iterable[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted numbers as (first, stop)."""
    runs: list[tuple[int, int]] = []
    for n in indexes:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0], n + 1)
        else:
            runs.append((n, n + 1))
    return runs


class CompressedFile:
    """The uncompressed view of one file in the compress format (a `RandomAccessFile`)."""

    def __init__(
        self,
        lower: RandomAccessFile,
        codec: Codec,
        header: Header,
        table: Table,
        generation: Callable[[], int],
    ) -> None:
        self._lower = lower
        self._codec = codec
        self.frame_size = header.frame_size
        self.header = header
        self._generation = generation
        self._offsets = table.offsets
        self._slot_sizes = table.slot_sizes
        self._checksums = table.checksums
        #: Frames in the seek table, and the logical length of its last one.
        self._stored = table.frames
        self._stored_last = table.last_size
        #: Stored frames still part of the file (a truncate drops the rest at write-out).
        self._valid = table.frames
        self._size = table.logical_size(self.frame_size)
        self._dirty: dict[int, bytearray] = {}
        #: The seek table must be written even without dirty frames (a truncate).
        self._layout_changed = False
        self._clean: dict[int, Bytes] = {}
        self._clean_lock = threading.Lock()
        self.dirty_limit = DIRTY_LIMIT
        # incompressible-data heuristic
        self._broken = False
        #: The largest growth of a full frame past its slot seen (sizes later headroom).
        self._growth = 0
        #: A full stored frame was rewritten by an earlier write-out of this object.
        self._rewritten = False
        self._misses = 0
        self._skip = 0
        self._next_skip = INITIAL_SKIP
        self._compressed_any = False

    # ----------------------------------------------------------------- sizes and frames

    def size(self) -> int:
        return self._size

    def _check_usable(self) -> None:
        if self._broken:
            raise CorruptData("compress: a write-out failed half-way; run isofs fsck --repair")

    def _check_fits(self, size: int) -> None:
        """EFBIG before anything changes for a size the seek table cannot describe."""
        if fmt.frame_count(size, self.frame_size) + 1 > fmt.MAX_ENTRIES:
            raise OSError(errno.EFBIG, "compress: file too large for the seekable format")

    @property
    def stored_frames(self) -> int:
        return self._stored

    @property
    def table(self) -> Table:
        """The seek table as last written (or read)."""
        return fmt.Table(self._offsets, self._slot_sizes, self._checksums, self._stored_last)

    def _length(self, index: int, size: int | None = None) -> int:
        """Logical bytes of frame `index` in a file of `size` (default: now)."""
        size = self._size if size is None else size
        return max(0, min(self.frame_size, size - index * self.frame_size))

    def _stored_length(self, index: int) -> int:
        return self.frame_size if index < self._stored - 1 else self._stored_last

    # ------------------------------------------------------------------------ reading

    def read(self, offset: int, size: int) -> bytes | bytearray:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        self._check_usable()
        end = min(offset + size, self._size)
        if end <= offset:
            return b""
        frame = self.frame_size
        first, last = offset // frame, (end - 1) // frame
        contents = self._contents(range(first, last + 1), partial={first, last})
        if first == last:
            base = first * frame
            piece = contents[first]
            if piece is None:
                return bytes(end - offset)
            return bytes(memoryview(piece)[offset - base : end - base]).ljust(end - offset, b"\0")
        out = bytearray(end - offset)
        for index in range(first, last + 1):
            piece = contents[index]
            if piece is None:
                continue  # zeros
            base = index * frame
            lo, hi = max(offset, base), min(end, base + frame, base + len(piece))
            if hi > lo:
                out[lo - offset : hi - offset] = memoryview(piece)[lo - base : hi - base]
        return out

    def _contents(self, indexes: Iterable[int], partial: set[int]) -> dict[int, Bytes | None]:
        """Content of each frame (None: zeros); decodes the stored ones not in memory."""
        found: dict[int, Bytes | None] = {}
        missing = []
        with self._clean_lock:
            for index in indexes:
                if index in self._dirty:
                    found[index] = self._dirty[index]
                elif index >= self._valid:
                    found[index] = None
                elif index in self._clean:
                    found[index] = self._clean[index]
                else:
                    missing.append(index)
        if missing:
            decoded = self.decode(missing)
            found.update(decoded)
            keep = [i for i in missing if i in partial]
            if keep:
                with self._clean_lock:
                    for index in keep:  # a copy: a batch's segments share one buffer
                        self._remember(index, bytes(decoded[index]))
        return found

    def _remember(self, index: int, content: Bytes) -> None:
        """Keep a decoded frame (call with the clean lock held)."""
        self._clean.pop(index, None)
        self._clean[index] = content
        while len(self._clean) > CLEAN_FRAMES:
            del self._clean[next(iter(self._clean))]

    def _forget(self, first: int, stop: int | None = None) -> None:
        with self._clean_lock:
            for index in list(self._clean):
                if index >= first and (stop is None or index < stop):
                    del self._clean[index]

    def decode(self, indexes: list[int]) -> dict[int, Bytes]:
        """Contents of stored frames (sorted indexes), read in one lower read per run of
        adjacent slots and decompressed in one batch; CorruptData names the first bad one."""
        frames: list[Bytes] = []
        for first, stop in _runs(indexes):
            base = self._offsets[first]
            length = self._offsets[stop] - base
            raw = memoryview(self._lower.read(base, length))
            if len(raw) != length:
                gone = first + sum(
                    1 for i in range(first, stop) if self._offsets[i + 1] <= base + len(raw)
                )
                raise CorruptData(f"compress: frame {gone} is missing (native file shrank)")
            for index in range(first, stop):
                slot = raw[self._offsets[index] - base : self._offsets[index + 1] - base]
                frames.append(self.check_slot(index, slot))
        contents = self._codec.decompress(frames, indexes)
        out: dict[int, Bytes] = {}
        for index, content in zip(indexes, contents, strict=True):
            if len(content) != self._stored_length(index):
                raise CorruptData(f"compress: frame {index} decodes to {len(content)} bytes")
            out[index] = content
        return out

    def check_slot(self, index: int, slot: memoryview) -> memoryview:
        """The zstd frame of slot `index`, after checking everything but its content: the
        trailer names this frame, the frame header claims this frame's length, its blocks
        end exactly at the trailer, its checksum is the seek table's."""
        try:
            trailer = fmt.parse_trailer_at_end(slot)
            if trailer.index != index:
                raise CorruptData(f"its slot holds frame {trailer.index}")
            frame = slot[: len(slot) - trailer.length]
            expected = self._stored_length(index)
            header = fmt.parse_frame_header(frame, 0, len(frame), expected)
            if header.content_size != expected:
                raise CorruptData(f"it claims {header.content_size} bytes, not {expected}")
            if fmt.frame_extent(frame, 0, len(frame), header) != len(frame):
                raise CorruptData("bytes between the frame and its trailer")
            if fmt.frame_checksum(frame) != self._checksums[index]:
                raise CorruptData("it does not match its seek table entry")
        except CorruptData as exc:
            raise CorruptData(f"compress: frame {index}: {exc.strerror}") from None
        return frame

    # ------------------------------------------------------------------------ writing

    def write(self, offset: int, data: Bytes) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        self._check_usable()
        view = memoryview(data).cast("B")
        length = len(view)
        if length == 0:
            return 0
        self._check_fits(offset + length)
        if offset > self._size:
            self._extend(offset)
        frame = self.frame_size
        end = offset + length
        old_size = self._size
        first, last = offset // frame, (end - 1) // frame
        for index in range(first, last + 1):
            base = index * frame
            lo, hi = max(offset, base) - base, min(end, base + frame) - base
            piece = view[base + lo - offset : base + hi - offset]
            buf = self._dirty.get(index)
            if buf is None:
                old_length = self._length(index, old_size)
                if lo == 0 and hi >= old_length:
                    self._dirty[index] = bytearray(piece)
                    continue
                buf = self._editable(index, old_length)
            buf[lo:hi] = piece
        self._size = max(old_size, end)
        self._forget(first, last + 1)
        if len(self._dirty) * frame > self.dirty_limit:
            self._write_out()
        return length

    def _editable(self, index: int, length: int) -> bytearray:
        """A dirty copy of frame `index` (its `length` current bytes) to change in place."""
        if index < self._valid:
            buf = bytearray(self._contents([index], partial=set())[index] or b"")
            del buf[length:]
        else:
            buf = bytearray(length)
        self._dirty[index] = buf
        return buf

    def _extend(self, new_size: int) -> None:
        """Grow to `new_size` with zeros: the old partial last frame is padded in memory;
        frames past the stored ones read as zeros and are written as zero frames."""
        old = self._size
        frame = self.frame_size
        index, rest = divmod(old, frame)
        if rest and (index in self._dirty or index < self._valid):
            buf = self._dirty.get(index) or self._editable(index, rest)
            buf.extend(bytes(min(frame, new_size - index * frame) - len(buf)))
            self._forget(index, index + 1)
        self._size = new_size
        self._layout_changed = True

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        self._check_usable()
        if size == self._size:
            return
        if size > self._size:
            self._check_fits(size)
            self._extend(size)
            return
        count = fmt.frame_count(size, self.frame_size)
        for index in [i for i in self._dirty if i >= count]:
            del self._dirty[index]
        rest = size % self.frame_size
        if rest:
            index = count - 1
            buf = self._dirty.get(index)
            if buf is not None:
                del buf[rest:]
            elif index < self._valid:
                self._editable(index, rest)
        self._valid = min(self._valid, count)
        self._forget(max(0, count - 1))
        self._size = size
        self._layout_changed = True

    def pending_bytes(self) -> int:
        """About what `flush` will encode and write (the core runs a large flush off the
        event loop): the changed frames, or the whole file when its layout changed."""
        if self._layout_changed:
            return max(self._size, len(self._dirty) * self.frame_size)
        return len(self._dirty) * self.frame_size

    def flush(self) -> None:
        self._check_usable()
        self._write_out()
        with self._clean_lock:
            self._clean.clear()  # an idle file keeps no decoded frames
        self._lower.flush()

    # ---------------------------------------------------------------------- write-out

    def _encode(self, indexes: list[int]) -> dict[int, Bytes]:
        """New frames for dirty frames, trying zstd unless the file looks incompressible."""
        items = [(i, self._dirty[i]) for i in indexes]
        out: dict[int, Bytes] = {}
        pos = 0
        while pos < len(items):
            if self._skip:
                for index, data in items[pos : pos + self._skip]:
                    out[index] = self._codec.store_raw(data)
                    self._skip -= 1
                    pos += 1
                continue
            probing = self._misses or not self._compressed_any
            group = items[pos : pos + 1] if probing else items[pos:]
            for (index, _), (encoded, packed) in zip(
                group, self._codec.compress([data for _, data in group]), strict=True
            ):
                out[index] = encoded
                if packed:
                    self._misses, self._next_skip, self._compressed_any = 0, INITIAL_SKIP, True
                else:
                    self._misses += 1
            if self._misses >= INCOMPRESSIBLE_RUN:
                self._skip, self._misses = self._next_skip, 0
                self._next_skip = min(MAX_SKIP, 2 * self._next_skip)
            pos += len(group)
        return out

    def _write_out(self) -> None:
        """Encode dirty frames and write them, then the seek table (module doc)."""
        count = fmt.frame_count(self._size, self.frame_size)
        if not self._dirty and not self._layout_changed and self._valid == self._stored == count:
            return
        encoded = self._encode(sorted(self._dirty))
        for index in range(self._valid, count):
            if index not in encoded:
                encoded[index] = self._codec.zero_frame(self._length(index))
        generation = self._generation()
        first_move, grew, runs = self._plan(encoded, count, generation)
        kept_end = min(first_move, self._valid)
        sizes = self._slot_sizes[:kept_end]
        checksums = self._checksums[:kept_end]
        for index in range(kept_end):
            if index in encoded:
                checksums[index] = fmt.frame_checksum(encoded[index])
        relaid: set[int] = set()
        for run in runs:
            for index, (slot, checksum) in enumerate(zip(run.slots, run.checksums, strict=True)):
                sizes[run.first + index] = len(slot)
                checksums[run.first + index] = checksum
            relaid.update(range(run.first, run.stop))
        region: _Region | None = None
        if first_move < count:
            region = self._lay_out(first_move, count, encoded, grew, generation)
            sizes.extend(region.sizes)
            checksums.extend(region.checksums)
        lengths = array("I", [self.frame_size]) * count
        if count:
            lengths[-1] = self._length(count - 1)
        in_place = [i for i in sorted(encoded) if i < first_move and i not in relaid]
        table_at = self._offsets[kept_end] + (region.length if region else 0)
        written = region.written if region else 0
        rewrites = any(
            i < self._valid and self._stored_length(i) == self.frame_size for i in self._dirty
        )
        if region is None and count == self._stored:
            if runs:
                stage_at = self._lower.size()
                written += self._stage(stage_at, None, runs, in_place, encoded, generation)
                written += self._write_in_place(in_place, encoded, generation)
                written += self._copy_runs_down(runs)
                changed = sorted(relaid.union(in_place))
                written += self._finish(
                    lambda: self._update_entries(changed, sizes, lengths, checksums, table_at)
                )
                table_end = table_at + fmt.table_size(count + 1)
                self._finish(lambda: self._lower.truncate(table_end))
            else:
                written += self._write_in_place(in_place, encoded, generation)
                written += self._update_entries(in_place, sizes, lengths, checksums, table_at)
        else:
            table = fmt.encode_table(
                array("I", [fmt.HEADER_SIZE]) + sizes,
                array("I", [0]) + lengths,
                array("I", [fmt.EMPTY_CHECKSUM]) + checksums,
            )
            shifted = region is not None and region.shifted
            if shifted or runs:
                # Staged past both the old end and the new table: the slots of the relayout
                # that cannot move up in place, the local runs, spare copies of the slots
                # rewritten in place (a kill while one is written leaves its copy).
                stage_at = max(self._lower.size(), table_at + len(table))
                prefix = region if shifted else None
                written += self._stage(stage_at, prefix, runs, in_place, encoded, generation)
            written += self._write_in_place(in_place, encoded, generation)
            written += self._copy_runs_down(runs)
            if region is not None and region.shifted:
                written += self._finish(lambda: self._shift_up(region, encoded, generation))
                written += self._finish(lambda: self._copy_staged_down(region, stage_at))
            self._finish(lambda: self._lower.write(table_at, table))
            written += len(table)
            if self._lower.size() > table_at + len(table):
                self._finish(lambda: self._lower.truncate(table_at + len(table)))
        self._codec.stats.add(lower_bytes_written=written)
        self._rewritten = self._rewritten or rewrites
        self._slot_sizes, self._checksums = sizes, checksums
        self._offsets = array("Q", accumulate(sizes, initial=fmt.HEADER_SIZE))
        self._stored = self._valid = count
        self._stored_last = self._length(count - 1) if count else 0
        with self._clean_lock:
            for index in sorted(self._dirty)[-CLEAN_FRAMES:]:
                self._remember(index, bytes(self._dirty[index]))
        self._dirty.clear()
        self._layout_changed = False

    def _plan(
        self, encoded: dict[int, Bytes], count: int, generation: int
    ) -> tuple[int, bool, list[_Run]]:
        """Where this write-out lays the rest of the file out again (`count`: nowhere),
        whether with headroom, and the runs of slots laid out again in their own place.

        A stored frame that outgrew its slot borrows the spare room of the slots around it
        (`_local_run`) when they have enough, so that nothing else moves. When they do not,
        the rest of the file is laid out again from that frame, with headroom; and when the
        file had taken rewrites before (the writes are spread over it, not only here), the
        whole file is, so that frames before it get headroom too instead of each costing a
        relayout of the rest when its turn comes.
        """
        first_move = self._valid if count > self._valid else count
        outgrown: list[int] = []
        for index in sorted(encoded):
            if index >= self._valid:
                break
            if len(encoded[index]) + fmt.TRAILER_MIN > self._slot_sizes[index]:
                outgrown.append(index)
                if self._stored_length(index) == self.frame_size:
                    self._growth = max(self._growth, self._growth_of(index, encoded[index]))
        runs: list[_Run] = []
        low = 0
        for index in outgrown:
            if index < low:
                continue  # inside the previous run
            run = None
            if any(i not in encoded for i in range(index + 1, self._valid)):
                run = self._local_run(index, low, min(self._valid, first_move), encoded,
                                      generation)  # fmt: skip
            if run is None:  # (with no kept slot after it, the rest moves at no extra cost)
                first_move = index
                break
            runs.append(run)
            low = run.stop
        grew = any(
            self._stored_length(i) == self.frame_size for i in outgrown if i >= first_move
        )
        if grew and self._rewritten and first_move > 0:
            return 0, True, []
        return first_move, grew, runs

    def _local_run(
        self, index: int, low: int, high: int, encoded: dict[int, Bytes], generation: int
    ) -> _Run | None:
        """Slots around frame `index` (within low..high-1) laid out again over exactly the
        bytes they occupy, their spare room shared out in proportion to their headroom; None
        when no run of at most LOCAL_LIMIT bytes (nor one shorter than the rest of the file)
        has spare room for half the headroom of its frames."""
        parts = {index: self._part(index, encoded)}
        first, stop = index, index + 1
        rest = self._offsets[self._valid] - self._offsets[index]
        right = True
        while True:
            span = self._offsets[stop] - self._offsets[first]
            spare = span - sum(p.need for p in parts.values())
            wanted = sum(p.target for p in parts.values())
            if spare >= 0 and 2 * spare >= wanted:
                run = self._share_out(first, stop, parts, spare, generation)
                if run is not None:
                    return run
            if span >= min(LOCAL_LIMIT, rest):
                return None
            grow_right, grow_left = stop < high, first > low
            if grow_right and (right or not grow_left):
                parts[stop] = self._part(stop, encoded)
                stop += 1
            elif grow_left:
                first -= 1
                parts[first] = self._part(first, encoded)
            else:
                return None
            right = not right

    def _part(self, index: int, encoded: dict[int, Bytes]) -> _Part:
        """Frame `index` as part of a local run: its new encoding, or its stored frame (read
        from its slot); a damaged slot is kept as it is, its size unchanged."""
        frame: Bytes | None = encoded.get(index)
        slot = b""
        if frame is None:
            size = self._slot_sizes[index]
            slot = bytes(self._lower.read(self._offsets[index], size))
            if len(slot) == size:
                with contextlib.suppress(CorruptData):
                    trailer = fmt.parse_trailer_at_end(memoryview(slot))
                    frame = slot[: size - trailer.length]
            if frame is None:
                return _Part(None, slot.ljust(size, b"\0"), size, 0)
        target = headroom(len(frame), self.frame_size, self._growth)
        return _Part(frame, slot, len(frame) + fmt.TRAILER_MIN, target)

    def _share_out(
        self, first: int, stop: int, parts: dict[int, _Part], spare: int, generation: int
    ) -> _Run | None:
        """The run's new slots: each part its need plus a share of `spare` in proportion to
        its headroom, none past the largest valid slot; None if that cannot be done."""
        order = range(first, stop)
        wanted = sum(parts[i].target for i in order)
        flexible = [i for i in order if parts[i].frame is not None]
        caps = {i: fmt.max_slot_size(self.frame_size) - parts[i].need for i in flexible}
        rooms = {i: min(caps[i], spare * parts[i].target // wanted if wanted else 0)
                 for i in flexible}  # fmt: skip
        left = spare - sum(rooms.values())
        for i in sorted(flexible, key=lambda i: -parts[i].target):
            extra = min(left, caps[i] - rooms[i])
            rooms[i] += extra
            left -= extra
        if left or any(caps[i] < 0 for i in flexible):
            return None
        run = _Run(first, stop)
        for i in order:
            part = parts[i]
            if part.frame is None:
                run.slots.append(part.slot)
                run.checksums.append(self._checksums[i])
            else:
                size = part.need + rooms[i]
                run.slots.append(fmt.encode_slot(part.frame, i, generation, size))
                run.checksums.append(
                    fmt.frame_checksum(part.frame) if part.slot == b"" else self._checksums[i]
                )
        return run

    def _stage(
        self, at: int, region: _Region | None, runs: list[_Run], in_place: list[int],
        encoded: dict[int, Bytes], generation: int,
    ) -> int:  # fmt: skip
        """Write past the end of the file, at `at`: the new slots of a relayout that cannot
        move up in place (`region`'s first slots, if given), the local runs' new slots and
        spare copies of the slots about to be rewritten in place; the bytes written. A
        failure cuts the file back: nothing old has changed yet."""
        spare = b"".join(
            fmt.encode_slot(encoded[i], i, generation, len(encoded[i]) + fmt.TRAILER_MIN)
            for i in in_place
        )
        staged = b"".join(slot for run in runs for slot in run.slots)
        before = self._lower.size()
        written = 0
        try:
            if region is not None and region.staged_stop > region.first:
                written = self._write_slots(region, region.first, region.staged_stop, at,
                                            encoded, generation)  # fmt: skip
            if staged or spare:
                self._lower.write(at + written, staged + spare)
        except BaseException:
            with contextlib.suppress(OSError):
                self._lower.truncate(before)
            raise
        if region is not None:
            region.written += written
            self._codec.stats.add(tail_bytes=written)
        self._codec.stats.add(local_bytes=len(staged))
        return written + len(staged) + len(spare)

    def _copy_runs_down(self, runs: list[_Run]) -> int:
        """Write the local runs' slots over the slots they replace (their staged copies stay
        intact until the file is cut after its seek table)."""
        written = 0
        if not runs:
            return 0
        for run in runs:
            blob = b"".join(run.slots)
            self._finish(lambda run=run, blob=blob: self._lower.write(self._offsets[run.first],
                                                                      blob))  # fmt: skip
            written += len(blob)
        self._codec.stats.add(local_relayouts=len(runs), local_bytes=written)
        return written

    def _finish(self, step: Callable[[], object]) -> int:
        """A step after old slots started being overwritten: a failure leaves the file for
        fsck (its scan finds an intact copy of every frame), and this object refuses work."""
        try:
            result = step()
        except BaseException:
            self._broken = True
            raise
        return result if isinstance(result, int) else 0

    def _growth_of(self, index: int, frame: Bytes) -> int:
        """How much frame `index` grew (its old length from its trailer's last 4 bytes)."""
        tail = self._lower.read(self._offsets[index + 1] - 4, 4)
        trailer = int.from_bytes(tail, "little") if len(tail) == 4 else 0
        old = self._slot_sizes[index] - trailer
        return len(frame) - old if 0 < old <= len(frame) else 0

    def _shift_up(self, region: _Region, encoded: dict[int, Bytes], generation: int) -> int:
        """Write the slots of a relayout from `region.staged_stop` on where they belong,
        back to front, in steps whose new place starts past the old place of every slot they
        hold: until a slot's new copy is complete its old copy is intact, and nothing is
        overwritten before it was read (module doc)."""
        stop = region.stop
        written = 0
        while stop > region.staged_stop:
            old_end = self._old_end(stop - 1)
            first = stop - 1
            while (
                first - 1 >= region.staged_stop
                and region.offset(first - 1) >= old_end
                and region.offset(stop) - region.offset(first - 1) <= WRITE_CHUNK
            ):
                first -= 1
            written += self._write_slots(region, first, stop, region.offset(first), encoded,
                                         generation)  # fmt: skip
            stop = first
        region.written += written
        self._codec.stats.add(tail_bytes=written)
        return written

    def _old_end(self, index: int) -> int:
        """Where the old slot of frame `index` ends (a new frame: where the old slots end)."""
        return self._offsets[min(index + 1, self._valid)]

    def _copy_staged_down(self, region: _Region, staged_at: int) -> int:
        """Copy a relayout's staged first slots from past the end to where they belong (the
        staged copy lies past the new layout: source and destination never overlap)."""
        total = region.offset(region.staged_stop) - region.start
        for offset in range(0, total, WRITE_CHUNK):
            length = min(WRITE_CHUNK, total - offset)
            chunk = self._lower.read(staged_at + offset, length)
            if len(chunk) != length:
                raise CorruptData("compress: the staged copy shrank while it was moved")
            self._lower.write(region.start + offset, chunk)
        region.written += total
        self._codec.stats.add(tail_bytes=total)
        return total

    def _write_slots(
        self, region: _Region, first: int, stop: int, at: int, encoded: dict[int, Bytes],
        generation: int,
    ) -> int:  # fmt: skip
        """Write the new slots first..stop-1 of a relayout from `at` on, reading the kept
        ones from their old place (about WRITE_CHUNK bytes per read and per write)."""
        written = 0
        index = first
        while index < stop:
            batch_stop = index + 1
            while (
                batch_stop < stop
                and region.offset(batch_stop) - region.offset(index) < WRITE_CHUNK
            ):
                batch_stop += 1
            old = self._read_slots([i for i in range(index, batch_stop) if i not in encoded])
            pending = bytearray()
            for i in range(index, batch_stop):
                size = region.size(i)
                if i in encoded:
                    pending += fmt.encode_slot(encoded[i], i, generation, size)
                else:
                    pending += self._relaid_slot(i, old.pop(i), size, generation)
            self._lower.write(at + written, pending)
            written += len(pending)
            index = batch_stop
        return written

    def _read_slots(self, indexes: list[int]) -> dict[int, bytes]:
        """The stored slots of sorted frame numbers, one read from the first to the last (a
        short read keeps what is there: the frame reads EIO)."""
        if not indexes:
            return {}
        base = self._offsets[indexes[0]]
        view = memoryview(self._lower.read(base, self._offsets[indexes[-1] + 1] - base))
        out = {}
        for index in indexes:
            lo, hi = self._offsets[index] - base, self._offsets[index + 1] - base
            out[index] = bytes(view[lo:hi]).ljust(hi - lo, b"\0")
        return out

    def _write_in_place(
        self, indexes: list[int], encoded: dict[int, Bytes], generation: int
    ) -> int:
        """Write frames into their own slots (adjacent slots in one write); bytes written."""
        written = 0
        for first, stop in _runs(indexes):
            blob = b"".join(
                fmt.encode_slot(encoded[i], i, generation, self._slot_sizes[i])
                for i in range(first, stop)
            )
            self._lower.write(self._offsets[first], blob)
            written += len(blob)
        self._codec.stats.add(in_place_rewrites=len(indexes))
        return written

    def _update_entries(
        self, indexes: list[int], sizes: array, lengths: array, checksums: array, table_at: int
    ) -> int:
        """Rewrite only the seek table entries of frames rewritten in place."""
        written = 0
        for first, stop in _runs(indexes):
            blob = b"".join(
                fmt.encode_entry(sizes[i], lengths[i], checksums[i]) for i in range(first, stop)
            )
            self._lower.write(table_at + fmt.entry_offset(first), blob)
            written += len(blob)
        return written

    def _lay_out(
        self, first: int, count: int, encoded: dict[int, Bytes], grew: bool, generation: int
    ) -> _Region:
        """Plan slots first..count-1 anew from slot `first`'s offset on (with headroom when
        `grew`). Without a kept slot among them (appends, a last frame that grew) they are
        written at once, front to back; else the write-out stages the first of them, which
        do not move far enough to be written over their old place, and `_shift_up` writes
        the rest back to front, so that every frame keeps an intact copy, old or new."""
        region = _Region(self._offsets[min(first, self._valid)], first, count)
        for index in range(first, count):
            if index in encoded:
                frame = encoded[index]
                room = headroom(len(frame), self.frame_size, self._growth) if grew else 0
                region.sizes.append(len(frame) + fmt.TRAILER_MIN + room)
                region.checksums.append(fmt.frame_checksum(frame))
            else:
                region.shifted = True
                region.sizes.append(self._kept_size(index, grew))
                region.checksums.append(self._checksums[index])
        region.offsets = array("Q", accumulate(region.sizes, initial=region.start))
        region.length = region.offsets[-1] - region.start
        if region.shifted:
            stop = count
            while stop > first and region.offset(stop - 1) >= self._old_end(stop - 1):
                stop -= 1
            region.staged_stop = stop
        else:
            region.written = self._write_slots(region, first, count, region.start, encoded,
                                               generation)  # fmt: skip
            self._codec.stats.add(tail_bytes=region.written)
        self._codec.stats.add(tail_rewrites=1)
        return region

    def _kept_size(self, index: int, grew: bool) -> int:
        """The new size of a kept slot laid out again: the same, or with headroom (at least
        the room its trailer has); a damaged trailer keeps the slot as it is."""
        size = self._slot_sizes[index]
        if not grew:
            return size
        end = self._offsets[index + 1]
        tail = self._lower.read(end - fmt.TRAILER_TAIL, fmt.TRAILER_TAIL)
        length = fmt.trailer_length(tail, size)
        if length is None or not fmt.is_trailer_head(
            self._lower.read(end - length, fmt.SKIPPABLE_HEADER_SIZE), length
        ):
            return size
        frame = size - length
        room = max(length - fmt.TRAILER_MIN, headroom(frame, self.frame_size, self._growth))
        return frame + fmt.TRAILER_MIN + room

    def _relaid_slot(self, index: int, slot: bytes, size: int, generation: int) -> bytes:
        """A kept slot with a trailer for its new `size`; one that keeps its size is copied
        as it is (a damaged one always does: its frame stays unreadable, the rest of the
        file is unaffected)."""
        if size == len(slot):
            return slot
        try:
            trailer = fmt.parse_trailer_at_end(memoryview(slot))
        except CorruptData:
            raise CorruptData(f"compress: frame {index} changed during a relayout") from None
        frame = slot[: len(slot) - trailer.length]
        return fmt.encode_slot(frame, index, generation, size)


@dataclass
class _Part:
    """One frame of a local run: the frame (None: a damaged slot kept as it is), its slot
    as read (empty for a new encoding), the bytes it needs and the headroom it wants."""

    frame: Bytes | None
    slot: bytes
    need: int
    target: int


@dataclass
class _Run:
    """Slots first..stop-1 laid out again over exactly the bytes they occupied."""

    first: int
    stop: int
    slots: list[bytes] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)


@dataclass
class _Region:
    """Slots first..stop-1 laid out anew from `start`: their new sizes and checksums, and
    how they are written (`shifted`: kept slots move; those before staged_stop are staged
    past the end, the others moved up in place)."""

    start: int
    first: int
    stop: int
    sizes: list[int] = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)
    offsets: array = field(default_factory=lambda: array("Q"))
    length: int = 0
    shifted: bool = False
    staged_stop: int = 0
    #: Bytes written for the relayout so far (staged, moved and written in place).
    written: int = 0

    def offset(self, index: int) -> int:
        """Where the new slot of frame `index` starts (index == stop: where they end)."""
        return self.offsets[index - self.first]

    def size(self, index: int) -> int:
        return self.sizes[index - self.first]
