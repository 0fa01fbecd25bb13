"""Mount namespaces for `isofs exec`: views without the per-process machinery (ARCHITECTURE §9).

`isofs exec --view native -- CMD` runs CMD in a private mount namespace in which every isofs
mount point is the source directory itself (the FUSE mount detached there, the source bound in
its place; an in-place mount's covered directory simply shows again): CMD reads native bytes at
native speed, with no FUSE in the way. `isofs exec --view target -- CMD` enters the namespace
of the mount's target-view daemon, where the mount point is a one-view target mount whose
names and attributes the kernel may cache.

Everything here needs CAP_SYS_ADMIN (as joining a view group does): an unprivileged process
can neither enter nor leave these namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path

from isofs.daemon import runtime
from isofs.mountinfo import mount_table

CLONE_NEWNS = 0x00020000
MS_BIND = 0x1000
MS_REC = 0x4000
MS_SLAVE = 1 << 19
MNT_DETACH = 2
MOUNT_TYPE = "fuse.isofs"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = (ctypes.c_char_p,) * 3 + (ctypes.c_ulong, ctypes.c_void_p)


class NamespaceError(Exception):
    """Why a view's namespace cannot be made or entered; one line."""


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        if err == errno.EPERM:
            raise NamespaceError(f"{what}: not allowed (isofs exec needs root)")
        raise NamespaceError(f"{what}: {os.strerror(err)}")


def _mount(source: str | None, target: str, flags: int) -> None:
    _check(
        _libc.mount(os.fsencode(source) if source else None, os.fsencode(target), None, flags,
                    None),
        f"mount {target}",
    )  # fmt: skip


@dataclass(frozen=True)
class IsofsMount:
    mountpoint: str
    source: str
    pid: int
    control: str


def _mounted_isofs() -> list[str]:
    """Mount points of every isofs mount this process sees, live or not."""
    return [e.mountpoint for e in mount_table() if e.fstype == MOUNT_TYPE]


def isofs_mounts(mounted: list[str] | None = None) -> list[IsofsMount]:
    """The isofs mounts this process sees (or among `mounted`) whose daemons left a record,
    deepest first."""
    mounted_set = set(_mounted_isofs() if mounted is None else mounted)
    found: dict[str, IsofsMount] = {}
    bases = {Path("/run/isofs")}
    with contextlib.suppress(OSError):
        bases.add(runtime.runtime_dir())
    for base in bases:
        for path in sorted(base.glob("*.json")) if base.is_dir() else []:
            try:
                record = json.loads(path.read_text())
                mount = IsofsMount(
                    record["mountpoint"], record["source"], int(record["pid"]), record["control"]
                )
            except (OSError, ValueError, KeyError, TypeError):
                continue
            if mount.mountpoint in mounted_set and runtime.pid_alive(mount.pid):
                found[mount.mountpoint] = mount
    return sorted(found.values(), key=lambda m: m.mountpoint.count("/"), reverse=True)


def private_namespace() -> None:
    """Give this process a mount namespace of its own whose changes stay in it."""
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", MS_REC | MS_SLAVE)


def detach(mountpoint: str) -> None:
    """Detach the mount at `mountpoint` in this process's (private) namespace only."""
    _check(_libc.umount2(os.fsencode(mountpoint), MNT_DETACH), f"detach {mountpoint}")


def enter_target_view() -> str | None:
    """Enter the mount namespace of the target-view daemon of the isofs mount the working
    directory is in (or of the only isofs mount); returns its mount point, or None when there
    is no such mount (the view group then does the work, through the shared mount)."""
    from isofs.daemon.control import request

    cwd = _cwd()
    mounts = isofs_mounts()
    inside = [m for m in mounts if cwd and (cwd + "/").startswith(m.mountpoint.rstrip("/") + "/")]
    chosen = inside[0] if inside else (mounts[0] if len(mounts) == 1 else None)
    if chosen is None:
        return None
    try:
        reply = request(chosen.control, "target-namespace", timeout=90)
    except (OSError, ValueError) as exc:
        raise NamespaceError(f"{chosen.mountpoint}: daemon does not answer: {exc}") from None
    if "pid" not in reply:
        if "unknown" in str(reply.get("error", "")):
            return None  # a mount without target-view daemon (--no-exec, or all targets)
        raise NamespaceError(f"{chosen.mountpoint}: {reply.get('error', reply)}")
    try:
        fd = os.open(f"/proc/{int(reply['pid'])}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise NamespaceError(f"cannot reach the target-view namespace: {exc.strerror}") from None
    try:
        _check(_libc.setns(fd, CLONE_NEWNS), "setns")
    finally:
        os.close(fd)
    _rechdir(cwd)
    return chosen.mountpoint


def enter_native_view() -> list[str]:
    """Make every isofs mount point show its source directory in a new private namespace;
    returns the mount points changed. The working directory is looked up again after."""
    cwd = _cwd()
    mounted = _mounted_isofs()
    mounts = isofs_mounts(mounted)
    live = {m.mountpoint for m in mounts}
    # A mount whose daemon is gone answers ENOTCONN; with no record its source is unknown,
    # so it is only detached (an in-place mount's source then shows again).
    dead = [mountpoint for mountpoint in mounted if mountpoint not in live]
    private_namespace()
    for mountpoint in dead:
        with contextlib.suppress(NamespaceError):
            detach(mountpoint)
    for mount in mounts:
        detach(mount.mountpoint)
        if os.path.realpath(mount.source) != mount.mountpoint:
            _mount(mount.source, mount.mountpoint, MS_BIND | MS_REC)
    _rechdir(cwd)
    return [m.mountpoint for m in mounts]


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except OSError:
        return None


def _rechdir(cwd: str | None) -> None:
    """Re-resolve the working directory: it may have been inside a detached mount."""
    if cwd is not None:
        try:
            os.chdir(cwd)
        except OSError:
            os.chdir("/")
