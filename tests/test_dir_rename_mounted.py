"""rename(2) and rmdir of directories through a view with encrypted names (real mounts).

Natively every directory of that view holds its key file (`.isofs.diriv`), and a long name's
directory entry comes with a sidecar: a directory the view shows empty is natively not empty.
POSIX lets a directory be renamed over an empty one (it replaces it) and not over one with
entries (ENOTEMPTY); RENAME_NOREPLACE never replaces, RENAME_EXCHANGE swaps the two. The
mounts are single-view target mounts, so this process sees plaintext names; the source is
read directly to check what is stored.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import os
from pathlib import Path

import pytest
from conftest import Mount, MountManager, run_isofs, wait_until

pytestmark = pytest.mark.mount

DIRIV = ".isofs.diriv"
LONGNAME = ".isofs.longname."
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)
_vaults = itertools.count()


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) as a process calls it (Python's os has no flags)."""
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), os.fspath(old))


class Vault:
    """A source initialised with `--encrypt-names`, mounted with the target view only."""

    def __init__(self, base: Path) -> None:
        n = next(_vaults)
        self.source = base / f"vault{n}"
        self.source.mkdir()
        self.passfile = base / f"pass{n}"
        self.passfile.write_text("rename test passphrase\n")
        result = run_isofs(
            "init", self.source, "--provider", "encrypt", "--encrypt-names",
            "--scrypt-n", "16384", "--passfile", self.passfile,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    def mount(self, mount_factory: MountManager) -> Mount:
        return mount_factory(
            self.source, None, "--passfile", os.fspath(self.passfile),
            "--default-view", "target", "--no-exec",
        )  # fmt: skip


def unmount(mount: Mount) -> None:
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: not mount.daemon_running, timeout=10.0)


def tree(root: Path) -> dict[str, bytes | None]:
    """{relative path: file contents, or None for a directory} as a process sees it."""
    found: dict[str, bytes | None] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel + "/"
        for name in dirnames:
            found[prefix + name] = None
        for name in filenames:
            found[prefix + name] = Path(dirpath, name).read_bytes()
    return found


def native_dirs(source: Path) -> dict[str, list[str]]:
    """{native relative dir path: sorted native entries} of the stored tree (no .isofs)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(source):
        if Path(dirpath) == source:
            dirnames.remove(".isofs")
        found[os.path.relpath(dirpath, source)] = sorted(dirnames + filenames)
    return found


def native_dir_of(mount: Mount, *plain: str) -> Path:
    """The stored directory behind a plaintext path, found by inode number.

    A file on the source's device is numbered by its native st_ino (the view's st_ino is
    that number shifted, tagged with a view code), so the pair is matched via the source.
    """
    wanted = os.stat(mount.at(*plain)).st_ino >> 2
    for dirpath, dirnames, _ in os.walk(mount.source):
        for name in dirnames:
            if os.stat(os.path.join(dirpath, name)).st_ino == wanted:
                return Path(dirpath, name)
    raise AssertionError(f"no stored directory for {plain}")


def assert_no_plaintext(source: Path, plaintext: set[str]) -> None:
    for entries in native_dirs(source).values():
        for entry in entries:
            assert not any(p in entry for p in plaintext), entry


def make_full(mount: Mount, name: str) -> dict[str, bytes | None]:
    """A directory with a file, a long-named file and a subdirectory; returns its tree."""
    os.mkdir(mount.at(name))
    mount.at(name, "inner-file").write_bytes(b"inner " + name.encode())
    mount.at(name, "long-" + "l" * 250).write_bytes(b"long " + name.encode())
    os.mkdir(mount.at(name, "sub"))
    mount.at(name, "sub", "deep").write_bytes(b"deep " + name.encode())
    return tree(mount.at(name))


def test_directory_renamed_over_an_empty_one_replaces_it(tmp_path, mount_factory, sh):
    vault = Vault(tmp_path)
    m = vault.mount(mount_factory)
    moved = make_full(m, "alpha")
    os.mkdir(m.at("bravo"))
    alpha_key = (native_dir_of(m, "alpha") / DIRIV).read_bytes()
    sh(["mv", "-T", m.at("alpha"), m.at("bravo")])  # what a user types
    assert sorted(os.listdir(m.mnt)) == ["bravo"]
    assert tree(m.at("bravo")) == moved
    stored = native_dir_of(m, "bravo")
    assert (stored / DIRIV).read_bytes() == alpha_key  # the moved directory keeps its names
    # natively: one directory left at the root, every name encrypted, keys everywhere
    dirs = native_dirs(m.source)
    assert [e for e in dirs["."] if not e.startswith(".isofs")] == [stored.name]
    assert all(DIRIV in entries for entries in dirs.values())
    assert_no_plaintext(m.source, {"alpha", "bravo", "inner-file", "long-", "sub", "deep"})

    # long names on both sides: the stub takes over, the old name's sidecar goes
    long_c, long_d = "charlie-" + "c" * 247, "delta-" + "d" * 249
    os.mkdir(m.at(long_c))
    m.at(long_c, "in-c").write_bytes(b"c")
    os.mkdir(m.at(long_d))
    os.rename(m.at(long_c), m.at(long_d))
    assert sorted(os.listdir(m.mnt)) == sorted(["bravo", long_d])
    assert m.at(long_d, "in-c").read_bytes() == b"c"
    root = native_dirs(m.source)["."]
    stubs = [e for e in root if e.startswith(LONGNAME) and not e.endswith(".name")]
    sidecars = [e for e in root if e.startswith(LONGNAME) and e.endswith(".name")]
    assert len(stubs) == 1 and sidecars == [stubs[0] + ".name"]

    unmount(m)
    m = vault.mount(mount_factory)
    assert tree(m.mnt) == {
        "bravo": None, **{f"bravo/{k}": v for k, v in moved.items()},
        long_d: None, f"{long_d}/in-c": b"c",
    }  # fmt: skip


def test_rename_over_a_directory_with_entries_fails(tmp_path, mount_factory):
    vault = Vault(tmp_path)
    m = vault.mount(mount_factory)
    source_tree = make_full(m, "src-dir")
    os.mkdir(m.at("full"))
    m.at("full", "entry").write_bytes(b"still here")
    # a directory whose only entry has a long name: natively a key file, a stub, a sidecar
    long_name = "only-" + "o" * 250
    os.mkdir(m.at("long-only"))
    m.at("long-only", long_name).write_bytes(b"long entry")
    before = native_dirs(m.source)
    keys = {d: (native_dir_of(m, d) / DIRIV).read_bytes() for d in ("full", "long-only")}
    for target in ("full", "long-only"):
        with pytest.raises(OSError) as info:
            os.rename(m.at("src-dir"), m.at(target))
        assert info.value.errno == errno.ENOTEMPTY, target
        assert (native_dir_of(m, target) / DIRIV).read_bytes() == keys[target]
    assert native_dirs(m.source) == before
    assert tree(m.at("src-dir")) == source_tree
    assert m.at("full", "entry").read_bytes() == b"still here"
    assert os.listdir(m.at("long-only")) == [long_name]
    assert m.at("long-only", long_name).read_bytes() == b"long entry"
    # rmdir says the same, through the same mechanism
    with pytest.raises(OSError) as info:
        os.rmdir(m.at("long-only"))
    assert info.value.errno == errno.ENOTEMPTY
    assert native_dirs(m.source) == before
    # once the long-named entry is gone (its sidecar with it) the directory is empty
    os.unlink(m.at("long-only", long_name))
    assert native_dirs(m.source)[native_dir_of(m, "long-only").name] == [DIRIV]
    os.rename(m.at("src-dir"), m.at("long-only"))
    assert tree(m.at("long-only")) == source_tree
    assert sorted(os.listdir(m.mnt)) == ["full", "long-only"]


def test_type_mismatches_leave_both_sides_alone(tmp_path, mount_factory):
    vault = Vault(tmp_path)
    m = vault.mount(mount_factory)
    os.mkdir(m.at("empty"))
    m.at("file").write_bytes(b"file")
    os.mkdir(m.at("dir"))
    before = native_dirs(m.source)
    with pytest.raises(OSError) as info:
        os.rename(m.at("file"), m.at("empty"))
    assert info.value.errno == errno.EISDIR
    with pytest.raises(OSError) as info:
        os.rename(m.at("dir"), m.at("file"))
    assert info.value.errno == errno.ENOTDIR
    assert native_dirs(m.source) == before
    assert m.at("file").read_bytes() == b"file" and os.listdir(m.at("empty")) == []


def test_noreplace_and_exchange_of_directories(tmp_path, mount_factory):
    vault = Vault(tmp_path)
    m = vault.mount(mount_factory)
    one = make_full(m, "one")
    two = make_full(m, "two")
    os.mkdir(m.at("empty"))
    key_of = {d: (native_dir_of(m, d) / DIRIV).read_bytes() for d in ("one", "two", "empty")}
    # RENAME_NOREPLACE never replaces, not even an empty directory
    before = native_dirs(m.source)
    with pytest.raises(OSError) as info:
        renameat2(m.at("one"), m.at("empty"), RENAME_NOREPLACE)
    assert info.value.errno == errno.EEXIST
    assert native_dirs(m.source) == before
    assert (native_dir_of(m, "empty") / DIRIV).read_bytes() == key_of["empty"]
    renameat2(m.at("one"), m.at("uno"), RENAME_NOREPLACE)  # to a new name it moves
    assert tree(m.at("uno")) == one and not os.path.lexists(m.at("one"))
    # RENAME_EXCHANGE swaps two directories, each with its own key and names
    renameat2(m.at("uno"), m.at("two"), RENAME_EXCHANGE)
    assert tree(m.at("uno")) == two and tree(m.at("two")) == one
    assert (native_dir_of(m, "two") / DIRIV).read_bytes() == key_of["one"]
    assert (native_dir_of(m, "uno") / DIRIV).read_bytes() == key_of["two"]
    renameat2(m.at("two"), m.at("empty"), RENAME_EXCHANGE)  # with an empty one too
    assert tree(m.at("empty")) == one and os.listdir(m.at("two")) == []
    assert (native_dir_of(m, "two") / DIRIV).read_bytes() == key_of["empty"]
    assert_no_plaintext(m.source, {"one", "two", "uno", "empty", "inner-file", "sub"})
    unmount(m)
    m = vault.mount(mount_factory)
    assert tree(m.at("empty")) == one and tree(m.at("uno")) == two
    assert os.listdir(m.at("two")) == []


def test_state_a_crash_between_the_steps_leaves_is_usable(tmp_path, mount_factory):
    """A crash after the key file of the replaced (empty) directory was removed and before
    the rename leaves that directory without a key file: it must read as empty, take new
    names, show names a native process put there as themselves, and go away normally."""
    vault = Vault(tmp_path)
    m = vault.mount(mount_factory)
    source_tree = make_full(m, "moving")
    for name in ("keyless", "keyless-2", "keyless-3"):
        os.mkdir(m.at(name))
    stored = {name: native_dir_of(m, name) for name in ("keyless", "keyless-2", "keyless-3")}
    unmount(m)
    for path in stored.values():
        (path / DIRIV).unlink()  # what the crash leaves
    (stored["keyless-3"] / "made-natively").write_bytes(b"native")
    m = vault.mount(mount_factory)
    assert os.listdir(m.at("keyless")) == []
    assert os.listdir(m.at("keyless-3")) == ["made-natively"]
    assert m.at("keyless-3", "made-natively").read_bytes() == b"native"
    m.at("keyless-2", "new-file").write_bytes(b"new")  # gets a new key
    assert os.listdir(m.at("keyless-2")) == ["new-file"]
    assert DIRIV in os.listdir(stored["keyless-2"])
    assert "new-file" not in os.listdir(stored["keyless-2"])
    os.rename(m.at("moving"), m.at("keyless"))  # the interrupted rename, done again
    assert tree(m.at("keyless")) == source_tree
    with pytest.raises(OSError) as info:
        os.rename(m.at("keyless"), m.at("keyless-3"))
    assert info.value.errno == errno.ENOTEMPTY
    os.unlink(m.at("keyless-3", "made-natively"))
    os.rmdir(m.at("keyless-3"))
    assert sorted(os.listdir(m.mnt)) == ["keyless", "keyless-2"]


def test_unaffected_without_encrypted_names(tmp_path, mount_factory):
    """Plain names (the native view of the same vault): an empty directory is empty."""
    vault = Vault(tmp_path)
    m = mount_factory(vault.source, None, "--passfile", os.fspath(vault.passfile))
    os.mkdir(m.at("a"))
    (m.at("a") / "f").write_bytes(b"f")
    os.mkdir(m.at("b"))
    os.rename(m.at("a"), m.at("b"))
    assert os.listdir(m.at("b")) == ["f"] and not os.path.lexists(m.at("a"))
