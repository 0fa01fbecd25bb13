"""bench/compress.py runs end to end (--quick), reads back what it wrote, and cleans up.

Never a timing: the assertions are about the output's structure, the data every contender
gave back (compared with the source by the script, checked here through its JSON), and what
is left behind (mounts, loop devices, scratch files), also after a SIGTERM mid-run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import fuse_unavailable

from isofs.mountinfo import mount_table

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "compress.py"

FILESYSTEMS = ["native", "btrfs", "isofs-compress", "isofs-passthrough", "minimal"]
COLUMNS = [*FILESYSTEMS, "zstd", "zstd-T2"]
DATASET_ROWS = ["ratio-alloc", "ratio-apparent", "write", "read-cold", "read-warm"]
FS_ROWS = [
    *(f"{d}-{r}" for d in ("src", "bin") for r in DATASET_ROWS),
    "rr-coldish", "rr-cold", "rr-warm", "rw-lat-p50", "rw-lat-mean",
    "rw-written", "rw-written-2nd",
]  # fmt: skip
ZSTD_ROWS = [
    f"{d}-{r}"
    for d in ("src", "bin")
    for r in ("ratio-alloc", "ratio-apparent", "zstd-compress", "zstd-decompress")
]

pytestmark = [
    pytest.mark.mount,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: loop devices, mount, drop_caches"),
    pytest.mark.skipif(fuse_unavailable() is not None, reason=str(fuse_unavailable())),
]


def bench(*args: str | os.PathLike[str], **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
        **kwargs,
    )


def left_behind(workdir: Path) -> list[str]:
    """Mounts under workdir, loop devices backed by a file under it, files in it."""
    prefix = str(workdir) + "/"
    found = [f"mount {m.mountpoint}" for m in mount_table() if m.mountpoint.startswith(prefix)]
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    found += [f"loop {line}" for line in loops.splitlines() if prefix in line]
    found += [f"file {p}" for p in workdir.iterdir() if p.name != "result.json"]
    return found


def test_quick_run_reads_back_the_source_everywhere_and_cleans_up(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    result = work / "result.json"
    proc = bench("--quick", "--workdir", work, "--json", result)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out
    assert "Traceback" not in out

    doc = json.loads(result.read_text())
    assert doc["errors"] == {}
    assert doc["columns"] == COLUMNS
    for ds in ("src", "bin"):
        assert doc["datasets"][ds]["files"] > 0 and doc["datasets"][ds]["bytes"] > 0
    # What the script compared with the source, through every contender.
    checks = {"src": True, "bin": True, "rand-read": True, "rand-write": True}
    expected = {name: checks for name in FILESYSTEMS}
    expected["isofs-compress"] = {**checks, "rand-write zstd -d": True}
    expected["zstd"] = expected["zstd-T2"] = {"src": True, "bin": True}
    assert doc["verified"] == expected
    # Every contender measured every row it has, once (one repetition), with a real number.
    for name in FILESYSTEMS:
        assert set(FS_ROWS) <= set(doc["samples"][name]), name
    assert "rw-layer" in doc["samples"]["isofs-compress"]
    # What the writers' write calls passed: this process's 4 KiB pwrites exactly; each
    # daemon's writes of at least those 4 KiB (plus its replies to the kernel).
    assert doc["samples"]["native"]["rw-syscalls"] == [4.0]
    for daemon in ("isofs-compress", "isofs-passthrough", "minimal"):
        assert doc["samples"][daemon]["rw-syscalls"][0] > 4.0, daemon
    for name in ("zstd", "zstd-T2"):
        assert set(doc["samples"][name]) == set(ZSTD_ROWS), name
    for name, rows in doc["samples"].items():
        for row, values in rows.items():
            assert len(values) == 1 and values[0] > 0, (name, row, values)
    # Samples another process's drop_caches disturbed are named by index (warm rows only).
    for name, rows in doc["disturbed"].items():
        for row, indexes in rows.items():
            assert row.endswith("warm") and indexes == [0], (name, row, indexes)
    # isofs compress stores less than the logical bytes; passthrough stores them as they are.
    for ds in ("src", "bin"):
        assert doc["samples"]["isofs-compress"][f"{ds}-ratio-apparent"][0] > 1.0
        for plain in ("isofs-passthrough", "minimal"):
            assert doc["samples"][plain][f"{ds}-ratio-apparent"][0] == 1.0

    # The table: one header with every column, the ratio and target columns, every row.
    lines = out.splitlines()
    header = next(line for line in lines if line.split()[:2] == ["row", "unit"])
    assert header.split() == [
        "row", "unit", *COLUMNS, "|", "compress/btrfs", "compress/passthr", "minimal/btrfs",
        "target", "met",
    ]  # fmt: skip
    for row in [r["name"] for r in doc["rows"]]:
        assert any(line.split()[:1] == [row] for line in lines), row
    assert "read back equal to the source: 25 of 25 checks" in out
    assert "load after the run:" in out

    assert left_behind(work) == []


def test_sigterm_mid_run_unmounts_detaches_and_removes_everything(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    proc = bench("--quick", "--contenders", "btrfs,isofs-compress", "--workdir", work,
                 start_new_session=True)  # fmt: skip
    try:
        # Wait until the run has a loop device and a mount, then interrupt it.
        deadline = time.monotonic() + 300
        seen: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            seen = left_behind(work)
            if any(s.startswith("mount") for s in seen) and any(s.startswith("loop") for s in seen):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before anything was mounted"
        assert any(s.startswith("mount") for s in seen), seen
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, out
    assert "interrupted: cleaning up" in out
    assert "Traceback" not in out
    assert left_behind(work) == []


def test_an_unknown_contender_is_a_one_line_error(tmp_path: Path) -> None:
    proc = bench("--contenders", "native,ext5", "--workdir", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown contender(s) ext5" in out
    assert "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


def test_phases_run_only_the_rows_asked_for(tmp_path: Path) -> None:
    """--phases rand-write: only the random-write rows (and their read-back checks)."""
    work = tmp_path / "work"
    work.mkdir()
    result = work / "result.json"
    proc = bench("--quick", "--contenders", "isofs-compress", "--phases", "rand-write",
                 "--workdir", work, "--json", result)  # fmt: skip
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    doc = json.loads(result.read_text())
    assert doc["errors"] == {}
    rows = {"rw-lat-p50", "rw-lat-mean", "rw-written", "rw-written-2nd", "rw-syscalls",
            "rw-layer"}
    assert set(doc["samples"]["isofs-compress"]) == rows
    assert doc["verified"] == {"isofs-compress": {"rand-write": True, "rand-write zstd -d": True}}
    assert "bin" not in doc["datasets"]
    assert left_behind(work) == []


def test_an_unknown_phase_is_a_one_line_error(tmp_path: Path) -> None:
    proc = bench("--phases", "rand-write,rand-swim", "--workdir", tmp_path)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert "unknown phase(s) rand-swim" in out
    assert "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


def test_the_layer_random_write_measurement_reads_back_its_model() -> None:
    """bench/compress_rw.py (small: 8 MiB, 30 writes): its table, and the file it made
    reads back equal to the model of the writes."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "compress_rw.py"), "--file-size", "8",
         "--writes", "30", "--slice", "10", "--frame-size", "64"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [line.split()[0] for line in lines[2:6]] == ["1-10", "11-20", "21-30", "all"]
    assert lines[-1] == "read back equal to the model"
