"""`isofs fsck`: verify every file of an unmounted source through its provider stack.

The checks belong to the layers (`Layer.verify`, `Layer.repair`; the API's defaults read
every block): this module walks the source, asks each layer of the stack in turn, bottom up,
about the file it sees, and reports the first layer that finds damage (what a damaged lower
layer makes the layers above it see is a consequence, not news). A name transform's own
bookkeeping (directory keys, transformed extended attributes) is checked here through the
`NameTransform` API.

`--repair` first copies the damaged file's native bytes to
`.isofs/lost+found/<path relative to the source>.<UTC timestamp>` (durably, before anything
else changes), then lets the damaged layer repair the file in place, so it keeps its inode,
hard links, owner, mode and extended attributes; the file is checked again afterwards.
Damage a layer cannot repair is only reported. Stale migrate temporary files are removed.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofs import durable
from isofs.core.sections import NativeFile
from isofs.maintenance.common import SourceWalk, plural
from isofs.provider import (
    CORRUPT_HEADER,
    CorruptData,
    Damage,
    Layer,
    NameTransform,
    RandomAccessFile,
    Stack,
)
from isofs.source import meta_dir_of

LOST_FOUND_NAME = "lost+found"
#: Bytes per copy when saving a damaged file aside.
COPY_CHUNK = 1 << 20

#: What fsck reports about a file: a layer's `Damage`, or one of the kinds below.
Problem = Damage
UNREADABLE = "unreadable"
STALE_TEMPORARY = "stale temporary file"
#: Kinds that do not make a file count as damaged.
NOT_DAMAGE = frozenset({UNREADABLE, STALE_TEMPORARY})


@dataclass
class FileReport:
    """What fsck found in one file (paths relative to the source, native names)."""

    path: str
    problems: list[Problem]
    block_size: int = 0
    repaired: bool = False
    lost_found: str | None = None
    note: str | None = None
    #: Which layer of the stack found the damage (repairs go to it).
    layer: int = field(default=0, repr=False)

    @property
    def kinds(self) -> list[str]:
        return [p.kind for p in self.problems]

    @property
    def damaged(self) -> bool:
        return any(kind not in NOT_DAMAGE for kind in self.kinds)

    @property
    def valid_native_size(self) -> int | None:
        """The native size a torn tail is cut back to, when the bottom layer found one."""
        if self.layer:
            return None
        return next((p.lower_size for p in self.problems if p.lower_size is not None), None)

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
                {
                    "kind": p.kind,
                    "detail": p.detail,
                    **({"blocks": p.blocks} if p.blocks else {}),
                }
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
            f"{plural(self.checked, 'file')} checked",
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


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def examine(
    stack: Stack, native: RandomAccessFile, advance: Callable[[int], Any]
) -> tuple[bool, FileReport | None]:
    """(formatted, what is wrong or None) for one native file, reading it completely."""
    current = native
    for index, layer in enumerate(stack.layers):
        try:
            formatted = layer.is_formatted(current)
        except CorruptData as exc:
            return True, _report(index, layer, [Damage(CORRUPT_HEADER, _reason(exc))])
        if not formatted:
            return False, None
        damage = layer.verify(current, advance if index == 0 else _ignore)
        if damage:
            return True, _report(index, layer, damage)
        current = layer.open(current)
    return True, None


def _ignore(_n: int) -> None:
    """Progress counts native bytes: only the bottom layer reports it."""


def _report(index: int, layer: Layer, damage: list[Damage]) -> FileReport:
    block = next((d.block_size for d in damage if d.block_size), 0) or layer.block_size
    return FileReport("", damage, block_size=block, layer=index)


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
    dir_fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with durable.new_file(dir_fd, dest.name, exclusive=True) as fd:
            copy = NativeFile(fd)
            offset = 0
            while chunk := os.pread(src_fd, COPY_CHUNK, offset):
                copy.write(offset, chunk)
                offset += len(chunk)
            st = os.fstat(src_fd)
            os.utime(fd, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(dir_fd)
    return os.path.relpath(dest, meta_dir.parent)


def _repair_file(root: Path, meta_dir: Path, stack: Stack, report: FileReport, stamp: str) -> None:
    """Let the damaged layer repair the file, after copying the original to lost+found."""
    unfixable = sorted({p.kind for p in report.problems if not p.repairable})
    if unfixable or not report.problems:
        report.note = f"not repairable ({', '.join(unfixable or report.kinds)})"
        return
    path = root / report.path
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        report.note = f"not repaired: {exc.strerror}"
        return
    try:
        report.lost_found = _copy_aside(meta_dir, report.path, fd, stamp)
        lowers: list[RandomAccessFile] = [NativeFile(fd)]
        for layer in stack.layers[: report.layer]:
            lowers.append(layer.open(lowers[-1]))
        stack.layers[report.layer].repair(lowers[-1], report.problems)
        for lower in reversed(lowers):
            lower.flush()
        os.fsync(fd)
        _, again = examine(stack, NativeFile(fd), _ignore)
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
    walk = SourceWalk(root, transform)
    for item, advance in walk.each(walk.files(), "fsck", progress):
        if item.kind == "temporary":
            found = FileReport(item.rel, [Problem(STALE_TEMPORARY, "interrupted migrate")])
            if repair:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(root / item.rel)
                found.repaired = True
            report.files.append(found)
        elif item.kind == "dir key":
            assert transform is not None
            problem = _check_dir_key(transform, root / item.rel)
            if problem is not None:
                found = FileReport(item.rel, [problem])
                if repair:
                    found.note = "not repairable (names in the directory pass through)"
                report.files.append(found)
        elif item.kind == "file":
            _check_file(root, meta_dir, stack, item.rel, advance, report, repair, stamp)
    for rel, reason in walk.errors:
        report.files.append(FileReport(rel, [Problem(UNREADABLE, reason)]))
    return report


def _check_file(
    root: Path,
    meta_dir: Path,
    stack: Stack,
    rel: str,
    advance: Callable[[int], None],
    report: FsckReport,
    repair: bool,
    stamp: str,
) -> None:
    try:
        fd = os.open(root / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        report.checked += 1
        report.files.append(FileReport(rel, [Problem(UNREADABLE, exc.strerror or "")]))
        return
    report.checked += 1
    transform = stack.name_transform
    try:
        formatted, found = examine(stack, NativeFile(fd), advance)
        bad_xattrs = _check_xattrs(transform, fd) if transform is not None else []
        if bad_xattrs:
            found = found or FileReport(rel, [], block_size=0)
            found.problems += bad_xattrs
    except OSError as exc:
        formatted = False  # unknown
        found = FileReport(rel, [Problem(UNREADABLE, exc.strerror or str(exc))])
    finally:
        os.close(fd)
    report.formatted += int(formatted)
    if found is not None:
        found.path = rel
        if repair and found.damaged:
            _repair_file(root, meta_dir, stack, found, stamp)
        report.files.append(found)
