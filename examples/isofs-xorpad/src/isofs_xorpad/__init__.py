"""isofs-xorpad: an example third-party isofs provider (a position-dependent XOR, NOT security).

Registered under the entry-point group `isofs.providers` as `xorpad`; see README.md.
"""

from isofs_xorpad.xorpad import (
    CHECKED_MAGIC,
    HEADER_CHECKSUM_MISMATCH,
    HEADER_SIZE,
    MAGIC,
    XorPadFile,
    XorPadLayer,
    XorPadProvider,
    keystream,
    xor_at,
)

__all__ = [
    "CHECKED_MAGIC",
    "HEADER_CHECKSUM_MISMATCH",
    "HEADER_SIZE",
    "MAGIC",
    "XorPadFile",
    "XorPadLayer",
    "XorPadProvider",
    "keystream",
    "xor_at",
]
