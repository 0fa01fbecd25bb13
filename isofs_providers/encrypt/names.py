"""File names: AES-SIV per directory, and long names kept as a stub plus a sidecar file.

Specified in docs/FORMAT-encrypt.md §3. Names are deterministic within a directory (so a
name can be looked up by its ciphertext) and differ across directories (the directory id is
the SIV's associated data), so equal names in two directories do not show as equal.
"""

from __future__ import annotations

import hashlib
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from isofs.provider import CorruptData
from isofs_providers.encrypt.kdf import INFO_NAMES, b64url_decode, b64url_encode, subkey

NAME_MAX = 255
DIR_ID_SIZE = 16
DIRIV_NAME = ".isofs.diriv"
LONGNAME_PREFIX = ".isofs.longname."
LONGNAME_SUFFIX = ".name"


def new_dir_id() -> bytes:
    """A fresh random directory id, stored raw (16 bytes) in the directory's DIRIV_NAME file."""
    return os.urandom(DIR_ID_SIZE)


def parse_dir_id(data: bytes) -> bytes:
    """Validate the contents of a DIRIV_NAME file."""
    if len(data) != DIR_ID_SIZE:
        raise CorruptData(f"encrypt: {DIRIV_NAME} holds {len(data)} bytes, expected 16")
    return bytes(data)


def is_bookkeeping_name(native_name: str) -> bool:
    """The directory-id file and long-name sidecars: names no decrypted view shows.

    A long-name stub is not one of them: it is the file itself, shown under its full name.
    Encrypted names are base64url and so never start with '.': these cannot collide.
    """
    return native_name == DIRIV_NAME or (
        native_name.startswith(LONGNAME_PREFIX) and native_name.endswith(LONGNAME_SUFFIX)
    )


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
        return cls(subkey(master_key, INFO_NAMES, 64))

    def encrypt_name(self, dir_id: bytes, name: str) -> str:
        """The encoded (possibly longer than NAME_MAX) name; see `disk_name` for storage."""
        _check_dir_id(dir_id)
        return b64url_encode(self._siv.encrypt(_name_bytes(name), [bytes(dir_id)]))

    def decrypt_name(self, dir_id: bytes, stored: str) -> str:
        """Plaintext of an encoded name (resolve long-name stubs first with `from_long_name`)."""
        _check_dir_id(dir_id)
        try:
            sealed = b64url_decode(stored)
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
        return LONGNAME_PREFIX + b64url_encode(digest)

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
