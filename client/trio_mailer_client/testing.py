"""``FakeMailer``: the ``Mailer`` API in-process, for the tests of services that send mail.

It records every mail it accepts (``fake.mails``), and behaves as the service does on the paths
a caller's code has to handle:

- it refuses exactly the requests the service refuses, with the same status and the same
  detail naming the field (``to: expected one address, got a list of 2``, ``code: ...``,
  ``template: unknown template ...``, ``vars.name: ...``, ``locale: ...``; RESOURCE_EXHAUSTED
  for a request over 4 KiB): ``tests/test_fake_mailer_rules.py`` in trio-mailer's repository
  holds the two to each other with random requests;
- it knows the shipped templates (``password`` and ``retrieve``, each requiring ``code``) and
  the ones you give it with their declared variables,
  ``FakeMailer(templates={"welcome": ["name"]})``, for ``send(to, template, vars)``;
- an idempotency key already accepted, with the same mail, answers the first reply and sends
  nothing; with a different one (another method, ``to``, template, variable or locale) it fails
  with FAILED_PRECONDITION naming ``idempotency_key``; a refused call does not use up its key;
- at most ``recipient_limit`` accepted mails per address (lower-cased) in
  ``recipient_window_s`` seconds; beyond it ``Refused("recipient rate limited",
  retry_after=...)`` saying when the next would be accepted (the service's default is 5 in
  600 s; ``recipient_limit=0`` turns it off). As in the service, the limit is looked at before
  the request is checked;
- ``refuse_next`` / ``fail_next`` script refusals (queue full) and failures (any gRPC status);
  UNAVAILABLE and DEADLINE_EXCEEDED are retried by the same rules and backoff as the real
  client, within the same ``timeout``;
- ``status``/``watch`` follow each mail, which stays QUEUED until the test moves it on with
  ``deliver``/``fail_delivery``.

Everything runs on Trio's clock (``trio.current_time``, ``trio.sleep``): under ``MockClock``
the rate-limit windows and the retry backoff pass as fast as the test likes. No threads.

Example (pytest-trio: ``autojump_clock`` is its fixture)::

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
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import trio

from trio_mailer_client import _rules
from trio_mailer_client._api import MailerApi, SendCall
from trio_mailer_client._policy import (
    DEFAULT_TIMEOUT_S,
    check_idempotency_key,
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
    """One mail the fake accepted: its template with the caller's variables.

    ``kind`` is the ``MailKind`` of the ``password`` and ``retrieve`` templates (None for
    others), ``code`` the ``code`` variable ("" without one).
    """

    to: str
    template: str
    vars: Mapping[str, str]
    locale: str  # as sent, "" for the service's default
    idempotency_key: str
    message_id: str

    @property
    def kind(self) -> MailKind | None:
        return next((kind for kind in MailKind if kind.value == self.template), None)

    @property
    def code(self) -> str:
        return self.vars.get("code", "")


@dataclass(slots=True)
class _Script:
    refusals: deque[tuple[str, float | None]] = field(default_factory=deque)
    failures: deque[tuple[str, str]] = field(default_factory=deque)


def _fingerprint(call: SendCall) -> tuple[object, ...]:
    """What tells a repeat from another mail under one key (the service's fingerprint)."""
    return (call.method, call.to, call.template, sorted(call.vars.items()), call.locale)


class FakeMailer(MailerApi):
    """An in-process stand-in for ``trio_mailer_client.Mailer`` (same methods, same results).

    Args:
        templates: your templates with the variables each declares, e.g.
            ``{"welcome": ["name"]}``; ``password`` and ``retrieve`` (requiring ``code``) are
            always there, as in the service.
        recipient_limit: accepted mails per address per window (0: no limit).
        recipient_window_s: the window, in seconds.
        jitter: the retry backoff's random source (default: ``random.random``).

    Raises:
        ValueError: a template name or declaration the service would refuse.
    """

    def __init__(
        self,
        *,
        templates: Mapping[str, Iterable[str]] | None = None,
        recipient_limit: int = DEFAULT_RECIPIENT_LIMIT,
        recipient_window_s: float = DEFAULT_RECIPIENT_WINDOW_S,
        jitter: random.Random | None = None,
    ) -> None:
        self.templates = _rules.declared_templates(templates or {})
        self.recipient_limit = recipient_limit
        self.recipient_window_s = recipient_window_s
        self.mails: list[SentMail] = []
        self.attempts = 0  # every attempt that reached the fake, retries included
        self._jitter = (jitter or random.Random()).random
        self._script = _Script()
        self._by_key: dict[str, tuple[tuple[object, ...], Accepted]] = {}
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

    async def _submit(self, call: SendCall, timeout: float) -> SendResult:
        too_large = _rules.too_large(call.request().ByteSize())

        async def attempt(_remaining_s: float) -> SendResult:
            await trio.lowlevel.checkpoint()
            self._attempt()
            if too_large is not None:
                raise MailerError("RESOURCE_EXHAUSTED", too_large)
            return self._accept(call)

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

    # ---- the service's rules, in its order -----------------------------------------------------

    def _attempt(self) -> None:
        self.attempts += 1
        if self._script.failures:
            code, details = self._script.failures.popleft()
            raise MailerError(code, details)

    def _accept(self, call: SendCall) -> SendResult:
        key = call.idempotency_key
        seen = self._by_key.get(key)
        if seen is not None:
            fingerprint, reply = seen
            if fingerprint != _fingerprint(call):
                raise MailerError("FAILED_PRECONDITION", _rules.KEY_CONFLICT)
            return reply
        now = trio.current_time()
        recent = self._accepted_at.setdefault(_rules.normalise_address(call.to), deque())
        while recent and recent[0] <= now - self.recipient_window_s:
            recent.popleft()
        if self.recipient_limit and len(recent) >= self.recipient_limit:
            retry_after = recent[0] + self.recipient_window_s - now
            return Refused(RECIPIENT_LIMITED_REASON, retry_after, idempotency_key=key)
        if self._script.refusals:
            reason, retry_after_s = self._script.refusals.popleft()
            return Refused(reason=reason, retry_after=retry_after_s, idempotency_key=key)
        problem = _rules.refusal(
            call.method, call.to, call.template, call.vars, call.locale, self.templates
        )
        if problem is not None:
            raise MailerError("INVALID_ARGUMENT", problem)
        recent.append(now)
        self._serial += 1
        message_id = f"<fake.{self._serial}@trio-mailer.invalid>"
        self.mails.append(
            SentMail(call.to, call.template, dict(call.vars), call.locale, key, message_id)
        )
        reply = Accepted(message_id=message_id, idempotency_key=key)
        self._by_key[key] = (_fingerprint(call), reply)
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
        return None if seen is None else seen[1].message_id

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
