"""The kernel's mount table (/proc/self/mountinfo), parsed in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    mountpoint: str
    fstype: str
    source: str
    #: "major:minor" of the mounted filesystem.
    device: str


def _unescape(field: str) -> str:
    """Undo the octal escapes (\\040 for space, \\011 tab, \\012 newline, \\134 backslash)."""
    raw = os.fsencode(field)
    out = bytearray()
    i = 0
    while i < len(raw):
        code = raw[i + 1 : i + 4]
        if raw[i : i + 1] == b"\\" and len(code) == 3 and code.isdigit():
            out.append(int(code, 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))


def mount_table() -> list[MountEntry]:
    """Every mount this process can see, in the kernel's order (later mounts last)."""
    entries = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) >= 5 and tail:
                source = _unescape(tail[1]) if len(tail) > 1 else ""
                entries.append(MountEntry(_unescape(fields[4]), tail[0], source, fields[2]))
    return entries
