#!/usr/bin/env python3
"""isofs benchmark suite: the native directory against FUSE contenders, in one run.

Every workload ("row") runs on every contender in the same run; the contender order
is rotated between repetitions and the median of the repetitions is reported, with
ratios against the native directory (and isofs against the minimal pyfuse3
passthrough). It is a benchmark, not a test: nothing here asserts on timings.

    python bench/run.py [--quick] [--only ROWS] [--contenders LIST] [--repeat N]
                        [--cpu N] [--json FILE] [--workdir DIR]

See bench/README.md for what each row measures and how to read the ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as _dt
import fnmatch
import io
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from isofs.daemon import namespaces
from isofs.daemon.runtime import processes_naming
from isofs.mountinfo import mount_table
from isofs.views.execgroups import ExecError, join_view_group
from isofs.views.policy import VIEW_NATIVE, VIEW_TARGET

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent

MiB = 1 << 20
GiB = 1 << 30
SEED = 20240601  # fixed: same offsets, same tree, every run on every machine


def note(msg: str) -> None:
    print(f"  note: {msg}", flush=True)


def one_line(text: str, limit: int = 200) -> str:
    """The last non-empty line of a command's output, for a one-line error."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = lines[-1] if lines else "(no output)"
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --------------------------------------------------------------------------------------
# Rows (workloads)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    higher_is_better: bool  # True for throughputs (MiB/s, IOPS), False for seconds
    what: str


ROWS: list[Row] = [
    Row("seq-write", "MiB/s", True, "write one big file in 1 MiB blocks, then fsync"),
    Row("seq-read-cold", "MiB/s", True, "read it back after sync + drop_caches"),
    Row("seq-read-warm", "MiB/s", True, "read it again at once"),
    Row("rand-read-4k", "IOPS", True, "4 KiB os.pread at random aligned offsets, warm"),
    Row(
        "rand-read-4k-uncached",
        "IOPS",
        True,
        "4 KiB os.pread at distinct random aligned offsets, readahead off, the file's kernel "
        "cache dropped before each batch: every read reaches the daemon",
    ),
    Row("create-10k", "s", False, "create N small files (open/write/close) in one dir"),
    Row("list-scandir-cold", "s", False, "os.scandir + entry.stat() after remount + drop"),
    Row("list-scandir-warm", "s", False, "the same again at once"),
    Row("list-ls-cold", "s", False, "`ls -l DIR >/dev/null` after remount + drop"),
    Row("list-ls-warm", "s", False, "the same again at once"),
    Row("untar", "s", False, "`tar -xf` a synthetic source tree (uncompressed tar)"),
    Row("unlink-10k", "s", False, "unlink the N small files"),
    Row("stat-us", "us", False, "os.stat of each small file once more, microseconds per call"),
    Row(
        "alt-view-read",
        "MiB/s",
        True,
        "isofs two-view mounts: this process (target view) and a native-view process read "
        "one 64 MiB file in turn; the page cache hit ratio of the mount is printed",
    ),
]
ROW_BY_NAME = {r.name: r for r in ROWS}


@dataclass(frozen=True)
class Sizes:
    file_bytes: int
    block: int
    prefault_bytes: int  # 0 = no pre-fault
    rand_reads: int
    small_files: int
    small_file_bytes: int
    tree_files: int


FULL = Sizes(GiB, MiB, GiB + GiB // 2, 20_000, 10_000, 100, 2_500)
QUICK = Sizes(128 * MiB, MiB, 0, 5_000, 2_000, 100, 600)


# --------------------------------------------------------------------------------------
# System helpers: mounts, caches, processes
# --------------------------------------------------------------------------------------


def mounts() -> list[tuple[str, str, str]]:
    """(mount point, fs type, source) for every mount (isofs.mountinfo parses the table)."""
    return [(e.mountpoint, e.fstype, e.source) for e in mount_table()]


def is_mounted(path: Path | str) -> bool:
    p = os.path.abspath(path)
    return any(m[0] == p for m in mounts())


def mounts_under(root: Path) -> list[str]:
    r = str(root).rstrip("/") + "/"
    return [m[0] for m in mounts() if m[0].startswith(r)]


def fs_of(path: Path) -> str:
    """'fstype source' of the mount holding path."""
    best = ("", "?", "?")
    p = os.path.realpath(path)
    for m in mounts():
        mp = m[0]
        inside = p == mp or p.startswith(mp.rstrip("/") + "/")
        if inside and len(mp) >= len(best[0]):
            best = m
    return f"{best[1]} ({best[2]})"


class Caches:
    """sync + drop_caches, or a one-time note when that is not possible."""

    def __init__(self) -> None:
        self.can_drop = os.geteuid() == 0 and os.access("/proc/sys/vm/drop_caches", os.W_OK)
        self._noted = False

    def drop(self) -> None:
        os.sync()
        if not self.can_drop:
            if not self._noted:
                note("not root: drop_caches skipped, 'cold' rows are not really cold")
                self._noted = True
            return
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")


FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_TOPDIR_FL = 0x80086601, 0x40086602, 0x00020000


def set_topdir_flag(path: Path) -> bool:
    """``chattr +T path``, best effort (False where unsupported).

    Why: these VMs' root filesystem is ext4 *without a journal*. There, the inode
    allocator skips inodes freed in the last 60 s (300 s while their inode-table block
    is dirty), one buffer-cache lookup per skipped inode, so creating files in a block
    group where thousands were just deleted costs ~20x more CPU per create: 10,000
    creates take 4 s instead of 0.2 s, for reasons that have nothing to do with the
    contender. With the "top directory" flag on the scratch dir, ext4 places each
    directory made directly inside it (one source dir per contender and repetition,
    with a random name) in a block group of its own, chosen afresh, instead of packing
    them all into the scratch dir's group, which earlier runs (or other work) churned.
    The suite also deletes nothing mid-run except the unlink row's files and the big
    file: sources are removed at the end.
    """
    import fcntl
    import struct

    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", buf)[0] | FS_TOPDIR_FL
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags))
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child is "alive" for kill(0); reap it if it is ours.
    with contextlib.suppress(ChildProcessError, OSError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop_pid(pid: int, grace: float = 5.0) -> None:
    """SIGTERM, wait, SIGKILL: one process, by PID."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        if not pid_alive(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.05)


def pids_with_arg(arg: str) -> list[int]:
    """PIDs whose command line holds ``arg`` as one argument (a unique mount point)."""
    return list(processes_naming(arg))


def fusermount_u(mnt: Path, timeout: float = 30.0) -> None:
    """Unmount a FUSE mount: normal first, lazy if that fails."""
    if not is_mounted(mnt):
        return
    r = subprocess.run(
        ["fusermount3", "-u", str(mnt)], capture_output=True, text=True, timeout=timeout
    )
    if r.returncode != 0 and is_mounted(mnt):
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True, timeout=timeout)


def wait_for_mount(mnt: Path, proc: subprocess.Popen | None, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if is_mounted(mnt):
            return
        if proc is not None and proc.poll() is not None:
            raise MountError(f"exited with {proc.returncode}: {one_line(log.read_text())}")
        time.sleep(0.02)
    raise MountError(f"no mount at {mnt} after {timeout:.0f}s: {one_line(log.read_text())}")


def ensure_tool(tool: str, apt_package: str, tried: set[str]) -> str | None:
    """Path of ``tool``; if missing, one ``apt-get install -y`` attempt (as root)."""
    path = shutil.which(tool)
    if path or apt_package in tried:
        return path
    tried.add(apt_package)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    print(f"  {tool} not found: apt-get install -y {apt_package} ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(
        ["apt-get", "install", "-y", "-q", apt_package], capture_output=True, text=True, env=env
    )
    if r.returncode != 0:
        note(f"apt-get install {apt_package} failed: {one_line(r.stderr or r.stdout)}")
    return shutil.which(tool)


def tool_version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (r.stdout or r.stderr).strip().splitlines()
    return lines[0].strip() if lines else "?"


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------


class MountError(RuntimeError):
    pass


class Contender:
    """One way of presenting a directory. Subclasses mount ``src`` at ``mnt``.

    Life cycle per repetition: prepare(src) -> mount() -> [remount()...] -> unmount().
    unmount() must be idempotent and safe to call at any point, also after a failure.
    """

    name = "?"
    is_fuse = True

    def __init__(self, work: Path) -> None:
        self.work = work
        self.src: Path | None = None
        self.mnt: Path | None = None

    # Overridables --------------------------------------------------------------------
    def check(self, tried: set[str]) -> str | None:
        """None if usable, else why not (printed, contender skipped)."""
        return None

    def version(self) -> str:
        return ""

    def prepare(self, src: Path) -> None:
        """Turn an empty source directory into what mount() expects."""

    def _mount(self) -> None:
        raise NotImplementedError

    def _unmount(self) -> None:
        raise NotImplementedError

    # Common ----------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        assert self.mnt is not None
        return self.mnt

    def mount(self, src: Path, mnt: Path) -> None:
        self.src, self.mnt = src, mnt
        try:
            self._mount()
        except BaseException:
            self.unmount()
            raise

    def remount(self) -> None:
        self.unmount()
        self._mount()

    def unmount(self) -> None:
        if self.mnt is not None:
            self._unmount()


class Native(Contender):
    name = "native"
    is_fuse = False

    @property
    def data_dir(self) -> Path:
        assert self.src is not None
        return self.src

    def _mount(self) -> None:
        pass

    def _unmount(self) -> None:
        pass


class ForegroundFuse(Contender):
    """A FUSE daemon run in the foreground as our child; stopped by fusermount3 + PID."""

    tool: str | None = None  # executable that must exist
    apt_package: str | None = None

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.proc: subprocess.Popen | None = None
        self.log = work / f"{self.name}.log"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def check(self, tried: set[str]) -> str | None:
        if self.tool and not ensure_tool(self.tool, self.apt_package or self.tool, tried):
            return f"{self.tool} not installed"
        return None

    def _mount(self) -> None:
        assert self.mnt is not None
        with open(self.log, "ab") as log:
            log.write(f"--- {' '.join(self.argv())}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                self.argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        wait_for_mount(self.mnt, self.proc, self.log, timeout=30)

    def _unmount(self) -> None:
        assert self.mnt is not None
        try:
            fusermount_u(self.mnt)
        finally:
            if self.proc is not None:
                try:
                    self.proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    stop_pid(self.proc.pid)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
                self.proc = None


class Minimal(ForegroundFuse):
    name = "minimal"

    def version(self) -> str:
        return f"pyfuse3 {_pkg_version('pyfuse3')}"

    def argv(self) -> list[str]:
        # The fair baseline `isofs bench` uses too (snapshot per opendir, 1 s caching).
        return [sys.executable, "-m", "isofs.bench.minimal", str(self.src), str(self.mnt)]


class Bindfs(ForegroundFuse):
    name = "bindfs"
    tool = apt_package = "bindfs"

    def version(self) -> str:
        return tool_version(["bindfs", "--version"])

    def argv(self) -> list[str]:
        # -f only keeps it our child (for the PID); it is `bindfs SRC MNT` otherwise.
        return ["bindfs", "-f", str(self.src), str(self.mnt)]


class BindfsBigWrites(Bindfs):
    # Debian 12's bindfs links libfuse 2, whose default is 4 KiB write requests.
    name = "bindfs-bw"

    def argv(self) -> list[str]:
        return ["bindfs", "-f", "-o", "big_writes", str(self.src), str(self.mnt)]


class Gocryptfs(ForegroundFuse):
    name = "gocryptfs"
    tool = apt_package = "gocryptfs"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.passfile = work / "gocryptfs.pass"

    def version(self) -> str:
        return tool_version(["gocryptfs", "-version"]).split(";")[0]

    def prepare(self, src: Path) -> None:
        if not self.passfile.exists():
            self.passfile.write_text("isofs-bench-not-a-secret\n")
            self.passfile.chmod(0o600)
        r = subprocess.run(
            ["gocryptfs", "-init", "-q", "-passfile", str(self.passfile), str(src)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        if r.returncode != 0:
            raise MountError(f"gocryptfs -init: {one_line(r.stderr or r.stdout)}")

    def argv(self) -> list[str]:
        return [
            "gocryptfs",
            "-fg",
            "-q",
            "-passfile",
            str(self.passfile),
            str(self.src),
            str(self.mnt),
        ]


class IsofsCli(Contender):
    """``python -m isofs mount [ARGS] SRC MNT`` (daemonizes once live) and ``umount MNT``.

    ``init_args`` set -> ``python -m isofs init SRC INIT_ARGS`` in prepare().
    """

    name = "isofs"
    init_args: list[str] | None = None
    mount_args: list[str] = []

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.daemon_pids: list[int] = []
        self.log = work / f"{self.name}.log"

    def version(self) -> str:
        r = self._cli(["--version"], timeout=30, check=False)
        return one_line(r.stdout) if r.returncode == 0 else ""

    @staticmethod
    def cli_env() -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        return env

    def status(self) -> dict:
        """The live mount's `isofs status --json` (empty when it cannot be had)."""
        r = self._cli(["status", "--json", str(self.mnt)], timeout=30, check=False)
        try:
            return json.loads(r.stdout) if r.returncode == 0 else {}
        except ValueError:
            return {}

    def _cli(
        self, args: list[str], timeout: float, check: bool = True
    ) -> subprocess.CompletedProcess:
        env = self.cli_env()
        argv = [sys.executable, "-m", "isofs", *args]
        r = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            stdin=subprocess.DEVNULL,
            cwd=self.work,
            start_new_session=True,
        )
        with open(self.log, "a") as log:
            log.write(f"--- {' '.join(argv)} -> {r.returncode}\n{r.stdout}{r.stderr}")
        if check and r.returncode != 0:
            raise MountError(f"isofs {args[0]}: {one_line(r.stderr or r.stdout)}")
        return r

    def prepare(self, src: Path) -> None:
        if self.init_args is not None:
            self._cli(["init", str(src), *self.init_args], timeout=120)

    def _mount(self) -> None:
        assert self.mnt is not None
        try:
            self._cli(["mount", *self.mount_args, str(self.src), str(self.mnt)], timeout=60)
        finally:
            # Whatever it left running for this (unique) mount point is ours to stop.
            self.daemon_pids = pids_with_arg(str(self.mnt))
        if not is_mounted(self.mnt):
            raise MountError("isofs mount returned 0 but nothing is mounted")

    def _unmount(self) -> None:
        assert self.mnt is not None
        try:
            if is_mounted(self.mnt):
                with contextlib.suppress(subprocess.TimeoutExpired, MountError):
                    self._cli(["umount", str(self.mnt)], timeout=60)
            fusermount_u(self.mnt)  # no-op if umount worked
        finally:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and any(map(pid_alive, self.daemon_pids)):
                time.sleep(0.05)
            for pid in self.daemon_pids:
                stop_pid(pid)
            self.daemon_pids = []


class IsofsEncrypt(IsofsCli):
    """The encrypt provider, every process in the target view (a one-view mount)."""

    name = "isofs-encrypt"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.passfile = work / "isofs.pass"
        if not self.passfile.exists():
            self.passfile.write_text("isofs-bench-not-a-secret\n")
            self.passfile.chmod(0o600)
        # File names encrypted too, as gocryptfs does by default: like for like.
        self.init_args = ["--provider", "encrypt", "--encrypt-names",
                          "--passfile", str(self.passfile)]
        self.mount_args = ["--passfile", str(self.passfile), "--default-view", "target",
                           "--no-exec"]


class IsofsEncrypt2View(IsofsEncrypt):
    """The encrypt provider on a real two-view mount: this benchmark's uid gets the target
    view, everyone else (and `isofs exec --view native`) the native view, so every file name
    is a per-view nodeid with entry timeout 0."""

    name = "isofs-encrypt-2view"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        # --allow-other: the alternating-view row's native reader is another user's process
        self.mount_args = ["--passfile", str(self.passfile), "--target", f"uid={os.geteuid()}",
                           "--allow-other"]  # fmt: skip


class IsofsEncryptExec(IsofsEncrypt2View):
    """The two-view encrypt mount, worked on by a process in an `isofs exec` view (§9 of
    docs/ARCHITECTURE.md): a forked child joins the view's group and enters the view's mount
    namespace as `isofs exec --view VIEW` does, then runs and times every row itself and sends
    the figures back through a pipe (run_in_exec_view). Forked, so that the benchmark's own
    namespace and group stay as they are for the other contenders."""

    view = "?"

    def check(self, tried: set[str]) -> str | None:
        if os.geteuid() != 0:
            return "isofs exec needs root (view groups and mount namespaces)"
        return None

    def enter_view(self) -> None:
        """In the child: what `isofs exec --view VIEW` does after joining the group."""
        raise NotImplementedError


class IsofsEncryptExecNative(IsofsEncryptExec):
    """`isofs exec --view native`: the mount point is the source directory itself."""

    name = "isofs-encrypt-exec-native"
    view = VIEW_NATIVE

    def enter_view(self) -> None:
        shown = namespaces.enter_native_view()
        if os.path.realpath(str(self.mnt)) not in map(os.path.realpath, shown):
            raise MountError(f"isofs exec --view native did not find the mount {self.mnt}")


class IsofsEncryptExecTarget(IsofsEncryptExec):
    """`isofs exec --view target` from inside the mount: the target-view daemon's one-view
    mount, in its own namespace."""

    name = "isofs-encrypt-exec-target"
    view = VIEW_TARGET

    def enter_view(self) -> None:
        assert self.mnt is not None
        os.chdir(self.mnt)
        entered = namespaces.enter_target_view()
        if entered is None or os.path.realpath(entered) != os.path.realpath(self.mnt):
            # It would fall back to the shared mount's per-process view: not this contender.
            raise MountError(f"no target-view daemon to enter for {self.mnt} (got {entered})")


class IsofsXorpad(IsofsCli):
    """The example provider (examples/isofs-xorpad), every process in the target view."""

    name = "isofs-xorpad"
    init_args = ["--provider", "xorpad"]
    mount_args = ["--default-view", "target", "--no-exec"]


CONTENDERS: dict[str, type[Contender]] = {
    c.name: c
    for c in (
        Native, Minimal, Bindfs, IsofsCli, Gocryptfs, BindfsBigWrites,
        IsofsEncrypt, IsofsEncrypt2View, IsofsEncryptExecNative, IsofsEncryptExecTarget,
        IsofsXorpad,
    )
}  # fmt: skip
DEFAULT_CONTENDERS = ["native", "minimal", "bindfs", "isofs"]
#: `--contenders targets`: every contender issue 11's targets compare, in one run.
TARGET_CONTENDERS = [
    "native", "minimal", "isofs", "gocryptfs", "isofs-encrypt", "isofs-encrypt-2view",
    "isofs-encrypt-exec-native", "isofs-encrypt-exec-target",
]  # fmt: skip
CONTENDER_SETS = {"targets": TARGET_CONTENDERS}

# Ratio columns: (numerator, denominator). Only those whose both sides ran are shown.
RATIO_BASES = ["native"]
EXTRA_RATIOS = [
    ("isofs", "minimal"),
    ("isofs-encrypt", "minimal"),
    ("isofs-encrypt", "gocryptfs"),
    ("isofs-encrypt-2view", "gocryptfs"),
    ("isofs-encrypt-exec-target", "isofs-encrypt"),
]

METADATA_ROWS = (
    "create-10k", "list-scandir-cold", "list-scandir-warm", "list-ls-cold", "list-ls-warm",
    "untar", "unlink-10k", "stat-us",
)  # fmt: skip


@dataclass(frozen=True)
class Target:
    """One of issue 11's targets: contender's speed over base's at least ``at_least``."""

    contender: str
    base: str
    rows: tuple[str, ...]  # row names or shell patterns
    at_least: float
    what: str

    def applies(self, row: str) -> bool:
        return any(fnmatch.fnmatchcase(row, pattern) for pattern in self.rows)


TARGETS = [
    Target("isofs-encrypt", "gocryptfs", ("create-10k", "untar", "unlink-10k"), 0.8,
           "at least 0.8x gocryptfs (moonshot 1.0x)"),
    Target("isofs-encrypt", "gocryptfs", ("list-ls-cold",), 1.0, "at least 1.0x gocryptfs"),
    Target("isofs", "minimal", METADATA_ROWS, 0.9, "at least 0.9x the minimal passthrough"),
    Target("isofs-encrypt", "minimal", ("rand-read-4k-uncached",), 0.95,
           "at least 0.95x the minimal passthrough"),
    Target("isofs-encrypt-2view", "gocryptfs", ("list-ls-cold", "list-ls-warm"), 0.4,
           "at least 0.4x gocryptfs"),
    # "Within 1.1x (1.2x)": takes at most 1.1 (1.2) times as long, a speed ratio >= 1/1.1.
    Target("isofs-encrypt-exec-native", "native", ("*",), 1 / 1.1,
           "within 1.1x of the native directory"),
    Target("isofs-encrypt-exec-target", "isofs-encrypt", ("list-*",), 1 / 1.2,
           "within 1.2x of the one-view mount"),
]  # fmt: skip


def _git_describe() -> str:
    """Commit of the isofs tree being measured, '+' if it has local changes."""
    try:
        head = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        dirty = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    if head.returncode != 0:
        return "not a git checkout"
    return head.stdout.strip() + (" + local changes" if dirty.stdout.strip() else "")


def _pkg_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:
        return "?"


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


def write_file(path: Path, size: int, block: bytes, fsync: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        left = size
        while left > 0:
            chunk = view[: min(len(view), left)]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
            left -= min(len(view), left)
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path, block: int) -> int:
    buf = bytearray(block)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            total += n
    return total


def build_tree_tar(dest: Path, n_files: int) -> tuple[int, int]:
    """A deterministic tar of a synthetic source tree; returns (entries, bytes)."""
    rng = random.Random(SEED)
    words = (
        b"def class return import self None if else for in while with as try except "
        b"int char void static struct include define const unsigned size_t the of and "
        b"value index buffer result error data name path node list dict error { } ( ) ; = "
    ).split()
    # A few MiB of text-like filler; files are slices of it.
    filler = b" ".join(rng.choice(words) for _ in range(900_000)) + b"\n"
    exts = [".py", ".py", ".py", ".c", ".h", ".txt", ".md", ".json", ".rst", ".html"]

    # Directories: a tree about 4 deep, ~1 directory per 12 files.
    dirs = ["src"]
    for _ in range(max(1, n_files // 12)):
        parent = rng.choice(dirs)
        if parent.count("/") >= 4:
            parent = "src"
        dirs.append(f"{parent}/d{len(dirs):03d}")

    mtime = 1_700_000_000
    entries, total = 0, 0
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:

        def add(info: tarfile.TarInfo, data: bytes | None = None) -> None:
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "root", "root"
            tar.addfile(info, io.BytesIO(data) if data is not None else None)

        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            add(info)
            entries += 1
        files = []
        for i in range(n_files):
            # Log-normal sizes: median ~3 KiB, a tail of files of hundreds of KiB.
            size = min(int(rng.lognormvariate(8.0, 1.4)), 2 * MiB)
            start = rng.randrange(0, len(filler) - size - 1)
            name = f"{rng.choice(dirs)}/f{i:05d}{rng.choice(exts)}"
            info = tarfile.TarInfo(name)
            info.size, info.mode = size, 0o755 if i % 50 == 0 else 0o644
            add(info, filler[start : start + size])
            files.append(name)
            entries += 1
            total += size
        for i in range(max(1, n_files // 100)):
            target = rng.choice(files)
            info = tarfile.TarInfo(f"{target.rsplit('/', 1)[0]}/link{i:03d}")
            info.type, info.linkname = tarfile.SYMTYPE, target.rsplit("/", 1)[1]
            add(info)
            entries += 1
    return entries, total


@dataclass
class Ctx:
    sizes: Sizes
    selected: set[str]
    caches: Caches
    work: Path
    tarball: Path | None
    block: bytes = field(repr=False, default=b"")

    def wants(self, *rows: str) -> bool:
        """Is any of these rows (shell patterns allowed) selected?"""
        return any(fnmatch.filter(self.selected, r) for r in rows)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def prefault(ctx: Ctx) -> None:
    """Write and delete a scratch file on the native dir so that the memory the timed
    write will use has been touched just before (see README: VM memory balloon)."""
    if not ctx.sizes.prefault_bytes:
        return
    scratch = ctx.work / "prefault.tmp"
    try:
        write_file(scratch, ctx.sizes.prefault_bytes, ctx.block, fsync=False)
    finally:
        scratch.unlink(missing_ok=True)


def run_workloads(
    c: Contender,
    ctx: Ctx,
    record: Callable[[str, float], None],
    fresh_mount: Callable[[], None] | None = None,
) -> None:
    """All selected rows, in order, on one mounted contender.

    ``fresh_mount`` replaces ``c.remount()`` before the cold rows (an exec view's child asks
    the benchmark for the remount and enters the view again).
    """
    s = ctx.sizes
    d = c.data_dir
    big = d / "big.bin"
    mib = s.file_bytes / MiB

    def cold() -> None:
        if fresh_mount is not None:
            fresh_mount()
        elif c.is_fuse:
            c.remount()
        ctx.caches.drop()

    # 1-4: one big file ------------------------------------------------------------
    if ctx.wants("seq-*", "rand-read-4k*"):
        if ctx.wants("seq-write"):
            prefault(ctx)
        os.sync()
        dt = timed(lambda: write_file(big, s.file_bytes, ctx.block, fsync=True))
        if ctx.wants("seq-write"):
            record("seq-write", mib / dt)
        if ctx.wants("seq-read-cold"):
            ctx.caches.drop()
            record("seq-read-cold", mib / timed(lambda: read_file(big, s.block)))
        if ctx.wants("seq-read-warm"):
            record("seq-read-warm", mib / timed(lambda: read_file(big, s.block)))
        if ctx.wants("rand-read-4k"):
            if not ctx.wants("seq-read-warm"):
                read_file(big, s.block)
            rng = random.Random(SEED)
            nblocks = s.file_bytes // 4096
            offsets = [rng.randrange(nblocks) * 4096 for _ in range(s.rand_reads)]
            fd = os.open(big, os.O_RDONLY)
            try:
                pread = os.pread
                t0 = time.perf_counter()
                for off in offsets:
                    pread(fd, 4096, off)
                dt = time.perf_counter() - t0
            finally:
                os.close(fd)
            record("rand-read-4k", s.rand_reads / dt)
        if ctx.wants("rand-read-4k-uncached"):
            record("rand-read-4k-uncached", uncached_random_reads(big, s))
        big.unlink()
        os.sync()

    # 5-7: many small files --------------------------------------------------------
    many = d / "many"
    names = [str(many / f"file{i:05d}.txt") for i in range(s.small_files)]
    if ctx.wants("create-10k", "list-*", "unlink-10k"):
        many.mkdir()
        payload = (b"0123456789abcdef" * ((s.small_file_bytes + 15) // 16))[: s.small_file_bytes]

        def create() -> None:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
            for n in names:
                fd = os.open(n, flags, 0o644)
                os.write(fd, payload)
                os.close(fd)

        dt = timed(create)
        if ctx.wants("create-10k"):
            record("create-10k", dt)
        os.sync()

        def scandir() -> None:
            with os.scandir(many) as it:
                for e in it:
                    e.stat()

        env = dict(os.environ, LC_ALL="C")

        def ls() -> None:
            subprocess.run(["ls", "-l", str(many)], stdout=subprocess.DEVNULL, env=env, check=True)

        for kind, fn in (("scandir", scandir), ("ls", ls)):
            if ctx.wants(f"list-{kind}-cold"):
                cold()
                record(f"list-{kind}-cold", timed(fn))
            if ctx.wants(f"list-{kind}-warm"):
                record(f"list-{kind}-warm", timed(fn))

        if ctx.wants("stat-us"):
            stat = os.stat
            dt = timed(lambda: [stat(n) for n in names])
            record("stat-us", dt / len(names) * 1e6)

    # 8: untar ---------------------------------------------------------------------
    if ctx.wants("untar"):
        assert ctx.tarball is not None
        dest = d / "untar"
        dest.mkdir()
        argv = ["tar", "-xf", str(ctx.tarball), "-C", str(dest)]
        record("untar", timed(lambda: subprocess.run(argv, check=True)))
        os.sync()

    # 9: unlink the small files ----------------------------------------------------
    if ctx.wants("unlink-10k"):
        record("unlink-10k", timed(lambda: [os.unlink(n) for n in names]))
        many.rmdir()
        os.sync()

    # 10: alternating views (isofs two-view mounts only) ------------------------------
    if (
        ctx.wants("alt-view-read")
        and isinstance(c, IsofsEncrypt2View)
        and not isinstance(c, IsofsEncryptExec)
    ):
        record("alt-view-read", alternating_view_read(c, d / "alt" / "alt.bin"))


def run_in_exec_view(c: IsofsEncryptExec, ctx: Ctx, record: Callable[[str, float], None]) -> None:
    """run_workloads() in a forked child in c's `isofs exec` view; it times every row itself.

    The child sends one JSON line per message: {"row", "value"} for a figure, {"remount"}
    before the cold rows (the benchmark remounts the shared mount and answers "ok"; the child
    first goes back to the benchmark's namespace, then enters the view afresh, as a new
    `isofs exec` would), {"error"} when it fails. Its end of the pipe closing ends the run.
    """
    from_child, child_out = os.pipe()
    child_in, to_child = os.pipe()
    sys.stdout.flush()  # or the child would print what is buffered a second time
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the benchmark's own code
        code = 1
        try:
            os.close(from_child)
            os.close(to_child)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    signal.signal(sig, signal.SIG_DFL)
            with open(child_out, "w", buffering=1) as out, open(child_in) as answers:
                code = _exec_view_child(c, ctx, out, answers)
        finally:
            os._exit(code)
    os.close(child_out)
    os.close(child_in)
    error, status = None, None
    try:
        with open(from_child) as messages, open(to_child, "w", buffering=1) as answers:
            for line in messages:
                msg = json.loads(line)
                if "row" in msg:
                    record(msg["row"], float(msg["value"]))
                elif "remount" in msg:
                    c.remount()
                    answers.write("ok\n")
                elif "error" in msg:
                    error = str(msg["error"])
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
    finally:
        if status is None:  # the benchmark failed or was interrupted: the child goes too
            stop_pid(pid)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    if error is not None:
        raise MountError(f"in the {c.view} view: {error}")
    if status != 0:
        raise MountError(f"the {c.view} view's process exited with status {status}")


def _exec_view_child(c: IsofsEncryptExec, ctx: Ctx, out: io.TextIOBase, answers: io.TextIOBase
                     ) -> int:  # fmt: skip
    """The exec view child's work; its exit status."""
    own_namespace = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)

    def send(**msg: object) -> None:
        out.write(json.dumps(msg) + "\n")

    def fresh_mount() -> None:
        # Leave the view (nothing of ours may hold the old mount), have the shared mount
        # remounted, and enter the view again, as a new `isofs exec` would.
        os.chdir(c.work)
        if _setns(own_namespace) != 0:
            raise OSError(ctypes.get_errno(), "setns back to the benchmark's namespace")
        os.chdir(c.work)
        send(remount=True)
        if answers.readline().strip() != "ok":
            raise MountError("the benchmark could not remount")
        c.enter_view()

    try:
        join_view_group(c.view, os.getpid())
        c.enter_view()
        run_workloads(c, ctx, lambda row, value: send(row=row, value=value), fresh_mount)
    except (ExecError, namespaces.NamespaceError, MountError, OSError,
            subprocess.SubprocessError) as exc:  # fmt: skip
        send(error=one_line(str(exc)))
        return 1
    except Exception as exc:  # a bug: say which, the benchmark goes on with the others
        send(error=f"{type(exc).__name__}: {one_line(str(exc))}")
        return 1
    return 0


_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> int:
    """setns(fd, CLONE_NEWNS) (os.setns is Python 3.12+)."""
    return int(_libc.setns(fd, namespaces.CLONE_NEWNS))


UNCACHED_BATCH = 1000


def uncached_random_reads(path: Path, s: Sizes) -> float:
    """IOPS of 4 KiB preads that each reach the daemon (the native directory: the disk).

    Dropping the file's kernel cache (POSIX_FADV_DONTNEED, what fio's --invalidate=1 does)
    before each batch, with readahead off (POSIX_FADV_RANDOM: a read asks for its own pages
    only) and no offset read twice, leaves every read a page-cache miss for every contender
    alike. O_DIRECT was the other way, but the contenders treat it differently: isofs answers
    it with direct_io and reads the backing file through the page cache, while the minimal
    passthrough passes it on to its own open of the backing file, where its unaligned
    os.pread buffers then fail with EINVAL (disk reads, were they aligned).
    """
    rng = random.Random(SEED + 1)
    nblocks = s.file_bytes // 4096
    offsets = [b * 4096 for b in rng.sample(range(nblocks), min(s.rand_reads, nblocks))]
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        pread, total = os.pread, 0.0
        for start in range(0, len(offsets), UNCACHED_BATCH):
            batch = offsets[start : start + UNCACHED_BATCH]
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            t0 = time.perf_counter()
            for off in batch:
                pread(fd, 4096, off)
            total += time.perf_counter() - t0
    finally:
        os.close(fd)
    return len(offsets) / total


ALT_FILE_BYTES = 64 * MiB
ALT_ROUNDS = 6


#: The alternating-view row's native reader: a user the two-view mount's rule does not match.
NOBODY = 65534


@contextlib.contextmanager
def traversable_by_others(path: Path):  # type: ignore[no-untyped-def]
    """Every directory from `path` up to / searchable by other users for the block (the
    scratch directory is mkdtemp's 0700), modes put back after."""
    changed = []
    for directory in [path, *path.parents]:
        mode = directory.stat().st_mode
        if not mode & 0o001:
            directory.chmod((mode | 0o001) & 0o7777)
            changed.append((directory, mode & 0o7777))
    try:
        yield
    finally:
        for directory, mode in changed:
            directory.chmod(mode)


def alternating_view_read(c: IsofsCli, path: Path) -> float:
    """MiB/s of target-view reads of a file that a native-view process reads in between.

    The native reader switches the file's dentry to its own kernel inode each time, so the
    kernel drops the target view's pages: what is left is isofs's own page cache. The reader
    is another user's process reading through the mount (`isofs exec --view native` would
    read the source in a namespace of its own, never touching the mount). With encrypted
    names it cannot know the file's native name, so the file gets a directory of its own,
    made natively (a plain name in both views), and the reader reads every file in it.
    """
    native = [sys.executable, "-m", "isofs", "exec", "--view", "native", "--", sys.executable]
    mkdir = "import os, sys; os.mkdir(sys.argv[1])"
    subprocess.run([*native, "-c", mkdir, str(path.parent)], check=True, env=c.cli_env())
    write_file(path, ALT_FILE_BYTES, b"\xa5" * MiB, fsync=True)
    # sh and cat: the project's Python may live where another user cannot run it
    native_read = ["sh", "-c", 'for f in "$1"/*; do cat "$f" >/dev/null; done', "sh",
                   str(path.parent)]  # fmt: skip
    total = 0.0
    with traversable_by_others(path.parent):
        for _ in range(ALT_ROUNDS):
            subprocess.run(native_read, check=True, user=NOBODY, group=NOBODY, extra_groups=[],
                           cwd="/")  # fmt: skip
            total += timed(lambda: read_file(path, MiB))
    status = c.status()
    cache = status.get("page_cache", {})
    note(f"{c.name}: alternating-view reads: isofs page cache hit ratio "
         f"{cache.get('hit_ratio', 0):.1%} ({cache.get('hits')} hits, {cache.get('misses')} "
         f"misses); kernel invalidations {status.get('invalidations')}")
    path.unlink()
    path.parent.rmdir()
    return ALT_ROUNDS * ALT_FILE_BYTES / MiB / total


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000:
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def speed_ratio(row: Row, num: float | None, den: float | None) -> float | None:
    """num vs den as a speed ratio (>1 = num is faster), for rates and times alike."""
    if num is None or den is None or num <= 0 or den <= 0:
        return None
    return num / den if row.higher_is_better else den / num


def ratio_pairs(names: list[str]) -> list[tuple[str, str]]:
    pairs = [(n, b) for b in RATIO_BASES if b in names for n in names if n != b]
    pairs += [(a, b) for a, b in EXTRA_RATIOS if a in names and b in names]
    return pairs


#: Wider than this, the speed ratios get a table of their own, with two-line headers.
TABLE_WIDTH = 150


def render_table(rows: list[Row], names: list[str], med: dict[str, dict[str, float]]) -> str:
    pairs = ratio_pairs(names)
    values = [[fmt(med.get(n, {}).get(row.name)) for n in names] for row in rows]
    ratios = [
        [
            f"{r:.2f}x" if (r := speed_ratio(row, med.get(a, {}).get(row.name),
                                             med.get(b, {}).get(row.name))) else "-"
            for a, b in pairs
        ]
        for row in rows
    ]  # fmt: skip
    heads = [[n] for n in names]
    both = _grid(rows, heads + [[f"{a}/{b}"] for a, b in pairs],
                 [v + r for v, r in zip(values, ratios, strict=True)], bar=len(names))  # fmt: skip
    if not pairs or max(map(len, both.splitlines())) <= TABLE_WIDTH:
        return both
    out = [_grid(rows, heads, values)]
    against_base = [i for i, (_, b) in enumerate(pairs) if b in RATIO_BASES]
    others = [i for i in range(len(pairs)) if i not in against_base]
    for title, group in (("speed ratios a/b against", against_base), ("speed ratios a/b", others)):
        if group:
            bases = sorted({pairs[i][1] for i in group}) if group is against_base else []
            out += ["", " ".join([title, *bases]) + ":"]
            out.append(_grid(rows, [[pairs[i][0], f"/{pairs[i][1]}"] for i in group],
                             [[line[i] for i in group] for line in ratios]))  # fmt: skip
    return "\n".join(out)


def _grid(rows: list[Row], heads: list[list[str]], cells: list[list[str]],
          bar: int | None = None) -> str:  # fmt: skip
    """Row and unit on the left, then one right-aligned column per head (a head may have
    several lines, bottom-aligned); a "|" before column ``bar`` if given."""
    all_heads = [["row"], ["unit"], *heads]
    depth = max(map(len, all_heads))
    padded = [[""] * (depth - len(h)) + h for h in all_heads]
    body = [[row.name, row.unit, *c] for row, c in zip(rows, cells, strict=True)]
    widths = [
        max([len(x) for x in head] + [len(line[i]) for line in body])
        for i, head in enumerate(padded)
    ]

    def line(cells: list[str]) -> str:
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:], widths[2:], strict=True)]
        if bar is not None and bar < len(heads):
            out.insert(2 + bar, "|")
        return "  ".join(out)

    head_lines = [line([h[k] for h in padded]) for k in range(depth)]
    sep = "-" * max(map(len, head_lines))
    return "\n".join([*head_lines, sep, *(line(cells) for cells in body)])


def render_targets(rows: list[Row], names: list[str], med: dict[str, dict[str, float]]) -> str:
    """Issue 11's targets, row by row: the speed ratio of this run's medians, met or not."""
    table: list[list[str]] = []
    met = 0
    for row in rows:
        for t in TARGETS:
            if not t.applies(row.name) or t.contender not in names or t.base not in names:
                continue
            a, b = med.get(t.contender, {}).get(row.name), med.get(t.base, {}).get(row.name)
            if a is None and b is None:
                continue  # a row neither contender has (alt-view-read)
            r = speed_ratio(row, a, b)
            ok = r is not None and r >= t.at_least
            met += ok
            result = "met" if ok else ("not met" if r is not None else "not measured")
            table.append([row.name, f"{t.contender}/{t.base}", f"{r:.2f}x" if r else "-",
                          f">= {t.at_least:.2f}x", result, t.what])  # fmt: skip
    unchecked = sorted({f"{t.contender}/{t.base}" for t in TARGETS
                        if t.contender not in names or t.base not in names})  # fmt: skip
    out = ["targets (issue 11): speed ratio of the medians, higher is better"]
    if table:
        head = ["row", "contender/base", "ratio", "target", "result", "the target"]
        widths = [max(len(x[i]) for x in [head, *table]) for i in range(len(head))]
        align = "<<>><<"
        for cells in [head, *table]:
            padded = (f"{c:{a}{w}}" for c, a, w in zip(cells, align, widths, strict=True))
            out.append("  ".join(padded).rstrip())
        out.append(f"{met} of {len(table)} met")
    if unchecked:
        out.append("not checked (a contender did not run): " + ", ".join(unchecked))
    return "\n".join(out)


def render_spread(
    rows: list[Row], names: list[str], samples: dict[str, dict[str, list[float]]]
) -> str:
    out = ["spread of the repetitions, (max-min)/median:"]
    width = max(len(r.name) for r in rows)
    cols = [max(10, len(n)) for n in names]
    head = " " * width + "  " + "  ".join(f"{n:>{w}}" for n, w in zip(names, cols, strict=True))
    out.append(head)
    for row in rows:
        cells = []
        for n, w in zip(names, cols, strict=True):
            xs = samples.get(n, {}).get(row.name, [])
            if len(xs) < 2:
                cells.append(f"{'-':>{w}}")
            else:
                m = statistics.median(xs)
                cells.append(f"{(max(xs) - min(xs)) / m * 100:>{w - 1}.0f}%")
        out.append(f"{row.name:<{width}}  " + "  ".join(cells))
    return "\n".join(out)


def _pressure(kind: str) -> float | None:
    """% of the last 60 s in which some task waited for ``kind`` (PSI), if available."""
    with contextlib.suppress(OSError, ValueError, IndexError), open(f"/proc/pressure/{kind}") as f:
        return float(f.readline().split()[2].split("=")[1])
    return None


def describe_load() -> str:
    """Load average and CPU/IO pressure, flagged when other work is likely to skew results."""
    load1 = os.getloadavg()[0]
    cpu, io_ = _pressure("cpu"), _pressure("io")
    text = f"loadavg {load1:.2f} on {os.cpu_count()} CPUs"
    if cpu is not None and io_ is not None:
        text += f", pressure cpu {cpu:.0f}% io {io_:.0f}% (60 s)"
    if load1 > 0.5 * (os.cpu_count() or 1) or (cpu or 0) > 20 or (io_ or 0) > 10:
        text += "  <- busy machine: expect noisy figures"
    return text


def environment(work: Path, contenders: list[Contender]) -> dict[str, str]:
    cpu = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        kb = int(f.readline().split()[1])
        mem = f"{kb / (1 << 20):.1f} GiB"
    env = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "kernel": f"{platform.system()} {platform.release()}",
        "cpus": f"{os.cpu_count()} x {cpu}",
        "memory": mem,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "pyfuse3": _pkg_version("pyfuse3"),
        "trio": _pkg_version("trio"),
        "workdir fs": fs_of(work),
        "root": "yes" if os.geteuid() == 0 else "no (no drop_caches)",
        "isofs tree": _git_describe(),
        "load before": describe_load(),
    }
    for c in contenders:
        v = c.version()
        if v and c.name not in ("minimal",):
            env[c.name] = v
    return env


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="isofs benchmark: native directory vs FUSE contenders.",
        epilog="rows: "
        + ", ".join(r.name for r in ROWS)
        + " | contenders: "
        + ", ".join(CONTENDERS)
        + " | contender sets: "
        + "; ".join(f"{k} = {','.join(v)}" for k, v in CONTENDER_SETS.items()),
    )
    p.add_argument(
        "--quick", action="store_true", help="1 repetition, smaller sizes, no memory pre-fault"
    )
    p.add_argument(
        "--only",
        metavar="ROWS",
        help="comma-separated rows to time (shell patterns ok, e.g. 'list-*')",
    )
    p.add_argument(
        "--contenders",
        metavar="LIST",
        default=",".join(DEFAULT_CONTENDERS),
        help=f"comma-separated (default {','.join(DEFAULT_CONTENDERS)}); 'targets' stands "
        "for every contender issue 11's targets compare",
    )
    p.add_argument(
        "--repeat",
        type=int,
        metavar="N",
        help="repetitions, median reported (default 3; --quick: 1)",
    )
    p.add_argument(
        "--cpu",
        type=int,
        metavar="N",
        help="run the suite and everything it starts (daemons, tar, ls) on CPU N only: "
        "steadier FUSE round trips on small VMs, no client/daemon overlap",
    )
    p.add_argument("--json", metavar="FILE", help="save environment and raw samples here")
    p.add_argument(
        "--workdir",
        metavar="DIR",
        help="create the scratch dir inside DIR (default: the current directory, "
        "so that it is on the same filesystem)",
    )
    args = p.parse_args(argv)

    args.contender_names = [
        name
        for given in (n.strip() for n in args.contenders.split(",") if n.strip())
        for name in CONTENDER_SETS.get(given, [given])
    ]
    unknown = [n for n in args.contender_names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    if len(set(args.contender_names)) != len(args.contender_names):
        p.error("a contender is listed twice")

    if args.only:
        selected: list[str] = []
        for pat in (x.strip() for x in args.only.split(",") if x.strip()):
            hits = [r.name for r in ROWS if fnmatch.fnmatchcase(r.name, pat)]
            if not hits:
                p.error(f"--only: no row matches {pat!r}; rows: {', '.join(ROW_BY_NAME)}")
            selected += [h for h in hits if h not in selected]
        args.rows = [r for r in ROWS if r.name in selected]
    else:
        args.rows = list(ROWS)

    if args.cpu is not None and args.cpu not in os.sched_getaffinity(0):
        p.error(f"--cpu {args.cpu}: not one of {sorted(os.sched_getaffinity(0))}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    base = Path(args.workdir).resolve() if args.workdir else Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="isofs-bench-", dir=base))

    # SIGTERM/SIGHUP -> the same clean-up path as Ctrl-C.
    def _raise(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)

    live: list[Contender] = []
    rc = 0
    try:
        rc = _run(args, sizes, work, live)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        rc = 130
    except Exception as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        rc = 1
    finally:
        _cleanup(work, live)
    return rc


def _cleanup(work: Path, live: list[Contender]) -> None:
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for c in live:
            try:
                c.unmount()
            except Exception as exc:
                print(f"warning: unmounting {c.name}: {exc}", file=sys.stderr)
        for mnt in mounts_under(work):  # anything still mounted in our scratch dir is ours
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        left = mounts_under(work)
        if left:
            print(f"warning: still mounted, scratch dir kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace, sizes: Sizes, work: Path, live: list[Contender]) -> int:
    tried: set[str] = set()
    print("isofs benchmark", flush=True)
    contenders: list[Contender] = []
    for name in args.contender_names:
        c = CONTENDERS[name](work)
        why = c.check(tried)
        if why:
            print(f"  skip {name}: {why}", flush=True)
            continue
        contenders.append(c)
        live.append(c)

    env = environment(work, contenders)
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # inherited by every process started from now
    env["cpu pinning"] = "none" if args.cpu is None else f"everything on CPU {args.cpu}"
    if set_topdir_flag(work):
        env["workdir fs"] += ", scratch dir chattr +T"
    width = max(map(len, env))
    for k, v in env.items():
        print(f"  {k:<{width}}  {v}")
    selected = {r.name for r in args.rows}
    print(
        f"  {'sizes':<{width}}  file {sizes.file_bytes // MiB} MiB,"
        f" rand reads {sizes.rand_reads:,},"
        f" small files {sizes.small_files:,} x {sizes.small_file_bytes} B,"
        f" tree {sizes.tree_files:,} files, pre-fault {sizes.prefault_bytes // MiB} MiB,"
        f" repeat {args.repeat}",
        flush=True,
    )

    tarball = None
    if "untar" in selected:
        tarball = work / "tree.tar"
        n, total = build_tree_tar(tarball, sizes.tree_files)
        print(
            f"  {'tarball':<{width}}  {n:,} entries, {total / MiB:.1f} MiB of file data", flush=True
        )

    ctx = Ctx(sizes, selected, Caches(), work, tarball, block=random.Random(SEED).randbytes(MiB))
    samples: dict[str, dict[str, list[float]]] = {c.name: {} for c in contenders}
    errors: dict[str, str] = {}
    active = list(contenders)
    orders: list[list[str]] = []
    t_start = time.monotonic()
    name_width = max((len(c.name) for c in contenders), default=10)
    for rep in range(args.repeat):
        k = rep % len(active) if active else 0
        order = active[k:] + active[:k]
        orders.append([c.name for c in order])
        print(
            f"\nrepetition {rep + 1}/{args.repeat}: {', '.join(c.name for c in order)}", flush=True
        )
        for c in order:
            # A random name: see the ext4 notes at set_topdir_flag().
            src = Path(tempfile.mkdtemp(prefix=f"src-{c.name}-{rep}-", dir=work))
            mnt = work / f"mnt-{c.name}"
            mnt.mkdir(exist_ok=True)
            got: dict[str, float] = {}

            def record(row: str, value: float, c: Contender = c, got: dict = got) -> None:
                samples[c.name].setdefault(row, []).append(value)
                got[row] = value

            t0 = time.monotonic()
            try:
                c.prepare(src)
                c.mount(src, mnt)
                if isinstance(c, IsofsEncryptExec):
                    run_in_exec_view(c, ctx, record)
                else:
                    run_workloads(c, ctx, record)
            except (MountError, OSError, subprocess.SubprocessError) as exc:
                msg = one_line(str(exc))
                errors[c.name] = msg
                print(f"  {c.name:<{name_width}} skipped: {msg}", flush=True)
                active.remove(c)
            finally:
                # Sources stay until the end of the run: deleting thousands of files now
                # would slow later creates (see the ext4 notes at set_topdir_flag()).
                c.unmount()
            if got:
                summary = ", ".join(f"{r} {fmt(v)}" for r, v in got.items())
                took = time.monotonic() - t0
                print(f"  {c.name:<{name_width}} {took:5.1f}s  {summary}", flush=True)
        if not active:
            break

    env["load after"] = describe_load()
    names = [c.name for c in contenders if samples[c.name]]
    med = {n: {r: statistics.median(v) for r, v in samples[n].items()} for n in names}
    print(
        f"\nresults: median of {args.repeat} repetition(s), {time.monotonic() - t_start:.0f}s."
        "\nRatio columns a/b are speed ratios, higher is better everywhere: >1 means a is"
        " faster than b\n(MiB/s and IOPS rows: a/b; seconds rows: b_time/a_time)."
    )
    print(render_table(args.rows, names, med))
    if args.repeat > 1 and names:
        print()
        print(render_spread(args.rows, names, samples))
    print()
    print(render_targets(args.rows, names, med))
    for n, msg in errors.items():
        print(f"  {n}: {msg}")
    print(f"load after the run: {env['load after']}")

    if args.json:
        doc = {
            "environment": env,
            "sizes": sizes.__dict__,
            "repeat": args.repeat,
            "rows": [r.__dict__ for r in args.rows],
            "contenders": names,
            "samples": samples,
            "medians": med,
            "orders": orders,
            "errors": errors,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"raw samples saved to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
