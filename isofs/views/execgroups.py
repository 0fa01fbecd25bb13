"""`isofs exec --view V -- CMD`: a view that a command and all its descendants inherit.

The mechanism is a cgroup v2 group per view, `/isofs.view-V`, at the root of the unified
hierarchy. Children inherit their cgroup, and only root can move a process into a root-owned
group, so an unprivileged process can neither join nor leave it: it cannot be forged the way
a name or an environment variable could. Every mount's policy starts with the rules below
(unless mounted with --no-exec), so `isofs exec` works on every isofs mount at once.
"""

from __future__ import annotations

import errno
import os

from isofs.mountinfo import mount_table
from isofs.views.policy import KNOWN_VIEWS, Rule

GROUP_PREFIX = "isofs.view-"


def group_path(view: str) -> str:
    """The cgroup path (as /proc/PID/cgroup shows it) of a view's group."""
    return f"/{GROUP_PREFIX}{view}"


def exec_rules() -> tuple[Rule, ...]:
    """Policy rules giving members of a view's group (and its sub-groups) that view."""
    rules: list[Rule] = []
    for view in KNOWN_VIEWS:
        for pattern in (group_path(view), group_path(view) + "/*"):
            rules.append(Rule(view=view, cgroup=pattern, origin=f"isofs exec --view {view}"))
    return tuple(rules)


def unified_hierarchy() -> str | None:
    """Mount point of the cgroup v2 hierarchy, from the kernel's mount table."""
    return next((e.mountpoint for e in mount_table() if e.fstype == "cgroup2"), None)


class ExecError(Exception):
    """Why a process cannot be given a view; one line."""


def join_view_group(view: str, pid: int) -> None:
    """Move `pid` into the view's group (creating it); needs root."""
    root = unified_hierarchy()
    if root is None:
        raise ExecError("isofs exec needs a cgroup v2 hierarchy, and none is mounted")
    group = os.path.join(root, GROUP_PREFIX + view)
    try:
        os.makedirs(group, exist_ok=True)
        with open(os.path.join(group, "cgroup.procs"), "w") as procs:
            procs.write(str(pid))
    except PermissionError:
        raise ExecError(f"not allowed to join the {view} view group (root only)") from None
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise ExecError(f"cgroup {group} cannot take processes: {exc.strerror}") from None
        raise ExecError(f"cannot join {group}: {exc.strerror}") from None
