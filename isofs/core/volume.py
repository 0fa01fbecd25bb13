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
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TypeVar

from isofs.core import METADATA_DIR_NAME as META_DIR_NAME
from isofs.core import native
from isofs.core.inodes import CODE_VIEWS, SHARED, VIEW_CODES, Inode, InodeTable, make_nodeid
from isofs.core.names import ViewNames
from isofs.core.pagecache import PageCache, page_size_for
from isofs.core.sections import Section
from isofs.core.sizecache import NOT_FORMATTED, SizeCache
from isofs.core.sizing import SizeMiss, Sizer
from isofs.provider import Stack
from isofs.views.callers import CallerResolver
from isofs.views.policy import VIEW_NATIVE, Policy

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long the kernel may trust names and attributes that are the same in every view, by
#: default. Bounds how late a change made behind the mount's back is seen.
SHARED_TTL = 1.0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the kernel may cache what the mount tells it (seconds; see ARCHITECTURE §8).

    `entry`: names that are the same in every view; `attr`: attributes; `negative`: names
    that exist in no view. A name or file that differs between views is never cached
    (entry timeout 0) whatever these say.
    """

    entry: float = SHARED_TTL
    attr: float = SHARED_TTL
    negative: float = SHARED_TTL
MAX_CALLERS_SHOWN = 50
#: A directory whose sizes were measured in a batch is not measured whole again this soon.
DIRECTORY_MEASURE_SECONDS = 2.0
#: Sections kept (with their pages) after the kernel forgot their file.
MAX_IDLE_SECTIONS = 256


class Attributes:
    """What stat() shows through the mount for one (file, view): the native lstat, with the
    size the view shows. It keeps the stat result rather than copying its fields (this is
    built for every entry of every listing and lookup)."""

    __slots__ = ("native", "size")

    def __init__(self, native_stat: os.stat_result, size: int) -> None:
        self.native = native_stat
        self.size = size

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Attributes)
            and self.size == other.size
            and self.native == other.native
        )

    def __repr__(self) -> str:
        return f"Attributes(mode={self.mode:o}, size={self.size}, mtime_ns={self.mtime_ns})"

    mode = property(lambda self: self.native.st_mode)
    nlink = property(lambda self: self.native.st_nlink)
    uid = property(lambda self: self.native.st_uid)
    gid = property(lambda self: self.native.st_gid)
    rdev = property(lambda self: self.native.st_rdev)
    blocks = property(lambda self: self.native.st_blocks)
    blksize = property(lambda self: self.native.st_blksize)
    atime_ns = property(lambda self: self.native.st_atime_ns)
    mtime_ns = property(lambda self: self.native.st_mtime_ns)
    ctime_ns = property(lambda self: self.native.st_ctime_ns)


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
class Requester:
    """Who a request acts for: the ids that own what it creates, and its view.

    (The process behind it, with its executable and cgroup, is `isofs.callers.Caller`.)
    """

    uid: int
    gid: int
    view: str = "native"


@dataclass(eq=False, slots=True)
class FileHandle:
    """An open file: native I/O on `fd`, or through `section` for a transformed view."""

    inode: Inode
    view: str
    code: int
    fd: int
    flags: int
    section: Section | None = None

    @property
    def writable(self) -> bool:
        """Closing a writable handle writes the section's pending pages back.

        Only a writable one: the pages are the file's, not the handle's, and a read-only
        close must not fail because another handle's data cannot be written (a full disk);
        the periodic write-back retries it.
        """
        return self.flags & os.O_ACCMODE != os.O_RDONLY


@dataclass(eq=False, slots=True)
class DirHandle:
    inode: Inode
    view: str
    names: list[tuple[str, str]] | None = None
    #: `prepare_listing` took the snapshot for the readdir that follows (do not take another).
    prepared: bool = False
    #: What prepare_listing learnt of each native name: its lstat, and the size the view
    #: shows when a cache knew it (readdir need not stat nor look it up again).
    listed: dict[str, tuple[os.stat_result, int | None]] = field(default_factory=dict)


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

    def __init__(
        self,
        root_fd: int,
        *,
        stack: Stack | None = None,
        policy: Policy | None = None,
        resolver: CallerResolver | None = None,
        cache: PageCache | None = None,
        sizes: SizeCache | None = None,
        invalidate: Callable[[int], None] | None = None,
        read_only: bool = False,
        timeouts: Timeouts | None = None,
    ) -> None:
        self.inodes = InodeTable(root_fd, on_release=self._inode_released)
        self.timeouts = timeouts or Timeouts()
        #: A read-only mount writes nothing to the source, not even a time put back.
        self.read_only = read_only
        self.stack = stack or Stack([])
        self.policy = policy or Policy()
        self.resolver = resolver
        self.cache = cache or PageCache()
        self.sizes = sizes if sizes is not None else SizeCache(None)
        #: Learns logical sizes; the hot paths (lookup, getattr, listings) read files only in
        #: worker threads (`sized`, `prepare_listing`), the rare others inline.
        self.sizer = Sizer(self.stack, self.sizes)
        #: When each directory's missing sizes were last measured in one batch.
        self._directories_measured: dict[int, float] = {}
        self.page_size = page_size_for(self.stack.block_size)
        #: Called with a nodeid whose kernel caches are stale; must not block the caller.
        self.invalidate = invalidate or (lambda nodeid: None)
        views = self.policy.views
        self.single_view: str | None = next(iter(views)) if len(views) == 1 else None
        if self.single_view is None and resolver is None:
            raise ValueError("a policy with several views needs a caller resolver")
        #: Whether a regular file gets one nodeid per view (bytes differ between views).
        self.per_view_files = self.single_view is None and not self.stack.is_identity
        transform = self.stack.name_transform
        self.names = ViewNames(transform) if transform is not None else None
        self.is_root_daemon = os.geteuid() == 0
        #: What a new native object is created with (chown is needed only for other ids).
        self._own_ids = (os.geteuid(), os.getegid())
        try:  # its entry must never be cached: one view may see it, another must not
            meta = native.stat_at(root_fd, META_DIR_NAME)
            self.meta_key: tuple[int, int] | None = (meta.st_dev, meta.st_ino)
        except FileNotFoundError:
            self.meta_key = None
        self.counters = Counters()
        self.view_requests: dict[str, int] = dict.fromkeys(views, 0)
        #: Per view: requests per caller executable (the first MAX_CALLERS_SHOWN of them).
        self.callers_seen: dict[str, dict[str, int]] = {view: {} for view in views}
        self.sections: dict[tuple[int, str], Section] = {}
        #: Sections whose file the kernel forgot, oldest first (kept for their pages).
        self._idle_sections: OrderedDict[tuple[int, str], None] = OrderedDict()
        self.views = views
        self._next_section = itertools.count(1)
        self._handles: dict[int, FileHandle] = {}
        self._dir_handles: dict[int, DirHandle] = {}
        self._next_fh = itertools.count(1)

    # ----------------------------------------------------------------- views and entries

    def view_for(self, pid: int, uid: int, gid: int) -> str:
        """The view of the process behind a request (free when the mount has one view)."""
        if self.single_view is not None:
            return self.single_view
        assert self.resolver is not None
        caller = self.resolver.resolve(pid, uid, gid)
        view = self.policy.view_for(caller)
        self.view_requests[view] += 1
        seen = self.callers_seen[view]
        exe = caller.exe if caller is not None else "(vanished)"
        if exe in seen or len(seen) < MAX_CALLERS_SHOWN:
            seen[exe] = seen.get(exe, 0) + 1
        return view

    def is_multi_view(self, inode: Inode) -> bool:
        """Whether this object can differ between views (then: one nodeid per view).

        Regular files differ in content; with transformed names every entry differs in name,
        and the kernel cannot keep one inode under two names (it would move the alias).
        """
        return self.per_view_files and (inode.is_regular or self.names is not None)

    def transforms(self, view: str) -> bool:
        """Whether `view` shows the stack's upper files rather than native bytes."""
        return view != VIEW_NATIVE and not self.stack.is_identity

    def _code_for(self, inode: Inode, view: str) -> int:
        return VIEW_CODES[view] if self.is_multi_view(inode) else SHARED

    def attributes(
        self, inode: Inode, st: os.stat_result, view: str, listed_size: int | None = None
    ) -> Attributes:
        """`listed_size`: the size a listing found in a cache for this very `st`."""
        size = st.st_size
        if inode.is_regular and self.transforms(view):
            size = self.logical_size(inode, st, view, listed_size)
        elif inode.is_symlink and self._names_for(view) is not None:
            size = len(self._link_target(inode, view))
        return Attributes(st, size)

    def logical_size(
        self, inode: Inode, st: os.stat_result, view: str, listed_size: int | None = None
    ) -> int:
        """The size a transformed view shows, without opening the file when avoidable.

        Order: a live section (it knows about pending writes), the size a listing found for
        this `st` a moment ago, the size cache validated by the native (size, mtime, ctime),
        and only then the file itself, whose answer is cached.
        """
        section = self.sections.get((inode.number, view))
        if section is not None and (
            section.has_dirty_pages or section.validators == native.Validators.of(st)
        ):
            return section.size
        if listed_size is not None:
            return listed_size
        return self.sizer.size_of(inode.key, st, inode.path_fd, lambda: self.describe(inode))

    async def sized(
        self, call: Callable[[], T], directory: int | None = None, view: str | None = None
    ) -> T:
        """Run a metadata call whose answer may need a logical size that only the file knows:
        the file is then measured in a worker thread, and the call made again (lookup and
        getattr change nothing before they compute attributes, so a retry is harmless).

        A lookup's miss (`directory` is the parent's nodeid) measures the sizes the whole
        directory misses in the same worker-thread call, as a listing does: a process that
        stats every file in turn (`find -exec stat`, a build) pays one batch, not one thread
        hop per file. At most once per directory per `DIRECTORY_MEASURE_SECONDS`.
        """
        self.sizer.measure_inline = False
        try:
            return call()
        except SizeMiss as miss:
            path_fd = miss.path_fd
        finally:
            self.sizer.measure_inline = True
        if directory is None or view is None or not await self._measure_directory(directory, view):
            await self.sizer.measure_one(path_fd, lambda: f"descriptor {path_fd}")
        return call()  # known now (or, if the file changed again meanwhile, measured inline)

    async def _measure_directory(self, nodeid: int, view: str) -> bool:
        """Measure what a directory's entries miss, in one batch; False when not worth it
        now (measured a moment ago: a miss then is a file still changing)."""
        directory, _ = self.inodes.by_nodeid(nodeid)
        now = time.monotonic()
        if now - self._directories_measured.get(directory.number, -1e9) < DIRECTORY_MEASURE_SECONDS:
            return False
        if len(self._directories_measured) > 4096:
            self._directories_measured.clear()
        self._directories_measured[directory.number] = now
        directory.open_handles += 1  # its descriptor stays open while the thread reads
        try:
            names = [
                name for name in native.list_names(directory.path_fd, keep_atime=True)
                if not self._hidden(directory, name, view)
            ]
            await self.sizer.measure_names(
                directory.path_fd, self._missing_sizes(directory, names, view)
            )
        finally:
            directory.open_handles -= 1
            self._release_inode(directory)
        return True

    def _missing_sizes(
        self, directory: Inode, native_names: Iterable[str], view: str,
        listed: dict[str, tuple[os.stat_result, int | None]] | None = None,
    ) -> list[str]:
        """Of `native_names` (the names the view shows), those of regular files whose
        logical size no cache knows (with `listed`, each name's lstat and known size go
        there)."""
        missing = []
        for native_name in native_names:
            try:
                st = native.stat_at(directory.path_fd, native_name)
            except OSError:
                continue
            size = None
            if stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                known = self.inodes.by_key(key)
                if known is None or (known.number, view) not in self.sections:
                    size = self.sizer.for_listing(key, st)
                    if size is None:
                        missing.append(native_name)
                # (a live section knows, or its reload will: readdir asks it)
            if listed is not None:
                listed[native_name] = (st, size)
        return missing

    def describe(self, inode: Inode) -> str:
        """The native path of an inode, for log lines that must name the file."""
        try:
            return os.readlink(native.proc_path(inode.path_fd))
        except OSError:
            return f"inode {inode.number}"

    def _entry(
        self, inode: Inode, st: os.stat_result, view: str, listed_size: int | None = None
    ) -> Entry:
        code = self._code_for(inode, view)
        ttl = self.timeouts.entry if code == SHARED and inode.key != self.meta_key else 0.0
        return Entry(
            nodeid=make_nodeid(inode.number, code),
            attr=self.attributes(inode, st, view, listed_size),
            entry_timeout=ttl,
            attr_timeout=self.timeouts.attr,
            inode=inode,
            code=code,
        )

    def _hidden(self, parent: Inode, name: str, view: str) -> bool:
        """The metadata directory and everything in it exist only for the native view."""
        if view == VIEW_NATIVE:
            return False
        return parent.key == self.meta_key or (parent is self.inodes.root and name == META_DIR_NAME)

    def _remember_entry(
        self, parent: Inode, name: str, view: str, st: os.stat_result | None = None
    ) -> Entry:
        """Look `name` up (`st`: its lstat, when the caller has just made one) and count the
        kernel's new reference to it."""
        inode, st = self.inodes.remember(parent, name, st)
        entry = self._entry(inode, st, view)
        self.inodes.add_lookup(inode, entry.code)
        return entry

    def lookup(self, parent_nodeid: int, name: str, caller: Requester) -> Entry:
        self.counters.lookups += 1
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        view = caller.view
        if self._hidden(parent, name, view):
            raise OSError(errno.ENOENT, name)
        names = self._names_for(view)
        if names is None:
            return self._remember_entry(parent, name, view)
        native_name, st = names.resolve_stat(parent.number, parent.path_fd, name)
        return self._remember_entry(parent, native_name, view, st)

    def negative_ttl(self, parent_nodeid: int, name: str, caller: Requester) -> float:
        """How long the kernel may remember that `name` does not exist (after `lookup` said
        so): only a name that exists in no view may be cached, because the kernel's dentry
        cache is shared by every process. The metadata directory exists for the native view
        only; with transformed names, a miss in one view is checked in the other."""
        ttl = self.timeouts.negative
        if not ttl:
            return 0.0
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        if parent.key == self.meta_key or (parent is self.inodes.root and name == META_DIR_NAME):
            return 0.0
        if self.single_view is not None or self.names is None:
            return ttl
        try:
            if caller.view == VIEW_NATIVE:  # does the target view see it under this name?
                self.names.resolve(parent.number, parent.path_fd, name)
            else:  # does the native view?
                native.stat_at(parent.path_fd, name)
        except FileNotFoundError:
            return ttl
        except OSError:
            return 0.0
        return 0.0

    def forget(self, nodeid: int, count: int) -> None:
        inode = self.inodes.forget(nodeid, count)
        if inode is not None:
            self._release_inode(inode)

    def getattr(self, nodeid: int, caller_view: str | None = None) -> Entry:
        inode, code = self.inodes.by_nodeid(nodeid)
        view = self._checked_view(code, caller_view)
        return self._entry(inode, inode.native_stat(), view)

    def _checked_view(self, code: int, caller_view: str | None) -> str:
        """The view of a nodeid, refusing a caller of another view (/proc/PID/fd tricks)."""
        view = self._view_of(code, caller_view)
        if caller_view is not None and code != SHARED and view != caller_view:
            raise OSError(errno.EACCES, "object belongs to another view")
        return view

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
        inode, code = self.inodes.by_nodeid(nodeid)
        view = self._checked_view(code, caller_view)
        if mode is not None:
            if inode.is_symlink:
                raise OSError(errno.EOPNOTSUPP, "chmod of a symlink")
            native.chmod(inode.path_fd, mode)
        if uid is not None or gid is not None:
            native.chown(inode.path_fd, -1 if uid is None else uid, -1 if gid is None else gid)
        if size is not None:
            await self._truncate(inode, view, size)
        if atime_ns is not None or mtime_ns is not None:
            # Pending pages written back later would move the mtime just set (`cp -p` writes,
            # sets the times, then closes): they go to the native file first.
            await self._before_native_change(inode)
            native.set_times(inode.path_fd, atime_ns, mtime_ns)
        return self.getattr(nodeid, caller_view)

    async def _truncate(self, inode: Inode, view: str, size: int) -> None:
        if not inode.is_regular:
            raise OSError(errno.EISDIR if inode.is_dir else errno.EINVAL, "truncate")
        if self.transforms(view):
            section = await self._section(inode, view)
            await section.ensure_formatted()
            await section.truncate(size)
            section.detach()
        else:
            await self._before_native_change(inode)
            native.truncate(inode.path_fd, size)
            self._after_change(inode, view)

    def readlink(self, nodeid: int, caller_view: str | None = None) -> bytes:
        inode, code = self.inodes.by_nodeid(nodeid)
        return self._link_target(inode, self._checked_view(code, caller_view))

    def _link_target(self, inode: Inode, view: str) -> bytes:
        """The target a view shows. The native view's readlink is the caller's own (it may
        update the atime, as natively); a transformed view reads the link once, keeping its
        atime, and remembers the target (a symlink's target never changes)."""
        if not self.transforms(view):
            return native.readlink(inode.path_fd)
        if inode.link_target is None:
            inode.link_target = native.readlink_keeping_atime(
                inode.path_fd, put_back=not self.read_only
            )
        names = self._names_for(view)
        stored = inode.link_target
        return stored if names is None else names.link_to_view(stored)

    def _give_to_caller(
        self, parent: Inode, name: str, caller: Requester, mode: int | None = None
    ) -> None:
        """Make a new object belong to the caller, as a kernel filesystem would.

        chown clears setuid/setgid, so a mode asking for them is applied again afterwards,
        setgid only where the kernel would keep it (caller root or in the file's group).
        """
        if not self.is_root_daemon or (caller.uid, caller.gid) == self._own_ids:
            return  # created with the daemon's ids, which are the caller's: nothing to change
        parent_mode = native.fstat(parent.path_fd).st_mode
        gid = -1 if parent_mode & stat.S_ISGID else caller.gid
        native.chown_at(parent.path_fd, name, caller.uid, gid)
        if mode is None or not mode & (stat.S_ISUID | stat.S_ISGID):
            return
        st = native.stat_at(parent.path_fd, name)
        wanted = stat.S_IMODE(mode)
        if caller.uid != 0 and st.st_gid != caller.gid:
            wanted &= ~stat.S_ISGID
        if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) != wanted:
            os.chmod(name, wanted, dir_fd=parent.path_fd)

    def _truncated_by(self, inode: Inode, caller: Requester) -> None:
        """An unprivileged truncating open drops setuid (and group-exec setgid), as natively."""
        if caller.uid == 0 or not self.is_root_daemon:
            return
        mode = inode.native_stat().st_mode
        drop = stat.S_ISUID | (stat.S_ISGID if mode & stat.S_IXGRP else 0)
        if mode & drop:
            native.chmod(inode.path_fd, stat.S_IMODE(mode) & ~drop)

    # Names. A transformed view may show other names than the native ones (file-name
    # encryption) and never shows the metadata directory; these two map a view's name to the
    # native one, for an existing entry and for a new one.

    def _names_for(self, view: str) -> ViewNames | None:
        return self.names if self.transforms(view) else None

    def _existing(self, parent: Inode, name: str, view: str) -> str:
        if self._hidden(parent, name, view):
            raise OSError(errno.ENOENT, name)
        names = self._names_for(view)
        return name if names is None else names.resolve(parent.number, parent.path_fd, name)

    def _new(self, parent: Inode, name: str, view: str) -> str:
        if self._hidden(parent, name, view):
            raise OSError(errno.EACCES, f"{name} is reserved for isofs metadata")
        names = self._names_for(view)
        return name if names is None else names.create(parent.number, parent.path_fd, name)

    def _gone(self, parent: Inode, native_name: str, view: str) -> None:
        names = self._names_for(view)
        if names is not None:
            names.removed(parent.path_fd, native_name)

    def mkdir(self, parent_nodeid: int, name: str, mode: int, caller: Requester) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._new(parent, name, caller.view)
        os.mkdir(native_name, stat.S_IMODE(mode), dir_fd=parent.path_fd)
        self._give_to_caller(parent, native_name, caller, mode)
        entry = self._remember_entry(parent, native_name, caller.view)
        names = self._names_for(caller.view)
        if names is not None:
            names.init_directory(entry.inode.number, entry.inode.path_fd)
        return entry

    def mknod(
        self, parent_nodeid: int, name: str, mode: int, rdev: int, caller: Requester
    ) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._new(parent, name, caller.view)
        os.mknod(native_name, mode, rdev, dir_fd=parent.path_fd)
        self._give_to_caller(parent, native_name, caller, mode)
        return self._remember_entry(parent, native_name, caller.view)

    def symlink(self, parent_nodeid: int, name: str, target: bytes, caller: Requester) -> Entry:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._new(parent, name, caller.view)
        names = self._names_for(caller.view)
        if names is not None:
            target = names.link_to_native(target)
        os.symlink(target, native_name, dir_fd=parent.path_fd)
        self._give_to_caller(parent, native_name, caller)
        return self._remember_entry(parent, native_name, caller.view)

    def link(self, nodeid: int, new_parent_nodeid: int, new_name: str, caller: Requester) -> Entry:
        inode, _ = self.inodes.by_nodeid(nodeid)
        parent, _ = self.inodes.by_nodeid(new_parent_nodeid)
        native_name = self._new(parent, new_name, caller.view)
        native.link(inode.path_fd, parent.path_fd, native_name)
        return self._remember_entry(parent, native_name, caller.view)

    def unlink(self, parent_nodeid: int, name: str, caller: Requester) -> None:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._existing(parent, name, caller.view)
        self.inodes.open_found_under(parent, native_name)
        os.unlink(native_name, dir_fd=parent.path_fd)
        self._gone(parent, native_name, caller.view)

    def rmdir(self, parent_nodeid: int, name: str, caller: Requester) -> None:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._existing(parent, name, caller.view)
        self.inodes.open_found_under(parent, native_name)
        names = self._names_for(caller.view)
        # Natively the directory still holds its key file: it is emptied first.
        emptied = nullcontext() if names is None else names.emptied(parent.path_fd, native_name)
        with emptied:
            os.rmdir(native_name, dir_fd=parent.path_fd)
        self._gone(parent, native_name, caller.view)

    def rename(
        self,
        old_parent_nodeid: int,
        old_name: str,
        new_parent_nodeid: int,
        new_name: str,
        flags: int,
        caller: Requester,
    ) -> None:
        old_parent, _ = self.inodes.by_nodeid(old_parent_nodeid)
        new_parent, _ = self.inodes.by_nodeid(new_parent_nodeid)
        old_native = self._existing(old_parent, old_name, caller.view)
        if flags & native.RENAME_EXCHANGE:
            new_native = self._existing(new_parent, new_name, caller.view)
        else:
            new_native = self._new(new_parent, new_name, caller.view)
        self.inodes.open_found_under(old_parent, old_native)
        self.inodes.open_found_under(new_parent, new_native)  # replaced or exchanged
        names = self._names_for(caller.view)
        try:
            replacing: AbstractContextManager[None] = nullcontext()
            if names is not None and not flags and self._is_directory(old_parent, old_native):
                # A directory replaces an empty one, which natively still holds its key file.
                replacing = names.emptied(new_parent.path_fd, new_native)
            with replacing:
                native.rename(
                    old_parent.path_fd, old_native, new_parent.path_fd, new_native, flags
                )
        except OSError:
            if not flags & native.RENAME_EXCHANGE:  # a sidecar written for nothing
                self._gone(new_parent, new_native, caller.view)
            raise
        if not flags & native.RENAME_EXCHANGE:
            self._gone(old_parent, old_native, caller.view)

    @staticmethod
    def _is_directory(parent: Inode, name: str) -> bool:
        return stat.S_ISDIR(native.stat_at(parent.path_fd, name).st_mode)

    def statfs(self) -> os.statvfs_result:
        return os.statvfs(native.proc_path(self.inodes.root.path_fd))

    def access(self, nodeid: int, mode: int, uid: int, gids: set[int]) -> None:
        """POSIX permission check (only asked when the kernel does not check itself)."""
        inode, _ = self.inodes.by_nodeid(nodeid)
        st = inode.native_stat()
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

    def getxattr(self, nodeid: int, name: bytes, caller_view: str | None = None) -> bytes:
        inode, names = self._xattr_object(nodeid, caller_view)
        if inode.is_symlink:
            raise OSError(errno.ENODATA, "no xattrs on symlinks")
        path: str | int = inode.io_fd if inode.io_fd >= 0 else native.proc_path(inode.path_fd)
        return os.getxattr(path, name) if names is None else names.get_xattr(path, name)

    def setxattr(
        self, nodeid: int, name: bytes, value: bytes, caller_view: str | None = None
    ) -> None:
        inode, names = self._xattr_object(nodeid, caller_view)
        path = native.xattr_target(inode.path_fd, inode.is_symlink)
        if names is None:
            os.setxattr(path, name, value)
        else:
            names.set_xattr(path, name, value)

    def listxattr(self, nodeid: int, caller_view: str | None = None) -> list[bytes]:
        inode, names = self._xattr_object(nodeid, caller_view)
        if inode.is_symlink:
            return []
        path = native.proc_path(inode.path_fd)
        if names is None:
            return [os.fsencode(n) for n in os.listxattr(path)]
        return names.list_xattrs(path)

    def removexattr(self, nodeid: int, name: bytes, caller_view: str | None = None) -> None:
        inode, names = self._xattr_object(nodeid, caller_view)
        path = native.xattr_target(inode.path_fd, inode.is_symlink)
        if names is None:
            os.removexattr(path, name)
        else:
            names.remove_xattr(path, name)

    def _xattr_object(self, nodeid: int, caller_view: str | None) -> tuple[Inode, ViewNames | None]:
        """The inode, and the names side of its view when that view transforms metadata."""
        inode, code = self.inodes.by_nodeid(nodeid)
        if self.names is None:
            return inode, None
        return inode, self._names_for(self._checked_view(code, caller_view))

    # ----------------------------------------------------------------------- directories

    def opendir(self, nodeid: int, caller: Requester) -> int:
        inode, _ = self.inodes.by_nodeid(nodeid)
        if not inode.is_dir:
            raise OSError(errno.ENOTDIR, "not a directory")
        if inode.key == self.meta_key and caller.view != VIEW_NATIVE:
            raise OSError(errno.EACCES, "isofs metadata is for the native view only")
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
        if handle.names is None or (start == 0 and not handle.prepared):
            handle.names = self._listing(handle.inode, handle.view)
        handle.prepared = False
        if start == 0:
            yield ".", None, 1
        if start <= 1:
            yield "..", None, 2
        for position in range(max(start, 2), len(handle.names) + 2):
            name, native_name = handle.names[position - 2]
            listed_st, size = handle.listed.pop(native_name, (None, None))
            try:
                inode, st = self.inodes.remember(handle.inode, native_name, listed_st)
            except FileNotFoundError:
                continue
            if st is not listed_st and size is not None and (
                native.Validators.of(st) != native.Validators.of(listed_st)
            ):
                size = None  # changed since it was listed: measured here, inline
            yield name, self._entry(inode, st, handle.view, size), position + 1

    async def prepare_listing(self, fh: int, start: int) -> None:
        """Before `readdir`: take its snapshot and learn, in one batch in a worker thread, the
        logical sizes it would otherwise read from each file in turn on the event loop.

        Only the first readdir of a listing measures (later ones continue the snapshot).
        """
        handle = self._dir_handles[fh]
        if handle.names is not None and start != 0:
            return
        handle.names = self._listing(handle.inode, handle.view)
        handle.prepared = True
        handle.listed = {}
        if not self.transforms(handle.view):
            return
        missing = self._missing_sizes(
            handle.inode, (native_name for _, native_name in handle.names), handle.view,
            handle.listed,
        )
        self._directories_measured[handle.inode.number] = time.monotonic()
        await self.sizer.measure_names(handle.inode.path_fd, missing)

    def _listing(self, directory: Inode, view: str) -> list[tuple[str, str]]:
        """(view name, native name) of every entry a view shows in a directory."""
        listing = []
        names = self._names_for(view)
        # A transformed view lists for itself (names are read, then mapped): like every read
        # through it, that leaves the native atime alone (docs/ARCHITECTURE.md section 2).
        keep_atime = self.transforms(view)
        for native_name in native.list_names(directory.path_fd, keep_atime=keep_atime):
            if self._hidden(directory, native_name, view):
                continue
            if names is None:
                listing.append((native_name, native_name))
                continue
            shown = names.to_view(directory.number, directory.path_fd, native_name)
            if shown is not None:
                listing.append((shown, native_name))
        return listing

    def dot_entry(self, fh: int, name: str) -> Entry:
        """Attributes for "." or ".." of an open directory (never counted as a lookup)."""
        handle = self._dir_handles[fh]
        inode = handle.inode
        if name == ".." and inode is not self.inodes.root:
            st = native.stat_at(inode.path_fd, "..")
            number = self.inodes.number_of(st)
            return Entry(make_nodeid(number, SHARED), self.attributes(inode, st, "native"),
                         0.0, 0.0, inode)
        return self._entry(inode, inode.native_stat(), handle.view)

    def confirm(self, entry: Entry) -> None:
        """The kernel kept a readdirplus entry: count its lookup."""
        self.inodes.add_lookup(entry.inode, entry.code)

    def discard(self, entry: Entry) -> None:
        """The kernel refused a readdirplus entry: release it if nothing else holds it."""
        self._release_inode(entry.inode)

    def releasedir(self, fh: int) -> None:
        handle = self._dir_handles.pop(fh)
        handle.inode.open_handles -= 1
        self._release_inode(handle.inode)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        handle = self._dir_handles[fh]
        fd = native.reopen(handle.inode.path_fd, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (os.fdatasync if datasync else os.fsync)(fd)
        finally:
            os.close(fd)

    # ----------------------------------------------------------------------------- files

    def _new_handle(
        self, inode: Inode, view: str, code: int, fd: int, flags: int, section: Section | None
    ) -> int:
        fh = next(self._next_fh)
        inode.open_handles += 1
        if section is not None:
            section.handles += 1
        self._handles[fh] = FileHandle(inode, view, code, fd, flags, section)
        if fd >= 0 and inode.io_fd < 0:
            inode.io_fd = fd
        return fh

    def _keep_kernel_cache(self, inode: Inode, code: int, st: os.stat_result) -> bool:
        """Keep a view's kernel-cached pages only if the native file is unchanged since."""
        current = native.Validators.of(st)
        unchanged = inode.kernel_seen.get(code) == current
        inode.kernel_seen[code] = current
        return unchanged

    @staticmethod
    def _native_flags(flags: int) -> int:
        # The kernel computes append offsets itself; O_APPEND natively would ignore them.
        # O_DIRECT would demand aligned buffers the daemon does not have.
        return flags & ~(os.O_APPEND | os.O_NOFOLLOW | os.O_DIRECT)

    # ---------------------------------------------------------------------- sections

    async def _section(self, inode: Inode, view: str, fd: int | None = None) -> Section:
        """The section of (inode, view), built on first use.

        `fd` is a read-write native descriptor the caller already has (create); the section
        takes it over, or it is closed if a section exists already.
        """
        key = (inode.number, view)
        section = self.sections.get(key)
        if section is not None:
            self._idle_sections.pop(key, None)
            if not section.attached:
                section.attach(fd if fd is not None else self._open_native_rw(inode))
            elif fd is not None:
                os.close(fd)
            if section.native_changed():  # changed behind our back: reload before next use
                section.mark_stale()
            return section
        if fd is None:
            fd = self._open_native_rw(inode)
        section = Section(
            next(self._next_section),
            fd,
            self.stack,
            self.cache,
            self.page_size,
            view,
            on_write_back=lambda: self._section_wrote(inode.number, view),
        )
        self.sections[key] = section  # registered before the first await: one per key
        try:
            await section.load()
        except BaseException:
            self._drop_section(key)
            raise
        return section

    def _sections_of(self, number: int, but: str | None = None) -> list[Section]:
        """The sections of one file (one per transformed view), without scanning them all."""
        found = []
        for view in self.views:
            section = self.sections.get((number, view))
            if section is not None and view != but:
                found.append(section)
        return found

    def _section_wrote(self, number: int, view: str) -> None:
        """A section changed its native file: the other views must not trust their caches."""
        inode = self.inodes.find(number)
        if inode is not None:
            section = self.sections.get((number, view))  # it has just taken the validators
            self._after_change(inode, view, section.validators if section else None)
            return
        for section in self._sections_of(number, but=view):
            section.mark_stale()

    def _open_native_rw(self, inode: Inode) -> int:
        """Read-write when allowed; read-only for a file we may not write or a source on a
        read-only filesystem (the kernel then refuses the writes themselves)."""
        try:
            return native.reopen_keeping_atime(inode.path_fd, os.O_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise
            return native.reopen_keeping_atime(inode.path_fd, os.O_RDONLY)

    def _drop_section(self, key: tuple[int, str]) -> None:
        section = self.sections.pop(key, None)
        if section is not None:
            if section.dirty:
                log.error("%s: dropping unwritten pages", section.label)
            section.close()

    async def _before_native_change(self, inode: Inode) -> None:
        """Write back transformed views' pending pages before native bytes change under them."""
        for section in self._sections_of(inode.number):
            await section.flush()

    def _after_change(
        self, inode: Inode, view: str, now: native.Validators | None = None
    ) -> None:
        """Native bytes of `inode` changed through `view`: make every other view fresh.

        Other views' sections reload before their next read or write; their kernel caches are
        invalidated now, and no longer count as current for keep_cache at the next open.
        `now`: the native validators after the change, when the caller has them.
        """
        own = self._code_for(inode, view)
        if now is None:
            now = native.Validators.of(inode.native_stat())
        inode.kernel_seen = {own: now}
        for section in self._sections_of(inode.number, but=view):
            section.mark_stale()
        if self.is_multi_view(inode):
            for nodeid in inode.nodeids():
                if nodeid != make_nodeid(inode.number, own):
                    self.invalidate(nodeid)

    # ------------------------------------------------------------------------- files

    async def open(self, nodeid: int, flags: int, caller: Requester) -> tuple[int, bool]:
        """Open a file; returns (fh, keep_cache)."""
        inode, code = self.inodes.by_nodeid(nodeid)
        view = self._checked_view(code, caller.view)
        if inode.is_regular and self.transforms(view):
            section = await self._open_section(inode, view, flags)
            if flags & os.O_TRUNC:
                self._truncated_by(inode, caller)
            keep = self._keep_kernel_cache(inode, code, inode.native_stat())
            return self._new_handle(inode, view, code, -1, flags, section), keep
        if flags & os.O_TRUNC:
            await self._before_native_change(inode)
        fd = native.reopen(inode.path_fd, self._native_flags(flags))
        if flags & os.O_TRUNC:
            self._truncated_by(inode, caller)
            self._after_change(inode, view)
        keep = self._keep_kernel_cache(inode, code, os.fstat(fd))
        return self._new_handle(inode, view, code, fd, flags, None), keep

    async def _open_section(
        self, inode: Inode, view: str, flags: int, fd: int | None = None
    ) -> Section:
        """A transformed view's open: O_TRUNC, and formatting before the first write.

        Truncating a plain file and then formatting it means a file rewritten through the
        transformed view comes back in the stack's format.
        """
        section = await self._section(inode, view, fd)
        if flags & os.O_TRUNC and (section.size or section.stored_size):
            await section.truncate(0)
        if flags & os.O_ACCMODE != os.O_RDONLY:
            await section.ensure_formatted()
        return section

    async def create(
        self, parent_nodeid: int, name: str, mode: int, flags: int, caller: Requester
    ) -> tuple[int, Entry]:
        parent, _ = self.inodes.by_nodeid(parent_nodeid)
        native_name = self._new(parent, name, caller.view)
        transformed = self.transforms(caller.view)
        # A transformed view reads and writes through its section: open read-write now (a
        # file created with mode 0444 can be opened for writing only by its creating open).
        native_flags = self._native_flags(flags)
        if transformed:
            native_flags = native_flags & ~(os.O_ACCMODE | os.O_TRUNC) | os.O_RDWR
        if transformed:  # the section's descriptor: its reads are the daemon's (no atime)
            fd = native.open_keeping_atime(
                parent.path_fd, native_name, native_flags | os.O_CREAT, stat.S_IMODE(mode)
            )
        else:
            fd = os.open(
                native_name,
                native_flags | os.O_CREAT | os.O_CLOEXEC,
                stat.S_IMODE(mode),
                dir_fd=parent.path_fd,
            )
        try:
            self._give_to_caller(parent, native_name, caller, mode)
            # The stat of the descriptor just made, not of the name (which could change).
            entry = self._remember_entry(parent, native_name, caller.view, native.fstat(fd))
        except BaseException:
            os.close(fd)
            raise
        inode = entry.inode
        section = None
        if transformed:
            section = await self._open_section(inode, caller.view, flags | os.O_RDWR, fd)
            fd = -1
            st = inode.native_stat()
            entry = self._entry(inode, st, caller.view)
            inode.kernel_seen[entry.code] = native.Validators.of(st)
        else:
            inode.kernel_seen[entry.code] = native.Validators.of(entry.attr.native)
        fh = self._new_handle(inode, caller.view, entry.code, fd, flags, section)
        return fh, entry

    def handle(self, fh: int) -> FileHandle:
        try:
            return self._handles[fh]
        except KeyError:
            raise OSError(errno.EBADF, f"unknown file handle {fh}") from None

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        handle = self.handle(fh)
        if handle.section is not None:
            data = await handle.section.read(offset, size)
        else:
            data = os.pread(handle.fd, size, offset)
        self.counters.reads += 1
        self.counters.bytes_read += len(data)
        return data

    async def write(self, fh: int, offset: int, data: bytes) -> int:
        handle = self.handle(fh)
        if handle.section is not None:
            written = await handle.section.write(offset, data)
        else:
            if self.sections:
                await self._before_native_change(handle.inode)
            written = os.pwrite(handle.fd, data, offset)
            now = native.Validators.of(native.fstat(handle.fd))
            self._after_change(handle.inode, handle.view, now)
        self.counters.writes += 1
        self.counters.bytes_written += written
        return written

    async def flush(self, fh: int) -> None:
        handle = self.handle(fh)
        if handle.section is not None and handle.writable:
            await handle.section.flush()

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handle(fh)
        if handle.section is not None:
            await handle.section.fsync(datasync)
        else:
            (os.fdatasync if datasync else os.fsync)(handle.fd)

    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh)
        try:
            if handle.section is not None:
                handle.section.handles -= 1
                if handle.writable:
                    await handle.section.flush()
                self._remember_size(handle.inode, handle.section)
                handle.section.detach()
        finally:
            if handle.fd >= 0:
                if handle.inode.io_fd == handle.fd:
                    handle.inode.io_fd = -1
                os.close(handle.fd)
            handle.inode.open_handles -= 1
            self._release_inode(handle.inode)

    def _remember_size(self, inode: Inode, section: Section) -> None:
        """A section's exact logical size goes to the size cache, so listings after a remount
        need not open the file to learn it."""
        if section.stale or section.dirty or not section.attached:
            return
        value = section.size if section.formatted else NOT_FORMATTED
        self.sizes.put(inode.key, section.validators, value, exact=True)

    def _release_inode(self, inode: Inode) -> None:
        """Close an inode nobody references (the table calls `_inode_released`)."""
        self.inodes.release_if_unused(inode)

    def _inode_released(self, inode: Inode) -> None:
        """The table let an inode go (`_release_inode`, or a directory kept only for a
        child it had not opened): what is kept by its number goes or turns idle.

        Its sections outlive it (bounded): when views alternate on a file, the kernel forgets
        one view's inode at every switch, and the section's pages are what make the next
        read of that view a cache hit. Keeping them is safe: a section's open descriptor pins
        the native inode, so its number cannot be reused for another file meanwhile.
        """
        if self.names is not None:
            self.names.forget(inode.number)
        for view in self.views:
            if (inode.number, view) in self.sections:
                self._idle_sections[(inode.number, view)] = None
        while len(self._idle_sections) > MAX_IDLE_SECTIONS:
            key, _ = self._idle_sections.popitem(last=False)
            section = self.sections.get(key)
            if section is not None and not section.handles and not section.dirty:
                self._drop_section(key)

    async def flush_all(self) -> None:
        """Write back every section (periodically and before unmount)."""
        for section in list(self.sections.values()):
            await section.flush()

    # ------------------------------------------------------------------------ status

    def status(self) -> dict[str, object]:
        """What `isofs status` shows about the core (plain data, JSON-ready)."""
        resolver = self.resolver.statistics() if self.resolver is not None else None
        return {
            "views": sorted(self.policy.views),
            "single_view": self.single_view,
            "per_view_files": self.per_view_files,
            "policy": self.policy.describe(),
            "stack": [type(layer).__name__ for layer in self.stack.layers],
            "layers": self.stack.statistics(),
            "requests_per_view": dict(self.view_requests),
            "callers_per_view": self.callers_seen,
            "callers": asdict(resolver) if resolver is not None else None,
            "inodes": len(self.inodes),
            "open_files": len(self._handles),
            "sections": [
                {
                    "file": section.native_path() or f"inode {number} (idle)",
                    "view": view,
                    "size": section.size,
                    "handles": section.handles,
                    "dirty": section.dirty,
                    "lock": asdict(section.lock.statistics()),
                }
                for (number, view), section in self.sections.items()
            ],
            "page_cache": {
                **asdict(self.cache.statistics()),
                "hit_ratio": round(self.cache.statistics().hit_ratio, 4),
            },
            "size_cache": {**asdict(self.sizes.statistics()), **asdict(self.sizer.stats)},
            "io": asdict(self.counters),
        }

    # --------------------------------------------------------------------------- teardown

    def close(self) -> None:
        """Close every handle and the inode table (after unmount)."""
        for handle in self._handles.values():
            if handle.fd >= 0:
                os.close(handle.fd)
        self._handles.clear()
        for key in list(self.sections):
            self._drop_section(key)
        self._dir_handles.clear()
        self.inodes.close_all()
