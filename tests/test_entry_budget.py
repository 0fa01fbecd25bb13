"""The names the kernel remembers stay within the daemon's open-files limit (isofs.fuse.entries).

Every remembered inode holds a native O_PATH handle, and the kernel forgets a FUSE inode only
when its dentries go; past `--max-inodes` the daemon asks the kernel to drop its oldest
entries, so a tree larger than the open-files limit can be written and listed.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from conftest import fd_count, run_isofs, wait_until

from isofs.fuse.entries import LOW_WATER, EntryBudget, default_budget

# ------------------------------------------------------------------ unit, without FUSE


def test_past_the_budget_the_oldest_entries_are_dropped_in_one_batch() -> None:
    batches: list[list[tuple[int, bytes]]] = []
    budget = EntryBudget(100, batches.append)
    for nodeid in range(1, 101):
        budget.handed_out(1, b"f%d" % nodeid, nodeid)
    assert batches == [] and len(budget) == 100
    budget.handed_out(1, b"f101", 101)
    assert len(batches) == 1
    assert batches[0] == [(1, b"f%d" % n) for n in range(1, 102 - int(100 * LOW_WATER))]
    assert len(budget) == int(100 * LOW_WATER) and budget.dropped == len(batches[0])


def test_a_name_used_again_is_young_again_and_forget_removes_it() -> None:
    batches: list[list[tuple[int, bytes]]] = []
    budget = EntryBudget(10, batches.append)
    for nodeid in range(1, 11):
        budget.handed_out(1, b"n%d" % nodeid, nodeid)
    budget.handed_out(7, b"renamed", 1)  # looked up again, under another name
    budget.forgotten(2)
    budget.handed_out(1, b"n11", 11)
    budget.handed_out(1, b"n12", 12)
    assert batches == [[(1, b"n3"), (1, b"n4")]]  # 11 entries, kept down to 9
    assert (7, b"renamed") not in batches[0]


def test_the_default_budget_leaves_room_for_everything_else() -> None:
    assert default_budget(20_000) == 17_500
    assert default_budget(1024) == 512
    assert default_budget(1 << 20) == (1 << 20) - (1 << 17)


# ------------------------------------------------------------------ through a real mount


def status_of(mnt: os.PathLike[str]) -> dict:
    result = run_isofs("status", mnt, "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


@pytest.mark.mount
def test_a_tree_larger_than_the_budget_is_written_listed_and_read(mount_factory) -> None:
    budget, directories, per_directory = 300, 6, 150
    mount = mount_factory(None, None, "--default-view", "target", "--no-exec",
                          "--max-inodes", str(budget))  # fmt: skip
    baseline = fd_count(mount.pid)
    for d in range(directories):
        os.mkdir(mount.at(f"d{d}"))
        for f in range(per_directory):
            mount.at(f"d{d}", f"f{f}").write_bytes(b"%d/%d" % (d, f))
    status = status_of(mount.mnt)
    assert status["entry_budget"] == budget and status["entries_dropped"] > 0
    assert status["kernel_entries"] <= budget
    # the handles follow once the kernel has sent its FORGETs
    assert wait_until(lambda: fd_count(mount.pid) <= baseline + budget + 20, timeout=10), (
        fd_count(mount.pid)
    )
    listing = subprocess.run(["ls", "-lR", mount.mnt], capture_output=True, text=True)
    assert listing.returncode == 0, listing.stderr
    assert listing.stdout.count(" f") == directories * per_directory
    for d in range(directories):
        for f in range(0, per_directory, 7):
            assert mount.at(f"d{d}", f"f{f}").read_bytes() == b"%d/%d" % (d, f)
    assert wait_until(lambda: fd_count(mount.pid) <= baseline + budget + 20, timeout=10), (
        fd_count(mount.pid)
    )


def test_max_inodes_below_the_floor_is_one_line(tmp_path) -> None:
    result = run_isofs("mount", tmp_path, tmp_path / "mnt", "--max-inodes", "3")
    assert result.returncode == 2
    assert "at least 64" in result.stderr and "Traceback" not in result.stderr
