"""Which view a caller gets: an ordered list of rules, first match wins.

A view is a plain string; the filesystem knows `VIEW_NATIVE` (the bytes as stored) and
`VIEW_TARGET` (transformed: decrypted, decompressed, ...).

Glob semantics (keys `exe`, `cgroup`, `ancestor`, `comm`): `fnmatch` patterns matched
against the whole string, case-sensitively. `*` and `?` also match `/`, so `/usr/*` matches
`/usr/lib/x/y` and `*/vim` matches any program named vim anywhere, including in directories
writable by the users you want to exclude; prefer full paths for `exe` and `ancestor`.

`comm` is the 15-byte process name, which any process can set to anything with
prctl(PR_SET_NAME): it is a convenience to narrow a rule that already has a trustworthy key
(exe, uid, gid, cgroup), never a security boundary on its own.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from isofs.views.callers import Caller

VIEW_NATIVE = "native"
VIEW_TARGET = "target"
KNOWN_VIEWS = (VIEW_TARGET, VIEW_NATIVE)

_Matcher = re.Pattern[str] | None


def compile_glob(pattern: str) -> re.Pattern[str]:
    """Compile an fnmatch glob into a regex matching the whole string (case-sensitive)."""
    return re.compile(fnmatch.translate(pattern))


@dataclass(frozen=True)
class Rule:
    """Give `view` to callers meeting ALL of the given conditions (none: every caller)."""

    view: str
    exe: str | None = None  # glob over the resolved executable path
    uid: int | None = None  # fsuid of the request
    gid: int | None = None  # fsgid of the request or any supplementary group
    cgroup: str | None = None  # glob over the cgroup v2 path
    ancestor: str | None = None  # glob; matches if ANY ancestor's exe matches
    comm: str | None = None  # glob over the process name; spoofable, see module doc
    origin: str = ""  # where the rule came from, for messages: "policy.toml rule 2"
    _exe: _Matcher = field(init=False, repr=False, compare=False, default=None)
    _cgroup: _Matcher = field(init=False, repr=False, compare=False, default=None)
    _ancestor: _Matcher = field(init=False, repr=False, compare=False, default=None)
    _comm: _Matcher = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self) -> None:
        # Compile once here so matching on the request path is a few regex calls.
        for name in ("exe", "cgroup", "ancestor", "comm"):
            pattern = getattr(self, name)
            if pattern is not None:
                object.__setattr__(self, "_" + name, compile_glob(pattern))

    @property
    def unconditional(self) -> bool:
        """True if the rule has no condition and so matches every caller."""
        return all(value is None for _key, value in self._conditions())

    def matches(self, caller: Caller) -> bool:
        """Whether every condition of this rule holds for `caller`."""
        # Cheapest checks first.
        if self.uid is not None and caller.uid != self.uid:
            return False
        if self.gid is not None and caller.gid != self.gid and self.gid not in caller.groups:
            return False
        if self._exe is not None and self._exe.match(caller.exe) is None:
            return False
        if self._comm is not None and self._comm.match(caller.comm) is None:
            return False
        if self._cgroup is not None and self._cgroup.match(caller.cgroup) is None:
            return False
        if self._ancestor is not None:
            match = self._ancestor.match
            if not any(match(exe) is not None for exe in caller.ancestors):
                return False
        return True

    def describe(self) -> str:
        """One line, e.g. `target if exe='/usr/bin/vim' uid=1000`."""
        conditions = [
            f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"
            for key, value in self._conditions()
            if value is not None
        ]
        when = " ".join(conditions) if conditions else "any process"
        text = f"{self.view} if {when}"
        return f"{text}  [{self.origin}]" if self.origin else text

    def _conditions(self) -> tuple[tuple[str, str | int | None], ...]:
        return (
            ("exe", self.exe),
            ("uid", self.uid),
            ("gid", self.gid),
            ("cgroup", self.cgroup),
            ("ancestor", self.ancestor),
            ("comm", self.comm),
        )


@dataclass(frozen=True)
class Policy:
    """Ordered rules plus the view of callers no rule matches (or that could not be resolved)."""

    rules: tuple[Rule, ...] = ()
    default_view: str = VIEW_NATIVE

    def view_for(self, caller: Caller | None) -> str:
        """The view of `caller`: the first matching rule's, else the default view."""
        if caller is None:
            return self.default_view
        for rule in self.rules:
            if rule.matches(caller):
                return rule.view
        return self.default_view

    @property
    def views(self) -> frozenset[str]:
        """Every view some caller could get.

        The default view is always included (a caller that vanished gets it); rules after
        the first unconditional rule can never match and are left out.
        """
        views = {self.default_view}
        for rule in self.rules:
            views.add(rule.view)
            if rule.unconditional:
                break
        return frozenset(views)

    @property
    def is_single_view(self) -> bool:
        """True if every caller sees the same view, so no per-caller split is needed."""
        return len(self.views) == 1

    def describe(self) -> list[str]:
        """Human-readable lines for `isofs status`."""
        lines = [f"rule {n}: {rule.describe()}" for n, rule in enumerate(self.rules, 1)]
        lines.append(f"default: {self.default_view}")
        return lines
