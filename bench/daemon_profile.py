#!/usr/bin/env python3
"""Where an isofs daemon's time goes under the create and untar workloads, by component.

Mounts a fresh one-view source (passthrough or encrypt with encrypted names) in a scratch
directory, records the daemon with py-spy (https://github.com/benfred/py-spy, not a
dependency: `pip install py-spy`, or `--py-spy PATH`) while a separate process creates small
files or extracts a tarball into the mount, and prints the share of the daemon's busy
main-thread samples by the innermost component on the stack: the inode table and native
calls (the syscalls themselves included: py-spy sees the Python frame that makes them),
sections and page cache, names, provider content, size cache, caller resolution, volume,
the FUSE layer, pyfuse3's request loop and trio's scheduling. py-spy stops the daemon for
each sample (blocking mode, so stacks are whole), which slows it down: compare shares and
sample counts between runs of this script, not its times with other benchmarks.

Usage (root): python bench/daemon_profile.py [--provider passthrough|encrypt]
              [--workload create|untar] [--files 5000] [--tarball FILE] [--raw OUT.txt]
              [--workdir DIR]
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from daemon_cpu import daemon_pid
from requests import Contender, _isofs_mount, _minimal, contender_mount

#: The mount options of the profiled mount: one view, every process the target view.
ONE_VIEW = ("--default-view", "target", "--no-exec")

PY = sys.executable
CREATE = """
import os, sys
d = os.path.join(sys.argv[1], "d"); os.mkdir(d)
payload = b"0123456789abcdef" * 7
for i in range(int(sys.argv[2])):
    fd = os.open(os.path.join(d, f"f{i}"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.write(fd, payload)
    os.close(fd)
"""

#: (component, test on the innermost frame's file) in the order they are tried.
COMPONENTS: list[tuple[str, tuple[str, ...]]] = [
    ("names (name encryption, key files)", ("core/names.py", "encrypt/names.py", "encrypt/kdf.py")),
    ("provider content", ("isofs_providers",)),
    ("sections and page cache", ("core/sections.py", "core/pagecache.py", "core/locks.py")),
    ("inode table and native calls", ("core/inodes.py", "core/native.py", "durable.py")),
    ("size cache and sizing", ("core/sizecache.py", "core/sizing.py")),
    ("caller resolution and views", ("isofs/views/",)),
    ("volume (attributes, entries, handles)", ("core/volume.py",)),
    ("FUSE layer (errno, stats, entries)", ("isofs/fuse/",)),
    ("pyfuse3 request loop", ("pyfuse3",)),
    ("trio scheduling", ("trio/", "outcome/")),
]
FRAME = re.compile(r"(.*) \((.*?):\d+\)$")


def components(raw: Path) -> tuple[int, int, collections.Counter[str]]:
    """(busy samples, idle samples, busy samples by component) of the daemon's main thread."""
    shares: collections.Counter[str] = collections.Counter()
    busy = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [(m.group(2), m.group(1)) if (m := FRAME.match(x)) else ("", x)
                  for x in stack.split(";")]  # fmt: skip
        if not any(f.endswith(("daemon/serve.py", "bench/minimal.py")) for f, _ in frames):
            continue  # another thread: the invalidator, idle workers
        if "get_events" in frames[-1][1] or "_epoll_wait" in frames[-1][1]:
            idle += int(count)
            continue
        busy += int(count)
        for file, _ in reversed(frames):
            found = next((name for name, parts in COMPONENTS if any(p in file for p in parts)),
                         None)  # fmt: skip
            if found:
                shares[found] += int(count)
                break
        else:
            shares["other"] += int(count)
    return busy, idle, shares


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--provider", choices=("none", "passthrough", "encrypt", "minimal"),
                        default="passthrough",
                        help="none: the source without a provider (run.py's isofs contender); "
                        "minimal: the minimal pyfuse3 passthrough, for its request loop's share")
    parser.add_argument("--workload", choices=("create", "untar"), default="create")
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--tarball", type=Path,
                        help="for untar (default: Python's stdlib, no tests, no site-packages)")
    parser.add_argument("--py-spy", default=shutil.which("py-spy") or "py-spy")
    parser.add_argument("--rate", type=int, default=300)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw stacks here")
    parser.add_argument("--workdir", default=".")
    args = parser.parse_args()
    if not Path(args.py_spy).exists() and shutil.which(args.py_spy) is None:
        print(f"profile: py-spy not found ({args.py_spy}): pip install py-spy", file=sys.stderr)
        return 2
    if args.provider == "minimal":
        contender = Contender("minimal pyfuse3", _minimal)
    else:
        provider = None if args.provider == "none" else args.provider
        contender = Contender(args.provider, _isofs_mount(provider, *ONE_VIEW))
    work = Path(tempfile.mkdtemp(prefix="isofs-profile-", dir=args.workdir))
    raw = args.raw or work / "raw.txt"
    try:
        with contender_mount(contender, work) as mnt:
            record = [args.py_spy, "record", "-p", str(daemon_pid(mnt)), "--rate",
                      str(args.rate), "--format", "raw", "-o", str(raw)]  # fmt: skip
            spy = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                time.sleep(1.5)  # py-spy attached
                started = time.perf_counter()
                if args.workload == "create":
                    subprocess.run([PY, "-c", CREATE, str(mnt), str(args.files)], check=True)
                else:
                    tarball = args.tarball or work / "tree.tar"
                    if args.tarball is None:
                        stdlib = Path(os.__file__).parent
                        subprocess.run(["tar", "-cf", str(tarball), "--exclude=__pycache__",
                                        "--exclude=site-packages", "--exclude=test", "-C",
                                        str(stdlib), "."], check=True)  # fmt: skip
                    subprocess.run(["tar", "-xf", str(tarball), "-C", str(mnt)], check=True)
                took = time.perf_counter() - started
            finally:
                spy.send_signal(signal.SIGINT)
                spy.wait(timeout=60)
        if not raw.exists():
            print(f"profile: py-spy wrote no samples (exit {spy.returncode})", file=sys.stderr)
            return 1
        busy, idle, shares = components(raw)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{args.provider}, {args.workload}: {took:.2f} s under py-spy ({args.rate} Hz); daemon "
          f"main thread {busy} busy samples, {idle} idle")  # fmt: skip
    for name, count in shares.most_common():
        print(f"  {100 * count / max(busy, 1):5.1f}%  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
