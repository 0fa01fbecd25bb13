"""The key store `encrypt.json`: the master key wrapped under a passphrase, and its recovery form.

Specified in docs/FORMAT-encrypt.md §1. The master key exists on disk only wrapped (scrypt,
then AES-256-GCM); its recovery form is shown to the user once at init and never stored.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from isofs import durable
from isofs.provider import ProviderError, SecretSource
from isofs_providers.encrypt.kdf import (
    INFO_KEY_CHECK,
    MASTER_KEY_SIZE,
    NONCE_SIZE,
    check_scrypt_params,
    subkey,
    wipe,
)

KEYSTORE_NAME = "encrypt.json"
KEYSTORE_VERSION = 1
_WRAP_AAD_LABEL = b"isofs wrapped master key"
_SALT_SIZE = 16


# --- the recovery form ------------------------------------------------------------------------


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


# --- wrapping ---------------------------------------------------------------------------------


def _wrap_aad(version: int) -> bytes:
    return _WRAP_AAD_LABEL + version.to_bytes(2, "big")


def _key_check(master: bytes | bytearray) -> bytes:
    return subkey(master, INFO_KEY_CHECK, 16)


def wrap(master: bytearray, passphrase: bytes, n: int, r: int, p: int) -> dict[str, Any]:
    """The key store document holding `master` wrapped under `passphrase`."""
    if not passphrase:
        raise ProviderError("encrypt: empty passphrase")
    check_scrypt_params(n, r, p)
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


def _field(store: Mapping[str, Any], *keys: str) -> Any:
    value: Any = store
    for key in keys:
        if not isinstance(value, Mapping) or key not in value:
            raise ProviderError(f"encrypt: {KEYSTORE_NAME} lacks {'.'.join(keys)}")
        value = value[key]
    return value


def _bytes_field(store: Mapping[str, Any], *keys: str) -> bytes:
    try:
        return base64.b64decode(_field(store, *keys), validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has a malformed {'.'.join(keys)}") from None


def scrypt_params(store: Mapping[str, Any]) -> tuple[int, int, int]:
    """The stored (n, r, p), checked against the format's limits."""
    if _field(store, "kdf", "name") != "scrypt":
        raise ProviderError(f"encrypt: unknown key derivation {store['kdf']['name']!r}")
    try:
        n, r, p = (int(_field(store, "kdf", k)) for k in ("n", "r", "p"))
    except (TypeError, ValueError):
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has malformed scrypt parameters") from None
    check_scrypt_params(n, r, p)
    return n, r, p


def _unwrap(store: Mapping[str, Any], passphrase: bytes) -> bytearray:
    n, r, p = scrypt_params(store)
    salt = _bytes_field(store, "kdf", "salt")
    nonce = _bytes_field(store, "wrap", "nonce")
    sealed = _bytes_field(store, "wrap", "sealed")
    if len(nonce) != NONCE_SIZE:
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} has a malformed wrap.nonce")
    kek = Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)
    try:
        master = bytearray(AESGCM(kek).decrypt(nonce, sealed, _wrap_aad(KEYSTORE_VERSION)))
    except InvalidTag:
        raise ProviderError("wrong passphrase or key file") from None
    if len(master) != MASTER_KEY_SIZE:
        wipe(master)
        raise ProviderError(f"encrypt: {KEYSTORE_NAME} holds a malformed master key")
    return master


def _check_master(store: Mapping[str, Any], master: bytearray) -> None:
    if _key_check(master) != _bytes_field(store, "key_check"):
        wipe(master)
        raise ProviderError("wrong master key")


def unlock(
    store: Mapping[str, Any], secrets: SecretSource | None, prompt: str = "Passphrase: "
) -> bytearray:
    """The master key from a recovery key if the secrets offer one, else from a passphrase.

    The caller owns the returned buffer and wipes it.
    """
    if secrets is None:
        raise ProviderError("encrypt: no passphrase, key file or master key given")
    recovery = secrets.master_key()
    if recovery is not None:
        master = parse_master_key(recovery)
        _check_master(store, master)
        return master
    return _unwrap(store, secrets.passphrase(prompt))


# --- the file ---------------------------------------------------------------------------------


def keystore_path(meta_dir: Path) -> Path:
    return Path(meta_dir) / KEYSTORE_NAME


def read_keystore(meta_dir: Path) -> dict[str, Any]:
    path = keystore_path(meta_dir)
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


def write_keystore(meta_dir: Path, document: Mapping[str, Any], *, new: bool = False) -> None:
    """Write the key store durably: a crash leaves the old store or the new, never neither
    (losing it would lose every file). `new` refuses to replace an existing one."""
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    if not new:
        durable.replace(keystore_path(meta_dir), data, mode=0o600)
        return
    dir_fd = os.open(meta_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        durable.replace_at(dir_fd, KEYSTORE_NAME, data, mode=0o600, exclusive=True)
    except FileExistsError:
        raise ProviderError(
            f"encrypt: {KEYSTORE_NAME} already exists; refusing to replace it"
        ) from None
    finally:
        os.close(dir_fd)
