#!/usr/bin/env python3
"""The compression benchmark: isofs `compress` against btrfs `compress=zstd:3` and `zstd -3`.

Every contender works on the same data in the same run: a source tree (Python's standard
library) and a binary mix (shared libraries, executables and already-compressed files of
this machine), copied to a scratch directory first, plus a 256 MiB compressible file for
4 KiB random reads and a 100 MiB one for 4 KiB random writes + fsync. Contenders: the scratch
directory itself (ext4, the reference for speeds), btrfs mounted `compress=zstd:3` on a loop
device, an isofs compress mount and an isofs passthrough mount (one-view target mounts), the
minimal pyfuse3 passthrough (the floor of any pyfuse3 daemon), and
the `zstd` CLI at level 3 (file by file, and `-T2` over one tar). The order is rotated
between repetitions and medians are reported; everything read back is checked against the
source (untimed). It is a benchmark: nothing here asserts on timings.

    python bench/compress.py [--quick] [--repeat N] [--contenders LIST] [--phases LIST]
                             [--json FILE] [--workdir DIR]

See bench/README.md ("The compression benchmark") for what each row measures.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Protocol

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent


def _load_suite() -> ModuleType:
    """bench/run.py as a module: its mount, cache, process and reporting helpers."""
    if importlib.util.find_spec("isofs") is None:
        sys.path.insert(0, str(REPO_ROOT))
    spec = importlib.util.spec_from_file_location("isofs_bench_suite", BENCH_DIR / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


suite = _load_suite()
note, one_line, fmt = suite.note, suite.one_line, suite.fmt
Row = suite.Row

MiB = 1 << 20
GiB = 1 << 30
MB = 1_000_000  # speeds are MB/s (10^6 bytes) of logical data, as in the issue
PAGE = 4096
SEED = 20240609  # fixed: the same files, offsets and payloads in every run
ZSTD_LEVEL = 3
ELF_MAGIC = b"\x7fELF"
PACKED = (".gz", ".xz", ".bz2", ".zst", ".jpg", ".jpeg", ".png")


# --------------------------------------------------------------------------------------
# Sizes and rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    src_bytes: int | None  # None: the whole standard library
    elf_bytes: int  # binary mix: shared libraries and executables
    packed_bytes: int  # binary mix: already-compressed files
    max_file: int  # largest file taken into the binary mix
    rand_read_file: int
    rand_reads: int
    rand_write_file: int
    rand_writes: int
    btrfs_image: int  # sparse
    prefault: int  # 0 = no memory pre-fault before the timed writes


FULL = Sizes(None, 85 * MB, 15 * MB, 8 * MiB, 256 * MiB, 20_000, 100 * MiB, 300, 4 * GiB, 512 * MiB)
QUICK = Sizes(3 * MB, 2_500_000, 500_000, MiB, 16 * MiB, 1_000, 8 * MiB, 24, GiB, 0)

DATASETS = (("src", "src-tree", "source tree"), ("bin", "bin-mix", "binary mix"))
#: What a filesystem contender runs, in order (--phases picks some): the two datasets' rows,
#: then the big files' (the source tree is copied in any case: it is the big files' corpus).
PHASES = ("src", "bin", "rand-read", "rand-write")


def dataset_rows(key: str, label: str) -> list[Row]:
    return [
        Row(f"{key}-ratio-alloc", "x", True,
            f"{label}: logical bytes / bytes allocated (st_blocks; btrfs: compsize)"),
        Row(f"{key}-ratio-apparent", "x", True,
            f"{label}: logical bytes / stored file sizes (btrfs: compsize again)"),
        Row(f"{key}-write", "MB/s", True, f"{label}: cp -a into the contender + sync"),
        Row(f"{key}-read-cold", "MB/s", True, f"{label}: read every file after remount + drop"),
        Row(f"{key}-read-warm", "MB/s", True, f"{label}: the same again at once"),
        Row(f"{key}-zstd-compress", "MB/s", True, f"{label}: zstd -3 (per file / tar | -T2)"),
        Row(f"{key}-zstd-decompress", "MB/s", True, f"{label}: zstd -d to /dev/null"),
    ]  # fmt: skip


ROWS: list[Row] = [
    *dataset_rows("src", "source tree"),
    *dataset_rows("bin", "binary mix"),
    Row("rr-coldish", "IOPS", True, "4 KiB preads, the mount's kernel cache dropped"),
    Row("rr-cold", "IOPS", True, "the same offsets after remount + drop_caches"),
    Row("rr-warm", "IOPS", True, "the same offsets again at once"),
    Row("rw-lat-p50", "ms", False, "4 KiB pwrite + fsync into the 100 MiB file: median"),
    Row("rw-lat-mean", "ms", False, "the same, mean (relayouts included)"),
    Row("rw-written", "KiB/wr", False, "bytes written per write: loop device / write_bytes"),
    Row("rw-written-2nd", "KiB/wr", False, "the same over the second half of the writes"),
    Row("rw-syscalls", "KiB/wr", False, "bytes the writer's write calls passed (wchar)"),
    Row("rw-layer", "KiB/wr", False, "isofs compress: the layer's own lower_bytes_written"),
]
ROW_BY_NAME = {r.name: r for r in ROWS}

#: Columns in table order. "zstd" is the CLI file by file, "zstd-T2" one tar through -T2.
COLUMNS = ["native", "btrfs", "isofs-compress", "isofs-passthrough", "minimal", "zstd", "zstd-T2"]
#: (a, b): a's figure over b's. minimal/btrfs is the floor a pyfuse3 daemon stands on: shown
#: on the rows that measure speed (the minimal stores the bytes as they come).
RATIO_COLUMNS = [("isofs-compress", "btrfs"), ("isofs-compress", "isofs-passthrough"),
                 ("minimal", "btrfs")]
SPEED_ONLY_RATIOS = {("minimal", "btrfs")}
#: The issue's targets: row -> (contender compared with, lowest acceptable ratio).
TARGETS: dict[str, tuple[str, float]] = {
    **{f"{k}-ratio-{w}": ("btrfs", 1.0) for k, *_ in DATASETS for w in ("alloc", "apparent")},
    **{f"{k}-write": ("btrfs", 0.5) for k, *_ in DATASETS},
    **{f"{k}-read-cold": ("btrfs", 0.5) for k, *_ in DATASETS},
    **{f"{k}-read-warm": ("btrfs", 1.0) for k, *_ in DATASETS},
    **{r: ("isofs-passthrough", 0.7) for r in ("rr-coldish", "rr-cold", "rr-warm")},
}


# --------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------


@dataclass
class Dataset:
    key: str
    dirname: str
    label: str
    path: Path  # the scratch copy (native ext4): <work>/data/<dirname>
    files: int = 0
    bytes: int = 0
    digests: dict[str, bytes] = field(default_factory=dict, repr=False)


def regular_files(
    root: Path, wanted: Callable[[str], bool] = lambda name: True
) -> Iterator[tuple[Path, int]]:
    """(path, size) of the readable regular files under root whose names pass `wanted`,
    sorted, symlinks not followed (only those names are stat'ed: /usr/share is large)."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            if not wanted(name):
                continue
            path = Path(dirpath, name)
            with contextlib.suppress(OSError):
                st = path.lstat()
                if stat.S_ISREG(st.st_mode) and os.access(path, os.R_OK):
                    yield path, st.st_size


def starts_with(path: Path, magic: bytes) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


Candidate = tuple[Path, str, int]  # (source path, path in the dataset, size)


def pick(
    candidates: list[Candidate],
    budget: int,
    rng: random.Random,
    accept: Callable[[Path], bool] = lambda path: True,
) -> list[Candidate]:
    """A seeded sample adding up to about `budget` bytes; `accept` is asked only about
    the files that would be taken."""
    order = list(candidates)
    rng.shuffle(order)
    chosen, total = [], 0
    for item in order:
        if total + item[2] <= budget and accept(item[0]):
            chosen.append(item)
            total += item[2]
        if total >= budget * 0.98:
            break
    return sorted(chosen, key=lambda c: c[1])


def default_source_tree() -> Path:
    """The system's standard library (/usr/lib/python3.X, as Debian installs it) when
    there is one, else this interpreter's."""
    here = Path(sysconfig.get_paths()["stdlib"])
    system = Path(f"/usr/lib/python{sys.version_info[0]}.{sys.version_info[1]}")
    for candidate in (system, *sorted(Path("/usr/lib").glob("python3.*"), reverse=True), here):
        if (candidate / "os.py").is_file():
            return candidate
    return here


def source_tree_files(sizes: Sizes, root: Path) -> list[Candidate]:
    files = [(p, str(p.relative_to(root)), s) for p, s in regular_files(root)]
    if sizes.src_bytes is None:
        return files
    return pick(files, sizes.src_bytes, random.Random(SEED))


def binary_mix_files(sizes: Sizes) -> list[Candidate]:
    """ELF shared libraries and executables, then already-compressed files, of this machine."""
    libdir = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")
    elf: list[Candidate] = []
    for label, root in (("lib", libdir), ("bin", Path("/usr/bin"))):
        elf += [
            (p, f"{label}/{p.relative_to(root)}", s)
            for p, s in regular_files(root)
            if 0 < s <= sizes.max_file
        ]
    packed = [
        (p, f"share/{p.relative_to('/usr/share')}", s)
        for p, s in regular_files(Path("/usr/share"), lambda n: n.lower().endswith(PACKED))
        if 0 < s <= sizes.max_file
    ]
    rng = random.Random(SEED + 1)
    is_elf = functools.partial(starts_with, magic=ELF_MAGIC)
    return pick(elf, sizes.elf_bytes, rng, is_elf) + pick(packed, sizes.packed_bytes, rng)


def file_digest(path: Path) -> bytes:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.digest()


def digest_tree(root: Path) -> dict[str, bytes]:
    """relative path -> digest of every regular file (what a contender gives back)."""
    out = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            path = Path(dirpath, name)
            out[str(path.relative_to(root))] = file_digest(path)
    return out


def make_dataset(key: str, dirname: str, label: str, data: Path, files: list) -> Dataset:
    ds = Dataset(key, dirname, label, data / dirname)
    for src, rel, _ in files:
        dest = ds.path / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        os.chmod(dest, src.stat().st_mode & 0o755)  # no setuid copies
        ds.files += 1
        ds.bytes += dest.stat().st_size
        ds.digests[rel] = file_digest(dest)
    return ds


def read_tree(root: Path) -> int:
    """Read every regular file under root once (the timed reader); returns the bytes."""
    buf = bytearray(MiB)
    total = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


def tree_usage(root: Path) -> tuple[int, int]:
    """(apparent, allocated) bytes of the regular files under root."""
    apparent = allocated = 0
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            apparent += st.st_size
            allocated += st.st_blocks * 512
    return apparent, allocated


def repeat_to(corpus: bytes, size: int) -> bytes:
    """`size` bytes of the corpus, repeated as needed (compressible like the source)."""
    return (corpus * (size // len(corpus) + 1))[:size]


# --------------------------------------------------------------------------------------
# Tools and processes
# --------------------------------------------------------------------------------------


class Tools:
    """Finds a tool, installing its Debian package once (as root) when it is missing."""

    def __init__(self) -> None:
        self.tried: set[str] = set()
        self.updated = False

    def need(self, tool: str, package: str) -> str | None:
        path = shutil.which(tool)
        if path or package in self.tried:
            return path
        self.tried.add(package)
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            return None
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for attempt in ("install", "update"):
            if attempt == "update":  # a fresh machine may have no package lists yet
                if self.updated:
                    break
                self.updated = True
                subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
            print(f"  {tool} not found: apt-get install -y {package} ...", flush=True)
            r = subprocess.run(["apt-get", "install", "-y", "-q", package],
                               capture_output=True, text=True, env=env)  # fmt: skip
            if r.returncode == 0:
                break
            note(f"apt-get install {package} failed: {one_line(r.stderr or r.stdout)}")
        return shutil.which(tool)


def run(argv: list[str], timeout: float = 600, **kwargs: Any) -> subprocess.CompletedProcess:
    """A command that must succeed; its last output line is the error otherwise."""
    kwargs.setdefault("stdout", subprocess.PIPE)
    r = subprocess.run(argv, stderr=subprocess.PIPE, text=True, timeout=timeout, **kwargs)
    if r.returncode != 0:
        out = r.stderr or (r.stdout if isinstance(r.stdout, str) else "")
        raise suite.MountError(f"{' '.join(argv[:3])}: exit {r.returncode}: {one_line(out)}")
    return r


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def io_written(pid: int) -> dict[str, int]:
    """A process's write counters in /proc/PID/io, all its threads together: "storage", the
    bytes it caused to be written to storage (`write_bytes`: whole page-cache folios, so a
    small write into a large folio counts the folio), and "syscalls", the bytes its write
    calls passed (`wchar`: for a daemon its native writes and its replies to the kernel)."""
    fields = {"write_bytes": "storage", "wchar": "syscalls"}
    out = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in fields:
                    out[fields[key]] = int(value)
    except (OSError, ValueError):
        return {}
    return out


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------


class Contender:
    """One place the data is written to and read from. setup() per repetition, teardown()
    idempotent and safe at any point (also after a failure or a Ctrl-C)."""

    name = "?"

    def __init__(self, work: Path) -> None:
        self.work = work
        self.data_dir: Path | None = None

    def check(self, tools: Tools) -> str | None:
        """None if usable, else why not (the contender is skipped)."""
        return None

    def version(self) -> str:
        return ""

    def setup(self, rep_dir: Path, rep: int) -> None:
        raise NotImplementedError

    def remount(self) -> None:
        """Drop whatever the contender caches itself (the caller drops the kernel's)."""

    def teardown(self) -> None:
        pass

    def ratio(self, rel: str, logical: int) -> tuple[float, float]:
        """(logical / allocated, logical / apparent) for the dataset at data_dir/rel."""
        raise NotImplementedError

    def written(self) -> dict[str, int]:
        """Counters of bytes written to storage, read before and after the random writes."""
        return {}

    def check_native(self, rel: str, digest: bytes) -> bool | None:
        """An extra check of a file through its native bytes (None: not applicable)."""
        return None


def usage_ratio(root: Path, logical: int) -> tuple[float, float]:
    apparent, allocated = tree_usage(root)
    return logical / max(allocated, 1), logical / max(apparent, 1)


class Native(Contender):
    """The scratch directory on the host's filesystem: the reference for speeds."""

    name = "native"

    def setup(self, rep_dir: Path, rep: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="native-", dir=rep_dir))

    def ratio(self, rel: str, logical: int) -> tuple[float, float]:
        assert self.data_dir is not None
        return usage_ratio(self.data_dir / rel, logical)

    def written(self) -> dict[str, int]:
        """This process writes the file itself: its own counters."""
        return io_written(os.getpid())


class Btrfs(Contender):
    """btrfs on a loop device over a sparse image file, mounted compress=zstd:3; a fresh
    image, loop device and filesystem per repetition."""

    name = "btrfs"
    options = f"compress=zstd:{ZSTD_LEVEL}"

    def __init__(self, work: Path, image_size: int) -> None:
        super().__init__(work)
        self.image_size = image_size
        self.image: Path | None = None
        self.loop: str | None = None
        self.mnt = work / "mnt-btrfs"

    def check(self, tools: Tools) -> str | None:
        if os.geteuid() != 0:
            return "needs root (losetup, mount)"
        for tool, package in (("mkfs.btrfs", "btrfs-progs"), ("compsize", "btrfs-compsize"),
                              ("losetup", "mount")):  # fmt: skip
            if not tools.need(tool, package):
                return f"{tool} not installed ({package})"
        return None

    def version(self) -> str:
        return suite.tool_version(["mkfs.btrfs", "--version"]) + f", mount -o {self.options}"

    def setup(self, rep_dir: Path, rep: int) -> None:
        # Directly in the work dir (not a repetition's dir): cleanup finds every image there.
        self.image = self.work / f"btrfs-{rep}.img"
        with open(self.image, "wb") as f:
            f.truncate(self.image_size)
        self.loop = run(["losetup", "--find", "--show", str(self.image)]).stdout.strip()
        run(["mkfs.btrfs", "-q", "-f", self.loop])
        self.mnt.mkdir(exist_ok=True)
        self._mount()
        self.data_dir = self.mnt

    def _mount(self) -> None:
        assert self.loop is not None
        run(["mount", "-t", "btrfs", "-o", self.options, self.loop, str(self.mnt)])

    def remount(self) -> None:
        run(["umount", str(self.mnt)])
        self._mount()

    def teardown(self) -> None:
        if suite.is_mounted(self.mnt):
            r = subprocess.run(["umount", str(self.mnt)], capture_output=True)
            if r.returncode != 0:
                subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None
        if self.image is not None:
            self.image.unlink(missing_ok=True)
            self.image = None
        self.data_dir = None

    def ratio(self, rel: str, logical: int) -> tuple[float, float]:
        """compsize's disk usage (compressed extents in whole 4 KiB sectors, inline extents
        at their size) for both rows: btrfs has no other 'stored size'."""
        assert self.data_dir is not None
        out = run(["compsize", "-b", str(self.data_dir / rel)]).stdout
        for line in out.splitlines():
            parts = line.split()
            if parts and parts[0] == "TOTAL":
                disk = int(parts[2])
                return logical / disk, logical / disk
        raise suite.MountError(f"compsize: no TOTAL line in {one_line(out)!r}")

    def written(self) -> dict[str, int]:
        """Sectors the loop device wrote (data, metadata, the fsync log tree), in bytes."""
        if not self.loop:
            return {}
        fields = Path(f"/sys/block/{os.path.basename(self.loop)}/stat").read_text().split()
        return {"device": int(fields[6]) * 512}


class IsofsCompressCli(suite.IsofsCli):
    name = "isofs-compress"
    init_args = ["--provider", "compress"]
    mount_args = ["--default-view", "target", "--no-exec"]


class IsofsPassthroughCli(suite.IsofsCli):
    name = "isofs-passthrough"
    init_args = ["--provider", "passthrough"]
    mount_args = ["--default-view", "target", "--no-exec"]


class Isofs(Contender):
    """`isofs init SRC --provider P`, then a one-view target mount (bench/run.py's IsofsCli
    does the CLI calls, and stops the daemon by PID if an unmount does not)."""

    def __init__(self, work: Path, cli_class: type) -> None:
        super().__init__(work)
        self.cli = cli_class(work)
        self.name = self.cli.name
        self.native_dir: Path | None = None

    def check(self, tools: Tools) -> str | None:
        if not os.path.exists("/dev/fuse"):
            return "/dev/fuse is missing"
        if not tools.need("fusermount3", "fuse3"):
            return "fusermount3 not installed (fuse3)"
        return None

    def version(self) -> str:
        return self.cli.version()

    def setup(self, rep_dir: Path, rep: int) -> None:
        src = Path(tempfile.mkdtemp(prefix=f"{self.name}-src-", dir=rep_dir))
        mnt = self.work / f"mnt-{self.name}"
        mnt.mkdir(exist_ok=True)
        self.cli.prepare(src)
        self.cli.mount(src, mnt)
        self.native_dir, self.data_dir = src, mnt

    def remount(self) -> None:
        self.cli.remount()

    def teardown(self) -> None:
        self.cli.unmount()

    def ratio(self, rel: str, logical: int) -> tuple[float, float]:
        assert self.native_dir is not None
        return usage_ratio(self.native_dir / rel, logical)

    def layer_stats(self) -> dict[str, Any]:
        layers = self.cli.status().get("layers") or [{}]
        return layers[0]

    def written(self) -> dict[str, int]:
        pids = self.cli.daemon_pids
        out = io_written(pids[0]) if pids else {}
        layer = self.layer_stats().get("lower_bytes_written")
        if layer is not None:
            out["layer"] = int(layer)
        return out

    def check_native(self, rel: str, digest: bytes) -> bool | None:
        """The native file is a standard zstd stream: `zstd -d` gives the target's bytes."""
        if self.name != "isofs-compress" or self.native_dir is None:
            return None
        h = hashlib.blake2b(digest_size=16)
        with subprocess.Popen(["zstd", "-d", "-q", "-c", str(self.native_dir / rel)],
                              stdout=subprocess.PIPE) as p:  # fmt: skip
            assert p.stdout is not None
            while chunk := p.stdout.read(MiB):
                h.update(chunk)
        return p.returncode == 0 and h.digest() == digest


class MinimalPassthrough(Isofs):
    """The minimal pyfuse3 passthrough (bench/run.py's, the fair baseline `isofs bench` uses):
    what any pyfuse3 daemon pays per request, the floor under isofs' rows against btrfs."""

    def layer_stats(self) -> dict[str, Any]:
        return {}

    def written(self) -> dict[str, int]:
        proc = self.cli.proc
        return io_written(proc.pid) if proc is not None else {}


class ZstdCli(Contender):
    """The zstd command line at the same level: file by file (`zstd -3 -r`), and one tar
    through `zstd -3 -T2`. It fills the "zstd" and "zstd-T2" columns."""

    name = "zstd"

    def check(self, tools: Tools) -> str | None:
        return None if tools.need("zstd", "zstd") else "zstd not installed"

    def version(self) -> str:
        return suite.tool_version(["zstd", "--version"])

    def setup(self, rep_dir: Path, rep: int) -> None:
        self.data_dir = Path(tempfile.mkdtemp(prefix="zstd-", dir=rep_dir))


# --------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    sizes: Sizes
    caches: Any
    work: Path
    datasets: list[Dataset]
    corpus: bytes = field(repr=False)
    rand_read_content: bytes = field(repr=False)
    rand_write_content: bytes = field(repr=False)
    #: The phases this run does (--phases).
    phases_run: tuple[str, ...] = PHASES
    #: (contender, what) -> read back equal to the source
    verified: dict[str, dict[str, bool]] = field(default_factory=dict)
    details: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    #: Seconds per phase of the contender running now (printed with its results).
    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.phases[label] = self.phases.get(label, 0.0) + time.monotonic() - t0

    def verify(self, contender: str, what: str, ok: bool) -> None:
        self.verified.setdefault(contender, {})
        # Over repetitions: equal every time.
        self.verified[contender][what] = self.verified[contender].get(what, True) and ok
        if not ok:
            print(f"  VERIFY FAILED: {contender}: {what} differs from the source", flush=True)


class Record(Protocol):
    def __call__(self, column: str, row: str, value: float, disturbed: bool = False) -> None:
        """One sample; `disturbed`: another process dropped the page cache meanwhile."""


def page_cache_drops() -> int:
    """How often anyone wrote to drop_caches since boot (/proc/vmstat drop_pagecache): on
    a shared machine another process's drop turns a 'warm' row cold."""
    with contextlib.suppress(OSError, ValueError), open("/proc/vmstat") as f:
        for line in f:
            if line.startswith("drop_pagecache "):
                return int(line.split()[1])
    return 0


def prefault(ctx: Ctx) -> None:
    """Touch the memory the next timed write will use (see bench/README.md, pre-fault)."""
    if not ctx.sizes.prefault:
        return
    scratch = ctx.work / "prefault.tmp"
    try:
        block = b"\xa5" * MiB
        with open(scratch, "wb") as f:
            for _ in range(ctx.sizes.prefault // MiB):
                f.write(block)
    finally:
        scratch.unlink(missing_ok=True)


def write_whole(path: Path, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(content)
        for start in range(0, len(view), MiB):
            chunk = view[start : start + MiB]
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def digest_of(data: bytes | bytearray) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


def run_filesystem(c: Contender, ctx: Ctx, record: Record) -> None:
    """Every row on one mounted filesystem contender."""
    for ds in ctx.datasets:
        with ctx.phase(ds.key):
            dataset_rows_on(c, ds, ctx, record)
    if "rand-read" in ctx.phases_run:
        with ctx.phase("rand-read"):
            random_reads(c, ctx, record)
    if "rand-write" in ctx.phases_run:
        with ctx.phase("rand-write"):
            random_writes(c, ctx, record)


def dataset_rows_on(c: Contender, ds: Dataset, ctx: Ctx, record: Record) -> None:
    """Write, ratio, cold and warm read of one dataset on one contender."""
    assert c.data_dir is not None
    name, tree = c.name, c.data_dir / ds.dirname
    read_tree(ds.path)  # the source warm: the copy measures the destination
    prefault(ctx)
    os.sync()

    def copy() -> None:
        run(["cp", "-a", str(ds.path), str(c.data_dir)])
        os.sync()

    record(name, f"{ds.key}-write", ds.bytes / timed(copy) / MB)
    alloc, apparent = c.ratio(ds.dirname, ds.bytes)
    record(name, f"{ds.key}-ratio-alloc", alloc)
    record(name, f"{ds.key}-ratio-apparent", apparent)
    c.remount()
    ctx.caches.drop()
    drops = page_cache_drops()
    got: list[int] = []
    dt = timed(lambda: got.append(read_tree(tree)))
    record(name, f"{ds.key}-read-cold", ds.bytes / dt / MB)
    dt = timed(lambda: got.append(read_tree(tree)))
    record(name, f"{ds.key}-read-warm", ds.bytes / dt / MB, page_cache_drops() != drops)
    same = got == [ds.bytes, ds.bytes] and digest_tree(tree) == ds.digests
    ctx.verify(name, ds.key, same)


def random_reads(c: Contender, ctx: Ctx, record: Record) -> None:
    assert c.data_dir is not None
    s = ctx.sizes
    path = c.data_dir / "rand-read.bin"
    write_whole(path, ctx.rand_read_content)
    rng = random.Random(SEED + 2)
    offsets = [rng.randrange(s.rand_read_file // PAGE) * PAGE for _ in range(s.rand_reads)]

    def preads() -> float:
        fd = os.open(path, os.O_RDONLY)
        try:
            pread = os.pread
            t0 = time.perf_counter()
            for off in offsets:
                pread(fd, PAGE, off)
            return s.rand_reads / (time.perf_counter() - t0)
        finally:
            os.close(fd)

    ctx.caches.drop()  # "cold-ish": the kernel's caches only; a daemon keeps its own
    record(c.name, "rr-coldish", preads())
    c.remount()
    ctx.caches.drop()
    drops = page_cache_drops()
    record(c.name, "rr-cold", preads())
    record(c.name, "rr-warm", preads(), page_cache_drops() != drops)
    ctx.verify(c.name, "rand-read", file_digest(path) == digest_of(ctx.rand_read_content))
    path.unlink()
    os.sync()


def random_writes(c: Contender, ctx: Ctx, record: Record) -> None:
    """4 KiB pwrite + fsync at random aligned offsets of a compressible file; payloads are
    other 4 KiB of the same corpus (a rewrite of text with text)."""
    assert c.data_dir is not None
    s = ctx.sizes
    path = c.data_dir / "rand-write.bin"
    write_whole(path, ctx.rand_write_content)
    # Dropped: the kernel would otherwise still hold the file in the large folios of its
    # sequential write, and a 4 KiB write would dirty (and write back) a whole 1 MiB folio.
    ctx.caches.drop()
    model = bytearray(ctx.rand_write_content)
    rng = random.Random(SEED + 3)
    plan = [
        (rng.randrange(s.rand_write_file // PAGE) * PAGE, rng.randrange(len(ctx.corpus) - PAGE))
        for _ in range(s.rand_writes)
    ]
    half = s.rand_writes // 2
    layer_before = c.layer_stats() if isinstance(c, Isofs) else {}
    before, middle = c.written(), {}
    latencies = []
    fd = os.open(path, os.O_WRONLY)
    try:
        for i, (off, src) in enumerate(plan):
            if i == half:
                middle = c.written()
            data = ctx.corpus[src : src + PAGE]
            t0 = time.perf_counter()
            os.pwrite(fd, data, off)
            os.fsync(fd)
            latencies.append(time.perf_counter() - t0)
            model[off : off + PAGE] = data
    finally:
        os.close(fd)
    after = c.written()
    record(c.name, "rw-lat-p50", statistics.median(latencies) * 1e3)
    record(c.name, "rw-lat-mean", statistics.fmean(latencies) * 1e3)
    counters = {"device": "rw-written", "storage": "rw-written", "syscalls": "rw-syscalls",
                "layer": "rw-layer"}  # fmt: skip
    for counter, row in counters.items():
        if counter in after and counter in before:
            record(c.name, row, (after[counter] - before[counter]) / len(plan) / 1024)
            if row == "rw-written" and counter in middle:
                per = (after[counter] - middle[counter]) / (len(plan) - half) / 1024
                record(c.name, "rw-written-2nd", per)
    if isinstance(c, Isofs):
        layer_after = c.layer_stats()
        keys = ("in_place_rewrites", "tail_rewrites", "tail_bytes", "local_relayouts",
                "local_bytes", "lower_bytes_written")
        delta = {k: layer_after.get(k, 0) - layer_before.get(k, 0) for k in keys
                 if k in layer_after}  # fmt: skip
        if delta:
            ctx.details.setdefault(c.name, []).append({"random writes": delta})
    expected = digest_of(model)
    c.remount()
    ctx.caches.drop()
    ctx.verify(c.name, "rand-write", file_digest(path) == expected)
    native_ok = c.check_native(path.name, expected)
    if native_ok is not None:
        ctx.verify(c.name, "rand-write zstd -d", native_ok)
    path.unlink()
    os.sync()


def run_zstd(c: ZstdCli, ctx: Ctx, record: Record) -> None:
    """zstd -3 file by file (-r, --output-dir-mirror) and one tar through -T2."""
    assert c.data_dir is not None
    for ds in ctx.datasets:
        out = Path(tempfile.mkdtemp(prefix=f"{ds.key}-", dir=c.data_dir))
        files = out / "files"
        read_tree(ds.path)
        cmd = ["zstd", f"-{ZSTD_LEVEL}", "-q", "-r", "--output-dir-mirror", str(files), "."]
        dt = timed(lambda cmd=cmd, ds=ds: run(cmd, cwd=ds.path))
        record("zstd", f"{ds.key}-zstd-compress", ds.bytes / dt / MB)
        alloc, apparent = usage_ratio(files, ds.bytes)
        record("zstd", f"{ds.key}-ratio-alloc", alloc)
        record("zstd", f"{ds.key}-ratio-apparent", apparent)
        cmd = ["zstd", "-d", "-q", "-c", "-r", "."]
        dt = timed(lambda cmd=cmd, files=files: run(cmd, cwd=files, stdout=subprocess.DEVNULL))
        record("zstd", f"{ds.key}-zstd-decompress", ds.bytes / dt / MB)
        back = out / "back"
        run(["zstd", "-d", "-q", "-r", "--output-dir-mirror", str(back), "."], cwd=files)
        ctx.verify("zstd", ds.key, digest_tree(back) == ds.digests)

        tarball = out / f"{ds.dirname}.tar.zst"
        tar = ["tar", "-cf", "-", "-C", str(ds.path.parent), ds.dirname]
        zstd = ["zstd", f"-{ZSTD_LEVEL}", "-T2", "-q", "-c"]
        dt = timed(lambda tar=tar, zstd=zstd, tarball=tarball: pipe(tar, zstd, stdout=tarball))
        record("zstd-T2", f"{ds.key}-zstd-compress", ds.bytes / dt / MB)
        st = tarball.stat()
        record("zstd-T2", f"{ds.key}-ratio-alloc", ds.bytes / max(st.st_blocks * 512, 1))
        record("zstd-T2", f"{ds.key}-ratio-apparent", ds.bytes / max(st.st_size, 1))
        cmd = ["zstd", "-d", "-q", "-c", str(tarball)]
        dt = timed(lambda cmd=cmd: run(cmd, stdout=subprocess.DEVNULL))
        record("zstd-T2", f"{ds.key}-zstd-decompress", ds.bytes / dt / MB)
        untar = out / "untar"
        untar.mkdir()
        pipe(["zstd", "-d", "-q", "-c", str(tarball)], ["tar", "-xf", "-", "-C", str(untar)])
        ctx.verify("zstd-T2", ds.key, digest_tree(untar / ds.dirname) == ds.digests)


def pipe(first: list[str], second: list[str], stdout: Path | None = None) -> None:
    """`first | second [> stdout]`, both must succeed."""
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(open(stdout, "wb")) if stdout else subprocess.DEVNULL
        p1 = subprocess.Popen(first, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        p2 = subprocess.Popen(second, stdin=p1.stdout, stdout=out, stderr=subprocess.PIPE)
        assert p1.stdout is not None
        p1.stdout.close()
        _, err2 = p2.communicate(timeout=600)
        _, err1 = p1.communicate(timeout=600)
    for argv, p, err in ((first, p1, err1), (second, p2, err2)):
        if p.returncode != 0:
            text = err.decode(errors="replace")
            raise suite.MountError(f"{argv[0]}: exit {p.returncode}: {one_line(text)}")


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def clean_samples(values: list[float], disturbed: list[int]) -> list[float]:
    """The samples no other process disturbed, or all of them if none is left."""
    kept = [v for i, v in enumerate(values) if i not in disturbed]
    return kept or values


def render_table(medians: dict[str, dict[str, float]]) -> str:
    names = [n for n in COLUMNS if medians.get(n)]
    pairs = [(a, b) for a, b in RATIO_COLUMNS if a in names and b in names]
    short = {"isofs-compress": "compress", "isofs-passthrough": "passthr"}
    header = ["row", "unit", *names, *(f"{short.get(a, a)}/{short.get(b, b)}" for a, b in pairs),
              "target", "met"]  # fmt: skip
    lines = []
    for row in ROWS:
        values = [medians.get(n, {}).get(row.name) for n in names]
        if all(v is None for v in values):
            continue
        cell = {n: medians.get(n, {}).get(row.name) for n in COLUMNS}
        ratios = [None if (a, b) in SPEED_ONLY_RATIOS and row.unit == "x"
                  else suite.speed_ratio(row, cell[a], cell[b]) for a, b in pairs]
        target, met = "", ""
        if row.name in TARGETS:
            base, threshold = TARGETS[row.name]
            target = f">= {threshold:.1f}x {short.get(base, base)}"
            got = suite.speed_ratio(
                row, medians.get("isofs-compress", {}).get(row.name),
                medians.get(base, {}).get(row.name),
            )  # fmt: skip
            met = "-" if got is None else ("yes" if got >= threshold else "NO")
        lines.append([row.name, row.unit, *map(fmt, values),
                      *(f"{r:.2f}x" if r else "-" for r in ratios), target, met])  # fmt: skip
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines, strict=True)]
    k = 2 + len(names)

    def line(cells: list[str]) -> str:
        out = [f"{cells[0]:<{widths[0]}}", f"{cells[1]:<{widths[1]}}"]
        out += [f"{c:>{w}}" for c, w in zip(cells[2:k], widths[2:k], strict=True)]
        out.append("|")
        out += [f"{c:>{w}}" for c, w in zip(cells[k:-2], widths[k:-2], strict=True)]
        out += [f"{cells[-2]:<{widths[-2]}}", f"{cells[-1]:<{widths[-1]}}"]
        return "  ".join(out)

    sep = "-" * len(line(header))
    return "\n".join([line(header), sep, *(line(cells) for cells in lines)])


LEGEND = """\
Columns: medians, in the row's unit. Ratio columns a/b: higher is better for a in every
row (speeds and compression ratios: a/b; ms and KiB/write: b/a). "met" compares
isofs-compress with the target's contender. btrfs's two ratio rows both show compsize's
disk usage; isofs's are its native files' st_blocks*512 and st_size. rw-written: btrfs =
sectors its loop device wrote; FUSE daemons = the daemon's /proc/PID/io write_bytes; native =
this process's (both count whole kernel folios dirtied: 4 KiB or more per write, a whole
large folio when the write lands in one). rw-syscalls: the bytes the writer's own write
calls passed (wchar; a daemon's include its replies to the kernel).
zstd = the CLI file by file; zstd-T2 = one tar piped through zstd -T2 (compress row:
tar + zstd; decompress row: zstd -d to /dev/null)."""


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


CONTENDER_NAMES = ["native", "btrfs", "isofs-compress", "isofs-passthrough", "minimal", "zstd"]


def make_contender(name: str, work: Path, sizes: Sizes) -> Contender:
    if name == "native":
        return Native(work)
    if name == "btrfs":
        return Btrfs(work, sizes.btrfs_image)
    if name == "isofs-compress":
        return Isofs(work, IsofsCompressCli)
    if name == "isofs-passthrough":
        return Isofs(work, IsofsPassthroughCli)
    if name == "minimal":
        return MinimalPassthrough(work, suite.Minimal)
    return ZstdCli(work)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="isofs compress vs btrfs compress=zstd:3 vs the zstd CLI, on the same data.",
        epilog="rows: " + ", ".join(ROW_BY_NAME),
    )
    p.add_argument(
        "--quick", action="store_true", help="small data (a few MB), 1 repetition: a check run"
    )
    p.add_argument("--repeat", type=int, metavar="N", help="repetitions (default 3; quick: 1)")
    p.add_argument(
        "--contenders",
        metavar="LIST",
        default=",".join(CONTENDER_NAMES),
        help=f"comma-separated subset of {','.join(CONTENDER_NAMES)} (default: all)",
    )
    p.add_argument(
        "--phases",
        metavar="LIST",
        default=",".join(PHASES),
        help=f"comma-separated subset of {','.join(PHASES)}: the rows to run (default: all)",
    )
    p.add_argument("--json", metavar="FILE", help="save environment, samples and medians here")
    p.add_argument("--workdir", metavar="DIR",
                   help="make the scratch dir inside DIR (default: the current directory)")
    p.add_argument("--source-tree", metavar="DIR", type=Path,
                   help="the source tree to use (default: Python's standard library)")
    args = p.parse_args(argv)  # fmt: skip
    args.names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in CONTENDER_NAMES]
    if unknown or not args.names:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDER_NAMES)}")
    if len(set(args.names)) != len(args.names):
        p.error("a contender is listed twice")
    args.phases = tuple(n.strip() for n in args.phases.split(",") if n.strip())
    unknown = [n for n in args.phases if n not in PHASES]
    if unknown or not args.phases:
        p.error(f"unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if args.source_tree is None:
        args.source_tree = default_source_tree()
    if not args.source_tree.is_dir():
        p.error(f"--source-tree {args.source_tree}: not a directory")
    if args.workdir and not Path(args.workdir).is_dir():
        p.error(f"--workdir {args.workdir}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    base = Path(args.workdir).resolve() if args.workdir else Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="isofs-compress-bench-", dir=base))

    def _raise(signum: int, frame: object) -> None:  # SIGTERM/SIGHUP: Ctrl-C's clean-up
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    live: list[Contender] = []
    try:
        return _run(args, sizes, work, live)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr)
        return 130
    except Exception as exc:
        print(f"\nerror: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup(work, live)


def cleanup(work: Path, live: list[Contender]) -> None:
    """Unmount every mount, detach every loop device, remove the scratch dir."""
    with contextlib.suppress(KeyboardInterrupt):
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second one must wait
            signal.signal(sig, signal.SIG_IGN)
        for c in live:
            try:
                c.teardown()
            except Exception as exc:
                print(f"warning: tearing down {c.name}: {exc}", file=sys.stderr)
        for mountpoint, fstype, _ in suite.mounts():  # whatever is left in our scratch dir
            if not mountpoint.startswith(str(work).rstrip("/") + "/"):
                continue
            if fstype.startswith("fuse"):
                subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
            else:
                subprocess.run(["umount", "-l", mountpoint], capture_output=True)
        for image in work.glob("btrfs-*.img"):
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                r = subprocess.run(["losetup", "-j", str(image)], capture_output=True, text=True)
                for line in r.stdout.splitlines():
                    subprocess.run(["losetup", "-d", line.split(":", 1)[0]], capture_output=True)
        left = suite.mounts_under(work)
        if left:
            print(f"warning: still mounted, scratch dir kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _run(args: argparse.Namespace, sizes: Sizes, work: Path, live: list[Contender]) -> int:
    print("isofs compression benchmark", flush=True)
    tools = Tools()
    for tool, package in (("cp", "coreutils"), ("tar", "tar"), ("zstd", "zstd")):
        if not tools.need(tool, package):
            raise suite.MountError(f"{tool} is needed ({package})")
    contenders: list[Contender] = []
    for name in args.names:
        c = make_contender(name, work, sizes)
        why = c.check(tools)
        if why:
            print(f"  skip {name}: {why}", flush=True)
            continue
        contenders.append(c)
        live.append(c)

    env = suite.environment(work, contenders)
    if suite.set_topdir_flag(work):
        env["workdir fs"] += ", scratch dir chattr +T"
    data = work / "data"
    data.mkdir()
    datasets = [
        make_dataset("src", "src-tree", "source tree", data,
                     source_tree_files(sizes, args.source_tree)),
    ]  # fmt: skip
    if "bin" in args.phases:
        datasets.append(make_dataset("bin", "bin-mix", "binary mix", data,
                                     binary_mix_files(sizes)))  # fmt: skip
    corpus = b"".join((datasets[0].path / rel).read_bytes() for rel in sorted(datasets[0].digests))
    if len(corpus) < PAGE * 2:
        raise suite.MountError(f"the source tree {args.source_tree} holds too little data")
    env["source tree"] = (f"{args.source_tree}: {datasets[0].files:,} files, "
                          f"{datasets[0].bytes / MB:.1f} MB")  # fmt: skip
    if "bin" in args.phases:
        bin_parts: dict[str, int] = {}
        for rel in datasets[1].digests:
            part = rel.split("/", 1)[0]
            bin_parts[part] = bin_parts.get(part, 0) + (datasets[1].path / rel).stat().st_size
        env["binary mix"] = (
            f"{datasets[1].files:,} files, {datasets[1].bytes / MB:.1f} MB ("
            + ", ".join(f"{k} {v / MB:.1f} MB" for k, v in sorted(bin_parts.items())) + ")"
        )
    if args.phases != PHASES:
        env["phases"] = ", ".join(args.phases)
    env["big files"] = (
        f"random reads {sizes.rand_reads:,} x 4 KiB in {sizes.rand_read_file // MiB} MiB, "
        f"random writes {sizes.rand_writes} x 4 KiB + fsync in {sizes.rand_write_file // MiB} "
        f"MiB (the source tree's bytes, repeated), repeat {args.repeat}"
    )
    width = max(map(len, env))
    for k, v in env.items():
        print(f"  {k:<{width}}  {v}", flush=True)

    ctx = Ctx(
        sizes, suite.Caches(), work, [d for d in datasets if d.key in args.phases], corpus,
        repeat_to(corpus, sizes.rand_read_file) if "rand-read" in args.phases else b"",
        repeat_to(corpus, sizes.rand_write_file) if "rand-write" in args.phases else b"",
        args.phases,
    )  # fmt: skip
    samples: dict[str, dict[str, list[float]]] = {}
    #: column -> row -> indexes of samples taken while someone else dropped the page cache
    disturbances: dict[str, dict[str, list[int]]] = {}
    errors: dict[str, str] = {}
    orders: list[list[str]] = []
    active = list(contenders)
    t_start = time.monotonic()

    def record(column: str, row: str, value: float, disturbed: bool = False) -> None:
        values = samples.setdefault(column, {}).setdefault(row, [])
        if disturbed:
            disturbances.setdefault(column, {}).setdefault(row, []).append(len(values))
            note(f"{column} {row}: another process dropped the page cache during the row")
        values.append(value)

    for rep in range(args.repeat):
        k = rep % len(active) if active else 0
        order = active[k:] + active[:k]
        orders.append([c.name for c in order])
        print(f"\nrepetition {rep + 1}/{args.repeat}: {', '.join(orders[-1])}", flush=True)
        rep_dir = Path(tempfile.mkdtemp(prefix=f"rep{rep}-", dir=work))
        for c in order:
            t0 = time.monotonic()
            before = {col: {r: len(v) for r, v in rows.items()} for col, rows in samples.items()}
            ctx.phases = {}
            try:
                with ctx.phase("setup"):
                    c.setup(rep_dir, rep)
                if isinstance(c, ZstdCli):
                    run_zstd(c, ctx, record)
                else:
                    run_filesystem(c, ctx, record)
            except (suite.MountError, OSError, subprocess.SubprocessError) as exc:
                errors[c.name] = one_line(str(exc))
                print(f"  {c.name:<17} failed: {errors[c.name]}", flush=True)
                active.remove(c)
            finally:
                c.teardown()
            got = [
                f"{row} {fmt(vals[-1])}"
                for col, rows in samples.items()
                if col == c.name or (c.name == "zstd" and col == "zstd-T2")
                for row, vals in rows.items()
                if len(vals) > before.get(col, {}).get(row, 0)
            ]
            if got:
                spent = ", ".join(f"{k} {v:.1f}s" for k, v in ctx.phases.items())
                print(f"  {c.name:<17} {time.monotonic() - t0:5.1f}s ({spent})\n"
                      f"      {', '.join(got)}", flush=True)  # fmt: skip
        if not active:
            break

    env["load after"] = suite.describe_load()
    medians = {
        col: {r: statistics.median(clean_samples(v, disturbances.get(col, {}).get(r, [])))
              for r, v in rows.items()}
        for col, rows in samples.items()
    }  # fmt: skip
    print(f"\nresults: median of {args.repeat} repetition(s), "
          f"{time.monotonic() - t_start:.0f}s.\n{LEGEND}\n")  # fmt: skip
    print(render_table(medians))
    names = [n for n in COLUMNS if n in samples]
    if args.repeat > 1 and names:
        print()
        print(suite.render_spread([r for r in ROWS if any(r.name in samples[n] for n in names)],
                                  names, samples))  # fmt: skip
    for name, entries in ctx.details.items():
        for i, entry in enumerate(entries, 1):
            print(f"  {name}, repetition {i}: {json.dumps(entry)}")
    left_out = [f"{col} {row} x{len(ix)}" for col, rows in disturbances.items()
                for row, ix in rows.items()]  # fmt: skip
    if left_out:
        print("samples taken while another process dropped the page cache, left out of the "
              f"medians where others remain: {', '.join(left_out)}")
    failed = [f"{c}: {w}" for c, checks in ctx.verified.items() for w, ok in checks.items()
              if not ok]  # fmt: skip
    checked = sum(len(v) for v in ctx.verified.values())
    print(f"read back equal to the source: {checked - len(failed)} of {checked} checks"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    for name, msg in errors.items():
        print(f"  {name}: {msg}")
    print(f"load before the run: {env['load before']}")
    print(f"load after the run:  {env['load after']}")
    if args.json:
        doc = {
            "environment": env,
            "sizes": sizes.__dict__,
            "repeat": args.repeat,
            "datasets": {
                d.key: {"label": d.label, "files": d.files, "bytes": d.bytes} for d in datasets
            },
            "rows": [r.__dict__ for r in ROWS],
            "columns": names,
            "targets": {r: {"versus": b, "at_least": t} for r, (b, t) in TARGETS.items()},
            "samples": samples,
            "medians": medians,
            "disturbed": disturbances,
            "verified": ctx.verified,
            "details": ctx.details,
            "orders": orders,
            "errors": errors,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"raw samples saved to {args.json}")
    return 1 if failed or errors else 0


if __name__ == "__main__":
    sys.exit(main())
