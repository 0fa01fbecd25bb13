"""The `compress` provider through real mounts, checked with decoders that are not isofs.

Every source is initialised with `isofs init --provider compress` (64 KiB frames keep the
data small) and mounted through the CLI. The target view must show exactly the bytes written;
the native file must be a stream that the stock `zstd -d` turns into exactly those bytes.
Stacks with the encrypt provider are decoded with the independent AES decoder of
test_encrypt_mounted (from the recovery key `init` prints) and `zstd -d`.
"""

from __future__ import annotations

import errno
import itertools
import json
import mmap
import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from compress_support import source_like
from conftest import Mount, MountManager, fuse_unavailable, run_isofs, wait_until
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_encrypt_mounted import Keys, decode_content, parse_master_key

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd CLI not installed"),
]

F = 64 << 10
_CORPUS = source_like(2 << 20)
SCRYPT_N = "16384"
MASTER_KEY = "00112233445566778899aabbccddeeff" * 2


def text(length: int, seed: int = 0) -> bytes:
    start = (seed * 7919) % len(_CORPUS)
    return ((_CORPUS[start:] + _CORPUS) * (length // len(_CORPUS) + 2))[:length]


def noise(length: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(length)


def zstd_d(native: bytes | Path) -> bytes:
    """The stock zstd's reading of a native file (or of bytes)."""
    data = native.read_bytes() if isinstance(native, Path) else native
    result = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True,
                            timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def read_file(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


@dataclass
class Source:
    """An initialised source, and for stacks with encrypt its passphrase file and keys."""

    path: Path
    providers: tuple[str, ...]
    passfile: Path | None = None
    keys: Keys | None = None

    @property
    def secret(self) -> tuple[str, ...]:
        return ("--passfile", os.fspath(self.passfile)) if self.passfile else ()

    def mount(self, mount_factory: Any, *extra: str) -> Mount:
        return mount_factory(self.path, None, *self.secret, *extra)

    def mount_target(self, mount_factory: Any, *extra: str) -> Mount:
        """Single view: every process (this one too) sees the uncompressed bytes."""
        return self.mount(mount_factory, "--default-view", "target", "--no-exec", *extra)

    def decode(self, native: bytes) -> bytes:
        """What the target view must show for these native bytes, by independent decoders."""
        if self.providers == ("compress",):
            return zstd_d(native)
        assert self.keys is not None
        if self.providers == ("encrypt", "compress"):  # compress, then encrypt
            return zstd_d(decode_content(native, self.keys))
        return decode_content(zstd_d(native), self.keys)  # encrypt, then compress

    def fsck(self, *args: str) -> subprocess.CompletedProcess[str]:
        return run_isofs("fsck", self.path, *self.secret, *args)


_sources = itertools.count()


def make_source(base: Path, *providers: str, extra: tuple[str, ...] = ()) -> Source:
    path = base / f"src{next(_sources)}"
    path.mkdir()
    args: list[str] = []
    for name in providers:
        args += ["--provider", name]
    passfile = None
    args += ["--frame-size", "64K", *extra]
    if "encrypt" not in providers:
        result = run_isofs("init", path, *args)
        assert result.returncode == 0, result.stderr
        return Source(path, providers)
    passfile = base / f"pass{next(_sources)}"
    passfile.write_text("compress test passphrase\n")
    args += ["--passfile", os.fspath(passfile), "--option", f"scrypt_n={SCRYPT_N}"]
    # The master key: the one `init` prints once, or (an encrypt provider that prints
    # none) the one given to it.
    result = run_isofs("init", path, *args, "--option", f"masterkey={MASTER_KEY}")
    if result.returncode != 0 and "masterkey" in result.stderr:
        result = run_isofs("init", path, *args)
    assert result.returncode == 0, result.stderr
    if "Your master key" in result.stdout:
        keys = Keys(parse_master_key(result.stdout))
    else:
        keys = Keys(bytes.fromhex(MASTER_KEY))
    return Source(path, providers, passfile, keys)


def unmount(mount: Mount) -> None:
    result = mount.umount()
    assert result.returncode == 0, result.stderr
    assert wait_until(lambda: not mount.daemon_running, timeout=10.0)


def listing(directory: Path) -> dict[str, int]:
    with os.scandir(directory) as entries:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in entries}


SIZES = [0, 1, F - 1, F, F + 1, 2 * F - 1, 2 * F, 2 * F + 1, 5 * F + 17]


# ------------------------------------------------------------------ contents and sizes


def test_round_trips_zstd_interop_and_sizes(tmp_path, mount_factory):
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    files = {}
    for size in SIZES:
        files[f"text-{size}"] = text(size, size)
        files[f"noise-{size}"] = noise(size, size)
    for name, data in files.items():
        write_file(m.at(name), data)
    for name, data in files.items():
        assert read_file(m.at(name)) == data, name
        assert os.stat(m.at(name)).st_size == len(data), name
        assert zstd_d(m.src(name)) == data, name
    assert listing(m.mnt) == {name: len(data) for name, data in files.items()}
    # du: the target view's allocation is the native one; random data grew < 0.5%
    for name in files:
        assert os.stat(m.at(name)).st_blocks == os.stat(m.src(name)).st_blocks, name
    noisy = m.src(f"noise-{5 * F + 17}").stat().st_size
    assert noisy < (5 * F + 17) * 1.005
    assert m.src(f"text-{5 * F + 17}").stat().st_size < (5 * F + 17) // 2
    unmount(m)
    m = source.mount_target(mount_factory)  # sizes after a remount: size cache or tables
    assert listing(m.mnt) == {name: len(data) for name, data in files.items()}
    assert read_file(m.at(f"text-{2 * F + 1}")) == files[f"text-{2 * F + 1}"]


def test_random_writes_appends_truncates_and_holes(tmp_path, mount_factory):
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    path = m.at("f")
    model = bytearray(text(10 * F + 5, 1))
    write_file(path, model)
    fd = os.open(path, os.O_RDWR)
    append = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        steps = [(F - 3, noise(10, 1)), (3 * F, noise(F, 2)), (5, text(100, 3)),
                 (9 * F + 100, noise(3 * F, 4)), (20 * F + 7, b"far away")]  # fmt: skip
        for offset, data in steps:
            assert os.pwrite(fd, data, offset) == len(data)
            model[len(model) :] = bytes(max(0, offset - len(model)))
            model[offset : offset + len(data)] = data
            assert os.pread(fd, len(model) + 5, 0) == model
        os.write(append, b"appended")
        model += b"appended"
        os.fsync(fd)
        assert zstd_d(m.src("f")) == model
        os.ftruncate(fd, 4 * F + 9)
        del model[4 * F + 9 :]
        assert os.pread(fd, 10 * F, 0) == model
        os.ftruncate(fd, 30 * F)
        model += bytes(30 * F - len(model))
        assert os.pread(fd, 30 * F, 0) == model and os.fstat(fd).st_size == 30 * F
        os.fsync(fd)
        assert zstd_d(m.src("f")) == model
        assert m.src("f").stat().st_size < 200_000  # the hole costs a few bytes per frame
    finally:
        os.close(fd)
        os.close(append)
    assert read_file(path) == model


def test_mmap_writes_reach_the_compressed_file(tmp_path, mount_factory):
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    path = m.at("mapped")
    model = bytearray(text(3 * F + 300, 5))
    write_file(path, model)
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED) as mapped:
            for offset in (0, F - 2, 2 * F + 77, len(model) - 9):
                patch = noise(9, offset)
                mapped[offset : offset + 9] = patch
                model[offset : offset + 9] = patch
            mapped.flush()
        os.fsync(fd)
    finally:
        os.close(fd)
    assert read_file(path) == model
    assert zstd_d(m.src("mapped")) == model


def test_sizes_in_listings_follow_renames_links_truncates_and_native_changes(
    tmp_path, mount_factory
):
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    os.mkdir(m.at("d"))
    write_file(m.at("d", "a"), text(3 * F + 1))
    write_file(m.at("d", "b"), text(F))
    os.rename(m.at("d", "a"), m.at("d", "c"))
    os.link(m.at("d", "c"), m.at("d", "hard"))
    os.truncate(m.at("d", "b"), 100)
    assert listing(m.at("d")) == {"c": 3 * F + 1, "hard": 3 * F + 1, "b": 100}
    with open(m.at("d", "hard"), "ab") as f:  # one inode, one size
        f.write(b"more")
    assert listing(m.at("d")) == {"c": 3 * F + 5, "hard": 3 * F + 5, "b": 100}
    unmount(m)
    m = source.mount_target(mount_factory)
    assert listing(m.at("d")) == {"c": 3 * F + 5, "hard": 3 * F + 5, "b": 100}
    # another writer of the source replaces a file behind the mount's back
    shutil.copyfile(m.src("d", "c"), m.src("d", "tmp"))
    os.replace(m.src("d", "tmp"), m.src("d", "b"))
    assert wait_until(lambda: listing(m.at("d"))["b"] == 3 * F + 5, timeout=5)
    assert read_file(m.at("d", "b")) == text(3 * F + 1) + b"more"


def test_level_given_at_mount_applies_to_new_writes(tmp_path, mount_factory):
    source = make_source(tmp_path, "compress", extra=("--level", "1"))
    config = json.loads((source.path / ".isofs" / "config.json").read_text())
    assert config["stack"][0]["config"] == {"version": 1, "level": 1, "frame_size": F}
    data = text(40 * F, 8)
    m = source.mount_target(mount_factory)
    write_file(m.at("fast"), data)
    unmount(m)
    m = source.mount_target(mount_factory, "--level", "19")
    write_file(m.at("small"), data)
    assert m.src("small").stat().st_size < m.src("fast").stat().st_size
    assert zstd_d(m.src("small")) == zstd_d(m.src("fast")) == data
    assert read_file(m.at("fast")) == data


def test_cli_flags_come_from_the_options(tmp_path):
    shown = run_isofs("init", tmp_path, "--provider", "compress", "--help")
    assert shown.returncode == 0
    assert "--level N" in shown.stdout and "--frame-size SIZE" in shown.stdout
    for flag, value, fragment in (
        ("--frame-size", "96K", "not a power of two"),
        ("--frame-size", "2M", "above the maximum"),
        ("--level", "0", "level 0"),
        ("--level", "20", "above the maximum 19"),
        ("--level", "fast", "not an integer"),
    ):
        (tmp_path / "s").mkdir(exist_ok=True)
        result = run_isofs("init", tmp_path / "s", "--provider", "compress", flag, value)
        assert result.returncode == 1, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("isofs: error: "), result.stderr
        assert fragment in lines[0] and "Traceback" not in result.stderr
        assert not (tmp_path / "s" / ".isofs" / "config.json").exists()


# ---------------------------------------------------------------------------- views


@dataclass(frozen=True)
class Python:
    exe: str
    env: dict[str, str]

    def run(self, code: str, *args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([self.exe, "-c", code, *map(os.fspath, args)],
                                capture_output=True, text=True, timeout=60, env=self.env,
                                cwd="/")  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result


@pytest.fixture(scope="module")
def target_python(tmp_path_factory: pytest.TempPathFactory) -> Python:
    """A copy of the interpreter: a different /proc/PID/exe, so the policy can select it."""
    copy = tmp_path_factory.mktemp("compviews") / "python3"
    shutil.copy2(os.path.realpath(sys.executable), copy)
    base = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    for env in (base, {**base, "PYTHONHOME": sys.base_prefix}):
        probe = subprocess.run([os.fspath(copy), "-c", "import os"], env=env, timeout=60,
                               capture_output=True)  # fmt: skip
        if probe.returncode == 0:
            return Python(os.fspath(copy), env)
    pytest.skip("a copy of the interpreter cannot find its standard library")


TARGET_WRITES = r"""
import os, sys
path, data = sys.argv[1], open(sys.argv[2], "rb").read()
with open(path, "wb") as f:
    f.write(data)
fd = os.open(path, os.O_RDWR)
os.pwrite(fd, b"Z" * 5000, int(sys.argv[3]))
os.close(fd)
with open(path, "rb") as f, open(sys.argv[2] + ".seen", "wb") as out:
    out.write(f.read())
"""


@pytest.mark.parametrize(
    "providers", [("compress",), ("encrypt", "compress"), ("compress", "encrypt")]
)
def test_two_views_of_one_file(tmp_path, mount_factory, target_python, providers):
    source = make_source(tmp_path, *providers)
    m = source.mount(mount_factory, "--target", f"exe={target_python.exe}")
    data = bytearray(text(3 * F + 11, 2))
    payload = tmp_path / "payload"
    payload.write_bytes(data)
    target_python.run(TARGET_WRITES, m.at("doc"), payload, str(F - 100))
    data[F - 100 : F + 4900] = b"Z" * 5000
    assert (tmp_path / "payload.seen").read_bytes() == data
    native = read_file(m.at("doc"))  # this process is in the native view
    assert native == m.src("doc").read_bytes()
    assert os.stat(m.at("doc")).st_size == len(native) != len(data)
    assert source.decode(native) == data
    # a file the native view writes is not formatted: both views show its bytes
    write_file(m.at("plain"), b"written by the native view")
    shown = target_python.run("import sys; print(open(sys.argv[1], 'rb').read().hex())",
                              m.at("plain")).stdout  # fmt: skip
    assert bytes.fromhex(shown.strip()) == b"written by the native view"


@pytest.mark.parametrize("providers", [("encrypt", "compress"), ("compress", "encrypt")])
def test_stacks_with_encryption(tmp_path, mount_factory, providers):
    source = make_source(tmp_path, *providers)
    m = source.mount_target(mount_factory)
    files = {f"t{size}": text(size, size) for size in SIZES}
    for name, data in files.items():
        write_file(m.at(name), data)
    with open(m.at(f"t{2 * F}"), "r+b") as f:
        f.seek(F + 3)
        f.write(noise(4124, 1))
    files[f"t{2 * F}"] = (files[f"t{2 * F}"][: F + 3] + noise(4124, 1)
                          + files[f"t{2 * F}"][F + 3 + 4124 :])  # fmt: skip
    for name, data in files.items():
        assert read_file(m.at(name)) == data, name
        assert source.decode(m.src(name).read_bytes()) == data, name
    assert listing(m.mnt) == {name: len(data) for name, data in files.items()}
    big = m.src(f"t{5 * F + 17}").stat().st_size
    if providers[0] == "encrypt":  # compressed, then encrypted: still small
        assert big < (5 * F + 17) // 2
    else:  # encrypted, then compressed: ciphertext does not compress (and barely grows)
        assert (5 * F + 17) < big < (5 * F + 17) * 1.02
    unmount(m)
    assert source.fsck().returncode == 0


# ------------------------------------------------------------------------ the model


@pytest.fixture(scope="module")
def model_mount(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Source, Mount]]:
    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    base = tmp_path_factory.mktemp("compmodel")
    manager = MountManager(base)
    try:
        source = make_source(base, "compress")
        yield source, source.mount_target(manager)
    finally:
        if os.getcwd().startswith(os.fspath(base)):
            os.chdir("/")
        assert not manager.teardown_all()


_offsets = st.one_of(st.integers(0, 4 * F + 100), st.sampled_from([F - 1, F, 2 * F + 1]))
_data = st.one_of(
    st.binary(min_size=1, max_size=5000),
    st.builds(text, st.integers(1, 2 * F + 100), st.integers(0, 10**6)),
    st.builds(noise, st.integers(1, F + 100), st.integers(0, 10**6)),
)
model_ops = st.one_of(
    st.tuples(st.just("write"), _offsets, _data),
    st.tuples(st.just("append"), _data),
    st.tuples(st.just("truncate"), st.integers(0, 5 * F)),
    st.tuples(st.just("read"), _offsets, st.integers(0, 3 * F)),
    st.tuples(st.just("mmap_write"), _offsets, st.binary(min_size=1, max_size=3 * 4096)),
    st.tuples(st.just("listing")),
    st.tuples(st.just("fsync")),
    st.tuples(st.just("reopen")),
)
_model_files = itertools.count()


class ModelFile:
    """One file through the target view (a read-write and an O_APPEND descriptor)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.model = bytearray()
        self.rw = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.append = os.open(path, os.O_WRONLY | os.O_APPEND)

    def close(self) -> None:
        os.close(self.rw)
        os.close(self.append)

    def put(self, offset: int, data: bytes) -> None:
        self.model[len(self.model) :] = bytes(max(0, offset - len(self.model)))
        self.model[offset : offset + len(data)] = data

    def apply(self, op: tuple[Any, ...], where: str) -> None:
        kind, model = op[0], self.model
        if kind == "write":
            assert os.pwrite(self.rw, op[2], op[1]) == len(op[2]), where
            self.put(op[1], op[2])
        elif kind == "append":
            assert os.write(self.append, op[1]) == len(op[1]), where
            self.put(len(model), op[1])
        elif kind == "truncate":
            os.ftruncate(self.rw, op[1])
            del model[op[1] :]
            model.extend(bytes(op[1] - len(model)))
        elif kind == "read":
            assert os.pread(self.rw, op[2], op[1]) == model[op[1] : op[1] + op[2]], where
        elif kind == "mmap_write" and model:
            offset = op[1] % len(model)
            data = op[2][: len(model) - offset]
            with mmap.mmap(self.rw, 0, flags=mmap.MAP_SHARED) as mapped:
                mapped[offset : offset + len(data)] = data
                mapped.flush()
            self.put(offset, data)
        elif kind == "listing":
            assert listing(self.path.parent)[self.path.name] == len(model), where
        elif kind == "fsync":
            os.fsync(self.rw)
        elif kind == "reopen":
            self.close()
            self.rw = os.open(self.path, os.O_RDWR)
            self.append = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        assert os.fstat(self.rw).st_size == len(model), where


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(ops=st.lists(model_ops, min_size=1, max_size=30))
def test_model_through_target_view(model_mount, ops):
    _source, m = model_mount
    name = f"model-{next(_model_files)}"
    f = ModelFile(m.at(name))
    try:
        for step, op in enumerate(ops):
            where = f"step {step}: {op[0]} {op[1:2]}"
            f.apply(op, where)
            if op[0] == "fsync":  # after fsync the native file is the model's zstd stream
                assert zstd_d(m.src(name)) == f.model, where
    finally:
        f.close()
    assert read_file(m.at(name)) == f.model
    assert zstd_d(m.src(name)) == f.model


# ------------------------------------------------------------------- damage, crashes


def test_a_damaged_frame_reads_eio_only_where_it_is_and_fsck_repairs_it(
    tmp_path, mount_factory
):
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    data = text(6 * F, 3)
    write_file(m.at("f"), data)
    write_file(m.at("intact"), data)
    unmount(m)
    native = bytearray(source.path.joinpath("f").read_bytes())
    # frame 2's slot: the seek table's entries give the offsets (header entry first)
    count = int.from_bytes(native[-9:-5], "little")
    table_at = len(native) - (17 + 12 * count)
    sizes = [int.from_bytes(native[table_at + 8 + 12 * i : table_at + 12 + 12 * i], "little")
             for i in range(count)]  # fmt: skip
    frame2 = sum(sizes[:3])
    native[frame2 + 300] ^= 0x08
    source.path.joinpath("f").write_bytes(native)

    m = source.mount_target(mount_factory)
    fd = os.open(m.at("f"), os.O_RDONLY)
    try:
        assert os.pread(fd, 2 * F, 0) == data[: 2 * F]
        for offset, size in ((2 * F, 10), (3 * F - 1, 1), (2 * F + 4000, F)):
            with pytest.raises(OSError) as info:
                os.pread(fd, size, offset)
            assert info.value.errno == errno.EIO
        try:  # from good bytes into the bad frame: a short read of the good ones, or EIO
            assert os.pread(fd, 10, 2 * F - 5) == data[2 * F - 5 : 2 * F]
        except OSError as exc:
            assert exc.errno == errno.EIO
        assert os.pread(fd, 3 * F, 3 * F) == data[3 * F :]
    finally:
        os.close(fd)
    assert read_file(m.at("intact")) == data
    real = os.fspath(Path(os.path.realpath(source.path)) / "f")
    assert any(real in line and "frame 2" in line for line in m.log_text().splitlines()), (
        m.log_text()
    )
    unmount(m)
    check = source.fsck()
    assert check.returncode == 1 and "f: bad blocks 2" in check.stdout, check.stdout
    repair = source.fsck("--repair")
    assert repair.returncode == 1 and "repaired" in repair.stdout, repair.stdout
    assert source.fsck().returncode == 0
    expected = data[: 2 * F] + bytes(F) + data[3 * F :]
    assert zstd_d(source.path / "f") == expected
    m = source.mount_target(mount_factory)
    assert read_file(m.at("f")) == expected


CRASH_REWRITER = r"""
import os, random, sys
path, frame = sys.argv[1], int(sys.argv[2])
fd = os.open(path, os.O_RDWR)
print("started", flush=True)
for i in range(1, 10**6):  # frame i no longer fits its slot: the rest is laid out again
    os.pwrite(fd, random.Random(i).randbytes(30000), i * frame + 10)
    os.fsync(fd)
    print(i, flush=True)
"""


@pytest.mark.parametrize("delay", [0.0, 0.03, 0.08])
def test_sigkill_during_large_rewrites_leaves_old_or_new_frames(tmp_path, mount_factory, delay):
    """The daemon is killed while a target process makes frame after frame outgrow its slot
    (each fsync lays out the rest of a 16 MiB file again). Afterwards fsck finds the file
    clean or repairs it, and every frame is its old or its new version."""
    source = make_source(tmp_path, "compress")
    m = source.mount_target(mount_factory)
    frames = 256
    old = text(frames * F, 4)
    write_file(m.at("stable"), text(3 * F + 7))
    write_file(m.at("victim"), old)
    writer = subprocess.Popen(
        [sys.executable, "-c", CRASH_REWRITER, m.at("victim"), str(F)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    done = 0
    try:
        assert writer.stdout is not None and writer.stdout.readline() == "started\n"
        for _ in range(3):
            done = int(writer.stdout.readline())
        wait_until(lambda: False, timeout=delay)
        os.kill(m.pid, signal.SIGKILL)
        rest, err = writer.communicate(timeout=30)
    finally:
        writer.kill()
        writer.wait()
    done = max([done, *map(int, rest.split())])
    assert "Errno 103" in err or "Errno 107" in err, err  # ECONNABORTED / ENOTCONN
    assert run_isofs("umount", m.mnt).returncode == 0

    check = source.fsck()
    lines = [line for line in check.stdout.splitlines() if line.startswith("victim")]
    assert check.returncode == (1 if lines else 0), check.stdout + check.stderr
    assert "stable" not in check.stdout
    if lines:
        repair = source.fsck("--repair")
        assert "repaired" in repair.stdout, repair.stdout
        assert "bad blocks" not in repair.stdout, repair.stdout  # nothing was lost
        assert source.fsck().returncode == 0
    m = source.mount_target(mount_factory)
    result = read_file(m.at("victim"))
    assert len(result) == len(old)
    for i in range(frames):
        got = result[i * F : (i + 1) * F]
        new = bytearray(old[i * F : (i + 1) * F])
        new[10 : 10 + 30000] = random.Random(i).randbytes(30000)
        if i == 0 or i > done + 1:
            assert got == old[i * F : (i + 1) * F], i
        elif i <= done:
            assert got == new, i  # fsync returned: it is there
        else:
            assert got in (old[i * F : (i + 1) * F], bytes(new)), i
    assert zstd_d(m.src("victim")) == result
    assert read_file(m.at("stable")) == text(3 * F + 7)
