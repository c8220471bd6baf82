"""The methods ``Mailer`` and ``FakeMailer`` share word for word: ``send`` (any template),
``send_pass`` and ``send_retrieve``, each turned into one ``SendCall`` that the class submits.
Each class implements ``_submit``, ``status`` and ``watch``."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trio_mailer_client._generated import mailer_pb2
from trio_mailer_client._policy import (
    DEFAULT_TIMEOUT_S,
    check_idempotency_key,
    new_idempotency_key,
)
from trio_mailer_client._types import MailKind, SendResult


@dataclass(frozen=True, slots=True)
class SendCall:
    """One logical send as the service receives it: the gRPC method and the request's fields.

    ``SendPass``/``SendRetrieve`` carry ``vars == {"code": code}`` and their template's name.
    """

    method: str  # "Send", "SendPass" or "SendRetrieve"
    to: str
    template: str
    vars: Mapping[str, str]
    locale: str  # "" for the service's default
    idempotency_key: str

    def request(self) -> Any:
        """The request message of ``method`` (``MsgRequest`` or ``SendRequest``)."""
        if self.method == "Send":
            return mailer_pb2.SendRequest(
                to=self.to,
                template=self.template,
                vars=dict(self.vars),
                locale=self.locale,
                idempotency_key=self.idempotency_key,
            )
        return mailer_pb2.MsgRequest(
            to=self.to,
            code=self.vars["code"],
            locale=self.locale,
            idempotency_key=self.idempotency_key,
        )


_CODE_METHODS = {MailKind.PASSWORD: "SendPass", MailKind.RETRIEVE: "SendRetrieve"}


def _call(
    method: str,
    to: str,
    template: str,
    variables: Mapping[str, str],
    locale: str | None,
    idempotency_key: str | None,
) -> SendCall:
    key = new_idempotency_key() if idempotency_key is None else idempotency_key
    return SendCall(method, to, template, dict(variables), locale or "", check_idempotency_key(key))


class MailerApi:
    """``send``, ``send_pass`` and ``send_retrieve``, on top of the subclass's ``_submit``."""

    async def _submit(self, call: SendCall, timeout: float) -> SendResult:
        """Make ``call``, retried within ``timeout`` seconds."""
        raise NotImplementedError

    async def send(
        self,
        to: str,
        template: str,
        vars: Mapping[str, str],
        *,
        locale: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """Ask for the mail of ``template`` with its variables (the service's ``Send`` call).

        Args:
            to: one address, "user@example.com".
            template: the template's name, e.g. "password" or one of your own, "welcome".
            vars: exactly the variables the template declares (``{# requires: ... #}``),
                e.g. ``{"code": "123456"}``; the service adds ``to`` and ``service_name``.
            locale: the mail's language ("ru", "pt-BR"); None for the service's default. An
                unknown but well-formed one falls back, as the service's templates do.
            idempotency_key: the key of this logical send; None makes a fresh one. Every retry
                (this call's own, or yours with the same key) sends at most one mail.
            timeout: seconds for the whole call, retries included.

        Returns:
            ``Accepted`` (with the Message-ID) or ``Refused`` (with ``retry_after``).

        Raises:
            MailerError: any other status, e.g. INVALID_ARGUMENT naming the field
                (``template``, ``vars.<name>``, ``to``, ``locale``), UNAUTHENTICATED, or
                UNAVAILABLE/DEADLINE_EXCEEDED when the time ran out.
            ValueError: ``idempotency_key`` is not 1 to 256 printable ASCII characters.
        """
        call = _call("Send", to, template, vars, locale, idempotency_key)
        return await self._submit(call, timeout)

    async def send_pass(
        self,
        to: str,
        code: str,
        *,
        locale: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """Ask for the "password" mail carrying ``code`` to ``to`` (``SendPass``); the
        arguments, result and errors as ``send``."""
        return await self._send_code(MailKind.PASSWORD, to, code, locale, idempotency_key, timeout)

    async def send_retrieve(
        self,
        to: str,
        code: str,
        *,
        locale: str | None = None,
        idempotency_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> SendResult:
        """Ask for the "account retrieval" mail carrying ``code`` (``SendRetrieve``); as
        ``send_pass``."""
        return await self._send_code(MailKind.RETRIEVE, to, code, locale, idempotency_key, timeout)

    async def _send_code(
        self,
        kind: MailKind,
        to: str,
        code: str,
        locale: str | None,
        idempotency_key: str | None,
        timeout: float,
    ) -> SendResult:
        call = _call(_CODE_METHODS[kind], to, kind.value, {"code": code}, locale, idempotency_key)
        return await self._submit(call, timeout)
