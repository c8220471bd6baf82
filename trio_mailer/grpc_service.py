"""The ``trio_mailer.v1.Mailer`` gRPC handlers: validate, render, queue, answer.

Thin: the work is in ``message.MailComposer`` (pure) and ``mail_queue.MailQueue``. This is also
where errors become gRPC statuses: a ``MailerError`` maps to its own status and message; a
rendering failure to INVALID_ARGUMENT; anything else to INTERNAL with a generic message, its
detail logged and never sent to the client.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

import purerpc
import trio

from .errors import MailerError, MessageBuildError, ShuttingDown
from .logs import printable
from .mail_queue import MailQueue
from .message import MailComposer
from .metrics import Metrics
from .rendering import MailKind, RenderError
from .v1.mailer_grpc import MailerServicer
from .v1.mailer_pb2 import MsgReply, MsgRequest

log = logging.getLogger(__name__)

QUEUE_FULL_REASON = "queue full"
_METHODS = {MailKind.PASSWORD: "SendPass", MailKind.RETRIEVE: "SendRetrieve"}
_OUTCOMES = {
    purerpc.StatusCode.INVALID_ARGUMENT: "invalid",
    purerpc.StatusCode.UNAVAILABLE: "unavailable",
}


def _rpc_error(status: purerpc.StatusCode, message: str) -> purerpc.RpcFailedError:
    return purerpc.RpcFailedError(purerpc.Status(status, message))


class MailerService(MailerServicer):  # type: ignore[misc]  # generated, untyped base
    def __init__(
        self,
        composer: MailComposer,
        queue: MailQueue,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
    ) -> None:
        self._composer = composer
        self._queue = queue
        self._now = now
        self._metrics = metrics
        self.draining = False
        self.refused_queue_full = 0
        self._last_full_log = -math.inf

    async def SendPass(self, message: MsgRequest) -> MsgReply:
        return self._submit(MailKind.PASSWORD, message)

    async def SendRetrieve(self, message: MsgRequest) -> MsgReply:
        return self._submit(MailKind.RETRIEVE, message)

    def _queue_full(self, kind: MailKind) -> MsgReply:
        self.refused_queue_full += 1
        # One line per second at most: a flood must not turn into a flood of log lines.
        now = time.monotonic()
        if now - self._last_full_log >= 1.0:
            log.warning(
                "refusing %s mail: queue full (%d refused so far)",
                kind.value,
                self.refused_queue_full,
            )
            self._last_full_log = now
        return MsgReply(sent=False, reason=QUEUE_FULL_REASON)

    def _submit(self, kind: MailKind, request: MsgRequest) -> MsgReply:
        outcome = "internal"
        try:
            reply = self._accept(kind, request)
            outcome = "accepted" if reply.sent else "queue_full"
            return reply
        except purerpc.RpcFailedError as exc:
            outcome = _OUTCOMES.get(exc.status.status_code, "internal")
            raise
        finally:
            if self._metrics is not None:
                self._metrics.requests.labels(_METHODS[kind], outcome).inc()

    def _accept(self, kind: MailKind, request: MsgRequest) -> MsgReply:
        try:
            if self.draining:
                raise ShuttingDown()
            # Under overload most calls end here: refuse before the costly validation and
            # message building, so the flood leaves the sender the CPU (and the GIL).
            if self._queue.full():
                return self._queue_full(kind)
            mail = self._composer.compose(kind, request.to, request.code, self._now())
            try:
                self._queue.put_nowait(mail)
            except trio.WouldBlock:
                return self._queue_full(kind)
        except MessageBuildError as exc:
            log.error("message failed its safety check: %s", printable(exc.detail))
            raise _rpc_error(purerpc.StatusCode.INTERNAL, exc.message) from None
        except MailerError as exc:
            log.info("refused %s request: %s", kind.value, printable(exc.message))
            raise _rpc_error(purerpc.StatusCode(exc.grpc_status.value), exc.message) from None
        except RenderError as exc:
            log.warning("rendering failed for a %s request: %s", kind.value, printable(str(exc)))
            raise _rpc_error(
                purerpc.StatusCode.INVALID_ARGUMENT,
                "request: the values cannot be rendered into the mail",
            ) from None
        except Exception:
            log.exception("unexpected error while accepting a %s mail", kind.value)
            raise _rpc_error(purerpc.StatusCode.INTERNAL, "internal error") from None
        log.debug("accepted %s mail %s", kind.value, mail.message_id)
        return MsgReply(sent=True, message_id=mail.message_id)
