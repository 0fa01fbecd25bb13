#!/usr/bin/env python3
"""FUSE requests per operation, for isofs and its peers, counted by the kernel's tracepoints.

For each contender (mounted here in a scratch directory) and each operation, a fresh process
does the operation N times while `isofs.bench.fusetrace.FuseTrace` records the mount's
requests; the table shows requests per operation by opcode and the median round trip.

Usage (root): python bench/requests.py [--contenders ...] [--n 200]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from isofs.bench.fusetrace import FuseTrace, RequestCounts
from isofs.mountinfo import mount_table

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
PASS = b"bench passphrase\n"


def mounted(path: Path) -> bool:
    return any(e.mountpoint == str(path) for e in mount_table())


def wait_mounted(path: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not mounted(path):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{path} did not mount")
        time.sleep(0.05)


@dataclass
class Contender:
    name: str
    mount: Callable[[Path, Path, Path], subprocess.Popen[bytes] | None]
    #: Prefix that runs a command in the view whose requests are counted.
    runner: tuple[str, ...] = ()
    #: Run commands with the mount as working directory (`isofs exec --view target` then
    #: enters that mount's target-view daemon, whose own mount is traced).
    in_mount: bool = False
    mount_point: Path | None = None


def isofs(*args: str) -> list[str]:
    return [PY, "-m", "isofs", *args]


def _isofs_mount(provider: str | None, *extra: str, names: bool = True):  # type: ignore[no-untyped-def]
    def mount(work: Path, src: Path, mnt: Path) -> None:
        passfile = work / "pass"
        passfile.write_bytes(PASS)
        if provider is not None:
            init = ["init", str(src), "--provider", provider]
            if provider == "encrypt":
                init += ["--passfile", str(passfile), "--scrypt-n", "16384"]
                if names:
                    init.append("--encrypt-names")
            subprocess.run(isofs(*init), check=True, capture_output=True)
        cmd = ["mount", str(src), str(mnt), *extra]
        if provider == "encrypt":
            cmd += ["--passfile", str(passfile)]
        subprocess.run(isofs(*cmd), check=True, capture_output=True)
        return None

    return mount


def _minimal(work: Path, src: Path, mnt: Path) -> subprocess.Popen[bytes]:
    argv = [PY, "-m", "isofs.bench.minimal", str(src), str(mnt)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_mounted(mnt)
    return proc


def _gocryptfs(work: Path, src: Path, mnt: Path) -> None:
    passfile = work / "pass"
    passfile.write_bytes(PASS)
    subprocess.run(["gocryptfs", "-init", "-q", "-scryptn", "14", "-passfile", str(passfile),
                    str(src)], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["gocryptfs", "-q", "-passfile", str(passfile), str(src), str(mnt)],
                   check=True, capture_output=True)  # fmt: skip
    return None


TARGET = tuple(isofs("exec", "--view", "target", "--"))
#: A copy of the interpreter that the two-view mount's rule makes a target (its children too).
TARGET_PYTHON = str(Path(tempfile.gettempdir()) / f"isofs-requests-python-{os.getpid()}")
RUN_CHILD = "import subprocess, sys; sys.exit(subprocess.run(sys.argv[1:]).returncode)"
CONTENDERS = {
    "minimal": Contender("minimal pyfuse3", _minimal),
    "gocryptfs": Contender("gocryptfs", _gocryptfs),
    "isofs-pass": Contender("isofs passthrough", _isofs_mount("passthrough", "--no-exec")),
    "isofs-enc": Contender(
        "isofs encrypt, one view",
        _isofs_mount("encrypt", "--default-view", "target", "--no-exec"),
    ),
    "isofs-enc-2v": Contender(
        "isofs encrypt, two views (target by rule)",
        _isofs_mount("encrypt", "--target", f"ancestor={TARGET_PYTHON}"),
        runner=(TARGET_PYTHON, "-c", RUN_CHILD),
    ),
    "isofs-enc-exec": Contender(
        "isofs encrypt, isofs exec --view target (own mount)",
        _isofs_mount("encrypt"), runner=TARGET, in_mount=True,
    ),
    "isofs-enc-2v-native": Contender(
        "isofs encrypt, two views (native)", _isofs_mount("encrypt")
    ),
}

# Operations: (setup in the mount, the timed command's Python body, units per run).
SETUP_FILES = """
import os, sys
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
for i in range(int(sys.argv[2])):
    with open(os.path.join(d, f"f{i:05}"), "wb") as f:
        f.write(b"x" * 100)
"""
OPERATIONS: dict[str, tuple[str, str]] = {
    "create+write+close": ("", """
import os, sys
d = sys.argv[1]
os.makedirs(d, exist_ok=True)
for i in range(int(sys.argv[2])):
    with open(os.path.join(d, f"new{i:05}"), "wb") as f:
        f.write(b"y" * 100)
"""),
    "stat": ("files", """
import os, sys
d = sys.argv[1]
for i in range(int(sys.argv[2])):
    os.stat(os.path.join(d, f"f{i:05}"))
"""),
    "unlink": ("files", """
import os, sys
d = sys.argv[1]
for i in range(int(sys.argv[2])):
    os.unlink(os.path.join(d, f"f{i:05}"))
"""),
}


def make_tar(n: int) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i in range(n):
            data = b"z" * (200 + i % 3000)
            info = tarfile.TarInfo(f"t/sub{i % 10}/file{i:05}")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@contextlib.contextmanager
def contender_mount(contender: Contender, work: Path) -> Iterator[Path]:
    src, mnt = work / "src", work / "mnt"
    src.mkdir()
    mnt.mkdir()
    proc = contender.mount(work, src, mnt)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=20)
        for _ in range(100):
            if not mounted(mnt):
                break
            time.sleep(0.05)


def run_in(contender: Contender, *argv: str) -> None:
    cwd = str(contender.mount_point) if contender.in_mount else "/"
    subprocess.run([*contender.runner, *argv], check=True, capture_output=True, cwd=cwd)


def tracer(contender: Contender, mnt: Path) -> FuseTrace:
    """The trace of the mount the contender's commands reach."""
    if not contender.in_mount:
        return FuseTrace.for_mount(mnt)
    status = json.loads(subprocess.run(isofs("status", str(mnt), "--json"), check=True,
                                       capture_output=True, text=True).stdout)  # fmt: skip
    pid = status["target_view_daemon"]
    for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            major, minor = (int(x) for x in fields[2].split(":"))
            return FuseTrace((major << 20) | minor)
    raise RuntimeError("the target-view daemon has no mount")


def measure(contender: Contender, mnt: Path, n: int) -> dict[str, RequestCounts]:
    results: dict[str, RequestCounts] = {}
    contender.mount_point = mnt
    if contender.in_mount:
        run_in(contender, "true")  # starts the target-view daemon
    for name, (setup, body) in OPERATIONS.items():
        d = mnt / name.replace("+", "_")
        if setup == "files":
            run_in(contender, PY, "-c", SETUP_FILES, str(d), str(n))
            subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], check=True)
            time.sleep(1.2)  # name and attribute timeouts run out
        with tracer(contender, mnt) as trace:
            run_in(contender, PY, "-c", body, str(d), str(n))
        results[name] = trace.result
    tar = mnt.parent / "t.tar"
    tar.write_bytes(make_tar(n))
    with tracer(contender, mnt) as trace:
        run_in(contender, "tar", "-xf", str(tar), "-C", str(mnt))
    results["tar -x (per file)"] = trace.result
    time.sleep(1.2)
    with tracer(contender, mnt) as trace:
        run_in(contender, "ls", "-lR", str(mnt / "t"))
    results["ls -l (per entry)"] = trace.result
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contenders", default=",".join(CONTENDERS))
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    shutil.copy2(os.path.realpath(sys.executable), TARGET_PYTHON)
    table: dict[str, dict[str, RequestCounts]] = {}
    for key in args.contenders.split(","):
        contender = CONTENDERS[key]
        work = Path(tempfile.mkdtemp(prefix="isofs-requests-"))
        try:
            with contender_mount(contender, work) as mnt:
                table[contender.name] = measure(contender, mnt, args.n)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    os.unlink(TARGET_PYTHON)
    units = {"ls -l (per entry)": args.n + 10 + 1}
    for contender, results in table.items():
        print(f"\n## {contender}")
        for op, counts in results.items():
            per = units.get(op, args.n)
            print(f"  {op:20} {counts.per(per):6.2f} requests ({counts.describe(per)}),"
                  f" median round trip {counts.median_us():.0f} us"
                  + (" [trace lost events]" if counts.lost else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
