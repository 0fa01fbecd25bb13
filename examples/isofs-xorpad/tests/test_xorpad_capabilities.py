"""What xorpad adds through the provider API alone: declared options, an fsck check with its
repair, a mount option, and a passwd hook (no FUSE, no command line).

The checked header and the seed store are decoded here from the README's description, not
from the implementation.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import zlib
from pathlib import Path

import pytest
from isofs_xorpad import CHECKED_MAGIC, HEADER_CHECKSUM_MISMATCH, XorPadLayer, XorPadProvider
from isofs_xorpad.xorpad import corrected_header

from isofs.provider import CorruptData, MemoryFile, ProviderError, SetupRequest

SEEDS = [0, 1, 0x0102030405060708, 2**64 - 1]


class Secrets:
    """A SecretSource with a fixed passphrase that records the prompts it was asked."""

    def __init__(self, passphrase: bytes) -> None:
        self._passphrase = passphrase
        self.prompts: list[str] = []

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        self.prompts.append(prompt)
        return self._passphrase

    def master_key(self) -> bytes | None:
        return None


def no_progress(_done: int) -> None:
    pass


def checked_file(seed: int, content: bytes) -> MemoryFile:
    lower = MemoryFile()
    XorPadLayer(seed, checksum=True).create(lower).write(0, content)
    return lower


def flip(lower: MemoryFile, *bits: int) -> None:
    for bit in bits:
        lower.data[bit // 8] ^= 0x80 >> (bit % 8)


# --- options ----------------------------------------------------------------------------------


def test_declared_options() -> None:
    declared = {o.name: o for o in XorPadProvider.options}
    assert list(declared) == ["seed", "checksum", "wrap_seed", "ignore_checksums"]
    seed = declared["seed"]
    assert (seed.kind, seed.scopes, seed.minimum, seed.maximum) == ("int", {"init"}, 0, 2**64 - 1)
    assert seed.help and seed.flag == "--seed"
    assert (declared["checksum"].kind, declared["checksum"].scopes) == ("bool", {"init"})
    assert declared["wrap_seed"].scopes == {"init"}
    assert declared["ignore_checksums"].scopes == {"mount"}


def test_options_belong_to_their_scope(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="ignore_checksums can only be given at mount"):
        XorPadProvider.initialise(tmp_path, SetupRequest(options={"ignore_checksums": True}))
    config = XorPadProvider.initialise(tmp_path, SetupRequest(options={"seed": "7"}))
    assert config == {"version": 1, "seed": 7}
    with pytest.raises(ProviderError, match="seed can only be given at init"):
        XorPadProvider.load(tmp_path, config, SetupRequest(options={"seed": 8}))
    with pytest.raises(ProviderError, match="checksum: not a boolean"):
        XorPadProvider.initialise(tmp_path, SetupRequest(options={"checksum": "maybe"}))


# --- the checked header and fsck ----------------------------------------------------------------


@pytest.mark.parametrize("seed", SEEDS)
def test_checked_header_follows_the_documented_format(seed: int) -> None:
    lower = checked_file(seed, b"some content")
    head = bytes(lower.data[:16])
    body = b"XPC1" + seed.to_bytes(8, "big")
    assert CHECKED_MAGIC == b"XPC1"
    assert head == body + zlib.crc32(body).to_bytes(4, "big")
    layer = XorPadLayer()
    assert layer.is_formatted(lower) and layer.logical_size(lower.size()) == 12
    assert layer.open(lower).read(0, 100) == b"some content"
    assert layer.verify(lower, no_progress) == []


def test_the_provider_records_the_checksum_option(tmp_path: Path) -> None:
    config = XorPadProvider.initialise(tmp_path, SetupRequest(options={"checksum": "yes"}))
    assert config == {"version": 1, "seed": 0, "checksum": True}
    lower = MemoryFile()
    XorPadProvider.load(tmp_path, config, SetupRequest()).create(lower)
    assert bytes(lower.data[:4]) == b"XPC1"


@pytest.mark.parametrize("seed", SEEDS)
def test_every_single_flipped_bit_of_seed_or_crc_is_found_and_repaired(seed: int) -> None:
    layer = XorPadLayer()
    for bit in range(32, 128):
        lower = checked_file(seed, b"payload")
        intact = bytes(lower.data)
        flip(lower, bit)
        damage = layer.verify(lower, no_progress)
        assert [(d.kind, d.repairable) for d in damage] == [(HEADER_CHECKSUM_MISMATCH, True)]
        with pytest.raises(CorruptData, match=HEADER_CHECKSUM_MISMATCH):
            layer.open(lower)
        layer.repair(lower, damage)
        assert bytes(lower.data) == intact, bit
        assert layer.verify(lower, no_progress) == []


def test_two_flipped_bits_are_reported_but_not_repairable() -> None:
    layer = XorPadLayer()
    for first, second in [(32, 33), (40, 127), (95, 96), (100, 120), (126, 127)]:
        lower = checked_file(5, b"payload")
        flip(lower, first, second)
        assert corrected_header(bytes(lower.data)) is None
        (damage,) = layer.verify(lower, no_progress)
        assert (damage.kind, damage.repairable) == (HEADER_CHECKSUM_MISMATCH, False)
        assert "more than one bit" in damage.describe()
        with pytest.raises(CorruptData):
            layer.repair(lower, [damage])


def test_plain_headers_have_nothing_to_check() -> None:
    lower = MemoryFile()
    XorPadLayer(3).create(lower).write(0, b"plain")
    flip(lower, 64)  # the seed's top bit: a plain header cannot tell
    assert XorPadLayer().verify(lower, no_progress) == []


def test_ignore_checksums_rescues_the_data_of_a_damaged_header(tmp_path: Path) -> None:
    lower = checked_file(0x42, b"rescue me")
    flip(lower, 32)  # the seed's top bit: not one the keystream uses
    config = {"version": 1, "seed": 0, "checksum": True}
    strict = XorPadProvider.load(tmp_path, config, SetupRequest())
    with pytest.raises(CorruptData):
        strict.open(lower)
    lenient = XorPadProvider.load(
        tmp_path, config, SetupRequest(options={"ignore_checksums": "on"})
    )
    assert lenient.ignore_checksums
    assert lenient.open(lower).read(0, 100) == b"rescue me"


# --- the wrapped seed and passwd ----------------------------------------------------------------


def independent_unwrap(store: dict, passphrase: bytes) -> int | None:
    """The seed from the store as the README describes it, or None when the tag fails."""
    kdf = store["kdf"]
    salt, wrapped = bytes.fromhex(kdf["salt"]), bytes.fromhex(store["wrapped"])
    derived = hashlib.scrypt(passphrase, salt=salt, n=kdf["n"], r=kdf["r"], p=kdf["p"], dklen=40)
    tag = hmac.new(derived[8:], salt + wrapped, hashlib.sha256).hexdigest()
    if tag != store["tag"]:
        return None
    return int.from_bytes(bytes(a ^ b for a, b in zip(wrapped, derived[:8], strict=True)), "big")


def init_wrapped(meta: Path, seed: int = 42, passphrase: bytes = b"first") -> dict:
    return XorPadProvider.initialise(
        meta,
        SetupRequest(options={"seed": seed, "wrap_seed": True}, secrets=Secrets(passphrase)),
    )


def test_wrap_seed_keeps_the_seed_out_of_the_config(tmp_path: Path) -> None:
    config = init_wrapped(tmp_path)
    assert config == {"version": 1, "wrap_seed": True}
    path = tmp_path / "xorpad.json"
    assert path.stat().st_mode & 0o777 == 0o600
    store = json.loads(path.read_text())
    assert independent_unwrap(store, b"first") == 42
    assert independent_unwrap(store, b"other") is None
    secrets = Secrets(b"first")
    layer = XorPadProvider.load(tmp_path, config, SetupRequest(secrets=secrets))
    assert layer.seed == 42 and secrets.prompts == ["Passphrase: "]
    with pytest.raises(ProviderError, match="wrong passphrase"):
        XorPadProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"other")))
    with pytest.raises(ProviderError, match="needs a passphrase"):
        XorPadProvider.load(tmp_path, config, SetupRequest())
    with pytest.raises(ProviderError, match="already exists"):
        init_wrapped(tmp_path)


def test_wrap_seed_with_a_key_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(b"key file bytes\n")
    meta = tmp_path / "meta"
    config = XorPadProvider.initialise(
        meta, SetupRequest(options={"seed": 9, "wrap_seed": True, "keyfile": str(keyfile)})
    )
    layer = XorPadProvider.load(meta, config, SetupRequest(options={"keyfile": str(keyfile)}))
    assert layer.seed == 9
    # The key file's exact bytes are the passphrase, trailing newline included.
    same = XorPadProvider.load(meta, config, SetupRequest(secrets=Secrets(b"key file bytes\n")))
    assert same.seed == 9


def test_change_passphrase_rewraps_the_seed(tmp_path: Path) -> None:
    config = init_wrapped(tmp_path)
    path = tmp_path / "xorpad.json"
    before = path.read_bytes()
    with pytest.raises(ProviderError, match="wrong passphrase"):
        XorPadProvider.change_passphrase(tmp_path, Secrets(b"wrong"), Secrets(b"second"))
    assert path.read_bytes() == before
    new = Secrets(b"second")
    assert XorPadProvider.change_passphrase(tmp_path, Secrets(b"first"), new) is True
    assert new.prompts == ["New passphrase: "]
    assert independent_unwrap(json.loads(path.read_text()), b"second") == 42
    with pytest.raises(ProviderError, match="wrong passphrase"):
        XorPadProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"first")))
    layer = XorPadProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"second")))
    assert layer.seed == 42
    assert sorted(p.name for p in tmp_path.iterdir()) == ["xorpad.json"]  # no temporary files


def test_no_passphrase_to_change_without_wrap_seed(tmp_path: Path) -> None:
    XorPadProvider.initialise(tmp_path, SetupRequest(options={"seed": 1}))
    assert XorPadProvider.change_passphrase(tmp_path, Secrets(b"a"), Secrets(b"b")) is False
    assert list(tmp_path.iterdir()) == []


def test_a_tampered_store_is_refused(tmp_path: Path) -> None:
    config = init_wrapped(tmp_path)
    path = tmp_path / "xorpad.json"
    store = json.loads(path.read_text())
    for bad, match in (
        ({**store, "wrapped": "zz"}, "malformed"),
        ({**store, "kdf": {**store["kdf"], "n": 2**30}}, "unsupported parameters"),
        ({**store, "version": 2}, "unsupported version 2"),
        ({**store, "wrapped": os.urandom(8).hex()}, "wrong passphrase"),
    ):
        path.write_text(json.dumps(bad))
        with pytest.raises(ProviderError, match=match):
            XorPadProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"first")))
