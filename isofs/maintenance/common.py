"""What every maintenance command shares: the source, the mount guard, the lock, the walk."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofs.daemon import runtime
from isofs.provider import NameTransform, SetupRequest, Stack
from isofs.source import META_DIR_NAME, is_initialised, load_stack, meta_dir_of

#: Prefix of migrate's temporary files (fsck reports stale ones, migrate removes them).
TEMP_PREFIX = ".isofs-migrate."
LOCK_NAME = "maintenance.lock"
#: Filesystem type of an isofs mount in the kernel's mount table.
MOUNT_TYPE = "fuse.isofs"

Warn = Callable[[str], None]


class MaintenanceError(Exception):
    """A one-line reason why a maintenance command cannot run."""


def default_warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"isofs: warning: {message}", file=sys.stderr)


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    """A byte progress bar on stderr, shown only when stderr is a terminal (tqdm's None)."""
    from tqdm import tqdm

    return tqdm(
        total=total,
        desc=desc,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        file=sys.stderr,
        disable=None if enabled else True,
        leave=False,
    )


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


# ----------------------------------------------------------------------------- the source


def require_initialised(source: str | os.PathLike[str]) -> Path:
    """The source's metadata directory, or MaintenanceError when there is none."""
    if not os.path.isdir(source):
        raise MaintenanceError(f"source is not a directory: {os.fspath(source)}")
    if not is_initialised(source):
        raise MaintenanceError(
            f"{os.fspath(source)} is not an isofs source ({META_DIR_NAME}/config.json missing;"
            " see isofs init)"
        )
    return meta_dir_of(source)


def _overlaps(a: str, b: str) -> bool:
    """Whether one path is the other or inside it (both absolute, normalised)."""
    a, b = a.rstrip("/"), b.rstrip("/")
    return a == b or a.startswith(b + "/") or b.startswith(a + "/")


def _mount_records() -> Iterator[runtime.MountRecord]:
    """Mount records of this user's daemons and, when readable, root's."""
    seen: set[Path] = set()
    bases = [Path("/run/isofs")]
    with contextlib.suppress(OSError):
        bases.insert(0, runtime.runtime_dir())
    for base in bases:
        if base in seen:
            continue
        seen.add(base)
        try:
            paths = sorted(base.glob("*.json"))
        except OSError:
            continue
        for path in paths:
            try:
                yield runtime.MountRecord(**json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue


def _daemon_mounts(real_source: str, table: Mapping[str, str]) -> Iterator[tuple[int, str]]:
    """(pid, mount point) of isofs daemons whose command line names an overlapping source.

    Catches the daemons of other users, whose mount records we cannot read.
    """
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [os.fsdecode(a) for a in f.read().split(b"\0")]
        except OSError:
            continue
        if "isofs" not in argv or "mount" not in argv:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg.startswith("/") and argv[i + 1] in table:
                with contextlib.suppress(OSError):
                    if _overlaps(os.path.realpath(arg), real_source):
                        yield int(entry), argv[i + 1]


def mount_conflicts(source: str | os.PathLike[str]) -> list[str]:
    """Why `source` is in use by an isofs mount (empty when it is not).

    Sources: the kernel's mount table (an isofs mount on the source itself, i.e. mounted in
    place, or on a directory inside it or around it), the mount records of `runtime`, and the
    command lines of running daemons.
    """
    real = os.path.realpath(source)
    table = runtime.mounted_filesystems()
    reasons: list[str] = []
    for mountpoint, fstype in table.items():
        if fstype != MOUNT_TYPE or not _overlaps(mountpoint, real):
            continue
        if mountpoint == real:
            reasons.append("is an isofs mount point (mounted in place, or a mount's view)")
        else:
            reasons.append(f"overlaps the isofs mount point {mountpoint}")
    for record in _mount_records():
        if record.mountpoint in table and _overlaps(record.source, real):
            where = "is" if record.source == real else f"overlaps {record.source}, which is"
            reasons.append(f"{where} mounted on {record.mountpoint} (daemon pid {record.pid})")
    for pid, mountpoint in _daemon_mounts(real, table):
        reasons.append(f"is mounted on {mountpoint} (daemon pid {pid})")
    return list(dict.fromkeys(reasons))


def check_not_mounted(source: str | os.PathLike[str], *, force: bool = False) -> None:
    """MaintenanceError when `source` is in use by a mount (unless `force`)."""
    if force:
        return
    reasons = mount_conflicts(source)
    if reasons:
        raise MaintenanceError(
            f"{os.fspath(source)} {reasons[0]}: a mount may change files while this runs; "
            "unmount it first (or use --force)"
        )


@contextlib.contextmanager
def exclusive(meta_dir: Path, *, required: bool = True) -> Iterator[None]:
    """Hold `.isofs/maintenance.lock` so fsck and migrate never run on one source at once.

    With `required` false (a read-only fsck) a metadata directory that cannot be written
    (read-only medium, another user's source) means running without the lock.
    """
    try:
        fd = os.open(meta_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if not required and exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            yield
            return
        raise MaintenanceError(f"cannot lock {meta_dir / LOCK_NAME}: {exc.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MaintenanceError(
                f"another isofs fsck or migrate is running on {meta_dir.parent}"
            ) from None
        yield
    finally:
        os.close(fd)


@contextlib.contextmanager
def maintained_stack(
    source: str | os.PathLike[str], request: SetupRequest, *, force: bool, lock_required: bool
) -> Iterator[Stack]:
    """The common start of fsck and migrate: not mounted, locked, keys unlocked."""
    meta_dir = require_initialised(source)
    check_not_mounted(source, force=force)
    with exclusive(meta_dir, required=lock_required):
        stack = load_stack(meta_dir, request)
        if stack.is_identity:
            raise MaintenanceError(f"{os.fspath(source)} has an empty provider stack")
        try:
            yield stack
        finally:
            stack.close()


# ----------------------------------------------------------------------------- the walk


@dataclass
class SourceFile:
    """One regular file of a source, as the walk found it (path relative to the source)."""

    rel: str
    st: os.stat_result
    #: "file" (content to check or migrate), "temporary" (left by an interrupted migrate),
    #: "dir key" (a name transform's directory key) or "bookkeeping" (its other files).
    kind: str

    @property
    def name(self) -> str:
        return os.path.basename(self.rel)


@dataclass
class SourceWalk:
    """Every regular file under a source root, sorted, without `.isofs/`; errors collected.

    fsck and migrate both go through it: the same files, the same classification, the same
    byte progress bar.
    """

    root: Path
    transform: NameTransform | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def files(self) -> list[SourceFile]:
        found = [SourceFile(rel, st, self._kind(rel)) for rel, st in self._regular_files()]
        return sorted(found, key=lambda f: f.rel)

    def _kind(self, rel: str) -> str:
        name = os.path.basename(rel)
        if name.startswith(TEMP_PREFIX):
            return "temporary"
        if self.transform is not None and self.transform.is_bookkeeping(name):
            return "dir key" if name == self.transform.dir_key_name else "bookkeeping"
        return "file"

    def _regular_files(self) -> Iterator[tuple[str, os.stat_result]]:
        def onerror(exc: OSError) -> None:
            self.errors.append((self.rel(exc.filename or str(self.root)), exc.strerror or ""))

        top = os.fspath(self.root)
        for dirpath, dirnames, filenames in os.walk(top, onerror=onerror):
            if dirpath == top and META_DIR_NAME in dirnames:
                dirnames.remove(META_DIR_NAME)
            dirnames.sort()
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    self.errors.append((self.rel(path), exc.strerror or ""))
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield self.rel(path), st

    @staticmethod
    def each(
        files: list[SourceFile], desc: str, enabled: bool
    ) -> Iterator[tuple[SourceFile, Callable[[int], None]]]:
        """Each file with a callback that advances the progress bar by bytes done; what a
        file's work did not count is added when the next one starts."""
        bar = progress_bar(sum(f.st.st_size for f in files), desc, enabled)
        try:
            for item in files:
                done = 0

                def advance(n: int) -> None:
                    nonlocal done
                    done += n
                    bar.update(n)

                yield item, advance
                bar.update(max(0, item.st.st_size - done))
        finally:
            bar.close()


def open_parent(root: Path, rel: str) -> tuple[int, str]:
    """(descriptor of the file's directory, file name)."""
    parent, name = os.path.split(rel)
    dir_fd = os.open(root / parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return dir_fd, name
