"""Chunk stores for the dedup provider: the interface (base.py), the embedded store in the
source's `.isofs/`, and the S3 store (s3.py, which needs boto3: imported on first use)."""

from .base import CHUNK_ID_SIZE, ChunkStore, GarbageReport, MissingChunk
from .embedded import EmbeddedStore
from .packed import MissingChunks, PackedStore, StoreBusy

__all__ = [
    "CHUNK_ID_SIZE",
    "ChunkStore",
    "EmbeddedStore",
    "GarbageReport",
    "MissingChunk",
    "MissingChunks",
    "PackedStore",
    "StoreBusy",
]
