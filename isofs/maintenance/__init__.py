"""Offline maintenance of a source directory: `isofs passwd`, `isofs fsck`, `isofs migrate`.

Everything here works on the source directory itself, with the provider stack recorded by
`isofs init`; nothing needs FUSE. fsck and migrate refuse a source that is mounted (in place,
or as the source of any isofs mount) unless forced, and take an exclusive lock on
`.isofs/maintenance.lock` so two of them never run on one source at once.

passwd
    Every provider of the stack with a `change_passphrase` classmethod re-wraps its key under a
    new passphrase; file contents are not re-encrypted. A wrong old secret changes nothing.

fsck
    Every regular file (outside `.isofs/`) is either not in the stack's format (passed through:
    fine) or formatted, and then its header is opened, its size checked against the layout and
    every block read back through the stack, so every block's authentication is verified.
    Damage is reported per file: a corrupt header, a truncated tail (a native size no valid
    file has; the whole blocks before it are still checked), an invalid size that cannot be
    cut back to a valid one, bad blocks (by number, blocks of the stack's block size), a
    corrupt directory key, or a transformed extended attribute whose name or value fails
    authentication (name transforms; reported, not repaired). Temporary files left by an
    interrupted migrate (`.isofs-migrate.*`) are reported as stale.

    `--repair` first copies the damaged file's native bytes to
    `.isofs/lost+found/<path relative to the source>.<UTC timestamp>` (fsynced before anything
    else changes), then repairs the file in place, so it keeps its inode, hard links, owner,
    mode and extended attributes: a torn tail is cut back to the last whole block (a native
    size valid for the format), and each bad block is rewritten as zeros through the stack (so
    the rest of the file reads again). A corrupt header cannot be repaired (it keys every
    block); such files are only reported. Stale migrate temporary files are removed.

    Limits: a header whose magic or version bytes are damaged makes the file look unformatted
    (it is then counted as passed through, like a plaintext file); what the format itself
    cannot detect (see docs/FORMAT-encrypt.md, e.g. an all-zero block when holes are allowed,
    truncation at a block boundary) fsck cannot detect either.

migrate
    Every plaintext (not formatted) regular file of an initialised source is rewritten in its
    formatted form, crash-safely: the formatted copy is written to `.isofs-migrate.<random>` in
    the same directory (visible in the native view while it exists), with the original's
    owner, mode, extended attributes and times, and with its holes left as holes, fsynced,
    renamed over the original, and the directory fsynced. A crash leaves the old or the new
    file, plus at most a stale temporary file that the next migrate removes (and fsck
    reports). A file that changes while it is copied is left alone. Hard-linked files are
    skipped (the rename would split the link), as are already formatted files and the
    bookkeeping files of a name transform; file names are not changed (plain names pass
    through in the transformed view).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofs.core.sections import NativeFile
from isofs.daemon import runtime
from isofs.provider import (
    CorruptData,
    NameTransform,
    RandomAccessFile,
    SecretSource,
    SetupRequest,
    Stack,
    load_provider,
)
from isofs.source import META_DIR_NAME, is_initialised, load_stack, meta_dir_of, read_config

TEMP_PREFIX = ".isofs-migrate."
LOST_FOUND_NAME = "lost+found"
LOCK_NAME = "maintenance.lock"
#: Bytes per read when copying or checking (blocks of the stack's size, about 1 MiB).
CHUNK = 1 << 20
#: Filesystem type of an isofs mount in the kernel's mount table.
MOUNT_TYPE = "fuse.isofs"

Warn = Callable[[str], None]


class MaintenanceError(Exception):
    """A one-line reason why a maintenance command cannot run."""


def _default_warn(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"isofs: warning: {message}", file=sys.stderr)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
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
    place, or on a directory inside it or around it), the mount records of `isofs.runtime`,
    and the command lines of running daemons.
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


# ----------------------------------------------------------------------------- passwd


def change_passphrase(
    source: str | os.PathLike[str],
    old: SecretSource,
    new: SecretSource,
    *,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Re-wrap the key of every provider that has one; return the providers changed.

    Each provider unlocks with `old` (a passphrase, key file or recovery key) before it asks
    `new`, so a wrong old secret fails with the key store untouched. Data is not rewritten.
    """
    meta_dir = require_initialised(source)
    changed: list[str] = []
    names = [item["provider"] for item in read_config(meta_dir)["stack"]]
    for name in names:
        method = getattr(load_provider(name), "change_passphrase", None)
        if method is None:
            continue
        if options:
            method(meta_dir, old, new, options=dict(options))
        else:
            method(meta_dir, old, new)
        changed.append(name)
    if not changed:
        stack = " -> ".join(names) or "empty"
        raise MaintenanceError(f"no provider of {os.fspath(source)} has a passphrase ({stack})")
    return changed


# ----------------------------------------------------------------------------- walking


@dataclass
class _Walk:
    """Regular files under a source root, sorted, without `.isofs/`; errors collected."""

    root: Path
    errors: list[tuple[str, str]] = field(default_factory=list)

    def rel(self, path: str) -> str:
        return os.path.relpath(path, self.root)

    def __iter__(self) -> Iterator[tuple[str, os.stat_result]]:
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


def _is_temp(rel: str) -> bool:
    return os.path.basename(rel).startswith(TEMP_PREFIX)


def _open_parent(root: Path, rel: str) -> tuple[int, str]:
    """(descriptor of the file's directory, file name)."""
    parent, name = os.path.split(rel)
    dir_fd = os.open(root / parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return dir_fd, name


def _fsync_dir(dir_fd: int) -> None:
    os.fsync(dir_fd)


# ----------------------------------------------------------------------------- fsck


@dataclass
class Problem:
    """One thing wrong with a file."""

    kind: str  # corrupt header | truncated tail | invalid size | bad blocks | ...
    detail: str = ""
    blocks: list[int] = field(default_factory=list)

    def describe(self) -> str:
        if self.kind == "bad blocks":
            shown = ", ".join(str(b) for b in self.blocks[:20])
            more = f" and {len(self.blocks) - 20} more" if len(self.blocks) > 20 else ""
            return f"bad blocks {shown}{more}"
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


#: Kinds that make a file count as damaged (the others: unreadable, stale temporary file).
DAMAGE_KINDS = frozenset(
    {
        "corrupt header",
        "truncated tail",
        "invalid size",
        "bad blocks",
        "corrupt directory key",
        "corrupt xattr",
    }
)
_REPAIRABLE = frozenset({"truncated tail", "bad blocks"})


@dataclass
class FileReport:
    """What fsck found in one file (paths relative to the source, native names)."""

    path: str
    problems: list[Problem]
    block_size: int = 0
    repaired: bool = False
    lost_found: str | None = None
    note: str | None = None
    #: Native size to cut a torn tail back to (internal).
    valid_native_size: int | None = field(default=None, repr=False)

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]

    @property
    def damaged(self) -> bool:
        return any(kind in DAMAGE_KINDS for kind in self.kinds)

    def line(self) -> str:
        text = f"{self.path}: " + "; ".join(p.describe() for p in self.problems)
        if self.repaired:
            text += " -> repaired"
            if self.lost_found:
                text += f", original in {self.lost_found}"
        if self.note:
            text += f" -> {self.note}"
        return text

    def as_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "problems": [
                {"kind": p.kind, "detail": p.detail, **({"blocks": p.blocks} if p.blocks else {})}
                for p in self.problems
            ],
            "block_size": self.block_size,
            "repaired": self.repaired,
            "lost_found": self.lost_found,
            "note": self.note,
        }


@dataclass
class FsckReport:
    source: str
    checked: int = 0
    formatted: int = 0
    files: list[FileReport] = field(default_factory=list)
    repair: bool = False

    @property
    def damaged(self) -> int:
        return sum(1 for f in self.files if f.damaged)

    @property
    def repaired(self) -> int:
        return sum(1 for f in self.files if f.repaired)

    @property
    def clean(self) -> bool:
        return not self.files

    @property
    def exit_code(self) -> int:
        """0 when nothing was found, 1 when anything was (repaired or not)."""
        return 0 if self.clean else 1

    def summary(self) -> str:
        parts = [
            f"{_n(self.checked, 'file')} checked",
            f"{self.formatted} formatted",
            f"{self.damaged} damaged",
        ]
        others: dict[str, int] = {}
        for report in self.files:
            if not report.damaged:
                kind = report.kinds[0]
                others[kind] = others.get(kind, 0) + 1
        parts += [f"{count} {kind}" for kind, count in sorted(others.items())]
        if self.repair:
            parts.append(f"{self.repaired} repaired")
        return f"fsck {self.source}: " + ", ".join(parts)

    def lines(self) -> list[str]:
        return [*(f.line() for f in self.files), self.summary()]

    def as_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "files_checked": self.checked,
            "formatted": self.formatted,
            "damaged": self.damaged,
            "repaired": self.repaired,
            "clean": self.clean,
            "files": [f.as_json() for f in self.files],
        }


class _Clipped:
    """A read-only view of the first `size` bytes of a file (to check before a torn tail)."""

    def __init__(self, lower: RandomAccessFile, size: int) -> None:
        self._lower = lower
        self._size = size

    def read(self, offset: int, size: int) -> bytes:
        return self._lower.read(offset, max(0, min(size, self._size - offset)))

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "read-only")

    def truncate(self, size: int) -> None:
        raise OSError(errno.EROFS, "read-only")

    def size(self) -> int:
        return self._size

    def flush(self) -> None:
        pass


def _reason(exc: Exception) -> str:
    """An exception's message without the "[Errno N]" of OSError (CorruptData is one)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _check_size(stack: Stack) -> int:
    """Granularity of block numbers in reports (the stack's block size, bytes for identity)."""
    size = stack.block_size
    return size if size > 1 else CHUNK


def _last_valid_native_size(stack: Stack, native_size: int) -> int | None:
    """The largest native size below `native_size` that the stack accepts as a layout.

    Searched downward over at most two blocks' worth of bytes (enough for any layout whose
    invalid sizes are a torn last block); None when the layers cannot tell sizes apart.
    """
    limit = max(native_size - 2 * max(stack.block_size, 4096) - 4096, -1)
    for size in range(native_size - 1, limit, -1):
        if stack.logical_size(size) is not None:
            return size
    return None


def _bad_blocks(
    upper: RandomAccessFile, size: int, block: int, advance: Callable[[int], Any]
) -> list[int]:
    """Numbers of the blocks that fail to read; big reads, block by block only on failure."""
    chunk = block * max(1, CHUNK // block)
    bad: list[int] = []
    for offset in range(0, size, chunk):
        length = min(chunk, size - offset)
        try:
            data = upper.read(offset, length)
            if len(data) != length:
                raise CorruptData(f"short read at {offset}")
        except CorruptData:
            for n in range(offset // block, (offset + length + block - 1) // block):
                want = min(block, size - n * block)
                try:
                    if len(upper.read(n * block, want)) != want:
                        bad.append(n)
                except CorruptData:
                    bad.append(n)
        advance(length)
    return bad


def _examine(
    stack: Stack, native: RandomAccessFile, advance: Callable[[int], Any]
) -> tuple[bool, FileReport | None]:
    """(formatted, problems or None) for one native file, reading it completely."""
    block = _check_size(stack)
    report = FileReport("", [], block_size=block)
    try:
        upper = stack.open(native)
    except CorruptData as exc:
        report.problems.append(Problem("corrupt header", _reason(exc)))
        return True, report
    if upper is None:
        return False, None
    native_size = native.size()
    valid = None
    if stack.logical_size(native_size) is None:  # no valid file has this size: a torn tail?
        valid = _last_valid_native_size(stack, native_size)
    if valid is None:
        try:
            size = upper.size()
        except CorruptData as exc:
            report.problems.append(Problem("invalid size", _reason(exc)))
            return True, report
    else:
        reason = f"native size {native_size} is not a valid layout"
        report.problems.append(
            Problem("truncated tail", f"{reason}; {native_size - valid} bytes past the last block")
        )
        report.valid_native_size = valid
        try:
            clipped = stack.open(_Clipped(native, valid))
            if clipped is None:
                return True, report
            upper, size = clipped, clipped.size()
        except CorruptData as exc2:
            report.problems.append(Problem("corrupt header", _reason(exc2)))
            return True, report
    bad = _bad_blocks(upper, size, block, advance)
    if bad:
        report.problems.append(Problem("bad blocks", "failed authentication", bad))
    return True, (report if report.problems else None)


def _check_xattrs(transform: NameTransform, fd: int) -> list[Problem]:
    """Transformed extended attributes whose name or value fails authentication."""
    problems = []
    for name in map(os.fsencode, os.listxattr(fd)):
        try:
            transform.xattr_name_to_view(name)
            transform.xattr_value_to_view(name, os.getxattr(fd, name))
        except CorruptData as exc:
            problems.append(Problem("corrupt xattr", f"{name.decode(errors='replace')}: "
                                    f"{_reason(exc)}"))  # fmt: skip
    return problems


def _check_dir_key(transform: NameTransform, path: Path) -> Problem | None:
    try:
        with open(path, "rb") as f:
            transform.parse_dir_key(f.read(4096))
    except CorruptData as exc:
        return Problem("corrupt directory key", _reason(exc))
    return None


def _utc_stamp() -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())


def _copy_aside(meta_dir: Path, rel: str, src_fd: int, stamp: str) -> str:
    """Copy a file's native bytes to lost+found durably; return its path (from the source)."""
    base = meta_dir / LOST_FOUND_NAME / f"{rel}.{stamp}"
    base.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest, n = base, 0
    while dest.exists():
        n += 1
        dest = base.with_name(f"{base.name}-{n}")
    part = dest.with_name(f"{dest.name}.part")
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        while chunk := os.pread(src_fd, CHUNK, offset):
            NativeFile(fd).write(offset, chunk)
            offset += len(chunk)
        st = os.fstat(src_fd)
        os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        part.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.rename(part, dest)
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _fsync_dir(dir_fd)
    finally:
        os.close(dir_fd)
    return os.path.relpath(dest, meta_dir.parent)


def _repair_file(root: Path, meta_dir: Path, stack: Stack, report: FileReport, stamp: str) -> None:
    """Cut a torn tail, zero bad blocks, after copying the original to lost+found."""
    kinds = set(report.kinds)
    if not kinds & _REPAIRABLE or kinds - _REPAIRABLE:
        unfixable = sorted(kinds - _REPAIRABLE) or sorted(kinds)
        report.note = f"not repairable ({', '.join(unfixable)})"
        return
    path = root / report.path
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        report.note = f"not repaired: {exc.strerror}"
        return
    try:
        report.lost_found = _copy_aside(meta_dir, report.path, fd, stamp)
        native = NativeFile(fd)
        if report.valid_native_size is not None:
            native.truncate(report.valid_native_size)
        upper = stack.open(native)
        if upper is None:  # cannot happen after a successful examination
            report.note = "not repaired: no longer in the stack's format"
            return
        size = upper.size()
        block = report.block_size
        for problem in report.problems:
            for n in problem.blocks:
                start = n * block
                if start < size:
                    upper.write(start, bytes(min(block, size - start)))
        upper.flush()
        os.fsync(fd)
        _, again = _examine(stack, NativeFile(fd), lambda _n: None)
    finally:
        os.close(fd)
    if again is not None:
        report.note = "repair incomplete: " + "; ".join(p.describe() for p in again.problems)
        return
    report.repaired = True


def fsck(
    source: str | os.PathLike[str],
    stack: Stack,
    *,
    repair: bool = False,
    progress: bool = False,
    stamp: str | None = None,
) -> FsckReport:
    """Check (and with `repair`, repair) every file of an unmounted source; see the module doc."""
    root = Path(source)
    meta_dir = meta_dir_of(root)
    report = FsckReport(os.fspath(source), repair=repair)
    transform = stack.name_transform
    stamp = stamp or _utc_stamp()
    walk = _Walk(root)
    entries = sorted(walk)
    bar = _progress_bar(sum(st.st_size for _, st in entries), "fsck", progress)
    try:
        for rel, st in entries:
            name = os.path.basename(rel)
            if _is_temp(rel):
                found = FileReport(rel, [Problem("stale temporary file", "interrupted migrate")])
                if repair:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(root / rel)
                    found.repaired = True
                report.files.append(found)
                bar.update(st.st_size)
                continue
            if transform is not None and transform.is_bookkeeping(name):
                if name == transform.dir_key_name:
                    problem = _check_dir_key(transform, root / rel)
                    if problem is not None:
                        found = FileReport(rel, [problem])
                        if repair:
                            found.note = "not repairable (names in the directory pass through)"
                        report.files.append(found)
                bar.update(st.st_size)
                continue
            report.checked += 1
            try:
                fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except FileNotFoundError:
                report.checked -= 1
                continue
            except OSError as exc:
                report.files.append(FileReport(rel, [Problem("unreadable", exc.strerror or "")]))
                continue
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)

            try:
                formatted, found_or_none = _examine(stack, NativeFile(fd), advance)
                bad_xattrs = _check_xattrs(transform, fd) if transform is not None else []
                if bad_xattrs:
                    found_or_none = found_or_none or FileReport(rel, [], block_size=0)
                    found_or_none.problems += bad_xattrs
            except OSError as exc:
                formatted = False  # unknown
                found_or_none = FileReport(rel, [Problem("unreadable", exc.strerror or str(exc))])
            finally:
                os.close(fd)
            bar.update(max(0, st.st_size - done))
            report.formatted += int(formatted)
            if found_or_none is not None:
                found_or_none.path = rel
                if repair and found_or_none.damaged:
                    _repair_file(root, meta_dir, stack, found_or_none, stamp)
                report.files.append(found_or_none)
    finally:
        bar.close()
    for rel, reason in walk.errors:
        report.files.append(FileReport(rel, [Problem("unreadable", reason)]))
    return report


# ----------------------------------------------------------------------------- migrate


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
            f"{_n(len(self.migrated), 'file')} migrated ({_human(self.bytes)})",
            f"{self.formatted} already formatted",
        ]
        if self.hard_linked:
            parts.append(
                f"{len(self.hard_linked)} hard-linked skipped (migrating would split the link)"
            )
        if self.skipped:
            parts.append(f"{len(self.skipped)} skipped")
        if self.stale_removed:
            parts.append(f"{_n(len(self.stale_removed), 'stale temporary file')} removed")
        if self.failed:
            parts.append(f"{len(self.failed)} failed")
        return f"migrate {self.source}: " + ", ".join(parts)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}" if count == 1 else f"{count} {noun}s"


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{size} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"  # pragma: no cover


class _Skip(Exception):
    """This file is left as it is, for the reason given."""


def _data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the regions holding data; all of it when holes cannot be found."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # only a hole up to the end
                return
            yield offset, size
            return
        if start >= size:
            return
        end = min(os.lseek(fd, start, os.SEEK_HOLE), size)
        yield start, end
        offset = end


def _copy_into(
    src_fd: int, upper: RandomAccessFile, size: int, advance: Callable[[int], Any]
) -> None:
    """Copy `size` bytes through `upper` in CHUNK reads, leaving holes as holes."""
    done = 0
    for start, end in _data_ranges(src_fd, size):
        advance(start - done)
        position = start
        while position < end:
            chunk = os.pread(src_fd, min(CHUNK, end - position), position)
            if not chunk:
                raise _Skip("it shrank while being copied")
            upper.write(position, chunk)
            position += len(chunk)
            advance(len(chunk))
        done = end
    if upper.size() < size:
        upper.truncate(size)
    advance(size - done)


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
    dir_fd, name = _open_parent(root, rel)
    try:
        src_fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            return _migrate_open(dir_fd, name, src_fd, stack, advance)
        finally:
            os.close(src_fd)
    finally:
        os.close(dir_fd)


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
    temp = TEMP_PREFIX + os.urandom(6).hex()
    temp_fd = os.open(
        temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
        dir_fd=dir_fd,
    )  # fmt: skip
    renamed = False
    try:
        try:
            os.fchown(temp_fd, before.st_uid, before.st_gid)
        except PermissionError:
            raise _Skip("cannot give the new file the same owner (run as root)") from None
        upper = stack.create(NativeFile(temp_fd))
        _copy_into(src_fd, upper, before.st_size, advance)
        upper.flush()
        _copy_xattrs(src_fd, temp_fd)
        os.fchmod(temp_fd, stat.S_IMODE(before.st_mode))  # after chown, which clears set-id
        os.utime(temp_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
        os.fsync(temp_fd)
        after = os.fstat(src_fd)
        current = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if (after.st_size, after.st_mtime_ns, after.st_ctime_ns) != (
            before.st_size,
            before.st_mtime_ns,
            before.st_ctime_ns,
        ) or (current.st_dev, current.st_ino) != (before.st_dev, before.st_ino):
            raise _Skip("it changed while being copied")
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        renamed = True
        _fsync_dir(dir_fd)
    finally:
        os.close(temp_fd)
        if not renamed:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
    return "migrated", before.st_size


def migrate(
    source: str | os.PathLike[str],
    stack: Stack,
    *,
    progress: bool = False,
    warn: Warn | None = None,
) -> MigrateReport:
    """Format every plaintext regular file of an unmounted source in place (module doc)."""
    warn = warn or _default_warn
    root = Path(source)
    report = MigrateReport(os.fspath(source))
    transform = stack.name_transform
    walk = _Walk(root)
    candidates: list[tuple[str, int]] = []
    for rel, st in walk:
        name = os.path.basename(rel)
        if _is_temp(rel):
            try:
                os.unlink(root / rel)
            except FileNotFoundError:
                continue
            except OSError as exc:
                report.failed.append((rel, f"cannot remove stale temporary file: {exc.strerror}"))
                warn(f"{rel}: cannot remove stale temporary file: {exc.strerror}")
                continue
            report.stale_removed.append(rel)
            continue
        if transform is not None and transform.is_bookkeeping(name):
            continue
        if st.st_nlink > 1:
            report.hard_linked.append(rel)
            warn(f"{rel}: skipped, hard-linked ({st.st_nlink} links): would split the link")
            continue
        candidates.append((rel, st.st_size))
    for rel, reason in walk.errors:
        report.failed.append((rel, reason))
        warn(f"{rel}: cannot read: {reason}")
    bar = _progress_bar(sum(size for _, size in candidates), "migrate", progress)
    try:
        for rel, size in candidates:
            done = 0

            def advance(n: int) -> None:
                nonlocal done
                done += n
                bar.update(n)

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
            bar.update(max(0, size - done))
    finally:
        bar.close()
    return report


# ----------------------------------------------------------------------------- entry points


def fsck_source(
    source: str | os.PathLike[str],
    request: SetupRequest,
    *,
    repair: bool = False,
    force: bool = False,
    progress: bool = False,
) -> FsckReport:
    """`isofs fsck`: refuse a mounted source, lock, unlock the keys, check."""
    with _maintained_stack(source, request, force=force, lock_required=repair) as stack:
        return fsck(source, stack, repair=repair, progress=progress)


def migrate_source(
    source: str | os.PathLike[str],
    request: SetupRequest,
    *,
    force: bool = False,
    progress: bool = False,
    warn: Warn | None = None,
) -> MigrateReport:
    """`isofs migrate`: refuse a mounted source, lock, unlock the keys, format files."""
    with _maintained_stack(source, request, force=force, lock_required=True) as stack:
        return migrate(source, stack, progress=progress, warn=warn)


@contextlib.contextmanager
def _maintained_stack(
    source: str | os.PathLike[str], request: SetupRequest, *, force: bool, lock_required: bool
) -> Iterator[Stack]:
    """The common start of fsck and migrate: not mounted, locked, keys unlocked."""
    meta_dir = require_initialised(source)
    check_not_mounted(source, force=force)
    with exclusive(meta_dir, required=lock_required):
        stack = load_stack(meta_dir, request)
        if stack.is_identity:
            raise MaintenanceError(f"{os.fspath(source)} has an empty provider stack")
        yield stack
