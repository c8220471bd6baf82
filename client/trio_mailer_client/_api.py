"""The methods ``Mailer`` and ``FakeMailer`` share word for word: the two kinds of mail, each a
``send`` of its own kind. Each class implements ``send``, ``status`` and ``watch``."""

from __future__ import annotations

from trio_mailer_client._policy import DEFAULT_TIMEOUT_S
from trio_mailer_client._types import MailKind, SendResult


class MailerApi:
    """``send_pass`` and ``send_retrieve``, on top of the subclass's ``send``."""

    async def send(
        self,
        kind: MailKind,
        to: str,
        code: str,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """``send_pass`` or ``send_retrieve``, by ``kind``."""
        raise NotImplementedError

    async def send_pass(
        self,
        to: str,
        code: str,
        *,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """Ask for the "password" mail carrying ``code`` to ``to``.

        Args:
            to: one address, "user@example.com".
            code: the code the mail carries.
            idempotency_key: the key of this logical send; None makes a fresh one. Every retry
                (this call's own, or yours with the same key) sends at most one mail.
            timeout: seconds for the whole call, retries included.

        Returns:
            ``Accepted`` (with the Message-ID) or ``Refused`` (with ``retry_after``).

        Raises:
            MailerError: any other status, e.g. INVALID_ARGUMENT naming the field,
                UNAUTHENTICATED, or UNAVAILABLE/DEADLINE_EXCEEDED when the time ran out.
            ValueError: ``idempotency_key`` is not 1 to 256 printable ASCII characters.
        """
        return await self.send(MailKind.PASSWORD, to, code, idempotency_key, timeout)

    async def send_retrieve(
        self,
        to: str,
        code: str,
        *,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """Ask for the "account retrieval" mail carrying ``code``; as ``send_pass``."""
        return await self.send(MailKind.RETRIEVE, to, code, idempotency_key, timeout)
