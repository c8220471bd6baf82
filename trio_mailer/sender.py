"""The sender task: takes mails off the queue and delivers them over one reused session.

Theory of operation
-------------------
One task, started in the service's nursery, owns at most one SMTP session at a time and handles
one mail at a time, so no session ever carries two transactions at once.

For each mail:

1. Make sure there is a session. Connecting waits first for ``ReconnectBackoff.delay_s(n)``
   where ``n`` counts consecutive failures (failed connects and sessions lost mid-send), so a
   relay that is down is tried with a growing pause instead of in a tight loop; the count goes
   back to zero once a mail is delivered or a probe succeeds.
2. Probe a session that has already carried a mail with NOOP: anything but 250 (a relay that
   dropped the idle session, or answers 421) means close it and connect again before sending.
   A session opened for this very mail is not probed.
3. Send. ``Delivered``: log it, done. ``Rejected`` (4xx/5xx to MAIL, RCPT, DATA or "."): log the
   reply with the Message-ID, report the mail as failed, and RSET the session (replace it when
   RSET fails) before it carries another mail. ``SessionLost``: the mail goes again on a new
   session, up to ``MAX_SEND_ATTEMPTS``; when the final "." had been sent the relay may already
   have taken it, so the retry is logged as a possible duplicate.

The queue's end (closed at shutdown) ends the loop after every queued mail was handled; the
session then says QUIT. Cancellation (shutdown past its grace period) leaves ``in_flight`` set
so the caller can report it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from .backoff import MAX_SEND_ATTEMPTS, ReconnectBackoff
from .message import OutgoingMail
from .smtp_session import ConnectFailed, Delivered, Rejected, SessionLost

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # how long closing a broken session may hold up the sender


class SmtpSession(Protocol):
    """What the sender needs of a session (the real one is ``ThreadedSmtpSession``)."""

    async def probe(self) -> bool: ...
    async def send(self, mail: OutgoingMail) -> Delivered | Rejected: ...
    async def reset(self) -> bool: ...
    async def close(self, *, quit: bool) -> None: ...


Connector = Callable[[], Awaitable[SmtpSession]]


@attrs.frozen
class SenderStatistics:
    delivered: int
    failed: int
    connects: int
    session_up: bool
    in_flight: str | None  # the Message-ID being sent, if any


@attrs.define
class Sender:
    connect: Connector
    backoff: ReconnectBackoff = attrs.field(factory=ReconnectBackoff)
    max_attempts: int = MAX_SEND_ATTEMPTS
    in_flight: OutgoingMail | None = None
    _session: SmtpSession | None = None
    _session_used: bool = False
    _failures: int = 0
    _delivered: int = 0
    _failed: int = 0
    _connects: int = 0

    def statistics(self) -> SenderStatistics:
        return SenderStatistics(
            delivered=self._delivered,
            failed=self._failed,
            connects=self._connects,
            session_up=self._session is not None,
            in_flight=self.in_flight.message_id if self.in_flight else None,
        )

    async def run(
        self,
        mails: trio.MemoryReceiveChannel[OutgoingMail],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Deliver every mail from ``mails`` until the channel ends, then QUIT."""
        task_status.started()
        try:
            async for mail in mails:
                self.in_flight = mail
                await self._deliver(mail)
                self.in_flight = None
            await self._drop_session(quit=True)
        finally:
            await self._drop_session(quit=False)

    async def _deliver(self, mail: OutgoingMail) -> None:
        attempts = 0
        while True:
            session = await self._open_session()
            if self._session_used:
                if not await session.probe():
                    log.info("session probe failed (NOOP not 250); reconnecting")
                    await self._drop_session(quit=False)
                    continue
                self._failures = 0
            self._session_used = True
            attempts += 1
            try:
                result = await session.send(mail)
            except SessionLost as lost:
                self._failures += 1
                await self._drop_session(quit=False)
                if attempts >= self.max_attempts:
                    self._report_failed(mail, attempts, f"session lost: {lost.reason}")
                    return
                log.warning(
                    "session lost while sending %s (attempt %d): %s; sending again on a new "
                    "session%s",
                    mail.message_id,
                    attempts,
                    lost.reason,
                    " (possible duplicate: the final '.' had been sent)"
                    if lost.after_data_end
                    else "",
                )
                continue
            if isinstance(result, Delivered):
                self._failures = 0
                self._delivered += 1
                log.info(
                    "delivered %s to the relay (attempts=%d, reply: %s)",
                    mail.message_id,
                    attempts,
                    result.reply,
                )
                return
            self._report_failed(mail, attempts, f"{result.command} rejected: {result.reply}")
            if not await session.reset():
                await self._drop_session(quit=False)
            return

    def _report_failed(self, mail: OutgoingMail, attempts: int, why: str) -> None:
        self._failed += 1
        log.error("failed %s (attempts=%d): %s", mail.message_id, attempts, why)

    async def _open_session(self) -> SmtpSession:
        while self._session is None:
            delay = self.backoff.delay_s(self._failures)
            if delay > 0:
                await trio.sleep(delay)
            try:
                self._session = await self.connect()
            except ConnectFailed as exc:
                self._failures += 1
                log.warning(
                    "relay unavailable: %s; next try in %.1fs",
                    exc.reason,
                    self.backoff.delay_s(self._failures),
                )
                continue
            self._connects += 1
            self._session_used = False
            log.info("SMTP session up (connect #%d)", self._connects)
        return self._session

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
