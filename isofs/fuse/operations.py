"""The FUSE layer: translates pyfuse3 requests into `Volume` calls and errors into errnos.

It holds no policy, no crypto and no caching logic: it converts names and attributes,
asks the caller resolver which view a request belongs to, and maps exceptions to errnos.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3

from isofs.core.volume import Entry, Requester, Volume
from isofs.fuse.entries import EntryBudget
from isofs.fuse.stats import RequestStats
from isofs.views.gate import ViewGate

RequestContext = pyfuse3.RequestContext

log = logging.getLogger(__name__)

T = TypeVar("T")


def _errors_to_errno(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Decorate a handler: errno translation, request statistics, --debug logging.

    This runs on every request, so it stays one coroutine frame and does no allocation
    beyond what the statistics need.
    """
    name = method.__name__

    @functools.wraps(method)
    async def wrapper(self: IsoFS, *args: Any) -> T:
        started = time.perf_counter()
        failed = False
        try:
            return await method(self, *args)
        except pyfuse3.FUSEError:
            failed = True
            raise
        except OSError as exc:
            failed = True
            if exc.errno == errno.EIO or not exc.errno:
                log.error("%s: I/O error: %s", name, exc)
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        except Exception:
            failed = True
            log.exception("%s failed", name)
            raise pyfuse3.FUSEError(errno.EIO) from None
        finally:
            elapsed = time.perf_counter() - started
            self.stats.record(name, elapsed, failed, args)
            if self.debug:
                log.debug("%s(%s) -> %s in %.0f us", name, describe_args(args),
                          "error" if failed else "ok", elapsed * 1e6)

    return wrapper


def describe_args(args: tuple[Any, ...]) -> str:
    """Request arguments for logs: no request contexts, no long buffers."""
    return ", ".join(_short(a) for a in args if not isinstance(a, RequestContext))


def _short(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview) and len(value) > 32:
        return f"<{len(value)} bytes>"
    return repr(value)


def _fill(entry: Entry) -> pyfuse3.EntryAttributes:
    out = pyfuse3.EntryAttributes()
    st = entry.attr.native
    out.st_ino = entry.nodeid
    out.generation = 0
    out.entry_timeout = entry.entry_timeout
    out.attr_timeout = entry.attr_timeout
    out.st_mode = st.st_mode
    out.st_nlink = st.st_nlink
    out.st_uid = st.st_uid
    out.st_gid = st.st_gid
    out.st_rdev = st.st_rdev
    out.st_size = entry.attr.size
    out.st_blocks = st.st_blocks
    out.st_blksize = st.st_blksize
    out.st_atime_ns = st.st_atime_ns
    out.st_mtime_ns = st.st_mtime_ns
    out.st_ctime_ns = st.st_ctime_ns
    return out


def _negative(ttl: float) -> pyfuse3.EntryAttributes:
    """A lookup's "no such name" that the kernel may remember for `ttl` seconds (st_ino 0)."""
    out = pyfuse3.EntryAttributes()
    out.st_ino = 0
    out.entry_timeout = ttl
    out.attr_timeout = ttl
    return out


class KernelInvalidator:
    """Drops kernel caches of other views' inodes from a thread of its own.

    `pyfuse3.invalidate_inode` blocks until the kernel has dropped the pages, and the kernel may
    need a reply from this daemon to get there: called (or awaited) inside a request handler it
    deadlocks. A queue and one thread decouple them; handlers only enqueue.
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[int | list[tuple[int, bytes]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="invalidate", daemon=True)
        self.done = 0

    def start(self) -> None:
        self._thread.start()

    def submit(self, nodeid: int) -> None:
        self._queue.put(nodeid)

    def drop_entries(self, entries: list[tuple[int, bytes]]) -> None:
        """Ask the kernel to forget these (parent nodeid, name) entries (isofs.fuse.entries)."""
        self._queue.put(entries)

    def stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if isinstance(item, list):
                self._drop_entries(item)
                continue
            try:
                pyfuse3.invalidate_inode(item)
            except OSError as exc:  # ENOENT: the kernel no longer knows it, nothing to drop
                if exc.errno != errno.ENOENT:
                    log.warning("invalidating nodeid %d failed: %s", item, exc)
            self.done += 1

    @staticmethod
    def _drop_entries(entries: list[tuple[int, bytes]]) -> None:
        for parent, name in entries:
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError as exc:  # ENOENT: gone already (unlinked, renamed, forgotten)
                if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                    log.warning("dropping entry %r of nodeid %d failed: %s", name, parent, exc)


class IsoFS(pyfuse3.Operations):
    """pyfuse3 operations over one `Volume`."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        volume: Volume,
        debug: bool = False,
        gate: ViewGate | None = None,
        entries: EntryBudget | None = None,
    ) -> None:
        super().__init__()
        self.volume = volume
        self.debug = debug
        #: The entries the kernel remembers, kept within the open-files limit.
        self.entries = entries if entries is not None else EntryBudget(1 << 62, lambda _: None)
        #: The nodeid of each open directory handle: readdirplus hands out entries in it.
        self._directories: dict[int, int] = {}
        #: A one-view mount of a target-view daemon admits only callers of that view to what
        #: shows content (isofs.views.gate).
        self.gate = gate
        self.stats = RequestStats(describe=describe_args)

    def _admit(self, ctx: pyfuse3.RequestContext) -> None:
        if self.gate is not None and not self.gate.admits(ctx.pid, ctx.uid, ctx.gid):
            raise pyfuse3.FUSEError(errno.EACCES)

    def _caller(self, ctx: pyfuse3.RequestContext) -> Requester:
        return Requester(ctx.uid, ctx.gid, self.volume.view_for(ctx.pid, ctx.uid, ctx.gid))

    def _xattr_view(self, ctx: pyfuse3.RequestContext) -> str | None:
        """The caller's view, needed only when the stack transforms attribute names (the
        kernel asks for security.capability before every write: keep that path cheap)."""
        return self._caller(ctx).view if self.volume.names is not None else None

    # ----------------------------------------------------------------------- names

    @_errors_to_errno
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        caller, text = self._caller(ctx), os.fsdecode(name)
        try:
            entry = await self.volume.sized(
                lambda: self.volume.lookup(parent_inode, text, caller), parent_inode, caller.view
            )
        except FileNotFoundError:
            ttl = self.volume.negative_ttl(parent_inode, text, caller)
            if not ttl:
                raise
            return _negative(ttl)  # cached by the kernel: the next miss costs no request
        return self._hand_out(parent_inode, name, entry)

    def _hand_out(self, parent: int, name: bytes, entry: Entry) -> pyfuse3.EntryAttributes:
        """An entry for the kernel to remember (it holds a native handle until FORGET)."""
        self.entries.handed_out(parent, name, entry.nodeid)
        return _fill(entry)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for nodeid, count in inode_list:
            self.entries.forgotten(nodeid)
            try:
                self.volume.forget(nodeid, count)
            except Exception:
                log.exception("forget(%d, %d) failed", nodeid, count)

    @_errors_to_errno
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        view = self._caller(ctx).view
        return _fill(await self.volume.sized(lambda: self.volume.getattr(inode, view)))

    @_errors_to_errno
    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        entry = await self.volume.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            fh=fh,
            caller_view=self._caller(ctx).view,
        )
        return _fill(entry)

    @_errors_to_errno
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        self._admit(ctx)
        return self.volume.readlink(inode, self._caller(ctx).view)

    @_errors_to_errno
    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.volume.mknod(parent_inode, os.fsdecode(name), mode, rdev, self._caller(ctx))
        return self._hand_out(parent_inode, name, entry)

    @_errors_to_errno
    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.volume.mkdir(parent_inode, os.fsdecode(name), mode, self._caller(ctx))
        return self._hand_out(parent_inode, name, entry)

    @_errors_to_errno
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.volume.symlink(parent_inode, os.fsdecode(name), target, self._caller(ctx))
        return self._hand_out(parent_inode, name, entry)

    @_errors_to_errno
    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        entry = self.volume.link(inode, new_parent_inode, os.fsdecode(new_name), self._caller(ctx))
        return self._hand_out(new_parent_inode, new_name, entry)

    @_errors_to_errno
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.volume.unlink(parent_inode, os.fsdecode(name), self._caller(ctx))

    @_errors_to_errno
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.volume.rmdir(parent_inode, os.fsdecode(name), self._caller(ctx))

    @_errors_to_errno
    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        self.volume.rename(
            parent_inode_old,
            os.fsdecode(name_old),
            parent_inode_new,
            os.fsdecode(name_new),
            flags,
            self._caller(ctx),
        )

    @_errors_to_errno
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = self.volume.statfs()
        out = pyfuse3.StatvfsData()
        out.f_bsize = st.f_bsize
        out.f_frsize = st.f_frsize
        out.f_blocks = st.f_blocks
        out.f_bfree = st.f_bfree
        out.f_bavail = st.f_bavail
        out.f_files = st.f_files
        out.f_ffree = st.f_ffree
        out.f_favail = st.f_favail
        out.f_namemax = st.f_namemax
        return out

    @_errors_to_errno
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> None:
        groups = set(pyfuse3.get_sup_groups(ctx.pid)) | {ctx.gid}
        self.volume.access(inode, mode, ctx.uid, groups)

    # ---------------------------------------------------------------------- xattrs

    @_errors_to_errno
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        self._admit(ctx)
        return self.volume.getxattr(inode, name, self._xattr_view(ctx))

    @_errors_to_errno
    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        self.volume.setxattr(inode, name, value, self._xattr_view(ctx))

    @_errors_to_errno
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        self._admit(ctx)
        return self.volume.listxattr(inode, self._xattr_view(ctx))

    @_errors_to_errno
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.volume.removexattr(inode, name, self._xattr_view(ctx))

    # ------------------------------------------------------------------ directories

    @_errors_to_errno
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._admit(ctx)
        fh = self.volume.opendir(inode, self._caller(ctx))
        self._directories[fh] = inode
        return fh

    @_errors_to_errno
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        await self.volume.prepare_listing(fh, start_id)
        for name, entry, next_id in self.volume.readdir(fh, start_id):
            if entry is None:  # "." and "..": reported, never counted
                dot = _fill(self.volume.dot_entry(fh, name))
                if not pyfuse3.readdir_reply(token, os.fsencode(name), dot, next_id):
                    break
                continue
            encoded = os.fsencode(name)
            if pyfuse3.readdir_reply(token, encoded, _fill(entry), next_id):
                self.volume.confirm(entry)
                self.entries.handed_out(self._directories[fh], encoded, entry.nodeid)
            else:
                self.volume.discard(entry)
                break

    @_errors_to_errno
    async def releasedir(self, fh: int) -> None:
        self._directories.pop(fh, None)
        self.volume.releasedir(fh)

    @_errors_to_errno
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        self.volume.fsyncdir(fh, datasync)

    # ------------------------------------------------------------------------ files

    @_errors_to_errno
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self._admit(ctx)
        fh, keep_cache = await self.volume.open(inode, flags, self._caller(ctx))
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep_cache, direct_io=bool(flags & os.O_DIRECT))

    @_errors_to_errno
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, entry = await self.volume.create(
            parent_inode, os.fsdecode(name), mode, flags, self._caller(ctx)
        )
        info = pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=bool(flags & os.O_DIRECT))
        return info, self._hand_out(parent_inode, name, entry)

    @_errors_to_errno
    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.volume.read(fh, off, size)

    @_errors_to_errno
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.volume.write(fh, off, buf)

    @_errors_to_errno
    async def flush(self, fh: int) -> None:
        await self.volume.flush(fh)

    @_errors_to_errno
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.volume.fsync(fh, datasync)

    @_errors_to_errno
    async def release(self, fh: int) -> None:
        await self.volume.release(fh)
