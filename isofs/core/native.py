"""Native I/O relative to directory descriptors.

Every native file is reached through *at() calls on an O_PATH descriptor of its parent (or of
itself), never through a joined absolute path: names close to NAME_MAX and trees deeper than
PATH_MAX work, and an in-place mount (source == mount point) reaches the covered directory
through the descriptor it opened before mounting. The few calls Python's `os` module cannot
aim at an O_PATH descriptor (fchownat/utimensat with AT_EMPTY_PATH, renameat2) go through
libc with ctypes. Everything here is blocking and knows nothing of FUSE or views.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import stat
from typing import NamedTuple

_libc = ctypes.CDLL(None, use_errno=True)

AT_EMPTY_PATH = 0x1000
AT_SYMLINK_NOFOLLOW = 0x100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
UTIME_OMIT = (1 << 30) - 2
FALLOC_FL_KEEP_SIZE = 1

_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


class _Timespec(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long))


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def proc_path(fd: int) -> str:
    """The magic /proc link that reopens or follows an O_PATH descriptor."""
    return f"/proc/self/fd/{fd}"


class Validators(NamedTuple):
    """What tells us a native file changed behind our back."""

    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> Validators:
        return cls(st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def open_path(dir_fd: int, name: str) -> int:
    """An O_PATH handle on `name` in `dir_fd`, not following a final symlink."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def stat_at(dir_fd: int, name: str) -> os.stat_result:
    return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)


def fstat(fd: int) -> os.stat_result:
    return os.stat(fd)


def reopen(path_fd: int, flags: int) -> int:
    """Open the file behind an O_PATH descriptor for I/O with `flags`."""
    return os.open(proc_path(path_fd), (flags & ~os.O_NOFOLLOW) | os.O_CLOEXEC)


# The daemon's own reads (format probe, header, size, key files, listings of a transformed
# view) must not change a native atime: under relatime the first read after a `touch -a -d`
# or a `tar -x` would replace the atime a process just set. O_NOATIME is refused (EPERM) to
# a daemon that neither owns the file nor has CAP_FOWNER; it then opens plainly and the read
# may move the atime, as any other reader's would. Putting the time back is no way out
# there: setting times explicitly needs that same ownership.


def _refused_noatime(exc: OSError) -> bool:
    return exc.errno == errno.EPERM


def reopen_keeping_atime(path_fd: int, flags: int) -> int:
    """`reopen` for the daemon's own I/O: reads through it leave the atime alone."""
    try:
        return reopen(path_fd, flags | os.O_NOATIME)
    except OSError as exc:
        if not _refused_noatime(exc):
            raise
        return reopen(path_fd, flags)


def open_keeping_atime(dir_fd: int, name: str, flags: int, mode: int = 0o777) -> int:
    """os.open of `name` in `dir_fd` for the daemon's own reads (atime left alone)."""
    try:
        return os.open(name, flags | os.O_NOATIME | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    except OSError as exc:
        if not _refused_noatime(exc):
            raise
        return os.open(name, flags | os.O_CLOEXEC, mode, dir_fd=dir_fd)


def keep_atime(fd: int) -> None:
    """Give a descriptor opened elsewhere O_NOATIME, where allowed (like the opens above)."""
    try:
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | os.O_NOATIME)
    except OSError as exc:
        if not _refused_noatime(exc):
            raise


def readlink(path_fd: int) -> bytes:
    """The stored target, as a process's own readlink: it may update the link's atime."""
    return os.readlink(b"", dir_fd=path_fd)


def readlink_keeping_atime(path_fd: int, *, put_back: bool = True) -> bytes:
    """The stored target for the daemon's own use, with the link's atime as it was.

    readlink has no O_NOATIME: when it moved the atime, the old one is put back, which sets
    the link's ctime (utimensat does). Callers read a link once and remember the target
    (a symlink's target never changes), so this happens at most once per link and daemon.
    Without `put_back` (a mount that must write nothing) the atime moves as any reader's.
    """
    before = fstat(path_fd).st_atime_ns
    target = readlink(path_fd)
    if put_back and fstat(path_fd).st_atime_ns != before:
        with contextlib.suppress(PermissionError):  # not ours to set: as any reader's
            set_times(path_fd, before, None)
    return target


def chmod(path_fd: int, mode: int) -> None:
    os.chmod(proc_path(path_fd), stat.S_IMODE(mode))


def chown(path_fd: int, uid: int, gid: int) -> None:
    """Change owner; -1 leaves one unchanged. Works on symlinks too."""
    _check(
        _libc.fchownat(path_fd, b"", uid, gid, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "fchownat",
    )


def chown_at(dir_fd: int, name: str, uid: int, gid: int) -> None:
    os.chown(name, uid, gid, dir_fd=dir_fd, follow_symlinks=False)


def set_times(path_fd: int, atime_ns: int | None, mtime_ns: int | None) -> None:
    """utimensat on the file itself (symlinks included); None leaves a time unchanged."""

    def spec(ns: int | None) -> _Timespec:
        if ns is None:
            return _Timespec(0, UTIME_OMIT)
        return _Timespec(*divmod(ns, 1_000_000_000))

    times = (_Timespec * 2)(spec(atime_ns), spec(mtime_ns))
    _check(
        _libc.utimensat(path_fd, b"", times, AT_EMPTY_PATH | AT_SYMLINK_NOFOLLOW),
        "utimensat",
    )


def reserve(fd: int, offset: int, length: int) -> bool:
    """Allocate disk space for a range without changing the file's size.

    A write into reserved space cannot fail half-way for lack of space (a full disk then
    fails the write before it changes a byte). False when the filesystem cannot reserve
    (no fallocate): the caller writes unprotected, as any program would.
    """
    if _libc.fallocate(fd, FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(err, os.strerror(err))


def truncate(path_fd: int, size: int) -> None:
    os.truncate(proc_path(path_fd), size)


def rename(
    old_dir_fd: int, old_name: str, new_dir_fd: int, new_name: str, flags: int = 0
) -> None:
    """renameat2: RENAME_NOREPLACE and RENAME_EXCHANGE are passed to the kernel."""
    if flags == 0:
        os.rename(old_name, new_name, src_dir_fd=old_dir_fd, dst_dir_fd=new_dir_fd)
        return
    _check(
        _libc.renameat2(
            old_dir_fd, os.fsencode(old_name), new_dir_fd, os.fsencode(new_name), flags
        ),
        "renameat2",
    )


def link(path_fd: int, new_dir_fd: int, new_name: str) -> None:
    """Hard-link the file behind an O_PATH descriptor (no CAP_DAC_READ_SEARCH needed)."""
    os.link(proc_path(path_fd), new_name, dst_dir_fd=new_dir_fd, follow_symlinks=True)


def list_names(path_fd: int, *, keep_atime: bool = False) -> list[str]:
    """Names in a directory (without . and ..), read through a fresh descriptor.

    A listing updates the directory's atime like a process's getdents, unless `keep_atime`
    (the daemon listing for its own reasons or for a transformed view).
    """
    flags = os.O_RDONLY | os.O_DIRECTORY
    fd = reopen_keeping_atime(path_fd, flags) if keep_atime else reopen(path_fd, flags)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def xattr_target(path_fd: int, is_symlink: bool) -> str:
    """Path that xattr calls can use; symlinks carry no user xattrs here."""
    if is_symlink:
        raise OSError(errno.ENOTSUP, "xattrs on symlinks are not supported")
    return proc_path(path_fd)


def raise_fd_limit() -> int:
    """Lift RLIMIT_NOFILE as far as allowed: every remembered inode holds an O_PATH fd.

    Root may also raise the hard limit, up to the kernel's fs.nr_open.
    """
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if os.geteuid() == 0:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                ceiling = int(f.read())
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, ceiling))
            return ceiling
        except (OSError, ValueError):
            pass
    target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        return target
    except (ValueError, OSError):
        return soft
