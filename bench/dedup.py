#!/usr/bin/env python3
"""The dedup benchmark: isofs's dedup provider against `borg create`, in one run.

A data set with known duplication (several versions of a source tree with small edits
between them, plus a random blob and a copy of it shifted by a few bytes) is ingested by
`borg create` and copied (`cp -a` + `sync`) into one-view target mounts of a dedup source
with the embedded store, one with the S3 store on a local Ceph RADOS Gateway, and an isofs
passthrough source; the dedup mounts are then read back (random 4 KiB reads, sequential
cold reads) against the passthrough mount, and every file read back is checked against the
input. Contenders are rotated between repetitions and medians reported. It is a benchmark,
not a test: nothing here asserts on timings.

    python bench/dedup.py [--quick] [--repeat N] [--contenders LIST] [--tree DIR]
                          [--json FILE] [--workdir DIR]

See bench/README.md ("bench/dedup.py") for what each row counts.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
for _path in (REPO_ROOT, BENCH_DIR, REPO_ROOT / "tests"):  # isofs, run.py, s3engine.py
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import run as suite  # noqa: E402  (bench/run.py: mounts, caches, PIDs, tool install)

MiB = 1 << 20
MB = 1_000_000  # throughputs are in MB/s (10^6 bytes), as the issue gives borg's
SEED = 20240611  # fixed: the same data set and offsets on every run and every machine
DEFAULT_TREE = Path("/usr/lib/python3.11")
BUCKET = "isofs-bench"

#: borg with isofs's chunk sizes: buzhash, min 2^14 = 16 KiB, max 2^18 = 256 KiB, mask 16
#: bits (64 KiB average), window 4095, as isofs's 16/64/256 KiB FastCDC default. borg 1.2
#: requires min <= mask <= max, so `19,23,16,4095` is refused; its real default is below.
BORG_CHUNKER_64K = "buzhash,14,18,16,4095"
BORG_CHUNKER_DEFAULT = "buzhash,19,23,21,4095"  # borg 1.2's default: 2 MiB average
BORG_COMPRESSION = "zstd,3"  # the dedup store's default zstd level is 3 too


class BenchError(Exception):
    """A failure of the run as a whole (bad input, a missing tool): one line, exit 1."""


def fail(message: str, code: int = 2) -> NoReturn:
    print(f"isofs: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


# --------------------------------------------------------------------------------------
# Scale and rows
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scale:
    tree_files: int | None  # regular files taken from the tree (None: all of them)
    versions: int
    edit_share: float  # share of regular files edited between two versions
    blob_bytes: int
    shift: int  # the shifted copy is `shift` random bytes followed by the blob
    warm_reads: int  # random 4 KiB reads, warm and after drop_caches
    cold_region: int  # cold random reads: one 4 KiB read per region of this size
    prefault_bytes: int  # written and deleted on the native disk before each ingest


FULL = Scale(None, 5, 0.02, 32 * MiB, 1000, 20_000, 128 * 1024, 1 << 30)
QUICK = Scale(150, 3, 0.02, 4 * MiB, 1000, 2_000, 128 * 1024, 0)


@dataclass(frozen=True)
class Row:
    name: str
    unit: str
    higher_is_better: bool
    base: str | None  # the contender the dedup contenders are compared with
    target: float | None  # dedup / base must be at least this (issue 12's targets)
    what: str


ROWS: list[Row] = [
    Row("ratio", "x", True, "borg", 0.95,
        "logical bytes of the data set / stored bytes (see 'what is counted')"),
    Row("ingest-blobs", "MB/s", True, "borg", 1.0,
        "the large files: `cp -a` into the mount + sync; borg: `borg create` + sync"),
    Row("ingest-tree", "MB/s", True, "borg", None,
        "the source-tree versions, the same way (the FUSE create path bounds isofs here)"),
    Row("unmount", "s", False, "passthrough", None,
        "unmount after the ingest: the daemon's last flushes (S3: the uploads) and exit"),
    Row("rand-read-4k-warm", "IOPS", True, "passthrough", 0.5,
        "4 KiB preads at random aligned offsets of the blob, right after reading it whole"),
    Row("rand-read-4k-dropped", "IOPS", True, "passthrough", None,
        "the same offsets again after drop_caches: the daemon's own caches still warm"),
    Row("rand-read-4k-cold", "IOPS", True, "passthrough", None,
        "after remount + drop_caches: one 4 KiB read per 128 KiB region, random order"),
    Row("seq-read-cold-blobs", "MB/s", True, "passthrough", None,
        "after remount + drop_caches: read the large files in 1 MiB blocks"),
    Row("seq-read-cold-tree", "MB/s", True, "passthrough", None,
        "then every file of the tree versions, in directory order"),
]  # fmt: skip
ROW_BY_NAME = {r.name: r for r in ROWS}
DEDUP_CONTENDERS = ("dedup", "dedup-s3")


# --------------------------------------------------------------------------------------
# The data set
# --------------------------------------------------------------------------------------


@dataclass
class DataSet:
    """The input, on the native disk: `blobs/` and `tree/v1..vN/`, with every digest."""

    root: Path
    digests: dict[str, str] = field(default_factory=dict)  # relative path -> sha256 hex
    links: dict[str, str] = field(default_factory=dict)  # relative path -> symlink target
    part_bytes: dict[str, int] = field(default_factory=dict)  # "blobs"/"tree" -> bytes
    part_files: dict[str, int] = field(default_factory=dict)
    directories: int = 0
    edited: dict[str, list[str]] = field(default_factory=dict)  # version -> edited files

    @property
    def logical_bytes(self) -> int:
        return sum(self.part_bytes.values())

    def describe(self) -> dict[str, Any]:
        return {
            "logical_bytes": self.logical_bytes,
            "part_bytes": self.part_bytes,
            "part_files": self.part_files,
            "symlinks": len(self.links),
            "directories": self.directories,
            "edited": self.edited,
            "digests": self.digests,
            "links": self.links,
        }


def tree_entries(tree: Path, limit: int | None) -> tuple[list[str], list[str], list[str]]:
    """(directories, regular files, symlinks) of `tree`, relative and sorted; with `limit`,
    only `limit` regular files (every k-th in walk order) and the directories they need."""
    dirs: list[str] = []
    files: list[str] = []
    links: list[str] = []
    for top, subdirs, names in os.walk(tree):
        subdirs.sort()
        rel_top = os.path.relpath(top, tree)
        rel_top = "" if rel_top == "." else rel_top
        dirs.append(rel_top)
        for subdir in subdirs:  # os.walk does not descend into symlinks to directories
            if os.path.islink(os.path.join(top, subdir)):
                links.append(os.path.join(rel_top, subdir))
        for name in sorted(names):
            path = os.path.join(top, name)
            rel = os.path.join(rel_top, name)
            if os.path.islink(path):
                links.append(rel)
            elif os.path.isfile(path) and os.access(path, os.R_OK):
                files.append(rel)
    if limit is not None:  # a sample spread over the whole tree, no file over 1 MiB
        small = [rel for rel in files if os.path.getsize(tree / rel) <= MiB]
        files = small[:: max(1, len(small) // limit)][:limit]
        needed = {""}
        for rel in files:
            parent = os.path.dirname(rel)
            while parent not in needed:
                needed.add(parent)
                parent = os.path.dirname(parent)
        dirs = [d for d in dirs if d in needed]
        links = [ln for ln in links if os.path.dirname(ln) in needed][: max(1, limit // 50)]
    return dirs, files, links


def edit(content: bytes, rng: random.Random) -> bytes:
    """A small source-like edit: insert a line, delete a line or overwrite a few bytes."""
    kind = rng.choice(("insert", "insert", "delete", "overwrite"))
    starts = [0] + [i + 1 for i, byte in enumerate(content) if byte == 0x0A]
    text = bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz _=()") for _ in range(rng.randint(20, 80)))
    if kind == "delete" and len(starts) > 2:
        i = rng.randrange(len(starts) - 1)
        return content[: starts[i]] + content[starts[i + 1] :]
    if kind == "overwrite" and len(content) > 64:
        at = rng.randrange(len(content) - 64)
        return content[:at] + text[: rng.randint(8, 64)] + content[at + 64 :]
    at = rng.choice(starts) if starts else 0
    return content[:at] + b"# " + text + b"\n" + content[at:]


def build_dataset(root: Path, tree: Path, scale: Scale) -> DataSet:
    """Write the data set under `root` (deterministic for a given tree and scale)."""
    rng = random.Random(SEED)
    data = DataSet(root)
    blobs = root / "blobs"
    blobs.mkdir(parents=True)
    blob = random.Random(SEED + 1).randbytes(scale.blob_bytes)
    shifted = random.Random(SEED + 2).randbytes(scale.shift) + blob
    for name, content in (("blob.bin", blob), ("blob-shifted.bin", shifted)):
        (blobs / name).write_bytes(content)
        data.digests[f"blobs/{name}"] = hashlib.sha256(content).hexdigest()
    data.part_bytes["blobs"] = len(blob) + len(shifted)
    data.part_files["blobs"] = 2
    data.directories = 2  # blobs/ and tree/

    dirs, files, links = tree_entries(tree, scale.tree_files)
    if not files:
        raise BenchError(f"--tree {tree}: no readable regular file in it")
    previous: dict[str, bytes] = {}
    for version in range(1, scale.versions + 1):
        vdir = root / "tree" / f"v{version}"
        for rel in dirs:
            (vdir / rel).mkdir(parents=True, exist_ok=True)
        data.directories += len(dirs)
        for rel in links:
            os.symlink(os.readlink(tree / rel), vdir / rel)
            data.links[f"tree/v{version}/{rel}"] = os.readlink(tree / rel)
        edited: set[str] = set()
        if version > 1:
            count = max(1, round(scale.edit_share * len(files)))
            edited = set(rng.sample(files, count))
            data.edited[f"v{version}"] = sorted(edited)
        for rel in files:
            if version == 1:
                content = (tree / rel).read_bytes()
            else:
                content = edit(previous[rel], rng) if rel in edited else previous[rel]
            previous[rel] = content
            (vdir / rel).write_bytes(content)
            os.chmod(vdir / rel, os.stat(tree / rel).st_mode & 0o7777)
            data.digests[f"tree/v{version}/{rel}"] = hashlib.sha256(content).hexdigest()
    data.part_bytes["tree"] = sum(
        os.lstat(root / rel).st_size for rel in data.digests if rel.startswith("tree/")
    )
    data.part_files["tree"] = len(files) * scale.versions
    return data


def read_tree(top: Path, block: int = MiB) -> int:
    """Read every regular file under `top` (walk order) in `block`-byte reads: bytes read."""
    buf = bytearray(block)
    total = 0
    for path in walk_files(top):
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return total


def walk_files(top: Path) -> Iterator[Path]:
    for dirpath, subdirs, names in os.walk(top):
        subdirs.sort()
        for name in sorted(names):
            path = Path(dirpath, name)
            if not path.is_symlink():
                yield path


def verify(mnt: Path, data: DataSet) -> dict[str, Any]:
    """Every file and symlink of the data set read back through `mnt` against the input."""
    seen: dict[str, str] = {}
    links: dict[str, str] = {}
    for dirpath, _subdirs, names in os.walk(mnt):
        for name in names:
            path = Path(dirpath, name)
            rel = path.relative_to(mnt).as_posix()
            if path.is_symlink():
                links[rel] = os.readlink(path)
                continue
            digest = hashlib.sha256()
            with open(path, "rb", buffering=0) as f:
                while chunk := f.read(MiB):
                    digest.update(chunk)
            seen[rel] = digest.hexdigest()
    wrong = sorted(rel for rel in data.digests if seen.get(rel) != data.digests[rel])
    extra = sorted(set(seen) - set(data.digests))
    wrong_links = sorted(rel for rel in data.links if links.get(rel) != data.links[rel])
    return {
        "files": len(seen),
        "bytes": sum(os.lstat(mnt / rel).st_size for rel in seen),
        "symlinks": len(links),
        "mismatched": wrong,
        "unexpected": extra + sorted(set(links) - set(data.links)),
        "mismatched_links": wrong_links,
        "ok": not wrong and not extra and not wrong_links and len(links) == len(data.links),
        "digests": seen,
    }


# --------------------------------------------------------------------------------------
# Contenders
# --------------------------------------------------------------------------------------


@dataclass
class Ctx:
    scale: Scale
    data: DataSet
    work: Path
    caches: suite.Caches
    block: bytes = field(repr=False, default=b"")

    def prefault(self) -> None:
        """Touch the memory the ingest will use (see bench/README.md: VM memory balloon)."""
        if not self.scale.prefault_bytes:
            return
        scratch = self.work / "prefault.tmp"
        try:
            suite.write_file(scratch, self.scale.prefault_bytes, self.block, fsync=False)
        finally:
            scratch.unlink(missing_ok=True)

    def warm_source(self) -> None:
        """Every contender reads the input from the page cache, never from the disk."""
        read_tree(self.data.root)


Record = Callable[[str, float], None]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def run_quiet(argv: list[str], log: Path, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, its output appended to `log`; a failure raises with its last line."""
    r = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, **kwargs)
    with open(log, "a") as f:
        f.write(f"--- {' '.join(argv)} -> {r.returncode}\n{r.stdout}{r.stderr}")
    if r.returncode != 0:
        raise subprocess.SubprocessError(f"{argv[0]} {argv[1]}: {suite.one_line(r.stderr)}")
    return r


class Borg:
    """`borg create` into a fresh unencrypted repository per repetition (no isofs)."""

    def __init__(self, name: str, work: Path, chunker: str) -> None:
        self.name = name
        self.work = work
        self.chunker = chunker
        self.log = work / f"{name}.log"
        self.details: dict[str, Any] = {}

    def check(self, tried: set[str]) -> str | None:
        if ensure_apt_tool("borg", "borgbackup", tried):
            return None
        return "borg is not installed (apt-get install borgbackup)"

    def version(self) -> str:
        return suite.tool_version(["borg", "--version"])

    def env(self, base: Path) -> dict[str, str]:
        # Everything borg keeps (cache, security dir, config) goes to the scratch dir.
        return dict(os.environ, BORG_BASE_DIR=str(base),
                    BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK="yes",
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes")  # fmt: skip

    def measure(self, ctx: Ctx, rep: int, record: Record) -> None:
        base = Path(tempfile.mkdtemp(prefix=f"{self.name}-{rep}-", dir=ctx.work))
        repo = base / "repo"
        env = self.env(base)
        run_quiet(["borg", "init", "--encryption", "none", str(repo)], self.log, env=env)
        create = ["borg", "create", "--chunker-params", self.chunker,
                  "--compression", BORG_COMPRESSION]  # fmt: skip
        # The fixed cost of one `borg create` (interpreter start, lock, cache, commit).
        empty = base / "empty"
        empty.mkdir()
        fixed = timed(lambda: run_quiet([*create, f"{repo}::empty", "empty"], self.log,
                                        env=env, cwd=base))  # fmt: skip
        net: dict[str, float] = {}
        for part in ("blobs", "tree"):
            ctx.prefault()
            ctx.warm_source()
            os.sync()
            argv = [*create, f"{repo}::{part}", part]

            def ingest(argv: list[str] = argv) -> None:
                run_quiet(argv, self.log, env=env, cwd=ctx.data.root)
                os.sync()

            took = timed(ingest)
            record(f"ingest-{part}", ctx.data.part_bytes[part] / MB / took)
            if took > fixed:
                net[part] = ctx.data.part_bytes[part] / MB / (took - fixed)
        info = json.loads(run_quiet(["borg", "info", "--json", str(repo)], self.log,
                                    env=env).stdout)["cache"]["stats"]  # fmt: skip
        stored = int(info["unique_csize"])
        record("ratio", ctx.data.logical_bytes / stored)
        self.details.setdefault("repetitions", []).append({
            "unique_csize": stored,
            "unique_size": int(info["unique_size"]),
            "total_size": int(info["total_size"]),
            "total_unique_chunks": int(info["total_unique_chunks"]),
            "repository_disk_bytes": disk_bytes(repo),
            "create_empty_s": fixed,
            "ingest_blobs_net_mb_s": net.get("blobs"),  # the fixed cost taken out
            "ingest_tree_net_mb_s": net.get("tree"),
        })  # fmt: skip


class IsofsMount(suite.IsofsCli):
    """A one-view target mount of a fresh source per repetition; rows from ingest to reads."""

    mount_args = ["--default-view", "target", "--no-exec"]

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.details: dict[str, Any] = {}
        self.readback: dict[str, str] = {}

    def measure(self, ctx: Ctx, rep: int, record: Record) -> None:
        src = Path(tempfile.mkdtemp(prefix=f"src-{self.name}-{rep}-", dir=ctx.work))
        mnt = ctx.work / f"mnt-{self.name}"
        mnt.mkdir(exist_ok=True)
        details: dict[str, Any] = {}
        self.details.setdefault("repetitions", []).append(details)
        try:
            self.prepare(src)
            self.mount(src, mnt)
            self._ingest(ctx, record)
            self._random_reads(ctx, record)
            record("unmount", timed(self.unmount))
            details["local_packs_before_cold_reads"] = self.local_packs()
            self._mount()
            ctx.caches.drop()
            self._cold_random_reads(ctx, record)
            self.remount()
            ctx.caches.drop()
            for part in ("blobs", "tree"):
                dt = timed(lambda part=part: read_tree(self.data_dir / part))
                record(f"seq-read-cold-{part}", ctx.data.part_bytes[part] / MB / dt)
            check = verify(self.data_dir, ctx.data)
            self.readback = check.pop("digests")
            details["verify"] = check
            if not check["ok"]:
                raise suite.MountError(
                    f"read back differs from the input: {len(check['mismatched'])} files, "
                    f"e.g. {(check['mismatched'] + check['unexpected'] + [''])[0]}"
                )
        finally:
            self.unmount()
        details.update(self.stored(src, ctx, record))

    def _ingest(self, ctx: Ctx, record: Record) -> None:
        for part in ("blobs", "tree"):
            ctx.prefault()
            ctx.warm_source()
            os.sync()
            argv = ["cp", "-a", str(ctx.data.root / part), str(self.data_dir)]

            def ingest(argv: list[str] = argv) -> None:
                run_quiet(argv, self.log)
                os.sync()

            record(f"ingest-{part}", ctx.data.part_bytes[part] / MB / timed(ingest))

    def _random_reads(self, ctx: Ctx, record: Record) -> None:
        blob = self.data_dir / "blobs" / "blob.bin"
        rng = random.Random(SEED)
        blocks = ctx.scale.blob_bytes // 4096
        offsets = [rng.randrange(blocks) * 4096 for _ in range(ctx.scale.warm_reads)]
        suite.read_file(blob, MiB)
        record("rand-read-4k-warm", len(offsets) / preads(blob, offsets))
        ctx.caches.drop()
        record("rand-read-4k-dropped", len(offsets) / preads(blob, offsets))

    def _cold_random_reads(self, ctx: Ctx, record: Record) -> None:
        blob = self.data_dir / "blobs" / "blob.bin"
        rng = random.Random(SEED + 3)
        region = ctx.scale.cold_region
        offsets = [start + rng.randrange(region // 4096) * 4096
                   for start in range(0, ctx.scale.blob_bytes - region + 1, region)]  # fmt: skip
        rng.shuffle(offsets)
        record("rand-read-4k-cold", len(offsets) / preads(blob, offsets))

    def local_packs(self) -> int:
        """Pack files in the source's `.isofs/dedup/packs/` (S3: those not uploaded yet)."""
        assert self.src is not None
        packs = self.src / ".isofs" / "dedup" / "packs"
        return sum(1 for p in packs.iterdir() if p.is_file()) if packs.is_dir() else 0

    def stored(self, src: Path, ctx: Ctx, record: Record) -> dict[str, Any]:
        """What the source holds on disk: native bytes of its files, `.isofs/`."""
        files = [p.stat() for p in walk_files(src) if ".isofs" not in p.relative_to(src).parts]
        return {
            "native_file_bytes": sum(st.st_size for st in files),
            "native_file_allocated_bytes": sum(st.st_blocks * 512 for st in files),
            "isofs_dir_bytes": disk_bytes(src / ".isofs"),
        }


class DedupMount(IsofsMount):
    """The dedup provider with its embedded store (the source's `.isofs/dedup/`)."""

    name = "dedup"
    init_args = ["--provider", "dedup"]

    def stored(self, src: Path, ctx: Ctx, record: Record) -> dict[str, Any]:
        out = super().stored(src, ctx, record)
        stats = json.loads(self._cli(["dedup-stats", str(src), "--json"], timeout=300).stdout)
        if stats["logical_bytes"] != ctx.data.logical_bytes:
            raise suite.MountError(
                f"dedup-stats counts {stats['logical_bytes']} logical bytes, "
                f"the data set has {ctx.data.logical_bytes}"
            )
        counted = int(stats["stored_bytes"]) + out["native_file_bytes"]
        record("ratio", ctx.data.logical_bytes / counted)
        index = src / ".isofs" / "dedup"
        out.update(
            packs_only_ratio=ctx.data.logical_bytes / max(1, int(stats["stored_bytes"])),
            stored_bytes=int(stats["stored_bytes"]),
            counted_bytes=counted,
            dedup_stats=stats,
            index_db_bytes=sum(p.stat().st_size for p in index.glob("index.db*")),
        )
        return out


class DedupS3Mount(DedupMount):
    """The dedup provider with its chunks in a bucket of the local Ceph RGW engine."""

    name = "dedup-s3"

    def __init__(self, work: Path) -> None:
        super().__init__(work)
        self.engine: Any = None  # an s3engine.S3Engine, started by main()

    def check(self, tried: set[str]) -> str | None:
        for tool in ("ceph-mon", "ceph-osd", "radosgw"):
            if not ensure_apt_tool(tool, tool, tried):
                return f"{tool} is not installed (apt-get install ceph-mon ceph-osd radosgw)"
        return None

    def version(self) -> str:
        return suite.tool_version(["radosgw", "--version"]).split("(")[0].strip()

    def cli_env(self) -> dict[str, str]:  # type: ignore[override]  # needs the engine's keys
        env = suite.IsofsCli.cli_env()
        if self.engine is not None:
            env.update(self.engine.environment())
        return env

    def prepare(self, src: Path) -> None:
        assert self.engine is not None
        self.init_args = ["--provider", "dedup", "--store",
                          f"s3://{BUCKET}/{src.name}-{uuid.uuid4().hex[:8]}",
                          "--endpoint", self.engine.endpoint_url]  # fmt: skip
        super().prepare(src)

    def stored(self, src: Path, ctx: Ctx, record: Record) -> dict[str, Any]:
        out = super().stored(src, ctx, record)
        store = out["dedup_stats"]["store"]
        out["upload_backlog_packs"] = store.get("upload_backlog_packs")
        return out


class PassthroughMount(IsofsMount):
    """The passthrough provider: everything isofs does, with a layer that changes nothing."""

    name = "passthrough"
    init_args = ["--provider", "passthrough"]


def preads(path: Path, offsets: list[int]) -> float:
    """Seconds for one 4 KiB pread at each offset, on one descriptor."""
    fd = os.open(path, os.O_RDONLY)
    try:
        pread = os.pread
        t0 = time.perf_counter()
        for off in offsets:
            pread(fd, 4096, off)
        return time.perf_counter() - t0
    finally:
        os.close(fd)


def disk_bytes(path: Path) -> int:
    """Bytes of the regular files under `path` (apparent sizes)."""
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in walk_files(path))


def ensure_apt_tool(tool: str, package: str, tried: set[str]) -> str | None:
    """`suite.ensure_tool`, once more after `apt-get update` when the lists are stale."""
    path = suite.ensure_tool(tool, package, tried)
    if path or os.geteuid() != 0 or f"update:{package}" in tried or not shutil.which("apt-get"):
        return path
    tried.add(f"update:{package}")
    subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
    tried.discard(package)
    return suite.ensure_tool(tool, package, tried)


CONTENDERS: dict[str, Callable[[Path], Any]] = {
    "borg": lambda work: Borg("borg", work, BORG_CHUNKER_64K),
    "borg-default": lambda work: Borg("borg-default", work, BORG_CHUNKER_DEFAULT),
    "dedup": DedupMount,
    "dedup-s3": DedupS3Mount,
    "passthrough": PassthroughMount,
}
DESCRIBE = {
    "borg": f"borg create --chunker-params {BORG_CHUNKER_64K} --compression {BORG_COMPRESSION}"
            " (64 KiB average, as isofs), repository --encryption none",
    "borg-default": f"the same with borg's default chunker {BORG_CHUNKER_DEFAULT} (2 MiB "
                    "average): a reference",
    "dedup": "isofs init --provider dedup (16/64/256 KiB FastCDC, zstd 3, embedded store), "
             "mount --default-view target --no-exec",
    "dedup-s3": "the same with --store s3://... --endpoint URL on a local Ceph RGW (memstore)",
    "passthrough": "isofs init --provider passthrough, the same mount options",
}  # fmt: skip


# --------------------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------------------


def speed_ratio(row: Row, num: float | None, den: float | None) -> float | None:
    if num is None or den is None or num <= 0 or den <= 0:
        return None
    return num / den if row.higher_is_better else den / num


def render_table(names: list[str], med: dict[str, dict[str, float]]) -> tuple[str, list[dict]]:
    """The table, and each (row, dedup contender)'s ratio to the row's base and its target."""
    dedups = [n for n in DEDUP_CONTENDERS if n in names]
    header = ["row", "unit", *names, "|", "base", *(f"{n}/base" for n in dedups), "target",
              *(f"{n}" for n in dedups)]  # fmt: skip
    lines = [header]
    verdicts: list[dict] = []
    for row in ROWS:
        values = [suite.fmt(med.get(n, {}).get(row.name)) for n in names]
        ratios, marks = [], []
        for n in dedups:
            r = speed_ratio(row, med.get(n, {}).get(row.name), med.get(row.base or "", {}).get(
                row.name))
            ratios.append(f"{r:.2f}x" if r is not None else "-")
            met = None if row.target is None or r is None else r >= row.target
            marks.append("-" if met is None else "met" if met else "MISSED")
            verdicts.append({"row": row.name, "contender": n, "base": row.base, "ratio": r,
                             "target": row.target, "met": met})  # fmt: skip
        target = f">={row.target:.2f}x" if row.target is not None else "-"
        lines.append([row.name, row.unit, *values, "|", row.base or "-", *ratios, target, *marks])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = []
    for k, line in enumerate(lines):
        cells = [f"{c:<{w}}" if i < 2 or c == "|" else f"{c:>{w}}"
                 for i, (c, w) in enumerate(zip(line, widths, strict=True))]  # fmt: skip
        out.append("  ".join(cells).rstrip())
        if k == 0:
            out.append("-" * len(out[0]))
    return "\n".join(out), verdicts


def render_spread(names: list[str], samples: dict[str, dict[str, list[float]]]) -> str:
    out = ["spread of the repetitions, (max-min)/median:"]
    width = max(len(r.name) for r in ROWS)
    out.append(" " * width + "  " + "  ".join(f"{n:>12}" for n in names))
    for row in ROWS:
        cells = []
        for n in names:
            xs = samples.get(n, {}).get(row.name, [])
            spread = (max(xs) - min(xs)) / statistics.median(xs) * 100 if len(xs) > 1 else None
            cells.append(f"{'-':>12}" if spread is None else f"{spread:>11.0f}%")
        out.append(f"{row.name:<{width}}  " + "  ".join(cells))
    return "\n".join(out)


COUNTED = {
    "logical": "the data set's regular-file bytes (what cp -a writes through the target view; "
               "dedup-stats' logical_bytes must equal it, and does: it is checked)",
    "dedup": "stored = the pack files' bytes from `isofs dedup-stats SRC --json` (stored_bytes: "
             "pack headers, records with their 44-byte headers, zstd payloads, trailers, dead "
             "records) + every manifest's native bytes; not counted: index.db (SQLite, printed "
             "apart), directories and names (ext4 keeps them)",
    "dedup-s3": "the same as dedup (stored_bytes counts the packs in the bucket and any still "
                "in the staging directory) + every manifest's native bytes",
    "borg": "stored = `borg info --json` cache.stats.unique_csize: compressed bytes of every "
            "unique chunk, file data and borg's item metadata (names, modes, chunk lists) alike; "
            "not counted: segment-file and object headers, the repository index and hints, the "
            "client cache (repository_disk_bytes in the JSON has the repository on disk)",
}  # fmt: skip


# --------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------


def without_nagle(engine: Any) -> str:
    """Restart the engine's gateway with `tcp_nodelay=1` on its beast frontend.

    Why: with Nagle's algorithm on, radosgw sends a small response body only once the client
    has acknowledged the headers, and the client delays that ACK by 40 ms: a 4 KiB ranged GET
    takes ~48 ms instead of ~3 ms (80 KiB ones are mostly spared), so reads of small
    (compressed) chunks would measure the delayed ACK, not the store. Returns the note for
    the header, empty when the option could not be set.
    """
    text = engine.conf.read_text()
    marker = "rgw frontends = beast "
    if marker not in text or "tcp_nodelay" in text:
        return ""
    engine.stop_gateway()
    engine.conf.write_text(text.replace(marker, marker + "tcp_nodelay=1 "))
    engine.start_gateway()
    return ", beast tcp_nodelay=1"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line, the project's form
        fail(message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = _Parser(
        prog="bench/dedup.py",
        description="isofs dedup against borg create, embedded and S3 stores, in one run.",
        epilog="rows: " + ", ".join(r.name for r in ROWS)
        + " | contenders: " + ", ".join(CONTENDERS),
    )  # fmt: skip
    p.add_argument("--quick", action="store_true",
                   help="a small data set (150 files x 3 versions, 4 MiB blob), 1 repetition")
    p.add_argument("--repeat", type=int, metavar="N",
                   help="repetitions, medians reported (default 3; --quick: 1)")
    p.add_argument("--contenders", metavar="LIST", default=",".join(CONTENDERS),
                   help=f"comma-separated (default {','.join(CONTENDERS)})")
    p.add_argument("--tree", metavar="DIR", default=str(DEFAULT_TREE),
                   help=f"the tree whose versions make the data set (default {DEFAULT_TREE})")
    p.add_argument("--s3-nagle", action="store_true",
                   help="leave the S3 engine's gateway with Nagle's algorithm on (its default)")
    p.add_argument("--json", metavar="FILE", help="save environment, data set, every sample")
    p.add_argument("--workdir", metavar="DIR",
                   help="make the scratch directory inside DIR (default: the current directory)")
    args = p.parse_args(argv)  # fmt: skip
    args.names = [n.strip() for n in args.contenders.split(",") if n.strip()]
    unknown = [n for n in args.names if n not in CONTENDERS]
    if unknown:
        p.error(f"unknown contender(s) {', '.join(unknown)}; known: {', '.join(CONTENDERS)}")
    if not args.names or len(set(args.names)) != len(args.names):
        p.error("--contenders: list each contender once")
    if args.repeat is None:
        args.repeat = 1 if args.quick else 3
    if args.repeat < 1:
        p.error("--repeat must be >= 1")
    if not Path(args.tree).is_dir():
        p.error(f"--tree {args.tree}: not a directory")
    if args.workdir and not Path(args.workdir).is_dir():
        p.error(f"--workdir {args.workdir}: not a directory")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    base = Path(args.workdir).resolve() if args.workdir else Path.cwd()
    work = Path(tempfile.mkdtemp(prefix="isofs-dedup-bench-", dir=base))

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)
    live: list[Any] = []
    engines: list[Any] = []
    try:
        return _run(args, work, live, engines)
    except KeyboardInterrupt:
        print("\ninterrupted: cleaning up", file=sys.stderr, flush=True)
        return 130
    except BenchError as exc:
        print(f"isofs: error: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        print(f"isofs: error: {type(exc).__name__}: {suite.one_line(str(exc))}",
              file=sys.stderr, flush=True)  # fmt: skip
        return 1
    finally:
        _cleanup(work, live, engines)


def _cleanup(work: Path, live: list[Any], engines: list[Any]) -> None:
    """Unmount every mount (their daemons stopped by PID), stop the engine, remove scratch."""
    with contextlib.suppress(KeyboardInterrupt):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        for c in live:
            try:
                if isinstance(c, IsofsMount):
                    c.unmount()
            except Exception as exc:
                print(f"warning: unmounting {c.name}: {exc}", file=sys.stderr)
        for mnt in suite.mounts_under(work):  # anything mounted in our scratch dir is ours
            subprocess.run(["fusermount3", "-u", "-z", mnt], capture_output=True)
        for engine in engines:  # after the mounts: an S3 daemon uploads while it closes
            try:
                engine.stop()
            except Exception as exc:
                print(f"warning: stopping the S3 engine: {exc}", file=sys.stderr)
        left = suite.mounts_under(work)
        if left:
            print(f"warning: still mounted, scratch dir kept: {', '.join(left)}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _run(args: argparse.Namespace, work: Path, live: list[Any], engines: list[Any]) -> int:
    scale = QUICK if args.quick else FULL
    tried: set[str] = set()
    print("isofs dedup benchmark", flush=True)
    contenders = []
    for name in args.names:
        c = CONTENDERS[name](work)
        why = c.check(tried)
        if why:
            print(f"  skip {name}: {why}", flush=True)
            continue
        contenders.append(c)
        live.append(c)
    if not contenders:
        raise BenchError("no contender can run here")

    # suite.environment() adds each contender's version(): isofs's, not radosgw's (below).
    isofs_mounts = [c for c in contenders if isinstance(c, IsofsMount)]
    env = suite.environment(work, [c for c in isofs_mounts if not isinstance(c, DedupS3Mount)])
    for c in contenders:
        if isinstance(c, Borg) and "borg version" not in env:
            env["borg version"] = c.version()
        if isinstance(c, DedupS3Mount):
            env["ceph version"] = c.version()
    if suite.set_topdir_flag(work):
        env["workdir fs"] += ", scratch dir chattr +T"
    width = max(map(len, [*env, "contenders"]))
    for k, v in env.items():
        print(f"  {k:<{width}}  {v}")
    for c in contenders:
        print(f"  {c.name:<{width}}  {DESCRIBE[c.name]}")

    t_build = time.monotonic()
    data = build_dataset(work / "data", Path(args.tree), scale)
    print(
        f"  {'data set':<{width}}  {data.logical_bytes / MB:.1f} MB: blobs "
        f"{data.part_bytes['blobs'] / MB:.1f} MB (a {scale.blob_bytes // MiB} MiB random blob "
        f"and a copy shifted by {scale.shift} bytes), tree {data.part_bytes['tree'] / MB:.1f} MB"
        f" ({scale.versions} versions of {args.tree}, {data.part_files['tree']} files, "
        f"{len(data.links)} symlinks, {scale.edit_share:.0%} of files edited between versions);"
        f" built in {time.monotonic() - t_build:.0f}s; repeat {args.repeat}",
        flush=True,
    )

    s3 = next((c for c in contenders if isinstance(c, DedupS3Mount)), None)
    if s3 is not None:
        from s3engine import EngineError, S3Engine

        t0 = time.monotonic()
        try:
            # S3Engine.start stops what it started when it fails; register it once it runs.
            engine = S3Engine.start(work / "s3engine")
        except EngineError as exc:
            print(f"  skip dedup-s3: the S3 engine did not start: {suite.one_line(str(exc))}")
            contenders.remove(s3)
        else:
            engines.append(engine)
            s3.engine = engine
            nodelay = "" if args.s3_nagle else without_nagle(engine)
            print(f"  {'S3 engine':<{width}}  Ceph RGW at {engine.endpoint_url} "
                  f"(memstore{nodelay}), up in {time.monotonic() - t0:.1f}s",
                  flush=True)  # fmt: skip
            env["S3 engine"] = f"Ceph RGW, memstore{nodelay}"

    ctx = Ctx(scale, data, work, suite.Caches(), random.Random(SEED).randbytes(MiB))
    samples: dict[str, dict[str, list[float]]] = {c.name: {} for c in contenders}
    errors: dict[str, str] = {}
    orders: list[list[str]] = []
    active = list(contenders)
    t_start = time.monotonic()
    for rep in range(args.repeat):
        k = rep % len(active) if active else 0
        order = active[k:] + active[:k]
        orders.append([c.name for c in order])
        print(f"\nrepetition {rep + 1}/{args.repeat}: {', '.join(orders[-1])}", flush=True)
        for c in order:
            got: dict[str, float] = {}

            def record(row: str, value: float, c: Any = c, got: dict = got) -> None:
                samples[c.name].setdefault(row, []).append(value)
                got[row] = value

            t0 = time.monotonic()
            try:
                c.measure(ctx, rep, record)
            except (suite.MountError, OSError, subprocess.SubprocessError, ValueError,
                    KeyError) as exc:  # fmt: skip
                errors[c.name] = suite.one_line(str(exc))
                print(f"  {c.name:<12} failed: {errors[c.name]}", flush=True)
                active.remove(c)
            summary = ", ".join(f"{r} {suite.fmt(v)}" for r, v in got.items())
            checked = getattr(c, "details", {}).get("repetitions", [{}])[-1].get("verify")
            if checked and checked["ok"] and c.name not in errors:
                summary += (f"; read back {checked['files']} files and {checked['symlinks']} "
                            "symlinks: all equal to the input")  # fmt: skip
            print(f"  {c.name:<12} {time.monotonic() - t0:5.1f}s  {summary}", flush=True)
        if not active:
            break

    env["load after"] = suite.describe_load()
    names = [c.name for c in contenders if samples[c.name]]
    med = {n: {r: statistics.median(v) for r, v in samples[n].items()} for n in names}
    table, verdicts = render_table(names, med)
    print(f"\nresults: median of {args.repeat} repetition(s), "
          f"{time.monotonic() - t_start:.0f}s. MB = 10^6 bytes. Ratio columns are speed "
          "ratios against the row's base (higher is better; for seconds, base/contender);\n"
          "targets from issue 12: ratio >= 0.95x borg's, large-file ingest >= 1.0x borg's, "
          "warm random 4 KiB reads >= 0.5x the passthrough's.")  # fmt: skip
    print(table)
    if args.repeat > 1 and names:
        print()
        print(render_spread(names, samples))
    print("\nwhat is counted:")
    for key, text in COUNTED.items():
        if key == "logical" or key in names:
            print(f"  {key}: {text}")
    details = {c.name: c.details for c in contenders}
    print(notes(details, names, data.logical_bytes))
    for name, msg in errors.items():
        print(f"  {name}: {msg}")
    print(f"load before the run: {env['load before']}")
    print(f"load after the run:  {env['load after']}", flush=True)

    if args.json:
        doc = {
            "environment": env,
            "scale": asdict(scale),
            "tree": args.tree,
            "repeat": args.repeat,
            "rows": [asdict(r) for r in ROWS],
            "contenders": names,
            "describe": {n: DESCRIBE[n] for n in names},
            "dataset": data.describe(),
            "samples": samples,
            "medians": med,
            "verdicts": verdicts,
            "details": details,
            "readback": {c.name: c.readback for c in contenders if isinstance(c, IsofsMount)},
            "counted": {k: v for k, v in COUNTED.items() if k == "logical" or k in names},
            "orders": orders,
            "errors": errors,
        }
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        print(f"raw samples saved to {args.json}")
    return 1 if errors else 0


def notes(details: dict[str, dict[str, Any]], names: list[str], logical: int) -> str:
    """Side figures the table leaves out: borg's fixed cost, index sizes, S3 uploads."""
    out = ["notes (medians over the repetitions):"]

    def median_of(name: str, key: str) -> float | None:
        reps = details.get(name, {}).get("repetitions", [])
        xs = [r[key] for r in reps if r.get(key) is not None]
        return statistics.median(xs) if xs else None

    for n in names:
        if n.startswith("borg"):
            fixed, disk = median_of(n, "create_empty_s"), median_of(n, "repository_disk_bytes")
            stored = median_of(n, "unique_csize")
            if fixed is not None and stored is not None and disk is not None:
                out.append(f"  {n}: one `borg create` of an empty directory takes {fixed:.2f}s "
                           f"(in each ingest figure); unique_csize {stored / MB:.1f} MB, "
                           f"repository on disk {disk / MB:.1f} MB")  # fmt: skip
            blobs = median_of(n, "ingest_blobs_net_mb_s")
            tree = median_of(n, "ingest_tree_net_mb_s")
            if blobs is not None and tree is not None:
                out.append(f"  {n}: ingest without that fixed cost: blobs {blobs:.0f} MB/s, "
                           f"tree {tree:.0f} MB/s")
        elif n in DEDUP_CONTENDERS:
            packs, manifests = median_of(n, "stored_bytes"), median_of(n, "native_file_bytes")
            index, isofs_dir = median_of(n, "index_db_bytes"), median_of(n, "isofs_dir_bytes")
            local = median_of(n, "local_packs_before_cold_reads")
            if packs is not None and manifests is not None and index is not None:
                allocated = median_of(n, "native_file_allocated_bytes") or 0
                out.append(f"  {n}: packs {packs / MB:.1f} MB + manifests {manifests / MB:.2f} MB"
                           f" counted (the manifests take {allocated / MB:.2f} MB of disk "
                           f"blocks); index.db {index / MB:.2f} MB and .isofs/ on disk "
                           f"{(isofs_dir or 0) / MB:.1f} MB not counted")  # fmt: skip
            packs_only, borg = median_of(n, "packs_only_ratio"), median_of("borg", "unique_csize")
            if packs_only is not None:
                versus = (f" ({packs_only / (logical / borg):.2f}x borg's)"
                          if borg and logical else "")  # fmt: skip
                out.append(f"  {n}: ratio on the packs alone (manifests left out): "
                           f"{packs_only:.2f}{versus}")
            if n == "dedup-s3" and local is not None:
                out.append(f"  {n}: pack files still local when the cold reads began: "
                           f"{local:.0f} (0: every cold read was a ranged GET to the engine)")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
