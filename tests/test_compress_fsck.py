"""`isofs fsck` and `isofs migrate` on compressed sources (no FUSE needed).

Sources are set up with `init_source` and their stack loaded as a mount would; damage is made
by editing native bytes, crashes by a lower file that fails in the middle of a write-out.
Every repaired file is checked with the stock `zstd -d` and read back through the stack.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from compress_support import source_like

from isofs import maintenance
from isofs.cli.passphrases import InteractiveSecrets
from isofs.core.sections import NativeFile
from isofs.daemon import runtime
from isofs.provider import CorruptData, SetupRequest, Stack
from isofs.source import init_source, load_stack, meta_dir_of
from isofs_providers.compress import CompressLayer
from isofs_providers.compress import format as fmt
from isofs_providers.compress.file import CompressedFile

F = 64 << 10
STAMP = "20240102T030405Z"
_CORPUS = source_like(2 << 20)


def text(length: int, seed: int = 0) -> bytes:
    start = (seed * 7919) % len(_CORPUS)
    return ((_CORPUS[start:] + _CORPUS) * (length // len(_CORPUS) + 2))[:length]


@pytest.fixture(autouse=True)
def _private_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    base = tmp_path / "run"
    base.mkdir()
    monkeypatch.setattr(runtime, "runtime_dir", lambda: base)


def make_source(tmp_path: Path, providers: list[str]) -> tuple[Path, Stack]:
    src = tmp_path / "src"
    src.mkdir()
    passfile = tmp_path / "pass"
    passfile.write_text("correct horse\n")
    request = SetupRequest(
        options={"scrypt_n": 2**14}, secrets=InteractiveSecrets(passfile=str(passfile))
    )
    init_source(str(src), providers, request, options={"compress": {"frame_size": "64K"}})
    stack = load_stack(meta_dir_of(src), SetupRequest(secrets=request.secrets))
    return src, stack


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, Stack]:
    return make_source(tmp_path, ["compress"])


def write_formatted(stack: Stack, path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        upper = stack.create(NativeFile(fd))
        for offset in range(0, len(data), 1 << 20):
            upper.write(offset, data[offset : offset + (1 << 20)])
        upper.flush()
    finally:
        os.close(fd)


def open_through(stack: Stack, path: Path, fd_holder: list[int]):
    fd = os.open(path, os.O_RDONLY)
    fd_holder.append(fd)
    upper = stack.open(NativeFile(fd))
    assert upper is not None, f"{path} is not formatted"
    return upper


def read_through(stack: Stack, path: Path) -> bytes:
    fds: list[int] = []
    try:
        upper = open_through(stack, path, fds)
        return upper.read(0, upper.size())
    finally:
        for fd in fds:
            os.close(fd)


def zstd_cli(path: Path) -> bytes:
    if shutil.which("zstd") is None:
        pytest.skip("zstd CLI not installed")
    result = subprocess.run(["zstd", "-d", "-c", "-q", path], capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_of(path: Path) -> fmt.Table:
    fd = os.open(path, os.O_RDONLY)
    try:
        return CompressLayer(F).open(NativeFile(fd)).table
    finally:
        os.close(fd)


def entry_at(path: Path, frame: int) -> int:
    """Offset of frame `frame`'s seek table entry (slot size, length, checksum)."""
    native = path.read_bytes()
    count = struct.unpack_from("<I", native, len(native) - 9)[0]
    return len(native) - 9 - 12 * count + 12 * (frame + 1)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x40]))


def only(report: maintenance.FsckReport) -> maintenance.FileReport:
    assert len(report.files) == 1, report.lines()
    return report.files[0]


def lost_ranges(found: maintenance.FileReport) -> list[tuple[int, int]]:
    return [r for p in found.problems if p.kind == "bad blocks" for r in p.ranges]


# ---------------------------------------------------------------------------- checks


def test_clean_source(source):
    src, stack = source
    sizes = {"empty": 0, "one": 1, "frame": F, "more": 3 * F + 500, "dir/big": 40 * F + 7}
    for name, size in sizes.items():
        write_formatted(stack, src / name, text(size, size))
    (src / "plain.txt").write_bytes(b"not compressed\n")
    report = maintenance.fsck(src, stack)
    assert report.clean, report.lines()
    assert (report.checked, report.formatted) == (6, 5)


def test_a_corrupted_frame_is_reported_contained_and_repaired(source):
    src, stack = source
    data = text(6 * F + 100, 1)
    path = src / "f"
    write_formatted(stack, path, data)
    table = table_of(path)
    flip(path, table.offsets[2] + 200)  # inside frame 2's compressed bytes
    found = only(maintenance.fsck(src, stack))
    assert found.line() == "f: bad blocks 2"
    assert lost_ranges(found) == [(2 * F, 3 * F)]
    fds: list[int] = []
    try:
        upper = open_through(stack, path, fds)
        with pytest.raises(CorruptData, match="frame 2"):
            upper.read(2 * F + 5, 10)
        with pytest.raises(CorruptData):
            upper.read(F, 2 * F)  # a read touching it
        assert upper.read(0, 2 * F) == data[: 2 * F]
        assert upper.read(3 * F, 4 * F) == data[3 * F :]
    finally:
        os.close(fds[0])
    damaged = path.read_bytes()
    report = maintenance.fsck(src, stack, repair=True, stamp=STAMP)
    found = only(report)
    assert found.repaired, found.line()
    assert (src / found.lost_found).read_bytes() == damaged
    expected = data[: 2 * F] + bytes(F) + data[3 * F :]
    assert read_through(stack, path) == expected == zstd_cli(path)
    assert maintenance.fsck(src, stack).clean


def test_a_corrupt_seek_table_is_rebuilt_without_loss(source):
    src, stack = source
    data = text(5 * F + 1, 2)
    path = src / "f"
    write_formatted(stack, path, data)
    patch(path, entry_at(path, 0), struct.pack("<I", 12345))  # frame 0's slot size
    found = only(maintenance.fsck(src, stack))
    assert found.kinds == ["corrupt seek table"], found.line()
    assert "slot sizes do not add up" in found.line()
    with pytest.raises(CorruptData):
        read_through(stack, path)
    found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert found.repaired and lost_ranges(found) == []
    assert read_through(stack, path) == data == zstd_cli(path)


def test_a_wrong_checksum_in_the_table_is_a_mismatch_that_repair_fixes(source):
    src, stack = source
    data = text(4 * F, 3)
    path = src / "f"
    write_formatted(stack, path, data)
    flip(path, entry_at(path, 1) + 8)  # frame 1's checksum
    found = only(maintenance.fsck(src, stack))
    assert found.line() == "f: seek table mismatch 1"
    found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert found.repaired
    assert read_through(stack, path) == data


def test_a_missing_seek_table_is_rebuilt_from_the_frames(source):
    src, stack = source
    data = text(7 * F + 3, 4)
    path = src / "f"
    write_formatted(stack, path, data)
    table = table_of(path)
    os.truncate(path, table.offsets[-1])  # everything but the table
    found = only(maintenance.fsck(src, stack))
    assert found.kinds == ["missing seek table"], found.line()
    found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert found.repaired and lost_ranges(found) == []
    assert read_through(stack, path) == data == zstd_cli(path)


def test_a_torn_tail_is_detected_and_cut_back_to_the_intact_frames(source):
    src, stack = source
    data = text(5 * F + 999, 5)
    path = src / "f"
    write_formatted(stack, path, data)
    table = table_of(path)
    os.truncate(path, table.offsets[5] + 40)  # inside the last frame
    found = only(maintenance.fsck(src, stack))
    assert found.kinds == ["missing seek table", "truncated tail"], found.line()
    assert f"the repaired file ends at byte {5 * F}" in found.line()
    found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert found.repaired
    assert read_through(stack, path) == data[: 5 * F] == zstd_cli(path)
    assert maintenance.fsck(src, stack).clean


def test_swapped_slots_are_put_back_in_order(source):
    src, stack = source
    data = text(4 * F, 6)
    path = src / "f"
    write_formatted(stack, path, data)
    o = table_of(path).offsets
    raw = bytearray(path.read_bytes())
    one, two = raw[o[1] : o[2]], raw[o[2] : o[3]]
    raw[o[1] : o[3]] = two + one
    path.write_bytes(bytes(raw))
    found = only(maintenance.fsck(src, stack))
    assert found.kinds[-1] == "seek table mismatch" and found.problems[-1].blocks == [1, 2]
    assert only(maintenance.fsck(src, stack, repair=True, stamp=STAMP)).repaired
    assert read_through(stack, path) == data


def test_header_damage_is_reported_not_repaired(source):
    src, stack = source
    path = src / "f"
    write_formatted(stack, path, text(2 * F))
    patch(path, 18, b"\x07")  # flags
    found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert found.kinds == ["corrupt header"] and not found.repaired
    assert "not repairable" in found.line()


# ---------------------------------------------------------------------- crashes


class CrashingFile(NativeFile):
    """A native file whose writes stop dead after `budget` bytes: the write in progress is
    torn (only its first part lands), as when the daemon is killed in the middle of it."""

    def __init__(self, fd: int, budget: int) -> None:
        super().__init__(fd)
        self.budget = budget
        self.log: list[tuple[int, int]] = []  # (offset, length) of every write

    def write(self, offset: int, data: bytes) -> int:
        self.log.append((offset, len(data)))
        if self.budget <= 0:
            raise KeyboardInterrupt("killed")
        part = memoryview(data)[: self.budget]
        super().write(offset, part)
        self.budget -= len(part)
        if len(part) < len(data):
            raise KeyboardInterrupt("killed")
        return len(data)

    def truncate(self, size: int) -> None:
        if self.budget <= 0:
            raise KeyboardInterrupt("killed")
        super().truncate(size)


IN_PLACE, GROWS = 2, 5  # frame 2 changes and fits its slot; frame 5 outgrows its slot


def _rewrite(path: Path, old: bytes, new: bytes, budget: int) -> CrashingFile:
    """Make the changes from `old` to `new` through a file that dies after `budget` bytes
    of writes."""
    fd = os.open(path, os.O_RDWR)
    try:
        lower = CrashingFile(fd, budget)
        upper = CompressLayer(F).open(lower)
        for start in (IN_PLACE * F, GROWS * F + 10, 20 * F, len(old)):
            end = len(new) if start == len(old) else start + 30_000
            upper.write(start, new[start:end])
        with contextlib.suppress(KeyboardInterrupt):
            upper.flush()
        return lower
    finally:
        os.close(fd)


def _in_place_tear(path: Path, old: bytes, new: bytes, table: fmt.Table) -> int:
    """A budget that dies in the middle of frame 2's in-place write (found by a dry run)."""
    log = _rewrite(path, old, new, 10**12).log
    before = 0
    for offset, length in log:
        if offset == table.offsets[IN_PLACE]:
            return before + length // 2
        before += length
    raise AssertionError(f"no in-place write of frame {IN_PLACE}: {log}")


@pytest.mark.parametrize(
    "fraction", [0, 0.0001, 0.02, 0.2, 0.45, 0.5, 0.55, 0.7, 0.9, 0.999, 1.0, None, "in place"]
)
def test_a_write_out_killed_midway_leaves_old_or_new_frames_that_fsck_recovers(
    tmp_path, source, fraction
):
    """Frame 5 outgrows its slot, frame 2 changes in place, 20 changes, the file grows: the
    rest of the file from frame 5 is laid out again. Killed after any number of bytes (in
    the middle of frame 2's in-place write too), every frame is afterwards old or new."""
    src, stack = source
    old = text(40 * F + 1000, 7)
    new = bytearray(old)
    new[IN_PLACE * F : IN_PLACE * F + 30_000] = bytes(30_000)  # compresses better: fits
    new[GROWS * F + 10 : GROWS * F + 30_010] = os.urandom(30_000)  # no longer fits
    new[20 * F : 20 * F + 30_000] = text(30_000, 5)
    new += text(3 * F, 99)  # the file grows
    new = bytes(new)
    path = src / "victim"
    write_formatted(stack, path, old)
    dry = tmp_path / "dry"
    shutil.copy(path, dry)
    total = sum(length for _, length in _rewrite(dry, old, new, 10**12).log)
    if fraction == "in place":
        shutil.copy(path, dry)
        budget = _in_place_tear(dry, old, new, table_of(path))
    else:
        budget = 10**12 if fraction is None else int(total * fraction)  # 1.0: dies at truncate
    _rewrite(path, old, new, budget)
    report = maintenance.fsck(src, stack, repair=True, stamp=STAMP)
    if fraction is None:
        assert report.clean, report.lines()
    if report.clean:
        assert read_through(stack, path) in (old, new)
        return
    found = only(report)
    assert found.repaired, found.line()
    lost = {n for start, end in lost_ranges(found) for n in range(start // F, end // F)}
    assert lost == set(), found.line()
    result = read_through(stack, path)
    assert len(result) in (len(old), len(new))
    for index in range(-(-len(result) // F)):
        got = result[index * F : (index + 1) * F]
        if index in lost:
            assert got == bytes(len(got)), index
        else:
            choices = (old[index * F : (index + 1) * F], new[index * F : (index + 1) * F])
            assert got in choices, index
    assert result == zstd_cli(path)
    assert maintenance.fsck(src, stack).clean


def _with_headroom(stack: Stack, path: Path, frames: int) -> bytes:
    """A file of `frames` full frames of text whose frame 0 outgrew its slot once: every
    slot has headroom (so that a later growth can borrow its neighbours' room)."""
    data = bytearray(text(frames * F, 3))
    write_formatted(stack, path, bytes(data))
    data[10:5010] = os.urandom(5000)
    fd = os.open(path, os.O_RDWR)
    try:
        upper = CompressLayer(F).open(NativeFile(fd))
        upper.write(10, data[10:5010])
        upper.flush()
    finally:
        os.close(fd)
    return bytes(data)


def _write_changes(upper: CompressedFile, old: bytes, new: bytes) -> None:
    """Write every 4 KiB piece that differs between `old` and `new` (and what `new` adds)."""
    for start in range(0, len(new), 4096):
        if new[start : start + 4096] != old[start : start + 4096]:
            upper.write(start, new[start : start + 4096])


def _rewrite_changes(
    path: Path, states: list[bytes], budget: int
) -> tuple[CrashingFile, dict[str, object], int]:
    """Go from each state to the next, a flush after each, through a file that dies after
    `budget` bytes of writes; the lower file, the layer's counters and the bytes the
    write-outs before the last one wrote."""
    fd = os.open(path, os.O_RDWR)
    try:
        lower = CrashingFile(fd, budget)
        layer = CompressLayer(F)
        upper = layer.open(lower)
        assert isinstance(upper, CompressedFile)
        before_last = 0
        with contextlib.suppress(KeyboardInterrupt):
            for old, new in itertools.pairwise(states):
                before_last = sum(length for _, length in lower.log)
                _write_changes(upper, old, new)
                upper.flush()
        return lower, layer.statistics(), before_last
    finally:
        os.close(fd)


CRASH_CASES = {  # case: (headroom everywhere before, local runs, relayouts of the rest)
    "run": (True, 1, 0),
    "run and append": (True, 1, 1),
    "run and relayout": (True, 1, 1),
    "relayout": (False, 0, 1),
    "whole file": (False, 0, 1),
}


@pytest.mark.parametrize("case", list(CRASH_CASES))
def test_a_relayout_killed_in_or_after_any_write_leaves_old_or_new_frames(
    tmp_path, source, case, monkeypatch
):
    """Killed at the start, in the middle and at the end of every write of a write-out (and
    at its final cut), every frame is afterwards old or new and none is lost (appended
    frames may be only partly there, as with any append). The write-outs: frame 20 outgrows
    its headroom and borrows its neighbours' room (a local run, staged past the seek table,
    then copied down) while frame 2 changes in place; the same with an append; with frame 30
    outgrowing what a run may borrow too, so that the rest of the file is laid out again
    (staged where slots move less than their size, moved up in place back to front past
    that); in a file without headroom (the rest from frame 20); and the whole file, when a
    growth follows an earlier rewrite."""
    src, stack = source
    path = src / "victim"
    roomy, runs, relayouts = CRASH_CASES[case]
    if roomy:
        old = _with_headroom(stack, path, 40)
    else:
        old = text(40 * F, 3)
        write_formatted(stack, path, old)
    pristine = tmp_path / "pristine"
    shutil.copy(path, pristine)
    new = bytearray(old)
    new[2 * F : 2 * F + 8192] = bytes(8192)  # compresses better: fits in place
    new[20 * F + 4096 : 20 * F + 16384] = os.urandom(12288)  # more than any headroom
    if case == "run and append":
        new += text(2 * F + 100, 5)
    if case == "run and relayout":
        new[30 * F : 31 * F] = os.urandom(F)
        monkeypatch.setattr("isofs_providers.compress.file.LOCAL_LIMIT", 200_000)
    states = [old, bytes(new)]
    if case == "whole file":  # frame 2 alone first: the growth then follows a rewrite
        states.insert(1, old[: 2 * F] + new[2 * F : 3 * F] + old[3 * F :])
    dry = tmp_path / "dry"
    shutil.copy(pristine, dry)
    lower, stats, start = _rewrite_changes(dry, states, 10**12)
    assert read_through(stack, dry) == states[-1]
    assert (stats["local_relayouts"], stats["tail_rewrites"]) == (runs, relayouts), stats
    moved_from = 0 if case == "whole file" else 20
    sizes, sizes_before = table_of(dry).slot_sizes, table_of(pristine).slot_sizes
    if not roomy:
        assert sizes[:moved_from] == sizes_before[:moved_from]
        moved = zip(sizes[moved_from:], sizes_before[moved_from:], strict=True)
        assert all(a > b for a, b in moved), "headroom from where the relayout starts"
    budgets = {10**12, sum(length for _, length in lower.log)}  # no kill; killed at the cut
    done = 0
    for _, length in lower.log:
        if done >= start:
            budgets.update({done, done + 1, done + length // 2, done + length - 1})
        done += length
    before, after = states[-2], states[-1]
    for budget in sorted(budgets):
        shutil.copy(pristine, path)
        _rewrite_changes(path, states, budget)
        report = maintenance.fsck(src, stack, repair=True, stamp=STAMP)
        if not report.clean:
            found = only(report)
            assert found.repaired and lost_ranges(found) == [], (budget, found.line())
        result = read_through(stack, path)
        if case == "run and append":  # appended frames are written in order, not staged
            assert len(before) <= len(result) <= len(after), budget
            assert len(result) % F in (0, 100), budget
        else:
            assert len(result) in (len(before), len(after)), budget
        for index in range(-(-len(result) // F)):
            got = result[index * F : (index + 1) * F]
            choices = (before[index * F : (index + 1) * F], after[index * F : (index + 1) * F])
            assert got in choices, (budget, index)
        assert result == zstd_cli(path), budget
        shutil.rmtree(src / ".isofs" / "lost+found", ignore_errors=True)


# ---------------------------------------------------------------------- migrate


def test_migrate_compresses_plain_files_holes_included(source):
    src, stack = source
    files = {"a.txt": text(300_000, 8), "rand": os.urandom(200_000), "empty": b"", "one": b"x"}
    for name, data in files.items():
        (src / name).write_bytes(data)
    with open(src / "sparse", "wb") as f:
        f.seek(100 * F)
        f.write(b"end")
    report = maintenance.migrate(src, stack)
    assert report.exit_code == 0, report.summary()
    for name, data in files.items():
        assert read_through(stack, src / name) == data == zstd_cli(src / name), name
    sparse = read_through(stack, src / "sparse")
    assert sparse == bytes(100 * F) + b"end"
    assert (src / "sparse").stat().st_size < 101 * 120
    assert (src / "a.txt").stat().st_size < 300_000 // 2
    assert maintenance.fsck(src, stack).clean


@pytest.mark.parametrize("providers", [["encrypt", "compress"], ["compress", "encrypt"]])
def test_two_layer_stacks_check_clean_and_repair_through_encryption(tmp_path, providers):
    src, stack = make_source(tmp_path, providers)
    data = text(6 * F + 17, 9)
    write_formatted(stack, src / "f", data)
    (src / "plain").write_bytes(text(100_000))
    assert maintenance.migrate(src, stack).exit_code == 0
    assert maintenance.fsck(src, stack).clean
    assert read_through(stack, src / "f") == data
    assert read_through(stack, src / "plain") == text(100_000)
    if providers[0] == "encrypt":
        # compress under encryption: cut off the compressed file's seek table through the
        # encrypt layer; fsck names the compress layer's damage and repairs it
        fd = os.open(src / "f", os.O_RDWR)
        try:
            encrypted = stack.layers[0].open(NativeFile(fd))
            compressed = stack.layers[1].open(encrypted)
            assert isinstance(compressed, CompressedFile)
            encrypted.truncate(compressed.table.offsets[-1])
            encrypted.flush()
        finally:
            os.close(fd)
        found = only(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
        assert found.kinds == ["missing seek table"] and found.repaired
        assert read_through(stack, src / "f") == data
