"""One attempt at one mail: check its time to live, record the attempt, send, decide what follows.

Theory of operation
-------------------
``Attempt.make`` takes the mail a sender holds and returns how the attempt ends, a ``Settlement``
(``delivery/settlement.py`` applies it; the attempt never touches the queue):

1. A mail whose time to live has passed is expired without an attempt (also when the connect
   took past it: a mail is never sent late).
2. Without a session (the connect failed) the mail is given back, with the relay's trouble as
   its last reply.
3. The attempt is **stored as started** (``SENDING``, its attempt counted) before the relay hears
   DATA. **No record, no send**: when the outbox cannot store it, the mail is not sent now; it
   waits for the reconnect backoff, capped at ``UNSTORED_RETRY_MAX_S`` (the attempt not counted).
   When the outbox refuses it (``OutboxConflict``) it is not sent and leaves this sender.
4. Send, and let the policies decide what follows a failure (``core.retry_policy``; the session
   keeper applies ``core.session_policy``'s verdict on the session): another attempt after a
   jittered, capped backoff, until the time to live, or give up. A session that broke after the
   final "." may have delivered the mail: it goes again, flagged as a possible duplicate.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import trio
from opentelemetry.trace import Span

from trio_mailer import tracing
from trio_mailer.core.errors import OutboxConflict, OutboxError
from trio_mailer.core.retry_policy import (
    TTL_REASON_PREFIX,
    AttemptResult,
    GiveUp,
    ReconnectBackoff,
    RetryPolicy,
)
from trio_mailer.delivery.mail_queue import Delivery
from trio_mailer.delivery.session_keeper import SessionKeeper, SmtpSession
from trio_mailer.delivery.settlement import (
    FinishedMail,
    GivenBack,
    NotStarted,
    Refused,
    RetryLater,
    Settlement,
    Settler,
)
from trio_mailer.delivery.smtp_session import Delivered, SessionLost

RELAY_UNAVAILABLE_PREFIX = "relay unavailable"  # the last reply of a mail waiting for a session
# The longest a mail waits to try again when its attempt could not be stored: the database is
# usually back soon, and a login code must not sit out a long relay backoff after a blip.
UNSTORED_RETRY_MAX_S = 5.0


@attrs.define
class Attempt:
    """One sender's attempts, one mail at a time (see the module's docstring)."""

    keeper: SessionKeeper
    settler: Settler  # stores the attempt as started
    policy: RetryPolicy
    backoff: ReconnectBackoff  # paces attempts that could not be stored
    random: Callable[[], float]
    _unstored: int = attrs.field(init=False, default=0)  # attempts in a row not stored (not sent)

    async def make(self, delivery: Delivery) -> Settlement:
        """Attempt ``delivery`` once; how it ends (see the module's docstring)."""
        if (expired := self._expired(delivery)) is not None:
            return expired
        session = await self.keeper.session()
        if session is None:
            reason = f"{RELAY_UNAVAILABLE_PREFIX}: {self.keeper.relay_problem}"
            return GivenBack(delivery.replace(last_reply=reason, last_reply_code=None))
        if (expired := self._expired(delivery)) is not None:  # the connect took past it
            return expired
        attempted = delivery.replace(attempts=delivery.attempts + 1)
        # Stored before the relay hears DATA: a crash from here on is a possible duplicate.
        not_stored = await self.settler.record_started(attempted)
        if not_stored is not None:
            return self._not_started(delivery, not_stored)
        self._unstored = 0
        relay = self.keeper.relay_name
        if attempted.attempts == 1:  # from acceptance to the first attempt
            tracing.queue_wait(
                attempted.traceparent,
                trio.current_time() - attempted.accepted_at_s,
                **{"mailer.message_id": attempted.message_id},
            )
        with tracing.attempt_span(
            attempted.traceparent,
            **{
                "mailer.message_id": attempted.message_id,
                "mailer.relay": relay,
                "mailer.attempt": attempted.attempts,
            },
        ) as span:
            settlement = await self._send(session, attempted)
            _trace_outcome(span, settlement)
        return settlement

    def _expired(self, delivery: Delivery) -> FinishedMail | None:
        """Expired if its time to live has passed (it is never sent late)."""
        if trio.current_time() < self.policy.deadline_s(delivery.accepted_at_s):
            return None
        unavailable = delivery.last_reply.startswith(RELAY_UNAVAILABLE_PREFIX)
        reason = f"{TTL_REASON_PREFIX} ({self.policy.ttl_s:g}s) passed" + (
            " while the relay was unavailable" if unavailable else ""
        )
        return FinishedMail(delivery, delivered=False, reason=reason)

    def _not_started(self, delivery: Delivery, error: OutboxError) -> Settlement:
        if isinstance(error, OutboxConflict):
            return Refused(delivery, error.problem)
        self._unstored += 1
        delay = min(self.backoff.delay_s(self._unstored, self.random()), UNSTORED_RETRY_MAX_S)
        return NotStarted(delivery, delay)

    async def _send(self, session: SmtpSession, delivery: Delivery) -> Settlement:
        outcome = await self.keeper.send(session, delivery.mail)
        if isinstance(outcome, SessionLost):
            result = (
                AttemptResult.OUTCOME_UNKNOWN
                if outcome.after_data_end
                else AttemptResult.SESSION_LOST
            )
            return self._after_failure(delivery, result, f"session lost at {outcome.reason}", None)
        if isinstance(outcome, Delivered):
            delivered = delivery.replace(
                last_reply=str(outcome.reply), last_reply_code=outcome.reply.code
            )
            return FinishedMail(delivered, delivered=True, reason="", via=self.keeper.relay_name)
        result = await self.keeper.rejected(session, outcome)
        reply = f"{outcome.command} rejected: {outcome.reply}"
        return self._after_failure(delivery, result, reply, outcome.reply.code)

    def _after_failure(
        self, delivery: Delivery, result: AttemptResult, reply: str, code: int | None
    ) -> Settlement:
        """Another attempt later, or give up (``core.retry_policy`` decides)."""
        unknown = result is AttemptResult.OUTCOME_UNKNOWN
        delivery = delivery.replace(
            last_reply=reply,
            last_reply_code=code,
            possible_duplicate=delivery.possible_duplicate or unknown,
        )
        retry = self.policy.after_failure(
            result,
            attempts=delivery.attempts,
            accepted_at_s=delivery.accepted_at_s,
            now_s=trio.current_time(),
            rand=self.random(),
        )
        if isinstance(retry, GiveUp):
            return FinishedMail(delivery, delivered=False, reason=retry.reason)
        return RetryLater(delivery, retry.at_s, outcome_unknown=unknown)


def _trace_outcome(span: Span | None, settlement: Settlement) -> None:
    """The attempt's span gets how it ended: the reply code, a possible duplicate."""
    if span is None:
        return
    if isinstance(settlement, FinishedMail):
        outcome = "delivered" if settlement.delivered else "failed"
    else:
        outcome = "retry"
    delivery = settlement.delivery
    tracing.attempt_ended(
        span,
        outcome=outcome,
        reply_code=delivery.last_reply_code,
        possible_duplicate=delivery.possible_duplicate,
    )
