"""A source directory's isofs metadata: the provider stack recorded by `isofs init`.

The metadata lives in `.isofs/` at the source root (only the native view sees it):
`config.json` = {"version": 1, "stack": [{"provider": NAME, "config": {...}}, ...]}, lowest
layer first, plus whatever files the providers keep there (wrapped keys, caches).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from isofs import durable
from isofs.core import METADATA_DIR_NAME
from isofs.provider import (
    Layer,
    Provider,
    ProviderError,
    Scope,
    SetupRequest,
    Stack,
    load_provider,
)

META_DIR_NAME = METADATA_DIR_NAME
CONFIG_NAME = "config.json"
CONFIG_VERSION = 1


def meta_dir_of(source: str | os.PathLike[str]) -> Path:
    return Path(source) / META_DIR_NAME


def is_initialised(source: str | os.PathLike[str]) -> bool:
    return (meta_dir_of(source) / CONFIG_NAME).is_file()


def read_config(meta_dir: Path) -> dict[str, Any]:
    """The recorded stack, validated enough that a broken file gives a one-line error."""
    path = meta_dir / CONFIG_NAME
    try:
        document = json.loads(path.read_text())
    except FileNotFoundError:
        return {"version": CONFIG_VERSION, "stack": []}
    except (OSError, ValueError) as exc:
        raise ProviderError(f"cannot read {META_DIR_NAME}/{CONFIG_NAME}: {exc}") from None
    if not isinstance(document, dict) or document.get("version") != CONFIG_VERSION:
        raise ProviderError(f"{META_DIR_NAME}/{CONFIG_NAME}: unsupported format version")
    stack = document.get("stack")
    if not isinstance(stack, list) or not all(
        isinstance(item, dict) and isinstance(item.get("provider"), str) for item in stack
    ):
        raise ProviderError(f"{META_DIR_NAME}/{CONFIG_NAME}: malformed stack")
    return document


def _write_config(meta_dir: Path, document: dict[str, Any]) -> None:
    durable.replace(meta_dir / CONFIG_NAME, json.dumps(document, indent=2).encode())


OptionsByProvider = Mapping[str, Mapping[str, Any]]


def _request_for(
    provider: type[Provider], request: SetupRequest, own: OptionsByProvider | None, scope: Scope
) -> SetupRequest:
    """The request one provider sees: the shared options plus its own (from its flags, which
    must belong to `scope`), typed and checked."""
    shared = {}
    for key, value in request.options.items():
        option = provider.option(key)
        shared[key] = value if option is None else option.parse(value, provider.name)
    options = {**shared, **provider.parse_options((own or {}).get(provider.name, {}), scope)}
    return SetupRequest(
        options=options,
        secrets=request.secrets,
        report=request.report,
    )


def init_source(
    source: str,
    providers: list[str],
    request: SetupRequest,
    options: OptionsByProvider | None = None,
) -> None:
    """Record a provider stack for `source`; each provider sets up its own state first.

    `options` holds each provider's own options by provider name (from its command-line
    flags); `request.options` are given to every provider.
    """
    root = Path(source)
    if not root.is_dir():
        raise ProviderError(f"source is not a directory: {source}")
    meta_dir = meta_dir_of(root)
    if (meta_dir / CONFIG_NAME).exists():
        raise ProviderError(f"{source} is already initialised ({META_DIR_NAME}/{CONFIG_NAME})")
    classes = [load_provider(name) for name in providers]  # unknown names fail before changes
    requests = [_request_for(p, request, options, "init") for p in classes]  # bad values too
    meta_dir.mkdir(mode=0o700, exist_ok=True)
    stack = []
    for name, provider, own in zip(providers, classes, requests, strict=True):
        stack.append({"provider": name, "config": provider.initialise(meta_dir, own)})
    _write_config(meta_dir, {"version": CONFIG_VERSION, "stack": stack})


def stack_providers(meta_dir: Path) -> list[type[Provider]]:
    """The provider classes of the stack recorded in `meta_dir`, lowest first."""
    return [load_provider(item["provider"]) for item in read_config(meta_dir)["stack"]]


def load_stack(
    meta_dir: Path, request: SetupRequest, options: OptionsByProvider | None = None
) -> Stack:
    """Build the stack recorded in `meta_dir` (empty: an uninitialised source).

    `options` holds mount options by provider name; a layer built so far is closed again if
    a later one fails to load.
    """
    document = read_config(meta_dir)
    layers: list[Layer] = []
    try:
        for item in document["stack"]:
            provider = load_provider(item["provider"])
            own = _request_for(provider, request, options, "mount")
            layers.append(provider.load(meta_dir, item.get("config", {}), own))
    except BaseException:
        Stack(layers).close()
        raise
    return Stack(layers)
