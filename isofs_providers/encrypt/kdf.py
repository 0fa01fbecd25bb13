"""Key derivation and the small helpers every part of the encrypt format shares.

One place lists every HKDF label (docs/FORMAT-encrypt.md §1), so no two subkeys can share one
by accident, and the scrypt limits that protect a reader from a tampered key store.
"""

from __future__ import annotations

import base64
import re

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from isofs.provider import ProviderError

MASTER_KEY_SIZE = 32
#: AES-256-GCM as every part of the format uses it: a random 96-bit nonce, a 128-bit tag.
NONCE_SIZE = 12
TAG_SIZE = 16
GCM_OVERHEAD = NONCE_SIZE + TAG_SIZE  # 28

# HKDF `info` labels of the subkeys of the master key.
INFO_CONTENT = b"isofs content v1"
INFO_NAMES = b"isofs names v1"
INFO_LINKS = b"isofs symlinks v1"
INFO_XATTR_NAMES = b"isofs xattr names v1"
INFO_XATTR_VALUES = b"isofs xattr values v1"
INFO_KEY_CHECK = b"isofs key check v1"

DEFAULT_SCRYPT_N = 2**17
DEFAULT_SCRYPT_R = 8
DEFAULT_SCRYPT_P = 1
SCRYPT_N_RANGE = (2**14, 2**22)
SCRYPT_R_RANGE = (1, 32)
SCRYPT_P_RANGE = (1, 16)

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def wipe(buf: bytearray | None) -> None:
    """Overwrite key material we own (best effort: immutable copies may still exist)."""
    if buf is not None:
        buf[:] = bytes(len(buf))


def subkey(master: bytes | bytearray, info: bytes, length: int) -> bytes:
    """A subkey of the master key; the master key itself never keys a cipher."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(
        bytes(master)
    )


def check_scrypt_params(n: int, r: int, p: int) -> None:
    """Refuse scrypt costs outside the format's limits: a tampered key store must not be
    able to demand unbounded memory or time."""
    if n & (n - 1):
        raise ProviderError(f"encrypt: scrypt N={n} is not a power of two")
    for value, limits, label in (
        (n, SCRYPT_N_RANGE, "N"),
        (r, SCRYPT_R_RANGE, "r"),
        (p, SCRYPT_P_RANGE, "p"),
    ):
        if not limits[0] <= value <= limits[1]:
            raise ProviderError(f"encrypt: scrypt {label}={value} outside {limits[0]}..{limits[1]}")


def b64url_encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strict unpadded base64url: rejects other alphabets and non-canonical encodings."""
    if not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url_encode(data) != text:
        raise ValueError("non-canonical base64url")
    return data
