"""`mount.fuse.isofs`: the helper mount(8) runs for `mount -t fuse.isofs` and /etc/fstab.

mount(8) looks for `/sbin/mount.fuse.isofs` before it falls back to `/sbin/mount.fuse`
(fuse3's `mount.fuse3`, which would run `isofs SOURCE MOUNTPOINT -o OPTS`, not an isofs command
line). It calls the helper as `mount.fuse.isofs SOURCE MOUNTPOINT [-sfnv] [-o OPTS]`; the helper
turns OPTS into `isofs mount` flags, runs the mount in this process, then applies the
per-mount kernel flags (noexec, suid, noatime...) that `isofs mount` has no flag for.

The option list is split on commas outside double quotes, as libmount itself splits it, so a
policy rule can be given as `target="exe=/usr/bin/vim,uid=1000"`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import re
import sys
from dataclasses import dataclass, field

#: Options mount(8) keeps for itself or that only say "the default": nothing to do here.
MOUNT_OWNED = frozenset(
    {"rw", "defaults", "auto", "noauto", "user", "users", "nouser", "owner", "group",
     "comment", "_netdev", "nofail", "async", "lazytime", "nolazytime", "silent", "loud",
     "iversion", "noiversion", "default_permissions"}
)  # fmt: skip

#: Superblock flags isofs cannot set (the daemon mounts async, without mandatory locks):
#: refused rather than dropped, because each asks for a guarantee the mount would not give.
UNSUPPORTED = {
    "sync": "isofs mounts are asynchronous (use fsync)",
    "dirsync": "isofs mounts are asynchronous (use fsync)",
    "mand": "mandatory locks are not supported",
}

#: `isofs mount` flags that must not come from -o: the first would never return to mount(8),
#: the next two are the daemon's internal plumbing, and a master key written in /etc/fstab
#: (world-readable) or on a command line (/proc/PID/cmdline) is no secret.
FORBIDDEN_FLAGS = ("foreground", "ready-fd", "secrets-fd", "masterkey")

RENAMED = {"ro": "read-only"}

OPTION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")

# mount(2) flags; the per-mount ones can be changed by a bind remount without the daemon.
MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REMOUNT = 32
MS_NOSYMFOLLOW = 256
MS_NOATIME = 1024
MS_NODIRATIME = 2048
MS_BIND = 4096
MS_RELATIME = 1 << 21
MS_STRICTATIME = 1 << 24
ATIME_BITS = MS_NOATIME | MS_RELATIME | MS_STRICTATIME

#: Per-mount option -> (bits it sets, bits it clears).
MOUNT_POINT_FLAGS: dict[str, tuple[int, int]] = {
    "nosuid": (MS_NOSUID, 0),
    "suid": (0, MS_NOSUID),
    "nodev": (MS_NODEV, 0),
    "dev": (0, MS_NODEV),
    "noexec": (MS_NOEXEC, 0),
    "exec": (0, MS_NOEXEC),
    "nosymfollow": (MS_NOSYMFOLLOW, 0),
    "symfollow": (0, MS_NOSYMFOLLOW),
    "nodiratime": (MS_NODIRATIME, 0),
    "diratime": (0, MS_NODIRATIME),
    "noatime": (MS_NOATIME, ATIME_BITS),
    "atime": (MS_RELATIME, ATIME_BITS),  # "kernel defaults", which is relatime
    "relatime": (MS_RELATIME, ATIME_BITS),
    "norelatime": (MS_RELATIME, ATIME_BITS),  # the kernel gives relatime unless strictatime
    "strictatime": (MS_STRICTATIME, ATIME_BITS),
    "nostrictatime": (MS_RELATIME, ATIME_BITS),
}

#: How /proc/self/mountinfo names the per-mount state, as mount(2) bits.
MOUNTINFO_BITS = {
    "ro": MS_RDONLY, "nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
    "nosymfollow": MS_NOSYMFOLLOW, "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
    "relatime": MS_RELATIME,
}  # fmt: skip

USAGE = "usage: mount.fuse.isofs SOURCE MOUNTPOINT [-sfnv] [-o OPTION[,OPTION...]]"


class HelperError(Exception):
    """A one-line reason the helper refuses its arguments (exit 2) or fails (exit 1)."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Plan:
    """What the helper will do: the `isofs mount` arguments and the per-mount flag edits."""

    isofs_args: list[str]
    flag_edits: list[tuple[int, int]] = field(default_factory=list)
    fake: bool = False
    verbose: bool = False


def split_options(text: str) -> list[str]:
    """Split a -o list on commas outside double quotes (libmount's rule); drop empty items."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in text:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        raise HelperError(f"unbalanced double quote in mount options: {text}")
    items.append("".join(current))
    return [item for item in items if item]


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    if '"' in value:
        raise HelperError(f"quote the whole value, not part of it: {value}")
    return value


def translate_option(option: str) -> list[str] | tuple[int, int] | None:
    """One -o item as `isofs mount` arguments, a per-mount flag edit, or None (dropped)."""
    key, sep, raw_value = option.partition("=")
    if key in MOUNT_OWNED or key.startswith("x-"):  # `user=NAME` too: mount(8) adds it
        return None
    if key in UNSUPPORTED and not sep:
        raise HelperError(f"mount option {key} is not supported: {UNSUPPORTED[key]}")
    if key in MOUNT_POINT_FLAGS and not sep:
        return MOUNT_POINT_FLAGS[key]
    if not OPTION_NAME.match(key):
        raise HelperError(f"not a mount option name: {option!r}")
    flag = RENAMED.get(key, key.replace("_", "-"))
    if any(forbidden.startswith(flag) for forbidden in FORBIDDEN_FLAGS):
        hint = "; use keyfile= or passfile=" if "masterkey".startswith(flag) else ""
        raise HelperError(f"mount option {key} cannot be used with mount(8){hint}")
    if not sep:
        return [f"--{flag}"]
    return [f"--{flag}={_unquote(raw_value)}"]  # one word: a value may start with "-"


def plan_mount(argv: list[str]) -> Plan:
    """Parse mount(8)'s helper arguments: SOURCE MOUNTPOINT [-sfnv] [-o OPTS] [-t TYPE]."""
    positional: list[str] = []
    options: list[str] = []
    fake = verbose = False
    args = iter(argv)
    for arg in args:
        if arg in ("-o", "-t", "-N"):
            value = next(args, None)
            if value is None:
                raise HelperError(f"option {arg} needs a value")
            if arg == "-o":
                options += split_options(value)
            elif arg == "-N":
                raise HelperError("mounting in another namespace (-N) is not supported")
        elif arg.startswith("-o") and len(arg) > 2:
            options += split_options(arg[2:])
        elif arg.startswith("-") and len(arg) > 1 and set(arg[1:]) <= set("sfnv"):
            fake = fake or "f" in arg  # -s sloppy and -n no-mtab change nothing here
            verbose = verbose or "v" in arg
        elif arg.startswith("-") and len(arg) > 1:
            raise HelperError(f"unknown helper option {arg}; {USAGE}")
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise HelperError(USAGE)
    source, mountpoint = positional
    plan = Plan(["mount", source, mountpoint], fake=fake, verbose=verbose)
    for option in options:
        translated = translate_option(option)
        if isinstance(translated, list):
            plan.isofs_args += translated
        elif translated is not None:
            plan.flag_edits.append(translated)
    return plan


def mount_point_bits(mountpoint: str) -> int | None:
    """The per-mount flags of the mount at `mountpoint` as mount(2) bits (None: not mounted)."""
    bits = None
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            fields = line.split(" - ", 1)[0].split()
            if len(fields) >= 6 and _unescape(fields[4]) == mountpoint:
                words = fields[5].split(",")
                bits = sum(bit for word, bit in MOUNTINFO_BITS.items() if word in words)
                if not bits & (MS_NOATIME | MS_RELATIME):
                    bits |= MS_STRICTATIME
    return bits


def _unescape(text: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), text)


def wanted_bits(current: int, edits: list[tuple[int, int]]) -> int:
    """Apply the -o per-mount options, in order, to the mount's current flags."""
    bits = current
    for sets, clears in edits:
        bits = (bits & ~clears) | sets
    return bits


def apply_mount_point_flags(mountpoint: str, edits: list[tuple[int, int]]) -> None:
    """Change per-mount flags with a bind remount (MS_REMOUNT|MS_BIND: no FUSE request)."""
    current = mount_point_bits(mountpoint)
    if current is None:
        raise HelperError(f"{mountpoint} is not mounted after isofs mount", status=1)
    wanted = wanted_bits(current, edits)
    if wanted == current:
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    flags = MS_REMOUNT | MS_BIND | wanted
    if libc.mount(None, os.fsencode(mountpoint), None, ctypes.c_ulong(flags), None) != 0:
        error = ctypes.get_errno()
        reason = f"cannot set the mount flags of {mountpoint}: {os.strerror(error)}"
        raise HelperError(reason, status=1)


def run(plan: Plan) -> int:
    """Mount through the isofs command; undo the mount if its flags cannot be applied."""
    from isofs import cli  # imported here: the argument errors above need no pyfuse3

    if plan.verbose:
        print(f"mount.fuse.isofs: isofs {' '.join(plan.isofs_args)}", file=sys.stderr)
    if plan.fake:
        return 0
    try:
        status = cli.main(plan.isofs_args)
    except SystemExit as exc:  # argparse's usage errors
        status = exc.code if isinstance(exc.code, int) else 1
    if status != 0 or not plan.flag_edits:
        return status
    mountpoint = os.path.realpath(plan.isofs_args[2])
    try:
        apply_mount_point_flags(mountpoint, plan.flag_edits)
    except HelperError:
        cli.main(["umount", mountpoint])
        raise
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    try:
        return run(plan_mount(args))
    except HelperError as exc:
        print(f"isofs: error: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
