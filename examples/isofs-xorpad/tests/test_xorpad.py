"""Tests of the xorpad example provider (no FUSE needed).

`decode_native` below is written from the format in the module docstring and README, not from
the implementation, so the documentation and the code are checked against each other.
"""

from __future__ import annotations

import os
from importlib.metadata import distribution
from pathlib import Path

import isofs_xorpad
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from isofs_xorpad import xorpad
from isofs_xorpad.xorpad import (
    HEADER_SIZE,
    MAGIC,
    XorPadFile,
    XorPadLayer,
    XorPadProvider,
    keystream,
    xor_at,
)

from isofs.provider import (
    CorruptData,
    MemoryFile,
    ProviderError,
    SetupRequest,
    Stack,
    available_providers,
    load_provider,
)

MiB = 1 << 20


class FdFile:
    """A RandomAccessFile over a real file descriptor, as the core's native file is."""

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


def decode_native(native: bytes) -> bytes:
    """Decode a native xorpad file from the documented format only (slow and obvious)."""
    assert len(native) >= 16
    assert native[:8] == b"XORPAD01"
    seed = int.from_bytes(native[8:16], "big")
    return bytes(b ^ ((i * 131 + 7 + seed) & 0xFF) for i, b in enumerate(native[16:]))


def model_write(model: bytearray, offset: int, data: bytes) -> None:
    """POSIX pwrite on a bytearray: a gap reads as zeros; an empty write changes nothing."""
    if data and offset > len(model):
        model.extend(bytes(offset - len(model)))
    model[offset : offset + len(data)] = data


def new_file(seed: int = 0) -> tuple[MemoryFile, XorPadFile]:
    lower = MemoryFile()
    return lower, XorPadLayer(seed).create(lower)


# --- format -----------------------------------------------------------------------------------


def test_create_writes_only_the_header() -> None:
    lower, upper = new_file(seed=0x0102030405060708)
    assert bytes(lower.data) == b"XORPAD01" + bytes(range(1, 9))
    assert HEADER_SIZE == 16 and MAGIC == b"XORPAD01"
    assert upper.size() == 0
    assert upper.read(0, 100) == b""


def test_create_refuses_a_non_empty_lower_file() -> None:
    with pytest.raises(ValueError):
        XorPadLayer().create(MemoryFile(b"x"))


@pytest.mark.parametrize("seed", [0, 1, 255, 256, 2**64 - 1])
def test_native_bytes_follow_the_documented_format(seed: int) -> None:
    lower, upper = new_file(seed)
    content = os.urandom(1000) + bytes(700)
    upper.write(0, content)
    assert lower.size() == len(content) + 16
    assert decode_native(bytes(lower.data)) == content
    # The transformation changes content as well as size.
    assert bytes(lower.data[16:]) != content


def test_keystream_is_position_dependent_with_period_256() -> None:
    stream = keystream(0, 0, 1024)
    assert stream == bytes((i * 131 + 7) & 0xFF for i in range(1024))
    assert len(set(stream[:256])) == 256  # every byte value once per period
    assert stream[:256] * 4 == stream
    for offset in (0, 1, 255, 256, 257, 1000, 10**9 + 3):
        for size in (0, 1, 255, 256, 257, 3000):
            expected = bytes((i * 131 + 7 + 9) & 0xFF for i in range(offset, offset + size))
            assert keystream(9, offset, size) == expected
    # Moving bytes is visible: the same data stored one byte further encodes differently.
    data = b"A" * 64
    assert xor_at(0, 0, data) != xor_at(0, 1, data)
    assert xor_at(3, 0, data) != xor_at(4, 0, data)


def test_xor_at_is_its_own_inverse_and_accepts_buffers() -> None:
    data = os.urandom(5000)
    encoded = xor_at(77, 12345, data)
    assert xor_at(77, 12345, encoded) == data
    assert xor_at(77, 12345, memoryview(bytearray(data))) == encoded
    assert xor_at(77, 12345, b"") == b""


# --- round trips ------------------------------------------------------------------------------


def test_round_trips_at_unaligned_offsets() -> None:
    lower, upper = new_file(seed=42)
    model = bytearray()
    for offset, size in [(0, 10), (5, 300), (255, 2), (1000, 4096), (3, 1), (256, 256)]:
        data = os.urandom(size)
        upper.write(offset, data)
        model_write(model, offset, data)
    assert upper.size() == len(model)
    assert upper.read(0, 10**6) == bytes(model)
    for offset, size in [(0, 1), (1, 254), (255, 3), (511, 1000), (len(model) - 1, 5)]:
        assert upper.read(offset, size) == bytes(model[offset : offset + size])
    assert upper.read(len(model), 10) == b""
    assert upper.read(len(model) + 10, 10) == b""
    assert upper.read(3, 0) == b""
    assert decode_native(bytes(lower.data)) == bytes(model)


def test_reopening_reads_the_same_content() -> None:
    lower, upper = new_file(seed=7)
    data = os.urandom(3 * MiB + 17)
    assert upper.write(0, data) == len(data)
    again = XorPadLayer(seed=7).open(lower)
    assert again.size() == len(data)
    assert again.read(0, len(data)) == data


def test_the_header_seed_decodes_not_the_layer_seed() -> None:
    lower, upper = new_file(seed=5)
    upper.write(0, b"hello, world")
    other = XorPadLayer(seed=9).open(lower)
    assert other.seed == 5
    assert other.read(0, 100) == b"hello, world"


def test_real_file_round_trip(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        upper = XorPadLayer(seed=3).create(FdFile(fd))
        data = os.urandom(MiB + 123)
        upper.write(100, data)
        upper.truncate(MiB)
        expected = bytes(100) + data[: MiB - 100]
        assert upper.read(0, 2 * MiB) == expected
        assert os.fstat(fd).st_size == MiB + 16
        assert decode_native((tmp_path / "f").read_bytes()) == expected
    finally:
        os.close(fd)


def test_negative_arguments_are_rejected() -> None:
    _, upper = new_file()
    with pytest.raises(ValueError):
        upper.read(-1, 1)
    with pytest.raises(ValueError):
        upper.read(0, -1)
    with pytest.raises(ValueError):
        upper.write(-1, b"x")
    with pytest.raises(ValueError):
        upper.truncate(-1)


def test_empty_write_changes_nothing() -> None:
    lower, upper = new_file()
    assert upper.write(1000, b"") == 0
    assert upper.size() == 0
    assert lower.writes == [(0, 16)]


def test_flush_is_passed_down() -> None:
    lower, upper = new_file()
    upper.flush()
    assert lower.flushes == 1


# --- holes read as zeros ----------------------------------------------------------------------


def test_write_past_end_fills_the_gap_with_logical_zeros() -> None:
    lower, upper = new_file(seed=11)
    upper.write(0, b"abc")
    upper.write(1000, b"xyz")
    assert upper.size() == 1003
    assert upper.read(0, 2000) == b"abc" + bytes(997) + b"xyz"
    # Stored as the keystream (XOR'ed zeros), not as native zeros.
    assert bytes(lower.data[16 + 3 : 16 + 1000]) == keystream(11, 3, 997)
    # Gap and data went down in a single lower write.
    assert lower.writes[-1] == (16 + 3, 1000)


def test_truncate_extend_reads_zeros() -> None:
    lower, upper = new_file(seed=200)
    upper.write(0, b"\xff" * 10)
    upper.truncate(5000)
    assert upper.size() == 5000
    assert upper.read(0, 6000) == b"\xff" * 10 + bytes(4990)
    assert decode_native(bytes(lower.data)) == b"\xff" * 10 + bytes(4990)


def test_shrink_then_grow_does_not_resurrect_old_bytes() -> None:
    _, upper = new_file(seed=1)
    upper.write(0, b"\x01" * 1000)
    upper.truncate(10)
    assert upper.read(0, 2000) == b"\x01" * 10
    upper.truncate(1000)
    assert upper.read(0, 2000) == b"\x01" * 10 + bytes(990)
    upper.truncate(10)
    upper.write(500, b"z")
    assert upper.read(0, 2000) == b"\x01" * 10 + bytes(490) + b"z"


def test_truncate_to_the_same_size_writes_nothing() -> None:
    lower, upper = new_file()
    upper.write(0, b"data")
    before = list(lower.writes)
    upper.truncate(4)
    assert lower.writes == before
    assert upper.read(0, 10) == b"data"


def test_large_gaps_are_filled_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xorpad, "FILL_CHUNK", 1000)
    lower, upper = new_file(seed=13)
    upper.truncate(3500)
    assert [size for _, size in lower.writes[1:]] == [1000, 1000, 1000, 500]
    upper.write(7777, b"end")
    assert max(size for _, size in lower.writes[1:]) <= 1000
    assert upper.read(0, 10**4) == bytes(7777) + b"end"
    assert decode_native(bytes(lower.data)) == bytes(7777) + b"end"


def test_truncate_to_zero_resets_even_a_damaged_file() -> None:
    lower, upper = new_file()
    upper.write(0, b"something")
    lower.truncate(5)  # the header has been cut short behind our back
    with pytest.raises(CorruptData):
        upper.size()
    with pytest.raises(CorruptData):
        upper.write(100, b"x")
    upper.truncate(0)
    assert upper.size() == 0
    assert lower.size() == 16


# --- model test -------------------------------------------------------------------------------

_offsets = st.integers(min_value=0, max_value=3000)
_operations = st.lists(
    st.one_of(
        st.tuples(st.just("write"), _offsets, st.binary(min_size=0, max_size=600)),
        st.tuples(st.just("truncate"), _offsets),
        st.tuples(st.just("read"), _offsets, st.integers(min_value=0, max_value=1200)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(min_value=0, max_value=2**64 - 1), operations=_operations)
def test_random_operations_match_a_bytearray_model(seed: int, operations: list[tuple]) -> None:
    lower, upper = new_file(seed)
    model = bytearray()
    for operation in operations:
        if operation[0] == "write":
            _, offset, data = operation
            model_write(model, offset, data)
            assert upper.write(offset, data) == len(data)
        elif operation[0] == "truncate":
            _, size = operation
            del model[size:]
            model.extend(bytes(size - len(model)))
            upper.truncate(size)
        else:
            _, offset, size = operation
            assert upper.read(offset, size) == bytes(model[offset : offset + size])
        assert upper.size() == len(model)
        assert XorPadLayer().logical_size(lower.size()) == len(model)
    assert decode_native(bytes(lower.data)) == bytes(model)
    assert XorPadLayer().open(lower).read(0, len(model) + 1) == bytes(model)


# --- formatted or not, sizes ------------------------------------------------------------------


@pytest.mark.parametrize(
    "native",
    [
        b"",
        b"XORPAD0",
        b"XORPAD01",
        b"XORPAD01" + bytes(7),
        b"XORPAD02" + bytes(8),
        b"xorpad01" + bytes(8),
        b"plain text file that is long enough",
    ],
)
def test_unformatted_files_are_recognised(native: bytes) -> None:
    layer = XorPadLayer()
    lower = MemoryFile(native)
    assert not layer.is_formatted(lower)
    assert Stack([layer]).open(lower) is None
    with pytest.raises(CorruptData):
        layer.open(lower)


@pytest.mark.parametrize("native", [b"XORPAD01" + bytes(8), b"XORPAD01" + bytes(8) + b"tail"])
def test_formatted_files_are_recognised(native: bytes) -> None:
    layer = XorPadLayer()
    assert layer.header_size() == 16
    assert layer.block_size == 1
    assert layer.is_formatted(MemoryFile(native))


def test_logical_size() -> None:
    layer = XorPadLayer()
    assert [layer.logical_size(n) for n in range(16)] == [None] * 16
    assert layer.logical_size(16) == 0
    assert layer.logical_size(17) == 1
    assert layer.logical_size(2**40 + 16) == 2**40


# --- composition through the core's Stack -----------------------------------------------------


def test_stack_of_two_xorpad_layers() -> None:
    stack = Stack([XorPadLayer(seed=1), XorPadLayer(seed=2)])
    assert stack.block_size == 1
    native = MemoryFile()
    upper = stack.create(native)
    upper.write(10, b"stacked")
    assert native.size() == 10 + 7 + 32
    assert stack.logical_size(native.size()) == 17
    assert stack.logical_size(20) is None  # the inner header does not fit
    reopened = stack.open(native)
    assert reopened is not None
    assert reopened.read(0, 100) == bytes(10) + b"stacked"
    # The outer layer alone sees a formatted file whose content is the inner layer's bytes.
    outer = XorPadLayer().open(native)
    assert outer.read(0, 8) == b"XORPAD01"


# --- the provider and its discovery -----------------------------------------------------------


def test_initialise_and_load(tmp_path: Path) -> None:
    config = XorPadProvider.initialise(tmp_path, SetupRequest())
    assert config == {"version": 1, "seed": 0}
    assert list(tmp_path.iterdir()) == []  # no state outside the config
    layer = XorPadProvider.load(tmp_path, config, SetupRequest())
    assert isinstance(layer, XorPadLayer) and layer.seed == 0


@pytest.mark.parametrize(
    ("given", "seed"), [(42, 42), ("42", 42), ("0x2a", 42), (2**64 - 1, 2**64 - 1)]
)
def test_seed_option(tmp_path: Path, given: object, seed: int) -> None:
    config = XorPadProvider.initialise(tmp_path, SetupRequest(options={"seed": given}))
    assert config["seed"] == seed
    layer = XorPadProvider.load(tmp_path, config, SetupRequest())
    lower = MemoryFile()
    layer.create(lower)
    assert int.from_bytes(lower.data[8:16], "big") == seed


@pytest.mark.parametrize("given", [-1, 2**64, "abc", "", None, True, 1.5j])
def test_bad_seeds_are_refused(tmp_path: Path, given: object) -> None:
    with pytest.raises(ProviderError, match="seed"):
        XorPadProvider.initialise(tmp_path, SetupRequest(options={"seed": given}))


def test_load_refuses_an_unknown_config_version(tmp_path: Path) -> None:
    with pytest.raises(ProviderError, match="version"):
        XorPadProvider.load(tmp_path, {"version": 2, "seed": 0}, SetupRequest())


def test_discovered_through_the_entry_point() -> None:
    assert "xorpad" in available_providers(), "install it: pip install -e examples/isofs-xorpad"
    assert load_provider("xorpad") is XorPadProvider
    assert XorPadProvider.name == "xorpad"
    assert isofs_xorpad.XorPadProvider is XorPadProvider
    (entry,) = [
        ep for ep in distribution("isofs-xorpad").entry_points if ep.group == "isofs.providers"
    ]
    assert (entry.name, entry.value) == ("xorpad", "isofs_xorpad:XorPadProvider")
