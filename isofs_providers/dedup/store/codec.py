"""Chunk ids and the stored form of a chunk: zstd, then AES-256-GCM when the store is keyed.

Plain stores name a chunk by SHA-256 of its content. Keyed stores derive two subkeys from the
source's 32-byte secret: one for HMAC-SHA256 chunk ids (ids reveal nothing about known
content), one for AES-256-GCM; the payload is nonce (12) | ciphertext | tag (16) and the
associated data binds the record header (chunk id, flags, logical length), so a payload moved
under another id or with its flags changed fails authentication.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import threading

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isofs.provider import CorruptData

from .packs import (
    FLAG_COMPRESSED,
    FLAG_ENCRYPTED,
    MAX_CHUNK_SIZE,
    Record,
    short,
)

KEY_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
DEFAULT_LEVEL = 3


def _subkey(key: bytes, purpose: bytes) -> bytes:
    return hmac.new(key, b"isofs-dedup v1 " + purpose, hashlib.sha256).digest()


class ChunkCodec:
    """Turns content into (id, flags, payload) and a record back into verified content."""

    def __init__(self, key: bytes | None = None, level: int = DEFAULT_LEVEL) -> None:
        if key is not None and len(key) != KEY_SIZE:
            raise ValueError(f"a chunk store key is {KEY_SIZE} bytes, not {len(key)}")
        if not 1 <= level <= 22:
            raise ValueError(f"zstd level must be 1..22, not {level}")
        self.level = level
        self.encrypted = key is not None
        self._id_key = _subkey(key, b"chunk id") if key is not None else None
        self._aead = AESGCM(_subkey(key, b"chunk data")) if key is not None else None
        #: Stored in the index: a store opened with another key fails at once, clearly.
        self.key_check = _subkey(key, b"key check").hex() if key is not None else ""
        self._local = threading.local()

    def chunk_id(self, content: bytes | memoryview) -> bytes:
        if self._id_key is None:
            return hashlib.sha256(content).digest()
        return hmac.new(self._id_key, content, hashlib.sha256).digest()

    def _compressor(self) -> zstandard.ZstdCompressor:
        found = getattr(self._local, "compressor", None)
        if found is None:
            found = self._local.compressor = zstandard.ZstdCompressor(level=self.level)
        return found

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        found = getattr(self._local, "decompressor", None)
        if found is None:
            found = self._local.decompressor = zstandard.ZstdDecompressor()
        return found

    @staticmethod
    def _associated(chunk_id: bytes, flags: int, logical: int) -> bytes:
        return chunk_id + struct.pack("<BI", flags, logical)

    def encode(self, chunk_id: bytes, content: bytes | memoryview) -> tuple[int, int, bytes]:
        """(flags, logical size, payload) of a chunk: compressed when that shrinks it."""
        logical = len(content)
        if logical > MAX_CHUNK_SIZE:
            raise ValueError(f"chunk of {logical} bytes exceeds the {MAX_CHUNK_SIZE} limit")
        compressed = self._compressor().compress(content)
        flags = 0
        if len(compressed) < logical:
            payload: bytes = compressed
            flags |= FLAG_COMPRESSED
        else:
            payload = bytes(content)
        if self._aead is not None:
            flags |= FLAG_ENCRYPTED
            nonce = os.urandom(NONCE_SIZE)
            associated = self._associated(chunk_id, flags, logical)
            payload = nonce + self._aead.encrypt(nonce, payload, associated)
        return flags, logical, payload

    def decode(self, record: Record, where: str) -> bytes:
        """The content of a CRC-checked record, authenticated, decompressed and checked
        against its id; CorruptData naming chunk and pack otherwise."""
        label = f"chunk {short(record.chunk_id)} in {where}"
        payload = record.payload
        if bool(record.flags & FLAG_ENCRYPTED) != self.encrypted:
            state = "encrypted" if record.flags & FLAG_ENCRYPTED else "not encrypted"
            raise CorruptData(f"{label}: record is {state}, unlike the store")
        if self._aead is not None:
            if len(payload) < NONCE_SIZE + TAG_SIZE:
                raise CorruptData(f"{label}: encrypted payload too short")
            associated = self._associated(record.chunk_id, record.flags, record.logical_size)
            try:
                payload = self._aead.decrypt(
                    payload[:NONCE_SIZE], payload[NONCE_SIZE:], associated
                )
            except InvalidTag:
                raise CorruptData(f"{label}: authentication failed") from None
        if record.flags & FLAG_COMPRESSED:
            try:
                # a frame's own content size is trusted by zstd for its allocation: check it
                declared = zstandard.frame_content_size(payload)
                if declared not in (-1, record.logical_size):
                    raise CorruptData(
                        f"{label}: frame says {declared} bytes, the record {record.logical_size}"
                    )
                content = self._decompressor().decompress(
                    payload, max_output_size=record.logical_size
                )
            except zstandard.ZstdError as exc:
                raise CorruptData(f"{label}: does not decompress ({exc})") from None
        else:
            content = payload
        if len(content) != record.logical_size:
            raise CorruptData(
                f"{label}: {len(content)} bytes, the record says {record.logical_size}"
            )
        if not hmac.compare_digest(self.chunk_id(content), record.chunk_id):
            raise CorruptData(f"{label}: content does not match its id")
        return content
