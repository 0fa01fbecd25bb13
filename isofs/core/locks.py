"""Fair reader/writer lock for trio: the section lock (docs/LOCKING.md says how it is used).

isofs guards each file "section" with a :class:`ResourceLock`: reads take it *shared*,
writes, truncates, write-back and reloads take it *exclusive*. What the protocol needs, and
nothing more:

* **Ownership is per trio task** (``trio.lowlevel.current_task()``), so only the task that
  acquired a hold may release it.
* **One hold per task.** The protocol never nests section locks (no task waits for a lock
  while it holds one, the same one included), so a task that holds the lock and asks for it
  again, in either mode, gets :class:`RuntimeError` at once: nested, an exclusive request
  would wait for itself forever, and a shared one would queue behind a writer that waits for
  this very task. (A shared owner asking for exclusive is the "upgrade" case of this rule.)
* **Strict FIFO, no starvation.** Requests that cannot be granted immediately are queued in
  arrival order. A new request never overtakes the queue: in particular a new shared request
  waits whenever anything is queued, so a steady stream of readers cannot starve a writer.
  Whenever the lock state changes the head of the queue is granted if compatible; a shared
  head is granted together with *all* shared waiters directly behind it, so a stream of
  writers cannot starve readers either.
* **Hand-off.** Ownership is transferred to a waiter at the moment it is granted, before the
  waiter even runs, so nobody can barge in between, and :attr:`ResourceLock.in_use` stays
  true across the hand-over (a section is never detached between two users).
* **Cancellation safety.** A waiter cancelled while queued is removed from the queue (which
  may unblock the requests behind it). If it was granted in the same scheduling step in which
  it was cancelled, the grant is released again before ``Cancelled`` propagates, so the lock
  is never left owned by a task that thinks it failed (requests are cancelled at unmount).
* **Statistics** for ``isofs status``: waiters, owners, grants, contention, cancellations.

Like :class:`trio.Lock`, the async acquire methods are always checkpoints; the ``try_``
methods never are (the section's uncontended fast path), and :meth:`ResourceLock.release` is
synchronous so it can be used freely in ``finally`` blocks.
"""

import enum
from collections import OrderedDict
from dataclasses import dataclass, field

import trio
from trio.lowlevel import Task

__all__ = ["ResourceLock", "ResourceLockStatistics"]


class _Mode(enum.Enum):
    SHARED = "shared"
    EXCLUSIVE = "exclusive"


@dataclass(eq=False, slots=True)
class _Waiter:
    """One queued request; identity-hashed so it can be removed from the queue in O(1)."""

    task: Task
    mode: _Mode
    event: trio.Event = field(default_factory=trio.Event)
    granted: bool = False


@dataclass(frozen=True, slots=True)
class ResourceLockStatistics:
    """Point-in-time snapshot of a :class:`ResourceLock`, cheap enough for ``isofs status``."""

    shared_waiters: int
    exclusive_waiters: int
    shared_owner_count: int
    is_exclusive: bool
    shared_acquisitions: int
    """Shared grants so far (immediate or after waiting)."""
    exclusive_acquisitions: int
    """Exclusive grants so far (immediate or after waiting)."""
    contended_shared: int
    """Shared requests that had to queue (whether or not they were eventually granted)."""
    contended_exclusive: int
    """Exclusive requests that had to queue (whether or not they were eventually granted)."""
    cancelled_waits: int
    """Queued requests abandoned because the waiting task was cancelled."""


class ResourceLock:
    """Task-owned, strictly FIFO shared/exclusive lock, one hold per task (module docstring)."""

    def __init__(self) -> None:
        self._exclusive_owner: Task | None = None
        self._shared_owners: set[Task] = set()
        # OrderedDict rather than deque: cancelled waiters must be removable from the middle
        # cheaply, and popping the head must stay O(1) (unlike a plain dict).
        self._queue: OrderedDict[_Waiter, None] = OrderedDict()
        self._shared_waiting = 0
        self._exclusive_waiting = 0
        self._shared_acquisitions = 0
        self._exclusive_acquisitions = 0
        self._contended_shared = 0
        self._contended_exclusive = 0
        self._cancelled_waits = 0

    def __repr__(self) -> str:
        if self._exclusive_owner is not None:
            state = "exclusive"
        elif self._shared_owners:
            state = f"shared(owners={len(self._shared_owners)})"
        else:
            state = "free"
        return (
            f"<ResourceLock {state} waiters="
            f"{self._shared_waiting}S/{self._exclusive_waiting}X at {id(self):#x}>"
        )

    # ------------------------------------------------------------------ introspection

    @property
    def in_use(self) -> bool:
        """Whether any task holds the lock or waits for it (then its section is busy)."""
        return self._exclusive_owner is not None or bool(self._shared_owners or self._queue)

    @property
    def shared_waiters(self) -> int:
        """Number of queued shared requests."""
        return self._shared_waiting

    @property
    def exclusive_waiters(self) -> int:
        """Number of queued exclusive requests."""
        return self._exclusive_waiting

    @property
    def shared_owner_count(self) -> int:
        """Number of tasks currently holding the lock shared."""
        return len(self._shared_owners)

    @property
    def is_exclusive(self) -> bool:
        """Whether some task holds the lock exclusively."""
        return self._exclusive_owner is not None

    @property
    def exclusive_owner(self) -> Task | None:
        """The task holding the lock exclusively, if any."""
        return self._exclusive_owner

    def statistics(self) -> ResourceLockStatistics:
        """Return a consistent snapshot of the counters (no side effects)."""
        return ResourceLockStatistics(
            shared_waiters=self._shared_waiting,
            exclusive_waiters=self._exclusive_waiting,
            shared_owner_count=len(self._shared_owners),
            is_exclusive=self._exclusive_owner is not None,
            shared_acquisitions=self._shared_acquisitions,
            exclusive_acquisitions=self._exclusive_acquisitions,
            contended_shared=self._contended_shared,
            contended_exclusive=self._contended_exclusive,
            cancelled_waits=self._cancelled_waits,
        )

    # ------------------------------------------------------------------ acquisition

    def try_acquire_shared(self) -> bool:
        """Take a shared hold if that is possible without waiting (or jumping the queue)."""
        task = trio.lowlevel.current_task()
        self._refuse_second_hold(task, _Mode.SHARED)
        return self._try_shared(task)

    def try_acquire_exclusive(self) -> bool:
        """Take an exclusive hold if that is possible without waiting.

        Raises :class:`RuntimeError` if the calling task holds the lock already: nesting is a
        design error even when it happens to be uncontended, so fail consistently.
        """
        task = trio.lowlevel.current_task()
        self._refuse_second_hold(task, _Mode.EXCLUSIVE)
        return self._try_exclusive(task)

    async def acquire_shared(self) -> None:
        """Acquire a shared hold, queueing in FIFO order behind earlier requests.

        Raises :class:`RuntimeError` immediately if the calling task holds the lock already.
        """
        task = trio.lowlevel.current_task()
        self._refuse_second_hold(task, _Mode.SHARED)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._try_shared(task):
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._wait(_Waiter(task, _Mode.SHARED))

    async def acquire_exclusive(self) -> None:
        """Acquire an exclusive hold, queueing in FIFO order behind earlier requests.

        Raises :class:`RuntimeError` immediately if the calling task holds the lock already
        (for a shared owner that is an upgrade, which would wait for itself forever).
        """
        task = trio.lowlevel.current_task()
        self._refuse_second_hold(task, _Mode.EXCLUSIVE)
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._try_exclusive(task):
            await trio.lowlevel.cancel_shielded_checkpoint()
        else:
            await self._wait(_Waiter(task, _Mode.EXCLUSIVE))

    def release(self) -> None:
        """Drop the calling task's hold, granting queued requests once the lock frees up.

        Synchronous (never blocks) so it is safe in ``finally`` blocks and cancelled scopes.
        """
        task = trio.lowlevel.current_task()
        if task is self._exclusive_owner:
            self._exclusive_owner = None
        elif task in self._shared_owners:
            self._shared_owners.remove(task)
        else:
            raise RuntimeError("ResourceLock.release() called by a task that does not hold it")
        self._dispatch()

    # ------------------------------------------------------------------ internals

    def _refuse_second_hold(self, task: Task, mode: _Mode) -> None:
        if task in self._shared_owners and mode is _Mode.EXCLUSIVE:
            raise RuntimeError(
                "ResourceLock: a shared owner may not acquire exclusive (upgrade would "
                "deadlock); release the shared hold first"
            )
        if task is self._exclusive_owner or task in self._shared_owners:
            raise RuntimeError(
                "ResourceLock: this task holds the lock already; section locks never nest"
            )

    def _try_shared(self, task: Task) -> bool:
        if self._exclusive_owner is None and not self._queue:
            self._shared_owners.add(task)
            self._shared_acquisitions += 1
            return True
        return False

    def _try_exclusive(self, task: Task) -> bool:
        if self._exclusive_owner is None and not self._shared_owners and not self._queue:
            self._exclusive_owner = task
            self._exclusive_acquisitions += 1
            return True
        return False

    async def _wait(self, waiter: _Waiter) -> None:
        self._queue[waiter] = None
        if waiter.mode is _Mode.SHARED:
            self._shared_waiting += 1
            self._contended_shared += 1
        else:
            self._exclusive_waiting += 1
            self._contended_exclusive += 1
        try:
            await waiter.event.wait()
        except BaseException:
            self._cancelled_waits += 1
            if waiter.granted:
                # Granted and cancelled in the same scheduling step: the caller will see
                # Cancelled and never release, so give the hold back now.  A waiter owns
                # nothing else (owners never queue), so this drops exactly the grant.
                self._drop_grant(waiter)
            else:
                self._dequeue(waiter)
            self._dispatch()
            raise

    def _dequeue(self, waiter: _Waiter) -> None:
        del self._queue[waiter]
        if waiter.mode is _Mode.SHARED:
            self._shared_waiting -= 1
        else:
            self._exclusive_waiting -= 1

    def _drop_grant(self, waiter: _Waiter) -> None:
        if waiter.mode is _Mode.EXCLUSIVE:
            self._exclusive_owner = None
        else:
            self._shared_owners.discard(waiter.task)

    def _dispatch(self) -> None:
        """Grant the head of the queue while it is compatible with the current holders."""
        while self._queue:
            waiter = next(iter(self._queue))
            if waiter.mode is _Mode.EXCLUSIVE:
                if self._exclusive_owner is not None or self._shared_owners:
                    return
                self._exclusive_owner = waiter.task
                self._exclusive_acquisitions += 1
            else:
                if self._exclusive_owner is not None:
                    return
                self._shared_owners.add(waiter.task)
                self._shared_acquisitions += 1
            self._dequeue(waiter)
            waiter.granted = True
            waiter.event.set()
