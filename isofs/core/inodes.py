"""The inode table: native (st_dev, st_ino) <-> logical inode, per-view nodeids, lookup counts.

A native file is one logical inode however many names (hard links) reach it, because the
table is keyed by the native (st_dev, st_ino). Each logical inode holds an O_PATH descriptor
on its native file while the kernel remembers it (lookup count > 0) or a handle is open, so
all later operations are *at() calls on that descriptor, immune to renames and to long paths.

Nodeids carry the view: ``nodeid = number << 2 | code``. Code 1 (SHARED) is the one nodeid of
objects that look the same in every view (directories, symlinks, identical files); codes 2 and
3 are a regular file's per-view nodeids, so the kernel keeps one inode, attribute cache and page
cache per view. The root is number 0, so its nodeid is 1 (FUSE_ROOT_ID).

A file on the source's own device is numbered by its native st_ino, so the st_ino a process
sees is stable across remounts (tools such as git and tar compare inode numbers); a file on
another device (a mount inside the source) gets a number from a private range instead.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from isofs.core import native

SHARED = 1
VIEW_CODES: dict[str, int] = {"native": 2, "target": 3}
CODE_VIEWS: dict[int, str] = {code: view for view, code in VIEW_CODES.items()}
ROOT_NUMBER = 0
_PRIVATE_NUMBERS = 1 << 61


def make_nodeid(number: int, code: int) -> int:
    return number << 2 | code


def split_nodeid(nodeid: int) -> tuple[int, int]:
    return nodeid >> 2, nodeid & 3


@dataclass(eq=False, slots=True)
class Inode:
    """One native file as the mount knows it."""

    number: int
    key: tuple[int, int]
    path_fd: int
    mode: int
    lookups: dict[int, int] = field(default_factory=dict)
    open_handles: int = 0
    #: Per nodeid code: the native validators that code's kernel page cache was filled under.
    #: An open keeps the kernel's cached pages only while they still match.
    kernel_seen: dict[int, native.Validators] = field(default_factory=dict)
    #: A symlink's stored target once a transformed view read it: a symlink's target never
    #: changes, and each native readlink could move its atime (which is then put back).
    link_target: bytes | None = None

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def is_symlink(self) -> bool:
        return stat.S_ISLNK(self.mode)

    @property
    def in_use(self) -> bool:
        return self.open_handles > 0 or any(self.lookups.values())

    def nodeids(self) -> Iterator[int]:
        """Nodeids the kernel currently knows for this inode."""
        for code, count in self.lookups.items():
            if count:
                yield make_nodeid(self.number, code)


class InodeTable:
    """All inodes the kernel or an open handle references; released at unmount."""

    def __init__(self, root_fd: int) -> None:
        root_stat = native.fstat(root_fd)
        self._root = Inode(
            ROOT_NUMBER, (root_stat.st_dev, root_stat.st_ino), root_fd, root_stat.st_mode
        )
        self._by_number: dict[int, Inode] = {ROOT_NUMBER: self._root}
        self._by_key: dict[tuple[int, int], Inode] = {self._root.key: self._root}
        self._next_private = _PRIVATE_NUMBERS

    @property
    def root(self) -> Inode:
        return self._root

    def __len__(self) -> int:
        return len(self._by_number)

    def get(self, number: int) -> Inode:
        try:
            return self._by_number[number]
        except KeyError:
            raise OSError(errno.ESTALE, f"unknown inode {number}") from None

    def find(self, number: int) -> Inode | None:
        return self._by_number.get(number)

    def by_key(self, key: tuple[int, int]) -> Inode | None:
        """The inode of a native (st_dev, st_ino), if the table holds it."""
        return self._by_key.get(key)

    def by_nodeid(self, nodeid: int) -> tuple[Inode, int]:
        number, code = split_nodeid(nodeid)
        return self.get(number), code

    def remember(
        self, parent: Inode, name: str, st: os.stat_result | None = None
    ) -> tuple[Inode, os.stat_result]:
        """The inode behind `name` in `parent`, opening an O_PATH handle if it is new.

        A known file costs one fstatat; a new one an fstatat, an openat and an fstat (the
        second stat guards against the name being replaced between the two calls).
        """
        if st is None:
            st = native.stat_at(parent.path_fd, name)
        known = self._by_key.get((st.st_dev, st.st_ino))
        if known is not None:
            known.mode = st.st_mode
            return known, st
        fd = native.open_path(parent.path_fd, name)
        try:
            st = native.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        key = (st.st_dev, st.st_ino)
        known = self._by_key.get(key)
        if known is not None:  # lost a race with a rename: keep the handle we have
            os.close(fd)
            known.mode = st.st_mode
            return known, st
        inode = Inode(self._number_for(st), key, fd, st.st_mode)
        self._by_number[inode.number] = inode
        self._by_key[key] = inode
        return inode, st

    def _number_for(self, st: os.stat_result) -> int:
        own_device = st.st_dev == self._root.key[0]
        if own_device and 0 < st.st_ino < _PRIVATE_NUMBERS and st.st_ino not in self._by_number:
            return st.st_ino
        number = self._next_private
        self._next_private += 1
        return number

    def number_of(self, st: os.stat_result) -> int:
        """The number a native file has or would have (for ".." entries, never counted)."""
        known = self._by_key.get((st.st_dev, st.st_ino))
        if known is not None:
            return known.number
        if st.st_dev == self._root.key[0] and 0 < st.st_ino < _PRIVATE_NUMBERS:
            return st.st_ino
        return ROOT_NUMBER

    def add_lookup(self, inode: Inode, code: int, count: int = 1) -> None:
        inode.lookups[code] = inode.lookups.get(code, 0) + count

    def forget(self, nodeid: int, count: int) -> Inode | None:
        """Drop `count` kernel references of a nodeid; return its inode (if still known)."""
        number, code = split_nodeid(nodeid)
        inode = self._by_number.get(number)
        if inode is None:
            return None
        remaining = inode.lookups.get(code, 0) - count
        if remaining > 0:
            inode.lookups[code] = remaining
        else:
            inode.lookups.pop(code, None)
        return inode

    def release_if_unused(self, inode: Inode) -> bool:
        """Close the O_PATH handle of an inode no one references any more."""
        if inode is self._root or inode.in_use:
            return False
        if self._by_number.pop(inode.number, None) is None:
            return False
        self._by_key.pop(inode.key, None)
        os.close(inode.path_fd)
        return True

    def close_all(self) -> None:
        """Release every handle (unmount): the kernel has forgotten everything by then."""
        for inode in list(self._by_number.values()):
            if inode is not self._root:
                os.close(inode.path_fd)
        self._by_number = {ROOT_NUMBER: self._root}
        self._by_key = {self._root.key: self._root}
