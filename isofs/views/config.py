"""Parse the view policy from the command line and a TOML file, with one-line errors.

Every error is a `ConfigError` whose message names where the problem is (the CLI option
and its text, or the file, rule number and key) so it can be printed as
`isofs: error: <message>` and fixed without guessing.
"""

from __future__ import annotations

import difflib
import grp
import os
import pwd
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from isofs.views.policy import KNOWN_VIEWS, VIEW_NATIVE, VIEW_TARGET, Policy, Rule

RULE_KEYS = ("exe", "uid", "gid", "cgroup", "ancestor", "comm")
_GLOB_KEYS = ("exe", "cgroup", "ancestor", "comm")
_PATH_KEYS = ("exe", "cgroup", "ancestor")  # values are absolute paths
_TOP_LEVEL_KEYS = ("default_view", "rule")
_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"
_COMM_MAX = 15  # TASK_COMM_LEN - 1
_VIEW_CHOICES = " or ".join(f'"{view}"' for view in KNOWN_VIEWS)


class ConfigError(Exception):
    """A policy input is invalid; the message is one line, printed as `isofs: error: ...`."""


class _BadValue(Exception):
    """A value problem, before the location (origin) is known; message excludes the key."""


def _suggest(word: str, choices: Sequence[str]) -> str:
    """A ' (did you mean ...?)' hint for a misspelled key, or ''."""
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _describe_type(value: object) -> str:
    """How a TOML value is named in messages: the string itself, else its TOML type."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return "a date/time"


def _check_view(value: object, what: str) -> str:
    """Validate a view name; the message reads `<what> must be "target" or "native", ...`."""
    if not isinstance(value, str) or value not in KNOWN_VIEWS:
        raise _BadValue(f"{what} must be {_VIEW_CHOICES}, not {_describe_type(value)}")
    return value


def _parse_id(key: str, value: str, lookup: Callable[[str], int], kind: str) -> int:
    """A uid/gid given as a number or a user/group name."""
    if re.fullmatch(r"-?[0-9]+", value):
        number = int(value)
        if not 0 <= number <= _MAX_ID:
            raise _BadValue(f"{key}: {value} is out of range (0 to {_MAX_ID})")
        return number
    try:
        return lookup(value)
    except KeyError:
        raise _BadValue(f"{key}: no such {kind} '{value}'") from None


def _parse_glob(key: str, value: str) -> str:
    """Reject globs that can never match, which are almost always a mistake."""
    if key in _PATH_KEYS and not value.startswith(("/", "*", "?", "[")):
        raise _BadValue(
            f"{key}: '{value}' can never match, {key} paths are absolute "
            f"(did you mean '*/{value}'?)"
        )
    literal = not any(c in value for c in "*?[")
    if key == "comm" and literal and len(os.fsencode(value)) > _COMM_MAX:
        raise _BadValue(
            f"comm: '{value}' can never match, the kernel truncates comm to "
            f"{_COMM_MAX} bytes (use '{os.fsdecode(os.fsencode(value)[:_COMM_MAX])}')"
        )
    return value


def _convert(key: str, value: str) -> str | int:
    """Validate one condition's string value and convert it to its Rule field type."""
    if not value:
        raise _BadValue(f"{key}: empty value")
    if key == "uid":
        return _parse_id(key, value, lambda name: pwd.getpwnam(name).pw_uid, "user")
    if key == "gid":
        return _parse_id(key, value, lambda name: grp.getgrnam(name).gr_gid, "group")
    return _parse_glob(key, value)


def _make_rule(view: str, conditions: Mapping[str, str | int], origin: str) -> Rule:
    return Rule(view=view, origin=origin, **conditions)  # type: ignore[arg-type]


def parse_rule(text: str, view: str, origin: str) -> Rule:
    """Parse a CLI rule `key=value[,key=value...]`, e.g. `exe=/usr/bin/vim,uid=1000`.

    `origin` prefixes every error and is kept in the rule, e.g. `--target 'exe=...'`.
    Values cannot contain ',' and surrounding whitespace is ignored.
    """
    if not text.strip():
        raise ConfigError(
            f"{origin}: empty rule, expected key=value[,key=value...] with keys "
            f"{', '.join(RULE_KEYS)} (to give every process one view use --default-view)"
        )
    conditions: dict[str, str | int] = {}
    for item in text.split(","):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals:
            what = f"'{item.strip()}'" if item.strip() else "empty condition"
            raise ConfigError(f"{origin}: {what}: expected key=value")
        if key not in RULE_KEYS:
            raise ConfigError(
                f"{origin}: unknown key '{key}'{_suggest(key, RULE_KEYS)}"
                f" (keys: {', '.join(RULE_KEYS)})"
            )
        if key in conditions:
            raise ConfigError(f"{origin}: {key}: duplicate key")
        try:
            conditions[key] = _convert(key, value)
        except _BadValue as e:
            raise ConfigError(f"{origin}: {e}") from None
    return _make_rule(view, conditions, origin)


def _toml_condition(key: str, value: object) -> str | int:
    """Validate one TOML rule value (typed, unlike CLI text)."""
    if key in ("uid", "gid"):
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value <= _MAX_ID:
                raise _BadValue(f"{key}: {value} is out of range (0 to {_MAX_ID})")
            return value
        if isinstance(value, str):
            return _convert(key, value)
        kind = "user" if key == "uid" else "group"
        found = _describe_type(value)
        raise _BadValue(f"{key} must be an integer or a {kind} name, not {found}")
    if not isinstance(value, str):
        raise _BadValue(f"{key} must be a string, not {_describe_type(value)}")
    return _convert(key, value)


def _toml_rule(table: object, name: str, number: int) -> Rule:
    """Turn the `number`-th [[rule]] table of file `name` into a Rule."""
    where = f"{name}: rule {number}"
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table, not {_describe_type(table)}")
    allowed = ("view", *RULE_KEYS)
    for key in table:
        if key not in allowed:
            keys = ", ".join(allowed)
            raise ConfigError(
                f"{where}: unknown key '{key}'{_suggest(key, allowed)} (keys: {keys})"
            )
    if "view" not in table:
        raise ConfigError(f"{where}: missing key 'view' ({_VIEW_CHOICES})")
    try:
        view = _check_view(table["view"], "view")
        conditions = {key: _toml_condition(key, table[key]) for key in RULE_KEYS if key in table}
    except _BadValue as e:
        raise ConfigError(f"{where}: {e}") from None
    return _make_rule(view, conditions, f"{name} rule {number}")


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_AT_END = " (at end of document)"


def _toml_syntax_error(name: str, text: str, error: tomllib.TOMLDecodeError) -> ConfigError:
    """`file: line N: message (column C)` from tomllib's `message (at line N, column C)`."""
    message = str(error)
    position = _TOML_POSITION.search(message)
    if position is not None:
        reason = message[: position.start()]
        return ConfigError(f"{name}: line {position[1]}: {reason} (column {position[2]})")
    if message.endswith(_TOML_AT_END):
        # Python 3.11 reports no line for errors at the end: name the last line.
        line = text.rstrip("\n").count("\n") + 1
        return ConfigError(
            f"{name}: line {line}: {message.removesuffix(_TOML_AT_END)} at end of file"
        )
    return ConfigError(f"{name}: {message}")


def load_policy_file(path: str | os.PathLike[str]) -> tuple[str | None, list[Rule]]:
    """Read a TOML policy: `default_view` (None if absent) and the [[rule]] tables in order."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, expected a TOML file") from None
    except PermissionError:
        raise ConfigError(f"{name}: permission denied") from None
    except OSError as e:
        raise ConfigError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        text = data.decode()
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{name}: line {line}: not valid UTF-8") from None
    try:
        document: dict[str, Any] = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise _toml_syntax_error(name, text, e) from None
    for key in document:
        if key not in _TOP_LEVEL_KEYS:
            hint = _suggest(key, _TOP_LEVEL_KEYS)
            if not hint and key == "rules":
                hint = " (did you mean '[[rule]]'?)"
            keys = ", ".join(_TOP_LEVEL_KEYS)
            raise ConfigError(f"{name}: unknown top-level key '{key}'{hint} (keys: {keys})")
    default_view: str | None = None
    if "default_view" in document:
        try:
            default_view = _check_view(document["default_view"], "default_view")
        except _BadValue as e:
            raise ConfigError(f"{name}: {e}") from None
    tables = document.get("rule", [])
    if not isinstance(tables, list):
        raise ConfigError(f"{name}: 'rule' must be an array of tables: write [[rule]], not [rule]")
    rules = [_toml_rule(table, name, number) for number, table in enumerate(tables, 1)]
    return default_view, rules


def build_policy(
    policy_file: str | None,
    targets: Sequence[str],
    ignores: Sequence[str],
    default_view: str | None,
) -> Policy:
    """Combine CLI rules and the policy file into one Policy.

    Order (first match wins): CLI `--ignore` rules (view native), then CLI `--target` rules
    (view target), each in the order given, then the file's rules. So an explicit --ignore
    always wins, and the command line overrides the file. `--default-view` overrides the
    file's `default_view`; without either, the default view is native.
    """
    if default_view is not None:
        try:
            _check_view(default_view, "--default-view")
        except _BadValue as e:
            raise ConfigError(str(e)) from None
    rules = [parse_rule(text, VIEW_NATIVE, f"--ignore '{text}'") for text in ignores]
    rules += [parse_rule(text, VIEW_TARGET, f"--target '{text}'") for text in targets]
    file_default: str | None = None
    if policy_file is not None:
        file_default, file_rules = load_policy_file(policy_file)
        rules += file_rules
    view = default_view or file_default or VIEW_NATIVE
    return Policy(rules=tuple(rules), default_view=view)
