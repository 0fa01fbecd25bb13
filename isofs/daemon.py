"""The mount daemon: checks, mounting, the trio main loop, clean shutdown.

`isofs mount` (without --foreground) starts this module's `serve` in a new session and waits
on a pipe until the daemon reports either "mounted" or a one-line error, so the command
returns only once the mount is live, and every error is reported by the command itself.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

import pyfuse3
import trio

from isofs import native
from isofs.fs import IsoFS
from isofs.runtime import MountRecord, is_mounted
from isofs.volume import Volume

log = logging.getLogger("isofs")


class MountError(Exception):
    """A reason not to mount, phrased as one line for the user."""


@dataclass
class MountOptions:
    source: str
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    allow_other: bool = False
    log_file: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


def check_mount(options: MountOptions) -> tuple[str, str]:
    """Validate source and mount point before anything changes; return their real paths."""
    source = os.path.realpath(options.source)
    mountpoint = os.path.realpath(options.mountpoint)
    try:
        source_stat = os.stat(source)
    except FileNotFoundError:
        raise MountError(f"source directory does not exist: {options.source}") from None
    except OSError as exc:
        raise MountError(f"cannot use source {options.source}: {exc.strerror}") from None
    if not stat.S_ISDIR(source_stat.st_mode):
        raise MountError(f"source is not a directory: {options.source}")
    try:
        mount_stat = os.stat(mountpoint)
    except FileNotFoundError:
        raise MountError(f"mount point does not exist: {options.mountpoint}") from None
    except OSError as exc:
        if exc.errno == errno.ENOTCONN:
            raise MountError(
                f"mount point {options.mountpoint} is a dead mount; run: isofs umount "
                f"{options.mountpoint}"
            ) from None
        raise MountError(f"cannot use mount point {options.mountpoint}: {exc.strerror}") from None
    if not stat.S_ISDIR(mount_stat.st_mode):
        raise MountError(f"mount point is not a directory: {options.mountpoint}")
    if is_mounted(mountpoint):
        raise MountError(f"mount point is already mounted: {options.mountpoint}")
    if source != mountpoint:
        if os.listdir(mountpoint):
            raise MountError(f"mount point is not empty: {options.mountpoint}")
        if mountpoint.startswith(source.rstrip("/") + "/"):
            raise MountError("mount point must not be inside the source (except the source itself)")
    if not os.path.exists("/dev/fuse"):
        raise MountError("/dev/fuse does not exist (is the fuse module loaded?)")
    if not os.access("/dev/fuse", os.R_OK | os.W_OK):
        raise MountError("no permission to use /dev/fuse")
    return source, mountpoint


def configure_logging(log_file: str | None, debug: bool) -> None:
    handler: logging.Handler
    handler = logging.FileHandler(log_file) if log_file else logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)


def serve(options: MountOptions, report: Callable[[str], None]) -> int:
    """Mount and serve until unmounted or signalled. `report` gets "mounted" or an error."""
    try:
        source, mountpoint = check_mount(options)
        root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except MountError as exc:
        report(str(exc))
        return 1
    os.umask(0)  # modes arrive already masked by the kernel; apply them exactly
    native.raise_fd_limit()
    volume = Volume(root_fd)
    operations = IsoFS(volume)
    fuse_options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    fuse_options |= {"fsname=isofs", "subtype=isofs"}
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.debug:
        fuse_options.add("debug")
    try:
        pyfuse3.init(operations, mountpoint, fuse_options)
    except RuntimeError as exc:
        report(f"cannot mount {options.mountpoint}: {exc}")
        os.close(root_fd)
        return 1
    _, default_log, control = MountRecord.paths_for(mountpoint)
    record = MountRecord(
        pid=os.getpid(),
        source=source,
        mountpoint=mountpoint,
        log=options.log_file or str(default_log),
        control=str(control),
    )
    record.save()
    log.info("mounted %s on %s (pid %d)", source, mountpoint, os.getpid())
    report("mounted")
    unmounted = False
    try:
        unmounted = trio.run(_main_loop)
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=not unmounted)
        volume.close()
        record.remove()
        log.info("unmounted %s", mountpoint)
    return 0


async def _main_loop() -> bool:
    """Serve requests; True when the kernel ended the session (external unmount)."""
    ended_by_kernel = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        await pyfuse3.main()
        ended_by_kernel = True
        nursery.cancel_scope.cancel()
    return ended_by_kernel


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return
