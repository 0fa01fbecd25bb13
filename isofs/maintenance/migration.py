"""`isofs migrate`: put the plain files of an unmounted source into the stack's format.

Every plain (not formatted) regular file is rewritten in its formatted form, crash-safely: the
top layer writes the formatted copy (`Stack.import_plain`, a layer may do it its own way) into
`.isofs-migrate.<random>` in the same directory (visible in the native view while it exists),
with the original's owner, mode, extended attributes and times, its holes left as holes; the
copy is fsynced, renamed over the original, and the directory fsynced (`isofs.durable`). A
crash leaves the old or the new file, plus at most a stale temporary file that the next
migrate removes (and fsck reports). A file that changes while it is copied is left alone.
Hard-linked files are skipped (the rename would split the link), as are already formatted
files and the bookkeeping files of a name transform; file names are not changed (plain names
pass through in the transformed view).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofs import durable
from isofs.core.sections import NativeFile
from isofs.maintenance.common import (
    TEMP_PREFIX,
    SourceWalk,
    Warn,
    default_warn,
    human_size,
    open_parent,
    plural,
)
from isofs.provider import CorruptData, Stack


@dataclass
class MigrateReport:
    source: str
    migrated: list[str] = field(default_factory=list)
    bytes: int = 0
    formatted: int = 0
    hard_linked: list[str] = field(default_factory=list)
    stale_removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def summary(self) -> str:
        parts = [
            f"{plural(len(self.migrated), 'file')} migrated ({human_size(self.bytes)})",
            f"{self.formatted} already formatted",
        ]
        if self.hard_linked:
            parts.append(
                f"{len(self.hard_linked)} hard-linked skipped (migrating would split the link)"
            )
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.stale_removed:
            parts.append(f"{plural(len(self.stale_removed), 'stale temporary file')} removed")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"migrate {self.source}: " + ", ".join(parts)


class _Skip(Exception):
    """This file is left as it is, for the reason given."""


class _PlainNative:
    """A plain native file as `Layer.import_plain` reads it: holes found with SEEK_DATA."""

    def __init__(self, fd: int, size: int) -> None:
        self.fd = fd
        self._size = size

    def size(self) -> int:
        return self._size

    def read(self, offset: int, size: int) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) < size:
            raise _Skip("it shrank while being copied")
        return data

    def data_ranges(self) -> Iterator[tuple[int, int]]:
        """(start, end) of the regions holding data; all of it when holes cannot be found."""
        offset, size = 0, self._size
        while offset < size:
            try:
                start = os.lseek(self.fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # only a hole up to the end
                    return
                yield offset, size
                return
            if start >= size:
                return
            end = min(os.lseek(self.fd, start, os.SEEK_HOLE), size)
            yield start, end
            offset = end


def _import(
    stack: Stack, src_fd: int, size: int, temp_fd: int, advance: Callable[[int], Any]
) -> None:
    """Write the formatted copy (a seam for tests that change the file meanwhile)."""
    stack.import_plain(_PlainNative(src_fd, size), NativeFile(temp_fd), advance).flush()


def _copy_xattrs(src_fd: int, dst_fd: int) -> None:
    """Give the copy exactly the original's extended attributes (ACLs included)."""
    try:
        names = os.listxattr(src_fd)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return
        raise
    for name in names:
        value = os.getxattr(src_fd, name)
        try:
            os.setxattr(dst_fd, name, value)
        except OSError as exc:
            with contextlib.suppress(OSError):
                if os.getxattr(dst_fd, name) == value:  # e.g. an inherited security label
                    continue
            raise _Skip(f"cannot copy extended attribute {name}: {exc.strerror}") from None
    for name in os.listxattr(dst_fd):
        if name not in names:  # inherited (a default ACL): the original did not have it
            with contextlib.suppress(OSError):
                os.removexattr(dst_fd, name)


def _migrate_file(
    root: Path, rel: str, stack: Stack, advance: Callable[[int], Any]
) -> tuple[str, int]:
    """Format one file in place; ("migrated", bytes) or ("formatted", 0), else _Skip/OSError."""
    dir_fd, name = open_parent(root, rel)
    try:
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return _migrate_open(dir_fd, name, src_fd, stack, advance)
        finally:
            os.close(src_fd)
    finally:
        os.close(dir_fd)


def _unchanged(dir_fd: int, name: str, src_fd: int, before: os.stat_result) -> bool:
    after = os.fstat(src_fd)
    current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return (after.st_size, after.st_mtime_ns, after.st_ctime_ns) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ctime_ns,
    ) and (current.st_dev, current.st_ino) == (before.st_dev, before.st_ino)


def _migrate_open(
    dir_fd: int, name: str, src_fd: int, stack: Stack, advance: Callable[[int], Any]
) -> tuple[str, int]:
    before = os.fstat(src_fd)
    if not stat.S_ISREG(before.st_mode):
        raise _Skip("not a regular file")
    if before.st_nlink > 1:
        raise _Skip(f"hard-linked ({before.st_nlink} links)")
    try:
        if stack.open(NativeFile(src_fd)) is not None:
            return "formatted", 0
    except CorruptData:
        return "formatted", 0  # formatted but damaged: fsck's business, never re-format it
    with durable.new_file(dir_fd, name, temp_prefix=TEMP_PREFIX) as temp_fd:
        try:
            os.fchown(temp_fd, before.st_uid, before.st_gid)
        except PermissionError:
            raise _Skip("cannot give the new file the same owner (run as root)") from None
        _import(stack, src_fd, before.st_size, temp_fd, advance)
        _copy_xattrs(src_fd, temp_fd)
        os.fchmod(temp_fd, stat.S_IMODE(before.st_mode))  # after chown, which clears set-id
        os.utime(temp_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        if not _unchanged(dir_fd, name, src_fd, before):
            raise _Skip("it changed while being copied")
    return "migrated", before.st_size


def migrate(
    source: str | os.PathLike[str],
    stack: Stack,
    *,
    progress: bool = False,
    warn: Warn | None = None,
) -> MigrateReport:
    """Format every plaintext regular file of an unmounted source in place (module doc)."""
    warn = warn or default_warn
    root = Path(source)
    report = MigrateReport(os.fspath(source))
    walk = SourceWalk(root, stack.name_transform)
    candidates = []
    for item in walk.files():
        if item.kind == "temporary":
            _remove_stale(root, item.rel, report, warn)
        elif item.kind != "file":
            continue
        elif item.st.st_nlink > 1:
            report.hard_linked.append(item.rel)
            warn(f"{item.rel}: skipped, hard-linked ({item.st.st_nlink} links): would split the"
                 " link")  # fmt: skip
        else:
            candidates.append(item)
    for rel, reason in walk.errors:
        report.failed.append((rel, reason))
        warn(f"{rel}: cannot read: {reason}")
    for item, advance in walk.each(candidates, "migrate", progress):
        rel = item.rel
        try:
            outcome, copied = _migrate_file(root, rel, stack, advance)
        except _Skip as exc:
            reason = str(exc)
            if reason.startswith("hard-linked"):
                report.hard_linked.append(rel)
                warn(f"{rel}: skipped, {reason}: would split the link")
            else:
                report.skipped.append((rel, reason))
                warn(f"{rel}: skipped, {reason}")
        except FileNotFoundError:
            pass  # removed since the walk: nothing to migrate
        except OSError as exc:
            report.failed.append((rel, exc.strerror or str(exc)))
            warn(f"{rel}: cannot migrate: {exc.strerror or exc}")
        else:
            if outcome == "formatted":
                report.formatted += 1
            else:
                report.migrated.append(rel)
                report.bytes += copied
    return report


def _remove_stale(root: Path, rel: str, report: MigrateReport, warn: Warn) -> None:
    try:
        os.unlink(root / rel)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.failed.append((rel, f"cannot remove stale temporary file: {exc.strerror}"))
        warn(f"{rel}: cannot remove stale temporary file: {exc.strerror}")
        return
    report.stale_removed.append(rel)
