"""The `compress` provider: files stored as zstd seekable streams, decompressed in the
target view; `zstd -d` restores a native file without isofs.

- format.py: the on-disk format (pure, strictly bounded parsing; docs/FORMAT-compress.md)
- codec.py: zstd calls (batches over threads), raw frames, counters
- file.py: `CompressedFile`, the logical file: reads, dirty frames, write-out
- recovery.py: fsck: frame checks, the recovery scan, rebuilding a damaged file
- layer.py: `CompressLayer` and `CompressProvider` (options `level`, `frame_size`)
"""

from isofs_providers.compress.file import CompressedFile
from isofs_providers.compress.layer import CompressLayer, CompressProvider

__all__ = ["CompressLayer", "CompressProvider", "CompressedFile"]
