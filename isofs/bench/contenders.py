"""The contenders of `isofs bench`, their mounts, and the scratch directory that holds them.

Every mount the benchmark makes is registered in `Scratch` before it is attempted, so that
`Scratch.cleanup` (run in a `finally`, also after Ctrl-C or a failure) can lazily unmount it,
kill its daemon by PID if it is still alive, forget its runtime record and remove the scratch
directory with everything the run wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from isofs.core.sizecache import DB_FILE_NAME
from isofs.daemon import runtime
from isofs.daemon.control import request_status
from isofs.daemon.runtime import MountRecord, is_mounted
from isofs.daemon.serve import daemon_environment
from isofs.source import META_DIR_NAME

MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 30.0

NATIVE, MINIMAL, ISOFS = "native", "minimal", "isofs"


class BenchError(Exception):
    """A one-line reason the benchmark cannot go on."""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


def process_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while process_running(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _daemons_serving(mountpoint: str) -> list[int]:
    """PIDs of isofs daemons whose command line names `mountpoint` (no record needed)."""
    return [
        pid
        for pid, argv in runtime.processes_naming(mountpoint).items()
        if b"isofs" in argv or b"isofs.bench.minimal" in argv
    ]


def _stop(pid: int) -> None:
    """SIGTERM, then SIGKILL: a daemon that did not leave with its mount."""
    for signum, wait in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
        if not process_running(pid):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
        if _wait_gone(pid, wait):
            return


def fusermount_u(mountpoint: str, lazy: bool = False) -> str | None:
    """Unmount; None on success, else the reason."""
    command = ["fusermount3", "-u", *(["-z"] if lazy else []), mountpoint]
    result = subprocess.run(command, capture_output=True, text=True)
    return None if result.returncode == 0 else _last_line(result.stderr)


class Scratch:
    """The run's scratch directory and every mount point and daemon it made."""

    def __init__(self, workdir: str) -> None:
        try:
            self.path = Path(tempfile.mkdtemp(prefix="isofs-bench-", dir=workdir)).resolve()
        except OSError as exc:
            raise BenchError(f"cannot make a scratch directory in {workdir}: {exc}") from None
        self.mountpoints: list[str] = []
        self.pids: set[int] = set()
        self._counter = 0

    def new_dir(self, stem: str) -> Path:
        self._counter += 1
        path = self.path / f"{stem}-{self._counter}"
        path.mkdir()
        return path

    def mountpoint(self, stem: str) -> str:
        path = str(self.new_dir(f"mnt-{stem}"))
        self.mountpoints.append(path)
        return path

    def cleanup(self) -> list[str]:
        """Unmount everything (lazily), stop daemons by PID, remove the directory."""
        problems = []
        for mountpoint in reversed(self.mountpoints):
            if is_mounted(mountpoint):
                reason = fusermount_u(mountpoint, lazy=True)
                if reason:
                    problems.append(f"cannot unmount {mountpoint}: {reason}")
            for pid in _daemons_serving(mountpoint):
                self.pids.add(pid)
        for pid in self.pids:
            if not _wait_gone(pid, 5.0):
                _stop(pid)
        for mountpoint in self.mountpoints:
            record = MountRecord.load(mountpoint)
            if record is not None and not process_running(record.pid):
                record.remove()
        if any(is_mounted(m) for m in self.mountpoints):
            problems.append("something is still mounted; the scratch directory is left")
            return problems
        shutil.rmtree(self.path, ignore_errors=True)
        if self.path.exists():
            problems.append(f"cannot remove {self.path}")
        return problems


@dataclass
class Counters:
    """A daemon's request counters at one moment: operation -> (count, seconds in handlers)."""

    operations: dict[str, tuple[int, float]]
    size_cache: dict[str, int] | None = None

    def since(self, before: Counters) -> Counters:
        operations = {}
        for name, (count, seconds) in self.operations.items():
            old_count, old_seconds = before.operations.get(name, (0, 0.0))
            if count - old_count:
                operations[name] = (count - old_count, max(0.0, seconds - old_seconds))
        sizes = None
        if self.size_cache is not None and before.size_cache is not None:
            sizes = {k: v - before.size_cache.get(k, 0) for k, v in self.size_cache.items()}
        return Counters(operations, sizes)

    @property
    def requests(self) -> int:
        return sum(count for count, _ in self.operations.values())

    @property
    def seconds(self) -> float:
        return sum(seconds for _, seconds in self.operations.values())


@dataclass
class Contender:
    """One way of presenting a source to a reading process."""

    key: str
    label: str
    kind: str  # NATIVE, MINIMAL or ISOFS
    source: Path
    view: str = "native"  # the view the reading process gets
    mount_args: list[str] = field(default_factory=list)
    #: The reader joins the target view with `isofs exec` (a two-view mount).
    exec_view: bool = False
    provider: str | None = None
    #: Its sizes go through a size cache (a transformed view of an isofs mount).
    sized: bool = False

    def helper_options(self) -> list[str]:
        """The reading process joins the view's `isofs exec` group itself (the same call
        `isofs exec --view` makes), so no CLI start-up precedes each timed operation."""
        return ["--join-view", self.view] if self.exec_view else []

    def forget_sizes(self) -> None:
        """Remove the persistent size cache: the next mount lists as for the first time."""
        meta = self.source / META_DIR_NAME
        if meta.is_dir():
            for path in meta.glob(f"{DB_FILE_NAME}*"):
                path.unlink()


class Live:
    """A mounted (or native) contender: where to list, and its daemon's counters."""

    def __init__(self, contender: Contender, root: str) -> None:
        self.contender = contender
        self.root = root

    def counters(self) -> Counters | None:
        return None

    def unmount(self) -> None:
        pass


class LiveIsofs(Live):
    def __init__(self, contender: Contender, root: str, process: subprocess.Popen[bytes],
                 control: str) -> None:  # fmt: skip
        super().__init__(contender, root)
        self.process = process
        self.control = control

    def counters(self) -> Counters:
        try:
            status = request_status(self.control)
        except (OSError, ValueError) as exc:
            raise BenchError(f"{self.contender.key}: daemon does not answer: {exc}") from None
        operations = {
            name: (op["count"], op["count"] * op["mean_us"] / 1e6)
            for name, op in status["operations"].items()
        }
        sizes = {k: v for k, v in status["size_cache"].items() if isinstance(v, int)
                 and not isinstance(v, bool)}  # fmt: skip
        return Counters(operations, sizes)

    def unmount(self) -> None:
        reason = fusermount_u(self.root)
        if reason is not None:
            raise BenchError(f"{self.contender.key}: cannot unmount {self.root}: {reason}")
        try:
            self.process.wait(timeout=EXIT_TIMEOUT)  # it flushes the size cache, then exits
        except subprocess.TimeoutExpired:
            _stop(self.process.pid)
            raise BenchError(f"{self.contender.key}: daemon {self.process.pid} did not exit; "
                             "killed") from None  # fmt: skip


class LiveMinimal(Live):
    def __init__(self, contender: Contender, root: str, process: subprocess.Popen[bytes],
                 stats_file: Path) -> None:  # fmt: skip
        super().__init__(contender, root)
        self.process = process
        self.stats_file = stats_file

    def counters(self) -> Counters:
        with contextlib.suppress(FileNotFoundError):
            self.stats_file.unlink()
        self.process.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not self.stats_file.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise BenchError("minimal passthrough did not write its counters")
            time.sleep(0.001)
        document = json.loads(self.stats_file.read_text())
        return Counters({name: (op["count"], op["total_s"])
                         for name, op in document["operations"].items()})  # fmt: skip

    def unmount(self) -> None:
        reason = fusermount_u(self.root)
        try:
            self.process.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            _stop(self.process.pid)
        if reason is not None:
            raise BenchError(f"minimal passthrough: cannot unmount {self.root}: {reason}")


class Mounter:
    """Mounts contenders in the scratch directory (secrets from one passphrase file)."""

    def __init__(self, scratch: Scratch, secret_args: list[str]) -> None:
        self.scratch = scratch
        self.secret_args = secret_args

    def mount(self, contender: Contender) -> Live:
        if contender.kind == NATIVE:
            return Live(contender, str(contender.source))
        if contender.kind == MINIMAL:
            return self._mount_minimal(contender)
        return self.mount_isofs(contender, contender.mount_args)

    def mount_isofs(self, contender: Contender, args: list[str]) -> LiveIsofs:
        """`isofs mount SRC MNT ARGS` as the daemon itself (`--foreground`, our child, in the
        environment `isofs mount` gives its daemon): one interpreter start and one key
        derivation per mount instead of two, and the PID known before it mounts."""
        mountpoint = self.scratch.mountpoint(contender.key.replace("/", "-").replace(":", "-"))
        log = self.scratch.path / "isofs-daemons.log"
        read_end, write_end = os.pipe()
        command = [sys.executable, "-m", "isofs", "mount", str(contender.source), mountpoint,
                   "--foreground", "--ready-fd", str(write_end), "--log", str(log), *args,
                   *self.secret_args]  # fmt: skip
        try:
            with open(log, "ab") as output:  # a crash's traceback lands beside the log lines
                process = subprocess.Popen(
                    command, stdin=subprocess.DEVNULL, stdout=output, stderr=output,
                    pass_fds=(write_end,), start_new_session=True, cwd="/",
                    env=daemon_environment(),
                )  # fmt: skip
        finally:
            os.close(write_end)
        self.scratch.pids.add(process.pid)
        with os.fdopen(read_end, "rb") as ready:
            message = ready.read().decode(errors="replace").strip()
        if message != "mounted":
            process.wait()
            why = message or f"daemon exited with status {process.returncode}"
            raise BenchError(f"{contender.key}: isofs mount failed: {why}")
        record = MountRecord.load(mountpoint)
        if record is None:
            raise BenchError(f"{contender.key}: isofs mounted but left no record")
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while True:  # it listens once its loop runs, a moment after "mounted"
            try:
                request_status(record.control)
                break
            except (OSError, ValueError):
                if process.poll() is not None or time.monotonic() > deadline:
                    raise BenchError(f"{contender.key}: the daemon's control socket does not "
                                     "answer") from None  # fmt: skip
                time.sleep(0.002)
        return LiveIsofs(contender, mountpoint, process, record.control)

    def _mount_minimal(self, contender: Contender) -> LiveMinimal:
        mountpoint = self.scratch.mountpoint("minimal")
        stats = self.scratch.path / f"minimal-{os.getpid()}.stats"
        with open(self.scratch.path / "minimal.log", "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "isofs.bench.minimal", str(contender.source), mountpoint,
                 "--stats", str(stats)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
            )  # fmt: skip
        self.scratch.pids.add(process.pid)
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while not is_mounted(mountpoint):
            if process.poll() is not None or time.monotonic() > deadline:
                log_text = (self.scratch.path / "minimal.log").read_text(errors="replace")
                raise BenchError(f"minimal passthrough did not mount: {_last_line(log_text)}")
            time.sleep(0.01)
        return LiveMinimal(contender, mountpoint, process, stats)


def drop_caches() -> bool:
    """Write dirty data back and drop the kernel's page, dentry and inode caches (root only)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def run_helper(contender: Contender, arguments: list[str]) -> dict[str, Any]:
    """Run `python -m isofs.bench.helper ARGS` in the contender's reading view."""
    command = [sys.executable, "-m", "isofs.bench.helper", *arguments, *contender.helper_options()]
    result = subprocess.run(command, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    try:
        document = json.loads(result.stdout)
    except ValueError:
        why = _last_line(result.stderr or result.stdout)
        raise BenchError(f"{contender.key}: {arguments[0]} failed: {why}") from None
    if "error" in document:
        raise BenchError(f"{contender.key}: {document['error']}")
    return document
