#!/usr/bin/env python3
"""A minimal pyfuse3 passthrough filesystem, used as the benchmark's pyfuse3 baseline.

It has the shape of pyfuse3's ``examples/passthroughfs.py``: an inode -> path(s) map
(inode numbers are the source's own), a lookup counter per inode for ``forget``, one
shared OS file descriptor per open inode, and every operation done synchronously
with plain ``os`` calls inside the async handlers. It exists so that the suite can
separate "the cost of FUSE + pyfuse3 + trio" from "the cost of what isofs adds".

No extended attribute handlers: pyfuse3's defaults answer ENOSYS, after which the
kernel stops asking. Attribute and entry timeouts are pyfuse3's defaults.

Usage: python minimal_passthrough.py SOURCE MOUNTPOINT   (runs in the foreground;
unmount with ``fusermount3 -u MOUNTPOINT`` or send SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import stat
import sys
from collections import defaultdict

import pyfuse3
import trio
from pyfuse3 import FUSEError


class PassthroughOps(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self._inode_path_map: dict[int, str | set[str]] = {pyfuse3.ROOT_INODE: source}
        self._lookup_cnt: defaultdict[int, int] = defaultdict(int)
        self._fd_inode_map: dict[int, int] = {}
        self._inode_fd_map: dict[int, int] = {}
        self._fd_open_count: dict[int, int] = {}

    # -- inode <-> path bookkeeping ------------------------------------------------

    def _inode_to_path(self, inode: int) -> str:
        try:
            val = self._inode_path_map[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None
        if isinstance(val, set):
            # Hard-linked: any of the names will do.
            val = next(iter(val))
        return val

    def _add_path(self, inode: int, path: str) -> None:
        self._lookup_cnt[inode] += 1
        val = self._inode_path_map.get(inode)
        if val is None:
            self._inode_path_map[inode] = path
        elif isinstance(val, set):
            val.add(path)
        elif val != path:
            self._inode_path_map[inode] = {path, val}

    def _forget_path(self, inode: int, path: str) -> None:
        val = self._inode_path_map[inode]
        if isinstance(val, set):
            val.discard(path)
            if len(val) == 1:
                self._inode_path_map[inode] = next(iter(val))
        else:
            del self._inode_path_map[inode]

    def _replace_path(self, old: str, new: str) -> None:
        for inode, val in self._inode_path_map.items():
            if isinstance(val, set):
                if old in val:
                    val.discard(old)
                    val.add(new)
            elif val == old:
                self._inode_path_map[inode] = new

    def _child(self, parent_inode: int, name: bytes) -> str:
        return os.path.join(self._inode_to_path(parent_inode), os.fsdecode(name))

    def _getattr(self, path: str | None = None, fd: int | None = None) -> pyfuse3.EntryAttributes:
        try:
            st = os.lstat(path) if fd is None else os.fstat(fd)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        entry = pyfuse3.EntryAttributes()
        for attr in (
            "st_ino",
            "st_mode",
            "st_nlink",
            "st_uid",
            "st_gid",
            "st_rdev",
            "st_size",
            "st_atime_ns",
            "st_mtime_ns",
            "st_ctime_ns",
        ):
            setattr(entry, attr, getattr(st, attr))
        entry.generation = 0
        entry.entry_timeout = 300
        entry.attr_timeout = 300
        entry.st_blksize = 512
        entry.st_blocks = (entry.st_size + entry.st_blksize - 1) // entry.st_blksize
        return entry

    # -- metadata ------------------------------------------------------------------

    async def lookup(self, parent_inode, name, ctx=None):
        name_s = os.fsdecode(name)
        path = os.path.join(self._inode_to_path(parent_inode), name_s)
        attr = self._getattr(path=path)
        if name_s not in (".", ".."):
            self._add_path(attr.st_ino, path)
        return attr

    async def forget(self, inode_list):
        for inode, nlookup in inode_list:
            if self._lookup_cnt[inode] > nlookup:
                self._lookup_cnt[inode] -= nlookup
                continue
            del self._lookup_cnt[inode]
            if inode not in self._inode_fd_map:
                self._inode_path_map.pop(inode, None)

    async def getattr(self, inode, ctx=None):
        fd = self._inode_fd_map.get(inode)
        if fd is not None:
            return self._getattr(fd=fd)
        return self._getattr(path=self._inode_to_path(inode))

    async def setattr(self, inode, attr, fields, fh, ctx):
        path = None if fh is not None else self._inode_to_path(inode)
        try:
            if fields.update_size:
                if fh is None:
                    os.truncate(path, attr.st_size)
                else:
                    os.ftruncate(fh, attr.st_size)
            if fields.update_mode:
                mode = stat.S_IMODE(attr.st_mode)
                if fh is not None:
                    os.fchmod(fh, mode)
                elif stat.S_ISLNK(os.lstat(path).st_mode):
                    raise FUSEError(errno.EINVAL)  # no lchmod on Linux
                else:
                    os.chmod(path, mode)
            if fields.update_uid or fields.update_gid:
                uid = attr.st_uid if fields.update_uid else -1
                gid = attr.st_gid if fields.update_gid else -1
                if fh is None:
                    os.chown(path, uid, gid, follow_symlinks=False)
                else:
                    os.fchown(fh, uid, gid)
            if fields.update_atime or fields.update_mtime:
                cur = os.lstat(path) if fh is None else os.fstat(fh)
                atime = attr.st_atime_ns if fields.update_atime else cur.st_atime_ns
                mtime = attr.st_mtime_ns if fields.update_mtime else cur.st_mtime_ns
                if fh is None:
                    os.utime(path, ns=(atime, mtime), follow_symlinks=False)
                else:
                    os.utime(fh, ns=(atime, mtime))
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        return self._getattr(path=path, fd=fh)

    async def readlink(self, inode, ctx):
        try:
            return os.fsencode(os.readlink(self._inode_to_path(inode)))
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def statfs(self, ctx):
        try:
            st = os.statvfs(self._inode_to_path(pyfuse3.ROOT_INODE))
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        out = pyfuse3.StatvfsData()
        for attr in (
            "f_bsize",
            "f_frsize",
            "f_blocks",
            "f_bfree",
            "f_bavail",
            "f_files",
            "f_ffree",
            "f_favail",
        ):
            setattr(out, attr, getattr(st, attr))
        out.f_namemax = st.f_namemax - (len(self._inode_to_path(pyfuse3.ROOT_INODE)) + 1)
        return out

    # -- directories ---------------------------------------------------------------

    async def opendir(self, inode, ctx):
        return inode

    async def readdir(self, fh, start_id, token):
        path = self._inode_to_path(fh)
        # The whole directory is read each call and sorted by inode so that start_id
        # (the last inode returned) is a stable cursor -- the example's approach.
        entries = []
        try:
            with os.scandir(path) as it:
                for de in it:
                    attr = self._getattr(path=de.path)
                    entries.append((attr.st_ino, de.name, attr))
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        entries.sort(key=lambda e: e[0])
        for ino, name, attr in entries:
            if ino <= start_id:
                continue
            if not pyfuse3.readdir_reply(token, os.fsencode(name), attr, ino):
                break
            self._add_path(attr.st_ino, os.path.join(path, name))

    async def releasedir(self, fh):
        pass

    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode=mode & ~ctx.umask)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            inode = os.lstat(path).st_ino
            os.rmdir(path)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        if inode in self._lookup_cnt:
            self._forget_path(inode, path)

    # -- names ---------------------------------------------------------------------

    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode=mode & ~ctx.umask, device=rdev)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        try:
            os.symlink(target, path)
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._inode_to_path(inode), new_path, follow_symlinks=False)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        self._add_path(inode, new_path)
        return await self.getattr(inode)

    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            inode = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        if inode in self._lookup_cnt:
            self._forget_path(inode, path)

    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags != 0:
            raise FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
            inode = os.lstat(new).st_ino
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        if inode in self._lookup_cnt:
            self._replace_path(old, new)

    # -- file data -----------------------------------------------------------------

    async def open(self, inode, flags, ctx):
        fd = self._inode_fd_map.get(inode)
        if fd is not None:
            self._fd_open_count[fd] += 1
            return pyfuse3.FileInfo(fh=fd)
        assert flags & os.O_CREAT == 0
        try:
            fd = os.open(self._inode_to_path(inode), flags)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        self._inode_fd_map[inode] = fd
        self._fd_inode_map[fd] = inode
        self._fd_open_count[fd] = 1
        return pyfuse3.FileInfo(fh=fd)

    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode & ~ctx.umask)
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        attr = self._getattr(fd=fd)
        self._add_path(attr.st_ino, path)
        self._inode_fd_map[attr.st_ino] = fd
        self._fd_inode_map[fd] = attr.st_ino
        self._fd_open_count[fd] = 1
        return pyfuse3.FileInfo(fh=fd), attr

    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def fsync(self, fh, datasync):
        try:
            if datasync:
                os.fdatasync(fh)
            else:
                os.fsync(fh)
        except OSError as exc:
            raise FUSEError(exc.errno) from None

    async def release(self, fh):
        if self._fd_open_count[fh] > 1:
            self._fd_open_count[fh] -= 1
            return
        del self._fd_open_count[fh]
        inode = self._fd_inode_map.pop(fh)
        del self._inode_fd_map[inode]
        try:
            os.close(fh)
        except OSError as exc:
            raise FUSEError(exc.errno) from None
        if inode not in self._lookup_cnt:
            # Forgotten while open: drop the path now.
            self._inode_path_map.pop(inode, None)


async def _serve() -> None:
    """Run the FUSE loop; SIGINT/SIGTERM end it cleanly."""
    async with trio.open_nursery() as nursery:

        async def _on_signal() -> None:
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    pyfuse3.terminate()
                    return

        nursery.start_soon(_on_signal)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)

    source = os.path.abspath(args.source)
    if not os.path.isdir(source):
        parser.error(f"not a directory: {args.source}")

    ops = PassthroughOps(source)
    # pyfuse3's default options, as its passthroughfs example uses them: they include
    # default_permissions (the kernel checks modes), which every contender here pays for.
    options = set(pyfuse3.default_options)
    options.add("fsname=minimal_passthrough")
    if args.debug_fuse:
        options.add("debug")
    pyfuse3.init(ops, args.mountpoint, options)

    try:
        trio.run(_serve)
    finally:
        # After an external ``fusermount3 -u`` the mount is already gone; close()
        # tolerates that. After a signal we unmount ourselves.
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
