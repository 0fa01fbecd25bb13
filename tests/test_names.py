"""The names side of a transformed view, driven through `Volume` without a mount.

The stack is the encrypt layer with encrypted names (a fixed test key), one view (target).
These tests reach what a mount cannot show on demand: a rename or rmdir that fails after the
replaced directory's key file was removed, which must put the directory back as it was.
"""

from __future__ import annotations

import errno
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
DIRIV = ".isofs.diriv"
LONG = "long-" + "x" * 250


class Names:
    """A target-view volume with encrypted names over a fresh source directory."""

    def __init__(self, root: Path) -> None:
        self.src = root / "src"
        self.src.mkdir()
        self.root_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY)
        layer = EncryptLayer(bytes(range(32)), encrypt_names=True)
        self.vol = Volume(self.root_fd, stack=Stack([layer]), policy=Policy(default_view="target"))

    def mkdir(self, name: str, parent: int = ROOT) -> int:
        return self.vol.mkdir(parent, name, 0o755, TARGET).nodeid

    def stored(self, nodeid: int) -> Path:
        """The native directory behind a nodeid (found by its inode number)."""
        inode, _ = self.vol.inodes.by_nodeid(nodeid)
        return Path(os.readlink(native.proc_path(inode.path_fd)))

    def close(self) -> None:
        self.vol.close()
        os.close(self.root_fd)


@pytest.fixture
def names(tmp_path: Path) -> Iterator[Names]:
    env = Names(tmp_path)
    yield env
    env.close()


def snapshot(directory: Path) -> tuple[dict[str, bytes], int, int]:
    """A directory's entries with contents, and its atime and mtime (looking moves neither)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        st = os.fstat(fd)
        entries = {}
        for name in sorted(os.listdir(fd)):
            path = directory / name
            entries[name] = os.fsencode(os.readlink(path)) if path.is_symlink() else b""
            if not path.is_symlink():
                entry_fd = os.open(path, os.O_RDONLY | os.O_NOATIME)
                entries[name] = os.read(entry_fd, 1 << 16)
                os.close(entry_fd)
    finally:
        os.close(fd)
    return entries, st.st_atime_ns, st.st_mtime_ns


def refuse(monkeypatch: pytest.MonkeyPatch, module: object, name: str, err: int) -> list[str]:
    """Make module.name fail with `err` (after the emptying it follows); records the call."""
    calls: list[str] = []

    def failing(*args: object, **kwargs: object) -> None:
        calls.append(name)
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(module, name, failing)
    return calls


@pytest.mark.parametrize("target_name", ["empty", LONG])
def test_failed_rename_over_an_empty_directory_puts_it_back(names, monkeypatch, target_name):
    names.mkdir("moving")
    target = names.mkdir(target_name)
    stored = names.stored(target)
    os.utime(stored, ns=(1_111_111_111_222_333_444, 1_222_222_222_333_444_555))
    before = snapshot(stored)
    parent_before = sorted(os.listdir(names.src))
    assert list(before[0]) == [DIRIV]
    calls = refuse(monkeypatch, native, "rename", errno.EXDEV)
    with pytest.raises(OSError) as info:
        names.vol.rename(ROOT, "moving", ROOT, target_name, 0, TARGET)
    assert info.value.errno == errno.EXDEV and calls == ["rename"]
    assert snapshot(stored) == before  # key file back, same bytes, same times
    assert sorted(os.listdir(names.src)) == parent_before  # a long name keeps its sidecar
    monkeypatch.undo()
    names.vol.rename(ROOT, "moving", ROOT, target_name, 0, TARGET)
    assert names.vol.lookup(ROOT, target_name, TARGET).inode.is_dir


def test_failed_rmdir_puts_the_key_file_back(names, monkeypatch):
    directory = names.mkdir("doomed")
    stored = names.stored(directory)
    before = snapshot(stored)
    refuse(monkeypatch, os, "rmdir", errno.EBUSY)
    with pytest.raises(OSError) as info:
        names.vol.rmdir(ROOT, "doomed", TARGET)
    assert info.value.errno == errno.EBUSY
    monkeypatch.undo()
    assert snapshot(stored)[0] == before[0]
    names.vol.rmdir(ROOT, "doomed", TARGET)
    assert os.listdir(names.src) == [DIRIV]


def test_rename_over_non_empty_directory_removes_nothing(names, monkeypatch):
    """A directory whose one entry has a long name (key file, stub, sidecar) is not empty,
    and nothing is removed to find that out."""
    names.mkdir("moving")
    full = names.mkdir("full")
    names.vol.symlink(full, LONG, b"somewhere", TARGET)
    stored = names.stored(full)
    before = snapshot(stored)
    assert len(before[0]) == 3
    unlinked: list[str] = []
    real_unlink = os.unlink

    def unlink(name: str, **kwargs: object) -> None:
        unlinked.append(name)
        real_unlink(name, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "unlink", unlink)
    with pytest.raises(OSError) as info:
        names.vol.rename(ROOT, "moving", ROOT, "full", 0, TARGET)
    assert info.value.errno == errno.ENOTEMPTY
    with pytest.raises(OSError) as info:
        names.vol.rmdir(ROOT, "full", TARGET)
    assert info.value.errno == errno.ENOTEMPTY
    assert unlinked == [] and snapshot(stored) == before


def test_failed_rename_to_a_new_long_name_leaves_no_sidecar(names, monkeypatch):
    names.mkdir("moving")
    before = sorted(os.listdir(names.src))
    refuse(monkeypatch, native, "rename", errno.EXDEV)
    with pytest.raises(OSError):
        names.vol.rename(ROOT, "moving", ROOT, LONG, 0, TARGET)
    assert sorted(os.listdir(names.src)) == before


def test_a_miss_then_a_create_encrypts_the_name_once_and_decrypts_nothing(names, monkeypatch):
    transform = names.vol.names.transform
    calls = {"to_native": 0, "to_view": 0}
    for method in calls:
        original = getattr(transform, method)

        def counted(*args, _original=original, _method=method):
            calls[_method] += 1
            return _original(*args)

        monkeypatch.setattr(transform, method, counted)
    parent = names.mkdir("d")
    calls.update(to_native=0, to_view=0)
    with pytest.raises(FileNotFoundError):
        names.vol.lookup(parent, "new-file", TARGET)
    assert calls == {"to_native": 1, "to_view": 0}
    entry = names.vol.mknod(parent, "new-file", 0o100644, 0, TARGET)
    assert calls["to_native"] == 1
    # the file is found under its view name, and its native name is the encrypted one
    assert names.vol.lookup(parent, "new-file", TARGET).nodeid == entry.nodeid
    assert "new-file" not in os.listdir(names.stored(parent))
    # a plain native file of that name (made behind the mount) is still shown as itself
    (names.stored(parent) / "plain").write_bytes(b"")
    assert names.vol.lookup(parent, "plain", TARGET).attr.size == 0
