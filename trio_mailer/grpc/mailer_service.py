"""The ``trio_mailer.v1.Mailer`` gRPC handlers: validate, render, queue, answer.

Thin: the work is in ``core.message.MailComposer`` (pure) and ``delivery.mail_queue.MailQueue``.
Errors become gRPC statuses through ``grpc.statuses.rpc_error``: a core error (``core.errors``)
maps to its own status; a ``MailerError`` shows its message, an outbox error a generic one; a
rendering failure is INVALID_ARGUMENT; anything else INTERNAL with a generic message, its detail
logged and never sent to the client.

Deadlines: a call's ``grpc-timeout`` (purerpc hands it over as ``request.timeout``) bounds the
work before its mail is stored. A call whose deadline passes first stores nothing (a cancelled
outbox ``add`` withdraws its row) and answers DEADLINE_EXCEEDED; a call the client cancels is
counted as ``cancelled`` in the metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import attrs
import purerpc
import trio
from google.protobuf.timestamp_pb2 import Timestamp

from trio_mailer.core.addresses import mask
from trio_mailer.core.errors import (
    GrpcStatus,
    InvalidRequest,
    MailerError,
    MailNotFound,
    MessageBuildError,
    OutboxError,
    ShuttingDown,
)
from trio_mailer.core.grpc_deadline import deadline_s, timeout_s
from trio_mailer.core.idempotency import payload_fingerprint, validate_idempotency_key
from trio_mailer.core.load_shedding import DEADLINE_MARGIN_S, REFUSAL_WAIT_S, RefusalPacer
from trio_mailer.core.mail_lifecycle import MailRecord, MailState
from trio_mailer.core.message import MailComposer, OutgoingMail
from trio_mailer.core.rate_limits import retry_after_ms
from trio_mailer.core.rendering import MailKind, MailTemplates, RenderError
from trio_mailer.delivery.mail_queue import MailQueue
from trio_mailer.grpc.admission import (
    CALLER_LIMITED,
    RECIPIENT_LIMITED,
    SUPPRESSED,
    AdmissionControl,
    Refusal,
    Repeat,
    Ticket,
)
from trio_mailer.grpc.statuses import rpc_error, status_error
from trio_mailer.logs import printable
from trio_mailer.metrics import Metrics
from trio_mailer.store.admission_tables import IdempotencyHit, StoreRefusal
from trio_mailer.store.outbox import MemoryOutbox, Outbox
from trio_mailer.store.status_board import StatusBoard
from trio_mailer.v1.mailer_grpc import MailerServicer
from trio_mailer.v1.mailer_pb2 import (
    MailStatus,
    MsgReply,
    MsgRequest,
    SendRequest,
    StatusRequest,
)

log = logging.getLogger(__name__)

QUEUE_FULL_REASON = "queue full"
MAX_MESSAGE_ID_CHARS = 256
_METHODS = {MailKind.PASSWORD: "SendPass", MailKind.RETRIEVE: "SendRetrieve"}
_SENDS = frozenset({"Send", *_METHODS.values()})
_TEMPLATE_IN_LOG_CHARS = 64  # a caller's template name, in a log line, is cut to this
_OUTCOMES = {
    purerpc.StatusCode.INVALID_ARGUMENT: "invalid",
    purerpc.StatusCode.UNAVAILABLE: "unavailable",
    purerpc.StatusCode.FAILED_PRECONDITION: "idempotency_conflict",
    purerpc.StatusCode.ABORTED: "idempotency_busy",
}
# The metrics' outcome label for each refusal reason.
_REFUSAL_OUTCOMES = {
    QUEUE_FULL_REASON: "queue_full",
    RECIPIENT_LIMITED: "recipient_rate_limited",
    CALLER_LIMITED: "caller_rate_limited",
    SUPPRESSED: "suppressed",
}
ANONYMOUS_CALLER = "anonymous"  # every unauthenticated caller: one idempotency space

# Who is calling, from the call's request headers (and the connection): see app.caller_identity.
Identify = Callable[[Sequence[tuple[str, str]]], str]


def _anonymous(_metadata: Sequence[tuple[str, str]]) -> str:
    return ANONYMOUS_CALLER


def _metadata(request: Any) -> Sequence[tuple[str, str]]:
    return tuple(getattr(request, "custom_metadata", None) or ())


def _deadline_s(request: Any) -> float | None:
    timeout = None if request is None else getattr(request, "timeout", None)
    return None if timeout is None else float(timeout.total_seconds())


@attrs.frozen
class _Call:
    """One send call, whatever its RPC: what admission and the log need, and how to build it."""

    method: str  # for the metrics
    kind: str  # for the log
    to: str
    key: str  # idempotency_key as sent
    fingerprint_fields: tuple[tuple[str, str], ...]
    compose: Callable[[datetime], OutgoingMail]
    request: Any  # purerpc's call (headers, deadline), or None
    deadline: float  # on the trio clock (inf: none)


class MailerService(MailerServicer):  # type: ignore[misc]  # generated, untyped base
    def __init__(
        self,
        composer: MailComposer,
        queue: MailQueue,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        metrics: Metrics | None = None,
        outbox: Outbox | None = None,
        board: StatusBoard | None = None,
        wall_clock: Callable[[], float] = time.time,
        admission: AdmissionControl | None = None,
        identify: Identify = _anonymous,
        refusal_pacer: RefusalPacer | None = None,
        refusal_wait_s: float = REFUSAL_WAIT_S,
    ) -> None:
        self._composer = composer
        self._queue = queue
        self._now = now
        self._metrics = metrics
        self.outbox: Outbox = outbox if outbox is not None else MemoryOutbox()
        self._board = board if board is not None else StatusBoard()
        self._wall_clock = wall_clock
        self.admission = (
            admission
            if admission is not None
            else AdmissionControl(window_s=86400.0, wall_clock=wall_clock, outbox=self.outbox)
        )
        self._identify = identify
        self._pacer = refusal_pacer if refusal_pacer is not None else RefusalPacer()
        self._refusal_wait_s = refusal_wait_s
        self._room_watch = trio.Lock()
        self.draining = False
        self.refused_queue_full = 0
        self._last_full_log = -math.inf

    @property
    def templates(self) -> MailTemplates:
        return self._composer.templates

    def replace_templates(self, templates: MailTemplates) -> None:
        """Use ``templates`` from the next request on (a reload; they were checked already)."""
        self._composer = attrs.evolve(self._composer, templates=templates)

    async def Send(self, message: SendRequest, request: Any = None) -> MsgReply:
        def compose(now: datetime) -> OutgoingMail:
            return self._composer.compose_template(
                message.template, message.to, dict(message.vars), now, locale=message.locale
            )

        fields = (
            ("template", message.template),
            ("to", message.to),
            ("locale", message.locale),
            *sorted(message.vars.items()),
        )
        call = _Call(
            "Send",
            printable(message.template[:_TEMPLATE_IN_LOG_CHARS]),
            message.to,
            message.idempotency_key,
            fields,
            compose,
            request,
            _deadline(request),
        )
        with self._observed("Send"):
            return await self._submit(call)

    async def SendPass(self, message: MsgRequest, request: Any = None) -> MsgReply:
        with self._observed("SendPass"):
            return await self._submit_code(MailKind.PASSWORD, message, request)

    async def SendRetrieve(self, message: MsgRequest, request: Any = None) -> MsgReply:
        with self._observed("SendRetrieve"):
            return await self._submit_code(MailKind.RETRIEVE, message, request)

    async def _submit_code(self, kind: MailKind, message: MsgRequest, request: Any) -> MsgReply:
        def compose(now: datetime) -> OutgoingMail:
            return self._composer.compose(
                kind, message.to, message.code, now, locale=message.locale
            )

        fields = (("to", message.to), ("code", message.code), ("locale", message.locale))
        call = _Call(
            _METHODS[kind],
            kind.value,
            message.to,
            message.idempotency_key,
            fields,
            compose,
            request,
            _deadline(request),
        )
        return await self._submit(call)

    async def GetStatus(self, message: StatusRequest, request: Any = None) -> MailStatus:
        with self._observed("GetStatus"):
            record = await self._find(await self._status_id(message, request))
            return _status_message(record)

    async def WatchStatus(
        self, message: StatusRequest, request: Any = None
    ) -> AsyncIterator[MailStatus]:
        """The current status, then each change, ending after a terminal state."""
        with self._observed("WatchStatus"):
            record = await self._find(await self._status_id(message, request))
            yield _status_message(record)
            while not record.state.terminal:
                # Look before waiting: a change that landed while this stream was suspended at
                # ``yield`` (or a final state already moved to the outbox) is not missed.
                latest = await self._find(record.message_id)
                if latest == record:
                    await self._board.wait_for_change(record.message_id)
                    continue
                record = latest
                yield _status_message(record)

    @contextmanager
    def _observed(self, method: str) -> Iterator[None]:
        """The accept latency of a send (the front counts every call by its status code)."""
        if self._metrics is None:
            yield
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            if method in _SENDS:
                self._metrics.accept_latency.observe(time.perf_counter() - started)

    async def _status_id(self, message: StatusRequest, request: Any) -> str:
        """The message_id a StatusRequest names, directly or by the caller's idempotency key."""
        if not message.idempotency_key:
            return str(message.message_id)
        if message.message_id:
            raise status_error(
                GrpcStatus.INVALID_ARGUMENT,
                "message_id, idempotency_key: expected one of the two, got both",
            )
        try:
            key = validate_idempotency_key(message.idempotency_key)
            assert key is not None
            message_id = await self.admission.find(self._identify(_metadata(request)), key)
        except InvalidRequest as exc:
            raise status_error(GrpcStatus.INVALID_ARGUMENT, exc.message) from None
        except OutboxError as exc:
            log.error("cannot read the outbox: %s", exc)
            raise status_error(GrpcStatus.UNAVAILABLE, "status unavailable") from None
        if message_id is None:
            raise status_error(
                GrpcStatus.NOT_FOUND,
                "idempotency_key: no mail from this caller with this key within the window",
            )
        return message_id

    async def _find(self, message_id: str) -> MailRecord:
        if not message_id or len(message_id) > MAX_MESSAGE_ID_CHARS:
            raise rpc_error(
                InvalidRequest(
                    "message_id",
                    f"expected 1 to {MAX_MESSAGE_ID_CHARS} characters, got {len(message_id)}",
                )
            )
        record = self._board.get(message_id)
        if record is None:
            try:
                record = await self.outbox.get(message_id)
            except OutboxError as exc:
                log.error("cannot read the outbox: %s", exc)
                raise rpc_error(exc, "status unavailable") from None
        if record is None:
            raise rpc_error(MailNotFound())
        return record

    def _refused(self, kind: str, to: str, refusal: Refusal) -> MsgReply:
        # Without the code; the address masked.
        log.info("refused %s mail to %s: %s", kind, mask(to), refusal.reason)
        return MsgReply(
            sent=False, reason=refusal.reason, retry_after_ms=retry_after_ms(refusal.retry_after_s)
        )

    def _queue_full(self, kind: str) -> MsgReply:
        self.refused_queue_full += 1
        # One line per second at most: a flood must not turn into a flood of log lines.
        now = time.monotonic()
        if now - self._last_full_log >= 1.0:
            log.warning(
                "refusing %s mail: queue full (%d refused so far)",
                kind,
                self.refused_queue_full,
            )
            self._last_full_log = now
        return MsgReply(
            sent=False,
            reason=QUEUE_FULL_REASON,
            retry_after_ms=retry_after_ms(self.admission.pace.next_place_s()),
        )

    async def _refusal_turn(self, call: _Call) -> bool:
        """The queue is full: wait for this call's turn to be refused (``core.load_shedding``),
        within ``refusal_wait_s`` and the call's deadline. True when there is room after all."""
        now = trio.current_time()
        latest = min(now + self._refusal_wait_s, call.deadline - DEADLINE_MARGIN_S)
        turn = self._pacer.turn_s(now, latest)
        if turn > now:
            with trio.move_on_at(turn):
                # One waiter at a time (the lock is FIFO) watches for a freed place, so a place
                # is taken as soon as the senders free it, not at the next turn, and a freed
                # place wakes one task, not every waiting call.
                async with self._room_watch:
                    while self._queue.full():
                        await self._queue.wait_for_room()
        return not self._queue.full()

    async def _submit(self, call: _Call) -> MsgReply:
        outcome = "internal"
        try:
            with trio.move_on_at(call.deadline):
                reply, repeat = await self._admit(call)
                if repeat:
                    outcome = "repeat"
                else:
                    outcome = "accepted" if reply.sent else _REFUSAL_OUTCOMES[reply.reason]
                return reply
            outcome = "deadline_exceeded"
            log.info("%s call past its deadline before its mail was stored", call.method)
            raise status_error(
                GrpcStatus.DEADLINE_EXCEEDED, "deadline exceeded; nothing was stored"
            )
        except purerpc.RpcFailedError as exc:
            if outcome != "deadline_exceeded":
                outcome = _OUTCOMES.get(exc.status.status_code, "internal")
            raise
        except trio.Cancelled:
            # The front's deadline for the call fired, or the client went away.
            past = trio.current_time() >= call.deadline
            outcome = "deadline_exceeded" if past else "cancelled"
            raise
        finally:
            if self._metrics is not None:
                self._metrics.requests.labels(call.method, outcome).inc()

    async def _admit(self, call: _Call) -> tuple[MsgReply, bool]:
        """The reply, and whether it repeats an earlier call's (same idempotency key)."""
        kind = call.kind
        try:
            if self.draining:
                raise ShuttingDown()
            if not call.key and self._queue.full():
                # The flood's path: nothing to look up, nothing to count, nothing to build;
                # and the answer waits its turn, so that delivery keeps the loop.
                room = await self._refusal_turn(call)
                if self.draining:
                    raise ShuttingDown()
                if not room:
                    return self._queue_full(kind), False
            key = validate_idempotency_key(call.key)
            ticket = await self.admission.begin(
                self._identify(_metadata(call.request)),
                key,
                payload_fingerprint(call.method, call.fingerprint_fields),
                call.to,
                wait_s=_deadline_s(call.request),
            )
        except MailerError as exc:
            log.info("refused %s request: %s", kind, printable(exc.message))
            raise rpc_error(exc) from None
        try:
            reply = await self._accept(call, ticket)
        finally:
            ticket.close()
        return reply, ticket.repeat is not None

    async def _refuse(self, call: _Call, ticket: Ticket, refusal: Refusal | None) -> MsgReply:
        """A refusal; but a stored first call of the ticket's key answers instead."""
        repeat = await ticket.stored_repeat()
        if repeat is not None:
            return _repeat_reply(repeat)
        if refusal is None:
            return self._queue_full(call.kind)
        return self._refused(call.kind, call.to, refusal)

    async def _accept(self, call: _Call, ticket: Ticket) -> MsgReply:
        kind = call.kind
        try:
            if ticket.repeat is not None:
                return _repeat_reply(ticket.repeat)
            refusal = ticket.refusal()
            if refusal is not None:
                return await self._refuse(call, ticket, refusal)
            # Under overload most calls end here: refuse before the costly validation and
            # message building, so the flood leaves the sender the CPU (and the GIL).
            if self._queue.full() and not await self._refusal_turn(call):
                return await self._refuse(call, ticket, None)
            mail = call.compose(self._now())
            try:
                self._queue.reserve_nowait()
            except trio.WouldBlock:
                return await self._refuse(call, ticket, None)
            record = MailRecord.accepted(mail, accepted_at_unix=self._wall_clock())
            try:
                # Durable before the caller hears sent=true (with the file outbox); the key and
                # the rate-limit row are in the same commit.
                acceptance = ticket.acceptance(mail.message_id)
                if acceptance is None:
                    await self.outbox.add(record)
                else:
                    await self.outbox.add(record, acceptance)
            except IdempotencyHit as hit:
                self._queue.release()
                return _repeat_reply(ticket.resolve(hit.entry))
            except StoreRefusal as refused:
                # A shared outbox: another replica's accepts filled the limit, or it
                # suppressed the address.
                self._queue.release()
                reason = _STORE_REFUSALS[refused.reason]
                return self._refused(kind, call.to, Refusal(reason, refused.retry_after_s))
            except BaseException:
                self._queue.release()
                raise
            ticket.accepted(mail.message_id)
            self._board.track(record)
            self._queue.put_reserved(mail, accepted_at_s=trio.current_time())
        except OutboxError as exc:
            log.error("cannot store a %s mail: %s", kind, exc)
            raise rpc_error(exc, "cannot store the mail right now; try again later") from None
        except MessageBuildError as exc:
            log.error("message failed its safety check: %s", printable(exc.detail))
            raise rpc_error(exc) from None
        except MailerError as exc:
            log.info("refused %s request: %s", kind, printable(exc.message))
            raise rpc_error(exc) from None
        except RenderError as exc:
            log.warning("rendering failed for a %s request: %s", kind, printable(str(exc)))
            raise rpc_error(
                InvalidRequest("request", "the values cannot be rendered into the mail")
            ) from None
        except Exception:
            log.exception("unexpected error while accepting a %s mail", kind)
            raise status_error(GrpcStatus.INTERNAL, "internal error") from None
        log.debug("accepted %s mail %s", kind, mail.message_id)
        return MsgReply(sent=True, message_id=mail.message_id)


_STORE_REFUSALS = {
    "recipient": RECIPIENT_LIMITED,
    "caller": CALLER_LIMITED,
    "suppressed": SUPPRESSED,
}


def _repeat_reply(repeat: Repeat) -> MsgReply:
    return MsgReply(sent=True, message_id=repeat.message_id)


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
