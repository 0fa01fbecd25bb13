"""Fixtures for tests that drive a real FUSE mount (mark them with ``pytest.mark.mount``).

``mount_factory`` mounts through the real CLI (``python -m isofs mount``) and always tears the
mount down, even when the test fails: ``isofs umount``, then ``fusermount3 -u -z``, then the
daemon is killed by PID. ``mount`` is one ready mount under ``tmp_path``; ``shared_mount`` is
one mount per test module (mounting takes a few hundred milliseconds).

Helpers to act on a mount from *another* process: ``run_python`` (a ``python -c`` child, with
optional ``user``/``group``/``pass_fds``), ``sh`` (shell tools), ``run_in_process`` (call a
picklable function in a forked child and return its result) and ``isofs_cli`` (the CLI).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from isofs.daemon import runtime

CLI_TIMEOUT = 60.0


def fuse_unavailable() -> str | None:
    """Why mounted tests cannot run here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed"
    return None


def isofs_command(*args: str | os.PathLike[str]) -> list[str]:
    return [sys.executable, "-m", "isofs", *(os.fspath(a) for a in args)]


def run_isofs(
    *args: str | os.PathLike[str], timeout: float = CLI_TIMEOUT, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run the isofs CLI in a child process; never raises on a non-zero exit."""
    return subprocess.run(
        isofs_command(*args), capture_output=True, text=True, timeout=timeout, **kwargs
    )


def mounted_at(path: str | os.PathLike[str]) -> bool:
    """Whether the kernel lists `path` (as given, not resolved) as a mount point."""
    return os.fspath(path) in runtime.mounted_filesystems()


def pid_is_running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def wait_until(condition: Callable[[], bool], timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `condition` until true; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        if time.monotonic() > deadline:
            return bool(condition())
        time.sleep(step)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def live_processes(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """PIDs of live (not zombie) processes other than this one whose argument list
    `matches`."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if matches(argv) and pid_is_running(int(entry)):
            pids.append(int(entry))
    return pids


def daemons_for(mountpoint: str | os.PathLike[str]) -> list[int]:
    """Live isofs daemons whose command line names this mount point."""
    wanted = os.fsencode(os.path.realpath(mountpoint))
    return live_processes(
        lambda argv: b"isofs" in argv and b"--foreground" in argv and wanted in argv
    )


def processes_naming(path: str | os.PathLike[str]) -> list[int]:
    """Live processes whose command line names anything under `path` (daemons by their
    mount point, a test engine by its configuration file)."""
    wanted = os.fsencode(os.path.realpath(path))
    return live_processes(lambda argv: any(wanted in arg for arg in argv))


def mounts_under(path: str | os.PathLike[str]) -> list[str]:
    """Mount points the kernel lists below `path`."""
    prefix = os.path.realpath(path) + "/"
    return [m for m in runtime.mounted_filesystems() if m.startswith(prefix)]


def _daemon_pid_from_proc(mnt: str) -> int | None:
    """Fallback when no record: the daemon whose command line names the mount point."""
    found = daemons_for(mnt)
    return found[0] if found else None


@dataclass
class Mount:
    """A live isofs mount made through the CLI."""

    source: Path
    mnt: Path
    log: Path
    pid: int
    args: tuple[str, ...] = ()
    _torn_down: bool = field(default=False, repr=False)

    def src(self, *parts: str | os.PathLike[str]) -> Path:
        """A path in the source directory (behind the mount's back)."""
        return self.source.joinpath(*parts)

    def at(self, *parts: str | os.PathLike[str]) -> Path:
        """A path through the mount."""
        return self.mnt.joinpath(*parts)

    @property
    def is_mounted(self) -> bool:
        return mounted_at(self.mnt)

    @property
    def daemon_running(self) -> bool:
        return pid_is_running(self.pid)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError as exc:
            return f"<no log: {exc}>"

    def umount(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`isofs umount` (the result is returned, not checked)."""
        return run_isofs("umount", self.mnt, *args)

    def teardown(self) -> list[str]:
        """Unmount by every means and make sure the daemon is gone; returns what went wrong."""
        problems: list[str] = []
        if self._torn_down:
            return problems
        self._torn_down = True
        if self.is_mounted:
            try:
                result = self.umount()
                if result.returncode != 0:
                    problems.append(f"isofs umount failed: {result.stderr.strip()}")
            except subprocess.TimeoutExpired:
                problems.append("isofs umount timed out")
        if self.is_mounted:
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(self.mnt)], capture_output=True)
        if not wait_until(lambda: not self.daemon_running, timeout=10.0):
            problems.append(f"daemon {self.pid} still running after unmount: killed")
            if self._is_our_daemon():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                wait_until(lambda: not self.daemon_running, timeout=5.0)
        self._remove_leftovers()
        return problems

    def _remove_leftovers(self) -> None:
        """A daemon that was killed leaves its record and control socket behind."""
        if self.daemon_running or self.is_mounted:
            return
        mnt = os.path.realpath(self.mnt)
        record = runtime.MountRecord.load(mnt)
        if record is not None and record.pid == self.pid:
            record.remove()
        if runtime.MountRecord.load(mnt) is None:  # no other daemon claims this mount point
            _, _, control = runtime.MountRecord.paths_for(mnt)
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(control).st_mode):
                    os.unlink(control)

    def _is_our_daemon(self) -> bool:
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return b"isofs" in cmdline and os.fsencode(os.path.realpath(self.mnt)) in cmdline


class MountManager:
    """Makes mounts under one base directory and tears all of them down at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.mounts: list[Mount] = []
        self._counter = 0

    def _fresh_dir(self, stem: str) -> Path:
        while True:
            self._counter += 1
            path = self.base / f"{stem}{self._counter}"
            if not path.exists():
                path.mkdir()
                return path

    def __call__(
        self,
        source: str | os.PathLike[str] | None = None,
        mountpoint: str | os.PathLike[str] | None = None,
        *extra_args: str,
    ) -> Mount:
        src = Path(source) if source is not None else self._fresh_dir("src")
        mnt = Path(mountpoint) if mountpoint is not None else self._fresh_dir("mnt")
        self._counter += 1
        log = self.base / f"isofs-{self._counter}.log"
        result = run_isofs("mount", src, mnt, "--log", log, *extra_args)
        mnt_real = os.path.realpath(mnt)
        record = runtime.MountRecord.load(mnt_real)
        pid = record.pid if record is not None else _daemon_pid_from_proc(mnt_real)
        if result.returncode != 0 or pid is None:
            log_text = log.read_text(errors="replace") if log.exists() else "<no log>"
            if pid is not None and mounted_at(mnt_real):  # half-succeeded: clean it up
                Mount(src, Path(mnt_real), log, pid).teardown()
            pytest.fail(
                f"isofs mount {src} {mnt} {' '.join(extra_args)} failed "
                f"(exit {result.returncode}, daemon pid {pid})\n"
                f"stderr: {result.stderr}\nlog:\n{log_text}",
                pytrace=False,
            )
        mount = Mount(src, mnt, log, pid, tuple(extra_args))
        self.mounts.append(mount)
        return mount

    def teardown_all(self) -> list[str]:
        problems: list[str] = []
        for mount in reversed(self.mounts):
            problems += mount.teardown()
        self.mounts.clear()
        return problems


@contextlib.contextmanager
def _manager(base: Path) -> Iterator[MountManager]:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    manager = MountManager(base)
    try:
        yield manager
    finally:
        _leave_mounts(manager)
        problems = manager.teardown_all()
    if problems:
        pytest.fail("teardown: " + "; ".join(problems), pytrace=False)


def _leave_mounts(manager: MountManager) -> None:
    """Never keep a mount busy through this process's working directory."""
    try:
        cwd = os.getcwd()
    except OSError:  # inside a dead mount
        os.chdir(manager.base)
        return
    for mount in manager.mounts:
        mnt = os.path.realpath(mount.mnt)
        if cwd == mnt or cwd.startswith(mnt + "/"):
            os.chdir(manager.base)
            return


@pytest.fixture
def mount_factory(tmp_path: Path) -> Iterator[MountManager]:
    """``mount_factory(source=None, mountpoint=None, *extra_args) -> Mount`` for this test."""
    with _manager(tmp_path) as manager:
        yield manager


@pytest.fixture
def mount(mount_factory: MountManager) -> Mount:
    """A fresh empty source mounted on an empty mount point, both under tmp_path."""
    return mount_factory()


@pytest.fixture(scope="module")
def shared_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mount]:
    """One mount for a whole test module; give each test or example its own subdirectory."""
    with _manager(tmp_path_factory.mktemp("shared")) as manager:
        yield manager()


# -------------------------------------------------------------------- other processes


@pytest.fixture
def isofs_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``isofs_cli(*args, **run_kwargs)``: the CLI in a child process (result not checked)."""
    return run_isofs


def _others_can_run(path: str) -> bool:
    """Whether any user may execute `path` (every ancestor and the file have o+x)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def python_for_other_users() -> str | None:
    """A Python interpreter an unprivileged user can start (stdlib only), or None.

    The test interpreter may live in a private home directory; then a system python3 of
    the same minor version is the next choice.
    """
    if _others_can_run(sys.executable):
        return sys.executable
    found = shutil.which(f"python{sys.version_info[0]}.{sys.version_info[1]}", path=os.defpath)
    for candidate in (found, shutil.which("python3", path=os.defpath)):
        if candidate and _others_can_run(candidate):
            return candidate
    return None


def _run_python(
    code: str,
    *args: str | os.PathLike[str],
    check: bool = True,
    timeout: float = 60.0,
    **kwargs: Any,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -c code args...`` (``user=``, ``group=``, ``pass_fds=``, ``cwd=`` pass on).

    With ``user=`` the child may be a system interpreter (see `python_for_other_users`): it
    can rely on the standard library only.
    """
    kwargs.setdefault("cwd", "/")
    python = sys.executable
    if kwargs.get("user") is not None:
        python = python_for_other_users() or pytest.skip("no Python that other users can run")
    result = subprocess.run(
        [python, "-c", code, *(os.fspath(a) for a in args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"child python exited {result.returncode}\nstdout: {result.stdout}\n"
            f"stderr: {result.stderr}"
        )
    return result


@pytest.fixture
def other_user_python() -> str:
    """An interpreter unprivileged users can start (skips the test when there is none)."""
    return python_for_other_users() or pytest.skip("no Python that other users can run")


@pytest.fixture
def run_python() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``run_python(code, *argv, check=True, user=None, pass_fds=(), ...)``."""
    return _run_python


def _sh(
    cmd: str | list[str], check: bool = True, timeout: float = 60.0, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a shell command line (str) or an argv (list); output captured as text."""
    result = subprocess.run(
        cmd,
        shell=isinstance(cmd, str),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{cmd!r} exited {result.returncode}\nstdout: {result.stdout}\nstderr: {result.stderr}"
        )
    return result


@pytest.fixture
def sh() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``sh("ls -a DIR")`` or ``sh(["touch", "-a", path])``; checks the exit status."""
    return _sh


def _run_in_process(fn: Callable[..., Any], *args: Any, timeout: float = 60.0) -> Any:
    """Call `fn(*args)` in a forked child process; return its result or raise its exception."""
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result(timeout=timeout)


@pytest.fixture
def run_in_process() -> Callable[..., Any]:
    """``run_in_process(fn, *args)``: fn runs in another process (fn and result picklable)."""
    return _run_in_process


# -------------------------------------------------------------------- the S3 engine


@pytest.fixture(scope="session")
def s3_engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real S3 engine (Ceph RGW, tests/s3engine.py) for the whole session, stopped at the
    end even when tests fail. If it cannot start here, the tests that need it fail."""
    from s3engine import EngineError, S3Engine

    try:
        engine = S3Engine.start(tmp_path_factory.mktemp("s3engine"))
    except EngineError as exc:
        pytest.fail(f"the S3 test engine did not start: {exc}", pytrace=False)
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def s3(s3_engine: Any, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The session's S3 engine with its gateway up and its user's keys in AWS_* variables
    (boto3's standard chain); a test that stops the gateway gets it restarted after."""
    if not s3_engine.gateway_answers():
        s3_engine.start_gateway()
    for name, value in s3_engine.environment().items():
        monkeypatch.setenv(name, value)
    try:
        yield s3_engine
    finally:
        if not s3_engine.gateway_answers():
            s3_engine.start_gateway()
