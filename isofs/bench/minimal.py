"""The fair baseline: the fastest *simple* pyfuse3 passthrough filesystem.

It has the shape of pyfuse3's ``examples/passthroughfs.py`` (an inode -> path(s) map with the
source's own inode numbers, a lookup count per inode for ``forget``, one shared descriptor per
open inode, plain synchronous ``os`` calls in the async handlers), with the three things that
make the example slow or unlike isofs fixed, so that a ratio against it measures what isofs
adds and not a weakness of the baseline:

* **readdir snapshots the directory once per opendir** (names and attributes); the example
  re-lists and re-stats the whole directory at every readdir call, which is quadratic
  (10,000 files: 2.75 s instead of well under 0.3 s);
* **the same kernel caching as isofs' one-view mounts**: entries and attributes are valid for
  `SHARED_TTL` (1 s), where the example says 300 s;
* **extended attributes are passed through**, answered with one syscall as isofs answers
  them (``ls -l`` asks two per file). Answering ENOSYS would make the kernel stop asking, a
  filesystem without xattrs, which isofs is not.

``default_permissions`` (pyfuse3's default options) lets the kernel check modes, as for isofs.

Request counters (per operation: count and total seconds inside the handler, recorded like
isofs records its own) are written as JSON to ``--stats FILE`` on SIGUSR1 and at exit, so a
benchmark can difference them around a timed run.

Usage: python -m isofs.bench.minimal SOURCE MOUNTPOINT [--stats FILE]   (foreground; unmount
with ``fusermount3 -u MOUNTPOINT`` or send SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import errno
import functools
import json
import os
import signal
import stat
import sys
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio
from pyfuse3 import FUSEError

from isofs.core.volume import SHARED_TTL

T = TypeVar("T")


class RequestCounters:
    """Count and total handler time per operation (two clock reads and a dict update)."""

    def __init__(self) -> None:
        self.operations: dict[str, list[float]] = {}

    def record(self, name: str, seconds: float) -> None:
        counter = self.operations.get(name)
        if counter is None:
            counter = self.operations[name] = [0, 0.0]
        counter[0] += 1
        counter[1] += seconds

    def snapshot(self) -> dict[str, Any]:
        return {
            "operations": {
                name: {"count": int(count), "total_s": total}
                for name, (count, total) in sorted(self.operations.items())
            }
        }

    def write(self, path: str) -> None:
        """Replace `path` atomically, so a reader never sees half a file."""
        temporary = f"{path}.tmp{os.getpid()}"
        with open(temporary, "w") as f:
            json.dump(self.snapshot(), f)
        os.replace(temporary, path)


def _counted(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: PassthroughOps, *args: Any) -> T:
        started = time.perf_counter()
        try:
            return await method(self, *args)
        finally:
            self.counters.record(name, time.perf_counter() - started)

    return wrapper


def _fuse_error(exc: OSError) -> FUSEError:
    return FUSEError(exc.errno or errno.EIO)


def attributes_of(st: os.stat_result) -> pyfuse3.EntryAttributes:
    """The kernel's view of a native stat, cached as isofs caches shared entries."""
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = st.st_ino
    entry.generation = 0
    entry.entry_timeout = SHARED_TTL
    entry.attr_timeout = SHARED_TTL
    entry.st_mode = st.st_mode
    entry.st_nlink = st.st_nlink
    entry.st_uid = st.st_uid
    entry.st_gid = st.st_gid
    entry.st_rdev = st.st_rdev
    entry.st_size = st.st_size
    entry.st_blksize = st.st_blksize
    entry.st_blocks = st.st_blocks
    entry.st_atime_ns = st.st_atime_ns
    entry.st_mtime_ns = st.st_mtime_ns
    entry.st_ctime_ns = st.st_ctime_ns
    return entry


class DirectorySnapshot:
    """One opendir's listing: names and attributes, taken once, read from any offset."""

    def __init__(self, inode: int, path: str) -> None:
        self.inode = inode
        self.path = path
        self.entries: list[tuple[bytes, pyfuse3.EntryAttributes]] = []
        self.consumed = False
        self.take()

    def take(self) -> None:
        entries = []
        try:
            with os.scandir(self.path) as listing:
                for found in listing:
                    try:
                        st = found.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue  # removed since it was listed
                    entries.append((os.fsencode(found.name), attributes_of(st)))
        except OSError as exc:
            raise _fuse_error(exc) from None
        self.entries = entries
        self.consumed = False


class PassthroughOps(pyfuse3.Operations):
    enable_writeback_cache = False

    def __init__(self, source: str) -> None:
        super().__init__()
        self.counters = RequestCounters()
        self._inode_path_map: dict[int, str | set[str]] = {pyfuse3.ROOT_INODE: source}
        self._lookup_cnt: defaultdict[int, int] = defaultdict(int)
        self._fd_inode_map: dict[int, int] = {}
        self._inode_fd_map: dict[int, int] = {}
        self._fd_open_count: dict[int, int] = {}
        self._directories: dict[int, DirectorySnapshot] = {}
        self._next_dir_handle = 1

    # -- inode <-> path bookkeeping ------------------------------------------------

    def _inode_to_path(self, inode: int) -> str:
        try:
            val = self._inode_path_map[inode]
        except KeyError:
            raise FUSEError(errno.ENOENT) from None
        if isinstance(val, set):
            val = next(iter(val))  # hard-linked: any of the names will do
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
            st = os.lstat(path) if fd is None else os.fstat(fd)  # type: ignore[arg-type]
        except OSError as exc:
            raise _fuse_error(exc) from None
        return attributes_of(st)

    # -- metadata ------------------------------------------------------------------

    @_counted
    async def lookup(self, parent_inode, name, ctx=None):
        name_s = os.fsdecode(name)
        path = os.path.join(self._inode_to_path(parent_inode), name_s)
        attr = self._getattr(path=path)
        if name_s not in (".", ".."):
            self._add_path(attr.st_ino, path)
        return attr

    async def forget(self, inode_list):  # not counted, as in isofs
        for inode, nlookup in inode_list:
            if self._lookup_cnt[inode] > nlookup:
                self._lookup_cnt[inode] -= nlookup
                continue
            del self._lookup_cnt[inode]
            if inode not in self._inode_fd_map:
                self._inode_path_map.pop(inode, None)

    @_counted
    async def getattr(self, inode, ctx=None):
        fd = self._inode_fd_map.get(inode)
        if fd is not None:
            return self._getattr(fd=fd)
        return self._getattr(path=self._inode_to_path(inode))

    @_counted
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
            raise _fuse_error(exc) from None
        return self._getattr(path=path, fd=fh)

    @_counted
    async def readlink(self, inode, ctx):
        try:
            return os.fsencode(os.readlink(self._inode_to_path(inode)))
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
    async def statfs(self, ctx):
        root = self._inode_to_path(pyfuse3.ROOT_INODE)
        try:
            st = os.statvfs(root)
        except OSError as exc:
            raise _fuse_error(exc) from None
        out = pyfuse3.StatvfsData()
        for attr in ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files",
                     "f_ffree", "f_favail"):  # fmt: skip
            setattr(out, attr, getattr(st, attr))
        out.f_namemax = st.f_namemax
        return out

    # -- extended attributes: one syscall each, like isofs -------------------------

    @_counted
    async def getxattr(self, inode, name, ctx):
        try:
            return os.getxattr(self._inode_to_path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
    async def listxattr(self, inode, ctx):
        try:
            names = os.listxattr(self._inode_to_path(inode), follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        return [os.fsencode(name) for name in names]

    @_counted
    async def setxattr(self, inode, name, value, ctx):
        try:
            os.setxattr(self._inode_to_path(inode), name, value, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
    async def removexattr(self, inode, name, ctx):
        try:
            os.removexattr(self._inode_to_path(inode), name, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None

    # -- directories: one snapshot per opendir ---------------------------------------

    @_counted
    async def opendir(self, inode, ctx):
        handle = self._next_dir_handle
        self._next_dir_handle += 1
        self._directories[handle] = DirectorySnapshot(inode, self._inode_to_path(inode))
        return handle

    @_counted
    async def readdir(self, fh, start_id, token):
        snapshot = self._directories[fh]
        if start_id == 0 and snapshot.consumed:
            snapshot.take()  # rewinddir(): a fresh listing, as POSIX asks
        snapshot.consumed = True
        entries = snapshot.entries
        for position in range(start_id, len(entries)):
            name, attr = entries[position]
            if not pyfuse3.readdir_reply(token, name, attr, position + 1):
                break
            # The kernel counts a lookup for every entry a readdirplus reply carried.
            self._add_path(attr.st_ino, os.path.join(snapshot.path, os.fsdecode(name)))

    @_counted
    async def releasedir(self, fh):
        self._directories.pop(fh, None)

    @_counted
    async def mkdir(self, parent_inode, name, mode, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mkdir(path, mode=mode & ~ctx.umask)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise _fuse_error(exc) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    @_counted
    async def rmdir(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            inode = os.lstat(path).st_ino
            os.rmdir(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        if inode in self._lookup_cnt:
            self._forget_path(inode, path)

    # -- names ---------------------------------------------------------------------

    @_counted
    async def mknod(self, parent_inode, name, mode, rdev, ctx):
        path = self._child(parent_inode, name)
        try:
            os.mknod(path, mode=mode & ~ctx.umask, device=rdev)
            os.chown(path, ctx.uid, ctx.gid)
        except OSError as exc:
            raise _fuse_error(exc) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    @_counted
    async def symlink(self, parent_inode, name, target, ctx):
        path = self._child(parent_inode, name)
        try:
            os.symlink(target, path)
            os.chown(path, ctx.uid, ctx.gid, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        attr = self._getattr(path=path)
        self._add_path(attr.st_ino, path)
        return attr

    @_counted
    async def link(self, inode, new_parent_inode, new_name, ctx):
        new_path = self._child(new_parent_inode, new_name)
        try:
            os.link(self._inode_to_path(inode), new_path, follow_symlinks=False)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._add_path(inode, new_path)
        return self._getattr(path=new_path)

    @_counted
    async def unlink(self, parent_inode, name, ctx):
        path = self._child(parent_inode, name)
        try:
            inode = os.lstat(path).st_ino
            os.unlink(path)
        except OSError as exc:
            raise _fuse_error(exc) from None
        if inode in self._lookup_cnt:
            self._forget_path(inode, path)

    @_counted
    async def rename(self, parent_inode_old, name_old, parent_inode_new, name_new, flags, ctx):
        if flags != 0:
            raise FUSEError(errno.EINVAL)
        old = self._child(parent_inode_old, name_old)
        new = self._child(parent_inode_new, name_new)
        try:
            os.rename(old, new)
            inode = os.lstat(new).st_ino
        except OSError as exc:
            raise _fuse_error(exc) from None
        if inode in self._lookup_cnt:
            self._replace_path(old, new)

    # -- file data -----------------------------------------------------------------

    @_counted
    async def open(self, inode, flags, ctx):
        fd = self._inode_fd_map.get(inode)
        if fd is not None:
            self._fd_open_count[fd] += 1
            return pyfuse3.FileInfo(fh=fd)
        try:
            fd = os.open(self._inode_to_path(inode), flags & ~os.O_CREAT)
        except OSError as exc:
            raise _fuse_error(exc) from None
        self._inode_fd_map[inode] = fd
        self._fd_inode_map[fd] = inode
        self._fd_open_count[fd] = 1
        return pyfuse3.FileInfo(fh=fd)

    @_counted
    async def create(self, parent_inode, name, mode, flags, ctx):
        path = self._child(parent_inode, name)
        try:
            fd = os.open(path, flags | os.O_CREAT | os.O_TRUNC, mode & ~ctx.umask)
            os.fchown(fd, ctx.uid, ctx.gid)
        except OSError as exc:
            raise _fuse_error(exc) from None
        attr = self._getattr(fd=fd)
        self._add_path(attr.st_ino, path)
        self._inode_fd_map[attr.st_ino] = fd
        self._fd_inode_map[fd] = attr.st_ino
        self._fd_open_count[fd] = 1
        return pyfuse3.FileInfo(fh=fd), attr

    @_counted
    async def read(self, fh, off, size):
        try:
            return os.pread(fh, size, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
    async def write(self, fh, off, buf):
        try:
            return os.pwrite(fh, buf, off)
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
    async def flush(self, fh):
        pass

    @_counted
    async def fsync(self, fh, datasync):
        try:
            (os.fdatasync if datasync else os.fsync)(fh)
        except OSError as exc:
            raise _fuse_error(exc) from None

    @_counted
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
            raise _fuse_error(exc) from None
        if inode not in self._lookup_cnt:
            self._inode_path_map.pop(inode, None)  # forgotten while open


async def _serve(ops: PassthroughOps, stats_file: str | None) -> None:
    """Run the FUSE loop; SIGINT/SIGTERM end it, SIGUSR1 writes the counters."""
    async with trio.open_nursery() as nursery:

        async def _on_signals() -> None:
            wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
            with trio.open_signal_receiver(*wanted) as signals:
                async for signum in signals:
                    if signum == signal.SIGUSR1:
                        if stats_file:
                            ops.counters.write(stats_file)
                        continue
                    pyfuse3.terminate()
                    return

        nursery.start_soon(_on_signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m isofs.bench.minimal", description=__doc__.splitlines()[0]
    )
    parser.add_argument("source", help="directory to mirror")
    parser.add_argument("mountpoint", help="where to mount it")
    parser.add_argument("--stats", metavar="FILE", help="write request counters here on SIGUSR1")
    parser.add_argument("--debug-fuse", action="store_true", help="libfuse debug output")
    args = parser.parse_args(argv)

    source = os.path.abspath(args.source)
    if not os.path.isdir(source):
        parser.error(f"not a directory: {args.source}")
    stats_file = os.path.abspath(args.stats) if args.stats else None

    ops = PassthroughOps(source)
    options = set(pyfuse3.default_options)  # default_permissions, as isofs mounts
    options.add("fsname=isofs_bench_minimal")
    if args.debug_fuse:
        options.add("debug")
    pyfuse3.init(ops, args.mountpoint, options)
    try:
        trio.run(_serve, ops, stats_file)
    finally:
        # After an external `fusermount3 -u` the mount is already gone; close() tolerates it.
        pyfuse3.close(unmount=True)
        if stats_file:
            ops.counters.write(stats_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
