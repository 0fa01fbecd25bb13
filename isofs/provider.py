"""The provider API that transformation plugins implement, and their registry.

A provider is a *pure layer*: it turns a lower random-access file into an upper logical
file. Layers compose (the upper file of one layer is the lower file of the next), so a
source's stack such as dedup -> compress -> encrypt is just nested `open` calls. Providers
know nothing of FUSE, policies, views or the page cache; their methods are blocking and are
called from worker threads, one file at a time under the section lock.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Protocol

ENTRY_POINT_GROUP = "isofs.providers"


class ProviderError(Exception):
    """A provider cannot be set up or loaded (bad key, bad config); one-line message."""


class CorruptData(OSError):
    """Native bytes fail verification (tampered, truncated, torn). Maps to EIO."""

    def __init__(self, message: str) -> None:
        import errno

        super().__init__(errno.EIO, message)


class RandomAccessFile(Protocol):
    """A file addressed by byte offset: the native file, or the upper file of a layer."""

    def read(self, offset: int, size: int) -> bytes:
        """Return up to `size` bytes at `offset`; short only at end of file."""
        ...

    def write(self, offset: int, data: bytes) -> int:
        """Write all of `data` at `offset` (zero-filling any gap); return len(data)."""
        ...

    def truncate(self, size: int) -> None:
        """Set the size; growing reads back as zeros."""
        ...

    def size(self) -> int:
        """Current size in bytes."""
        ...

    def flush(self) -> None:
        """Push buffered state down to the lower file (not necessarily to stable storage)."""
        ...


class NameTransform(Protocol):
    """How a layer changes file names: native names <-> names a transformed view shows.

    Names are transformed per directory with a directory key kept in a small file inside the
    directory. Names too long for the native filesystem are stored as a short stub plus a
    sidecar file holding the full transformed name. The filesystem hides every bookkeeping
    name (key file, sidecars) from transformed views. Symlink targets and extended attributes
    are transformed with the names: they are metadata that leaks as much.
    """

    #: Native name of the per-directory key file.
    dir_key_name: str

    def new_dir_key(self) -> bytes:
        """A fresh directory key for a new (or first-used) directory."""
        ...

    def parse_dir_key(self, data: bytes) -> bytes:
        """Validate a key file's bytes (CorruptData when malformed)."""
        ...

    def to_native(self, dir_key: bytes, name: str) -> tuple[str, bytes | None]:
        """(native name, sidecar bytes or None) for a view name in the directory."""
        ...

    def sidecar_name(self, native_name: str) -> str | None:
        """The sidecar holding the full name of a stub, or None for an ordinary name."""
        ...

    def is_bookkeeping(self, native_name: str) -> bool:
        """Key files, sidecars: native names no transformed view ever shows."""
        ...

    def to_view(self, dir_key: bytes, native_name: str, sidecar: bytes | None) -> str:
        """The view name of a native name (CorruptData if it is not a transformed name)."""
        ...

    def link_to_native(self, target: bytes) -> bytes:
        """The native target of a new symlink (ValueError if it cannot be stored)."""
        ...

    def link_to_view(self, stored: bytes) -> bytes:
        """The target a view shows (CorruptData if it is not a transformed target)."""
        ...

    def xattr_name_to_native(self, name: bytes) -> bytes:
        """The native name of an extended attribute (ValueError if it cannot be stored);
        names the layer leaves alone are returned unchanged."""
        ...

    def xattr_name_to_view(self, stored: bytes) -> bytes:
        """The name a view shows (CorruptData for a transformed-looking name that is not)."""
        ...

    def xattr_value_to_native(self, native_name: bytes, value: bytes) -> bytes:
        """The stored value for the attribute stored under `native_name`."""
        ...

    def xattr_value_to_view(self, native_name: bytes, stored: bytes) -> bytes:
        """The value a view shows (CorruptData when it fails authentication)."""
        ...


class Layer(abc.ABC):
    """One configured provider of a source's stack, able to open files in its format."""

    #: Logical block size the page cache should align to (1 for byte-granular layers).
    block_size: int = 4096
    #: How this layer transforms file names, if it does.
    name_transform: NameTransform | None = None

    @abc.abstractmethod
    def is_formatted(self, lower: RandomAccessFile) -> bool:
        """Whether `lower` holds this layer's format (else the file is passed through)."""

    @abc.abstractmethod
    def open(self, lower: RandomAccessFile) -> RandomAccessFile:
        """Open an existing formatted file as its logical (upper) file."""

    @abc.abstractmethod
    def create(self, lower: RandomAccessFile) -> RandomAccessFile:
        """Format an empty `lower` (write a header) and return its logical file."""

    def logical_size(self, lower_size: int) -> int | None:
        """Logical size computed from the lower size alone, or None when it cannot be."""
        return None

    def header_size(self) -> int:
        """Bytes needed from the start of a file to decide `is_formatted`."""
        return 0


@dataclass
class SetupRequest:
    """What `isofs init` asks of a provider: options from the command line, secrets source."""

    options: Mapping[str, Any] = field(default_factory=dict)
    secrets: SecretSource | None = None


class SecretSource(Protocol):
    """Where a provider gets a passphrase or key without knowing the CLI."""

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes: ...

    def master_key(self) -> bytes | None: ...


class Provider(abc.ABC):
    """A provider plugin, registered under the entry-point group `isofs.providers`."""

    name: ClassVar[str]

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        """Create this provider's state for a new source; return its config (stored as JSON).

        Secret material must be stored wrapped, never in the returned config in clear.
        """
        return {}

    @classmethod
    @abc.abstractmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> Layer:
        """Build the layer for a mount from the config `initialise` returned."""


def available_providers() -> dict[str, Callable[[], type[Provider]]]:
    """Installed providers by name (loading each is deferred until it is used)."""
    return {ep.name: ep.load for ep in entry_points(group=ENTRY_POINT_GROUP)}


def load_provider(name: str) -> type[Provider]:
    """The provider class registered as `name`, or ProviderError naming what is installed."""
    found = available_providers()
    if name not in found:
        known = ", ".join(sorted(found)) or "none"
        raise ProviderError(f"unknown provider {name!r} (installed: {known})")
    provider = found[name]()
    if not (isinstance(provider, type) and issubclass(provider, Provider)):
        raise ProviderError(f"provider {name!r} does not implement isofs.provider.Provider")
    return provider


class Stack:
    """An ordered stack of layers, lowest (nearest the disk) first."""

    def __init__(self, layers: list[Layer]) -> None:
        self.layers = layers

    @property
    def is_identity(self) -> bool:
        return not self.layers

    @property
    def block_size(self) -> int:
        sizes = [layer.block_size for layer in self.layers] or [1]
        return max(sizes)

    def open(self, native: RandomAccessFile) -> RandomAccessFile | None:
        """Open `native` through every layer, or None when it is not in the stack's format."""
        current = native
        for layer in self.layers:
            if not layer.is_formatted(current):
                return None
            current = layer.open(current)
        return current

    def create(self, native: RandomAccessFile) -> RandomAccessFile:
        """Format an empty native file through every layer."""
        current = native
        for layer in self.layers:
            current = layer.create(current)
        return current

    @property
    def name_transform(self) -> NameTransform | None:
        """The stack's name transform (at most one layer may transform names)."""
        transforms = [layer.name_transform for layer in self.layers if layer.name_transform]
        if len(transforms) > 1:
            raise ProviderError("only one provider of a stack may transform file names")
        return transforms[0] if transforms else None

    def logical_size(self, native_size: int) -> int | None:
        """Logical size from the native size alone, when every layer can compute it."""
        size: int | None = native_size
        for layer in self.layers:
            if size is None:
                return None
            size = layer.logical_size(size)
        return size
