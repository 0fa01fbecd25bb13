"""The glue: the encrypt provider's options, its layer, and its name transform.

Everything here is blocking and single-file: the filesystem decides where layers run (inline
for request-sized work, see isofs.core.sections), so this package starts no threads of its own.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from isofs.provider import (
    Layer,
    Option,
    Provider,
    ProviderError,
    RandomAccessFile,
    SecretSource,
    SetupRequest,
)
from isofs_providers.encrypt.content import (
    BLOCK_SIZE,
    HEADER_SIZE,
    EncryptedFile,
    check_header,
    is_header,
    last_valid_size_of,
    logical_size_of,
    new_header,
)
from isofs_providers.encrypt.kdf import (
    DEFAULT_SCRYPT_N,
    DEFAULT_SCRYPT_P,
    DEFAULT_SCRYPT_R,
    INFO_CONTENT,
    MASTER_KEY_SIZE,
    SCRYPT_N_RANGE,
    SCRYPT_P_RANGE,
    SCRYPT_R_RANGE,
    subkey,
    wipe,
)
from isofs_providers.encrypt.keystore import (
    KEYSTORE_NAME,
    format_master_key,
    keystore_path,
    parse_master_key,
    read_keystore,
    scrypt_params,
    unlock,
    wrap,
    write_keystore,
)
from isofs_providers.encrypt.metadata import LinkCodec, XattrCodec
from isofs_providers.encrypt.names import (
    DIRIV_NAME,
    NameCodec,
    is_bookkeeping_name,
    new_dir_id,
    parse_dir_id,
)

CONFIG_VERSION = 1


class EncryptedNames:
    """The `isofs.provider.NameTransform` of the encrypt layer: names, symlink targets and
    user.* extended attributes."""

    dir_key_name = DIRIV_NAME

    def __init__(self, codec: NameCodec, links: LinkCodec, xattrs: XattrCodec) -> None:
        self.codec = codec
        self.links = links
        self.xattrs = xattrs

    def new_dir_key(self) -> bytes:
        return new_dir_id()

    def parse_dir_key(self, data: bytes) -> bytes:
        return parse_dir_id(data)

    def to_native(self, dir_key: bytes, name: str) -> tuple[str, bytes | None]:
        return NameCodec.disk_name(self.codec.encrypt_name(dir_key, name))

    def sidecar_name(self, native_name: str) -> str | None:
        if NameCodec.is_long_name_stub(native_name):
            return NameCodec.sidecar_name(native_name)
        return None

    def is_bookkeeping(self, native_name: str) -> bool:
        return is_bookkeeping_name(native_name)

    def to_view(self, dir_key: bytes, native_name: str, sidecar: bytes | None) -> str:
        encoded = native_name
        if sidecar is not None:
            encoded = NameCodec.from_long_name(native_name, sidecar)
        return self.codec.decrypt_name(dir_key, encoded)

    def link_to_native(self, target: bytes) -> bytes:
        return self.links.seal(target)

    def link_to_view(self, stored: bytes) -> bytes:
        return self.links.open(stored)

    def xattr_name_to_native(self, name: bytes) -> bytes:
        return self.xattrs.seal_name(name)

    def xattr_name_to_view(self, stored: bytes) -> bytes:
        return self.xattrs.open_name(stored)

    def xattr_value_to_native(self, native_name: bytes, value: bytes) -> bytes:
        if not self.xattrs.is_sealed(native_name):
            return value
        return self.xattrs.seal_value(native_name, value)

    def xattr_value_to_view(self, native_name: bytes, stored: bytes) -> bytes:
        if not self.xattrs.is_sealed(native_name):
            return stored
        return self.xattrs.open_value(native_name, stored)


class EncryptLayer(Layer):
    """Opens and creates files in the encrypted format with one master key's subkeys."""

    block_size = BLOCK_SIZE

    def __init__(
        self,
        master_key: bytes | bytearray,
        *,
        encrypt_names: bool = False,
        allow_holes: bool = True,
    ) -> None:
        if len(master_key) != MASTER_KEY_SIZE:
            raise ValueError("master key must be 32 bytes")
        # Only subkeys are kept; the caller wipes its master-key buffer.
        self._aead = AESGCM(subkey(master_key, INFO_CONTENT, 32))
        self.allow_holes = allow_holes
        self.names: NameCodec | None = (
            NameCodec.from_master_key(master_key) if encrypt_names else None
        )
        self.name_transform = (
            EncryptedNames(
                self.names,
                LinkCodec.from_master_key(master_key),
                XattrCodec.from_master_key(master_key),
            )
            if self.names is not None
            else None
        )

    def is_formatted(self, lower: RandomAccessFile) -> bool:
        return is_header(bytes(lower.read(0, HEADER_SIZE)))

    def open(self, lower: RandomAccessFile) -> EncryptedFile:
        head = check_header(bytes(lower.read(0, HEADER_SIZE)))
        return EncryptedFile(lower, head, self._aead, allow_holes=self.allow_holes)

    def create(self, lower: RandomAccessFile) -> EncryptedFile:
        if lower.size() != 0:
            raise ValueError("encrypt: create() needs an empty lower file")
        head = new_header()
        lower.write(0, head)
        return EncryptedFile(lower, head, self._aead, allow_holes=self.allow_holes)

    def logical_size(self, lower_size: int) -> int | None:
        return logical_size_of(lower_size)

    def last_valid_size(self, lower: RandomAccessFile) -> int:
        return last_valid_size_of(lower.size())


_SCRYPT_SCOPES = frozenset({"init", "passwd"})


def _check_config_version(config: Mapping[str, Any]) -> None:
    version = config.get("version")
    if version != CONFIG_VERSION:
        raise ProviderError(
            f"encrypt: unsupported config version {version!r} "
            f"(this isofs reads version {CONFIG_VERSION})"
        )


class EncryptProvider(Provider):
    """AES-256-GCM file contents; with encrypt_names, AES-SIV file names too.

    The master key is random, stored only wrapped under the passphrase (or a key file) in
    `encrypt.json`; its recovery form goes to `SetupRequest.report["master_key"]` at init, for
    the command line to show once. A recovery key from `SecretSource.master_key()` unlocks
    instead of the passphrase, and at init re-uses that key instead of a fresh one.
    """

    name = "encrypt"
    options = (
        Option(
            "encrypt_names",
            "encrypt file names, symlink targets and user. xattrs (AES-SIV)",
            kind="bool",
            default=False,
        ),
        Option(
            "allow_holes",
            "read all-zero native blocks as zeros, so grown files stay sparse (such a block "
            "is not authenticated)",
            kind="bool",
            default=True,
        ),
        Option(
            "scrypt_n",
            "scrypt cost of the passphrase's key derivation (a power of two)",
            kind="int",
            default=DEFAULT_SCRYPT_N,
            scopes=_SCRYPT_SCOPES,
            minimum=SCRYPT_N_RANGE[0],
            maximum=SCRYPT_N_RANGE[1],
            metavar="N",
        ),
        Option(
            "scrypt_r",
            "scrypt block size of the passphrase's key derivation",
            kind="int",
            default=DEFAULT_SCRYPT_R,
            scopes=_SCRYPT_SCOPES,
            minimum=SCRYPT_R_RANGE[0],
            maximum=SCRYPT_R_RANGE[1],
            metavar="R",
        ),
        Option(
            "scrypt_p",
            "scrypt parallelism of the passphrase's key derivation",
            kind="int",
            default=DEFAULT_SCRYPT_P,
            scopes=_SCRYPT_SCOPES,
            minimum=SCRYPT_P_RANGE[0],
            maximum=SCRYPT_P_RANGE[1],
            metavar="P",
        ),
    )

    @classmethod
    def _scrypt_costs(
        cls, given: Mapping[str, Any], fallback: tuple[int, int, int]
    ) -> tuple[int, int, int]:
        """(n, r, p): the parsed options given, the others from `fallback`."""
        keys = ("scrypt_n", "scrypt_r", "scrypt_p")
        n, r, p = (given.get(key, kept) for key, kept in zip(keys, fallback, strict=True))
        if n & (n - 1):
            raise ProviderError(f"{cls.name}: option scrypt_n: {n} is not a power of two")
        return n, r, p

    @classmethod
    def initialise(cls, meta_dir: Path, request: SetupRequest) -> dict[str, Any]:
        options = cls.parse_options(request.options, "init")
        n, r, p = cls._scrypt_costs(options, (DEFAULT_SCRYPT_N, DEFAULT_SCRYPT_R, DEFAULT_SCRYPT_P))
        meta_dir = Path(meta_dir)
        meta_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if keystore_path(meta_dir).exists():
            raise ProviderError(f"encrypt: {KEYSTORE_NAME} already exists; refusing to replace it")
        secrets = request.secret_source
        if secrets is None:
            raise ProviderError("encrypt: no passphrase or key file given")
        # A recovery key is asked of the user's secrets even when a key file gives the
        # passphrase: re-wrapping an existing key under a key file is a normal set-up.
        recovery = request.secrets.master_key() if request.secrets is not None else None
        if recovery is not None:
            master = parse_master_key(recovery)
        else:
            master = bytearray(os.urandom(MASTER_KEY_SIZE))
        try:
            passphrase = secrets.passphrase("New passphrase: ", confirm=True)
            write_keystore(meta_dir, wrap(master, passphrase, n, r, p), new=True)
            request.report["master_key"] = format_master_key(master)
        finally:
            wipe(master)
        return {
            "version": CONFIG_VERSION,
            "encrypt_names": cls._value(options, "encrypt_names"),
            "allow_holes": cls._value(options, "allow_holes"),
        }

    @classmethod
    def _value(cls, options: Mapping[str, Any], name: str) -> Any:
        option = cls.option(name)
        assert option is not None, name
        return options.get(name, option.default)

    @classmethod
    def load(cls, meta_dir: Path, config: Mapping[str, Any], request: SetupRequest) -> EncryptLayer:
        _check_config_version(config)
        store = read_keystore(Path(meta_dir))
        master = unlock(store, request.secret_source)
        try:
            return EncryptLayer(
                master,
                encrypt_names=bool(config.get("encrypt_names", False)),
                allow_holes=bool(config.get("allow_holes", True)),
            )
        finally:
            wipe(master)

    @classmethod
    def change_passphrase(
        cls,
        meta_dir: Path,
        old: SecretSource,
        new: SecretSource,
        *,
        options: Mapping[str, Any] | None = None,
    ) -> bool:
        """Re-wrap the same master key under a new passphrase; no file is re-encrypted.

        The old side may give the recovery key instead of the passphrase. scrypt_n/r/p given
        in `options` replace the stored costs; the others are kept.
        """
        store = read_keystore(Path(meta_dir))
        given = cls.parse_options(options or {}, "passwd")
        n, r, p = cls._scrypt_costs(given, scrypt_params(store))
        master = unlock(store, old, "Old passphrase: ")
        try:
            document = wrap(master, new.passphrase("New passphrase: ", confirm=True), n, r, p)
        finally:
            wipe(master)
        write_keystore(Path(meta_dir), document)
        return True
