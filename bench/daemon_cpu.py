#!/usr/bin/env python3
"""Daemon CPU time per operation (user + system, from /proc/PID/stat), for isofs and the
minimal pyfuse3 passthrough: what each request costs the daemon, less sensitive to a busy
machine than wall time. Usage (root): python bench/daemon_cpu.py [--n 2000]"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from requests import CONTENDERS, contender_mount

TICK = os.sysconf("SC_CLK_TCK")
WORKLOADS = {
    "create+write+close": """
import os, sys
d = sys.argv[1]; os.makedirs(d, exist_ok=True)
for i in range(int(sys.argv[2])):
    with open(os.path.join(d, f"c{i:05}"), "wb") as f: f.write(b"y" * 100)
""",
    "stat (after 1.1 s)": """
import os, sys, time
d = sys.argv[1]; time.sleep(1.1)
for i in range(int(sys.argv[2])): os.stat(os.path.join(d, f"c{i:05}"))
""",
    "ls -l (after 1.1 s)": """
import subprocess, sys, time
time.sleep(1.1)
subprocess.run(["ls", "-l", sys.argv[1]], stdout=subprocess.DEVNULL, check=True)
""",
    "unlink": """
import os, sys
d = sys.argv[1]
for i in range(int(sys.argv[2])): os.unlink(os.path.join(d, f"c{i:05}"))
""",
}


def daemon_pid(mnt: Path) -> int:
    pattern = f"(isofs.bench.minimal|--foreground).* {mnt}$"
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True)
    return int(out.stdout.split()[0])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):  # threads included
        f = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(f[11]) + int(f[12])
    del fields
    return total / TICK


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contenders", default="minimal,isofs-pass,isofs-enc")
    parser.add_argument("--n", type=int, default=2000)
    args = parser.parse_args()
    for key in args.contenders.split(","):
        contender = CONTENDERS[key]
        work = Path(tempfile.mkdtemp(prefix="isofs-cpu-"))
        try:
            with contender_mount(contender, work) as mnt:
                pid = daemon_pid(mnt)
                line = []
                for name, body in WORKLOADS.items():
                    before, t0 = cpu_seconds(pid), time.perf_counter()
                    subprocess.run([*contender.runner, sys.executable, "-c", body,
                                    str(mnt / "d"), str(args.n)], check=True, cwd="/")  # fmt: skip
                    wall = time.perf_counter() - t0
                    used = cpu_seconds(pid) - before
                    per_cpu, per_wall = used / args.n * 1e6, wall / args.n * 1e6
                    line.append(f"{name} {per_cpu:.0f} us cpu ({per_wall:.0f} wall)")
                print(f"{contender.name:34}", " | ".join(line), flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
