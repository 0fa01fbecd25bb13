"""`isofs exec` views that skip the per-process machinery (ARCHITECTURE §9), through real mounts.

`--view native`: the command runs in a private mount namespace where the mount point is the
source directory itself, so it reads native bytes with no FUSE request at all; the shared
mount still notices what it changes. `--view target`: the command enters the namespace of the
mount's target-view daemon, a one-view mount of its own, coherent with the shared mount at the
next open.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, run_isofs, wait_until

pytestmark = pytest.mark.mount
PASSPHRASE = b"exec view passphrase\n"

PROBE = """
import json, os, sys
root = sys.argv[1]
seen = {}
for name in sorted(os.listdir(root)):
    path = os.path.join(root, name)
    if os.path.isfile(path):
        with open(path, "rb") as f:
            seen[name] = [os.stat(path).st_size, f.read().hex()]
mounts = [(l.split()[4], l.split(" - ")[1].split()[0]) for l in open("/proc/self/mountinfo")]
at_root = [fstype for point, fstype in mounts if point == os.path.realpath(root)]
print(json.dumps({"files": seen, "isofs_mounts": at_root.count("fuse.isofs")}))
"""


def in_view(view: str, *argv: str | os.PathLike[str], cwd: Path | None = None) -> dict:
    result = run_isofs("exec", "--view", view, "--", "python3", "-c", PROBE, *argv, cwd=cwd)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def requests(mount: Mount) -> int:
    result = run_isofs("status", mount.mnt, "--json")
    assert result.returncode == 0, result.stderr
    return sum(int(op["count"]) for op in json.loads(result.stdout)["operations"].values())


def vault(tmp_path: Path, *init: str) -> tuple[Path, Path]:
    source, passfile = tmp_path / "vault", tmp_path / "pass"
    source.mkdir()
    passfile.write_bytes(PASSPHRASE)
    result = run_isofs("init", source, "--provider", "encrypt", "--scrypt-n", "16384",
                       "--passfile", passfile, *init)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return source, passfile


def write_as_target(path: Path, data: bytes, cwd: Path | None = None) -> None:
    code = "import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"
    result = run_isofs(
        "exec", "--view", "target", "--", "python3", "-c", code, path, data.hex(), cwd=cwd
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("in_place", [False, True], ids=["mount-point", "in-place"])
def test_native_exec_reads_the_source_with_no_fuse_request(
    tmp_path: Path, mount_factory, in_place: bool
) -> None:
    source, passfile = vault(tmp_path)
    mount = mount_factory(source, source if in_place else None, "--passfile", passfile)
    write_as_target(mount.at("doc"), b"plaintext only a target sees")
    before = requests(mount)
    seen = in_view("native", mount.mnt)
    assert requests(mount) - before <= 1  # the status call itself; the command made none
    assert seen["isofs_mounts"] == 0
    native_bytes = mount.src("doc").read_bytes()  # (through the mount when in place)
    assert native_bytes[:8] == b"ISOFSENC" and b"plaintext" not in native_bytes
    assert seen["files"]["doc"] == [len(native_bytes), native_bytes.hex()]


def test_changes_made_by_a_native_exec_are_seen_by_the_target_view(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = vault(tmp_path)
    mount = mount_factory(source, None, "--passfile", passfile)
    write_as_target(mount.at("a"), b"first version")
    write_as_target(mount.at("b"), b"keep me")
    assert in_view("target", mount.mnt)["files"]["a"][1] == b"first version".hex()
    # a native process (a restore, say) puts b's native bytes in place of a's
    code = "import shutil, sys; shutil.copyfile(sys.argv[1] + '/b', sys.argv[1] + '/a')"
    result = run_isofs("exec", "--view", "native", "--", "python3", "-c", code, mount.mnt)
    assert result.returncode == 0, result.stderr
    seen = in_view("target", mount.mnt)["files"]
    assert seen["a"] == [len(b"keep me"), b"keep me".hex()]  # new native bytes, new plaintext


def status_of(mount: Mount) -> dict:
    result = run_isofs("status", mount.mnt, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def mount_device_seen_by(pid: int, mountpoint: Path) -> str:
    """The device of the mount at `mountpoint` in process `pid`'s mount namespace."""
    devices = [line.split()[2] for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
               if line.split()[4] == os.path.realpath(mountpoint)]  # fmt: skip
    return devices[-1]


def test_target_exec_gets_a_one_view_mount_of_its_own(tmp_path: Path, mount_factory) -> None:
    from isofs.bench.fusetrace import FuseTrace

    source, passfile = vault(tmp_path, "--encrypt-names")
    mount = mount_factory(source, None, "--passfile", passfile)
    write_as_target(mount.at("plain.txt"), b"only targets read this", cwd=mount.mnt)
    view_daemon = status_of(mount)["target_view_daemon"]
    assert view_daemon is not None
    # natively: an encrypted name holding ciphertext
    native = [n for n in os.listdir(mount.src()) if not n.startswith(".isofs")]
    assert native != ["plain.txt"] and len(native) == 1
    assert b"only targets" not in mount.src(native[0]).read_bytes()
    seen = in_view("target", ".", cwd=mount.mnt)
    assert seen["files"]["plain.txt"] == [22, b"only targets read this".hex()]
    # the target-view daemon's mount caches names: repeated stats cost no request
    device = mount_device_seen_by(view_daemon, mount.mnt)
    assert device != mount_device_seen_by(os.getpid(), mount.mnt)
    major, minor = (int(n) for n in device.split(":"))
    code = "import os, sys\nfor _ in range(20): os.stat(sys.argv[1])"
    with FuseTrace((major << 20) | minor) as trace:
        result = run_isofs("exec", "--view", "target", "--", "python3", "-c", code,
                           "plain.txt", cwd=mount.mnt)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert trace.result.counts["FUSE_LOOKUP"] <= 2, trace.result.describe()
    # it ends with the shared mount
    assert mount.umount().returncode == 0
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{view_daemon}") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not os.path.exists(f"/proc/{view_daemon}/ns")


def test_a_native_process_reaching_the_target_mount_is_refused(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = vault(tmp_path)
    mount = mount_factory(source, None, "--passfile", passfile)
    write_as_target(mount.at("secret"), b"plaintext", cwd=mount.mnt)
    sleeper = subprocess.Popen(
        [sys.executable, "-m", "isofs", "exec", "--view", "target", "--", "sleep", "30"],
        cwd=mount.mnt,
    )
    try:
        deadline = time.monotonic() + 20
        inside = Path(f"/proc/{sleeper.pid}/root") / os.path.relpath(mount.mnt, "/")
        while time.monotonic() < deadline:  # until the sleeper runs in the target namespace
            if Path(f"/proc/{sleeper.pid}/comm").read_text().strip() == "sleep":
                break
            time.sleep(0.05)
        # this test process is of the native view: through the namespace it is refused
        with pytest.raises(PermissionError):
            (inside / "secret").read_bytes()
        with pytest.raises(PermissionError):
            os.listdir(inside)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_the_target_view_daemon_sees_changes_made_through_the_shared_mount(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = vault(tmp_path)
    mount = mount_factory(source, None, "--passfile", passfile)
    write_as_target(mount.at("a"), b"version one", cwd=mount.mnt)
    write_as_target(mount.at("b"), b"another text", cwd=mount.mnt)
    assert in_view("target", ".", cwd=mount.mnt)["files"]["a"][1] == b"version one".hex()
    mount.at("a").write_bytes(mount.at("b").read_bytes())  # native view, shared mount
    seen = in_view("target", ".", cwd=mount.mnt)["files"]
    assert seen["a"] == [12, b"another text".hex()]


def test_an_all_target_mount_is_one_view_and_native_exec_still_sees_the_source(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = vault(tmp_path)
    mount = mount_factory(source, None, "--passfile", passfile, "--default-view", "target")
    mount.at("f").write_bytes(b"plain for everyone here")
    status = status_of(mount)
    assert status["single_view"] == "target" and status["target_view_daemon"] is None
    seen = in_view("native", mount.mnt)
    assert seen["isofs_mounts"] == 0
    assert bytes.fromhex(seen["files"]["f"][1])[:8] == b"ISOFSENC"


def test_native_exec_shows_the_directory_under_a_mount_whose_daemon_was_killed(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = vault(tmp_path)
    (source / "kept.txt").write_bytes(b"native bytes under the dead mount")
    mount = mount_factory(source, source, "--passfile", passfile, "--default-view", "target")
    os.kill(mount.pid, 9)
    assert wait_until(lambda: not mount.daemon_running, timeout=10)
    with pytest.raises(OSError):
        os.listdir(mount.mnt)  # the dead mount answers ENOTCONN
    seen = in_view("native", mount.mnt)
    assert seen["isofs_mounts"] == 0
    assert bytes.fromhex(seen["files"]["kept.txt"][1]) == b"native bytes under the dead mount"
