"""Model-based test: random file operations run on the mount and on a plain directory.

Each example is a random sequence of create / write / read / truncate / rename / link /
unlink / mmap-write / fsync / append and operations on descriptors kept open across the
others; it runs step by step on a fresh subdirectory of one mount and of a plain directory,
and every step must give the same result (value or errno) in both. At the end every file's
bytes, the listings and the hard-link structure must be equal.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import stat
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.mount

NAMES = ["a", "b", "c", "sub/a", "sub/b"]
DIRS = ["", "sub"]
SLOTS = 2

names = st.sampled_from(NAMES)
offsets = st.integers(min_value=0, max_value=20000)
sizes = st.integers(min_value=0, max_value=24000)
data = st.binary(min_size=1, max_size=3000)
slots = st.integers(min_value=0, max_value=SLOTS - 1)

hold = st.tuples(st.just("hold"), names, slots)
operations = st.one_of(
    hold,
    hold,
    hold,
    st.tuples(st.just("create"), names, st.booleans()),
    st.tuples(st.just("write"), names, offsets, data),
    st.tuples(st.just("append"), names, data),
    st.tuples(st.just("read"), names, offsets, sizes),
    st.tuples(st.just("truncate"), names, sizes),
    st.tuples(st.just("rename"), names, names),
    st.tuples(st.just("link"), names, names),
    st.tuples(st.just("unlink"), names),
    st.tuples(st.just("mmap_write"), names, offsets, data),
    st.tuples(st.just("fsync"), names),
    st.tuples(st.just("stat"), names),
    st.tuples(st.just("held_write"), slots, offsets, data),
    st.tuples(st.just("held_read"), slots, offsets, sizes),
    st.tuples(st.just("held_truncate"), slots, sizes),
    st.tuples(st.just("release"), slots),
)


class World:
    """One directory tree the operations act on, with descriptors kept open in slots."""

    def __init__(self, root: Path, initial: dict[str, bytes]) -> None:
        self.root = root
        root.mkdir()
        (root / "sub").mkdir()
        for name, content in sorted(initial.items()):
            (root / name).write_bytes(content)
        self.held: dict[int, int] = {}

    def path(self, name: str) -> Path:
        return self.root / name

    def apply(self, op: tuple[Any, ...]) -> tuple[Any, ...]:
        """Run one operation; ("ok", value) or ("errno", name) or another outcome tag."""
        try:
            return ("ok", getattr(self, "op_" + op[0])(*op[1:]))
        except OSError as exc:
            return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno))

    def close(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()

    # operations ------------------------------------------------------------------

    def op_create(self, name: str, exclusive: bool) -> None:
        flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
        os.close(os.open(self.path(name), flags, 0o644))

    def op_write(self, name: str, offset: int, payload: bytes) -> int:
        fd = os.open(self.path(name), os.O_WRONLY)
        try:
            return os.pwrite(fd, payload, offset)
        finally:
            os.close(fd)

    def op_append(self, name: str, payload: bytes) -> int:
        fd = os.open(self.path(name), os.O_WRONLY | os.O_APPEND)
        try:
            return os.write(fd, payload)
        finally:
            os.close(fd)

    def op_read(self, name: str, offset: int, size: int) -> bytes:
        fd = os.open(self.path(name), os.O_RDONLY)
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def op_truncate(self, name: str, size: int) -> None:
        os.truncate(self.path(name), size)

    def op_rename(self, old: str, new: str) -> None:
        os.rename(self.path(old), self.path(new))

    def op_link(self, old: str, new: str) -> None:
        os.link(self.path(old), self.path(new))

    def op_unlink(self, name: str) -> None:
        os.unlink(self.path(name))

    def op_mmap_write(self, name: str, offset: int, payload: bytes) -> str:
        fd = os.open(self.path(name), os.O_RDWR)
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                return "empty"
            start = offset % size
            chunk = payload[: size - start]
            with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) as mm:
                mm[start : start + len(chunk)] = chunk
                mm.flush()
            return f"{start}+{len(chunk)}"
        finally:
            os.close(fd)

    def op_fsync(self, name: str) -> None:
        fd = os.open(self.path(name), os.O_RDWR)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def op_stat(self, name: str) -> tuple[int, int, int]:
        st_ = os.stat(self.path(name))
        return (stat.S_IFMT(st_.st_mode), st_.st_size, st_.st_nlink)

    def op_hold(self, name: str, slot: int) -> None:
        fd = os.open(self.path(name), os.O_RDWR)
        if slot in self.held:
            os.close(self.held.pop(slot))
        self.held[slot] = fd

    def _slot(self, slot: int) -> int:
        if slot not in self.held:
            raise OSError(errno.EBADF, "empty slot")
        return self.held[slot]

    def op_held_write(self, slot: int, offset: int, payload: bytes) -> int:
        return os.pwrite(self._slot(slot), payload, offset)

    def op_held_read(self, slot: int, offset: int, size: int) -> bytes:
        return os.pread(self._slot(slot), size, offset)

    def op_held_truncate(self, slot: int, size: int) -> tuple[int, int]:
        fd = self._slot(slot)
        os.ftruncate(fd, size)
        st_ = os.fstat(fd)
        return (st_.st_size, st_.st_nlink)

    def op_release(self, slot: int) -> None:
        os.close(self._slot(slot))
        del self.held[slot]

    # final state -------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        listing = {d: sorted(os.listdir(self.root / d)) for d in DIRS}
        files = {}
        by_inode: dict[int, set[str]] = {}
        for d in DIRS:
            for name in listing[d]:
                rel = f"{d}/{name}" if d else name
                st_ = os.lstat(self.root / rel)
                if stat.S_ISREG(st_.st_mode):
                    files[rel] = ((self.root / rel).read_bytes(), st_.st_size, st_.st_nlink)
                    by_inode.setdefault(st_.st_ino, set()).add(rel)
        links = sorted(sorted(group) for group in by_inode.values())
        return {"listing": listing, "files": files, "links": links}


_examples = itertools.count()


@pytest.fixture(scope="module")
def plain_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("plain")


def describe(op: tuple[Any, ...]) -> str:
    return repr(tuple(f"<{len(x)} bytes>" if isinstance(x, bytes) else x for x in op))


@settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    initial=st.dictionaries(names, st.binary(max_size=20000), min_size=1),
    ops=st.lists(operations, min_size=10, max_size=80),
)
def test_mount_behaves_like_a_plain_directory(shared_mount, plain_base, initial, ops):
    n = next(_examples)
    mounted = World(shared_mount.at(f"example-{n}"), initial)
    plain = World(plain_base / f"example-{n}", initial)
    try:
        for step, op in enumerate(ops):
            expected = plain.apply(op)
            got = mounted.apply(op)
            assert got == expected, f"step {step}: {describe(op)}"
        mounted.close()
        plain.close()
        assert mounted.snapshot() == plain.snapshot()
        # and the source directory holds exactly what the mount showed
        source = World.__new__(World)
        source.root, source.held = shared_mount.src(f"example-{n}"), {}
        assert source.snapshot() == plain.snapshot()
    finally:
        mounted.close()
        plain.close()
