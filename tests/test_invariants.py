"""The invariants of docs/LOCKING.md, checked on the real objects after every step.

Interleavings are made deterministic by `ParkedCalls`, which stands in for
`isofs.core.sections.blocking`: every provider call waits until the test lets it run, exactly
as it would wait for a worker thread while the event loop serves other tasks. A test then
chooses (or hypothesis draws) which parked call runs next and which task starts its next
operation; after every step, once every task is blocked, the invariants are checked.

The stack is the example xorpad provider (16-byte header, XOR keystream), so logical and
native bytes differ in content and size, and the native file is decoded independently.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from isofs_xorpad import HEADER_SIZE, MAGIC, XorPadLayer, keystream, xor_at
from trio.lowlevel import Task
from trio.testing import wait_all_tasks_blocked

from isofs.core import sections as sections_module
from isofs.core.inodes import SHARED, VIEW_CODES, split_nodeid
from isofs.core.pagecache import PageCache
from isofs.core.sections import NativeFile, Section
from isofs.core.sizecache import NOT_FORMATTED, SizeCache
from isofs.core.volume import FileHandle, Requester, Volume
from isofs.provider import Stack
from isofs.views.callers import ResolverStatistics
from isofs.views.policy import Policy, Rule

T = TypeVar("T")
ROOT = 1
SEED = 7
NATIVE = Requester(os.getuid(), os.getgid(), "native")
TARGET = Requester(os.getuid(), os.getgid(), "target")


# ------------------------------------------------------------------- provider calls parked


class ParkedCalls:
    """Replaces `sections.blocking`: a provider call waits until the test lets it run.

    That is what a call in a worker thread does to the event loop (other tasks run while it
    waits), made deterministic: nothing runs until `run` is called for it. Disabled, calls run
    inline as the bounded ones of the real daemon do.
    """

    def __init__(self) -> None:
        self.enabled = False
        self.parked: list[tuple[Task, trio.Event]] = []

    async def __call__(
        self, function: Callable[..., T], *args: object, size: int = 0, io_bound: bool = False
    ) -> T:
        if self.enabled:
            entry = (trio.lowlevel.current_task(), trio.Event())
            self.parked.append(entry)
            try:
                await entry[1].wait()
            finally:
                self.parked.remove(entry)
        return function(*args)

    async def run(self, index: int = 0) -> None:
        """Let one parked call (the oldest by default) run, then wait until all is quiet."""
        self.parked[index][1].set()
        await wait_all_tasks_blocked()

    async def run_all(self) -> None:
        while self.parked:
            await self.run()


@pytest.fixture
def parked(monkeypatch: pytest.MonkeyPatch) -> ParkedCalls:
    calls = ParkedCalls()
    monkeypatch.setattr(sections_module, "blocking", calls)
    return calls


@contextlib.contextmanager
def parking() -> Iterator[ParkedCalls]:
    """`parked` for hypothesis tests (a function-scoped fixture would be shared by examples)."""
    calls = ParkedCalls()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sections_module, "blocking", calls)
        yield calls


# ------------------------------------------------------------------------- the native side


def decode(path: Path) -> bytes | None:
    """The logical content of a native xorpad file, read independently; None if unformatted."""
    fd = os.open(path, os.O_RDONLY)
    try:
        lower = NativeFile(fd)
        if not XorPadLayer().is_formatted(lower):
            return None
        upper = XorPadLayer().open(lower)
        return upper.read(0, upper.size())
    finally:
        os.close(fd)


def encode(content: bytes, seed: int = SEED) -> bytes:
    return MAGIC + seed.to_bytes(8, "big") + xor_at(seed, 0, content)


def logical_content(section: Section, path: Path) -> bytes:
    """What the section shows: the native file decoded, to its size, under its dirty pages."""
    stored = decode(path)
    if stored is None:
        stored = path.read_bytes()
    content = bytearray(stored[: section.size])
    content.extend(bytes(section.size - len(content)))
    size = section.page_size
    for index in section.cache.dirty_indexes(section.id):
        page = section.cache.peek(section.id, index)
        assert page is not None, f"dirty page {index} is gone"
        lo, hi = index * size, min((index + 1) * size, section.size)
        content[lo:hi] = page[: max(0, hi - lo)]
    return bytes(content)


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


# ----------------------------------------------------------------------------- a volume


class Resolver:
    """The volume needs one for a two-view policy; requests here carry their view already."""

    def resolve(self, pid: int, uid: int, gid: int) -> None:
        return None

    def statistics(self) -> ResolverStatistics:
        return ResolverStatistics(0, 0, 0, 0, 0, 0, 0)


class VolumeEnv:
    """A two-view volume over a temporary source with the xorpad stack."""

    def __init__(self, root: Path, *, budget: int = 1 << 20) -> None:
        self.src = root / "src"
        self.src.mkdir()
        self.root_fd = os.open(self.src, os.O_PATH | os.O_DIRECTORY)
        self.vol = Volume(
            self.root_fd,
            stack=Stack([XorPadLayer(SEED)]),
            policy=Policy(rules=(Rule(view="target", uid=12345),)),
            resolver=Resolver(),  # type: ignore[arg-type]
            cache=PageCache(budget),
            sizes=SizeCache(None, racy_window_ns=0),
        )

    def path(self, name: str) -> Path:
        return self.src / name

    def nodeid(self, name: str, caller: Requester) -> int:
        return self.vol.lookup(ROOT, name, caller).nodeid

    def close(self) -> None:
        self.vol.close()
        os.close(self.root_fd)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[VolumeEnv]:
    e = VolumeEnv(tmp_path)
    yield e
    e.close()


async def new_file(env: VolumeEnv, name: str, content: bytes) -> int:
    """A formatted file written through the target view (closed again); its target nodeid."""
    fh, entry = await env.vol.create(ROOT, name, 0o644, os.O_RDWR, TARGET)
    await env.vol.write(fh, 0, content)
    await env.vol.release(fh)
    return entry.nodeid


def section_of(env: VolumeEnv, name: str) -> Section:
    return env.vol.sections[(os.stat(env.path(name)).st_ino, "target")]


# ------------------------------------------------------------- races found, pinned down


async def test_release_leaves_the_descriptor_to_a_task_waiting_for_the_section(
    env: VolumeEnv, parked: ParkedCalls
) -> None:
    """The last close detaches the section; a truncate waiting for its lock must keep the fd.

    Closing it under the truncate made the truncate act on whatever file got that descriptor
    number next.
    """
    vol = env.vol
    t = await new_file(env, "f", b"0123456789")
    fh, _ = await vol.open(t, os.O_RDWR, TARGET)
    await vol.write(fh, 0, b"ABC")  # a partial page: dirty, written back by the close
    parked.enabled = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(vol.release, fh)
        await wait_all_tasks_blocked()  # the close is writing back (in "a thread")
        nursery.start_soon(lambda: vol.setattr(t, size=4, caller_view="target"))
        await wait_all_tasks_blocked()  # the truncate waits for the section lock
        number = section_of(env, "f").native_fd
        await parked.run()  # the write-back
        await parked.run()  # the provider flush; the close finishes, the truncate gets in
        victim = env.path("victim")
        victim.write_bytes(encode(b"V" * 100))
        fd = os.open(victim, os.O_RDWR)
        if not fd_is_open(number):  # the section's number is free: another file takes it
            os.dup2(fd, number)
            os.close(fd)
            fd = number
        try:
            await parked.run_all()
        finally:
            os.close(fd)
    assert decode(victim) == b"V" * 100
    assert decode(env.path("f")) == b"ABC3"
    section = section_of(env, "f")
    section.check_invariants()
    assert not section.attached  # given back once nobody used it any more


async def test_native_write_waits_for_a_section_operation_in_flight(
    env: VolumeEnv, parked: ParkedCalls
) -> None:
    """A native write during a target truncate (in "a thread") must not be hidden by it.

    The truncate took the validators after the native write, so the section believed its
    pages of the old bytes were current and kept showing them.
    """
    vol = env.vol
    t = await new_file(env, "f", b"A" * 100)
    n = env.nodeid("f", NATIVE)
    fh_t, _ = await vol.open(t, os.O_RDWR, TARGET)
    fh_n, _ = await vol.open(n, os.O_RDWR, NATIVE)
    assert await vol.read(fh_t, 0, 100) == b"A" * 100  # page 0 cached
    parked.enabled = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: vol.setattr(t, size=200, caller_view="target"))
        await wait_all_tasks_blocked()
        nursery.start_soon(vol.write, fh_n, HEADER_SIZE, xor_at(SEED, 0, b"NEW"))
        await wait_all_tasks_blocked()
        await parked.run_all()
    parked.enabled = False
    expected = b"NEW" + b"A" * 97 + bytes(100)
    assert decode(env.path("f")) == expected
    assert await vol.read(fh_t, 0, 300) == expected
    section_of(env, "f").check_invariants()
    await vol.release(fh_n)
    await vol.release(fh_t)


async def test_read_granted_behind_a_native_write_reloads_first(
    env: VolumeEnv, parked: ParkedCalls
) -> None:
    """A reader let in by a native writer's release runs after the native change.

    It found the section stale only after it had checked, and decoded the new native bytes
    with the old header's keystream: neither the old content nor the new one.
    """
    vol = env.vol
    env.path("f").write_bytes(encode(b"A" * 100))  # nothing of it cached yet
    t = env.nodeid("f", TARGET)
    n = env.nodeid("f", NATIVE)
    fh_t, _ = await vol.open(t, os.O_RDONLY, TARGET)
    fh_n, _ = await vol.open(n, os.O_RDWR, NATIVE)
    results: list[bytes] = []

    async def reader() -> None:
        results.append(bytes(await vol.read(fh_t, 0, 100)))

    parked.enabled = True
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: vol.setattr(t, size=100, caller_view="target"))
        await wait_all_tasks_blocked()  # holds the section, its provider call parked
        nursery.start_soon(vol.write, fh_n, 0, encode(b"B" * 100, seed=SEED + 1))
        await wait_all_tasks_blocked()
        nursery.start_soon(reader)
        await wait_all_tasks_blocked()
        await parked.run_all()
    assert results[0] in (b"A" * 100, b"B" * 100)
    await vol.release(fh_n)
    await vol.release(fh_t)


async def test_write_back_of_a_section_changed_behind_the_back_reloads_first(
    env: VolumeEnv, caplog: pytest.LogCaptureFixture
) -> None:
    """Pending pages of a file replaced behind the mount's back are discarded (loudly) by the
    write-back too, not only by a read or write: written through the old upper file they
    would corrupt the new file."""
    vol = env.vol
    t = await new_file(env, "f", b"A" * 100)
    fh, _ = await vol.open(t, os.O_RDWR, TARGET)
    await vol.write(fh, 10, b"mine")  # a partial page: pending
    env.path("f").write_bytes(encode(b"B" * 50, seed=SEED + 1))  # behind the mount's back
    fh2, _ = await vol.open(t, os.O_RDONLY, TARGET)  # sees the change: the section is stale
    await vol.flush(fh)
    assert decode(env.path("f")) == b"B" * 50
    assert "unwritten data discarded" in caplog.text
    section_of(env, "f").check_invariants()
    assert bytes(await vol.read(fh2, 0, 100)) == b"B" * 50
    await vol.release(fh2)
    await vol.release(fh)


# --------------------------------------------------------- random interleavings: the core


@dataclass(eq=False)
class Actor:
    """A task running a program of operations, one whenever the controller says so."""

    name: str
    program: list[Any]
    perform: Callable[[Any], Awaitable[None]]
    state: str = "idle"  # idle: waits to start its next operation; busy; done
    go: trio.Event = field(default_factory=trio.Event)

    async def run(self) -> None:
        for op in self.program:
            self.state, self.go = "idle", trio.Event()
            await self.go.wait()
            self.state = "busy"
            await self.perform(op)
        self.state = "done"


async def interleave(
    actors: list[Actor], calls: ParkedCalls, data: st.DataObject, check: Callable[[], None]
) -> None:
    """Run the actors one step at a time, checking the invariants whenever all are blocked.

    A step lets one idle actor start its next operation, or one parked provider call run
    (the drawn choice is the whole interleaving). Busy actors that are neither parked nor
    runnable wait for a section lock: if nothing else can move, that is a deadlock.
    """
    calls.enabled = True
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for actor in actors:
                nursery.start_soon(actor.run)
            while True:
                await wait_all_tasks_blocked()
                check()
                idle = [a for a in actors if a.state == "idle"]
                choices = len(idle) + len(calls.parked)
                if not choices:
                    stuck = [a.name for a in actors if a.state == "busy"]
                    assert not stuck, f"deadlock: {stuck} wait and nothing can run"
                    break
                pick = data.draw(st.integers(0, choices - 1), label="step")
                if pick < len(idle):
                    idle[pick].go.set()
                else:
                    calls.parked[pick - len(idle)][1].set()
    calls.enabled = False


def payload(length: int, seed: int) -> bytes:
    """Reproducible bytes, never accidentally zero (zeros would hide lost writes)."""
    return bytes((seed * 37 + i * 11 + 1) % 255 + 1 for i in range(length))


def apply_write(model: bytearray, offset: int, data: bytes) -> None:
    if data:
        if offset > len(model):
            model.extend(bytes(offset - len(model)))
        model[offset : offset + len(data)] = data


def apply_truncate(model: bytearray, size: int) -> None:
    del model[size:]
    model.extend(bytes(size - len(model)))


SMALL_PAGE = 16
SECTION_PAGES = 6


def section_ops() -> st.SearchStrategy[list[tuple[str, int, int, int]]]:
    """(kind, which section, offset or size, length) for one actor."""
    offsets = st.integers(0, SECTION_PAGES * SMALL_PAGE)
    lengths = st.sampled_from([1, SMALL_PAGE - 1, SMALL_PAGE, SMALL_PAGE + 1, 3 * SMALL_PAGE])
    which = st.integers(0, 1)
    return st.lists(
        st.one_of(
            st.tuples(st.just("read"), which, offsets, lengths),
            st.tuples(st.just("write"), which, offsets, lengths),
            st.tuples(st.just("truncate"), which, offsets, st.just(0)),
            st.tuples(st.just("flush"), which, st.just(0), st.just(0)),
        ),
        min_size=1,
        max_size=5,
    )


class SectionsUnderTest:
    """Two sections of two formatted files sharing one page cache of a few small pages."""

    def __init__(self, directory: Path, budget_pages: int) -> None:
        self.cache = PageCache(budget=budget_pages * SMALL_PAGE)
        self.paths = [directory / "a", directory / "b"]
        self.sections: list[Section] = []
        self.models = [bytearray(), bytearray()]
        for number, path in enumerate(self.paths, start=1):
            path.write_bytes(encode(b""))
            fd = os.open(path, os.O_RDWR)
            stack = Stack([XorPadLayer(SEED)])
            section = Section(number, fd, stack, self.cache, SMALL_PAGE, "target", lambda: None)
            self.sections.append(section)

    async def perform(self, op: tuple[str, int, int, int], seed: int) -> None:
        kind, which, offset, length = op
        section, model = self.sections[which], self.models[which]
        if kind == "read":
            got = bytes(await section.read(offset, length))
            # Nothing ran since the read let go of its shared hold: it saw this content.
            assert got == bytes(model[offset : offset + length]), (which, offset, length)
        elif kind == "write":
            data = payload(length, seed)
            assert await section.write(offset, data) == length
            apply_write(model, offset, data)
        elif kind == "truncate":
            await section.truncate(offset)
            apply_truncate(model, offset)
        else:
            await section.flush()

    def check(self) -> None:
        self.cache.check_invariants()
        for section, path, model in zip(self.sections, self.paths, self.models, strict=True):
            section.check_invariants()
            if not section.lock.is_exclusive:
                assert logical_content(section, path) == model

    def close(self) -> None:
        for section in self.sections:
            section.close()


async def _interleave_sections(
    directory: Path, programs: list[list[Any]], budget_pages: int, data: st.DataObject
) -> None:
    world = SectionsUnderTest(directory, budget_pages)
    try:
        for section in world.sections:
            await section.load()
        with parking() as calls:
            actors = []
            for number, program in enumerate(programs):
                seeds = iter(range(number * 100, number * 100 + len(program)))

                async def perform(op: Any, seeds: Iterator[int] = seeds) -> None:
                    await world.perform(op, next(seeds))

                actors.append(Actor(f"task{number}", program, perform))
            await interleave(actors, calls, data, world.check)
        for section, path, model in zip(world.sections, world.paths, world.models, strict=True):
            await section.flush()
            assert not section.dirty
            assert decode(path) == model
            assert bytes(await section.read(0, len(model) + 1)) == model
    finally:
        world.close()


INTERLEAVINGS = settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)


@INTERLEAVINGS
@given(
    programs=st.lists(section_ops(), min_size=2, max_size=4),
    budget_pages=st.sampled_from([2, 4, 8]),
    data=st.data(),
)
def test_interleaved_section_operations_keep_invariants(
    tmp_path: Path, programs: list[list[Any]], budget_pages: int, data: st.DataObject
) -> None:
    """Tasks interleave reads, writes, truncates and write-backs of two sections whose pages
    compete for a tiny cache; after every step the cache and both sections keep their
    invariants and show exactly the content of the writes in lock order."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        trio.run(_interleave_sections, Path(directory), programs, budget_pages, data)


# ------------------------------------------------------- random interleavings: the volume

PAGE = 64 << 10  # the volume's page size for a byte-granular stack


def volume_offsets() -> st.SearchStrategy[int]:
    near = st.sampled_from([0, 1, 100, PAGE - 1]) | st.integers(0, 300)
    return st.builds(lambda page, delta: page * PAGE + delta, st.integers(0, 1), near)


def request_ops() -> st.SearchStrategy[list[tuple[str, int, int]]]:
    """What one process does to the file: (kind, offset or size, length)."""
    lengths = st.sampled_from([1, 10, 300, PAGE, PAGE + 1])
    return st.lists(
        st.one_of(
            st.tuples(st.just("read"), volume_offsets(), lengths),
            st.tuples(st.just("write"), volume_offsets(), lengths),
            st.tuples(st.just("truncate"), volume_offsets(), st.just(0)),
            st.tuples(st.just("flush"), st.just(0), st.just(0)),
            st.tuples(st.just("close"), st.just(0), st.just(0)),
        ),
        min_size=1,
        max_size=5,
    )


class Processes:
    """Processes of both views working on one file through a two-view volume, and a model
    of its logical content updated as each request returns."""

    def __init__(self, directory: Path, initial: bytes) -> None:
        self.env = VolumeEnv(directory, budget=2 * PAGE)
        self.path = self.env.path("f")
        self.path.write_bytes(encode(initial))
        self.model = bytearray(initial)
        self.nodeids = {
            "target": self.env.nodeid("f", TARGET),
            "native": self.env.nodeid("f", NATIVE),
        }
        self.number = os.stat(self.path).st_ino
        self.actors: list[Actor] = []
        self.closing = 0

    def extend_native_zeros(self, size: int) -> None:
        """Native zeros (a native write past the end, a native truncate up) decode to the
        keystream: that is what growing the file natively means to the target view."""
        if size > len(self.model):
            self.model.extend(keystream(SEED, len(self.model), size - len(self.model)))

    def process(self, name: str, caller: Requester, program: list[Any], seed: int) -> Actor:
        vol, nodeid, transformed = self.env.vol, self.nodeids[caller.view], caller.view != "native"
        handle: list[int] = []

        async def fh() -> int:
            if not handle:
                handle.append((await vol.open(nodeid, os.O_RDWR, caller))[0])
            return handle[0]

        async def perform(op: tuple[str, int, int]) -> None:
            nonlocal seed
            kind, offset, length = op
            seed += 1
            if kind == "read" and transformed:
                got = bytes(await vol.read(await fh(), offset, length))
                assert got == bytes(self.model[offset : offset + length]), (name, op)
            elif kind == "read":
                await vol.read(await fh(), HEADER_SIZE + offset, length)
            elif kind == "write" and transformed:
                data = payload(length, seed)
                await vol.write(await fh(), offset, data)
                apply_write(self.model, offset, data)
            elif kind == "write":
                data = payload(length, seed)
                await vol.write(await fh(), HEADER_SIZE + offset, xor_at(SEED, offset, data))
                self.extend_native_zeros(offset)
                apply_write(self.model, offset, data)
            elif kind == "truncate" and transformed:
                await vol.setattr(nodeid, size=offset, caller_view=caller.view)
                apply_truncate(self.model, offset)
            elif kind == "truncate":
                await vol.setattr(nodeid, size=HEADER_SIZE + offset, caller_view=caller.view)
                del self.model[offset:]
                self.extend_native_zeros(offset)
            elif kind == "flush" and handle:
                await vol.flush(handle[0])
            elif kind == "close" and handle:
                self.closing += 1  # the inode counts the handle until the release returns
                await vol.release(handle.pop())
                self.closing -= 1

        actor = Actor(name, [*program, ("close", 0, 0)], perform)
        self.actors.append(actor)
        return actor

    def check(self) -> None:
        vol = self.env.vol
        vol.cache.check_invariants()
        check_references(vol, closing=self.closing)
        for section in vol.sections.values():
            section.check_invariants()
        section = vol.sections.get((self.number, "target"))
        current = (
            section is not None
            and section.attached
            and not section.stale
            and not section.lock.is_exclusive
            and not section.native_changed()
        )
        if current:
            assert section is not None
            assert logical_content(section, self.path) == self.model
        if all(actor.state != "busy" for actor in self.actors):  # no request in flight
            assert vol.getattr(self.nodeids["target"], "target").attr.size == len(self.model)
            check_size_cache(vol, self.path)

    def close(self) -> None:
        self.env.close()


def check_references(vol: Volume, closing: int = 0) -> None:
    """Handles, sections and inodes agree; every remembered inode has its descriptor.

    `closing`: releases in flight (their handle is gone, their inode still counts it).
    """
    handles: list[FileHandle] = list(vol._handles.values())
    for handle in handles:
        if handle.code != SHARED:  # a per-view nodeid was opened by a caller of its view
            assert VIEW_CODES[handle.view] == handle.code
        if handle.section is not None:
            assert vol.sections.get((handle.inode.number, handle.view)) is handle.section
    for section in vol.sections.values():
        assert section.handles == sum(h.section is section for h in handles)
    for inode in list(vol.inodes._by_number.values()):
        st_ = os.fstat(inode.path_fd)
        assert (st_.st_dev, st_.st_ino) == inode.key, "an inode's descriptor is another file"
        users = sum(h.inode is inode for h in handles)
        users += sum(h.inode is inode for h in vol._dir_handles.values())
        assert users <= inode.open_handles <= users + closing


def check_size_cache(vol: Volume, path: Path) -> None:
    """A size the cache would answer for the native file as it is now is its true size."""
    st_ = os.stat(path)
    entry = vol.sizes._entries.get((st_.st_dev, st_.st_ino))
    if entry is not None and entry[0] == (st_.st_size, st_.st_mtime_ns, st_.st_ctime_ns):
        content = decode(path)
        expected = st_.st_size if content is None else len(content)
        assert (st_.st_size if entry[1] is NOT_FORMATTED else entry[1]) == expected


@contextlib.contextmanager
def no_errors_logged() -> Iterator[None]:
    """The core logs an error when it drops data; an interleaving must never make it."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("isofs")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not records, [record.getMessage() for record in records]


async def _interleave_processes(
    directory: Path, programs: list[tuple[str, list[Any]]], data: st.DataObject
) -> None:
    world = Processes(directory, payload(300, 0))
    try:
        with parking() as calls:
            for number, (view, program) in enumerate(programs):
                caller = TARGET if view == "target" else NATIVE
                world.process(f"{view}{number}", caller, program, seed=number * 100)
            await interleave(world.actors, calls, data, world.check)
        vol, t = world.env.vol, world.nodeids["target"]
        fh, _ = await vol.open(t, os.O_RDONLY, TARGET)
        assert bytes(await vol.read(fh, 0, 4 * PAGE)) == world.model
        await vol.release(fh)
        assert decode(world.path) == world.model
        world.check()
    finally:
        world.close()


@settings(INTERLEAVINGS, max_examples=500)
@given(
    programs=st.lists(
        st.tuples(st.sampled_from(["target", "native"]), request_ops()), min_size=2, max_size=4
    ),
    data=st.data(),
)
def test_interleaved_requests_of_both_views_keep_invariants(
    tmp_path: Path, programs: list[tuple[str, list[Any]]], data: st.DataObject
) -> None:
    """Processes of both views open, read, write, truncate, flush and close one file while
    provider calls wait in "worker threads"; after every step the volume's references, the
    cache, the section and the size cache keep their invariants, and every target read shows
    the content of the requests that returned before it."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory, no_errors_logged():
        trio.run(_interleave_processes, Path(directory), programs, data)


# ----------------------------------------------------------------- the page cache alone


CACHE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(1, 2), st.integers(0, 5), st.integers(0, 40)),
        st.tuples(st.just("put_dirty"), st.integers(1, 2), st.integers(0, 5), st.integers(0, 40)),
        st.tuples(st.just("get"), st.integers(1, 2), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("mark_dirty"), st.integers(1, 2), st.integers(0, 5), st.just(0)),
        st.tuples(st.just("write_back"), st.integers(1, 2), st.just(0), st.just(0)),
        st.tuples(st.just("drop"), st.integers(1, 2), st.integers(0, 6), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(budget=st.integers(0, 100), ops=CACHE_OPS)
def test_page_cache_keeps_dirty_pages_and_its_budget(budget: int, ops: list) -> None:
    """Pages of any size (larger than the budget too) come and go; a dirty page stays until
    it is written back or dropped, and the budget holds unless only dirty pages remain."""
    cache = PageCache(budget=budget)
    dirty: dict[tuple[int, int], bytearray] = {}
    for kind, section, index, size in ops:
        key = (section, index)
        if kind in ("put", "put_dirty"):
            page = bytearray([len(dirty) + 1]) * size
            cache.put(section, index, page, dirty=kind == "put_dirty")
            dirty.pop(key, None)
            if kind == "put_dirty":
                dirty[key] = page
        elif kind == "get":
            cache.get(section, index)
        elif kind == "mark_dirty" and cache.peek(section, index) is not None:
            cache.mark_dirty(section, index)
            dirty[key] = cache.peek(section, index)  # type: ignore[assignment]
        elif kind == "write_back":
            cache.mark_clean(section, cache.dirty_indexes(section))
            dirty = {k: v for k, v in dirty.items() if k[0] != section}
        elif kind == "drop":
            cache.drop(section, index)
            dirty = {k: v for k, v in dirty.items() if k[0] != section or k[1] < index}
        cache.check_invariants()
        for (s, i), page in dirty.items():
            assert cache.peek(s, i) is page, "a dirty page was evicted"
        assert cache.dirty_bytes == sum(len(p) for p in dirty.values())


# ------------------------------------------------------------ references and descriptors


NAMES = ["a", "b", "d"]  # two files and a directory

REFERENCE_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("lookup"), st.sampled_from(NAMES), st.sampled_from(["native", "target"])),
        st.tuples(st.just("forget"), st.integers(0, 9), st.integers(1, 3)),
        st.tuples(st.just("open"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("release"), st.integers(0, 9), st.just(0)),
        st.tuples(st.just("list"), st.integers(0, 5), st.sampled_from(["native", "target"])),
        st.tuples(st.just("unlink"), st.sampled_from(NAMES[:2]), st.just(0)),
        st.tuples(st.just("recreate"), st.sampled_from(NAMES[:2]), st.just(0)),
    ),
    max_size=30,
)


class Kernel:
    """What the kernel holds: lookup counts per nodeid and open file handles."""

    def __init__(self) -> None:
        self.lookups: dict[int, int] = {}
        self.files: dict[int, int] = {}  # fh -> nodeid

    def remember(self, nodeid: int) -> None:
        self.lookups[nodeid] = self.lookups.get(nodeid, 0) + 1

    def pick(self, items: list[int], index: int) -> int | None:
        return sorted(items)[index % len(items)] if items else None


def caller_of(nodeid: int, fallback: str) -> Requester:
    _, code = split_nodeid(nodeid)
    view = fallback if code == SHARED else {v: c for c, v in VIEW_CODES.items()}[code]
    return TARGET if view == "target" else NATIVE


async def _drive_references(env: VolumeEnv, ops: list[tuple[str, Any, Any]]) -> None:
    vol, kernel = env.vol, Kernel()
    for kind, a, b in ops:
        if kind == "lookup":
            with contextlib.suppress(FileNotFoundError):
                kernel.remember(vol.lookup(ROOT, a, TARGET if b == "target" else NATIVE).nodeid)
        elif kind == "forget" and (nodeid := kernel.pick(list(kernel.lookups), a)) is not None:
            count = min(b, kernel.lookups[nodeid])
            vol.forget(nodeid, count)
            kernel.lookups[nodeid] -= count
            if not kernel.lookups[nodeid]:
                del kernel.lookups[nodeid]
        elif kind == "open" and (nodeid := kernel.pick(list(kernel.lookups), a)) is not None:
            inode, _ = vol.inodes.by_nodeid(nodeid)
            if inode.is_regular:
                fh, _ = await vol.open(nodeid, os.O_RDWR, caller_of(nodeid, "native"))
                kernel.files[fh] = nodeid
        elif kind == "release" and (fh := kernel.pick(list(kernel.files), a)) is not None:
            del kernel.files[fh]
            await vol.release(fh)
        elif kind == "list":  # readdirplus: the kernel keeps the first `a` entries
            caller = TARGET if b == "target" else NATIVE
            fh = vol.opendir(ROOT, caller)
            kept = 0
            for _name, entry, _next in vol.readdir(fh, 0):
                if entry is None:
                    continue
                if kept == a:
                    vol.discard(entry)
                    break
                vol.confirm(entry)
                kernel.remember(entry.nodeid)
                kept += 1
            vol.releasedir(fh)
        elif kind == "unlink":
            with contextlib.suppress(FileNotFoundError):
                env.path(a).unlink()
        elif kind == "recreate" and not env.path(a).exists():
            env.path(a).write_bytes(encode(a.encode() * 10))
        check_kernel_references(vol, kernel)
    for fh in list(kernel.files):
        await vol.release(fh)
    for nodeid, count in kernel.lookups.items():
        vol.forget(nodeid, count)
    assert len(vol.inodes) == 1  # only the root is left


def check_kernel_references(vol: Volume, kernel: Kernel) -> None:
    """Everything the kernel references has its inode and descriptor; nothing else has."""
    check_references(vol)
    referenced: set[int] = set()
    for nodeid in {*kernel.lookups, *kernel.files.values()}:
        inode, code = vol.inodes.by_nodeid(nodeid)  # ESTALE if it was released
        st_ = os.fstat(inode.path_fd)
        assert (st_.st_dev, st_.st_ino) == inode.key
        assert inode.lookups.get(code, 0) == kernel.lookups.get(nodeid, 0)
        referenced.add(inode.number)
    known = {number for number in vol.inodes._by_number if number != 0}
    assert known == referenced, "an inode nobody references keeps its descriptor"


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=REFERENCE_OPS)
def test_descriptors_live_exactly_as_long_as_kernel_references(tmp_path: Path, ops: list) -> None:
    """Lookups, readdirplus entries kept or refused, forgets, opens and releases, with the
    files unlinked and recreated natively: an inode keeps its descriptor while the kernel's
    lookup count or an open handle references it, and not longer."""
    with tempfile.TemporaryDirectory(dir=tmp_path) as directory:
        env = VolumeEnv(Path(directory))
        try:
            env.path("a").write_bytes(encode(b"a" * 10))
            env.path("b").write_bytes(b"plain b")
            env.path("d").mkdir()
            trio.run(_drive_references, env, ops)
        finally:
            env.close()


# ------------------------------------------------------------------- per-view nodeids


async def test_a_per_view_nodeid_answers_only_callers_of_its_view(env: VolumeEnv) -> None:
    """getattr, setattr and open of a view's own nodeid from the other view: EACCES, and
    nothing changed; its own view is answered. Shared nodeids answer both."""
    vol = env.vol
    t = await new_file(env, "f", b"secret")
    n = env.nodeid("f", NATIVE)
    assert split_nodeid(t)[1] == VIEW_CODES["target"] and split_nodeid(n)[1] == VIEW_CODES["native"]
    mode = os.stat(env.path("f")).st_mode
    for nodeid, own, other in ((t, TARGET, NATIVE), (n, NATIVE, TARGET)):
        for attempt in ("getattr", "chmod", "truncate", "open"):
            with pytest.raises(OSError) as refused:
                if attempt == "getattr":
                    vol.getattr(nodeid, other.view)
                elif attempt == "chmod":
                    await vol.setattr(nodeid, mode=0o600, caller_view=other.view)
                elif attempt == "truncate":
                    await vol.setattr(nodeid, size=0, caller_view=other.view)
                else:
                    await vol.open(nodeid, os.O_RDONLY, other)
            assert refused.value.errno == errno.EACCES, attempt
        assert os.stat(env.path("f")).st_mode == mode
        assert decode(env.path("f")) == b"secret"
        size = vol.getattr(nodeid, own.view).attr.size
        assert size == (6 if own is TARGET else HEADER_SIZE + 6)
        fh, _ = await vol.open(nodeid, os.O_RDONLY, own)
        assert vol.handle(fh).view == own.view
        await vol.release(fh)
    env.path("d").mkdir()
    shared = env.nodeid("d", NATIVE)
    assert split_nodeid(shared)[1] == SHARED
    assert vol.getattr(shared, "target").attr.mode == vol.getattr(shared, "native").attr.mode
