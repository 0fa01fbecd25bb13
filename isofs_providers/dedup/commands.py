"""The dedup provider's subcommands: `isofs gc`, `isofs dedup-stats`, `isofs dedup-check`.

Each walks the source's files (`CommandRequest.files()`), opens them through the layers
below dedup, and reads every manifest it finds: the manifests are the truth about which
chunks are live (a manifest a native-view process copied is a second reference the store's
refcounts never heard of), the store's refcounts only a hint.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from isofs.provider import (
    CommandRequest,
    CorruptData,
    Layer,
    Option,
    ProviderError,
    RandomAccessFile,
)
from isofs_providers.dedup import manifest
from isofs_providers.dedup.file import short_id
from isofs_providers.dedup.manifest import ZERO_ID, Entries

if TYPE_CHECKING:
    from isofs_providers.dedup.layer import DedupLayer

#: Attempts to read a manifest a mounted writer may be replacing at that moment.
READ_ATTEMPTS = 3
HAS_BATCH = 4096


def _close(native: RandomAccessFile) -> None:
    """Give back a native file's descriptor (the walk opens one per file)."""
    close = getattr(native, "close", None)
    if callable(close):
        close()
        return
    fd = getattr(native, "fd", None)
    if isinstance(fd, int) and fd >= 0:
        with contextlib.suppress(OSError):
            os.close(fd)


@contextlib.contextmanager
def _opened(
    request: CommandRequest, opener: Callable[[bool], RandomAccessFile]
) -> Iterator[RandomAccessFile | None]:
    """The file as the dedup layer's lower file, or None when it is not a manifest."""
    native = opener(False)
    try:
        current: RandomAccessFile = native
        for layer in _layers_below(request):
            if not layer.is_formatted(current):
                yield None
                return
            current = layer.open(current)
        yield current if request.layer.is_formatted(current) else None
    finally:
        _close(native)


def _layers_below(request: CommandRequest) -> list[Layer]:
    layers = request.stack.layers
    index = next(i for i, layer in enumerate(layers) if layer is request.layer)
    return layers[:index]


def _manifests(request: CommandRequest) -> Iterator[tuple[str, Entries | None, str | None]]:
    """(path, entries, None) for each readable manifest, (path, None, reason) for each that
    cannot be read. A manifest being replaced by a mounted writer is read again."""
    layer: DedupLayer = request.layer  # type: ignore[assignment]
    for rel, opener in request.files():
        reason = None
        entries = None
        for attempt in range(READ_ATTEMPTS):
            try:
                with _opened(request, opener) as lower:
                    if lower is None:
                        break
                    entries = layer.load_manifest(lower)
                    reason = None
                    break
            except (CorruptData, OSError) as exc:
                reason = exc.strerror or str(exc)
                if attempt + 1 < READ_ATTEMPTS:
                    time.sleep(0.05)
        if entries is not None or reason is not None:
            yield rel, entries, reason


def _human(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{int(size)} bytes" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size} bytes"  # pragma: no cover


def _progress_bar(request: CommandRequest, desc: str, unit: str) -> Any:
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, unit_scale=True, file=sys.stderr,
                disable=None if request.progress else True, leave=False)  # fmt: skip


# ----------------------------------------------------------------------------- gc


class _Unreadable(Exception):
    """A manifest gc cannot read: it may refer to chunks, so nothing may be freed."""


def run_gc(request: CommandRequest) -> int:
    """Free the chunks no manifest refers to and repack packs with many dead bytes.

    While the source is mounted, flushes are kept out until the store has begun its
    collection (see `WriterBarrier`), so a chunk a writer puts or matches is never freed.
    """
    layer: DedupLayer = request.layer  # type: ignore[assignment]
    share = request.options.get("repack_percent", 30) / 100
    release = layer.barrier.exclusive() if layer.barrier is not None else (lambda: None)
    counted = {"manifests": 0, "references": 0}

    def live() -> Iterator[bytes]:
        release()  # the store has taken its start: writers may go on
        for rel, entries, reason in _manifests(request):
            if entries is None:
                raise _Unreadable(f"{rel}: {reason}")
            counted["manifests"] += 1
            for cid in entries.iter_ids():
                if cid != ZERO_ID:
                    counted["references"] += 1
                    yield cid

    bar = _progress_bar(request, "gc", "chunk")
    try:
        report = layer.store.collect_garbage(live(), bar.update, repack_dead_share=share)
    except _Unreadable as exc:
        raise ProviderError(
            f"gc: cannot read the manifest {exc}; nothing was freed (see isofs fsck)"
        ) from None
    finally:
        release()
        bar.close()
    request.out(
        f"gc {request.source}: {counted['manifests']} manifests, {report.live_chunks} live "
        f"chunks; freed {report.chunks_freed} chunks ({_human(report.bytes_freed)}); packs "
        f"rewritten {report.packs_rewritten}, deleted {report.packs_deleted}"
    )
    if report.missing:
        request.out(
            f"gc: {len(report.missing)} chunks that manifests refer to are missing from the "
            f"store, e.g. {short_id(report.missing[0])} (isofs fsck names the files)"
        )
        return 1
    return 0


# ----------------------------------------------------------------------------- stats


def source_statistics(request: CommandRequest) -> dict[str, Any]:
    """Logical bytes of every manifest (their headers), and what the store holds."""
    layer: DedupLayer = request.layer  # type: ignore[assignment]
    logical = manifests = references = unreadable = 0
    for _rel, opener in request.files():
        try:
            with _opened(request, opener) as lower:
                if lower is None:
                    continue
                header = manifest.read_headers(lower, layer.manifest_key)[0]
        except (CorruptData, OSError):
            unreadable += 1
            continue
        manifests += 1
        logical += header.size
        references += header.count
    store = layer.store.statistics()
    stored = int(store.get("stored_bytes") or 0)
    return {
        "manifests": manifests,
        "unreadable_manifests": unreadable,
        "logical_bytes": logical,
        "chunk_references": references,
        "stored_bytes": stored,
        "chunks": store.get("chunks"),
        "packs": store.get("packs"),
        "dedup_ratio": round(logical / stored, 3) if stored else None,
        "dead_bytes": store.get("dead_bytes"),
        "store": store,
    }


def run_stats(request: CommandRequest) -> int:
    figures = source_statistics(request)
    if request.options.get("json"):
        request.out(json.dumps(figures, indent=2, sort_keys=True, default=str))
        return 0
    ratio = figures["dedup_ratio"]
    unreadable = figures["unreadable_manifests"]
    lines = [
        f"manifests:       {figures['manifests']}"
        + (f" ({unreadable} unreadable)" if unreadable else ""),
        f"logical bytes:   {figures['logical_bytes']} ({_human(figures['logical_bytes'])})",
        f"stored bytes:    {figures['stored_bytes']} ({_human(figures['stored_bytes'])})",
        f"chunks:          {figures['chunks']}",
        f"packs:           {figures['packs']}",
        f"dedup ratio:     {f'{ratio:.2f}' if ratio is not None else 'n/a'}",
        f"dead bytes:      {figures['dead_bytes']} (awaiting isofs gc)",
    ]
    request.out("\n".join(lines))
    return 0


# ----------------------------------------------------------------------------- check


def run_check(request: CommandRequest) -> int:
    """Mark from every manifest: name manifests that cannot be read or whose chunks are
    missing, and reconcile the store's refcounts with the references counted."""
    layer: DedupLayer = request.layer  # type: ignore[assignment]
    counts: Counter[bytes] = Counter()
    problems = 0
    bar = _progress_bar(request, "dedup-check", "file")
    try:
        for rel, entries, reason in _manifests(request):
            bar.update(1)
            if entries is None:
                request.out(f"{rel}: corrupt manifest ({reason})")
                problems += 1
                continue
            counts.update(cid for cid in entries.iter_ids() if cid != ZERO_ID)
    finally:
        bar.close()
    ids = list(counts)
    missing: set[bytes] = set()
    for start in range(0, len(ids), HAS_BATCH):
        batch = ids[start : start + HAS_BATCH]
        missing.update(cid for cid, ok in zip(batch, layer.store.has(batch), strict=True) if not ok)
    if missing:
        for rel, entries, _reason in _manifests(request):
            lost = [cid for cid in (entries.iter_ids() if entries else ()) if cid in missing]
            if lost:
                request.out(f"{rel}: {len(set(lost))} chunks missing from the store, e.g. "
                            f"{short_id(lost[0])}")  # fmt: skip
                problems += 1
    reconcile = getattr(layer.store, "reconcile_references", None)
    if callable(reconcile):
        changed = reconcile(counts)
        refcounts = f"{changed} refcounts corrected"
    else:
        refcounts = "refcounts not reconciled (the store cannot)"
    request.out(
        f"dedup-check {request.source}: {sum(counts.values())} references to {len(ids)} chunks, "
        f"{len(missing)} missing; {refcounts}"
    )
    return 1 if problems else 0


GC_OPTIONS = (
    Option(
        "repack_percent",
        "rewrite packs with more than this share of dead bytes (%)",
        kind="int",
        default=30,
        minimum=0,
        maximum=100,
        metavar="PERCENT",
    ),
)
STATS_OPTIONS = (Option("json", "print the figures as JSON", kind="bool", default=False),)
