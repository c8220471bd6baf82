"""The ``trio_mailer.v1.Mailer`` gRPC handlers: decode, call a use case, encode.

The work is in the use cases (``trio_mailer/service/``): ``AcceptMail`` for the three sends,
``MailStatusLookup`` for GetStatus and WatchStatus. A handler turns the request message and
purerpc's call (metadata, deadline) into the use case's input, and its answer into the reply
message. Errors become gRPC statuses through ``grpc.statuses.rpc_error``: a core error maps to
its own status with its message, an outbox error to its status with a generic message.

Deadlines: a call's deadline (the one the gRPC front keeps for it, else its ``grpc-timeout``)
bounds the work before its mail is stored; see ``AcceptMail``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import trio
from google.protobuf.timestamp_pb2 import Timestamp

from trio_mailer.core.errors import MailerError, OutboxError
from trio_mailer.core.grpc_deadline import deadline_s, timeout_s
from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.core.message import OutgoingMail
from trio_mailer.core.rate_limits import retry_after_ms
from trio_mailer.core.rendering import MailKind
from trio_mailer.grpc.statuses import rpc_error
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics
from trio_mailer.service.accept_mail import Accepted, AcceptMail, Answer, SendOrder
from trio_mailer.service.mail_status import MailStatusLookup
from trio_mailer.v1.mailer_grpc import MailerServicer
from trio_mailer.v1.mailer_pb2 import (
    MailStatus,
    MsgReply,
    MsgRequest,
    SendRequest,
    StatusRequest,
)

log = logging.getLogger(__name__)

_METHODS = {MailKind.PASSWORD: "SendPass", MailKind.RETRIEVE: "SendRetrieve"}
_TEMPLATE_IN_LOG_CHARS = 64  # a caller's template name, in a log line, is cut to this
ANONYMOUS_CALLER = "anonymous"  # every unauthenticated caller: one idempotency space

# Who is calling, from the call's request headers (and the connection): see app.caller_identity.
Identify = Callable[[Sequence[tuple[str, str]]], str]


def _metadata(request: Any) -> Sequence[tuple[str, str]]:
    return tuple(getattr(request, "custom_metadata", None) or ())


class MailerService(MailerServicer):  # type: ignore[misc]  # generated, untyped base
    """The Mailer's handlers over the use cases (every part required)."""

    def __init__(
        self,
        accept: AcceptMail,
        status: MailStatusLookup,
        identify: Identify,
        metrics: Metrics,
    ) -> None:
        self.accept = accept
        self.status = status
        self._identify = identify
        self._metrics = metrics

    async def Send(self, message: SendRequest, request: Any = None) -> MsgReply:
        composer = self.accept.composer

        def compose(now: datetime) -> OutgoingMail:
            return composer.compose_template(
                message.template, message.to, dict(message.vars), now, locale=message.locale
            )

        fields = (
            ("template", message.template),
            ("to", message.to),
            ("locale", message.locale),
            *sorted(message.vars.items()),
        )
        kind = printable(message.template[:_TEMPLATE_IN_LOG_CHARS])
        return await self._send("Send", kind, message, fields, compose, request)

    async def SendPass(self, message: MsgRequest, request: Any = None) -> MsgReply:
        return await self._submit_code(MailKind.PASSWORD, message, request)

    async def SendRetrieve(self, message: MsgRequest, request: Any = None) -> MsgReply:
        return await self._submit_code(MailKind.RETRIEVE, message, request)

    async def _submit_code(self, kind: MailKind, message: MsgRequest, request: Any) -> MsgReply:
        composer = self.accept.composer

        def compose(now: datetime) -> OutgoingMail:
            return composer.compose(kind, message.to, message.code, now, locale=message.locale)

        fields = (("to", message.to), ("code", message.code), ("locale", message.locale))
        return await self._send(_METHODS[kind], kind.value, message, fields, compose, request)

    async def _send(
        self,
        method: str,
        kind: str,
        message: MsgRequest | SendRequest,
        fields: tuple[tuple[str, str], ...],
        compose: Callable[[datetime], OutgoingMail],
        request: Any,
    ) -> MsgReply:
        order = SendOrder(
            method,
            kind,
            message.to,
            message.idempotency_key,
            fields,
            compose,
            self._identify(_metadata(request)),
            _deadline(request),
        )
        with self._accept_latency():
            try:
                answer = await self.accept(order)
            except OutboxError as exc:  # logged by the use case
                raise rpc_error(exc, "cannot store the mail right now; try again later") from None
            except MailerError as exc:
                raise rpc_error(exc) from None
        return _reply(answer)

    async def GetStatus(self, message: StatusRequest, request: Any = None) -> MailStatus:
        try:
            record = await self.status.find(await self._status_id(message, request))
        except OutboxError as exc:
            log.error("cannot read the outbox: %s", exc)
            raise rpc_error(exc, "status unavailable") from None
        except MailerError as exc:
            raise rpc_error(exc) from None
        return _status_message(record)

    async def WatchStatus(
        self, message: StatusRequest, request: Any = None
    ) -> AsyncIterator[MailStatus]:
        """The current status, then each change, ending after a terminal state."""
        try:
            message_id = await self._status_id(message, request)
            async for record in self.status.watch(message_id):
                yield _status_message(record)
        except OutboxError as exc:
            log.error("cannot read the outbox: %s", exc)
            raise rpc_error(exc, "status unavailable") from None
        except MailerError as exc:
            raise rpc_error(exc) from None

    async def _status_id(self, message: StatusRequest, request: Any) -> str:
        caller = self._identify(_metadata(request)) if message.idempotency_key else ""
        return await self.status.message_id(
            caller, str(message.message_id), str(message.idempotency_key)
        )

    @contextmanager
    def _accept_latency(self) -> Iterator[None]:
        """The accept latency of a send (the front counts every call by its status code)."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self._metrics.accept_latency.observe(time.perf_counter() - started)


def _reply(answer: Answer) -> MsgReply:
    if isinstance(answer, Accepted):
        return MsgReply(sent=True, message_id=answer.message_id)
    return MsgReply(
        sent=False, reason=answer.reason, retry_after_ms=retry_after_ms(answer.retry_after_s)
    )


def _deadline(request: Any) -> float:
    """The call's deadline on the trio clock (inf: none): the one the gRPC front keeps for
    the call, else one from its ``grpc-timeout``."""
    kept = getattr(request, "deadline_s", None)
    if kept is not None:
        return float(kept)
    return deadline_s(trio.current_time(), timeout_s(getattr(request, "timeout", None)))


_STATE_NUMBERS = {
    MailState.QUEUED: MailStatus.QUEUED,
    MailState.SENDING: MailStatus.SENDING,
    MailState.RETRY_WAIT: MailStatus.RETRY_WAIT,
    MailState.DELIVERED: MailStatus.DELIVERED,
    MailState.FAILED: MailStatus.FAILED,
    MailState.EXPIRED: MailStatus.EXPIRED,
}


def _timestamp(unix: float | None) -> Timestamp | None:
    if unix is None:
        return None
    stamp = Timestamp()
    stamp.FromNanoseconds(int(unix * 1e9))
    return stamp


def _status_message(record: MailRecord) -> MailStatus:
    return MailStatus(
        message_id=record.message_id,
        state=_STATE_NUMBERS[record.state],
        attempts=record.attempts,
        last_reply_code=record.last_reply_code or 0,
        last_reply_text=record.last_reply_text,
        accepted_at=_timestamp(record.accepted_at_unix),
        last_attempt_at=_timestamp(record.last_attempt_at_unix),
        finished_at=_timestamp(record.finished_at_unix),
        possible_duplicate=record.possible_duplicate,
    )
