"""The `encrypt` provider: AES-256-GCM file contents and AES-SIV file names.

The on-disk format is specified in docs/FORMAT-encrypt.md; keep the two in step. One concern
per module, dependencies one-way: `layer` (the provider, its layer and name transform) uses
`keystore` (the wrapped master key), `names`, `metadata` (symlinks, xattrs) and `content`
(the file format), which all use `kdf` (subkeys, scrypt limits, helpers).

This module re-exports what the rest of isofs and the tests import.
"""

from isofs_providers.encrypt.content import BLOCK_SIZE, HEADER_SIZE, NATIVE_BLOCK_SIZE
from isofs_providers.encrypt.keystore import format_master_key, parse_master_key
from isofs_providers.encrypt.layer import EncryptLayer, EncryptProvider
from isofs_providers.encrypt.metadata import LinkCodec, XattrCodec
from isofs_providers.encrypt.names import DIRIV_NAME, NameCodec, new_dir_id, parse_dir_id

__all__ = [
    "BLOCK_SIZE",
    "DIRIV_NAME",
    "HEADER_SIZE",
    "NATIVE_BLOCK_SIZE",
    "EncryptLayer",
    "EncryptProvider",
    "LinkCodec",
    "NameCodec",
    "XattrCodec",
    "format_master_key",
    "new_dir_id",
    "parse_dir_id",
    "parse_master_key",
]
