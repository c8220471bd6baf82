"""What the service needs of a store: one protocol, filled completely by every store.

Three stores implement ``Store``, and the composition root (``app.py``) never asks which one it
holds:

- ``MemoryOutbox`` (``outbox.py``, ``MAILER_OUTBOX=memory``): nothing survives the process.
- ``SqliteOutbox`` (``outbox.py``, a file): durable; one process at a time holds the file.
- ``PostgresOutbox`` (``postgres_outbox.py``, a ``postgresql://`` URL): durable, shared by
  several replicas, each holding the mail it accepted or claimed under a lease.

Where they differ, the protocol says it in a member every store answers:

- ``shared``: other processes write the same store. The admission rules (rate limits, the
  suppression list) are then checked again in the store's commit, against every replica's rows
  (``Acceptance`` carries them; every store honours them, see ``admission_tables``).
- ``claim``: the unfinished mail that no running process holds, handed to this one. A
  single-process store makes a pass (until ``claim`` answers nothing) over the mail unfinished
  when the pass began, each once, skipping what is added meanwhile (its adder holds it); the
  service makes that pass at start-up, so it gets what a previous run left. A shared store
  hands out a dead replica's mail once its lease lapsed, and a stopped one's at once.
- ``wait_for_work``: until ``claim`` may find something new. A single-process store has nothing
  new to find once its pass ended: it waits until cancelled.
- ``run``: the store's own background work, started with ``nursery.start`` (leases, a probe,
  the changes other replicas store, reported to ``on_change``); a single-process store has none.
- ``reachable``: False while the store cannot be used at all (health says NOT_SERVING).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
import trio

from trio_mailer.core.mail_lifecycle import MailRecord, StatusChange
from trio_mailer.store.admission_tables import Acceptance, AcceptedAt, KeyEntry, Suppression

__all__ = ["OutboxStatistics", "Store"]


@attrs.frozen
class OutboxStatistics:
    commits: int  # successful commits (each one fsync)
    rows_committed: int  # changes those commits carried (adds, status changes, withdrawals)
    failed_commits: int
    pending: int  # changes waiting for a commit to take them
    largest_batch: int  # the most changes one commit carried
    round_trips: int = 0  # database round trips (a database server's outbox only)


class Store(Protocol):
    """What the service needs of a store (see the module docstring for how the stores differ).

    Every call raises ``trio.ClosedResourceError`` once the store is closed, and
    ``OutboxError`` (``core.errors``) when the store fails.
    """

    @property
    def shared(self) -> bool:
        """Other processes (replicas) write this store too."""
        ...

    def describe(self) -> str:
        """Where the store is, for the start-up log line (never a password)."""
        ...

    # ---- mail ----

    async def add(self, record: MailRecord, acceptance: Acceptance | None = None) -> None:
        """Store a newly accepted mail, held by this process, and ``acceptance`` beside it.

        Raises:
            IdempotencyHit: the acceptance's key is live; nothing was stored.
            StoreRefusal: a rate limit or the suppression list the acceptance names refuses
                it; nothing was stored.
            OutboxConflict: the message id is taken.
        """
        ...

    async def record(self, change: StatusChange) -> None:
        """Store a status change of a mail this process holds.

        Raises:
            OutboxConflict: the mail is unknown, finished, or held by another replica now.
        """
        ...

    async def get(self, message_id: str) -> MailRecord | None: ...

    async def unfinished(
        self, *, after: tuple[float, str] | None = None, limit: int | None = None
    ) -> list[MailRecord]:
        """Every unfinished mail, oldest accepted first, a page after ``after``."""
        ...

    async def claim(self, limit: int = ...) -> list[MailRecord]:
        """Up to ``limit`` unfinished mails that no running process holds, oldest first; this
        process holds them from now on."""
        ...

    async def wait_for_work(self) -> None:
        """Return when ``claim`` may find mail it did not find before."""
        ...

    async def prune(self, finished_before_unix: float) -> int:
        """Delete the mails that finished before ``finished_before_unix``; returns how many."""
        ...

    # ---- admission: keys, the rate-limit log, the suppression list ----

    async def find_key(self, caller: str, key: str, since_unix: float) -> KeyEntry | None: ...
    async def accepted_since(self, since_unix: float) -> list[AcceptedAt]: ...
    async def list_suppressed(self, now_unix: float) -> list[Suppression]: ...
    async def suppress(self, entry: Suppression) -> None: ...
    async def unsuppress(self, address: str) -> bool: ...
    async def prune_admission(
        self, *, keys_before: float, log_before: float, now_unix: float
    ) -> int: ...

    # ---- the store's life ----

    async def run(
        self,
        on_change: Callable[[str], None],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The store's background work, until cancelled (at once done for a store without
        any); ``on_change(message_id)`` is told of the status changes other processes store."""
        ...

    def reachable(self) -> bool: ...
    def statistics(self) -> OutboxStatistics: ...
    async def aclose(self) -> None: ...
