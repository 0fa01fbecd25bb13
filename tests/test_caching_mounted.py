"""What the kernel may cache, seen through real mounts (docs/ARCHITECTURE.md §8).

Negative entries: a name that exists in no view is remembered by the kernel for
`--negative-timeout` seconds, so a second miss makes no LOOKUP; a name that exists in one view
only (the metadata directory; an encrypted name seen from the native view) is never remembered
as missing, or a process of the other view would not find it. A name created through the mount
is visible at once; one created behind the mount's back is seen once the timeout has passed.
Requests are counted with the daemon's own counters (`isofs status --json`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import Mount, run_isofs

pytestmark = pytest.mark.mount
PASSPHRASE = b"cache test passphrase\n"


def lookups(mount: Mount) -> int:
    result = run_isofs("status", mount.mnt, "--json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)["operations"].get("lookup", {}).get("count", 0))


def exists_in(view: str, path: Path) -> bool:
    """Whether a fresh process of `view` (an `isofs exec` group) finds `path`."""
    code = "import os, sys; print(os.path.lexists(sys.argv[1]))"
    result = run_isofs("exec", "--view", view, "--", "python3", "-c", code, path)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip() == "True"


def encrypted_source(tmp_path: Path, *init: str) -> tuple[Path, Path]:
    source, passfile = tmp_path / "vault", tmp_path / "pass"
    source.mkdir()
    passfile.write_bytes(PASSPHRASE)
    result = run_isofs("init", source, "--provider", "encrypt", "--scrypt-n", "16384",
                       "--passfile", passfile, *init)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return source, passfile


def test_a_miss_in_a_one_view_mount_is_remembered(tmp_path: Path, mount_factory) -> None:
    source, passfile = encrypted_source(tmp_path, "--encrypt-names")
    mount = mount_factory(source, None, "--passfile", passfile, "--default-view", "target",
                          "--no-exec", "--negative-timeout", "60")  # fmt: skip
    missing = mount.at("not-there")
    assert not missing.exists()
    before = lookups(mount)
    for _ in range(5):
        assert not missing.exists()
    assert lookups(mount) == before  # every miss answered by the kernel's negative entry
    missing.write_bytes(b"now it is")  # created through the mount: seen at once
    assert missing.read_bytes() == b"now it is"


def test_a_name_created_behind_the_mount_appears_after_the_negative_timeout(
    mount_factory,
) -> None:
    mount = mount_factory(None, None, "--default-view", "target", "--no-exec",
                          "--negative-timeout", "0.5", "--entry-timeout", "0.5")  # fmt: skip
    path = mount.at("later")
    assert not path.exists()
    mount.src("later").write_bytes(b"behind the mount")
    deadline = time.monotonic() + 5
    while not path.exists():  # stale for at most the timeout
        assert time.monotonic() < deadline, "never appeared"
        time.sleep(0.1)
    assert path.read_bytes() == b"behind the mount"


def test_zero_negative_timeout_remembers_nothing(mount_factory) -> None:
    mount = mount_factory(None, None, "--no-exec", "--negative-timeout", "0")
    missing = mount.at("nope")
    assert not missing.exists()
    before = lookups(mount)
    for _ in range(3):
        assert not missing.exists()
    assert lookups(mount) == before + 3


def test_the_metadata_directory_is_never_remembered_as_missing(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = encrypted_source(tmp_path)
    mount = mount_factory(source, None, "--passfile", passfile, "--negative-timeout", "60")
    meta = mount.at(".isofs")
    assert not exists_in("target", meta)  # hidden from the target view...
    assert exists_in("native", meta)  # ...and still there for a native process right after
    assert not exists_in("target", meta)


def test_with_encrypted_names_a_name_of_one_view_is_never_remembered_as_missing(
    tmp_path: Path, mount_factory
) -> None:
    source, passfile = encrypted_source(tmp_path, "--encrypt-names")
    mount = mount_factory(source, None, "--passfile", passfile, "--negative-timeout", "60")
    plain = mount.at("report.txt")
    code = "import sys; open(sys.argv[1], 'wb').write(b'secret')"
    result = run_isofs("exec", "--view", "target", "--", "python3", "-c", code, plain)
    assert result.returncode == 0, result.stderr
    assert not exists_in("native", plain)  # natively the name is encrypted...
    assert exists_in("target", plain)  # ...and the native miss did not hide it from targets
    native_names = [n for n in os.listdir(mount.src()) if not n.startswith(".isofs")]
    assert len(native_names) == 1 and native_names[0] != "report.txt"
    encrypted = mount.at(native_names[0])
    assert not exists_in("target", encrypted)  # a target miss of the native name...
    assert exists_in("native", encrypted)  # ...does not hide it from native processes
    # a name that exists in no view is remembered, whichever view asked first
    before = lookups(mount)
    for view in ("native", "target", "native"):
        assert not exists_in(view, mount.at("in-no-view"))
    # each process walks "/" (the mount root) fresh, but the missing name costs one lookup
    assert lookups(mount) - before <= 2


# ------------------------------------------- listed entries (their descriptor opened on use)

LIST = """import os, sys
with os.scandir(sys.argv[1]) as it:
    print(sorted((e.name, e.stat().st_size) for e in it))"""
READ = "import sys; sys.stdout.write(open(sys.argv[1]).read())"


def in_process(code: str, *args: object) -> str:
    """Run `code` in a separate process (views and kernel caches are per request, not per
    test process) and return what it printed."""
    result = subprocess.run([sys.executable, "-c", code, *map(str, args)],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


def cached_mount(mount_factory) -> Mount:  # type: ignore[no-untyped-def]
    """A one-view mount whose names and attributes the kernel keeps for a minute: what the
    kernel holds from a listing is what the next process uses, without asking again."""
    return mount_factory(None, None, "--default-view", "target", "--no-exec",
                         "--entry-timeout", "60", "--attr-timeout", "60")  # fmt: skip


def test_a_listed_file_renamed_and_unlinked_through_the_mount(mount_factory) -> None:
    mount = cached_mount(mount_factory)
    (mount.at("d")).mkdir()
    for name in ("a", "b"):
        mount.src("d", name).write_text(f"content of {name}")
    assert "('a', 12)" in in_process(LIST, mount.at("d"))
    in_process("import os, sys; os.rename(sys.argv[1], sys.argv[2])",
               mount.at("d", "a"), mount.at("moved"))  # fmt: skip
    assert in_process(READ, mount.at("moved")) == "content of a"
    assert mount.src("moved").read_text() == "content of a"
    in_process("import os, sys; os.unlink(sys.argv[1])", mount.at("d", "b"))
    assert not mount.src("d", "b").exists()
    assert in_process(LIST, mount.at("d")) == "[]\n"


def test_a_listed_file_replaced_behind_the_mount_reads_the_new_file(mount_factory) -> None:
    """The kernel still holds the listed name (entry timeout 60 s); its first use finds the
    name leads to another file now, answers ESTALE, and the kernel looks the name up again."""
    mount = cached_mount(mount_factory)
    mount.src("f").write_text("the first file")
    assert "('f', 14)" in in_process(LIST, mount.mnt)
    mount.src("f").rename(mount.src("old"))
    mount.src("f").write_text("the file there now")
    assert in_process(READ, mount.at("f")) == "the file there now"
    assert in_process(READ, mount.at("old")) == "the first file"
