"""Times set explicitly stick: nothing the daemon reads for a transformed view moves an atime.

Under relatime the first read of a file, listing of a directory or readlink of a symlink after
its atime was set earlier than its mtime (or more than a day back) replaces that atime with
the current time. The daemon reads native files for its own reasons (format probe, header,
size, key files, sidecars, symlink targets, listings of the target view), and a user's read
through the target view is served from its page cache: none of it may touch an atime
(docs/ARCHITECTURE.md section 2, "Reaching native files"). A process of the native view reads
native bytes and gets the native filesystem's own atime behaviour.

Two-view mounts: a copy of the interpreter is the target view, this process the native one.
The source itself is the truth the views are checked against.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import Mount, MountManager, run_isofs, wait_until

from isofs.core.volume import SHARED_TTL

pytestmark = pytest.mark.mount

DAY = 86_400 * 10**9
OBJECTS = ("file", "dir", "dir/inside", "link", "fifo")
_vaults = itertools.count()


@dataclass(frozen=True)
class Python:
    """An interpreter whose /proc/PID/exe differs from this process's (the target view)."""

    exe: str
    env: dict[str, str]

    def run(self, code: str, *args: str | os.PathLike[str]) -> str:
        result = subprocess.run(
            [self.exe, "-c", code, *map(os.fspath, args)],
            capture_output=True, text=True, timeout=60, env=self.env, cwd="/",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout


@pytest.fixture(scope="module")
def target_python(tmp_path_factory: pytest.TempPathFactory) -> Python:
    copy = tmp_path_factory.mktemp("times-python") / "python3"
    shutil.copy2(os.path.realpath(sys.executable), copy)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for env in (base, {**base, "PYTHONHOME": sys.base_prefix}):
        probe = subprocess.run(
            [copy, "-c", "import json, mmap"], capture_output=True, env=env, timeout=60
        )
        if probe.returncode == 0:
            return Python(os.fspath(copy), env)
    pytest.skip("a copy of the interpreter cannot find its standard library")


def make_vault(base: Path, *init_args: str) -> tuple[Path, tuple[str, ...]]:
    """An encrypt source; returns it and the mount arguments for its passphrase."""
    n = next(_vaults)
    source, passfile = base / f"vault{n}", base / f"pass{n}"
    source.mkdir()
    passfile.write_text("times test passphrase\n")
    result = run_isofs(
        "init", source, "--provider", "encrypt", "--scrypt-n", "16384",
        "--passfile", passfile, *init_args,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return source, ("--passfile", os.fspath(passfile))


def chosen_times() -> dict[str, tuple[int, int]]:
    """(atime, mtime) per object: relatime would replace every one of these atimes.

    Most atimes are earlier than the mtime; the one of dir/inside is later but days old.
    """
    now = time.time_ns()
    return {
        "file": (now - 5 * DAY + 123_456_789, now - 2 * DAY + 987_654_321),
        "dir": (now - 6 * DAY + 111_111_111, now - 3 * DAY + 222_222_222),
        "dir/inside": (now - 2 * DAY + 333_333_333, now - 4 * DAY + 444_444_444),
        "link": (now - 7 * DAY + 555_555_555, now - 4 * DAY + 666_666_666),
        "fifo": (now - 8 * DAY + 777_777_777, now - DAY - 888_888_888),
    }


MAKE = r"""
import os, sys
root = sys.argv[1]
with open(os.path.join(root, "file"), "xb") as f:
    f.write(bytes(range(256)) * 300)          # more than one 64 KiB page
os.mkdir(os.path.join(root, "dir"))
with open(os.path.join(root, "dir", "inside"), "xb") as f:
    f.write(b"inside")
os.symlink("file", os.path.join(root, "link"))
os.mkfifo(os.path.join(root, "fifo"))
"""

SET_TIMES = r"""
import json, os, sys
root, times = sys.argv[1], json.loads(sys.argv[2])
for name in ("dir/inside", "file", "link", "fifo", "dir"):   # a directory after its entries
    os.utime(os.path.join(root, name), ns=tuple(times[name]), follow_symlinks=False)
"""

STAT = r"""
import json, os, sys
root = sys.argv[1]
print(json.dumps({name: [os.lstat(os.path.join(root, name)).st_atime_ns,
                         os.lstat(os.path.join(root, name)).st_mtime_ns]
                  for name in sys.argv[2:]}))
"""

USE = r"""
import mmap, os, sys
root = sys.argv[1]
path = os.path.join(root, "file")
with open(path, "rb") as f:
    assert f.read() == bytes(range(256)) * 300
    assert os.pread(f.fileno(), 10, 70_000) == (bytes(range(256)) * 300)[70_000:70_010]
    with mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as mapped:
        assert mapped[-1:] == b"\xff"
with open(path, "r+b") as f:                  # a writable open that writes nothing
    pass
assert os.listdir(os.path.join(root, "dir")) == ["inside"]
with open(os.path.join(root, "dir", "inside"), "rb") as f:
    assert f.read() == b"inside"
assert sorted(e.name for e in os.scandir(root)) == ["dir", "fifo", "file", "link"]
for entry in os.scandir(root):
    entry.stat(follow_symlinks=False)
assert os.readlink(os.path.join(root, "link")) == "file"
assert os.stat(os.path.join(root, "link")).st_size == 256 * 300
os.stat(os.path.join(root, "dir", "inside"))
"""


def quiet_listdir(directory: Path) -> list[str]:
    """A listing that moves no atime itself (O_NOATIME: the tests run as the owner or root)."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOATIME)
    try:
        return os.listdir(fd)
    finally:
        os.close(fd)


def native_paths(source: Path) -> dict[str, Path]:
    """The stored object behind each view name (names may be encrypted: found by type)."""
    kinds = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFIFO: "fifo"}

    def entries(directory: Path) -> list[Path]:
        return [directory / n for n in quiet_listdir(directory) if not n.startswith(".isofs")]

    found = {kinds[stat.S_IFMT(p.lstat().st_mode)]: p for p in entries(source)}
    assert sorted(found) == ["dir", "fifo", "file", "link"], found
    (inside,) = entries(found["dir"])
    found["dir/inside"] = inside
    return found


def stored_times(source: Path) -> dict[str, tuple[int, int]]:
    """The times the source holds, read without moving any (lstat only)."""
    paths = native_paths(source)
    return {name: (paths[name].lstat().st_atime_ns, paths[name].lstat().st_mtime_ns)
            for name in OBJECTS}  # fmt: skip


def target_times(python: Python, root: Path) -> dict[str, tuple[int, int]]:
    shown = json.loads(python.run(STAT, root, *OBJECTS))
    return {name: tuple(times) for name, times in shown.items()}


def remount(mount: Mount, mount_factory: MountManager) -> Mount:
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: not mount.daemon_running, timeout=10.0)
    return mount_factory(mount.source, None, *mount.args)


@pytest.mark.parametrize(
    "init_args", [(), ("--encrypt-names",)], ids=["plain-names", "encrypted-names"]
)
def test_set_times_stick_in_the_target_view(tmp_path, mount_factory, target_python, init_args):
    source, secret = make_vault(tmp_path, *init_args)
    m = mount_factory(source, None, *secret, "--target", f"exe={target_python.exe}")
    target_python.run(MAKE, m.mnt)
    times = chosen_times()
    target_python.run(SET_TIMES, m.mnt, json.dumps(times))
    assert stored_times(source) == times
    assert target_times(target_python, m.mnt) == times
    target_python.run(USE, m.mnt)
    assert stored_times(source) == times, "reading through the target view moved a time"
    time.sleep(SHARED_TTL + 0.2)  # past the kernel's attribute cache
    assert target_times(target_python, m.mnt) == times
    # the native view (this process) shows the same times under the stored names
    for name, path in native_paths(source).items():
        st = m.at(path.relative_to(source)).lstat()
        assert (st.st_atime_ns, st.st_mtime_ns) == times[name], name
    # a fresh daemon: nothing cached, sizes and symlink targets read again
    m = remount(m, mount_factory)
    assert target_times(target_python, m.mnt) == times
    target_python.run(USE, m.mnt)
    assert stored_times(source) == times
    assert target_times(target_python, m.mnt) == times


def test_native_view_reads_behave_as_native_reads(tmp_path, mount_factory, target_python):
    """What the native view does to atimes is what the same reads do on the source's own
    filesystem (under relatime: they move), compared with a control tree beside it."""
    source, secret = make_vault(tmp_path, "--encrypt-names")
    m = mount_factory(source, None, *secret, "--target", f"exe={target_python.exe}")
    target_python.run(MAKE, m.mnt)
    times = chosen_times()
    target_python.run(SET_TIMES, m.mnt, json.dumps(times))
    control = tmp_path / "control"
    control.mkdir()
    (control / "file").write_bytes(b"control")
    (control / "dir").mkdir()
    (control / "dir" / "inside").write_bytes(b"inside")
    os.symlink("file", control / "link")
    for name in ("file", "dir", "link"):
        os.utime(control / name, ns=times[name], follow_symlinks=False)

    def read_all(paths: dict[str, Path]) -> None:
        paths["file"].read_bytes()
        os.listdir(paths["dir"])
        os.readlink(paths["link"])

    read_all({name: control / name for name in ("file", "dir", "link")})
    through_mount = {name: m.at(path.relative_to(source)) for name, path in
                     native_paths(source).items()}  # fmt: skip
    read_all(through_mount)
    stored = stored_times(source)
    for name in ("file", "dir", "link"):
        control_moved = (control / name).lstat().st_atime_ns != times[name][0]
        assert (stored[name][0] != times[name][0]) == control_moved, name
        assert stored[name][1] == times[name][1], name


def test_cp_preserves_times_into_the_target_view(tmp_path, mount_factory):
    """`cp -a` into a target view: what it set is what the view shows, also after use."""
    source, secret = make_vault(tmp_path, "--encrypt-names")
    m = mount_factory(source, None, *secret, "--default-view", "target", "--no-exec")
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"x" * 100_000)
    (tree / "dir").mkdir()
    (tree / "dir" / "inside").write_bytes(b"inside")
    os.symlink("file", tree / "link")
    os.mkfifo(tree / "fifo")
    times = chosen_times()
    for name in ("dir/inside", "file", "link", "fifo", "dir"):
        os.utime(tree / name, ns=times[name], follow_symlinks=False)
    subprocess.run(["cp", "-a", tree, m.at("copy")], check=True, timeout=60)

    def shown(copy: Path) -> dict[str, tuple[int, int]]:
        return {name: (copy.joinpath(name).lstat().st_atime_ns,
                       copy.joinpath(name).lstat().st_mtime_ns) for name in OBJECTS}  # fmt: skip

    assert shown(m.at("copy")) == times
    assert m.at("copy", "file").read_bytes() == b"x" * 100_000
    assert os.listdir(m.at("copy", "dir")) == ["inside"]
    assert os.readlink(m.at("copy", "link")) == "file"
    time.sleep(SHARED_TTL + 0.2)
    assert shown(m.at("copy")) == times
    m = remount(m, mount_factory)
    assert shown(m.at("copy")) == times


def test_read_only_mount_writes_no_time(tmp_path, mount_factory):
    """A read-only mount moves no file's or directory's atime and puts no symlink's back
    (that would set its ctime: a write to a source it promised to leave alone)."""
    source, secret = make_vault(tmp_path, "--encrypt-names")
    m = mount_factory(source, None, *secret, "--default-view", "target", "--no-exec")
    m.at("file").write_bytes(b"y" * 5000)
    m.at("dir").mkdir()
    m.at("dir", "inside").write_bytes(b"inside")
    os.symlink("file", m.at("link"))
    os.mkfifo(m.at("fifo"))
    times = chosen_times()
    for name in ("dir/inside", "file", "link", "fifo", "dir"):
        os.utime(m.at(name), ns=times[name], follow_symlinks=False)
    result = m.umount()
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: not m.daemon_running, timeout=10.0)
    paths = native_paths(source)
    before = {name: paths[name].lstat() for name in OBJECTS}
    m = mount_factory(source, None, *secret, "--default-view", "target", "--no-exec",
                      "--read-only")  # fmt: skip
    assert m.at("file").read_bytes() == b"y" * 5000
    assert os.listdir(m.at("dir")) == ["inside"] and m.at("dir", "inside").read_bytes()
    assert os.readlink(m.at("link")) == "file" and os.lstat(m.at("link")).st_size == 4
    for name in OBJECTS:
        st, old = paths[name].lstat(), before[name]
        assert (st.st_mtime_ns, st.st_ctime_ns) == (old.st_mtime_ns, old.st_ctime_ns), name
        if name != "link":
            assert st.st_atime_ns == old.st_atime_ns == times[name][0], name
