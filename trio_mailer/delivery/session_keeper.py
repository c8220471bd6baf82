"""A sender's one SMTP session: connect, probe, recycle, replace, and the reconnect backoff.

Theory of operation
-------------------
A ``SessionKeeper`` holds at most one session, for one sender, which carries one mail at a time,
so no session ever carries two transactions at once. What to do with the session is
``core.session_policy``'s decision; the keeper does what it answers:

- ``session()``, before a mail: without a session, connect once (``None``: the connect failed).
  A session that reached its cap (``max_messages`` attempts, delivered or not, or ``max_age_s``)
  is recycled with QUIT; one that carried a mail and then sat idle for ``noop_idle_s`` is probed
  with NOOP first, and replaced when the answer is not 250.
- ``send()`` sends on it and counts the attempt against the cap. A lost session is closed (and,
  after a 421, the relay chain hears of it); ``rejected()`` replaces the session when the relay
  ties the reply to it (a cap, ``4.5.3``), else resets it with RSET (replaced if RSET fails).
- ``recycle_if_due()`` after each mail; ``wait_to_reconnect()`` after a failed connect: the
  reconnect backoff (``ReconnectBackoff``: grows while connects keep failing, jumps to the cap on
  a configuration error such as a refused password, a certificate or a missing STARTTLS), cut
  short at the given time (the given-back mail's time to live).

Relay trouble is logged once per change of state, not once per try. ``close(quit=True)`` says
QUIT when the queue has no more work; ``close(quit=False)``, on the way out of a cancelled
sender, closes the socket (shielded and bounded).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

import attrs
import trio

from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.retry_policy import AttemptResult, ReconnectBackoff
from trio_mailer.core.session_policy import (
    SessionAction,
    after_rejection,
    should_probe,
    should_recycle,
)
from trio_mailer.delivery.smtp_session import ConnectFailed, Delivered, Rejected, SessionLost
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 2.0  # how long closing a broken session may hold up the sender


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


@attrs.define
class SessionKeeper:
    """One sender's session and what is known of the relay (see the module's docstring)."""

    connect: Connector
    backoff: ReconnectBackoff
    metrics: Metrics
    random: Callable[[], float]
    on_relay_closing: Callable[[str, str], None]  # (relay, reason) after a 421
    noop_idle_s: float
    max_messages: int
    max_age_s: float
    connects: int = attrs.field(init=False, default=0)
    ever_connected: bool = attrs.field(init=False, default=False)  # since start-up
    down_since: float | None = attrs.field(init=False, default=None)  # trio time
    _session: SmtpSession | None = attrs.field(init=False, default=None)
    _used: bool = attrs.field(init=False, default=False)
    _opened_at: float = attrs.field(init=False, default=0.0)
    _attempts: int = attrs.field(init=False, default=0)  # carried by this session
    _last_activity: float = attrs.field(init=False, default=0.0)
    _failures: int = attrs.field(init=False, default=0)  # connects or sessions lost in a row
    _config_error: bool = attrs.field(init=False, default=False)
    _relay_problem: str | None = attrs.field(init=False, default=None)

    @property
    def sessions_up(self) -> int:
        return int(self._session is not None)

    @property
    def config_error(self) -> bool:
        """The last connect failed on our configuration, and no session is up."""
        return self._config_error and self._session is None

    @property
    def relay_problem(self) -> str:
        """Why there is no session (for a waiting mail's last reply)."""
        return self._relay_problem or "no session"

    @property
    def relay_name(self) -> str:
        """The relay the current session goes to ("" when unknown)."""
        relay = getattr(self._session, "relay", "")
        return relay if isinstance(relay, str) else ""

    async def session(self) -> SmtpSession | None:
        """A session ready for a mail, or None when no connect succeeded (one try)."""
        while True:
            if self._session is None and not await self._connect_once():
                return None
            session = self._session
            assert session is not None
            now = trio.current_time()
            if self._used and should_recycle(
                attempts=self._attempts,
                age_s=now - self._opened_at,
                max_messages=self.max_messages,
                max_age_s=self.max_age_s,
            ):
                await self.recycle_if_due()
                continue
            if should_probe(
                used=self._used,
                idle_s=now - self._last_activity,
                noop_idle_s=self.noop_idle_s,
            ):
                if not await session.probe():
                    log.info("session probe failed (NOOP not 250); reconnecting")
                    await self.close(quit=False)
                    continue
                self._last_activity = trio.current_time()
            return session

    async def send(
        self, session: SmtpSession, mail: OutgoingMail
    ) -> Delivered | Rejected | SessionLost:
        """Send ``mail`` on ``session`` (counted against its cap); a lost session is closed."""
        self._attempts += 1
        self._used = True
        started = trio.current_time()
        relay = self.relay_name
        try:
            outcome = await session.send(mail)
        except SessionLost as lost:
            self._last_activity = trio.current_time()
            self.metrics.reply(None)
            self.metrics.attempt(relay, None, self._last_activity - started)
            if lost.closing and self.relay_name:
                self.on_relay_closing(self.relay_name, lost.reason)
            self._failures += 1
            await self.close(quit=False)
            return lost
        self._last_activity = trio.current_time()
        self.metrics.send_latency.observe(self._last_activity - started)
        self.metrics.reply(outcome.reply.code)
        self.metrics.attempt(relay, outcome.reply.code, self._last_activity - started)
        if isinstance(outcome, Delivered):
            self._failures = 0
        return outcome

    async def rejected(self, session: SmtpSession, rejected: Rejected) -> AttemptResult:
        """What ``rejected`` means for the mail; the session is replaced or reset as it says."""
        decision = after_rejection(
            rejected.command,
            rejected.reply.code,
            rejected.reply.text,
            session_attempts_before=self._attempts - 1,  # the ones before this attempt
        )
        if decision.session is SessionAction.REPLACE:
            log.info("replacing the SMTP session: the relay ties %s to the session", rejected.reply)
            await self.close(quit=True)
        elif not await session.reset():
            await self.close(quit=False)
        return decision.result

    async def recycle_if_due(self) -> None:
        """QUIT a session that reached its attempt count or age; the next mail opens a new one."""
        if self._session is None:
            return
        age = trio.current_time() - self._opened_at
        if should_recycle(
            attempts=self._attempts,
            age_s=age,
            max_messages=self.max_messages,
            max_age_s=self.max_age_s,
        ):
            log.info("recycling the SMTP session after %d attempts and %.0fs", self._attempts, age)
            await self.close(quit=True)

    async def wait_to_reconnect(self, *, until_s: float) -> None:
        """Wait out the reconnect backoff after a failed connect, or until ``until_s``."""
        delay = self.backoff.delay_s(self._failures, self.random(), config_error=self._config_error)
        await trio.sleep_until(min(trio.current_time() + delay, until_s))

    async def _connect_once(self) -> bool:
        try:
            self._session = await self.connect()
        except ConnectFailed as exc:
            self.metrics.connects.labels("failed").inc()
            self._failures += 1
            self._config_error = exc.config_error
            if self.down_since is None:
                self.down_since = trio.current_time()
            self._report_relay_problem(exc)
            return False
        self.connects += 1
        self.metrics.connects.labels("ok").inc()
        self._used = False
        self.down_since = None
        self._attempts = 0
        self._opened_at = self._last_activity = trio.current_time()
        self._config_error = False
        self.ever_connected = True
        if self._relay_problem is not None:
            log.info("relay reachable again (after %d failures)", self._failures)
            self._relay_problem = None
        log.info(
            "SMTP session up to %s (connect #%d)", self.relay_name or "the relay", self.connects
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

    async def close(self, *, quit: bool) -> None:
        """End the session: with QUIT, or (``quit=False``) just close the socket."""
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
