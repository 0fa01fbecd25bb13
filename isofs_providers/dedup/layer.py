"""The dedup provider: its options, the store it opens, its layer and its fsck checks.

The native file is a manifest (`manifest.py`); chunks live in a `ChunkStore`, the embedded
one in the source's `.isofs/dedup/` or an S3 bucket. With `encrypt_chunks` a random
per-source key (kept only wrapped under the passphrase, as the encrypt provider keeps its
master key) gives keyed chunk ids and AES-GCM chunks in the store, and keys the manifests'
digests so that a native-view process cannot forge one (it can still copy one whole).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from isofs import durable
from isofs.provider import (
    Command,
    CorruptData,
    Damage,
    Layer,
    Option,
    PlainFile,
    Progress,
    Provider,
    ProviderError,
    RandomAccessFile,
    SecretSource,
    SetupRequest,
)
from isofs_providers.dedup import commands as subcommands
from isofs_providers.dedup import manifest
from isofs_providers.dedup.chunker import (
    DEFAULT_AVG,
    DEFAULT_MAX,
    DEFAULT_MIN,
    MODE_CDC,
    MODE_FIXED,
    ChunkerParams,
)
from isofs_providers.dedup.file import (
    CACHE_BYTES,
    DIRTY_LIMIT,
    ChunkCache,
    DedupFile,
    FileContext,
    WriterBarrier,
    short_id,
)
from isofs_providers.dedup.manifest import ZERO_ID, Entries
from isofs_providers.dedup.store.base import ChunkStore, MissingChunk
from isofs_providers.encrypt.kdf import (
    DEFAULT_SCRYPT_N,
    DEFAULT_SCRYPT_P,
    DEFAULT_SCRYPT_R,
    MASTER_KEY_SIZE,
    SCRYPT_N_RANGE,
    subkey,
    wipe,
)
from isofs_providers.encrypt.keystore import (
    format_master_key,
    parse_master_key,
    scrypt_params,
    unlock,
    wrap,
)

CONFIG_VERSION = 1
#: The store's directory in the source's metadata directory (embedded store, S3 staging).
STORE_DIR = "dedup"
KEY_NAME = "key.json"
WRITER_LOCK_NAME = "writers.lock"
#: Logical block size: fsck reports damage in 64 KiB blocks; pages are 64 KiB either way.
BLOCK_SIZE = 64 << 10
#: HKDF labels of the subkeys of the per-source key.
INFO_CHUNKS = b"isofs dedup chunks v1"
INFO_MANIFEST = b"isofs dedup manifests v1"

#: Kinds of damage `DedupLayer.verify` reports.
CORRUPT_MANIFEST = "corrupt manifest"
TORN_UPDATE = "torn manifest update"
MISSING_CHUNKS = "missing chunks"
DAMAGED_CHUNKS = "damaged chunks"
#: Ids per `has` query when checking a manifest.
HAS_BATCH = 4096


def parse_store(spec: str) -> tuple[str, str, str]:
    """("local", "", "") or ("s3", bucket, prefix) from the `store` option's text."""
    if spec == "local":
        return "local", "", ""
    if spec.startswith("s3://"):
        bucket, _, prefix = spec[len("s3://") :].partition("/")
        if bucket and not _BUCKET_NAME.fullmatch(bucket):
            raise ProviderError(
                f"dedup: option store: {bucket!r} is not an S3 bucket name (3-63 lowercase "
                "letters, digits, dots and hyphens, starting and ending with a letter or digit)"
            )
        if bucket:
            return "s3", bucket, prefix.strip("/")
    raise ProviderError(f"dedup: option store: {spec!r} is neither local nor s3://BUCKET/PREFIX")


#: S3's rules for bucket names (the common subset of AWS's and Ceph RGW's).
_BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def open_store(
    meta_dir: Path, spec: str, *, endpoint: str | None, level: int, key: bytes | None
) -> ChunkStore:
    """The chunk store a source's config names: all the wiring to the stores is here."""
    kind, bucket, prefix = parse_store(spec)
    directory = Path(meta_dir) / STORE_DIR
    try:
        if kind == "local":
            from isofs_providers.dedup.store.embedded import EmbeddedStore

            return EmbeddedStore(directory, key=key, level=level)
        from isofs_providers.dedup.store.s3 import S3Store

        return S3Store(
            bucket, prefix, endpoint_url=endpoint, staging=directory, key=key, level=level
        )
    except ImportError as exc:
        raise ProviderError(f"dedup: the {kind} chunk store is not available ({exc})") from None


class DedupLayer(Layer):
    """Opens and creates manifests whose chunks live in `store`."""

    block_size = BLOCK_SIZE

    def __init__(
        self,
        store: ChunkStore,
        *,
        params: ChunkerParams | None = None,
        manifest_key: bytes | None = None,
        barrier: WriterBarrier | None = None,
        dirty_limit: int = DIRTY_LIMIT,
        cache_bytes: int = CACHE_BYTES,
    ) -> None:
        self.store = store
        self.params = params or ChunkerParams()
        problem = self.params.problem()
        if problem:
            raise ProviderError(f"dedup: {problem}")
        self.io_bound = store.io_bound
        self.barrier = barrier
        self.manifest_key = manifest_key
        self.context = FileContext(store, self.params, manifest_key, ChunkCache(cache_bytes))
        self.context.dirty_limit = dirty_limit
        if barrier is not None:
            self.context.barrier = barrier
        #: Chunks already read back whole by `verify` (fsck meets shared chunks many times).
        self._verified: set[bytes] = set()

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return manifest.is_manifest(lower)

    def open(self, lower: RandomAccessFile) -> DedupFile:
        return DedupFile(lower, self.context, manifest.read_headers(lower, self.manifest_key))

    def create(self, lower: RandomAccessFile) -> DedupFile:
        header = manifest.create(lower, self.params, self.manifest_key)
        return DedupFile(lower, self.context, [header], Entries.empty())

    def load_manifest(self, lower: RandomAccessFile) -> Entries:
        """A manifest's entries, checked (CorruptData otherwise)."""
        return manifest.load(lower, self.manifest_key)[1]

    # -- maintenance --------------------------------------------------------------------

    def verify(self, lower: RandomAccessFile, progress: Progress) -> list[Damage]:
        """A corrupt manifest; chunks missing from the store or damaged in it (as the
        64 KiB logical blocks they cover); an update torn by a crash of the machine."""
        try:
            headers = manifest.read_headers(lower, self.manifest_key)
            header, entries, fell_back = manifest.load(lower, self.manifest_key, headers)
        except CorruptData as exc:
            progress(lower.size())
            return [Damage(CORRUPT_MANIFEST, exc.strerror or str(exc))]
        damage = []
        if fell_back:
            damage.append(Damage(
                TORN_UPDATE, f"generation {headers[0].generation} is torn; generation "
                f"{header.generation} is intact", repairable=True,
            ))  # fmt: skip
        missing, damaged = self._check_chunks(entries)
        for kind, ids, repairable, what in (
            (MISSING_CHUNKS, missing, False, "missing from the store"),
            (DAMAGED_CHUNKS, damaged, True, "damaged in the store"),
        ):
            if ids:
                first = next(cid for cid in entries.iter_ids() if cid in ids)
                detail = f"{len(ids)} chunks {what}, e.g. {short_id(first)}"
                blocks = _blocks_of(entries, ids, self.block_size)
                damage.append(Damage(kind, detail, blocks, self.block_size, repairable=repairable))
        progress(lower.size())
        return damage

    def _check_chunks(self, entries: Entries) -> tuple[set[bytes], set[bytes]]:
        """(missing, damaged) chunk ids of a manifest; every other chunk was read back."""
        lengths: dict[bytes, int] = {}
        for index, cid in enumerate(entries.iter_ids()):
            if cid != ZERO_ID:
                lengths.setdefault(cid, entries.lengths[index])
        unique = [cid for cid in lengths if cid not in self._verified]
        missing: set[bytes] = set()
        damaged: set[bytes] = set()
        for start in range(0, len(unique), HAS_BATCH):
            batch = unique[start : start + HAS_BATCH]
            for cid, present in zip(batch, self.store.has(batch), strict=True):
                if not present:
                    missing.add(cid)
                    continue
                try:
                    data = self.store.get(cid)
                except MissingChunk:
                    missing.add(cid)
                    continue
                except CorruptData:
                    damaged.add(cid)
                    continue
                if len(data) != lengths[cid]:
                    damaged.add(cid)
                elif len(self._verified) < 1_000_000:
                    self._verified.add(cid)
        return missing, damaged

    def repair(self, lower: RandomAccessFile, damage: list[Damage]) -> None:
        """Damaged chunks become holes of the same length (they read as zeros, the rest of
        the file is kept); a torn update is replaced by its intact predecessor."""
        header, entries, _ = manifest.load(lower, self.manifest_key)
        _, damaged = self._check_chunks(entries)
        ids = bytearray(entries.ids)
        removed = []
        for index, cid in enumerate(entries.iter_ids()):
            if cid in damaged:
                ids[index * len(ZERO_ID) : (index + 1) * len(ZERO_ID)] = ZERO_ID
                removed.append(cid)
        if removed:
            self.store.reference([], removed)
            self.store.commit()
        manifest.write(lower, header, Entries(ids, entries.lengths), self.manifest_key)
        lower.flush()

    def import_plain(
        self, plain: PlainFile, lower: RandomAccessFile, progress: Progress
    ) -> RandomAccessFile:
        """Chunk the whole plain file in one go (one manifest write)."""
        upper = self.create(lower)
        upper.import_plain(plain, progress)
        return upper

    # -- the mount's life ---------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        cache = self.context.cache
        return {
            "chunking": self.params.describe(),
            **asdict(self.context.counters),
            "chunk_cache": {"hits": cache.hits, "misses": cache.misses},
            "store": self.store.statistics(),
        }

    def close(self) -> None:
        try:
            self.store.close()
        finally:
            if self.barrier is not None:
                self.barrier.close()


def _blocks_of(entries: Entries, ids: set[bytes], block_size: int) -> list[int]:
    """The logical blocks holding any byte of a chunk in `ids`."""
    blocks: set[int] = set()
    for index, cid in enumerate(entries.iter_ids()):
        if cid in ids:
            start, end = entries.starts[index], entries.starts[index + 1]
            blocks.update(range(start // block_size, (end - 1) // block_size + 1))
    return sorted(blocks)


# ----------------------------------------------------------------------------- the key


def key_path(meta_dir: Path) -> Path:
    return Path(meta_dir) / STORE_DIR / KEY_NAME


def _read_key_document(meta_dir: Path) -> dict[str, Any] | None:
    import json

    path = key_path(meta_dir)
    try:
        document = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ProviderError(f"dedup: cannot read {path.name}: {exc}") from None
    if not isinstance(document, dict):
        raise ProviderError(f"dedup: {path.name} is malformed")
    return document


def _write_key_document(meta_dir: Path, document: Mapping[str, Any], *, new: bool) -> None:
    import json

    path = key_path(meta_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    data = (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        durable.replace_at(dir_fd, path.name, data, mode=0o600, exclusive=new)
    except FileExistsError:
        raise ProviderError(f"dedup: {path.name} already exists; refusing to replace it") from None
    finally:
        os.close(dir_fd)


def _passphrase_source(request: SetupRequest) -> SecretSource:
    secrets = request.secret_source
    if secrets is None:
        raise ProviderError("dedup: encrypt_chunks needs a passphrase or key file")
    return secrets


# ----------------------------------------------------------------------------- the provider


def _size_option(name: str, help: str, default: int, low: int, high: int) -> Option:
    return Option(name, help, kind="size", default=default, minimum=low, maximum=high)


_INIT_AND_MOUNT = frozenset({"init", "mount"})


class DedupProvider(Provider):
    """Content-defined (or fixed-size) chunks stored once; the native file is a manifest."""

    name = "dedup"
    options = (
        _size_option("chunk_min", "smallest content-defined chunk", DEFAULT_MIN, 64, 1 << 20),
        _size_option(
            "chunk_avg", "average content-defined chunk (a power of two); with --fixed, the "
            "size of every chunk", DEFAULT_AVG, 256, 16 << 20,
        ),
        _size_option("chunk_max", "largest content-defined chunk", DEFAULT_MAX, 1024, 16 << 20),
        Option("fixed", "fixed-size chunks of chunk_avg bytes (VM and database images, "
               "which change in place)", kind="bool", default=False),
        Option("store", "where the chunks live: local (the source's .isofs/dedup/) or "
               "s3://BUCKET/PREFIX", default="local", metavar="STORE"),
        Option("endpoint", "URL of the S3-compatible service of an s3:// store (credentials "
               "come from the AWS environment variables or config files)",
               scopes=_INIT_AND_MOUNT, metavar="URL"),
        Option("level", "zstd level of stored chunks", kind="int", default=3, minimum=1,
               maximum=22, scopes=_INIT_AND_MOUNT),
        Option("encrypt_chunks", "keyed chunk ids and AES-GCM chunks under a per-source key, "
               "kept wrapped under the passphrase", kind="bool", default=False),
        Option("scrypt_n", "scrypt cost of the passphrase's key derivation (a power of two)",
               kind="int", default=DEFAULT_SCRYPT_N, scopes=frozenset({"init", "passwd"}),
               minimum=SCRYPT_N_RANGE[0], maximum=SCRYPT_N_RANGE[1], metavar="N"),
    )  # fmt: skip
    commands = (
        Command(
            "gc",
            "free the chunks no manifest refers to and repack packs with many dead bytes "
            "(may run while the source is mounted)",
            subcommands.run_gc,
            subcommands.GC_OPTIONS,
        ),
        Command(
            "dedup-stats",
            "logical and stored bytes, chunks, packs, dedup ratio, dead bytes awaiting gc",
            subcommands.run_stats,
            subcommands.STATS_OPTIONS,
        ),
        Command(
            "dedup-check",
            "mark from every manifest: name files whose chunks are missing, reconcile the "
            "store's refcounts",
            subcommands.run_check,
            offline_only=True,
        ),
    )

    @classmethod
    def _value(cls, options: Mapping[str, Any], name: str) -> Any:
        option = cls.option(name)
        assert option is not None, name
        return options.get(name, option.default)

    @classmethod
    def _params(cls, options: Mapping[str, Any]) -> ChunkerParams:
        if cls._value(options, "fixed"):
            params = ChunkerParams.fixed(cls._value(options, "chunk_avg"))
        else:
            params = ChunkerParams(
                MODE_CDC,
                cls._value(options, "chunk_min"),
                cls._value(options, "chunk_avg"),
                cls._value(options, "chunk_max"),
            )
        problem = params.problem()
        if problem:
            raise ProviderError(f"dedup: {problem}")
        return params

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        options = cls.parse_options(request.options, "init")
        params = cls._params(options)
        spec = cls._value(options, "store")
        kind, _, _ = parse_store(spec)
        endpoint = options.get("endpoint")
        if endpoint and kind != "s3":
            raise ProviderError("dedup: option endpoint is only for an s3:// store")
        encrypted = bool(cls._value(options, "encrypt_chunks"))
        if encrypted:
            n = cls._value(options, "scrypt_n")
            secrets = _passphrase_source(request)
            recovery = request.secrets.master_key() if request.secrets is not None else None
            key = parse_master_key(recovery) if recovery is not None else None
            key = key if key is not None else bytearray(os.urandom(MASTER_KEY_SIZE))
            try:
                passphrase = secrets.passphrase("New passphrase: ", confirm=True)
                document = wrap(key, passphrase, n, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P)
                _write_key_document(meta_dir, document, new=True)
                request.report["dedup_key"] = format_master_key(key)
            finally:
                wipe(key)
        return {
            "version": CONFIG_VERSION,
            "chunking": {
                "mode": "fixed" if params.mode == MODE_FIXED else "fastcdc",
                "min": params.min_size,
                "avg": params.avg_size,
                "max": params.max_size,
            },
            "store": spec,
            "endpoint": endpoint,
            "level": cls._value(options, "level"),
            "encrypt_chunks": encrypted,
        }

    @classmethod
    def _config_params(cls, config: Mapping[str, Any]) -> ChunkerParams:
        chunking = config.get("chunking")
        try:
            assert isinstance(chunking, Mapping)
            mode = {"fastcdc": MODE_CDC, "fixed": MODE_FIXED}[chunking["mode"]]
            params = ChunkerParams(
                mode, int(chunking["min"]), int(chunking["avg"]), int(chunking["max"])
            )
        except (AssertionError, KeyError, TypeError, ValueError):
            raise ProviderError("dedup: malformed chunking in the source's config") from None
        problem = params.problem()
        if problem:
            raise ProviderError(f"dedup: {problem}")
        return params

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> DedupLayer:
        version = config.get("version")
        if version != CONFIG_VERSION:
            raise ProviderError(
                f"dedup: unsupported config version {version!r} "
                f"(this isofs reads version {CONFIG_VERSION})"
            )
        options = cls.parse_options(request.options, "mount")
        params = cls._config_params(config)
        level = options.get("level", config.get("level", 3))
        endpoint = options.get("endpoint") or config.get("endpoint")
        chunk_key = manifest_key = None
        if config.get("encrypt_chunks"):
            document = _read_key_document(meta_dir)
            if document is None:
                raise ProviderError(f"dedup: {KEY_NAME} is missing from .isofs/{STORE_DIR}/")
            master = unlock(document, _passphrase_source(request))
            try:
                chunk_key = subkey(master, INFO_CHUNKS, 32)
                manifest_key = subkey(master, INFO_MANIFEST, 32)
            finally:
                wipe(master)
        store = open_store(
            Path(meta_dir), str(config.get("store", "local")), endpoint=endpoint, level=level,
            key=chunk_key,
        )  # fmt: skip
        barrier = WriterBarrier(Path(meta_dir) / STORE_DIR / WRITER_LOCK_NAME)
        return DedupLayer(store, params=params, manifest_key=manifest_key, barrier=barrier)

    @classmethod
    def change_passphrase(
        cls,
        meta_dir: Path,
        old: SecretSource,
        new: SecretSource,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> bool:
        """Re-wrap the per-source key (encrypt_chunks); False when the source has none."""
        document = _read_key_document(meta_dir)
        if document is None:
            return False
        given = cls.parse_options(options or {}, "passwd")
        n, r, p = scrypt_params(document)
        n = given.get("scrypt_n", n)
        master = unlock(document, old, "Old passphrase: ")
        try:
            rewrapped = wrap(master, new.passphrase("New passphrase: ", confirm=True), n, r, p)
        finally:
            wipe(master)
        _write_key_document(meta_dir, rewrapped, new=False)
        return True


def referenced_ids(entries: Entries) -> Iterable[bytes]:
    """The stored chunk ids of a manifest (repeats included; holes are not stored)."""
    return (cid for cid in entries.iter_ids() if cid != ZERO_ID)
