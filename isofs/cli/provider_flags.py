"""Command-line flags built from the options providers declare (`isofs.provider.Option`).

`isofs init SRC --provider compress --level 9`, `isofs mount SRC MNT --level 3` and
`isofs passwd SRC --scrypt-n N` take flags that no line of the CLI names: each provider of the
stack (the `--provider`s of init, the recorded stack of mount and passwd) adds an argument
group of its options for that scope, and `--help` shows them. An option two providers of one
stack both declare is spelled `--PROVIDER-NAME` for each. Values stay text here; the providers
type and check them (`Provider.parse_options`), so `-o name=value` from fstab and `--option
name=value` get the same checks.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from isofs.provider import Option, Provider, Scope, unknown_option_error

_DEST = "provider_option__"


def _dest(provider: str, option: str) -> str:
    return f"{_DEST}{provider}__{option}"


def add_provider_options(
    parser: argparse.ArgumentParser, providers: Sequence[type[Provider]], scope: Scope
) -> None:
    """One argument group per provider with its options for `scope`."""
    counts: dict[str, int] = {}
    for provider in providers:
        for option in _in_scope(provider, scope):
            counts[option.name] = counts.get(option.name, 0) + 1
    for provider in providers:
        options = _in_scope(provider, scope)
        if not options:
            continue
        group = parser.add_argument_group(f"options of provider {provider.name}")
        for option in options:
            flag = option.flag
            if counts[option.name] > 1:
                flag = f"--{provider.name}-{option.name}".replace("_", "-")
            _add(group, flag, _dest(provider.name, option.name), option)


def add_option_flags(
    parser: argparse.ArgumentParser, provider: type[Provider], options: Sequence[Option]
) -> None:
    """Flags for a provider command's own options (read back with `given_options`)."""
    if options:
        group = parser.add_argument_group(f"options of {provider.name}")
        for option in options:
            _add(group, option.flag, _dest(provider.name, option.name), option)


def _in_scope(provider: type[Provider], scope: Scope) -> list[Option]:
    return [option for option in provider.options if scope in option.scopes]


def _add(group: Any, flag: str, dest: str, option: Option) -> None:
    shown = option.help
    if option.default is not None:
        shown += f" (default {_shown(option)})"
    if option.kind == "bool":
        group.add_argument(
            flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=shown
        )
        return
    metavar = option.metavar or ("|".join(map(str, option.choices)) if option.choices else
                                 option.kind.upper())  # fmt: skip
    group.add_argument(flag, dest=dest, default=None, metavar=metavar, help=shown)


def _shown(option: Option) -> str:
    if option.kind == "size" and isinstance(option.default, int):
        for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
            if option.default >= size and option.default % size == 0:
                return f"{option.default // size}{unit}"
    if option.kind == "bool":
        return "on" if option.default else "off"
    return str(option.default)


def given_options(
    namespace: argparse.Namespace, providers: Sequence[type[Provider]]
) -> dict[str, dict[str, Any]]:
    """Per provider name: the options given on the command line (as text)."""
    given: dict[str, dict[str, Any]] = {provider.name: {} for provider in providers}
    for key, value in vars(namespace).items():
        if key.startswith(_DEST) and value is not None:
            provider, _, option = key[len(_DEST) :].partition("__")
            given.setdefault(provider, {})[option] = value
    return given


def merge_key_values(
    given: dict[str, dict[str, Any]],
    pairs: Iterable[str],
    providers: Sequence[type[Provider]],
    scope: Scope,
) -> dict[str, dict[str, Any]]:
    """Add `KEY=VALUE` pairs (`--option`) to the providers that declare KEY for `scope` (or,
    when none does, to those that declare no options at all: they check their own)."""
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise unknown_option_error(pair, _names(providers, scope))
        owners = [p for p in providers if any(o.name == key for o in _in_scope(p, scope))]
        if not owners:  # a provider that declares nothing takes every key as it is
            owners = [p for p in providers if not p.options]
        if not owners:
            raise unknown_option_error(key, _names(providers, scope))
        for provider in owners:
            given.setdefault(provider.name, {})[key] = value
    return given


def _names(providers: Sequence[type[Provider]], scope: Scope) -> list[str]:
    return [option.name for provider in providers for option in _in_scope(provider, scope)]


def parsed_options(
    given: Mapping[str, Mapping[str, Any]], providers: Sequence[type[Provider]], scope: Scope
) -> dict[str, dict[str, Any]]:
    """Typed and checked values per provider (ProviderError with one line when bad)."""
    return {
        provider.name: provider.parse_options(given.get(provider.name, {}), scope)
        for provider in providers
    }
