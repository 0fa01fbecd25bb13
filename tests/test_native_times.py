"""The daemon's own reads leave native atimes alone (no mount: `native` and `Volume` direct).

Every object gets an atime earlier than its mtime, which relatime replaces at the next read:
a read that keeps the atime is told apart from one that does not by a control read through a
plain descriptor (skipped where the filesystem never updates atimes). The unprivileged case,
where O_NOATIME is refused on files the daemon does not own, runs in a forked child that
drops to another uid.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from isofs.core import native
from isofs.core.volume import Requester, Volume
from isofs.provider import Stack
from isofs.views.policy import Policy
from isofs_providers.encrypt import EncryptLayer

ROOT = 1
TARGET = Requester(os.getuid(), os.getgid(), "target")
NATIVE = Requester(os.getuid(), os.getgid(), "native")
ATIME, MTIME = 1_000_000_000_123_456_789, 1_500_000_000_987_654_321
NOBODY = 65534


def set_old_times(path: Path) -> None:
    os.utime(path, ns=(ATIME, MTIME), follow_symlinks=False)


def atime(path: Path) -> int:
    return os.lstat(path).st_atime_ns


def has_noatime(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NOATIME)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """file, dir (with an entry) and link, with old times; skips without atime updates."""
    (tmp_path / "file").write_bytes(b"some bytes")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "entry").write_bytes(b"")
    os.symlink("file", tmp_path / "link")
    control = tmp_path / "control"
    control.write_bytes(b"control")
    for name in ("file", "dir", "link", "control"):
        set_old_times(tmp_path / name)
    control.read_bytes()
    if atime(control) == ATIME:
        pytest.skip("this filesystem does not update atimes on read")
    return tmp_path


def test_internal_opens_listings_and_readlinks_keep_atime(tree: Path) -> None:
    dir_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    paths = {name: native.open_path(dir_fd, name) for name in ("file", "dir", "link")}
    try:
        fd = native.open_keeping_atime(dir_fd, "file", os.O_RDONLY)
        assert has_noatime(fd) and os.read(fd, 100) == b"some bytes"
        os.close(fd)
        fd = native.reopen_keeping_atime(paths["file"], os.O_RDWR)
        assert has_noatime(fd) and os.pread(fd, 4, 5) == b"byte"
        os.close(fd)
        assert native.list_names(paths["dir"], keep_atime=True) == ["entry"]
        assert native.readlink_keeping_atime(paths["link"]) == b"file"
        for name in ("file", "dir", "link"):
            assert os.lstat(tree / name).st_atime_ns == ATIME, name
        # the plain calls are a process's own: they move the atime as natively
        fd = native.reopen(paths["file"], os.O_RDONLY)
        native.keep_atime(fd)  # given afterwards, as to a descriptor created elsewhere
        assert has_noatime(fd)
        os.read(fd, 100)
        os.close(fd)
        assert atime(tree / "file") == ATIME
        native.list_names(paths["dir"])
        native.readlink(paths["link"])
        assert atime(tree / "dir") != ATIME and atime(tree / "link") != ATIME
    finally:
        for fd in (*paths.values(), dir_fd):
            os.close(fd)


def _as_nobody(dir_fd: int, path_fd: int, own_fd: int) -> dict[str, bool]:
    """In a forked child: the opens as an unprivileged daemon would make them."""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    ctypes.CDLL(None).prctl(4, 1)  # PR_SET_DUMPABLE: /proc/self/fd stays ours after setuid
    found = {}
    fd = native.open_keeping_atime(dir_fd, "foreign", os.O_RDONLY)
    found["foreign open works"] = os.read(fd, 10) == b"foreign"
    found["foreign open noatime"] = has_noatime(fd)
    native.keep_atime(fd)  # refused quietly
    found["foreign keep_atime noatime"] = has_noatime(fd)
    os.close(fd)
    fd = native.reopen_keeping_atime(path_fd, os.O_RDONLY)
    found["foreign reopen noatime"] = has_noatime(fd)
    os.close(fd)
    fd = native.reopen_keeping_atime(own_fd, os.O_RDONLY)
    found["own reopen noatime"] = has_noatime(fd)
    os.close(fd)
    return found


def test_unprivileged_daemon_falls_back_on_files_it_does_not_own(tree, run_in_process) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to become another user")
    os.chmod(tree, 0o755)
    (tree / "foreign").write_bytes(b"foreign")
    (tree / "own").write_bytes(b"own")
    os.chown(tree / "own", NOBODY, NOBODY)
    dir_fd = os.open(tree, os.O_PATH | os.O_DIRECTORY)
    path_fd = native.open_path(dir_fd, "foreign")
    own_fd = native.open_path(dir_fd, "own")
    try:
        found = run_in_process(_as_nobody, dir_fd, path_fd, own_fd)
    finally:
        for fd in (own_fd, path_fd, dir_fd):
            os.close(fd)
    assert found == {
        "foreign open works": True,
        "foreign open noatime": False,
        "foreign keep_atime noatime": False,
        "foreign reopen noatime": False,
        "own reopen noatime": True,
    }


class Volumes:
    """One source seen by a target-only and a native-only volume (encrypt layer, names)."""

    def __init__(self, root: Path) -> None:
        self.src = root / "src"
        self.src.mkdir()
        self.root_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY)
        stack = Stack([EncryptLayer(bytes(range(32)), encrypt_names=True)])
        self.target = Volume(self.root_fd, stack=stack, policy=Policy(default_view="target"))
        self.native = Volume(self.root_fd, stack=stack, policy=Policy())

    def close(self) -> None:
        self.target.close()
        self.native.close()
        os.close(self.root_fd)


@pytest.fixture
def volumes(tree: Path) -> Iterator[Volumes]:
    v = Volumes(tree)
    yield v
    v.close()


def stored(volumes: Volumes) -> dict[str, Path]:
    """Native entries of the source root by type (their names are encrypted)."""
    found = {}
    for name in os.listdir(volumes.src):
        path = volumes.src / name
        if not name.startswith(".isofs"):
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            found[kind] = path
    return found


async def test_target_view_requests_keep_atime(volumes: Volumes) -> None:
    vol = volumes.target
    fh, entry = await vol.create(ROOT, "file", 0o644, os.O_WRONLY, TARGET)
    await vol.write(fh, 0, b"x" * 70_000)  # a whole page and a partial one
    await vol.write(fh, 70_000, b"tail")
    directory = vol.mkdir(ROOT, "dir", 0o755, TARGET)
    entry_fh, _ = await vol.create(directory.nodeid, "entry", 0o644, os.O_WRONLY, TARGET)
    await vol.release(entry_fh)
    vol.symlink(ROOT, "link", b"file", TARGET)
    # the times are set while pages are pending: the write-back must not move the mtime
    await vol.setattr(entry.nodeid, atime_ns=ATIME, mtime_ns=MTIME, caller_view="target")
    await vol.release(fh)
    paths = stored(volumes)
    for kind in ("dir", "link"):
        set_old_times(paths[kind])
    assert os.stat(paths["file"]).st_mtime_ns == MTIME
    fresh = Volume(volumes.root_fd, stack=vol.stack, policy=Policy(default_view="target"))
    try:  # a fresh volume: nothing cached, so everything is read from the native files
        for name in ("file", "dir", "link"):
            fresh.lookup(ROOT, name, TARGET)
        file_nodeid = fresh.lookup(ROOT, "file", TARGET).nodeid
        assert fresh.getattr(file_nodeid, "target").attr.size == 70_004
        fh, _ = await fresh.open(file_nodeid, os.O_RDONLY, TARGET)
        assert await fresh.read(fh, 69_990, 100) == b"x" * 10 + b"tail"
        await fresh.release(fh)
        dir_nodeid = fresh.lookup(ROOT, "dir", TARGET).nodeid
        dh = fresh.opendir(dir_nodeid, TARGET)
        assert [name for name, _, _ in fresh.readdir(dh, 0)] == [".", "..", "entry"]
        fresh.releasedir(dh)
        assert fresh.readlink(fresh.lookup(ROOT, "link", TARGET).nodeid, "target") == b"file"
        for kind in ("file", "dir", "link"):
            st = os.lstat(paths[kind])
            assert (st.st_atime_ns, st.st_mtime_ns) == (ATIME, MTIME), kind
    finally:
        fresh.close()
    # a native-view read is the process's own read of native bytes: the atime moves
    nodeid = volumes.native.lookup(ROOT, paths["file"].name, NATIVE).nodeid
    fh, _ = await volumes.native.open(nodeid, os.O_RDONLY, NATIVE)
    assert len(await volumes.native.read(fh, 0, 1 << 20)) == os.stat(paths["file"]).st_size
    await volumes.native.release(fh)
    assert atime(paths["file"]) != ATIME
