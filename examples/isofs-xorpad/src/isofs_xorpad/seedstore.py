"""The seed kept wrapped under a passphrase in `xorpad.json` (option `wrap_seed`).

A TOY, NOT SECURITY: every file's header still holds its seed in clear, so wrapping the
source's seed hides nothing. It exists to show a provider that keeps a secret in the source's
metadata directory and re-wraps it for `isofs passwd` (`Provider.change_passphrase`), with a
wrong old passphrase changing nothing.

    {"version": 1,
     "kdf": {"name": "scrypt", "salt": "<hex, 16 bytes>", "n": 16384, "r": 8, "p": 1},
     "wrapped": "<hex, 8 bytes>",   seed (u64 big-endian) XOR the first 8 derived bytes
     "tag": "<hex, 32 bytes>"}      HMAC-SHA256(derived bytes 8..39, salt || wrapped)

The 40 derived bytes are scrypt(passphrase, salt, n, r, p); a wrong passphrase fails the tag.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from isofs import durable
from isofs.provider import ProviderError

SEEDSTORE_NAME = "xorpad.json"
SEEDSTORE_VERSION = 1
_SCRYPT = {"n": 2**14, "r": 8, "p": 1}
_SALT_SIZE = 16


def seedstore_path(meta_dir: Path) -> Path:
    return Path(meta_dir) / SEEDSTORE_NAME


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> tuple[bytes, bytes]:
    """(pad for the seed, key for the tag)."""
    derived = hashlib.scrypt(passphrase, salt=salt, n=n, r=r, p=p, dklen=40)
    return derived[:8], derived[8:]


def wrap_seed(seed: int, passphrase: bytes) -> dict[str, Any]:
    """The store document holding `seed` under `passphrase` (fresh salt each time)."""
    if not passphrase:
        raise ProviderError("xorpad: empty passphrase")
    salt = os.urandom(_SALT_SIZE)
    pad, key = _derive(passphrase, salt, **_SCRYPT)
    wrapped = bytes(a ^ b for a, b in zip(seed.to_bytes(8, "big"), pad, strict=True))
    tag = hmac.new(key, salt + wrapped, hashlib.sha256).digest()
    return {
        "version": SEEDSTORE_VERSION,
        "kdf": {"name": "scrypt", "salt": salt.hex(), **_SCRYPT},
        "wrapped": wrapped.hex(),
        "tag": tag.hex(),
    }


def unwrap_seed(store: dict[str, Any], passphrase: bytes) -> int:
    """The seed in `store`; ProviderError for a wrong passphrase or a malformed store."""
    try:
        kdf = store["kdf"]
        fields = (kdf["salt"], store["wrapped"], store["tag"])
        salt, wrapped, tag = (bytes.fromhex(field) for field in fields)
        n, r, p = int(kdf["n"]), int(kdf["r"]), int(kdf["p"])
    except (KeyError, TypeError, ValueError):
        raise ProviderError(f"xorpad: {SEEDSTORE_NAME} is malformed") from None
    if kdf.get("name") != "scrypt" or (n, r, p) != tuple(_SCRYPT.values()) or len(wrapped) != 8:
        raise ProviderError(f"xorpad: {SEEDSTORE_NAME} has unsupported parameters")
    pad, key = _derive(passphrase, salt, n, r, p)
    if not hmac.compare_digest(hmac.new(key, salt + wrapped, hashlib.sha256).digest(), tag):
        raise ProviderError("xorpad: wrong passphrase")
    return int.from_bytes(bytes(a ^ b for a, b in zip(wrapped, pad, strict=True)), "big")


def read_seedstore(meta_dir: Path) -> dict[str, Any] | None:
    """The store document, or None when the source keeps its seed in the config."""
    try:
        store = json.loads(seedstore_path(meta_dir).read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ProviderError(f"xorpad: cannot read {SEEDSTORE_NAME}: {exc}") from None
    version = store.get("version") if isinstance(store, dict) else None
    if version != SEEDSTORE_VERSION:
        raise ProviderError(f"xorpad: {SEEDSTORE_NAME} has unsupported version {version!r}")
    return store


def write_seedstore(meta_dir: Path, store: dict[str, Any]) -> None:
    """Replace the store durably: a crash leaves the old one or the new, never neither."""
    data = (json.dumps(store, indent=2, sort_keys=True) + "\n").encode("utf-8")
    durable.replace(seedstore_path(meta_dir), data, mode=0o600)
