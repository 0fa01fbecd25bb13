"""Tests for isofs.locks.ResourceLock (ERESOURCE-style shared/exclusive lock).

Unit tests pin every rule down with a concrete scenario; arrival order is made deterministic
by letting the system quiesce (``wait_all_tasks_blocked``) between starting tasks.  The
property-based test at the end drives random multi-task schedules one operation at a time
and checks safety, FIFO order, work conservation and deadlock freedom after every step.
"""

import dataclasses
import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from trio.lowlevel import Task
from trio.testing import wait_all_tasks_blocked

from isofs.core.locks import ResourceLock, ResourceLockStatistics

Mode = Literal["S", "X"]


def _acquire(lock: ResourceLock, mode: Mode) -> Callable[[], Awaitable[None]]:
    return lock.acquire_shared if mode == "S" else lock.acquire_exclusive


class Actor:
    """A task that acquires the lock once, logs the grant, and releases when told to."""

    def __init__(self, lock: ResourceLock, name: str, mode: Mode, log: list[str]) -> None:
        self.lock = lock
        self.name = name
        self.mode = mode
        self.log = log
        self.release_now = trio.Event()
        self.acquired = False
        self.cancelled = False
        self.done = False
        self.task: Task | None = None
        self.scope = trio.CancelScope()

    async def run(self) -> None:
        self.task = trio.lowlevel.current_task()
        with self.scope:
            await _acquire(self.lock, self.mode)()
            self.acquired = True
            self.log.append(self.name)
            await self.release_now.wait()
            self.lock.release()
            self.done = True
        self.cancelled = self.scope.cancelled_caught

    async def finish(self) -> None:
        """Tell the actor to release, then let everything settle."""
        self.release_now.set()
        await wait_all_tasks_blocked()


async def launch(
    nursery: trio.Nursery, lock: ResourceLock, log: list[str], *specs: str
) -> list[Actor]:
    """Start actors named like "S1"/"X2" strictly one after another (defines arrival order)."""
    actors = []
    for spec in specs:
        actor = Actor(lock, spec, "S" if spec[0] == "S" else "X", log)
        nursery.start_soon(actor.run)
        await wait_all_tasks_blocked()
        actors.append(actor)
    return actors


async def can_acquire_now(lock: ResourceLock, mode: Mode) -> bool:
    """Whether a fresh task (ownership is per task) could take the lock without waiting."""
    result: list[bool] = []

    async def runner() -> None:
        ok = lock.try_acquire_shared() if mode == "S" else lock.try_acquire_exclusive()
        if ok:
            lock.release()
        result.append(ok)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
    return result[0]


async def raises_in_other_task(fn: Callable[[], object]) -> BaseException | None:
    caught: list[BaseException | None] = [None]

    async def runner() -> None:
        try:
            fn()
        except RuntimeError as exc:
            caught[0] = exc

    async with trio.open_nursery() as nursery:
        nursery.start_soon(runner)
    return caught[0]


# --------------------------------------------------------------------------- basic exclusion


async def test_free_lock_initial_state() -> None:
    lock = ResourceLock()
    assert not lock.is_exclusive
    assert lock.exclusive_owner is None
    assert lock.shared_owner_count == 0
    assert (lock.shared_waiters, lock.exclusive_waiters) == (0, 0)
    assert "free" in repr(lock)


async def test_shared_holders_coexist_exclusive_excludes_all() -> None:
    lock = ResourceLock()
    log: list[str] = []
    async with trio.open_nursery() as nursery:
        s1, s2 = await launch(nursery, lock, log, "S1", "S2")
        assert log == ["S1", "S2"]
        assert lock.shared_owner_count == 2
        (x3,) = await launch(nursery, lock, log, "X3")
        assert not x3.acquired
        assert lock.exclusive_waiters == 1
        await s1.finish()
        assert not x3.acquired
        await s2.finish()
        assert x3.acquired
        assert lock.is_exclusive and lock.exclusive_owner is x3.task
        assert lock.shared_owner_count == 0
        (s4,) = await launch(nursery, lock, log, "S4")
        (x5,) = await launch(nursery, lock, log, "X5")
        assert not s4.acquired and not x5.acquired
        assert (lock.shared_waiters, lock.exclusive_waiters) == (1, 1)
        await x3.finish()
        assert s4.acquired and not x5.acquired
        await s4.finish()
        assert x5.acquired
        await x5.finish()
    assert log == ["S1", "S2", "X3", "S4", "X5"]
    assert not lock.is_exclusive and lock.shared_owner_count == 0


async def test_acquire_is_a_checkpoint_even_when_uncontended() -> None:
    lock = ResourceLock()
    with trio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire_exclusive()
    assert scope.cancelled_caught
    assert not lock.is_exclusive
    with trio.CancelScope() as scope:
        scope.cancel()
        await lock.acquire_shared()
    assert scope.cancelled_caught
    assert lock.shared_owner_count == 0


# --------------------------------------------------------------------------- one hold per task


async def test_shared_owner_requesting_exclusive_raises_immediately() -> None:
    lock = ResourceLock()
    await lock.acquire_shared()
    with pytest.raises(RuntimeError, match="upgrade"):
        await lock.acquire_exclusive()
    with pytest.raises(RuntimeError, match="upgrade"):
        lock.try_acquire_exclusive()
    # The failed attempts changed nothing: still one plain shared hold.
    assert lock.shared_owner_count == 1 and not lock.is_exclusive
    assert lock.exclusive_waiters == 0
    lock.release()
    assert lock.shared_owner_count == 0


@pytest.mark.parametrize(("held", "again"), [("X", "X"), ("X", "S"), ("S", "S")])
async def test_a_second_hold_by_the_owner_raises_and_changes_nothing(
    held: Mode, again: Mode
) -> None:
    lock = ResourceLock()
    log: list[str] = []
    await _acquire(lock, held)()
    async with trio.open_nursery() as nursery:
        (x1,) = await launch(nursery, lock, log, "X1")  # a queued writer must not matter
        with trio.fail_after(1), pytest.raises(RuntimeError, match="already"):
            await _acquire(lock, again)()
        with pytest.raises(RuntimeError, match="already"):
            lock.try_acquire_shared() if again == "S" else lock.try_acquire_exclusive()
        assert lock.is_exclusive == (held == "X")
        assert lock.shared_owner_count == (held == "S")
        assert (lock.shared_waiters, lock.exclusive_waiters) == (0, 1)
        lock.release()  # one release undoes the one hold
        await wait_all_tasks_blocked()
        assert x1.acquired
        await x1.finish()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()


async def test_in_use_while_held_or_awaited_and_across_the_hand_off() -> None:
    lock = ResourceLock()
    log: list[str] = []
    assert not lock.in_use
    await lock.acquire_shared()
    assert lock.in_use
    async with trio.open_nursery() as nursery:
        (x1,) = await launch(nursery, lock, log, "X1")
        lock.release()
        assert lock.in_use and lock.exclusive_owner is x1.task  # granted before it runs
        await wait_all_tasks_blocked()
        assert x1.acquired
        await x1.finish()
    assert not lock.in_use


# --------------------------------------------------------------------------- misuse


async def test_release_by_non_owner_raises() -> None:
    lock = ResourceLock()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    await lock.acquire_exclusive()
    assert isinstance(await raises_in_other_task(lock.release), RuntimeError)
    assert lock.is_exclusive
    lock.release()
    await lock.acquire_shared()
    assert isinstance(await raises_in_other_task(lock.release), RuntimeError)
    assert lock.shared_owner_count == 1
    lock.release()
    with pytest.raises(RuntimeError):
        lock.release()  # one release too many


# --------------------------------------------------------------------------- try-acquire


async def test_try_acquire() -> None:
    lock = ResourceLock()
    assert not inspect.iscoroutinefunction(lock.try_acquire_shared)
    assert not inspect.iscoroutinefunction(lock.try_acquire_exclusive)
    assert lock.try_acquire_exclusive()
    assert not await can_acquire_now(lock, "S")
    assert not await can_acquire_now(lock, "X")
    lock.release()
    assert lock.try_acquire_shared()
    assert not await can_acquire_now(lock, "X")
    assert lock.shared_owner_count == 1
    lock.release()
    assert lock.shared_owner_count == 0


async def test_try_acquire_shared_does_not_jump_queued_writer() -> None:
    lock = ResourceLock()
    log: list[str] = []
    await lock.acquire_shared()
    async with trio.open_nursery() as nursery:
        (x1,) = await launch(nursery, lock, log, "X1")
        # The lock is only held shared, but a writer is queued: a newcomer must not barge in.
        assert not await can_acquire_now(lock, "S")
        lock.release()
        await wait_all_tasks_blocked()
        assert x1.acquired
        await x1.finish()


# --------------------------------------------------------------------------- FIFO and fairness


async def test_grants_follow_fifo_order_with_reader_batches() -> None:
    lock = ResourceLock()
    log: list[str] = []
    batches: list[set[str]] = []

    def new_batch() -> None:
        seen = set().union(*batches)
        batches.append(set(log) - seen)

    async with trio.open_nursery() as nursery:
        actors = await launch(nursery, lock, log, "X0", "S1", "S2", "X3", "S4", "S5", "X6", "S7")
        new_batch()
        # Release everything currently held; whatever gets granted as a result is one batch.
        while not all(a.done for a in actors):
            holding = [a for a in actors if a.acquired and not a.done]
            assert holding, "nobody holds the lock but not everyone ran"
            for actor in holding:
                await actor.finish()
            new_batch()
    batches = [b for b in batches if b]
    assert batches == [{"X0"}, {"S1", "S2"}, {"X3"}, {"S4", "S5"}, {"X6"}, {"S7"}]
    stats = lock.statistics()
    assert stats.contended_shared == 5 and stats.contended_exclusive == 2


async def test_writer_not_starved_by_stream_of_readers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = ResourceLock()
    events: list[tuple[str, float]] = []

    async def reader(name: str) -> None:
        await lock.acquire_shared()
        events.append((name, trio.current_time()))
        await trio.sleep(3)
        lock.release()

    async def writer() -> None:
        await lock.acquire_exclusive()
        events.append(("W", trio.current_time()))
        await trio.sleep(1)
        lock.release()
        events.append(("W-done", trio.current_time()))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        # Overlapping readers every second: without fairness the lock would never be free.
        for i in range(12):
            if i == 5:
                await trio.sleep(0.5)
                nursery.start_soon(writer)
                await trio.sleep(0.5)
            else:
                await trio.sleep(1)
            nursery.start_soon(reader, f"R{i}")
    times = {name: t - start for name, t in events}
    # Readers R0..R4 were in before the writer arrived at 5.5; the last finishes at 8.
    assert times["W"] == pytest.approx(8)
    # Every reader that arrived after the writer waited for it.
    for i in range(5, 12):
        assert times[f"R{i}"] >= times["W-done"]


async def test_reader_not_starved_by_stream_of_writers(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = ResourceLock()
    order: list[str] = []

    async def worker(name: str, mode: Mode) -> None:
        await _acquire(lock, mode)()
        order.append(name)
        await trio.sleep(2)
        lock.release()

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(worker, f"W{i}", "X")
            await trio.sleep(0.5)
            if i == 2:
                nursery.start_soon(worker, "R", "S")
                await trio.sleep(0.25)
    # The reader queued after W2 and before W3: it gets in right after W2, not after all
    # the writers (which would keep arriving faster than they finish).
    assert order.index("R") == 3
    assert order == ["W0", "W1", "W2", "R", "W3", "W4", "W5", "W6", "W7"]


# --------------------------------------------------------------------------- cancellation


async def test_cancelled_writer_is_dequeued_and_unblocks_readers_behind_it() -> None:
    lock = ResourceLock()
    log: list[str] = []
    await lock.acquire_shared()
    async with trio.open_nursery() as nursery:
        x1, s2, s3 = await launch(nursery, lock, log, "X1", "S2", "S3")
        assert (lock.shared_waiters, lock.exclusive_waiters) == (2, 1)
        x1.scope.cancel()
        await wait_all_tasks_blocked()
        assert x1.cancelled and not x1.acquired
        # With the writer gone, the readers queued behind it share with the current owner.
        assert s2.acquired and s3.acquired
        assert (lock.shared_waiters, lock.exclusive_waiters) == (0, 0)
        assert lock.shared_owner_count == 3
        lock.release()
        await s2.finish()
        await s3.finish()
    assert lock.shared_owner_count == 0
    assert lock.statistics().cancelled_waits == 1


async def test_cancelled_reader_in_middle_of_queue() -> None:
    lock = ResourceLock()
    log: list[str] = []
    await lock.acquire_exclusive()
    async with trio.open_nursery() as nursery:
        s1, x2, s3 = await launch(nursery, lock, log, "S1", "X2", "S3")
        s3.scope.cancel()
        await wait_all_tasks_blocked()
        assert s3.cancelled
        assert (lock.shared_waiters, lock.exclusive_waiters) == (1, 1)
        lock.release()
        await wait_all_tasks_blocked()
        assert s1.acquired and not x2.acquired
        await s1.finish()
        assert x2.acquired
        await x2.finish()
    assert log == ["S1", "X2"]
    assert not lock.is_exclusive and lock.shared_owner_count == 0


@pytest.mark.parametrize(("victim", "next_in_line"), [("X1", "S2"), ("S1", "X2")])
async def test_waiter_granted_and_cancelled_in_same_step_gives_the_lock_back(
    victim: str, next_in_line: str
) -> None:
    lock = ResourceLock()
    log: list[str] = []
    await lock.acquire_exclusive()
    async with trio.open_nursery() as nursery:
        v, nxt = await launch(nursery, lock, log, victim, next_in_line)
        # Cancel the head waiter and release in the same scheduling step: the release hands
        # the lock to the waiter before it gets to run and notice its cancellation.
        v.scope.cancel()
        lock.release()
        if victim.startswith("X"):
            assert lock.exclusive_owner is v.task  # the race really happened...
        else:
            assert lock.shared_owner_count == 1
        await wait_all_tasks_blocked()
        # ...and was undone: the victim saw Cancelled and the lock moved on.
        assert v.cancelled and not v.acquired
        assert nxt.acquired
        if next_in_line.startswith("X"):
            assert lock.exclusive_owner is nxt.task
        else:
            assert lock.shared_owner_count == 1 and not lock.is_exclusive
        await nxt.finish()
    assert not lock.is_exclusive and lock.shared_owner_count == 0
    assert (lock.shared_waiters, lock.exclusive_waiters) == (0, 0)
    assert lock.statistics().cancelled_waits == 1


async def test_waiter_timing_out_leaves_lock_usable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    lock = ResourceLock()
    await lock.acquire_exclusive()
    outcome: list[str] = []

    async def impatient() -> None:
        with trio.move_on_after(5) as scope:
            await lock.acquire_shared()
            outcome.append("acquired")
        if scope.cancelled_caught:
            outcome.append("timed out")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(impatient)
        await wait_all_tasks_blocked()
        assert lock.shared_waiters == 1
    assert outcome == ["timed out"]
    assert lock.shared_waiters == 0
    lock.release()
    assert await can_acquire_now(lock, "X")


# --------------------------------------------------------------------------- statistics


async def test_statistics_snapshot() -> None:
    lock = ResourceLock()
    log: list[str] = []
    await lock.acquire_exclusive()
    async with trio.open_nursery() as nursery:
        s1, s2, x3 = await launch(nursery, lock, log, "S1", "S2", "X3")
        stats = lock.statistics()
        assert stats == ResourceLockStatistics(
            shared_waiters=2,
            exclusive_waiters=1,
            shared_owner_count=0,
            is_exclusive=True,
            shared_acquisitions=0,
            exclusive_acquisitions=1,
            contended_shared=2,
            contended_exclusive=1,
            cancelled_waits=0,
        )
        with pytest.raises(dataclasses.FrozenInstanceError):
            stats.shared_waiters = 5  # type: ignore[misc]
        x3.scope.cancel()
        lock.release()
        await wait_all_tasks_blocked()
        stats = lock.statistics()
        assert (stats.shared_owner_count, stats.is_exclusive) == (2, False)
        assert (stats.shared_acquisitions, stats.cancelled_waits) == (2, 1)
        assert (stats.shared_waiters, stats.exclusive_waiters) == (0, 0)
        await s1.finish()
        await s2.finish()
    assert "free" in repr(lock)


# --------------------------------------------------------------------------- property test
#
# Each task runs a program of "blocks"; a block is an acquire, some yields and attempts to
# take the lock a second time (which must fail at once), and the release.  A controller
# advances exactly one task by one operation per step (or cancels a queued task, possibly in
# the same scheduling step as a release), waits for the system to quiesce, and then checks
# the invariants against the tasks' own bookkeeping.

Op = tuple[str, ...]  # ("acquire", m) ("again", m) ("yield",) ("release",)


@st.composite
def block_strategy(draw: st.DrawFn) -> list[Op]:
    mode: Mode = draw(st.sampled_from(["S", "X"]))
    ops: list[Op] = [("acquire", mode)]
    for _ in range(draw(st.integers(0, 3))):
        choice = draw(st.sampled_from(["yield", "again-S", "again-X"]))
        ops.append(("again", choice[-1]) if choice.startswith("again") else ("yield",))
    ops.append(("release",))
    return ops


programs_strategy = st.lists(
    st.lists(block_strategy(), min_size=1, max_size=3), min_size=2, max_size=6
)


@dataclass
class Request:
    seq: int
    worker: int
    mode: Mode


@dataclass
class Harness:
    lock: ResourceLock
    holders: dict[int, list] = field(default_factory=dict)  # worker -> [mode, depth]
    pending: dict[int, Request] = field(default_factory=dict)  # worker -> open request
    granted_this_step: list[Request] = field(default_factory=list)
    ever_queued: set[int] = field(default_factory=set)
    expect_cancel: set[int] = field(default_factory=set)
    next_seq: int = 0
    granted: int = 0
    cancelled: int = 0
    task_index: dict[Task, int] = field(default_factory=dict)

    def check_grant(self, req: Request) -> None:
        """Safety at the instant of a grant (other members of a reader batch may lag)."""
        others = {w: h for w, h in self.holders.items() if w != req.worker}
        if req.mode == "X":
            assert not others, f"exclusive grant to {req.worker} while {others} hold"
            owner = self.lock.exclusive_owner
            assert owner is not None and self.task_index[owner] == req.worker
        else:
            assert all(h[0] == "S" for h in others.values()), f"shared grant vs {others}"
            assert not self.lock.is_exclusive

    def check_quiescent(self, blocked: set[int]) -> None:
        holders, lock = self.holders, self.lock
        # Safety: an exclusive holder is alone.
        if any(h[0] == "X" for h in holders.values()):
            assert len(holders) == 1, holders
        # Only top-level acquires ever wait.
        assert blocked == set(self.pending), (blocked, self.pending)
        queued = sorted(self.pending.values(), key=lambda r: r.seq)
        self.ever_queued.update(r.seq for r in queued)
        # FIFO: nothing granted in this step is younger than something still queued;
        # several grants at once only as a batch of readers.
        if self.granted_this_step and queued:
            newest = max(r.seq for r in self.granted_this_step)
            assert newest < queued[0].seq, (self.granted_this_step, queued)
        if len(self.granted_this_step) > 1:
            assert all(r.mode == "S" for r in self.granted_this_step), self.granted_this_step
        self.granted_this_step.clear()
        # Work conservation: the head of the queue waits only if it is incompatible.
        if queued:
            head = queued[0]
            if head.mode == "S":
                assert any(h[0] == "X" for h in holders.values()), (head, holders)
            else:
                assert holders, (head, holders)
        # The lock's own view agrees with the tasks' bookkeeping.
        x_holders = [w for w, h in holders.items() if h[0] == "X"]
        assert lock.is_exclusive == bool(x_holders)
        owner = lock.exclusive_owner
        assert (self.task_index[owner] if owner is not None else None) == (
            x_holders[0] if x_holders else None
        )
        assert lock.shared_owner_count == sum(h[0] == "S" for h in holders.values())
        assert lock.shared_waiters == sum(r.mode == "S" for r in queued)
        assert lock.exclusive_waiters == sum(r.mode == "X" for r in queued)


class Worker:
    def __init__(self, idx: int, blocks: list[list[Op]], h: Harness) -> None:
        self.idx = idx
        self.blocks = blocks
        self.h = h
        self.send, self.inbox = trio.open_memory_channel[Callable[[], None] | None](1)
        self.state: Literal["ready", "busy", "done"] = "busy"
        self.next_op: Op | None = None
        self.scope: trio.CancelScope | None = None

    async def run(self) -> None:
        h, lock = self.h, self.h.lock
        h.task_index[trio.lowlevel.current_task()] = self.idx
        for block in self.blocks:
            for op in block:
                self.next_op = op
                self.state = "ready"
                pre = await self.inbox.receive()
                self.state = "busy"
                if pre is not None:
                    pre()
                if op[0] == "acquire":
                    if not await self.top_level_acquire(op[1]):  # type: ignore[arg-type]
                        break  # cancelled: skip the rest of this block
                elif op[0] == "again":
                    with pytest.raises(RuntimeError):
                        await _acquire(lock, op[1])()  # type: ignore[arg-type]
                elif op[0] == "release":
                    lock.release()
                    held = h.holders[self.idx]
                    held[1] -= 1
                    if held[1] == 0:
                        del h.holders[self.idx]
                else:
                    await trio.lowlevel.checkpoint()
        self.state = "done"

    async def top_level_acquire(self, mode: Mode) -> bool:
        h = self.h
        req = Request(h.next_seq, self.idx, mode)
        h.next_seq += 1
        h.pending[self.idx] = req
        with trio.CancelScope() as scope:
            self.scope = scope
            await _acquire(h.lock, mode)()
        self.scope = None
        del h.pending[self.idx]
        expected = self.idx in h.expect_cancel
        assert scope.cancelled_caught == expected
        if expected:
            h.expect_cancel.discard(self.idx)
            h.cancelled += 1
            assert self.idx not in h.holders
            return False
        h.check_grant(req)
        h.holders[self.idx] = [mode, 1]
        h.granted_this_step.append(req)
        h.granted += 1
        return True


async def drive(programs: list[list[list[Op]]], data: st.DataObject) -> None:
    lock = ResourceLock()
    h = Harness(lock)
    workers = [Worker(i, blocks, h) for i, blocks in enumerate(programs)]
    with trio.fail_after(10_000):  # virtual time: a deadlock fails instead of hanging
        async with trio.open_nursery() as nursery:
            for w in workers:
                nursery.start_soon(w.run)
            while True:
                await wait_all_tasks_blocked()
                blocked = {w.idx for w in workers if w.state == "busy"}
                h.check_quiescent(blocked)
                ready = [w for w in workers if w.state == "ready"]
                if not ready:
                    assert not blocked, f"deadlock: {blocked} wait on a free lock"
                    break
                actions: list[tuple[str, int, int]] = [("step", w.idx, -1) for w in ready]
                actions += [("cancel", j, -1) for j in sorted(blocked)]
                actions += [
                    ("cancel+step", j, w.idx)
                    for j in sorted(blocked)
                    for w in ready
                    if w.next_op == ("release",)
                ]
                kind, a, b = data.draw(st.sampled_from(actions))
                if kind == "step":
                    workers[a].send.send_nowait(None)
                else:
                    scope = workers[a].scope
                    assert scope is not None
                    h.expect_cancel.add(a)
                    if kind == "cancel":
                        scope.cancel()
                    else:  # cancel and release in one scheduling step
                        workers[b].send.send_nowait(scope.cancel)
    assert all(w.state == "done" for w in workers)
    assert not h.expect_cancel
    stats = lock.statistics()
    assert not stats.is_exclusive and stats.shared_owner_count == 0
    assert (stats.shared_waiters, stats.exclusive_waiters) == (0, 0)
    assert stats.contended_shared + stats.contended_exclusive == len(h.ever_queued)
    assert stats.cancelled_waits == h.cancelled
    # Grants undone because of a simultaneous cancellation still count as acquisitions.
    acquisitions = stats.shared_acquisitions + stats.exclusive_acquisitions
    assert h.granted <= acquisitions <= h.granted + h.cancelled


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(programs=programs_strategy, data=st.data())
def test_random_schedules_keep_invariants(
    programs: list[list[list[Op]]], data: st.DataObject
) -> None:
    trio.run(drive, programs, data, clock=trio.testing.MockClock(autojump_threshold=0))
