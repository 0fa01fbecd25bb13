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
from pathlib import Path

import pytest
from conftest import Mount, run_isofs

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
mounts = [l.split(" - ")[1].split()[0] for l in open("/proc/self/mountinfo") if " - " in l]
print(json.dumps({"files": seen, "isofs_mounts": mounts.count("fuse.isofs")}))
"""


def in_view(view: str, *argv: str | os.PathLike[str]) -> dict:
    result = run_isofs("exec", "--view", view, "--", "python3", "-c", PROBE, *argv)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def requests(mount: Mount) -> int:
    result = run_isofs("status", mount.mnt, "--json")
    assert result.returncode == 0, result.stderr
    return sum(int(op["count"]) for op in json.loads(result.stdout)["operations"].values())


def vault(tmp_path: Path) -> tuple[Path, Path]:
    source, passfile = tmp_path / "vault", tmp_path / "pass"
    source.mkdir()
    passfile.write_bytes(PASSPHRASE)
    result = run_isofs("init", source, "--provider", "encrypt", "--scrypt-n", "16384",
                       "--passfile", passfile)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return source, passfile


def write_as_target(path: Path, data: bytes) -> None:
    code = "import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))"
    result = run_isofs("exec", "--view", "target", "--", "python3", "-c", code, path, data.hex())
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
