"""`isofs passwd`: every provider of the stack that has a passphrase re-wraps its key.

File contents are not rewritten. Each provider unlocks with the old secret (a passphrase, key
file or recovery key) before it asks for the new one, so a wrong old secret changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from isofs.maintenance.common import MaintenanceError, require_initialised
from isofs.provider import SecretSource, load_provider
from isofs.source import read_config


def change_passphrase(
    source: str | os.PathLike[str],
    old: SecretSource,
    new: SecretSource,
    *,
    options: Mapping[str, Any] | None = None,
) -> list[str]:
    """Re-wrap the key of every provider that has one; return the providers changed.

    `options` are passwd-scope options (e.g. a new key-derivation cost); each provider gets
    the ones it declares.
    """
    meta_dir = require_initialised(source)
    changed: list[str] = []
    names = [item["provider"] for item in read_config(meta_dir)["stack"]]
    for name in names:
        provider = load_provider(name)
        own = {k: v for k, v in (options or {}).items() if provider.option(k) is not None}
        if provider.change_passphrase(
            meta_dir, old, new, options=provider.parse_options(own, "passwd")
        ):
            changed.append(name)
    if not changed:
        stack = " -> ".join(names) or "empty"
        raise MaintenanceError(f"no provider of {os.fspath(source)} has a passphrase ({stack})")
    return changed
