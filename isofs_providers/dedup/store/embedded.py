"""The embedded chunk store: packs and index in the source's `.isofs/dedup/`.

`EmbeddedStore(meta_dir / "dedup", key=None)`: packs in `packs/`, the index in `index.db`
(docs/FORMAT-dedup.md, "Embedded store"). A backup of the native view must include this
directory, or the manifests it holds point at nothing.
"""

from __future__ import annotations

from .packed import PackedStore


class EmbeddedStore(PackedStore):
    """Sealed packs stay where they were written; the open pack is left unsealed at close
    (the next writer adopts it), so short mounts do not leave a trail of tiny packs."""

    io_bound = False
    seal_on_close = False
