"""Bad input to `isofs mount` / `isofs umount`: one clear line, a non-zero exit, no traceback,
nothing left mounted; and what happens when the daemon dies under a live mount."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import daemons_for

import isofs
from isofs.daemon import runtime
from isofs.daemon import serve as daemon

pytestmark = pytest.mark.mount

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
NOBODY = 65534


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode != 0, f"expected a failure, got exit 0; stderr: {result.stderr!r}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {result.stderr!r}"
    assert lines[0].startswith("isofs: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def assert_nothing_mounted(mountpoint: Path) -> None:
    real = os.path.realpath(mountpoint)
    assert real not in runtime.mounted_filesystems(), f"{real} is mounted"
    # the failed daemon may take a moment to exit after reporting
    deadline = time.monotonic() + 5
    while daemons_for(mountpoint) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not daemons_for(mountpoint), "a daemon for the mount point is still running"
    assert runtime.MountRecord.load(real) is None


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    src, mnt = tmp_path / "src", tmp_path / "mnt"
    src.mkdir()
    mnt.mkdir()
    (src / "file").write_text("x")
    return src, mnt


# ---------------------------------------------------------------------------- mount


def test_missing_source(isofs_cli, dirs, tmp_path):
    _, mnt = dirs
    result = isofs_cli("mount", tmp_path / "nope", mnt, "--log", tmp_path / "log")
    assert_one_line_error(result, "source", "does not exist")
    assert_nothing_mounted(mnt)


def test_source_is_a_file(isofs_cli, dirs, tmp_path):
    src, mnt = dirs
    result = isofs_cli("mount", src / "file", mnt, "--log", tmp_path / "log")
    assert_one_line_error(result, "not a directory")
    assert_nothing_mounted(mnt)


def test_missing_mount_point(isofs_cli, dirs, tmp_path):
    src, _ = dirs
    result = isofs_cli("mount", src, tmp_path / "nope", "--log", tmp_path / "log")
    assert_one_line_error(result, "mount point", "does not exist")
    assert_nothing_mounted(tmp_path / "nope")


def test_mount_point_is_a_file(isofs_cli, dirs, tmp_path):
    src, _ = dirs
    (tmp_path / "plain").write_text("x")
    result = isofs_cli("mount", src, tmp_path / "plain", "--log", tmp_path / "log")
    assert_one_line_error(result, "mount point", "not a directory")
    assert_nothing_mounted(tmp_path / "plain")


def test_mount_point_already_mounted(isofs_cli, mount, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    result = isofs_cli("mount", other, mount.mnt, "--log", tmp_path / "log2")
    assert_one_line_error(result, "already mounted")
    # the first mount is untouched
    assert mount.is_mounted and mount.daemon_running
    assert daemons_for(mount.mnt) == [mount.pid]
    (mount.at("still")).write_text("works")
    assert mount.src("still").read_text() == "works"
    assert not (other / "still").exists()


def test_mount_point_not_empty(isofs_cli, dirs, tmp_path):
    src, mnt = dirs
    (mnt / "something").write_text("x")
    result = isofs_cli("mount", src, mnt, "--log", tmp_path / "log")
    assert_one_line_error(result, "not empty")
    assert_nothing_mounted(mnt)


def test_in_place_mount_of_non_empty_directory_works(mount_factory, dirs):
    src, _ = dirs
    mount = mount_factory(src, src)
    assert mount.is_mounted
    assert (src / "file").read_text() == "x"
    assert mount.umount().returncode == 0


def test_mount_point_inside_source(isofs_cli, dirs, tmp_path):
    src, _ = dirs
    inner = src / "inner"
    inner.mkdir()
    result = isofs_cli("mount", src, inner, "--log", tmp_path / "log")
    assert_one_line_error(result, "inside the source")
    assert_nothing_mounted(inner)


def test_unknown_option(isofs_cli, dirs, tmp_path):
    src, mnt = dirs
    result = isofs_cli("mount", "--bogus", src, mnt)
    assert_one_line_error(result, "--bogus")
    assert result.returncode == 2
    assert_nothing_mounted(mnt)
    assert_one_line_error(isofs_cli("frobnicate"))
    assert_one_line_error(isofs_cli("mount", src))
    assert_one_line_error(isofs_cli("umount", mnt, "--bogus"), "--bogus")


def test_log_file_in_missing_directory(isofs_cli, dirs, tmp_path):
    src, mnt = dirs
    result = isofs_cli("mount", src, mnt, "--log", tmp_path / "no" / "such" / "log")
    assert_one_line_error(result, "log")
    assert_nothing_mounted(mnt)


# --------------------------------------------------------------------------- umount


def test_umount_not_mounted(isofs_cli, dirs, tmp_path):
    _, mnt = dirs
    assert_one_line_error(isofs_cli("umount", mnt), "not mounted")
    assert_one_line_error(isofs_cli("umount", tmp_path / "nope"), "not mounted")


def test_umount_twice(mount, isofs_cli):
    assert mount.umount().returncode == 0
    assert_one_line_error(isofs_cli("umount", mount.mnt), "not mounted")


def test_umount_busy(mount, isofs_cli):
    busy = subprocess.Popen(["sleep", "60"], cwd=mount.mnt)
    try:
        time.sleep(0.1)
        result = isofs_cli("umount", mount.mnt)
        assert_one_line_error(result, "busy", "--lazy")
        assert mount.is_mounted and mount.daemon_running
        assert os.listdir(mount.mnt) == []  # still served
    finally:
        busy.kill()
        busy.wait()
    assert mount.umount().returncode == 0
    assert not mount.is_mounted and not mount.daemon_running


def test_umount_lazy_of_busy_mount(mount, isofs_cli):
    busy = subprocess.Popen(["sleep", "60"], cwd=mount.mnt)
    try:
        time.sleep(0.1)
        assert isofs_cli("umount", mount.mnt).returncode != 0
        started = time.monotonic()
        result = isofs_cli("umount", "--lazy", "--timeout", "3", mount.mnt)
        assert not mount.is_mounted  # detached at once, whatever the exit status
        assert result.returncode == 0, result.stderr
        assert time.monotonic() - started < 2.5
    finally:
        busy.kill()
        busy.wait()
    # the daemon ends once the last user has left
    deadline = time.monotonic() + 5
    while mount.daemon_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mount.daemon_running


def test_umount_lazy_detaches_busy_mount_and_daemon_ends_after(mount, isofs_cli):
    """What works today: --lazy detaches; the daemon exits when the busy process leaves."""
    busy = subprocess.Popen(["sleep", "60"], cwd=mount.mnt)
    try:
        time.sleep(0.1)
        result = isofs_cli("umount", "--lazy", "--timeout", "0.5", mount.mnt)
        assert "Traceback" not in result.stderr
        assert not mount.is_mounted
        assert mount.daemon_running  # still serving the busy process
        assert os.listdir(f"/proc/{busy.pid}/cwd") == []
    finally:
        busy.kill()
        busy.wait()
    deadline = time.monotonic() + 5
    while mount.daemon_running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mount.daemon_running
    assert runtime.MountRecord.load(os.path.realpath(mount.mnt)) is None


# ------------------------------------------------------------------------ /dev/fuse


def _python_path_for_children() -> str:
    """PYTHONPATH that lets another interpreter import isofs and its dependencies."""
    import pyfuse3
    import trio

    entries = [
        os.path.dirname(os.path.dirname(os.path.abspath(isofs.__file__))),
        os.path.dirname(os.path.dirname(os.path.abspath(pyfuse3.__file__))),
        os.path.dirname(os.path.dirname(os.path.abspath(trio.__file__))),
    ]
    return os.pathsep.join(dict.fromkeys(entries))


@root_only
@pytest.mark.skipif(
    os.path.exists("/dev/fuse") and stat.S_IMODE(os.stat("/dev/fuse").st_mode) & 0o006 == 0o006,
    reason="/dev/fuse is usable by everyone here (see test_check_mount_without_dev_fuse_access)",
)
def test_no_permission_on_dev_fuse(other_user_python):
    """Run the real CLI as user nobody, who may not open /dev/fuse."""
    python = other_user_python
    with tempfile.TemporaryDirectory(prefix="isofs-nobody-") as base:
        os.chmod(base, 0o755)
        for name in ("src", "mnt", "run"):
            os.mkdir(os.path.join(base, name), 0o700)
            os.chown(os.path.join(base, name), NOBODY, NOBODY)
        env = {
            "PATH": os.defpath,
            "PYTHONPATH": _python_path_for_children(),
            "XDG_RUNTIME_DIR": os.path.join(base, "run"),
            "LANG": "C.UTF-8",
        }
        probe = subprocess.run(
            [python, "-c", "import isofs.cli, pyfuse3, trio"],
            user=NOBODY, group=NOBODY, env=env, cwd="/", capture_output=True, text=True,
        )  # fmt: skip
        if probe.returncode != 0:
            pytest.skip(f"isofs cannot be imported as nobody: {probe.stderr.strip()[-200:]}")
        mnt = os.path.join(base, "mnt")
        result = subprocess.run(
            [python, "-m", "isofs", "mount", os.path.join(base, "src"), mnt,
             "--log", os.path.join(base, "run", "log")],
            user=NOBODY, group=NOBODY, env=env, cwd="/", capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
        try:
            assert_one_line_error(result, "/dev/fuse", "permission")
            assert mnt not in runtime.mounted_filesystems()
        finally:
            if mnt in runtime.mounted_filesystems():
                subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)


def test_check_mount_without_dev_fuse_access(monkeypatch, dirs):
    """In-process variant that works wherever /dev/fuse is open to everyone."""
    src, mnt = dirs
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # type: ignore[no-untyped-def]
        if os.fspath(path) == "/dev/fuse":
            return False
        return real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    with pytest.raises(daemon.MountError, match="no permission to use /dev/fuse"):
        daemon.check_mount(daemon.MountOptions(source=str(src), mountpoint=str(mnt)))


# -------------------------------------------------------------------- dead daemon


def kill_daemon(mount) -> None:  # type: ignore[no-untyped-def]
    os.kill(mount.pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while mount.daemon_running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not mount.daemon_running


def test_killed_daemon_then_umount_and_remount(mount, mount_factory, isofs_cli, tmp_path):
    mount.at("f").write_text("before")
    kill_daemon(mount)
    # a request caught in flight by the abort fails with ECONNABORTED, later ones ENOTCONN
    with pytest.raises(OSError) as info:
        os.stat(mount.mnt)
    assert info.value.errno in (errno.ENOTCONN, errno.ECONNABORTED)
    with pytest.raises(OSError) as info:
        os.listdir(mount.mnt)
    assert info.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as info:
        os.stat(mount.mnt)
    assert info.value.errno == errno.ENOTCONN
    assert mount.is_mounted  # dead, but still in the mount table
    # mounting over it again says what to do
    other = tmp_path / "other"
    other.mkdir()
    result = isofs_cli("mount", other, mount.mnt, "--log", tmp_path / "log-dead")
    assert_one_line_error(result, "dead mount", "isofs umount")
    # umount cleans it up
    result = isofs_cli("umount", mount.mnt)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert not mount.is_mounted
    assert os.listdir(mount.mnt) == []
    # and a new mount on the same mount point works
    again = mount_factory(mount.source, mount.mnt)
    assert again.at("f").read_text() == "before"
    assert again.umount().returncode == 0


def test_umount_of_dead_mount_removes_its_record(mount, isofs_cli):
    kill_daemon(mount)
    assert isofs_cli("umount", mount.mnt).returncode == 0
    real = os.path.realpath(mount.mnt)
    assert runtime.MountRecord.load(real) is None
    assert not runtime.MountRecord.paths_for(real)[2].exists()


def test_daemon_sigterm_unmounts_cleanly(mount):
    mount.at("f").write_text("x")
    os.kill(mount.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while (mount.daemon_running or mount.is_mounted) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not mount.daemon_running
    assert not mount.is_mounted
    assert runtime.MountRecord.load(os.path.realpath(mount.mnt)) is None
    assert "SIGTERM" in mount.log_text()


def test_foreground_mount_reports_errors_itself(isofs_cli, dirs, tmp_path):
    src, mnt = dirs
    (mnt / "x").write_text("x")
    result = isofs_cli("mount", "--foreground", src, mnt, "--log", tmp_path / "log")
    assert_one_line_error(result, "not empty")
    assert_nothing_mounted(mnt)


def test_foreground_mount_serves_until_signalled(dirs, tmp_path):
    src, mnt = dirs
    process = subprocess.Popen(
        [sys.executable, "-m", "isofs", "mount", "--foreground", src, mnt,
         "--log", tmp_path / "log"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while os.fspath(mnt) not in runtime.mounted_filesystems():
            assert process.poll() is None, process.stderr.read() if process.stderr else ""
            assert time.monotonic() < deadline, "foreground mount did not come up"
            time.sleep(0.02)
        assert (mnt / "file").read_text() == "x"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 0
        assert os.fspath(mnt) not in runtime.mounted_filesystems()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        if os.fspath(mnt) in runtime.mounted_filesystems():
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mnt)], capture_output=True)
        with contextlib.suppress(AttributeError):
            process.stderr.close()  # type: ignore[union-attr]


def test_providers_command(isofs_cli):
    result = isofs_cli("providers")
    assert result.returncode == 0
    assert "passthrough" in result.stdout


def test_daemon_environment_adds_the_heap_tunable_once(monkeypatch):
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    assert daemon.daemon_environment()["GLIBC_TUNABLES"] == daemon.HEAP_TUNABLE
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.arena_max=2")
    env = daemon.daemon_environment()
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{daemon.HEAP_TUNABLE}"
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.hugetlb=0")  # the user's choice wins
    assert daemon.daemon_environment()["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
