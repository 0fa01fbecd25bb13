"""Sizes for listings: misses are measured in one batch per listing, off the event loop.

A `Volume` must never read a file on the event loop to learn a logical size for `readdir`,
`lookup` or `getattr` as the FUSE layer calls them: `prepare_listing` measures what a listing
misses in one worker-thread call, and `sized` measures a single miss in a worker thread.
Counted here with a layer that records on which thread files are opened.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
from isofs_xorpad import MAGIC, XorPadLayer, xor_at

from isofs.core.sizecache import SizeCache
from isofs.core.volume import Requester, Volume
from isofs.provider import Stack
from isofs.views.policy import Policy

ROOT = 1
TARGET = Requester(os.getuid(), os.getgid(), "target")


class ThreadRecordingLayer(XorPadLayer):
    """XorPadLayer that remembers which threads asked whether a file is formatted."""

    def __init__(self) -> None:
        super().__init__(0)
        self.threads: list[int] = []

    def is_formatted(self, lower):  # type: ignore[no-untyped-def]
        self.threads.append(threading.get_ident())
        return super().is_formatted(lower)


def encode(content: bytes, seed: int = 3) -> bytes:
    return MAGIC + seed.to_bytes(8, "big") + xor_at(seed, 0, content)


@pytest.fixture
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    for i in range(40):
        (src / "d" / f"f{i:02}").write_bytes(encode(bytes(i * 10)))
    (src / "d" / "plain").write_bytes(b"not formatted")
    (src / "d" / "empty").write_bytes(b"")
    (src / "d" / "sub").mkdir()
    return src


def make_volume(src: Path, layer: XorPadLayer) -> tuple[Volume, int]:
    root_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
    volume = Volume(
        root_fd,
        stack=Stack([layer]),
        policy=Policy(default_view="target"),
        sizes=SizeCache(None, racy_window_ns=0),
    )
    return volume, root_fd


async def list_sizes(volume: Volume, dir_nodeid: int) -> dict[str, int]:
    fh = volume.opendir(dir_nodeid, TARGET)
    try:
        await volume.prepare_listing(fh, 0)
        return {
            name: entry.attr.size
            for name, entry, _ in volume.readdir(fh, 0)
            if entry is not None and not entry.inode.is_dir
        }
    finally:
        volume.releasedir(fh)


async def test_a_listing_measures_its_misses_in_one_batch_off_the_event_loop(source: Path) -> None:
    layer = ThreadRecordingLayer()
    volume, root_fd = make_volume(source, layer)
    try:
        loop = threading.get_ident()
        d = (await volume.sized(lambda: volume.lookup(ROOT, "d", TARGET))).nodeid
        sizes = await list_sizes(volume, d)
        assert sizes == {
            **{f"f{i:02}": i * 10 for i in range(40)}, "plain": 13, "empty": 0
        }
        assert layer.threads and loop not in layer.threads  # never on the event loop
        assert volume.sizer.stats.batches == 1
        assert volume.sizer.stats.measured == 41  # the empty file needs no measuring
        assert volume.sizer.stats.single == 0
        # stat after the listing: answered from the cache, no file read at all
        before = len(layer.threads)
        for i in range(40):
            entry = await volume.sized(lambda i=i: volume.lookup(d, f"f{i:02}", TARGET))
            assert entry.attr.size == i * 10
        assert len(layer.threads) == before
        # a second listing measures nothing
        assert await list_sizes(volume, d) == sizes
        assert volume.sizer.stats.batches == 1 and len(layer.threads) == before
    finally:
        volume.close()
        os.close(root_fd)


async def test_a_warm_listing_looks_each_size_up_once(source: Path) -> None:
    """prepare_listing's pass finds the sizes; readdir shows them without a second lookup
    (and a file opened meanwhile is answered by its section, which knows pending writes)."""
    layer = ThreadRecordingLayer()
    volume, root_fd = make_volume(source, layer)
    try:
        d = (await volume.sized(lambda: volume.lookup(ROOT, "d", TARGET))).nodeid
        first = await list_sizes(volume, d)
        before = volume.sizes.statistics()
        assert await list_sizes(volume, d) == first
        after = volume.sizes.statistics()
        assert after.misses == before.misses
        assert after.hits - before.hits == 41  # 40 formatted + "plain"; "empty" needs none
        # a section with a pending write wins over what the listing found
        f07 = (await volume.sized(lambda: volume.lookup(d, "f07", TARGET))).nodeid
        fh = await volume.open(f07, os.O_RDWR, TARGET)
        await volume.write(fh[0], 1000, b"x" * 5)
        assert (await list_sizes(volume, d))["f07"] == 1005
        await volume.release(fh[0])
    finally:
        volume.close()
        os.close(root_fd)


async def test_a_single_stat_miss_is_measured_in_a_worker_thread(source: Path) -> None:
    layer = ThreadRecordingLayer()
    volume, root_fd = make_volume(source, layer)
    try:
        loop = threading.get_ident()
        d = (await volume.sized(lambda: volume.lookup(ROOT, "d", TARGET))).nodeid
        entry = await volume.sized(lambda: volume.lookup(d, "f07", TARGET))
        assert entry.attr.size == 70
        assert layer.threads and loop not in layer.threads
        assert volume.sizer.stats.single == 1 and volume.sizer.stats.batches == 0
        # getattr of the same file: cached now
        count = len(layer.threads)
        assert (await volume.sized(lambda: volume.getattr(entry.nodeid, "target"))).attr.size == 70
        assert len(layer.threads) == count
        # a change behind the mount: measured again, off the loop, with the new size
        (source / "d" / "f07").write_bytes(encode(b"x" * 5))
        assert (await volume.sized(lambda: volume.getattr(entry.nodeid, "target"))).attr.size == 5
        assert loop not in layer.threads[count:]
    finally:
        volume.close()
        os.close(root_fd)


async def test_a_file_changed_between_prepare_and_readdir_shows_one_consistent_state(
    source: Path,
) -> None:
    """A listing is a snapshot: an entry's size belongs to the native stat it is shown with
    (the one prepare_listing took), and the next getattr shows the file as it is now."""
    layer = ThreadRecordingLayer()
    volume, root_fd = make_volume(source, layer)
    try:
        d = (await volume.sized(lambda: volume.lookup(ROOT, "d", TARGET))).nodeid
        fh = volume.opendir(d, TARGET)
        await volume.prepare_listing(fh, 0)
        (source / "d" / "f03").write_bytes(encode(b"y" * 123))
        entries = {n: e for n, e, _ in volume.readdir(fh, 0) if e is not None}
        volume.releasedir(fh)
        header = len(encode(b""))
        for name in ("f03", "f04"):
            shown = entries[name].attr
            assert shown.size == shown.native.st_size - header
        assert entries["f04"].attr.size == 40
        now = await volume.sized(lambda: volume.getattr(entries["f03"].nodeid, "target"))
        assert now.attr.size == 123 and now.attr.native.st_size == 123 + header
    finally:
        volume.close()
        os.close(root_fd)


async def test_stat_after_stat_in_one_directory_measures_the_directory_once(
    source: Path,
) -> None:
    layer = ThreadRecordingLayer()
    volume, root_fd = make_volume(source, layer)
    try:
        loop = threading.get_ident()
        d = (await volume.sized(lambda: volume.lookup(ROOT, "d", TARGET))).nodeid
        for i in range(40):  # no listing first: one stat per file, as `find -exec stat` does
            entry = await volume.sized(
                lambda i=i: volume.lookup(d, f"f{i:02}", TARGET), d, "target"
            )
            assert entry.attr.size == i * 10
        assert volume.sizer.stats.batches == 1 and volume.sizer.stats.single == 0
        assert volume.sizer.stats.measured == 41  # the directory's every miss, at once
        assert loop not in layer.threads
        # a file changed right after still gets its size (measured alone: the directory
        # was measured a moment ago)
        (source / "d" / "f05").write_bytes(encode(b"z" * 7))
        entry = await volume.sized(lambda: volume.lookup(d, "f05", TARGET), d, "target")
        assert entry.attr.size == 7 and volume.sizer.stats.single == 1
    finally:
        volume.close()
        os.close(root_fd)
