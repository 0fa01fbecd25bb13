"""The `encrypt` provider: AES-256-GCM file contents and an AES-SIV file-name codec.

The on-disk format is specified in docs/FORMAT-encrypt.md; keep the two in step. Everything
here is blocking and single-file: the filesystem decides where layers run (inline for
request-sized work, see isofs.sections), so this module starts no threads of its own.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import struct
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from isofs.provider import (
    CorruptData,
    KeyFileSecrets,
    Layer,
    Provider,
    ProviderError,
    RandomAccessFile,
    SecretSource,
    SetupRequest,
)

# --- content format --------------------------------------------------------------------------

MAGIC = b"ISOFSENC"
FORMAT_VERSION = 1
FILE_ID_SIZE = 16
_HEADER = struct.Struct(">8sHH4s16s")  # magic, version, flags, reserved, file id
HEADER_SIZE = _HEADER.size  # 32
BLOCK_SIZE = 4096
NONCE_SIZE = 12
TAG_SIZE = 16
BLOCK_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28
NATIVE_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD  # 4124
#: Blocks per lower write when zero-filling without holes (bounds memory to ~1 MiB).
_ZERO_FILL_BATCH = 256

_ZERO_NONCE = bytes(NONCE_SIZE)
_ZERO_NATIVE_BLOCK = bytes(NATIVE_BLOCK_SIZE)

# --- keys -------------------------------------------------------------------------------------

MASTER_KEY_SIZE = 32
CONFIG_VERSION = 1
KEYSTORE_NAME = "encrypt.json"
KEYSTORE_VERSION = 1
_WRAP_AAD_LABEL = b"isofs wrapped master key"
_INFO_CONTENT = b"isofs content v1"
_INFO_NAMES = b"isofs names v1"
_INFO_LINKS = b"isofs symlinks v1"
_INFO_XATTR_NAMES = b"isofs xattr names v1"
_INFO_XATTR_VALUES = b"isofs xattr values v1"
_INFO_KEY_CHECK = b"isofs key check v1"
DEFAULT_SCRYPT_N = 2**17
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
_SCRYPT_N_RANGE = (2**14, 2**22)
_SCRYPT_R_RANGE = (1, 32)
_SCRYPT_P_RANGE = (1, 16)
_SALT_SIZE = 16

# --- names ------------------------------------------------------------------------------------

NAME_MAX = 255
DIR_ID_SIZE = 16
RESERVED_PREFIX = ".isofs."
DIRIV_NAME = ".isofs.diriv"
LONGNAME_PREFIX = ".isofs.longname."
LONGNAME_SUFFIX = ".name"
_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _wipe(buf: bytearray | None) -> None:
    """Overwrite key material we own (best effort: immutable copies may still exist)."""
    if buf is not None:
        buf[:] = bytes(len(buf))


def _hkdf(master: bytes | bytearray, info: bytes, length: int) -> bytes:
    """A subkey of the master key; the master key itself never keys a cipher."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        bytes(master)
    )


def _b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: rejects other alphabets and non-canonical encodings."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if _b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data


# --- content layout ---------------------------------------------------------------------------


def logical_size_of(native_size: int) -> int | None:
    """Logical size for a native size, or None when no valid file has that native size."""
    if native_size < HEADER_SIZE:
        return None
    full, rest = divmod(native_size - HEADER_SIZE, NATIVE_BLOCK_SIZE)
    if rest == 0:
        return full * BLOCK_SIZE
    if rest <= BLOCK_OVERHEAD:
        return None
    return full * BLOCK_SIZE + rest - BLOCK_OVERHEAD


def native_size_of(logical_size: int) -> int:
    """Native size of a file holding `logical_size` plaintext bytes."""
    full, rest = divmod(logical_size, BLOCK_SIZE)
    return HEADER_SIZE + full * NATIVE_BLOCK_SIZE + (rest + BLOCK_OVERHEAD if rest else 0)


def _block_offset(n: int) -> int:
    return HEADER_SIZE + n * NATIVE_BLOCK_SIZE


class EncryptedFile:
    """The plaintext (upper) view of one encrypted native (lower) file."""

    def __init__(
        self, lower: RandomAccessFile, header: bytes, aead: AESGCM, *, allow_holes: bool
    ) -> None:
        self._lower = lower
        self._header = header
        self._aead = aead
        self._allow_holes = allow_holes

    @property
    def file_id(self) -> bytes:
        return self._header[-FILE_ID_SIZE:]

    # -- blocks --

    def _aad(self, n: int) -> bytes:
        # The whole header (magic, version, flags, file id) plus the block number.
        return self._header + n.to_bytes(8, "big")

    def _seal(self, first: int, plain: bytes | bytearray | memoryview) -> bytearray:
        """Native bytes of the blocks holding `plain`, block `first` onwards.

        One output buffer and one draw of nonces for the whole run: per-block Python work
        (allocations, joins, a getrandom call each), not AES, was most of the cost.
        """
        source = memoryview(plain)
        count = -(-len(source) // BLOCK_SIZE)
        native = bytearray(len(source) + count * BLOCK_OVERHEAD)
        out = memoryview(native)
        nonces = os.urandom(count * NONCE_SIZE)
        encrypt_into = self._aead.encrypt_into
        pos = 0
        for i in range(count):
            chunk = source[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE]
            nonce = nonces[i * NONCE_SIZE : (i + 1) * NONCE_SIZE]
            body = pos + NONCE_SIZE
            end = body + len(chunk) + TAG_SIZE
            out[pos:body] = nonce
            encrypt_into(nonce, chunk, self._aad(first + i), out[body:end])
            pos = end
        return native

    def _is_hole(self, raw: bytes | memoryview) -> bool:
        # Checking the nonce first keeps the common (non-hole) case to a 12-byte compare.
        return (
            self._allow_holes
            and raw[:NONCE_SIZE] == _ZERO_NONCE
            and raw == _ZERO_NATIVE_BLOCK[: len(raw)]
        )

    def _open(self, first: int, raw: bytes | bytearray | memoryview) -> bytearray:
        """Plaintext of the native blocks `raw` (block `first` onwards), in one buffer.

        A short last block is a torn write; a block that fails its tag was tampered with,
        moved or torn: either raises CorruptData naming the block.
        """
        source = memoryview(raw)
        full, rest = divmod(len(source), NATIVE_BLOCK_SIZE)
        if rest and rest <= BLOCK_OVERHEAD:
            raise CorruptData(f"encrypt: block {first + full} is truncated ({rest} native bytes)")
        plain = bytearray(len(source) - (full + bool(rest)) * BLOCK_OVERHEAD)
        out = memoryview(plain)
        decrypt_into = self._aead.decrypt_into
        for i in range(full + bool(rest)):
            block = source[i * NATIVE_BLOCK_SIZE : (i + 1) * NATIVE_BLOCK_SIZE]
            if self._is_hole(block):
                continue  # the buffer is zeros already
            start = i * BLOCK_SIZE
            try:
                decrypt_into(
                    block[:NONCE_SIZE],
                    block[NONCE_SIZE:],
                    self._aad(first + i),
                    out[start : start + len(block) - BLOCK_OVERHEAD],
                )
            except InvalidTag:
                raise CorruptData(
                    f"encrypt: block {first + i} failed authentication (tampered, moved or torn)"
                ) from None
        return plain

    def _read_raw(self, first: int, last: int) -> bytes:
        """Native bytes of blocks first..last with one lower read (all must exist)."""
        raw = self._lower.read(_block_offset(first), (last - first + 1) * NATIVE_BLOCK_SIZE)
        if len(raw) <= (last - first) * NATIVE_BLOCK_SIZE:
            n = first + -(-len(raw) // NATIVE_BLOCK_SIZE)
            raise CorruptData(f"encrypt: block {n} is missing (native file shrank)")
        return raw

    def _read_blocks(self, first: int, last: int) -> bytearray:
        return self._open(first, self._read_raw(first, last))

    # -- RandomAccessFile --

    def size(self) -> int:
        """Logical size; a torn last block (too short to hold a tag) still counts as a byte.

        Counting it keeps the good blocks readable (reads of the torn block fail with
        CorruptData) instead of failing the whole file.
        """
        native = self._lower.size()
        logical = logical_size_of(native)
        if logical is None:
            if native < HEADER_SIZE:
                raise CorruptData(f"encrypt: native size {native} is shorter than the header")
            return (native - HEADER_SIZE) // NATIVE_BLOCK_SIZE * BLOCK_SIZE + 1
        return logical

    def read(self, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size())
        if end <= offset:
            return b""
        first, last = offset // BLOCK_SIZE, (end - 1) // BLOCK_SIZE
        plain = self._read_blocks(first, last)
        start = offset - first * BLOCK_SIZE
        if start == 0 and len(plain) == end - offset:
            return plain  # the common aligned read: no copy
        return plain[start : start + end - offset]

    def write(self, offset: int, data: bytes) -> int:
        if offset < 0:
            raise ValueError("negative offset")
        length = len(data)
        if length == 0:
            return 0
        total = self.size()
        first = offset // BLOCK_SIZE
        if first * BLOCK_SIZE > total:
            # The gap spans whole blocks: extend to the write's first block, then write.
            self._grow(total, first * BLOCK_SIZE)
            total = first * BLOCK_SIZE
        end = offset + length
        last = (end - 1) // BLOCK_SIZE
        head_len = offset - first * BLOCK_SIZE
        tail_end = min((last + 1) * BLOCK_SIZE, total) - last * BLOCK_SIZE  # in block `last`
        tail_start = end - last * BLOCK_SIZE
        need_head = head_len > 0 and first * BLOCK_SIZE < total
        need_tail = tail_start < tail_end
        old_first = old_last = b""
        if first == last and (need_head or need_tail):
            old_first = old_last = self._read_blocks(first, first)
        else:
            if need_head:
                old_first = self._read_blocks(first, first)
            if need_tail:
                old_last = self._read_blocks(last, last)
        plain: bytes | bytearray = data
        if head_len or need_tail:
            head = old_first[:head_len].ljust(head_len, b"\0")  # zeros past the old EOF
            tail = old_last[tail_start:tail_end] if need_tail else b""
            plain = b"".join((head, data, tail))
        self._lower.write(_block_offset(first), self._seal(first, plain))
        return length

    def truncate(self, size: int) -> None:
        if size < 0:
            raise ValueError("negative size")
        if size == 0:
            # Needs no valid layout, so O_TRUNC can always reset a corrupt file.
            self._lower.truncate(HEADER_SIZE)
            return
        total = self.size()
        if size > total:
            self._grow(total, size)
            return
        if size == total:
            return
        block, rest = divmod(size, BLOCK_SIZE)
        if rest == 0:
            self._lower.truncate(_block_offset(block))
            return
        raw = self._read_raw(block, block)
        if self._is_hole(raw):
            self._lower.truncate(native_size_of(size))
            return
        plain = self._open(block, raw)[:rest]
        # Cut at the block boundary first: a crash in between leaves a valid, shorter file.
        self._lower.truncate(_block_offset(block))
        self._lower.write(_block_offset(block), self._seal(block, plain))

    def flush(self) -> None:
        self._lower.flush()

    # -- growing --

    def _grow(self, total: int, new: int) -> None:
        """Extend from `total` to `new` logical bytes, the new range reading as zeros."""
        last, rest = divmod(total, BLOCK_SIZE)
        next_block = last
        if rest:
            # The old partial last block must be padded (it is no longer last, or longer).
            next_block = last + 1
            raw = self._read_raw(last, last)
            if not self._is_hole(raw):
                fill = min(new, next_block * BLOCK_SIZE) - last * BLOCK_SIZE
                plain = self._open(last, raw).ljust(fill, b"\0")
                self._lower.write(_block_offset(last), self._seal(last, plain))
        if self._allow_holes:
            # Gap blocks become native zeros (sparse where the lower file supports it).
            self._lower.truncate(native_size_of(new))
            return
        end_block = -(-new // BLOCK_SIZE)
        for batch in range(next_block, end_block, _ZERO_FILL_BATCH):
            stop = min(new, (batch + _ZERO_FILL_BATCH) * BLOCK_SIZE)
            zeros = bytes(stop - batch * BLOCK_SIZE)
            self._lower.write(_block_offset(batch), self._seal(batch, zeros))


# --- names ------------------------------------------------------------------------------------


def new_dir_id() -> bytes:
    """A fresh random directory id, stored raw (16 bytes) in the directory's DIRIV_NAME file."""
    return os.urandom(DIR_ID_SIZE)


def parse_dir_id(data: bytes) -> bytes:
    """Validate the contents of a DIRIV_NAME file."""
    if len(data) != DIR_ID_SIZE:
        raise CorruptData(f"encrypt: {DIRIV_NAME} holds {len(data)} bytes, expected 16")
    return bytes(data)


def is_reserved_name(stored: str) -> bool:
    """Whether a native name is codec bookkeeping (diriv, long-name stub or sidecar).

    Encrypted names are base64url and so never start with '.', so these cannot collide.
    """
    return stored.startswith(RESERVED_PREFIX)


def _check_dir_id(dir_id: bytes) -> None:
    if len(dir_id) != DIR_ID_SIZE:
        raise ValueError("directory id must be 16 bytes")


def _name_bytes(name: str) -> bytes:
    raw = name.encode("utf-8", "surrogateescape")  # same bytes as os.fsencode on Linux
    if name in (".", "..") or not raw or b"/" in raw or b"\0" in raw:
        raise ValueError(f"invalid file name {name!r}")
    if len(raw) > NAME_MAX:
        raise ValueError(f"file name longer than {NAME_MAX} bytes")
    return raw


class NameCodec:
    """Deterministic, authenticated file-name encryption (AES-SIV, per-directory tweak)."""

    def __init__(self, names_key: bytes) -> None:
        if len(names_key) != 64:
            raise ValueError("names key must be 64 bytes (AES-256-SIV)")
        self._siv = AESSIV(bytes(names_key))

    @classmethod
    def from_master_key(cls, master_key: bytes | bytearray) -> NameCodec:
        return cls(_hkdf(master_key, _INFO_NAMES, 64))

    def encrypt_name(self, dir_id: bytes, name: str) -> str:
        """The encoded (possibly longer than NAME_MAX) name; see `disk_name` for storage."""
        _check_dir_id(dir_id)
        return _b64url_encode(self._siv.encrypt(_name_bytes(name), [bytes(dir_id)]))

    def decrypt_name(self, dir_id: bytes, stored: str) -> str:
        """Plaintext of an encoded name (resolve long-name stubs first with `from_long_name`)."""
        _check_dir_id(dir_id)
        try:
            sealed = _b64url_decode(stored)
        except ValueError:
            raise CorruptData(f"encrypt: name {stored[:40]!r} is not an encrypted name") from None
        if len(sealed) <= 16:
            raise CorruptData(f"encrypt: name {stored[:40]!r} is too short")
        try:
            raw = self._siv.decrypt(sealed, [bytes(dir_id)])
        except InvalidTag:
            raise CorruptData(
                f"encrypt: name {stored[:40]!r} failed authentication in this directory"
            ) from None
        name = raw.decode("utf-8", "surrogateescape")
        try:
            _name_bytes(name)
        except ValueError as exc:
            raise CorruptData(f"encrypt: decrypted name is invalid: {exc}") from None
        return name

    # The long-name scheme is independent of the key; static so callers need no codec.

    @staticmethod
    def long_name_stub(encoded: str) -> str:
        """`.isofs.longname.<base64url(sha256(encoded))>` for an encoded name."""
        digest = hashlib.sha256(encoded.encode("ascii")).digest()
        return LONGNAME_PREFIX + _b64url_encode(digest)

    @staticmethod
    def sidecar_name(stub: str) -> str:
        """Native name of the file holding a stub's full encoded name."""
        return stub + LONGNAME_SUFFIX

    @staticmethod
    def is_long_name_stub(stored: str) -> bool:
        return stored.startswith(LONGNAME_PREFIX) and not stored.endswith(LONGNAME_SUFFIX)

    @staticmethod
    def disk_name(encoded: str) -> tuple[str, bytes | None]:
        """(native name, sidecar contents or None) for an encoded name."""
        if len(encoded) <= NAME_MAX:
            return encoded, None
        return NameCodec.long_name_stub(encoded), encoded.encode("ascii")

    @staticmethod
    def from_long_name(stub: str, sidecar: bytes) -> str:
        """The encoded name held in a stub's sidecar, checked against the stub's hash."""
        try:
            encoded = sidecar.decode("ascii")
        except UnicodeDecodeError:
            raise CorruptData(f"encrypt: sidecar of {stub!r} is not ASCII") from None
        if NameCodec.long_name_stub(encoded) != stub:
            raise CorruptData(f"encrypt: sidecar of {stub!r} does not match its hash")
        return encoded


#: Associated data of a sealed symlink target (binds the ciphertext to its purpose).
_LINK_AAD = b"isofs symlink target v1"
#: Longest stored target Linux accepts (PATH_MAX including the terminating NUL).
_LINK_MAX = 4095


class LinkCodec:
    """Symlink targets: AES-256-GCM with a random nonce, stored as base64url.

    Not deterministic (unlike names): equal targets must not show as equal native targets,
    and nothing needs to look a target up by its ciphertext.
    """

    def __init__(self, links_key: bytes) -> None:
        if len(links_key) != 32:
            raise ValueError("links key must be 32 bytes (AES-256-GCM)")
        self._aead = AESGCM(bytes(links_key))

    @classmethod
    def from_master_key(cls, master_key: bytes | bytearray) -> LinkCodec:
        return cls(_hkdf(master_key, _INFO_LINKS, 32))

    def seal(self, target: bytes) -> bytes:
        """The native target for a view target (ValueError when it would be too long)."""
        if not target or b"\0" in target:
            raise ValueError("invalid symlink target")
        nonce = os.urandom(NONCE_SIZE)
        stored = _b64url_encode(nonce + self._aead.encrypt(nonce, target, _LINK_AAD)).encode()
        if len(stored) > _LINK_MAX:
            raise ValueError("symlink target too long once encrypted")
        return stored

    def open(self, stored: bytes) -> bytes:
        """The view target of a native target (CorruptData when it is not a sealed one)."""
        try:
            sealed = _b64url_decode(stored.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CorruptData("encrypt: symlink target is not an encrypted target") from None
        if len(sealed) <= BLOCK_OVERHEAD:
            raise CorruptData("encrypt: symlink target is too short to be encrypted")
        try:
            return self._aead.decrypt(sealed[:NONCE_SIZE], sealed[NONCE_SIZE:], _LINK_AAD)
        except InvalidTag:
            raise CorruptData("encrypt: symlink target failed authentication") from None


#: Only this namespace holds user data; security.*, system.* and trusted.* belong to the
#: kernel and must keep working natively (capabilities, ACLs), so they pass through.
_USER_XATTR = b"user."
_SEALED_XATTR = b"user.isofs."
#: Linux's limit on an extended attribute name (XATTR_NAME_MAX).
_XATTR_NAME_MAX = 255
_XATTR_NAME_AD = b"isofs xattr name v1"


class XattrCodec:
    """user.* extended attributes: AES-SIV names (deterministic, so they can be looked up)
    and AES-256-GCM values bound to their sealed name."""

    def __init__(self, names_key: bytes, values_key: bytes) -> None:
        if len(names_key) != 64 or len(values_key) != 32:
            raise ValueError("xattr keys must be 64 (AES-256-SIV) and 32 (AES-256-GCM) bytes")
        self._siv = AESSIV(bytes(names_key))
        self._aead = AESGCM(bytes(values_key))

    @classmethod
    def from_master_key(cls, master_key: bytes | bytearray) -> XattrCodec:
        return cls(
            _hkdf(master_key, _INFO_XATTR_NAMES, 64), _hkdf(master_key, _INFO_XATTR_VALUES, 32)
        )

    def seal_name(self, name: bytes) -> bytes:
        """The native name of a view name; other namespaces than user.* are unchanged.

        ValueError when the sealed name would be longer than Linux allows.
        """
        if not name.startswith(_USER_XATTR) or name == _USER_XATTR:
            return name
        rest = name[len(_USER_XATTR) :]
        sealed = _SEALED_XATTR + _b64url_encode(self._siv.encrypt(rest, [_XATTR_NAME_AD])).encode()
        if len(sealed) > _XATTR_NAME_MAX:
            raise ValueError("xattr name too long once encrypted")
        return sealed

    def open_name(self, stored: bytes) -> bytes:
        """The view name of a native name (CorruptData for a user.isofs.* name that does not
        decrypt; names of other forms are returned unchanged)."""
        if not stored.startswith(_SEALED_XATTR):
            return stored
        try:
            sealed = _b64url_decode(stored[len(_SEALED_XATTR) :].decode("ascii"))
            return _USER_XATTR + self._siv.decrypt(sealed, [_XATTR_NAME_AD])
        except (UnicodeDecodeError, ValueError, InvalidTag):
            raise CorruptData(f"encrypt: xattr name {stored[:40]!r} does not decrypt") from None

    def is_sealed(self, stored: bytes) -> bool:
        return stored.startswith(_SEALED_XATTR)

    def seal_value(self, sealed_name: bytes, value: bytes) -> bytes:
        nonce = os.urandom(NONCE_SIZE)
        return nonce + self._aead.encrypt(nonce, value, sealed_name)

    def open_value(self, sealed_name: bytes, stored: bytes) -> bytes:
        """The plaintext of a sealed value (CorruptData when tampered or moved to another
        name)."""
        if len(stored) < BLOCK_OVERHEAD:
            raise CorruptData("encrypt: xattr value too short to be encrypted")
        try:
            return self._aead.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], sealed_name)
        except InvalidTag:
            raise CorruptData("encrypt: xattr value failed authentication") from None


class EncryptedNames:
    """The `isofs.provider.NameTransform` of the encrypt layer: names and symlink targets."""

    dir_key_name = DIRIV_NAME

    def __init__(self, codec: NameCodec, links: LinkCodec, xattrs: XattrCodec) -> None:
        self.codec = codec
        self.links = links
        self.xattrs = xattrs

    def new_dir_key(self) -> bytes:
        return new_dir_id()

    def parse_dir_key(self, data: bytes) -> bytes:
        return parse_dir_id(data)

    def to_native(self, dir_key: bytes, name: str) -> tuple[str, bytes | None]:
        return NameCodec.disk_name(self.codec.encrypt_name(dir_key, name))

    def sidecar_name(self, native_name: str) -> str | None:
        if NameCodec.is_long_name_stub(native_name):
            return NameCodec.sidecar_name(native_name)
        return None

    def is_bookkeeping(self, native_name: str) -> bool:
        return native_name == DIRIV_NAME or (
            native_name.startswith(LONGNAME_PREFIX) and native_name.endswith(LONGNAME_SUFFIX)
        )

    def to_view(self, dir_key: bytes, native_name: str, sidecar: bytes | None) -> str:
        encoded = native_name
        if sidecar is not None:
            encoded = NameCodec.from_long_name(native_name, sidecar)
        return self.codec.decrypt_name(dir_key, encoded)

    def link_to_native(self, target: bytes) -> bytes:
        return self.links.seal(target)

    def link_to_view(self, stored: bytes) -> bytes:
        return self.links.open(stored)

    def xattr_name_to_native(self, name: bytes) -> bytes:
        return self.xattrs.seal_name(name)

    def xattr_name_to_view(self, stored: bytes) -> bytes:
        return self.xattrs.open_name(stored)

    def xattr_value_to_native(self, native_name: bytes, value: bytes) -> bytes:
        if not self.xattrs.is_sealed(native_name):
            return value
        return self.xattrs.seal_value(native_name, value)

    def xattr_value_to_view(self, native_name: bytes, stored: bytes) -> bytes:
        if not self.xattrs.is_sealed(native_name):
            return stored
        return self.xattrs.open_value(native_name, stored)


# --- the layer --------------------------------------------------------------------------------


class EncryptLayer(Layer):
    """Opens and creates files in the encrypted format with one master key's subkeys."""

    block_size = BLOCK_SIZE

    def __init__(
        self,
        master_key: bytes | bytearray,
        *,
        encrypt_names: bool = False,
        allow_holes: bool = True,
    ) -> None:
        if len(master_key) != MASTER_KEY_SIZE:
            raise ValueError("master key must be 32 bytes")
        # Only subkeys are kept; the caller wipes its master-key buffer.
        self._aead = AESGCM(_hkdf(master_key, _INFO_CONTENT, 32))
        self.allow_holes = allow_holes
        self.names: NameCodec | None = (
            NameCodec.from_master_key(master_key) if encrypt_names else None
        )
        self.name_transform = (
            EncryptedNames(
                self.names,
                LinkCodec.from_master_key(master_key),
                XattrCodec.from_master_key(master_key),
            )
            if self.names is not None
            else None
        )

    def header_size(self) -> int:
        return HEADER_SIZE

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        head = lower.read(0, HEADER_SIZE)
        if len(head) != HEADER_SIZE:
            return False
        magic, version, _flags, _reserved, _file_id = _HEADER.unpack(head)
        return magic == MAGIC and version == FORMAT_VERSION

    def open(self, lower: RandomAccessFile) -> EncryptedFile:
        head = bytes(lower.read(0, HEADER_SIZE))
        if len(head) != HEADER_SIZE:
            raise CorruptData(f"encrypt: header truncated ({len(head)} of {HEADER_SIZE} bytes)")
        magic, version, flags, reserved, _file_id = _HEADER.unpack(head)
        if magic != MAGIC:
            raise CorruptData("encrypt: bad magic, not an encrypted file")
        if version != FORMAT_VERSION:
            raise CorruptData(f"encrypt: unsupported format version {version}")
        if flags or any(reserved):
            raise CorruptData(f"encrypt: unknown header flags {flags:#x}/reserved bytes")
        return EncryptedFile(lower, head, self._aead, allow_holes=self.allow_holes)

    def create(self, lower: RandomAccessFile) -> EncryptedFile:
        if lower.size() != 0:
            raise ValueError("encrypt: create() needs an empty lower file")
        head = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, bytes(4), os.urandom(FILE_ID_SIZE))
        lower.write(0, head)
        return EncryptedFile(lower, head, self._aead, allow_holes=self.allow_holes)

    def logical_size(self, lower_size: int) -> int | None:
        return logical_size_of(lower_size)


# --- master key handling ----------------------------------------------------------------------


def format_master_key(key: bytes | bytearray) -> str:
    """Recovery form of a master key: 64 hex digits in 8 dash-separated groups of 8."""
    digits = bytes(key).hex()
    return "-".join(digits[i : i + 8] for i in range(0, len(digits), 8))


def parse_master_key(text: str | bytes | bytearray) -> bytearray:
    """A master key from its recovery form (separators optional) or from 32 raw bytes."""
    if isinstance(text, bytes | bytearray):
        if len(text) == MASTER_KEY_SIZE:
            return bytearray(text)
        try:
            text = bytes(text).decode("ascii")
        except UnicodeDecodeError:
            raise ProviderError("master key is neither 32 bytes nor hex") from None
    digits = re.sub(r"[\s:_-]", "", text)
    try:
        key = bytearray(binascii.unhexlify(digits))
    except (binascii.Error, ValueError):
        raise ProviderError("master key must be 64 hex digits") from None
    if len(key) != MASTER_KEY_SIZE:
        raise ProviderError(f"master key must be 64 hex digits, got {len(digits)}")
    return key


def _option_int(options: Mapping[str, Any], key: str, default: int, limits: tuple[int, int]) -> int:
    value = options.get(key, default)
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise ProviderError(f"encrypt: option {key} must be an integer") from None
    if not limits[0] <= number <= limits[1]:
        raise ProviderError(f"encrypt: option {key}={number} outside {limits[0]}..{limits[1]}")
    return number


def _option_bool(options: Mapping[str, Any], key: str, default: bool) -> bool:
    value = options.get(key, default)
    if isinstance(value, str):
        lowered = value.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ProviderError(f"encrypt: option {key} must be a boolean")
    return bool(value)


def _scrypt_params(n: int, r: int, p: int) -> None:
    if n & (n - 1):
        raise ProviderError(f"encrypt: scrypt N={n} is not a power of two")
    for value, limits, label in (
        (n, _SCRYPT_N_RANGE, "N"),
        (r, _SCRYPT_R_RANGE, "r"),
        (p, _SCRYPT_P_RANGE, "p"),
    ):
        if not limits[0] <= value <= limits[1]:
            raise ProviderError(f"encrypt: scrypt {label}={value} outside {limits[0]}..{limits[1]}")


def _wrap_aad(version: int) -> bytes:
    return _WRAP_AAD_LABEL + version.to_bytes(2, "big")


def _key_check(master: bytes | bytearray) -> bytes:
    return _hkdf(master, _INFO_KEY_CHECK, 16)


def _wrap(master: bytearray, passphrase: bytes, n: int, r: int, p: int) -> dict[str, Any]:
    """The keystore document holding `master` wrapped under `passphrase`."""
    if not passphrase:
        raise ProviderError("encrypt: empty passphrase")
    _scrypt_params(n, r, p)
    salt = os.urandom(_SALT_SIZE)
    kek = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
    nonce = os.urandom(NONCE_SIZE)
    sealed = AESGCM(kek).encrypt(nonce, bytes(master), _wrap_aad(KEYSTORE_VERSION))
    b64 = base64.b64encode
    return {
        "version": KEYSTORE_VERSION,
        "kdf": {"name": "scrypt", "salt": b64(salt).decode(), "n": n, "r": r, "p": p},
        "wrap": {
            "cipher": "AES-256-GCM",
            "nonce": b64(nonce).decode(),
            "sealed": b64(sealed).decode(),
        },
        "key_check": b64(_key_check(master)).decode(),
    }


def _read_keystore(meta_dir: Path) -> dict[str, Any]:
    path = Path(meta_dir) / KEYSTORE_NAME
    try:
        store = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ProviderError(f"encrypt: key file {KEYSTORE_NAME} missing from metadata") from None
    except (OSError, ValueError) as exc:
        raise ProviderError(f"encrypt: cannot read {KEYSTORE_NAME}: {exc}") from None
    version = store.get("version") if isinstance(store, dict) else None
    if version != KEYSTORE_VERSION:
        raise ProviderError(
            f"encrypt: {KEYSTORE_NAME} has unsupported version {version!r} "
            f"(this isofs reads version {KEYSTORE_VERSION})"
        )
    return store


def _store_field(store: Mapping[str, Any], *keys: str) -> Any:
    value: Any = store
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise ProviderError(f"encrypt: {KEYSTORE_NAME} lacks {'.'.join(keys)}")
        value = value[key]
    return value


def _store_bytes(store: Mapping[str, Any], *keys: str) -> bytes:
    try:
        return base64.b64decode(_store_field(store, *keys), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has a malformed {'.'.join(keys)}") from None


def _unwrap(store: Mapping[str, Any], passphrase: bytes) -> bytearray:
    kdf = _store_field(store, "kdf")
    if _store_field(store, "kdf", "name") != "scrypt":
        raise ProviderError(f"encrypt: unknown key derivation {kdf.get('name')!r}")
    try:
        n, r, p = (int(_store_field(store, "kdf", k)) for k in ("n", "r", "p"))
    except (TypeError, ValueError):
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has malformed scrypt parameters") from None
    _scrypt_params(n, r, p)
    salt = _store_bytes(store, "kdf", "salt")
    nonce = _store_bytes(store, "wrap", "nonce")
    sealed = _store_bytes(store, "wrap", "sealed")
    if len(nonce) != NONCE_SIZE:
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has a malformed wrap.nonce")
    kek = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
    try:
        master = bytearray(AESGCM(kek).decrypt(nonce, sealed, _wrap_aad(KEYSTORE_VERSION)))
    except InvalidTag:
        raise ProviderError("wrong passphrase or key file") from None
    if len(master) != MASTER_KEY_SIZE:
        _wipe(master)
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} holds a malformed master key")
    return master


def _check_master(store: Mapping[str, Any], master: bytearray) -> None:
    if _key_check(master) != _store_bytes(store, "key_check"):
        _wipe(master)
        raise ProviderError("wrong master key")


def _unlock(
    store: Mapping[str, Any], secrets: SecretSource | None, prompt: str = "Passphrase: "
) -> bytearray:
    """The master key from a recovery key if the secrets offer one, else from a passphrase."""
    if secrets is None:
        raise ProviderError("encrypt: no passphrase, key file or master key given")
    recovery = secrets.master_key()
    if recovery is not None:
        master = parse_master_key(recovery)
        _check_master(store, master)
        return master
    return _unwrap(store, secrets.passphrase(prompt))


def _secrets_for(options: Mapping[str, Any], secrets: SecretSource | None) -> SecretSource | None:
    keyfile = options.get("keyfile")
    return KeyFileSecrets(keyfile) if keyfile else secrets


def _write_atomic(path: Path, document: Mapping[str, Any]) -> None:
    """Replace `path` with `document` so a crash leaves the old or the new file, never neither."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    tmp = path.with_name(f"{path.name}.tmp-{os.urandom(4).hex()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_config_version(config: Mapping[str, Any]) -> None:
    version = config.get("version")
    if version != CONFIG_VERSION:
        raise ProviderError(
            f"encrypt: unsupported config version {version!r} "
            f"(this isofs reads version {CONFIG_VERSION})"
        )


class EncryptProvider(Provider):
    """Set-up, loading and passphrase changes for the `encrypt` provider.

    Options for `initialise`: encrypt_names (bool, default false), allow_holes (bool, default
    true), scrypt_n / scrypt_r / scrypt_p, keyfile (path whose bytes are the passphrase),
    masterkey (recovery hex to re-use instead of a fresh random key) and `_report`: a mutable
    dict into which the recovery form of the master key is put under "master_key" so the CLI
    can print it once (it is never part of the returned config). `load` accepts keyfile.
    """

    name = "encrypt"

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        options = request.options
        Path(meta_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        path = Path(meta_dir) / KEYSTORE_NAME
        if path.exists():
            raise ProviderError(f"encrypt: {KEYSTORE_NAME} already exists; refusing to replace it")
        encrypt_names = _option_bool(options, "encrypt_names", False)
        allow_holes = _option_bool(options, "allow_holes", True)
        n = _option_int(options, "scrypt_n", DEFAULT_SCRYPT_N, _SCRYPT_N_RANGE)
        r = _option_int(options, "scrypt_r", DEFAULT_SCRYPT_R, _SCRYPT_R_RANGE)
        p = _option_int(options, "scrypt_p", DEFAULT_SCRYPT_P, _SCRYPT_P_RANGE)
        _scrypt_params(n, r, p)
        secrets = _secrets_for(options, request.secrets)
        if secrets is None:
            raise ProviderError("encrypt: no passphrase or key file given")
        given = options.get("masterkey")
        master = parse_master_key(given) if given else bytearray(os.urandom(MASTER_KEY_SIZE))
        try:
            passphrase = secrets.passphrase("New passphrase: ", confirm=True)
            document = _wrap(master, passphrase, n, r, p)
            _write_atomic(path, document)
            report = options.get("_report")
            if isinstance(report, MutableMapping):
                report["master_key"] = format_master_key(master)
        finally:
            _wipe(master)
        return {
            "version": CONFIG_VERSION,
            "encrypt_names": encrypt_names,
            "allow_holes": allow_holes,
        }

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> EncryptLayer:
        _check_config_version(config)
        store = _read_keystore(Path(meta_dir))
        master = _unlock(store, _secrets_for(request.options, request.secrets))
        try:
            return EncryptLayer(
                master,
                encrypt_names=bool(config.get("encrypt_names", False)),
                allow_holes=bool(config.get("allow_holes", True)),
            )
        finally:
            _wipe(master)

    @classmethod
    def change_passphrase(
        cls,
        meta_dir: Path,
        old_secrets: SecretSource,
        new_secrets: SecretSource,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> None:
        """Re-wrap the same master key under a new passphrase (`isofs passwd`).

        The old side may give the recovery key instead of the passphrase; use KeyFileSecrets
        for key files. scrypt_n/r/p in `options` override the stored parameters.
        """
        path = Path(meta_dir) / KEYSTORE_NAME
        store = _read_keystore(Path(meta_dir))
        options = options or {}
        kdf = store.get("kdf", {})
        n = _option_int(options, "scrypt_n", int(kdf.get("n", DEFAULT_SCRYPT_N)), _SCRYPT_N_RANGE)
        r = _option_int(options, "scrypt_r", int(kdf.get("r", DEFAULT_SCRYPT_R)), _SCRYPT_R_RANGE)
        p = _option_int(options, "scrypt_p", int(kdf.get("p", DEFAULT_SCRYPT_P)), _SCRYPT_P_RANGE)
        master = _unlock(store, old_secrets, "Old passphrase: ")
        try:
            document = _wrap(
                master, new_secrets.passphrase("New passphrase: ", confirm=True), n, r, p
            )
        finally:
            _wipe(master)
        _write_atomic(path, document)
