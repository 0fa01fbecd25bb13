"""The mount daemon: checks, mounting, the trio main loop, clean shutdown.

`isofs mount` (without --foreground) starts this module's `serve` in a new session and waits
on a pipe until the daemon reports either "mounted" or a one-line error, so the command
returns only once the mount is live, and every error is reported by the command itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import resource
import signal
import stat
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from isofs.core import native
from isofs.core.pagecache import DEFAULT_BUDGET, PageCache
from isofs.core.sizecache import DB_FILE_NAME, SizeCache
from isofs.core.volume import Timeouts, Volume
from isofs.daemon import namespaces
from isofs.daemon.control import serve_control
from isofs.daemon.runtime import MountRecord, is_mounted, mount_device
from isofs.daemon.targetview import TargetView
from isofs.fuse.entries import EntryBudget, default_budget
from isofs.fuse.operations import IsoFS, KernelInvalidator
from isofs.provider import ProviderError, SecretSource, SetupRequest, Stack
from isofs.source import META_DIR_NAME, load_stack
from isofs.views.callers import CallerResolver
from isofs.views.config import ConfigError, build_policy
from isofs.views.execgroups import exec_rules
from isofs.views.gate import ViewGate
from isofs.views.policy import VIEW_TARGET, Policy

log = logging.getLogger("isofs")

PR_SET_DUMPABLE = 4
# glibc mallopt() parameters.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: Request-sized buffers (1 MiB reads and writes, their ciphertext) come from the heap and
#: are reused: served by fresh mmap()s, every request paid ~800 page faults and zeroing.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 128 << 20
#: glibc (2.35+) backs the malloc heap with transparent huge pages where the kernel allows
#: them on request: the page cache's first fill then costs one fault per 2 MiB instead of one
#: per 4 KiB (cold 1 GiB reads on a fresh daemon: ~690 -> ~800 MiB/s measured). It has to be
#: in the environment when the process starts, so `isofs mount` sets it for the daemon.
HEAP_TUNABLE = "glibc.malloc.hugetlb=1"
READAHEAD_KB = 1024
#: The page cache's budget unless `--cache-size` says otherwise.
DEFAULT_CACHE_SIZE = DEFAULT_BUDGET
#: Seconds dirty pages may wait before the daemon writes them back on its own.
WRITE_BACK_INTERVAL = 5.0


class MountError(Exception):
    """A reason not to mount, phrased as one line for the user."""


@dataclass
class MountOptions:
    source: str
    mountpoint: str
    foreground: bool = False
    debug: bool = False
    allow_other: bool = False
    read_only: bool = False
    log_file: str | None = None
    policy_file: str | None = None
    targets: list[str] = field(default_factory=list)
    ignores: list[str] = field(default_factory=list)
    default_view: str | None = None
    exec_views: bool = True
    cache_size: int = DEFAULT_CACHE_SIZE
    #: Entries the kernel may remember (None: from the open-files limit, isofs.fuse.entries).
    max_inodes: int | None = None
    keyfile: str | None = None
    secrets: SecretSource | None = None
    #: Mount options of the stack's providers, by provider name (typed and checked).
    provider_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    #: This daemon is a shared mount's target-view daemon (targetview.py).
    view_daemon: bool = False
    #: The command line of this mount's target-view daemon, given its ready and secrets fds.
    target_view_argv: Callable[[int, int], list[str]] | None = None

    def own_policy(self) -> Policy:
        """The policy the mount was given (files and flags), without `isofs exec` groups."""
        return build_policy(self.policy_file, self.targets, self.ignores, self.default_view)

    def policy(self) -> Policy:
        """The shared mount's policy: the exec groups first (unless --no-exec), then its own.

        Except when its own policy gives every process the target view: `isofs exec --view
        native` has a namespace of its own where the mount point is the source (§9), so
        nobody needs another view from this mount, and it stays a one-view mount (names and
        attributes cacheable, no caller resolution). Any other mount keeps honouring the
        groups: `isofs exec --view target` falls back to them when it cannot tell which
        mount's target-view daemon to enter, and must never land in the native view.
        """
        own = self.own_policy()
        if not self.exec_views or (own.is_single_view and VIEW_TARGET in own.views):
            return own
        return self.exec_policy(own)

    def exec_policy(self, own: Policy | None = None) -> Policy:
        """Exec groups first, then the mount's rules: who a target-view daemon admits."""
        own = own or self.own_policy()
        return Policy(rules=exec_rules() + own.rules, default_view=own.default_view)

    @property
    def wants_target_view_daemon(self) -> bool:
        """A target-view daemon helps unless exec is off or everybody is a target already."""
        own = self.own_policy()
        return self.exec_views and not (own.is_single_view and VIEW_TARGET in own.views)

    def setup_request(self) -> SetupRequest:
        options = {"keyfile": self.keyfile} if self.keyfile else {}
        return SetupRequest(options=options, secrets=self.secrets)


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


def open_source(options: MountOptions) -> tuple[str, str, int, Path | None, Stack, Policy]:
    """Everything that can fail before mounting: paths, policy, stack and keys."""
    source, mountpoint = check_mount(options)
    policy = options.policy()
    root_fd = os.open(source, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        meta_fd = os.open(META_DIR_NAME, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=root_fd)
    except FileNotFoundError:
        return source, mountpoint, root_fd, None, Stack([]), policy
    # Reach the metadata through our descriptor: an in-place mount covers the path.
    meta_dir = Path(native.proc_path(meta_fd))
    try:
        stack = load_stack(meta_dir, options.setup_request(), options.provider_options)
    except BaseException:
        os.close(root_fd)
        os.close(meta_fd)
        raise
    return source, mountpoint, root_fd, meta_dir, stack, policy


def serve(options: MountOptions, report: Callable[[str], None]) -> int:
    """Mount and serve until unmounted or signalled. `report` gets "mounted" or an error."""
    if options.view_daemon:  # a namespace of its own, where the shared mount is detached
        try:
            namespaces.private_namespace()
            namespaces.detach(os.path.realpath(options.mountpoint))
        except namespaces.NamespaceError as exc:
            report(str(exc))
            return 1
    try:
        source, mountpoint, root_fd, meta_dir, stack, policy = open_source(options)
    except (MountError, ConfigError, ProviderError) as exc:
        report(str(exc))
        return 1
    os.umask(0)  # modes arrive already masked by the kernel; apply them exactly
    _keep_secrets_out_of_dumps()
    _reuse_large_buffers()
    open_files = native.raise_fd_limit()
    # A read-only mount writes nothing to the source: sizes it learns stay in memory.
    persistent = meta_dir is not None and not stack.is_identity and not options.read_only
    sizes = SizeCache(meta_dir / DB_FILE_NAME if persistent else None)
    invalidator = KernelInvalidator()
    gate = None
    if options.view_daemon:  # one view for every lookup; content only for its callers
        policy = Policy(default_view=VIEW_TARGET)
        gate = ViewGate(options.exec_policy(), CallerResolver(), VIEW_TARGET)
    volume = Volume(
        root_fd,
        stack=stack,
        policy=policy,
        resolver=None if policy.is_single_view else CallerResolver(),
        cache=PageCache(options.cache_size),
        sizes=sizes,
        invalidate=invalidator.submit,
        read_only=options.read_only,
        timeouts=options.timeouts,
    )
    entries = EntryBudget(options.max_inodes or default_budget(open_files),
                          invalidator.drop_entries)  # fmt: skip
    operations = IsoFS(volume, debug=options.debug, gate=gate, entries=entries)
    fuse_options = set(pyfuse3.default_options)  # default_permissions: the kernel checks modes
    fuse_options |= {"fsname=isofs", "subtype=isofs"}
    if options.allow_other:
        fuse_options.add("allow_other")
    if options.read_only:
        fuse_options.add("ro")  # the kernel refuses every change with EROFS
    try:
        pyfuse3.init(operations, mountpoint, fuse_options)
    except RuntimeError as exc:
        report(f"cannot mount {options.mountpoint}: {exc}")
        volume.close()
        stack.close()
        return 1
    invalidator.start()
    _, default_log, control = MountRecord.paths_for(mountpoint)
    record = MountRecord(
        pid=os.getpid(),
        source=source,
        mountpoint=mountpoint,
        log=options.log_file or str(default_log),
        control=str(control),
    )
    target_view = None
    if options.view_daemon:
        control_path = None  # the shared mount's daemon speaks for the mount point
    else:
        record.save()
        control_path = str(control)
        if options.wants_target_view_daemon and options.target_view_argv is not None:
            given = getattr(options.secrets, "given", None) or {}
            target_view = TargetView(
                options.target_view_argv, dict(given), record.log, daemon_environment()
            )
    log.info(
        "mounted %s on %s (pid %d): stack [%s], views %s%s",
        source, mountpoint, os.getpid(),
        ", ".join(type(layer).__name__ for layer in stack.layers),
        "/".join(sorted(policy.views)),
        " (target-view daemon, own mount namespace)" if options.view_daemon else "",
    )  # fmt: skip
    unmounted = False
    try:
        started = time.monotonic()

        def status() -> dict[str, object]:
            return {
                "source": source,
                "mountpoint": mountpoint,
                "pid": os.getpid(),
                "uptime_s": round(time.monotonic() - started, 1),
                "log": record.log,
                **volume.status(),
                "invalidations": invalidator.done,
                **entries.status(),
                "target_view_daemon": target_view.pid if target_view else None,
                **operations.stats.snapshot(),
            }

        commands = {"target-namespace": target_view.ensure} if target_view else {}
        unmounted = trio.run(
            _main_loop, volume, mountpoint, control_path, status, commands, report
        )
    except BaseException:
        log.exception("daemon failed")
        raise
    finally:
        if target_view is not None:
            target_view.stop()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=not unmounted)
        invalidator.stop()
        volume.close()
        stack.close()
        sizes.close()
        if not options.view_daemon:
            record.remove()
        log.info("unmounted %s", mountpoint)
    return 0


async def _raise_readahead(mountpoint: str) -> None:
    """Ask the kernel for 1 MiB read requests instead of 128 KiB (measured ~1.5x cold reads).

    The knob is the mount's backing-device readahead; only root may set it. Best effort. The
    kernel clamps it when it processes FUSE_INIT, so it is set once the session runs; the
    device comes from the mount table (a stat() of the mount point would be a request to
    this very daemon).
    """
    device = mount_device(mountpoint)
    if device is None:
        return
    knob = f"/sys/class/bdi/{device}/read_ahead_kb"
    for _ in range(20):
        await trio.sleep(0.05)
        try:
            with open(knob, "r+") as f:
                if int(f.read()) >= READAHEAD_KB:
                    return
                f.seek(0)
                f.write(str(READAHEAD_KB))
        except (OSError, ValueError) as exc:
            log.info("read-ahead left at the kernel default: %s", exc)
            return


def _keep_secrets_out_of_dumps() -> None:
    """Keys live in this process: no core dumps, and no ptrace or /proc/PID/mem by others."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("cannot mark the daemon non-dumpable: %s", os.strerror(ctypes.get_errno()))


def daemon_environment() -> dict[str, str]:
    """The environment to start a daemon in: this one, plus the heap tunable."""
    env = dict(os.environ)
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        tunables.append(HEAP_TUNABLE)
    env["GLIBC_TUNABLES"] = ":".join(tunables)
    return env


def _reuse_large_buffers() -> None:
    """Keep large allocations on the heap (best effort: glibc only)."""
    libc = ctypes.CDLL(None)
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is not None:
        mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)


async def _main_loop(
    volume: Volume,
    mountpoint: str,
    control: str | None,
    status: Callable[[], dict[str, object]],
    commands: dict[str, Callable[[], Awaitable[dict[str, Any]]]],
    report: Callable[[str], None],
) -> bool:
    """Serve requests; True when the kernel ended the session (external unmount).

    "mounted" is reported once the control socket listens, so `isofs status` right after
    `isofs mount` returns always finds it.
    """
    ended_by_kernel = False
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signals, nursery.cancel_scope)
        nursery.start_soon(_write_back_periodically, volume)
        if control is not None:
            await nursery.start(serve_control, control, status, commands)
        report("mounted")
        nursery.start_soon(_raise_readahead, mountpoint)
        await pyfuse3.main()
        ended_by_kernel = True
        nursery.cancel_scope.cancel()
    with trio.CancelScope(shield=True):
        await volume.flush_all()
    return ended_by_kernel


async def _write_back_periodically(volume: Volume) -> None:
    """Bound how long written data waits in the page cache, and persist learned sizes."""
    while True:
        await trio.sleep(WRITE_BACK_INTERVAL)
        try:
            await volume.flush_all()
            await trio.to_thread.run_sync(volume.sizes.flush)
        except OSError as exc:
            log.error("periodic write-back failed: %s", exc)


async def _stop_on_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("received %s: unmounting", signal.Signals(signum).name)
            scope.cancel()
            return
