"""Names of a transformed view <-> native names, per directory (file-name encryption).

The provider's `NameTransform` does the cryptography; this module does the filesystem side:
it keeps each directory's key (read once from the key file inside the directory, created on the
first name a transformed view creates there), writes and removes long-name sidecars, and
passes through native names that are not transformed names (files that existed before init,
or that a native-view process created), exactly as unformatted file contents pass through.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from collections.abc import Iterator

from isofs import durable
from isofs.core.native import open_keeping_atime, set_times
from isofs.provider import CorruptData, NameTransform

log = logging.getLogger(__name__)

#: How many recent name encryptions `ViewNames` remembers (cleared when full).
RECENT_NATIVE_NAMES = 1024


def _read_small(dir_fd: int, name: str) -> bytes:
    """A key file or sidecar: the daemon's own read, so the file's atime stays as it was."""
    fd = open_keeping_atime(dir_fd, name, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _write_new(dir_fd: int, name: str, data: bytes) -> None:
    """Create a small file durably and whole (isofs.durable): its absence, or a short one (a
    full disk), would make every name of its directory unreadable. FileExistsError when it
    appeared meanwhile."""
    durable.replace_at(dir_fd, name, data, mode=0o444, exclusive=True)


def _open_directory(parent_fd: int, name: str) -> int | None:
    """A descriptor to list directory `name`; None when there is none (or it is no directory)."""
    try:
        return open_keeping_atime(parent_fd, name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


class ViewNames:
    """The name side of one transformed view, with a cache of directory keys."""

    def __init__(self, transform: NameTransform) -> None:
        self.transform = transform
        self._keys: dict[int, bytes] = {}
        #: Recent (directory key, view name) -> transform.to_native: a create follows the
        #: lookup that missed the same name, and deterministic encryption gives the same answer.
        self._recent_native: dict[tuple[bytes, str], tuple[str, bytes | None]] = {}

    def _to_native(self, key: bytes, name: str) -> tuple[str, bytes | None]:
        found = self._recent_native.get((key, name))
        if found is None:
            found = self.transform.to_native(key, name)
            if len(self._recent_native) >= RECENT_NATIVE_NAMES:
                self._recent_native.clear()
            self._recent_native[(key, name)] = found
        return found

    # ------------------------------------------------------------------- keys

    def dir_key(self, dir_number: int, dir_fd: int, *, create: bool = False) -> bytes | None:
        """The directory's key; None when it has none (and `create` is false)."""
        key = self._keys.get(dir_number)
        if key is not None:
            return key
        try:
            key = self.transform.parse_dir_key(_read_small(dir_fd, self.transform.dir_key_name))
        except FileNotFoundError:
            if not create:
                return None
            key = self.transform.new_dir_key()
            try:
                _write_new(dir_fd, self.transform.dir_key_name, key)
            except FileExistsError:  # created concurrently behind our back: use that one
                return self.dir_key(dir_number, dir_fd)
        self._keys[dir_number] = key
        return key

    def forget(self, dir_number: int) -> None:
        self._keys.pop(dir_number, None)

    def init_directory(self, dir_number: int, dir_fd: int) -> None:
        """Give a directory just created through the transformed view its key."""
        self.dir_key(dir_number, dir_fd, create=True)

    # ------------------------------------------------------------------ lookups

    def candidates(self, dir_number: int, dir_fd: int, name: str) -> list[str]:
        """Native names that may hold view name `name`, most likely first."""
        if self._bookkeeping(name):
            return []
        key = self.dir_key(dir_number, dir_fd)
        if key is None:
            return [name]
        try:
            native, _ = self._to_native(key, name)
        except ValueError:
            raise OSError(errno.ENAMETOOLONG, name) from None
        return [native, name]

    def resolve(self, dir_number: int, dir_fd: int, name: str) -> str:
        """The native name of an existing entry, or FileNotFoundError."""
        return self.resolve_stat(dir_number, dir_fd, name)[0]

    def resolve_stat(
        self, dir_number: int, dir_fd: int, name: str
    ) -> tuple[str, os.stat_result]:
        """The native name of an existing entry and its lstat (so the caller need not stat
        it again), or FileNotFoundError."""
        for native in self.candidates(dir_number, dir_fd, name):
            try:  # the stat first: a miss (every create's lookup) then decrypts nothing
                st = os.stat(native, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            if native == name and not self._is_plain(dir_number, dir_fd, name):
                continue  # a transformed name: its view name is another one
            return native, st
        raise FileNotFoundError(errno.ENOENT, name)

    def _is_plain(self, dir_number: int, dir_fd: int, native: str) -> bool:
        return self.to_view(dir_number, dir_fd, native) == native

    def to_view(self, dir_number: int, dir_fd: int, native: str) -> str | None:
        """The name the view shows for a native entry; None for bookkeeping files."""
        if self._bookkeeping(native):
            return None
        key = self.dir_key(dir_number, dir_fd)
        if key is None:
            return native
        sidecar_name = self.transform.sidecar_name(native)
        try:
            sidecar = _read_small(dir_fd, sidecar_name) if sidecar_name else None
            return self.transform.to_view(key, native, sidecar)
        except (CorruptData, FileNotFoundError):
            return native  # not a transformed name: passed through like unformatted data

    def _bookkeeping(self, native: str) -> bool:
        """The transform's key files and sidecars, and the temporary files that write them
        whole (isofs.durable): no transformed view shows them."""
        return self.transform.is_bookkeeping(native) or native.startswith(durable.TEMP_PREFIX)

    # ----------------------------------------------------------------- symlinks

    def link_to_native(self, target: bytes) -> bytes:
        try:
            return self.transform.link_to_native(target)
        except ValueError as exc:
            raise OSError(errno.ENAMETOOLONG, str(exc)) from None

    def link_to_view(self, stored: bytes) -> bytes:
        """The target a view shows; a target that is not transformed passes through."""
        try:
            return self.transform.link_to_view(stored)
        except CorruptData:
            return stored

    # ------------------------------------------------------------------- xattrs
    # Extended attributes of a file reached through `path`. A native attribute that is not
    # transformed (set before init, or by a native-view process) passes through, like names.

    def get_xattr(self, path: str | int, name: bytes) -> bytes:
        """`path`: a /proc/self/fd path, or a descriptor open for I/O."""
        native = self._xattr_native_name(name)
        if native != name:
            try:
                stored = os.getxattr(path, native)
            except OSError as exc:
                if exc.errno != errno.ENODATA:
                    raise
            else:
                try:
                    return self.transform.xattr_value_to_view(native, stored)
                except CorruptData as exc:
                    shown = path if isinstance(path, str) else f"/proc/self/fd/{path}"
                    where = os.path.realpath(shown)
                    log.error("%s: xattr %r: %s", where, name, exc.strerror)
                    raise OSError(errno.EIO, exc.strerror) from None
        return os.getxattr(path, name)

    def set_xattr(self, path: str, name: bytes, value: bytes) -> None:
        """Store transformed; a pass-through attribute of that name is replaced, not kept
        next to it in clear."""
        native = self._xattr_native_name(name)
        os.setxattr(path, native, self.transform.xattr_value_to_native(native, value))
        if native != name:
            with contextlib.suppress(OSError):
                os.removexattr(path, name)

    def list_xattrs(self, path: str) -> list[bytes]:
        shown: dict[bytes, None] = {}
        for stored in map(os.fsencode, os.listxattr(path)):
            try:
                shown[self.transform.xattr_name_to_view(stored)] = None
            except CorruptData:
                shown[stored] = None
        return list(shown)

    def remove_xattr(self, path: str, name: bytes) -> None:
        native = self._xattr_native_name(name)
        try:
            os.removexattr(path, native)
        except OSError as exc:
            if native == name or exc.errno != errno.ENODATA:
                raise
            os.removexattr(path, name)

    def _xattr_native_name(self, name: bytes) -> bytes:
        try:
            return self.transform.xattr_name_to_native(name)
        except ValueError:
            raise OSError(errno.ERANGE, "attribute name too long once transformed") from None

    # ------------------------------------------------------------------ changes

    def create(self, dir_number: int, dir_fd: int, name: str) -> str:
        """The native name for a new entry, writing its sidecar first if it needs one."""
        if self.transform.is_bookkeeping(name):
            raise OSError(errno.EACCES, f"{name} is reserved")
        key = self.dir_key(dir_number, dir_fd, create=True)
        assert key is not None
        try:
            native, sidecar = self._to_native(key, name)
        except ValueError:
            raise OSError(errno.ENAMETOOLONG, name) from None
        sidecar_name = self.transform.sidecar_name(native)
        if sidecar is not None and sidecar_name is not None:
            with contextlib.suppress(FileExistsError):
                _write_new(dir_fd, sidecar_name, sidecar)
        return native

    def removed(self, dir_fd: int, native: str) -> None:
        """An entry is gone: drop its sidecar (if no entry of that name remains)."""
        sidecar_name = self.transform.sidecar_name(native)
        if sidecar_name is not None and not _exists(dir_fd, native):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(sidecar_name, dir_fd=dir_fd)

    @contextlib.contextmanager
    def emptied(self, parent_fd: int, native_name: str) -> Iterator[None]:
        """Make directory `native_name` natively empty for an operation that needs it so
        (rmdir, a rename over it) when the view shows it empty.

        ENOTEMPTY when it holds any entry a view shows (a long name's stub included);
        otherwise its bookkeeping files (orphan sidecars, then the key file) are removed
        first and put back, contents and the directory's times, if the operation fails. A
        crash between the steps leaves an empty directory without a key file, which every
        view shows empty and which gets a new key with the first name created in it; a name
        a native process put there meanwhile is shown as itself (no key: nothing to decrypt).
        Anything that is not a directory is left to the operation to refuse.
        """
        fd = _open_directory(parent_fd, native_name)
        if fd is None:
            yield
            return
        try:
            entries = os.listdir(fd)
            if any(not self.transform.is_bookkeeping(n) for n in entries):
                raise OSError(errno.ENOTEMPTY, os.strerror(errno.ENOTEMPTY), native_name)
            key_name = self.transform.dir_key_name
            entries.sort(key=lambda n: n == key_name)  # the key file goes last
            saved = {n: _read_small(fd, n) for n in entries}
            times = os.fstat(fd)
            for n in entries:
                os.unlink(n, dir_fd=fd)
            try:
                yield
            except BaseException:
                self._put_back(fd, native_name, saved, times)
                raise
        finally:
            os.close(fd)

    @staticmethod
    def _put_back(
        fd: int, native_name: str, saved: dict[str, bytes], times: os.stat_result
    ) -> None:
        """Restore what `emptied` removed; a failure here leaves the crash state (no key)."""
        try:
            for n in reversed(saved):  # the key file first
                with contextlib.suppress(FileExistsError):
                    _write_new(fd, n, saved[n])
            with contextlib.suppress(PermissionError):
                set_times(fd, times.st_atime_ns, times.st_mtime_ns)
        except OSError as exc:
            log.error("%s: cannot put its key file back: %s", native_name, exc)
