"""Admission to a mount that answers one view to every lookup (a target-view daemon's mount).

Such a mount lets the kernel cache its names and attributes, so it cannot choose the view per
lookup; what it can do is refuse the operations that show content to a caller of another view
(open, opendir, readlink, reading extended attributes). A native-view process that reaches the
mount anyway (through /proc/PID/root of a process inside its namespace) is refused there; what
it can still learn from names and sizes is written down in docs/SECURITY.md.
"""

from __future__ import annotations

from typing import Protocol

from isofs.views.callers import Caller
from isofs.views.policy import Policy


class Resolver(Protocol):
    def resolve(self, pid: int, uid: int, gid: int) -> Caller | None: ...


class ViewGate:
    """Admits callers whose view under `policy` is `view`."""

    def __init__(self, policy: Policy, resolver: Resolver, view: str) -> None:
        self.policy = policy
        self.resolver = resolver
        self.view = view
        self.refused = 0

    def admits(self, pid: int, uid: int, gid: int) -> bool:
        admitted = self.policy.view_for(self.resolver.resolve(pid, uid, gid)) == self.view
        if not admitted:
            self.refused += 1
        return admitted
