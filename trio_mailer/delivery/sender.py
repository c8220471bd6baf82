"""The sender task: takes mail from the queue and delivers it over one reused session.

Theory of operation
-------------------
A sender owns at most one SMTP session and handles one mail at a time, so no session ever
carries two transactions at once. The decisions about the session (probe it, recycle it,
replace it after a reply) are ``core.session_policy``'s; those about the mail (retry when,
give up) are ``core.retry_policy``'s; the allowed status changes are ``core.mail_lifecycle``'s
table. For each mail that ``MailQueue.next_due()`` hands it:

1. A mail whose time to live has passed is reported expired without an attempt.
2. Get a usable session. Without one, connect once. **A sender that cannot connect gives the
   mail back** to the queue (due at once, for any sender that has a session: work stealing),
   then waits its reconnect backoff holding no mail (``ReconnectBackoff``: grows while connects
   keep failing, jumps to the cap on a configuration error such as a refused password, a
   certificate or a missing STARTTLS). The wait ends early at the given-back mail's time to
   live, so a mail nobody can send is reported expired on time. Relay trouble is logged once
   per change of state, and shown as the waiting mail's last reply in GetStatus.
3. A session that reached its cap (``max_messages`` attempts, delivered or not, or
   ``max_age_s``) is recycled with QUIT; one that carried a mail and then sat idle for
   ``noop_idle_s`` is probed with NOOP first, and replaced when the answer is not 250.
4. The attempt is **stored as started** (``SENDING``, its attempt counted) before the relay
   hears DATA, so a crash during DATA is known at the next start as a possible duplicate.
   **No record, no send**: when the outbox cannot store it, the mail is not sent now; it waits
   in the retry heap for the reconnect backoff, capped at ``UNSTORED_RETRY_MAX_S`` (the attempt
   not counted), and is tried again.
   When the outbox refuses it (``OutboxConflict``: the mail is finished, or, with PostgreSQL,
   another replica holds it since this one's lease lapsed) it is not sent and leaves this
   sender: whoever holds it sends it, so it goes out once (or flagged).
5. Send, and let the policies decide what follows a failure: a 4xx tied to the session (a cap,
   ``4.5.3``) replaces the session and the mail goes again at once; another 4xx puts the mail
   in the queue's retry heap after a jittered, capped backoff, until its time to live; a 5xx
   fails it. A lost session is replaced (with the reconnect backoff pacing a relay in trouble).

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
from trio_mailer.core.errors import OutboxConflict, OutboxError
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
from trio_mailer.core.session_policy import (
    SessionAction,
    after_rejection,
    should_probe,
    should_recycle,
)
from trio_mailer.delivery.mail_queue import Delivery, MailQueue
from trio_mailer.delivery.smtp_session import (
    ConnectFailed,
    Delivered,
    Rejected,
    SessionLost,
)
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics
from trio_mailer.store.outbox import Outbox
from trio_mailer.store.status_board import StatusBoard

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # how long closing a broken session may hold up the sender
RELAY_UNAVAILABLE_PREFIX = "relay unavailable"  # the last reply of a mail waiting for a session
# The longest a mail waits to try again when its attempt could not be stored: the database is
# usually back soon, and a login code must not sit out a long relay backoff after a blip.
UNSTORED_RETRY_MAX_S = 5.0


class SmtpSession(Protocol):
    """What the sender needs of a session (the real one is ``ThreadedSmtpSession``)."""

    async def send(self, mail: OutgoingMail) -> Delivered | Rejected:
        """Send ``mail`` (raising ``SessionLost`` when the session breaks)."""
        ...

    async def probe(self) -> bool:
        """NOOP; True when answered 250."""
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
    _unstored: int = 0  # attempts in a row that could not be stored as started (not sent)
    _retries: int = 0
    _connects: int = 0
    ever_connected: bool = False  # a session has succeeded since start-up
    start_after: trio.Event | None = None  # e.g. the start-up relay check's first outcome
    on_relay_closing: Callable[[str, str], None] | None = None  # (relay, reason) after a 421

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
        if self.start_after is not None:
            # One connection at a time at start-up: a relay that allows one per client must
            # not refuse the first mail's session because the relay check holds one.
            await self.start_after.wait()
        try:
            while (delivery := await queue.next_due()) is not None:
                self.in_flight = delivery
                await self._attempt(queue, delivery)
                self.in_flight = None
            await self._drop_session(quit=True)
        finally:
            await self._drop_session(quit=False)

    async def _expire_if_due(self, queue: MailQueue, delivery: Delivery) -> bool:
        """Report the mail expired if its time to live has passed (it is never sent late)."""
        if trio.current_time() < self.policy.deadline_s(delivery.accepted_at_s):
            return False
        unavailable = delivery.last_reply.startswith(RELAY_UNAVAILABLE_PREFIX)
        await self._finish(
            queue,
            delivery,
            f"{TTL_REASON_PREFIX} ({self.policy.ttl_s:g}s) passed"
            + (" while the relay was unavailable" if unavailable else ""),
        )
        return True

    async def _attempt(self, queue: MailQueue, delivery: Delivery) -> None:
        deadline = self.policy.deadline_s(delivery.accepted_at_s)
        if await self._expire_if_due(queue, delivery):
            return
        session = await self._usable_session()
        if session is None:
            await self._give_back(queue, delivery, deadline)
            return
        if await self._expire_if_due(queue, delivery):  # the connect took past its deadline
            await self._recycle_if_due()
            return
        attempts = delivery.attempts + 1
        # Stored before the relay hears DATA: a crash from here on is a possible duplicate.
        not_stored = await self._report(
            attrs.evolve(delivery, attempts=attempts), MailState.SENDING
        )
        if not_stored is not None:
            self._not_started(queue, delivery, not_stored)
            await self._recycle_if_due()
            return
        self._unstored = 0
        delivery = attrs.evolve(delivery, attempts=attempts)
        started = trio.current_time()
        session_attempts_before = self._session_messages
        self._session_messages += 1
        self._session_used = True
        outcome: Delivered | Rejected | SessionLost
        try:
            outcome = await session.send(delivery.mail)
        except SessionLost as exc:
            outcome = exc
        self._last_activity = trio.current_time()
        last_reply_code: int | None = None
        if isinstance(outcome, SessionLost):
            if self.metrics is not None:
                self.metrics.reply(None)
            if outcome.closing and self.on_relay_closing is not None and self.relay_name:
                self.on_relay_closing(self.relay_name, outcome.reason)
            self._failures += 1
            await self._drop_session(quit=False)
            result = (
                AttemptResult.OUTCOME_UNKNOWN
                if outcome.after_data_end
                else AttemptResult.SESSION_LOST
            )
            reply = f"session lost at {outcome.reason}"
        else:
            if self.metrics is not None:
                self.metrics.send_latency.observe(self._last_activity - started)
                self.metrics.reply(outcome.reply.code)
            if isinstance(outcome, Delivered):
                self._failures = 0
                delivered = attrs.evolve(
                    delivery,
                    last_reply=str(outcome.reply),
                    last_reply_code=outcome.reply.code,
                )
                await self._finish(queue, delivered, "")
                await self._recycle_if_due()
                return
            last_reply_code = outcome.reply.code
            decision = after_rejection(
                outcome.command,
                outcome.reply.code,
                outcome.reply.text,
                session_attempts_before=session_attempts_before,
            )
            result = decision.result
            reply = f"{outcome.command} rejected: {outcome.reply}"
            if decision.session is SessionAction.REPLACE:
                log.info(
                    "replacing the SMTP session: the relay ties %s to the session", outcome.reply
                )
                await self._drop_session(quit=True)
            elif not await session.reset():
                await self._drop_session(quit=False)

        delivery = attrs.evolve(
            delivery,
            last_reply=reply,
            last_reply_code=last_reply_code,
            possible_duplicate=delivery.possible_duplicate
            or result is AttemptResult.OUTCOME_UNKNOWN,
        )
        now = trio.current_time()
        retry = self.policy.after_failure(
            result,
            attempts=attempts,
            accepted_at_s=delivery.accepted_at_s,
            now_s=now,
            rand=self.random(),
        )
        if isinstance(retry, GiveUp):
            await self._finish(queue, delivery, retry.reason)
            await self._recycle_if_due()
            return
        self._retries += 1
        if self.metrics is not None:
            self.metrics.retries.inc()
        log.warning(
            "retry %s in %.1fs: attempt %d failed (%s)%s",
            delivery.message_id,
            retry.at_s - now,
            attempts,
            reply,
            "; possible duplicate: the relay may already have it"
            if result is AttemptResult.OUTCOME_UNKNOWN
            else "",
            extra={"message_id": delivery.message_id},
        )
        await self._report(delivery, MailState.RETRY_WAIT)
        queue.retry_at(delivery, retry.at_s)
        await self._recycle_if_due()

    def _not_started(self, queue: MailQueue, delivery: Delivery, error: OutboxError) -> None:
        """The attempt could not be stored as started, so nothing was sent (see step 4)."""
        if isinstance(error, OutboxConflict):
            log.warning(
                "not sending %s: the outbox refuses the attempt (%s)",
                delivery.message_id,
                error.problem,
                extra={"message_id": delivery.message_id},
            )
            if self.board is not None:
                self.board.forget(delivery.message_id)  # the outbox answers for it
            queue.finish(delivery)
            return
        self._unstored += 1
        delay = min(self.backoff.delay_s(self._unstored, self.random()), UNSTORED_RETRY_MAX_S)
        log.warning(
            "not sending %s now: its attempt could not be stored; again in %.1fs",
            delivery.message_id,
            delay,
            extra={"message_id": delivery.message_id},
        )
        queue.retry_at(delivery, trio.current_time() + delay)

    async def _give_back(self, queue: MailQueue, delivery: Delivery, deadline: float) -> None:
        """No session: hand the mail to any sender that has one, then wait out the backoff.

        The wait ends early at the mail's time to live, so that a mail no sender can deliver is
        reported expired when its time comes (by whichever sender takes it next).
        """
        reason = f"{RELAY_UNAVAILABLE_PREFIX}: {self._relay_problem or 'no session'}"
        delivery = attrs.evolve(delivery, last_reply=reason, last_reply_code=None)
        # Not a new attempt: the board shows why the mail waits (GetStatus gives the reason).
        waiting = MailState.RETRY_WAIT if delivery.attempts else MailState.QUEUED
        await self._report(delivery, waiting, store=False)
        queue.retry_at(delivery, trio.current_time())
        self.in_flight = None
        delay = self.backoff.delay_s(self._failures, self.random(), config_error=self._config_error)
        await trio.sleep_until(min(trio.current_time() + delay, deadline))

    async def _report(
        self, delivery: Delivery, state: MailState, *, store: bool = True
    ) -> OutboxError | None:
        """Tell the status board, and store the change in the outbox (unless ``store=False``:
        a note on a waiting mail that a restart does not need).

        Returns the outbox's error when the change was not stored (None: stored, or nothing to
        store). ``SENDING`` is stored first and shown on the board only once stored.
        """
        if self.board is None:
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
        known = self.board.get(delivery.message_id)
        if known is None or known.state.terminal:
            return None
        first = state is MailState.SENDING  # no record, no send: the board waits for the store
        if not first:
            self.board.change(change)
        error = None
        if self.outbox is not None and store:
            try:
                await self.outbox.record(change)
            except OutboxError as exc:
                # Not stored: after a restart this mail would be tried again (a possible
                # duplicate), and an attempt is not made (see step 4).
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
                "delivered %s (attempts=%d, reply: %s)%s via %s",
                delivery.message_id,
                delivery.attempts,
                delivery.last_reply,
                " (possible duplicate)" if delivery.possible_duplicate else "",
                self.relay_name or "the relay",
                extra={"message_id": delivery.message_id},
            )
        if self.metrics is not None:
            self.metrics.mails.labels(finished.outcome).inc()
            if finished.delivered:
                self.metrics.delivery_latency.observe(trio.current_time() - delivery.accepted_at_s)
                self.metrics.delivered_via(self.relay_name)
        self.on_finished(finished)

    @property
    def relay_name(self) -> str:
        """The relay the current session goes to ("" when unknown)."""
        relay = getattr(self._session, "relay", "")
        return relay if isinstance(relay, str) else ""

    async def _usable_session(self) -> SmtpSession | None:
        """A session ready for a mail, or None when no connect succeeded (one try)."""
        while True:
            if self._session is None and not await self._connect_once():
                return None
            session = self._session
            assert session is not None
            now = trio.current_time()
            if self._session_used and should_recycle(
                attempts=self._session_messages,
                age_s=now - self._session_opened_at,
                max_messages=self.max_messages,
                max_age_s=self.max_age_s,
            ):
                await self._recycle_if_due()
                continue
            if should_probe(
                used=self._session_used,
                idle_s=now - self._last_activity,
                noop_idle_s=self.noop_idle_s,
            ):
                if not await session.probe():
                    log.info("session probe failed (NOOP not 250); reconnecting")
                    await self._drop_session(quit=False)
                    continue
                self._last_activity = trio.current_time()
            return session

    async def _recycle_if_due(self) -> None:
        """QUIT a session that reached its attempt count or age; the next mail opens a new one."""
        if self._session is None:
            return
        age = trio.current_time() - self._session_opened_at
        if should_recycle(
            attempts=self._session_messages,
            age_s=age,
            max_messages=self.max_messages,
            max_age_s=self.max_age_s,
        ):
            log.info(
                "recycling the SMTP session after %d attempts and %.0fs",
                self._session_messages,
                age,
            )
            await self._drop_session(quit=True)

    async def _connect_once(self) -> bool:
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
            return False
        self._connects += 1
        if self.metrics is not None:
            self.metrics.connects.labels("ok").inc()
        self._session_used = False
        self._down_since = None
        self._session_messages = 0
        self._session_opened_at = self._last_activity = trio.current_time()
        self._config_error = False
        self.ever_connected = True
        if self._relay_problem is not None:
            log.info("relay reachable again (after %d failures)", self._failures)
            self._relay_problem = None
        log.info(
            "SMTP session up to %s (connect #%d)", self.relay_name or "the relay", self._connects
        )
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
