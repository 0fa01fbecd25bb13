"""The POSIX surface through a real mount, checked against what the source directory shows.

The test process is a separate process from the daemon, so it acts on the mount directly;
where another identity matters (ownership, --allow-other) a child process does the work.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
OTHER_UID = 1000
OTHER_GID = 1000


def renameat2(old: Path, new: Path, flags: int) -> None:
    result = _libc.renameat2(
        AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), ctypes.c_uint(flags)
    )
    if result != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(old))


def errno_of(fn, *args, **kwargs) -> int:  # type: ignore[no-untyped-def]
    """The errno `fn` fails with (0 when it succeeds)."""
    try:
        fn(*args, **kwargs)
    except OSError as exc:
        return exc.errno or -1
    return 0


def assert_same_stat(through_mount: os.stat_result, source: os.stat_result) -> None:
    """Everything stat() shows except st_ino/st_dev (the mount numbers its own inodes)."""
    fields = (
        "st_mode", "st_nlink", "st_uid", "st_gid", "st_size", "st_blocks", "st_rdev",
        "st_atime_ns", "st_mtime_ns", "st_ctime_ns",
    )  # fmt: skip
    mine = {f: getattr(through_mount, f) for f in fields}
    theirs = {f: getattr(source, f) for f in fields}
    assert mine == theirs


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ------------------------------------------------------------------------ attributes


def test_lookup_and_getattr_match_source(mount, sh):
    src = mount.source
    (src / "file").write_bytes(b"x" * 5000)
    (src / "dir").mkdir()
    (src / "dir" / "inner").write_text("inner")
    os.symlink("file", src / "link")
    os.link(src / "file", src / "hard")
    os.utime(src / "file", ns=(1_234_567_891_123_456_789, 1_300_000_000_987_654_321))
    for name in ("file", "dir", "dir/inner", "link", "hard"):
        assert_same_stat(os.lstat(mount.at(name)), os.lstat(src / name))
    # the root's attributes were cached at mount time: fresh within the attribute timeout
    assert wait_for(lambda: os.lstat(mount.mnt).st_nlink == 3, 1.1)
    assert_same_stat(os.lstat(mount.mnt), os.lstat(src))
    assert stat.S_ISLNK(os.lstat(mount.at("link")).st_mode)
    assert os.stat(mount.at("link")).st_size == 5000
    assert os.lstat(mount.at("file")).st_nlink == 2
    # st_ino is stable and the same through readdir, stat and every name of a file
    inos = {e.name: e.inode() for e in os.scandir(mount.mnt)}
    assert inos["file"] == inos["hard"] == os.stat(mount.at("file")).st_ino
    assert len(set(inos.values())) == len(inos) - 1
    assert os.lstat(mount.at("file")).st_ino == os.lstat(mount.at("file")).st_ino
    # another process sees the same
    out = sh(["stat", "-c", "%s %h %f", os.fspath(mount.at("file"))]).stdout.split()
    assert out == ["5000", "2", "81a4"]


def test_missing_name_is_enoent(mount):
    assert errno_of(os.stat, mount.at("nope")) == errno.ENOENT
    assert errno_of(os.stat, mount.at("nope", "deeper")) == errno.ENOENT
    (mount.src("file")).write_text("x")
    assert errno_of(os.stat, mount.at("file", "below")) == errno.ENOTDIR


def test_new_file_attributes_match_source(mount):
    path = mount.at("new")
    path.write_bytes(b"hello")
    assert_same_stat(os.stat(path), os.stat(mount.src("new")))
    assert stat.S_IMODE(os.stat(mount.src("new")).st_mode) == 0o666 & ~umask()


def test_chmod(mount):
    mount.at("f").write_text("x")
    mount.at("d").mkdir()
    for mode in (0o600, 0o751, 0o4755, 0o2711, 0o1777, 0o000):
        os.chmod(mount.at("f"), mode)
        assert stat.S_IMODE(os.stat(mount.src("f")).st_mode) == mode
        assert stat.S_IMODE(os.stat(mount.at("f")).st_mode) == mode
    os.chmod(mount.at("d"), 0o3700)
    assert stat.S_IMODE(os.stat(mount.src("d")).st_mode) == 0o3700
    assert_same_stat(os.stat(mount.at("d")), os.stat(mount.src("d")))


@root_only
def test_chown(mount):
    mount.at("f").write_text("x")
    os.symlink("f", mount.at("link"))
    os.chown(mount.at("f"), OTHER_UID, OTHER_GID)
    st = os.stat(mount.src("f"))
    assert (st.st_uid, st.st_gid) == (OTHER_UID, OTHER_GID)
    os.chown(mount.at("f"), -1, 0)
    st = os.stat(mount.src("f"))
    assert (st.st_uid, st.st_gid) == (OTHER_UID, 0)
    os.chown(mount.at("f"), 0, -1)
    assert (os.stat(mount.at("f")).st_uid, os.stat(mount.at("f")).st_gid) == (0, 0)
    # lchown changes the link itself, not its target
    os.chown(mount.at("link"), OTHER_UID, OTHER_GID, follow_symlinks=False)
    assert os.lstat(mount.src("link")).st_uid == OTHER_UID
    assert os.stat(mount.src("f")).st_uid == 0
    assert_same_stat(os.lstat(mount.at("link")), os.lstat(mount.src("link")))


def test_truncate_shrink_and_extend(mount):
    path = mount.at("f")
    path.write_bytes(b"abcdefghij")
    assert path.read_bytes() == b"abcdefghij"  # now in the kernel's page cache
    os.truncate(path, 4)
    assert mount.src("f").read_bytes() == b"abcd"
    assert path.read_bytes() == b"abcd"
    os.truncate(path, 10)
    assert mount.src("f").read_bytes() == b"abcd" + b"\0" * 6
    assert path.read_bytes() == b"abcd" + b"\0" * 6
    assert os.stat(path).st_size == 10
    # through an open descriptor (ftruncate), beyond a page
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, 3)
        assert os.pread(fd, 100, 0) == b"abc"
        os.ftruncate(fd, 70000)
        data = os.pread(fd, 80000, 0)
        assert data == b"abc" + b"\0" * 69997
        assert os.fstat(fd).st_size == 70000
    finally:
        os.close(fd)
    assert os.stat(mount.src("f")).st_size == 70000
    os.truncate(path, 0)
    assert path.read_bytes() == b""
    assert errno_of(os.truncate, mount.mnt, 0) == errno.EISDIR


def test_utimens(mount, sh):
    path = mount.at("f")
    path.write_text("x")
    os.utime(path, ns=(1_000_000_001_000_000_001, 1_100_000_002_000_000_002))
    st = os.stat(mount.src("f"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_000_000_001_000_000_001,
        1_100_000_002_000_000_002,
    )
    assert_same_stat(os.stat(path), st)
    # only atime (touch -a) and only mtime (touch -m), from another process
    sh(["touch", "-a", "-d", "@1200000000.5", os.fspath(path)])
    st = os.stat(mount.src("f"))
    assert st.st_atime_ns == 1_200_000_000_500_000_000
    assert st.st_mtime_ns == 1_100_000_002_000_000_002
    sh(["touch", "-m", "-d", "@1300000000.25", os.fspath(path)])
    st = os.stat(mount.src("f"))
    assert st.st_atime_ns == 1_200_000_000_500_000_000
    assert st.st_mtime_ns == 1_300_000_000_250_000_000
    # "now" for one of them only
    before = time.time_ns()
    sh(["touch", "-a", os.fspath(path)])
    st = os.stat(mount.src("f"))
    assert before - 2_000_000_000 <= st.st_atime_ns <= time.time_ns() + 2_000_000_000
    assert st.st_mtime_ns == 1_300_000_000_250_000_000
    os.utime(path)  # both now
    st = os.stat(mount.src("f"))
    assert st.st_mtime_ns >= before - 2_000_000_000
    assert_same_stat(os.stat(path), st)


def test_utimens_on_symlink_itself(mount):
    mount.at("f").write_text("x")
    os.symlink("f", mount.at("link"))
    target_before = os.stat(mount.src("f")).st_mtime_ns
    os.utime(mount.at("link"), ns=(1_000_000_000_000_000_123, 2_000_000_000_000_000_456),
             follow_symlinks=False)  # fmt: skip
    st = os.lstat(mount.src("link"))
    assert (st.st_atime_ns, st.st_mtime_ns) == (
        1_000_000_000_000_000_123,
        2_000_000_000_000_000_456,
    )
    assert os.stat(mount.src("f")).st_mtime_ns == target_before


# ------------------------------------------------------------------------ special files


def test_mknod_fifo_and_socket(mount, run_python):
    os.mkfifo(mount.at("fifo"), 0o640)
    st = os.stat(mount.src("fifo"))
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640 & ~umask()
    assert stat.S_ISFIFO(os.stat(mount.at("fifo")).st_mode)
    os.mknod(mount.at("sock"), stat.S_IFSOCK | 0o600)
    assert stat.S_ISSOCK(os.stat(mount.src("sock")).st_mode)
    # a FIFO on the mount carries data between two processes
    writer = subprocess.Popen(["sh", "-c", 'printf ping > "$1"', "sh", os.fspath(mount.at("fifo"))])
    try:
        with open(mount.at("fifo"), "rb") as f:
            assert f.read() == b"ping"
    finally:
        assert writer.wait(timeout=10) == 0
    # bind() of a unix socket creates it through the mount (relative name: short sun_path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    cwd = os.getcwd()
    try:
        os.chdir(mount.mnt)
        server.bind("bound.sock")
    finally:
        os.chdir(cwd)
        server.close()
    assert stat.S_ISSOCK(os.stat(mount.src("bound.sock")).st_mode)
    assert_same_stat(os.stat(mount.at("bound.sock")), os.stat(mount.src("bound.sock")))


@root_only
def test_mknod_char_device(mount):
    os.mknod(mount.at("null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    st = os.stat(mount.src("null"))
    assert stat.S_ISCHR(st.st_mode)
    assert st.st_rdev == os.makedev(1, 3)
    assert os.stat(mount.at("null")).st_rdev == os.makedev(1, 3)
    assert_same_stat(os.stat(mount.at("null")), st)


# ----------------------------------------------------------------------------- names


def test_mkdir_rmdir(mount):
    os.mkdir(mount.at("d"), 0o750)
    st = os.stat(mount.src("d"))
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750 & ~umask()
    assert errno_of(os.mkdir, mount.at("d")) == errno.EEXIST
    os.mkdir(mount.at("d", "sub"))
    assert os.stat(mount.at("d")).st_nlink == os.stat(mount.src("d")).st_nlink == 3
    (mount.at("d", "sub", "f")).write_text("x")
    assert errno_of(os.rmdir, mount.at("d")) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, mount.at("d", "sub")) == errno.ENOTEMPTY
    assert errno_of(os.rmdir, mount.at("d", "sub", "f")) == errno.ENOTDIR
    assert errno_of(os.rmdir, mount.at("missing")) == errno.ENOENT
    os.unlink(mount.at("d", "sub", "f"))
    os.rmdir(mount.at("d", "sub"))
    assert os.stat(mount.at("d")).st_nlink == 2
    os.rmdir(mount.at("d"))
    assert not mount.src("d").exists()
    assert not mount.at("d").exists()


def test_unlink(mount):
    mount.at("f").write_text("data")
    os.unlink(mount.at("f"))
    assert not mount.src("f").exists()
    assert errno_of(os.stat, mount.at("f")) == errno.ENOENT
    assert errno_of(os.unlink, mount.at("f")) == errno.ENOENT
    mount.at("d").mkdir()
    assert errno_of(os.unlink, mount.at("d")) == errno.EISDIR


def test_open_file_survives_unlink(mount):
    mount.at("f").write_text("still here")
    fd = os.open(mount.at("f"), os.O_RDWR)
    try:
        os.unlink(mount.at("f"))
        assert not mount.src("f").exists()
        assert os.pread(fd, 100, 0) == b"still here"
        os.pwrite(fd, b"STILL", 0)
        assert os.pread(fd, 100, 0) == b"STILL here"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    # the name can be reused at once
    mount.at("f").write_text("new")
    assert mount.src("f").read_text() == "new"


def test_rename(mount):
    a, b = mount.at("a"), mount.at("b")
    a.write_text("A")
    os.rename(a, b)
    assert not mount.src("a").exists() and mount.src("b").read_text() == "A"
    assert errno_of(os.stat, a) == errno.ENOENT
    assert b.read_text() == "A"
    # over an existing file: the old target is gone, a handle on it still reads it
    mount.at("c").write_text("C")
    fd = os.open(mount.at("c"), os.O_RDONLY)
    try:
        os.rename(b, mount.at("c"))
        assert mount.at("c").read_text() == "A"
        assert mount.src("c").read_text() == "A"
        assert os.pread(fd, 10, 0) == b"C"
    finally:
        os.close(fd)
    assert sorted(os.listdir(mount.mnt)) == ["c"]
    # across directories, files and directories
    mount.at("d1").mkdir()
    mount.at("d2").mkdir()
    os.rename(mount.at("c"), mount.at("d1", "c"))
    os.rename(mount.at("d1"), mount.at("d2", "d1"))
    assert mount.src("d2", "d1", "c").read_text() == "A"
    assert mount.at("d2", "d1", "c").read_text() == "A"
    assert os.stat(mount.at("d2")).st_nlink == 3
    # errors
    mount.at("f").write_text("f")
    assert errno_of(os.rename, mount.at("f"), mount.at("d2")) == errno.EISDIR
    assert errno_of(os.rename, mount.at("d2"), mount.at("f")) == errno.ENOTDIR
    assert errno_of(os.rename, mount.at("d2"), mount.at("d2", "d1", "x")) == errno.EINVAL
    mount.at("e").mkdir()
    assert errno_of(os.rename, mount.at("e"), mount.at("d2")) == errno.ENOTEMPTY
    os.rename(mount.at("d2", "d1", "c"), mount.at("d2", "d1", "c"))  # same name: no-op
    assert mount.src("d2", "d1", "c").read_text() == "A"
    assert errno_of(os.rename, mount.at("missing"), mount.at("x")) == errno.ENOENT


def test_rename_noreplace_and_exchange(mount):
    mount.at("a").write_text("A")
    mount.at("b").write_text("B")
    assert errno_of(renameat2, mount.at("a"), mount.at("b"), RENAME_NOREPLACE) == errno.EEXIST
    assert mount.src("a").read_text() == "A" and mount.src("b").read_text() == "B"
    renameat2(mount.at("a"), mount.at("c"), RENAME_NOREPLACE)
    assert mount.src("c").read_text() == "A" and not mount.src("a").exists()
    assert mount.at("c").read_text() == "A"
    renameat2(mount.at("c"), mount.at("b"), RENAME_EXCHANGE)
    assert mount.src("c").read_text() == "B" and mount.src("b").read_text() == "A"
    assert mount.at("c").read_text() == "B" and mount.at("b").read_text() == "A"
    # a file and a directory, across directories
    mount.at("d").mkdir()
    mount.at("d", "inner").write_text("I")
    renameat2(mount.at("b"), mount.at("d"), RENAME_EXCHANGE)
    assert mount.src("b", "inner").read_text() == "I"
    assert mount.src("d").read_text() == "A"
    assert mount.at("b", "inner").read_text() == "I"
    assert stat.S_ISREG(os.stat(mount.at("d")).st_mode)
    assert errno_of(renameat2, mount.at("c"), mount.at("missing"), RENAME_EXCHANGE) == (
        errno.ENOENT
    )


def test_hard_links(mount):
    a = mount.at("a")
    a.write_bytes(b"12345")
    mount.at("sub").mkdir()
    b = mount.at("sub", "b")
    os.link(a, b)
    assert os.stat(a).st_ino == os.stat(b).st_ino
    assert os.stat(a).st_nlink == os.stat(b).st_nlink == 2
    assert os.stat(mount.src("a")).st_ino == os.stat(mount.src("sub", "b")).st_ino
    assert os.stat(mount.src("a")).st_nlink == 2
    os.link(b, mount.at("c"))
    assert os.stat(a).st_nlink == os.stat(mount.at("c")).st_nlink == 3
    # writing through one name: the others see the bytes and the size
    with open(b, "ab") as f:
        f.write(b"678")
    for path in (a, b, mount.at("c")):
        assert os.stat(path).st_size == 8
        assert path.read_bytes() == b"12345678"
    # unlink through any name updates the count seen through the others
    os.unlink(a)
    assert os.stat(b).st_nlink == os.stat(mount.at("c")).st_nlink == 2
    os.unlink(mount.at("c"))
    assert os.stat(b).st_nlink == 1
    assert os.stat(mount.src("sub", "b")).st_nlink == 1
    assert b.read_bytes() == b"12345678"
    assert errno_of(os.link, b, mount.at("sub")) == errno.EEXIST
    assert errno_of(os.link, mount.at("sub"), mount.at("dirlink")) == errno.EPERM


def test_hard_link_to_symlink(mount):
    os.symlink("target", mount.at("link"))
    os.link(mount.at("link"), mount.at("link2"), follow_symlinks=False)
    assert os.readlink(mount.at("link2")) == "target"
    assert os.readlink(mount.src("link2")) == "target"
    assert os.lstat(mount.src("link")).st_nlink == 2
    assert os.lstat(mount.at("link2")).st_ino == os.lstat(mount.at("link")).st_ino


def test_symlinks(mount):
    mount.at("dir").mkdir()
    mount.at("dir", "file").write_text("content")
    mount.at("other").mkdir()
    os.symlink("../dir/file", mount.at("other", "rel"))
    absolute = os.fspath(mount.src("dir", "file"))
    os.symlink(absolute, mount.at("abs"))
    os.symlink("nowhere", mount.at("dangling"))
    long_target = "x/" * 2000 + "y"  # 4001 bytes
    os.symlink(long_target, mount.at("long"))
    assert os.readlink(mount.at("other", "rel")) == "../dir/file"
    assert os.readlink(mount.src("other", "rel")) == "../dir/file"
    assert os.readlink(mount.at("abs")) == absolute
    assert os.readlink(mount.at("long")) == long_target
    assert os.lstat(mount.at("long")).st_size == len(long_target)
    assert mount.at("other", "rel").read_text() == "content"
    assert mount.at("abs").read_text() == "content"
    st = os.lstat(mount.at("other", "rel"))
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("../dir/file")
    assert_same_stat(st, os.lstat(mount.src("other", "rel")))
    assert errno_of(os.stat, mount.at("dangling")) == errno.ENOENT
    assert stat.S_ISLNK(os.lstat(mount.at("dangling")).st_mode)
    assert errno_of(os.symlink, "x", mount.at("abs")) == errno.EEXIST
    assert errno_of(os.readlink, mount.at("dir", "file")) == errno.EINVAL
    fd = os.open(mount.at("dir"), os.O_RDONLY)
    try:
        assert errno_of(os.open, "../abs", os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd) in (
            errno.ELOOP,
            errno.EMLINK,
        )
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- I/O


def test_open_flags(mount):
    path = mount.at("f")
    path.write_bytes(b"0123456789")
    assert path.read_bytes() == b"0123456789"
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert mount.src("f").read_bytes() == b""
    assert path.read_bytes() == b""
    path.write_bytes(b"abc")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"def")
        os.pwrite(fd, b"ghi", 0)  # Linux: pwrite on O_APPEND appends too
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, b"jk")
    finally:
        os.close(fd)
    assert mount.src("f").read_bytes() == b"abcdefghijk"
    assert path.read_bytes() == b"abcdefghijk"
    assert errno_of(os.open, path, os.O_WRONLY | os.O_CREAT | os.O_EXCL) == errno.EEXIST
    fd = os.open(mount.at("new"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.close(fd)
    assert stat.S_IMODE(os.stat(mount.src("new")).st_mode) == 0o640 & ~umask()
    assert errno_of(os.open, mount.at("missing"), os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, mount.at("f", "x"), os.O_RDONLY) == errno.ENOTDIR
    assert errno_of(os.open, path, os.O_RDONLY | os.O_DIRECTORY) == errno.ENOTDIR
    assert errno_of(os.open, mount.mnt, os.O_WRONLY) == errno.EISDIR
    fd = os.open(path, os.O_RDONLY)
    try:
        assert errno_of(os.write, fd, b"x") == errno.EBADF
    finally:
        os.close(fd)


def test_append_from_several_processes(mount, run_python):
    path = mount.at("log")
    path.write_bytes(b"")
    code = (
        "import os, sys\n"
        "fd = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)\n"
        "for i in range(200):\n"
        "    os.write(fd, (sys.argv[2] * 9 + '\\n').encode())\n"
        "os.close(fd)\n"
    )
    children = [
        subprocess.Popen([sys.executable, "-c", code, os.fspath(path), letter]) for letter in "abc"
    ]
    for child in children:
        assert child.wait(timeout=60) == 0
    lines = mount.src("log").read_bytes().splitlines()
    assert len(lines) == 600
    assert sorted(set(lines)) == [b"a" * 9, b"b" * 9, b"c" * 9]
    assert path.read_bytes() == mount.src("log").read_bytes()


def test_read_write_at_offsets(mount):
    path = mount.at("f")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"AAAA", 0) == 4
        assert os.pwrite(fd, b"BBBB", 100) == 4
        assert os.pwrite(fd, b"CCCC", 5000) == 4
        assert os.pwrite(fd, b"DD", 2) == 2
        assert os.pread(fd, 4, 0) == b"AADD"
        assert os.pread(fd, 10, 98) == b"\0\0BBBB\0\0\0\0"
        assert os.pread(fd, 100, 5002) == b"CC"
        assert os.pread(fd, 100, 9000) == b""
        big = bytes(range(256)) * 1024  # 256 KiB, several FUSE requests
        assert os.pwrite(fd, big, 12345) == len(big)
        assert os.pread(fd, len(big), 12345) == big
        os.lseek(fd, 0, os.SEEK_SET)
        assert os.read(fd, 2) == b"AA"
        assert os.lseek(fd, 0, os.SEEK_END) == 12345 + len(big)
    finally:
        os.close(fd)
    expected = bytearray(12345 + len(big))
    expected[0:4] = b"AADD"
    expected[100:104] = b"BBBB"
    expected[5000:5004] = b"CCCC"
    expected[12345:] = big
    assert mount.src("f").read_bytes() == bytes(expected)
    assert path.read_bytes() == bytes(expected)


def test_sparse_file(mount):
    path = mount.at("sparse")
    size = 64 * 1024 * 1024
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"start", 0)
        os.pwrite(fd, b"end", size - 3)
        assert os.pread(fd, 8, size // 2) == b"\0" * 8
        assert os.pread(fd, 10, 5) == b"\0" * 10
        assert os.pread(fd, 3, size - 3) == b"end"
    finally:
        os.close(fd)
    st_src = os.stat(mount.src("sparse"))
    assert st_src.st_size == size
    assert st_src.st_blocks * 512 < 1024 * 1024  # still sparse in the source
    assert os.stat(path).st_blocks == st_src.st_blocks
    with open(path, "rb") as f:
        f.seek(size // 3)
        assert f.read(1 << 20) == b"\0" * (1 << 20)
    os.truncate(path, size * 2)  # extending by truncate makes a hole too
    assert os.stat(mount.src("sparse")).st_blocks == st_src.st_blocks


def test_fsync_fdatasync_and_flush_on_close(mount):
    path = mount.at("f")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"synced")
        os.fsync(fd)
        assert mount.src("f").read_bytes() == b"synced"
        os.write(fd, b" more")
        os.fdatasync(fd)
        assert mount.src("f").read_bytes() == b"synced more"
        dup = os.dup(fd)
        os.write(dup, b"!")
        os.close(dup)  # flush of one descriptor, the other stays usable
        os.write(fd, b"?")
    finally:
        os.close(fd)
    assert mount.src("f").read_bytes() == b"synced more!?"
    # buffered writes land at close
    with open(path, "a") as f:
        f.write("tail")
    assert mount.src("f").read_bytes() == b"synced more!?tail"


def test_writes_through_mount_visible_in_source_without_close(mount):
    fd = os.open(mount.at("f"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"live")
        assert mount.src("f").read_bytes() == b"live"  # no writeback cache
    finally:
        os.close(fd)


# ------------------------------------------------------------------------- directories


def test_readdir_matches_source(mount, sh):
    src = mount.source
    names = ["plain", "with space", "ünïcödé", "-dash", ".hidden", "d", "link", "fifo"]
    for name in names[:5]:
        (src / name).write_text(name)
    (src / "d").mkdir()
    os.symlink("plain", src / "link")
    os.mkfifo(src / "fifo")
    assert sorted(os.listdir(mount.mnt)) == sorted(os.listdir(src)) == sorted(names)
    listed = sh(["ls", "-a1", os.fspath(mount.mnt)]).stdout.splitlines()
    assert sorted(listed) == sorted([".", "..", *names])
    kinds = {
        e.name: (e.is_dir(follow_symlinks=False), e.is_symlink()) for e in os.scandir(mount.mnt)
    }
    assert kinds["d"] == (True, False)
    assert kinds["link"] == (False, True)
    assert kinds["plain"] == (False, False)
    # sub directory, including its ".." (inode of the parent directory)
    (src / "d" / "x").write_text("x")
    assert sh(["ls", "-a1", os.fspath(mount.at("d"))]).stdout.split() == [".", "..", "x"]
    assert os.stat(mount.at("d", "..")).st_ino == os.stat(mount.mnt).st_ino


def test_readdir_many_entries_exactly_once(mount, sh):
    count = 3000
    for i in range(count):
        (mount.source / f"entry-{i:05d}-{'x' * (i % 40)}").touch()
    names = os.listdir(mount.mnt)
    assert len(names) == count
    assert sorted(names) == sorted(os.listdir(mount.source))
    # another process, and readdir without stat
    listed = sh(["ls", "-1af", os.fspath(mount.mnt)]).stdout.splitlines()
    assert len(listed) == count + 2
    assert len(set(listed)) == count + 2
    # scandir again (now everything is cached in the kernel)
    assert sorted(e.name for e in os.scandir(mount.mnt)) == sorted(names)


def test_readdir_while_directory_changes(mount):
    for i in range(1000):
        (mount.source / f"f{i:04d}").touch()
    seen: list[str] = []
    with os.scandir(mount.mnt) as entries:
        for n, entry in enumerate(entries):
            seen.append(entry.name)
            if n == 50:
                for i in range(500, 1000):
                    os.unlink(mount.source / f"f{i:04d}")
                for i in range(100):
                    (mount.source / f"new{i:03d}").touch()
    assert len(seen) == len(set(seen)), "an entry was listed twice"
    survivors = {f"f{i:04d}" for i in range(500)}
    assert survivors <= set(seen), "an entry that stayed was not listed"


def test_fsyncdir(mount):
    mount.at("d").mkdir()
    fd = os.open(mount.at("d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)


def test_statfs(mount):
    through, direct = os.statvfs(mount.mnt), os.statvfs(mount.source)
    assert through.f_bsize == direct.f_bsize
    assert through.f_frsize == direct.f_frsize
    assert through.f_blocks == direct.f_blocks
    assert through.f_files == direct.f_files
    assert through.f_namemax == direct.f_namemax
    assert abs(through.f_bfree - direct.f_bfree) < direct.f_blocks // 100 + 1024


# ----------------------------------------------------------------------------- xattrs


def test_xattrs(mount):
    path = mount.at("f")
    path.write_text("x")
    mount.at("d").mkdir()
    os.setxattr(path, "user.color", b"blue")
    assert os.getxattr(mount.src("f"), "user.color") == b"blue"
    assert os.getxattr(path, "user.color") == b"blue"
    assert "user.color" in os.listxattr(path)
    os.setxattr(path, "user.color", b"red")
    assert os.getxattr(path, "user.color") == b"red"
    big = os.urandom(3000)
    os.setxattr(path, "user.big", big)
    assert os.getxattr(path, "user.big") == big
    assert sorted(n for n in os.listxattr(path) if n.startswith("user.")) == [
        "user.big",
        "user.color",
    ]
    assert errno_of(os.getxattr, path, "user.missing") == errno.ENODATA
    assert errno_of(os.setxattr, path, "user.color", b"x", os.XATTR_CREATE) == errno.EEXIST
    assert errno_of(os.setxattr, path, "user.nope", b"x", os.XATTR_REPLACE) == errno.ENODATA
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.empty") == b""
    os.removexattr(path, "user.color")
    assert errno_of(os.getxattr, path, "user.color") == errno.ENODATA
    assert errno_of(os.getxattr, mount.src("f"), "user.color") == errno.ENODATA
    assert errno_of(os.removexattr, path, "user.color") == errno.ENODATA
    # set behind the mount's back, on a directory
    os.setxattr(mount.src("d"), "user.dir", b"yes")
    assert os.getxattr(mount.at("d"), "user.dir") == b"yes"
    assert "user.dir" in os.listxattr(mount.at("d"))
    # symlinks: no user xattrs, like the native filesystem
    os.symlink("f", mount.at("link"))
    assert errno_of(os.getxattr, mount.at("link"), "user.x", follow_symlinks=False) == (
        errno.ENODATA
    )
    assert not [n for n in os.listxattr(mount.at("link"), follow_symlinks=False)
                if n.startswith("user.")]  # fmt: skip


def test_access(mount):
    mount.at("ro").write_text("x")
    os.chmod(mount.at("ro"), 0o444)
    mount.at("exe").write_text("#!/bin/sh\n")
    os.chmod(mount.at("exe"), 0o755)
    mount.at("d").mkdir()
    assert os.access(mount.at("ro"), os.R_OK)
    assert os.access(mount.at("exe"), os.R_OK | os.W_OK | os.X_OK)
    assert os.access(mount.at("d"), os.X_OK)
    assert not os.access(mount.at("missing"), os.F_OK)
    assert os.access(mount.at("ro"), os.X_OK) is False  # even root needs an x bit
    if os.geteuid() != 0:
        assert not os.access(mount.at("ro"), os.W_OK)


# --------------------------------------------------------------------- long names, paths


def test_names_up_to_name_max(mount):
    longest = "n" * 255
    mount.at(longest).write_text("long")
    assert mount.src(longest).read_text() == "long"
    assert longest in os.listdir(mount.mnt)
    os.rename(mount.at(longest), mount.at("m" * 255))
    assert mount.at("m" * 255).read_text() == "long"
    os.mkdir(mount.at("d" * 255))
    os.symlink("../" + "m" * 255, mount.at("d" * 255, "s" * 255))
    assert mount.at("d" * 255, "s" * 255).read_text() == "long"
    assert errno_of(os.open, mount.at("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG
    assert errno_of(os.stat, mount.at("n" * 256)) == errno.ENAMETOOLONG
    # 255 bytes of multi-byte UTF-8, and bytes that are not UTF-8 at all
    utf8 = "é" * 127 + "x"
    assert len(utf8.encode()) == 255
    mount.at(utf8).write_text("utf8")
    assert mount.src(utf8).read_text() == "utf8"
    raw = b"\xff\xfe" + b"r" * 253
    with open(os.path.join(os.fsencode(mount.mnt), raw), "wb") as f:
        f.write(b"raw")
    assert raw in os.listdir(os.fsencode(mount.source))
    assert raw in os.listdir(os.fsencode(mount.mnt))
    with open(os.path.join(os.fsencode(mount.source), raw), "rb") as f:
        assert f.read() == b"raw"


def test_path_deeper_than_path_max(mount):
    component = "d" * 200
    depth = 0
    fds: list[int] = [os.open(mount.mnt, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        while len(os.fspath(mount.mnt)) + depth * (len(component) + 1) <= 4096 + 300:
            os.mkdir(component, dir_fd=fds[-1])
            fds.append(os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
            depth += 1
        bottom = fds[-1]
        fd = os.open("file", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=bottom)
        os.write(fd, b"deep down")
        os.close(fd)
        fd = os.open("file", os.O_RDONLY, dir_fd=bottom)
        assert os.read(fd, 100) == b"deep down"
        os.close(fd)
        os.rename("file", "renamed", src_dir_fd=bottom, dst_dir_fd=bottom)
        assert os.listdir(bottom) == ["renamed"]
        assert os.stat("renamed", dir_fd=bottom).st_size == 9
        os.chmod("renamed", 0o600, dir_fd=bottom)
        os.setxattr(f"/proc/self/fd/{bottom}", "user.deep", b"1")
        os.symlink("renamed", "link", dir_fd=bottom)
        os.link("renamed", "hard", src_dir_fd=bottom, dst_dir_fd=bottom)
        fd = os.open("hard", os.O_WRONLY, dir_fd=bottom)
        os.ftruncate(fd, 4)
        os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    # the source holds the same tree
    fds = [os.open(mount.source, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        for _ in range(depth):
            fds.append(os.open(component, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
        bottom = fds[-1]
        assert sorted(os.listdir(bottom)) == ["hard", "link", "renamed"]
        fd = os.open("renamed", os.O_RDONLY, dir_fd=bottom)
        assert os.read(fd, 100) == b"deep"
        os.close(fd)
        assert stat.S_IMODE(os.stat("renamed", dir_fd=bottom).st_mode) == 0o600
        assert os.stat("renamed", dir_fd=bottom).st_nlink == 2
        assert os.getxattr(f"/proc/self/fd/{bottom}", "user.deep") == b"1"
        assert os.readlink("link", dir_fd=bottom) == "renamed"
    finally:
        for fd in fds:
            os.close(fd)
    assert depth * (len(component) + 1) > 4096


# ------------------------------------------------------------------------ ownership


CREATE_AS_OTHER = """
import os, sys
fd = int(sys.argv[1])
os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=fd))
os.mkdir("dir", dir_fd=fd)
os.symlink("file", "link", dir_fd=fd)
os.mkfifo("fifo", dir_fd=fd)
os.close(os.open("file", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=os.open(
    "dir", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)))
print(os.getuid(), os.getgid())
"""


@root_only
def test_created_objects_belong_to_caller(mount_factory, run_python):
    mount = mount_factory(None, None, "--allow-other")
    shared = mount.at("shared")
    shared.mkdir()
    os.chmod(shared, 0o777)
    fd = os.open(shared, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = run_python(
            CREATE_AS_OTHER, str(fd), user=OTHER_UID, group=OTHER_GID, pass_fds=(fd,)
        ).stdout
    finally:
        os.close(fd)
    assert out.split() == [str(OTHER_UID), str(OTHER_GID)]
    for name in ("file", "dir", "link", "fifo", "dir/file"):
        st = os.lstat(mount.src("shared", name))
        assert (st.st_uid, st.st_gid) == (OTHER_UID, OTHER_GID), name
        assert_same_stat(os.lstat(mount.at("shared", name)), st)
    # in a set-group-ID directory the group is inherited (and so is the bit, for dirs)
    sgid = mount.at("sgid")
    sgid.mkdir()
    os.chown(sgid, 0, 4242)
    os.chmod(sgid, 0o2777)
    fd = os.open(sgid, os.O_RDONLY | os.O_DIRECTORY)
    try:
        run_python(CREATE_AS_OTHER, str(fd), user=OTHER_UID, group=OTHER_GID, pass_fds=(fd,))
    finally:
        os.close(fd)
    for name in ("file", "dir", "dir/file"):
        st = os.lstat(mount.src("sgid", name))
        assert (st.st_uid, st.st_gid) == (OTHER_UID, 4242), name
    assert os.stat(mount.src("sgid", "dir")).st_mode & stat.S_ISGID


ACCESS_AS_OTHER = """
import os, sys
d = int(sys.argv[1])
print(os.access("private", os.R_OK, dir_fd=d), os.access("public", os.R_OK, dir_fd=d),
      os.access("public", os.W_OK, dir_fd=d))
try:
    os.open("private", os.O_RDONLY, dir_fd=d)
except PermissionError:
    print("denied")
"""


@root_only
def test_permissions_for_other_users(mount_factory, run_python):
    mount = mount_factory(None, None, "--allow-other")
    mount.at("private").write_text("secret")
    os.chmod(mount.at("private"), 0o600)
    mount.at("public").write_text("hello")
    os.chmod(mount.at("public"), 0o644)
    fd = os.open(mount.mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        out = run_python(ACCESS_AS_OTHER, str(fd), user=OTHER_UID, group=OTHER_GID, pass_fds=(fd,))
    finally:
        os.close(fd)
    assert out.stdout.split() == ["False", "True", "False", "denied"]


@root_only
def test_other_users_locked_out_without_allow_other(mount, run_python):
    mount.at("shared").mkdir()
    os.chmod(mount.at("shared"), 0o777)
    fd = os.open(mount.at("shared"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        result = run_python(
            CREATE_AS_OTHER, str(fd), user=OTHER_UID, group=OTHER_GID, pass_fds=(fd,), check=False
        )
    finally:
        os.close(fd)
    assert result.returncode != 0
    assert "PermissionError" in result.stderr
    assert os.listdir(mount.src("shared")) == []


@root_only
def test_create_keeps_setuid_and_setgid_bits(mount):
    """open(O_CREAT, 04755) by root gives 04755 on a native filesystem."""
    fd = os.open(mount.at("suid"), os.O_CREAT | os.O_WRONLY, 0o4755)
    os.close(fd)
    fd = os.open(mount.at("sgid"), os.O_CREAT | os.O_WRONLY, 0o2755)
    os.close(fd)
    os.mknod(mount.at("node"), stat.S_IFREG | 0o6755)
    assert stat.S_IMODE(os.stat(mount.src("suid")).st_mode) == 0o4755 & ~umask()
    assert stat.S_IMODE(os.stat(mount.src("sgid")).st_mode) == 0o2755 & ~umask()
    assert stat.S_IMODE(os.stat(mount.src("node")).st_mode) == 0o6755 & ~umask()


KILL_PRIVS = """
import os, sys
d = int(sys.argv[1])
for name in sys.argv[2:]:
    if name == "write":
        fd = os.open(name, os.O_WRONLY, dir_fd=d); os.write(fd, b"x"); os.close(fd)
    elif name == "ftruncate":
        fd = os.open(name, os.O_WRONLY, dir_fd=d); os.ftruncate(fd, 2); os.close(fd)
    elif name == "truncate":
        os.truncate(f"/proc/self/fd/{d}/{name}", 3)
    elif name == "o_trunc":
        os.close(os.open(name, os.O_WRONLY | os.O_TRUNC, dir_fd=d))
"""


def _modes_after_unprivileged_changes(mount_factory, run_python, tmp_path, names):
    """(through the mount, native) modes of 06777 root files another user changed."""
    mount = mount_factory(None, None, "--allow-other")
    native = tmp_path / "native"
    native.mkdir()
    results = []
    for base in (mount.mnt, native):
        for name in names:
            (base / name).write_text("content")
            os.chmod(base / name, 0o6777)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            run_python(KILL_PRIVS, str(fd), *names, user=OTHER_UID, group=OTHER_GID, pass_fds=(fd,))
        finally:
            os.close(fd)
    for name in names:
        results.append(
            (name, oct(os.stat(mount.src(name)).st_mode), oct(os.stat(native / name).st_mode))
        )
    return results


@root_only
def test_unprivileged_write_and_truncate_clear_setuid(mount_factory, run_python, tmp_path):
    names = ["write", "ftruncate", "truncate"]
    for name, through, native in _modes_after_unprivileged_changes(
        mount_factory, run_python, tmp_path, names
    ):
        assert through == native == oct(stat.S_IFREG | 0o777), name


@root_only
def test_unprivileged_open_o_trunc_clears_setuid(mount_factory, run_python, tmp_path):
    [(_, through, native)] = _modes_after_unprivileged_changes(
        mount_factory, run_python, tmp_path, ["o_trunc"]
    )
    assert through == native == oct(stat.S_IFREG | 0o777)


def test_o_direct(mount):
    path = mount.at("direct")
    path.write_bytes(b"a" * 8192)
    buf = mmap.mmap(-1, 4096)  # page aligned, as O_DIRECT wants
    fd = os.open(path, os.O_RDWR | os.O_DIRECT)
    try:
        assert os.preadv(fd, [buf], 0) == 4096
        assert buf[:4] == b"aaaa"
        buf[:4] = b"bbbb"
        assert os.pwritev(fd, [buf], 4096) == 4096
    finally:
        os.close(fd)
        buf.close()
    assert mount.src("direct").read_bytes()[4096:4100] == b"bbbb"


def test_inode_numbers_stable_across_remount(mount_factory):
    mount = mount_factory()
    mount.at("f").write_text("x")
    mount.at("d").mkdir()
    before = {n: os.stat(mount.at(n)).st_ino for n in ("f", "d")}
    assert mount.umount().returncode == 0
    again = mount_factory(mount.source, mount.mnt)
    assert {n: os.stat(again.at(n)).st_ino for n in ("f", "d")} == before


# ------------------------------------------------------------------- behind the back


def settle() -> None:
    """Let the daemon process the RELEASE of files this process just closed.

    The kernel sends RELEASE asynchronously after close(); see
    test_same_size_change_right_after_close_is_seen for why that matters.
    """
    time.sleep(0.15)


def test_changes_in_source_are_seen(mount):
    # a new file appears within the negative timeout (a miss is cached, issue 11)
    assert not mount.at("new").exists()
    mount.src("new").write_text("fresh")
    assert wait_for(lambda: mount.at("new").exists(), 1.1)
    assert mount.at("new").read_text() == "fresh"
    assert "new" in os.listdir(mount.mnt)
    # same size, new content: seen after reopening
    assert mount.at("new").read_text() == "fresh"  # cached in the kernel now
    settle()
    mount.src("new").write_text("FRESH")
    assert mount.at("new").read_text() == "FRESH"
    # size changes: seen within the attribute timeout
    settle()
    mount.src("new").write_text("much longer content")
    assert wait_for(lambda: os.stat(mount.at("new")).st_size == 19, 1.1)
    assert mount.at("new").read_text() == "much longer content"
    settle()
    mount.src("new").write_text("tiny")
    assert wait_for(lambda: os.stat(mount.at("new")).st_size == 4, 1.1)
    assert mount.at("new").read_text() == "tiny"
    # an append through the mount after a change in the source lands at the real end
    with open(mount.at("new"), "a") as f:
        f.write("+")
    assert mount.src("new").read_text() == "tiny+"
    # deletion and rename in the source
    os.unlink(mount.src("new"))
    assert wait_for(lambda: not mount.at("new").exists(), 1.1)
    mount.src("a").write_text("a")
    assert mount.at("a").read_text() == "a"
    os.rename(mount.src("a"), mount.src("b"))
    assert mount.at("b").read_text() == "a"
    assert wait_for(lambda: not mount.at("a").exists(), 1.1)
    # a file replaced by rename (how editors save)
    settle()
    mount.src("tmp").write_text("replacement")
    os.rename(mount.src("tmp"), mount.src("b"))
    assert wait_for(lambda: mount.at("b").read_text() == "replacement", 1.1)


def test_same_size_change_right_after_close_is_seen(mount):
    """RELEASE reaches the daemon after close() returns: a change made in between must
    not be taken as already known (the foundation refreshed its validators at release)."""
    stale = 0
    for i in range(20):
        src, through = mount.src(f"f{i}"), mount.at(f"f{i}")
        src.write_text("fresh")
        assert through.read_text() == "fresh"
        assert through.read_text() == "fresh"  # kept in the page cache
        src.write_text("FRESH")  # right after close(): RELEASE may still be in flight
        if through.read_text() != "FRESH":
            stale += 1
    assert stale == 0, f"{stale} of 20 reopenings read stale cached bytes"


def wait_for(condition, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)


def test_source_written_while_file_open_through_mount(mount):
    mount.src("f").write_bytes(b"a" * 100)
    with open(mount.at("f"), "rb") as f:
        assert f.read() == b"a" * 100
        mount.src("f").write_bytes(b"b" * 100)
    with open(mount.at("f"), "rb") as f:
        assert f.read() == b"b" * 100


# --------------------------------------------------------------------------- in place


def test_in_place_mount(mount_factory, tmp_path):
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "existing").write_text("old content")
    (tree / "sub").mkdir()
    (tree / "sub" / "deep").write_text("deep")
    mount = mount_factory(tree, tree)
    assert mount.is_mounted
    assert (tree / "existing").read_text() == "old content"
    assert sorted(os.listdir(tree)) == ["existing", "sub"]
    assert (tree / "sub" / "deep").read_text() == "deep"
    (tree / "created").write_text("through the mount")
    with open(tree / "existing", "a") as f:
        f.write(" + more")
    os.rename(tree / "sub" / "deep", tree / "moved")
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert not mount.is_mounted
    assert (tree / "created").read_text() == "through the mount"
    assert (tree / "existing").read_text() == "old content + more"
    assert (tree / "moved").read_text() == "deep"
    assert sorted(os.listdir(tree)) == ["created", "existing", "moved", "sub"]


# ------------------------------------------------------------------ forget, shutdown


def drop_kernel_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2\n")


@root_only
def test_forget_releases_inodes(mount):
    baseline = len(os.listdir(f"/proc/{mount.pid}/fd"))
    count = 2000
    mount.at("many").mkdir()
    for i in range(count):
        os.close(os.open(mount.at("many", f"f{i}"), os.O_CREAT | os.O_WRONLY, 0o644))
    for entry in os.scandir(mount.at("many")):
        entry.stat()
    # names and attributes alone hold no descriptor (ARCHITECTURE §2)
    assert len(os.listdir(f"/proc/{mount.pid}/fd")) < baseline + count // 10
    for i in range(count):
        os.close(os.open(mount.at("many", f"f{i}"), os.O_RDONLY))
    held = len(os.listdir(f"/proc/{mount.pid}/fd"))
    assert held >= baseline + count  # one O_PATH descriptor per remembered inode in use
    drop_kernel_caches()
    assert wait_for(
        lambda: len(os.listdir(f"/proc/{mount.pid}/fd")) < baseline + count // 10, 10.0
    ), f"daemon still holds {len(os.listdir(f'/proc/{mount.pid}/fd'))} fds (was {baseline})"
    # forgotten inodes come back on demand
    assert mount.at("many", "f7").exists()
    assert len(os.listdir(mount.at("many"))) == count
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: not mount.daemon_running, 5.0)
    assert not mount.is_mounted


def test_unmount_ends_daemon(mount):
    mount.at("f").write_text("x")
    assert mount.daemon_running
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert not mount.daemon_running  # umount waits for the daemon
    assert not mount.is_mounted
    assert mount.src("f").read_text() == "x"
    assert "unmounted" in mount.log_text()


def test_concurrent_access_from_threads_and_processes(mount, run_in_process):
    mount.at("shared").write_bytes(b"")

    def worker(i: int) -> None:
        for j in range(50):
            path = mount.at(f"t{i}-{j}")
            path.write_bytes(bytes([i]) * (j + 1))
            assert path.read_bytes() == bytes([i]) * (j + 1)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(os.listdir(mount.source)) == 201
    assert run_in_process(sorted_listing, os.fspath(mount.mnt)) == sorted(os.listdir(mount.source))


def sorted_listing(path: str) -> list[str]:
    return sorted(os.listdir(path))
