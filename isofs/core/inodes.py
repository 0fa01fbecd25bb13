"""The inode table: native (st_dev, st_ino) <-> logical inode, per-view nodeids, lookup counts.

A native file is one logical inode however many names (hard links) reach it, because the
table is keyed by the native (st_dev, st_ino). Each logical inode holds an O_PATH descriptor
on its native file while the kernel remembers it (lookup count > 0) or a handle is open, so
all later operations are *at() calls on that descriptor, immune to renames and to long paths.
The descriptor is opened on first use, from the directory and the name the file was found
under: most files the kernel learns from a listing or a stat are never used beyond the
attributes it was given (a listing costs one fstatat per entry, not three syscalls).

Nodeids carry the view: ``nodeid = number << 2 | code``. Code 1 (SHARED) is the one nodeid of
objects that look the same in every view (directories, symlinks, identical files); codes 2 and
3 are a regular file's per-view nodeids, so the kernel keeps one inode, attribute cache and page
cache per view. The root is number 0, so its nodeid is 1 (FUSE_ROOT_ID).

A file on the source's own device is numbered by its native st_ino, so the st_ino a process
sees is stable across remounts (tools such as git and tar compare inode numbers); a file on
another device (a mount inside the source) gets a number from a private range instead.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from isofs.core import native

SHARED = 1
VIEW_CODES: dict[str, int] = {"native": 2, "target": 3}
CODE_VIEWS: dict[int, str] = {code: view for view, code in VIEW_CODES.items()}
ROOT_NUMBER = 0
_PRIVATE_NUMBERS = 1 << 61

log = logging.getLogger(__name__)


def make_nodeid(number: int, code: int) -> int:
    return number << 2 | code


def split_nodeid(nodeid: int) -> tuple[int, int]:
    return nodeid >> 2, nodeid & 3


@dataclass(eq=False, slots=True)
class Inode:
    """One native file as the mount knows it."""

    number: int
    key: tuple[int, int]
    #: The O_PATH descriptor, or -1 while it is still to be opened (see `found_in`).
    fd: int
    mode: int
    lookups: dict[int, int] = field(default_factory=dict)
    open_handles: int = 0
    #: Per nodeid code: the native validators that code's kernel page cache was filled under.
    #: An open keeps the kernel's cached pages only while they still match.
    kernel_seen: dict[int, native.Validators] = field(default_factory=dict)
    #: A symlink's stored target once a transformed view read it: a symlink's target never
    #: changes, and each native readlink could move its atime (which is then put back).
    link_target: bytes | None = None
    #: Where an inode without a descriptor yet was found: (its table, directory, native name).
    found_in: tuple[InodeTable, Inode, str] | None = None
    #: Children found here whose descriptors are still to be opened from this directory's.
    unopened_children: int = 0
    #: A descriptor an open handle holds for native I/O on the file (-1: none), which fstat
    #: and fgetxattr can use directly: no O_PATH to open, no /proc/self/fd path to resolve
    #: (the GETXATTR of security.capability precedes every write).
    io_fd: int = -1

    @property
    def path_fd(self) -> int:
        """The O_PATH descriptor, opened now if the inode has none yet."""
        fd = self.fd
        if fd < 0:
            assert self.found_in is not None
            fd = self.found_in[0].open_found(self)
        return fd

    def native_stat(self) -> os.stat_result:
        """The native file's stat: by the open handle's descriptor, the O_PATH one, or, for
        an inode not opened yet, by the name it was found under (checked to lead to it:
        one fstatat instead of opening a descriptor for a GETATTR)."""
        if self.io_fd >= 0:
            return native.fstat(self.io_fd)
        found = self.found_in
        if found is not None:
            with contextlib.suppress(FileNotFoundError):
                st = native.stat_at(found[1].path_fd, found[2])
                if (st.st_dev, st.st_ino) == self.key:
                    return st
        return native.fstat(self.path_fd)  # opens it, or says ESTALE

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
        return self.open_handles > 0 or self.unopened_children > 0 or any(self.lookups.values())

    def nodeids(self) -> Iterator[int]:
        """Nodeids the kernel currently knows for this inode."""
        for code, count in self.lookups.items():
            if count:
                yield make_nodeid(self.number, code)


def _open_path_and_stat(parent: Inode, name: str) -> tuple[int, os.stat_result]:
    """An O_PATH descriptor on `name` in `parent` and its fstat (the file it opened, which
    a stat of the name before it may not have been)."""
    fd = native.open_path(parent.path_fd, name)
    try:
        return fd, native.fstat(fd)
    except OSError:
        os.close(fd)
        raise


class InodeTable:
    """All inodes the kernel or an open handle references; released at unmount."""

    def __init__(self, root_fd: int, on_release: Callable[[Inode], None] = lambda _: None) -> None:
        #: Called for every inode released, whatever released it (the volume drops what it
        #: keeps by inode number).
        self.on_release = on_release
        root_stat = native.fstat(root_fd)
        self._root = Inode(
            ROOT_NUMBER, (root_stat.st_dev, root_stat.st_ino), root_fd, root_stat.st_mode
        )
        self._by_number: dict[int, Inode] = {ROOT_NUMBER: self._root}
        self._by_key: dict[tuple[int, int], Inode] = {self._root.key: self._root}
        self._next_private = _PRIVATE_NUMBERS
        #: (directory number, native name) -> the inode found there without a descriptor yet.
        self._unopened: dict[tuple[int, str], Inode] = {}
        #: Reentrant: an unopened directory opens first. Worker threads (size measurement)
        #: open descriptors too.
        self._opening = threading.RLock()

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
        """The inode behind `name` in `parent` (`st`: its lstat, when the caller has one).

        A known or a new file costs one fstatat: a new one's O_PATH descriptor is opened on
        first use (`Inode.path_fd`), most never are (a listed or stat'ed file). Only when
        another unopened inode was found under the same name (replaced behind the mount) is
        it opened now, an openat and an fstat that guards against the name changing again.
        """
        if st is None:
            st = native.stat_at(parent.path_fd, name)
        known = self._by_key.get((st.st_dev, st.st_ino))
        if known is not None:
            known.mode = st.st_mode
            if known.found_in is not None and known.found_in[1:] != (parent, name):
                self._found_again(known, parent, name)
            return known, st
        if (parent.number, name) not in self._unopened:
            inode = Inode(self._number_for(st), (st.st_dev, st.st_ino), -1, st.st_mode)
            inode.found_in = (self, parent, name)
            parent.unopened_children += 1
            self._unopened[(parent.number, name)] = inode
            self._by_number[inode.number] = inode
            self._by_key[inode.key] = inode
            return inode, st
        fd, st = _open_path_and_stat(parent, name)
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

    def open_found(self, inode: Inode) -> int:
        """Open the descriptor of an inode that has none yet, from where it was found.

        The name must still lead to the same native file: one renamed or removed behind
        the mount's back since is ESTALE (the kernel looks its name up again).
        """
        with self._opening:
            if inode.fd >= 0:
                return inode.fd
            assert inode.found_in is not None
            _, parent, name = inode.found_in
            try:
                fd, st = _open_path_and_stat(parent, name)
            except FileNotFoundError:
                fd = -1
            else:
                if (st.st_dev, st.st_ino) != inode.key:
                    os.close(fd)
                    fd = -1
            if fd < 0:
                log.info("%r in directory inode %d changed behind the mount since it was "
                         "found", name, parent.number)  # fmt: skip
                raise OSError(errno.ESTALE, f"{name!r} changed since it was found")
            inode.fd = fd
            self._forget_where_found(inode)
            return fd

    def open_found_under(self, parent: Inode, name: str) -> None:
        """Before `name` in `parent` is renamed or removed through the mount: an inode
        found under it opens its descriptor now, so it keeps its file wherever it goes."""
        inode = self._unopened.get((parent.number, name))
        if inode is not None:
            # A name that leads elsewhere already leaves the inode stale either way.
            with contextlib.suppress(OSError):
                self.open_found(inode)

    def _found_again(self, inode: Inode, parent: Inode, name: str) -> None:
        """An unopened inode was just found under another name (a hard link, a rename
        behind the mount, its number reused by a new file): open it from there, the name
        known to lead to it now."""
        if (parent.number, name) in self._unopened:
            return  # another unopened inode was found there: keep the name it had
        before = self._forget_where_found(inode)
        inode.found_in = (self, parent, name)
        parent.unopened_children += 1
        self._unopened[(parent.number, name)] = inode
        if before is not None:
            self.release_if_unused(before)  # it may have been kept only for this inode

    def _forget_where_found(self, inode: Inode) -> Inode | None:
        """Drop where an unopened inode was found; returns that directory."""
        if inode.found_in is None:
            return None
        _, parent, name = inode.found_in
        inode.found_in = None
        parent.unopened_children -= 1
        if self._unopened.get((parent.number, name)) is inode:
            del self._unopened[(parent.number, name)]
        return parent

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

    def release_if_unused(self, inode: Inode) -> None:
        """Close the O_PATH handle of an inode no one references any more, and of the
        directories kept only for an unopened entry of theirs; each goes to `on_release`."""
        candidate: Inode | None = inode
        while candidate is not None and candidate is not self._root and not candidate.in_use:
            if self._by_number.pop(candidate.number, None) is None:
                break
            self._by_key.pop(candidate.key, None)
            if candidate.fd >= 0:
                os.close(candidate.fd)
            self.on_release(candidate)
            candidate = self._forget_where_found(candidate)

    def close_all(self) -> None:
        """Release every handle (unmount): the kernel has forgotten everything by then."""
        for inode in list(self._by_number.values()):
            if inode is not self._root and inode.fd >= 0:
                os.close(inode.fd)
        self._by_number = {ROOT_NUMBER: self._root}
        self._by_key = {self._root.key: self._root}
        self._unopened = {}
