"""The provider API that transformation plugins implement, and their registry.

A provider is a *pure layer*: it turns a lower random-access file into an upper logical
file. Layers compose (the upper file of one layer is the lower file of the next), so a
source's stack such as dedup -> compress -> encrypt is just nested `open` calls. Providers
know nothing of FUSE, policies, views or the page cache.

Where their code runs: the core calls a layer under the section lock, inline on the event
loop when the work is bounded by one request and CPU-bound (AES, zstd: handing each call to a
thread costs more than it saves, see docs/ARCHITECTURE.md), and in a worker thread when it is
larger than any request, or always when the layer says it may block on I/O (`Layer.io_bound`,
e.g. a network chunk store).

What a provider declares, so that neither the core nor the command line knows it by name:
- `Provider.options`: its settings (`Option`), each fixed at init, given at mount, or used by
  `isofs passwd`; the command line and `-o` mount options are built from them;
- optional capabilities with defaults that do the generic thing: `change_passphrase`
  (passwd), `Layer.verify` and `Layer.repair` (fsck), `Layer.last_valid_size` (the size a torn
  file is cut back to), `Layer.import_plain` (migrate), `Layer.statistics` (status) and
  `Layer.close` (unmount).
"""

from __future__ import annotations

import abc
import difflib
import errno
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol

ENTRY_POINT_GROUP = "isofs.providers"


class ProviderError(Exception):
    """A provider cannot be set up or loaded (bad key, bad config); one-line message."""


class CorruptData(OSError):
    """Native bytes fail verification (tampered, truncated, torn). Maps to EIO."""

    def __init__(self, message: str) -> None:
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
        """Push buffered state down to the lower file (not necessarily to stable storage).

        An upper file that buffers may also have `pending_bytes() -> int`: about how much
        its flush will write, so the core can run a large flush off the event loop."""
        ...


class MemoryFile:
    """A `RandomAccessFile` over a bytearray that records the calls made on it: the lower file
    a layer is tested (or measured) on without a disk. Writes past the end zero-fill the gap,
    as files do."""

    def __init__(self, data: bytes | bytearray = b"") -> None:
        self.data = bytearray(data)
        self.reads: list[tuple[int, int]] = []
        self.writes: list[tuple[int, int]] = []
        self.truncates: list[int] = []
        self.flushes = 0

    def read(self, offset: int, size: int) -> bytes:
        self.reads.append((offset, size))
        return bytes(self.data[offset : offset + size])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> int:
        self.writes.append((offset, len(data)))
        if offset > len(self.data):
            self.data.extend(bytes(offset - len(self.data)))
        self.data[offset : offset + len(data)] = data
        return len(data)

    def truncate(self, size: int) -> None:
        self.truncates.append(size)
        if size < len(self.data):
            del self.data[size:]
        else:
            self.data.extend(bytes(size - len(self.data)))

    def size(self) -> int:
        return len(self.data)

    def flush(self) -> None:
        self.flushes += 1

    def reset_log(self) -> None:
        """Forget the calls recorded so far."""
        self.reads.clear()
        self.writes.clear()
        self.truncates.clear()
        self.flushes = 0


class PlainFile(Protocol):
    """A file that is not (yet) in a layer's format, as `import_plain` reads it."""

    def read(self, offset: int, size: int) -> bytes: ...

    def size(self) -> int: ...

    def data_ranges(self) -> Iterable[tuple[int, int]]:
        """(start, end) of the regions holding data, in order (holes between them)."""
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


# ----------------------------------------------------------------------------- damage


#: Kinds of damage the generic checks report (a layer may report kinds of its own).
CORRUPT_HEADER = "corrupt header"
TRUNCATED_TAIL = "truncated tail"
INVALID_SIZE = "invalid size"
BAD_BLOCKS = "bad blocks"


@dataclass
class Damage:
    """Something wrong with one file in one layer's format, as `Layer.verify` finds it.

    `blocks` are numbers of damaged logical blocks of `block_size` bytes (the layer's upper
    file); `lower_size`, when set, is the lower size a repair cuts a torn tail back to.
    `repairable` says whether `Layer.repair` can fix it (keeping what is intact).
    """

    kind: str
    detail: str = ""
    blocks: list[int] = field(default_factory=list)
    block_size: int = 0
    lower_size: int | None = None
    repairable: bool = False

    @property
    def ranges(self) -> list[tuple[int, int]]:
        """The damaged logical byte ranges, merged: [start, end)."""
        merged: list[tuple[int, int]] = []
        for n in sorted(self.blocks):
            start, end = n * self.block_size, (n + 1) * self.block_size
            if merged and merged[-1][1] == start:
                merged[-1] = (merged[-1][0], end)
            else:
                merged.append((start, end))
        return merged

    def describe(self) -> str:
        if self.kind == BAD_BLOCKS or (self.blocks and not self.detail):
            shown = ", ".join(str(b) for b in self.blocks[:20])
            more = f" and {len(self.blocks) - 20} more" if len(self.blocks) > 20 else ""
            return f"{self.kind} {shown}{more}"
        return f"{self.kind} ({self.detail})" if self.detail else self.kind


Progress = Callable[[int], Any]


class _Clipped:
    """A read-only view of the first `size` bytes of a file (to check before a torn tail)."""

    def __init__(self, lower: RandomAccessFile, size: int) -> None:
        self._lower = lower
        self._size = size

    def read(self, offset: int, size: int) -> bytes:
        return self._lower.read(offset, max(0, min(size, self._size - offset)))

    def write(self, offset: int, data: bytes) -> int:
        raise OSError(errno.EROFS, "read-only")

    def truncate(self, size: int) -> None:
        raise OSError(errno.EROFS, "read-only")

    def size(self) -> int:
        return self._size

    def flush(self) -> None:
        pass


def _reason(exc: Exception) -> str:
    """An exception's message without the "[Errno N]" of OSError (CorruptData is one)."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


#: Bytes per read when checking or copying a whole file.
CHECK_CHUNK = 1 << 20


# ----------------------------------------------------------------------------- layers


class Layer(abc.ABC):
    """One configured provider of a source's stack, able to open files in its format."""

    #: Logical block size the page cache should align to (1 for byte-granular layers).
    block_size: int = 4096
    #: How this layer transforms file names, if it does.
    name_transform: NameTransform | None = None
    #: True when the layer's calls may block on I/O beyond the lower file (a network store):
    #: the core then never runs them on the event loop, however small the request.
    io_bound: bool = False

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

    def size_probe(self, lower_size: int) -> list[tuple[int, int]]:
        """(offset, length) ranges of the lower file that `is_formatted` and `open(...).size()`
        read: a listing that measures many files asks the kernel to read them ahead for all
        of them at once (a cold first listing then waits for the disk once, not per file)."""
        return [(0, 4096)]

    # -- maintenance capabilities (fsck, repair, migrate); the defaults are generic ---------

    def last_valid_size(self, lower: RandomAccessFile) -> int:
        """The largest lower size, at most the current one, that is a whole valid file: what
        a torn tail is cut back to. The default trusts the current size."""
        return lower.size()

    def verify(self, lower: RandomAccessFile, progress: Progress) -> list[Damage]:
        """Check one formatted file completely; [] when it is intact.

        The default opens the file (a failure is a corrupt header), cuts a torn tail back to
        `last_valid_size` for the rest of the check, and reads every logical block, reporting
        the blocks that fail to read. `progress` is told of lower bytes checked.
        """
        damage: list[Damage] = []
        size = lower.size()
        valid = self.last_valid_size(lower)
        view: RandomAccessFile = lower
        if valid < size:
            damage.append(
                Damage(
                    TRUNCATED_TAIL,
                    f"native size {size} is not a valid layout; {size - valid} bytes past the "
                    "last block",
                    lower_size=valid,
                    repairable=True,
                )
            )
            view = _Clipped(lower, valid)
        try:
            upper = self.open(view)
        except CorruptData as exc:
            return [*damage, Damage(CORRUPT_HEADER, _reason(exc))]
        try:
            logical = upper.size()
        except CorruptData as exc:
            return [*damage, Damage(INVALID_SIZE, _reason(exc))]
        block = self.block_size if self.block_size > 1 else CHECK_CHUNK
        bad = _bad_blocks(upper, logical, block, progress)
        if bad:
            damage.append(Damage(BAD_BLOCKS, "failed authentication", bad, block, repairable=True))
        return damage

    def repair(self, lower: RandomAccessFile, damage: list[Damage]) -> None:
        """Fix what `verify` found repairable, in place, keeping every intact byte.

        The default cuts a torn tail back and rewrites bad blocks as zeros through the layer
        (so the rest of the file reads again). Only called when every damage is repairable.
        """
        for found in damage:
            if found.lower_size is not None:
                lower.truncate(found.lower_size)
        upper = self.open(lower)
        size = upper.size()
        for found in damage:
            for n in found.blocks:
                start = n * found.block_size
                if start < size:
                    upper.write(start, bytes(min(found.block_size, size - start)))
        upper.flush()

    def import_plain(
        self, plain: PlainFile, lower: RandomAccessFile, progress: Progress
    ) -> RandomAccessFile:
        """Write a plain file's bytes in this layer's format into the empty `lower` (migrate).

        The default creates the format and copies the data regions, leaving holes as holes.
        """
        upper = self.create(lower)
        copy_plain(plain, upper, progress)
        return upper

    # -- the mount's life ---------------------------------------------------------------------

    def statistics(self) -> dict[str, Any]:
        """Figures for `isofs status` (plain JSON data); none by default."""
        return {}

    def close(self) -> None:
        """Release what `Provider.load` acquired (stores, threads): the mount is ending."""
        return None


def _bad_blocks(upper: RandomAccessFile, size: int, block: int, progress: Progress) -> list[int]:
    """Numbers of the blocks that fail to read; big reads, block by block only on failure."""
    chunk = block * max(1, CHECK_CHUNK // block)
    bad: list[int] = []
    for offset in range(0, size, chunk):
        length = min(chunk, size - offset)
        try:
            data = upper.read(offset, length)
            if len(data) != length:
                raise CorruptData(f"short read at {offset}")
        except CorruptData:
            for n in range(offset // block, (offset + length + block - 1) // block):
                want = min(block, size - n * block)
                try:
                    if len(upper.read(n * block, want)) != want:
                        bad.append(n)
                except CorruptData:
                    bad.append(n)
        progress(length)
    return bad


def copy_plain(plain: PlainFile, upper: RandomAccessFile, progress: Progress) -> None:
    """Copy a plain file through `upper` in CHECK_CHUNK reads, leaving holes as holes."""
    size = plain.size()
    done = 0
    for start, end in plain.data_ranges():
        progress(start - done)
        position = start
        while position < end:
            chunk = plain.read(position, min(CHECK_CHUNK, end - position))
            if not chunk:
                raise OSError(errno.ESTALE, "it shrank while being copied")
            upper.write(position, chunk)
            position += len(chunk)
            progress(len(chunk))
        done = end
    if upper.size() < size:
        upper.truncate(size)
    progress(size - done)


# ----------------------------------------------------------------------------- options

Scope = Literal["init", "mount", "passwd"]
OptionKind = Literal["str", "int", "size", "bool", "path", "choice"]


@dataclass(frozen=True)
class Option:
    """One setting a provider declares: `isofs init SRC --provider P --NAME VALUE`.

    `scopes` says where it may be given: "init" (recorded in the source's config), "mount"
    (`isofs mount ... --NAME`, or `-o NAME=VALUE` from fstab), "passwd". An option given at
    both init and mount is recorded at init and may be overridden for one mount. A "bool"
    option is a switch (`--NAME` / `--no-NAME`); a "size" takes 64K, 1M, 1G.
    """

    name: str
    help: str
    kind: OptionKind = "str"
    default: Any = None
    scopes: frozenset[str] = frozenset({"init"})
    choices: tuple[Any, ...] = ()
    minimum: int | None = None
    maximum: int | None = None
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def parse(self, value: Any, provider: str = "") -> Any:
        """A typed, checked value from text (command line, -o) or JSON; ProviderError if bad."""
        where = f"{provider}: option {self.name}" if provider else f"option {self.name}"
        try:
            parsed = _PARSERS[self.kind](value)
        except (TypeError, ValueError):
            raise ProviderError(f"{where}: not {_KIND_NAMES[self.kind]}: {value!r}") from None
        if self.choices and parsed not in self.choices:
            allowed = ", ".join(str(c) for c in self.choices)
            raise ProviderError(f"{where}: {parsed!r} is not one of {allowed}")
        if self.minimum is not None and parsed < self.minimum:
            raise ProviderError(f"{where}: {parsed} is below the minimum {self.minimum}")
        if self.maximum is not None and parsed > self.maximum:
            raise ProviderError(f"{where}: {parsed} is above the maximum {self.maximum}")
        return parsed


def parse_size(value: Any) -> int:
    """An int from 65536, "64K", "1M", "1.5G" (binary units)."""
    if isinstance(value, bool):
        raise ValueError(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    suffix = text[-1:].upper()
    if suffix == "B" and len(text) > 1 and text[-2:-1].upper() in units:
        text, suffix = text[:-1], text[-2:-1].upper()
    if suffix in units:
        number = float(text[:-1])
        if number < 0 or number != number:
            raise ValueError(value)
        return int(number * units[suffix])
    return int(text)


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    lowered = str(value).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(value)


def _parse_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(value)
    return int(value)


_PARSERS: dict[str, Callable[[Any], Any]] = {
    "str": str,
    "path": str,
    "choice": str,
    "int": _parse_int,
    "size": parse_size,
    "bool": _parse_bool,
}
_KIND_NAMES = {
    "str": "a string",
    "path": "a path",
    "choice": "a choice",
    "int": "an integer",
    "size": "a size",
    "bool": "a boolean",
}


# ----------------------------------------------------------------------------- providers


class SecretSource(Protocol):
    """Where a provider gets a passphrase or key without knowing the CLI."""

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes: ...

    def master_key(self) -> bytes | None: ...


@dataclass
class SetupRequest:
    """What the command line hands a provider: its options, where secrets come from, and a
    place for what must be shown to the user once and never stored (a recovery key)."""

    options: Mapping[str, Any] = field(default_factory=dict)
    secrets: SecretSource | None = None
    report: dict[str, str] = field(default_factory=dict)

    @property
    def secret_source(self) -> SecretSource | None:
        """The secrets to use: a key file given as option `keyfile` wins over the others."""
        keyfile = self.options.get("keyfile")
        return KeyFileSecrets(keyfile) if keyfile else self.secrets


class KeyFileSecrets:
    """A SecretSource whose passphrase is a key file's exact bytes (no newline stripping)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = path

    def passphrase(self, prompt: str, *, confirm: bool = False) -> bytes:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise ProviderError(f"cannot read key file {self.path}: {exc.strerror}") from None
        if not data:
            raise ProviderError(f"key file {self.path} is empty")
        return data

    def master_key(self) -> bytes | None:
        return None


@dataclass
class CommandRequest:
    """What a provider's command gets: the source, its loaded stack and this provider's layer,
    the command's options, and the source's regular files (native paths relative to the
    source, opened read-write or read-only on demand), so it needs no walk of its own."""

    source: Path
    meta_dir: Path
    stack: Stack
    layer: Layer
    options: Mapping[str, Any]
    files: Callable[[], Iterable[tuple[str, Callable[[bool], RandomAccessFile]]]]
    progress: bool = False
    mounted: bool = False
    out: Callable[[str], None] = print


@dataclass(frozen=True)
class Command:
    """A subcommand a provider adds to `isofs` (`isofs NAME SOURCE [options]`), e.g. the
    garbage collection of a chunk store. `run` returns the exit status; `offline_only` makes
    the command refuse a mounted source (unless --force)."""

    name: str
    help: str
    run: Callable[[CommandRequest], int]
    options: tuple[Option, ...] = ()
    offline_only: bool = False


class Provider(abc.ABC):
    """A provider plugin, registered under the entry-point group `isofs.providers`."""

    name: ClassVar[str]
    #: The settings this provider takes (see `Option`); the command line is built from them.
    options: ClassVar[tuple[Option, ...]] = ()
    #: Subcommands this provider adds to `isofs` (see `Command`).
    commands: ClassVar[tuple[Command, ...]] = ()

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        """Create this provider's state for a new source; return its config (stored as JSON).

        Secret material must be stored wrapped, never in the returned config in clear.
        """
        return {}

    @classmethod
    @abc.abstractmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> Layer:
        """Build the layer for a mount from the config `initialise` returned (and the mount's
        options in `request.options`)."""

    @classmethod
    def change_passphrase(
        cls,
        meta_dir: Path,
        old: SecretSource,
        new: SecretSource,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> bool:
        """Re-wrap this provider's key under a new passphrase (`isofs passwd`); False when
        the provider has no passphrase (the default). A wrong `old` must change nothing."""
        return False

    @classmethod
    def option(cls, name: str) -> Option | None:
        return next((o for o in cls.options if o.name == name), None)

    @classmethod
    def parse_options(cls, given: Mapping[str, Any], scope: Scope) -> dict[str, Any]:
        """Typed values of the declared options in `given` that `scope` allows; ProviderError
        for a declared option given where it does not belong or with a bad value. Undeclared
        keys (e.g. the framework's `keyfile`) pass through unchanged."""
        parsed: dict[str, Any] = {}
        for key, value in given.items():
            option = cls.option(key)
            if option is None:
                parsed[key] = value
            elif scope not in option.scopes:
                where = " or ".join(sorted(option.scopes))
                raise ProviderError(f"{cls.name}: option {key} can only be given at {where}")
            else:
                parsed[key] = option.parse(value, cls.name)
        return parsed


def unknown_option_error(name: str, known: Iterable[str]) -> ProviderError:
    """A one-line error for an option no provider of the stack declares."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    listed = ", ".join(known) or "none"
    return ProviderError(f"unknown option {name!r}{hint}; options here: {listed}")


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


# ----------------------------------------------------------------------------- stacks


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

    @property
    def io_bound(self) -> bool:
        """Whether any layer may block on I/O (then no call runs on the event loop)."""
        return any(layer.io_bound for layer in self.layers)

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

    def import_plain(
        self, plain: PlainFile, native: RandomAccessFile, progress: Progress
    ) -> RandomAccessFile:
        """Write a plain file in the stack's format into an empty native file (migrate):
        every layer but the top one is created empty, the top one imports the bytes."""
        current = native
        for layer in self.layers[:-1]:
            current = layer.create(current)
        return self.layers[-1].import_plain(plain, current, progress)

    @property
    def name_transform(self) -> NameTransform | None:
        """The stack's name transform (at most one layer may transform names)."""
        transforms = [layer.name_transform for layer in self.layers if layer.name_transform]
        if len(transforms) > 1:
            raise ProviderError("only one provider of a stack may transform file names")
        return transforms[0] if transforms else None

    def size_probe(self, native_size: int) -> list[tuple[int, int]]:
        """What measuring a file reads of the native file (the bottom layer knows)."""
        return self.layers[0].size_probe(native_size) if self.layers else []

    def logical_size(self, native_size: int) -> int | None:
        """Logical size from the native size alone, when every layer can compute it."""
        size: int | None = native_size
        for layer in self.layers:
            if size is None:
                return None
            size = layer.logical_size(size)
        return size

    def statistics(self) -> list[dict[str, Any]]:
        return [{"layer": type(layer).__name__, **layer.statistics()} for layer in self.layers]

    def close(self) -> None:
        for layer in reversed(self.layers):
            layer.close()
