"""Keeping the names the kernel remembers within the daemon's open-files limit.

Every inode the kernel remembers holds an O_PATH descriptor on its native file
(`isofs.core.inodes`), and the kernel forgets a FUSE inode only when its last dentry goes,
which without memory pressure is never: a daemon whose RLIMIT_NOFILE cannot be raised (a
container's hard limit) would answer EMFILE after that many names, a `tar -x` of a large tree
being enough. So the FUSE layer remembers under which (parent nodeid, name) it handed out each
nodeid, and past a budget asks the kernel to drop the oldest of those entries
(FUSE_NOTIFY_INVAL_ENTRY, from the invalidator's thread: the kernel takes the directory's lock).
The kernel evicts the inodes no one uses any more and sends FORGET, which closes their handles;
an entry in use (an open file, a working directory) stays until it is released. A dropped name
costs one LOOKUP when it is used again.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

#: Share of the open-files limit left for what is not a remembered inode: open files, their
#: sections, the size cache, sockets, providers' own files.
RESERVED_SHARE = 8
RESERVED_MIN = 512
#: Past the budget, entries are dropped down to this share of it, so drops come in batches.
LOW_WATER = 0.9


def default_budget(open_files_limit: int) -> int:
    """How many entries a daemon with this RLIMIT_NOFILE may let the kernel remember."""
    reserve = max(RESERVED_MIN, open_files_limit // RESERVED_SHARE)
    return max(64, open_files_limit - reserve)


class EntryBudget:
    """The entries handed to the kernel, oldest first, and the drops that keep them bounded.

    Only the event loop calls it (no lock); `drop` enqueues the batch for another thread.
    """

    def __init__(self, budget: int, drop: Callable[[list[tuple[int, bytes]]], None]) -> None:
        self.budget = budget
        self._drop = drop
        self._entries: OrderedDict[int, tuple[int, bytes]] = OrderedDict()
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._entries)

    def handed_out(self, parent: int, name: bytes, nodeid: int) -> None:
        """The kernel now knows `nodeid` as `name` in `parent` (lookup, create, readdirplus)."""
        entries = self._entries
        entries[nodeid] = (parent, name)
        entries.move_to_end(nodeid)
        if len(entries) > self.budget:
            keep = int(self.budget * LOW_WATER)
            batch = [entries.popitem(last=False)[1] for _ in range(len(entries) - keep)]
            self.dropped += len(batch)
            self._drop(batch)

    def forgotten(self, nodeid: int) -> None:
        """FORGET: the kernel dropped the inode (and every name it had)."""
        self._entries.pop(nodeid, None)

    def status(self) -> dict[str, int]:
        return {"kernel_entries": len(self._entries), "entry_budget": self.budget,
                "entries_dropped": self.dropped}  # fmt: skip
