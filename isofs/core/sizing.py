"""Learning logical sizes for listings: from the size cache, else from the files, in batches.

A transformed view shows logical sizes, and a provider may have to read a file to know one (a
header that says whether the file is formatted at all; a seek table at the end). `Sizer`
answers from the persistent `SizeCache` when it can, and otherwise measures: the first look at
a directory measures every size its listing misses in one batch in a worker thread, and a
single stat that misses is measured in a worker thread too (`measure_inline` off while the
volume runs such a call), so those hot paths read no file on the event loop; the rare other
callers (setattr, create) measure inline.

A size the cache refuses to keep (a file changed within the last half second, see
sizecache.py's racy window) is remembered for a moment (`MEMO_SECONDS`, validated like a cache
entry), so a listing and the stats that follow it, or two processes stat-ing one new file, do
not measure it again and again.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio

from isofs.core import native
from isofs.core.sections import NativeFile
from isofs.core.sizecache import NOT_FORMATTED, CachedSize, SizeCache
from isofs.provider import Stack

log = logging.getLogger(__name__)

#: Just-measured sizes the cache would not keep are remembered this long, at most this many.
MEMO_SECONDS = 1.0
#: Files measured together: opened, read ahead, then measured (bounded descriptors).
READAHEAD_GROUP = 64
MAX_MEMO = 100_000


class SizeMiss(Exception):
    """A size must be read from a file and this call may not do it on the event loop."""

    def __init__(self, path_fd: int) -> None:
        super().__init__("logical size unknown")
        self.path_fd = path_fd


@dataclass(frozen=True, slots=True)
class Measured:
    """One file's size as read from the file (None: it could not be read)."""

    key: tuple[int, int]
    validators: native.Validators
    value: CachedSize | None
    error: str | None = None


@dataclass(slots=True)
class SizingStatistics:
    batches: int = 0
    measured: int = 0
    failures: int = 0
    single: int = 0


class Sizer:
    """Logical sizes of native files through one stack (see the module doc)."""

    def __init__(self, stack: Stack, sizes: SizeCache) -> None:
        self.stack = stack
        self.sizes = sizes
        #: Measure on the calling thread when a size is missing (no event loop to protect).
        self.measure_inline = True
        self._memo: dict[
            tuple[int, int], tuple[native.Validators, CachedSize | None, float]
        ] = {}
        self.stats = SizingStatistics()

    def known(
        self, key: tuple[int, int], validators: native.Validators
    ) -> tuple[bool, CachedSize | None]:
        """(found, value) without reading the file; value None: it could not be measured."""
        cached = self.sizes.get(key, validators)
        if cached is not None:
            return True, cached
        return self._from_memo(key, validators)

    def _from_memo(
        self, key: tuple[int, int], validators: native.Validators
    ) -> tuple[bool, CachedSize | None]:
        """(found, value) of a measurement the cache would not keep yet, if still valid."""
        memo = self._memo.get(key)
        if memo is not None and memo[0] == validators and time.monotonic() < memo[2]:
            return True, memo[1]
        return False, None

    def for_listing(self, key: tuple[int, int], st: os.stat_result) -> int | None:
        """The size to show for a listed file when known without reading it, else None.

        The listing uses it instead of asking `size_of` again (so a cache answer counts as
        its hit here); a miss counts nothing: the listing measures it and asks later. A
        memo stays for its reader.
        """
        if not st.st_size:
            return 0
        validators = native.Validators.of(st)
        cached = self.sizes.peek(key, validators)
        if cached is not None:
            self.sizes.count_hit()
            return self._shown(st, cached)
        found, value = self._from_memo(key, validators)
        return self._shown(st, value) if found else None

    def size_of(self, key: tuple[int, int], st: os.stat_result, path_fd: int,
                describe: Callable[[], str]) -> int:  # fmt: skip
        """The logical size of a regular file (measured now if allowed, else SizeMiss)."""
        if not st.st_size:
            return 0  # an empty native file is not formatted: nothing to read
        validators = native.Validators.of(st)
        found, value = self.known(key, validators)
        if not found:
            if not self.measure_inline:
                raise SizeMiss(path_fd)
            measured = self._measure_path_fd(path_fd)
            self._remember(measured)
            value = measured.value
            if measured.error is not None:
                log.error("%s: cannot read the logical size: %s", describe(), measured.error)
        return self._shown(st, value)

    @staticmethod
    def _shown(st: os.stat_result, value: CachedSize | None) -> int:
        """The size to show for a known value (None: unmeasurable, shown as native, never
        cached as if it were true)."""
        if value is None or value is NOT_FORMATTED:
            return st.st_size
        return value

    # -- measuring (blocking; worker threads) ---------------------------------------------

    def _measure_fd(self, fd: int) -> Measured:
        st = os.fstat(fd)
        key, validators = (st.st_dev, st.st_ino), native.Validators.of(st)
        try:
            upper = self.stack.open(NativeFile(fd)) if st.st_size else None
            value: CachedSize = NOT_FORMATTED if upper is None else upper.size()
        except OSError as exc:
            return Measured(key, validators, None, exc.strerror or str(exc))
        return Measured(key, validators, value)

    def _measure_path_fd(self, path_fd: int) -> Measured:
        fd = native.reopen_keeping_atime(path_fd, os.O_RDONLY)
        try:
            return self._measure_fd(fd)
        finally:
            os.close(fd)

    def _measure_names(self, dir_fd: int, names: Iterable[str]) -> list[Measured]:
        """Measure files in groups: open a group, ask the kernel to read ahead what measuring
        reads (`Stack.size_probe`) for all of them, then measure each. On a cold page cache
        the disk then serves a group's reads together instead of one file at a time."""
        found = []
        names = list(names)
        for start in range(0, len(names), READAHEAD_GROUP):
            fds = []
            try:
                for name in names[start : start + READAHEAD_GROUP]:
                    try:
                        fds.append(
                            native.open_keeping_atime(dir_fd, name, os.O_RDONLY | os.O_NOFOLLOW)
                        )
                    except OSError:
                        continue  # gone or unreadable: the listing's own lookup will say
                for fd in fds:
                    self._read_ahead(fd)
                for fd in fds:
                    found.append(self._measure_fd(fd))
            finally:
                for fd in fds:
                    os.close(fd)
        return found

    def _read_ahead(self, fd: int) -> None:
        try:
            size = os.fstat(fd).st_size
            for offset, length in self.stack.size_probe(size):
                os.posix_fadvise(fd, max(0, offset), length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # only a hint

    # -- asynchronous entry points (event loop) ---------------------------------------------

    async def measure_names(self, dir_fd: int, names: list[str]) -> None:
        """Measure the named files of one directory in one worker-thread call.

        The caller keeps `dir_fd` open meanwhile (an open directory handle pins it).
        """
        if not names:
            return
        self.stats.batches += 1
        results = await trio.to_thread.run_sync(self._measure_names, dir_fd, names)
        for measured in results:
            self._remember(measured)

    async def measure_one(self, path_fd: int, describe: Callable[[], str]) -> None:
        """Measure one file in a worker thread.

        The file is opened here, on the event loop, so the thread reads a descriptor of its
        own: the inode's O_PATH descriptor may be closed by another request (a forget, a
        release) while the thread runs. A file that cannot be opened is left unmeasured (the
        caller's retry then says why).
        """
        self.stats.single += 1
        try:
            fd = native.reopen_keeping_atime(path_fd, os.O_RDONLY)
        except OSError:
            return
        try:
            measured = await trio.to_thread.run_sync(self._measure_fd, fd)
        finally:
            os.close(fd)
        if measured.error is not None:
            log.error("%s: cannot read the logical size: %s", describe(), measured.error)
        self._remember(measured)

    def _remember(self, measured: Measured) -> None:
        self.stats.measured += 1
        if measured.value is None:
            self.stats.failures += 1
        else:
            self.sizes.put(measured.key, measured.validators, measured.value)
        if len(self._memo) >= MAX_MEMO:
            self._memo.clear()
        expires = time.monotonic() + MEMO_SECONDS
        self._memo[measured.key] = (measured.validators, measured.value, expires)
