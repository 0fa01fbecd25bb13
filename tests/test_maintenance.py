"""`isofs passwd`, `isofs fsck` and `isofs migrate` on a source directory (no FUSE needed).

The maintenance functions are driven directly (fast, precise assertions); the CLI runs in child
processes for exit codes and the one-line error contract.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from isofs import maintenance
from isofs.cli.passphrases import InteractiveSecrets, KeyFileSecrets
from isofs.core.sections import NativeFile
from isofs.daemon import runtime
from isofs.maintenance import MaintenanceError, migration
from isofs.provider import ProviderError, SetupRequest, Stack
from isofs.source import init_source, load_stack, meta_dir_of
from isofs_providers.encrypt import BLOCK_SIZE, HEADER_SIZE, NATIVE_BLOCK_SIZE

BS = BLOCK_SIZE
NB = NATIVE_BLOCK_SIZE
HDR = HEADER_SIZE
CHEAP = {"scrypt_n": 2**14}
STAMP = "20240102T030405Z"


def write_pass(path: Path, secret: str) -> Path:
    path.write_text(secret + "\n")
    return path


def make_source(tmp_path: Path, passphrase: str = "correct horse", **options: object) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    passfile = write_pass(tmp_path / "pass", passphrase)
    init_source(
        str(src),
        ["encrypt"],
        SetupRequest(
            options={**CHEAP, **options},
            secrets=InteractiveSecrets(passfile=str(passfile)),
            report={},
        ),
    )
    return src


def request(passfile: Path) -> SetupRequest:
    return SetupRequest(secrets=InteractiveSecrets(passfile=str(passfile)))


def stack_of(src: Path, passfile: Path) -> Stack:
    return load_stack(meta_dir_of(src), request(passfile))


def write_formatted(stack: Stack, path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        upper = stack.create(NativeFile(fd))
        upper.write(0, data)
        upper.flush()
    finally:
        os.close(fd)


def read_through(stack: Stack, path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        upper = stack.open(NativeFile(fd))
        assert upper is not None, f"{path} is not formatted"
        return upper.read(0, upper.size())
    finally:
        os.close(fd)


def is_formatted(stack: Stack, path: Path) -> bool:
    fd = os.open(path, os.O_RDONLY)
    try:
        return stack.open(NativeFile(fd)) is not None
    finally:
        os.close(fd)


def patch(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip_bit(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def run_cli(*args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isofs", *(os.fspath(a) for a in args)],  # type: ignore[misc]
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
        **kwargs,  # type: ignore[arg-type]
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("isofs: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def src(tmp_path: Path) -> Path:
    return make_source(tmp_path)


@pytest.fixture
def passfile(tmp_path: Path, src: Path) -> Path:
    return tmp_path / "pass"


@pytest.fixture
def stack(src: Path, passfile: Path) -> Stack:
    return stack_of(src, passfile)


@pytest.fixture(autouse=True)
def _private_runtime_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Mount records written by tests go to a private directory, never the real one."""
    base = tmp_path / "run"
    base.mkdir()
    monkeypatch.setattr(runtime, "runtime_dir", lambda: base)


def data_of(length: int, seed: int = 1) -> bytes:
    return bytes((i * 7 + seed) % 251 for i in range(length))


# ============================================================================== passwd


def test_passwd_rewraps_key_and_data_still_decrypts(
    tmp_path: Path, src: Path, passfile: Path, stack: Stack
) -> None:
    payload = data_of(3 * BS + 100)
    write_formatted(stack, src / "f", payload)
    new = write_pass(tmp_path / "new", "battery staple")

    changed = maintenance.change_passphrase(
        src, InteractiveSecrets(passfile=str(passfile)), InteractiveSecrets(passfile=str(new))
    )

    assert changed == ["encrypt"]
    with pytest.raises(ProviderError, match="wrong passphrase"):
        stack_of(src, passfile)
    assert read_through(stack_of(src, new), src / "f") == payload


def test_passwd_wrong_old_passphrase_leaves_keystore_identical(tmp_path: Path, src: Path) -> None:
    keystore = meta_dir_of(src) / "encrypt.json"
    before = keystore.read_bytes()
    wrong = write_pass(tmp_path / "wrong", "not it")
    new = write_pass(tmp_path / "new", "battery staple")
    with pytest.raises(ProviderError, match="wrong passphrase"):
        maintenance.change_passphrase(
            src, InteractiveSecrets(passfile=str(wrong)), InteractiveSecrets(passfile=str(new))
        )
    assert keystore.read_bytes() == before


def test_passwd_with_master_key_and_key_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    report: dict[str, str] = {}
    init_source(
        str(src),
        ["encrypt"],
        SetupRequest(
            options=CHEAP,
            secrets=InteractiveSecrets(passfile=str(write_pass(tmp_path / "p", "first"))),
            report=report,
        ),
    )
    keyfile = tmp_path / "key.bin"
    keyfile.write_bytes(b"\x00binary key\nwith newline\n")
    old = InteractiveSecrets(masterkey=report["master_key"])
    # The new passphrase from a key file source: its exact bytes.
    maintenance.change_passphrase(src, old, KeyFileSecrets(keyfile))
    stack = load_stack(meta_dir_of(src), SetupRequest(options={"keyfile": str(keyfile)}))
    assert not stack.is_identity


def test_passwd_cli(tmp_path: Path, src: Path, passfile: Path) -> None:
    new = write_pass(tmp_path / "new", "battery staple")
    keystore = meta_dir_of(src) / "encrypt.json"
    before = keystore.read_bytes()

    wrong = run_cli("passwd", src, "--passfile", new, "--new-passfile", passfile)
    assert_one_line_error(wrong, "wrong passphrase")
    assert keystore.read_bytes() == before

    no_new = run_cli("passwd", src, "--passfile", passfile)
    assert_one_line_error(no_new, "--new-passfile")

    ok = run_cli("passwd", src, "--passfile", passfile, "--new-passfile", new)
    assert ok.returncode == 0, ok.stderr
    assert "no data re-encrypted" in ok.stdout
    stack_of(src, new)

    plain = tmp_path / "plain"
    plain.mkdir()
    assert_one_line_error(
        run_cli("passwd", plain, "--passfile", new, "--new-passfile", new), "not an isofs source"
    )


# ============================================================================== fsck


def populate(stack: Stack, src: Path) -> dict[str, bytes]:
    files = {
        "empty": b"",
        "small": b"hello",
        "one-block": data_of(BS, 2),
        "dir/three-and-a-bit": data_of(3 * BS + 123, 3),
        "dir/deeper/five": data_of(5 * BS, 4),
    }
    for rel, data in files.items():
        write_formatted(stack, src / rel, data)
    (src / "dir" / "plain.txt").write_bytes(b"never formatted\n")
    return files


def only_report(report: maintenance.FsckReport) -> maintenance.FileReport:
    assert len(report.files) == 1, report.lines()
    return report.files[0]


def test_fsck_clean_source(src: Path, stack: Stack) -> None:
    populate(stack, src)
    report = maintenance.fsck(src, stack)
    assert report.clean, report.lines()
    assert report.exit_code == 0
    assert (report.checked, report.formatted, report.damaged) == (6, 5, 0)
    assert report.summary().endswith("6 files checked, 5 formatted, 0 damaged")


def test_fsck_names_a_flipped_bit_block(src: Path, stack: Stack) -> None:
    files = populate(stack, src)
    target = src / "dir" / "deeper" / "five"
    flip_bit(target, HDR + 3 * NB + 100)

    report = maintenance.fsck(src, stack)

    found = only_report(report)
    assert found.path == "dir/deeper/five"
    assert found.kinds == ["bad blocks"]
    assert found.problems[0].blocks == [3]
    assert found.line() == "dir/deeper/five: bad blocks 3"
    assert report.exit_code == 1 and report.damaged == 1
    assert files  # the others are fine


def test_fsck_finds_swapped_blocks(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", data_of(5 * BS))
    raw = bytearray((src / "f").read_bytes())
    one = raw[HDR + 1 * NB : HDR + 2 * NB]
    three = raw[HDR + 3 * NB : HDR + 4 * NB]
    raw[HDR + 1 * NB : HDR + 2 * NB] = three
    raw[HDR + 3 * NB : HDR + 4 * NB] = one
    (src / "f").write_bytes(bytes(raw))

    found = only_report(maintenance.fsck(src, stack))
    assert found.problems[0].blocks == [1, 3]


def test_fsck_finds_truncated_tail(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "torn", data_of(3 * BS))
    os.truncate(src / "torn", HDR + 2 * NB + 10)  # 10 bytes of a third block: no valid layout

    found = only_report(maintenance.fsck(src, stack))
    assert found.kinds == ["truncated tail"]
    assert "not a valid" in found.problems[0].detail
    assert found.valid_native_size == HDR + 2 * NB


def test_fsck_finds_tail_torn_inside_a_block(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "torn", data_of(3 * BS))
    os.truncate(src / "torn", HDR + 2 * NB + 1000)  # a valid size, but block 2 is cut short

    found = only_report(maintenance.fsck(src, stack))
    assert found.kinds == ["bad blocks"]
    assert found.problems[0].blocks == [2]


def test_fsck_finds_corrupt_header(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", data_of(2 * BS))
    patch(src / "f", 12, b"\x01")  # a reserved byte: right magic and version, corrupt header

    found = only_report(maintenance.fsck(src, stack))
    assert found.kinds == ["corrupt header"]


def test_fsck_changed_file_id_fails_every_block(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", data_of(2 * BS + 5))
    flip_bit(src / "f", 20)  # the file id: bound into every block's AAD
    found = only_report(maintenance.fsck(src, stack))
    assert found.problems[0].blocks == [0, 1, 2]


def test_fsck_reports_every_bad_block_of_a_big_file(src: Path, stack: Stack) -> None:
    blocks = 600  # more than one 1 MiB check read
    write_formatted(stack, src / "big", data_of(blocks * BS))
    for n in (0, 255, 256, 599):
        flip_bit(src / "big", HDR + n * NB + 40)
    found = only_report(maintenance.fsck(src, stack))
    assert found.problems[0].blocks == [0, 255, 256, 599]


def test_fsck_repair_zeroes_bad_blocks_and_keeps_original(src: Path, stack: Stack) -> None:
    payload = data_of(4 * BS + 10)
    write_formatted(stack, src / "dir" / "f", payload)
    os.link(src / "dir" / "f", src / "dir" / "link")
    flip_bit(src / "dir" / "f", HDR + 1 * NB + 500)
    flip_bit(src / "dir" / "f", HDR + 4 * NB + 20)  # the short last block
    damaged = (src / "dir" / "f").read_bytes()
    inode = os.stat(src / "dir" / "f").st_ino

    report = maintenance.fsck(src, stack, repair=True, stamp=STAMP)

    found = only_report(report)
    assert found.repaired and found.problems[0].blocks == [1, 4]
    assert found.lost_found == f".isofs/lost+found/dir/f.{STAMP}"
    assert (src / found.lost_found).read_bytes() == damaged
    assert "repaired, original in .isofs/lost+found/dir/f." in found.line()
    expected = payload[:BS] + bytes(BS) + payload[2 * BS : 4 * BS] + bytes(10)
    assert read_through(stack, src / "dir" / "f") == expected
    assert os.stat(src / "dir" / "f").st_ino == inode  # repaired in place: link kept
    assert read_through(stack, src / "dir" / "link") == expected
    assert report.exit_code == 1  # something was found (and repaired)
    again = maintenance.fsck(src, stack)
    assert again.clean, again.lines()


def test_fsck_repair_cuts_torn_tail(src: Path, stack: Stack) -> None:
    payload = data_of(3 * BS)
    write_formatted(stack, src / "torn", payload)
    os.truncate(src / "torn", HDR + 2 * NB + 7)

    found = only_report(maintenance.fsck(src, stack, repair=True, stamp=STAMP))

    assert found.repaired
    assert os.path.getsize(src / "torn") == HDR + 2 * NB
    assert read_through(stack, src / "torn") == payload[: 2 * BS]
    assert os.path.getsize(src / found.lost_found) == HDR + 2 * NB + 7
    assert maintenance.fsck(src, stack).clean


def test_fsck_repair_twice_keeps_both_originals(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", data_of(2 * BS))
    flip_bit(src / "f", HDR + 10)
    first = only_report(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    flip_bit(src / "f", HDR + NB + 10)
    second = only_report(maintenance.fsck(src, stack, repair=True, stamp=STAMP))
    assert first.lost_found != second.lost_found
    assert second.lost_found is not None and second.lost_found.endswith(f"{STAMP}-1")


def test_fsck_does_not_repair_corrupt_header(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", data_of(BS))
    patch(src / "f", 10, b"\x00\x02")  # flags
    before = (src / "f").read_bytes()
    found = only_report(maintenance.fsck(src, stack, repair=True))
    assert not found.repaired and "not repairable" in (found.note or "")
    assert (src / "f").read_bytes() == before
    assert not (meta_dir_of(src) / "lost+found").exists()


def test_fsck_refuses_a_source_mounted_in_place(
    monkeypatch: pytest.MonkeyPatch, src: Path, passfile: Path
) -> None:
    real = os.path.realpath(src)
    monkeypatch.setattr(runtime, "mounted_filesystems", lambda: {"/": "ext4", real: "fuse.isofs"})
    with pytest.raises(MaintenanceError, match=r"isofs mount point \(mounted in place.*--force"):
        maintenance.fsck_source(src, request(passfile))
    with pytest.raises(MaintenanceError, match="mounted in place"):
        maintenance.migrate_source(src, request(passfile))
    assert maintenance.fsck_source(src, request(passfile), force=True).clean


def test_fsck_refuses_a_source_with_a_mount_record(
    monkeypatch: pytest.MonkeyPatch, src: Path, passfile: Path
) -> None:
    real = os.path.realpath(src)
    mountpoint = "/elsewhere/mnt"
    runtime.MountRecord(
        pid=os.getpid(), source=real, mountpoint=mountpoint, log="", control=""
    ).save()
    table = {"/": "ext4", mountpoint: "fuse.isofs"}
    monkeypatch.setattr(runtime, "mounted_filesystems", lambda: table)
    with pytest.raises(MaintenanceError, match=f"mounted on {mountpoint}"):
        maintenance.check_not_mounted(src)
    with pytest.raises(MaintenanceError, match=f"mounted on {mountpoint}"):
        maintenance.check_not_mounted(src / "sub")  # inside a mounted source
    table.pop(mountpoint)  # a stale record of an unmounted source does not count
    maintenance.check_not_mounted(src)


def test_fsck_and_migrate_exclude_each_other(src: Path, passfile: Path) -> None:
    with (
        maintenance.exclusive(meta_dir_of(src)),
        pytest.raises(MaintenanceError, match="another isofs fsck or migrate"),
    ):
        maintenance.fsck_source(src, request(passfile))


def test_fsck_cli(tmp_path: Path, src: Path, passfile: Path, stack: Stack) -> None:
    populate(stack, src)
    clean = run_cli("fsck", src, "--passfile", passfile)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.strip().endswith("6 files checked, 5 formatted, 0 damaged")
    assert clean.stderr == ""  # no progress bar when stderr is not a terminal

    flip_bit(src / "dir" / "deeper" / "five", HDR + 2 * NB + 1)
    os.truncate(src / "small", HDR + 3)
    damaged = run_cli("fsck", src, "--passfile", passfile)
    assert damaged.returncode == 1
    lines = damaged.stdout.strip().splitlines()
    assert lines[0] == "dir/deeper/five: bad blocks 2"
    assert lines[1].startswith("small: truncated tail (")
    assert lines[2].endswith("6 files checked, 5 formatted, 2 damaged")

    as_json = run_cli("fsck", src, "--passfile", passfile, "--json", "--repair")
    assert as_json.returncode == 1
    document = json.loads(as_json.stdout)
    assert document["damaged"] == 2 and document["repaired"] == 2
    assert document["files"][0]["problems"] == [
        {"kind": "bad blocks", "detail": "failed authentication", "blocks": [2]}
    ]
    assert run_cli("fsck", src, "--passfile", passfile).returncode == 0

    wrong = write_pass(tmp_path / "wrong", "nope")
    assert_one_line_error(run_cli("fsck", src, "--passfile", wrong), "wrong passphrase")
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_one_line_error(run_cli("fsck", plain, "--passfile", passfile), "not an isofs source")
    assert_one_line_error(
        run_cli("fsck", tmp_path / "missing", "--passfile", passfile), "not a directory"
    )


def test_cli_refuses_mounted_source(tmp_path: Path, src: Path, passfile: Path) -> None:
    # A process that looks like a daemon serving our source on a real mount point ("/").
    fake = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "isofs", "mount",
         os.path.realpath(src), "/"],
    )  # fmt: skip
    try:
        for command in ("fsck", "migrate"):
            result = run_cli(command, src, "--passfile", passfile)
            assert_one_line_error(result, f"is mounted on / (daemon pid {fake.pid})", "--force")
        forced = run_cli("fsck", src, "--passfile", passfile, "--force")
        assert forced.returncode == 0, forced.stderr
    finally:
        fake.kill()
        fake.wait()


# ============================================================================== migrate


def test_migrate_formats_plain_files_preserving_metadata(src: Path, stack: Stack) -> None:
    files = {
        "a.txt": b"hello world\n",
        "empty": b"",
        "sub/dir/blocky": data_of(2 * BS),
        "sub/big": os.urandom((1 << 20) * 2 + 12345),  # more than one 1 MiB chunk
    }
    for rel, data in files.items():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        (src / rel).write_bytes(data)
    os.chmod(src / "a.txt", 0o640)
    os.chmod(src / "sub" / "big", 0o4755)
    os.utime(src / "a.txt", ns=(1_000_000_123, 2_000_000_456))
    xattrs = True
    try:
        os.setxattr(src / "a.txt", "user.isofs-test", b"kept")
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        xattrs = False
    if os.geteuid() == 0:
        os.chown(src / "sub" / "big", 1234, 5678)
        os.chmod(src / "sub" / "big", 0o4755)  # chown cleared the set-uid bit
    before = {rel: os.stat(src / rel) for rel in files}
    warnings: list[str] = []

    report = maintenance.migrate(src, stack, warn=warnings.append)

    assert warnings == []
    assert sorted(report.migrated) == sorted(files)
    assert report.bytes == sum(len(d) for d in files.values())
    assert report.exit_code == 0
    after = {rel: os.stat(src / rel) for rel in files}  # before reading (atime)
    for rel, data in files.items():
        path = src / rel
        assert path.read_bytes()[:8] == b"ISOFSENC", rel
        assert read_through(stack, path) == data, rel
        now, old = after[rel], before[rel]
        assert now.st_mode == old.st_mode, rel
        assert (now.st_uid, now.st_gid) == (old.st_uid, old.st_gid), rel
        assert now.st_mtime_ns == old.st_mtime_ns, rel
        assert now.st_atime_ns == old.st_atime_ns, rel
    assert os.stat(src / "a.txt").st_mtime_ns == 2_000_000_456
    if xattrs:
        assert os.getxattr(src / "a.txt", "user.isofs-test") == b"kept"
    assert not list(src.rglob(".isofs-migrate.*"))
    assert maintenance.fsck(src, stack).clean


def test_migrate_skips_hard_links_formatted_files_and_metadata(src: Path, stack: Stack) -> None:
    (src / "linked").write_bytes(b"two names")
    os.link(src / "linked", src / "other-name")
    write_formatted(stack, src / "already", b"secret")
    already = (src / "already").read_bytes()
    already_ino = os.stat(src / "already").st_ino
    meta_before = sorted(p.name for p in meta_dir_of(src).iterdir())
    warnings: list[str] = []

    report = maintenance.migrate(src, stack, warn=warnings.append)

    assert report.migrated == []
    assert report.formatted == 1
    assert sorted(report.hard_linked) == ["linked", "other-name"]
    assert "2 hard-linked skipped (migrating would split the link)" in report.summary()
    assert len(warnings) == 2 and all("hard-linked" in w for w in warnings)
    assert (src / "linked").read_bytes() == b"two names"
    assert os.stat(src / "linked").st_nlink == 2
    assert (src / "already").read_bytes() == already
    assert os.stat(src / "already").st_ino == already_ino
    assert sorted(p.name for p in meta_dir_of(src).iterdir()) == meta_before


def test_migrate_is_idempotent(src: Path, stack: Stack) -> None:
    (src / "f").write_bytes(data_of(BS + 1))
    first = maintenance.migrate(src, stack)
    assert first.migrated == ["f"]
    native = (src / "f").read_bytes()
    ino = os.stat(src / "f").st_ino
    second = maintenance.migrate(src, stack)
    assert (second.migrated, second.formatted) == ([], 1)
    assert (src / "f").read_bytes() == native and os.stat(src / "f").st_ino == ino


def test_migrate_leaves_damaged_formatted_file_alone(src: Path, stack: Stack) -> None:
    write_formatted(stack, src / "f", b"x" * 100)
    patch(src / "f", 12, b"\x07")  # corrupt header: still formatted, never re-formatted
    before = (src / "f").read_bytes()
    report = maintenance.migrate(src, stack)
    assert report.migrated == [] and report.formatted == 1
    assert (src / "f").read_bytes() == before


def test_migrate_keeps_holes_and_content_of_sparse_file(src: Path, stack: Stack) -> None:
    path = src / "sparse"
    with open(path, "wb") as f:
        f.seek(10 * BS + 7)
        f.write(b"middle")
        f.truncate(40 * BS + 3)
    expected = path.read_bytes()
    maintenance.migrate(src, stack)
    assert read_through(stack, path) == expected
    assert maintenance.fsck(src, stack).clean


def test_migrate_skips_files_that_change_while_copied(
    monkeypatch: pytest.MonkeyPatch, src: Path, stack: Stack
) -> None:
    (src / "busy").write_bytes(b"v1" * 1000)
    real_import = migration._import

    def copy_then_change(*args):  # type: ignore[no-untyped-def]
        real_import(*args)
        with open(src / "busy", "ab") as f:
            f.write(b"more")

    monkeypatch.setattr(migration, "_import", copy_then_change)
    warnings: list[str] = []
    report = maintenance.migrate(src, stack, warn=warnings.append)
    assert report.migrated == [] and report.skipped == [("busy", "it changed while being copied")]
    assert (src / "busy").read_bytes() == b"v1" * 1000 + b"more"
    assert not list(src.glob(".isofs-migrate.*"))


def test_migrate_rename_failure_keeps_original_and_rerun_completes(
    monkeypatch: pytest.MonkeyPatch, src: Path, stack: Stack
) -> None:
    contents = {name: data_of(BS * 2 + i, i) for i, name in enumerate(("a", "b", "c"))}
    for name, data in contents.items():
        (src / name).write_bytes(data)
    real_rename = os.rename
    calls = {"n": 0}

    def failing_rename(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.EIO, "simulated failure")
        return real_rename(*args, **kwargs)

    monkeypatch.setattr(os, "rename", failing_rename)
    warnings: list[str] = []
    report = maintenance.migrate(src, stack, warn=warnings.append)
    monkeypatch.setattr(os, "rename", real_rename)

    assert report.migrated == ["a", "c"]
    assert report.failed == [("b", "simulated failure")]
    assert report.exit_code == 1
    assert warnings == ["b: cannot migrate: simulated failure"]
    assert (src / "b").read_bytes() == contents["b"]  # the original, untouched
    assert not list(src.glob(".isofs-migrate.*"))

    rerun = maintenance.migrate(src, stack)
    assert rerun.migrated == ["b"] and rerun.formatted == 2
    for name, data in contents.items():
        assert read_through(stack, src / name) == data


CRASHING_MIGRATE = """
import os, sys
from isofs import maintenance
from isofs.provider import SetupRequest
from isofs.cli.passphrases import InteractiveSecrets
real_rename = os.rename
calls = []
def crash(*args, **kwargs):
    calls.append(args)
    if len(calls) == 2:
        os._exit(9)  # a crash: no cleanup runs
    return real_rename(*args, **kwargs)
os.rename = crash
request = SetupRequest(secrets=InteractiveSecrets(passfile=sys.argv[2]))
maintenance.migrate_source(sys.argv[1], request)
"""


def test_migrate_crash_leaves_original_and_rerun_cleans_stale_temp(
    src: Path, passfile: Path, stack: Stack
) -> None:
    contents = {name: data_of(BS * 3 + i, i) for i, name in enumerate(("a", "b", "c"))}
    for name, data in contents.items():
        (src / name).write_bytes(data)

    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_MIGRATE, str(src), str(passfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert crashed.returncode == 9, crashed.stderr

    assert is_formatted(stack, src / "a")
    assert (src / "b").read_bytes() == contents["b"]  # crashed before its rename
    assert (src / "c").read_bytes() == contents["c"]
    stale = list(src.glob(".isofs-migrate.*"))
    assert len(stale) == 1

    fsck_report = run_cli("fsck", src, "--passfile", passfile)
    assert fsck_report.returncode == 1
    assert f"{stale[0].name}: stale temporary file (interrupted migrate)" in fsck_report.stdout

    result = run_cli("migrate", src, "--passfile", passfile)
    assert result.returncode == 0, result.stderr
    assert "2 files migrated" in result.stdout and "1 already formatted" in result.stdout
    assert "1 stale temporary file removed" in result.stdout
    assert not list(src.glob(".isofs-migrate.*"))
    for name, data in contents.items():
        assert read_through(stack, src / name) == data
    assert run_cli("fsck", src, "--passfile", passfile).returncode == 0


def test_fsck_repair_removes_stale_temp_file(src: Path, stack: Stack) -> None:
    (src / ".isofs-migrate.0123456789ab").write_bytes(b"partial")
    report = maintenance.fsck(src, stack, repair=True)
    assert only_report(report).kinds == ["stale temporary file"]
    assert not (src / ".isofs-migrate.0123456789ab").exists()
    assert maintenance.fsck(src, stack).clean


def test_migrate_with_encrypted_names_skips_bookkeeping(tmp_path: Path) -> None:
    src = make_source(tmp_path, encrypt_names=True)
    stack = stack_of(src, tmp_path / "pass")
    transform = stack.name_transform
    assert transform is not None
    (src / "d").mkdir()
    key = transform.new_dir_key()
    (src / "d" / transform.dir_key_name).write_bytes(key)
    (src / "d" / "plain name").write_bytes(b"content")

    report = maintenance.migrate(src, stack)

    assert report.migrated == ["d/plain name"]
    assert (src / "d" / transform.dir_key_name).read_bytes() == key
    assert maintenance.fsck(src, stack).clean
    (src / "d" / transform.dir_key_name).write_bytes(b"short")
    found = only_report(maintenance.fsck(src, stack))
    assert found.kinds == ["corrupt directory key"]


def test_migrate_cli_errors(tmp_path: Path, src: Path, passfile: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    assert_one_line_error(run_cli("migrate", plain, "--passfile", passfile), "not an isofs source")
    wrong = write_pass(tmp_path / "wrong", "nope")
    assert_one_line_error(run_cli("migrate", src, "--passfile", wrong), "wrong passphrase")
    assert_one_line_error(run_cli("migrate", src), "a passphrase is needed")
