"""A source directory's isofs metadata: the provider stack recorded by `isofs init`.

The metadata lives in `.isofs/` at the source root (only the native view sees it):
`config.json` = {"version": 1, "stack": [{"provider": NAME, "config": {...}}, ...]}, lowest
layer first, plus whatever files the providers keep there (wrapped keys, caches).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from isofs.core import METADATA_DIR_NAME
from isofs.provider import ProviderError, SetupRequest, Stack, load_provider

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
    path = meta_dir / CONFIG_NAME
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(document, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def init_source(source: str, providers: list[str], request: SetupRequest) -> None:
    """Record a provider stack for `source`; each provider sets up its own state first."""
    root = Path(source)
    if not root.is_dir():
        raise ProviderError(f"source is not a directory: {source}")
    meta_dir = meta_dir_of(root)
    if (meta_dir / CONFIG_NAME).exists():
        raise ProviderError(f"{source} is already initialised ({META_DIR_NAME}/{CONFIG_NAME})")
    classes = [load_provider(name) for name in providers]  # unknown names fail before changes
    request = _report_from_options(request)
    meta_dir.mkdir(mode=0o700, exist_ok=True)
    stack = []
    for name, provider in zip(providers, classes, strict=True):
        stack.append({"provider": name, "config": provider.initialise(meta_dir, request)})
    _write_config(meta_dir, {"version": CONFIG_VERSION, "stack": stack})


def _report_from_options(request: SetupRequest) -> SetupRequest:
    """Turn the `_report` dict an older command line puts among the options into
    `SetupRequest.report`, so providers only ever see `report` (drop once no caller does)."""
    legacy = request.options.get("_report")
    if not isinstance(legacy, dict):
        return request
    options = {k: v for k, v in request.options.items() if k != "_report"}
    return SetupRequest(options=options, secrets=request.secrets, report=legacy)


def load_stack(meta_dir: Path, request: SetupRequest) -> Stack:
    """Build the stack recorded in `meta_dir` (empty: an uninitialised source)."""
    document = read_config(meta_dir)
    layers = []
    for item in document["stack"]:
        provider = load_provider(item["provider"])
        layers.append(provider.load(meta_dir, item.get("config", {}), request))
    return Stack(layers)
