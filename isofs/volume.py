"""The filesystem core without FUSE: lookups, attributes, handles and native I/O per view.

`Volume` is what `fs.py` translates FUSE requests into. It works on nodeids and views (plain
strings chosen by the caller's policy), raises OSError with an errno for every failure, and
returns plain dataclasses. It never imports pyfuse3, so all of it is testable without a mount.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from isofs import native
from isofs.inodes import CODE_VIEWS, SHARED, VIEW_CODES, Inode, InodeTable, make_nodeid

log = logging.getLogger(__name__)

#: Name of the source's metadata directory; only the native view sees it.
META_DIR_NAME = ".isofs"
#: How long the kernel may trust names and attributes that are the same in every view.
#: Bounds how late a change made behind the mount's back is seen.
SHARED_TTL = 1.0


@dataclass(slots=True)
class Attributes:
    """What stat() shows through the mount for one (file, view)."""

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blocks: int
    blksize: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class Entry:
    """A name's answer: the nodeid (which doubles as st_ino), attributes and cache lifetimes."""

    nodeid: int
    attr: Attributes
    entry_timeout: float
    attr_timeout: float
    inode: Inode = field(repr=False)
    code: int = SHARED


@dataclass(slots=True)
class Caller:
    """The identity a request acts with: decides the view and owns what it creates."""

    uid: int
    gid: int
    view: str = "native"


@dataclass(eq=False, slots=True)
class FileHandle:
    inode: Inode
    view: str
    code: int
    fd: int
    flags: int


@dataclass(eq=False, slots=True)
class DirHandle:
    inode: Inode
    view: str
    names: list[str] | None = None


@dataclass(slots=True)
class Counters:
    """Request counts for `isofs status`."""

    lookups: int = 0
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0


class Volume:
    """One mounted source: the inode table, open handles and the views it serves."""

    def __init__(self, root_fd: int) -> None:
        self.inodes = InodeTable(root_fd)
        self.single_view: str | None = "native"
        self.is_root_daemon = os.geteuid() == 0
        self.counters = Counters()
        self._handles: dict[int, FileHandle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = itertools.count(1)

    # ----------------------------------------------------------------- views and entries

    def view_for(self, pid: int, uid: int, gid: int) -> str:
        """The view of the process behind a request (free when the mount has one view)."""
        if self.single_view is not None:
            return self.single_view
        raise NotImplementedError

    def is_multi_view(self, inode: Inode) -> bool:
        """Whether this file's bytes can differ between views (then: one nodeid per view)."""
        return False

    def _code_for(self, inode: Inode, view: str) -> int:
        return VIEW_CODES[view] if self.is_multi_view(inode) else SHARED

    def attributes(self, inode: Inode, st: os.stat_result, view: str) -> Attributes:
        return Attributes(
            mode=st.st_mode,
            nlink=st.st_nlink,
            uid=st.st_uid,
            gid=st.st_gid,
            rdev=st.st_rdev,
            size=st.st_size,
            blocks=st.st_blocks,
            blksize=st.st_blksize,
            atime_ns=st.st_atime_ns,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )

    def _entry(self, inode: Inode, st: os.stat_result, view: str) -> Entry:
        code = self._code_for(inode, view)
        ttl = SHARED_TTL if code == SHARED else 0.0
        return Entry(
            nodeid=make_nodeid(inode.number, code),
            attr=self.attributes(inode, st, view),
            entry_timeout=ttl,
            attr_timeout=SHARED_TTL,
            inode=inode,
            code=code,
        )

    def _hidden(self, parent: Inode, name: str, view: str) -> bool:
        return view != "native" and parent is self.inodes.root and name == META_DIR_NAME

    def _remember_entry(self, parent: Inode, name: str, view: str) -> Entry:
        """Look `name` up and count the kernel's new reference to it."""
        inode, st = self.inodes.remember(parent, name)
        entry = self._entry(inode, st, view)
        self.inodes.add_lookup(inode, entry.code)
        return entry

    def lookup(self, parent_nodeid: int, name: str, caller: Caller) -> Entry:
        self.counters.lookups += 1
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        if self._hidden(parent, name, caller.view):
            raise OSError(errno.ENOENT, name)
        return self._remember_entry(parent, name, caller.view)

    def forget(self, nodeid: int, count: int) -> None:
        self.inodes.forget(nodeid, count)

    def getattr(self, nodeid: int, caller_view: str | None = None) -> Entry:
        inode, code = self.inodes.by_nodeid(nodeid)
        view = self._view_of(code, caller_view)
        return self._entry(inode, native.fstat(inode.path_fd), view)

    def _view_of(self, code: int, caller_view: str | None) -> str:
        if code == SHARED:
            return caller_view or "native"
        return CODE_VIEWS[code]

    # ------------------------------------------------------------------------ metadata

    async def setattr(
        self,
        nodeid: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        fh: int | None = None,
        caller_view: str | None = None,
    ) -> Entry:
        inode, _ = self.inodes.by_nodeid(nodeid)
        if mode is not None:
            if inode.is_symlink:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            native.chmod(inode.path_fd, mode)
        if uid is not None or gid is not None:
            native.chown(inode.path_fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if size is not None:
            self._truncate(inode, size, fh)
        if atime_ns is not None or mtime_ns is not None:
            native.set_times(inode.path_fd, atime_ns, mtime_ns)
        return self.getattr(nodeid, caller_view)

    def _truncate(self, inode: Inode, size: int, fh: int | None) -> None:
        if not inode.is_regular:
            raise OSError(errno.EISDIR if inode.is_dir else errno.EINVAL, "truncate")
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            os.ftruncate(handle.fd, size)
        else:
            native.truncate(inode.path_fd, size)
        inode.validators = native.Validators.of(native.fstat(inode.path_fd))

    def readlink(self, nodeid: int) -> bytes:
        inode, _ = self.inodes.by_nodeid(nodeid)
        return native.readlink(inode.path_fd)

    def _give_to_caller(self, parent: Inode, name: str, caller: Caller) -> None:
        """Make a new object belong to the caller, as a kernel filesystem would."""
        if not self.is_root_daemon:
            return
        parent_mode = native.fstat(parent.path_fd).st_mode
        gid = -1 if parent_mode & stat.S_ISGID else caller.gid
        native.chown_at(parent.path_fd, name, caller.uid, gid)

    def _new_name_allowed(self, parent: Inode, name: str, view: str) -> None:
        if self._hidden(parent, name, view):
            raise OSError(errno.EACCES, f"{name} is reserved for isofs metadata")

    def mkdir(self, parent_nodeid: int, name: str, mode: int, caller: Caller) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        os.mkdir(name, stat.S_IMODE(mode), dir_fd=parent.path_fd)
        self._give_to_caller(parent, name, caller)
        return self._remember_entry(parent, name, caller.view)

    def mknod(self, parent_nodeid: int, name: str, mode: int, rdev: int, caller: Caller) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        os.mknod(name, mode, rdev, dir_fd=parent.path_fd)
        self._give_to_caller(parent, name, caller)
        return self._remember_entry(parent, name, caller.view)

    def symlink(self, parent_nodeid: int, name: str, target: bytes, caller: Caller) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        os.symlink(target, name, dir_fd=parent.path_fd)
        self._give_to_caller(parent, name, caller)
        return self._remember_entry(parent, name, caller.view)

    def link(self, nodeid: int, new_parent_nodeid: int, new_name: str, caller: Caller) -> Entry:
        inode, _ = self.inodes.by_nodeid(nodeid)
        parent, _ = self.inodes.by_nodeid(new_parent_nodeid)
        self._new_name_allowed(parent, new_name, caller.view)
        native.link(inode.path_fd, parent.path_fd, new_name)
        return self._remember_entry(parent, new_name, caller.view)

    def unlink(self, parent_nodeid: int, name: str, caller: Caller) -> None:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        os.unlink(name, dir_fd=parent.path_fd)

    def rmdir(self, parent_nodeid: int, name: str, caller: Caller) -> None:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        os.rmdir(name, dir_fd=parent.path_fd)

    def rename(
        self,
        old_parent_nodeid: int,
        old_name: str,
        new_parent_nodeid: int,
        new_name: str,
        flags: int,
        caller: Caller,
    ) -> None:
        old_parent, _ = self.inodes.by_nodeid(old_parent_nodeid)
        new_parent, _ = self.inodes.by_nodeid(new_parent_nodeid)
        self._new_name_allowed(old_parent, old_name, caller.view)
        self._new_name_allowed(new_parent, new_name, caller.view)
        native.rename(old_parent.path_fd, old_name, new_parent.path_fd, new_name, flags)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(native.proc_path(self.inodes.root.path_fd))

    def access(self, nodeid: int, mode: int, uid: int, gids: set[int]) -> None:
        """POSIX permission check (only asked when the kernel does not check itself)."""
        inode, _ = self.inodes.by_nodeid(nodeid)
        st = native.fstat(inode.path_fd)
        if uid == 0:
            if mode & os.X_OK and not st.st_mode & 0o111 and not inode.is_dir:
                raise OSError(errno.EACCES, "no execute bit")
            return
        if st.st_uid == uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in gids:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        if mode & bits != mode:
            raise OSError(errno.EACCES, "permission denied")

    # -------------------------------------------------------------------------- xattrs

    def getxattr(self, nodeid: int, name: bytes) -> bytes:
        inode, _ = self.inodes.by_nodeid(nodeid)
        if inode.is_symlink:
            raise OSError(errno.ENODATA, "no xattrs on symlinks")
        return os.getxattr(native.proc_path(inode.path_fd), name)

    def setxattr(self, nodeid: int, name: bytes, value: bytes, flags: int = 0) -> None:
        inode, _ = self.inodes.by_nodeid(nodeid)
        os.setxattr(native.xattr_target(inode.path_fd, inode.is_symlink), name, value, flags)

    def listxattr(self, nodeid: int) -> list[bytes]:
        inode, _ = self.inodes.by_nodeid(nodeid)
        if inode.is_symlink:
            return []
        return [os.fsencode(n) for n in os.listxattr(native.proc_path(inode.path_fd))]

    def removexattr(self, nodeid: int, name: bytes) -> None:
        inode, _ = self.inodes.by_nodeid(nodeid)
        os.removexattr(native.xattr_target(inode.path_fd, inode.is_symlink), name)

    # ----------------------------------------------------------------------- directories

    def opendir(self, nodeid: int, caller: Caller) -> int:
        inode, _ = self.inodes.by_nodeid(nodeid)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        fh = next(self._next_fh)
        inode.open_handles += 1
        self._dir_handles[fh] = DirHandle(inode, caller.view)
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[str, Entry | None, int]]:
        """Entries from position `start`: (name, entry not yet counted, next position).

        Positions 0 and 1 are "." and ".." (entry None: the kernel must not count them).
        The listing is a snapshot taken when reading starts, so offsets stay stable while the
        directory changes. The caller confirms each entry the kernel kept with `confirm`.
        """
        handle = self._dir_handles[fh]
        if handle.names is None or start == 0:
            names = native.list_names(handle.inode.path_fd)
            handle.names = [n for n in names if not self._hidden(handle.inode, n, handle.view)]
        if start == 0:
            yield ".", None, 1
        if start <= 1:
            yield "..", None, 2
        for position in range(max(start, 2), len(handle.names) + 2):
            name = handle.names[position - 2]
            try:
                inode, st = self.inodes.remember(handle.inode, name)
            except FileNotFoundError:
                continue
            yield name, self._entry(inode, st, handle.view), position + 1

    def dot_entry(self, fh: int, name: str) -> Entry:
        """Attributes for "." or ".." of an open directory (never counted as a lookup)."""
        handle = self._dir_handles[fh]
        inode = handle.inode
        if name == ".." and inode is not self.inodes.root:
            st = native.stat_at(inode.path_fd, "..")
            number = self.inodes.number_of(st)
            return Entry(make_nodeid(number, SHARED), self.attributes(inode, st, "native"),
                         0.0, 0.0, inode)
        return self._entry(inode, native.fstat(inode.path_fd), handle.view)

    def confirm(self, entry: Entry) -> None:
        """The kernel kept a readdirplus entry: count its lookup."""
        self.inodes.add_lookup(entry.inode, entry.code)

    def discard(self, entry: Entry) -> None:
        """The kernel refused a readdirplus entry: release it if nothing else holds it."""
        self.inodes.release_if_unused(entry.inode)

    def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh)
        handle.inode.open_handles -= 1
        self.inodes.release_if_unused(handle.inode)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dir_handles[fh]
        fd = native.reopen(handle.inode.path_fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------------- files

    def _new_handle(self, inode: Inode, view: str, code: int, fd: int, flags: int) -> int:
        fh = next(self._next_fh)
        inode.open_handles += 1
        self._handles[fh] = FileHandle(inode, view, code, fd, flags)
        return fh

    def _keep_kernel_cache(self, inode: Inode, fd: int) -> bool:
        """Keep the kernel's cached pages only if the native file is unchanged since."""
        current = native.Validators.of(os.fstat(fd))
        unchanged = inode.validators == current
        inode.validators = current
        return unchanged

    @staticmethod
    def _native_flags(flags: int) -> int:
        # The kernel computes append offsets itself; O_APPEND natively would ignore them.
        return flags & ~(os.O_APPEND | os.O_NOFOLLOW)

    async def open(self, nodeid: int, flags: int, caller: Caller) -> tuple[int, bool]:
        """Open a file; returns (fh, keep_cache)."""
        inode, code = self.inodes.by_nodeid(nodeid)
        view = self._view_of(code, caller.view)
        if code != SHARED and view != caller.view:
            raise OSError(errno.EACCES, "file was opened through another view")
        fd = native.reopen(inode.path_fd, self._native_flags(flags))
        keep = self._keep_kernel_cache(inode, fd)
        return self._new_handle(inode, view, code, fd, flags), keep

    async def create(
        self, parent_nodeid: int, name: str, mode: int, flags: int, caller: Caller
    ) -> tuple[int, Entry]:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        self._new_name_allowed(parent, name, caller.view)
        fd = os.open(
            name,
            self._native_flags(flags) | os.O_CREAT | os.O_CLOEXEC,
            stat.S_IMODE(mode),
            dir_fd=parent.path_fd,
        )
        try:
            self._give_to_caller(parent, name, caller)
            entry = self._remember_entry(parent, name, caller.view)
        except BaseException:
            os.close(fd)
            raise
        entry.inode.validators = native.Validators.of(os.fstat(fd))
        return self._new_handle(entry.inode, caller.view, entry.code, fd, flags), entry

    def handle(self, fh: int) -> FileHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        data = os.pread(handle.fd, size, offset)
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        written = os.pwrite(handle.fd, data, offset)
        handle.inode.validators = native.Validators.of(os.fstat(handle.fd))
        self.counters.writes += 1
        self.counters.bytes_written += written
        return written

    async def flush(self, fh: int) -> None:
        self.handle(fh)

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handle(fh)
        (os.fdatasync if datasync else os.fsync)(handle.fd)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        try:
            handle.inode.validators = native.Validators.of(os.fstat(handle.fd))
        finally:
            os.close(handle.fd)
            handle.inode.open_handles -= 1
            self.inodes.release_if_unused(handle.inode)

    # --------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """Close every handle and the inode table (after unmount)."""
        for handle in self._handles.values():
            os.close(handle.fd)
        self._handles.clear()
        self._dir_handles.clear()
        self.inodes.close_all()
