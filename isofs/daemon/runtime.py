"""Where live mounts are recorded, and what the kernel says is mounted.

A daemon records itself (pid, source, mount point, log file) in a small JSON file in the
runtime directory, named after a hash of the mount point, so `isofs umount` and `isofs status`
find it by mount point alone. The kernel's mount table is the truth about what is mounted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from isofs import durable
from isofs.mountinfo import mount_table


def runtime_dir() -> Path:
    """Per-user directory for mount records and default logs (created 0700)."""
    if os.geteuid() == 0:
        base = Path("/run/isofs")
    elif os.environ.get("XDG_RUNTIME_DIR"):
        base = Path(os.environ["XDG_RUNTIME_DIR"]) / "isofs"
    else:
        base = Path(f"/tmp/isofs-{os.geteuid()}")
    base.mkdir(mode=0o700, parents=True, exist_ok=True)
    return base


def _mount_id(mountpoint: str) -> str:
    return hashlib.sha256(os.fsencode(mountpoint)).hexdigest()[:16]


@dataclass
class MountRecord:
    pid: int
    source: str
    mountpoint: str
    log: str
    control: str

    @staticmethod
    def paths_for(mountpoint: str) -> tuple[Path, Path, Path]:
        """(record file, default log file, control socket) for a mount point."""
        base = runtime_dir() / _mount_id(mountpoint)
        return base.with_suffix(".json"), base.with_suffix(".log"), base.with_suffix(".sock")

    def save(self) -> None:
        record, _, _ = self.paths_for(self.mountpoint)
        durable.replace(record, json.dumps(asdict(self)).encode())

    def remove(self) -> None:
        """Forget the mount: its record and its control socket."""
        record, _, control = self.paths_for(self.mountpoint)
        for path in (record, control):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @classmethod
    def load(cls, mountpoint: str) -> MountRecord | None:
        record, _, _ = cls.paths_for(mountpoint)
        try:
            return cls(**json.loads(record.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            return None


def mounted_filesystems() -> dict[str, str]:
    """Mount point -> filesystem type, from the kernel's mount table (last mount wins)."""
    return {entry.mountpoint: entry.fstype for entry in mount_table()}


def mount_device(path: str) -> str | None:
    """The "major:minor" of the filesystem mounted at `path` (without touching the mount)."""
    device = None
    for entry in mount_table():
        if entry.mountpoint == path:
            device = entry.device
    return device


def is_mounted(path: str) -> bool:
    return path in mounted_filesystems()


def processes_naming(argument: str | bytes) -> dict[int, list[bytes]]:
    """PID -> command line of every other process whose command line holds `argument` as one
    argument (a mount point names its daemon, whatever record it left)."""
    wanted = os.fsencode(argument)
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if wanted in argv:
            found[int(entry)] = argv
    return found


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
