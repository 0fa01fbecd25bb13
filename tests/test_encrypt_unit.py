"""Unit tests of the encrypt provider (no FUSE): layout, tampering, keys, names.

The independent decoder below is written from docs/FORMAT-encrypt.md, not from the module,
so that the format document and the implementation are checked against each other.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from isofs.cli.passphrases import KeyFileSecrets
from isofs.provider import CorruptData, MemoryFile, ProviderError, SetupRequest
from isofs_providers.encrypt import (
    DIRIV_NAME,
    EncryptLayer,
    EncryptProvider,
    LinkCodec,
    NameCodec,
    XattrCodec,
    format_master_key,
    new_dir_id,
    parse_dir_id,
    parse_master_key,
)
from isofs_providers.encrypt.content import last_valid_size_of, logical_size_of

BS = 4096
NB = BS + 28
HDR = 32
MASTER = bytes(range(32))
CHEAP = {"scrypt_n": 2**14}


class Secrets:
    """A SecretSource with a fixed passphrase and/or recovery key."""

    def __init__(self, passphrase: bytes | None = None, master: str | bytes | None = None):
        self._passphrase = passphrase
        self._master = master
        self.prompts: list[str] = []

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        self.prompts.append(prompt)
        if self._passphrase is None:
            raise AssertionError("passphrase asked although a master key was given")
        return self._passphrase

    def master_key(self) -> bytes | str | None:
        return self._master


def independent_decode(master: bytes, native: bytes, *, allow_holes: bool = True) -> bytes:
    """Decrypt a native file following docs/FORMAT-encrypt.md only."""
    assert len(native) >= 32
    magic, version, flags, reserved, _file_id = struct.unpack(">8sHH4s16s", native[:32])
    assert (magic, version, flags, reserved) == (b"ISOFSENC", 1, 0, bytes(4))
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"isofs content v1").derive(master)
    aead = AESGCM(key)
    out = bytearray()
    for n, pos in enumerate(range(32, len(native), 4124)):
        block = native[pos : pos + 4124]
        assert len(block) > 28
        if allow_holes and block == bytes(len(block)):
            out += bytes(len(block) - 28)
        else:
            aad = native[:32] + struct.pack(">Q", n)
            out += aead.decrypt(block[:12], block[12:], aad)
    return bytes(out)


def expected_native_size(logical: int) -> int:
    full, rest = divmod(logical, BS)
    return HDR + full * NB + (rest + 28 if rest else 0)


def make(allow_holes: bool = True) -> tuple[EncryptLayer, MemoryFile, object]:
    layer = EncryptLayer(MASTER, allow_holes=allow_holes)
    lower = MemoryFile()
    return layer, lower, layer.create(lower)


# --- content round trips --------------------------------------------------------------------

SIZES = [0, 1, 4095, 4096, 4097, 8191, 8192, 8193, 3 * 4096 + 5, 1024 * 1024 + 3]


@pytest.mark.parametrize("allow_holes", [True, False])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip_sizes(size: int, allow_holes: bool) -> None:
    layer, lower, upper = make(allow_holes)
    data = os.urandom(size)
    assert upper.write(0, data) == size
    assert upper.size() == size
    assert lower.size() == expected_native_size(size)
    assert layer.logical_size(lower.size()) == size
    assert upper.read(0, size + 100) == data
    assert upper.read(size, 10) == b""
    assert independent_decode(MASTER, bytes(lower.data), allow_holes=allow_holes) == data
    reopened = layer.open(lower)
    assert layer.is_formatted(lower)
    for offset in (0, 1, 4095, 4096, 4097, size // 2, max(size - 1, 0)):
        assert reopened.read(offset, 5000) == data[offset : offset + 5000]


def test_empty_file_is_just_the_header() -> None:
    layer, lower, upper = make()
    assert lower.size() == HDR
    assert upper.size() == 0
    assert upper.read(0, 10) == b""
    assert layer.logical_size(HDR) == 0


@pytest.mark.parametrize("chunk", [1, 1000, 4095, 4097, 10000])
def test_unaligned_sequential_writes(chunk: int) -> None:
    _layer, lower, upper = make()
    data = os.urandom(3 * BS + 5 if chunk == 1 else 5 * BS + 123)
    for offset in range(0, len(data), chunk):
        upper.write(offset, data[offset : offset + chunk])
    assert upper.read(0, len(data)) == data
    assert independent_decode(MASTER, bytes(lower.data)) == data


def test_unaligned_overwrites_keep_neighbours() -> None:
    _layer, lower, upper = make()
    model = bytearray(os.urandom(6 * BS + 77))
    upper.write(0, bytes(model))
    for offset, length in [(1, 1), (4095, 2), (4090, 9000), (8191, 1), (100, 4096), (5 * BS, 2000)]:
        patch = os.urandom(length)
        upper.write(offset, patch)
        model[offset : offset + length] = patch
        assert upper.read(0, len(model) + 10) == bytes(model)
    assert independent_decode(MASTER, bytes(lower.data)) == bytes(model)


def test_large_write_and_read_are_batched() -> None:
    _layer, lower, upper = make()
    lower.reset_log()
    upper.write(0, os.urandom(1024 * 1024))
    assert lower.writes == [(HDR, 1024 * 1024 + 256 * 28)]
    assert lower.reads == []
    lower.reset_log()
    upper.read(0, 1024 * 1024)
    assert lower.reads == [(HDR, 256 * NB)]
    lower.reset_log()
    upper.write(100, os.urandom(1024 * 1024))  # unaligned: read-modify-write of both edges
    assert len(lower.writes) == 1
    assert len(lower.reads) <= 2
    assert all(size == NB for _offset, size in lower.reads)


def test_every_block_write_uses_a_fresh_nonce() -> None:
    _layer, lower, upper = make()
    upper.write(0, bytes(BS))
    first = bytes(lower.data[HDR : HDR + NB])
    upper.write(0, bytes(BS))
    second = bytes(lower.data[HDR : HDR + NB])
    assert first[:12] != second[:12]
    assert first != second


# --- growing, holes, truncation ---------------------------------------------------------------


@pytest.mark.parametrize("allow_holes", [True, False])
def test_grow_by_truncate_and_by_write_reads_zeros(allow_holes: bool) -> None:
    _layer, lower, upper = make(allow_holes)
    upper.write(0, b"abc")
    upper.truncate(5 * BS + 10)
    assert upper.size() == 5 * BS + 10
    assert upper.read(0, 10 * BS) == b"abc" + bytes(5 * BS + 7)
    upper.write(20 * BS + 7, b"xyz")
    expect = b"abc" + bytes(20 * BS + 4) + b"xyz"
    assert upper.read(0, 30 * BS) == expect
    assert lower.size() == expected_native_size(len(expect))
    assert independent_decode(MASTER, bytes(lower.data), allow_holes=allow_holes) == expect
    # Gap blocks are native zeros exactly when holes are allowed.
    gap = bytes(lower.data[HDR + 2 * NB : HDR + 3 * NB])
    assert (gap == bytes(NB)) is allow_holes


def test_grow_within_the_last_block() -> None:
    for allow_holes in (True, False):
        _layer, _lower, upper = make(allow_holes)
        upper.write(0, b"a" * 100)
        upper.truncate(200)
        upper.write(300, b"b")
        assert upper.read(0, 1000) == b"a" * 100 + bytes(200) + b"b"
        upper.truncate(BS)
        assert upper.read(0, BS + 1) == b"a" * 100 + bytes(200) + b"b" + bytes(BS - 301)


def test_shrink_re_encrypts_partial_last_block() -> None:
    _layer, lower, upper = make()
    data = os.urandom(4 * BS)
    upper.write(0, data)
    upper.truncate(2 * BS + 17)
    assert lower.size() == expected_native_size(2 * BS + 17)
    assert upper.read(0, 5 * BS) == data[: 2 * BS + 17]
    upper.truncate(BS)
    assert upper.read(0, 5 * BS) == data[:BS]
    upper.truncate(0)
    assert lower.size() == HDR
    assert upper.read(0, 10) == b""
    assert independent_decode(MASTER, bytes(lower.data)) == b""


def test_native_zero_blocks_are_holes_only_when_allowed() -> None:
    for allow_holes in (True, False):
        _layer, lower, upper = make(allow_holes)
        upper.write(0, b"x" * BS)
        lower.truncate(HDR + 3 * NB)  # a sparse native extension by someone else
        if allow_holes:
            assert upper.read(0, 4 * BS) == b"x" * BS + bytes(2 * BS)
        else:
            with pytest.raises(CorruptData, match="block 1"):
                upper.read(0, 4 * BS)


def test_sparse_partial_hole_then_grow_again() -> None:
    _layer, _lower, upper = make()
    upper.truncate(BS + 100)  # block 1 is a short native hole
    upper.truncate(3 * BS)  # ...which must become a full block of zeros
    upper.write(BS + 50, b"q")
    assert upper.read(0, 4 * BS) == bytes(BS + 50) + b"q" + bytes(2 * BS - 51)
    upper.truncate(BS + 10)
    assert upper.read(0, 4 * BS) == bytes(BS + 10)


# --- property test against a bytearray model -------------------------------------------------

offsets = st.one_of(
    st.integers(0, 3 * BS + 10),
    st.sampled_from([BS - 1, BS, BS + 1, 2 * BS, 2 * BS - 1]),
    st.integers(0, 300_000),  # far past EOF
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), offsets, st.binary(min_size=0, max_size=9000)),
        st.tuples(st.just("truncate"), offsets, st.none()),
        st.tuples(st.just("read"), offsets, st.integers(0, 3 * BS)),
    ),
    max_size=12,
)


@settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None
)
@given(ops=operations, allow_holes=st.booleans())
def test_model_equivalence(ops: list[tuple[str, int, object]], allow_holes: bool) -> None:
    layer, lower, upper = make(allow_holes)
    model = bytearray()
    for op, offset, arg in ops:
        if op == "write":
            assert isinstance(arg, bytes)
            if arg:  # an empty write does not extend, as with pwrite
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(arg)] = arg
            assert upper.write(offset, arg) == len(arg)
        elif op == "truncate":
            upper.truncate(offset)
            del model[offset:]
            model.extend(bytes(offset - len(model)))
        else:
            assert isinstance(arg, int)
            assert upper.read(offset, arg) == bytes(model[offset : offset + arg])
        assert upper.size() == len(model)
        assert lower.size() == expected_native_size(len(model))
    assert upper.read(0, len(model) + 1) == bytes(model)
    assert layer.open(lower).read(0, len(model)) == bytes(model)
    assert independent_decode(MASTER, bytes(lower.data), allow_holes=allow_holes) == model


# --- tampering ---------------------------------------------------------------------------------


def five_blocks() -> tuple[EncryptLayer, MemoryFile, object, bytes]:
    layer, lower, upper = make()
    data = os.urandom(5 * BS)
    upper.write(0, data)
    return layer, lower, upper, data


def test_bit_flip_names_the_block() -> None:
    _layer, lower, upper, data = five_blocks()
    lower.data[HDR + 2 * NB + 500] ^= 0x04
    with pytest.raises(CorruptData, match=r"block 2\b") as info:
        upper.read(0, 5 * BS)
    assert info.value.errno == 5
    assert upper.read(0, 2 * BS) == data[: 2 * BS]  # other blocks still read
    assert upper.read(3 * BS, 2 * BS) == data[3 * BS :]
    for where in (0, 11, 12, NB - 1):  # nonce, first ciphertext byte, tag
        _layer, lower, upper, data = five_blocks()
        lower.data[HDR + NB + where] ^= 0x80
        with pytest.raises(CorruptData, match=r"block 1\b"):
            upper.read(BS, 1)


def test_swapped_blocks_fail() -> None:
    _layer, lower, upper, _data = five_blocks()
    b1 = bytes(lower.data[HDR + NB : HDR + 2 * NB])
    b3 = bytes(lower.data[HDR + 3 * NB : HDR + 4 * NB])
    lower.data[HDR + NB : HDR + 2 * NB] = b3
    lower.data[HDR + 3 * NB : HDR + 4 * NB] = b1
    with pytest.raises(CorruptData, match=r"block 1\b"):
        upper.read(BS, 1)
    with pytest.raises(CorruptData, match=r"block 3\b"):
        upper.read(3 * BS, 1)


def test_block_replayed_from_another_file_fails() -> None:
    layer, lower_a, upper_a, _ = five_blocks()
    lower_b = MemoryFile()
    layer.create(lower_b).write(0, os.urandom(5 * BS))
    lower_a.data[HDR + NB : HDR + 2 * NB] = lower_b.data[HDR + NB : HDR + 2 * NB]
    with pytest.raises(CorruptData, match=r"block 1\b"):
        upper_a.read(BS, 1)


def test_rollback_of_a_block_is_not_detected_but_moves_are() -> None:
    # Documented limit: an older version of a block at the same position in the same file
    # is a valid GCM message. What is guaranteed: it decrypts to exactly that old version
    # (never to other data), and the same old block fails anywhere else.
    _layer, lower, upper, data = five_blocks()
    old_block1 = bytes(lower.data[HDR + NB : HDR + 2 * NB])
    upper.write(BS, b"new" * 100)
    lower.data[HDR + NB : HDR + 2 * NB] = old_block1
    assert upper.read(BS, BS) == data[BS : 2 * BS]
    lower.data[HDR + 2 * NB : HDR + 3 * NB] = old_block1
    with pytest.raises(CorruptData, match=r"block 2\b"):
        upper.read(2 * BS, 1)


def test_header_tampering() -> None:
    layer, lower, _upper, _ = five_blocks()
    lower.data[20] ^= 1  # file id: every block's AAD changes
    with pytest.raises(CorruptData, match=r"block 0\b"):
        layer.open(lower).read(0, 1)
    layer, lower, _upper, _ = five_blocks()
    lower.data[10:12] = b"\x00\x01"  # unknown flag
    with pytest.raises(CorruptData, match="flags"):
        layer.open(lower)
    layer, lower, _upper, _ = five_blocks()
    lower.data[8:10] = b"\x00\x02"  # unknown version: not this format
    assert not layer.is_formatted(lower)
    assert not layer.is_formatted(MemoryFile(b"plain text file, not encrypted at all....."))


def test_native_truncation() -> None:
    layer, lower, upper, data = five_blocks()
    lower.truncate(HDR + 2 * NB + 10)  # last "block" has no room for plaintext (torn)
    assert layer.logical_size(lower.size()) is None
    assert upper.size() == 2 * BS + 1  # the torn block counts, so the good ones stay readable
    assert upper.read(0, 2 * BS) == data[: 2 * BS]
    with pytest.raises(CorruptData, match=r"block 2 is truncated"):
        upper.read(2 * BS, 1)
    lower.truncate(HDR + 2 * NB + 100)  # cut mid-block: the short block fails its tag
    assert upper.size() == 2 * BS + 72
    assert upper.read(0, 2 * BS) == data[: 2 * BS]
    with pytest.raises(CorruptData, match=r"block 2\b"):
        upper.read(2 * BS, 1)
    lower.truncate(HDR + 2 * NB)  # at a block boundary: undetectable, documented
    assert upper.read(0, 5 * BS) == data[: 2 * BS]
    lower.truncate(20)  # into the header
    with pytest.raises(CorruptData):
        upper.size()
    assert not layer.is_formatted(lower)
    with pytest.raises(CorruptData, match="header truncated"):
        layer.open(lower)


def test_truncate_to_zero_resets_a_corrupt_file() -> None:
    _layer, lower, upper, _data = five_blocks()
    lower.truncate(HDR + NB + 5)
    with pytest.raises(CorruptData):
        upper.write(BS + 1, b"x")  # needs the old bytes of the torn block
    upper.truncate(0)
    upper.write(0, b"fresh")
    assert upper.read(0, 100) == b"fresh"


def test_create_refuses_non_empty_lower() -> None:
    with pytest.raises(ValueError):
        EncryptLayer(MASTER).create(MemoryFile(b"data"))


def test_wrong_key_fails() -> None:
    _layer, lower, _upper, _ = five_blocks()
    other = EncryptLayer(os.urandom(32))
    with pytest.raises(CorruptData, match=r"block 0\b"):
        other.open(lower).read(0, 1)


# --- key handling ------------------------------------------------------------------------------


def init(
    tmp_path: Path,
    passphrase: bytes = b"correct horse",
    master: str | None = None,
    **options: object,
):
    """Initialise with cheap scrypt; `master` is a recovery key to re-use (via the secrets)."""
    report: dict[str, str] = {}
    config = EncryptProvider.initialise(
        tmp_path,
        SetupRequest(
            options={**CHEAP, **options}, secrets=Secrets(passphrase, master=master), report=report
        ),
    )
    return config, report


def round_trip_through(layer: EncryptLayer, layer2: EncryptLayer) -> None:
    lower = MemoryFile()
    layer.create(lower).write(0, b"hello world" * 1000)
    assert layer2.open(lower).read(0, 11) == b"hello world"


def test_init_and_load(tmp_path: Path) -> None:
    config, report = init(tmp_path, encrypt_names=True)
    assert config == {"version": 1, "encrypt_names": True, "allow_holes": True}
    assert json.dumps(config)  # plain JSON, no secrets
    assert len(report["master_key"]) == 64 + 7
    secrets = Secrets(b"correct horse")
    layer = EncryptProvider.load(tmp_path, config, SetupRequest(secrets=secrets))
    assert secrets.prompts == ["Passphrase: "]
    assert layer.names is not None
    master = bytes(parse_master_key(report["master_key"]))
    round_trip_through(layer, EncryptLayer(master))
    mode = (tmp_path / "encrypt.json").stat().st_mode & 0o777
    assert mode == 0o600


def test_wrong_passphrase(tmp_path: Path) -> None:
    config, _ = init(tmp_path)
    with pytest.raises(ProviderError) as info:
        EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"wrong")))
    assert str(info.value) == "wrong passphrase or key file"
    with pytest.raises(ProviderError, match="no passphrase"):
        EncryptProvider.load(tmp_path, config, SetupRequest())


def test_keyfile(tmp_path: Path) -> None:
    keyfile = tmp_path / "key.bin"
    keyfile.write_bytes(os.urandom(64) + b"\n")
    meta = tmp_path / "meta"
    meta.mkdir()
    config, _report = init(meta, passphrase=b"unused", keyfile=str(keyfile))
    layer = EncryptProvider.load(meta, config, SetupRequest(options={"keyfile": str(keyfile)}))
    # The key file's exact bytes are the passphrase.
    same = EncryptProvider.load(meta, config, SetupRequest(secrets=Secrets(keyfile.read_bytes())))
    round_trip_through(layer, same)
    stripped = Secrets(keyfile.read_bytes().rstrip(b"\n"))
    with pytest.raises(ProviderError, match="wrong passphrase or key file"):
        EncryptProvider.load(meta, config, SetupRequest(secrets=stripped))
    other = tmp_path / "other.bin"
    other.write_bytes(b"other")
    with pytest.raises(ProviderError, match="wrong passphrase or key file"):
        EncryptProvider.load(meta, config, SetupRequest(options={"keyfile": str(other)}))
    empty = tmp_path / "empty.bin"
    empty.write_bytes(b"")
    with pytest.raises(ProviderError, match="empty"):
        EncryptProvider.load(meta, config, SetupRequest(options={"keyfile": str(empty)}))


def test_recovery_with_master_key(tmp_path: Path) -> None:
    config, report = init(tmp_path)
    hex_key = report["master_key"]
    groups = hex_key.split("-")
    assert len(groups) == 8 and all(len(g) == 8 for g in groups)
    normal = EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"correct horse")))
    for supplied in (hex_key, hex_key.upper().replace("-", " "), hex_key.encode()):
        recovered = EncryptProvider.load(
            tmp_path, config, SetupRequest(secrets=Secrets(None, master=supplied))
        )
        round_trip_through(normal, recovered)
    wrong = format_master_key(os.urandom(32))
    with pytest.raises(ProviderError, match="wrong master key"):
        EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(None, master=wrong)))
    with pytest.raises(ProviderError, match="64 hex digits"):
        parse_master_key("abcd")


def test_init_with_given_master_key(tmp_path: Path) -> None:
    config, report = init(tmp_path, master=format_master_key(MASTER))
    assert parse_master_key(report["master_key"]) == bytearray(MASTER)
    layer = EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"correct horse")))
    round_trip_through(EncryptLayer(MASTER), layer)
    with pytest.raises(ProviderError, match="already exists"):
        init(tmp_path)


def test_change_passphrase(tmp_path: Path) -> None:
    config, _ = init(tmp_path)
    before = EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"correct horse")))
    with pytest.raises(ProviderError, match="wrong passphrase"):
        EncryptProvider.change_passphrase(tmp_path, Secrets(b"nope"), Secrets(b"new one"))
    EncryptProvider.change_passphrase(tmp_path, Secrets(b"correct horse"), Secrets(b"new one"))
    with pytest.raises(ProviderError, match="wrong passphrase or key file"):
        EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"correct horse")))
    after = EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"new one")))
    round_trip_through(before, after)  # same master key, files need no re-encryption
    assert [p.name for p in tmp_path.iterdir()] == ["encrypt.json"]  # no temp files left
    keyfile = tmp_path.parent / f"{tmp_path.name}.key"
    keyfile.write_bytes(b"key file bytes")
    EncryptProvider.change_passphrase(tmp_path, Secrets(b"new one"), KeyFileSecrets(keyfile))
    via_keyfile = EncryptProvider.load(
        tmp_path, config, SetupRequest(options={"keyfile": str(keyfile)})
    )
    round_trip_through(before, via_keyfile)


def test_key_store_holds_no_raw_master_key(tmp_path: Path) -> None:
    _config, report = init(tmp_path, master=format_master_key(MASTER))
    raw = (tmp_path / "encrypt.json").read_bytes()
    store = json.loads(raw)
    assert store["version"] == 1
    assert store["kdf"]["n"] == 2**14
    for form in (
        MASTER,
        MASTER.hex().encode(),
        base64.b64encode(MASTER),
        base64.urlsafe_b64encode(MASTER).rstrip(b"="),
        report["master_key"].encode(),
    ):
        assert form not in raw
    for field in (store["wrap"]["sealed"], store["key_check"]):
        assert MASTER not in base64.b64decode(field)


def test_default_scrypt_cost(tmp_path: Path) -> None:
    config = EncryptProvider.initialise(tmp_path, SetupRequest(secrets=Secrets(b"pw")))
    store = json.loads((tmp_path / "encrypt.json").read_text())
    assert (store["kdf"]["n"], store["kdf"]["r"], store["kdf"]["p"]) == (2**17, 8, 1)
    EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"pw")))


def test_versions_and_bad_params_refused(tmp_path: Path) -> None:
    config, _ = init(tmp_path)
    request = SetupRequest(secrets=Secrets(b"correct horse"))
    with pytest.raises(ProviderError, match="unsupported config version 2"):
        EncryptProvider.load(tmp_path, {**config, "version": 2}, request)
    with pytest.raises(ProviderError, match="unsupported config version None"):
        EncryptProvider.load(tmp_path, {}, request)
    path = tmp_path / "encrypt.json"
    store = json.loads(path.read_text())
    path.write_text(json.dumps({**store, "version": 7}))
    with pytest.raises(ProviderError, match="unsupported version 7"):
        EncryptProvider.load(tmp_path, config, request)
    path.write_text(json.dumps({**store, "kdf": {**store["kdf"], "n": 2**30}}))
    with pytest.raises(ProviderError, match="scrypt N"):
        EncryptProvider.load(tmp_path, config, request)
    with pytest.raises(ProviderError, match="scrypt_n"):
        init(tmp_path / "x", scrypt_n=2**10)


# --- names ---------------------------------------------------------------------------------


@pytest.fixture
def codec() -> NameCodec:
    return NameCodec.from_master_key(MASTER)


def is_bookkeeping(native_name: str) -> bool:
    """Whether the layer's name transform hides `native_name` from decrypted views."""
    transform = EncryptLayer(MASTER, encrypt_names=True).name_transform
    assert transform is not None
    return transform.is_bookkeeping(native_name)


def test_name_round_trip_and_determinism(codec: NameCodec) -> None:
    d1, d2 = new_dir_id(), new_dir_id()
    for name in ["a", "hello.txt", "ünïcødé ✓", "with space", "x" * 100, "\udcff-bytes"]:
        stored = codec.encrypt_name(d1, name)
        assert codec.decrypt_name(d1, stored) == name
        assert codec.encrypt_name(d1, name) == stored  # deterministic within a directory
        assert codec.encrypt_name(d2, name) != stored  # differs across directories
        assert not stored.startswith(".") and "=" not in stored and "/" not in stored
        assert not is_bookkeeping(stored)
    with pytest.raises(CorruptData):
        codec.decrypt_name(d2, codec.encrypt_name(d1, "moved"))  # moved to another directory


def test_name_tampering(codec: NameCodec) -> None:
    dir_id = new_dir_id()
    stored = codec.encrypt_name(dir_id, "secret-plan.txt")
    flipped = stored[:5] + ("A" if stored[5] != "A" else "B") + stored[6:]
    for bad in (flipped, stored[:-1], stored + "A", "not*base64", "AAAA", ""):
        with pytest.raises(CorruptData):
            codec.decrypt_name(dir_id, bad)
    with pytest.raises(CorruptData):
        NameCodec.from_master_key(os.urandom(32)).decrypt_name(dir_id, stored)


def test_invalid_names_rejected(codec: NameCodec) -> None:
    dir_id = new_dir_id()
    for bad in (".", "..", "a/b", "a\0b", "", "x" * 256):
        with pytest.raises(ValueError):
            codec.encrypt_name(dir_id, bad)
    with pytest.raises(ValueError):
        codec.encrypt_name(b"short", "name")


def test_long_names(codec: NameCodec) -> None:
    dir_id = new_dir_id()
    short = codec.encrypt_name(dir_id, "short")
    assert NameCodec.disk_name(short) == (short, None)
    name = "é" * 127 + "z"  # 255 bytes of UTF-8
    encoded = codec.encrypt_name(dir_id, name)
    assert len(encoded) > 255
    stub, sidecar = NameCodec.disk_name(encoded)
    assert sidecar is not None and len(stub) <= 255
    digest = base64.urlsafe_b64encode(hashlib.sha256(encoded.encode()).digest()).rstrip(b"=")
    assert stub == ".isofs.longname." + digest.decode()
    assert NameCodec.is_long_name_stub(stub)
    assert NameCodec.sidecar_name(stub) == stub + ".name"
    assert not NameCodec.is_long_name_stub(NameCodec.sidecar_name(stub))
    # the sidecar is hidden; the stub is the file itself, shown under its full name
    assert is_bookkeeping(NameCodec.sidecar_name(stub)) and not is_bookkeeping(stub)
    assert codec.decrypt_name(dir_id, NameCodec.from_long_name(stub, sidecar)) == name
    other = codec.encrypt_name(dir_id, "y" * 255)
    with pytest.raises(CorruptData, match="does not match"):
        NameCodec.from_long_name(stub, other.encode())
    assert len(codec.encrypt_name(dir_id, "x" * 255)) == 362


def test_dir_ids() -> None:
    assert is_bookkeeping(DIRIV_NAME)
    dir_id = new_dir_id()
    assert parse_dir_id(dir_id) == dir_id and len(dir_id) == 16
    with pytest.raises(CorruptData):
        parse_dir_id(b"short")


def test_names_key_is_independent_of_content_key() -> None:
    # The SIV key must be an HKDF output for "isofs names v1", not the master key.
    dir_id = bytes(16)
    ours = NameCodec.from_master_key(MASTER).encrypt_name(dir_id, "n")
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    key = HKDF(hashes.SHA256(), 64, salt=None, info=b"isofs names v1").derive(MASTER)
    expect = base64.urlsafe_b64encode(AESSIV(key).encrypt(b"n", [dir_id])).rstrip(b"=")
    assert ours == expect.decode()


# --- symlink targets -------------------------------------------------------------------------


def test_link_targets_round_trip_with_fresh_nonces() -> None:
    links = LinkCodec.from_master_key(MASTER)
    for target in (b"a", b"../dir/file", b"/abs/path with space", "ünï ✓".encode(), b"x" * 3000):
        stored = links.seal(target)
        assert links.open(stored) == target
        assert links.seal(target) != stored  # random nonce: equal targets look different
        assert b"/" not in stored and not stored.startswith(b".")
        assert len(target) < 4 or target not in stored
    # the documented layout, decoded independently: base64url(nonce || AES-GCM(target))
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"isofs symlinks v1").derive(MASTER)
    sealed = base64.urlsafe_b64decode(links.seal(b"t") + b"==")
    assert AESGCM(key).decrypt(sealed[:12], sealed[12:], b"isofs symlink target v1") == b"t"


def test_link_targets_that_cannot_be_stored() -> None:
    links = LinkCodec.from_master_key(MASTER)
    for bad in (b"", b"a\0b", b"x" * 3100):  # 3100 bytes encrypt to more than 4095
        with pytest.raises(ValueError):
            links.seal(bad)


def test_link_tampering_and_plain_targets_are_refused() -> None:
    links = LinkCodec.from_master_key(MASTER)
    stored = links.seal(b"secret-target")
    flipped = stored[:7] + (b"A" if stored[7:8] != b"A" else b"B") + stored[8:]
    plain = (b"plain-target", b"README", b"../x", b"A" * 60, "é".encode(), stored[:-1])
    for bad in (flipped, *plain):
        with pytest.raises(CorruptData):
            links.open(bad)
    with pytest.raises(CorruptData):
        LinkCodec.from_master_key(os.urandom(32)).open(stored)


# --- extended attributes ---------------------------------------------------------------------


def test_xattr_names_are_sealed_deterministically_in_the_user_namespace_only() -> None:
    xattrs = XattrCodec.from_master_key(MASTER)
    sealed = xattrs.seal_name(b"user.comment")
    assert sealed.startswith(b"user.isofs.") and b"comment" not in sealed
    assert xattrs.seal_name(b"user.comment") == sealed  # looked up by name: deterministic
    assert xattrs.open_name(sealed) == b"user.comment"
    for kernel_owned in (b"security.capability", b"system.posix_acl_access", b"trusted.x"):
        assert xattrs.seal_name(kernel_owned) == kernel_owned
        assert xattrs.open_name(kernel_owned) == kernel_owned
    assert xattrs.open_name(b"user.plain") == b"user.plain"  # not sealed: passes through
    flipped = sealed[:-3] + (b"A" if sealed[-3:-2] != b"A" else b"B") + sealed[-2:]
    for bad in (flipped, b"user.isofs.not-base64*", b"user.isofs.AAAA"):
        with pytest.raises(CorruptData):
            xattrs.open_name(bad)
    with pytest.raises(ValueError):
        xattrs.seal_name(b"user." + b"n" * 200)  # longer than 255 bytes once sealed
    # the documented construction, decoded independently
    key = HKDF(hashes.SHA256(), 64, salt=None, info=b"isofs xattr names v1").derive(MASTER)
    from cryptography.hazmat.primitives.ciphers.aead import AESSIV

    raw = base64.urlsafe_b64decode(sealed[len(b"user.isofs.") :] + b"==")
    assert AESSIV(key).decrypt(raw, [b"isofs xattr name v1"]) == b"comment"


def test_xattr_values_are_sealed_to_their_name() -> None:
    xattrs = XattrCodec.from_master_key(MASTER)
    name, other = xattrs.seal_name(b"user.a"), xattrs.seal_name(b"user.b")
    stored = xattrs.seal_value(name, b"secret value")
    assert b"secret" not in stored and xattrs.seal_value(name, b"secret value") != stored
    assert xattrs.open_value(name, stored) == b"secret value"
    assert xattrs.open_value(name, xattrs.seal_value(name, b"")) == b""
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"isofs xattr values v1").derive(MASTER)
    assert AESGCM(key).decrypt(stored[:12], stored[12:], name) == b"secret value"
    tampered = stored[:-1] + bytes([stored[-1] ^ 1])
    for bad_name, bad_value in ((other, stored), (name, tampered), (name, stored[:20])):
        with pytest.raises(CorruptData):
            xattrs.open_value(bad_name, bad_value)


# --- what the provider declares: options, passwd, fsck ---------------------------------------


def test_declared_options() -> None:
    declared = {o.name: o for o in EncryptProvider.options}
    assert list(declared) == ["encrypt_names", "allow_holes", "scrypt_n", "scrypt_r", "scrypt_p"]
    assert declared["encrypt_names"].help == (
        "encrypt file names, symlink targets and user. xattrs (AES-SIV)"
    )
    for name, default in (("encrypt_names", False), ("allow_holes", True)):
        assert (declared[name].kind, declared[name].default) == ("bool", default)
        assert declared[name].scopes == {"init"}
    ranges = {"scrypt_n": (2**14, 2**22, 2**17), "scrypt_r": (1, 32, 8), "scrypt_p": (1, 16, 1)}
    for name, (low, high, default) in ranges.items():
        option = declared[name]
        assert (option.kind, option.scopes) == ("int", {"init", "passwd"})
        assert (option.minimum, option.maximum, option.default) == (low, high, default)


def test_options_are_typed_and_checked_at_init(tmp_path: Path) -> None:
    config, _ = init(tmp_path / "a", encrypt_names="yes", allow_holes="off", scrypt_r="4")
    assert config == {"version": 1, "encrypt_names": True, "allow_holes": False}
    store = json.loads((tmp_path / "a" / "encrypt.json").read_text())
    assert (store["kdf"]["n"], store["kdf"]["r"], store["kdf"]["p"]) == (2**14, 4, 1)
    for bad, match in (
        ({"scrypt_n": 2**14 + 1}, "scrypt_n: 16385 is not a power of two"),
        ({"scrypt_n": 2**23}, "scrypt_n: 8388608 is above the maximum"),
        ({"scrypt_p": 0}, "scrypt_p: 0 is below the minimum 1"),
        ({"scrypt_r": "many"}, "scrypt_r: not an integer"),
        ({"encrypt_names": "perhaps"}, "encrypt_names: not a boolean"),
    ):
        with pytest.raises(ProviderError, match=match):
            init(tmp_path / "bad", **bad)
        assert not (tmp_path / "bad" / "encrypt.json").exists()


def test_recovery_key_at_init_comes_from_the_secrets_even_with_a_key_file(tmp_path: Path) -> None:
    keyfile = tmp_path / "key.bin"
    keyfile.write_bytes(b"key file bytes")
    meta = tmp_path / "meta"
    config, report = init(meta, b"unused", master=format_master_key(MASTER), keyfile=str(keyfile))
    assert parse_master_key(report["master_key"]) == bytearray(MASTER)
    layer = EncryptProvider.load(meta, config, SetupRequest(options={"keyfile": str(keyfile)}))
    round_trip_through(EncryptLayer(MASTER), layer)


def test_change_passphrase_keeps_or_replaces_the_scrypt_costs(tmp_path: Path) -> None:
    config, _ = init(tmp_path, scrypt_r=4)
    assert EncryptProvider.change_passphrase(tmp_path, Secrets(b"correct horse"), Secrets(b"b"))
    kdf = json.loads((tmp_path / "encrypt.json").read_text())["kdf"]
    assert (kdf["n"], kdf["r"], kdf["p"]) == (2**14, 4, 1)  # none given: the stored ones
    assert EncryptProvider.change_passphrase(
        tmp_path, Secrets(b"b"), Secrets(b"c"), options={"scrypt_n": "32768", "scrypt_p": 2}
    )
    kdf = json.loads((tmp_path / "encrypt.json").read_text())["kdf"]
    assert (kdf["n"], kdf["r"], kdf["p"]) == (2**15, 4, 2)
    EncryptProvider.load(tmp_path, config, SetupRequest(secrets=Secrets(b"c")))
    before = (tmp_path / "encrypt.json").read_bytes()
    for bad, match in (
        ({"scrypt_n": 3 * 2**14}, "not a power of two"),
        ({"encrypt_names": True}, "encrypt_names can only be given at init"),
    ):
        with pytest.raises(ProviderError, match=match):
            EncryptProvider.change_passphrase(tmp_path, Secrets(b"c"), Secrets(b"d"), options=bad)
    assert (tmp_path / "encrypt.json").read_bytes() == before


def old_last_valid_size(native_size: int) -> int:
    """The definition maintenance used to probe byte by byte: the largest size <= native_size
    whose logical size is defined."""
    return next(n for n in range(native_size, HDR - 1, -1) if logical_size_of(n) is not None)


class SizedFile(MemoryFile):
    """A lower file that only has a size (last_valid_size must not need its bytes)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self._size = size

    def size(self) -> int:
        return self._size


def test_last_valid_size_matches_the_probing_definition() -> None:
    layer = EncryptLayer(MASTER)
    sizes = [*range(HDR, HDR + 3 * NB + 64), *range(2**40 - 2 * NB, 2**40 + NB)]
    for size in sizes:
        lower = SizedFile(size)
        assert layer.last_valid_size(lower) == old_last_valid_size(size), size
        assert lower.reads == []
        assert logical_size_of(last_valid_size_of(size)) is not None
    for size in range(HDR):  # nothing is valid below the header: left for open() to report
        assert last_valid_size_of(size) == size


def test_generic_fsck_cuts_a_torn_tail_and_zeroes_bad_blocks() -> None:
    layer, lower, _upper, data = five_blocks()
    lower.data[HDR + NB + 100] ^= 1  # block 1 fails its tag
    lower.truncate(HDR + 4 * NB + 7)  # a torn tail of 7 bytes past block 3
    damage = layer.verify(lower, lambda _done: None)
    assert [(d.kind, d.lower_size, d.blocks) for d in damage] == [
        ("truncated tail", HDR + 4 * NB, []),
        ("bad blocks", None, [1]),
    ]
    layer.repair(lower, damage)
    assert lower.size() == HDR + 4 * NB
    repaired = layer.open(lower)
    assert repaired.read(0, 5 * BS) == data[:BS] + bytes(BS) + data[2 * BS : 4 * BS]
    assert layer.verify(lower, lambda _done: None) == []
