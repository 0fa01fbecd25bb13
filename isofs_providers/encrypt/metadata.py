"""Metadata that leaks as much as names: symlink targets and user.* extended attributes.

Specified in docs/FORMAT-encrypt.md §3. Both are sealed only when names are encrypted.
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV

from isofs.provider import CorruptData
from isofs_providers.encrypt.kdf import (
    GCM_OVERHEAD,
    INFO_LINKS,
    INFO_XATTR_NAMES,
    INFO_XATTR_VALUES,
    NONCE_SIZE,
    b64url_decode,
    b64url_encode,
    subkey,
)

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
        return cls(subkey(master_key, INFO_LINKS, 32))

    def seal(self, target: bytes) -> bytes:
        """The native target for a view target (ValueError when it would be too long)."""
        if not target or b"\0" in target:
            raise ValueError("invalid symlink target")
        nonce = os.urandom(NONCE_SIZE)
        stored = b64url_encode(nonce + self._aead.encrypt(nonce, target, _LINK_AAD)).encode()
        if len(stored) > _LINK_MAX:
            raise ValueError("symlink target too long once encrypted")
        return stored

    def open(self, stored: bytes) -> bytes:
        """The view target of a native target (CorruptData when it is not a sealed one)."""
        try:
            sealed = b64url_decode(stored.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            raise CorruptData("encrypt: symlink target is not an encrypted target") from None
        if len(sealed) <= GCM_OVERHEAD:
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
            subkey(master_key, INFO_XATTR_NAMES, 64), subkey(master_key, INFO_XATTR_VALUES, 32)
        )

    def seal_name(self, name: bytes) -> bytes:
        """The native name of a view name; other namespaces than user.* are unchanged.

        ValueError when the sealed name would be longer than Linux allows.
        """
        if not name.startswith(_USER_XATTR) or name == _USER_XATTR:
            return name
        rest = name[len(_USER_XATTR) :]
        sealed = _SEALED_XATTR + b64url_encode(self._siv.encrypt(rest, [_XATTR_NAME_AD])).encode()
        if len(sealed) > _XATTR_NAME_MAX:
            raise ValueError("xattr name too long once encrypted")
        return sealed

    def open_name(self, stored: bytes) -> bytes:
        """The view name of a native name (CorruptData for a user.isofs.* name that does not
        decrypt; names of other forms are returned unchanged)."""
        if not stored.startswith(_SEALED_XATTR):
            return stored
        try:
            sealed = b64url_decode(stored[len(_SEALED_XATTR) :].decode("ascii"))
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
        if len(stored) < GCM_OVERHEAD:
            raise CorruptData("encrypt: xattr value too short to be encrypted")
        try:
            return self._aead.decrypt(stored[:NONCE_SIZE], stored[NONCE_SIZE:], sealed_name)
        except InvalidTag:
            raise CorruptData("encrypt: xattr value failed authentication") from None
