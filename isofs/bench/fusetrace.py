"""Count the FUSE requests of one mount, for any FUSE filesystem, from the kernel's tracepoints.

A daemon's own counters exist only for isofs; the kernel's `fuse:fuse_request_send` and
`fuse:fuse_request_end` tracepoints see every request of every FUSE filesystem (gocryptfs, the
minimal passthrough, isofs) the same way, with its opcode, and the time between the two is the
round trip as the calling process waits for it. `FuseTrace` records them in a private tracefs
instance filtered to one connection (the mount's device), so two measurements never mix. Needs
root and tracefs (mounted on /sys/kernel/tracing on Debian 12).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
_SEND = re.compile(r"fuse_request_send: connection (\d+) req (\d+) opcode \d+ \((\w+)\)")
_END = re.compile(r"fuse_request_end: connection (\d+) req (\d+) ")
_TIME = re.compile(r"\s(\d+\.\d+): fuse_request_")
#: Per-CPU ring buffer: a 10,000-file `ls -l` makes some 50,000 requests (100,000 events).
BUFFER_KB = 32 * 1024


class TraceUnavailable(RuntimeError):
    """No tracefs or no FUSE tracepoints here (not root, or an old kernel)."""


@dataclass
class RequestCounts:
    """What one traced interval saw: requests per opcode and their round trips."""

    counts: Counter[str] = field(default_factory=Counter)
    #: Round-trip microseconds per opcode (send to end, as the kernel saw them).
    round_trips_us: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    lost: bool = False

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def per(self, units: int) -> float:
        return self.total / units if units else 0.0

    def median_us(self, opcode: str | None = None) -> float:
        values = (
            self.round_trips_us.get(opcode, [])
            if opcode
            else [v for vs in self.round_trips_us.values() for v in vs]
        )
        return statistics.median(values) if values else 0.0

    def describe(self, units: int = 1) -> str:
        parts = [f"{name.removeprefix('FUSE_')} {count / units:g}"
                 for name, count in self.counts.most_common()]  # fmt: skip
        return ", ".join(parts) or "none"


def kernel_dev(st_dev: int) -> int:
    """The kernel's internal dev_t (MKDEV: major << 20 | minor) the tracepoints print."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


def available() -> str | None:
    """Why tracing cannot work here, or None (tracefs is mounted first if it is not)."""
    if os.geteuid() != 0:
        return "tracing FUSE requests needs root"
    _mount_tracefs()
    if not (TRACEFS / "events" / "fuse" / "fuse_request_send").is_dir():
        return "no fuse tracepoints in tracefs (/sys/kernel/tracing/events/fuse)"
    return None


def _mount_tracefs() -> None:
    """Mount tracefs at its usual place when the kernel has it but nothing mounted it (a
    fresh machine without debugfs users), as perf and trace-cmd do. It stays mounted: it is
    the kernel's, shared by every tracer, and holds nothing until an instance is made."""
    if (TRACEFS / "events").is_dir() or not TRACEFS.is_dir():
        return
    subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)],
                   capture_output=True, check=False)  # fmt: skip


class FuseTrace:
    """`with FuseTrace(mountpoint) as trace: ...; trace.result` counts that block's requests.

    The mount's device is read from the kernel's mount table, not by stat()-ing the mount
    point (that would itself be a request).
    """

    def __init__(self, device: int) -> None:
        self.connection = device
        self.result = RequestCounts()
        self._instance: Path | None = None

    @classmethod
    def for_mount(cls, mountpoint: str | os.PathLike[str]) -> FuseTrace:
        from isofs.mountinfo import mount_table

        wanted = os.path.realpath(mountpoint)
        entries = [e for e in mount_table() if e.mountpoint == wanted]
        if not entries:
            raise TraceUnavailable(f"not mounted: {mountpoint}")
        major, minor = (int(n) for n in entries[-1].device.split(":"))
        return cls((major << 20) | minor)

    def __enter__(self) -> FuseTrace:
        reason = available()
        if reason:
            raise TraceUnavailable(reason)
        instance = TRACEFS / "instances" / f"isofs-bench-{os.getpid()}-{id(self):x}"
        instance.mkdir()
        self._instance = instance
        try:
            (instance / "buffer_size_kb").write_text(str(BUFFER_KB))
            for event in ("fuse_request_send", "fuse_request_end"):
                directory = instance / "events" / "fuse" / event
                (directory / "filter").write_text(f"connection == {self.connection}")
                (directory / "enable").write_text("1")
            (instance / "trace").write_text("")
            (instance / "tracing_on").write_text("1")
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._instance is not None
        try:
            (self._instance / "tracing_on").write_text("0")
            self.result = parse((self._instance / "trace").read_text())
        finally:
            self._remove()

    def _remove(self) -> None:
        if self._instance is not None:
            with contextlib.suppress(OSError):
                self._instance.rmdir()  # tracefs removes an instance's files with it
            self._instance = None


def parse(text: str) -> RequestCounts:
    """Counts and round trips from the text of a trace buffer."""
    result = RequestCounts()
    started: dict[str, tuple[str, float]] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            if "LOST" in line:
                result.lost = True
            continue
        when = _TIME.search(line)
        sent = _SEND.search(line)
        if sent:
            result.counts[sent.group(3)] += 1
            if when:
                started[sent.group(2)] = (sent.group(3), float(when.group(1)))
            continue
        ended = _END.search(line)
        if ended and when and ended.group(2) in started:
            opcode, at = started.pop(ended.group(2))
            result.round_trips_us[opcode].append((float(when.group(1)) - at) * 1e6)
    return result
