"""`mount.fuse.isofs`: `mount -t fuse.isofs` and /etc/fstab lines, through the real mount(8).

The first tests check how the helper reads mount(8)'s arguments; the mounted ones install
the helper as /sbin/mount.fuse.isofs (only for the test, unless it is already there), mount an
encrypted source with the stock util-linux `mount`, look at both views from other processes,
and end the mount with `umount` and `isofs umount`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Mount, daemons_for, fuse_unavailable, mounted_at, pid_is_running, wait_until

from isofs.cli import fstab as mount_helper
from isofs.cli.fstab import (
    MS_NOATIME,
    MS_NODEV,
    MS_NOEXEC,
    MS_NOSUID,
    MS_RELATIME,
    MS_STRICTATIME,
    HelperError,
    plan_mount,
    split_options,
    wanted_bits,
)
from isofs.daemon import runtime

HELPER_LINK = Path("/sbin/mount.fuse.isofs")
PASSPHRASE = "mount helper test passphrase"
PLAINTEXT = b"fstab-mounted plaintext\n"
ENCRYPT_MAGIC = b"ISOFSENC"


def plan_args(options: str) -> list[str]:
    return plan_mount(["/src", "/mnt", "-o", options]).isofs_args[3:]


# ------------------------------------------------------------ reading mount(8)'s arguments


def test_split_options_keeps_commas_inside_double_quotes() -> None:
    assert split_options('ro,target="exe=/usr/bin/vim,uid=1000",,level=3') == [
        "ro",
        'target="exe=/usr/bin/vim,uid=1000"',
        "level=3",
    ]


def test_unbalanced_quote_is_refused() -> None:
    with pytest.raises(HelperError, match="unbalanced double quote"):
        split_options('target="exe=/usr/bin/vim,uid=1000')


def test_the_mount_flags_map_to_isofs_mount_options() -> None:
    options = (
        "ro,allow_other,policy=/etc/isofs/policy.toml,default_view=target,no_exec,"
        "cache_size=256M,log=/var/log/isofs.log,passfile=/root/pass,keyfile=/root/key,"
        "extpass=pass show vault"
    )
    assert plan_args(options) == [
        "--read-only", "--allow-other", "--policy=/etc/isofs/policy.toml",
        "--default-view=target", "--no-exec", "--cache-size=256M",
        "--log=/var/log/isofs.log", "--passfile=/root/pass", "--keyfile=/root/key",
        "--extpass=pass show vault",
    ]  # fmt: skip


def test_any_other_option_becomes_a_flag_of_the_same_name() -> None:
    assert plan_args("level=9,fast_mode,block_size=64K,extpass=-x") == [
        "--level=9", "--fast-mode", "--block-size=64K", "--extpass=-x",
    ]  # fmt: skip


def test_quoted_rules_keep_their_commas() -> None:
    assert plan_args('target="exe=/usr/bin/vim,uid=1000",ignore="ancestor=/usr/bin/rsync"') == [
        "--target=exe=/usr/bin/vim,uid=1000", "--ignore=ancestor=/usr/bin/rsync",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "option",
    ["rw", "defaults", "auto", "noauto", "user", "users", "nouser", "user=alice", "_netdev",
     "nofail", "x-systemd.automount", "x-gvfs-show", "comment=boot", "async",
     "default_permissions"],
)  # fmt: skip
def test_options_mount8_owns_are_dropped(option: str) -> None:
    plan = plan_mount(["/src", "/mnt", "-o", f"{option},passfile=/p"])
    assert plan.isofs_args == ["mount", "/src", "/mnt", "--passfile=/p"]
    assert plan.flag_edits == []


def test_per_mount_flags_are_applied_in_order_over_the_current_ones() -> None:
    fuse_default = MS_NOSUID | MS_NODEV | MS_RELATIME
    plan = plan_mount(["/src", "/mnt", "-o", "noexec,suid,noatime,nosuid,dev"])
    assert plan.isofs_args == ["mount", "/src", "/mnt"]
    assert wanted_bits(fuse_default, plan.flag_edits) == MS_NOSUID | MS_NOEXEC | MS_NOATIME
    strict = plan_mount(["/src", "/mnt", "-o", "noatime,strictatime,exec"]).flag_edits
    assert wanted_bits(fuse_default | MS_NOEXEC, strict) == MS_NOSUID | MS_NODEV | MS_STRICTATIME


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ("sync", "sync is not supported"),
        ("dirsync", "dirsync is not supported"),
        ("foreground", "foreground cannot be used"),
        ("fore", "fore cannot be used"),
        ("masterkey=00ff", "use keyfile= or passfile="),
        ("secrets_fd=3", "secrets_fd cannot be used"),
        ("-x=1", "not a mount option name"),
        ('target="exe=/a,uid=0', "unbalanced double quote"),
        ('target=exe="/a"', "quote the whole value"),
    ],
)
def test_refused_options_give_one_line(
    options: str, fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert mount_helper.main(["/src", "/mnt", "-o", options]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isofs: error: "), captured.err
    assert fragment in lines[0]
    assert captured.out == ""


def test_helper_arguments_mount8_may_pass() -> None:
    plan = plan_mount(["/src", "/mnt", "-s", "-n", "-fv", "-o", "ro", "-t", "fuse.isofs"])
    assert plan.isofs_args == ["mount", "/src", "/mnt", "--read-only"]
    assert plan.fake and plan.verbose
    with pytest.raises(HelperError, match="namespace"):
        plan_mount(["/src", "/mnt", "-N", "1234"])
    with pytest.raises(HelperError, match="usage"):
        plan_mount(["/src"])


# ------------------------------------------------------------ through the real mount(8)


@pytest.fixture
def helper_installed() -> Iterator[Path]:
    """/sbin/mount.fuse.isofs pointing at this interpreter's console script."""
    if fuse_unavailable():
        pytest.skip(fuse_unavailable() or "")
    if os.geteuid() != 0:
        pytest.skip("installing a mount helper in /sbin needs root")
    script = Path(sys.executable).with_name("mount.fuse.isofs")
    if not script.exists():
        pytest.fail(f"{script} is missing: reinstall the package (./dev setup)", pytrace=False)
    created = False
    if HELPER_LINK.is_symlink() or HELPER_LINK.exists():
        if HELPER_LINK.resolve() != script.resolve():
            pytest.fail(
                f"{HELPER_LINK} is another install ({HELPER_LINK.resolve()}), not {script}",
                pytrace=False,
            )
    else:
        HELPER_LINK.symlink_to(script)
        created = True
    try:
        yield HELPER_LINK
    finally:
        if created:
            HELPER_LINK.unlink()


class HelperMounts:
    """Mount points this test mounted through mount(8); all torn down at the end."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.known: list[tuple[Path, Path, Path]] = []

    def expect(self, source: Path, mnt: Path, log: Path) -> None:
        self.known.append((source, mnt, log))

    def teardown(self) -> list[str]:
        problems: list[str] = []
        for source, mnt, log in reversed(self.known):
            real = os.path.realpath(mnt)
            record = runtime.MountRecord.load(real)
            pids = [record.pid] if record is not None else daemons_for(real)
            if not pids and mounted_at(real):
                subprocess.run(["umount", "-l", real], capture_output=True)
            for pid in pids:
                problems += Mount(source, Path(real), log, pid).teardown()
        return problems


@pytest.fixture
def helper_mounts(tmp_path: Path, helper_installed: Path) -> Iterator[HelperMounts]:
    mounts = HelperMounts(tmp_path)
    try:
        yield mounts
    finally:
        os.chdir(tmp_path)  # never keep a mount busy through the working directory
        problems = mounts.teardown()
    if problems:
        pytest.fail("teardown: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def encrypted(tmp_path: Path, isofs_cli) -> tuple[Path, Path, Path]:  # type: ignore[no-untyped-def]
    """(source initialised with the encrypt provider, its passfile, an empty mount point)."""
    source, mnt, passfile = tmp_path / "src", tmp_path / "mnt", tmp_path / "passphrase"
    source.mkdir()
    mnt.mkdir()
    passfile.write_text(PASSPHRASE + "\n")
    passfile.chmod(0o600)
    result = isofs_cli(
        "init", source, "--provider", "encrypt", "--scrypt-n", "16384", "--passfile", passfile
    )
    assert result.returncode == 0, result.stderr
    return source, passfile, mnt


def run_mount(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["mount", *(os.fspath(a) for a in args)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip


def write_from_another_process(run_python, path: Path, data: bytes) -> None:  # type: ignore[no-untyped-def]
    run_python("import sys; open(sys.argv[1], 'wb').write(bytes.fromhex(sys.argv[2]))",
               path, data.hex())  # fmt: skip


def read_from_another_process(run_python, path: Path) -> bytes:  # type: ignore[no-untyped-def]
    result = run_python("import sys; print(open(sys.argv[1], 'rb').read().hex())", path)
    return bytes.fromhex(result.stdout.strip())


def read_bytes_as(exe: str, path: Path) -> bytes:
    """`exe path` in a child process: what a process running `exe` reads."""
    return subprocess.run([exe, os.fspath(path)], capture_output=True, check=True).stdout


def daemon_of(mnt: Path) -> int:
    record = runtime.MountRecord.load(os.path.realpath(mnt))
    assert record is not None, f"no mount record for {mnt}"
    assert pid_is_running(record.pid)
    return record.pid


def assert_daemon_ended(mnt: Path, pid: int) -> None:
    assert not mounted_at(mnt)
    assert wait_until(lambda: not pid_is_running(pid), timeout=10), f"daemon {pid} still runs"
    assert runtime.MountRecord.load(os.path.realpath(mnt)) is None


def assert_one_line_error(result: subprocess.CompletedProcess[str], fragment: str) -> None:
    assert result.returncode != 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isofs: error: "), result.stderr
    assert fragment in lines[0], lines[0]


pytest_mount = pytest.mark.mount


@pytest_mount
def test_mount_t_fuse_isofs_shows_both_views_and_umount_ends_the_daemon(
    encrypted, helper_mounts, tmp_path, run_python
) -> None:  # type: ignore[no-untyped-def]
    source, passfile, mnt = encrypted
    log = tmp_path / "isofs.log"
    cat = os.path.realpath(shutil.which("cat") or "/usr/bin/cat")
    helper_mounts.expect(source, mnt, log)
    rule = f'ignore="exe={cat},uid=0"'
    options = f"passfile={passfile},default_view=target,log={log},{rule},noatime"
    result = run_mount("-t", "fuse.isofs", source, mnt, "-o", options)
    assert result.returncode == 0, result.stderr + log.read_text(errors="replace")
    assert runtime.mounted_filesystems()[str(mnt)] == "fuse.isofs"
    pid = daemon_of(mnt)

    write_from_another_process(run_python, mnt / "note.txt", PLAINTEXT)
    assert read_from_another_process(run_python, mnt / "note.txt") == PLAINTEXT
    native = read_bytes_as(cat, mnt / "note.txt")  # the quoted ignore rule: cat is native
    assert native.startswith(ENCRYPT_MAGIC) and PLAINTEXT not in native
    assert native == (source / "note.txt").read_bytes()
    assert (mount_helper.mount_point_bits(str(mnt)) or 0) & MS_NOATIME

    result = subprocess.run(["umount", mnt], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert_daemon_ended(mnt, pid)
    assert (source / "note.txt").read_bytes() == native


@pytest_mount
def test_fstab_line_mounts_and_isofs_umount_ends_the_daemon(
    encrypted, helper_mounts, tmp_path, run_python, isofs_cli
) -> None:  # type: ignore[no-untyped-def]
    source, passfile, mnt = encrypted
    log = tmp_path / "isofs.log"
    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# an isofs line, as in /etc/fstab\n"
        f"{source} {mnt} fuse.isofs "
        f"defaults,noauto,nofail,passfile={passfile},default_view=target,no_exec,log={log} 0 0\n"
    )
    helper_mounts.expect(source, mnt, log)
    result = run_mount("--fstab", fstab, mnt)
    assert result.returncode == 0, result.stderr + log.read_text(errors="replace")
    pid = daemon_of(mnt)

    write_from_another_process(run_python, mnt / "fstab.txt", PLAINTEXT)
    assert read_from_another_process(run_python, mnt / "fstab.txt") == PLAINTEXT
    native = (source / "fstab.txt").read_bytes()
    assert native.startswith(ENCRYPT_MAGIC) and PLAINTEXT not in native

    result = isofs_cli("umount", mnt)
    assert result.returncode == 0, result.stderr
    assert_daemon_ended(mnt, pid)


@pytest_mount
def test_per_mount_flags_reach_the_kernel(helper_mounts, tmp_path, run_python) -> None:  # type: ignore[no-untyped-def]
    source, mnt, log = tmp_path / "plain", tmp_path / "mnt", tmp_path / "isofs.log"
    source.mkdir()
    mnt.mkdir()
    script = source / "tool.sh"
    script.write_text("#!/bin/sh\necho ran\n")
    script.chmod(0o755)
    helper_mounts.expect(source, mnt, log)
    result = run_mount("-t", "fuse.isofs", source, mnt, "-o", f"noexec,strictatime,log={log}")
    assert result.returncode == 0, result.stderr + log.read_text(errors="replace")
    flags = mount_helper.mount_point_bits(str(mnt))
    assert flags == MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_STRICTATIME
    ran = run_python(
        "import subprocess, sys\n"
        "try:\n    subprocess.run([sys.argv[1]])\nexcept PermissionError:\n    print('refused')\n",
        mnt / "tool.sh",
    )
    assert ran.stdout.strip() == "refused"
    assert subprocess.run([script], capture_output=True, text=True).stdout == "ran\n"
    result = subprocess.run(["umount", mnt], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest_mount
@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        ("no_such_option=1", "unrecognized arguments: --no-such-option=1"),
        ("sync", "sync is not supported"),
        ("default_view=sideways", "invalid choice: 'sideways'"),
        ("passfile={wrong}", "wrong passphrase or key file"),
    ],
)
def test_bad_options_through_mount8_give_one_line(
    encrypted, helper_mounts, tmp_path, option, fragment
) -> None:  # type: ignore[no-untyped-def]
    source, passfile, mnt = encrypted
    wrong = tmp_path / "wrong"
    wrong.write_text("not the passphrase\n")
    log = tmp_path / "isofs.log"
    helper_mounts.expect(source, mnt, log)
    options = f"passfile={passfile},log={log},{option.format(wrong=wrong)}"
    result = run_mount("-t", "fuse.isofs", source, mnt, "-o", options)
    assert_one_line_error(result, fragment)
    assert not mounted_at(mnt)
    assert wait_until(lambda: not daemons_for(mnt), timeout=5), "a daemon is still running"
    assert runtime.MountRecord.load(os.path.realpath(mnt)) is None
