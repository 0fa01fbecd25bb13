"""Per-process views through a real mount: two processes of different views, one path.

The mount's source is initialised with the example `xorpad` provider, which changes both the
bytes and the size of formatted files (a 16-byte header, then the content XOR'ed with a
position-dependent keystream). A *copy* of the Python interpreter is a different executable
path, so `--target exe=<copy>` gives processes running the copy the target view while the
original interpreter, running the same probe script, gets the native view.

Every check runs in real, separate processes (never in the test process, which is native):
read(), fstat/stat, `os.scandir` entry sizes and mmap (shared and private, read-only and
read-write), sequentially, interleaved and concurrently, before and after writes through
either view and behind the mount's back. The test decodes xorpad itself (an independent
decoder written from the format in examples/isofs-xorpad/README.md).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from isofs.daemon import runtime
from isofs.views.execgroups import unified_hierarchy

pytestmark = pytest.mark.mount

MAGIC = b"XORPAD01"
HEADER_SIZE = 16
SEED = 0x0123_4567_89AB_CD5A  # given to `isofs init`: files created later use it
OTHER_SEED = 0xFEDC_BA98_7654_3291  # a seed a native writer chooses for its own encoding
PROC_TIMEOUT = 60.0


# ------------------------------------------------------------------------ xorpad, by hand


def keystream(seed: int, offset: int, size: int) -> bytes:
    """keystream(i) = (i * 131 + 7 + seed) & 0xFF for logical offsets offset..offset+size-1."""
    return bytes((i * 131 + 7 + seed) & 0xFF for i in range(offset, offset + size))


def xorpad_encode(content: bytes, seed: int) -> bytes:
    """The native bytes of a formatted file holding `content`."""
    pad = keystream(seed, 0, len(content))
    return MAGIC + seed.to_bytes(8, "big") + bytes(c ^ k for c, k in zip(content, pad, strict=True))


def xorpad_decode(native: bytes) -> bytes:
    """The content of a formatted file from its native bytes (fails if not formatted)."""
    assert len(native) >= HEADER_SIZE and native[:8] == MAGIC, f"not formatted: {native[:16]!r}"
    seed = int.from_bytes(native[8:16], "big")
    body = native[HEADER_SIZE:]
    return bytes(b ^ k for b, k in zip(body, keystream(seed, 0, len(body)), strict=True))


def test_decoder_matches_the_provider_documentation():
    # Independent of the mount: the hand-written codec agrees with the README's formula.
    native = xorpad_encode(b"\x00\x00ab", 0x105)  # only the low 8 bits of the seed matter
    assert native[:16] == MAGIC + bytes([0, 0, 0, 0, 0, 0, 1, 5])
    assert native[16] == (0 * 131 + 7 + 5) & 0xFF
    assert native[17] == (1 * 131 + 7 + 5) & 0xFF
    assert xorpad_decode(native) == b"\x00\x00ab"


def content(tag: str, size: int) -> bytes:
    """Recognisable, non-repeating plaintext of `size` bytes."""
    seed = tag.encode()
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += seed + b":%08d|" % counter
        counter += 1
    return bytes(out[:size])


# ---------------------------------------------------------------- the probe, run by both


PROBE = r'''
"""Observe files through a mount, from a process whose view the mount chooses."""
import errno, json, mmap, os, sys, time

def read_all(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)

def observe(path):
    """What this process sees of `path`: bytes and sizes by every route."""
    out = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        data = read_all(fd)
        out["read"] = data.hex()
        size = os.fstat(fd).st_size
        out["fstat"] = size
        if size:
            for name, flags in (("mmap_shared", mmap.MAP_SHARED),
                                ("mmap_private", mmap.MAP_PRIVATE)):
                with mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ) as m:
                    out[name] = m[:].hex()
    finally:
        os.close(fd)
    out["stat"] = os.stat(path).st_size
    return out

def listing(directory):
    """Sizes of the directory's entries as os.scandir shows them (plus '.isofs' presence)."""
    with os.scandir(directory) as entries:
        return {e.name: e.stat(follow_symlinks=False).st_size for e in entries}

def run_once(paths):
    result = {"files": {}, "listings": {}}
    for path in paths:
        try:
            result["files"][path] = observe(path)
        except OSError as exc:
            result["files"][path] = {"errno": exc.errno}
        directory = os.path.dirname(path)
        if directory not in result["listings"]:
            result["listings"][directory] = listing(directory)
    return result

def loop(expect_file, iterations, go_file):
    """Check every route against the expectations, `iterations` times, after `go_file`."""
    with open(expect_file) as f:
        expect = json.load(f)
    wanted = {p: (bytes.fromhex(e["content"]), e["size"]) for p, e in expect["files"].items()}
    listed = expect["listings"]
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.001)
    wrong = 0
    checks = 0
    examples = []
    def check(what, got, want):
        nonlocal wrong, checks
        checks += 1
        if got != want:
            wrong += 1
            if len(examples) < 5:
                shown = got[:40].hex() if isinstance(got, bytes) else got
                examples.append(f"iteration {i}: {what}: {shown!r}")
    for i in range(iterations):
        for path, (data, size) in wanted.items():
            fd = os.open(path, os.O_RDONLY)
            try:
                check(f"{path} read", read_all(fd), data)
                check(f"{path} pread tail", os.pread(fd, 64, max(0, size - 64)), data[-64:])
                check(f"{path} fstat", os.fstat(fd).st_size, size)
                if i % 4 == 0:
                    flags = mmap.MAP_SHARED if i % 8 == 0 else mmap.MAP_PRIVATE
                    with mmap.mmap(fd, 0, flags=flags, prot=mmap.PROT_READ) as m:
                        check(f"{path} mmap {flags}", m[:], data)
            finally:
                os.close(fd)
            check(f"{path} stat", os.stat(path).st_size, size)
        if i % 2 == 0:
            for directory, sizes in listed.items():
                seen = listing(directory)
                check(f"{directory} listing", {n: seen.get(n) for n in sizes}, sizes)
    print(json.dumps({"checks": checks, "wrong": wrong, "examples": examples}), flush=True)

def serve():
    """One JSON request per stdin line, one JSON answer per stdout line, until EOF."""
    for line in sys.stdin:
        print(json.dumps(run_once(json.loads(line))), flush=True)

def hold(path):
    """Open `path`, report the descriptor and first bytes, keep it open until stdin closes."""
    fd = os.open(path, os.O_RDONLY)
    print(json.dumps({"fd": fd, "head": os.pread(fd, 32, 0).hex()}), flush=True)
    sys.stdin.read()

def session(path):
    """Keep `path` open read-write and act on it, one stdin command per line."""
    fd = os.open(path, os.O_RDWR)
    for line in sys.stdin:
        words = line.split()
        if words[0] == "read":
            data = read_all_at(fd)
            print(json.dumps({"data": data.hex(), "fstat": os.fstat(fd).st_size}), flush=True)
        elif words[0] == "pwrite":
            os.pwrite(fd, bytes.fromhex(words[2]), int(words[1]))
            print("{}", flush=True)
    os.close(fd)

def read_all_at(fd):
    chunks, offset = [], 0
    while chunk := os.pread(fd, 1 << 20, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)

def steal(pid, fd):
    """Open another process's descriptor through /proc/PID/fd/N and read it."""
    try:
        opened = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY)
    except OSError as exc:
        print(json.dumps({"errno": exc.errno}))
        return
    try:
        print(json.dumps({"data": os.pread(opened, 1 << 16, 0).hex()}))
    finally:
        os.close(opened)

def write(path, how, offset=0):
    data = bytes.fromhex(sys.stdin.read())  # may be larger than one argument can be
    offset = int(offset)
    if how == "create":  # a new file
        with open(path, "xb") as f:
            f.write(data)
    elif how == "rewrite":  # O_TRUNC, then the whole file
        with open(path, "wb") as f:
            f.write(data)
    elif how == "pwrite":
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, data, offset)
        finally:
            os.close(fd)
    elif how == "mmap_shared":  # store through a shared writable mapping, msync, close
        with open(path, "r+b") as f, mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED,
                                              prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
            m[offset:offset + len(data)] = data
            m.flush()
    elif how == "mmap_private":  # copy-on-write: the mapping changes, the file must not
        with open(path, "r+b") as f:
            before = f.read()
            with mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                           prot=mmap.PROT_READ | mmap.PROT_WRITE) as m:
                m[offset:offset + len(data)] = data
                mapped = m[:]
            f.seek(0)
            after = f.read()
        print(json.dumps({"before": before.hex(), "mapped": mapped.hex(),
                          "after": after.hex()}))
    else:
        raise SystemExit(f"unknown write mode {how}")

ALPHABET = frozenset(b"abcdefghijklmnopqrstuvwxyz")

def churn(path, role, iterations, go_file, size):
    """Write or check `path` in a loop, concurrently with other roles.

    The logical content always has `size` bytes of lowercase letters: writers store runs of one
    letter at offsets inside it (the target writer in plaintext, the native writer encoded with
    the file's own seed), readers check every byte they see is what their view must show.
    """
    import random
    rng = random.Random(role)
    iterations, size = int(iterations), int(size)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(go_file):
        if time.monotonic() > deadline:
            raise SystemExit("no go")
        time.sleep(0.001)
    wrong, examples = 0, []
    def bad(i, what):
        nonlocal wrong
        wrong += 1
        if len(examples) < 5:
            examples.append(f"iteration {i}: {what}")
    for i in range(iterations):
        length = rng.randrange(1, 300)
        offset = rng.randrange(0, size - length)
        run = bytes([rng.choice(b"abcdefghijklmnopqrstuvwxyz")]) * length
        if role == "write-plain":
            fd = os.open(path, os.O_RDWR)
            try:
                os.pwrite(fd, run, offset)
            finally:
                os.close(fd)
        elif role == "write-encoded":
            fd = os.open(path, os.O_RDWR)
            try:
                header = os.pread(fd, 16, 0)
                if header[:8] != b"XORPAD01":
                    bad(i, f"native header {header!r}")
                    continue
                seed = int.from_bytes(header[8:16], "big")
                encoded = bytes(c ^ (((offset + j) * 131 + 7 + seed) & 0xFF)
                                for j, c in enumerate(run))
                os.pwrite(fd, encoded, 16 + offset)
            finally:
                os.close(fd)
        else:
            fd = os.open(path, os.O_RDONLY)
            try:
                data = read_all(fd)
                if i % 5 == 0:
                    with mmap.mmap(fd, 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ) as m:
                        mapped = m[:]
                    if role == "read-plain" and not set(mapped) <= ALPHABET:
                        bad(i, f"target mmap shows {mapped[:24]!r}")
                    if role == "read-encoded" and mapped[:8] != b"XORPAD01":
                        bad(i, f"native mmap shows {mapped[:24]!r}")
                fsize = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if role == "read-plain":
                if len(data) != size or fsize != size:
                    bad(i, f"target sizes {len(data)}/{fsize}, want {size}")
                elif not set(data) <= ALPHABET:
                    bad(i, f"target read {data[:24]!r}")
            else:
                if len(data) != size + 16 or fsize != size + 16 or data[:8] != b"XORPAD01":
                    bad(i, f"native sizes {len(data)}/{fsize} head {data[:16]!r}")
                    continue
                seed = int.from_bytes(data[8:16], "big")
                body = data[16:]
                plain = bytes(c ^ ((j * 131 + 7 + seed) & 0xFF) for j, c in enumerate(body))
                if not set(plain) <= ALPHABET:
                    bad(i, f"native bytes decode to {plain[:24]!r}")
    print(json.dumps({"wrong": wrong, "examples": examples}), flush=True)

def main():
    command, args = sys.argv[1], sys.argv[2:]
    if command == "once":
        print(json.dumps(run_once(args)))
    elif command == "loop":
        loop(args[0], int(args[1]), args[2])
    elif command == "serve":
        serve()
    elif command == "hold":
        hold(args[0])
    elif command == "steal":
        steal(int(args[0]), int(args[1]))
    elif command == "write":
        write(*args)
    elif command == "churn":
        churn(*args)
    elif command == "session":
        session(args[0])
    elif command == "exe":
        print(os.readlink("/proc/self/exe"))
    else:
        raise SystemExit(f"unknown command {command}")

main()
'''


@dataclass(frozen=True)
class Interpreter:
    """A Python executable (by path) and the environment it needs to find its stdlib."""

    name: str
    exe: str
    env: dict[str, str]

    def command(self, *args: str | os.PathLike[str]) -> list[str]:
        return [self.exe, *(os.fspath(a) for a in args)]

    def run(
        self,
        *args: str | os.PathLike[str],
        check: bool = True,
        timeout: float = PROC_TIMEOUT,
        stdin: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            self.command(*args),
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.env,
            cwd="/",
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{self.name} python exited {result.returncode}\n"
                f"stdout: {result.stdout}\nstderr: {result.stderr}"
            )
        return result

    def popen(self, *args: str | os.PathLike[str]) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.command(*args),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=self.env,
            cwd="/",
        )


def _child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(extra)
    return env


def _usable(python: Interpreter) -> bool:
    result = python.run("-c", "import os, mmap, json", check=False)
    return result.returncode == 0


@pytest.fixture(scope="module")
def interpreters(tmp_path_factory: pytest.TempPathFactory) -> tuple[Interpreter, Interpreter]:
    """(target, native): a copy of the real interpreter binary, and the original."""
    real = os.path.realpath(sys.executable)
    native = Interpreter("native", real, _child_env())
    if not _usable(native):
        pytest.skip(f"{real} cannot run the probe")
    bin_dir = tmp_path_factory.mktemp("views") / "target-bin"
    bin_dir.mkdir()
    copy = bin_dir / "python3"
    shutil.copy2(real, copy)
    target = Interpreter("target", os.fspath(copy), _child_env())
    if not _usable(target):  # a relocated binary may not find its stdlib by itself
        target = Interpreter("target", os.fspath(copy), _child_env(PYTHONHOME=sys.base_prefix))
        if not _usable(target):
            pytest.skip("a copy of the interpreter cannot find its standard library")
    # The premise of every test here: the two processes differ by /proc/PID/exe.
    assert target.run(
        "-c", "import os; print(os.readlink('/proc/self/exe'))"
    ).stdout.strip() == os.fspath(copy)
    assert (
        native.run("-c", "import os; print(os.readlink('/proc/self/exe'))").stdout.strip() == real
    )
    return target, native


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("probe") / "probe.py"
    path.write_text(PROBE)
    return path


@dataclass
class Views:
    """A mount of an xorpad source plus the two interpreters and the probe."""

    mount: Any  # conftest.Mount
    target: Interpreter
    native: Interpreter
    probe: Path
    base: Path

    def at(self, *parts: str) -> str:
        return os.fspath(self.mount.at(*parts))

    def src(self, *parts: str) -> Path:
        return self.mount.src(*parts)

    def once(self, python: Interpreter, *paths: str) -> dict[str, Any]:
        return json.loads(python.run(self.probe, "once", *paths).stdout)

    def write(
        self, python: Interpreter, path: str, data: bytes, how: str, offset: int = 0
    ) -> subprocess.CompletedProcess[str]:
        return python.run(self.probe, "write", path, how, str(offset), stdin=data.hex())


def init_source(source: Path, isofs_cli: Any) -> None:
    result = isofs_cli("init", source, "--provider", "xorpad", "--option", f"seed={SEED}")
    assert result.returncode == 0, result.stderr


def make_views(
    tmp_path: Path,
    mount_factory: Any,
    isofs_cli: Any,
    interpreters: tuple[Interpreter, Interpreter],
    probe: Path,
    *extra: str,
    target_rule: bool = True,
    preexisting: dict[str, bytes] | None = None,
) -> Views:
    target, native = interpreters
    n = len(list(tmp_path.glob("vsrc*")))
    source = tmp_path / f"vsrc{n}"
    mnt = tmp_path / f"vmnt{n}"
    source.mkdir()
    mnt.mkdir()
    for name, data in (preexisting or {}).items():  # before init: unformatted
        (source / name).write_bytes(data)
    init_source(source, isofs_cli)
    rules = ("--target", f"exe={target.exe}") if target_rule else ()
    mount = mount_factory(source, mnt, *rules, *extra)
    return Views(mount, target, native, probe, tmp_path)


@pytest.fixture
def views(tmp_path, mount_factory, isofs_cli, interpreters, probe) -> Views:
    """An xorpad source mounted with the interpreter copy as the target executable."""
    return make_views(tmp_path, mount_factory, isofs_cli, interpreters, probe)


def expected(native_bytes: bytes, view: str) -> bytes:
    """What `view` must show of a file whose native bytes are `native_bytes`."""
    if view == "target" and native_bytes[:8] == MAGIC and len(native_bytes) >= HEADER_SIZE:
        return xorpad_decode(native_bytes)
    return native_bytes


def assert_observed(observation: dict[str, Any], data: bytes, label: str) -> None:
    """Every route of one file's observation shows exactly `data` and its size."""
    assert "errno" not in observation, f"{label}: {os.strerror(observation['errno'])}"
    problems = []
    for route in ("read", "mmap_shared", "mmap_private"):
        if route in observation and bytes.fromhex(observation[route]) != data:
            got = bytes.fromhex(observation[route])
            problems.append(f"{route}: {len(got)} bytes starting {got[:24]!r}")
    if len(data):
        assert "mmap_shared" in observation and "mmap_private" in observation
    for route in ("fstat", "stat"):
        if observation[route] != len(data):
            problems.append(f"{route} size {observation[route]} != {len(data)}")
    assert not problems, f"{label}: wrong view: " + "; ".join(problems)


def check_both_views(views: Views, names: dict[str, bytes]) -> None:
    """Both processes see, for each file name (native bytes given), their view's bytes."""
    paths = [views.at(name) for name in names]
    for python in (views.target, views.native):
        seen = views.once(python, *paths)
        for name, native_bytes in names.items():
            want = expected(native_bytes, python.name)
            assert_observed(seen["files"][views.at(name)], want, f"{python.name} {name}")
        listing = seen["listings"][views.at()]
        sizes = {n: listing.get(n) for n in names}
        assert sizes == {n: len(expected(b, python.name)) for n, b in names.items()}, (
            f"{python.name} listing sizes"
        )


# ------------------------------------------------------------------ reading in both views


def test_target_created_file_is_formatted_and_both_views_read_theirs(views):
    plain = content("alpha", 9000)  # several kernel pages
    views.write(views.target, views.at("alpha"), plain, "create")
    native_bytes = views.src("alpha").read_bytes()
    assert native_bytes.startswith(MAGIC), "a file created in the target view must be formatted"
    assert int.from_bytes(native_bytes[8:16], "big") == SEED
    assert len(native_bytes) == len(plain) + HEADER_SIZE
    assert xorpad_decode(native_bytes) == plain
    check_both_views(views, {"alpha": native_bytes})


def test_native_created_file_is_not_formatted(views):
    plain = content("beta", 5000)
    views.write(views.native, views.at("beta"), plain, "create")
    assert views.src("beta").read_bytes() == plain
    check_both_views(views, {"beta": plain})


def test_formatting_rules_for_empty_and_plain_files(views):
    # An empty native file: a read-only open in the target view leaves it alone...
    views.write(views.native, views.at("e"), b"", "create")
    check_both_views(views, {"e": b""})
    assert views.src("e").read_bytes() == b""
    # ...and the first target write formats it (new data must not land in clear).
    views.write(views.target, views.at("e"), b"into an empty file", "pwrite")
    assert xorpad_decode(views.src("e").read_bytes()) == b"into an empty file"
    check_both_views(views, {"e": views.src("e").read_bytes()})
    # A plain (native) file stays plain when the target view writes into it...
    views.write(views.native, views.at("p"), b"plain text", "create")
    views.write(views.target, views.at("p"), b"TEXT", "pwrite", 6)
    assert views.src("p").read_bytes() == b"plain TEXT"
    check_both_views(views, {"p": b"plain TEXT"})
    # ...but rewritten whole (O_TRUNC) through the target view it comes back formatted.
    views.write(views.target, views.at("p"), b"rewritten by target", "rewrite")
    assert xorpad_decode(views.src("p").read_bytes()) == b"rewritten by target"
    check_both_views(views, {"p": views.src("p").read_bytes()})


def test_files_in_subdirectories(views):
    os.mkdir(views.at("sub"))  # the test process is native; directories are shared
    views.write(views.target, views.at("sub", "t"), content("sub-t", 3000), "create")
    views.write(views.native, views.at("sub", "n"), content("sub-n", 2000), "create")
    native = {name: views.src("sub", name).read_bytes() for name in ("t", "n")}
    assert native["t"].startswith(MAGIC) and not native["n"].startswith(MAGIC)
    for python in (views.target, views.native):
        seen = views.once(python, views.at("sub", "t"), views.at("sub", "n"))
        for name, data in native.items():
            assert_observed(seen["files"][views.at("sub", name)], expected(data, python.name), name)
        sizes = seen["listings"][views.at("sub")]
        assert sizes == {n: len(expected(d, python.name)) for n, d in native.items()}


def test_preexisting_files_are_identical_in_both_views(
    tmp_path, mount_factory, isofs_cli, interpreters, probe
):
    files = {
        "plain": content("pre", 7000),
        "short": b"XORPAD0",  # shorter than a header: never formatted
        "empty": b"",
        "fake-magic": b"NOTXOR01" + bytes(40),
    }
    views = make_views(tmp_path, mount_factory, isofs_cli, interpreters, probe, preexisting=files)
    check_both_views(views, files)
    for name, data in files.items():
        assert views.src(name).read_bytes() == data, f"{name} changed on disk by reading"


def test_large_file_spanning_cache_pages(views):
    # Larger than one 64 KiB section page and not page-aligned.
    plain = content("large", 200_003)
    views.write(views.target, views.at("large"), plain, "create")
    check_both_views(views, {"large": views.src("large").read_bytes()})


def test_sizes_after_remount_and_changes_while_unmounted(views, mount_factory):
    names = {"a": 1000, "b": 70_000, "c": 3}
    for name, size in names.items():
        views.write(views.target, views.at(name), content(name, size), "create")
    check_both_views(views, {name: views.src(name).read_bytes() for name in names})
    result = views.mount.umount()
    assert result.returncode == 0, result.stderr
    assert views.src(".isofs", "sizecache.db").exists(), "the size cache is kept in .isofs"
    # While unmounted: b gets new content and size, c is replaced by plain bytes.
    views.src("b").write_bytes(xorpad_encode(content("b2", 4321), OTHER_SEED))
    views.src("c").write_bytes(b"plain now")
    views.mount = mount_factory(views.mount.source, views.mount.mnt, *views.mount.args)
    check_both_views(views, {name: views.src(name).read_bytes() for name in names})


def test_metadata_directory_is_native_only(views):
    # The target process looks first: a native lookup would let the kernel cache the
    # (shared) .isofs entry for a second; see the test below.
    code = (
        "import json, os, sys\n"
        "mnt = sys.argv[1]\n"
        "out = []\n"
        "for call in (lambda: os.stat(mnt + '/.isofs'),\n"
        "             lambda: open(mnt + '/.isofs/config.json', 'rb').read(),\n"
        "             lambda: os.mkdir(mnt + '/.isofs'),\n"
        "             lambda: open(mnt + '/.isofs', 'xb')):\n"
        "    try:\n"
        "        call()\n"
        "        out.append(0)\n"
        "    except OSError as exc:\n"
        "        out.append(exc.errno)\n"
        "print(json.dumps([out, os.listdir(mnt)]))\n"
    )
    result = views.target.run("-c", code, views.at())
    (stat_err, read_err, mkdir_err, create_err), names = json.loads(result.stdout)
    assert ".isofs" not in names
    assert stat_err == errno.ENOENT
    assert read_err == errno.ENOENT
    assert mkdir_err == errno.EACCES
    assert create_err == errno.EACCES
    assert views.src(".isofs").is_dir() and views.src(".isofs", "config.json").is_file()
    native_view = views.once(views.native, views.at("f"))  # f does not exist: listing only
    assert ".isofs" in native_view["listings"][views.at()]
    config = views.native.run("-c", f"print(open({views.at('.isofs', 'config.json')!r}).read())")
    assert "xorpad" in config.stdout


def test_metadata_directory_stays_hidden_right_after_native_lookup(views):
    code = (
        "import os, sys\n"
        "try:\n"
        "    print(sorted(os.listdir(sys.argv[1] + '/.isofs')))\n"
        "except OSError as exc:\n"
        "    print(exc.errno)\n"
    )
    meta = views.at(".isofs")
    for _ in range(3):
        views.native.run("-c", f"import os; os.stat({meta!r}); os.listdir({views.at()!r})")
        result = views.target.run("-c", code, views.at())
        assert result.stdout.strip() == str(errno.ENOENT), (
            f"target process sees .isofs: {result.stdout.strip()}"
        )


# ------------------------------------------------------- interleaved and concurrent reading


def _ask(process: subprocess.Popen[str], paths: list[str]) -> dict[str, Any]:
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write(json.dumps(paths) + "\n")
    process.stdin.flush()
    line = process.stdout.readline()
    if not line:
        process.wait(timeout=10)
        assert process.stderr is not None
        raise AssertionError(f"probe died: {process.stderr.read()}")
    return json.loads(line)


@contextlib.contextmanager
def probes(views: Views, *args: str) -> Iterator[tuple[subprocess.Popen[str], ...]]:
    """A target and a native probe process; both are ended (by PID) whatever happens."""
    started = [python.popen(views.probe, *args) for python in (views.target, views.native)]
    try:
        yield tuple(started)
    finally:
        for process in started:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.stdin.close()  # type: ignore[union-attr]
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=5)
            for stream in (process.stdout, process.stderr):
                if stream is not None:
                    stream.close()


def test_interleaved_processes_each_keep_their_view(views):
    plain = content("inter", 12_345)
    views.write(views.target, views.at("t"), plain, "create")
    (views.src("p")).write_bytes(content("passthrough", 3000))
    files = {name: views.src(name).read_bytes() for name in ("t", "p")}
    paths = [views.at(name) for name in files]
    wrong: list[str] = []
    with probes(views, "serve") as (target, native):
        for round_ in range(60):
            order = ((target, "target"), (native, "native"))
            for process, view in order if round_ % 2 == 0 else order[::-1]:
                seen = _ask(process, paths)
                for name, native_bytes in files.items():
                    try:
                        assert_observed(
                            seen["files"][views.at(name)],
                            expected(native_bytes, view),
                            f"round {round_} {view} {name}",
                        )
                    except AssertionError as exc:
                        wrong.append(str(exc).splitlines()[0])
                sizes = seen["listings"][views.at()]
                for name, native_bytes in files.items():
                    if sizes.get(name) != len(expected(native_bytes, view)):
                        wrong.append(f"round {round_} {view} listing {name}: {sizes.get(name)}")
    assert not wrong, f"{len(wrong)} wrong-view results, first: {wrong[:5]}"


def test_concurrent_processes_never_see_the_other_view(views):
    plain = content("conc", 6000)
    views.write(views.target, views.at("t"), plain, "create")
    views.src("p").write_bytes(content("passthrough", 2500))
    files = {name: views.src(name).read_bytes() for name in ("t", "p")}
    go = views.base / "go"
    expectations = {}
    for view in ("target", "native"):
        wanted = {name: expected(data, view) for name, data in files.items()}
        spec = {
            "files": {views.at(n): {"content": d.hex(), "size": len(d)} for n, d in wanted.items()},
            "listings": {views.at(): {n: len(d) for n, d in wanted.items()}},
        }
        expectations[view] = views.base / f"expect-{view}.json"
        expectations[view].write_text(json.dumps(spec))
    iterations = 2000
    processes = [
        python.popen(views.probe, "loop", expectations[python.name], str(iterations), go)
        for python in (views.target, views.native)
    ]
    results = []
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        go.touch()  # start both loops together
        for process in processes:
            stdout, stderr = process.communicate(timeout=PROC_TIMEOUT)
            assert process.returncode == 0, stderr
            results.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
    for view, result in zip(("target", "native"), results, strict=True):
        assert result["checks"] > iterations * 8
        assert result["wrong"] == 0, f"{view}: {result['wrong']} wrong: {result['examples']}"


def test_cold_files_first_opened_by_both_views_at_once(views):
    """Files nobody has looked at yet, opened by three processes of each view together."""
    files = {}
    for n in range(24):
        plain = content(f"cold{n}", 500 + 997 * n)
        files[f"c{n:02}"] = xorpad_encode(plain, SEED + n) if n % 3 else plain
        views.src(f"c{n:02}").write_bytes(files[f"c{n:02}"])
    go = views.base / "go-cold"
    spec_files = {}
    for view in ("target", "native"):
        wanted = {name: expected(data, view) for name, data in files.items()}
        spec = {
            "files": {views.at(n): {"content": d.hex(), "size": len(d)} for n, d in wanted.items()},
            "listings": {views.at(): {n: len(d) for n, d in wanted.items()}},
        }
        spec_files[view] = views.base / f"cold-{view}.json"
        spec_files[view].write_text(json.dumps(spec))
    pythons = [views.target, views.native] * 3
    processes = [
        python.popen(views.probe, "loop", spec_files[python.name], "3", go) for python in pythons
    ]
    results = []
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        go.touch()
        for python, process in zip(pythons, processes, strict=True):
            stdout, stderr = process.communicate(timeout=PROC_TIMEOUT)
            assert process.returncode == 0, stderr
            results.append((python.name, json.loads(stdout.strip().splitlines()[-1])))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
    wrong = [(view, r["examples"]) for view, r in results if r["wrong"]]
    assert not wrong, wrong
    assert all(r["checks"] >= 3 * len(files) * 4 for _view, r in results)


def test_concurrent_writes_and_reads_in_both_views(views):
    """Writers and readers of both views at once: nobody sees the other view or garbage."""
    size = 20_000
    views.write(views.target, views.at("c"), b"m" * size, "create")
    go = views.base / "go-churn"
    roles = (
        (views.target, "write-plain", 150),
        (views.native, "write-encoded", 150),
        (views.target, "read-plain", 300),
        (views.native, "read-encoded", 300),
    )
    processes = [
        python.popen(views.probe, "churn", views.at("c"), role, str(n), go, str(size))
        for python, role, n in roles
    ]
    results = {}
    try:
        for process in processes:
            assert process.stdout is not None
            assert process.stdout.readline().strip() == "ready"
        go.touch()
        for (_python, role, _n), process in zip(roles, processes, strict=True):
            stdout, stderr = process.communicate(timeout=PROC_TIMEOUT)
            assert process.returncode == 0, f"{role}: {stderr}"
            results[role] = json.loads(stdout.strip().splitlines()[-1])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=5)
    problems = {role: r["examples"] for role, r in results.items() if r["wrong"]}
    assert not problems, problems
    # Quiet again: both views agree on the final content.
    native_bytes = views.src("c").read_bytes()
    assert len(native_bytes) == size + HEADER_SIZE
    assert set(xorpad_decode(native_bytes)) <= set(b"abcdefghijklmnopqrstuvwxyz")
    check_both_views(views, {"c": native_bytes})


THREADS = r"""
import os, sys, threading
path, want_magic = sys.argv[1], sys.argv[2] == "native"
wrong = []
def work():
    for _ in range(100):
        with open(path, "rb") as f:
            data = f.read()
        if (data[:8] == b"XORPAD01") != want_magic or os.stat(path).st_size != len(data):
            wrong.append(data[:8])
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(len(wrong))
"""


def test_threads_of_a_process_share_its_view(views):
    # FUSE reports thread ids; every thread must get its process's view.
    views.write(views.target, views.at("t"), content("threads", 4000), "create")
    processes = [
        python.popen("-c", THREADS, views.at("t"), python.name)
        for python in (views.target, views.native)
    ]
    for python, process in zip((views.target, views.native), processes, strict=True):
        stdout, stderr = process.communicate(timeout=PROC_TIMEOUT)
        assert process.returncode == 0, stderr
        assert stdout.strip() == "0", f"{python.name}: {stdout.strip()} wrong-view reads"


SEE_THEN_EXEC = (
    "import os, sys\n"
    "path = sys.argv[1]\n"
    "print(open(path, 'rb').read().hex(), os.stat(path).st_size, flush=True)\n"
    "os.execv(sys.argv[2], [sys.argv[2], '-c', 'import os, sys; path = sys.argv[1]; "
    'print(open(path, "rb").read().hex(), os.stat(path).st_size)\', path])\n'
)


def test_exec_of_another_program_changes_the_view(views):
    # Same process (and thread id), new executable: the view follows /proc/PID/exe.
    plain = content("exec-switch", 2000)
    views.write(views.target, views.at("x"), plain, "create")
    native_bytes = views.src("x").read_bytes()
    for first, then in ((views.native, views.target), (views.target, views.native)):
        result = first.run("-c", SEE_THEN_EXEC, views.at("x"), then.exe)
        lines = [line.split() for line in result.stdout.strip().splitlines()]
        assert len(lines) == 2, result.stdout
        for (data_hex, size), python in zip(lines, (first, then), strict=True):
            want = expected(native_bytes, python.name)
            assert (bytes.fromhex(data_hex), int(size)) == (want, len(want)), (
                f"{first.name} then exec {then.name}: the {python.name} part has the wrong view"
            )


# --------------------------------------------------------------- /proc/PID/fd of another view


def test_proc_fd_of_target_gives_no_target_attributes(views):
    plain = content("attrs", 3000)
    views.write(views.target, views.at("s"), plain, "create")
    holder = views.target.popen(views.probe, "hold", views.at("s"))
    code = (
        "import json, os, sys\n"
        "link = f'/proc/{sys.argv[1]}/fd/{sys.argv[2]}'\n"
        "out = {}\n"
        "try:\n"
        "    out['stat'] = os.stat(link).st_size\n"
        "except OSError as exc:\n"
        "    out['stat'] = -exc.errno\n"
        "try:\n"
        "    os.truncate(link, 20)\n"
        "    out['truncate'] = 0\n"
        "except OSError as exc:\n"
        "    out['truncate'] = -exc.errno\n"
        "print(json.dumps(out))\n"
    )
    try:
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline())
        result = views.native.run("-c", code, str(holder.pid), str(held["fd"]))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()
    out = json.loads(result.stdout)
    native_size = len(plain) + HEADER_SIZE
    assert out["stat"] in (-errno.EACCES, native_size), "native process saw the logical size"
    if out["truncate"] == 0:  # allowed only as a native truncate
        assert views.src("s").stat().st_size == 20, "truncated in the target view"
    else:
        assert out["truncate"] == -errno.EACCES
        assert views.src("s").stat().st_size == native_size


@pytest.mark.parametrize("holder_view", ["target", "native"])
def test_proc_fd_of_another_view_is_refused(views, holder_view):
    plain = content("secret", 3000)
    views.write(views.target, views.at("s"), plain, "create")
    native_bytes = views.src("s").read_bytes()
    holder_python = views.target if holder_view == "target" else views.native
    thief_python = views.native if holder_view == "target" else views.target
    holder = holder_python.popen(views.probe, "hold", views.at("s"))
    try:
        assert holder.stdout is not None
        held = json.loads(holder.stdout.readline())
        assert bytes.fromhex(held["head"]) == expected(native_bytes, holder_view)[:32]
        for _ in range(3):
            result = thief_python.run(views.probe, "steal", str(holder.pid), str(held["fd"]))
            answer = json.loads(result.stdout)
            if "data" in answer:
                got = bytes.fromhex(answer["data"])
                assert got != expected(native_bytes, holder_view), (
                    f"{thief_python.name} process read the {holder_view} bytes"
                )
            assert answer == {"errno": errno.EACCES}
        # The thief still reads its own view through the path.
        seen = views.once(thief_python, views.at("s"))
        assert_observed(
            seen["files"][views.at("s")], expected(native_bytes, thief_python.name), "thief"
        )
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        for stream in (holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()


# -------------------------------------------------------------------------------- writes


def test_target_write_then_native_reads_encoded_bytes(views):
    first = content("v1", 5000)
    views.write(views.target, views.at("w"), first, "create")
    # Overwrite a part in the middle, then write across the end.
    patch = b"PATCHED-BY-TARGET" * 10
    views.write(views.target, views.at("w"), patch, "pwrite", 1234)
    views.write(views.target, views.at("w"), patch, "pwrite", 4900)
    want = first[:1234] + patch + first[1234 + len(patch) : 4900] + patch
    native_bytes = views.src("w").read_bytes()
    assert xorpad_decode(native_bytes) == want
    check_both_views(views, {"w": native_bytes})
    # Rewritten whole (O_TRUNC) through the target view: still formatted, new content.
    second = content("v2", 777)
    views.write(views.target, views.at("w"), second, "rewrite")
    native_bytes = views.src("w").read_bytes()
    assert xorpad_decode(native_bytes) == second
    check_both_views(views, {"w": native_bytes})


def test_target_write_through_shared_mmap(views):
    plain = content("mm", 10_000)
    views.write(views.target, views.at("m"), plain, "create")
    patch = b"<<written through a shared mapping>>"
    offset = 4090  # straddles a kernel page boundary
    views.write(views.target, views.at("m"), patch, "mmap_shared", offset)
    want = plain[:offset] + patch + plain[offset + len(patch) :]
    native_bytes = views.src("m").read_bytes()
    assert len(native_bytes) == len(plain) + HEADER_SIZE
    assert xorpad_decode(native_bytes) == want
    check_both_views(views, {"m": native_bytes})


def test_native_write_through_shared_mmap(views):
    plain = content("nm", 8000)
    views.write(views.target, views.at("m"), plain, "create")
    native_bytes = views.src("m").read_bytes()
    seed = int.from_bytes(native_bytes[8:16], "big")
    # The native process stores new content bytes encoded at their logical offset.
    patch = b"[native mmap]"
    logical = 5000
    encoded = bytes(c ^ k for c, k in zip(patch, keystream(seed, logical, len(patch)), strict=True))
    views.write(views.native, views.at("m"), encoded, "mmap_shared", HEADER_SIZE + logical)
    native_bytes = views.src("m").read_bytes()
    assert xorpad_decode(native_bytes) == plain[:logical] + patch + plain[logical + len(patch) :]
    check_both_views(views, {"m": native_bytes})


@pytest.mark.parametrize("writer", ["target", "native"])
def test_private_writable_mapping_changes_nothing(views, writer):
    plain = content("priv", 6000)
    views.write(views.target, views.at("p"), plain, "create")
    native_before = views.src("p").read_bytes()
    python = views.target if writer == "target" else views.native
    result = views.write(python, views.at("p"), b"COPY-ON-WRITE", "mmap_private", 100)
    answer = json.loads(result.stdout)
    own = expected(native_before, writer)
    assert bytes.fromhex(answer["before"]) == own
    assert bytes.fromhex(answer["mapped"]) == own[:100] + b"COPY-ON-WRITE" + own[113:]
    assert bytes.fromhex(answer["after"]) == own
    assert views.src("p").read_bytes() == native_before
    check_both_views(views, {"p": native_before})


def test_native_rewrite_then_target_reads_new_plaintext(views):
    views.write(views.target, views.at("n"), content("old", 4000), "create")
    check_both_views(views, {"n": views.src("n").read_bytes()})  # both views have looked
    new = content("new-from-native", 6100)
    encoded = xorpad_encode(new, OTHER_SEED)  # a seed of the writer's choosing
    views.write(views.native, views.at("n"), encoded, "rewrite")
    assert views.src("n").read_bytes() == encoded
    check_both_views(views, {"n": encoded})
    # A partial native write into the content region.
    patch = b"partial native patch"
    logical = 3333
    pad = keystream(OTHER_SEED, logical, len(patch))
    views.write(
        views.native,
        views.at("n"),
        bytes(c ^ k for c, k in zip(patch, pad, strict=True)),
        "pwrite",
        HEADER_SIZE + logical,
    )
    native_bytes = views.src("n").read_bytes()
    assert xorpad_decode(native_bytes) == new[:logical] + patch + new[logical + len(patch) :]
    check_both_views(views, {"n": native_bytes})
    # A native rewrite in clear: no longer formatted, so both views pass it through.
    views.write(views.native, views.at("n"), b"now plain text", "rewrite")
    check_both_views(views, {"n": b"now plain text"})


class Session:
    """A probe process keeping one file open read-write (ended by closing its stdin)."""

    def __init__(self, views: Views, python: Interpreter, path: str) -> None:
        self.process = python.popen(views.probe, "session", path)

    def _ask(self, line: str) -> dict[str, Any]:
        process = self.process
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(line + "\n")
        process.stdin.flush()
        answer = process.stdout.readline()
        if not answer:
            process.wait(timeout=10)
            raise AssertionError(f"session died: {process.stderr.read()}")  # type: ignore[union-attr]
        return json.loads(answer)

    def read(self) -> tuple[bytes, int]:
        answer = self._ask("read")
        return bytes.fromhex(answer["data"]), answer["fstat"]

    def pwrite(self, offset: int, data: bytes) -> None:
        self._ask(f"pwrite {offset} {data.hex()}")

    def close(self) -> None:
        process = self.process
        if process.poll() is None:
            assert process.stdin is not None
            process.stdin.close()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=5)
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()
        assert process.returncode == 0


@contextlib.contextmanager
def session(views: Views, python: Interpreter, path: str) -> Iterator[Session]:
    opened = Session(views, python, path)
    try:
        yield opened
    finally:
        opened.close()


def encode_at(native_bytes: bytes, offset: int, data: bytes) -> bytes:
    """`data` encoded for logical `offset` of the formatted file `native_bytes`."""
    seed = int.from_bytes(native_bytes[8:16], "big")
    return bytes(c ^ k for c, k in zip(data, keystream(seed, offset, len(data)), strict=True))


def test_native_write_seen_by_target_that_holds_the_file_open_for_reading(views):
    plain = content("held", 5000)
    views.write(views.target, views.at("h"), plain, "create")
    native_before = views.src("h").read_bytes()
    patch = b"NATIVE-WROTE-THIS"
    with session(views, views.target, views.at("h")) as held:
        assert held.read() == (plain, len(plain))
        views.write(views.native, views.at("h"), encode_at(native_before, 100, patch), "pwrite",
                    HEADER_SIZE + 100)  # fmt: skip
        want = plain[:100] + patch + plain[100 + len(patch) :]
        assert xorpad_decode(views.src("h").read_bytes()) == want
        data, size = held.read()
    assert (data[:120], size) == (want[:120], len(want)), "held target descriptor reads stale"
    assert data == want


def test_native_rewrite_seen_by_target_that_holds_the_file_open(views):
    plain = content("held", 5000)
    views.write(views.target, views.at("h"), plain, "create")
    new = content("renewed", 3000)
    with session(views, views.target, views.at("h")) as held:
        assert held.read() == (plain, len(plain))
        views.write(views.native, views.at("h"), xorpad_encode(new, SEED), "rewrite")
        held_data, held_size = held.read()
        # Another target process opening the file now, while the first still holds it.
        reopened = views.once(views.target, views.at("h"))["files"][views.at("h")]
    assert_observed(reopened, new, "another target process opening after the native rewrite")
    assert (held_data[:40], held_size) == (new[:40], len(new)), "held descriptor"


def test_native_write_survives_target_write_to_other_bytes_of_an_open_file(views):
    plain = content("lost", 5000)
    views.write(views.target, views.at("u"), plain, "create")
    native_before = views.src("u").read_bytes()
    with session(views, views.target, views.at("u")) as held:
        held.read()  # the target view has the page cached
        views.write(views.native, views.at("u"), encode_at(native_before, 10, b"NNNN"), "pwrite",
                    HEADER_SIZE + 10)  # fmt: skip
        held.pwrite(2000, b"TTTT")  # another range of the same page
    want = bytearray(plain)
    want[10:14] = b"NNNN"
    want[2000:2004] = b"TTTT"
    got = xorpad_decode(views.src("u").read_bytes())
    assert got[10:14] == b"NNNN", "the native write was lost"
    assert got == bytes(want)
    check_both_views(views, {"u": views.src("u").read_bytes()})


def test_writes_alternating_between_views(views):
    path = views.at("alt")
    views.write(views.target, path, b"start", "create")
    for round_ in range(8):
        # Target writes plaintext; native must read its encoding.
        plain = content(f"t{round_}", 1000 + 517 * round_)
        views.write(views.target, path, plain, "rewrite")
        native_seen = views.once(views.native, path)["files"][path]
        native_bytes = bytes.fromhex(native_seen["read"])
        assert native_seen["stat"] == len(plain) + HEADER_SIZE, f"round {round_}"
        assert xorpad_decode(native_bytes) == plain, f"round {round_}: native read stale bytes"
        # Native writes an encoding; target must read the plaintext.
        plain = content(f"n{round_}", 3000 - 311 * round_)
        views.write(views.native, path, xorpad_encode(plain, SEED + round_), "rewrite")
        target_seen = views.once(views.target, path)["files"][path]
        assert_observed(target_seen, plain, f"round {round_} target")


def test_changes_behind_the_mounts_back(views):
    views.write(views.target, views.at("b"), content("before", 4000), "create")
    views.src("plain").write_bytes(b"plain before")
    check_both_views(views, {"b": views.src("b").read_bytes(), "plain": b"plain before"})
    new = content("behind", 9000)
    encoded = xorpad_encode(new, OTHER_SEED)
    views.src("b").write_bytes(encoded)  # directly in the source, not through the mount
    views.src("plain").write_bytes(b"plain after, and longer")
    changed_at = time.monotonic()
    size_code = "import os, sys; print(os.stat(sys.argv[1]).st_size, os.stat(sys.argv[2]).st_size)"
    for python, b_size in ((views.target, len(new)), (views.native, len(encoded))):
        want = f"{b_size} {len(b'plain after, and longer')}"
        while True:
            got = python.run("-c", size_code, views.at("b"), views.at("plain")).stdout.strip()
            if got == want or time.monotonic() - changed_at > 1.1:
                break
            time.sleep(0.05)
        assert got == want, f"{python.name}: sizes {got} 1.1 s after the change, want {want}"
    check_both_views(views, {"b": encoded, "plain": b"plain after, and longer"})


# ---------------------------------------------------------------------------- isofs exec


JOIN_AND_EXEC = (
    "import os, sys\n"
    "from isofs.views.execgroups import join_view_group\n"
    "join_view_group(sys.argv[1], os.getpid())\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)

#: Run in the exec'd process: what it and a child it spawns see of argv[1].
SEE_WITH_CHILD = (
    "import json, os, subprocess, sys\n"
    "def seen(path):\n"
    "    with open(path, 'rb') as f:\n"
    "        return [f.read().hex(), os.stat(path).st_size]\n"
    "child = subprocess.run([sys.executable, '-c', 'import os, sys; "
    'print(open(sys.argv[1], "rb").read().hex(), os.stat(sys.argv[1]).st_size)\', '
    "sys.argv[1]], capture_output=True, text=True, check=True).stdout.split()\n"
    "print(json.dumps({'self': seen(sys.argv[1]), 'child': [child[0], int(child[1])]}))\n"
)


def _cgroup_v2_writable() -> str | None:
    root = unified_hierarchy()
    if root is None:
        return "no cgroup v2 hierarchy"
    if os.geteuid() != 0 or not os.access(root, os.W_OK):
        return "joining a view group needs root"
    return None


def _seed_target_file(views: Views, plain: bytes) -> bytes:
    """A formatted file, written in the source (the mount may have no target process)."""
    encoded = xorpad_encode(plain, SEED)
    views.src("x").write_bytes(encoded)
    return encoded


def _assert_exec_saw(stdout: str, want: bytes, label: str) -> None:
    answer = json.loads(stdout.strip().splitlines()[-1])
    for who in ("self", "child"):
        data_hex, size = answer[who]
        got = bytes.fromhex(data_hex)
        assert (got[:24], size) == (want[:24], len(want)), f"{label}: {who} has the wrong view"
        assert got == want, f"{label}: {who}"


@dataclass
class ExecCase:
    views: Views
    group: str  # the view group joined
    python: Interpreter  # the program exec'd
    without_group: str  # the view the policy gives it otherwise
    plain: bytes
    encoded: bytes

    def want(self, view: str) -> bytes:
        return self.plain if view == "target" else self.encoded


EXEC_CASES = {
    # No --target rule at all: without exec everybody is native.
    "original-python-into-target-no-rules": (False, "target", "native", "native"),
    # The copy, which its exe makes a target, exec'd into the native group.
    "copy-into-native": (True, "native", "target", "target"),
    "original-python-into-target": (True, "target", "native", "native"),
}


@pytest.fixture(params=sorted(EXEC_CASES))
def exec_case(request, tmp_path, mount_factory, isofs_cli, interpreters, probe) -> ExecCase:
    reason = _cgroup_v2_writable()
    if reason:
        pytest.skip(reason)
    target_rule, group, python_name, without_group = EXEC_CASES[request.param]
    views = make_views(
        tmp_path, mount_factory, isofs_cli, interpreters, probe, target_rule=target_rule
    )
    plain = content("exec", 3000)
    encoded = _seed_target_file(views, plain)
    python = views.target if python_name == "target" else views.native
    return ExecCase(views, group, python, without_group, plain, encoded)


def test_view_group_selects_the_view_for_a_process_tree(exec_case):
    # What `isofs exec` does (join the group, then exec the command), without the CLI.
    case = exec_case
    path = case.views.at("x")
    alone = case.python.run("-c", SEE_WITH_CHILD, path)
    _assert_exec_saw(alone.stdout, case.want(case.without_group), "without a group")
    result = subprocess.run(
        [sys.executable, "-c", JOIN_AND_EXEC, case.group, case.python.exe, "-c", SEE_WITH_CHILD,
         path],
        capture_output=True, text=True, timeout=PROC_TIMEOUT, env=case.python.env, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_exec_saw(result.stdout, case.want(case.group), f"{case.group} group")


def test_isofs_exec_selects_the_view(exec_case):
    case = exec_case
    result = subprocess.run(
        [sys.executable, "-m", "isofs", "exec", "--view", case.group, "--",
         case.python.exe, "-c", SEE_WITH_CHILD, case.views.at("x")],
        capture_output=True, text=True, timeout=PROC_TIMEOUT, env=case.python.env, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_exec_saw(result.stdout, case.want(case.group), f"isofs exec --view {case.group}")


def test_no_exec_mount_ignores_view_groups(tmp_path, mount_factory, isofs_cli, interpreters, probe):
    reason = _cgroup_v2_writable()
    if reason:
        pytest.skip(reason)
    _target, native = interpreters
    views = make_views(
        tmp_path, mount_factory, isofs_cli, interpreters, probe, "--no-exec", target_rule=False
    )
    plain = content("noexec", 2000)
    encoded = _seed_target_file(views, plain)
    result = subprocess.run(
        [sys.executable, "-c", JOIN_AND_EXEC, "target", native.exe, "-c", SEE_WITH_CHILD,
         views.at("x")],
        capture_output=True, text=True, timeout=PROC_TIMEOUT, env=native.env, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    _assert_exec_saw(result.stdout, encoded, "--no-exec mount, target group")


# ------------------------------------------------------------------------ policy errors


BAD_RULES = [
    (["--target", "exe"], "--target 'exe'"),
    (["--target", "colour=red"], "unknown key 'colour'"),
    (["--target", "exe=python3"], "exe=python3"),
    (["--target", "uid=no-such-user-here"], "no-such-user-here"),
    (["--target", "exe=/bin/x,exe=/bin/y"], "duplicate"),
    (["--ignore", "cgroup="], "--ignore 'cgroup='"),
]

BAD_POLICIES = [
    ("[[rule]]\nview = 'target'\nexe = \n", "line 3"),
    ("[[rule]]\nview = 'target'\nexecutable = '/bin/x'\n", "unknown key 'executable'"),
    ("[[rule]]\nview = 'plaintext'\nexe = '/bin/x'\n", "rule 1"),
    ("[[rule]]\nexe = '/bin/x'\n", "missing key 'view'"),
    ("default_view = 'both'\n", "default_view"),
    ("[[rule]]\nview = 'target'\nuid = true\n", "uid"),
    ("rules = []\n", "rules"),
]


def _assert_refused(result: subprocess.CompletedProcess[str], mnt: Path, needle: str) -> None:
    try:
        assert result.returncode != 0, f"mount succeeded: {result.stdout} {result.stderr}"
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, f"expected one line, got: {result.stderr}"
        assert lines[0].startswith("isofs: error: "), lines[0]
        assert needle in lines[0], lines[0]
        assert "Traceback" not in result.stderr
        assert not runtime.is_mounted(os.path.realpath(mnt))
        assert runtime.MountRecord.load(os.path.realpath(mnt)) is None
    finally:
        if runtime.is_mounted(os.path.realpath(mnt)):  # never leave a mount behind
            subprocess.run([sys.executable, "-m", "isofs", "umount", os.fspath(mnt)],
                           capture_output=True, timeout=30)  # fmt: skip
            subprocess.run(["fusermount3", "-u", "-z", os.fspath(mnt)], capture_output=True)


@pytest.fixture
def bare_dirs(tmp_path: Path, isofs_cli) -> tuple[Path, Path]:
    source, mnt = tmp_path / "src", tmp_path / "mnt"
    source.mkdir()
    mnt.mkdir()
    init_source(source, isofs_cli)
    return source, mnt


@pytest.mark.parametrize(("args", "needle"), BAD_RULES, ids=[a[1] for a, _ in BAD_RULES])
def test_malformed_rule_refuses_to_mount(bare_dirs, isofs_cli, args, needle):
    source, mnt = bare_dirs
    result = isofs_cli("mount", source, mnt, "--log", mnt.parent / "log", *args)
    _assert_refused(result, mnt, needle)


@pytest.mark.parametrize(("text", "needle"), BAD_POLICIES, ids=[n for _, n in BAD_POLICIES])
def test_bad_policy_file_refuses_to_mount(bare_dirs, isofs_cli, tmp_path, text, needle):
    source, mnt = bare_dirs
    policy = tmp_path / "policy.toml"
    policy.write_text(text)
    result = isofs_cli("mount", source, mnt, "--log", tmp_path / "log", "--policy", policy)
    _assert_refused(result, mnt, needle)
    assert "policy.toml" in result.stderr, "the message names the file"


def test_missing_policy_file_refuses_to_mount(bare_dirs, isofs_cli, tmp_path):
    source, mnt = bare_dirs
    missing = tmp_path / "nowhere.toml"
    result = isofs_cli("mount", source, mnt, "--policy", missing)
    _assert_refused(result, mnt, "nowhere.toml")
