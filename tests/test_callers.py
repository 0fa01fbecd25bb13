"""CallerResolver: real processes where cheap, a fake /proc tree for races we cannot stage."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from isofs.views.callers import Caller, CallerResolver

# -- helpers -------------------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def proc_exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def proc_stat_fields(pid: int) -> list[str]:
    data = Path(f"/proc/{pid}/stat").read_text()
    return data[data.rindex(")") + 2 :].split()  # from field 3 on


def proc_cgroup(pid: int) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        if line.startswith("0::"):
            return line[3:]
    return ""


@pytest.fixture
def resolver() -> Iterator[CallerResolver]:
    with CallerResolver() as r:
        yield r


@pytest.fixture
def sleep_copy(tmp_path: Path) -> Path:
    """A copy of sleep(1) under a distinctive name, so its exe and comm are recognisable."""
    source = shutil.which("sleep")
    if source is None:
        pytest.skip("no sleep binary")
    copy = tmp_path / "isofs-sleep"
    shutil.copy2(source, copy)
    return Path(os.path.realpath(copy))


@contextlib.contextmanager
def child(*argv: str | Path, **kwargs: object) -> Iterator[subprocess.Popen[bytes]]:
    """Run a child process and make sure this test's child, and only it, is gone after."""
    process = subprocess.Popen([str(a) for a in argv], **kwargs)  # type: ignore[call-overload]
    try:
        yield process
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()
        if process.stdin is not None:
            process.stdin.close()


# -- real processes ------------------------------------------------------------------------


def test_resolve_self(resolver: CallerResolver) -> None:
    pid = os.getpid()
    me = resolver.resolve(pid, 4321, 8765)
    assert me is not None
    assert me.pid == pid
    assert (me.uid, me.gid) == (4321, 8765)  # the request's credentials are trusted
    assert me.groups == frozenset(os.getgroups())
    assert me.exe == proc_exe(pid) == os.path.realpath(sys.executable)
    assert me.comm == Path(f"/proc/{pid}/comm").read_text().rstrip("\n")
    assert me.start_time == int(proc_stat_fields(pid)[19])
    assert me.cgroup == proc_cgroup(pid)
    assert me.ancestors
    assert me.ancestors[0] == proc_exe(os.getppid())


def test_resolve_child_process(resolver: CallerResolver, sleep_copy: Path) -> None:
    me = resolver.resolve(os.getpid(), 0, 0)
    assert me is not None
    with child(sleep_copy, "60") as process:
        kid = resolver.resolve(process.pid, 1000, 1000)
        assert kid is not None
        assert kid.pid == process.pid
        assert kid.exe == str(sleep_copy)
        assert kid.comm == "isofs-sleep"
        assert kid.cgroup == me.cgroup
        assert kid.start_time == int(proc_stat_fields(process.pid)[19])
        assert kid.start_time >= me.start_time
        assert kid.ancestors == (me.exe, *me.ancestors)
    assert resolver.resolve(process.pid, 1000, 1000) is None  # reaped
    stats = resolver.statistics()
    assert (stats.invalidations, stats.vanished) == (1, 1)


def test_thread_id_maps_to_process(resolver: CallerResolver) -> None:
    started = threading.Event()
    finish = threading.Event()
    tids: list[int] = []

    def run() -> None:
        tids.append(threading.get_native_id())
        started.set()
        finish.wait(10)

    thread = threading.Thread(target=run)
    thread.start()
    try:
        started.wait(10)
        (tid,) = tids
        assert tid != os.getpid()
        caller = resolver.resolve(tid, 0, 0)
        assert caller is not None
        assert caller.pid == os.getpid()
        assert caller.exe == proc_exe(os.getpid())
        # The process itself was cached along the way: the main thread is a hit.
        assert resolver.resolve(os.getpid(), 0, 0) == caller
        assert resolver.statistics().hits == 1
    finally:
        finish.set()
        thread.join()
    # join() returns before the kernel has reaped the thread; until then it is "exiting".
    wait_until(lambda: not os.path.exists(f"/proc/{tid}"))
    assert resolver.resolve(tid, 0, 0) is None  # thread gone (tid not reused yet)


def test_second_resolve_is_a_cache_hit(resolver: CallerResolver) -> None:
    first = resolver.resolve(os.getpid(), 0, 0)
    second = resolver.resolve(os.getpid(), 0, 0)
    assert first is second
    stats = resolver.statistics()
    assert (stats.hits, stats.misses, stats.entries) == (1, 1, 1)
    assert stats.resolves == 2
    assert stats.total_ns > 0
    assert stats.mean_us > 0


def test_credentials_follow_the_request(resolver: CallerResolver) -> None:
    first = resolver.resolve(os.getpid(), 0, 0)
    other = resolver.resolve(os.getpid(), 1000, 100)
    assert first is not None and other is not None
    assert (other.uid, other.gid) == (1000, 100)
    assert other.exe == first.exe
    assert resolver.statistics().hits == 1


def test_exec_is_detected(resolver: CallerResolver, sleep_copy: Path) -> None:
    script = 'read line; exec "$0" 60'
    with child("sh", "-c", script, sleep_copy, stdin=subprocess.PIPE) as process:
        shell_exe = proc_exe(process.pid)
        before = resolver.resolve(process.pid, 0, 0)
        assert before is not None and before.exe == shell_exe
        assert resolver.resolve(process.pid, 0, 0) is before
        assert process.stdin is not None
        process.stdin.write(b"go\n")
        process.stdin.flush()
        wait_until(lambda: proc_exe(process.pid) == str(sleep_copy))
        after = resolver.resolve(process.pid, 0, 0)
        assert after is not None
        assert after.exe == str(sleep_copy)
        assert after.comm == "isofs-sleep"
        assert (after.pid, after.start_time) == (before.pid, before.start_time)
        assert resolver.statistics().invalidations == 1


def test_exiting_process_keeps_its_identity(resolver: CallerResolver, sleep_copy: Path) -> None:
    """A zombie has no exe any more, but FLUSH/RELEASE of its files still arrive."""
    with child(sleep_copy, "60") as process:
        cached = resolver.resolve(process.pid, 0, 0)
        assert cached is not None
        os.kill(process.pid, signal.SIGKILL)
        wait_until(lambda: proc_stat_fields(process.pid)[0] == "Z")
        assert proc_exe(process.pid) == ""
        assert resolver.resolve(process.pid, 0, 0) is cached
        process.wait()
        assert resolver.resolve(process.pid, 0, 0) is None


def test_real_pid_reuse_is_detected(resolver: CallerResolver, sleep_copy: Path) -> None:
    """Force the kernel to hand an exited process's pid to a new one (needs root)."""
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    if not os.access(last_pid, os.W_OK):
        pytest.skip("cannot write ns_last_pid")
    with child(sleep_copy, "60") as first:
        old = resolver.resolve(first.pid, 0, 0)
        assert old is not None and old.exe == str(sleep_copy)
    try:
        last_pid.write_text(str(first.pid - 1))
    except OSError as e:
        pytest.skip(f"cannot write ns_last_pid: {e}")
    with child("sh", "-c", "sleep 60") as second:
        if second.pid != first.pid:
            pytest.skip("another process took the pid first")
        wait_until(lambda: proc_exe(second.pid) != "")
        new = resolver.resolve(second.pid, 0, 0)
        assert new is not None
        assert new.exe == proc_exe(second.pid) != old.exe
        assert new.start_time >= old.start_time
        assert resolver.statistics().invalidations == 1


def test_nonexistent_pids(resolver: CallerResolver) -> None:
    assert resolver.resolve(0, 0, 0) is None
    assert resolver.resolve(-1, 0, 0) is None
    assert resolver.resolve(2**31 - 1, 0, 0) is None
    assert resolver.statistics().vanished == 3


# -- fake /proc ----------------------------------------------------------------------------


class FakeProc:
    """A directory laid out like /proc, for cases a real kernel will not stage on demand."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def add(
        self,
        pid: int,
        exe: str | None,
        *,
        ppid: int = 1,
        start: int = 100,
        comm: str = "proc",
        tgid: int | None = None,
        groups: tuple[int, ...] = (),
        cgroup: str = "/fake.slice/fake.scope",
    ) -> Path:
        d = self.root / str(pid)
        if d.exists():
            shutil.rmtree(d)
        d.mkdir()
        fields = ["S", str(ppid)] + ["0"] * 48
        fields[19] = str(start)
        (d / "stat").write_text(f"{pid} ({comm}) {' '.join(fields)}\n")
        (d / "status").write_text(
            f"Name:\t{comm}\nUmask:\t0022\nState:\tS (sleeping)\nTgid:\t{tgid or pid}\n"
            f"Pid:\t{pid}\nPPid:\t{ppid}\nUid:\t0\t0\t0\t0\nGid:\t0\t0\t0\t0\n"
            f"Groups:\t{' '.join(map(str, groups))} \nNSpid:\t{pid}\n"
        )
        (d / "cgroup").write_text(f"1:name=systemd:/\n0::{cgroup}\n")
        if exe is not None:
            (d / "exe").symlink_to(exe)
        return d

    def set_exe(self, pid: int, exe: str) -> None:
        link = self.root / str(pid) / "exe"
        link.unlink(missing_ok=True)
        link.symlink_to(exe)

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / str(pid))


@pytest.fixture
def fake(tmp_path: Path) -> FakeProc:
    proc = FakeProc(tmp_path / "proc")
    proc.root.mkdir()
    proc.add(1, "/usr/lib/systemd/systemd", ppid=0, start=1, comm="systemd")
    proc.add(50, "/usr/bin/bash", ppid=1, start=50, comm="bash")
    proc.add(100, "/usr/bin/vim", ppid=50, start=100, comm="vim", groups=(1000, 27))
    return proc


@pytest.fixture
def fake_resolver(fake: FakeProc) -> Iterator[CallerResolver]:
    with CallerResolver(proc_root=str(fake.root)) as r:
        yield r


def test_fake_resolve(fake_resolver: CallerResolver) -> None:
    assert fake_resolver.resolve(100, 1000, 1000) == Caller(
        pid=100,
        uid=1000,
        gid=1000,
        groups=frozenset({1000, 27}),
        exe="/usr/bin/vim",
        cgroup="/fake.slice/fake.scope",
        comm="vim",
        start_time=100,
        ancestors=("/usr/bin/bash", "/usr/lib/systemd/systemd"),
    )


def test_pid_reuse_gets_a_fresh_identity(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    old = fake_resolver.resolve(100, 0, 0)
    assert old is not None
    assert fake_resolver.resolve(100, 0, 0) is old
    # The process exits and an unrelated one gets its number, even with the same exe.
    fake.remove(100)
    fake.add(100, "/usr/bin/vim", ppid=1, start=900, comm="vim")
    new = fake_resolver.resolve(100, 0, 0)
    assert new is not None
    assert new.start_time == 900
    assert new.ancestors == ("/usr/lib/systemd/systemd",)
    stats = fake_resolver.statistics()
    assert (stats.hits, stats.misses, stats.invalidations) == (1, 2, 1)


def test_exec_in_place(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    assert fake_resolver.resolve(100, 0, 0) is not None
    fake.set_exe(100, "/home/mallory/evil")
    caller = fake_resolver.resolve(100, 0, 0)
    assert caller is not None and caller.exe == "/home/mallory/evil"
    assert fake_resolver.statistics().invalidations == 1


def test_replaced_binary_is_not_an_exec(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    cached = fake_resolver.resolve(100, 0, 0)
    fake.set_exe(100, "/usr/bin/vim (deleted)")  # package upgrade replaced the file
    assert fake_resolver.resolve(100, 0, 0) is cached
    assert fake_resolver.statistics().invalidations == 0


def test_exe_unreadable(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    cached = fake_resolver.resolve(100, 0, 0)
    (fake.root / "100" / "exe").unlink()  # exiting: the memory map is gone
    assert fake_resolver.resolve(100, 0, 0) is cached
    fake.add(7, None, ppid=0, start=5, comm="kworker/0:1")  # kernel thread
    kthread = fake_resolver.resolve(7, 0, 0)
    assert kthread is not None
    assert (kthread.exe, kthread.ancestors, kthread.comm) == ("", (), "kworker/0:1")
    assert fake_resolver.resolve(7, 0, 0) is kthread


def test_fake_vanished(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    assert fake_resolver.resolve(100, 0, 0) is not None
    fake.remove(100)
    assert fake_resolver.resolve(100, 0, 0) is None
    assert fake_resolver.resolve(12345, 0, 0) is None
    (fake.root / "100").mkdir()  # listed but status unreadable
    assert fake_resolver.resolve(100, 0, 0) is None
    (fake.root / "100" / "status").write_text("Name:\tx\n")  # no Tgid
    assert fake_resolver.resolve(100, 0, 0) is None
    assert fake_resolver.statistics().entries == 0


def test_threads_share_the_process_identity(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    fake.add(101, "/usr/bin/vim", ppid=50, start=130, comm="vim-worker", tgid=100, groups=(9,))
    fake.add(102, "/usr/bin/vim", ppid=50, start=140, comm="vim-worker", tgid=100)
    thread = fake_resolver.resolve(101, 0, 0)
    assert thread is not None
    assert (thread.pid, thread.comm, thread.start_time) == (100, "vim", 100)
    assert thread.groups == {9}  # the requesting thread's credentials
    # The leader was cached on the way; a later thread reuses it without reading /proc/100.
    stat = fake.root / "100" / "stat"
    stat.write_text(stat.read_text().replace("(vim)", "(renamed)"))
    assert fake_resolver.statistics().entries == 2
    other = fake_resolver.resolve(102, 0, 0)
    assert other is not None and other.comm == "vim"  # shared, /proc/100/stat not re-read
    assert other.pid == 100


def test_groups_reread_when_credentials_change(
    fake: FakeProc, fake_resolver: CallerResolver
) -> None:
    first = fake_resolver.resolve(100, 1000, 1000)
    assert first is not None and first.groups == {1000, 27}
    status = fake.root / "100" / "status"
    status.write_text(status.read_text().replace("Groups:\t1000 27", "Groups:\t"))
    same = fake_resolver.resolve(100, 1000, 1000)
    assert same is first
    dropped = fake_resolver.resolve(100, 65534, 65534)
    assert dropped is not None
    assert dropped.groups == frozenset()
    assert (dropped.uid, dropped.gid, dropped.exe) == (65534, 65534, "/usr/bin/vim")


def test_ancestor_walk_stops_at_reused_parent(
    fake: FakeProc, fake_resolver: CallerResolver
) -> None:
    # The parent exited and pid 50 now belongs to a process that started after the child.
    fake.add(50, "/usr/bin/bash", ppid=1, start=500, comm="bash")
    caller = fake_resolver.resolve(100, 0, 0)
    assert caller is not None and caller.ancestors == ()


def test_ancestor_walk_terminates(fake: FakeProc, fake_resolver: CallerResolver) -> None:
    fake.add(60, "/a", ppid=61, start=10)
    fake.add(61, "/b", ppid=60, start=10)
    fake.add(200, "/c", ppid=60, start=20)
    caller = fake_resolver.resolve(200, 0, 0)
    assert caller is not None and caller.ancestors == ("/a", "/b")
    fake.add(201, "/d", ppid=50, start=200)
    (fake.root / "50" / "exe").unlink()
    assert fake_resolver.resolve(201, 0, 0).ancestors == ()  # type: ignore[union-attr]


def test_cache_is_bounded_and_closes_descriptors(fake: FakeProc) -> None:
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    for pid in range(1000, 1040):
        fake.add(pid, f"/bin/p{pid}", ppid=1, start=pid)
    before = open_fds()
    r = CallerResolver(max_entries=16, proc_root=str(fake.root))
    for pid in range(1000, 1040):
        assert r.resolve(pid, 0, 0) is not None
    stats = r.statistics()
    assert (stats.entries, stats.capacity) == (16, 16)
    assert open_fds() == before + 16
    assert r.resolve(1039, 0, 0) is not None  # recent: hit
    assert r.resolve(1000, 0, 0) is not None  # evicted: miss
    stats = r.statistics()
    assert (stats.hits, stats.misses) == (1, 41)
    r.close()
    assert open_fds() == before
    assert r.statistics().entries == 0


def test_out_of_descriptors_sheds_cache(fake: FakeProc, monkeypatch: pytest.MonkeyPatch) -> None:
    for pid in range(1000, 1020):
        fake.add(pid, f"/bin/p{pid}", ppid=1, start=pid)
    with CallerResolver(max_entries=16, proc_root=str(fake.root)) as r:
        for pid in range(1000, 1016):
            r.resolve(pid, 0, 0)
        real_open = os.open
        failures = [OSError(errno.EMFILE, "Too many open files")]

        def open_once_failing(path: str, flags: int, *args: object, **kwargs: object) -> int:
            if failures and str(path).endswith("/1016"):
                raise failures.pop()
            return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "open", open_once_failing)
        caller = r.resolve(1016, 0, 0)
        monkeypatch.undo()
        assert caller is not None and caller.exe == "/bin/p1016"
        assert not failures
        assert r.statistics().entries == 8  # 16 - 9 shed + the new one
        assert r.resolve(1015, 0, 0) is not None
        assert r.statistics().hits == 1  # the newest entries were kept
