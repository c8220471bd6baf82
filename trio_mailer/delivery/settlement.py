"""How one mail's attempt ends: the one place that settles it.

Theory of operation
-------------------
An attempt (``delivery/attempt.py``) never touches the queue: it ends in one ``Settlement``, and
``Settler.settle`` applies it, so a mail a sender took leaves that sender exactly once, at one
place, with the queue, the status board, the outbox, the logs, the metrics and ``on_finished``
told in step:

- ``FinishedMail``: delivered, failed or expired. Its outcome is stored, the queue lets it go, it
  gets its one log line (``delivered``, ``failed`` or ``expired``: the word of its final state, as
  GetStatus and the metrics have it; with its Message-ID, the number of attempts and the last
  reply) and ``on_finished`` is told.
- ``RetryLater``: the attempt failed and another is due at ``at_s``: ``RETRY_WAIT`` is stored and
  the mail goes into the queue's retry heap.
- ``NotStarted``: the attempt could not be stored as started, so nothing was sent (no record, no
  send): back in the retry heap after ``delay_s``, the attempt not counted.
- ``Refused``: the outbox refuses the attempt (``OutboxConflict``: the mail is finished, or another
  replica holds it): off the board and out of the queue, not reported finished here (whoever
  holds it sends it, so it goes out once).
- ``GivenBack``: this sender has no session: the mail is due again at once, for any sender that
  has one (work stealing); the board shows why it waits (not stored: a restart does not need it).

``record_started`` is the one change made before the relay hears anything: ``SENDING``, the
attempt counted, stored first and shown on the board only once stored, so a crash during DATA is
known at the next start as a possible duplicate.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import attrs
import trio

from trio_mailer.core.errors import OutboxError
from trio_mailer.core.mail_lifecycle import MailState, StatusChange
from trio_mailer.core.retry_policy import TTL_REASON_PREFIX
from trio_mailer.delivery.mail_queue import Delivery, MailQueue
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

log = logging.getLogger(__name__)


@attrs.frozen
class FinishedMail:
    """A mail's terminal outcome."""

    delivery: Delivery
    delivered: bool
    reason: str  # why it failed; "" when delivered
    via: str = ""  # the relay that took it ("" unless delivered, or when unknown)

    @property
    def outcome(self) -> str:
        """ "delivered", "expired" (its time to live passed) or "failed"."""
        if self.delivered:
            return "delivered"
        return "expired" if self.reason.startswith(TTL_REASON_PREFIX) else "failed"


@attrs.frozen
class RetryLater:
    """The attempt failed; the next is due at ``at_s`` (trio time)."""

    delivery: Delivery
    at_s: float
    outcome_unknown: bool  # the session broke after the final ".": the relay may have it


@attrs.frozen
class NotStarted:
    """The attempt could not be stored as started: not sent, again in ``delay_s``."""

    delivery: Delivery
    delay_s: float


@attrs.frozen
class Refused:
    """The outbox refuses the attempt (``OutboxConflict``): the mail leaves this sender."""

    delivery: Delivery
    problem: str


@attrs.frozen
class GivenBack:
    """No session: the mail is due again at once, for any sender that has one."""

    delivery: Delivery


Settlement = FinishedMail | RetryLater | NotStarted | Refused | GivenBack

_TERMINAL_STATES = {
    "delivered": MailState.DELIVERED,
    "failed": MailState.FAILED,
    "expired": MailState.EXPIRED,
}


@attrs.define
class Settler:
    """What the board and the outbox hear of a sender's mails, and the counts of outcomes."""

    board: StatusBoard
    outbox: Outbox
    metrics: Metrics
    on_finished: Callable[[FinishedMail], None]
    wall_clock: Callable[[], float]  # unix seconds, for the stored changes
    delivered: int = attrs.field(init=False, default=0)
    failed: int = attrs.field(init=False, default=0)  # failed for good (not expired)
    retries: int = attrs.field(init=False, default=0)

    async def record_started(self, delivery: Delivery) -> OutboxError | None:
        """Store ``SENDING`` (``delivery`` counts the attempt); the outbox's error if it could
        not (then nothing may be sent). The first attempt's start ends the mail's queue wait."""
        error = await self._report(delivery, MailState.SENDING)
        if error is None and delivery.attempts == 1:
            self.metrics.queue_wait.observe(trio.current_time() - delivery.accepted_at_s)
        return error

    async def settle(self, queue: MailQueue, settlement: Settlement) -> None:
        """The one place a mail a sender took leaves it (see the module's docstring)."""
        delivery = settlement.delivery
        match settlement:
            case FinishedMail():
                await self._report(delivery, _TERMINAL_STATES[settlement.outcome])
                queue.finish(delivery)
                self._finished(settlement)
            case RetryLater():
                self._retrying(settlement)
                await self._report(delivery, MailState.RETRY_WAIT)
                queue.retry_at(delivery, settlement.at_s)
            case NotStarted():
                log.warning(
                    "not sending %s now: its attempt could not be stored; again in %.1fs",
                    delivery.message_id,
                    settlement.delay_s,
                    extra={"message_id": delivery.message_id},
                )
                queue.retry_at(delivery, trio.current_time() + settlement.delay_s)
            case Refused():
                log.warning(
                    "not sending %s: the outbox refuses the attempt (%s)",
                    delivery.message_id,
                    settlement.problem,
                    extra={"message_id": delivery.message_id},
                )
                self.board.forget(delivery.message_id)  # the outbox answers for it
                queue.finish(delivery)
            case GivenBack():
                # Not a new attempt: the board shows why the mail waits (GetStatus gives the
                # reason).
                waiting = MailState.RETRY_WAIT if delivery.attempts else MailState.QUEUED
                await self._report(delivery, waiting, store=False)
                queue.retry_at(delivery, trio.current_time())

    def _retrying(self, retry: RetryLater) -> None:
        delivery = retry.delivery
        self.retries += 1
        self.metrics.retries.inc()
        log.warning(
            "retry %s in %.1fs: attempt %d failed (%s)%s",
            delivery.message_id,
            retry.at_s - trio.current_time(),
            delivery.attempts,
            delivery.last_reply,
            "; possible duplicate: the relay may already have it" if retry.outcome_unknown else "",
            extra={"message_id": delivery.message_id},
        )

    def _finished(self, finished: FinishedMail) -> None:
        delivery = finished.delivery
        if finished.delivered:
            self.delivered += 1
            log.info(
                "delivered %s (attempts=%d, reply: %s)%s via %s",
                delivery.message_id,
                delivery.attempts,
                delivery.last_reply,
                " (possible duplicate)" if delivery.possible_duplicate else "",
                finished.via or "the relay",
                extra={"message_id": delivery.message_id},
            )
        else:
            if finished.outcome == "failed":  # not an expired one: the stop summary counts those
                self.failed += 1
            # "failed" or "expired": the word its status (GetStatus) and the metrics use.
            log.error(
                "%s %s (attempts=%d, last reply: %s): %s",
                finished.outcome,
                delivery.message_id,
                delivery.attempts,
                delivery.last_reply or "none",
                finished.reason,
                extra={"message_id": delivery.message_id},
            )
        age_s = trio.current_time() - delivery.accepted_at_s
        self.metrics.mail_finished(finished.outcome, age_s)
        if finished.delivered:
            self.metrics.delivery_latency.observe(age_s)
            self.metrics.delivered_via(finished.via)
        self.on_finished(finished)

    async def _report(
        self, delivery: Delivery, state: MailState, *, store: bool = True
    ) -> OutboxError | None:
        """Tell the status board, and store the change in the outbox (unless ``store=False``:
        a note on a waiting mail that a restart does not need).

        Returns the outbox's error when the change was not stored (None: stored, or nothing to
        store). ``SENDING`` is stored first and shown on the board only once stored.
        """
        known = self.board.get(delivery.message_id)
        if known is None or known.state.terminal:
            return None
        change = StatusChange(
            message_id=delivery.message_id,
            state=state,
            attempts=delivery.attempts,
            last_reply_code=delivery.last_reply_code,
            last_reply_text=delivery.last_reply,
            at_unix=self.wall_clock(),
            possible_duplicate=delivery.possible_duplicate,
        )
        first = state is MailState.SENDING  # no record, no send: the board waits for the store
        if not first:
            self.board.change(change)
        error = None
        if store:
            try:
                await self.outbox.record(change)
            except OutboxError as exc:
                # Not stored: after a restart this mail would be tried again (a possible
                # duplicate), and an attempt is not made (see NotStarted).
                log.error(
                    "cannot store the status of %s: %s",
                    delivery.message_id,
                    exc,
                    extra={"message_id": delivery.message_id},
                )
                error = exc
        if first and error is None:
            self.board.change(change)
        if state.terminal:
            self.board.forget(delivery.message_id)
        return error
