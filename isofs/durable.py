"""Durable file replacement: the one way isofs writes a file that must survive a crash whole.

Write a temporary file in the same directory, fsync it, rename it over the final name (or link
it there, when the name must not exist yet), fsync the directory. A crash at any point leaves
the old file or the new one, never a mix or neither, plus at worst a stale temporary file
whose prefix says who left it. A failure (a full disk) removes the temporary file again and
leaves the old file untouched.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from pathlib import Path

#: Prefix of the temporary files this module creates unless told otherwise.
TEMP_PREFIX = ".isofs-tmp."


def fsync_directory(directory: int | str | os.PathLike[str]) -> None:
    """Make a directory's entries (a rename, a new name) durable."""
    if isinstance(directory, int):
        try:
            os.fsync(directory)
            return
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
        directory = f"/proc/self/fd/{directory}"  # an O_PATH descriptor: open it for real
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def new_file(
    dir_fd: int,
    name: str,
    *,
    mode: int = 0o600,
    exclusive: bool = False,
    temp_prefix: str = TEMP_PREFIX,
) -> Iterator[int]:
    """Yield a descriptor of a temporary file that becomes `name` in `dir_fd` on success.

    On leaving the block normally the file is fsynced and renamed over `name` (or, with
    `exclusive`, linked to it: FileExistsError if `name` exists meanwhile), and the directory
    is fsynced. On an exception the temporary file is removed and `name` is untouched.
    """
    temp = temp_prefix + os.urandom(6).hex()
    fd = os.open(
        temp,
        os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        yield fd
        os.fsync(fd)
        if exclusive:
            os.link(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd, follow_symlinks=False)
            os.unlink(temp, dir_fd=dir_fd)
        else:
            os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        fsync_directory(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """pwrite until every byte is written (a short write is retried, ENOSPC raised)."""
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write all of `data` to a new file. A short write to a regular file means a full disk:
    it is an error (ENOSPC), so that the caller's file is never left short."""
    if os.write(fd, data) != len(data):
        raise OSError(errno.ENOSPC, "short write: no space left on device")


def replace_at(
    dir_fd: int, name: str, data: bytes, *, mode: int = 0o600, exclusive: bool = False
) -> None:
    """Durably give `name` in `dir_fd` the content `data` (see `new_file`)."""
    with new_file(dir_fd, name, mode=mode, exclusive=exclusive) as fd:
        write_all(fd, data)


def replace(path: str | os.PathLike[str], data: bytes, *, mode: int = 0o600) -> None:
    """Durably give the file at `path` the content `data`."""
    path = Path(path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        replace_at(dir_fd, path.name, data, mode=mode)
    finally:
        os.close(dir_fd)
