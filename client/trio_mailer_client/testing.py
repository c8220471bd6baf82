"""``FakeMailer``: the ``Mailer`` API in-process, for the tests of services that send mail.

It records every mail it accepts (``fake.mails``), and behaves as the service does on the paths
a caller's code has to handle:

- an idempotency key already accepted, with the same mail, answers the first reply and sends
  nothing; with a different ``to``, ``code`` or kind it fails with FAILED_PRECONDITION naming
  ``idempotency_key``; a refused call does not use up its key;
- at most ``recipient_limit`` accepted mails per address (domain lower-cased, local part compared
  case-insensitively) in ``recipient_window_s`` seconds; beyond it ``Refused("recipient rate
  limited", retry_after=...)`` saying when the next would be accepted (the service's default is
  5 in 600 s; ``recipient_limit=0`` turns it off);
- ``to`` must be one plain address (INVALID_ARGUMENT naming ``to`` otherwise), ``code`` must not
  be empty;
- ``refuse_next`` / ``fail_next`` script refusals (queue full) and failures (any gRPC status);
  UNAVAILABLE and DEADLINE_EXCEEDED are retried by the same rules and backoff as the real
  client, within the same ``timeout``;
- ``status``/``watch`` follow each mail, which stays QUEUED until the test moves it on with
  ``deliver``/``fail_delivery``.

Everything runs on Trio's clock (``trio.current_time``, ``trio.sleep``): under ``MockClock``
the rate-limit windows and the retry backoff pass as fast as the test likes. No threads.

Example (pytest-trio)::

    from trio_mailer_client.testing import FakeMailer

    async def test_reset_sends_a_code(autojump_clock):
        mailer = FakeMailer()
        await my_app.reset_password(mailer, "user@example.com")
        [mail] = mailer.mails
        assert mail.to == "user@example.com" and mail.kind is MailKind.PASSWORD
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import trio

from trio_mailer_client._api import MailerApi
from trio_mailer_client._policy import (
    DEFAULT_TIMEOUT_S,
    check_idempotency_key,
    new_idempotency_key,
    normalise_message_id,
)
from trio_mailer_client._retry import with_retries
from trio_mailer_client._types import (
    Accepted,
    MailerError,
    MailKind,
    MailState,
    MailStatus,
    Refused,
    SendResult,
)

__all__ = ["FakeMailer", "SentMail"]

QUEUE_FULL_REASON = "queue full"
RECIPIENT_LIMITED_REASON = "recipient rate limited"
DEFAULT_RECIPIENT_LIMIT = 5
DEFAULT_RECIPIENT_WINDOW_S = 600.0


@dataclass(frozen=True, slots=True)
class SentMail:
    """One mail the fake accepted."""

    to: str
    kind: MailKind
    code: str
    idempotency_key: str
    message_id: str


@dataclass(slots=True)
class _Script:
    refusals: deque[tuple[str, float | None]] = field(default_factory=deque)
    failures: deque[tuple[str, str]] = field(default_factory=deque)


def _normalise_address(address: str) -> str:
    local, _, domain = address.rpartition("@")
    return f"{local.casefold()}@{domain.lower()}"


def _check_to(to: str) -> None:
    if "," in to or ";" in to:
        raise MailerError(
            "INVALID_ARGUMENT", f"to: expected one address, got a list of {len(to.split(','))}"
        )
    local, at, domain = to.partition("@")
    if not at or not local or "." not in domain or any(c in to for c in " <>\r\n\t\"'"):
        raise MailerError(
            "INVALID_ARGUMENT", "to: expected one plain address like user@example.com"
        )


class FakeMailer(MailerApi):
    """An in-process stand-in for ``trio_mailer_client.Mailer`` (same methods, same results).

    Args:
        recipient_limit: accepted mails per address per window (0: no limit).
        recipient_window_s: the window, in seconds.
        jitter: the retry backoff's random source (default: ``random.random``).
    """

    def __init__(
        self,
        *,
        recipient_limit: int = DEFAULT_RECIPIENT_LIMIT,
        recipient_window_s: float = DEFAULT_RECIPIENT_WINDOW_S,
        jitter: random.Random | None = None,
    ) -> None:
        self.recipient_limit = recipient_limit
        self.recipient_window_s = recipient_window_s
        self.mails: list[SentMail] = []
        self.attempts = 0  # every attempt that reached the fake, retries included
        self._jitter = (jitter or random.Random()).random
        self._script = _Script()
        self._by_key: dict[str, tuple[SentMail, Accepted]] = {}
        self._accepted_at: dict[str, deque[float]] = {}
        self._statuses: dict[str, MailStatus] = {}
        self._changed = trio.lowlevel.ParkingLot()
        self._serial = 0

    # ---- scripting ---------------------------------------------------------------------------

    def refuse_next(
        self, count: int = 1, *, reason: str = QUEUE_FULL_REASON, retry_after: float | None = 1.0
    ) -> None:
        """Refuse the next ``count`` send attempts with ``reason`` (the key is not used up)."""
        self._script.refusals.extend([(reason, retry_after)] * count)

    def fail_next(self, count: int = 1, *, code: str = "UNAVAILABLE", details: str = "") -> None:
        """Fail the next ``count`` attempts (of any method) with the gRPC status ``code``."""
        self._script.failures.extend([(code, details or f"scripted {code}")] * count)

    def deliver(self, message_id: str) -> None:
        """Move a mail to DELIVERED (one attempt, 250), waking its watchers."""
        self._finish(message_id, MailState.DELIVERED, 250, "2.0.0 Ok: queued")

    def fail_delivery(self, message_id: str, reply_code: int = 550, text: str = "5.1.1") -> None:
        """Move a mail to FAILED with the relay's ``reply_code``, waking its watchers."""
        self._finish(message_id, MailState.FAILED, reply_code, text)

    # ---- the Mailer API ----------------------------------------------------------------------

    async def send(
        self,
        kind: MailKind,
        to: str,
        code: str,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """As ``Mailer.send``."""
        key = check_idempotency_key(
            new_idempotency_key() if idempotency_key is None else idempotency_key
        )

        async def attempt(_remaining_s: float) -> SendResult:
            await trio.lowlevel.checkpoint()
            self._attempt()
            return self._accept(kind, to, code, key)

        return await with_retries(attempt, timeout, jitter=self._jitter)

    async def status(
        self,
        message_id: str | None = None,
        *,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> MailStatus:
        """As ``Mailer.status``."""
        found = self._lookup(message_id, idempotency_key)

        async def attempt(_remaining_s: float) -> MailStatus:
            await trio.lowlevel.checkpoint()
            self._attempt()
            return self._status_of(found)

        return await with_retries(attempt, timeout, jitter=self._jitter)

    async def watch(
        self, message_id: str | None = None, *, idempotency_key: str | None = None
    ) -> AsyncIterator[MailStatus]:
        """As ``Mailer.watch``: the status now, then each change, until a terminal state."""
        found = self._lookup(message_id, idempotency_key)
        await trio.lowlevel.checkpoint()
        status = self._status_of(found)
        yield status
        while not status.state.terminal:
            await self._changed.park()
            latest = self._status_of(found)
            if latest != status:
                status = latest
                yield status

    # ---- the service's rules -----------------------------------------------------------------

    def _attempt(self) -> None:
        self.attempts += 1
        if self._script.failures:
            code, details = self._script.failures.popleft()
            raise MailerError(code, details)

    def _accept(self, kind: MailKind, to: str, code: str, key: str) -> SendResult:
        seen = self._by_key.get(key)
        if seen is not None:
            mail, reply = seen
            if (mail.kind, mail.to, mail.code) != (kind, to, code):
                raise MailerError(
                    "FAILED_PRECONDITION",
                    "idempotency_key: already used for a different mail",
                )
            return reply
        _check_to(to)
        if not code:
            raise MailerError("INVALID_ARGUMENT", "code: expected 1 or more characters, got 0")
        if self._script.refusals:
            reason, retry_after = self._script.refusals.popleft()
            return Refused(reason=reason, retry_after=retry_after, idempotency_key=key)
        now = trio.current_time()
        if self.recipient_limit:
            recent = self._accepted_at.setdefault(_normalise_address(to), deque())
            while recent and recent[0] <= now - self.recipient_window_s:
                recent.popleft()
            if len(recent) >= self.recipient_limit:
                retry_after = recent[0] + self.recipient_window_s - now
                return Refused(RECIPIENT_LIMITED_REASON, retry_after, idempotency_key=key)
            recent.append(now)
        self._serial += 1
        message_id = f"<fake.{self._serial}@trio-mailer.invalid>"
        mail = SentMail(to=to, kind=kind, code=code, idempotency_key=key, message_id=message_id)
        reply = Accepted(message_id=message_id, idempotency_key=key)
        self.mails.append(mail)
        self._by_key[key] = (mail, reply)
        self._statuses[message_id] = MailStatus(
            message_id=message_id,
            state=MailState.QUEUED,
            attempts=0,
            last_reply_code=0,
            last_reply_text="",
            accepted_at=datetime.now(UTC),
            last_attempt_at=None,
            finished_at=None,
            possible_duplicate=False,
        )
        return reply

    def _lookup(self, message_id: str | None, idempotency_key: str | None) -> str | None:
        """The message id asked for (None: an unknown key; NOT_FOUND at call time)."""
        if (message_id is None) == (idempotency_key is None):
            raise ValueError("give message_id or idempotency_key (one of them)")
        if message_id is not None:
            return normalise_message_id(message_id)
        seen = self._by_key.get(check_idempotency_key(idempotency_key or ""))
        return None if seen is None else seen[0].message_id

    def _status_of(self, message_id: str | None) -> MailStatus:
        status = None if message_id is None else self._statuses.get(message_id)
        if status is None:
            raise MailerError(
                "NOT_FOUND",
                "message_id: no such mail here (never accepted, or older than the retention)",
            )
        return status

    def _finish(self, message_id: str, state: MailState, reply_code: int, text: str) -> None:
        status = self._status_of(normalise_message_id(message_id))
        now = datetime.now(UTC)
        self._statuses[status.message_id] = replace(
            status,
            state=state,
            attempts=status.attempts + 1,
            last_reply_code=reply_code,
            last_reply_text=text,
            last_attempt_at=now,
            finished_at=now,
        )
        self._changed.unpark_all()
