"""The dedup provider: content-defined chunks in a chunk store, the native file a manifest.

The formats are specified in docs/FORMAT-dedup.md. One concern per module, dependencies
one-way: `layer` (the provider, its options, store selection, fsck checks) uses `commands`
(gc, dedup-stats, dedup-check), `file` (the logical file: reads, re-chunking writes), which
use `manifest` (the native file) and `chunker` (FastCDC or fixed cuts); chunks go to a
`store.base.ChunkStore`.
"""

from isofs_providers.dedup.chunker import Chunker, ChunkerParams
from isofs_providers.dedup.file import DedupFile
from isofs_providers.dedup.layer import DedupLayer, DedupProvider

__all__ = ["Chunker", "ChunkerParams", "DedupFile", "DedupLayer", "DedupProvider"]
