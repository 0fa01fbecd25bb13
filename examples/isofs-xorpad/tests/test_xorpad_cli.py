"""xorpad through the command line (`python -m isofs` in a child process, no FUSE).

The command line builds its options from `Provider.options` and calls the provider's fsck
and passwd capabilities: nothing in isofs knows xorpad by name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from isofs_xorpad import HEADER_CHECKSUM_MISMATCH, XorPadLayer, XorPadProvider

from isofs.cli.passphrases import InteractiveSecrets
from isofs.provider import ProviderError, SetupRequest


def isofs(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "isofs", *(os.fspath(a) for a in args)],  # type: ignore[arg-type]
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("isofs: error: "), result.stderr
    return lines[0]


class FdFile:
    """A RandomAccessFile over a file descriptor, to format a native file by hand."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def read(self, offset: int, size: int) -> bytes:
        return os.pread(self.fd, size, offset)

    def write(self, offset: int, data: bytes) -> int:
        return os.pwrite(self.fd, data, offset)

    def truncate(self, size: int) -> None:
        os.ftruncate(self.fd, size)

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def flush(self) -> None:
        pass


def checked_file(path: Path, content: bytes, *flipped_bits: int) -> bytes:
    """Write a checked xorpad file natively, then flip header bits; return the intact bytes."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        XorPadLayer(checksum=True).create(FdFile(fd)).write(0, content)
    finally:
        os.close(fd)
    intact = path.read_bytes()
    damaged = bytearray(intact)
    for bit in flipped_bits:
        damaged[bit // 8] ^= 0x80 >> (bit % 8)
    path.write_bytes(bytes(damaged))
    return intact


def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir(parents=True)
    return src


def test_init_help_lists_the_providers_options(tmp_path: Path) -> None:
    src = source(tmp_path)
    result = isofs("init", src, "--provider", "xorpad", "--help")
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())  # help text may be wrapped anywhere
    for option in XorPadProvider.options:
        if "init" in option.scopes:
            assert option.flag in shown
            assert " ".join(option.help.split()) in shown
    assert "--ignore-checksums" not in shown  # a mount option
    assert not (src / ".isofs").exists()


def test_init_records_the_seed(tmp_path: Path) -> None:
    src = source(tmp_path)
    result = isofs("init", src, "--provider", "xorpad", "--seed", "7")
    assert result.returncode == 0, result.stderr
    config = json.loads((src / ".isofs" / "config.json").read_text())
    assert config["stack"] == [{"provider": "xorpad", "config": {"version": 1, "seed": 7}}]
    other = source(tmp_path / "other")
    assert "seed" in one_line_error(isofs("init", other, "--provider", "xorpad", "--seed", "-1"))
    assert not (other / ".isofs" / "config.json").exists()


def test_fsck_names_the_examples_damage_and_repairs_one_bit(tmp_path: Path) -> None:
    src = source(tmp_path)
    assert isofs("init", src, "--provider", "xorpad", "--checksum").returncode == 0
    checked_file(src / "two-bits", b"two bits gone", 40, 100)
    intact = checked_file(src / "one-bit", b"one bit gone", 70)
    checked_file(src / "untouched", b"intact")

    result = isofs("fsck", src)
    assert result.returncode == 1, result.stderr
    found = [line for line in result.stdout.splitlines() if HEADER_CHECKSUM_MISMATCH in line]
    assert len(found) == 2, result.stdout
    assert any("two-bits" in line for line in found), result.stdout
    assert any("one-bit" in line for line in found), result.stdout
    assert "untouched" not in result.stdout

    repair = isofs("fsck", src, "--repair")
    assert repair.returncode == 1, repair.stderr
    assert (src / "one-bit").read_bytes() == intact
    assert isofs("fsck", src).returncode == 1  # two flipped bits cannot be repaired
    (src / "two-bits").unlink()
    assert isofs("fsck", src).returncode == 0


def test_passwd_calls_the_providers_hook(tmp_path: Path) -> None:
    src = source(tmp_path)
    old, new, wrong = tmp_path / "old", tmp_path / "new", tmp_path / "wrong"
    old.write_text("first\n")
    new.write_text("second\n")
    wrong.write_text("not it\n")
    init = isofs(
        "init", src, "--provider", "xorpad", "--wrap-seed", "--seed", "5", "--passfile", old
    )
    assert init.returncode == 0, init.stderr
    store = src / ".isofs" / "xorpad.json"
    before = store.read_bytes()

    assert "wrong passphrase" in one_line_error(
        isofs("passwd", src, "--passfile", wrong, "--new-passfile", new)
    )
    assert store.read_bytes() == before

    result = isofs("passwd", src, "--passfile", old, "--new-passfile", new)
    assert result.returncode == 0, result.stderr
    assert store.read_bytes() != before
    config = json.loads((src / ".isofs" / "config.json").read_text())["stack"][0]["config"]
    meta = src / ".isofs"
    layer = XorPadProvider.load(meta, config, SetupRequest(secrets=InteractiveSecrets(str(new))))
    assert layer.seed == 5
    with pytest.raises(ProviderError, match="wrong passphrase"):
        XorPadProvider.load(meta, config, SetupRequest(secrets=InteractiveSecrets(str(old))))


def test_passwd_without_a_passphrase_is_refused(tmp_path: Path) -> None:
    src = source(tmp_path)
    assert isofs("init", src, "--provider", "xorpad", "--seed", "3").returncode == 0
    new = tmp_path / "new"
    new.write_text("second\n")
    one_line_error(isofs("passwd", src, "--passfile", new, "--new-passfile", new))
    assert not (src / ".isofs" / "xorpad.json").exists()
