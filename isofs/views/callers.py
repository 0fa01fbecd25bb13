"""Resolve the process behind a FUSE request into a `Caller` the policy can match.

FUSE only tells us the *thread* id of the requester (`ctx.pid`) and the fsuid/fsgid the
kernel used. Everything else (executable, cgroup, ancestry, ...) comes from /proc, which is
far too slow to read on every request, so `CallerResolver` caches it.

Caching scheme
--------------
A cache entry holds an ``O_PATH`` file descriptor on the ``/proc/TID`` directory, taken when
the thread was first seen, plus the resolved identity. A procfs directory descriptor pins the
kernel's ``struct pid`` of that exact task: once the task is gone, every lookup through the
descriptor fails with ESRCH *even if the number has since been reused* by a new process (the
new process has a different ``struct pid``). This is the same guarantee a pidfd gives, so no
start-time comparison is needed on the hot path; `Caller.start_time` is still recorded.

A cache hit costs ONE syscall, ``readlinkat(dirfd, "exe")`` (about 2 µs from Python), which
proves two things at once:

* the cached task is still alive, so the number was not reused (reuse-proof, no time window);
* the process has not exec'd another program since it was cached (a shell that touches the
  mount and then ``exec``s vim must not keep the shell's view). A pidfd poll alone is cheaper
  (0.3 µs) but blind to exec, and a time-to-live would leave a window for both exec and pid
  reuse, so neither is correct on its own.

Only if the link cannot be read (the task is exiting: its memory map is already gone while
FUSE still receives FLUSH/RELEASE from its closing files) does the hit path make a second
call to tell "exiting" (keep the cached identity) from "dead" (resolve again).

What is sampled once, when a thread is first seen (or re-resolved after an exec): cgroup,
ancestors, comm and supplementary groups. A process moved to another cgroup, or re-parented,
keeps its first identity until it execs. Groups are re-read whenever the request's uid/gid
differ from the cached ones, which covers the usual privilege drop (setgroups + setuid).

The cache is an LRU bounded by `max_entries`, further capped to a quarter of the soft
RLIMIT_NOFILE because every entry holds one file descriptor (raise the limit to cache more).
If the process still runs out of descriptors (EMFILE), half of the cache is dropped to make
room rather than failing the request.

The daemon must be able to read /proc/PID/exe of the callers (root, or the callers' own
user); otherwise `exe` and `ancestors` stay empty and exe rules never match. `proc_root`
must be a procfs of the PID namespace FUSE reports pids in (normally the daemon's own).
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import time
from collections import OrderedDict
from dataclasses import dataclass, replace

_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_READ_SIZE = 16384
_DELETED = " (deleted)"
_MAX_ANCESTORS = 256
# errno values meaning "this task is gone / cannot be inspected"; anything else is a bug.
_GONE = (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError)


@dataclass(frozen=True, slots=True)
class Caller:
    """The process that issued a request, as far as the policy is concerned."""

    pid: int  # thread-group id (the process), not the thread id FUSE reports
    uid: int  # fsuid of the request, from FUSE
    gid: int  # fsgid of the request, from FUSE
    groups: frozenset[int]  # supplementary groups, from /proc/PID/status
    exe: str  # resolved /proc/PID/exe; "" if unreadable (kernel thread, exiting, no access)
    cgroup: str  # cgroup v2 path (the "0::" line); "" if none
    comm: str  # process name; spoofable via prctl(PR_SET_NAME)
    start_time: int  # field 22 of /proc/PID/stat, clock ticks since boot
    ancestors: tuple[str, ...]  # exe of the parent, grandparent, ... up to pid 1


@dataclass(frozen=True, slots=True)
class ResolverStatistics:
    """Counters for `isofs status`: how well the caller cache works and what it costs."""

    hits: int  # served from the cache after the one-syscall check
    misses: int  # resolved from /proc (first sight, or after exec/exit of a cached tid)
    invalidations: int  # cached entries found dead or exec'd (subset of misses)
    vanished: int  # resolves that returned None
    entries: int
    capacity: int
    total_ns: int  # wall time spent inside resolve()

    @property
    def resolves(self) -> int:
        """Total number of resolve() calls."""
        return self.hits + self.misses

    @property
    def mean_us(self) -> float:
        """Mean cost of one resolve() in microseconds."""
        return self.total_ns / 1000 / self.resolves if self.resolves else 0.0


class _Entry:
    """One cached thread: its pinned /proc/TID directory and last resolved identity."""

    __slots__ = ("caller", "exe_deleted", "fd")

    def __init__(self, fd: int, caller: Caller) -> None:
        self.fd = fd
        self.caller = caller
        # A binary replaced on disk (package upgrade) reads back as "path (deleted)"; that is
        # not an exec, so it must not invalidate the entry.
        self.exe_deleted = caller.exe if caller.exe.endswith(_DELETED) else caller.exe + _DELETED


def _read_at(dir_fd: int, name: str) -> bytes:
    """Read a whole (small) procfs file relative to a pinned directory."""
    fd = os.open(name, _READ_FLAGS, dir_fd=dir_fd)
    try:
        data = os.read(fd, _READ_SIZE)
        if len(data) < _READ_SIZE:
            return data  # procfs hands out the whole (small) file in one read
        chunks = [data]
        while chunk := os.read(fd, _READ_SIZE):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def _readlink_at(dir_fd: int, name: str) -> str:
    """readlink relative to a pinned directory; "" if the link cannot be read."""
    try:
        return os.readlink(name, dir_fd=dir_fd)
    except OSError:
        return ""


def _parse_stat(data: bytes) -> tuple[str, int, int]:
    """Return (comm, ppid, start_time) from /proc/PID/stat.

    comm may contain spaces and ')' so the fixed fields are taken after the LAST ')'.
    """
    left = data.index(b"(")
    right = data.rindex(b")")
    comm = os.fsdecode(data[left + 1 : right])
    fields = data[right + 1 :].split()  # fields[0] is field 3 (state)
    return comm, int(fields[1]), int(fields[19])


def _parse_status(data: bytes) -> tuple[int, frozenset[int]]:
    """Return (tgid, supplementary groups) from /proc/TID/status."""
    tgid = -1
    groups: frozenset[int] = frozenset()
    for line in data.splitlines():
        if line.startswith(b"Tgid:"):
            tgid = int(line[5:])
        elif line.startswith(b"Groups:"):
            groups = frozenset(int(g) for g in line[7:].split())
            break  # Groups comes after Tgid
    if tgid < 0:
        raise ValueError("no Tgid in status")
    return tgid, groups


def _parse_cgroup(data: bytes) -> str:
    """Return the cgroup v2 path (the '0::' line) from /proc/PID/cgroup, or ""."""
    for line in data.splitlines():
        if line.startswith(b"0::"):
            return os.fsdecode(line[3:])
    return ""


def _nofile_soft_limit() -> int:
    """Soft RLIMIT_NOFILE, or a large number if unlimited."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


class CallerResolver:
    """Map FUSE request thread ids to `Caller`s, cached and reuse-proof (see module doc).

    Not thread-safe: call it from the one trio thread that handles requests.
    """

    def __init__(self, max_entries: int = 4096, proc_root: str = "/proc") -> None:
        self._proc = proc_root.rstrip("/") or "/"
        self._capacity = max(16, min(max_entries, _nofile_soft_limit() // 4))
        self._cache: OrderedDict[int, _Entry] = OrderedDict()
        self._hits = 0
        self._misses = 0
        self._invalidations = 0
        self._vanished = 0
        self._total_ns = 0

    # -- public -------------------------------------------------------------------------

    def resolve(self, tid: int, uid: int, gid: int) -> Caller | None:
        """Return who issued a request from thread `tid`, or None if it is gone.

        `uid`/`gid` are the request's fsuid/fsgid and are trusted over /proc.
        """
        start = time.perf_counter_ns()
        try:
            entry = self._cache.get(tid)
            if entry is not None:
                if self._still_valid(entry):
                    self._hits += 1
                    self._cache.move_to_end(tid)
                    return self._with_creds(entry, uid, gid)
                self._invalidations += 1
                self._drop(tid)
            self._misses += 1
            caller = self._resolve_uncached(tid, uid, gid)
            if caller is None:
                self._vanished += 1
            return caller
        finally:
            self._total_ns += time.perf_counter_ns() - start

    def statistics(self) -> ResolverStatistics:
        """Snapshot of the counters."""
        return ResolverStatistics(
            hits=self._hits,
            misses=self._misses,
            invalidations=self._invalidations,
            vanished=self._vanished,
            entries=len(self._cache),
            capacity=self._capacity,
            total_ns=self._total_ns,
        )

    def clear(self) -> None:
        """Forget every cached thread (e.g. after a policy reload) and close descriptors."""
        while self._cache:
            _tid, entry = self._cache.popitem(last=False)
            os.close(entry.fd)

    def close(self) -> None:
        """Release all file descriptors."""
        self.clear()

    def __enter__(self) -> CallerResolver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------

    def _still_valid(self, entry: _Entry) -> bool:
        """One readlinkat: same task (not reused) and same program (no exec)?"""
        try:
            exe = os.readlink("exe", dir_fd=entry.fd)
        except FileNotFoundError:
            # The task has no memory map: exiting (FUSE still gets FLUSH/RELEASE from its
            # closing files) or a kernel thread. It can no longer exec; keep it if listed.
            return self._alive(entry)
        except PermissionError:
            # Unreadable now: fine if it was unreadable when cached, but if it was readable
            # the task may have exec'd a setuid program; resolve it again.
            return not entry.caller.exe and self._alive(entry)
        except OSError:
            return False  # ESRCH: the task is gone (its number may already be reused)
        return exe == entry.caller.exe or exe == entry.exe_deleted

    @staticmethod
    def _alive(entry: _Entry) -> bool:
        """Whether the pinned task still exists (zombies included)."""
        try:
            os.stat("stat", dir_fd=entry.fd)
        except OSError:
            return False
        return True

    def _with_creds(self, entry: _Entry, uid: int, gid: int) -> Caller:
        """The cached caller, updated to the request's credentials (groups re-read)."""
        caller = entry.caller
        if caller.uid == uid and caller.gid == gid:
            return caller
        groups = caller.groups
        with contextlib.suppress(OSError, ValueError):
            groups = _parse_status(_read_at(entry.fd, "status"))[1]
        caller = replace(caller, uid=uid, gid=gid, groups=groups)
        entry.caller = caller
        return caller

    def _open_dir(self, pid: int) -> int | None:
        """Pin /proc/PID; None if the task does not exist.

        Out of descriptors, the oldest half of the cache (the daemon's likely biggest user
        of them) is given back and the open retried once; a second failure propagates.
        """
        if pid <= 0:
            return None
        path = f"{self._proc}/{pid}"
        try:
            return os.open(path, _DIR_FLAGS)
        except _GONE:
            return None
        except OSError as e:
            if e.errno not in (errno.EMFILE, errno.ENFILE) or not self._cache:
                raise
        for _ in range(len(self._cache) // 2 + 1):
            _old, entry = self._cache.popitem(last=False)
            os.close(entry.fd)
        try:
            return os.open(path, _DIR_FLAGS)
        except _GONE:
            return None

    def _resolve_uncached(self, tid: int, uid: int, gid: int) -> Caller | None:
        """Read the identity of thread `tid` from /proc and cache it."""
        tid_fd = self._open_dir(tid)
        if tid_fd is None:
            return None
        try:
            try:
                tgid, groups = _parse_status(_read_at(tid_fd, "status"))
            except (*_GONE, ValueError):
                return None
            if tgid == tid:
                caller = self._read_caller(tid_fd, tgid, uid, gid, groups)
            else:
                caller = self._resolve_process(tgid, uid, gid, groups)
            if caller is not None and self._store(tid, tid_fd, caller):
                tid_fd = -1  # owned by the cache now
            return caller
        finally:
            if tid_fd >= 0:
                os.close(tid_fd)

    def _resolve_process(
        self, tgid: int, uid: int, gid: int, groups: frozenset[int]
    ) -> Caller | None:
        """Identity of process `tgid` on behalf of one of its (non-leader) threads.

        A process with many threads is read from /proc once: the leader's entry is cached
        (as if the leader had asked) and shared by every thread seen later.
        """
        leader = self._cache.get(tgid)
        if leader is not None:
            if self._still_valid(leader):
                self._cache.move_to_end(tgid)
                return replace(leader.caller, uid=uid, gid=gid, groups=groups)
            self._invalidations += 1
            self._drop(tgid)
        proc_fd = self._open_dir(tgid)
        if proc_fd is None:
            return None
        caller = self._read_caller(proc_fd, tgid, uid, gid, groups)
        if caller is None or not self._store(tgid, proc_fd, caller):
            os.close(proc_fd)
        return caller

    def _read_caller(
        self, proc_fd: int, tgid: int, uid: int, gid: int, groups: frozenset[int]
    ) -> Caller | None:
        """Build the Caller of the pinned process directory; None if it is gone."""
        try:
            comm, ppid, start_time = _parse_stat(_read_at(proc_fd, "stat"))
            cgroup = _parse_cgroup(_read_at(proc_fd, "cgroup"))
        except (*_GONE, ValueError, IndexError):
            return None
        return Caller(
            pid=tgid,
            uid=uid,
            gid=gid,
            groups=groups,
            exe=_readlink_at(proc_fd, "exe"),
            cgroup=cgroup,
            comm=comm,
            start_time=start_time,
            ancestors=self._ancestors(ppid, start_time),
        )

    def _store(self, key: int, fd: int, caller: Caller) -> bool:
        """Cache `caller` under `key`, taking ownership of `fd`; False if not cached."""
        if key in self._cache:
            return False  # a valid entry exists already (the leader, shared above)
        while len(self._cache) >= self._capacity:
            _old, entry = self._cache.popitem(last=False)
            os.close(entry.fd)
        self._cache[key] = _Entry(fd, caller)
        return True

    def _drop(self, key: int) -> None:
        """Remove one entry and close its descriptor."""
        entry = self._cache.pop(key)
        os.close(entry.fd)

    def _ancestors(self, ppid: int, child_start: int) -> tuple[str, ...]:
        """Exe paths of the parent chain, parent first, stopping at pid 1 or on any error.

        Each parent is pinned before its stat and exe are read, and must have started no
        later than its child: a larger start time means the parent exited and its number
        was reused by an unrelated process, so the walk stops there.
        """
        chain: list[str] = []
        seen: set[int] = set()
        while ppid > 0 and ppid not in seen and len(chain) < _MAX_ANCESTORS:
            seen.add(ppid)
            fd = self._open_dir(ppid)
            if fd is None:
                break
            try:
                try:
                    _comm, next_ppid, start = _parse_stat(_read_at(fd, "stat"))
                except (*_GONE, ValueError, IndexError):
                    break
                if start > child_start:
                    break
                exe = _readlink_at(fd, "exe")
            finally:
                os.close(fd)
            if not exe:
                break
            chain.append(exe)
            if ppid == 1:
                break
            ppid, child_start = next_ppid, start
        return tuple(chain)
