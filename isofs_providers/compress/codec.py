"""zstd work for the `compress` provider: frames in and out, raw fallback, counters.

zstd releases the GIL for every call, and `zstandard`'s batch calls
(`multi_compress_to_buffer`, `multi_decompress_to_buffer`) spread one batch over several
threads of their own, so a batch of frames keeps both cores busy even when the call is made
inline on the event loop. Compression and decompression contexts are per thread (a context
must not be used by two threads at once; the core may call a layer from worker threads).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import zstandard

from isofs.provider import CorruptData
from isofs_providers.compress.format import MAX_FRAME_SIZE, raw_frame, raw_frame_size

Bytes = bytes | bytearray | memoryview

#: Threads a batch call may use (zstandard starts them per call).
BATCH_THREADS = max(1, min(2, os.cpu_count() or 1))
#: Batches smaller than this are cheaper frame by frame than through the batch call's threads.
MIN_BATCH = 2
#: A compressed frame is kept only if it saves at least 1/64 of the raw frame; anything less
#: costs a decompression on every read to save almost nothing.
MIN_SAVING_SHIFT = 6


@dataclass
class CodecStatistics:
    """What `isofs status` shows for the layer (all files of the mount together)."""

    frames_compressed: int = 0
    frames_raw: int = 0  # tried, did not shrink enough, stored raw
    frames_raw_untried: int = 0  # stored raw without trying (incompressible file heuristic)
    frames_zero: int = 0  # holes and zero-extended ranges
    bytes_in: int = 0  # logical bytes encoded
    bytes_out: int = 0  # frame bytes produced
    frames_decoded: int = 0
    bytes_decoded: int = 0
    in_place_rewrites: int = 0  # slots rewritten where they were
    tail_rewrites: int = 0  # times the rest of a file was laid out again
    tail_bytes: int = 0  # bytes written by those
    local_relayouts: int = 0  # runs of slots laid out again in their own place (borrowing room)
    local_bytes: int = 0  # bytes written by those (staged and copied down)
    lower_bytes_written: int = 0  # everything written to lower files (slots, tables)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self.lock:
            for name, value in counts.items():
                setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            values = {k: v for k, v in vars(self).items() if k != "lock"}
        encoded = values["bytes_in"]
        values["ratio"] = round(encoded / values["bytes_out"], 3) if values["bytes_out"] else None
        return values


class Codec:
    """Compresses frames at one level; decompresses frames of any valid frame size."""

    def __init__(self, level: int) -> None:
        self.level = level
        self.stats = CodecStatistics()
        self._local = threading.local()

    # -- contexts --

    def _compressor(self) -> zstandard.ZstdCompressor:
        found = getattr(self._local, "compressor", None)
        if found is None:
            found = zstandard.ZstdCompressor(
                level=self.level, write_checksum=True, write_content_size=True,
                write_dict_id=False,
            )  # fmt: skip
            self._local.compressor = found
        return found

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        found = getattr(self._local, "decompressor", None)
        if found is None:
            # The window bound caps what a hostile frame can make zstd allocate.
            found = zstandard.ZstdDecompressor(max_window_size=MAX_FRAME_SIZE)
            self._local.decompressor = found
        return found

    # -- compression --

    def compress(self, chunks: Sequence[Bytes]) -> list[tuple[Bytes, bool]]:
        """(frame, compressed?) per chunk: zstd's frame when it saves enough, else raw."""
        if not chunks:
            return []
        compressor = self._compressor()
        if len(chunks) >= MIN_BATCH:
            batch = compressor.multi_compress_to_buffer(list(chunks), threads=BATCH_THREADS)
            candidates: list[Bytes] = [batch[i] for i in range(len(batch))]
        else:
            candidates = [compressor.compress(chunks[0])]
        out: list[tuple[Bytes, bool]] = []
        packed = raw = 0
        produced = 0
        for chunk, candidate in zip(chunks, candidates, strict=True):
            limit = raw_frame_size(len(chunk)) - (len(chunk) >> MIN_SAVING_SHIFT)
            if len(candidate) <= limit:
                frame: Bytes = bytes(candidate)
                packed += 1
                out.append((frame, True))
            else:
                frame = raw_frame(chunk)
                raw += 1
                out.append((frame, False))
            produced += len(frame)
        self.stats.add(
            frames_compressed=packed, frames_raw=raw, bytes_out=produced,
            bytes_in=sum(len(c) for c in chunks),
        )  # fmt: skip
        return out

    def store_raw(self, chunk: Bytes) -> bytearray:
        """A raw frame without trying zstd (the file looks incompressible)."""
        frame = raw_frame(chunk)
        self.stats.add(frames_raw_untried=1, bytes_in=len(chunk), bytes_out=len(frame))
        return frame

    def zero_frame(self, length: int) -> bytes:
        """The frame of `length` zero bytes (holes cost a few bytes each)."""
        frame = _zero_frame(length)
        self.stats.add(frames_zero=1, bytes_in=length, bytes_out=len(frame))
        return frame

    # -- decompression --

    def decompress(self, frames: Sequence[Bytes], where: Sequence[int]) -> list[Bytes]:
        """Contents of checked frames (their header and extent already verified); CorruptData
        naming the frame (`where` holds frame numbers) when zstd rejects one."""
        decompressor = self._decompressor()
        if len(frames) >= MIN_BATCH:
            try:
                batch = decompressor.multi_decompress_to_buffer(
                    list(frames), threads=BATCH_THREADS
                )
                out: list[Bytes] = [batch[i] for i in range(len(batch))]
            except zstandard.ZstdError:
                out = [self._one(decompressor, f, n) for f, n in zip(frames, where, strict=True)]
        else:
            out = [self._one(decompressor, frames[0], where[0])]
        self.stats.add(frames_decoded=len(out), bytes_decoded=sum(len(o) for o in out))
        return out

    def decompress_one(self, frame: Bytes, n: int) -> bytes:
        """One frame's content (CorruptData naming frame `n` when zstd rejects it)."""
        return self._one(self._decompressor(), frame, n)

    @staticmethod
    def _one(decompressor: zstandard.ZstdDecompressor, frame: Bytes, n: int) -> bytes:
        try:
            return decompressor.decompress(frame)
        except zstandard.ZstdError as exc:
            reason = str(exc).removeprefix("decompression error: ")
            raise CorruptData(f"compress: frame {n} does not decode ({reason})") from None


@lru_cache(maxsize=16)
def _zero_frame(length: int) -> bytes:
    return zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True).compress(
        bytes(length)
    )
