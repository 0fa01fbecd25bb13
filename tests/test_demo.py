"""`scripts/demo.py` (`./dev demo`) leaves nothing mounted and no daemon behind, however it
ends: its standard output closed early (`./dev demo | head`), SIGINT or SIGTERM mid-way.

The demo runs with TMPDIR inside the test's directory, so whatever it mounts is found there.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import fuse_unavailable, live_processes, mounts_under, wait_until

pytestmark = pytest.mark.mount

DEMO = Path(__file__).resolve().parent.parent / "scripts" / "demo.py"
#: The first line the demo prints once its mount is live.
AFTER_MOUNT = "# a target-view process writes a file"
EXIT_STDOUT_CLOSED = 128 + signal.SIGPIPE


def daemons_under(base: Path) -> list[int]:
    """Live isofs daemons whose command line names a path under `base`."""
    prefix = os.fsencode(os.path.realpath(base)) + b"/"
    return live_processes(
        lambda argv: b"--foreground" in argv and any(arg.startswith(prefix) for arg in argv)
    )


class Demo:
    """One run of the demo with its stdout on a pipe this test reads line by line."""

    def __init__(self, base: Path) -> None:
        self.base = base
        env = dict(os.environ, TMPDIR=str(base))
        self.process = subprocess.Popen(
            [sys.executable, str(DEMO)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, env=env, cwd="/", bufsize=0,
        )  # fmt: skip
        self.lines: list[str] = []
        self._pending = b""

    def read_line(self, timeout: float = 60.0) -> str:
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.process.stdout], [], [], max(left, 0))
            if not ready:
                raise AssertionError(f"no output from the demo in {timeout} s: {self.lines}")
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise AssertionError(f"the demo ended early: {self.lines} {self.stderr()}")
            self._pending += chunk
        line, self._pending = self._pending.split(b"\n", 1)
        self.lines.append(line.decode(errors="replace"))
        return self.lines[-1]

    def read_until(self, wanted: str) -> None:
        while not self.read_line().startswith(wanted):
            pass

    def close_stdout(self) -> None:
        assert self.process.stdout is not None
        self.process.stdout.close()

    def wait(self, timeout: float = 90.0) -> int:
        return self.process.wait(timeout=timeout)

    def stderr(self) -> str:
        if self.process.poll() is None or self.process.stderr is None:
            return ""
        return self.process.stderr.read().decode(errors="replace")

    def work_dirs(self) -> list[Path]:
        return sorted(self.base.glob("isofs-demo-*"))

    def force_clean_up(self) -> None:
        """Only when the demo itself failed to: its mounts and daemons, by path and PID."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for mnt in mounts_under(self.base):
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        for pid in daemons_under(self.base):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    if os.geteuid() != 0:
        pytest.skip("the demo needs root (isofs exec joins a cgroup)")
    run = Demo(tmp_path)
    try:
        yield run
    finally:
        run.force_clean_up()


def assert_nothing_left(demo: Demo) -> None:
    assert mounts_under(demo.base) == []
    assert wait_until(lambda: not daemons_under(demo.base), timeout=5), daemons_under(demo.base)
    assert demo.work_dirs() == []


@pytest.mark.parametrize("when", ["first line", "first line once mounted"])
def test_demo_cleans_up_when_its_stdout_is_closed(demo: Demo, when: str) -> None:
    demo.read_line()
    if when != "first line":
        demo.read_until(AFTER_MOUNT)
        assert len(mounts_under(demo.base)) == 1 and daemons_under(demo.base)
    demo.close_stdout()
    status = demo.wait()
    stderr = demo.stderr()
    assert_nothing_left(demo)
    assert status == EXIT_STDOUT_CLOSED, stderr
    assert stderr == ""  # no traceback, and no clean-up that had to force anything


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_demo_cleans_up_when_stopped_by_a_signal(demo: Demo, signum: int) -> None:
    demo.read_until(AFTER_MOUNT)
    assert len(mounts_under(demo.base)) == 1
    demo.process.send_signal(signum)
    status = demo.wait()
    stderr = demo.stderr()
    assert_nothing_left(demo)
    assert status == 128 + signum, stderr
    assert stderr == ""


def test_demo_runs_to_the_end_and_unmounts(demo: Demo) -> None:
    out, err = demo.process.communicate(timeout=90)
    assert demo.process.returncode == 0, err
    text = out.decode(errors="replace")
    assert "Dear diary, the launch code is 0000." in text  # the target view
    assert "I   S   O   F   S   E   N   C" in text  # the native view: od of the ciphertext
    assert "# unmount" in text
    assert_nothing_left(demo)
