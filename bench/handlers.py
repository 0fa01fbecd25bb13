#!/usr/bin/env python3
"""What one request costs inside the daemon's handlers, without the kernel: isofs against the
minimal pyfuse3 passthrough, called the way pyfuse3 calls them, in one trio loop.

A FUSE round trip is the kernel, pyfuse3's request loop (the same code for every pyfuse3
daemon) and the handler; this measures the handler, the only share isofs can change, with the
same syscalls on the same disk. It runs without root and without /dev/fuse.

Operations, each N times (a fresh directory per contender):
  create: LOOKUP (a miss), CREATE, GETXATTR security.capability, WRITE 112 B, FLUSH, RELEASE
          (the requests the kernel sends for open(O_CREAT)+write+close, bench/requests.py)
  list:   one listing of those N files: OPENDIR, READDIRPLUS replies of 25 entries (a 4 KiB
          page) until an empty one, RELEASEDIR; the time is per entry listed
  stat:   LOOKUP of an existing name, then GETATTR
  read:   a 4 KiB READ at a random offset of a 64 MiB file (one open handle)
  unlink: LOOKUP, UNLINK

Usage: python bench/handlers.py [--n 3000] [--contenders minimal,none,passthrough,encrypt]
       [--profile OP:CONTENDER]  (cProfile of that operation: the top functions by own
       time, and the whole profile in OP-CONTENDER.prof)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import os
import pstats
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyfuse3
import trio

from isofs.bench.minimal import PassthroughOps
from isofs.core.volume import Volume
from isofs.fuse.operations import IsoFS
from isofs.provider import Stack
from isofs.views.policy import Policy
from isofs_providers.encrypt.layer import EncryptLayer
from isofs_providers.passthrough import PassthroughLayer

ROOT_INODE = pyfuse3.ROOT_INODE
PAYLOAD = b"0123456789abcdef" * 7
BIG = 64 << 20
CAPABILITY = b"security.capability"
CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL


@dataclass
class Context:
    """What a handler reads of pyfuse3's RequestContext."""

    uid: int = os.getuid()
    gid: int = os.getgid()
    pid: int = os.getpid()
    umask: int = 0o022


CTX = Context()


def _isofs(stack: Stack) -> Callable[[Path], tuple[Any, Callable[[], None]]]:
    def build(src: Path) -> tuple[Any, Callable[[], None]]:
        root_fd = os.open(src, os.O_PATH | os.O_DIRECTORY)
        volume = Volume(root_fd, stack=stack, policy=Policy(default_view="target"))
        ops = IsoFS(volume)

        def close() -> None:
            volume.close()
            os.close(root_fd)

        return ops, close

    return build


def _minimal(src: Path) -> tuple[Any, Callable[[], None]]:
    return PassthroughOps(str(src)), lambda: None


CONTENDERS: dict[str, Callable[[Path], tuple[Any, Callable[[], None]]]] = {
    "minimal": _minimal,
    "none": _isofs(Stack([])),  # no provider: what bench/run.py's `isofs` contender mounts
    "passthrough": _isofs(Stack([PassthroughLayer()])),
    "encrypt": _isofs(Stack([EncryptLayer(bytes(range(32)), encrypt_names=True)])),
}


async def _ignore_missing(call: Awaitable[Any]) -> None:
    """A request whose answer is "no such name/attribute" (ENOENT, ENODATA, or isofs'
    negative entry for a miss)."""
    with contextlib.suppress(pyfuse3.FUSEError):
        await call


async def op_create(ops: Any, parent: int, n: int) -> None:
    for i in range(n):
        name = b"f%05d" % i
        await _ignore_missing(ops.lookup(parent, name, CTX))
        info, entry = await ops.create(parent, name, 0o644, CREATE_FLAGS, CTX)
        await _ignore_missing(ops.getxattr(entry.st_ino, CAPABILITY, CTX))
        await ops.write(info.fh, 0, PAYLOAD)
        await ops.flush(info.fh)
        await ops.release(info.fh)


async def op_stat(ops: Any, parent: int, n: int) -> None:
    for i in range(n):
        entry = await ops.lookup(parent, b"f%05d" % i, CTX)
        await ops.getattr(entry.st_ino, CTX)


async def op_unlink(ops: Any, parent: int, n: int) -> None:
    for i in range(n):
        await ops.lookup(parent, b"f%05d" % i, CTX)
        await ops.unlink(parent, b"f%05d" % i, CTX)


#: Entries per READDIRPLUS reply: the kernel's buffer is a 4 KiB page, ~150 bytes an entry.
READDIRPLUS_BATCH = 25


class _ReplyBuffer:
    """Stands in for pyfuse3's readdir token: takes READDIRPLUS_BATCH entries, then is full."""

    def __init__(self) -> None:
        self.taken = 0
        self.next_id = 0


def _readdir_reply(token: _ReplyBuffer, name: bytes, attr: Any, next_id: int) -> bool:
    if token.taken >= READDIRPLUS_BATCH:
        return False
    token.taken += 1
    token.next_id = next_id
    return True


async def op_list(ops: Any, parent: int, n: int) -> None:
    """One listing of the directory's n files, as a cold `ls` or scandir makes it: OPENDIR,
    READDIRPLUS requests of a page each until one comes back empty, RELEASEDIR."""
    real, pyfuse3.readdir_reply = pyfuse3.readdir_reply, _readdir_reply
    try:
        fh = await ops.opendir(parent, CTX)
        start, listed = 0, 0
        while True:
            token = _ReplyBuffer()
            await ops.readdir(fh, start, token)
            if not token.taken:
                break
            listed += token.taken
            start = token.next_id
        await ops.releasedir(fh)
        assert listed >= n, f"listed {listed} of {n}"
    finally:
        pyfuse3.readdir_reply = real


async def op_read(ops: Any, n: int, fh: int) -> None:
    rng = random.Random(1)
    for _ in range(n):
        await ops.read(fh, rng.randrange(BIG // 4096) * 4096, 4096)


async def prepare_read(ops: Any, parent: int) -> int:
    info, entry = await ops.create(parent, b"big", 0o644, os.O_RDWR | os.O_CREAT, CTX)
    chunk = random.Random(2).randbytes(1 << 20)
    for off in range(0, BIG, len(chunk)):
        await ops.write(info.fh, off, chunk)
    await ops.flush(info.fh)
    await ops.release(info.fh)
    opened = await ops.open(entry.st_ino, os.O_RDONLY, CTX)
    return opened.fh


def _request_times(ops: Any) -> dict[str, tuple[int, float]]:
    """(count, total seconds) per request, from the daemon's own counters."""
    if isinstance(ops, PassthroughOps):
        return {k: (int(c), t) for k, (c, t) in ops.counters.operations.items()}
    return {k: (v.count, v.total_s) for k, v in ops.stats.operations.items()}


def _per_request(before: dict[str, tuple[int, float]], after: dict[str, tuple[int, float]],
                 n: int) -> dict[str, float]:  # fmt: skip
    """µs per operation spent in each request type between two counter snapshots."""
    out = {}
    for request, (count, total) in after.items():
        count0, total0 = before.get(request, (0, 0.0))
        if count > count0:
            out[request] = (total - total0) / n * 1e6
    return out


async def run_contender(
    name: str, work: Path, n: int, profile: str | None, breakdown: dict[str, dict[str, float]]
) -> dict[str, float]:
    src = work / name
    src.mkdir()
    ops, close = CONTENDERS[name](src)
    results: dict[str, float] = {}
    try:
        directory = await ops.mkdir(ROOT_INODE, b"d", 0o755, CTX)
        parent = directory.st_ino
        read_fh = -1

        async def open_big_file() -> None:
            nonlocal read_fh
            read_fh = await prepare_read(ops, parent)

        # (operation, untimed preparation, the timed work)
        steps: list[tuple[str, Callable[[], Awaitable[None]] | None, Callable[[], Awaitable[None]]]]
        steps = [
            ("create", None, lambda: op_create(ops, parent, n)),
            ("list", None, lambda: op_list(ops, parent, n)),
            ("stat", None, lambda: op_stat(ops, parent, n)),
            ("unlink", None, lambda: op_unlink(ops, parent, n)),
            ("read", open_big_file, lambda: op_read(ops, n, read_fh)),
        ]
        for op, prepare, step in steps:
            if prepare is not None:
                await prepare()
            os.sync()  # earlier writes' journal commits must not land in the timed work
            counters = _request_times(ops)
            profiler = cProfile.Profile() if profile == f"{op}:{name}" else None
            started = time.perf_counter()
            if profiler:
                profiler.enable()
            await step()
            if profiler:
                profiler.disable()
            results[op] = (time.perf_counter() - started) / n * 1e6
            breakdown[op] = _per_request(counters, _request_times(ops), n)
            if profiler:
                profiler.dump_stats(f"{op}-{name}.prof")
                pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
        await ops.release(read_fh)
    finally:
        close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=3000)
    parser.add_argument("--contenders", default="minimal,none,passthrough,encrypt")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is shown (default 3)")
    parser.add_argument("--profile", metavar="OP:CONTENDER")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    names = args.contenders.split(",")
    samples: dict[str, dict[str, list[float]]] = {c: {} for c in names}
    breakdowns: dict[str, dict[str, dict[str, float]]] = {c: {} for c in names}
    for _ in range(args.repeat):
        for name in names:
            work = Path(tempfile.mkdtemp(prefix="isofs-handlers-", dir=args.workdir))
            try:
                got = trio.run(run_contender, name, work, args.n, args.profile, breakdowns[name])
            finally:
                shutil.rmtree(work, ignore_errors=True)
            for op, us in got.items():
                samples[name].setdefault(op, []).append(us)
    ops = list(samples[names[0]])
    print(f"µs per operation inside the handlers (best of {args.repeat}, n={args.n}; "
          "ratio to minimal)")  # fmt: skip
    print(f"{'contender':14}" + "".join(f"{op:>20}" for op in ops))
    base = {op: min(samples["minimal"][op]) for op in ops} \
        if "minimal" in samples else None  # fmt: skip
    for name in names:
        cells = []
        for op in ops:
            us = min(samples[name][op])
            ratio = f" ({us / base[op]:.2f}x)" if base else ""
            cells.append(f"{us:10.1f}{ratio:>10}")
        print(f"{name:14}" + "".join(cells))
    print("\nby request (µs per operation, last run):")
    for op in ops:
        for name in names:
            parts = ", ".join(f"{r} {us:.1f}" for r, us in sorted(breakdowns[name][op].items()))
            print(f"  {op:8} {name:12} {parts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
