"""The sender task: takes mail from the queue and delivers it over one reused session.

Theory of operation
-------------------
A sender owns at most one SMTP session and handles one mail at a time, so no session ever
carries two transactions at once. For each mail that ``MailQueue.next_due()`` hands it:

1. A mail whose time to live has passed is reported failed without an attempt.
2. Get a usable session. Without one, connect, waiting first for the reconnect backoff
   (``ReconnectBackoff``: grows while sessions keep failing, jumps to the cap on a configuration
   error such as a refused password or certificate). Relay trouble is logged once per change of
   state, not once per try. If the mail's time to live would pass while waiting, it is reported
   failed at that moment.
3. A session that has already carried a mail and then sat idle for ``noop_idle_s`` or more is
   probed with NOOP first, in the same thread hop as the mail (``noop_idle_s=0``: before every
   mail, the origin's behaviour);
   anything but 250 (the relay dropped it while idle, or said 421) means replace it before
   sending. A busy session skips the probe: it costs a round trip per mail, and a session that
   broke anyway is caught by the send itself (the mail then goes again on a new session).
   A session that has carried ``max_messages`` mails or lived ``max_age_s`` is recycled: QUIT,
   and a new one for the next mail (many relays cap both).
4. Send, and let ``RetryPolicy`` decide what follows a failure: the mail is put back into the
   queue's retry heap (at once after a lost session, after a jittered backoff after a 4xx), or
   reported failed. After a rejected MAIL, RCPT, DATA or "." the session is reset with RSET, or
   replaced when RSET fails.

Every accepted mail ends in exactly one log line: ``delivered`` or ``failed``, with its
Message-ID, the number of attempts and the last reply, and ``on_finished`` is told. A mail whose
session broke after the final "." was sent may already be with the relay: it is sent again with
the same Message-ID and marked as a possible duplicate.

When the queue reports no more work (closed and drained at shutdown) the session says QUIT.
Cancellation (shutdown past its grace period) leaves ``in_flight`` set for the shutdown report.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from trio_mailer.core.config import default
from trio_mailer.core.errors import OutboxError
from trio_mailer.core.health_decision import SenderStatistics
from trio_mailer.core.mail_lifecycle import MailState, StatusChange
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.retry_policy import (
    TTL_REASON_PREFIX,
    AttemptResult,
    GiveUp,
    ReconnectBackoff,
    RetryPolicy,
)
from trio_mailer.delivery.mail_queue import Delivery, MailQueue
from trio_mailer.delivery.smtp_session import (
    ConnectFailed,
    Delivered,
    ProbeFailed,
    Rejected,
    SessionLost,
)
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # how long closing a broken session may hold up the sender


class SmtpSession(Protocol):
    """What the sender needs of a session (the real one is ``ThreadedSmtpSession``)."""

    async def send(self, mail: OutgoingMail, *, probe_first: bool = False) -> Delivered | Rejected:
        """Send ``mail``; with ``probe_first``, NOOP first (raising ``ProbeFailed`` if not 250)."""
        ...

    async def reset(self) -> bool: ...
    async def close(self, *, quit: bool) -> None: ...


Connector = Callable[[], Awaitable[SmtpSession]]


@attrs.frozen
class FinishedMail:
    """A mail's terminal outcome."""

    delivery: Delivery
    delivered: bool
    reason: str  # why it failed; "" when delivered

    @property
    def outcome(self) -> str:
        """ "delivered", "expired" (its time to live passed) or "failed"."""
        if self.delivered:
            return "delivered"
        return "expired" if self.reason.startswith(TTL_REASON_PREFIX) else "failed"


_STATES = {
    "delivered": MailState.DELIVERED,
    "failed": MailState.FAILED,
    "expired": MailState.EXPIRED,
}


def _ignore(_: FinishedMail) -> None:
    pass


@attrs.define
class Sender:
    connect: Connector
    policy: RetryPolicy = attrs.field(factory=RetryPolicy)
    backoff: ReconnectBackoff = attrs.field(factory=ReconnectBackoff)
    random: Callable[[], float] = random.random
    on_finished: Callable[[FinishedMail], None] = _ignore
    noop_idle_s: float = default("noop_idle_s")
    max_messages: int = default("session_max_messages")
    max_age_s: float = default("session_max_age_s")
    metrics: Metrics | None = None
    board: StatusBoard | None = None
    outbox: Outbox | None = None
    wall_clock: Callable[[], float] = time.time
    in_flight: Delivery | None = None
    _session: SmtpSession | None = None
    _session_used: bool = False
    _session_opened_at: float = 0.0
    _session_messages: int = 0
    _last_activity: float = 0.0
    _failures: int = 0
    _config_error: bool = False
    _relay_problem: str | None = None
    _down_since: float | None = None
    _delivered: int = 0
    _failed: int = 0
    _retries: int = 0
    _connects: int = 0

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(
            delivered=self._delivered,
            failed=self._failed,
            retries=self._retries,
            connects=self._connects,
            sessions_up=int(self._session is not None),
            in_flight=(self.in_flight.message_id,) if self.in_flight else (),
            relay_down_since_s=self._down_since,
            config_error=self._config_error and self._session is None,
        )

    async def run(
        self, queue: MailQueue, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver mail from ``queue`` until it has no more work, then QUIT."""
        task_status.started()
        try:
            while (delivery := await queue.next_due()) is not None:
                self.in_flight = delivery
                await self._attempt(queue, delivery)
                self.in_flight = None
            await self._drop_session(quit=True)
        finally:
            await self._drop_session(quit=False)

    async def _attempt(self, queue: MailQueue, delivery: Delivery) -> None:
        deadline = self.policy.deadline_s(delivery.accepted_at_s)
        if trio.current_time() >= deadline:
            await self._finish(
                queue, delivery, f"{TTL_REASON_PREFIX} ({self.policy.ttl_s:g}s) passed"
            )
            return
        attempts = delivery.attempts + 1
        while True:
            session = await self._usable_session(deadline)
            if session is None:
                await self._finish(
                    queue,
                    delivery,
                    f"{TTL_REASON_PREFIX} ({self.policy.ttl_s:g}s) passed while the relay was "
                    "unavailable",
                )
                return
            # NOOP only after the session sat idle; it rides in the same thread hop as the mail.
            probe = self._session_used and (
                trio.current_time() - self._last_activity >= self.noop_idle_s
            )
            self._session_used = True
            await self._report(attrs.evolve(delivery, attempts=attempts), MailState.SENDING)
            started = trio.current_time()
            outcome: Delivered | Rejected | SessionLost
            try:
                outcome = await session.send(delivery.mail, probe_first=probe)
                break
            except ProbeFailed:
                log.info("session probe failed (NOOP not 250); reconnecting")
                await self._drop_session(quit=False)
            except SessionLost as exc:
                outcome = exc
                break
        self._session_messages += 1
        self._last_activity = trio.current_time()
        if isinstance(outcome, SessionLost):
            lost = outcome
            if self.metrics is not None:
                self.metrics.reply(None)
            self._failures += 1
            await self._drop_session(quit=False)
            result = (
                AttemptResult.OUTCOME_UNKNOWN if lost.after_data_end else AttemptResult.SESSION_LOST
            )
            reply = f"session lost at {lost.reason}"
        else:
            if self.metrics is not None:
                self.metrics.send_latency.observe(self._last_activity - started)
                self.metrics.reply(outcome.reply.code)
            if isinstance(outcome, Delivered):
                self._failures = 0
                delivered = attrs.evolve(
                    delivery,
                    attempts=attempts,
                    last_reply=str(outcome.reply),
                    last_reply_code=outcome.reply.code,
                )
                await self._finish(queue, delivered, "")
                await self._recycle_if_due()
                return
            code = outcome.reply.code
            result = AttemptResult.TRANSIENT if 400 <= code < 500 else AttemptResult.PERMANENT
            reply = f"{outcome.command} rejected: {outcome.reply}"
            if not await session.reset():
                await self._drop_session(quit=False)

        delivery = attrs.evolve(
            delivery,
            attempts=attempts,
            last_reply=reply,
            last_reply_code=None if isinstance(outcome, SessionLost) else outcome.reply.code,
            possible_duplicate=delivery.possible_duplicate
            or result is AttemptResult.OUTCOME_UNKNOWN,
        )
        now = trio.current_time()
        decision = self.policy.after_failure(
            result,
            attempts=attempts,
            accepted_at_s=delivery.accepted_at_s,
            now_s=now,
            rand=self.random(),
        )
        if isinstance(decision, GiveUp):
            await self._finish(queue, delivery, decision.reason)
            return
        self._retries += 1
        if self.metrics is not None:
            self.metrics.retries.inc()
        log.warning(
            "retry %s in %.1fs: attempt %d failed (%s)%s",
            delivery.message_id,
            decision.at_s - now,
            attempts,
            reply,
            "; possible duplicate: the relay may already have it"
            if result is AttemptResult.OUTCOME_UNKNOWN
            else "",
            extra={"message_id": delivery.message_id},
        )
        await self._report(delivery, MailState.RETRY_WAIT)
        queue.retry_at(delivery, decision.at_s)

    async def _report(self, delivery: Delivery, state: MailState) -> None:
        """Tell the status board; store the changes a restart needs (retry, outcome)."""
        if self.board is None:
            return
        change = StatusChange(
            message_id=delivery.message_id,
            state=state,
            attempts=delivery.attempts,
            last_reply_code=delivery.last_reply_code,
            last_reply_text=delivery.last_reply,
            at_unix=self.wall_clock(),
            possible_duplicate=delivery.possible_duplicate,
        )
        if self.board.change(change) is None or self.outbox is None or state is MailState.SENDING:
            return
        try:
            await self.outbox.record(change)
        except OutboxError as exc:
            # Not stored: after a restart this mail would be tried again (a possible duplicate).
            log.error(
                "cannot store the status of %s: %s",
                delivery.message_id,
                exc,
                extra={"message_id": delivery.message_id},
            )
        if state.terminal:
            self.board.forget(delivery.message_id)

    async def _finish(self, queue: MailQueue, delivery: Delivery, failure: str) -> None:
        finished = FinishedMail(delivery, delivered=not failure, reason=failure)
        await self._report(delivery, _STATES[finished.outcome])
        queue.finish(delivery)
        if failure:
            self._failed += 1
            log.error(
                "failed %s (attempts=%d, last reply: %s): %s",
                delivery.message_id,
                delivery.attempts,
                delivery.last_reply or "none",
                failure,
                extra={"message_id": delivery.message_id},
            )
        else:
            self._delivered += 1
            log.info(
                "delivered %s (attempts=%d, reply: %s)%s",
                delivery.message_id,
                delivery.attempts,
                delivery.last_reply,
                " (possible duplicate)" if delivery.possible_duplicate else "",
                extra={"message_id": delivery.message_id},
            )
        if self.metrics is not None:
            self.metrics.mails.labels(finished.outcome).inc()
            if finished.delivered:
                self.metrics.delivery_latency.observe(trio.current_time() - delivery.accepted_at_s)
        self.on_finished(finished)

    async def _usable_session(self, deadline: float) -> SmtpSession | None:
        """A session ready for a mail, or None if ``deadline`` passed while waiting for one."""
        while True:
            if self._session is None and not await self._connect_before(deadline):
                return None
            session = self._session
            assert session is not None
            if (
                self._session_used
                and trio.current_time() - self._session_opened_at >= self.max_age_s
            ):
                await self._recycle_if_due()
                continue
            return session

    async def _recycle_if_due(self) -> None:
        """QUIT a session that reached its mail count or age; the next mail opens a new one."""
        age = trio.current_time() - self._session_opened_at
        if self._session_messages >= self.max_messages or age >= self.max_age_s:
            log.info(
                "recycling the SMTP session after %d mails and %.0fs", self._session_messages, age
            )
            await self._drop_session(quit=True)

    async def _connect_before(self, deadline: float) -> bool:
        while self._session is None:
            delay = self.backoff.delay_s(
                self._failures, self.random(), config_error=self._config_error
            )
            if delay > 0:
                if trio.current_time() + delay >= deadline:
                    await trio.sleep_until(deadline)
                    return False
                await trio.sleep(delay)
            try:
                self._session = await self.connect()
            except ConnectFailed as exc:
                if self.metrics is not None:
                    self.metrics.connects.labels("failed").inc()
                self._failures += 1
                self._config_error = exc.config_error
                if self._down_since is None:
                    self._down_since = trio.current_time()
                self._report_relay_problem(exc)
                continue
            self._connects += 1
            if self.metrics is not None:
                self.metrics.connects.labels("ok").inc()
            self._session_used = False
            self._down_since = None
            self._session_messages = 0
            self._session_opened_at = self._last_activity = trio.current_time()
            self._config_error = False
            if self._relay_problem is not None:
                log.info("relay reachable again (after %d failures)", self._failures)
                self._relay_problem = None
            log.info("SMTP session up (connect #%d)", self._connects)
        return True

    def _report_relay_problem(self, exc: ConnectFailed) -> None:
        """Log relay trouble once per change of state, not once per try."""
        if exc.reason == self._relay_problem:
            log.debug("relay still unavailable: %s", printable(exc.reason))
            return
        self._relay_problem = exc.reason
        if exc.config_error:
            log.error(
                "relay refuses our configuration: %s; retrying every %gs until it is fixed",
                printable(exc.reason),
                self.backoff.cap_s,
            )
        else:
            log.warning(
                "relay unavailable: %s; retrying with backoff (up to %gs)",
                printable(exc.reason),
                self.backoff.cap_s,
            )

    async def _drop_session(self, *, quit: bool) -> None:
        session = self._session
        if session is None:
            return
        if quit:
            # Cleared only once QUIT is done: if it is cancelled, the caller's ``finally``
            # still finds the session and closes it.
            await session.close(quit=True)
            self._session = None
            log.info("SMTP session closed (QUIT)")
            return
        self._session = None
        # Runs on the way out of a cancelled sender too: shielded so the socket is closed, and
        # bounded because the worker thread may still be finishing an abandoned call.
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            await session.close(quit=False)
