"""The sender task: takes mail from the queue and delivers it over one reused session.

Theory of operation
-------------------
A sender owns at most one SMTP session and handles one mail at a time, so no session ever
carries two transactions at once. It is three parts, each in its own module, in the order one
mail meets them; for each mail that ``MailQueue.next_due()`` hands it:

1. ``attempt.py``: one attempt at the mail (time to live, the attempt stored as started, send,
   what follows a failure), which ends in one ``Settlement``.
2. ``settlement.py``: the one place the mail is settled: the queue, the status board, the
   outbox, the log line, the metrics and ``on_finished``.
3. ``session_keeper.py``: the session's life (connect, probe, recycle, replace after a reply).
   After each mail a session at its cap is recycled with QUIT; after a failed connect, with the
   mail given back to the queue (due at once, for any sender that has a session: work stealing),
   the sender waits its reconnect backoff holding no mail. The wait ends early at the
   given-back mail's time to live, so a mail nobody can send is reported expired on time.

Every accepted mail ends in exactly one log line: ``delivered`` or ``failed``, with its
Message-ID, the number of attempts and the last reply, and ``on_finished`` is told.

Every collaborator is given at construction and cannot be replaced later: a sender without its
outbox or status board would skip "no record, no send" without a word.

When the queue reports no more work (closed and drained at shutdown) the session says QUIT.
Cancellation (shutdown past its grace period) leaves ``in_flight`` set for the shutdown report.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import attrs
import trio

from trio_mailer.core.config import default
from trio_mailer.core.health_decision import SenderStatistics
from trio_mailer.core.retry_policy import ReconnectBackoff, RetryPolicy
from trio_mailer.delivery.attempt import Attempt
from trio_mailer.delivery.mail_queue import Delivery, MailQueue
from trio_mailer.delivery.session_keeper import Connector, SessionKeeper
from trio_mailer.delivery.settlement import FinishedMail as FinishedMail  # what on_finished hears
from trio_mailer.delivery.settlement import GivenBack, Settler
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard


def no_relay_chain(relay: str, reason: str) -> None:
    """Nobody to tell of a 421 (``connect`` is not a ``RelayChain``'s)."""


def _build_keeper(sender: Sender) -> SessionKeeper:
    return SessionKeeper(
        connect=sender.connect,
        backoff=sender.backoff,
        metrics=sender.metrics,
        random=sender.random,
        on_relay_closing=sender.on_relay_closing,
        noop_idle_s=sender.noop_idle_s,
        max_messages=sender.max_messages,
        max_age_s=sender.max_age_s,
    )


def _build_settler(sender: Sender) -> Settler:
    return Settler(
        sender.board, sender.outbox, sender.metrics, sender.on_finished, sender.wall_clock
    )


def _build_attempt(sender: Sender) -> Attempt:
    return Attempt(sender._keeper, sender._settler, sender.policy, sender.backoff, sender.random)


@attrs.define(kw_only=True, on_setattr=attrs.setters.frozen)
class Sender:
    """One sender task of the pool; its collaborators are fixed at construction."""

    connect: Connector
    outbox: Outbox  # each attempt is stored as started before it is sent, each outcome after
    board: StatusBoard  # what GetStatus and the watchers see
    metrics: Metrics
    on_finished: Callable[[FinishedMail], None]  # told of every mail's outcome
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    backoff: ReconnectBackoff = attrs.field(factory=ReconnectBackoff)
    random: Callable[[], float] = random.random
    wall_clock: Callable[[], float] = time.time  # unix seconds, for the stored changes
    noop_idle_s: float = default("noop_idle_s")
    max_messages: int = default("session_max_messages")
    max_age_s: float = default("session_max_age_s")
    start_after: trio.Event | None = None  # e.g. the start-up relay check's first outcome
    on_relay_closing: Callable[[str, str], None] = no_relay_chain  # (relay, reason) after a 421
    in_flight: Delivery | None = attrs.field(
        init=False, default=None, on_setattr=attrs.setters.NO_OP
    )
    _keeper: SessionKeeper = attrs.field(
        init=False, default=attrs.Factory(_build_keeper, takes_self=True)
    )
    _settler: Settler = attrs.field(
        init=False, default=attrs.Factory(_build_settler, takes_self=True)
    )
    _attempt: Attempt = attrs.field(
        init=False, default=attrs.Factory(_build_attempt, takes_self=True)
    )

    @property
    def ever_connected(self) -> bool:
        """A session has succeeded since start-up."""
        return self._keeper.ever_connected

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(
            delivered=self._settler.delivered,
            failed=self._settler.failed,
            retries=self._settler.retries,
            connects=self._keeper.connects,
            sessions_up=self._keeper.sessions_up,
            in_flight=(self.in_flight.message_id,) if self.in_flight else (),
            relay_down_since_s=self._keeper.down_since,
            config_error=self._keeper.config_error,
        )

    async def run(
        self, queue: MailQueue, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver mail from ``queue`` until it has no more work, then QUIT."""
        task_status.started()
        if self.start_after is not None:
            # One connection at a time at start-up: a relay that allows one per client must
            # not refuse the first mail's session because the relay check holds one.
            await self.start_after.wait()
        try:
            while (delivery := await queue.next_due()) is not None:
                self.in_flight = delivery
                settlement = await self._attempt.make(delivery)
                await self._settler.settle(queue, settlement)
                self.in_flight = None
                if isinstance(settlement, GivenBack):
                    deadline = self.policy.deadline_s(delivery.accepted_at_s)
                    await self._keeper.wait_to_reconnect(until_s=deadline)
                else:
                    await self._keeper.recycle_if_due()
            await self._keeper.close(quit=True)
        finally:
            await self._keeper.close(quit=False)
