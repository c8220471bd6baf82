"""Group commit, shared by the SQLite and the PostgreSQL outbox: the changes of every caller
waiting at once are written in one transaction, and each caller gets its own outcome.

Only how a batch is written differs between the two outboxes (``write``). The rules kept here,
whatever the callers' cancellations and failures:

- A change is pending, or in the running commit, until its outcome is settled: never lost
  between the two, and never left unsettled with its caller waiting.
- With no commit running, the first waiting caller leads one: it lets the callers already
  runnable add their changes (two scheduling rounds), writes the whole batch, and wakes the rest.
- A leader cancelled before its write began (waiting for a worker thread, say) puts its batch
  back at the front, so the next waiting caller leads it. Once the write began, trio does not
  cancel the worker thread; if it fails with anything but ``OutboxError``, every caller in the
  batch is told so.
- A caller that leaves while its change is being committed gets its ``withdrawal`` queued (for
  an add: delete the row again if nothing happened to it since), because its caller was told
  nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable
from pathlib import PurePath
from typing import Generic, TypeVar

import attrs
import trio

from trio_mailer.core.errors import OutboxError
from trio_mailer.store.admission_tables import IdempotencyHit, StoreRefusal

log = logging.getLogger(__name__)

C = TypeVar("C")
Outcomes = list[OutboxError | None]  # one per change: None (stored) or what kept it out


def copy_error(error: OutboxError) -> OutboxError:
    """A fresh instance of ``error`` for one caller: one instance raised from many tasks would
    collect all their tracebacks."""
    if isinstance(error, IdempotencyHit):
        return IdempotencyHit(error.entry)
    if isinstance(error, StoreRefusal):
        return StoreRefusal(error.reason, error.retry_after_s)
    return type(error)(error.problem, path=error.path)


@attrs.define(eq=False)
class _Pending(Generic[C]):
    change: C
    taken: bool = False  # in a batch (committing, or committed)
    settled: bool = False  # its batch finished; ``error`` is its outcome
    error: OutboxError | None = None


@attrs.define(eq=False)
class GroupCommit(Generic[C]):
    """The pending changes of one outbox and the commit that writes them."""

    write: Callable[[list[C], Callable[[], None]], Awaitable[Outcomes]]
    """Write the changes in one transaction; call the second argument (in the worker thread)
    as the write begins. Returns each change's outcome; raises ``OutboxError`` when the
    transaction failed."""
    requeue_after_failure: Callable[[list[C]], Iterable[C]]
    """After a failed commit: the changes to write again with the next one (no caller waits
    for them)."""
    withdrawal: Callable[[C], C | None]
    """What undoes a change whose caller left while it was being committed (None: nothing)."""
    path: PurePath | None = None  # the outbox file, for the errors made here
    _pending: list[_Pending[C]] = attrs.field(factory=list)
    _committing: bool = False
    _commit_done: trio.Event = attrs.field(factory=trio.Event)  # set when the running one ends
    commits: int = 0
    rows_committed: int = 0
    failed_commits: int = 0
    largest_batch: int = 0

    @property
    def pending(self) -> int:
        """Changes waiting for the next commit."""
        return len(self._pending)

    async def submit(self, change: C) -> None:
        """Commit ``change`` with whatever else is pending; returns once it is stored.

        Raises:
            OutboxError: the outcome of this change (a copy: each caller raises its own).
        """
        item = _Pending(change)
        self._pending.append(item)
        try:
            while not item.settled:
                if self._committing:
                    await self._commit_done.wait()
                else:
                    await self._lead()
        except BaseException:
            self._abandon(item)
            raise
        if item.error is not None:
            raise copy_error(item.error) from item.error

    def queue(self, change: C) -> None:
        """Queue a change no caller waits for (a withdrawal), once."""
        if all(item.change != change for item in self._pending):
            self._pending.append(_Pending(change))

    async def flush(self) -> None:
        """Wait for the running commit, then commit what is pending, once (a failing
        withdrawal would otherwise come back for ever)."""
        flushed = False
        while True:
            if self._committing:
                await self._commit_done.wait()
            elif self._pending and not flushed:
                flushed = True
                await self._lead()
            else:
                return

    async def _lead(self) -> None:
        """Run one commit of everything pending, then wake whoever waits for it."""
        self._committing = True
        try:
            # Callers already runnable join this commit. Two scheduling rounds, because trio
            # runs the tasks of one round in random order: after the second, every task that
            # was runnable when this one began leading has added its change.
            await trio.lowlevel.checkpoint()
            await trio.lowlevel.checkpoint()
            await self._commit_pending()
        finally:
            self._committing = False
            done, self._commit_done = self._commit_done, trio.Event()
            done.set()

    async def _commit_pending(self) -> None:
        batch, self._pending = self._pending, []
        for item in batch:
            item.taken = True
        changes = [item.change for item in batch]
        started = False

        def began() -> None:
            nonlocal started
            started = True

        try:
            outcomes = await self.write(changes, began)
        except OutboxError as exc:
            self.failed_commits += 1
            log.error("outbox commit of %d changes failed: %s", len(batch), exc)
            outcomes = [exc] * len(batch)
            for change in self.requeue_after_failure(changes):
                self.queue(change)
        except BaseException as exc:
            if started:
                # A bug, or the connection was closed under the write: settle every caller.
                failure = OutboxError(f"commit failed ({type(exc).__name__})", path=self.path)
                self._settle(batch, [failure] * len(batch))
            else:
                # Cancelled (or refused) before anything was written: the changes go back to
                # the front of the queue, for the next leader.
                for item in batch:
                    item.taken = False
                self._pending[:0] = batch
            raise
        else:
            self.commits += 1
            self.rows_committed += outcomes.count(None)
            self.largest_batch = max(self.largest_batch, len(batch))
        self._settle(batch, outcomes)

    @staticmethod
    def _settle(batch: list[_Pending[C]], outcomes: Outcomes) -> None:
        for item, error in zip(batch, outcomes, strict=True):
            item.settled = True
            item.error = error

    def _abandon(self, item: _Pending[C]) -> None:
        """The caller of ``item`` was cancelled (or failed) before collecting its outcome."""
        if not item.taken:
            self._pending.remove(item)
            return
        if item.settled and item.error is not None:
            return  # it was not stored: nothing to undo
        undo = self.withdrawal(item.change)
        if undo is not None:
            self.queue(undo)
